//! What the node stores, and under which keys.
//!
//! One sled tree, prefixed keys, so that every state change is one atomic batch:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `o/` | order id (16 bytes) | [`OrderRecord`] (a store record, format 2: versioned rkyv) |
//! | `x/` | order id | open reservation marker: expiry, unix ms, big-endian |
//! | `w/` | event seq (8 bytes BE) | order id of a `PaidAwaitingStock` order, FIFO |
//! | `k/` | sku, 0, key id (8 bytes BE) | slice id (8 bytes BE) then the secret: keys not yet sold |
//! | `s/` | sku, 0, key id | order id: sold tombstone, so a key can never be installed again |
//! | `g/` | slice id (8 bytes BE) | [`SliceMeta`] (a store record) |
//! | `c/` | channel, 0, provider transaction id | order id: callback idempotency |
//! | `v/` | channel, 0, provider transaction id, 0, order id, amount (8 bytes BE), currency | [`PaymentProblem`]: a verified payment that paid nothing (matched no attempt, or the wrong amount) |
//! | `i/` | channel, 0, provider payment id | order id: the order a provider's refund or dispute is about (a Stripe PaymentIntent) |
//! | `u/` | order id | asked at, unix ms BE: a refund waiting for the provider (the refund worker's index) |
//! | `p/` | order id | created at, unix ms BE: awaiting payment confirmation (compensation index) |
//! | `e/` | event seq (8 bytes BE) | outbox: an `OrderEvent` for the coordinator (a store record) |
//! | `m/next_seq` | | next outbox sequence number |
//! | `m/sync_acked`, `m/control_applied` | | sync progress with the coordinator |
//! | `m/incarnation` | | this data dir's id (8 bytes BE), made when it was created |
//! | `r/` | control seq (8 bytes BE) | a control message refused for good, until reported: holds-nothing flag (1 byte), reason (UTF-8) |
//! | `m/catalog` | | the catalog last received from the coordinator (a store record) |
//! | `q/` | order id, mail kind (1 byte) | `mail::queue::MailJob`: an order mail to send, and its status (see `mail/`) |
//! | `qp/` | order id, mail kind | empty: the mail is not final yet (the mail worker's index) |
//! | `qr/` | final at (unix ms BE), order id, mail kind | empty: when the mail became final (the retention sweep's index) |
//! | `fe/` | address tag (32 bytes), order id | empty: the order was made with that address ("find my order", `email_index.rs`) |
//! | `m/find_key` | | the key of the address tags (32 random bytes, made on first start) |

use std::net::IpAddr;

use edgecard_protocol::{Epoch, KeyId, OrderId, Secret, Sku, SliceId, UnixMillis};
use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Reserved,
    Delivered,
    Expired,
    PaidAwaitingStock,
    /// The payment went back to the buyer (or is to be refunded by hand): keys revoked, never
    /// shown again.
    Refunded,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Expired => "expired",
            OrderStatus::PaidAwaitingStock => "paid_awaiting_stock",
            OrderStatus::Refunded => "refunded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PaymentRecord {
    pub channel: String,
    pub provider_txn: String,
    pub amount_minor: u64,
    pub currency: String,
    pub paid_at: UnixMillis,
    /// The provider's id of the money movement itself, when it differs from `provider_txn` (a
    /// Stripe PaymentIntent, which refunds and disputes name).
    #[serde(default)]
    pub provider_payment: Option<String>,
}

/// Most payments opened for one order. Creation is idempotent per order and channel, so a
/// legitimate order has one per channel of its route at most.
pub const MAX_PAYMENT_ATTEMPTS: usize = 8;

/// A payment opened at a provider for an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PaymentAttempt {
    pub channel: String,
    /// The provider's handle (a Stripe Checkout Session id): a callback must name it, and
    /// compensation queries it.
    pub provider_ref: Option<String>,
    /// Where the buyer pays, when the channel cannot derive it from the order.
    pub pay_url: Option<String>,
    pub created_at: UnixMillis,
    /// Until when the provider takes a payment for it (a Checkout Session's `expires_at`), when
    /// the provider says; compensation queries until then.
    #[serde(default)]
    pub pays_until: Option<UnixMillis>,
}

/// A payment attempt as bound to callbacks: a recorded one, or the one implied by an order that
/// records none (its channel derives the payment from the order id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptRef<'a> {
    pub channel: &'a str,
    pub provider_ref: Option<&'a str>,
    pub pays_until: Option<UnixMillis>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RefundState {
    /// Asked for; the provider has not confirmed it yet (retried until it does).
    Pending,
    /// The provider confirmed it.
    Refunded,
    /// The channel has no refund call: the merchant refunds by hand at the provider.
    Manual,
}

/// A refund of the order's payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RefundRecord {
    pub state: RefundState,
    /// The operator's reason, or why the provider refunded (made in its dashboard).
    pub reason: String,
    pub requested_at: UnixMillis,
    /// The provider's refund id once confirmed.
    pub provider_refund: Option<String>,
    pub settled_at: Option<UnixMillis>,
}

/// A dispute (chargeback) the provider reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DisputeRecord {
    pub provider_dispute: String,
    pub amount_minor: u64,
    pub currency: String,
    pub at: UnixMillis,
}

/// Record format version of [`OrderRecord`]: 1 had one payment attempt and no refunds.
pub const ORDER_RECORD_VERSION: u8 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OrderRecord {
    pub id: OrderId,
    pub sku: Sku,
    pub quantity: u32,
    pub amount_minor: u64,
    pub currency: String,
    /// The channel of the order's latest payment attempt (where the buyer is sent to pay).
    pub channel: String,
    /// SHA-256 of the buyer's token; the token itself is never stored.
    pub token_sha256: String,
    pub email: Option<String>,
    pub client_ip: IpAddr,
    pub status: OrderStatus,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// Keys held while Reserved, or delivered (revoked once Refunded).
    pub key_ids: Vec<KeyId>,
    /// Secrets, present only once Delivered.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default)]
    pub payment: Option<PaymentRecord>,
    #[serde(default)]
    pub delivered_at: Option<UnixMillis>,
    /// Payments opened at providers for this order, oldest first, at most
    /// [`MAX_PAYMENT_ATTEMPTS`]. Empty when the only one is at `channel` and that channel derives
    /// it from the order (see [`OrderRecord::attempts`]).
    #[serde(default)]
    pub attempts: Vec<PaymentAttempt>,
    #[serde(default)]
    pub refund: Option<RefundRecord>,
    #[serde(default)]
    pub dispute: Option<DisputeRecord>,
}

impl OrderRecord {
    /// The order's payment attempts: the recorded ones, or the one implied at `channel`.
    pub fn attempts(&self) -> Vec<AttemptRef<'_>> {
        if self.attempts.is_empty() {
            return vec![AttemptRef { channel: &self.channel, provider_ref: None, pays_until: None }];
        }
        self.attempts
            .iter()
            .map(|a| AttemptRef {
                channel: &a.channel,
                provider_ref: a.provider_ref.as_deref(),
                pays_until: a.pays_until,
            })
            .collect()
    }

    /// The latest recorded attempt, if any.
    pub fn latest_attempt(&self) -> Option<&PaymentAttempt> {
        self.attempts.last()
    }

    /// Whether a verified payment at `channel`, naming the provider's `reference` (a Checkout
    /// Session) when the provider gives one, belongs to one of the order's attempts: an attempt
    /// at that channel whose recorded reference, if it has one, is the same.
    ///
    /// An order restored from the ledger (see `restore.rs`) before it was paid does not know
    /// where its payment was opened (events do not say): it binds any channel.
    pub fn binds(&self, channel: &str, reference: Option<&str>) -> Result<(), edgecard_protocol::UnmatchedReason> {
        if self.channel.is_empty() && self.attempts.is_empty() {
            return Ok(());
        }
        let at_channel: Vec<AttemptRef<'_>> = self.attempts().into_iter().filter(|a| a.channel == channel).collect();
        if at_channel.is_empty() {
            return Err(edgecard_protocol::UnmatchedReason::WrongChannel);
        }
        let known = at_channel.iter().any(|a| a.provider_ref.is_none() || a.provider_ref == reference);
        if known {
            Ok(())
        } else {
            Err(edgecard_protocol::UnmatchedReason::UnknownReference)
        }
    }

    /// A reserved order, for the payment channels' unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(channel: &str, quantity: u32, amount_minor: u64, currency: &str) -> OrderRecord {
        OrderRecord {
            id: OrderId::random(),
            sku: Sku::new("game").unwrap_or_else(|e| unreachable!("{e}")),
            quantity,
            amount_minor,
            currency: currency.into(),
            channel: channel.into(),
            token_sha256: String::new(),
            email: None,
            client_ip: [127, 0, 0, 1].into(),
            status: OrderStatus::Reserved,
            created_at: UnixMillis(0),
            expires_at: UnixMillis(1),
            key_ids: vec![],
            secrets: vec![],
            payment: None,
            delivered_at: None,
            attempts: vec![],
            refund: None,
            dispute: None,
        }
    }
}

/// What was wrong with a verified payment that paid nothing.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PaymentProblemKind {
    /// The order's payment was never opened at this channel.
    WrongChannel,
    /// The provider's reference is none of the order's attempts at that channel.
    UnknownReference,
    /// The provider's transaction id already paid another order.
    ProviderTxnReused,
    AmountMismatch,
    CurrencyMismatch,
}

impl PaymentProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentProblemKind::WrongChannel => "wrong_channel",
            PaymentProblemKind::UnknownReference => "unknown_reference",
            PaymentProblemKind::ProviderTxnReused => "provider_txn_reused",
            PaymentProblemKind::AmountMismatch => "amount",
            PaymentProblemKind::CurrencyMismatch => "currency",
        }
    }

    /// Why it is unbound, for the unmatched kinds; `None` for a mismatch.
    pub fn unmatched(self) -> Option<edgecard_protocol::UnmatchedReason> {
        use edgecard_protocol::UnmatchedReason;
        match self {
            PaymentProblemKind::WrongChannel => Some(UnmatchedReason::WrongChannel),
            PaymentProblemKind::UnknownReference => Some(UnmatchedReason::UnknownReference),
            PaymentProblemKind::ProviderTxnReused => Some(UnmatchedReason::ProviderTxnReused),
            PaymentProblemKind::AmountMismatch | PaymentProblemKind::CurrencyMismatch => None,
        }
    }
}

impl From<edgecard_protocol::UnmatchedReason> for PaymentProblemKind {
    fn from(reason: edgecard_protocol::UnmatchedReason) -> Self {
        use edgecard_protocol::UnmatchedReason;
        match reason {
            UnmatchedReason::WrongChannel => PaymentProblemKind::WrongChannel,
            UnmatchedReason::UnknownReference => PaymentProblemKind::UnknownReference,
            UnmatchedReason::ProviderTxnReused => PaymentProblemKind::ProviderTxnReused,
        }
    }
}

/// A verified payment that paid nothing: what was paid, where, and what was wrong with it. Kept
/// for the operator (the money needs a refund or a decision); reported to the ledger as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PaymentProblem {
    pub order_id: OrderId,
    pub channel: String,
    pub provider_txn: String,
    pub amount_minor: u64,
    pub currency: String,
    pub kind: PaymentProblemKind,
    pub at: UnixMillis,
}

/// Payment problems by (channel, provider transaction id, order).
pub const PAYMENT_PROBLEMS: edgecard_store::Table<PaymentProblem> =
    edgecard_store::Table::new(PROBLEM, "payment problem");

/// What the node keeps about an installed slice (the keys themselves live under `k/`).
#[derive(Debug, Clone, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SliceMeta {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub epoch: Epoch,
    pub issued_at: UnixMillis,
    pub lease_deadline: UnixMillis,
    pub key_count: usize,
    /// SHA-256 over the slice's (key id, secret) list: a renewal must carry exactly these keys.
    pub keys_digest: String,
    /// Most unacknowledged takes allowed (see `protocol::holdings`). Slices stored before the
    /// window existed had none.
    #[serde(default = "unbounded_window")]
    pub take_window: u64,
    /// The ticket of the coordinator's close, once closed.
    #[serde(default)]
    pub closed: Option<u64>,
    /// The last shrink ticket applied, so a repeated control message releases nothing more.
    #[serde(default)]
    pub last_ticket: u64,
}

fn unbounded_window() -> u64 {
    u64::MAX
}

/// The digest stored in [`SliceMeta::keys_digest`].
pub fn keys_digest(keys: &[edgecard_protocol::GrantedKey]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for key in keys {
        hasher.update(key.key_id.0.to_be_bytes());
        hasher.update((key.secret.expose().len() as u64).to_be_bytes());
        hasher.update(key.secret.expose().as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Order records by order id (format [`ORDER_RECORD_VERSION`]; format 1 is read and converted).
pub const ORDERS: edgecard_store::Table<OrderRecord> =
    edgecard_store::Table::evolved(ORDER, "order record", ORDER_RECORD_VERSION, read_order_v1);

fn read_order_v1(what: &str, raw: &[u8]) -> Result<OrderRecord, edgecard_store::StoreError> {
    edgecard_store::record::decode::<super::record_v1::OrderRecordV1>(what, raw).map(Into::into)
}

pub const CATALOG: &[u8] = b"m/catalog";
pub const ORDER: &[u8] = b"o/";
pub const OPEN: &[u8] = b"x/";
pub const AWAITING: &[u8] = b"w/";
pub const KEY: &[u8] = b"k/";
pub const SOLD: &[u8] = b"s/";
pub const SLICE: &[u8] = b"g/";
pub const CALLBACK: &[u8] = b"c/";
pub const PROBLEM: &[u8] = b"v/";
pub const PROVIDER_PAYMENT: &[u8] = b"i/";
pub const REFUND_PENDING: &[u8] = b"u/";
pub const OUTBOX: &[u8] = b"e/";
pub const CONFIRM: &[u8] = b"p/";
pub const NEXT_SEQ: &[u8] = b"m/next_seq";
/// Sync progress: highest outbox seq the coordinator acknowledged, and the highest control
/// message applied (both 8 bytes BE).
pub const SYNC_ACKED: &[u8] = b"m/sync_acked";
pub const CONTROL_APPLIED: &[u8] = b"m/control_applied";
pub const INCARNATION: &[u8] = b"m/incarnation";
pub const REFUSED: &[u8] = b"r/";

pub fn refused_key(seq: u64) -> Vec<u8> {
    cat(&[REFUSED, &seq.to_be_bytes()])
}

/// Outbox events are stored in their own record format, which changed when reservations began to
/// carry their token's digest (2) and again when payment problems, refunds and disputes became
/// events (3); events written before are read and converted.
pub fn encode_event(event: &edgecard_protocol::OrderEvent) -> Result<Vec<u8>, edgecard_store::StoreError> {
    edgecard_store::record::encode_versioned("outbox event", event, edgecard_protocol::EVENT_RECORD_VERSION)
}

pub fn decode_event(raw: &[u8]) -> Result<edgecard_protocol::OrderEvent, edgecard_store::StoreError> {
    use edgecard_protocol::{OrderEventV1, OrderEventV2, EVENT_RECORD_VERSION, EVENT_RECORD_VERSION_V2};
    use edgecard_store::record::{decode_evolved, decode_or_older};
    decode_or_older("outbox event", raw, EVENT_RECORD_VERSION, |older| {
        decode_evolved::<OrderEventV2, OrderEventV1>("outbox event", older, EVENT_RECORD_VERSION_V2).map(Into::into)
    })
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn order_key(id: &OrderId) -> Vec<u8> {
    cat(&[ORDER, id.as_bytes()])
}

pub fn open_key(id: &OrderId) -> Vec<u8> {
    cat(&[OPEN, id.as_bytes()])
}

pub fn awaiting_key(seq: u64) -> Vec<u8> {
    cat(&[AWAITING, &seq.to_be_bytes()])
}

pub fn key_prefix(sku: &Sku) -> Vec<u8> {
    cat(&[KEY, sku.as_str().as_bytes(), &[0]])
}

pub fn key_key(sku: &Sku, key: KeyId) -> Vec<u8> {
    cat(&[KEY, sku.as_str().as_bytes(), &[0], &key.0.to_be_bytes()])
}

pub fn sold_key(sku: &Sku, key: KeyId) -> Vec<u8> {
    cat(&[SOLD, sku.as_str().as_bytes(), &[0], &key.0.to_be_bytes()])
}

pub fn slice_key(id: SliceId) -> Vec<u8> {
    cat(&[SLICE, &id.0.to_be_bytes()])
}

pub fn callback_key(channel: &str, provider_txn: &str) -> Vec<u8> {
    cat(&[CALLBACK, channel.as_bytes(), &[0], provider_txn.as_bytes()])
}

/// The id of a payment problem in [`PAYMENT_PROBLEMS`] (the table adds the prefix): a provider
/// repeating the same callback finds it; the same transaction reported with another amount is
/// another statement, weighed afresh.
pub fn problem_id(channel: &str, provider_txn: &str, order: &OrderId, amount_minor: u64, currency: &str) -> Vec<u8> {
    cat(&[
        channel.as_bytes(),
        &[0],
        provider_txn.as_bytes(),
        &[0],
        order.as_bytes(),
        &amount_minor.to_be_bytes(),
        currency.as_bytes(),
    ])
}

pub fn provider_payment_key(channel: &str, provider_payment: &str) -> Vec<u8> {
    cat(&[PROVIDER_PAYMENT, channel.as_bytes(), &[0], provider_payment.as_bytes()])
}

pub fn refund_pending_key(id: &OrderId) -> Vec<u8> {
    cat(&[REFUND_PENDING, id.as_bytes()])
}

pub fn confirm_key(id: &OrderId) -> Vec<u8> {
    cat(&[CONFIRM, id.as_bytes()])
}

pub fn outbox_key(seq: u64) -> Vec<u8> {
    cat(&[OUTBOX, &seq.to_be_bytes()])
}

/// Splits a `k/` key into (sku, key id).
pub fn parse_key_key(raw: &[u8]) -> Option<(Sku, KeyId)> {
    let rest = raw.strip_prefix(KEY)?;
    let zero = rest.iter().position(|b| *b == 0)?;
    let sku = std::str::from_utf8(&rest[..zero]).ok()?;
    let id: [u8; 8] = rest.get(zero + 1..)?.try_into().ok()?;
    Some((Sku::new(sku).ok()?, KeyId(u64::from_be_bytes(id))))
}

/// Value under `k/`: slice id then secret.
pub fn encode_key_value(slice: SliceId, secret: &Secret) -> Vec<u8> {
    cat(&[&slice.0.to_be_bytes(), secret.expose().as_bytes()])
}

pub fn decode_key_value(raw: &[u8]) -> Option<(SliceId, &[u8])> {
    let slice: [u8; 8] = raw.get(..8)?.try_into().ok()?;
    Some((SliceId(u64::from_be_bytes(slice)), &raw[8..]))
}

pub fn be_u64(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

pub fn order_id_from(raw: &[u8]) -> Option<OrderId> {
    Some(OrderId::from_bytes(raw.try_into().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_keys_round_trip_and_sort_by_id() {
        let sku = Sku::new("game-20").unwrap();
        let a = key_key(&sku, KeyId(2));
        let b = key_key(&sku, KeyId(10));
        assert!(a < b, "big-endian ids sort numerically");
        assert_eq!(parse_key_key(&b), Some((sku.clone(), KeyId(10))));
        assert!(a.starts_with(&key_prefix(&sku)));
        assert_eq!(parse_key_key(b"k/garbage"), None);
    }

    #[test]
    fn outbox_events_of_every_layout_are_read() {
        use edgecard_protocol::event_v1::{OrderEventKindV1, OrderEventV1};
        use edgecard_protocol::event_v2::{OrderEventKindV2, OrderEventV2};
        use edgecard_protocol::{NodeId, OrderEvent, OrderEventKind, UnmatchedReason};
        let (node, order, sku) =
            (NodeId::new("eu-1").unwrap(), OrderId::from_bytes([7; 16]), Sku::new("game").unwrap());
        let v1 = OrderEventV1 {
            node_id: node.clone(),
            seq: 1,
            at: UnixMillis(10),
            order_id: order,
            sku: sku.clone(),
            kind: OrderEventKindV1::Paid {
                channel: "stripe".into(),
                provider_txn: "cs_1".into(),
                amount_minor: 1000,
                currency: "USD".into(),
            },
        };
        let read = decode_event(&edgecard_store::record::encode("outbox event", &v1).unwrap()).unwrap();
        assert!(matches!(read.kind, OrderEventKind::Paid { ref provider_txn, .. } if provider_txn == "cs_1"));
        let v2 = OrderEventV2 {
            node_id: node.clone(),
            seq: 2,
            at: UnixMillis(11),
            order_id: order,
            sku: sku.clone(),
            kind: OrderEventKindV2::Reserved {
                key_ids: vec![KeyId(3)],
                quantity: 1,
                amount_minor: 1000,
                currency: "USD".into(),
                expires_at: UnixMillis(99),
                token_sha256: "ab".repeat(32),
            },
        };
        let raw = edgecard_store::record::encode_versioned("outbox event", &v2, 2).unwrap();
        let read = decode_event(&raw).unwrap();
        assert!(matches!(read.kind, OrderEventKind::Reserved { ref token_sha256, .. } if token_sha256.len() == 64));
        let v3 = OrderEvent {
            node_id: node,
            seq: 3,
            at: UnixMillis(12),
            order_id: order,
            sku,
            kind: OrderEventKind::PaymentUnmatched {
                channel: "stripe".into(),
                provider_txn: "cs_2".into(),
                amount_minor: 1000,
                currency: "USD".into(),
                reason: UnmatchedReason::WrongChannel,
            },
        };
        let raw = encode_event(&v3).unwrap();
        assert_eq!(raw[1], 3, "written in the current layout");
        assert_eq!(decode_event(&raw).unwrap(), v3);
    }

    #[test]
    fn key_values_round_trip() {
        let secret = Secret::new("ABCD-EFGH".to_string()).unwrap();
        let raw = encode_key_value(SliceId(7), &secret);
        let (slice, bytes) = decode_key_value(&raw).unwrap();
        assert_eq!(slice, SliceId(7));
        assert_eq!(bytes, b"ABCD-EFGH");
        assert_eq!(decode_key_value(b"short"), None);
    }
}
