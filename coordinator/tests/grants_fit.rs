//! Sync never stops on size: every grant fits the sync envelope, and so does every ack, however
//! much is queued for a node.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use edgecard_coordinator::import::KeyFormat;
use edgecard_coordinator::records::{Price, ProductRecord};
use edgecard_coordinator::service::{Coordinator, Settings};
use edgecard_protocol::{ControlBody, NodeId, SignedGrant, Sku, SyncUpload, MAX_PAYLOAD};
use edgecard_store::{Store, StoreMetrics};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

async fn stocked(dir: &Path, settings: Settings, keys: &str) -> (Coordinator, Sku, NodeId) {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let c = Coordinator::new(store, key(), settings);
    let sku = Sku::new("game").unwrap();
    let node = NodeId::new("eu-1").unwrap();
    c.add_product(ProductRecord {
        sku: sku.clone(),
        titles: vec![("en".into(), "Game".into())],
        prices: vec![Price { amount_minor: 1000, currency: "USD".into() }],
        topup: None,
    })
    .await
    .unwrap();
    c.import_keys(&sku, keys, KeyFormat::Lines, true).await.unwrap();
    c.add_node(&node, "eu").await.unwrap();
    (c, sku, node)
}

fn grants(control: &[edgecard_protocol::ControlMessage]) -> Vec<&[u8]> {
    control
        .iter()
        .filter_map(|m| match &m.body {
            ControlBody::Grant { signed_grant } => Some(signed_grant.as_slice()),
            _ => None,
        })
        .collect()
}

/// 33,000 keys of 500 bytes: one grant of them would be 16.6 MB, over the 16 MiB envelope.
#[tokio::test]
async fn a_large_allocation_becomes_slices_whose_grants_fit_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let keys: String = (0..33_000).map(|i| format!("{i:05}{}\n", "K".repeat(495))).collect();
    let (c, sku, node) = stocked(dir.path(), Settings::default(), &keys).await;
    let slices = c.allocate(&sku, &node, 33_000).await.unwrap();
    assert!(slices.len() >= 2, "one slice of 16.6 MB of keys");
    assert_eq!(slices.iter().map(|s| s.key_count()).sum::<u64>(), 33_000);

    let pending = c.pending_control(&node).unwrap();
    let signed = grants(&pending);
    assert_eq!(signed.len(), slices.len());
    let mut granted = BTreeSet::new();
    for bytes in signed {
        assert!(bytes.len() <= MAX_PAYLOAD, "a grant of {} bytes", bytes.len());
        let grant = SignedGrant::from_bytes(bytes).unwrap().verify(&key().verifying_key(), &node).unwrap();
        for k in grant.keys {
            assert!(granted.insert(k.key_id), "key {} granted twice", k.key_id);
        }
    }
    assert_eq!(granted.len(), 33_000);
}

/// A node that was away has many grants queued: each ack carries what fits its budget, and
/// successive syncs deliver all of them, in order.
#[tokio::test]
async fn acks_stay_within_their_budget_and_deliver_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { max_grant_bytes: 2_000, max_ack_bytes: 5_000, ..Settings::default() };
    let keys: String = (0..300).map(|i| format!("GAME-KEY-{i:011}\n")).collect();
    let (c, sku, node) = stocked(dir.path(), settings, &keys).await;
    let slices = c.allocate(&sku, &node, 300).await.unwrap();
    assert!(slices.len() >= 5, "{} slices", slices.len());

    let mut applied = 0;
    let mut seqs = Vec::new();
    let mut granted = BTreeSet::new();
    for _ in 0..100 {
        let upload = SyncUpload {
            node_id: node.clone(),
            incarnation: 1,
            newest_seq: 0,
            events: vec![],
            control_applied: applied,
            stock: vec![],
            refused_control: vec![],
            lookups: vec![],
        };
        let ack = c.ingest(&node, upload).await.unwrap();
        let Some(last) = ack.control.last() else { break };
        let sizes: usize = grants(&ack.control).iter().map(|g| g.len() + 1).sum();
        assert!(ack.control.len() == 1 || sizes <= 5_000, "an ack of {sizes} bytes of grants");
        applied = last.seq;
        seqs.extend(ack.control.iter().map(|m| m.seq));
        for bytes in grants(&ack.control) {
            let grant = SignedGrant::from_bytes(bytes).unwrap().verify(&key().verifying_key(), &node).unwrap();
            granted.extend(grant.keys.iter().map(|k| k.key_id));
        }
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every queued message, once, in order");
    assert_eq!(granted.len(), 300);
}
