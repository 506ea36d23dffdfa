//! The admin listener: Prometheus metrics, health, node status, and grant installation.
//! Plain HTTP meant for loopback or a private network; everything but metrics and health needs
//! the admin bearer token.

use std::net::SocketAddr;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use edgecard_protocol::SignedGrant;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::api::{healthz_response, json_response, HttpResponse};
use crate::orders::{GrantInstallError, GrantOutcome, OrderEngine};
use crate::time_fmt::rfc3339;

/// Largest grant accepted over the admin API (a million keys is about 40 MB).
const MAX_GRANT_BYTES: usize = 64 * 1024 * 1024;

pub struct AdminApi {
    pub engine: Arc<OrderEngine>,
    /// The node's one metrics registry (see `metrics::node_registry`).
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub coordinator_key: VerifyingKey,
    pub token: Option<String>,
    pub region: String,
    /// Payment channels: breaker states for the status page.
    pub payments: Arc<crate::payments::router::Router>,
    /// Whether lab payments are on, for `/healthz`.
    pub lab: crate::payments::LabPayments,
}

#[derive(Debug, thiserror::Error)]
pub enum GrantRefusal {
    #[error("grant refused: {0}")]
    Verify(#[from] edgecard_protocol::GrantError),
    #[error("grant refused: {0}")]
    Install(#[from] GrantInstallError),
}

/// How a verified grant reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    /// A grant file or the admin API: an operator is there to hear that a lease already ran out.
    Operator,
    /// The coordinator's sync link: a grant whose lease ran out in transit is installed anyway,
    /// selling nothing, so the coordinator's reclaim and close find the keys where it put them.
    Coordinator,
}

/// Verifies a signed grant against the pinned coordinator key and this node's id, then installs
/// it. Used for grant files at start, the admin API and the sync link alike.
pub async fn verify_and_install(
    engine: &OrderEngine,
    coordinator_key: &VerifyingKey,
    bytes: &[u8],
    source: GrantSource,
) -> Result<GrantOutcome, GrantRefusal> {
    let outcome = async {
        let signed = SignedGrant::from_bytes(bytes)?;
        let grant = signed.verify(coordinator_key, engine.node_id())?;
        let accept_expired = source == GrantSource::Coordinator;
        Ok::<_, GrantRefusal>(engine.install_grant_with(grant, accept_expired).await?)
    }
    .await;
    if let Err(e) = &outcome {
        engine.metrics().grants_refused.inc();
        tracing::warn!(reason = %e, "grant refused");
    }
    outcome
}

impl AdminApi {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, _peer: SocketAddr) -> HttpResponse {
        let path = request.uri().path().to_string();
        match (request.method(), path.as_str()) {
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/healthz") => healthz_response(&self.engine, self.lab),
            (&Method::GET, "/admin/v1/status") if self.authorized(&request) => self.status(),
            (&Method::POST, "/admin/v1/grants") if self.authorized(&request) => self.install(request).await,
            (&Method::GET, "/admin/v1/mail") if self.authorized(&request) => {
                crate::mail::admin::status(&self.engine, request.uri().query())
            }
            (&Method::POST, "/admin/v1/mail/forget") if self.authorized(&request) => {
                match Limited::new(request.into_body(), 4096).collect().await {
                    Ok(body) => crate::mail::admin::forget(&self.engine, &body.to_bytes()).await,
                    Err(_) => error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "body too large or unreadable"),
                }
            }
            (_, "/admin/v1/status" | "/admin/v1/grants" | "/admin/v1/mail" | "/admin/v1/mail/forget") => {
                error(StatusCode::UNAUTHORIZED, "unauthorized", "admin token required")
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such resource"),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        self.token.as_deref().is_some_and(|expected| edgecard_net::auth::bearer_matches(request.headers(), expected))
    }

    async fn install(&self, request: Request<Incoming>) -> HttpResponse {
        let body = match Limited::new(request.into_body(), MAX_GRANT_BYTES).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "grant too large or unreadable"),
        };
        match verify_and_install(&self.engine, &self.coordinator_key, &body, GrantSource::Operator).await {
            Ok(outcome) => json_response(StatusCode::OK, &json!({ "outcome": format!("{outcome:?}") }), "no-store"),
            Err(GrantRefusal::Install(GrantInstallError::Store(e))) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("store failure: {e}"))
            }
            Err(e) => error(StatusCode::BAD_REQUEST, "grant_refused", &e.to_string()),
        }
    }

    fn status(&self) -> HttpResponse {
        let leases: Vec<_> = self
            .engine
            .leases()
            .into_iter()
            .map(|slice| {
                json!({
                    "slice_id": slice.slice_id.0, "sku": slice.sku.as_str(), "epoch": slice.epoch,
                    "lease_deadline": rfc3339(slice.lease_deadline), "selling": slice.selling,
                    "lease_live": slice.lease_live, "closed": slice.closed, "available": slice.available,
                    "unacknowledged_takes": slice.unacked_takes, "take_window": slice.take_window,
                })
            })
            .collect();
        let awaiting: Vec<_> = self
            .engine
            .awaiting_stock()
            .into_iter()
            .map(|(sku, id)| json!({ "sku": sku.as_str(), "order_id": id.to_string() }))
            .collect();
        // Verified payments that paid nothing, for the operator (provider ids are no secrets).
        let problems: Vec<_> = self
            .engine
            .payment_problems()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                json!({
                    "order_id": p.order_id.to_string(), "channel": p.channel, "provider_txn": p.provider_txn,
                    "amount_minor": p.amount_minor, "currency": p.currency, "reason": p.kind.as_str(),
                    "at": rfc3339(p.at),
                })
            })
            .collect();
        let pending_refunds: Vec<String> =
            self.engine.pending_refunds().unwrap_or_default().iter().map(ToString::to_string).collect();
        let body = json!({
            "node": self.engine.node_id().as_str(),
            "region": self.region,
            "open_reservations": self.engine.open_reservations(),
            "slices": leases,
            "paid_awaiting_stock": awaiting,
            "awaiting_payment_confirmation": self.engine.awaiting_confirmation().map(|p| p.len()).unwrap_or(0),
            "payment_problems": problems,
            "pending_refunds": pending_refunds,
            "payment_channels": self.payments.breaker_states().into_iter()
                .map(|(name, state)| json!({ "channel": name, "breaker": state.as_str() }))
                .collect::<Vec<_>>(),
        });
        json_response(StatusCode::OK, &body, "no-store")
    }

    fn metrics(&self) -> HttpResponse {
        edgecard_net::metrics::response(&self.registry)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": { "code": code, "message": message } }), "no-store")
}
