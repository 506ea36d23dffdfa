//! Writes the deterministic crash-test workload into a store as fast as it can, with checkpoints
//! back to back, and prints `durable N` each time batches up to lsn N are durable. A crash test
//! kills it with SIGKILL at any point and checks the reopened store against the workload.
//!
//! Usage: `edgecard-store-torture DIR`. It stops by itself after two minutes.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use edgecard_store::{workload, LogOptions, Store, StoreMetrics, StoreOptions};

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: edgecard-store-torture DIR");
        std::process::exit(2);
    };
    let options = StoreOptions {
        cache_capacity: 4 << 20,
        log: LogOptions { segment_bytes: 1 << 20, ..LogOptions::default() },
        checkpoint_bytes: 256 << 10,
        checkpoint_interval: Duration::from_millis(5),
        ..StoreOptions::default()
    };
    let store = match Store::open_with(std::path::Path::new(&dir), options, Arc::new(StoreMetrics::default())) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    let mut stdout = std::io::stdout();
    let mut next = store.last_lsn() + 1;
    let stop_at = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < stop_at {
        for _ in 0..8 {
            match store.apply(workload::batch(next)) {
                Ok(lsn) if lsn == next => next += 1,
                Ok(lsn) => {
                    eprintln!("batch {next} got lsn {lsn}");
                    std::process::exit(1);
                }
                Err(e) => {
                    eprintln!("apply: {e}");
                    std::process::exit(1);
                }
            }
        }
        if let Err(e) = store.wait_durable_blocking(next - 1) {
            eprintln!("durable: {e}");
            std::process::exit(1);
        }
        let checkpoints = store.metrics().checkpoints.get();
        if writeln!(stdout, "durable {} checkpoints {checkpoints}", next - 1).and_then(|()| stdout.flush()).is_err() {
            std::process::exit(0);
        }
    }
}
