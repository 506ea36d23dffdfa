//! Stripe refunds and the webhooks of what happens to a payment afterwards.
//!
//! - **Refund**: `POST /v1/refunds` with the order's PaymentIntent (`payment_intent`, from the
//!   payment's webhook, else read from its Checkout Session), the full amount (Stripe's default),
//!   `reason=requested_by_customer`, `metadata[order_id]`, and `Idempotency-Key:
//!   edgecard-refund-{order id}`: asked again (after a crash or a timeout) Stripe answers with the
//!   same refund. Past the key's 24 hours Stripe refuses a second refund of the charge
//!   (`charge_already_refunded`); then the refund already made is looked up
//!   (`GET /v1/refunds?payment_intent=…`) and reported, so one order is refunded once.
//! - **`charge.refunded`**: a charge refunded in full (the dashboard, or our own refund's echo)
//!   names its PaymentIntent, which finds the order; a partial refund is acknowledged and ignored
//!   (an order is refunded whole or not at all).
//! - **`charge.dispute.created`**: a dispute names its PaymentIntent, amount and currency.

use http::Method;
use serde_json::Value;

use super::{classify, StripeChannel, NAME};
use crate::orders::OrderRecord;
use crate::payments::{
    encode_form, CallbackError, CallbackVerdict, ChannelError, ProviderDispute, ProviderRefund, RefundResult,
};

/// The Idempotency-Key of an order's refund.
pub fn refund_idempotency_key(order: &OrderRecord) -> String {
    format!("edgecard-refund-{}", order.id)
}

/// A Stripe object id as this node stores and reports it: `prefix_…`, letters, digits and `_`.
fn stripe_id(value: Option<&Value>) -> Option<&str> {
    value
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

fn bad(reason: &str) -> ChannelError {
    ChannelError::BadResponse { channel: NAME, reason: reason.into() }
}

impl StripeChannel {
    pub(super) async fn refund_payment(&self, order: &OrderRecord) -> Result<RefundResult, ChannelError> {
        let payment = order
            .payment
            .as_ref()
            .ok_or_else(|| ChannelError::Rejected { channel: NAME, reason: "the order was not paid".into() })?;
        let intent = match &payment.provider_payment {
            Some(intent) => intent.clone(),
            None => self.intent_of_session(&payment.provider_txn).await?,
        };
        if stripe_id(Some(&Value::String(intent.clone()))).is_none() {
            return Err(ChannelError::Rejected {
                channel: NAME,
                reason: "stored PaymentIntent id is malformed".into(),
            });
        }
        let form = encode_form(&[
            ("payment_intent", intent.clone()),
            ("reason", "requested_by_customer".into()),
            ("metadata[order_id]", order.id.to_string()),
            ("metadata[node_id]", self.settings.node_id.clone()),
        ]);
        let key = Some(refund_idempotency_key(order));
        let response = self.call_response(Method::POST, "/v1/refunds", Some(form), key).await?;
        if response.status == 400 && error_code(&response.body).as_deref() == Some("charge_already_refunded") {
            return self.refund_already_made(order, &intent).await;
        }
        let refund = classify(response)?;
        let id = stripe_id(refund.get("id")).ok_or_else(|| bad("refund without an id"))?;
        Ok(RefundResult::Refunded { provider_refund: id.to_string() })
    }

    /// The PaymentIntent of a paid Checkout Session.
    async fn intent_of_session(&self, session_id: &str) -> Result<String, ChannelError> {
        if stripe_id(Some(&Value::String(session_id.to_string()))).is_none() {
            return Err(ChannelError::Rejected { channel: NAME, reason: "stored session id is malformed".into() });
        }
        let session = self.call(Method::GET, &format!("/v1/checkout/sessions/{session_id}"), None, None).await?;
        stripe_id(session.get("payment_intent"))
            .map(str::to_string)
            .ok_or_else(|| bad("paid session without a PaymentIntent"))
    }

    /// The refund of `intent` made before (ours by its metadata, else the charge's only one).
    async fn refund_already_made(&self, order: &OrderRecord, intent: &str) -> Result<RefundResult, ChannelError> {
        let list =
            self.call(Method::GET, &format!("/v1/refunds?payment_intent={intent}&limit=100"), None, None).await?;
        let refunds: &[Value] = list.get("data").and_then(Value::as_array).map_or(&[], Vec::as_slice);
        let ours = refunds
            .iter()
            .find(|r| r.pointer("/metadata/order_id").and_then(Value::as_str) == Some(order.id.to_string().as_str()))
            .or(refunds.first());
        let id =
            ours.and_then(|r| stripe_id(r.get("id"))).ok_or_else(|| bad("charge refunded, but no refund listed"))?;
        Ok(RefundResult::Refunded { provider_refund: id.to_string() })
    }
}

/// The `error.code` of a Stripe error body.
fn error_code(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    body.pointer("/error/code").and_then(Value::as_str).map(str::to_string)
}

/// Reads a `charge.refunded` event's charge.
pub(super) fn charge_refunded(charge: &Value) -> Result<CallbackVerdict, CallbackError> {
    let malformed = |what: &str| CallbackError::MalformedBody(what.into());
    let Some(intent) = stripe_id(charge.get("payment_intent")) else {
        return Ok(CallbackVerdict::Ignored("charge without a PaymentIntent"));
    };
    if charge.get("refunded").and_then(Value::as_bool) != Some(true) {
        return Ok(CallbackVerdict::Ignored("partial refund"));
    }
    let charge_id = stripe_id(charge.get("id")).ok_or_else(|| malformed("charge id"))?;
    // The latest refund of the charge when the event lists them, else the charge itself.
    let refund = charge
        .pointer("/refunds/data")
        .and_then(Value::as_array)
        .and_then(|refunds| refunds.iter().filter_map(|r| stripe_id(r.get("id"))).next())
        .unwrap_or(charge_id);
    Ok(CallbackVerdict::Refund(ProviderRefund {
        provider_payment: intent.to_string(),
        provider_refund: refund.to_string(),
    }))
}

/// Reads a `charge.dispute.created` event's dispute.
pub(super) fn dispute_created(dispute: &Value) -> Result<CallbackVerdict, CallbackError> {
    let malformed = |what: &str| CallbackError::MalformedBody(what.into());
    let Some(intent) = stripe_id(dispute.get("payment_intent")) else {
        return Ok(CallbackVerdict::Ignored("dispute without a PaymentIntent"));
    };
    let id = stripe_id(dispute.get("id")).ok_or_else(|| malformed("dispute id"))?;
    let amount_minor = dispute.get("amount").and_then(Value::as_u64).ok_or_else(|| malformed("amount"))?;
    let currency = dispute
        .get("currency")
        .and_then(Value::as_str)
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()))
        .ok_or_else(|| malformed("currency"))?;
    Ok(CallbackVerdict::Dispute(ProviderDispute {
        provider_payment: intent.to_string(),
        provider_dispute: id.to_string(),
        amount_minor,
        currency: currency.to_ascii_uppercase(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_refund_names_its_payment_and_refund_and_a_partial_one_is_ignored() {
        let charge = json!({
            "id": "ch_1", "object": "charge", "payment_intent": "pi_1", "amount": 1000, "amount_refunded": 1000,
            "refunded": true, "refunds": { "object": "list", "data": [{ "id": "re_1" }] },
        });
        let expected = ProviderRefund { provider_payment: "pi_1".into(), provider_refund: "re_1".into() };
        assert_eq!(charge_refunded(&charge).unwrap(), CallbackVerdict::Refund(expected));
        let mut bare = charge.clone();
        bare.as_object_mut().unwrap().remove("refunds");
        let CallbackVerdict::Refund(refund) = charge_refunded(&bare).unwrap() else { panic!("a refund") };
        assert_eq!(refund.provider_refund, "ch_1", "without the list, the charge names it");
        let partial = json!({ "id": "ch_1", "payment_intent": "pi_1", "refunded": false, "amount_refunded": 100 });
        assert_eq!(charge_refunded(&partial).unwrap(), CallbackVerdict::Ignored("partial refund"));
        let odd = json!({ "id": "ch\n1", "payment_intent": "pi_1", "refunded": true });
        assert!(charge_refunded(&odd).is_err());
    }

    #[test]
    fn a_dispute_names_its_payment_amount_and_currency() {
        let dispute =
            json!({ "id": "dp_1", "object": "dispute", "payment_intent": "pi_1", "amount": 1000, "currency": "usd" });
        let CallbackVerdict::Dispute(d) = dispute_created(&dispute).unwrap() else { panic!("a dispute") };
        assert_eq!((d.provider_dispute.as_str(), d.amount_minor, d.currency.as_str()), ("dp_1", 1000, "USD"));
        assert!(dispute_created(&json!({ "id": "dp_1", "payment_intent": "pi_1", "currency": "usd" })).is_err());
    }
}
