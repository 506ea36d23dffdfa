//! Initialising a coordinator's data directory, and starting and stopping a coordinator.
//!
//! `init` writes everything a coordinator needs into one directory: the grant-signing key, the
//! private CA, the sync endpoint's server certificate, and `coordinator.toml`. `start` serves the
//! admin API and the QUIC sync endpoint from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use edgecard_net::http_server::{self, Handler, ServerOptions};
use edgecard_protocol::{decode_signing_key, encode_signing_key, encode_verifying_key, NodeId, SyncAck, SyncUpload};
use edgecard_store::{Store, StoreMetrics};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_api::{AdminApi, BundleIssuer};
use crate::enrol::server::{EnrolApi, NodeLinkFacts};
use crate::enrol::token::{fingerprint, JoinToken, TokenSecret};
use crate::pki::CertificateAuthority;
use crate::quic::{self, HandlerError, SyncHandler};
use crate::service::{self, Coordinator, CoordinatorError, Settings};

pub const CONFIG_FILE: &str = "coordinator.toml";
pub const SIGNING_KEY_FILE: &str = "grant-signing.key";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const SERVER_CERT_FILE: &str = "sync-server-cert.pem";
pub const SERVER_KEY_FILE: &str = "sync-server-key.pem";
/// The sync endpoint's stateless-reset key, kept so a restarted coordinator can reset the
/// connections of its previous process.
pub const RESET_KEY_FILE: &str = "sync-reset.key";
/// Environment variable that overrides `admin_token`.
pub const ENV_ADMIN_TOKEN: &str = "EDGECARD_ADMIN_TOKEN";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Admin API listener (the CLI talks to it). Default "127.0.0.1:7070": keep it on loopback.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token of the admin API (env EDGECARD_ADMIN_TOKEN overrides).
    #[serde(default)]
    pub admin_token: String,
    /// Read-only bearer token for `GET /metrics` on the admin listener, for Prometheus; it opens
    /// nothing else. Empty (the default for configs written before it): only the admin token
    /// opens `/metrics`. `init` generates one.
    #[serde(default)]
    pub metrics_token: String,
    /// QUIC sync listener. Default "0.0.0.0:7443".
    #[serde(default = "default_sync_listen")]
    pub sync_listen: SocketAddr,
    /// The address nodes dial, written into node bundles. Default: `sync_listen`.
    #[serde(default)]
    pub sync_public_addr: Option<SocketAddr>,
    /// TCP listener of the enrolment endpoint (HTTPS; see `enrol::server`). Default: the sync
    /// listener's address and port, over TCP (any free port when the sync port is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrol_listen: Option<SocketAddr>,
    /// The address join tokens send nodes to enrol. Default: the IP of `sync_public_addr` with
    /// the enrolment listener's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrol_public_addr: Option<SocketAddr>,
    /// The name in the sync server certificate that nodes verify. Default "localhost".
    #[serde(default = "default_server_name")]
    pub sync_server_name: String,
    /// Lease length of granted slices, in hours. Default 24.
    #[serde(default = "default_lease_hours")]
    pub lease_hours: u64,
    /// Lease length in seconds; when set, overrides `lease_hours` (for labs and tests).
    #[serde(default)]
    pub lease_secs: Option<u64>,
    /// Largest tolerated difference between a node's clock and the coordinator's, in seconds:
    /// a dark node's slice is reclaimed only after its lease deadline plus this. Default 300.
    #[serde(default = "default_max_clock_skew_secs")]
    pub max_clock_skew_secs: u64,
    /// Most takes a node may have from one slice that the coordinator has not acknowledged.
    /// Bounds what stays quarantined when a node goes dark, and how many keys a cut-off node
    /// can still sell per slice. Default 10000.
    #[serde(default = "default_take_window")]
    pub take_window: u64,
    /// How often the coordinator looks for leases run out past the skew margin, in seconds.
    /// Default 10.
    #[serde(default = "default_reclaim_check_secs")]
    pub reclaim_check_secs: u64,
    /// sled page cache in MiB. Default 64.
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
    /// The key file that seals the store at rest (0600, made by `init` with a fresh key).
    /// Relative paths are relative to the coordinator's dir, and it must lie outside it.
    /// Default: beside the dir, `<dir>.sealing-key`. EDGECARD_SEALING_KEY, when set, holds the
    /// key ring instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key_file: Option<PathBuf>,
}

/// The sealing key file of the coordinator in `dir` (see [`CoordinatorConfig::sealing_key_file`]).
pub fn sealing_key_file(dir: &Path, config: &CoordinatorConfig) -> PathBuf {
    match &config.sealing_key_file {
        Some(path) => dir.join(path),
        None => edgecard_store::seal::default_key_file(dir),
    }
}

/// Opens the coordinator's store sealed under its key: refused with the wrong key, a plaintext
/// store from an earlier release migrated.
fn open_sealed_store(dir: &Path, config: &CoordinatorConfig) -> Result<Store, RuntimeError> {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).map_err(io(&store_dir))?;
    let key_file = sealing_key_file(dir, config);
    let (sealer, created) = edgecard_store::seal::load_sealer(&key_file, dir, &store_dir)
        .map_err(|e| RuntimeError::Other(e.to_string()))?;
    if created {
        tracing::info!(key_file = %key_file.display(), "made a new sealing key (0600); back it up: the store cannot be read without it");
    }
    let options = edgecard_store::StoreOptions {
        cache_capacity: config.cache_capacity_mb.saturating_mul(1 << 20),
        sealer: Some(Arc::new(sealer)),
        ..edgecard_store::StoreOptions::default()
    };
    Store::open_with(&store_dir, options, Arc::new(StoreMetrics::default()))
        .map_err(|e| RuntimeError::Other(e.to_string()))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}
fn default_sync_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_lease_hours() -> u64 {
    24
}
fn default_cache_mb() -> u64 {
    64
}
fn default_max_clock_skew_secs() -> u64 {
    300
}
fn default_take_window() -> u64 {
    10_000
}
fn default_reclaim_check_secs() -> u64 {
    10
}

impl CoordinatorConfig {
    /// A configuration with every optional field at its default.
    pub fn with_listeners(admin_listen: SocketAddr, sync_listen: SocketAddr) -> Self {
        CoordinatorConfig {
            admin_listen,
            admin_token: String::new(),
            metrics_token: String::new(),
            sync_listen,
            sync_public_addr: None,
            enrol_listen: None,
            enrol_public_addr: None,
            sync_server_name: default_server_name(),
            lease_hours: default_lease_hours(),
            lease_secs: None,
            max_clock_skew_secs: default_max_clock_skew_secs(),
            take_window: default_take_window(),
            reclaim_check_secs: default_reclaim_check_secs(),
            cache_capacity_mb: default_cache_mb(),
            sealing_key_file: None,
        }
    }

    pub fn settings(&self) -> Settings {
        let lease_secs = self.lease_secs.unwrap_or(self.lease_hours.saturating_mul(3600));
        Settings {
            lease: Duration::from_secs(lease_secs),
            max_clock_skew: Duration::from_secs(self.max_clock_skew_secs),
            take_window: self.take_window,
            ..Settings::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io { path: path.to_path_buf(), source }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), RuntimeError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct Initialised {
    pub config_path: PathBuf,
    pub admin_token: String,
    pub metrics_token: String,
    pub verifying_key: String,
}

/// Creates a coordinator data directory. Refuses to overwrite an existing one.
pub fn init(dir: &Path, mut config: CoordinatorConfig) -> Result<Initialised, RuntimeError> {
    // The signing key, the CA key and the key pool live here: private to this user.
    edgecard_store::private::make_private(dir).map_err(io(dir))?;
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Err(RuntimeError::Invalid { path: config_path, message: "already initialised".into() });
    }
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    write_private(&dir.join(SIGNING_KEY_FILE), encode_signing_key(&signing).as_bytes())?;
    let ca =
        CertificateAuthority::generate("edgecard coordinator CA").map_err(|e| RuntimeError::Other(e.to_string()))?;
    write_private(&dir.join(CA_CERT_FILE), ca.cert_pem().as_bytes())?;
    write_private(&dir.join(CA_KEY_FILE), ca.key_pem().as_bytes())?;
    let mut names = vec![config.sync_server_name.clone()];
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_string());
        }
    }
    let server = ca.issue_server(&names).map_err(|e| RuntimeError::Other(e.to_string()))?;
    write_private(&dir.join(SERVER_CERT_FILE), server.cert_pem.as_bytes())?;
    write_private(&dir.join(SERVER_KEY_FILE), server.key_pem.as_bytes())?;
    if config.admin_token.is_empty() {
        config.admin_token = random_token();
    }
    if config.metrics_token.is_empty() {
        config.metrics_token = random_token();
    }
    // The store's sealing key, outside the dir; its store is sealed from the first write.
    let key_file = sealing_key_file(dir, &config);
    edgecard_store::seal::load_sealer(&key_file, dir, &dir.join("store"))
        .map_err(|e| RuntimeError::Other(e.to_string()))?;
    let text = toml::to_string_pretty(&config).map_err(|e| RuntimeError::Other(e.to_string()))?;
    write_private(&config_path, text.as_bytes())?;
    Ok(Initialised {
        config_path,
        admin_token: config.admin_token,
        metrics_token: config.metrics_token,
        verifying_key: encode_verifying_key(&signing.verifying_key()),
    })
}

/// 24 random bytes in hex.
fn random_token() -> String {
    let mut token = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut token);
    hex_encode(&token)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn load_config(dir: &Path) -> Result<CoordinatorConfig, RuntimeError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut config: CoordinatorConfig =
        toml::from_str(&text).map_err(|e| RuntimeError::Invalid { path: path.clone(), message: e.to_string() })?;
    if let Ok(token) = std::env::var(ENV_ADMIN_TOKEN) {
        config.admin_token = token;
    }
    if config.admin_token.len() < 16 {
        return Err(RuntimeError::Invalid { path, message: "admin_token must be at least 16 characters".into() });
    }
    if !config.metrics_token.is_empty() && config.metrics_token.len() < 16 {
        return Err(RuntimeError::Invalid {
            path,
            message: "metrics_token must be empty or at least 16 characters".into(),
        });
    }
    if config.metrics_token == config.admin_token {
        return Err(RuntimeError::Invalid {
            path,
            message: "metrics_token must differ from admin_token (it is handed to Prometheus)".into(),
        });
    }
    if config.lease_hours == 0 {
        return Err(RuntimeError::Invalid { path, message: "lease_hours must be at least 1".into() });
    }
    if config.lease_secs.is_some_and(|secs| secs < 10) {
        return Err(RuntimeError::Invalid { path, message: "lease_secs must be at least 10".into() });
    }
    if config.take_window == 0 {
        return Err(RuntimeError::Invalid { path, message: "take_window must be at least 1".into() });
    }
    Ok(config)
}

/// A started coordinator.
pub struct RunningCoordinator {
    pub admin_addr: SocketAddr,
    pub sync_addr: SocketAddr,
    /// Where the enrolment endpoint listens (TCP).
    pub enrol_addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningCoordinator {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.coordinator.store().close();
        tracing::info!("coordinator stopped");
    }
}

struct Bundles {
    ca: Arc<CertificateAuthority>,
    verifying_key: String,
    sync_addr: SocketAddr,
    server_name: String,
    /// What join tokens pin and point at.
    ca_fingerprint: [u8; 32],
    enrol_addr: SocketAddr,
}

impl BundleIssuer for Bundles {
    fn issue(&self, node: &NodeId, region: &str) -> Result<Value, String> {
        let issued = self.ca.issue_node(node).map_err(|e| e.to_string())?;
        Ok(json!({
            "node_id": node.as_str(),
            "region": region,
            "node_cert_pem": issued.cert_pem,
            "node_key_pem": issued.key_pem,
            "ca_cert_pem": self.ca.cert_pem(),
            "coordinator_key": self.verifying_key,
            "coordinator_addr": self.sync_addr.to_string(),
            "coordinator_server_name": self.server_name,
        }))
    }

    fn join_token(&self, secret: &TokenSecret) -> Result<String, String> {
        let token = JoinToken {
            secret: secret.clone(),
            ca_fingerprint: self.ca_fingerprint,
            enrol_addr: self.enrol_addr,
            server_name: self.server_name.clone(),
        };
        token.encode().map_err(|e| e.to_string())
    }
}

struct LedgerHandler(Arc<Coordinator>);

impl SyncHandler for LedgerHandler {
    async fn handle_upload(&self, node: &NodeId, upload: SyncUpload) -> Result<SyncAck, HandlerError> {
        self.0.ingest(node, upload).await.map_err(|e| match e {
            CoordinatorError::Store(_) => HandlerError::Unavailable(e.to_string()),
            other => HandlerError::Refused(other.to_string()),
        })
    }

    fn is_revoked(&self, node: &NodeId) -> bool {
        self.0.is_revoked(node)
    }
}

/// The persisted reset key, made on first use (also for directories initialised before it
/// existed).
fn reset_key(dir: &Path) -> Result<[u8; 64], RuntimeError> {
    let path = dir.join(RESET_KEY_FILE);
    if !path.exists() {
        let mut key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut key);
        write_private(&path, hex_encode(&key).as_bytes())?;
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let invalid = || RuntimeError::Invalid { path: path.clone(), message: "expected 128 hex characters".into() };
    let text = text.trim();
    if text.len() != 128 || !text.is_ascii() {
        return Err(invalid());
    }
    let mut key = [0u8; 64];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(key)
}

fn read(dir: &Path, name: &str) -> Result<String, RuntimeError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(io(&path))
}

pub async fn start(dir: &Path, config: CoordinatorConfig) -> Result<RunningCoordinator, RuntimeError> {
    edgecard_net::tls::install_crypto_provider();
    let signing = decode_signing_key(&read(dir, SIGNING_KEY_FILE)?)
        .map_err(|e| RuntimeError::Invalid { path: dir.join(SIGNING_KEY_FILE), message: e.to_string() })?;
    let ca = CertificateAuthority::from_pem(&read(dir, CA_CERT_FILE)?, &read(dir, CA_KEY_FILE)?)
        .map_err(|e| RuntimeError::Invalid { path: dir.join(CA_CERT_FILE), message: e.to_string() })?;
    let tightened = edgecard_store::private::make_private(dir).map_err(io(dir))?;
    if !tightened.is_empty() {
        tracing::warn!(dir = %dir.display(), paths = tightened.len(), "the coordinator's dir was readable by other users; made private (0700 dirs, 0600 files)");
    }
    let store = open_sealed_store(dir, &config)?;
    let settings = config.settings();
    let coordinator = Arc::new(Coordinator::new(Arc::new(store), signing.clone(), settings));
    let reindexed = coordinator.migrate_dedup_index().await.map_err(|e| RuntimeError::Other(e.to_string()))?;
    if reindexed > 0 {
        tracing::info!(keys = reindexed, "key deduplication index rebuilt under a keyed hash");
    }

    let server_cert_pem = read(dir, SERVER_CERT_FILE)?;
    let server_key_pem = read(dir, SERVER_KEY_FILE)?;
    let endpoint = quic::server_endpoint_with_reset_key(
        config.sync_listen,
        &ca.cert_pem(),
        &server_cert_pem,
        &server_key_pem,
        &reset_key(dir)?,
    )
    .map_err(|e| RuntimeError::Other(e.to_string()))?;
    let sync_addr = endpoint.local_addr().map_err(io(dir))?;
    let enrol_bind = config.enrol_listen.unwrap_or(if config.sync_listen.port() == 0 {
        SocketAddr::new(sync_addr.ip(), 0)
    } else {
        sync_addr
    });
    let enrol_listener = TcpListener::bind(enrol_bind)
        .await
        .map_err(|e| RuntimeError::Other(format!("cannot listen for enrolment on tcp {enrol_bind}: {e}")))?;
    let enrol_addr = enrol_listener.local_addr().map_err(io(dir))?;
    // The CA follows the server certificate, so a node can find the CA its join token pins.
    let enrol_tls = edgecard_net::tls::server_config_from_pem(
        format!("{server_cert_pem}\n{}", ca.cert_pem()).as_bytes(),
        server_key_pem.as_bytes(),
    )
    .map_err(|e| RuntimeError::Invalid { path: dir.join(SERVER_CERT_FILE), message: e.to_string() })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| RuntimeError::Other(format!("cannot listen on {}: {e}", config.admin_listen)))?;
    let admin_addr = admin_listener.local_addr().map_err(io(dir))?;

    let public_sync = config.sync_public_addr.unwrap_or(if sync_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], sync_addr.port()))
    } else {
        sync_addr
    });
    let ca = Arc::new(ca);
    let ca_der = crate::pki::certificate_der(&ca.cert_pem()).ok_or_else(|| RuntimeError::Invalid {
        path: dir.join(CA_CERT_FILE),
        message: "no CERTIFICATE block".into(),
    })?;
    let enrol_public = config.enrol_public_addr.unwrap_or(SocketAddr::new(public_sync.ip(), enrol_addr.port()));
    let bundles = Arc::new(Bundles {
        ca: ca.clone(),
        verifying_key: encode_verifying_key(&signing.verifying_key()),
        sync_addr: public_sync,
        server_name: config.sync_server_name.clone(),
        ca_fingerprint: fingerprint(&ca_der),
        enrol_addr: enrol_public,
    });
    let enrol = Arc::new(EnrolApi::new(
        coordinator.clone(),
        ca,
        NodeLinkFacts {
            coordinator_key: encode_verifying_key(&signing.verifying_key()),
            sync_addr: public_sync,
            server_name: config.sync_server_name.clone(),
        },
    ));
    let enrol_metrics = enrol.metrics().clone();
    let enrol_handler: Handler = Arc::new(move |request, peer| Box::pin(enrol.clone().handle(request, peer)));
    let quic_metrics = Arc::new(quic::QuicMetrics::default());
    let mut registry = crate::metrics::coordinator_registry(coordinator.clone(), &quic_metrics);
    enrol_metrics.register(&mut registry);
    let admin = Arc::new(AdminApi {
        coordinator: coordinator.clone(),
        token: config.admin_token.clone(),
        metrics_token: Some(config.metrics_token.clone()).filter(|t| !t.is_empty()),
        bundles,
        registry: Arc::new(registry),
    });
    let handler: Handler = Arc::new(move |request, peer| Box::pin(admin.clone().handle(request, peer)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = http_server::serve(admin_listener, None, handler, ServerOptions::default(), rx).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    }));
    let rx = shutdown_rx.clone();
    // Enrolment is rare: few connections, short timeouts.
    let enrol_options = ServerOptions {
        max_connections: 256,
        header_read_timeout: Duration::from_secs(5),
        tls_handshake_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(2),
    };
    tasks.push(tokio::spawn(async move {
        if let Err(e) = http_server::serve(enrol_listener, Some(enrol_tls), enrol_handler, enrol_options, rx).await {
            tracing::error!(error = %e, "enrolment listener failed");
        }
    }));
    let housekeeping = coordinator.clone();
    let every = Duration::from_secs(config.reclaim_check_secs.max(1));
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = rx.changed() => break,
            }
            if let Err(e) = housekeeping.reclaim_expired(service::now_millis()).await {
                tracing::error!(error = %e, "reclaiming expired slices failed");
            }
            if let Err(e) = housekeeping.settle_closed_slices().await {
                tracing::error!(error = %e, "settling closed slices failed");
            }
        }
    }));
    let ledger = Arc::new(LedgerHandler(coordinator.clone()));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = quic::serve_with_metrics(endpoint, ledger, quic_metrics, shutdown_rx).await {
            tracing::error!(error = %e, "sync endpoint failed");
        }
    }));
    tracing::info!(%admin_addr, %sync_addr, %enrol_addr, "coordinator serving");
    Ok(RunningCoordinator { admin_addr, sync_addr, enrol_addr, coordinator, shutdown, tasks })
}
