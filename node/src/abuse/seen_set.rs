//! The nonces of challenges and tickets already used, each kept until its token expires (after
//! which the token is refused anyway), in a set of bounded size.
//!
//! When the set is full of live entries, the entry that expires first is dropped and the set's
//! *floor* rises to its expiry: from then on every token expiring at or before the floor is
//! refused as used. So a full set never lets a replay through; it only cuts the oldest tokens'
//! lives short, and those cost their holders a fresh challenge.

use std::collections::{BTreeSet, HashSet};

/// A bounded, short-lived single-use set.
#[derive(Debug)]
pub struct SeenSet {
    capacity: usize,
    by_expiry: BTreeSet<(u64, [u8; 16])>,
    members: HashSet<[u8; 16]>,
    floor: u64,
}

impl SeenSet {
    pub fn new(capacity: usize) -> Self {
        SeenSet { capacity: capacity.max(1), by_expiry: BTreeSet::new(), members: HashSet::new(), floor: 0 }
    }

    /// Records `nonce` (whose token expires at `expires_at`) as used at `now`. `false` if it was
    /// used before (or may have been: at or below the floor).
    pub fn first_use(&mut self, nonce: [u8; 16], expires_at: u64, now: u64) -> bool {
        self.prune(now);
        if expires_at <= self.floor || self.members.contains(&nonce) {
            return false;
        }
        while self.members.len() >= self.capacity {
            let Some(oldest) = self.by_expiry.pop_first() else { break };
            self.members.remove(&oldest.1);
            self.floor = self.floor.max(oldest.0);
        }
        if expires_at <= self.floor {
            return false;
        }
        self.by_expiry.insert((expires_at, nonce));
        self.members.insert(nonce);
        true
    }

    /// Drops entries whose tokens have expired by `now`.
    fn prune(&mut self, now: u64) {
        while let Some(first) = self.by_expiry.first().copied() {
            if first.0 >= now {
                break;
            }
            self.by_expiry.pop_first();
            self.members.remove(&first.1);
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> [u8; 16] {
        [i; 16]
    }

    #[test]
    fn second_use_is_refused_until_expiry_then_forgotten() {
        let mut s = SeenSet::new(10);
        assert!(s.first_use(n(1), 100, 0));
        assert!(!s.first_use(n(1), 100, 50));
        assert!(!s.first_use(n(1), 100, 100), "still live at its expiry second");
        // Past expiry the entry goes (the token itself is refused as expired by then).
        assert!(s.first_use(n(2), 300, 101));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_full_set_raises_its_floor_instead_of_forgetting_a_live_use() {
        let mut s = SeenSet::new(3);
        for (i, exp) in [(1, 100), (2, 110), (3, 120)] {
            assert!(s.first_use(n(i), exp, 0));
        }
        assert!(s.first_use(n(4), 130, 0));
        assert_eq!(s.len(), 3);
        // n(1) was dropped, but a replay of it (expiry 100) is still refused through the floor.
        assert!(!s.first_use(n(1), 100, 0));
        // A fresh token expiring at or below the floor is refused too; a later one passes.
        assert!(!s.first_use(n(9), 100, 0));
        assert!(s.first_use(n(10), 140, 0));
        assert!(!s.first_use(n(2), 110, 0));
        assert!(s.len() <= 3);
    }
}
