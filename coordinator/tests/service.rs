//! The coordinator's service against a real sled store: products, import, allocation, and the
//! ledger's exactly-once ingest with its alarms.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use edgecard_coordinator::import::KeyFormat;
use edgecard_coordinator::records::{LedgerStatus, Price, ProductRecord};
use edgecard_coordinator::service::{Coordinator, CoordinatorError, OrderFilter, Settings};
use edgecard_protocol::{
    ControlBody, KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, OrderLookup, SignedGrant, SignedRenewal, Sku,
    SyncUpload, UnixMillis,
};
use edgecard_store::{Store, StoreMetrics};

/// The one slice an allocation made.
fn only(mut slices: Vec<edgecard_coordinator::records::SliceRecord>) -> edgecard_coordinator::records::SliceRecord {
    assert_eq!(slices.len(), 1, "one allocation, one slice");
    slices.remove(0)
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn open(dir: &Path) -> Coordinator {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    Coordinator::new(store, key(), Settings::default())
}

fn product(s: &str) -> ProductRecord {
    ProductRecord {
        sku: sku(s),
        titles: vec![("en".into(), format!("Product {s}")), ("zh-CN".into(), "产品".into())],
        prices: vec![Price { amount_minor: 1000, currency: "USD".into() }],
        topup: None,
    }
}

async fn with_keys(c: &Coordinator, s: &str, n: usize) {
    c.add_product(product(s)).await.unwrap();
    let text: String = (0..n).map(|i| format!("{s}-KEY-{i:05}\n")).collect();
    let report = c.import_keys(&sku(s), &text, KeyFormat::Lines, false).await.unwrap();
    assert_eq!(report.imported, n as u64);
}

fn event(n: &NodeId, seq: u64, order: u8, s: &str, kind: OrderEventKind) -> OrderEvent {
    OrderEvent {
        node_id: n.clone(),
        seq,
        at: UnixMillis(seq),
        order_id: OrderId::from_bytes([order; 16]),
        sku: sku(s),
        kind,
    }
}

fn upload(n: &NodeId, events: Vec<OrderEvent>, control_applied: u64) -> SyncUpload {
    let newest_seq = events.last().map_or(0, |e| e.seq);
    SyncUpload {
        node_id: n.clone(),
        incarnation: 1,
        newest_seq,
        events,
        control_applied,
        stock: vec![],
        refused_control: vec![],
        lookups: vec![],
    }
}

#[tokio::test]
async fn products_are_validated_and_prices_updated() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.add_product(product("game")).await.unwrap();
    assert!(matches!(c.add_product(product("game")).await, Err(CoordinatorError::ProductExists(_))));
    let mut bad = product("bad");
    bad.prices[0].currency = "usd".into();
    assert!(matches!(c.add_product(bad).await, Err(CoordinatorError::InvalidProduct(_))));
    let mut untitled = product("untitled");
    untitled.titles.retain(|(lang, _)| lang != "en");
    assert!(matches!(c.add_product(untitled).await, Err(CoordinatorError::InvalidProduct(_))));
    let updated = c.set_price(&sku("game"), Price { amount_minor: 7200, currency: "CNY".into() }).await.unwrap();
    assert_eq!(updated.prices.len(), 2);
    let updated = c.set_price(&sku("game"), Price { amount_minor: 900, currency: "USD".into() }).await.unwrap();
    assert_eq!(updated.prices[0], Price { amount_minor: 900, currency: "USD".into() });
    assert!(matches!(
        c.set_price(&sku("nope"), Price { amount_minor: 1, currency: "USD".into() }).await,
        Err(CoordinatorError::UnknownSku(_))
    ));
    assert_eq!(c.products().unwrap().len(), 1);
}

#[tokio::test]
async fn import_reports_every_kind_of_row_and_deduplicates_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.add_product(product("game")).await.unwrap();
    c.add_product(product("gift")).await.unwrap();
    let first =
        c.import_keys(&sku("game"), "\u{feff}A-1\r\nA-2\r\n\r\nA-1\r\n", KeyFormat::Lines, false).await.unwrap();
    assert_eq!(first.imported, 2);
    assert_eq!((first.first_key_id, first.last_key_id), (Some(1), Some(2)));
    assert_eq!(first.duplicates_in_file, vec![4]);
    assert_eq!(first.blank_lines, 1);

    let long = "Z".repeat(513);
    let text = format!("A-2\nB-1\n{long}\nB-2\n");
    let second = c.import_keys(&sku("gift"), &text, KeyFormat::Lines, false).await.unwrap();
    assert_eq!(second.imported, 2, "{second:?}");
    assert_eq!(second.duplicates_known, vec![1], "a key known under another sku is a duplicate");
    assert_eq!(second.invalid.len(), 1);
    assert_eq!(second.invalid[0].line, 3);
    assert_eq!((second.first_key_id, second.last_key_id), (Some(3), Some(4)));

    let strict = c.import_keys(&sku("gift"), "C-1\nB-1\n", KeyFormat::Lines, true).await;
    assert!(matches!(strict, Err(CoordinatorError::ImportRefused(_))));
    assert_eq!(c.pool_size(&sku("gift")), 2, "a refused strict import lands nothing");

    let empty = c.import_keys(&sku("gift"), "", KeyFormat::Lines, false).await.unwrap();
    assert_eq!(empty.imported, 0);
    assert!(matches!(
        c.import_keys(&sku("nope"), "X", KeyFormat::Lines, false).await,
        Err(CoordinatorError::UnknownSku(_))
    ));

    let csv = c
        .import_keys(&sku("gift"), "id,code\n1,CSV-1\n2,CSV-2\n", KeyFormat::Csv { column: 1, header: true }, false)
        .await
        .unwrap();
    assert_eq!(csv.imported, 2);
    assert_eq!(c.pool_size(&sku("gift")), 4);
}

#[tokio::test]
async fn allocation_grants_lowest_pool_keys_as_a_signed_slice() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    with_keys(&c, "game", 10).await;
    let eu = node("eu-1");
    c.add_node(&eu, "eu").await.unwrap();
    assert!(matches!(c.add_node(&eu, "eu").await, Err(CoordinatorError::NodeExists(_))));

    let slice = only(c.allocate(&sku("game"), &eu, 4).await.unwrap());
    assert_eq!(slice.key_runs, vec![(1, 4)]);
    assert_eq!(c.pool_size(&sku("game")), 6);
    let second = only(c.allocate(&sku("game"), &eu, 3).await.unwrap());
    assert_eq!(second.key_runs, vec![(5, 7)]);
    assert!(matches!(
        c.allocate(&sku("game"), &eu, 4).await,
        Err(CoordinatorError::NotEnoughKeys { available: 3, .. })
    ));
    assert!(matches!(c.allocate(&sku("game"), &node("us-1"), 1).await, Err(CoordinatorError::UnknownNode(_))));
    assert!(matches!(c.allocate(&sku("game"), &eu, 0).await, Err(CoordinatorError::ZeroCount)));

    // The node's queue: the catalog (at node add), then both grants, verifiable by the node.
    let pending = c.pending_control(&eu).unwrap();
    assert_eq!(pending.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(matches!(&pending[0].body, ControlBody::Catalog { products } if products.len() == 1));
    let ControlBody::Grant { signed_grant } = &pending[1].body else { panic!("expected a grant") };
    let grant = SignedGrant::from_bytes(signed_grant).unwrap().verify(&key().verifying_key(), &eu).unwrap();
    assert_eq!(grant.keys.iter().map(|k| k.key_id).collect::<Vec<_>>(), vec![KeyId(1), KeyId(2), KeyId(3), KeyId(4)]);
    assert_eq!(grant.keys[0].secret.expose(), "game-KEY-00000");

    // Reporting control applied prunes the queue.
    let ack = c.ingest(&eu, upload(&eu, vec![], 2)).await.unwrap();
    assert_eq!(ack.control.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);

    c.revoke_node(&eu).await.unwrap();
    assert!(c.is_revoked(&eu));
    assert!(matches!(c.allocate(&sku("game"), &eu, 1).await, Err(CoordinatorError::NodeRevoked(_))));
    assert!(matches!(c.ingest(&eu, upload(&eu, vec![], 0)).await, Err(CoordinatorError::NodeRevoked(_))));
}

fn reserved(keys: &[u64]) -> OrderEventKind {
    OrderEventKind::Reserved {
        key_ids: keys.iter().map(|k| KeyId(*k)).collect(),
        quantity: keys.len() as u32,
        amount_minor: 1000 * keys.len() as u64,
        currency: "USD".into(),
        expires_at: UnixMillis(10_000),
        token_sha256: String::new(),
    }
}

fn delivered(keys: &[u64]) -> OrderEventKind {
    OrderEventKind::Delivered { key_ids: keys.iter().map(|k| KeyId(*k)).collect() }
}

fn paid() -> OrderEventKind {
    OrderEventKind::Paid {
        channel: "sandbox".into(),
        provider_txn: "t".into(),
        amount_minor: 1000,
        currency: "USD".into(),
    }
}

#[tokio::test]
async fn ingest_is_exactly_once_and_refuses_keys_not_granted() {
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let us = node("us-1");
    {
        let c = open(dir.path());
        with_keys(&c, "game", 10).await;
        c.add_node(&eu, "eu").await.unwrap();
        c.add_node(&us, "us").await.unwrap();
        c.allocate(&sku("game"), &eu, 5).await.unwrap(); // keys 1..=5
        c.allocate(&sku("game"), &us, 5).await.unwrap(); // keys 6..=10

        let events = vec![
            event(&eu, 1, 1, "game", reserved(&[1])),
            event(&eu, 2, 1, "game", paid()),
            event(&eu, 3, 1, "game", delivered(&[1])),
        ];
        let ack = c.ingest(&eu, upload(&eu, events.clone(), 0)).await.unwrap();
        assert_eq!(ack.events_high_water, 3);
        // The ack was lost: the node sends the same batch again, plus one more.
        let mut again = events.clone();
        again.push(event(&eu, 4, 2, "game", reserved(&[2])));
        let ack = c.ingest(&eu, upload(&eu, again, 0)).await.unwrap();
        assert_eq!(ack.events_high_water, 4);
        // A node that lost its ack record re-sends only the first two: the ack stops there.
        let resent = SyncUpload { newest_seq: 4, ..upload(&eu, events[..2].to_vec(), 0) };
        let ack = c.ingest(&eu, resent).await.unwrap();
        assert_eq!(ack.events_high_water, 2);
        assert!(ack.confirmed && ack.restore.is_empty(), "a node with all its events is not behind");
        let orders = c.orders(&OrderFilter::default()).unwrap();
        assert_eq!(orders.len(), 2, "no duplicates from the re-sent batches");
        assert_eq!(orders[0].status, LedgerStatus::Delivered);
        assert_eq!(orders[0].key_ids, vec![KeyId(1)]);

        // eu reports a key granted to us: refused, alarm, still acked; the rest of that order's
        // life (paid, delivered) is refused with it and makes no ledger order.
        let tainted = vec![
            event(&eu, 5, 3, "game", reserved(&[7])),
            event(&eu, 6, 3, "game", paid()),
            event(&eu, 7, 3, "game", delivered(&[7])),
        ];
        let ack = c.ingest(&eu, upload(&eu, tainted, 0)).await.unwrap();
        assert_eq!(ack.events_high_water, 7);
        // A second order delivering key 1: refused as a double delivery.
        let second = vec![event(&eu, 8, 4, "game", reserved(&[2])), event(&eu, 9, 4, "game", delivered(&[1]))];
        let ack = c.ingest(&eu, upload(&eu, second, 0)).await.unwrap();
        assert_eq!(ack.events_high_water, 9);
        let alarms = c.alarms().unwrap();
        assert_eq!(
            alarms.iter().map(|a| a.kind.as_str()).collect::<Vec<_>>(),
            vec!["key_not_granted", "refused_order", "refused_order", "key_delivered_twice"]
        );
        assert_eq!(alarms.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        let orders = c.orders(&OrderFilter::default()).unwrap();
        assert_eq!(orders.len(), 3, "refused events make no orders: {orders:?}");
        assert!(orders.iter().all(|o| o.order_id != OrderId::from_bytes([3; 16])));
        c.store().close();
    }
    // After a restart the high-water mark holds: old events are still skipped.
    let c = open(dir.path());
    let ack = c.ingest(&eu, upload(&eu, vec![event(&eu, 9, 4, "game", delivered(&[1]))], 0)).await.unwrap();
    assert_eq!(ack.events_high_water, 9);
    assert_eq!(c.alarms().unwrap().len(), 4, "a replayed refused event is not alarmed twice");
    let delivered_only = OrderFilter { status: Some(LedgerStatus::Delivered), ..OrderFilter::default() };
    assert_eq!(c.orders(&delivered_only).unwrap().len(), 1);
    let by_node = OrderFilter { node: Some(us.clone()), ..OrderFilter::default() };
    assert!(c.orders(&by_node).unwrap().is_empty());
}

fn key_state(c: &Coordinator, s: &str, id: u64) -> edgecard_coordinator::records::KeyState {
    let raw = c.store().get(&edgecard_coordinator::records::key_key(&sku(s), KeyId(id))).unwrap().unwrap();
    edgecard_coordinator::records::decode::<edgecard_coordinator::records::KeyRecord>("key", &raw).unwrap().state
}

#[tokio::test]
async fn payment_problems_refunds_and_disputes_reach_the_ledger_with_alarms() {
    use edgecard_coordinator::records::KeyState;
    use edgecard_protocol::UnmatchedReason;
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let eu = node("eu-1");
    with_keys(&c, "game", 6).await;
    c.add_node(&eu, "eu").await.unwrap();
    c.allocate(&sku("game"), &eu, 6).await.unwrap();
    let mismatch = OrderEventKind::PaymentMismatch {
        channel: "epay".into(),
        provider_txn: "2024001".into(),
        amount_minor: 1,
        currency: "CNY".into(),
    };
    let unmatched = OrderEventKind::PaymentUnmatched {
        channel: "stripe".into(),
        provider_txn: "cs_9".into(),
        amount_minor: 1000,
        currency: "USD".into(),
        reason: UnmatchedReason::WrongChannel,
    };
    let refunded = |keys: &[u64], manual: bool| OrderEventKind::Refunded {
        channel: "stripe".into(),
        provider_refund: if manual { String::new() } else { "re_1".into() },
        amount_minor: 1000,
        currency: "USD".into(),
        manual,
        key_ids: keys.iter().map(|k| KeyId(*k)).collect(),
    };
    let disputed = OrderEventKind::Disputed {
        channel: "stripe".into(),
        provider_dispute: "dp_1".into(),
        amount_minor: 1000,
        currency: "USD".into(),
    };
    let events = vec![
        // Order 1: a mismatched payment, then its reservation ends.
        event(&eu, 1, 1, "game", reserved(&[1])),
        event(&eu, 2, 1, "game", mismatch),
        // Order 2: a payment it never opened, then delivered and refunded.
        event(&eu, 3, 2, "game", reserved(&[2])),
        event(&eu, 4, 2, "game", unmatched),
        event(&eu, 5, 2, "game", paid()),
        event(&eu, 6, 2, "game", delivered(&[2])),
        event(&eu, 7, 2, "game", refunded(&[2], false)),
        // Order 3: delivered and disputed; order 4: delivered, refunded by hand.
        event(&eu, 8, 3, "game", reserved(&[3])),
        event(&eu, 9, 3, "game", paid()),
        event(&eu, 10, 3, "game", delivered(&[3])),
        event(&eu, 11, 3, "game", disputed),
        event(&eu, 12, 4, "game", reserved(&[4])),
        event(&eu, 13, 4, "game", delivered(&[4])),
        event(&eu, 14, 4, "game", refunded(&[4], true)),
        // Order 5 claims a refund of a key it was never delivered.
        event(&eu, 15, 5, "game", reserved(&[5])),
        event(&eu, 16, 5, "game", refunded(&[6], false)),
    ];
    let ack = c.ingest(&eu, upload(&eu, events, 0)).await.unwrap();
    assert_eq!(ack.events_high_water, 16);
    let status_of = |order: u8| {
        let orders = c.orders(&OrderFilter::default()).unwrap();
        orders.into_iter().find(|o| o.order_id == OrderId::from_bytes([order; 16])).unwrap()
    };
    let first = status_of(1);
    assert_eq!(first.status, LedgerStatus::PaymentMismatch);
    assert_eq!((first.channel.as_deref(), first.provider_txn.as_deref()), (Some("epay"), Some("2024001")));
    assert_eq!(status_of(2).status, LedgerStatus::Refunded);
    assert_eq!(status_of(3).status, LedgerStatus::Disputed);
    assert_eq!(status_of(4).status, LedgerStatus::RefundManual);
    assert_eq!(status_of(5).status, LedgerStatus::Reserved, "the bogus refund changed nothing");
    let listed = c.orders(&OrderFilter { status: Some(LedgerStatus::PaymentMismatch), ..OrderFilter::default() });
    assert_eq!(listed.unwrap().len(), 1);
    let kinds: Vec<String> = c.alarms().unwrap().into_iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        vec!["payment_mismatch", "payment_unmatched", "payment_disputed", "refund_manual", "refund_of_unsold_key"]
    );
    assert!(matches!(key_state(&c, "game", 2), KeyState::Revoked { .. }), "a refunded order's keys are revoked");
    assert!(matches!(key_state(&c, "game", 4), KeyState::Revoked { .. }));
    assert!(matches!(key_state(&c, "game", 3), KeyState::Sold { .. }), "a dispute alone revokes nothing");
    assert!(matches!(key_state(&c, "game", 6), KeyState::Granted { .. }));

    // The mismatched order's reservation ends: its keys no longer count as held at the node.
    let ack = c.ingest(
        &eu,
        upload(&eu, vec![event(&eu, 17, 1, "game", OrderEventKind::Expired { key_ids: vec![KeyId(1)] })], 0),
    );
    assert_eq!(ack.await.unwrap().events_high_water, 17);
    let first = status_of(1);
    assert_eq!(first.status, LedgerStatus::PaymentMismatch);
    assert!(first.key_ids.is_empty());
    // A revoked key delivered to another order is a double delivery.
    let again = vec![event(&eu, 18, 6, "game", reserved(&[5])), event(&eu, 19, 6, "game", delivered(&[2]))];
    c.ingest(&eu, upload(&eu, again, 0)).await.unwrap();
    assert_eq!(c.alarms().unwrap().last().unwrap().kind, "key_delivered_twice");
}

#[tokio::test]
async fn leases_are_renewed_while_the_node_is_in_contact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let settings = Settings { lease: std::time::Duration::from_secs(2), ..Settings::default() };
    let c = Coordinator::new(store, key(), settings);
    with_keys(&c, "game", 3).await;
    let eu = node("eu-1");
    c.add_node(&eu, "eu").await.unwrap();
    let slice = only(c.allocate(&sku("game"), &eu, 3).await.unwrap());
    // Early in the lease: contact renews nothing.
    let ack = c.ingest(&eu, upload(&eu, vec![], 2)).await.unwrap();
    assert!(ack.control.is_empty(), "{:?}", ack.control.iter().map(|m| m.seq).collect::<Vec<_>>());

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let ack = c.ingest(&eu, upload(&eu, vec![], 2)).await.unwrap();
    assert_eq!(ack.control.len(), 1, "past half its length the lease is renewed");
    let ControlBody::Renew { signed_renewal } = &ack.control[0].body else { panic!("expected a renewal") };
    let renewal = SignedRenewal::from_bytes(signed_renewal).unwrap().verify(&key().verifying_key(), &eu).unwrap();
    assert_eq!(renewal.slice_id, slice.slice_id);
    assert_eq!(renewal.epoch, slice.epoch);
    assert!(renewal.lease_deadline > slice.lease_deadline);
    let renewed = c.slices().unwrap().into_iter().find(|s| s.slice_id == slice.slice_id).unwrap();
    assert_eq!(renewed.lease_deadline, renewal.lease_deadline);

    // The next contact does not queue another renewal.
    let ack = c.ingest(&eu, upload(&eu, vec![], ack.control[0].seq)).await.unwrap();
    assert!(ack.control.is_empty());
}

/// Two orders of `n`, each reserved (with a token digest), paid and delivered: seqs 1..=6, keys 1
/// and 2.
fn two_sales(n: &NodeId) -> Vec<OrderEvent> {
    let mut events = Vec::new();
    for (i, key) in [1u64, 2].into_iter().enumerate() {
        let seq = 3 * i as u64;
        let order = key as u8;
        let reserve = OrderEventKind::Reserved {
            key_ids: vec![KeyId(key)],
            quantity: 1,
            amount_minor: 1000,
            currency: "USD".into(),
            expires_at: UnixMillis(10_000),
            token_sha256: format!("{:064x}", key),
        };
        events.push(event(n, seq + 1, order, "game", reserve));
        events.push(event(n, seq + 2, order, "game", paid_with(&format!("t{key}"))));
        events.push(event(n, seq + 3, order, "game", delivered(&[key])));
    }
    events
}

fn paid_with(txn: &str) -> OrderEventKind {
    OrderEventKind::Paid {
        channel: "sandbox".into(),
        provider_txn: txn.into(),
        amount_minor: 1000,
        currency: "USD".into(),
    }
}

fn alarm_kinds(c: &Coordinator) -> Vec<String> {
    c.alarms().unwrap().into_iter().map(|a| a.kind).collect()
}

#[tokio::test]
async fn a_data_dir_behind_the_ledger_is_fenced_and_gets_back_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let eu = node("eu-1");
    with_keys(&c, "game", 10).await;
    c.add_node(&eu, "eu").await.unwrap();
    c.allocate(&sku("game"), &eu, 5).await.unwrap();
    let events = two_sales(&eu);
    let ack = c.ingest(&eu, upload(&eu, events.clone(), 2)).await.unwrap();
    assert!(ack.confirmed);
    assert_eq!(ack.events_high_water, 6);
    // Another grant waits for the node; a fenced node must not get it.
    c.allocate(&sku("game"), &eu, 2).await.unwrap();

    // An older copy of the data dir: it has the first order only, and uploads it again.
    let copy = SyncUpload { newest_seq: 3, ..upload(&eu, events[..3].to_vec(), 2) };
    let ack = c.ingest(&eu, copy.clone()).await.unwrap();
    assert!(!ack.confirmed, "a data dir behind the ledger is not confirmed");
    assert_eq!(ack.events_high_water, 3);
    assert_eq!(ack.ledger_high_water, 6);
    assert_eq!(ack.restore, events[3..].to_vec(), "the lost events come back as they were, token digest included");
    assert!(ack.control.is_empty(), "no control for a fenced node: {:?}", ack.control);
    assert_eq!(alarm_kinds(&c), vec!["node_rolled_back"]);
    assert!(c.lineage(&eu).unwrap().fence.is_some());
    // Asking again (the ack was lost) raises no second alarm.
    let again = c.ingest(&eu, copy).await.unwrap();
    assert_eq!(again.restore, events[3..].to_vec());
    assert_eq!(alarm_kinds(&c).len(), 1);

    // Restored: the node has everything; confirmed, fence lifted, control flows again.
    let caught_up = SyncUpload { newest_seq: 6, ..upload(&eu, vec![], 2) };
    let ack = c.ingest(&eu, caught_up).await.unwrap();
    assert!(ack.confirmed);
    assert!(ack.restore.is_empty());
    assert_eq!(ack.events_high_water, 6);
    assert!(!ack.control.is_empty(), "the waiting grant goes out once confirmed");
    assert!(c.lineage(&eu).unwrap().fence.is_none());
    assert_eq!(c.orders(&OrderFilter::default()).unwrap().len(), 2, "nothing ingested twice");
}

#[tokio::test]
async fn a_data_dir_that_rewrites_the_ledger_stays_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let eu = node("eu-1");
    with_keys(&c, "game", 10).await;
    c.add_node(&eu, "eu").await.unwrap();
    c.allocate(&sku("game"), &eu, 5).await.unwrap();
    let events = two_sales(&eu);
    c.ingest(&eu, upload(&eu, events.clone(), 2)).await.unwrap();

    // Seq 6 again, but delivering another key: not the history the ledger holds.
    let mut forged = events.clone();
    forged[5] = event(&eu, 6, 2, "game", delivered(&[3]));
    let ack = c.ingest(&eu, upload(&eu, forged, 2)).await.unwrap();
    assert!(!ack.confirmed);
    let fence = c.lineage(&eu).unwrap().fence.unwrap();
    assert!(fence.diverged);
    assert_eq!(alarm_kinds(&c), vec!["node_rolled_back"]);
    let detail = &c.alarms().unwrap()[0].detail;
    assert!(detail.contains("event 6 differs"), "{detail}");
    // Even with every seq the ledger has, it is not confirmed.
    let ack = c.ingest(&eu, SyncUpload { newest_seq: 6, ..upload(&eu, vec![], 2) }).await.unwrap();
    assert!(!ack.confirmed, "a diverged data dir stays fenced");
    let orders = c.orders(&OrderFilter::default()).unwrap();
    assert_eq!(orders[1].key_ids, vec![KeyId(2)], "the ledger keeps its own history");
}

#[tokio::test]
async fn an_empty_new_data_dir_replaces_the_old_and_one_with_history_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let eu = node("eu-1");
    with_keys(&c, "game", 30).await;
    c.add_node(&eu, "eu").await.unwrap();
    c.allocate(&sku("game"), &eu, 20).await.unwrap();
    c.ingest(&eu, upload(&eu, two_sales(&eu), 2)).await.unwrap();
    let pool_before = c.pool_size(&sku("game"));

    // The data dir was wiped: a new incarnation with nothing in it.
    let wiped = SyncUpload { incarnation: 2, newest_seq: 0, ..upload(&eu, vec![], 0) };
    let ack = c.ingest(&eu, wiped).await.unwrap();
    assert!(ack.confirmed, "an empty new data dir is adopted at once");
    assert_eq!(ack.ledger_high_water, 6, "numbering continues after the ledger's");
    assert_eq!(ack.events_high_water, 0);
    assert!(ack.control.iter().any(|m| matches!(m.body, ControlBody::Catalog { .. })), "the new dir gets the catalog");
    assert_eq!(c.lineage(&eu).unwrap().incarnation, 2);
    assert_eq!(c.lineage(&eu).unwrap().previous, vec![1]);
    assert_eq!(alarm_kinds(&c), vec!["node_replaced"]);
    let slices = c.slice_summaries().unwrap();
    assert!(slices.iter().all(|s| s.slice.state.as_str() == "reclaimed"), "{slices:?}");
    // 18 unsold keys: the lowest take-window's worth quarantined, the rest back in the pool.
    let quarantined: u64 = slices.iter().map(|s| s.quarantined).sum();
    let returned = c.pool_size(&sku("game")) - pool_before;
    assert_eq!(quarantined + returned, 18, "quarantined {quarantined}, returned {returned}");

    // The old dir comes back with history of its own: refused, one alarm however often it tries.
    let old = SyncUpload { incarnation: 1, newest_seq: 6, ..upload(&eu, vec![], 0) };
    for _ in 0..2 {
        let refused = c.ingest(&eu, old.clone()).await;
        assert!(matches!(refused, Err(CoordinatorError::ForeignIncarnation { .. })), "{refused:?}");
    }
    assert_eq!(alarm_kinds(&c), vec!["node_replaced", "foreign_incarnation"]);
}

#[tokio::test]
async fn a_grant_the_node_refused_comes_back_to_the_pool_with_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let eu = node("eu-1");
    with_keys(&c, "game", 10).await;
    c.add_node(&eu, "eu").await.unwrap();
    let refused_slice = only(c.allocate(&sku("game"), &eu, 4).await.unwrap());
    let kept_slice = only(c.allocate(&sku("game"), &eu, 3).await.unwrap());
    assert_eq!(c.pool_size(&sku("game")), 3);
    let ack = c.ingest(&eu, upload(&eu, vec![], 1)).await.unwrap();
    let seqs: Vec<u64> = ack.control.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 3], "the two grants");

    // The node refused both; it holds nothing of the first, and the second's slice it holds (a
    // refused renewal of an installed slice, say): only the first's keys may come back.
    let refusals = vec![
        edgecard_protocol::RefusedControl { seq: 2, reason: "bad signature".into(), holds_nothing: true },
        edgecard_protocol::RefusedControl { seq: 3, reason: "changes its key set".into(), holds_nothing: false },
    ];
    let stock = vec![edgecard_protocol::SliceStock {
        slice_id: kept_slice.slice_id,
        sku: sku("game"),
        available: 3,
        selling: true,
    }];
    let report = SyncUpload { refused_control: refusals.clone(), stock, ..upload(&eu, vec![], 3) };
    c.ingest(&eu, report.clone()).await.unwrap();
    assert_eq!(c.pool_size(&sku("game")), 7, "the refused slice's 4 keys are back");
    let alarms = c.alarms().unwrap();
    assert_eq!(alarms.iter().map(|a| a.kind.as_str()).collect::<Vec<_>>(), vec!["grant_refused", "grant_refused"]);
    assert!(alarms[0].detail.contains("bad signature") && alarms[0].detail.contains("4 keys back"), "{alarms:?}");
    assert!(alarms[1].detail.contains("0 keys back"), "{alarms:?}");
    let slices = c.slice_summaries().unwrap();
    let state = |id| slices.iter().find(|s| s.slice.slice_id == id).unwrap().slice.state.as_str();
    assert_eq!(state(refused_slice.slice_id), "closed");
    assert_eq!(state(kept_slice.slice_id), "active");
    // Reported again (the ack was lost): nothing changes twice.
    c.ingest(&eu, report).await.unwrap();
    assert_eq!(c.pool_size(&sku("game")), 7);
    assert_eq!(c.alarms().unwrap().len(), 2);
}

#[tokio::test]
async fn imported_keys_cannot_be_confirmed_from_the_store_by_a_bare_hash() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    with_keys(&c, "game", 5).await;
    let bare = |code: &str| edgecard_coordinator::records::hash_key(&Sha256::digest(code.as_bytes()).into());
    let guessed = "game-KEY-00003";
    assert!(c.store().get(&bare(guessed)).unwrap().is_none(), "a guessed code is confirmed by its SHA-256");
    let again = c.import_keys(&sku("game"), "game-KEY-00003\nfresh-1\n", KeyFormat::Lines, false).await.unwrap();
    assert_eq!((again.imported, again.duplicates_known.clone()), (1, vec![1]), "dedup still works");

    // A store from an earlier release: its index is by bare SHA-256. It is rebuilt once.
    let mut batch = edgecard_store::WriteBatch::default();
    for item in c.store().scan_prefix(b"h/") {
        batch.delete(item.unwrap().0.to_vec());
    }
    batch.delete(b"m/dedup_index_hmac".to_vec());
    batch.put(bare(guessed), b"game\0\0\0\0\0\0\0\0\x04".to_vec());
    c.store().apply(batch).unwrap();
    assert_eq!(c.migrate_dedup_index().await.unwrap(), 6);
    assert!(c.store().get(&bare(guessed)).unwrap().is_none(), "the bare hash is gone");
    assert_eq!(c.migrate_dedup_index().await.unwrap(), 0, "once");
    let after =
        c.import_keys(&sku("game"), "game-KEY-00003\nfresh-1\nfresh-2\n", KeyFormat::Lines, false).await.unwrap();
    assert_eq!((after.imported, after.duplicates_known), (1, vec![1, 2]));
}

#[tokio::test]
async fn lookups_are_passed_to_every_other_live_node_and_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (eu, us, ap) = (node("eu-1"), node("us-1"), node("ap-1"));
    for (n, region) in [(&eu, "eu"), (&us, "us"), (&ap, "ap")] {
        c.add_node(n, region).await.unwrap();
    }
    c.revoke_node(&ap).await.unwrap();
    let find = |n: &NodeId| {
        c.pending_control_within(n, usize::MAX)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m.body {
                ControlBody::FindOrders { lookup } => Some(lookup),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let lookup = OrderLookup { email: "buyer@example.com".into(), lang: "zh-CN".into() };
    let asking = SyncUpload { lookups: vec![lookup.clone()], ..upload(&eu, vec![], 0) };
    c.ingest(&eu, asking.clone()).await.unwrap();
    assert_eq!(find(&us), vec![lookup.clone()], "passed to the other node");
    assert!(find(&eu).is_empty(), "not back to the node that asked");
    assert!(find(&ap).is_empty(), "not to a revoked node");
    // Three lookups of an address per hour, wherever asked: the fourth is dropped.
    c.ingest(&eu, asking.clone()).await.unwrap();
    c.ingest(&eu, asking.clone()).await.unwrap();
    c.ingest(&eu, asking).await.unwrap();
    assert_eq!(find(&us).len(), 3);
    let other = OrderLookup { email: "other@example.com".into(), lang: "en".into() };
    c.ingest(&eu, SyncUpload { lookups: vec![other.clone()], ..upload(&eu, vec![], 0) }).await.unwrap();
    assert_eq!(find(&us).last(), Some(&other), "another address has its own count");
}
