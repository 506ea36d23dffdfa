//! The tester is tested: `edgecard bench` runs against a small fake HTTPS node and a fake
//! coordinator admin API (both in this process, loopback only), and its audit must catch a
//! deliberately injected double delivery, whether the buyers see it (the node shows one key to
//! two orders) or only the ledger does (the coordinator lists one key in two delivered orders).
//! A control run with an honest fake must pass, so the test can fail both ways.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgecard::bench::{self, BenchArgs, Progress, Scenario};
use edgecard_node::http_server::{self, handler_fn, ServerOptions};
use edgecard_node::tls;
use http_body_util::Full;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;

const TOKEN: &str = "fake-coordinator-token";
const LIMIT: Duration = Duration::from_secs(60);

/// How the fakes misbehave.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// The node shows the same key to every order.
    NodeRepeatsAKey,
    /// The ledger lists key 1 in every delivered order.
    LedgerRepeatsAKey,
}

/// Orders the fake node created, in order; the fake ledger lists them.
type Orders = Arc<Mutex<Vec<String>>>;

struct Fakes {
    node_url: String,
    ca_file: tempfile::NamedTempFile,
    coordinator_url: String,
    _stop: watch::Sender<bool>,
}

fn json_response(status: u16, body: &Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn start_fakes(fault: Fault) -> Fakes {
    let (stop, stop_rx) = watch::channel(false);
    let orders: Orders = Arc::default();

    // The fake node: the buyer API's happy path, nothing else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = listener.local_addr().unwrap();
    let node_url = format!("https://{node_addr}");
    let ss = tls::self_signed(&["127.0.0.1".to_owned()]).unwrap();
    let config = tls::server_config_from_pem(ss.cert_pem.as_bytes(), ss.key_pem.as_bytes()).unwrap();
    let node_orders = orders.clone();
    let base = node_url.clone();
    let node = handler_fn(move |req: hyper::Request<hyper::body::Incoming>, _peer: SocketAddr| {
        let orders = node_orders.clone();
        let base = base.clone();
        async move {
            let path = req.uri().path().to_string();
            match (req.method().as_str(), path.as_str()) {
                ("POST", "/api/v1/orders") => {
                    let id = hex::encode(rand::random::<[u8; 16]>());
                    orders.lock().push(id.clone());
                    let body =
                        json!({ "order_id": id, "token": "t0k3n", "pay_url": format!("{base}/pay/sandbox/{id}") });
                    json_response(201, &body)
                }
                ("POST", p) if p.starts_with("/pay/sandbox/") => json_response(200, &json!({ "status": "delivered" })),
                ("GET", p) if p.starts_with("/api/v1/orders/") => {
                    let id = p.trim_start_matches("/api/v1/orders/");
                    let key =
                        if fault == Fault::NodeRepeatsAKey { "SAME-KEY".to_string() } else { format!("KEY-{id}") };
                    json_response(200, &json!({ "status": "delivered", "keys": [key] }))
                }
                _ => json_response(404, &json!({ "error": { "code": "not_found", "message": "no" } })),
            }
        }
    });
    tokio::spawn(http_server::serve(listener, Some(config), node, ServerOptions::default(), stop_rx.clone()));

    // The fake coordinator admin API: every order the node created, delivered, one key each.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator_url = format!("http://{}", listener.local_addr().unwrap());
    let ledger_orders = orders.clone();
    let coordinator = handler_fn(move |req: hyper::Request<hyper::body::Incoming>, _peer: SocketAddr| {
        let orders = ledger_orders.clone();
        async move {
            let authorized =
                req.headers().get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"));
            if !authorized {
                return json_response(401, &json!({ "error": { "code": "unauthorized", "message": "token" } }));
            }
            match req.uri().path() {
                "/v1/orders" => {
                    let ledger: Vec<Value> = orders
                        .lock()
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            let key_id = if fault == Fault::LedgerRepeatsAKey { 1 } else { i as u64 + 1 };
                            json!({ "order_id": id, "node": "fake-1", "sku": "game-10", "status": "delivered",
                                    "key_ids": [key_id], "created_at": 1, "quantity": 1 })
                        })
                        .collect();
                    json_response(200, &json!(ledger))
                }
                "/v1/alarms" => json_response(200, &json!([])),
                _ => json_response(404, &json!({ "error": { "code": "not_found", "message": "no" } })),
            }
        }
    });
    tokio::spawn(http_server::serve(listener, None, coordinator, ServerOptions::default(), stop_rx));

    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut ca_file, ss.cert_pem.as_bytes()).unwrap();
    Fakes { node_url, ca_file, coordinator_url, _stop: stop }
}

fn args(fakes: &Fakes, count: u64) -> BenchArgs {
    BenchArgs {
        scenario: Scenario::Purchase,
        urls: vec![fakes.node_url.clone()],
        ca: Some(fakes.ca_file.path().to_path_buf()),
        concurrency: 4,
        duration: 30,
        count: Some(count),
        sku: Some("game-10".into()),
        baseline: false,
        baseline_secs: 1,
        // A plain-HTTP listener that is not a node: no metrics, and the bench must cope.
        admin_urls: Vec::new(),
        coordinator_url: Some(fakes.coordinator_url.clone()),
        coordinator_token: Some(TOKEN.into()),
        no_audit: false,
        audit_timeout: 5,
        json: true,
        strict: false,
        progress: Progress::Never,
        min_tps: 1.0,
        max_avg_ms: 500.0,
        max_p99_ms: 500.0,
        max_error_rate: 0.1,
        min_payment_success: 99.5,
        max_store_commit_ms: 50.0,
    }
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_shop_passes_the_audit() {
    let fakes = start_fakes(Fault::None).await;
    let report = bounded("bench", bench::execute(&args(&fakes, 40))).await.unwrap();
    let audit = report.audit.clone().expect("the audit ran");
    assert!(audit.passed, "{audit:?}");
    assert_eq!((audit.orders_seen, audit.paid_seen, audit.delivered_seen), (40, 40, 40));
    assert_eq!((audit.ledger_known, audit.ledger_delivered), (40, 40));
    assert!(audit.caught_up);
    assert_eq!(report.completed, 40);
    assert_eq!(report.payment_success, Some(1.0));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.passed, "{:?}", report.kpis);
    // The CLI path succeeds too.
    bounded("bench run", bench::run(args(&fakes, 5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_a_key_shown_to_two_buyers() {
    let fakes = start_fakes(Fault::NodeRepeatsAKey).await;
    let report = bounded("bench", bench::execute(&args(&fakes, 10))).await.unwrap();
    let audit = report.audit.clone().expect("the audit ran");
    assert!(!audit.passed, "{audit:?}");
    // Ten orders shown one key: every order after the first repeats it.
    assert_eq!(audit.keys_seen_twice.len(), 9, "{audit:?}");
    assert!(audit.ledger_keys_twice.is_empty(), "the ledger itself is clean: {audit:?}");
    assert!(!report.passed);
    let double = report.kpis.iter().find(|k| k.name == "keys delivered twice").expect("the KPI is listed");
    assert_eq!(double.measured, 9.0);
    assert!(!double.pass);
    // The table names the orders, never the key.
    let table = report.render_table();
    assert!(table.contains("DOUBLE DELIVERY: orders"), "{table}");
    assert!(!table.contains("SAME-KEY"), "{table}");
    // The CLI fails the run.
    let err = bounded("bench run", bench::run(args(&fakes, 3))).await.unwrap_err();
    assert!(err.to_string().contains("audit failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_a_key_the_ledger_delivered_twice() {
    let fakes = start_fakes(Fault::LedgerRepeatsAKey).await;
    let report = bounded("bench", bench::execute(&args(&fakes, 6))).await.unwrap();
    let audit = report.audit.clone().expect("the audit ran");
    assert!(!audit.passed, "{audit:?}");
    assert!(audit.keys_seen_twice.is_empty(), "the buyers saw distinct keys: {audit:?}");
    assert_eq!(audit.ledger_keys_twice.len(), 1, "{audit:?}");
    let duplicate = &audit.ledger_keys_twice[0];
    assert_eq!((duplicate.sku.as_str(), duplicate.key_id), ("game-10", 1));
    assert_eq!(duplicate.orders.len(), 6);
    assert!(report.render_table().contains("DOUBLE DELIVERY in the ledger: key 1 of game-10"));
    assert!(!report.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_coordinator_token_is_an_error_not_a_pass() {
    let fakes = start_fakes(Fault::None).await;
    let mut bad = args(&fakes, 2);
    bad.coordinator_token = Some("wrong".into());
    let err = bounded("bench", bench::execute(&bad)).await.unwrap_err();
    assert!(format!("{err:#}").contains("unauthorized"), "{err:#}");
}
