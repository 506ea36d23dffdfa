//! Durable commits per second with 1, 16 and 256 concurrent writers, each commit one ~200-byte
//! record (an order's size), and the commit group sizes that result.
//!
//! `cargo bench -p edgecard-store --bench commit`; `EDGECARD_BENCH_GROUP_WAIT_US=N` sets the
//! log's gathering pause. Group sizes go to stderr as `group size W writers: commits/fsync`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgecard_store::{Store, StoreMetrics, WriteBatch};

fn open_store(dir: &Path) -> Store {
    let wait_us: u64 = std::env::var("EDGECARD_BENCH_GROUP_WAIT_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let options = edgecard_store::StoreOptions {
        cache_capacity: 64 << 20,
        log: edgecard_store::LogOptions {
            group_wait: Duration::from_micros(wait_us),
            ..edgecard_store::LogOptions::default()
        },
        ..edgecard_store::StoreOptions::default()
    };
    Store::open_with(dir, options, Arc::new(StoreMetrics::default())).unwrap()
}

fn record(writer: usize, i: u64) -> WriteBatch {
    let mut batch = WriteBatch::default();
    batch.put(format!("o/{writer:04}/{i:012}").into_bytes(), vec![0xab; 200]);
    batch
}

fn durable_commits(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("durable_commits");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for writers in [1usize, 16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open_store(dir.path()));
        let (fsyncs_before, batches_before) = (store.metrics().flushes.get(), store.metrics().batches_applied.get());
        group.bench_with_input(BenchmarkId::from_parameter(writers), &writers, |b, &writers| {
            b.iter_custom(|iters| {
                let store = store.clone();
                runtime.block_on(async move {
                    let per_writer = iters.div_ceil(writers as u64);
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..writers)
                        .map(|w| {
                            let store = store.clone();
                            tokio::spawn(async move {
                                for i in 0..per_writer {
                                    store.commit(record(w, i)).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    // Time per commit as criterion counts them (iters), from writers × per_writer.
                    started.elapsed().mul_f64(iters as f64 / (per_writer * writers as u64) as f64)
                })
            })
        });
        let fsyncs = store.metrics().flushes.get() - fsyncs_before;
        let batches = store.metrics().batches_applied.get() - batches_before;
        eprintln!(
            "group size {writers} writers: {:.1} commits/fsync ({batches} commits, {fsyncs} fsyncs)",
            batches as f64 / fsyncs.max(1) as f64
        );
    }
    group.finish();
}

criterion_group!(benches, durable_commits);
criterion_main!(benches);
