//! `edgecard`: the one binary. Node, demo, grant tooling and the load generator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgecard::ops::{self, AdminArgs};
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
    /// Proof-of-work challenges of order creation (docs/abuse.md).
    #[command(subcommand)]
    Challenge(ChallengeCommand),
    /// Create or run the coordinator.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Register nodes (with a join token), list or revoke them.
    Nodes {
        #[command(subcommand)]
        command: ops::NodesCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Manage the catalog.
    Products {
        #[command(subcommand)]
        command: ops::ProductsCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Import keys into the pool.
    Keys {
        #[command(subcommand)]
        command: ops::KeysCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Grant slices of the pool to nodes, and show them.
    Slices {
        #[command(subcommand)]
        command: ops::SlicesCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List or export the ledger's orders.
    Orders {
        #[command(subcommand)]
        command: ops::OrdersCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stock per sku per node, sync progress, alarms.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum ChallengeCommand {
    /// Solve the `challenge.token` of a node's 428 answer and print the counter to send as
    /// `Edgecard-Challenge-Solution` (with the token as `Edgecard-Challenge`).
    Solve {
        token: String,
        /// Give up after this many tries.
        #[arg(long, default_value_t = 1 << 32)]
        max_tries: u64,
    },
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Create a data directory: grant-signing key, private CA, sync certificate, coordinator.toml.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Admin API address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        admin_listen: std::net::SocketAddr,
        /// QUIC sync address.
        #[arg(long, default_value = "0.0.0.0:7443")]
        sync_listen: std::net::SocketAddr,
        /// Address nodes dial (default: the sync address, loopback if unspecified).
        #[arg(long)]
        sync_public_addr: Option<std::net::SocketAddr>,
        /// Name in the sync certificate that nodes verify.
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
    /// Serve the admin API and the sync endpoint until SIGINT or SIGTERM.
    Run {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Replace the store's sealing key (coordinator stopped): a new key, the store re-sealed
    /// under it, the old key dropped from the key file.
    RotateKey {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Serve buyers until SIGINT or SIGTERM.
    Run(ConfigArg),
    /// Validate a config file and print the effective configuration (secrets elided).
    CheckConfig(ConfigArg),
    /// Join a coordinator with a join token: make this node's key, get its certificate, write node.toml.
    Enrol(edgecard::enrol::EnrolArgs),
    /// Replace the store's sealing key (node stopped): a new key, the store re-sealed under it,
    /// the old key dropped from the key file.
    RotateKey(ConfigArg),
    /// Erase a buyer's address from this node's orders and drop their queued mails, through
    /// the node's admin API (docs/mail.md).
    ForgetEmail(ForgetEmailArgs),
}

#[derive(Args)]
struct ForgetEmailArgs {
    /// The address to erase (compared case-insensitively).
    address: String,
    /// The node's admin listener.
    #[arg(long, env = "EDGECARD_NODE_ADMIN_URL", default_value = "http://127.0.0.1:9443")]
    admin_url: String,
    /// The node's admin token.
    #[arg(long, env = edgecard_node::config::ENV_ADMIN_TOKEN, hide_env_values = true)]
    admin_token: String,
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

fn solve_challenge(token: &str, max_tries: u64) -> anyhow::Result<()> {
    use edgecard_node::abuse::challenge;
    if challenge::difficulty_of(token).is_none() {
        anyhow::bail!("not a challenge token (the `challenge.token` of a 428 answer)");
    }
    match challenge::solve(token, max_tries) {
        Some(counter) => {
            println!("{counter}");
            Ok(())
        }
        None => anyhow::bail!("no solution within {max_tries} tries"),
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, whatever RUST_BACKTRACE says: operators read this, not developers.
            eprintln!("error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes a message already quotes.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    edgecard::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Node(NodeCommand::Run(args)) => run_node(args).await,
            Command::Node(NodeCommand::CheckConfig(args)) => check_config(args),
            Command::Node(NodeCommand::Enrol(args)) => edgecard::enrol::run(args).await,
            Command::Node(NodeCommand::RotateKey(args)) => {
                let config = NodeConfig::load(&args.config)?;
                rotate_key(
                    &config.sealing_key_file(),
                    &config.data_dir.join("store"),
                    config.store.cache_capacity_mb.saturating_mul(1 << 20),
                )
            }
            Command::Node(NodeCommand::ForgetEmail(args)) => forget_email(args).await,
            Command::Grant(command) => grant(command),
            Command::Bench(args) => bench::run(args).await,
            Command::Challenge(ChallengeCommand::Solve { token, max_tries }) => solve_challenge(&token, max_tries),
            Command::Coordinator(command) => coordinator(command).await,
            Command::Nodes { command, admin } => ops::nodes(&admin, command).await,
            Command::Products { command, admin } => ops::products(&admin, command).await,
            Command::Keys { command, admin } => ops::keys(&admin, command).await,
            Command::Slices { command, admin } => ops::slices(&admin, command).await,
            Command::Orders { command, admin } => ops::orders(&admin, command).await,
            Command::Status { admin } => ops::status(&admin).await,
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
    let poisoned = node.engine.store().until_poisoned();
    let outcome = stop_on_signal_or_poison(poisoned).await;
    tracing::info!("shutting down");
    node.shutdown().await;
    outcome
}

/// Waits for SIGINT or SIGTERM (a clean stop), or for the store to be poisoned: then the process
/// stops with an error, so that its supervisor restarts it and recovery reads the disk again.
async fn stop_on_signal_or_poison(poisoned: impl std::future::Future<Output = String>) -> Result<()> {
    tokio::select! {
        signal = wait_for_signal() => signal,
        reason = poisoned => {
            tracing::error!(%reason, "store poisoned: exiting for a restart");
            anyhow::bail!("store poisoned ({reason}): exiting so that a restart recovers from disk")
        }
    }
}

pub async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn coordinator(command: CoordinatorCommand) -> Result<()> {
    use edgecard_coordinator::runtime;
    match command {
        CoordinatorCommand::Init { dir, admin_listen, sync_listen, sync_public_addr, server_name } => {
            let config = runtime::CoordinatorConfig {
                sync_public_addr,
                sync_server_name: server_name,
                ..runtime::CoordinatorConfig::with_listeners(admin_listen, sync_listen)
            };
            let made = runtime::init(&dir, config)?;
            println!("coordinator initialised in {}", dir.display());
            println!("grant verifying key: {}", made.verifying_key);
            println!("admin token (shown once; it is also in {}):", made.config_path.display());
            println!("  export EDGECARD_ADMIN_TOKEN={}", made.admin_token);
            println!("  export EDGECARD_ADMIN_URL=http://{admin_listen}");
            println!("metrics token (read-only, GET /metrics only; metrics_token in the same file, for Prometheus):");
            println!("  {}", made.metrics_token);
            println!("start it with: edgecard coordinator run --dir {}", dir.display());
        }
        CoordinatorCommand::RotateKey { dir } => {
            let config = runtime::load_config(&dir)?;
            rotate_key(
                &runtime::sealing_key_file(&dir, &config),
                &dir.join("store"),
                config.cache_capacity_mb.saturating_mul(1 << 20),
            )?;
        }
        CoordinatorCommand::Run { dir } => {
            let config = runtime::load_config(&dir)?;
            let running = runtime::start(&dir, config).await?;
            println!(
                "{}",
                serde_json::json!({
                    "event": "ready",
                    "admin": running.admin_addr.to_string(),
                    "sync": running.sync_addr.to_string(),
                    "enrol": running.enrol_addr.to_string(),
                })
            );
            let poisoned = running.coordinator.store().until_poisoned();
            let outcome = stop_on_signal_or_poison(poisoned).await;
            tracing::info!("shutting down");
            running.shutdown().await;
            outcome?;
        }
    }
    Ok(())
}

/// `rotate-key` for a node or the coordinator: the service must be stopped (its store is locked
/// while it runs, and opening it here fails).
fn rotate_key(key_file: &std::path::Path, store_dir: &std::path::Path, cache_capacity: u64) -> Result<()> {
    let started = std::time::Instant::now();
    let done = edgecard_store::seal::rotate_key(key_file, store_dir, cache_capacity)
        .with_context(|| format!("rotating the sealing key of {} (stop the service first)", store_dir.display()))?;
    println!(
        "store {} re-sealed under key version {} ({} entries, {:.1} s); {} now holds only that key: back it up",
        store_dir.display(),
        done.new_version,
        done.entries,
        started.elapsed().as_secs_f64(),
        key_file.display()
    );
    Ok(())
}

async fn forget_email(args: ForgetEmailArgs) -> Result<()> {
    let client = edgecard::admin_client::AdminClient::new(&args.admin_url, &args.admin_token)?;
    let answer = client
        .post_json("/admin/v1/mail/forget", &serde_json::json!({ "email": args.address }))
        .await
        .context("forget-email")?;
    println!("address erased from {} order(s)", answer["orders"].as_u64().unwrap_or(0));
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
    if let (Some(cert), Some(key)) = (&config.http.tls_cert, &config.http.tls_key) {
        // The server loads them the same way at start: both parse and the key is the cert's.
        let not_after = edgecard_node::tls::check_server_files(cert, key).context("http.tls_cert and http.tls_key")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let until = edgecard_node::time_fmt::rfc3339(edgecard_protocol::UnixMillis(not_after.max(0) as u64 * 1000));
        println!("certificate {}: matches its key, valid until {until}", cert.display());
        if let Some(warning) = edgecard_node::runtime::certificate_warning(not_after, now) {
            eprintln!("warning: {warning}");
        }
    }
    // A product whose currencies no channel serves cannot be bought: said now, not at checkout.
    for warning in edgecard_node::payments::route_table::unserved_currencies(&config) {
        eprintln!("warning: {warning}");
    }
    if edgecard_node::payments::LabPayments::of(&config) == edgecard_node::payments::LabPayments::BesideRealChannels {
        eprintln!(
            "warning: lab payments are on beside real channels (payments.sandbox.allow_beside_real_channels): \
             the sandbox pays for free wherever payments.routes lists it"
        );
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
