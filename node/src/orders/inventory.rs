//! In-memory view of the keys a node may sell: pure logic, no I/O.
//!
//! Keys are handed out in key-id order per sku (the lease protocol relies on it: everything above
//! the highest key taken is provably untouched). Only keys of slices whose lease is still live, by
//! the node's monotonic clock less a safety margin, can be taken.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use edgecard_protocol::{Epoch, KeyId, Sku, SliceId, UnixMillis};

#[derive(Debug, Clone)]
pub struct SliceLease {
    pub sku: Sku,
    pub epoch: Epoch,
    /// The coordinator's deadline, as granted.
    pub lease_deadline: UnixMillis,
    /// The moment this node stops selling from the slice (monotonic, margin applied).
    pub sells_until: Instant,
    /// Keys of this slice currently available (not reserved, not sold).
    pub available: usize,
}

impl SliceLease {
    pub fn is_live(&self, now: Instant) -> bool {
        now < self.sells_until
    }
}

#[derive(Debug, Default)]
pub struct Inventory {
    available: HashMap<Sku, BTreeMap<KeyId, SliceId>>,
    slices: BTreeMap<SliceId, SliceLease>,
}

impl Inventory {
    pub fn slice(&self, id: SliceId) -> Option<&SliceLease> {
        self.slices.get(&id)
    }

    pub fn slices(&self) -> impl Iterator<Item = (&SliceId, &SliceLease)> {
        self.slices.iter()
    }

    pub fn upsert_slice(&mut self, id: SliceId, lease: SliceLease) {
        let available = self.slices.get(&id).map_or(0, |s| s.available);
        self.slices.insert(id, SliceLease { available, ..lease });
    }

    /// Makes `key` available again (new grant, or a reservation that ended unpaid).
    pub fn put(&mut self, sku: &Sku, key: KeyId, slice: SliceId) {
        let previous = self.available.entry(sku.clone()).or_default().insert(key, slice);
        if previous.is_none() {
            if let Some(lease) = self.slices.get_mut(&slice) {
                lease.available += 1;
            }
        }
    }

    /// Removes `key` from the available set (it is held by an order); returns its slice.
    pub fn remove(&mut self, sku: &Sku, key: KeyId) -> Option<SliceId> {
        let slice = self.available.get_mut(sku)?.remove(&key)?;
        if let Some(lease) = self.slices.get_mut(&slice) {
            lease.available = lease.available.saturating_sub(1);
        }
        Some(slice)
    }

    /// Takes the `count` lowest-id keys of `sku` from live slices, or nothing if there are fewer.
    pub fn take(&mut self, sku: &Sku, count: usize, now: Instant) -> Option<Vec<(KeyId, SliceId)>> {
        let keys = self.available.get(sku)?;
        let picked: Vec<(KeyId, SliceId)> = keys
            .iter()
            .filter(|(_, slice)| self.slices.get(slice).is_some_and(|l| l.is_live(now)))
            .take(count)
            .map(|(k, s)| (*k, *s))
            .collect();
        if picked.len() < count {
            return None;
        }
        for (key, _) in &picked {
            self.remove(sku, *key);
        }
        Some(picked)
    }

    /// Keys of `sku` that can be sold right now.
    pub fn sellable(&self, sku: &Sku, now: Instant) -> usize {
        self.slices.values().filter(|l| &l.sku == sku && l.is_live(now)).map(|l| l.available).sum()
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
    use std::time::Duration;

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn lease(sku_name: &str, until: Instant) -> SliceLease {
        SliceLease {
            sku: sku(sku_name),
            epoch: Epoch(1),
            lease_deadline: UnixMillis(0),
            sells_until: until,
            available: 0,
        }
    }

    #[test]
    fn takes_lowest_key_ids_first_and_all_or_nothing() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut inv = Inventory::default();
        inv.upsert_slice(SliceId(1), lease("a", later));
        for k in [5, 3, 9, 1] {
            inv.put(&sku("a"), KeyId(k), SliceId(1));
        }
        assert_eq!(inv.sellable(&sku("a"), now), 4);
        let got = inv.take(&sku("a"), 2, now).unwrap();
        assert_eq!(got, vec![(KeyId(1), SliceId(1)), (KeyId(3), SliceId(1))]);
        assert!(inv.take(&sku("a"), 3, now).is_none(), "only two left");
        assert_eq!(inv.sellable(&sku("a"), now), 2, "a failed take changes nothing");
        inv.put(&sku("a"), KeyId(1), SliceId(1));
        assert_eq!(inv.take(&sku("a"), 1, now).unwrap(), vec![(KeyId(1), SliceId(1))]);
    }

    #[test]
    fn expired_leases_do_not_sell() {
        let now = Instant::now();
        let mut inv = Inventory::default();
        inv.upsert_slice(SliceId(1), lease("a", now));
        inv.upsert_slice(SliceId(2), lease("a", now + Duration::from_secs(60)));
        inv.put(&sku("a"), KeyId(1), SliceId(1));
        inv.put(&sku("a"), KeyId(2), SliceId(2));
        assert_eq!(inv.sellable(&sku("a"), now), 1);
        assert_eq!(inv.take(&sku("a"), 1, now).unwrap(), vec![(KeyId(2), SliceId(2))]);
        assert!(inv.take(&sku("a"), 1, now).is_none());
    }

    #[test]
    fn renewing_a_lease_keeps_its_count() {
        let now = Instant::now();
        let mut inv = Inventory::default();
        inv.upsert_slice(SliceId(1), lease("a", now));
        inv.put(&sku("a"), KeyId(1), SliceId(1));
        inv.upsert_slice(SliceId(1), lease("a", now + Duration::from_secs(5)));
        assert_eq!(inv.sellable(&sku("a"), now), 1);
    }

    #[test]
    fn skus_are_separate() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut inv = Inventory::default();
        inv.upsert_slice(SliceId(1), lease("a", later));
        inv.upsert_slice(SliceId(2), lease("b", later));
        inv.put(&sku("a"), KeyId(1), SliceId(1));
        inv.put(&sku("b"), KeyId(1), SliceId(2));
        assert_eq!(inv.take(&sku("b"), 1, now).unwrap(), vec![(KeyId(1), SliceId(2))]);
        assert_eq!(inv.sellable(&sku("a"), now), 1);
        assert!(inv.take(&sku("c"), 1, now).is_none());
    }
}
