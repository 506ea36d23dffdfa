//! The order engine against a real sled store on disk: lifecycle, expiry, restarts, caps, late
//! payments and grant installation.

#![allow(clippy::unwrap_used)]

mod fixtures;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use edgecard_node::config::OrdersConfig;
use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{
    GrantInstallError, GrantOutcome, OrderError, OrderStatus, PaymentOutcome, PaymentProblemKind,
};
use edgecard_protocol::{Epoch, KeyId, OrderToken, Secret, Sku, SliceGrant, UnixMillis};
use fixtures::*;

fn grant(slice: u64, first_key: u64, count: u64) -> SliceGrant {
    grant_of(slice, first_key, count, 1_000_000)
}

#[tokio::test]
async fn reserve_pay_deliver_in_key_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant(1, 10, 3)).await.unwrap();
    let mut request = buy(1);
    request.quantity = 2;
    let created = engine.create_order(request).await.unwrap();
    assert_eq!(created.record.key_ids, vec![KeyId(10), KeyId(11)], "lowest key ids first");
    assert_eq!(created.record.amount_minor, 2000);
    assert_eq!(engine.stock(&sku()), 1);

    let before = engine.lookup(&created.record.id, &created.token).await.unwrap();
    assert_eq!(before.status, OrderStatus::Reserved);
    assert!(before.secrets.is_empty(), "no key before payment");

    let outcome = engine.confirm_payment(payment_for(&created.record, "t1")).await.unwrap();
    assert_eq!(outcome, PaymentOutcome::Delivered);
    let after = engine.lookup(&created.record.id, &created.token).await.unwrap();
    assert_eq!(after.status, OrderStatus::Delivered);
    let secrets: Vec<&str> = after.secrets.iter().map(|s| s.expose()).collect();
    assert_eq!(secrets, vec!["SECRET-000010", "SECRET-000011"]);

    let wrong = OrderToken::random();
    assert!(matches!(engine.lookup(&created.record.id, &wrong).await, Err(OrderError::NotFound)));
}

#[tokio::test]
async fn payment_binding_and_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant(1, 1, 5)).await.unwrap();
    let created = engine.create_order(buy(1)).await.unwrap();
    let mut wrong_amount = payment_for(&created.record, "t1");
    wrong_amount.amount_minor -= 1;
    let mismatch = |kind| Ok(PaymentOutcome::Problem(kind));
    assert_eq!(engine.confirm_payment(wrong_amount).await.map_err(drop), mismatch(PaymentProblemKind::AmountMismatch));
    let mut wrong_currency = payment_for(&created.record, "t1");
    wrong_currency.currency = "EUR".into();
    assert_eq!(
        engine.confirm_payment(wrong_currency).await.map_err(drop),
        mismatch(PaymentProblemKind::CurrencyMismatch)
    );
    assert_eq!(engine.lookup(&created.record.id, &created.token).await.unwrap().status, OrderStatus::Reserved);

    assert_eq!(engine.confirm_payment(payment_for(&created.record, "t1")).await.unwrap(), PaymentOutcome::Delivered);
    assert_eq!(
        engine.confirm_payment(payment_for(&created.record, "t1")).await.unwrap(),
        PaymentOutcome::AlreadyRecorded
    );
    assert_eq!(
        engine.confirm_payment(payment_for(&created.record, "t2")).await.unwrap(),
        PaymentOutcome::DuplicatePayment
    );
    let delivered = engine.lookup(&created.record.id, &created.token).await.unwrap();
    assert_eq!(delivered.secrets.len(), 1, "a replayed or second payment delivers nothing more");
    assert_eq!(engine.stock(&sku()), 4);
}

#[tokio::test]
async fn expiry_returns_keys_and_late_payment_takes_new_stock_or_waits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), OrdersConfig { reservation_ttl_secs: 1, ..config() }).await;
    engine.install_grant(grant(1, 1, 1)).await.unwrap();
    let first = engine.create_order(buy(1)).await.unwrap();
    assert_eq!(engine.stock(&sku()), 0);
    assert!(matches!(engine.create_order(buy(2)).await, Err(OrderError::SoldOut { .. })));

    let expired = engine.expire_due(first.record.expires_at).await.unwrap();
    assert_eq!(expired, 1);
    assert_eq!(engine.stock(&sku()), 1, "the key is back on sale");
    assert_eq!(engine.lookup(&first.record.id, &first.token).await.unwrap().status, OrderStatus::Expired);

    // A second buyer takes the key; the first buyer's payment then arrives late.
    let second = engine.create_order(buy(2)).await.unwrap();
    assert_eq!(second.record.key_ids, vec![KeyId(1)]);
    assert_eq!(
        engine.confirm_payment(payment_for(&first.record, "late")).await.unwrap(),
        PaymentOutcome::AwaitingStock
    );
    assert_eq!(engine.lookup(&first.record.id, &first.token).await.unwrap().status, OrderStatus::PaidAwaitingStock);
    assert_eq!(engine.awaiting_stock().len(), 1);

    // New stock fills the waiting order first.
    let outcome = engine.install_grant(grant(2, 100, 2)).await.unwrap();
    assert_eq!(outcome, GrantOutcome::Installed { keys: 2, filled_awaiting: 1 });
    let filled = engine.lookup(&first.record.id, &first.token).await.unwrap();
    assert_eq!(filled.status, OrderStatus::Delivered);
    assert_eq!(filled.key_ids, vec![KeyId(100)]);
    assert!(engine.awaiting_stock().is_empty());
    assert_eq!(engine.stock(&sku()), 1);
}

/// Keys that come back (an unpaid reservation ends) go to orders already paid while out of
/// stock, before any new buyer.
#[tokio::test]
async fn returned_keys_fill_orders_paid_while_out_of_stock_before_new_buyers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), OrdersConfig { reservation_ttl_secs: 1, ..config() }).await;
    engine.install_grant(grant(1, 1, 1)).await.unwrap();
    let first = engine.create_order(buy(1)).await.unwrap();
    engine.expire_due(first.record.expires_at).await.unwrap();
    let second = engine.create_order(buy(2)).await.unwrap();
    assert_eq!(
        engine.confirm_payment(payment_for(&first.record, "late")).await.unwrap(),
        PaymentOutcome::AwaitingStock
    );

    // The second buyer never pays: the key comes back and goes to the first, who paid.
    engine.expire_due(second.record.expires_at).await.unwrap();
    let filled = engine.lookup(&first.record.id, &first.token).await.unwrap();
    assert_eq!(filled.status, OrderStatus::Delivered);
    assert_eq!(filled.key_ids, vec![KeyId(1)]);
    assert!(engine.awaiting_stock().is_empty());
    assert!(matches!(engine.create_order(buy(3)).await, Err(OrderError::SoldOut { .. })));
}

#[tokio::test]
async fn late_payment_with_stock_left_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant(1, 1, 3)).await.unwrap();
    let created = engine.create_order(buy(1)).await.unwrap();
    engine.expire_due(created.record.expires_at).await.unwrap();
    let outcome = engine.confirm_payment(payment_for(&created.record, "late")).await.unwrap();
    assert_eq!(outcome, PaymentOutcome::Delivered);
    let order = engine.lookup(&created.record.id, &created.token).await.unwrap();
    assert_eq!(order.status, OrderStatus::Delivered);
    assert_eq!(order.secrets.len(), 1);
}

#[tokio::test]
async fn state_survives_restart_and_open_reservations_expire_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (delivered, open_order) = {
        let engine = open(dir.path(), OrdersConfig { reservation_ttl_secs: 1, ..config() }).await;
        engine.install_grant(grant(1, 1, 4)).await.unwrap();
        let a = engine.create_order(buy(1)).await.unwrap();
        engine.confirm_payment(payment_for(&a.record, "t1")).await.unwrap();
        let b = engine.create_order(buy(2)).await.unwrap();
        engine.store().close();
        (a, b)
    };
    // The reservation's TTL passes while the node is down.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let engine = open(dir.path(), OrdersConfig { reservation_ttl_secs: 1, ..config() }).await;
    let a = engine.lookup(&delivered.record.id, &delivered.token).await.unwrap();
    assert_eq!(a.status, OrderStatus::Delivered);
    assert_eq!(a.secrets[0].expose(), "SECRET-000001");
    let b = engine.lookup(&open_order.record.id, &open_order.token).await.unwrap();
    assert_eq!(b.status, OrderStatus::Expired, "expired at start-up");
    assert_eq!(engine.stock(&sku()), 3, "the expired order's key is back; the sold one is not");
    let next = engine.create_order(buy(3)).await.unwrap();
    assert_eq!(next.record.key_ids, vec![KeyId(2)]);
}

#[tokio::test]
async fn reservation_caps_per_ip_and_email() {
    let dir = tempfile::tempdir().unwrap();
    let engine =
        open(dir.path(), OrdersConfig { max_open_per_ip: 2, max_open_per_email: 1, ..OrdersConfig::default() }).await;
    engine.install_grant(grant(1, 1, 10)).await.unwrap();
    engine.create_order(buy(1)).await.unwrap();
    let second = engine.create_order(buy(1)).await.unwrap();
    assert!(matches!(engine.create_order(buy(1)).await, Err(OrderError::TooManyOpen { who: "address" })));
    // Paying one frees a slot.
    engine.confirm_payment(payment_for(&second.record, "t")).await.unwrap();
    engine.create_order(buy(1)).await.unwrap();

    let mut with_email = buy(9);
    with_email.email = Some("Buyer@Example.com".into());
    engine.create_order(with_email.clone()).await.unwrap();
    let mut same_email_other_ip = with_email.clone();
    same_email_other_ip.client_ip = IpAddr::from([192, 0, 2, 10]);
    same_email_other_ip.email = Some(" buyer@example.COM".into());
    assert!(matches!(engine.create_order(same_email_other_ip).await, Err(OrderError::TooManyOpen { who: "email" })));
    let mut bad = buy(11);
    bad.email = Some("not-an-email".into());
    assert!(matches!(engine.create_order(bad).await, Err(OrderError::BadEmail)));
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant(1, 1, 5)).await.unwrap();
    let mut zero = buy(1);
    zero.quantity = 0;
    assert!(matches!(engine.create_order(zero).await, Err(OrderError::BadQuantity { .. })));
    let mut huge = buy(1);
    huge.quantity = u32::MAX;
    assert!(matches!(engine.create_order(huge).await, Err(OrderError::BadQuantity { .. })));
    let mut unknown = buy(1);
    unknown.sku = Sku::new("nope").unwrap();
    assert!(matches!(engine.create_order(unknown).await, Err(OrderError::UnknownSku(_))));
    let mut euro = buy(1);
    euro.currency = Some("EUR".parse().unwrap());
    assert!(matches!(engine.create_order(euro).await, Err(OrderError::UnsupportedCurrency { .. })));
    let mut too_many = buy(1);
    too_many.quantity = 6;
    assert!(matches!(engine.create_order(too_many).await, Err(OrderError::SoldOut { .. })));
    assert_eq!(engine.stock(&sku()), 5);
    assert_eq!(engine.open_reservations(), 0);
}

#[tokio::test]
async fn grants_cannot_reinstall_sold_or_held_keys() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    let first = grant(1, 1, 2);
    engine.install_grant(first.clone()).await.unwrap();
    assert_eq!(engine.install_grant(first).await.unwrap(), GrantOutcome::AlreadyInstalled);
    let created = engine.create_order(buy(1)).await.unwrap();
    engine.confirm_payment(payment_for(&created.record, "t")).await.unwrap();
    // Another slice that overlaps key 1 (sold) or key 2 (held) is refused whole.
    assert!(matches!(engine.install_grant(grant(2, 1, 1)).await, Err(GrantInstallError::KeyConflict { .. })));
    assert!(matches!(engine.install_grant(grant(3, 2, 3)).await, Err(GrantInstallError::KeyConflict { .. })));
    assert_eq!(engine.stock(&sku()), 1);
    let mut old = grant(1, 1, 2);
    old.epoch = Epoch(0);
    assert!(matches!(engine.install_grant(old).await, Err(GrantInstallError::StaleEpoch { .. })));
    // Same slice id, newer epoch, same number of keys, different keys: not a renewal.
    let mut changed = grant(1, 1, 2);
    changed.epoch = Epoch(5);
    changed.keys[1].secret = Secret::new("SOMETHING-ELSE".into()).unwrap();
    assert!(matches!(engine.install_grant(changed).await, Err(GrantInstallError::ChangedSlice { .. })));
    let mut shifted = grant(1, 7, 2);
    shifted.epoch = Epoch(5);
    assert!(matches!(engine.install_grant(shifted).await, Err(GrantInstallError::ChangedSlice { .. })));
    let mut expired = grant(4, 50, 1);
    expired.lease_deadline = UnixMillis(1);
    assert!(matches!(engine.install_grant(expired).await, Err(GrantInstallError::Expired)));
}

#[tokio::test]
async fn expired_lease_stops_sales_until_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), OrdersConfig { lease_safety_margin_secs: 3600, ..config() }).await;
    // The lease deadline is within the safety margin: installed, but not sellable.
    engine.install_grant(grant(1, 1, 2)).await.unwrap();
    assert_eq!(engine.stock(&sku()), 0);
    assert!(matches!(engine.create_order(buy(1)).await, Err(OrderError::SoldOut { .. })));
    let mut renewal = grant(1, 1, 2);
    renewal.epoch = Epoch(2);
    renewal.lease_deadline = now_millis().saturating_add_ms(3 * 3_600_000);
    assert_eq!(engine.install_grant(renewal).await.unwrap(), GrantOutcome::Renewed);
    assert_eq!(engine.stock(&sku()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_never_share_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(open(dir.path(), config()).await);
    engine.install_grant(grant(1, 1, 100)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..250u32 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut request = buy((i % 250) as u8);
            request.client_ip = IpAddr::from([198, 18, (i / 250) as u8, (i % 250) as u8]);
            let created = engine.create_order(request).await?;
            engine.confirm_payment(payment_for(&created.record, &format!("t{i}"))).await?;
            engine.lookup(&created.record.id, &created.token).await
        }));
    }
    let mut delivered = HashSet::new();
    let mut sold_out = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(order) => {
                for secret in order.secrets {
                    assert!(delivered.insert(secret.expose().to_string()), "key delivered twice");
                }
            }
            Err(OrderError::SoldOut { .. }) => sold_out += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(delivered.len(), 100);
    assert_eq!(sold_out, 150);
}

#[tokio::test]
async fn outbox_holds_every_change_in_order_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant(1, 1, 5)).await.unwrap();
        let a = engine.create_order(buy(1)).await.unwrap();
        engine.confirm_payment(payment_for(&a.record, "t1")).await.unwrap();
        let b = engine.create_order(buy(2)).await.unwrap();
        engine.expire_due(b.record.expires_at).await.unwrap();
        let events = engine.outbox_after(0, 100).unwrap();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match &e.kind {
                edgecard_protocol::OrderEventKind::Reserved { .. } => "reserved",
                edgecard_protocol::OrderEventKind::Paid { .. } => "paid",
                edgecard_protocol::OrderEventKind::Delivered { .. } => "delivered",
                edgecard_protocol::OrderEventKind::Expired { .. } => "expired",
                edgecard_protocol::OrderEventKind::AwaitingStock { .. } => "awaiting",
                edgecard_protocol::OrderEventKind::Released { .. } => "released",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, vec!["reserved", "paid", "delivered", "reserved", "expired"]);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(engine.outbox_newest(), 5);
        assert_eq!(engine.outbox_after(3, 100).unwrap().len(), 2);
        assert_eq!(engine.outbox_after(0, 2).unwrap().len(), 2);

        engine.record_sync_ack(3).unwrap();
        engine.record_control_applied(7, None).await.unwrap();
        assert_eq!(engine.outbox_after(0, 100).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        engine.store().close();
    }
    let engine = open(dir.path(), config()).await;
    assert_eq!(engine.sync_progress().unwrap(), (3, 7));
    assert_eq!(engine.outbox_newest(), 5, "sequence numbers continue after a restart");
    let c = engine.create_order(buy(3)).await.unwrap();
    let last = engine.outbox_after(5, 10).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].seq, 6);
    assert_eq!(last[0].order_id, c.record.id);
}

/// Unpaid reservations cannot freeze a node cut off from the coordinator: takes of a reservation
/// that ended unpaid before being acknowledged leave the take window, at once and after a
/// restart, and the keys they held are the next ones taken.
#[tokio::test]
async fn expired_unpaid_reservations_free_the_take_window() {
    let dir = tempfile::tempdir().unwrap();
    let far_future = UnixMillis(u64::MAX / 2);
    {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant_of(1, 1, 10, 3)).await.unwrap();
        for ip in 1..=3 {
            engine.create_order(buy(ip)).await.unwrap();
        }
        assert!(
            matches!(engine.create_order(buy(4)).await, Err(OrderError::StockSyncing { .. })),
            "three unacknowledged takes fill a window of 3"
        );
        assert_eq!(engine.expire_due(far_future).await.unwrap(), 3);
        let again = engine.create_order(buy(5)).await.unwrap();
        assert_eq!(again.record.key_ids, vec![KeyId(1)], "the freed keys are taken again, lowest first");
        let cancelled = engine.create_order(buy(6)).await.unwrap();
        assert!(engine.cancel_unpaid(&cancelled.record.id).await.unwrap());
    }
    // After a restart the outbox still holds the expired reservations: they count nothing.
    let engine = open(dir.path(), config()).await;
    engine.create_order(buy(7)).await.unwrap();
    engine.create_order(buy(8)).await.unwrap();
    assert!(matches!(engine.create_order(buy(9)).await, Err(OrderError::StockSyncing { .. })));
    // Three open reservations fill it again.
    assert_eq!(engine.leases()[0].unacked_takes, 3);
}
