//! A bounded fixed-window counter per tag, with the clock passed in.

use std::collections::HashMap;
use std::sync::Mutex;

/// Counts per 32-byte tag (e.g. an HMAC of an email address) in fixed windows, with a bounded
/// map: "find my order" lookups per address, on nodes and on the coordinator.
#[derive(Debug)]
pub struct AddressLimiter {
    per_window: u32,
    window_ms: u64,
    capacity: usize,
    seen: Mutex<HashMap<[u8; 32], (u64, u32)>>,
}

impl AddressLimiter {
    pub fn new(per_window: u32, window_ms: u64, capacity: usize) -> Self {
        AddressLimiter { per_window, window_ms, capacity, seen: Mutex::new(HashMap::new()) }
    }

    /// Counts one lookup of `tag` at `now_ms`; `false` when over the limit (or when the map is
    /// full of live windows).
    pub fn allow(&self, tag: &[u8; 32], now_ms: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains_key(tag) && seen.len() >= self.capacity {
            let window = self.window_ms;
            seen.retain(|_, (start, _)| start.saturating_add(window) > now_ms);
            if seen.len() >= self.capacity {
                return false;
            }
        }
        let entry = seen.entry(*tag).or_insert((now_ms, 0));
        if entry.0.saturating_add(self.window_ms) <= now_ms {
            *entry = (now_ms, 0);
        }
        if entry.1 >= self.per_window {
            return false;
        }
        entry.1 += 1;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_three_lookups_per_window_then_a_fresh_window() {
        let limiter = AddressLimiter::new(3, 1_000, 10);
        let tag = [7u8; 32];
        assert!((0..3).all(|i| limiter.allow(&tag, 100 + i)));
        assert!(!limiter.allow(&tag, 200), "the fourth in the window");
        assert!(limiter.allow(&[8u8; 32], 200), "another address has its own count");
        assert!(limiter.allow(&tag, 1_100), "a new window");
    }

    #[test]
    fn the_address_map_stays_bounded() {
        let limiter = AddressLimiter::new(3, 1_000, 2);
        assert!(limiter.allow(&[1u8; 32], 0));
        assert!(limiter.allow(&[2u8; 32], 0));
        assert!(!limiter.allow(&[3u8; 32], 10), "full of live windows");
        assert!(limiter.allow(&[3u8; 32], 1_000), "stale windows make room");
        assert!(limiter.seen.lock().map(|s| s.len()).unwrap_or(0) <= 2);
    }
}
