//! When compensation asks a provider about an unconfirmed order, and when it stops (pure).
//!
//! An order is asked about from `first_query_after_ms` after its creation until the provider can
//! no longer take its payment: the end of the latest of its attempts' payment windows (a Stripe
//! Checkout Session's `expires_at`) plus `grace_ms`, or, for a provider whose payments never
//! expire (EPay), `max_window_ms` after the order's creation, the cap for every order. Pauses
//! double from `first_query_after_ms` up to `max_backoff_ms`, then grow with the order's age (a
//! quarter of it, at most [`LATE_BACKOFF_MAX_MS`]): a payment is likeliest soon after the order,
//! and an order days old is asked about hourly. An order whose record cannot be read is asked
//! about again later, whatever its age: only the provider's answer or the window ends it.

use super::CompensationConfig;

/// Longest pause between two queries of an old order.
pub const LATE_BACKOFF_MAX_MS: u64 = 3_600_000;

/// When an order created at `created_at` (unix ms) is first queried.
pub fn first_query_at(created_at: u64, config: &CompensationConfig) -> u64 {
    created_at.saturating_add(config.first_query_after_ms)
}

/// The last moment an order created at `created_at` is queried, given the payment windows of its
/// attempts (`None`: the provider's payments do not expire).
pub fn deadline(created_at: u64, windows: impl IntoIterator<Item = Option<u64>>, config: &CompensationConfig) -> u64 {
    let cap = created_at.saturating_add(config.max_window_ms);
    windows
        .into_iter()
        .map(|window| window.map_or(cap, |ends| ends.saturating_add(config.grace_ms).min(cap)))
        .max()
        .unwrap_or(cap)
}

/// The pause after the `attempts`-th query (1-based) of an order `age_ms` old.
pub fn backoff(attempts: u32, age_ms: u64, config: &CompensationConfig) -> u64 {
    let shift = attempts.saturating_sub(1).min(32);
    let doubling = config.first_query_after_ms.max(1).saturating_mul(1u64 << shift).min(config.max_backoff_ms.max(1));
    doubling.max((age_ms / 4).min(LATE_BACKOFF_MAX_MS))
}

/// After the `attempts`-th query at `now` found nothing: when to ask next, or `None` to give up.
/// The last query is made at `deadline` exactly, and nothing after it.
pub fn after_query(
    now: u64,
    attempts: u32,
    created_at: u64,
    deadline: u64,
    config: &CompensationConfig,
) -> Option<u64> {
    if now >= deadline {
        return None;
    }
    let delay = backoff(attempts, now.saturating_sub(created_at), config);
    Some(now.saturating_add(delay).min(deadline))
}

/// After the order's record could not be read at `now` (the `attempts`-th time): when to try
/// again. Never gives up: without the record nothing says the window has ended.
pub fn after_load_failure(now: u64, attempts: u32, config: &CompensationConfig) -> u64 {
    now.saturating_add(backoff(attempts, 0, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;

    fn config() -> CompensationConfig {
        CompensationConfig {
            first_query_after_ms: 1_000,
            max_backoff_ms: 8_000,
            grace_ms: 10_000,
            max_window_ms: 100_000,
            ..Default::default()
        }
    }

    /// Every query time of an order created at `created` that is never paid.
    fn queries(created: u64, deadline: u64, c: &CompensationConfig) -> Vec<u64> {
        let mut at = vec![first_query_at(created, c)];
        while let Some(next) = after_query(*at.last().unwrap_or(&0), at.len() as u32, created, deadline, c) {
            at.push(next);
            assert!(at.len() < 10_000, "must terminate");
        }
        at
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stops_at_the_deadline() {
        let c = config();
        let created = 100_000;
        let deadline = deadline(created, [Some(created + 20_000)], &c);
        assert_eq!(deadline, created + 30_000, "the window's end plus the grace");
        let at = queries(created, deadline, &c);
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(at[0], 101_000);
        assert_eq!(&gaps[..5], &[1_000, 2_000, 4_000, 8_000, 8_000], "doubling, capped");
        assert_eq!(*at.last().unwrap_or(&0), deadline, "the last query is at the deadline exactly");
    }

    #[test]
    fn the_latest_window_counts_and_payments_without_expiry_run_to_the_cap() {
        let c = config();
        assert_eq!(deadline(0, [Some(5_000), Some(40_000)], &c), 50_000);
        assert_eq!(deadline(0, [Some(5_000), None], &c), 100_000, "a provider without expiry: the cap");
        assert_eq!(deadline(0, [Some(500_000)], &c), 100_000, "never past the cap");
    }

    #[test]
    fn nothing_after_the_deadline_and_no_overflow() {
        let c = config();
        assert_eq!(after_query(30_000, 1, 0, 30_000, &c), None);
        assert_eq!(after_query(29_999, 1, 0, 30_000, &c), Some(30_000));
        let huge = CompensationConfig {
            first_query_after_ms: u64::MAX,
            max_backoff_ms: u64::MAX,
            max_window_ms: u64::MAX,
            ..c
        };
        assert_eq!(after_query(5, 60, 0, u64::MAX - 1, &huge), Some(u64::MAX - 1));
        assert_eq!(first_query_at(u64::MAX, &huge), u64::MAX);
        assert_eq!(deadline(u64::MAX, [None], &huge), u64::MAX);
        let zero = CompensationConfig { first_query_after_ms: 0, max_backoff_ms: 0, ..c };
        assert_eq!(after_query(0, 1, 0, 10, &zero), Some(1), "never a busy loop");
    }

    #[test]
    fn an_order_of_a_provider_without_expiry_is_asked_about_ever_more_slowly_for_72_hours() {
        let c = CompensationConfig { max_window_ms: 72 * HOUR, ..CompensationConfig::default() };
        let created = 1_000 * HOUR;
        let deadline = deadline(created, [None], &c);
        let at = queries(created, deadline, &c);
        assert_eq!(*at.last().unwrap_or(&0) - created, 72 * HOUR, "asked about until the cap");
        let asked_at = |age: u64| at.iter().any(|t| (created + age..created + age + HOUR).contains(t));
        assert!(asked_at(45 * MINUTE) && asked_at(48 * HOUR), "still asked about late");
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        let before_last = &gaps[..gaps.len() - 1];
        assert!(before_last.windows(2).all(|w| w[1] >= w[0]), "pauses never shrink (but to meet the cap): {gaps:?}");
        assert!(gaps.iter().all(|g| *g <= LATE_BACKOFF_MAX_MS), "at least hourly");
        assert!(at.len() < 100, "{} queries over 72 h", at.len());
    }

    #[test]
    fn a_load_failure_is_retried_past_any_deadline() {
        let c = config();
        // An order whose window has long ended: a failed load still comes back, never gives up.
        let now = 10 * c.max_window_ms;
        for attempts in [1, 5, 50] {
            let next = after_load_failure(now, attempts, &c);
            assert!(next > now && next <= now + c.max_backoff_ms, "{attempts}: {next}");
        }
    }
}
