//! Stripe: Checkout Sessions and webhooks.
//!
//! - **Create**: `POST {api_base}/v1/checkout/sessions`, form-encoded, `Authorization: Bearer
//!   sk_…`, with `Idempotency-Key: edgecard-checkout-{order id}` so a retry after a timeout returns
//!   the same session. One line item of the order's total (`quantity=1`), so `amount_total` is the
//!   order's amount exactly; `client_reference_id` and `metadata[order_id]` carry the order id,
//!   `metadata[node_id]` this node's id.
//! - **Webhook**: `Stripe-Signature: t=…,v1=…[,v1=…]`, HMAC-SHA256 over `"{t}.{raw body}"` with
//!   the endpoint's signing secret, any `v1` may match (secret rotation), `t` within the tolerance.
//!   `checkout.session.completed` with `payment_status=paid` and
//!   `checkout.session.async_payment_succeeded` are payments; `async_payment_failed` and
//!   `completed` while unpaid are acknowledged without effect; other event types are ignored.
//! - **Provider transaction id** = the Checkout Session id (`cs_…`): the webhook and the query
//!   both carry it, so a payment confirmed by compensation and then by a late webhook is one
//!   payment. (The PaymentIntent id is absent from sessions still unpaid, so it is not used.)
//! - **Query**: `GET {api_base}/v1/checkout/sessions/{id}`.
//! - **Return**: `success_url` and `cancel_url` are the order's return link
//!   ([`super::return_link`]): the buyer comes back to the order page without its token.
//! - **Refunds and disputes**: see [`refunds`].

mod refunds;

pub use refunds::refund_idempotency_key;

use std::time::Duration;

use hmac::{Hmac, Mac};
use http::Method;
use serde_json::Value;
use sha2::Sha256;

use super::http_client::{OutboundClient, OutboundError, OutboundResponse};
use super::return_link::ReturnLinks;
use super::{
    encode_form, BoxFuture, CallbackError, CallbackRequest, CallbackVerdict, ChannelError, CreatedPayment,
    PaymentChannel, ProviderStatus, QueriedStatus, RefundResult, VerifiedCallback,
};
use crate::orders::{AttemptRef, OrderRecord};
use edgecard_protocol::UnixMillis;

pub const NAME: &str = "stripe";
pub const SIGNATURE_HEADER: &str = "stripe-signature";

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct StripeSettings {
    /// `https://api.stripe.com`, or a test gateway's base URL; no trailing slash.
    pub api_base: String,
    pub secret_key: String,
    pub webhook_secret: String,
    pub tolerance_secs: u64,
    pub request_timeout: Duration,
    pub node_id: String,
    /// Where Checkout sends the buyer back (success and cancel alike): the order's return link.
    pub return_links: ReturnLinks,
    /// How long after the order's creation its Checkout Session takes payment (`expires_at`).
    pub session_ttl_secs: u64,
}

impl std::fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSettings").field("api_base", &self.api_base).finish_non_exhaustive()
    }
}

pub struct StripeChannel {
    settings: StripeSettings,
    webhook_mac: HmacSha256,
    client: OutboundClient,
}

impl StripeChannel {
    pub fn new(settings: StripeSettings, client: OutboundClient) -> Result<Self, String> {
        let webhook_mac = HmacSha256::new_from_slice(settings.webhook_secret.as_bytes())
            .map_err(|_| "unusable webhook secret".to_string())?;
        Ok(StripeChannel { settings, webhook_mac, client })
    }

    /// The Idempotency-Key of an order's session creation.
    pub fn idempotency_key(order: &OrderRecord) -> String {
        format!("edgecard-checkout-{}", order.id)
    }

    fn create_form(&self, order: &OrderRecord, public_url: &str) -> String {
        // The return link, never the order's token: Stripe keeps these URLs in its logs.
        let order_page = self.settings.return_links.url(public_url, order);
        encode_form(&[
            ("mode", "payment".into()),
            ("client_reference_id", order.id.to_string()),
            ("metadata[order_id]", order.id.to_string()),
            ("metadata[node_id]", self.settings.node_id.clone()),
            // So the payment (and its charge, refunds, disputes) names the order in Stripe's dashboard.
            ("payment_intent_data[metadata][order_id]", order.id.to_string()),
            ("payment_intent_data[metadata][node_id]", self.settings.node_id.clone()),
            ("line_items[0][quantity]", "1".into()),
            ("line_items[0][price_data][currency]", order.currency.to_ascii_lowercase()),
            ("line_items[0][price_data][unit_amount]", order.amount_minor.to_string()),
            ("line_items[0][price_data][product_data][name]", format!("{} x {}", order.sku, order.quantity)),
            ("success_url", order_page.clone()),
            ("cancel_url", order_page),
            ("expires_at", self.session_expires_at(order).to_string()),
        ])
    }

    /// When an order's Checkout Session stops taking payment (unix seconds): the order's creation
    /// plus `session_ttl_secs`. Derived from the order, so a retried creation sends the same
    /// parameters under the same idempotency key.
    pub fn session_expires_at(&self, order: &OrderRecord) -> u64 {
        (order.created_at.0 / 1000).saturating_add(self.settings.session_ttl_secs)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        idempotency_key: Option<String>,
    ) -> Result<Value, ChannelError> {
        classify(self.call_response(method, path, body, idempotency_key).await?)
    }

    /// [`StripeChannel::call`] without reading the answer: for callers that look at an error's
    /// code.
    async fn call_response(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        idempotency_key: Option<String>,
    ) -> Result<OutboundResponse, ChannelError> {
        let url = format!("{}{path}", self.settings.api_base);
        let mut headers: Vec<(&'static str, String)> =
            vec![("authorization", format!("Bearer {}", self.settings.secret_key))];
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key", key));
        }
        if body.is_some() {
            headers.push(("content-type", "application/x-www-form-urlencoded".into()));
        }
        self.client
            .send(method, &url, &headers, body.unwrap_or_default().into_bytes(), self.settings.request_timeout)
            .await
            .map_err(outbound_error)
    }

    fn verify_signature(&self, header: &str, body: &[u8], now_unix_secs: u64) -> Result<(), CallbackError> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => timestamp = Some(v.parse::<u64>().map_err(|_| CallbackError::MalformedSignature)?),
                // A v1 that is not hex cannot match; skip it rather than refuse the others.
                Some(("v1", v)) => {
                    if let Ok(sig) = hex::decode(v) {
                        signatures.push(sig);
                    }
                }
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(CallbackError::MalformedSignature)?;
        if signatures.is_empty() {
            return Err(CallbackError::MalformedSignature);
        }
        if timestamp.abs_diff(now_unix_secs) > self.settings.tolerance_secs {
            return Err(CallbackError::Stale);
        }
        let mut mac = self.webhook_mac.clone();
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let expected = mac.finalize().into_bytes();
        // Constant-time comparison against every offered v1.
        let mut matched = false;
        for sig in &signatures {
            matched |= super::ct_eq(sig, &expected);
        }
        if matched {
            Ok(())
        } else {
            Err(CallbackError::BadSignature)
        }
    }

    /// Reads a Checkout Session object into a payment of one of our orders, or why not.
    fn session_payment(&self, session: &Value, status: ProviderStatus) -> Result<CallbackVerdict, CallbackError> {
        if let Some(node) = session.pointer("/metadata/node_id").and_then(Value::as_str) {
            if node != self.settings.node_id {
                return Ok(CallbackVerdict::Ignored("session of another node"));
            }
        }
        let reference = session.get("client_reference_id").and_then(Value::as_str);
        let metadata_order = session.pointer("/metadata/order_id").and_then(Value::as_str);
        let order_ref = match (reference, metadata_order) {
            (Some(a), Some(b)) if a != b => {
                return Err(CallbackError::MalformedBody("client_reference_id and metadata disagree".into()))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Ok(CallbackVerdict::Ignored("session without an order reference")),
        };
        let order_id = order_ref.parse().map_err(|_| CallbackError::MalformedBody("order reference".into()))?;
        let session_id = session
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 255)
            .ok_or_else(|| CallbackError::MalformedBody("session id".into()))?;
        let amount_minor = session
            .get("amount_total")
            .and_then(Value::as_u64)
            .ok_or_else(|| CallbackError::MalformedBody("amount_total".into()))?;
        let currency = session
            .get("currency")
            .and_then(Value::as_str)
            .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()))
            .ok_or_else(|| CallbackError::MalformedBody("currency".into()))?;
        // Present once the session is paid (or processing an asynchronous payment).
        let payment_intent = session.get("payment_intent").and_then(Value::as_str).map(str::to_string);
        Ok(CallbackVerdict::Payment(VerifiedCallback {
            order_id,
            provider_txn: session_id.to_string(),
            amount_minor,
            currency: currency.to_ascii_uppercase(),
            status,
            provider_ref: Some(session_id.to_string()),
            provider_payment: payment_intent,
        }))
    }
}

fn outbound_error(e: OutboundError) -> ChannelError {
    match e {
        OutboundError::Timeout => ChannelError::Timeout { channel: NAME },
        OutboundError::InvalidUrl(reason) => ChannelError::Rejected { channel: NAME, reason },
        other => ChannelError::Unavailable { channel: NAME, reason: other.to_string() },
    }
}

/// 2xx → the JSON body; 429 and 5xx → retryable; other 4xx → refused (Stripe's error message).
fn classify(response: OutboundResponse) -> Result<Value, ChannelError> {
    let status = response.status;
    let body: Option<Value> = serde_json::from_slice(&response.body).ok();
    let message = || {
        body.as_ref()
            .and_then(|b| b.pointer("/error/message"))
            .and_then(Value::as_str)
            .map(|m| m.chars().take(200).collect::<String>())
            .unwrap_or_default()
    };
    match status {
        200..=299 => body.ok_or_else(|| ChannelError::BadResponse { channel: NAME, reason: "body is not JSON".into() }),
        429 | 500..=599 => {
            Err(ChannelError::Unavailable { channel: NAME, reason: format!("HTTP {status} {}", message()) })
        }
        _ => Err(ChannelError::Rejected { channel: NAME, reason: format!("HTTP {status} {}", message()) }),
    }
}

impl PaymentChannel for StripeChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        public_url: &'a str,
    ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>> {
        Box::pin(async move {
            let form = self.create_form(order, public_url);
            let session = self
                .call(Method::POST, "/v1/checkout/sessions", Some(form), Some(Self::idempotency_key(order)))
                .await?;
            let bad = |reason: &str| ChannelError::BadResponse { channel: NAME, reason: reason.into() };
            let id = session.get("id").and_then(Value::as_str).filter(|id| !id.is_empty() && id.len() <= 255);
            let url = session.get("url").and_then(Value::as_str).filter(|u| u.starts_with("https://"));
            let (Some(id), Some(url)) = (id, url) else { return Err(bad("session without id or https url")) };
            if session.get("amount_total").and_then(Value::as_u64) != Some(order.amount_minor) {
                return Err(bad("session amount differs from the order"));
            }
            let pays_until = Some(UnixMillis(self.session_expires_at(order).saturating_mul(1000)));
            Ok(CreatedPayment { pay_url: url.to_string(), provider_ref: Some(id.to_string()), pays_until })
        })
    }

    fn local_pay_url(&self, _order: &OrderRecord, _public_url: &str) -> Option<String> {
        None
    }

    fn verify_callback(
        &self,
        request: &CallbackRequest<'_>,
        now_unix_secs: u64,
    ) -> Result<CallbackVerdict, CallbackError> {
        let header = request.headers.get(SIGNATURE_HEADER).ok_or(CallbackError::MissingSignature)?;
        let header = header.to_str().map_err(|_| CallbackError::MalformedSignature)?;
        self.verify_signature(header, request.body, now_unix_secs)?;
        let event: Value =
            serde_json::from_slice(request.body).map_err(|e| CallbackError::MalformedBody(e.to_string()))?;
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let session = event.pointer("/data/object");
        let status = match kind {
            "checkout.session.completed" => {
                if session.and_then(|s| s.get("payment_status")).and_then(Value::as_str) == Some("paid") {
                    ProviderStatus::Succeeded
                } else {
                    ProviderStatus::NotSucceeded
                }
            }
            "checkout.session.async_payment_succeeded" => ProviderStatus::Succeeded,
            "checkout.session.async_payment_failed" => ProviderStatus::NotSucceeded,
            "charge.refunded" => {
                return refunds::charge_refunded(
                    session.ok_or_else(|| CallbackError::MalformedBody("data.object".into()))?,
                )
            }
            "charge.dispute.created" => {
                return refunds::dispute_created(
                    session.ok_or_else(|| CallbackError::MalformedBody("data.object".into()))?,
                )
            }
            _ => return Ok(CallbackVerdict::Ignored("event type not handled")),
        };
        let session = session.ok_or_else(|| CallbackError::MalformedBody("data.object".into()))?;
        self.session_payment(session, status)
    }

    fn refund<'a>(&'a self, order: &'a OrderRecord) -> BoxFuture<'a, Result<RefundResult, ChannelError>> {
        Box::pin(self.refund_payment(order))
    }

    fn query_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        attempt: AttemptRef<'a>,
    ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>> {
        Box::pin(async move {
            let Some(session_id) = attempt.provider_ref else {
                // No session was ever created for this order: nothing can have been paid.
                return Ok(QueriedStatus::Pending);
            };
            if !session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ChannelError::Rejected { channel: NAME, reason: "stored session id is malformed".into() });
            }
            let session = self.call(Method::GET, &format!("/v1/checkout/sessions/{session_id}"), None, None).await?;
            let paid = session.get("payment_status").and_then(Value::as_str) == Some("paid");
            if !paid {
                return Ok(match session.get("status").and_then(Value::as_str) {
                    Some("expired") => QueriedStatus::Failed,
                    _ => QueriedStatus::Pending,
                });
            }
            match self.session_payment(&session, ProviderStatus::Succeeded) {
                Ok(CallbackVerdict::Payment(payment)) if payment.order_id == order.id => {
                    Ok(QueriedStatus::Paid(payment))
                }
                Ok(_) | Err(_) => Err(ChannelError::BadResponse {
                    channel: NAME,
                    reason: "queried session does not belong to this order".into(),
                }),
            }
        })
    }
}

/// The provider's side of a webhook signature: `t={t},v1={hex}` for `body` under `secret`.
pub fn signature_header(secret: &str, t: u64, body: &[u8]) -> String {
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::orders::OrderRecord;
    use http::{HeaderMap, HeaderValue};
    use serde_json::json;

    const SECRET: &str = "whsec_test_secret";

    fn channel() -> StripeChannel {
        StripeChannel::new(
            StripeSettings {
                api_base: "https://127.0.0.1:1".into(),
                secret_key: "sk_test_x".into(),
                webhook_secret: SECRET.into(),
                tolerance_secs: 300,
                request_timeout: Duration::from_secs(1),
                node_id: "eu-1".into(),
                return_links: ReturnLinks::new(b"return-link key for tests", 3600).unwrap(),
                session_ttl_secs: 3600,
            },
            OutboundClient::new(None).unwrap(),
        )
        .unwrap()
    }

    fn order() -> OrderRecord {
        OrderRecord::for_tests(NAME, 1, 1000, "USD")
    }

    fn event(kind: &str, order: &OrderRecord, payment_status: &str) -> Vec<u8> {
        json!({
            "id": "evt_1", "object": "event", "type": kind,
            "data": { "object": {
                "id": "cs_test_1", "object": "checkout.session", "amount_total": order.amount_minor,
                "currency": order.currency.to_ascii_lowercase(), "client_reference_id": order.id.to_string(),
                "metadata": { "order_id": order.id.to_string(), "node_id": "eu-1" },
                "payment_status": payment_status, "status": "complete",
            }}
        })
        .to_string()
        .into_bytes()
    }

    fn verify(header: &str, body: &[u8], now: u64) -> Result<CallbackVerdict, CallbackError> {
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(header).unwrap());
        channel().verify_callback(&CallbackRequest { headers: &headers, query: None, body }, now)
    }

    #[test]
    fn completed_paid_session_is_a_payment_in_upper_case_currency() {
        let order = order();
        let body = event("checkout.session.completed", &order, "paid");
        let header = signature_header(SECRET, 1_000, &body);
        let CallbackVerdict::Payment(p) = verify(&header, &body, 1_100).unwrap() else { panic!() };
        assert_eq!((p.order_id, p.amount_minor, p.currency.as_str()), (order.id, 1000, "USD"));
        assert_eq!(p.provider_txn, "cs_test_1");
        assert_eq!(p.status, ProviderStatus::Succeeded);
    }

    #[test]
    fn event_kinds_map_to_statuses() {
        let order = order();
        let cases = [
            ("checkout.session.completed", "unpaid", Some(ProviderStatus::NotSucceeded)),
            ("checkout.session.async_payment_succeeded", "paid", Some(ProviderStatus::Succeeded)),
            ("checkout.session.async_payment_failed", "unpaid", Some(ProviderStatus::NotSucceeded)),
            ("customer.created", "paid", None),
        ];
        for (kind, payment_status, expected) in cases {
            let body = event(kind, &order, payment_status);
            let verdict = verify(&signature_header(SECRET, 1_000, &body), &body, 1_000).unwrap();
            match (verdict, expected) {
                (CallbackVerdict::Payment(p), Some(status)) => assert_eq!(p.status, status, "{kind}"),
                (CallbackVerdict::Ignored(_), None) => {}
                (other, _) => panic!("{kind}: {other:?}"),
            }
        }
    }

    #[test]
    fn any_of_several_signatures_may_match_and_forgeries_do_not() {
        let order = order();
        let body = event("checkout.session.completed", &order, "paid");
        let good = signature_header(SECRET, 1_000, &body);
        let forged = signature_header("whsec_other", 1_000, &body);
        let good_sig = good.split("v1=").nth(1).unwrap();
        let forged_sig = forged.split("v1=").nth(1).unwrap();
        assert!(verify(&format!("t=1000,v1={forged_sig},v1={good_sig},v0=abc"), &body, 1_000).is_ok());
        assert_eq!(verify(&forged, &body, 1_000), Err(CallbackError::BadSignature));
        assert_eq!(verify(&format!("t=1000,v1=zz,v1={forged_sig}"), &body, 1_000), Err(CallbackError::BadSignature));
        let mut tampered = body.clone();
        tampered.extend_from_slice(b" ");
        assert_eq!(verify(&good, &tampered, 1_000), Err(CallbackError::BadSignature));
        assert_eq!(verify(&good, &body, 1_301), Err(CallbackError::Stale), "outside the 300 s tolerance");
        assert_eq!(verify(&good, &body, 699), Err(CallbackError::Stale));
        assert_eq!(verify("v1=00", &body, 1_000), Err(CallbackError::MalformedSignature));
        assert_eq!(verify("t=1000", &body, 1_000), Err(CallbackError::MalformedSignature));
        assert_eq!(verify("t=x,v1=00", &body, 1_000), Err(CallbackError::MalformedSignature));
        let headers = HeaderMap::new();
        assert_eq!(
            channel().verify_callback(&CallbackRequest { headers: &headers, query: None, body: &body }, 1_000),
            Err(CallbackError::MissingSignature)
        );
    }

    #[test]
    fn other_nodes_sessions_are_ignored_and_bad_bodies_refused() {
        let order = order();
        let body = String::from_utf8(event("checkout.session.completed", &order, "paid")).unwrap();
        let other = body.replace("\"eu-1\"", "\"us-1\"");
        let verdict = verify(&signature_header(SECRET, 5, other.as_bytes()), other.as_bytes(), 5).unwrap();
        assert_eq!(verdict, CallbackVerdict::Ignored("session of another node"));
        for bad in [b"not json".to_vec(), br#"{"type":"checkout.session.completed"}"#.to_vec()] {
            let verdict = verify(&signature_header(SECRET, 5, &bad), &bad, 5);
            assert!(matches!(verdict, Err(CallbackError::MalformedBody(_))), "{verdict:?}");
        }
        let no_amount = body.replace("\"amount_total\":1000,", "");
        assert!(matches!(
            verify(&signature_header(SECRET, 5, no_amount.as_bytes()), no_amount.as_bytes(), 5),
            Err(CallbackError::MalformedBody(_))
        ));
    }

    #[test]
    fn creation_form_carries_the_order() {
        let order = order();
        let form = channel().create_form(&order, "https://shop.example");
        let pairs = super::super::parse_form(&form).unwrap();
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("mode"), Some("payment"));
        assert_eq!(get("line_items[0][price_data][currency]"), Some("usd"));
        assert_eq!(get("line_items[0][price_data][unit_amount]"), Some("1000"));
        assert_eq!(get("client_reference_id"), Some(order.id.to_string().as_str()));
        assert_eq!(get("metadata[order_id]"), Some(order.id.to_string().as_str()));
        let links = ReturnLinks::new(b"return-link key for tests", 3600).unwrap();
        let back = links.url("https://shop.example", &order);
        assert!(back.starts_with(&format!("https://shop.example/order/{}/return/", order.id)), "{back}");
        assert_eq!((get("success_url"), get("cancel_url")), (Some(back.as_str()), Some(back.as_str())));
        assert_eq!(StripeChannel::idempotency_key(&order), format!("edgecard-checkout-{}", order.id));
        let mut later = order.clone();
        later.created_at = UnixMillis(1_700_000_000_123);
        let form = channel().create_form(&later, "https://shop.example");
        let pairs = super::super::parse_form(&form).unwrap();
        let expires = pairs.iter().find(|(n, _)| n == "expires_at").map(|(_, v)| v.as_str());
        assert_eq!(expires, Some("1700003600"), "the order's creation plus session_ttl_secs, in seconds");
    }
}
