//! The write-ahead log: the store's one durability point.
//!
//! `append` puts a batch's frame into an in-memory queue under the log's lock and gives it the
//! next lsn. One writer thread takes everything queued, writes it with one positional write per
//! segment, and covers it with one fdatasync (group commit); then every waiter up to the last lsn
//! in that group is told. While the fdatasync runs, new batches queue up for the next group, so
//! the group grows with the load on its own; `group_wait` adds a short gathering pause before
//! each write for lighter loads.
//!
//! Fault rules (DESIGN §7): a failed write or fsync poisons the log for good, because after a
//! failed fsync the kernel may have dropped the data while the page cache still shows it. A full
//! disk is the one error the log waits out: it keeps what is queued (new batches too), fails
//! durability waits with `DiskFull`, and retries until space returns.

pub mod frame;
pub mod recovery;
pub mod segment;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

use crate::batch::{Op, WriteBatch};
use crate::disk::{is_disk_full, Disk};
use crate::error::StoreError;
use crate::health::{Health, HealthCell};
use crate::metrics::StoreMetrics;
use recovery::Recovered;
use segment::{activate, make_spare, spare_name, OpenSegment, SegmentHeader, SEGMENT_HEADER};

/// How the log is sized and paced.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Bytes per preallocated segment.
    pub segment_bytes: u64,
    /// Pause before each group write to gather more batches; zero writes at once.
    pub group_wait: Duration,
    /// How often a writer stalled on a full disk tries again.
    pub disk_full_retry: Duration,
    /// Spare segments kept for reuse after checkpoints.
    pub max_spares: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 16 << 20,
            group_wait: Duration::ZERO,
            disk_full_retry: Duration::from_millis(100),
            max_spares: 2,
        }
    }
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

struct Queue {
    /// Frames appended but not yet handed to the writer.
    pending: Vec<u8>,
    /// The lsn of the last frame in `pending`.
    pending_last: u64,
    next_lsn: u64,
    durable_lsn: u64,
    waiters: VecDeque<(u64, Waiter)>,
    closed: bool,
    /// Log bytes appended since the last checkpoint began.
    bytes_since_checkpoint: u64,
    /// This open's life number, stamped on every frame.
    life: u64,
}

/// Segments on disk, shared by the writer (rollover) and the checkpointer (recycling).
struct Segments {
    /// Live segments before the one being written, oldest first.
    sealed: Vec<(SegmentHeader, PathBuf)>,
    /// The base lsn of the segment being written.
    current_base: Option<u64>,
    spares: Vec<PathBuf>,
    next_spare_id: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    durable_changed: Condvar,
    segments: Mutex<Segments>,
    health: Arc<HealthCell>,
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    options: LogOptions,
    metrics: Arc<StoreMetrics>,
}

pub struct Log {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Log {
    /// Starts the writer over what recovery found.
    pub fn start(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        recovered: Recovered,
        life: u64,
        options: LogOptions,
        health: Arc<HealthCell>,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Log, StoreError> {
        let durable_lsn = recovered.next_lsn - 1;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                pending_last: durable_lsn,
                next_lsn: recovered.next_lsn,
                durable_lsn,
                waiters: VecDeque::new(),
                closed: false,
                bytes_since_checkpoint: 0,
                life,
            }),
            wake_writer: Condvar::new(),
            durable_changed: Condvar::new(),
            segments: Mutex::new(Segments {
                sealed: recovered.sealed,
                current_base: None,
                spares: recovered.spares,
                next_spare_id: recovered.next_spare_id,
            }),
            health,
            disk,
            dir,
            options,
            metrics,
        });
        let writer_shared = shared.clone();
        let tail = recovered.tail;
        shared.segments.lock().current_base = tail.as_ref().map(|t| t.header.base_lsn);
        let writer = std::thread::Builder::new()
            .name("store-log-writer".into())
            .spawn(move || Writer { shared: writer_shared, segment: tail }.run())
            .map_err(|source| StoreError::Io { path: shared.dir.clone(), source })?;
        Ok(Log { shared, writer: Mutex::new(Some(writer)) })
    }

    /// Why a new waiter cannot be promised durability now.
    fn refusal(&self, queue: &Queue) -> Option<StoreError> {
        match self.shared.health.get() {
            Health::Poisoned => Some(self.poisoned()),
            Health::DiskFull => Some(StoreError::DiskFull),
            Health::Ok if queue.closed => Some(StoreError::Closed),
            Health::Ok => None,
        }
    }

    /// Why a batch cannot be appended. A full disk is no reason: the batch queues behind the
    /// stalled write, so that what callers hold in memory stays in step with the log (no lsn or
    /// outbox seq is skipped); its commit fails with `DiskFull` until space returns. Callers
    /// check `Store::health` before starting new work.
    fn append_refusal(&self, queue: &Queue) -> Option<StoreError> {
        match self.shared.health.get() {
            Health::Poisoned => Some(self.poisoned()),
            _ if queue.closed => Some(StoreError::Closed),
            _ => None,
        }
    }

    fn poisoned(&self) -> StoreError {
        StoreError::Poisoned { reason: self.shared.health.poison_reason().unwrap_or_default() }
    }

    /// Queues `batch` under the next lsn and hands its operations to `then` while still holding
    /// the log's lock, so that whatever `then` applies in memory is applied in lsn order. Returns
    /// the lsn and the log bytes appended since the last checkpoint began.
    pub fn append(&self, batch: WriteBatch, then: impl FnOnce(Vec<Op>)) -> Result<(u64, u64), StoreError> {
        let size = frame::payload_len(&batch);
        if size > frame::MAX_PAYLOAD {
            return Err(StoreError::Encode {
                what: "write batch".into(),
                reason: format!("{size} bytes is over the log's {} per batch", frame::MAX_PAYLOAD),
            });
        }
        let mut queue = self.shared.queue.lock();
        if let Some(refused) = self.append_refusal(&queue) {
            return Err(refused);
        }
        let lsn = queue.next_lsn;
        let before = queue.pending.len();
        let life = queue.life;
        frame::encode(lsn, life, &batch, size, &mut queue.pending);
        queue.bytes_since_checkpoint += (queue.pending.len() - before) as u64;
        queue.next_lsn += 1;
        queue.pending_last = lsn;
        then(batch.into_ops());
        let since = queue.bytes_since_checkpoint;
        drop(queue);
        self.shared.wake_writer.notify_one();
        Ok((lsn, since))
    }

    /// The lsn of the last batch appended.
    pub fn last_lsn(&self) -> u64 {
        self.shared.queue.lock().next_lsn - 1
    }

    /// Runs `f` with the log's lock held, so no append happens meanwhile; `f` gets the last lsn.
    pub fn with_appends_paused<T>(&self, f: impl FnOnce(u64) -> T) -> T {
        let mut queue = self.shared.queue.lock();
        queue.bytes_since_checkpoint = 0;
        let last = queue.next_lsn - 1;
        f(last)
    }

    /// Resolves when `lsn` is durable; fails if it never will be in this process.
    pub fn wait_durable(&self, lsn: u64) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let early = {
            let mut queue = self.shared.queue.lock();
            if queue.durable_lsn >= lsn {
                Some(Ok(()))
            } else if let Some(refused) = self.refusal(&queue) {
                Some(Err(refused))
            } else {
                queue.waiters.push_back((lsn, tx));
                None
            }
        };
        let metrics = self.shared.metrics.clone();
        let asked = Instant::now();
        async move {
            if let Some(outcome) = early {
                return outcome;
            }
            let outcome = rx.await.unwrap_or(Err(StoreError::Closed));
            metrics.commit_wait_seconds.observe(asked.elapsed().as_secs_f64());
            outcome
        }
    }

    /// Blocks the calling (non-runtime) thread until `lsn` is durable.
    pub fn wait_durable_blocking(&self, lsn: u64) -> Result<(), StoreError> {
        let mut queue = self.shared.queue.lock();
        loop {
            if queue.durable_lsn >= lsn {
                return Ok(());
            }
            match self.shared.health.get() {
                Health::Poisoned => return Err(self.poisoned()),
                // Not durable now; the caller may try again once space returns.
                Health::DiskFull => return Err(StoreError::DiskFull),
                Health::Ok => {}
            }
            if queue.closed && queue.pending.is_empty() {
                return Err(StoreError::Closed);
            }
            self.shared.durable_changed.wait_for(&mut queue, Duration::from_millis(50));
        }
    }

    /// Turns every sealed segment whose frames are all at or below `lsn` into a spare.
    pub fn recycle_through(&self, lsn: u64) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut segments = shared.segments.lock();
        // A sealed segment is wholly past once the segment after it starts at or below lsn + 1.
        let mut past = 0;
        for i in 0..segments.sealed.len() {
            let next_base = match segments.sealed.get(i + 1) {
                Some((next, _)) => next.base_lsn,
                None => segments.current_base.unwrap_or(u64::MAX),
            };
            if next_base > lsn.saturating_add(1) {
                break;
            }
            past = i + 1;
        }
        if past == 0 {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        for (_, path) in segments.sealed.drain(..past).collect::<Vec<_>>() {
            if segments.spares.len() < shared.options.max_spares {
                let spare = shared.dir.join(spare_name(segments.next_spare_id));
                segments.next_spare_id += 1;
                shared.disk.rename(&path, &spare).map_err(io(&path))?;
                segments.spares.push(spare);
            } else {
                shared.disk.remove(&path).map_err(io(&path))?;
            }
        }
        shared.disk.sync_dir(&shared.dir).map_err(io(&shared.dir))
    }

    /// Makes a spare segment ahead of need, so the writer rarely zero-fills one itself.
    pub fn ensure_spare(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        let path = {
            let mut segments = shared.segments.lock();
            if !segments.spares.is_empty() {
                return Ok(());
            }
            segments.next_spare_id += 1;
            shared.dir.join(spare_name(segments.next_spare_id - 1))
        };
        make_spare(shared.disk.as_ref(), &shared.dir, &path, shared.options.segment_bytes)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        shared.segments.lock().spares.push(path);
        Ok(())
    }

    /// Live segment files now (sealed ones, not the one being written).
    pub fn sealed_segments(&self) -> usize {
        self.shared.segments.lock().sealed.len()
    }

    /// Stops taking batches, writes what is queued, and stops the writer.
    pub fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake_writer.notify_all();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    shared: Arc<Shared>,
    segment: Option<OpenSegment>,
}

/// How one group write ended.
enum WriteError {
    Full { written: usize, error: std::io::Error },
    Failed { path: PathBuf, error: std::io::Error },
}

impl Writer {
    fn run(mut self) {
        let mut buffer = Vec::new();
        loop {
            let mut queue = self.shared.queue.lock();
            while queue.pending.is_empty() && !queue.closed {
                self.shared.wake_writer.wait(&mut queue);
            }
            if queue.pending.is_empty() {
                return;
            }
            if !self.shared.options.group_wait.is_zero() && !queue.closed {
                MutexGuard::unlocked(&mut queue, || std::thread::sleep(self.shared.options.group_wait));
            }
            buffer.clear();
            std::mem::swap(&mut buffer, &mut queue.pending);
            let last = queue.pending_last;
            drop(queue);

            let started = Instant::now();
            let outcome = self.write_group(&buffer).and_then(|()| self.sync());
            match outcome {
                Ok(()) => {
                    self.shared.health.set(Health::Ok);
                    self.shared.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                    self.shared.metrics.log_bytes.inc_by(buffer.len() as u64);
                    self.shared.metrics.flushes.inc();
                    self.resolve(last);
                }
                Err(WriteError::Full { written, error }) => {
                    tracing::warn!(%error, "store disk full: refusing writes until space returns");
                    self.shared.health.set(Health::DiskFull);
                    self.shared.metrics.disk_full_stalls.inc();
                    self.requeue(&buffer[written..]);
                    self.fail_waiters_through(last, || StoreError::DiskFull);
                    if self.shared.queue.lock().closed {
                        // Shutting down on a full disk: what is queued was never reported durable.
                        tracing::error!("store closed on a full disk; batches not yet written are dropped");
                        self.drop_queued(|| StoreError::Closed);
                        return;
                    }
                    std::thread::sleep(self.shared.options.disk_full_retry);
                }
                Err(WriteError::Failed { path, error }) => {
                    self.shared.health.poison(format!("{}: {error}", path.display()));
                    let reason = self.shared.health.poison_reason().unwrap_or_default();
                    // Nothing more is written: everyone waiting learns it now.
                    self.drop_queued(|| StoreError::Poisoned { reason: reason.clone() });
                    self.shared.durable_changed.notify_all();
                    return;
                }
            }
        }
    }

    /// Puts bytes that did not reach the disk back in front of anything queued since.
    fn requeue(&self, unwritten: &[u8]) {
        let mut queue = self.shared.queue.lock();
        let mut pending = unwritten.to_vec();
        pending.extend_from_slice(&queue.pending);
        queue.pending = pending;
    }

    fn fail_waiters_through(&self, lsn: u64, error: impl Fn() -> StoreError) {
        let failed: Vec<Waiter> = {
            let mut queue = self.shared.queue.lock();
            let mut failed = Vec::new();
            while queue.waiters.front().is_some_and(|(l, _)| *l <= lsn) {
                if let Some((_, waiter)) = queue.waiters.pop_front() {
                    failed.push(waiter);
                }
            }
            failed
        };
        for waiter in failed {
            let _ = waiter.send(Err(error()));
        }
    }

    /// Drops everything queued and fails every waiter with `error`: the writer is stopping.
    fn drop_queued(&self, error: impl Fn() -> StoreError) {
        let mut queue = self.shared.queue.lock();
        queue.pending.clear();
        let waiters = std::mem::take(&mut queue.waiters);
        drop(queue);
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(error()));
        }
    }

    fn resolve(&self, last: u64) {
        let ready: Vec<Waiter> = {
            let mut queue = self.shared.queue.lock();
            queue.durable_lsn = last;
            let mut ready = Vec::new();
            while queue.waiters.front().is_some_and(|(l, _)| *l <= last) {
                if let Some((_, waiter)) = queue.waiters.pop_front() {
                    ready.push(waiter);
                }
            }
            ready
        };
        self.shared.durable_changed.notify_all();
        self.shared.metrics.group_size.observe(ready.len() as f64);
        for waiter in ready {
            let _ = waiter.send(Ok(()));
        }
    }

    /// Writes whole frames from `buffer`, rolling to a new segment when one does not fit.
    fn write_group(&mut self, buffer: &[u8]) -> Result<(), WriteError> {
        let mut done = 0;
        while done < buffer.len() {
            let Some(segment) = self.segment.as_mut() else {
                self.roll_over(frame_lsn(&buffer[done..]), frame_size(&buffer[done..]), done)?;
                continue;
            };
            // As many whole frames as fit in the segment.
            let mut fit = 0;
            while done + fit < buffer.len() {
                let size = frame_size(&buffer[done + fit..]);
                if (fit + size) as u64 > segment.room() {
                    break;
                }
                fit += size;
            }
            if fit == 0 {
                self.roll_over(frame_lsn(&buffer[done..]), frame_size(&buffer[done..]), done)?;
                continue;
            }
            segment.file.write_all_at(&buffer[done..done + fit], segment.write_at).map_err(|error| {
                if is_disk_full(&error) {
                    WriteError::Full { written: done, error }
                } else {
                    WriteError::Failed { path: segment.path.clone(), error }
                }
            })?;
            segment.write_at += fit as u64;
            done += fit;
        }
        Ok(())
    }

    /// Seals the current segment (durably) and opens the next, starting at `base_lsn`.
    fn roll_over(&mut self, base_lsn: u64, frame: usize, written: usize) -> Result<(), WriteError> {
        let shared = self.shared.clone();
        if let Some(current) = &self.segment {
            current.file.sync_data().map_err(|error| WriteError::Failed { path: current.path.clone(), error })?;
        }
        let needed = SEGMENT_HEADER + frame as u64;
        let mut segments = shared.segments.lock();
        let spare = match segments.spares.pop() {
            Some(path) => path,
            None => {
                let path = shared.dir.join(spare_name(segments.next_spare_id));
                segments.next_spare_id += 1;
                let bytes = shared.options.segment_bytes.max(needed);
                if let Err(error) = make_spare(shared.disk.as_ref(), &shared.dir, &path, bytes) {
                    // A half-made spare is harmless (no header); drop it to free the space.
                    let _ = shared.disk.remove(&path);
                    return Err(classify(error, written, &path));
                }
                path
            }
        };
        let seq = match (&self.segment, segments.sealed.last()) {
            (Some(current), _) => current.header.seq + 1,
            (None, Some((last, _))) => last.seq + 1,
            (None, None) => 1,
        };
        let header = SegmentHeader { seq, base_lsn };
        let mut opened = activate(shared.disk.as_ref(), &shared.dir, &spare, header)
            .map_err(|error| WriteError::Failed { path: spare.clone(), error })?;
        if opened.capacity < needed {
            // A recycled spare too small for this frame: extend it (zero-filled) to fit.
            let grow = needed - opened.capacity;
            let zeros = vec![0u8; grow as usize];
            opened
                .file
                .write_all_at(&zeros, opened.capacity)
                .and_then(|()| opened.file.sync_data())
                .map_err(|error| classify(error, written, &opened.path))?;
            opened.capacity = needed;
        }
        segments.current_base = Some(base_lsn);
        if let Some(previous) = self.segment.replace(opened) {
            segments.sealed.push((previous.header, previous.path));
        }
        self.shared.metrics.segments_opened.inc();
        Ok(())
    }

    fn sync(&self) -> Result<(), WriteError> {
        match &self.segment {
            Some(segment) => {
                segment.file.sync_data().map_err(|error| WriteError::Failed { path: segment.path.clone(), error })
            }
            None => Ok(()),
        }
    }
}

fn classify(error: std::io::Error, written: usize, path: &Path) -> WriteError {
    if is_disk_full(&error) {
        WriteError::Full { written, error }
    } else {
        WriteError::Failed { path: path.to_path_buf(), error }
    }
}

/// The size of the queued frame that `bytes` starts with (the queue holds whole frames only).
fn frame_size(bytes: &[u8]) -> usize {
    frame::FRAME_HEADER + crate::le::u32_at(bytes, 0) as usize
}

fn frame_lsn(bytes: &[u8]) -> u64 {
    crate::le::u64_at(bytes, 8)
}
