//! The operations kit checked with the real tools (Debian's `prometheus` package, installed by
//! `.ci/install-tools`): `promtool check metrics` on every metrics endpoint of a running lab (a
//! coordinator and a node that sold), and `promtool check config`, `check rules` and `test rules`
//! on `deploy/prometheus/`. A missing promtool fails the tests with the command that installs it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::coordinator::*;
use common::*;
use edgecard::https_client::{Endpoint, Request};
use tokio::io::AsyncWriteExt;

/// Bound on one promtool run.
const PROMTOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the whole lab test.
const LAB_LIMIT: Duration = Duration::from_secs(120);

/// What one promtool run printed.
struct PromtoolOutput {
    success: bool,
    text: String,
}

/// `promtool` from PATH; panics with how to install it when it is not there.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("promtool"))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| {
        panic!("promtool is not installed: run `bash .ci/install-tools` (Debian's prometheus package provides it)")
    })
}

/// Runs `promtool ARGS` (in the repository root, `stdin` fed to it), bounded by
/// [`PROMTOOL_TIMEOUT`].
async fn run_promtool(args: &[&str], stdin: Option<&str>) -> PromtoolOutput {
    let mut command = tokio::process::Command::new(promtool());
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = tokio::time::timeout(PROMTOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("promtool {args:?} did not finish within {PROMTOOL_TIMEOUT:?}"))
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    PromtoolOutput { success: output.status.success(), text }
}

/// `promtool check metrics` on `text`: every lint it prints is a failure.
async fn check_metrics(text: &str) -> PromtoolOutput {
    run_promtool(&["check", "metrics"], Some(text)).await
}

fn read_metrics_token(coordinator_dir: &Path) -> String {
    let config: toml::Table =
        std::fs::read_to_string(coordinator_dir.join("coordinator.toml")).unwrap().parse().unwrap();
    let token = config["metrics_token"].as_str().unwrap().to_string();
    assert!(token.len() >= 16, "coordinator init writes a metrics token: {token:?}");
    token
}

async fn get(endpoint: &Endpoint, path: &str, token: Option<&str>) -> edgecard::https_client::Response {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header("authorization", &format!("Bearer {token}"));
    }
    endpoint.request(request).await.unwrap()
}

/// The checker bites: lines as the node and the coordinator exposed them before this kit fail
/// `promtool check metrics` with the lints that named them.
#[tokio::test]
async fn promtool_check_metrics_refuses_the_old_unit_names() {
    let old_node = "# HELP edgecard_payment_create_milliseconds_total Time spent creating payments, in ms.\n\
                    # TYPE edgecard_payment_create_milliseconds_total counter\n\
                    edgecard_payment_create_milliseconds_total{channel=\"sandbox\"} 0\n";
    let old_coordinator = "# HELP edgecard_node_last_contact_ms Unix ms of each node's last upload.\n\
                           # TYPE edgecard_node_last_contact_ms gauge\n\
                           edgecard_node_last_contact_ms{node=\"eu-1\"} 1765000000000\n";
    let node = check_metrics(old_node).await;
    assert!(!node.success, "{}", node.text);
    assert!(node.text.contains("use base unit \"seconds\" instead of \"milliseconds\""), "{}", node.text);
    let coordinator = check_metrics(old_coordinator).await;
    assert!(!coordinator.success, "{}", coordinator.text);
    assert!(coordinator.text.contains("metric names should not contain abbreviated units"), "{}", coordinator.text);
}

/// A coordinator and a node that sold one key: both `/metrics` pass `promtool check metrics`
/// with no lint, carry the series the alerts and the dashboard use, and the coordinator's
/// answers the read-only metrics token (and the admin token) but nothing else answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_of_a_lab_passes_promtool() {
    let lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(10)).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", 6).await;
    let node = start_node(&config).await;
    wait_for_stock(&node, 6).await;
    let metrics_token = read_metrics_token(&lab.coordinator_dir());
    let coordinator = Endpoint::parse(&lab.admin_url(), None).unwrap();

    bounded("lab metrics", LAB_LIMIT, async {
        let mut client = node.client().await;
        let (_, keys) = client.buy(1).await;
        assert_eq!(keys.len(), 1);
        assert_eq!(client.products().await.len(), 1);

        let node_text = node.metrics_text().await;
        let node_check = check_metrics(&node_text).await;
        assert!(node_check.success && node_check.text.is_empty(), "node metrics:\n{}\n{node_text}", node_check.text);
        for series in [
            "edgecard_build_info{node=\"eu-1\",region=\"eu\",component=\"node\"",
            "process_cpu_seconds_total{node=\"eu-1\",region=\"eu\"}",
            "process_resident_memory_bytes{",
            "process_open_fds{",
            "process_start_time_seconds{",
            "edgecard_http_request_duration_seconds_bucket{node=\"eu-1\",region=\"eu\",route=\"/api/v1/orders\",method=\"POST\",class=\"2xx\",le=",
            "edgecard_payment_create_seconds_count{node=\"eu-1\",region=\"eu\",channel=\"sandbox\",result=\"ok\"} 1",
            "edgecard_payment_callbacks_total{node=\"eu-1\",region=\"eu\",channel=\"sandbox\",result=\"accepted\"} 1",
            "edgecard_purchases_total{node=\"eu-1\",region=\"eu\"} 1",
            "edgecard_stock_keys{node=\"eu-1\",region=\"eu\",sku=\"game-10\"} 5",
            "edgecard_store_health{node=\"eu-1\",region=\"eu\"} 0",
            "edgecard_sync_last_ack_timestamp_seconds{",
        ] {
            assert!(node_text.contains(series), "node metrics lack {series}:\n{node_text}");
        }

        let answered = get(&coordinator, "/metrics", Some(&metrics_token)).await;
        assert_eq!(answered.status, 200, "{}", answered.text());
        let coordinator_text = answered.text();
        let coordinator_check = check_metrics(&coordinator_text).await;
        assert!(
            coordinator_check.success && coordinator_check.text.is_empty(),
            "coordinator metrics:\n{}\n{coordinator_text}",
            coordinator_check.text
        );
        for series in [
            "edgecard_build_info{component=\"coordinator\"",
            "process_cpu_seconds_total ",
            "edgecard_node_last_contact_timestamp_seconds{node=\"eu-1\",region=\"eu\"}",
            "edgecard_inventory_keys{sku=\"game-10\",state=\"pool\"} 4",
            "edgecard_inventory_keys{sku=\"game-10\",state=\"granted\"}",
            "edgecard_slice_lease_deadline_timestamp_seconds{slice=\"1\",node=\"eu-1\",sku=\"game-10\"}",
            "edgecard_ledger_alarms_total{kind=\"node_rolled_back\"} 0",
            "edgecard_store_commit_seconds_bucket{le=",
        ] {
            assert!(coordinator_text.contains(series), "coordinator metrics lack {series}:\n{coordinator_text}");
        }

        // The metrics token opens /metrics and nothing else; the admin token opens it too.
        assert_eq!(get(&coordinator, "/metrics", Some(&lab.token)).await.status, 200);
        assert_eq!(get(&coordinator, "/metrics", None).await.status, 401);
        assert_eq!(get(&coordinator, "/metrics", Some("not-the-metrics-token")).await.status, 401);
        for path in ["/v1/status", "/v1/products", "/v1/orders", "/v1/nodes"] {
            assert_eq!(get(&coordinator, path, Some(&metrics_token)).await.status, 401, "{path}");
        }
        let write = coordinator
            .request(
                Request::post_json("/v1/products", &serde_json::json!({ "sku": "x", "title": {}, "prices": [] }))
                    .header("authorization", &format!("Bearer {metrics_token}")),
            )
            .await
            .unwrap();
        assert_eq!(write.status, 401, "{}", write.text());
        for secret in &keys {
            assert!(!node_text.contains(secret.as_str()) && !coordinator_text.contains(secret.as_str()));
        }
    })
    .await;
}

/// The scrape configuration and the alert rules shipped in `deploy/prometheus/` are valid, and
/// every alert fires on its synthetic series and stays silent on healthy ones
/// (`alerts_test.yml`).
#[tokio::test]
async fn deploy_prometheus_config_and_alert_rules_pass_promtool() {
    let rules = run_promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None).await;
    assert!(rules.success, "promtool check rules:\n{}", rules.text);
    let tests = run_promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"], None).await;
    assert!(tests.success, "promtool test rules:\n{}", tests.text);
    assert!(tests.text.contains("SUCCESS"), "{}", tests.text);
    let config = run_promtool(&["check", "config", "--syntax-only", "deploy/prometheus/prometheus.yml"], None).await;
    assert!(config.success, "promtool check config:\n{}", config.text);

    // Every alert has a unit test where it fires, and a runbook section.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let (rules, unit_tests, runbook) =
        (read("deploy/prometheus/alerts.yml"), read("deploy/prometheus/alerts_test.yml"), read("docs/runbook.md"));
    let names: Vec<&str> = rules.lines().filter_map(|line| line.trim().strip_prefix("- alert: ")).collect();
    assert!(names.len() >= 15, "{names:?}");
    for name in names {
        let fires = format!("alertname: {name}\n        exp_alerts:\n          - exp_labels:");
        assert!(unit_tests.contains(&fires), "alerts_test.yml never expects {name} to fire");
        assert!(runbook.contains(&format!("\n### {name}\n")), "docs/runbook.md has no section for {name}");
    }
}
