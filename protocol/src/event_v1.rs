//! The order-event layout of stores written before reservations carried their token's digest.
//!
//! Stored events (a node's outbox, the coordinator's ledger) are rkyv archives, which carry no
//! schema: a changed layout is read through the old type and converted. Records in this layout
//! have record format version 1; they convert into the version-2 layout
//! ([`crate::event_v2`]), which converts into the current one.

use crate::event_v2::{OrderEventKindV2, OrderEventV2};
use crate::ids::{Epoch, KeyId, NodeId, OrderId, Sku, SliceId, UnixMillis};

#[derive(Clone, Debug, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OrderEventV1 {
    pub node_id: NodeId,
    pub seq: u64,
    pub at: UnixMillis,
    pub order_id: OrderId,
    pub sku: Sku,
    pub kind: OrderEventKindV1,
}

#[derive(Clone, Debug, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEventKindV1 {
    Reserved { key_ids: Vec<KeyId>, quantity: u32, amount_minor: u64, currency: String, expires_at: UnixMillis },
    Paid { channel: String, provider_txn: String, amount_minor: u64, currency: String },
    Delivered { key_ids: Vec<KeyId> },
    Expired { key_ids: Vec<KeyId> },
    AwaitingStock { quantity: u32 },
    Released { slice_id: SliceId, epoch: Epoch, ticket: u64, key_ids: Vec<KeyId> },
}

impl From<OrderEventV1> for OrderEventV2 {
    fn from(old: OrderEventV1) -> Self {
        let kind = match old.kind {
            OrderEventKindV1::Reserved { key_ids, quantity, amount_minor, currency, expires_at } => {
                OrderEventKindV2::Reserved {
                    key_ids,
                    quantity,
                    amount_minor,
                    currency,
                    expires_at,
                    token_sha256: String::new(),
                }
            }
            OrderEventKindV1::Paid { channel, provider_txn, amount_minor, currency } => {
                OrderEventKindV2::Paid { channel, provider_txn, amount_minor, currency }
            }
            OrderEventKindV1::Delivered { key_ids } => OrderEventKindV2::Delivered { key_ids },
            OrderEventKindV1::Expired { key_ids } => OrderEventKindV2::Expired { key_ids },
            OrderEventKindV1::AwaitingStock { quantity } => OrderEventKindV2::AwaitingStock { quantity },
            OrderEventKindV1::Released { slice_id, epoch, ticket, key_ids } => {
                OrderEventKindV2::Released { slice_id, epoch, ticket, key_ids }
            }
        };
        OrderEventV2 { node_id: old.node_id, seq: old.seq, at: old.at, order_id: old.order_id, sku: old.sku, kind }
    }
}
