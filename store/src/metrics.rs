//! Metric primitives: lock-free counters, gauges and fixed-bucket histograms, with Prometheus
//! text exposition.
//!
//! Label values are fixed enumerations chosen by the code, never request data, so no secret, token
//! or email can reach the metrics endpoint.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds; `observe` is a few atomic adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units, so it stays an integer atomic.
    sum_micros: AtomicU64,
}

pub const LATENCY_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
pub const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum());
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

pub fn render_counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

pub fn render_gauge(out: &mut String, name: &str, help: &str, value: i64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// Renders one labelled family; `rows` are (label value, value) with a single label `label`.
pub fn render_labelled(out: &mut String, name: &str, kind: &str, help: &str, label: &str, rows: &[(String, i64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value_label, value) in rows {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {value}", escape_label(value_label));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[derive(Debug)]
pub struct StoreMetrics {
    /// Duration of one group write plus its fdatasync.
    pub commit_seconds: Histogram,
    /// What one caller of `durable` waits: queueing behind a flush in progress plus its own.
    pub commit_wait_seconds: Histogram,
    pub group_size: Histogram,
    pub flushes: Counter,
    pub batches_applied: Counter,
    pub log_bytes: Counter,
    /// Group writes refused by a full disk.
    pub disk_full_stalls: Counter,
    pub segments_opened: Counter,
    pub checkpoints: Counter,
    pub checkpoint_seconds: Histogram,
    pub recovery_seconds: Histogram,
    /// 0 ok, 1 disk full, 2 poisoned.
    pub health: Gauge,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            commit_seconds: Histogram::new(LATENCY_BOUNDS),
            commit_wait_seconds: Histogram::new(LATENCY_BOUNDS),
            group_size: Histogram::new(SIZE_BOUNDS),
            flushes: Counter::default(),
            batches_applied: Counter::default(),
            log_bytes: Counter::default(),
            disk_full_stalls: Counter::default(),
            segments_opened: Counter::default(),
            checkpoints: Counter::default(),
            checkpoint_seconds: Histogram::new(LATENCY_BOUNDS),
            recovery_seconds: Histogram::new(LATENCY_BOUNDS),
            health: Gauge::default(),
        }
    }
}

impl StoreMetrics {
    pub fn render(&self, out: &mut String) {
        self.commit_seconds.render(
            out,
            "edgecard_store_commit_seconds",
            "Duration of one group write to the log plus its fdatasync.",
        );
        self.commit_wait_seconds.render(
            out,
            "edgecard_store_commit_wait_seconds",
            "Time a caller waits until its batch is durable (queueing for the flusher included).",
        );
        self.group_size.render(out, "edgecard_store_commit_group_size", "Commits served by one durable flush.");
        render_counter(
            out,
            "edgecard_store_flushes_total",
            "Log fdatasyncs (one per commit group).",
            self.flushes.get(),
        );
        render_counter(
            out,
            "edgecard_store_batches_total",
            "Atomic write batches applied.",
            self.batches_applied.get(),
        );
        render_counter(out, "edgecard_store_log_bytes_total", "Bytes written to the log.", self.log_bytes.get());
        render_counter(
            out,
            "edgecard_store_disk_full_stalls_total",
            "Log writes refused by a full disk (retried until space returns).",
            self.disk_full_stalls.get(),
        );
        render_counter(
            out,
            "edgecard_store_log_segments_opened_total",
            "Log segments started.",
            self.segments_opened.get(),
        );
        render_counter(out, "edgecard_store_checkpoints_total", "Checkpoints into sled.", self.checkpoints.get());
        self.checkpoint_seconds.render(out, "edgecard_store_checkpoint_seconds", "Duration of one checkpoint.");
        self.recovery_seconds.render(
            out,
            "edgecard_store_recovery_seconds",
            "Duration of opening the store (log replay included).",
        );
        render_gauge(
            out,
            "edgecard_store_health",
            "Store health: 0 ok, 1 disk full (writes refused until space returns), 2 poisoned (restart needed).",
            self.health.get(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        render_labelled(&mut out, "m", "gauge", "h", "sku", &[("a\"b".into(), 3)]);
        assert!(out.contains("m{sku=\"a\\\"b\"} 3"), "{out}");
    }
}
