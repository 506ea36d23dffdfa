//! Log segments: preallocated files with a header naming their place in the log.
//!
//! A segment is zero-filled when first made, so appending never grows the file and an fdatasync
//! never has to write file-size metadata. After a checkpoint a whole-past segment becomes a spare
//! and is reused with a new header; its stale frames carry older lsns than any the reader
//! expects, so they read as the end of the log.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::{read_exact_at, Disk, DiskFile};
use crate::le::{u32_at, u64_at};

pub const SEGMENT_HEADER: u64 = 32;
const MAGIC: &[u8; 8] = b"ECLOG\0\0\x01";
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Where a segment sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    /// The lsn of the first frame written into it.
    pub base_lsn: u64,
}

impl SegmentHeader {
    fn encode(&self) -> [u8; SEGMENT_HEADER as usize] {
        let mut out = [0u8; SEGMENT_HEADER as usize];
        out[..8].copy_from_slice(MAGIC);
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        let crc = crc32fast::hash(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `None` when the bytes are not a segment header (a spare half-made, or damage).
    pub fn decode(bytes: &[u8; SEGMENT_HEADER as usize]) -> Option<SegmentHeader> {
        if &bytes[..8] != MAGIC {
            return None;
        }
        if u32_at(bytes, 24) != crc32fast::hash(&bytes[..24]) {
            return None;
        }
        Some(SegmentHeader { seq: u64_at(bytes, 8), base_lsn: u64_at(bytes, 16) })
    }

    pub fn read(file: &dyn DiskFile) -> io::Result<Option<SegmentHeader>> {
        let mut bytes = [0u8; SEGMENT_HEADER as usize];
        if read_exact_at(file, &mut bytes, 0)? < bytes.len() {
            return Ok(None);
        }
        Ok(Self::decode(&bytes))
    }
}

pub fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

/// The sequence number of a live segment's file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

pub fn spare_name(id: u64) -> String {
    format!("spare-{id:016x}.wal")
}

pub fn parse_spare_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_prefix("spare-")?.strip_suffix(".wal")?, 16).ok()
}

/// A segment open for appending.
pub struct OpenSegment {
    pub file: Arc<dyn DiskFile>,
    pub header: SegmentHeader,
    pub path: PathBuf,
    /// Where the next frame goes.
    pub write_at: u64,
    pub capacity: u64,
}

impl OpenSegment {
    pub fn room(&self) -> u64 {
        self.capacity.saturating_sub(self.write_at)
    }
}

/// Makes a zero-filled spare of `bytes` at `path`, durable (data and name) before it returns.
pub fn make_spare(disk: &dyn Disk, dir: &Path, path: &Path, bytes: u64) -> io::Result<()> {
    let file = disk.open(path, true)?;
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    disk.sync_dir(dir)
}

/// Turns the spare at `spare` into live segment `header`: renamed, stamped, durable.
pub fn activate(disk: &dyn Disk, dir: &Path, spare: &Path, header: SegmentHeader) -> io::Result<OpenSegment> {
    let path = dir.join(segment_name(header.seq));
    disk.rename(spare, &path)?;
    let file = disk.open(&path, false)?;
    file.write_all_at(&header.encode(), 0)?;
    // Blank the first frame slot, so that a stale frame there cannot pass for the new base.
    file.write_all_at(&[0u8; crate::log::frame::FRAME_HEADER], SEGMENT_HEADER)?;
    file.sync_data()?;
    disk.sync_dir(dir)?;
    let capacity = file.len()?;
    Ok(OpenSegment { file, header, path, write_at: SEGMENT_HEADER, capacity })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let header = SegmentHeader { seq: 3, base_lsn: 99 };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Some(header));
        for at in 0..28 {
            let mut bad = bytes;
            bad[at] ^= 1;
            assert_eq!(SegmentHeader::decode(&bad), None, "flip at {at}");
        }
        assert_eq!(SegmentHeader::decode(&[0; 32]), None);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_spare_name(&spare_name(7)), Some(7));
        assert_eq!(parse_segment_name(&spare_name(7)), None);
        assert_eq!(parse_segment_name("checkpoint"), None);
    }
}
