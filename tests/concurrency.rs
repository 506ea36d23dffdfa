//! A flash sale: many more concurrent buyers than keys, over real HTTPS. No key may be sold twice,
//! every buyer gets either a key or a clean `sold_out`, and nothing fails with a 5xx.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use edgecard::https_client::Request;
use serde_json::{json, Value};
use tokio::sync::Barrier;

const KEYS: usize = 200;
const CONNECTIONS: usize = 50;
const BUYERS_PER_CONNECTION: usize = 10;

#[derive(Debug)]
enum Outcome {
    Delivered { order_id: String, keys: Vec<String> },
    SoldOut,
    Unexpected(String),
}

/// Each buyer has its own address in 198.18.0.0/15, forwarded by the (trusted) loopback proxy.
fn buyer_ip(connection: usize, buyer: usize) -> String {
    let n = connection * BUYERS_PER_CONNECTION + buyer + 1;
    format!("198.18.{}.{}", n / 250, n % 250 + 1)
}

async fn one_buyer(client: &mut Client) -> Outcome {
    let response = client.create_order(&json!({ "sku": SKU, "quantity": 1 })).await;
    match response.status {
        201 => {}
        409 if error_code(&response) == "sold_out" => return Outcome::SoldOut,
        status => return Outcome::Unexpected(format!("create: {status} {}", response.text())),
    }
    let order = Created::from_response(&response);
    let paid = client.pay(&order.pay_url).await;
    if paid.status != 200 || paid.json::<Value>().unwrap()["status"] != "delivered" {
        return Outcome::Unexpected(format!("pay: {} {}", paid.status, paid.text()));
    }
    let fetched = client.fetch(&order.order_id, Some(&order.token)).await;
    if fetched.status != 200 {
        return Outcome::Unexpected(format!("fetch: {} {}", fetched.status, fetched.text()));
    }
    let view: Value = fetched.json().unwrap();
    if view["status"] != "delivered" {
        return Outcome::Unexpected(format!("fetch: not delivered: {view}"));
    }
    Outcome::Delivered { order_id: order.order_id, keys: keys_of(&view) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_buyers_two_hundred_keys() {
    let env = TestEnv::new();
    let secrets = make_secrets(KEYS);
    let options = NodeOptions {
        create_order_limit: (100_000, 100_000),
        other_limits: (100_000, 100_000),
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    };
    let node = env.start_node(&options);
    let granted: HashSet<String> = secrets.iter().cloned().collect();

    let outcomes = bounded("flash sale", Duration::from_secs(120), async {
        let barrier = Arc::new(Barrier::new(CONNECTIONS));
        let mut tasks = Vec::new();
        for connection in 0..CONNECTIONS {
            let mut client = node.client().await;
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut outcomes = Vec::new();
                for buyer in 0..BUYERS_PER_CONNECTION {
                    client.forwarded_for = Some(buyer_ip(connection, buyer));
                    outcomes.push(one_buyer(&mut client).await);
                }
                outcomes
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    })
    .await;
    assert_eq!(outcomes.len(), CONNECTIONS * BUYERS_PER_CONNECTION);

    let unexpected: Vec<&String> =
        outcomes.iter().filter_map(|o| if let Outcome::Unexpected(m) = o { Some(m) } else { None }).collect();
    assert!(
        unexpected.is_empty(),
        "{} unexpected answers, e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );

    let mut owner: BTreeMap<&String, &String> = BTreeMap::new();
    let mut delivered = 0;
    for outcome in &outcomes {
        if let Outcome::Delivered { order_id, keys } = outcome {
            delivered += 1;
            assert_eq!(keys.len(), 1, "order {order_id}: {keys:?}");
            for key in keys {
                assert!(granted.contains(key), "order {order_id} got a key that was never granted");
                if let Some(other) = owner.insert(key, order_id) {
                    panic!("key delivered to two orders: {other} and {order_id}");
                }
            }
        }
    }
    let sold_out = outcomes.iter().filter(|o| matches!(o, Outcome::SoldOut)).count();
    assert_eq!(delivered, KEYS, "every key is sold exactly once");
    assert_eq!(owner.len(), KEYS);
    assert_eq!(sold_out, CONNECTIONS * BUYERS_PER_CONNECTION - KEYS);

    bounded("final checks", Duration::from_secs(30), async {
        let mut client = node.client().await;
        assert_eq!(client.stock().await, 0);
        let late = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(late.status, 409, "{}", late.text());
        assert_eq!(error_code(&late), "sold_out");

        let metrics = node.metrics().await;
        assert_eq!(metrics["edgecard_purchases_total"], KEYS as f64, "{metrics:?}");
        assert_eq!(metrics["edgecard_orders_created_total"], KEYS as f64, "{metrics:?}");
        let text = node.metrics_text().await;
        let samples = parse_metrics(&text);
        let answered = |class: &str| -> f64 {
            samples
                .iter()
                .filter(|(series, _)| series.starts_with("edgecard_http_request_duration_seconds_count{"))
                .filter(|(series, _)| series.contains(&format!("class=\"{class}\"")))
                .map(|(_, n)| n)
                .sum()
        };
        assert!(answered("2xx") >= KEYS as f64, "the node counted its answers by class:\n{text}");
        assert_eq!(answered("5xx"), 0.0, "the node counted 5xx answers:\n{text}");
        let status = node.status().await;
        assert_eq!(status["open_reservations"], 0, "{status}");

        // Every delivered key is still readable by its own order only.
        let sample = outcomes.iter().find_map(|o| match o {
            Outcome::Delivered { order_id, keys } => Some((order_id.clone(), keys.clone())),
            _ => None,
        });
        let (order_id, _) = sample.unwrap();
        let probe = client
            .send(
                Request::get(&format!("/api/v1/orders/{order_id}"))
                    .header("authorization", &format!("Bearer {}", random_hex(16))),
            )
            .await;
        assert_eq!(probe.status, 404);
    })
    .await;
    assert!(!node.stderr().contains("panicked"), "{}", node.stderr());
}
