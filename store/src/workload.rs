//! A deterministic write workload for crash tests: batch `n` is a pure function of `n`, so the
//! state after any prefix of batches can be computed without the store.

use std::collections::BTreeMap;

use crate::batch::{Op, WriteBatch};

const KEYS: u64 = 500;

/// The batch written at lsn `n`: an overwrite, sometimes a deletion, sometimes a value large
/// enough for sled's blob files, and a counter.
pub fn batch(n: u64) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let value: Vec<u8> = if n.is_multiple_of(200) {
        (0..200_000u64).map(|i| (i.wrapping_mul(n) % 251) as u8).collect()
    } else {
        format!("value {n}").into_bytes()
    };
    batch.put(format!("k/{:03}", n % KEYS).into_bytes(), value);
    if n.is_multiple_of(3) {
        batch.delete(format!("k/{:03}", (n * 7) % KEYS).into_bytes());
    }
    batch.put(b"n/last".to_vec(), n.to_be_bytes().to_vec());
    batch
}

/// The state after batches `1..=n`.
pub fn state_after(n: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for i in 1..=n {
        for op in batch(i).into_ops() {
            match op {
                Op::Put(key, value) => {
                    state.insert(key, value);
                }
                Op::Delete(key) => {
                    state.remove(&key);
                }
            }
        }
    }
    state
}
