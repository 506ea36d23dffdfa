//! Metrics of the buyer-facing HTTPS listener: one latency histogram labelled by route template,
//! method and status class, and the 429 counter.
//!
//! Every label value is one of a fixed set: the route is the template the request matched
//! (`/api/v1/orders/{id}`), never the raw path, and anything unknown is `other`; so the series
//! stay bounded whatever clients send.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use edgecard_store::metrics::LATENCY_BUCKETS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    class: &'static str,
}

#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub rate_limited: Counter,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            rate_limited: Counter::default(),
        }
    }
}

impl HttpMetrics {
    /// Records one answered request; `route` comes from [`route_template`].
    pub fn record(&self, route: &'static str, method: &http::Method, status: u16, seconds: f64) {
        let labels = RequestLabels { route, method: method_label(method), class: status_class(status) };
        self.requests.get_or_create(&labels).observe(seconds);
        if status == 429 {
            self.rate_limited.inc();
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "edgecard_http_request_duration",
            "Time from request head to response, by route template, method and status class; \
             the count is the number of requests",
            Unit::Seconds,
            self.requests.clone(),
        );
        r.register("edgecard_http_rate_limited", "Requests answered 429", self.rate_limited.clone());
    }
}

/// The route template `path` matches, as the API and storefront routers match it (leading and
/// trailing slashes ignored); `other` for anything else. Keep in step with `api::route` and
/// `storefront::handle`: a new route shows here as `other` until added.
pub fn route_template(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] => "/",
        ["healthz"] => "/healthz",
        ["api", "v1", "products"] => "/api/v1/products",
        ["api", "v1", "orders"] => "/api/v1/orders",
        ["api", "v1", "orders", _] => "/api/v1/orders/{id}",
        ["api", "v1", "payments", _, "callback"] => "/api/v1/payments/{channel}/callback",
        ["pay", "sandbox", _] => "/pay/sandbox/{id}",
        ["p", _] => "/p/{sku}",
        ["checkout"] => "/checkout",
        ["order", _] => "/order/{id}",
        ["static", _] => "/static/{asset}",
        _ => "other",
    }
}

/// The standard methods by name; anything else is `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `1xx` … `5xx`; each class on its own (a 304 is `3xx`, not a success).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_templates_and_unknown_paths_are_other() {
        let cases = [
            ("/", "/"),
            ("/healthz", "/healthz"),
            ("/api/v1/products", "/api/v1/products"),
            ("/api/v1/products/", "/api/v1/products"),
            ("/api/v1/orders", "/api/v1/orders"),
            ("/api/v1/orders/0123abcd", "/api/v1/orders/{id}"),
            ("/api/v1/payments/stripe/callback", "/api/v1/payments/{channel}/callback"),
            ("/pay/sandbox/00ff", "/pay/sandbox/{id}"),
            ("/p/game-card-10", "/p/{sku}"),
            ("/checkout", "/checkout"),
            ("/order/00ff", "/order/{id}"),
            ("/static/app.1234.css", "/static/{asset}"),
            ("/wp-login.php", "other"),
            ("/api/v1/orders/a/b", "other"),
            ("/api/v2/orders", "other"),
        ];
        for (path, route) in cases {
            assert_eq!(route_template(path), route, "{path}");
        }
    }

    #[test]
    fn classes_keep_redirects_apart_and_methods_are_bounded() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(304), "3xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(method_label(&http::Method::GET), "GET");
        let odd = http::Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(method_label(&odd), "other");
    }

    #[test]
    fn requests_are_counted_per_route_and_class() {
        let metrics = HttpMetrics::default();
        metrics.record(route_template("/api/v1/orders/abc"), &http::Method::GET, 304, 0.001);
        metrics.record(route_template("/api/v1/orders"), &http::Method::POST, 429, 0.001);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let text = edgecard_net::metrics::encode(&registry).expect("encodes");
        let expected = "edgecard_http_request_duration_seconds_count{route=\"/api/v1/orders/{id}\",method=\"GET\",class=\"3xx\"} 1";
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("edgecard_http_rate_limited_total 1\n"), "{text}");
        assert!(!text.contains("abc"), "{text}");
    }
}
