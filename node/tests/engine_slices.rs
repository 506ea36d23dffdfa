//! The order engine's side of leases and rebalancing, against a real sled store: the take
//! window, shrink and close (demarcation: the donor releases first), and lease renewals.

#![allow(clippy::unwrap_used)]

mod fixtures;

use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{OrderError, PaymentOutcome};
use edgecard_protocol::{
    Epoch, KeyId, LeaseRenewal, OrderEvent, OrderEventKind, OrderId, SliceGrant, SliceId, UnixMillis,
};
use fixtures::*;

fn grant(slice: u64, keys: std::ops::RangeInclusive<u64>, take_window: u64) -> SliceGrant {
    grant_of(slice, *keys.start(), keys.end() + 1 - keys.start(), take_window)
}

fn released(events: &[OrderEvent]) -> Vec<(u64, Vec<u64>)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            OrderEventKind::Released { ticket, key_ids, .. } => {
                assert_eq!(e.order_id, OrderId::NONE);
                Some((*ticket, key_ids.iter().map(|k| k.0).collect()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_take_window_stops_sales_until_the_coordinator_acknowledges_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant(1, 1..=10, 3)).await.unwrap();
        for ip in 1..=3 {
            engine.create_order(buy(ip)).await.unwrap();
        }
        assert!(
            matches!(engine.create_order(buy(4)).await, Err(OrderError::StockSyncing { .. })),
            "window of 3 is full"
        );
        assert_eq!(engine.leases()[0].unacked_takes, 3);
    }
    // After a restart the unacknowledged takes are counted again from the outbox.
    let engine = open(dir.path(), config()).await;
    assert!(matches!(engine.create_order(buy(4)).await, Err(OrderError::StockSyncing { .. })));
    engine.record_sync_ack(2).unwrap();
    let fourth = engine.create_order(buy(4)).await.unwrap();
    assert_eq!(fourth.record.key_ids, vec![KeyId(4)]);
    engine.create_order(buy(5)).await.unwrap();
    assert!(matches!(engine.create_order(buy(6)).await, Err(OrderError::StockSyncing { .. })), "seqs 3 to 5 unacked");
    assert_eq!(engine.stock(&sku()), 5, "the keys are there; only the window holds them back");
}

#[tokio::test]
async fn shrink_releases_the_highest_available_keys_once_per_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant(7, 1..=10, 100)).await.unwrap();
    let held = engine.create_order(buy(1)).await.unwrap();
    assert_eq!(held.record.key_ids, vec![KeyId(1)]);

    assert_eq!(engine.apply_shrink(SliceId(7), &sku(), Epoch(2), 4, false, 11).await.unwrap(), 4);
    assert_eq!(engine.stock(&sku()), 5);
    // The same control message again (e.g. after a crash before it was marked applied).
    assert_eq!(engine.apply_shrink(SliceId(7), &sku(), Epoch(2), 4, false, 11).await.unwrap(), 0);
    assert_eq!(engine.stock(&sku()), 5);
    // Asking for more than is available releases what is available; the reservation keeps key 1.
    assert_eq!(engine.apply_shrink(SliceId(7), &sku(), Epoch(3), 100, false, 12).await.unwrap(), 5);
    assert_eq!(engine.stock(&sku()), 0);
    let events = engine.outbox_after(0, 100).unwrap();
    assert_eq!(released(&events), vec![(11, vec![7, 8, 9, 10]), (12, vec![2, 3, 4, 5, 6])]);
    // The held key is still the buyer's.
    assert_eq!(engine.confirm_payment(payment_for(&held.record, "t1")).await.unwrap(), PaymentOutcome::Delivered);
    // A shrink of a slice the node never had is answered with an empty release.
    assert_eq!(engine.apply_shrink(SliceId(99), &sku(), Epoch(1), 5, false, 13).await.unwrap(), 0);
    let events = engine.outbox_after(0, 100).unwrap();
    assert_eq!(released(&events).last(), Some(&(13, vec![])));
}

#[tokio::test]
async fn a_closed_slice_releases_keys_of_reservations_as_they_end() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), config()).await;
        engine.install_grant(grant(3, 1..=5, 100)).await.unwrap();
        let a = engine.create_order(buy(1)).await.unwrap();
        let b = engine.create_order(buy(2)).await.unwrap();
        assert_eq!(engine.apply_shrink(SliceId(3), &sku(), Epoch(2), u64::MAX, true, 21).await.unwrap(), 3);
        assert!(engine.leases()[0].closed);
        assert!(matches!(engine.create_order(buy(3)).await, Err(OrderError::SoldOut { .. })));
        // Paid: the reserved key is delivered (it was never released).
        assert_eq!(engine.confirm_payment(payment_for(&a.record, "t1")).await.unwrap(), PaymentOutcome::Delivered);
        // Unpaid: at expiry the key is released under the close ticket instead of going back on sale.
        engine.expire_due(b.record.expires_at).await.unwrap();
        assert_eq!(engine.stock(&sku()), 0);
        let events = engine.outbox_after(0, 100).unwrap();
        assert_eq!(released(&events), vec![(21, vec![3, 4, 5]), (21, vec![2])]);
    }
    // Closed survives a restart.
    let engine = open(dir.path(), config()).await;
    assert!(engine.leases()[0].closed);
    // A closed slice is still renewed: keys under its open reservations stay deliverable.
    let held = engine.leases()[0].lease_deadline;
    let renewal = LeaseRenewal {
        slice_id: SliceId(3),
        node_id: node(),
        epoch: Epoch(2),
        issued_at: now_millis(),
        lease_deadline: held.saturating_add_ms(60_000),
    };
    assert!(engine.apply_renewal(&renewal).await.unwrap());
    assert!(engine.leases()[0].lease_live && !engine.leases()[0].selling);
    assert_eq!(engine.stock(&sku()), 0);
}

#[tokio::test]
async fn renewals_apply_to_the_current_epoch_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    let g = grant(5, 1..=3, 100);
    let deadline = g.lease_deadline;
    engine.install_grant(g).await.unwrap();
    let renewal = |epoch: u64, extra: u64| LeaseRenewal {
        slice_id: SliceId(5),
        node_id: node(),
        epoch: Epoch(epoch),
        issued_at: now_millis(),
        lease_deadline: deadline.saturating_add_ms(extra),
    };
    assert!(!engine.apply_renewal(&renewal(2, 60_000)).await.unwrap(), "another epoch");
    assert!(engine.apply_renewal(&renewal(1, 60_000)).await.unwrap());
    assert_eq!(engine.leases()[0].lease_deadline, deadline.saturating_add_ms(60_000));
    assert!(!engine.apply_renewal(&renewal(1, 30_000)).await.unwrap(), "not later than held");
    // After a shrink bumps the epoch, renewals for the old epoch no longer apply.
    engine.apply_shrink(SliceId(5), &sku(), Epoch(2), 1, false, 1).await.unwrap();
    assert!(!engine.apply_renewal(&renewal(1, 120_000)).await.unwrap());
    assert!(engine.apply_renewal(&renewal(2, 120_000)).await.unwrap());
}

#[tokio::test]
async fn a_coordinator_grant_that_expired_in_transit_is_installed_selling_nothing_and_can_be_closed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    let mut late = grant(4, 1..=3, 100);
    late.issued_at = UnixMillis(late.issued_at.0 - 7_200_000);
    late.lease_deadline = UnixMillis(now_millis().0 - 1_000);
    assert!(engine.install_grant(late.clone()).await.is_err(), "an operator's expired grant is refused");
    engine.install_grant_with(late, true).await.unwrap();
    assert_eq!(engine.stock(&sku()), 0);
    assert!(matches!(engine.create_order(buy(1)).await, Err(OrderError::SoldOut { .. })));
    // The coordinator's close finds the keys where its books say they are.
    assert_eq!(engine.apply_shrink(SliceId(4), &sku(), Epoch(2), u64::MAX, true, 5).await.unwrap(), 3);
    let events = engine.outbox_after(0, 10).unwrap();
    assert_eq!(released(&events), vec![(5, vec![1, 2, 3])]);
}

#[tokio::test]
async fn a_catalog_from_the_coordinator_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), config()).await;
        let mut products = engine.catalog().all().as_ref().clone();
        products[0].prices[0].amount_minor = 4242;
        engine.replace_catalog(products).await.unwrap();
        assert_eq!(engine.catalog().all()[0].prices[0].amount_minor, 4242);
    }
    // The coordinator sends a catalog once; after a restart it must come from the store.
    let engine = open(dir.path(), config()).await;
    let stored = edgecard_node::orders::engine::stored_catalog(engine.store()).unwrap().unwrap();
    assert_eq!(stored[0].sku, sku());
    assert_eq!(stored[0].prices[0].amount_minor, 4242);
}
