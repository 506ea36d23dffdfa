//! Reading the log back at start: every batch past the checkpoint, in order, exactly once.
//!
//! The log ends at the first place that holds no frame of the expected lsn and of this life or a
//! later one. Bytes there that are no frame at all are a torn tail (a write cut short by a
//! crash) when nothing valid follows them; the next life appends over them, and its newer life
//! number keeps whatever of the old bytes remains from being read as frames. When a valid frame
//! does follow, bytes in the middle of acknowledged history are damaged and start-up stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::WriteBatch;
use crate::disk::{read_exact_at, Disk, DiskFile};
use crate::error::StoreError;
use crate::log::frame::{self, Header, FRAME_HEADER, MAX_PAYLOAD};
use crate::log::segment::{
    parse_segment_name, parse_spare_name, spare_name, OpenSegment, SegmentHeader, SEGMENT_HEADER,
};

/// What start-up learns from the log directory.
pub struct Recovered {
    /// Batches after the checkpoint, in lsn order.
    pub batches: Vec<(u64, WriteBatch)>,
    pub next_lsn: u64,
    /// The segment to append to, if any survives.
    pub tail: Option<OpenSegment>,
    /// Live segments before the tail, oldest first.
    pub sealed: Vec<(SegmentHeader, PathBuf)>,
    pub spares: Vec<PathBuf>,
    pub next_spare_id: u64,
    /// Whether a torn tail was cut off.
    pub truncated_tail: bool,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn corrupt(segment: &Path, offset: u64, reason: impl Into<String>) -> StoreError {
    StoreError::LogCorrupt { segment: segment.to_path_buf(), offset, reason: reason.into() }
}

struct Segment {
    path: PathBuf,
    file: Arc<dyn DiskFile>,
    header: SegmentHeader,
    bytes: Vec<u8>,
}

/// What lies where the next frame was expected.
#[derive(PartialEq, Eq)]
enum Stop {
    /// Zeroes or the end of the file.
    Blank,
    /// A whole frame, but not the one expected: left over from a recycled segment or from a
    /// life whose writes past this point were lost.
    Stale,
    /// Bytes that are no frame: a torn write, or damage.
    Damaged,
}

/// A frame that checks, is lsn `lsn` and is of life `min_life` or later, at `at` in `bytes`.
fn frame_at(bytes: &[u8], at: usize, lsn: u64, min_life: u64) -> Result<(Header, &[u8]), Stop> {
    let Some(head) = bytes.get(at..at + FRAME_HEADER) else { return Err(Stop::Blank) };
    let header = Header::parse(head);
    if header.is_blank() {
        return Err(Stop::Blank);
    }
    let payload = (header.len as usize <= MAX_PAYLOAD)
        .then(|| bytes.get(at + FRAME_HEADER..at + FRAME_HEADER + header.len as usize))
        .flatten();
    match payload {
        Some(payload) if header.checks(payload) => {
            if header.lsn == lsn && header.life >= min_life {
                Ok((header, payload))
            } else {
                Err(Stop::Stale)
            }
        }
        _ => Err(Stop::Damaged),
    }
}

pub fn recover(disk: &dyn Disk, dir: &Path, checkpoint: u64) -> Result<Recovered, StoreError> {
    let mut live = Vec::new();
    let mut spares = Vec::new();
    let mut next_spare_id = 0;
    for name in disk.list(dir).map_err(io_err(dir))? {
        if let Some(seq) = parse_segment_name(&name) {
            live.push((seq, dir.join(&name)));
        } else if let Some(id) = parse_spare_name(&name) {
            next_spare_id = next_spare_id.max(id + 1);
            spares.push(dir.join(&name));
        }
    }
    live.sort();

    let mut segments = Vec::new();
    for (index, (seq, path)) in live.iter().enumerate() {
        let file = disk.open(path, false).map_err(io_err(path))?;
        let header = SegmentHeader::read(file.as_ref()).map_err(io_err(path))?;
        match header {
            Some(header) if header.seq == *seq => {
                let len = file.len().map_err(io_err(path))? as usize;
                let mut bytes = vec![0u8; len];
                read_exact_at(file.as_ref(), &mut bytes, 0).map_err(io_err(path))?;
                segments.push(Segment { path: path.clone(), file, header, bytes });
            }
            // A spare whose activation was cut short by a crash: it holds nothing of this log.
            _ if index + 1 == live.len() => {
                let spare = dir.join(spare_name(next_spare_id));
                next_spare_id += 1;
                disk.rename(path, &spare).map_err(io_err(path))?;
                disk.sync_dir(dir).map_err(io_err(dir))?;
                spares.push(spare);
            }
            _ => return Err(corrupt(path, 0, "segment header is damaged")),
        }
    }

    let mut batches = Vec::new();
    let mut expected: Option<u64> = None;
    let mut life = 0;
    let mut tail_at = None;
    let mut truncated_tail = false;
    for index in 0..segments.len() {
        let segment = &segments[index];
        let base = segment.header.base_lsn;
        match expected {
            None if base > checkpoint + 1 => {
                return Err(corrupt(
                    &segment.path,
                    0,
                    format!("the log starts at lsn {base} but the checkpoint is at {checkpoint}: records are missing"),
                ))
            }
            Some(want) if base != want => {
                return Err(corrupt(&segment.path, 0, format!("segment starts at lsn {base}, expected {want}")))
            }
            _ => {}
        }
        let mut lsn = base;
        let mut at = SEGMENT_HEADER as usize;
        let stop = loop {
            match frame_at(&segment.bytes, at, lsn, life) {
                Ok((header, payload)) => {
                    if lsn > checkpoint {
                        let batch = frame::decode_payload(payload)
                            .ok_or_else(|| corrupt(&segment.path, at as u64, "a checked frame does not decode"))?;
                        batches.push((lsn, batch));
                    }
                    life = header.life;
                    at += FRAME_HEADER + header.len as usize;
                    lsn += 1;
                }
                Err(stop) => break stop,
            }
        };
        expected = Some(lsn);
        // The writer moved on to the next segment when a frame did not fit here.
        let continues = segments
            .get(index + 1)
            .is_some_and(|next| frame_at(&next.bytes, SEGMENT_HEADER as usize, lsn, life).is_ok());
        if continues {
            continue;
        }
        if stop == Stop::Damaged {
            if let Some(found) = valid_after(&segments, index, at, lsn, life) {
                return Err(corrupt(
                    &segment.path,
                    at as u64,
                    format!("the frame for lsn {lsn} is damaged, but a valid one follows ({found})"),
                ));
            }
            truncated_tail = true;
        }
        tail_at = Some((index, at as u64));
        break;
    }
    // Live segments after the tail hold nothing of this log: they go back to being spares.
    let keep = tail_at.map_or(0, |(index, _)| index + 1);
    for segment in segments.drain(keep..) {
        let spare = dir.join(spare_name(next_spare_id));
        next_spare_id += 1;
        disk.rename(&segment.path, &spare).map_err(io_err(&segment.path))?;
        spares.push(spare);
        disk.sync_dir(dir).map_err(io_err(dir))?;
    }

    let next_lsn = expected.unwrap_or(checkpoint + 1);
    if next_lsn <= checkpoint {
        let path = segments.last().map(|s| s.path.clone()).unwrap_or_else(|| dir.to_path_buf());
        return Err(corrupt(
            &path,
            0,
            format!("the log ends at lsn {} but the checkpoint is at {checkpoint}", next_lsn.saturating_sub(1)),
        ));
    }
    let tail = match tail_at {
        Some((_, write_at)) => segments.pop().map(|s| OpenSegment {
            capacity: s.bytes.len() as u64,
            file: s.file,
            header: s.header,
            path: s.path,
            write_at,
        }),
        None => None,
    };
    let sealed = segments.into_iter().map(|s| (s.header, s.path)).collect();
    Ok(Recovered { batches, next_lsn, tail, sealed, spares, next_spare_id, truncated_tail })
}

/// Where a frame of this log follows a damaged one: right after the damaged frame's claimed
/// length in the same segment, or at the start of a later segment.
fn valid_after(segments: &[Segment], index: usize, at: usize, lsn: u64, life: u64) -> Option<String> {
    let segment = &segments[index];
    if let Some(head) = segment.bytes.get(at..at + FRAME_HEADER) {
        let claimed = Header::parse(head).len as usize;
        let next = at + FRAME_HEADER + claimed;
        if claimed <= MAX_PAYLOAD && frame_at(&segment.bytes, next, lsn + 1, life).is_ok() {
            return Some(format!("lsn {} at byte {next}", lsn + 1));
        }
    }
    segments[index + 1..]
        .iter()
        .find(|later| frame_at(&later.bytes, SEGMENT_HEADER as usize, later.header.base_lsn, life).is_ok())
        .map(|later| format!("lsn {} in {}", later.header.base_lsn, later.path.display()))
}
