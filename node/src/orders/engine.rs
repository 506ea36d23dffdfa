//! The order engine: reserve → pay → deliver, expiry, late payments, grant installation.
//!
//! Every state change is decided under one lock, applied to the store as one atomic batch under
//! that same lock (so the log order is the decision order), and awaited for durability after the
//! lock is released, which lets concurrent changes share one fsync. Nothing is answered to a buyer
//! or a payment provider before its batch is durable, and keys are revealed only from a durable
//! Delivered record.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgecard_protocol::{
    KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, OrderToken, Secret, Sku, SliceGrant, SliceId, UnixMillis,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::inventory::{Inventory, SliceLease};
use super::record::{self, OrderRecord, OrderStatus, PaymentAttempt, PaymentRecord, SliceMeta};
use crate::catalog::Catalog;
use crate::config::{Currency, OrdersConfig};
use crate::limiter::{limit_key, LimitKey};
use crate::metrics::OrderMetrics;
use crate::store::{Store, StoreError, WriteBatch};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("unknown sku {0}")]
    UnknownSku(String),
    #[error("quantity must be between 1 and {max}")]
    BadQuantity { max: u32 },
    #[error("sku {sku} is not sold in {currency}")]
    UnsupportedCurrency { sku: String, currency: String },
    #[error("unknown payment channel {0}")]
    UnknownChannel(String),
    #[error("invalid email address")]
    BadEmail,
    #[error("not enough stock for {sku}")]
    SoldOut { sku: String },
    #[error("too many unpaid orders for this {who}; pay or let one expire first")]
    TooManyOpen { who: &'static str },
    #[error("order not found")]
    NotFound,
    #[error("payment does not match the order: {0}")]
    PaymentMismatch(&'static str),
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

/// A validated purchase request.
#[derive(Debug, Clone)]
pub struct CreateOrder {
    pub sku: Sku,
    pub quantity: u32,
    pub email: Option<String>,
    pub currency: Option<Currency>,
    pub channel: String,
    pub client_ip: IpAddr,
}

#[derive(Debug)]
pub struct CreatedOrder {
    pub record: OrderRecord,
    /// Shown to the buyer once; only its hash is stored.
    pub token: OrderToken,
}

/// A payment already verified by its channel (signature and provider status).
#[derive(Debug, Clone)]
pub struct PaymentConfirmation {
    pub order_id: OrderId,
    pub channel: String,
    pub provider_txn: String,
    pub amount_minor: u64,
    pub currency: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    Delivered,
    AwaitingStock,
    /// The same (channel, transaction) was seen before: nothing changed.
    AlreadyRecorded,
    /// A second, different payment for a settled order: recorded, needs a refund.
    DuplicatePayment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    Installed { keys: usize, filled_awaiting: usize },
    Renewed,
    AlreadyInstalled,
}

#[derive(Debug, thiserror::Error)]
pub enum GrantInstallError {
    #[error("grant epoch {offered} is older than installed epoch {installed} for slice {slice}")]
    StaleEpoch { slice: SliceId, offered: u64, installed: u64 },
    #[error("grant for slice {slice} changes its key set or sku; only lease renewal is supported")]
    ChangedSlice { slice: SliceId },
    #[error("grant for slice {slice} contains key {key} that this node already holds or sold")]
    KeyConflict { slice: SliceId, key: KeyId },
    #[error("grant lease already expired")]
    Expired,
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

struct OpenReservation {
    sku: Sku,
    key_ids: Vec<KeyId>,
    expires_at: UnixMillis,
    ip: LimitKey,
    email: Option<String>,
}

#[derive(Default)]
struct State {
    inventory: Inventory,
    open: HashMap<OrderId, OpenReservation>,
    expiry: BTreeSet<(UnixMillis, OrderId)>,
    open_per_ip: HashMap<LimitKey, u32>,
    open_per_email: HashMap<String, u32>,
    /// PaidAwaitingStock orders per sku, oldest first: (queue seq, order).
    awaiting: HashMap<Sku, VecDeque<(u64, OrderId)>>,
    next_seq: u64,
    /// Signalled whenever an outbox event is appended (the sync link waits on it).
    outbox_notify: Arc<tokio::sync::Notify>,
}

impl State {
    fn count_open(&mut self, ip: LimitKey, email: Option<&String>) {
        *self.open_per_ip.entry(ip).or_default() += 1;
        if let Some(email) = email {
            *self.open_per_email.entry(email.clone()).or_default() += 1;
        }
    }

    fn uncount_open(&mut self, ip: LimitKey, email: Option<&String>) {
        decrement(&mut self.open_per_ip, &ip);
        if let Some(email) = email {
            decrement(&mut self.open_per_email, email);
        }
    }

    fn close_reservation(&mut self, id: &OrderId) -> Option<OpenReservation> {
        let open = self.open.remove(id)?;
        self.expiry.remove(&(open.expires_at, *id));
        self.uncount_open(open.ip, open.email.as_ref());
        Some(open)
    }

    /// Appends an outbox event to `batch`; the caller applies the batch under the same lock.
    fn push_event(
        &mut self,
        batch: &mut WriteBatch,
        node: &NodeId,
        order: &OrderRecord,
        at: UnixMillis,
        kind: OrderEventKind,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let event = OrderEvent { node_id: node.clone(), seq, at, order_id: order.id, sku: order.sku.clone(), kind };
        batch.put(record::outbox_key(seq), serde_json::to_vec(&event).unwrap_or_default());
        batch.put(record::NEXT_SEQ.to_vec(), self.next_seq.to_be_bytes().to_vec());
        self.outbox_notify.notify_one();
    }
}

fn decrement<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

pub fn now_millis() -> UnixMillis {
    UnixMillis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

pub fn hash_token(token: &OrderToken) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub struct OrderEngine {
    node_id: NodeId,
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    config: OrdersConfig,
    state: Mutex<State>,
    /// Delivered orders whose batch is applied but maybe not yet durable: lookups wait for them.
    pending_durable: Mutex<HashSet<OrderId>>,
    metrics: Arc<OrderMetrics>,
}

impl OrderEngine {
    /// Rebuilds the in-memory state from the store. Reservations that expired while the node was
    /// down are expired here, before the node serves anything.
    pub async fn open(
        node_id: NodeId,
        store: Arc<Store>,
        catalog: Arc<Catalog>,
        config: OrdersConfig,
        metrics: Arc<OrderMetrics>,
    ) -> Result<Self, StoreError> {
        let state = load_state(&store, &config)?;
        metrics.open_reservations.set(state.open.len() as i64);
        let engine = OrderEngine {
            node_id,
            store,
            catalog,
            config,
            state: Mutex::new(state),
            pending_durable: Mutex::new(HashSet::new()),
            metrics,
        };
        engine.expire_due(now_millis()).await?;
        Ok(engine)
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<OrderMetrics> {
        &self.metrics
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.config.reservation_ttl_secs)
    }

    /// Keys of `sku` sellable now.
    pub fn stock(&self, sku: &Sku) -> usize {
        self.state.lock().inventory.sellable(sku, Instant::now())
    }

    pub fn open_reservations(&self) -> usize {
        self.state.lock().open.len()
    }

    /// (slice id, sku, epoch, lease deadline, live, available) for status pages and metrics.
    pub fn leases(&self) -> Vec<(SliceId, Sku, u64, UnixMillis, bool, usize)> {
        let now = Instant::now();
        let state = self.state.lock();
        state
            .inventory
            .slices()
            .map(|(id, l)| (*id, l.sku.clone(), l.epoch.0, l.lease_deadline, l.is_live(now), l.available))
            .collect()
    }

    pub async fn create_order(&self, request: CreateOrder) -> Result<CreatedOrder, OrderError> {
        let product = self.catalog.get(&request.sku).ok_or_else(|| OrderError::UnknownSku(request.sku.to_string()))?;
        if request.quantity == 0 || request.quantity > self.config.max_quantity {
            return Err(OrderError::BadQuantity { max: self.config.max_quantity });
        }
        let price = match request.currency {
            Some(currency) => product.prices.iter().find(|p| p.currency == currency).copied().ok_or_else(|| {
                OrderError::UnsupportedCurrency { sku: request.sku.to_string(), currency: currency.to_string() }
            })?,
            None => *product.prices.first().ok_or_else(|| OrderError::UnknownSku(request.sku.to_string()))?,
        };
        let amount_minor = price
            .amount_minor
            .checked_mul(u64::from(request.quantity))
            .ok_or(OrderError::BadQuantity { max: self.config.max_quantity })?;
        let email = request.email.as_deref().map(normalize_email).transpose()?;
        let ip = limit_key(request.client_ip);
        let token = OrderToken::random();
        let now = now_millis();

        let record = {
            let mut state = self.state.lock();
            if state.open_per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_open_per_ip {
                self.metrics.reservation_cap_hits.inc();
                return Err(OrderError::TooManyOpen { who: "address" });
            }
            if let Some(email) = &email {
                if state.open_per_email.get(email).copied().unwrap_or(0) >= self.config.max_open_per_email {
                    self.metrics.reservation_cap_hits.inc();
                    return Err(OrderError::TooManyOpen { who: "email" });
                }
            }
            let Some(taken) = state.inventory.take(&request.sku, request.quantity as usize, Instant::now()) else {
                self.metrics.sold_out.inc();
                return Err(OrderError::SoldOut { sku: request.sku.to_string() });
            };
            let key_ids: Vec<KeyId> = taken.iter().map(|(k, _)| *k).collect();
            let expires_at = now.saturating_add_ms(self.config.reservation_ttl_secs.saturating_mul(1000));
            let record = OrderRecord {
                id: OrderId::random(),
                sku: request.sku.clone(),
                quantity: request.quantity,
                amount_minor,
                currency: price.currency.to_string(),
                channel: request.channel.clone(),
                token_sha256: hash_token(&token),
                email: email.clone(),
                client_ip: request.client_ip,
                status: OrderStatus::Reserved,
                created_at: now,
                expires_at,
                key_ids: key_ids.clone(),
                secrets: Vec::new(),
                payment: None,
                delivered_at: None,
                payment_attempt: None,
            };
            let mut batch = WriteBatch::default();
            batch.put(record::order_key(&record.id), record.encode());
            batch.put(record::open_key(&record.id), expires_at.0.to_be_bytes().to_vec());
            // Awaiting payment confirmation until a callback or compensation settles it.
            batch.put(record::confirm_key(&record.id), now.0.to_be_bytes().to_vec());
            let event = OrderEventKind::Reserved {
                key_ids: key_ids.clone(),
                quantity: request.quantity,
                amount_minor,
                currency: record.currency.clone(),
                expires_at,
            };
            state.push_event(&mut batch, &self.node_id, &record, now, event);
            if let Err(e) = self.store.apply(batch) {
                for (key, slice) in taken {
                    state.inventory.put(&request.sku, key, slice);
                }
                return Err(e.into());
            }
            state.open.insert(
                record.id,
                OpenReservation { sku: request.sku.clone(), key_ids, expires_at, ip, email: email.clone() },
            );
            state.expiry.insert((expires_at, record.id));
            state.count_open(ip, email.as_ref());
            record
        };
        self.metrics.open_reservations.add(1);
        self.metrics.created.inc();
        self.store.durable().await?;
        tracing::info!(order = %record.id, sku = %record.sku, quantity = record.quantity, "order reserved");
        Ok(CreatedOrder { record, token })
    }

    /// The order, if `token` is its token. Unknown id and wrong token look the same to the caller,
    /// so order ids cannot be probed. Keys are returned only from a durable Delivered record.
    pub async fn lookup(&self, id: &OrderId, token: &OrderToken) -> Result<OrderRecord, OrderError> {
        let raw = self.store.get(&record::order_key(id))?.ok_or(OrderError::NotFound)?;
        let record = OrderRecord::decode(&raw)?;
        let presented = hash_token(token);
        if !bool::from(presented.as_bytes().ct_eq(record.token_sha256.as_bytes())) {
            return Err(OrderError::NotFound);
        }
        if record.status == OrderStatus::Delivered && self.pending_durable.lock().contains(id) {
            self.store.durable().await?;
        }
        Ok(record)
    }

    /// Loads an order without a token, for payment channels (which bind callbacks to orders).
    pub fn order_for_payment(&self, id: &OrderId) -> Result<OrderRecord, OrderError> {
        let raw = self.store.get(&record::order_key(id))?.ok_or(OrderError::NotFound)?;
        Ok(OrderRecord::decode(&raw)?)
    }

    /// Records a verified payment and delivers. Returns only once the outcome is durable, so the
    /// provider sees success only for payments the node cannot lose.
    pub async fn confirm_payment(&self, payment: PaymentConfirmation) -> Result<PaymentOutcome, OrderError> {
        let callback_key = record::callback_key(&payment.channel, &payment.provider_txn);
        let outcome = {
            let mut state = self.state.lock();
            if self.store.get(&callback_key)?.is_some() {
                drop(state);
                // Seen before: make sure what we answered then is durable, then answer the same.
                self.store.durable().await?;
                return Ok(PaymentOutcome::AlreadyRecorded);
            }
            let raw = self.store.get(&record::order_key(&payment.order_id))?.ok_or(OrderError::NotFound)?;
            let mut order = OrderRecord::decode(&raw)?;
            if payment.amount_minor != order.amount_minor {
                return Err(OrderError::PaymentMismatch("amount"));
            }
            if payment.currency != order.currency {
                return Err(OrderError::PaymentMismatch("currency"));
            }
            let now = now_millis();
            let mut batch = WriteBatch::default();
            batch.put(callback_key, order.id.as_bytes().to_vec());
            let paid = PaymentRecord {
                channel: payment.channel.clone(),
                provider_txn: payment.provider_txn.clone(),
                amount_minor: payment.amount_minor,
                currency: payment.currency.clone(),
                paid_at: now,
            };
            let outcome = match order.status {
                OrderStatus::Delivered | OrderStatus::PaidAwaitingStock => {
                    self.metrics.duplicate_payments.inc();
                    tracing::warn!(order = %order.id, channel = %payment.channel, "second payment for a settled order; refund needed");
                    PaymentOutcome::DuplicatePayment
                }
                OrderStatus::Reserved | OrderStatus::Expired => {
                    let paid_event = OrderEventKind::Paid {
                        channel: paid.channel.clone(),
                        provider_txn: paid.provider_txn.clone(),
                        amount_minor: paid.amount_minor,
                        currency: paid.currency.clone(),
                    };
                    state.push_event(&mut batch, &self.node_id, &order, now, paid_event);
                    order.payment = Some(paid);
                    batch.delete(record::confirm_key(&order.id));
                    let held =
                        if order.status == OrderStatus::Reserved { state.close_reservation(&order.id) } else { None };
                    if held.is_some() {
                        batch.delete(record::open_key(&order.id));
                        self.metrics.open_reservations.add(-1);
                    }
                    let keys = match held {
                        Some(held) if self.keys_still_sellable(&state, &held) => Some(held.key_ids),
                        held => {
                            // The reservation ended (or its lease did): its keys go back, and the
                            // order competes for stock like a new one.
                            if let Some(held) = held {
                                self.return_keys(&mut state, &held.sku, &held.key_ids)?;
                            }
                            state
                                .inventory
                                .take(&order.sku, order.quantity as usize, Instant::now())
                                .map(|taken| taken.into_iter().map(|(k, _)| k).collect())
                        }
                    };
                    match keys {
                        Some(keys) => {
                            self.deliver(&mut state, &mut batch, &mut order, keys, now)?;
                            PaymentOutcome::Delivered
                        }
                        None => {
                            order.status = OrderStatus::PaidAwaitingStock;
                            order.key_ids.clear();
                            let seq = state.next_seq;
                            state.push_event(
                                &mut batch,
                                &self.node_id,
                                &order,
                                now,
                                OrderEventKind::AwaitingStock { quantity: order.quantity },
                            );
                            batch.put(record::awaiting_key(seq), order.id.as_bytes().to_vec());
                            state.awaiting.entry(order.sku.clone()).or_default().push_back((seq, order.id));
                            self.metrics.awaiting_stock.inc();
                            PaymentOutcome::AwaitingStock
                        }
                    }
                }
            };
            if outcome != PaymentOutcome::DuplicatePayment {
                batch.put(record::order_key(&order.id), order.encode());
            }
            self.store.apply(batch)?;
            outcome
        };
        let durable = self.store.durable().await;
        self.pending_durable.lock().remove(&payment.order_id);
        durable?;
        match outcome {
            PaymentOutcome::Delivered => {
                self.metrics.delivered.inc();
                tracing::info!(order = %payment.order_id, channel = %payment.channel, "order paid and delivered");
            }
            PaymentOutcome::AwaitingStock => {
                tracing::warn!(order = %payment.order_id, "order paid after its reservation ended and no stock is left: awaiting stock");
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// Records on an unpaid order that its payment was created at `attempt.channel` (with the
    /// provider's handle and pay link when it has them). One batch under the engine lock, durable
    /// before returning, so the pay link is never shown for a payment compensation cannot find.
    pub async fn record_payment_attempt(&self, id: &OrderId, attempt: PaymentAttempt) -> Result<(), OrderError> {
        {
            let _state = self.state.lock();
            let raw = self.store.get(&record::order_key(id))?.ok_or(OrderError::NotFound)?;
            let mut order = OrderRecord::decode(&raw)?;
            if !matches!(order.status, OrderStatus::Reserved | OrderStatus::Expired) {
                // Settled meanwhile (a fast callback): nothing to record.
                return Ok(());
            }
            order.channel = attempt.channel.clone();
            order.payment_attempt = Some(attempt);
            let mut batch = WriteBatch::default();
            batch.put(record::order_key(id), order.encode());
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        Ok(())
    }

    /// Orders awaiting payment confirmation (the compensation index), with their creation time.
    pub fn awaiting_confirmation(&self) -> Result<Vec<(OrderId, UnixMillis)>, StoreError> {
        let mut out = Vec::new();
        for item in self.store.scan_prefix(record::CONFIRM) {
            let (key, value) = item?;
            let corrupt = |reason: &str| StoreError::Corrupt { key: "p/".into(), reason: reason.into() };
            let id = record::order_id_from(&key[record::CONFIRM.len()..]).ok_or_else(|| corrupt("bad order id"))?;
            let at = record::be_u64(&value).ok_or_else(|| corrupt("bad time"))?;
            out.push((id, UnixMillis(at)));
        }
        Ok(out)
    }

    /// Takes an order off the compensation index (settled, failed at the provider, or given up).
    /// Losing this write in a crash only means one more query after restart.
    pub fn drop_awaiting_confirmation(&self, id: &OrderId) -> Result<(), StoreError> {
        let _state = self.state.lock();
        let mut batch = WriteBatch::default();
        batch.delete(record::confirm_key(id));
        self.store.apply(batch)
    }

    /// Ends an unpaid reservation at once (no payment could be created for it): its keys go back
    /// on sale and it leaves the compensation index. Returns whether it was open.
    pub async fn cancel_unpaid(&self, id: &OrderId) -> Result<bool, StoreError> {
        let now = now_millis();
        {
            let mut state = self.state.lock();
            let mut batch = WriteBatch::default();
            let Some(held) = self.end_reservation(&mut state, &mut batch, id, now)? else { return Ok(false) };
            batch.delete(record::confirm_key(id));
            if let Err(e) = self.store.apply(batch) {
                // Not applied: the reservation stays open and expires by its TTL.
                state.expiry.insert((held.expires_at, *id));
                state.count_open(held.ip, held.email.as_ref());
                state.open.insert(*id, held);
                return Err(e);
            }
            self.return_keys(&mut state, &held.sku, &held.key_ids)?;
        }
        self.metrics.expired.inc();
        self.metrics.open_reservations.add(-1);
        self.store.durable().await?;
        Ok(true)
    }

    /// Closes an open reservation into `batch`: marker removed, order Expired, event queued. The
    /// caller applies the batch and then returns the keys. `None` if it was not open.
    fn end_reservation(
        &self,
        state: &mut State,
        batch: &mut WriteBatch,
        id: &OrderId,
        now: UnixMillis,
    ) -> Result<Option<OpenReservation>, StoreError> {
        let Some(held) = state.close_reservation(id) else { return Ok(None) };
        batch.delete(record::open_key(id));
        if let Some(raw) = self.store.get(&record::order_key(id))? {
            let mut order = OrderRecord::decode(&raw)?;
            order.status = OrderStatus::Expired;
            batch.put(record::order_key(id), order.encode());
            let event = OrderEventKind::Expired { key_ids: held.key_ids.clone() };
            state.push_event(batch, &self.node_id, &order, now, event);
        }
        Ok(Some(held))
    }

    fn keys_still_sellable(&self, state: &State, held: &OpenReservation) -> bool {
        let now = now_millis();
        if held.expires_at <= now {
            return false;
        }
        // Every held key's slice must still be under a live lease: a node never sells outside one.
        let instant = Instant::now();
        held.key_ids.iter().all(|key| {
            self.store
                .get(&record::key_key(&held.sku, *key))
                .ok()
                .flatten()
                .and_then(|raw| record::decode_key_value(&raw).map(|(slice, _)| slice))
                .and_then(|slice| state.inventory.slice(slice))
                .is_some_and(|lease| lease.is_live(instant))
        })
    }

    /// Moves `keys` into `order` as Delivered: secrets copied into the record, the keys removed
    /// from the sellable set and tombstoned, all in `batch`.
    fn deliver(
        &self,
        state: &mut State,
        batch: &mut WriteBatch,
        order: &mut OrderRecord,
        keys: Vec<KeyId>,
        now: UnixMillis,
    ) -> Result<(), OrderError> {
        let mut secrets = Vec::with_capacity(keys.len());
        for key in &keys {
            let raw = self.store.get(&record::key_key(&order.sku, *key))?.ok_or_else(|| StoreError::Corrupt {
                key: format!("k/{}/{}", order.sku, key),
                reason: "reserved key is missing".into(),
            })?;
            let secret = record::decode_key_value(&raw)
                .and_then(|(_, bytes)| std::str::from_utf8(bytes).ok())
                .and_then(|s| Secret::new(s.to_string()).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("k/{}/{}", order.sku, key),
                    reason: "bad key value".into(),
                })?;
            secrets.push(secret);
            batch.delete(record::key_key(&order.sku, *key));
            batch.put(record::sold_key(&order.sku, *key), order.id.as_bytes().to_vec());
        }
        order.status = OrderStatus::Delivered;
        order.key_ids = keys.clone();
        order.secrets = secrets;
        order.delivered_at = Some(now);
        state.push_event(batch, &self.node_id, order, now, OrderEventKind::Delivered { key_ids: keys });
        self.pending_durable.lock().insert(order.id);
        Ok(())
    }

    fn return_keys(&self, state: &mut State, sku: &Sku, keys: &[KeyId]) -> Result<(), StoreError> {
        for key in keys {
            if let Some(raw) = self.store.get(&record::key_key(sku, *key))? {
                if let Some((slice, _)) = record::decode_key_value(&raw) {
                    state.inventory.put(sku, *key, slice);
                }
            }
        }
        Ok(())
    }

    /// Expires reservations whose TTL has passed; their keys go back on sale. Returns how many.
    pub async fn expire_due(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let expired = {
            let mut state = self.state.lock();
            let due: Vec<OrderId> = state.expiry.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| *id).collect();
            if due.is_empty() {
                return Ok(0);
            }
            let mut batch = WriteBatch::default();
            let mut returned = Vec::new();
            for id in &due {
                let Some(held) = self.end_reservation(&mut state, &mut batch, id, now)? else { continue };
                returned.push(held);
            }
            self.store.apply(batch)?;
            for held in &returned {
                self.return_keys(&mut state, &held.sku, &held.key_ids)?;
            }
            returned.len()
        };
        self.metrics.expired.add(expired as u64);
        self.metrics.open_reservations.add(-(expired as i64));
        tracing::info!(count = expired, "reservations expired");
        self.store.durable().await?;
        Ok(expired)
    }

    /// Installs a verified grant: new slice, or a lease renewal of one already held. Orders paid
    /// while out of stock are filled first, in payment order.
    pub async fn install_grant(&self, grant: SliceGrant) -> Result<GrantOutcome, GrantInstallError> {
        let now = now_millis();
        if grant.lease_deadline <= now {
            return Err(GrantInstallError::Expired);
        }
        let sells_until = self.sells_until(grant.lease_deadline, now);
        let lease = SliceLease {
            sku: grant.sku.clone(),
            epoch: grant.epoch,
            lease_deadline: grant.lease_deadline,
            sells_until,
            available: 0,
        };
        let mut delivered = Vec::new();
        let outcome = {
            let mut state = self.state.lock();
            let slice_key = record::slice_key(grant.slice_id);
            if let Some(raw) = self.store.get(&slice_key)? {
                let meta: SliceMeta = serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt { key: format!("g/{}", grant.slice_id), reason: e.to_string() })?;
                if grant.epoch < meta.epoch {
                    return Err(GrantInstallError::StaleEpoch {
                        slice: grant.slice_id,
                        offered: grant.epoch.0,
                        installed: meta.epoch.0,
                    });
                }
                if meta.sku != grant.sku || meta.keys_digest != record::keys_digest(&grant.keys) {
                    return Err(GrantInstallError::ChangedSlice { slice: grant.slice_id });
                }
                if grant.epoch == meta.epoch && grant.lease_deadline == meta.lease_deadline {
                    return Ok(GrantOutcome::AlreadyInstalled);
                }
                let renewed = SliceMeta { epoch: grant.epoch, lease_deadline: grant.lease_deadline, ..meta };
                let mut batch = WriteBatch::default();
                batch.put(slice_key, serde_json::to_vec(&renewed).unwrap_or_default());
                self.store.apply(batch)?;
                state.inventory.upsert_slice(grant.slice_id, lease.clone());
                GrantOutcome::Renewed
            } else {
                for key in &grant.keys {
                    if state.inventory.contains(&grant.sku, key.key_id)
                        || self.store.get(&record::sold_key(&grant.sku, key.key_id))?.is_some()
                        || self.store.get(&record::key_key(&grant.sku, key.key_id))?.is_some()
                    {
                        return Err(GrantInstallError::KeyConflict { slice: grant.slice_id, key: key.key_id });
                    }
                }
                let meta = SliceMeta {
                    slice_id: grant.slice_id,
                    sku: grant.sku.clone(),
                    epoch: grant.epoch,
                    issued_at: grant.issued_at,
                    lease_deadline: grant.lease_deadline,
                    key_count: grant.keys.len(),
                    keys_digest: record::keys_digest(&grant.keys),
                };
                let mut batch = WriteBatch::default();
                batch.put(slice_key, serde_json::to_vec(&meta).unwrap_or_default());
                for key in &grant.keys {
                    batch.put(
                        record::key_key(&grant.sku, key.key_id),
                        record::encode_key_value(grant.slice_id, &key.secret),
                    );
                }
                self.store.apply(batch)?;
                state.inventory.upsert_slice(grant.slice_id, lease.clone());
                for key in &grant.keys {
                    state.inventory.put(&grant.sku, key.key_id, grant.slice_id);
                }
                GrantOutcome::Installed { keys: grant.keys.len(), filled_awaiting: 0 }
            }
        };
        let filled = self.fill_awaiting(&grant.sku, &mut delivered).map_err(|e| match e {
            OrderError::Store(e) => GrantInstallError::Store(e),
            other => {
                GrantInstallError::Store(StoreError::Corrupt { key: "awaiting".into(), reason: other.to_string() })
            }
        })?;
        let durable = self.store.durable().await;
        let mut pending = self.pending_durable.lock();
        for id in &delivered {
            pending.remove(id);
        }
        drop(pending);
        durable?;
        self.metrics.grants_installed.inc();
        self.metrics.delivered.add(delivered.len() as u64);
        tracing::info!(slice = %grant.slice_id, sku = %grant.sku, epoch = grant.epoch.0, keys = grant.keys.len(), filled, "grant installed");
        Ok(match outcome {
            GrantOutcome::Installed { keys, .. } => GrantOutcome::Installed { keys, filled_awaiting: filled },
            other => other,
        })
    }

    fn sells_until(&self, lease_deadline: UnixMillis, now: UnixMillis) -> Instant {
        let remaining = lease_deadline.0.saturating_sub(now.0);
        let margin = self.config.lease_safety_margin_secs.saturating_mul(1000);
        Instant::now() + Duration::from_millis(remaining.saturating_sub(margin))
    }

    /// Delivers PaidAwaitingStock orders of `sku` while stock lasts, oldest payment first.
    fn fill_awaiting(&self, sku: &Sku, delivered: &mut Vec<OrderId>) -> Result<usize, OrderError> {
        let mut state = self.state.lock();
        let mut batch = WriteBatch::default();
        let now = now_millis();
        while let Some(&(seq, id)) = state.awaiting.get(sku).and_then(|q| q.front()) {
            let raw = self.store.get(&record::order_key(&id))?.ok_or(OrderError::NotFound)?;
            let mut order = OrderRecord::decode(&raw)?;
            let Some(taken) = state.inventory.take(sku, order.quantity as usize, Instant::now()) else { break };
            if let Some(queue) = state.awaiting.get_mut(sku) {
                queue.pop_front();
            }
            batch.delete(record::awaiting_key(seq));
            self.deliver(&mut state, &mut batch, &mut order, taken.into_iter().map(|(k, _)| k).collect(), now)?;
            batch.put(record::order_key(&id), order.encode());
            delivered.push(id);
        }
        if !batch.is_empty() {
            self.store.apply(batch)?;
        }
        Ok(delivered.len())
    }

    /// Signalled (with a stored permit, so no wake-up is lost) each time an outbox event is
    /// appended. The event's batch is applied once the engine lock is free; it may not be
    /// durable yet. Meant for one waiter: the sync link.
    pub fn outbox_notify(&self) -> Arc<tokio::sync::Notify> {
        self.state.lock().outbox_notify.clone()
    }

    /// The newest outbox seq (0 when nothing was ever written).
    pub fn outbox_newest(&self) -> u64 {
        self.state.lock().next_seq.saturating_sub(1)
    }

    /// Up to `max` outbox events with seq > `after`, ascending.
    pub fn outbox_after(&self, after: u64, max: usize) -> Result<Vec<OrderEvent>, StoreError> {
        let start = record::outbox_key(after.saturating_add(1));
        let mut events = Vec::new();
        for item in self.store.scan_prefix(record::OUTBOX) {
            let (key, value) = item?;
            if key.as_ref() < start.as_slice() {
                continue;
            }
            let event: OrderEvent = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Corrupt { key: "e/".into(), reason: e.to_string() })?;
            events.push(event);
            if events.len() >= max {
                break;
            }
        }
        Ok(events)
    }

    /// Sync progress as last stored: (events acknowledged through, control applied through).
    pub fn sync_progress(&self) -> Result<(u64, u64), StoreError> {
        let read = |key: &[u8]| -> Result<u64, StoreError> {
            Ok(self.store.get(key)?.and_then(|raw| record::be_u64(&raw)).unwrap_or(0))
        };
        Ok((read(record::SYNC_ACKED)?, read(record::CONTROL_APPLIED)?))
    }

    /// Drops acknowledged outbox entries and records the progress. Not awaited for durability:
    /// if it is lost in a crash the coordinator sees those events again and skips them.
    pub fn record_sync_ack(&self, acked_through: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for item in self.store.scan_prefix(record::OUTBOX) {
            let (key, _) = item?;
            match record::be_u64(&key[record::OUTBOX.len()..]) {
                Some(seq) if seq <= acked_through => batch.delete(key.to_vec()),
                _ => break,
            }
        }
        batch.put(record::SYNC_ACKED.to_vec(), acked_through.to_be_bytes().to_vec());
        self.store.apply(batch)
    }

    /// Records that control message `seq` was applied; durable before returning, so a restart
    /// does not apply it twice (applying a grant twice is harmless, but a catalog may be older).
    pub async fn record_control_applied(&self, seq: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(record::CONTROL_APPLIED.to_vec(), seq.to_be_bytes().to_vec());
        self.store.commit(batch).await
    }

    /// Orders paid but waiting for stock, oldest first.
    pub fn awaiting_stock(&self) -> Vec<(Sku, OrderId)> {
        let state = self.state.lock();
        let mut all: Vec<(u64, Sku, OrderId)> =
            state.awaiting.iter().flat_map(|(sku, q)| q.iter().map(|(seq, id)| (*seq, sku.clone(), *id))).collect();
        all.sort_by_key(|(seq, _, _)| *seq);
        all.into_iter().map(|(_, sku, id)| (sku, id)).collect()
    }
}

pub fn normalize_email(raw: &str) -> Result<String, OrderError> {
    let email = raw.trim().to_ascii_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.starts_with('.'))
        && email.chars().all(|c| !c.is_control() && !c.is_whitespace())
        && email.matches('@').count() == 1;
    if valid {
        Ok(email)
    } else {
        Err(OrderError::BadEmail)
    }
}

fn load_state(store: &Store, config: &OrdersConfig) -> Result<State, StoreError> {
    let mut state = State::default();
    let now = now_millis();
    let corrupt = |key: &str, reason: &str| StoreError::Corrupt { key: key.to_string(), reason: reason.to_string() };
    for item in store.scan_prefix(record::SLICE) {
        let (_, raw) = item?;
        let meta: SliceMeta = serde_json::from_slice(&raw).map_err(|e| corrupt("g/", &e.to_string()))?;
        let remaining = meta.lease_deadline.0.saturating_sub(now.0);
        let margin = config.lease_safety_margin_secs.saturating_mul(1000);
        let sells_until = Instant::now() + Duration::from_millis(remaining.saturating_sub(margin));
        state.inventory.upsert_slice(
            meta.slice_id,
            SliceLease {
                sku: meta.sku,
                epoch: meta.epoch,
                lease_deadline: meta.lease_deadline,
                sells_until,
                available: 0,
            },
        );
    }
    for item in store.scan_prefix(record::KEY) {
        let (key, value) = item?;
        let (sku, key_id) = record::parse_key_key(&key).ok_or_else(|| corrupt("k/", "bad key"))?;
        let (slice, _) = record::decode_key_value(&value).ok_or_else(|| corrupt("k/", "bad value"))?;
        state.inventory.put(&sku, key_id, slice);
    }
    for item in store.scan_prefix(record::OPEN) {
        let (key, _) = item?;
        let id = record::order_id_from(&key[record::OPEN.len()..]).ok_or_else(|| corrupt("x/", "bad order id"))?;
        let raw = store.get(&record::order_key(&id))?.ok_or_else(|| corrupt("x/", "open marker without order"))?;
        let order = OrderRecord::decode(&raw)?;
        if order.status != OrderStatus::Reserved {
            continue;
        }
        for key in &order.key_ids {
            state.inventory.remove(&order.sku, *key);
        }
        let ip = limit_key(order.client_ip);
        state.count_open(ip, order.email.as_ref());
        state.expiry.insert((order.expires_at, id));
        state.open.insert(
            id,
            OpenReservation {
                sku: order.sku,
                key_ids: order.key_ids,
                expires_at: order.expires_at,
                ip,
                email: order.email,
            },
        );
    }
    let mut awaiting: BTreeMap<u64, OrderId> = BTreeMap::new();
    for item in store.scan_prefix(record::AWAITING) {
        let (key, value) = item?;
        let seq = record::be_u64(&key[record::AWAITING.len()..]).ok_or_else(|| corrupt("w/", "bad seq"))?;
        let id = record::order_id_from(&value).ok_or_else(|| corrupt("w/", "bad order id"))?;
        awaiting.insert(seq, id);
    }
    for (seq, id) in awaiting {
        let raw = store.get(&record::order_key(&id))?.ok_or_else(|| corrupt("w/", "awaiting marker without order"))?;
        let order = OrderRecord::decode(&raw)?;
        state.awaiting.entry(order.sku).or_default().push_back((seq, id));
    }
    state.next_seq = match store.get(record::NEXT_SEQ)? {
        Some(raw) => record::be_u64(&raw).ok_or_else(|| corrupt("m/next_seq", "bad value"))?,
        None => 1,
    };
    Ok(state)
}
