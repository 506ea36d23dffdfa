//! Stored records: versioned rkyv, validated on every read, with a hook for sealing.
//!
//! ```text
//! value: 0xEC | format version (1) | flags (bit 0: sealed) | rkyv archive, or its sealed form
//! ```
//! Encoding is fallible and the error is returned: a record never silently becomes empty bytes.
//! Records written as JSON by releases before this format (they start with `{` or `[`) are still
//! read, and are rewritten in this format the next time their owner writes them.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::batch::WriteBatch;
use crate::error::StoreError;
use crate::store::Store;

const MAGIC: u8 = 0xEC;
const VERSION: u8 = 1;
const SEALED: u8 = 1;
const HEADER: usize = 3;

/// Types a record can hold: what rkyv can write, validate and read back, and (for stores from
/// before this format) what serde can read from JSON.
pub trait Storable:
    Sized
    + serde::de::DeserializeOwned
    + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
    + rkyv::Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + rkyv::Deserialize<Self, HighDeserializer<rancor::Error>>,
    >
{
}

impl<T> Storable for T where
    T: serde::de::DeserializeOwned
        + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
        + rkyv::Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
        >
{
}

/// Seals record bodies before they reach the log or sled, and opens them on the way back (an
/// AEAD under a key kept outside the data dir). `what` names the record kind, for binding.
pub trait Sealer: Send + Sync {
    fn seal(&self, what: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError>;
    fn open(&self, what: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError>;
}

/// Encodes `value` as a record; `what` names it in errors.
pub fn encode<T: Storable>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    encode_with(what, value, None)
}

pub fn encode_with<T: Storable>(what: &str, value: &T, sealer: Option<&dyn Sealer>) -> Result<Vec<u8>, StoreError> {
    encode_layout(what, value, VERSION, sealer)
}

/// Encodes a record of a type whose layout changed since format 1: `version` names the layout,
/// so that [`decode_evolved`] knows which type to read it as.
pub fn encode_versioned<T: Storable>(what: &str, value: &T, version: u8) -> Result<Vec<u8>, StoreError> {
    encode_layout(what, value, version, None)
}

fn encode_layout<T: Storable>(
    what: &str,
    value: &T,
    version: u8,
    sealer: Option<&dyn Sealer>,
) -> Result<Vec<u8>, StoreError> {
    let body = rkyv::to_bytes::<rancor::Error>(value)
        .map_err(|e| StoreError::Encode { what: what.to_string(), reason: e.to_string() })?;
    let (flags, body) = match sealer {
        Some(sealer) => (SEALED, sealer.seal(what, &body)?),
        None => (0, body.to_vec()),
    };
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&[MAGIC, version, flags]);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a record written by [`encode`] (or a JSON record from before it), validating it.
pub fn decode<T: Storable>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_with(what, bytes, None)
}

pub fn decode_with<T: Storable>(what: &str, bytes: &[u8], sealer: Option<&dyn Sealer>) -> Result<T, StoreError> {
    decode_layout(what, bytes, VERSION, sealer)
}

/// Decodes a record written by [`encode_versioned`] with `version` as `T`, or one in an earlier
/// layout (format 1, or legacy JSON) as `Old`, converted.
pub fn decode_evolved<T: Storable, Old: Storable + Into<T>>(
    what: &str,
    bytes: &[u8],
    version: u8,
) -> Result<T, StoreError> {
    match bytes {
        [MAGIC, v, ..] if *v == version => decode_layout(what, bytes, version, None),
        _ => decode_layout::<Old>(what, bytes, VERSION, None).map(Into::into),
    }
}

fn decode_layout<T: Storable>(
    what: &str,
    bytes: &[u8],
    expected: u8,
    sealer: Option<&dyn Sealer>,
) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: what.to_string(), reason };
    match bytes.first() {
        Some(b'{' | b'[' | b'"') => {
            return serde_json::from_slice(bytes).map_err(|e| corrupt(format!("legacy JSON record: {e}")))
        }
        Some(&MAGIC) => {}
        Some(_) => return Err(corrupt("not a record".into())),
        None => return Err(corrupt("empty record".into())),
    }
    let (&version, rest) = bytes[1..].split_first().ok_or_else(|| corrupt("record header is cut short".into()))?;
    if version != expected {
        return Err(corrupt(format!("record format {version} is not {expected}: written by another version")));
    }
    let (&flags, body) = rest.split_first().ok_or_else(|| corrupt("record header is cut short".into()))?;
    let opened;
    let body = if flags & SEALED != 0 {
        let sealer = sealer.ok_or_else(|| corrupt("record is sealed and no key was given".into()))?;
        opened = sealer.open(what, body)?;
        &opened[..]
    } else {
        body
    };
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| corrupt(e.to_string()))
}

/// Records of one type under one key prefix: the typed face of the store.
pub struct Table<T> {
    prefix: &'static [u8],
    what: &'static str,
    _records: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("what", &self.what).finish_non_exhaustive()
    }
}

impl<T: Storable> Table<T> {
    /// `prefix` must not be a prefix of another table's.
    pub const fn new(prefix: &'static [u8], what: &'static str) -> Self {
        Table { prefix, what, _records: std::marker::PhantomData }
    }

    pub fn key(&self, id: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + id.len());
        key.extend_from_slice(self.prefix);
        key.extend_from_slice(id);
        key
    }

    pub fn get(&self, store: &Store, id: &[u8]) -> Result<Option<T>, StoreError> {
        store.get(&self.key(id))?.map(|raw| self.decode(&raw)).transpose()
    }

    pub fn put(&self, batch: &mut WriteBatch, id: &[u8], value: &T) -> Result<(), StoreError> {
        batch.put(self.key(id), encode(self.what, value)?);
        Ok(())
    }

    pub fn decode(&self, raw: &[u8]) -> Result<T, StoreError> {
        decode(self.what, raw)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Order {
        id: u64,
        email: Option<String>,
        keys: Vec<String>,
    }

    fn order() -> Order {
        Order { id: 7, email: Some("a@example.com".into()), keys: vec!["K1".into(), "K2".into()] }
    }

    /// A stand-in sealer for testing the hook: reversible, and marks what it sealed.
    struct Reverse;
    impl Sealer for Reverse {
        fn seal(&self, _: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
            Ok(plain.iter().rev().map(|b| b ^ 0xff).collect())
        }
        fn open(&self, _: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
            Ok(sealed.iter().rev().map(|b| b ^ 0xff).collect())
        }
    }

    #[test]
    fn records_round_trip_and_are_not_json() {
        let bytes = encode("order", &order()).unwrap();
        assert_eq!(bytes[..2], [MAGIC, VERSION]);
        assert_eq!(decode::<Order>("order", &bytes).unwrap(), order());
    }

    #[test]
    fn legacy_json_records_are_read() {
        let json = br#"{"id":7,"email":"a@example.com","keys":["K1","K2"]}"#;
        assert_eq!(decode::<Order>("order", json).unwrap(), order());
    }

    #[test]
    fn damaged_records_are_refused_with_the_record_named() {
        let bytes = encode("order", &order()).unwrap();
        for cut in 0..bytes.len() {
            if let Err(error) = decode::<Order>("order", &bytes[..cut]) {
                assert!(error.to_string().contains("order"), "{error}");
            } else {
                panic!("a record cut at {cut} decoded");
            }
        }
        let mut other_version = bytes.clone();
        other_version[1] = 9;
        assert!(decode::<Order>("order", &other_version).unwrap_err().to_string().contains("another version"));
        assert!(decode::<Order>("order", b"").is_err());
    }

    #[test]
    fn sealed_records_hide_their_body_and_need_the_sealer() {
        let bytes = encode_with("order", &order(), Some(&Reverse)).unwrap();
        assert!(!bytes.windows(13).any(|w| w == b"a@example.com"), "plaintext reached the record");
        assert_eq!(decode_with::<Order>("order", &bytes, Some(&Reverse)).unwrap(), order());
        assert!(decode::<Order>("order", &bytes).unwrap_err().to_string().contains("sealed"));
    }

    /// The same order with a field added, as a changed layout would be.
    #[derive(Debug, Clone, PartialEq, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct OrderV2 {
        id: u64,
        email: Option<String>,
        keys: Vec<String>,
        note: String,
    }

    impl From<Order> for OrderV2 {
        fn from(o: Order) -> Self {
            OrderV2 { id: o.id, email: o.email, keys: o.keys, note: "migrated".into() }
        }
    }

    #[test]
    fn evolved_records_read_every_layout() {
        let current = OrderV2 { note: "new".into(), ..order().into() };
        let bytes = encode_versioned("order", &current, 2).unwrap();
        assert_eq!(bytes[1], 2);
        assert_eq!(decode_evolved::<OrderV2, Order>("order", &bytes, 2).unwrap(), current);
        let old = encode("order", &order()).unwrap();
        assert_eq!(decode_evolved::<OrderV2, Order>("order", &old, 2).unwrap().note, "migrated");
        let json = br#"{"id":7,"email":"a@example.com","keys":["K1","K2"]}"#;
        assert_eq!(decode_evolved::<OrderV2, Order>("order", json, 2).unwrap().note, "migrated");
        let mut unknown = bytes.clone();
        unknown[1] = 3;
        assert!(decode_evolved::<OrderV2, Order>("order", &unknown, 2).is_err());
    }
}
