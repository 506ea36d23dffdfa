//! Payments end to end: a real `edgecard node run` process against the fake gateway (Stripe and
//! EPay wire formats, real signatures) on loopback. Forged, mismatched, replayed and duplicated
//! callbacks; a primary channel down; every callback dropped; and the success rate under 20%
//! injected transient gateway failures.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/fake_gateway.rs"]
mod fake_gateway;

use std::time::{Duration, Instant};

use common::{bounded, error_code, keys_of, make_secrets, Created, NodeOptions, NodeProcess, TestEnv, SKU};
use edgecard::https_client::Request;
use fake_gateway::{
    stripe_signature, FakeGateway, Faults, EPAY_KEY, EPAY_PID, STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

fn unix_secs() -> u64 {
    common::unix_secs()
}

/// What becomes of the sandbox the base config enables, on a node with a real channel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sandbox {
    Off,
    /// Kept on, with `allow_beside_real_channels` (it serves only where the routes list it).
    AllowedBeside,
}

/// Writes the config of a node selling `keys` keys, with `payments` TOML appended.
fn write_node_config(
    env: &TestEnv,
    keys: usize,
    payments: &str,
    sandbox: Sandbox,
) -> (std::path::PathBuf, NodeOptions) {
    let grant = env.grant_file(&make_secrets(keys));
    let options =
        NodeOptions { max_open_per_ip: 100_000, max_open_per_email: 100_000, ..NodeOptions::with_grants(vec![grant]) };
    let path = env.write_config(&options);
    let base = std::fs::read_to_string(&path).unwrap();
    let table = match sandbox {
        Sandbox::Off => "[payments.sandbox]\nenabled = false\n",
        Sandbox::AllowedBeside => "[payments.sandbox]\nenabled = true\nallow_beside_real_channels = true\n",
    };
    let mut text = base.replace("[payments.sandbox]\nenabled = true\n", table);
    assert!(text.contains(table), "the base config's sandbox table moved");
    text.push_str(payments);
    std::fs::write(&path, text).unwrap();
    (path, options)
}

/// Starts a node selling `keys` keys, with `payments` TOML appended to its config.
fn start_node(env: &TestEnv, keys: usize, payments: &str, sandbox: Sandbox) -> NodeProcess {
    let (path, options) = write_node_config(env, keys, payments, sandbox);
    NodeProcess::start(&path, &options.env)
}

fn stripe_toml(gateway: &FakeGateway, ca: &std::path::Path) -> String {
    format!(
        r#"
[payments]
extra_ca_file = {ca:?}
create_timeout_ms = 1000
retry_backoff_ms = 10

[payments.stripe]
enabled = true
api_base = "{url}"
secret_key = "{STRIPE_SECRET_KEY}"
webhook_secret = "{STRIPE_WEBHOOK_SECRET}"
"#,
        ca = ca.display().to_string(),
        url = gateway.url,
    )
}

fn compensation_toml(first_ms: u64) -> String {
    format!(
        "\n[payments.compensation]\nfirst_query_after_ms = {first_ms}\nmax_backoff_ms = 1000\nscan_every_ms = 100\n"
    )
}

async fn gateway_and_node(env: &TestEnv, keys: usize, extra: &str, sandbox: Sandbox) -> (FakeGateway, NodeProcess) {
    let gateway = FakeGateway::start().await;
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    let node = start_node(env, keys, &format!("{}{extra}", stripe_toml(&gateway, &ca)), sandbox);
    gateway.set_node(node.api.clone());
    (gateway, node)
}

async fn order(node: &NodeProcess, body: Value) -> Created {
    let mut client = node.client().await;
    let response = client.create_order(&body).await;
    assert_eq!(response.status, 201, "{}", response.text());
    Created::from_response(&response)
}

async fn view(node: &NodeProcess, order: &Created) -> Value {
    node.client().await.fetch_ok(order).await
}

/// Waits (bounded) until `order` is delivered; returns its view.
async fn delivered(node: &NodeProcess, order: &Created, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let v = view(node, order).await;
        if v["status"] == "delivered" {
            return v;
        }
        assert!(started.elapsed() < limit, "order {} not delivered within {limit:?}: {v}", order.order_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_forged_mismatched_and_replayed_webhooks_deliver_nothing_wrongly() {
    let env = TestEnv::new();
    let (gateway, node) = gateway_and_node(&env, 5, "", Sandbox::Off).await;
    let created = order(&node, json!({ "sku": SKU })).await;
    assert_eq!(created.body["channel"], "stripe");
    assert!(created.pay_url.starts_with(&gateway.url), "{}", created.pay_url);
    let session = gateway.session(&gateway.session_of(&created.pay_url)).unwrap();
    assert_eq!((session.amount_total, session.currency.as_str()), (1000, "usd"));
    assert_eq!(session.order_id, created.order_id);

    // Forged signature (another secret), tampered body, stale timestamp, no signature.
    let mut paid = session.clone();
    paid.paid = true;
    let body = gateway.stripe_event("checkout.session.completed", &paid, "paid");
    let (status, _) = gateway.post_stripe_webhook(&body, &stripe_signature("whsec_forged", unix_secs(), &body)).await;
    assert_eq!(status, 400, "forged signature");
    let good = stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &body);
    let mut tampered = body.clone();
    tampered.push(b' ');
    assert_eq!(gateway.post_stripe_webhook(&tampered, &good).await.0, 400, "tampered body");
    let stale = stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs() - 3_600, &body);
    assert_eq!(gateway.post_stripe_webhook(&body, &stale).await.0, 400, "stale timestamp");
    assert_eq!(gateway.post_stripe_webhook(&body, "").await.0, 400, "no signature");

    // Genuinely signed, but wrong amount, wrong currency: recorded and acknowledged, nothing
    // delivered; an unknown order: refused.
    let mut cheap = paid.clone();
    cheap.amount_total = 1;
    let (status, text) = {
        let b = gateway.stripe_event("checkout.session.completed", &cheap, "paid");
        gateway.post_stripe_webhook(&b, &stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &b)).await
    };
    assert_eq!(status, 200, "wrong amount: {text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["outcome"], "payment_mismatch", "{text}");
    let mut euros = paid.clone();
    euros.currency = "eur".into();
    let b = gateway.stripe_event("checkout.session.completed", &euros, "paid");
    let (status, text) =
        gateway.post_stripe_webhook(&b, &stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &b)).await;
    assert_eq!((status, text.contains("payment_mismatch")), (200, true), "wrong currency: {text}");
    let mismatches = node.metrics().await;
    for reason in ["amount", "currency"] {
        let series = format!("edgecard_payment_mismatch_total{{channel=\"stripe\",reason=\"{reason}\"}}");
        assert_eq!(mismatches.get(&series), Some(&1.0), "{series} in {mismatches:?}");
    }
    let mut stranger = paid.clone();
    stranger.order_id = edgecard_protocol::OrderId::random().to_string();
    let b = gateway.stripe_event("checkout.session.completed", &stranger, "paid");
    let (status, _) = gateway.post_stripe_webhook(&b, &stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &b)).await;
    assert!(status == 400 || status == 404, "unknown order: {status}");

    // Authentic but not a success: acknowledged, nothing changes.
    assert_eq!(gateway.send_stripe_event("checkout.session.completed", &session, "unpaid").await, vec![200]);
    assert_eq!(gateway.send_stripe_event("checkout.session.async_payment_failed", &session, "unpaid").await, vec![200]);
    let before = view(&node, &created).await;
    assert_eq!(before["status"], "reserved", "{before}");
    assert!(keys_of(&before).is_empty());
    assert_eq!(node.metric("edgecard_purchases_total").await, 0.0);

    // The real payment delivers; replaying its webhook later is harmless.
    assert_eq!(gateway.pay_stripe(&session.id).await, vec![200]);
    let after = view(&node, &created).await;
    assert_eq!(after["status"], "delivered", "{after}");
    assert_eq!(keys_of(&after).len(), 1);
    let t = unix_secs();
    let replay = gateway.stripe_event("checkout.session.completed", &gateway.session(&session.id).unwrap(), "paid");
    let signature = stripe_signature(STRIPE_WEBHOOK_SECRET, t, &replay);
    for _ in 0..3 {
        assert_eq!(gateway.post_stripe_webhook(&replay, &signature).await.0, 200);
    }
    let again = view(&node, &created).await;
    assert_eq!(keys_of(&again), keys_of(&after), "a replay changes nothing");
    assert_eq!(node.metric("edgecard_purchases_total").await, 1.0);
    let mut client = node.client().await;
    assert_eq!(client.stock().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epay_notifies_are_verified_and_answered_success_only_once_recorded() {
    let env = TestEnv::new();
    let gateway = FakeGateway::start().await;
    let extra = format!(
        "\n[payments.epay]\nenabled = true\ngateway_url = \"{}\"\npid = \"{EPAY_PID}\"\nkey = \"{EPAY_KEY}\"\ncurrency = \"EUR\"\n",
        gateway.url
    );
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    let node = start_node(
        &env,
        5,
        &format!("\n[payments]\nextra_ca_file = {:?}\n{extra}", ca.display().to_string()),
        Sandbox::Off,
    );
    gateway.set_node(node.api.clone());

    // EPay takes EUR here only: it is not among USD's channels, so a buyer cannot pick it.
    let mut client = node.client().await;
    let refused = client.create_order(&json!({ "sku": SKU, "currency": "USD", "channel": "epay" })).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(error_code(&refused), "channel_not_available");
    let created = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    assert_eq!(created.body["channel"], "epay");
    assert!(created.pay_url.starts_with(&format!("{}/submit.php?", gateway.url)), "{}", created.pay_url);
    let money = fake_gateway::parse_form(created.pay_url.split_once('?').unwrap().1)
        .into_iter()
        .find(|(k, _)| k == "money")
        .unwrap()
        .1;
    assert_eq!(money, "9.00");

    let template = fake_gateway::EpayOrder {
        out_trade_no: created.order_id.clone(),
        trade_no: "T-forged".into(),
        money: "9.00".into(),
        name: "x".into(),
        pay_type: "alipay".into(),
        notify_url: format!("{}/api/v1/payments/epay/callback", node.public_url),
        return_url: String::new(),
        paid: true,
    };
    let notify_url = template.notify_url.clone();
    let forged = gateway.epay_notify(&template, "TRADE_SUCCESS", "not-the-key");
    assert_eq!(gateway.send_epay_notify(&notify_url, &forged, true).await, (400, "fail".into()));
    // A wrong amount is recorded, then acknowledged (retries would add nothing).
    let cheap = fake_gateway::EpayOrder { money: "0.01".into(), ..template.clone() };
    let cheap = gateway.epay_notify(&cheap, "TRADE_SUCCESS", EPAY_KEY);
    assert_eq!(gateway.send_epay_notify(&notify_url, &cheap, false).await, (200, "success".into()));
    assert_eq!(node.metric("edgecard_payment_mismatch_total{channel=\"epay\",reason=\"amount\"}").await, 1.0);
    let mut foreign = gateway.epay_notify(&template, "TRADE_SUCCESS", EPAY_KEY);
    foreign.retain(|(k, _)| k != "sign" && k != "sign_type");
    foreign[0].1 = "9999".into();
    let sign = fake_gateway::epay_sign(&foreign, EPAY_KEY);
    foreign.push(("sign".into(), sign));
    assert_eq!(gateway.send_epay_notify(&notify_url, &foreign, true).await.1, "fail", "another merchant id");
    let waiting = gateway.epay_notify(&template, "WAIT_BUYER_PAY", EPAY_KEY);
    assert_eq!(gateway.send_epay_notify(&notify_url, &waiting, true).await, (200, "success".into()));
    assert_eq!(view(&node, &created).await["status"], "reserved");

    // The real payment, notified by GET, then a duplicate by POST.
    let answers = gateway.pay_epay(&created.pay_url, true).await;
    assert_eq!(answers, vec![(200, "success".to_string())]);
    let paid = view(&node, &created).await;
    assert_eq!(paid["status"], "delivered");
    let order = gateway.epay_order(&created.order_id).unwrap();
    let duplicate = gateway.epay_notify(&order, "TRADE_SUCCESS", EPAY_KEY);
    assert_eq!(gateway.send_epay_notify(&notify_url, &duplicate, false).await, (200, "success".into()));
    assert_eq!(keys_of(&view(&node, &created).await), keys_of(&paid));
    assert_eq!(node.metric("edgecard_purchases_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_orders_complete_through_the_secondary() {
    let env = TestEnv::new();
    let extra = "\n[payments.routes]\nUSD = [\"stripe\", \"sandbox\"]\n[payments.breaker]\nfailure_threshold = 3\n";
    let (gateway, node) = gateway_and_node(&env, 20, extra, Sandbox::AllowedBeside).await;
    gateway.set_faults(Faults { down: true, ..gateway.faults() });
    let mut client = node.client().await;
    for i in 0..10 {
        let created = order(&node, json!({ "sku": SKU })).await;
        assert_eq!(created.body["channel"], "sandbox", "order {i}");
        let paid = client.pay(&created.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(view(&node, &created).await["status"], "delivered");
    }
    let metrics = node.metrics().await;
    assert_eq!(metrics.get("edgecard_payment_breaker_state{channel=\"stripe\"}"), Some(&2.0), "{metrics:?}");
    let calls = gateway.counters().api_calls.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(calls, 9, "3 orders × 3 attempts, then the open breaker skips stripe");
    let status = node.status().await;
    assert!(status["payment_channels"].to_string().contains("\"open\""), "{status}");

    // Only stripe for EUR? No route: the default route also falls through. With every channel
    // of a route down, creation is refused with 503 and the reservation released.
    let refused = client.create_order(&json!({ "sku": SKU, "channel": "stripe" })).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(error_code(&refused), "payment_unavailable");
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(client.stock().await, 10, "the refused order's key is back on sale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stripe_callback_dropped_compensation_completes_every_paid_order() {
    let env = TestEnv::new();
    let (gateway, node) = gateway_and_node(&env, 10, &compensation_toml(300), Sandbox::Off).await;
    gateway.set_faults(Faults { drop_callback_rate: 1.0, ..gateway.faults() });
    let mut orders = Vec::new();
    for _ in 0..8 {
        let created = order(&node, json!({ "sku": SKU })).await;
        assert!(gateway.pay_stripe(&gateway.session_of(&created.pay_url)).await.is_empty(), "dropped");
        orders.push(created);
    }
    // One order is never paid: compensation must not deliver it.
    let unpaid = order(&node, json!({ "sku": SKU })).await;
    bounded("compensation", LIMIT, async {
        for created in &orders {
            let v = delivered(&node, created, LIMIT).await;
            assert_eq!(keys_of(&v).len(), 1);
        }
    })
    .await;
    assert_eq!(view(&node, &unpaid).await["status"], "reserved");
    let metrics = node.metrics().await;
    assert_eq!(metrics.get("edgecard_payment_compensated_total{channel=\"stripe\"}"), Some(&8.0), "{metrics:?}");
    // A late webhook for a compensated order is one payment, not two (same session id).
    let session = gateway.session(&gateway.session_of(&orders[0].pay_url)).unwrap();
    gateway.set_faults(Faults::default());
    assert_eq!(gateway.send_stripe_event("checkout.session.completed", &session, "paid").await, vec![200]);
    assert_eq!(node.metric("edgecard_duplicate_payments_total").await, 0.0);
    assert_eq!(node.metric("edgecard_purchases_total").await, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_callbacks_deliver_exactly_once() {
    let env = TestEnv::new();
    let (gateway, node) = gateway_and_node(&env, 10, "", Sandbox::Off).await;
    gateway.set_faults(Faults { duplicate_callbacks: 3, ..gateway.faults() });
    let first = order(&node, json!({ "sku": SKU })).await;
    assert_eq!(gateway.pay_stripe(&gateway.session_of(&first.pay_url)).await, vec![200; 4]);
    assert_eq!(keys_of(&view(&node, &first).await).len(), 1);

    // Async payment: the success arrives before the "completed, unpaid" event it follows.
    gateway.set_faults(Faults::default());
    let second = order(&node, json!({ "sku": SKU })).await;
    let session = gateway.session(&gateway.session_of(&second.pay_url)).unwrap();
    assert_eq!(
        gateway.send_stripe_event("checkout.session.async_payment_succeeded", &session, "paid").await,
        vec![200]
    );
    assert_eq!(gateway.send_stripe_event("checkout.session.completed", &session, "unpaid").await, vec![200]);
    assert_eq!(gateway.send_stripe_event("checkout.session.completed", &session, "paid").await, vec![200]);
    assert_eq!(gateway.send_stripe_event("checkout.session.async_payment_failed", &session, "unpaid").await, vec![200]);
    let v = view(&node, &second).await;
    assert_eq!(v["status"], "delivered");
    assert_eq!(keys_of(&v).len(), 1);
    assert_eq!(node.metric("edgecard_purchases_total").await, 2.0);
    assert_eq!(node.metric("edgecard_duplicate_payments_total").await, 0.0);
    let mut client = node.client().await;
    assert_eq!(client.stock().await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_with_every_callback_dropped_is_completed_by_compensation() {
    let env = TestEnv::new();
    // The base config defines [payments.sandbox]; the fault knob goes into that table.
    let grant = env.grant_file(&make_secrets(5));
    let options = NodeOptions { max_open_per_ip: 1000, ..NodeOptions::with_grants(vec![grant]) };
    let path = env.write_config(&options);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[payments.sandbox]\nenabled = true\n",
        "[payments.sandbox]\nenabled = true\ncallback_failure_rate = 1.0\n",
    );
    assert!(text.contains("callback_failure_rate"));
    std::fs::write(&path, format!("{text}{}", compensation_toml(200))).unwrap();
    let node = NodeProcess::start(&path, &options.env);
    let mut client = node.client().await;
    let mut orders = Vec::new();
    for _ in 0..4 {
        let created = client.reserve(1).await;
        let paid = client.pay(&created.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "reserved", "callback dropped");
        orders.push(created);
    }
    bounded("sandbox compensation", LIMIT, async {
        for created in &orders {
            delivered(&node, created, LIMIT).await;
        }
    })
    .await;
    assert_eq!(node.metric("edgecard_purchases_total").await, 4.0);
}

/// The payment success figure: `N` purchases (default 200, env `EDGECARD_PAYMENT_BENCH_N`)
/// through Stripe on the fake gateway with 20% of API calls failing transiently (10% 5xx, 10%
/// stalls past the 500 ms bound) and 20% of webhooks dropped. Success = delivered in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_success_with_20_percent_transient_gateway_failures() {
    let n: usize = std::env::var("EDGECARD_PAYMENT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let env = TestEnv::new();
    // The breaker counts consecutive failures across all 16 buyers: at a 20% failure rate a run
    // of 5 (0.2^5 ≈ 3e-4 per call) can occur among a run's ~290 calls and then refuses orders for
    // `open_ms` (seen once: 198/200). This test measures recovery from transient failures, so
    // the breaker trips only on a run that random 20% failures practically never make (0.2^8).
    let extra = format!(
        "{}\n[payments.breaker]\nfailure_threshold = 8\nopen_ms = 1000\n[payments.routes]\nUSD = [\"stripe\"]\n",
        compensation_toml(300).replace("[payments.compensation]", "[payments.compensation]\nconcurrency = 32")
    );
    let gateway = FakeGateway::start().await;
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    let toml =
        stripe_toml(&gateway, &ca).replace("create_timeout_ms = 1000", "create_timeout_ms = 500\ncreate_attempts = 5");
    let node = start_node(&env, n + 10, &format!("{toml}{extra}"), Sandbox::Off);
    gateway.set_node(node.api.clone());
    gateway.set_faults(Faults {
        error_rate: 0.10,
        timeout_rate: 0.10,
        stall: Duration::from_millis(1_500),
        drop_callback_rate: 0.20,
        ..Faults::default()
    });

    let started = Instant::now();
    let gateway = std::sync::Arc::new(gateway);
    let node = std::sync::Arc::new(node);
    let mut tasks = tokio::task::JoinSet::new();
    let workers = 16;
    for w in 0..workers {
        let (gateway, node) = (gateway.clone(), node.clone());
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            let mut client = node.client().await;
            for _ in (w..n).step_by(workers) {
                let response = client.create_order(&json!({ "sku": SKU })).await;
                if response.status != 201 {
                    outcomes.push(None);
                    continue;
                }
                let created = Created::from_response(&response);
                gateway.pay_stripe(&gateway.session_of(&created.pay_url)).await;
                outcomes.push(Some(created));
            }
            outcomes
        });
    }
    let mut created = Vec::new();
    let mut create_failed = 0;
    while let Some(joined) = tasks.join_next().await {
        for outcome in joined.unwrap() {
            match outcome {
                Some(c) => created.push(c),
                None => create_failed += 1,
            }
        }
    }
    let deadline = Instant::now() + LIMIT;
    let mut ok = 0;
    for order in &created {
        loop {
            let v = view(&node, order).await;
            if v["status"] == "delivered" {
                ok += 1;
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let rate = ok as f64 / n as f64 * 100.0;
    let counters = gateway.counters();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    println!(
        "payment success: {ok}/{n} = {rate:.2}% in {:.1} s (creation refused: {create_failed}; gateway: {} API calls, {} injected failures, {} webhooks sent, {} dropped, {} queries)",
        started.elapsed().as_secs_f64(),
        counters.api_calls.load(relaxed),
        counters.injected_failures.load(relaxed),
        counters.callbacks_sent.load(relaxed),
        counters.callbacks_dropped.load(relaxed),
        counters.queries.load(relaxed),
    );
    assert!(rate >= 99.5, "payment success {rate:.2}% < 99.5%");
    assert_eq!(node.metric("edgecard_duplicate_payments_total").await, 0.0);
}

/// Runs `edgecard node <command> --config <path>` and waits (bounded) for it to exit; a node
/// that starts instead of refusing is killed and fails the test.
fn run_to_exit(command: &str, path: &std::path::Path) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgecard"))
        .args(["node", command, "--config"])
        .arg(path)
        .env("EDGECARD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("`node {command}` still running after 20 s: {}", String::from_utf8_lossy(&output.stdout));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_stripe_refuses_the_sandbox_unless_told_so_explicitly() {
    let env = TestEnv::new();
    let gateway = FakeGateway::start().await;
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    // The base config enables the sandbox; stripe comes on top, without the explicit yes.
    let (path, _) = write_node_config(&env, 1, &stripe_toml(&gateway, &ca), Sandbox::Off);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[payments.sandbox]\nenabled = false\n", "[payments.sandbox]\nenabled = true\n"),
    )
    .unwrap();
    for command in ["run", "check-config"] {
        let output = run_to_exit(command, &path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "`node {command}` accepted the sandbox beside stripe: {stderr}");
        assert!(stderr.contains("payments.sandbox.enabled"), "{command}: {stderr}");
        assert!(stderr.contains("allow_beside_real_channels = true"), "{command}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // Told so: it starts, and says so to operators and buyers.
    let (path, options) = write_node_config(&env, 1, &stripe_toml(&gateway, &ca), Sandbox::AllowedBeside);
    let checked = run_to_exit("check-config", &path);
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    assert!(String::from_utf8_lossy(&checked.stderr).contains("lab payments are on beside real channels"));
    let node = NodeProcess::start(&path, &options.env);
    for health in [node.admin_get("/healthz").await, node.client().await.send(Request::get("/healthz")).await] {
        assert_eq!(health.status, 200, "{}", health.text());
        assert_eq!(health.json::<Value>().unwrap()["lab_payments"], "beside_real_channels");
    }
    let store = node.client().await.send(Request::get("/")).await;
    assert!(store.text().contains("id=\"lab-payments\""), "the storefront shows the lab notice: {}", store.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_stripe_the_sandbox_is_neither_pickable_nor_a_fallback_outside_its_routes() {
    let env = TestEnv::new();
    // The sandbox is allowed and routed for EUR only; USD has no route of its own.
    let extra = "\n[payments.routes]\nEUR = [\"stripe\", \"sandbox\"]\n";
    let (gateway, node) = gateway_and_node(&env, 5, extra, Sandbox::AllowedBeside).await;
    let mut client = node.client().await;

    // Picked by the buyer for USD: refused, nothing reserved.
    let picked = client.create_order(&json!({ "sku": SKU, "channel": "sandbox" })).await;
    assert_eq!(picked.status, 400, "the sandbox was handed out for USD: {}", picked.text());
    assert_eq!(error_code(&picked), "channel_not_available");
    assert_eq!(client.stock().await, 5);

    // Stripe down: a USD order does not fall through to the sandbox by itself.
    gateway.set_faults(Faults { down: true, ..gateway.faults() });
    let fallen = client.create_order(&json!({ "sku": SKU })).await;
    assert_eq!(fallen.status, 503, "a USD order fell through to the sandbox: {}", fallen.text());
    assert_eq!(error_code(&fallen), "payment_unavailable");
    assert_eq!(client.stock().await, 5, "the refused order's key is back on sale");

    // Where the routes list it, it is the configured fallback, as before.
    let euros = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    assert_eq!(euros.body["channel"], "sandbox", "{}", euros.body);
    let paid = client.pay(&euros.pay_url).await;
    assert_eq!(paid.status, 200, "{}", paid.text());
    assert_eq!(view(&node, &euros).await["status"], "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_paying_at_stripe_the_buyer_returns_to_a_page_with_the_keys() {
    let env = TestEnv::new();
    let (gateway, node) = gateway_and_node(&env, 3, "", Sandbox::Off).await;
    let created = order(&node, json!({ "sku": SKU })).await;
    let session = gateway.session(&gateway.session_of(&created.pay_url)).unwrap();
    for url in [&session.success_url, &session.cancel_url] {
        assert!(url.starts_with(&node.public_url), "back to this node: {url}");
        assert!(!url.contains(&created.token), "the order token went to Stripe: {url}");
    }
    let mut browser = node.client().await;

    // Cancelled at Checkout: back on the order, still payable at Stripe.
    let cancelled = browser.browse(&gateway.stripe_redirect(&session.id, false)).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    assert!(cancelled.text().contains("Awaiting payment"), "{}", cancelled.text());
    assert!(cancelled.text().contains(&created.pay_url), "a way to pay again: {}", cancelled.text());

    // Paid: the webhook, then the browser's redirect.
    assert_eq!(gateway.pay_stripe(&session.id).await, vec![200]);
    let keys = keys_of(&view(&node, &created).await);
    assert_eq!(keys.len(), 1);
    let back = browser.browse(&gateway.stripe_redirect(&session.id, true)).await;
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(back.header("cache-control"), Some("no-store"));
    assert!(back.text().contains(&keys[0]), "the return page shows the key: {}", back.text());
    assert!(!back.text().contains(&created.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_paying_at_epay_the_buyer_returns_to_a_page_with_the_keys() {
    let env = TestEnv::new();
    let gateway = FakeGateway::start().await;
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    let payments = format!(
        "\n[payments]\nextra_ca_file = {:?}\n[payments.epay]\nenabled = true\ngateway_url = \"{}\"\npid = \"{EPAY_PID}\"\nkey = \"{EPAY_KEY}\"\ncurrency = \"EUR\"\n",
        ca.display().to_string(),
        gateway.url
    );
    let node = start_node(&env, 3, &payments, Sandbox::Off);
    gateway.set_node(node.api.clone());
    let created = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    assert_eq!(created.body["channel"], "epay");
    assert!(!created.pay_url.contains(&created.token), "the order token went to the gateway: {}", created.pay_url);

    assert_eq!(gateway.pay_epay(&created.pay_url, true).await, vec![(200, "success".to_string())]);
    let keys = keys_of(&view(&node, &created).await);
    assert_eq!(keys.len(), 1);
    let redirect = gateway.epay_redirect(&created.order_id);
    assert!(redirect.starts_with(&node.public_url), "back to this node: {redirect}");
    let back = node.client().await.browse(&redirect).await;
    assert_eq!(back.status, 200, "{}", back.text());
    assert!(back.text().contains(&keys[0]), "the return page shows the key: {}", back.text());
    assert!(!back.text().contains(&created.token));
}

/// A node taking USD through Stripe and EUR through EPay, both at the fake gateway.
async fn stripe_and_epay_node(env: &TestEnv, keys: usize) -> (FakeGateway, NodeProcess) {
    let gateway = FakeGateway::start().await;
    let ca = gateway.write_ca(&env.path("gateway-ca.pem"));
    let epay = format!(
        "\n[payments.epay]\nenabled = true\ngateway_url = \"{}\"\npid = \"{EPAY_PID}\"\nkey = \"{EPAY_KEY}\"\ncurrency = \"EUR\"\n[payments.routes]\nUSD = [\"stripe\"]\nEUR = [\"epay\"]\n",
        gateway.url
    );
    let node = start_node(env, keys, &format!("{}{epay}", stripe_toml(&gateway, &ca)), Sandbox::Off);
    gateway.set_node(node.api.clone());
    (gateway, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_provider_id_and_a_wrong_channel_callback_are_recorded_and_alarmed() {
    let env = TestEnv::new();
    let (gateway, node) = stripe_and_epay_node(&env, 5).await;
    let mut client = node.client().await;

    // E is paid at EPay.
    let e = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    assert_eq!(gateway.pay_epay(&e.pay_url, true).await, vec![(200, "success".to_string())]);
    assert_eq!(view(&node, &e).await["status"], "delivered");
    let paid_e = gateway.epay_order(&e.order_id).unwrap();

    // F's notify, signed with the merchant key, carries the trade_no that paid E.
    let f = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    let reused = fake_gateway::EpayOrder { out_trade_no: f.order_id.clone(), ..paid_e.clone() };
    let notify = gateway.epay_notify(&reused, "TRADE_SUCCESS", EPAY_KEY);
    for _ in 0..2 {
        assert_eq!(gateway.send_epay_notify(&paid_e.notify_url, &notify, false).await, (200, "success".into()));
    }
    assert_eq!(view(&node, &f).await["status"], "reserved", "nothing delivered for it");
    let reused_metric = "edgecard_payment_unmatched_total{channel=\"epay\",reason=\"provider_txn_reused\"}";
    assert_eq!(node.metric(reused_metric).await, 1.0, "raised once, however often the provider repeats it");

    // A Stripe-signed webhook delivering G, whose payment was opened at EPay.
    let g = order(&node, json!({ "sku": SKU, "currency": "EUR" })).await;
    assert_eq!(g.body["channel"], "epay");
    let session = fake_gateway::Session {
        id: "cs_test_not_for_g".into(),
        order_id: g.order_id.clone(),
        node_id: "eu-1".into(),
        amount_total: 900,
        currency: "eur".into(),
        paid: true,
        success_url: String::new(),
        cancel_url: String::new(),
        expires_at: unix_secs() + 3600,
    };
    let body = gateway.stripe_event("checkout.session.completed", &session, "paid");
    let (status, text) =
        gateway.post_stripe_webhook(&body, &stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &body)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["outcome"], "payment_unmatched", "{text}");
    assert_eq!(view(&node, &g).await["status"], "reserved");
    let wrong_channel = "edgecard_payment_unmatched_total{channel=\"stripe\",reason=\"wrong_channel\"}";
    assert_eq!(node.metric(wrong_channel).await, 1.0);

    assert_eq!(node.metric("edgecard_purchases_total").await, 1.0, "only E's payment delivered");
    let status = node.status().await;
    let mut recorded: Vec<(String, String)> = status["payment_problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["order_id"].as_str().unwrap().to_string(), p["reason"].as_str().unwrap().to_string()))
        .collect();
    recorded.sort();
    let mut expected = vec![
        (f.order_id.clone(), "provider_txn_reused".to_string()),
        (g.order_id.clone(), "wrong_channel".to_string()),
    ];
    expected.sort();
    assert_eq!(recorded, expected, "recorded for the operator: {status}");
    assert_eq!(client.stock().await, 2, "F and G still hold their reservations");
    let log = node.stderr();
    for order in [&f.order_id, &g.order_id] {
        let line = log
            .lines()
            .find(|l| l.contains("paid nothing") && l.contains(order.as_str()))
            .unwrap_or_else(|| panic!("no error log for {order}: {log}"));
        assert!(line.contains("ERROR"), "{line}");
        assert!(!line.contains(&f.token) && !line.contains(&g.token), "{line}");
    }
}
