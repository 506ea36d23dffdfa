//! The node's metrics, on `prometheus-client`: one struct per subsystem holding its handles, and
//! [`node_registry`], which puts them all in the node's one registry with `node` and `region` as
//! labels on every series (a process running several nodes serves each registry on that node's
//! own admin listener).
//!
//! Label values are fixed enumerations or ids chosen by the code (sku, channel, route template),
//! never request data, so no secret, token or email can reach the metrics endpoint.

use std::fmt;
use std::sync::Arc;

use edgecard_net::metrics::{encode_gauge_rows, FnCollector};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use crate::http_metrics::HttpMetrics;
pub use edgecard_store::metrics::{StoreMetrics, LATENCY_BUCKETS};

use crate::limiter::Limiters;
use crate::orders::{OrderEngine, PaymentProblemKind, SliceStatus};
use crate::payments::router::Router;
use crate::sync_link::SyncLinkMetrics;

#[derive(Debug, Default)]
pub struct OrderMetrics {
    pub created: Counter,
    pub delivered: Counter,
    pub expired: Counter,
    pub awaiting_stock: Counter,
    pub sold_out: Counter,
    pub window_full: Counter,
    pub reservation_cap_hits: Counter,
    pub duplicate_payments: Counter,
    /// Orders refunded (through their channel, by hand, or at the provider).
    pub refunded: Counter,
    pub grants_installed: Counter,
    pub grants_refused: Counter,
    pub open_reservations: Gauge,
    /// Verified payments matching none of their order's attempts, or reusing another order's
    /// provider id, by channel and reason; and payments of another amount or currency.
    payment_unmatched: Family<ChannelReason, Counter>,
    payment_mismatch: Family<ChannelReason, Counter>,
}

/// A configured channel's name and a fixed reason: both chosen by the code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelReason {
    channel: String,
    reason: &'static str,
}

impl OrderMetrics {
    /// Counts a verified payment that paid nothing (`channel` is a configured channel's name).
    pub fn payment_problem(&self, channel: &str, kind: PaymentProblemKind) {
        self.problem_family(kind)
            .get_or_create(&ChannelReason { channel: channel.to_string(), reason: kind.as_str() })
            .inc();
    }

    /// Count of payment problems of `kind` at `channel`.
    pub fn payment_problems_of(&self, channel: &str, kind: PaymentProblemKind) -> u64 {
        self.problem_family(kind)
            .get_or_create(&ChannelReason { channel: channel.to_string(), reason: kind.as_str() })
            .get()
    }

    fn problem_family(&self, kind: PaymentProblemKind) -> &Family<ChannelReason, Counter> {
        if kind.unmatched().is_some() {
            &self.payment_unmatched
        } else {
            &self.payment_mismatch
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgecard_payment_unmatched",
            "Verified payments matching none of their order's attempts, or reusing another order's provider id: recorded, nothing delivered",
            self.payment_unmatched.clone(),
        );
        r.register(
            "edgecard_payment_mismatch",
            "Verified payments of another amount or currency than their order's: recorded, nothing delivered",
            self.payment_mismatch.clone(),
        );
        r.register(
            "edgecard_orders_refunded",
            "Orders refunded (their keys revoked): through their channel, marked for a refund by hand, or refunded at the provider",
            self.refunded.clone(),
        );
        r.register("edgecard_orders_created", "Orders reserved", self.created.clone());
        r.register("edgecard_purchases", "Orders delivered (keys revealed to the buyer)", self.delivered.clone());
        r.register("edgecard_orders_expired", "Reservations that expired unpaid", self.expired.clone());
        r.register(
            "edgecard_orders_awaiting_stock",
            "Payments that arrived after expiry with no stock left",
            self.awaiting_stock.clone(),
        );
        r.register("edgecard_orders_sold_out", "Order attempts refused for lack of stock", self.sold_out.clone());
        r.register(
            "edgecard_orders_window_full",
            "Order attempts refused because the take window is full (sales not yet acknowledged)",
            self.window_full.clone(),
        );
        r.register(
            "edgecard_reservation_cap_hits",
            "Order attempts refused by the open-reservation cap",
            self.reservation_cap_hits.clone(),
        );
        r.register(
            "edgecard_duplicate_payments",
            "Second payments for an already settled order (refund needed)",
            self.duplicate_payments.clone(),
        );
        r.register("edgecard_grants_installed", "Slice grants installed", self.grants_installed.clone());
        r.register(
            "edgecard_grants_refused",
            "Slice grants refused (signature, node id, content)",
            self.grants_refused.clone(),
        );
        r.register("edgecard_open_reservations", "Reservations currently open", self.open_reservations.clone());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelResult {
    channel: &'static str,
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// One channel's handles into the families of [`PaymentMetrics`]; made for every configured
/// channel up front, so each series exists (at 0) before its first event and `increase()` sees
/// the first one.
#[derive(Debug)]
pub struct ChannelMetrics {
    /// Creation latency of successful calls (`result="ok"`); its count is the calls made.
    pub create_ok: Histogram,
    /// Same for calls that failed or timed out (`result="failed"`).
    pub create_failed: Histogram,
    /// Callbacks verified and applied for the first time.
    pub callbacks_accepted: Counter,
    /// Authentic callbacks for a payment already recorded (provider retries): nothing changed.
    pub callbacks_replayed: Counter,
    /// Callbacks refused: signature, merchant, body, order, amount or currency.
    pub callbacks_refused: Counter,
    /// Authentic callbacks with nothing to do (other events, other nodes, non-success statuses).
    pub callbacks_ignored: Counter,
    pub queries_answered: Counter,
    pub queries_failed: Counter,
    /// Compensation found a payment that does not match its order: not delivered.
    pub query_mismatches: Counter,
    /// Orders confirmed by compensation (their callback never came, or came later).
    pub compensated: Counter,
    /// Refunds carried out (or marked for a refund by hand) through this channel.
    pub refunds: Counter,
    /// Refund calls that failed (retried).
    pub refund_failed: Counter,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: Gauge,
}

/// Payments: one [`ChannelMetrics`] per configured channel, labelled `channel`.
#[derive(Debug)]
pub struct PaymentMetrics {
    pub channels: Vec<(&'static str, ChannelMetrics)>,
    create_seconds: HistogramFamily<ChannelResult>,
    callbacks: Family<ChannelResult, Counter>,
    queries: Family<ChannelResult, Counter>,
    query_mismatches: Family<ChannelLabel, Counter>,
    compensated: Family<ChannelLabel, Counter>,
    refunds: Family<ChannelResult, Counter>,
    breaker_state: Family<ChannelLabel, Gauge>,
    /// Order creations refused because every channel of the route was down.
    pub no_channel_available: Counter,
    /// Orders compensation stopped querying (TTL + grace passed with no payment found).
    pub compensation_gave_up: Counter,
}

impl PaymentMetrics {
    pub fn new(names: &[&'static str]) -> Self {
        let mut metrics = PaymentMetrics {
            channels: Vec::with_capacity(names.len()),
            create_seconds: Family::new_with_constructor(latency_histogram),
            callbacks: Family::default(),
            queries: Family::default(),
            query_mismatches: Family::default(),
            compensated: Family::default(),
            refunds: Family::default(),
            breaker_state: Family::default(),
            no_channel_available: Counter::default(),
            compensation_gave_up: Counter::default(),
        };
        for &channel in names {
            let with = |result| ChannelResult { channel, result };
            let one = ChannelLabel { channel };
            let handles = ChannelMetrics {
                create_ok: metrics.create_seconds.get_or_create_owned(&with("ok")),
                create_failed: metrics.create_seconds.get_or_create_owned(&with("failed")),
                callbacks_accepted: metrics.callbacks.get_or_create_owned(&with("accepted")),
                callbacks_replayed: metrics.callbacks.get_or_create_owned(&with("replayed")),
                callbacks_refused: metrics.callbacks.get_or_create_owned(&with("refused")),
                callbacks_ignored: metrics.callbacks.get_or_create_owned(&with("ignored")),
                queries_answered: metrics.queries.get_or_create_owned(&with("answered")),
                queries_failed: metrics.queries.get_or_create_owned(&with("failed")),
                query_mismatches: metrics.query_mismatches.get_or_create_owned(&one),
                compensated: metrics.compensated.get_or_create_owned(&one),
                refunds: metrics.refunds.get_or_create_owned(&with("recorded")),
                refund_failed: metrics.refunds.get_or_create_owned(&with("failed")),
                breaker_state: metrics.breaker_state.get_or_create_owned(&one),
            };
            metrics.channels.push((channel, handles));
        }
        metrics
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelMetrics> {
        self.channels.iter().find(|(n, _)| *n == name).map(|(_, m)| m)
    }

    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "edgecard_payment_create",
            "Duration of payment creation calls to the provider, by channel and result (ok, failed)",
            Unit::Seconds,
            self.create_seconds.clone(),
        );
        r.register(
            "edgecard_payment_callbacks",
            "Payment callbacks by channel and result: accepted (applied), replayed (already recorded), \
             refused (signature, binding, amount, currency), ignored (nothing to do)",
            self.callbacks.clone(),
        );
        r.register(
            "edgecard_payment_queries",
            "Compensation queries by channel and result (answered, failed)",
            self.queries.clone(),
        );
        r.register(
            "edgecard_payment_query_mismatches",
            "Payments found by compensation that do not match their order (not delivered)",
            self.query_mismatches.clone(),
        );
        r.register(
            "edgecard_payment_compensated",
            "Orders confirmed by compensation rather than by their callback",
            self.compensated.clone(),
        );
        r.register(
            "edgecard_payment_breaker_state",
            "Circuit breaker per channel: 0 closed, 1 half-open, 2 open",
            self.breaker_state.clone(),
        );
        r.register(
            "edgecard_payment_refunds",
            "Refunds through each channel: recorded (made, or marked for a refund by hand), or provider calls that failed (retried)",
            self.refunds.clone(),
        );
        r.register(
            "edgecard_payment_no_channel",
            "Order creations refused because every channel of the route was unavailable",
            self.no_channel_available.clone(),
        );
        r.register(
            "edgecard_payment_compensation_gave_up",
            "Unconfirmed orders no longer queried (TTL + grace passed)",
            self.compensation_gave_up.clone(),
        );
    }
}

/// What the node's registry is built from.
/// Proof-of-work challenges and wait tickets of order creation (`crate::abuse`), by kind
/// (`challenge`, `wait_ticket`) and result (`issued`, `solved`, `failed`, `replayed`, `expired`,
/// `too_early`): fixed enumerations only.
#[derive(Debug, Default)]
pub struct ChallengeMetrics {
    results: Family<ChallengeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChallengeLabels {
    kind: &'static str,
    result: &'static str,
}

impl ChallengeMetrics {
    pub fn count(&self, kind: &'static str, result: &'static str) {
        self.results.get_or_create(&ChallengeLabels { kind, result }).inc();
    }

    pub fn get(&self, kind: &'static str, result: &'static str) -> u64 {
        self.results.get_or_create(&ChallengeLabels { kind, result }).get()
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgecard_challenges",
            "Order-creation challenges and wait tickets, by kind and result",
            self.results.clone(),
        );
    }
}

pub struct NodeMetricsSources<'a> {
    pub node_id: &'a str,
    pub region: &'a str,
    pub engine: Arc<OrderEngine>,
    pub limiters: Arc<Limiters>,
    pub http: &'a HttpMetrics,
    pub payments: &'a Router,
    pub sync: &'a SyncLinkMetrics,
    pub challenges: &'a ChallengeMetrics,
}

/// The node's one registry: every subsystem's metrics, stock and slices read at scrape time,
/// build info and process metrics, all labelled with the node's id and region.
pub fn node_registry(sources: NodeMetricsSources<'_>) -> Registry {
    let labels =
        [("node".into(), sources.node_id.to_string().into()), ("region".into(), sources.region.to_string().into())];
    let mut registry = Registry::with_labels(labels.into_iter());
    edgecard_net::metrics::register_build_info(&mut registry, "node", env!("CARGO_PKG_VERSION"));
    registry.register_collector(Box::new(edgecard_net::process_metrics::ProcessCollector));
    sources.http.register(&mut registry);
    sources.engine.metrics().register(&mut registry);
    sources.engine.store().metrics().register(&mut registry);
    sources.payments.metrics().register(&mut registry);
    sources.sync.register(&mut registry);
    sources.challenges.register(&mut registry);
    let (engine, limiters) = (sources.engine, sources.limiters);
    registry.register_collector(Box::new(FnCollector(move |encoder: &mut DescriptorEncoder| {
        encode_holdings(encoder, &engine, &limiters)
    })));
    registry
}

/// Stock per sku, slices by state, and the rate limiters' keys, as the engine holds them now.
fn encode_holdings(encoder: &mut DescriptorEncoder, engine: &OrderEngine, limiters: &Limiters) -> fmt::Result {
    let stock: Vec<_> = engine
        .catalog()
        .all()
        .iter()
        .map(|p| (vec![("sku", p.sku.to_string())], engine.stock(&p.sku) as i64))
        .collect();
    encode_gauge_rows(encoder, "edgecard_stock_keys", "Keys sellable now, per sku", None, &stock)?;
    let leases = engine.leases();
    let count = |pred: fn(&SliceStatus) -> bool| leases.iter().filter(|l| pred(l)).count() as i64;
    let no_labels: [(&str, &str); 0] = [];
    let slices = [
        ("edgecard_slices_selling", "Slices open under a live lease", count(|l| l.selling)),
        (
            "edgecard_slices_lease_expired",
            "Slices held whose lease has run out (the node does not sell from them)",
            count(|l| !l.lease_live),
        ),
        ("edgecard_slices_closed", "Slices the coordinator closed", count(|l| l.closed)),
        (
            "edgecard_slices_window_full",
            "Slices whose take window is full: no sale until the coordinator acknowledges",
            count(|l| l.unacked_takes >= l.take_window),
        ),
        ("edgecard_limiter_keys", "Client keys tracked by the rate limiters", limiters.tracked_keys() as i64),
    ];
    for (name, help, value) in slices {
        encode_gauge_rows(encoder, name, help, None, &[(no_labels, value)])?;
    }
    Ok(())
}
