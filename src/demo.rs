//! `edgecard demo`: three regional nodes on loopback with sample stock, each selling from its own
//! signed slice, and instructions to buy from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use edgecard_node::config::{
    AdminConfig, ClientIpConfig, HttpConfig, NodeConfig, OrdersConfig, PaymentsConfig, PriceConfig, ProductConfig,
    SandboxConfig, StoreConfig, TrustConfig,
};
use edgecard_protocol::{encode_verifying_key, Epoch, NodeId, Secret, Sku, SliceId};
use rand::Rng;
use serde_json::json;

use crate::grant_tool::{self, GrantSpec};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Data directory; default: a new temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// First HTTPS port; nodes use this and the next two, admin listeners the same +1000.
    #[arg(long, default_value_t = 8441)]
    pub base_port: u16,
    /// Keys per product per node.
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
}

const REGIONS: [(&str, &str); 3] = [("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")];

fn sample_products() -> Vec<ProductConfig> {
    let product = |sku: &str, en: &str, zh: &str, usd: u64, cny: u64| -> Result<ProductConfig> {
        Ok(ProductConfig {
            sku: Sku::new(sku)?,
            title: BTreeMap::from([("en".to_string(), en.to_string()), ("zh-CN".to_string(), zh.to_string())]),
            prices: vec![
                PriceConfig { amount_minor: usd, currency: "USD".parse().map_err(anyhow::Error::msg)? },
                PriceConfig { amount_minor: cny, currency: "CNY".parse().map_err(anyhow::Error::msg)? },
            ],
        })
    };
    [
        product("game-card-10", "Game card, 10 USD", "游戏点卡 10 美元", 1000, 7200),
        product("gift-code-25", "Gift code, 25 USD", "礼品码 25 美元", 2500, 18000),
        product("licence-pro", "Pro licence key, 1 year", "专业版授权码(一年)", 4900, 35000),
    ]
    .into_iter()
    .collect::<Result<Vec<_>>>()
    .unwrap_or_default()
}

fn sample_secret(rng: &mut impl Rng) -> Result<Secret> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let group = |rng: &mut dyn rand::RngCore| -> String {
        (0..4).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
    };
    Ok(Secret::new(format!("DEMO-{}-{}-{}", group(rng), group(rng), group(rng)))?)
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
    let signing_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let verifying = encode_verifying_key(&signing_key.verifying_key());
    let products = sample_products();
    let mut rng = rand::thread_rng();
    let mut nodes = Vec::new();
    let mut next_key_id = 1u64;
    let mut next_slice = 1u64;
    for (i, (node_name, region)) in REGIONS.iter().enumerate() {
        let node_dir = dir.join(node_name);
        std::fs::create_dir_all(&node_dir)?;
        let mut grant_files = Vec::new();
        for product in &products {
            let secrets = (0..args.keys).map(|_| sample_secret(&mut rng)).collect::<Result<Vec<_>>>()?;
            let spec = GrantSpec {
                slice_id: SliceId(next_slice),
                sku: product.sku.clone(),
                node: NodeId::new(*node_name)?,
                epoch: Epoch(1),
                first_key_id: next_key_id,
                lease: Duration::from_secs(7 * 24 * 3600),
            };
            next_slice += 1;
            next_key_id += args.keys as u64;
            let signed = grant_tool::sign_grant(&signing_key, &spec, secrets)?;
            let path = node_dir.join(format!("{}.grant", product.sku));
            grant_tool::write_private(&path, &signed.to_bytes()?)?;
            grant_files.push(path);
        }
        let port = args.base_port + i as u16;
        let config = demo_node_config(node_name, region, &node_dir, port, &verifying, grant_files, products.clone())?;
        let node = edgecard_node::runtime::start(config).await.with_context(|| format!("starting node {node_name}"))?;
        nodes.push((node_name, region, node));
    }

    print_instructions(&dir, &nodes)?;
    wait_for_signal().await?;
    println!("\nstopping…");
    for (_, _, node) in nodes {
        node.shutdown().await;
    }
    Ok(())
}

fn demo_node_config(
    name: &str,
    region: &str,
    dir: &Path,
    port: u16,
    verifying_key: &str,
    grant_files: Vec<PathBuf>,
    products: Vec<ProductConfig>,
) -> Result<NodeConfig> {
    let config = NodeConfig {
        node_id: NodeId::new(name)?,
        region: region.to_string(),
        data_dir: dir.to_path_buf(),
        public_url: None,
        http: HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], port)), ..HttpConfig::default() },
        admin: AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], port + 1000)), token: None },
        trust: TrustConfig { coordinator_key: verifying_key.to_string(), grant_files },
        orders: OrdersConfig::default(),
        // The bench gives each simulated buyer its own address in X-Forwarded-For; trusting
        // loopback as a proxy is right only because this demo listens on loopback alone.
        client_ip: ClientIpConfig {
            trusted_proxies: vec!["127.0.0.0/8".parse()?],
            header: edgecard_node::client_ip::ClientIpHeader::XForwardedFor,
        },
        limits: Default::default(),
        payments: PaymentsConfig { sandbox: SandboxConfig { enabled: true, ..SandboxConfig::default() } },
        store: StoreConfig::default(),
        products,
    };
    config.validate(Path::new("demo"))?;
    Ok(config)
}

fn print_instructions(dir: &Path, nodes: &[(&&str, &&str, edgecard_node::runtime::RunningNode)]) -> Result<()> {
    let cert = nodes.first().and_then(|(_, _, n)| n.self_signed_cert.clone()).unwrap_or_default();
    println!("Edgecard demo: {} regional nodes on loopback, data in {}\n", nodes.len(), dir.display());
    let mut summary = Vec::new();
    for (name, region, node) in nodes {
        println!(
            "  {name:<5} region {region:<3} store https://{}  metrics http://{}/metrics",
            node.https_addr, node.admin_addr
        );
        summary.push(json!({
            "name": name, "region": region, "url": format!("https://{}", node.https_addr),
            "admin_url": format!("http://{}", node.admin_addr),
            "ca_cert": node.self_signed_cert.as_ref().map(|p| p.display().to_string()),
        }));
    }
    let manifest = json!({ "nodes": summary });
    std::fs::write(dir.join("demo.json"), serde_json::to_vec_pretty(&manifest)?)?;
    let (_, _, first) = &nodes[0];
    let url = format!("https://{}", first.https_addr);
    println!(
        r#"
Each node serves a self-signed certificate; curl needs --cacert for it. Buy a key:

  CA={ca}
  curl --cacert $CA {url}/api/v1/products
  ORDER=$(curl -s --cacert $CA -H 'content-type: application/json' \
      -d '{{"sku":"game-card-10","quantity":1}}' {url}/api/v1/orders)
  echo "$ORDER"
  ID=$(echo "$ORDER" | sed -E 's/.*"order_id":"([0-9a-f]+)".*/\1/')
  TOKEN=$(echo "$ORDER" | sed -E 's/.*"token":"([0-9a-f]+)".*/\1/')
  curl -s --cacert $CA -X POST {url}/pay/sandbox/$ID        # pay with the sandbox channel
  curl -s --cacert $CA -H "authorization: Bearer $TOKEN" {url}/api/v1/orders/$ID

Load test one node:

  cargo run --release -- bench purchase --url {url} --ca $CA --concurrency 64 --duration 10

Machine-readable addresses: {manifest}
Press Ctrl-C to stop."#,
        ca = cert.display(),
        manifest = dir.join("demo.json").display(),
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
