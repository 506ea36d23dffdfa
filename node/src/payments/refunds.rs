//! The refund worker: carries out the refunds recorded on this node's orders (`u/`, see
//! `orders::refunds`) at the channel that took each payment, and records each once the provider
//! confirms it. Every call is idempotent per order at the provider, so a refund asked again after
//! a crash or a timeout is the same refund. A provider that is down is asked again with backoff; a
//! refund it refuses stays pending, asked about hourly, with an error in the log.
//!
//! [`RefundWorker::tick`] takes the time, so tests drive it; [`spawn`] runs it on the node's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgecard_protocol::OrderId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::router::Router;
use super::{ChannelError, RefundResult};
use crate::orders::engine::now_millis;
use crate::orders::{OrderEngine, OrderError};

/// First pause after a failed refund; doubles per failure up to [`MAX_RETRY_MS`].
const FIRST_RETRY_MS: u64 = 5_000;
const MAX_RETRY_MS: u64 = 300_000;
/// Pause after the provider refused a refund outright (it will likely refuse again).
const REFUSED_RETRY_MS: u64 = 3_600_000;
/// Bound on one provider call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened to one refund this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done,
    /// Try again after the given pause.
    Retry(u64),
}

/// When the refund of an order is next tried.
#[derive(Debug, Clone, Copy)]
struct Tracker {
    failures: u32,
    next_at: u64,
}

pub struct RefundWorker {
    engine: Arc<OrderEngine>,
    router: Arc<Router>,
    trackers: HashMap<OrderId, Tracker>,
}

impl RefundWorker {
    pub fn new(engine: Arc<OrderEngine>, router: Arc<Router>) -> Self {
        RefundWorker { engine, router, trackers: HashMap::new() }
    }

    /// Tries every pending refund that is due at `now` (unix ms), one after the other.
    pub async fn tick(&mut self, now: u64) {
        let pending = match self.engine.pending_refunds() {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!(error = %e, "refunds: cannot read the pending refunds");
                return;
            }
        };
        self.trackers.retain(|id, _| pending.contains(id));
        for id in pending {
            let tracker = self.trackers.entry(id).or_insert(Tracker { failures: 0, next_at: now });
            if tracker.next_at > now {
                continue;
            }
            match refund_one(&self.engine, &self.router, &id).await {
                Attempt::Done => {
                    self.trackers.remove(&id);
                }
                Attempt::Retry(pause) => {
                    if let Some(tracker) = self.trackers.get_mut(&id) {
                        tracker.failures = tracker.failures.saturating_add(1);
                        let doubling = FIRST_RETRY_MS.saturating_mul(1 << tracker.failures.min(16).saturating_sub(1));
                        tracker.next_at = now.saturating_add(pause.max(doubling.min(MAX_RETRY_MS)));
                    }
                }
            }
        }
    }

    /// Refunds waiting for a retry, for tests.
    pub fn waiting(&self) -> usize {
        self.trackers.len()
    }
}

/// Carries out one pending refund: the provider's call, then the record.
pub async fn refund_one(engine: &OrderEngine, router: &Router, id: &OrderId) -> Attempt {
    let order = match engine.order_for_payment(id) {
        Ok(order) => order,
        Err(e) => {
            tracing::error!(order = %id, error = %e, "refunds: cannot load the order; will retry");
            return Attempt::Retry(0);
        }
    };
    let Some(channel_name) = order.payment.as_ref().map(|p| p.channel.clone()) else {
        tracing::error!(order = %id, "refunds: a pending refund of an order without a payment");
        return Attempt::Retry(REFUSED_RETRY_MS);
    };
    let Some(channel) = router.channel(&channel_name).cloned() else {
        tracing::error!(order = %id, channel = %channel_name, "refunds: the channel that took the payment is not configured here; will retry");
        return Attempt::Retry(REFUSED_RETRY_MS);
    };
    let metrics = router.metrics().channel(channel.name());
    let result = match tokio::time::timeout(CALL_TIMEOUT, channel.refund(&order)).await {
        Ok(result) => result,
        Err(_) => Err(ChannelError::Timeout { channel: channel.name() }),
    };
    let (provider_refund, manual) = match result {
        Ok(RefundResult::Refunded { provider_refund }) => (Some(provider_refund), false),
        Ok(RefundResult::Manual) => (None, true),
        Err(e) => {
            if let Some(m) = metrics {
                m.refund_failed.inc();
            }
            let pause = if e.retryable() { 0 } else { REFUSED_RETRY_MS };
            tracing::error!(order = %id, channel = channel.name(), error = %e, "refunds: the provider did not refund; will retry");
            return Attempt::Retry(pause);
        }
    };
    match engine.complete_refund(id, provider_refund.as_deref(), manual).await {
        Ok(_) => {
            if let Some(m) = metrics {
                m.refunds.inc();
            }
            Attempt::Done
        }
        Err(OrderError::AwaitingCoordinator) => Attempt::Retry(0),
        Err(e) => {
            // The provider refunded; asking again returns the same refund, then this records it.
            tracing::error!(order = %id, error = %e, "refunds: recording the refund failed; will retry");
            Attempt::Retry(0)
        }
    }
}

/// Runs the refund worker every second until `shutdown`.
pub fn spawn(engine: Arc<OrderEngine>, router: Arc<Router>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut worker = RefundWorker::new(engine, router);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
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
            worker.tick(now_millis().0).await;
        }
    })
}
