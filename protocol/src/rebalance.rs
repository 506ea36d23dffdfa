//! Planning stock moves between nodes: a pure function from the coordinator's view and the
//! operator's staged changes to the steps that carry them out.
//!
//! Every step shrinks or closes one donor slice; keys reach a recipient only after the donor has
//! released them (demarcation order), as a new slice. The plan's figures assume the donor can
//! release everything the ledger counts as unsold; keys under open reservations at the donor stay
//! there, so a move can deliver less than planned, and the coordinator reports the difference.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Sku, SliceId};

/// An active slice as the coordinator's ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceView {
    pub slice_id: SliceId,
    pub node: NodeId,
    pub sku: Sku,
    /// Keys the ledger does not know as sold.
    pub unsold: u64,
}

#[derive(Debug, Clone, Default)]
pub struct LayoutView {
    /// Nodes that may receive stock (known and not revoked).
    pub nodes: BTreeSet<NodeId>,
    pub slices: Vec<SliceView>,
    pub pool: BTreeMap<Sku, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum StagedChange {
    /// Move `count` unsold keys of `sku` from node `from` to node `to`.
    Move { sku: Sku, from: NodeId, to: NodeId, count: u64 },
    /// Close every slice of `node`: its unsold keys go back to the pool.
    Drain { node: NodeId },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(tag = "kind", content = "node", rename_all = "snake_case")]
pub enum Destination {
    Node(NodeId),
    Pool,
}

/// One donor slice to shrink (or close) and where its released keys go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    pub slice_id: SliceId,
    pub donor: NodeId,
    pub sku: Sku,
    pub count: u64,
    pub close: bool,
    pub to: Destination,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    pub steps: Vec<PlanStep>,
    /// Unsold keys per (node, sku) before and after, as the ledger will count them.
    pub stock_before: BTreeMap<(NodeId, Sku), u64>,
    pub stock_after: BTreeMap<(NodeId, Sku), u64>,
    pub pool_after: BTreeMap<Sku, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("change {index}: unknown or revoked node {node}")]
    UnknownNode { index: usize, node: NodeId },
    #[error("change {index}: a move needs two different nodes")]
    SameNode { index: usize },
    #[error("change {index}: count must be at least 1")]
    ZeroCount { index: usize },
    #[error("change {index}: node {node} has {has} unsold keys of {sku} in its slices; asked for {asked}")]
    NotEnoughStock { index: usize, node: NodeId, sku: Sku, has: u64, asked: u64 },
    #[error("change {index}: node {node} is drained earlier in this plan")]
    NodeDrained { index: usize, node: NodeId },
}

/// Plans `changes` in order against `view`.
pub fn plan(view: &LayoutView, changes: &[StagedChange]) -> Result<Plan, PlanError> {
    let mut remaining: BTreeMap<SliceId, u64> = view.slices.iter().map(|s| (s.slice_id, s.unsold)).collect();
    let mut stock: BTreeMap<(NodeId, Sku), u64> = BTreeMap::new();
    for slice in &view.slices {
        *stock.entry((slice.node.clone(), slice.sku.clone())).or_default() += slice.unsold;
    }
    let stock_before = stock.clone();
    let mut pool = view.pool.clone();
    let mut drained: BTreeSet<NodeId> = BTreeSet::new();
    let mut steps = Vec::new();
    for (index, change) in changes.iter().enumerate() {
        let known = |node: &NodeId| {
            if view.nodes.contains(node) {
                Ok(())
            } else {
                Err(PlanError::UnknownNode { index, node: node.clone() })
            }
        };
        match change {
            StagedChange::Move { sku, from, to, count } => {
                known(from)?;
                known(to)?;
                if from == to {
                    return Err(PlanError::SameNode { index });
                }
                if *count == 0 {
                    return Err(PlanError::ZeroCount { index });
                }
                if drained.contains(to) {
                    return Err(PlanError::NodeDrained { index, node: to.clone() });
                }
                // Largest slices first: fewest shrinks; ties by slice id for a stable plan.
                let mut donors: Vec<&SliceView> = view
                    .slices
                    .iter()
                    .filter(|s| &s.node == from && &s.sku == sku && remaining[&s.slice_id] > 0)
                    .collect();
                donors.sort_by_key(|s| (std::cmp::Reverse(remaining[&s.slice_id]), s.slice_id));
                let has: u64 = donors.iter().map(|s| remaining[&s.slice_id]).sum();
                if has < *count {
                    return Err(PlanError::NotEnoughStock {
                        index,
                        node: from.clone(),
                        sku: sku.clone(),
                        has,
                        asked: *count,
                    });
                }
                let mut left = *count;
                for donor in donors {
                    if left == 0 {
                        break;
                    }
                    let slot = remaining.entry(donor.slice_id).or_default();
                    let n = left.min(*slot);
                    *slot -= n;
                    left -= n;
                    steps.push(PlanStep {
                        slice_id: donor.slice_id,
                        donor: from.clone(),
                        sku: sku.clone(),
                        count: n,
                        close: false,
                        to: Destination::Node(to.clone()),
                    });
                }
                *stock.entry((from.clone(), sku.clone())).or_default() -= count;
                *stock.entry((to.clone(), sku.clone())).or_default() += count;
            }
            StagedChange::Drain { node } => {
                known(node)?;
                drained.insert(node.clone());
                for slice in view.slices.iter().filter(|s| &s.node == node) {
                    let slot = remaining.entry(slice.slice_id).or_default();
                    let n = std::mem::take(slot);
                    steps.push(PlanStep {
                        slice_id: slice.slice_id,
                        donor: node.clone(),
                        sku: slice.sku.clone(),
                        count: n,
                        close: true,
                        to: Destination::Pool,
                    });
                    *stock.entry((node.clone(), slice.sku.clone())).or_default() -= n;
                    *pool.entry(slice.sku.clone()).or_default() += n;
                }
            }
        }
    }
    Ok(Plan { steps, stock_before, stock_after: stock, pool_after: pool })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn view() -> LayoutView {
        LayoutView {
            nodes: [node("eu-1"), node("us-1"), node("ap-1")].into_iter().collect(),
            slices: vec![
                SliceView { slice_id: SliceId(1), node: node("eu-1"), sku: sku("gold"), unsold: 30 },
                SliceView { slice_id: SliceId(2), node: node("eu-1"), sku: sku("gold"), unsold: 50 },
                SliceView { slice_id: SliceId(3), node: node("us-1"), sku: sku("gold"), unsold: 10 },
                SliceView { slice_id: SliceId(4), node: node("eu-1"), sku: sku("silver"), unsold: 5 },
            ],
            pool: [(sku("gold"), 100)].into_iter().collect(),
        }
    }

    #[test]
    fn a_move_shrinks_the_largest_donor_slices_first() {
        let change = StagedChange::Move { sku: sku("gold"), from: node("eu-1"), to: node("ap-1"), count: 60 };
        let plan = plan(&view(), &[change]).unwrap();
        let shrinks: Vec<(SliceId, u64)> = plan.steps.iter().map(|s| (s.slice_id, s.count)).collect();
        assert_eq!(shrinks, vec![(SliceId(2), 50), (SliceId(1), 10)]);
        assert!(plan.steps.iter().all(|s| s.to == Destination::Node(node("ap-1")) && !s.close));
        assert_eq!(plan.stock_after[&(node("eu-1"), sku("gold"))], 20);
        assert_eq!(plan.stock_after[&(node("ap-1"), sku("gold"))], 60);
    }

    #[test]
    fn a_drain_closes_every_slice_into_the_pool() {
        let plan = plan(&view(), &[StagedChange::Drain { node: node("eu-1") }]).unwrap();
        assert_eq!(plan.steps.len(), 3);
        assert!(plan.steps.iter().all(|s| s.close && s.to == Destination::Pool));
        assert_eq!(plan.pool_after[&sku("gold")], 180);
        assert_eq!(plan.pool_after[&sku("silver")], 5);
        assert_eq!(plan.stock_after[&(node("eu-1"), sku("gold"))], 0);
    }

    #[test]
    fn refusals_name_the_change() {
        let too_many = StagedChange::Move { sku: sku("gold"), from: node("us-1"), to: node("eu-1"), count: 11 };
        assert_eq!(
            plan(&view(), &[too_many]),
            Err(PlanError::NotEnoughStock { index: 0, node: node("us-1"), sku: sku("gold"), has: 10, asked: 11 })
        );
        let drain_then_fill = [
            StagedChange::Drain { node: node("ap-1") },
            StagedChange::Move { sku: sku("gold"), from: node("us-1"), to: node("ap-1"), count: 1 },
        ];
        assert_eq!(plan(&view(), &drain_then_fill), Err(PlanError::NodeDrained { index: 1, node: node("ap-1") }));
        let unknown = StagedChange::Drain { node: node("xx-9") };
        assert_eq!(plan(&view(), &[unknown]), Err(PlanError::UnknownNode { index: 0, node: node("xx-9") }));
    }
}
