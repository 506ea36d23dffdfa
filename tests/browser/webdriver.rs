//! A minimal W3C WebDriver client for the storefront's browser test: Debian's chromedriver on a
//! free loopback port, one headless chromium session, every call bounded. Dropping it kills
//! chromedriver and the browser processes of its session.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use edgecard::https_client::{Endpoint, Request};
use http::Method;
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Bound on each WebDriver command (a page load included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(45);
/// How long chromedriver may take to answer `/status` as ready.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Fails the test, with the fix, when the browser is not installed.
pub fn require_browser() {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "the browser test needs Debian's chromium and chromedriver; missing {missing:?}. \
         Install them with `bash .ci/install-browser` (as root), then run the tests again."
    );
}

pub struct WebDriver {
    child: Option<Child>,
    endpoint: Endpoint,
    session: String,
    _profile: tempfile::TempDir,
}

/// A found element.
#[derive(Clone, Debug)]
pub struct Element(String);

impl WebDriver {
    /// Starts chromedriver and a headless chromium session whose viewport is `width`×`height` CSS
    /// pixels (a phone's, through mobile emulation: a headless window is never under 500 px), with
    /// `accept_language` as the browser's language.
    pub async fn start(width: u32, height: u32, accept_language: &str) -> WebDriver {
        require_browser();
        let port = free_port();
        let mut command = Command::new(CHROMEDRIVER);
        command.arg(format!("--port={port}")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let profile = tempfile::tempdir().unwrap();
        let endpoint =
            Endpoint::parse(&format!("http://127.0.0.1:{port}"), None).unwrap().with_timeout(COMMAND_TIMEOUT);
        let mut driver = WebDriver { child: Some(child), endpoint, session: String::new(), _profile: profile };
        driver.wait_ready().await;
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--ignore-certificate-errors".into(),
            format!("--user-data-dir={}", driver._profile.path().display()),
            format!("--window-size={width},{height}"),
            format!("--lang={accept_language}"),
        ];
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": true,
                    "pageLoadStrategy": "normal",
                    "timeouts": { "pageLoad": 30_000, "script": 10_000, "implicit": 0 },
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": args,
                        "prefs": { "intl.accept_languages": accept_language },
                        "mobileEmulation": {
                            "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1.0, "touch": true }
                        },
                    },
                }
            }
        });
        let created = driver.raw(Method::POST, "/session", Some(capabilities)).await;
        driver.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in the new-session answer: {created}"))
            .to_string();
        driver
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + DRIVER_READY_TIMEOUT;
        loop {
            let probe = self.endpoint.clone().with_timeout(Duration::from_secs(2));
            if let Ok(response) = probe.request(Request::get("/status")).await {
                if response.json::<Value>().is_ok_and(|v| v["value"]["ready"] == true) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within {DRIVER_READY_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One command; returns its `value`. Panics on errors.
    async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut request = Request::new(method.clone(), path);
        if let Some(body) = &body {
            request = request.header("content-type", "application/json").body(serde_json::to_vec(body).unwrap());
        }
        let response =
            self.endpoint.request(request).await.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let answer: Value = response
            .json()
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: status {} not JSON ({e})", response.status));
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        assert!(
            response.is_success(),
            "WebDriver {method} {path} failed with {}: {} {}",
            response.status,
            value["error"],
            value["message"]
        );
        value
    }

    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body).await
    }

    /// Navigates and waits for the load.
    pub async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn current_url(&self) -> String {
        self.cmd(Method::GET, "/url", None).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn title(&self) -> String {
        self.cmd(Method::GET, "/title", None).await.as_str().unwrap_or_default().to_string()
    }

    /// The element matching `css` now, if any.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let path = format!("/session/{}/element", self.session);
        let request = Request::post_json(&path, &json!({ "using": "css selector", "value": css }));
        let response = self.endpoint.request(request).await.ok()?;
        if !response.is_success() {
            return None;
        }
        let value: Value = response.json().ok()?;
        value["value"][ELEMENT_KEY].as_str().map(|id| Element(id.to_string()))
    }

    /// Waits (bounded) for an element matching `css`.
    pub async fn wait_for(&self, css: &str, limit: Duration) -> Element {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(element) = self.try_find(css).await {
                return element;
            }
            if Instant::now() > deadline {
                let url = self.current_url().await;
                let title = self.title().await;
                panic!("no element {css:?} within {limit:?} on {url} ({title})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, element: &Element) {
        self.cmd(Method::POST, &format!("/element/{}/click", element.0), Some(json!({}))).await;
    }

    pub async fn text(&self, element: &Element) -> String {
        self.cmd(Method::GET, &format!("/element/{}/text", element.0), None).await.as_str().unwrap_or("").to_string()
    }

    pub async fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        self.cmd(Method::GET, &format!("/element/{}/attribute/{name}", element.0), None)
            .await
            .as_str()
            .map(String::from)
    }

    pub async fn is_displayed(&self, element: &Element) -> bool {
        self.cmd(Method::GET, &format!("/element/{}/displayed", element.0), None).await.as_bool().unwrap_or(false)
    }

    pub async fn clear(&self, element: &Element) {
        self.cmd(Method::POST, &format!("/element/{}/clear", element.0), Some(json!({}))).await;
    }

    pub async fn type_text(&self, element: &Element, text: &str) {
        self.cmd(Method::POST, &format!("/element/{}/value", element.0), Some(json!({ "text": text }))).await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn execute(&self, script: &str) -> Value {
        self.cmd(Method::POST, "/execute/sync", Some(json!({ "script": script, "args": [] }))).await
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self.cmd(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("screenshot is not base64: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (closing the browser) and chromedriver.
    pub async fn quit(mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                self.endpoint.request(Request::new(Method::DELETE, &path)),
            )
            .await;
            self.session.clear();
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Browser processes outlive a killed chromedriver: end the ones that use this session's
        // own profile directory, one positive pid at a time.
        for pid in processes_using(self._profile.path()) {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Pids (never 0, 1 or our own) of processes whose command line mentions `dir`.
fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid > 1 && *pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle.as_str()))
        })
        .collect()
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `target/test-artifacts/browser/`, next to the test binary's target directory.
pub fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let target = exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("target"));
    target.join("test-artifacts").join("browser")
}
