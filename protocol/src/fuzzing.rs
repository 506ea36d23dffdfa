//! Fuzz harnesses for this crate's decoders. Edgecard itself never calls them: they exist so
//! that the cargo-fuzz targets in `fuzz/` and the stable replay of their corpora
//! (`tests/fuzz_corpora.rs`) run the very same checks.
//!
//! Each harness takes any bytes. It must not panic on them; it does panic (asserts) when a
//! property that must hold for every input is broken, which the fuzzer reports as a crash.

use ed25519_dalek::{Signer, SigningKey};

use crate::envelope::{self, Decodable, EnvelopeError, MessageKind};
use crate::event::OrderEventBatch;
use crate::grant::{GrantError, SignedGrant, SliceGrant, GRANT_SIGNATURE_DOMAIN};
use crate::ids::NodeId;
use crate::renewal::{LeaseRenewal, SignedRenewal};
use crate::sync::{ControlBody, SyncAck, SyncClient, SyncTiming, SyncUpload, MAX_REFUSED_CONTROL, MAX_UPLOAD_EVENTS};

/// The node the grant and ack harnesses verify for; seeds are addressed to it.
pub const NODE: &str = "eu-1";

/// The coordinator key the harnesses pin; seeds are signed with it. Public, fixed, for fuzzing
/// only.
pub fn coordinator_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5e; 32])
}

fn node() -> NodeId {
    NodeId::new(NODE).unwrap_or_else(|e| panic!("fuzzing node id: {e}"))
}

/// `data` as an envelope of each message kind: whatever decodes must encode back to exactly
/// `data` (one value, one byte string) and decode again to the same value; the header peek
/// agrees with the decoders; the validating decoders accept only what the plain decoder does.
pub fn envelope(data: &[u8]) {
    let peeked = envelope::peek_kind(data);
    let mut decoded = 0;
    decoded += usize::from(round_trip::<SliceGrant>(MessageKind::SliceGrant, data, &peeked));
    decoded += usize::from(round_trip::<SignedGrant>(MessageKind::SignedGrant, data, &peeked));
    decoded += usize::from(round_trip::<OrderEventBatch>(MessageKind::OrderEventBatch, data, &peeked));
    decoded += usize::from(round_trip::<SyncUpload>(MessageKind::SyncUpload, data, &peeked));
    decoded += usize::from(round_trip::<SyncAck>(MessageKind::SyncAck, data, &peeked));
    decoded += usize::from(round_trip::<LeaseRenewal>(MessageKind::LeaseRenewal, data, &peeked));
    decoded += usize::from(round_trip::<SignedRenewal>(MessageKind::SignedRenewal, data, &peeked));
    assert!(decoded <= 1, "one frame decoded as {decoded} kinds");

    if let Ok(batch) = OrderEventBatch::from_bytes(data) {
        assert_eq!(batch.to_bytes().as_deref(), Ok(data), "a valid event batch encodes back to its bytes");
    }
    if let Ok(signed) = SignedRenewal::from_bytes(data) {
        assert_eq!(signed.to_bytes().as_deref(), Ok(data));
        if let Ok(renewal) = signed.verify(&coordinator_key().verifying_key(), &node()) {
            assert!(renewal.validate().is_ok(), "a verified renewal is valid");
            assert_eq!(renewal.node_id, node());
        }
    }
}

/// Decodes `data` as a `T` of `kind`; true when it did, after checking the round trip.
fn round_trip<T: Decodable + PartialEq>(
    kind: MessageKind,
    data: &[u8],
    peeked: &Result<MessageKind, EnvelopeError>,
) -> bool {
    let value = match envelope::decode::<T>(kind, data) {
        Ok(value) => value,
        Err(EnvelopeError::WrongKind { expected, found }) => {
            assert_eq!(expected, kind);
            assert_eq!(peeked, &Ok(found), "decode and peek_kind read the same kind");
            return false;
        }
        Err(_) => return false,
    };
    assert_eq!(peeked, &Ok(kind), "a decoded frame peeks as its kind");
    let again = envelope::encode(kind, &value).unwrap_or_else(|e| panic!("a decoded {kind} does not encode: {e}"));
    assert!(again == data, "decode → encode of a {kind} changed the bytes");
    let back = envelope::decode::<T>(kind, &again).unwrap_or_else(|e| panic!("re-encoded {kind} refused: {e}"));
    assert!(back == value, "decode → encode → decode of a {kind} changed the value");
    true
}

/// Signed-grant verification, two ways.
///
/// `data` as a `SignedGrant` off the wire: a grant that verifies is valid, addressed to this
/// node, re-verifies to the same grant, is the canonical encoding of its bytes, and is refused
/// for another node and with any flipped signature bit.
///
/// `data` as the grant bytes under a genuine signature (so the fuzzer reaches the grant decoder
/// behind the signature check): the verdict is exactly what decoding and validating say, never
/// `BadSignature`; and the signed grant survives its own envelope.
pub fn grant(data: &[u8]) {
    let key = coordinator_key();
    let pinned = key.verifying_key();
    let node = node();

    if let Ok(signed) = SignedGrant::from_bytes(data) {
        if let Ok(grant) = signed.verify(&pinned, &node) {
            check_verified_grant(&signed, &grant, &key);
        }
    }

    let mut message = GRANT_SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(data);
    let signed = SignedGrant { grant_bytes: data.to_vec(), signature: key.sign(&message).to_bytes() };
    let plain = envelope::decode::<SliceGrant>(MessageKind::SliceGrant, data);
    match signed.verify(&pinned, &node) {
        Ok(grant) => {
            assert!(plain.as_ref().ok() == Some(&grant), "verify returned another grant than the bytes hold");
            check_verified_grant(&signed, &grant, &key);
        }
        Err(GrantError::BadSignature) => panic!("a genuine signature was refused"),
        Err(GrantError::Malformed(_)) => assert!(plain.is_err(), "verify called decodable bytes malformed"),
        Err(GrantError::Invalid(_)) => {
            let grant = plain.unwrap_or_else(|e| panic!("invalid, yet it does not decode: {e}"));
            assert!(grant.validate().is_err(), "verify called a valid grant invalid");
        }
        Err(GrantError::WrongNode { found, .. }) => {
            let grant = plain.unwrap_or_else(|e| panic!("wrong node, yet it does not decode: {e}"));
            assert!(grant.validate().is_ok());
            assert_eq!(grant.node_id, found);
            assert_ne!(found, node);
        }
    }
    if let Ok(wire) = signed.to_bytes() {
        assert!(SignedGrant::from_bytes(&wire).ok() == Some(signed), "a signed grant does not survive its envelope");
    }
}

fn check_verified_grant(signed: &SignedGrant, grant: &SliceGrant, key: &SigningKey) {
    let pinned = key.verifying_key();
    let node = node();
    assert!(grant.validate().is_ok(), "a verified grant is valid");
    assert_eq!(grant.node_id, node, "a verified grant is addressed to this node");
    assert!(signed.verify(&pinned, &node).ok().as_ref() == Some(grant), "a verified grant re-verifies");
    assert!(grant.to_bytes().ok().as_ref() == Some(&signed.grant_bytes), "the signed bytes are canonical");
    let other = NodeId::new("fuzz-other").unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(signed.verify(&pinned, &other), Err(GrantError::WrongNode { .. })));
    let mut forged = signed.clone();
    forged.signature[0] ^= 1;
    assert_eq!(forged.verify(&pinned, &node), Err(GrantError::BadSignature), "a flipped signature bit verifies");
    let resigned = grant.sign(key).unwrap_or_else(|e| panic!("a verified grant cannot be signed again: {e}"));
    assert!(resigned.verify(&pinned, &node).ok().as_ref() == Some(grant));
}

/// `SyncUpload::from_bytes`: what it accepts encodes back to exactly `data`, decodes again to
/// the same upload, and satisfies every rule the coordinator relies on.
pub fn sync_upload(data: &[u8]) {
    let plain = envelope::decode::<SyncUpload>(MessageKind::SyncUpload, data);
    let Ok(upload) = SyncUpload::from_bytes(data) else { return };
    assert!(plain.as_ref().ok() == Some(&upload), "the validating decoder returned another value");
    assert_eq!(upload.to_bytes().as_deref(), Ok(data), "decode → encode changed the bytes");
    assert_eq!(SyncUpload::from_bytes(data).as_ref(), Ok(&upload));
    assert!(upload.node_id.validate().is_ok());
    assert!(upload.events.len() <= MAX_UPLOAD_EVENTS);
    assert!(upload.events.iter().all(|e| e.node_id == upload.node_id && e.validate().is_ok()));
    assert!(upload.events.windows(2).all(|w| w[0].seq < w[1].seq), "event seqs increase");
    assert!(upload.events.first().is_none_or(|e| e.seq > 0), "seq 0 is never an event");
    assert!(upload.stock.iter().all(|s| s.sku.validate().is_ok()));
    assert!(upload.refused_control.len() <= MAX_REFUSED_CONTROL);
    assert!(upload.refused_control.iter().all(|r| r.seq <= upload.control_applied));
    assert!(upload.lookups.len() <= crate::sync::MAX_UPLOAD_LOOKUPS);
    assert!(upload.lookups.iter().all(|l| crate::sync::valid_lookup(&l.email, &l.lang)));
}

/// `SyncAck::from_bytes`: the round trip and the ack's rules, then the ack through the node's
/// side as the sync link drives it: the sans-IO client (with an upload in flight that covers
/// the ack), and every grant and renewal it carries through verification.
pub fn sync_ack(data: &[u8]) {
    let plain = envelope::decode::<SyncAck>(MessageKind::SyncAck, data);
    let Ok(ack) = SyncAck::from_bytes(data) else { return };
    assert!(plain.as_ref().ok() == Some(&ack), "the validating decoder returned another value");
    assert_eq!(ack.to_bytes().as_deref(), Ok(data), "decode → encode changed the bytes");
    assert!(ack.control.windows(2).all(|w| w[0].seq < w[1].seq), "control seqs increase");
    assert!(ack.restore.windows(2).all(|w| w[0].seq.checked_add(1) == Some(w[1].seq)), "restore is contiguous");
    assert!(ack.restore.iter().all(|e| e.seq <= ack.ledger_high_water && e.validate().is_ok()));

    // A fresh client uploads the outbox up to the ack's mark, at most `batch_limit` events of it;
    // an ack past what it sent is refused, any other is taken.
    let mut client = SyncClient::new(SyncTiming::default(), 0, 0, 1);
    let limit = client.batch_limit() as u64;
    match client.poll_upload(0, ack.events_high_water) {
        Some(plan) => assert_eq!(plan.after_seq, 0),
        None => panic!("an idle client with pending events did not upload"),
    }
    match client.handle_ack(0, &ack) {
        Ok(outcome) => {
            assert!(ack.events_high_water <= limit, "an ack past the upload was taken");
            assert_eq!(outcome.prune_through, ack.events_high_water);
            assert_eq!(client.acked(), outcome.prune_through);
            assert!(outcome.control.iter().all(|m| m.seq > 0));
            assert!(outcome.restore == ack.restore);
        }
        Err(_) => assert!(ack.events_high_water > limit, "an ack within the upload was refused"),
    }

    let key = coordinator_key().verifying_key();
    let node = node();
    for message in &ack.control {
        match &message.body {
            ControlBody::Grant { signed_grant } => {
                if let Ok(grant) = SignedGrant::from_bytes(signed_grant).and_then(|s| s.verify(&key, &node)) {
                    assert!(grant.validate().is_ok());
                }
            }
            ControlBody::Renew { signed_renewal } => {
                if let Ok(renewal) = SignedRenewal::from_bytes(signed_renewal).and_then(|s| s.verify(&key, &node)) {
                    assert!(renewal.validate().is_ok());
                }
            }
            ControlBody::Catalog { products } => assert!(products.iter().all(|p| p.sku.validate().is_ok())),
            ControlBody::Shrink { sku, .. } => assert!(sku.validate().is_ok()),
            ControlBody::Refund { reason, .. } => assert!(crate::sync::valid_refund_reason(reason)),
            ControlBody::FindOrders { lookup } => assert!(crate::sync::valid_lookup(&lookup.email, &lookup.lang)),
        }
    }
}
