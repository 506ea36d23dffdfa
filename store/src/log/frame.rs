//! How a batch sits in the log: a checksummed frame around the batch's operations.
//!
//! ```text
//! frame:   len: u32 LE | crc32: u32 LE | lsn: u64 LE | life: u64 LE | payload (len bytes)
//! payload: ops: u32 LE, then per op: tag u8 (1 put, 0 delete) | key len u32 | key | [value len u32 | value]
//! ```
//! The checksum covers the length, the lsn, the life and the payload, so a torn write and a
//! flipped bit fail it. `life` counts the store's opens: a frame written before the last crash
//! but never made durable can sit, intact, past the point where the next life appends; the
//! reader accepts no frame of an older life after one of a newer life, so it cannot come back.

use crate::batch::{Op, WriteBatch};
use crate::le::{u32_at, u64_at};

pub const FRAME_HEADER: usize = 24;
/// A frame larger than this is corruption, not data (the coordinator's largest control value is
/// a grant of tens of MB).
pub const MAX_PAYLOAD: usize = 1 << 30;

fn checksum(len: u32, lsn: u64, life: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&lsn.to_le_bytes());
    hasher.update(&life.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The bytes `batch` takes in the log, header included.
#[cfg(test)]
pub fn frame_len(batch: &WriteBatch) -> usize {
    FRAME_HEADER + payload_len(batch)
}

pub fn payload_len(batch: &WriteBatch) -> usize {
    4 + batch
        .ops()
        .iter()
        .map(|op| match op {
            Op::Put(k, v) => 1 + 4 + k.len() + 4 + v.len(),
            Op::Delete(k) => 1 + 4 + k.len(),
        })
        .sum::<usize>()
}

/// Appends the frame of `batch` at `lsn`, written in `life`, to `out`; `payload_len` is
/// [`payload_len`] of `batch`, which the caller has checked against [`MAX_PAYLOAD`].
pub fn encode(lsn: u64, life: u64, batch: &WriteBatch, payload_len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let len = payload_len as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&life.to_le_bytes());
    out.extend_from_slice(&(batch.ops().len() as u32).to_le_bytes());
    for op in batch.ops() {
        match op {
            Op::Put(key, value) => {
                out.push(1);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
            Op::Delete(key) => {
                out.push(0);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
    }
    let crc = checksum(len, lsn, life, &out[start + FRAME_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame's header, read before its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub crc: u32,
    pub lsn: u64,
    pub life: u64,
}

impl Header {
    /// `bytes` holds at least a header.
    pub fn parse(bytes: &[u8]) -> Header {
        Header { len: u32_at(bytes, 0), crc: u32_at(bytes, 4), lsn: u64_at(bytes, 8), life: u64_at(bytes, 16) }
    }

    /// Zeroes: the preallocated end of a segment.
    pub fn is_blank(&self) -> bool {
        self.len == 0 && self.crc == 0 && self.lsn == 0 && self.life == 0
    }

    pub fn checks(&self, payload: &[u8]) -> bool {
        payload.len() == self.len as usize && checksum(self.len, self.lsn, self.life, payload) == self.crc
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        Some(u32_at(self.take(4)?, 0) as usize)
    }
}

/// Decodes a checked payload back into its batch; `None` if it does not parse.
pub fn decode_payload(payload: &[u8]) -> Option<WriteBatch> {
    let mut cursor = Cursor(payload);
    let count = cursor.len()?;
    let mut batch = WriteBatch::default();
    for _ in 0..count {
        let tag = *cursor.take(1)?.first()?;
        let key_len = cursor.len()?;
        let key = cursor.take(key_len)?.to_vec();
        match tag {
            1 => {
                let value_len = cursor.len()?;
                batch.put(key, cursor.take(value_len)?.to_vec());
            }
            0 => batch.delete(key),
            _ => return None,
        }
    }
    cursor.0.is_empty().then_some(batch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> WriteBatch {
        let mut batch = WriteBatch::default();
        batch.put(b"o/1".to_vec(), b"order".to_vec());
        batch.delete(b"x/1".to_vec());
        batch.put(b"e/".to_vec(), Vec::new());
        batch
    }

    fn split(frame: &[u8]) -> (Header, &[u8]) {
        (Header::parse(&frame[..FRAME_HEADER]), &frame[FRAME_HEADER..])
    }

    #[test]
    fn a_frame_round_trips() {
        let mut out = Vec::new();
        encode(7, 3, &sample(), payload_len(&sample()), &mut out);
        assert_eq!(out.len(), frame_len(&sample()));
        let (header, payload) = split(&out);
        assert_eq!((header.lsn, header.life), (7, 3));
        assert!(header.checks(payload));
        assert_eq!(decode_payload(payload).unwrap().ops(), sample().ops());
    }

    #[test]
    fn any_flipped_byte_fails_the_check() {
        let mut out = Vec::new();
        encode(7, 3, &sample(), payload_len(&sample()), &mut out);
        for at in 0..out.len() {
            let mut bad = out.clone();
            bad[at] ^= 1;
            let (header, payload) = split(&bad);
            assert!(!header.checks(payload), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn truncated_payloads_do_not_decode() {
        let mut out = Vec::new();
        encode(1, 1, &sample(), payload_len(&sample()), &mut out);
        let payload = &out[FRAME_HEADER..];
        for cut in 0..payload.len() {
            assert!(decode_payload(&payload[..cut]).is_none(), "cut at {cut} decoded");
        }
    }
}
