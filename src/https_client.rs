//! A small HTTP/1.1 client for Edgecard's own endpoints, over TLS or plain TCP: the CLI, the
//! integration tests and the load generator use it.
//!
//! An [`Endpoint`] is one base URL (`https://host:port` or `http://host:port`) and, for
//! https, the one CA or server certificate to trust; no system roots. A [`Connection`] is one
//! keep-alive HTTP/1.1 connection to it. Every request is bounded by [`Endpoint::timeout`].
//!
//! Reconnects on a [`Connection`] are transparent, at most one per request, and only when
//! that cannot repeat a request the server may have acted on: the connection was found closed
//! before the request was written (any method), or it was lost after a `GET` or `HEAD` was
//! written.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// Default bound on one request, including any connect it needs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on a response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Errors of the client. Each names the URL and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{url}: https needs the PEM of a CA or server certificate to trust")]
    MissingCa { url: String },
    #[error("{url}: unusable CA PEM: {reason}")]
    InvalidCa { url: String, reason: String },
    #[error("{url}: TCP connect failed: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: TLS handshake failed: {source}")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: HTTP handshake failed: {source}")]
    Handshake {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: invalid request {method} {path}: {reason}")]
    InvalidRequest { url: String, method: String, path: String, reason: String },
    #[error("{url}: {method} {path} failed: {source}")]
    Request {
        url: String,
        method: String,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: {method} {path}: reading the response body failed: {reason}")]
    Body { url: String, method: String, path: String, reason: String },
    #[error("{url}: {method} {path}: response body larger than {limit} bytes")]
    TooLarge { url: String, method: String, path: String, limit: usize },
    #[error("{url}: {what} timed out after {after:?}")]
    Timeout { url: String, what: String, after: Duration },
    #[error("response with status {status} is not the expected JSON: {source}")]
    Decode {
        status: u16,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// True for [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// One request: method, origin-form path (with any query), headers and body.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: Method, path: &str) -> Self {
        Self { method, path: path.to_owned(), headers: Vec::new(), body: None }
    }

    pub fn get(path: &str) -> Self {
        Self::new(Method::GET, path)
    }

    /// A POST with an empty body.
    pub fn post(path: &str) -> Self {
        Self::new(Method::POST, path)
    }

    /// A POST of `value` as `application/json`.
    pub fn post_json(path: &str, value: &serde_json::Value) -> Self {
        Self::post(path).header("content-type", "application/json").body(value.to_string())
    }

    /// Adds a header (repeats are kept).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }
}

/// A complete response, body read.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// Decodes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::Decode { status: self.status, source })
    }

    /// The body as text; invalid UTF-8 is replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of a header, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone)]
struct TlsTarget {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

/// A base URL and how to reach it.
#[derive(Clone)]
pub struct Endpoint {
    url: Arc<str>,
    host: Arc<str>,
    port: u16,
    host_header: HeaderValue,
    tls: Option<TlsTarget>,
    /// Bound on each request, including any connect it needs.
    pub timeout: Duration,
    /// Cap on a response body.
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Parses `https://host:port` or `http://host:port` (no path; a lone `/` is accepted; the
    /// port defaults to 443 or 80). For https, `ca_pem` holds the certificates to trust (a CA
    /// or the server's own self-signed certificate) and is required; for http it is ignored.
    /// The TLS server name is the host, which may be an IP address.
    pub fn parse(url: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, ClientError> {
        Endpoint::parse_with(url, TrustSource::Pem(ca_pem))
    }

    /// Parses an `https://host:port` URL whose server is verified by `config` (its own
    /// certificate verifier) under the TLS name `server_name` rather than the URL's host.
    pub fn parse_with_tls(
        url: &str,
        mut config: rustls::ClientConfig,
        server_name: &str,
    ) -> Result<Endpoint, ClientError> {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: format!("{server_name:?} is not a valid TLS server name: {e}"),
        })?;
        let target = TlsTarget { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name: name };
        let endpoint = Endpoint::parse_with(url, TrustSource::Given(target))?;
        if !endpoint.is_https() {
            return Err(ClientError::InvalidUrl { url: url.to_owned(), reason: "expected https".into() });
        }
        Ok(endpoint)
    }

    fn parse_with(url: &str, trust: TrustSource<'_>) -> Result<Endpoint, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(invalid("the scheme must be https or http")),
            None => return Err(invalid("expected https://host:port or http://host:port")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("missing host"))?.clone();
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not supported"));
        }
        if let Some(pq) = uri.path_and_query() {
            if pq.query().is_some() || !matches!(pq.path(), "" | "/") {
                return Err(invalid("expected no path: the URL is a base, paths go in requests"));
            }
        }
        let port = match authority.as_str().strip_prefix(authority.host()) {
            Some("") => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(rest) => match rest.strip_prefix(':').map(str::parse::<u16>) {
                Some(Ok(port)) if port != 0 => port,
                _ => return Err(invalid("the port must be a number from 1 to 65535")),
            },
            None => return Err(invalid("cannot split host and port")),
        };
        let host = authority.host();
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| invalid("host is not a valid Host header"))?;
        let scheme = if https { "https" } else { "http" };
        let base = format!("{scheme}://{authority}");

        let tls = match (https, trust) {
            (false, _) => None,
            (true, TrustSource::Given(target)) => Some(target),
            (true, TrustSource::Pem(ca_pem)) => {
                let pem = ca_pem.ok_or_else(|| ClientError::MissingCa { url: base.clone() })?;
                Some(tls_target(&base, host, pem)?)
            }
        };
        Ok(Endpoint {
            url: base.into(),
            host: host.into(),
            port,
            host_header,
            tls,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    /// The base URL, normalized (`scheme://authority`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Opens a keep-alive connection: TCP (no delay), TLS with ALPN `http/1.1` when https,
    /// and the HTTP/1.1 handshake. Bounded by [`Endpoint::timeout`].
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let live = self.open(deadline).await?;
        Ok(Connection { endpoint: self.clone(), live: Some(live), reconnects: 0 })
    }

    /// Connects, sends one request, and closes: for one-off CLI calls. Connect and request
    /// together are bounded by [`Endpoint::timeout`].
    pub async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let live = self.open(deadline).await?;
        let mut connection = Connection { endpoint: self.clone(), live: Some(live), reconnects: 0 };
        connection.send_until(req, deadline).await
    }

    fn timeout_error(&self, what: String) -> ClientError {
        ClientError::Timeout { url: self.url.to_string(), what, after: self.timeout }
    }

    async fn open(&self, deadline: Instant) -> Result<Live, ClientError> {
        match tokio::time::timeout_at(deadline, self.open_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(self.timeout_error("connect".to_owned())),
        }
    }

    async fn open_unbounded(&self) -> Result<Live, ClientError> {
        let tcp = TcpStream::connect((&*self.host, self.port))
            .await
            .map_err(|source| ClientError::Connect { url: self.url.to_string(), source })?;
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(url = %self.url, "set TCP_NODELAY: {e}");
        }
        match &self.tls {
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|source| ClientError::Tls { url: self.url.to_string(), source })?;
                self.handshake(stream).await
            }
            None => self.handshake(tcp).await,
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Live, ClientError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| ClientError::Handshake { url: self.url.to_string(), source })?;
        let url = self.url.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%url, "connection closed with error: {e}");
            }
        });
        Ok(Live { sender, driver })
    }

    /// Validates `req` once, so it can be turned into HTTP requests cheaply.
    fn prepare(&self, req: Request) -> Result<Prepared, ClientError> {
        let invalid = |reason: String| ClientError::InvalidRequest {
            url: self.url.to_string(),
            method: req.method.to_string(),
            path: req.path.clone(),
            reason,
        };
        if !req.path.starts_with('/') {
            return Err(invalid("the path must start with '/'".to_owned()));
        }
        let uri = http::Uri::try_from(req.path.as_str()).map_err(|e| invalid(e.to_string()))?;
        let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
        for (name, value) in &req.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("invalid header name {name:?}")))?;
            let value =
                HeaderValue::from_str(value).map_err(|_| invalid(format!("invalid value for header {name}")))?;
            headers.append(name, value);
        }
        if !headers.contains_key(HOST) {
            headers.insert(HOST, self.host_header.clone());
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, HeaderValue::from_static("edgecard"));
        }
        if req.body.is_some() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        }
        let body = req.body.map(Bytes::from).unwrap_or_default();
        Ok(Prepared {
            may_resend: req.method == Method::GET || req.method == Method::HEAD,
            method: req.method,
            path: req.path,
            uri,
            headers,
            body,
        })
    }

    async fn read_response(
        &self,
        prepared: &Prepared,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Response, ClientError> {
        let (parts, body) = response.into_parts();
        let collected = Limited::new(body, self.max_response_bytes).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ClientError::TooLarge {
                    url: self.url.to_string(),
                    method: prepared.method.to_string(),
                    path: prepared.path.clone(),
                    limit: self.max_response_bytes,
                }
            } else {
                ClientError::Body {
                    url: self.url.to_string(),
                    method: prepared.method.to_string(),
                    path: prepared.path.clone(),
                    reason: e.to_string(),
                }
            }
        })?;
        Ok(Response { status: parts.status.as_u16(), headers: parts.headers, body: collected.to_bytes() })
    }
}

/// How an https endpoint's server is verified.
enum TrustSource<'a> {
    /// Certificates to trust, PEM (none: an error for https).
    Pem(Option<&'a [u8]>),
    /// A ready connector and server name.
    Given(TlsTarget),
}

fn tls_target(url: &str, host: &str, pem: &[u8]) -> Result<TlsTarget, ClientError> {
    let invalid_ca = |reason: String| ClientError::InvalidCa { url: url.to_owned(), reason };
    let certs = edgecard_node::tls::parse_certificates(pem, "CA PEM").map_err(|e| invalid_ca(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| invalid_ca(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(edgecard_node::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid_ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: format!("host is not a valid TLS server name: {e}"),
    })?;
    Ok(TlsTarget { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name })
}

/// A request checked and converted once; cheap to turn into an HTTP request again.
struct Prepared {
    method: Method,
    path: String,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
    may_resend: bool,
}

impl Prepared {
    fn to_http(&self) -> http::Request<Full<Bytes>> {
        let mut request = http::Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

struct Live {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Live {
    /// Drops a connection whose state is unknown (after a timeout or an error).
    fn kill(self) {
        self.driver.abort();
    }
}

/// Whether an error means the connection went away, rather than a bad response.
fn connection_lost(error: &hyper::Error) -> bool {
    if error.is_canceled() || error.is_closed() || error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// One keep-alive HTTP/1.1 connection to an [`Endpoint`], reconnecting when needed (see the
/// module docs for when that is safe).
pub struct Connection {
    endpoint: Endpoint,
    live: Option<Live>,
    reconnects: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.endpoint.url)
            .field("open", &self.live.is_some())
            .field("reconnects", &self.reconnects)
            .finish()
    }
}

impl Connection {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// How many times this connection was re-established after [`Endpoint::connect`].
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Sends one request and reads the whole response, within [`Endpoint::timeout`].
    pub async fn send(&mut self, req: Request) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.endpoint.timeout;
        self.send_until(req, deadline).await
    }

    async fn send_until(&mut self, req: Request, deadline: Instant) -> Result<Response, ClientError> {
        let prepared = self.endpoint.prepare(req)?;
        match tokio::time::timeout_at(deadline, self.exchange(&prepared, deadline)).await {
            Ok(result) => result,
            Err(_) => {
                // Unknown state: the response may still arrive. Never reuse this one.
                self.discard();
                Err(self.endpoint.timeout_error(prepared.describe()))
            }
        }
    }

    fn discard(&mut self) {
        if let Some(live) = self.live.take() {
            live.kill();
        }
    }

    async fn reconnect(&mut self, deadline: Instant) -> Result<(), ClientError> {
        self.discard();
        let live = self.endpoint.open(deadline).await?;
        self.live = Some(live);
        self.reconnects += 1;
        Ok(())
    }

    async fn exchange(&mut self, prepared: &Prepared, deadline: Instant) -> Result<Response, ClientError> {
        let mut reconnected = false;
        loop {
            let Some(live) = self.live.as_mut() else {
                self.reconnect(deadline).await?;
                reconnected = true;
                continue;
            };
            // A connection the server closed while idle is found here, before anything is sent.
            if let Err(source) = live.sender.ready().await {
                self.discard();
                if reconnected {
                    return Err(self.request_error(prepared, source));
                }
                continue;
            }
            match live.sender.try_send_request(prepared.to_http()).await {
                Ok(response) => {
                    let result = self.endpoint.read_response(prepared, response).await;
                    if result.is_err() {
                        self.discard();
                    }
                    return result;
                }
                Err(mut e) => {
                    let unsent = e.take_message().is_some();
                    let source = e.into_error();
                    self.discard();
                    let resend = unsent || (prepared.may_resend && connection_lost(&source));
                    if reconnected || !resend {
                        return Err(self.request_error(prepared, source));
                    }
                    debug!(
                        url = %self.endpoint.url,
                        request = %prepared.describe(),
                        unsent,
                        "connection lost; resending on a new connection: {source}"
                    );
                }
            }
        }
    }

    fn request_error(&self, prepared: &Prepared, source: hyper::Error) -> ClientError {
        ClientError::Request {
            url: self.endpoint.url.to_string(),
            method: prepared.method.to_string(),
            path: prepared.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgecard_node::http_server::{self, handler_fn, ConnectionStats, ServerOptions};
    use edgecard_node::tls;
    use serde_json::{json, Value};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    const BOUND: Duration = Duration::from_secs(10);

    async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
        match tokio::time::timeout(BOUND, f).await {
            Ok(v) => v,
            Err(_) => panic!("timed out: {what}"),
        }
    }

    struct TestServer {
        url: String,
        ca: String,
        stats: ConnectionStats,
        _stop: watch::Sender<bool>,
    }

    /// Echoes method, path, peer, selected headers and the JSON body back as JSON.
    /// `/hang` never answers.
    async fn start(tls_on: bool, options: ServerOptions) -> TestServer {
        let ss = tls::self_signed(&["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let config =
            tls_on.then(|| tls::server_config_from_pem(ss.cert_pem.as_bytes(), ss.key_pem.as_bytes()).unwrap());
        let handler = handler_fn(|req: hyper::Request<hyper::body::Incoming>, peer: SocketAddr| async move {
            if req.uri().path() == "/hang" {
                std::future::pending::<()>().await;
            }
            let method = req.method().to_string();
            let path = req.uri().to_string();
            let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let (host, ctype, x) = (header("host"), header("content-type"), header("x-test"));
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let out = json!({
                "method": method, "path": path, "peer": peer.to_string(),
                "host": host, "content_type": ctype, "x_test": x, "body": parsed,
            });
            hyper::Response::builder()
                .status(if method == "POST" { 201 } else { 200 })
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from(out.to_string())))
                .unwrap()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let stats = ConnectionStats::new();
        tokio::spawn(http_server::serve_with_stats(listener, config, handler, options, stats.clone(), rx));
        let scheme = if tls_on { "https" } else { "http" };
        TestServer { url: format!("{scheme}://127.0.0.1:{}", addr.port()), ca: ss.cert_pem, stats, _stop: stop }
    }

    impl TestServer {
        fn endpoint(&self) -> Endpoint {
            Endpoint::parse(&self.url, Some(self.ca.as_bytes())).unwrap()
        }
    }

    #[tokio::test]
    async fn get_and_post_json_round_trip_over_tls() {
        let server = start(true, ServerOptions::default()).await;
        let endpoint = server.endpoint();
        assert!(endpoint.is_https());
        let mut conn = bounded("connect", endpoint.connect()).await.unwrap();

        let resp =
            bounded("get", conn.send(Request::get("/api/v1/products?x=1").header("X-Test", "yes"))).await.unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.is_success());
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let v: Value = resp.json().unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/api/v1/products?x=1");
        assert_eq!(v["x_test"], "yes");
        assert_eq!(v["host"], server.url.trim_start_matches("https://"));

        let payload = json!({"sku": "game-1", "quantity": 2, "note": "日本"});
        let resp = bounded("post", conn.send(Request::post_json("/api/v1/orders", &payload))).await.unwrap();
        assert_eq!(resp.status, 201);
        let v: Value = resp.json().unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["content_type"], "application/json");
        assert_eq!(v["body"], payload);
        assert!(resp.text().contains("game-1"));
        assert!(resp.json::<Vec<u8>>().is_err());

        // The one-shot form.
        let resp = bounded("request", endpoint.request(Request::get("/healthz"))).await.unwrap();
        assert_eq!(resp.json::<Value>().unwrap()["path"], "/healthz");
        assert_eq!(conn.reconnects(), 0);
    }

    #[tokio::test]
    async fn one_connection_serves_a_hundred_requests() {
        let server = start(true, ServerOptions::default()).await;
        let mut conn = bounded("connect", server.endpoint().connect()).await.unwrap();
        let mut peers = std::collections::HashSet::new();
        for i in 0..100 {
            let req = if i % 2 == 0 {
                Request::get(&format!("/n/{i}"))
            } else {
                Request::post_json(&format!("/n/{i}"), &json!({ "i": i }))
            };
            let resp = bounded("request", conn.send(req)).await.unwrap();
            let v: Value = resp.json().unwrap();
            assert_eq!(v["path"], format!("/n/{i}"));
            peers.insert(v["peer"].as_str().unwrap().to_owned());
        }
        assert_eq!(peers.len(), 1, "requests came from several connections");
        assert_eq!(conn.reconnects(), 0);
        assert_eq!(server.stats.accepted_total(), 1);
    }

    #[tokio::test]
    async fn reconnects_after_the_server_closes_an_idle_connection() {
        let server =
            start(true, ServerOptions { header_read_timeout: Duration::from_millis(200), ..ServerOptions::default() })
                .await;
        let mut conn = bounded("connect", server.endpoint().connect()).await.unwrap();
        bounded("first", conn.send(Request::get("/a"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let resp = bounded("after idle close", conn.send(Request::get("/b"))).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(conn.reconnects(), 1);
        // Nothing was written on the closed connection, so a POST reconnects too.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let resp = bounded("post after idle close", conn.send(Request::post_json("/c", &json!({})))).await.unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(conn.reconnects(), 2);
    }

    /// A plain-HTTP server whose first connection reads one request head and hangs up
    /// without answering; later connections answer `ok`. Returns the URL and how many
    /// request heads arrived.
    async fn hang_up_once_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(AtomicUsize::new(0));
        let counter = heads.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                n += 1;
                let first = n == 1;
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let read = tcp.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            counter.fetch_add(1, Ordering::SeqCst);
                            if first {
                                return; // hang up, no answer
                            }
                            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), heads)
    }

    #[tokio::test]
    async fn a_get_lost_in_flight_is_resent_once() {
        let (url, heads) = hang_up_once_server().await;
        let endpoint = Endpoint::parse(&url, None).unwrap();
        let mut conn = bounded("connect", endpoint.connect()).await.unwrap();
        let resp = bounded("get", conn.send(Request::get("/x"))).await.unwrap();
        assert_eq!(resp.text(), "ok");
        assert_eq!(conn.reconnects(), 1);
        assert_eq!(heads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_post_lost_in_flight_is_not_resent() {
        let (url, heads) = hang_up_once_server().await;
        let endpoint = Endpoint::parse(&url, None).unwrap();
        let mut conn = bounded("connect", endpoint.connect()).await.unwrap();
        let err = bounded("post", conn.send(Request::post("/pay"))).await.unwrap_err();
        assert!(matches!(err, ClientError::Request { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&url) && message.contains("POST /pay"), "{message}");
        assert_eq!(heads.load(Ordering::SeqCst), 1);
        // The connection recovers for the next request.
        let resp = bounded("next", conn.send(Request::get("/y"))).await.unwrap();
        assert_eq!(resp.text(), "ok");
    }

    #[tokio::test]
    async fn requests_time_out_and_the_connection_recovers() {
        let server = start(false, ServerOptions::default()).await;
        let endpoint = server.endpoint().with_timeout(Duration::from_millis(300));
        assert!(!endpoint.is_https());
        let mut conn = bounded("connect", endpoint.connect()).await.unwrap();
        let started = std::time::Instant::now();
        let err = bounded("hang", conn.send(Request::get("/hang"))).await.unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(err.to_string().contains("GET /hang"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let resp = bounded("after timeout", conn.send(Request::get("/ok"))).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(conn.reconnects(), 1);
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_refused() {
        let server = start(true, ServerOptions::default()).await;
        let other = tls::self_signed(&["127.0.0.1".to_owned()]).unwrap();
        let endpoint = Endpoint::parse(&server.url, Some(other.cert_pem.as_bytes())).unwrap();
        let err = bounded("connect", endpoint.request(Request::get("/"))).await.unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err}");
        assert!(err.to_string().contains(&server.url), "{err}");
    }

    #[tokio::test]
    async fn connect_errors_name_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = bounded("connect", Endpoint::parse(&url, None).unwrap().connect()).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&url), "{err}");
    }

    #[test]
    fn parse_accepts_base_urls_only() {
        let ss = tls::self_signed(&["localhost".to_owned()]).unwrap();
        let pem = Some(ss.cert_pem.as_bytes());

        let e = Endpoint::parse("https://localhost:8443", pem).unwrap();
        assert_eq!(e.url(), "https://localhost:8443");
        assert_eq!((&*e.host, e.port), ("localhost", 8443));
        assert_eq!(e.timeout, DEFAULT_TIMEOUT);

        let e = Endpoint::parse("https://127.0.0.1:9/", pem).unwrap();
        assert_eq!((&*e.host, e.port), ("127.0.0.1", 9));
        let e = Endpoint::parse("https://[::1]:8443", pem).unwrap();
        assert_eq!((&*e.host, e.port), ("::1", 8443));
        assert_eq!(e.host_header, "[::1]:8443");
        let e = Endpoint::parse("http://example.test", None).unwrap();
        assert_eq!(e.port, 80);
        let e = Endpoint::parse("https://example.test", pem).unwrap();
        assert_eq!(e.port, 443);

        assert!(matches!(Endpoint::parse("https://localhost:8443", None), Err(ClientError::MissingCa { .. })));
        assert!(matches!(Endpoint::parse("https://localhost:8443", Some(b"junk")), Err(ClientError::InvalidCa { .. })));
        for bad in [
            "localhost:8443",
            "ftp://localhost:21",
            "https://localhost:8443/api",
            "https://localhost:8443?x=1",
            "https://user@localhost:8443",
            "https://",
            "",
            "https://local host",
            "https://localhost:99999",
            "https://localhost:0",
            "https://localhost:",
        ] {
            let err = Endpoint::parse(bad, pem).unwrap_err();
            assert!(matches!(err, ClientError::InvalidUrl { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn invalid_requests_are_rejected_before_sending() {
        let e = Endpoint::parse("http://127.0.0.1:1", None).unwrap();
        for req in [
            Request::get("no-slash"),
            Request::get("/ok").header("bad name", "v"),
            Request::get("/ok").header("x", "line\nbreak"),
        ] {
            assert!(matches!(e.prepare(req), Err(ClientError::InvalidRequest { .. })));
        }
        let p = e.prepare(Request::post("/p").header("Host", "cdn.example").body("x")).unwrap();
        assert_eq!(p.headers.get_all(HOST).iter().count(), 1);
        assert_eq!(p.headers[HOST], "cdn.example");
        assert_eq!(p.headers[CONTENT_TYPE], "application/octet-stream");
        assert!(!p.may_resend);
        assert!(e.prepare(Request::get("/g")).unwrap().may_resend);
    }
}
