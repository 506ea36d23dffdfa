//! The engine's payment bookkeeping against a real sled store: the index of orders awaiting
//! confirmation (compensation's work list), recorded payment attempts, cancelling an order no
//! channel could take, and all of it across a restart.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use edgecard_node::catalog::Catalog;
use edgecard_node::config::{OrdersConfig, PriceConfig, ProductConfig};
use edgecard_node::metrics::{OrderMetrics, StoreMetrics};
use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{CreateOrder, OrderEngine, OrderStatus, PaymentAttempt, PaymentConfirmation};
use edgecard_node::store::Store;
use edgecard_protocol::{Epoch, GrantedKey, KeyId, NodeId, Secret, Sku, SliceGrant, SliceId};

fn sku() -> Sku {
    Sku::new("game-10").unwrap()
}

async fn open(dir: &Path) -> OrderEngine {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let products = vec![ProductConfig {
        sku: sku(),
        title: BTreeMap::from([("en".into(), "Game card".into())]),
        prices: vec![PriceConfig { amount_minor: 1000, currency: "USD".parse().unwrap() }],
    }];
    let config = OrdersConfig { max_open_per_ip: 100, max_open_per_email: 100, ..OrdersConfig::default() };
    OrderEngine::open(
        NodeId::new("eu-1").unwrap(),
        store,
        Arc::new(Catalog::new(products)),
        config,
        Arc::new(OrderMetrics::default()),
    )
    .await
    .unwrap()
}

fn grant(count: u64) -> SliceGrant {
    let now = now_millis();
    SliceGrant {
        slice_id: SliceId(1),
        sku: sku(),
        node_id: NodeId::new("eu-1").unwrap(),
        epoch: Epoch(1),
        issued_at: now,
        lease_deadline: now.saturating_add_ms(3_600_000),
        take_window: 1_000_000,
        keys: (1..=count)
            .map(|k| GrantedKey { key_id: KeyId(k), secret: Secret::new(format!("SECRET-{k:06}")).unwrap() })
            .collect(),
    }
}

fn buy() -> CreateOrder {
    CreateOrder {
        sku: sku(),
        quantity: 1,
        email: None,
        currency: None,
        channel: "stripe".into(),
        client_ip: IpAddr::from([192, 0, 2, 1]),
    }
}

#[tokio::test]
async fn the_confirmation_index_follows_each_order_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (paid, open_one, cancelled) = {
        let engine = open(dir.path()).await;
        engine.install_grant(grant(5)).await.unwrap();
        let paid = engine.create_order(buy()).await.unwrap().record;
        let open_one = engine.create_order(buy()).await.unwrap().record;
        let cancelled = engine.create_order(buy()).await.unwrap().record;
        let mut index: Vec<_> = engine.awaiting_confirmation().unwrap().into_iter().map(|(id, _)| id).collect();
        index.sort();
        let mut expected = vec![paid.id, open_one.id, cancelled.id];
        expected.sort();
        assert_eq!(index, expected, "every reservation awaits confirmation");

        let attempt = PaymentAttempt {
            channel: "sandbox".into(),
            provider_ref: Some("cs_test_1".into()),
            pay_url: Some("https://pay.example/cs_test_1".into()),
            created_at: now_millis(),
        };
        engine.record_payment_attempt(&open_one.id, attempt.clone()).await.unwrap();
        let confirmation = PaymentConfirmation {
            order_id: paid.id,
            channel: "stripe".into(),
            provider_txn: "cs_paid".into(),
            amount_minor: 1000,
            currency: "USD".into(),
        };
        engine.confirm_payment(confirmation).await.unwrap();
        assert!(engine.cancel_unpaid(&cancelled.id).await.unwrap());
        assert!(!engine.cancel_unpaid(&cancelled.id).await.unwrap(), "already ended");
        assert_eq!(engine.stock(&sku()), 3, "the cancelled order's key is back");
        engine.store().close();
        (paid, open_one, cancelled)
    };
    let engine = open(dir.path()).await;
    let index: Vec<_> = engine.awaiting_confirmation().unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(index, vec![open_one.id], "paid and cancelled orders left the index durably");
    let open_record = engine.order_for_payment(&open_one.id).unwrap();
    assert_eq!(open_record.channel, "sandbox", "the channel that took the payment");
    assert_eq!(open_record.payment_attempt.unwrap().provider_ref.as_deref(), Some("cs_test_1"));
    assert_eq!(engine.order_for_payment(&cancelled.id).unwrap().status, OrderStatus::Expired);
    assert_eq!(engine.order_for_payment(&paid.id).unwrap().status, OrderStatus::Delivered);
    assert_eq!(engine.stock(&sku()), 3);

    // An expired order stays on the index (a late payment may still come) until dropped.
    engine.expire_due(open_record.expires_at).await.unwrap();
    assert_eq!(engine.awaiting_confirmation().unwrap().len(), 1);
    engine.drop_awaiting_confirmation(&open_one.id).unwrap();
    assert!(engine.awaiting_confirmation().unwrap().is_empty());
    // Recording an attempt on a settled order changes nothing.
    let attempt =
        PaymentAttempt { channel: "epay".into(), provider_ref: None, pay_url: None, created_at: now_millis() };
    engine.record_payment_attempt(&paid.id, attempt).await.unwrap();
    assert_eq!(engine.order_for_payment(&paid.id).unwrap().channel, "stripe");
}
