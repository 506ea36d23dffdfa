//! A node's data dir restored from an older copy, or wiped, with real processes: the coordinator
//! on its own data dir, a node started from its bundle, QUIC sync with mutual TLS on loopback,
//! buyers over HTTPS.
//!
//! What each test shows: a restored copy never sells a key the ledger knows as taken, whether the
//! coordinator is reachable when it starts or not; `status` raises `node_rolled_back`; the orders
//! the copy lost come back, so their buyers' links work again; a wiped node re-enrols under a new
//! incarnation and sells keys nobody else got.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::coordinator::*;
use common::*;
use serde_json::Value;

const SYNC_LIMIT: Duration = Duration::from_secs(20);

/// A lab with one node `eu-1` holding `granted` keys of [`SKU`] (the pool keeps `spare`).
async fn lab_with_node(granted: u64, spare: u64) -> (Lab, PathBuf, NodeProcess) {
    let lab = Lab::start(Ports::Fixed).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets((granted + spare) as usize)).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", granted).await;
    let node = start_node(&config).await;
    wait_for_stock(&node, granted).await;
    (lab, config, node)
}

fn data_dir(config: &Path) -> PathBuf {
    config.parent().unwrap().join("data")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// One buyer's purchase: its order and the keys it was shown.
struct Bought {
    order: Created,
    keys: Vec<String>,
}

async fn buy(client: &mut Client, count: usize) -> Vec<Bought> {
    let mut bought = Vec::new();
    for _ in 0..count {
        let (order, keys) = client.buy(1).await;
        bought.push(Bought { order, keys });
    }
    bought
}

/// Buys until the node answers something other than 201 (sold out, or waiting for stock), at
/// most `limit` purchases; returns them and the last refusal's code.
async fn buy_until_refused(client: &mut Client, limit: usize) -> (Vec<Bought>, String) {
    let mut bought = Vec::new();
    for _ in 0..limit {
        let response = client.create_order(&serde_json::json!({ "sku": SKU, "quantity": 1 })).await;
        if response.status != 201 {
            return (bought, error_code(&response));
        }
        let order = Created::from_response(&response);
        let paid = client.pay(&order.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        let view = client.fetch_ok(&order).await;
        assert_eq!(view["status"], "delivered", "{view}");
        bought.push(Bought { keys: keys_of(&view), order });
    }
    panic!("the node still sells after {limit} purchases");
}

/// Every key shown to a buyer, with how many buyers saw it; panics naming any key seen twice.
fn assert_no_key_twice(bought: &[&Bought]) {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for b in bought {
        for key in &b.keys {
            if let Some(first) = seen.insert(key, &b.order.order_id) {
                panic!("key {key} sold twice: orders {first} and {}", b.order.order_id);
            }
        }
    }
}

async fn wait_for_alarm(lab: &Lab, kind: &str) -> Value {
    lab.wait_for_status(&format!("a {kind} alarm"), SYNC_LIMIT, |status| {
        status["latest_alarms"].as_array().unwrap().iter().any(|a| a["kind"] == kind)
    })
    .await
}

fn node_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == name).unwrap()
}

/// Waits until the node sells again (its data dir confirmed by the coordinator).
async fn wait_until_selling(node: &NodeProcess) {
    let started = Instant::now();
    loop {
        let confirmed = node.metric("edgecard_sync_confirmed").await;
        if confirmed == 1.0 {
            return;
        }
        assert!(started.elapsed() < SYNC_LIMIT, "node not confirmed\n--- stderr ---\n{}", node.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The buyers whose orders the restored copy lost can open them again, with their keys.
async fn assert_orders_open(client: &mut Client, bought: &[Bought]) {
    for b in bought {
        let view = client.fetch_ok(&b.order).await;
        assert_eq!(view["status"], "delivered", "{view}");
        assert_eq!(keys_of(&view), b.keys, "order {} shows other keys after the restore", b.order.order_id);
    }
}

/// Restored while the coordinator is up: the copy gets back the 20 sales it lost before it sells
/// again, so the rest of the stock goes to new buyers with no key shown twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_data_dir_resells_nothing_and_gets_its_lost_orders_back() {
    let (lab, config, mut node) = lab_with_node(40, 0).await;
    let mut client = node.client().await;
    let before = buy(&mut client, 5).await;
    node.terminate();
    let backup = lab.dir.path().join("eu-1-backup");
    copy_dir(&data_dir(&config), &backup);

    let mut node = start_node(&config).await;
    wait_until_selling(&node).await;
    let mut client = node.client().await;
    let lost = buy(&mut client, 20).await;
    lab.wait_for_status("25 sales in the ledger", SYNC_LIMIT, |s| s["skus"][0]["sold"] == 25).await;
    node.kill9();
    std::fs::remove_dir_all(data_dir(&config)).unwrap();
    copy_dir(&backup, &data_dir(&config));

    let node = start_node(&config).await;
    let status = wait_for_alarm(&lab, "node_rolled_back").await;
    eprintln!("alarm: {}", status["latest_alarms"]);
    let shown = lab.ok(&["status"]).await;
    assert!(shown.contains("node_rolled_back"), "{shown}");
    wait_until_selling(&node).await;
    let mut client = node.client().await;
    assert_orders_open(&mut client, &lost).await;
    let (after, refusal) = buy_until_refused(&mut client, 40).await;
    assert_eq!(refusal, "sold_out");
    assert_eq!(after.len(), 15, "40 keys, 25 sold before the restore");
    assert_no_key_twice(&before.iter().chain(&lost).chain(&after).collect::<Vec<_>>());
    let status = lab.wait_for_status("40 sales in the ledger", SYNC_LIMIT, |s| s["skus"][0]["sold"] == 40).await;
    assert_eq!(node_status(&status, "eu-1")["rolled_back"], false, "the fence is lifted once caught up: {status:#}");
    let alarms: Vec<&Value> = status["latest_alarms"].as_array().unwrap().iter().collect();
    assert!(alarms.iter().all(|a| a["kind"] == "node_rolled_back"), "no other alarm: {alarms:?}");
}

/// Restored while the coordinator is down: the copy sells nothing (503 `node_starting`) until the
/// coordinator is back and has given it what it lost; then no key is shown twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_data_dir_waits_for_the_coordinator_before_selling() {
    let (mut lab, config, mut node) = lab_with_node(30, 0).await;
    node.terminate();
    let backup = lab.dir.path().join("eu-1-backup");
    copy_dir(&data_dir(&config), &backup);

    let mut node = start_node(&config).await;
    wait_until_selling(&node).await;
    let mut client = node.client().await;
    let lost = buy(&mut client, 10).await;
    lab.wait_for_status("10 sales in the ledger", SYNC_LIMIT, |s| s["skus"][0]["sold"] == 10).await;
    node.kill9();
    lab.kill9_coordinator();
    std::fs::remove_dir_all(data_dir(&config)).unwrap();
    copy_dir(&backup, &data_dir(&config));

    let node = start_node(&config).await;
    let health = node.admin_get("/healthz").await;
    assert_eq!(health.status, 503, "a node waiting for the coordinator is not ready for buyers");
    assert_eq!(health.json::<Value>().unwrap()["status"], "starting");
    let mut client = node.client().await;
    for _ in 0..5 {
        let response = client.create_order(&serde_json::json!({ "sku": SKU, "quantity": 1 })).await;
        assert_eq!(response.status, 503, "a restarted node sold before the coordinator confirmed it");
        assert_eq!(error_code(&response), "node_starting");
        assert!(response.header("retry-after").is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(node.metric("edgecard_sync_confirmed").await, 0.0);

    lab.restart_coordinator().await;
    wait_until_selling(&node).await;
    wait_for_alarm(&lab, "node_rolled_back").await;
    assert_eq!(node.admin_get("/healthz").await.status, 200);
    let mut client = node.client().await;
    assert_orders_open(&mut client, &lost).await;
    let (after, refusal) = buy_until_refused(&mut client, 30).await;
    assert_eq!(refusal, "sold_out");
    assert_eq!(after.len(), 20);
    assert_no_key_twice(&lost.iter().chain(&after).collect::<Vec<_>>());
}

/// A wiped data dir: the node comes back under a new incarnation, the old dir's slice is reclaimed
/// (its take window quarantined), and keys allocated afresh sell to new buyers only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_re_enrols_under_a_new_incarnation() {
    let (lab, config, mut node) = lab_with_node(10, 10).await;
    let mut client = node.client().await;
    let before = buy(&mut client, 4).await;
    lab.wait_for_status("4 sales in the ledger", SYNC_LIMIT, |s| s["skus"][0]["sold"] == 4).await;
    let first = node_status(&lab.status().await, "eu-1")["incarnation"].clone();
    node.kill9();
    std::fs::remove_dir_all(data_dir(&config)).unwrap();

    let node = start_node(&config).await;
    let status = wait_for_alarm(&lab, "node_replaced").await;
    assert_ne!(node_status(&status, "eu-1")["incarnation"], first, "{status:#}");
    let slices = lab.slices().await;
    assert!(slices.iter().all(|s| s["state"]["state"] == "reclaimed"), "the old dir's slice is reclaimed: {slices:?}");
    wait_until_selling(&node).await;
    let pool = lab.status().await["skus"][0]["pool"].as_u64().unwrap();
    assert!(pool >= 10, "the spare keys stay in the pool: {pool}");
    lab.allocate(SKU, "eu-1", 10).await;
    wait_for_stock(&node, 10).await;
    let mut client = node.client().await;
    let after = buy(&mut client, 10).await;
    assert_no_key_twice(&before.iter().chain(&after).collect::<Vec<_>>());
    lab.wait_for_status("14 sales in the ledger", SYNC_LIMIT, |s| s["skus"][0]["sold"] == 14).await;
}
