//! Routing payments: an ordered list of channels per currency, a circuit breaker per channel, and
//! creation that falls through to the next channel when one times out or errors.
//!
//! The decisions are pure ([`Routes`], [`next_candidate`]); [`Router`] adds the clock, the
//! channels and the calls. Within one channel a retryable failure (timeout, 5xx) is retried up to
//! `attempts_per_channel` times with a short backoff, under the provider's idempotency key, so one
//! transient blip neither loses the buyer nor opens the breaker; the breaker counts a channel's
//! failure once all its attempts failed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::breaker::{Breaker, BreakerConfig, BreakerState};
use super::{ChannelError, CreatedPayment, PaymentChannel};
use crate::metrics::PaymentMetrics;
use crate::orders::OrderRecord;

/// Which channels serve which currency, in order of preference (indices into the channel list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    pub by_currency: BTreeMap<String, Vec<usize>>,
    /// For currencies without an entry.
    pub default: Vec<usize>,
}

impl Routes {
    pub fn route(&self, currency: &str) -> &[usize] {
        self.by_currency.get(currency).map_or(&self.default[..], |r| &r[..])
    }
}

/// The first position at or after `from` in `route` whose breaker lets a call through at `now`
/// (acquiring it), or `None` when every remaining channel is open.
pub fn next_candidate(route: &[usize], from: usize, breakers: &mut [Breaker], now: u64) -> Option<usize> {
    (from..route.len()).find(|&pos| breakers.get_mut(route[pos]).is_some_and(|b| b.try_acquire(now)))
}

#[derive(Debug, Clone, Copy)]
pub struct RouterOptions {
    pub attempts_per_channel: u32,
    pub attempt_timeout: Duration,
    pub retry_backoff: Duration,
    pub breaker: BreakerConfig,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            attempts_per_channel: 3,
            attempt_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_millis(100),
            breaker: BreakerConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("unknown payment channel {0}")]
    UnknownChannel(String),
    #[error("payment channel {channel} does not take orders in {currency}")]
    ChannelNotOffered { channel: String, currency: String },
    #[error("no payment channel takes {0}")]
    NoChannelForCurrency(String),
    #[error("every payment channel for this order is unavailable; retry in {retry_after_secs} s")]
    AllUnavailable { retry_after_secs: u64 },
}

pub struct Router {
    channels: Vec<Arc<dyn PaymentChannel>>,
    routes: Routes,
    breakers: Mutex<Vec<Breaker>>,
    options: RouterOptions,
    metrics: Arc<PaymentMetrics>,
    epoch: Instant,
}

impl Router {
    pub fn new(
        channels: Vec<Arc<dyn PaymentChannel>>,
        routes: Routes,
        options: RouterOptions,
        metrics: Arc<PaymentMetrics>,
    ) -> Self {
        let breakers = channels.iter().map(|_| Breaker::new(options.breaker)).collect();
        Router { channels, routes, breakers: Mutex::new(breakers), options, metrics, epoch: Instant::now() }
    }

    /// A router over `channels`, all of them in the default route in the given order, with default
    /// options: for tests and embedders that need no per-currency routes.
    pub fn with_defaults(channels: Vec<Arc<dyn PaymentChannel>>) -> Self {
        let names: Vec<&'static str> = channels.iter().map(|c| c.name()).collect();
        let routes = Routes { by_currency: BTreeMap::new(), default: (0..channels.len()).collect() };
        Router::new(channels, routes, RouterOptions::default(), Arc::new(PaymentMetrics::new(&names)))
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn metrics(&self) -> &Arc<PaymentMetrics> {
        &self.metrics
    }

    pub fn channel(&self, name: &str) -> Option<&Arc<dyn PaymentChannel>> {
        self.channels.iter().find(|c| c.name() == name)
    }

    pub fn channels(&self) -> &[Arc<dyn PaymentChannel>] {
        &self.channels
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The channels to try for an order in `currency`, in order: the currency's route, or only
    /// `requested` when the buyer named one, which must be in that route (a buyer picks among the
    /// routes of the order's currency, never around them).
    pub fn plan(&self, currency: &str, requested: Option<&str>) -> Result<Vec<usize>, RouteError> {
        let route = self.routes.route(currency);
        match requested {
            Some(name) => {
                let index = self
                    .channels
                    .iter()
                    .position(|c| c.name() == name)
                    .ok_or_else(|| RouteError::UnknownChannel(name.to_string()))?;
                if route.contains(&index) {
                    Ok(vec![index])
                } else {
                    Err(RouteError::ChannelNotOffered { channel: name.to_string(), currency: currency.to_string() })
                }
            }
            None if route.is_empty() => Err(RouteError::NoChannelForCurrency(currency.to_string())),
            None => Ok(route.to_vec()),
        }
    }

    /// The channels a buyer may pick for `currency`: its route, without channels that cannot take
    /// the currency. Empty when nothing serves it.
    pub fn offered(&self, currency: &str) -> Vec<&'static str> {
        self.routes
            .route(currency)
            .iter()
            .filter_map(|&i| self.channels.get(i))
            .filter(|c| c.takes_currency(currency))
            .map(|c| c.name())
            .collect()
    }

    /// The channel an order will most likely be paid through: the first of `plan` whose breaker
    /// is not open (without taking a probe slot), else the first.
    pub fn preferred(&self, plan: &[usize]) -> &'static str {
        let now = self.now();
        let breakers = self.breakers.lock();
        let pick = plan
            .iter()
            .find(|&&i| breakers.get(i).is_some_and(|b| b.state(now) != BreakerState::Open))
            .or(plan.first());
        pick.and_then(|&i| self.channels.get(i)).map_or("none", |c| c.name())
    }

    /// Creates the payment for `order`, falling through `plan`. Returns the channel that took it.
    pub async fn create(
        &self,
        order: &OrderRecord,
        public_url: &str,
        plan: &[usize],
    ) -> Result<(Arc<dyn PaymentChannel>, CreatedPayment), RouteError> {
        let mut from = 0;
        loop {
            let picked = {
                let mut breakers = self.breakers.lock();
                let picked = next_candidate(plan, from, &mut breakers, self.now());
                self.publish_states(&breakers);
                picked
            };
            let Some(pos) = picked else {
                self.metrics.no_channel_available.inc();
                let retry_ms = {
                    let breakers = self.breakers.lock();
                    let now = self.now();
                    plan.iter().filter_map(|&i| breakers.get(i)).map(|b| b.retry_in(now)).min().unwrap_or(0)
                };
                return Err(RouteError::AllUnavailable { retry_after_secs: retry_ms.div_ceil(1000).max(1) });
            };
            let index = plan[pos];
            let Some(channel) = self.channels.get(index).cloned() else {
                from = pos + 1;
                continue;
            };
            let result = self.create_on(&channel, order, public_url).await;
            {
                let mut breakers = self.breakers.lock();
                if let Some(breaker) = breakers.get_mut(index) {
                    match &result {
                        // An order this channel cannot take says nothing about the channel's health.
                        Ok(_) | Err(ChannelError::Unsupported { .. }) => breaker.on_success(self.now()),
                        Err(_) => breaker.on_failure(self.now()),
                    }
                }
                self.publish_states(&breakers);
            }
            match result {
                Ok(created) => return Ok((channel, created)),
                Err(e) => {
                    tracing::warn!(order = %order.id, channel = channel.name(), error = %e, "payment creation failed; trying the next channel");
                    from = pos + 1;
                }
            }
        }
    }

    async fn create_on(
        &self,
        channel: &Arc<dyn PaymentChannel>,
        order: &OrderRecord,
        public_url: &str,
    ) -> Result<CreatedPayment, ChannelError> {
        let metrics = self.metrics.channel(channel.name());
        let attempts = self.options.attempts_per_channel.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let call = channel.create_payment(order, public_url);
            let result = match tokio::time::timeout(self.options.attempt_timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(ChannelError::Timeout { channel: channel.name() }),
            };
            if let Some(m) = metrics {
                let histogram = if result.is_ok() { &m.create_ok } else { &m.create_failed };
                histogram.observe(started.elapsed().as_secs_f64());
            }
            match result {
                Err(e) if e.retryable() && attempt < attempts => {
                    tracing::info!(order = %order.id, channel = channel.name(), attempt, error = %e, "payment creation failed; retrying");
                    tokio::time::sleep(self.options.retry_backoff * attempt).await;
                }
                other => return other,
            }
        }
    }

    fn publish_states(&self, breakers: &[Breaker]) {
        let now = self.now();
        for (channel, breaker) in self.channels.iter().zip(breakers) {
            if let Some(m) = self.metrics.channel(channel.name()) {
                m.breaker_state.set(breaker.state(now).as_gauge());
            }
        }
    }

    /// (channel, breaker state) for status pages.
    pub fn breaker_states(&self) -> Vec<(&'static str, BreakerState)> {
        let now = self.now();
        let breakers = self.breakers.lock();
        self.channels.iter().zip(breakers.iter()).map(|(c, b)| (c.name(), b.state(now))).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::super::{BoxFuture, CallbackError, CallbackRequest, CallbackVerdict, QueriedStatus};
    use super::*;

    fn breakers(n: usize) -> Vec<Breaker> {
        (0..n)
            .map(|_| Breaker::new(BreakerConfig { failure_threshold: 2, open_ms: 100, half_open_probes: 1 }))
            .collect()
    }

    #[test]
    fn candidates_follow_route_order_and_skip_open_breakers() {
        let mut b = breakers(3);
        let route = [2, 0, 1];
        assert_eq!(next_candidate(&route, 0, &mut b, 0), Some(0));
        assert_eq!(next_candidate(&route, 1, &mut b, 0), Some(1));
        b[2].on_failure(0);
        b[2].on_failure(0);
        assert_eq!(next_candidate(&route, 0, &mut b, 10), Some(1), "channel 2 is open: fall through to 0");
        b[0].on_failure(10);
        b[0].on_failure(10);
        assert_eq!(next_candidate(&route, 0, &mut b, 20), Some(2));
        b[1].on_failure(20);
        b[1].on_failure(20);
        assert_eq!(next_candidate(&route, 0, &mut b, 30), None, "all open");
        assert_eq!(next_candidate(&route, 0, &mut b, 100), Some(0), "channel 2 half-open: one probe");
        assert_eq!(next_candidate(&route, 0, &mut b, 110), Some(1), "its probe slot is taken; channel 0 probes");
        assert_eq!(next_candidate(&[], 0, &mut b, 100), None);
        assert_eq!(next_candidate(&[7], 0, &mut b, 100), None, "an index without a breaker is skipped");
    }

    #[test]
    fn routes_fall_back_to_the_default() {
        let routes = Routes { by_currency: BTreeMap::from([("CNY".into(), vec![1])]), default: vec![0, 1] };
        assert_eq!(routes.route("CNY"), &[1]);
        assert_eq!(routes.route("USD"), &[0, 1]);
    }

    /// A channel that fails its first `failures` creations.
    struct Flaky {
        name: &'static str,
        failures: u32,
        calls: AtomicU32,
        error: ChannelError,
    }

    impl PaymentChannel for Flaky {
        fn name(&self) -> &'static str {
            self.name
        }
        fn create_payment<'a>(
            &'a self,
            _order: &'a OrderRecord,
            _public_url: &'a str,
        ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if n < self.failures {
                Err(self.error.clone())
            } else {
                Ok(CreatedPayment {
                    pay_url: format!("https://{}/pay", self.name),
                    provider_ref: None,
                    pays_until: None,
                })
            };
            Box::pin(async move { result })
        }
        fn local_pay_url(&self, _order: &OrderRecord, _public_url: &str) -> Option<String> {
            None
        }
        fn verify_callback(&self, _: &CallbackRequest<'_>, _: u64) -> Result<CallbackVerdict, CallbackError> {
            Err(CallbackError::MissingSignature)
        }
        fn query_payment<'a>(
            &'a self,
            _: &'a OrderRecord,
            _: crate::orders::AttemptRef<'a>,
        ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>> {
            Box::pin(async { Ok(QueriedStatus::Pending) })
        }
    }

    fn flaky(name: &'static str, failures: u32, error: ChannelError) -> Arc<Flaky> {
        Arc::new(Flaky { name, failures, calls: AtomicU32::new(0), error })
    }

    fn order() -> OrderRecord {
        OrderRecord::for_tests("", 1, 1, "USD")
    }

    fn router(channels: Vec<Arc<dyn PaymentChannel>>, attempts: u32) -> Router {
        let names: Vec<&'static str> = channels.iter().map(|c| c.name()).collect();
        let n = channels.len();
        Router::new(
            channels,
            Routes { by_currency: BTreeMap::new(), default: (0..n).collect() },
            RouterOptions {
                attempts_per_channel: attempts,
                attempt_timeout: Duration::from_secs(1),
                retry_backoff: Duration::from_millis(1),
                breaker: BreakerConfig { failure_threshold: 2, open_ms: 60_000, half_open_probes: 1 },
            },
            Arc::new(PaymentMetrics::new(&names)),
        )
    }

    #[tokio::test]
    async fn a_down_primary_falls_through_then_is_skipped_once_open() {
        let down = ChannelError::Unavailable { channel: "a", reason: "503".into() };
        let primary = flaky("a", u32::MAX, down);
        let secondary = flaky("b", 0, ChannelError::Timeout { channel: "b" });
        let router = router(vec![primary.clone(), secondary.clone()], 2);
        let plan = router.plan("USD", None).unwrap();
        for _ in 0..2 {
            let (channel, created) = router.create(&order(), "https://n", &plan).await.unwrap();
            assert_eq!((channel.name(), created.pay_url.as_str()), ("b", "https://b/pay"));
        }
        assert_eq!(primary.calls.load(Ordering::SeqCst), 4, "two attempts per order until the breaker opened");
        assert_eq!(router.preferred(&plan), "b");
        router.create(&order(), "https://n", &plan).await.unwrap();
        assert_eq!(primary.calls.load(Ordering::SeqCst), 4, "open breaker: not called");
        let metrics = router.metrics().channel("a").unwrap();
        assert_eq!((metrics.create_ok.count(), metrics.create_failed.count()), (0, 4));
        assert_eq!(metrics.breaker_state.get(), BreakerState::Open.as_gauge());
    }

    #[tokio::test]
    async fn transient_failures_are_retried_on_the_same_channel() {
        let blip = flaky("a", 2, ChannelError::Timeout { channel: "a" });
        let router = router(vec![blip.clone()], 3);
        let (channel, _) = router.create(&order(), "https://n", &[0]).await.unwrap();
        assert_eq!((channel.name(), blip.calls.load(Ordering::SeqCst)), ("a", 3));
    }

    #[tokio::test]
    async fn refusals_are_not_retried_and_all_down_is_an_error() {
        let refusing = flaky("a", u32::MAX, ChannelError::Rejected { channel: "a", reason: "400".into() });
        let router = router(vec![refusing.clone()], 3);
        for _ in 0..2 {
            let result = router.create(&order(), "https://n", &[0]).await;
            assert!(matches!(result, Err(RouteError::AllUnavailable { .. })));
        }
        assert_eq!(refusing.calls.load(Ordering::SeqCst), 2, "one call per order: a refusal is final");
        assert_eq!(
            router.create(&order(), "https://n", &[0]).await.err(),
            Some(RouteError::AllUnavailable { retry_after_secs: 60 })
        );
        assert_eq!(router.plan("USD", Some("nope")), Err(RouteError::UnknownChannel("nope".into())));
    }

    #[test]
    fn a_picked_channel_must_be_in_the_currency_route() {
        let names = ["stripe", "sandbox"];
        let routes = Routes { by_currency: BTreeMap::from([("EUR".into(), vec![0, 1])]), default: vec![0] };
        let router = Router::new(
            vec![
                flaky("stripe", 0, ChannelError::Timeout { channel: "stripe" }),
                flaky("sandbox", 0, ChannelError::Timeout { channel: "sandbox" }),
            ],
            routes,
            RouterOptions::default(),
            Arc::new(PaymentMetrics::new(&names)),
        );
        assert_eq!(
            router.plan("USD", Some("sandbox")),
            Err(RouteError::ChannelNotOffered { channel: "sandbox".into(), currency: "USD".into() })
        );
        assert_eq!(router.plan("USD", None), Ok(vec![0]));
        assert_eq!(router.plan("USD", Some("stripe")), Ok(vec![0]));
        assert_eq!(router.plan("EUR", Some("sandbox")), Ok(vec![1]));
        assert_eq!(router.offered("USD"), vec!["stripe"]);
        assert_eq!(router.offered("EUR"), vec!["stripe", "sandbox"]);
    }
}
