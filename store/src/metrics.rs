//! The store's metrics, on `prometheus-client`. Each store owns its [`StoreMetrics`]; the
//! process that opened it registers them in its registry (one per node, one per coordinator).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Bounds (seconds) of the store's latency histograms: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bounds of the commit group size histogram.
pub const GROUP_SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Duration of one group write plus its fdatasync; its count is the number of fdatasyncs.
    pub commit_seconds: Histogram,
    /// What one caller of `durable` waits: queueing behind a flush in progress plus its own.
    pub commit_wait_seconds: Histogram,
    pub group_size: Histogram,
    /// fdatasyncs and checkpoints, for benches and tests; exported as the `_count` of
    /// `commit_seconds` and `checkpoint_seconds`, so they are not registered themselves.
    pub flushes: Counter,
    pub checkpoints: Counter,
    pub batches_applied: Counter,
    pub log_bytes: Counter,
    /// Group writes refused by a full disk.
    pub disk_full_stalls: Counter,
    pub segments_opened: Counter,
    pub checkpoint_seconds: Histogram,
    pub recovery_seconds: Histogram,
    /// 0 ok, 1 disk full, 2 poisoned.
    pub health: Gauge,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            commit_wait_seconds: Histogram::new(LATENCY_BUCKETS),
            group_size: Histogram::new(GROUP_SIZE_BUCKETS),
            flushes: Counter::default(),
            checkpoints: Counter::default(),
            batches_applied: Counter::default(),
            log_bytes: Counter::default(),
            disk_full_stalls: Counter::default(),
            segments_opened: Counter::default(),
            checkpoint_seconds: Histogram::new(LATENCY_BUCKETS),
            recovery_seconds: Histogram::new(LATENCY_BUCKETS),
            health: Gauge::default(),
        }
    }
}

impl StoreMetrics {
    /// Registers every store metric (`edgecard_store_*`) in `registry`; the registry keeps
    /// handles to the same values.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register_with_unit(
            "edgecard_store_commit",
            "Duration of one group write to the log plus its fdatasync (the count is the number of fdatasyncs)",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        r.register_with_unit(
            "edgecard_store_commit_wait",
            "Time a caller waits until its batch is durable (queueing for the flusher included)",
            Unit::Seconds,
            self.commit_wait_seconds.clone(),
        );
        r.register("edgecard_store_commit_group_size", "Commits served by one durable flush", self.group_size.clone());
        r.register("edgecard_store_batches", "Atomic write batches applied", self.batches_applied.clone());
        r.register_with_unit(
            "edgecard_store_log_written",
            "Bytes written to the log",
            Unit::Bytes,
            self.log_bytes.clone(),
        );
        r.register(
            "edgecard_store_disk_full_stalls",
            "Log writes refused by a full disk (retried until space returns)",
            self.disk_full_stalls.clone(),
        );
        r.register("edgecard_store_log_segments_opened", "Log segments started", self.segments_opened.clone());
        r.register_with_unit(
            "edgecard_store_checkpoint",
            "Duration of one checkpoint into sled (the count is the number of checkpoints)",
            Unit::Seconds,
            self.checkpoint_seconds.clone(),
        );
        r.register_with_unit(
            "edgecard_store_recovery",
            "Duration of opening the store (log replay included)",
            Unit::Seconds,
            self.recovery_seconds.clone(),
        );
        r.register(
            "edgecard_store_health",
            "Store health: 0 ok, 1 disk full (writes refused until space returns), 2 poisoned (restart needed)",
            self.health.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &StoreMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encodes");
        out
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = StoreMetrics::default();
        metrics.commit_seconds.observe(0.002);
        metrics.log_bytes.inc_by(4096);
        metrics.health.set(1);
        let out = text(&metrics);
        assert!(out.contains("edgecard_store_commit_seconds_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("edgecard_store_commit_seconds_count 1\n"), "{out}");
        assert!(out.contains("edgecard_store_log_written_bytes_total 4096\n"), "{out}");
        assert!(out.contains("edgecard_store_health 1\n"), "{out}");
        assert!(out.contains("# TYPE edgecard_store_checkpoint_seconds histogram\n"), "{out}");
    }
}
