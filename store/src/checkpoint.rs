//! The checkpoint mark: the lsn up to which sled holds every write, durably.
//!
//! A checkpoint writes a frozen memtable into sled, makes sled's files durable (sled's own flush
//! ends in `sync_file_range` and never fsyncs `blobs/`, so every file and directory under it is
//! fsynced here), and only then moves the mark. A crash in between leaves sled ahead of the
//! mark, which is harmless: replaying the log past the mark rewrites the same values.

use std::fs::File;
use std::path::Path;

use crate::disk::{read_exact_at, Disk};
use crate::error::StoreError;
use crate::le::{u32_at, u64_at};

const MAGIC: &[u8; 8] = b"ECCKPT\0\x01";
const MARK_LEN: usize = 32;

/// What the mark file says: sled holds every write up to `lsn`; `life` is the number of the
/// store's last open (see `log/frame.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub lsn: u64,
    pub life: u64,
}
pub const MARK_FILE: &str = "checkpoint";
const MARK_TMP: &str = "checkpoint.tmp";

fn encode(mark: Mark) -> [u8; MARK_LEN] {
    let mut out = [0u8; MARK_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&mark.lsn.to_le_bytes());
    out[16..24].copy_from_slice(&mark.life.to_le_bytes());
    let crc = crc32fast::hash(&out[..24]);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8; MARK_LEN]) -> Option<Mark> {
    if &bytes[..8] != MAGIC || u32_at(bytes, 24) != crc32fast::hash(&bytes[..24]) {
        return None;
    }
    Some(Mark { lsn: u64_at(bytes, 8), life: u64_at(bytes, 16) })
}

/// The mark in `dir`; zero when there is none yet.
pub fn read_mark(disk: &dyn Disk, dir: &Path) -> Result<Mark, StoreError> {
    let path = dir.join(MARK_FILE);
    if !disk.exists(&path) {
        return Ok(Mark::default());
    }
    let io = |source| StoreError::Io { path: path.clone(), source };
    let file = disk.open(&path, false).map_err(io)?;
    let mut bytes = [0u8; MARK_LEN];
    let read = read_exact_at(file.as_ref(), &mut bytes, 0).map_err(io)?;
    // The mark is replaced by rename, so it is whole or absent; anything else is damage.
    if read < MARK_LEN {
        return Err(StoreError::LogCorrupt { segment: path, offset: 0, reason: "checkpoint mark is short".into() });
    }
    decode(&bytes).ok_or(StoreError::LogCorrupt {
        segment: path,
        offset: 0,
        reason: "checkpoint mark is damaged".into(),
    })
}

/// Replaces the mark, durably: write a new file, fsync it, rename it over, fsync the dir.
pub fn write_mark(disk: &dyn Disk, dir: &Path, mark: Mark) -> std::io::Result<()> {
    let tmp = dir.join(MARK_TMP);
    if disk.exists(&tmp) {
        disk.remove(&tmp)?;
    }
    let file = disk.open(&tmp, true)?;
    file.write_all_at(&encode(mark), 0)?;
    file.sync_data()?;
    disk.rename(&tmp, &dir.join(MARK_FILE))?;
    disk.sync_dir(dir)
}

/// fsyncs every file and directory under `dir` (sled's files, `blobs/` included).
pub fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&entry.path())?;
        } else if kind.is_file() {
            match File::open(entry.path()) {
                Ok(file) => file.sync_all()?,
                // sled removes old blobs and snapshots as it goes.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::faulty_disk::FaultyDisk;

    #[test]
    fn the_mark_moves_durably_and_damage_is_refused() {
        let disk = FaultyDisk::new();
        let dir = Path::new("/log");
        disk.create_dir_all(dir).unwrap();
        assert_eq!(read_mark(&disk, dir).unwrap(), Mark::default());
        write_mark(&disk, dir, Mark { lsn: 41, life: 1 }).unwrap();
        write_mark(&disk, dir, Mark { lsn: 42, life: 2 }).unwrap();
        disk.crash();
        assert_eq!(read_mark(&disk, dir).unwrap(), Mark { lsn: 42, life: 2 });
        disk.flip_byte(&dir.join(MARK_FILE), 9);
        assert!(matches!(read_mark(&disk, dir), Err(StoreError::LogCorrupt { .. })));
    }
}
