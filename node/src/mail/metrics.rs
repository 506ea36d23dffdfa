//! `edgecard_mail_*`: mails by kind and outcome, retries, and the queue's depth. Labels are fixed
//! enumerations (kind, status): never an order, an address or a server's text.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::queue::{MailKind, MailStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindStatus {
    kind: &'static str,
    status: &'static str,
}

#[derive(Debug, Default)]
pub struct MailMetrics {
    /// Mails that reached a final status (sent, failed, cancelled), by kind.
    finished: Family<KindStatus, Counter>,
    /// Attempts that failed for a passing reason and will be retried.
    pub retries: Counter,
    /// Mails not yet final (queued, waiting for delivery, or retrying), as of the worker's last pass.
    pub pending: Gauge,
}

impl MailMetrics {
    pub fn finished(&self, kind: MailKind, status: MailStatus) {
        self.finished.get_or_create(&KindStatus { kind: kind.as_str(), status: status.as_str() }).inc();
    }

    pub fn finished_count(&self, kind: MailKind, status: MailStatus) -> u64 {
        self.finished.get_or_create(&KindStatus { kind: kind.as_str(), status: status.as_str() }).get()
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgecard_mail_finished",
            "Order mails that reached a final status, by kind (order_link, keys) and status (sent, failed, cancelled)",
            self.finished.clone(),
        );
        r.register(
            "edgecard_mail_retries",
            "SMTP attempts that failed for a passing reason and will be retried",
            self.retries.clone(),
        );
        r.register("edgecard_mail_pending", "Order mails not yet sent, failed or cancelled", self.pending.clone());
    }
}
