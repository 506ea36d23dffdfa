//! `edgecard bench` end to end with the real binary: a real coordinator and node (processes,
//! loopback, sled on disk, QUIC sync), a purchase run with the ledger audit, then a flash sale
//! that sells the rest of the stock out. Both must pass the audit with matching counts.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::coordinator::{edgecard, start_node, wait_for_stock, Lab, Ports};
use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(180);
const STOCK: u64 = 240;
const PURCHASES: u64 = 100;

async fn bench(lab: &Lab, node: &NodeProcess, args: &[&str]) -> (Option<i32>, Value, String) {
    let ca = node.ready["self_signed_cert"].as_str().unwrap().to_string();
    let admin_url = lab.admin_url();
    let mut full = vec![
        "bench",
        "--url",
        &node.https_url,
        "--ca",
        &ca,
        "--admin-url",
        &node.admin_url,
        "--json",
        "--progress",
        "never",
        "--audit-timeout",
        "20",
        "--duration",
        "25",
    ];
    full.extend_from_slice(args);
    let env = [("EDGECARD_ADMIN_URL", admin_url.as_str()), ("EDGECARD_ADMIN_TOKEN", lab.token.as_str())];
    let out = edgecard(&full, &env).await;
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bench output is not JSON ({e}):\n{}\n{}", out.stdout, out.stderr));
    (out.code, report, out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_purchases_and_a_flash_sale_pass_the_ledger_audit() {
    bounded("bench end to end", LIMIT, async {
        let lab = Lab::start(Ports::Any).await;
        lab.add_product(SKU, PRICE_MINOR).await;
        lab.import(SKU, &make_secrets(STOCK as usize)).await;
        let config = lab.add_node("eu-1", "eu").await;
        lab.allocate(SKU, "eu-1", STOCK).await;
        let node = start_node(&config).await;
        wait_for_stock(&node, STOCK).await;

        // Purchases, bounded by count.
        let count = PURCHASES.to_string();
        let (code, report, stderr) =
            bench(&lab, &node, &["purchase", "--count", &count, "--concurrency", "4", "--sku", SKU]).await;
        assert_eq!(code, Some(0), "{report:#}\n{stderr}");
        assert_eq!(report["completed"], PURCHASES, "{report:#}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
        assert_eq!(report["payment_success"], 1.0, "{report:#}");
        let audit = &report["audit"];
        assert_eq!(audit["passed"], true, "{audit:#}");
        assert_eq!(audit["caught_up"], true, "{audit:#}");
        assert_eq!(audit["delivered_seen"], PURCHASES, "{audit:#}");
        assert_eq!(audit["ledger_delivered"], PURCHASES, "{audit:#}");
        assert_eq!(audit["keys_seen_twice"].as_array().map(Vec::len), Some(0), "{audit:#}");
        assert_eq!(audit["new_alarms"], 0, "{audit:#}");
        // Store figures come from the node's metrics: at least one durable flush per purchase
        // pair of commits was observed, and the commit wait is reported.
        let store = &report["store"][0];
        assert!(store["flush"]["count"].as_f64().unwrap() >= 1.0, "{store:#}");
        assert!(store["commit_wait"]["count"].as_f64().unwrap() >= PURCHASES as f64, "{store:#}");
        let steps: Vec<&str> =
            report["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
        assert_eq!(steps, ["create", "pay", "fetch keys", "purchase"]);
        assert_eq!(report["steps"][3]["count"], PURCHASES);

        // A flash sale on what is left: 16 buyers at once until sold out.
        let (code, report, stderr) = bench(
            &lab,
            &node,
            &["flash-sale", "--concurrency", "16", "--sku", SKU, "--baseline", "--baseline-secs", "1"],
        )
        .await;
        assert_eq!(code, Some(0), "{report:#}\n{stderr}");
        let left = STOCK - PURCHASES;
        assert_eq!(report["flash_sale"]["sold_out"], true, "{report:#}");
        assert_eq!(report["flash_sale"]["keys_sold"], left, "{report:#}");
        assert_eq!(report["delivered"], left, "{report:#}");
        assert!(report["errors"]["sold_out"].as_u64().unwrap() >= 1, "{report:#}");
        assert_eq!(report["error_rate"], 0.0, "sold out is not an error: {report:#}");
        let audit = &report["audit"];
        assert_eq!(audit["passed"], true, "{audit:#}");
        assert_eq!(audit["ledger_delivered"], left, "{audit:#}");
        assert!(report["baseline"]["requests"].as_u64().unwrap() > 0, "{report:#}");

        // The ledger agrees: every key sold once.
        let orders = lab.orders().await;
        let delivered = orders.iter().filter(|o| o["status"] == "delivered").count() as u64;
        assert_eq!(delivered, STOCK);
        assert!(common::coordinator::duplicate_key_ids(
            &orders.iter().filter(|o| o["status"] == "delivered").cloned().collect::<Vec<_>>()
        )
        .is_empty());
    })
    .await;
}
