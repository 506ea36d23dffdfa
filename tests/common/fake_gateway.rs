//! A fake payment gateway for tests: one HTTPS task on 127.0.0.1 that speaks Stripe's Checkout
//! Session API and webhooks and the EPay submit/notify/query protocol, with real signatures
//! (HMAC-SHA256 `Stripe-Signature`, EPay MD5), written independently of the node's code.
//!
//! Fault injection: delay, 5xx, timeouts (stalls past the client's bound), a hard outage,
//! dropped callbacks, duplicated callbacks; tests send out-of-order events with
//! [`FakeGateway::send_stripe_event`].
//!
//! Stripe refunds as Stripe does them: `POST /v1/refunds` by `payment_intent` (the full amount),
//! idempotent per `Idempotency-Key`, `charge_already_refunded` for a second refund of a charge,
//! `GET /v1/refunds?payment_intent=…`; refunds and disputes made "in the dashboard" send
//! `charge.refunded` and `charge.dispute.created` webhooks. `refund_stall` makes the refund call
//! succeed and then stall past the client's bound, as a crash after the provider's call would.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgecard::https_client::{Endpoint, Request as ClientRequest};
use edgecard_node::http_server::{self, ServerOptions};
use hmac::{Hmac, Mac};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use md5::{Digest, Md5};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::watch;

pub const STRIPE_SECRET_KEY: &str = "sk_test_fake_gateway";
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_fake_gateway_secret";
pub const EPAY_PID: &str = "1001";
pub const EPAY_KEY: &str = "epay-fake-gateway-key";

/// What the gateway does wrong, changeable while it runs.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every API call answers 503.
    pub down: bool,
    /// Share of API calls answered 500/503.
    pub error_rate: f64,
    /// Share of API calls that stall for `stall` (longer than the node's request bound), then 503.
    pub timeout_rate: f64,
    pub stall: Duration,
    /// Added to every API call.
    pub delay: Duration,
    /// Share of callbacks never sent.
    pub drop_callback_rate: f64,
    /// Extra copies of every callback sent.
    pub duplicate_callbacks: u32,
    /// Refunds are made, then their answer stalls for `stall` and fails (the caller never learns).
    pub refund_stall: bool,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub order_id: String,
    pub node_id: String,
    pub amount_total: u64,
    pub currency: String,
    pub paid: bool,
    /// Where Checkout sends the browser after paying, and after cancelling.
    pub success_url: String,
    pub cancel_url: String,
    /// Unix seconds after which the session takes no payment (Stripe's default: 24 h).
    pub expires_at: u64,
}

impl Session {
    /// The session's PaymentIntent (and charge), which exist once it is paid.
    pub fn payment_intent(&self) -> Option<String> {
        self.paid.then(|| format!("pi_{}", self.id.trim_start_matches("cs_")))
    }

    pub fn charge(&self) -> String {
        format!("ch_{}", self.id.trim_start_matches("cs_"))
    }
}

impl Session {
    pub fn expired(&self) -> bool {
        !self.paid && unix_secs() > self.expires_at
    }
}

#[derive(Clone, Debug)]
pub struct EpayOrder {
    pub out_trade_no: String,
    pub trade_no: String,
    pub money: String,
    pub name: String,
    pub pay_type: String,
    pub notify_url: String,
    /// Where the gateway sends the browser after paying (empty when the merchant gave none).
    pub return_url: String,
    pub paid: bool,
}

#[derive(Default)]
pub struct Counters {
    pub api_calls: AtomicU64,
    pub injected_failures: AtomicU64,
    pub sessions_created: AtomicU64,
    pub queries: AtomicU64,
    pub callbacks_sent: AtomicU64,
    pub callbacks_dropped: AtomicU64,
    /// Refunds made (a repeated idempotent call makes none).
    pub refunds_created: AtomicU64,
    pub refund_calls: AtomicU64,
}

/// A refund made at the fake Stripe.
#[derive(Clone, Debug)]
pub struct Refund {
    pub id: String,
    pub payment_intent: String,
    pub amount: u64,
    pub currency: String,
    pub order_id: Option<String>,
}

struct State {
    faults: Mutex<Faults>,
    sessions: Mutex<HashMap<String, Session>>,
    idempotency: Mutex<HashMap<String, String>>,
    /// Refunds, and refund idempotency keys → refund id.
    refunds: Mutex<Vec<Refund>>,
    refund_keys: Mutex<HashMap<String, String>>,
    epay: Mutex<HashMap<String, EpayOrder>>,
    next: AtomicU64,
    url: String,
    counters: Counters,
}

pub struct FakeGateway {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// PEM of the CA that signed the gateway's certificate.
    pub ca_pem: String,
    state: Arc<State>,
    node: Mutex<Option<Endpoint>>,
    shutdown: watch::Sender<bool>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stripe's webhook signature header for `body` at time `t`.
pub fn stripe_signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex(&mac.finalize().into_bytes()))
}

/// EPay's MD5 signature: sorted `k=v&…` without sign, sign_type and empty values, key appended.
pub fn epay_sign(params: &[(String, String)], key: &str) -> String {
    let mut kept: Vec<&(String, String)> =
        params.iter().filter(|(k, v)| k != "sign" && k != "sign_type" && !v.is_empty()).collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let text = kept.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    hex(&Md5::digest(format!("{text}{key}").as_bytes()))
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let v = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16);
                match v {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

pub fn encode_form(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v))).collect::<Vec<_>>().join("&")
}

fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

impl State {
    fn session_json(&self, s: &Session) -> Value {
        json!({
            "id": s.id, "object": "checkout.session",
            "url": format!("{}/checkout/{}", self.url, s.id),
            "amount_total": s.amount_total, "currency": s.currency,
            "client_reference_id": s.order_id,
            "metadata": { "order_id": s.order_id, "node_id": s.node_id },
            "mode": "payment",
            "payment_status": if s.paid { "paid" } else { "unpaid" },
            "status": if s.paid { "complete" } else if s.expired() { "expired" } else { "open" },
            "expires_at": s.expires_at,
            "payment_intent": s.payment_intent(),
        })
    }

    /// Applies the configured faults to one API call: `Some(response)` replaces the real answer.
    async fn inject(&self) -> Option<Response<Full<Bytes>>> {
        self.counters.api_calls.fetch_add(1, Ordering::Relaxed);
        let faults = self.faults.lock().clone();
        if !faults.delay.is_zero() {
            tokio::time::sleep(faults.delay).await;
        }
        let unavailable = json!({ "error": { "message": "injected outage", "type": "api_error" } });
        if faults.down {
            self.counters.injected_failures.fetch_add(1, Ordering::Relaxed);
            return Some(json_response(StatusCode::SERVICE_UNAVAILABLE, &unavailable));
        }
        let roll: f64 = rand::random();
        if roll < faults.timeout_rate {
            self.counters.injected_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(faults.stall).await;
            return Some(json_response(StatusCode::SERVICE_UNAVAILABLE, &unavailable));
        }
        if roll < faults.timeout_rate + faults.error_rate {
            self.counters.injected_failures.fetch_add(1, Ordering::Relaxed);
            let status = if roll < faults.timeout_rate + faults.error_rate / 2.0 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Some(json_response(status, &unavailable));
        }
        None
    }

    async fn handle(self: Arc<Self>, request: http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let idempotency = request.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let stripe_api = path.starts_with("/v1/");
        if stripe_api && auth != format!("Bearer {STRIPE_SECRET_KEY}") {
            return json_response(StatusCode::UNAUTHORIZED, &json!({ "error": { "message": "bad key" } }));
        }
        if stripe_api || path == "/api.php" {
            if let Some(fault) = self.inject().await {
                return fault;
            }
        }
        match (method, path.as_str()) {
            (Method::POST, "/v1/checkout/sessions") => {
                let form = parse_form(&String::from_utf8_lossy(&body));
                if let Some(key) = &idempotency {
                    let existing = self.idempotency.lock().get(key).cloned();
                    if let Some(id) = existing {
                        let session = self.sessions.lock().get(&id).cloned().unwrap();
                        return json_response(StatusCode::OK, &self.session_json(&session));
                    }
                }
                let (Some(order_id), Some(amount), Some(currency)) = (
                    get(&form, "client_reference_id"),
                    get(&form, "line_items[0][price_data][unit_amount]").and_then(|a| a.parse::<u64>().ok()),
                    get(&form, "line_items[0][price_data][currency]"),
                ) else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({ "error": { "message": "missing params" } }),
                    );
                };
                let quantity: u64 = get(&form, "line_items[0][quantity]").and_then(|q| q.parse().ok()).unwrap_or(1);
                // Stripe's rule: 30 minutes to 24 hours after the session's creation.
                let now = unix_secs();
                let expires_at = match get(&form, "expires_at").map(str::parse::<u64>) {
                    None => now + 86_400,
                    Some(Ok(at)) if (now + 1_800..=now + 86_400).contains(&at) => at,
                    Some(_) => {
                        let message = "The `expires_at` timestamp must be between 30 minutes and 24 hours from Checkout Session creation.";
                        return json_response(
                            StatusCode::BAD_REQUEST,
                            &json!({ "error": { "message": message, "param": "expires_at", "type": "invalid_request_error" } }),
                        );
                    }
                };
                let session = Session {
                    id: format!("cs_test_{}", self.next.fetch_add(1, Ordering::Relaxed)),
                    order_id: order_id.to_string(),
                    node_id: get(&form, "metadata[node_id]").unwrap_or("").to_string(),
                    amount_total: amount * quantity,
                    currency: currency.to_string(),
                    paid: false,
                    success_url: get(&form, "success_url").unwrap_or("").to_string(),
                    cancel_url: get(&form, "cancel_url").unwrap_or("").to_string(),
                    expires_at,
                };
                self.counters.sessions_created.fetch_add(1, Ordering::Relaxed);
                self.sessions.lock().insert(session.id.clone(), session.clone());
                if let Some(key) = idempotency {
                    self.idempotency.lock().insert(key, session.id.clone());
                }
                json_response(StatusCode::OK, &self.session_json(&session))
            }
            (Method::POST, "/v1/refunds") => {
                self.create_refund(&parse_form(&String::from_utf8_lossy(&body)), idempotency).await
            }
            (Method::GET, "/v1/refunds") => {
                let q = parse_form(&query);
                let intent = get(&q, "payment_intent").unwrap_or("");
                let data: Vec<Value> =
                    self.refunds.lock().iter().filter(|r| r.payment_intent == intent).map(refund_json).collect();
                json_response(StatusCode::OK, &json!({ "object": "list", "data": data, "has_more": false }))
            }
            (Method::GET, p) if p.starts_with("/v1/checkout/sessions/") => {
                self.counters.queries.fetch_add(1, Ordering::Relaxed);
                let id = &p["/v1/checkout/sessions/".len()..];
                match self.sessions.lock().get(id) {
                    Some(s) => json_response(StatusCode::OK, &self.session_json(s)),
                    None => json_response(StatusCode::NOT_FOUND, &json!({ "error": { "message": "no such session" } })),
                }
            }
            (Method::GET, "/api.php") => {
                self.counters.queries.fetch_add(1, Ordering::Relaxed);
                let q = parse_form(&query);
                if get(&q, "pid") != Some(EPAY_PID) || get(&q, "key") != Some(EPAY_KEY) {
                    return json_response(StatusCode::OK, &json!({ "code": -1, "msg": "bad merchant" }));
                }
                let order = get(&q, "out_trade_no").and_then(|no| self.epay.lock().get(no).cloned());
                match order {
                    Some(o) => json_response(
                        StatusCode::OK,
                        &json!({
                            "code": 1, "msg": "ok", "pid": EPAY_PID, "trade_no": o.trade_no,
                            "out_trade_no": o.out_trade_no, "type": o.pay_type, "name": o.name,
                            "money": o.money, "status": if o.paid { 1 } else { 0 },
                        }),
                    ),
                    None => json_response(StatusCode::OK, &json!({ "code": -1, "msg": "order not found" })),
                }
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": { "message": "not found" } })),
        }
    }
}

fn refund_json(r: &Refund) -> Value {
    json!({
        "id": r.id, "object": "refund", "amount": r.amount, "currency": r.currency,
        "payment_intent": r.payment_intent, "status": "succeeded",
        "metadata": r.order_id.as_ref().map_or(json!({}), |o| json!({ "order_id": o })),
    })
}

impl State {
    /// `POST /v1/refunds`: a full refund of a paid session's PaymentIntent.
    async fn create_refund(&self, form: &[(String, String)], idempotency: Option<String>) -> Response<Full<Bytes>> {
        self.counters.refund_calls.fetch_add(1, Ordering::Relaxed);
        let error = |status, code: &str, message: &str| {
            json_response(
                status,
                &json!({ "error": { "code": code, "message": message, "type": "invalid_request_error" } }),
            )
        };
        let known = idempotency.as_ref().and_then(|k| self.refund_keys.lock().get(k).cloned());
        let refund = match known {
            Some(id) => self.refunds.lock().iter().find(|r| r.id == id).cloned(),
            None => {
                let intent = get(form, "payment_intent").unwrap_or("");
                let session =
                    self.sessions.lock().values().find(|s| s.payment_intent().as_deref() == Some(intent)).cloned();
                let Some(session) = session else {
                    return error(StatusCode::NOT_FOUND, "resource_missing", "No such payment_intent");
                };
                if self.refunds.lock().iter().any(|r| r.payment_intent == intent) {
                    let message = format!("Charge {} has already been refunded.", session.charge());
                    return error(StatusCode::BAD_REQUEST, "charge_already_refunded", &message);
                }
                let refund = Refund {
                    id: format!("re_test_{}", self.next.fetch_add(1, Ordering::Relaxed)),
                    payment_intent: intent.to_string(),
                    amount: session.amount_total,
                    currency: session.currency.clone(),
                    order_id: get(form, "metadata[order_id]").map(str::to_string),
                };
                self.refunds.lock().push(refund.clone());
                if let Some(key) = idempotency {
                    self.refund_keys.lock().insert(key, refund.id.clone());
                }
                self.counters.refunds_created.fetch_add(1, Ordering::Relaxed);
                Some(refund)
            }
        };
        let Some(refund) = refund else { return error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "lost refund") };
        let faults = self.faults.lock().clone();
        if faults.refund_stall {
            // Made, but the caller never hears of it.
            tokio::time::sleep(faults.stall).await;
            return error(StatusCode::SERVICE_UNAVAILABLE, "api_error", "injected stall");
        }
        json_response(StatusCode::OK, &refund_json(&refund))
    }
}

impl FakeGateway {
    /// Starts the gateway on 127.0.0.1 with a fresh CA; must run inside a tokio runtime.
    pub async fn start() -> FakeGateway {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fake gateway test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let chain = format!("{}{}", leaf.pem(), ca_cert.pem());
        let tls =
            edgecard_node::tls::server_config_from_pem(chain.as_bytes(), leaf_key.serialize_pem().as_bytes()).unwrap();

        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            faults: Mutex::new(Faults { stall: Duration::from_secs(3), ..Faults::default() }),
            sessions: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
            refunds: Mutex::new(Vec::new()),
            refund_keys: Mutex::new(HashMap::new()),
            epay: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            url: url.clone(),
            counters: Counters::default(),
        });
        let (shutdown, rx) = watch::channel(false);
        let handler_state = state.clone();
        let handler = http_server::handler_fn(move |request, _peer| handler_state.clone().handle(request));
        let options = ServerOptions { shutdown_grace: Duration::from_millis(100), ..ServerOptions::default() };
        tokio::spawn(async move {
            let _ = http_server::serve(listener, Some(tls), handler, options, rx).await;
        });
        FakeGateway { url, ca_pem: ca_cert.pem(), state, node: Mutex::new(None), shutdown }
    }

    /// Writes the CA PEM to `dir/name` for the node's `payments.extra_ca_file`.
    pub fn write_ca(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.ca_pem).unwrap();
        path.to_path_buf()
    }

    /// Where callbacks go: the node's buyer API.
    pub fn set_node(&self, endpoint: Endpoint) {
        *self.node.lock() = Some(endpoint);
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock() = faults;
    }

    pub fn faults(&self) -> Faults {
        self.state.faults.lock().clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    pub fn session(&self, id: &str) -> Option<Session> {
        self.state.sessions.lock().get(id).cloned()
    }

    /// The session id in a Checkout pay URL (`{url}/checkout/{id}`).
    pub fn session_of(&self, pay_url: &str) -> String {
        pay_url.rsplit('/').next().unwrap().to_string()
    }

    pub fn sessions_for(&self, order_id: &str) -> Vec<Session> {
        self.state.sessions.lock().values().filter(|s| s.order_id == order_id).cloned().collect()
    }

    fn roll_drop(&self) -> bool {
        let rate = self.state.faults.lock().drop_callback_rate;
        rate > 0.0 && rand::random::<f64>() < rate
    }

    fn copies(&self) -> u32 {
        1 + self.state.faults.lock().duplicate_callbacks
    }

    /// A signed Stripe event about `session` with the given type and payment status.
    pub fn stripe_event(&self, kind: &str, session: &Session, payment_status: &str) -> Vec<u8> {
        let mut object = self.state.session_json(session);
        object["payment_status"] = json!(payment_status);
        json!({
            "id": format!("evt_{}", self.state.next.fetch_add(1, Ordering::Relaxed)),
            "object": "event", "type": kind, "created": unix_secs(),
            "data": { "object": object },
        })
        .to_string()
        .into_bytes()
    }

    /// Posts a raw webhook with `signature` to the node; returns (status, body).
    pub async fn post_stripe_webhook(&self, body: &[u8], signature: &str) -> (u16, String) {
        let endpoint = self.node.lock().clone().expect("set_node first");
        let request = ClientRequest::post("/api/v1/payments/stripe/callback")
            .header("content-type", "application/json")
            .header("stripe-signature", signature)
            .body(body.to_vec());
        let response = endpoint.request(request).await.unwrap();
        (response.status, response.text())
    }

    /// Sends `kind` about `session` (signed now), honouring drop and duplicate faults. Returns
    /// the statuses the node answered (empty when dropped).
    pub async fn send_stripe_event(&self, kind: &str, session: &Session, payment_status: &str) -> Vec<u16> {
        if self.roll_drop() {
            self.state.counters.callbacks_dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let body = self.stripe_event(kind, session, payment_status);
        let signature = stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &body);
        let mut statuses = Vec::new();
        for _ in 0..self.copies() {
            self.state.counters.callbacks_sent.fetch_add(1, Ordering::Relaxed);
            statuses.push(self.post_stripe_webhook(&body, &signature).await.0);
        }
        statuses
    }

    /// The buyer completes Checkout for `session_id`: the session becomes paid and
    /// `checkout.session.completed` is sent (subject to faults). An expired session takes no
    /// payment (a test error).
    pub async fn pay_stripe(&self, session_id: &str) -> Vec<u16> {
        let session = {
            let mut sessions = self.state.sessions.lock();
            let session = sessions.get_mut(session_id).expect("unknown session");
            assert!(!session.expired(), "session {session_id} has expired: Checkout takes no payment");
            session.paid = true;
            session.clone()
        };
        self.send_stripe_event("checkout.session.completed", &session, "paid").await
    }

    /// The buyer follows an EPay submit URL and pays: the gateway checks the merchant's
    /// signature, records the payment and sends the notify (GET when `get`, else POST form),
    /// subject to faults. Returns the node's answers (status, body).
    pub async fn pay_epay(&self, submit_url: &str, get_notify: bool) -> Vec<(u16, String)> {
        let query = submit_url.split_once('?').map(|(_, q)| q).expect("submit URL has a query");
        let params = parse_form(query);
        assert_eq!(get(&params, "sign"), Some(epay_sign(&params, EPAY_KEY).as_str()), "merchant signature");
        assert_eq!(get(&params, "pid"), Some(EPAY_PID));
        let out_trade_no = get(&params, "out_trade_no").unwrap().to_string();
        let order = EpayOrder {
            out_trade_no: out_trade_no.clone(),
            trade_no: format!("2024{:08}", self.state.next.fetch_add(1, Ordering::Relaxed)),
            money: get(&params, "money").unwrap().to_string(),
            name: get(&params, "name").unwrap_or("").to_string(),
            pay_type: get(&params, "type").unwrap_or("alipay").to_string(),
            notify_url: get(&params, "notify_url").unwrap().to_string(),
            return_url: get(&params, "return_url").unwrap_or("").to_string(),
            paid: true,
        };
        self.state.epay.lock().insert(out_trade_no, order.clone());
        if self.roll_drop() {
            self.state.counters.callbacks_dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let notify = self.epay_notify(&order, "TRADE_SUCCESS", EPAY_KEY);
        let mut answers = Vec::new();
        for _ in 0..self.copies() {
            self.state.counters.callbacks_sent.fetch_add(1, Ordering::Relaxed);
            answers.push(self.send_epay_notify(&order.notify_url, &notify, get_notify).await);
        }
        answers
    }

    /// The notify parameters for `order`, signed with `key`.
    pub fn epay_notify(&self, order: &EpayOrder, trade_status: &str, key: &str) -> Vec<(String, String)> {
        let mut params: Vec<(String, String)> = vec![
            ("pid".into(), EPAY_PID.into()),
            ("trade_no".into(), order.trade_no.clone()),
            ("out_trade_no".into(), order.out_trade_no.clone()),
            ("type".into(), order.pay_type.clone()),
            ("name".into(), order.name.clone()),
            ("money".into(), order.money.clone()),
            ("trade_status".into(), trade_status.into()),
        ];
        let sign = epay_sign(&params, key);
        params.push(("sign".into(), sign));
        params.push(("sign_type".into(), "MD5".into()));
        params
    }

    /// Sends notify `params` to `notify_url` (which must be on the node set with `set_node`).
    pub async fn send_epay_notify(&self, notify_url: &str, params: &[(String, String)], get: bool) -> (u16, String) {
        let endpoint = self.node.lock().clone().expect("set_node first");
        let path = notify_url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
        let form = encode_form(params);
        let request = if get {
            ClientRequest::get(&format!("{path}?{form}"))
        } else {
            ClientRequest::post(&path).header("content-type", "application/x-www-form-urlencoded").body(form)
        };
        let response = endpoint.request(request).await.unwrap();
        (response.status, response.text())
    }

    /// Where Checkout redirects the buyer's browser once `session_id` is paid (`paid`) or
    /// cancelled: its `success_url` with `{CHECKOUT_SESSION_ID}` filled in, or its `cancel_url`.
    pub fn stripe_redirect(&self, session_id: &str, paid: bool) -> String {
        let session = self.session(session_id).expect("unknown session");
        if paid {
            session.success_url.replace("{CHECKOUT_SESSION_ID}", &session.id)
        } else {
            session.cancel_url
        }
    }

    /// Where the gateway redirects the buyer's browser after paying `out_trade_no`: the
    /// merchant's `return_url` with the signed result appended as a query string, as EPay
    /// gateways do.
    pub fn epay_redirect(&self, out_trade_no: &str) -> String {
        let order = self.epay_order(out_trade_no).expect("unknown EPay order");
        let result = encode_form(&self.epay_notify(&order, "TRADE_SUCCESS", EPAY_KEY));
        let separator = if order.return_url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{result}", order.return_url)
    }

    /// Refunds made, in order.
    pub fn refunds(&self) -> Vec<Refund> {
        self.state.refunds.lock().clone()
    }

    /// A refund made in Stripe's dashboard: the session's charge is refunded in full and
    /// `charge.refunded` is sent. Returns the node's answers.
    pub async fn refund_in_dashboard(&self, session_id: &str) -> Vec<u16> {
        let session = self.session(session_id).expect("unknown session");
        let intent = session.payment_intent().expect("an unpaid session has nothing to refund");
        let refund = Refund {
            id: format!("re_dash_{}", self.state.next.fetch_add(1, Ordering::Relaxed)),
            payment_intent: intent.clone(),
            amount: session.amount_total,
            currency: session.currency.clone(),
            order_id: None,
        };
        self.state.refunds.lock().push(refund.clone());
        self.state.counters.refunds_created.fetch_add(1, Ordering::Relaxed);
        let charge = json!({
            "id": session.charge(), "object": "charge", "amount": session.amount_total,
            "amount_refunded": session.amount_total, "currency": session.currency, "payment_intent": intent,
            "refunded": true, "refunds": { "object": "list", "data": [refund_json(&refund)] },
        });
        self.send_object_event("charge.refunded", charge).await
    }

    /// The buyer disputes the session's payment: `charge.dispute.created` is sent.
    pub async fn open_dispute(&self, session_id: &str) -> Vec<u16> {
        let session = self.session(session_id).expect("unknown session");
        let dispute = json!({
            "id": format!("dp_test_{}", self.state.next.fetch_add(1, Ordering::Relaxed)), "object": "dispute",
            "amount": session.amount_total, "currency": session.currency, "charge": session.charge(),
            "payment_intent": session.payment_intent(), "reason": "fraudulent", "status": "needs_response",
        });
        self.send_object_event("charge.dispute.created", dispute).await
    }

    async fn send_object_event(&self, kind: &str, object: Value) -> Vec<u16> {
        let body = json!({
            "id": format!("evt_{}", self.state.next.fetch_add(1, Ordering::Relaxed)),
            "object": "event", "type": kind, "created": unix_secs(), "data": { "object": object },
        })
        .to_string()
        .into_bytes();
        let signature = stripe_signature(STRIPE_WEBHOOK_SECRET, unix_secs(), &body);
        vec![self.post_stripe_webhook(&body, &signature).await.0]
    }

    pub fn epay_order(&self, out_trade_no: &str) -> Option<EpayOrder> {
        self.state.epay.lock().get(out_trade_no).cloned()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
