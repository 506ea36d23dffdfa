//! The durable mail queue: one record per (order, kind) under `q/`, written in the same store
//! batch as the order it is about, then advanced by the mail worker alone.
//!
//! A record never holds the address, a token or a key: the address is read from the order at
//! send time (so erasing it from the order stops the mail), and keys are rendered from the
//! delivered order then too.
//!
//! Two indexes keep the worker's passes small however many mails were sent: `qp/` names the
//! mails not yet final (what a pass walks), `qr/` the final ones by when they became final (what
//! the retention sweep walks, oldest first, only as far as is due).

use edgecard_protocol::{OrderId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, WriteBatch};

/// Prefix of the queue records: `q/`, order id (16 bytes), kind (1 byte).
pub const MAIL: &[u8] = b"q/";

pub const JOBS: edgecard_store::Table<MailJob> = edgecard_store::Table::new(MAIL, "mail job");
/// `qp/`, order id, kind: empty; the job is not final yet.
pub const PENDING: &[u8] = b"qp/";
/// `qr/`, finished at (unix ms, 8 bytes BE), order id, kind: empty; the job became final then.
pub const FINISHED: &[u8] = b"qr/";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MailKind {
    /// Sent when the order is made: the link to its page (status, pay link, keys once delivered).
    OrderLink,
    /// Sent once the order is delivered, with the keys in it: only where the merchant opted in
    /// (`mail.include_keys`).
    Keys,
    /// Sent when the buyer asks "find my order" with this order's address: a fresh link to it.
    /// Queued again by each such request (the previous one being final).
    Found,
}

impl MailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::OrderLink => "order_link",
            MailKind::Keys => "keys",
            MailKind::Found => "find_order",
        }
    }

    fn byte(self) -> u8 {
        match self {
            MailKind::OrderLink => 1,
            MailKind::Keys => 2,
            MailKind::Found => 3,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MailStatus {
    /// Not tried yet (a keys mail waits here for its order's delivery).
    Queued,
    /// Tried and failed for a passing reason; tried again at `next_attempt_at`.
    Retrying,
    /// The SMTP server took it.
    Sent,
    /// Given up: refused for good by the server, or out of attempts.
    Failed,
    /// Not to be sent: the order never got delivered, or its address was erased.
    Cancelled,
}

impl MailStatus {
    pub const ALL: [MailStatus; 5] =
        [MailStatus::Queued, MailStatus::Retrying, MailStatus::Sent, MailStatus::Failed, MailStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            MailStatus::Queued => "queued",
            MailStatus::Retrying => "retrying",
            MailStatus::Sent => "sent",
            MailStatus::Failed => "failed",
            MailStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, MailStatus::Sent | MailStatus::Failed | MailStatus::Cancelled)
    }
}

/// One mail to send about one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MailJob {
    pub order_id: OrderId,
    pub kind: MailKind,
    /// The buyer's language when the order was made (`en`, `zh-CN`).
    pub lang: String,
    pub status: MailStatus,
    /// SMTP attempts made so far.
    pub attempts: u32,
    pub queued_at: UnixMillis,
    pub next_attempt_at: UnixMillis,
    /// When it reached a final status.
    pub finished_at: Option<UnixMillis>,
    /// Why the last attempt failed, as a class (`connect`, `timeout`, `tls`, `smtp 451`): never the
    /// server's text, which may quote the address.
    pub last_error: Option<String>,
}

pub fn job_key(order: &OrderId, kind: MailKind) -> Vec<u8> {
    let mut id = order.as_bytes().to_vec();
    id.push(kind.byte());
    id
}

fn pending_key(order: &OrderId, kind: MailKind) -> Vec<u8> {
    [PENDING, &job_key(order, kind)].concat()
}

fn finished_key(at: UnixMillis, order: &OrderId, kind: MailKind) -> Vec<u8> {
    [FINISHED, &at.0.to_be_bytes()[..], &job_key(order, kind)].concat()
}

/// Writes `job` and keeps the indexes in step with its status.
pub fn save(batch: &mut WriteBatch, job: &MailJob) -> Result<(), StoreError> {
    JOBS.put(batch, &job_key(&job.order_id, job.kind), job)?;
    match (job.status.is_final(), job.finished_at) {
        (true, Some(at)) => {
            batch.delete(pending_key(&job.order_id, job.kind));
            batch.put(finished_key(at, &job.order_id, job.kind), Vec::new());
        }
        _ => batch.put(pending_key(&job.order_id, job.kind), Vec::new()),
    }
    Ok(())
}

/// Removes `job` and its index entries.
pub fn remove(batch: &mut WriteBatch, job: &MailJob) {
    batch.delete(JOBS.key(&job_key(&job.order_id, job.kind)));
    batch.delete(pending_key(&job.order_id, job.kind));
    if let Some(at) = job.finished_at {
        batch.delete(finished_key(at, &job.order_id, job.kind));
    }
}

/// The (order, kind) named by an index key's last 17 bytes.
fn named_by(key: &[u8]) -> Option<(OrderId, MailKind)> {
    let tail = key.len().checked_sub(17).map(|at| &key[at..])?;
    let order = OrderId::from_bytes(tail[..16].try_into().ok()?);
    let kind = match tail[16] {
        1 => MailKind::OrderLink,
        2 => MailKind::Keys,
        3 => MailKind::Found,
        _ => return None,
    };
    Some((order, kind))
}

/// The jobs not yet final.
pub fn pending_jobs(store: &Store) -> Result<Vec<MailJob>, StoreError> {
    let mut jobs = Vec::new();
    for item in store.scan_prefix(PENDING) {
        let (key, _) = item?;
        let Some((order, kind)) = named_by(&key) else { continue };
        if let Some(job) = JOBS.get(store, &job_key(&order, kind))? {
            jobs.push(job);
        }
    }
    Ok(jobs)
}

/// A retention entry: its key, and the order it names (`None` for a key that names none).
pub type FinishedEntry = (Vec<u8>, Option<OrderId>);

/// Retention entries of mails that became final at or before `until`, oldest first, at most
/// `limit`.
pub fn finished_entries(store: &Store, until: UnixMillis, limit: usize) -> Result<Vec<FinishedEntry>, StoreError> {
    let mut entries = Vec::new();
    for item in store.scan_prefix(FINISHED) {
        let (key, _) = item?;
        let at = key.get(FINISHED.len()..FINISHED.len() + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        if at.is_some_and(|at| at > until.0) || entries.len() >= limit {
            break;
        }
        let order = named_by(&key).map(|(order, _)| order);
        entries.push((key, order));
    }
    Ok(entries)
}

/// Adds a fresh job for `order` to `batch` (the batch that creates the order).
pub fn enqueue(
    batch: &mut WriteBatch,
    order: &OrderId,
    kind: MailKind,
    lang: &str,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let job = MailJob {
        order_id: *order,
        kind,
        lang: lang.to_string(),
        status: MailStatus::Queued,
        attempts: 0,
        queued_at: now,
        next_attempt_at: now,
        finished_at: None,
        last_error: None,
    };
    save(batch, &job)
}

/// Every job, in key order (so an order's jobs are together).
pub fn all_jobs(store: &Store) -> Result<Vec<MailJob>, StoreError> {
    let mut jobs = Vec::new();
    for item in store.scan_prefix(MAIL) {
        let (_, raw) = item?;
        jobs.push(JOBS.decode(&raw)?);
    }
    Ok(jobs)
}

/// The jobs of one order.
pub fn jobs_of(store: &Store, order: &OrderId) -> Result<Vec<MailJob>, StoreError> {
    let mut prefix = MAIL.to_vec();
    prefix.extend_from_slice(order.as_bytes());
    let mut jobs = Vec::new();
    for item in store.scan_prefix(&prefix) {
        let (_, raw) = item?;
        jobs.push(JOBS.decode(&raw)?);
    }
    Ok(jobs)
}

/// How long to wait after the `attempts`-th failed attempt: doubling from `first_ms`, at most
/// `max_ms`.
pub fn backoff_ms(attempts: u32, first_ms: u64, max_ms: u64) -> u64 {
    let doublings = attempts.saturating_sub(1).min(32);
    first_ms.saturating_mul(1u64 << doublings).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_ms(1, 1_000, 60_000), 1_000);
        assert_eq!(backoff_ms(2, 1_000, 60_000), 2_000);
        assert_eq!(backoff_ms(4, 1_000, 60_000), 8_000);
        assert_eq!(backoff_ms(7, 1_000, 60_000), 60_000);
        assert_eq!(backoff_ms(u32::MAX, 1_000, 60_000), 60_000);
    }

    #[test]
    fn the_indexes_follow_a_job_from_queued_to_removed() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), 1 << 20, Arc::new(crate::metrics::StoreMetrics::default()))
            .unwrap_or_else(|e| panic!("{e}"));
        let order = OrderId::random();
        let mut batch = WriteBatch::default();
        enqueue(&mut batch, &order, MailKind::OrderLink, "en", UnixMillis(1)).unwrap_or_else(|e| panic!("{e}"));
        store.apply(batch).unwrap_or_else(|e| panic!("{e}"));
        let pending = pending_jobs(&store).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pending.len(), 1);
        assert!(finished_entries(&store, UnixMillis(u64::MAX), 10).unwrap_or_default().is_empty());

        let mut sent = pending[0].clone();
        sent.status = MailStatus::Sent;
        sent.finished_at = Some(UnixMillis(5_000));
        let mut batch = WriteBatch::default();
        save(&mut batch, &sent).unwrap_or_else(|e| panic!("{e}"));
        store.apply(batch).unwrap_or_else(|e| panic!("{e}"));
        assert!(pending_jobs(&store).unwrap_or_default().is_empty(), "a sent mail is not pending");
        assert!(finished_entries(&store, UnixMillis(4_999), 10).unwrap_or_default().is_empty(), "not due yet");
        let due = finished_entries(&store, UnixMillis(5_000), 10).unwrap_or_default();
        assert_eq!(due.iter().map(|(_, o)| *o).collect::<Vec<_>>(), vec![Some(order)]);

        let mut batch = WriteBatch::default();
        remove(&mut batch, &sent);
        store.apply(batch).unwrap_or_else(|e| panic!("{e}"));
        assert!(jobs_of(&store, &order).unwrap_or_default().is_empty());
        assert!(finished_entries(&store, UnixMillis(u64::MAX), 10).unwrap_or_default().is_empty());
    }

    #[test]
    fn a_job_round_trips_and_its_key_names_order_and_kind() {
        let order = OrderId::random();
        let mut batch = WriteBatch::default();
        enqueue(&mut batch, &order, MailKind::Keys, "zh-CN", UnixMillis(5)).unwrap_or_else(|e| panic!("{e}"));
        let key = JOBS.key(&job_key(&order, MailKind::Keys));
        assert_eq!(key.len(), MAIL.len() + 17);
        assert_eq!(key[MAIL.len()..MAIL.len() + 16], order.as_bytes()[..]);
        assert_ne!(job_key(&order, MailKind::Keys), job_key(&order, MailKind::OrderLink));
    }
}
