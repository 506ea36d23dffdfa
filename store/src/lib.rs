//! The one durability layer of the node and the coordinator, and the metric primitives they
//! report with.
//!
//! A write-ahead log with group commit is the durability point; sled holds the materialized
//! state, written by checkpoints; file I/O of the log goes through [`Disk`], so that tests can
//! put it on a [`FaultyDisk`] that loses unsynced writes, fails fsyncs, fills up and tears writes.
//! The rules are in `ARCHITECTURE.md` ("Store").

mod batch;
mod checkpoint;
pub mod disk;
pub mod disk_scan;
mod error;
pub mod faulty_disk;
mod health;
mod le;
mod log;
mod memtable;
pub mod metrics;
pub mod private;
pub mod record;
mod reseal;
pub mod seal;
mod store;
pub mod workload;

pub use batch::{Op, WriteBatch};
pub use disk::{Disk, DiskFile, OsDisk};
pub use error::StoreError;
pub use faulty_disk::FaultyDisk;
pub use health::Health;
pub use log::LogOptions;
pub use metrics::StoreMetrics;
pub use record::{Storable, Table};
pub use seal::{KeyRing, RotateError, Rotation, SealError, Sealer};
pub use store::{Store, StoreOptions};
