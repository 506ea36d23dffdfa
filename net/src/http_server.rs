//! The connection layer of the node's listeners: accept, TLS, HTTP/1.1 and HTTP/2, limits and
//! graceful shutdown. It knows nothing about routes; every request goes to one [`Handler`].
//!
//! Per connection:
//!
//! 1. a permit from a semaphore of `max_connections` is taken *before* `accept`, so a full
//!    server stops accepting (the kernel backlog holds the rest) instead of spawning without
//!    bound;
//! 2. TCP_NODELAY, then the TLS handshake (bounded by `tls_handshake_timeout`), when TLS is on;
//! 3. HTTP: ALPN `h2` serves HTTP/2, ALPN `http/1.1` serves HTTP/1.1, and no ALPN (or plain
//!    TCP) detects the protocol from the first bytes. A connection that has not delivered a
//!    complete request head within `header_read_timeout` is closed; HTTP/1.1 applies the same
//!    timeout to every later request head, so it is also the keep-alive idle timeout. HTTP/2
//!    connections are pinged to find dead peers.
//!
//! Shutdown: when the watch value becomes `true` (or its sender is dropped) the listener is
//! closed, every live connection is asked to finish gracefully (in-flight requests complete,
//! idle keep-alive connections close, HTTP/2 sends GOAWAY), and after `shutdown_grace` any
//! that remain are cut.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// The application: one request and the TCP peer address in, one response out.
pub type Handler = Arc<
    dyn Fn(hyper::Request<Incoming>, SocketAddr) -> Pin<Box<dyn Future<Output = hyper::Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// Wraps an async function or closure as a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> Handler
where
    F: Fn(hyper::Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    Arc::new(move |req, peer| Box::pin(f(req, peer)))
}

/// Limits and timeouts of one listener.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Connections served at once (in TLS handshake or HTTP). At the cap, accepting pauses.
    pub max_connections: usize,
    /// Time allowed for a complete request head: from the end of the TLS handshake for the
    /// first request, and from the end of the previous response for each later HTTP/1.1
    /// request (the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Time allowed for the TLS handshake, from accept.
    pub tls_handshake_timeout: Duration,
    /// After shutdown starts, how long live connections get to finish before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Connection counters of one listener, for metrics. Cheap to clone; clones share counters.
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    open: AtomicUsize,
    accepted: AtomicU64,
    tls_handshake_failures: AtomicU64,
    accept_errors: AtomicU64,
}

impl ConnectionStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections open now (in TLS handshake or HTTP).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn accepted_total(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed or timed out.
    pub fn tls_handshake_failures(&self) -> u64 {
        self.inner.tls_handshake_failures.load(Ordering::Relaxed)
    }

    /// Errors returned by `accept` (EMFILE and the like).
    pub fn accept_errors(&self) -> u64 {
        self.inner.accept_errors.load(Ordering::Relaxed)
    }

    fn open_guard(&self) -> OpenGuard {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.inner.clone())
    }
}

/// Counts one open connection until dropped, however its task ends.
struct OpenGuard(Arc<StatsInner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Pause after an `accept` error that is not about one connection (EMFILE, ENFILE, ENOBUFS).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 ping interval and ack timeout, to find dead peers.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `listener` until shutdown, with fresh [`ConnectionStats`]. See
/// [`serve_with_stats`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
    options: ServerOptions,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with_stats(listener, tls, handler, options, ConnectionStats::new(), shutdown).await
}

/// Serves `listener` (HTTPS when `tls` is set, else plain HTTP) until the watch value becomes
/// `true` or its sender is dropped, then drains connections for up to `shutdown_grace` and
/// returns. Accept errors are logged and retried, never returned. `stats` is updated as
/// connections come and go.
pub async fn serve_with_stats(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
    options: ServerOptions,
    stats: ConnectionStats,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    let ctx = Arc::new(ConnContext {
        protocols: Protocols::new(&options),
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        handler,
        options: options.clone(),
        stats: stats.clone(),
    });
    let limit = options.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let semaphore = Arc::new(Semaphore::new(limit));
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    info!(?local, tls = ctx.tls.is_some(), max_connections = limit, "listening");

    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => reap(done),
            acquired = semaphore.clone().acquire_owned(), if permit.is_none() => {
                // The semaphore is never closed.
                permit = acquired.ok();
            }
            accepted = listener.accept(), if permit.is_some() => match accepted {
                Ok((tcp, peer)) => {
                    tracing::trace!(%peer, "connection accepted");
                    if let Err(e) = tcp.set_nodelay(true) {
                        debug!(%peer, "set TCP_NODELAY: {e}");
                    }
                    let open = stats.open_guard();
                    let held = permit.take();
                    let ctx = ctx.clone();
                    let drain = drain_rx.clone();
                    conns.spawn(async move {
                        let _open = open;
                        let _permit = held;
                        connection(tcp, peer, ctx, drain).await;
                    });
                }
                Err(e) if is_per_connection_error(&e) => {
                    debug!(?local, "accept: {e}");
                }
                Err(e) => {
                    stats.inner.accept_errors.fetch_add(1, Ordering::Relaxed);
                    error!(?local, "accept failed, retrying: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                        () = shutdown_requested(&mut shutdown) => break,
                    }
                }
            },
        }
    }

    drop(listener);
    drop(permit);
    let _ = drain_tx.send(true);
    info!(?local, open = conns.len(), "shutting down; draining connections");
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while let Some(done) = conns.join_next().await {
            reap(done);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            ?local,
            remaining = conns.len(),
            grace = ?options.shutdown_grace,
            "connections still open after the shutdown grace; closing them"
        );
        conns.shutdown().await;
    }
    info!(?local, "stopped");
    Ok(())
}

/// Resolves once shutdown is requested: the value is `true`, or the sender is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!("connection task panicked: {e}");
        }
    }
}

/// Errors that concern only the connection being accepted; the listener is fine.
fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted)
}

/// HTTP builders: auto-detecting, and one per ALPN choice.
struct Protocols {
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(options: &ServerOptions) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).keep_alive(true).header_read_timeout(options.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        Self { h1: builder.clone().http1_only(), h2: builder.clone().http2_only(), auto: builder }
    }
}

struct ConnContext {
    protocols: Protocols,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Handler,
    options: ServerOptions,
    stats: ConnectionStats,
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Detect,
    H1,
    H2,
}

async fn connection(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ConnContext>, mut drain: watch::Receiver<bool>) {
    let Some(acceptor) = ctx.tls.clone() else {
        serve_http(tcp, Proto::Detect, peer, &ctx, drain).await;
        return;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(ctx.options.tls_handshake_timeout, acceptor.accept(tcp)) => r,
        () = shutdown_requested(&mut drain) => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            ctx.stats.inner.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            ctx.stats.inner.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let proto = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Proto::H2,
        Some(b"http/1.1") => Proto::H1,
        _ => Proto::Detect,
    };
    serve_http(stream, proto, peer, &ctx, drain).await;
}

async fn serve_http<I>(io: I, proto: Proto, peer: SocketAddr, ctx: &ConnContext, mut drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let got_request = Arc::new(AtomicBool::new(false));
    let service = {
        let handler = ctx.handler.clone();
        let got_request = got_request.clone();
        hyper::service::service_fn(move |req| {
            got_request.store(true, Ordering::Relaxed);
            let response = handler(req, peer);
            async move { Ok::<_, Infallible>(response.await) }
        })
    };
    let builder = match proto {
        Proto::Detect => &ctx.protocols.auto,
        Proto::H1 => &ctx.protocols.h1,
        Proto::H2 => &ctx.protocols.h2,
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);

    // hyper times out HTTP/1.1 request heads itself, but not protocol detection nor an
    // HTTP/2 client that never opens a stream: close any connection whose first request
    // has not arrived in time.
    let first_request_deadline = tokio::time::sleep(ctx.options.header_read_timeout);
    tokio::pin!(first_request_deadline);
    let mut deadline_checked = false;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, ?proto, "connection ended with error: {e}");
                }
                return;
            }
            () = &mut first_request_deadline, if !deadline_checked => {
                deadline_checked = true;
                if !got_request.load(Ordering::Relaxed) {
                    debug!(%peer, ?proto, "no request within header_read_timeout; closing");
                    return;
                }
            }
            () = shutdown_requested(&mut drain), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tls;
    use http_body_util::BodyExt;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{oneshot, Mutex};

    const BOUND: Duration = Duration::from_secs(10);

    /// Fails the test instead of hanging.
    async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
        match tokio::time::timeout(BOUND, f).await {
            Ok(v) => v,
            Err(_) => panic!("timed out: {what}"),
        }
    }

    fn echo_handler() -> Handler {
        handler_fn(|req: hyper::Request<Incoming>, peer: SocketAddr| async move {
            let text = format!("{:?} {} {} {}", req.version(), req.method(), req.uri(), peer);
            hyper::Response::new(Full::new(Bytes::from(text)))
        })
    }

    struct Running {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        stats: ConnectionStats,
    }

    impl Running {
        async fn stop(self) -> Duration {
            let started = Instant::now();
            self.stop.send(true).unwrap();
            bounded("serve returns", self.task).await.unwrap().unwrap();
            started.elapsed()
        }
    }

    async fn start(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler, options: ServerOptions) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let stats = ConnectionStats::new();
        let task = tokio::spawn(serve_with_stats(listener, tls, handler, options, stats.clone(), rx));
        Running { addr, stop, task, stats }
    }

    fn cert() -> tls::SelfSigned {
        tls::self_signed(&["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap()
    }

    fn server_tls(ss: &tls::SelfSigned) -> Arc<rustls::ServerConfig> {
        tls::server_config_from_pem(ss.cert_pem.as_bytes(), ss.key_pem.as_bytes()).unwrap()
    }

    fn client_tls(ss: &tls::SelfSigned, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in tls::parse_certificates(ss.cert_pem.as_bytes(), "test").unwrap() {
            roots.add(c).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn tls_connect(
        addr: SocketAddr,
        ss: &tls::SelfSigned,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = bounded("TLS handshake", client_tls(ss, alpn).connect(name, tcp)).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        stream
    }

    type H1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    async fn h1_client<I>(io: I) -> (H1Sender, tokio::task::JoinHandle<()>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, driver)
    }

    fn get(path: &str) -> hyper::Request<Full<Bytes>> {
        hyper::Request::get(path).header("host", "127.0.0.1").body(Full::new(Bytes::new())).unwrap()
    }

    async fn body_text(resp: hyper::Response<Incoming>) -> String {
        let bytes = bounded("body", resp.into_body().collect()).await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Reads until EOF or error; returns how long that took.
    async fn time_until_closed<S: AsyncRead + Unpin>(stream: &mut S) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        bounded("server closes the connection", async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        started.elapsed()
    }

    #[tokio::test]
    async fn http1_over_tls_reaches_the_handler_with_keep_alive() {
        let ss = cert();
        let server = start(Some(server_tls(&ss)), echo_handler(), ServerOptions::default()).await;
        let stream = tls_connect(server.addr, &ss, b"http/1.1").await;
        let local = stream.get_ref().0.local_addr().unwrap();
        let (mut sender, _driver) = h1_client(stream).await;
        for i in 0..3 {
            let resp = bounded("h1 request", sender.send_request(get(&format!("/a/{i}")))).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), hyper::Version::HTTP_11);
            assert_eq!(body_text(resp).await, format!("HTTP/1.1 GET /a/{i} {local}"));
        }
        assert_eq!(server.stats.accepted_total(), 1);
        assert_eq!(server.stats.open(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn http2_over_tls_reaches_the_handler() {
        let ss = cert();
        let server = start(Some(server_tls(&ss)), echo_handler(), ServerOptions::default()).await;
        let stream = tls_connect(server.addr, &ss, b"h2").await;
        let local = stream.get_ref().0.local_addr().unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // Concurrent streams on one connection.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let req =
                    hyper::Request::get(format!("https://127.0.0.1/b/{i}")).body(Full::new(Bytes::new())).unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.version(), hyper::Version::HTTP_2);
                body_text(resp).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let text = bounded("h2 request", t).await.unwrap();
            assert_eq!(text, format!("HTTP/2.0 GET https://127.0.0.1/b/{i} {local}"));
        }
        assert_eq!(server.stats.accepted_total(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn plain_http_serves_http1_and_h2_prior_knowledge() {
        let server = start(None, echo_handler(), ServerOptions::default()).await;

        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (mut sender, _driver) = h1_client(tcp).await;
        let resp = bounded("plain h1", sender.send_request(get("/metrics"))).await.unwrap();
        assert!(body_text(resp).await.starts_with("HTTP/1.1 GET /metrics "));

        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get("http://127.0.0.1/x").body(Full::new(Bytes::new())).unwrap();
        let resp = bounded("plain h2", sender.send_request(req)).await.unwrap();
        assert!(body_text(resp).await.starts_with("HTTP/2.0 GET "));
        server.stop().await;
    }

    fn short_timeouts() -> ServerOptions {
        ServerOptions {
            header_read_timeout: Duration::from_millis(300),
            tls_handshake_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        }
    }

    #[tokio::test]
    async fn silent_plain_client_is_dropped_after_header_read_timeout() {
        let server = start(None, echo_handler(), short_timeouts()).await;
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let waited = time_until_closed(&mut tcp).await;
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");

        // A partial request head is cut as well.
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let waited = time_until_closed(&mut tcp).await;
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn silent_tls_clients_are_dropped() {
        let ss = cert();
        let server = start(Some(server_tls(&ss)), echo_handler(), short_timeouts()).await;

        // No ClientHello at all: the handshake timeout.
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let waited = time_until_closed(&mut tcp).await;
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");

        // Handshake done, then nothing, for each ALPN.
        for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
            let mut stream = tls_connect(server.addr, &ss, alpn).await;
            let waited = time_until_closed(&mut stream).await;
            assert!(waited < Duration::from_secs(3), "{alpn:?}: {waited:?}");
        }

        // Idle keep-alive connection after one request.
        let stream = tls_connect(server.addr, &ss, b"http/1.1").await;
        let (mut sender, driver) = h1_client(stream).await;
        let resp = bounded("request", sender.send_request(get("/"))).await.unwrap();
        body_text(resp).await;
        let started = Instant::now();
        bounded("idle connection closed", driver).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));

        bounded("all closed", async {
            while server.stats.open() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(server.stats.tls_handshake_failures() >= 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn max_connections_pauses_accepting() {
        let server =
            start(None, echo_handler(), ServerOptions { max_connections: 2, ..ServerOptions::default() }).await;
        let mut first = h1_client(TcpStream::connect(server.addr).await.unwrap()).await;
        let mut second = h1_client(TcpStream::connect(server.addr).await.unwrap()).await;
        for (sender, _) in [&mut first, &mut second] {
            let resp = bounded("request", sender.send_request(get("/"))).await.unwrap();
            body_text(resp).await;
        }
        assert_eq!(server.stats.open(), 2);

        // The third connects (kernel backlog) but is not served while two are open.
        let (mut third, _driver) = h1_client(TcpStream::connect(server.addr).await.unwrap()).await;
        let mut pending = Box::pin(third.send_request(get("/third")));
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut pending).await.is_err(),
            "third connection served beyond max_connections"
        );
        assert_eq!(server.stats.open(), 2);
        assert_eq!(server.stats.accepted_total(), 2);

        // Closing one frees a slot.
        let (sender, driver) = first;
        drop(sender);
        bounded("first closes", driver).await.unwrap();
        let resp = bounded("third served", pending).await.unwrap();
        assert!(body_text(resp).await.starts_with("HTTP/1.1 GET /third"));
        assert_eq!(server.stats.accepted_total(), 3);
        drop(second);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_completes_in_flight_requests_and_returns_promptly() {
        let ss = cert();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let started_tx = Arc::new(Mutex::new(Some(started_tx)));
        let handler = handler_fn(move |req: hyper::Request<Incoming>, _peer| {
            let started_tx = started_tx.clone();
            async move {
                if req.uri().path() == "/slow" {
                    if let Some(tx) = started_tx.lock().await.take() {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                hyper::Response::new(Full::new(Bytes::from_static(b"done")))
            }
        });
        let server = start(Some(server_tls(&ss)), handler, ServerOptions::default()).await;
        let addr = server.addr;

        // An idle keep-alive HTTP/1.1 connection and an idle HTTP/2 connection must not hold
        // shutdown up.
        let (mut idle, idle_driver) = h1_client(tls_connect(addr, &ss, b"http/1.1").await).await;
        let resp = bounded("idle warm-up", idle.send_request(get("/"))).await.unwrap();
        body_text(resp).await;
        let (_h2, h2_conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tls_connect(addr, &ss, b"h2").await),
        )
        .await
        .unwrap();
        let h2_driver = tokio::spawn(async move {
            let _ = h2_conn.await;
        });

        let (mut busy, _busy_driver) = h1_client(tls_connect(addr, &ss, b"http/1.1").await).await;
        let in_flight = tokio::spawn(async move {
            let resp = busy.send_request(get("/slow")).await.unwrap();
            (resp.status(), body_text(resp).await)
        });
        bounded("slow handler starts", started_rx).await.unwrap();

        let took = server.stop().await;
        assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
        let (status, body) = bounded("in-flight response", in_flight).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "done");
        bounded("idle h1 closed", idle_driver).await.unwrap();
        bounded("idle h2 closed", h2_driver).await.unwrap();

        // The listener is closed.
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "listener still accepting after shutdown");
    }

    #[tokio::test]
    async fn shutdown_cuts_stuck_requests_after_the_grace() {
        let handler = handler_fn(|_req: hyper::Request<Incoming>, _peer| async {
            std::future::pending::<()>().await;
            hyper::Response::new(Full::new(Bytes::new()))
        });
        let server = start(
            None,
            handler,
            ServerOptions { shutdown_grace: Duration::from_millis(300), ..ServerOptions::default() },
        )
        .await;
        let (mut sender, driver) = h1_client(TcpStream::connect(server.addr).await.unwrap()).await;
        let stuck = tokio::spawn(async move { sender.send_request(get("/stuck")).await });
        bounded("request accepted", async {
            while server.stats.open() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = server.stats.clone();
        let took = server.stop().await;
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(bounded("stuck request fails", stuck).await.unwrap().is_err());
        bounded("connection closed", driver).await.unwrap();
        assert_eq!(stats.open(), 0);
    }

    #[tokio::test]
    async fn dropping_the_shutdown_sender_stops_the_server() {
        let server = start(None, echo_handler(), ServerOptions::default()).await;
        drop(server.stop);
        bounded("serve returns", server.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_already_requested_returns_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_tx, rx) = watch::channel(true);
        bounded("serve returns", serve(listener, None, echo_handler(), ServerOptions::default(), rx)).await.unwrap();
    }
}
