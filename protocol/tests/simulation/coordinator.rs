//! The simulated coordinator: the key ledger, slices, move tickets and each node's sync state.
//! Every public method is one durable transaction, so a crash loses only messages in flight.
//!
//! As in the real coordinator (`coordinator/src/slices.rs`), a reclaimed slice's reconcile close
//! is queued at reclaim time, not when the node next uploads (`Mutation::ReconcileOnNextUpload`
//! is the later rule, and `a_reconcile_close_queued_at_the_next_upload_strands_keys` shows why
//! it fails).
//!
//! The ledger keeps each key in exactly one collection (the pool, a slice's granted, quarantined
//! or written-off set, or the sold map), with an index from key to place; the checks count the
//! collections themselves, so a transition that forgets to remove a key from where it was shows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use edgecard_protocol::rebalance::{Destination, LayoutView, Plan, SliceView};
use edgecard_protocol::{
    lease, ControlMessage, Epoch, KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, Sku, SliceId, SyncAck,
    SyncUpload, UnixMillis,
};

use crate::config::{Mutation, KEY_BLOCK, LEASE_MS, MAX_SKEW_MS};
use crate::net::{Control, GrantTerms, Shrink};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    Active,
    /// A close was sent (drain); keys under the node's open reservations are still out there.
    Closing,
    /// Reclaimed from a dark node; a reconcile close goes out when it is next heard from.
    Reclaimed,
}

#[derive(Debug, Clone)]
pub struct CoordSlice {
    pub node: usize,
    pub sku: Sku,
    pub epoch: Epoch,
    pub lease_deadline: UnixMillis,
    pub take_window: u64,
    pub state: SliceState,
    pub granted: BTreeSet<KeyId>,
    pub quarantined: BTreeSet<KeyId>,
    pub written_off: BTreeSet<KeyId>,
}

/// Slices by id; ids are dense from 1, so a vector (scanned every step) is enough.
#[derive(Debug, Default)]
struct Slices(Vec<CoordSlice>);

impl Slices {
    fn push(&mut self, slice: CoordSlice) -> SliceId {
        self.0.push(slice);
        SliceId(self.0.len() as u64)
    }

    fn get_mut(&mut self, id: &SliceId) -> Option<&mut CoordSlice> {
        self.0.get_mut((id.0 as usize).checked_sub(1)?)
    }

    fn iter(&self) -> impl Iterator<Item = (SliceId, &CoordSlice)> {
        self.0.iter().enumerate().map(|(i, slice)| (SliceId(i as u64 + 1), slice))
    }

    fn values(&self) -> impl Iterator<Item = &CoordSlice> {
        self.0.iter()
    }
}

impl std::ops::Index<&SliceId> for Slices {
    type Output = CoordSlice;

    fn index(&self, id: &SliceId) -> &CoordSlice {
        &self.0[id.0 as usize - 1]
    }
}

/// Where a key is in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Pool,
    Granted(SliceId),
    Quarantined(SliceId),
    WrittenOff(SliceId),
    Sold(OrderId),
}

#[derive(Debug, Clone)]
struct NodeLink {
    id: NodeId,
    high_water: u64,
    /// Queued control messages the node has not reported applied.
    control: VecDeque<(u64, Control)>,
    next_control: u64,
    /// Reclaimed slices whose reconcile close goes out with the node's next ack.
    reconcile: BTreeSet<SliceId>,
}

#[derive(Debug, Default, Clone)]
pub struct CoordStats {
    pub slices_granted: u64,
    pub reclaims: u64,
    pub keys_quarantined: u64,
    pub keys_reclaimed_to_pool: u64,
    pub quarantine_released: u64,
    pub quarantine_sold: u64,
    pub keys_moved: u64,
    pub renewals: u64,
    pub written_off: u64,
}

pub struct Coordinator {
    skus: Vec<Sku>,
    imported: usize,
    pool: BTreeMap<Sku, BTreeSet<KeyId>>,
    slices: Slices,
    sold: BTreeMap<KeyId, OrderId>,
    place: BTreeMap<KeyId, Place>,
    nodes: Vec<NodeLink>,
    /// Orders whose Reserved the ledger has, and neither Delivered nor Expired: (node, keys).
    open_reservations: BTreeMap<OrderId, (usize, Vec<KeyId>)>,
    tickets: BTreeMap<u64, Destination>,
    next_ticket: u64,
    windows: Rng,
    max_take_window: u64,
    mutation: Mutation,
    /// Per sku, the id the next imported key gets.
    next_key: Vec<u64>,
    pub alarms: Vec<String>,
    pub down_until: u64,
    pub stats: CoordStats,
}

impl Coordinator {
    pub fn new(
        nodes: usize,
        skus: usize,
        keys_per_sku: u64,
        max_take_window: u64,
        windows: Rng,
        mutation: Mutation,
    ) -> Self {
        let skus: Vec<Sku> = (0..skus).map(|i| Sku::new(format!("sku-{i}")).expect("valid sku")).collect();
        let mut pool = BTreeMap::new();
        let mut place = BTreeMap::new();
        for (i, sku) in skus.iter().enumerate() {
            let keys: BTreeSet<KeyId> = (1..=keys_per_sku).map(|n| KeyId(i as u64 * KEY_BLOCK + n)).collect();
            place.extend(keys.iter().map(|key| (*key, Place::Pool)));
            pool.insert(sku.clone(), keys);
        }
        let links = (0..nodes)
            .map(|i| NodeLink {
                id: NodeId::new(format!("n{i}")).expect("valid node id"),
                high_water: 0,
                control: VecDeque::new(),
                next_control: 1,
                reconcile: BTreeSet::new(),
            })
            .collect();
        Coordinator {
            imported: place.len(),
            pool,
            slices: Slices::default(),
            sold: BTreeMap::new(),
            place,
            nodes: links,
            open_reservations: BTreeMap::new(),
            tickets: BTreeMap::new(),
            next_ticket: 1,
            windows,
            max_take_window,
            mutation,
            next_key: vec![keys_per_sku + 1; skus.len()],
            skus,
            alarms: Vec::new(),
            down_until: 0,
            stats: CoordStats::default(),
        }
    }

    pub fn is_up(&self, now: u64) -> bool {
        now >= self.down_until
    }

    pub fn skus(&self) -> &[Sku] {
        &self.skus
    }

    fn sku_of(&self, key: KeyId) -> &Sku {
        &self.skus[(key.0 / KEY_BLOCK) as usize]
    }

    fn node_index(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|link| &link.id == id)
    }

    // --- the ledger's one transition ---

    /// Moves `key` from wherever it is to `to`, in the collections and the index alike.
    fn relocate(&mut self, key: KeyId, to: Place) {
        let from = self.place[&key];
        let sku = self.sku_of(key).clone();
        let removed = match from {
            Place::Pool => self.pool.get_mut(&sku).is_some_and(|keys| keys.remove(&key)),
            Place::Granted(s) => self.slices.get_mut(&s).is_some_and(|slice| slice.granted.remove(&key)),
            Place::Quarantined(s) => self.slices.get_mut(&s).is_some_and(|slice| slice.quarantined.remove(&key)),
            Place::WrittenOff(s) => self.slices.get_mut(&s).is_some_and(|slice| slice.written_off.remove(&key)),
            Place::Sold(_) => self.sold.remove(&key).is_some(),
        };
        if !removed {
            self.alarms.push(format!("ledger index says key {key} is {from:?}, but it is not there"));
        }
        match to {
            Place::Pool => {
                self.pool.entry(sku).or_default().insert(key);
            }
            Place::Granted(s) => {
                self.slice_mut(s).granted.insert(key);
            }
            Place::Quarantined(s) => {
                self.slice_mut(s).quarantined.insert(key);
            }
            Place::WrittenOff(s) => {
                self.slice_mut(s).written_off.insert(key);
            }
            Place::Sold(order) => {
                self.sold.insert(key, order);
            }
        }
        self.place.insert(key, to);
    }

    fn slice_mut(&mut self, slice: SliceId) -> &mut CoordSlice {
        self.slices.get_mut(&slice).expect("a known slice")
    }

    /// Whether `key` is out at `node` under `slice` (granted, quarantined or written off there).
    fn held_by(&self, key: KeyId, node: usize) -> Option<SliceId> {
        match self.place.get(&key)? {
            Place::Granted(s) | Place::Quarantined(s) | Place::WrittenOff(s) if self.slices[s].node == node => Some(*s),
            _ => None,
        }
    }

    pub fn place_of(&self, key: KeyId) -> Place {
        self.place[&key]
    }

    pub fn slice_node(&self, slice: SliceId) -> usize {
        self.slices[&slice].node
    }

    pub fn keys(&self) -> impl Iterator<Item = (&KeyId, &Place)> {
        self.place.iter()
    }

    // --- operator ---

    /// New keys for sku number `sku`, into the pool.
    pub fn import(&mut self, sku: usize, count: u64) {
        let first = self.next_key[sku];
        self.next_key[sku] += count;
        for n in first..first + count {
            let key = KeyId(sku as u64 * KEY_BLOCK + n);
            self.pool.entry(self.skus[sku].clone()).or_default().insert(key);
            self.place.insert(key, Place::Pool);
        }
        self.imported += count as usize;
    }

    /// A new slice of the `count` lowest pool keys of `sku` for `node`.
    pub fn allocate(&mut self, now: u64, sku: &Sku, node: usize, count: usize) -> Option<SliceId> {
        let keys: Vec<KeyId> = self.pool.get(sku)?.iter().take(count).copied().collect();
        if keys.is_empty() {
            return None;
        }
        Some(self.grant_slice(now, node, sku.clone(), keys))
    }

    fn grant_slice(&mut self, now: u64, node: usize, sku: Sku, keys: Vec<KeyId>) -> SliceId {
        let take_window = self.windows.range(1, self.max_take_window);
        let lease_deadline = UnixMillis(now + LEASE_MS);
        let slice = CoordSlice {
            node,
            sku: sku.clone(),
            epoch: Epoch(1),
            lease_deadline,
            take_window,
            state: SliceState::Active,
            granted: BTreeSet::new(),
            quarantined: BTreeSet::new(),
            written_off: BTreeSet::new(),
        };
        let slice_id = self.slices.push(slice);
        for key in &keys {
            self.relocate(*key, Place::Granted(slice_id));
        }
        let grant = GrantTerms { slice_id, sku, epoch: Epoch(1), lease_deadline, take_window, keys };
        self.queue(node, Control::Grant(grant));
        self.stats.slices_granted += 1;
        slice_id
    }

    fn queue(&mut self, node: usize, control: Control) {
        let link = &mut self.nodes[node];
        link.control.push_back((link.next_control, control));
        link.next_control += 1;
    }

    fn new_ticket(&mut self, to: Destination) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, to);
        ticket
    }

    /// The planner's view: Active slices and what the ledger counts unsold in them.
    pub fn layout_view(&self) -> LayoutView {
        LayoutView {
            nodes: self.nodes.iter().map(|link| link.id.clone()).collect(),
            slices: self
                .slices
                .iter()
                .filter(|(_, s)| s.state == SliceState::Active)
                .map(|(id, s)| SliceView {
                    slice_id: id,
                    node: self.nodes[s.node].id.clone(),
                    sku: s.sku.clone(),
                    unsold: s.granted.len() as u64,
                })
                .collect(),
            pool: self.pool.iter().map(|(sku, keys)| (sku.clone(), keys.len() as u64)).collect(),
        }
    }

    pub fn node_id(&self, node: usize) -> &NodeId {
        &self.nodes[node].id
    }

    /// Applies a plan: each donor slice gets a new epoch and a shrink (or close) whose ticket
    /// remembers where the released keys go. Nothing is granted to a recipient here.
    pub fn apply_plan(&mut self, plan: &Plan) {
        for step in &plan.steps {
            let ticket = self.new_ticket(step.to.clone());
            let slice = self.slices.get_mut(&step.slice_id).expect("a planned slice");
            slice.epoch = Epoch(slice.epoch.0 + 1);
            if step.close {
                slice.state = SliceState::Closing;
            }
            let shrink = Shrink {
                slice_id: step.slice_id,
                sku: slice.sku.clone(),
                epoch: slice.epoch,
                count: step.count,
                close: step.close,
                ticket,
            };
            let node = slice.node;
            self.queue(node, Control::Shrink(shrink));
        }
    }

    /// Reclaims every slice past its deadline plus the skew margin: keys the node may have
    /// touched unseen are quarantined, the rest go back to the pool.
    pub fn reclaim_due(&mut self, now: u64) -> Vec<SliceId> {
        let margin = if self.mutation == Mutation::ReclaimWithoutSkewMargin { 0 } else { MAX_SKEW_MS };
        let due: Vec<SliceId> = self
            .slices
            .iter()
            .filter(|(_, s)| matches!(s.state, SliceState::Active | SliceState::Closing))
            .filter(|(_, s)| lease::reclaimable(s.lease_deadline, UnixMillis(now), margin))
            .map(|(id, _)| id)
            .collect();
        for slice_id in &due {
            let slice = &self.slices[slice_id];
            let node = slice.node;
            let unsold: Vec<KeyId> = slice.granted.iter().copied().collect();
            let held: BTreeSet<KeyId> = self
                .open_reservations
                .values()
                .filter(|(n, _)| *n == node)
                .flat_map(|(_, keys)| keys.iter().copied())
                .collect();
            let window = if self.mutation == Mutation::ReclaimWithoutWindow { 0 } else { slice.take_window };
            let split = lease::split_for_reclaim(&unsold, &held, window);
            self.stats.keys_quarantined += split.quarantined.len() as u64;
            self.stats.keys_reclaimed_to_pool += split.reclaimed.len() as u64;
            for key in split.quarantined {
                self.relocate(key, Place::Quarantined(*slice_id));
            }
            for key in split.reclaimed {
                self.relocate(key, Place::Pool);
            }
            self.slices.get_mut(slice_id).expect("a due slice").state = SliceState::Reclaimed;
            self.nodes[node].reconcile.insert(*slice_id);
            // Queued now, the close precedes every grant that may carry the keys just pooled, so
            // the node has dropped them before it is offered them again.
            if self.mutation != Mutation::ReconcileOnNextUpload {
                self.queue_reconciles(node);
            }
            self.stats.reclaims += 1;
        }
        due
    }

    /// The operator gives up on one reclaimed slice's quarantined keys.
    pub fn write_off(&mut self, rng: &mut Rng) -> Option<SliceId> {
        let candidates: Vec<SliceId> =
            self.slices.iter().filter(|(_, s)| !s.quarantined.is_empty()).map(|(id, _)| id).collect();
        let slice_id = rng.pick(&candidates)?;
        let keys: Vec<KeyId> = self.slices[&slice_id].quarantined.iter().copied().collect();
        self.stats.written_off += keys.len() as u64;
        for key in keys {
            self.relocate(key, Place::WrittenOff(slice_id));
        }
        Some(slice_id)
    }

    // --- sync ---

    /// Ingests an upload exactly once and answers it: the new high-water mark, and the control
    /// messages after what the node has applied (with the terms of grants and renewals).
    pub fn ingest(&mut self, now: u64, node: usize, upload: &SyncUpload) -> (SyncAck, Vec<(u64, Control)>) {
        for event in &upload.events {
            let high_water = self.nodes[node].high_water;
            if event.seq <= high_water {
                continue;
            }
            if event.seq != high_water + 1 {
                self.alarms.push(format!("n{node}: events {} to {} never arrived", high_water + 1, event.seq - 1));
            }
            self.nodes[node].high_water = event.seq;
            self.apply_event(now, node, event);
        }
        let link = &mut self.nodes[node];
        while link.control.front().is_some_and(|(seq, _)| *seq <= upload.control_applied) {
            link.control.pop_front();
        }
        self.queue_renewals(now, node);
        self.queue_reconciles(node);
        // Never ack past what this upload carried: the node would take that as a protocol error.
        let high_water = self.nodes[node].high_water;
        let events_high_water = upload.events.last().map_or(high_water, |last| high_water.min(last.seq));
        let queued = &self.nodes[node].control;
        let control = queued.iter().map(|(seq, c)| ControlMessage { seq: *seq, body: c.wire_body() }).collect();
        let terms = queued.iter().filter(|(_, c)| !matches!(c, Control::Shrink(_))).cloned().collect();
        (
            SyncAck { events_high_water, control, ledger_high_water: high_water, restore: Vec::new(), confirmed: true },
            terms,
        )
    }

    /// Renews every Active slice of `node` past half its lease; the new deadline is recorded at
    /// once, so the ledger's deadline is never earlier than the node's.
    fn queue_renewals(&mut self, now: u64, node: usize) {
        let due: Vec<SliceId> = self
            .slices
            .iter()
            .filter(|(_, s)| s.node == node && s.state == SliceState::Active)
            .filter(|(_, s)| lease::renewal_due(s.lease_deadline, UnixMillis(now), LEASE_MS))
            .map(|(id, _)| id)
            .collect();
        for slice_id in due {
            let slice = self.slices.get_mut(&slice_id).expect("a due slice");
            slice.lease_deadline = UnixMillis(now + LEASE_MS);
            let renew = Control::Renew { slice_id, epoch: slice.epoch, lease_deadline: slice.lease_deadline };
            self.queue(node, renew);
            self.stats.renewals += 1;
        }
    }

    /// The node is back: close each of its reclaimed slices, so it releases what it still has.
    fn queue_reconciles(&mut self, node: usize) {
        for slice_id in std::mem::take(&mut self.nodes[node].reconcile) {
            let ticket = self.new_ticket(Destination::Pool);
            let slice = self.slices.get_mut(&slice_id).expect("a reclaimed slice");
            slice.epoch = Epoch(slice.epoch.0 + 1);
            let shrink =
                Shrink { slice_id, sku: slice.sku.clone(), epoch: slice.epoch, count: u64::MAX, close: true, ticket };
            self.queue(node, Control::Shrink(shrink));
        }
    }

    fn apply_event(&mut self, now: u64, node: usize, event: &OrderEvent) {
        match &event.kind {
            OrderEventKind::Reserved { key_ids, .. } => {
                if let Some(alarm) = key_ids.iter().find_map(|key| self.not_held(node, event, *key)) {
                    self.alarms.push(alarm);
                    return;
                }
                self.open_reservations.insert(event.order_id, (node, key_ids.clone()));
            }
            OrderEventKind::Delivered { key_ids } => {
                self.open_reservations.remove(&event.order_id);
                if let Some(alarm) = key_ids.iter().find_map(|key| self.not_deliverable(node, event, *key)) {
                    self.alarms.push(alarm);
                    return;
                }
                for key in key_ids {
                    if let Place::Quarantined(_) | Place::WrittenOff(_) = self.place[key] {
                        self.stats.quarantine_sold += 1;
                    }
                    self.relocate(*key, Place::Sold(event.order_id));
                }
            }
            OrderEventKind::Expired { .. } => {
                self.open_reservations.remove(&event.order_id);
            }
            OrderEventKind::Released { slice_id, ticket, key_ids, .. } => {
                self.on_released(now, node, *slice_id, *ticket, key_ids);
            }
            // The simulated shop pays exactly and never refunds: these do not occur.
            OrderEventKind::Paid { .. }
            | OrderEventKind::AwaitingStock { .. }
            | OrderEventKind::PaymentUnmatched { .. }
            | OrderEventKind::PaymentMismatch { .. }
            | OrderEventKind::Refunded { .. }
            | OrderEventKind::Disputed { .. } => {}
        }
    }

    fn not_held(&self, node: usize, event: &OrderEvent, key: KeyId) -> Option<String> {
        match self.held_by(key, node) {
            Some(_) => None,
            None => Some(format!(
                "n{node} seq {}: {:?} names key {key}, which the ledger has as {:?}",
                event.seq,
                event.kind,
                self.place.get(&key)
            )),
        }
    }

    fn not_deliverable(&self, node: usize, event: &OrderEvent, key: KeyId) -> Option<String> {
        match self.place.get(&key) {
            Some(Place::Sold(order)) if *order != event.order_id => Some(format!(
                "n{node} seq {}: key {key} delivered to order {}, already sold to order {order}",
                event.seq, event.order_id
            )),
            Some(Place::Sold(_)) => None,
            _ => self.not_held(node, event, key),
        }
    }

    /// Keys a node released under `ticket`: those still out at that node under that slice go to
    /// the ticket's destination (a new slice for a move's recipient, or the pool); keys already
    /// reclaimed elsewhere are left alone.
    fn on_released(&mut self, now: u64, node: usize, slice_id: SliceId, ticket: u64, key_ids: &[KeyId]) {
        let Some(to) = self.tickets.get(&ticket).cloned() else {
            self.alarms.push(format!("n{node}: release of slice {slice_id} under unknown ticket {ticket}"));
            return;
        };
        let mut released = Vec::new();
        for key in key_ids {
            match self.place.get(key) {
                Some(Place::Granted(s)) if *s == slice_id && self.slices[s].node == node => released.push(*key),
                Some(Place::Quarantined(s)) if *s == slice_id && self.slices[s].node == node => {
                    self.stats.quarantine_released += 1;
                    released.push(*key);
                }
                _ => {}
            }
        }
        match to {
            Destination::Pool => {
                for key in released {
                    self.relocate(key, Place::Pool);
                }
            }
            Destination::Node(recipient) if !released.is_empty() => {
                let Some(recipient) = self.node_index(&recipient) else {
                    self.alarms.push(format!("ticket {ticket} names unknown node {recipient}"));
                    return;
                };
                self.stats.keys_moved += released.len() as u64;
                let sku = self.slices[&slice_id].sku.clone();
                self.grant_slice(now, recipient, sku, released);
            }
            Destination::Node(_) => {}
        }
    }

    // --- checks and inspection ---

    /// pool + granted + sold + quarantined + written off = imported, counted from the collections.
    pub fn check_conservation(&self) -> Result<(), String> {
        let pool: usize = self.pool.values().map(BTreeSet::len).sum();
        let (mut granted, mut quarantined, mut written_off) = (0, 0, 0);
        for slice in self.slices.values() {
            granted += slice.granted.len();
            quarantined += slice.quarantined.len();
            written_off += slice.written_off.len();
        }
        let sold = self.sold.len();
        let total = pool + granted + sold + quarantined + written_off;
        if total == self.imported {
            Ok(())
        } else {
            Err(format!(
                "pool {pool} + granted {granted} + sold {sold} + quarantined {quarantined} + written off \
                 {written_off} = {total}, imported {}",
                self.imported
            ))
        }
    }

    /// Every imported key is in exactly one collection, and the index says which.
    pub fn check_ledger_index(&self) -> Result<(), String> {
        let mut found: BTreeMap<KeyId, Place> = BTreeMap::new();
        let mut note = |key: KeyId, place: Place| match found.insert(key, place) {
            Some(other) => Err(format!("key {key} is both {other:?} and {place:?}")),
            None => Ok(()),
        };
        for key in self.pool.values().flatten() {
            note(*key, Place::Pool)?;
        }
        for (id, slice) in self.slices.iter() {
            for key in &slice.granted {
                note(*key, Place::Granted(id))?;
            }
            for key in &slice.quarantined {
                note(*key, Place::Quarantined(id))?;
            }
            for key in &slice.written_off {
                note(*key, Place::WrittenOff(id))?;
            }
        }
        for (key, order) in &self.sold {
            note(*key, Place::Sold(*order))?;
        }
        if found != self.place {
            let differs = self.place.iter().find(|(key, place)| found.get(key) != Some(place));
            return Err(format!("ledger index disagrees with the collections at {differs:?}"));
        }
        Ok(())
    }

    /// Whether the ledger has `key` granted to `node` under `slice`, the only state in which
    /// the node may take or deliver it.
    pub fn grants(&self, key: KeyId, slice: SliceId, node: usize) -> bool {
        self.place.get(&key) == Some(&Place::Granted(slice)) && self.slices[&slice].node == node
    }

    pub fn quarantined(&self) -> Vec<(SliceId, usize, Vec<KeyId>)> {
        self.slices
            .iter()
            .filter(|(_, s)| !s.quarantined.is_empty())
            .map(|(id, s)| (id, s.node, s.quarantined.iter().copied().collect()))
            .collect()
    }

    pub fn high_water(&self, node: usize) -> u64 {
        self.nodes[node].high_water
    }

    /// The newest control message queued for `node` that it has not yet reported applied.
    pub fn last_queued_control(&self, node: usize) -> u64 {
        self.nodes[node].control.back().map_or(0, |(seq, _)| *seq)
    }

    pub fn reconcile_pending(&self, node: usize) -> bool {
        !self.nodes[node].reconcile.is_empty()
    }
}
