//! Latency recording: one HDR histogram per step, in microseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency kept exactly: ten minutes (anything slower is clamped to it).
const MAX_MICROS: u64 = 600_000_000;

/// The latencies of one step (create, pay, a whole purchase, …), in microseconds with three
/// significant digits, so percentiles stay exact to 0.1% whatever the sample count.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, 3 digits).
        Latency(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid"))
    }
}

impl Latency {
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_MICROS);
        self.0.saturating_record(micros);
    }

    /// Adds `other`'s samples (both have the same bounds, so this cannot fail; if it ever did,
    /// the samples would be missing from the report rather than crash the run).
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Summary of this step for the report.
    pub fn summary(&self, step: &str) -> StepReport {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let empty = self.0.is_empty();
        StepReport {
            step: step.to_string(),
            count: self.0.len(),
            avg_ms: if empty { 0.0 } else { self.0.mean() / 1000.0 },
            p50_ms: if empty { 0.0 } else { ms(self.0.value_at_quantile(0.50)) },
            p95_ms: if empty { 0.0 } else { ms(self.0.value_at_quantile(0.95)) },
            p99_ms: if empty { 0.0 } else { ms(self.0.value_at_quantile(0.99)) },
            max_ms: if empty { 0.0 } else { ms(self.0.max()) },
        }
    }
}

/// Latency figures of one step, in milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepReport {
    pub step: String,
    pub count: u64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_mean_of_a_known_distribution() {
        let mut latency = Latency::default();
        for ms in 1..=100u64 {
            latency.record(Duration::from_millis(ms));
        }
        let s = latency.summary("x");
        assert_eq!(s.count, 100);
        // Three significant digits: within 0.1%.
        assert!((s.p50_ms - 50.0).abs() < 0.06, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");
        assert!((s.avg_ms - 50.5).abs() < 0.06, "{s:?}");
    }

    #[test]
    fn merging_adds_samples_and_empty_is_all_zero() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(3));
        b.record(Duration::from_secs(3600)); // clamped, not lost
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!(a.summary("x").max_ms >= 599_000.0);
        let empty = Latency::default().summary("e");
        assert_eq!((empty.count, empty.avg_ms, empty.p99_ms, empty.max_ms), (0, 0.0, 0.0, 0.0));
    }
}
