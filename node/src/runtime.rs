//! Starting and stopping a node: store, engine, grants, listeners and background tasks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{verify_and_install, AdminApi, GrantSource};
use crate::api::NodeApi;
use crate::catalog::Catalog;
use crate::client_ip::ClientIpResolver;
use crate::config::NodeConfig;
use crate::http_server::{self, Handler, ServerOptions};
use crate::limiter::{spawn_eviction, Limiters};
use crate::metrics::{HttpMetrics, NodeMetricsSources, OrderMetrics, StoreMetrics};
use crate::orders::engine::now_millis;
use crate::orders::{OrderEngine, Startup};
use crate::payments::return_link::ReturnLinks;
use crate::payments::LabPayments;
use crate::store::{Store, StoreError};
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot create {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub https_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub public_url: String,
    /// Where the self-signed certificate was written, when one was generated.
    pub self_signed_cert: Option<PathBuf>,
    pub engine: Arc<OrderEngine>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish, stops background tasks, closes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.engine.store().close();
        tracing::info!("node stopped");
    }
}

/// The return-link key's file in the data directory (made at first start, 0600).
pub const RETURN_LINK_KEY_FILE: &str = "return-link.key";

/// Days before expiry from which the node warns about its certificate.
pub const CERTIFICATE_WARNING_DAYS: i64 = 21;

/// A warning when a certificate valid until `not_after` (unix seconds) has expired or expires
/// within [`CERTIFICATE_WARNING_DAYS`] at `now`.
pub fn certificate_warning(not_after: i64, now: i64) -> Option<String> {
    let left = not_after - now;
    let until = crate::time_fmt::rfc3339(edgecard_protocol::UnixMillis(not_after.max(0) as u64 * 1000));
    if left <= 0 {
        Some(format!("the TLS certificate expired on {until}: browsers and CDNs refuse it"))
    } else if left < CERTIFICATE_WARNING_DAYS * 86_400 {
        Some(format!("the TLS certificate expires on {until}, in {} days: renew it", left / 86_400))
    } else {
        None
    }
}

/// Opens the node's store sealed under its key (see `edgecard_store::seal`): refused with the
/// wrong key, a plaintext store from an earlier release migrated.
fn open_sealed_store(config: &NodeConfig, store_dir: &std::path::Path) -> Result<Store, NodeError> {
    let key_file = config.sealing_key_file();
    let (sealer, created) = edgecard_store::seal::load_sealer(&key_file, &config.data_dir, store_dir)
        .map_err(|e| NodeError::Config(e.to_string()))?;
    if created {
        tracing::info!(key_file = %key_file.display(), "made a new sealing key (0600); back it up: the store cannot be read without it");
    }
    let options = edgecard_store::StoreOptions {
        cache_capacity: config.store.cache_capacity_mb.saturating_mul(1 << 20),
        sealer: Some(Arc::new(sealer)),
        ..edgecard_store::StoreOptions::default()
    };
    Ok(Store::open_with(store_dir, options, Arc::new(StoreMetrics::default()))?)
}

pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    tls::install_crypto_provider();
    let coordinator_key = edgecard_protocol::decode_verifying_key(&config.trust.coordinator_key)
        .map_err(|e| NodeError::Config(format!("trust.coordinator_key: {e}")))?;
    let store_dir = config.data_dir.join("store");
    // Card keys live under the data dir: private to this user (0700), tightened if it was not.
    let tightened = edgecard_store::private::make_private(&config.data_dir)
        .map_err(|source| NodeError::DataDir { path: config.data_dir.clone(), source })?;
    if !tightened.is_empty() {
        tracing::warn!(dir = %config.data_dir.display(), paths = tightened.len(), "the data dir was readable by other users; made private (0700 dirs, 0600 files)");
    }
    std::fs::create_dir_all(&store_dir).map_err(|source| NodeError::DataDir { path: store_dir.clone(), source })?;
    let store = Arc::new(open_sealed_store(&config, &store_dir)?);
    let products = match crate::orders::engine::stored_catalog(&store)? {
        Some(from_coordinator) => from_coordinator,
        None => config.products.clone(),
    };
    let catalog = Arc::new(Catalog::new(products));
    let order_metrics = Arc::new(OrderMetrics::default());
    // With a coordinator, a restarted node sells nothing until the coordinator has confirmed its
    // data dir (a restored older copy must not resell keys the ledger knows as taken).
    let startup = if config.coordinator.is_some() { Startup::AwaitCoordinator } else { Startup::Standalone };
    let engine = Arc::new(
        OrderEngine::open_with(config.node_id.clone(), store, catalog, config.orders.clone(), order_metrics, startup)
            .await?,
    );

    for path in &config.trust.grant_files {
        match std::fs::read(path) {
            Ok(bytes) => match verify_and_install(&engine, &coordinator_key, &bytes, GrantSource::Operator).await {
                Ok(outcome) => {
                    tracing::info!(file = %path.display(), ?outcome, "grant file loaded");
                    // The store holds its keys sealed; the file is the one plaintext copy left.
                    tracing::warn!(file = %path.display(), "this grant file holds card keys in plaintext and is no longer needed: delete it (grants are transient)");
                }
                Err(e) => tracing::error!(file = %path.display(), reason = %e, "grant file refused"),
            },
            Err(e) => tracing::error!(file = %path.display(), error = %e, "grant file unreadable"),
        }
    }

    let (tls_config, self_signed_cert) = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => {
            let not_after = tls::check_server_files(cert, key)?;
            if let Some(warning) = certificate_warning(not_after, now_millis().0 as i64 / 1000) {
                tracing::warn!(cert = %cert.display(), "{warning}");
            }
            (tls::load_server_config(cert, key)?, None)
        }
        _ => {
            let generated = tls::self_signed(&["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
            let tls_dir = config.data_dir.join("tls");
            std::fs::create_dir_all(&tls_dir).map_err(|source| NodeError::DataDir { path: tls_dir.clone(), source })?;
            let cert_path = tls_dir.join("self-signed-cert.pem");
            std::fs::write(&cert_path, &generated.cert_pem)
                .map_err(|source| NodeError::DataDir { path: cert_path.clone(), source })?;
            // Everything under the data dir stays private, the public certificate too.
            edgecard_store::private::make_private(&tls_dir)
                .map_err(|source| NodeError::DataDir { path: tls_dir.clone(), source })?;
            tracing::warn!(cert = %cert_path.display(), "no TLS certificate configured: serving a self-signed one");
            (tls::server_config_from_pem(generated.cert_pem.as_bytes(), generated.key_pem.as_bytes())?, Some(cert_path))
        }
    };

    let https_listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| NodeError::Bind { addr: config.http.listen, source })?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| NodeError::Bind { addr: config.admin.listen, source })?;
    let https_addr =
        https_listener.local_addr().map_err(|source| NodeError::Bind { addr: config.http.listen, source })?;
    let admin_addr =
        admin_listener.local_addr().map_err(|source| NodeError::Bind { addr: config.admin.listen, source })?;
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("https://{https_addr}"));

    let limiters = Arc::new(Limiters::new(&config.limits).map_err(NodeError::Config)?);
    let return_links =
        ReturnLinks::load_or_create(&config.data_dir.join(RETURN_LINK_KEY_FILE), config.payments.return_link_ttl_secs)
            .map_err(NodeError::Config)?;
    let payments = crate::payments::build(&config, &return_links).map_err(NodeError::Config)?;
    let channels = payments.channels.clone();
    let sandbox = payments.sandbox.clone();
    if channels.is_empty() {
        tracing::warn!("no payment channel is enabled: orders cannot be created");
    }
    if payments.lab == LabPayments::BesideRealChannels {
        tracing::warn!(
            "lab payments are on beside real channels (payments.sandbox.allow_beside_real_channels): \
             the sandbox pays for free wherever payments.routes lists it"
        );
    }
    for warning in crate::payments::route_table::unserved_currencies(&config) {
        tracing::warn!("{warning}");
    }

    let challenge_metrics = Arc::new(crate::metrics::ChallengeMetrics::default());
    let abuse = Arc::new(
        crate::abuse::Abuse::load_or_create(config.abuse.clone(), &config.data_dir, challenge_metrics.clone())
            .map_err(NodeError::Config)?,
    );
    {
        let abuse = abuse.clone();
        engine.observe_expiries(Box::new(move |client| abuse.note_expired(client, now_millis().0)));
    }

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mail_metrics = Arc::new(crate::mail::metrics::MailMetrics::default());
    let mail_worker = crate::mail::start(
        config.mail.as_ref(),
        &engine,
        &return_links,
        &public_url,
        mail_metrics.clone(),
        shutdown_rx.clone(),
    )
    .map_err(NodeError::Config)?;
    let http_metrics = Arc::new(HttpMetrics::default());
    let api = Arc::new(NodeApi {
        engine: engine.clone(),
        limiters: limiters.clone(),
        client_ip: ClientIpResolver::new(config.client_ip.trusted_proxies.clone(), config.client_ip.header),
        channels,
        router: payments.router.clone(),
        sandbox,
        return_links,
        lab: payments.lab,
        public_url: public_url.clone(),
        max_body_bytes: config.http.max_body_bytes,
        metrics: http_metrics.clone(),
        abuse,
    });
    let sync_metrics = Arc::new(crate::sync_link::SyncLinkMetrics::default());
    let mut registry = crate::metrics::node_registry(NodeMetricsSources {
        node_id: config.node_id.as_str(),
        region: &config.region,
        engine: engine.clone(),
        limiters: limiters.clone(),
        http: &http_metrics,
        payments: &payments.router,
        sync: &sync_metrics,
        challenges: &challenge_metrics,
    });
    mail_metrics.register(&mut registry);
    let admin = Arc::new(AdminApi {
        engine: engine.clone(),
        registry: Arc::new(registry),
        coordinator_key,
        token: config.admin.token.clone(),
        region: config.region.clone(),
        payments: payments.router.clone(),
        lab: payments.lab,
    });

    let options = ServerOptions {
        max_connections: config.http.max_connections,
        header_read_timeout: Duration::from_millis(config.http.header_read_timeout_ms),
        ..ServerOptions::default()
    };
    let hsts = (config.http.hsts_max_age_secs > 0)
        .then(|| http::HeaderValue::from_str(&format!("max-age={}", config.http.hsts_max_age_secs)).ok())
        .flatten();
    let api_handler: Handler = Arc::new(move |request, peer| {
        let (api, hsts) = (api.clone(), hsts.clone());
        Box::pin(async move {
            let mut response = api.handle(request, peer).await;
            if let Some(hsts) = hsts {
                response.headers_mut().insert(http::header::STRICT_TRANSPORT_SECURITY, hsts);
            }
            response
        })
    });
    let admin_handler: Handler = Arc::new(move |request, peer| Box::pin(admin.clone().handle(request, peer)));
    let mut tasks = Vec::new();
    let rx = shutdown_rx.clone();
    let opts = options.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = http_server::serve(https_listener, Some(tls_config), api_handler, opts, rx).await {
            tracing::error!(error = %e, "HTTPS listener failed");
        }
    }));
    let rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = http_server::serve(admin_listener, None, admin_handler, options, rx).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    }));
    tasks.push(spawn_expiry_sweeper(
        engine.clone(),
        Duration::from_millis(config.orders.expiry_sweep_ms),
        shutdown_rx.clone(),
    ));
    if let Some(compensation) = payments.compensation {
        tasks.push(crate::payments::compensation::spawn(
            engine.clone(),
            payments.router.clone(),
            compensation,
            shutdown_rx.clone(),
        ));
    }
    tasks.extend(mail_worker);
    tasks.push(crate::payments::refunds::spawn(engine.clone(), payments.router.clone(), shutdown_rx.clone()));
    let shutdown_rx_link = shutdown_rx.clone();
    let eviction = spawn_eviction(limiters, config.limits.evict_every(), shutdown_rx);
    tasks.push(tokio::spawn(async move {
        let _ = eviction.await;
    }));

    if let Some(link) = &config.coordinator {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| NodeError::DataDir { path: path.clone(), source })
        };
        let link_config = crate::sync_link::SyncLinkConfig {
            coordinator_addr: link.addr,
            server_name: link.server_name.clone(),
            ca_cert_pem: read(&link.ca_cert)?,
            node_cert_pem: read(&link.node_cert)?,
            node_key_pem: read(&link.node_key)?,
            timing: edgecard_protocol::SyncTiming { idle_poll_ms: link.idle_poll_ms, ..Default::default() },
        };
        let handle = crate::sync_link::spawn_with_metrics(
            engine.clone(),
            coordinator_key,
            link_config,
            sync_metrics,
            shutdown_rx_link.clone(),
        )
        .map_err(|e| NodeError::Config(format!("coordinator: {e}")))?;
        tasks.push(tokio::spawn(async move {
            let _ = handle.await;
        }));
    } else {
        tasks.push(spawn_standalone_outbox_pruner(engine.clone(), shutdown_rx_link.clone()));
    }

    tracing::info!(node = %config.node_id, region = %config.region, %https_addr, %admin_addr, "node serving");
    Ok(RunningNode { https_addr, admin_addr, public_url, self_signed_cert, engine, shutdown, tasks })
}

/// A node without a coordinator has no ledger to feed: its events are acknowledged as soon as they
/// are durable, so the outbox and the take windows stay empty (its orders stay in the store) and
/// a restart has nothing to replay.
fn spawn_standalone_outbox_pruner(engine: Arc<OrderEngine>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let notify = engine.outbox_notify();
        let mut ticker = tokio::time::interval(STANDALONE_PRUNE_EVERY);
        loop {
            tokio::select! {
                () = notify.notified() => {}
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            // Every event up to `newest` is applied; after the flush it is durable.
            let newest = engine.outbox_newest();
            if newest <= engine.sync_progress().map_or(u64::MAX, |(acked, _)| acked) {
                continue;
            }
            if let Err(e) = engine.store().durable().await {
                tracing::warn!(error = %e, "outbox not pruned: the store is not durable");
                continue;
            }
            if let Err(e) = engine.record_sync_ack(newest) {
                tracing::warn!(error = %e, "outbox not pruned");
            }
        }
    })
}

/// How often a standalone node prunes its outbox at least (it also does on every new event).
const STANDALONE_PRUNE_EVERY: Duration = Duration::from_secs(1);

fn spawn_expiry_sweeper(
    engine: Arc<OrderEngine>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = engine.expire_due(now_millis()).await {
                        tracing::error!(error = %e, "expiring reservations failed");
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    })
}
