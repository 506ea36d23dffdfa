//! Writes since the last checkpoint, in memory, in front of sled.
//!
//! sled is written only by checkpoints, from a frozen memtable whose every batch is already
//! durable in the log, so sled never holds a write that the log could lose. Reads look in the
//! active memtable, then the frozen one, then sled.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::batch::Op;

/// A key's latest write: a value, or `None` for a deletion not yet in sled.
pub type Entries = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Memtable entries in key order, deletions included.
pub type Overlay = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A stored key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

#[derive(Default)]
pub struct Memtable {
    active: Entries,
    /// Being written to sled by a checkpoint.
    frozen: Option<Arc<Entries>>,
}

pub enum Lookup<'a> {
    Found(&'a [u8]),
    Deleted,
    /// Not written since the last checkpoint: ask sled.
    Unknown,
}

impl Memtable {
    pub fn apply(&mut self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Put(key, value) => {
                    self.active.insert(key, Some(value));
                }
                Op::Delete(key) => {
                    self.active.insert(key, None);
                }
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Lookup<'_> {
        let hit = self.active.get(key).or_else(|| self.frozen.as_ref().and_then(|f| f.get(key)));
        match hit {
            Some(Some(value)) => Lookup::Found(value),
            Some(None) => Lookup::Deleted,
            None => Lookup::Unknown,
        }
    }

    /// Every entry under `prefix` from key `from` on, newest write per key, in key order.
    pub fn range(&self, prefix: &[u8], from: &[u8]) -> Overlay {
        let mut merged: Entries = BTreeMap::new();
        let from = from.max(prefix);
        let range = |entries: &Entries| -> Overlay {
            entries
                .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if let Some(frozen) = &self.frozen {
            merged.extend(range(frozen));
        }
        merged.extend(range(&self.active));
        merged.into_iter().collect()
    }

    /// Freezes the active entries for a checkpoint; if an earlier checkpoint failed, its frozen
    /// entries stay and the newer ones go on top.
    pub fn freeze(&mut self) -> Arc<Entries> {
        let active = std::mem::take(&mut self.active);
        let frozen = match self.frozen.take() {
            Some(older) => {
                let mut merged = Arc::unwrap_or_clone(older);
                merged.extend(active);
                merged
            }
            None => active,
        };
        let frozen = Arc::new(frozen);
        self.frozen = Some(frozen.clone());
        frozen
    }

    /// The frozen entries are in sled now.
    pub fn release_frozen(&mut self) {
        self.frozen = None;
    }
}

/// Merges a memtable overlay with sled's entries under the same prefix, walking both in the same
/// direction: the overlay wins on equal keys, and its deletions hide sled's entries.
pub struct Merged<I: Iterator> {
    overlay: std::iter::Peekable<<Overlay as IntoIterator>::IntoIter>,
    base: std::iter::Peekable<I>,
    reverse: bool,
}

impl<I, E> Merged<I>
where
    I: Iterator<Item = Result<KeyValue, E>>,
{
    pub fn new(mut overlay: Overlay, base: I, reverse: bool) -> Self {
        if reverse {
            overlay.reverse();
        }
        Merged { overlay: overlay.into_iter().peekable(), base: base.peekable(), reverse }
    }
}

impl<I, E> Iterator for Merged<I>
where
    I: Iterator<Item = Result<KeyValue, E>>,
{
    type Item = Result<KeyValue, E>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.overlay.peek(), self.base.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), Some(Err(_))) => Ordering::Greater,
                (Some((ok, _)), Some(Ok((bk, _)))) => {
                    let order = ok.as_slice().cmp(bk.as_slice());
                    if self.reverse {
                        order.reverse()
                    } else {
                        order
                    }
                }
            };
            match order {
                Ordering::Greater => return self.base.next(),
                Ordering::Equal => {
                    self.base.next();
                }
                Ordering::Less => {}
            }
            if let Some((key, Some(value))) = self.overlay.next() {
                return Some(Ok((key, value)));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Base = Vec<Result<(Vec<u8>, Vec<u8>), ()>>;

    fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn overlay_wins_and_deletions_hide_base_entries_both_ways() {
        let base: Base = vec![Ok(kv("a", "1")), Ok(kv("b", "1")), Ok(kv("d", "1"))];
        let overlay =
            vec![(b"b".to_vec(), None), (b"c".to_vec(), Some(b"2".to_vec())), (b"d".to_vec(), Some(b"2".to_vec()))];
        let forward: Vec<_> =
            Merged::new(overlay.clone(), base.clone().into_iter(), false).map(|r| r.unwrap()).collect();
        assert_eq!(forward, vec![kv("a", "1"), kv("c", "2"), kv("d", "2")]);
        let backward: Vec<_> = Merged::new(overlay, base.into_iter().rev(), true).map(|r| r.unwrap()).collect();
        assert_eq!(backward, vec![kv("d", "2"), kv("c", "2"), kv("a", "1")]);
    }

    #[test]
    fn frozen_entries_are_read_until_released_and_newer_writes_win() {
        let mut table = Memtable::default();
        table.apply(vec![Op::Put(b"k".to_vec(), b"old".to_vec())]);
        table.freeze();
        table.apply(vec![Op::Put(b"k".to_vec(), b"new".to_vec())]);
        assert!(matches!(table.get(b"k"), Lookup::Found(v) if v == b"new"));
        assert_eq!(table.range(b"k", b""), vec![(b"k".to_vec(), Some(b"new".to_vec()))]);
        assert_eq!(table.range(b"k", b"l"), vec![]);
        table.release_frozen();
        assert!(matches!(table.get(b"k"), Lookup::Found(v) if v == b"new"));
        table.freeze();
        table.release_frozen();
        assert!(matches!(table.get(b"k"), Lookup::Unknown));
    }
}
