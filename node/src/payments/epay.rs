//! EPay (易支付): the MD5-signed protocol most Chinese payment aggregators speak.
//!
//! - **Sign**: parameters sorted by name (ASCII), excluding `sign`, `sign_type` and empty values,
//!   joined as `k=v` with `&` (values not URL-encoded), the merchant key appended, MD5, lower-case
//!   hex. `sign_type=MD5`.
//! - **Submit**: the buyer is sent to `{gateway}/submit.php?pid&type&out_trade_no&notify_url&
//!   return_url&name&money&sign&sign_type`; `out_trade_no` is our order id and `money` the amount
//!   with exactly two decimals. Creating a payment makes no network call.
//! - **Notify**: GET or POST form with `pid, trade_no, out_trade_no, type, name, money,
//!   trade_status, sign, sign_type`. Checked: signature (constant time), `pid` is ours, `money`
//!   parses exactly; `trade_status=TRADE_SUCCESS` is a payment. Answered with plain `success` only
//!   after the durable commit, `fail` otherwise, so the aggregator retries.
//! - **Provider transaction id** = `trade_no`.
//! - **Return**: `return_url` is the order's return link ([`super::return_link`]); gateways append
//!   their signed result to it as a query string, which the return page ignores.
//! - **Query**: `GET {gateway}/api.php?act=order&pid&key&out_trade_no` → JSON, `status` 1 = paid.
//! - EPay amounts are CNY by convention; the channel's currency is configurable (default CNY) and
//!   it refuses orders in any other currency.

use std::time::Duration;

use http::Method;
use md5::{Digest, Md5};
use serde_json::Value;

use super::http_client::{OutboundClient, OutboundError};
use super::return_link::ReturnLinks;
use super::{
    encode_form, format_money_2dp, parse_form, parse_money_2dp, AckStyle, BoxFuture, CallbackError, CallbackRequest,
    CallbackVerdict, ChannelError, CreatedPayment, PaymentChannel, ProviderStatus, QueriedStatus, VerifiedCallback,
};
use crate::orders::{AttemptRef, OrderRecord};

pub const NAME: &str = "epay";

#[derive(Clone)]
pub struct EpaySettings {
    /// Base URL of the aggregator, e.g. `https://pay.example.com`; no trailing slash.
    pub gateway_url: String,
    pub pid: String,
    pub key: String,
    /// Payment method passed as `type`: `alipay`, `wxpay`, `qqpay`, …
    pub pay_type: String,
    /// ISO 4217 code of the amounts this aggregator takes.
    pub currency: String,
    pub request_timeout: Duration,
    /// Where the aggregator sends the buyer back: the order's return link.
    pub return_links: ReturnLinks,
}

impl std::fmt::Debug for EpaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpaySettings")
            .field("gateway_url", &self.gateway_url)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

pub struct EpayChannel {
    settings: EpaySettings,
    client: OutboundClient,
}

/// The EPay signature of `params` under `key` (lower-case hex MD5).
pub fn sign(params: &[(String, String)], key: &str) -> String {
    let mut signed: Vec<&(String, String)> =
        params.iter().filter(|(k, v)| k != "sign" && k != "sign_type" && !v.is_empty()).collect();
    signed.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let joined = signed.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let mut hasher = Md5::new();
    hasher.update(joined.as_bytes());
    hasher.update(key.as_bytes());
    hex::encode(hasher.finalize())
}

impl EpayChannel {
    pub fn new(settings: EpaySettings, client: OutboundClient) -> Self {
        EpayChannel { settings, client }
    }

    fn submit_url(&self, order: &OrderRecord, public_url: &str) -> Result<String, ChannelError> {
        if order.currency != self.settings.currency {
            return Err(ChannelError::Unsupported {
                channel: NAME,
                reason: format!("takes {} only, order is in {}", self.settings.currency, order.currency),
            });
        }
        let mut params: Vec<(String, String)> = vec![
            ("pid".into(), self.settings.pid.clone()),
            ("type".into(), self.settings.pay_type.clone()),
            ("out_trade_no".into(), order.id.to_string()),
            ("notify_url".into(), format!("{public_url}/api/v1/payments/{NAME}/callback")),
            // The return link, never the order's token: the aggregator logs these URLs.
            ("return_url".into(), self.settings.return_links.url(public_url, order)),
            ("name".into(), format!("{} x {}", order.sku, order.quantity)),
            ("money".into(), format_money_2dp(order.amount_minor)),
        ];
        let signature = sign(&params, &self.settings.key);
        params.push(("sign".into(), signature));
        params.push(("sign_type".into(), "MD5".into()));
        let pairs: Vec<(&str, String)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        Ok(format!("{}/submit.php?{}", self.settings.gateway_url, encode_form(&pairs)))
    }
}

fn json_str(value: &Value, name: &str) -> Option<String> {
    match value.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl PaymentChannel for EpayChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        public_url: &'a str,
    ) -> BoxFuture<'a, Result<CreatedPayment, ChannelError>> {
        let created = self.submit_url(order, public_url).map(|pay_url| CreatedPayment {
            pay_url,
            provider_ref: None,
            pays_until: None,
        });
        Box::pin(async move { created })
    }

    fn local_pay_url(&self, order: &OrderRecord, public_url: &str) -> Option<String> {
        self.submit_url(order, public_url).ok()
    }

    fn verify_callback(
        &self,
        request: &CallbackRequest<'_>,
        _now_unix_secs: u64,
    ) -> Result<CallbackVerdict, CallbackError> {
        let raw = if request.body.is_empty() {
            request.query.unwrap_or("").to_string()
        } else {
            std::str::from_utf8(request.body).map_err(|_| CallbackError::MalformedBody("not UTF-8".into()))?.to_string()
        };
        let params = parse_form(&raw).ok_or_else(|| CallbackError::MalformedBody("form encoding".into()))?;
        let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let presented = get("sign").filter(|s| !s.is_empty()).ok_or(CallbackError::MissingSignature)?;
        if let Some(sign_type) = get("sign_type") {
            if !sign_type.eq_ignore_ascii_case("MD5") {
                return Err(CallbackError::MalformedSignature);
            }
        }
        let expected = sign(&params, &self.settings.key);
        if !super::ct_eq(presented.to_ascii_lowercase().as_bytes(), expected.as_bytes()) {
            return Err(CallbackError::BadSignature);
        }
        let required = |name: &'static str| {
            get(name).filter(|v| !v.is_empty()).ok_or_else(|| CallbackError::MalformedBody(format!("missing {name}")))
        };
        if required("pid")? != self.settings.pid {
            return Err(CallbackError::WrongMerchant);
        }
        let order_id = required("out_trade_no")?
            .parse()
            .map_err(|_| CallbackError::MalformedBody("out_trade_no is not an order id".into()))?;
        let trade_no = required("trade_no")?;
        if trade_no.len() > 128 {
            return Err(CallbackError::MalformedBody("trade_no too long".into()));
        }
        let amount_minor =
            parse_money_2dp(required("money")?).ok_or_else(|| CallbackError::MalformedBody("money".into()))?;
        let status = if required("trade_status")? == "TRADE_SUCCESS" {
            ProviderStatus::Succeeded
        } else {
            ProviderStatus::NotSucceeded
        };
        Ok(CallbackVerdict::Payment(VerifiedCallback {
            order_id,
            provider_txn: trade_no.to_string(),
            amount_minor,
            currency: self.settings.currency.clone(),
            status,
            provider_ref: None,
            provider_payment: None,
        }))
    }

    fn query_payment<'a>(
        &'a self,
        order: &'a OrderRecord,
        _attempt: AttemptRef<'a>,
    ) -> BoxFuture<'a, Result<QueriedStatus, ChannelError>> {
        Box::pin(async move {
            let query = encode_form(&[
                ("act", "order".into()),
                ("pid", self.settings.pid.clone()),
                ("key", self.settings.key.clone()),
                ("out_trade_no", order.id.to_string()),
            ]);
            let url = format!("{}/api.php?{query}", self.settings.gateway_url);
            let response =
                self.client.send(Method::GET, &url, &[], Vec::new(), self.settings.request_timeout).await.map_err(
                    |e| match e {
                        OutboundError::Timeout => ChannelError::Timeout { channel: NAME },
                        other => ChannelError::Unavailable { channel: NAME, reason: other.to_string() },
                    },
                )?;
            if response.status >= 500 || response.status == 429 {
                return Err(ChannelError::Unavailable { channel: NAME, reason: format!("HTTP {}", response.status) });
            }
            let bad = |reason: &str| ChannelError::BadResponse { channel: NAME, reason: reason.into() };
            let body: Value = serde_json::from_slice(&response.body).map_err(|_| bad("body is not JSON"))?;
            if json_str(&body, "code").as_deref() != Some("1") {
                // Unknown to the aggregator: the buyer has not reached the pay page yet.
                return Ok(QueriedStatus::Pending);
            }
            if json_str(&body, "status").as_deref() != Some("1") {
                return Ok(QueriedStatus::Pending);
            }
            if json_str(&body, "out_trade_no").as_deref() != Some(order.id.to_string().as_str()) {
                return Err(bad("answer is about another order"));
            }
            if json_str(&body, "pid").is_some_and(|pid| pid != self.settings.pid) {
                return Err(bad("answer is about another merchant"));
            }
            let trade_no = json_str(&body, "trade_no")
                .filter(|t| !t.is_empty() && t.len() <= 128)
                .ok_or_else(|| bad("trade_no"))?;
            let amount_minor =
                json_str(&body, "money").and_then(|m| parse_money_2dp(&m)).ok_or_else(|| bad("money"))?;
            Ok(QueriedStatus::Paid(VerifiedCallback {
                order_id: order.id,
                provider_txn: trade_no,
                amount_minor,
                currency: self.settings.currency.clone(),
                status: ProviderStatus::Succeeded,
                provider_ref: None,
                provider_payment: None,
            }))
        })
    }

    fn takes_currency(&self, currency: &str) -> bool {
        currency == self.settings.currency
    }

    fn ack_style(&self) -> AckStyle {
        AckStyle::PlainSuccess
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const KEY: &str = "epay-merchant-key";

    fn channel() -> EpayChannel {
        EpayChannel::new(
            EpaySettings {
                gateway_url: "https://pay.example.com".into(),
                pid: "1001".into(),
                key: KEY.into(),
                pay_type: "alipay".into(),
                currency: "CNY".into(),
                request_timeout: Duration::from_secs(1),
                return_links: ReturnLinks::new(b"return-link key for tests", 3600).unwrap(),
            },
            OutboundClient::new(None).unwrap(),
        )
    }

    fn order(currency: &str) -> OrderRecord {
        OrderRecord::for_tests(NAME, 2, 1000, currency)
    }

    fn to_pairs(params: &[(String, String)]) -> String {
        let pairs: Vec<(&str, String)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        encode_form(&pairs)
    }

    fn notify(order: &OrderRecord, money: &str, status: &str, key: &str) -> String {
        let id = order.id.to_string();
        let mut params: Vec<(String, String)> = [
            ("pid", "1001"),
            ("trade_no", "2024000001"),
            ("out_trade_no", id.as_str()),
            ("type", "alipay"),
            ("name", "game x 2"),
            ("money", money),
            ("trade_status", status),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let signature = sign(&params, key);
        params.push(("sign".into(), signature));
        params.push(("sign_type".into(), "MD5".into()));
        to_pairs(&params)
    }

    fn verify_query(query: &str) -> Result<CallbackVerdict, CallbackError> {
        let headers = HeaderMap::new();
        channel().verify_callback(&CallbackRequest { headers: &headers, query: Some(query), body: b"" }, 0)
    }

    #[test]
    fn signature_matches_the_reference_construction() {
        // md5("a=1&b=2&c=3" + key): sorted, sign/sign_type/empty values left out.
        let params: Vec<(String, String)> =
            [("c", "3"), ("a", "1"), ("sign", "x"), ("sign_type", "MD5"), ("e", ""), ("b", "2")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let mut hasher = Md5::new();
        hasher.update(b"a=1&b=2&c=3key");
        assert_eq!(sign(&params, "key"), hex::encode(hasher.finalize()));
    }

    #[test]
    fn submit_url_is_signed_and_exact_to_the_cent() {
        let order = order("CNY");
        let url = channel().local_pay_url(&order, "https://node.example").unwrap();
        let query = url.strip_prefix("https://pay.example.com/submit.php?").unwrap();
        let params = parse_form(query).unwrap();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("money"), "10.00");
        assert_eq!(get("out_trade_no"), order.id.to_string());
        assert_eq!(get("notify_url"), "https://node.example/api/v1/payments/epay/callback");
        let links = ReturnLinks::new(b"return-link key for tests", 3600).unwrap();
        assert_eq!(get("return_url"), links.url("https://node.example", &order), "the return link, no order token");
        assert_eq!(get("sign"), sign(&params, KEY));
        assert!(channel().local_pay_url(&order_in("USD"), "https://node.example").is_none(), "CNY only");
    }

    fn order_in(currency: &str) -> OrderRecord {
        order(currency)
    }

    #[test]
    fn genuine_notify_verifies_from_query_or_body() {
        let order = order("CNY");
        let form = notify(&order, "10.00", "TRADE_SUCCESS", KEY);
        let CallbackVerdict::Payment(p) = verify_query(&form).unwrap() else { panic!() };
        assert_eq!((p.order_id, p.amount_minor, p.currency.as_str()), (order.id, 1000, "CNY"));
        assert_eq!((p.provider_txn.as_str(), p.status), ("2024000001", ProviderStatus::Succeeded));
        let headers = HeaderMap::new();
        let from_body =
            channel().verify_callback(&CallbackRequest { headers: &headers, query: None, body: form.as_bytes() }, 0);
        assert!(matches!(from_body, Ok(CallbackVerdict::Payment(_))));
    }

    #[test]
    fn forged_tampered_foreign_and_odd_notifies() {
        let order = order("CNY");
        assert_eq!(
            verify_query(&notify(&order, "10.00", "TRADE_SUCCESS", "wrong-key")),
            Err(CallbackError::BadSignature)
        );
        let tampered = notify(&order, "10.00", "TRADE_SUCCESS", KEY).replace("money=10.00", "money=0.01");
        assert_eq!(verify_query(&tampered), Err(CallbackError::BadSignature));
        let full = notify(&order, "10.00", "TRADE_SUCCESS", KEY);
        let unsigned = full.split("&sign=").next().unwrap();
        assert_eq!(verify_query(unsigned), Err(CallbackError::MissingSignature));
        let CallbackVerdict::Payment(p) = verify_query(&notify(&order, "10.00", "WAIT_BUYER_PAY", KEY)).unwrap() else {
            panic!()
        };
        assert_eq!(p.status, ProviderStatus::NotSucceeded);
        assert!(matches!(
            verify_query(&notify(&order, "10.001", "TRADE_SUCCESS", KEY)),
            Err(CallbackError::MalformedBody(_))
        ));
        // Signed with our key but for another merchant id.
        let mut params = parse_form(&notify(&order, "10.00", "TRADE_SUCCESS", KEY)).unwrap();
        params.retain(|(k, _)| k != "sign" && k != "sign_type");
        params[0].1 = "2002".into();
        let signature = sign(&params, KEY);
        params.push(("sign".into(), signature));
        assert_eq!(verify_query(&to_pairs(&params)), Err(CallbackError::WrongMerchant));
        assert!(verify_query("a=1&a=2").is_err());
        assert!(verify_query("").is_err());
        assert!(verify_query("%%%").is_err());
    }
}
