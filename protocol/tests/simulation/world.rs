//! One seed's run: a coordinator, its nodes, buyers and an operator on a simulated clock, with
//! the checks that must hold after every step and once everything has settled.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use edgecard_protocol::rebalance::{self, StagedChange};
use edgecard_protocol::{KeyId, OrderId, SliceId};

use crate::config::{
    Mutation, Params, EPOCH_MS, MAX_QUANTITY, MAX_SAFETY_MARGIN_MS, MAX_SKEW_MS, MAX_TICK_MS, QUIESCE_LIMIT_MS,
    RESERVATION_TTL_MS,
};
use crate::coordinator::{Coordinator, Place};
use crate::net::{Message, Network};
use crate::node::{KeyStatus, Node, Observation, OrderStatus};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A key revealed to two different orders.
    DoubleSale,
    /// A node took or delivered a key that the ledger did not have granted to it in that slice
    /// at that moment (for instance one already reclaimed).
    UnownedKeySold,
    /// The coordinator refused an event: a key not out at that node, a second delivery, a gap.
    LedgerAlarm,
    /// pool + granted + sold + quarantined + written off ≠ imported, or the ledger's index lies.
    Conservation,
    /// A node's sync client refused an ack.
    SyncProtocol,
    /// After healing, the system did not settle, or settled disagreeing with the nodes.
    NoConvergence,
    /// The node model disagrees with `Holdings` (a bug in this test or in `Holdings`).
    Model,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub now_ms: u64,
    pub kind: FailureKind,
    pub detail: String,
    /// The last actions before the failure, when the run was traced.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {} (t = {} ms): {:?}: {}",
            self.seed, self.step, self.now_ms, self.kind, self.detail
        )?;
        if !self.trace.is_empty() {
            write!(f, "\nlast actions:\n  {}", self.trace.join("\n  "))?;
        }
        Ok(())
    }
}

/// What a run exercised, summed over seeds to show the simulation reaches the paths it claims.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub seeds: u64,
    pub steps: u64,
    pub orders: u64,
    pub deliveries: u64,
    pub late_payments: u64,
    pub awaiting_stock: u64,
    pub allocations: u64,
    pub moves: u64,
    pub drains: u64,
    pub node_crashes: u64,
    pub coordinator_crashes: u64,
    pub partitions: u64,
    pub reclaims: u64,
    pub keys_quarantined: u64,
    pub quarantine_released: u64,
    pub quarantine_sold: u64,
    pub keys_moved: u64,
    pub renewals: u64,
    pub written_off: u64,
    pub refused_grants: u64,
    pub lost_acks: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        let fields = [
            (&mut self.seeds, other.seeds),
            (&mut self.steps, other.steps),
            (&mut self.orders, other.orders),
            (&mut self.deliveries, other.deliveries),
            (&mut self.late_payments, other.late_payments),
            (&mut self.awaiting_stock, other.awaiting_stock),
            (&mut self.allocations, other.allocations),
            (&mut self.moves, other.moves),
            (&mut self.drains, other.drains),
            (&mut self.node_crashes, other.node_crashes),
            (&mut self.coordinator_crashes, other.coordinator_crashes),
            (&mut self.partitions, other.partitions),
            (&mut self.reclaims, other.reclaims),
            (&mut self.keys_quarantined, other.keys_quarantined),
            (&mut self.quarantine_released, other.quarantine_released),
            (&mut self.quarantine_sold, other.quarantine_sold),
            (&mut self.keys_moved, other.keys_moved),
            (&mut self.renewals, other.renewals),
            (&mut self.written_off, other.written_off),
            (&mut self.refused_grants, other.refused_grants),
            (&mut self.lost_acks, other.lost_acks),
            (&mut self.messages, other.messages),
            (&mut self.lost, other.lost),
            (&mut self.duplicated, other.duplicated),
        ];
        for (total, n) in fields {
            *total += n;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub steps: u64,
    pub mutation: Mutation,
    pub trace: bool,
}

/// Runs one seed to the end: `steps` random steps, then healing and settling.
pub fn run_seed(seed: u64, options: RunOptions) -> Result<Stats, Failure> {
    let mut world = World::new(seed, options);
    let outcome = world.run(options.steps);
    world.collect_stats();
    outcome.map(|()| world.stats)
}

/// Steps between full checks of the ledger's index and of each node model (the cheap key count
/// runs every step).
const FULL_CHECK_EVERY: u64 = 256;

/// How many entries of the trace a failure shows.
const TRACE_TAIL: usize = 400;

struct World {
    seed: u64,
    rng: Rng,
    params: Params,
    now: u64,
    step: u64,
    coordinator: Coordinator,
    nodes: Vec<Node>,
    net: Network,
    /// Buyers' payments, by when they arrive: a callback to a node that is down is retried.
    payments: BTreeMap<(u64, OrderId), usize>,
    next_order: u64,
    /// Every delivery as it happened at a node, whether or not the ledger has heard of it.
    truth: HashMap<KeyId, OrderId>,
    /// Faults (crashes, partitions, loss) stop once the run settles.
    chaos: bool,
    stats: Stats,
    trace: Option<VecDeque<String>>,
}

impl World {
    fn new(seed: u64, options: RunOptions) -> Self {
        let mut rng = Rng::new(seed);
        let params = Params::draw(&mut rng);
        let mutation = options.mutation;
        let coordinator = Coordinator::new(
            params.nodes,
            params.skus,
            params.keys_per_sku,
            params.max_take_window,
            rng.fork(),
            mutation,
        );
        let nodes = (0..params.nodes)
            .map(|i| {
                let skew = draw_skew(&mut rng);
                let margin = rng.range(0, MAX_SAFETY_MARGIN_MS);
                let mut node = Node::new(i, EPOCH_MS, skew, margin, mutation, rng.next_u64());
                node.notes = options.trace.then(Vec::new);
                node
            })
            .collect();
        let net = Network::new(params.nodes, params.loss, params.duplicate, params.slow);
        World {
            seed,
            rng,
            params,
            now: EPOCH_MS,
            step: 0,
            coordinator,
            nodes,
            net,
            payments: BTreeMap::new(),
            next_order: 1,
            truth: HashMap::new(),
            chaos: true,
            stats: Stats { seeds: 1, ..Stats::default() },
            trace: options.trace.then(VecDeque::new),
        }
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            if trace.len() == TRACE_TAIL {
                trace.pop_front();
            }
            trace.push_back(format!("step {} t+{}: {}", self.step, self.now - EPOCH_MS, what()));
        }
    }

    fn fail(&self, kind: FailureKind, detail: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            now_ms: self.now - EPOCH_MS,
            kind,
            detail,
            trace: self.trace.iter().flatten().cloned().collect(),
        }
    }

    fn run(&mut self, steps: u64) -> Result<(), Failure> {
        self.stock_every_node();
        for step in 0..steps {
            self.step = step;
            self.tick()?;
        }
        self.settle()?;
        self.check_convergence()
    }

    /// Some stock for every node and sku to start with.
    fn stock_every_node(&mut self) {
        let share = (self.params.keys_per_sku as usize / (self.params.nodes + 1)).max(1);
        for sku in self.coordinator.skus().to_vec() {
            for node in 0..self.params.nodes {
                self.coordinator.allocate(self.now, &sku, node, share);
            }
        }
    }

    /// One step: time passes, messages arrive, timers fire, maybe one random action, checks.
    fn tick(&mut self) -> Result<(), Failure> {
        self.now += self.rng.range(1, MAX_TICK_MS);
        self.deliver_messages()?;
        self.restart_nodes()?;
        self.run_node_timers()?;
        if self.coordinator.is_up(self.now) {
            for slice in self.coordinator.reclaim_due(self.now) {
                self.note(|| format!("coordinator reclaims slice {slice}"));
            }
        }
        if self.chaos {
            self.random_action()?;
        }
        self.check_step()
    }

    // --- messages and timers ---

    fn deliver_messages(&mut self) -> Result<(), Failure> {
        while let Some(message) = self.net.next_due(self.now) {
            match message {
                Message::Upload { node, stream, upload } => {
                    if !self.coordinator.is_up(self.now) {
                        continue;
                    }
                    let (ack, terms) = self.coordinator.ingest(self.now, node, &upload);
                    self.note(|| {
                        let seqs = upload.events.first().zip(upload.events.last()).map(|(a, b)| (a.seq, b.seq));
                        format!(
                            "coordinator ingests n{node} stream {stream} events {seqs:?}, acks {}",
                            ack.events_high_water
                        )
                    });
                    self.check_alarms()?;
                    self.net.send(&mut self.rng, self.now, Message::Ack { node, stream, ack, terms });
                }
                Message::Ack { node, stream, ack, terms } => {
                    let crash_after = if self.chaos && self.rng.chance(0.01) {
                        Some(self.rng.below(ack.control.len() + 1))
                    } else {
                        None
                    };
                    let was_up = self.nodes[node].is_up();
                    let result = self.nodes[node].on_ack(self.now, stream, &ack, &terms, crash_after);
                    result.map_err(|e| self.fail(FailureKind::SyncProtocol, e))?;
                    if was_up && !self.nodes[node].is_up() {
                        self.note(|| format!("n{node} crashes while applying control messages"));
                        self.schedule_restart(node);
                    }
                    self.absorb(node)?;
                }
            }
        }
        Ok(())
    }

    fn schedule_restart(&mut self, node: usize) {
        self.nodes[node].down_until = self.now + self.rng.range(50, 6_000);
        self.stats.node_crashes += 1;
    }

    fn restart_nodes(&mut self) -> Result<(), Failure> {
        for node in 0..self.nodes.len() {
            if !self.nodes[node].is_up() && self.nodes[node].down_until <= self.now {
                let skew = draw_skew(&mut self.rng);
                self.nodes[node].restart(self.now, skew);
                self.note(|| format!("n{node} restarts with skew {skew} ms"));
                self.absorb(node)?;
                self.nodes[node].check_model().map_err(|e| self.fail(FailureKind::Model, e))?;
            }
        }
        Ok(())
    }

    fn run_node_timers(&mut self) -> Result<(), Failure> {
        for node in 0..self.nodes.len() {
            if !self.nodes[node].is_up() {
                continue;
            }
            self.nodes[node].expire_due(self.now);
            self.absorb(node)?;
            self.pay_due(node)?;
            if let Some(upload) = self.nodes[node].poll_sync(self.now) {
                self.net.send(&mut self.rng, self.now, upload);
            }
        }
        Ok(())
    }

    fn pay_due(&mut self, node: usize) -> Result<(), Failure> {
        let due: Vec<(u64, OrderId)> = self
            .payments
            .range(..(self.now + 1, OrderId::NONE))
            .filter(|(_, n)| **n == node)
            .map(|(at_and_order, _)| *at_and_order)
            .collect();
        for (at, order) in due {
            self.payments.remove(&(at, order));
            let late = self.nodes[node].pay(self.now, order);
            self.stats.late_payments += u64::from(late);
            self.note(|| format!("n{node} gets payment for order {order}{}", if late { " (late)" } else { "" }));
            self.absorb(node)?;
        }
        Ok(())
    }

    // --- random actions ---

    fn random_action(&mut self) -> Result<(), Failure> {
        match self.rng.below(1000) {
            0..=299 => self.create_order(),
            300..=334 => self.allocate(),
            335..=349 => self.stage_move(),
            350..=355 => self.stage_drain(),
            356..=362 => self.crash_node(),
            363..=369 => self.partition_node(),
            370..=371 => self.crash_coordinator(),
            372 => self.write_off(),
            373..=402 => self.import(),
            _ => Ok(()),
        }
    }

    fn random_node(&mut self) -> usize {
        self.rng.below(self.nodes.len())
    }

    fn create_order(&mut self) -> Result<(), Failure> {
        let node = self.random_node();
        let sku = self.coordinator.skus()[self.rng.below(self.params.skus)].clone();
        let quantity = self.rng.range(1, MAX_QUANTITY) as u32;
        let mut id = [0u8; 16];
        id[0] = 1;
        id[8..].copy_from_slice(&self.next_order.to_be_bytes());
        let order = OrderId::from_bytes(id);
        if !self.nodes[node].create_order(self.now, order, &sku, quantity) {
            return Ok(());
        }
        self.next_order += 1;
        self.stats.orders += 1;
        self.note(|| format!("n{node} reserves {quantity} of {sku} for order {order}"));
        // Most buyers pay, some after their reservation expired; the rest never do.
        if self.rng.chance(0.7) {
            let at = self.now + self.rng.range(0, RESERVATION_TTL_MS * 3 / 2);
            self.payments.insert((at, order), node);
        }
        self.absorb(node)
    }

    fn allocate(&mut self) -> Result<(), Failure> {
        let sku = self.coordinator.skus()[self.rng.below(self.params.skus)].clone();
        let node = self.random_node();
        let count = self.rng.range(1, 12) as usize;
        if let Some(slice) = self.coordinator.allocate(self.now, &sku, node, count) {
            self.stats.allocations += 1;
            self.note(|| format!("operator allocates slice {slice} of {sku} ({count} keys at most) to n{node}"));
        }
        Ok(())
    }

    /// Moves some of one node's unsold keys of a sku to another, through the real planner.
    fn stage_move(&mut self) -> Result<(), Failure> {
        let from = self.random_node();
        let to = self.random_node();
        if from == to {
            return Ok(());
        }
        let sku = self.coordinator.skus()[self.rng.below(self.params.skus)].clone();
        let view = self.coordinator.layout_view();
        let from_id = self.coordinator.node_id(from).clone();
        let has: u64 = view.slices.iter().filter(|s| s.node == from_id && s.sku == sku).map(|s| s.unsold).sum();
        if has == 0 {
            return Ok(());
        }
        let count = self.rng.range(1, has);
        let to_id = self.coordinator.node_id(to).clone();
        let change = StagedChange::Move { sku: sku.clone(), from: from_id, to: to_id, count };
        let plan = rebalance::plan(&view, &[change])
            .map_err(|e| self.fail(FailureKind::Model, format!("the planner refused a feasible move: {e}")))?;
        self.coordinator.apply_plan(&plan);
        self.stats.moves += 1;
        self.note(|| format!("operator moves {count} of {sku} from n{from} to n{to} in {} steps", plan.steps.len()));
        Ok(())
    }

    fn stage_drain(&mut self) -> Result<(), Failure> {
        let node = self.random_node();
        let view = self.coordinator.layout_view();
        let change = StagedChange::Drain { node: self.coordinator.node_id(node).clone() };
        let plan = rebalance::plan(&view, &[change])
            .map_err(|e| self.fail(FailureKind::Model, format!("the planner refused a drain: {e}")))?;
        self.coordinator.apply_plan(&plan);
        self.stats.drains += 1;
        self.note(|| format!("operator drains n{node}: {} slices", plan.steps.len()));
        Ok(())
    }

    fn crash_node(&mut self) -> Result<(), Failure> {
        let node = self.random_node();
        if self.nodes[node].is_up() {
            let lose_unflushed = self.rng.chance(0.5);
            self.nodes[node].crash(lose_unflushed);
            self.schedule_restart(node);
            let until = self.nodes[node].down_until - EPOCH_MS;
            self.note(|| format!("n{node} crashes until t+{until}"));
        }
        Ok(())
    }

    /// Cuts a node off, sometimes for longer than a lease plus the skew margin, so its slices
    /// are reclaimed while it keeps running.
    fn partition_node(&mut self) -> Result<(), Failure> {
        let node = self.random_node();
        let until = self.now + self.rng.range(100, 12_000);
        self.net.cut(node, until);
        self.stats.partitions += 1;
        self.note(|| format!("n{node} is cut off until t+{}", until - EPOCH_MS));
        Ok(())
    }

    fn crash_coordinator(&mut self) -> Result<(), Failure> {
        if self.coordinator.is_up(self.now) {
            self.coordinator.down_until = self.now + self.rng.range(100, 3_000);
            self.stats.coordinator_crashes += 1;
            let until = self.coordinator.down_until - EPOCH_MS;
            self.note(|| format!("coordinator crashes until t+{until}"));
        }
        Ok(())
    }

    /// Fresh keys, so sales go on for the whole run.
    fn import(&mut self) -> Result<(), Failure> {
        let sku = self.rng.below(self.params.skus);
        let count = self.rng.range(5, 25);
        self.coordinator.import(sku, count);
        self.note(|| format!("operator imports {count} keys of sku-{sku}"));
        Ok(())
    }

    fn write_off(&mut self) -> Result<(), Failure> {
        if let Some(slice) = self.coordinator.write_off(&mut self.rng) {
            self.note(|| format!("operator writes off the quarantine of slice {slice}"));
        }
        Ok(())
    }

    // --- checks ---

    /// Checks what a node just did against the truth and the ledger at this very moment.
    fn absorb(&mut self, node: usize) -> Result<(), Failure> {
        if let Some(notes) = self.nodes[node].notes.as_mut().map(std::mem::take) {
            for what in notes {
                self.note(|| format!("n{node} {what}"));
            }
        }
        for observation in std::mem::take(&mut self.nodes[node].observations) {
            match observation {
                Observation::Took { key, slice } => self.check_granted(node, key, slice, "took")?,
                Observation::Delivered { order, key, slice } => {
                    self.stats.deliveries += 1;
                    if let Some(first) = self.truth.insert(key, order) {
                        if first != order {
                            let detail = format!("n{node} delivered key {key} to order {order}; it went to {first}");
                            return Err(self.fail(FailureKind::DoubleSale, detail));
                        }
                    }
                    self.check_granted(node, key, slice, "delivered")?;
                }
            }
        }
        Ok(())
    }

    fn check_granted(&self, node: usize, key: KeyId, slice: SliceId, what: &str) -> Result<(), Failure> {
        if self.coordinator.grants(key, slice, node) {
            return Ok(());
        }
        let place = self.coordinator.place_of(key);
        let detail = format!("n{node} {what} key {key} of slice {slice}, which the ledger has as {place:?}");
        Err(self.fail(FailureKind::UnownedKeySold, detail))
    }

    fn check_alarms(&self) -> Result<(), Failure> {
        match self.coordinator.alarms.first() {
            Some(alarm) => Err(self.fail(FailureKind::LedgerAlarm, alarm.clone())),
            None => Ok(()),
        }
    }

    fn check_step(&self) -> Result<(), Failure> {
        self.check_alarms()?;
        self.coordinator.check_conservation().map_err(|e| self.fail(FailureKind::Conservation, e))?;
        if self.step.is_multiple_of(FULL_CHECK_EVERY) {
            self.coordinator.check_ledger_index().map_err(|e| self.fail(FailureKind::Conservation, e))?;
            for node in &self.nodes {
                node.check_model().map_err(|e| self.fail(FailureKind::Model, e))?;
            }
        }
        Ok(())
    }

    // --- settling ---

    /// Heals every fault and runs until nothing is left to do.
    fn settle(&mut self) -> Result<(), Failure> {
        self.chaos = false;
        self.net.heal();
        self.coordinator.down_until = self.coordinator.down_until.min(self.now);
        for node in &mut self.nodes {
            node.down_until = node.down_until.min(self.now);
        }
        let limit = self.now + QUIESCE_LIMIT_MS;
        while self.now < limit {
            self.step += 1;
            self.tick()?;
            if self.unsettled().is_none() {
                return Ok(());
            }
        }
        let why = self.unsettled().unwrap_or_default();
        Err(self.fail(FailureKind::NoConvergence, format!("not settled {QUIESCE_LIMIT_MS} ms after healing: {why}")))
    }

    /// What still keeps the system busy, if anything.
    fn unsettled(&self) -> Option<String> {
        if !self.net.is_idle() {
            return Some("messages in flight".into());
        }
        if !self.payments.is_empty() {
            return Some(format!("{} payments pending", self.payments.len()));
        }
        for node in &self.nodes {
            let i = node.index;
            let newest = node.durable.newest_seq();
            let busy = if !node.is_up() {
                Some("down".to_string())
            } else if !node.is_synced() || self.coordinator.high_water(i) != newest {
                Some(format!(
                    "outbox to {newest}, acked {}, ledger has {}",
                    node.durable.acked,
                    self.coordinator.high_water(i)
                ))
            } else if self.coordinator.last_queued_control(i) > node.durable.control_applied {
                Some("control messages not applied".into())
            } else if self.coordinator.reconcile_pending(i) {
                Some("reconcile pending".into())
            } else if node.open_reservations() > 0 {
                Some(format!("{} open reservations", node.open_reservations()))
            } else {
                None
            };
            if let Some(busy) = busy {
                return Some(format!("n{i}: {busy}"));
            }
        }
        None
    }

    /// Once settled: no quarantine is left, the ledger agrees with the nodes key by key, and
    /// every paid order was delivered or awaits stock.
    fn check_convergence(&self) -> Result<(), Failure> {
        let fail = |detail: String| self.fail(FailureKind::NoConvergence, detail);
        self.coordinator.check_ledger_index().map_err(|e| self.fail(FailureKind::Conservation, e))?;
        if let Some((slice, node, keys)) = self.coordinator.quarantined().first() {
            return Err(fail(format!(
                "slice {slice} of n{node} still has keys {keys:?} quarantined after reconciling"
            )));
        }
        // Keys each node holds for sale or under a reservation, by key.
        let mut out: BTreeMap<KeyId, Vec<(usize, SliceId)>> = BTreeMap::new();
        for node in &self.nodes {
            node.check_model().map_err(|e| self.fail(FailureKind::Model, e))?;
            for (key, stored) in &node.durable.keys {
                if matches!(stored.status, KeyStatus::Available | KeyStatus::Reserved(_)) {
                    out.entry(*key).or_default().push((node.index, stored.slice));
                }
            }
        }
        for (key, place) in self.coordinator.keys() {
            let at_nodes = out.get(key).cloned().unwrap_or_default();
            let expected = match place {
                Place::Granted(slice) => vec![(self.coordinator.slice_node(*slice), *slice)],
                Place::WrittenOff(_) => continue,
                _ => Vec::new(),
            };
            if at_nodes != expected {
                return Err(fail(format!("key {key} is {place:?} in the ledger but held at {at_nodes:?}")));
            }
            let delivered = self.truth.get(key);
            let sold = match place {
                Place::Sold(order) => Some(order),
                _ => None,
            };
            if delivered != sold {
                return Err(fail(format!("key {key} is {place:?} in the ledger, delivered to {delivered:?}")));
            }
        }
        for node in &self.nodes {
            for (id, order) in &node.durable.orders {
                if order.paid && !matches!(order.status, OrderStatus::Delivered | OrderStatus::AwaitingStock) {
                    return Err(fail(format!("n{}: paid order {id} ended {:?}", node.index, order.status)));
                }
            }
        }
        Ok(())
    }

    fn collect_stats(&mut self) {
        let coordinator = &self.coordinator.stats;
        self.stats.steps = self.step;
        self.stats.reclaims = coordinator.reclaims;
        self.stats.keys_quarantined = coordinator.keys_quarantined;
        self.stats.quarantine_released = coordinator.quarantine_released;
        self.stats.quarantine_sold = coordinator.quarantine_sold;
        self.stats.keys_moved = coordinator.keys_moved;
        self.stats.renewals = coordinator.renewals;
        self.stats.written_off = coordinator.written_off;
        self.stats.refused_grants = self.nodes.iter().map(|n| n.refused_grants).sum();
        self.stats.lost_acks = self.nodes.iter().map(|n| n.lost_acks).sum();
        self.stats.awaiting_stock = self.nodes.iter().map(|n| n.durable.awaiting.len() as u64).sum();
        self.stats.messages = self.net.stats.sent;
        self.stats.lost = self.net.stats.lost;
        self.stats.duplicated = self.net.stats.duplicated;
    }
}

/// A wall-clock offset within the bound, often right at it.
fn draw_skew(rng: &mut Rng) -> i64 {
    let max = MAX_SKEW_MS as i64;
    match rng.below(4) {
        0 => -max,
        1 => max,
        _ => rng.range(0, 2 * MAX_SKEW_MS) as i64 - max,
    }
}
