//! Harness for the end-to-end tests: signing keys and grants, node configs, real `edgecard node run`
//! processes (killed on drop), and an HTTPS client with the shop's calls.
//!
//! Every test binary uses a different part of this module.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edgecard::grant_tool::{self, GrantSpec};
use edgecard::https_client::{ClientError, Connection, Endpoint, Request, Response};
use edgecard_protocol::{Epoch, NodeId, Secret, SignedGrant, Sku, SliceId};
use parking_lot::Mutex;
use serde_json::{json, Value};

pub mod coordinator;
pub mod smtp;

pub const SKU: &str = "game-10";
pub const PRICE_MINOR: u64 = 1000;
pub const ADMIN_TOKEN: &str = "admin-token-123";
/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on every single HTTP request the tests make.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// `n` fresh card-key secrets, `KEY-<32 hex>`, easy to search for in logs.
pub fn make_secrets(n: usize) -> Vec<String> {
    (0..n).map(|_| format!("KEY-{}", hex::encode(rand::random::<[u8; 16]>()))).collect()
}

/// A random lower-case hex string of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

/// Unix time in seconds.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A signed grant of `secrets` for `SKU`, keys numbered from `first_key_id`.
pub fn sign_grant(key: &SigningKey, node: &str, slice_id: u64, first_key_id: u64, secrets: &[String]) -> SignedGrant {
    let spec = GrantSpec {
        slice_id: SliceId(slice_id),
        sku: Sku::new(SKU).unwrap(),
        node: NodeId::new(node).unwrap(),
        epoch: Epoch(1),
        first_key_id,
        lease: Duration::from_secs(24 * 3600),
    };
    let secrets = secrets.iter().map(|s| Secret::new(s.clone()).unwrap()).collect();
    grant_tool::sign_grant(key, &spec, secrets).unwrap()
}

/// One test's world: a temp dir (removed at the end), the coordinator's grant-signing key.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub signing_key: SigningKey,
    /// The verifying key as configured in `trust.coordinator_key`.
    pub coordinator_key: String,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("coordinator.key");
        let coordinator_key = grant_tool::keygen(&key_file).unwrap();
        let signing_key = grant_tool::load_signing_key(&key_file).unwrap();
        TestEnv { dir, signing_key, coordinator_key }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A grant of `secrets` for `node`, signed with this env's coordinator key.
    pub fn grant(&self, node: &str, slice_id: u64, first_key_id: u64, secrets: &[String]) -> SignedGrant {
        sign_grant(&self.signing_key, node, slice_id, first_key_id, secrets)
    }

    /// Writes `grant` to `name` in the temp dir and returns its path.
    pub fn write_grant(&self, name: &str, grant: &SignedGrant) -> PathBuf {
        let path = self.path(name);
        grant_tool::write_private(&path, &grant.to_bytes().unwrap()).unwrap();
        path
    }

    /// Writes a grant of `secrets` for node `eu-1` (slice 1) and returns its path.
    pub fn grant_file(&self, secrets: &[String]) -> PathBuf {
        let grant = self.grant("eu-1", 1, 1, secrets);
        self.write_grant("eu-1-slice-1.grant", &grant)
    }

    /// Writes the node's config file and returns its path. The data dir is derived from the node
    /// id, so writing the same options again reuses the node's store.
    pub fn write_config(&self, options: &NodeOptions) -> PathBuf {
        let path = self.path(&format!("{}.toml", options.node_id));
        std::fs::write(&path, options.render(&self.coordinator_key, &self.path(&format!("data-{}", options.node_id))))
            .unwrap();
        path
    }

    /// Writes the config and starts the node.
    pub fn start_node(&self, options: &NodeOptions) -> NodeProcess {
        let config = self.write_config(options);
        NodeProcess::start(&config, &options.env)
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The knobs tests turn; everything else is the node's default.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub node_id: String,
    pub grant_files: Vec<PathBuf>,
    pub reservation_ttl_secs: u64,
    pub expiry_sweep_ms: u64,
    pub max_open_per_ip: u32,
    pub max_open_per_email: u32,
    pub trusted_proxies: Vec<String>,
    /// `none` or `x-forwarded-for` (or the other names the config knows).
    pub client_ip_header: String,
    /// (per_second, burst) of order creation.
    pub create_order_limit: (u32, u32),
    /// (per_second, burst) of catalog, order lookup and payment.
    pub other_limits: (u32, u32),
    pub sandbox_secret: Option<String>,
    /// The body of `[abuse]`; `None`: challenges off, because a test's many buyers share the
    /// loopback address (tests/challenge.rs turns them on).
    pub abuse: Option<String>,
    /// Extra environment for the node process (EDGECARD_LOG and friends).
    pub env: Vec<(String, String)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            node_id: "eu-1".into(),
            grant_files: Vec::new(),
            reservation_ttl_secs: 900,
            expiry_sweep_ms: 1000,
            max_open_per_ip: 5,
            max_open_per_email: 5,
            trusted_proxies: vec!["127.0.0.1/32".into()],
            client_ip_header: "x-forwarded-for".into(),
            create_order_limit: (1000, 1000),
            other_limits: (1000, 1000),
            sandbox_secret: None,
            abuse: None,
            env: Vec::new(),
        }
    }
}

impl NodeOptions {
    pub fn with_grants(grant_files: Vec<PathBuf>) -> NodeOptions {
        NodeOptions { grant_files, ..NodeOptions::default() }
    }

    pub fn render(&self, coordinator_key: &str, data_dir: &Path) -> String {
        let list = |items: &[String]| items.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
        let grants: Vec<String> = self.grant_files.iter().map(|p| p.display().to_string()).collect();
        let quota = |(per_second, burst): (u32, u32)| format!("{{ per_second = {per_second}, burst = {burst} }}");
        let sandbox_secret = match &self.sandbox_secret {
            Some(secret) => format!("secret = {}\n", toml_str(secret)),
            None => String::new(),
        };
        format!(
            r#"node_id = {node_id}
data_dir = {data_dir}

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = {admin_token}

[trust]
coordinator_key = {coordinator_key}
grant_files = [{grants}]

[orders]
reservation_ttl_secs = {ttl}
expiry_sweep_ms = {sweep}
max_open_per_ip = {per_ip}
max_open_per_email = {per_email}

[client_ip]
trusted_proxies = [{trusted}]
header = {header}

[limits]
create_order = {create_order}
catalog = {other}
order_lookup = {other}
payment = {other}

[abuse]
{abuse}

[payments.sandbox]
enabled = true
{sandbox_secret}
[[products]]
sku = {sku}
title = {{ en = "Game card", "zh-CN" = "游戏卡" }}
prices = [{{ amount_minor = {price}, currency = "USD" }}, {{ amount_minor = 900, currency = "EUR" }}]
"#,
            node_id = toml_str(&self.node_id),
            data_dir = toml_str(&data_dir.display().to_string()),
            admin_token = toml_str(ADMIN_TOKEN),
            coordinator_key = toml_str(coordinator_key),
            grants = list(&grants),
            ttl = self.reservation_ttl_secs,
            sweep = self.expiry_sweep_ms,
            per_ip = self.max_open_per_ip,
            per_email = self.max_open_per_email,
            trusted = list(&self.trusted_proxies),
            header = toml_str(&self.client_ip_header),
            create_order = quota(self.create_order_limit),
            other = quota(self.other_limits),
            sku = toml_str(SKU),
            price = PRICE_MINOR,
            abuse = self.abuse.as_deref().unwrap_or("enabled = false"),
        )
    }
}

/// A running `edgecard node run`. Dropping it kills the process (SIGKILL).
pub struct NodeProcess {
    child: Option<Child>,
    pub config: PathBuf,
    pub ready: Value,
    /// `https://127.0.0.1:PORT`
    pub https_url: String,
    /// `http://127.0.0.1:PORT`
    pub admin_url: String,
    pub public_url: String,
    pub api: Endpoint,
    pub admin: Endpoint,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn text(buffer: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buffer.lock()).into_owned()
}

impl NodeProcess {
    /// Spawns the node and waits (at most [`READY_TIMEOUT`]) for its ready line.
    pub fn start(config: &Path, env: &[(String, String)]) -> NodeProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edgecard"));
        command.arg("node").arg("run").arg("--config").arg(config);
        for name in [
            "EDGECARD_LOG",
            "EDGECARD_LOG_FORMAT",
            "EDGECARD_SANDBOX_SECRET",
            "EDGECARD_NODE_ADMIN_TOKEN",
            "EDGECARD_COORDINATOR_KEY",
        ] {
            command.env_remove(name);
        }
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();

        let CapturedOutput { stdout, stderr, ready: ready_rx, readers } = capture_output(&mut child);

        let line = match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                for reader in readers {
                    let _ = reader.join();
                }
                panic!(
                    "node {} not ready ({e:?}; exit: {status:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    config.display(),
                    text(&stdout),
                    text(&stderr)
                );
            }
        };
        let ready: Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(ready["event"], "ready", "{ready}");
        let https_url = format!("https://{}", ready["https"].as_str().unwrap());
        let admin_url = format!("http://{}", ready["admin"].as_str().unwrap());
        let public_url = ready["public_url"].as_str().unwrap().to_string();
        let cert = std::fs::read(ready["self_signed_cert"].as_str().expect("a self-signed cert path")).unwrap();
        let api = Endpoint::parse(&https_url, Some(&cert)).unwrap().with_timeout(REQUEST_TIMEOUT);
        let admin = Endpoint::parse(&admin_url, None).unwrap().with_timeout(REQUEST_TIMEOUT);
        NodeProcess {
            child: Some(child),
            config: config.to_path_buf(),
            ready,
            https_url,
            admin_url,
            public_url,
            api,
            admin,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the node wrote to stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }

    /// Everything the node wrote to stdout so far.
    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    /// `kill -9`, then reaps the process and drains its pipes.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_readers();
    }

    /// SIGTERM, and waits (bounded) for a clean exit. Panics if the node does not stop in time.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node already stopped");
        let sent = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.join_readers();
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.join_readers();
                panic!("node did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- stderr ---\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// A fresh keep-alive HTTPS connection to the buyer API.
    pub async fn client(&self) -> Client {
        let conn = self.api.connect().await.unwrap_or_else(|e| panic!("connect to {}: {e}", self.https_url));
        Client { conn, public_url: self.public_url.clone(), forwarded_for: None }
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Response {
        self.admin.request(Request::get(path)).await.unwrap()
    }

    /// `POST /admin/v1/grants` with the admin token.
    pub async fn install_grant(&self, grant_bytes: &[u8]) -> Response {
        let request = Request::post("/admin/v1/grants")
            .header("authorization", &format!("Bearer {ADMIN_TOKEN}"))
            .body(grant_bytes.to_vec());
        self.admin.request(request).await.unwrap()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let response = self.admin_get("/metrics").await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.text()
    }

    /// All samples of `/metrics` (see [`parse_metrics`]).
    pub async fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&self.metrics_text().await)
    }

    /// One sample without labels but the node's own; panics when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        *self.metrics().await.get(name).unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// `/admin/v1/status` as JSON.
    pub async fn status(&self) -> Value {
        let response = self
            .admin
            .request(Request::get("/admin/v1/status").header("authorization", &format!("Bearer {ADMIN_TOKEN}")))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        response.json().unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_readers();
    }
}

/// Samples by name and labels, without the `node` and `region` labels every series of a node
/// carries (see `edgecard::bench::node_metrics::parse_samples`).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    edgecard::bench::node_metrics::parse_samples(text)
}

/// One keep-alive connection to a node's buyer API, with the shop's calls.
pub struct Client {
    pub conn: Connection,
    pub public_url: String,
    /// Sent as `X-Forwarded-For` on every request when set.
    pub forwarded_for: Option<String>,
}

impl Client {
    pub fn forwarded_for(mut self, ip: impl Into<String>) -> Client {
        self.forwarded_for = Some(ip.into());
        self
    }

    /// Sends `request` (adding X-Forwarded-For when set), bounded by [`REQUEST_TIMEOUT`].
    pub async fn try_send(&mut self, mut request: Request) -> Result<Response, ClientError> {
        if let Some(ip) = &self.forwarded_for {
            request = request.header("x-forwarded-for", ip);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), self.conn.send(request)).await {
            Ok(result) => result,
            Err(_) => panic!("request not answered within {REQUEST_TIMEOUT:?}"),
        }
    }

    pub async fn send(&mut self, request: Request) -> Response {
        let what = format!("{} {}", request.method, request.path);
        self.try_send(request).await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// `GET /api/v1/products`, checked for 200.
    pub async fn products(&mut self) -> Vec<Value> {
        let response = self.send(Request::get("/api/v1/products")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.json().unwrap()
    }

    /// The catalog's stock of `SKU`.
    pub async fn stock(&mut self) -> u64 {
        let products = self.products().await;
        let product = products.iter().find(|p| p["sku"] == SKU).unwrap_or_else(|| panic!("{SKU} not listed"));
        product["stock"].as_u64().unwrap()
    }

    /// `POST /api/v1/orders` with `body`; any status.
    pub async fn create_order(&mut self, body: &Value) -> Response {
        self.send(Request::post_json("/api/v1/orders", body)).await
    }

    /// Orders `quantity` of `SKU` and checks the 201; returns the created order.
    pub async fn reserve(&mut self, quantity: u32) -> Created {
        let response = self.create_order(&json!({ "sku": SKU, "quantity": quantity })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        Created::from_response(&response)
    }

    /// The path (and query) of a URL of this node, such as a pay URL (`/pay/sandbox/{id}?token=…`).
    pub fn pay_path<'a>(&self, pay_url: &'a str) -> &'a str {
        pay_url.strip_prefix(&self.public_url).unwrap_or_else(|| panic!("{pay_url} is not under {}", self.public_url))
    }

    /// `POST {pay_url}`; any status.
    pub async fn pay(&mut self, pay_url: &str) -> Response {
        let path = self.pay_path(pay_url).to_string();
        self.send(Request::post(&path)).await
    }

    /// Opens `url` (on this node) as a browser does: GET, following redirects within the node
    /// (at most 5). Returns the last response.
    pub async fn browse(&mut self, url: &str) -> Response {
        let mut path = self.pay_path(url).to_string();
        for _ in 0..5 {
            let response = self.send(Request::get(&path).header("accept", "text/html")).await;
            if !(300..400).contains(&response.status) {
                return response;
            }
            let location = response.header("location").unwrap_or_else(|| panic!("redirect without a location"));
            path = if location.starts_with('/') { location.to_string() } else { self.pay_path(location).to_string() };
        }
        panic!("more than 5 redirects from {url}");
    }

    /// `GET /api/v1/orders/{id}`, with `Authorization: Bearer <token>` when given; any status.
    pub async fn fetch(&mut self, order_id: &str, token: Option<&str>) -> Response {
        let mut request = Request::get(&format!("/api/v1/orders/{order_id}"));
        if let Some(token) = token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        self.send(request).await
    }

    /// Fetches with the right token and checks the 200; returns the order view.
    pub async fn fetch_ok(&mut self, order: &Created) -> Value {
        let response = self.fetch(&order.order_id, Some(&order.token)).await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.json().unwrap()
    }

    /// Reserve, pay and fetch; returns the delivered keys.
    pub async fn buy(&mut self, quantity: u32) -> (Created, Vec<String>) {
        let order = self.reserve(quantity).await;
        let paid = self.pay(&order.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered");
        let view = self.fetch_ok(&order).await;
        assert_eq!(view["status"], "delivered", "{view}");
        let keys = keys_of(&view);
        assert_eq!(keys.len(), quantity as usize, "{view}");
        (order, keys)
    }
}

/// What `POST /api/v1/orders` answered.
#[derive(Clone, Debug)]
pub struct Created {
    pub order_id: String,
    pub token: String,
    pub pay_url: String,
    pub body: Value,
}

impl Created {
    pub fn from_response(response: &Response) -> Created {
        let body: Value = response.json().unwrap();
        Created {
            order_id: body["order_id"].as_str().unwrap().to_string(),
            token: body["token"].as_str().unwrap().to_string(),
            pay_url: body["pay_url"].as_str().unwrap().to_string(),
            body,
        }
    }
}

/// The `keys` of an order view (empty when absent).
pub fn keys_of(view: &Value) -> Vec<String> {
    view["keys"]
        .as_array()
        .map(|keys| keys.iter().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The `error.code` of a JSON error response; panics when the body is not one.
pub fn error_code(response: &Response) -> String {
    let body: Value = response
        .json()
        .unwrap_or_else(|e| panic!("status {}: not a JSON error ({e}): {:?}", response.status, response.text()));
    assert!(body["error"]["message"].is_string(), "no error.message in {body}");
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code in {body}")).to_string()
}

/// Runs `future`, failing the test if it takes longer than `limit`.
pub async fn bounded<F: std::future::Future>(what: &str, limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

impl TestEnv {
    /// Like [`TestEnv::start_node`], with `extra_toml` appended to the config (more
    /// `[[products]]`, say).
    pub fn start_node_with(&self, options: &NodeOptions, extra_toml: &str) -> NodeProcess {
        let config = self.write_config(options);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push('\n');
        text.push_str(extra_toml);
        std::fs::write(&config, text).unwrap();
        NodeProcess::start(&config, &options.env)
    }
}

/// A child's stdout and stderr, collected by reader threads; each stdout line that contains
/// `"ready"` is also sent on `ready`.
pub struct CapturedOutput {
    pub stdout: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub ready: mpsc::Receiver<String>,
    pub readers: Vec<std::thread::JoinHandle<()>>,
}

/// Starts collecting `child`'s piped stdout and stderr.
pub fn capture_output(child: &mut Child) -> CapturedOutput {
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out_pipe = child.stdout.take().unwrap();
    let out_buffer = stdout.clone();
    readers.push(std::thread::spawn(move || {
        let mut reader = BufReader::new(out_pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    out_buffer.lock().extend_from_slice(&line);
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if text.contains("\"ready\"") {
                        let _ = ready_tx.send(text);
                    }
                }
            }
        }
    }));
    let mut err_pipe = child.stderr.take().unwrap();
    let err_buffer = stderr.clone();
    readers.push(std::thread::spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match err_pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => err_buffer.lock().extend_from_slice(&chunk[..n]),
            }
        }
    }));
    CapturedOutput { stdout, stderr, ready, readers }
}
