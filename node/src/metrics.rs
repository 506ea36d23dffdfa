//! Prometheus metrics of the node: one struct per subsystem. Primitives come from the store crate.
//!
//! Label values are fixed enumerations chosen by the code, never request data, so no secret, token
//! or email can reach the metrics endpoint.

pub use edgecard_store::metrics::*;

#[derive(Debug, Default)]
pub struct OrderMetrics {
    pub created: Counter,
    pub delivered: Counter,
    pub expired: Counter,
    pub awaiting_stock: Counter,
    pub sold_out: Counter,
    pub reservation_cap_hits: Counter,
    pub duplicate_payments: Counter,
    pub callbacks_rejected: Counter,
    pub grants_installed: Counter,
    pub grants_refused: Counter,
    pub open_reservations: Gauge,
}

impl OrderMetrics {
    pub fn render(&self, out: &mut String) {
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

