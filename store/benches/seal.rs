//! What sealing at rest costs per value: seal and open of typical record sizes (a key record,
//! a delivered order with two keys, a 4 KiB queued grant chunk).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgecard_store::{KeyRing, Sealer};

fn seal_and_open(c: &mut Criterion) {
    let sealer = Sealer::new(&KeyRing::generate());
    let mut group = c.benchmark_group("seal");
    for size in [96usize, 400, 4096] {
        let plain = vec![0x5a; size];
        let sealed = sealer.seal(b"o/order-0001", &plain);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", size), &plain, |b, plain| {
            b.iter(|| sealer.seal(b"o/order-0001", plain))
        });
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, sealed| {
            b.iter(|| sealer.open(b"o/order-0001", sealed))
        });
    }
    group.finish();
}

criterion_group!(benches, seal_and_open);
criterion_main!(benches);
