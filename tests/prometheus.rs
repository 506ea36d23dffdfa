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

/// Bound on a real Prometheus server starting, finding its targets up, and every query of the
/// dashboard returning data.
const SERVER_LIMIT: Duration = Duration::from_secs(90);
/// Most purchases the lab makes while Prometheus scrapes it (its node holds more keys).
const PURCHASE_BUDGET: u32 = 300;

/// A `prometheus` server process on loopback; killed on drop. Its log goes to a file in `dir`.
struct PrometheusServer {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl PrometheusServer {
    fn start(dir: &Path, config: &Path) -> PrometheusServer {
        let binary = promtool().with_file_name("prometheus");
        assert!(binary.is_file(), "prometheus is not installed next to promtool: run `bash .ci/install-tools`");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = std::process::Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        PrometheusServer { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query-string component.
fn encode_component(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /api/v1/...` of the server: the `data` of a successful answer, or the error text.
async fn api(server: &Endpoint, path_and_query: &str) -> Result<serde_json::Value, String> {
    let response = server.request(Request::get(path_and_query)).await.map_err(|e| e.to_string())?;
    let body: serde_json::Value = response.json().map_err(|e| format!("{e}: {}", response.text()))?;
    if body["status"] == "success" {
        Ok(body["data"].clone())
    } else {
        Err(body.to_string())
    }
}

/// Whether an instant query returns at least one sample with a finite value.
async fn query_has_data(server: &Endpoint, query: &str) -> Result<bool, String> {
    let data = api(server, &format!("/api/v1/query?query={}", encode_component(query))).await?;
    let samples = data["result"].as_array().cloned().unwrap_or_default();
    Ok(samples.iter().any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite)))
}

/// The PromQL of every `expr:` in alerts.yml (one line, or a `|` block), comments dropped.
fn alert_expressions(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else { continue };
        let without_comment = |text: &str| text.split(" # ").next().unwrap_or("").trim().to_string();
        if value.trim() == "|" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<String> = lines[i + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent)
                .map(|l| without_comment(l))
                .collect();
            exprs.push(block.join(" "));
        } else {
            exprs.push(without_comment(value));
        }
    }
    exprs
}

/// The selectors of `expr` on Edgecard's, process and `up` series: (metric name, label names
/// its matchers use).
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = without_label_lists(expr).chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !(chars[i].is_ascii_alphabetic() || chars[i] == '_') || (i > 0 && chars[i - 1].is_ascii_alphanumeric()) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !(name.starts_with("edgecard_") || name.starts_with("process_") || name == "up") {
            continue;
        }
        let mut labels = Vec::new();
        if chars.get(i) == Some(&'{') {
            let end = chars[i..].iter().position(|c| *c == '}').map(|p| i + p).unwrap();
            let inside: String = chars[i + 1..end].iter().collect();
            for matcher in inside.split(',').filter(|m| !m.trim().is_empty()) {
                let label = matcher.split(['=', '!', '~']).next().unwrap().trim().to_string();
                labels.push(label);
            }
            i = end + 1;
        }
        found.push((name, labels));
    }
    found
}

/// `expr` without the label lists of `by (…)`, `without (…)`, `on (…)`, `ignoring (…)` and
/// `group_left/right (…)`, whose label names are not selectors.
fn without_label_lists(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    'scan: while !rest.is_empty() {
        for keyword in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
            let Some(after) = rest.strip_prefix(keyword) else { continue };
            let preceded_by_word = out.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let list = after.trim_start();
            if !preceded_by_word && list.starts_with('(') {
                if let Some(end) = list.find(')') {
                    out.push_str(keyword);
                    rest = &list[end + 1..];
                    continue 'scan;
                }
            }
        }
        let mut chars = rest.chars();
        out.extend(chars.next());
        rest = chars.as_str();
    }
    out
}

#[test]
fn alert_expressions_and_selectors_are_read_from_the_rules() {
    let rules = "      - alert: A\n        expr: up{job=\"x\"} == 0 # tune\n      - alert: B\n        expr: |\n          sum(rate(edgecard_a_total{class=\"5xx\", route=~\"/x\"}[5m]))\n            / sum(rate(edgecard_a_total[5m])) > 0.02\n        for: 5m\n";
    let exprs = alert_expressions(rules);
    assert_eq!(exprs[0], "up{job=\"x\"} == 0");
    assert_eq!(
        exprs[1],
        "sum(rate(edgecard_a_total{class=\"5xx\", route=~\"/x\"}[5m])) / sum(rate(edgecard_a_total[5m])) > 0.02"
    );
    assert_eq!(
        selectors(&exprs[1]),
        vec![
            ("edgecard_a_total".to_string(), vec!["class".to_string(), "route".to_string()]),
            ("edgecard_a_total".to_string(), vec![])
        ]
    );
    assert_eq!(selectors("time() - process_x > 3 and sum by (up) (y)"), vec![("process_x".to_string(), vec![])]);
    assert_eq!(
        selectors("sum without(up, process_y) (up{job=\"a\"}) / on (node) edgecard_b"),
        vec![("up".to_string(), vec!["job".to_string()]), ("edgecard_b".to_string(), vec![])]
    );
}

/// The shipped scrape configuration, pointed at a lab: the coordinator's address and token file,
/// the node's admin listener, and 1 s intervals.
fn lab_scrape_config(dir: &Path, coordinator: &str, node_admin: &str, token: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let shipped = std::fs::read_to_string(root.join("prometheus.yml")).unwrap();
    let token_file = dir.join("metrics-token");
    std::fs::write(&token_file, token).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "prometheus.yml no longer has {from:?}");
        text.replace(from, to)
    };
    let mut config = replace(shipped, "scrape_interval: 15s", "scrape_interval: 1s");
    config = replace(config, "evaluation_interval: 15s", "evaluation_interval: 1s");
    config = replace(config, "/etc/prometheus/edgecard-metrics-token", &token_file.display().to_string());
    config = replace(config, "\"127.0.0.1:7070\"", &format!("\"{coordinator}\""));
    let nodes_at = config.find("  - job_name: edgecard-node").expect("prometheus.yml scrapes edgecard-node");
    config.truncate(nodes_at);
    config
        .push_str(&format!("  - job_name: edgecard-node\n    static_configs:\n      - targets: [\"{node_admin}\"]\n"));
    std::fs::copy(root.join("alerts.yml"), dir.join("alerts.yml")).unwrap();
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A real Prometheus, configured from `deploy/prometheus/prometheus.yml`, scrapes a coordinator
/// (with the metrics token) and a node that sells: both targets are up, the alert rules load
/// and evaluate, every series and label the rules select exists, and every query of the Grafana
/// dashboard returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_a_lab_answers_every_dashboard_and_rule_query() {
    let lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(400)).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", 350).await;
    let node = start_node(&config).await;
    wait_for_stock(&node, 350).await;
    let token = read_metrics_token(&lab.coordinator_dir());
    let node_admin = node.admin_url.trim_start_matches("http://").to_string();
    let work = tempfile::tempdir().unwrap();
    let scrape_config = lab_scrape_config(work.path(), &lab.coordinator.admin_addr.to_string(), &node_admin, &token);
    let prometheus = PrometheusServer::start(work.path(), &scrape_config);
    let server = Endpoint::parse(&prometheus.url, None).unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/edgecard.json")).unwrap()).unwrap();
    let dashboard_queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(dashboard_queries.len() >= 20, "{dashboard_queries:?}");
    let rule_exprs = alert_expressions(&std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap());
    assert!(rule_exprs.len() >= 15, "{rule_exprs:?}");

    // What was still missing at the last check, for the failure report.
    let mut missing = Vec::new();
    let mut bought = 0;
    let outcome = tokio::time::timeout(SERVER_LIMIT, async {
        let mut client = node.client().await;
        loop {
            // Traffic between checks, so that rates and latency quantiles have something to show
            // (the stock outlasts the time limit at one purchase per check).
            if bought < PURCHASE_BUDGET {
                client.buy(1).await;
                bought += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            missing.clear();
            let targets = api(&server, "/api/v1/targets").await;
            let up = targets.as_ref().map_or(0, |t| {
                t["activeTargets"].as_array().map_or(0, |a| a.iter().filter(|t| t["health"] == "up").count())
            });
            if up < 2 {
                missing.push(format!("targets up: {up} of 2 ({targets:?})"));
            }
            let rules = api(&server, "/api/v1/rules").await;
            let loaded = rules.as_ref().map_or(0, |r| {
                r["groups"].as_array().map_or(0, |g| g.iter().map(|g| g["rules"].as_array().map_or(0, Vec::len)).sum())
            });
            if loaded != rule_exprs.len() {
                missing.push(format!("rules loaded: {loaded} of {}", rule_exprs.len()));
            }
            for query in &dashboard_queries {
                match query_has_data(&server, query).await {
                    Ok(true) => {}
                    Ok(false) => missing.push(format!("dashboard query without data: {query}")),
                    Err(e) => missing.push(format!("dashboard query failed: {query}: {e}")),
                }
            }
            for expr in &rule_exprs {
                if let Err(e) = api(&server, &format!("/api/v1/query?query={}", encode_component(expr))).await {
                    missing.push(format!("rule does not evaluate: {expr}: {e}"));
                }
                for (name, labels) in selectors(expr) {
                    let series = api(&server, &format!("/api/v1/series?match%5B%5D={name}")).await.unwrap_or_default();
                    let series = series.as_array().cloned().unwrap_or_default();
                    if series.is_empty() {
                        missing.push(format!("rule selects {name}, which has no series"));
                    }
                    for label in labels.iter().filter(|l| !series.iter().any(|s| s.get(l.as_str()).is_some())) {
                        missing.push(format!("rule matches {name} on label {label}, which no series has"));
                    }
                }
            }
            if missing.is_empty() {
                return;
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "not all queries answered within {SERVER_LIMIT:?}: {missing:#?}\n--- prometheus log ---\n{}",
        prometheus.log()
    );
}
