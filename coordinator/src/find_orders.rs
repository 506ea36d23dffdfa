//! "Find my order" across regions: a node passes a buyer's address up with its sync upload, and
//! the coordinator queues a `FindOrders` control message to every other node that is not revoked,
//! through the same durable, sequenced control path as grants (released to a node only once
//! durable). Each node then mails the address its own orders' links; the coordinator never learns
//! which nodes hold orders, and keeps no index of addresses.
//!
//! The address sits, sealed with the rest of the store, in each target node's control queue until
//! that node reports the message applied (its next upload after applying it deletes it); for a
//! node that stays away, until it comes back or is revoked. It is never logged.
//!
//! Lookups of one address are limited here too ([`PER_ADDRESS`] per [`WINDOW_MS`], keyed by an
//! HMAC tag, in memory), so asking many nodes does not multiply the mail to an address.

use edgecard_protocol::{NodeId, OrderLookup, UnixMillis};
use edgecard_store::{StoreError, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::records as rec;
use crate::service::{Coordinator, CoordinatorError, CONTROL_FIND_ORDERS};

pub const PER_ADDRESS: u32 = 3;
pub const WINDOW_MS: u64 = 3_600_000;
/// Most addresses counted at once.
pub const MAX_ADDRESSES: usize = 100_000;

/// The payload of a queued `FindOrders` control message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FindOrders {
    pub email: String,
    pub lang: String,
}

/// Lookups per address tag in fixed windows; bounded.
pub type LookupLimiter = edgecard_protocol::tag_limiter::AddressLimiter;

/// The coordinator's per-address limit of "find my order" lookups.
pub fn lookup_limiter() -> LookupLimiter {
    LookupLimiter::new(PER_ADDRESS, WINDOW_MS, MAX_ADDRESSES)
}

impl Coordinator {
    /// Passes `lookups` made at node `from` to every other node that is not revoked, in one
    /// batch (applied here; durable with the ack that follows). Returns how many messages were
    /// queued. Caller holds the coordinator's lock.
    pub(crate) fn pass_on_lookups(
        &self,
        from: &NodeId,
        lookups: &[OrderLookup],
        now: UnixMillis,
    ) -> Result<usize, CoordinatorError> {
        let admitted: Vec<&OrderLookup> =
            lookups.iter().filter(|l| self.lookups.allow(&self.lookup_tag(&l.email), now.0)).collect();
        if admitted.len() < lookups.len() {
            tracing::info!(from = %from, dropped = lookups.len() - admitted.len(), "find my order: addresses over their limit");
        }
        if admitted.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        let mut queued = 0;
        for mut node in self.nodes()? {
            if node.revoked || &node.node_id == from {
                continue;
            }
            for lookup in &admitted {
                let payload = rec::encode(&FindOrders { email: lookup.email.clone(), lang: lookup.lang.clone() })?;
                node = self.queue_control(&mut batch, node, CONTROL_FIND_ORDERS, payload)?;
                queued += 1;
            }
        }
        self.store.apply(batch)?;
        tracing::info!(from = %from, lookups = admitted.len(), messages = queued, "find my order passed on");
        Ok(queued)
    }

    /// The limiter's key for an address: HMAC-SHA256 under a key derived from the signing key,
    /// so the map in memory holds no address.
    fn lookup_tag(&self, email: &str) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        use sha2::Digest;
        let key = sha2::Sha256::new()
            .chain_update(b"edgecard find-order v1\0")
            .chain_update(self.signing_key.to_bytes())
            .finalize();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(email.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Decodes a queued payload into its control message body.
pub(crate) fn control_body(payload: &[u8]) -> Result<edgecard_protocol::ControlBody, StoreError> {
    let find: FindOrders = rec::decode("find orders", payload)?;
    Ok(edgecard_protocol::ControlBody::FindOrders { lookup: OrderLookup { email: find.email, lang: find.lang } })
}
