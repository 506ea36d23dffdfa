//! Fuzz harnesses for what the node reads from buyers and payment providers. The node never calls
//! them: they exist so that the cargo-fuzz targets in `fuzz/` and the stable replay of their
//! corpora (`tests/fuzz_corpora.rs`) run the very same checks.
//!
//! Each harness takes any bytes. It must not panic on them; it does panic (asserts) when a
//! property that must hold for every input is broken, which the fuzzer reports as a crash.

use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use crate::api::parse_order_request;
use crate::orders::engine::normalize_email;
use crate::payments::epay::{self, EpayChannel, EpaySettings};
use crate::payments::http_client::OutboundClient;
use crate::payments::return_link::ReturnLinks;
use crate::payments::stripe::{self, StripeChannel, StripeSettings, SIGNATURE_HEADER};
use crate::payments::{
    encode_form, format_money_2dp, parse_form, parse_money_2dp, CallbackError, CallbackRequest, CallbackVerdict,
    PaymentChannel, ProviderStatus, VerifiedCallback,
};
use crate::storefront::form;

/// The node the callbacks are for.
pub const NODE: &str = "eu-1";
/// The Stripe endpoint secret the harness verifies with (the test gateway's).
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_fake_gateway_secret";
pub const STRIPE_TOLERANCE_SECS: u64 = 300;
/// The EPay merchant the harness verifies for (the test gateway's).
pub const EPAY_PID: &str = "1001";
pub const EPAY_KEY: &str = "epay-fake-gateway-key";
/// The clock the callback harnesses run at (2026-01-01T00:00:00Z); Stripe seeds are signed at it.
pub const NOW: u64 = 1_767_225_600;

fn return_links() -> ReturnLinks {
    ReturnLinks::new(b"return-link key for fuzzing", 3600).unwrap_or_else(|e| panic!("{e}"))
}

fn client() -> OutboundClient {
    OutboundClient::new(None).unwrap_or_else(|e| panic!("{e}"))
}

fn stripe_channel() -> &'static StripeChannel {
    static CHANNEL: OnceLock<StripeChannel> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        let settings = StripeSettings {
            api_base: "https://127.0.0.1:1".into(),
            secret_key: "sk_test_fuzzing".into(),
            webhook_secret: STRIPE_WEBHOOK_SECRET.into(),
            tolerance_secs: STRIPE_TOLERANCE_SECS,
            request_timeout: Duration::from_secs(1),
            node_id: NODE.into(),
            return_links: return_links(),
            session_ttl_secs: 3600,
        };
        StripeChannel::new(settings, client()).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn epay_channel() -> &'static EpayChannel {
    static CHANNEL: OnceLock<EpayChannel> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        let settings = EpaySettings {
            gateway_url: "https://pay.example.com".into(),
            pid: EPAY_PID.into(),
            key: EPAY_KEY.into(),
            pay_type: "alipay".into(),
            currency: "CNY".into(),
            request_timeout: Duration::from_secs(1),
            return_links: return_links(),
        };
        EpayChannel::new(settings, client())
    })
}

/// A Stripe webhook: the `Stripe-Signature` header value, a newline, then the raw body.
///
/// As it came, a webhook verifies only if its header holds the genuine signature of its body
/// at a timestamp within the tolerance. The same body genuinely signed now can be refused only
/// for its contents (never its signature), and one byte added to it breaks the signature; signed
/// too long ago, it is stale. A payment read from a body says what the body says: the order
/// reference, the session id, the amount, the currency in upper case, and succeeded only for a
/// paid completed session or an async success.
pub fn stripe_webhook(data: &[u8]) {
    let channel = stripe_channel();
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[data.len()..]),
    };
    let verify = |header: Option<HeaderValue>, body: &[u8]| {
        let mut headers = HeaderMap::new();
        if let Some(value) = header {
            headers.insert(SIGNATURE_HEADER, value);
        }
        channel.verify_callback(&CallbackRequest { headers: &headers, query: None, body }, NOW)
    };

    let as_sent = verify(HeaderValue::from_bytes(header).ok(), body);
    if let Ok(verdict) = &as_sent {
        let header = std::str::from_utf8(header).unwrap_or_else(|_| panic!("a verified signature header is not text"));
        assert!(genuinely_signed(header, body), "a webhook verified without the genuine signature of its body");
        check_stripe_verdict(verdict, body);
    }

    let signed = |t: u64| HeaderValue::from_str(&stripe::signature_header(STRIPE_WEBHOOK_SECRET, t, body)).ok();
    match verify(signed(NOW), body) {
        Ok(verdict) => check_stripe_verdict(&verdict, body),
        Err(CallbackError::MalformedBody(_)) => {}
        Err(e) => panic!("a genuinely signed webhook was refused: {e}"),
    }
    let mut tampered = body.to_vec();
    tampered.push(b' ');
    assert_eq!(verify(signed(NOW), &tampered), Err(CallbackError::BadSignature));
    assert_eq!(verify(signed(NOW - STRIPE_TOLERANCE_SECS - 1), body), Err(CallbackError::Stale));
}

/// Whether `header` carries, for some timestamp it names within the tolerance, a `v1` that is
/// the endpoint's signature of `body` at that timestamp.
fn genuinely_signed(header: &str, body: &[u8]) -> bool {
    let parts: Vec<(&str, &str)> = header.split(',').filter_map(|p| p.trim().split_once('=')).collect();
    let offered: Vec<Vec<u8>> =
        parts.iter().filter(|(k, _)| *k == "v1").filter_map(|(_, v)| hex::decode(v).ok()).collect();
    parts.iter().filter(|(k, _)| *k == "t").filter_map(|(_, v)| v.parse::<u64>().ok()).any(|t| {
        let genuine = stripe::signature_header(STRIPE_WEBHOOK_SECRET, t, body);
        let genuine = genuine.rsplit("v1=").next().and_then(|h| hex::decode(h).ok());
        t.abs_diff(NOW) <= STRIPE_TOLERANCE_SECS && genuine.is_some_and(|g| offered.contains(&g))
    })
}

fn check_stripe_verdict(verdict: &CallbackVerdict, body: &[u8]) {
    let event: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("a webhook was read from a body that is not JSON: {e}"));
    let CallbackVerdict::Payment(payment) = verdict else { return };
    let kind = event.get("type").and_then(Value::as_str);
    let session = event.pointer("/data/object").unwrap_or_else(|| panic!("a payment without a session"));
    let paid = session.get("payment_status").and_then(Value::as_str) == Some("paid");
    let succeeded = match kind {
        Some("checkout.session.completed") => paid,
        Some("checkout.session.async_payment_succeeded") => true,
        Some("checkout.session.async_payment_failed") => false,
        other => panic!("a payment read from a {other:?} event"),
    };
    assert_eq!(payment.status == ProviderStatus::Succeeded, succeeded, "status of a {kind:?} event");
    let reference = session.get("client_reference_id").and_then(Value::as_str);
    let metadata = session.pointer("/metadata/order_id").and_then(Value::as_str);
    let order = payment.order_id.to_string();
    assert!(reference.or(metadata) == Some(order.as_str()), "the order is the session's reference");
    if let (Some(a), Some(b)) = (reference, metadata) {
        assert_eq!(a, b, "a session whose references disagree was taken");
    }
    if let Some(node) = session.pointer("/metadata/node_id").and_then(Value::as_str) {
        assert_eq!(node, NODE, "another node's session was taken");
    }
    assert_eq!(session.get("id").and_then(Value::as_str), Some(payment.provider_txn.as_str()));
    assert!(!payment.provider_txn.is_empty() && payment.provider_txn.len() <= 255);
    assert_eq!(session.get("amount_total").and_then(Value::as_u64), Some(payment.amount_minor));
    check_currency(payment);
    let currency = session.get("currency").and_then(Value::as_str).map(str::to_ascii_uppercase);
    assert_eq!(currency.as_deref(), Some(payment.currency.as_str()));
}

fn check_currency(payment: &VerifiedCallback) {
    let c = payment.currency.as_bytes();
    assert!(c.len() == 3 && c.iter().all(u8::is_ascii_uppercase), "currency {:?}", payment.currency);
}

/// An EPay notify: the query string of a GET or the body of a POST.
///
/// Body and query give the same verdict. A notify verifies only if it carries the merchant's
/// signature of its parameters. Its parameters signed again with the merchant key can be
/// refused only for their contents (never the signature), and with one parameter added they
/// cannot verify. A payment says what the parameters say: `out_trade_no`, `trade_no`, the
/// exact amount, CNY, and succeeded only for `TRADE_SUCCESS`.
pub fn epay_notify(data: &[u8]) {
    let channel = epay_channel();
    let headers = HeaderMap::new();
    let as_body = channel.verify_callback(&CallbackRequest { headers: &headers, query: None, body: data }, NOW);
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(matches!(as_body, Err(CallbackError::MalformedBody(_))), "a notify that is not UTF-8 was read");
        return;
    };
    let verify = |query: &str| {
        channel.verify_callback(&CallbackRequest { headers: &headers, query: Some(query), body: b"" }, NOW)
    };
    let as_query = verify(text);
    if !data.is_empty() {
        assert_eq!(as_body, as_query, "a notify's body and query string give different verdicts");
    }
    if let Ok(verdict) = &as_query {
        let params = parse_form(text).unwrap_or_else(|| panic!("a verified notify is not a form"));
        let presented = params.iter().find(|(k, _)| k == "sign").map(|(_, v)| v.to_ascii_lowercase());
        assert_eq!(
            presented,
            Some(epay::sign(&params, EPAY_KEY)),
            "a notify verified without the merchant's signature"
        );
        check_epay_verdict(verdict, &params);
    }

    let Some(mut params) = parse_form(text) else { return };
    params.retain(|(k, _)| k != "sign" && k != "sign_type");
    let signature = epay::sign(&params, EPAY_KEY);
    let with_signature = |params: &[(String, String)], signature: &str| {
        let mut pairs: Vec<(&str, String)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        pairs.push(("sign", signature.to_string()));
        pairs.push(("sign_type", "MD5".into()));
        encode_form(&pairs)
    };
    match verify(&with_signature(&params, &signature)) {
        Ok(verdict) => check_epay_verdict(&verdict, &params),
        Err(CallbackError::MalformedBody(_) | CallbackError::WrongMerchant) => {}
        Err(e) => panic!("a notify signed with the merchant key was refused: {e}"),
    }
    if !params.iter().any(|(k, _)| k == "fuzz_added") {
        params.push(("fuzz_added".into(), "1".into()));
        assert_eq!(verify(&with_signature(&params, &signature)), Err(CallbackError::BadSignature));
    }
}

fn check_epay_verdict(verdict: &CallbackVerdict, params: &[(String, String)]) {
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let CallbackVerdict::Payment(payment) = verdict else { panic!("EPay ignored a notify: {verdict:?}") };
    assert_eq!(get("pid"), Some(EPAY_PID), "another merchant's notify was taken");
    assert_eq!(get("out_trade_no"), Some(payment.order_id.to_string().as_str()));
    assert_eq!(get("trade_no"), Some(payment.provider_txn.as_str()));
    assert!(!payment.provider_txn.is_empty() && payment.provider_txn.len() <= 128);
    let money = get("money").unwrap_or_else(|| panic!("a payment without money"));
    assert_eq!(parse_money_2dp(money), Some(payment.amount_minor));
    assert_eq!(parse_money_2dp(&format_money_2dp(payment.amount_minor)), Some(payment.amount_minor));
    assert_eq!(payment.currency, "CNY");
    check_currency(payment);
    assert_eq!(payment.status == ProviderStatus::Succeeded, get("trade_status") == Some("TRADE_SUCCESS"));
}

/// A storefront form body (`application/x-www-form-urlencoded`, lossy UTF-8 as the checkout
/// reads it): at most 64 pairs, which read the same once encoded again; the checkout's fields
/// are the form's first values, trimmed and within their lengths; the sku only when it is a
/// well-formed one. The same bytes as a `Cookie` header give a cookie value found in them.
pub fn storefront_form(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pairs = form::parse_urlencoded(&text);
    assert!(pairs.len() <= 64, "{} pairs", pairs.len());
    let encoded: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert!(form::parse_urlencoded(&encode_form(&encoded)) == pairs, "pairs encoded again read differently");

    let checkout = form::checkout_form(&pairs);
    let sku = form::first(&pairs, "sku");
    assert_eq!(checkout.sku.as_ref().map(|s| s.as_str()), sku.filter(|s| edgecard_protocol::Sku::new(*s).is_ok()));
    let [quantity, email, currency, channel] = form::CHECKOUT_FIELD_CHARS;
    let fields = [
        (Some(checkout.values.quantity.as_str()), "quantity", quantity),
        (Some(checkout.values.email.as_str()), "email", email),
        (checkout.values.currency.as_deref(), "currency", currency),
        (checkout.values.channel.as_deref(), "channel", channel),
    ];
    for (value, name, chars) in fields {
        let raw = form::first(&pairs, name);
        match value {
            Some(value) => {
                assert!(value.chars().count() <= chars, "{name} longer than {chars} characters");
                assert!(!value.starts_with(char::is_whitespace), "{name} not trimmed");
                if let Some(raw) = raw {
                    assert!(raw.trim().starts_with(value), "{name} is not taken from the form");
                }
            }
            None => assert!(raw.is_none(), "{name} in the form was dropped"),
        }
    }
    if form::first(&pairs, "quantity").is_none() {
        assert_eq!(checkout.values.quantity, "1");
    }

    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, value.clone());
        headers.insert(http::header::CONTENT_TYPE, value);
        if let Some(lang) = form::cookie(&headers, "lang") {
            assert!(text.contains(lang), "a cookie value that is not in the header");
        }
        let _ = form::is_form(&headers);
    }
}

/// A `POST /api/v1/orders` body. Accepted: a JSON object of the known fields only, whose sku
/// and quantity (1 when absent) are the request's, and which written back as JSON reads as the
/// same request; the engine's e-mail rule is idempotent on it. Refused: 400 `invalid_json` or
/// `invalid_currency`, or 404 `unknown_sku`, the last two only for well-formed JSON.
pub fn order_json(data: &[u8]) {
    let json: Option<Value> = serde_json::from_slice(data).ok();
    let request = match parse_order_request(data) {
        Ok(request) => request,
        Err(e) => {
            let known = matches!(
                (e.status().as_u16(), e.code()),
                (400, "invalid_json") | (400, "invalid_currency") | (404, "unknown_sku")
            );
            assert!(known, "refused with {} {}", e.status(), e.code());
            if e.code() != "invalid_json" {
                assert!(json.is_some(), "{} for a body that is not JSON", e.code());
            }
            return;
        }
    };
    let object = json.as_ref().and_then(Value::as_object).unwrap_or_else(|| panic!("accepted a non-object"));
    let known = ["sku", "quantity", "email", "currency", "channel"];
    assert!(object.keys().all(|k| known.contains(&k.as_str())), "accepted an unknown field");
    assert_eq!(object.get("sku").and_then(Value::as_str), Some(request.sku.as_str()));
    match object.get("quantity") {
        Some(q) => assert_eq!(q.as_u64(), Some(u64::from(request.quantity))),
        None => assert_eq!(request.quantity, 1),
    }
    let again = json!({
        "sku": request.sku.as_str(),
        "quantity": request.quantity,
        "email": request.email,
        "currency": request.currency.map(|c| c.to_string()),
        "channel": request.channel,
    });
    let again = serde_json::to_vec(&again).unwrap_or_else(|e| panic!("{e}"));
    assert!(parse_order_request(&again).ok().as_ref() == Some(&request), "the request written back reads differently");
    if let Some(email) = &request.email {
        if let Ok(normal) = normalize_email(email) {
            assert!(normal.len() <= 254 && normal.matches('@').count() == 1);
            assert_eq!(normalize_email(&normal).ok().as_deref(), Some(normal.as_str()), "e-mail rule not idempotent");
        }
    }
}
