//! "Find my order" at this node: mails the address a fresh link to each of this node's orders
//! made with it (found through `email_index.rs`, never by scanning orders).

use std::net::IpAddr;
use std::sync::Arc;

use super::engine::{normalize_email, now_millis, OrderEngine, OrderError};
use super::record;
use crate::limiter::RateLimited;
use crate::mail::find::{PendingLookup, ORDERS_PER_LOOKUP};
use crate::mail::queue::{self, MailKind};
use crate::store::WriteBatch;
use crate::storefront::i18n::Lang;

/// Why a lookup was refused. Neither says anything about orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindRefusal {
    /// Not an address.
    BadAddress,
    /// This client asked too often.
    RateLimited(RateLimited),
}

impl OrderEngine {
    /// A buyer's request at this node's storefront or API. Answers at once, before the lookup
    /// runs, so the answer and its timing are the same whether or not orders exist; an address
    /// over its limit is dropped silently. The lookup mails this node's orders and, where a
    /// coordinator is linked, is passed to it for the other nodes (with the next sync upload).
    pub fn find_orders(self: &Arc<Self>, raw: &str, lang: Lang, client: IpAddr) -> Result<(), FindRefusal> {
        let address = normalize_email(raw).map_err(|_| FindRefusal::BadAddress)?;
        self.finder.check_client(client).map_err(FindRefusal::RateLimited)?;
        if !self.finder.per_address.allow(&self.email_index.tag(&address), now_millis().0) {
            tracing::info!("find my order: address over its limit; dropped");
            return Ok(());
        }
        if !self.finder.push_pending(PendingLookup { email: address.clone(), lang: lang.tag().into() }) {
            tracing::debug!("find my order: not passed to a coordinator (none, or too many waiting)");
        }
        let engine = self.clone();
        tokio::spawn(async move {
            match engine.mail_orders_of(&address, lang).await {
                Ok(n) => tracing::info!(orders = n, "find my order: mails queued"),
                Err(e) => tracing::warn!(error = %e, "find my order: lookup failed"),
            }
        });
        Ok(())
    }

    /// Lookups are passed to the coordinator from now on (the sync link calls this at start).
    pub fn forward_lookups(&self) {
        self.finder.forward_lookups();
    }

    /// The lookups waiting to be passed to the coordinator, at most `max`, oldest first.
    pub fn take_pending_lookups(&self, max: usize) -> Vec<PendingLookup> {
        self.finder.take_pending(max)
    }

    /// Queues a "find my order" mail for each order of this node made with `address` (at most
    /// [`ORDERS_PER_LOOKUP`]), durably. A node without `[mail]` queues nothing. Returns how many.
    pub async fn mail_orders_of(&self, raw: &str, lang: Lang) -> Result<usize, OrderError> {
        if self.mail.get().is_none() {
            return Ok(0);
        }
        let address = normalize_email(raw)?;
        let now = now_millis();
        let queued = {
            // Under the state lock, so an erasure cannot slip between reading the order and
            // queueing its mail.
            let _state = self.state.lock();
            let mut batch = WriteBatch::default();
            let mut queued = 0;
            for id in self.email_index.orders(&self.store, &address, ORDERS_PER_LOOKUP)? {
                let Some(order) = record::ORDERS.get(&self.store, id.as_bytes())? else { continue };
                if order.email.as_deref() != Some(address.as_str()) {
                    continue;
                }
                queued += 1;
                match queue::JOBS.get(&self.store, &queue::job_key(&id, MailKind::Found))? {
                    // An earlier request's mail is still on its way: it carries the same link.
                    Some(job) if !job.status.is_final() => continue,
                    Some(job) => queue::remove(&mut batch, &job),
                    None => {}
                }
                queue::enqueue(&mut batch, &id, MailKind::Found, lang.tag(), now)?;
            }
            self.store.apply(batch)?;
            queued
        };
        self.store.durable().await?;
        Ok(queued)
    }
}
