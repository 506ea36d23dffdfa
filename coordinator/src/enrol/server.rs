//! The enrolment endpoint: HTTPS on the coordinator's sync port over TCP (`enrol_listen`),
//! the one endpoint a node may call without a certificate.
//!
//! `POST /v1/enrol` with `Authorization: Bearer <token secret>` and `{"csr_pem": "…"}`. How it
//! is protected:
//!
//! - The node authenticates the server: it accepts only a chain that contains the CA whose
//!   SHA-256 its join token pins, and a server-auth certificate for the token's server name
//!   signed by that CA (no webpki roots). The listener presents the sync server certificate
//!   followed by the CA certificate, so the node can find the pinned CA in the handshake.
//! - The token secret (256 bits) authenticates the request; the coordinator keeps its digest.
//! - At most [`PER_IP_BURST`] requests per client address (IPv6 by /64) and then one per
//!   [`PER_IP_PERIOD`], answered 429 with `Retry-After`; bodies over [`MAX_BODY_BYTES`] are 413.
//! - The certificate is made from the request's public key only (names in the request are
//!   ignored) for the token's node, and the token is marked used durably before the answer.
//!
//! Every refusal changes nothing and says why; no secret reaches a log line or a message.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{json, Value};

use super::token::{fingerprint, TokenSecret};
use super::tokens::RedeemError;
use crate::pki::{certificate_der, CertificateAuthority, PkiError, MAX_CSR_PEM_BYTES};
use crate::service::{now_millis, Coordinator};

/// The enrolment request's path.
pub const ENROL_PATH: &str = "/v1/enrol";
/// Largest request body read.
pub const MAX_BODY_BYTES: usize = MAX_CSR_PEM_BYTES + 1024;
/// Requests a client address may make at once.
pub const PER_IP_BURST: u32 = 10;
/// One more request per this, per client address, after the burst.
pub const PER_IP_PERIOD: Duration = Duration::from_secs(6);
/// Client addresses remembered before stale ones are dropped.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// A request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolBody {
    pub csr_pem: String,
}

/// A decoded enrolment request.
#[derive(Debug)]
pub struct EnrolRequest {
    pub secret: TokenSecret,
    pub csr_pem: String,
}

/// A refusal: status, stable code, message for the node's operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

fn refusal(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { status, code, message: message.into() }
}

/// Decodes a request from its `Authorization` header and body (pure; the fuzz target's entry).
pub fn decode_request(authorization: Option<&[u8]>, body: &[u8]) -> Result<EnrolRequest, Refusal> {
    let unauthorized =
        || refusal(StatusCode::UNAUTHORIZED, "token_required", "Authorization: Bearer <join token secret> required");
    let value = std::str::from_utf8(authorization.ok_or_else(unauthorized)?).map_err(|_| unauthorized())?;
    let (scheme, secret) = value.split_once(' ').ok_or_else(unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized());
    }
    let secret = TokenSecret::from_wire(secret.trim()).map_err(|e| {
        refusal(StatusCode::UNAUTHORIZED, "token_malformed", format!("the token secret is malformed: {e}"))
    })?;
    // serde's own message can quote the body; the reason is logged, so only the position is given.
    let body: EnrolBody = serde_json::from_slice(body).map_err(|e| {
        let message = format!(
            "the body must be {{\"csr_pem\": \"<PEM>\"}} and nothing else (error at line {} column {})",
            e.line(),
            e.column()
        );
        refusal(StatusCode::BAD_REQUEST, "invalid_request", message)
    })?;
    Ok(EnrolRequest { secret, csr_pem: body.csr_pem })
}

/// What a node needs besides its certificate: the same facts a bundle carries, none secret.
#[derive(Debug, Clone)]
pub struct NodeLinkFacts {
    /// The grant-verifying key nodes pin (`trust.coordinator_key`).
    pub coordinator_key: String,
    pub sync_addr: SocketAddr,
    pub server_name: String,
}

/// Enrolment requests by result: `enrolled`, or the refusal's code (a fixed set).
#[derive(Debug, Default)]
pub struct EnrolMetrics {
    pub requests: Family<[(&'static str, &'static str); 1], Counter>,
}

impl EnrolMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "edgecard_enrol_requests",
            "Node enrolment requests by result (enrolled, or the refusal's code)",
            self.requests.clone(),
        );
    }
}

pub struct EnrolApi {
    coordinator: Arc<Coordinator>,
    ca: Arc<CertificateAuthority>,
    facts: NodeLinkFacts,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    metrics: Arc<EnrolMetrics>,
}

impl EnrolApi {
    pub fn new(coordinator: Arc<Coordinator>, ca: Arc<CertificateAuthority>, facts: NodeLinkFacts) -> Self {
        let quota = Quota::with_period(PER_IP_PERIOD)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(PER_IP_BURST).unwrap_or(NonZeroU32::MIN));
        EnrolApi { coordinator, ca, facts, per_ip: RateLimiter::keyed(quota), metrics: Arc::default() }
    }

    pub fn metrics(&self) -> &Arc<EnrolMetrics> {
        &self.metrics
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let outcome = self.serve(request, peer).await;
        let result = outcome.as_ref().map_or_else(|refused| refused.code, |_| "enrolled");
        self.metrics.requests.get_or_create(&[("result", result)]).inc();
        match outcome {
            Ok(body) => respond(StatusCode::OK, &body),
            Err(refused) => {
                let mut response =
                    respond(refused.status, &json!({ "error": { "code": refused.code, "message": refused.message } }));
                if refused.status == StatusCode::TOO_MANY_REQUESTS {
                    let after = HeaderValue::from(PER_IP_PERIOD.as_secs());
                    response.headers_mut().insert(header::RETRY_AFTER, after);
                }
                response
            }
        }
    }

    async fn serve(&self, request: Request<Incoming>, peer: SocketAddr) -> Result<Value, Refusal> {
        if request.uri().path() != ENROL_PATH {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("the enrolment endpoint is POST {ENROL_PATH}"),
            ));
        }
        if request.method() != Method::POST {
            return Err(refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("use POST {ENROL_PATH}"),
            ));
        }
        if self.per_ip.len() > MAX_TRACKED_ADDRESSES {
            self.per_ip.retain_recent();
        }
        if self.per_ip.check_key(&limit_key(peer.ip())).is_err() {
            tracing::warn!(%peer, "enrolment request refused: rate limited");
            return Err(refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many enrolment requests; retry later",
            ));
        }
        let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return Err(refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("body over {MAX_BODY_BYTES} bytes"),
                ))
            }
        };
        let request = decode_request(authorization.as_deref(), &body)?;
        let outcome = self.enrol(request).await;
        match &outcome {
            Ok(body) => tracing::info!(%peer, node = %body["node_id"].as_str().unwrap_or(""), "node enrolled"),
            Err(refused) => tracing::warn!(%peer, code = refused.code, reason = %refused.message, "enrolment refused"),
        }
        outcome
    }

    /// Checks the token, makes the certificate, marks the token used (durably), answers.
    async fn enrol(&self, request: EnrolRequest) -> Result<Value, Refusal> {
        let now = now_millis();
        let record = self.coordinator.join_token(&request.secret, now).map_err(redeem_refusal)?;
        let cert_pem = self.ca.issue_node_from_csr(&record.node_id, &request.csr_pem).map_err(|e| match e {
            PkiError::BadCsr(reason) => {
                refusal(StatusCode::BAD_REQUEST, "bad_csr", format!("certificate signing request refused: {reason}"))
            }
            other => refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("issuing the certificate failed: {other}"),
            ),
        })?;
        let cert_digest = certificate_der(&cert_pem).map(|der| fingerprint(&der)).unwrap_or_default();
        let record =
            self.coordinator.redeem_join_token(&request.secret, cert_digest, now).await.map_err(redeem_refusal)?;
        Ok(json!({
            "node_id": record.node_id.as_str(),
            "region": record.region,
            "node_cert_pem": cert_pem,
            "ca_cert_pem": self.ca.cert_pem(),
            "coordinator_key": self.facts.coordinator_key,
            "coordinator_addr": self.facts.sync_addr.to_string(),
            "coordinator_server_name": self.facts.server_name,
        }))
    }
}

/// IPv4 addresses as they are, IPv6 by /64 (one subscriber's prefix).
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
    }
}

fn redeem_refusal(e: RedeemError) -> Refusal {
    let message = e.to_string();
    match e {
        RedeemError::Unknown => refusal(StatusCode::UNAUTHORIZED, "token_unknown", message),
        RedeemError::Used { .. } => refusal(StatusCode::CONFLICT, "token_used", message),
        RedeemError::Expired { .. } => refusal(StatusCode::GONE, "token_expired", message),
        RedeemError::Revoked(_) => refusal(StatusCode::FORBIDDEN, "node_revoked", message),
        RedeemError::Coordinator(_) => {
            tracing::error!(error = %message, "enrolment failed");
            refusal(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the coordinator cannot enrol now; retry later")
        }
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_or_say_what_is_wrong() {
        let secret = TokenSecret::generate();
        let auth = format!("Bearer {}", secret.to_wire());
        let body = br#"{"csr_pem":"x"}"#;
        let request = decode_request(Some(auth.as_bytes()), body).unwrap();
        assert_eq!(request.secret, secret);
        assert_eq!(request.csr_pem, "x");
        assert_eq!(decode_request(None, body).unwrap_err().code, "token_required");
        assert_eq!(decode_request(Some(b"Basic abc"), body).unwrap_err().code, "token_required");
        assert_eq!(decode_request(Some(b"Bearer short"), body).unwrap_err().code, "token_malformed");
        assert_eq!(decode_request(Some(b"\xff\xfe"), body).unwrap_err().code, "token_required");
        let bad = decode_request(Some(auth.as_bytes()), br#"{"csr_pem":"x","name":"other"}"#).unwrap_err();
        assert_eq!((bad.status, bad.code), (StatusCode::BAD_REQUEST, "invalid_request"));
        assert_eq!(decode_request(Some(auth.as_bytes()), b"").unwrap_err().code, "invalid_request");
        // Messages never carry the secret, nor quote the body (where one could be pasted by mistake).
        let refused = decode_request(Some(auth.as_bytes()), b"{").unwrap_err();
        assert!(!refused.message.contains(&secret.to_wire()));
        let pasted = format!("\"{}\"", secret.to_wire());
        let refused = decode_request(Some(auth.as_bytes()), pasted.as_bytes()).unwrap_err();
        assert!(!refused.message.contains(&secret.to_wire()), "{}", refused.message);
    }

    #[tokio::test]
    async fn a_refused_request_leaves_the_token_usable_and_a_used_token_is_refused() {
        use crate::service::Settings;
        use edgecard_protocol::NodeId;
        use edgecard_store::{Store, StoreMetrics};

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, Arc::new(StoreMetrics::default())).unwrap();
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let coordinator = Arc::new(Coordinator::new(Arc::new(store), signing, Settings::default()));
        let node = NodeId::new("eu-1").unwrap();
        coordinator.add_node(&node, "eu").await.unwrap();
        let (secret, _) = coordinator.issue_join_token(&node, Duration::from_secs(60), now_millis()).await.unwrap();
        let ca = Arc::new(CertificateAuthority::generate("ca").unwrap());
        let facts = NodeLinkFacts {
            coordinator_key: "key".into(),
            sync_addr: "127.0.0.1:7443".parse().unwrap(),
            server_name: "localhost".into(),
        };
        let api = EnrolApi::new(coordinator.clone(), ca.clone(), facts);
        let request = |csr_pem: &str| EnrolRequest { secret: secret.clone(), csr_pem: csr_pem.into() };

        let refused = api.enrol(request("not a CSR")).await.unwrap_err();
        assert_eq!((refused.status, refused.code), (StatusCode::BAD_REQUEST, "bad_csr"));
        let unknown = EnrolRequest { secret: TokenSecret::generate(), csr_pem: "x".into() };
        assert_eq!(api.enrol(unknown).await.unwrap_err().code, "token_unknown");

        // The refusals spent nothing: the token still enrols, once.
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec!["us-9.node.edgecard".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let answer = api.enrol(request(&csr)).await.unwrap();
        assert_eq!(answer["node_id"], "eu-1");
        let cert = answer["node_cert_pem"].as_str().unwrap();
        let named = crate::pki::check_node_cert(cert, &ca.cert_pem(), &key.public_key_der()).unwrap();
        assert_eq!(named, node, "the token's node, not the one the request asked for");
        assert!(!answer.to_string().contains("PRIVATE KEY"));
        let again = api.enrol(request(&csr)).await.unwrap_err();
        assert_eq!((again.status, again.code), (StatusCode::CONFLICT, "token_used"));
        let record = coordinator.join_token(&secret, now_millis()).unwrap_err();
        assert!(matches!(record, RedeemError::Used { .. }));
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
    }
}
