//! The built-in sandbox channel. It behaves like a hosted provider: paying produces a callback
//! signed with HMAC-SHA256 over `"{timestamp}.{body}"` (the scheme Stripe uses), which then takes
//! the same verification path as any provider's callback.

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{CallbackError, PaymentChannel, ProviderStatus, VerifiedCallback};
use crate::orders::OrderRecord;

pub const SIGNATURE_HEADER: &str = "edgecard-sandbox-signature";
pub const NAME: &str = "sandbox";

type HmacSha256 = Hmac<Sha256>;

pub struct SandboxChannel {
    /// Keyed once; cloned per message.
    keyed: HmacSha256,
    tolerance_secs: u64,
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

impl SandboxChannel {
    pub fn new(secret: &[u8], tolerance_secs: u64) -> Result<Self, hmac::digest::InvalidLength> {
        Ok(SandboxChannel { keyed: HmacSha256::new_from_slice(secret)?, tolerance_secs })
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
        let body = CallbackBody {
            order_id: order.id.to_string(),
            txn_id: format!("sbx_{}", order.id),
            amount_minor: order.amount_minor,
            currency: order.currency.clone(),
            status: "succeeded".into(),
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
}

impl PaymentChannel for SandboxChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn pay_url(&self, order: &OrderRecord, public_url: &str) -> String {
        format!("{public_url}/pay/sandbox/{}", order.id)
    }

    fn verify_callback(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix_secs: u64,
    ) -> Result<VerifiedCallback, CallbackError> {
        let header = headers.get(SIGNATURE_HEADER).ok_or(CallbackError::MissingSignature)?;
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
        Ok(VerifiedCallback {
            order_id,
            provider_txn: parsed.txn_id,
            amount_minor: parsed.amount_minor,
            currency: parsed.currency,
            status: if parsed.status == "succeeded" { ProviderStatus::Succeeded } else { ProviderStatus::NotSucceeded },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::orders::OrderStatus;
    use edgecard_protocol::{OrderId, Sku, UnixMillis};

    fn order() -> OrderRecord {
        OrderRecord {
            id: OrderId::random(),
            sku: Sku::new("game").unwrap(),
            quantity: 1,
            amount_minor: 500,
            currency: "USD".into(),
            channel: NAME.into(),
            token_sha256: String::new(),
            email: None,
            client_ip: [127, 0, 0, 1].into(),
            status: OrderStatus::Reserved,
            created_at: UnixMillis(0),
            expires_at: UnixMillis(1),
            key_ids: vec![],
            secrets: vec![],
            payment: None,
            delivered_at: None,
        }
    }

    #[test]
    fn signed_callback_verifies_and_binds_the_order() {
        let channel = SandboxChannel::new(b"0123456789abcdef", 300).unwrap();
        let order = order();
        let (headers, body) = channel.signed_callback(&order, 1_000);
        let verified = channel.verify_callback(&headers, &body, 1_010).unwrap();
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
        assert_eq!(channel.verify_callback(&headers, &body, 1_000), Err(CallbackError::BadSignature));

        let (headers, body) = channel.signed_callback(&order, 1_000);
        let tampered = String::from_utf8(body.clone()).unwrap().replace("500", "5");
        assert_eq!(channel.verify_callback(&headers, tampered.as_bytes(), 1_000), Err(CallbackError::BadSignature));
        assert_eq!(channel.verify_callback(&headers, &body, 2_000), Err(CallbackError::Stale));
        assert_eq!(channel.verify_callback(&HeaderMap::new(), &body, 1_000), Err(CallbackError::MissingSignature));
        let mut garbage = HeaderMap::new();
        garbage.insert(SIGNATURE_HEADER, HeaderValue::from_static("t=x,v1=zz"));
        assert_eq!(channel.verify_callback(&garbage, &body, 1_000), Err(CallbackError::MalformedSignature));
    }
}
