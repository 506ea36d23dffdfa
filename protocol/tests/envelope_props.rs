//! Property tests for the envelope: decoding arbitrary bytes never panics,
//! and a frame decodes to the value it was made from or to an error.
#![allow(clippy::unwrap_used)]

use edgecard_protocol::{
    decode, encode, peek_kind, EnvelopeError, KeyId, MessageKind, NodeId, OrderEvent, OrderEventBatch, OrderEventKind,
    OrderId, SignedGrant, Sku, SliceGrant, UnixMillis,
};
use proptest::prelude::*;

fn event_kind() -> impl Strategy<Value = OrderEventKind> {
    let ids =
        prop::collection::btree_set(any::<u64>(), 0..8).prop_map(|s| s.into_iter().map(KeyId).collect::<Vec<_>>());
    prop_oneof![
        (ids.clone(), any::<u64>(), "[A-Z]{3}", any::<u64>()).prop_map(|(key_ids, amount_minor, currency, exp)| {
            OrderEventKind::Reserved {
                quantity: key_ids.len().max(1) as u32,
                key_ids,
                amount_minor,
                currency,
                expires_at: UnixMillis(exp),
                token_sha256: String::new(),
            }
        }),
        ("[a-z]{1,12}", "[ -~]{1,40}", any::<u64>(), "[A-Z]{3}").prop_map(
            |(channel, provider_txn, amount_minor, currency)| OrderEventKind::Paid {
                channel,
                provider_txn,
                amount_minor,
                currency,
            }
        ),
        ids.clone()
            .prop_filter("non-empty", |k| !k.is_empty())
            .prop_map(|key_ids| OrderEventKind::Delivered { key_ids }),
        ids.prop_map(|key_ids| OrderEventKind::Expired { key_ids }),
        (1..1000u32).prop_map(|quantity| OrderEventKind::AwaitingStock { quantity }),
    ]
}

fn batch() -> impl Strategy<Value = OrderEventBatch> {
    (
        "[a-z0-9][a-z0-9-]{0,31}",
        prop::collection::vec(
            (1..1000u64, any::<u64>(), any::<[u8; 16]>(), "[A-Za-z0-9._-]{1,64}", event_kind()),
            0..8,
        ),
    )
        .prop_map(|(node, evs)| {
            let node_id = NodeId::new(node).unwrap();
            let mut seq = 0;
            let events = evs
                .into_iter()
                .map(|(step, at, id, sku, kind)| {
                    seq += step;
                    OrderEvent {
                        node_id: node_id.clone(),
                        seq,
                        at: UnixMillis(at),
                        order_id: OrderId::from_bytes(id),
                        sku: Sku::new(sku).unwrap(),
                        kind,
                    }
                })
                .collect();
            OrderEventBatch { node_id, events }
        })
}

fn frame_with_header(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"EDGC\x01".to_vec();
    bytes.push(kind);
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batch_round_trip(b in batch()) {
        let bytes = b.to_bytes().unwrap();
        prop_assert_eq!(peek_kind(&bytes).unwrap(), MessageKind::OrderEventBatch);
        prop_assert_eq!(OrderEventBatch::from_bytes(&bytes).unwrap(), b.clone());
        let raw: OrderEventBatch = decode(MessageKind::OrderEventBatch, &bytes).unwrap();
        prop_assert_eq!(raw, b.clone());
        let json = serde_json::to_string(&b).unwrap();
        prop_assert_eq!(serde_json::from_str::<OrderEventBatch>(&json).unwrap(), b);
    }

    #[test]
    fn generic_round_trip(v in prop::collection::vec(any::<(u64, String)>(), 0..16)) {
        let bytes = encode(MessageKind::SliceGrant, &v).unwrap();
        prop_assert_eq!(decode::<Vec<(u64, String)>>(MessageKind::SliceGrant, &bytes).unwrap(), v);
        let wrong = decode::<Vec<(u64, String)>>(MessageKind::SignedGrant, &bytes);
        let is_wrong_kind = matches!(wrong, Err(EnvelopeError::WrongKind { .. }));
        prop_assert!(is_wrong_kind);
    }

    /// A flipped bit may turn one valid batch into another (a seq or an
    /// amount), but it can never decode back to the original: one value,
    /// one encoding.
    #[test]
    fn bit_flip_never_yields_the_original(b in batch(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = b.to_bytes().unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(other) = OrderEventBatch::from_bytes(&bytes) {
            prop_assert_ne!(other, b);
        }
    }

    #[test]
    fn truncation_is_refused(b in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = b.to_bytes().unwrap();
        let n = cut.index(bytes.len());
        let err = OrderEventBatch::from_bytes(&bytes[..n]);
        prop_assert!(err.is_err());
        prop_assert!(decode::<OrderEventBatch>(MessageKind::OrderEventBatch, &bytes[..n]).is_err());
    }

    #[test]
    fn trailing_garbage_is_refused(b in batch(), junk in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut bytes = b.to_bytes().unwrap();
        let n = bytes.len();
        bytes.extend_from_slice(&junk);
        prop_assert_eq!(
            decode::<OrderEventBatch>(MessageKind::OrderEventBatch, &bytes),
            Err(EnvelopeError::TrailingBytes { expected: n, found: n + junk.len() })
        );
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let peeked = peek_kind(&bytes);
        let batch = OrderEventBatch::from_bytes(&bytes);
        let signed = SignedGrant::from_bytes(&bytes);
        let grant = decode::<SliceGrant>(MessageKind::SliceGrant, &bytes);
        if !bytes.starts_with(b"EDGC") {
            prop_assert!(peeked.is_err() && batch.is_err() && signed.is_err() && grant.is_err());
        }
    }

    /// Past the header checks, so the rkyv validator itself sees the junk.
    #[test]
    fn random_payloads_never_panic(kind in 1u8..=3, payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let bytes = frame_with_header(kind, &payload);
        prop_assert_eq!(peek_kind(&bytes).unwrap() as u8, kind);
        let _ = OrderEventBatch::from_bytes(&bytes);
        let _ = SignedGrant::from_bytes(&bytes);
        let _ = decode::<SliceGrant>(MessageKind::SliceGrant, &bytes);
    }
}
