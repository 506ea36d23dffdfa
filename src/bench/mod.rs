//! `edgecard bench`: drives simulated buyers against nodes over HTTPS and prints the KPI table.
//!
//! Scenarios:
//! - `purchase`: C buyers, each on one keep-alive connection, buy in a loop: create the order,
//!   pay it through the sandbox pay link, fetch the keys;
//! - `flash-sale`: C buyers connect first and are released at once on limited stock spread over
//!   the nodes; a buyer whose node is sold out moves to the next, and the run ends when every
//!   node is sold out (or at the duration/count bound);
//! - `browse`: catalog reads, the origin's load on a CDN miss.
//!
//! `--baseline` first runs the same client against `/healthz` (the plain-HTTPS ceiling of the
//! same machine, in the same run). Every request presents a fresh address in `X-Forwarded-For`
//! (198.18.0.0/15, set aside for benchmarks), as a crowd behind a CDN would; the node honours it
//! only when it trusts the bench's address as a proxy (the demo does, on loopback).
//!
//! Store commit latency comes from each node's admin listener (`/metrics`), scraped before and
//! after the run; the sync link's lag is sampled from it four times a second. With a coordinator
//! URL and token the run ends with the ledger audit ([`audit`]).
//!
//! The live progress line goes to stderr, by default only when stderr is a terminal
//! (`--progress always|never` overrides), so piped or `--json` output stays clean.

pub mod audit;
mod histogram;
mod load;
pub mod node_metrics;
pub mod report;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use parking_lot::Mutex;
use serde_json::Value;

use crate::admin_client::{AdminClient, ENV_ADMIN_TOKEN, ENV_ADMIN_URL};
use crate::https_client::{Endpoint, Request};
use load::{Shared, Tally, Work};
use node_metrics::{Scrape, StoreReport, SyncReport, SyncSample};
use report::{Baseline, FlashSale, Report, Thresholds};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Node base URL, e.g. https://127.0.0.1:8441 (repeat for several nodes; buyers are spread).
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// PEM certificate (or CA) the nodes' TLS certificates chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Concurrent buyers (for flash-sale: the crowd released at once).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop after this many purchases (requests for browse), whichever comes first.
    #[arg(long)]
    pub count: Option<u64>,
    /// Sku to buy; default: the product with the most stock on the first node.
    #[arg(long)]
    pub sku: Option<String>,
    /// First measure GET /healthz with the same client: the plain-HTTPS ceiling.
    #[arg(long)]
    pub baseline: bool,
    /// Length of the baseline phase, in seconds.
    #[arg(long, default_value_t = 5)]
    pub baseline_secs: u64,
    /// A node's admin listener (Prometheus /metrics), one per --url in the same order.
    /// Default: http on the same host, the HTTPS port + 1000 (the demo's layout); skipped when
    /// it does not answer.
    #[arg(long = "admin-url")]
    pub admin_urls: Vec<String>,
    /// Coordinator admin API for the ledger audit.
    #[arg(long, env = ENV_ADMIN_URL)]
    pub coordinator_url: Option<String>,
    /// Bearer token of the coordinator admin API.
    #[arg(long, env = ENV_ADMIN_TOKEN, hide_env_values = true)]
    pub coordinator_token: Option<String>,
    /// Skip the ledger audit even when a coordinator is configured.
    #[arg(long)]
    pub no_audit: bool,
    /// How long the audit waits for the ledger to catch up with the nodes' sync, in seconds.
    #[arg(long, default_value_t = 60)]
    pub audit_timeout: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 when any KPI misses its threshold (a failed audit always exits 1).
    #[arg(long)]
    pub strict: bool,
    /// Live progress line on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
    /// Threshold: least purchases (requests for browse) per second.
    #[arg(long, default_value_t = 1000.0)]
    pub min_tps: f64,
    /// Threshold: largest average response (whole purchase), ms.
    #[arg(long, default_value_t = 500.0)]
    pub max_avg_ms: f64,
    /// Threshold: largest p99 response (whole purchase), ms.
    #[arg(long, default_value_t = 500.0)]
    pub max_p99_ms: f64,
    /// Threshold: largest error rate, percent.
    #[arg(long, default_value_t = 0.1)]
    pub max_error_rate: f64,
    /// Threshold: least payment success, percent.
    #[arg(long, default_value_t = 99.5)]
    pub min_payment_success: f64,
    /// Threshold: largest average store commit (durable flush wait), ms.
    #[arg(long, default_value_t = 50.0)]
    pub max_store_commit_ms: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    /// Full buyer flow: create, pay through the sandbox, fetch the keys.
    Purchase,
    /// A crowd released at once on limited stock across the nodes, until sold out.
    FlashSale,
    /// Catalog reads (GET /api/v1/products), the origin load on a CDN miss.
    Browse,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Purchase => "purchase",
            Scenario::FlashSale => "flash-sale",
            Scenario::Browse => "browse",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Progress {
    /// Only when stderr is a terminal.
    Auto,
    Always,
    Never,
}

/// A node under test: its buyer endpoint and, when reachable, its admin listener.
struct Node {
    url: String,
    endpoint: Endpoint,
    admin: Option<Endpoint>,
}

/// Runs the bench as the CLI does: prints the report, and fails when the audit fails (or, with
/// `--strict`, when any KPI misses).
pub async fn run(args: BenchArgs) -> Result<()> {
    let report = execute(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    if let Some(audit) = &report.audit {
        if !audit.passed {
            bail!("the ledger audit failed: see the report");
        }
    }
    if args.strict && !report.passed {
        bail!("a KPI missed its threshold");
    }
    Ok(())
}

/// Runs the bench and returns its report (tests call this directly).
pub async fn execute(args: &BenchArgs) -> Result<Report> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !args.admin_urls.is_empty() && args.admin_urls.len() != args.urls.len() {
        bail!("give one --admin-url per --url, in the same order");
    }
    let ca = match &args.ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let nodes = connect_nodes(args, ca.as_deref()).await?;
    let endpoints: Vec<Endpoint> = nodes.iter().map(|n| n.endpoint.clone()).collect();
    let show_progress = match args.progress {
        Progress::Auto => std::io::stderr().is_terminal(),
        Progress::Always => true,
        Progress::Never => false,
    };

    let baseline = if args.baseline { Some(run_baseline(args, &endpoints, show_progress).await) } else { None };

    let sku = match (&args.sku, args.scenario) {
        (Some(sku), _) => sku.clone(),
        (None, Scenario::Browse) => String::new(),
        (None, _) => pick_sku(&endpoints[0]).await?,
    };
    let work = match args.scenario {
        Scenario::Purchase => Work::Purchase { flash: false },
        Scenario::FlashSale => Work::Purchase { flash: true },
        Scenario::Browse => Work::Get { path: "/api/v1/products" },
    };

    let before: Vec<Option<Scrape>> = scrape_all(&nodes).await;
    let since_ms = unix_millis().saturating_sub(5_000);
    let samples: Arc<Mutex<Vec<Vec<SyncSample>>>> = Arc::new(Mutex::new(vec![Vec::new(); nodes.len()]));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = spawn_sync_sampler(&nodes, samples.clone(), sampling.clone());

    let flash = args.scenario == Scenario::FlashSale;
    let (mut tally, elapsed, shared) =
        run_phase(work, endpoints.clone(), &sku, args.duration, args.count, args.concurrency, flash, show_progress)
            .await;
    let after: Vec<Option<Scrape>> = scrape_all(&nodes).await;

    let audit = match (&args.coordinator_url, &args.coordinator_token, args.no_audit, work) {
        (Some(url), Some(token), false, Work::Purchase { .. }) => {
            let client = AdminClient::new(url, token).context("--coordinator-url")?;
            let timeout = Duration::from_secs(args.audit_timeout);
            let settled = load::settle_cut_off(&endpoints, &mut tally.orders).await;
            if settled > 0 {
                eprintln!("{settled} orders whose answer was cut off turned out delivered");
            }
            Some(audit::wait_and_audit(&client, &tally.orders, since_ms, timeout).await?)
        }
        _ => None,
    };
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;

    let store = nodes
        .iter()
        .zip(before.iter().zip(&after))
        .filter_map(|(node, (b, a))| Some(StoreReport::between(&node.url, b.as_ref()?, a.as_ref()?, elapsed)))
        .collect();
    let sync = nodes
        .iter()
        .zip(samples.lock().iter())
        .filter_map(|(node, samples)| SyncReport::from_samples(&node.url, samples))
        .collect();
    let mut report = build_report(args, &nodes, tally, elapsed, baseline, store, sync, audit);
    if flash {
        report.flash_sale =
            Some(FlashSale { buyers: args.concurrency, sold_out: shared.all_sold_out(), keys_sold: report.delivered });
    }
    report.judge();
    Ok(report)
}

async fn connect_nodes(args: &BenchArgs, ca: Option<&[u8]>) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for (i, url) in args.urls.iter().enumerate() {
        let endpoint = Endpoint::parse(url, ca).with_context(|| format!("--url {url}"))?;
        let admin_url = match args.admin_urls.get(i) {
            Some(admin) => Some(admin.clone()),
            None => derived_admin_url(url),
        };
        let admin = match admin_url {
            Some(admin_url) => {
                let admin = Endpoint::parse(&admin_url, None)
                    .with_context(|| format!("--admin-url {admin_url}"))?
                    .with_timeout(Duration::from_secs(5));
                match node_metrics::scrape(&admin).await {
                    Ok(_) => Some(admin),
                    Err(e) if !args.admin_urls.is_empty() => return Err(e.context(format!("--admin-url {admin_url}"))),
                    Err(_) => None, // derived and not there: no store or sync figures
                }
            }
            None => None,
        };
        nodes.push(Node { url: endpoint.url().to_string(), endpoint, admin });
    }
    Ok(nodes)
}

/// The demo's layout: admin listener on the same host, HTTPS port + 1000, plain HTTP.
fn derived_admin_url(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let port = uri.port_u16()?.checked_add(1000)?;
    let host = uri.host()?;
    Some(format!("http://{host}:{port}"))
}

async fn scrape_all(nodes: &[Node]) -> Vec<Option<Scrape>> {
    let mut scrapes = Vec::with_capacity(nodes.len());
    for node in nodes {
        scrapes.push(match &node.admin {
            Some(admin) => node_metrics::scrape(admin).await.ok(),
            None => None,
        });
    }
    scrapes
}

/// Samples each node's sync progress every 250 ms while `running` holds.
fn spawn_sync_sampler(
    nodes: &[Node],
    samples: Arc<Mutex<Vec<Vec<SyncSample>>>>,
    running: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let admins: Vec<Option<Endpoint>> = nodes.iter().map(|n| n.admin.clone()).collect();
    tokio::spawn(async move {
        if admins.iter().all(Option::is_none) {
            return;
        }
        let started = Instant::now();
        while running.load(Ordering::Relaxed) {
            for (i, admin) in admins.iter().enumerate() {
                let Some(admin) = admin else { continue };
                if let Ok(scrape) = node_metrics::scrape(admin).await {
                    if let Some(sample) = SyncSample::from_scrape(started.elapsed().as_secs_f64(), &scrape) {
                        samples.lock()[i].push(sample);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    work: Work,
    endpoints: Vec<Endpoint>,
    sku: &str,
    duration: u64,
    count: Option<u64>,
    buyers: usize,
    flash: bool,
    show_progress: bool,
) -> (Tally, f64, Arc<Shared>) {
    let run_for = Duration::from_secs(duration);
    // The crowd's connects get their own allowance; the deadline is reset when the gates open.
    let connect_allowance = if flash { Duration::from_secs(60) } else { Duration::ZERO };
    let shared = Arc::new(Shared::new(work, endpoints, sku, Instant::now() + connect_allowance + run_for, count));
    let barrier = flash.then(|| Arc::new(tokio::sync::Barrier::new(buyers + 1)));
    let runner = tokio::spawn(load::run_buyers(shared.clone(), buyers, barrier.clone()));
    if let Some(barrier) = &barrier {
        // A flash-sale crowd connects first; the clock starts when the gates open.
        barrier.wait().await;
        shared.set_deadline(Instant::now() + run_for);
    }
    let started = Instant::now();
    let progress = show_progress.then(|| spawn_progress(shared.clone(), started));
    let tally = runner.await.unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    (tally, elapsed, shared)
}

fn spawn_progress(shared: Arc<Shared>, started: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let done = shared.completed.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\r  {secs:>6.1}s  {done:>9} done  {:>7.0}/s now  {:>6} errors   ",
                (done - last) as f64 * 2.0,
                shared.failed.load(Ordering::Relaxed)
            );
            last = done;
        }
        eprintln!();
    })
}

async fn run_baseline(args: &BenchArgs, endpoints: &[Endpoint], show_progress: bool) -> Baseline {
    let path = "/healthz";
    let (tally, elapsed, _) = run_phase(
        Work::Get { path },
        endpoints.to_vec(),
        "",
        args.baseline_secs,
        None,
        args.concurrency,
        false,
        show_progress,
    )
    .await;
    let requests = tally.request.count();
    Baseline {
        path: path.into(),
        requests,
        elapsed_secs: elapsed,
        requests_per_sec: requests as f64 / elapsed.max(1e-9),
        errors: tally.errors,
        latency: tally.request.summary("healthz"),
    }
}

async fn pick_sku(endpoint: &Endpoint) -> Result<String> {
    let response =
        endpoint.request(Request::get("/api/v1/products").header("x-forwarded-for", "198.18.255.254")).await?;
    if response.status != 200 {
        bail!("GET /api/v1/products answered {}", response.status);
    }
    let products: Vec<Value> = response.json()?;
    products
        .iter()
        .max_by_key(|p| p["stock"].as_u64().unwrap_or(0))
        .and_then(|p| p["sku"].as_str())
        .map(str::to_string)
        .context("the node lists no products")
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    args: &BenchArgs,
    nodes: &[Node],
    tally: Tally,
    elapsed: f64,
    baseline: Option<Baseline>,
    store: Vec<StoreReport>,
    sync: Vec<SyncReport>,
    audit: Option<audit::AuditReport>,
) -> Report {
    let purchase = args.scenario != Scenario::Browse;
    let completed = if purchase { tally.delivered } else { tally.request.count() };
    let failures = |skip_429: bool| -> u64 {
        tally
            .errors
            .iter()
            .filter(|(kind, _)| kind.as_str() != "sold_out" && !(skip_429 && kind.as_str() == "rate_limited"))
            .map(|(_, n)| n)
            .sum()
    };
    let attempts = completed + tally.errors.values().sum::<u64>();
    let rate = |n: u64| if attempts == 0 { 0.0 } else { n as f64 / attempts as f64 };
    let steps = if purchase {
        vec![
            tally.create.summary("create"),
            tally.pay.summary("pay"),
            tally.fetch.summary("fetch keys"),
            tally.purchase.summary("purchase"),
        ]
    } else {
        vec![tally.request.summary("catalog")]
    };
    Report {
        scenario: args.scenario.name().into(),
        nodes: nodes.iter().map(|n| n.url.clone()).collect(),
        concurrency: args.concurrency,
        elapsed_secs: elapsed,
        completed,
        per_sec: completed as f64 / elapsed.max(1e-9),
        attempts,
        error_rate: rate(failures(false)),
        error_rate_excluding_429: rate(failures(true)),
        errors: tally.errors,
        pay_attempts: tally.pay_attempts,
        challenges_solved: tally.challenges,
        delivered: tally.delivered,
        payment_success: purchase.then(|| {
            if tally.pay_attempts == 0 {
                0.0
            } else {
                tally.delivered as f64 / tally.pay_attempts as f64
            }
        }),
        steps,
        baseline,
        flash_sale: None,
        store,
        sync,
        audit,
        thresholds: Thresholds {
            min_tps: args.min_tps,
            max_avg_ms: args.max_avg_ms,
            max_p99_ms: args.max_p99_ms,
            max_error_rate: args.max_error_rate,
            min_payment_success: args.min_payment_success,
            max_store_commit_ms: args.max_store_commit_ms,
        },
        kpis: Vec::new(),
        passed: false,
    }
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_derived_from_the_demo_layout() {
        assert_eq!(derived_admin_url("https://127.0.0.1:8441").as_deref(), Some("http://127.0.0.1:9441"));
        assert_eq!(derived_admin_url("https://127.0.0.1"), None);
        assert_eq!(derived_admin_url("https://127.0.0.1:65000"), None);
    }
}
