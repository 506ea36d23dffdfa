//! The node's outbound HTTPS client, for payment providers' APIs.
//!
//! One connection per request (payment API calls are few next to purchases), HTTP/1.1 over
//! rustls with the binary's one crypto provider. Trusts the webpki root set, plus optionally one
//! extra CA (a test gateway's, or a corporate proxy's). Every request is bounded by its timeout,
//! bodies by [`MAX_RESPONSE_BYTES`]. Error messages never contain the URL's query (EPay puts its
//! merchant key there).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Largest provider response read.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OutboundError {
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("HTTP exchange failed: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct OutboundResponse {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct OutboundClient {
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for OutboundClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboundClient")
    }
}

impl OutboundClient {
    /// A client trusting the webpki roots and, when given, the certificates in `extra_ca_pem`.
    pub fn new(extra_ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(pem) = extra_ca_pem {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("invalid CA PEM: {e}"))?;
                roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
                added += 1;
            }
            if added == 0 {
                return Err("no CERTIFICATE block in the CA PEM".into());
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS config: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(OutboundClient { tls: Arc::new(config) })
    }

    /// Sends one request and reads the whole response, within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<OutboundResponse, OutboundError> {
        match tokio::time::timeout(timeout, self.exchange(method, url, headers, body)).await {
            Ok(result) => result,
            Err(_) => Err(OutboundError::Timeout),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<OutboundResponse, OutboundError> {
        let uri: Uri = url.parse().map_err(|_| OutboundError::InvalidUrl("unparseable".into()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(OutboundError::InvalidUrl("scheme must be http or https".into())),
        };
        let host = uri.host().ok_or_else(|| OutboundError::InvalidUrl("no host".into()))?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let authority = uri.authority().map_or(host.clone(), |a| a.as_str().to_string());
        let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();

        let tcp = TcpStream::connect((bare_host.as_str(), port))
            .await
            .map_err(|e| OutboundError::Connect(format!("{authority}: {e}")))?;
        let _ = tcp.set_nodelay(true);

        let mut builder = Request::builder().method(method).uri(path).header(http::header::HOST, authority.as_str());
        for (name, value) in headers {
            let name = HeaderName::from_static(name);
            let value = HeaderValue::from_str(value).map_err(|_| OutboundError::Protocol("bad header value".into()))?;
            builder = builder.header(name, value);
        }
        let request = builder
            .header(http::header::USER_AGENT, "edgecard-node")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OutboundError::Protocol(e.to_string()))?;

        if https {
            let name = ServerName::try_from(bare_host.clone())
                .map_err(|_| OutboundError::InvalidUrl("host is not a valid server name".into()))?;
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| OutboundError::Connect(format!("{authority}: TLS: {e}")))?;
            round_trip(TokioIo::new(stream), request).await
        } else {
            round_trip(TokioIo::new(tcp), request).await
        }
    }
}

async fn round_trip<T>(io: T, request: Request<Full<Bytes>>) -> Result<OutboundResponse, OutboundError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| OutboundError::Protocol(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| OutboundError::Protocol(e.to_string()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| OutboundError::Protocol(format!("reading the body: {e}")))?
            .to_bytes();
        Ok(OutboundResponse { status, body })
    }
    .await;
    driver.abort();
    result
}
