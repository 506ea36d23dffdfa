//! A simulated edge node. What it may sell is decided by the real `Holdings`, when to upload by
//! the real `SyncClient`; around them the model keeps what the node's store would: slices with
//! their terms, keys, orders and the outbox. Every public operation is one atomic, durable step.
//! A crash keeps [`Durable`] and loses the rest, which a restart rebuilds from it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use edgecard_protocol::{
    lease, ControlBody, ControlMessage, Epoch, Holdings, KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, Sku,
    SliceHolding, SliceId, SyncAck, SyncClient, SyncUpload, UnixMillis,
};

use crate::config::{sync_timing, Mutation, RESERVATION_TTL_MS, UPLOAD_TIMEOUT_MS};
use crate::net::{Control, GrantTerms, Message, Shrink};

#[derive(Debug, Clone)]
pub struct StoredSlice {
    pub sku: Sku,
    pub epoch: Epoch,
    pub lease_deadline: UnixMillis,
    pub take_window: u64,
    pub closed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Available,
    Reserved(OrderId),
    Sold(OrderId),
    /// Dropped and reported in a `Released` event; the node will never sell it under this slice.
    Released,
}

#[derive(Debug, Clone)]
pub struct StoredKey {
    pub sku: Sku,
    pub slice: SliceId,
    pub status: KeyStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderStatus {
    Reserved { keys: Vec<KeyId>, expires_at: UnixMillis },
    Expired,
    Delivered,
    AwaitingStock,
}

#[derive(Debug, Clone)]
pub struct NodeOrder {
    pub sku: Sku,
    pub quantity: u32,
    pub status: OrderStatus,
    pub paid: bool,
}

/// What survives a crash.
#[derive(Debug, Clone)]
pub struct Durable {
    pub slices: BTreeMap<SliceId, StoredSlice>,
    pub keys: BTreeMap<KeyId, StoredKey>,
    pub orders: BTreeMap<OrderId, NodeOrder>,
    /// PaidAwaitingStock orders, oldest payment first.
    pub awaiting: VecDeque<OrderId>,
    pub outbox: BTreeMap<u64, OrderEvent>,
    pub next_seq: u64,
    pub acked: u64,
    pub control_applied: u64,
}

impl Durable {
    fn new() -> Self {
        Durable {
            slices: BTreeMap::new(),
            keys: BTreeMap::new(),
            orders: BTreeMap::new(),
            awaiting: VecDeque::new(),
            outbox: BTreeMap::new(),
            next_seq: 1,
            acked: 0,
            control_applied: 0,
        }
    }

    pub fn newest_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Something the node just did that the world checks against the coordinator and the truth.
#[derive(Debug, Clone, Copy)]
pub enum Observation {
    Took { key: KeyId, slice: SliceId },
    Delivered { order: OrderId, key: KeyId, slice: SliceId },
}

pub struct Node {
    pub index: usize,
    pub id: NodeId,
    /// Wall clock minus true time, within the bound; redrawn at each restart (NTP may step it).
    skew: i64,
    safety_margin_ms: u64,
    mutation: Mutation,
    pub durable: Durable,
    pub down_until: u64,
    pub observations: Vec<Observation>,
    pub refused_grants: u64,
    /// Acks lost in a crash before they were flushed.
    pub lost_acks: u64,
    /// What the node did, for a traced run's failure report.
    pub notes: Option<Vec<String>>,
    // Volatile state, lost in a crash.
    up: bool,
    /// True time of the last boot: the origin of the monotonic clock.
    boot_at: u64,
    holdings: Holdings,
    expiry: BTreeSet<(UnixMillis, OrderId)>,
    sync: SyncClient,
    /// The upload stream awaiting its ack, and its monotonic opening time.
    in_flight: Option<(u64, u64)>,
    /// Never reset: streams of a previous boot died with its connection.
    next_stream: u64,
    /// An ack recorded but not yet flushed, as the real node records acks without awaiting
    /// durability: the acked mark before it and the outbox entries it pruned. The next durable
    /// write flushes it; a crash before that may lose it.
    unflushed_ack: Option<(u64, BTreeMap<u64, OrderEvent>)>,
    sync_seed: u64,
}

impl Node {
    pub fn new(index: usize, now: u64, skew: i64, safety_margin_ms: u64, mutation: Mutation, sync_seed: u64) -> Self {
        let durable = Durable::new();
        Node {
            index,
            id: NodeId::new(format!("n{index}")).expect("valid node id"),
            skew,
            safety_margin_ms,
            mutation,
            sync: SyncClient::new(sync_timing(), durable.acked, durable.control_applied, sync_seed),
            durable,
            down_until: 0,
            observations: Vec::new(),
            refused_grants: 0,
            lost_acks: 0,
            notes: None,
            up: true,
            boot_at: now,
            holdings: Holdings::default(),
            expiry: BTreeSet::new(),
            in_flight: None,
            next_stream: 0,
            unflushed_ack: None,
            sync_seed,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    fn mono(&self, now: u64) -> u64 {
        now - self.boot_at
    }

    fn wall(&self, now: u64) -> UnixMillis {
        UnixMillis(now.saturating_add_signed(self.skew))
    }

    /// The monotonic time at which the node stops selling under `deadline`, judged now.
    fn sells_until(&self, now: u64, deadline: UnixMillis) -> u64 {
        self.mono(now) + lease::node_sells_for_ms(deadline, self.wall(now), self.safety_margin_ms)
    }

    // --- crash and restart ---

    /// Loses all volatile state and, if `lose_unflushed`, an ack not yet flushed.
    pub fn crash(&mut self, lose_unflushed: bool) {
        if let Some((acked, pruned)) = self.unflushed_ack.take() {
            if lose_unflushed {
                self.lost_acks += 1;
                self.durable.acked = acked;
                self.durable.outbox.extend(pruned);
            }
        }
        self.up = false;
        self.holdings = Holdings::default();
        self.expiry.clear();
        self.in_flight = None;
    }

    /// Boots from durable state: slices with their stored terms, available keys, and take windows
    /// rebuilt conservatively from the unacknowledged outbox.
    pub fn restart(&mut self, now: u64, skew: i64) {
        self.up = true;
        self.skew = skew;
        self.boot_at = now;
        self.in_flight = None;
        self.holdings = Holdings::default();
        let holdings: Vec<(SliceId, SliceHolding)> =
            self.durable.slices.iter().map(|(id, stored)| (*id, self.holding_for(now, stored))).collect();
        for (id, holding) in holdings {
            self.holdings.upsert_slice(id, holding);
        }
        for (key, stored) in &self.durable.keys {
            if stored.status == KeyStatus::Available {
                self.holdings.put(&stored.sku, *key, stored.slice);
            }
        }
        if self.mutation != Mutation::NodeForgetsTakesOnRestart {
            self.rebuild_take_windows();
        }
        self.expiry = self
            .durable
            .orders
            .iter()
            .filter_map(|(id, order)| match &order.status {
                OrderStatus::Reserved { expires_at, .. } => Some((*expires_at, *id)),
                _ => None,
            })
            .collect();
        self.sync =
            SyncClient::new(sync_timing(), self.durable.acked, self.durable.control_applied, self.sync_seed ^ now);
        self.expire_due(now);
        self.fill_awaiting(now);
    }

    /// Every event after the acked mark that may have taken keys counts against the slice of
    /// each key (against every slice of the sku if the key is unknown). A Delivered event of
    /// reserved keys took nothing new; counting it anyway only errs on the safe side.
    fn rebuild_take_windows(&mut self) {
        for (seq, event) in self.durable.outbox.range(self.durable.acked + 1..) {
            let key_ids = match &event.kind {
                OrderEventKind::Reserved { key_ids, .. } | OrderEventKind::Delivered { key_ids } => key_ids,
                _ => continue,
            };
            let mut per_slice: BTreeMap<SliceId, u64> = BTreeMap::new();
            for key in key_ids {
                match self.durable.keys.get(key) {
                    Some(stored) => *per_slice.entry(stored.slice).or_default() += 1,
                    None => {
                        for (id, slice) in &self.durable.slices {
                            if slice.sku == event.sku {
                                *per_slice.entry(*id).or_default() += 1;
                            }
                        }
                    }
                }
            }
            for (slice, n) in per_slice {
                self.holdings.record_slice_takes(*seq, slice, n);
            }
        }
    }

    fn holding_for(&self, now: u64, stored: &StoredSlice) -> SliceHolding {
        let window = if self.mutation == Mutation::NodeIgnoresWindow { u64::MAX } else { stored.take_window };
        let until = self.sells_until(now, stored.lease_deadline);
        let mut holding = SliceHolding::new(stored.sku.clone(), stored.epoch, stored.lease_deadline, until, window);
        holding.closed = stored.closed;
        holding
    }

    // --- orders ---

    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(notes) = &mut self.notes {
            notes.push(what());
        }
    }

    fn push_event(&mut self, now: u64, order_id: OrderId, sku: &Sku, kind: OrderEventKind) -> u64 {
        self.unflushed_ack = None;
        let seq = self.durable.next_seq;
        self.durable.next_seq += 1;
        self.note(|| format!("event {seq} order {order_id}: {kind:?}"));
        let event = OrderEvent { node_id: self.id.clone(), seq, at: self.wall(now), order_id, sku: sku.clone(), kind };
        self.durable.outbox.insert(seq, event);
        seq
    }

    fn set_status(&mut self, key: KeyId, status: KeyStatus) {
        self.durable.keys.get_mut(&key).expect("a key the node holds").status = status;
    }

    fn slice_of(&self, key: KeyId) -> SliceId {
        self.durable.keys[&key].slice
    }

    /// Reserves `quantity` keys for a new order; false when sold out (nothing changes).
    pub fn create_order(&mut self, now: u64, order_id: OrderId, sku: &Sku, quantity: u32) -> bool {
        if !self.up {
            return false;
        }
        let Some(taken) = self.holdings.take(sku, quantity as usize, self.mono(now)) else { return false };
        let key_ids: Vec<KeyId> = taken.iter().map(|(key, _)| *key).collect();
        let expires_at = self.wall(now).saturating_add_ms(RESERVATION_TTL_MS);
        let kind = OrderEventKind::Reserved {
            key_ids: key_ids.clone(),
            quantity,
            amount_minor: 100 * u64::from(quantity),
            currency: "USD".into(),
            expires_at,
            token_sha256: String::new(),
        };
        let seq = self.push_event(now, order_id, sku, kind);
        self.holdings.record_takes(seq, &taken);
        for (key, slice) in &taken {
            self.set_status(*key, KeyStatus::Reserved(order_id));
            self.observations.push(Observation::Took { key: *key, slice: *slice });
        }
        let status = OrderStatus::Reserved { keys: key_ids, expires_at };
        self.durable.orders.insert(order_id, NodeOrder { sku: sku.clone(), quantity, status, paid: false });
        self.expiry.insert((expires_at, order_id));
        true
    }

    /// A confirmed payment. Reserved keys are delivered if every one's lease is still live (a
    /// slice closed meanwhile still counts: the order holds them); otherwise they go back and the
    /// order competes for stock like a new one, or waits for it. Returns whether it came late.
    pub fn pay(&mut self, now: u64, order_id: OrderId) -> bool {
        let Some(order) = self.durable.orders.get_mut(&order_id) else { return false };
        if order.paid {
            return false;
        }
        order.paid = true;
        let (sku, quantity, status) = (order.sku.clone(), order.quantity, order.status.clone());
        let paid = OrderEventKind::Paid {
            channel: "sim".into(),
            provider_txn: format!("tx-{}", self.durable.next_seq),
            amount_minor: 100 * u64::from(quantity),
            currency: "USD".into(),
        };
        self.push_event(now, order_id, &sku, paid);
        let mono = self.mono(now);
        match status {
            OrderStatus::Reserved { keys, expires_at } => {
                self.expiry.remove(&(expires_at, order_id));
                let live =
                    keys.iter().all(|key| self.holdings.slice(self.slice_of(*key)).is_some_and(|s| s.lease_live(mono)));
                if live {
                    let held: Vec<(KeyId, SliceId)> = keys.iter().map(|key| (*key, self.slice_of(*key))).collect();
                    self.deliver(now, order_id, &sku, &held, false);
                    return false;
                }
                self.give_back(now, &sku, &keys);
                self.deliver_or_await(now, order_id, &sku, quantity);
                false
            }
            OrderStatus::Expired => {
                self.deliver_or_await(now, order_id, &sku, quantity);
                true
            }
            OrderStatus::Delivered | OrderStatus::AwaitingStock => false,
        }
    }

    fn deliver_or_await(&mut self, now: u64, order_id: OrderId, sku: &Sku, quantity: u32) {
        match self.holdings.take(sku, quantity as usize, self.mono(now)) {
            Some(taken) => self.deliver(now, order_id, sku, &taken, true),
            None => {
                self.push_event(now, order_id, sku, OrderEventKind::AwaitingStock { quantity });
                self.durable.orders.get_mut(&order_id).expect("the order").status = OrderStatus::AwaitingStock;
                self.durable.awaiting.push_back(order_id);
            }
        }
    }

    /// Delivers `keys` to the order; `fresh` when they were just taken (they count against the
    /// take window under the Delivered event's seq).
    fn deliver(&mut self, now: u64, order_id: OrderId, sku: &Sku, keys: &[(KeyId, SliceId)], fresh: bool) {
        let key_ids: Vec<KeyId> = keys.iter().map(|(key, _)| *key).collect();
        let seq = self.push_event(now, order_id, sku, OrderEventKind::Delivered { key_ids });
        if fresh {
            self.holdings.record_takes(seq, keys);
        }
        for (key, slice) in keys {
            if fresh {
                self.observations.push(Observation::Took { key: *key, slice: *slice });
            }
            self.set_status(*key, KeyStatus::Sold(order_id));
            self.observations.push(Observation::Delivered { order: order_id, key: *key, slice: *slice });
        }
        self.durable.orders.get_mut(&order_id).expect("the order").status = OrderStatus::Delivered;
    }

    /// Keys an order no longer holds: back on sale, or, for a closed slice (which `put`
    /// refuses), released under its close ticket in the same step.
    fn give_back(&mut self, now: u64, sku: &Sku, keys: &[KeyId]) {
        let mut released: BTreeMap<SliceId, Vec<KeyId>> = BTreeMap::new();
        for key in keys {
            let slice = self.slice_of(*key);
            if self.holdings.put(sku, *key, slice) {
                self.set_status(*key, KeyStatus::Available);
            } else {
                self.set_status(*key, KeyStatus::Released);
                released.entry(slice).or_default().push(*key);
            }
        }
        for (slice_id, key_ids) in released {
            let stored = &self.durable.slices[&slice_id];
            let ticket = stored.closed.expect("put refuses keys of closed slices only");
            let kind = OrderEventKind::Released { slice_id, epoch: stored.epoch, ticket, key_ids };
            self.push_event(now, OrderId::NONE, sku, kind);
        }
    }

    /// Expires unpaid reservations whose TTL has passed by the node's wall clock.
    pub fn expire_due(&mut self, now: u64) {
        if !self.up {
            return;
        }
        while let Some(&(expires_at, order_id)) = self.expiry.first() {
            if expires_at > self.wall(now) {
                break;
            }
            self.expiry.pop_first();
            let order = self.durable.orders.get_mut(&order_id).expect("an open order");
            let OrderStatus::Reserved { keys, .. } = &order.status else { continue };
            let keys = keys.clone();
            order.status = OrderStatus::Expired;
            let sku = order.sku.clone();
            self.push_event(now, order_id, &sku, OrderEventKind::Expired { key_ids: keys.clone() });
            self.give_back(now, &sku, &keys);
        }
    }

    /// Fills PaidAwaitingStock orders while stock lasts, oldest payment first per sku.
    fn fill_awaiting(&mut self, now: u64) {
        let mut dry: BTreeSet<Sku> = BTreeSet::new();
        let queue: Vec<OrderId> = self.durable.awaiting.iter().copied().collect();
        for order_id in queue {
            let order = &self.durable.orders[&order_id];
            let (sku, quantity) = (order.sku.clone(), order.quantity);
            if dry.contains(&sku) {
                continue;
            }
            match self.holdings.take(&sku, quantity as usize, self.mono(now)) {
                Some(taken) => {
                    self.durable.awaiting.retain(|id| *id != order_id);
                    self.deliver(now, order_id, &sku, &taken, true);
                }
                None => {
                    dry.insert(sku);
                }
            }
        }
    }

    // --- sync ---

    /// Opens an upload if the sync client wants one (resetting a stream that timed out first).
    pub fn poll_sync(&mut self, now: u64) -> Option<Message> {
        if !self.up {
            return None;
        }
        let mono = self.mono(now);
        if let Some((_, opened)) = self.in_flight {
            if mono - opened < UPLOAD_TIMEOUT_MS {
                return None;
            }
            self.sync.handle_failure(mono);
            self.in_flight = None;
        }
        let plan = self.sync.poll_upload(mono, self.durable.newest_seq())?;
        let events: Vec<OrderEvent> =
            self.durable.outbox.range(plan.after_seq + 1..).take(plan.max_events).map(|(_, e)| e.clone()).collect();
        let stream = self.next_stream;
        self.next_stream += 1;
        self.in_flight = Some((stream, mono));
        let newest_seq = self.durable.outbox.keys().next_back().copied().unwrap_or(plan.after_seq);
        let upload = SyncUpload {
            node_id: self.id.clone(),
            incarnation: 1,
            newest_seq,
            events,
            control_applied: plan.control_applied,
            stock: Vec::new(),
            refused_control: vec![],
            lookups: vec![],
        };
        Some(Message::Upload { node: self.index, stream, upload })
    }

    /// An ack. One for another stream (reset, or from before a crash) is dropped, as the
    /// transport would. `crash_after` crashes the node after applying that many control messages.
    pub fn on_ack(
        &mut self,
        now: u64,
        stream: u64,
        ack: &SyncAck,
        terms: &[(u64, Control)],
        crash_after: Option<usize>,
    ) -> Result<(), String> {
        if !self.up || self.in_flight.map(|(s, _)| s) != Some(stream) {
            return Ok(());
        }
        self.in_flight = None;
        let outcome =
            self.sync.handle_ack(self.mono(now), ack).map_err(|e| format!("{} refused an ack: {e}", self.id))?;
        self.record_ack(outcome.prune_through);
        for (applied, message) in outcome.control.iter().enumerate() {
            if crash_after == Some(applied) {
                self.crash(true);
                return Ok(());
            }
            self.apply_control(now, message, terms)?;
            self.sync.mark_control_applied(message.seq);
            // Awaited for durability, which flushes the ack too.
            self.durable.control_applied = message.seq;
            self.unflushed_ack = None;
        }
        self.fill_awaiting(now);
        Ok(())
    }

    /// Prunes the outbox through `acked`, without flushing (see `unflushed_ack`).
    fn record_ack(&mut self, acked: u64) {
        let kept = self.durable.outbox.split_off(&(acked + 1));
        let pruned = std::mem::replace(&mut self.durable.outbox, kept);
        let (before, earlier) = self.unflushed_ack.take().unwrap_or((self.durable.acked, BTreeMap::new()));
        let mut all_pruned = earlier;
        all_pruned.extend(pruned);
        self.unflushed_ack = Some((before, all_pruned));
        self.durable.acked = acked;
        self.holdings.acknowledge(acked);
    }

    fn apply_control(&mut self, now: u64, message: &ControlMessage, terms: &[(u64, Control)]) -> Result<(), String> {
        if let Some(shrink) = Shrink::from_body(&message.body) {
            self.shrink(now, &shrink);
            return Ok(());
        }
        if let ControlBody::Catalog { .. } = message.body {
            return Ok(());
        }
        match terms.iter().find(|(seq, _)| *seq == message.seq).map(|(_, control)| control) {
            Some(Control::Grant(grant)) => self.install(now, grant),
            Some(Control::Renew { slice_id, epoch, lease_deadline }) => {
                let until = self.sells_until(now, *lease_deadline);
                let mono = self.mono(now);
                self.note(|| {
                    format!("renews slice {slice_id} epoch {epoch} to {lease_deadline}: sells {until} (now {mono})")
                });
                if self.holdings.renew(*slice_id, *epoch, *lease_deadline, until) {
                    self.durable.slices.get_mut(slice_id).expect("a renewed slice").lease_deadline = *lease_deadline;
                }
            }
            other => return Err(format!("control {} arrived without its terms ({other:?})", message.seq)),
        }
        Ok(())
    }

    /// Installs a new slice; a grant naming any key the node holds or has sold is refused whole.
    fn install(&mut self, now: u64, grant: &GrantTerms) {
        if self.durable.slices.contains_key(&grant.slice_id) {
            return;
        }
        if self.mutation == Mutation::NodeRefusesExpiredGrants && grant.lease_deadline <= self.wall(now) {
            self.refused_grants += 1;
            self.note(|| format!("refuses expired grant {grant:?}"));
            return;
        }
        let conflict = grant
            .keys
            .iter()
            .any(|key| self.durable.keys.get(key).is_some_and(|stored| stored.status != KeyStatus::Released));
        if conflict {
            self.refused_grants += 1;
            self.note(|| format!("refuses grant {grant:?}"));
            return;
        }
        self.note(|| format!("installs {grant:?}"));
        let stored = StoredSlice {
            sku: grant.sku.clone(),
            epoch: grant.epoch,
            lease_deadline: grant.lease_deadline,
            take_window: grant.take_window,
            closed: None,
        };
        let holding = self.holding_for(now, &stored);
        self.durable.slices.insert(grant.slice_id, stored);
        self.holdings.upsert_slice(grant.slice_id, holding);
        for key in &grant.keys {
            let stored = StoredKey { sku: grant.sku.clone(), slice: grant.slice_id, status: KeyStatus::Available };
            self.durable.keys.insert(*key, stored);
            self.holdings.put(&grant.sku, *key, grant.slice_id);
        }
    }

    /// Shrinks or closes a slice under a new epoch and reports what was dropped, in one step.
    fn shrink(&mut self, now: u64, shrink: &Shrink) {
        self.note(|| format!("applies {shrink:?}"));
        let Some(stored) = self.durable.slices.get_mut(&shrink.slice_id) else {
            // Never installed: nothing to drop, but the ticket gets its answer.
            let kind = OrderEventKind::Released {
                slice_id: shrink.slice_id,
                epoch: shrink.epoch,
                ticket: shrink.ticket,
                key_ids: Vec::new(),
            };
            self.push_event(now, OrderId::NONE, &shrink.sku, kind);
            return;
        };
        stored.epoch = stored.epoch.max(shrink.epoch);
        if shrink.close {
            stored.closed = Some(shrink.ticket);
        }
        let (sku, epoch) = (stored.sku.clone(), stored.epoch);
        self.holdings.set_epoch(shrink.slice_id, shrink.epoch);
        let dropped = if shrink.close {
            self.holdings.close(shrink.slice_id, shrink.ticket)
        } else {
            self.holdings.shrink(shrink.slice_id, shrink.count)
        };
        for key in &dropped {
            self.set_status(*key, KeyStatus::Released);
        }
        let kind =
            OrderEventKind::Released { slice_id: shrink.slice_id, epoch, ticket: shrink.ticket, key_ids: dropped };
        self.push_event(now, OrderId::NONE, &sku, kind);
    }

    // --- inspection ---

    pub fn is_synced(&self) -> bool {
        self.durable.acked == self.durable.newest_seq()
    }

    pub fn open_reservations(&self) -> usize {
        self.expiry.len()
    }

    /// The model's own consistency: `Holdings` agrees with the stored keys, slice by slice.
    pub fn check_model(&self) -> Result<(), String> {
        if !self.up {
            return Ok(());
        }
        let mut available: BTreeMap<SliceId, usize> = BTreeMap::new();
        for (key, stored) in &self.durable.keys {
            if stored.status == KeyStatus::Available {
                *available.entry(stored.slice).or_default() += 1;
                if !self.holdings.contains(&stored.sku, *key) {
                    return Err(format!("{}: key {key} is stored available but not in Holdings", self.id));
                }
            }
        }
        for (id, holding) in self.holdings.slices() {
            let stored = available.get(id).copied().unwrap_or(0);
            if holding.available != stored {
                return Err(format!(
                    "{}: slice {id} has {} available in Holdings, {stored} stored",
                    self.id, holding.available
                ));
            }
        }
        Ok(())
    }
}
