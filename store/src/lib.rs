//! The durable store shared by the node and the coordinator, and the metric primitives it and
//! they report with. sled sits behind a narrow interface (`get`, `scan_prefix`, atomic `apply`,
//! `durable`) so the rest of the code never depends on sled's API.

mod durable;
pub mod metrics;

pub use durable::{Store, StoreError, WriteBatch};
pub use metrics::StoreMetrics;
