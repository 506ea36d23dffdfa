//! sled behind a narrow interface, with durable group commit.
//!
//! sled 0.34's `flush` ends in `sync_file_range`, which does not flush the disk's write cache, so a
//! durable commit here is sled's flush followed by an fsync of its data file. Concurrent callers
//! share one flush: a writer applies its batch (atomic, in memory), then waits for the next flush
//! that starts after its apply. One flusher thread runs flushes back to back while anyone waits, so
//! throughput is bounded by batch size × fsync rate, not by the fsync rate alone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::metrics::StoreMetrics;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store I/O: {0}")]
    Sled(#[from] sled::Error),
    #[error("store fsync of {path}: {source}")]
    Fsync { path: PathBuf, source: std::io::Error },
    #[error("store is shutting down")]
    Closed,
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// An atomic group of writes: all land or none do.
#[derive(Default, Debug)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

struct FlushQueue {
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    closed: bool,
}

struct Shared {
    queue: Mutex<FlushQueue>,
    wake: Condvar,
}

/// The node's (and coordinator's) durable key-value store.
pub struct Store {
    db: sled::Db,
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<StoreMetrics>,
}

impl Store {
    /// Opens (or creates) the store under `dir`. `cache_capacity` is sled's page cache in bytes.
    pub fn open(dir: &Path, cache_capacity: u64, metrics: Arc<StoreMetrics>) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // The group-commit flusher below flushes whenever anyone waits; sled's own
            // periodic flusher would only add a second writer.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open { path: dir.to_path_buf(), source })?;
        let data_path = dir.join("db");
        let data_file =
            File::open(&data_path).map_err(|source| StoreError::Fsync { path: data_path.clone(), source })?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(FlushQueue { waiters: Vec::new(), closed: false }),
            wake: Condvar::new(),
        });
        let flusher = {
            let db = db.clone();
            let shared = shared.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("store-flusher".into())
                .spawn(move || flusher_loop(db, data_file, data_path, shared, metrics))
                .map_err(|source| StoreError::Fsync { path: dir.to_path_buf(), source })?
        };
        Ok(Store { db, shared, flusher: Mutex::new(Some(flusher)), metrics })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.db.get(key)?)
    }

    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + '_ {
        self.db.scan_prefix(prefix).map(|item| item.map_err(StoreError::from))
    }

    /// The last entry under `prefix`, in key order.
    pub fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<(sled::IVec, sled::IVec)>, StoreError> {
        match self.db.scan_prefix(prefix).next_back() {
            Some(item) => Ok(Some(item?)),
            None => Ok(None),
        }
    }

    /// Applies `batch` atomically. It is visible at once but durable only after [`Store::durable`].
    /// Callers that need an order between batches apply them under their own lock.
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.ops {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        self.db.apply_batch(sled_batch)?;
        self.metrics.batches_applied.inc();
        Ok(())
    }

    /// Resolves once every batch applied before this call is on disk (flush + fsync).
    pub fn durable(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let registered = {
            let mut queue = self.shared.queue.lock();
            if queue.closed {
                false
            } else {
                queue.waiters.push(tx);
                true
            }
        };
        if registered {
            self.shared.wake.notify_one();
        }
        let metrics = self.metrics.clone();
        let asked = Instant::now();
        async move {
            if !registered {
                return Err(StoreError::Closed);
            }
            let outcome = rx.await;
            metrics.commit_wait_seconds.observe(asked.elapsed().as_secs_f64());
            match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => {
                    Err(StoreError::Fsync { path: PathBuf::from("db"), source: std::io::Error::other(reason) })
                }
                Err(_) => Err(StoreError::Closed),
            }
        }
    }

    /// Applies and waits until durable.
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.durable().await
    }

    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.metrics
    }

    /// Stops the flusher after it has served every waiter.
    pub fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.flusher.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn flusher_loop(db: sled::Db, data_file: File, data_path: PathBuf, shared: Arc<Shared>, metrics: Arc<StoreMetrics>) {
    loop {
        let waiters = {
            let mut queue = shared.queue.lock();
            while queue.waiters.is_empty() && !queue.closed {
                shared.wake.wait(&mut queue);
            }
            if queue.waiters.is_empty() && queue.closed {
                return;
            }
            std::mem::take(&mut queue.waiters)
        };
        let started = Instant::now();
        let outcome = db
            .flush()
            .map_err(|e| format!("sled flush: {e}"))
            .and_then(|_| data_file.sync_data().map_err(|e| format!("fsync {}: {e}", data_path.display())));
        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        metrics.group_size.observe(waiters.len() as f64);
        metrics.flushes.inc();
        if let Err(reason) = &outcome {
            tracing::error!(%reason, "durable commit failed");
        }
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap()
    }

    #[tokio::test]
    async fn committed_batches_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let mut batch = WriteBatch::default();
            batch.put(b"a/1".to_vec(), b"one".to_vec());
            batch.put(b"a/2".to_vec(), b"two".to_vec());
            store.commit(batch).await.unwrap();
            let mut batch = WriteBatch::default();
            batch.delete(b"a/1".to_vec());
            store.commit(batch).await.unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.get(b"a/1").unwrap(), None);
        assert_eq!(store.get(b"a/2").unwrap().as_deref(), Some(&b"two"[..]));
        let keys: Vec<_> = store.scan_prefix(b"a/").map(|kv| kv.unwrap().0.to_vec()).collect();
        assert_eq!(keys, vec![b"a/2".to_vec()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..400u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut batch = WriteBatch::default();
                batch.put(format!("k/{i:05}").into_bytes(), i.to_be_bytes().to_vec());
                store.commit(batch).await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let flushes = store.metrics().flushes.get();
        assert!(flushes >= 1);
        assert!(flushes < 400, "400 concurrent commits took {flushes} flushes: no grouping");
        assert_eq!(store.scan_prefix(b"k/").count(), 400);
    }

    #[tokio::test]
    async fn durable_after_close_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.close();
        assert!(matches!(store.durable().await, Err(StoreError::Closed)));
    }
}
