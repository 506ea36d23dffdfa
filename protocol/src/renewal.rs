//! Signed lease renewals: the coordinator extends a node's lease on a slice it already holds.
//!
//! A renewal extends authority (the node may sell for longer), so it is signed with the same
//! coordinator key as grants, under its own domain tag: a renewal signature can never pass as a
//! grant signature or the other way round. It carries no keys, so renewing a large slice is cheap
//! and a renewal never races with a shrink over the slice's key set.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::envelope::{self, MessageKind};
use crate::grant::GrantError;
use crate::ids::{Epoch, NodeId, SliceId, UnixMillis};

/// Domain separation tag prepended to the signed bytes of a renewal.
pub const RENEWAL_SIGNATURE_DOMAIN: &[u8] = b"edgecard/lease-renewal/v1\0";

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LeaseRenewal {
    pub slice_id: SliceId,
    pub node_id: NodeId,
    /// The slice's epoch this renewal is for; a node holding another epoch ignores it.
    pub epoch: Epoch,
    pub issued_at: UnixMillis,
    pub lease_deadline: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SignedRenewal {
    /// An envelope of kind `LeaseRenewal`.
    pub renewal_bytes: Vec<u8>,
    pub signature: [u8; 64],
}

fn signed_message(bytes: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(RENEWAL_SIGNATURE_DOMAIN.len() + bytes.len());
    msg.extend_from_slice(RENEWAL_SIGNATURE_DOMAIN);
    msg.extend_from_slice(bytes);
    msg
}

impl LeaseRenewal {
    pub fn validate(&self) -> Result<(), GrantError> {
        self.node_id.validate().map_err(|e| GrantError::Invalid(e.to_string()))?;
        if self.lease_deadline <= self.issued_at {
            return Err(GrantError::Invalid(format!(
                "lease deadline {} is not after issue time {}",
                self.lease_deadline, self.issued_at
            )));
        }
        Ok(())
    }

    pub fn sign(&self, key: &SigningKey) -> Result<SignedRenewal, GrantError> {
        self.validate()?;
        let renewal_bytes = envelope::encode(MessageKind::LeaseRenewal, self)?;
        let signature = key.sign(&signed_message(&renewal_bytes)).to_bytes();
        Ok(SignedRenewal { renewal_bytes, signature })
    }
}

impl SignedRenewal {
    pub fn to_bytes(&self) -> Result<Vec<u8>, GrantError> {
        Ok(envelope::encode(MessageKind::SignedRenewal, self)?)
    }

    /// Parses the outer envelope only; untrusted until [`SignedRenewal::verify`] succeeds.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedRenewal, GrantError> {
        Ok(envelope::decode(MessageKind::SignedRenewal, bytes)?)
    }

    /// Signature first (`verify_strict`), then decode, validate and check the addressee.
    pub fn verify(&self, pinned: &VerifyingKey, expected_node: &NodeId) -> Result<LeaseRenewal, GrantError> {
        let signature = Signature::from_bytes(&self.signature);
        pinned.verify_strict(&signed_message(&self.renewal_bytes), &signature).map_err(|_| GrantError::BadSignature)?;
        let renewal: LeaseRenewal = envelope::decode(MessageKind::LeaseRenewal, &self.renewal_bytes)?;
        renewal.validate()?;
        if &renewal.node_id != expected_node {
            return Err(GrantError::WrongNode { expected: expected_node.clone(), found: renewal.node_id });
        }
        Ok(renewal)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::grant::{GrantedKey, SignedGrant, SliceGrant};
    use crate::ids::{KeyId, Secret, Sku};

    fn renewal() -> LeaseRenewal {
        LeaseRenewal {
            slice_id: SliceId(4),
            node_id: NodeId::new("eu-1").unwrap(),
            epoch: Epoch(2),
            issued_at: UnixMillis(1_000),
            lease_deadline: UnixMillis(90_000),
        }
    }

    #[test]
    fn round_trip_and_addressee() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let wire = renewal().sign(&key).unwrap().to_bytes().unwrap();
        let parsed = SignedRenewal::from_bytes(&wire).unwrap();
        assert_eq!(parsed.verify(&key.verifying_key(), &NodeId::new("eu-1").unwrap()).unwrap(), renewal());
        assert!(matches!(
            parsed.verify(&key.verifying_key(), &NodeId::new("us-1").unwrap()),
            Err(GrantError::WrongNode { .. })
        ));
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(parsed.verify(&other.verifying_key(), &NodeId::new("eu-1").unwrap()), Err(GrantError::BadSignature));
    }

    #[test]
    fn a_later_deadline_under_the_old_signature_is_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut signed = renewal().sign(&key).unwrap();
        let longer = LeaseRenewal { lease_deadline: UnixMillis(9_000_000), ..renewal() };
        signed.renewal_bytes = envelope::encode(MessageKind::LeaseRenewal, &longer).unwrap();
        assert_eq!(signed.verify(&key.verifying_key(), &NodeId::new("eu-1").unwrap()), Err(GrantError::BadSignature));
    }

    #[test]
    fn a_grant_signature_does_not_verify_as_a_renewal() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let grant = SliceGrant {
            slice_id: SliceId(4),
            sku: Sku::new("gold").unwrap(),
            node_id: NodeId::new("eu-1").unwrap(),
            epoch: Epoch(2),
            issued_at: UnixMillis(1_000),
            lease_deadline: UnixMillis(90_000),
            take_window: 10,
            keys: vec![GrantedKey { key_id: KeyId(1), secret: Secret::new("AAAA-1".into()).unwrap() }],
        };
        let signed: SignedGrant = grant.sign(&key).unwrap();
        let forged = SignedRenewal { renewal_bytes: signed.grant_bytes, signature: signed.signature };
        assert!(forged.verify(&key.verifying_key(), &NodeId::new("eu-1").unwrap()).is_err());
    }
}
