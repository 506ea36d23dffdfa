//! Leases and rebalancing on the coordinator, against a real sled store and without a network:
//! staged moves in demarcation order, drains, dark-node reclaim with its quarantine, reconcile,
//! write-off and top-up. Node uploads are built by hand, as the node would send them.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use edgecard_coordinator::import::KeyFormat;
use edgecard_coordinator::records::{MoveState, Price, ProductRecord, SliceState, TopUpPolicy};
use edgecard_coordinator::service::{now_millis, Coordinator, CoordinatorError, Settings};
use edgecard_protocol::rebalance::StagedChange;
use edgecard_protocol::{
    ControlBody, ControlMessage, KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, SignedGrant, Sku, SliceGrant,
    SliceId, SliceStock, SyncUpload, UnixMillis,
};
use edgecard_store::{Store, StoreMetrics};

const SKU: &str = "gold";

/// The one slice an allocation made.
fn only(mut slices: Vec<edgecard_coordinator::records::SliceRecord>) -> edgecard_coordinator::records::SliceRecord {
    assert_eq!(slices.len(), 1, "one allocation, one slice");
    slices.remove(0)
}

fn sku() -> Sku {
    Sku::new(SKU).unwrap()
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

async fn setup(dir: &std::path::Path, keys: usize, settings: Settings) -> Coordinator {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let c = Coordinator::new(store, key(), settings);
    c.add_product(ProductRecord {
        sku: sku(),
        titles: vec![("en".into(), "Gold".into())],
        prices: vec![Price { amount_minor: 100, currency: "USD".into() }],
        topup: None,
    })
    .await
    .unwrap();
    let text: String = (0..keys).map(|i| format!("GOLD-{i:05}\n")).collect();
    c.import_keys(&sku(), &text, KeyFormat::Lines, false).await.unwrap();
    for name in ["eu-1", "ap-1"] {
        c.add_node(&node(name), name).await.unwrap();
    }
    c
}

/// A node's view of its conversation with the coordinator: seqs and applied control messages.
struct FakeNode {
    id: NodeId,
    seq: u64,
    applied: u64,
}

impl FakeNode {
    fn new(name: &str) -> Self {
        FakeNode { id: node(name), seq: 0, applied: 0 }
    }

    fn event(&mut self, order: u8, kind: OrderEventKind) -> OrderEvent {
        self.seq += 1;
        let order_id = if order == 0 { OrderId::NONE } else { OrderId::from_bytes([order; 16]) };
        OrderEvent { node_id: self.id.clone(), seq: self.seq, at: now_millis(), order_id, sku: sku(), kind }
    }

    /// Uploads `events`, marks every control message received as applied, returns them.
    async fn sync(&mut self, c: &Coordinator, events: Vec<OrderEvent>, stock: u64) -> Vec<ControlMessage> {
        let stock = vec![SliceStock { slice_id: SliceId(0), sku: sku(), available: stock, selling: true }];
        let upload = SyncUpload {
            node_id: self.id.clone(),
            incarnation: 1,
            newest_seq: self.seq,
            events,
            control_applied: self.applied,
            stock,
            refused_control: vec![],
            lookups: vec![],
        };
        let ack = c.ingest(&self.id, upload).await.unwrap();
        if let Some(last) = ack.control.last() {
            self.applied = last.seq;
        }
        ack.control
    }
}

fn grants(messages: &[ControlMessage], to: &NodeId) -> Vec<SliceGrant> {
    messages
        .iter()
        .filter_map(|m| match &m.body {
            ControlBody::Grant { signed_grant } => {
                Some(SignedGrant::from_bytes(signed_grant).unwrap().verify(&key().verifying_key(), to).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn shrinks(messages: &[ControlMessage]) -> Vec<(SliceId, u64, bool, u64)> {
    messages
        .iter()
        .filter_map(|m| match &m.body {
            ControlBody::Shrink { slice_id, count, close, ticket, .. } => Some((*slice_id, *count, *close, *ticket)),
            _ => None,
        })
        .collect()
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<KeyId> {
    range.map(KeyId).collect()
}

#[tokio::test]
async fn a_move_reaches_the_recipient_only_after_the_donor_released() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup(dir.path(), 100, Settings::default()).await;
    let (mut eu, mut ap) = (FakeNode::new("eu-1"), FakeNode::new("ap-1"));
    let slice = only(c.allocate(&sku(), &eu.id, 50).await.unwrap());
    eu.sync(&c, vec![], 50).await;
    ap.sync(&c, vec![], 0).await;

    let preview = c
        .stage_change(StagedChange::Move { sku: sku(), from: eu.id.clone(), to: ap.id.clone(), count: 20 })
        .await
        .unwrap();
    let plan = preview.plan.unwrap();
    assert_eq!(plan.steps.len(), 1);
    assert_eq!(preview.version, 1);
    assert!(matches!(c.apply_layout(2).await, Err(CoordinatorError::StaleLayout { staged: 1, given: 2 })));
    let moves = c.apply_layout(1).await.unwrap();
    assert_eq!(moves.len(), 1);
    let ticket = moves[0].order.ticket;
    assert!(matches!(c.apply_layout(1).await, Err(CoordinatorError::StaleLayout { .. })), "applied once");

    // The recipient gets nothing yet; the donor gets the shrink order.
    assert!(grants(&ap.sync(&c, vec![], 0).await, &ap.id).is_empty());
    let to_donor = eu.sync(&c, vec![], 50).await;
    assert_eq!(shrinks(&to_donor), vec![(slice.slice_id, 20, false, ticket)]);

    // The donor had 2 keys under reservation, so it releases 18 (its highest available).
    let reserved = eu.event(
        1,
        OrderEventKind::Reserved {
            key_ids: ids(1..=2),
            quantity: 2,
            amount_minor: 200,
            currency: "USD".into(),
            expires_at: UnixMillis(u64::MAX),
            token_sha256: String::new(),
        },
    );
    let released = eu.event(
        0,
        OrderEventKind::Released {
            slice_id: slice.slice_id,
            epoch: edgecard_protocol::Epoch(2),
            ticket,
            key_ids: ids(33..=50),
        },
    );
    eu.sync(&c, vec![reserved, released], 30).await;
    let regranted = grants(&ap.sync(&c, vec![], 0).await, &ap.id);
    assert_eq!(regranted.len(), 1);
    assert_eq!(regranted[0].keys.iter().map(|k| k.key_id).collect::<Vec<_>>(), ids(33..=50));
    let record = c.moves().unwrap().into_iter().find(|m| m.order.ticket == ticket).unwrap();
    assert_eq!((record.released, record.state, record.in_flight()), (18, MoveState::Done, false));

    // A release under the same ticket replayed (a lost ack) changes nothing.
    let summaries = c.slice_summaries().unwrap();
    let unsold_at = |id: SliceId| summaries.iter().find(|s| s.slice.slice_id == id).unwrap().unsold;
    assert_eq!(unsold_at(slice.slice_id), 32);
    assert_eq!(unsold_at(regranted[0].slice_id), 18);
    assert_eq!(c.pool_size(&sku()), 50);
}

#[tokio::test]
async fn a_dark_node_loses_only_provably_unsold_keys_and_reconciles_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        lease: Duration::from_secs(60),
        max_clock_skew: Duration::from_secs(5),
        take_window: 10,
        ..Settings::default()
    };
    let c = setup(dir.path(), 100, settings).await;
    let mut eu = FakeNode::new("eu-1");
    let slice = only(c.allocate(&sku(), &eu.id, 100).await.unwrap());
    // The ledger knows keys 1-3 reserved (order 1), key 1-3 then delivered, keys 4-5 reserved (order 2).
    let reserve = |n: &mut FakeNode, order: u8, keys: Vec<KeyId>| {
        n.event(
            order,
            OrderEventKind::Reserved {
                quantity: keys.len() as u32,
                key_ids: keys,
                amount_minor: 100,
                currency: "USD".into(),
                expires_at: UnixMillis(u64::MAX),
                token_sha256: String::new(),
            },
        )
    };
    let events = vec![
        reserve(&mut eu, 1, ids(1..=3)),
        eu.event(1, OrderEventKind::Delivered { key_ids: ids(1..=3) }),
        reserve(&mut eu, 2, ids(4..=5)),
    ];
    eu.sync(&c, events, 95).await;

    // Before deadline + skew nothing happens.
    assert!(c.reclaim_expired(slice.lease_deadline.saturating_add_ms(5_000)).await.unwrap().is_empty());
    let reports = c.reclaim_expired(slice.lease_deadline.saturating_add_ms(5_001)).await.unwrap();
    assert_eq!(reports.len(), 1);
    // Unsold per the ledger: 4..=100 (97 keys). Held: 4, 5. Window: the 10 lowest of the rest, 6..=15.
    assert_eq!((reports[0].quarantined, reports[0].returned_to_pool), (12, 85));
    assert_eq!(c.pool_size(&sku()), 85);
    let summary = c.slice_summaries().unwrap().into_iter().find(|s| s.slice.slice_id == slice.slice_id).unwrap();
    assert_eq!((summary.unsold, summary.sold, summary.quarantined), (0, 3, 12));
    assert!(matches!(summary.slice.state, SliceState::Reclaimed { reconcile_ticket: Some(_), .. }));
    // The reclaimed keys can be granted elsewhere at once.
    let ap = node("ap-1");
    let elsewhere = only(c.allocate(&sku(), &ap, 85).await.unwrap());
    assert_eq!(elsewhere.key_runs, vec![(16, 100)]);

    // The node comes back: it had sold key 6 (in its window) without the coordinator knowing, and
    // order 2 expired. It is told to close the slice and releases what it still holds.
    let events = vec![
        reserve(&mut eu, 3, ids(6..=6)),
        eu.event(3, OrderEventKind::Delivered { key_ids: ids(6..=6) }),
        eu.event(2, OrderEventKind::Expired { key_ids: ids(4..=5) }),
    ];
    let control = eu.sync(&c, events, 0).await;
    let close = shrinks(&control);
    assert_eq!(close.len(), 1);
    let (closed_slice, _, is_close, ticket) = close[0];
    assert!(is_close && closed_slice == slice.slice_id);
    assert!(c.alarms().unwrap().is_empty(), "a window sale is no alarm: {:?}", c.alarms().unwrap());
    // The node still held 4, 5 and 7..=15, plus 16..=100 which it never sold (already reclaimed).
    let mut held: Vec<KeyId> = ids(4..=5);
    held.extend(ids(7..=100));
    let release = eu.event(
        0,
        OrderEventKind::Released {
            slice_id: slice.slice_id,
            epoch: edgecard_protocol::Epoch(2),
            ticket,
            key_ids: held,
        },
    );
    eu.sync(&c, vec![release], 0).await;
    assert_eq!(c.pool_size(&sku()), 11, "4, 5 and 7..=15 back in the pool; 16..=100 stay with ap-1");
    assert_eq!(c.settle_closed_slices().await.unwrap(), 1);
    let summary = c.slice_summaries().unwrap().into_iter().find(|s| s.slice.slice_id == slice.slice_id).unwrap();
    assert_eq!((summary.sold, summary.quarantined, summary.slice.state), (4, 0, SliceState::Closed));
    assert!(c.moves().unwrap().iter().all(|m| !m.in_flight()));
}

#[tokio::test]
async fn quarantined_keys_can_be_written_off_and_a_late_sale_is_still_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        lease: Duration::from_secs(60),
        max_clock_skew: Duration::from_secs(1),
        take_window: 5,
        ..Settings::default()
    };
    let c = setup(dir.path(), 20, settings).await;
    let mut eu = FakeNode::new("eu-1");
    let slice = only(c.allocate(&sku(), &eu.id, 20).await.unwrap());
    assert!(matches!(c.write_off(slice.slice_id).await, Err(CoordinatorError::NotReclaimed(_))));
    c.reclaim_expired(slice.lease_deadline.saturating_add_ms(2_000)).await.unwrap();
    assert_eq!(c.write_off(slice.slice_id).await.unwrap(), 5);
    let summary = c.slice_summaries().unwrap().into_iter().find(|s| s.slice.slice_id == slice.slice_id).unwrap();
    assert_eq!((summary.quarantined, summary.written_off), (0, 5));
    assert_eq!(c.pool_size(&sku()), 15);
    // The node shows up with a sale of a written-off key: recorded as sold, not refused.
    let events = vec![
        eu.event(
            1,
            OrderEventKind::Reserved {
                key_ids: ids(1..=1),
                quantity: 1,
                amount_minor: 100,
                currency: "USD".into(),
                expires_at: UnixMillis(u64::MAX),
                token_sha256: String::new(),
            },
        ),
        eu.event(1, OrderEventKind::Delivered { key_ids: ids(1..=1) }),
    ];
    eu.sync(&c, events, 0).await;
    assert!(c.alarms().unwrap().is_empty());
    let summary = c.slice_summaries().unwrap().into_iter().find(|s| s.slice.slice_id == slice.slice_id).unwrap();
    assert_eq!((summary.sold, summary.written_off), (1, 4));
}

#[tokio::test]
async fn a_drain_closes_every_slice_and_top_up_refills_below_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup(dir.path(), 100, Settings::default()).await;
    let mut eu = FakeNode::new("eu-1");
    let mut ap = FakeNode::new("ap-1");
    let slice = only(c.allocate(&sku(), &eu.id, 30).await.unwrap());
    c.stage_change(StagedChange::Drain { node: eu.id.clone() }).await.unwrap();
    assert_eq!(c.revert_layout().await.unwrap().changes.len(), 0, "revert discards the staged change");
    let preview = c.stage_change(StagedChange::Drain { node: eu.id.clone() }).await.unwrap();
    assert_eq!(preview.plan.unwrap().pool_after[SKU], 100);
    c.apply_layout(preview.version).await.unwrap();
    let control = eu.sync(&c, vec![], 30).await;
    let drain = shrinks(&control);
    assert_eq!(drain.len(), 1);
    let ticket = drain[0].3;
    let release = eu.event(
        0,
        OrderEventKind::Released {
            slice_id: slice.slice_id,
            epoch: edgecard_protocol::Epoch(2),
            ticket,
            key_ids: ids(1..=30),
        },
    );
    eu.sync(&c, vec![release], 0).await;
    assert_eq!(c.pool_size(&sku()), 100);
    c.settle_closed_slices().await.unwrap();
    assert!(c.slices().unwrap().iter().all(|s| s.state == SliceState::Closed));

    c.set_topup(&sku(), Some(TopUpPolicy { low_watermark: 10, target: 40 })).await.unwrap();
    assert!(c.set_topup(&sku(), Some(TopUpPolicy { low_watermark: 50, target: 40 })).await.is_err());
    // Above the watermark nothing happens.
    assert!(grants(&ap.sync(&c, vec![], 50).await, &ap.id).is_empty());
    // ap-1 reports 4 sellable: it is topped up to 40.
    let applied_before = ap.applied;
    let topped = grants(&ap.sync(&c, vec![], 4).await, &ap.id);
    assert_eq!(topped.len(), 1);
    assert_eq!(topped[0].keys.len(), 36);
    // While that grant is in flight (the node has not applied it), low stock tops up nothing more:
    // the same grant is simply sent again.
    ap.applied = applied_before;
    let again = grants(&ap.sync(&c, vec![], 4).await, &ap.id);
    assert_eq!(again.iter().map(|g| g.slice_id).collect::<Vec<_>>(), vec![topped[0].slice_id]);
    assert_eq!(c.pool_size(&sku()), 64);
}

#[tokio::test]
async fn a_closing_slice_keeps_its_lease_while_the_node_is_in_contact() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { lease: Duration::from_secs(2), ..Settings::default() };
    let c = setup(dir.path(), 10, settings).await;
    let mut eu = FakeNode::new("eu-1");
    let slice = only(c.allocate(&sku(), &eu.id, 10).await.unwrap());
    eu.sync(&c, vec![], 10).await;
    let preview = c.stage_change(StagedChange::Drain { node: eu.id.clone() }).await.unwrap();
    c.apply_layout(preview.version).await.unwrap();
    eu.sync(&c, vec![], 10).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Still closing (an open reservation keeps a key at the node): the lease is renewed anyway,
    // for the epoch the close set, so the held key stays deliverable.
    let control = eu.sync(&c, vec![], 0).await;
    let renewed: Vec<_> = control
        .iter()
        .filter_map(|m| match &m.body {
            ControlBody::Renew { signed_renewal } => Some(
                edgecard_protocol::SignedRenewal::from_bytes(signed_renewal)
                    .unwrap()
                    .verify(&key().verifying_key(), &eu.id)
                    .unwrap(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(renewed.len(), 1, "{control:?}");
    assert_eq!((renewed[0].slice_id, renewed[0].epoch), (slice.slice_id, edgecard_protocol::Epoch(2)));
    assert!(c.reclaim_expired(now_millis()).await.unwrap().is_empty());
}

/// A move's keys reach the recipient in chunks, each one atomic: when a chunk fails (here a key
/// record is missing), the chunks before it are granted, the rest stay pending in the move and in
/// the pool, housekeeping still succeeds, and once repaired it finishes the move.
#[tokio::test]
async fn a_regrant_chunk_that_fails_loses_no_key_and_blocks_nothing() {
    use edgecard_coordinator::records::{self as rec, MoveKind, MoveOrder, MoveRecord};
    use edgecard_protocol::rebalance::Destination;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { regrant_keys_per_batch: 4, ..Settings::default() };
    let c = setup(dir.path(), 30, settings).await;
    let mut ap = FakeNode::new("ap-1");
    ap.sync(&c, vec![], 0).await;

    // A move whose donor released keys 9-20 (they are in the pool), waiting to be granted to ap-1.
    let order = MoveOrder {
        ticket: 77,
        kind: MoveKind::Move,
        sku: sku(),
        slice_id: SliceId(1),
        from: node("eu-1"),
        to: Destination::Node(ap.id.clone()),
        requested: 12,
        close: false,
    };
    let mut record = MoveRecord::sent(order, now_millis());
    record.released = 12;
    record.state = MoveState::Done;
    record.pending_regrant = vec![(9, 20)];
    // Key 14, in the second chunk, has lost its record.
    let key_14 = rec::key_key(&sku(), KeyId(14));
    let saved = c.store().get(&key_14).unwrap().unwrap();
    let mut batch = edgecard_store::WriteBatch::default();
    batch.put(rec::move_key(77), rec::encode(&record).unwrap());
    batch.delete(key_14.clone());
    c.store().apply(batch).unwrap();

    c.settle_closed_slices().await.expect("a failing move does not fail housekeeping");
    let record = c.moves().unwrap().into_iter().find(|m| m.order.ticket == 77).unwrap();
    let pending: Vec<u64> = record.pending_regrant.iter().flat_map(|(a, b)| *a..=*b).collect();
    assert_eq!(pending, (13..=20).collect::<Vec<_>>(), "the first chunk went out, the rest waits");
    let granted: Vec<KeyId> =
        grants(&ap.sync(&c, vec![], 0).await, &ap.id).iter().flat_map(|g| g.keys.iter().map(|k| k.key_id)).collect();
    assert_eq!(granted, ids(9..=12));
    assert_eq!(c.pool_size(&sku()), 30 - 4, "the pending keys are still in the pool");

    // Repaired, the next housekeeping round finishes the move.
    let mut batch = edgecard_store::WriteBatch::default();
    batch.put(key_14, saved);
    c.store().apply(batch).unwrap();
    c.settle_closed_slices().await.unwrap();
    let granted: Vec<KeyId> =
        grants(&ap.sync(&c, vec![], 0).await, &ap.id).iter().flat_map(|g| g.keys.iter().map(|k| k.key_id)).collect();
    assert_eq!(granted, ids(13..=20));
    assert_eq!(c.pool_size(&sku()), 30 - 12);
    let record = c.moves().unwrap().into_iter().find(|m| m.order.ticket == 77).unwrap();
    assert!(record.pending_regrant.is_empty());
}
