//! Leases and safe rebalancing end to end, with real processes: `edgecard coordinator run`, nodes
//! from the bundles `edgecard nodes add` writes, syncing over QUIC with mutual TLS on loopback
//! (through a UDP relay the test can cut), buyers over HTTPS, and the operator CLI as a child
//! process.
//!
//! What each test shows:
//! - a move of 100 keys between two nodes while buyers hammer both sells no key twice, and the
//!   moved keys sell at the recipient;
//! - a drain stops the node selling, returns its available keys to the pool at once, leaves keys
//!   under open reservations with the node until those end (paid: delivered; expired: released),
//!   and the slice ends closed;
//! - a node cut off past its lease sells at most its take window, then nothing; the coordinator
//!   reclaims the provably unsold keys (which then sell elsewhere) and quarantines the rest; when
//!   the node is back, its sales land in the ledger without alarms, it releases what it holds,
//!   and the slice ends closed with nothing quarantined.
//!
//! Every test checks that no key id is in two ledger orders, no key reached two buyers, the
//! ledger's key ids are exactly the keys each buyer got, there is no alarm, and the keys add up:
//! pool + unsold + sold + quarantined + written off = imported.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/udp_relay.rs"]
mod udp_relay;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::coordinator::*;
use common::*;
use parking_lot::Mutex;
use serde_json::{json, Value};
use udp_relay::UdpRelay;

/// Bound on orders reaching the ledger, stock reaching a node, a layout step completing.
const SYNC_LIMIT: Duration = Duration::from_secs(30);

/// Key ids of the imported secrets (the import numbers them in file order).
struct KeyIds(HashMap<String, u64>);

impl KeyIds {
    fn new(secrets: &[String], import_report: &Value) -> KeyIds {
        let first = import_report["first_key_id"].as_u64().unwrap();
        KeyIds(secrets.iter().enumerate().map(|(i, s)| (s.clone(), first + i as u64)).collect())
    }

    fn of(&self, secret: &str) -> u64 {
        *self.0.get(secret).unwrap_or_else(|| panic!("a buyer got a key that was never imported"))
    }

    fn of_all(&self, secrets: &[String]) -> BTreeSet<u64> {
        secrets.iter().map(|s| self.of(s)).collect()
    }
}

/// One purchase as its buyer saw it.
#[derive(Clone, Debug)]
struct Bought {
    order_id: String,
    node: String,
    quantity: u32,
    keys: Vec<String>,
}

/// What one purchase attempt came to.
enum Attempt {
    Bought(Bought),
    /// 409 `sold_out`: nothing the node may sell.
    SoldOut,
    /// 503 `stock_syncing` (with `Retry-After`): stock is there, but the take window is full
    /// until the coordinator acknowledges recent sales.
    Syncing,
}

/// One buyer connection to a node: create order → pay through the sandbox link → fetch the keys.
struct Buyer {
    node: String,
    client: Client,
}

impl Buyer {
    async fn new(name: &str, node: &NodeProcess) -> Buyer {
        Buyer { node: name.to_string(), client: node.client().await }
    }

    async fn try_buy(&mut self, quantity: u32) -> Attempt {
        let response = self.client.create_order(&json!({ "sku": SKU, "quantity": quantity })).await;
        if response.status == 409 {
            assert_eq!(error_code(&response), "sold_out", "{}", response.text());
            return Attempt::SoldOut;
        }
        if response.status == 503 && error_code(&response) == "stock_syncing" {
            assert!(response.header("retry-after").is_some(), "503 without Retry-After: {}", response.text());
            return Attempt::Syncing;
        }
        assert_eq!(response.status, 201, "create order on {}: {}", self.node, response.text());
        let order = Created::from_response(&response);
        let paid = self.client.pay(&order.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered", "pay on {}: {}", self.node, paid.text());
        let view = self.client.fetch_ok(&order).await;
        assert_eq!(view["status"], "delivered", "{view}");
        let keys = keys_of(&view);
        assert_eq!(keys.len(), quantity as usize, "{view}");
        Attempt::Bought(Bought { order_id: order.order_id, node: self.node.clone(), quantity, keys })
    }

    async fn buy(&mut self, quantity: u32) -> Bought {
        match self.try_buy(quantity).await {
            Attempt::Bought(bought) => bought,
            Attempt::SoldOut => panic!("{} is sold out", self.node),
            Attempt::Syncing => panic!("{} answered stock_syncing", self.node),
        }
    }

    /// Creates an order and leaves it unpaid.
    async fn reserve(&mut self, quantity: u32) -> Created {
        self.client.reserve(quantity).await
    }
}

/// The key runs of a slice from `slices list --json`, inclusive.
fn runs(slice: &Value) -> Vec<(u64, u64)> {
    slice["key_runs"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect()
}

fn in_runs(runs: &[(u64, u64)], id: u64) -> bool {
    runs.iter().any(|(lo, hi)| (*lo..=*hi).contains(&id))
}

fn key_count(slice: &Value) -> u64 {
    runs(slice).iter().map(|(lo, hi)| hi - lo + 1).sum()
}

fn slice_id(slice: &Value) -> u64 {
    slice["slice_id"].as_u64().unwrap()
}

/// `state` of a slice in `slices list --json` (`{"state": "closed", ...}`).
fn list_state(slice: &Value) -> &str {
    slice["state"]["state"].as_str().unwrap()
}

fn find_slice(slices: &[Value], id: u64) -> Value {
    slices.iter().find(|s| slice_id(s) == id).unwrap_or_else(|| panic!("no slice {id} in {slices:#?}")).clone()
}

/// The slices of `node`, lowest id first.
fn slices_of(slices: &[Value], node: &str) -> Vec<Value> {
    let mut of: Vec<Value> = slices.iter().filter(|s| s["node"] == node).cloned().collect();
    of.sort_by_key(slice_id);
    of
}

/// The slice `id` as the coordinator's `status --json` lists it under `leases` (closed slices
/// are not listed).
fn lease(status: &Value, id: u64) -> Option<Value> {
    status["leases"].as_array().unwrap().iter().find(|l| l["slice_id"] == id).cloned()
}

fn sku_status(status: &Value) -> Value {
    status["skus"].as_array().unwrap().iter().find(|s| s["sku"] == SKU).unwrap().clone()
}

fn pool(status: &Value) -> u64 {
    sku_status(status)["pool"].as_u64().unwrap()
}

fn moves_in_flight(status: &Value) -> usize {
    status["moves_in_flight"].as_array().unwrap().len()
}

/// The slice `id` in a node's `/admin/v1/status`.
fn node_slice(node_status: &Value, id: u64) -> Option<Value> {
    node_status["slices"].as_array().unwrap().iter().find(|s| s["slice_id"] == id).cloned()
}

/// Polls a node's `/admin/v1/status` until `done` holds, at most `limit`.
async fn wait_for_node(node: &NodeProcess, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let status = node.status().await;
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < limit, "{what}: not reached within {limit:?}\nnode status: {status:#}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Whether every purchase is in the ledger as delivered.
fn all_delivered(orders: &[Value], bought: &[Bought]) -> bool {
    let delivered: HashSet<&str> =
        orders.iter().filter(|o| o["status"] == "delivered").map(|o| o["order_id"].as_str().unwrap()).collect();
    bought.iter().all(|b| delivered.contains(b.order_id.as_str()))
}

/// The ledger agrees with the buyers: no order twice, no key id in two orders, exactly the
/// purchases are delivered (each under its node, with as many key ids as keys, and those ids are
/// the ids of the very secrets its buyer got), and no secret reached two buyers.
fn assert_ledger_agrees(orders: &[Value], bought: &[Bought], ids: &KeyIds) {
    assert_eq!(duplicate_ids(orders), Vec::<String>::new(), "order ids twice in the ledger");
    assert_eq!(duplicate_key_ids(orders), Vec::<(String, u64)>::new(), "key ids in two ledger orders");
    let by_id: HashMap<&str, &Value> = orders.iter().map(|o| (o["order_id"].as_str().unwrap(), o)).collect();
    for b in bought {
        let order = by_id.get(b.order_id.as_str()).unwrap_or_else(|| panic!("order {} not in the ledger", b.order_id));
        assert_eq!(order["status"], "delivered", "{order}");
        assert_eq!(order["node"], b.node.as_str(), "{order}");
        assert_eq!(order["quantity"], b.quantity, "{order}");
        let ledger_ids: BTreeSet<u64> =
            order["key_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(
            ledger_ids,
            ids.of_all(&b.keys),
            "order {}: the ledger's key ids are not the keys delivered",
            b.order_id
        );
    }
    let made: HashSet<&str> = bought.iter().map(|b| b.order_id.as_str()).collect();
    let unknown: Vec<&Value> = orders
        .iter()
        .filter(|o| o["status"] == "delivered" && !made.contains(o["order_id"].as_str().unwrap()))
        .collect();
    assert!(unknown.is_empty(), "delivered orders no buyer saw delivered: {unknown:#?}");
    let mut secrets = HashSet::new();
    for b in bought {
        for key in &b.keys {
            assert!(secrets.insert(key.as_str()), "a key reached two buyers (order {} on {})", b.order_id, b.node);
        }
    }
}

/// Every key is somewhere, once: pool + unsold + sold + quarantined + written off over all slices
/// = imported; `status` counts sold (from the ledger's orders), quarantined, written off and
/// granted per node as the slices do.
fn assert_accounting(status: &Value, slices: &[Value], imported: u64) {
    let sku = sku_status(status);
    let ours: Vec<&Value> = slices.iter().filter(|s| s["sku"] == SKU).collect();
    let sum = |field: &str| -> u64 { ours.iter().map(|s| s[field].as_u64().unwrap()).sum() };
    let (unsold, sold, quarantined, written_off) = (sum("unsold"), sum("sold"), sum("quarantined"), sum("written_off"));
    let pool = sku["pool"].as_u64().unwrap();
    assert_eq!(
        pool + unsold + sold + quarantined + written_off,
        imported,
        "pool {pool} + unsold {unsold} + sold {sold} + quarantined {quarantined} + written off {written_off} \
         != imported {imported}\nslices: {slices:#?}\nstatus: {status:#}"
    );
    assert_eq!(sku["sold"], sold, "ledger orders vs key states: {status:#}");
    assert_eq!(sku["quarantined"], quarantined, "{status:#}");
    assert_eq!(sku["written_off"], written_off, "{status:#}");
    let mut granted: HashMap<String, u64> = HashMap::new();
    for slice in &ours {
        *granted.entry(slice["node"].as_str().unwrap().to_string()).or_default() += slice["unsold"].as_u64().unwrap();
    }
    for (node, unsold) in granted {
        assert_eq!(sku["granted"][&node].as_u64().unwrap_or(0), unsold, "granted to {node}: {status:#}");
    }
}

/// Waits until the coordinator has every event of `node`'s (no open reservation there, outbox
/// acknowledged) and then checks that the node holds, slice by slice, exactly the keys the
/// coordinator counts as unsold there.
async fn assert_node_holds_what_the_ledger_says(lab: &Lab, name: &str, node: &NodeProcess) {
    let started = Instant::now();
    loop {
        let node_status = node.status().await;
        let slices = lab.slices().await;
        let mut mismatches = Vec::new();
        for slice in slices_of(&slices, name) {
            let held = node_slice(&node_status, slice_id(&slice)).map_or(0, |s| s["available"].as_u64().unwrap());
            if held != slice["unsold"].as_u64().unwrap() {
                mismatches.push(format!(
                    "slice {}: node holds {held}, ledger unsold {}",
                    slice_id(&slice),
                    slice["unsold"]
                ));
            }
        }
        if mismatches.is_empty() && node_status["open_reservations"] == 0 {
            return;
        }
        assert!(
            started.elapsed() < SYNC_LIMIT,
            "{name} and the ledger disagree: {mismatches:?}\nnode: {node_status:#}\nslices: {slices:#?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Parses `N` out of the `edgecard slices apply --version N` line of a layout preview.
fn apply_version(preview: &str) -> u64 {
    let line = preview
        .lines()
        .find_map(|l| l.trim().strip_prefix("edgecard slices apply --version "))
        .unwrap_or_else(|| panic!("no apply command in:\n{preview}"));
    line.trim().parse().unwrap_or_else(|e| panic!("{line:?}: {e}\n{preview}"))
}

/// The `before → after` figures of `node`'s line under "unsold keys after:".
fn stock_change(preview: &str, node: &str) -> (u64, u64) {
    preview
        .lines()
        .find_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [n, sku, before, "→", after] if n == node && sku == SKU => {
                Some((before.parse().ok()?, after.parse().ok()?))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no stock line for {node} in:\n{preview}"))
}

/// A product, `secrets` imported, and one node per (name, region, keys) with a slice of that many
/// keys (none for 0), all through the CLI; `edit` adjusts each node.toml before the node runs.
/// The nodes run and have their catalog and slices before this returns.
async fn stock_lab(
    lab: &Lab,
    secrets: &[String],
    nodes: &[(&str, &str, u64)],
    edit: impl Fn(&str, &Path),
) -> (KeyIds, Vec<NodeProcess>) {
    lab.add_product(SKU, PRICE_MINOR).await;
    let report = lab.import(SKU, secrets).await;
    let ids = KeyIds::new(secrets, &report);
    let mut configs = Vec::new();
    for (name, region, keys) in nodes {
        let config = lab.add_node(name, region).await;
        edit(name, &config);
        if *keys > 0 {
            lab.allocate(SKU, name, *keys).await;
        }
        configs.push(config);
    }
    let mut running = Vec::new();
    for config in &configs {
        running.push(start_node(config).await);
    }
    for ((_, _, keys), node) in nodes.iter().zip(&running) {
        if *keys > 0 {
            wait_for_stock(node, *keys).await;
        } else {
            let started = Instant::now();
            while listed_stock(node).await != Some(0) {
                assert!(started.elapsed() < STOCK_TIMEOUT, "{} never received the catalog", node.config.display());
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
    }
    (ids, running)
}

/// Coordinator: eu-1 holds 300 keys, ap-1 50. Two buyers per node buy continuously (at most 50
/// purchases each, quantities 1, 2, 1, ...). While they do, the operator stages a move of 100
/// keys from eu-1 to ap-1, looks at the plan, and applies it. eu-1 releases its 100 highest
/// available keys, ap-1 gets exactly those as a new slice and sells them. No key is sold twice,
/// eu-1 never sells a moved key, the ledger matches what buyers got, and the keys add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_under_load() {
    const EU_KEYS: u64 = 300;
    const AP_KEYS: u64 = 50;
    const MOVED: u64 = 100;
    const BUYERS_PER_NODE: usize = 2;
    const MAX_PURCHASES: usize = 50;
    const MAX_ATTEMPTS: usize = 200;
    const BUYING_LIMIT: Duration = Duration::from_secs(40);
    let test_started = Instant::now();
    let lab = Lab::start_with_config(Ports::Any, &[("reclaim_check_secs", toml::Value::Integer(1))]).await;
    let secrets = make_secrets((EU_KEYS + AP_KEYS) as usize);
    let (ids, nodes) = stock_lab(&lab, &secrets, &[("eu-1", "eu", EU_KEYS), ("ap-1", "ap", AP_KEYS)], |_, _| {}).await;
    let (eu, ap) = (&nodes[0], &nodes[1]);
    let before = lab.slices().await;
    let eu_slice = slices_of(&before, "eu-1")[0].clone();
    let ap_slice = slices_of(&before, "ap-1")[0].clone();
    assert_eq!((key_count(&eu_slice), key_count(&ap_slice)), (EU_KEYS, AP_KEYS));

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(Mutex::new(Vec::<Bought>::new()));
    // Refusals per node: (409 sold out, 503 stock syncing).
    let refused = Arc::new(Mutex::new(HashMap::<String, (usize, usize)>::new()));
    let mut tasks = Vec::new();
    for (name, node) in [("eu-1", eu), ("ap-1", ap)] {
        for _ in 0..BUYERS_PER_NODE {
            let mut buyer = Buyer::new(name, node).await;
            let (stop, made, refused) = (stop.clone(), made.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut purchases = 0;
                for i in 0..MAX_ATTEMPTS {
                    if stop.load(Ordering::Relaxed) || purchases == MAX_PURCHASES || started.elapsed() > BUYING_LIMIT {
                        break;
                    }
                    match buyer.try_buy(if i % 3 == 1 { 2 } else { 1 }).await {
                        Attempt::Bought(bought) => {
                            purchases += 1;
                            made.lock().push(bought);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Attempt::SoldOut => {
                            refused.lock().entry(buyer.node.clone()).or_default().0 += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Attempt::Syncing => {
                            refused.lock().entry(buyer.node.clone()).or_default().1 += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
    }

    // Buying is under way on both nodes before the operator acts.
    lab.wait_for_ledger("first orders on both nodes", SYNC_LIMIT, |orders| {
        ["eu-1", "ap-1"]
            .iter()
            .all(|n| orders.iter().filter(|o| o["node"] == *n && o["status"] == "delivered").count() >= 3)
    })
    .await;

    let staged =
        lab.ok(&["slices", "move", SKU, "--from", "eu-1", "--to", "ap-1", "--count", &MOVED.to_string()]).await;
    assert!(staged.contains(&format!("move {MOVED} keys of {SKU} from eu-1 to ap-1")), "{staged}");
    let shown = lab.ok(&["slices", "show"]).await;
    eprintln!("slices show:\n{shown}");
    assert!(shown.contains(&format!("move {MOVED} keys of {SKU} from eu-1 to ap-1")), "{shown}");
    let step = shown
        .lines()
        .find(|l| l.contains(&format!("slice {:>5} of", slice_id(&eu_slice))))
        .unwrap_or_else(|| panic!("no step for eu-1's slice in:\n{shown}"));
    assert!(
        step.contains("on eu-1") && step.contains(&format!("shrink by {MOVED}")) && step.ends_with("→ ap-1"),
        "{step}"
    );
    let (eu_before, eu_after) = stock_change(&shown, "eu-1");
    let (ap_before, ap_after) = stock_change(&shown, "ap-1");
    assert_eq!((eu_before - eu_after, ap_after - ap_before), (MOVED, MOVED), "{shown}");
    let version = apply_version(&shown);
    let at_apply: HashMap<&str, usize> =
        ["eu-1", "ap-1"].into_iter().map(|n| (n, made.lock().iter().filter(|b| b.node == n).count())).collect();
    let applied = lab.ok(&["slices", "apply", "--version", &version.to_string()]).await;
    assert!(applied.contains(&format!("layout version {version} applied")), "{applied}");
    assert!(applied.contains(&format!("slice {} on eu-1 gives {MOVED} → ap-1", slice_id(&eu_slice))), "{applied}");
    let moving_since = Instant::now();
    let again = lab.fails(&["slices", "apply", "--version", &version.to_string()]).await;
    eprintln!("applying the same version again: {again}");

    // The donor releases, then the recipient gets the released keys as a new slice.
    let status = lab
        .wait_for_status("the move done and ap-1 granted a new slice", SYNC_LIMIT, |s| {
            moves_in_flight(s) == 0
                && s["leases"].as_array().unwrap().iter().filter(|l| l["node"] == "ap-1").count() == 2
        })
        .await;
    let slices = lab.slices().await;
    let moved = slices_of(&slices, "ap-1").pop().unwrap();
    let moved_id = slice_id(&moved);
    assert_ne!(moved_id, slice_id(&ap_slice));
    let moved_runs = runs(&moved);
    assert_eq!(key_count(&moved), MOVED, "ap-1 got what eu-1 released: {slices:#?}\n{status:#}");
    // eu-1 takes its lowest ids first and released its highest available ones: the top 100.
    let eu_top = runs(&eu_slice).last().unwrap().1;
    assert_eq!(moved_runs, vec![(eu_top - MOVED + 1, eu_top)], "moved keys are eu-1's highest: {moved}");
    let ap_status = wait_for_node(ap, "ap-1 holds the moved slice", SYNC_LIMIT, |s| {
        node_slice(s, moved_id).is_some_and(|slice| slice["selling"] == true)
    })
    .await;
    eprintln!("move applied to ap-1 selling the moved slice: {:?}", moving_since.elapsed());
    let eu_status = eu.status().await;
    assert_eq!(node_slice(&eu_status, slice_id(&eu_slice)).unwrap()["selling"], true, "eu-1 sells on: {eu_status:#}");
    assert_eq!(node_slice(&ap_status, slice_id(&ap_slice)).unwrap()["closed"], false, "{ap_status:#}");

    // The buyers go on to their caps (bounded in time); the stop flag is only a backstop.
    let sold_moved = |orders: &[Value]| {
        orders.iter().any(|o| {
            o["node"] == "ap-1"
                && o["status"] == "delivered"
                && o["key_ids"].as_array().unwrap().iter().any(|id| in_runs(&moved_runs, id.as_u64().unwrap()))
        })
    };
    let started = Instant::now();
    while !tasks.iter().all(|t| t.is_finished()) && started.elapsed() < BUYING_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        bounded("a buyer to finish", SYNC_LIMIT, task).await.unwrap();
    }
    let mut bought = made.lock().clone();
    // If the buyers stopped before a moved key sold, buy at ap-1 until one does (it takes its
    // lowest key ids first, so the first purchases should already be moved keys).
    let mut extra = Buyer::new("ap-1", ap).await;
    for _ in 0..10 {
        if bought.iter().any(|b| b.node == "ap-1" && ids.of_all(&b.keys).iter().any(|id| in_runs(&moved_runs, *id))) {
            break;
        }
        bought.push(extra.buy(1).await);
    }
    eprintln!(
        "purchases: {} on eu-1, {} on ap-1 ({} and {} after the apply); refusals (sold out, syncing): {:?}",
        bought.iter().filter(|b| b.node == "eu-1").count(),
        bought.iter().filter(|b| b.node == "ap-1").count(),
        bought.iter().filter(|b| b.node == "eu-1").count() - at_apply["eu-1"],
        bought.iter().filter(|b| b.node == "ap-1").count() - at_apply["ap-1"],
        refused.lock()
    );
    for node in ["eu-1", "ap-1"] {
        assert!(
            bought.iter().filter(|b| b.node == node).count() > at_apply[node] + 5,
            "buying on {node} did not go on during and after the move"
        );
    }

    let (orders, _) = lab.wait_for_ledger("every purchase", SYNC_LIMIT, |o| all_delivered(o, &bought)).await;
    assert_ledger_agrees(&orders, &bought, &ids);
    assert!(sold_moved(&orders), "no moved key sold at ap-1: {orders:#?}");
    for order in orders.iter().filter(|o| o["node"] == "eu-1") {
        for id in order["key_ids"].as_array().unwrap() {
            assert!(!in_runs(&moved_runs, id.as_u64().unwrap()), "eu-1 sold key {id}, which it released: {order}");
        }
    }
    let moved_sold: usize = bought
        .iter()
        .filter(|b| b.node == "ap-1")
        .map(|b| ids.of_all(&b.keys).iter().filter(|id| in_runs(&moved_runs, **id)).count())
        .sum();
    eprintln!("moved keys sold at ap-1: {moved_sold}");

    assert_node_holds_what_the_ledger_says(&lab, "eu-1", eu).await;
    assert_node_holds_what_the_ledger_says(&lab, "ap-1", ap).await;
    let status = lab.status().await;
    let slices = lab.slices().await;
    assert_eq!(status["alarms"], 0, "{status:#}");
    assert_eq!(moves_in_flight(&status), 0, "{status:#}");
    assert_eq!(pool(&status), 0, "{status:#}");
    let sold_keys: u64 = bought.iter().map(|b| u64::from(b.quantity)).sum();
    assert_eq!(sku_status(&status)["sold"], sold_keys, "{status:#}");
    // eu-1's slice: what it sold, what it holds, and the 100 it gave away.
    let eu_now = find_slice(&slices, slice_id(&eu_slice));
    let eu_sold: u64 = bought.iter().filter(|b| b.node == "eu-1").map(|b| u64::from(b.quantity)).sum();
    assert_eq!(eu_now["sold"], eu_sold, "{eu_now}");
    assert_eq!(eu_now["unsold"], EU_KEYS - MOVED - eu_sold, "{eu_now}");
    assert_eq!(list_state(&eu_now), "active", "{eu_now}");
    assert_accounting(&status, &slices, EU_KEYS + AP_KEYS);
    eprintln!("move_under_load took {:?}", test_started.elapsed());
}

/// eu-1 holds 20 keys and sells 2. A drain is staged and reverted (nothing to apply). Two orders
/// are left open: A (2 keys, never paid) and B (1 key). The operator drains eu-1. The node stops
/// selling at once (409 sold out) and its 15 available keys are back in the coordinator's pool,
/// while the keys under A and B stay with the node: B, paid after the drain, is delivered its own
/// key. A expires: its keys are released too and the slice ends closed. A late payment for A gets
/// no key (there is none left to sell there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain() {
    const KEYS: u64 = 20;
    const TTL_SECS: i64 = 8;
    let test_started = Instant::now();
    let lab = Lab::start_with_config(Ports::Any, &[("reclaim_check_secs", toml::Value::Integer(1))]).await;
    let secrets = make_secrets(KEYS as usize);
    let (ids, nodes) = stock_lab(&lab, &secrets, &[("eu-1", "eu", KEYS)], |_, config| {
        set_toml_field(config, "orders", "reservation_ttl_secs", toml::Value::Integer(TTL_SECS));
        set_toml_field(config, "orders", "expiry_sweep_ms", toml::Value::Integer(200));
    })
    .await;
    let eu = &nodes[0];
    let listed = lab.slices().await[0].clone();
    let slice = slice_id(&listed);
    let first = runs(&listed)[0].0;
    let mut buyer = Buyer::new("eu-1", eu).await;
    let mut bought = vec![buyer.buy(1).await, buyer.buy(1).await];
    // Staged, then reverted: nothing to apply.
    let staged = lab.ok(&["slices", "drain", "eu-1"]).await;
    assert!(staged.contains("drain eu-1"), "{staged}");
    let reverted = lab.ok(&["slices", "revert"]).await;
    assert!(reverted.contains("staged changes discarded"), "{reverted}");
    let shown = lab.ok(&["slices", "show"]).await;
    assert!(shown.contains("nothing staged"), "{shown}");
    let error = lab.fails(&["slices", "apply", "--version", &apply_version(&staged).to_string()]).await;
    assert!(error.contains("nothing is staged"), "{error}");

    let a = buyer.reserve(2).await;
    let b = buyer.reserve(1).await;
    let reserved_at = Instant::now();
    lab.wait_for_ledger("two sales and two open orders", SYNC_LIMIT, |orders| {
        all_delivered(orders, &bought)
            && [&a, &b]
                .iter()
                .all(|o| orders.iter().any(|l| l["order_id"] == o.order_id.as_str() && l["status"] == "reserved"))
    })
    .await;

    let staged = lab.ok(&["slices", "drain", "eu-1"]).await;
    assert!(staged.contains("drain eu-1"), "{staged}");
    let shown = lab.ok(&["slices", "show"]).await;
    eprintln!("slices show:\n{shown}");
    assert!(shown.contains("drain eu-1"), "{shown}");
    let step = shown
        .lines()
        .find(|l| l.contains(&format!("slice {slice:>5} of")))
        .unwrap_or_else(|| panic!("no step for eu-1's slice in:\n{shown}"));
    assert!(step.contains("on eu-1") && step.contains("close") && step.ends_with("→ pool"), "{step}");
    // The ledger counts 18 unsold (3 of them under open orders): all of them go, in the plan.
    assert_eq!(stock_change(&shown, "eu-1"), (KEYS - 2, 0), "{shown}");
    let version = apply_version(&shown);
    let applied = lab.ok(&["slices", "apply", "--version", &version.to_string()]).await;
    assert!(applied.contains(&format!("layout version {version} applied")), "{applied}");
    assert!(applied.contains(&format!("slice {slice} on eu-1 closes → pool")), "{applied}");

    // The node closes the slice and stops selling; A and B keep their keys.
    let node_status = wait_for_node(eu, "eu-1 closes its slice", SYNC_LIMIT, |s| {
        node_slice(s, slice).is_some_and(|l| l["closed"] == true)
    })
    .await;
    let held = node_slice(&node_status, slice).unwrap();
    assert_eq!((held["selling"].as_bool(), held["available"].as_u64()), (Some(false), Some(0)), "{node_status:#}");
    assert_eq!(node_status["open_reservations"], 2, "{node_status:#}");
    let refused = buyer.client.create_order(&json!({ "sku": SKU, "quantity": 1 })).await;
    assert_eq!((refused.status, error_code(&refused)), (409, "sold_out".to_string()), "{}", refused.text());
    assert_eq!(buyer.client.stock().await, 0);

    // B is paid: its key was kept for it, so it is delivered.
    assert!(reserved_at.elapsed() < Duration::from_secs(TTL_SECS as u64), "B expired before it could be paid");
    let paid = buyer.client.pay(&b.pay_url).await;
    assert_eq!(paid.status, 200, "{}", paid.text());
    assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered", "{}", paid.text());
    let view = buyer.client.fetch_ok(&b).await;
    let b_keys = keys_of(&view);
    assert_eq!(b_keys.len(), 1, "{view}");
    bought.push(Bought { order_id: b.order_id.clone(), node: "eu-1".into(), quantity: 1, keys: b_keys.clone() });
    // Lowest ids first: 2 sold, A holds the next 2, B the one after; B got the key it held.
    assert_eq!(ids.of_all(&b_keys), BTreeSet::from([first + 4]), "B was delivered another key than it held");

    // The available keys are back in the pool; the 2 under A are still the node's.
    let status = lab
        .wait_for_status("eu-1's available keys back in the pool, B's sale in the ledger", SYNC_LIMIT, |s| {
            pool(s) == KEYS - 2 - 3 && sku_status(s)["sold"] == 3
        })
        .await;
    let closing = lease(&status, slice).unwrap_or_else(|| panic!("slice {slice} not listed: {status:#}"));
    assert_eq!(
        (closing["state"].as_str(), closing["unsold"].as_u64(), closing["sold"].as_u64()),
        (Some("closing"), Some(2), Some(3)),
        "{status:#}"
    );
    assert_eq!(moves_in_flight(&status), 1, "the drain waits for the open orders: {status:#}");
    assert_accounting(&status, &lab.slices().await, KEYS);
    let table = lab.ok(&["status"]).await;
    assert!(table.contains("moves in flight: 1") && table.contains("(drain)"), "{table}");
    let error = lab.fails(&["slices", "write-off", &slice.to_string()]).await;
    assert!(error.contains("was not reclaimed"), "{error}");

    // A expires: the node releases its keys too, and the slice ends closed.
    let (orders, _) = lab
        .wait_for_ledger("A expired", Duration::from_secs(TTL_SECS as u64) + SYNC_LIMIT, |orders| {
            orders.iter().any(|o| o["order_id"] == a.order_id.as_str() && o["status"] == "expired")
        })
        .await;
    let a_ledger_ids: BTreeSet<u64> = orders.iter().find(|o| o["order_id"] == a.order_id.as_str()).unwrap()["key_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(a_ledger_ids, BTreeSet::from([first + 2, first + 3]), "{orders:#?}");
    let status = lab
        .wait_for_status("the drained slice closed", SYNC_LIMIT, |s| {
            lease(s, slice).is_none() && moves_in_flight(s) == 0 && pool(s) == KEYS - 3
        })
        .await;
    let slices = lab.slices().await;
    let closed = find_slice(&slices, slice);
    assert_eq!(list_state(&closed), "closed", "{closed}");
    assert_eq!(
        (closed["unsold"].as_u64(), closed["sold"].as_u64(), closed["quarantined"].as_u64()),
        (Some(0), Some(3), Some(0))
    );
    assert_accounting(&status, &slices, KEYS);
    let node_status = eu.status().await;
    let held = node_slice(&node_status, slice).unwrap();
    assert_eq!((held["closed"].as_bool(), held["available"].as_u64()), (Some(true), Some(0)), "{node_status:#}");
    assert_eq!(node_status["open_reservations"], 0, "{node_status:#}");

    // A is paid late: its keys are gone from this node, so it waits for stock, with no key.
    let late = buyer.client.pay(&a.pay_url).await;
    assert_eq!(late.status, 200, "{}", late.text());
    assert_eq!(late.json::<Value>().unwrap()["status"], "paid_awaiting_stock", "{}", late.text());
    let view = buyer.client.fetch_ok(&a).await;
    assert_eq!(view["status"], "paid_awaiting_stock", "{view}");
    assert!(keys_of(&view).is_empty(), "a late payment got keys of a drained slice: {view}");
    let (orders, _) = lab
        .wait_for_ledger("A awaiting stock", SYNC_LIMIT, |orders| {
            orders.iter().any(|o| o["order_id"] == a.order_id.as_str() && o["status"] == "paid_awaiting_stock")
        })
        .await;
    assert_ledger_agrees(&orders, &bought, &ids);
    // A's keys went back to the pool and nowhere else.
    for id in &a_ledger_ids {
        assert!(!bought.iter().any(|b| ids.of_all(&b.keys).contains(id)), "A's key {id} was sold");
    }
    let status = lab.status().await;
    assert_eq!(status["alarms"], 0, "{status:#}");
    assert_eq!(sku_status(&status)["paid_awaiting_stock"], 1, "{status:#}");
    assert_eq!(pool(&status), KEYS - 3, "{status:#}");
    assert_accounting(&status, &lab.slices().await, KEYS);
    eprintln!("drain took {:?}", test_started.elapsed());
}

/// Coordinator with 10 s leases, 1 s clock-skew margin, a take window of 5, reclaim checks every
/// second. eu-1 (30 keys) reaches the coordinator through a UDP relay; us-1 directly. eu-1 sells
/// 2 keys and holds 2 for an open order R, all in the ledger; then the relay is cut.
///
/// Cut off, eu-1 sells exactly its window (5 keys) and then answers 503 `stock_syncing`. Its lease
/// runs out: it answers 409 sold out though 21 keys remain, and a payment for R no longer delivers
/// R's keys. The coordinator, having heard nothing from eu-1, reclaims only after that: R's 2 keys and the 5 lowest others quarantined, the 21
/// above back in the pool, from which us-1 gets them and sells some. The relay heals: eu-1's
/// window sales land as sales (no alarm), it is told to close the slice, releases what it holds,
/// and the slice ends closed with nothing quarantined. eu-1 then takes new stock and R, paid
/// while it was cut off, is delivered from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dark_node() {
    const KEYS: u64 = 40;
    const EU_KEYS: u64 = 30;
    const WINDOW: u64 = 5;
    const LEASE_SECS: u64 = 10;
    /// R must still be open when eu-1's lease runs out (~9 s after the cut).
    const TTL_SECS: i64 = 16;
    /// The node stops selling ~9 s after the cut; the coordinator reclaims ~2 s later.
    const DARK_LIMIT: Duration = Duration::from_secs(25);
    let test_started = Instant::now();
    let lab = Lab::start_with_config(
        Ports::Any,
        &[
            ("lease_secs", toml::Value::Integer(LEASE_SECS as i64)),
            ("max_clock_skew_secs", toml::Value::Integer(1)),
            ("take_window", toml::Value::Integer(WINDOW as i64)),
            ("reclaim_check_secs", toml::Value::Integer(1)),
        ],
    )
    .await;
    let relay = UdpRelay::start(lab.coordinator.sync_addr).await;
    let secrets = make_secrets(KEYS as usize);
    let relay_addr = relay.addr.to_string();
    let (ids, nodes) = stock_lab(&lab, &secrets, &[("eu-1", "eu", EU_KEYS), ("us-1", "us", 0)], |name, config| {
        set_toml_field(config, "orders", "lease_safety_margin_secs", toml::Value::Integer(1));
        if name == "eu-1" {
            set_toml_field(config, "coordinator", "addr", toml::Value::String(relay_addr.clone()));
            set_toml_field(config, "orders", "reservation_ttl_secs", toml::Value::Integer(TTL_SECS));
            set_toml_field(config, "orders", "expiry_sweep_ms", toml::Value::Integer(200));
        }
    })
    .await;
    let (eu, us) = (&nodes[0], &nodes[1]);
    assert!(relay.forwarded() > 0, "eu-1 syncs through the relay");
    let old = lab.slices().await[0].clone();
    let old_id = slice_id(&old);
    let old_runs = runs(&old);
    let first = old_runs[0].0;

    let mut buyer = Buyer::new("eu-1", eu).await;
    let mut bought = vec![buyer.buy(1).await, buyer.buy(1).await];
    // Cut right after a lease renewal reached eu-1, so the coordinator holds the same deadline
    // (the next renewal is queued only once less than half the lease is left).
    let deadline = node_slice(&eu.status().await, old_id).unwrap()["lease_deadline"].clone();
    wait_for_node(eu, "a lease renewal at eu-1", Duration::from_secs(LEASE_SECS + 5), |s| {
        node_slice(s, old_id).is_some_and(|l| l["lease_deadline"] != deadline)
    })
    .await;
    let r = buyer.reserve(2).await;
    lab.wait_for_ledger("eu-1's sales and R", SYNC_LIMIT, |orders| {
        all_delivered(orders, &bought)
            && orders.iter().any(|o| o["order_id"] == r.order_id.as_str() && o["status"] == "reserved")
    })
    .await;
    wait_for_node(eu, "every take acknowledged", SYNC_LIMIT, |s| {
        node_slice(s, old_id).is_some_and(|l| l["unacknowledged_takes"] == 0)
    })
    .await;
    let status = lab.status().await;
    let eu_seen = |status: &Value| -> Value {
        status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "eu-1").unwrap()["events_high_water"].clone()
    };
    let high_water_at_cut = eu_seen(&status);
    let renewed = node_slice(&eu.status().await, old_id).unwrap();
    relay.cut();
    let cut_at = Instant::now();
    eprintln!("relay cut; eu-1's lease: {renewed}; coordinator's: {}", lease(&status, old_id).unwrap());

    // Cut off, eu-1 sells its window, then nothing.
    let mut window_sales = Vec::new();
    let mut refusal = None;
    for _ in 0..WINDOW + 3 {
        match buyer.try_buy(1).await {
            Attempt::Bought(b) => window_sales.push(b),
            other => {
                refusal = Some(other);
                break;
            }
        }
    }
    let node_status = eu.status().await;
    let held = node_slice(&node_status, old_id).unwrap();
    eprintln!("cut off, eu-1 sold {} keys in {:?}; its slice: {held}", window_sales.len(), cut_at.elapsed());
    assert!(refusal.is_some(), "eu-1 kept selling past its window: {node_status:#}");
    assert!(window_sales.len() as u64 <= WINDOW, "eu-1 sold {} keys un-acknowledged", window_sales.len());
    if held["lease_live"] == true {
        // The window stopped it, not the lease: stock is there, so "try again shortly".
        assert!(matches!(refusal, Some(Attempt::Syncing)), "a full window is 503 stock_syncing, not sold out");
        assert_eq!(window_sales.len() as u64, WINDOW, "{node_status:#}");
        assert_eq!(held["unacknowledged_takes"], WINDOW, "{node_status:#}");
        assert_eq!(held["selling"], true, "{node_status:#}");
    } else {
        assert!(matches!(refusal, Some(Attempt::SoldOut)), "past its lease eu-1 is sold out");
    }
    let window_ids: BTreeSet<u64> = window_sales.iter().flat_map(|b| ids.of_all(&b.keys)).collect();
    assert_eq!(window_ids, (first + 4..first + 4 + window_sales.len() as u64).collect(), "lowest ids first");
    let remaining = EU_KEYS - 2 - 2 - window_sales.len() as u64;
    assert_eq!(held["available"], remaining, "{node_status:#}");
    bought.extend(window_sales.iter().cloned());

    // The lease runs out: nothing sells though keys remain, and R's payment gets no key.
    let node_status = wait_for_node(eu, "eu-1's lease runs out", DARK_LIMIT, |s| {
        node_slice(s, old_id).is_some_and(|l| l["lease_live"] == false)
    })
    .await;
    let stopped_after = cut_at.elapsed();
    eprintln!("eu-1 stopped selling {stopped_after:?} after the cut");
    assert!(stopped_after >= Duration::from_secs(5), "eu-1 stopped {stopped_after:?} after a fresh 10 s lease");
    let held = node_slice(&node_status, old_id).unwrap();
    assert_eq!((held["selling"].as_bool(), held["available"].as_u64()), (Some(false), Some(remaining)), "{held}");
    let late = buyer.client.create_order(&json!({ "sku": SKU, "quantity": 1 })).await;
    assert_eq!((late.status, error_code(&late)), (409, "sold_out".to_string()), "{}", late.text());
    assert_eq!(buyer.client.stock().await, 0);
    let paid = buyer.client.pay(&r.pay_url).await;
    assert_eq!(paid.status, 200, "{}", paid.text());
    assert_eq!(paid.json::<Value>().unwrap()["status"], "paid_awaiting_stock", "{}", paid.text());
    assert!(keys_of(&buyer.client.fetch_ok(&r).await).is_empty());

    // The coordinator reclaims, and only once eu-1 has stopped.
    let started = Instant::now();
    let status = loop {
        let status = lab.status().await;
        let reclaimed = lease(&status, old_id).is_some_and(|l| l["state"] == "reclaimed");
        let node_status = eu.status().await;
        if reclaimed {
            let held = node_slice(&node_status, old_id).unwrap();
            assert_eq!(held["lease_live"], false, "reclaimed while eu-1 could still sell: {node_status:#}");
            break status;
        }
        assert!(started.elapsed() < DARK_LIMIT, "slice {old_id} never reclaimed: {status:#}");
        tokio::time::sleep(POLL_EVERY).await;
    };
    eprintln!("reclaimed {:?} after the cut", cut_at.elapsed());
    assert_eq!(eu_seen(&status), high_water_at_cut, "eu-1's events got through the cut relay: {status:#}");
    let reclaimed = lease(&status, old_id).unwrap();
    assert_eq!(
        (reclaimed["unsold"].as_u64(), reclaimed["sold"].as_u64(), reclaimed["quarantined"].as_u64()),
        (Some(0), Some(2), Some(2 + WINDOW)),
        "R's keys and the window are quarantined: {status:#}"
    );
    let returned = EU_KEYS - 2 - 2 - WINDOW;
    assert_eq!(pool(&status), KEYS - EU_KEYS + returned, "{status:#}");
    assert_accounting(&status, &lab.slices().await, KEYS);
    let table = lab.ok(&["status"]).await;
    assert!(table.contains(&format!("quarantined keys: {SKU} {}", 2 + WINDOW)), "{table}");

    // The reclaimed keys sell elsewhere at once.
    lab.allocate(SKU, "us-1", pool(&status)).await;
    let slices = lab.slices().await;
    let us_slice = slices_of(&slices, "us-1")[0].clone();
    assert_eq!(runs(&us_slice), vec![(first + 4 + WINDOW, first + KEYS - 1)], "{us_slice}");
    wait_for_stock(us, pool(&status)).await;
    let mut us_buyer = Buyer::new("us-1", us).await;
    for _ in 0..3 {
        let b = us_buyer.buy(1).await;
        let id = *ids.of_all(&b.keys).first().unwrap();
        assert!(in_runs(&old_runs, id), "us-1 sells a key reclaimed from eu-1 first (key {id})");
        bought.push(b);
    }

    // Back in contact: eu-1's sales land, it closes the slice and releases what it holds.
    let dropped = relay.dropped();
    assert!(dropped > 0, "eu-1 never tried to reach the coordinator while cut off");
    relay.heal();
    let healed_at = Instant::now();
    eprintln!("relay healed after {:?} ({dropped} datagrams dropped)", cut_at.elapsed());
    let (orders, took) = lab
        .wait_for_ledger("eu-1's window sales", Duration::from_secs(45), |orders| all_delivered(orders, &bought))
        .await;
    eprintln!("eu-1's window sales reached the ledger {took:?} after the heal");
    assert_ledger_agrees(&orders, &bought, &ids);
    let status = lab
        .wait_for_status("eu-1's old slice closed", SYNC_LIMIT, |s| {
            lease(s, old_id).is_none() && moves_in_flight(s) == 0
        })
        .await;
    eprintln!("slice closed {:?} after the heal", healed_at.elapsed());
    assert_eq!(status["alarms"], 0, "window sales are no alarm: {status:#}");
    let slices = lab.slices().await;
    let closed = find_slice(&slices, old_id);
    assert_eq!(list_state(&closed), "closed", "{closed}");
    assert_eq!(
        (closed["unsold"].as_u64(), closed["sold"].as_u64(), closed["quarantined"].as_u64()),
        (Some(0), Some(2 + WINDOW), Some(0)),
        "{closed}"
    );
    // R's 2 keys came back to the pool; the keys us-1 holds stayed us-1's.
    assert_eq!(pool(&status), 2, "{status:#}");
    assert_eq!(find_slice(&slices, slice_id(&us_slice))["unsold"], key_count(&us_slice) - 3);
    let r_ledger = orders.iter().find(|o| o["order_id"] == r.order_id.as_str()).unwrap();
    assert_eq!(r_ledger["status"], "paid_awaiting_stock", "{r_ledger}");
    assert_accounting(&status, &slices, KEYS);
    let node_status = eu.status().await;
    let held = node_slice(&node_status, old_id).unwrap();
    assert_eq!((held["closed"].as_bool(), held["available"].as_u64()), (Some(true), Some(0)), "{node_status:#}");

    // eu-1 resumes: new stock fills R first, then it sells as before.
    let more = make_secrets(5);
    let report = lab.import(SKU, &more).await;
    let more_ids = KeyIds::new(&more, &report);
    let all_ids = KeyIds(ids.0.into_iter().chain(more_ids.0).collect());
    lab.allocate(SKU, "eu-1", 7).await;
    let started = Instant::now();
    let r_view = loop {
        let view = buyer.client.fetch_ok(&r).await;
        if view["status"] == "delivered" {
            break view;
        }
        assert!(started.elapsed() < SYNC_LIMIT, "R not delivered from new stock: {view}");
        tokio::time::sleep(POLL_EVERY).await;
    };
    let r_keys = keys_of(&r_view);
    assert_eq!(r_keys.len(), 2, "{r_view}");
    bought.push(Bought { order_id: r.order_id.clone(), node: "eu-1".into(), quantity: 2, keys: r_keys });
    wait_for_stock(eu, 5).await;
    bought.push(buyer.buy(1).await);
    let (orders, _) = lab.wait_for_ledger("every purchase", SYNC_LIMIT, |orders| all_delivered(orders, &bought)).await;
    assert_ledger_agrees(&orders, &bought, &all_ids);
    assert_node_holds_what_the_ledger_says(&lab, "eu-1", eu).await;
    assert_node_holds_what_the_ledger_says(&lab, "us-1", us).await;
    let status = lab.status().await;
    assert_eq!(status["alarms"], 0, "{status:#}");
    assert_eq!(sku_status(&status)["paid_awaiting_stock"], 0, "{status:#}");
    assert_accounting(&status, &lab.slices().await, KEYS + 5);
    eprintln!("dark_node took {:?}", test_started.elapsed());
}
