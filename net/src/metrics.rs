//! Metrics plumbing shared by node and coordinator, on `prometheus-client`: the `/metrics`
//! response (Prometheus text format 0.0.4, which promtool and every Prometheus read), build info,
//! and helpers for collectors whose values are read at scrape time.
//!
//! Label values are fixed enumerations or ids chosen by the code (a sku, a node id, a slice id),
//! never request data, so no secret, token or email can reach a metrics endpoint.

use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use prometheus_client;

/// Encodes `registry` as Prometheus text.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// The `/metrics` response: 200 with the text, or 500 when a collector failed.
pub fn response(registry: &Registry) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match encode(registry) {
        Ok(text) => (StatusCode::OK, text, prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be encoded\n".to_string(), "text/plain"),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Registers `edgecard_build_info{component, version, revision} 1`. `revision` comes from
/// `EDGECARD_BUILD_REVISION` at compile time (a packaging step sets it), else "unknown".
pub fn register_build_info(registry: &mut Registry, component: &'static str, version: &'static str) {
    let revision = option_env!("EDGECARD_BUILD_REVISION").unwrap_or("unknown");
    let labels = vec![("component", component), ("version", version), ("revision", revision)];
    registry.register("edgecard_build", "Build of this process (always 1)", Info::new(labels));
}

/// Writes one gauge family from `rows` (labels, value); nothing when `rows` is empty, so a
/// family without samples never shows as a bare HELP line.
pub fn encode_gauge_rows<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(L, V)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let first = ConstGauge::new(rows[0].1);
    let mut family = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes one counter family from `rows` (labels, value); `name` without `_total`, which the
/// encoder adds.
pub fn encode_counter_rows<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, u64)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let first = ConstCounter::new(rows[0].1);
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A collector made of a closure, for values read at scrape time from state that lives elsewhere
/// (stock, leases, limiter keys).
pub struct FnCollector<F>(pub F);

impl<F> fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnCollector")
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn text_has_const_labels_build_info_and_collector_rows() {
        let mut registry = Registry::with_labels([("node".into(), "eu-1".into())].into_iter());
        register_build_info(&mut registry, "node", "1.2.3");
        let purchases = Counter::<u64>::default();
        registry.register("edgecard_purchases", "Orders delivered", purchases.clone());
        purchases.inc();
        registry.register_collector(Box::new(FnCollector(|encoder: &mut DescriptorEncoder| {
            encode_gauge_rows(encoder, "edgecard_stock_keys", "Keys on sale", None, &[(vec![("sku", "a")], 3i64)])?;
            encode_gauge_rows::<Vec<(&str, &str)>, i64>(encoder, "edgecard_empty", "Nothing", None, &[])
        })));
        let text = encode(&registry).expect("encodes");
        assert!(text.contains("# TYPE edgecard_purchases_total counter\n"), "{text}");
        assert!(text.contains("edgecard_purchases_total{node=\"eu-1\"} 1\n"), "{text}");
        assert!(
            text.contains("edgecard_build_info{node=\"eu-1\",component=\"node\",version=\"1.2.3\",revision=\""),
            "{text}"
        );
        assert!(text.contains("edgecard_stock_keys{node=\"eu-1\",sku=\"a\"} 3\n"), "{text}");
        assert!(!text.contains("edgecard_empty"), "{text}");
    }
}
