//! Shared by the QUIC tests: a test CA, an in-memory ledger behind `SyncHandler`, a server on
//! 127.0.0.1 port 0, and a raw client that speaks the wire protocol directly.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgecard_coordinator::pki::{CertificateAuthority, IssuedCert};
use edgecard_coordinator::quic::{self, HandlerError, QuicMetrics, SyncHandler};
use edgecard_node::sync_link::{client_config, SyncLinkConfig};
use edgecard_protocol::{
    ControlMessage, KeyId, NodeId, OrderEvent, OrderEventKind, OrderId, Sku, SyncAck, SyncErrorCode, SyncTiming,
    SyncUpload, UnixMillis, MAX_SYNC_MESSAGE_BYTES,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Polls `condition` every 20 ms until it holds; panics after [`WAIT`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

#[derive(Default)]
pub struct NodeLedger {
    pub high_water: u64,
    pub events: BTreeMap<u64, OrderEvent>,
    /// Events received again at or below the high-water mark (skipped, not stored).
    pub skipped: u64,
    /// Events that would have been stored twice: must stay 0.
    pub duplicates: u64,
    pub uploads: u64,
    pub last_control_applied: u64,
    /// Refused control messages as reported, in arrival order.
    pub refused: Vec<edgecard_protocol::RefusedControl>,
}

/// A ledger in memory with the coordinator's ingest rules: idempotent by (node, seq), acked by
/// high-water mark, the ack never past the upload's last event.
#[derive(Default)]
pub struct MemoryLedger {
    pub nodes: Mutex<HashMap<NodeId, NodeLedger>>,
    pub revoked: Mutex<HashSet<NodeId>>,
    pub control: Mutex<HashMap<NodeId, Vec<ControlMessage>>>,
    /// Fail this many uploads after recording their events (a crash between commit and ack).
    pub fail_after_commit: AtomicU32,
    pub failed_after_commit: AtomicU64,
}

impl MemoryLedger {
    pub fn revoke(&self, node: &NodeId) {
        self.revoked.lock().insert(node.clone());
    }

    pub fn push_control(&self, node: &NodeId, message: ControlMessage) {
        self.control.lock().entry(node.clone()).or_default().push(message);
    }

    pub fn with<T>(&self, node: &NodeId, f: impl FnOnce(&NodeLedger) -> T) -> T {
        let nodes = self.nodes.lock();
        let empty = NodeLedger::default();
        f(nodes.get(node).unwrap_or(&empty))
    }

    pub fn event_count(&self, node: &NodeId) -> usize {
        self.with(node, |l| l.events.len())
    }
}

impl SyncHandler for MemoryLedger {
    fn handle_upload(
        &self,
        node: &NodeId,
        upload: SyncUpload,
    ) -> impl Future<Output = Result<SyncAck, HandlerError>> + Send {
        let result = (|| {
            let mut nodes = self.nodes.lock();
            let ledger = nodes.entry(node.clone()).or_default();
            ledger.uploads += 1;
            ledger.last_control_applied = upload.control_applied;
            ledger.refused.extend(upload.refused_control.iter().cloned());
            for event in &upload.events {
                if event.seq <= ledger.high_water {
                    ledger.skipped += 1;
                    continue;
                }
                if ledger.events.insert(event.seq, event.clone()).is_some() {
                    ledger.duplicates += 1;
                }
                ledger.high_water = event.seq;
            }
            let high_water = match upload.events.last() {
                Some(last) => ledger.high_water.min(last.seq),
                None => ledger.high_water,
            };
            drop(nodes);
            let decrement = |n: u32| n.checked_sub(1);
            if self.fail_after_commit.fetch_update(Ordering::SeqCst, Ordering::SeqCst, decrement).is_ok() {
                self.failed_after_commit.fetch_add(1, Ordering::SeqCst);
                return Err(HandlerError::Unavailable("simulated crash after commit".into()));
            }
            let control = self
                .control
                .lock()
                .get(node)
                .map(|all| all.iter().filter(|m| m.seq > upload.control_applied).cloned().collect())
                .unwrap_or_default();
            Ok(SyncAck {
                events_high_water: high_water,
                control,
                ledger_high_water: high_water,
                restore: vec![],
                confirmed: true,
            })
        })();
        std::future::ready(result)
    }

    fn is_revoked(&self, node: &NodeId) -> bool {
        self.revoked.lock().contains(node)
    }
}

pub struct TestPki {
    pub ca: CertificateAuthority,
    pub server: IssuedCert,
}

impl TestPki {
    pub fn new() -> Self {
        let ca = CertificateAuthority::generate("Edgecard test CA").unwrap();
        let server = ca.issue_server(&["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        TestPki { ca, server }
    }

    pub fn node_cert(&self, name: &str) -> IssuedCert {
        self.ca.issue_node(&node(name)).unwrap()
    }

    pub fn link_config(&self, addr: SocketAddr, cert: &IssuedCert, timing: SyncTiming) -> SyncLinkConfig {
        SyncLinkConfig {
            coordinator_addr: addr,
            server_name: "127.0.0.1".into(),
            ca_cert_pem: self.ca.cert_pem(),
            node_cert_pem: cert.cert_pem.clone(),
            node_key_pem: cert.key_pem.clone(),
            timing,
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub ledger: Arc<MemoryLedger>,
    pub metrics: Arc<QuicMetrics>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(pki: &TestPki) -> Self {
        let endpoint = quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &pki.ca.cert_pem(),
            &pki.server.cert_pem,
            &pki.server.key_pem,
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let ledger = Arc::new(MemoryLedger::default());
        let metrics = Arc::new(QuicMetrics::default());
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(quic::serve_with_metrics(endpoint, ledger.clone(), metrics.clone(), rx));
        TestServer { addr, ledger, metrics, shutdown, task }
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        bounded("server shutdown", self.task).await.unwrap().unwrap();
    }
}

/// A raw client endpoint holding `cert`, trusting `ca_pem`.
pub fn raw_client(ca_pem: &str, cert: &IssuedCert) -> quinn::Endpoint {
    let config = SyncLinkConfig {
        coordinator_addr: "127.0.0.1:1".parse().unwrap(),
        server_name: "127.0.0.1".into(),
        ca_cert_pem: ca_pem.to_owned(),
        node_cert_pem: cert.cert_pem.clone(),
        node_key_pem: cert.key_pem.clone(),
        timing: SyncTiming::default(),
    };
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(&config).unwrap());
    endpoint
}

/// How one exchange ended, seen from the client.
#[derive(Debug)]
pub enum Exchange {
    Acked(SyncAck),
    /// The server reset the stream with this code.
    Reset(Option<SyncErrorCode>),
    /// The connection failed or was closed (handshake refused, revoked, ...).
    Lost(quinn::ConnectionError),
    Other(String),
}

pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let connecting = endpoint.connect(addr, "127.0.0.1").unwrap();
    bounded("handshake", connecting).await
}

/// Sends `bytes` on a new stream and reads the answer.
pub async fn exchange(connection: &quinn::Connection, bytes: &[u8]) -> Exchange {
    bounded("exchange", async {
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return Exchange::Lost(e),
        };
        match send.write_all(bytes).await {
            Ok(()) => {}
            Err(quinn::WriteError::ConnectionLost(e)) => return Exchange::Lost(e),
            // The server may reset before reading everything; the read below says why.
            Err(_) => {}
        }
        let _ = send.finish();
        match recv.read_to_end(MAX_SYNC_MESSAGE_BYTES).await {
            Ok(reply) => match SyncAck::from_bytes(&reply) {
                Ok(ack) => Exchange::Acked(ack),
                Err(e) => Exchange::Other(e.to_string()),
            },
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                Exchange::Reset(SyncErrorCode::from_code(code.into_inner()))
            }
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Exchange::Lost(e),
            Err(e) => Exchange::Other(e.to_string()),
        }
    })
    .await
}

pub fn event(node_id: &NodeId, seq: u64) -> OrderEvent {
    OrderEvent {
        node_id: node_id.clone(),
        seq,
        at: UnixMillis(1_700_000_000_000 + seq),
        order_id: OrderId::from_bytes([seq as u8; 16]),
        sku: Sku::new("game").unwrap(),
        kind: OrderEventKind::Delivered { key_ids: vec![KeyId(seq)] },
    }
}

pub fn upload_bytes(node_id: &NodeId, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    SyncUpload {
        node_id: node_id.clone(),
        incarnation: 1,
        newest_seq: *seqs.end(),
        events: seqs.map(|seq| event(node_id, seq)).collect(),
        control_applied: 0,
        stock: vec![],
        refused_control: vec![],
        lookups: vec![],
    }
    .to_bytes()
    .unwrap()
}

pub fn application_code(error: &quinn::ConnectionError) -> Option<SyncErrorCode> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => SyncErrorCode::from_code(close.error_code.into_inner()),
        _ => None,
    }
}
