//! The order-record layout of stores written before orders kept every payment attempt, refunds
//! and disputes (record format 1). Stored rkyv archives carry no schema, so records in this layout
//! are read through these types and converted.

use std::net::IpAddr;

use edgecard_protocol::{KeyId, OrderId, Secret, Sku, UnixMillis};
use serde::Deserialize;

use super::record::{OrderRecord, OrderStatus, PaymentAttempt, PaymentRecord};

#[derive(Debug, Clone, Copy, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatusV1 {
    Reserved,
    Delivered,
    Expired,
    PaidAwaitingStock,
}

#[derive(Debug, Clone, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PaymentRecordV1 {
    pub channel: String,
    pub provider_txn: String,
    pub amount_minor: u64,
    pub currency: String,
    pub paid_at: UnixMillis,
}

#[derive(Debug, Clone, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PaymentAttemptV1 {
    pub channel: String,
    pub provider_ref: Option<String>,
    pub pay_url: Option<String>,
    pub created_at: UnixMillis,
}

#[derive(Debug, Clone, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OrderRecordV1 {
    pub id: OrderId,
    pub sku: Sku,
    pub quantity: u32,
    pub amount_minor: u64,
    pub currency: String,
    pub channel: String,
    pub token_sha256: String,
    pub email: Option<String>,
    pub client_ip: IpAddr,
    pub status: OrderStatusV1,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub key_ids: Vec<KeyId>,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default)]
    pub payment: Option<PaymentRecordV1>,
    #[serde(default)]
    pub delivered_at: Option<UnixMillis>,
    #[serde(default)]
    pub payment_attempt: Option<PaymentAttemptV1>,
}

impl From<OrderRecordV1> for OrderRecord {
    fn from(old: OrderRecordV1) -> Self {
        let status = match old.status {
            OrderStatusV1::Reserved => OrderStatus::Reserved,
            OrderStatusV1::Delivered => OrderStatus::Delivered,
            OrderStatusV1::Expired => OrderStatus::Expired,
            OrderStatusV1::PaidAwaitingStock => OrderStatus::PaidAwaitingStock,
        };
        let payment = old.payment.map(|p| PaymentRecord {
            channel: p.channel,
            provider_txn: p.provider_txn,
            amount_minor: p.amount_minor,
            currency: p.currency,
            paid_at: p.paid_at,
            provider_payment: None,
        });
        // The one attempt format 1 kept was the latest; earlier ones were overwritten.
        let attempts = old
            .payment_attempt
            .map(|a| PaymentAttempt {
                channel: a.channel,
                provider_ref: a.provider_ref,
                pay_url: a.pay_url,
                created_at: a.created_at,
                pays_until: None,
            })
            .into_iter()
            .collect();
        OrderRecord {
            id: old.id,
            sku: old.sku,
            quantity: old.quantity,
            amount_minor: old.amount_minor,
            currency: old.currency,
            channel: old.channel,
            token_sha256: old.token_sha256,
            email: old.email,
            client_ip: old.client_ip,
            status,
            created_at: old.created_at,
            expires_at: old.expires_at,
            key_ids: old.key_ids,
            secrets: old.secrets,
            payment,
            delivered_at: old.delivered_at,
            attempts,
            refund: None,
            dispute: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::orders::record::ORDERS;

    fn old_order() -> OrderRecordV1 {
        OrderRecordV1 {
            id: OrderId::from_bytes([5; 16]),
            sku: Sku::new("game").unwrap(),
            quantity: 2,
            amount_minor: 2000,
            currency: "USD".into(),
            channel: "stripe".into(),
            token_sha256: "ab".repeat(32),
            email: Some("buyer@example.com".into()),
            client_ip: [192, 0, 2, 1].into(),
            status: OrderStatusV1::Delivered,
            created_at: UnixMillis(1_000),
            expires_at: UnixMillis(901_000),
            key_ids: vec![KeyId(3), KeyId(4)],
            secrets: vec![Secret::new("K-3".into()).unwrap(), Secret::new("K-4".into()).unwrap()],
            payment: Some(PaymentRecordV1 {
                channel: "stripe".into(),
                provider_txn: "cs_1".into(),
                amount_minor: 2000,
                currency: "USD".into(),
                paid_at: UnixMillis(2_000),
            }),
            delivered_at: Some(UnixMillis(2_001)),
            payment_attempt: Some(PaymentAttemptV1 {
                channel: "stripe".into(),
                provider_ref: Some("cs_1".into()),
                pay_url: Some("https://checkout.example/cs_1".into()),
                created_at: UnixMillis(1_500),
            }),
        }
    }

    #[test]
    fn a_format_1_order_still_reads_with_its_attempt_and_payment() {
        let raw = edgecard_store::record::encode("order record", &old_order()).unwrap();
        assert_eq!(raw[1], 1, "written in format 1, as the previous release did");
        let read = ORDERS.decode(&raw).unwrap();
        assert_eq!(read.status, OrderStatus::Delivered);
        assert_eq!(read.secrets.iter().map(|s| s.expose().to_string()).collect::<Vec<_>>(), vec!["K-3", "K-4"]);
        assert_eq!(read.payment.as_ref().map(|p| p.provider_txn.as_str()), Some("cs_1"));
        assert_eq!(read.attempts.len(), 1);
        assert_eq!(read.attempts[0].provider_ref.as_deref(), Some("cs_1"));
        assert!(read.refund.is_none() && read.dispute.is_none());
        assert_eq!(read.binds("stripe", Some("cs_1")), Ok(()));

        let mut batch = edgecard_store::WriteBatch::default();
        ORDERS.put(&mut batch, read.id.as_bytes(), &read).unwrap();
        let edgecard_store::Op::Put(_, rewritten) = &batch.ops()[0] else { panic!("a put") };
        assert_eq!(rewritten[1], 2, "rewritten in format 2");
        assert_eq!(ORDERS.decode(rewritten).unwrap().attempts, read.attempts);
    }

    #[test]
    fn a_format_1_order_without_an_attempt_binds_its_channel_only() {
        let mut old = old_order();
        old.payment_attempt = None;
        old.channel = "epay".into();
        old.status = OrderStatusV1::Reserved;
        let read = ORDERS.decode(&edgecard_store::record::encode("order record", &old).unwrap()).unwrap();
        assert!(read.attempts.is_empty());
        assert_eq!(read.binds("epay", None), Ok(()));
        assert_eq!(read.binds("stripe", Some("cs_1")), Err(edgecard_protocol::UnmatchedReason::WrongChannel));
    }

    #[test]
    fn legacy_json_orders_still_read() {
        let json = serde_json::json!({
            "id": OrderId::from_bytes([5; 16]), "sku": "game", "quantity": 1, "amount_minor": 100,
            "currency": "USD", "channel": "sandbox", "token_sha256": "", "email": null,
            "client_ip": "192.0.2.1", "status": "paid_awaiting_stock", "created_at": 1, "expires_at": 2,
            "key_ids": [],
        });
        let read = ORDERS.decode(json.to_string().as_bytes()).unwrap();
        assert_eq!(read.status, OrderStatus::PaidAwaitingStock);
        assert!(read.attempts.is_empty());
    }
}
