//! `edgecard demo`: a coordinator and three regional nodes on loopback. The demo drives the
//! coordinator through its admin API like an operator would (products, key import, nodes,
//! slices); the nodes get their catalog and signed slices over the QUIC sync link and stream
//! their orders back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgecard_node::config::{
    AdminConfig, ClientIpConfig, CoordinatorLinkConfig, HttpConfig, NodeConfig, OrdersConfig, PaymentsConfig,
    SandboxConfig, StoreConfig, TrustConfig,
};
use edgecard_node::runtime::RunningNode;
use edgecard_protocol::NodeId;
use rand::Rng;
use serde_json::{json, Value};

use crate::admin_client::AdminClient;
use crate::https_client::{Endpoint, Request};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Data directory; default: a new temporary directory, removed on exit.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// First HTTPS port; nodes use this and the next two, their admin listeners the same +1000.
    #[arg(long, default_value_t = 8441)]
    pub base_port: u16,
    /// Coordinator admin API port; its QUIC sync port is this +373 (7070 → 7443).
    #[arg(long, default_value_t = 7070)]
    pub coordinator_port: u16,
    /// Keys per product per node.
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
}

const REGIONS: [(&str, &str); 3] = [("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")];

/// (sku, English title, Chinese title, USD cents, CNY fen)
const PRODUCTS: [(&str, &str, &str, u64, u64); 3] = [
    ("game-card-10", "Game card, 10 USD", "游戏点卡 10 美元", 1000, 7200),
    ("gift-code-25", "Gift code, 25 USD", "礼品码 25 美元", 2500, 18000),
    ("licence-pro", "Pro licence key, 1 year", "专业版授权码(一年)", 4900, 35000),
];

/// Keys of each product left in the pool for the operator to allocate: at least the printed
/// `slices allocate … --count 50`.
fn spare_keys(keys_per_node: usize) -> usize {
    (keys_per_node / 4).max(PRINTED_ALLOCATION)
}

const PRINTED_ALLOCATION: usize = 50;

fn sample_secret(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut group = || -> String { (0..4).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect() };
    format!("DEMO-{}-{}-{}", group(), group(), group())
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let (dir, _temp) = match &args.dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("edgecard-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();

    // The coordinator, initialised and served from dir/coordinator.
    let coordinator_dir = dir.join("coordinator");
    let admin_listen = SocketAddr::from(([127, 0, 0, 1], args.coordinator_port));
    let sync_listen = SocketAddr::from(([127, 0, 0, 1], args.coordinator_port.saturating_add(373)));
    let config = match edgecard_coordinator::runtime::load_config(&coordinator_dir) {
        Ok(config) => config,
        Err(_) => {
            let fresh = edgecard_coordinator::runtime::CoordinatorConfig::with_listeners(admin_listen, sync_listen);
            edgecard_coordinator::runtime::init(&coordinator_dir, fresh)?;
            edgecard_coordinator::runtime::load_config(&coordinator_dir)?
        }
    };
    let token = config.admin_token.clone();
    let coordinator = edgecard_coordinator::runtime::start(&coordinator_dir, config)
        .await
        .with_context(|| format!("starting the coordinator on {admin_listen}"))?;
    let admin_url = format!("http://{}", coordinator.admin_addr);
    let admin = AdminClient::new(&admin_url, &token)?;

    // Stock it like an operator: products, keys, nodes, slices.
    let fresh_stock = admin.get("/v1/products").await?.as_array().is_none_or(Vec::is_empty);
    if fresh_stock {
        let mut rng = rand::thread_rng();
        for (sku, en, zh, usd, cny) in PRODUCTS {
            admin
                .post_json(
                    "/v1/products",
                    &json!({ "sku": sku, "title": { "en": en, "zh-CN": zh },
                             "prices": [{ "amount_minor": usd, "currency": "USD" }, { "amount_minor": cny, "currency": "CNY" }] }),
                )
                .await?;
            // The pool keeps spare keys, so the printed `slices allocate` works.
            let total = args.keys * REGIONS.len() + spare_keys(args.keys);
            let keys: String = (0..total).map(|_| sample_secret(&mut rng) + "\n").collect();
            admin.post_bytes(&format!("/v1/products/{sku}/keys"), keys.into_bytes()).await?;
        }
    }
    let mut nodes: Vec<(&str, &str, RunningNode)> = Vec::new();
    for (i, (name, region)) in REGIONS.iter().enumerate() {
        let node_dir = dir.join(name);
        if !node_dir.join("node-key.pem").exists() {
            let bundle =
                admin.post_json("/v1/nodes", &json!({ "name": name, "region": region, "bundle": true })).await?;
            crate::ops::write_bundle(&node_dir, &bundle)?;
            for (sku, ..) in PRODUCTS {
                admin.post_json("/v1/slices", &json!({ "sku": sku, "node": name, "count": args.keys })).await?;
            }
        }
        let port = args.base_port.saturating_add(i as u16);
        let config = demo_node_config(name, region, &node_dir, port, coordinator.sync_addr)?;
        let node = edgecard_node::runtime::start(config).await.with_context(|| format!("starting node {name}"))?;
        nodes.push((name, region, node));
    }
    wait_for_stock(&nodes).await?;
    print_instructions(&dir, &admin_url, &token, &nodes, args.keys, started.elapsed())?;

    wait_for_signal().await?;
    println!("\nstopping…");
    for (_, _, node) in nodes {
        node.shutdown().await;
    }
    coordinator.shutdown().await;
    Ok(())
}

fn demo_node_config(name: &str, region: &str, dir: &Path, port: u16, sync_addr: SocketAddr) -> Result<NodeConfig> {
    let verifying = std::fs::read_to_string(dir.join("node.toml"))?
        .lines()
        .find_map(|l| l.strip_prefix("coordinator_key = \"").and_then(|v| v.strip_suffix('"')).map(str::to_string))
        .context("the node bundle has no coordinator_key")?;
    let config = NodeConfig {
        node_id: NodeId::new(name)?,
        region: region.to_string(),
        data_dir: dir.join("data"),
        public_url: None,
        http: HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], port)), ..HttpConfig::default() },
        admin: AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], port.saturating_add(1000))), token: None },
        trust: TrustConfig { coordinator_key: verifying, grant_files: Vec::new() },
        orders: OrdersConfig::default(),
        // The bench gives each simulated buyer its own address in X-Forwarded-For; trusting
        // loopback as a proxy is right only because this demo listens on loopback alone.
        client_ip: ClientIpConfig {
            trusted_proxies: vec!["127.0.0.0/8".parse()?],
            header: edgecard_node::client_ip::ClientIpHeader::XForwardedFor,
        },
        limits: Default::default(),
        abuse: Default::default(),
        payments: PaymentsConfig {
            sandbox: SandboxConfig { enabled: true, ..SandboxConfig::default() },
            ..PaymentsConfig::default()
        },
        store: StoreConfig::default(),
        coordinator: Some(CoordinatorLinkConfig {
            addr: sync_addr,
            server_name: "localhost".into(),
            ca_cert: dir.join("ca-cert.pem"),
            node_cert: dir.join("node-cert.pem"),
            node_key: dir.join("node-key.pem"),
            idle_poll_ms: 500,
        }),
        mail: None,
        products: Vec::new(),
    };
    config.validate(Path::new("demo"))?;
    Ok(config)
}

/// Waits (bounded) until every node lists stock: catalog and grants arrived over the link.
async fn wait_for_stock(nodes: &[(&str, &str, RunningNode)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    for (name, _, node) in nodes {
        let ca = match &node.self_signed_cert {
            Some(path) => std::fs::read(path)?,
            None => bail!("node {name} has no self-signed certificate"),
        };
        let endpoint = Endpoint::parse(&format!("https://{}", node.https_addr), Some(&ca))?;
        loop {
            let listed = endpoint.request(Request::get("/api/v1/products")).await?.json::<Value>().ok();
            let stocked = listed.as_ref().and_then(Value::as_array).is_some_and(|products| {
                products.len() == PRODUCTS.len() && products.iter().all(|p| p["stock"].as_u64().unwrap_or(0) > 0)
            });
            if stocked {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {name} did not receive its catalog and slices within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn print_instructions(
    dir: &Path,
    admin_url: &str,
    token: &str,
    nodes: &[(&str, &str, RunningNode)],
    keys_per_node: usize,
    took: Duration,
) -> Result<()> {
    println!(
        "Edgecard demo: a coordinator and {} regional nodes on loopback ({:.1} s), data in {}\n",
        nodes.len(),
        took.as_secs_f64(),
        dir.display()
    );
    println!(
        "  coordinator  admin {admin_url}  metrics {admin_url}/metrics (bearer: metrics_token in {})",
        dir.join("coordinator").join("coordinator.toml").display()
    );
    let mut summary = Vec::new();
    for (name, region, node) in nodes {
        println!("  {name:<11}  store https://{}  metrics http://{}/metrics", node.https_addr, node.admin_addr);
        summary.push(json!({
            "name": name, "region": region, "url": format!("https://{}", node.https_addr),
            "admin_url": format!("http://{}", node.admin_addr),
            "ca_cert": node.self_signed_cert.as_ref().map(|p| p.display().to_string()),
        }));
    }
    let manifest = json!({
        "admin_url": admin_url,
        "env": { "EDGECARD_ADMIN_URL": admin_url, "EDGECARD_ADMIN_TOKEN": token },
        "nodes": summary,
    });
    std::fs::write(dir.join("demo.json"), serde_json::to_vec_pretty(&manifest)?)?;
    let first = &nodes[0].2;
    let url = format!("https://{}", first.https_addr);
    let cert = first.self_signed_cert.clone().unwrap_or_default();
    println!(
        r#"
Buy a key (each node serves a self-signed certificate, so curl needs --cacert):

  CA={ca}
  curl --cacert $CA {url}/api/v1/products
  ORDER=$(curl -s --cacert $CA -H 'content-type: application/json' \
      -d '{{"sku":"game-card-10","quantity":1}}' {url}/api/v1/orders)
  ID=$(echo "$ORDER" | sed -E 's/.*"order_id":"([0-9a-f]+)".*/\1/')
  TOKEN=$(echo "$ORDER" | sed -E 's/.*"token":"([0-9a-f]+)".*/\1/')
  curl -s --cacert $CA -X POST -H "authorization: Bearer $TOKEN" {url}/pay/sandbox/$ID   # pay (sandbox)
  curl -s --cacert $CA -H "authorization: Bearer $TOKEN" {url}/api/v1/orders/$ID

Operate the coordinator from another shell:

  export EDGECARD_ADMIN_URL={admin_url}
  export EDGECARD_ADMIN_TOKEN={token}
  cargo run --release -- status
  cargo run --release -- orders list
  cargo run --release -- slices allocate game-card-10 --node ap-1 --count {allocation}

Load test one node:

  cargo run --release -- bench purchase --url {url} --ca $CA --sku game-card-10 --concurrency 64 --count {bench}

Machine-readable addresses and environment: {manifest}
Press Ctrl-C to stop."#,
        ca = cert.display(),
        manifest = dir.join("demo.json").display(),
        allocation = PRINTED_ALLOCATION,
        // Half the node's stock of that product: the bench ends with stock left, never sold out.
        bench = keys_per_node / 2,
    );
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
