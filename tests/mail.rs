//! Order mail through a real SMTP server (aiosmtpd) on loopback: a purchase with an address gets
//! its order link (and, where the merchant opts in, its keys), the link opens the order in a
//! browser, a refusing server is retried with the same Message-ID, a dead server never slows a
//! purchase, and the merchant can erase an address.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::smtp::SmtpSink;
use common::*;
use edgecard::https_client::Request;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);
const BUYER: &str = "Buyer@Example.com";

async fn mail_status(node: &NodeProcess, order_id: &str) -> Vec<Value> {
    let request = Request::get(&format!("/admin/v1/mail?order={order_id}"))
        .header("authorization", &format!("Bearer {ADMIN_TOKEN}"));
    let response = node.admin.request(request).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let body: Value = response.json().unwrap();
    body["mails"].as_array().unwrap().clone()
}

async fn wait_for_status(node: &NodeProcess, order_id: &str, kind: &str, wanted: &str) -> Value {
    let start = Instant::now();
    loop {
        let mails = mail_status(node, order_id).await;
        if let Some(mail) = mails.iter().find(|m| m["kind"] == kind && m["status"] == wanted) {
            return mail.clone();
        }
        assert!(start.elapsed() < LIMIT, "{kind} mail of {order_id} never {wanted}: {mails:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_node(env: &TestEnv, sink_toml: &str) -> NodeProcess {
    let options = NodeOptions::with_grants(vec![env.grant_file(&make_secrets(6))]);
    env.start_node_with(&options, sink_toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_with_an_address_gets_its_link_and_keys_by_mail() {
    let sink = SmtpSink::start();
    let env = TestEnv::new();
    let node = start_node(&env, &sink.mail_toml("include_keys = true"));
    let mut client = node.client().await;
    bounded("mail", LIMIT, async {
        // Without an address: no mail at all.
        let (_, _) = client.buy(1).await;
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 2, "email": BUYER })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        let order = Created::from_response(&response);
        let link_mail = sink.wait_for(1, LIMIT).await.remove(0);
        assert_eq!(link_mail.to, vec!["buyer@example.com".to_string()]);
        assert_eq!(link_mail.from, "orders@shop.example");
        assert!(link_mail.subject.contains(&order.order_id), "{}", link_mail.subject);
        assert!(link_mail.body.contains("Game card × 2"), "{}", link_mail.body);
        assert!(!link_mail.body.contains(&order.token), "the mail carries the order's token");
        assert_eq!(link_mail.message_id, format!("<{}.order-link@shop.example>", order.order_id));
        // The link opens the order's page in a browser: reserved, then delivered with its keys.
        let link = link_mail.link();
        assert!(link.starts_with(&format!("{}/order/{}/return/", node.public_url, order.order_id)), "{link}");
        let page = client.browse(&link).await;
        assert_eq!(page.status, 200, "{}", page.text());
        assert!(page.text().contains(&order.order_id));

        assert_eq!(client.pay(&order.pay_url).await.status, 200);
        let keys = keys_of(&client.fetch_ok(&order).await);
        assert_eq!(keys.len(), 2);
        let mails = sink.wait_for(2, LIMIT).await;
        assert_eq!(mails.len(), 2, "one link mail and one keys mail, nothing for the order without an address");
        let keys_mail = &mails[1];
        assert_eq!(keys_mail.message_id, format!("<{}.keys@shop.example>", order.order_id));
        for key in &keys {
            assert!(keys_mail.body.contains(key.as_str()), "a key is missing from the keys mail");
        }
        let page = client.browse(&link).await.text();
        for key in &keys {
            assert!(page.contains(key.as_str()), "the mailed link does not show the delivered keys");
        }
        // Status per order, and metrics.
        let link_status = wait_for_status(&node, &order.order_id, "order_link", "sent").await;
        assert_eq!(link_status["attempts"], 1);
        wait_for_status(&node, &order.order_id, "keys", "sent").await;
        let metrics = node.metrics().await;
        let sent = |kind: &str| {
            metrics
                .iter()
                .find(|(name, _)| {
                    name.starts_with("edgecard_mail_finished_total")
                        && name.contains(&format!("kind=\"{kind}\""))
                        && name.contains("status=\"sent\"")
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(sent("order_link"), Some(1.0), "{metrics:?}");
        assert_eq!(sent("keys"), Some(1.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_server_is_retried_with_the_same_message_id() {
    let sink = SmtpSink::start();
    sink.fail_next(2);
    let env = TestEnv::new();
    let node = start_node(&env, &sink.mail_toml("default_language = \"zh-CN\""));
    let mut client = node.client().await;
    bounded("retries", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        let order = Created::from_response(&response);
        let mail = sink.wait_for(1, LIMIT).await.remove(0);
        let refused = sink.refused();
        assert_eq!(refused.len(), 2, "two attempts refused before the third was taken");
        for attempt in &refused {
            assert_eq!(attempt.message_id, mail.message_id, "a resend must carry the same Message-ID");
        }
        assert!(mail.body.contains("订单页面"), "the API's orders use the configured language: {}", mail.body);
        let status = wait_for_status(&node, &order.order_id, "order_link", "sent").await;
        assert_eq!(status["attempts"], 3);
        assert!(node.metric("edgecard_mail_retries_total").await >= 2.0);
        assert!(sink.received().len() == 1, "sent once it was taken");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_never_slows_a_purchase() {
    // Accepts connections (the kernel does) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mail_toml = format!(
        "[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\ntls = \"none\"\nfrom = \"orders@shop.example\"\npoll_ms = 50\ntimeout_secs = 1\nfirst_retry_secs = 1\nmax_retry_secs = 1\nmax_attempts = 2\n"
    );
    let env = TestEnv::new();
    let node = start_node(&env, &mail_toml);
    let mut client = node.client().await;
    bounded("silent server", LIMIT, async {
        let mut orders = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
            assert_eq!(response.status, 201, "{}", response.text());
            assert!(start.elapsed() < Duration::from_millis(900), "a purchase waited {:?}", start.elapsed());
            orders.push(Created::from_response(&response));
        }
        let failed = wait_for_status(&node, &orders[0].order_id, "order_link", "failed").await;
        assert_eq!(failed["attempts"], 2);
        assert_eq!(failed["last_error"], "timeout");
    })
    .await;
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_erases_an_address() {
    let sink = SmtpSink::start();
    sink.fail_next(1_000);
    let env = TestEnv::new();
    let node = start_node(&env, &sink.mail_toml(""));
    let mut client = node.client().await;
    bounded("erasure", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        let order = Created::from_response(&response);
        wait_for_status(&node, &order.order_id, "order_link", "retrying").await;
        let forget = |email: &str| {
            Request::post_json("/admin/v1/mail/forget", &json!({ "email": email }))
                .header("authorization", &format!("Bearer {ADMIN_TOKEN}"))
        };
        // Through the CLI, which speaks only to the node's admin API.
        let admin_url = node.admin_url.clone();
        let cli = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_edgecard"))
                .args(["node", "forget-email", "BUYER@example.com", "--admin-url", &admin_url])
                .env("EDGECARD_NODE_ADMIN_TOKEN", ADMIN_TOKEN)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
        assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), "address erased from 1 order(s)");
        assert!(mail_status(&node, &order.order_id).await.is_empty(), "its queued mail is dropped");
        let again = node.admin.request(forget(BUYER)).await.unwrap();
        assert_eq!(again.json::<Value>().unwrap()["orders"], 0, "the address is gone");
        let bad = node.admin.request(forget("no address")).await.unwrap();
        assert_eq!(bad.status, 400);
        let unauthorized =
            node.admin.request(Request::post_json("/admin/v1/mail/forget", &json!({ "email": BUYER }))).await.unwrap();
        assert_eq!(unauthorized.status, 401);
        // The buyer's order lives on; only the address went.
        client.fetch_ok(&order).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_mail_survives_a_crash() {
    let sink = SmtpSink::start();
    sink.fail_next(1_000);
    let env = TestEnv::new();
    let mut node = start_node(&env, &sink.mail_toml(""));
    let mut client = node.client().await;
    let order = bounded("order", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        Created::from_response(&response)
    })
    .await;
    // The 201 means the order and its mail are durable: kill -9 at once, before any mail went.
    node.kill9();
    assert!(sink.received().is_empty());
    sink.fail_next(0);
    let config = node.config.clone();
    let node = NodeProcess::start(&config, &[]);
    bounded("mail after restart", LIMIT, async {
        let mail = sink.wait_for(1, LIMIT).await.remove(0);
        assert_eq!(mail.message_id, format!("<{}.order-link@shop.example>", order.order_id));
        for refused in sink.refused() {
            assert_eq!(refused.message_id, mail.message_id, "the same mail before and after the crash");
        }
        wait_for_status(&node, &order.order_id, "order_link", "sent").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_erased_once_their_retention_is_over() {
    let sink = SmtpSink::start();
    let env = TestEnv::new();
    let node = start_node(&env, &sink.mail_toml("keep_email_days = 0"));
    let mut client = node.client().await;
    bounded("retention", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        let order = Created::from_response(&response);
        sink.wait_for(1, LIMIT).await;
        let start = Instant::now();
        while !mail_status(&node, &order.order_id).await.is_empty() {
            assert!(start.elapsed() < LIMIT, "the sent mail's record was never dropped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let forget = Request::post_json("/admin/v1/mail/forget", &json!({ "email": BUYER }))
            .header("authorization", &format!("Bearer {ADMIN_TOKEN}"));
        let response = node.admin.request(forget).await.unwrap();
        assert_eq!(response.json::<Value>().unwrap()["orders"], 0, "the address is already gone from the order");
        client.fetch_ok(&order).await;
    })
    .await;
}

fn starttls_toml(port: u16, ca_file: Option<&std::path::Path>) -> String {
    let ca = ca_file.map(|p| format!("ca_file = {:?}\n", p.display().to_string())).unwrap_or_default();
    format!(
        "[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\nfrom = \"orders@shop.example\"\npoll_ms = 100\nfirst_retry_secs = 1\nmax_retry_secs = 1\n{ca}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_over_starttls_to_a_relay_it_trusts() {
    let sink = SmtpSink::start_tls();
    let env = TestEnv::new();
    let node = start_node(&env, &starttls_toml(sink.port, Some(&sink.ca_pem())));
    let mut client = node.client().await;
    bounded("starttls", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        let order = Created::from_response(&response);
        let mail = sink.wait_for(1, LIMIT).await.remove(0);
        assert!(mail.tls, "the mail went in clear");
        assert!(mail.subject.contains(&order.order_id));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_goes_in_clear_or_to_an_untrusted_relay() {
    // STARTTLS is the default: a server that does not offer it gets nothing, nor does one whose
    // certificate the node does not trust.
    let plain = SmtpSink::start();
    let untrusted = SmtpSink::start_tls();
    for (sink, what) in [(&plain, "no STARTTLS"), (&untrusted, "untrusted certificate")] {
        let env = TestEnv::new();
        let node = start_node(&env, &starttls_toml(sink.port, None));
        let mut client = node.client().await;
        bounded(what, LIMIT, async {
            let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
            let order = Created::from_response(&response);
            let retrying = wait_for_status(&node, &order.order_id, "order_link", "retrying").await;
            assert!(retrying["last_error"].is_string(), "{what}: {retrying}");
            assert!(sink.received().is_empty() && sink.refused().is_empty(), "{what}: a mail went out");
        })
        .await;
    }
}
