//! A small versioned frame around rkyv payloads.
//!
//! rkyv archives carry no type or version information and are only safe to
//! read after validation, so every message crossing a process boundary goes
//! through this envelope: the header says what the bytes claim to be and how
//! many there are, and decoding refuses anything that does not match exactly.
//!
//! Layout (12-byte header, then the payload):
//!
//! | bytes  | field                                  |
//! |--------|----------------------------------------|
//! | 0..4   | magic `EDGC`                           |
//! | 4      | version (1)                            |
//! | 5      | message kind                           |
//! | 6..8   | reserved, must be 0                    |
//! | 8..12  | payload length, u32 little-endian      |
//! | 12..   | exactly `length` bytes of rkyv payload |

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

pub const MAGIC: [u8; 4] = *b"EDGC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// Upper bound on a payload, checked before any allocation, so a forged
/// length cannot make the receiver reserve gigabytes.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    SliceGrant = 1,
    SignedGrant = 2,
    OrderEventBatch = 3,
    SyncUpload = 4,
    SyncAck = 5,
    LeaseRenewal = 6,
    SignedRenewal = 7,
}

impl TryFrom<u8> for MessageKind {
    type Error = EnvelopeError;
    fn try_from(v: u8) -> Result<Self, EnvelopeError> {
        match v {
            1 => Ok(MessageKind::SliceGrant),
            2 => Ok(MessageKind::SignedGrant),
            3 => Ok(MessageKind::OrderEventBatch),
            4 => Ok(MessageKind::SyncUpload),
            5 => Ok(MessageKind::SyncAck),
            6 => Ok(MessageKind::LeaseRenewal),
            7 => Ok(MessageKind::SignedRenewal),
            other => Err(EnvelopeError::UnknownKind(other)),
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessageKind::SliceGrant => "slice grant",
            MessageKind::SignedGrant => "signed grant",
            MessageKind::OrderEventBatch => "order event batch",
            MessageKind::SyncUpload => "sync upload",
            MessageKind::SyncAck => "sync ack",
            MessageKind::LeaseRenewal => "lease renewal",
            MessageKind::SignedRenewal => "signed lease renewal",
        })
    }
}

/// Why a frame was refused. Messages describe the frame, never its payload,
/// so they are safe to log even when the payload holds secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an edgecard message (bad magic)")]
    BadMagic,
    #[error("unsupported envelope version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("expected a {expected} message, got a {found} message")]
    WrongKind { expected: MessageKind, found: MessageKind },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("reserved header field is {0:#06x}, must be 0")]
    ReservedNonZero(u16),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("truncated message: need {expected} bytes, have {found}")]
    Truncated { expected: usize, found: usize },
    #[error("trailing bytes after message: expected {expected} bytes, have {found}")]
    TrailingBytes { expected: usize, found: usize },
    #[error("invalid payload: {0}")]
    Invalid(String),
    #[error("payload is not in canonical form")]
    NonCanonical,
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Types that can be written with [`encode`].
pub trait Encodable: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}
impl<T> Encodable for T where T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>> {}

/// Types that can be read back with [`decode`]: everything rkyv can
/// validate and deserialize.
pub trait Decodable:
    Sized
    + Encodable
    + rkyv::Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + rkyv::Deserialize<Self, HighDeserializer<rancor::Error>>,
    >
{
}
impl<T> Decodable for T where
    T: Encodable
        + rkyv::Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
        >
{
}

fn serialize<T: Encodable>(value: &T) -> Result<AlignedVec, EnvelopeError> {
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| EnvelopeError::Encode(e.to_string()))
}

pub fn encode<T: Encodable>(kind: MessageKind, value: &T) -> Result<Vec<u8>, EnvelopeError> {
    let payload = serialize(value)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(EnvelopeError::TooLarge(payload.len()));
    }
    let len = u32::try_from(payload.len()).map_err(|_| EnvelopeError::TooLarge(payload.len()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

struct Header {
    kind: MessageKind,
    len: usize,
}

fn read_header(bytes: &[u8]) -> Result<Header, EnvelopeError> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        // Report a wrong magic before a short read when we can tell, so a
        // stray non-edgecard frame gets the more useful error.
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(EnvelopeError::BadMagic);
        }
        return Err(EnvelopeError::Truncated { expected: HEADER_LEN, found: bytes.len() });
    };
    if h[0..4] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if h[4] != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(h[4]));
    }
    let kind = MessageKind::try_from(h[5])?;
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(EnvelopeError::ReservedNonZero(reserved));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(EnvelopeError::TooLarge(len));
    }
    Ok(Header { kind, len })
}

/// Reads the kind from a header so a receiver can dispatch before decoding.
/// Checks magic, version, kind and reserved bits, but not the payload.
pub fn peek_kind(bytes: &[u8]) -> Result<MessageKind, EnvelopeError> {
    read_header(bytes).map(|h| h.kind)
}

/// Decodes a frame of kind `expected` with full rkyv validation.
///
/// Besides the header checks, the payload must be exactly what encoding the
/// decoded value produces. rkyv validation alone accepts some byte-level
/// variation (padding, unreferenced bytes) that decodes to the same value;
/// refusing it means one value has one encoding, which keeps signatures and
/// content hashes over these bytes meaningful.
///
/// This checks structure only. String contents of ids and secrets are
/// checked by the message types' own `validate`, which their decoders call.
pub fn decode<T: Decodable>(expected: MessageKind, bytes: &[u8]) -> Result<T, EnvelopeError> {
    let header = read_header(bytes)?;
    if header.kind != expected {
        return Err(EnvelopeError::WrongKind { expected, found: header.kind });
    }
    let total = HEADER_LEN + header.len;
    if bytes.len() < total {
        return Err(EnvelopeError::Truncated { expected: total, found: bytes.len() });
    }
    if bytes.len() > total {
        return Err(EnvelopeError::TrailingBytes { expected: total, found: bytes.len() });
    }
    let payload = &bytes[HEADER_LEN..];
    let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let value = rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| EnvelopeError::Invalid(e.to_string()))?;
    let again = serialize(&value)?;
    if again.as_slice() != payload {
        return Err(EnvelopeError::NonCanonical);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Sample {
        a: u32,
        name: String,
        list: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample { a: 7, name: "hello".into(), list: vec![1, 2, 3] }
    }

    fn frame() -> Vec<u8> {
        encode(MessageKind::OrderEventBatch, &sample()).unwrap()
    }

    fn dec(bytes: &[u8]) -> Result<Sample, EnvelopeError> {
        decode::<Sample>(MessageKind::OrderEventBatch, bytes)
    }

    #[test]
    fn round_trip_and_header_layout() {
        let f = frame();
        assert_eq!(&f[0..4], b"EDGC");
        assert_eq!(f[4], 1);
        assert_eq!(f[5], 3);
        assert_eq!(&f[6..8], &[0, 0]);
        let len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - HEADER_LEN);
        assert_eq!(dec(&f).unwrap(), sample());
        assert_eq!(peek_kind(&f).unwrap(), MessageKind::OrderEventBatch);
    }

    #[test]
    fn kind_from_u8() {
        for k in [
            MessageKind::SliceGrant,
            MessageKind::SignedGrant,
            MessageKind::OrderEventBatch,
            MessageKind::SyncUpload,
            MessageKind::SyncAck,
            MessageKind::LeaseRenewal,
            MessageKind::SignedRenewal,
        ] {
            assert_eq!(MessageKind::try_from(k as u8).unwrap(), k);
        }
        assert_eq!(MessageKind::try_from(0), Err(EnvelopeError::UnknownKind(0)));
        assert_eq!(MessageKind::try_from(8), Err(EnvelopeError::UnknownKind(8)));
    }

    #[test]
    fn bad_magic() {
        let mut f = frame();
        f[0] = b'X';
        assert_eq!(dec(&f), Err(EnvelopeError::BadMagic));
        assert_eq!(peek_kind(&f), Err(EnvelopeError::BadMagic));
        assert_eq!(dec(b"GET / HTTP/1.1"), Err(EnvelopeError::BadMagic));
        assert_eq!(dec(b"XY"), Err(EnvelopeError::BadMagic));
    }

    #[test]
    fn unsupported_version() {
        let mut f = frame();
        f[4] = 2;
        assert_eq!(dec(&f), Err(EnvelopeError::UnsupportedVersion(2)));
        f[4] = 0;
        assert_eq!(dec(&f), Err(EnvelopeError::UnsupportedVersion(0)));
    }

    #[test]
    fn wrong_and_unknown_kind() {
        let mut f = frame();
        f[5] = MessageKind::SliceGrant as u8;
        assert_eq!(
            dec(&f),
            Err(EnvelopeError::WrongKind { expected: MessageKind::OrderEventBatch, found: MessageKind::SliceGrant })
        );
        f[5] = 200;
        assert_eq!(dec(&f), Err(EnvelopeError::UnknownKind(200)));
        assert_eq!(peek_kind(&f), Err(EnvelopeError::UnknownKind(200)));
    }

    #[test]
    fn reserved_must_be_zero() {
        let mut f = frame();
        f[7] = 1;
        assert_eq!(dec(&f), Err(EnvelopeError::ReservedNonZero(0x0100)));
        assert!(peek_kind(&f).is_err());
    }

    #[test]
    fn too_large_is_refused_before_reading() {
        let mut f = frame();
        f[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(dec(&f), Err(EnvelopeError::TooLarge(MAX_PAYLOAD + 1)));
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(dec(&f), Err(EnvelopeError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn encode_refuses_oversized_payloads() {
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(encode(MessageKind::SliceGrant, &big), Err(EnvelopeError::TooLarge(_))));
    }

    #[test]
    fn truncation() {
        let f = frame();
        assert_eq!(dec(&f[..5]), Err(EnvelopeError::Truncated { expected: HEADER_LEN, found: 5 }));
        assert_eq!(dec(&[]), Err(EnvelopeError::Truncated { expected: HEADER_LEN, found: 0 }));
        assert_eq!(dec(&f[..f.len() - 1]), Err(EnvelopeError::Truncated { expected: f.len(), found: f.len() - 1 }));
        for cut in 0..f.len() {
            assert!(dec(&f[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut f = frame();
        let n = f.len();
        f.push(0);
        assert_eq!(dec(&f), Err(EnvelopeError::TrailingBytes { expected: n, found: n + 1 }));
    }

    #[test]
    fn invalid_payload_is_reported_not_panicking() {
        let mut f = frame();
        // Corrupt the payload's relative pointers: every byte set to 0xff.
        for b in &mut f[HEADER_LEN..] {
            *b = 0xff;
        }
        assert!(matches!(dec(&f), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn non_canonical_payload_is_refused() {
        // A Vec<u8> of 3 bytes is laid out as data then an 8-byte root
        // (4-aligned), leaving one padding byte that validation ignores.
        let f = encode(MessageKind::SliceGrant, &vec![1u8, 2, 3]).unwrap();
        assert_eq!(decode::<Vec<u8>>(MessageKind::SliceGrant, &f).unwrap(), vec![1, 2, 3]);
        let pad = HEADER_LEN + 3;
        assert_eq!(f[pad], 0);
        let mut g = f.clone();
        g[pad] = 0x55;
        assert_eq!(decode::<Vec<u8>>(MessageKind::SliceGrant, &g), Err(EnvelopeError::NonCanonical));
    }
}
