//! The order-event layout of stores written before payment problems, refunds and disputes were
//! events (record format version 2; version 1 converts into it, see [`crate::event_v1`]).
//!
//! Every variant here exists unchanged in the current layout, so the conversion is one to one.

use crate::event::{OrderEvent, OrderEventKind};
use crate::ids::{Epoch, KeyId, NodeId, OrderId, Sku, SliceId, UnixMillis};

/// Record format version of stored [`OrderEvent`]s. 1: before reservations carried their token's
/// digest; 2: before payment problems, refunds and disputes; 3: now.
pub const EVENT_RECORD_VERSION: u8 = 3;
/// Record format version of [`OrderEventV2`].
pub const EVENT_RECORD_VERSION_V2: u8 = 2;

#[derive(Clone, Debug, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OrderEventV2 {
    pub node_id: NodeId,
    pub seq: u64,
    pub at: UnixMillis,
    pub order_id: OrderId,
    pub sku: Sku,
    pub kind: OrderEventKindV2,
}

#[derive(Clone, Debug, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEventKindV2 {
    Reserved {
        key_ids: Vec<KeyId>,
        quantity: u32,
        amount_minor: u64,
        currency: String,
        expires_at: UnixMillis,
        token_sha256: String,
    },
    Paid {
        channel: String,
        provider_txn: String,
        amount_minor: u64,
        currency: String,
    },
    Delivered {
        key_ids: Vec<KeyId>,
    },
    Expired {
        key_ids: Vec<KeyId>,
    },
    AwaitingStock {
        quantity: u32,
    },
    Released {
        slice_id: SliceId,
        epoch: Epoch,
        ticket: u64,
        key_ids: Vec<KeyId>,
    },
}

impl From<OrderEventV2> for OrderEvent {
    fn from(old: OrderEventV2) -> Self {
        let kind = match old.kind {
            OrderEventKindV2::Reserved { key_ids, quantity, amount_minor, currency, expires_at, token_sha256 } => {
                OrderEventKind::Reserved { key_ids, quantity, amount_minor, currency, expires_at, token_sha256 }
            }
            OrderEventKindV2::Paid { channel, provider_txn, amount_minor, currency } => {
                OrderEventKind::Paid { channel, provider_txn, amount_minor, currency }
            }
            OrderEventKindV2::Delivered { key_ids } => OrderEventKind::Delivered { key_ids },
            OrderEventKindV2::Expired { key_ids } => OrderEventKind::Expired { key_ids },
            OrderEventKindV2::AwaitingStock { quantity } => OrderEventKind::AwaitingStock { quantity },
            OrderEventKindV2::Released { slice_id, epoch, ticket, key_ids } => {
                OrderEventKind::Released { slice_id, epoch, ticket, key_ids }
            }
        };
        OrderEvent { node_id: old.node_id, seq: old.seq, at: old.at, order_id: old.order_id, sku: old.sku, kind }
    }
}
