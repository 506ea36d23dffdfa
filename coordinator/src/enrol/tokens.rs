//! Join tokens in the coordinator's store: issued for a registered node, redeemed once.
//!
//! A token is stored under `j/` + the digest of its secret ([`TokenSecret::digest`]); the
//! secret itself is never stored. Redeeming marks the record used in one durable batch before
//! the caller may hand out the certificate, so a token can never enrol twice, across crashes
//! too (a crash after the mark and before the answer costs the operator a new token, never a
//! second identity).

use std::time::Duration;

use edgecard_protocol::{NodeId, UnixMillis};
use edgecard_store::WriteBatch;
use serde::{Deserialize, Serialize};

use super::token::TokenSecret;
use crate::records as rec;
use crate::service::{Coordinator, CoordinatorError};

/// Lifetime of a join token unless the operator asks for another.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime a join token may be given.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinTokenRecord {
    /// The node the token enrols; the certificate names this node whatever the request says.
    pub node_id: NodeId,
    pub region: String,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// When it was redeemed, and the SHA-256 of the certificate it was redeemed for.
    pub used: Option<(UnixMillis, [u8; 32])>,
}

/// Why a token cannot be redeemed. The messages are for the node's operator; none contains the
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("unknown join token: it was never issued by this coordinator (check it was copied whole)")]
    Unknown,
    #[error("join token already used (node {node} enrolled with it); ask the operator for a new one: edgecard nodes token {node}")]
    Used { node: NodeId },
    #[error("join token expired at {expires_at} ms since the epoch; ask the operator for a new one: edgecard nodes token {node}")]
    Expired { node: NodeId, expires_at: u64 },
    #[error("node {0} is revoked")]
    Revoked(NodeId),
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
}

impl From<edgecard_store::StoreError> for RedeemError {
    fn from(e: edgecard_store::StoreError) -> Self {
        RedeemError::Coordinator(e.into())
    }
}

pub fn token_key(digest: &[u8; 32]) -> Vec<u8> {
    [b"j/".as_slice(), digest].concat()
}

/// The rule for redeeming a token at `now`, apart from the store.
pub fn check_redeemable(record: &JoinTokenRecord, now: UnixMillis) -> Result<(), RedeemError> {
    if record.used.is_some() {
        return Err(RedeemError::Used { node: record.node_id.clone() });
    }
    if now.0 >= record.expires_at.0 {
        return Err(RedeemError::Expired { node: record.node_id.clone(), expires_at: record.expires_at.0 });
    }
    Ok(())
}

impl Coordinator {
    /// Issues a join token for a registered, unrevoked node, valid for `ttl` from `now`. The
    /// record is durable when this returns; the secret is returned once and kept nowhere.
    pub async fn issue_join_token(
        &self,
        node_id: &NodeId,
        ttl: Duration,
        now: UnixMillis,
    ) -> Result<(TokenSecret, JoinTokenRecord), CoordinatorError> {
        let secret = TokenSecret::generate();
        let record = {
            let _guard = self.lock.lock();
            let node = self.node(node_id)?;
            if node.revoked {
                return Err(CoordinatorError::NodeRevoked(node_id.to_string()));
            }
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let record = JoinTokenRecord {
                node_id: node_id.clone(),
                region: node.region,
                issued_at: now,
                expires_at: UnixMillis(now.0.saturating_add(ttl_ms)),
                used: None,
            };
            let mut batch = WriteBatch::default();
            batch.put(token_key(&secret.digest()), rec::encode(&record)?);
            self.store.apply(batch)?;
            record
        };
        self.store.durable().await?;
        tracing::info!(node = %node_id, expires_at = record.expires_at.0, "join token issued");
        Ok((secret, record))
    }

    /// The token's record if it could be redeemed at `now`; changes nothing.
    pub fn join_token(&self, secret: &TokenSecret, now: UnixMillis) -> Result<JoinTokenRecord, RedeemError> {
        let record: JoinTokenRecord =
            self.load("join token", &token_key(&secret.digest()))?.ok_or(RedeemError::Unknown)?;
        check_redeemable(&record, now)?;
        if self.is_revoked(&record.node_id) {
            return Err(RedeemError::Revoked(record.node_id));
        }
        Ok(record)
    }

    /// Marks the token used for the certificate whose SHA-256 is `cert_digest`, durably. Only
    /// after this returns may the certificate leave the coordinator. Checked again under the
    /// lock, so of two concurrent redemptions exactly one succeeds.
    pub async fn redeem_join_token(
        &self,
        secret: &TokenSecret,
        cert_digest: [u8; 32],
        now: UnixMillis,
    ) -> Result<JoinTokenRecord, RedeemError> {
        let record = {
            let _guard = self.lock.lock();
            let mut record = self.join_token(secret, now)?;
            record.used = Some((now, cert_digest));
            let mut batch = WriteBatch::default();
            batch.put(token_key(&secret.digest()), rec::encode(&record)?);
            self.store.apply(batch)?;
            record
        };
        self.store.durable().await?;
        Ok(record)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(expires_at: u64) -> JoinTokenRecord {
        JoinTokenRecord {
            node_id: NodeId::new("eu-1").unwrap(),
            region: "eu".into(),
            issued_at: UnixMillis(0),
            expires_at: UnixMillis(expires_at),
            used: None,
        }
    }

    #[test]
    fn a_token_is_redeemable_once_and_before_it_expires() {
        assert!(check_redeemable(&record(1000), UnixMillis(999)).is_ok());
        assert!(matches!(check_redeemable(&record(1000), UnixMillis(1000)), Err(RedeemError::Expired { .. })));
        let used = JoinTokenRecord { used: Some((UnixMillis(5), [0; 32])), ..record(1000) };
        assert!(matches!(check_redeemable(&used, UnixMillis(6)), Err(RedeemError::Used { .. })));
    }

    #[test]
    fn records_round_trip_through_the_store_format() {
        let used = JoinTokenRecord { used: Some((UnixMillis(5), [7; 32])), ..record(1000) };
        let raw = rec::encode(&used).unwrap();
        assert_eq!(rec::decode::<JoinTokenRecord>("join token", &raw).unwrap(), used);
    }
}
