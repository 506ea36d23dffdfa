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
    decode_or_older(what, bytes, version, |older| decode_layout::<Old>(what, older, VERSION, None).map(Into::into))
}

/// Decodes a record written by [`encode_versioned`] with `version` as `T`; a record in any other
/// layout goes to `older`, which reads it as the type of its own version and converts it. Types
/// that changed more than once chain these: the newest layout reads its predecessor through
/// [`decode_evolved`] (or another `decode_or_older`), and so on down to format 1.
pub fn decode_or_older<T: Storable>(
    what: &str,
    bytes: &[u8],
    version: u8,
    older: impl FnOnce(&[u8]) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match bytes {
        [MAGIC, v, ..] if *v == version => decode_layout(what, bytes, version, None),
        [MAGIC, v, ..] if *v > version => Err(StoreError::Corrupt {
            key: what.to_string(),
            reason: format!("record format {v} is newer than {version}: written by a later version"),
        }),
        _ => older(bytes),
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

/// Reads a record in a layout older than its table's current one (see [`Table::evolved`]).
pub type ReadOlder<T> = fn(&str, &[u8]) -> Result<T, StoreError>;

/// Records of one type under one key prefix: the typed face of the store.
pub struct Table<T> {
    prefix: &'static [u8],
    what: &'static str,
    /// The format version records are written with.
    version: u8,
    /// For a type whose layout changed: how records of earlier layouts are read.
    older: Option<ReadOlder<T>>,
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
        Table { prefix, what, version: VERSION, older: None, _records: std::marker::PhantomData }
    }

    /// A table of a type whose layout changed: records are written with format `version`, and
    /// records of earlier layouts are read through `older` (see [`decode_or_older`]).
    pub const fn evolved(prefix: &'static [u8], what: &'static str, version: u8, older: ReadOlder<T>) -> Self {
        Table { prefix, what, version, older: Some(older), _records: std::marker::PhantomData }
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
        batch.put(self.key(id), encode_layout(self.what, value, self.version, None)?);
        Ok(())
    }

    pub fn decode(&self, raw: &[u8]) -> Result<T, StoreError> {
        match self.older {
            Some(older) => decode_or_older(self.what, raw, self.version, |old| older(self.what, old)),
            None => decode(self.what, raw),
        }
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
        let error = decode_evolved::<OrderV2, Order>("order", &unknown, 2).unwrap_err().to_string();
        assert!(error.contains("later version"), "{error}");
    }

    /// The order once more, changed a second time.
    #[derive(Debug, Clone, PartialEq, serde::Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct OrderV3 {
        id: u64,
        email: Option<String>,
        keys: Vec<String>,
        note: String,
        tags: Vec<u32>,
    }

    impl From<OrderV2> for OrderV3 {
        fn from(o: OrderV2) -> Self {
            OrderV3 { id: o.id, email: o.email, keys: o.keys, note: o.note, tags: vec![] }
        }
    }

    fn decode_v3(what: &str, raw: &[u8]) -> Result<OrderV3, StoreError> {
        decode_or_older(what, raw, 3, |older| decode_evolved::<OrderV2, Order>(what, older, 2).map(Into::into))
    }

    #[test]
    fn a_twice_changed_layout_reads_all_three() {
        let current = OrderV3 { note: "now".into(), tags: vec![7], ..OrderV2::from(order()).into() };
        assert_eq!(decode_v3("order", &encode_versioned("order", &current, 3).unwrap()).unwrap(), current);
        let v2 = OrderV2 { note: "then".into(), ..order().into() };
        let read = decode_v3("order", &encode_versioned("order", &v2, 2).unwrap()).unwrap();
        assert_eq!((read.note.as_str(), read.tags.len()), ("then", 0));
        let read = decode_v3("order", &encode("order", &order()).unwrap()).unwrap();
        assert_eq!(read.note, "migrated", "format 1 through the chain");
        let json = br#"{"id":7,"email":null,"keys":[]}"#;
        assert_eq!(decode_v3("order", json).unwrap().id, 7);
    }

    #[test]
    fn an_evolved_table_writes_its_version_and_reads_older_records() {
        const TABLE: Table<OrderV3> = Table::evolved(b"o/", "order", 3, decode_v3);
        let mut batch = WriteBatch::default();
        let current = OrderV3 { note: "x".into(), tags: vec![1], ..OrderV2::from(order()).into() };
        TABLE.put(&mut batch, b"1", &current).unwrap();
        let crate::batch::Op::Put(_, bytes) = &batch.ops()[0] else { panic!("a put") };
        assert_eq!(bytes[1], 3);
        assert_eq!(TABLE.decode(bytes).unwrap(), current);
        assert_eq!(TABLE.decode(&encode("order", &order()).unwrap()).unwrap().note, "migrated");
    }
}
