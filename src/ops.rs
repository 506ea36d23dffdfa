//! Operator commands: the coordinator's CLI. Each is a typed call of the admin API; errors are
//! one line and a non-zero exit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::admin_client::{AdminClient, DEFAULT_ADMIN_URL, ENV_ADMIN_TOKEN, ENV_ADMIN_URL};
use crate::grant_tool::write_private;

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Admin API URL (env EDGECARD_ADMIN_URL; default http://127.0.0.1:7070).
    #[arg(long, global = true, env = ENV_ADMIN_URL, default_value = DEFAULT_ADMIN_URL)]
    pub admin_url: String,
    /// Admin bearer token (env EDGECARD_ADMIN_TOKEN).
    #[arg(long, global = true, env = ENV_ADMIN_TOKEN, hide_env_values = true, default_value = "")]
    pub admin_token: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl AdminArgs {
    fn client(&self) -> Result<AdminClient> {
        if self.admin_token.is_empty() {
            bail!("no admin token: set {ENV_ADMIN_TOKEN} or pass --admin-token");
        }
        Ok(AdminClient::new(&self.admin_url, &self.admin_token)?)
    }
}

#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// Register a node and print its one-time join token (`--bundle`: write a lab bundle instead).
    Add {
        name: String,
        #[arg(long)]
        region: String,
        /// Labs and the demo only: have the coordinator make the node's key and write it, with
        /// the certificates and node.toml, into a bundle directory.
        #[arg(long)]
        bundle: bool,
        /// Directory for the bundle (with --bundle); default ./<name>.
        #[arg(long, requires = "bundle")]
        out: Option<PathBuf>,
        /// How long the join token stays valid: seconds, or with s, m, h or d (default 1h, at most 7d).
        #[arg(long, conflicts_with = "bundle")]
        ttl: Option<String>,
    },
    /// A new join token for a registered node (the last one expired, or the machine was rebuilt).
    Token {
        name: String,
        /// How long it stays valid (default 1h, at most 7d).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Nodes with last contact, sync high-water mark and stock per slice.
    List,
    /// Shut a node out: its connections and uploads are refused from now on.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ProductsCommand {
    /// Add a product: `products add game-10 --title en="Game card" --title zh-CN="游戏卡" --price 1000:USD`.
    Add {
        sku: String,
        /// LANG=TITLE; `en` is required.
        #[arg(long = "title", required = true)]
        titles: Vec<String>,
        /// AMOUNT_MINOR:CURRENCY, e.g. 1000:USD; the first is the default.
        #[arg(long = "price", required = true)]
        prices: Vec<String>,
    },
    List,
    /// Set the price in one currency (added if the product has none in it).
    SetPrice {
        sku: String,
        /// AMOUNT_MINOR:CURRENCY
        price: String,
    },
    /// Automatic top-up: a node reporting fewer than LOW sellable keys gets enough from the pool
    /// to reach TARGET. `--off` turns it off.
    Topup {
        sku: String,
        #[arg(long, required_unless_present = "off")]
        low: Option<u64>,
        #[arg(long, required_unless_present = "off")]
        target: Option<u64>,
        #[arg(long, conflicts_with_all = ["low", "target"])]
        off: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Import keys: one per line, or CSV with `--csv-column`. All valid rows land as one batch.
    Import {
        sku: String,
        file: PathBuf,
        /// Read CSV and take the key from this 1-based column.
        #[arg(long)]
        csv_column: Option<usize>,
        /// The CSV's first row is a header.
        #[arg(long)]
        header: bool,
        /// Refuse the whole file if any row is invalid or a duplicate.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SlicesCommand {
    /// Grant COUNT pool keys of SKU to a node (signed; delivered with its next sync).
    Allocate {
        sku: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        count: u64,
    },
    /// Every slice: node, lease, state, and its keys by where they are now.
    List,
    /// Stage a move of COUNT unsold keys of SKU from one node to another (see `slices show`).
    Move {
        sku: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        count: u64,
    },
    /// Stage a drain: every slice of NODE closes and its unsold keys go back to the pool.
    Drain { node: String },
    /// Show the staged changes, the plan (what moves where, stock after) and the apply command.
    Show,
    /// Carry out the staged changes; VERSION is the one `slices show` prints.
    Apply {
        #[arg(long)]
        version: u64,
    },
    /// Discard the staged changes.
    Revert,
    /// Give up the quarantined keys of a reclaimed slice: nobody will sell them.
    WriteOff { slice: u64 },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct OrderFilterArgs {
    /// reserved, paid, delivered, expired, paid_awaiting_stock, payment_mismatch, refunded,
    /// refund_manual, disputed
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub sku: Option<String>,
    #[arg(long)]
    pub node: Option<String>,
    /// Only orders created at or after this unix time in milliseconds.
    #[arg(long)]
    pub since: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum OrdersCommand {
    List(OrderFilterArgs),
    /// Export for accounting.
    Export {
        #[command(flatten)]
        filter: OrderFilterArgs,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// Output file; default standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Refund an order's payment through the channel that took it (its node carries it out; the
    /// order's keys are revoked). Asking again for the same order changes nothing.
    Refund {
        /// The order id.
        order: String,
        /// Why, for the ledger and the provider's records (at most 200 bytes).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refunds asked for or reported, with their state.
    Refunds,
}

fn print(args: &AdminArgs, value: &Value, table: impl FnOnce(&Value)) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

/// Time since a node's last contact (unix ms), e.g. "0.4s"; "never" before the first.
/// What an operator must know first about a node: revoked, or its data dir fenced.
fn node_state(node: &Value) -> &'static str {
    if node["revoked"].as_bool() == Some(true) {
        "revoked"
    } else if node["fence"]["diverged"].as_bool() == Some(true) {
        "DIVERGED"
    } else if node["rolled_back"].as_bool() == Some(true) {
        "ROLLED BACK"
    } else {
        "ok"
    }
}

fn lag(last_contact: &Value) -> String {
    let Some(at) = last_contact.as_u64() else { return "never".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    format!("{:.1}s", now.saturating_sub(at) as f64 / 1000.0)
}

/// A node's reported stock summed per sku, e.g. "game-10=120 gift=0(lease expired)".
fn stock_per_sku(stock: &Value) -> String {
    let mut per_sku: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for slice in stock.as_array().into_iter().flatten() {
        let entry = per_sku.entry(text(&slice["sku"])).or_insert((0, false));
        if slice["selling"].as_bool() == Some(true) {
            entry.0 += slice["available"].as_u64().unwrap_or(0);
            entry.1 = true;
        }
    }
    let parts: Vec<String> = per_sku
        .into_iter()
        .map(|(sku, (n, selling))| if selling { format!("{sku}={n}") } else { format!("{sku}=0(not selling)") })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// Unix ms as an RFC 3339 UTC time.
fn time(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), |ms| edgecard_node::time_fmt::rfc3339(edgecard_protocol::UnixMillis(ms)))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn nodes(args: &AdminArgs, command: NodesCommand) -> Result<()> {
    let client = args.client()?;
    match command {
        NodesCommand::Add { name, region, bundle: true, out, .. } => {
            let bundle =
                client.post_json("/v1/nodes", &json!({ "name": name, "region": region, "bundle": true })).await?;
            let dir = out.unwrap_or_else(|| PathBuf::from(&name));
            write_bundle(&dir, &bundle)?;
            println!("node {name} registered; bundle written to {}", dir.display());
            println!("start it with: edgecard node run --config {}", dir.join("node.toml").display());
        }
        NodesCommand::Add { name, region, bundle: false, ttl, .. } => {
            let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
            let answer =
                client.post_json("/v1/nodes", &json!({ "name": name, "region": region, "ttl_secs": ttl_secs })).await?;
            print_join_token(args, &answer, &format!("node {name} registered."))?;
        }
        NodesCommand::Token { name, ttl } => {
            let ttl_secs = ttl.as_deref().map(parse_ttl).transpose()?;
            let answer =
                client.post_json(&format!("/v1/nodes/{name}/join-token"), &json!({ "ttl_secs": ttl_secs })).await?;
            print_join_token(args, &answer, &format!("new join token for node {name}."))?;
        }
        NodesCommand::List => {
            let nodes = client.get("/v1/nodes").await?;
            print(args, &nodes, |nodes| {
                println!(
                    "{:<12} {:<8} {:<8} {:>10} {:>9}  stock per sku",
                    "node", "region", "revoked", "acked seq", "lag"
                );
                for n in nodes.as_array().into_iter().flatten() {
                    println!(
                        "{:<12} {:<8} {:<8} {:>10} {:>9}  {}",
                        text(&n["node_id"]),
                        text(&n["region"]),
                        text(&n["revoked"]),
                        text(&n["events_high_water"]),
                        lag(&n["last_contact"]),
                        stock_per_sku(&n["stock"])
                    );
                }
            })?;
        }
        NodesCommand::Revoke { name } => {
            client.post_json(&format!("/v1/nodes/{name}/revoke"), &json!({})).await?;
            println!("node {name} revoked");
        }
    }
    Ok(())
}

/// Prints a join token and how to use it (or the answer as JSON with `--json`).
fn print_join_token(args: &AdminArgs, answer: &Value, headline: &str) -> Result<()> {
    print(args, answer, |answer| {
        let token = text(&answer["join_token"]);
        let until = answer["expires_at"]
            .as_u64()
            .map_or_else(|| "-".into(), |ms| edgecard_node::time_fmt::rfc3339(edgecard_protocol::UnixMillis(ms)));
        println!("{headline}");
        println!("join token (one use, valid until {until}):");
        println!("  {token}");
        println!("on the node's machine:");
        println!("  edgecard node enrol --join-token {token} --dir /etc/edgecard/node");
    })
}

/// A token lifetime: seconds, or a number with `s`, `m`, `h` or `d`.
pub fn parse_ttl(raw: &str) -> Result<u64> {
    let (digits, unit) = match raw.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&raw[..at], c),
        _ => (raw, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("--ttl {raw:?}: use seconds, or a number with s, m, h or d"),
    };
    let value: u64 = digits.parse().with_context(|| format!("--ttl {raw:?} is not a whole number"))?;
    value.checked_mul(scale).with_context(|| format!("--ttl {raw:?} is too long"))
}

/// Writes the files a node needs; the private key and the config are owner-only.
pub fn write_bundle(dir: &Path, bundle: &Value) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let field = |name: &str| -> Result<&str> {
        bundle[name].as_str().with_context(|| format!("the coordinator's bundle lacks {name}"))
    };
    let node_id = field("node_id")?;
    std::fs::write(dir.join("ca-cert.pem"), field("ca_cert_pem")?)?;
    std::fs::write(dir.join("node-cert.pem"), field("node_cert_pem")?)?;
    write_private(&dir.join("node-key.pem"), field("node_key_pem")?.as_bytes())?;
    let config = format!(
        "# Written by `edgecard node enrol` (or `nodes add --bundle`). See docs/node-config.md for every field.\n\
         node_id = \"{node_id}\"\nregion = \"{region}\"\ndata_dir = \"data\"\n\n\
         [trust]\ncoordinator_key = \"{key}\"\n\n\
         [coordinator]\naddr = \"{addr}\"\nserver_name = \"{server_name}\"\n\
         ca_cert = \"ca-cert.pem\"\nnode_cert = \"node-cert.pem\"\nnode_key = \"node-key.pem\"\n",
        region = field("region")?,
        key = field("coordinator_key")?,
        addr = field("coordinator_addr")?,
        server_name = field("coordinator_server_name")?,
    );
    let config_path = dir.join("node.toml");
    write_private(&config_path, config.as_bytes())?;
    Ok(config_path)
}

fn parse_price(raw: &str) -> Result<Value> {
    let (amount, currency) =
        raw.split_once(':').with_context(|| format!("price {raw:?} is not AMOUNT_MINOR:CURRENCY"))?;
    let amount: u64 =
        amount.parse().with_context(|| format!("price amount {amount:?} is not a whole number of minor units"))?;
    Ok(json!({ "amount_minor": amount, "currency": currency }))
}

pub async fn products(args: &AdminArgs, command: ProductsCommand) -> Result<()> {
    let client = args.client()?;
    match command {
        ProductsCommand::Add { sku, titles, prices } => {
            let mut title = BTreeMap::new();
            for t in titles {
                let (lang, value) = t.split_once('=').with_context(|| format!("title {t:?} is not LANG=TITLE"))?;
                title.insert(lang.to_string(), value.to_string());
            }
            let prices = prices.iter().map(|p| parse_price(p)).collect::<Result<Vec<_>>>()?;
            client.post_json("/v1/products", &json!({ "sku": sku, "title": title, "prices": prices })).await?;
            println!("product {sku} added");
        }
        ProductsCommand::List => {
            let products = client.get("/v1/products").await?;
            print(args, &products, |products| {
                println!("{:<20} {:>8}  {:<30} prices", "sku", "pool", "title");
                for p in products.as_array().into_iter().flatten() {
                    let prices: Vec<String> = p["prices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|pr| format!("{} {}", text(&pr["amount_minor"]), text(&pr["currency"])))
                        .collect();
                    println!(
                        "{:<20} {:>8}  {:<30} {}",
                        text(&p["sku"]),
                        text(&p["pool"]),
                        text(&p["titles"]["en"]),
                        prices.join(", ")
                    );
                }
            })?;
        }
        ProductsCommand::SetPrice { sku, price } => {
            let updated = client.post_json(&format!("/v1/products/{sku}/prices"), &parse_price(&price)?).await?;
            println!("{sku} prices: {}", updated["prices"]);
        }
        ProductsCommand::Topup { sku, low, target, off } => {
            let path = format!("/v1/products/{sku}/topup");
            match (off, low, target) {
                (true, _, _) => {
                    client.delete(&path).await?;
                    println!("{sku}: automatic top-up off");
                }
                (false, Some(low), Some(target)) => {
                    client.put_json(&path, &json!({ "low_watermark": low, "target": target })).await?;
                    println!("{sku}: nodes under {low} sellable keys are topped up to {target} from the pool");
                }
                _ => bail!("give --low and --target, or --off"),
            }
        }
    }
    Ok(())
}

pub async fn keys(args: &AdminArgs, command: KeysCommand) -> Result<()> {
    let client = args.client()?;
    let KeysCommand::Import { sku, file, csv_column, header, strict } = command;
    let body = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut path = format!("/v1/products/{sku}/keys?strict={strict}");
    if let Some(column) = csv_column {
        if column == 0 {
            bail!("--csv-column counts from 1");
        }
        path.push_str(&format!("&format=csv&column={}&header={header}", column - 1));
    }
    let report = client.post_bytes(&path, body).await?;
    print(args, &report, |r| {
        println!("imported {} keys of {} (batch {})", text(&r["imported"]), text(&r["sku"]), text(&r["batch"]));
        let lines = |v: &Value| v.as_array().map_or(0, Vec::len);
        println!("duplicates in the file: {}", lines(&r["duplicates_in_file"]));
        println!("duplicates already known: {}", lines(&r["duplicates_known"]));
        println!("blank lines: {}", text(&r["blank_lines"]));
        let invalid = r["invalid"].as_array().cloned().unwrap_or_default();
        println!("invalid rows: {}", invalid.len());
        for row in invalid.iter().take(20) {
            println!("  line {}: {}", text(&row["line"]), text(&row["reason"]));
        }
    })
}

pub async fn slices(args: &AdminArgs, command: SlicesCommand) -> Result<()> {
    let client = args.client()?;
    match command {
        SlicesCommand::Allocate { sku, node, count } => {
            let made = client.post_json("/v1/slices", &json!({ "sku": sku, "node": node, "count": count })).await?;
            let ids: Vec<String> = made["slices"]
                .as_array()
                .map(|slices| slices.iter().map(|s| text(&s["slice_id"])).collect())
                .unwrap_or_default();
            let noun = if ids.len() == 1 { "slice" } else { "slices" };
            println!(
                "{noun} {} of {sku}: {count} keys granted to {node}; they reach the node with its next sync",
                ids.join(", ")
            );
        }
        SlicesCommand::List => {
            let slices = client.get("/v1/slices").await?;
            print(args, &slices, |slices| {
                println!(
                    "{:>6} {:<20} {:<12} {:>6} {:<10} {:>8} {:>8} {:>11} {:>11}  lease until",
                    "slice", "sku", "node", "epoch", "state", "unsold", "sold", "quarantined", "written off"
                );
                for s in slices.as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {:<20} {:<12} {:>6} {:<10} {:>8} {:>8} {:>11} {:>11}  {}",
                        text(&s["slice_id"]),
                        text(&s["sku"]),
                        text(&s["node"]),
                        text(&s["epoch"]),
                        text(&s["state"]["state"]),
                        text(&s["unsold"]),
                        text(&s["sold"]),
                        text(&s["quarantined"]),
                        text(&s["written_off"]),
                        time(&s["lease_deadline"])
                    );
                }
            })?;
        }
        SlicesCommand::Move { sku, from, to, count } => {
            let change = json!({ "change": "move", "sku": sku, "from": from, "to": to, "count": count });
            let preview = client.post_json("/v1/layout/changes", &change).await?;
            print(args, &preview, print_layout)?;
        }
        SlicesCommand::Drain { node } => {
            let preview = client.post_json("/v1/layout/changes", &json!({ "change": "drain", "node": node })).await?;
            print(args, &preview, print_layout)?;
        }
        SlicesCommand::Show => {
            let preview = client.get("/v1/layout").await?;
            print(args, &preview, print_layout)?;
        }
        SlicesCommand::Apply { version } => {
            let applied = client.post_json("/v1/layout/apply", &json!({ "version": version })).await?;
            print(args, &applied, |a| {
                println!("layout version {version} applied:");
                for m in a["moves"].as_array().into_iter().flatten() {
                    println!(
                        "  ticket {}: slice {} on {} {} → {}",
                        text(&m["ticket"]),
                        text(&m["slice_id"]),
                        text(&m["from"]),
                        if m["close"].as_bool() == Some(true) {
                            "closes".to_string()
                        } else {
                            format!("gives {}", text(&m["requested"]))
                        },
                        destination(&m["to"])
                    );
                }
                println!("donors release first, with their next sync; recipients get the released keys after that.");
                println!("follow it with `edgecard status`.");
            })?;
        }
        SlicesCommand::Revert => {
            let preview = client.post_json("/v1/layout/revert", &json!({})).await?;
            print(args, &preview, |p| {
                println!("staged changes discarded; layout version {} is empty", text(&p["version"]))
            })?;
        }
        SlicesCommand::WriteOff { slice } => {
            let result = client.post_json(&format!("/v1/slices/{slice}/write-off"), &json!({})).await?;
            print(args, &result, |r| {
                println!("slice {slice}: {} quarantined keys written off", text(&r["written_off"]))
            })?;
        }
    }
    Ok(())
}

/// Where a move's keys go, from its JSON form.
fn destination(to: &Value) -> String {
    match to["kind"].as_str() {
        Some("node") => text(&to["node"]),
        _ => "pool".into(),
    }
}

fn print_layout(preview: &Value) {
    let version = text(&preview["version"]);
    let changes = preview["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        println!("nothing staged (next layout version {version})");
        return;
    }
    println!("staged changes (layout version {version}):");
    for change in &changes {
        match change["change"].as_str() {
            Some("move") => println!(
                "  move {} keys of {} from {} to {}",
                text(&change["count"]),
                text(&change["sku"]),
                text(&change["from"]),
                text(&change["to"])
            ),
            _ => println!("  drain {}", text(&change["node"])),
        }
    }
    if let Some(error) = preview["error"].as_str() {
        println!("\nthe plan no longer holds: {error}");
        println!("revert with `edgecard slices revert` and stage again.");
        return;
    }
    let plan = &preview["plan"];
    println!("\nplan (donors release first; recipients are granted only what was released):");
    for step in plan["steps"].as_array().into_iter().flatten() {
        let what = if step["close"].as_bool() == Some(true) {
            "close".to_string()
        } else {
            format!("shrink by {}", text(&step["count"]))
        };
        println!(
            "  slice {:>5} of {:<16} on {:<10} {:<16} → {}",
            text(&step["slice_id"]),
            text(&step["sku"]),
            text(&step["donor"]),
            what,
            destination(&step["to"])
        );
    }
    println!("\nunsold keys after:");
    for change in plan["stock"].as_array().into_iter().flatten() {
        println!(
            "  {:<10} {:<16} {:>8} → {}",
            text(&change["node"]),
            text(&change["sku"]),
            text(&change["before"]),
            text(&change["after"])
        );
    }
    if let Some(pool) = plan["pool_after"].as_object() {
        for (sku, n) in pool {
            println!("  {:<10} {:<16} {:>8}", "pool", sku, text(n));
        }
    }
    println!("\napply with:\n  edgecard slices apply --version {version}");
}

fn order_query(filter: &OrderFilterArgs) -> String {
    let mut params = Vec::new();
    if let Some(s) = &filter.status {
        params.push(format!("status={s}"));
    }
    if let Some(s) = &filter.sku {
        params.push(format!("sku={s}"));
    }
    if let Some(n) = &filter.node {
        params.push(format!("node={n}"));
    }
    if let Some(since) = filter.since {
        params.push(format!("since={since}"));
    }
    if params.is_empty() {
        "/v1/orders".into()
    } else {
        format!("/v1/orders?{}", params.join("&"))
    }
}

const CSV_COLUMNS: [&str; 10] = [
    "order_id",
    "node",
    "sku",
    "quantity",
    "amount_minor",
    "currency",
    "status",
    "created_at",
    "channel",
    "provider_txn",
];

/// The ledger's orders as CSV (RFC 4180 quoting).
pub fn orders_csv(orders: &Value) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for order in orders.as_array().into_iter().flatten() {
        let row: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| {
                let value = match &order[*c] {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if value.contains([',', '"', '\n']) {
                    format!("\"{}\"", value.replace('"', "\"\""))
                } else {
                    value
                }
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

pub async fn orders(args: &AdminArgs, command: OrdersCommand) -> Result<()> {
    let client = args.client()?;
    match command {
        OrdersCommand::List(filter) => {
            let orders = client.get(&order_query(&filter)).await?;
            print(args, &orders, |orders| {
                println!("{:<32} {:<10} {:<16} {:>4} {:>10} {:<20}", "order", "node", "sku", "qty", "amount", "status");
                for o in orders.as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<10} {:<16} {:>4} {:>10} {:<20}",
                        text(&o["order_id"]),
                        text(&o["node"]),
                        text(&o["sku"]),
                        text(&o["quantity"]),
                        format!("{} {}", text(&o["amount_minor"]), text(&o["currency"])),
                        text(&o["status"])
                    );
                }
            })?;
        }
        OrdersCommand::Export { filter, format, out } => {
            let orders = client.get(&order_query(&filter)).await?;
            let rendered = match format {
                ExportFormat::Json => serde_json::to_string_pretty(&orders)?,
                ExportFormat::Csv => orders_csv(&orders),
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, rendered).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("{} orders written to {}", orders.as_array().map_or(0, Vec::len), path.display());
                }
                None => print!("{rendered}"),
            }
        }
        OrdersCommand::Refund { order, reason } => {
            let order: edgecard_protocol::OrderId =
                order.parse().map_err(|_| anyhow::anyhow!("{order:?} is not an order id (32 hex digits)"))?;
            let body = serde_json::json!({ "reason": reason.unwrap_or_default() });
            let refund = client.post_json(&format!("/v1/orders/{order}/refund"), &body).await?;
            print(args, &refund, |r| {
                println!(
                    "refund of order {} {} (node {}, {})",
                    text(&r["order_id"]),
                    refund_state_words(&r["state"]),
                    text(&r["node"]),
                    text(&r["state"]["state"])
                );
            })?;
        }
        OrdersCommand::Refunds => {
            let refunds = client.get("/v1/refunds").await?;
            print(args, &refunds, |refunds| {
                println!("{:<32} {:<10} {:<10} {:<28} reason", "order", "node", "state", "provider refund");
                for r in refunds.as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<10} {:<10} {:<28} {}",
                        text(&r["order_id"]),
                        text(&r["node"]),
                        text(&r["state"]["state"]),
                        text(&r["state"]["provider_refund"]),
                        text(&r["reason"])
                    );
                }
            })?;
        }
    }
    Ok(())
}

/// What an operator should read in a refund's state.
fn refund_state_words(state: &Value) -> &'static str {
    match state["state"].as_str() {
        Some("requested") => "requested: its node carries it out at its next sync",
        Some("refunded") => "done",
        Some("manual") => "to be refunded by hand at the provider (its channel has no refund call); keys revoked",
        Some("refused") => "refused by its node",
        _ => "in an unknown state",
    }
}

pub async fn status(args: &AdminArgs) -> Result<()> {
    let client = args.client()?;
    let status = client.get("/v1/status").await?;
    print(args, &status, |s| {
        println!("{:<20} {:>8} {:>8} {:>10}  granted per node", "sku", "pool", "sold", "awaiting");
        for sku in s["skus"].as_array().into_iter().flatten() {
            println!(
                "{:<20} {:>8} {:>8} {:>10}  {}",
                text(&sku["sku"]),
                text(&sku["pool"]),
                text(&sku["sold"]),
                text(&sku["paid_awaiting_stock"]),
                sku["granted"]
            );
        }
        println!(
            "\n{:<12} {:<8} {:<13} {:>10} {:>8} {:>9}  stock per sku",
            "node", "region", "state", "acked seq", "pending", "lag"
        );
        for n in s["nodes"].as_array().into_iter().flatten() {
            println!(
                "{:<12} {:<8} {:<13} {:>10} {:>8} {:>9}  {}",
                text(&n["node"]),
                text(&n["region"]),
                node_state(n),
                text(&n["events_high_water"]),
                text(&n["pending_control"]),
                lag(&n["last_contact"]),
                stock_per_sku(&n["stock"])
            );
        }
        println!(
            "\n{:>6} {:<12} {:<16} {:<10} {:>8} {:>8} {:>11}  lease until",
            "slice", "node", "sku", "state", "unsold", "sold", "quarantined"
        );
        for l in s["leases"].as_array().into_iter().flatten() {
            println!(
                "{:>6} {:<12} {:<16} {:<10} {:>8} {:>8} {:>11}  {}",
                text(&l["slice_id"]),
                text(&l["node"]),
                text(&l["sku"]),
                text(&l["state"]),
                text(&l["unsold"]),
                text(&l["sold"]),
                text(&l["quarantined"]),
                time(&l["lease_deadline"])
            );
        }
        let moves = s["moves_in_flight"].as_array().cloned().unwrap_or_default();
        println!("\nmoves in flight: {}", moves.len());
        for m in &moves {
            println!(
                "  ticket {} ({}): slice {} on {} → {}, released {} of {}, {}",
                text(&m["ticket"]),
                text(&m["kind"]),
                text(&m["slice_id"]),
                text(&m["from"]),
                destination(&m["to"]),
                text(&m["released"]),
                if m["close"].as_bool() == Some(true) { "all".to_string() } else { text(&m["requested"]) },
                text(&m["state"])
            );
        }
        let quarantined: Vec<String> = s["skus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["quarantined"].as_u64().unwrap_or(0) + k["written_off"].as_u64().unwrap_or(0) > 0)
            .map(|k| {
                format!("{} {} (written off {})", text(&k["sku"]), text(&k["quarantined"]), text(&k["written_off"]))
            })
            .collect();
        println!("quarantined keys: {}", if quarantined.is_empty() { "none".into() } else { quarantined.join(", ") });
        let policies: Vec<String> = s["skus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["topup"].is_object())
            .map(|k| {
                format!(
                    "{} below {} → {}",
                    text(&k["sku"]),
                    text(&k["topup"]["low_watermark"]),
                    text(&k["topup"]["target"])
                )
            })
            .collect();
        println!("top-up: {}", if policies.is_empty() { "off".into() } else { policies.join(", ") });
        for n in s["nodes"].as_array().into_iter().flatten() {
            for t in n["topups"].as_array().into_iter().flatten() {
                println!(
                    "  {} got {} keys of {} (slice {}) at {}",
                    text(&n["node"]),
                    text(&t["keys"]),
                    text(&t["sku"]),
                    text(&t["slice_id"]),
                    time(&t["at"])
                );
            }
        }
        println!("\nalarms: {}", text(&s["alarms"]));
        for a in s["latest_alarms"].as_array().into_iter().flatten() {
            println!("  [{}] {} {}: {}", text(&a["seq"]), text(&a["node"]), text(&a["kind"]), text(&a["detail"]));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_export_quotes_what_needs_quoting() {
        let orders = json!([{ "order_id": "ab", "node": "eu-1", "sku": "g", "quantity": 1, "amount_minor": 100,
            "currency": "USD", "status": "delivered", "created_at": 5, "channel": "x,y", "provider_txn": null }]);
        let csv = orders_csv(&orders);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert_eq!(lines[1], "ab,eu-1,g,1,100,USD,delivered,5,\"x,y\",");
    }

    #[test]
    fn prices_parse_or_explain() {
        assert_eq!(parse_price("1000:USD").ok(), Some(json!({ "amount_minor": 1000, "currency": "USD" })));
        assert!(parse_price("10.00:USD").is_err());
        assert!(parse_price("1000").is_err());
    }
}
