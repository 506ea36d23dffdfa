//! What the coordinator stores, and under which keys (one store, prefixed keys, so that each
//! change is one atomic batch). Values are store records (versioned rkyv, validated on read):
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `p/` | sku | [`ProductRecord`] |
//! | `k/` | sku, 0, key id (8 bytes BE) | [`KeyRecord`] |
//! | `f/` | sku | the pool (keys not granted to any node) as ascending inclusive id runs |
//! | `h/` | SHA-256 of the secret | sku, 0, key id: deduplication across imports |
//! | `b/` | batch id (8 bytes BE) | [`ImportBatch`] |
//! | `s/` | slice id (8 bytes BE) | [`SliceRecord`] |
//! | `n/` | node id | [`NodeRecord`] |
//! | `q/` | node id, 0, control seq (8 bytes BE) | a queued control message for the node |
//! | `l/` | node id, 0, event seq (8 bytes BE) | the ledger: an `OrderEvent` (record format 3) |
//! | `i/` | node id | [`NodeLineage`]: the node's data-dir incarnation and fence |
//! | `o/` | order id (16 bytes) | [`LedgerOrder`]: the order as the ledger sees it |
//! | `a/` | alarm seq (8 bytes BE) | [`Alarm`] |
//! | `t/` | ticket (8 bytes BE) | [`MoveRecord`]: a shrink or close sent to a node, and its outcome |
//! | `u/` | order id (16 bytes) | [`RefundRequest`]: a refund asked of the order's node, and its outcome |
//! | `j/` | digest of a join token's secret | `enrol::tokens::JoinTokenRecord`: the node it enrols, expiry, use |
//! | `r/staged` | | [`StagedLayout`]: the operator's staged changes |
//! | `m/…` | counter name | next id (8 bytes BE) |

use edgecard_protocol::rebalance::{Destination, StagedChange};
use edgecard_protocol::{
    Epoch, KeyId, NodeId, OrderEvent, OrderEventV1, OrderEventV2, OrderId, Secret, Sku, SliceId, UnixMillis,
    EVENT_RECORD_VERSION, EVENT_RECORD_VERSION_V2,
};
use edgecard_store::{Storable, StoreError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Price {
    pub amount_minor: u64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ProductRecord {
    pub sku: Sku,
    /// (language tag, title); `en` first.
    pub titles: Vec<(String, String)>,
    pub prices: Vec<Price>,
    /// Automatic top-up of nodes' stock from the pool, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topup: Option<TopUpPolicy>,
}

/// When a node reports fewer than `low_watermark` sellable keys of the sku, the coordinator
/// grants it enough from the pool to reach `target` (as far as the pool allows).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct TopUpPolicy {
    pub low_watermark: u64,
    pub target: u64,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum KeyState {
    Pool,
    Granted {
        slice: SliceId,
        node_index: u32,
    },
    Sold {
        slice: SliceId,
        node_index: u32,
        order: OrderId,
    },
    /// Of a dark node's slice, inside its take window at reclaim: may have been sold.
    Quarantined {
        slice: SliceId,
        node_index: u32,
    },
    /// Quarantined, then written off by an operator: never sold again by anyone.
    WrittenOff {
        slice: SliceId,
        node_index: u32,
    },
    /// Sold to `order`, whose payment was then refunded: revoked (the merchant disables it at its
    /// issuer), never shown or sold again. Added after the other variants and no larger than
    /// `Sold`, so the archived layout of key records is unchanged.
    Revoked {
        slice: SliceId,
        node_index: u32,
        order: OrderId,
    },
}

impl KeyState {
    /// The node (index) that holds or held the key, if any.
    pub fn holder(&self) -> Option<(SliceId, u32)> {
        match *self {
            KeyState::Pool => None,
            KeyState::Granted { slice, node_index }
            | KeyState::Sold { slice, node_index, .. }
            | KeyState::Quarantined { slice, node_index }
            | KeyState::WrittenOff { slice, node_index }
            | KeyState::Revoked { slice, node_index, .. } => Some((slice, node_index)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct KeyRecord {
    pub secret: Secret,
    pub batch: u64,
    pub state: KeyState,
}

#[derive(Debug, Clone, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ImportBatch {
    pub id: u64,
    pub sku: Sku,
    pub at: UnixMillis,
    pub imported: u64,
    pub first_key: KeyId,
    pub last_key: KeyId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SliceRecord {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub node: NodeId,
    pub epoch: Epoch,
    pub issued_at: UnixMillis,
    pub lease_deadline: UnixMillis,
    /// Key ids as inclusive runs, since allocation takes the lowest free ids. Every key ever
    /// granted in the slice; each key's record says where it is now.
    pub key_runs: Vec<(u64, u64)>,
    #[serde(default = "default_take_window")]
    pub take_window: u64,
    #[serde(default)]
    pub state: SliceState,
}

fn default_take_window() -> u64 {
    u64::MAX
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SliceState {
    /// Selling under its lease, renewed while the node is in contact.
    #[default]
    Active,
    /// Closed by the coordinator (drain); the node releases what it has left.
    Closing { ticket: u64 },
    /// The node went dark past its lease: untouched keys went back to the pool, the take window
    /// is quarantined, and the node was told (under `reconcile_ticket`) to close the slice when
    /// it is back. `None` only in records written before reclaims queued that order.
    Reclaimed { at: UnixMillis, reconcile_ticket: Option<u64> },
    /// Nothing of the slice is left at the node.
    Closed,
}

impl SliceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SliceState::Active => "active",
            SliceState::Closing { .. } => "closing",
            SliceState::Reclaimed { .. } => "reclaimed",
            SliceState::Closed => "closed",
        }
    }
}

/// A shrink or close sent to a node under `ticket`, and what became of the keys it released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MoveRecord {
    #[serde(flatten)]
    pub order: MoveOrder,
    pub created_at: UnixMillis,
    /// Keys the donor released so far.
    pub released: u64,
    /// Released keys still waiting to be granted to the recipient (as id runs).
    #[serde(default)]
    pub pending_regrant: Vec<(u64, u64)>,
    /// Slices granted to the recipient from the released keys.
    #[serde(default)]
    pub regranted: Vec<SliceId>,
    pub state: MoveState,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    Move,
    Drain,
    /// A dark node, back in contact, told to close a reclaimed slice.
    Reconcile,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Sent; the donor has not answered yet.
    AwaitingDonor,
    /// The donor answered; a closed slice may still release keys of reservations as they end.
    Releasing,
    Done,
    /// The donor went dark before answering; its slice was reclaimed instead.
    DonorReclaimed,
}

/// What a shrink or close order asks of its donor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MoveOrder {
    pub ticket: u64,
    pub kind: MoveKind,
    pub sku: Sku,
    pub slice_id: SliceId,
    pub from: NodeId,
    pub to: Destination,
    pub requested: u64,
    pub close: bool,
}

impl MoveRecord {
    /// A move as sent to its donor: nothing released yet.
    pub fn sent(order: MoveOrder, created_at: UnixMillis) -> Self {
        MoveRecord {
            order,
            created_at,
            released: 0,
            pending_regrant: Vec::new(),
            regranted: Vec::new(),
            state: MoveState::AwaitingDonor,
        }
    }

    pub fn in_flight(&self) -> bool {
        matches!(self.state, MoveState::AwaitingDonor | MoveState::Releasing) || !self.pending_regrant.is_empty()
    }
}

/// The operator's staged changes; `apply --version` must name `version`.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct StagedLayout {
    pub version: u64,
    pub changes: Vec<StagedChange>,
}

/// A top-up granted to a node, kept on the node record while in flight and for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TopUpRecord {
    pub sku: Sku,
    pub slice_id: SliceId,
    pub keys: u64,
    pub at: UnixMillis,
    /// The control message that carries the grant; in flight until the node applied it.
    pub control_seq: u64,
}

impl SliceRecord {
    pub fn key_count(&self) -> u64 {
        self.key_runs.iter().map(|(a, b)| b - a + 1).sum()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.key_runs.iter().flat_map(|(a, b)| (*a..=*b).map(KeyId))
    }
}

/// Compresses ascending ids into inclusive runs.
pub fn runs_of(ids: &[KeyId]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == id.0 => *end = id.0,
            _ => runs.push((id.0, id.0)),
        }
    }
    runs
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeStock {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub available: u64,
    pub selling: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeRecord {
    pub node_id: NodeId,
    /// Small stable number used inside key states instead of the id string.
    pub index: u32,
    pub region: String,
    pub added_at: UnixMillis,
    pub revoked: bool,
    /// Highest event seq in the ledger for this node.
    pub events_high_water: u64,
    /// Newest seq the node reported in its outbox at its last contact.
    pub reported_newest: u64,
    pub next_control_seq: u64,
    pub control_applied: u64,
    pub last_contact: Option<UnixMillis>,
    pub stock: Vec<NodeStock>,
    /// Recent top-ups (newest last, a few kept).
    #[serde(default)]
    pub topups: Vec<TopUpRecord>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LedgerStatus {
    Reserved,
    Paid,
    Delivered,
    Expired,
    PaidAwaitingStock,
    // Added later, after the others, so that stored orders keep their meaning (unit variants:
    // the archived layout is unchanged).
    /// Paid with another amount or currency than the order's: nothing delivered, money to give
    /// back or settle by hand.
    PaymentMismatch,
    /// Refunded through the channel that took the payment; the keys are revoked.
    Refunded,
    /// To be refunded by hand at a provider without a refund call; the keys are revoked.
    RefundManual,
    /// The buyer disputed the payment at the provider.
    Disputed,
}

impl LedgerStatus {
    pub const ALL: [LedgerStatus; 9] = [
        LedgerStatus::Reserved,
        LedgerStatus::Paid,
        LedgerStatus::Delivered,
        LedgerStatus::Expired,
        LedgerStatus::PaidAwaitingStock,
        LedgerStatus::PaymentMismatch,
        LedgerStatus::Refunded,
        LedgerStatus::RefundManual,
        LedgerStatus::Disputed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerStatus::Reserved => "reserved",
            LedgerStatus::Paid => "paid",
            LedgerStatus::Delivered => "delivered",
            LedgerStatus::Expired => "expired",
            LedgerStatus::PaidAwaitingStock => "paid_awaiting_stock",
            LedgerStatus::PaymentMismatch => "payment_mismatch",
            LedgerStatus::Refunded => "refunded",
            LedgerStatus::RefundManual => "refund_manual",
            LedgerStatus::Disputed => "disputed",
        }
    }

    pub fn parse(raw: &str) -> Option<LedgerStatus> {
        LedgerStatus::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// An order as the coordinator's ledger knows it (no secrets: events carry key ids only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LedgerOrder {
    pub order_id: OrderId,
    pub node: NodeId,
    pub sku: Sku,
    pub quantity: u32,
    pub amount_minor: u64,
    pub currency: String,
    pub status: LedgerStatus,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub key_ids: Vec<KeyId>,
    pub channel: Option<String>,
    pub provider_txn: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Alarm {
    pub seq: u64,
    pub at: UnixMillis,
    pub node: NodeId,
    pub kind: String,
    pub detail: String,
}

/// A refund an operator asked for (or one the node reported on its own: made in the provider's
/// dashboard), and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RefundRequest {
    pub order_id: OrderId,
    pub node: NodeId,
    pub reason: String,
    pub requested_at: UnixMillis,
    /// The control message that carries it to the node (0 for a refund the node reported).
    pub control_seq: u64,
    pub state: RefundRequestState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RefundRequestState {
    /// Queued for the node, or being carried out there.
    Requested,
    /// The provider refunded the payment (`provider_refund` names it).
    Refunded { provider_refund: String, at: UnixMillis },
    /// The channel has no refund call: to be refunded by hand at the provider.
    Manual { at: UnixMillis },
    /// The node refused it for good (the order was never paid there).
    Refused { reason: String },
}

impl RefundRequestState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RefundRequestState::Requested => "requested",
            RefundRequestState::Refunded { .. } => "refunded",
            RefundRequestState::Manual { .. } => "manual",
            RefundRequestState::Refused { .. } => "refused",
        }
    }
}

pub fn refund_key(order: &OrderId) -> Vec<u8> {
    cat(&[b"u/", order.as_bytes()])
}

/// Which data dir of a node the coordinator syncs with, and whether it is fenced off. Kept apart
/// from [`NodeRecord`] so that records written before incarnations keep their layout.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct NodeLineage {
    /// 0 until the node's first upload that carries one.
    pub incarnation: u64,
    /// Incarnations this node had before (wiped or replaced data dirs), oldest first.
    pub previous: Vec<u64>,
    /// The ledger's high-water mark when this incarnation was adopted: its own events come after
    /// it, and the ones before belong to earlier data dirs (never restored into this one).
    #[serde(default)]
    pub since: u64,
    /// Set while the node's data dir is behind the ledger (restored from an older copy) or has
    /// diverged from it; the node sells nothing until it is cleared.
    pub fence: Option<Fence>,
    /// A foreign incarnation with history already refused (so its alarm is raised once).
    pub refused: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Fence {
    pub detected_at: UnixMillis,
    /// The node's newest event when the rollback was detected.
    pub node_newest: u64,
    /// The ledger's high-water mark for the node then.
    pub ledger_high_water: u64,
    /// The node sent an event that differs from the ledger's at the same seq: it is not a plain
    /// older copy, and stays fenced until an operator acts.
    pub diverged: bool,
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn product_key(sku: &Sku) -> Vec<u8> {
    cat(&[b"p/", sku.as_str().as_bytes()])
}

pub fn key_key(sku: &Sku, id: KeyId) -> Vec<u8> {
    cat(&[b"k/", sku.as_str().as_bytes(), &[0], &id.0.to_be_bytes()])
}

pub fn pool_key(sku: &Sku) -> Vec<u8> {
    cat(&[b"f/", sku.as_str().as_bytes()])
}

/// Keys in a list of inclusive runs.
pub fn runs_len(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|(a, b)| b - a + 1).sum()
}

/// Removes and returns the `count` lowest ids of `runs`, or `None` (and no change) if there are
/// fewer.
pub fn take_lowest(runs: &mut Vec<(u64, u64)>, count: u64) -> Option<Vec<KeyId>> {
    if runs_len(runs) < count {
        return None;
    }
    let mut taken = Vec::with_capacity(count as usize);
    while (taken.len() as u64) < count {
        let (start, end) = runs[0];
        let want = count - taken.len() as u64;
        let last = end.min(start + want - 1);
        taken.extend((start..=last).map(KeyId));
        if last == end {
            runs.remove(0);
        } else {
            runs[0].0 = last + 1;
        }
    }
    Some(taken)
}

/// Adds the inclusive run `[start, end]` to ascending, disjoint `runs`, merging neighbours.
pub fn add_run(runs: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    runs.push((start, end));
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (a, b) in runs.drain(..) {
        match merged.last_mut() {
            Some((_, last)) if a <= last.saturating_add(1) => *last = (*last).max(b),
            _ => merged.push((a, b)),
        }
    }
    *runs = merged;
}

/// Removes `id` from ascending, disjoint `runs`; whether it was there.
pub fn remove_id(runs: &mut Vec<(u64, u64)>, id: u64) -> bool {
    let Some(at) = runs.iter().position(|(a, b)| *a <= id && id <= *b) else { return false };
    let (a, b) = runs[at];
    match (a == id, b == id) {
        (true, true) => {
            runs.remove(at);
        }
        (true, false) => runs[at].0 = id + 1,
        (false, true) => runs[at].1 = id - 1,
        (false, false) => {
            runs[at].1 = id - 1;
            runs.insert(at + 1, (id + 1, b));
        }
    }
    true
}

pub fn hash_key(hash: &[u8; 32]) -> Vec<u8> {
    cat(&[b"h/", hash])
}

pub fn batch_key(id: u64) -> Vec<u8> {
    cat(&[b"b/", &id.to_be_bytes()])
}

pub fn slice_key(id: SliceId) -> Vec<u8> {
    cat(&[b"s/", &id.0.to_be_bytes()])
}

pub fn node_key(node: &NodeId) -> Vec<u8> {
    cat(&[b"n/", node.as_str().as_bytes()])
}

pub fn control_prefix(node: &NodeId) -> Vec<u8> {
    cat(&[b"q/", node.as_str().as_bytes(), &[0]])
}

pub fn control_key(node: &NodeId, seq: u64) -> Vec<u8> {
    cat(&[b"q/", node.as_str().as_bytes(), &[0], &seq.to_be_bytes()])
}

pub fn ledger_key(node: &NodeId, seq: u64) -> Vec<u8> {
    cat(&[b"l/", node.as_str().as_bytes(), &[0], &seq.to_be_bytes()])
}

pub fn ledger_prefix(node: &NodeId) -> Vec<u8> {
    cat(&[b"l/", node.as_str().as_bytes(), &[0]])
}

pub fn lineage_key(node: &NodeId) -> Vec<u8> {
    cat(&[b"i/", node.as_str().as_bytes()])
}

/// Ledger events are stored in their own record format, which changed when reservations began to
/// carry their token's digest (2) and when payment problems, refunds and disputes became events (3).
pub fn encode_event(event: &OrderEvent) -> Result<Vec<u8>, StoreError> {
    edgecard_store::record::encode_versioned("ledger event", event, EVENT_RECORD_VERSION)
}

pub fn decode_event(raw: &[u8]) -> Result<OrderEvent, StoreError> {
    use edgecard_store::record::{decode_evolved, decode_or_older};
    decode_or_older("ledger event", raw, EVENT_RECORD_VERSION, |older| {
        decode_evolved::<OrderEventV2, OrderEventV1>("ledger event", older, EVENT_RECORD_VERSION_V2).map(Into::into)
    })
}

pub fn order_key(id: &OrderId) -> Vec<u8> {
    cat(&[b"o/", id.as_bytes()])
}

pub fn alarm_key(seq: u64) -> Vec<u8> {
    cat(&[b"a/", &seq.to_be_bytes()])
}

pub fn move_key(ticket: u64) -> Vec<u8> {
    cat(&[b"t/", &ticket.to_be_bytes()])
}

pub const STAGED_LAYOUT: &[u8] = b"r/staged";

pub fn counter_key(name: &str) -> Vec<u8> {
    cat(&[b"m/", name.as_bytes()])
}

/// The trailing 8-byte big-endian id of a key.
pub fn trailing_u64(raw: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = raw.get(raw.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// A stored record (versioned rkyv; see `edgecard_store::record`).
pub fn encode<T: Storable>(value: &T) -> Result<Vec<u8>, StoreError> {
    edgecard_store::record::encode(std::any::type_name::<T>(), value)
}

pub fn decode<T: Storable>(what: &str, raw: &[u8]) -> Result<T, StoreError> {
    edgecard_store::record::decode(what, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_compress_ascending_ids() {
        let ids: Vec<KeyId> = [1, 2, 3, 7, 8, 10].into_iter().map(KeyId).collect();
        let runs = runs_of(&ids);
        assert_eq!(runs, vec![(1, 3), (7, 8), (10, 10)]);
        let slice = SliceRecord {
            slice_id: SliceId(1),
            sku: Sku::new("a").unwrap_or_else(|_| unreachable!()),
            node: NodeId::new("n").unwrap_or_else(|_| unreachable!()),
            epoch: Epoch(1),
            issued_at: UnixMillis(0),
            lease_deadline: UnixMillis(1),
            key_runs: runs,
            take_window: 10,
            state: SliceState::Active,
        };
        assert_eq!(slice.key_count(), 6);
        assert_eq!(slice.key_ids().collect::<Vec<_>>(), ids);
        assert_eq!(runs_of(&[]), vec![]);
    }

    #[test]
    fn pool_runs_give_lowest_ids_and_merge() {
        let mut runs = vec![(1, 3), (7, 8)];
        assert_eq!(take_lowest(&mut runs, 6), None);
        assert_eq!(runs, vec![(1, 3), (7, 8)], "a failed take changes nothing");
        assert_eq!(
            take_lowest(&mut runs, 4).map(|v| v.iter().map(|k| k.0).collect::<Vec<_>>()),
            Some(vec![1, 2, 3, 7])
        );
        assert_eq!(runs, vec![(8, 8)]);
        add_run(&mut runs, 9, 12);
        add_run(&mut runs, 2, 4);
        assert_eq!(runs, vec![(2, 4), (8, 12)]);
        add_run(&mut runs, 5, 7);
        assert_eq!(runs, vec![(2, 12)]);
        assert_eq!(runs_len(&runs), 11);
        assert!(remove_id(&mut runs, 5));
        assert!(!remove_id(&mut runs, 5));
        assert!(remove_id(&mut runs, 2) && remove_id(&mut runs, 12));
        assert_eq!(runs, vec![(3, 4), (6, 11)]);
    }

    /// `LedgerOrder` and `KeyRecord` as stored before statuses and key states were added.
    mod before_refunds {
        use super::super::{KeyId, NodeId, OrderId, Secret, Sku, SliceId, UnixMillis};

        #[derive(serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        pub enum LedgerStatus {
            Reserved,
            Paid,
            Delivered,
            Expired,
            PaidAwaitingStock,
        }

        #[derive(serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        pub struct LedgerOrder {
            pub order_id: OrderId,
            pub node: NodeId,
            pub sku: Sku,
            pub quantity: u32,
            pub amount_minor: u64,
            pub currency: String,
            pub status: LedgerStatus,
            pub created_at: UnixMillis,
            pub updated_at: UnixMillis,
            pub key_ids: Vec<KeyId>,
            pub channel: Option<String>,
            pub provider_txn: Option<String>,
        }

        #[derive(serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        pub enum KeyState {
            Pool,
            Granted { slice: SliceId, node_index: u32 },
            Sold { slice: SliceId, node_index: u32, order: OrderId },
            Quarantined { slice: SliceId, node_index: u32 },
            WrittenOff { slice: SliceId, node_index: u32 },
        }

        #[derive(serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        pub struct KeyRecord {
            pub secret: Secret,
            pub batch: u64,
            pub state: KeyState,
        }
    }

    #[test]
    fn orders_and_keys_stored_before_refunds_read_the_same() {
        let order = before_refunds::LedgerOrder {
            order_id: OrderId::from_bytes([3; 16]),
            node: NodeId::new("eu-1").unwrap_or_else(|_| unreachable!()),
            sku: Sku::new("game").unwrap_or_else(|_| unreachable!()),
            quantity: 2,
            amount_minor: 1998,
            currency: "USD".into(),
            status: before_refunds::LedgerStatus::PaidAwaitingStock,
            created_at: UnixMillis(5),
            updated_at: UnixMillis(6),
            key_ids: vec![KeyId(4)],
            channel: Some("stripe".into()),
            provider_txn: Some("cs_1".into()),
        };
        let read: LedgerOrder = decode("order", &encode(&order).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.status, LedgerStatus::PaidAwaitingStock);
        assert_eq!((read.quantity, read.key_ids, read.provider_txn.as_deref()), (2, vec![KeyId(4)], Some("cs_1")));
        for (old, new) in [
            (before_refunds::KeyState::Pool, KeyState::Pool),
            (
                before_refunds::KeyState::Sold {
                    slice: SliceId(9),
                    node_index: 2,
                    order: OrderId::from_bytes([3; 16]),
                },
                KeyState::Sold { slice: SliceId(9), node_index: 2, order: OrderId::from_bytes([3; 16]) },
            ),
            (
                before_refunds::KeyState::WrittenOff { slice: SliceId(9), node_index: 2 },
                KeyState::WrittenOff { slice: SliceId(9), node_index: 2 },
            ),
        ] {
            let secret = Secret::new("KEY-1".to_string()).unwrap_or_else(|_| unreachable!());
            let stored = before_refunds::KeyRecord { secret, batch: 1, state: old };
            let read: KeyRecord = decode("key", &encode(&stored).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(read.state, new);
        }
    }

    #[test]
    fn statuses_parse_back() {
        for status in LedgerStatus::ALL {
            assert_eq!(LedgerStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(LedgerStatus::parse("lost"), None);
    }

    #[test]
    fn trailing_ids_parse() {
        assert_eq!(trailing_u64(&ledger_key(&NodeId::new("eu-1").unwrap_or_else(|_| unreachable!()), 42)), Some(42));
        assert_eq!(trailing_u64(b"short"), None);
    }
}
