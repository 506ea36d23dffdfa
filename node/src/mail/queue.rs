//! The durable mail queue: one record per (order, kind) under `q/`, written in the same store
//! batch as the order it is about, then advanced by the mail worker alone.
//!
//! A record never holds the address, a token or a key: the address is read from the order at
//! send time (so erasing it from the order stops the mail), and keys are rendered from the
//! delivered order then too.

use edgecard_protocol::{OrderId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, WriteBatch};

/// Prefix of the queue records: `q/`, order id (16 bytes), kind (1 byte).
pub const MAIL: &[u8] = b"q/";

pub const JOBS: edgecard_store::Table<MailJob> = edgecard_store::Table::new(MAIL, "mail job");

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
}

impl MailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::OrderLink => "order_link",
            MailKind::Keys => "keys",
        }
    }

    fn byte(self) -> u8 {
        match self {
            MailKind::OrderLink => 1,
            MailKind::Keys => 2,
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
    JOBS.put(batch, &job_key(order, kind), &job)
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
