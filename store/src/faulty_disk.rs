//! An in-memory [`Disk`] that fails the way real disks do, for tests and the simulation.
//!
//! It keeps two images of every file and directory: what a reader sees now (the page cache) and
//! what is on stable storage. Writes reach stable storage only through a successful `sync_data`
//! (files) or `sync_dir` (names). Faults:
//! - [`FaultyDisk::crash`] throws away everything not synced, like a power cut. The process on
//!   the disk dies with it: views from [`FaultyDisk::attach`] and file handles made before the
//!   crash fail from then on, so a store still running cannot write into the next life;
//! - [`FaultyDisk::fail_next_syncs`] makes fsyncs fail with EIO and, as Linux does, drops the
//!   dirty data they were to write while readers still see it, so a later fsync "succeeds"
//!   without it (PostgreSQL's fsyncgate);
//! - [`FaultyDisk::set_capacity`] fills the disk: writes that would grow files past it fail
//!   with ENOSPC until capacity is raised;
//! - [`FaultyDisk::crash_tearing_last_write`] keeps only part of the last unsynced write;
//! - [`FaultyDisk::flip_byte`] corrupts stored bytes;
//! - [`FaultyDisk::stall_syncs`] holds fsyncs back, so that a crash can land between a write and
//!   its fsync;
//! - [`FaultyDisk::lie_about_syncs`] acknowledges fsyncs without persisting anything, so that
//!   several writes are pending at a crash and can be lost out of order.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::disk::{Disk, DiskFile};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// The disk's controller, and (through [`FaultyDisk::attach`]) a process's view of it.
#[derive(Clone, Default)]
pub struct FaultyDisk {
    inner: Arc<Mutex<State>>,
    /// The life this view belongs to; `None` for the controller, whose file operations never die.
    life: Option<u64>,
}

impl std::fmt::Debug for FaultyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDisk").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// Bumped by every crash; handles from an older life fail.
    life: u64,
    next_file_id: u64,
    /// Path → file id, as readers see it now, and as on stable storage.
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeMap<PathBuf, ()>,
    files: BTreeMap<u64, FileImage>,
    /// Total bytes the files may hold; `None` is unlimited.
    capacity: Option<u64>,
    failing_syncs: u32,
    /// Orders writes across files, to find the last one.
    write_clock: u64,
    /// While set, file fsyncs wait (a slow disk), so a test can crash between write and sync.
    stall_syncs: bool,
    /// While set, file fsyncs return at once and persist nothing (a write cache that lies).
    lying_syncs: bool,
    /// How many more file fsyncs may complete before the rest stall; `None` is no limit.
    syncs_allowed: Option<u32>,
}

#[derive(Default, Clone)]
struct FileImage {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Writes not yet on stable storage: (clock, offset, bytes).
    pending: Vec<(u64, u64, Vec<u8>)>,
}

fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

impl State {
    fn used(&self) -> u64 {
        self.files.values().map(|f| f.current.len() as u64).sum()
    }
}

impl FaultyDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// A view of the disk for one process life (a store under test): it dies at the next crash.
    pub fn attach(&self) -> FaultyDisk {
        let life = self.inner.lock().life;
        FaultyDisk { inner: self.inner.clone(), life: Some(life) }
    }

    fn alive(&self, state: &State) -> io::Result<()> {
        match self.life {
            Some(life) if life != state.life => Err(dead_handle()),
            _ => Ok(()),
        }
    }

    /// A power cut: everything not synced is gone, and every open handle is dead.
    pub fn crash(&self) {
        let mut state = self.inner.lock();
        Self::crash_locked(&mut state);
    }

    /// A power cut in the middle of the last unsynced write: its first `keep` bytes reached the
    /// platter, the rest did not, and nothing else unsynced survives.
    pub fn crash_tearing_last_write(&self, keep: usize) {
        let mut state = self.inner.lock();
        let last = state
            .files
            .iter()
            .flat_map(|(id, f)| f.pending.iter().map(move |(clock, offset, data)| (*clock, *id, *offset, data.clone())))
            .max_by_key(|(clock, ..)| *clock);
        if let Some((_, id, offset, data)) = last {
            if let Some(file) = state.files.get_mut(&id) {
                let kept = &data[..keep.min(data.len())];
                write_into(&mut file.durable, offset, kept);
            }
        }
        Self::crash_locked(&mut state);
    }

    fn crash_locked(state: &mut State) {
        state.life += 1;
        state.names = state.durable_names.clone();
        let live: Vec<u64> = state.names.values().copied().collect();
        state.files.retain(|id, _| live.contains(id));
        for file in state.files.values_mut() {
            file.current = file.durable.clone();
            file.pending.clear();
        }
        state.failing_syncs = 0;
    }

    /// The next `n` fsyncs fail with EIO, losing the dirty data they were to write.
    pub fn fail_next_syncs(&self, n: u32) {
        self.inner.lock().failing_syncs = n;
    }

    /// Limits the bytes all files may hold together; `None` lifts the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.inner.lock().capacity = bytes;
    }

    /// While `stalled`, file fsyncs wait instead of completing.
    pub fn stall_syncs(&self, stalled: bool) {
        self.inner.lock().stall_syncs = stalled;
    }

    /// Lets `n` more file fsyncs complete, then stalls the rest (`None` lifts the limit): a crash
    /// can then land after one commit group is durable and before the next.
    pub fn allow_syncs(&self, n: Option<u32>) {
        self.inner.lock().syncs_allowed = n;
    }

    /// While `lying`, file fsyncs succeed without persisting anything.
    pub fn lie_about_syncs(&self, lying: bool) {
        self.inner.lock().lying_syncs = lying;
    }

    /// Writes not yet on stable storage, over all files.
    pub fn unsynced_writes(&self) -> usize {
        self.inner.lock().files.values().map(|f| f.pending.len()).sum()
    }

    /// Bytes the files hold now.
    pub fn used(&self) -> u64 {
        self.inner.lock().used()
    }

    /// Flips one stored byte of `path`, in the page cache and on stable storage alike.
    pub fn flip_byte(&self, path: &Path, offset: u64) -> bool {
        let mut state = self.inner.lock();
        let Some(id) = state.names.get(path).copied() else { return false };
        let Some(file) = state.files.get_mut(&id) else { return false };
        let at = offset as usize;
        let mut flipped = false;
        for image in [&mut file.current, &mut file.durable] {
            if let Some(byte) = image.get_mut(at) {
                *byte ^= 0x5a;
                flipped = true;
            }
        }
        flipped
    }

    /// The files under `dir`, as readers see them now.
    pub fn files_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.inner.lock().names.keys().filter(|p| p.parent() == Some(dir)).cloned().collect()
    }
}

fn dead_handle() -> io::Error {
    io::Error::other("disk handle from before a crash")
}

impl Disk for FaultyDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        let mut state = self.inner.lock();
        self.alive(&state)?;
        let id = match state.names.get(path) {
            Some(id) => *id,
            None if create => {
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                if !state.dirs.contains_key(&parent) {
                    return Err(io::Error::from(io::ErrorKind::NotFound));
                }
                state.next_file_id += 1;
                let id = state.next_file_id;
                state.files.insert(id, FileImage::default());
                state.names.insert(path.to_path_buf(), id);
                id
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(Arc::new(FaultyFile { disk: self.inner.clone(), id, life: state.life }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.inner.lock();
        self.alive(&state)?;
        if !state.dirs.contains_key(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(state
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        self.alive(&state)?;
        let id = state.names.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        self.alive(&state)?;
        state.names.remove(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Directories are treated as durable at once: the log creates its own only at start.
        let mut state = self.inner.lock();
        self.alive(&state)?;
        let mut at = Some(dir);
        while let Some(d) = at {
            state.dirs.insert(d.to_path_buf(), ());
            at = d.parent();
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        self.alive(&state)?;
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        let under = |p: &PathBuf| p.parent() == Some(dir);
        let current: Vec<(PathBuf, u64)> =
            state.names.iter().filter(|(p, _)| under(p)).map(|(p, id)| (p.clone(), *id)).collect();
        state.durable_names.retain(|p, _| !under(p));
        state.durable_names.extend(current);
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.inner.lock();
        state.names.contains_key(path) || state.dirs.contains_key(path)
    }
}

struct FaultyFile {
    disk: Arc<Mutex<State>>,
    id: u64,
    life: u64,
}

impl FaultyFile {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.disk.lock();
        if state.life != self.life {
            return Err(dead_handle());
        }
        f(&mut state)
    }
}

impl DiskFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|state| {
            let file = state.files.get(&self.id).ok_or_else(dead_handle)?;
            let start = (offset as usize).min(file.current.len());
            let n = buf.len().min(file.current.len() - start);
            buf[..n].copy_from_slice(&file.current[start..start + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|state| {
            let used = state.used();
            let capacity = state.capacity;
            let file = state.files.get(&self.id).ok_or_else(dead_handle)?;
            let growth = (offset + buf.len() as u64).saturating_sub(file.current.len() as u64);
            if let Some(capacity) = capacity {
                if growth > 0 && used + growth > capacity {
                    return Err(io::Error::from_raw_os_error(ENOSPC));
                }
            }
            state.write_clock += 1;
            let clock = state.write_clock;
            let file = state.files.get_mut(&self.id).ok_or_else(dead_handle)?;
            write_into(&mut file.current, offset, buf);
            file.pending.push((clock, offset, buf.to_vec()));
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        loop {
            let go = self.with(|state| {
                Ok(match state.syncs_allowed {
                    _ if state.stall_syncs => false,
                    Some(0) => false,
                    Some(n) => {
                        state.syncs_allowed = Some(n - 1);
                        true
                    }
                    None => true,
                })
            })?;
            if go {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.with(|state| {
            if state.lying_syncs {
                return Ok(());
            }
            let failing = state.failing_syncs > 0;
            if failing {
                state.failing_syncs -= 1;
            }
            let file = state.files.get_mut(&self.id).ok_or_else(dead_handle)?;
            let pending = std::mem::take(&mut file.pending);
            if failing {
                // The kernel marks the pages clean: that data will never reach the platter.
                return Err(io::Error::from_raw_os_error(EIO));
            }
            for (_, offset, data) in pending {
                write_into(&mut file.durable, offset, &data);
            }
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|state| Ok(state.files.get(&self.id).ok_or_else(dead_handle)?.current.len() as u64))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_and_names_are_lost_at_crash() {
        let disk = FaultyDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let a = disk.open(&dir.join("a"), true).unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();
        a.write_all_at(b"world", 5).unwrap();
        let b = disk.open(&dir.join("b"), true).unwrap();
        b.write_all_at(b"x", 0).unwrap();
        b.sync_data().unwrap();
        disk.crash();
        assert!(a.len().is_err(), "a handle from before the crash is dead");
        let a = disk.open(&dir.join("a"), false).unwrap();
        assert_eq!(a.len().unwrap(), 5);
        assert!(disk.open(&dir.join("b"), false).is_err(), "a name never synced is gone");
    }

    #[test]
    fn a_failed_sync_loses_its_data_and_the_next_sync_does_not_bring_it_back() {
        let disk = FaultyDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let a = disk.open(&dir.join("a"), true).unwrap();
        disk.sync_dir(dir).unwrap();
        a.write_all_at(b"lost", 0).unwrap();
        disk.fail_next_syncs(1);
        assert!(a.sync_data().is_err());
        let mut buf = [0u8; 4];
        assert_eq!(a.read_at(&mut buf, 0).unwrap(), 4, "the page cache still shows it");
        a.sync_data().unwrap();
        disk.crash();
        let a = disk.open(&dir.join("a"), false).unwrap();
        assert_eq!(a.len().unwrap(), 0);
    }

    #[test]
    fn a_full_disk_refuses_growth_until_capacity_returns() {
        let disk = FaultyDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let a = disk.open(&dir.join("a"), true).unwrap();
        disk.set_capacity(Some(4));
        a.write_all_at(b"1234", 0).unwrap();
        let full = a.write_all_at(b"5", 4).unwrap_err();
        assert!(crate::disk::is_disk_full(&full), "{full}");
        a.write_all_at(b"9", 0).unwrap();
        disk.set_capacity(None);
        a.write_all_at(b"5", 4).unwrap();
    }

    #[test]
    fn a_torn_write_keeps_its_prefix_only() {
        let disk = FaultyDisk::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let a = disk.open(&dir.join("a"), true).unwrap();
        disk.sync_dir(dir).unwrap();
        a.write_all_at(b"abcdef", 0).unwrap();
        disk.crash_tearing_last_write(2);
        let a = disk.open(&dir.join("a"), false).unwrap();
        let mut buf = [0u8; 6];
        assert_eq!(a.read_at(&mut buf, 0).unwrap(), 2);
        assert_eq!(&buf[..2], b"ab");
    }
}
