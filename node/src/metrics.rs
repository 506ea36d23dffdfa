//! Prometheus metrics of the node: one struct per subsystem. Primitives come from the store crate.
//!
//! Label values are fixed enumerations chosen by the code, never request data, so no secret, token
//! or email can reach the metrics endpoint.

pub use edgecard_store::metrics::*;

use crate::orders::PaymentProblemKind;

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
    pub callbacks_rejected: Counter,
    pub grants_installed: Counter,
    pub grants_refused: Counter,
    pub open_reservations: Gauge,
    /// Verified payments that paid nothing, by (channel, kind); channel names come from the
    /// node's configured channels only.
    pub payment_problems: parking_lot::Mutex<std::collections::BTreeMap<(String, PaymentProblemKind), u64>>,
}

impl OrderMetrics {
    pub fn payment_problem(&self, channel: &str, kind: PaymentProblemKind) {
        *self.payment_problems.lock().entry((channel.to_string(), kind)).or_default() += 1;
    }

    /// Count of payment problems of `kind` at `channel`.
    pub fn payment_problems_of(&self, channel: &str, kind: PaymentProblemKind) -> u64 {
        self.payment_problems.lock().get(&(channel.to_string(), kind)).copied().unwrap_or(0)
    }

    fn render_payment_problems(&self, out: &mut String) {
        let problems = self.payment_problems.lock().clone();
        let families = [
            (
                "edgecard_payment_unmatched_total",
                "Verified payments matching none of their order's attempts, or reusing another order's provider id: recorded, nothing delivered.",
                true,
            ),
            (
                "edgecard_payment_mismatch_total",
                "Verified payments of another amount or currency than their order's: recorded, nothing delivered.",
                false,
            ),
        ];
        for (name, help, unmatched) in families {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for ((channel, kind), count) in problems.iter().filter(|((_, k), _)| k.unmatched().is_some() == unmatched) {
                out.push_str(&format!("{name}{{channel=\"{channel}\",reason=\"{}\"}} {count}\n", kind.as_str()));
            }
        }
    }

    pub fn render(&self, out: &mut String) {
        self.render_payment_problems(out);
        render_counter(out, "edgecard_orders_created_total", "Orders reserved.", self.created.get());
        render_counter(
            out,
            "edgecard_purchases_total",
            "Orders delivered (keys revealed to the buyer).",
            self.delivered.get(),
        );
        render_counter(out, "edgecard_orders_expired_total", "Reservations that expired unpaid.", self.expired.get());
        render_counter(
            out,
            "edgecard_orders_awaiting_stock_total",
            "Payments that arrived after expiry with no stock left.",
            self.awaiting_stock.get(),
        );
        render_counter(
            out,
            "edgecard_orders_sold_out_total",
            "Order attempts refused for lack of stock.",
            self.sold_out.get(),
        );
        render_counter(
            out,
            "edgecard_orders_window_full_total",
            "Order attempts refused because the take window is full (sales not yet acknowledged).",
            self.window_full.get(),
        );
        render_counter(
            out,
            "edgecard_reservation_cap_hits_total",
            "Order attempts refused by the open-reservation cap.",
            self.reservation_cap_hits.get(),
        );
        render_counter(
            out,
            "edgecard_duplicate_payments_total",
            "Second payments for an already settled order (refund needed).",
            self.duplicate_payments.get(),
        );
        render_counter(
            out,
            "edgecard_orders_refunded_total",
            "Orders refunded (their keys revoked): through their channel, marked for a refund by hand, or refunded at the provider.",
            self.refunded.get(),
        );
        render_counter(
            out,
            "edgecard_payment_callbacks_rejected_total",
            "Payment callbacks refused (signature, binding, amount, currency or status).",
            self.callbacks_rejected.get(),
        );
        render_counter(out, "edgecard_grants_installed_total", "Slice grants installed.", self.grants_installed.get());
        render_counter(
            out,
            "edgecard_grants_refused_total",
            "Slice grants refused (signature, node id, content).",
            self.grants_refused.get(),
        );
        render_gauge(out, "edgecard_open_reservations", "Reservations currently open.", self.open_reservations.get());
    }
}

#[derive(Debug)]
pub struct HttpMetrics {
    pub requests: Counter,
    pub responses_2xx: Counter,
    pub responses_4xx: Counter,
    pub responses_5xx: Counter,
    pub rate_limited: Counter,
    pub request_seconds: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Counter::default(),
            responses_2xx: Counter::default(),
            responses_4xx: Counter::default(),
            responses_5xx: Counter::default(),
            rate_limited: Counter::default(),
            request_seconds: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl HttpMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        self.requests.inc();
        match status {
            200..=399 => self.responses_2xx.inc(),
            400..=499 => self.responses_4xx.inc(),
            _ => self.responses_5xx.inc(),
        }
        self.request_seconds.observe(seconds);
    }

    pub fn render(&self, out: &mut String) {
        render_counter(out, "edgecard_http_requests_total", "HTTP requests served.", self.requests.get());
        render_labelled(
            out,
            "edgecard_http_responses_total",
            "counter",
            "HTTP responses by status class.",
            "class",
            &[
                ("2xx".into(), self.responses_2xx.get() as i64),
                ("4xx".into(), self.responses_4xx.get() as i64),
                ("5xx".into(), self.responses_5xx.get() as i64),
            ],
        );
        render_counter(out, "edgecard_http_rate_limited_total", "Requests answered 429.", self.rate_limited.get());
        self.request_seconds.render(out, "edgecard_http_request_seconds", "Time from request head to response.");
    }
}

/// Per payment channel: creation results and latency, callbacks, compensation queries, breaker.
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    pub create_ok: Counter,
    pub create_failed: Counter,
    /// Sum of creation latencies in microseconds (count = ok + failed).
    pub create_micros: Counter,
    pub callbacks_accepted: Counter,
    pub callbacks_rejected: Counter,
    pub callbacks_ignored: Counter,
    pub queries: Counter,
    pub query_failed: Counter,
    /// Orders confirmed by compensation (their callback never came, or came later).
    pub compensated: Counter,
    /// Refunds carried out (or marked for a refund by hand) through this channel.
    pub refunds: Counter,
    /// Refund calls that failed (retried).
    pub refund_failed: Counter,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: Gauge,
}

impl ChannelMetrics {
    pub fn observe_create(&self, ok: bool, elapsed: std::time::Duration) {
        if ok {
            self.create_ok.inc();
        } else {
            self.create_failed.inc();
        }
        self.create_micros.add(elapsed.as_micros() as u64);
    }
}

/// Payments: one [`ChannelMetrics`] per configured channel, labelled `channel`.
#[derive(Debug, Default)]
pub struct PaymentMetrics {
    pub channels: Vec<(&'static str, ChannelMetrics)>,
    /// Order creations refused because every channel of the route was down.
    pub no_channel_available: Counter,
    /// Orders compensation stopped querying (TTL + grace passed with no payment found).
    pub compensation_gave_up: Counter,
}

impl PaymentMetrics {
    pub fn new(channels: &[&'static str]) -> Self {
        PaymentMetrics {
            channels: channels.iter().map(|name| (*name, ChannelMetrics::default())).collect(),
            ..PaymentMetrics::default()
        }
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelMetrics> {
        self.channels.iter().find(|(n, _)| *n == name).map(|(_, m)| m)
    }

    pub fn render(&self, out: &mut String) {
        type Get = fn(&ChannelMetrics) -> i64;
        let families: [(&str, &str, &str, Get); 12] = [
            ("edgecard_payment_create_ok_total", "counter", "Payments created at the provider.", |m| {
                m.create_ok.get() as i64
            }),
            (
                "edgecard_payment_create_failed_total",
                "counter",
                "Payment creation attempts that failed (error or timeout).",
                |m| m.create_failed.get() as i64,
            ),
            (
                "edgecard_payment_create_milliseconds_total",
                "counter",
                "Time spent creating payments, in ms; divide by ok + failed for the mean.",
                |m| (m.create_micros.get() / 1_000) as i64,
            ),
            ("edgecard_payment_callbacks_accepted_total", "counter", "Callbacks verified and applied.", |m| {
                m.callbacks_accepted.get() as i64
            }),
            (
                "edgecard_payment_callbacks_refused_total",
                "counter",
                "Callbacks refused (signature, merchant, body, order, amount or currency).",
                |m| m.callbacks_rejected.get() as i64,
            ),
            (
                "edgecard_payment_callbacks_ignored_total",
                "counter",
                "Authentic callbacks with nothing to do (other events, other nodes, non-success statuses).",
                |m| m.callbacks_ignored.get() as i64,
            ),
            ("edgecard_payment_queries_total", "counter", "Compensation queries sent.", |m| m.queries.get() as i64),
            ("edgecard_payment_query_failed_total", "counter", "Compensation queries that failed.", |m| {
                m.query_failed.get() as i64
            }),
            (
                "edgecard_payment_compensated_total",
                "counter",
                "Orders confirmed by compensation rather than by their callback.",
                |m| m.compensated.get() as i64,
            ),
            (
                "edgecard_payment_refunds_total",
                "counter",
                "Refunds recorded through this channel (made, or marked for a refund by hand).",
                |m| m.refunds.get() as i64,
            ),
            (
                "edgecard_payment_refund_failed_total",
                "counter",
                "Refund calls to the provider that failed (retried).",
                |m| m.refund_failed.get() as i64,
            ),
            (
                "edgecard_payment_breaker_state",
                "gauge",
                "Circuit breaker per channel: 0 closed, 1 half-open, 2 open.",
                |m| m.breaker_state.get(),
            ),
        ];
        for (name, kind, help, get) in families {
            let rows: Vec<(String, i64)> = self.channels.iter().map(|(n, m)| (n.to_string(), get(m))).collect();
            render_labelled(out, name, kind, help, "channel", &rows);
        }
        render_counter(
            out,
            "edgecard_payment_no_channel_total",
            "Order creations refused because every channel of the route was unavailable.",
            self.no_channel_available.get(),
        );
        render_counter(
            out,
            "edgecard_payment_compensation_gave_up_total",
            "Unconfirmed orders no longer queried (TTL + grace passed).",
            self.compensation_gave_up.get(),
        );
    }
}
