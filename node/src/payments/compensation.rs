//! Compensation for lost callbacks: orders with a payment created and no confirmation are queried
//! at the provider, with exponential backoff, until their reservation TTL plus a grace period has
//! passed; a query that reports the payment confirms the order through the engine exactly as a
//! callback would (same binding checks, same idempotency key).
//!
//! The schedule is pure ([`first_query_at`], [`after_query`]); [`spawn`] runs it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgecard_protocol::OrderId;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::router::Router;
use super::QueriedStatus;
use crate::orders::engine::now_millis;
use crate::orders::{OrderEngine, OrderError, OrderStatus, PaymentOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompensationConfig {
    /// First query this long after the order was created; also the first backoff step.
    pub first_query_after_ms: u64,
    /// Longest wait between two queries of one order.
    pub max_backoff_ms: u64,
    /// Queries go on this long past the reservation's expiry (a late payment still delivers).
    pub grace_ms: u64,
    /// How often the index of unconfirmed orders is scanned.
    pub scan_every_ms: u64,
    /// Most queries in flight at once.
    pub concurrency: usize,
    /// Bound on one query.
    pub query_timeout_ms: u64,
}

impl Default for CompensationConfig {
    fn default() -> Self {
        CompensationConfig {
            first_query_after_ms: 60_000,
            max_backoff_ms: 300_000,
            grace_ms: 900_000,
            scan_every_ms: 1_000,
            concurrency: 16,
            query_timeout_ms: 10_000,
        }
    }
}

/// When an order created at `created_at` (unix ms) is first queried.
pub fn first_query_at(created_at: u64, config: &CompensationConfig) -> u64 {
    created_at.saturating_add(config.first_query_after_ms)
}

/// After the `attempts`-th query (1-based) at `now` found nothing: when to ask next, or `None` to
/// give up. Delays double from `first_query_after_ms` up to `max_backoff_ms`; the last query is
/// made at `expires_at + grace_ms` exactly, and nothing after it.
pub fn after_query(now: u64, attempts: u32, expires_at: u64, config: &CompensationConfig) -> Option<u64> {
    let deadline = expires_at.saturating_add(config.grace_ms);
    if now >= deadline {
        return None;
    }
    let shift = attempts.saturating_sub(1).min(32);
    let delay = config.first_query_after_ms.max(1).saturating_mul(1u64 << shift).min(config.max_backoff_ms.max(1));
    Some(now.saturating_add(delay).min(deadline))
}

#[derive(Debug, Clone, Copy)]
struct Tracker {
    attempts: u32,
    next_at: u64,
}

#[derive(Debug)]
enum Outcome {
    /// Settled (confirmed now or earlier) or finally failed: the index entry is gone.
    Done,
    /// Nothing yet (or the query failed): ask again per the schedule.
    Again { expires_at: u64 },
}

/// Runs compensation until `shutdown`.
pub fn spawn(
    engine: Arc<OrderEngine>,
    router: Arc<Router>,
    config: CompensationConfig,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut trackers: HashMap<OrderId, Tracker> = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(config.scan_every_ms.max(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
            let pending = match engine.awaiting_confirmation() {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::error!(error = %e, "compensation: cannot read the index of unconfirmed orders");
                    continue;
                }
            };
            let now = now_millis().0;
            let live: std::collections::HashSet<OrderId> = pending.iter().map(|(id, _)| *id).collect();
            trackers.retain(|id, _| live.contains(id));
            let mut due = Vec::new();
            for (id, created_at) in pending {
                let tracker = trackers
                    .entry(id)
                    .or_insert(Tracker { attempts: 0, next_at: first_query_at(created_at.0, &config) });
                if tracker.next_at <= now {
                    due.push(id);
                }
            }
            let mut running = JoinSet::new();
            let mut due = due.into_iter();
            loop {
                while running.len() < config.concurrency.max(1) {
                    let Some(id) = due.next() else { break };
                    let (engine, router) = (engine.clone(), router.clone());
                    let timeout = Duration::from_millis(config.query_timeout_ms.max(1));
                    running.spawn(async move { (id, compensate(&engine, &router, id, timeout).await) });
                }
                let Some(joined) = running.join_next().await else { break };
                let Ok((id, outcome)) = joined else { continue };
                match outcome {
                    Outcome::Done => {
                        trackers.remove(&id);
                    }
                    Outcome::Again { expires_at } => {
                        let now = now_millis().0;
                        let tracker = trackers.entry(id).or_insert(Tracker { attempts: 0, next_at: now });
                        tracker.attempts += 1;
                        match after_query(now, tracker.attempts, expires_at, &config) {
                            Some(next) => tracker.next_at = next,
                            None => {
                                router.metrics().compensation_gave_up.inc();
                                tracing::warn!(order = %id, attempts = tracker.attempts, "compensation: no payment found before TTL + grace; giving up");
                                if let Err(e) = engine.drop_awaiting_confirmation(&id) {
                                    tracing::error!(order = %id, error = %e, "compensation: cannot drop the index entry");
                                }
                                trackers.remove(&id);
                            }
                        }
                    }
                }
            }
        }
    })
}

async fn compensate(engine: &OrderEngine, router: &Router, id: OrderId, timeout: Duration) -> Outcome {
    let order = match engine.order_for_payment(&id) {
        Ok(order) => order,
        Err(OrderError::NotFound) => {
            let _ = engine.drop_awaiting_confirmation(&id);
            return Outcome::Done;
        }
        Err(e) => {
            tracing::error!(order = %id, error = %e, "compensation: cannot load the order");
            return Outcome::Again { expires_at: 0 };
        }
    };
    let expires_at = order.expires_at.0;
    if matches!(order.status, OrderStatus::Delivered | OrderStatus::PaidAwaitingStock) {
        let _ = engine.drop_awaiting_confirmation(&id);
        return Outcome::Done;
    }
    // Every attempt is asked (a buyer may have paid any of them); the first payment found is
    // bound like a callback. The order is given up early only when every attempt failed for good.
    let mut all_failed = true;
    for attempt in order.attempts() {
        match query_attempt(engine, router, &order, attempt, timeout).await {
            AttemptStatus::Settled => return Outcome::Done,
            AttemptStatus::Failed => {}
            AttemptStatus::Open => all_failed = false,
        }
    }
    if all_failed {
        let _ = engine.drop_awaiting_confirmation(&id);
        return Outcome::Done;
    }
    Outcome::Again { expires_at }
}

/// What one attempt's query found.
enum AttemptStatus {
    /// A payment, bound (or recorded as a problem) by the engine.
    Settled,
    /// Expired or failed at the provider: nothing will be paid through it.
    Failed,
    /// Not paid yet, or the query failed: ask again.
    Open,
}

async fn query_attempt(
    engine: &OrderEngine,
    router: &Router,
    order: &crate::orders::OrderRecord,
    attempt: crate::orders::AttemptRef<'_>,
    timeout: Duration,
) -> AttemptStatus {
    let id = order.id;
    let Some(channel) = router.channel(attempt.channel).cloned() else {
        tracing::warn!(order = %id, channel = attempt.channel, "compensation: the order's channel is not configured");
        return AttemptStatus::Open;
    };
    let metrics = router.metrics().channel(channel.name());
    if let Some(m) = metrics {
        m.queries.inc();
    }
    let result = match tokio::time::timeout(timeout, channel.query_payment(order, attempt)).await {
        Ok(result) => result,
        Err(_) => Err(super::ChannelError::Timeout { channel: channel.name() }),
    };
    match result {
        Ok(QueriedStatus::Paid(payment)) if payment.order_id == order.id => {
            match engine.confirm_payment(payment.confirmation(channel.name())).await {
                Ok(PaymentOutcome::Problem(kind)) => {
                    // Recorded and raised by the engine; nothing more to find for this order.
                    tracing::warn!(order = %id, channel = channel.name(), reason = kind.as_str(), "compensation: the provider's payment paid nothing; recorded");
                    let _ = engine.drop_awaiting_confirmation(&id);
                    AttemptStatus::Settled
                }
                Ok(outcome) => {
                    if let Some(m) = metrics {
                        m.compensated.inc();
                    }
                    tracing::info!(order = %id, channel = channel.name(), ?outcome, "compensation: payment found and confirmed");
                    AttemptStatus::Settled
                }
                Err(e) => {
                    tracing::error!(order = %id, error = %e, "compensation: recording the payment failed");
                    AttemptStatus::Open
                }
            }
        }
        Ok(QueriedStatus::Paid(_)) => {
            tracing::error!(order = %id, "compensation: the provider answered about another order");
            AttemptStatus::Open
        }
        Ok(QueriedStatus::Failed) => AttemptStatus::Failed,
        Ok(QueriedStatus::Pending) => AttemptStatus::Open,
        Err(e) => {
            if let Some(m) = metrics {
                m.query_failed.inc();
            }
            tracing::info!(order = %id, error = %e, "compensation: query failed; will retry");
            AttemptStatus::Open
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CompensationConfig {
        CompensationConfig {
            first_query_after_ms: 1_000,
            max_backoff_ms: 8_000,
            grace_ms: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stops_at_ttl_plus_grace() {
        let c = config();
        let created = 100_000;
        let expires = created + 20_000;
        let mut now = first_query_at(created, &c);
        assert_eq!(now, 101_000);
        let mut gaps = Vec::new();
        let mut attempts = 0;
        while let Some(next) = after_query(now, attempts + 1, expires, &c) {
            attempts += 1;
            gaps.push(next - now);
            now = next;
            assert!(attempts < 100, "must terminate");
        }
        assert_eq!(&gaps[..5], &[1_000, 2_000, 4_000, 8_000, 8_000], "doubling, capped");
        assert_eq!(now, expires + c.grace_ms, "the last query is at the deadline exactly");
    }

    #[test]
    fn nothing_after_the_deadline_and_no_overflow() {
        let c = config();
        assert_eq!(after_query(30_000, 1, 20_000, &c), None);
        assert_eq!(after_query(29_999, 1, 20_000, &c), Some(30_000));
        let huge = CompensationConfig { first_query_after_ms: u64::MAX, max_backoff_ms: u64::MAX, ..c };
        assert_eq!(after_query(5, 60, u64::MAX - 1, &huge), Some(u64::MAX));
        assert_eq!(first_query_at(u64::MAX, &huge), u64::MAX);
        let zero = CompensationConfig { first_query_after_ms: 0, max_backoff_ms: 0, ..c };
        assert_eq!(after_query(0, 1, 10, &zero), Some(1), "never a busy loop");
    }
}
