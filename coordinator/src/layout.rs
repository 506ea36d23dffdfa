//! The operator's staged flow for moving stock: stage changes, show the plan, apply it by
//! version, or revert. Planning is `protocol::rebalance::plan`; this module feeds it the ledger's
//! view and carries out its steps as shrink and close orders to the donors.

use std::collections::{BTreeMap, HashMap};

use edgecard_protocol::rebalance::{self, Destination, LayoutView, Plan, SliceView, StagedChange};
use edgecard_protocol::{Epoch, NodeId};
use edgecard_store::{StoreError, WriteBatch};
use serde::Serialize;

use crate::records::{self as rec, *};
use crate::service::{now_millis, Coordinator, CoordinatorError, CONTROL_SHRINK};
use crate::slices::ShrinkOrder;

/// What `slices show` prints: the staged changes and their plan (or why they cannot be planned
/// any more, e.g. stock sold meanwhile).
#[derive(Debug, Clone, Serialize)]
pub struct LayoutPreview {
    pub version: u64,
    pub changes: Vec<StagedChange>,
    pub plan: Option<PlanPreview>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanPreview {
    pub steps: Vec<rebalance::PlanStep>,
    /// (node, sku, unsold before, unsold after) for every pair the plan touches.
    pub stock: Vec<StockChange>,
    pub pool_after: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StockChange {
    pub node: String,
    pub sku: String,
    pub before: u64,
    pub after: u64,
}

impl PlanPreview {
    fn of(plan: Plan) -> Self {
        let stock = plan
            .stock_after
            .iter()
            .map(|((node, sku), after)| StockChange {
                node: node.to_string(),
                sku: sku.to_string(),
                before: plan.stock_before.get(&(node.clone(), sku.clone())).copied().unwrap_or(0),
                after: *after,
            })
            .filter(|change| change.before != change.after)
            .collect();
        let pool_after = plan.pool_after.iter().map(|(sku, n)| (sku.to_string(), *n)).collect();
        PlanPreview { steps: plan.steps, stock, pool_after }
    }
}

impl Coordinator {
    fn staged(&self) -> Result<StagedLayout, StoreError> {
        Ok(self.load("staged layout", rec::STAGED_LAYOUT)?.unwrap_or(StagedLayout { version: 1, changes: Vec::new() }))
    }

    /// The ledger's view for planning: usable nodes, active slices with their unsold keys, pool.
    fn layout_view(&self) -> Result<LayoutView, StoreError> {
        let nodes = self.nodes()?.into_iter().filter(|n| !n.revoked).map(|n| n.node_id).collect();
        let slices = self
            .slice_summaries()?
            .into_iter()
            .filter(|s| s.slice.state == SliceState::Active)
            .map(|s| SliceView { slice_id: s.slice.slice_id, node: s.slice.node, sku: s.slice.sku, unsold: s.unsold })
            .collect();
        let mut pool = BTreeMap::new();
        for product in self.products()? {
            pool.insert(product.sku.clone(), self.pool_size(&product.sku));
        }
        Ok(LayoutView { nodes, slices, pool })
    }

    pub fn layout_preview(&self) -> Result<LayoutPreview, StoreError> {
        let staged = self.staged()?;
        let (plan, error) = match rebalance::plan(&self.layout_view()?, &staged.changes) {
            Ok(plan) => (Some(PlanPreview::of(plan)), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(LayoutPreview { version: staged.version, changes: staged.changes, plan, error })
    }

    /// Adds a change to the staged layout if the whole layout still plans.
    pub async fn stage_change(&self, change: StagedChange) -> Result<LayoutPreview, CoordinatorError> {
        {
            let _guard = self.lock.lock();
            let mut staged = self.staged()?;
            staged.changes.push(change);
            rebalance::plan(&self.layout_view()?, &staged.changes)?;
            let mut batch = WriteBatch::default();
            batch.put(rec::STAGED_LAYOUT.to_vec(), rec::encode(&staged)?);
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        Ok(self.layout_preview()?)
    }

    /// Discards the staged changes.
    pub async fn revert_layout(&self) -> Result<LayoutPreview, CoordinatorError> {
        {
            let _guard = self.lock.lock();
            let staged = StagedLayout { changes: Vec::new(), ..self.staged()? };
            let mut batch = WriteBatch::default();
            batch.put(rec::STAGED_LAYOUT.to_vec(), rec::encode(&staged)?);
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        Ok(self.layout_preview()?)
    }

    /// Carries out the staged layout if it is `version`: every step becomes a shrink (or close)
    /// order to its donor under a fresh ticket, with the slice's epoch bumped so renewals issued
    /// before no longer apply. Recipients get keys only when the donor's release arrives.
    pub async fn apply_layout(&self, version: u64) -> Result<Vec<MoveRecord>, CoordinatorError> {
        let moves = {
            let _guard = self.lock.lock();
            let staged = self.staged()?;
            if staged.version != version {
                return Err(CoordinatorError::StaleLayout { staged: staged.version, given: version });
            }
            if staged.changes.is_empty() {
                return Err(CoordinatorError::NothingStaged);
            }
            let plan = rebalance::plan(&self.layout_view()?, &staged.changes)?;
            let mut batch = WriteBatch::default();
            let first = self.take_tickets(&mut batch, plan.steps.len() as u64)?;
            let mut donors: HashMap<NodeId, NodeRecord> = HashMap::new();
            let mut slices: HashMap<_, SliceRecord> = HashMap::new();
            let mut moves = Vec::new();
            let now = now_millis();
            for (ticket, step) in (first..).zip(plan.steps) {
                let mut slice = match slices.remove(&step.slice_id) {
                    Some(slice) => slice,
                    None => self
                        .load::<SliceRecord>("slice", &rec::slice_key(step.slice_id))?
                        .ok_or_else(|| CoordinatorError::UnknownSlice(step.slice_id.to_string()))?,
                };
                slice.epoch = Epoch(slice.epoch.0 + 1);
                if step.close {
                    slice.state = SliceState::Closing { ticket };
                }
                let order = ShrinkOrder {
                    slice_id: step.slice_id,
                    sku: step.sku.clone(),
                    epoch: slice.epoch,
                    count: if step.close { u64::MAX } else { step.count },
                    close: step.close,
                    ticket,
                };
                let donor = match donors.remove(&step.donor) {
                    Some(node) => node,
                    None => self.node(&step.donor)?,
                };
                let donor = self.queue_control(&mut batch, donor, CONTROL_SHRINK, rec::encode(&order)?)?;
                donors.insert(step.donor.clone(), donor);
                let order = MoveOrder {
                    ticket,
                    kind: if step.close { MoveKind::Drain } else { MoveKind::Move },
                    sku: step.sku,
                    slice_id: step.slice_id,
                    from: step.donor,
                    to: step.to,
                    requested: step.count,
                    close: step.close,
                };
                let record = MoveRecord::sent(order, now);
                batch.put(rec::move_key(ticket), rec::encode(&record)?);
                slices.insert(slice.slice_id, slice);
                moves.push(record);
            }
            for slice in slices.values() {
                batch.put(rec::slice_key(slice.slice_id), rec::encode(slice)?);
            }
            let next = StagedLayout { version: version + 1, changes: Vec::new() };
            batch.put(rec::STAGED_LAYOUT.to_vec(), rec::encode(&next)?);
            self.store.apply(batch)?;
            moves
        };
        self.store.durable().await?;
        for m in &moves {
            let to = match &m.order.to {
                Destination::Node(node) => node.to_string(),
                Destination::Pool => "pool".to_string(),
            };
            tracing::info!(ticket = m.order.ticket, slice = %m.order.slice_id, from = %m.order.from, %to, count = m.order.requested,
                close = m.order.close, "layout step sent to the donor");
        }
        Ok(moves)
    }
}
