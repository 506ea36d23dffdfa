//! Per-client rate limits and the open-reservation cap, against a real node: who counts as "one
//! client" depends on the trusted proxies, and spoofed forwarding headers must not help.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgecard::https_client::Response;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
const BURST: u32 = 3;

/// A node whose order creation allows `BURST` at once and then one per second.
fn limited(env: &TestEnv, trusted_proxies: &[&str], header: &str) -> NodeProcess {
    let secrets = make_secrets(40);
    env.start_node(&NodeOptions {
        create_order_limit: (1, BURST),
        max_open_per_ip: 20,
        trusted_proxies: trusted_proxies.iter().map(|s| s.to_string()).collect(),
        client_ip_header: header.to_string(),
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    })
}

fn retry_after(response: &Response) -> u64 {
    response
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", response.headers))
        .parse()
        .unwrap()
}

/// Sends `n` order requests in a row, the i-th with X-Forwarded-For `forwarded(i)` when given.
/// Returns the statuses and how long the burst took.
async fn burst(
    client: &mut Client,
    n: usize,
    forwarded: Option<&dyn Fn(usize) -> String>,
) -> (Vec<u16>, Vec<Response>, Duration) {
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut limited = Vec::new();
    for i in 0..n {
        client.forwarded_for = forwarded.map(|f| f(i));
        let response = client.create_order(&json!({ "sku": SKU })).await;
        statuses.push(response.status);
        match response.status {
            201 => {}
            429 => limited.push(response),
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    (statuses, limited, started.elapsed())
}

/// At most `BURST` plus what refilled during the burst got through, and the rest were limited.
fn assert_limited(statuses: &[u16], limited: &[Response], elapsed: Duration) {
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    let refilled = elapsed.as_secs() as usize + 1;
    assert!(accepted >= BURST as usize, "{statuses:?}");
    assert!(accepted <= BURST as usize + refilled, "{accepted} accepted in {elapsed:?}: {statuses:?}");
    assert_eq!(&statuses[..BURST as usize], &[201; BURST as usize], "{statuses:?}");
    assert!(!limited.is_empty(), "{statuses:?}");
    for response in limited {
        assert_eq!(error_code(response), "rate_limited");
        assert!(retry_after(response) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_address_gets_429_with_retry_after() {
    let env = TestEnv::new();
    let node = limited(&env, &[], "none");
    bounded("burst", LIMIT, async {
        let mut client = node.client().await;
        let (statuses, limited, elapsed) = burst(&mut client, 10, None).await;
        assert_limited(&statuses, &limited, elapsed);
        assert!(node.metric("edgecard_http_rate_limited_total").await >= limited.len() as f64);

        // Other request classes have their own budget.
        assert_eq!(client.stock().await, 40 - (statuses.iter().filter(|s| **s == 201).count() as u64));

        // The budget refills at the sustained rate.
        let wait = retry_after(limited.last().unwrap());
        tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
        let response = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(response.status, 201, "after Retry-After: {}", response.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit() {
    let env = TestEnv::new();
    // The header is configured, but no proxy is trusted: loopback is the client.
    let node = limited(&env, &[], "x-forwarded-for");
    bounded("spoofed burst", LIMIT, async {
        let mut client = node.client().await;
        let spoofed = |i: usize| format!("198.18.7.{}", i + 1);
        let (statuses, limited, elapsed) = burst(&mut client, 10, Some(&spoofed)).await;
        assert_limited(&statuses, &limited, elapsed);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_gets_a_budget_per_forwarded_client() {
    let env = TestEnv::new();
    let node = limited(&env, &["127.0.0.1/32"], "x-forwarded-for");
    bounded("per-client budgets", LIMIT, async {
        let mut client = node.client().await;
        let clients = 5;
        let mut accepted = 0;
        for round in 0..BURST {
            for c in 0..clients {
                client.forwarded_for = Some(format!("198.18.9.{}", c + 1));
                let response = client.create_order(&json!({ "sku": SKU })).await;
                assert_eq!(response.status, 201, "client {c}, request {round}: {}", response.text());
                accepted += 1;
            }
        }
        assert_eq!(accepted, clients * BURST as usize);

        // Client 1 has used its burst; a fresh client has not. A spoofed entry to the left of
        // the client's address (the proxy appends the real one) does not help either.
        client.forwarded_for = Some("198.18.9.1".into());
        let response = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(response.status, 429, "{}", response.text());
        assert!(retry_after(&response) >= 1);
        client.forwarded_for = Some("203.0.113.50, 198.18.9.1".into());
        let response = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(response.status, 429, "{}", response.text());
        client.forwarded_for = Some("198.18.9.200".into());
        let response = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(response.status, 201, "{}", response.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reservations_are_capped_per_address() {
    let env = TestEnv::new();
    let secrets = make_secrets(10);
    let node = env.start_node(&NodeOptions {
        max_open_per_ip: 2,
        trusted_proxies: Vec::new(),
        client_ip_header: "none".into(),
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    });
    bounded("reservation cap", LIMIT, async {
        let mut client = node.client().await;
        let first = client.reserve(1).await;
        let _second = client.reserve(1).await;
        let third = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(third.status, 429, "{}", third.text());
        assert_eq!(error_code(&third), "too_many_open_orders");
        assert!(retry_after(&third) >= 1);
        assert_eq!(client.stock().await, 8, "the refused order holds no key");
        assert_eq!(node.metric("edgecard_reservation_cap_hits_total").await, 1.0);

        // Paying one frees a slot.
        let paid = client.pay(&first.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        let _third = client.reserve(1).await;
        let fourth = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(fourth.status, 429, "{}", fourth.text());
        assert_eq!(error_code(&fourth), "too_many_open_orders");
    })
    .await;
}
