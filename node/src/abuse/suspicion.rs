//! How suspicious a client looks: sliding-window counters per address and per IPv6 /64 of order
//! attempts, expired unpaid reservations (churn) and failed payments, in a map of bounded size.
//! Pure: every call takes `now` (unix milliseconds).
//!
//! A counter is the usual two-bucket sliding window: the current window's count plus the previous
//! window's, weighted by how much of it still overlaps the last `window`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use super::config::AbuseConfig;
use crate::limiter::LimitKey;

/// What is counted about a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    OrderAttempt = 0,
    Expired = 1,
    FailedPayment = 2,
}

/// A tracked client: one address, or one IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Addr(IpAddr),
    Net64(Ipv6Addr),
}

impl ClientKey {
    /// The keys a request from `ip` counts under: its address, and for IPv6 its /64.
    fn of(ip: IpAddr) -> (ClientKey, Option<ClientKey>) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => (ClientKey::Addr(IpAddr::V4(v4)), None),
            IpAddr::V6(v6) => (ClientKey::Addr(IpAddr::V6(v6)), Some(ClientKey::Net64(net64(v6)))),
        }
    }

    /// The key of a limiter key (what the engine remembers of an order's client).
    fn of_limit_key(key: LimitKey) -> ClientKey {
        match key {
            LimitKey::V4(v4) => ClientKey::Addr(IpAddr::V4(v4)),
            LimitKey::V6Net(net) => ClientKey::Net64(net),
        }
    }
}

fn net64(v6: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))
}

#[derive(Debug, Clone, Default)]
struct Counters {
    /// Start of the current window (unix ms).
    window_start: u64,
    current: [u32; 3],
    previous: [u32; 3],
    /// When this client's next wait ticket may become usable (unix seconds).
    next_ticket_at: u64,
}

impl Counters {
    fn roll(&mut self, now: u64, window: u64) {
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed >= 2 * window {
            self.previous = [0; 3];
            self.current = [0; 3];
            self.window_start = now;
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = [0; 3];
            self.window_start += window;
        }
    }

    fn estimate(&self, signal: Signal, now: u64, window: u64) -> f64 {
        let into = now.saturating_sub(self.window_start).min(window) as f64;
        let overlap = 1.0 - into / window as f64;
        f64::from(self.current[signal as usize]) + f64::from(self.previous[signal as usize]) * overlap
    }

    fn is_stale(&self, now: u64, window: u64) -> bool {
        now.saturating_sub(self.window_start) >= 2 * window && self.next_ticket_at.saturating_mul(1000) <= now
    }
}

/// The per-client counters, bounded to `tracked_clients` keys.
#[derive(Debug)]
pub struct Suspicion {
    window_ms: u64,
    thresholds_addr: [u32; 3],
    thresholds_net: [u32; 3],
    min_difficulty: u8,
    max_difficulty: u8,
    bits_per_doubling: u8,
    capacity: usize,
    clients: HashMap<ClientKey, Counters>,
}

impl Suspicion {
    pub fn new(config: &AbuseConfig) -> Self {
        Suspicion {
            window_ms: config.window_secs.max(1) * 1000,
            thresholds_addr: [config.orders_per_ip, config.expired_per_ip, config.failed_payments_per_ip],
            thresholds_net: [config.orders_per_64, config.expired_per_ip, config.failed_payments_per_ip],
            min_difficulty: config.min_difficulty,
            max_difficulty: config.max_difficulty,
            bits_per_doubling: config.bits_per_doubling,
            capacity: config.tracked_clients.max(1),
            clients: HashMap::new(),
        }
    }

    /// Counts an order attempt from `ip` at `now` and says whether it must be challenged: the
    /// difficulty, or `None`. The attempt is judged on the counts before it, so exactly
    /// `orders_per_ip` attempts per window pass unchallenged. A flash-sale sku is always
    /// challenged, at least at `min_difficulty`.
    pub fn order_attempt(&mut self, ip: IpAddr, flash_sale: bool, now: u64) -> Option<u8> {
        let (addr, net) = ClientKey::of(ip);
        let mut ratio = self.ratio(addr, &self.thresholds_addr, now);
        if let Some(net) = net {
            ratio = ratio.max(self.ratio(net, &self.thresholds_net, now));
        }
        self.bump(addr, Signal::OrderAttempt, now);
        if let Some(net) = net {
            self.bump(net, Signal::OrderAttempt, now);
        }
        if ratio < 1.0 && !flash_sale {
            return None;
        }
        Some(self.difficulty_for(ratio.max(1.0)))
    }

    /// `min_difficulty` at ratio 1, `bits_per_doubling` more each time it doubles, capped.
    fn difficulty_for(&self, ratio: f64) -> u8 {
        let extra = (ratio.log2() * f64::from(self.bits_per_doubling)).floor().max(0.0);
        let extra = if extra >= 255.0 { 255 } else { extra as u8 };
        self.min_difficulty.saturating_add(extra).min(self.max_difficulty)
    }

    /// An unpaid reservation of the client under `key` expired.
    pub fn expired(&mut self, key: LimitKey, now: u64) {
        self.bump(ClientKey::of_limit_key(key), Signal::Expired, now);
    }

    /// A payment of an order made from `ip` failed.
    pub fn failed_payment(&mut self, ip: IpAddr, now: u64) {
        let (addr, net) = ClientKey::of(ip);
        self.bump(addr, Signal::FailedPayment, now);
        if let Some(net) = net {
            self.bump(net, Signal::FailedPayment, now);
        }
    }

    /// When a wait ticket asked for by `ip` at `now_secs` with `delay_secs` becomes usable: the
    /// delay after now, and after the client's previous ticket, so tickets asked for in parallel
    /// come due one by one.
    pub fn ticket_due(&mut self, ip: IpAddr, delay_secs: u64, now_ms: u64) -> u64 {
        let (addr, net) = ClientKey::of(ip);
        let key = net.unwrap_or(addr);
        let now_secs = now_ms / 1000;
        self.make_room(key, now_ms);
        let counters =
            self.clients.entry(key).or_insert_with(|| Counters { window_start: now_ms, ..Counters::default() });
        let due = now_secs.max(counters.next_ticket_at).saturating_add(delay_secs);
        counters.next_ticket_at = due;
        due
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    fn ratio(&self, key: ClientKey, thresholds: &[u32; 3], now: u64) -> f64 {
        let Some(counters) = self.clients.get(&key) else { return 0.0 };
        let mut counters = counters.clone();
        counters.roll(now, self.window_ms);
        [Signal::OrderAttempt, Signal::Expired, Signal::FailedPayment]
            .into_iter()
            .map(|s| counters.estimate(s, now, self.window_ms) / f64::from(thresholds[s as usize].max(1)))
            .fold(0.0, f64::max)
    }

    fn bump(&mut self, key: ClientKey, signal: Signal, now: u64) {
        self.make_room(key, now);
        let window = self.window_ms;
        let counters = self.clients.entry(key).or_insert_with(|| Counters { window_start: now, ..Counters::default() });
        counters.roll(now, window);
        let slot = &mut counters.current[signal as usize];
        *slot = slot.saturating_add(1);
    }

    /// Keeps the map within its capacity before `key` is added: stale entries go first; if that
    /// is not enough, the least suspicious tenth (a flood of fresh addresses must not push the
    /// worst offenders out).
    fn make_room(&mut self, key: ClientKey, now: u64) {
        if self.clients.len() < self.capacity || self.clients.contains_key(&key) {
            return;
        }
        let window = self.window_ms;
        self.clients.retain(|_, c| !c.is_stale(now, window));
        if self.clients.len() < self.capacity {
            return;
        }
        let mut scored: Vec<(f64, ClientKey)> = self
            .clients
            .iter()
            .map(|(k, c)| {
                let score = (0..3).map(|s| f64::from(c.current[s]) + f64::from(c.previous[s])).sum::<f64>();
                (score, *k)
            })
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        let drop = (self.capacity / 10).max(1).max(self.clients.len() + 1 - self.capacity);
        for (_, k) in scored.into_iter().take(drop) {
            self.clients.remove(&k);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::limiter::limit_key;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config() -> AbuseConfig {
        AbuseConfig {
            window_secs: 60,
            orders_per_ip: 4,
            orders_per_64: 10,
            expired_per_ip: 2,
            failed_payments_per_ip: 3,
            min_difficulty: 10,
            max_difficulty: 16,
            bits_per_doubling: 2,
            tracked_clients: 1000,
            ..AbuseConfig::default()
        }
    }

    #[test]
    fn a_normal_buyer_is_never_challenged_outside_a_flash_sale() {
        let mut s = Suspicion::new(&config());
        let buyer = ip("198.51.100.1");
        // An order every 20 seconds, for an hour: three in any minute, under the threshold of four.
        for k in 0..180u64 {
            assert_eq!(s.order_attempt(buyer, false, k * 20_000), None, "order {k}");
        }
    }

    #[test]
    fn attempts_over_the_threshold_are_challenged_harder_as_they_grow() {
        let mut s = Suspicion::new(&config());
        let bot = ip("198.51.100.2");
        let answers: Vec<Option<u8>> = (0..40).map(|i| s.order_attempt(bot, false, i)).collect();
        assert!(answers[..4].iter().all(Option::is_none), "{answers:?}");
        assert_eq!(answers[4], Some(10));
        assert_eq!(answers[8], Some(12), "twice the threshold: two more bits");
        assert_eq!(answers[16], Some(14));
        assert_eq!(answers[39], Some(16), "capped");
        assert!(answers.windows(2).all(|w| w[0] <= w[1]), "never easier while it floods");
        // Another address is untouched; the bot's window slides away.
        assert_eq!(s.order_attempt(ip("198.51.100.3"), false, 50), None);
        assert_eq!(s.order_attempt(bot, false, 120_000 + 40), None);
    }

    #[test]
    fn a_flash_sale_challenges_everyone() {
        let mut s = Suspicion::new(&config());
        assert_eq!(s.order_attempt(ip("198.51.100.4"), true, 0), Some(10));
    }

    #[test]
    fn many_addresses_of_one_64_are_counted_together() {
        let mut s = Suspicion::new(&config());
        let answers: Vec<Option<u8>> =
            (0..12u16).map(|i| s.order_attempt(ip(&format!("2001:db8:7:7::{:x}", i + 1)), false, 0)).collect();
        assert!(answers[..10].iter().all(Option::is_none));
        assert_eq!(answers[10], Some(10));
        assert_eq!(s.order_attempt(ip("2001:db8:7:8::1"), false, 0), None, "a neighbouring /64");
    }

    #[test]
    fn churn_and_failed_payments_raise_suspicion() {
        let mut s = Suspicion::new(&config());
        let a = ip("198.51.100.5");
        s.expired(limit_key(a), 0);
        assert_eq!(s.order_attempt(a, false, 1), None);
        s.expired(limit_key(a), 2);
        assert_eq!(s.order_attempt(a, false, 3), Some(10));
        let b = ip("2001:db8:9:9::1");
        for t in 0..3 {
            s.failed_payment(b, t);
        }
        assert_eq!(s.order_attempt(ip("2001:db8:9:9::2"), false, 5), Some(10), "failures count per /64");
    }

    #[test]
    fn the_window_slides() {
        let mut s = Suspicion::new(&config());
        let a = ip("198.51.100.6");
        for t in 0..4 {
            assert_eq!(s.order_attempt(a, false, t), None);
        }
        // Half a window into the next one, half of the previous four still count: 2 < 4.
        assert_eq!(s.order_attempt(a, false, 90_000), None);
        assert_eq!(s.order_attempt(a, false, 90_000), None);
        assert_eq!(s.order_attempt(a, false, 90_000), Some(10), "2 + 2 >= 4");
    }

    #[test]
    fn memory_is_bounded_and_the_worst_offender_survives_a_flood_of_fresh_addresses() {
        let mut s = Suspicion::new(&AbuseConfig { tracked_clients: 100, ..config() });
        let bot = ip("198.51.100.7");
        for t in 0..10 {
            s.order_attempt(bot, false, t);
        }
        for i in 0..5_000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            s.order_attempt(addr, false, 10);
            assert!(s.tracked() <= 100);
        }
        assert!(s.order_attempt(bot, false, 11).is_some(), "the flood did not wash the bot out");
    }

    #[test]
    fn parallel_tickets_come_due_one_after_another() {
        let mut s = Suspicion::new(&config());
        let a = ip("198.51.100.8");
        assert_eq!(s.ticket_due(a, 15, 1_000_000), 1_015);
        assert_eq!(s.ticket_due(a, 15, 1_000_000), 1_030);
        assert_eq!(s.ticket_due(ip("198.51.100.9"), 15, 1_000_000), 1_015);
        assert_eq!(s.ticket_due(a, 15, 2_000_000), 2_015, "spaced from now once the queue is past");
    }
}
