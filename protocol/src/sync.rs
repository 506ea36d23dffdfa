//! Order sync between a node and the coordinator: the messages and the node's sans-IO client.
//!
//! The node uploads its outbox in batches, one bidirectional stream per batch: a [`SyncUpload`]
//! goes up, a [`SyncAck`] comes back on the same stream. The coordinator ingests events keyed by
//! (node id, seq) idempotently in one durable commit and answers with its high-water mark, so a
//! batch re-sent after a lost ack is harmless. Control messages for the node (grants, catalog)
//! ride on the ack, numbered; the node says in each upload which it has applied, so a lost ack
//! only delays them.
//!
//! Each node data dir has an *incarnation* id, made when the dir is created. A data dir restored
//! from an older copy keeps its id but has fewer events than the ledger; a wiped one has a new id.
//! The coordinator answers either with what the node lost (`restore`: the node's own events the
//! ledger holds past its newest) and confirms the incarnation once the node has caught up; after
//! a restart a node sells nothing until it is confirmed, so a restored copy never resells a key
//! the ledger knows as taken.
//!
//! [`SyncClient`] decides when to upload, what to send and how to react to acks and failures. It
//! does no I/O and reads no clock: callers pass `now` in milliseconds of a monotonic clock.

use crate::envelope::{self, EnvelopeError, MessageKind};
use crate::event::OrderEvent;
use crate::ids::{Epoch, NodeId, OrderId, Sku, SliceId};

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SyncUpload {
    pub node_id: NodeId,
    /// The id of the node's data dir, made when it was created.
    pub incarnation: u64,
    /// The newest event seq in the node's outbox (durable), whether or not it is in this upload.
    pub newest_seq: u64,
    /// Outbox events after the last acknowledged one, ascending by seq. May be empty (a poll).
    pub events: Vec<OrderEvent>,
    /// Highest control message seq the node has applied.
    pub control_applied: u64,
    /// What the node can sell now, per slice, for the coordinator's status view.
    pub stock: Vec<SliceStock>,
    /// Control messages (at or below `control_applied`) the node refused for good: a grant that
    /// failed verification or conflicts with what the node holds, a catalog it cannot read. At
    /// most [`MAX_REFUSED_CONTROL`]; the rest follow in later uploads.
    pub refused_control: Vec<RefusedControl>,
    /// "Find my order" requests made at this node, for the coordinator to pass to the other
    /// nodes (at most [`MAX_UPLOAD_LOOKUPS`]). Best effort: a lookup lost with an upload is
    /// asked again by the buyer.
    pub lookups: Vec<OrderLookup>,
}

/// A buyer's "find my order" request: the address (normalized: trimmed, lowercase) and the
/// language of the mails.
#[derive(Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OrderLookup {
    pub email: String,
    pub lang: String,
}

/// Never prints the address.
impl std::fmt::Debug for OrderLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderLookup").field("lang", &self.lang).finish_non_exhaustive()
    }
}

/// Most lookups in one upload.
pub const MAX_UPLOAD_LOOKUPS: usize = 16;
/// Longest address, in bytes (RFC 5321's path limit).
pub const MAX_LOOKUP_EMAIL: usize = 254;
/// The languages a lookup's mails may be in.
pub const LOOKUP_LANGS: [&str; 2] = ["en", "zh-CN"];

/// Whether a lookup may travel: a plausible normalized address and a known language.
pub fn valid_lookup(email: &str, lang: &str) -> bool {
    let plausible = email.len() <= MAX_LOOKUP_EMAIL
        && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && email.matches('@').count() == 1
        && !email.chars().any(|c| c.is_control() || c.is_whitespace() || c.is_uppercase());
    plausible && LOOKUP_LANGS.contains(&lang)
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RefusedControl {
    pub seq: u64,
    /// Why, for the operator (at most [`MAX_REFUSAL_TEXT`] bytes).
    pub reason: String,
    /// The node holds nothing of the slice this grant was for: the coordinator may take its keys
    /// back. False for everything but grants.
    pub holds_nothing: bool,
}

/// Most refused control messages reported in one upload.
pub const MAX_REFUSED_CONTROL: usize = 64;
/// Longest refusal reason, in bytes.
pub const MAX_REFUSAL_TEXT: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SliceStock {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub available: u64,
    pub selling: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SyncAck {
    /// Every event of this node with seq up to here is durably in the ledger (or durably
    /// refused and recorded as an alarm). The node may prune its outbox through it.
    pub events_high_water: u64,
    /// Control messages after the upload's `control_applied`, ascending by seq.
    pub control: Vec<ControlMessage>,
    /// The highest seq of this node in the ledger, which may be past what the node has: a data
    /// dir restored from an older copy, or a new one.
    pub ledger_high_water: u64,
    /// The node's own events past its `newest_seq` that the ledger holds (a restored data dir
    /// lost them), ascending and contiguous, at most a bounded number per ack.
    pub restore: Vec<OrderEvent>,
    /// The coordinator knows the node's incarnation and the node has everything the ledger
    /// holds: it may sell. Until then it must not write events.
    pub confirmed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ControlMessage {
    pub seq: u64,
    pub body: ControlBody,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ControlBody {
    /// A `SignedGrant` envelope: install the slice, or renew its lease.
    Grant { signed_grant: Vec<u8> },
    /// The full catalog the node should sell.
    Catalog { products: Vec<CatalogProduct> },
    /// A `SignedRenewal` envelope: a later lease deadline for a slice the node holds.
    Renew { signed_renewal: Vec<u8> },
    /// Give keys of a slice back (demarcation: the donor releases first, and reports the
    /// released keys as a `Released` event with `ticket`). `count` available keys are dropped,
    /// highest ids first; keys under open reservations stay. With `close`, the slice stops
    /// selling, every available key is dropped, and keys of reservations that later end unpaid
    /// are dropped and reported too. `epoch` becomes the slice's epoch, so renewals issued
    /// before the shrink no longer apply.
    Shrink { slice_id: SliceId, sku: Sku, epoch: Epoch, count: u64, close: bool, ticket: u64 },
    /// Refund the payment of `order_id` through the channel that took it (the node holds that
    /// channel's credentials); its keys are revoked. The node records the request durably and
    /// carries it out on its own; it answers with a `Refunded` event, or refuses the message for
    /// good when the order was never paid. Repeating it changes nothing.
    Refund { order_id: OrderId, reason: String },
    /// "Find my order" asked at another node: mail the address fresh links to this node's orders
    /// made with it. A node without mail applies it as nothing to do. (Its `Debug` hides the
    /// address.)
    FindOrders { lookup: OrderLookup },
}

/// Longest refund reason, in bytes.
pub const MAX_REFUND_REASON: usize = 200;

/// Whether `reason` may travel in a refund: short, without control characters.
pub fn valid_refund_reason(reason: &str) -> bool {
    reason.len() <= MAX_REFUND_REASON && !reason.chars().any(char::is_control)
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CatalogProduct {
    pub sku: Sku,
    /// (language tag, title)
    pub titles: Vec<(String, String)>,
    /// (amount in minor units, ISO 4217 code); the first is the default.
    pub prices: Vec<(u64, String)>,
}

/// Largest number of events in one upload.
pub const MAX_UPLOAD_EVENTS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("malformed sync message: {0}")]
    Malformed(#[from] EnvelopeError),
    #[error("invalid sync message: {0}")]
    Invalid(String),
}

impl SyncUpload {
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        Ok(envelope::encode(MessageKind::SyncUpload, self)?)
    }

    /// Decodes and validates: ids, event contents, order and sender.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SyncError> {
        let upload: SyncUpload = envelope::decode(MessageKind::SyncUpload, bytes)?;
        upload.node_id.validate().map_err(|e| SyncError::Invalid(e.to_string()))?;
        if upload.events.len() > MAX_UPLOAD_EVENTS {
            return Err(SyncError::Invalid(format!("{} events in one upload", upload.events.len())));
        }
        let mut last = 0;
        for event in &upload.events {
            event.validate().map_err(|e| SyncError::Invalid(e.to_string()))?;
            if event.node_id != upload.node_id {
                return Err(SyncError::Invalid("event from another node".into()));
            }
            if event.seq <= last {
                return Err(SyncError::Invalid("event seqs must increase".into()));
            }
            last = event.seq;
        }
        for stock in &upload.stock {
            stock.sku.validate().map_err(|e| SyncError::Invalid(e.to_string()))?;
        }
        if upload.refused_control.len() > MAX_REFUSED_CONTROL {
            return Err(SyncError::Invalid(format!("{} refused control messages", upload.refused_control.len())));
        }
        for refused in &upload.refused_control {
            if refused.seq > upload.control_applied {
                return Err(SyncError::Invalid("a refused control message not yet applied".into()));
            }
            if refused.reason.len() > MAX_REFUSAL_TEXT || refused.reason.chars().any(char::is_control) {
                return Err(SyncError::Invalid("refusal reason too long or with control characters".into()));
            }
        }
        if upload.lookups.len() > MAX_UPLOAD_LOOKUPS {
            return Err(SyncError::Invalid(format!("{} lookups in one upload", upload.lookups.len())));
        }
        if !upload.lookups.iter().all(|l| valid_lookup(&l.email, &l.lang)) {
            return Err(SyncError::Invalid("a lookup with a malformed address or an unknown language".into()));
        }
        Ok(upload)
    }
}

impl SyncAck {
    pub fn to_bytes(&self) -> Result<Vec<u8>, SyncError> {
        Ok(envelope::encode(MessageKind::SyncAck, self)?)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SyncError> {
        let ack: SyncAck = envelope::decode(MessageKind::SyncAck, bytes)?;
        let mut previous: Option<u64> = None;
        for event in &ack.restore {
            event.validate().map_err(|e| SyncError::Invalid(e.to_string()))?;
            if previous.is_some_and(|p| p.checked_add(1) != Some(event.seq)) || event.seq > ack.ledger_high_water {
                return Err(SyncError::Invalid("restored events must be contiguous and in the ledger".into()));
            }
            previous = Some(event.seq);
        }
        let mut last = 0;
        for message in &ack.control {
            if message.seq <= last {
                return Err(SyncError::Invalid("control seqs must increase".into()));
            }
            last = message.seq;
            match &message.body {
                ControlBody::Catalog { products } => {
                    for product in products {
                        product.sku.validate().map_err(|e| SyncError::Invalid(e.to_string()))?;
                    }
                }
                ControlBody::Shrink { sku, .. } => sku.validate().map_err(|e| SyncError::Invalid(e.to_string()))?,
                ControlBody::Refund { reason, .. } => {
                    if !valid_refund_reason(reason) {
                        return Err(SyncError::Invalid("refund reason too long or with control characters".into()));
                    }
                }
                ControlBody::FindOrders { lookup } => {
                    if !valid_lookup(&lookup.email, &lookup.lang) {
                        return Err(SyncError::Invalid(
                            "a lookup with a malformed address or an unknown language".into(),
                        ));
                    }
                }
                ControlBody::Grant { .. } | ControlBody::Renew { .. } => {}
            }
        }
        Ok(ack)
    }
}

/// Timing of the sync client, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTiming {
    /// Upload (or poll for control messages) at least this often while idle.
    pub idle_poll_ms: u64,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub max_batch_events: usize,
}

impl Default for SyncTiming {
    fn default() -> Self {
        SyncTiming { idle_poll_ms: 1000, backoff_min_ms: 200, backoff_max_ms: 10_000, max_batch_events: 1024 }
    }
}

/// What to upload: the events after `after_seq`, at most `max_events` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadPlan {
    pub after_seq: u64,
    pub max_events: usize,
    pub control_applied: u64,
}

/// The result of an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// Outbox entries up to here may be deleted.
    pub prune_through: u64,
    /// Events the node lost, to restore (then report with [`SyncClient::restored_through`])
    /// before anything else.
    pub restore: Vec<OrderEvent>,
    /// See [`SyncAck::ledger_high_water`].
    pub ledger_high_water: u64,
    pub confirmed: bool,
    /// Control messages to apply, in order; report each with [`SyncClient::control_applied`].
    pub control: Vec<ControlMessage>,
}

/// The node's side of sync, without I/O.
#[derive(Debug, Clone)]
pub struct SyncClient {
    timing: SyncTiming,
    acked: u64,
    control_applied: u64,
    /// Highest seq of the upload in flight (its `after_seq` if it carried no events).
    in_flight: Option<u64>,
    next_upload_at: u64,
    failures: u32,
    rng: u64,
    /// Events per upload now: halved after each failure (a bad link gets smaller batches, so
    /// each has a better chance to get through and a failure resends less), doubled back towards
    /// `max_batch_events` after each success.
    batch_limit: usize,
}

/// Smallest batch the client shrinks to under trouble.
pub const MIN_BATCH_EVENTS: usize = 16;

impl SyncClient {
    /// `acked` and `control_applied` come from the node's store, so a restart resumes.
    pub fn new(timing: SyncTiming, acked: u64, control_applied: u64, seed: u64) -> Self {
        let batch_limit = timing.max_batch_events.clamp(1, MAX_UPLOAD_EVENTS);
        SyncClient {
            timing,
            acked,
            control_applied,
            in_flight: None,
            next_upload_at: 0,
            failures: 0,
            rng: seed | 1,
            batch_limit,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn control_applied(&self) -> u64 {
        self.control_applied
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Events the next upload may carry.
    pub fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    /// Whether to upload now, given the newest seq in the outbox.
    pub fn poll_upload(&mut self, now_ms: u64, newest_outbox_seq: u64) -> Option<UploadPlan> {
        if self.in_flight.is_some() {
            return None;
        }
        let pending = newest_outbox_seq > self.acked;
        let due = now_ms >= self.next_upload_at;
        let backing_off = self.failures > 0;
        if !due && (backing_off || !pending) {
            return None;
        }
        let max_events = self.batch_limit;
        let last = newest_outbox_seq.min(self.acked.saturating_add(max_events as u64)).max(self.acked);
        self.in_flight = Some(last);
        Some(UploadPlan { after_seq: self.acked, max_events, control_applied: self.control_applied })
    }

    /// The coordinator answered. An ack that goes backwards or past what was sent is a protocol
    /// error: the caller drops the connection (and reports a failure).
    pub fn handle_ack(&mut self, now_ms: u64, ack: &SyncAck) -> Result<AckOutcome, SyncError> {
        let Some(sent_through) = self.in_flight.take() else {
            return Err(SyncError::Invalid("ack without an upload in flight".into()));
        };
        if ack.events_high_water < self.acked || ack.events_high_water > sent_through {
            self.register_failure(now_ms);
            return Err(SyncError::Invalid(format!(
                "ack {} outside [{}, {}]",
                ack.events_high_water, self.acked, sent_through
            )));
        }
        self.acked = ack.events_high_water;
        self.failures = 0;
        let ceiling = self.timing.max_batch_events.clamp(1, MAX_UPLOAD_EVENTS);
        self.batch_limit = self.batch_limit.saturating_mul(2).min(ceiling);
        self.next_upload_at = now_ms.saturating_add(self.timing.idle_poll_ms);
        let control = ack.control.iter().filter(|m| m.seq > self.control_applied).cloned().collect();
        Ok(AckOutcome {
            prune_through: self.acked,
            restore: ack.restore.clone(),
            ledger_high_water: ack.ledger_high_water,
            confirmed: ack.confirmed,
            control,
        })
    }

    /// The node has durably restored (or skipped, as a new data dir) its events through `seq`:
    /// the ledger holds them, so they count as acknowledged.
    /// Uploads again at once: what comes next (more to restore, or the confirmation) should not
    /// wait for the idle poll.
    pub fn restored_through(&mut self, seq: u64, now_ms: u64) {
        self.acked = self.acked.max(seq);
        self.next_upload_at = now_ms;
    }

    /// Records that control message `seq` was applied durably.
    pub fn mark_control_applied(&mut self, seq: u64) {
        self.control_applied = self.control_applied.max(seq);
    }

    /// The upload failed (connection, stream, timeout, or a refused batch).
    pub fn handle_failure(&mut self, now_ms: u64) {
        self.in_flight = None;
        self.register_failure(now_ms);
    }

    fn register_failure(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let floor = MIN_BATCH_EVENTS.min(self.timing.max_batch_events.clamp(1, MAX_UPLOAD_EVENTS));
        self.batch_limit = (self.batch_limit / 2).max(floor);
        let exponent = self.failures.saturating_sub(1).min(20);
        let base = self.timing.backoff_min_ms.saturating_mul(1u64 << exponent).min(self.timing.backoff_max_ms);
        // Full jitter in [base/2, base], so reconnecting nodes do not stampede together.
        let jitter = self.next_random() % (base / 2 + 1);
        self.next_upload_at = now_ms.saturating_add(base - jitter);
    }

    /// When the client next wants to be polled (if nothing else happens first).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.in_flight.is_none().then_some(self.next_upload_at)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: deterministic per seed, which keeps simulations replayable.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// ALPN protocol id of the sync link (QUIC, mutual TLS).
pub const SYNC_ALPN: &[u8] = b"edgecard-sync/1";

/// Largest sync message on the wire, upload or ack: the envelope's payload limit plus room for
/// its header. A stream longer than this is refused unread.
pub const MAX_SYNC_MESSAGE_BYTES: usize = envelope::MAX_PAYLOAD + 64;

/// QUIC application error codes of the sync link: a stream reset (one upload failed) or a
/// connection close (the node may not sync at all). Both sides read the code; the text, if any,
/// travels only in a connection close's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SyncErrorCode {
    /// A clean close; not an error.
    Closed = 0,
    /// Stream: the bytes are not a valid [`SyncUpload`] (or [`SyncAck`]).
    Malformed = 1,
    /// Stream: the upload names a node other than the one in the client certificate.
    WrongNode = 2,
    /// Stream: the message is longer than [`MAX_SYNC_MESSAGE_BYTES`].
    TooLarge = 3,
    /// Stream: the coordinator could not take the batch now; the same batch may be retried.
    Unavailable = 4,
    /// Stream: the coordinator refused the batch.
    Refused = 5,
    /// Connection: the node's certificate has been revoked.
    Revoked = 16,
    /// Connection: the client certificate names no valid node.
    BadIdentity = 17,
    /// Connection: the coordinator is shutting down.
    ShuttingDown = 18,
    /// Connection: the peer broke the sync protocol (for example an ack out of range).
    Protocol = 19,
}

impl SyncErrorCode {
    pub const ALL: [SyncErrorCode; 10] = [
        SyncErrorCode::Closed,
        SyncErrorCode::Malformed,
        SyncErrorCode::WrongNode,
        SyncErrorCode::TooLarge,
        SyncErrorCode::Unavailable,
        SyncErrorCode::Refused,
        SyncErrorCode::Revoked,
        SyncErrorCode::BadIdentity,
        SyncErrorCode::ShuttingDown,
        SyncErrorCode::Protocol,
    ];

    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code for a number read off the wire; `None` for codes this version does not know.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| u64::from(c.code()) == code)
    }
}

impl std::fmt::Display for SyncErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            SyncErrorCode::Closed => "closed",
            SyncErrorCode::Malformed => "malformed message",
            SyncErrorCode::WrongNode => "upload for another node",
            SyncErrorCode::TooLarge => "message too large",
            SyncErrorCode::Unavailable => "coordinator unavailable",
            SyncErrorCode::Refused => "batch refused",
            SyncErrorCode::Revoked => "node revoked",
            SyncErrorCode::BadIdentity => "certificate names no node",
            SyncErrorCode::ShuttingDown => "coordinator shutting down",
            SyncErrorCode::Protocol => "sync protocol violation",
        };
        f.write_str(text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::event::OrderEventKind;
    use crate::ids::{KeyId, OrderId, UnixMillis};

    fn timing() -> SyncTiming {
        SyncTiming { idle_poll_ms: 1000, backoff_min_ms: 100, backoff_max_ms: 1600, max_batch_events: 10 }
    }

    fn ack(hw: u64, control: &[u64]) -> SyncAck {
        SyncAck {
            events_high_water: hw,
            control: control
                .iter()
                .map(|seq| ControlMessage { seq: *seq, body: ControlBody::Grant { signed_grant: vec![1, 2, 3] } })
                .collect(),
            ledger_high_water: hw,
            restore: vec![],
            confirmed: true,
        }
    }

    #[test]
    fn uploads_pending_events_in_bounded_batches() {
        let mut client = SyncClient::new(timing(), 0, 0, 7);
        let plan = client.poll_upload(0, 25).unwrap();
        assert_eq!(plan, UploadPlan { after_seq: 0, max_events: 10, control_applied: 0 });
        assert_eq!(client.poll_upload(0, 25), None, "one upload in flight at a time");
        let outcome = client.handle_ack(5, &ack(10, &[])).unwrap();
        assert_eq!(outcome.prune_through, 10);
        // More is pending: the next upload goes at once, not at the idle poll.
        assert_eq!(client.poll_upload(6, 25).unwrap().after_seq, 10);
    }

    #[test]
    fn idle_client_polls_for_control_messages() {
        let mut client = SyncClient::new(timing(), 4, 0, 7);
        assert!(client.poll_upload(0, 4).is_some(), "first contact at once");
        client.handle_ack(0, &ack(4, &[1, 2])).unwrap();
        assert_eq!(client.poll_upload(500, 4), None, "idle: wait for the poll interval");
        assert_eq!(client.poll_timeout(), Some(1000));
        assert!(client.poll_upload(1000, 4).is_some());
    }

    #[test]
    fn control_messages_already_applied_are_dropped() {
        let mut client = SyncClient::new(timing(), 0, 0, 7);
        client.poll_upload(0, 0).unwrap();
        let outcome = client.handle_ack(0, &ack(0, &[1, 2])).unwrap();
        assert_eq!(outcome.control.len(), 2);
        client.mark_control_applied(1);
        client.poll_upload(2000, 0).unwrap();
        // The ack carrying 1 and 2 again (the coordinator had not seen our report yet).
        let outcome = client.handle_ack(2000, &ack(0, &[1, 2])).unwrap();
        assert_eq!(outcome.control.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn failures_back_off_exponentially_with_bounded_jitter() {
        let mut client = SyncClient::new(timing(), 0, 0, 99);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            client.poll_upload(now, 5).unwrap();
            client.handle_failure(now);
            let next = client.poll_timeout().unwrap();
            assert_eq!(client.poll_upload(next - 1, 5), None, "no retry before the backoff");
            delays.push(next - now);
            now = next;
        }
        for (i, delay) in delays.iter().enumerate() {
            let base = (100u64 << i).min(1600);
            assert!(*delay >= base / 2 && *delay <= base, "attempt {i}: {delay} not in [{}, {base}]", base / 2);
        }
        client.poll_upload(now, 5).unwrap();
        client.handle_ack(now, &ack(5, &[])).unwrap();
        assert_eq!(client.consecutive_failures(), 0);
    }

    #[test]
    fn batches_shrink_after_failures_and_grow_back_after_successes() {
        let timing = SyncTiming { max_batch_events: 1024, ..timing() };
        let mut client = SyncClient::new(timing, 0, 0, 1);
        let mut now = 0;
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let plan = client.poll_upload(now, 10_000).unwrap();
            sizes.push(plan.max_events);
            client.handle_failure(now);
            now = client.poll_timeout().unwrap();
        }
        assert_eq!(sizes, vec![1024, 512, 256, 128, 64, 32, 16, 16], "halved down to the floor");
        let mut grown = Vec::new();
        for _ in 0..8 {
            let plan = client.poll_upload(now, 10_000).unwrap();
            grown.push(plan.max_events);
            let through = plan.after_seq + plan.max_events as u64;
            client.handle_ack(now, &ack(through, &[])).unwrap();
            now = client.poll_timeout().unwrap();
        }
        assert_eq!(grown, vec![16, 32, 64, 128, 256, 512, 1024, 1024], "doubled back to the configured size");
    }

    #[test]
    fn acks_out_of_range_are_protocol_errors() {
        let mut client = SyncClient::new(timing(), 5, 0, 1);
        client.poll_upload(0, 8).unwrap();
        assert!(client.handle_ack(0, &ack(9, &[])).is_err(), "acked more than was sent");
        client.poll_upload(10_000, 8).unwrap();
        assert!(client.handle_ack(10_000, &ack(4, &[])).is_err(), "ack went backwards");
        assert_eq!(client.acked(), 5);
        assert!(client.handle_ack(10_000, &ack(5, &[])).is_err(), "no upload in flight");
    }

    fn event(node: &NodeId, seq: u64) -> OrderEvent {
        OrderEvent {
            node_id: node.clone(),
            seq,
            at: UnixMillis(1),
            order_id: OrderId::from_bytes([seq as u8; 16]),
            sku: Sku::new("game").unwrap(),
            kind: OrderEventKind::Delivered { key_ids: vec![KeyId(seq)] },
        }
    }

    #[test]
    fn uploads_round_trip_and_reject_foreign_or_unordered_events() {
        let node = NodeId::new("eu-1").unwrap();
        let upload = SyncUpload {
            node_id: node.clone(),
            incarnation: 7,
            newest_seq: 2,
            events: vec![event(&node, 1), event(&node, 2)],
            control_applied: 3,
            stock: vec![SliceStock {
                slice_id: SliceId(1),
                sku: Sku::new("game").unwrap(),
                available: 5,
                selling: true,
            }],
            refused_control: vec![RefusedControl { seq: 2, reason: "bad signature".into(), holds_nothing: true }],
            lookups: vec![OrderLookup { email: "buyer@example.com".into(), lang: "zh-CN".into() }],
        };
        assert_eq!(SyncUpload::from_bytes(&upload.to_bytes().unwrap()).unwrap(), upload);
        assert!(!format!("{upload:?}").contains("buyer@"), "Debug shows the address");
        for (email, lang) in [
            ("Buyer@example.com", "en"),
            ("buyer example.com", "en"),
            ("@example.com", "en"),
            ("a@b@example.com", "en"),
            ("buyer@example.com", "fr"),
        ] {
            let mut bad = upload.clone();
            bad.lookups[0] = OrderLookup { email: email.into(), lang: lang.into() };
            assert!(SyncUpload::from_bytes(&bad.to_bytes().unwrap()).is_err(), "{email} {lang}");
        }
        let mut long = upload.clone();
        long.lookups[0].email = format!("{}@example.com", "a".repeat(MAX_LOOKUP_EMAIL));
        assert!(SyncUpload::from_bytes(&long.to_bytes().unwrap()).is_err());
        let mut many = upload.clone();
        many.lookups = vec![many.lookups[0].clone(); MAX_UPLOAD_LOOKUPS + 1];
        assert!(SyncUpload::from_bytes(&many.to_bytes().unwrap()).is_err(), "too many lookups");
        many.lookups.truncate(MAX_UPLOAD_LOOKUPS);
        assert!(SyncUpload::from_bytes(&many.to_bytes().unwrap()).is_ok());

        let mut unapplied = upload.clone();
        unapplied.refused_control[0].seq = 4;
        assert!(SyncUpload::from_bytes(&unapplied.to_bytes().unwrap()).is_err(), "refused before it was applied");
        let mut noisy = upload.clone();
        noisy.refused_control[0].reason = "line\nbreak".into();
        assert!(SyncUpload::from_bytes(&noisy.to_bytes().unwrap()).is_err());
        let mut long = upload.clone();
        long.refused_control[0].reason = "x".repeat(MAX_REFUSAL_TEXT + 1);
        assert!(SyncUpload::from_bytes(&long.to_bytes().unwrap()).is_err());

        let mut foreign = upload.clone();
        foreign.events[1] = event(&NodeId::new("us-1").unwrap(), 2);
        assert!(SyncUpload::from_bytes(&foreign.to_bytes().unwrap()).is_err());
        let mut unordered = upload.clone();
        unordered.events.swap(0, 1);
        assert!(SyncUpload::from_bytes(&unordered.to_bytes().unwrap()).is_err());
        assert!(SyncUpload::from_bytes(b"random bytes that are not a frame").is_err());
        let ack = ack(2, &[1, 3]);
        assert_eq!(SyncAck::from_bytes(&ack.to_bytes().unwrap()).unwrap(), ack);
        assert!(SyncUpload::from_bytes(&ack.to_bytes().unwrap()).is_err(), "kind is checked");
    }

    #[test]
    fn restored_events_past_the_last_seq_are_refused_not_wrapped() {
        // Seq u64::MAX then 0 wrapped to "contiguous" in release builds and overflowed in debug.
        let node = NodeId::new("eu-1").unwrap();
        let ack = |seqs: &[u64]| SyncAck {
            events_high_water: 0,
            control: Vec::new(),
            ledger_high_water: u64::MAX,
            restore: seqs.iter().map(|&seq| event(&node, seq)).collect(),
            confirmed: false,
        };
        for seqs in [[u64::MAX, 0], [u64::MAX, u64::MAX]] {
            assert!(SyncAck::from_bytes(&ack(&seqs).to_bytes().unwrap()).is_err(), "{seqs:?}");
        }
        let contiguous = ack(&[u64::MAX - 1, u64::MAX]);
        assert_eq!(SyncAck::from_bytes(&contiguous.to_bytes().unwrap()).unwrap(), contiguous);
    }

    #[test]
    fn error_codes_round_trip() {
        for code in SyncErrorCode::ALL {
            assert_eq!(SyncErrorCode::from_code(u64::from(code.code())), Some(code));
        }
        assert_eq!(SyncErrorCode::from_code(999), None);
    }
}
