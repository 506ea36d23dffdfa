//! `edgecard bench`: drives real buyers against nodes over HTTPS and prints the KPI table.
//!
//! Each simulated buyer holds one keep-alive connection and buys in a loop: create the order, pay
//! it through the sandbox pay link, fetch the keys. Every purchase presents a fresh address in
//! `X-Forwarded-For` (from 198.18.0.0/15, the range set aside for benchmarks), as a crowd of distinct
//! buyers behind a CDN would. The node honours it only when it trusts the bench's address as a
//! proxy; otherwise all purchases share one rate budget and most get 429.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

use crate::https_client::{Connection, Endpoint, Request};

#[derive(Args, Debug)]
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
    /// Concurrent buyers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop after this many purchases (whichever comes first).
    #[arg(long)]
    pub count: Option<u64>,
    /// Sku to buy; default: the product with the most stock on the first node.
    #[arg(long)]
    pub sku: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fail (exit 1) when a KPI misses its threshold.
    #[arg(long)]
    pub strict: bool,
    /// Threshold: least purchases per second.
    #[arg(long, default_value_t = 1000.0)]
    pub min_tps: f64,
    /// Threshold: largest p99 of one purchase, in milliseconds.
    #[arg(long, default_value_t = 500.0)]
    pub max_p99_ms: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    /// Full buyer flow: create, pay through the sandbox, fetch the keys.
    Purchase,
}

#[derive(Default)]
struct Samples {
    create: Vec<u32>,
    pay: Vec<u32>,
    fetch: Vec<u32>,
    purchase: Vec<u32>,
    errors: BTreeMap<String, u64>,
    keys: Vec<String>,
    paid: u64,
    delivered: u64,
}

#[derive(Serialize)]
struct StepReport {
    step: &'static str,
    count: usize,
    avg_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    concurrency: usize,
    elapsed_secs: f64,
    purchases: u64,
    purchases_per_sec: f64,
    attempts: u64,
    errors: BTreeMap<String, u64>,
    error_rate: f64,
    payment_success: f64,
    duplicate_keys: u64,
    steps: Vec<StepReport>,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let ca = match &args.ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let endpoints = args
        .urls
        .iter()
        .map(|url| Endpoint::parse(url, ca.as_deref()).with_context(|| format!("--url {url}")))
        .collect::<Result<Vec<_>>>()?;
    let sku = match &args.sku {
        Some(sku) => sku.clone(),
        None => pick_sku(&endpoints[0]).await?,
    };
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let budget = Arc::new(AtomicU64::new(args.count.unwrap_or(u64::MAX)));
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let completed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let progress = {
        let completed = completed.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = completed.load(Ordering::Relaxed);
                eprint!("\r  {:>6.1}s  {now:>9} purchases  {:>7} /s   ", started.elapsed().as_secs_f64(), now - last);
                last = now;
            }
            eprintln!();
        })
    };

    let addresses = Arc::new(AtomicU64::new(0));
    let mut buyers = Vec::new();
    for i in 0..args.concurrency {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let buyer = Buyer {
            sku: sku.clone(),
            next_address: addresses.clone(),
            samples: samples.clone(),
            budget: budget.clone(),
            stop: stop.clone(),
            completed: completed.clone(),
            deadline,
        };
        buyers.push(tokio::spawn(async move { buyer.run(endpoint).await }));
    }
    for buyer in buyers {
        buyer.await.context("buyer task")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = progress.await;

    let mut samples = std::mem::take(&mut *samples.lock());
    let report = build_report(&mut samples, args.concurrency, elapsed);
    let passed = report.purchases_per_sec >= args.min_tps
        && report.steps.last().is_some_and(|s| s.p99_ms <= args.max_p99_ms)
        && report.error_rate < 0.001
        && report.duplicate_keys == 0;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &args);
    }
    if report.duplicate_keys > 0 {
        bail!("{} keys were delivered more than once", report.duplicate_keys);
    }
    if args.strict && !passed {
        bail!("a KPI missed its threshold");
    }
    Ok(())
}

async fn pick_sku(endpoint: &Endpoint) -> Result<String> {
    let response = endpoint.request(Request::get("/api/v1/products")).await?;
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

struct Buyer {
    sku: String,
    next_address: Arc<AtomicU64>,
    samples: Arc<Mutex<Samples>>,
    budget: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    deadline: Instant,
}

enum Step {
    Done { create: u32, pay: u32, fetch: u32, keys: Vec<String> },
    Failed { kind: String, paid: bool, fatal: bool },
}

impl Buyer {
    async fn run(self, endpoint: Endpoint) {
        let mut connection: Option<Connection> = None;
        let mut local = Samples::default();
        while Instant::now() < self.deadline && !self.stop.load(Ordering::Relaxed) {
            if self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err() {
                break;
            }
            let conn = match connection.as_mut() {
                Some(conn) => conn,
                None => match endpoint.connect().await {
                    Ok(conn) => connection.insert(conn),
                    Err(_) => {
                        *local.errors.entry("connect".into()).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let started = Instant::now();
            match self.purchase(conn).await {
                Step::Done { create, pay, fetch, keys } => {
                    local.create.push(create);
                    local.pay.push(pay);
                    local.fetch.push(fetch);
                    local.purchase.push(micros(started.elapsed()));
                    local.keys.extend(keys);
                    local.paid += 1;
                    local.delivered += 1;
                    self.completed.fetch_add(1, Ordering::Relaxed);
                }
                Step::Failed { kind, paid, fatal } => {
                    if paid {
                        local.paid += 1;
                    }
                    if kind == "rate_limited" {
                        // A polite client waits before retrying.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let sold_out = kind == "sold_out";
                    *local.errors.entry(kind).or_default() += 1;
                    if sold_out {
                        // Stock is gone: every buyer stops.
                        self.stop.store(true, Ordering::Relaxed);
                    }
                    if fatal {
                        connection = None;
                    }
                }
            }
        }
        let mut shared = self.samples.lock();
        shared.create.append(&mut local.create);
        shared.pay.append(&mut local.pay);
        shared.fetch.append(&mut local.fetch);
        shared.purchase.append(&mut local.purchase);
        shared.keys.append(&mut local.keys);
        shared.paid += local.paid;
        shared.delivered += local.delivered;
        for (kind, n) in local.errors {
            *shared.errors.entry(kind).or_default() += n;
        }
    }

    /// The next address of 198.18.0.0/15 (131,072 of them, reused round-robin).
    fn fresh_address(&self) -> String {
        let n = self.next_address.fetch_add(1, Ordering::Relaxed) % (1 << 17);
        format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
    }

    async fn purchase(&self, conn: &mut Connection) -> Step {
        let failed = |kind: &str, paid: bool, fatal: bool| Step::Failed { kind: kind.to_string(), paid, fatal };
        let address = self.fresh_address();
        let t = Instant::now();
        let request = Request::post_json("/api/v1/orders", &json!({ "sku": self.sku, "quantity": 1 }))
            .header("x-forwarded-for", &address);
        let created = match conn.send(request).await {
            Ok(r) if r.status == 201 => r,
            Ok(r) => return failed(&status_kind(r.status, &r.body), false, false),
            Err(_) => return failed("transport", false, true),
        };
        let create = micros(t.elapsed());
        let Ok(order) = created.json::<Value>() else { return failed("bad_response", false, false) };
        let (Some(id), Some(token), Some(pay_url)) =
            (order["order_id"].as_str(), order["token"].as_str(), order["pay_url"].as_str())
        else {
            return failed("bad_response", false, false);
        };
        let pay_path = path_of(pay_url);
        let t = Instant::now();
        match conn.send(Request::post(&pay_path).header("x-forwarded-for", &address)).await {
            Ok(r) if r.status == 200 => {}
            Ok(r) => return failed(&status_kind(r.status, &r.body), false, false),
            Err(_) => return failed("transport", false, true),
        }
        let pay = micros(t.elapsed());
        let t = Instant::now();
        let request = Request::get(&format!("/api/v1/orders/{id}"))
            .header("authorization", &format!("Bearer {token}"))
            .header("x-forwarded-for", &address);
        let fetched = match conn.send(request).await {
            Ok(r) if r.status == 200 => r,
            Ok(r) => return failed(&status_kind(r.status, &r.body), true, false),
            Err(_) => return failed("transport", true, true),
        };
        let fetch = micros(t.elapsed());
        let Ok(view) = fetched.json::<Value>() else { return failed("bad_response", true, false) };
        let keys: Vec<String> = view["keys"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if view["status"] != "delivered" || keys.is_empty() {
            return failed("not_delivered", true, false);
        }
        Step::Done { create, pay, fetch, keys }
    }
}

fn status_kind(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    match (status, code) {
        (409, _) => "sold_out".into(),
        (429, _) => "rate_limited".into(),
        (_, Some(code)) => format!("{status}_{code}"),
        _ => format!("http_{status}"),
    }
}

fn path_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or("/".to_string(), |i| after_scheme[i..].to_string())
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn step_report(step: &'static str, samples: &mut [u32]) -> StepReport {
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    let avg = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|s| *s as f64).sum::<f64>() / samples.len() as f64 / 1000.0
    };
    StepReport {
        step,
        count: samples.len(),
        avg_ms: avg,
        p50_ms: pct(50.0),
        p95_ms: pct(95.0),
        p99_ms: pct(99.0),
        max_ms: samples.last().map_or(0.0, |m| *m as f64 / 1000.0),
    }
}

fn build_report(samples: &mut Samples, concurrency: usize, elapsed: f64) -> Report {
    let purchases = samples.purchase.len() as u64;
    let errors: u64 = samples.errors.iter().filter(|(k, _)| k.as_str() != "sold_out").map(|(_, n)| n).sum();
    let attempts = purchases + samples.errors.values().sum::<u64>();
    let mut seen = HashSet::with_capacity(samples.keys.len());
    let duplicate_keys = samples.keys.iter().filter(|k| !seen.insert(k.as_str())).count() as u64;
    Report {
        scenario: "purchase",
        concurrency,
        elapsed_secs: elapsed,
        purchases,
        purchases_per_sec: purchases as f64 / elapsed.max(1e-9),
        attempts,
        error_rate: if attempts == 0 { 0.0 } else { errors as f64 / attempts as f64 },
        payment_success: if samples.paid == 0 { 0.0 } else { samples.delivered as f64 / samples.paid as f64 },
        errors: samples.errors.clone(),
        duplicate_keys,
        steps: vec![
            step_report("create", &mut samples.create),
            step_report("pay", &mut samples.pay),
            step_report("fetch keys", &mut samples.fetch),
            step_report("purchase", &mut samples.purchase),
        ],
    }
}

fn print_table(report: &Report, args: &BenchArgs) {
    println!("\nedgecard bench {} — {} buyers, {:.1} s", report.scenario, report.concurrency, report.elapsed_secs);
    println!(
        "\n  {:<11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "step", "count", "avg ms", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    for s in &report.steps {
        println!(
            "  {:<11} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            s.step, s.count, s.avg_ms, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
        );
    }
    let p99 = report.steps.last().map_or(0.0, |s| s.p99_ms);
    let avg = report.steps.last().map_or(0.0, |s| s.avg_ms);
    let mark = |ok: bool| if ok { "ok" } else { "MISS" };
    println!("\n  {:<22} {:>12}   {:<14}", "KPI", "measured", "threshold");
    let tps_ok = report.purchases_per_sec >= args.min_tps;
    println!(
        "  {:<22} {:>12.0}   {:<14} {}",
        "purchases/s (TPS)",
        report.purchases_per_sec,
        format!(">= {}", args.min_tps),
        mark(tps_ok)
    );
    println!("  {:<22} {:>12.2}   {:<14} {}", "avg purchase ms", avg, "< 500", mark(avg < 500.0));
    println!(
        "  {:<22} {:>12.2}   {:<14} {}",
        "p99 purchase ms",
        p99,
        format!("<= {}", args.max_p99_ms),
        mark(p99 <= args.max_p99_ms)
    );
    println!(
        "  {:<22} {:>11.3}%   {:<14} {}",
        "error rate",
        report.error_rate * 100.0,
        "< 0.1%",
        mark(report.error_rate < 0.001)
    );
    println!(
        "  {:<22} {:>11.2}%   {:<14} {}",
        "payment success",
        report.payment_success * 100.0,
        "> 99.5%",
        mark(report.payment_success > 0.995)
    );
    println!(
        "  {:<22} {:>12}   {:<14} {}",
        "duplicate keys",
        report.duplicate_keys,
        "0",
        mark(report.duplicate_keys == 0)
    );
    if !report.errors.is_empty() {
        println!("\n  errors by kind: {:?}", report.errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let report = step_report("x", &mut samples);
        assert_eq!(report.p50_ms, 50.0);
        assert_eq!(report.p99_ms, 99.0);
        assert_eq!(report.max_ms, 100.0);
        assert!((report.avg_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn duplicate_keys_are_counted() {
        let mut samples = Samples { keys: vec!["A".into(), "B".into(), "A".into()], ..Samples::default() };
        samples.purchase = vec![1, 2, 3];
        let report = build_report(&mut samples, 1, 1.0);
        assert_eq!(report.duplicate_keys, 1);
    }

    #[test]
    fn pay_paths_are_extracted() {
        assert_eq!(path_of("https://127.0.0.1:8441/pay/sandbox/ab"), "/pay/sandbox/ab");
        assert_eq!(path_of("/pay/x"), "/pay/x");
    }
}
