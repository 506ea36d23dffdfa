//! Order events: what a node tells the coordinator's ledger.
//!
//! Events are keyed by (node id, seq); the coordinator ingests them
//! idempotently and acks by high-water mark, so a batch may be resent after
//! a lost ack without double counting.
//!
//! INVARIANT: events never carry key secrets, order tokens, buyer e-mail or
//! any other secret. They are stored in the node's outbox and the ledger,
//! exported, and may be logged; keys are referred to by `KeyId` only. The
//! types below make this structural (no field can hold a `Secret`); keep it
//! that way when adding variants. A reservation carries the SHA-256 of its
//! order's token, which the node stores anyway: a 128-bit random token cannot
//! be recovered from it, and it lets the coordinator give a restored node back
//! the orders it lost, so their buyers' links still work.

use crate::envelope::{self, EnvelopeError, MessageKind};
use crate::ids::{Epoch, KeyId, NodeId, OrderId, Sku, SliceId, UnixMillis};

#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct OrderEvent {
    pub node_id: NodeId,
    /// Per-node sequence number, strictly increasing in the node's outbox.
    pub seq: u64,
    pub at: UnixMillis,
    pub order_id: OrderId,
    pub sku: Sku,
    pub kind: OrderEventKind,
}

#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEventKind {
    /// Keys set aside for an unpaid order until `expires_at`.
    Reserved {
        key_ids: Vec<KeyId>,
        quantity: u32,
        amount_minor: u64,
        currency: String,
        expires_at: UnixMillis,
        /// Hex SHA-256 of the order's token (empty in events from before it was carried).
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
    /// Paid (or reserved) with too little local stock; the coordinator should
    /// route more keys to this node.
    AwaitingStock {
        quantity: u32,
    },
    /// Not about an order (`order_id` is [`OrderId::NONE`]): the node has durably dropped these
    /// keys of a slice and will never sell them. It answers a shrink or close from the
    /// coordinator (`ticket` names it), and follows a closed slice's reservations as they end
    /// unpaid. Riding in the outbox orders it after every take it could follow.
    Released {
        slice_id: SliceId,
        epoch: Epoch,
        ticket: u64,
        key_ids: Vec<KeyId>,
    },
    /// A verified success from a provider that the order's payment attempts do not account for
    /// (`reason`). Money may have been taken: nothing was delivered for it, and an operator must
    /// look at it.
    PaymentUnmatched {
        channel: String,
        provider_txn: String,
        amount_minor: u64,
        currency: String,
        reason: UnmatchedReason,
    },
    /// A verified payment whose amount or currency differs from the order's: what was paid.
    /// Nothing was delivered for it.
    PaymentMismatch {
        channel: String,
        provider_txn: String,
        amount_minor: u64,
        currency: String,
    },
    /// The order's payment went back to the buyer (`provider_refund` names the provider's
    /// refund), or, with `manual`, is to be refunded by hand at a provider without a refund call.
    /// Either way the order's keys (`key_ids`, empty for an order paid while out of stock) are
    /// revoked: never shown or sold again.
    Refunded {
        channel: String,
        provider_refund: String,
        amount_minor: u64,
        currency: String,
        manual: bool,
        key_ids: Vec<KeyId>,
    },
    /// The buyer disputed the payment at the provider (a chargeback).
    Disputed {
        channel: String,
        provider_dispute: String,
        amount_minor: u64,
        currency: String,
    },
}

/// Why a verified payment could not be bound to its order.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum UnmatchedReason {
    /// The order's payment was never opened at this channel.
    WrongChannel,
    /// The channel is the order's, but the provider's reference (a Stripe Checkout Session) is
    /// none of the ones created for it.
    UnknownReference,
    /// The provider's transaction id already paid another order.
    ProviderTxnReused,
}

impl UnmatchedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            UnmatchedReason::WrongChannel => "wrong_channel",
            UnmatchedReason::UnknownReference => "unknown_reference",
            UnmatchedReason::ProviderTxnReused => "provider_txn_reused",
        }
    }
}

#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct OrderEventBatch {
    pub node_id: NodeId,
    pub events: Vec<OrderEvent>,
}

/// Why an event batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("malformed event batch: {0}")]
    Malformed(#[from] EnvelopeError),
    #[error("invalid event batch: {0}")]
    Invalid(String),
}

/// Longest channel name, provider transaction id, in bytes.
pub const MAX_EVENT_TEXT: usize = 128;

fn check_currency(c: &str) -> Result<(), String> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err("currency must be three upper-case letters (ISO 4217)".into())
    }
}

fn check_text(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > MAX_EVENT_TEXT {
        return Err(format!("{what} is longer than {MAX_EVENT_TEXT} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

fn check_key_ids(key_ids: &[KeyId]) -> Result<(), String> {
    if key_ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err("key ids not strictly ascending".into());
    }
    Ok(())
}

impl OrderEventKind {
    fn validate(&self) -> Result<(), String> {
        match self {
            OrderEventKind::Reserved { key_ids, quantity, currency, token_sha256, .. } => {
                check_key_ids(key_ids)?;
                let hex_digest = token_sha256.len() == 64
                    && token_sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !token_sha256.is_empty() && !hex_digest {
                    return Err("token digest is not 64 lower-case hex digits".into());
                }
                if *quantity == 0 {
                    return Err("reserved quantity is 0".into());
                }
                if key_ids.len() as u64 > u64::from(*quantity) {
                    return Err(format!("{} key ids reserved for quantity {quantity}", key_ids.len()));
                }
                check_currency(currency)
            }
            OrderEventKind::Paid { channel, provider_txn, currency, .. }
            | OrderEventKind::PaymentUnmatched { channel, provider_txn, currency, .. }
            | OrderEventKind::PaymentMismatch { channel, provider_txn, currency, .. } => {
                check_text("channel", channel)?;
                check_text("provider transaction id", provider_txn)?;
                check_currency(currency)
            }
            OrderEventKind::Refunded { channel, provider_refund, currency, manual, key_ids, .. } => {
                check_text("channel", channel)?;
                if !(*manual && provider_refund.is_empty()) {
                    check_text("provider refund id", provider_refund)?;
                }
                check_key_ids(key_ids)?;
                check_currency(currency)
            }
            OrderEventKind::Disputed { channel, provider_dispute, currency, .. } => {
                check_text("channel", channel)?;
                check_text("provider dispute id", provider_dispute)?;
                check_currency(currency)
            }
            OrderEventKind::Delivered { key_ids } => {
                if key_ids.is_empty() {
                    return Err("delivered event has no key ids".into());
                }
                check_key_ids(key_ids)
            }
            OrderEventKind::Expired { key_ids } | OrderEventKind::Released { key_ids, .. } => check_key_ids(key_ids),
            OrderEventKind::AwaitingStock { quantity } => {
                if *quantity == 0 {
                    return Err("awaiting-stock quantity is 0".into());
                }
                Ok(())
            }
        }
    }
}

impl OrderEvent {
    pub fn validate(&self) -> Result<(), EventError> {
        let invalid = |m: String| EventError::Invalid(format!("event seq {}: {m}", self.seq));
        self.node_id.validate().map_err(|e| invalid(e.to_string()))?;
        self.sku.validate().map_err(|e| invalid(e.to_string()))?;
        self.kind.validate().map_err(invalid)
    }
}

impl OrderEventBatch {
    /// A batch comes from one node, in outbox order: every event carries the
    /// batch's node id and seqs strictly increase. Gaps are allowed here;
    /// whether a gap is acceptable is the ingesting side's call.
    pub fn validate(&self) -> Result<(), EventError> {
        self.node_id.validate().map_err(|e| EventError::Invalid(e.to_string()))?;
        let mut prev: Option<u64> = None;
        for e in &self.events {
            e.validate()?;
            if e.node_id != self.node_id {
                return Err(EventError::Invalid(format!(
                    "event seq {} is from node {}, batch is from node {}",
                    e.seq, e.node_id, self.node_id
                )));
            }
            if let Some(p) = prev {
                if e.seq <= p {
                    return Err(EventError::Invalid(format!(
                        "event seqs not strictly ascending: {} follows {p}",
                        e.seq
                    )));
                }
            }
            prev = Some(e.seq);
        }
        Ok(())
    }

    /// Validates, then encodes as an envelope of kind `OrderEventBatch`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EventError> {
        self.validate()?;
        Ok(envelope::encode(MessageKind::OrderEventBatch, self)?)
    }

    /// Decodes and validates; the only way the coordinator should read a
    /// batch off the wire.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EventError> {
        let batch: Self = envelope::decode(MessageKind::OrderEventBatch, bytes)?;
        batch.validate()?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn ev(seq: u64, kind: OrderEventKind) -> OrderEvent {
        OrderEvent {
            node_id: node("eu-1"),
            seq,
            at: UnixMillis(1_700_000_000_000 + seq),
            order_id: OrderId::from_bytes([seq as u8; 16]),
            sku: Sku::new("game-gold").unwrap(),
            kind,
        }
    }

    fn batch() -> OrderEventBatch {
        OrderEventBatch {
            node_id: node("eu-1"),
            events: vec![
                ev(
                    1,
                    OrderEventKind::Reserved {
                        key_ids: vec![KeyId(4), KeyId(8)],
                        quantity: 2,
                        amount_minor: 1998,
                        currency: "USD".into(),
                        expires_at: UnixMillis(1_700_000_900_000),
                        token_sha256: String::new(),
                    },
                ),
                ev(
                    2,
                    OrderEventKind::Paid {
                        channel: "sandbox".into(),
                        provider_txn: "tx-123".into(),
                        amount_minor: 1998,
                        currency: "USD".into(),
                    },
                ),
                ev(3, OrderEventKind::Delivered { key_ids: vec![KeyId(4), KeyId(8)] }),
                ev(4, OrderEventKind::Expired { key_ids: vec![] }),
                ev(5, OrderEventKind::AwaitingStock { quantity: 1 }),
                ev(
                    6,
                    OrderEventKind::PaymentUnmatched {
                        channel: "stripe".into(),
                        provider_txn: "cs_1".into(),
                        amount_minor: 1998,
                        currency: "USD".into(),
                        reason: UnmatchedReason::WrongChannel,
                    },
                ),
                ev(
                    7,
                    OrderEventKind::PaymentMismatch {
                        channel: "epay".into(),
                        provider_txn: "2024".into(),
                        amount_minor: 1,
                        currency: "CNY".into(),
                    },
                ),
                ev(
                    8,
                    OrderEventKind::Refunded {
                        channel: "epay".into(),
                        provider_refund: String::new(),
                        amount_minor: 1998,
                        currency: "USD".into(),
                        manual: true,
                        key_ids: vec![KeyId(4), KeyId(8)],
                    },
                ),
                ev(
                    9,
                    OrderEventKind::Disputed {
                        channel: "stripe".into(),
                        provider_dispute: "dp_1".into(),
                        amount_minor: 1998,
                        currency: "USD".into(),
                    },
                ),
            ],
        }
    }

    #[test]
    fn round_trip_rkyv_and_serde() {
        let b = batch();
        let bytes = b.to_bytes().unwrap();
        assert_eq!(OrderEventBatch::from_bytes(&bytes).unwrap(), b);
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains("\"type\":\"reserved\""), "{json}");
        assert!(json.contains("\"type\":\"awaiting_stock\""), "{json}");
        assert_eq!(serde_json::from_str::<OrderEventBatch>(&json).unwrap(), b);
    }

    #[test]
    fn empty_batch_is_fine() {
        let b = OrderEventBatch { node_id: node("eu-1"), events: vec![] };
        assert_eq!(OrderEventBatch::from_bytes(&b.to_bytes().unwrap()).unwrap(), b);
    }

    #[test]
    fn foreign_node_and_seq_order() {
        let mut b = batch();
        b.events[2].node_id = node("us-1");
        let err = b.validate().unwrap_err().to_string();
        assert!(err.contains("us-1") && err.contains("eu-1"), "{err}");

        let mut b = batch();
        b.events.swap(0, 1);
        assert!(b.validate().is_err());
        let mut b = batch();
        b.events[1].seq = 1;
        assert!(b.to_bytes().is_err());
    }

    #[test]
    fn field_rules() {
        let bad_kinds = [
            OrderEventKind::Reserved {
                key_ids: vec![KeyId(2), KeyId(2)],
                quantity: 2,
                amount_minor: 1,
                currency: "USD".into(),
                expires_at: UnixMillis(0),
                token_sha256: String::new(),
            },
            OrderEventKind::Reserved {
                key_ids: vec![KeyId(1), KeyId(2)],
                quantity: 1,
                amount_minor: 1,
                currency: "USD".into(),
                expires_at: UnixMillis(0),
                token_sha256: String::new(),
            },
            OrderEventKind::Reserved {
                key_ids: vec![],
                quantity: 0,
                amount_minor: 1,
                currency: "USD".into(),
                expires_at: UnixMillis(0),
                token_sha256: String::new(),
            },
            OrderEventKind::Paid {
                channel: "sandbox".into(),
                provider_txn: "t".into(),
                amount_minor: 1,
                currency: "usd".into(),
            },
            OrderEventKind::Paid {
                channel: String::new(),
                provider_txn: "t".into(),
                amount_minor: 1,
                currency: "USD".into(),
            },
            OrderEventKind::Paid {
                channel: "sandbox".into(),
                provider_txn: "t\n".into(),
                amount_minor: 1,
                currency: "USD".into(),
            },
            OrderEventKind::Paid {
                channel: "sandbox".into(),
                provider_txn: "t".repeat(MAX_EVENT_TEXT + 1),
                amount_minor: 1,
                currency: "USD".into(),
            },
            OrderEventKind::Delivered { key_ids: vec![] },
            OrderEventKind::Expired { key_ids: vec![KeyId(3), KeyId(1)] },
            OrderEventKind::AwaitingStock { quantity: 0 },
            OrderEventKind::PaymentUnmatched {
                channel: "stripe".into(),
                provider_txn: String::new(),
                amount_minor: 1,
                currency: "USD".into(),
                reason: UnmatchedReason::ProviderTxnReused,
            },
            OrderEventKind::PaymentMismatch {
                channel: "stripe".into(),
                provider_txn: "cs".into(),
                amount_minor: 1,
                currency: "usd".into(),
            },
            OrderEventKind::Refunded {
                channel: "stripe".into(),
                provider_refund: String::new(),
                amount_minor: 1,
                currency: "USD".into(),
                manual: false,
                key_ids: vec![],
            },
            OrderEventKind::Refunded {
                channel: "stripe".into(),
                provider_refund: "re_1".into(),
                amount_minor: 1,
                currency: "USD".into(),
                manual: false,
                key_ids: vec![KeyId(2), KeyId(1)],
            },
            OrderEventKind::Disputed {
                channel: "stripe".into(),
                provider_dispute: "dp\u{0}".into(),
                amount_minor: 1,
                currency: "USD".into(),
            },
        ];
        for kind in bad_kinds {
            let e = ev(1, kind.clone());
            assert!(e.validate().is_err(), "{kind:?} accepted");
        }
    }

    /// Same rkyv layout as `OrderEventBatch` with a plain string node id.
    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct RawBatch {
        node_id: String,
        events: Vec<OrderEvent>,
    }

    #[test]
    fn decoded_invalid_node_id_is_refused() {
        let ok = envelope::encode(MessageKind::OrderEventBatch, &RawBatch { node_id: "eu-1".into(), events: vec![] })
            .unwrap();
        assert!(OrderEventBatch::from_bytes(&ok).is_ok());
        let bad = envelope::encode(MessageKind::OrderEventBatch, &RawBatch { node_id: "EU/1".into(), events: vec![] })
            .unwrap();
        assert!(matches!(OrderEventBatch::from_bytes(&bad), Err(EventError::Invalid(_))));
    }

    #[test]
    fn wrong_kind_is_malformed() {
        let bytes = envelope::encode(MessageKind::SliceGrant, &batch()).unwrap();
        assert!(matches!(
            OrderEventBatch::from_bytes(&bytes),
            Err(EventError::Malformed(EnvelopeError::WrongKind { .. }))
        ));
    }
}
