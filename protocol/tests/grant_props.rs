//! Property tests for signed grants: whatever happens to the bytes on the
//! way, a node either gets back exactly the grant that was signed for it or
//! an error, never a panic and never a different grant.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use edgecard_protocol::{Epoch, GrantedKey, KeyId, NodeId, Secret, SignedGrant, Sku, SliceGrant, SliceId, UnixMillis};
use proptest::prelude::*;

fn node_id() -> impl Strategy<Value = NodeId> {
    "[a-z0-9][a-z0-9-]{0,31}".prop_map(|s| NodeId::new(s).unwrap())
}

fn sku() -> impl Strategy<Value = Sku> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| Sku::new(s).unwrap())
}

fn secret() -> impl Strategy<Value = Secret> {
    "[^\\p{Cc}]{1,40}".prop_map(|s| Secret::new(s).unwrap())
}

fn grant() -> impl Strategy<Value = SliceGrant> {
    (
        any::<u64>(),
        sku(),
        node_id(),
        any::<u64>(),
        0..u64::MAX - 1,
        1..1_000_000_000u64,
        prop::collection::btree_map(any::<u64>(), secret(), 1..12),
    )
        .prop_map(|(slice, sku, node_id, epoch, issued, ttl, keys)| {
            let keys: BTreeMap<u64, Secret> = keys;
            SliceGrant {
                slice_id: SliceId(slice),
                sku,
                node_id,
                epoch: Epoch(epoch),
                issued_at: UnixMillis(issued),
                lease_deadline: UnixMillis(issued).saturating_add_ms(ttl),
                take_window: 1_000_000,
                keys: keys.into_iter().map(|(id, secret)| GrantedKey { key_id: KeyId(id), secret }).collect(),
            }
        })
        .prop_filter("deadline after issue", |g| g.lease_deadline > g.issued_at)
}

fn coordinator_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn wire(g: &SliceGrant) -> Vec<u8> {
    g.sign(&coordinator_key()).unwrap().to_bytes().unwrap()
}

fn receive(bytes: &[u8], node: &NodeId) -> Result<SliceGrant, String> {
    SignedGrant::from_bytes(bytes)
        .and_then(|s| s.verify(&coordinator_key().verifying_key(), node))
        .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(g in grant()) {
        let bytes = wire(&g);
        prop_assert_eq!(receive(&bytes, &g.node_id).unwrap(), g.clone());
        let json = serde_json::to_string(&g).unwrap();
        prop_assert_eq!(serde_json::from_str::<SliceGrant>(&json).unwrap(), g);
    }

    #[test]
    fn any_single_bit_flip_is_refused(g in grant(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = wire(&g);
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(receive(&bytes, &g.node_id).is_err(), "flip at byte {} bit {} accepted", i, bit);
    }

    #[test]
    fn any_truncation_is_refused(g in grant(), cut in any::<prop::sample::Index>()) {
        let bytes = wire(&g);
        let n = cut.index(bytes.len());
        prop_assert!(receive(&bytes[..n], &g.node_id).is_err());
    }

    #[test]
    fn any_trailing_garbage_is_refused(g in grant(), junk in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut bytes = wire(&g);
        bytes.extend_from_slice(&junk);
        prop_assert!(receive(&bytes, &g.node_id).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let node = NodeId::new("eu-1").unwrap();
        prop_assert!(receive(&bytes, &node).is_err());
    }

    #[test]
    fn random_payload_behind_a_valid_header_never_verifies(
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"EDGC\x01\x02\x00\x00".to_vec();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let node = NodeId::new("eu-1").unwrap();
        prop_assert!(receive(&bytes, &node).is_err());
    }

    #[test]
    fn other_node_never_accepts(g in grant(), other in node_id()) {
        prop_assume!(other != g.node_id);
        let err = receive(&wire(&g), &other).unwrap_err();
        prop_assert!(err.contains("this is node"), "{}", err);
    }
}

/// The proptest above samples bit flips; for one small grant, try them all.
#[test]
fn every_bit_flip_of_a_small_grant_is_refused() {
    let g = SliceGrant {
        slice_id: SliceId(1),
        sku: Sku::new("s").unwrap(),
        node_id: NodeId::new("eu-1").unwrap(),
        epoch: Epoch(1),
        issued_at: UnixMillis(10),
        lease_deadline: UnixMillis(20),
        take_window: 1_000_000,
        keys: vec![GrantedKey { key_id: KeyId(1), secret: Secret::new("k".into()).unwrap() }],
    };
    let bytes = wire(&g);
    assert_eq!(receive(&bytes, &g.node_id).unwrap(), g);
    let mut tried = 0;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(receive(&b, &g.node_id).is_err(), "flip at byte {i} bit {bit} accepted");
            tried += 1;
        }
    }
    assert_eq!(tried, bytes.len() * 8);
}
