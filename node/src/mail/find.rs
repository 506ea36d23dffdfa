//! "Find my order": the rate limits in front of a lookup, and the lookups waiting to be passed
//! to the coordinator (which asks the other nodes).
//!
//! Limits (fixed, in memory, per node): a client address (IPv4, or IPv6 /64) gets
//! [`PER_IP_BURST`] lookups at once and one more every [`PER_IP_PERIOD`]; an address gets
//! [`PER_ADDRESS`] lookups per [`ADDRESS_WINDOW_MS`] (keyed by its index tag, never the address),
//! and over that the lookup is dropped silently: the buyer sees the same answer, and the address
//! gets no more mail. Both maps are bounded.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::limiter::{limit_key, LimitKey, RateLimited};

pub const PER_IP_BURST: u32 = 10;
pub const PER_IP_PERIOD: Duration = Duration::from_secs(360);
pub const PER_ADDRESS: u32 = 3;
pub const ADDRESS_WINDOW_MS: u64 = 3_600_000;
/// Most addresses counted at once; past it (after dropping the stale ones) new addresses wait.
pub const MAX_ADDRESSES: usize = 100_000;
/// Most client keys tracked before the limiter drops the replenished ones.
const MAX_IP_KEYS: usize = 100_000;
/// Most orders one lookup mails about, per node.
pub const ORDERS_PER_LOOKUP: usize = 50;
/// Most lookups waiting for the next sync upload; past it new ones are not passed on (the buyer
/// asks again).
pub const MAX_PENDING_LOOKUPS: usize = 256;

pub use edgecard_protocol::tag_limiter::AddressLimiter;

/// A lookup to pass on to the coordinator: the address (normalized) and the mails' language.
pub type PendingLookup = edgecard_protocol::OrderLookup;

pub struct Finder {
    per_ip: DefaultKeyedRateLimiter<LimitKey>,
    pub per_address: AddressLimiter,
    /// Set when the sync link runs: lookups are passed to the coordinator.
    forwarding: AtomicBool,
    pending: Mutex<VecDeque<PendingLookup>>,
}

impl std::fmt::Debug for Finder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finder").finish_non_exhaustive()
    }
}

impl Default for Finder {
    fn default() -> Self {
        Self::new()
    }
}

impl Finder {
    pub fn new() -> Self {
        let burst = NonZeroU32::new(PER_IP_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(PER_IP_PERIOD).unwrap_or(Quota::per_hour(NonZeroU32::MIN)).allow_burst(burst);
        Finder {
            per_ip: RateLimiter::keyed(quota),
            per_address: AddressLimiter::new(PER_ADDRESS, ADDRESS_WINDOW_MS, MAX_ADDRESSES),
            forwarding: AtomicBool::new(false),
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts one lookup from `client`.
    pub fn check_client(&self, client: IpAddr) -> Result<(), RateLimited> {
        if self.per_ip.len() > MAX_IP_KEYS {
            self.per_ip.retain_recent();
        }
        self.per_ip.check_key(&limit_key(client)).map_err(|not_until| RateLimited {
            retry_after: not_until
                .wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default())),
        })
    }
}

impl Finder {
    /// From now on lookups are kept for the coordinator (the sync link calls this at start).
    pub fn forward_lookups(&self) {
        self.forwarding.store(true, Ordering::Relaxed);
    }

    /// Keeps `lookup` for the next sync upload. `false` when it is not kept: no coordinator, or
    /// the queue is full.
    pub fn push_pending(&self, lookup: PendingLookup) -> bool {
        if !self.forwarding.load(Ordering::Relaxed) {
            return false;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING_LOOKUPS {
            return false;
        }
        pending.push_back(lookup);
        true
    }

    /// Takes up to `max` waiting lookups, oldest first (for an upload).
    pub fn take_pending(&self, max: usize) -> Vec<PendingLookup> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = pending.len().min(max);
        pending.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits() {
        let finder = Finder::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..PER_IP_BURST {
            assert!(finder.check_client(ip).is_ok());
        }
        let refused = finder.check_client(ip).err().map(|r| r.retry_after_secs());
        assert!(refused.is_some_and(|secs| secs > 0 && secs <= PER_IP_PERIOD.as_secs()), "{refused:?}");
        assert!(finder.check_client("192.0.2.2".parse().unwrap_or(ip)).is_ok(), "another client");
    }

    #[test]
    fn pending_lookups_wait_only_with_a_coordinator_and_are_bounded() {
        let finder = Finder::new();
        let lookup = |i: usize| PendingLookup { email: format!("b{i}@example.com"), lang: "en".into() };
        assert!(!finder.push_pending(lookup(0)), "a standalone node keeps none");
        finder.forward_lookups();
        for i in 0..MAX_PENDING_LOOKUPS {
            assert!(finder.push_pending(lookup(i)));
        }
        assert!(!finder.push_pending(lookup(999)), "full");
        assert_eq!(finder.take_pending(2), vec![lookup(0), lookup(1)]);
        assert_eq!(finder.take_pending(usize::MAX).len(), MAX_PENDING_LOOKUPS - 2);
        assert!(finder.take_pending(16).is_empty());
    }
}
