//! The mail worker: walks the queue (`q/`), sends what is due, records each outcome durably, and
//! erases addresses whose retention ran out.
//!
//! Delivery is at least once: a job is marked sent only after the server took the message, so a
//! crash in between sends it again, with the same Message-ID. [`MailWorker::tick`] takes the
//! time, so tests drive it; [`spawn`] runs it on the node's clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use edgecard_protocol::{OrderId, UnixMillis};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::MailConfig;
use super::metrics::MailMetrics;
use super::queue::{self, MailJob, MailKind, MailStatus};
use super::smtp::{Outgoing, SendFailure, SmtpSender};
use super::template::{self, MailContent};
use crate::orders::engine::now_millis;
use crate::orders::{OrderEngine, OrderError, OrderRecord, OrderStatus};
use crate::payments::return_link::ReturnLinks;
use crate::store::{StoreError, WriteBatch};
use crate::storefront::i18n::Lang;

const DAY_MS: u64 = 86_400_000;
/// Most retention entries looked at per pass, so one pass stays short after a long pause.
const SWEEP_LIMIT: usize = 1_000;

pub struct MailWorker {
    pub engine: Arc<OrderEngine>,
    pub sender: SmtpSender,
    pub config: MailConfig,
    /// Mints the links in mails (return links, valid `link_ttl_days` from the order's creation).
    pub links: ReturnLinks,
    pub public_url: String,
    pub metrics: Arc<MailMetrics>,
}

/// What to do with a job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send,
    /// Not yet (a keys mail whose order is not delivered yet).
    Wait,
    /// Never: the order is gone, has no address any more, or will not be delivered.
    Cancel(&'static str),
}

/// Whether `job` is to be sent now, given its order as stored.
pub fn step_for(job: &MailJob, order: Option<&OrderRecord>) -> Step {
    let Some(order) = order else { return Step::Cancel("order_missing") };
    if order.email.is_none() {
        return Step::Cancel("address_erased");
    }
    match (job.kind, order.status) {
        (MailKind::OrderLink | MailKind::Found, _) => Step::Send,
        (MailKind::Keys, OrderStatus::Delivered) => Step::Send,
        (MailKind::Keys, OrderStatus::Reserved | OrderStatus::PaidAwaitingStock) => Step::Wait,
        (MailKind::Keys, OrderStatus::Expired | OrderStatus::Refunded) => Step::Cancel("not_delivered"),
    }
}

/// The job after a failed attempt: retried after a doubling pause, or failed for good once the
/// server refused it outright or the attempts ran out.
pub fn after_failure(mut job: MailJob, failure: &SendFailure, config: &MailConfig, now: UnixMillis) -> MailJob {
    job.attempts = job.attempts.saturating_add(1);
    job.last_error = Some(failure.class.clone());
    if !failure.transient || job.attempts >= config.max_attempts {
        job.status = MailStatus::Failed;
        job.finished_at = Some(now);
    } else {
        job.status = MailStatus::Retrying;
        let pause = queue::backoff_ms(
            job.attempts,
            config.first_retry_secs.saturating_mul(1000),
            config.max_retry_secs.saturating_mul(1000),
        );
        job.next_attempt_at = now.saturating_add_ms(pause);
    }
    job
}

/// Whether an order's address and queue records may go: every one of its mails is done, the
/// last for at least `keep_ms`.
pub fn retention_over(jobs: &[MailJob], keep_ms: u64, now: UnixMillis) -> bool {
    !jobs.is_empty()
        && jobs
            .iter()
            .all(|j| j.status.is_final() && j.finished_at.is_some_and(|at| at.saturating_add_ms(keep_ms) <= now))
}

/// `<{order}.{kind}@{domain}>`: the same for every attempt at the same mail.
pub fn message_id(order: &OrderId, kind: MailKind, domain: &str) -> String {
    format!("<{order}.{}@{domain}>", kind.as_str().replace('_', "-"))
}

/// The Message-ID of `job`: a "find my order" mail is a new message per request (its queue time
/// tells requests apart), the same for every attempt at it.
pub fn message_id_of(job: &MailJob, domain: &str) -> String {
    match job.kind {
        MailKind::Found => format!("<{}.find-order-{}@{domain}>", job.order_id, job.queued_at.0),
        kind => message_id(&job.order_id, kind, domain),
    }
}

/// Until when (unix seconds) the link in `job`'s mail works: `ttl_days` from the order's
/// creation for the mails sent then, from the request for a "find my order" mail (a fresh link,
/// however old the order).
pub fn link_expiry(job: &MailJob, order_created: UnixMillis, ttl_days: u64) -> u64 {
    let from = match job.kind {
        MailKind::Found => job.queued_at,
        MailKind::OrderLink | MailKind::Keys => order_created,
    };
    (from.0 / 1000).saturating_add(ttl_days.saturating_mul(86_400))
}

impl MailWorker {
    /// One pass over the queue at `now`. Errors are the store's: the pass stops there.
    pub async fn tick(&self, now: UnixMillis) -> Result<(), StoreError> {
        let pending = queue::pending_jobs(self.engine.store())?;
        self.metrics.pending.set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        for job in pending {
            if job.next_attempt_at <= now {
                self.attempt(job, now).await?;
            }
        }
        self.sweep(now).await
    }

    /// Erases the addresses whose retention is over: walks the retention index up to
    /// `now - keep_email_days`. An order that still has a mail to wait for loses only the entry
    /// (its last mail brings its own).
    async fn sweep(&self, now: UnixMillis) -> Result<(), StoreError> {
        let keep_ms = self.config.keep_email_days.saturating_mul(DAY_MS);
        let until = UnixMillis(now.0.saturating_sub(keep_ms));
        let mut done = BTreeSet::new();
        for (key, order) in queue::finished_entries(self.engine.store(), until, SWEEP_LIMIT)? {
            if let Some(order) = order {
                if done.contains(&order) {
                    continue;
                }
                let jobs = queue::jobs_of(self.engine.store(), &order)?;
                if retention_over(&jobs, keep_ms, now) {
                    self.expire(&order, &jobs).await?;
                    done.insert(order);
                    continue;
                }
            }
            let mut batch = WriteBatch::default();
            batch.delete(key);
            self.engine.store().apply(batch)?;
        }
        Ok(())
    }

    async fn attempt(&self, job: MailJob, now: UnixMillis) -> Result<(), StoreError> {
        let order = match self.engine.lookup_authorized(&job.order_id).await {
            Ok(order) => Some(order),
            Err(OrderError::NotFound) => None,
            Err(OrderError::Store(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let (order, address) = match step_for(&job, order.as_ref()) {
            Step::Wait => return Ok(()),
            Step::Cancel(why) => {
                tracing::info!(order = %job.order_id, kind = job.kind.as_str(), reason = why, "mail cancelled");
                self.metrics.finished(job.kind, MailStatus::Cancelled);
                let mut job = job;
                job.status = MailStatus::Cancelled;
                job.finished_at = Some(now);
                job.last_error = Some(why.into());
                return self.save(&job).await;
            }
            Step::Send => match order {
                Some(order) => {
                    let address = order.email.clone().unwrap_or_default();
                    (order, address)
                }
                None => return Ok(()),
            },
        };
        let outgoing = self.compose(&job, &order, address);
        match self.sender.send(&outgoing).await {
            Ok(()) => {
                let mut job = job;
                job.attempts = job.attempts.saturating_add(1);
                job.status = MailStatus::Sent;
                job.finished_at = Some(now);
                job.last_error = None;
                tracing::info!(order = %job.order_id, kind = job.kind.as_str(), attempts = job.attempts, "mail sent");
                self.metrics.finished(job.kind, MailStatus::Sent);
                self.save(&job).await
            }
            Err(failure) => {
                let job = after_failure(job, &failure, &self.config, now);
                if job.status == MailStatus::Failed {
                    tracing::warn!(order = %job.order_id, kind = job.kind.as_str(), class = %failure.class,
                        attempts = job.attempts, "mail failed for good");
                    self.metrics.finished(job.kind, MailStatus::Failed);
                } else {
                    tracing::info!(order = %job.order_id, kind = job.kind.as_str(), class = %failure.class,
                        attempts = job.attempts, "mail attempt failed; will retry");
                    self.metrics.retries.inc();
                }
                self.save(&job).await
            }
        }
    }

    fn compose(&self, job: &MailJob, order: &OrderRecord, to: String) -> Outgoing {
        let lang = if job.lang == Lang::ZhCn.tag() { Lang::ZhCn } else { Lang::En };
        let item = self.engine.catalog().get(&order.sku).map_or_else(
            || order.sku.to_string(),
            |p| p.title.get(lang.tag()).or_else(|| p.title.get("en")).cloned().unwrap_or_else(|| order.sku.to_string()),
        );
        let total = crate::storefront::money::format_price(order.amount_minor, &order.currency, lang);
        let expires = link_expiry(job, order.created_at, self.config.link_ttl_days);
        let link = self.links.url_until(&self.public_url, &order.id, expires);
        let until = crate::time_fmt::rfc3339(UnixMillis(expires.saturating_mul(1000)));
        let until = format!("{} UTC", until.get(..16).unwrap_or(&until).replace('T', " "));
        let keys: Vec<&str> = match job.kind {
            MailKind::Keys => order.secrets.iter().map(|s| s.expose()).collect(),
            MailKind::OrderLink | MailKind::Found => Vec::new(),
        };
        let order_id = order.id.to_string();
        let rendered = template::render(&MailContent {
            kind: job.kind,
            lang: lang.tag(),
            shop: &self.config.shop_name,
            order_id: &order_id,
            item: &item,
            quantity: order.quantity,
            total: &total,
            link: &link,
            link_until: &until,
            keys: &keys,
        });
        Outgoing {
            to,
            subject: rendered.subject,
            body: rendered.body,
            message_id: message_id_of(job, &self.sender.from_domain()),
        }
    }

    async fn save(&self, job: &MailJob) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        queue::save(&mut batch, job)?;
        self.engine.store().apply(batch)?;
        self.engine.store().durable().await
    }

    /// Retention is over: the address leaves the order, the queue records go, in one batch.
    async fn expire(&self, order_id: &OrderId, jobs: &[MailJob]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for job in jobs {
            queue::remove(&mut batch, job);
        }
        match self.engine.forget_email(order_id, batch).await {
            Ok(_) => {
                tracing::info!(order = %order_id, "mail retention over: address erased");
                Ok(())
            }
            Err(OrderError::Store(e)) => Err(e),
            Err(e) => {
                tracing::warn!(order = %order_id, error = %e, "mail retention: cannot erase the address");
                Ok(())
            }
        }
    }
}

/// Runs the worker every `poll_ms` until shutdown.
pub fn spawn(worker: MailWorker, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(worker.config.poll_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    if let Err(e) = worker.tick(now_millis()).await {
                        tracing::error!(error = %e, "mail: cannot read or write the queue");
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MailConfig {
        toml::from_str("smtp_host = \"localhost\"\nfrom = \"shop@example.com\"\nmax_attempts = 3\nfirst_retry_secs = 10\nmax_retry_secs = 25")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn job(kind: MailKind) -> MailJob {
        MailJob {
            order_id: OrderId::random(),
            kind,
            lang: "en".into(),
            status: MailStatus::Queued,
            attempts: 0,
            queued_at: UnixMillis(0),
            next_attempt_at: UnixMillis(0),
            finished_at: None,
            last_error: None,
        }
    }

    #[test]
    fn transient_failures_back_off_then_fail_after_the_last_attempt() {
        let config = config();
        let busy = SendFailure { class: "smtp 451".into(), transient: true };
        let first = after_failure(job(MailKind::OrderLink), &busy, &config, UnixMillis(1_000));
        assert_eq!((first.status, first.next_attempt_at), (MailStatus::Retrying, UnixMillis(11_000)));
        let second = after_failure(first, &busy, &config, UnixMillis(11_000));
        assert_eq!((second.status, second.next_attempt_at), (MailStatus::Retrying, UnixMillis(31_000)));
        let third = after_failure(second, &busy, &config, UnixMillis(31_000));
        assert_eq!(
            (third.status, third.attempts, third.finished_at),
            (MailStatus::Failed, 3, Some(UnixMillis(31_000)))
        );
        assert_eq!(third.last_error.as_deref(), Some("smtp 451"));
    }

    #[test]
    fn a_permanent_refusal_fails_at_once() {
        let refused = SendFailure { class: "smtp 550".into(), transient: false };
        let failed = after_failure(job(MailKind::OrderLink), &refused, &config(), UnixMillis(5));
        assert_eq!((failed.status, failed.attempts), (MailStatus::Failed, 1));
    }

    #[test]
    fn keys_wait_for_delivery_and_nothing_goes_without_an_address() {
        let mut order = OrderRecord::for_tests("sandbox", 1, 100, "USD");
        order.email = Some("buyer@example.com".into());
        assert_eq!(step_for(&job(MailKind::OrderLink), Some(&order)), Step::Send);
        assert_eq!(step_for(&job(MailKind::Keys), Some(&order)), Step::Wait);
        order.status = OrderStatus::Delivered;
        assert_eq!(step_for(&job(MailKind::Keys), Some(&order)), Step::Send);
        order.status = OrderStatus::Expired;
        assert_eq!(step_for(&job(MailKind::Keys), Some(&order)), Step::Cancel("not_delivered"));
        order.email = None;
        assert_eq!(step_for(&job(MailKind::OrderLink), Some(&order)), Step::Cancel("address_erased"));
        assert_eq!(step_for(&job(MailKind::OrderLink), None), Step::Cancel("order_missing"));
    }

    #[test]
    fn retention_waits_for_every_mail_of_the_order() {
        let mut sent = job(MailKind::OrderLink);
        sent.status = MailStatus::Sent;
        sent.finished_at = Some(UnixMillis(1_000));
        assert!(!retention_over(std::slice::from_ref(&sent), 500, UnixMillis(1_400)));
        assert!(retention_over(std::slice::from_ref(&sent), 500, UnixMillis(1_500)));
        let waiting = job(MailKind::Keys);
        assert!(!retention_over(&[sent, waiting], 500, UnixMillis(9_999)));
    }

    #[test]
    fn a_find_order_mail_is_a_new_message_per_request_with_a_fresh_link() {
        let mut first = job(MailKind::Found);
        first.queued_at = UnixMillis(10_000_000);
        let mut second = first.clone();
        second.queued_at = UnixMillis(20_000_000);
        assert_ne!(message_id_of(&first, "example.com"), message_id_of(&second, "example.com"));
        let mut retried = first.clone();
        retried.attempts = 3;
        assert_eq!(message_id_of(&first, "example.com"), message_id_of(&retried, "example.com"));
        assert_eq!(link_expiry(&first, UnixMillis(0), 1), 10_000 + 86_400, "from the request");
        let link = job(MailKind::OrderLink);
        assert_eq!(link_expiry(&link, UnixMillis(5_000_000), 1), 5_000 + 86_400, "from the order");
        let order = OrderRecord::for_tests("sandbox", 1, 100, "USD");
        assert_eq!(step_for(&first, Some(&order)), Step::Cancel("address_erased"));
    }

    #[test]
    fn the_message_id_is_stable_per_order_and_kind() {
        let order = OrderId::random();
        let a = message_id(&order, MailKind::OrderLink, "example.com");
        assert_eq!(a, message_id(&order, MailKind::OrderLink, "example.com"));
        assert_ne!(a, message_id(&order, MailKind::Keys, "example.com"));
        assert!(a.starts_with('<') && a.ends_with("@example.com>"));
    }
}
