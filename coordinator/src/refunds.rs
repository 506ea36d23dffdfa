//! Refunds, as the coordinator sees them. An operator asks for one ([`Coordinator::request_refund`]);
//! the request is recorded and queued as a control message for the node that sold the order,
//! which alone holds the credentials of the channel that took the payment. The node records it
//! durably, carries it out against the provider under an idempotency key derived from the order,
//! and answers with a `Refunded` event (or refuses the message for good when it never took a
//! payment for the order); either settles the record here. Refunds made in a provider's dashboard
//! reach the ledger as `Refunded` events without a request and are recorded the same way.

use edgecard_protocol::{valid_refund_reason, OrderEvent, OrderEventKind, OrderId};
use edgecard_store::{StoreError, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::records::{self as rec, LedgerOrder, LedgerStatus, RefundRequest, RefundRequestState};
use crate::service::{now_millis, Coordinator, CoordinatorError, CONTROL_REFUND};

/// The payload of a queued refund control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RefundOrder {
    pub order_id: OrderId,
    pub reason: String,
}

/// Why a refund was recorded without an operator's request.
const REFUNDED_AT_PROVIDER: &str = "refunded at the provider";

impl Coordinator {
    /// Asks the node that sold `order_id` to refund its payment. A second request for the same
    /// order returns the first one's record and queues nothing (unless the node refused it).
    pub async fn request_refund(&self, order_id: &OrderId, reason: &str) -> Result<RefundRequest, CoordinatorError> {
        if !valid_refund_reason(reason) {
            return Err(CoordinatorError::BadRefundReason);
        }
        let request = {
            let _guard = self.lock.lock();
            let order: LedgerOrder = self
                .load("order", &rec::order_key(order_id))?
                .ok_or_else(|| CoordinatorError::UnknownOrder(order_id.to_string()))?;
            if let Some(existing) = self.refund(order_id)? {
                if !matches!(existing.state, RefundRequestState::Refused { .. }) {
                    return Ok(existing);
                }
            }
            // Paid, whether or not its keys were delivered. A disputed payment is settled through
            // the dispute (a provider refuses to refund it), an unpaid one has nothing to give back.
            if !matches!(order.status, LedgerStatus::Paid | LedgerStatus::Delivered | LedgerStatus::PaidAwaitingStock) {
                return Err(CoordinatorError::NotRefundable {
                    order: order_id.to_string(),
                    status: order.status.as_str(),
                });
            }
            let node = self.node(&order.node)?;
            if node.revoked {
                return Err(CoordinatorError::NodeRevoked(node.node_id.to_string()));
            }
            let mut batch = WriteBatch::default();
            let payload = rec::encode(&RefundOrder { order_id: *order_id, reason: reason.to_string() })?;
            let node = self.queue_control(&mut batch, node, CONTROL_REFUND, payload)?;
            let request = RefundRequest {
                order_id: *order_id,
                node: node.node_id.clone(),
                reason: reason.to_string(),
                requested_at: now_millis(),
                control_seq: node.next_control_seq.saturating_sub(1),
                state: RefundRequestState::Requested,
            };
            batch.put(rec::refund_key(order_id), rec::encode(&request)?);
            self.store.apply(batch)?;
            request
        };
        self.store.durable().await?;
        tracing::info!(order = %order_id, node = %request.node, control = request.control_seq, "refund requested");
        Ok(request)
    }

    /// The refund record of `order_id`, if any.
    pub fn refund(&self, order_id: &OrderId) -> Result<Option<RefundRequest>, StoreError> {
        self.load("refund", &rec::refund_key(order_id))
    }

    /// Every refund record, by order id.
    pub fn refunds(&self) -> Result<Vec<RefundRequest>, StoreError> {
        self.store.scan_prefix(b"u/").map(|item| rec::decode("refund", &item?.1)).collect()
    }

    /// Settles the refund records of `Refunded` events just taken into the ledger, in `batch`
    /// (creating one for a refund nobody here asked for).
    pub(crate) fn record_refunds(&self, batch: &mut WriteBatch, events: &[OrderEvent]) -> Result<(), StoreError> {
        for event in events {
            let OrderEventKind::Refunded { provider_refund, manual, .. } = &event.kind else { continue };
            let mut request = self.refund(&event.order_id)?.unwrap_or_else(|| RefundRequest {
                order_id: event.order_id,
                node: event.node_id.clone(),
                reason: REFUNDED_AT_PROVIDER.into(),
                requested_at: event.at,
                control_seq: 0,
                state: RefundRequestState::Requested,
            });
            request.state = if *manual {
                RefundRequestState::Manual { at: event.at }
            } else {
                RefundRequestState::Refunded { provider_refund: provider_refund.clone(), at: event.at }
            };
            batch.put(rec::refund_key(&event.order_id), rec::encode(&request)?);
        }
        Ok(())
    }

    /// A node refused the refund control message `payload` for good: its record says why.
    /// Returns the order it was about.
    pub(crate) fn refuse_refund(
        &self,
        batch: &mut WriteBatch,
        payload: &[u8],
        reason: &str,
    ) -> Result<Option<OrderId>, StoreError> {
        let order: RefundOrder = rec::decode("refund", payload)?;
        if let Some(mut request) = self.refund(&order.order_id)? {
            request.state = RefundRequestState::Refused { reason: reason.to_string() };
            batch.put(rec::refund_key(&order.order_id), rec::encode(&request)?);
        }
        Ok(Some(order.order_id))
    }
}
