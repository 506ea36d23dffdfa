//! Order mail: a mail with the order's link to the address the buyer gave, and, where the
//! merchant opts in (`mail.include_keys`), one with the keys once delivered.
//!
//! The purchase path only adds queue records (`queue.rs`) to the batch that creates the order;
//! it never talks to SMTP. The worker (`worker.rs`) sends from the queue, at least once, with a
//! Message-ID stable per (order, kind), retrying with a capped doubling backoff; each mail's
//! status is on the admin API (`admin.rs`) and in `edgecard_mail_*` metrics. The link is a
//! return link (`payments::return_link`) valid `mail.link_ttl_days` from the order's creation:
//! the order's token is stored only hashed, so the mail cannot carry it. Keys are rendered from
//! the delivered order at send time and never stored in the queue.

pub mod admin;
pub mod config;
pub mod find;
pub mod metrics;
pub mod queue;
pub mod smtp;
pub mod template;
pub mod worker;

pub use config::MailConfig;

/// What the purchase path needs to queue mails: set once at start when `[mail]` is configured.
#[derive(Debug, Clone)]
pub struct Queueing {
    pub include_keys: bool,
    /// Language of mails for orders made without one (the JSON API).
    pub default_language: String,
}

impl Queueing {
    /// Adds the order's mail jobs to the batch that creates it.
    pub fn enqueue(
        &self,
        batch: &mut crate::store::WriteBatch,
        order: &edgecard_protocol::OrderId,
        lang: Option<&str>,
        now: edgecard_protocol::UnixMillis,
    ) -> Result<(), crate::store::StoreError> {
        let lang = lang.unwrap_or(&self.default_language);
        queue::enqueue(batch, order, queue::MailKind::OrderLink, lang, now)?;
        if self.include_keys {
            queue::enqueue(batch, order, queue::MailKind::Keys, lang, now)?;
        }
        Ok(())
    }
}

/// Turns order mail on for `engine` and starts the worker, when `[mail]` is configured.
pub fn start(
    config: Option<&MailConfig>,
    engine: &std::sync::Arc<crate::orders::OrderEngine>,
    links: &crate::payments::return_link::ReturnLinks,
    public_url: &str,
    metrics: std::sync::Arc<metrics::MailMetrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let Some(config) = config else { return Ok(None) };
    let sender = smtp::SmtpSender::new(config)?;
    engine
        .enable_mail(Queueing { include_keys: config.include_keys, default_language: config.default_language.clone() });
    let worker = worker::MailWorker {
        engine: engine.clone(),
        sender,
        config: config.clone(),
        links: links.clone(),
        public_url: public_url.to_string(),
        metrics,
    };
    tracing::info!(include_keys = config.include_keys, tls = ?config.tls, "order mail on");
    Ok(Some(worker::spawn(worker, shutdown)))
}
