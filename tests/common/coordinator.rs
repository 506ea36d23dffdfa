//! The coordinator half of the end-to-end harness: a real `edgecard coordinator run` process on a
//! data dir (killed on drop, restartable on the same dir and ports), the operator CLI run as a
//! child process with a bounded wait, and node bundles from `edgecard nodes add` turned into
//! runnable node configs.
//!
//! Blocking steps (waiting for a ready line) run on tokio's blocking pool, so buyers on the same
//! runtime keep going while a coordinator restarts.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use serde_json::Value;

use super::{NodeProcess, ADMIN_TOKEN, READY_TIMEOUT, SKU};

/// Bound on one CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a node receiving its catalog and slices over the sync link.
pub const STOCK_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two polls of the coordinator or a node.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Variables the product reads that must not leak from the test runner's environment.
const SCRUBBED_ENV: [&str; 8] = [
    "EDGECARD_ADMIN_URL",
    "EDGECARD_ADMIN_TOKEN",
    "EDGECARD_LOG",
    "EDGECARD_LOG_FORMAT",
    "EDGECARD_SANDBOX_SECRET",
    "EDGECARD_NODE_ADMIN_TOKEN",
    "EDGECARD_COORDINATOR_KEY",
    "EDGECARD_SEALING_KEY",
];

/// Runs blocking `work` on tokio's blocking pool; a panic in it is re-raised here.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task failed: {e}"),
    }
}

/// A port that is free for both TCP and UDP on 127.0.0.1, taken at most once per test binary.
/// It lies below the kernel's ephemeral range (32768 and up by default), so no outgoing
/// connection or port-0 bind grabs it while a killed coordinator waits for its restart.
pub fn free_port() -> u16 {
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut taken = TAKEN.lock();
    let mut rng = rand::thread_rng();
    for _ in 0..2000 {
        let port = rng.gen_range(20_000..32_000);
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// A child process whose stdout and stderr are collected; SIGKILLed on drop.
pub struct Spawned {
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Spawned {
    /// Spawns `command` (environment as the caller set it) and waits (at most [`READY_TIMEOUT`]) for a stdout line with `"ready"`,
    /// which it returns parsed.
    pub fn start(mut command: Command, what: &str) -> (Spawned, Value) {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let super::CapturedOutput { stdout, stderr, ready: ready_rx, readers } = super::capture_output(&mut child);
        let mut spawned = Spawned { child: Some(child), stdout, stderr, readers };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => {
                let ready: Value = serde_json::from_str(line.trim()).unwrap();
                assert_eq!(ready["event"], "ready", "{ready}");
                (spawned, ready)
            }
            Err(e) => {
                spawned.kill9();
                panic!(
                    "{what} not ready within {READY_TIMEOUT:?} ({e:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    spawned.stdout(),
                    spawned.stderr()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then waits (at most 30 s) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut clean = false;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                clean = status.success();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        clean
    }

    /// `kill -9`, then reaps the process and drains its pipes.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock()).into_owned()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `edgecard coordinator run --dir D`.
pub struct CoordinatorProcess {
    pub dir: PathBuf,
    pub admin_addr: SocketAddr,
    pub sync_addr: SocketAddr,
    /// The enrolment endpoint (TCP).
    pub enrol_addr: SocketAddr,
    /// Extra environment of the process (kept for restarts).
    pub env: Vec<(String, String)>,
    process: Spawned,
    /// stderr of earlier runs on the same dir, oldest first, for failure reports and log checks.
    earlier_runs: Vec<String>,
}

impl CoordinatorProcess {
    /// Starts the coordinator on `dir` with `env` and waits for its ready line. Blocking.
    pub fn start(dir: &Path, env: &[(String, String)]) -> CoordinatorProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edgecard"));
        command.arg("coordinator").arg("run").arg("--dir").arg(dir);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let (process, ready) = Spawned::start(command, &format!("coordinator on {}", dir.display()));
        let addr = |name: &str| -> SocketAddr { ready[name].as_str().unwrap().parse().unwrap() };
        CoordinatorProcess {
            dir: dir.to_path_buf(),
            admin_addr: addr("admin"),
            sync_addr: addr("sync"),
            enrol_addr: addr("enrol"),
            env: env.to_vec(),
            process,
            earlier_runs: Vec::new(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    /// SIGTERM and a clean stop (last checkpoint); returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        self.process.terminate()
    }

    /// `kill -9` (no-op when already dead).
    pub fn kill9(&mut self) {
        if self.is_running() {
            self.process.kill9();
            self.earlier_runs.push(self.process.stderr());
        }
    }

    /// What the current run wrote to stderr so far (empty when it is dead).
    pub fn current_log(&self) -> String {
        if self.is_running() {
            self.process.stderr()
        } else {
            String::new()
        }
    }

    /// stderr of every run on this dir, oldest first; the last is the current one.
    pub fn run_logs(&self) -> Vec<String> {
        let mut runs = self.earlier_runs.clone();
        if self.is_running() {
            runs.push(self.process.stderr());
        }
        runs
    }

    /// Everything every run on this dir wrote to stderr.
    pub fn logs(&self) -> String {
        self.run_logs().join("--- killed with SIGKILL ---\n")
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let mut start = logs.len().saturating_sub(6000);
            while !logs.is_char_boundary(start) {
                start += 1;
            }
            eprintln!("--- coordinator log (tail) ---\n{}", &logs[start..]);
        }
    }
}

/// What one `edgecard` invocation printed.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `edgecard ARGS` with `env`, bounded by [`CLI_TIMEOUT`] (killed when it overruns).
pub async fn edgecard(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgecard"));
    command.args(args);
    for name in SCRUBBED_ENV {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = command.spawn().unwrap();
    let output = match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!("edgecard {args:?} did not finish within {CLI_TIMEOUT:?}"),
    };
    CliOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// How the coordinator's listeners are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Port 0: a restart binds new ports, which nodes configured with the old address never find.
    Any,
    /// Fixed free ports written into coordinator.toml: a restart comes back at the same address.
    Fixed,
}

/// One test's coordinator: a temp dir with the coordinator's data dir and node bundles, the
/// running coordinator, and its admin token.
pub struct Lab {
    // Declared before `dir`: the process dies before its directory is removed.
    pub coordinator: CoordinatorProcess,
    pub token: String,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// `edgecard coordinator init`, then `edgecard coordinator run`.
    pub async fn start(ports: Ports) -> Lab {
        Lab::start_with_env(ports, &[]).await
    }

    /// [`Lab::start`], with extra environment for the coordinator process (`EDGECARD_LOG`, say),
    /// kept across restarts.
    pub async fn start_with_env(ports: Ports, env: &[(&str, &str)]) -> Lab {
        Lab::start_with_env_and_config(ports, env, &[]).await
    }

    /// [`Lab::start`], with fields of `coordinator.toml` set (added or replaced) between `init`
    /// and `run`: `[("lease_secs", toml::Value::Integer(10))]`, say.
    pub async fn start_with_config(ports: Ports, config: &[(&str, toml::Value)]) -> Lab {
        Lab::start_with_env_and_config(ports, &[], config).await
    }

    /// [`Lab::start_with_env`] and [`Lab::start_with_config`] together.
    pub async fn start_with_env_and_config(ports: Ports, env: &[(&str, &str)], config: &[(&str, toml::Value)]) -> Lab {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let dir = tempfile::tempdir().unwrap();
        let coordinator_dir = dir.path().join("coordinator");
        let (admin, sync) = match ports {
            Ports::Any => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
            Ports::Fixed => (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())),
        };
        let dir_arg = coordinator_dir.display().to_string();
        let init = edgecard(
            &["coordinator", "init", "--dir", &dir_arg, "--admin-listen", &admin, "--sync-listen", &sync],
            &[],
        )
        .await;
        assert_eq!(init.code, Some(0), "coordinator init failed: {}", init.stderr);
        let token = init
            .stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("export EDGECARD_ADMIN_TOKEN="))
            .unwrap_or_else(|| panic!("no admin token in the init output:\n{}", init.stdout))
            .to_string();
        if !config.is_empty() {
            edit_toml(&coordinator_dir.join("coordinator.toml"), |table| {
                for (field, value) in config {
                    table.insert(field.to_string(), value.clone());
                }
            });
        }
        let coordinator = blocking(move || CoordinatorProcess::start(&coordinator_dir, &env)).await;
        if ports == Ports::Fixed {
            assert_eq!(coordinator.admin_addr.to_string(), admin);
            assert_eq!(coordinator.sync_addr.to_string(), sync);
        }
        Lab { coordinator, token, dir }
    }

    pub fn coordinator_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// The enrolment endpoint's address, as `--coordinator` takes it.
    pub fn coordinator_enrol_addr(&self) -> String {
        self.coordinator.enrol_addr.to_string()
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.coordinator.admin_addr)
    }

    /// `kill -9` of the coordinator.
    pub fn kill9_coordinator(&mut self) {
        self.coordinator.kill9();
    }

    /// Starts the coordinator again on the same dir (killing it first if it runs).
    pub async fn restart_coordinator(&mut self) {
        self.coordinator.kill9();
        let dir = self.coordinator_dir();
        let env = self.coordinator.env.clone();
        let fresh = blocking(move || CoordinatorProcess::start(&dir, &env)).await;
        let earlier = std::mem::take(&mut self.coordinator.earlier_runs);
        self.coordinator = fresh;
        self.coordinator.earlier_runs = earlier;
    }

    /// Runs an operator command against this coordinator; any exit code.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        let url = self.admin_url();
        edgecard(args, &[("EDGECARD_ADMIN_URL", url.as_str()), ("EDGECARD_ADMIN_TOKEN", self.token.as_str())]).await
    }

    /// Runs an operator command that must succeed; returns its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert_eq!(out.code, Some(0), "edgecard {args:?} failed:\n{}{}", out.stdout, out.stderr);
        out.stdout
    }

    /// Runs an operator command with `--json` that must succeed; returns the parsed output.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("edgecard {args:?}: not JSON ({e}):\n{stdout}"))
    }

    /// Runs an operator command that must fail the way the CLI fails: exit code 1 and one line on
    /// stderr. Returns that line.
    pub async fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert_eq!(out.code, Some(1), "edgecard {args:?} should fail:\n{}{}", out.stdout, out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "edgecard {args:?}: error is not one line:\n{}", out.stderr);
        assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
        out.stderr.trim_end().to_string()
    }

    /// `products add SKU --title en=... --price AMOUNT:USD`.
    pub async fn add_product(&self, sku: &str, price_minor: u64) {
        let price = format!("{price_minor}:USD");
        self.ok(&["products", "add", sku, "--title", "en=Game card", "--title", "zh-CN=游戏卡", "--price", &price])
            .await;
    }

    /// Writes `secrets` to a file and imports it with `keys import SKU FILE --json`.
    pub async fn import(&self, sku: &str, secrets: &[String]) -> Value {
        let path = self.dir.path().join(format!("keys-{}.txt", super::random_hex(4)));
        std::fs::write(&path, secrets.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
        let report = self.json(&["keys", "import", sku, &path.display().to_string()]).await;
        assert_eq!(report["imported"].as_u64(), Some(secrets.len() as u64), "{report}");
        report
    }

    /// `nodes add NAME --region R --bundle --out DIR`, then rewrites the bundle's node.toml into a
    /// runnable config (see [`make_runnable`]). Returns the config's path.
    pub async fn add_node(&self, name: &str, region: &str) -> PathBuf {
        let out_dir = self.dir.path().join(name);
        let stdout = self
            .ok(&["nodes", "add", name, "--region", region, "--bundle", "--out", &out_dir.display().to_string()])
            .await;
        assert!(stdout.contains(&format!("node {name} registered")), "{stdout}");
        let config = out_dir.join("node.toml");
        make_runnable(&config);
        config
    }

    /// `slices allocate SKU --node NAME --count N`.
    pub async fn allocate(&self, sku: &str, node: &str, count: u64) {
        let stdout = self.ok(&["slices", "allocate", sku, "--node", node, "--count", &count.to_string()]).await;
        assert!(stdout.contains(&format!("{count} keys granted to {node}")), "{stdout}");
    }

    /// The ledger: `orders export --format json`.
    pub async fn orders(&self) -> Vec<Value> {
        let stdout = self.ok(&["orders", "export", "--format", "json"]).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("orders export is not JSON ({e}):\n{stdout}"))
    }

    /// `status --json`.
    pub async fn status(&self) -> Value {
        self.json(&["status"]).await
    }

    /// `slices list --json`: every slice with its keys counted by where they are now.
    pub async fn slices(&self) -> Vec<Value> {
        self.json(&["slices", "list"]).await.as_array().unwrap().clone()
    }

    /// Polls `status --json` until `done` holds, at most `limit`; returns the status. Panics
    /// with `what` and the last status when the time runs out.
    pub async fn wait_for_status(&self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            if started.elapsed() > limit {
                panic!("{what}: not reached within {limit:?}\nstatus: {status:#}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Polls the ledger until `done` holds, at most `limit`; returns the ledger and how long it
    /// took. Panics with `what` and the last ledger when the time runs out.
    pub async fn wait_for_ledger(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> (Vec<Value>, Duration) {
        let started = Instant::now();
        loop {
            let orders = self.orders().await;
            if done(&orders) {
                return (orders, started.elapsed());
            }
            if started.elapsed() > limit {
                let status = self.status().await;
                panic!(
                    "{what}: not reached within {limit:?}\nledger ({} orders): {}\nstatus: {status:#}",
                    orders.len(),
                    serde_json::to_string(&orders).unwrap()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// Rewrites a bundle's node.toml (as `edgecard nodes add` wrote it) into a config the tests can
/// run: loopback listeners on port 0, the harness's admin token, the sandbox channel, limits and
/// reservation caps out of the way, loopback trusted as a proxy (X-Forwarded-For), and a 200 ms
/// idle poll on the sync link. The bundle's own fields stay as written.
pub fn make_runnable(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    let link = table.get_mut("coordinator").and_then(toml::Value::as_table_mut).expect("the bundle has [coordinator]");
    link.insert("idle_poll_ms".into(), toml::Value::Integer(200));
    let quota = "{ per_second = 10000, burst = 10000 }";
    let extra: toml::Table = format!(
        r#"
[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[orders]
max_open_per_ip = 1000
max_open_per_email = 1000

[client_ip]
trusted_proxies = ["127.0.0.1/32"]
header = "x-forwarded-for"

[limits]
create_order = {quota}
catalog = {quota}
order_lookup = {quota}
payment = {quota}

# Many test buyers share the loopback address (tests/challenge.rs tests the challenges).
[abuse]
enabled = false

[payments.sandbox]
enabled = true
"#
    )
    .parse()
    .unwrap();
    for (key, value) in extra {
        assert!(!table.contains_key(&key), "the bundle already has [{key}]");
        table.insert(key, value);
    }
    std::fs::write(config, toml::to_string(&table).unwrap()).unwrap();
}

/// Starts `edgecard node run --config CONFIG` (off the async workers) and waits for its ready line.
pub async fn start_node(config: &Path) -> NodeProcess {
    let config = config.to_path_buf();
    blocking(move || NodeProcess::start(&config, &[])).await
}

/// The stock of `SKU` a node lists, or `None` while its catalog lacks the sku.
pub async fn listed_stock(node: &NodeProcess) -> Option<u64> {
    let mut client = node.client().await;
    let products = client.products().await;
    products.iter().find(|p| p["sku"] == SKU).map(|p| p["stock"].as_u64().unwrap())
}

/// Waits (at most [`STOCK_TIMEOUT`]) until the node lists `SKU` with at least `at_least` keys:
/// catalog and grants arrived over the sync link.
pub async fn wait_for_stock(node: &NodeProcess, at_least: u64) {
    let started = Instant::now();
    loop {
        let stock = listed_stock(node).await;
        if stock.is_some_and(|s| s >= at_least) {
            return;
        }
        assert!(
            started.elapsed() < STOCK_TIMEOUT,
            "node {} lists {SKU} stock {stock:?}, not {at_least}, after {STOCK_TIMEOUT:?}\n--- stderr ---\n{}",
            node.config.display(),
            node.stderr()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Order ids that occur more than once in `orders`.
pub fn duplicate_ids(orders: &[Value]) -> Vec<String> {
    let mut seen = HashSet::new();
    orders.iter().map(|o| o["order_id"].as_str().unwrap().to_string()).filter(|id| !seen.insert(id.clone())).collect()
}

/// Key ids that more than one ledger order (or one order twice) carries.
pub fn duplicate_key_ids(orders: &[Value]) -> Vec<(String, u64)> {
    let mut seen = HashSet::new();
    let mut twice = Vec::new();
    for order in orders {
        let sku = order["sku"].as_str().unwrap().to_string();
        for id in order["key_ids"].as_array().unwrap() {
            let key = (sku.clone(), id.as_u64().unwrap());
            if !seen.insert(key.clone()) {
                twice.push(key);
            }
        }
    }
    twice
}

/// The JSON lines of a log written with `EDGECARD_LOG_FORMAT=json`; other lines are skipped.
pub fn json_log_lines(log: &str) -> Vec<Value> {
    log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// Whether a JSON log line is the event `message` inside a span naming `node`.
pub fn is_node_event(line: &Value, message: &str, node: &str) -> bool {
    line["fields"]["message"] == message && line["span"]["node"] == node
}

/// Rewrites a TOML file through `edit` (a node.toml or coordinator.toml between steps, say).
pub fn edit_toml(path: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    edit(&mut table);
    std::fs::write(path, toml::to_string(&table).unwrap()).unwrap();
}

/// Sets `field` of the `[section]` table of a TOML file (made if missing).
pub fn set_toml_field(path: &Path, section: &str, field: &str, value: impl Into<toml::Value>) {
    let value = value.into();
    edit_toml(path, |table| {
        let fields = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("[{section}] is not a table"));
        fields.insert(field.to_string(), value);
    });
}
