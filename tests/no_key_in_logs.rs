//! Secrets stay secret: with logging at its most verbose, a node that installs grants, sells keys
//! and serves lookups never writes a card key, an order token or its admin token to its output;
//! nor do a node and its coordinator that refund orders (asked through the operator CLI, carried
//! over the sync link, reported back to the ledger).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::coordinator::*;
use common::*;
use edgecard::https_client::Request;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// Runs a full shop session on a node started with `env_vars`, stops it with SIGTERM, and checks
/// its stdout and stderr. Returns the captured stderr.
async fn session(log_env: &[(&str, &str)]) -> String {
    let env = TestEnv::new();
    let file_secrets = make_secrets(8);
    let admin_secrets = make_secrets(4);
    let options = NodeOptions {
        env: log_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..NodeOptions::with_grants(vec![env.grant_file(&file_secrets)])
    };
    let mut node = env.start_node(&options);
    let mut tokens = Vec::new();
    let mut sold = Vec::new();

    bounded("shop session", LIMIT, async {
        // A grant over the admin API: the keys travel in the request body.
        let grant = env.grant("eu-1", 2, 101, &admin_secrets);
        let response = node.install_grant(&grant.to_bytes().unwrap()).await;
        assert_eq!(response.status, 200, "{}", response.text());

        let mut client = node.client().await;
        assert_eq!(client.stock().await, 12);
        for quantity in [1, 3, 2, 1] {
            let (order, keys) = client.buy(quantity).await;
            tokens.push(order.token.clone());
            sold.extend(keys);
            // A second payment, and lookups with right, wrong and missing tokens.
            assert_eq!(client.pay(&order.pay_url).await.status, 200);
            client.fetch_ok(&order).await;
            assert_eq!(client.fetch(&order.order_id, Some(&random_hex(16))).await.status, 404);
            assert_eq!(client.fetch(&order.order_id, None).await.status, 401);
        }
        // An order left unpaid, one refused, and a forged callback.
        let unpaid = client.reserve(1).await;
        tokens.push(unpaid.token.clone());
        client.fetch_ok(&unpaid).await;
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 0 })).await;
        assert_eq!(response.status, 400);
        let forged = Request::post("/api/v1/payments/sandbox/callback")
            .header("content-type", "application/json")
            .header("edgecard-sandbox-signature", &format!("t={},v1={}", unix_secs(), random_hex(32)))
            .body(
                json!({ "order_id": unpaid.order_id, "txn_id": "x", "amount_minor": PRICE_MINOR,
                        "currency": "USD", "status": "succeeded" })
                .to_string(),
            );
        assert_eq!(client.send(forged).await.status, 400);
        // Admin reads.
        node.status().await;
        let metrics = node.metrics_text().await;
        for secret in file_secrets.iter().chain(&admin_secrets) {
            assert!(!metrics.contains(secret.as_str()), "a key appears in /metrics");
        }
        for token in &tokens {
            assert!(!metrics.contains(token.as_str()), "an order token appears in /metrics");
        }
    })
    .await;
    assert_eq!(sold.len(), 7);

    let status = node.terminate();
    assert!(status.success(), "node exited with {status}: {}", node.stderr());
    let stderr = node.stderr();
    let stdout = node.stdout();
    eprintln!("captured {} bytes of stderr, {} lines", stderr.len(), stderr.lines().count());
    if std::env::var_os("SHOW_NODE_LOG").is_some() {
        eprintln!("{stderr}");
    }
    assert!(stderr.contains("order reserved"), "the order log is missing: {stderr}");
    assert!(stderr.contains("node stopped"), "the node did not shut down cleanly: {stderr}");
    for (what, output) in [("stderr", &stderr), ("stdout", &stdout)] {
        for secret in file_secrets.iter().chain(&admin_secrets) {
            let state = if sold.contains(secret) { "a sold" } else { "an unsold" };
            for (form, needle) in spellings(secret.as_bytes()) {
                if let Some(line) = output.lines().find(|line| line.contains(&needle)) {
                    panic!(
                        "{state} key appears ({form}) in the node's {what} with {log_env:?}, e.g.:\n{}",
                        excerpt(line, &needle)
                    );
                }
            }
        }
        for token in &tokens {
            let raw = hex::decode(token).unwrap();
            for (form, needle) in spellings(token.as_bytes()).into_iter().chain(spellings(&raw).into_iter().skip(1)) {
                assert!(!output.contains(&needle), "an order token appears ({form}) in the node's {what}");
            }
        }
        for (form, needle) in spellings(ADMIN_TOKEN.as_bytes()) {
            assert!(!output.contains(&needle), "the admin token appears ({form}) in the node's {what}");
        }
    }
    stderr
}

/// The ways a secret's bytes show up in log output: as text, as hex, and as the `Debug` of a
/// byte slice (`[75, 69, 89, ...]`), which is how storage layers print keys and values.
fn spellings(bytes: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("as text", String::from_utf8_lossy(bytes).into_owned()),
        ("as hex", hex::encode(bytes)),
        ("as a byte list", bytes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")),
    ]
}

/// A short piece of `line` around `needle`, with the needle itself masked.
fn excerpt(line: &str, needle: &str) -> String {
    let at = line.find(needle).unwrap_or(0);
    let start = line[..at].char_indices().rev().nth(120).map_or(0, |(i, _)| i);
    format!("...{}<secret>...", &line[start..at])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_keys_or_tokens() {
    let stderr = session(&[("EDGECARD_LOG", "trace")]).await;
    assert!(stderr.contains("TRACE"), "logging was not at trace level");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_hold_no_keys_or_tokens() {
    let stderr = session(&[("EDGECARD_LOG", "debug")]).await;
    assert!(stderr.contains("DEBUG"), "logging was not at debug level");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_trace_logs_hold_no_keys_or_tokens() {
    let stderr = session(&[("EDGECARD_LOG", "trace"), ("EDGECARD_LOG_FORMAT", "json")]).await;
    let first = stderr.lines().next().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(parsed["level"].is_string(), "{first}");
    assert!(stderr.contains("\"level\":\"TRACE\""), "logging was not at trace level");
}

/// Every spelling of every secret in `secrets` that appears in `output`, as (what, form).
fn leaks<'a>(output: &str, secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    for (what, bytes) in secrets {
        for (form, needle) in spellings(bytes) {
            if output.contains(&needle) {
                found.push((what.to_string(), form));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_logs_hold_no_keys_or_tokens() {
    let trace = [("EDGECARD_LOG", "trace")];
    let lab = Lab::start_with_env(Ports::Any, &trace).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    let secrets = make_secrets(4);
    lab.import(SKU, &secrets).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", 4).await;
    let env: Vec<(String, String)> = trace.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let node_config = config.clone();
    let mut node = blocking(move || NodeProcess::start(&node_config, &env)).await;
    wait_for_stock(&node, 4).await;
    let mut client = node.client().await;
    let mut tokens = Vec::new();
    let mut refunded = Vec::new();
    for _ in 0..2 {
        let (order, keys) = client.buy(1).await;
        assert_eq!(keys.len(), 1);
        tokens.push(order.token.clone());
        refunded.push(order);
    }
    bounded("refunds", LIMIT, async {
        for order in &refunded {
            lab.wait_for_ledger("the sale", LIMIT, |o| {
                o.iter().any(|o| o["order_id"] == order.order_id && o["status"] == "delivered")
            })
            .await;
            lab.ok(&["orders", "refund", &order.order_id, "--reason", "log test"]).await;
            lab.ok(&["orders", "refund", &order.order_id]).await;
        }
        for order in &refunded {
            lab.wait_for_ledger("the refund", LIMIT, |o| {
                o.iter().any(|o| o["order_id"] == order.order_id && o["status"] == "refunded")
            })
            .await;
            assert_eq!(client.fetch_ok(order).await["status"], "refunded");
        }
    })
    .await;
    let status = node.terminate();
    assert!(status.success(), "node exited with {status}: {}", node.stderr());
    let node_log = format!("{}{}", node.stdout(), node.stderr());
    let coordinator_log = lab.coordinator.logs();
    assert!(
        node_log.contains("refund requested") && node_log.contains("TRACE"),
        "refund logs at trace level are missing"
    );
    for (who, log) in [("node", &node_log), ("coordinator", &coordinator_log)] {
        let secrets = secrets.iter().map(|s| ("a key", s.as_bytes()));
        let tokens = tokens.iter().map(|t| ("an order token", t.as_bytes()));
        let admin = [
            ("the node's admin token", ADMIN_TOKEN.as_bytes()),
            ("the coordinator's admin token", lab.token.as_bytes()),
        ];
        let found = leaks(log, secrets.chain(tokens).chain(admin));
        assert!(found.is_empty(), "the {who}'s log holds {found:?}");
    }
}

/// Order mail at trace level, with the merchant's opt-in to mailing keys and a server that
/// refuses the first attempt, then "find my order" for the address (and an unknown one) through
/// the storefront: neither the keys, the order tokens, the mailed links' credentials nor the
/// buyer's address reach the node's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_logs_hold_no_keys_tokens_or_addresses() {
    let sink = common::smtp::SmtpSink::start();
    sink.fail_next(1);
    let env = TestEnv::new();
    let secrets = make_secrets(4);
    let options = NodeOptions {
        env: vec![("EDGECARD_LOG".into(), "trace".into())],
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    };
    let mut node = env.start_node_with(&options, &sink.mail_toml("include_keys = true"));
    let address = "mail.buyer@example.com";
    let mut tokens = Vec::new();
    let mut links = Vec::new();
    bounded("mail session", LIMIT, async {
        let mut client = node.client().await;
        for quantity in [1, 2] {
            let response = client.create_order(&json!({ "sku": SKU, "quantity": quantity, "email": address })).await;
            assert_eq!(response.status, 201, "{}", response.text());
            let order = common::Created::from_response(&response);
            assert_eq!(client.pay(&order.pay_url).await.status, 200);
            tokens.push(order.token);
        }
        sink.wait_for(4, LIMIT).await;
        for email in ["Mail.Buyer%40example.com", "nobody%40example.com"] {
            let form = edgecard::https_client::Request::post("/find-order")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("origin", &node.https_url)
                .header("sec-fetch-site", "same-origin")
                .body(format!("email={email}").into_bytes());
            assert_eq!(client.send(form).await.status, 200);
        }
        let mails = sink.wait_for(6, LIMIT).await;
        assert!(mails[4..].iter().all(|m| m.message_id.contains("find-order")), "the find-my-order mails");
        assert_eq!(sink.refused().len(), 1, "the failure path ran");
        for mail in &mails {
            let link = mail.link();
            links.push(link.rsplit('/').next().unwrap().to_string());
        }
    })
    .await;
    let status = node.terminate();
    assert!(status.success(), "node exited with {status}: {}", node.stderr());
    let log = format!("{}{}", node.stdout(), node.stderr());
    assert!(
        log.contains("mail sent")
            && log.contains("will retry")
            && log.contains("TRACE")
            && log.contains("find my order: mails queued"),
        "mail logs at trace level are missing"
    );
    let keys = secrets.iter().map(|s| ("a key", s.as_bytes()));
    let tokens = tokens.iter().map(|t| ("an order token", t.as_bytes()));
    let links = links.iter().map(|l| ("a mailed link's credential", l.as_bytes()));
    let found = leaks(&log, keys.chain(tokens).chain(links).chain([("the buyer's address", address.as_bytes())]));
    assert!(found.is_empty(), "the node's log holds {found:?}");
}
