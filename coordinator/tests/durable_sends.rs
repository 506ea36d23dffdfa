//! Nothing leaves the coordinator before it is durable: a control message in a sync ack must
//! survive a crash the moment after the ack is sent.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edgecard_coordinator::import::KeyFormat;
use edgecard_coordinator::records::{Price, ProductRecord};
use edgecard_coordinator::service::{Coordinator, Settings};
use edgecard_protocol::{ControlBody, NodeId, Sku, SyncUpload};
use edgecard_store::{FaultyDisk, Store, StoreMetrics, StoreOptions};

fn open(dir: &Path, disk: &FaultyDisk) -> Arc<Coordinator> {
    let options = StoreOptions { disk: Arc::new(disk.attach()), cache_capacity: 4 << 20, ..StoreOptions::default() };
    let store = Arc::new(Store::open_with(dir, options, Arc::new(StoreMetrics::default())).unwrap());
    Arc::new(Coordinator::new(store, SigningKey::from_bytes(&[7u8; 32]), Settings::default()))
}

fn grant_seqs(control: &[edgecard_protocol::ControlMessage]) -> Vec<u64> {
    control.iter().filter(|m| matches!(m.body, ControlBody::Grant { .. })).map(|m| m.seq).collect()
}

/// An allocation applied while a node's sync waits for its own fsync: the ack may carry the new
/// grant only once the grant itself is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_reaches_a_node_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let c = open(dir.path(), &disk);
    let game = Sku::new("game").unwrap();
    let eu = NodeId::new("eu-1").unwrap();
    c.add_product(ProductRecord {
        sku: game.clone(),
        titles: vec![("en".into(), "Game".into())],
        prices: vec![Price { amount_minor: 1000, currency: "USD".into() }],
        topup: None,
    })
    .await
    .unwrap();
    c.import_keys(&game, "A\nB\nC\nD\n", KeyFormat::Lines, false).await.unwrap();
    c.add_node(&eu, "eu").await.unwrap();

    // The node's sync writes its batch; the fsync of that group is held back.
    disk.stall_syncs(true);
    let upload = SyncUpload {
        node_id: eu.clone(),
        incarnation: 1,
        newest_seq: 0,
        events: vec![],
        control_applied: 1,
        stock: vec![],
        refused_control: vec![],
        lookups: vec![],
    };
    let ingest = tokio::spawn({
        let (c, eu) = (c.clone(), eu.clone());
        async move { c.ingest(&eu, upload).await }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while disk.unsynced_writes() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // An operator allocates meanwhile: its batch is visible, queued behind the held fsync.
    let allocate = tokio::spawn({
        let (c, eu, game) = (c.clone(), eu.clone(), game.clone());
        async move { c.allocate(&game, &eu, 2).await }
    });
    while grant_seqs(&c.pending_control(&eu).unwrap()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!grant_seqs(&c.pending_control(&eu).unwrap()).is_empty(), "the allocation never applied");
    // The sync's group becomes durable; the allocation's group never does.
    disk.allow_syncs(Some(1));
    disk.stall_syncs(false);
    // Reading the ack's messages before waiting (the fix) means this ack was read before the
    // allocation applied and carries no grant; reading after the wait (the bug) sent the grant.
    let answered = tokio::time::timeout(Duration::from_millis(500), ingest).await;
    disk.crash();
    let sent = match answered {
        Ok(joined) => joined.unwrap().map(|ack| grant_seqs(&ack.control)).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    assert!(tokio::time::timeout(Duration::from_secs(5), allocate).await.unwrap().unwrap().is_err());
    c.store().halt();
    drop(c);

    disk.allow_syncs(None);
    let c = open(dir.path(), &disk);
    let kept = grant_seqs(&c.pending_control(&eu).unwrap());
    for seq in &sent {
        assert!(kept.contains(seq), "grant {seq} was sent to the node and lost in the crash (kept: {kept:?})");
    }
}
