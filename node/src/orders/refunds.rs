//! Refunds and disputes of paid orders, on the node that took the payment.
//!
//! A refund is asked for (by the coordinator, for an operator), recorded durably on the order and
//! indexed under `u/`, then carried out by the refund worker (`payments::refunds`) against the
//! channel that took the payment, under an idempotency key derived from the order: a crash
//! between the provider's call and [`OrderEngine::complete_refund`] leaves the request indexed,
//! the worker asks again with the same key, and the provider answers with the same refund. Once
//! complete the order is `Refunded`: its keys revoked (never shown again; the coordinator marks
//! them revoked so nobody sells them), a `Refunded` event for the ledger. An order paid while out
//! of stock leaves the queue for stock as soon as its refund is asked for, so no key goes to it.
//!
//! Refunds and disputes made at the provider (its dashboard) arrive by webhook and are found by
//! the provider's payment id (`i/`); a refund is recorded like one asked for here.

use edgecard_protocol::{KeyId, OrderEventKind, OrderId};

use super::engine::{now_millis, OrderEngine, OrderError, State};
use super::record::{self, DisputeRecord, OrderRecord, OrderStatus, RefundRecord, RefundState};
use crate::store::{StoreError, WriteBatch};

/// The reason recorded for a refund made at the provider.
pub const REFUNDED_AT_PROVIDER: &str = "refunded at the provider";

/// What asking for a refund did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundStart {
    /// Recorded: the refund worker carries it out.
    Started,
    /// Asked for before and not finished yet.
    AlreadyPending,
    /// Already refunded.
    AlreadyRefunded,
}

/// What a provider's report (a refund or dispute webhook) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderReport {
    Recorded,
    /// Known already: nothing changed.
    AlreadyRecorded,
    /// About no payment of this node.
    UnknownPayment,
}

impl OrderEngine {
    /// Records durably that `id`'s payment is to be refunded, for the refund worker. Refused (for
    /// good) when the order was never paid here.
    pub async fn request_refund(&self, id: &OrderId, reason: &str) -> Result<RefundStart, OrderError> {
        {
            let mut state = self.state.lock();
            let mut order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            if order.status == OrderStatus::Refunded {
                return Ok(RefundStart::AlreadyRefunded);
            }
            if order.refund.as_ref().is_some_and(|r| r.state == RefundState::Pending) {
                return Ok(RefundStart::AlreadyPending);
            }
            let paid = order.payment.is_some()
                && matches!(order.status, OrderStatus::Delivered | OrderStatus::PaidAwaitingStock);
            if !paid {
                return Err(OrderError::NotRefundable("the order was not paid at this node"));
            }
            let now = now_millis();
            order.refund = Some(RefundRecord {
                state: RefundState::Pending,
                reason: reason.to_string(),
                requested_at: now,
                provider_refund: None,
                settled_at: None,
            });
            let mut batch = WriteBatch::default();
            let dequeued = leave_stock_queue(&state, &mut batch, &order);
            record::ORDERS.put(&mut batch, id.as_bytes(), &order)?;
            batch.put(record::refund_pending_key(id), now.0.to_be_bytes().to_vec());
            self.store.apply(batch)?;
            if let Some((sku, seq)) = dequeued {
                forget_queued(&mut state, &sku, seq);
            }
        }
        self.store.durable().await?;
        tracing::info!(order = %id, "refund requested");
        Ok(RefundStart::Started)
    }

    /// Orders whose refund waits for the provider.
    pub fn pending_refunds(&self) -> Result<Vec<OrderId>, StoreError> {
        let mut pending = Vec::new();
        for item in self.store.scan_prefix(record::REFUND_PENDING) {
            let (key, _) = item?;
            let id = record::order_id_from(&key[record::REFUND_PENDING.len()..])
                .ok_or_else(|| StoreError::Corrupt { key: "u/".into(), reason: "bad order id".into() })?;
            pending.push(id);
        }
        Ok(pending)
    }

    /// The provider refunded `id`'s payment (`provider_refund` names the refund), or, with
    /// `manual`, its channel has no refund call and the merchant refunds by hand: the order is
    /// `Refunded`, its keys revoked, the ledger told. Durable before returning. `false` when it
    /// was refunded already.
    pub async fn complete_refund(
        &self,
        id: &OrderId,
        provider_refund: Option<&str>,
        manual: bool,
    ) -> Result<bool, OrderError> {
        self.ensure_confirmed()?;
        let done = {
            let mut state = self.state.lock();
            let order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            self.refund_into(&mut state, order, provider_refund, manual)?
        };
        self.store.durable().await?;
        if done {
            self.metrics.refunded.inc();
            tracing::info!(order = %id, manual, "order refunded; its keys are revoked");
        }
        Ok(done)
    }

    /// Marks `order` refunded in one batch under the lock the caller holds. `false` (and only the
    /// index entry dropped) when it was refunded already.
    fn refund_into(
        &self,
        state: &mut State,
        mut order: OrderRecord,
        provider_refund: Option<&str>,
        manual: bool,
    ) -> Result<bool, OrderError> {
        let mut batch = WriteBatch::default();
        batch.delete(record::refund_pending_key(&order.id));
        if order.status == OrderStatus::Refunded {
            self.store.apply(batch)?;
            return Ok(false);
        }
        let payment = order.payment.clone().ok_or(OrderError::NotRefundable("the order was not paid at this node"))?;
        let now = now_millis();
        let mut refund = order.refund.take().unwrap_or(RefundRecord {
            state: RefundState::Pending,
            reason: REFUNDED_AT_PROVIDER.into(),
            requested_at: now,
            provider_refund: None,
            settled_at: None,
        });
        refund.state = if manual { RefundState::Manual } else { RefundState::Refunded };
        refund.provider_refund = provider_refund.map(str::to_string);
        refund.settled_at = Some(now);
        let dequeued = leave_stock_queue(state, &mut batch, &order);
        let mut key_ids: Vec<KeyId> = order.key_ids.clone();
        key_ids.sort_unstable();
        key_ids.dedup();
        order.status = OrderStatus::Refunded;
        // Revoked keys are never shown again.
        order.secrets.clear();
        order.refund = Some(refund);
        let event = OrderEventKind::Refunded {
            channel: payment.channel,
            provider_refund: provider_refund.unwrap_or_default().to_string(),
            amount_minor: payment.amount_minor,
            currency: payment.currency,
            manual,
            key_ids,
        };
        state.push_event(&mut batch, &self.node_id, &order, now, event)?;
        record::ORDERS.put(&mut batch, order.id.as_bytes(), &order)?;
        self.store.apply(batch)?;
        if let Some((sku, seq)) = dequeued {
            forget_queued(state, &sku, seq);
        }
        Ok(true)
    }

    /// A refund made at the provider of the payment `provider_payment` (reported by webhook):
    /// recorded like a refund asked for here.
    pub async fn record_provider_refund(
        &self,
        channel: &str,
        provider_payment: &str,
        provider_refund: &str,
    ) -> Result<ProviderReport, OrderError> {
        self.ensure_confirmed()?;
        let Some(id) = self.order_of_provider_payment(channel, provider_payment)? else {
            return Ok(ProviderReport::UnknownPayment);
        };
        match self.complete_refund(&id, Some(provider_refund), false).await? {
            true => Ok(ProviderReport::Recorded),
            false => Ok(ProviderReport::AlreadyRecorded),
        }
    }

    /// A dispute (chargeback) opened at the provider against the payment `provider_payment`:
    /// recorded on the order and reported to the ledger. The keys stay as they are: whether to
    /// revoke them is the merchant's call.
    pub async fn record_dispute(
        &self,
        channel: &str,
        provider_payment: &str,
        dispute: DisputeRecord,
    ) -> Result<ProviderReport, OrderError> {
        self.ensure_confirmed()?;
        let Some(id) = self.order_of_provider_payment(channel, provider_payment)? else {
            return Ok(ProviderReport::UnknownPayment);
        };
        {
            let mut state = self.state.lock();
            let mut order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            if order.dispute.as_ref().is_some_and(|d| d.provider_dispute == dispute.provider_dispute) {
                return Ok(ProviderReport::AlreadyRecorded);
            }
            let mut batch = WriteBatch::default();
            let event = OrderEventKind::Disputed {
                channel: channel.to_string(),
                provider_dispute: dispute.provider_dispute.clone(),
                amount_minor: dispute.amount_minor,
                currency: dispute.currency.clone(),
            };
            state.push_event(&mut batch, &self.node_id, &order, dispute.at, event)?;
            order.dispute = Some(dispute);
            record::ORDERS.put(&mut batch, id.as_bytes(), &order)?;
            self.store.apply(batch)?;
        }
        self.store.durable().await?;
        tracing::warn!(order = %id, channel, "payment disputed at the provider");
        Ok(ProviderReport::Recorded)
    }

    fn order_of_provider_payment(&self, channel: &str, provider_payment: &str) -> Result<Option<OrderId>, StoreError> {
        Ok(self
            .store
            .get(&record::provider_payment_key(channel, provider_payment))?
            .and_then(|raw| record::order_id_from(&raw)))
    }
}

/// Takes `order` out of the queue for stock, in `batch` (the caller forgets it in memory once the
/// batch is applied). Returns its sku and queue seq when it was queued.
fn leave_stock_queue(
    state: &State,
    batch: &mut WriteBatch,
    order: &OrderRecord,
) -> Option<(edgecard_protocol::Sku, u64)> {
    if order.status != OrderStatus::PaidAwaitingStock {
        return None;
    }
    let seq = state.awaiting.get(&order.sku)?.iter().find(|(_, id)| *id == order.id).map(|(seq, _)| *seq)?;
    batch.delete(record::awaiting_key(seq));
    Some((order.sku.clone(), seq))
}

fn forget_queued(state: &mut State, sku: &edgecard_protocol::Sku, seq: u64) {
    if let Some(queue) = state.awaiting.get_mut(sku) {
        queue.retain(|(queued, _)| *queued != seq);
    }
}
