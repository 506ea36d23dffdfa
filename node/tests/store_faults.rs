//! The engine on a disk that fails: what `/healthz` says, what buyers get, and what survives.

#![allow(clippy::unwrap_used)]

mod fixtures;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgecard_node::api::healthz_response;
use edgecard_node::catalog::Catalog;
use edgecard_node::metrics::{OrderMetrics, StoreMetrics};
use edgecard_node::orders::{OrderEngine, OrderError};
use edgecard_store::{FaultyDisk, Health, LogOptions, Store, StoreError, StoreOptions};
use fixtures::{buy, config, grant_of, node, products};
use http::StatusCode;
use http_body_util::BodyExt;

async fn engine_on(dir: &Path, disk: &FaultyDisk) -> OrderEngine {
    let options = StoreOptions {
        disk: Arc::new(disk.attach()),
        cache_capacity: 4 << 20,
        log: LogOptions {
            segment_bytes: 256 << 10,
            disk_full_retry: Duration::from_millis(5),
            ..LogOptions::default()
        },
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open_with(dir, options, Arc::new(StoreMetrics::default())).unwrap());
    OrderEngine::open(node(), store, Arc::new(Catalog::new(products())), config(), Arc::new(OrderMetrics::default()))
        .await
        .unwrap()
}

async fn healthz(engine: &OrderEngine) -> (StatusCode, serde_json::Value) {
    let response = healthz_response(engine, edgecard_node::payments::LabPayments::Off);
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn a_failed_fsync_fails_the_order_turns_healthz_503_and_a_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let engine = engine_on(dir.path(), &disk).await;
    engine.install_grant(grant_of(1, 1, 10, 100)).await.unwrap();
    let kept = engine.create_order(buy(1)).await.unwrap();
    assert_eq!(healthz(&engine).await.0, StatusCode::OK);

    disk.fail_next_syncs(1);
    let failed = engine.create_order(buy(2)).await;
    assert!(matches!(failed, Err(OrderError::Store(StoreError::Poisoned { .. }))), "{failed:?}");
    let (status, body) = healthz(&engine).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["store"], "poisoned");
    let refused = engine.create_order(buy(3)).await;
    assert!(matches!(refused, Err(OrderError::Store(StoreError::Poisoned { .. }))), "{refused:?}");

    // The process exits and restarts on what the disk holds.
    disk.crash();
    engine.store().halt();
    drop(engine);
    let engine = engine_on(dir.path(), &disk).await;
    assert_eq!(healthz(&engine).await.0, StatusCode::OK);
    assert!(
        engine.lookup(&kept.record.id, &kept.token).await.is_ok(),
        "the order answered before the failure survives"
    );
    engine.create_order(buy(4)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_orders_until_space_returns_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let engine = engine_on(dir.path(), &disk).await;
    engine.install_grant(grant_of(1, 1, 10_000, 100_000)).await.unwrap();
    // No room for a second log segment.
    disk.set_capacity(Some(disk.used()));
    let mut refused = None;
    for i in 0..10_000u32 {
        if let Err(e) = engine.create_order(buy((i % 200) as u8)).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the disk never filled");
    assert!(matches!(refused, OrderError::Store(StoreError::DiskFull)), "{refused:?}");
    let (status, body) = healthz(&engine).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["store"], "disk_full");

    disk.set_capacity(None);
    let mut health = engine.store().subscribe_health();
    tokio::time::timeout(Duration::from_secs(5), health.wait_for(|h| *h == Health::Ok)).await.unwrap().unwrap();
    engine.create_order(buy(250)).await.unwrap();
    assert_eq!(healthz(&engine).await.0, StatusCode::OK);
    // No outbox seq was skipped: the coordinator would see a gap and alarm.
    let seqs: Vec<u64> = engine.outbox_after(0, 100_000).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// A delivery whose fsync failed is in memory but not on disk: its keys must not be shown.
#[tokio::test]
async fn keys_of_a_delivery_whose_fsync_failed_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let engine = engine_on(dir.path(), &disk).await;
    engine.install_grant(grant_of(1, 1, 10, 100)).await.unwrap();
    let created = engine.create_order(buy(1)).await.unwrap();

    disk.fail_next_syncs(1);
    let paid = engine.confirm_payment(fixtures::payment_for(&created.record, "txn-1")).await;
    assert!(matches!(paid, Err(OrderError::Store(StoreError::Poisoned { .. }))), "{paid:?}");
    let looked_up = engine.lookup(&created.record.id, &created.token).await;
    assert!(
        looked_up.as_ref().map_or(true, |order| order.secrets.is_empty()),
        "keys of a delivery that is not on disk were shown: {:?}",
        looked_up.map(|o| o.status)
    );
}
