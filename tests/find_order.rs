//! "Find my order" through a real SMTP server (aiosmtpd) on loopback: the storefront's form mails
//! an address fresh links that open its orders, on this node and, through the coordinator, on
//! the others; an unknown address gets the same answer and no mail; the fourth lookup of an
//! address within the hour is dropped silently; an erased address is found no more.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::coordinator::{start_node, wait_for_stock, Lab, Ports};
use common::smtp::SmtpSink;
use common::*;
use edgecard::https_client::{Request, Response};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);
/// How long "no mail" is waited for: well past the worker's poll (50 ms) and a send.
const QUIET: Duration = Duration::from_secs(3);
const BUYER: &str = "Finder@Example.com";

fn form_post(node: &NodeProcess, path: &str, body: &str) -> Request {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "text/html")
        .header("origin", &node.https_url)
        .header("sec-fetch-site", "same-origin")
        .body(body.as_bytes().to_vec())
}

async fn find(client: &mut Client, node: &NodeProcess, email: &str) -> Response {
    let body = format!("email={}", email.replace('@', "%40"));
    client.send(form_post(node, "/find-order", &body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_my_order_mails_links_that_open_the_orders_and_says_the_same_for_anyone() {
    let sink = SmtpSink::start();
    let env = TestEnv::new();
    let options = NodeOptions::with_grants(vec![env.grant_file(&make_secrets(6))]);
    let node = env.start_node_with(&options, &sink.mail_toml(""));
    let mut client = node.client().await;
    bounded("find my order", LIMIT, async {
        let mut orders = Vec::new();
        for _ in 0..2 {
            let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
            assert_eq!(response.status, 201, "{}", response.text());
            orders.push(Created::from_response(&response));
        }
        assert_eq!(client.pay(&orders[0].pay_url).await.status, 200);
        let keys = keys_of(&client.fetch_ok(&orders[0]).await);
        sink.wait_for(2, LIMIT).await; // the two order-link mails
        let before = sink.received().len();

        let form = client.browse(&format!("{}/find-order", node.https_url)).await;
        assert_eq!(form.status, 200);
        assert!(form.text().contains("name=\"email\""), "{}", form.text());
        let home = client.browse(&format!("{}/", node.https_url)).await.text();
        assert!(home.contains("href=\"/find-order\""), "the storefront links to the page");

        let known = find(&mut client, &node, "  FINDER@example.com ").await;
        assert_eq!(known.status, 200, "{}", known.text());
        let mails = sink.wait_for(before + 2, LIMIT).await.split_off(before);
        assert_eq!(mails.len(), 2, "one mail per order");
        let mut found_ids = Vec::new();
        for mail in &mails {
            assert_eq!(mail.to, vec!["finder@example.com".to_string()]);
            assert!(mail.message_id.contains(".find-order-"), "{}", mail.message_id);
            for order in &orders {
                assert!(!mail.body.contains(&order.token), "a mail carries an order's token");
            }
            let link = mail.link();
            let order = orders.iter().find(|o| link.contains(&o.order_id)).unwrap_or_else(|| panic!("{link}"));
            let page = client.browse(&link).await;
            assert_eq!(page.status, 200, "{}", page.text());
            assert!(page.text().contains(&order.order_id));
            found_ids.push(order.order_id.clone());
        }
        found_ids.sort();
        let mut wanted: Vec<String> = orders.iter().map(|o| o.order_id.clone()).collect();
        wanted.sort();
        assert_eq!(found_ids, wanted, "a link to each order");
        let paid_link = mails.iter().map(|m| m.link()).find(|l| l.contains(&orders[0].order_id)).unwrap();
        let paid_page = client.browse(&paid_link).await.text();
        assert!(keys.iter().all(|k| paid_page.contains(k.as_str())), "the found link shows the delivered keys");

        // An unknown address: the same status and body, and no mail.
        let unknown = find(&mut client, &node, "nobody@example.com").await;
        assert_eq!((unknown.status, unknown.text()), (known.status, known.text()), "the answer tells them apart");
        // The JSON API answers the same way.
        let api = client.send(Request::post_json("/api/v1/find-order", &json!({ "email": "other@example.com" }))).await;
        assert_eq!(api.status, 202, "{}", api.text());
        assert_eq!(api.json::<serde_json::Value>().unwrap(), json!({ "status": "accepted" }));
        let api_junk = client.send(Request::post_json("/api/v1/find-order", &json!({ "email": "junk" }))).await;
        assert_eq!(api_junk.status, 400, "{}", api_junk.text());
        tokio::time::sleep(QUIET).await;
        assert_eq!(sink.received().len(), before + 2, "an unknown address got mail");

        // Junk is told so, and changes nothing.
        let junk = find(&mut client, &node, "not an address").await;
        assert_eq!(junk.status, 400);
        assert!(junk.text().contains("find-order-error"), "{}", junk.text());

        // Two more lookups of the known address are mailed; the fourth in the hour is dropped
        // silently: the same answer, no mail.
        for n in 2..=3 {
            let again = find(&mut client, &node, BUYER).await;
            assert_eq!((again.status, again.text()), (known.status, known.text()));
            sink.wait_for(before + 2 * n, LIMIT).await;
        }
        let fourth = find(&mut client, &node, BUYER).await;
        assert_eq!((fourth.status, fourth.text()), (known.status, known.text()));
        tokio::time::sleep(QUIET).await;
        assert_eq!(sink.received().len(), before + 6, "the fourth lookup within the hour was mailed");
    })
    .await;
    let logs = node.stderr();
    assert!(!logs.to_ascii_lowercase().contains("finder@example.com"), "the address reached the log");
    assert!(!logs.contains("/return/"), "a link reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_address_is_found_no_more() {
    let sink = SmtpSink::start();
    let env = TestEnv::new();
    let options = NodeOptions::with_grants(vec![env.grant_file(&make_secrets(3))]);
    let node = env.start_node_with(&options, &sink.mail_toml(""));
    let mut client = node.client().await;
    bounded("erased", LIMIT, async {
        let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        let order = Created::from_response(&response);
        sink.wait_for(1, LIMIT).await;
        let forget = Request::post_json("/admin/v1/mail/forget", &json!({ "email": BUYER }))
            .header("authorization", &format!("Bearer {ADMIN_TOKEN}"));
        assert_eq!(node.admin.request(forget).await.unwrap().status, 200);
        let answer = find(&mut client, &node, BUYER).await;
        assert_eq!(answer.status, 200);
        tokio::time::sleep(QUIET).await;
        assert_eq!(sink.received().len(), 1, "an erased address was mailed");
        // Not even queued: the index forgot the address with the order.
        let status = Request::get(&format!("/admin/v1/mail?order={}", order.order_id))
            .header("authorization", &format!("Bearer {ADMIN_TOKEN}"));
        let status = node.admin.request(status).await.unwrap();
        assert_eq!(status.status, 200, "{}", status.text());
        assert!(!status.text().contains("find_order"), "a lookup of an erased address was queued: {}", status.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_two_nodes_are_found_through_one_storefront() {
    let sink = SmtpSink::start();
    let lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, 1_000).await;
    lab.import(SKU, &make_secrets(8)).await;
    let mut nodes = Vec::new();
    for (name, region) in [("eu-1", "eu"), ("ap-1", "ap")] {
        let config = lab.add_node(name, region).await;
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&sink.mail_toml(""));
        std::fs::write(&config, text).unwrap();
        lab.allocate(SKU, name, 4).await;
        nodes.push(start_node(&config).await);
    }
    for node in &nodes {
        wait_for_stock(node, 4).await;
    }
    let (eu, ap) = (&nodes[0], &nodes[1]);
    let mut eu_client = eu.client().await;
    let mut ap_client = ap.client().await;
    bounded("find across nodes", LIMIT, async {
        let mut orders = Vec::new();
        for client in [&mut eu_client, &mut ap_client] {
            let response = client.create_order(&json!({ "sku": SKU, "quantity": 1, "email": BUYER })).await;
            assert_eq!(response.status, 201, "{}", response.text());
            orders.push(Created::from_response(&response));
        }
        sink.wait_for(2, LIMIT).await;
        let before = sink.received().len();

        let asked = std::time::Instant::now();
        let known = find(&mut eu_client, eu, BUYER).await;
        assert_eq!(known.status, 200, "{}", known.text());
        let mails = sink.wait_for(before + 2, LIMIT).await.split_off(before);
        assert_eq!(mails.len(), 2, "one mail from each node");
        eprintln!("find my order across two nodes: both mails received {:?} after asking", asked.elapsed());
        for (order, node, client) in [(&orders[0], eu, &mut eu_client), (&orders[1], ap, &mut ap_client)] {
            let mail = mails.iter().find(|m| m.link().contains(&order.order_id)).unwrap_or_else(|| {
                panic!("no link to {} in {:?}", order.order_id, mails.iter().map(|m| m.link()).collect::<Vec<_>>())
            });
            assert_eq!(mail.to, vec!["finder@example.com".to_string()]);
            let link = mail.link();
            assert!(link.starts_with(&node.public_url), "{link} is not on the node holding the order");
            let page = client.browse(&link).await;
            assert_eq!(page.status, 200, "{}", page.text());
            assert!(page.text().contains(&order.order_id));
        }

        let unknown = find(&mut eu_client, eu, "nobody@example.com").await;
        assert_eq!((unknown.status, unknown.text()), (known.status, known.text()));
        tokio::time::sleep(QUIET).await;
        assert_eq!(sink.received().len(), before + 2, "an unknown address got mail");
    })
    .await;
    let coordinator_log = lab.coordinator.logs().to_ascii_lowercase();
    assert!(!coordinator_log.contains("finder@example.com"), "the address reached the coordinator's log");
    for node in &nodes {
        assert!(!node.stderr().to_ascii_lowercase().contains("finder@example.com"), "the address reached a node's log");
    }
}
