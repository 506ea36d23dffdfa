//! The coordinator's state machine over the durable store: products, key import, nodes, slice
//! allocation, and the ledger that ingests every node's order events exactly once.
//!
//! Like the node's engine, each change is decided under one lock, applied as one atomic batch
//! under it, and awaited for durability after it is released; nothing is acknowledged (to the CLI
//! or to a node) before it is durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use edgecard_protocol::{
    lease, CatalogProduct, ControlBody, ControlMessage, Epoch, GrantedKey, KeyId, LeaseRenewal, NodeId, OrderEvent,
    OrderEventKind, Sku, SliceGrant, SliceId, SyncAck, SyncUpload, UnixMillis,
};
use edgecard_store::{Store, StoreError, WriteBatch};
use parking_lot::Mutex;
use serde::Serialize;

use crate::import::{parse_keys, InvalidRow, KeyFormat};
use crate::records::{self as rec, *};
use crate::slices::{Release, ReleaseOverlay, ShrinkOrder};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown sku {0}")]
    UnknownSku(String),
    #[error("product {0} already exists")]
    ProductExists(String),
    #[error("invalid product: {0}")]
    InvalidProduct(String),
    #[error("unknown node {0}")]
    UnknownNode(String),
    #[error("node {0} already exists")]
    NodeExists(String),
    #[error("node {0} is revoked")]
    NodeRevoked(String),
    #[error("only {available} keys of {sku} are in the pool; asked for {requested}")]
    NotEnoughKeys { sku: String, available: u64, requested: u64 },
    #[error("count must be at least 1")]
    ZeroCount,
    #[error("unknown slice {0}")]
    UnknownSlice(String),
    #[error("slice {0} was not reclaimed; only quarantined keys of a reclaimed slice can be written off")]
    NotReclaimed(String),
    #[error("{0}")]
    Plan(#[from] edgecard_protocol::rebalance::PlanError),
    #[error("unknown order {0}")]
    UnknownOrder(String),
    #[error("order {order} is {status}: only a paid order can be refunded")]
    NotRefundable { order: String, status: &'static str },
    #[error("invalid refund reason: at most 200 bytes, no control characters")]
    BadRefundReason,
    #[error("the staged layout is version {staged}, not {given}; run `edgecard slices show` and apply that version")]
    StaleLayout { staged: u64, given: u64 },
    #[error("nothing is staged")]
    NothingStaged,
    #[error("import refused: {0}")]
    ImportRefused(String),
    #[error("signing the grant failed: {0}")]
    Grant(#[from] edgecard_protocol::GrantError),
    #[error("node {node} synced from data dir {incarnation:#x}, which is not the one the ledger follows and has history of its own; see `edgecard status`")]
    ForeignIncarnation { node: String, incarnation: u64 },
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

impl CoordinatorError {
    /// Whether the caller may retry the same request later (a storage failure), as opposed to
    /// a request that will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CoordinatorError::Store(_))
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImportReport {
    pub sku: String,
    pub batch: Option<u64>,
    pub imported: u64,
    pub first_key_id: Option<u64>,
    pub last_key_id: Option<u64>,
    pub duplicates_in_file: Vec<usize>,
    /// Lines whose key the coordinator already holds (under any sku).
    pub duplicates_known: Vec<usize>,
    pub invalid: Vec<InvalidRowReport>,
    pub blank_lines: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvalidRowReport {
    pub line: usize,
    pub reason: String,
}

impl From<&InvalidRow> for InvalidRowReport {
    fn from(row: &InvalidRow) -> Self {
        InvalidRowReport { line: row.line, reason: row.reason.clone() }
    }
}

#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    pub since: Option<UnixMillis>,
    pub sku: Option<Sku>,
    pub node: Option<NodeId>,
    pub status: Option<LedgerStatus>,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Lease length of new grants and renewals.
    pub lease: Duration,
    /// Largest difference between a node's wall clock and the coordinator's that the reclaim
    /// rule tolerates: a dark node's slice is reclaimed only after its deadline plus this.
    pub max_clock_skew: Duration,
    /// Most takes a node may have from one slice that the coordinator has not acknowledged.
    pub take_window: u64,
    /// Largest grant, by its keys' size: a larger allocation becomes several slices, so every
    /// signed grant fits the sync envelope (`protocol::MAX_PAYLOAD`, 16 MiB) with room to spare.
    pub max_grant_bytes: usize,
    /// Largest sync ack, by its control messages' size: the rest waits for the next sync, so an
    /// ack always fits the envelope however much is queued for a node that was away.
    pub max_ack_bytes: usize,
    /// Keys granted to a move's recipient per store batch (see `complete_regrants`): a move of a
    /// million keys is not one log frame.
    pub regrant_keys_per_batch: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lease: Duration::from_secs(24 * 3600),
            max_clock_skew: Duration::from_secs(300),
            take_window: 10_000,
            max_grant_bytes: 12 << 20,
            max_ack_bytes: 12 << 20,
            regrant_keys_per_batch: edgecard_protocol::MAX_GRANT_KEYS / 10,
        }
    }
}

/// What one key adds to a signed grant beyond its secret: the key id, the archived string's
/// header and alignment, rounded up.
const GRANT_BYTES_PER_KEY: usize = 32;

/// Cuts `records` into runs whose grants stay under `budget` bytes (and `MAX_GRANT_KEYS` keys).
fn grant_chunks(records: &[(KeyId, KeyRecord)], budget: usize) -> Vec<&[(KeyId, KeyRecord)]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, record)) in records.iter().enumerate() {
        let size = GRANT_BYTES_PER_KEY + record.secret.expose().len();
        if i > start && (bytes + size > budget || i - start >= edgecard_protocol::MAX_GRANT_KEYS) {
            chunks.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

pub fn now_millis() -> UnixMillis {
    UnixMillis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

pub(crate) const CONTROL_GRANT: u8 = 1;
pub(crate) const CONTROL_CATALOG: u8 = 2;
pub(crate) const CONTROL_RENEW: u8 = 3;
pub(crate) const CONTROL_SHRINK: u8 = 4;
pub(crate) const CONTROL_REFUND: u8 = 5;
pub(crate) const CONTROL_FIND_ORDERS: u8 = 6;

pub struct Coordinator {
    pub(crate) store: Arc<Store>,
    pub(crate) signing_key: SigningKey,
    pub(crate) settings: Settings,
    pub(crate) lock: Mutex<()>,
    /// "Find my order" lookups per address (`find_orders.rs`).
    pub(crate) lookups: crate::find_orders::LookupLimiter,
}

impl Coordinator {
    pub fn new(store: Arc<Store>, signing_key: SigningKey, settings: Settings) -> Self {
        Coordinator {
            store,
            signing_key,
            settings,
            lock: Mutex::new(()),
            lookups: crate::find_orders::lookup_limiter(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn next_counter(&self, batch: &mut WriteBatch, name: &str, take: u64) -> Result<u64, StoreError> {
        let key = rec::counter_key(name);
        let next = self.store.get(&key)?.and_then(|raw| rec::trailing_u64(&raw)).unwrap_or(1);
        batch.put(key, (next + take).to_be_bytes().to_vec());
        Ok(next)
    }

    pub(crate) fn load<T: edgecard_store::Storable>(&self, what: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.store.get(key)? {
            Some(raw) => Ok(Some(rec::decode(what, &raw)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn node(&self, node: &NodeId) -> Result<NodeRecord, CoordinatorError> {
        self.load("node", &rec::node_key(node))?.ok_or_else(|| CoordinatorError::UnknownNode(node.to_string()))
    }

    // ---- products -------------------------------------------------------------------------

    pub fn products(&self) -> Result<Vec<ProductRecord>, StoreError> {
        self.store.scan_prefix(b"p/").map(|item| rec::decode("product", &item?.1)).collect()
    }

    pub fn product(&self, sku: &Sku) -> Result<Option<ProductRecord>, StoreError> {
        self.load("product", &rec::product_key(sku))
    }

    pub async fn add_product(&self, product: ProductRecord) -> Result<(), CoordinatorError> {
        validate_product(&product)?;
        {
            let _guard = self.lock.lock();
            if self.store.get(&rec::product_key(&product.sku))?.is_some() {
                return Err(CoordinatorError::ProductExists(product.sku.to_string()));
            }
            let mut batch = WriteBatch::default();
            batch.put(rec::product_key(&product.sku), rec::encode(&product)?);
            let mut products = self.products()?;
            products.push(product);
            self.queue_catalog(&mut batch, &products)?;
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        Ok(())
    }

    /// Sets (adds or replaces) the price of `sku` in `currency`.
    pub async fn set_price(&self, sku: &Sku, price: Price) -> Result<ProductRecord, CoordinatorError> {
        let product = {
            let _guard = self.lock.lock();
            let mut product = self.product(sku)?.ok_or_else(|| CoordinatorError::UnknownSku(sku.to_string()))?;
            match product.prices.iter_mut().find(|p| p.currency == price.currency) {
                Some(existing) => existing.amount_minor = price.amount_minor,
                None => product.prices.push(price),
            }
            validate_product(&product)?;
            let mut batch = WriteBatch::default();
            batch.put(rec::product_key(sku), rec::encode(&product)?);
            let products: Vec<ProductRecord> =
                self.products()?.into_iter().map(|p| if &p.sku == sku { product.clone() } else { p }).collect();
            self.queue_catalog(&mut batch, &products)?;
            self.store.apply(batch)?;
            product
        };
        self.store.durable().await?;
        Ok(product)
    }

    /// Sets or clears the automatic top-up policy of `sku`.
    pub async fn set_topup(&self, sku: &Sku, policy: Option<TopUpPolicy>) -> Result<ProductRecord, CoordinatorError> {
        if let Some(p) = policy {
            if p.target == 0 || p.low_watermark > p.target {
                return Err(CoordinatorError::InvalidProduct(format!(
                    "{sku}: top-up needs 0 <= low watermark <= target and target >= 1"
                )));
            }
        }
        let product = {
            let _guard = self.lock.lock();
            let mut product = self.product(sku)?.ok_or_else(|| CoordinatorError::UnknownSku(sku.to_string()))?;
            product.topup = policy;
            let mut batch = WriteBatch::default();
            batch.put(rec::product_key(sku), rec::encode(&product)?);
            self.store.apply(batch)?;
            product
        };
        self.store.durable().await?;
        Ok(product)
    }

    fn queue_catalog(&self, batch: &mut WriteBatch, products: &[ProductRecord]) -> Result<(), CoordinatorError> {
        for node in self.nodes()? {
            if !node.revoked {
                self.queue_control(batch, node, CONTROL_CATALOG, rec::encode(&products.to_vec())?)?;
            }
        }
        Ok(())
    }

    /// Appends a control message for `node` to `batch` (and the node record with its new seq).
    pub(crate) fn queue_control(
        &self,
        batch: &mut WriteBatch,
        mut node: NodeRecord,
        tag: u8,
        payload: Vec<u8>,
    ) -> Result<NodeRecord, StoreError> {
        let seq = node.next_control_seq.max(1);
        node.next_control_seq = seq + 1;
        let mut value = vec![tag];
        value.extend_from_slice(&payload);
        batch.put(rec::control_key(&node.node_id, seq), value);
        batch.put(rec::node_key(&node.node_id), rec::encode(&node)?);
        Ok(node)
    }

    // ---- keys -----------------------------------------------------------------------------

    /// The tag under which a key's content is indexed for deduplication: an HMAC-SHA256 under a
    /// key derived from the coordinator's signing key (which lives outside the store), so that
    /// whoever reads the store cannot confirm a guessed low-entropy code against it.
    fn dedup_tag(&self, secret: &edgecard_protocol::Secret) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        use sha2::Digest;
        let key = sha2::Sha256::new()
            .chain_update(b"edgecard key-dedup v1\0")
            .chain_update(self.signing_key.to_bytes())
            .finalize();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(secret.expose().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Rebuilds the deduplication index under [`Coordinator::dedup_tag`] once, for a store from
    /// an earlier release that indexed keys by their bare SHA-256. In bounded batches; repeating
    /// it after a crash starts over. Returns how many keys were indexed (0 when already done).
    pub async fn migrate_dedup_index(&self) -> Result<u64, CoordinatorError> {
        const DONE: &[u8] = b"m/dedup_index_hmac";
        const PER_BATCH: usize = 10_000;
        if self.store.get(DONE)?.is_some() {
            return Ok(0);
        }
        let _guard = self.lock.lock();
        let mut batch = WriteBatch::default();
        let mut pending = 0;
        for item in self.store.scan_prefix(b"h/") {
            batch.delete(item?.0.to_vec());
            pending += 1;
            if pending >= PER_BATCH {
                self.store.apply(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        let mut indexed = 0;
        for item in self.store.scan_prefix(b"k/") {
            let (key, value) = item?;
            let record: KeyRecord = rec::decode("key", &value)?;
            // The location is the key record's own key without its prefix: sku, 0, id.
            batch.put(rec::hash_key(&self.dedup_tag(&record.secret)), key[2..].to_vec());
            indexed += 1;
            pending += 1;
            if pending >= PER_BATCH {
                self.store.apply(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        batch.put(DONE.to_vec(), vec![1]);
        self.store.apply(batch)?;
        drop(_guard);
        self.store.durable().await?;
        Ok(indexed)
    }

    /// Imports the valid keys of `text` as one batch. With `strict`, any invalid or duplicate row
    /// refuses the whole file.
    pub async fn import_keys(
        &self,
        sku: &Sku,
        text: &str,
        format: KeyFormat,
        strict: bool,
    ) -> Result<ImportReport, CoordinatorError> {
        let parsed = parse_keys(text, format);
        let report = {
            let _guard = self.lock.lock();
            if self.product(sku)?.is_none() {
                return Err(CoordinatorError::UnknownSku(sku.to_string()));
            }
            let mut duplicates_known = Vec::new();
            let mut fresh = Vec::new();
            for key in parsed.keys {
                let tag = self.dedup_tag(&key.secret);
                if self.store.get(&rec::hash_key(&tag))?.is_some() {
                    duplicates_known.push(key.line);
                } else {
                    fresh.push((key.secret, tag));
                }
            }
            let mut report = ImportReport {
                sku: sku.to_string(),
                batch: None,
                imported: 0,
                first_key_id: None,
                last_key_id: None,
                duplicates_in_file: parsed.duplicates_in_file,
                duplicates_known,
                invalid: parsed.invalid.iter().map(InvalidRowReport::from).collect(),
                blank_lines: parsed.blank_lines,
            };
            let problems = report.invalid.len() + report.duplicates_in_file.len() + report.duplicates_known.len();
            if strict && problems > 0 {
                return Err(CoordinatorError::ImportRefused(format!(
                    "{problems} rows are invalid or duplicates; nothing was imported"
                )));
            }
            if fresh.is_empty() {
                return Ok(report);
            }
            let mut batch = WriteBatch::default();
            let first = self.next_counter(&mut batch, "next_key_id", fresh.len() as u64)?;
            let batch_id = self.next_counter(&mut batch, "next_batch_id", 1)?;
            for (offset, (secret, hash)) in fresh.iter().enumerate() {
                let id = KeyId(first + offset as u64);
                let record = KeyRecord { secret: secret.clone(), batch: batch_id, state: KeyState::Pool };
                batch.put(rec::key_key(sku, id), rec::encode(&record)?);
                let mut location = sku.as_str().as_bytes().to_vec();
                location.push(0);
                location.extend_from_slice(&id.0.to_be_bytes());
                batch.put(rec::hash_key(hash), location);
            }
            let last = first + fresh.len() as u64 - 1;
            let mut pool = self.pool_runs(sku)?;
            rec::add_run(&mut pool, first, last);
            batch.put(rec::pool_key(sku), rec::encode(&pool)?);
            let meta = ImportBatch {
                id: batch_id,
                sku: sku.clone(),
                at: now_millis(),
                imported: fresh.len() as u64,
                first_key: KeyId(first),
                last_key: KeyId(last),
            };
            batch.put(rec::batch_key(batch_id), rec::encode(&meta)?);
            self.store.apply(batch)?;
            report.batch = Some(batch_id);
            report.imported = fresh.len() as u64;
            report.first_key_id = Some(first);
            report.last_key_id = Some(last);
            report
        };
        self.store.durable().await?;
        tracing::info!(sku = %sku, imported = report.imported, batch = ?report.batch, "keys imported");
        Ok(report)
    }

    pub(crate) fn pool_runs(&self, sku: &Sku) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(self.load("pool", &rec::pool_key(sku))?.unwrap_or_default())
    }

    /// Keys of `sku` in the pool (not granted to any node).
    pub fn pool_size(&self, sku: &Sku) -> u64 {
        self.pool_runs(sku).map_or(0, |runs| rec::runs_len(&runs))
    }

    // ---- nodes ----------------------------------------------------------------------------

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.store.scan_prefix(b"n/").map(|item| rec::decode("node", &item?.1)).collect()
    }

    pub async fn add_node(&self, node_id: &NodeId, region: &str) -> Result<NodeRecord, CoordinatorError> {
        let record = {
            let _guard = self.lock.lock();
            if self.store.get(&rec::node_key(node_id))?.is_some() {
                return Err(CoordinatorError::NodeExists(node_id.to_string()));
            }
            let mut batch = WriteBatch::default();
            let index = self.next_counter(&mut batch, "next_node_index", 1)?;
            let record = NodeRecord {
                node_id: node_id.clone(),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                region: region.to_string(),
                added_at: now_millis(),
                revoked: false,
                events_high_water: 0,
                reported_newest: 0,
                next_control_seq: 1,
                control_applied: 0,
                last_contact: None,
                stock: Vec::new(),
                topups: Vec::new(),
            };
            let products = self.products()?;
            let record = self.queue_control(&mut batch, record, CONTROL_CATALOG, rec::encode(&products.to_vec())?)?;
            self.store.apply(batch)?;
            record
        };
        self.store.durable().await?;
        Ok(record)
    }

    pub async fn revoke_node(&self, node_id: &NodeId) -> Result<(), CoordinatorError> {
        {
            let _guard = self.lock.lock();
            let mut node = self.node(node_id)?;
            node.revoked = true;
            let mut batch = WriteBatch::default();
            batch.put(rec::node_key(node_id), rec::encode(&node)?);
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        tracing::warn!(node = %node_id, "node revoked");
        Ok(())
    }

    pub fn is_revoked(&self, node_id: &NodeId) -> bool {
        self.node(node_id).map_or(true, |n| n.revoked)
    }

    // ---- slices ---------------------------------------------------------------------------

    /// Grants `count` pool keys of `sku` (lowest ids first) to `node` as a new signed slice,
    /// queued for delivery with the node's next sync.
    /// Grants `count` keys of the pool to a node: one slice, or several when one grant of them
    /// would not fit the sync envelope (see `Settings::max_grant_bytes`).
    pub async fn allocate(
        &self,
        sku: &Sku,
        node_id: &NodeId,
        count: u64,
    ) -> Result<Vec<SliceRecord>, CoordinatorError> {
        if count == 0 {
            return Err(CoordinatorError::ZeroCount);
        }
        let slices = {
            let _guard = self.lock.lock();
            let node = self.node(node_id)?;
            if node.revoked {
                return Err(CoordinatorError::NodeRevoked(node_id.to_string()));
            }
            if self.product(sku)?.is_none() {
                return Err(CoordinatorError::UnknownSku(sku.to_string()));
            }
            let mut pool = self.pool_runs(sku)?;
            let Some(free) = rec::take_lowest(&mut pool, count) else {
                return Err(CoordinatorError::NotEnoughKeys {
                    sku: sku.to_string(),
                    available: rec::runs_len(&pool),
                    requested: count,
                });
            };
            let mut batch = WriteBatch::default();
            let (slices, _node) = self.grant_slices_into(&mut batch, node, sku, &free, now_millis())?;
            batch.put(rec::pool_key(sku), rec::encode(&pool)?);
            self.store.apply(batch)?;
            slices
        };
        self.store.durable().await?;
        for slice in &slices {
            tracing::info!(slice = %slice.slice_id, sku = %sku, node = %node_id, keys = slice.key_count(), "slice allocated");
        }
        Ok(slices)
    }

    pub fn slices(&self) -> Result<Vec<SliceRecord>, StoreError> {
        self.store.scan_prefix(b"s/").map(|item| rec::decode("slice", &item?.1)).collect()
    }

    // ---- ledger ---------------------------------------------------------------------------

    /// Ingests a node's upload: new events in seq order, exactly once, in one durable commit;
    /// events about keys not granted to the node, or delivering a key twice, are refused and
    /// raised as alarms. Returns the ack with the node's pending control messages.
    ///
    /// First the upload's incarnation is checked against the node's lineage: a data dir behind the
    /// ledger (restored from an older copy) is fenced and gets back the events it lost; a new,
    /// empty one is adopted and the old one's slices reclaimed; one with history of its own is
    /// refused. A node is confirmed (may sell) only once it holds everything the ledger holds.
    pub async fn ingest(&self, node_id: &NodeId, upload: SyncUpload) -> Result<SyncAck, CoordinatorError> {
        // A node that lost its own record of an ack re-sends from further back; acking past what
        // it sent would look like a protocol error to it, so the ack stops at its last event.
        let sent_through = upload.events.last().map_or(upload.newest_seq, |e| e.seq);
        let newest_seq = upload.newest_seq;
        let (high_water, restore, confirmed) = {
            let _guard = self.lock.lock();
            let mut node = self.node(node_id)?;
            if node.revoked {
                return Err(CoordinatorError::NodeRevoked(node_id.to_string()));
            }
            let mut batch = WriteBatch::default();
            let mut next_alarm =
                self.store.get(&rec::counter_key("next_alarm"))?.and_then(|raw| rec::trailing_u64(&raw)).unwrap_or(1);
            let now = now_millis();
            let mut lineage = self.lineage(node_id)?;
            match self.admit_incarnation(&mut batch, &mut next_alarm, node, &mut lineage, &upload, now)? {
                Ok(admitted) => node = admitted,
                Err(refusal) => {
                    batch.put(rec::lineage_key(node_id), rec::encode(&lineage)?);
                    self.store.apply(batch)?;
                    drop(_guard);
                    self.store.durable().await?;
                    return Err(refusal);
                }
            }
            let mut keys: HashMap<(Sku, KeyId), KeyRecord> = HashMap::new();
            let mut orders: HashMap<edgecard_protocol::OrderId, LedgerOrder> = HashMap::new();
            let mut releases = ReleaseOverlay::default();
            let mut refunds: Vec<OrderEvent> = Vec::new();
            let mut diverged_at = None;
            for event in upload.events {
                if event.seq <= node.events_high_water {
                    // Already in the ledger: it must be the same event, or this data dir is not
                    // the one whose events the ledger holds.
                    let stored = self.store.get(&rec::ledger_key(node_id, event.seq))?;
                    if let Some(stored) = stored {
                        if rec::decode_event(&stored)? != event && diverged_at.is_none() {
                            diverged_at = Some(event.seq);
                        }
                    }
                    continue;
                }
                if event.seq != node.events_high_water + 1 {
                    self.alarm(
                        &mut batch,
                        &mut next_alarm,
                        node_id,
                        "sequence_gap",
                        format!("events {} to {} never arrived", node.events_high_water + 1, event.seq - 1),
                    )?;
                }
                node.events_high_water = event.seq;
                if let OrderEventKind::Released { slice_id, ticket, key_ids, .. } = &event.kind {
                    let release = Release { sku: &event.sku, slice_id: *slice_id, ticket: *ticket, key_ids };
                    self.ingest_release(&node, release, &mut keys, &mut releases)?;
                    batch.put(rec::ledger_key(node_id, event.seq), rec::encode_event(&event)?);
                    continue;
                }
                // An order's later events stand or fall with its reservation: if that was refused,
                // the ledger never knew the order, and what follows is refused too.
                let opens_order = matches!(event.kind, OrderEventKind::Reserved { .. });
                if !opens_order
                    && !orders.contains_key(&event.order_id)
                    && self.store.get(&rec::order_key(&event.order_id))?.is_none()
                {
                    let detail = format!(
                        "seq {}: event for order {} whose reservation the ledger refused or never saw",
                        event.seq, event.order_id
                    );
                    self.alarm(&mut batch, &mut next_alarm, node_id, "refused_order", detail)?;
                    continue;
                }
                match self.check_event(&node, &event, &mut keys)? {
                    Ok(()) => {
                        self.apply_to_order(&event, &mut orders)?;
                        if let OrderEventKind::Refunded { .. } = &event.kind {
                            refunds.push(event.clone());
                        }
                        batch.put(rec::ledger_key(node_id, event.seq), rec::encode_event(&event)?);
                        if let Some((kind, detail)) = payment_alarm(&event) {
                            self.alarm(&mut batch, &mut next_alarm, node_id, kind, detail)?;
                        }
                    }
                    Err((kind, detail)) => self.alarm(&mut batch, &mut next_alarm, node_id, kind, detail)?,
                }
            }
            // Before the acknowledged control messages are deleted below: their bodies name slices.
            let refusals = self.settle_refused_control(
                &mut batch,
                &node,
                &upload.refused_control,
                &upload.stock,
                &mut keys,
                &mut releases,
            )?;
            for (kind, detail) in refusals {
                self.alarm(&mut batch, &mut next_alarm, node_id, kind, detail)?;
            }
            let restore = self.fence_if_behind(
                &mut batch,
                &mut next_alarm,
                &node,
                &mut lineage,
                FenceCheck { newest_seq, diverged_at, now },
            )?;
            let confirmed = lineage.fence.is_none();
            for ((sku, id), record) in keys {
                batch.put(rec::key_key(&sku, id), rec::encode(&record)?);
            }
            let regrants = releases.has_regrants();
            releases.write(&mut batch)?;
            for (id, order) in orders {
                batch.put(rec::order_key(&id), rec::encode(&order)?);
            }
            self.record_refunds(&mut batch, &refunds)?;
            for item in self.store.scan_prefix(&rec::control_prefix(node_id)) {
                let (key, _) = item?;
                if rec::trailing_u64(&key).is_some_and(|seq| seq <= upload.control_applied) {
                    batch.delete(key.to_vec());
                }
            }
            node = self.queue_renewals(&mut batch, node, now)?;
            node.control_applied = node.control_applied.max(upload.control_applied);
            node.last_contact = Some(now);
            node.stock = upload
                .stock
                .into_iter()
                .map(|s| NodeStock { slice_id: s.slice_id, sku: s.sku, available: s.available, selling: s.selling })
                .collect();
            batch.put(rec::node_key(node_id), rec::encode(&node)?);
            batch.put(rec::lineage_key(node_id), rec::encode(&lineage)?);
            self.store.apply(batch)?;
            self.pass_on_lookups(node_id, &upload.lookups, now)?;
            // Keys released for a recipient go out only now that the release is in the ledger.
            // (A crash between the two batches is repaired by the housekeeping task.)
            if regrants {
                self.complete_regrants()?;
            }
            if confirmed {
                self.top_up(node_id)?;
            }
            (node.events_high_water, restore, confirmed)
        };
        let events_high_water = high_water.min(sent_through);
        // Read what goes out first, then wait: the wait covers every batch applied before it,
        // including an allocation or top-up applied by another task after this upload's batch.
        // Nothing in the ack leaves before it is durable. A node not yet confirmed gets no control:
        // it must catch up with the ledger before it installs or changes anything.
        let control =
            if confirmed { self.pending_control_within(node_id, self.settings.max_ack_bytes)? } else { Vec::new() };
        self.store.durable().await?;
        Ok(SyncAck { events_high_water, control, ledger_high_water: high_water, restore, confirmed })
    }

    /// What the coordinator knows of `node`'s data dirs.
    pub fn lineage(&self, node: &NodeId) -> Result<NodeLineage, StoreError> {
        Ok(self.load::<NodeLineage>("node lineage", &rec::lineage_key(node))?.unwrap_or_default())
    }

    /// Checks the upload's incarnation. The first one seen is adopted. Another one on an empty
    /// data dir (wiped, or a new machine) replaces the old: its slices are reclaimed (their take
    /// window quarantined, since the old dir may have sold from it unreported) and numbering
    /// continues after the ledger's. Another one with events of its own is refused: the ledger
    /// cannot tell its sales from the followed dir's.
    fn admit_incarnation(
        &self,
        batch: &mut WriteBatch,
        next_alarm: &mut u64,
        node: NodeRecord,
        lineage: &mut NodeLineage,
        upload: &SyncUpload,
        now: UnixMillis,
    ) -> Result<Result<NodeRecord, CoordinatorError>, CoordinatorError> {
        if lineage.incarnation == 0 {
            lineage.incarnation = upload.incarnation;
            return Ok(Ok(node));
        }
        if upload.incarnation == lineage.incarnation {
            return Ok(Ok(node));
        }
        let node_id = node.node_id.clone();
        if upload.newest_seq > 0 || !upload.events.is_empty() {
            if lineage.refused != Some(upload.incarnation) {
                lineage.refused = Some(upload.incarnation);
                let detail = format!(
                    "data dir {:#x} with events through {} is not the followed one ({:#x}); its uploads are refused",
                    upload.incarnation, upload.newest_seq, lineage.incarnation
                );
                self.alarm(batch, next_alarm, &node_id, "foreign_incarnation", detail)?;
            }
            return Ok(Err(CoordinatorError::ForeignIncarnation {
                node: node_id.to_string(),
                incarnation: upload.incarnation,
            }));
        }
        let reclaimed = self.reclaim_for_replaced_dir(&node, now)?;
        let detail = format!(
            "new data dir {:#x} replaces {:#x}; ledger events through {} kept, {} slice(s) reclaimed",
            upload.incarnation, lineage.incarnation, node.events_high_water, reclaimed
        );
        self.alarm(batch, next_alarm, &node_id, "node_replaced", detail)?;
        lineage.previous.push(lineage.incarnation);
        lineage.incarnation = upload.incarnation;
        lineage.since = node.events_high_water;
        lineage.fence = None;
        lineage.refused = None;
        // The new dir has no catalog: send the current one.
        let products = self.products()?;
        let node = self.queue_control(batch, node, CONTROL_CATALOG, rec::encode(&products.to_vec())?)?;
        Ok(Ok(node))
    }

    /// Fences a node whose data dir is behind the ledger or diverged from it, and returns the
    /// ledger events past its newest that it should restore (a bounded run). Lifts the fence once
    /// the node has everything (and has not diverged).
    fn fence_if_behind(
        &self,
        batch: &mut WriteBatch,
        next_alarm: &mut u64,
        node: &NodeRecord,
        lineage: &mut NodeLineage,
        check: FenceCheck,
    ) -> Result<Vec<OrderEvent>, CoordinatorError> {
        let node_id = &node.node_id;
        // Events before this incarnation was adopted belong to earlier data dirs.
        let newest = check.newest_seq.max(lineage.since);
        let restore = if newest < node.events_high_water {
            self.ledger_after(node_id, newest, node.events_high_water, RESTORE_EVENTS_PER_ACK)?
        } else {
            Vec::new()
        };
        let behind = !restore.is_empty();
        if (behind || check.diverged_at.is_some()) && lineage.fence.is_none() {
            let fence = Fence {
                detected_at: check.now,
                node_newest: check.newest_seq,
                ledger_high_water: node.events_high_water,
                diverged: check.diverged_at.is_some(),
            };
            let detail = match check.diverged_at {
                Some(seq) => format!("event {seq} differs from the ledger's: this data dir is not the one the ledger followed; the node stays fenced"),
                None => format!(
                    "data dir restored from an older copy: it has events through {}, the ledger through {}; the node is fenced until it has restored them",
                    check.newest_seq, node.events_high_water
                ),
            };
            tracing::warn!(node = %node_id, newest = check.newest_seq, ledger = node.events_high_water, "node rolled back");
            self.alarm(batch, next_alarm, node_id, "node_rolled_back", detail)?;
            lineage.fence = Some(fence);
        } else if let Some(fence) = &mut lineage.fence {
            if check.diverged_at.is_some() {
                fence.diverged = true;
            }
            if !behind && !fence.diverged {
                tracing::info!(node = %node_id, "rolled-back node has restored what it lost; fence lifted");
                lineage.fence = None;
            }
        }
        Ok(restore)
    }

    /// Up to `limit` ledger events of `node` with seq in `(after, through]`, ascending. Seqs the
    /// ledger refused have no event, so the run may have gaps.
    pub fn ledger_after(
        &self,
        node: &NodeId,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<OrderEvent>, StoreError> {
        let prefix = rec::ledger_prefix(node);
        let start = rec::ledger_key(node, after.saturating_add(1));
        let mut events = Vec::new();
        for item in self.store.scan_prefix_from(&prefix, &start) {
            let (key, value) = item?;
            if rec::trailing_u64(&key).is_none_or(|seq| seq > through) || events.len() >= limit {
                break;
            }
            events.push(rec::decode_event(&value)?);
        }
        Ok(events)
    }

    /// Puts into `batch` new slices of `key_ids` (already taken out of the pool by the caller)
    /// for `node`, as many as it takes for each grant to fit `Settings::max_grant_bytes`: the
    /// keys' states, the slice records, and the signed grants queued for the node. Returns the
    /// slices and the node record with its new control seqs (the last is its
    /// `next_control_seq - 1`).
    pub(crate) fn grant_slices_into(
        &self,
        batch: &mut WriteBatch,
        mut node: NodeRecord,
        sku: &Sku,
        key_ids: &[KeyId],
        now: UnixMillis,
    ) -> Result<(Vec<SliceRecord>, NodeRecord), CoordinatorError> {
        let mut records = Vec::with_capacity(key_ids.len());
        for id in key_ids {
            let record: KeyRecord = self.load("key", &rec::key_key(sku, *id))?.ok_or_else(|| StoreError::Corrupt {
                key: format!("k/{sku}/{id}"),
                reason: "free key missing".into(),
            })?;
            records.push((*id, record));
        }
        let chunks = grant_chunks(&records, self.settings.max_grant_bytes);
        // One read of the counter for all of them: it is stored, not yet in `batch`.
        let first_id = self.next_counter(batch, "next_slice_id", chunks.len() as u64)?;
        let mut slices = Vec::new();
        for (slice_id, chunk) in (first_id..).map(SliceId).zip(chunks) {
            let (slice, updated) = self.grant_slice_into(batch, node, sku, slice_id, chunk, now)?;
            node = updated;
            slices.push(slice);
        }
        Ok((slices, node))
    }

    /// One slice of `records` for `node` (see [`Coordinator::grant_slices_into`]).
    fn grant_slice_into(
        &self,
        batch: &mut WriteBatch,
        node: NodeRecord,
        sku: &Sku,
        slice_id: SliceId,
        records: &[(KeyId, KeyRecord)],
        now: UnixMillis,
    ) -> Result<(SliceRecord, NodeRecord), CoordinatorError> {
        let mut keys = Vec::with_capacity(records.len());
        let mut key_ids = Vec::with_capacity(records.len());
        for (id, record) in records {
            let mut record = record.clone();
            record.state = KeyState::Granted { slice: slice_id, node_index: node.index };
            keys.push(GrantedKey { key_id: *id, secret: record.secret.clone() });
            key_ids.push(*id);
            batch.put(rec::key_key(sku, *id), rec::encode(&record)?);
        }
        let grant = SliceGrant {
            slice_id,
            sku: sku.clone(),
            node_id: node.node_id.clone(),
            epoch: Epoch(1),
            issued_at: now,
            lease_deadline: now.saturating_add_ms(self.settings.lease.as_millis() as u64),
            take_window: self.settings.take_window,
            keys,
        };
        let signed = grant.sign(&self.signing_key)?;
        let slice = SliceRecord {
            slice_id,
            sku: sku.clone(),
            node: node.node_id.clone(),
            epoch: grant.epoch,
            issued_at: now,
            lease_deadline: grant.lease_deadline,
            key_runs: rec::runs_of(&key_ids),
            take_window: grant.take_window,
            state: SliceState::Active,
        };
        batch.put(rec::slice_key(slice_id), rec::encode(&slice)?);
        let node = self.queue_control(batch, node, CONTROL_GRANT, signed.to_bytes()?)?;
        Ok((slice, node))
    }

    /// Renews, while the node is in contact, every lease of its active or closing slices (keys
    /// under a closing slice's open reservations stay deliverable) that has less than half of its
    /// length left: a signed renewal for the slice's epoch with a later deadline,
    /// queued like any control message. The slice record takes the new deadline at once; if the
    /// node never receives it, the deadline the node holds is the earlier one, so the
    /// coordinator's view errs on the late side, which is the safe side for reclaiming keys.
    fn queue_renewals(
        &self,
        batch: &mut WriteBatch,
        mut node: NodeRecord,
        now: UnixMillis,
    ) -> Result<NodeRecord, CoordinatorError> {
        let lease_ms = self.settings.lease.as_millis() as u64;
        for mut slice in self.slices()? {
            let due = slice.node == node.node_id
                && matches!(slice.state, SliceState::Active | SliceState::Closing { .. })
                && lease::renewal_due(slice.lease_deadline, now, lease_ms);
            if !due {
                continue;
            }
            let renewal = LeaseRenewal {
                slice_id: slice.slice_id,
                node_id: node.node_id.clone(),
                epoch: slice.epoch,
                issued_at: now,
                lease_deadline: now.saturating_add_ms(lease_ms),
            };
            let signed = renewal.sign(&self.signing_key)?;
            node = self.queue_control(batch, node, CONTROL_RENEW, signed.to_bytes()?)?;
            slice.lease_deadline = renewal.lease_deadline;
            batch.put(rec::slice_key(slice.slice_id), rec::encode(&slice)?);
            tracing::debug!(slice = %slice.slice_id, node = %node.node_id, "lease renewal queued");
        }
        Ok(node)
    }

    /// Validates one event against key ownership; on success updates the key overlay.
    #[allow(clippy::type_complexity)]
    fn check_event(
        &self,
        node: &NodeRecord,
        event: &OrderEvent,
        keys: &mut HashMap<(Sku, KeyId), KeyRecord>,
    ) -> Result<Result<(), (&'static str, String)>, StoreError> {
        let key_ids = match &event.kind {
            OrderEventKind::Reserved { key_ids, .. }
            | OrderEventKind::Delivered { key_ids }
            | OrderEventKind::Refunded { key_ids, .. } => key_ids,
            _ => return Ok(Ok(())),
        };
        let mut loaded = Vec::with_capacity(key_ids.len());
        for id in key_ids {
            let slot = (event.sku.clone(), *id);
            let record = match keys.get(&slot) {
                Some(record) => record.clone(),
                None => match self.load::<KeyRecord>("key", &rec::key_key(&event.sku, *id))? {
                    Some(record) => record,
                    None => {
                        return Ok(Err((
                            "key_not_granted",
                            format!("seq {}: key {id} of {} does not exist", event.seq, event.sku),
                        )))
                    }
                },
            };
            if record.state.holder().map(|(_, index)| index) != Some(node.index) {
                return Ok(Err((
                    "key_not_granted",
                    format!("seq {}: key {id} of {} is not granted to {}", event.seq, event.sku, node.node_id),
                )));
            }
            match (&event.kind, record.state) {
                (OrderEventKind::Delivered { .. }, KeyState::Sold { order, .. } | KeyState::Revoked { order, .. })
                    if order != event.order_id =>
                {
                    return Ok(Err((
                        "key_delivered_twice",
                        format!("seq {}: key {id} of {} was already delivered to order {order}", event.seq, event.sku),
                    )));
                }
                (OrderEventKind::Refunded { .. }, KeyState::Sold { order, .. } | KeyState::Revoked { order, .. })
                    if order == event.order_id => {}
                (OrderEventKind::Refunded { .. }, _) => {
                    return Ok(Err((
                        "refund_of_unsold_key",
                        format!(
                            "seq {}: refund of order {} names key {id} of {}, which the ledger never saw delivered to it",
                            event.seq, event.order_id, event.sku
                        ),
                    )));
                }
                _ => {}
            }
            loaded.push((slot, record));
        }
        match event.kind {
            OrderEventKind::Delivered { .. } => {
                for (slot, mut record) in loaded {
                    match record.state {
                        KeyState::Granted { slice, node_index }
                        | KeyState::Quarantined { slice, node_index }
                        | KeyState::WrittenOff { slice, node_index } => {
                            record.state = KeyState::Sold { slice, node_index, order: event.order_id };
                        }
                        KeyState::Pool | KeyState::Sold { .. } | KeyState::Revoked { .. } => {}
                    }
                    keys.insert(slot, record);
                }
            }
            OrderEventKind::Refunded { .. } => {
                for (slot, mut record) in loaded {
                    if let KeyState::Sold { slice, node_index, order } = record.state {
                        record.state = KeyState::Revoked { slice, node_index, order };
                    }
                    keys.insert(slot, record);
                }
            }
            _ => {}
        }
        Ok(Ok(()))
    }

    fn apply_to_order(
        &self,
        event: &OrderEvent,
        orders: &mut HashMap<edgecard_protocol::OrderId, LedgerOrder>,
    ) -> Result<(), StoreError> {
        let existing = match orders.remove(&event.order_id) {
            Some(order) => Some(order),
            None => self.load("order", &rec::order_key(&event.order_id))?,
        };
        let mut order = existing.unwrap_or_else(|| LedgerOrder {
            order_id: event.order_id,
            node: event.node_id.clone(),
            sku: event.sku.clone(),
            quantity: 0,
            amount_minor: 0,
            currency: String::new(),
            status: LedgerStatus::Reserved,
            created_at: event.at,
            updated_at: event.at,
            key_ids: Vec::new(),
            channel: None,
            provider_txn: None,
        });
        order.updated_at = event.at;
        match &event.kind {
            OrderEventKind::Reserved { key_ids, quantity, amount_minor, currency, .. } => {
                order.quantity = *quantity;
                order.amount_minor = *amount_minor;
                order.currency = currency.clone();
                order.key_ids = key_ids.clone();
                order.status = LedgerStatus::Reserved;
            }
            OrderEventKind::Paid { channel, provider_txn, .. } => {
                order.channel = Some(channel.clone());
                order.provider_txn = Some(provider_txn.clone());
                order.status = LedgerStatus::Paid;
            }
            OrderEventKind::Delivered { key_ids } => {
                order.key_ids = key_ids.clone();
                order.status = LedgerStatus::Delivered;
            }
            OrderEventKind::Expired { .. } => match order.status {
                LedgerStatus::Reserved => order.status = LedgerStatus::Expired,
                // The reservation ended: its keys are back on sale at the node.
                LedgerStatus::PaymentMismatch => order.key_ids.clear(),
                _ => {}
            },
            OrderEventKind::AwaitingStock { .. } => {
                order.key_ids.clear();
                order.status = LedgerStatus::PaidAwaitingStock;
            }
            OrderEventKind::PaymentMismatch { channel, provider_txn, .. } => {
                if matches!(order.status, LedgerStatus::Reserved | LedgerStatus::Expired) {
                    order.status = LedgerStatus::PaymentMismatch;
                }
                if order.channel.is_none() {
                    order.channel = Some(channel.clone());
                    order.provider_txn = Some(provider_txn.clone());
                }
            }
            OrderEventKind::Refunded { manual, .. } => {
                order.status = if *manual { LedgerStatus::RefundManual } else { LedgerStatus::Refunded };
            }
            OrderEventKind::Disputed { .. } => {
                if !matches!(order.status, LedgerStatus::Refunded | LedgerStatus::RefundManual) {
                    order.status = LedgerStatus::Disputed;
                }
            }
            // Alarms only (see `payment_alarm`): the order stays as it was.
            OrderEventKind::PaymentUnmatched { .. } => {}
            // Handled before: not about an order.
            OrderEventKind::Released { .. } => {}
        }
        orders.insert(event.order_id, order);
        Ok(())
    }

    /// Records an alarm. `next` is the batch's alarm counter: several alarms in one batch must not
    /// share a seq (the stored counter is read once per batch and written back by the caller).
    fn alarm(
        &self,
        batch: &mut WriteBatch,
        next: &mut u64,
        node: &NodeId,
        kind: &str,
        detail: String,
    ) -> Result<(), StoreError> {
        tracing::error!(node = %node, kind, %detail, "ledger alarm");
        let seq = *next;
        let alarm = Alarm { seq, at: now_millis(), node: node.clone(), kind: kind.to_string(), detail };
        batch.put(rec::alarm_key(seq), rec::encode(&alarm)?);
        *next += 1;
        batch.put(rec::counter_key("next_alarm"), next.to_be_bytes().to_vec());
        Ok(())
    }

    pub fn alarms(&self) -> Result<Vec<Alarm>, StoreError> {
        self.store.scan_prefix(b"a/").map(|item| rec::decode("alarm", &item?.1)).collect()
    }

    /// Control messages queued for `node` and not yet reported applied, in order.
    pub fn pending_control(&self, node_id: &NodeId) -> Result<Vec<ControlMessage>, StoreError> {
        self.pending_control_within(node_id, usize::MAX)
    }

    /// The first of `pending_control` whose stored size adds up to at most `budget` bytes (and
    /// always the first): what one sync ack carries. The node reports them applied and gets the
    /// rest with its next sync.
    pub fn pending_control_within(&self, node_id: &NodeId, budget: usize) -> Result<Vec<ControlMessage>, StoreError> {
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        for item in self.store.scan_prefix(&rec::control_prefix(node_id)) {
            let (key, value) = item?;
            bytes = bytes.saturating_add(value.len());
            if !messages.is_empty() && bytes > budget {
                break;
            }
            let Some(seq) = rec::trailing_u64(&key) else { continue };
            let body = match value.split_first() {
                Some((&CONTROL_GRANT, payload)) => ControlBody::Grant { signed_grant: payload.to_vec() },
                Some((&CONTROL_CATALOG, payload)) => {
                    let products: Vec<ProductRecord> = rec::decode("catalog", payload)?;
                    ControlBody::Catalog { products: products.iter().map(catalog_product).collect() }
                }
                Some((&CONTROL_RENEW, payload)) => ControlBody::Renew { signed_renewal: payload.to_vec() },
                Some((&CONTROL_REFUND, payload)) => {
                    let refund: crate::refunds::RefundOrder = rec::decode("refund", payload)?;
                    ControlBody::Refund { order_id: refund.order_id, reason: refund.reason }
                }
                Some((&CONTROL_FIND_ORDERS, payload)) => crate::find_orders::control_body(payload)?,
                Some((&CONTROL_SHRINK, payload)) => {
                    let shrink: ShrinkOrder = rec::decode("shrink", payload)?;
                    ControlBody::Shrink {
                        slice_id: shrink.slice_id,
                        sku: shrink.sku,
                        epoch: shrink.epoch,
                        count: shrink.count,
                        close: shrink.close,
                        ticket: shrink.ticket,
                    }
                }
                _ => return Err(StoreError::Corrupt { key: "q/".into(), reason: "unknown control message".into() }),
            };
            messages.push(ControlMessage { seq, body });
        }
        Ok(messages)
    }

    /// Orders in the ledger matching `filter`, oldest first.
    pub fn orders(&self, filter: &OrderFilter) -> Result<Vec<LedgerOrder>, StoreError> {
        let mut orders = Vec::new();
        for item in self.store.scan_prefix(b"o/") {
            let order: LedgerOrder = rec::decode("order", &item?.1)?;
            let keep = filter.since.is_none_or(|since| order.created_at >= since)
                && filter.sku.as_ref().is_none_or(|sku| &order.sku == sku)
                && filter.node.as_ref().is_none_or(|node| &order.node == node)
                && filter.status.is_none_or(|status| order.status == status);
            if keep {
                orders.push(order);
            }
        }
        orders.sort_by_key(|o| (o.created_at, o.order_id.to_string()));
        Ok(orders)
    }
}

/// The alarm an event raises once in the ledger: money that needs an operator.
fn payment_alarm(event: &OrderEvent) -> Option<(&'static str, String)> {
    let order = event.order_id;
    match &event.kind {
        OrderEventKind::PaymentUnmatched { channel, provider_txn, amount_minor, currency, reason } => Some((
            "payment_unmatched",
            format!(
                "order {order}: {channel} payment {provider_txn} of {amount_minor} {currency} matches none of the order's payments ({}); nothing delivered for it",
                reason.as_str()
            ),
        )),
        OrderEventKind::PaymentMismatch { channel, provider_txn, amount_minor, currency } => Some((
            "payment_mismatch",
            format!(
                "order {order}: {channel} payment {provider_txn} of {amount_minor} {currency} does not match the order; nothing delivered for it"
            ),
        )),
        OrderEventKind::Refunded { channel, amount_minor, currency, manual: true, .. } => Some((
            "refund_manual",
            format!("order {order}: refund {amount_minor} {currency} by hand at {channel} (it has no refund call); its keys are revoked"),
        )),
        OrderEventKind::Disputed { channel, provider_dispute, amount_minor, currency } => Some((
            "payment_disputed",
            format!("order {order}: dispute {provider_dispute} of {amount_minor} {currency} opened at {channel}"),
        )),
        _ => None,
    }
}

/// Ledger events returned to a rolled-back node per ack (a few hundred KB at most).
const RESTORE_EVENTS_PER_ACK: usize = 2048;

/// What an upload says about the node's data dir, for [`Coordinator::fence_if_behind`].
struct FenceCheck {
    newest_seq: u64,
    /// The first already-ingested seq the node sent differently.
    diverged_at: Option<u64>,
    now: UnixMillis,
}

fn catalog_product(product: &ProductRecord) -> CatalogProduct {
    CatalogProduct {
        sku: product.sku.clone(),
        titles: product.titles.clone(),
        prices: product.prices.iter().map(|p| (p.amount_minor, p.currency.clone())).collect(),
    }
}

fn validate_product(product: &ProductRecord) -> Result<(), CoordinatorError> {
    let invalid = |m: &str| Err(CoordinatorError::InvalidProduct(format!("{}: {m}", product.sku)));
    if !product.titles.iter().any(|(lang, _)| lang == "en") {
        return invalid("an `en` title is required");
    }
    if product.titles.iter().any(|(lang, title)| lang.is_empty() || title.trim().is_empty() || title.len() > 200) {
        return invalid("titles must be 1 to 200 bytes with a language tag");
    }
    if product.prices.is_empty() {
        return invalid("at least one price is required");
    }
    for price in &product.prices {
        if price.amount_minor == 0 {
            return invalid("prices must be above zero");
        }
        if price.currency.len() != 3 || !price.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return invalid("currencies are three upper-case letters (ISO 4217)");
        }
    }
    Ok(())
}
