//! Money that needs an operator, end to end: a real coordinator and node processes, the operator
//! CLI, and the fake gateway (Stripe and EPay wire formats, real signatures) over TLS.
//!
//! A payment of the wrong amount reaches the ledger and `orders list --status payment_mismatch`;
//! `orders refund` refunds through the channel that took the payment (the sandbox, Stripe's
//! Refunds API, EPay marked for a refund by hand), once however often it is asked and across a
//! node crash between the provider's call and its record, and the order's keys are revoked;
//! refunds and disputes made in Stripe's dashboard reach the ledger too.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/fake_gateway.rs"]
mod fake_gateway;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::coordinator::*;
use common::*;
use fake_gateway::{FakeGateway, Faults, EPAY_KEY, EPAY_PID, STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const LIMIT: Duration = Duration::from_secs(30);
const SANDBOX_SECRET: &str = "sandbox secret of the money tests";

/// Sets fields of `[payments.<table>]` (or `[payments]` itself for an empty `table`).
fn set_payments(config: &Path, table: &str, fields: &[(&str, toml::Value)]) {
    edit_toml(config, |root| {
        let payments =
            root.entry("payments").or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().unwrap();
        let target = if table.is_empty() {
            payments
        } else {
            payments.entry(table).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().unwrap()
        };
        for (field, value) in fields {
            target.insert(field.to_string(), value.clone());
        }
    });
}

fn s(value: &str) -> toml::Value {
    toml::Value::String(value.into())
}

/// A lab with one product of `keys` keys, all granted to node `eu-1`, whose config `edit`
/// adjusts before it starts. Returns the lab, the node's config and the node.
async fn lab_with_node(keys: usize, edit: impl FnOnce(&Path)) -> (Lab, std::path::PathBuf, NodeProcess) {
    let lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(keys)).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", keys as u64).await;
    edit(&config);
    let node = start_node(&config).await;
    wait_for_stock(&node, keys as u64).await;
    (lab, config, node)
}

/// The ledger's order `id`, once `done` holds for it (at most [`LIMIT`]).
async fn ledger_order(lab: &Lab, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let (orders, _) =
        lab.wait_for_ledger(what, LIMIT, |orders| orders.iter().any(|o| o["order_id"] == id && done(o))).await;
    orders.into_iter().find(|o| o["order_id"] == id).unwrap()
}

fn alarm_kinds(status: &Value) -> Vec<String> {
    status["latest_alarms"].as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap().to_string()).collect()
}

/// A sandbox callback for `order_id` paying `amount_minor`, signed with the node's sandbox key.
fn sandbox_callback(order_id: &str, amount_minor: u64) -> edgecard::https_client::Request {
    let body = json!({
        "order_id": order_id, "txn_id": format!("sbx_{order_id}"), "amount_minor": amount_minor,
        "currency": "USD", "status": "succeeded",
    })
    .to_string();
    let t = unix_secs();
    let mut mac = Hmac::<Sha256>::new_from_slice(SANDBOX_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    edgecard::https_client::Request::post("/api/v1/payments/sandbox/callback")
        .header("content-type", "application/json")
        .header("edgecard-sandbox-signature", &format!("t={t},v1={signature}"))
        .body(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_payment_is_in_the_ledger_and_listed_as_payment_mismatch() {
    let (lab, _, node) =
        lab_with_node(2, |config| set_payments(config, "sandbox", &[("secret", s(SANDBOX_SECRET))])).await;
    let mut client = node.client().await;
    let order = client.reserve(1).await;
    let answer = client.send(sandbox_callback(&order.order_id, 1)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json::<Value>().unwrap()["outcome"], "payment_mismatch");
    assert_eq!(client.fetch_ok(&order).await["status"], "reserved", "nothing delivered");

    let listed =
        ledger_order(&lab, &order.order_id, "mismatch in the ledger", |o| o["status"] == "payment_mismatch").await;
    assert_eq!((listed["channel"].as_str(), listed["amount_minor"].as_u64()), (Some("sandbox"), Some(PRICE_MINOR)));
    let mismatched = lab.json(&["orders", "list", "--status", "payment_mismatch"]).await;
    let ids: Vec<&str> = mismatched.as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![order.order_id.as_str()]);
    let table = lab.ok(&["orders", "list", "--status", "payment_mismatch"]).await;
    assert!(table.contains(&order.order_id) && table.contains("payment_mismatch"), "{table}");
    let status = lab.status().await;
    assert!(alarm_kinds(&status).contains(&"payment_mismatch".to_string()), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_refund_asked_twice_refunds_once_and_revokes_the_keys() {
    let (lab, _, node) = lab_with_node(3, |_| {}).await;
    let mut client = node.client().await;
    let (order, keys) = client.buy(1).await;
    ledger_order(&lab, &order.order_id, "the sale in the ledger", |o| o["status"] == "delivered").await;
    let unpaid = client.reserve(1).await;
    ledger_order(&lab, &unpaid.order_id, "the reservation in the ledger", |o| o["status"] == "reserved").await;

    let first = lab.json(&["orders", "refund", &order.order_id, "--reason", "buyer changed their mind"]).await;
    assert_eq!((first["state"]["state"].as_str(), first["node"].as_str()), (Some("requested"), Some("eu-1")));
    let second = lab.json(&["orders", "refund", &order.order_id]).await;
    assert_eq!(second["control_seq"], first["control_seq"], "asked again: the same request, nothing new queued");
    let refused = lab.fails(&["orders", "refund", &unpaid.order_id]).await;
    assert!(refused.contains("only a paid order can be refunded"), "{refused}");
    let unknown = lab.fails(&["orders", "refund", "00000000000000000000000000000000"]).await;
    assert!(unknown.contains("unknown order"), "{unknown}");

    ledger_order(&lab, &order.order_id, "the refund in the ledger", |o| o["status"] == "refunded").await;
    let refunds = lab.json(&["orders", "refunds"]).await;
    let refunds = refunds.as_array().unwrap();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["state"]["state"], "refunded");
    assert_eq!(refunds[0]["state"]["provider_refund"], format!("sbx_refund_{}", order.order_id));
    assert_eq!(refunds[0]["reason"], "buyer changed their mind");
    let slices = lab.slices().await;
    assert_eq!(slices[0]["revoked"], 1, "the refunded key is revoked in the ledger: {slices:?}");

    let view = client.fetch_ok(&order).await;
    assert_eq!(view["status"], "refunded");
    assert!(keys_of(&view).is_empty(), "a revoked key is not shown again");
    assert_eq!(node.metric("edgecard_orders_refunded_total").await, 1.0);
    assert_eq!(node.metric("edgecard_payment_refunds_total{channel=\"sandbox\",result=\"recorded\"}").await, 1.0);
    // The refunded key is gone for good: the node sells only its other keys.
    let (_, more) = client.buy(1).await;
    assert!(!more.contains(&keys[0]));
    assert_eq!(client.stock().await, 0, "one refunded, one reserved, one sold");
}

/// The node's config for Stripe at `gateway` (its sandbox off).
fn stripe_node(config: &Path, gateway: &FakeGateway) {
    let ca = config.with_file_name("gateway-ca.pem");
    gateway.write_ca(&ca);
    set_payments(config, "sandbox", &[("enabled", toml::Value::Boolean(false))]);
    set_payments(
        config,
        "",
        &[("extra_ca_file", s(&ca.display().to_string())), ("create_timeout_ms", toml::Value::Integer(1000))],
    );
    set_payments(
        config,
        "stripe",
        &[
            ("enabled", toml::Value::Boolean(true)),
            ("api_base", s(&gateway.url)),
            ("secret_key", s(STRIPE_SECRET_KEY)),
            ("webhook_secret", s(STRIPE_WEBHOOK_SECRET)),
        ],
    );
}

/// Reserves through Stripe and pays at the gateway (its webhook delivered).
async fn bought_at_stripe(lab: &Lab, node: &NodeProcess, gateway: &FakeGateway) -> (Created, String) {
    let mut client = node.client().await;
    let order = client.reserve(1).await;
    let session = gateway.session_of(&order.pay_url);
    assert_eq!(gateway.pay_stripe(&session).await, vec![200]);
    ledger_order(lab, &order.order_id, "the Stripe sale in the ledger", |o| o["status"] == "delivered").await;
    (order, session)
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_refund_interrupted_by_a_node_crash_refunds_once() {
    let gateway = FakeGateway::start().await;
    let (lab, config, mut node) = lab_with_node(4, |config| stripe_node(config, &gateway)).await;
    gateway.set_node(node.api.clone());
    let (order, session) = bought_at_stripe(&lab, &node, &gateway).await;

    // Stripe makes the refund, but its answer never reaches the node, which then dies.
    gateway.set_faults(Faults { refund_stall: true, stall: Duration::from_secs(3), ..Faults::default() });
    lab.json(&["orders", "refund", &order.order_id, "--reason", "duplicate purchase"]).await;
    let counters = gateway.counters();
    wait_until("the node's refund call", || counters.refunds_created.load(Ordering::Relaxed) == 1).await;
    node.kill9();
    gateway.set_faults(Faults::default());
    lab.json(&["orders", "refund", &order.order_id]).await;

    let node = start_node(&config).await;
    gateway.set_node(node.api.clone());
    let refunded =
        ledger_order(&lab, &order.order_id, "the refund after the crash", |o| o["status"] == "refunded").await;
    assert_eq!(refunded["provider_txn"], session);
    let made = gateway.refunds();
    assert_eq!(made.len(), 1, "one refund however often it was asked: {made:?}");
    assert!(counters.refund_calls.load(Ordering::Relaxed) >= 2, "asked again after the crash");
    assert_eq!(made[0].amount, PRICE_MINOR);
    assert_eq!(made[0].order_id.as_deref(), Some(order.order_id.as_str()));
    let refunds = lab.json(&["orders", "refunds"]).await;
    assert_eq!(refunds[0]["state"]["provider_refund"], made[0].id.as_str());
    assert_eq!(lab.slices().await[0]["revoked"], 1);
    let view = node.client().await.fetch_ok(&order).await;
    assert_eq!(view["status"], "refunded");
    assert!(keys_of(&view).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_and_disputes_made_in_the_stripe_dashboard_reach_the_ledger() {
    let gateway = FakeGateway::start().await;
    let (lab, _, node) = lab_with_node(3, |config| stripe_node(config, &gateway)).await;
    gateway.set_node(node.api.clone());
    let (refunded, refunded_session) = bought_at_stripe(&lab, &node, &gateway).await;
    let (disputed, disputed_session) = bought_at_stripe(&lab, &node, &gateway).await;

    assert_eq!(gateway.refund_in_dashboard(&refunded_session).await, vec![200]);
    assert_eq!(gateway.open_dispute(&disputed_session).await, vec![200]);
    ledger_order(&lab, &refunded.order_id, "the dashboard refund", |o| o["status"] == "refunded").await;
    ledger_order(&lab, &disputed.order_id, "the dispute", |o| o["status"] == "disputed").await;
    let refunds = lab.json(&["orders", "refunds"]).await;
    assert_eq!(refunds[0]["reason"], "refunded at the provider");
    assert_eq!(refunds[0]["state"]["provider_refund"], gateway.refunds()[0].id.as_str());
    let status = lab.status().await;
    assert!(alarm_kinds(&status).contains(&"payment_disputed".to_string()), "{status}");
    // Asking for a refund of a disputed payment is refused: the dispute settles it.
    let refused = lab.fails(&["orders", "refund", &disputed.order_id]).await;
    assert!(refused.contains("disputed"), "{refused}");
    assert_eq!(node.client().await.fetch_ok(&refunded).await["status"], "refunded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epay_refund_is_marked_for_a_refund_by_hand() {
    let gateway = FakeGateway::start().await;
    let (lab, _, node) = lab_with_node(2, |config| {
        let ca = config.with_file_name("gateway-ca.pem");
        gateway.write_ca(&ca);
        set_payments(config, "sandbox", &[("enabled", toml::Value::Boolean(false))]);
        set_payments(config, "", &[("extra_ca_file", s(&ca.display().to_string()))]);
        set_payments(
            config,
            "epay",
            &[
                ("enabled", toml::Value::Boolean(true)),
                ("gateway_url", s(&gateway.url)),
                ("pid", s(EPAY_PID)),
                ("key", s(EPAY_KEY)),
                ("currency", s("USD")),
            ],
        );
    })
    .await;
    gateway.set_node(node.api.clone());
    let mut client = node.client().await;
    let order = client.reserve(1).await;
    assert_eq!(gateway.pay_epay(&order.pay_url, false).await, vec![(200, "success".to_string())]);
    ledger_order(&lab, &order.order_id, "the EPay sale", |o| o["status"] == "delivered").await;

    let asked = lab.ok(&["orders", "refund", &order.order_id, "--reason", "wrong region"]).await;
    assert!(asked.contains("requested"), "{asked}");
    ledger_order(&lab, &order.order_id, "the refund by hand", |o| o["status"] == "refund_manual").await;
    let refunds = lab.json(&["orders", "refunds"]).await;
    assert_eq!(refunds[0]["state"]["state"], "manual");
    let status = lab.status().await;
    assert!(alarm_kinds(&status).contains(&"refund_manual".to_string()), "{status}");
    assert_eq!(lab.slices().await[0]["revoked"], 1);
    let view = client.fetch_ok(&order).await;
    assert_eq!(view["status"], "refunded");
    assert!(keys_of(&view).is_empty());
    let again = lab.ok(&["orders", "refund", &order.order_id]).await;
    assert!(again.contains("by hand"), "{again}");
}
