//! The coordinator's metrics registry: the sync endpoint, the store, and what the ledger and the
//! inventory hold, read at scrape time (per node: ledger high-water mark, last contact, fence,
//! pending control; per sku: keys by state; per live slice: lease deadline; alarms by kind).
//!
//! Label values are ids chosen by the code or the operator (node, region, sku, slice) and fixed
//! enumerations (key state, alarm kind); never request data, keys or tokens.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgecard_net::metrics::{encode_counter_rows, encode_gauge_rows, FnCollector};
use edgecard_store::StoreError;
use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::{Registry, Unit};

use crate::quic::QuicMetrics;
use crate::records::SliceState;
use crate::service::Coordinator;

/// Alarm kinds the ledger raises; each is exported (at 0 until raised) so that `increase()` sees
/// the first one. A kind not listed here is counted as `other`.
pub const ALARM_KINDS: [&str; 6] = [
    "key_not_granted",
    "key_delivered_twice",
    "sequence_gap",
    "node_rolled_back",
    "node_replaced",
    "foreign_incarnation",
];

/// Key states of `edgecard_inventory_keys`.
const KEY_STATES: [&str; 5] = ["pool", "granted", "sold", "quarantined", "written_off"];

/// Shortest time between two scans of every key record for the inventory gauges.
const INVENTORY_MIN_REFRESH: Duration = Duration::from_secs(10);
/// A scan may take at most this share of the time: with 10 million keys a scan takes seconds,
/// so its result is reused for 20 times as long.
const INVENTORY_SCAN_SHARE: u32 = 20;

/// The coordinator's one registry.
pub fn coordinator_registry(coordinator: Arc<Coordinator>, quic: &QuicMetrics) -> Registry {
    let mut registry = Registry::default();
    edgecard_net::metrics::register_build_info(&mut registry, "coordinator", env!("CARGO_PKG_VERSION"));
    registry.register_collector(Box::new(edgecard_net::process_metrics::ProcessCollector));
    quic.register(&mut registry);
    coordinator.store().metrics().register(&mut registry);
    let inventory = Arc::new(InventoryCache::default());
    registry.register_collector(Box::new(FnCollector(move |encoder: &mut DescriptorEncoder| {
        encode_ledger(encoder, &coordinator, &inventory).map_err(|e| {
            tracing::error!(error = %e, "reading the ledger for metrics failed");
            fmt::Error
        })
    })));
    registry
}

/// Key counts per sku by state, from the last scan of the key records.
#[derive(Debug, Clone)]
struct InventorySnapshot {
    taken_at: SystemTime,
    /// granted, sold, quarantined, written off.
    per_sku: BTreeMap<String, [u64; 4]>,
}

#[derive(Debug, Default)]
struct InventoryCache {
    last: Mutex<Option<(Instant, Duration, InventorySnapshot)>>,
}

impl InventoryCache {
    /// The cached snapshot while it is fresh enough, else a new scan.
    fn get(&self, coordinator: &Coordinator) -> Result<InventorySnapshot, StoreError> {
        let mut last = self.last.lock();
        if let Some((at, took, snapshot)) = last.as_ref() {
            if at.elapsed() < INVENTORY_MIN_REFRESH.max(*took * INVENTORY_SCAN_SHARE) {
                return Ok(snapshot.clone());
            }
        }
        let started = Instant::now();
        let mut per_sku: BTreeMap<String, [u64; 4]> = BTreeMap::new();
        for summary in coordinator.slice_summaries()? {
            let counts = per_sku.entry(summary.slice.sku.to_string()).or_default();
            for (slot, n) in
                [summary.unsold, summary.sold, summary.quarantined, summary.written_off].into_iter().enumerate()
            {
                counts[slot] += n;
            }
        }
        let snapshot = InventorySnapshot { taken_at: SystemTime::now(), per_sku };
        *last = Some((Instant::now(), started.elapsed(), snapshot.clone()));
        Ok(snapshot)
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Debug, thiserror::Error)]
enum LedgerMetricsError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("encoding: {0}")]
    Fmt(#[from] fmt::Error),
}

fn encode_ledger(
    encoder: &mut DescriptorEncoder,
    c: &Coordinator,
    inventory: &InventoryCache,
) -> Result<(), LedgerMetricsError> {
    type Row = (Vec<(&'static str, String)>, f64);
    let nodes: Vec<_> = c.nodes()?.into_iter().filter(|n| !n.revoked).collect();
    let mut high_water: Vec<Row> = Vec::new();
    let mut contact: Vec<Row> = Vec::new();
    let mut fenced: Vec<Row> = Vec::new();
    let mut pending: Vec<Row> = Vec::new();
    for n in &nodes {
        let labels = vec![("node", n.node_id.to_string()), ("region", n.region.clone())];
        high_water.push((labels.clone(), n.events_high_water as f64));
        if let Some(at) = n.last_contact {
            contact.push((labels.clone(), at.0 as f64 / 1000.0));
        }
        fenced.push((labels.clone(), f64::from(u8::from(c.lineage(&n.node_id)?.fence.is_some()))));
        let queued = n.next_control_seq.saturating_sub(1).saturating_sub(n.control_applied);
        pending.push((labels, queued as f64));
    }
    encode_gauge_rows(
        encoder,
        "edgecard_ledger_high_water_seq",
        "Highest event seq in the ledger, per node",
        None,
        &high_water,
    )?;
    encode_gauge_rows(
        encoder,
        "edgecard_node_last_contact_timestamp",
        "Unix time of each node's last upload",
        Some(&Unit::Seconds),
        &contact,
    )?;
    encode_gauge_rows(
        encoder,
        "edgecard_node_rolled_back",
        "1 while a node's data dir is fenced: restored from an older copy (catching up) or diverged from the ledger",
        None,
        &fenced,
    )?;
    encode_gauge_rows(
        encoder,
        "edgecard_node_pending_control",
        "Control messages (grants, renewals, shrinks) queued for a node and not yet applied",
        None,
        &pending,
    )?;

    let mut alarms: BTreeMap<&'static str, u64> = ALARM_KINDS.iter().map(|kind| (*kind, 0)).collect();
    for alarm in c.alarms()? {
        let kind = ALARM_KINDS.iter().find(|k| **k == alarm.kind).copied().unwrap_or("other");
        *alarms.entry(kind).or_default() += 1;
    }
    let alarms: Vec<_> = alarms.into_iter().map(|(kind, n)| (vec![("kind", kind)], n)).collect();
    encode_counter_rows(encoder, "edgecard_ledger_alarms", "Ledger alarms raised, by kind", &alarms)?;

    let snapshot = inventory.get(c)?;
    let mut keys: Vec<(Vec<(&'static str, String)>, f64)> = Vec::new();
    for product in c.products()? {
        let sku = product.sku.to_string();
        let [granted, sold, quarantined, written_off] = snapshot.per_sku.get(&sku).copied().unwrap_or_default();
        let counts = [c.pool_size(&product.sku), granted, sold, quarantined, written_off];
        for (state, n) in KEY_STATES.into_iter().zip(counts) {
            keys.push((vec![("sku", sku.clone()), ("state", state.to_string())], n as f64));
        }
    }
    encode_gauge_rows(
        encoder,
        "edgecard_inventory_keys",
        "Keys per sku by state: pool, granted (at a node, unsold), sold, quarantined, written_off \
         (all but pool from a scan at most a few seconds old, see edgecard_inventory_scan_timestamp_seconds)",
        None,
        &keys,
    )?;
    let no_labels: [(&str, &str); 0] = [];
    encode_gauge_rows(
        encoder,
        "edgecard_inventory_scan_timestamp",
        "Unix time of the key scan behind edgecard_inventory_keys",
        Some(&Unit::Seconds),
        &[(no_labels, unix_seconds(snapshot.taken_at))],
    )?;

    let leases: Vec<Row> = c
        .slices()?
        .into_iter()
        .filter(|s| matches!(s.state, SliceState::Active | SliceState::Closing { .. }))
        .map(|s| {
            let labels =
                vec![("slice", s.slice_id.0.to_string()), ("node", s.node.to_string()), ("sku", s.sku.to_string())];
            (labels, s.lease_deadline.0 as f64 / 1000.0)
        })
        .collect();
    encode_gauge_rows(
        encoder,
        "edgecard_slice_lease_deadline_timestamp",
        "Lease deadline of each active or closing slice, unix time",
        Some(&Unit::Seconds),
        &leases,
    )?;
    Ok(())
}
