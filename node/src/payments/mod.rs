//! Payment channels. A channel creates a payment for an order (the pay link or payload for the
//! buyer), verifies the provider's callbacks, and answers status queries for compensation; the
//! order engine then binds the verified payment to the order (amount, currency) and settles it.
//! Callbacks from every channel take the same path (`api.rs`, `process_callback`).
//!
//! - [`sandbox`]: built in; signed callbacks through the same path, with delay and failure knobs.
//! - [`stripe`]: Checkout Sessions and `Stripe-Signature` webhooks.
//! - [`epay`]: the MD5-signed submit/notify protocol of 易支付 aggregators.
//! - [`route_table`] (which channels serve which currency; the sandbox is a lab channel) +
//!   [`router`] + [`breaker`]: an ordered list of channels per currency, a circuit breaker per
//!   channel, and creation that falls through to the next channel.
//! - [`return_link`]: the short-lived links hosted providers send buyers back through.
//! - [`compensation`]: queries providers for orders left unconfirmed, because callbacks get lost.

pub mod breaker;
pub mod compensation;
pub mod epay;
pub mod http_client;
pub mod refunds;
pub mod return_link;
pub mod route_table;
pub mod router;
pub mod sandbox;
pub mod stripe;

use std::future::Future;
use std::pin::Pin;

use edgecard_protocol::OrderId;
use http::HeaderMap;

use crate::orders::{AttemptRef, OrderRecord};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a provider's callback says about a payment, once its signature has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCallback {
    pub order_id: OrderId,
    /// The provider's transaction id: callbacks are idempotent on (channel, this).
    pub provider_txn: String,
    pub amount_minor: u64,
    /// ISO 4217, upper case.
    pub currency: String,
    pub status: ProviderStatus,
    /// The provider's reference of the payment it was made through (a Checkout Session), when it
    /// gives one: it must be one of the order's payment attempts.
    pub provider_ref: Option<String>,
    /// The provider's id of the money movement when it differs from `provider_txn` (a
    /// PaymentIntent), which refunds and disputes name.
    pub provider_payment: Option<String>,
}

impl VerifiedCallback {
    /// What the engine binds to the order, as paid through `channel`.
    pub fn confirmation(self, channel: &str) -> crate::orders::PaymentConfirmation {
        crate::orders::PaymentConfirmation {
            order_id: self.order_id,
            channel: channel.to_string(),
            provider_txn: self.provider_txn,
            amount_minor: self.amount_minor,
            currency: self.currency,
            provider_ref: self.provider_ref,
            provider_payment: self.provider_payment,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStatus {
    Succeeded,
    /// Pending or failed: acknowledged, nothing changes.
    NotSucceeded,
}

/// A refund made at the provider (its dashboard, or its API by anyone), as its webhook reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRefund {
    /// The payment refunded (a Stripe PaymentIntent), which finds the order.
    pub provider_payment: String,
    /// The provider's refund id.
    pub provider_refund: String,
}

/// A dispute (chargeback) opened at the provider, as its webhook reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDispute {
    pub provider_payment: String,
    pub provider_dispute: String,
    pub amount_minor: u64,
    /// ISO 4217, upper case.
    pub currency: String,
}

/// The outcome of checking a callback that is authentic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackVerdict {
    /// About a payment of one of our orders.
    Payment(VerifiedCallback),
    /// A payment was refunded in full at the provider.
    Refund(ProviderRefund),
    /// A payment was disputed at the provider.
    Dispute(ProviderDispute),
    /// Authentic but not for us to act on (another event type, another node's order):
    /// acknowledged so the provider stops retrying, nothing changes.
    Ignored(&'static str),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CallbackError {
    #[error("missing signature")]
    MissingSignature,
    #[error("malformed signature")]
    MalformedSignature,
    #[error("signature does not verify")]
    BadSignature,
    #[error("callback timestamp outside the accepted window")]
    Stale,
    #[error("callback is for another merchant")]
    WrongMerchant,
    #[error("malformed callback body: {0}")]
    MalformedBody(String),
}

/// A callback as it arrived: headers, the query string (EPay notifies may be GETs) and the raw
/// body (signatures cover the exact bytes).
#[derive(Debug, Clone, Copy)]
pub struct CallbackRequest<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// How a channel's provider expects its callbacks to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStyle {
    /// JSON body; 2xx means "received", anything else makes the provider retry.
    Json,
    /// Plain text `success` once the payment is durably recorded, `fail` otherwise (EPay).
    PlainSuccess,
}

/// A payment created at the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedPayment {
    /// Where the buyer pays.
    pub pay_url: String,
    /// The provider's handle of this payment when it cannot be derived from the order (a Stripe
    /// Checkout Session id); recorded on the order and used to query it. `None` for channels
    /// that key payments by our order id.
    pub provider_ref: Option<String>,
    /// Until when the provider takes this payment (a Checkout Session's `expires_at`); `None`
    /// when it does not expire.
    pub pays_until: Option<edgecard_protocol::UnixMillis>,
}

/// What the provider says about an order's payment, for compensation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueriedStatus {
    /// Paid: the confirmation is bound to the order like a callback's.
    Paid(VerifiedCallback),
    /// Not paid yet (or no such payment): ask again later.
    Pending,
    /// Finally failed or expired at the provider: stop asking.
    Failed,
}

/// A refund carried out at the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundResult {
    /// The provider took it; `provider_refund` names it.
    Refunded { provider_refund: String },
    /// The channel has no refund call: the merchant refunds by hand at the provider.
    Manual,
}

/// Failures talking to a provider. `retryable` says whether the same call may succeed later.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChannelError {
    #[error("{channel}: request timed out")]
    Timeout { channel: &'static str },
    #[error("{channel}: provider unavailable: {reason}")]
    Unavailable { channel: &'static str, reason: String },
    #[error("{channel}: provider refused the request: {reason}")]
    Rejected { channel: &'static str, reason: String },
    #[error("{channel}: unexpected provider response: {reason}")]
    BadResponse { channel: &'static str, reason: String },
    #[error("{channel}: cannot serve this order: {reason}")]
    Unsupported { channel: &'static str, reason: String },
}

impl ChannelError {
    /// Timeouts, connection failures and 5xx may pass; a refusal or an unsupported order will not.
    pub fn retryable(&self) -> bool {
        matches!(self, ChannelError::Timeout { .. } | ChannelError::Unavailable { .. })
    }
}

/// One payment provider, as the node sees it.
pub trait PaymentChannel: Send + Sync {
    fn name(&self) -> &'static str;

    /// Creates the payment for `order` at the provider. `public_url` is the node's public base
    /// URL (for return and notify URLs). Must be idempotent per order: a retry after a timeout
    /// must not make a second payment.
    fn create_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        public_url: &'a str,
    ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>>;

    /// The pay link of `order` when it can be derived without the provider (sandbox, EPay);
    /// `None` when only creation yields it (Stripe), in which case it is recorded on the order.
    fn local_pay_url(&self, order: &OrderRecord, public_url: &str) -> Option<String>;

    /// Checks a callback's authenticity and reads it. Binding to the order is the engine's job.
    fn verify_callback(
        &self,
        request: &CallbackRequest<'_>,
        now_unix_secs: u64,
    ) -> Result<CallbackVerdict, CallbackError>;

    /// Refunds `order`'s payment in full at the provider. Must be idempotent per order: asking
    /// again after a crash or a timeout (the provider may have refunded already) gives the same
    /// refund, never a second one. Channels without a refund call answer `Manual`.
    fn refund<'a>(&'a self, _order: &'a OrderRecord) -> BoxFuture<'a, Result<RefundResult, ChannelError>> {
        Box::pin(async { Ok(RefundResult::Manual) })
    }

    /// Asks the provider about the payment of `order` opened through `attempt` (compensation for
    /// lost callbacks).
    fn query_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        attempt: AttemptRef<'a>,
    ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>>;

    fn ack_style(&self) -> AckStyle {
        AckStyle::Json
    }

    /// Until when the provider takes the payment opened through `attempt` (compensation queries
    /// until then, plus a grace period); `None` when it never expires (compensation's cap
    /// applies).
    fn pays_until(&self, _order: &OrderRecord, attempt: AttemptRef<'_>) -> Option<edgecard_protocol::UnixMillis> {
        attempt.pays_until
    }

    /// Whether this channel can take an amount in `currency` at all.
    fn takes_currency(&self, _currency: &str) -> bool {
        true
    }

    /// The pay link shown for `order`: the one recorded when its payment was created, else the
    /// one derivable from the order; empty when neither exists.
    fn pay_url(&self, order: &OrderRecord, public_url: &str) -> String {
        order
            .latest_attempt()
            .and_then(|a| a.pay_url.clone())
            .or_else(|| self.local_pay_url(order, public_url))
            .unwrap_or_default()
    }
}

/// Why a payment could not be opened for an order.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No channel of the route took it.
    #[error("{0}")]
    Route(#[from] router::RouteError),
    /// Recording the attempt on the order failed.
    #[error("{0}")]
    Order(#[from] crate::orders::OrderError),
}

/// Creates the payment of a freshly reserved order through `plan`, falling through channels as
/// the router decides, and records it on the order (durably, before the pay link is shown) when
/// the channel has a handle or a payment window of its own, a pay link it cannot derive, or is
/// not the one first chosen. Returns the channel that took it and what it created.
pub async fn open_payment(
    engine: &crate::orders::OrderEngine,
    router: &router::Router,
    record: &OrderRecord,
    public_url: &str,
    plan: &[usize],
) -> Result<(std::sync::Arc<dyn PaymentChannel>, CreatedPayment), OpenError> {
    let (channel, created) = router.create(record, public_url, plan).await?;
    let needs_record = created.provider_ref.is_some()
        || created.pays_until.is_some()
        || channel.name() != record.channel
        || channel.local_pay_url(record, public_url).as_deref() != Some(created.pay_url.as_str());
    if needs_record {
        let attempt = crate::orders::PaymentAttempt {
            channel: channel.name().to_string(),
            provider_ref: created.provider_ref.clone(),
            pay_url: Some(created.pay_url.clone()),
            created_at: crate::orders::engine::now_millis(),
            pays_until: created.pays_until,
        };
        engine.record_payment_attempt(&record.id, attempt).await?;
    }
    Ok((channel, created))
}

/// The payment side of a node, built from its config: channels, router, sandbox handle.
pub struct Payments {
    pub router: std::sync::Arc<router::Router>,
    pub channels: std::collections::HashMap<&'static str, std::sync::Arc<dyn PaymentChannel>>,
    pub sandbox: Option<std::sync::Arc<sandbox::SandboxChannel>>,
    pub compensation: Option<compensation::CompensationConfig>,
    /// Whether lab (sandbox) payments are on, and beside real channels or not.
    pub lab: LabPayments,
}

/// Whether the sandbox, through which anyone pays for free, is on. Beside a real channel (allowed
/// explicitly) the storefront shows a notice on every page and `/healthz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabPayments {
    Off,
    /// The sandbox is the node's only channel: a lab or demo node.
    LabNode,
    BesideRealChannels,
}

impl LabPayments {
    pub fn of(config: &crate::config::NodeConfig) -> LabPayments {
        match (config.payments.sandbox.enabled, config.real_channels().is_empty()) {
            (false, _) => LabPayments::Off,
            (true, true) => LabPayments::LabNode,
            (true, false) => LabPayments::BesideRealChannels,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LabPayments::Off => "off",
            LabPayments::LabNode => "lab_node",
            LabPayments::BesideRealChannels => "beside_real_channels",
        }
    }
}

/// Builds the enabled channels, their routes and breakers. Hosted channels send buyers back
/// through `return_links`. Errors name the config field.
pub fn build(config: &crate::config::NodeConfig, return_links: &return_link::ReturnLinks) -> Result<Payments, String> {
    use std::sync::Arc;
    use std::time::Duration;

    let p = &config.payments;
    let extra_ca = match &p.extra_ca_file {
        Some(path) => Some(
            std::fs::read(path).map_err(|e| format!("payments.extra_ca_file: cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let client =
        http_client::OutboundClient::new(extra_ca.as_deref()).map_err(|e| format!("payments.extra_ca_file: {e}"))?;
    let timeout = Duration::from_millis(p.create_timeout_ms);
    let mut channels: Vec<Arc<dyn PaymentChannel>> = Vec::new();
    let mut sandbox_handle = None;
    for name in config.enabled_channels() {
        match name {
            stripe::NAME => {
                let settings = stripe::StripeSettings {
                    api_base: p.stripe.api_base.clone(),
                    secret_key: p.stripe.secret_key.clone().unwrap_or_default(),
                    webhook_secret: p.stripe.webhook_secret.clone().unwrap_or_default(),
                    tolerance_secs: p.stripe.tolerance_secs,
                    request_timeout: timeout,
                    node_id: config.node_id.to_string(),
                    return_links: return_links.clone(),
                    session_ttl_secs: p.stripe.session_ttl_secs,
                };
                let channel = stripe::StripeChannel::new(settings, client.clone())
                    .map_err(|e| format!("payments.stripe.webhook_secret: {e}"))?;
                channels.push(Arc::new(channel));
            }
            epay::NAME => {
                let settings = epay::EpaySettings {
                    gateway_url: p.epay.gateway_url.clone(),
                    pid: p.epay.pid.clone(),
                    key: p.epay.key.clone().unwrap_or_default(),
                    pay_type: p.epay.pay_type.clone(),
                    currency: p.epay.currency.to_string(),
                    request_timeout: timeout,
                    return_links: return_links.clone(),
                };
                channels.push(Arc::new(epay::EpayChannel::new(settings, client.clone())));
            }
            _ => {
                let secret = match &p.sandbox.secret {
                    Some(secret) => secret.as_bytes().to_vec(),
                    None => {
                        use rand::RngCore;
                        let mut key = vec![0u8; 32];
                        rand::rngs::OsRng.fill_bytes(&mut key);
                        key
                    }
                };
                let faults = sandbox::SandboxFaults {
                    callback_delay: Duration::from_millis(p.sandbox.callback_delay_ms),
                    callback_failure_rate: p.sandbox.callback_failure_rate,
                };
                let channel = Arc::new(
                    sandbox::SandboxChannel::with_faults(&secret, p.sandbox.tolerance_secs, faults)
                        .map_err(|_| "payments.sandbox.secret: unusable key".to_string())?,
                );
                sandbox_handle = Some(channel.clone());
                channels.push(channel);
            }
        }
    }
    let index = |name: &str| channels.iter().position(|c| c.name() == name);
    let indices = |names: &[&'static str]| -> Result<Vec<usize>, String> {
        names.iter().map(|n| index(n).ok_or_else(|| format!("payments.routes: {n} is not enabled"))).collect()
    };
    let table = route_table::RouteTable::from_config(config);
    let mut routes = router::Routes { default: indices(&table.default)?, ..router::Routes::default() };
    for (currency, names) in &table.by_currency {
        routes.by_currency.insert(currency.clone(), indices(names)?);
    }
    let names: Vec<&'static str> = channels.iter().map(|c| c.name()).collect();
    let metrics = Arc::new(crate::metrics::PaymentMetrics::new(&names));
    let options = router::RouterOptions {
        attempts_per_channel: p.create_attempts,
        attempt_timeout: timeout,
        retry_backoff: Duration::from_millis(p.retry_backoff_ms),
        breaker: breaker::BreakerConfig {
            failure_threshold: p.breaker.failure_threshold,
            open_ms: p.breaker.open_ms,
            half_open_probes: p.breaker.half_open_probes,
        },
    };
    let by_name = channels.iter().map(|c| (c.name(), c.clone())).collect();
    let router = Arc::new(router::Router::new(channels, routes, options, metrics));
    let compensation = p.compensation.enabled.then(|| compensation::CompensationConfig {
        first_query_after_ms: p.compensation.first_query_after_ms,
        max_backoff_ms: p.compensation.max_backoff_ms,
        grace_ms: p.compensation.grace_secs.saturating_mul(1000),
        max_window_ms: p.compensation.max_window_hours.saturating_mul(3_600_000),
        scan_every_ms: p.compensation.scan_every_ms,
        concurrency: p.compensation.concurrency,
        query_timeout_ms: p.create_timeout_ms,
    });
    Ok(Payments { router, channels: by_name, sandbox: sandbox_handle, compensation, lab: LabPayments::of(config) })
}

/// Formats minor units as a decimal with exactly two fraction digits: 1000 → "10.00".
pub fn format_money_2dp(amount_minor: u64) -> String {
    format!("{}.{:02}", amount_minor / 100, amount_minor % 100)
}

/// Parses a decimal amount with at most two fraction digits into minor units, exactly:
/// "10.00" → 1000, "10.5" → 1050, "10" → 1000. Anything else (signs, exponents, a third
/// fraction digit, overflow) is `None`.
pub fn parse_money_2dp(text: &str) -> Option<u64> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    if whole.is_empty() || whole.len() > 15 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 2
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || (text.contains('.') && fraction.is_empty())
    {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let cents: u64 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<u64>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    whole.checked_mul(100)?.checked_add(cents)
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Percent-decodes one `application/x-www-form-urlencoded` component (`+` is a space).
pub fn form_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes for a form or query component (unreserved characters kept).
pub fn form_encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a form body or query string into (name, value) pairs. Repeated names are an error
/// (a signed parameter set must be unambiguous).
pub fn parse_form(raw: &str) -> Option<Vec<(String, String)>> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = form_decode(k)?;
        let v = form_decode(v)?;
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return None;
        }
        pairs.push((k, v));
    }
    Some(pairs)
}

/// Encodes (name, value) pairs as a form body or query string.
pub fn encode_form(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v))).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn money_is_formatted_and_parsed_exactly() {
        assert_eq!(format_money_2dp(1000), "10.00");
        assert_eq!(format_money_2dp(5), "0.05");
        assert_eq!(parse_money_2dp("10.00"), Some(1000));
        assert_eq!(parse_money_2dp("10.5"), Some(1050));
        assert_eq!(parse_money_2dp("10"), Some(1000));
        assert_eq!(parse_money_2dp("0.05"), Some(5));
        for bad in ["10.001", "-1", "1e3", "", ".5", "10.", "1 0", "+1", "99999999999999999999", "10.0a"] {
            assert_eq!(parse_money_2dp(bad), None, "{bad}");
        }
        for n in [0, 1, 99, 100, 12345, u64::MAX / 1000] {
            assert_eq!(parse_money_2dp(&format_money_2dp(n)), Some(n));
        }
    }

    #[test]
    fn forms_round_trip_and_reject_repeats() {
        let encoded = encode_form(&[("name", "游戏 卡&=".into()), ("a", "1".into())]);
        let parsed = parse_form(&encoded).unwrap();
        assert_eq!(parsed, vec![("name".into(), "游戏 卡&=".into()), ("a".into(), "1".into())]);
        assert_eq!(parse_form("a=1&a=2"), None);
        assert_eq!(parse_form("a=%zz"), None);
        assert_eq!(parse_form("a=%ff"), None, "not UTF-8");
        assert_eq!(parse_form("a=x+y").unwrap()[0].1, "x y");
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
