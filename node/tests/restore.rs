//! A node's data dir after a restart and after a restore from an older copy, against a real store:
//! nothing is written before the coordinator confirms the dir, and the events the copy lost come
//! back as orders whose buyers can open them, with their keys off sale.

#![allow(clippy::unwrap_used)]

mod fixtures;

use std::path::Path;

use edgecard_node::orders::{OrderError, OrderStatus, PaymentOutcome, Startup};
use edgecard_protocol::{KeyId, OrderToken, UnixMillis};
use fixtures::*;

const FAR_FUTURE: UnixMillis = UnixMillis(u64::MAX / 2);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_restarted_node_writes_no_event_until_the_coordinator_confirms_it() {
    let dir = tempfile::tempdir().unwrap();
    let unpaid = {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant_of(1, 1, 10, 1_000_000)).await.unwrap();
        engine.create_order(buy(1)).await.unwrap()
    };
    let engine = open_with(dir.path(), config(), Startup::AwaitCoordinator).await;
    let incarnation = engine.incarnation();
    assert_ne!(incarnation, 0);
    let newest = engine.outbox_newest();
    assert!(matches!(engine.create_order(buy(2)).await, Err(OrderError::AwaitingCoordinator)));
    let paid = engine.confirm_payment(payment_for(&unpaid.record, "t1")).await;
    assert!(matches!(paid, Err(OrderError::AwaitingCoordinator)), "{paid:?}");
    assert_eq!(engine.expire_due(FAR_FUTURE).await.unwrap(), 0, "expiries wait too");
    assert!(!engine.cancel_unpaid(&unpaid.record.id).await.unwrap());
    assert_eq!(engine.outbox_newest(), newest, "no event written before confirmation");

    assert_eq!(engine.confirm(newest).await.unwrap(), None, "nothing to skip");
    let paid = engine.confirm_payment(payment_for(&unpaid.record, "t1")).await.unwrap();
    assert_eq!(paid, PaymentOutcome::Delivered);
    engine.create_order(buy(2)).await.unwrap();
    drop(engine);
    let engine = open(dir.path(), config()).await;
    assert_eq!(engine.incarnation(), incarnation, "the incarnation belongs to the data dir");
}

#[tokio::test]
async fn a_new_data_dir_numbers_its_events_after_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_with(dir.path(), config(), Startup::AwaitCoordinator).await;
    engine.install_grant(grant_of(1, 1, 10, 1_000_000)).await.unwrap();
    assert_eq!(engine.confirm(41).await.unwrap(), Some(41));
    engine.create_order(buy(1)).await.unwrap();
    assert_eq!(engine.outbox_newest(), 42);
    assert_eq!(engine.sync_progress().unwrap().0, 41, "the ledger's events count as acknowledged");
}

#[tokio::test]
async fn events_a_restored_copy_lost_come_back_as_orders_and_their_keys_stay_sold() {
    let dir = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant_of(1, 1, 10, 1_000_000)).await.unwrap();
        let first = engine.create_order(buy(1)).await.unwrap();
        engine.confirm_payment(payment_for(&first.record, "t1")).await.unwrap();
    }
    copy_dir(dir.path(), backup.path());
    // After the copy: two sales and an open reservation, which the ledger has and the copy lacks.
    let (lost, lost_events, reserved) = {
        let engine = open(dir.path(), config()).await;
        let mut lost = Vec::new();
        for ip in 2..4 {
            let order = engine.create_order(buy(ip)).await.unwrap();
            engine.confirm_payment(payment_for(&order.record, &format!("t{ip}"))).await.unwrap();
            lost.push(order);
        }
        let reserved = engine.create_order(buy(9)).await.unwrap();
        (lost, engine.outbox_after(3, 100).unwrap(), reserved)
    };
    assert_eq!(lost_events.first().map(|e| e.seq), Some(4));

    let engine = open_with(backup.path(), config(), Startup::AwaitCoordinator).await;
    assert_eq!(engine.outbox_newest(), 3);
    assert_eq!(engine.stock(&sku()), 9, "the copy still offers the keys sold after it was taken");
    let through = engine.restore_lost(&lost_events).await.unwrap();
    assert_eq!(through, lost_events.last().unwrap().seq);
    assert_eq!(engine.stock(&sku()), 6, "keys sold or reserved after the copy are off sale");
    for order in &lost {
        let view = engine.lookup(&order.record.id, &order.token).await.unwrap();
        assert_eq!(view.status, OrderStatus::Delivered);
        assert_eq!(view.secrets.len(), 1, "the secret comes from the copy's own slice");
        assert_eq!(view.key_ids, order.record.key_ids);
    }
    let wrong = OrderToken::random();
    assert!(matches!(engine.lookup(&lost[0].record.id, &wrong).await, Err(OrderError::NotFound)));
    let open_order = engine.lookup(&reserved.record.id, &reserved.token).await.unwrap();
    assert_eq!(open_order.status, OrderStatus::Reserved);

    assert_eq!(engine.confirm(through).await.unwrap(), None);
    let next = engine.create_order(buy(20)).await.unwrap();
    assert_eq!(next.record.key_ids, vec![KeyId(5)], "keys 1-4 are taken");
    assert_eq!(engine.outbox_newest(), through + 1, "numbering continues after the restored events");
    // The buyer of the restored reservation can still pay it.
    let paid = engine.confirm_payment(payment_for(&reserved.record, "t9")).await.unwrap();
    assert_eq!(paid, PaymentOutcome::Delivered);
    drop(engine);
    let engine = open(backup.path(), config()).await;
    assert_eq!(engine.stock(&sku()), 5, "the restore survives a restart");
}
