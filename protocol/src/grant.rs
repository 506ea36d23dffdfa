//! Signed slice grants: the coordinator's authority for a node to sell keys.
//!
//! A node sells only keys it holds under a grant signed by the coordinator
//! key it pins, so the signature is checked before a single byte of the
//! grant is interpreted, and the grant is then checked for internal
//! consistency and for being addressed to this node.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::envelope::{self, EnvelopeError, MessageKind};
use crate::ids::{Epoch, KeyId, NodeId, Secret, Sku, SliceId, UnixMillis};

/// Domain separation tag prepended to the signed bytes, so a signature made
/// for a grant can never be replayed as a signature over some other message
/// signed with the same key.
pub const GRANT_SIGNATURE_DOMAIN: &[u8] = b"edgecard/slice-grant/v1\0";

/// Most keys one grant may carry; bounds what a single grant can make a node
/// allocate and install.
pub const MAX_GRANT_KEYS: usize = 1_000_000;

#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct GrantedKey {
    pub key_id: KeyId,
    pub secret: Secret,
}

#[derive(
    Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct SliceGrant {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub node_id: NodeId,
    pub epoch: Epoch,
    pub issued_at: UnixMillis,
    pub lease_deadline: UnixMillis,
    /// Most keys the node may take from this slice that the coordinator has not acknowledged.
    /// The coordinator relies on it to reclaim a dark node's keys: past the lowest
    /// `take_window` unsold keys, nothing can have been touched.
    pub take_window: u64,
    /// Sorted by strictly ascending key id.
    pub keys: Vec<GrantedKey>,
}

impl fmt::Debug for SliceGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SliceGrant")
            .field("slice_id", &self.slice_id)
            .field("sku", &self.sku)
            .field("node_id", &self.node_id)
            .field("epoch", &self.epoch)
            .field("issued_at", &self.issued_at)
            .field("lease_deadline", &self.lease_deadline)
            .field("take_window", &self.take_window)
            .field("keys", &format_args!("[{} keys]", self.keys.len()))
            .finish()
    }
}

/// Why a grant was refused. No variant carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("grant signature does not verify against the pinned coordinator key")]
    BadSignature,
    #[error("grant is for node {found}, this is node {expected}")]
    WrongNode { expected: NodeId, found: NodeId },
    #[error("malformed grant: {0}")]
    Malformed(#[from] EnvelopeError),
    #[error("invalid grant: {0}")]
    Invalid(String),
}

fn signed_message(grant_bytes: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(GRANT_SIGNATURE_DOMAIN.len() + grant_bytes.len());
    msg.extend_from_slice(GRANT_SIGNATURE_DOMAIN);
    msg.extend_from_slice(grant_bytes);
    msg
}

impl SliceGrant {
    /// Checks everything a grant must satisfy beyond its signature. Sorted,
    /// unique key ids let the receiver detect a key granted twice in one
    /// slice without building a set.
    pub fn validate(&self) -> Result<(), GrantError> {
        let invalid = |m: String| GrantError::Invalid(m);
        self.sku.validate().map_err(|e| invalid(e.to_string()))?;
        self.node_id.validate().map_err(|e| invalid(e.to_string()))?;
        if self.keys.is_empty() {
            return Err(invalid("grant carries no keys".into()));
        }
        if self.keys.len() > MAX_GRANT_KEYS {
            return Err(invalid(format!("grant carries {} keys (max {MAX_GRANT_KEYS})", self.keys.len())));
        }
        if self.take_window == 0 {
            return Err(invalid("take window is 0".into()));
        }
        if self.lease_deadline <= self.issued_at {
            return Err(invalid(format!(
                "lease deadline {} is not after issue time {}",
                self.lease_deadline, self.issued_at
            )));
        }
        let mut prev: Option<KeyId> = None;
        for (i, k) in self.keys.iter().enumerate() {
            if let Some(p) = prev {
                if k.key_id <= p {
                    return Err(invalid(format!(
                        "key ids not strictly ascending: key id {} at index {i} follows {p}",
                        k.key_id
                    )));
                }
            }
            prev = Some(k.key_id);
            k.secret.validate().map_err(|e| invalid(format!("key id {}: {e}", k.key_id)))?;
        }
        Ok(())
    }

    /// Encodes the grant as an envelope of kind `SliceGrant`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GrantError> {
        Ok(envelope::encode(MessageKind::SliceGrant, self)?)
    }

    /// Validates, encodes and signs `GRANT_SIGNATURE_DOMAIN || grant_bytes`.
    /// Validating first means the coordinator cannot issue a grant that every
    /// node would refuse.
    pub fn sign(&self, key: &SigningKey) -> Result<SignedGrant, GrantError> {
        self.validate()?;
        let grant_bytes = self.to_bytes()?;
        let signature = key.sign(&signed_message(&grant_bytes)).to_bytes();
        Ok(SignedGrant { grant_bytes, signature })
    }
}

/// A grant as it travels and is stored: the exact bytes that were signed,
/// plus the signature. Keeping the signed bytes (rather than re-encoding a
/// decoded grant) lets a node re-verify a stored grant at any time.
#[derive(Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SignedGrant {
    /// An envelope of kind `SliceGrant`.
    pub grant_bytes: Vec<u8>,
    pub signature: [u8; 64],
}

impl fmt::Debug for SignedGrant {
    // The grant bytes contain the secrets in clear; never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedGrant")
            .field("grant_bytes", &format_args!("[{} bytes]", self.grant_bytes.len()))
            .field("signature", &format_args!("{}", hex::encode(self.signature)))
            .finish()
    }
}

impl SignedGrant {
    /// Encodes as an envelope of kind `SignedGrant`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GrantError> {
        Ok(envelope::encode(MessageKind::SignedGrant, self)?)
    }

    /// Parses the outer envelope only; the result is untrusted until
    /// [`SignedGrant::verify`] succeeds.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedGrant, GrantError> {
        Ok(envelope::decode(MessageKind::SignedGrant, bytes)?)
    }

    /// Verifies the signature against the pinned coordinator key, then
    /// decodes and validates the grant and checks it is addressed to
    /// `expected_node`.
    ///
    /// The signature comes first so that unauthenticated bytes never reach
    /// the rkyv decoder. `verify_strict` refuses weak keys and malleable
    /// signatures.
    pub fn verify(&self, pinned: &VerifyingKey, expected_node: &NodeId) -> Result<SliceGrant, GrantError> {
        let signature = Signature::from_bytes(&self.signature);
        pinned.verify_strict(&signed_message(&self.grant_bytes), &signature).map_err(|_| GrantError::BadSignature)?;
        let grant: SliceGrant = envelope::decode(MessageKind::SliceGrant, &self.grant_bytes)?;
        grant.validate()?;
        if &grant.node_id != expected_node {
            return Err(GrantError::WrongNode { expected: expected_node.clone(), found: grant.node_id });
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn gk(id: u64, secret: &str) -> GrantedKey {
        GrantedKey { key_id: KeyId(id), secret: Secret::new(secret.to_string()).unwrap() }
    }

    fn grant() -> SliceGrant {
        SliceGrant {
            slice_id: SliceId(9),
            sku: Sku::new("game-gold").unwrap(),
            node_id: node("eu-1"),
            epoch: Epoch(3),
            issued_at: UnixMillis(1_000),
            lease_deadline: UnixMillis(61_000),
            take_window: 100,
            keys: vec![gk(1, "AAAA-1111"), gk(2, "BBBB-2222"), gk(5, "CCCC-5555")],
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key(1);
        let signed = grant().sign(&k).unwrap();
        let wire = signed.to_bytes().unwrap();
        let back = SignedGrant::from_bytes(&wire).unwrap();
        assert_eq!(back, signed);
        let g = back.verify(&k.verifying_key(), &node("eu-1")).unwrap();
        assert_eq!(g, grant());
    }

    #[test]
    fn other_key_is_bad_signature() {
        let signed = grant().sign(&key(1)).unwrap();
        assert_eq!(signed.verify(&key(2).verifying_key(), &node("eu-1")), Err(GrantError::BadSignature));
    }

    #[test]
    fn wrong_node() {
        let k = key(1);
        let signed = grant().sign(&k).unwrap();
        assert_eq!(
            signed.verify(&k.verifying_key(), &node("us-1")),
            Err(GrantError::WrongNode { expected: node("us-1"), found: node("eu-1") })
        );
    }

    #[test]
    fn extra_key_with_old_signature_is_bad_signature() {
        let k = key(1);
        let mut signed = grant().sign(&k).unwrap();
        let mut bigger = grant();
        bigger.keys.push(gk(6, "STOLEN-6666"));
        signed.grant_bytes = bigger.to_bytes().unwrap();
        assert_eq!(signed.verify(&k.verifying_key(), &node("eu-1")), Err(GrantError::BadSignature));
    }

    #[test]
    fn signature_without_domain_tag_is_refused() {
        let k = key(1);
        let grant_bytes = grant().to_bytes().unwrap();
        let signed = SignedGrant { signature: k.sign(&grant_bytes).to_bytes(), grant_bytes };
        assert_eq!(signed.verify(&k.verifying_key(), &node("eu-1")), Err(GrantError::BadSignature));
    }

    /// Signs whatever bytes are given, bypassing `sign`'s validation, to
    /// model a coordinator bug or a compromised encoder.
    fn sign_raw(g: &SliceGrant, k: &SigningKey) -> SignedGrant {
        let grant_bytes = envelope::encode(MessageKind::SliceGrant, g).unwrap();
        let signature = k.sign(&signed_message(&grant_bytes)).to_bytes();
        SignedGrant { grant_bytes, signature }
    }

    #[test]
    fn unsorted_keys_refused_even_when_signed() {
        let k = key(1);
        let mut g = grant();
        g.keys.swap(0, 1);
        assert!(matches!(g.sign(&k), Err(GrantError::Invalid(_))));
        let err = sign_raw(&g, &k).verify(&k.verifying_key(), &node("eu-1")).unwrap_err();
        assert!(matches!(err, GrantError::Invalid(ref m) if m.contains("ascending")), "{err}");
    }

    #[test]
    fn duplicate_keys_refused_even_when_signed() {
        let k = key(1);
        let mut g = grant();
        g.keys[1].key_id = KeyId(1);
        let err = sign_raw(&g, &k).verify(&k.verifying_key(), &node("eu-1")).unwrap_err();
        assert!(matches!(err, GrantError::Invalid(_)));
    }

    /// Same rkyv layout as `SliceGrant`, but with plain strings, so it can
    /// carry contents the id constructors would refuse.
    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct RawKey {
        key_id: u64,
        secret: String,
    }

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct RawGrantKeys {
        slice_id: u64,
        sku: String,
        node_id: String,
        epoch: u64,
        issued_at: u64,
        lease_deadline: u64,
        take_window: u64,
        keys: Vec<RawKey>,
    }

    fn raw(node_id: &str, sku: &str, secret: &str) -> RawGrantKeys {
        RawGrantKeys {
            slice_id: 1,
            sku: sku.into(),
            node_id: node_id.into(),
            epoch: 1,
            issued_at: 1,
            lease_deadline: 2,
            take_window: 1,
            keys: vec![RawKey { key_id: 1, secret: secret.into() }],
        }
    }

    fn sign_raw_struct(g: &RawGrantKeys, k: &SigningKey) -> SignedGrant {
        let grant_bytes = envelope::encode(MessageKind::SliceGrant, g).unwrap();
        let signature = k.sign(&signed_message(&grant_bytes)).to_bytes();
        SignedGrant { grant_bytes, signature }
    }

    #[test]
    fn mirror_layout_matches() {
        // Guards the next test: the mirror must encode exactly like the real
        // type, or it would prove nothing.
        let k = key(1);
        let g =
            sign_raw_struct(&raw("eu-1", "sku", "ok-secret"), &k).verify(&k.verifying_key(), &node("eu-1")).unwrap();
        assert_eq!(g.keys[0].secret.expose(), "ok-secret");
        assert_eq!(g.sku.as_str(), "sku");
    }

    #[test]
    fn invalid_strings_inside_a_signed_grant_are_refused() {
        let k = key(1);
        let cases = [
            ("node id", raw("EU 1", "sku", "s")),
            ("sku", raw("eu-1", "bad sku", "s")),
            ("secret", raw("eu-1", "sku", "line\nbreak SECRETVALUE")),
            ("secret", raw("eu-1", "sku", "")),
        ];
        for (what, g) in cases {
            let signed = sign_raw_struct(&g, &k);
            let err = signed.verify(&k.verifying_key(), &node("eu-1")).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, GrantError::Invalid(_)), "{what}: {msg}");
            assert!(msg.contains(what), "{what}: {msg}");
            assert!(!msg.contains("SECRETVALUE"), "{msg}");
        }
    }

    #[test]
    fn validate_rules() {
        assert!(grant().validate().is_ok());
        let mut g = grant();
        g.keys.clear();
        assert!(matches!(g.validate(), Err(GrantError::Invalid(_))));
        let mut g = grant();
        g.lease_deadline = g.issued_at;
        assert!(matches!(g.validate(), Err(GrantError::Invalid(_))));
        let mut g = grant();
        g.take_window = 0;
        assert!(matches!(g.validate(), Err(GrantError::Invalid(_))));
        let mut g = grant();
        g.keys = (0..=MAX_GRANT_KEYS as u64)
            .map(|i| GrantedKey { key_id: KeyId(i), secret: Secret::new("s".into()).unwrap() })
            .collect();
        let err = g.validate().unwrap_err();
        assert!(err.to_string().contains("max 1000000"), "{err}");
        g.keys.pop();
        assert!(g.validate().is_ok());
    }

    #[test]
    fn debug_and_errors_hide_secrets() {
        let g = grant();
        let signed = g.sign(&key(1)).unwrap();
        let dbg = format!("{g:?} {signed:?} {:?}", g.keys);
        assert!(!dbg.contains("AAAA-1111"), "{dbg}");
        assert!(dbg.contains("[3 keys]"));
        // The raw grant bytes do contain the secret, which is why
        // SignedGrant's Debug must not print them.
        assert!(signed.grant_bytes.windows(9).any(|w| w == b"AAAA-1111"));
    }

    #[test]
    fn from_bytes_rejects_wrong_kind() {
        let bytes = grant().to_bytes().unwrap();
        assert!(matches!(SignedGrant::from_bytes(&bytes), Err(GrantError::Malformed(EnvelopeError::WrongKind { .. }))));
    }

    #[test]
    fn grant_bytes_of_wrong_kind_are_malformed_even_if_signed() {
        let k = key(1);
        let inner = envelope::encode(MessageKind::OrderEventBatch, &grant()).unwrap();
        let signed = SignedGrant { signature: k.sign(&signed_message(&inner)).to_bytes(), grant_bytes: inner };
        assert!(matches!(
            signed.verify(&k.verifying_key(), &node("eu-1")),
            Err(GrantError::Malformed(EnvelopeError::WrongKind { .. }))
        ));
    }

    #[test]
    fn serde_round_trip() {
        let g = grant();
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains("\"AAAA-1111\""));
        let back: SliceGrant = serde_json::from_str(&json).unwrap();
        assert_eq!(back, g);
        let bad = json.replace("AAAA-1111", "AAAA\\n1111");
        assert!(serde_json::from_str::<SliceGrant>(&bad).is_err());
    }
}
