//! `edgecard`: the one binary. Node, demo, grant tooling and the load generator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgecard::{bench, demo, grant_tool};
use edgecard_node::config::NodeConfig;
use edgecard_protocol::{Epoch, NodeId, Sku, SliceId};

#[derive(Parser)]
#[command(name = "edgecard", version, about = "Automatic card-key shop, spread over the edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start three regional nodes on loopback with sample stock, and print how to buy.
    Demo(demo::DemoArgs),
    /// Run or check an edge node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Make a grant-signing key, or sign a slice grant from a key file (standalone operation).
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Load-test nodes and print the KPI table.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Serve buyers until SIGINT or SIGTERM.
    Run(ConfigArg),
    /// Validate a config file and print the effective configuration (secrets elided).
    CheckConfig(ConfigArg),
}

#[derive(Args)]
struct ConfigArg {
    /// Path to node.toml.
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Create an ed25519 grant-signing key file (mode 0600) and print its verifying key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a slice grant for one node from a file of keys (one per line).
    Sign {
        /// Signing key file made by `grant keygen`.
        #[arg(long)]
        signing_key: PathBuf,
        /// Node id the grant is for.
        #[arg(long)]
        node: String,
        #[arg(long)]
        sku: String,
        /// File with one key (secret) per line.
        #[arg(long)]
        keys: PathBuf,
        #[arg(long)]
        slice_id: u64,
        /// Id of the first key; the rest are numbered consecutively.
        #[arg(long, default_value_t = 1)]
        first_key_id: u64,
        #[arg(long, default_value_t = 1)]
        epoch: u64,
        /// Lease length in hours.
        #[arg(long, default_value_t = 720)]
        lease_hours: u64,
        /// Output file (mode 0600: it contains the keys).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    edgecard::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Node(NodeCommand::Run(args)) => run_node(args).await,
            Command::Node(NodeCommand::CheckConfig(args)) => check_config(args),
            Command::Grant(command) => grant(command),
            Command::Bench(args) => bench::run(args).await,
        }
    })
}

async fn run_node(args: ConfigArg) -> Result<()> {
    let config = NodeConfig::load(&args.config)?;
    let node = edgecard_node::runtime::start(config).await?;
    // One machine-readable line on stdout, so scripts and tests learn the bound addresses.
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "node": node.engine.node_id().as_str(),
            "https": node.https_addr.to_string(),
            "admin": node.admin_addr.to_string(),
            "public_url": node.public_url,
            "self_signed_cert": node.self_signed_cert.as_ref().map(|p| p.display().to_string()),
        })
    );
    wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

pub async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn check_config(args: ConfigArg) -> Result<()> {
    let mut config = NodeConfig::load(&args.config)?;
    if config.payments.sandbox.secret.is_some() {
        config.payments.sandbox.secret = Some("<set>".into());
    }
    if config.admin.token.is_some() {
        config.admin.token = Some("<set>".into());
    }
    println!("{} is valid. Effective configuration:\n", args.config.display());
    println!("{}", toml::to_string_pretty(&config).context("rendering the configuration")?);
    Ok(())
}

fn grant(command: GrantCommand) -> Result<()> {
    match command {
        GrantCommand::Keygen { out } => {
            if out.exists() {
                bail!("{} exists; refusing to overwrite a signing key", out.display());
            }
            let verifying = grant_tool::keygen(&out)?;
            println!("signing key written to {}\nverifying key (trust.coordinator_key): {verifying}", out.display());
        }
        GrantCommand::Sign { signing_key, node, sku, keys, slice_id, first_key_id, epoch, lease_hours, out } => {
            let key = grant_tool::load_signing_key(&signing_key)?;
            let spec = grant_tool::GrantSpec {
                slice_id: SliceId(slice_id),
                sku: Sku::new(sku).context("--sku")?,
                node: NodeId::new(node).context("--node")?,
                epoch: Epoch(epoch),
                first_key_id,
                lease: Duration::from_secs(lease_hours.saturating_mul(3600)),
            };
            let secrets = grant_tool::read_secrets(&keys)?;
            let count = secrets.len();
            let signed = grant_tool::sign_grant(&key, &spec, secrets)?;
            grant_tool::write_private(&out, &signed.to_bytes()?)?;
            println!("signed slice {slice_id} with {count} keys for node {} into {}", spec.node, out.display());
        }
    }
    Ok(())
}
