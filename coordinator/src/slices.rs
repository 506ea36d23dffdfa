//! Slices after allocation: what nodes release (moves, drains, reconciles), regrants to
//! recipients, dark-node reclaim and write-off, automatic top-ups, and the per-slice counts that
//! status and planning show.
//!
//! Demarcation order throughout: keys reach a recipient only from the pool, and reach the pool
//! only when the donor's `Released` event is in the ledger (or, for a dark node, when the reclaim
//! rule proves them untouched; the node is then told to close the slice before anything else).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use edgecard_protocol::lease;
use edgecard_protocol::rebalance::Destination;
use edgecard_protocol::{Epoch, KeyId, NodeId, RefusedControl, SignedGrant, Sku, SliceId, SliceStock, UnixMillis};
use edgecard_store::{StoreError, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::records::{self as rec, *};
use crate::service::{now_millis, Coordinator, CoordinatorError, CONTROL_GRANT, CONTROL_SHRINK};

/// A node's `Released` event, as ingest hands it over.
pub(crate) struct Release<'a> {
    pub sku: &'a Sku,
    pub slice_id: SliceId,
    pub ticket: u64,
    pub key_ids: &'a [KeyId],
}

/// What releases change in one ingest batch, written once at its end.
#[derive(Default)]
pub(crate) struct ReleaseOverlay {
    pools: HashMap<Sku, Vec<(u64, u64)>>,
    moves: HashMap<u64, MoveRecord>,
}

impl ReleaseOverlay {
    /// Whether some release in this batch is waiting to be granted to a recipient.
    pub(crate) fn has_regrants(&self) -> bool {
        self.moves.values().any(|m| !m.pending_regrant.is_empty())
    }

    /// Puts `ids` of `sku` back into the pool as part of this batch.
    pub(crate) fn return_to_pool(&mut self, c: &Coordinator, sku: &Sku, ids: &[KeyId]) -> Result<(), StoreError> {
        if !self.pools.contains_key(sku) {
            self.pools.insert(sku.clone(), c.pool_runs(sku)?);
        }
        if let Some(pool) = self.pools.get_mut(sku) {
            for (start, end) in rec::runs_of(ids) {
                rec::add_run(pool, start, end);
            }
        }
        Ok(())
    }

    pub(crate) fn write(self, batch: &mut WriteBatch) -> Result<(), StoreError> {
        for (sku, pool) in self.pools {
            batch.put(rec::pool_key(&sku), rec::encode(&pool)?);
        }
        for (ticket, record) in self.moves {
            batch.put(rec::move_key(ticket), rec::encode(&record)?);
        }
        Ok(())
    }
}

/// A queued `Shrink` control message as stored.
#[derive(Debug, Clone, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct ShrinkOrder {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub epoch: Epoch,
    pub count: u64,
    pub close: bool,
    pub ticket: u64,
}

/// A slice with its keys counted by where they are now.
#[derive(Debug, Clone, Serialize)]
pub struct SliceSummary {
    #[serde(flatten)]
    pub slice: SliceRecord,
    /// Granted and not known as sold.
    pub unsold: u64,
    pub sold: u64,
    pub quarantined: u64,
    pub written_off: u64,
    /// Sold, then revoked by a refund (counted in `sold` too).
    pub revoked: u64,
}

/// What one reclaim did to a dark node's slice.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReclaimReport {
    pub slice_id: SliceId,
    pub node: NodeId,
    pub sku: Sku,
    pub returned_to_pool: u64,
    pub quarantined: u64,
}

/// How many recent top-ups a node record keeps for status.
const TOPUPS_KEPT: usize = 10;

impl Coordinator {
    /// Reserves `n` consecutive tickets in `batch`; returns the first.
    pub(crate) fn take_tickets(&self, batch: &mut WriteBatch, n: u64) -> Result<u64, StoreError> {
        self.next_counter(batch, "next_ticket", n)
    }

    pub fn moves(&self) -> Result<Vec<MoveRecord>, StoreError> {
        self.store.scan_prefix(b"t/").map(|item| rec::decode("move", &item?.1)).collect()
    }

    /// Applies a node's release to the key overlay of an ingest batch: keys still the node's in
    /// that slice go to the pool, and, for a move, are noted for the recipient. Keys in any other
    /// state (already reclaimed, say) are left alone.
    pub(crate) fn ingest_release(
        &self,
        node: &NodeRecord,
        release: Release<'_>,
        keys: &mut HashMap<(Sku, KeyId), KeyRecord>,
        overlay: &mut ReleaseOverlay,
    ) -> Result<(), StoreError> {
        let mut freed = Vec::new();
        for id in release.key_ids {
            let slot = (release.sku.clone(), *id);
            let record = match keys.get(&slot) {
                Some(record) => Some(record.clone()),
                None => self.load::<KeyRecord>("key", &rec::key_key(release.sku, *id))?,
            };
            let Some(mut record) = record else { continue };
            let ours = matches!(
                record.state,
                KeyState::Granted { slice, node_index }
                | KeyState::Quarantined { slice, node_index }
                | KeyState::WrittenOff { slice, node_index }
                    if slice == release.slice_id && node_index == node.index
            );
            if ours {
                record.state = KeyState::Pool;
                keys.insert(slot, record);
                freed.push(*id);
            }
        }
        let runs = rec::runs_of(&freed);
        if !overlay.pools.contains_key(release.sku) {
            overlay.pools.insert(release.sku.clone(), self.pool_runs(release.sku)?);
        }
        if let Some(pool) = overlay.pools.get_mut(release.sku) {
            for (start, end) in &runs {
                rec::add_run(pool, *start, *end);
            }
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = overlay.moves.entry(release.ticket) {
            if let Some(found) = self.load::<MoveRecord>("move", &rec::move_key(release.ticket))? {
                slot.insert(found);
            }
        }
        let ignored = release.key_ids.len() - freed.len();
        match overlay.moves.get_mut(&release.ticket) {
            Some(record) if record.order.slice_id == release.slice_id && record.order.from == node.node_id => {
                record.released += freed.len() as u64;
                if matches!(record.order.to, Destination::Node(_)) {
                    for (start, end) in runs {
                        rec::add_run(&mut record.pending_regrant, start, end);
                    }
                }
                if record.state == MoveState::AwaitingDonor {
                    record.state = if record.order.close { MoveState::Releasing } else { MoveState::Done };
                }
                tracing::info!(ticket = release.ticket, slice = %release.slice_id, node = %node.node_id,
                    released = freed.len(), ignored, "donor released keys");
            }
            _ => tracing::warn!(ticket = release.ticket, slice = %release.slice_id, node = %node.node_id,
                released = freed.len(), ignored, "release under an unknown ticket: keys back to the pool"),
        }
        Ok(())
    }

    /// Records control messages a node refused for good: each raises an alarm. A refused grant
    /// whose slice the node holds nothing of (it says so, and its stock report agrees) never
    /// reached the shelf: its keys still granted there go back to the pool and the slice is
    /// closed, so the coordinator stops counting them at the node. Runs inside ingest, before the
    /// node's acknowledged control messages are deleted (their bodies name the slices).
    pub(crate) fn settle_refused_control(
        &self,
        batch: &mut WriteBatch,
        node: &NodeRecord,
        refused: &[RefusedControl],
        stock: &[SliceStock],
        keys: &mut HashMap<(Sku, KeyId), KeyRecord>,
        overlay: &mut ReleaseOverlay,
    ) -> Result<Vec<(&'static str, String)>, CoordinatorError> {
        let mut alarms = Vec::new();
        for refusal in refused {
            let stored = self.store.get(&rec::control_key(&node.node_id, refusal.seq))?;
            let Some((&tag, payload)) = stored.as_deref().and_then(<[u8]>::split_first) else {
                // Reported before, and its message is gone: recorded already.
                continue;
            };
            if tag == crate::service::CONTROL_REFUND {
                let order = self.refuse_refund(batch, payload, &refusal.reason)?;
                let order = order.map_or_else(|| "?".to_string(), |o| o.to_string());
                alarms.push(("refund_refused", format!("refund of order {order} refused: {}", refusal.reason)));
                continue;
            }
            let slice = (tag == CONTROL_GRANT)
                .then(|| {
                    SignedGrant::from_bytes(payload)
                        .and_then(|g| g.verify(&self.signing_key.verifying_key(), &node.node_id))
                })
                .and_then(Result::ok);
            let Some(grant) = slice else {
                alarms.push(("control_refused", format!("control {} refused: {}", refusal.seq, refusal.reason)));
                continue;
            };
            let held = stock.iter().any(|s| s.slice_id == grant.slice_id);
            let record = self.load::<SliceRecord>("slice", &rec::slice_key(grant.slice_id))?;
            let returned = match record {
                Some(mut slice) if refusal.holds_nothing && !held && slice.state == SliceState::Active => {
                    let mut freed = Vec::new();
                    for id in slice.key_ids() {
                        let slot = (slice.sku.clone(), id);
                        let record = match keys.get(&slot) {
                            Some(record) => Some(record.clone()),
                            None => self.load::<KeyRecord>("key", &rec::key_key(&slice.sku, id))?,
                        };
                        let Some(mut record) = record else { continue };
                        if record.state == (KeyState::Granted { slice: slice.slice_id, node_index: node.index }) {
                            record.state = KeyState::Pool;
                            keys.insert(slot, record);
                            freed.push(id);
                        }
                    }
                    overlay.return_to_pool(self, &slice.sku, &freed)?;
                    slice.state = SliceState::Closed;
                    batch.put(rec::slice_key(slice.slice_id), rec::encode(&slice)?);
                    freed.len()
                }
                _ => 0,
            };
            alarms.push((
                "grant_refused",
                format!(
                    "control {} (slice {}) refused: {}; {returned} keys back in the pool",
                    refusal.seq, grant.slice_id, refusal.reason
                ),
            ));
        }
        Ok(alarms)
    }

    /// Grants keys that donors released for a recipient, as new slices. Runs under the lock
    /// after each ingest (and at start, after a crash between the two batches); keys no longer
    /// in the pool are skipped.
    pub(crate) fn complete_regrants(&self) -> Result<(), CoordinatorError> {
        for record in self.moves()?.into_iter().filter(|m| !m.pending_regrant.is_empty()) {
            let ticket = record.order.ticket;
            // One move that cannot finish (a key record damaged, say) must not hold up the
            // others, nor the ingest or housekeeping that called this: it stays pending, and is
            // retried by the next housekeeping round.
            if let Err(e) = self.regrant_move(record) {
                tracing::error!(ticket, error = %e, "granting released keys to the recipient failed; retried later");
            }
        }
        Ok(())
    }

    /// Grants one move's released keys to its recipient in bounded chunks. Each chunk is one
    /// atomic batch: its keys leave the pool, become the recipient's new slice, and leave the
    /// move's pending list together, so after a failure or a crash between chunks every key is
    /// still either pending (and in the pool) or granted.
    fn regrant_move(&self, mut record: MoveRecord) -> Result<(), CoordinatorError> {
        let recipient = match &record.order.to {
            Destination::Node(to) => self.node(to).ok().filter(|n| !n.revoked),
            Destination::Pool => None,
        };
        let sku = record.order.sku.clone();
        let Some(recipient) = recipient else {
            tracing::warn!(ticket = record.order.ticket, "recipient gone: released keys stay in the pool");
            record.pending_regrant.clear();
            let mut batch = WriteBatch::default();
            batch.put(rec::move_key(record.order.ticket), rec::encode(&record)?);
            self.store.apply(batch)?;
            return Ok(());
        };
        let pending: Vec<KeyId> = record.pending_regrant.iter().flat_map(|(a, b)| (*a..=*b).map(KeyId)).collect();
        for (done, chunk) in pending.chunks(self.settings.regrant_keys_per_batch.max(1)).enumerate() {
            let mut batch = WriteBatch::default();
            let mut pool = self.pool_runs(&sku)?;
            // Keys no longer in the pool (taken some other way meanwhile) are skipped.
            let ids: Vec<KeyId> = chunk.iter().copied().filter(|id| rec::remove_id(&mut pool, id.0)).collect();
            if !ids.is_empty() {
                let recipient = self.node(&recipient.node_id)?;
                let (slices, _) = self.grant_slices_into(&mut batch, recipient, &sku, &ids, now_millis())?;
                for slice in slices {
                    record.regranted.push(slice.slice_id);
                    tracing::info!(ticket = record.order.ticket, slice = %slice.slice_id, to = %slice.node,
                        keys = slice.key_count(), "moved keys granted to the recipient");
                }
            }
            let granted_through = (done + 1) * self.settings.regrant_keys_per_batch.max(1);
            record.pending_regrant = rec::runs_of(pending.get(granted_through..).unwrap_or_default());
            batch.put(rec::pool_key(&sku), rec::encode(&pool)?);
            batch.put(rec::move_key(record.order.ticket), rec::encode(&record)?);
            self.store.apply(batch)?;
        }
        Ok(())
    }

    /// Queues into `batch` the order that closes a reclaimed slice at its node, under a fresh
    /// ticket, and returns the node record and the ticket. It is queued at reclaim time, before
    /// any grant of the keys the reclaim pooled: control messages arrive in order, so the node
    /// (back in contact) drops the slice before it could be offered those keys again.
    fn queue_reconcile(
        &self,
        batch: &mut WriteBatch,
        node: NodeRecord,
        slice: &mut SliceRecord,
        now: UnixMillis,
    ) -> Result<(NodeRecord, u64), CoordinatorError> {
        let ticket = self.take_tickets(batch, 1)?;
        slice.epoch = Epoch(slice.epoch.0 + 1);
        slice.state = SliceState::Reclaimed { at: now, reconcile_ticket: Some(ticket) };
        let order = ShrinkOrder {
            slice_id: slice.slice_id,
            sku: slice.sku.clone(),
            epoch: slice.epoch,
            count: u64::MAX,
            close: true,
            ticket,
        };
        let node = self.queue_control(batch, node, CONTROL_SHRINK, rec::encode(&order)?)?;
        let order = MoveOrder {
            ticket,
            kind: MoveKind::Reconcile,
            sku: slice.sku.clone(),
            slice_id: slice.slice_id,
            from: node.node_id.clone(),
            to: Destination::Pool,
            requested: u64::MAX,
            close: true,
        };
        let record = MoveRecord::sent(order, now);
        batch.put(rec::move_key(ticket), rec::encode(&record)?);
        Ok((node, ticket))
    }

    /// Tops up `node` from the pool for every sku with a policy whose sellable stock the node
    /// reported under the low watermark, unless a top-up is still in flight or the node is
    /// being drained.
    pub(crate) fn top_up(&self, node_id: &NodeId) -> Result<(), CoordinatorError> {
        // Runs on every upload: cheap checks first.
        let with_policy: Vec<(ProductRecord, TopUpPolicy)> =
            self.products()?.into_iter().filter_map(|p| p.topup.map(|policy| (p, policy))).collect();
        if with_policy.is_empty() {
            return Ok(());
        }
        let mut node = self.node(node_id)?;
        if node.revoked {
            return Ok(());
        }
        let draining = self.moves()?.iter().any(|m| m.in_flight() && m.order.close && &m.order.from == node_id);
        if draining {
            return Ok(());
        }
        for (product, policy) in with_policy {
            let in_flight = node.topups.iter().any(|t| t.sku == product.sku && t.control_seq > node.control_applied);
            let stock: u64 = node.stock.iter().filter(|s| s.sku == product.sku && s.selling).map(|s| s.available).sum();
            if in_flight || stock >= policy.low_watermark {
                continue;
            }
            let mut pool = self.pool_runs(&product.sku)?;
            let want = policy.target.saturating_sub(stock).min(rec::runs_len(&pool));
            let Some(free) = rec::take_lowest(&mut pool, want).filter(|f| !f.is_empty()) else { continue };
            let mut batch = WriteBatch::default();
            let now = now_millis();
            let (slices, updated) = self.grant_slices_into(&mut batch, node, &product.sku, &free, now)?;
            node = updated;
            // Another top-up waits until the node has applied the last of these grants.
            let seq = node.next_control_seq.saturating_sub(1);
            for slice in &slices {
                node.topups.push(TopUpRecord {
                    sku: product.sku.clone(),
                    slice_id: slice.slice_id,
                    keys: slice.key_count(),
                    at: now,
                    control_seq: seq,
                });
            }
            let excess = node.topups.len().saturating_sub(TOPUPS_KEPT);
            node.topups.drain(..excess);
            batch.put(rec::node_key(node_id), rec::encode(&node)?);
            batch.put(rec::pool_key(&product.sku), rec::encode(&pool)?);
            self.store.apply(batch)?;
            tracing::info!(node = %node_id, sku = %product.sku, keys = free.len(), stock, "top-up granted");
        }
        Ok(())
    }

    /// Reclaims the slices of nodes that went dark: past a slice's lease deadline plus the
    /// clock-skew margin, the node has stopped selling from it. Keys under reservations the
    /// ledger knows as open, and the lowest `take_window` of the rest, may have been sold without
    /// the coordinator knowing: quarantined. Everything above is provably untouched: back to the
    /// pool.
    pub async fn reclaim_expired(&self, now: UnixMillis) -> Result<Vec<ReclaimReport>, CoordinatorError> {
        let skew = self.settings.max_clock_skew.as_millis() as u64;
        let reports = {
            let _guard = self.lock.lock();
            let due: Vec<SliceRecord> = self
                .slices()?
                .into_iter()
                .filter(|s| matches!(s.state, SliceState::Active | SliceState::Closing { .. }))
                .filter(|s| lease::reclaimable(s.lease_deadline, now, skew))
                .collect();
            let mut reports = Vec::new();
            let mut held_by_node: HashMap<NodeId, BTreeSet<(Sku, KeyId)>> = HashMap::new();
            for mut slice in due {
                let node = self.node(&slice.node)?;
                if !held_by_node.contains_key(&slice.node) {
                    held_by_node.insert(slice.node.clone(), self.open_reservation_keys(&slice.node)?);
                }
                let held = held_by_node.get(&slice.node).cloned().unwrap_or_default();
                let mut batch = WriteBatch::default();
                let split = self.reclaim_slice_into(&mut batch, &node, &slice, &held)?;
                self.queue_reconcile(&mut batch, node, &mut slice, now)?;
                batch.put(rec::slice_key(slice.slice_id), rec::encode(&slice)?);
                self.store.apply(batch)?;
                tracing::warn!(slice = %slice.slice_id, node = %slice.node, returned = split.reclaimed.len(),
                    quarantined = split.quarantined.len(), "lease ran out: slice reclaimed from a dark node");
                reports.push(ReclaimReport {
                    slice_id: slice.slice_id,
                    node: slice.node.clone(),
                    sku: slice.sku.clone(),
                    returned_to_pool: split.reclaimed.len() as u64,
                    quarantined: split.quarantined.len() as u64,
                });
            }
            reports
        };
        if !reports.is_empty() {
            self.store.durable().await?;
        }
        Ok(reports)
    }

    /// Puts into `batch` the reclaim of `slice`'s unsold keys: those under reservations in `held`
    /// and the lowest `take_window` of the rest quarantined, the others back to the pool; moves
    /// of the slice in flight marked as reclaimed. The caller sets the slice's new state.
    fn reclaim_slice_into(
        &self,
        batch: &mut WriteBatch,
        node: &NodeRecord,
        slice: &SliceRecord,
        held: &BTreeSet<(Sku, KeyId)>,
    ) -> Result<lease::ReclaimSplit, CoordinatorError> {
        let held: BTreeSet<KeyId> = held.iter().filter(|(sku, _)| sku == &slice.sku).map(|(_, id)| *id).collect();
        let mut unsold = Vec::new();
        let mut records = HashMap::new();
        for id in slice.key_ids() {
            let Some(record) = self.load::<KeyRecord>("key", &rec::key_key(&slice.sku, id))? else { continue };
            if record.state == (KeyState::Granted { slice: slice.slice_id, node_index: node.index }) {
                unsold.push(id);
                records.insert(id, record);
            }
        }
        let split = lease::split_for_reclaim(&unsold, &held, slice.take_window);
        for (id, state) in split
            .quarantined
            .iter()
            .map(|id| (id, KeyState::Quarantined { slice: slice.slice_id, node_index: node.index }))
            .chain(split.reclaimed.iter().map(|id| (id, KeyState::Pool)))
        {
            if let Some(mut record) = records.remove(id) {
                record.state = state;
                batch.put(rec::key_key(&slice.sku, *id), rec::encode(&record)?);
            }
        }
        let mut pool = self.pool_runs(&slice.sku)?;
        for (start, end) in rec::runs_of(&split.reclaimed) {
            rec::add_run(&mut pool, start, end);
        }
        batch.put(rec::pool_key(&slice.sku), rec::encode(&pool)?);
        for mut record in self.moves()?.into_iter().filter(|m| m.order.slice_id == slice.slice_id && m.in_flight()) {
            record.state = MoveState::DonorReclaimed;
            batch.put(rec::move_key(record.order.ticket), rec::encode(&record)?);
        }
        Ok(split)
    }

    /// Reclaims every live slice of `node` when a new data dir replaces its old one: the new dir
    /// never held them, so nothing will be released; the take window stays quarantined (the old
    /// dir may have sold from it without reporting) until an operator writes it off. One batch
    /// per slice, like [`Self::reclaim_expired`]; repeating it after a crash finds nothing left.
    pub(crate) fn reclaim_for_replaced_dir(
        &self,
        node: &NodeRecord,
        now: UnixMillis,
    ) -> Result<usize, CoordinatorError> {
        let live: Vec<SliceRecord> = self
            .slices()?
            .into_iter()
            .filter(|s| s.node == node.node_id && matches!(s.state, SliceState::Active | SliceState::Closing { .. }))
            .collect();
        if live.is_empty() {
            return Ok(0);
        }
        let held = self.open_reservation_keys(&node.node_id)?;
        for mut slice in live.iter().cloned() {
            let mut batch = WriteBatch::default();
            let split = self.reclaim_slice_into(&mut batch, node, &slice, &held)?;
            slice.state = SliceState::Reclaimed { at: now, reconcile_ticket: None };
            batch.put(rec::slice_key(slice.slice_id), rec::encode(&slice)?);
            self.store.apply(batch)?;
            tracing::warn!(slice = %slice.slice_id, node = %slice.node, returned = split.reclaimed.len(),
                quarantined = split.quarantined.len(), "slice reclaimed from a replaced data dir");
        }
        Ok(live.len())
    }

    /// Keys of `node`'s orders that the ledger knows as reserved or paid but not delivered.
    fn open_reservation_keys(&self, node: &NodeId) -> Result<BTreeSet<(Sku, KeyId)>, StoreError> {
        let mut held = BTreeSet::new();
        for item in self.store.scan_prefix(b"o/") {
            let order: LedgerOrder = rec::decode("order", &item?.1)?;
            // A mismatched payment leaves the reservation open until it expires (then its keys
            // are cleared from the ledger's order).
            let open =
                matches!(order.status, LedgerStatus::Reserved | LedgerStatus::Paid | LedgerStatus::PaymentMismatch);
            if &order.node == node && open {
                held.extend(order.key_ids.iter().map(|id| (order.sku.clone(), *id)));
            }
        }
        Ok(held)
    }

    /// Marks closing and reclaimed slices with nothing left at the node as closed, and their
    /// moves as done. Periodic housekeeping: it reads the keys of those slices only, so it costs
    /// nothing while no slice is closing.
    pub async fn settle_closed_slices(&self) -> Result<usize, CoordinatorError> {
        let settled = {
            let _guard = self.lock.lock();
            self.complete_regrants()?;
            let waiting: Vec<SliceRecord> = self
                .slices()?
                .into_iter()
                .filter(|s| {
                    matches!(
                        s.state,
                        SliceState::Closing { .. } | SliceState::Reclaimed { reconcile_ticket: Some(_), .. }
                    )
                })
                .collect();
            let mut settled = 0;
            for mut slice in waiting {
                if self.keys_left_at_node(&slice)? > 0 {
                    continue;
                }
                let mut batch = WriteBatch::default();
                for mut record in self.moves()?.into_iter().filter(|m| m.order.slice_id == slice.slice_id) {
                    if record.state == MoveState::Releasing || record.state == MoveState::AwaitingDonor {
                        record.state = MoveState::Done;
                        batch.put(rec::move_key(record.order.ticket), rec::encode(&record)?);
                    }
                }
                slice.state = SliceState::Closed;
                batch.put(rec::slice_key(slice.slice_id), rec::encode(&slice)?);
                self.store.apply(batch)?;
                settled += 1;
            }
            settled
        };
        if settled > 0 {
            self.store.durable().await?;
        }
        Ok(settled)
    }

    /// Keys of `slice` the ledger still places at its node: granted or quarantined there.
    fn keys_left_at_node(&self, slice: &SliceRecord) -> Result<u64, StoreError> {
        let mut left = 0;
        for id in slice.key_ids() {
            let Some(record) = self.load::<KeyRecord>("key", &rec::key_key(&slice.sku, id))? else { continue };
            let here = matches!(record.state,
                KeyState::Granted { slice: of, .. } | KeyState::Quarantined { slice: of, .. } if of == slice.slice_id);
            if here {
                left += 1;
            }
        }
        Ok(left)
    }

    /// Writes off the quarantined keys of a reclaimed slice: nobody will sell them. A later
    /// delivery event from the node still records them as sold, and a release returns them to
    /// the pool.
    pub async fn write_off(&self, slice_id: SliceId) -> Result<u64, CoordinatorError> {
        let written = {
            let _guard = self.lock.lock();
            let slice: SliceRecord = self
                .load("slice", &rec::slice_key(slice_id))?
                .ok_or_else(|| CoordinatorError::UnknownSlice(slice_id.to_string()))?;
            if !matches!(slice.state, SliceState::Reclaimed { .. } | SliceState::Closed) {
                return Err(CoordinatorError::NotReclaimed(slice_id.to_string()));
            }
            let mut batch = WriteBatch::default();
            let mut written = 0;
            for id in slice.key_ids() {
                let Some(mut record) = self.load::<KeyRecord>("key", &rec::key_key(&slice.sku, id))? else { continue };
                if let KeyState::Quarantined { slice: of, node_index } = record.state {
                    record.state = KeyState::WrittenOff { slice: of, node_index };
                    batch.put(rec::key_key(&slice.sku, id), rec::encode(&record)?);
                    written += 1;
                }
            }
            self.store.apply(batch)?;
            written
        };
        self.store.durable().await?;
        tracing::warn!(slice = %slice_id, keys = written, "quarantined keys written off");
        Ok(written)
    }

    /// Every slice with its keys counted by state, in one pass over the key records.
    pub fn slice_summaries(&self) -> Result<Vec<SliceSummary>, StoreError> {
        let mut counts: BTreeMap<SliceId, [u64; 5]> = BTreeMap::new();
        for item in self.store.scan_prefix(b"k/") {
            let record: KeyRecord = rec::decode("key", &item?.1)?;
            let (slot, slice) = match record.state {
                KeyState::Pool => continue,
                KeyState::Granted { slice, .. } => (0, slice),
                KeyState::Sold { slice, .. } => (1, slice),
                KeyState::Revoked { slice, .. } => {
                    counts.entry(slice).or_default()[4] += 1;
                    (1, slice)
                }
                KeyState::Quarantined { slice, .. } => (2, slice),
                KeyState::WrittenOff { slice, .. } => (3, slice),
            };
            counts.entry(slice).or_default()[slot] += 1;
        }
        Ok(self
            .slices()?
            .into_iter()
            .map(|slice| {
                let [unsold, sold, quarantined, written_off, revoked] =
                    counts.get(&slice.slice_id).copied().unwrap_or_default();
                SliceSummary { slice, unsold, sold, quarantined, written_off, revoked }
            })
            .collect())
    }
}
