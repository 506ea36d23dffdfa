//! Edgecard's wire types and pure protocol logic.
//!
//! Nothing here does I/O, reads a clock or spawns tasks: the node and the
//! coordinator share these types, and keeping them pure lets the same code
//! be tested exhaustively without sockets or time.
//!
//! Bytes from the network or disk are only ever read through the validating
//! decoders here (`SignedGrant::from_bytes` + `verify`,
//! `OrderEventBatch::from_bytes`), which check the envelope, the rkyv
//! structure and then the contents of every id and secret.

pub mod envelope;
pub mod event;
pub mod event_v1;
pub mod event_v2;
/// Fuzz harnesses (see `fuzz/`); not used by Edgecard itself.
#[doc(hidden)]
pub mod fuzzing;
pub mod grant;
pub mod holdings;
pub mod ids;
pub mod keyfile;
pub mod lease;
pub mod rebalance;
pub mod renewal;
pub mod sync;
pub mod tag_limiter;

pub use envelope::{decode, encode, peek_kind, Decodable, Encodable, EnvelopeError, MessageKind, MAX_PAYLOAD};
pub use event::{EventError, OrderEvent, OrderEventBatch, OrderEventKind, UnmatchedReason, MAX_EVENT_TEXT};
pub use event_v1::OrderEventV1;
pub use event_v2::{OrderEventV2, EVENT_RECORD_VERSION, EVENT_RECORD_VERSION_V2};
pub use grant::{GrantError, GrantedKey, SignedGrant, SliceGrant, GRANT_SIGNATURE_DOMAIN, MAX_GRANT_KEYS};
pub use holdings::{Holdings, SliceHolding};
pub use ids::{Epoch, IdError, IdKind, KeyId, NodeId, OrderId, OrderToken, Secret, Sku, SliceId, UnixMillis};
pub use keyfile::{decode_signing_key, decode_verifying_key, encode_signing_key, encode_verifying_key, KeyFileError};
pub use renewal::{LeaseRenewal, SignedRenewal, RENEWAL_SIGNATURE_DOMAIN};
pub use sync::{
    valid_lookup, valid_refund_reason, AckOutcome, CatalogProduct, ControlBody, ControlMessage, OrderLookup,
    RefusedControl, SliceStock, SyncAck, SyncClient, SyncError, SyncErrorCode, SyncTiming, SyncUpload, UploadPlan,
    MAX_REFUND_REASON, MAX_REFUSAL_TEXT, MAX_REFUSED_CONTROL, MAX_SYNC_MESSAGE_BYTES, MAX_UPLOAD_LOOKUPS, SYNC_ALPN,
};
