//! Payment channels. A channel makes a pay link for an order and verifies the provider's
//! callbacks; the order engine then binds the verified payment to the order (amount, currency)
//! and settles it. Callbacks from every channel take the same path.

pub mod sandbox;

use edgecard_protocol::OrderId;
use http::HeaderMap;

use crate::orders::OrderRecord;

/// What a provider's callback says, once its signature has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCallback {
    pub order_id: OrderId,
    pub provider_txn: String,
    pub amount_minor: u64,
    pub currency: String,
    pub status: ProviderStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStatus {
    Succeeded,
    /// Pending or failed: acknowledged, nothing changes.
    NotSucceeded,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallbackError {
    #[error("missing signature header")]
    MissingSignature,
    #[error("malformed signature header")]
    MalformedSignature,
    #[error("signature does not verify")]
    BadSignature,
    #[error("callback timestamp outside the accepted window")]
    Stale,
    #[error("malformed callback body: {0}")]
    MalformedBody(String),
}

/// One payment provider, as the node sees it.
pub trait PaymentChannel: Send + Sync {
    fn name(&self) -> &'static str;
    /// The URL (or payload) the buyer uses to pay for `order`.
    fn pay_url(&self, order: &OrderRecord, public_url: &str) -> String;
    /// Checks a callback's authenticity and reads it. Binding to the order is the engine's job.
    fn verify_callback(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix_secs: u64,
    ) -> Result<VerifiedCallback, CallbackError>;
}
