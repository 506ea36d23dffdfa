//! Per-client rate limits, one keyed GCRA limiter per endpoint class.
//!
//! Requests are keyed by the resolved client address (see [`crate::client_ip`]): an IPv4
//! address is its own key, an IPv6 address is keyed by its /64 prefix so that one host cannot
//! rotate through its subnet to escape the limit, and an IPv4-mapped IPv6 address keys as the
//! IPv4 address. Keys whose budget has fully replenished are dropped by
//! [`Limiters::evict_stale`], which [`spawn_eviction`] runs on a timer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::RateLimiter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The name of the configuration section, used in validation messages.
const SECTION: &str = "limits";

/// A sustained rate and a burst allowance for one endpoint class.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Sustained requests per second allowed from one client key; must be >= 1.
    pub per_second: u32,
    /// Requests one client key may make at once before the sustained rate applies; must be >= 1.
    pub burst: u32,
}

impl Quota {
    /// Checks both numbers are at least 1; the message names `field` (e.g. `limits.catalog`).
    pub fn validate(&self, field: &str) -> Result<(), String> {
        if self.per_second < 1 {
            return Err(format!("{field}.per_second must be >= 1"));
        }
        if self.burst < 1 {
            return Err(format!("{field}.burst must be >= 1"));
        }
        Ok(())
    }

    fn to_governor(self, field: &str) -> Result<governor::Quota, String> {
        let per_second = NonZeroU32::new(self.per_second).ok_or_else(|| format!("{field}.per_second must be >= 1"))?;
        let burst = NonZeroU32::new(self.burst).ok_or_else(|| format!("{field}.burst must be >= 1"))?;
        Ok(governor::Quota::per_second(per_second).allow_burst(burst))
    }
}

/// Per-client rate limits (the `[limits]` section). Every request class has its own budget;
/// a client that exhausts one class can still use the others. Over-limit requests get
/// `429 Too Many Requests` with a `Retry-After` header in whole seconds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimiterConfig {
    /// Catalog reads: `GET /api/v1/products` and the storefront pages.
    /// Default: 50 per second, burst 100.
    pub catalog: Quota,
    /// Order creation: `POST /api/v1/orders` and the storefront's buy form.
    /// Default: 5 per second, burst 20.
    pub create_order: Quota,
    /// Order status reads: `GET /api/v1/orders/{order_id}` and the order page.
    /// Default: 20 per second, burst 60.
    pub order_lookup: Quota,
    /// Payment requests: `POST {pay_url}` and `POST /api/v1/payments/{channel}/callback`.
    /// Default: 10 per second, burst 30.
    pub payment: Quota,
    /// Seconds between sweeps that forget clients whose budget has fully replenished;
    /// must be >= 1. Default: 60.
    pub evict_every_secs: u64,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            catalog: Quota { per_second: 50, burst: 100 },
            create_order: Quota { per_second: 5, burst: 20 },
            order_lookup: Quota { per_second: 20, burst: 60 },
            payment: Quota { per_second: 10, burst: 30 },
            evict_every_secs: 60,
        }
    }
}

impl LimiterConfig {
    /// Checks every quota and the eviction interval; the message names the bad field, e.g.
    /// `limits.create_order.burst must be >= 1`.
    pub fn validate(&self) -> Result<(), String> {
        for class in LimitClass::ALL {
            self.quota(class).validate(&format!("{SECTION}.{}", class.as_str()))?;
        }
        if self.evict_every_secs < 1 {
            return Err(format!("{SECTION}.evict_every_secs must be >= 1"));
        }
        Ok(())
    }

    /// The quota configured for `class`.
    pub fn quota(&self, class: LimitClass) -> Quota {
        match class {
            LimitClass::Catalog => self.catalog,
            LimitClass::CreateOrder => self.create_order,
            LimitClass::OrderLookup => self.order_lookup,
            LimitClass::Payment => self.payment,
        }
    }

    /// The eviction interval as a [`Duration`].
    pub fn evict_every(&self) -> Duration {
        Duration::from_secs(self.evict_every_secs)
    }
}

/// The endpoint class a request is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitClass {
    /// Catalog reads.
    Catalog,
    /// Order creation.
    CreateOrder,
    /// Order status reads.
    OrderLookup,
    /// Payment requests and callbacks.
    Payment,
}

impl LimitClass {
    /// Every class, in a fixed order.
    pub const ALL: [LimitClass; 4] =
        [LimitClass::Catalog, LimitClass::CreateOrder, LimitClass::OrderLookup, LimitClass::Payment];

    /// The snake_case name used in configuration and as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitClass::Catalog => "catalog",
            LimitClass::CreateOrder => "create_order",
            LimitClass::OrderLookup => "order_lookup",
            LimitClass::Payment => "payment",
        }
    }
}

impl fmt::Display for LimitClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key a client address is limited under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitKey {
    /// An IPv4 address (including one written as IPv4-mapped IPv6).
    V4(Ipv4Addr),
    /// The /64 network of an IPv6 address; the low 64 bits are zero.
    V6Net(Ipv6Addr),
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::V4(ip) => write!(f, "{ip}"),
            LimitKey::V6Net(net) => write!(f, "{net}/64"),
        }
    }
}

/// The limit key for a client address: IPv4 as itself, IPv6 by its /64 prefix.
pub fn limit_key(ip: IpAddr) -> LimitKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => LimitKey::V4(v4),
        IpAddr::V6(v6) => LimitKey::V6Net(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
    }
}

/// A request was over its class's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the client's next request in this class would be allowed.
    pub retry_after: Duration,
}

impl RateLimited {
    /// The `Retry-After` value: [`Self::retry_after`] rounded up to whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited; retry after {} s", self.retry_after_secs())
    }
}

impl std::error::Error for RateLimited {}

type KeyedLimiter<C> =
    RateLimiter<LimitKey, DefaultKeyedStateStore<LimitKey>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One keyed limiter per [`LimitClass`]. With the default clock each one is a
/// `governor::DefaultKeyedRateLimiter<LimitKey>`; share it behind an [`Arc`].
pub struct Limiters<C: Clock = DefaultClock> {
    catalog: KeyedLimiter<C>,
    create_order: KeyedLimiter<C>,
    order_lookup: KeyedLimiter<C>,
    payment: KeyedLimiter<C>,
}

impl Limiters {
    /// Validates `config` and builds the limiters on the monotonic default clock.
    pub fn new(config: &LimiterConfig) -> Result<Self, String> {
        Self::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiters<C> {
    /// Validates `config` and builds the limiters on `clock` (all four share it).
    pub fn with_clock(config: &LimiterConfig, clock: C) -> Result<Self, String> {
        config.validate()?;
        let build = |class: LimitClass| -> Result<KeyedLimiter<C>, String> {
            let quota = config.quota(class).to_governor(&format!("{SECTION}.{}", class.as_str()))?;
            Ok(RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()))
        };
        Ok(Self {
            catalog: build(LimitClass::Catalog)?,
            create_order: build(LimitClass::CreateOrder)?,
            order_lookup: build(LimitClass::OrderLookup)?,
            payment: build(LimitClass::Payment)?,
        })
    }

    fn limiter(&self, class: LimitClass) -> &KeyedLimiter<C> {
        match class {
            LimitClass::Catalog => &self.catalog,
            LimitClass::CreateOrder => &self.create_order,
            LimitClass::OrderLookup => &self.order_lookup,
            LimitClass::Payment => &self.payment,
        }
    }

    /// Counts one request from `ip` against `class`.
    pub fn check(&self, class: LimitClass, ip: IpAddr) -> Result<(), RateLimited> {
        let limiter = self.limiter(class);
        limiter
            .check_key(&limit_key(ip))
            .map_err(|not_until| RateLimited { retry_after: not_until.wait_time_from(limiter.clock().now()) })
    }

    /// Forgets every key whose budget has fully replenished and releases spare capacity.
    pub fn evict_stale(&self) {
        for class in LimitClass::ALL {
            let limiter = self.limiter(class);
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys currently tracked across all classes (a key active in two classes counts twice).
    pub fn tracked_keys(&self) -> usize {
        LimitClass::ALL.into_iter().map(|class| self.tracked_keys_in(class)).sum()
    }

    /// Keys currently tracked for one class.
    pub fn tracked_keys_in(&self, class: LimitClass) -> usize {
        self.limiter(class).len()
    }
}

impl<C: Clock + Clone> fmt::Debug for Limiters<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiters").field("tracked_keys", &self.tracked_keys()).finish_non_exhaustive()
    }
}

/// Runs [`Limiters::evict_stale`] every `every` (at least 1 ms; the first sweep comes after one
/// interval) until `shutdown` holds `true` or its sender is dropped.
pub fn spawn_eviction<C>(
    limiters: Arc<Limiters<C>>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    C: Clock + Clone + 'static,
    Limiters<C>: Send + Sync,
{
    tokio::spawn(async move {
        let period = every.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = ticker.tick() => {
                    limiters.evict_stale();
                    tracing::debug!(tracked_keys = limiters.tracked_keys(), "rate limiter sweep");
                }
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fake(config: &LimiterConfig) -> (Limiters<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limiters = Limiters::with_clock(config, clock.clone()).unwrap();
        (limiters, clock)
    }

    fn uniform(per_second: u32, burst: u32) -> LimiterConfig {
        let q = Quota { per_second, burst };
        LimiterConfig { catalog: q, create_order: q, order_lookup: q, payment: q, evict_every_secs: 1 }
    }

    #[test]
    fn default_config_is_valid_and_documented_values() {
        let c = LimiterConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.catalog, Quota { per_second: 50, burst: 100 });
        assert_eq!(c.create_order, Quota { per_second: 5, burst: 20 });
        assert_eq!(c.order_lookup, Quota { per_second: 20, burst: 60 });
        assert_eq!(c.payment, Quota { per_second: 10, burst: 30 });
        assert_eq!(c.evict_every(), Duration::from_secs(60));
        assert!(Limiters::new(&c).is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = LimiterConfig::default();
        c.create_order.burst = 0;
        assert_eq!(c.validate(), Err("limits.create_order.burst must be >= 1".to_string()));
        assert_eq!(Limiters::new(&c).err(), Some("limits.create_order.burst must be >= 1".to_string()));
        let mut c = LimiterConfig::default();
        c.payment.per_second = 0;
        assert_eq!(c.validate(), Err("limits.payment.per_second must be >= 1".to_string()));
        let c = LimiterConfig { evict_every_secs: 0, ..LimiterConfig::default() };
        assert_eq!(c.validate(), Err("limits.evict_every_secs must be >= 1".to_string()));
        assert_eq!(Quota { per_second: 1, burst: 0 }.validate("x"), Err("x.burst must be >= 1".to_string()));
    }

    #[test]
    fn config_deserialises_with_defaults_and_rejects_unknown_fields() {
        let c: LimiterConfig = serde_json::from_str(r#"{"create_order": {"per_second": 2, "burst": 4}}"#).unwrap();
        assert_eq!(c.create_order, Quota { per_second: 2, burst: 4 });
        assert_eq!(c.catalog, LimiterConfig::default().catalog);
        assert_eq!(c.evict_every_secs, 60);
        assert!(serde_json::from_str::<LimiterConfig>(r#"{"catalgo": {}}"#).is_err());
        assert!(serde_json::from_str::<LimiterConfig>(r#"{"catalog": {"per_second": 1, "burst": 1, "x": 1}}"#).is_err());
        assert!(serde_json::from_str::<LimiterConfig>(r#"{"catalog": {"per_second": 1}}"#).is_err());
        let round = serde_json::to_string(&LimiterConfig::default()).unwrap();
        assert_eq!(serde_json::from_str::<LimiterConfig>(&round).unwrap(), LimiterConfig::default());
    }

    #[test]
    fn limit_keys() {
        assert_eq!(limit_key(ip("203.0.113.5")), LimitKey::V4("203.0.113.5".parse().unwrap()));
        assert_eq!(limit_key(ip("::ffff:203.0.113.5")), limit_key(ip("203.0.113.5")));
        assert_ne!(limit_key(ip("203.0.113.5")), limit_key(ip("203.0.113.6")));
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            LimitKey::V6Net("2001:db8:1:2::".parse().unwrap())
        );
        assert_eq!(limit_key(ip("2001:db8:1:2::1")), limit_key(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(limit_key(ip("2001:db8:1:2::1")), limit_key(ip("2001:db8:1:3::1")));
        assert_eq!(limit_key(ip("2001:db8:1:2::1")).to_string(), "2001:db8:1:2::/64");
        assert_eq!(limit_key(ip("198.51.100.1")).to_string(), "198.51.100.1");
    }

    #[test]
    fn burst_plus_one_is_limited_with_retry_after() {
        let (l, clock) = fake(&LimiterConfig::default());
        let client = ip("198.51.100.10");
        for i in 0..20 {
            assert_eq!(l.check(LimitClass::CreateOrder, client), Ok(()), "request {i}");
        }
        let err = l.check(LimitClass::CreateOrder, client).unwrap_err();
        // 5 per second: the next cell is 200 ms away, advertised as 1 s.
        assert_eq!(err.retry_after, Duration::from_millis(200));
        assert!(err.retry_after_secs() >= 1);
        assert_eq!(err.retry_after_secs(), 1);
        assert_eq!(err.to_string(), "rate limited; retry after 1 s");
        // Another client is unaffected.
        assert_eq!(l.check(LimitClass::CreateOrder, ip("198.51.100.11")), Ok(()));
        clock.advance(Duration::from_millis(200));
        assert_eq!(l.check(LimitClass::CreateOrder, client), Ok(()));
        assert!(l.check(LimitClass::CreateOrder, client).is_err());
    }

    #[test]
    fn burst_on_the_real_clock() {
        let l = Limiters::new(&uniform(1, 3)).unwrap();
        let client = ip("198.51.100.12");
        for _ in 0..3 {
            assert_eq!(l.check(LimitClass::Payment, client), Ok(()));
        }
        let err = l.check(LimitClass::Payment, client).unwrap_err();
        assert!(err.retry_after > Duration::from_millis(900));
        assert!(err.retry_after <= Duration::from_secs(1));
        assert_eq!(err.retry_after_secs(), 1);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let secs = |d| RateLimited { retry_after: d }.retry_after_secs();
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_nanos(1)), 1);
        assert_eq!(secs(Duration::from_secs(1)), 1);
        assert_eq!(secs(Duration::from_millis(1001)), 2);
        assert_eq!(secs(Duration::from_secs(2)), 2);
        assert_eq!(secs(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn ipv6_same_64_shares_a_budget() {
        let (l, _clock) = fake(&uniform(1, 2));
        assert_eq!(l.check(LimitClass::Catalog, ip("2001:db8:a:b::1")), Ok(()));
        assert_eq!(l.check(LimitClass::Catalog, ip("2001:db8:a:b:1:2:3:4")), Ok(()));
        assert!(l.check(LimitClass::Catalog, ip("2001:db8:a:b:ffff::")).is_err());
        // A different /64 (even a neighbouring one) has its own budget.
        assert_eq!(l.check(LimitClass::Catalog, ip("2001:db8:a:c::1")), Ok(()));
        assert_eq!(l.check(LimitClass::Catalog, ip("2001:db8:a:c::2")), Ok(()));
        assert!(l.check(LimitClass::Catalog, ip("2001:db8:a:c::3")).is_err());
        assert_eq!(l.tracked_keys_in(LimitClass::Catalog), 2);
    }

    #[test]
    fn mapped_ipv4_shares_budget_with_ipv4() {
        let (l, _clock) = fake(&uniform(1, 1));
        assert_eq!(l.check(LimitClass::Catalog, ip("192.0.2.1")), Ok(()));
        assert!(l.check(LimitClass::Catalog, ip("::ffff:192.0.2.1")).is_err());
        // Neighbouring IPv4 addresses are separate keys.
        assert_eq!(l.check(LimitClass::Catalog, ip("192.0.2.2")), Ok(()));
    }

    #[test]
    fn classes_are_independent() {
        let (l, _clock) = fake(&uniform(1, 1));
        let client = ip("198.51.100.20");
        assert_eq!(l.check(LimitClass::CreateOrder, client), Ok(()));
        assert!(l.check(LimitClass::CreateOrder, client).is_err());
        for class in [LimitClass::Catalog, LimitClass::OrderLookup, LimitClass::Payment] {
            assert_eq!(l.check(class, client), Ok(()), "{class}");
            assert!(l.check(class, client).is_err(), "{class}");
        }
        assert_eq!(l.tracked_keys(), 4);
        for class in LimitClass::ALL {
            assert_eq!(l.tracked_keys_in(class), 1);
        }
    }

    #[test]
    fn evict_stale_drops_replenished_keys_only() {
        let (l, clock) = fake(&uniform(10, 5));
        // Client a uses its full burst, client b a single request.
        for _ in 0..5 {
            assert_eq!(l.check(LimitClass::Catalog, ip("198.51.100.1")), Ok(()));
        }
        assert_eq!(l.check(LimitClass::Catalog, ip("198.51.100.2")), Ok(()));
        assert_eq!(l.check(LimitClass::Payment, ip("2001:db8::1")), Ok(()));
        assert_eq!(l.tracked_keys(), 3);

        l.evict_stale();
        assert_eq!(l.tracked_keys(), 3);

        // After 300 ms the single-request keys have replenished; a has not.
        clock.advance(Duration::from_millis(300));
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 1);
        assert_eq!(l.tracked_keys_in(LimitClass::Catalog), 1);

        clock.advance(Duration::from_millis(500));
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 0);

        // An evicted client starts again with a full burst.
        for _ in 0..5 {
            assert_eq!(l.check(LimitClass::Catalog, ip("198.51.100.1")), Ok(()));
        }
        assert!(l.check(LimitClass::Catalog, ip("198.51.100.1")).is_err());
    }

    #[tokio::test]
    async fn eviction_task_sweeps_and_stops_on_shutdown() {
        let (l, clock) = fake(&uniform(10, 1));
        assert_eq!(l.check(LimitClass::Catalog, ip("198.51.100.1")), Ok(()));
        let l = Arc::new(l);
        let (tx, rx) = watch::channel(false);
        let task = spawn_eviction(l.clone(), Duration::from_millis(5), rx);
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_millis(500), async {
            while l.tracked_keys() != 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap();
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_millis(500), task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn eviction_task_ends_when_sender_dropped_or_already_shut_down() {
        let l = Arc::new(Limiters::new(&LimiterConfig::default()).unwrap());
        let (tx, rx) = watch::channel(true);
        let task = spawn_eviction(l.clone(), Duration::from_secs(60), rx);
        tokio::time::timeout(Duration::from_millis(500), task).await.unwrap().unwrap();
        drop(tx);

        let (tx, rx) = watch::channel(false);
        let task = spawn_eviction(l, Duration::from_secs(60), rx);
        drop(tx);
        tokio::time::timeout(Duration::from_millis(500), task).await.unwrap().unwrap();
    }
}
