//! The coordinator's admin API: JSON over HTTP, on loopback by default, behind a bearer token.
//! The operator CLI is a typed client of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use edgecard_protocol::rebalance::StagedChange;
use edgecard_protocol::{NodeId, OrderId, Sku, SliceId, UnixMillis};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::import::KeyFormat;
use crate::records::{LedgerStatus, Price, ProductRecord, SliceState, TopUpPolicy};
use crate::service::{Coordinator, CoordinatorError, OrderFilter};

pub type HttpResponse = Response<Full<Bytes>>;

/// Key files can be large; JSON bodies are small.
const MAX_IMPORT_BYTES: usize = 64 * 1024 * 1024;
const MAX_JSON_BYTES: usize = 64 * 1024;

/// Issues node bundles (certificate, key, trust anchors); provided by the runtime, which owns
/// the CA.
pub trait BundleIssuer: Send + Sync {
    fn issue(&self, node: &NodeId, region: &str) -> Result<Value, String>;

    /// The join token string for `secret`: the secret plus where and how to enrol.
    fn join_token(&self, _secret: &crate::enrol::token::TokenSecret) -> Result<String, String> {
        Err("this coordinator offers no enrolment endpoint".into())
    }
}

pub struct AdminApi {
    pub coordinator: Arc<Coordinator>,
    pub token: String,
    /// Read-only token that opens `GET /metrics` and nothing else, so Prometheus never holds
    /// the admin token. `None`: only the admin token opens it.
    pub metrics_token: Option<String>,
    pub bundles: Arc<dyn BundleIssuer>,
    /// The coordinator's one metrics registry (see `metrics::coordinator_registry`).
    pub registry: Arc<prometheus_client::registry::Registry>,
}

struct ApiError(StatusCode, &'static str, String);

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            CoordinatorError::UnknownSku(_)
            | CoordinatorError::UnknownNode(_)
            | CoordinatorError::UnknownSlice(_)
            | CoordinatorError::UnknownOrder(_) => (StatusCode::NOT_FOUND, "not_found"),
            CoordinatorError::NotRefundable { .. } => (StatusCode::CONFLICT, "not_refundable"),
            CoordinatorError::NotReclaimed(_) => (StatusCode::CONFLICT, "not_reclaimed"),
            CoordinatorError::Plan(_) => (StatusCode::CONFLICT, "plan_refused"),
            CoordinatorError::StaleLayout { .. } => (StatusCode::CONFLICT, "stale_layout"),
            CoordinatorError::NothingStaged => (StatusCode::CONFLICT, "nothing_staged"),
            CoordinatorError::ProductExists(_) | CoordinatorError::NodeExists(_) => (StatusCode::CONFLICT, "exists"),
            CoordinatorError::NotEnoughKeys { .. } => (StatusCode::CONFLICT, "not_enough_keys"),
            CoordinatorError::NodeRevoked(_) => (StatusCode::CONFLICT, "node_revoked"),
            CoordinatorError::ForeignIncarnation { .. } => (StatusCode::CONFLICT, "foreign_incarnation"),
            CoordinatorError::InvalidProduct(_) | CoordinatorError::ZeroCount | CoordinatorError::BadRefundReason => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            CoordinatorError::ImportRefused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "import_refused"),
            CoordinatorError::Grant(_) | CoordinatorError::Store(_) => {
                tracing::error!(error = %message, "admin request failed");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        ApiError(status, code, message)
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProduct {
    sku: String,
    title: BTreeMap<String, String>,
    prices: Vec<Price>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNode {
    name: String,
    region: String,
    /// The lab flow: a bundle with the node's private key in the answer. Default: a join token.
    #[serde(default)]
    bundle: bool,
    /// Lifetime of the join token, in seconds (default 1 h, at most 7 days).
    #[serde(default)]
    ttl_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJoinToken {
    #[serde(default)]
    ttl_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyLayout {
    version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSlice {
    sku: String,
    node: String,
    count: u64,
}

impl AdminApi {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, _peer: SocketAddr) -> HttpResponse {
        if request.method() == Method::GET && request.uri().path() == "/healthz" {
            return self.healthz();
        }
        if request.method() == Method::GET && request.uri().path() == "/metrics" {
            if self.authorized(&request) || self.metrics_authorized(&request) {
                return edgecard_net::metrics::response(&self.registry);
            }
            return error_response(ApiError(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "bearer token required (metrics or admin)".into(),
            ));
        }
        if !self.authorized(&request) {
            return error_response(ApiError(StatusCode::UNAUTHORIZED, "unauthorized", "bearer token required".into()));
        }
        match self.route(request).await {
            Ok(response) => response,
            Err(e) => error_response(e),
        }
    }

    /// Unauthenticated, for orchestrators: 503 while the store refuses writes.
    fn healthz(&self) -> HttpResponse {
        let store = self.coordinator.store().health();
        let healthy = store == edgecard_store::Health::Ok;
        let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        respond(status, &json!({ "status": if healthy { "ok" } else { "unavailable" }, "store": store.as_str() }))
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        edgecard_net::auth::bearer_matches(request.headers(), &self.token)
    }

    fn metrics_authorized(&self, request: &Request<Incoming>) -> bool {
        self.metrics_token.as_deref().is_some_and(|token| edgecard_net::auth::bearer_matches(request.headers(), token))
    }

    /// Issues a join token for a registered node and answers with the token string.
    async fn join_token(&self, node: &NodeId, ttl: std::time::Duration) -> Result<HttpResponse, ApiError> {
        let c = &self.coordinator;
        let (secret, record) = c.issue_join_token(node, ttl, crate::service::now_millis()).await?;
        let token = self.bundles.join_token(&secret).map_err(|e| ApiError(StatusCode::CONFLICT, "no_enrolment", e))?;
        Ok(ok(json!({
            "node_id": node.as_str(),
            "region": record.region,
            "join_token": token,
            "expires_at": record.expires_at.0,
        })))
    }

    async fn route(&self, request: Request<Incoming>) -> Result<HttpResponse, ApiError> {
        let path = request.uri().path().to_string();
        let query = parse_query(request.uri().query());
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let c = &self.coordinator;
        match (request.method().clone(), segments.as_slice()) {
            (Method::GET, ["v1", "products"]) => {
                let products: Vec<Value> = c
                    .products()
                    .map_err(CoordinatorError::from)?
                    .into_iter()
                    .map(|p| {
                        let pool = c.pool_size(&p.sku);
                        json!({ "sku": p.sku.as_str(), "titles": titles_json(&p), "prices": p.prices, "pool": pool })
                    })
                    .collect();
                Ok(ok(json!(products)))
            }
            (Method::POST, ["v1", "products"]) => {
                let new: NewProduct = read_json(request).await?;
                let sku = parse_sku(&new.sku)?;
                let mut titles: Vec<(String, String)> = new.title.into_iter().collect();
                titles.sort_by_key(|(lang, _)| lang != "en");
                c.add_product(ProductRecord { sku: sku.clone(), titles, prices: new.prices, topup: None }).await?;
                Ok(ok(json!({ "sku": sku.as_str() })))
            }
            (Method::PUT, ["v1", "products", sku, "topup"]) => {
                let sku = parse_sku(sku)?;
                let policy: TopUpPolicy = read_json(request).await?;
                let product = c.set_topup(&sku, Some(policy)).await?;
                Ok(ok(json!({ "sku": product.sku.as_str(), "topup": product.topup })))
            }
            (Method::DELETE, ["v1", "products", sku, "topup"]) => {
                let sku = parse_sku(sku)?;
                let product = c.set_topup(&sku, None).await?;
                Ok(ok(json!({ "sku": product.sku.as_str(), "topup": product.topup })))
            }
            (Method::POST, ["v1", "products", sku, "prices"]) => {
                let sku = parse_sku(sku)?;
                let price: Price = read_json(request).await?;
                let product = c.set_price(&sku, price).await?;
                Ok(ok(json!({ "sku": product.sku.as_str(), "prices": product.prices })))
            }
            (Method::POST, ["v1", "products", sku, "keys"]) => {
                let sku = parse_sku(sku)?;
                let format = match query.get("format").map(String::as_str) {
                    None | Some("lines") => KeyFormat::Lines,
                    Some("csv") => KeyFormat::Csv {
                        column: query
                            .get("column")
                            .map_or(Ok(0), |c| c.parse())
                            .map_err(|_| bad_request("column must be a number"))?,
                        header: query.get("header").is_some_and(|h| h == "true"),
                    },
                    Some(other) => return Err(bad_request(format!("unknown format {other:?}; use lines or csv"))),
                };
                let strict = query.get("strict").is_some_and(|s| s == "true");
                let body = read_body(request, MAX_IMPORT_BYTES).await?;
                let text = std::str::from_utf8(&body).map_err(|_| bad_request("the key file is not UTF-8"))?;
                let report = c.import_keys(&sku, text, format, strict).await?;
                Ok(ok(json!(report)))
            }
            (Method::GET, ["v1", "nodes"]) => {
                let nodes = c.nodes().map_err(CoordinatorError::from)?;
                Ok(ok(json!(nodes)))
            }
            (Method::POST, ["v1", "nodes"]) => {
                let new: NewNode = read_json(request).await?;
                let node = NodeId::new(new.name.clone()).map_err(|e| bad_request(e.to_string()))?;
                if new.region.is_empty() || new.region.len() > 32 {
                    return Err(bad_request("region must be 1 to 32 characters"));
                }
                if !new.bundle {
                    let ttl = token_ttl(new.ttl_secs)?;
                    c.add_node(&node, &new.region).await?;
                    return self.join_token(&node, ttl).await;
                }
                let bundle = self
                    .bundles
                    .issue(&node, &new.region)
                    .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
                c.add_node(&node, &new.region).await?;
                Ok(ok(bundle))
            }
            (Method::POST, ["v1", "nodes", name, "join-token"]) => {
                let node = NodeId::new(*name).map_err(|e| bad_request(e.to_string()))?;
                let new: NewJoinToken = read_json(request).await?;
                let ttl = token_ttl(new.ttl_secs)?;
                self.join_token(&node, ttl).await
            }
            (Method::POST, ["v1", "nodes", name, "revoke"]) => {
                let node = NodeId::new(*name).map_err(|e| bad_request(e.to_string()))?;
                c.revoke_node(&node).await?;
                Ok(ok(json!({ "node": node.as_str(), "revoked": true })))
            }
            (Method::GET, ["v1", "slices"]) => Ok(ok(json!(c.slice_summaries().map_err(CoordinatorError::from)?))),
            (Method::POST, ["v1", "slices", id, "write-off"]) => {
                let id = id.parse().map(SliceId).map_err(|_| bad_request("slice id is a number"))?;
                let written_off = c.write_off(id).await?;
                Ok(ok(json!({ "slice_id": id.0, "written_off": written_off })))
            }
            (Method::GET, ["v1", "layout"]) => Ok(ok(json!(c.layout_preview().map_err(CoordinatorError::from)?))),
            (Method::POST, ["v1", "layout", "changes"]) => {
                let change: StagedChange = read_json(request).await?;
                Ok(ok(json!(c.stage_change(change).await?)))
            }
            (Method::POST, ["v1", "layout", "apply"]) => {
                let apply: ApplyLayout = read_json(request).await?;
                let moves = c.apply_layout(apply.version).await?;
                Ok(ok(json!({ "version": apply.version, "moves": moves })))
            }
            (Method::POST, ["v1", "layout", "revert"]) => Ok(ok(json!(c.revert_layout().await?))),
            (Method::POST, ["v1", "slices"]) => {
                let new: NewSlice = read_json(request).await?;
                let sku = parse_sku(&new.sku)?;
                let node = NodeId::new(new.node).map_err(|e| bad_request(e.to_string()))?;
                let slices = c.allocate(&sku, &node, new.count).await?;
                Ok(ok(json!({ "slices": slices })))
            }
            (Method::GET, ["v1", "orders"]) => {
                let filter = OrderFilter {
                    since: query
                        .get("since")
                        .map(|s| s.parse().map(UnixMillis))
                        .transpose()
                        .map_err(|_| bad_request("since is unix milliseconds"))?,
                    sku: query.get("sku").map(|s| parse_sku(s)).transpose()?,
                    node: query
                        .get("node")
                        .map(|n| NodeId::new(n.clone()).map_err(|e| bad_request(e.to_string())))
                        .transpose()?,
                    status: query.get("status").map(|s| parse_status(s)).transpose()?,
                };
                Ok(ok(json!(c.orders(&filter).map_err(CoordinatorError::from)?)))
            }
            (Method::POST, ["v1", "orders", id, "refund"]) => {
                let id: OrderId = id.parse().map_err(|_| bad_request("order id is 32 hex digits"))?;
                let body: RefundBody = read_json(request).await?;
                let refund = c.request_refund(&id, body.reason.as_deref().unwrap_or("")).await?;
                Ok(respond(StatusCode::ACCEPTED, &json!(refund)))
            }
            (Method::GET, ["v1", "refunds"]) => Ok(ok(json!(c.refunds().map_err(CoordinatorError::from)?))),
            (Method::GET, ["v1", "alarms"]) => Ok(ok(json!(c.alarms().map_err(CoordinatorError::from)?))),
            (Method::GET, ["v1", "status"]) => Ok(ok(self.status()?)),
            _ => Err(ApiError(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}"))),
        }
    }

    fn status(&self) -> Result<Value, ApiError> {
        let c = &self.coordinator;
        let products = c.products().map_err(CoordinatorError::from)?;
        let slices = c.slice_summaries().map_err(CoordinatorError::from)?;
        let nodes = c.nodes().map_err(CoordinatorError::from)?;
        let orders = c.orders(&OrderFilter::default()).map_err(CoordinatorError::from)?;
        let skus: Vec<Value> = products
            .iter()
            .map(|p| {
                let mut granted: BTreeMap<String, u64> = BTreeMap::new();
                let mut quarantined = 0;
                let mut written_off = 0;
                for slice in slices.iter().filter(|s| s.slice.sku == p.sku) {
                    *granted.entry(slice.slice.node.to_string()).or_default() += slice.unsold;
                    quarantined += slice.quarantined;
                    written_off += slice.written_off;
                }
                let sold: usize = orders
                    .iter()
                    .filter(|o| o.sku == p.sku && o.status == LedgerStatus::Delivered)
                    .map(|o| o.key_ids.len())
                    .sum();
                let awaiting =
                    orders.iter().filter(|o| o.sku == p.sku && o.status == LedgerStatus::PaidAwaitingStock).count();
                json!({
                    "sku": p.sku.as_str(), "pool": c.pool_size(&p.sku), "granted": granted, "sold": sold,
                    "quarantined": quarantined, "written_off": written_off, "paid_awaiting_stock": awaiting,
                    "topup": p.topup,
                })
            })
            .collect();
        let nodes: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let lineage = c.lineage(&n.node_id).map_err(CoordinatorError::from)?;
                Ok(json!({
                    "node": n.node_id.as_str(), "region": n.region, "revoked": n.revoked,
                    "incarnation": format!("{:#x}", lineage.incarnation),
                    "rolled_back": lineage.fence.is_some(),
                    "fence": lineage.fence,
                    "last_contact": n.last_contact.map(|t| t.0),
                    "events_high_water": n.events_high_water,
                    "pending_control": n.next_control_seq.saturating_sub(1).saturating_sub(n.control_applied),
                    "stock": n.stock,
                    "topups": n.topups,
                }))
            })
            .collect::<Result<_, ApiError>>()?;
        let leases: Vec<Value> = slices
            .iter()
            .filter(|s| s.slice.state != SliceState::Closed)
            .map(|s| {
                json!({
                    "slice_id": s.slice.slice_id.0, "node": s.slice.node.as_str(), "sku": s.slice.sku.as_str(),
                    "epoch": s.slice.epoch.0, "lease_deadline": s.slice.lease_deadline.0,
                    "state": s.slice.state.as_str(), "unsold": s.unsold, "sold": s.sold,
                    "quarantined": s.quarantined, "written_off": s.written_off, "take_window": s.slice.take_window,
                })
            })
            .collect();
        let moves: Vec<_> = c.moves().map_err(CoordinatorError::from)?.into_iter().filter(|m| m.in_flight()).collect();
        let alarms = c.alarms().map_err(CoordinatorError::from)?;
        Ok(json!({
            "skus": skus, "nodes": nodes, "leases": leases, "moves_in_flight": moves,
            "alarms": alarms.len(), "latest_alarms": alarms.iter().rev().take(10).collect::<Vec<_>>(),
        }))
    }
}

fn token_ttl(secs: Option<u64>) -> Result<std::time::Duration, ApiError> {
    use crate::enrol::tokens::{DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL};
    let ttl = secs.map_or(DEFAULT_TOKEN_TTL, std::time::Duration::from_secs);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(bad_request(format!("ttl_secs must be 1 to {}", MAX_TOKEN_TTL.as_secs())));
    }
    Ok(ttl)
}

fn titles_json(product: &ProductRecord) -> Value {
    json!(product.titles.iter().cloned().collect::<BTreeMap<String, String>>())
}

fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::new(raw).map_err(|e| bad_request(e.to_string()))
}

fn parse_status(raw: &str) -> Result<LedgerStatus, ApiError> {
    LedgerStatus::parse(raw).ok_or_else(|| {
        let known: Vec<&str> = LedgerStatus::ALL.iter().map(|s| s.as_str()).collect();
        bad_request(format!("unknown status {raw:?}; one of {}", known.join(", ")))
    })
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(_) => Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("body over {limit} bytes"))),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_body(request, MAX_JSON_BYTES).await?;
    serde_json::from_slice(&body).map_err(|e| bad_request(format!("invalid JSON: {e}")))
}

fn ok(body: Value) -> HttpResponse {
    respond(StatusCode::OK, &body)
}

fn error_response(ApiError(status, code, message): ApiError) -> HttpResponse {
    respond(status, &json!({ "error": { "code": code, "message": message } }))
}

fn respond(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
