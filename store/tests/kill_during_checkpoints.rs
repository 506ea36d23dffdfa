//! kill -9 while checkpoints run back to back, 20 times over the same directory: after each
//! restart the state is exactly the workload's state at the log's last lsn, and that lsn is at
//! least the last one reported durable.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecard_store::{workload, Store, StoreMetrics};

/// The writer, killed however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scan_all(store: &Store) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let mut all = std::collections::BTreeMap::new();
    for prefix in [&b"k/"[..], &b"n/"[..]] {
        for item in store.scan_prefix(prefix) {
            let (k, v) = item.unwrap();
            all.insert(k, v);
        }
    }
    all
}

#[test]
fn state_equals_the_log_after_kill_9_during_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut last_reported = 0u64;
    let mut checkpoints_seen = 0u64;
    let started = Instant::now();
    for cycle in 0..20u64 {
        let mut child = Killed(
            Command::new(env!("CARGO_BIN_EXE_edgecard-store-torture"))
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        // Let it run past a few checkpoints, a different number each cycle.
        let wanted = 3 + cycle % 5;
        let mut first_checkpoints = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = lines.next().expect("the writer stopped early").unwrap();
            let mut words = line.split_whitespace();
            let durable: u64 = words.nth(1).unwrap().parse().unwrap();
            let checkpoints: u64 = words.nth(1).unwrap().parse().unwrap();
            assert!(durable > last_reported || durable == last_reported && cycle == 0);
            last_reported = durable;
            let first = *first_checkpoints.get_or_insert(checkpoints);
            if checkpoints >= first + wanted || Instant::now() > deadline {
                checkpoints_seen += checkpoints - first;
                break;
            }
        }
        child.0.kill().unwrap();
        child.0.wait().unwrap();

        let store = Store::open(dir.path(), 4 << 20, Arc::new(StoreMetrics::default())).unwrap();
        let at = store.last_lsn();
        assert!(at >= last_reported, "cycle {cycle}: log ends at {at}, but {last_reported} was reported durable");
        let expected = workload::state_after(at);
        let found = scan_all(&store);
        assert_eq!(found.len(), expected.len(), "cycle {cycle}: key count at lsn {at}");
        assert!(found == expected, "cycle {cycle}: state differs from the log at lsn {at}");
        last_reported = at;
        drop(store);
    }
    assert!(checkpoints_seen >= 60, "only {checkpoints_seen} checkpoints ran under the kills");
    assert!(started.elapsed() < Duration::from_secs(120));
}
