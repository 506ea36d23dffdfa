//! `kill -9` of a node while buyers buy, then a restart on the same data dir (once, and twenty
//! times over): no order that got a pay link is lost, every delivered key stays with its order,
//! every payment the node confirmed is delivered, no key is revealed twice, and reservations left
//! open by the crashes expire and give their keys back.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;
use serde_json::{json, Value};

const BUYERS: usize = 8;
const TTL_SECS: u64 = 3;

#[derive(Clone, Debug, Default)]
struct Seen {
    order_id: String,
    token: String,
    quantity: u32,
    /// A pay request was sent (its answer may have been lost in the crash).
    pay_sent: bool,
    /// The pay request was answered `delivered`.
    pay_delivered: bool,
    /// Keys the buyer saw before the crash.
    keys: Option<Vec<String>>,
}

type Ledger = Arc<Mutex<Vec<Seen>>>;

/// Buys until the node goes away. Every third order is left unpaid, so reservations are open at
/// the crash. Returns when a request fails.
async fn buyer(mut client: Client, index: usize, ledger: Ledger) {
    for round in 0usize.. {
        // A distinct address per order keeps the per-address reservation cap out of the way.
        client.forwarded_for = Some(format!("198.18.{}.{}", index % 256, round % 250 + 1));
        let quantity = if round % 4 == 3 { 2 } else { 1 };
        let Ok(response) = client.try_send(create_request(quantity)).await else { return };
        if response.status != 201 {
            assert_eq!(response.status, 409, "{}", response.text());
            return;
        }
        let order = Created::from_response(&response);
        let slot = {
            let mut ledger = ledger.lock();
            ledger.push(Seen {
                order_id: order.order_id.clone(),
                token: order.token.clone(),
                quantity,
                ..Seen::default()
            });
            ledger.len() - 1
        };
        if round % 3 == 2 {
            continue;
        }
        ledger.lock()[slot].pay_sent = true;
        let path = client.pay_path(&order.pay_url).to_string();
        let Ok(paid) = client.try_send(edgecard::https_client::Request::post(&path)).await else { return };
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered");
        ledger.lock()[slot].pay_delivered = true;
        let lookup = edgecard::https_client::Request::get(&format!("/api/v1/orders/{}", order.order_id))
            .header("authorization", &format!("Bearer {}", order.token));
        let Ok(fetched) = client.try_send(lookup).await else { return };
        assert_eq!(fetched.status, 200, "{}", fetched.text());
        let keys = keys_of(&fetched.json().unwrap());
        assert_eq!(keys.len(), quantity as usize);
        ledger.lock()[slot].keys = Some(keys);
    }
}

fn create_request(quantity: u32) -> edgecard::https_client::Request {
    edgecard::https_client::Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "quantity": quantity }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_mid_sale_loses_nothing_and_sells_nothing_twice() {
    kill_nine_cycles(1, 80, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_kill_nine_cycles_under_load_lose_nothing_and_sell_nothing_twice() {
    kill_nine_cycles(20, 25, 1_200).await;
}

/// `cycles` times: start the node on its data dir, buy with [`BUYERS`] buyers until
/// `orders_per_cycle` more orders got a pay link, `kill -9` it amid the traffic. Then restart and
/// check everything the buyers saw, let open reservations expire, and sell what is left.
async fn kill_nine_cycles(cycles: usize, orders_per_cycle: usize, keys: usize) {
    let env = TestEnv::new();
    let secrets = make_secrets(keys);
    let granted: HashSet<String> = secrets.iter().cloned().collect();
    let options = NodeOptions {
        reservation_ttl_secs: TTL_SECS,
        expiry_sweep_ms: 200,
        create_order_limit: (100_000, 100_000),
        other_limits: (100_000, 100_000),
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    };
    let ledger: Ledger = Arc::new(Mutex::new(Vec::new()));
    for cycle in 0..cycles {
        let mut node = env.start_node(&options);
        let target = ledger.lock().len() + orders_per_cycle;
        // Buy until enough orders exist, then kill -9 in the middle of the traffic.
        bounded("buying until the crash", Duration::from_secs(60), async {
            let mut tasks = Vec::new();
            for index in 0..BUYERS {
                let client = node.client().await;
                tasks.push(tokio::spawn(buyer(client, cycle * BUYERS + index, ledger.clone())));
            }
            while ledger.lock().len() < target {
                assert!(!tasks.iter().all(|t| t.is_finished()), "buyers stopped before the crash: {}", node.stderr());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            node.kill9();
            for task in tasks {
                task.await.unwrap();
            }
        })
        .await;
    }
    let seen = ledger.lock().clone();
    let unpaid = seen.iter().filter(|s| !s.pay_sent).count();
    let delivered_before = seen.iter().filter(|s| s.keys.is_some()).count();
    let in_flight = seen.iter().filter(|s| s.pay_sent && s.keys.is_none()).count();
    eprintln!(
        "{} orders before {cycles} crash(es): {unpaid} unpaid, {delivered_before} delivered, {in_flight} in flight",
        seen.len()
    );
    assert!(unpaid > 0 && delivered_before > 0, "the crash should interrupt a mixed workload: {seen:?}");

    // Restart on the same data dir.
    let node = env.start_node(&options);
    bounded("checks after the restart", Duration::from_secs(60), async {
        let mut client = node.client().await;

        // Every order that got a pay link still exists, and delivered keys did not move.
        let mut final_views: BTreeMap<String, Value> = BTreeMap::new();
        for order in &seen {
            let response = client.fetch(&order.order_id, Some(&order.token)).await;
            assert_eq!(response.status, 200, "order {} lost in the crash: {}", order.order_id, response.text());
            let view: Value = response.json().unwrap();
            let status = view["status"].as_str().unwrap();
            if order.pay_delivered {
                assert_eq!(status, "delivered", "paid order {} is {status} after the restart", order.order_id);
            }
            if let Some(keys) = &order.keys {
                assert_eq!(&keys_of(&view), keys, "order {} shows other keys after the restart", order.order_id);
            }
            if !order.pay_sent {
                assert!(matches!(status, "reserved" | "expired"), "unpaid order {} is {status}", order.order_id);
            }
            final_views.insert(order.order_id.clone(), view);
        }

        // Open reservations expire after the TTL; nothing stays reserved.
        let deadline = Instant::now() + Duration::from_secs(TTL_SECS + 15);
        for order in &seen {
            loop {
                let view = client
                    .fetch_ok(&Created {
                        order_id: order.order_id.clone(),
                        token: order.token.clone(),
                        pay_url: String::new(),
                        body: Value::Null,
                    })
                    .await;
                let status = view["status"].as_str().unwrap().to_string();
                if status != "reserved" {
                    if !order.pay_sent {
                        assert_eq!(status, "expired", "unpaid order {}", order.order_id);
                    } else {
                        assert!(
                            matches!(status.as_str(), "delivered" | "expired"),
                            "order {}: {status}",
                            order.order_id
                        );
                    }
                    final_views.insert(order.order_id.clone(), view);
                    break;
                }
                assert!(Instant::now() < deadline, "order {} still reserved long after its TTL", order.order_id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // No two orders share a key.
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (order_id, view) in &final_views {
            let keys = keys_of(view);
            if view["status"] == "delivered" {
                let quantity = seen.iter().find(|s| &s.order_id == order_id).unwrap().quantity;
                assert_eq!(keys.len(), quantity as usize, "{view}");
            } else {
                assert!(keys.is_empty(), "a {} order shows keys: {view}", view["status"]);
            }
            for key in keys {
                assert!(granted.contains(&key), "order {order_id} holds a key never granted");
                if let Some(other) = owner.insert(key, order_id.clone()) {
                    panic!("one key delivered to orders {other} and {order_id}");
                }
            }
        }

        // Expired reservations gave their keys back: only delivered keys are gone.
        // Orders whose pay link was lost in the crash expire too.
        loop {
            let status = node.status().await;
            if status["open_reservations"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "reservations still open long after their TTL: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stock = client.stock().await as usize;
        assert_eq!(stock, keys - owner.len(), "stock after the restart (sold {})", owner.len());

        // And they sell: buy everything left; every granted key ends up in exactly one order.
        let mut round = 0;
        let mut left = stock;
        while left > 0 {
            round += 1;
            client.forwarded_for = Some(format!("198.19.{}.{}", round / 250, round % 250 + 1));
            let quantity = left.min(10) as u32;
            let (order, keys) = client.buy(quantity).await;
            for key in keys {
                assert!(granted.contains(&key));
                if let Some(other) = owner.insert(key, order.order_id.clone()) {
                    panic!("one key delivered to orders {other} and {}", order.order_id);
                }
            }
            left -= quantity as usize;
        }
        assert_eq!(owner.len(), keys, "every granted key sold exactly once");
        assert_eq!(client.stock().await, 0);
        let sold_out = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(sold_out.status, 409, "{}", sold_out.text());
    })
    .await;
}
