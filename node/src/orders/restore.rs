//! Restoring what a data dir lost: the node's own events, sent back by the coordinator after the
//! dir was restored from an older copy, turned into the store changes that made them.
//!
//! Pure over a read view of the store: it returns one batch, which the engine applies together
//! with the new outbox position and then rebuilds its in-memory state from the store.
//!
//! What comes back: orders (with their token's digest, so the buyer's link works again; a
//! restored order's payment channel is the one its payment names), keys taken or delivered (no
//! longer on sale, delivered secrets moved into the order as a sale would), keys released to the
//! coordinator (dropped), payments that paid nothing (recorded again), refunds (the order refunded,
//! its keys not shown) and disputes. What cannot: the buyer's e-mail and address (events never carry them),
//! and the secret of a key whose slice the older copy never received (the order is restored
//! without it; its page says so).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use edgecard_protocol::{OrderEvent, OrderEventKind, OrderId, Secret};

use super::record::{
    self, DisputeRecord, OrderRecord, OrderStatus, PaymentProblem, PaymentProblemKind, PaymentRecord, RefundRecord,
    RefundState,
};
use crate::store::{Store, StoreError, WriteBatch};

/// The store changes that restore `events` (ascending, all past the outbox's newest).
pub struct Restored {
    pub batch: WriteBatch,
    pub orders: usize,
    /// Delivered keys whose secret this data dir does not hold.
    pub missing_secrets: usize,
}

pub fn restore_events(store: &Store, events: &[OrderEvent]) -> Result<Restored, StoreError> {
    let mut batch = WriteBatch::default();
    let mut orders: HashMap<OrderId, OrderRecord> = HashMap::new();
    let mut missing_secrets = 0;
    // Orders queued for stock by these events: their queue seq.
    let mut awaiting: HashMap<OrderId, u64> = HashMap::new();
    for event in events {
        let existing = match orders.remove(&event.order_id) {
            Some(order) => Some(order),
            None if event.order_id == OrderId::NONE => None,
            None => record::ORDERS.get(store, event.order_id.as_bytes())?,
        };
        match &event.kind {
            OrderEventKind::Reserved { key_ids, quantity, amount_minor, currency, expires_at, token_sha256 } => {
                let order = existing.unwrap_or_else(|| OrderRecord {
                    id: event.order_id,
                    sku: event.sku.clone(),
                    quantity: *quantity,
                    amount_minor: *amount_minor,
                    currency: currency.clone(),
                    channel: String::new(),
                    token_sha256: token_sha256.clone(),
                    email: None,
                    client_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    status: OrderStatus::Reserved,
                    created_at: event.at,
                    expires_at: *expires_at,
                    key_ids: key_ids.clone(),
                    secrets: Vec::new(),
                    payment: None,
                    delivered_at: None,
                    attempts: Vec::new(),
                    refund: None,
                    dispute: None,
                });
                batch.put(record::open_key(&order.id), expires_at.0.to_be_bytes().to_vec());
                orders.insert(order.id, order);
            }
            OrderEventKind::Paid { channel, provider_txn, amount_minor, currency } => {
                let Some(mut order) = existing else { continue };
                batch.put(record::callback_key(channel, provider_txn), order.id.as_bytes().to_vec());
                batch.delete(record::confirm_key(&order.id));
                order.channel.clone_from(channel);
                order.payment = Some(PaymentRecord {
                    channel: channel.clone(),
                    provider_txn: provider_txn.clone(),
                    amount_minor: *amount_minor,
                    currency: currency.clone(),
                    paid_at: event.at,
                    provider_payment: None,
                });
                orders.insert(order.id, order);
            }
            OrderEventKind::Delivered { key_ids } => {
                let Some(mut order) = existing else { continue };
                let mut secrets = Vec::with_capacity(key_ids.len());
                for key in key_ids {
                    let secret = store.get(&record::key_key(&order.sku, *key))?.and_then(|raw| {
                        record::decode_key_value(&raw)
                            .and_then(|(_, bytes)| std::str::from_utf8(bytes).ok())
                            .and_then(|s| Secret::new(s.to_string()).ok())
                    });
                    match secret {
                        Some(secret) => secrets.push(secret),
                        None => missing_secrets += 1,
                    }
                    batch.delete(record::key_key(&order.sku, *key));
                    batch.put(record::sold_key(&order.sku, *key), order.id.as_bytes().to_vec());
                }
                batch.delete(record::open_key(&order.id));
                batch.delete(record::confirm_key(&order.id));
                if order.status == OrderStatus::PaidAwaitingStock {
                    let queued = match awaiting.remove(&order.id) {
                        Some(seq) => Some(seq),
                        None => awaiting_seq_in_store(store, &order.id)?,
                    };
                    if let Some(seq) = queued {
                        batch.delete(record::awaiting_key(seq));
                    }
                }
                order.status = OrderStatus::Delivered;
                order.key_ids.clone_from(key_ids);
                order.secrets = secrets;
                order.delivered_at = Some(event.at);
                orders.insert(order.id, order);
            }
            OrderEventKind::Expired { .. } => {
                let Some(mut order) = existing else { continue };
                batch.delete(record::open_key(&order.id));
                batch.delete(record::confirm_key(&order.id));
                order.status = OrderStatus::Expired;
                orders.insert(order.id, order);
            }
            OrderEventKind::AwaitingStock { .. } => {
                let Some(mut order) = existing else { continue };
                batch.delete(record::open_key(&order.id));
                batch.put(record::awaiting_key(event.seq), order.id.as_bytes().to_vec());
                awaiting.insert(order.id, event.seq);
                order.status = OrderStatus::PaidAwaitingStock;
                order.key_ids.clear();
                orders.insert(order.id, order);
            }
            OrderEventKind::Released { key_ids, .. } => {
                for key in key_ids {
                    batch.delete(record::key_key(&event.sku, *key));
                }
            }
            OrderEventKind::PaymentUnmatched { channel, provider_txn, amount_minor, currency, reason } => {
                let problem = PaymentProblem {
                    order_id: event.order_id,
                    channel: channel.clone(),
                    provider_txn: provider_txn.clone(),
                    amount_minor: *amount_minor,
                    currency: currency.clone(),
                    kind: (*reason).into(),
                    at: event.at,
                };
                put_problem(&mut batch, &problem)?;
                if let Some(order) = existing {
                    orders.insert(order.id, order);
                }
            }
            OrderEventKind::PaymentMismatch { channel, provider_txn, amount_minor, currency } => {
                let Some(order) = existing else { continue };
                let kind = if *amount_minor != order.amount_minor {
                    PaymentProblemKind::AmountMismatch
                } else {
                    PaymentProblemKind::CurrencyMismatch
                };
                let problem = PaymentProblem {
                    order_id: order.id,
                    channel: channel.clone(),
                    provider_txn: provider_txn.clone(),
                    amount_minor: *amount_minor,
                    currency: currency.clone(),
                    kind,
                    at: event.at,
                };
                put_problem(&mut batch, &problem)?;
                orders.insert(order.id, order);
            }
            OrderEventKind::Refunded { provider_refund, manual, .. } => {
                let Some(mut order) = existing else { continue };
                if order.status == OrderStatus::PaidAwaitingStock {
                    let queued = match awaiting.remove(&order.id) {
                        Some(seq) => Some(seq),
                        None => awaiting_seq_in_store(store, &order.id)?,
                    };
                    if let Some(seq) = queued {
                        batch.delete(record::awaiting_key(seq));
                    }
                }
                batch.delete(record::refund_pending_key(&order.id));
                let reason = order.refund.take().map_or_else(|| "restored from the ledger".to_string(), |r| r.reason);
                order.refund = Some(RefundRecord {
                    state: if *manual { RefundState::Manual } else { RefundState::Refunded },
                    reason,
                    requested_at: event.at,
                    provider_refund: (!provider_refund.is_empty()).then(|| provider_refund.clone()),
                    settled_at: Some(event.at),
                });
                order.status = OrderStatus::Refunded;
                order.secrets.clear();
                orders.insert(order.id, order);
            }
            OrderEventKind::Disputed { provider_dispute, amount_minor, currency, .. } => {
                let Some(mut order) = existing else { continue };
                order.dispute = Some(DisputeRecord {
                    provider_dispute: provider_dispute.clone(),
                    amount_minor: *amount_minor,
                    currency: currency.clone(),
                    at: event.at,
                });
                orders.insert(order.id, order);
            }
        }
    }
    let restored = orders.len();
    for order in orders.values() {
        record::ORDERS.put(&mut batch, order.id.as_bytes(), order)?;
    }
    Ok(Restored { batch, orders: restored, missing_secrets })
}

fn put_problem(batch: &mut WriteBatch, problem: &PaymentProblem) -> Result<(), StoreError> {
    let id = record::problem_id(
        &problem.channel,
        &problem.provider_txn,
        &problem.order_id,
        problem.amount_minor,
        &problem.currency,
    );
    record::PAYMENT_PROBLEMS.put(batch, &id, problem)
}

/// The queue seq of a paid order waiting for stock in the store (the queue is short).
fn awaiting_seq_in_store(store: &Store, id: &OrderId) -> Result<Option<u64>, StoreError> {
    for item in store.scan_prefix(record::AWAITING) {
        let (key, value) = item?;
        if record::order_id_from(&value) == Some(*id) {
            return Ok(record::be_u64(&key[record::AWAITING.len()..]));
        }
    }
    Ok(None)
}
