//! The built-in sandbox channel. It behaves like a hosted provider: paying produces a callback
//! signed with HMAC-SHA256 over `"{timestamp}.{body}"` (the scheme Stripe uses), which then takes
//! the same verification path as any provider's callback.
//!
//! Like a real provider it keeps its own record of what was paid, and its callback delivery can be
//! made slow (`callback_delay_ms`) or lossy (`callback_failure_rate`): a dropped callback leaves
//! the order unconfirmed until compensation queries that record. The record lives in memory: a
//! node restart forgets sandbox payments whose callback was dropped, as a provider outage would.

use std::collections::HashMap;
use std::time::Duration;

use edgecard_protocol::OrderId;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{
    BoxFuture, CallbackError, CallbackRequest, CallbackVerdict, ChannelError, CreatedPayment, PaymentChannel,
    ProviderStatus, QueriedStatus, RefundResult, VerifiedCallback,
};
use crate::orders::{AttemptRef, OrderRecord};

pub const SIGNATURE_HEADER: &str = "edgecard-sandbox-signature";
pub const NAME: &str = "sandbox";

type HmacSha256 = Hmac<Sha256>;

/// Delivery faults of the sandbox provider.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SandboxFaults {
    /// Time between a payment and its callback.
    pub callback_delay: Duration,
    /// Share of callbacks never sent, 0.0 to 1.0.
    pub callback_failure_rate: f64,
}

pub struct SandboxChannel {
    /// Keyed once; cloned per message.
    keyed: HmacSha256,
    tolerance_secs: u64,
    faults: SandboxFaults,
    /// The provider's own record: orders paid, with what was paid.
    paid: Mutex<HashMap<OrderId, (u64, String)>>,
    /// Orders refunded (in memory, like `paid`).
    refunded: Mutex<std::collections::HashSet<OrderId>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackBody {
    order_id: String,
    txn_id: String,
    amount_minor: u64,
    currency: String,
    status: String,
}

fn txn_id(order: &OrderId) -> String {
    format!("sbx_{order}")
}

impl SandboxChannel {
    pub fn new(secret: &[u8], tolerance_secs: u64) -> Result<Self, hmac::digest::InvalidLength> {
        Self::with_faults(secret, tolerance_secs, SandboxFaults::default())
    }

    pub fn with_faults(
        secret: &[u8],
        tolerance_secs: u64,
        faults: SandboxFaults,
    ) -> Result<Self, hmac::digest::InvalidLength> {
        Ok(SandboxChannel {
            keyed: HmacSha256::new_from_slice(secret)?,
            tolerance_secs,
            faults,
            paid: Mutex::new(HashMap::new()),
            refunded: Mutex::new(std::collections::HashSet::new()),
        })
    }

    fn mac(&self, timestamp: u64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The provider's side: the callback it sends once `order` is paid in full. The transaction
    /// id is derived from the order, so paying twice replays the same callback.
    pub fn signed_callback(&self, order: &OrderRecord, now_unix_secs: u64) -> (HeaderMap, Vec<u8>) {
        self.sign(order.id, order.amount_minor, &order.currency, "succeeded", now_unix_secs)
    }

    /// A callback with any content, signed with this channel's key (tests use it for callbacks
    /// a provider could send: wrong amounts, other statuses).
    pub fn sign(
        &self,
        order_id: OrderId,
        amount_minor: u64,
        currency: &str,
        status: &str,
        now_unix_secs: u64,
    ) -> (HeaderMap, Vec<u8>) {
        let body = CallbackBody {
            order_id: order_id.to_string(),
            txn_id: txn_id(&order_id),
            amount_minor,
            currency: currency.to_string(),
            status: status.into(),
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let signature = hex::encode(self.mac(now_unix_secs, &body).finalize().into_bytes());
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&format!("t={now_unix_secs},v1={signature}")) {
            headers.insert(SIGNATURE_HEADER, value);
        }
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        (headers, body)
    }

    /// The buyer pays `order` in full: the provider records the payment, then (after the
    /// configured delay) sends its signed callback, unless the failure rate drops it. `None`
    /// means the callback was lost.
    pub async fn pay(&self, order: &OrderRecord, now_unix_secs: impl Fn() -> u64) -> Option<(HeaderMap, Vec<u8>)> {
        self.paid.lock().insert(order.id, (order.amount_minor, order.currency.clone()));
        if !self.faults.callback_delay.is_zero() {
            tokio::time::sleep(self.faults.callback_delay).await;
        }
        let rate = self.faults.callback_failure_rate;
        if rate > 0.0 && rand::random::<f64>() < rate {
            tracing::info!(order = %order.id, "sandbox: callback dropped (fault injection)");
            return None;
        }
        Some(self.signed_callback(order, now_unix_secs()))
    }

    /// Whether the sandbox refunded `order` (for tests).
    pub fn was_refunded(&self, order: &OrderId) -> bool {
        self.refunded.lock().contains(order)
    }

    /// Forgets a payment whose confirmation the node has recorded.
    pub fn settled(&self, order: &OrderId) {
        self.paid.lock().remove(order);
    }
}

impl PaymentChannel for SandboxChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        public_url: &'a str,
    ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>> {
        let pay_url = format!("{public_url}/pay/sandbox/{}", order.id);
        Box::pin(async move { Ok(CreatedPayment { pay_url, provider_ref: None, pays_until: None }) })
    }

    fn local_pay_url(&self, order: &OrderRecord, public_url: &str) -> Option<String> {
        Some(format!("{public_url}/pay/sandbox/{}", order.id))
    }

    fn verify_callback(
        &self,
        request: &CallbackRequest<'_>,
        now_unix_secs: u64,
    ) -> Result<CallbackVerdict, CallbackError> {
        let body = request.body;
        let header = request.headers.get(SIGNATURE_HEADER).ok_or(CallbackError::MissingSignature)?;
        let header = header.to_str().map_err(|_| CallbackError::MalformedSignature)?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => timestamp = Some(v.parse::<u64>().map_err(|_| CallbackError::MalformedSignature)?),
                Some(("v1", v)) => signatures.push(hex::decode(v).map_err(|_| CallbackError::MalformedSignature)?),
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(CallbackError::MalformedSignature)?;
        if signatures.is_empty() {
            return Err(CallbackError::MalformedSignature);
        }
        if timestamp.abs_diff(now_unix_secs) > self.tolerance_secs {
            return Err(CallbackError::Stale);
        }
        // verify_slice compares in constant time.
        if !signatures.iter().any(|sig| self.mac(timestamp, body).verify_slice(sig).is_ok()) {
            return Err(CallbackError::BadSignature);
        }
        let parsed: CallbackBody =
            serde_json::from_slice(body).map_err(|e| CallbackError::MalformedBody(e.to_string()))?;
        let order_id = parsed.order_id.parse().map_err(|_| CallbackError::MalformedBody("order_id".into()))?;
        if parsed.txn_id.is_empty() || parsed.txn_id.len() > 128 {
            return Err(CallbackError::MalformedBody("txn_id".into()));
        }
        Ok(CallbackVerdict::Payment(VerifiedCallback {
            order_id,
            provider_txn: parsed.txn_id,
            amount_minor: parsed.amount_minor,
            currency: parsed.currency,
            status: if parsed.status == "succeeded" { ProviderStatus::Succeeded } else { ProviderStatus::NotSucceeded },
            provider_ref: None,
            provider_payment: None,
        }))
    }

    /// The sandbox refunds at once; its refund id is derived from the order, so asking twice is
    /// one refund.
    fn refund<'a>(&'a self, order: &'a OrderRecord) -> BoxFuture<'a, Result<RefundResult, ChannelError>> {
        let provider_refund = format!("sbx_refund_{}", order.id);
        self.refunded.lock().insert(order.id);
        Box::pin(async move { Ok(RefundResult::Refunded { provider_refund }) })
    }

    fn query_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        _attempt: AttemptRef<'a>,
    ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>> {
        let paid = self.paid.lock().get(&order.id).cloned();
        Box::pin(async move {
            Ok(match paid {
                Some((amount_minor, currency)) => QueriedStatus::Paid(VerifiedCallback {
                    order_id: order.id,
                    provider_txn: txn_id(&order.id),
                    amount_minor,
                    currency,
                    status: ProviderStatus::Succeeded,
                    provider_ref: None,
                    provider_payment: None,
                }),
                None => QueriedStatus::Pending,
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn order() -> OrderRecord {
        OrderRecord::for_tests(NAME, 1, 500, "USD")
    }

    fn verify(
        channel: &SandboxChannel,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<VerifiedCallback, CallbackError> {
        match channel.verify_callback(&CallbackRequest { headers, query: None, body }, now)? {
            CallbackVerdict::Payment(v) => Ok(v),
            other => panic!("not a payment: {other:?}"),
        }
    }

    #[test]
    fn signed_callback_verifies_and_binds_the_order() {
        let channel = SandboxChannel::new(b"0123456789abcdef", 300).unwrap();
        let order = order();
        let (headers, body) = channel.signed_callback(&order, 1_000);
        let verified = verify(&channel, &headers, &body, 1_010).unwrap();
        assert_eq!(verified.order_id, order.id);
        assert_eq!(verified.amount_minor, 500);
        assert_eq!(verified.status, ProviderStatus::Succeeded);
    }

    #[test]
    fn forged_tampered_and_stale_callbacks_are_refused() {
        let channel = SandboxChannel::new(b"0123456789abcdef", 300).unwrap();
        let forger = SandboxChannel::new(b"another-secret-key!", 300).unwrap();
        let order = order();
        let (headers, body) = forger.signed_callback(&order, 1_000);
        assert_eq!(verify(&channel, &headers, &body, 1_000), Err(CallbackError::BadSignature));

        let (headers, body) = channel.signed_callback(&order, 1_000);
        let tampered = String::from_utf8(body.clone()).unwrap().replace("500", "5");
        assert_eq!(verify(&channel, &headers, tampered.as_bytes(), 1_000), Err(CallbackError::BadSignature));
        assert_eq!(verify(&channel, &headers, &body, 2_000), Err(CallbackError::Stale));
        assert_eq!(verify(&channel, &HeaderMap::new(), &body, 1_000), Err(CallbackError::MissingSignature));
        let mut garbage = HeaderMap::new();
        garbage.insert(SIGNATURE_HEADER, HeaderValue::from_static("t=x,v1=zz"));
        assert_eq!(verify(&channel, &garbage, &body, 1_000), Err(CallbackError::MalformedSignature));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fault_tests {
    use super::*;

    fn order() -> OrderRecord {
        OrderRecord::for_tests(NAME, 1, 700, "EUR")
    }

    #[tokio::test]
    async fn a_dropped_callback_leaves_the_payment_queryable() {
        let faults = SandboxFaults { callback_delay: Duration::ZERO, callback_failure_rate: 1.0 };
        let channel = SandboxChannel::with_faults(b"0123456789abcdef", 300, faults).unwrap();
        let order = order();
        assert_eq!(channel.query_payment(&order, order.attempts()[0]).await.unwrap(), QueriedStatus::Pending);
        assert!(channel.pay(&order, || 1_000).await.is_none(), "callback dropped");
        match channel.query_payment(&order, order.attempts()[0]).await.unwrap() {
            QueriedStatus::Paid(v) => {
                assert_eq!((v.order_id, v.amount_minor, v.currency.as_str()), (order.id, 700, "EUR"));
                assert_eq!(v.provider_txn, format!("sbx_{}", order.id), "same id as the callback would carry");
            }
            other => panic!("{other:?}"),
        }
        channel.settled(&order.id);
        assert_eq!(channel.query_payment(&order, order.attempts()[0]).await.unwrap(), QueriedStatus::Pending);
    }

    #[tokio::test]
    async fn delivery_waits_for_the_configured_delay() {
        let faults = SandboxFaults { callback_delay: Duration::from_millis(50), callback_failure_rate: 0.0 };
        let channel = SandboxChannel::with_faults(b"0123456789abcdef", 300, faults).unwrap();
        let started = std::time::Instant::now();
        assert!(channel.pay(&order(), || 1_000).await.is_some());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
