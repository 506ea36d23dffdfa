//! Refunds and disputes on the node, against a real store: a refund asked for is recorded
//! durably and carried out by the refund worker through the channel that took the payment; it
//! survives a crash between the provider's call and its record; the order's keys are revoked; an
//! order paid while out of stock leaves the queue and never gets a key; refunds and disputes made
//! at the provider are recorded once.

#![allow(clippy::unwrap_used)]

mod fixtures;

use std::collections::HashMap;
use std::sync::Arc;

use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{AttemptRef, OrderEngine, OrderRecord};
use edgecard_node::orders::{
    DisputeRecord, OrderError, OrderStatus, PaymentOutcome, ProviderReport, RefundStart, RefundState,
};
use edgecard_node::payments::refunds::RefundWorker;
use edgecard_node::payments::router::Router;
use edgecard_node::payments::{
    BoxFuture, CallbackError, CallbackRequest, CallbackVerdict, ChannelError, CreatedPayment, PaymentChannel,
    QueriedStatus, RefundResult,
};
use edgecard_protocol::{KeyId, OrderEventKind};
use fixtures::*;
use parking_lot::Mutex;

/// A provider that refunds once per idempotency key, as Stripe does, and counts the calls.
#[derive(Default)]
struct Provider {
    refunds: Mutex<HashMap<String, String>>,
    calls: Mutex<u32>,
    down: Mutex<bool>,
}

impl PaymentChannel for Provider {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn create_payment<'a>(
        &'a self,
        _: &'a OrderRecord,
        _: &'a str,
    ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>> {
        Box::pin(async { Err(ChannelError::Unsupported { channel: "sandbox", reason: "test".into() }) })
    }

    fn local_pay_url(&self, _: &OrderRecord, _: &str) -> Option<String> {
        None
    }

    fn verify_callback(&self, _: &CallbackRequest<'_>, _: u64) -> Result<CallbackVerdict, CallbackError> {
        Err(CallbackError::MissingSignature)
    }

    fn query_payment<'a>(
        &'a self,
        _: &'a OrderRecord,
        _: AttemptRef<'a>,
    ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>> {
        Box::pin(async { Ok(QueriedStatus::Pending) })
    }

    fn refund<'a>(&'a self, order: &'a OrderRecord) -> BoxFuture<'a, Result<RefundResult, ChannelError>> {
        *self.calls.lock() += 1;
        let down = *self.down.lock();
        let key = format!("refund-{}", order.id);
        let mut refunds = self.refunds.lock();
        let next = refunds.len() + 1;
        let id = refunds.entry(key).or_insert_with(|| format!("re_{next}")).clone();
        // Down after refunding: the answer is lost, as in a crash between the call and the record.
        Box::pin(async move {
            if down {
                Err(ChannelError::Timeout { channel: "sandbox" })
            } else {
                Ok(RefundResult::Refunded { provider_refund: id })
            }
        })
    }
}

fn refunded_events(engine: &OrderEngine) -> Vec<(String, Vec<KeyId>, bool)> {
    engine
        .outbox_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            OrderEventKind::Refunded { provider_refund, key_ids, manual, .. } => {
                Some((provider_refund, key_ids, manual))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_refund_is_asked_once_survives_a_crash_and_revokes_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let router = Arc::new(Router::with_defaults(vec![provider.clone() as Arc<dyn PaymentChannel>]));
    let order = {
        let engine = Arc::new(open(dir.path(), config()).await);
        engine.install_grant(grant_of(1, 1, 3, 1_000_000)).await.unwrap();
        let order = engine.create_order(buy(1)).await.unwrap();
        assert_eq!(engine.confirm_payment(payment_for(&order.record, "t1")).await.unwrap(), PaymentOutcome::Delivered);
        let unpaid = engine.create_order(buy(2)).await.unwrap();
        let refused = engine.request_refund(&unpaid.record.id, "").await;
        assert!(matches!(refused, Err(OrderError::NotRefundable(_))), "{refused:?}");

        assert_eq!(engine.request_refund(&order.record.id, "buyer asked").await.unwrap(), RefundStart::Started);
        assert_eq!(engine.request_refund(&order.record.id, "again").await.unwrap(), RefundStart::AlreadyPending);
        assert_eq!(engine.pending_refunds().unwrap(), vec![order.record.id]);
        // The provider refunds, but its answer never comes back; then the node dies.
        *provider.down.lock() = true;
        let mut worker = RefundWorker::new(engine.clone(), router.clone());
        worker.tick(now_millis().0).await;
        assert_eq!((*provider.calls.lock(), provider.refunds.lock().len()), (1, 1));
        assert_eq!(engine.order_for_payment(&order.record.id).unwrap().status, OrderStatus::Delivered);
        engine.store().close();
        order
    };
    // After the restart the request is still there; asking again (same key) gets the same refund.
    let engine = Arc::new(open(dir.path(), config()).await);
    assert_eq!(engine.pending_refunds().unwrap(), vec![order.record.id]);
    *provider.down.lock() = false;
    let mut worker = RefundWorker::new(engine.clone(), router.clone());
    worker.tick(now_millis().0).await;
    assert_eq!((*provider.calls.lock(), provider.refunds.lock().len()), (2, 1), "asked twice, refunded once");
    assert!(engine.pending_refunds().unwrap().is_empty());
    let refunded = engine.lookup(&order.record.id, &order.token).await.unwrap();
    assert_eq!(refunded.status, OrderStatus::Refunded);
    assert!(refunded.secrets.is_empty(), "revoked keys are not shown");
    let refund = refunded.refund.unwrap();
    assert_eq!(
        (refund.state, refund.reason.as_str(), refund.provider_refund.as_deref()),
        (RefundState::Refunded, "buyer asked", Some("re_1"))
    );
    assert_eq!(refunded_events(&engine), vec![("re_1".to_string(), order.record.key_ids.clone(), false)]);
    // Asked again, or reported again by the provider: nothing more.
    assert_eq!(engine.request_refund(&order.record.id, "").await.unwrap(), RefundStart::AlreadyRefunded);
    assert!(!engine.complete_refund(&order.record.id, Some("re_1"), false).await.unwrap());
    assert_eq!(refunded_events(&engine).len(), 1);
    assert_eq!(engine.metrics().refunded.get(), 1);
    assert_eq!(engine.stock(&sku()), 1, "the refunded key does not come back on sale");
}

#[tokio::test]
async fn a_refunded_order_paid_while_out_of_stock_never_gets_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant_of(1, 1, 1, 1_000_000)).await.unwrap();
    let late = engine.create_order(buy(1)).await.unwrap();
    engine.expire_due(late.record.expires_at).await.unwrap();
    let other = engine.create_order(buy(2)).await.unwrap();
    engine.confirm_payment(payment_for(&other.record, "t-other")).await.unwrap();
    let paid = engine.confirm_payment(payment_for(&late.record, "t-late")).await.unwrap();
    assert_eq!(paid, PaymentOutcome::AwaitingStock);
    assert_eq!(engine.awaiting_stock().len(), 1);

    assert_eq!(engine.request_refund(&late.record.id, "out of stock").await.unwrap(), RefundStart::Started);
    assert!(engine.awaiting_stock().is_empty(), "out of the queue as soon as its refund is asked for");
    // New stock: it goes on sale, not to the order being refunded.
    engine.install_grant(grant_of(2, 10, 1, 1_000_000)).await.unwrap();
    assert_eq!(engine.order_for_payment(&late.record.id).unwrap().status, OrderStatus::PaidAwaitingStock);
    assert_eq!(engine.stock(&sku()), 1);
    assert!(engine.complete_refund(&late.record.id, None, true).await.unwrap());
    let refunded = engine.order_for_payment(&late.record.id).unwrap();
    assert_eq!((refunded.status, refunded.refund.unwrap().state), (OrderStatus::Refunded, RefundState::Manual));
    assert_eq!(refunded_events(&engine), vec![(String::new(), vec![], true)], "no keys to revoke; by hand");
    drop(engine);
    let engine = open(dir.path(), config()).await;
    assert!(engine.awaiting_stock().is_empty(), "still out of the queue after a restart");
    assert_eq!(engine.stock(&sku()), 1);
}

#[tokio::test]
async fn refunds_and_disputes_made_at_the_provider_are_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), config()).await;
    engine.install_grant(grant_of(1, 1, 3, 1_000_000)).await.unwrap();
    let mut orders = Vec::new();
    for (ip, intent) in [(1, "pi_a"), (2, "pi_b")] {
        let order = engine.create_order(buy(ip)).await.unwrap();
        let mut paid = payment_for(&order.record, &format!("cs_{intent}"));
        paid.provider_payment = Some(intent.to_string());
        engine.confirm_payment(paid).await.unwrap();
        orders.push(order);
    }
    assert_eq!(engine.record_provider_refund("sandbox", "pi_a", "re_dash").await.unwrap(), ProviderReport::Recorded);
    assert_eq!(
        engine.record_provider_refund("sandbox", "pi_a", "re_dash").await.unwrap(),
        ProviderReport::AlreadyRecorded
    );
    assert_eq!(
        engine.record_provider_refund("sandbox", "pi_zzz", "re_x").await.unwrap(),
        ProviderReport::UnknownPayment
    );
    assert_eq!(
        engine.record_provider_refund("stripe", "pi_b", "re_x").await.unwrap(),
        ProviderReport::UnknownPayment,
        "another channel's id"
    );
    let refunded = engine.order_for_payment(&orders[0].record.id).unwrap();
    assert_eq!(refunded.status, OrderStatus::Refunded);
    assert_eq!(refunded.refund.unwrap().reason, "refunded at the provider");

    let dispute =
        DisputeRecord { provider_dispute: "dp_1".into(), amount_minor: 1000, currency: "USD".into(), at: now_millis() };
    assert_eq!(engine.record_dispute("sandbox", "pi_b", dispute.clone()).await.unwrap(), ProviderReport::Recorded);
    assert_eq!(engine.record_dispute("sandbox", "pi_b", dispute).await.unwrap(), ProviderReport::AlreadyRecorded);
    let disputed = engine.order_for_payment(&orders[1].record.id).unwrap();
    assert_eq!(
        (disputed.status, disputed.dispute.unwrap().provider_dispute.as_str()),
        (OrderStatus::Delivered, "dp_1")
    );
    let kinds: Vec<&str> = engine
        .outbox_after(0, 1000)
        .unwrap()
        .iter()
        .filter_map(|e| match e.kind {
            OrderEventKind::Refunded { .. } => Some("refunded"),
            OrderEventKind::Disputed { .. } => Some("disputed"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec!["refunded", "disputed"]);
}
