//! The engine's payment bookkeeping against a real sled store: the index of orders awaiting
//! confirmation (compensation's work list), recorded payment attempts and the payments bound to
//! them, cancelling an order no channel could take, and all of it across a restart.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use edgecard_node::catalog::Catalog;
use edgecard_node::config::{OrdersConfig, PriceConfig, ProductConfig};
use edgecard_node::metrics::{OrderMetrics, StoreMetrics};
use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{
    CreateOrder, OrderEngine, OrderStatus, PaymentAttempt, PaymentConfirmation, PaymentOutcome, PaymentProblemKind,
};
use edgecard_node::store::Store;
use edgecard_protocol::OrderEventKind;
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
    buy_on("stripe")
}

fn buy_on(channel: &str) -> CreateOrder {
    CreateOrder {
        sku: sku(),
        quantity: 1,
        email: None,
        currency: None,
        channel: channel.into(),
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
            pays_until: None,
        };
        engine.record_payment_attempt(&open_one.id, attempt.clone()).await.unwrap();
        let confirmation = PaymentConfirmation {
            order_id: paid.id,
            channel: "stripe".into(),
            provider_txn: "cs_paid".into(),
            amount_minor: 1000,
            currency: "USD".into(),
            provider_ref: None,
            provider_payment: None,
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
    assert_eq!(open_record.attempts.len(), 1);
    assert_eq!(open_record.attempts[0].provider_ref.as_deref(), Some("cs_test_1"));
    assert_eq!(engine.order_for_payment(&cancelled.id).unwrap().status, OrderStatus::Expired);
    assert_eq!(engine.order_for_payment(&paid.id).unwrap().status, OrderStatus::Delivered);
    assert_eq!(engine.stock(&sku()), 3);

    // An expired order stays on the index (a late payment may still come) until dropped.
    engine.expire_due(open_record.expires_at).await.unwrap();
    assert_eq!(engine.awaiting_confirmation().unwrap().len(), 1);
    engine.drop_awaiting_confirmation(&open_one.id).unwrap();
    assert!(engine.awaiting_confirmation().unwrap().is_empty());
    // Recording an attempt on a settled order changes nothing.
    let attempt = PaymentAttempt {
        channel: "epay".into(),
        provider_ref: None,
        pay_url: None,
        created_at: now_millis(),
        pays_until: None,
    };
    engine.record_payment_attempt(&paid.id, attempt).await.unwrap();
    assert_eq!(engine.order_for_payment(&paid.id).unwrap().channel, "stripe");
}

fn pay(
    order: &edgecard_node::orders::OrderRecord,
    channel: &str,
    txn: &str,
    reference: Option<&str>,
) -> PaymentConfirmation {
    PaymentConfirmation {
        order_id: order.id,
        channel: channel.into(),
        provider_txn: txn.into(),
        amount_minor: order.amount_minor,
        currency: order.currency.clone(),
        provider_ref: reference.map(str::to_string),
        provider_payment: None,
    }
}

fn attempt(channel: &str, reference: Option<&str>) -> PaymentAttempt {
    PaymentAttempt {
        channel: channel.into(),
        provider_ref: reference.map(str::to_string),
        pay_url: None,
        created_at: now_millis(),
        pays_until: None,
    }
}

/// Kinds of the payment problems reported to the ledger, in outbox order.
fn problem_events(engine: &OrderEngine) -> Vec<String> {
    engine
        .outbox_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            OrderEventKind::PaymentUnmatched { reason, .. } => Some(format!("unmatched:{}", reason.as_str())),
            OrderEventKind::PaymentMismatch { amount_minor, .. } => Some(format!("mismatch:{amount_minor}")),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn payments_bind_to_their_attempts_and_the_rest_is_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (e, f, g, h) = {
        let engine = open(dir.path()).await;
        engine.install_grant(grant(6)).await.unwrap();
        let e = engine.create_order(buy_on("epay")).await.unwrap().record;
        let f = engine.create_order(buy_on("epay")).await.unwrap().record;
        let g = engine.create_order(buy_on("epay")).await.unwrap().record;
        let h = engine.create_order(buy_on("stripe")).await.unwrap().record;
        assert_eq!(engine.confirm_payment(pay(&e, "epay", "T-1", None)).await.unwrap(), PaymentOutcome::Delivered);

        // F's signed success carries the transaction id that paid E.
        let reused = PaymentOutcome::Problem(PaymentProblemKind::ProviderTxnReused);
        assert_eq!(engine.confirm_payment(pay(&f, "epay", "T-1", None)).await.unwrap(), reused);
        assert_eq!(engine.confirm_payment(pay(&f, "epay", "T-1", None)).await.unwrap(), reused, "a retry, same answer");
        // A Stripe payment for an order opened on EPay.
        let wrong = engine.confirm_payment(pay(&g, "stripe", "cs_x", Some("cs_x"))).await.unwrap();
        assert_eq!(wrong, PaymentOutcome::Problem(PaymentProblemKind::WrongChannel));
        // H's payment moved from one Checkout Session to another: both are its own, a third is not.
        engine.record_payment_attempt(&h.id, attempt("stripe", Some("cs_a"))).await.unwrap();
        engine.record_payment_attempt(&h.id, attempt("stripe", Some("cs_b"))).await.unwrap();
        let stranger = engine.confirm_payment(pay(&h, "stripe", "cs_c", Some("cs_c"))).await.unwrap();
        assert_eq!(stranger, PaymentOutcome::Problem(PaymentProblemKind::UnknownReference));
        let cheap = PaymentConfirmation { amount_minor: 1, ..pay(&h, "stripe", "cs_a", Some("cs_a")) };
        assert_eq!(
            engine.confirm_payment(cheap).await.unwrap(),
            PaymentOutcome::Problem(PaymentProblemKind::AmountMismatch)
        );
        // The earlier session is paid after all, in full: it is the order's.
        let paid = engine.confirm_payment(pay(&h, "stripe", "cs_a", Some("cs_a"))).await.unwrap();
        assert_eq!(paid, PaymentOutcome::Delivered);

        let metrics = engine.metrics();
        assert_eq!(metrics.payment_problems_of("epay", PaymentProblemKind::ProviderTxnReused), 1, "counted once");
        assert_eq!(metrics.payment_problems_of("stripe", PaymentProblemKind::WrongChannel), 1);
        assert_eq!(metrics.payment_problems_of("stripe", PaymentProblemKind::UnknownReference), 1);
        assert_eq!(metrics.payment_problems_of("stripe", PaymentProblemKind::AmountMismatch), 1);
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("edgecard_payment_unmatched_total{channel=\"epay\",reason=\"provider_txn_reused\"} 1"),
            "{text}"
        );
        assert!(text.contains("edgecard_payment_mismatch_total{channel=\"stripe\",reason=\"amount\"} 1"), "{text}");
        engine.store().close();
        (e, f, g, h)
    };
    let engine = open(dir.path()).await;
    for (order, status) in [
        (&e, OrderStatus::Delivered),
        (&f, OrderStatus::Reserved),
        (&g, OrderStatus::Reserved),
        (&h, OrderStatus::Delivered),
    ] {
        assert_eq!(engine.order_for_payment(&order.id).unwrap().status, status);
    }
    let problems = engine.payment_problems().unwrap();
    let mut kinds: Vec<(String, &str, &str)> =
        problems.iter().map(|p| (p.order_id.to_string(), p.channel.as_str(), p.kind.as_str())).collect();
    kinds.sort();
    let mut expected = vec![
        (f.id.to_string(), "epay", "provider_txn_reused"),
        (g.id.to_string(), "stripe", "wrong_channel"),
        (h.id.to_string(), "stripe", "unknown_reference"),
        (h.id.to_string(), "stripe", "amount"),
    ];
    expected.sort();
    assert_eq!(kinds, expected, "recorded durably");
    assert_eq!(
        problem_events(&engine),
        vec!["unmatched:provider_txn_reused", "unmatched:wrong_channel", "unmatched:unknown_reference", "mismatch:1"],
        "each reported to the ledger once"
    );
    let reused = engine.confirm_payment(pay(&f, "epay", "T-1", None)).await.unwrap();
    assert_eq!(reused, PaymentOutcome::Problem(PaymentProblemKind::ProviderTxnReused), "after a restart too");
    assert_eq!(problem_events(&engine).len(), 4);
}
