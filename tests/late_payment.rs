//! A payment whose callback is lost and that is made long after the order: compensation, driven
//! on a simulated clock (no waiting for real time), still finds it at the provider, and the order
//! ends delivered or first in line for stock. The node's real engine and store, its real Stripe and
//! EPay channels, and the fake gateway over real TLS (which drops every callback here).

#![allow(clippy::unwrap_used)]

#[path = "common/fake_gateway.rs"]
mod fake_gateway;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use edgecard_node::catalog::Catalog;
use edgecard_node::config::{OrdersConfig, PriceConfig, ProductConfig};
use edgecard_node::metrics::StoreMetrics;
use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{CreateOrder, OrderEngine, OrderRecord, OrderStatus, PaymentOutcome};
use edgecard_node::payments::compensation::{CompensationConfig, Compensator};
use edgecard_node::payments::epay::{EpayChannel, EpaySettings};
use edgecard_node::payments::http_client::OutboundClient;
use edgecard_node::payments::return_link::ReturnLinks;
use edgecard_node::payments::router::Router;
use edgecard_node::payments::stripe::{StripeChannel, StripeSettings};
use edgecard_node::payments::{open_payment, PaymentChannel};
use edgecard_node::store::Store;
use edgecard_protocol::{Epoch, GrantedKey, KeyId, NodeId, Secret, Sku, SliceGrant, SliceId, UnixMillis};
use fake_gateway::{FakeGateway, Faults, EPAY_KEY, EPAY_PID, STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET};

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
const PUBLIC_URL: &str = "https://node.example";

fn sku() -> Sku {
    Sku::new("game-10").unwrap()
}

async fn engine(dir: &std::path::Path, keys: u64) -> Arc<OrderEngine> {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let products = vec![ProductConfig {
        sku: sku(),
        title: BTreeMap::from([("en".into(), "Game card".into())]),
        prices: vec![
            PriceConfig { amount_minor: 1000, currency: "USD".parse().unwrap() },
            PriceConfig { amount_minor: 7000, currency: "CNY".parse().unwrap() },
        ],
    }];
    let config = OrdersConfig { max_open_per_ip: 100, ..OrdersConfig::default() };
    let node = NodeId::new("eu-1").unwrap();
    let engine =
        OrderEngine::open(node.clone(), store, Arc::new(Catalog::new(products)), config, Arc::default()).await.unwrap();
    let now = now_millis();
    let grant = SliceGrant {
        slice_id: SliceId(1),
        sku: sku(),
        node_id: node,
        epoch: Epoch(1),
        issued_at: now,
        lease_deadline: now.saturating_add_ms(200 * HOUR),
        take_window: 1_000_000,
        keys: (1..=keys)
            .map(|k| GrantedKey { key_id: KeyId(k), secret: Secret::new(format!("KEY-{k}")).unwrap() })
            .collect(),
    };
    engine.install_grant(grant).await.unwrap();
    Arc::new(engine)
}

fn buy(currency: &str, channel: &str) -> CreateOrder {
    CreateOrder {
        sku: sku(),
        quantity: 1,
        email: None,
        currency: Some(currency.parse().unwrap()),
        channel: channel.into(),
        client_ip: IpAddr::from([192, 0, 2, 1]),
    }
}

fn client(gateway: &FakeGateway) -> OutboundClient {
    OutboundClient::new(Some(gateway.ca_pem.as_bytes())).unwrap()
}

fn return_links() -> ReturnLinks {
    ReturnLinks::new(b"return-link key for the late payment test", 6 * 3600).unwrap()
}

fn stripe(gateway: &FakeGateway) -> Arc<dyn PaymentChannel> {
    let settings = StripeSettings {
        api_base: gateway.url.clone(),
        secret_key: STRIPE_SECRET_KEY.into(),
        webhook_secret: STRIPE_WEBHOOK_SECRET.into(),
        tolerance_secs: 300,
        request_timeout: Duration::from_secs(5),
        node_id: "eu-1".into(),
        return_links: return_links(),
        session_ttl_secs: 3600,
    };
    Arc::new(StripeChannel::new(settings, client(gateway)).unwrap())
}

fn epay(gateway: &FakeGateway) -> Arc<dyn PaymentChannel> {
    let settings = EpaySettings {
        gateway_url: gateway.url.clone(),
        pid: EPAY_PID.into(),
        key: EPAY_KEY.into(),
        pay_type: "alipay".into(),
        currency: "CNY".into(),
        request_timeout: Duration::from_secs(5),
        return_links: return_links(),
    };
    Arc::new(EpayChannel::new(settings, client(gateway)))
}

/// The node's defaults: first query after a minute, 15 min of grace, 72 h at most.
fn compensation() -> CompensationConfig {
    CompensationConfig { query_timeout_ms: 5_000, ..CompensationConfig::default() }
}

/// Runs compensation once a simulated minute from `from` through `to` (ms after `origin`), and
/// the expiry sweep with it.
async fn run(compensator: &mut Compensator, engine: &OrderEngine, origin: u64, from: u64, to: u64, step: u64) {
    let mut at = from;
    while at <= to {
        engine.expire_due(UnixMillis(origin + at)).await.unwrap();
        compensator.tick(origin + at).await;
        at += step;
    }
}

fn status(engine: &OrderEngine, order: &OrderRecord) -> OrderStatus {
    engine.order_for_payment(&order.id).unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_payment_made_45_minutes_after_the_order_with_its_callback_lost_is_delivered() {
    edgecard_node::tls::install_crypto_provider();
    let gateway = FakeGateway::start().await;
    gateway.set_faults(Faults { drop_callback_rate: 1.0, ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), 3).await;
    let router = Arc::new(Router::with_defaults(vec![stripe(&gateway)]));
    let order = engine.create_order(buy("USD", "stripe")).await.unwrap().record;
    let (_, created) = open_payment(&engine, &router, &order, PUBLIC_URL, &[0]).await.unwrap();
    let session = gateway.session(&gateway.session_of(&created.pay_url)).unwrap();
    let origin = order.created_at.0;
    assert_eq!(session.expires_at, origin / 1000 + 3600, "the Checkout Session takes payment for an hour");

    let mut compensator = Compensator::new(engine.clone(), router.clone(), compensation());
    // The reservation (15 min) ends; nobody has paid yet.
    run(&mut compensator, &engine, origin, MINUTE, 44 * MINUTE, MINUTE).await;
    assert_eq!(status(&engine, &order), OrderStatus::Expired);
    assert_eq!(compensator.tracked(), 1, "still asked about: the session still takes payment");

    // The buyer, still on the Checkout page, pays 45 minutes in; the webhook is lost.
    assert!(gateway.pay_stripe(&session.id).await.is_empty(), "callback dropped");
    run(&mut compensator, &engine, origin, 45 * MINUTE, 60 * MINUTE, MINUTE).await;
    let paid = engine.order_for_payment(&order.id).unwrap();
    assert_eq!(paid.status, OrderStatus::Delivered, "a late payment found by compensation delivers");
    assert_eq!(paid.secrets.len(), 1);
    assert_eq!(paid.payment.unwrap().provider_txn, session.id);
    assert_eq!(compensator.tracked(), 0);
    assert_eq!(router.metrics().channel("stripe").unwrap().compensated.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epay_payment_made_a_day_later_with_its_notify_lost_waits_for_stock() {
    edgecard_node::tls::install_crypto_provider();
    let gateway = FakeGateway::start().await;
    gateway.set_faults(Faults { drop_callback_rate: 1.0, ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), 1).await;
    let router = Arc::new(Router::with_defaults(vec![epay(&gateway)]));
    let late = engine.create_order(buy("CNY", "epay")).await.unwrap().record;
    let unpaid = engine.create_order(buy("CNY", "epay"));
    assert!(unpaid.await.is_err(), "the only key is reserved");
    let (_, created) = open_payment(&engine, &router, &late, PUBLIC_URL, &[0]).await.unwrap();
    let origin = late.created_at.0;
    let mut compensator = Compensator::new(engine.clone(), router.clone(), compensation());
    run(&mut compensator, &engine, origin, MINUTE, 20 * MINUTE, MINUTE).await;
    assert_eq!(status(&engine, &late), OrderStatus::Expired);

    // Another buyer takes the key that came back, and pays at once.
    let other = engine.create_order(buy("CNY", "epay")).await.unwrap().record;
    let paid = edgecard_node::orders::PaymentConfirmation {
        order_id: other.id,
        channel: "epay".into(),
        provider_txn: "T-OTHER".into(),
        amount_minor: other.amount_minor,
        currency: other.currency.clone(),
        provider_ref: None,
        provider_payment: None,
    };
    assert_eq!(engine.confirm_payment(paid).await.unwrap(), PaymentOutcome::Delivered);

    // A day later the first buyer pays at the EPay page (it never expires); the notify is lost.
    run(&mut compensator, &engine, origin, 30 * MINUTE, 24 * HOUR, 10 * MINUTE).await;
    assert_eq!(status(&engine, &late), OrderStatus::Expired);
    assert!(gateway.pay_epay(&created.pay_url, true).await.is_empty(), "notify dropped");
    let queries_before = gateway.counters().queries.load(std::sync::atomic::Ordering::Relaxed);
    run(&mut compensator, &engine, origin, 24 * HOUR + 10 * MINUTE, 26 * HOUR, 10 * MINUTE).await;
    assert_eq!(status(&engine, &late), OrderStatus::PaidAwaitingStock, "paid, first in line for stock");
    let queries = gateway.counters().queries.load(std::sync::atomic::Ordering::Relaxed);
    assert!(queries - queries_before <= 3, "an order a day old is asked about at most hourly: {queries}");
    assert!(queries < 60, "{queries} queries over a day");
    assert_eq!(router.metrics().compensation_gave_up.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_never_paid_at_epay_is_asked_about_until_the_cap_and_then_given_up() {
    edgecard_node::tls::install_crypto_provider();
    let gateway = FakeGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), 1).await;
    let router = Arc::new(Router::with_defaults(vec![epay(&gateway)]));
    let order = engine.create_order(buy("CNY", "epay")).await.unwrap().record;
    open_payment(&engine, &router, &order, PUBLIC_URL, &[0]).await.unwrap();
    let origin = order.created_at.0;
    let mut compensator = Compensator::new(engine.clone(), router.clone(), compensation());
    run(&mut compensator, &engine, origin, MINUTE, 71 * HOUR, 10 * MINUTE).await;
    assert_eq!(compensator.tracked(), 1, "still asked about before the cap");
    run(&mut compensator, &engine, origin, 71 * HOUR + 10 * MINUTE, 73 * HOUR, 10 * MINUTE).await;
    assert_eq!(compensator.tracked(), 0);
    assert!(engine.awaiting_confirmation().unwrap().is_empty(), "given up at the cap");
    assert_eq!(router.metrics().compensation_gave_up.get(), 1);
    let queries = gateway.counters().queries.load(std::sync::atomic::Ordering::Relaxed);
    assert!((50..100).contains(&queries), "{queries} queries over 72 h");
}
