//! Sync over a bad link, with real processes: the node reaches the coordinator through a UDP relay
//! on loopback that loses 30% of datagrams both ways and delays the rest by 100 ms, while buyers
//! keep buying at a steady rate. The node must never stop selling for want of acknowledgements
//! (`stock_syncing`), and the ledger must catch up soon after the buying stops.
//!
//! The run is short in CI; `EDGECARD_LOSSY_SECS` and `EDGECARD_LOSSY_RATE` (purchases per second)
//! make it longer or faster (docs/benchmarks.md has a longer run's figures).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/udp_relay.rs"]
mod udp_relay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::coordinator::*;
use common::*;
use udp_relay::UdpRelay;

const LOSS_PERCENT: u32 = 30;
const DELAY: Duration = Duration::from_millis(100);
/// Sales a node may have unacknowledged per slice: 20 s of buying at the default rate, so a sync
/// that stalls for longer (as it did before: one upload cut at 10 s and resent whole, again and
/// again) shows up as `stock_syncing`.
const TAKE_WINDOW: u64 = 2_000;
const BUYERS: u64 = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    bought: AtomicU64,
    syncing: AtomicU64,
    other: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_keeps_up_through_a_lossy_slow_link() {
    let seconds = env_u64("EDGECARD_LOSSY_SECS", 15);
    let rate = env_u64("EDGECARD_LOSSY_RATE", 100);
    let keys = rate * seconds * 2 + 100;
    let lab = Lab::start_with_config(Ports::Any, &[("take_window", toml::Value::Integer(TAKE_WINDOW as i64))]).await;
    let relay = UdpRelay::start(lab.coordinator.sync_addr).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(keys as usize)).await;
    let config = lab.add_node("eu-1", "eu").await;
    set_toml_field(&config, "coordinator", "addr", toml::Value::String(relay.addr.to_string()));
    lab.allocate(SKU, "eu-1", keys).await;
    let node = {
        let config = config.clone();
        blocking(move || {
            NodeProcess::start(
                &config,
                &[("EDGECARD_LOG".to_string(), "info,edgecard_node::sync_link=debug".to_string())],
            )
        })
        .await
    };
    wait_for_stock(&node, keys).await;
    relay.impair(LOSS_PERCENT, DELAY, 0x5eed);

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let run_for = Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..BUYERS {
        let mut client = node.client().await;
        let tally = tally.clone();
        let every = Duration::from_micros(1_000_000 * BUYERS / rate.max(1));
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            while started.elapsed() < run_for {
                next += every;
                let response = client.create_order(&serde_json::json!({ "sku": SKU, "quantity": 1 })).await;
                if response.status == 201 {
                    let order = Created::from_response(&response);
                    let paid = client.pay(&order.pay_url).await;
                    let counter = if paid.status == 200 { &tally.bought } else { &tally.other };
                    counter.fetch_add(1, Ordering::Relaxed);
                } else if error_code(&response) == "stock_syncing" {
                    tally.syncing.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.other.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    let mut worst_lag = 0.0f64;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(500)).await;
        worst_lag = worst_lag.max(node.metric("edgecard_sync_lag_events").await);
    }
    for task in tasks {
        task.await.unwrap();
    }
    let bought = tally.bought.load(Ordering::Relaxed);
    // Polled here rather than with `Lab::wait_for_ledger`, so that a failure shows the node's
    // sync log, which says where the tail of the outbox waited.
    let stopped = Instant::now();
    let caught_up = loop {
        let orders = lab.orders().await;
        if orders.iter().filter(|o| o["status"] == "delivered").count() as u64 >= bought {
            break stopped.elapsed();
        }
        if stopped.elapsed() > Duration::from_secs(60) {
            let log = node.stderr();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            panic!(
                "the ledger did not catch up within 60 s of the end ({} orders; {bought} bought)\n\
                 status: {:#}\nnode log tail:\n{}",
                orders.len(),
                lab.status().await,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "{seconds} s at {rate}/s through {LOSS_PERCENT}% loss + {DELAY:?}: {bought} bought, {} stock_syncing, \
         {} other, worst lag {worst_lag} events, ledger complete {caught_up:?} after buying stopped \
         ({} datagrams relayed, {} lost)",
        tally.syncing.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        relay.forwarded(),
        relay.dropped(),
    );
    assert_eq!(tally.other.load(Ordering::Relaxed), 0, "purchases failed");
    assert_eq!(tally.syncing.load(Ordering::Relaxed), 0, "the node stopped selling for want of acknowledgements");
    assert!(bought >= rate * seconds * 8 / 10, "the buyers kept their pace: {bought} purchases");
    assert!(caught_up < Duration::from_secs(45), "the ledger caught up {caught_up:?} after the end");
}
