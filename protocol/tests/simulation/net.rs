//! The network between the nodes and the coordinator: every message is delayed at random, and
//! may be lost, duplicated, overtaken by a later one, or dropped by a partition.

use std::collections::BTreeMap;

use edgecard_protocol::{ControlBody, Epoch, KeyId, Sku, SliceId, SyncAck, SyncUpload, UnixMillis};

use crate::rng::Rng;

/// The terms of a new slice, as the node reads them from a verified grant. (Signatures and
/// envelopes have their own tests; the simulation carries the decoded terms.)
#[derive(Debug, Clone)]
pub struct GrantTerms {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub epoch: Epoch,
    pub lease_deadline: UnixMillis,
    pub take_window: u64,
    pub keys: Vec<KeyId>,
}

/// `ControlBody::Shrink`, as a value.
#[derive(Debug, Clone)]
pub struct Shrink {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub epoch: Epoch,
    pub count: u64,
    pub close: bool,
    pub ticket: u64,
}

impl Shrink {
    pub fn from_body(body: &ControlBody) -> Option<Shrink> {
        match body {
            ControlBody::Shrink { slice_id, sku, epoch, count, close, ticket } => Some(Shrink {
                slice_id: *slice_id,
                sku: sku.clone(),
                epoch: *epoch,
                count: *count,
                close: *close,
                ticket: *ticket,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Control {
    Grant(GrantTerms),
    Renew { slice_id: SliceId, epoch: Epoch, lease_deadline: UnixMillis },
    Shrink(Shrink),
}

impl Control {
    /// The body as it rides on a `SyncAck`. A shrink travels as the real body; a grant or a
    /// renewal as an empty envelope, its terms alongside in [`Message::Ack`].
    pub fn wire_body(&self) -> ControlBody {
        match self {
            Control::Grant(_) => ControlBody::Grant { signed_grant: Vec::new() },
            Control::Renew { .. } => ControlBody::Renew { signed_renewal: Vec::new() },
            Control::Shrink(s) => ControlBody::Shrink {
                slice_id: s.slice_id,
                sku: s.sku.clone(),
                epoch: s.epoch,
                count: s.count,
                close: s.close,
                ticket: s.ticket,
            },
        }
    }
}

/// One message; `stream` names the upload an ack answers (one stream per upload, as on QUIC).
#[derive(Debug, Clone)]
pub enum Message {
    Upload { node: usize, stream: u64, upload: SyncUpload },
    Ack { node: usize, stream: u64, ack: SyncAck, terms: Vec<(u64, Control)> },
}

impl Message {
    fn node(&self) -> usize {
        match self {
            Message::Upload { node, .. } | Message::Ack { node, .. } => *node,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct NetStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub cut: u64,
}

pub struct Network {
    /// By (delivery time, send order): equal times keep their order, different delays reorder.
    in_flight: BTreeMap<(u64, u64), Message>,
    next_id: u64,
    /// Per node: true time until which its link is cut, both ways.
    cut_until: Vec<u64>,
    loss: f64,
    duplicate: f64,
    slow: f64,
    pub stats: NetStats,
}

impl Network {
    pub fn new(nodes: usize, loss: f64, duplicate: f64, slow: f64) -> Self {
        Network {
            in_flight: BTreeMap::new(),
            next_id: 0,
            cut_until: vec![0; nodes],
            loss,
            duplicate,
            slow,
            stats: NetStats::default(),
        }
    }

    pub fn is_cut(&self, node: usize, now: u64) -> bool {
        now < self.cut_until[node]
    }

    pub fn cut(&mut self, node: usize, until: u64) {
        self.cut_until[node] = self.cut_until[node].max(until);
    }

    /// No more faults from here on; messages already in flight still arrive.
    pub fn heal(&mut self) {
        self.cut_until.iter_mut().for_each(|t| *t = 0);
        self.loss = 0.0;
        self.duplicate = 0.0;
        self.slow = 0.0;
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn send(&mut self, rng: &mut Rng, now: u64, message: Message) {
        self.stats.sent += 1;
        if self.is_cut(message.node(), now) {
            self.stats.cut += 1;
            return;
        }
        if rng.chance(self.loss) {
            self.stats.lost += 1;
            return;
        }
        if rng.chance(self.duplicate) {
            self.stats.duplicated += 1;
            let at = now + self.delay(rng);
            self.enqueue(at, message.clone());
        }
        let at = now + self.delay(rng);
        self.enqueue(at, message);
    }

    fn delay(&self, rng: &mut Rng) -> u64 {
        if rng.chance(self.slow) {
            rng.range(100, 1_500)
        } else {
            rng.range(1, 60)
        }
    }

    fn enqueue(&mut self, at: u64, message: Message) {
        self.in_flight.insert((at, self.next_id), message);
        self.next_id += 1;
    }

    /// The next message due by `now`, if any; one arriving on a cut link is dropped.
    pub fn next_due(&mut self, now: u64) -> Option<Message> {
        loop {
            let entry = self.in_flight.first_entry()?;
            if entry.key().0 > now {
                return None;
            }
            let message = entry.remove();
            if self.is_cut(message.node(), now) {
                self.stats.cut += 1;
                continue;
            }
            return Some(message);
        }
    }
}
