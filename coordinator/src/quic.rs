//! The coordinator's end of the sync link: one QUIC endpoint, mutual TLS against the private CA.
//!
//! Per connection the node is identified once, from the DNS SAN of its verified client
//! certificate (see [`crate::pki`]); a revoked node is closed with [`SyncErrorCode::Revoked`].
//! Each bidirectional stream carries one exchange: the node writes a [`SyncUpload`] and finishes,
//! the coordinator answers with a [`SyncAck`] and finishes. Streams are served concurrently and
//! fail alone: bad bytes, an upload for another node, or a handler error reset that stream with a
//! [`SyncErrorCode`], and the connection and every other node go on.
//!
//! Architecture Invariant: the node id an upload is recorded under is the one in the client
//! certificate; an upload that names another node is refused before the handler sees it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgecard_protocol::{NodeId, SyncAck, SyncErrorCode, SyncUpload, MAX_SYNC_MESSAGE_BYTES, SYNC_ALPN};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ReadToEndError, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::pki::{node_id_from_cert, CertificateAuthority};

/// Keep-alive sent on an idle connection, so NAT bindings and the idle timer stay fresh.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads one node may have in flight at once (the node's driver uses one).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// How long shutdown waits for uploads in flight before dropping them (an unanswered upload is
/// re-sent by the node and skipped by the ledger's high-water mark).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the handler did not answer an upload. The node sees only the code, as a stream reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The batch could not be taken now (storage trouble, overload); the node retries it.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The batch was refused (for example events for keys never granted to the node).
    #[error("refused: {0}")]
    Refused(String),
}

impl HandlerError {
    pub fn code(&self) -> SyncErrorCode {
        match self {
            HandlerError::Unavailable(_) => SyncErrorCode::Unavailable,
            HandlerError::Refused(_) => SyncErrorCode::Refused,
        }
    }
}

/// What the QUIC server calls for each authenticated upload.
///
/// Contract for `handle_upload`: ingest is idempotent by (node, seq): events at or below the
/// node's high-water mark are skipped, not counted again. The ack's `events_high_water` must say
/// what is durably in the ledger and must not exceed the upload's last event seq when the upload
/// carries events (a node whose own record of acks was lost re-sends from further back, and the
/// node's client treats an ack past what it sent as a protocol error).
pub trait SyncHandler: Send + Sync + 'static {
    fn handle_upload(
        &self,
        node: &NodeId,
        upload: SyncUpload,
    ) -> impl Future<Output = Result<SyncAck, HandlerError>> + Send;

    /// Checked when a node connects and before each of its uploads.
    fn is_revoked(&self, node: &NodeId) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("{what}: invalid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("{what}: no {expected} block found")]
    Missing { what: &'static str, expected: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot bind the sync endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Counters of the sync endpoint.
#[derive(Debug, Default)]
pub struct QuicMetrics {
    /// Connections whose handshake completed and whose node was admitted.
    pub connections_accepted: Counter,
    /// Connections refused: failed handshake (no or foreign certificate), no node name, revoked.
    pub connections_refused: Counter,
    pub connections_open: Gauge,
    /// Uploads answered with an ack.
    pub uploads: Counter,
    /// Events carried by answered uploads (including ones the ledger skipped as already seen).
    pub upload_events: Counter,
    /// Streams reset: malformed, too large, wrong node, handler error, or broken off by the node.
    pub stream_failures: Counter,
}

impl QuicMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgecard_sync_connections_accepted",
            "Sync connections admitted",
            self.connections_accepted.clone(),
        );
        r.register(
            "edgecard_sync_connections_refused",
            "Sync connections refused (handshake, identity, revoked)",
            self.connections_refused.clone(),
        );
        r.register("edgecard_sync_connections_open", "Sync connections open", self.connections_open.clone());
        r.register("edgecard_sync_received_uploads", "Node uploads answered with an ack", self.uploads.clone());
        r.register(
            "edgecard_sync_received_events",
            "Order events in answered uploads (including ones the ledger already had)",
            self.upload_events.clone(),
        );
        r.register("edgecard_sync_stream_failures", "Sync streams reset", self.stream_failures.clone());
    }
}

/// Transport settings of the sync link (both ends use the same).
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s fits a VarInt of milliseconds; the fallback only guards the conversion.
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // BBR paces by measured bandwidth and RTT, not by loss: on a lossy long link (a node across
    // an ocean on a bad mobile uplink) loss-based control collapses to a trickle.
    transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport
}

/// The server side of the TLS and QUIC configuration: TLS 1.3 only, ALPN `edgecard-sync/1`,
/// client certificates required and verified against `ca_cert_pem`.
pub fn server_config(
    ca_cert_pem: &str,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<quinn::ServerConfig, QuicError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in parse_certs(ca_cert_pem, "CA certificate")? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let certs = parse_certs(server_cert_pem, "server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(server_key_pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            QuicError::Missing { what: "server private key", expected: "PRIVATE KEY" }
        }
        other => QuicError::Pem { what: "server private key", reason: other.to_string() },
    })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![SYNC_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    Ok(server)
}

/// Binds the coordinator's sync endpoint (port 0 picks a free port; see `local_addr`).
pub fn server_endpoint(
    bind: SocketAddr,
    ca_cert_pem: &str,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<quinn::Endpoint, QuicError> {
    let config = server_config(ca_cert_pem, server_cert_pem, server_key_pem)?;
    quinn::Endpoint::server(config, bind).map_err(|source| QuicError::Bind { addr: bind, source })
}

/// Binds the sync endpoint with a fixed stateless-reset key. A coordinator restarted with the
/// same key can reset the connections its previous process had open, so nodes notice the
/// restart at their next packet instead of waiting out the idle timeout.
pub fn server_endpoint_with_reset_key(
    bind: SocketAddr,
    ca_cert_pem: &str,
    server_cert_pem: &str,
    server_key_pem: &str,
    reset_key: &[u8; 64],
) -> Result<quinn::Endpoint, QuicError> {
    let config = server_config(ca_cert_pem, server_cert_pem, server_key_pem)?;
    let mut endpoint_config =
        quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key)));
    // The connection ids must validate across restarts too, or the new process drops the old
    // connections' packets as invalid instead of resetting them.
    let digest =
        ring::digest::digest(&ring::digest::SHA256, &[b"edgecard connection ids".as_slice(), reset_key].concat());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest.as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key);
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let socket = std::net::UdpSocket::bind(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, Arc::new(quinn::TokioRuntime))
        .map_err(|source| QuicError::Bind { addr: bind, source })
}

/// Binds the sync endpoint with a server certificate freshly issued by `ca` for `names`.
pub fn server_endpoint_from_ca(
    bind: SocketAddr,
    ca: &CertificateAuthority,
    names: &[String],
) -> Result<quinn::Endpoint, QuicError> {
    let issued = ca.issue_server(names).map_err(|e| QuicError::Quic(e.to_string()))?;
    server_endpoint(bind, &ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
}

/// Serves the sync link on `endpoint` until `shutdown` turns true (or its sender is dropped).
pub async fn serve(
    endpoint: quinn::Endpoint,
    handler: Arc<impl SyncHandler>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_with_metrics(endpoint, handler, Arc::new(QuicMetrics::default()), shutdown).await
}

/// [`serve`], counting into `metrics`.
pub async fn serve_with_metrics<H: SyncHandler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    metrics: Arc<QuicMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let local = endpoint.local_addr()?;
    tracing::info!(%local, "sync endpoint serving");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let task = serve_connection(incoming, handler.clone(), metrics.clone(), shutdown.clone());
                connections.spawn(task);
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut shutdown) => break,
        }
    }
    // No new connections; each open one lets its uploads in flight finish, then closes.
    endpoint.set_server_config(None);
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    endpoint.close(VarInt::from_u32(SyncErrorCode::ShuttingDown.code()), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!(%local, "sync endpoint stopped");
    Ok(())
}

/// Resolves once shutdown is asked for (or nobody can ask any more).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_connection<H: SyncHandler>(
    incoming: quinn::Incoming,
    handler: Arc<H>,
    metrics: Arc<QuicMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            // No certificate, a certificate from another CA, wrong ALPN, or a timeout.
            metrics.connections_refused.inc();
            tracing::info!(%remote, reason = %e, "sync handshake failed");
            return;
        }
    };
    let node = match peer_node(&connection) {
        Ok(node) => node,
        Err(reason) => {
            metrics.connections_refused.inc();
            tracing::warn!(%remote, %reason, "sync connection refused: no node identity");
            close(&connection, SyncErrorCode::BadIdentity);
            return;
        }
    };
    let span = tracing::info_span!("sync", node = %node, %remote);
    async move {
        if handler.is_revoked(&node) {
            metrics.connections_refused.inc();
            tracing::warn!("sync connection refused: node revoked");
            close(&connection, SyncErrorCode::Revoked);
            return;
        }
        metrics.connections_accepted.inc();
        metrics.connections_open.inc();
        tracing::info!("node connected");
        let mut streams = JoinSet::new();
        let reason = loop {
            tokio::select! {
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        if handler.is_revoked(&node) {
                            tracing::warn!("node revoked: closing its sync connection");
                            close(&connection, SyncErrorCode::Revoked);
                            break "revoked".to_owned();
                        }
                        let task = serve_stream(node.clone(), send, recv, handler.clone(), metrics.clone());
                        streams.spawn(task.in_current_span());
                    }
                    Err(e) => break e.to_string(),
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                () = stopped(&mut shutdown) => break "coordinator shutting down".to_owned(),
            }
        };
        while streams.join_next().await.is_some() {}
        close(&connection, SyncErrorCode::ShuttingDown);
        metrics.connections_open.dec();
        tracing::info!(%reason, "node disconnected");
    }
    .instrument(span)
    .await;
}

async fn serve_stream<H: SyncHandler>(
    node: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<H>,
    metrics: Arc<QuicMetrics>,
) {
    let bytes = match recv.read_to_end(MAX_SYNC_MESSAGE_BYTES).await {
        Ok(bytes) => bytes,
        Err(ReadToEndError::TooLong) => {
            tracing::warn!(limit = MAX_SYNC_MESSAGE_BYTES, "sync upload too large");
            return refuse(&metrics, send, Some(recv), SyncErrorCode::TooLarge);
        }
        Err(e) => {
            // The node reset the stream or the connection went away: nothing to answer.
            metrics.stream_failures.inc();
            tracing::debug!(error = %e, "sync upload broken off");
            return;
        }
    };
    let upload = match SyncUpload::from_bytes(&bytes) {
        Ok(upload) => upload,
        Err(e) => {
            tracing::warn!(error = %e, bytes = bytes.len(), "malformed sync upload");
            return refuse(&metrics, send, None, SyncErrorCode::Malformed);
        }
    };
    if upload.node_id != node {
        tracing::warn!(claimed = %upload.node_id, "sync upload names another node");
        return refuse(&metrics, send, None, SyncErrorCode::WrongNode);
    }
    let events = upload.events.len() as u64;
    let ack = match handler.handle_upload(&node, upload).await {
        Ok(ack) => ack,
        Err(e) => {
            tracing::warn!(error = %e, events, "sync upload not taken");
            return refuse(&metrics, send, None, e.code());
        }
    };
    let bytes = match ack.to_bytes() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "sync ack cannot be encoded");
            return refuse(&metrics, send, None, SyncErrorCode::Unavailable);
        }
    };
    if let Err(e) = send.write_all(&bytes).await {
        metrics.stream_failures.inc();
        tracing::debug!(error = %e, "sync ack not delivered");
        return;
    }
    if send.finish().is_err() {
        metrics.stream_failures.inc();
        return;
    }
    metrics.uploads.inc();
    metrics.upload_events.inc_by(events);
    tracing::debug!(events, high_water = ack.events_high_water, control = ack.control.len(), "sync upload acked");
}

fn refuse(metrics: &QuicMetrics, mut send: quinn::SendStream, recv: Option<quinn::RecvStream>, code: SyncErrorCode) {
    metrics.stream_failures.inc();
    let code = VarInt::from_u32(code.code());
    // Errors here mean the stream is already gone, which is what we want.
    let _ = send.reset(code);
    if let Some(mut recv) = recv {
        let _ = recv.stop(code);
    }
}

fn close(connection: &quinn::Connection, code: SyncErrorCode) {
    connection.close(VarInt::from_u32(code.code()), code.to_string().as_bytes());
}

/// The node named by the connection's verified client certificate.
fn peer_node(connection: &quinn::Connection) -> Result<NodeId, String> {
    let identity = connection.peer_identity().ok_or("no client certificate")?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| "unexpected peer identity type")?;
    let leaf = chain.first().ok_or("empty client certificate chain")?;
    node_id_from_cert(leaf.as_ref()).map_err(|e| e.to_string())
}

fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QuicError::Pem { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(QuicError::Missing { what, expected: "CERTIFICATE" });
    }
    Ok(certs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_an_error() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let server = ca.issue_server(&["127.0.0.1".into()]).unwrap();
        assert!(server_config(&ca.cert_pem(), &server.cert_pem, &server.key_pem).is_ok());
        assert!(matches!(server_config("", &server.cert_pem, &server.key_pem), Err(QuicError::Missing { .. })));
        assert!(server_config(&ca.cert_pem(), "junk", &server.key_pem).is_err());
        assert!(server_config(&ca.cert_pem(), &server.cert_pem, "").is_err());
        let other = ca.issue_server(&["127.0.0.1".into()]).unwrap();
        assert!(server_config(&ca.cert_pem(), &server.cert_pem, &other.key_pem).is_err(), "mismatched key");
    }

    #[test]
    fn handler_errors_map_to_codes() {
        assert_eq!(HandlerError::Unavailable("x".into()).code(), SyncErrorCode::Unavailable);
        assert_eq!(HandlerError::Refused("x".into()).code(), SyncErrorCode::Refused);
    }
}
