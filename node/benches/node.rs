//! Micro-benchmarks of the node's purchase path, through public APIs only: a reservation's
//! durable commit (the order engine over a real sled store in a temp dir, fsync included) and
//! the per-request rate-limiter check.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgecard_node::catalog::Catalog;
use edgecard_node::config::{OrdersConfig, ProductConfig};
use edgecard_node::limiter::{LimitClass, LimiterConfig, Limiters, Quota};
use edgecard_node::metrics::StoreMetrics;
use edgecard_node::orders::{CreateOrder, OrderEngine};
use edgecard_node::store::Store;
use edgecard_protocol::{NodeId, Sku, SliceGrant};
use serde_json::json;

const SKU: &str = "game-10";
/// Enough keys that no measurement runs out (each reservation holds one).
const KEYS: u64 = 300_000;

/// A grant for `eu-1`, built from its serde form so the fixture follows the grant's fields.
fn grant(keys: u64) -> SliceGrant {
    let keys: Vec<_> = (1..=keys).map(|i| json!({ "key_id": i, "secret": format!("GC-{i:020}") })).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    serde_json::from_value(json!({
        "slice_id": 1, "sku": SKU, "node_id": "eu-1", "epoch": 1,
        "issued_at": now, "lease_deadline": now + 24 * 3600 * 1000, "take_window": 1_000_000,
        "keys": keys,
    }))
    .unwrap()
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    engine: Arc<OrderEngine>,
    next_ip: AtomicU32,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 64 << 20, Arc::new(StoreMetrics::default())).unwrap());
        let product: ProductConfig = serde_json::from_value(json!({
            "sku": SKU, "title": { "en": "Game card" }, "prices": [{ "amount_minor": 1000, "currency": "USD" }],
        }))
        .unwrap();
        let catalog = Arc::new(Catalog::new(vec![product]));
        let config = OrdersConfig { max_open_per_ip: u32::MAX, ..OrdersConfig::default() };
        let engine = runtime.block_on(async {
            let engine =
                OrderEngine::open(NodeId::new("eu-1").unwrap(), store, catalog, config, Arc::default()).await.unwrap();
            engine.install_grant(grant(KEYS)).await.unwrap();
            Arc::new(engine)
        });
        Bench { runtime, engine, next_ip: AtomicU32::new(1), _dir: dir }
    }

    fn request(&self) -> CreateOrder {
        let ip = IpAddr::V4(Ipv4Addr::from(0xC612_0000 + self.next_ip.fetch_add(1, Ordering::Relaxed)));
        CreateOrder {
            sku: Sku::new(SKU).unwrap(),
            quantity: 1,
            email: None,
            currency: None,
            channel: "sandbox".into(),
            client_ip: ip,
        }
    }
}

fn reservation_commit(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group("reservation_commit");
    group.sample_size(20);
    // One buyer: every reservation waits for its own flush + fsync.
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_at_a_time", |b| {
        b.iter(|| bench.runtime.block_on(bench.engine.create_order(bench.request())).unwrap())
    });
    // 64 buyers at once: the group commit shares flushes among them.
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_concurrent", |b| {
        b.iter(|| {
            bench.runtime.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let engine = bench.engine.clone();
                        let request = bench.request();
                        tokio::spawn(async move { engine.create_order(request).await.map(|_| ()) })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap().unwrap();
                }
            })
        })
    });
    group.finish();
}

fn limiter_check(c: &mut Criterion) {
    let generous = Quota { per_second: 1_000_000, burst: 1_000_000 };
    let config = LimiterConfig {
        catalog: generous,
        create_order: generous,
        order_lookup: generous,
        payment: generous,
        evict_every_secs: 60,
    };
    let limiters = Limiters::new(&config).unwrap();
    let mut group = c.benchmark_group("limiter_check");
    group.throughput(Throughput::Elements(1));
    let one = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    group.bench_function("same_client", |b| {
        b.iter(|| limiters.check(LimitClass::CreateOrder, std::hint::black_box(one)))
    });
    // A crowd: 131,072 distinct addresses round-robin (the bench's X-Forwarded-For range).
    let mut n = 0u32;
    group.bench_function("crowd_of_131072", |b| {
        b.iter(|| {
            n = (n + 1) % (1 << 17);
            let ip = IpAddr::V4(Ipv4Addr::from(0xC612_0000 + n));
            limiters.check(LimitClass::CreateOrder, std::hint::black_box(ip))
        })
    });
    let v6 = "2001:db8::1".parse::<IpAddr>().unwrap();
    group.bench_function("ipv6_same_64", |b| b.iter(|| limiters.check(LimitClass::Catalog, std::hint::black_box(v6))));
    group.finish();
}

criterion_group!(benches, reservation_commit, limiter_check);
criterion_main!(benches);
