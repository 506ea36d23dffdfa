//! What a node holds and may sell: pure logic, no I/O, no clock.
//!
//! Keys are handed out lowest id first per slice (the reclaim rule relies on it: past the lowest
//! unacknowledged takes, everything is provably untouched). A key can be taken only from a slice
//! that is open, whose lease is live by the node's monotonic clock (milliseconds, passed in), and
//! whose take window has room: the node never has more than `take_window` takes from a slice that
//! the coordinator has not acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::ids::{Epoch, KeyId, Sku, SliceId, UnixMillis};

#[derive(Debug, Clone)]
pub struct SliceHolding {
    pub sku: Sku,
    pub epoch: Epoch,
    /// The coordinator's deadline, as granted or renewed.
    pub lease_deadline: UnixMillis,
    /// Node monotonic milliseconds at which it stops selling from the slice (margin applied).
    pub sells_until_ms: u64,
    pub take_window: u64,
    /// Set when the coordinator closed the slice: the ticket its releases answer to.
    pub closed: Option<u64>,
    /// Keys of this slice currently available (not reserved, not sold).
    pub available: usize,
    /// Takes from this slice in events the coordinator has not acknowledged.
    pub unacked_takes: u64,
}

impl SliceHolding {
    pub fn new(sku: Sku, epoch: Epoch, lease_deadline: UnixMillis, sells_until_ms: u64, take_window: u64) -> Self {
        SliceHolding {
            sku,
            epoch,
            lease_deadline,
            sells_until_ms,
            take_window,
            closed: None,
            available: 0,
            unacked_takes: 0,
        }
    }

    pub fn lease_live(&self, now_ms: u64) -> bool {
        now_ms < self.sells_until_ms
    }

    /// Whether a new take may come from this slice now (window aside).
    pub fn sells(&self, now_ms: u64) -> bool {
        self.closed.is_none() && self.lease_live(now_ms)
    }

    pub fn window_room(&self) -> u64 {
        self.take_window.saturating_sub(self.unacked_takes)
    }
}

#[derive(Debug, Default)]
pub struct Holdings {
    available: HashMap<Sku, BTreeMap<KeyId, SliceId>>,
    slices: BTreeMap<SliceId, SliceHolding>,
    /// (event seq, slice, takes) of events not yet acknowledged, ascending by seq.
    unacked: VecDeque<(u64, SliceId, u64)>,
}

impl Holdings {
    pub fn slice(&self, id: SliceId) -> Option<&SliceHolding> {
        self.slices.get(&id)
    }

    pub fn slices(&self) -> impl Iterator<Item = (&SliceId, &SliceHolding)> {
        self.slices.iter()
    }

    /// Installs a slice, or replaces its lease terms keeping what is counted on it.
    pub fn upsert_slice(&mut self, id: SliceId, holding: SliceHolding) {
        let (available, unacked_takes, closed) =
            self.slices.get(&id).map_or((0, 0, holding.closed), |s| (s.available, s.unacked_takes, s.closed));
        self.slices.insert(id, SliceHolding { available, unacked_takes, closed, ..holding });
    }

    /// A renewal: the later deadline, for the slice's current epoch only. A closed slice is
    /// renewed too: it sells nothing new, but keys under its open reservations stay deliverable.
    pub fn renew(&mut self, id: SliceId, epoch: Epoch, lease_deadline: UnixMillis, sells_until_ms: u64) -> bool {
        match self.slices.get_mut(&id) {
            Some(s) if s.epoch == epoch && lease_deadline > s.lease_deadline => {
                s.lease_deadline = lease_deadline;
                s.sells_until_ms = s.sells_until_ms.max(sells_until_ms);
                true
            }
            _ => false,
        }
    }

    /// Makes `key` available (new grant, or a reservation that ended unpaid). A key of a closed
    /// slice is not taken back: the caller releases it instead.
    pub fn put(&mut self, sku: &Sku, key: KeyId, slice: SliceId) -> bool {
        if self.slices.get(&slice).is_some_and(|s| s.closed.is_some()) {
            return false;
        }
        let previous = self.available.entry(sku.clone()).or_default().insert(key, slice);
        if previous.is_none() {
            if let Some(holding) = self.slices.get_mut(&slice) {
                holding.available += 1;
            }
        }
        true
    }

    /// Removes `key` from the available set (it is held by an order); returns its slice.
    pub fn remove(&mut self, sku: &Sku, key: KeyId) -> Option<SliceId> {
        let slice = self.available.get_mut(sku)?.remove(&key)?;
        if let Some(holding) = self.slices.get_mut(&slice) {
            holding.available = holding.available.saturating_sub(1);
        }
        Some(slice)
    }

    /// Takes the `count` lowest-id keys of `sku` from selling slices with window room, or nothing
    /// if there are fewer. The caller records the takes with [`Holdings::record_takes`] under
    /// the seq of the event that carries them, before taking again.
    pub fn take(&mut self, sku: &Sku, count: usize, now_ms: u64) -> Option<Vec<(KeyId, SliceId)>> {
        let keys = self.available.get(sku)?;
        let mut picked: Vec<(KeyId, SliceId)> = Vec::with_capacity(count);
        for (key, slice) in keys {
            if picked.len() == count {
                break;
            }
            let Some(holding) = self.slices.get(slice) else { continue };
            // `count` is an order's quantity (small): counting in `picked` beats a map per take.
            let used_here = picked.iter().filter(|(_, s)| s == slice).count() as u64;
            if holding.sells(now_ms) && used_here < holding.window_room() {
                picked.push((*key, *slice));
            }
        }
        if picked.len() < count {
            return None;
        }
        for (key, _) in &picked {
            self.remove(sku, *key);
        }
        Some(picked)
    }

    /// Counts `takes` against their slices' windows until `seq` is acknowledged.
    pub fn record_takes(&mut self, seq: u64, takes: &[(KeyId, SliceId)]) {
        for (_, slice) in takes {
            self.record_slice_takes(seq, *slice, 1);
        }
    }

    /// Counts `n` takes against one slice until `seq` is acknowledged.
    pub fn record_slice_takes(&mut self, seq: u64, slice: SliceId, n: u64) {
        if let Some(holding) = self.slices.get_mut(&slice) {
            holding.unacked_takes += n;
            self.unacked.push_back((seq, slice, n));
        }
    }

    /// Up to `n` takes from `slice` counted under event `seq` ended without revealing a key (an
    /// unpaid reservation expired or was cancelled before the coordinator acknowledged it): they
    /// leave the window now. Safe because keys are taken lowest first: the keys that come back are
    /// the lowest available, so later takes reuse them, and every key touched since the last
    /// acknowledgement stays within the lowest `take_window` the coordinator would quarantine.
    /// Returns how many were forgotten.
    pub fn forget_takes(&mut self, seq: u64, slice: SliceId, n: u64) -> u64 {
        let mut forgotten = 0;
        for entry in self.unacked.iter_mut().filter(|(s, sl, _)| *s == seq && *sl == slice) {
            let here = entry.2.min(n - forgotten);
            entry.2 -= here;
            forgotten += here;
            if forgotten == n {
                break;
            }
        }
        if let Some(holding) = self.slices.get_mut(&slice) {
            holding.unacked_takes = holding.unacked_takes.saturating_sub(forgotten);
        }
        forgotten
    }

    /// The coordinator has every event through `high_water`: their takes leave the windows.
    pub fn acknowledge(&mut self, high_water: u64) {
        while let Some(&(seq, slice, n)) = self.unacked.front() {
            if seq > high_water {
                break;
            }
            self.unacked.pop_front();
            if let Some(holding) = self.slices.get_mut(&slice) {
                holding.unacked_takes = holding.unacked_takes.saturating_sub(n);
            }
        }
    }

    /// The up to `count` highest-id available keys of `slice`, ascending: what a shrink drops.
    pub fn highest_available(&self, slice: SliceId, count: u64) -> Vec<KeyId> {
        let Some(sku) = self.slices.get(&slice).map(|s| &s.sku) else { return Vec::new() };
        let mut keys: Vec<KeyId> = match self.available.get(sku) {
            Some(keys) => keys
                .iter()
                .rev()
                .filter(|(_, s)| **s == slice)
                .take(usize::try_from(count).unwrap_or(usize::MAX))
                .map(|(k, _)| *k)
                .collect(),
            None => Vec::new(),
        };
        keys.reverse();
        keys
    }

    /// Drops up to `count` available keys of `slice`, highest ids first; returns them ascending.
    pub fn shrink(&mut self, slice: SliceId, count: u64) -> Vec<KeyId> {
        let dropped = self.highest_available(slice, count);
        if let Some(sku) = self.slices.get(&slice).map(|s| s.sku.clone()) {
            for key in &dropped {
                self.remove(&sku, *key);
            }
        }
        dropped
    }

    /// Closes `slice` under `ticket`: it sells no more and every available key is dropped
    /// (returned ascending). Keys of open reservations come back through `put`, which refuses them.
    pub fn close(&mut self, slice: SliceId, ticket: u64) -> Vec<KeyId> {
        let dropped = self.shrink(slice, u64::MAX);
        self.mark_closed(slice, ticket);
        dropped
    }

    pub fn mark_closed(&mut self, slice: SliceId, ticket: u64) {
        if let Some(holding) = self.slices.get_mut(&slice) {
            holding.closed = Some(ticket);
        }
    }

    pub fn set_epoch(&mut self, slice: SliceId, epoch: Epoch) {
        if let Some(holding) = self.slices.get_mut(&slice) {
            holding.epoch = holding.epoch.max(epoch);
        }
    }

    /// Keys of `sku` that can be sold right now (window aside).
    pub fn sellable(&self, sku: &Sku, now_ms: u64) -> usize {
        self.slices.values().filter(|s| &s.sku == sku && s.sells(now_ms)).map(|s| s.available).sum()
    }

    /// Whether `key` is currently available in any slice (used to refuse overlapping grants).
    pub fn contains(&self, sku: &Sku, key: KeyId) -> bool {
        self.available.get(sku).is_some_and(|m| m.contains_key(&key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn holding(sku_name: &str, until: u64, window: u64) -> SliceHolding {
        SliceHolding::new(sku(sku_name), Epoch(1), UnixMillis(0), until, window)
    }

    #[test]
    fn takes_lowest_key_ids_first_and_all_or_nothing() {
        let mut h = Holdings::default();
        h.upsert_slice(SliceId(1), holding("a", 60_000, 100));
        for k in [5, 3, 9, 1] {
            h.put(&sku("a"), KeyId(k), SliceId(1));
        }
        assert_eq!(h.sellable(&sku("a"), 0), 4);
        let got = h.take(&sku("a"), 2, 0).unwrap();
        assert_eq!(got, vec![(KeyId(1), SliceId(1)), (KeyId(3), SliceId(1))]);
        assert!(h.take(&sku("a"), 3, 0).is_none(), "only two left");
        assert_eq!(h.sellable(&sku("a"), 0), 2, "a failed take changes nothing");
        h.put(&sku("a"), KeyId(1), SliceId(1));
        assert_eq!(h.take(&sku("a"), 1, 0).unwrap(), vec![(KeyId(1), SliceId(1))]);
    }

    #[test]
    fn expired_leases_do_not_sell() {
        let mut h = Holdings::default();
        h.upsert_slice(SliceId(1), holding("a", 10, 100));
        h.upsert_slice(SliceId(2), holding("a", 60_000, 100));
        h.put(&sku("a"), KeyId(1), SliceId(1));
        h.put(&sku("a"), KeyId(2), SliceId(2));
        assert_eq!(h.sellable(&sku("a"), 10), 1);
        assert_eq!(h.take(&sku("a"), 1, 10).unwrap(), vec![(KeyId(2), SliceId(2))]);
        assert!(h.take(&sku("a"), 1, 10).is_none());
    }

    #[test]
    fn the_take_window_stops_sales_until_acknowledged() {
        let mut h = Holdings::default();
        h.upsert_slice(SliceId(1), holding("a", 60_000, 2));
        for k in 1..=5 {
            h.put(&sku("a"), KeyId(k), SliceId(1));
        }
        let first = h.take(&sku("a"), 2, 0).unwrap();
        h.record_takes(1, &first);
        assert!(h.take(&sku("a"), 1, 0).is_none(), "window of 2 is full");
        h.acknowledge(0);
        assert!(h.take(&sku("a"), 1, 0).is_none(), "seq 1 not acknowledged yet");
        h.acknowledge(1);
        assert_eq!(h.take(&sku("a"), 2, 0).unwrap(), vec![(KeyId(3), SliceId(1)), (KeyId(4), SliceId(1))]);
        assert!(h.take(&sku("a"), 3, 0).is_none(), "only key 5 is left");
    }

    #[test]
    fn renewal_applies_to_the_current_epoch_only() {
        let mut h = Holdings::default();
        h.upsert_slice(SliceId(1), holding("a", 10, 5));
        assert!(!h.renew(SliceId(1), Epoch(2), UnixMillis(50), 100), "other epoch");
        assert!(h.renew(SliceId(1), Epoch(1), UnixMillis(50), 100));
        assert!(h.slice(SliceId(1)).unwrap().lease_live(50));
        assert!(!h.renew(SliceId(1), Epoch(1), UnixMillis(40), 200), "not later");
        h.mark_closed(SliceId(1), 3);
        assert!(
            h.renew(SliceId(1), Epoch(1), UnixMillis(60), 300),
            "a closed slice keeps its reservations deliverable"
        );
        assert!(!h.slice(SliceId(1)).unwrap().sells(100));
    }

    #[test]
    fn shrink_drops_highest_available_and_close_refuses_returns() {
        let mut h = Holdings::default();
        h.upsert_slice(SliceId(1), holding("a", 60_000, 100));
        h.upsert_slice(SliceId(2), holding("a", 60_000, 100));
        for k in 1..=6 {
            h.put(&sku("a"), KeyId(k), SliceId(if k % 2 == 0 { 2 } else { 1 }));
        }
        let taken = h.take(&sku("a"), 1, 0).unwrap();
        assert_eq!(taken, vec![(KeyId(1), SliceId(1))]);
        assert_eq!(h.shrink(SliceId(1), 1), vec![KeyId(5)]);
        assert_eq!(h.close(SliceId(1), 9), vec![KeyId(3)]);
        assert!(!h.put(&sku("a"), KeyId(1), SliceId(1)), "closed slice takes nothing back");
        assert_eq!(h.sellable(&sku("a"), 0), 3);
        assert_eq!(h.shrink(SliceId(2), 10), vec![KeyId(2), KeyId(4), KeyId(6)]);
        assert!(h.take(&sku("a"), 1, 0).is_none());
    }
}
