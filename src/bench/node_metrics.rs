//! What the bench reads from a node's admin listener (`GET /metrics`, Prometheus text): the
//! store's durable-commit figures over the run, and the sync link's progress while it runs.

use std::collections::HashMap;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::https_client::{Endpoint, Request};

/// Labels every series of a node carries (they name the target, not the series).
const TARGET_LABELS: [&str; 2] = ["node", "region"];

/// Every sample line of Prometheus text by its name and labels, without the node's own `node`
/// and `region` labels: `edgecard_store_commit_seconds_bucket{le="0.001"}`, or the bare name of
/// a series that has no other label. Lines that are not samples are skipped.
pub fn parse_samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((without_target_labels(series)?, value.parse().ok()?))
        })
        .collect()
}

/// `series` (`name{a="x",b="y"}`) with the [`TARGET_LABELS`] removed; `None` when malformed.
fn without_target_labels(series: &str) -> Option<String> {
    let Some((name, rest)) = series.split_once('{') else { return Some(series.to_string()) };
    let body = rest.strip_suffix('}')?;
    let mut kept = Vec::new();
    let mut remaining = body;
    while !remaining.is_empty() {
        let (label, after) = remaining.split_once("=\"")?;
        // The value runs to the first quote that is not escaped.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        if !TARGET_LABELS.contains(&label) {
            kept.push(format!("{label}=\"{}\"", &after[..end]));
        }
        remaining = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
    }
    Some(if kept.is_empty() { name.to_string() } else { format!("{name}{{{}}}", kept.join(",")) })
}

/// One scrape: every sample line, by its name with labels (`name{le="0.001"}`), the node's own
/// `node` and `region` labels left out.
#[derive(Clone, Debug, Default)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        Scrape(parse_samples(text))
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// Cumulative buckets of histogram `name`: (upper bound, count), ascending, without +Inf.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(key, value)| {
                let bound = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((bound.parse::<f64>().ok()?, *value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

pub async fn scrape(admin: &Endpoint) -> Result<Scrape> {
    let response = admin.request(Request::get("/metrics")).await?;
    if response.status != 200 {
        bail!("{}/metrics answered {}", admin.url(), response.status);
    }
    Ok(Scrape::parse(&response.text()))
}

/// A histogram's change between two scrapes.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistogramDelta {
    pub count: f64,
    pub avg_ms: f64,
    /// Upper bound of the bucket that holds the 99th percentile (Prometheus buckets are coarse:
    /// this is "at most"); `None` when it lies above the largest finite bucket.
    pub p99_at_most_ms: Option<f64>,
}

fn histogram_delta(before: &Scrape, after: &Scrape, name: &str) -> Option<HistogramDelta> {
    // A node restarted during the run starts its counters again from zero: the delta is then
    // what the new process counted (Prometheus's `increase` does the same).
    let reset = after.get(&format!("{name}_count"))? < before.get(&format!("{name}_count")).unwrap_or(0.0);
    let empty = Scrape::default();
    let before = if reset { &empty } else { before };
    let delta = |suffix: &str| -> Option<f64> {
        let key = format!("{name}_{suffix}");
        Some(after.get(&key)? - before.get(&key).unwrap_or(0.0))
    };
    let count = delta("count")?;
    let sum = delta("sum")?;
    let before_buckets: HashMap<u64, f64> =
        before.buckets(name).into_iter().map(|(bound, n)| (bound.to_bits(), n)).collect();
    let rank = 0.99 * count;
    let p99_at_most_ms = after
        .buckets(name)
        .into_iter()
        .find(|(bound, n)| n - before_buckets.get(&bound.to_bits()).copied().unwrap_or(0.0) >= rank)
        .map(|(bound, _)| bound * 1000.0);
    Some(HistogramDelta {
        count,
        avg_ms: if count > 0.0 { sum / count * 1000.0 } else { 0.0 },
        p99_at_most_ms: if count > 0.0 { p99_at_most_ms } else { None },
    })
}

/// The store's durable commits over the run, from one node's metrics.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoreReport {
    pub node: String,
    /// Durable flushes (sled flush + fsync) and their duration.
    pub flush: Option<HistogramDelta>,
    pub flushes_per_sec: f64,
    /// Commits served per flush, on average.
    pub avg_group_size: f64,
    /// What a caller waits for durability (queueing for the flusher included): the store commit
    /// latency a request sees.
    pub commit_wait: Option<HistogramDelta>,
}

impl StoreReport {
    pub fn between(node: &str, before: &Scrape, after: &Scrape, elapsed_secs: f64) -> StoreReport {
        let flush = histogram_delta(before, after, "edgecard_store_commit_seconds");
        let group = histogram_delta(before, after, "edgecard_store_commit_group_size");
        let flushes = flush.as_ref().map_or(0.0, |f| f.count);
        StoreReport {
            node: node.to_string(),
            flushes_per_sec: flushes / elapsed_secs.max(1e-9),
            // The group histogram's "avg_ms" is its mean × 1000: undo the unit.
            avg_group_size: group.map_or(0.0, |g| g.avg_ms / 1000.0),
            flush,
            commit_wait: histogram_delta(before, after, "edgecard_store_commit_wait_seconds"),
        }
    }

    /// The figure held against the store-latency threshold: the commit wait if the node reports
    /// it, else the flush duration.
    pub fn headline(&self) -> Option<&HistogramDelta> {
        self.commit_wait.as_ref().or(self.flush.as_ref())
    }
}

/// One sample of a node's sync link: when, highest outbox seq acknowledged by the coordinator,
/// and events still waiting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncSample {
    pub at_secs: f64,
    pub acked: f64,
    pub lag_events: f64,
}

impl SyncSample {
    pub fn from_scrape(at_secs: f64, scrape: &Scrape) -> Option<SyncSample> {
        Some(SyncSample {
            at_secs,
            acked: scrape.get("edgecard_sync_acked_seq")?,
            lag_events: scrape.get("edgecard_sync_lag_events")?,
        })
    }

    fn newest(&self) -> f64 {
        self.acked + self.lag_events
    }
}

/// The sync link over the run, from samples of one node's metrics.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SyncReport {
    pub node: String,
    pub samples: usize,
    /// Events acknowledged by the coordinator per second over the sampled span.
    pub acked_per_sec: f64,
    /// The highest rate between two consecutive samples.
    pub peak_acked_per_sec: f64,
    pub max_lag_events: f64,
    /// Lag in time, per sample: the age of the oldest event not yet acknowledged (how long ago
    /// the node's outbox first held it, at the sampling resolution), or, when that is below
    /// one sampling interval, the events waiting over the rate they are produced at.
    /// Nearest-rank p99 and max over the samples.
    pub p99_lag_secs: f64,
    pub max_lag_secs: f64,
}

impl SyncReport {
    pub fn from_samples(node: &str, samples: &[SyncSample]) -> Option<SyncReport> {
        let (first, last) = (samples.first()?, samples.last()?);
        let span = last.at_secs - first.at_secs;
        let mut lags: Vec<f64> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.lag_events <= 0.0 {
                    return 0.0;
                }
                // The oldest event still waiting is acked + 1; it existed from the first sample
                // whose newest seq had reached it.
                let age = samples
                    .iter()
                    .find(|earlier| earlier.newest() >= s.acked + 1.0)
                    .map_or(0.0, |earlier| (s.at_secs - earlier.at_secs).max(0.0));
                // Below the sampling interval, estimate from the production rate: events waiting
                // over events produced per second since the previous sample.
                let produced_per_sec = i
                    .checked_sub(1)
                    .map(|p| &samples[p])
                    .filter(|p| s.at_secs > p.at_secs)
                    .map_or(0.0, |p| (s.newest() - p.newest()) / (s.at_secs - p.at_secs));
                match (age > 0.0, produced_per_sec > 0.0) {
                    (true, _) => age,
                    (false, true) => s.lag_events / produced_per_sec,
                    (false, false) => 0.0,
                }
            })
            .collect();
        let peak_acked_per_sec = samples
            .windows(2)
            .filter(|w| w[1].at_secs > w[0].at_secs)
            .map(|w| (w[1].acked - w[0].acked) / (w[1].at_secs - w[0].at_secs))
            .fold(0.0, f64::max);
        lags.sort_by(f64::total_cmp);
        let rank = ((0.99 * lags.len() as f64).ceil() as usize).clamp(1, lags.len());
        Some(SyncReport {
            node: node.to_string(),
            samples: samples.len(),
            acked_per_sec: if span > 0.0 { (last.acked - first.acked) / span } else { 0.0 },
            peak_acked_per_sec,
            max_lag_events: samples.iter().map(|s| s.lag_events).fold(0.0, f64::max),
            p99_lag_secs: lags[rank - 1],
            max_lag_secs: lags.last().copied().unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_labels_are_left_out() {
        let text = "# HELP m x\n\
            edgecard_purchases_total{node=\"eu-1\",region=\"eu\"} 7\n\
            edgecard_stock_keys{node=\"eu-1\",region=\"eu\",sku=\"a\\\"b\"} 3\n\
            edgecard_http_request_duration_seconds_count{node=\"eu-1\",region=\"eu\",route=\"/api/v1/orders/{id}\",method=\"GET\",class=\"2xx\"} 2\n\
            plain 1\n\
            broken{node=\"x 1\n";
        let samples = parse_samples(text);
        assert_eq!(samples.get("edgecard_purchases_total"), Some(&7.0));
        assert_eq!(samples.get("edgecard_stock_keys{sku=\"a\\\"b\"}"), Some(&3.0));
        let route =
            "edgecard_http_request_duration_seconds_count{route=\"/api/v1/orders/{id}\",method=\"GET\",class=\"2xx\"}";
        assert_eq!(samples.get(route), Some(&2.0), "{samples:?}");
        assert_eq!(samples.get("plain"), Some(&1.0));
        assert_eq!(samples.len(), 4, "{samples:?}");
    }

    const BEFORE: &str = "# HELP x\n\
        edgecard_store_commit_seconds_bucket{le=\"0.001\"} 10\n\
        edgecard_store_commit_seconds_bucket{le=\"0.01\"} 10\n\
        edgecard_store_commit_seconds_bucket{le=\"+Inf\"} 10\n\
        edgecard_store_commit_seconds_sum 0.005\n\
        edgecard_store_commit_seconds_count 10\n\
        edgecard_store_commit_group_size_sum 20\n\
        edgecard_store_commit_group_size_count 10\n";

    const AFTER: &str = "edgecard_store_commit_seconds_bucket{le=\"0.001\"} 60\n\
        edgecard_store_commit_seconds_bucket{le=\"0.01\"} 110\n\
        edgecard_store_commit_seconds_bucket{le=\"+Inf\"} 110\n\
        edgecard_store_commit_seconds_sum 0.205\n\
        edgecard_store_commit_seconds_count 110\n\
        edgecard_store_commit_group_size_sum 420\n\
        edgecard_store_commit_group_size_count 110\n";

    #[test]
    fn store_figures_are_deltas_over_the_run() {
        let report = StoreReport::between("eu-1", &Scrape::parse(BEFORE), &Scrape::parse(AFTER), 2.0);
        let flush = report.flush.clone().unwrap_or_else(|| panic!("no flush figures: {report:?}"));
        assert_eq!(flush.count, 100.0);
        assert!((flush.avg_ms - 2.0).abs() < 1e-9, "{flush:?}");
        // 50 of 100 within 1 ms, all within 10 ms: the p99 bucket is 10 ms.
        assert_eq!(flush.p99_at_most_ms, Some(10.0));
        assert_eq!(report.flushes_per_sec, 50.0);
        assert!((report.avg_group_size - 4.0).abs() < 1e-9, "{report:?}");
        assert_eq!(report.commit_wait, None, "absent histogram");
        assert_eq!(report.headline(), report.flush.as_ref());
    }

    #[test]
    fn a_node_restarted_during_the_run_counts_from_zero() {
        // AFTER's counters are lower than these: the node restarted and counted 110 commits since.
        let before = BEFORE.replace(" 10\n", " 500\n").replace("0.005", "9.0").replace("sum 20", "sum 2000");
        let report = StoreReport::between("eu-1", &Scrape::parse(&before), &Scrape::parse(AFTER), 2.0);
        let flush = report.flush.clone().unwrap_or_else(|| panic!("no flush figures: {report:?}"));
        assert_eq!(flush.count, 110.0, "{flush:?}");
        assert!(flush.avg_ms > 0.0, "a negative average across a reset: {flush:?}");
        assert!(report.avg_group_size > 0.0, "{report:?}");
    }

    #[test]
    fn sync_lag_is_the_age_of_the_oldest_unacknowledged_event() {
        let s = |at_secs, acked, lag_events| SyncSample { at_secs, acked, lag_events };
        // Newest seq: 100 at 0 s, 200 at 1 s, 300 at 2 s and 3 s; the coordinator acknowledges 50
        // by 2 s and everything by 3 s.
        let samples = [s(0.0, 0.0, 100.0), s(1.0, 0.0, 200.0), s(2.0, 50.0, 250.0), s(3.0, 300.0, 0.0)];
        let report = SyncReport::from_samples("eu-1", &samples).unwrap_or_else(|| panic!("no report"));
        assert_eq!(report.acked_per_sec, 100.0);
        assert_eq!(report.peak_acked_per_sec, 250.0);
        assert_eq!(report.max_lag_events, 250.0);
        // At 1 s seq 1 (newest since 0 s) waits 1 s; at 2 s seq 51 (also there at 0 s) waits 2 s.
        assert_eq!(report.max_lag_secs, 2.0);
        assert_eq!(report.p99_lag_secs, 2.0);
        // Within one interval: 50 events waiting, 100 produced per second → 0.5 s.
        let quick = [s(0.0, 0.0, 0.0), s(1.0, 50.0, 50.0)];
        let report = SyncReport::from_samples("eu-1", &quick).unwrap_or_else(|| panic!("no report"));
        assert_eq!(report.max_lag_secs, 0.5);
        assert!(SyncReport::from_samples("x", &[]).is_none());
        let parsed = Scrape::parse("edgecard_sync_acked_seq 5\nedgecard_sync_lag_events 2\n");
        assert_eq!(SyncSample::from_scrape(1.0, &parsed), Some(s(1.0, 5.0, 2.0)));
    }
}
