//! The buyer-facing HTTP API (DESIGN §6): routing, JSON bodies, errors, caching headers and rate
//! limits. Order logic lives in the engine; this module only translates.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgecard_protocol::{OrderId, OrderToken, Sku};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::client_ip::ClientIpResolver;
use crate::config::Currency;
use crate::limiter::{LimitClass, Limiters};
use crate::metrics::HttpMetrics;
use crate::orders::{CreateOrder, OrderEngine, OrderError, OrderRecord, OrderStatus, PaymentOutcome};
use crate::payments::return_link::ReturnLinks;
use crate::payments::router::{RouteError, Router};
use crate::payments::sandbox::SandboxChannel;
use crate::payments::{AckStyle, CallbackRequest, CallbackVerdict, LabPayments, PaymentChannel, ProviderStatus};
use crate::time_fmt::rfc3339;
use edgecard_net::auth::bearer_token;

pub type HttpResponse = Response<Full<Bytes>>;

/// How long a request body may take to arrive, once its head is in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Catalog freshness: short, so stock counts stay close to the truth even through a CDN.
const CATALOG_CACHE_CONTROL: &str = "public, max-age=2, stale-while-revalidate=30";
const NO_STORE: &str = "no-store";

/// Whether an `If-None-Match` value names `etag`. RFC 9110 §13.1.2 compares weakly: `W/"x"`
/// matches `"x"` (CDNs weaken the tags of responses they compress).
fn if_none_match_hits(header: &str, etag: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    let wanted = opaque(etag);
    header.split(',').any(|tag| tag.trim() == "*" || opaque(tag) == wanted)
}

/// `/healthz` for the CDN and the orchestrator: 503 while the store refuses writes, so that
/// traffic moves to another origin (disk full) or the process is replaced (poisoned). It also
/// says whether lab payments (the sandbox, free for anyone) are on, so monitoring can alarm on a
/// shop taking real money with them.
pub fn healthz_response(engine: &OrderEngine, lab: LabPayments) -> HttpResponse {
    let store = engine.store().health();
    // A node waiting for the coordinator to confirm its data dir sells nothing: a load balancer
    // should send buyers elsewhere meanwhile.
    let confirmed = engine.is_confirmed();
    let healthy = store == edgecard_store::Health::Ok && confirmed;
    let status = match (store == edgecard_store::Health::Ok, confirmed) {
        (true, true) => "ok",
        (true, false) => "starting",
        (false, _) => "unavailable",
    };
    let body = json!({
        "status": status,
        "node": engine.node_id().as_str(),
        "store": store.as_str(),
        "selling": confirmed,
        "lab_payments": lab.as_str(),
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, &body, NO_STORE)
}

pub struct NodeApi {
    pub engine: Arc<OrderEngine>,
    pub limiters: Arc<Limiters>,
    pub client_ip: ClientIpResolver,
    pub channels: HashMap<&'static str, Arc<dyn PaymentChannel>>,
    /// Routes, breakers and metrics over the same channels; order creation goes through it.
    pub router: Arc<Router>,
    pub sandbox: Option<Arc<SandboxChannel>>,
    /// Links hosted providers send buyers back through (the storefront's return page checks them).
    pub return_links: ReturnLinks,
    /// Whether lab payments are on (the storefront warns buyers when beside real channels).
    pub lab: LabPayments,
    pub public_url: String,
    pub max_body_bytes: usize,
    pub metrics: Arc<HttpMetrics>,
    /// Proof-of-work challenges on order creation.
    pub abuse: Arc<crate::abuse::Abuse>,
}

/// A failed request: status, stable machine code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable machine code (`invalid_json`, `unknown_sku`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    fn into_response(self) -> HttpResponse {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = json_response(self.status, &body, NO_STORE);
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        let message = e.to_string();
        match e {
            OrderError::UnknownSku(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", message),
            OrderError::BadQuantity { .. } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_quantity", message),
            OrderError::UnsupportedCurrency { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "unsupported_currency", message)
            }
            OrderError::UnknownChannel(_) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_channel", message),
            OrderError::BadEmail => ApiError::new(StatusCode::BAD_REQUEST, "invalid_email", message),
            OrderError::SoldOut { .. } => ApiError::new(StatusCode::CONFLICT, "sold_out", message),
            OrderError::StockSyncing { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stock_syncing", message).retry_after(1)
            }
            OrderError::AwaitingCoordinator => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_starting", message).retry_after(2)
            }
            OrderError::TooManyOpen { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_open_orders", message).retry_after(60)
            }
            OrderError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "order_not_found", message),
            OrderError::InvalidPayment(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_callback", message),
            OrderError::TooManyAttempts { .. } => ApiError::new(StatusCode::CONFLICT, "too_many_attempts", message),
            OrderError::NotRefundable(_) => ApiError::new(StatusCode::CONFLICT, "not_refundable", message),
            OrderError::Store(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "order refused: the store's disk is full");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "disk_full", "the node cannot record orders right now")
                    .retry_after(5)
            }
            OrderError::Store(e) => {
                tracing::error!(error = %e, "store failure while serving a request");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the node cannot record orders right now")
                    .retry_after(5)
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrderBody {
    sku: String,
    #[serde(default = "one")]
    quantity: u32,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    channel: Option<String>,
}

fn one() -> u32 {
    1
}

/// A `POST /api/v1/orders` body, checked as far as it can be without the catalog and the engine
/// (which checks quantity and e-mail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    pub sku: Sku,
    pub quantity: u32,
    pub email: Option<String>,
    pub currency: Option<Currency>,
    pub channel: Option<String>,
}

/// Reads a create-order body: a JSON object of the known fields only, a well-formed sku, a
/// currency of three upper-case letters. Refusals are 400 (`invalid_json`, `invalid_currency`)
/// or 404 (`unknown_sku`: no sku can have that name).
pub fn parse_order_request(body: &[u8]) -> Result<OrderRequest, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("invalid order request: {e}"))
    };
    // An object, and only an object: serde also reads a struct from an array of its fields in
    // order (`["game-10", 1]`), which is no documented form of the request.
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "the order request must be a JSON object"));
    }
    let parsed = CreateOrderBody::deserialize(value).map_err(invalid)?;
    let sku = Sku::new(parsed.sku.clone())
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", format!("unknown sku {:?}", parsed.sku)))?;
    let currency = match parsed.currency {
        Some(c) => {
            Some(c.parse::<Currency>().map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_currency", m))?)
        }
        None => None,
    };
    Ok(OrderRequest { sku, quantity: parsed.quantity, email: parsed.email, currency, channel: parsed.channel })
}

impl NodeApi {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
        let started = Instant::now();
        let client = self.client_ip.resolve(peer.ip(), request.headers());
        let method = request.method().clone();
        let route = crate::http_metrics::route_template(request.uri().path());
        let response = match self.route(request, client).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        let status = response.status().as_u16();
        self.metrics.record(route, &method, status, started.elapsed().as_secs_f64());
        tracing::debug!(%method, status, "request");
        with_common_headers(response)
    }

    async fn route(&self, request: Request<Incoming>, client: IpAddr) -> Result<HttpResponse, ApiError> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (request.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => Ok(self.healthz()),
            (&Method::GET, ["api", "v1", "products"]) => {
                self.limit(LimitClass::Catalog, client)?;
                Ok(self.products(request.headers(), request.uri().query()))
            }
            (&Method::POST, ["api", "v1", "orders"]) => {
                self.limit(LimitClass::CreateOrder, client)?;
                self.create_order(request, client).await
            }
            (&Method::POST, ["api", "v1", "find-order"]) => self.find_order(request, client).await,
            (&Method::GET, ["api", "v1", "orders", id]) => {
                self.limit(LimitClass::OrderLookup, client)?;
                let id = parse_order_id(id)?;
                self.get_order(&id, request.headers()).await
            }
            (&Method::POST | &Method::GET, ["api", "v1", "payments", channel, "callback"]) => {
                // Providers call from few addresses and retry on failure: no per-IP limit here;
                // the signature check is the gate. EPay notifies may be GETs with a query string.
                let channel = channel.to_string();
                let headers = request.headers().clone();
                let query = request.uri().query().map(str::to_string);
                let body = self.read_body(request).await?;
                Ok(self.callback(&channel, &headers, query.as_deref(), &body).await)
            }
            (&Method::POST, ["pay", "sandbox", id]) if crate::storefront::is_browser_form(request.headers()) => {
                let id = id.to_string();
                Ok(crate::storefront::sandbox_pay_form(self, request, client, &id).await)
            }
            (&Method::POST, ["pay", "sandbox", id]) => {
                self.limit(LimitClass::Payment, client)?;
                let id = parse_order_id(id)?;
                let token = sandbox_pay_token(request.headers(), request.uri().query())?;
                self.sandbox_pay(&id, &token).await
            }
            (
                _,
                ["healthz"]
                | ["api", "v1", "products"]
                | ["api", "v1", "orders"]
                | ["api", "v1", "orders", _]
                | ["api", "v1", "find-order"],
            ) => Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")),
            _ if !path.starts_with("/api/") => Ok(crate::storefront::handle(self, request, client).await),
            _ => Err(ApiError::not_found()),
        }
    }

    fn limit(&self, class: LimitClass, client: IpAddr) -> Result<(), ApiError> {
        self.limiters.check(class, client).map_err(|limited| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; slow down")
                .retry_after(limited.retry_after_secs())
        })
    }

    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limited = Limited::new(request.into_body(), self.max_body_bytes);
        match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
            Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "request body too slow")),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body over {} bytes", self.max_body_bytes),
            )),
            Ok(Err(_)) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", "request body could not be read")),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    fn healthz(&self) -> HttpResponse {
        healthz_response(&self.engine, self.lab)
    }

    fn products(&self, headers: &HeaderMap, query: Option<&str>) -> HttpResponse {
        let language = preferred_language(headers);
        let wanted_currency: Option<Currency> =
            query_param(query, "currency").and_then(|c| c.to_ascii_uppercase().parse().ok());
        let products: Vec<Value> = self
            .engine
            .catalog()
            .all()
            .iter()
            .map(|p| {
                let price = wanted_currency
                    .and_then(|c| p.prices.iter().find(|price| price.currency == c))
                    .or_else(|| p.prices.first());
                let title = p.title.get(language).or_else(|| p.title.get("en")).cloned().unwrap_or_default();
                json!({
                    "sku": p.sku.as_str(),
                    "title": title,
                    "price": price.map(|price| json!({
                        "amount_minor": price.amount_minor,
                        "currency": price.currency.as_str(),
                    })),
                    "prices": p.prices.iter().map(|price| json!({
                        "amount_minor": price.amount_minor,
                        "currency": price.currency.as_str(),
                    })).collect::<Vec<_>>(),
                    "stock": self.engine.stock(&p.sku),
                })
            })
            .collect();
        let body = serde_json::to_vec(&products).unwrap_or_default();
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..12]));
        let not_modified = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| if_none_match_hits(v, &etag));
        let mut response = if not_modified {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            bytes_response(StatusCode::OK, body, "application/json")
        };
        let h = response.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CATALOG_CACHE_CONTROL));
        h.insert(header::VARY, HeaderValue::from_static("Accept-Language"));
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
        response
    }

    /// `POST /api/v1/find-order` `{"email": ADDRESS, "lang": "en"|"zh-CN"}`: "find my order", as the
    /// storefront's form. `202 {"status": "accepted"}` whether or not orders exist.
    async fn find_order(&self, request: Request<Incoming>, client: IpAddr) -> Result<HttpResponse, ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FindOrderBody {
            email: String,
            lang: Option<String>,
        }
        let negotiated = crate::storefront::i18n::negotiate(request.headers());
        let body = self.read_body(request).await?;
        let parsed: FindOrderBody = serde_json::from_slice(&body).map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "send {\"email\": ADDRESS} as a JSON object")
        })?;
        let lang = match parsed.lang.as_deref() {
            None => negotiated,
            Some(tag) => crate::storefront::i18n::Lang::from_tag(tag).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_lang", "lang must be \"en\" or \"zh-CN\"")
            })?,
        };
        match self.engine.find_orders(&parsed.email, lang, client) {
            Ok(()) => Ok(json_response(StatusCode::ACCEPTED, &json!({ "status": "accepted" }), NO_STORE)),
            Err(crate::orders::FindRefusal::BadAddress) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_email", "invalid email address"))
            }
            Err(crate::orders::FindRefusal::RateLimited(limited)) => {
                Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; slow down")
                    .retry_after(limited.retry_after_secs()))
            }
        }
    }

    async fn create_order(&self, request: Request<Incoming>, client: IpAddr) -> Result<HttpResponse, ApiError> {
        let is_json =
            request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the order as application/json",
            ));
        }
        let headers = request.headers().clone();
        let body = self.read_body(request).await?;
        let OrderRequest { sku, quantity, email, currency, channel } = parse_order_request(&body)?;
        let presented = crate::abuse::http::presented(&headers);
        if let crate::abuse::Gate::Challenge { challenge, refused } =
            self.abuse.gate(client, &sku, presented, crate::orders::engine::now_millis().0)
        {
            let body = crate::abuse::http::challenge_body(&challenge, refused);
            return Ok(json_response(crate::abuse::http::STATUS, &body, NO_STORE));
        }
        // The order's currency decides its route: the requested one, else the product's first.
        let order_currency = match currency {
            Some(c) => c.to_string(),
            None => self
                .engine
                .catalog()
                .get(&sku)
                .and_then(|p| p.prices.first().map(|price| price.currency.to_string()))
                .ok_or_else(|| ApiError::from(OrderError::UnknownSku(sku.to_string())))?,
        };
        let plan = self.router.plan(&order_currency, channel.as_deref()).map_err(route_error)?;
        let created = self
            .engine
            .create_order(CreateOrder {
                sku,
                quantity,
                email,
                currency,
                channel: self.router.preferred(&plan).to_string(),
                client_ip: client,
            })
            .await?;
        let (channel, pay_url) = self.open_payment(&created.record, &plan).await?;
        let pay_url = buyer_pay_url(&channel, pay_url, &created.token);
        let record = &created.record;
        let body = json!({
            "order_id": record.id.to_string(),
            "token": created.token.to_string(),
            "status": record.status.as_str(),
            "sku": record.sku.as_str(),
            "quantity": record.quantity,
            "amount_minor": record.amount_minor,
            "currency": record.currency,
            "channel": channel,
            "expires_at": rfc3339(record.expires_at),
            "pay_url": pay_url,
        });
        Ok(json_response(StatusCode::CREATED, &body, NO_STORE))
    }

    /// Opens the payment of a freshly reserved order through its route (`plan`; see
    /// [`crate::payments::open_payment`]). Returns (channel, pay link). When no channel can take
    /// it, the reservation is cancelled at once, so its keys are not frozen.
    pub async fn open_payment(&self, record: &OrderRecord, plan: &[usize]) -> Result<(String, String), ApiError> {
        match crate::payments::open_payment(&self.engine, &self.router, record, &self.public_url, plan).await {
            Ok((channel, created)) => Ok((channel.name().to_string(), created.pay_url)),
            Err(crate::payments::OpenError::Route(e)) => {
                if let Err(cancel) = self.engine.cancel_unpaid(&record.id).await {
                    tracing::error!(order = %record.id, error = %cancel, "cancelling an order without a payment failed");
                }
                Err(route_error(e))
            }
            Err(crate::payments::OpenError::Order(e)) => Err(e.into()),
        }
    }

    async fn get_order(&self, id: &OrderId, headers: &HeaderMap) -> Result<HttpResponse, ApiError> {
        let token = bearer_token(headers).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "send the order token as `Authorization: Bearer <token>`",
            )
        })?;
        let token: OrderToken = token.parse().map_err(|_| ApiError::from(OrderError::NotFound))?;
        let record = self.engine.lookup(id, &token).await?;
        Ok(json_response(StatusCode::OK, &self.order_view(&record, &token), NO_STORE))
    }

    fn order_view(&self, record: &OrderRecord, token: &OrderToken) -> Value {
        let mut view = json!({
            "order_id": record.id.to_string(),
            "status": record.status.as_str(),
            "sku": record.sku.as_str(),
            "quantity": record.quantity,
            "amount_minor": record.amount_minor,
            "currency": record.currency,
            "channel": record.channel,
            "created_at": rfc3339(record.created_at),
            "expires_at": rfc3339(record.expires_at),
        });
        if record.status == OrderStatus::Reserved {
            if let Some(channel) = self.channels.get(record.channel.as_str()) {
                view["pay_url"] =
                    json!(buyer_pay_url(channel.name(), channel.pay_url(record, &self.public_url), token));
            }
        }
        if record.status == OrderStatus::Delivered {
            view["keys"] = json!(record.secrets.iter().map(|s| s.expose()).collect::<Vec<_>>());
            view["delivered_at"] = json!(record.delivered_at.map(rfc3339));
        }
        view
    }

    /// The one path every provider callback takes, sandbox included. Answered only after the
    /// outcome is durable; any refusal or failure is a non-success answer, so providers retry.
    async fn callback(
        &self,
        channel_name: &str,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &[u8],
    ) -> HttpResponse {
        let style = self.channels.get(channel_name).map_or(AckStyle::Json, |c| c.ack_style());
        let result = self.process_callback(channel_name, &CallbackRequest { headers, query, body }).await;
        match (style, result) {
            (AckStyle::Json, Ok(outcome)) => {
                let body = json!({ "received": true, "outcome": outcome.map(outcome_name) });
                json_response(StatusCode::OK, &body, NO_STORE)
            }
            (AckStyle::Json, Err(e)) => e.into_response(),
            (AckStyle::PlainSuccess, Ok(_)) => bytes_response(StatusCode::OK, b"success".to_vec(), "text/plain"),
            (AckStyle::PlainSuccess, Err(e)) => {
                let status = if e.status.is_server_error() { e.status } else { StatusCode::BAD_REQUEST };
                bytes_response(status, b"fail".to_vec(), "text/plain")
            }
        }
    }

    async fn process_callback(
        &self,
        channel_name: &str,
        request: &CallbackRequest<'_>,
    ) -> Result<Option<PaymentOutcome>, ApiError> {
        let channel = self.channels.get(channel_name).ok_or_else(ApiError::not_found)?;
        let channel_metrics = self.router.metrics().channel(channel.name());
        let rejected = || {
            if let Some(m) = channel_metrics {
                m.callbacks_refused.inc();
            }
        };
        let verdict = channel.verify_callback(request, unix_secs()).map_err(|e| {
            rejected();
            tracing::warn!(channel = channel_name, reason = %e, "payment callback refused");
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_callback", e.to_string())
        })?;
        let verified = match verdict {
            CallbackVerdict::Payment(verified) => verified,
            CallbackVerdict::Refund(refund) => {
                let report = self
                    .engine
                    .record_provider_refund(channel.name(), &refund.provider_payment, &refund.provider_refund)
                    .await?;
                tracing::info!(channel = channel_name, ?report, "refund reported by the provider");
                return Ok(None);
            }
            CallbackVerdict::Dispute(dispute) => {
                let record = crate::orders::DisputeRecord {
                    provider_dispute: dispute.provider_dispute,
                    amount_minor: dispute.amount_minor,
                    currency: dispute.currency,
                    at: crate::orders::engine::now_millis(),
                };
                let report = self.engine.record_dispute(channel.name(), &dispute.provider_payment, record).await?;
                tracing::info!(channel = channel_name, ?report, "dispute reported by the provider");
                return Ok(None);
            }
            CallbackVerdict::Ignored(why) => {
                if let Some(m) = channel_metrics {
                    m.callbacks_ignored.inc();
                }
                tracing::info!(channel = channel_name, reason = why, "payment callback acknowledged without effect");
                return Ok(None);
            }
        };
        if verified.status != ProviderStatus::Succeeded {
            if let Some(m) = channel_metrics {
                m.callbacks_ignored.inc();
            }
            // A payment that did not go through counts against the order's client (card testing).
            if let Ok(order) = self.engine.order_for_payment(&verified.order_id) {
                self.abuse.note_failed_payment(order.client_ip, crate::orders::engine::now_millis().0);
            }
            tracing::info!(channel = channel_name, order = %verified.order_id, "payment callback with a non-success status: nothing changes");
            return Ok(None);
        }
        let outcome = self.engine.confirm_payment(verified.confirmation(channel.name())).await.inspect_err(|e| {
            if matches!(e, OrderError::InvalidPayment(_) | OrderError::NotFound) {
                rejected();
                tracing::warn!(channel = channel_name, reason = %e, "payment callback refused");
            }
        })?;
        // A payment that paid nothing is acknowledged once it is durably recorded and raised (see
        // `OrderEngine::confirm_payment`): retries would add nothing, and a provider disables a
        // webhook endpoint that keeps failing.
        if let Some(m) = channel_metrics {
            // A provider retrying a callback already applied changes nothing: not a new payment.
            let counter =
                if outcome == PaymentOutcome::AlreadyRecorded { &m.callbacks_replayed } else { &m.callbacks_accepted };
            counter.inc();
        }
        Ok(Some(outcome))
    }

    /// Pays `id` through the sandbox, for the holder of its token only: the sandbox pays for free,
    /// so knowing an order id (from a log, a shared screen) must not be enough.
    pub(crate) async fn sandbox_pay(&self, id: &OrderId, token: &OrderToken) -> Result<HttpResponse, ApiError> {
        let sandbox = self.sandbox.as_ref().ok_or_else(ApiError::not_found)?;
        let order = self.engine.lookup(id, token).await.map_err(|e| match e {
            OrderError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "order not found"),
            other => other.into(),
        })?;
        if order.binds(crate::payments::sandbox::NAME, None).is_err() {
            // Only orders whose payment was opened at the sandbox can be paid through it.
            return Err(ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "order not found"));
        }
        // The sandbox provider records the payment, then sends its callback (after the configured
        // delay, unless fault injection drops it: then compensation finds the payment later).
        let outcome = match sandbox.pay(&order, unix_secs).await {
            Some((headers, body)) => {
                let request = CallbackRequest { headers: &headers, query: None, body: &body };
                let outcome = self.process_callback(crate::payments::sandbox::NAME, &request).await?;
                sandbox.settled(id);
                outcome
            }
            None => None,
        };
        let status = self.engine.order_for_payment(id)?.status;
        let body = json!({
            "order_id": id.to_string(),
            "status": status.as_str(),
            "outcome": outcome.map(outcome_name),
        });
        Ok(json_response(StatusCode::OK, &body, NO_STORE))
    }
}

/// The pay link handed to the buyer. The sandbox's is this node's own pay page, which needs the
/// order's token, so it carries it (like the storefront's links; it never goes to a provider).
/// Hosted providers' links are theirs, unchanged.
fn buyer_pay_url(channel: &str, pay_url: String, token: &OrderToken) -> String {
    if channel == crate::payments::sandbox::NAME && !pay_url.is_empty() {
        format!("{pay_url}?token={token}")
    } else {
        pay_url
    }
}

/// The order token of a JSON sandbox payment: `Authorization: Bearer <token>`, or the `token`
/// query parameter that the pay link carries.
fn sandbox_pay_token(headers: &HeaderMap, query: Option<&str>) -> Result<OrderToken, ApiError> {
    let presented = bearer_token(headers).or_else(|| query_param(query, "token")).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send the order token as `Authorization: Bearer <token>` (or POST the pay_url as given)",
        )
    })?;
    presented.parse().map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "order not found"))
}

fn route_error(e: RouteError) -> ApiError {
    let message = e.to_string();
    match e {
        RouteError::UnknownChannel(_) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_channel", message),
        RouteError::ChannelNotOffered { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "channel_not_available", message)
        }
        RouteError::NoChannelForCurrency(_) => ApiError::new(StatusCode::BAD_REQUEST, "unsupported_currency", message),
        RouteError::AllUnavailable { retry_after_secs } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "payment_unavailable", message).retry_after(retry_after_secs)
        }
    }
}

fn outcome_name(outcome: PaymentOutcome) -> &'static str {
    match outcome {
        PaymentOutcome::Delivered => "delivered",
        PaymentOutcome::AwaitingStock => "paid_awaiting_stock",
        PaymentOutcome::AlreadyRecorded => "already_recorded",
        PaymentOutcome::DuplicatePayment => "duplicate_payment",
        PaymentOutcome::Problem(kind) if kind.unmatched().is_some() => "payment_unmatched",
        PaymentOutcome::Problem(_) => "payment_mismatch",
    }
}

fn parse_order_id(raw: &str) -> Result<OrderId, ApiError> {
    raw.parse().map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "order not found"))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

/// The first supported language in `Accept-Language` order (q-values ignored beyond q=0).
pub fn preferred_language(headers: &HeaderMap) -> &'static str {
    let Some(value) = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else { return "en" };
    for item in value.split(',') {
        let mut parts = item.split(';');
        let tag = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if parts.any(|p| p.trim() == "q=0") {
            continue;
        }
        if tag.starts_with("zh") {
            return "zh-CN";
        }
        if tag.starts_with("en") {
            return "en";
        }
    }
    "en"
}

pub fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn json_response(status: StatusCode, body: &Value, cache_control: &'static str) -> HttpResponse {
    let mut response = bytes_response(status, serde_json::to_vec(body).unwrap_or_default(), "application/json");
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_control));
    response
}

pub fn bytes_response(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn with_common_headers(mut response: HttpResponse) -> HttpResponse {
    let h = response.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_STORE));
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn language_follows_accept_language() {
        let mut h = HeaderMap::new();
        assert_eq!(preferred_language(&h), "en");
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("zh-CN,zh;q=0.9,en;q=0.8"));
        assert_eq!(preferred_language(&h), "zh-CN");
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("fr, en-GB;q=0.5"));
        assert_eq!(preferred_language(&h), "en");
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("zh;q=0, en"));
        assert_eq!(preferred_language(&h), "en");
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = "\"abc\"";
        assert!(if_none_match_hits("\"abc\"", etag));
        assert!(if_none_match_hits("W/\"abc\"", etag), "a weakened tag from a CDN still matches");
        assert!(if_none_match_hits("\"x\", W/\"abc\"", etag));
        assert!(if_none_match_hits("*", etag));
        assert!(!if_none_match_hits("\"abd\"", etag));
        assert!(!if_none_match_hits("W/\"ab\"", etag));
        assert!(!if_none_match_hits("", etag));
    }

    #[test]
    fn order_requests_are_json_objects_only() {
        let request = parse_order_request(br#"{"sku": "game-10", "quantity": 2, "currency": "CNY"}"#).unwrap();
        assert_eq!((request.sku.as_str(), request.quantity), ("game-10", 2));
        assert_eq!(request.currency.map(|c| c.to_string()).as_deref(), Some("CNY"));
        assert_eq!(parse_order_request(br#"{"sku": "game-10"}"#).unwrap().quantity, 1);
        // Found by the order_json fuzz target: serde reads a struct from an array of its fields.
        for refused in [&br#"["game-10", 1]"#[..], br#"["game-10"]"#, b"\"game-10\"", b"[]", b"null"] {
            let e = parse_order_request(refused).unwrap_err();
            assert_eq!((e.status(), e.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
        }
        let e = parse_order_request(br#"{"sku": "../x"}"#).unwrap_err();
        assert_eq!((e.status(), e.code()), (StatusCode::NOT_FOUND, "unknown_sku"));
        let e = parse_order_request(br#"{"sku": "game-10", "currency": "usd"}"#).unwrap_err();
        assert_eq!((e.status(), e.code()), (StatusCode::BAD_REQUEST, "invalid_currency"));
    }

    #[test]
    fn query_params_are_found() {
        assert_eq!(query_param(Some("a=1&currency=EUR"), "currency"), Some("EUR"));
        assert_eq!(query_param(Some("currency"), "currency"), None);
        assert_eq!(query_param(None, "currency"), None);
    }
}
