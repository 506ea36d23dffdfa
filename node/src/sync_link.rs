//! The node's sync driver: streams the outbox to the coordinator over QUIC and applies the control
//! messages that come back.
//!
//! The decisions (when to upload, what to send, how to read an ack, how long to back off) are the
//! sans-IO [`SyncClient`]'s; this module does the I/O around it. One QUIC endpoint per link,
//! reused across reconnects; one bidirectional stream per batch.
//!
//! Architecture Invariant: only durable events leave the node. A batch is cut at the newest seq
//! seen under the engine lock (every event up to it is applied), then the store's flush is
//! awaited, then the events are read; so the ledger never holds an event a crash could undo.
//!
//! Architecture Invariant: control messages are applied in seq order, each recorded durably as
//! applied before the next; grants are installed only through
//! [`crate::admin::verify_and_install`] (signature against the pinned key, node id check).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use edgecard_protocol::{
    CatalogProduct, ControlBody, ControlMessage, RefusedControl, SignedRenewal, SliceStock, SyncAck, SyncClient,
    SyncErrorCode, SyncTiming, SyncUpload, UploadPlan, MAX_REFUSAL_TEXT, MAX_REFUSED_CONTROL, MAX_SYNC_MESSAGE_BYTES,
    MAX_UPLOAD_LOOKUPS, SYNC_ALPN,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::VarInt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::admin::{verify_and_install, GrantRefusal, GrantSource};
use crate::config::{Currency, PriceConfig, ProductConfig};
use crate::orders::{GrantInstallError, OrderEngine, OrderError};
use crate::tls;

/// Keep-alive and idle timeout of the sync connection (the coordinator uses the same).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a QUIC handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An upload fails when nothing at all has come from the coordinator for this long: the
/// connection is dropped and re-made. While datagrams arrive (a slow, lossy link moving the
/// upload along), it is waited on: cutting it would throw the progress away and start over.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A copy of an upload goes out on a new stream after this long without an answer (see
/// [`send_hedged`]); at most this many copies are in flight.
const HEDGE_AFTER: Duration = Duration::from_millis(1500);
const MAX_HEDGED: usize = 3;
/// How often an upload in flight is checked for progress.
const PROGRESS_CHECK: Duration = Duration::from_millis(250);
/// Bound on one upload however it progresses (a coordinator whose endpoint answers but whose
/// ledger does not). Datagrams that carry only QUIC acknowledgements count as progress, so a
/// connection that still delivers them but no stream data (seen on a 30%-loss, 100 ms link) is
/// dropped and re-made after this long; a fresh connection then drains the backlog in seconds.
/// 4,096 events (about 600 KB) take well under this on such a link, and batches halve after a
/// failure.
const EXCHANGE_CAP: Duration = Duration::from_secs(20);

/// Where and how to reach the coordinator.
#[derive(Clone)]
pub struct SyncLinkConfig {
    pub coordinator_addr: SocketAddr,
    /// The name the coordinator's certificate must carry (a DNS name or an IP address).
    pub server_name: String,
    /// The coordinator's CA certificate, PEM: the only root trusted for the server.
    pub ca_cert_pem: String,
    /// This node's client certificate (chain, leaf first) and private key, PEM.
    pub node_cert_pem: String,
    pub node_key_pem: String,
    pub timing: SyncTiming,
}

impl std::fmt::Debug for SyncLinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLinkConfig")
            .field("coordinator_addr", &self.coordinator_addr)
            .field("server_name", &self.server_name)
            .field("node_key_pem", &"<redacted>")
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncLinkError {
    #[error("sync link TLS material: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("sync link TLS configuration: {0}")]
    Config(String),
    #[error("cannot open the sync link's QUIC endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
}

/// Counters and gauges of the sync link.
#[derive(Debug, Default)]
pub struct SyncLinkMetrics {
    /// 1 while a connection to the coordinator is up.
    pub connected: Gauge,
    /// Uploads acknowledged.
    pub uploads: Counter,
    /// Events in acknowledged uploads.
    pub uploaded_events: Counter,
    /// Failed uploads and connection attempts.
    pub failures: Counter,
    /// Highest outbox seq the coordinator has acknowledged.
    pub acked_seq: Gauge,
    /// Outbox events not yet acknowledged (newest − acked).
    pub lag: Gauge,
    /// Wall-clock time of the last acknowledgement, unix seconds (0 until the first).
    pub last_ack: Gauge<f64, AtomicU64>,
    /// Control messages applied (grants refused by verification count here too).
    pub control_applied: Counter,
    /// 1 once the coordinator has confirmed this data dir since the process started.
    pub confirmed: Gauge,
    /// Events this data dir had lost, restored from the ledger.
    pub restored_events: Counter,
}

impl SyncLinkMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("edgecard_sync_connected", "1 while connected to the coordinator", self.connected.clone());
        r.register("edgecard_sync_uploads", "Sync uploads acknowledged", self.uploads.clone());
        r.register(
            "edgecard_sync_uploaded_events",
            "Order events in acknowledged uploads",
            self.uploaded_events.clone(),
        );
        r.register("edgecard_sync_failures", "Failed sync uploads and connects", self.failures.clone());
        r.register("edgecard_sync_acked_seq", "Highest outbox seq acknowledged", self.acked_seq.clone());
        r.register("edgecard_sync_lag_events", "Outbox events not yet acknowledged", self.lag.clone());
        r.register_with_unit(
            "edgecard_sync_last_ack_timestamp",
            "Unix time of the coordinator's last acknowledgement (0 before the first)",
            Unit::Seconds,
            self.last_ack.clone(),
        );
        r.register("edgecard_sync_control_applied", "Control messages applied", self.control_applied.clone());
        r.register(
            "edgecard_sync_confirmed",
            "1 once the coordinator has confirmed this data dir since start; until then the node sells nothing",
            self.confirmed.clone(),
        );
        r.register(
            "edgecard_sync_restored_events",
            "Events this data dir had lost (restored from an older copy), given back by the coordinator",
            self.restored_events.clone(),
        );
    }
}

/// The QUIC client configuration: TLS 1.3, ALPN `edgecard-sync/1`, the coordinator CA as the
/// only root, this node's certificate for client auth.
pub fn client_config(config: &SyncLinkConfig) -> Result<quinn::ClientConfig, SyncLinkError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in tls::parse_certificates(config.ca_cert_pem.as_bytes(), "sync CA certificate")? {
        roots.add(ca).map_err(|e| SyncLinkError::Config(format!("sync CA certificate: {e}")))?;
    }
    let certs = tls::parse_certificates(config.node_cert_pem.as_bytes(), "sync node certificate")?;
    let key = tls::parse_private_key(config.node_key_pem.as_bytes(), "sync node private key")?;
    let mut crypto = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SyncLinkError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| SyncLinkError::Config(format!("sync node certificate and key: {e}")))?;
    crypto.alpn_protocols = vec![SYNC_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| SyncLinkError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    // BBR paces by measured bandwidth and RTT, not by loss: on a lossy long link (a node across
    // an ocean on a bad mobile uplink) loss-based control collapses to a trickle.
    transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // The coordinator never opens streams towards the node.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Starts the sync link with fresh metrics. See [`spawn_with_metrics`].
pub fn spawn(
    engine: Arc<OrderEngine>,
    coordinator_key: VerifyingKey,
    config: SyncLinkConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, SyncLinkError> {
    spawn_with_metrics(engine, coordinator_key, config, Arc::new(SyncLinkMetrics::default()), shutdown)
}

/// Starts the sync link: builds the TLS configuration and binds the link's QUIC endpoint (errors
/// here are configuration errors), then runs until `shutdown` turns true or its sender is
/// dropped. Must be called inside a tokio runtime.
pub fn spawn_with_metrics(
    engine: Arc<OrderEngine>,
    coordinator_key: VerifyingKey,
    config: SyncLinkConfig,
    metrics: Arc<SyncLinkMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, SyncLinkError> {
    let client_config = client_config(&config)?;
    engine.forward_lookups();
    let bind: SocketAddr = if config.coordinator_addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(SyncLinkError::Endpoint)?;
    endpoint.set_default_client_config(client_config);
    let (acked, control_applied) = match engine.sync_progress() {
        Ok(progress) => progress,
        Err(e) => {
            tracing::error!(error = %e, "reading sync progress failed; resending from the start of the outbox");
            (0, 0)
        }
    };
    let client = SyncClient::new(config.timing, acked, control_applied, rand::random());
    metrics.acked_seq.set(i64::try_from(acked).unwrap_or(i64::MAX));
    let span = tracing::info_span!("sync_link", node = %engine.node_id(), coordinator = %config.coordinator_addr);
    let link = Link {
        notify: engine.outbox_notify(),
        engine,
        coordinator_key,
        config,
        metrics,
        client,
        endpoint,
        connection: None,
        reachable: None,
        started: Instant::now(),
    };
    Ok(tokio::spawn(link.run(shutdown).instrument(span)))
}

struct Link {
    engine: Arc<OrderEngine>,
    coordinator_key: VerifyingKey,
    config: SyncLinkConfig,
    metrics: Arc<SyncLinkMetrics>,
    client: SyncClient,
    endpoint: quinn::Endpoint,
    connection: Option<quinn::Connection>,
    /// Last logged reachability, so state changes are logged once.
    reachable: Option<bool>,
    notify: Arc<tokio::sync::Notify>,
    started: Instant,
}

/// Why an exchange did not complete.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    /// Reading the outbox or recording progress failed on this node.
    #[error("local store: {0}")]
    Local(String),
    /// No connection, a broken stream, a timeout, or a batch the coordinator would not take.
    #[error("{0}")]
    Transport(String),
    /// The coordinator answered outside the protocol; the connection is dropped.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Link {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("sync link started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Taken under the engine lock: every event up to here has its batch applied.
            let newest = self.engine.outbox_newest();
            self.metrics.lag.set(gauge(newest.saturating_sub(self.client.acked())));
            let now = self.now_ms();
            if let Some(plan) = self.client.poll_upload(now, newest) {
                let outcome = tokio::select! {
                    outcome = self.exchange(plan, newest) => outcome,
                    () = stopped(&mut shutdown) => break,
                };
                if let Err(e) = outcome {
                    self.fail(e);
                }
                continue;
            }
            let wake_at = self.client.poll_timeout().unwrap_or(now.saturating_add(self.config.timing.idle_poll_ms));
            let sleep = tokio::time::sleep(Duration::from_millis(wake_at.saturating_sub(now)));
            let notify = self.notify.clone();
            tokio::select! {
                () = sleep => {}
                () = notify.notified() => {}
                () = stopped(&mut shutdown) => break,
            }
        }
        if let Some(connection) = self.connection.take() {
            connection.close(VarInt::from_u32(SyncErrorCode::Closed.code()), b"node shutting down");
        }
        self.metrics.connected.set(0);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        tracing::info!("sync link stopped");
    }

    fn fail(&mut self, error: ExchangeError) {
        self.metrics.failures.inc();
        let now = self.now_ms();
        match &error {
            ExchangeError::Protocol(_) => {
                // `handle_ack` has already counted the failure and backed off.
                if let Some(connection) = self.connection.take() {
                    connection.close(VarInt::from_u32(SyncErrorCode::Protocol.code()), b"sync protocol violation");
                }
                tracing::warn!(%error, "coordinator broke the sync protocol; reconnecting");
            }
            ExchangeError::Local(_) => {
                self.client.handle_failure(now);
                tracing::error!(%error, "sync upload failed on this node");
            }
            ExchangeError::Transport(_) => {
                self.client.handle_failure(now);
                // A connection that timed out or broke is not trusted again: the coordinator may
                // have restarted behind it. The next attempt makes a new one.
                if let Some(connection) = self.connection.take() {
                    connection.close(VarInt::from_u32(SyncErrorCode::Protocol.code()), b"upload failed");
                }
                tracing::debug!(%error, failures = self.client.consecutive_failures(), "sync upload failed");
            }
        }
        if let Some(reason) = self.connection.as_ref().and_then(quinn::Connection::close_reason) {
            log_close(&reason);
            self.connection = None;
        }
        if self.connection.is_none() {
            self.set_reachable(false, &error.to_string());
        }
    }

    fn set_reachable(&mut self, reachable: bool, detail: &str) {
        self.metrics.connected.set(i64::from(reachable));
        if self.reachable != Some(reachable) {
            self.reachable = Some(reachable);
            if reachable {
                tracing::info!("connected to the coordinator");
            } else {
                tracing::info!(reason = %detail, "coordinator not connected; retrying with backoff");
            }
        }
    }

    /// The open connection, or a new one.
    async fn connection(&mut self) -> Result<quinn::Connection, ExchangeError> {
        if let Some(connection) = &self.connection {
            match connection.close_reason() {
                None => return Ok(connection.clone()),
                Some(reason) => {
                    log_close(&reason);
                    self.connection = None;
                    self.set_reachable(false, &reason.to_string());
                }
            }
        }
        let connecting = self
            .endpoint
            .connect(self.config.coordinator_addr, &self.config.server_name)
            .map_err(|e| ExchangeError::Transport(format!("connect: {e}")))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ExchangeError::Transport("connect: timed out".into()))?
            .map_err(|e| {
                log_close(&e);
                ExchangeError::Transport(format!("connect: {e}"))
            })?;
        self.connection = Some(connection.clone());
        self.set_reachable(true, "");
        Ok(connection)
    }

    /// One upload and its ack, then the ack's control messages and the outbox pruning.
    async fn exchange(&mut self, plan: UploadPlan, newest: u64) -> Result<(), ExchangeError> {
        // Everything up to `newest` is applied; after this flush it is durable too.
        self.engine.store().durable().await.map_err(|e| ExchangeError::Local(e.to_string()))?;
        let mut events = self
            .engine
            .outbox_after(plan.after_seq, plan.max_events)
            .map_err(|e| ExchangeError::Local(e.to_string()))?;
        events.retain(|e| e.seq <= newest);
        let stock = self
            .engine
            .leases()
            .into_iter()
            .map(|slice| SliceStock {
                slice_id: slice.slice_id,
                sku: slice.sku,
                available: slice.available as u64,
                selling: slice.selling,
            })
            .collect();
        let refused_control =
            self.engine.refused_control(MAX_REFUSED_CONTROL).map_err(|e| ExchangeError::Local(e.to_string()))?;
        let upload = SyncUpload {
            node_id: self.engine.node_id().clone(),
            incarnation: self.engine.incarnation(),
            newest_seq: newest,
            events,
            control_applied: plan.control_applied,
            stock,
            refused_control,
            // Best effort: lookups sent with an upload that fails are not sent again (the buyer
            // asks again).
            lookups: self.engine.take_pending_lookups(MAX_UPLOAD_LOOKUPS),
        };
        let event_count = upload.events.len() as u64;
        let bytes: Arc<[u8]> =
            upload.to_bytes().map_err(|e| ExchangeError::Local(format!("encoding the upload: {e}")))?.into();
        let connection = self.connection().await?;
        let sent_at = Instant::now();
        let ack = while_progressing(&connection, send_hedged(&connection, bytes.clone())).await?;
        tracing::debug!(
            events = event_count,
            bytes = bytes.len(),
            took_ms = sent_at.elapsed().as_millis() as u64,
            "upload acknowledged"
        );
        let outcome =
            self.client.handle_ack(self.now_ms(), &ack).map_err(|e| ExchangeError::Protocol(e.to_string()))?;
        // The coordinator recorded the refusals durably before it answered.
        if let Err(e) = self.engine.forget_refused_control(&upload.refused_control) {
            tracing::error!(error = %e, "clearing reported refusals failed; they will be reported again");
        }
        self.metrics.uploads.inc();
        self.metrics.uploaded_events.inc_by(event_count);
        self.metrics.acked_seq.set(gauge(outcome.prune_through));
        self.metrics.last_ack.set(unix_seconds_now());

        // Pruned first: restoring moves the ack mark further.
        if let Err(e) = self.engine.record_sync_ack(outcome.prune_through) {
            tracing::error!(error = %e, through = outcome.prune_through, "pruning the outbox failed");
        }
        if !outcome.restore.is_empty() {
            let through = self
                .engine
                .restore_lost(&outcome.restore)
                .await
                .map_err(|e| ExchangeError::Local(format!("restoring lost events: {e}")))?;
            self.client.restored_through(through, self.now_ms());
            self.metrics.restored_events.inc_by(outcome.restore.len() as u64);
        }
        if !outcome.confirmed {
            // Behind the ledger or diverged from it: no sales, and no control, until confirmed.
            self.engine.fence();
            self.metrics.confirmed.set(0);
            return Ok(());
        }
        if !self.engine.is_confirmed() {
            let jumped = self
                .engine
                .confirm(outcome.ledger_high_water)
                .await
                .map_err(|e| ExchangeError::Local(format!("confirming the data dir: {e}")))?;
            if let Some(through) = jumped {
                self.client.restored_through(through, self.now_ms());
            }
        }
        self.metrics.confirmed.set(1);

        let mut control_result = Ok(());
        for message in outcome.control {
            let seq = message.seq;
            let refused = match self.apply_control(message).await {
                Ok(refused) => refused,
                Err(e) => {
                    control_result = Err(e);
                    break;
                }
            };
            if let Err(e) = self.engine.record_control_applied(seq, refused.as_ref()).await {
                control_result = Err(ExchangeError::Local(format!("recording control {seq} applied: {e}")));
                break;
            }
            self.client.mark_control_applied(seq);
            self.metrics.control_applied.inc();
        }
        self.metrics.lag.set(gauge(newest.saturating_sub(self.client.acked())));
        control_result
    }

    /// Applies one control message. `Ok` means done for good: applied (`None`), or refused for a
    /// reason that a retry cannot fix (the refusal, to report to the coordinator); `Err` means try
    /// again later.
    async fn apply_control(&self, message: ControlMessage) -> Result<Option<RefusedControl>, ExchangeError> {
        let seq = message.seq;
        let refused = |reason: String, holds_nothing: bool| {
            let mut reason = reason.replace(char::is_control, " ");
            truncate_at_char(&mut reason, MAX_REFUSAL_TEXT);
            Some(RefusedControl { seq, reason, holds_nothing })
        };
        match message.body {
            ControlBody::Grant { signed_grant } => {
                match verify_and_install(&self.engine, &self.coordinator_key, &signed_grant, GrantSource::Coordinator)
                    .await
                {
                    Ok(outcome) => tracing::info!(control = seq, ?outcome, "grant from the coordinator applied"),
                    Err(GrantRefusal::Install(GrantInstallError::Store(e))) => {
                        return Err(ExchangeError::Local(format!("installing grant (control {seq}): {e}")));
                    }
                    // Logged by `verify_and_install`; a bad grant stays bad, so it is not retried.
                    Err(e) => {
                        tracing::warn!(control = seq, reason = %e, "grant from the coordinator refused");
                        let holds_nothing = match &e {
                            GrantRefusal::Install(
                                GrantInstallError::KeyConflict { slice, .. }
                                | GrantInstallError::ChangedSlice { slice }
                                | GrantInstallError::StaleEpoch { slice, .. },
                            ) => !self.engine.holds_slice(*slice),
                            _ => true,
                        };
                        return Ok(refused(e.to_string(), holds_nothing));
                    }
                }
            }
            ControlBody::Catalog { products } => match catalog_from_wire(&products) {
                Ok(products) => {
                    let count = products.len();
                    self.engine
                        .replace_catalog(products)
                        .await
                        .map_err(|e| ExchangeError::Local(format!("storing the catalog (control {seq}): {e}")))?;
                    tracing::info!(control = seq, products = count, "catalog from the coordinator applied");
                }
                Err(reason) => {
                    tracing::warn!(control = seq, %reason, "catalog from the coordinator refused");
                    return Ok(refused(format!("catalog refused: {reason}"), false));
                }
            },
            ControlBody::Renew { signed_renewal } => {
                let verified = SignedRenewal::from_bytes(&signed_renewal)
                    .and_then(|signed| signed.verify(&self.coordinator_key, self.engine.node_id()));
                match verified {
                    Ok(renewal) => {
                        let applied = self
                            .engine
                            .apply_renewal(&renewal)
                            .await
                            .map_err(|e| ExchangeError::Local(format!("renewing a lease (control {seq}): {e}")))?;
                        if !applied {
                            tracing::info!(control = seq, slice = %renewal.slice_id, "lease renewal does not apply");
                        }
                    }
                    Err(e) => {
                        self.engine.metrics().grants_refused.inc();
                        tracing::warn!(control = seq, reason = %e, "lease renewal from the coordinator refused");
                        return Ok(refused(format!("lease renewal refused: {e}"), false));
                    }
                }
            }
            ControlBody::Shrink { slice_id, sku, epoch, count, close, ticket } => {
                self.engine
                    .apply_shrink(slice_id, &sku, epoch, count, close, ticket)
                    .await
                    .map_err(|e| ExchangeError::Local(format!("shrinking slice {slice_id} (control {seq}): {e}")))?;
            }
            // Recorded here; the refund worker carries it out (a provider outage must not hold up
            // the control messages behind it).
            ControlBody::Refund { order_id, reason } => match self.engine.request_refund(&order_id, &reason).await {
                Ok(start) => {
                    tracing::info!(control = seq, order = %order_id, ?start, "refund from the coordinator recorded")
                }
                Err(e @ (OrderError::NotRefundable(_) | OrderError::NotFound)) => {
                    tracing::warn!(control = seq, order = %order_id, reason = %e, "refund from the coordinator refused");
                    return Ok(refused(format!("refund of {order_id} refused: {e}"), false));
                }
                Err(e) => return Err(ExchangeError::Local(format!("recording a refund (control {seq}): {e}"))),
            },
            // Never refused: a node without mail, or without orders for the address, has nothing
            // to do. The address is not logged.
            ControlBody::FindOrders { lookup } => {
                let lang =
                    crate::storefront::i18n::Lang::from_tag(&lookup.lang).unwrap_or(crate::storefront::i18n::Lang::En);
                match self.engine.mail_orders_of(&lookup.email, lang).await {
                    Ok(orders) => tracing::info!(control = seq, orders, "find my order from the coordinator applied"),
                    Err(OrderError::Store(e)) => {
                        return Err(ExchangeError::Local(format!("find my order (control {seq}): {e}")));
                    }
                    Err(_) => tracing::info!(control = seq, "find my order from the coordinator: nothing to do"),
                }
            }
        }
        Ok(None)
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Waits for `exchange` as long as the connection makes progress (see [`STALL_TIMEOUT`]), at
/// most [`EXCHANGE_CAP`].
async fn while_progressing<T>(
    connection: &quinn::Connection,
    exchange: impl std::future::Future<Output = Result<T, ExchangeError>>,
) -> Result<T, ExchangeError> {
    tokio::pin!(exchange);
    let started = Instant::now();
    let mut received = connection.stats().udp_rx.datagrams;
    let mut last_progress = Instant::now();
    let mut check = tokio::time::interval(PROGRESS_CHECK);
    loop {
        tokio::select! {
            result = &mut exchange => return result,
            _ = check.tick() => {
                let now_received = connection.stats().udp_rx.datagrams;
                if now_received != received {
                    received = now_received;
                    last_progress = Instant::now();
                }
                if last_progress.elapsed() >= STALL_TIMEOUT {
                    return Err(ExchangeError::Transport(format!("upload stalled: nothing from the coordinator for {STALL_TIMEOUT:?}")));
                }
                if started.elapsed() >= EXCHANGE_CAP {
                    return Err(ExchangeError::Transport(format!("upload not answered within {EXCHANGE_CAP:?}")));
                }
            }
        }
    }
}

/// Sends the upload, and sends it again on a new stream every [`HEDGE_AFTER`] while no answer
/// has come; the first ack wins. On a lossy link the last packet of a small exchange is lost
/// again and again while QUIC's probe timer backs off (seconds); a new copy is new traffic that
/// gets through, and ingest is idempotent, so a copy the coordinator also took changes nothing.
/// At most [`MAX_HEDGED`] copies are in flight: once that many wait, each new copy replaces the
/// oldest, whose probe timer has backed off the furthest (waiting on it could take most of
/// [`EXCHANGE_CAP`] while datagrams keep the connection looking alive).
async fn send_hedged(connection: &quinn::Connection, bytes: Arc<[u8]>) -> Result<SyncAck, ExchangeError> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut oldest_first = std::collections::VecDeque::new();
    let spawn = |attempts: &mut tokio::task::JoinSet<_>| {
        let (connection, bytes) = (connection.clone(), bytes.clone());
        attempts.spawn(async move { send_upload(&connection, &bytes).await })
    };
    oldest_first.push_back(spawn(&mut attempts));
    let mut hedge = tokio::time::interval_at(tokio::time::Instant::now() + HEDGE_AFTER, HEDGE_AFTER);
    let mut last_error = None;
    loop {
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok(Ok(ack))) => return Ok(ack),
                Some(Ok(Err(e @ ExchangeError::Protocol(_)))) => return Err(e),
                Some(Ok(Err(e))) => last_error = Some(e),
                Some(Err(join)) if join.is_cancelled() => {}
                Some(Err(join)) => last_error = Some(ExchangeError::Local(format!("upload task: {join}"))),
                None => {
                    return Err(last_error.unwrap_or_else(|| ExchangeError::Transport("no upload attempt".into())))
                }
            },
            _ = hedge.tick() => {
                oldest_first.retain(|attempt: &tokio::task::AbortHandle| !attempt.is_finished());
                if oldest_first.len() >= MAX_HEDGED {
                    if let Some(oldest) = oldest_first.pop_front() {
                        oldest.abort();
                    }
                }
                oldest_first.push_back(spawn(&mut attempts));
            }
        }
    }
}

/// Sends one upload on a new stream and reads the ack.
async fn send_upload(connection: &quinn::Connection, bytes: &[u8]) -> Result<SyncAck, ExchangeError> {
    let transport = |what: &str, e: &dyn std::fmt::Display| ExchangeError::Transport(format!("{what}: {e}"));
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| transport("opening a stream", &e))?;
    send.write_all(bytes).await.map_err(|e| transport("sending the upload", &e))?;
    send.finish().map_err(|e| transport("finishing the upload", &e))?;
    let reply = recv.read_to_end(MAX_SYNC_MESSAGE_BYTES).await.map_err(|e| match e {
        quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) => {
            let code = SyncErrorCode::from_code(code.into_inner());
            let text = code.map_or_else(|| "unknown error".to_owned(), |c| c.to_string());
            if code == Some(SyncErrorCode::WrongNode) || code == Some(SyncErrorCode::Malformed) {
                // Our own upload was refused as invalid: a bug or a certificate for another node.
                tracing::error!(reason = %text, "coordinator refused the upload");
            }
            ExchangeError::Transport(format!("coordinator refused the upload: {text}"))
        }
        other => transport("reading the ack", &other),
    })?;
    SyncAck::from_bytes(&reply).map_err(|e| ExchangeError::Protocol(format!("malformed ack: {e}")))
}

fn log_close(error: &quinn::ConnectionError) {
    if let quinn::ConnectionError::ApplicationClosed(close) = error {
        match SyncErrorCode::from_code(close.error_code.into_inner()) {
            Some(SyncErrorCode::Revoked) => tracing::warn!("the coordinator revoked this node's sync access"),
            Some(SyncErrorCode::BadIdentity) => {
                tracing::warn!("the coordinator does not accept this node's certificate")
            }
            _ => {}
        }
    }
}

/// The products of a catalog update, checked as `node.toml` checks them: unique skus, an `en`
/// title, titles of 1 to 200 bytes, at least one price, prices > 0, no currency twice. Any bad
/// product refuses the whole update, so the node keeps selling its current catalog.
pub fn catalog_from_wire(products: &[CatalogProduct]) -> Result<Vec<ProductConfig>, String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(products.len());
    for product in products {
        let sku = &product.sku;
        product.sku.validate().map_err(|e| e.to_string())?;
        if !seen.insert(sku.clone()) {
            return Err(format!("duplicate sku {sku}"));
        }
        let mut title = std::collections::BTreeMap::new();
        for (lang, text) in &product.titles {
            let lang_ok =
                !lang.is_empty() && lang.len() <= 35 && lang.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !lang_ok {
                return Err(format!("{sku}: invalid language tag"));
            }
            if text.trim().is_empty() || text.len() > 200 || text.chars().any(char::is_control) {
                return Err(format!("{sku}: titles must be 1 to 200 bytes without control characters"));
            }
            if title.insert(lang.clone(), text.clone()).is_some() {
                return Err(format!("{sku}: language {lang} listed twice"));
            }
        }
        if !title.contains_key("en") {
            return Err(format!("{sku}: an `en` title is required"));
        }
        if product.prices.is_empty() {
            return Err(format!("{sku}: at least one price is required"));
        }
        let mut prices = Vec::with_capacity(product.prices.len());
        let mut currencies = std::collections::BTreeSet::new();
        for (amount_minor, code) in &product.prices {
            let currency: Currency = code.parse().map_err(|e| format!("{sku}: {e}"))?;
            if *amount_minor == 0 {
                return Err(format!("{sku}: amount_minor must be > 0"));
            }
            if !currencies.insert(currency) {
                return Err(format!("{sku}: currency {code} listed twice"));
            }
            prices.push(PriceConfig { amount_minor: *amount_minor, currency });
        }
        out.push(ProductConfig { sku: sku.clone(), title, prices });
    }
    Ok(out)
}

/// Resolves once shutdown is asked for (or nobody can ask any more).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn unix_seconds_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgecard_protocol::Sku;

    fn product(sku: &str, titles: &[(&str, &str)], prices: &[(u64, &str)]) -> CatalogProduct {
        CatalogProduct {
            sku: Sku::new(sku).unwrap(),
            titles: titles.iter().map(|(l, t)| (l.to_string(), t.to_string())).collect(),
            prices: prices.iter().map(|(a, c)| (*a, c.to_string())).collect(),
        }
    }

    #[test]
    fn catalog_converts_and_keeps_price_order() {
        let products =
            catalog_from_wire(&[product("game", &[("en", "Game"), ("zh-CN", "游戏")], &[(500, "USD"), (3500, "CNY")])])
                .unwrap();
        assert_eq!(products.len(), 1);
        assert_eq!(products[0].title["zh-CN"], "游戏");
        assert_eq!(products[0].prices[0].currency.as_str(), "USD");
        assert_eq!(products[1..].len(), 0);
    }

    #[test]
    fn bad_catalogs_are_refused_whole() {
        let good = product("a", &[("en", "A")], &[(1, "USD")]);
        let bad = [
            product("b", &[("zh-CN", "B")], &[(1, "USD")]),
            product("b", &[("en", " ")], &[(1, "USD")]),
            product("b", &[("en", "B\n")], &[(1, "USD")]),
            product("b", &[("en", "B")], &[]),
            product("b", &[("en", "B")], &[(0, "USD")]),
            product("b", &[("en", "B")], &[(1, "usd")]),
            product("b", &[("en", "B")], &[(1, "USD"), (2, "USD")]),
            product("b", &[("en", "B"), ("e n", "x")], &[(1, "USD")]),
            good.clone(),
        ];
        for b in bad {
            assert!(catalog_from_wire(&[good.clone(), b.clone()]).is_err(), "{b:?} accepted");
        }
        assert!(catalog_from_wire(&[]).unwrap().is_empty());
    }

    #[test]
    fn config_debug_hides_the_key() {
        let config = SyncLinkConfig {
            coordinator_addr: "127.0.0.1:1".parse().unwrap(),
            server_name: "localhost".into(),
            ca_cert_pem: String::new(),
            node_cert_pem: String::new(),
            node_key_pem: "SECRET KEY".into(),
            timing: SyncTiming::default(),
        };
        assert!(!format!("{config:?}").contains("SECRET"));
        assert!(client_config(&config).is_err());
    }
}
