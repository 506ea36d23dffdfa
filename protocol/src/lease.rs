//! Lease arithmetic and the dark-node reclaim rule, shared by node, coordinator and simulation.
//!
//! Times are milliseconds. The node measures its lease on its own monotonic clock from the moment
//! it installs or renews a grant; the coordinator judges by its wall clock. The two agree as long
//! as the node's wall clock is within `max_clock_skew` of the coordinator's when it receives a
//! grant, which is the bound the reclaim rule assumes.

use std::collections::BTreeSet;

use crate::ids::{KeyId, UnixMillis};

/// How long, from `now` (node wall clock), the node may sell under a lease ending at
/// `lease_deadline`, keeping `safety_margin_ms` in hand.
pub fn node_sells_for_ms(lease_deadline: UnixMillis, now: UnixMillis, safety_margin_ms: u64) -> u64 {
    lease_deadline.0.saturating_sub(now.0).saturating_sub(safety_margin_ms)
}

/// Whether a lease is due for renewal: less than half its length is left.
pub fn renewal_due(lease_deadline: UnixMillis, now: UnixMillis, lease_ms: u64) -> bool {
    lease_deadline.0.saturating_sub(now.0) < lease_ms / 2
}

/// Whether the coordinator may reclaim a slice whose lease ends at `lease_deadline`: past the
/// deadline plus the clock-skew margin, the node has stopped selling from it (it stops at the
/// deadline less its safety margin by a clock at most `max_clock_skew_ms` off).
pub fn reclaimable(lease_deadline: UnixMillis, now: UnixMillis, max_clock_skew_ms: u64) -> bool {
    now.0 > lease_deadline.0.saturating_add(max_clock_skew_ms)
}

/// How a dark node's unsold keys of one slice split at reclaim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReclaimSplit {
    /// May have been sold without the coordinator knowing: kept until the node reconciles or an
    /// operator writes them off.
    pub quarantined: Vec<KeyId>,
    /// Provably never touched by the node: back to the pool.
    pub reclaimed: Vec<KeyId>,
}

/// Splits a slice's keys that the ledger does not know as sold.
///
/// `unsold` is ascending; `held` are those under reservations the ledger knows as open (the node
/// may have delivered them since). The node takes keys lowest id first and never has more than
/// `take_window` takes from the slice unacknowledged, so the keys it may have touched beyond the
/// ledger's knowledge are the held ones plus at most the `take_window` lowest of the rest.
pub fn split_for_reclaim(unsold: &[KeyId], held: &BTreeSet<KeyId>, take_window: u64) -> ReclaimSplit {
    let mut split = ReclaimSplit::default();
    let mut window_left = take_window;
    for key in unsold {
        if held.contains(key) {
            split.quarantined.push(*key);
        } else if window_left > 0 {
            window_left -= 1;
            split.quarantined.push(*key);
        } else {
            split.reclaimed.push(*key);
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<KeyId> {
        v.iter().copied().map(KeyId).collect()
    }

    #[test]
    fn node_keeps_its_margin_and_never_underflows() {
        assert_eq!(node_sells_for_ms(UnixMillis(10_000), UnixMillis(4_000), 1_000), 5_000);
        assert_eq!(node_sells_for_ms(UnixMillis(10_000), UnixMillis(9_500), 1_000), 0);
        assert_eq!(node_sells_for_ms(UnixMillis(10_000), UnixMillis(20_000), 0), 0);
    }

    #[test]
    fn renewal_is_due_in_the_second_half() {
        assert!(!renewal_due(UnixMillis(100_000), UnixMillis(40_000), 100_000));
        assert!(renewal_due(UnixMillis(100_000), UnixMillis(50_001), 100_000));
    }

    #[test]
    fn reclaim_waits_for_deadline_plus_skew() {
        assert!(!reclaimable(UnixMillis(1_000), UnixMillis(1_500), 500));
        assert!(reclaimable(UnixMillis(1_000), UnixMillis(1_501), 500));
    }

    #[test]
    fn quarantine_is_held_keys_plus_the_lowest_window() {
        let held: BTreeSet<KeyId> = ids(&[7]).into_iter().collect();
        let split = split_for_reclaim(&ids(&[3, 4, 7, 8, 9, 10]), &held, 2);
        assert_eq!(split.quarantined, ids(&[3, 4, 7]));
        assert_eq!(split.reclaimed, ids(&[8, 9, 10]));
        let all = split_for_reclaim(&ids(&[1, 2]), &BTreeSet::new(), 5);
        assert_eq!(all.quarantined, ids(&[1, 2]));
        assert!(all.reclaimed.is_empty());
    }
}
