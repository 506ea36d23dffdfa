//! Proof-of-work challenges on order creation (docs/abuse.md), against the real `edgecard node
//! run` over TLS on loopback. The node trusts `X-Forwarded-For` from loopback, so one test
//! client can speak for many addresses.
//!
//! * a flood from many addresses (one IPv6 /64, and several IPv4 addresses) is let through at the
//!   configured threshold and challenged after it; the same flood with challenges off is not;
//! * a normal buyer, under the default settings, is never challenged;
//! * a flash-sale sku challenges everyone; a solution works once: replayed, forged, altered or
//!   moved to another address it is refused; `edgecard challenge solve` solves it;
//! * the storefront's no-JavaScript fallback: a wait ticket, refused before its delay, accepted
//!   once after it.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{make_secrets, NodeOptions, NodeProcess, TestEnv, SKU};
use edgecard::https_client::{Request, Response};
use serde_json::{json, Value};

/// Flood thresholds of the test node: per address and per /64, in a window far longer than a test.
const PER_IP: usize = 3;
const PER_64: usize = 10;

fn abuse_section(extra: &str) -> String {
    format!(
        "window_secs = 3600\norders_per_ip = {PER_IP}\norders_per_64 = {PER_64}\n\
         min_difficulty = 8\nmax_difficulty = 12\nwait_ticket_secs = 2\n{extra}\n"
    )
}

fn start(env: &TestEnv, keys: usize, abuse: &str) -> NodeProcess {
    // The rate limiter stays in front; here it is wide open, so what is measured is the gate.
    let options = NodeOptions {
        max_open_per_ip: 10_000,
        create_order_limit: (100_000, 100_000),
        abuse: Some(abuse.to_string()),
        ..NodeOptions::with_grants(vec![env.grant_file(&make_secrets(keys))])
    };
    env.start_node(&options)
}

fn order_request(address: &str) -> Request {
    Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "quantity": 1 })).header("x-forwarded-for", address)
}

fn solved_request(address: &str, token: &str, solution: &str) -> Request {
    order_request(address).header("edgecard-challenge", token).header("edgecard-challenge-solution", solution)
}

fn challenge_of(response: &Response) -> Value {
    assert_eq!(response.status, 428, "{}", response.text());
    let body: Value = response.json().unwrap();
    assert_eq!(body["challenge"]["algorithm"], "sha256-leading-zero-bits", "{body}");
    assert!(body["challenge"]["difficulty"].as_u64().unwrap() >= 8, "{body}");
    assert!(body["challenge"]["expires_at"].as_str().unwrap().ends_with('Z'), "{body}");
    body
}

fn cli_solve(token: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edgecard"))
        .args(["challenge", "solve", token])
        .env("EDGECARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Sends `addresses` order attempts that never solve a challenge; returns (created, challenged,
/// seconds taken).
async fn flood(node: &NodeProcess, addresses: &[String]) -> (usize, usize, f64) {
    let mut client = node.client().await;
    let started = Instant::now();
    let (mut created, mut challenged) = (0, 0);
    for address in addresses {
        let response = client.send(order_request(address)).await;
        match response.status {
            201 => created += 1,
            428 => {
                challenge_of(&response);
                challenged += 1;
            }
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    (created, challenged, started.elapsed().as_secs_f64())
}

/// 200 attempts from 200 addresses of one /64, and 20 from each of five IPv4 addresses.
fn flood_addresses() -> Vec<String> {
    let mut addresses: Vec<String> = (1..=200).map(|i| format!("2001:db8:77:1::{i:x}")).collect();
    for _ in 0..20 {
        for host in 1..=5 {
            addresses.push(format!("203.0.113.{host}"));
        }
    }
    addresses
}

#[tokio::test]
async fn a_flood_from_many_addresses_is_slowed_to_the_configured_rate() {
    let addresses = flood_addresses();
    let env = TestEnv::new();
    let node = start(&env, 400, &abuse_section(""));
    let (created, challenged, secs) = flood(&node, &addresses).await;
    // The /64 gets PER_64 orders, each IPv4 address PER_IP: the configured rate per window.
    assert_eq!(created, PER_64 + 5 * PER_IP, "created");
    assert_eq!(challenged, addresses.len() - created);
    let metrics = node.metrics().await;
    assert_eq!(metrics[r#"edgecard_challenges_total{kind="challenge",result="issued"}"#], challenged as f64);
    eprintln!(
        "flood with challenges: {} attempts in {secs:.2} s, {created} orders ({:.1} orders/s), {challenged} challenged",
        addresses.len(),
        created as f64 / secs
    );

    // The same flood against a node with challenges off: every attempt is an order.
    let env = TestEnv::new();
    let open = start(&env, 400, "enabled = false");
    let (created_open, challenged_open, secs_open) = flood(&open, &addresses).await;
    assert_eq!((created_open, challenged_open), (addresses.len(), 0));
    eprintln!(
        "flood without challenges: {} attempts in {secs_open:.2} s, {created_open} orders ({:.1} orders/s)",
        addresses.len(),
        created_open as f64 / secs_open
    );
}

/// Order attempts from ever new addresses of one /64 for `secs`, none solving; (created, attempts).
async fn burst(client: &mut common::Client, secs: u64, first: u32) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut created, mut attempts) = (0, 0);
    while Instant::now() < deadline && attempts < 20_000 {
        let address = format!("2001:db8:99:1::{:x}", first as usize + attempts + 1);
        let response = client.send(order_request(&address)).await;
        attempts += 1;
        if response.status == 201 {
            created += 1;
        } else {
            assert_eq!(response.status, 428, "{}", response.text());
        }
    }
    (created, attempts)
}

/// A flood that keeps going for several windows gets its threshold once and then nothing (its
/// own attempts keep it over the threshold); after a quiet spell of two windows, the threshold
/// again.
#[tokio::test]
async fn a_sustained_flood_gets_the_threshold_per_quiet_window_and_no_more() {
    let env = TestEnv::new();
    let section = "window_secs = 2\norders_per_ip = 4\norders_per_64 = 4\nmin_difficulty = 8\n";
    let node = start(&env, 100, section);
    let mut client = node.client().await;
    let started = Instant::now();
    let (created, attempts) = burst(&mut client, 5, 0).await;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sustained flood: {attempts} attempts in {secs:.2} s ({:.0}/s) from one /64, {created} orders",
        attempts as f64 / secs
    );
    assert_eq!(created, 4, "{attempts} attempts");
    tokio::time::sleep(Duration::from_millis(4_100)).await;
    let (again, _) = burst(&mut client, 1, 100_000).await;
    assert_eq!(again, 4);
}

#[tokio::test]
async fn a_flooder_that_solves_pays_with_work_that_grows() {
    let env = TestEnv::new();
    let node = start(&env, 100, &abuse_section(""));
    let mut client = node.client().await;
    let address = "198.51.100.77";
    let mut difficulties = Vec::new();
    for _ in 0..PER_IP {
        assert_eq!(client.send(order_request(address)).await.status, 201);
    }
    let started = Instant::now();
    for _ in 0..12 {
        let body = challenge_of(&client.send(order_request(address)).await);
        let token = body["challenge"]["token"].as_str().unwrap().to_string();
        difficulties.push(body["challenge"]["difficulty"].as_u64().unwrap());
        let solution = edgecard_node::abuse::challenge::solve(&token, 1 << 24).unwrap().to_string();
        let response = client.send(solved_request(address, &token, &solution)).await;
        assert_eq!(response.status, 201, "{}", response.text());
    }
    eprintln!(
        "solving flooder: 12 orders in {:.2} s ({:.1} orders/s) at difficulties {difficulties:?}",
        started.elapsed().as_secs_f64(),
        12.0 / started.elapsed().as_secs_f64()
    );
    assert_eq!(difficulties[0], 8);
    assert!(difficulties.windows(2).all(|w| w[0] <= w[1]), "{difficulties:?}");
    assert_eq!(*difficulties.last().unwrap(), 12, "{difficulties:?}");
    let solved = node.metrics().await[r#"edgecard_challenges_total{kind="challenge",result="solved"}"#];
    assert_eq!(solved, 12.0);
}

#[tokio::test]
async fn a_normal_buyer_is_never_challenged() {
    let env = TestEnv::new();
    // The default [abuse] settings.
    let options =
        NodeOptions { abuse: Some(String::new()), ..NodeOptions::with_grants(vec![env.grant_file(&make_secrets(10))]) };
    let node = env.start_node(&options);
    let mut client = node.client().await.forwarded_for("198.51.100.20");
    for _ in 0..5 {
        client.buy(1).await;
    }
    let metrics = node.metrics().await;
    let issued = metrics.get(r#"edgecard_challenges_total{kind="challenge",result="issued"}"#).copied();
    assert_eq!(issued.unwrap_or(0.0), 0.0);
}

#[tokio::test]
async fn a_flash_sale_challenges_and_refuses_replayed_or_forged_solutions() {
    let env = TestEnv::new();
    let node = start(&env, 20, &abuse_section(&format!("flash_sale_skus = [\"{SKU}\"]")));
    let mut client = node.client().await;
    let buyer = "198.51.100.30";

    let first = challenge_of(&client.send(order_request(buyer)).await);
    assert_eq!(first["error"]["code"], "challenge_required");
    assert_eq!(first["challenge"]["difficulty"], 8);
    let token = first["challenge"]["token"].as_str().unwrap().to_string();
    let solution = cli_solve(&token);

    // Forged: the token altered (its difficulty byte), or a wrong counter, or another address.
    let mut altered = token.clone();
    altered.replace_range(4..6, "00");
    let refused = challenge_of(&client.send(solved_request(buyer, &altered, &solution)).await);
    assert_eq!(
        (refused["error"]["code"].as_str(), refused["error"]["reason"].as_str()),
        (Some("challenge_invalid"), Some("failed"))
    );
    let solves = |n: u64| {
        edgecard_node::abuse::challenge::leading_zero_bits(&edgecard_node::abuse::challenge::proof_hash(&token, n)) >= 8
    };
    let wrong = (0..1u64 << 20).find(|n| !solves(*n)).unwrap().to_string();
    let wrong_answer = client.send(solved_request(buyer, &token, &wrong)).await;
    assert_eq!(challenge_of(&wrong_answer)["error"]["reason"], "failed");
    let elsewhere = client.send(solved_request("198.51.100.31", &token, &solution)).await;
    assert_eq!(challenge_of(&elsewhere)["error"]["reason"], "failed");

    // The genuine solution orders once; its replay is refused.
    let ordered = client.send(solved_request(buyer, &token, &solution)).await;
    assert_eq!(ordered.status, 201, "{}", ordered.text());
    let replay = client.send(solved_request(buyer, &token, &solution)).await;
    assert_eq!(challenge_of(&replay)["error"]["reason"], "replayed");

    let metrics = node.metrics().await;
    let count = |result: &str| metrics[&format!(r#"edgecard_challenges_total{{kind="challenge",result="{result}"}}"#)];
    assert_eq!(count("solved"), 1.0);
    assert_eq!(count("replayed"), 1.0);
    assert_eq!(count("failed"), 3.0);
    assert_eq!(count("issued"), 5.0);
    let logs = node.stderr();
    assert!(!logs.contains(&token), "a challenge token reached the log");
}

/// POSTs the checkout form as the pages do.
fn checkout(node: &NodeProcess, body: &str) -> Request {
    Request::post("/checkout")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", &node.https_url)
        .header("sec-fetch-site", "same-origin")
        .header("x-forwarded-for", "198.51.100.40")
        .body(body.as_bytes().to_vec())
}

fn hidden_value(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker).unwrap_or_else(|| panic!("no {name} field in {html}")) + marker.len();
    html[start..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn without_javascript_a_wait_ticket_orders_once_after_its_delay() {
    let env = TestEnv::new();
    let node = start(&env, 20, &abuse_section(&format!("flash_sale_skus = [\"{SKU}\"]")));
    let mut client = node.client().await;
    let form = format!("sku={SKU}&quantity=1&email=&currency=USD&channel=sandbox");

    let page = client.send(checkout(&node, &form)).await;
    assert_eq!(page.status, 428);
    assert!(page.header("content-security-policy").unwrap().contains("script-src 'self'"));
    let html = page.text();
    assert!(html.contains("id=\"wait-form\"") && html.contains("id=\"pow-form\""), "{html}");
    let worker_path = html.split("data-worker=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let worker = client.send(Request::get(&worker_path)).await;
    assert_eq!(worker.status, 200);
    assert!(worker.header("content-type").unwrap().starts_with("text/javascript"));
    let ticket = hidden_value(&html, "ticket");

    // Too early: the same ticket again, with the time left.
    let with_ticket = format!("{form}&ticket={ticket}");
    let early = client.send(checkout(&node, &with_ticket)).await;
    assert_eq!(early.status, 428);
    let early_html = early.text();
    assert!(early_html.contains("id=\"too-early\""), "{early_html}");
    assert_eq!(hidden_value(&early_html, "ticket"), ticket);

    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let ordered = client.send(checkout(&node, &with_ticket)).await;
    assert_eq!(ordered.status, 303, "{}", ordered.text());
    assert!(ordered.header("location").unwrap().starts_with("/pay/sandbox/"));

    let replay = client.send(checkout(&node, &with_ticket)).await;
    assert_eq!(replay.status, 428);
    assert!(replay.text().contains("id=\"challenge-refused\""));
    let metrics = node.metrics().await;
    assert_eq!(metrics[r#"edgecard_challenges_total{kind="wait_ticket",result="solved"}"#], 1.0);
    assert_eq!(metrics[r#"edgecard_challenges_total{kind="wait_ticket",result="replayed"}"#], 1.0);
}

#[tokio::test]
async fn bench_purchase_solves_challenges_and_counts_them_as_an_outcome() {
    let env = TestEnv::new();
    let node = start(&env, 20, &abuse_section(&format!("flash_sale_skus = [\"{SKU}\"]")));
    let ca = node.ready["self_signed_cert"].as_str().unwrap().to_string();
    let args = [
        "bench",
        "--url",
        &node.https_url,
        "--ca",
        &ca,
        "--admin-url",
        &node.admin_url,
        "--no-audit",
        "--json",
        "--progress",
        "never",
        "--duration",
        "60",
        "--count",
        "8",
        "--concurrency",
        "2",
        "--sku",
        SKU,
        "purchase",
    ]
    .map(str::to_string);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_edgecard")).args(&args).env("EDGECARD_LOG", "warn").output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["delivered"], 8, "{report}");
    assert_eq!(report["challenges_solved"], 8, "{report}");
    assert_eq!(report["errors"], json!({}), "challenges are no errors: {report}");
}

/// Reservation churn: an address whose unpaid reservations keep expiring is challenged, while its
/// order attempts alone are far under their threshold.
#[tokio::test]
async fn expired_unpaid_reservations_make_an_address_suspicious() {
    let env = TestEnv::new();
    let options = NodeOptions {
        reservation_ttl_secs: 1,
        expiry_sweep_ms: 100,
        abuse: Some("orders_per_ip = 100\nexpired_per_ip = 2\nmin_difficulty = 8\n".into()),
        ..NodeOptions::with_grants(vec![env.grant_file(&make_secrets(10))])
    };
    let node = env.start_node(&options);
    let mut client = node.client().await;
    let hoarder = "198.51.100.60";
    for _ in 0..2 {
        assert_eq!(client.send(order_request(hoarder)).await.status, 201);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metric("edgecard_orders_expired_total").await < 2.0 {
        assert!(Instant::now() < deadline, "the reservations did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    challenge_of(&client.send(order_request(hoarder)).await);
    assert_eq!(client.send(order_request("198.51.100.61")).await.status, 201, "another address is not");
}
