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
    lease, Epoch, Holdings, KeyId, LeaseRenewal, NodeId, OrderEvent, OrderEventKind, OrderId, OrderToken,
    RefusedControl, Secret, Sku, SliceGrant, SliceHolding, SliceId, UnixMillis,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::binding::{self, Binding};
use super::record::{
    self, OrderRecord, OrderStatus, PaymentAttempt, PaymentProblem, PaymentProblemKind, PaymentRecord, SliceMeta,
};
use crate::catalog::Catalog;
use crate::config::{Currency, OrdersConfig, ProductConfig};
use crate::limiter::{limit_key, LimitKey};
use crate::metrics::OrderMetrics;
use crate::store::{Health, Store, StoreError, WriteBatch};

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
    /// Stock is there, but the node has as many sales unacknowledged by the coordinator as its
    /// take window allows (it is cut off, or syncing behind): retry shortly.
    #[error("stock for {sku} is waiting for the coordinator to acknowledge recent sales; retry shortly")]
    StockSyncing { sku: String },
    #[error("too many unpaid orders for this {who}; pay or let one expire first")]
    TooManyOpen { who: &'static str },
    #[error("order not found")]
    NotFound,
    /// A provider's field the node cannot store or report (see `binding::check_fields`).
    #[error("invalid payment: bad {0}")]
    InvalidPayment(&'static str),
    #[error("the order already has {max} payment attempts")]
    TooManyAttempts { max: usize },
    #[error("cannot refund this order: {0}")]
    NotRefundable(&'static str),
    /// The node restarted and the coordinator has not yet confirmed its data dir: it writes no
    /// events (no sales, payments or expiries) until then, so that a data dir restored from an
    /// older copy cannot resell keys. Retry shortly.
    #[error("the node is starting and waiting for the coordinator to confirm its data; retry shortly")]
    AwaitingCoordinator,
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
    /// The provider's reference of the payment it was made through (a Stripe Checkout Session),
    /// when the provider gives one: it must be one of the order's attempts.
    pub provider_ref: Option<String>,
    /// The provider's id of the money movement, when it differs from `provider_txn` (a Stripe
    /// PaymentIntent): refunds and disputes name it.
    pub provider_payment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    Delivered,
    AwaitingStock,
    /// The same (channel, transaction) was seen before: nothing changed.
    AlreadyRecorded,
    /// A second, different payment for a settled order: recorded, needs a refund.
    DuplicatePayment,
    /// It paid nothing (matched none of the order's attempts, paid another order already, or the
    /// wrong amount): recorded durably, counted and logged, reported to the ledger.
    Problem(PaymentProblemKind),
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
    /// The seq of its `Reserved` event while the coordinator has not acknowledged it: its takes
    /// count against their slices' windows under that seq.
    seq: Option<u64>,
    expires_at: UnixMillis,
    ip: LimitKey,
    email: Option<String>,
}

#[derive(Default)]
pub(super) struct State {
    holdings: Holdings,
    open: HashMap<OrderId, OpenReservation>,
    expiry: BTreeSet<(UnixMillis, OrderId)>,
    open_per_ip: HashMap<LimitKey, u32>,
    open_per_email: HashMap<String, u32>,
    /// PaidAwaitingStock orders per sku, oldest first: (queue seq, order).
    pub(super) awaiting: HashMap<Sku, VecDeque<(u64, OrderId)>>,
    next_seq: u64,
    /// Whether events may be written: always for a standalone node; for a node with a coordinator,
    /// once it has confirmed this data dir since the process started.
    confirmed: bool,
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

    /// Appends an outbox event about `order` to `batch`; the caller applies the batch under the
    /// same lock. Returns the event's seq.
    pub(super) fn push_event(
        &mut self,
        batch: &mut WriteBatch,
        node: &NodeId,
        order: &OrderRecord,
        at: UnixMillis,
        kind: OrderEventKind,
    ) -> Result<u64, StoreError> {
        self.push_outbox(batch, node, order.id, &order.sku, at, kind)
    }

    fn push_outbox(
        &mut self,
        batch: &mut WriteBatch,
        node: &NodeId,
        order_id: OrderId,
        sku: &Sku,
        at: UnixMillis,
        kind: OrderEventKind,
    ) -> Result<u64, StoreError> {
        debug_assert!(self.confirmed, "an event written before the coordinator confirmed the data dir");
        let seq = self.next_seq;
        let event = OrderEvent { node_id: node.clone(), seq, at, order_id, sku: sku.clone(), kind };
        // Encoded before the seq is taken, so a failure leaves no gap.
        let encoded = record::encode_event(&event)?;
        self.next_seq += 1;
        batch.put(record::outbox_key(seq), encoded);
        batch.put(record::NEXT_SEQ.to_vec(), self.next_seq.to_be_bytes().to_vec());
        self.outbox_notify.notify_one();
        Ok(seq)
    }

    /// Reports keys of a slice as durably dropped (same batch as their removal).
    fn push_released(
        &mut self,
        batch: &mut WriteBatch,
        node: &NodeId,
        slice: SliceId,
        released: Released,
    ) -> Result<(), StoreError> {
        let kind = OrderEventKind::Released {
            slice_id: slice,
            epoch: released.epoch,
            ticket: released.ticket,
            key_ids: released.keys,
        };
        self.push_outbox(batch, node, OrderId::NONE, &released.sku, now_millis(), kind).map(drop)
    }
}

/// Takes of an unpaid reservation that ended before the coordinator acknowledged it leave their
/// slices' windows (see `Holdings::forget_takes`): unpaid orders cannot freeze a node that is cut
/// off from the coordinator.
fn forget_unrevealed_takes(state: &mut State, seq: Option<u64>, back: &[(KeyId, SliceId)]) {
    let Some(seq) = seq else { return };
    let mut per_slice: BTreeMap<SliceId, u64> = BTreeMap::new();
    for (_, slice) in back {
        *per_slice.entry(*slice).or_default() += 1;
    }
    for (slice, n) in per_slice {
        state.holdings.forget_takes(seq, slice, n);
    }
}

/// A fill's failure where only store errors are expected.
fn store_error(e: OrderError) -> StoreError {
    match e {
        OrderError::Store(e) => e,
        other => StoreError::Corrupt { key: "awaiting".into(), reason: other.to_string() },
    }
}

/// Keys of one slice being dropped, and the ticket and epoch they answer to.
struct Released {
    sku: Sku,
    epoch: Epoch,
    ticket: u64,
    keys: Vec<KeyId>,
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
    pub(super) node_id: NodeId,
    pub(super) store: Arc<Store>,
    catalog: Arc<Catalog>,
    config: OrdersConfig,
    pub(super) state: Mutex<State>,
    /// Delivered orders whose batch is applied but maybe not yet durable: lookups wait for them.
    pending_durable: Mutex<HashSet<OrderId>>,
    pub(super) metrics: Arc<OrderMetrics>,
    /// Origin of the node's monotonic milliseconds, which leases are measured on.
    clock_base: Instant,
    /// The data dir's id, made when it was created (see `edgecard_protocol::sync`).
    incarnation: u64,
    /// Told the client of each reservation that expires unpaid (churn, for `crate::abuse`).
    expiry_observer: std::sync::OnceLock<ExpiryObserver>,
    /// Set when `[mail]` is configured: orders with an address queue their mails.
    pub(super) mail: std::sync::OnceLock<crate::mail::Queueing>,
    /// Orders by address, for "find my order" (`email_index.rs`).
    pub(super) email_index: super::email_index::EmailIndex,
    /// "Find my order" rate limits and the lookups waiting for the next sync upload (`find.rs`).
    pub(super) finder: crate::mail::find::Finder,
}

/// See [`OrderEngine::observe_expiries`].
pub type ExpiryObserver = Box<dyn Fn(LimitKey) + Send + Sync>;

/// How the engine starts: selling at once (a standalone node, stocked from grant files), or
/// waiting for the coordinator to confirm its data dir first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    Standalone,
    AwaitCoordinator,
}

/// A slice as the node holds it, for status pages, metrics and the sync link's stock report.
#[derive(Debug, Clone)]
pub struct SliceStatus {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub epoch: u64,
    pub lease_deadline: UnixMillis,
    /// Open, under a live lease: new sales may come from it.
    pub selling: bool,
    pub lease_live: bool,
    pub closed: bool,
    pub available: usize,
    pub unacked_takes: u64,
    pub take_window: u64,
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
        Self::open_with(node_id, store, catalog, config, metrics, Startup::Standalone).await
    }

    /// [`OrderEngine::open`], choosing how to start. Awaiting the coordinator, expiries wait too.
    pub async fn open_with(
        node_id: NodeId,
        store: Arc<Store>,
        catalog: Arc<Catalog>,
        config: OrdersConfig,
        metrics: Arc<OrderMetrics>,
        startup: Startup,
    ) -> Result<Self, StoreError> {
        let clock_base = Instant::now();
        let incarnation = load_or_make_incarnation(&store).await?;
        let email_index = super::email_index::EmailIndex::load_or_create(&store).await?;
        let mut state = load_state(&store, &config, 0)?;
        state.confirmed = startup == Startup::Standalone;
        metrics.open_reservations.set(state.open.len() as i64);
        let engine = OrderEngine {
            node_id,
            store,
            catalog,
            config,
            state: Mutex::new(state),
            pending_durable: Mutex::new(HashSet::new()),
            metrics,
            clock_base,
            incarnation,
            expiry_observer: std::sync::OnceLock::new(),
            mail: std::sync::OnceLock::new(),
            email_index,
            finder: crate::mail::find::Finder::new(),
        };
        engine.expire_due(now_millis()).await?;
        Ok(engine)
    }

    /// Sets the function told the client (limiter key) of every reservation that expires unpaid
    /// from now on. Only the first call counts.
    pub fn observe_expiries(&self, observer: ExpiryObserver) {
        let _ = self.expiry_observer.set(observer);
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether the engine may write events (sell, take payments, expire).
    pub fn is_confirmed(&self) -> bool {
        self.state.lock().confirmed
    }

    pub(super) fn ensure_confirmed(&self) -> Result<(), OrderError> {
        if self.is_confirmed() {
            Ok(())
        } else {
            Err(OrderError::AwaitingCoordinator)
        }
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

    /// Replaces the catalog with one from the coordinator, durably first: the coordinator sends
    /// a catalog once, so a restart must find it here (see [`stored_catalog`]).
    pub async fn replace_catalog(&self, products: Vec<ProductConfig>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(record::CATALOG.to_vec(), edgecard_store::record::encode("catalog", &products)?);
        self.store.commit(batch).await?;
        self.catalog.replace(products);
        Ok(())
    }

    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.config.reservation_ttl_secs)
    }

    /// Milliseconds of the node's monotonic clock since the engine opened.
    fn mono_ms(&self) -> u64 {
        u64::try_from(self.clock_base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Keys of `sku` sellable now.
    pub fn stock(&self, sku: &Sku) -> usize {
        let now = self.mono_ms();
        self.state.lock().holdings.sellable(sku, now)
    }

    pub fn open_reservations(&self) -> usize {
        self.state.lock().open.len()
    }

    /// Every slice held, for status pages, metrics and the stock report.
    pub fn leases(&self) -> Vec<SliceStatus> {
        let now = self.mono_ms();
        let state = self.state.lock();
        state
            .holdings
            .slices()
            .map(|(id, s)| SliceStatus {
                slice_id: *id,
                sku: s.sku.clone(),
                epoch: s.epoch.0,
                lease_deadline: s.lease_deadline,
                selling: s.sells(now),
                lease_live: s.lease_live(now),
                closed: s.closed.is_some(),
                available: s.available,
                unacked_takes: s.unacked_takes,
                take_window: s.take_window,
            })
            .collect()
    }

    /// Turns on order mail: from now on, orders with an address queue their mails in the batch
    /// that creates them. Set once, at start.
    pub fn enable_mail(&self, queueing: crate::mail::Queueing) {
        let _ = self.mail.set(queueing);
    }

    pub async fn create_order(&self, request: CreateOrder) -> Result<CreatedOrder, OrderError> {
        self.create_order_in(request, None).await
    }

    /// [`OrderEngine::create_order`], with the buyer's language (`en`, `zh-CN`) for its mails.
    pub async fn create_order_in(
        &self,
        request: CreateOrder,
        mail_lang: Option<&str>,
    ) -> Result<CreatedOrder, OrderError> {
        self.ensure_confirmed()?;
        // No new reservations while the store cannot make them durable (503 at once).
        match self.store.health() {
            Health::Ok => {}
            Health::DiskFull => return Err(OrderError::Store(StoreError::DiskFull)),
            Health::Poisoned => {
                let reason = self.store.poison_reason().unwrap_or_default();
                return Err(OrderError::Store(StoreError::Poisoned { reason }));
            }
        }
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
            let mono = self.mono_ms();
            let Some(taken) = state.holdings.take(&request.sku, request.quantity as usize, mono) else {
                if state.holdings.sellable(&request.sku, mono) >= request.quantity as usize {
                    self.metrics.window_full.inc();
                    return Err(OrderError::StockSyncing { sku: request.sku.to_string() });
                }
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
                attempts: Vec::new(),
                refund: None,
                dispute: None,
            };
            let mut batch = WriteBatch::default();
            record::ORDERS.put(&mut batch, record.id.as_bytes(), &record)?;
            batch.put(record::open_key(&record.id), expires_at.0.to_be_bytes().to_vec());
            // Awaiting payment confirmation until a callback or compensation settles it.
            batch.put(record::confirm_key(&record.id), now.0.to_be_bytes().to_vec());
            let event = OrderEventKind::Reserved {
                key_ids: key_ids.clone(),
                quantity: request.quantity,
                amount_minor,
                currency: record.currency.clone(),
                expires_at,
                token_sha256: record.token_sha256.clone(),
            };
            let seq = state.push_event(&mut batch, &self.node_id, &record, now, event)?;
            if let Some(email) = &record.email {
                batch.put(self.email_index.entry_key(email, &record.id), Vec::new());
            }
            let queued = match (&record.email, self.mail.get()) {
                (Some(_), Some(mail)) => mail.enqueue(&mut batch, &record.id, mail_lang, now),
                _ => Ok(()),
            };
            if let Err(e) = queued.and_then(|()| self.store.apply(batch)) {
                for (key, slice) in taken {
                    state.holdings.put(&request.sku, key, slice);
                }
                return Err(e.into());
            }
            state.holdings.record_takes(seq, &taken);
            state.open.insert(
                record.id,
                OpenReservation {
                    sku: request.sku.clone(),
                    key_ids,
                    seq: Some(seq),
                    expires_at,
                    ip,
                    email: email.clone(),
                },
            );
            state.expiry.insert((expires_at, record.id));
            state.count_open(ip, email.as_ref());
            record
        };
        self.metrics.open_reservations.inc();
        self.metrics.created.inc();
        self.store.durable().await?;
        tracing::info!(order = %record.id, sku = %record.sku, quantity = record.quantity, "order reserved");
        Ok(CreatedOrder { record, token })
    }

    /// The order, if `token` is its token. Unknown id and wrong token look the same to the caller,
    /// so order ids cannot be probed. Keys are returned only from a durable Delivered record.
    pub async fn lookup(&self, id: &OrderId, token: &OrderToken) -> Result<OrderRecord, OrderError> {
        let record = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
        let presented = hash_token(token);
        if !bool::from(presented.as_bytes().ct_eq(record.token_sha256.as_bytes())) {
            return Err(OrderError::NotFound);
        }
        self.durable_view(record).await
    }

    /// The order, for a caller that proved access another way (a verified return link). Like
    /// [`OrderEngine::lookup`], keys come only from a durable Delivered record.
    pub async fn lookup_authorized(&self, id: &OrderId) -> Result<OrderRecord, OrderError> {
        let record = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
        self.durable_view(record).await
    }

    async fn durable_view(&self, record: OrderRecord) -> Result<OrderRecord, OrderError> {
        if record.status == OrderStatus::Delivered && self.pending_durable.lock().contains(&record.id) {
            self.store.durable().await?;
        }
        Ok(record)
    }

    /// Loads an order without a token, for payment channels (which bind callbacks to orders).
    pub fn order_for_payment(&self, id: &OrderId) -> Result<OrderRecord, OrderError> {
        record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)
    }

    /// Records a verified payment and delivers. Returns only once the outcome is durable, so the
    /// provider sees success only for payments the node cannot lose.
    ///
    /// A payment that does not bind to the order (see [`binding::bind`]) delivers nothing: it is
    /// recorded under `v/` with an event for the ledger, counted and logged as an error, and
    /// answered [`PaymentOutcome::Problem`] (the same answer when the provider repeats it).
    pub async fn confirm_payment(&self, payment: PaymentConfirmation) -> Result<PaymentOutcome, OrderError> {
        binding::check_fields(&payment).map_err(OrderError::InvalidPayment)?;
        let callback_key = record::callback_key(&payment.channel, &payment.provider_txn);
        // The provider retries; by then the data dir is confirmed, or caught up. (A data dir is
        // fenced again only if the coordinator finds it behind, which a running node never is.)
        self.ensure_confirmed()?;
        let outcome = {
            let mut state = self.state.lock();
            let order = record::ORDERS.get(&self.store, payment.order_id.as_bytes())?.ok_or(OrderError::NotFound)?;
            let problem_id = record::problem_id(
                &payment.channel,
                &payment.provider_txn,
                &order.id,
                payment.amount_minor,
                &payment.currency,
            );
            let known_problem = record::PAYMENT_PROBLEMS.get(&self.store, &problem_id)?;
            let owner = self.store.get(&callback_key)?.and_then(|raw| record::order_id_from(&raw));
            let binding = match known_problem {
                Some(known) => Err(PaymentOutcome::Problem(known.kind)),
                None => match binding::bind(&order, &payment, owner) {
                    Binding::AlreadyRecorded => Err(PaymentOutcome::AlreadyRecorded),
                    Binding::Problem(kind) => {
                        self.record_problem(&mut state, &order, &payment, kind)?;
                        Err(PaymentOutcome::Problem(kind))
                    }
                    Binding::Pay => Ok(()),
                },
            };
            match binding {
                // Seen before, or a problem just recorded: answered once durable, below.
                Err(answer) => Err(answer),
                Ok(()) => self.settle_payment(&mut state, order, &payment, callback_key).map(Ok)?,
            }
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(answer) => {
                self.store.durable().await?;
                return Ok(answer);
            }
        };
        // Only a durable delivery leaves the pending set: after a failed flush the record in
        // memory is not on disk, and lookups must keep waiting (and fail) instead of revealing it.
        self.store.durable().await?;
        self.pending_durable.lock().remove(&payment.order_id);
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

    /// Binds a payment that [`binding::bind`] found to be the order's: delivers it, queues it for
    /// stock, or records it as a second payment of a settled order. One batch, applied under the
    /// lock; the caller waits for durability.
    fn settle_payment(
        &self,
        state: &mut State,
        mut order: OrderRecord,
        payment: &PaymentConfirmation,
        callback_key: Vec<u8>,
    ) -> Result<PaymentOutcome, OrderError> {
        let now = now_millis();
        let mut batch = WriteBatch::default();
        batch.put(callback_key, order.id.as_bytes().to_vec());
        if let Some(provider_payment) = &payment.provider_payment {
            // Refunds and disputes reported by the provider name this id.
            batch.put(record::provider_payment_key(&payment.channel, provider_payment), order.id.as_bytes().to_vec());
        }
        let paid = PaymentRecord {
            channel: payment.channel.clone(),
            provider_txn: payment.provider_txn.clone(),
            amount_minor: payment.amount_minor,
            currency: payment.currency.clone(),
            paid_at: now,
            provider_payment: payment.provider_payment.clone(),
        };
        let outcome = match order.status {
            OrderStatus::Delivered | OrderStatus::PaidAwaitingStock | OrderStatus::Refunded => {
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
                state.push_event(&mut batch, &self.node_id, &order, now, paid_event)?;
                order.payment = Some(paid);
                batch.delete(record::confirm_key(&order.id));
                let held =
                    if order.status == OrderStatus::Reserved { state.close_reservation(&order.id) } else { None };
                if held.is_some() {
                    batch.delete(record::open_key(&order.id));
                    self.metrics.open_reservations.dec();
                }
                // Keys held by the reservation, or freshly taken ones (which count against the
                // take window once their Delivered event has a seq).
                let (keys, fresh) = match held {
                    Some(held) if self.keys_still_sellable(state, &held) => (Some(held.key_ids), Vec::new()),
                    held => {
                        // The reservation ended (or its lease did): its keys go back, and the
                        // order competes for stock like a new one.
                        if let Some(held) = held {
                            let back = self.give_back(state, &mut batch, &held.sku, &held.key_ids)?;
                            for (key, slice) in back {
                                state.holdings.put(&held.sku, key, slice);
                            }
                        }
                        match state.holdings.take(&order.sku, order.quantity as usize, self.mono_ms()) {
                            Some(taken) => (Some(taken.iter().map(|(k, _)| *k).collect()), taken),
                            None => (None, Vec::new()),
                        }
                    }
                };
                match keys {
                    Some(keys) => {
                        let seq = self.deliver(state, &mut batch, &mut order, keys, now)?;
                        state.holdings.record_takes(seq, &fresh);
                        PaymentOutcome::Delivered
                    }
                    None => {
                        order.status = OrderStatus::PaidAwaitingStock;
                        order.key_ids.clear();
                        let seq = state.push_event(
                            &mut batch,
                            &self.node_id,
                            &order,
                            now,
                            OrderEventKind::AwaitingStock { quantity: order.quantity },
                        )?;
                        batch.put(record::awaiting_key(seq), order.id.as_bytes().to_vec());
                        state.awaiting.entry(order.sku.clone()).or_default().push_back((seq, order.id));
                        self.metrics.awaiting_stock.inc();
                        PaymentOutcome::AwaitingStock
                    }
                }
            }
        };
        if outcome != PaymentOutcome::DuplicatePayment {
            record::ORDERS.put(&mut batch, order.id.as_bytes(), &order)?;
        }
        self.store.apply(batch)?;
        Ok(outcome)
    }

    /// Records a verified payment that paid nothing (one batch: the problem and the ledger
    /// event), counts it and logs it as an error.
    fn record_problem(
        &self,
        state: &mut State,
        order: &OrderRecord,
        payment: &PaymentConfirmation,
        kind: PaymentProblemKind,
    ) -> Result<(), OrderError> {
        let now = now_millis();
        let problem = PaymentProblem {
            order_id: order.id,
            channel: payment.channel.clone(),
            provider_txn: payment.provider_txn.clone(),
            amount_minor: payment.amount_minor,
            currency: payment.currency.clone(),
            kind,
            at: now,
        };
        let mut batch = WriteBatch::default();
        let id = record::problem_id(
            &payment.channel,
            &payment.provider_txn,
            &order.id,
            payment.amount_minor,
            &payment.currency,
        );
        record::PAYMENT_PROBLEMS.put(&mut batch, &id, &problem)?;
        let event = match kind.unmatched() {
            Some(reason) => OrderEventKind::PaymentUnmatched {
                channel: problem.channel.clone(),
                provider_txn: problem.provider_txn.clone(),
                amount_minor: problem.amount_minor,
                currency: problem.currency.clone(),
                reason,
            },
            // The transaction is not marked as this order's (`c/`): had the provider reported it
            // wrongly, its correct report would still pay the order.
            None => OrderEventKind::PaymentMismatch {
                channel: problem.channel.clone(),
                provider_txn: problem.provider_txn.clone(),
                amount_minor: problem.amount_minor,
                currency: problem.currency.clone(),
            },
        };
        state.push_event(&mut batch, &self.node_id, order, now, event)?;
        self.store.apply(batch)?;
        self.metrics.payment_problem(&problem.channel, kind);
        tracing::error!(
            order = %order.id,
            channel = %problem.channel,
            provider_txn = %problem.provider_txn,
            amount_minor = problem.amount_minor,
            currency = %problem.currency,
            reason = kind.as_str(),
            "verified payment paid nothing: recorded for an operator (refund or settle it)"
        );
        Ok(())
    }

    /// Verified payments that paid nothing, oldest key first.
    pub fn payment_problems(&self) -> Result<Vec<PaymentProblem>, StoreError> {
        let mut problems = Vec::new();
        for item in self.store.scan_prefix(record::PROBLEM) {
            problems.push(record::PAYMENT_PROBLEMS.decode(&item?.1)?);
        }
        Ok(problems)
    }

    /// Records on an unpaid order that a payment was created for it at `attempt.channel` (with the
    /// provider's handle and pay link when it has them), after the ones before: callbacks must
    /// match one of them. One batch under the engine lock, durable before returning, so the pay
    /// link is never shown for a payment compensation cannot find.
    ///
    /// An order that records no attempt has one implied at its channel (see
    /// [`OrderRecord::attempts`]); a caller opening a second payment for such an order records
    /// the implied one first.
    pub async fn record_payment_attempt(&self, id: &OrderId, attempt: PaymentAttempt) -> Result<(), OrderError> {
        {
            let _state = self.state.lock();
            let mut order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            if !matches!(order.status, OrderStatus::Reserved | OrderStatus::Expired) {
                // Settled meanwhile (a fast callback): nothing to record.
                return Ok(());
            }
            let repeated =
                order.attempts.iter().any(|a| a.channel == attempt.channel && a.provider_ref == attempt.provider_ref);
            if repeated {
                // The same payment again (creation is idempotent per order): nothing new.
                return Ok(());
            }
            if order.attempts.len() >= record::MAX_PAYMENT_ATTEMPTS {
                return Err(OrderError::TooManyAttempts { max: record::MAX_PAYMENT_ATTEMPTS });
            }
            order.channel = attempt.channel.clone();
            order.attempts.push(attempt);
            let mut batch = WriteBatch::default();
            record::ORDERS.put(&mut batch, id.as_bytes(), &order)?;
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
        self.store.apply(batch).map(drop)
    }

    /// Ends an unpaid reservation at once (no payment could be created for it): its keys go back
    /// on sale and it leaves the compensation index. Returns whether it was open.
    pub async fn cancel_unpaid(&self, id: &OrderId) -> Result<bool, StoreError> {
        let now = now_millis();
        let mut filled = Vec::new();
        {
            let mut state = self.state.lock();
            if !state.confirmed {
                // Compensation retries it once the data dir is confirmed.
                return Ok(false);
            }
            let mut batch = WriteBatch::default();
            let Some(held) = self.end_reservation(&mut state, &mut batch, id, now)? else { return Ok(false) };
            batch.delete(record::confirm_key(id));
            let back = self.give_back(&mut state, &mut batch, &held.sku, &held.key_ids)?;
            if let Err(e) = self.store.apply(batch) {
                // Not applied: the reservation stays open and expires by its TTL.
                state.expiry.insert((held.expires_at, *id));
                state.count_open(held.ip, held.email.as_ref());
                state.open.insert(*id, held);
                return Err(e);
            }
            let returned = !back.is_empty();
            forget_unrevealed_takes(&mut state, held.seq, &back);
            for (key, slice) in back {
                state.holdings.put(&held.sku, key, slice);
            }
            if returned {
                self.fill_awaiting_in(&mut state, &held.sku, &mut filled).map_err(store_error)?;
            }
        }
        self.metrics.expired.inc();
        self.metrics.open_reservations.dec();
        self.store.durable().await?;
        self.settle_filled(&filled);
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
        if let Some(mut order) = record::ORDERS.get(&self.store, id.as_bytes())? {
            order.status = OrderStatus::Expired;
            record::ORDERS.put(batch, id.as_bytes(), &order)?;
            let event = OrderEventKind::Expired { key_ids: held.key_ids.clone() };
            state.push_event(batch, &self.node_id, &order, now, event)?;
        }
        Ok(Some(held))
    }

    fn keys_still_sellable(&self, state: &State, held: &OpenReservation) -> bool {
        let now = now_millis();
        if held.expires_at <= now {
            return false;
        }
        // Every held key's slice must still be under a live lease: a node never sells outside one.
        // A slice closed meanwhile still counts: keys under open reservations stay the node's.
        let mono = self.mono_ms();
        held.key_ids.iter().all(|key| {
            self.store
                .get(&record::key_key(&held.sku, *key))
                .ok()
                .flatten()
                .and_then(|raw| record::decode_key_value(&raw).map(|(slice, _)| slice))
                .and_then(|slice| state.holdings.slice(slice))
                .is_some_and(|holding| holding.lease_live(mono))
        })
    }

    /// Moves `keys` into `order` as Delivered: secrets copied into the record, the keys removed
    /// from the sellable set and tombstoned, all in `batch`. Returns the Delivered event's seq.
    fn deliver(
        &self,
        state: &mut State,
        batch: &mut WriteBatch,
        order: &mut OrderRecord,
        keys: Vec<KeyId>,
        now: UnixMillis,
    ) -> Result<u64, OrderError> {
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
        let seq = state.push_event(batch, &self.node_id, order, now, OrderEventKind::Delivered { key_ids: keys })?;
        self.pending_durable.lock().insert(order.id);
        Ok(seq)
    }

    /// Takes back the keys of a reservation that ended unpaid. Keys of a slice the coordinator
    /// closed are dropped and reported released, in `batch`; the others are returned with their
    /// slice for the caller to put back on sale once the batch is applied.
    fn give_back(
        &self,
        state: &mut State,
        batch: &mut WriteBatch,
        sku: &Sku,
        keys: &[KeyId],
    ) -> Result<Vec<(KeyId, SliceId)>, StoreError> {
        let mut back = Vec::with_capacity(keys.len());
        let mut released: BTreeMap<SliceId, Released> = BTreeMap::new();
        for key in keys {
            let Some(raw) = self.store.get(&record::key_key(sku, *key))? else { continue };
            let Some((slice, _)) = record::decode_key_value(&raw) else { continue };
            match state.holdings.slice(slice) {
                Some(holding) if holding.closed.is_some() => {
                    batch.delete(record::key_key(sku, *key));
                    released
                        .entry(slice)
                        .or_insert_with(|| Released {
                            sku: sku.clone(),
                            epoch: holding.epoch,
                            ticket: holding.closed.unwrap_or(0),
                            keys: Vec::new(),
                        })
                        .keys
                        .push(*key);
                }
                _ => back.push((*key, slice)),
            }
        }
        for (slice, mut dropped) in released {
            dropped.keys.sort_unstable();
            state.push_released(batch, &self.node_id, slice, dropped)?;
        }
        Ok(back)
    }

    /// Expires reservations whose TTL has passed; their keys go back on sale. Returns how many.
    pub async fn expire_due(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let mut filled = Vec::new();
        let mut expired_clients = Vec::new();
        let expired = {
            let mut state = self.state.lock();
            if !state.confirmed {
                return Ok(0);
            }
            let due: Vec<OrderId> = state.expiry.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| *id).collect();
            if due.is_empty() {
                return Ok(0);
            }
            let mut batch = WriteBatch::default();
            let mut returned = Vec::new();
            for id in &due {
                let Some(held) = self.end_reservation(&mut state, &mut batch, id, now)? else { continue };
                expired_clients.push(held.ip);
                let back = self.give_back(&mut state, &mut batch, &held.sku, &held.key_ids)?;
                returned.push((held.sku, back, held.seq));
            }
            self.store.apply(batch)?;
            for (sku, back, seq) in &returned {
                for (key, slice) in back {
                    state.holdings.put(sku, *key, *slice);
                }
                forget_unrevealed_takes(&mut state, *seq, back);
            }
            let skus: BTreeSet<&Sku> =
                returned.iter().filter(|(_, back, _)| !back.is_empty()).map(|(sku, _, _)| sku).collect();
            for sku in skus {
                self.fill_awaiting_in(&mut state, sku, &mut filled).map_err(store_error)?;
            }
            returned.len()
        };
        self.metrics.expired.inc_by(expired as u64);
        self.metrics.open_reservations.dec_by(expired as i64);
        tracing::info!(count = expired, "reservations expired");
        self.store.durable().await?;
        if let Some(observer) = self.expiry_observer.get() {
            expired_clients.into_iter().for_each(observer);
        }
        self.settle_filled(&filled);
        Ok(expired)
    }

    /// Installs a verified grant: new slice, or a lease renewal of one already held. Orders paid
    /// while out of stock are filled first, in payment order.
    pub async fn install_grant(&self, grant: SliceGrant) -> Result<GrantOutcome, GrantInstallError> {
        self.install_grant_with(grant, false).await
    }

    /// As [`OrderEngine::install_grant`]; with `accept_expired`, a grant whose lease already ran
    /// out is installed too, selling nothing until renewed (the coordinator's grants: its books
    /// say the keys are here, and its reclaim and close expect to find them here).
    pub async fn install_grant_with(
        &self,
        grant: SliceGrant,
        accept_expired: bool,
    ) -> Result<GrantOutcome, GrantInstallError> {
        let now = now_millis();
        if grant.lease_deadline <= now && !accept_expired {
            return Err(GrantInstallError::Expired);
        }
        let lease = SliceHolding::new(
            grant.sku.clone(),
            grant.epoch,
            grant.lease_deadline,
            self.sells_until_ms(grant.lease_deadline, now),
            grant.take_window,
        );
        if lease.sells_until_ms <= self.mono_ms() {
            tracing::warn!(slice = %grant.slice_id, lease_deadline = grant.lease_deadline.0,
                margin_secs = self.config.lease_safety_margin_secs,
                "the grant's lease is shorter than orders.lease_safety_margin_secs: nothing will sell from it");
        }
        let mut delivered = Vec::new();
        let outcome = {
            let mut state = self.state.lock();
            let slice_key = record::slice_key(grant.slice_id);
            if let Some(raw) = self.store.get(&slice_key)? {
                let meta: SliceMeta = edgecard_store::record::decode("slice", &raw)?;
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
                if meta.closed.is_some() {
                    return Err(GrantInstallError::ChangedSlice { slice: grant.slice_id });
                }
                let renewed = SliceMeta { epoch: grant.epoch, lease_deadline: grant.lease_deadline, ..meta };
                let mut batch = WriteBatch::default();
                batch.put(slice_key, edgecard_store::record::encode("slice", &renewed)?);
                self.store.apply(batch)?;
                state.holdings.upsert_slice(grant.slice_id, lease.clone());
                GrantOutcome::Renewed
            } else {
                for key in &grant.keys {
                    if state.holdings.contains(&grant.sku, key.key_id)
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
                    take_window: grant.take_window,
                    closed: None,
                    last_ticket: 0,
                };
                let mut batch = WriteBatch::default();
                batch.put(slice_key, edgecard_store::record::encode("slice", &meta)?);
                for key in &grant.keys {
                    batch.put(
                        record::key_key(&grant.sku, key.key_id),
                        record::encode_key_value(grant.slice_id, &key.secret),
                    );
                }
                self.store.apply(batch)?;
                state.holdings.upsert_slice(grant.slice_id, lease.clone());
                for key in &grant.keys {
                    state.holdings.put(&grant.sku, key.key_id, grant.slice_id);
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
        self.store.durable().await?;
        let mut pending = self.pending_durable.lock();
        for id in &delivered {
            pending.remove(id);
        }
        drop(pending);
        self.metrics.grants_installed.inc();
        self.metrics.delivered.inc_by(delivered.len() as u64);
        tracing::info!(slice = %grant.slice_id, sku = %grant.sku, epoch = grant.epoch.0, keys = grant.keys.len(), filled, "grant installed");
        Ok(match outcome {
            GrantOutcome::Installed { keys, .. } => GrantOutcome::Installed { keys, filled_awaiting: filled },
            other => other,
        })
    }

    /// The monotonic moment the node stops selling under a lease ending at `lease_deadline`.
    fn sells_until_ms(&self, lease_deadline: UnixMillis, now: UnixMillis) -> u64 {
        let margin = self.config.lease_safety_margin_secs.saturating_mul(1000);
        self.mono_ms().saturating_add(lease::node_sells_for_ms(lease_deadline, now, margin))
    }

    /// Applies a verified lease renewal. `Ok(false)` when it does not apply: unknown slice,
    /// another epoch, or not later than the deadline held. A closed slice is renewed too, so keys
    /// under its open reservations stay deliverable while the node is in contact.
    pub async fn apply_renewal(&self, renewal: &LeaseRenewal) -> Result<bool, StoreError> {
        let now = now_millis();
        let mut filled = Vec::new();
        {
            let mut state = self.state.lock();
            let slice_key = record::slice_key(renewal.slice_id);
            let Some(raw) = self.store.get(&slice_key)? else { return Ok(false) };
            let meta: SliceMeta = edgecard_store::record::decode("slice", &raw)?;
            if meta.epoch != renewal.epoch || renewal.lease_deadline <= meta.lease_deadline {
                return Ok(false);
            }
            let sells_until = self.sells_until_ms(renewal.lease_deadline, now);
            if !state.holdings.renew(renewal.slice_id, renewal.epoch, renewal.lease_deadline, sells_until) {
                return Ok(false);
            }
            let renewed = SliceMeta { lease_deadline: renewal.lease_deadline, ..meta };
            let mut batch = WriteBatch::default();
            batch.put(slice_key, edgecard_store::record::encode("slice", &renewed)?);
            self.store.apply(batch)?;
            // A slice that sells again: orders paid while it was out first.
            self.fill_awaiting_in(&mut state, &renewed.sku, &mut filled).map_err(store_error)?;
        }
        self.store.durable().await?;
        self.settle_filled(&filled);
        tracing::info!(slice = %renewal.slice_id, epoch = renewal.epoch.0, "lease renewed");
        Ok(true)
    }

    /// Gives keys of a slice back to the coordinator (demarcation: the donor releases first).
    /// Drops up to `count` available keys, highest ids first, or with `close` every available
    /// key, closing the slice; keys under open reservations stay until those end. The dropped
    /// keys are reported in a `Released` event in the same batch. A ticket already applied to
    /// the slice changes nothing, so a control message delivered twice releases once. Returns
    /// how many keys were released.
    pub async fn apply_shrink(
        &self,
        slice_id: SliceId,
        sku: &Sku,
        epoch: Epoch,
        count: u64,
        close: bool,
        ticket: u64,
    ) -> Result<usize, StoreError> {
        let released = {
            let mut state = self.state.lock();
            let slice_key = record::slice_key(slice_id);
            let meta: Option<SliceMeta> = match self.store.get(&slice_key)? {
                Some(raw) => Some(edgecard_store::record::decode("slice", &raw)?),
                None => None,
            };
            if meta.as_ref().is_some_and(|m| m.last_ticket >= ticket) {
                return Ok(0);
            }
            // Decide, write, and only then change what is on sale: a failed write changes nothing.
            let dropped = match &meta {
                Some(_) => state.holdings.highest_available(slice_id, if close { u64::MAX } else { count }),
                // Never installed (or long gone): say so anyway, so the coordinator closes its books.
                None => Vec::new(),
            };
            let mut batch = WriteBatch::default();
            if let Some(meta) = &meta {
                for key in &dropped {
                    batch.delete(record::key_key(&meta.sku, *key));
                }
                let updated = SliceMeta {
                    epoch: meta.epoch.max(epoch),
                    closed: if close { Some(ticket) } else { meta.closed },
                    last_ticket: ticket,
                    ..meta.clone()
                };
                batch.put(slice_key, edgecard_store::record::encode("slice", &updated)?);
            }
            let sku = meta.as_ref().map_or(sku, |m| &m.sku).clone();
            let released = Released { sku: sku.clone(), epoch, ticket, keys: dropped.clone() };
            state.push_released(&mut batch, &self.node_id, slice_id, released)?;
            self.store.apply(batch)?;
            for key in &dropped {
                state.holdings.remove(&sku, *key);
            }
            state.holdings.set_epoch(slice_id, epoch);
            if close {
                state.holdings.mark_closed(slice_id, ticket);
            }
            dropped.len()
        };
        self.store.durable().await?;
        tracing::info!(slice = %slice_id, released, close, ticket, "slice shrunk");
        Ok(released)
    }

    /// Orders filled from returned keys are durable now: their keys may be shown.
    fn settle_filled(&self, filled: &[OrderId]) {
        if filled.is_empty() {
            return;
        }
        let mut pending = self.pending_durable.lock();
        for id in filled {
            pending.remove(id);
        }
        drop(pending);
        self.metrics.delivered.inc_by(filled.len() as u64);
        tracing::info!(count = filled.len(), "orders paid while out of stock delivered from returned keys");
    }

    /// Delivers PaidAwaitingStock orders of `sku` while stock lasts, oldest payment first.
    fn fill_awaiting(&self, sku: &Sku, delivered: &mut Vec<OrderId>) -> Result<usize, OrderError> {
        let mut state = self.state.lock();
        self.fill_awaiting_in(&mut state, sku, delivered)
    }

    /// [`OrderEngine::fill_awaiting`] under a lock the caller holds, so that keys it just put back
    /// reach paid orders before any new buyer can take them.
    fn fill_awaiting_in(
        &self,
        state: &mut State,
        sku: &Sku,
        delivered: &mut Vec<OrderId>,
    ) -> Result<usize, OrderError> {
        if !state.confirmed {
            // Filled when the data dir is confirmed (see `confirm`).
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        let now = now_millis();
        while let Some(&(seq, id)) = state.awaiting.get(sku).and_then(|q| q.front()) {
            let mut order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            let Some(taken) = state.holdings.take(sku, order.quantity as usize, self.mono_ms()) else { break };
            if let Some(queue) = state.awaiting.get_mut(sku) {
                queue.pop_front();
            }
            batch.delete(record::awaiting_key(seq));
            let keys = taken.iter().map(|(k, _)| *k).collect();
            let event_seq = self.deliver(state, &mut batch, &mut order, keys, now)?;
            state.holdings.record_takes(event_seq, &taken);
            record::ORDERS.put(&mut batch, id.as_bytes(), &order)?;
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
        for item in self.store.scan_prefix_from(record::OUTBOX, &start) {
            let (_, value) = item?;
            let event = record::decode_event(&value)?;
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
        // Entries up to the previous ack are gone already; start after them.
        let (previous, _) = self.sync_progress()?;
        let start = record::outbox_key(previous.saturating_add(1));
        for item in self.store.scan_prefix_from(record::OUTBOX, &start) {
            let (key, _) = item?;
            match record::be_u64(&key[record::OUTBOX.len()..]) {
                Some(seq) if seq <= acked_through => batch.delete(key.to_vec()),
                _ => break,
            }
        }
        batch.put(record::SYNC_ACKED.to_vec(), acked_through.to_be_bytes().to_vec());
        self.store.apply(batch)?;
        self.state.lock().holdings.acknowledge(acked_through);
        Ok(())
    }

    /// Restores events this data dir lost (a restored older copy), sent back by the coordinator:
    /// one durable batch with the outbox moved past them, then the in-memory state rebuilt from
    /// the store. Returns the seq restored through.
    pub async fn restore_lost(&self, events: &[OrderEvent]) -> Result<u64, StoreError> {
        let Some(last) = events.last().map(|e| e.seq) else { return Ok(self.outbox_newest()) };
        let restored = {
            let mut state = self.state.lock();
            if events.first().is_some_and(|e| e.seq < state.next_seq) {
                return Err(StoreError::Corrupt {
                    key: "restore".into(),
                    reason: format!("restored events overlap this node's outbox (next seq {})", state.next_seq),
                });
            }
            let restored = super::restore::restore_events(&self.store, events)?;
            let mut batch = restored.batch;
            // What the outbox holds is older than what came back, so it is in the ledger.
            for item in self.store.scan_prefix(record::OUTBOX) {
                batch.delete(item?.0.to_vec());
            }
            batch.put(record::NEXT_SEQ.to_vec(), (last + 1).to_be_bytes().to_vec());
            batch.put(record::SYNC_ACKED.to_vec(), last.to_be_bytes().to_vec());
            self.store.apply(batch)?;
            self.reload_state(&mut state)?;
            (restored.orders, restored.missing_secrets)
        };
        self.store.durable().await?;
        let (orders, missing_secrets) = restored;
        tracing::warn!(
            through = last,
            events = events.len(),
            orders,
            missing_secrets,
            "restored events this data dir had lost"
        );
        Ok(last)
    }

    /// Rebuilds the in-memory state from the store, keeping what is not stored.
    fn reload_state(&self, state: &mut State) -> Result<(), StoreError> {
        let mut rebuilt = load_state(&self.store, &self.config, self.mono_ms())?;
        rebuilt.confirmed = state.confirmed;
        rebuilt.outbox_notify = state.outbox_notify.clone();
        *state = rebuilt;
        self.metrics.open_reservations.set(state.open.len() as i64);
        Ok(())
    }

    /// The coordinator confirmed this data dir: events may be written again. `ledger_high_water`
    /// is the ledger's last seq for this node; numbering continues after it (a new data dir, or
    /// one whose last events the ledger refused). Then what waited runs: expiries that fell due,
    /// and paid orders waiting for stock.
    /// Returns the seq numbering jumped to, if it did.
    pub async fn confirm(&self, ledger_high_water: u64) -> Result<Option<u64>, StoreError> {
        let jumped = {
            let mut state = self.state.lock();
            if state.confirmed {
                return Ok(None);
            }
            let jump = ledger_high_water >= state.next_seq;
            if jump {
                let mut batch = WriteBatch::default();
                for item in self.store.scan_prefix(record::OUTBOX) {
                    batch.delete(item?.0.to_vec());
                }
                batch.put(record::NEXT_SEQ.to_vec(), (ledger_high_water + 1).to_be_bytes().to_vec());
                batch.put(record::SYNC_ACKED.to_vec(), ledger_high_water.to_be_bytes().to_vec());
                self.store.apply(batch)?;
                state.next_seq = ledger_high_water + 1;
                state.holdings.acknowledge(ledger_high_water);
            }
            state.confirmed = true;
            jump.then_some(ledger_high_water)
        };
        self.store.durable().await?;
        tracing::info!(incarnation = %format!("{:#x}", self.incarnation), "coordinator confirmed this data dir; selling");
        self.expire_due(now_millis()).await?;
        let skus: Vec<Sku> = self.state.lock().awaiting.keys().cloned().collect();
        let mut delivered = Vec::new();
        for sku in skus {
            self.fill_awaiting(&sku, &mut delivered).map_err(store_error)?;
        }
        self.store.durable().await?;
        self.settle_filled(&delivered);
        Ok(jumped)
    }

    /// The coordinator did not confirm this data dir (it is behind the ledger, or diverged): stop
    /// writing events until it does.
    pub fn fence(&self) {
        let mut state = self.state.lock();
        if state.confirmed {
            state.confirmed = false;
            tracing::warn!("the coordinator fenced this data dir; sales stop until it confirms it");
        }
    }

    /// Records that control message `seq` was applied (or refused for good, with why, to be
    /// reported to the coordinator); durable before returning, so a restart does not apply it
    /// twice (applying a grant twice is harmless, but a catalog may be older).
    pub async fn record_control_applied(&self, seq: u64, refused: Option<&RefusedControl>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(record::CONTROL_APPLIED.to_vec(), seq.to_be_bytes().to_vec());
        if let Some(refused) = refused {
            let mut value = vec![u8::from(refused.holds_nothing)];
            value.extend_from_slice(refused.reason.as_bytes());
            batch.put(record::refused_key(seq), value);
        }
        self.store.commit(batch).await
    }

    /// Refused control messages not yet reported, oldest first, at most `limit`.
    pub fn refused_control(&self, limit: usize) -> Result<Vec<RefusedControl>, StoreError> {
        let mut refused = Vec::new();
        for item in self.store.scan_prefix(record::REFUSED).take(limit) {
            let (key, value) = item?;
            let corrupt = || StoreError::Corrupt { key: "r/".into(), reason: "bad refusal record".into() };
            let seq = record::be_u64(&key[record::REFUSED.len()..]).ok_or_else(corrupt)?;
            let (&flag, reason) = value.split_first().ok_or_else(corrupt)?;
            let reason = String::from_utf8_lossy(reason).into_owned();
            refused.push(RefusedControl { seq, reason, holds_nothing: flag == 1 });
        }
        Ok(refused)
    }

    /// The coordinator has recorded these refusals.
    pub fn forget_refused_control(&self, reported: &[RefusedControl]) -> Result<(), StoreError> {
        if reported.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for refused in reported {
            batch.delete(record::refused_key(refused.seq));
        }
        self.store.apply(batch).map(drop)
    }

    /// Whether this node holds slice `slice` (any state).
    pub fn holds_slice(&self, slice: SliceId) -> bool {
        self.state.lock().holdings.slice(slice).is_some()
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

/// This data dir's incarnation id, made (durably) on first open.
async fn load_or_make_incarnation(store: &Store) -> Result<u64, StoreError> {
    if let Some(raw) = store.get(record::INCARNATION)? {
        return record::be_u64(&raw)
            .filter(|id| *id != 0)
            .ok_or_else(|| StoreError::Corrupt { key: "m/incarnation".into(), reason: "bad value".into() });
    }
    let id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    let mut batch = WriteBatch::default();
    batch.put(record::INCARNATION.to_vec(), id.to_be_bytes().to_vec());
    store.commit(batch).await?;
    Ok(id)
}

/// The catalog last received from the coordinator, if any: it supersedes `node.toml`'s products.
pub fn stored_catalog(store: &Store) -> Result<Option<Vec<ProductConfig>>, StoreError> {
    match store.get(record::CATALOG)? {
        Some(raw) => edgecard_store::record::decode("catalog", &raw).map(Some),
        None => Ok(None),
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

/// Rebuilds the engine's memory from the store; `mono_now` is the engine's monotonic clock.
fn load_state(store: &Store, config: &OrdersConfig, mono_now: u64) -> Result<State, StoreError> {
    let mut state = State::default();
    let now = now_millis();
    let corrupt = |key: &str, reason: &str| StoreError::Corrupt { key: key.to_string(), reason: reason.to_string() };
    let margin = config.lease_safety_margin_secs.saturating_mul(1000);
    for item in store.scan_prefix(record::SLICE) {
        let (_, raw) = item?;
        let meta: SliceMeta = edgecard_store::record::decode("slice", &raw)?;
        let sells_until = mono_now.saturating_add(lease::node_sells_for_ms(meta.lease_deadline, now, margin));
        let mut holding = SliceHolding::new(meta.sku, meta.epoch, meta.lease_deadline, sells_until, meta.take_window);
        holding.closed = meta.closed;
        state.holdings.upsert_slice(meta.slice_id, holding);
    }
    for item in store.scan_prefix(record::KEY) {
        let (key, value) = item?;
        let (sku, key_id) = record::parse_key_key(&key).ok_or_else(|| corrupt("k/", "bad key"))?;
        let (slice, _) = record::decode_key_value(&value).ok_or_else(|| corrupt("k/", "bad value"))?;
        state.holdings.put(&sku, key_id, slice);
    }
    let reserved_at = rebuild_take_windows(store, &mut state)?;
    for item in store.scan_prefix(record::OPEN) {
        let (key, _) = item?;
        let id = record::order_id_from(&key[record::OPEN.len()..]).ok_or_else(|| corrupt("x/", "bad order id"))?;
        let order =
            record::ORDERS.get(store, id.as_bytes())?.ok_or_else(|| corrupt("x/", "open marker without order"))?;
        if order.status != OrderStatus::Reserved {
            continue;
        }
        for key in &order.key_ids {
            state.holdings.remove(&order.sku, *key);
        }
        let ip = limit_key(order.client_ip);
        state.count_open(ip, order.email.as_ref());
        state.expiry.insert((order.expires_at, id));
        state.open.insert(
            id,
            OpenReservation {
                sku: order.sku,
                key_ids: order.key_ids,
                seq: reserved_at.get(&id).copied(),
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
        let order =
            record::ORDERS.get(store, id.as_bytes())?.ok_or_else(|| corrupt("w/", "awaiting marker without order"))?;
        state.awaiting.entry(order.sku).or_default().push_back((seq, id));
    }
    state.next_seq = match store.get(record::NEXT_SEQ)? {
        Some(raw) => record::be_u64(&raw).ok_or_else(|| corrupt("m/next_seq", "bad value"))?,
        None => 1,
    };
    Ok(state)
}

/// Counts the takes of every outbox event the coordinator has not acknowledged against their
/// slices' take windows. The outbox holds exactly those events (acknowledged ones are pruned in
/// the same batch that records the mark). A delivered key no longer names its slice, so it counts
/// against every slice of its sku: over-counting only narrows the window, which is safe. A
/// reservation that expired unpaid before being acknowledged counts nothing (as while running).
/// Returns the seq of each unacknowledged `Reserved` event, by order.
fn rebuild_take_windows(store: &Store, state: &mut State) -> Result<HashMap<OrderId, u64>, StoreError> {
    let slices_of: Vec<(SliceId, Sku)> = state.holdings.slices().map(|(id, h)| (*id, h.sku.clone())).collect();
    let mut events = Vec::new();
    for item in store.scan_prefix(record::OUTBOX) {
        events.push(record::decode_event(&item?.1)?);
    }
    let expired: HashSet<OrderId> =
        events.iter().filter(|e| matches!(e.kind, OrderEventKind::Expired { .. })).map(|e| e.order_id).collect();
    let mut reserved_at = HashMap::new();
    for event in &events {
        let key_ids = match &event.kind {
            OrderEventKind::Reserved { .. } if expired.contains(&event.order_id) => continue,
            OrderEventKind::Reserved { key_ids, .. } => {
                reserved_at.insert(event.order_id, event.seq);
                key_ids
            }
            OrderEventKind::Delivered { key_ids } => key_ids,
            _ => continue,
        };
        for key in key_ids {
            let slice = store
                .get(&record::key_key(&event.sku, *key))?
                .and_then(|raw| record::decode_key_value(&raw).map(|(slice, _)| slice));
            match slice {
                Some(slice) => state.holdings.record_slice_takes(event.seq, slice, 1),
                None => {
                    for (slice, _) in slices_of.iter().filter(|(_, sku)| sku == &event.sku) {
                        state.holdings.record_slice_takes(event.seq, *slice, 1);
                    }
                }
            }
        }
    }
    Ok(reserved_at)
}
