//! The simulated buyers: each holds one keep-alive connection and loops until the deadline, the
//! count, or the stock runs out. Every buyer keeps its own tally (no shared lock on the hot
//! path); tallies are merged at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Barrier;

use super::audit::SeenOrder;
use super::histogram::Latency;
use crate::https_client::{Connection, Endpoint, Request};

/// What one buyer does in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Create, pay through the sandbox, fetch the keys. With `flash`, a sold-out node sends
    /// the buyer to the next node, and the buyer stops once every node is sold out.
    Purchase { flash: bool },
    /// `GET` of a fixed path (the catalog, or `/healthz` for the baseline).
    Get { path: &'static str },
}

/// State shared by all buyers of one phase.
pub struct Shared {
    pub work: Work,
    pub endpoints: Vec<Endpoint>,
    /// `{"sku":…,"quantity":1}`, serialised once.
    pub create_body: String,
    /// The deadline, as nanoseconds after `base` (settable once the crowd is released).
    base: Instant,
    deadline_nanos: AtomicU64,
    /// Attempts left (a purchase or a request each).
    pub budget: AtomicU64,
    pub stop: AtomicBool,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    next_address: AtomicU64,
    /// Per node: answered sold out.
    sold_out: Vec<AtomicBool>,
}

impl Shared {
    pub fn new(work: Work, endpoints: Vec<Endpoint>, sku: &str, deadline: Instant, count: Option<u64>) -> Shared {
        let sold_out = endpoints.iter().map(|_| AtomicBool::new(false)).collect();
        Shared {
            work,
            endpoints,
            create_body: serde_json::json!({ "sku": sku, "quantity": 1 }).to_string(),
            base: Instant::now(),
            deadline_nanos: AtomicU64::new(0),
            budget: AtomicU64::new(count.unwrap_or(u64::MAX)),
            stop: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            next_address: AtomicU64::new(0),
            sold_out,
        }
        .with_deadline(deadline)
    }

    fn with_deadline(self, deadline: Instant) -> Shared {
        self.set_deadline(deadline);
        self
    }

    pub fn set_deadline(&self, deadline: Instant) {
        let nanos = u64::try_from(deadline.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.deadline_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The next address of 198.18.0.0/15 (131,072 of them, reused round-robin): each purchase
    /// comes from its own client, as a crowd behind a CDN would.
    fn fresh_address(&self) -> String {
        let n = self.next_address.fetch_add(1, Ordering::Relaxed) % (1 << 17);
        format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
    }

    fn take_budget(&self) -> bool {
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    fn running(&self) -> bool {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        nanos < self.deadline_nanos.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed)
    }

    pub fn all_sold_out(&self) -> bool {
        self.sold_out.iter().all(|s| s.load(Ordering::Relaxed))
    }
}

/// One buyer's results, merged into the run's at the end.
#[derive(Default)]
pub struct Tally {
    pub create: Latency,
    pub pay: Latency,
    pub fetch: Latency,
    pub purchase: Latency,
    /// Whole requests of a [`Work::Get`] phase.
    pub request: Latency,
    pub errors: BTreeMap<String, u64>,
    pub orders: Vec<SeenOrder>,
    /// Orders whose pay link was posted.
    pub pay_attempts: u64,
    /// Orders whose keys the buyer received.
    pub delivered: u64,
    /// Order attempts the node challenged (proof of work) and the buyer solved: an outcome.
    pub challenges: u64,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.create.merge(&other.create);
        self.pay.merge(&other.pay);
        self.fetch.merge(&other.fetch);
        self.purchase.merge(&other.purchase);
        self.request.merge(&other.request);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.orders.extend(other.orders);
        self.pay_attempts += other.pay_attempts;
        self.delivered += other.delivered;
        self.challenges += other.challenges;
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// Runs `buyers` buyers over `shared`. With a `barrier`, every buyer connects first and all are
/// released at once (a flash sale's crowd); the caller waits on the same barrier.
pub async fn run_buyers(shared: Arc<Shared>, buyers: usize, barrier: Option<Arc<Barrier>>) -> Tally {
    let mut tasks = Vec::with_capacity(buyers);
    for i in 0..buyers {
        let shared = shared.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move { buyer(shared, i, barrier).await }));
    }
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(_) => *total.errors.entry("buyer_task_failed".into()).or_default() += 1,
        }
    }
    total
}

async fn buyer(shared: Arc<Shared>, index: usize, barrier: Option<Arc<Barrier>>) -> Tally {
    let mut tally = Tally::default();
    if shared.endpoints.is_empty() {
        return tally;
    }
    // Buyers are spread over the nodes round-robin.
    let mut node = index % shared.endpoints.len();
    let mut connection: Option<Connection> = None;
    if let Some(barrier) = barrier {
        // Connect before the gates open, so the crowd arrives at once.
        connection = shared.endpoints[node].connect().await.ok();
        barrier.wait().await;
    }
    while shared.running() {
        if !shared.take_budget() {
            break;
        }
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match shared.endpoints[node].connect().await {
                Ok(conn) => connection.insert(conn),
                Err(_) => {
                    tally.error("connect");
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let outcome = match shared.work {
            Work::Purchase { .. } => purchase(&shared, node, conn, &mut tally).await,
            Work::Get { path } => get(&shared, conn, path, &mut tally).await,
        };
        match outcome {
            Outcome::Done => {
                shared.completed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed { kind, reconnect } => {
                tally.error(&kind);
                if kind != "sold_out" {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
                if reconnect {
                    connection = None;
                }
                match kind.as_str() {
                    // A polite client waits before retrying.
                    "rate_limited" => tokio::time::sleep(Duration::from_millis(200)).await,
                    "sold_out" => {
                        shared.sold_out[node].store(true, Ordering::Relaxed);
                        match shared.work {
                            Work::Purchase { flash: true } => {
                                // Try the next node that still sells; stop when none does.
                                let n = shared.endpoints.len();
                                match (1..=n)
                                    .map(|step| (node + step) % n)
                                    .find(|i| !shared.sold_out[*i].load(Ordering::Relaxed))
                                {
                                    Some(next) => {
                                        node = next;
                                        connection = None;
                                    }
                                    None => break,
                                }
                            }
                            // Stock is gone: every buyer stops.
                            _ => shared.stop.store(true, Ordering::Relaxed),
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    tally
}

enum Outcome {
    Done,
    Failed { kind: String, reconnect: bool },
}

fn failed(kind: &str, reconnect: bool) -> Outcome {
    Outcome::Failed { kind: kind.to_string(), reconnect }
}

/// The most counters a buyer tries on one challenge (2^26: difficulty 26 on average).
const MAX_SOLVE_TRIES: u64 = 1 << 26;

/// The token of a 428 answer's challenge.
pub fn challenge_token(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("challenge")?.get("token")?.as_str().map(str::to_string)
}

#[derive(Deserialize)]
struct Created {
    order_id: String,
    token: String,
    pay_url: String,
}

#[derive(Deserialize)]
struct OrderView {
    status: String,
    #[serde(default)]
    keys: Vec<String>,
}

async fn purchase(shared: &Shared, node: usize, conn: &mut Connection, tally: &mut Tally) -> Outcome {
    let address = shared.fresh_address();
    let started = Instant::now();
    let request = Request::post("/api/v1/orders")
        .header("content-type", "application/json")
        .header("x-forwarded-for", &address)
        .body(shared.create_body.as_bytes());
    let mut created = match conn.send(request).await {
        Ok(r) => r,
        Err(e) => return failed(transport_kind(&e), true),
    };
    // A challenged attempt is solved and repeated once, as a real client would.
    if created.status == 428 {
        let Some(token) = challenge_token(&created.body) else { return failed("bad_challenge", false) };
        let solver_token = token.clone();
        let solved =
            tokio::task::spawn_blocking(move || edgecard_node::abuse::challenge::solve(&solver_token, MAX_SOLVE_TRIES))
                .await;
        let Ok(Some(solution)) = solved else { return failed("challenge_unsolved", false) };
        tally.challenges += 1;
        let request = Request::post("/api/v1/orders")
            .header("content-type", "application/json")
            .header("x-forwarded-for", &address)
            .header("edgecard-challenge", &token)
            .header("edgecard-challenge-solution", &solution.to_string())
            .body(shared.create_body.as_bytes());
        created = match conn.send(request).await {
            Ok(r) => r,
            Err(e) => return failed(transport_kind(&e), true),
        };
    }
    if created.status != 201 {
        return failed(&status_kind(created.status, &created.body), false);
    }
    tally.create.record(started.elapsed());
    let Ok(order) = created.json::<Created>() else { return failed("bad_response", false) };
    let mut seen =
        SeenOrder { order_id: order.order_id.clone(), token: order.token.clone(), node, ..SeenOrder::default() };

    let t = Instant::now();
    tally.pay_attempts += 1;
    let paid = conn.send(Request::post(&path_of(&order.pay_url)).header("x-forwarded-for", &address)).await;
    let outcome = match paid {
        Ok(r) if r.status == 200 => {
            seen.paid = true;
            tally.pay.record(t.elapsed());
            fetch_keys(conn, &order, &address, tally, &mut seen).await
        }
        Ok(r) => failed(&status_kind(r.status, &r.body), false),
        Err(e) => {
            seen.unsettled = true;
            failed(transport_kind(&e), true)
        }
    };
    if matches!(outcome, Outcome::Done) {
        tally.purchase.record(started.elapsed());
        tally.delivered += 1;
    }
    tally.orders.push(seen);
    outcome
}

async fn fetch_keys(
    conn: &mut Connection,
    order: &Created,
    address: &str,
    tally: &mut Tally,
    seen: &mut SeenOrder,
) -> Outcome {
    let t = Instant::now();
    let request = Request::get(&format!("/api/v1/orders/{}", order.order_id))
        .header("authorization", &format!("Bearer {}", order.token))
        .header("x-forwarded-for", address);
    let fetched = match conn.send(request).await {
        Ok(r) if r.status == 200 => r,
        Ok(r) => return failed(&status_kind(r.status, &r.body), false),
        Err(e) => {
            seen.unsettled = true;
            return failed(transport_kind(&e), true);
        }
    };
    tally.fetch.record(t.elapsed());
    let Ok(view) = fetched.json::<OrderView>() else { return failed("bad_response", false) };
    if view.status != "delivered" || view.keys.is_empty() {
        return failed("not_delivered", false);
    }
    seen.keys = view.keys;
    Outcome::Done
}

/// How long the audit keeps trying to look up orders whose answers were lost (a killed node may
/// take a while to come back).
const SETTLE_FOR: Duration = Duration::from_secs(30);

/// Looks up again, before the audit judges them, the orders whose pay or key-fetch answer was
/// lost, and paid orders whose keys were never fetched: a node killed under load may well have
/// delivered them. Returns how many turned out delivered.
pub async fn settle_cut_off(endpoints: &[Endpoint], orders: &mut [SeenOrder]) -> usize {
    let deadline = Instant::now() + SETTLE_FOR;
    let mut connections: Vec<Option<Connection>> = endpoints.iter().map(|_| None).collect();
    let mut settled = 0;
    for order in orders.iter_mut().filter(|o| o.unsettled || (o.paid && o.keys.is_empty())) {
        while Instant::now() < deadline {
            let Some(endpoint) = endpoints.get(order.node) else { break };
            let slot = &mut connections[order.node];
            if slot.is_none() {
                *slot = endpoint.connect().await.ok();
            }
            let Some(conn) = slot.as_mut() else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let request = Request::get(&format!("/api/v1/orders/{}", order.order_id))
                .header("authorization", &format!("Bearer {}", order.token));
            match conn.send(request).await {
                Ok(r) if r.status == 200 => {
                    if let Ok(view) = r.json::<OrderView>() {
                        if view.status == "delivered" && !view.keys.is_empty() {
                            order.paid = true;
                            order.keys = view.keys;
                            settled += 1;
                        }
                    }
                    order.unsettled = false;
                    break;
                }
                Ok(_) => {
                    order.unsettled = false;
                    break;
                }
                Err(_) => {
                    *slot = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    settled
}

async fn get(shared: &Shared, conn: &mut Connection, path: &str, tally: &mut Tally) -> Outcome {
    let started = Instant::now();
    let request = Request::get(path).header("x-forwarded-for", &shared.fresh_address());
    match conn.send(request).await {
        Ok(r) if r.status == 200 || r.status == 304 => {
            tally.request.record(started.elapsed());
            Outcome::Done
        }
        Ok(r) => failed(&status_kind(r.status, &r.body), false),
        Err(e) => failed(transport_kind(&e), true),
    }
}

fn transport_kind(error: &crate::https_client::ClientError) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else {
        "transport"
    }
}

/// A short, stable name for an error answer: `sold_out`, `rate_limited`, else the status and the
/// node's error code (`503_unavailable`).
pub fn status_kind(status: u16, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorCode,
    }
    #[derive(Deserialize)]
    struct ErrorCode {
        code: String,
    }
    let code = serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error.code);
    match (status, code) {
        (409, _) => "sold_out".into(),
        (429, _) => "rate_limited".into(),
        (_, Some(code)) if code.len() <= 40 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            format!("{status}_{code}")
        }
        _ => format!("http_{status}"),
    }
}

/// The path (and query) of a pay URL, which names the node's public base.
pub fn path_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or("/".to_string(), |i| after_scheme[i..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pay_paths_are_extracted() {
        assert_eq!(path_of("https://127.0.0.1:8441/pay/sandbox/ab"), "/pay/sandbox/ab");
        assert_eq!(path_of("/pay/x"), "/pay/x");
        assert_eq!(path_of("https://host"), "/");
    }

    #[test]
    fn error_kinds_are_short_and_stable() {
        assert_eq!(status_kind(409, b""), "sold_out");
        assert_eq!(status_kind(429, b"{}"), "rate_limited");
        assert_eq!(status_kind(503, br#"{"error":{"code":"unavailable","message":"x"}}"#), "503_unavailable");
        assert_eq!(status_kind(500, b"<html>"), "http_500");
        // A hostile code does not become an unbounded label.
        assert_eq!(status_kind(400, br#"{"error":{"code":"a b\nc"}}"#), "http_400");
    }

    #[test]
    fn fresh_addresses_stay_in_the_benchmark_range() {
        let shared = Shared::new(Work::Get { path: "/" }, Vec::new(), "x", Instant::now(), Some(1));
        let first = shared.fresh_address();
        assert_eq!(first, "198.18.0.0");
        shared.next_address.store((1 << 17) - 1, Ordering::Relaxed);
        assert_eq!(shared.fresh_address(), "198.19.255.255");
        assert_eq!(shared.fresh_address(), "198.18.0.0");
        assert!(shared.take_budget());
        assert!(!shared.take_budget());
    }
}
