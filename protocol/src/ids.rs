//! Identifier newtypes shared by every component.
//!
//! String-backed ids are validated wherever they enter the system: at
//! construction, on serde deserialization, and (because rkyv's derived
//! deserialization cannot fail on content) through `validate()` after an
//! rkyv message has been decoded. Message types call those `validate()`
//! methods themselves, so callers of the message-level decoders never see an
//! unchecked id.

use std::fmt;
use std::str::FromStr;

use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Which kind of value failed validation; used in error messages so that the
/// message says what was wrong without echoing the (possibly secret) value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    NodeId,
    Sku,
    OrderId,
    OrderToken,
    Secret,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::NodeId => "node id",
            IdKind::Sku => "sku",
            IdKind::OrderId => "order id",
            IdKind::OrderToken => "order token",
            IdKind::Secret => "secret",
        })
    }
}

/// Validation failure for an id or a secret. No variant carries the rejected
/// value itself, so these errors are safe to log and to return to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: IdKind },
    #[error("{kind} is too long: {len} (max {max})")]
    TooLong { kind: IdKind, len: usize, max: usize },
    #[error("{kind} has a character outside {allowed} at byte {index}")]
    InvalidChar { kind: IdKind, index: usize, allowed: &'static str },
    #[error("{kind} must not start with '-'")]
    LeadingHyphen { kind: IdKind },
    #[error("{kind} contains a control character at byte {index}")]
    ControlChar { kind: IdKind, index: usize },
    #[error("{kind} must be exactly 32 lowercase hex characters")]
    BadHex { kind: IdKind },
}

const NODE_ID_MAX: usize = 32;
const SKU_MAX: usize = 64;
/// Longest secret accepted, in bytes.
pub const SECRET_MAX_BYTES: usize = 512;

fn check_node_id(s: &str) -> Result<(), IdError> {
    let kind = IdKind::NodeId;
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > NODE_ID_MAX {
        return Err(IdError::TooLong { kind, len: s.len(), max: NODE_ID_MAX });
    }
    if let Some(index) = s.bytes().position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')) {
        return Err(IdError::InvalidChar { kind, index, allowed: "[a-z0-9-]" });
    }
    if s.starts_with('-') {
        return Err(IdError::LeadingHyphen { kind });
    }
    Ok(())
}

fn check_sku(s: &str) -> Result<(), IdError> {
    let kind = IdKind::Sku;
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > SKU_MAX {
        return Err(IdError::TooLong { kind, len: s.len(), max: SKU_MAX });
    }
    if let Some(index) = s.bytes().position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))) {
        return Err(IdError::InvalidChar { kind, index, allowed: "[A-Za-z0-9._-]" });
    }
    Ok(())
}

fn check_secret(s: &str) -> Result<(), IdError> {
    let kind = IdKind::Secret;
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > SECRET_MAX_BYTES {
        return Err(IdError::TooLong { kind, len: s.len(), max: SECRET_MAX_BYTES });
    }
    if let Some((index, _)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(IdError::ControlChar { kind, index });
    }
    Ok(())
}

/// Parses exactly 32 lowercase hex characters. Uppercase is refused so that
/// each 128-bit value has one textual form (ids are compared as strings in
/// URLs, logs and CSV exports).
fn parse_hex16(kind: IdKind, s: &str) -> Result<[u8; 16], IdError> {
    let bytes = s.as_bytes();
    if bytes.len() != 32 || !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(IdError::BadHex { kind });
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(bytes, &mut out).map_err(|_| IdError::BadHex { kind })?;
    Ok(out)
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $check:ident) => {
        $(#[$meta])*
        #[derive(
            Clone, PartialEq, Eq, Hash, PartialOrd, Ord,
            Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                $check(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Re-checks the contents; needed after rkyv decoding, which
            /// builds the value without going through `new`.
            pub fn validate(&self) -> Result<(), IdError> {
                $check(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A node's name: 1..=32 of `[a-z0-9-]`, not starting with `-`. Kept
    /// DNS-label-like because it ends up in certificate names and metrics
    /// labels.
    NodeId,
    check_node_id
);

string_id!(
    /// A product code: 1..=64 of `[A-Za-z0-9._-]`, safe in URLs and file names
    /// without escaping.
    Sku,
    check_sku
);

macro_rules! u64_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
            Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

u64_id!(
    /// A key's number within its sku; keys are named by (sku, key id).
    KeyId
);
u64_id!(
    /// A slice of a sku's keys granted to one node.
    SliceId
);
u64_id!(
    /// A generation number; grants from an older epoch are fenced off.
    Epoch
);

/// Milliseconds since the Unix epoch. The protocol crate never reads a clock:
/// callers pass `now` in, which keeps the state machines deterministic.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    pub fn saturating_add_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A 128-bit order id. Random rather than sequential so ids leak neither
/// sales volume nor which node took the order.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct OrderId([u8; 16]);

impl OrderId {
    /// The id of no order, for outbox events that are about a slice rather than an order.
    pub const NONE: OrderId = OrderId([0; 16]);

    pub fn random() -> Self {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        Self(b)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderId({self})")
    }
}

impl FromStr for OrderId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex16(IdKind::OrderId, s).map(Self)
    }
}

impl TryFrom<String> for OrderId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<OrderId> for String {
    fn from(v: OrderId) -> String {
        v.to_string()
    }
}

/// The bearer token that entitles its holder to see an order's keys.
///
/// 128 bits from the OS RNG. `Debug` hides the value and `==` runs in
/// constant time, so the usual derive-and-compare patterns do not leak it.
#[derive(Clone, Copy, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrderToken([u8; 16]);

impl OrderToken {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        Self(b)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Compares without an early exit, so response timing does not reveal
    /// how many leading bytes of a guess were right.
    pub fn ct_eq(&self, other: &Self) -> bool {
        let diff = self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl PartialEq for OrderToken {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for OrderToken {}

impl fmt::Debug for OrderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OrderToken(…)")
    }
}

impl fmt::Display for OrderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for OrderToken {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex16(IdKind::OrderToken, s).map(Self)
    }
}

impl TryFrom<String> for OrderToken {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<OrderToken> for String {
    fn from(v: OrderToken) -> String {
        v.to_string()
    }
}

/// A card key's secret: the thing buyers pay for.
///
/// `Debug` and `Display` print `Secret(***)` so that a stray `{:?}` in a log
/// line or error cannot leak it; the only way to the value is `expose()`,
/// which is easy to grep for. Control characters are refused because secrets
/// are shown in HTML, CSV exports and terminals.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Result<Self, IdError> {
        check_secret(&s)?;
        Ok(Self(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Re-checks the contents; needed after rkyv decoding.
    pub fn validate(&self) -> Result<(), IdError> {
        check_secret(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl TryFrom<String> for Secret {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<Secret> for String {
    fn from(v: Secret) -> String {
        v.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_id_edges() {
        assert!(NodeId::new("a").is_ok());
        assert!(NodeId::new("eu-1").is_ok());
        assert!(NodeId::new("0").is_ok());
        assert!(NodeId::new("a-").is_ok());
        assert!(NodeId::new("a".repeat(32)).is_ok());
        assert_eq!(NodeId::new("a".repeat(33)), Err(IdError::TooLong { kind: IdKind::NodeId, len: 33, max: 32 }));
        assert_eq!(NodeId::new(""), Err(IdError::Empty { kind: IdKind::NodeId }));
        assert_eq!(NodeId::new("-eu"), Err(IdError::LeadingHyphen { kind: IdKind::NodeId }));
        for bad in ["EU-1", "eu_1", "eu 1", "eu.1", "é", "eu\n", "eu/1"] {
            assert!(matches!(NodeId::new(bad), Err(IdError::InvalidChar { .. })), "{bad:?} accepted");
        }
        // A multi-byte character counts its bytes, so 11 three-byte chars
        // are too long rather than silently accepted.
        assert!(NodeId::new("€".repeat(11)).is_err());
    }

    #[test]
    fn sku_edges() {
        assert!(Sku::new("GAME-key_1.0").is_ok());
        assert!(Sku::new("-x").is_ok());
        assert!(Sku::new("x".repeat(64)).is_ok());
        assert!(matches!(Sku::new("x".repeat(65)), Err(IdError::TooLong { .. })));
        assert!(matches!(Sku::new(""), Err(IdError::Empty { .. })));
        for bad in ["a b", "a/b", "a:b", "ä", "a\0"] {
            assert!(matches!(Sku::new(bad), Err(IdError::InvalidChar { .. })), "{bad:?}");
        }
    }

    #[test]
    fn string_ids_parse_display_and_serde() {
        let n: NodeId = "us-1".parse().unwrap();
        assert_eq!(n.as_str(), "us-1");
        assert_eq!(n.to_string(), "us-1");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"us-1\"");
        let back: NodeId = serde_json::from_str("\"us-1\"").unwrap();
        assert_eq!(back, n);
        let err = serde_json::from_str::<NodeId>("\"US-1\"").unwrap_err();
        assert!(err.to_string().contains("node id"), "{err}");
        assert!(serde_json::from_str::<Sku>("\"\"").is_err());
        assert!("bad sku".parse::<Sku>().is_err());
    }

    #[test]
    fn error_messages_name_the_kind() {
        let e = NodeId::new("-x").unwrap_err().to_string();
        assert!(e.starts_with("node id"), "{e}");
        let e = Sku::new("a b").unwrap_err().to_string();
        assert!(e.starts_with("sku") && e.contains("byte 1"), "{e}");
    }

    #[test]
    fn numeric_ids() {
        assert_eq!(KeyId(7).to_string(), "7");
        assert!(SliceId(1) < SliceId(2));
        assert_eq!(serde_json::to_string(&Epoch(3)).unwrap(), "3");
        assert_eq!(serde_json::from_str::<KeyId>("42").unwrap(), KeyId(42));
        assert_eq!(UnixMillis(5).saturating_add_ms(10), UnixMillis(15));
        assert_eq!(UnixMillis(u64::MAX - 1).saturating_add_ms(10), UnixMillis(u64::MAX));
        assert_eq!(serde_json::to_string(&UnixMillis(9)).unwrap(), "9");
    }

    #[test]
    fn order_id_text_form() {
        let id = OrderId::from_bytes([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<OrderId>().unwrap(), id);
        assert_eq!(id.as_bytes(), &[0xab; 16]);
        for bad in [
            "",
            "AB".repeat(16).as_str(),
            "ab".repeat(15).as_str(),
            "ab".repeat(17).as_str(),
            &format!("{}g", "a".repeat(31)),
            &format!(" {}", "a".repeat(31)),
            &format!("{}é", "a".repeat(30)),
            "+0000000000000000000000000000000",
        ] {
            assert_eq!(bad.parse::<OrderId>(), Err(IdError::BadHex { kind: IdKind::OrderId }), "{bad:?}");
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<OrderId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<OrderId>("\"xyz\"").is_err());
        assert_ne!(OrderId::random(), OrderId::random());
    }

    #[test]
    fn order_token_hides_value() {
        let t = OrderToken::random();
        let dbg = format!("{t:?}");
        assert_eq!(dbg, "OrderToken(…)");
        assert!(!dbg.contains(&t.to_string()));
        assert_eq!(t.to_string().len(), 32);
        assert_eq!(t.to_string().parse::<OrderToken>().unwrap(), t);
        assert!(t.to_string().to_uppercase().parse::<OrderToken>().is_err());
        let mut other = *t.as_bytes();
        other[15] ^= 1;
        assert!(!t.ct_eq(&OrderToken::from_bytes(other)));
        assert!(t.ct_eq(&OrderToken::from_bytes(*t.as_bytes())));
        assert_ne!(OrderToken::random(), t);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<OrderToken>(&json).unwrap(), t);
    }

    #[test]
    fn secret_validation_and_hiding() {
        let s = Secret::new("AAAA-BBBB-CCCC".into()).unwrap();
        assert_eq!(s.expose(), "AAAA-BBBB-CCCC");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "Secret(***)");
        assert_eq!(format!("{:?}", vec![s.clone()]), "[Secret(***)]");
        assert!(Secret::new("x".repeat(512)).is_ok());
        assert!(Secret::new("键".repeat(170)).is_ok());
        assert!(matches!(Secret::new("x".repeat(513)), Err(IdError::TooLong { .. })));
        assert!(matches!(Secret::new(String::new()), Err(IdError::Empty { .. })));
        for bad in ["a\rb", "a\nb", "a\0b", "\tab", "ab\u{7f}", "a\u{85}b"] {
            let err = Secret::new(bad.to_string()).unwrap_err();
            assert!(matches!(err, IdError::ControlChar { .. }), "{bad:?}");
            assert!(err.to_string().starts_with("secret"));
        }
        // The error never echoes the value.
        let err = Secret::new(format!("TOPSECRET{}", "z".repeat(600))).unwrap_err();
        assert!(!err.to_string().contains("TOPSECRET"));
        let err = Secret::new("TOPSECRET\n".into()).unwrap_err();
        assert!(!err.to_string().contains("TOPSECRET"));
    }

    #[test]
    fn secret_serde_plain_and_validated() {
        let s = Secret::new("k-1".into()).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"k-1\"");
        assert_eq!(serde_json::from_str::<Secret>("\"k-1\"").unwrap(), s);
        assert!(serde_json::from_str::<Secret>("\"a\\nb\"").is_err());
        assert!(serde_json::from_str::<Secret>("\"\"").is_err());
    }

    #[test]
    fn validate_catches_what_new_catches() {
        // rkyv decoding bypasses `new`; `validate` is the backstop.
        let bad = NodeId("Bad".into());
        assert!(bad.validate().is_err());
        assert!(Sku("a b".into()).validate().is_err());
        assert!(Secret("a\nb".into()).validate().is_err());
        assert!(NodeId::new("ok").unwrap().validate().is_ok());
    }
}
