//! Erasing a buyer's address from orders: when the mail retention runs out, or when the merchant
//! is asked to (`POST /admin/v1/mail/forget`).

use edgecard_protocol::OrderId;

use super::engine::{normalize_email, OrderEngine, OrderError};
use super::record;
use crate::store::WriteBatch;

impl OrderEngine {
    /// Removes the address from order `id`, together with whatever `batch` already holds (the
    /// order's mail queue records), in one durable batch. Returns whether the order had one.
    /// Open-reservation caps count from memory, so an open order's cap is released as before.
    pub async fn forget_email(&self, id: &OrderId, mut batch: WriteBatch) -> Result<bool, OrderError> {
        let had = {
            let _state = self.state.lock();
            let mut order = record::ORDERS.get(&self.store, id.as_bytes())?.ok_or(OrderError::NotFound)?;
            let had = match order.email.take() {
                Some(address) => {
                    batch.delete(self.email_index.entry_key(&address, id));
                    true
                }
                None => false,
            };
            if had {
                record::ORDERS.put(&mut batch, id.as_bytes(), &order)?;
            }
            self.store.apply(batch)?;
            had
        };
        self.store.durable().await?;
        Ok(had)
    }

    /// The orders that hold `address` (compared as normalized). A scan of every order: for the
    /// merchant's erasure requests, not for a hot path.
    pub fn orders_with_email(&self, address: &str) -> Result<Vec<OrderId>, OrderError> {
        let wanted = normalize_email(address)?;
        let mut found = Vec::new();
        for item in self.store.scan_prefix(record::ORDER) {
            let (_, raw) = item?;
            let order = record::ORDERS.decode(&raw)?;
            if order.email.as_deref() == Some(wanted.as_str()) {
                found.push(order.id);
            }
        }
        Ok(found)
    }
}
