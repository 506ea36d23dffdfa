//! The store: the write-ahead log as the durability point, a memtable for writes since the last
//! checkpoint, and sled as the materialized state behind it.
//!
//! On disk, under the store's directory:
//!
//! | path | what |
//! |---|---|
//! | `FORMAT` | `edgecard-store 2` (values in plaintext) or `edgecard-store 3 sealed` |
//! | `SEALING-CHECK` | sealed stores: a known value sealed under the data dir's key |
//! | `log/` | segments (`<seq>.wal`), spares, and the `checkpoint` mark |
//! | `sled/` | sled's files: every write up to the mark, maybe some after it |
//!
//! A store from before the log (sled's files directly in the directory) is migrated at open:
//! its files move into `sled/` and become the state at lsn 0.
//!
//! A sealed store ([`StoreOptions::sealer`]) seals every value before it reaches the log or sled
//! (the value's key is the AAD) and opens it on every read. Opening a plaintext store with a
//! sealer, or a sealed one whose key is no longer current, rewrites it whole (`reseal.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;

use crate::batch::WriteBatch;
use crate::checkpoint::{fsync_tree, read_mark, write_mark, Mark};
use crate::disk::{is_disk_full, Disk, OsDisk};
use crate::error::StoreError;
use crate::health::{Health, HealthCell};
use crate::log::{recovery, Log, LogOptions};
use crate::memtable::{Entries, KeyValue, Lookup, Memtable, Merged};
use crate::metrics::StoreMetrics;
use crate::seal::Sealer;

pub(crate) const FORMAT: &str = "edgecard-store 2\n";
pub(crate) const FORMAT_SEALED: &str = "edgecard-store 3 sealed\n";
pub(crate) const SEALING_CHECK: &str = "SEALING-CHECK";

/// How a store is placed and paced. `Default` is what production uses.
#[derive(Clone)]
pub struct StoreOptions {
    /// Where the log goes; tests substitute a [`crate::FaultyDisk`].
    pub disk: Arc<dyn Disk>,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
    pub log: LogOptions,
    /// Start a checkpoint once this many log bytes were appended since the last one.
    pub checkpoint_bytes: u64,
    /// Start a checkpoint this long after the last one, if anything was written.
    pub checkpoint_interval: Duration,
    /// Seals every value at rest. `None` keeps values in plaintext (tests, benches); the node and
    /// the coordinator always give one.
    pub sealer: Option<Arc<Sealer>>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("cache_capacity", &self.cache_capacity)
            .field("log", &self.log)
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("sealed", &self.sealer.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            disk: Arc::new(OsDisk),
            cache_capacity: 64 << 20,
            log: LogOptions::default(),
            checkpoint_bytes: 32 << 20,
            checkpoint_interval: Duration::from_secs(10),
            sealer: None,
        }
    }
}

struct CheckpointSignal {
    requested: bool,
    closed: bool,
    /// Stop without a last checkpoint, as a crash would.
    halted: bool,
}

struct Inner {
    db: sled::Db,
    sled_dir: PathBuf,
    log_dir: PathBuf,
    disk: Arc<dyn Disk>,
    log: Log,
    memtable: RwLock<Memtable>,
    health: Arc<HealthCell>,
    metrics: Arc<StoreMetrics>,
    options: StoreOptions,
    /// The lsn sled is known to hold, durably.
    mark: Mutex<u64>,
    life: u64,
    signal: Mutex<CheckpointSignal>,
    wake_checkpointer: Condvar,
    /// Values in the memtable, the log and sled are sealed with it.
    sealer: Option<Arc<Sealer>>,
}

/// The node's and the coordinator's durable key-value store.
pub struct Store {
    inner: Arc<Inner>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

impl Store {
    /// Opens (or creates) the store under `dir` on the real disk, with `cache_capacity` bytes of
    /// sled page cache.
    pub fn open(dir: &Path, cache_capacity: u64, metrics: Arc<StoreMetrics>) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions { cache_capacity, ..StoreOptions::default() }, metrics)
    }

    pub fn open_with(dir: &Path, options: StoreOptions, metrics: Arc<StoreMetrics>) -> Result<Self, StoreError> {
        crate::reseal::finish_interrupted(dir)?;
        let sealed_values = match prepare_layout(dir, &dir.join("sled"), options.sealer.as_deref())? {
            Layout::Ready { sealed_values } => sealed_values,
            Layout::Reseal { sealed_values } => {
                let writer = options.sealer.clone().ok_or_else(|| StoreError::Layout {
                    path: dir.to_path_buf(),
                    reason: "a re-seal needs a sealing key".into(),
                })?;
                crate::reseal::reseal(dir, &options, sealed_values, &writer)?;
                true
            }
        };
        Self::open_layout(dir, options, metrics, sealed_values)
    }

    /// Opens a store whose layout is checked; `sealed_values` says whether its values are sealed
    /// (and `options.sealer` opens them), or plaintext (and new ones are written plain too).
    pub(crate) fn open_layout(
        dir: &Path,
        mut options: StoreOptions,
        metrics: Arc<StoreMetrics>,
        sealed_values: bool,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        let sled_dir = dir.join("sled");
        let log_dir = dir.join("log");
        if !sealed_values {
            options.sealer = None;
        }
        let db = open_sled(&sled_dir, options.cache_capacity)?;
        // sled makes its files with the process's umask; the store's dirs are 0700 anyway, and
        // its files 0600 from here on (a store from an earlier release is tightened too).
        let tightened = crate::private::make_private(dir).map_err(io_at(dir))?;
        if !tightened.is_empty() {
            tracing::warn!(dir = %dir.display(), paths = tightened.len(), "store files were readable by other users; made private (0700 dirs, 0600 files)");
        }

        let disk = options.disk.clone();
        disk.create_dir_all(&log_dir).map_err(io_at(&log_dir))?;
        let previous = read_mark(disk.as_ref(), &log_dir)?;
        let mark = previous.lsn;
        let mut recovered = recovery::recover(disk.as_ref(), &log_dir, mark)?;
        // A new life before the first append (see `log/frame.rs`).
        let life = previous.life + 1;
        write_mark(disk.as_ref(), &log_dir, Mark { lsn: mark, life }).map_err(io_at(&log_dir))?;
        if recovered.truncated_tail {
            tracing::warn!(dir = %log_dir.display(), "store log ended in a torn write; cut it off");
        }
        let mut memtable = Memtable::default();
        let replayed = recovered.batches.len();
        for (_, batch) in std::mem::take(&mut recovered.batches) {
            memtable.apply(batch.into_ops());
        }
        let health = Arc::new(HealthCell::new(metrics.clone()));
        let log = Log::start(
            disk.clone(),
            log_dir.clone(),
            recovered,
            life,
            options.log.clone(),
            health.clone(),
            metrics.clone(),
        )?;
        let options_sealer = options.sealer.clone();
        let inner = Arc::new(Inner {
            db,
            sled_dir,
            log_dir,
            disk,
            log,
            memtable: RwLock::new(memtable),
            health,
            metrics,
            options,
            mark: Mutex::new(mark),
            life,
            signal: Mutex::new(CheckpointSignal { requested: replayed > 0, closed: false, halted: false }),
            wake_checkpointer: Condvar::new(),
            sealer: options_sealer,
        });
        let worker = inner.clone();
        let checkpointer = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(io_at(dir))?;
        inner.metrics.recovery_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(dir = %dir.display(), checkpoint = mark, replayed, "store open");
        Ok(Store { inner, checkpointer: Mutex::new(Some(checkpointer)) })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let stored = {
            let memtable = self.inner.memtable.read();
            match memtable.get(key) {
                Lookup::Found(value) => Some(value.to_vec()),
                Lookup::Deleted => None,
                Lookup::Unknown => self.inner.db.get(key)?.map(|v| v.to_vec()),
            }
        };
        stored.map(|value| self.inner.open_value(key, value)).transpose()
    }

    /// Whether values are sealed at rest.
    pub fn is_sealed(&self) -> bool {
        self.inner.sealer.is_some()
    }

    /// Every entry under `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<KeyValue, StoreError>> + '_ {
        self.scan_prefix_from(prefix, prefix)
    }

    /// The entries under `prefix` whose keys are `from` or later, in key order.
    pub fn scan_prefix_from(
        &self,
        prefix: &[u8],
        from: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StoreError>> + '_ {
        let overlay = self.inner.memtable.read().range(prefix, from);
        let owned_prefix = prefix.to_vec();
        let base = self
            .inner
            .db
            .range(from.max(prefix)..)
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&owned_prefix)))
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from));
        Merged::new(overlay, base, false).map(|item| self.inner.open_entry(item?))
    }

    /// The last entry under `prefix`, in key order.
    pub fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let overlay = self.inner.memtable.read().range(prefix, prefix);
        let base = self
            .inner
            .db
            .scan_prefix(prefix)
            .rev()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from));
        Merged::new(overlay, base, true).next().map(|item| self.inner.open_entry(item?)).transpose()
    }

    /// Applies `batch` atomically and returns its lsn. It is visible at once, and durable once
    /// [`Store::durable`] or [`Store::wait_durable`] says so: nothing may be revealed, acknowledged
    /// or sent on its strength before then.
    pub fn apply(&self, mut batch: WriteBatch) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(self.inner.log.last_lsn());
        }
        let inner = &self.inner;
        if let Some(sealer) = &inner.sealer {
            // Sealed before the log sees it: neither the log nor sled ever holds the plaintext.
            batch.seal_values(|key, value| sealer.seal(key, value));
        }
        let (lsn, since_checkpoint) = inner.log.append(batch, |ops| inner.memtable.write().apply(ops))?;
        inner.metrics.batches_applied.inc();
        if since_checkpoint >= inner.options.checkpoint_bytes {
            inner.request_checkpoint();
        }
        Ok(lsn)
    }

    /// Resolves once every batch applied before this call is durable.
    pub fn durable(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.inner.log.wait_durable(self.inner.log.last_lsn())
    }

    /// Resolves once the batch at `lsn` (and every one before it) is durable.
    pub fn wait_durable(&self, lsn: u64) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.inner.log.wait_durable(lsn)
    }

    /// Applies and waits until durable.
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let lsn = self.apply(batch)?;
        self.wait_durable(lsn).await
    }

    /// Blocks this (non-runtime) thread until the batch at `lsn` is durable.
    pub fn wait_durable_blocking(&self, lsn: u64) -> Result<(), StoreError> {
        self.inner.log.wait_durable_blocking(lsn)
    }

    /// The lsn of the last batch applied.
    pub fn last_lsn(&self) -> u64 {
        self.inner.log.last_lsn()
    }

    /// The lsn up to which sled holds everything, durably.
    pub fn checkpoint_lsn(&self) -> u64 {
        *self.inner.mark.lock()
    }

    pub fn health(&self) -> Health {
        self.inner.health.get()
    }

    /// A feed of health changes; `Poisoned` is the last one.
    pub fn subscribe_health(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// Resolves with the reason once the store is poisoned; the process should then exit, so
    /// that a restart recovers from what the disk really holds.
    pub fn until_poisoned(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut feed = self.inner.health.subscribe();
        let health = self.inner.health.clone();
        async move {
            if feed.wait_for(|h| *h == Health::Poisoned).await.is_err() {
                std::future::pending::<()>().await;
            }
            health.poison_reason().unwrap_or_default()
        }
    }

    /// Why the store was poisoned, if it was.
    pub fn poison_reason(&self) -> Option<String> {
        self.inner.health.poison_reason()
    }

    /// Runs a checkpoint now, on this thread; `Ok(false)` if there was nothing to write.
    pub fn checkpoint_now(&self) -> Result<bool, StoreError> {
        self.inner.checkpoint()
    }

    /// Live log segments besides the one being written (the checkpoint recycles them).
    pub fn sealed_log_segments(&self) -> usize {
        self.inner.log.sealed_segments()
    }

    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.inner.metrics
    }

    /// Writes a last checkpoint and stops the store's threads; later writes fail with `Closed`.
    pub fn close(&self) {
        self.stop(false);
    }

    /// Stops the store's threads without a last checkpoint, as if the process died here: for
    /// crash tests on a [`crate::FaultyDisk`], where the process must not outlive its disk.
    pub fn halt(&self) {
        self.stop(true);
    }

    fn stop(&self, halt: bool) {
        {
            let mut signal = self.inner.signal.lock();
            signal.closed = true;
            signal.halted |= halt;
        }
        self.inner.wake_checkpointer.notify_all();
        if let Some(handle) = self.checkpointer.lock().take() {
            let _ = handle.join();
        }
        self.inner.log.close();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn open_value(&self, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match &self.sealer {
            None => Ok(value),
            Some(sealer) => sealer.open(key, &value).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(key.get(..key.len().min(24)).unwrap_or_default()).into_owned(),
                reason: e.to_string(),
            }),
        }
    }

    fn open_entry(&self, (key, value): KeyValue) -> Result<KeyValue, StoreError> {
        let value = self.open_value(&key, value)?;
        Ok((key, value))
    }

    fn request_checkpoint(&self) {
        let mut signal = self.signal.lock();
        if !signal.requested {
            signal.requested = true;
            self.wake_checkpointer.notify_one();
        }
    }

    fn run_checkpointer(&self) {
        loop {
            let (closing, halted) = {
                let mut signal = self.signal.lock();
                if !signal.requested && !signal.closed {
                    self.wake_checkpointer.wait_for(&mut signal, self.options.checkpoint_interval);
                }
                signal.requested = false;
                (signal.closed, signal.halted)
            };
            if halted || self.health.get() == Health::Poisoned {
                return;
            }
            match self.checkpoint() {
                Ok(_) => {}
                Err(StoreError::DiskFull) => {
                    tracing::warn!("checkpoint postponed: disk full");
                    std::thread::sleep(self.options.log.disk_full_retry);
                }
                Err(error) => {
                    if self.health.get() != Health::Poisoned {
                        tracing::error!(%error, "checkpoint failed");
                    }
                }
            }
            if closing {
                return;
            }
            if let Err(error) = self.log.ensure_spare() {
                tracing::warn!(%error, "could not prepare a spare log segment");
            }
        }
    }

    /// Poisons on anything but a full disk, which is only a postponement here: the log still
    /// holds every write.
    fn fail(&self, path: &Path, error: std::io::Error) -> StoreError {
        if is_disk_full(&error) {
            return StoreError::DiskFull;
        }
        self.health.poison(format!("checkpoint, {}: {error}", path.display()));
        StoreError::Poisoned { reason: self.health.poison_reason().unwrap_or_default() }
    }

    fn fail_sled(&self, error: sled::Error) -> StoreError {
        match error {
            sled::Error::Io(io) => self.fail(&self.sled_dir, io),
            other => {
                self.health.poison(format!("checkpoint, sled: {other}"));
                StoreError::Poisoned { reason: self.health.poison_reason().unwrap_or_default() }
            }
        }
    }

    fn checkpoint(&self) -> Result<bool, StoreError> {
        // One checkpoint at a time: the mark lock is held throughout.
        let mut mark = self.mark.lock();
        let started = Instant::now();
        let (lsn, frozen) = self.log.with_appends_paused(|last| (last, self.memtable.write().freeze()));
        if lsn == *mark && frozen.is_empty() {
            self.memtable.write().release_frozen();
            return Ok(false);
        }
        // sled must never hold what the log could still lose.
        self.log.wait_durable_blocking(lsn)?;
        self.write_to_sled(&frozen)?;
        write_mark(self.disk.as_ref(), &self.log_dir, Mark { lsn, life: self.life })
            .map_err(|e| self.fail(&self.log_dir, e))?;
        self.memtable.write().release_frozen();
        *mark = lsn;
        drop(mark);
        self.log.recycle_through(lsn).map_err(|e| match e {
            StoreError::Io { path, source } => self.fail(&path, source),
            other => other,
        })?;
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Entry by entry, not as one sled batch: a sled batch locks the whole tree against readers
    /// while it applies, and atomicity is not needed here (the mark moves only afterwards, and
    /// replay rewrites the same values).
    fn write_to_sled(&self, frozen: &Entries) -> Result<(), StoreError> {
        for (key, value) in frozen {
            let written = match value {
                Some(value) => self.db.insert(key.as_slice(), value.as_slice()).map(drop),
                None => self.db.remove(key.as_slice()).map(drop),
            };
            written.map_err(|e| self.fail_sled(e))?;
        }
        self.db.flush().map_err(|e| self.fail_sled(e))?;
        fsync_tree(&self.sled_dir).map_err(|e| self.fail(&self.sled_dir, e))
    }
}

/// Opens sled in `sled_dir`. sled releases its file lock only once its last handle is gone,
/// which can trail a drop in this process by a moment (a store closed and opened again, the
/// copy a re-seal just wrote): a lock refusal is retried for up to a second. Another process
/// holding the store keeps it for longer and gets the error.
pub(crate) fn open_sled(sled_dir: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let opened = sled::Config::new()
            .path(sled_dir)
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // Checkpoints flush sled; its own periodic flusher would only add writes.
            .flush_every_ms(None)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(|source| StoreError::Open { path: sled_dir.to_path_buf(), source }),
        }
    }
}

/// What opening a store's directory found.
enum Layout {
    /// Open it as it is.
    Ready { sealed_values: bool },
    /// Rewrite it sealed under the current key first (a plaintext store given a key, or one
    /// sealed under an older key of the ring).
    Reseal { sealed_values: bool },
}

/// Creates the layout, or checks it (including the sealing key, before anything is written), or
/// migrates a store from before the log.
fn prepare_layout(dir: &Path, sled_dir: &Path, sealer: Option<&Sealer>) -> Result<Layout, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_at(dir))?;
    let format_path = dir.join("FORMAT");
    match std::fs::read_to_string(&format_path) {
        Ok(found) if found == FORMAT => {
            return Ok(match sealer {
                Some(_) => Layout::Reseal { sealed_values: false },
                None => Layout::Ready { sealed_values: false },
            })
        }
        Ok(found) if found == FORMAT_SEALED => {
            let sealer = sealer.ok_or_else(|| StoreError::Layout {
                path: dir.to_path_buf(),
                reason: "the store is sealed and no sealing key was given".into(),
            })?;
            let check_path = dir.join(SEALING_CHECK);
            let check = std::fs::read(&check_path).map_err(io_at(&check_path))?;
            sealer
                .verify_check(&check)
                .map_err(|e| StoreError::WrongSealingKey { path: dir.to_path_buf(), reason: e.to_string() })?;
            return Ok(if Sealer::version_of(&check) == Some(sealer.current_version()) {
                Layout::Ready { sealed_values: true }
            } else {
                Layout::Reseal { sealed_values: true }
            });
        }
        Ok(found) => {
            return Err(StoreError::Layout {
                path: dir.to_path_buf(),
                reason: format!(
                    "store format {:?} is not {:?}: written by another version of edgecard",
                    found.trim(),
                    FORMAT.trim()
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::Io { path: format_path, source: e }),
    }
    if let Some(sealer) = sealer {
        let empty = |d: &Path| std::fs::read_dir(d).map_or(true, |mut entries| entries.next().is_none());
        if empty(dir) {
            // A new store: sealed from its first write.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(sled_dir).map_err(io_at(sled_dir))?;
            write_durably(&dir.join(SEALING_CHECK), &sealer.check_value())?;
            write_durably(&format_path, FORMAT_SEALED.as_bytes())?;
            return Ok(Layout::Ready { sealed_values: true });
        }
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(sled_dir).map_err(io_at(sled_dir))?;
    if dir.join("db").exists() && dir.join("conf").exists() {
        // sled's files from before the log: they are the state at lsn 0.
        for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let entry = entry.map_err(io_at(dir))?;
            let name = entry.file_name();
            let legacy =
                name == "db" || name == "conf" || name == "blobs" || name.to_string_lossy().starts_with("snap.");
            if legacy {
                std::fs::rename(entry.path(), sled_dir.join(&name)).map_err(io_at(&entry.path()))?;
            }
        }
        tracing::info!(dir = %dir.display(), "migrated a store from before the write-ahead log");
    }
    fsync_tree(sled_dir).map_err(io_at(sled_dir))?;
    write_durably(&format_path, FORMAT.as_bytes())?;
    Ok(match sealer {
        Some(_) => Layout::Reseal { sealed_values: false },
        None => Layout::Ready { sealed_values: false },
    })
}

/// Writes `path` whole or not at all (a temporary file, fsynced, renamed, the directory fsynced).
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // 0600 from the start: the store's files are private (`private.rs`).
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_at(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_at(dir))
}
