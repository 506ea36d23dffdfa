use std::path::PathBuf;

/// Why a store call failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store at {path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("store I/O: {0}")]
    Sled(#[from] sled::Error),
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Not durable now; the write may still land when space returns (see `Health::DiskFull`).
    #[error("store disk is full; writes resume when space is freed")]
    DiskFull,
    #[error("store is poisoned after a failed write or fsync ({reason}); restart to recover")]
    Poisoned { reason: String },
    #[error("store is shutting down")]
    Closed,
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("write-ahead log {segment} is corrupt at byte {offset}: {reason}; refusing to start (restore the data dir from a backup)")]
    LogCorrupt { segment: PathBuf, offset: u64, reason: String },
    #[error("the sealing key does not match this data dir ({path}): {reason}; refusing to start, nothing was changed (give the key file this dir was sealed with)")]
    WrongSealingKey { path: PathBuf, reason: String },
    #[error("record {what} does not encode: {reason}")]
    Encode { what: String, reason: String },
}

impl StoreError {
    /// Whether the same call can succeed later in this process.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::DiskFull)
    }
}
