//! The node's real sync driver against the coordinator's real QUIC server, with an in-memory
//! ledger behind it: every outbox event arrives exactly once, control messages reach the node,
//! and the outbox is pruned after the ack.

#![allow(clippy::unwrap_used)]

mod quic_support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use edgecard_node::catalog::Catalog;
use edgecard_node::config::{OrdersConfig, PriceConfig, ProductConfig};
use edgecard_node::metrics::{OrderMetrics, StoreMetrics};
use edgecard_node::orders::engine::now_millis;
use edgecard_node::orders::{CreateOrder, OrderEngine, PaymentConfirmation};
use edgecard_node::store::Store;
use edgecard_node::sync_link::{self, SyncLinkMetrics};
use edgecard_protocol::{
    CatalogProduct, ControlBody, ControlMessage, Epoch, GrantedKey, KeyId, NodeId, Secret, Sku, SliceGrant, SliceId,
    SyncTiming,
};
use quic_support::*;
use tokio::sync::watch;

fn sku() -> Sku {
    Sku::new("game-10").unwrap()
}

fn products() -> Vec<ProductConfig> {
    vec![ProductConfig {
        sku: sku(),
        title: BTreeMap::from([("en".into(), "Game card".into())]),
        prices: vec![PriceConfig { amount_minor: 1000, currency: "USD".parse().unwrap() }],
    }]
}

async fn open_engine(dir: &Path, node_id: &NodeId) -> Arc<OrderEngine> {
    let store = Arc::new(Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let config = OrdersConfig { max_open_per_ip: 10_000, max_open_per_email: 10_000, ..OrdersConfig::default() };
    Arc::new(
        OrderEngine::open(
            node_id.clone(),
            store,
            Arc::new(Catalog::new(products())),
            config,
            Arc::new(OrderMetrics::default()),
        )
        .await
        .unwrap(),
    )
}

fn grant(node_id: &NodeId, slice: u64, first_key: u64, count: u64) -> SliceGrant {
    let now = now_millis();
    SliceGrant {
        slice_id: SliceId(slice),
        sku: sku(),
        node_id: node_id.clone(),
        epoch: Epoch(1),
        issued_at: now,
        lease_deadline: now.saturating_add_ms(3_600_000),
        take_window: 1_000_000,
        keys: (first_key..first_key + count)
            .map(|k| GrantedKey { key_id: KeyId(k), secret: Secret::new(format!("SECRET-{k:06}")).unwrap() })
            .collect(),
    }
}

/// Creates and pays `n` orders: three outbox events each (reserved, paid, delivered).
async fn sell(engine: &OrderEngine, n: u32) {
    for i in 0..n {
        let created = engine
            .create_order(CreateOrder {
                sku: sku(),
                quantity: 1,
                email: None,
                currency: None,
                channel: "sandbox".into(),
                client_ip: IpAddr::from([192, 0, 2, (i % 250) as u8]),
            })
            .await
            .unwrap();
        engine
            .confirm_payment(PaymentConfirmation {
                order_id: created.record.id,
                channel: "sandbox".into(),
                provider_txn: format!("txn-{}", created.record.id),
                amount_minor: created.record.amount_minor,
                currency: created.record.currency.clone(),
                provider_ref: None,
                provider_payment: None,
            })
            .await
            .unwrap();
    }
}

fn timing(idle_poll_ms: u64) -> SyncTiming {
    SyncTiming { idle_poll_ms, backoff_min_ms: 20, backoff_max_ms: 200, max_batch_events: 16 }
}

struct Link {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<SyncLinkMetrics>,
}

impl Link {
    fn start(
        pki: &TestPki,
        server: &TestServer,
        engine: &Arc<OrderEngine>,
        key: &SigningKey,
        timing: SyncTiming,
    ) -> Link {
        let cert = pki.node_cert(engine.node_id().as_str());
        let config = pki.link_config(server.addr, &cert, timing);
        let metrics = Arc::new(SyncLinkMetrics::default());
        let (shutdown, rx) = watch::channel(false);
        let task =
            sync_link::spawn_with_metrics(engine.clone(), key.verifying_key(), config, metrics.clone(), rx).unwrap();
        Link { shutdown, task, metrics }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        bounded("link shutdown", self.task).await.unwrap();
    }
}

fn signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// Waits until the ledger holds every event up to the node's newest and the node has pruned.
async fn wait_synced(server: &TestServer, engine: &OrderEngine) {
    let newest = engine.outbox_newest();
    let node_id = engine.node_id().clone();
    eventually("all events in the ledger", || server.ledger.with(&node_id, |l| l.high_water) == newest).await;
    eventually("outbox pruned", || {
        engine.sync_progress().unwrap().0 == newest && engine.outbox_after(0, 10_000).unwrap().is_empty()
    })
    .await;
}

fn assert_exactly_once(server: &TestServer, engine: &OrderEngine, expected: usize) {
    server.ledger.with(engine.node_id(), |l| {
        assert_eq!(l.duplicates, 0, "an event was stored twice");
        assert_eq!(l.events.len(), expected, "events in the ledger");
        let seqs: Vec<u64> = l.events.keys().copied().collect();
        let want: Vec<u64> = (1..=expected as u64).collect();
        assert_eq!(seqs, want, "every seq exactly once, none missing");
        assert!(l.events.values().all(|e| &e.node_id == engine.node_id()));
    });
}

#[tokio::test]
async fn every_outbox_event_arrives_exactly_once_and_the_outbox_is_pruned() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let engine = open_engine(dir.path(), &eu).await;
    engine.install_grant(grant(&eu, 1, 1, 100)).await.unwrap();
    sell(&engine, 20).await; // 60 events: four batches of 16
    assert_eq!(engine.outbox_newest(), 60);

    let key = signing_key();
    let link = Link::start(&pki, &server, &engine, &key, timing(60_000));
    wait_synced(&server, &engine).await;
    assert_exactly_once(&server, &engine, 60);
    assert!(server.ledger.with(&eu, |l| l.uploads) >= 4, "batches are bounded");

    // New orders wake the link at once, though the idle poll is a minute away.
    sell(&engine, 5).await;
    wait_synced(&server, &engine).await;
    assert_exactly_once(&server, &engine, 75);
    assert_eq!(link.metrics.acked_seq.get(), 75);
    assert_eq!(link.metrics.lag.get(), 0);
    assert_eq!(link.metrics.connected.get(), 1);
    assert_eq!(server.metrics.connections_accepted.get(), 1, "one connection, reused");
    link.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_lost_ack_resends_the_batch_and_the_ledger_skips_it() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    // The first two uploads are recorded, then "crash" before the ack.
    server.ledger.fail_after_commit.store(2, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let engine = open_engine(dir.path(), &eu).await;
    engine.install_grant(grant(&eu, 1, 1, 100)).await.unwrap();
    sell(&engine, 12).await; // 36 events: three batches

    let key = signing_key();
    let link = Link::start(&pki, &server, &engine, &key, timing(60_000));
    wait_synced(&server, &engine).await;
    assert_eq!(server.ledger.failed_after_commit.load(Ordering::SeqCst), 2);
    assert_exactly_once(&server, &engine, 36);
    let skipped = server.ledger.with(&eu, |l| l.skipped);
    assert!(skipped >= 16, "the re-sent batches were skipped by seq, not stored again ({skipped})");
    assert!(link.metrics.failures.get() >= 2);
    link.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_node_resumes_without_duplicates() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let key = signing_key();
    {
        let engine = open_engine(dir.path(), &eu).await;
        engine.install_grant(grant(&eu, 1, 1, 100)).await.unwrap();
        sell(&engine, 5).await;
        let link = Link::start(&pki, &server, &engine, &key, timing(60_000));
        wait_synced(&server, &engine).await;
        link.stop().await;
        sell(&engine, 5).await; // written while the link is down
        engine.store().close();
    }
    let engine = open_engine(dir.path(), &eu).await;
    assert_eq!(engine.sync_progress().unwrap().0, 15, "progress survives the restart");
    let link = Link::start(&pki, &server, &engine, &key, timing(60_000));
    wait_synced(&server, &engine).await;
    assert_exactly_once(&server, &engine, 30);
    link.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn control_messages_install_grants_and_catalogs_in_order() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let engine = open_engine(dir.path(), &eu).await;
    let key = signing_key();
    let forger = signing_key();

    let forged = grant(&eu, 7, 500, 3).sign(&forger).unwrap().to_bytes().unwrap();
    let genuine = grant(&eu, 8, 600, 4).sign(&key).unwrap().to_bytes().unwrap();
    let new_sku = Sku::new("gift-50").unwrap();
    let catalog = CatalogProduct {
        sku: new_sku.clone(),
        titles: vec![("en".into(), "Gift card".into())],
        prices: vec![(5000, "USD".into())],
    };
    server.ledger.push_control(&eu, ControlMessage { seq: 1, body: ControlBody::Grant { signed_grant: forged } });
    server.ledger.push_control(&eu, ControlMessage { seq: 2, body: ControlBody::Grant { signed_grant: genuine } });
    server.ledger.push_control(&eu, ControlMessage { seq: 3, body: ControlBody::Catalog { products: vec![catalog] } });

    let link = Link::start(&pki, &server, &engine, &key, timing(100));
    eventually("control applied", || engine.sync_progress().unwrap().1 == 3).await;
    assert_eq!(engine.stock(&sku()), 4, "the genuine grant is installed, the forged one is not");
    assert!(engine.leases().iter().all(|l| l.slice_id == SliceId(8)));
    assert!(engine.catalog().get(&new_sku).is_some(), "catalog replaced");
    assert_eq!(engine.metrics().grants_refused.get(), 1, "the forged grant was refused once, not retried");
    // The coordinator hears that everything was applied, and sends nothing again.
    eventually("coordinator sees control applied", || server.ledger.with(&eu, |l| l.last_control_applied) == 3).await;
    assert_eq!(link.metrics.control_applied.get(), 3);
    // The forged grant is reported refused, once: after the ack the node forgets it.
    eventually("refusal reported", || !server.ledger.with(&eu, |l| l.refused.is_empty())).await;
    eventually("refusal cleared", || engine.refused_control(10).unwrap().is_empty()).await;
    let uploads = server.ledger.with(&eu, |l| l.uploads);
    eventually("another upload", || server.ledger.with(&eu, |l| l.uploads) > uploads + 1).await;
    let refused = server.ledger.with(&eu, |l| l.refused.clone());
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].seq, 1);
    assert!(refused[0].holds_nothing);
    assert!(refused[0].reason.contains("signature"), "{}", refused[0].reason);
    link.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_link_reconnects_after_the_coordinator_restarts() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let addr = server.addr;
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let engine = open_engine(dir.path(), &eu).await;
    engine.install_grant(grant(&eu, 1, 1, 100)).await.unwrap();
    sell(&engine, 3).await;
    let key = signing_key();
    let link = Link::start(&pki, &server, &engine, &key, timing(100));
    wait_synced(&server, &engine).await;
    let ledger = server.ledger.clone();
    server.stop().await;

    // Orders keep selling while the coordinator is away.
    sell(&engine, 3).await;
    eventually("link notices", || link.metrics.connected.get() == 0).await;

    // The coordinator comes back on the same address with the same ledger.
    let endpoint = edgecard_coordinator::quic::server_endpoint(
        addr,
        &pki.ca.cert_pem(),
        &pki.server.cert_pem,
        &pki.server.key_pem,
    )
    .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edgecard_coordinator::quic::serve(endpoint, ledger.clone(), rx));
    let newest = engine.outbox_newest();
    eventually("catch-up", || ledger.with(&eu, |l| l.high_water) == newest).await;
    ledger.with(&eu, |l| {
        assert_eq!(l.events.len(), 18);
        assert_eq!(l.duplicates, 0);
    });
    eventually("reconnected", || link.metrics.connected.get() == 1).await;
    link.stop().await;
    let _ = stop.send(true);
    bounded("server stop", task).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test]
async fn a_node_with_a_foreign_certificate_never_syncs() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let eu = node("eu-1");
    let engine = open_engine(dir.path(), &eu).await;
    engine.install_grant(grant(&eu, 1, 1, 10)).await.unwrap();
    sell(&engine, 1).await;
    let rogue_ca = edgecard_coordinator::pki::CertificateAuthority::generate("rogue").unwrap();
    let rogue = rogue_ca.issue_node(&eu).unwrap();
    let config = pki.link_config(server.addr, &rogue, timing(100));
    let metrics = Arc::new(SyncLinkMetrics::default());
    let (shutdown, rx) = watch::channel(false);
    let key = signing_key();
    let task = sync_link::spawn_with_metrics(engine.clone(), key.verifying_key(), config, metrics.clone(), rx).unwrap();
    eventually("retries", || metrics.failures.get() >= 3).await;
    assert_eq!(server.ledger.event_count(&eu), 0);
    assert_eq!(server.metrics.connections_accepted.get(), 0);
    assert_eq!(engine.sync_progress().unwrap().0, 0, "nothing pruned");
    assert_eq!(engine.outbox_after(0, 100).unwrap().len(), 3);
    let _ = shutdown.send(true);
    bounded("link shutdown", task).await.unwrap();
    server.stop().await;
}
