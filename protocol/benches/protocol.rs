//! Micro-benchmarks of the protocol's hot decoders: the envelope around every message from disk
//! or the network, and grant verification (signature, decode, validation) at install time.
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use edgecard_protocol::{
    decode, encode, MessageKind, NodeId, OrderEvent, OrderEventBatch, OrderEventKind, OrderId, SignedGrant, Sku,
    SliceGrant, UnixMillis,
};
use serde_json::json;

/// A grant of `keys` keys for node `eu-1`. Built from its serde form, so the fixture keeps
/// compiling as the grant gains fields with defaults in the JSON below.
fn grant(keys: u64) -> SliceGrant {
    let keys: Vec<_> = (1..=keys).map(|i| json!({ "key_id": i, "secret": format!("GC-{i:020}") })).collect();
    serde_json::from_value(json!({
        "slice_id": 1, "sku": "game-10", "node_id": "eu-1", "epoch": 1,
        "issued_at": 1_000, "lease_deadline": 4_000_000_000_000u64, "take_window": 1_000_000,
        "keys": keys,
    }))
    .unwrap()
}

fn event_batch(events: u64) -> OrderEventBatch {
    let node = NodeId::new("eu-1").unwrap();
    let sku = Sku::new("game-10").unwrap();
    let events = (1..=events)
        .map(|seq| OrderEvent {
            node_id: node.clone(),
            seq,
            at: UnixMillis(1_700_000_000_000 + seq),
            order_id: OrderId::random(),
            sku: sku.clone(),
            kind: OrderEventKind::Delivered { key_ids: vec![edgecard_protocol::KeyId(seq)] },
        })
        .collect();
    OrderEventBatch { node_id: node, events }
}

fn envelope_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_decode");
    for keys in [1u64, 1_000] {
        let bytes = encode(MessageKind::SliceGrant, &grant(keys)).unwrap();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("slice_grant_keys", keys), &bytes, |b, bytes| {
            b.iter(|| decode::<SliceGrant>(MessageKind::SliceGrant, std::hint::black_box(bytes)).unwrap())
        });
    }
    let bytes = event_batch(100).to_bytes().unwrap();
    group.throughput(Throughput::Elements(100));
    group.bench_function("order_event_batch_100", |b| {
        b.iter(|| OrderEventBatch::from_bytes(std::hint::black_box(&bytes)).unwrap())
    });
    group.finish();
}

fn grant_verification(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let verifying = key.verifying_key();
    let node = NodeId::new("eu-1").unwrap();
    let mut group = c.benchmark_group("grant_verify");
    group.sample_size(20);
    for keys in [1u64, 1_000, 100_000] {
        let bytes = grant(keys).sign(&key).unwrap().to_bytes().unwrap();
        group.throughput(Throughput::Elements(keys));
        group.bench_with_input(BenchmarkId::new("keys", keys), &bytes, |b, bytes| {
            b.iter(|| SignedGrant::from_bytes(std::hint::black_box(bytes)).unwrap().verify(&verifying, &node).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, envelope_decode, grant_verification);
criterion_main!(benches);
