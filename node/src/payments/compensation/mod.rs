//! Compensation for lost callbacks: orders with a payment opened and no confirmation are queried
//! at the provider for as long as it can take their payment ([`schedule`]: the provider's payment
//! window plus a grace period, or a cap for providers whose payments never expire), ever more
//! slowly; a query that reports the payment confirms the order through the engine exactly as a
//! callback would (same binding checks, same idempotency key), so a late payment ends delivered
//! or waiting for stock.
//!
//! [`Compensator::tick`] does one pass at a given time, so tests drive it with their own clock;
//! [`spawn`] runs it on the node's.

pub mod schedule;

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

pub use schedule::{after_load_failure, after_query, backoff, deadline, first_query_at};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompensationConfig {
    /// First query this long after the order was created; also the first backoff step.
    pub first_query_after_ms: u64,
    /// Longest wait between two queries of a young order (older ones slow down further).
    pub max_backoff_ms: u64,
    /// Queries go on this long past the end of the provider's payment window.
    pub grace_ms: u64,
    /// No order is queried longer than this after its creation; orders at providers whose
    /// payments never expire (EPay) are queried this long.
    pub max_window_ms: u64,
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
            max_window_ms: 72 * 3_600_000,
            scan_every_ms: 1_000,
            concurrency: 16,
            query_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Tracker {
    attempts: u32,
    next_at: u64,
    created_at: u64,
}

#[derive(Debug)]
enum Outcome {
    /// Settled (confirmed now or earlier) or finally failed: the index entry is gone.
    Done,
    /// Nothing yet (or the query failed): ask again per the schedule, until `deadline`.
    Again { deadline: u64 },
    /// The order's record could not be read: try again later, whatever its age.
    LoadFailed,
}

/// Compensation's state: when each unconfirmed order is next queried.
pub struct Compensator {
    engine: Arc<OrderEngine>,
    router: Arc<Router>,
    config: CompensationConfig,
    trackers: HashMap<OrderId, Tracker>,
}

impl Compensator {
    pub fn new(engine: Arc<OrderEngine>, router: Arc<Router>, config: CompensationConfig) -> Self {
        Compensator { engine, router, config, trackers: HashMap::new() }
    }

    /// One pass at `now` (unix ms): queries the orders due (at most `concurrency` at once) and
    /// schedules their next query, or gives them up once their window has ended.
    pub async fn tick(&mut self, now: u64) {
        let pending = match self.engine.awaiting_confirmation() {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(error = %e, "compensation: cannot read the index of unconfirmed orders");
                return;
            }
        };
        let live: std::collections::HashSet<OrderId> = pending.iter().map(|(id, _)| *id).collect();
        self.trackers.retain(|id, _| live.contains(id));
        let mut due = Vec::new();
        for (id, created_at) in pending {
            let tracker = self.trackers.entry(id).or_insert(Tracker {
                attempts: 0,
                next_at: first_query_at(created_at.0, &self.config),
                created_at: created_at.0,
            });
            if tracker.next_at <= now {
                due.push(id);
            }
        }
        let mut running = JoinSet::new();
        let mut due = due.into_iter();
        loop {
            while running.len() < self.config.concurrency.max(1) {
                let Some(id) = due.next() else { break };
                let (engine, router) = (self.engine.clone(), self.router.clone());
                let timeout = Duration::from_millis(self.config.query_timeout_ms.max(1));
                let config = self.config;
                running.spawn(async move { (id, compensate(&engine, &router, id, timeout, &config).await) });
            }
            let Some(joined) = running.join_next().await else { break };
            let Ok((id, outcome)) = joined else { continue };
            self.schedule(id, outcome, now);
        }
    }

    fn schedule(&mut self, id: OrderId, outcome: Outcome, now: u64) {
        let Some(tracker) = self.trackers.get_mut(&id) else { return };
        tracker.attempts = tracker.attempts.saturating_add(1);
        match next_query(&outcome, tracker, now, &self.config) {
            Some(at) => tracker.next_at = at,
            None => {
                if let Outcome::Again { .. } = outcome {
                    self.router.metrics().compensation_gave_up.inc();
                    tracing::warn!(order = %id, attempts = tracker.attempts, "compensation: no payment found before the provider's window ended; giving up");
                    if let Err(e) = self.engine.drop_awaiting_confirmation(&id) {
                        tracing::error!(order = %id, error = %e, "compensation: cannot drop the index entry");
                    }
                }
                self.trackers.remove(&id);
            }
        }
    }

    /// Orders tracked (awaiting a query), for tests.
    pub fn tracked(&self) -> usize {
        self.trackers.len()
    }
}

/// When an order is next queried after `outcome` (its tracker already counts this query), or
/// `None` to stop: settled, or its window ended with nothing found.
fn next_query(outcome: &Outcome, tracker: &Tracker, now: u64, config: &CompensationConfig) -> Option<u64> {
    match outcome {
        Outcome::Done => None,
        Outcome::LoadFailed => Some(after_load_failure(now, tracker.attempts, config)),
        Outcome::Again { deadline } => after_query(now, tracker.attempts, tracker.created_at, *deadline, config),
    }
}

/// Runs compensation on the node's clock until `shutdown`.
pub fn spawn(
    engine: Arc<OrderEngine>,
    router: Arc<Router>,
    config: CompensationConfig,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut compensator = Compensator::new(engine, router, config);
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
            compensator.tick(now_millis().0).await;
        }
    })
}

async fn compensate(
    engine: &OrderEngine,
    router: &Router,
    id: OrderId,
    timeout: Duration,
    config: &CompensationConfig,
) -> Outcome {
    let order = match engine.order_for_payment(&id) {
        Ok(order) => order,
        Err(OrderError::NotFound) => {
            let _ = engine.drop_awaiting_confirmation(&id);
            return Outcome::Done;
        }
        Err(e) => {
            // Not a reason to forget the order: it may be paid, and only its record says until when.
            tracing::error!(order = %id, error = %e, "compensation: cannot load the order; will retry");
            return Outcome::LoadFailed;
        }
    };
    if matches!(order.status, OrderStatus::Delivered | OrderStatus::PaidAwaitingStock | OrderStatus::Refunded) {
        let _ = engine.drop_awaiting_confirmation(&id);
        return Outcome::Done;
    }
    let windows: Vec<Option<u64>> = order
        .attempts()
        .into_iter()
        .map(|attempt| router.channel(attempt.channel).and_then(|c| c.pays_until(&order, attempt)).map(|t| t.0))
        .collect();
    let deadline = deadline(order.created_at.0, windows, config);
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
    Outcome::Again { deadline }
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
    let result = match tokio::time::timeout(timeout, channel.query_payment(order, attempt)).await {
        Ok(result) => result,
        Err(_) => Err(super::ChannelError::Timeout { channel: channel.name() }),
    };
    if let (Some(m), Ok(_)) = (metrics, &result) {
        m.queries_answered.inc();
    }
    match result {
        Ok(QueriedStatus::Paid(payment)) if payment.order_id == order.id => {
            match engine.confirm_payment(payment.confirmation(channel.name())).await {
                Ok(PaymentOutcome::Problem(kind)) => {
                    if let Some(m) = metrics {
                        m.query_mismatches.inc();
                    }
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
                m.queries_failed.inc();
            }
            tracing::info!(order = %id, error = %e, "compensation: query failed; will retry");
            AttemptStatus::Open
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_that_cannot_be_loaded_is_kept_and_asked_about_again() {
        let config = CompensationConfig::default();
        // Created long ago: any window would have ended. A failed load is still no reason to forget it.
        let tracker = Tracker { attempts: 40, next_at: 0, created_at: 0 };
        let now = 10 * config.max_window_ms;
        let next = next_query(&Outcome::LoadFailed, &tracker, now, &config);
        assert!(next.is_some_and(|at| at > now), "{next:?}");
        assert_eq!(next_query(&Outcome::Again { deadline: now }, &tracker, now, &config), None, "a window ends");
        assert_eq!(next_query(&Outcome::Done, &tracker, now, &config), None);
    }
}
