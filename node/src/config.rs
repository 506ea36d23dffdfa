//! The node's TOML configuration. Every field has a documented default; `docs/node-config.md`
//! mirrors these comments. A bad file gives one error that names the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgecard_protocol::{NodeId, Sku};
use serde::{Deserialize, Serialize};

use crate::client_ip::ClientIpHeader;
use crate::limiter::LimiterConfig;

/// Environment variables that override secret fields, so secrets need not live in the file.
pub const ENV_SANDBOX_SECRET: &str = "EDGECARD_SANDBOX_SECRET";
pub const ENV_ADMIN_TOKEN: &str = "EDGECARD_NODE_ADMIN_TOKEN";
pub const ENV_COORDINATOR_KEY: &str = "EDGECARD_COORDINATOR_KEY";
pub const ENV_STRIPE_SECRET_KEY: &str = "EDGECARD_STRIPE_SECRET_KEY";
pub const ENV_STRIPE_WEBHOOK_SECRET: &str = "EDGECARD_STRIPE_WEBHOOK_SECRET";
pub const ENV_EPAY_KEY: &str = "EDGECARD_EPAY_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; grants for any other id are refused. Required.
    pub node_id: NodeId,
    /// Region label shown in status and metrics. Default "default".
    #[serde(default = "default_region")]
    pub region: String,
    /// Directory of the sled store. Required. Relative paths are relative to the config file.
    pub data_dir: PathBuf,
    /// Public base URL of this node as buyers reach it (through the CDN); used to build pay links.
    /// Default: `https://` + the HTTPS listen address.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub trust: TrustConfig,
    #[serde(default)]
    pub orders: OrdersConfig,
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[serde(default)]
    pub limits: LimiterConfig,
    /// Proof-of-work challenges on order creation (docs/abuse.md).
    #[serde(default)]
    pub abuse: crate::abuse::AbuseConfig,
    #[serde(default)]
    pub payments: PaymentsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The coordinator to sync with. Default: none (standalone, from grant files).
    #[serde(default)]
    pub coordinator: Option<CoordinatorLinkConfig>,
    /// Order mail over SMTP (see `mail::config`). Default: none (no mail is queued or sent).
    #[serde(default)]
    pub mail: Option<crate::mail::MailConfig>,
    /// The catalog this node sells. Keys arrive through grants; a grant for a sku that is not
    /// listed here is installed but not sold until the sku appears.
    #[serde(default)]
    pub products: Vec<ProductConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the buyer-facing HTTPS listener. Default "0.0.0.0:8443".
    pub listen: SocketAddr,
    /// PEM certificate chain. Default: none, which means a self-signed certificate for
    /// `localhost` and 127.0.0.1 is generated at start (for labs and the demo only).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Most simultaneous connections; further ones wait in the kernel backlog. Default 10000.
    pub max_connections: usize,
    /// Time a client has to send a full request head. Default 10 s.
    pub header_read_timeout_ms: u64,
    /// Largest accepted request body. Default 16 KiB.
    pub max_body_bytes: usize,
    /// `Strict-Transport-Security` max-age in seconds on every buyer-facing response (browsers
    /// then refuse plain HTTP to this name). Default 0: not sent, since a shop behind a CDN that
    /// terminates TLS usually sets it there. Set it (31536000 is common) when buyers reach the
    /// node directly over HTTPS with a real certificate.
    pub hsts_max_age_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls_cert: None,
            tls_key: None,
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            max_body_bytes: 16 * 1024,
            hsts_max_age_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Plain-HTTP listener for `/metrics`, `/healthz` and grant installation. Default
    /// "127.0.0.1:9443"; keep it on loopback or a private network.
    pub listen: SocketAddr,
    /// Bearer token for the admin endpoints other than metrics and health (env
    /// EDGECARD_NODE_ADMIN_TOKEN overrides). Default: none, which disables them.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9443)), token: None }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// The coordinator's grant-verifying ed25519 key, 64 hex characters (env
    /// EDGECARD_COORDINATOR_KEY overrides). Only grants signed by it are installed. Required.
    #[serde(default)]
    pub coordinator_key: String,
    /// Signed grant files installed at start (standalone operation). Default: none.
    #[serde(default)]
    pub grant_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersConfig {
    /// How long a reservation holds its keys unpaid. Default 900 s (15 min).
    pub reservation_ttl_secs: u64,
    /// Most open (unpaid) reservations per client IP (IPv6 per /64). Default 5.
    pub max_open_per_ip: u32,
    /// Most open reservations per email address. Default 5.
    pub max_open_per_email: u32,
    /// Largest quantity in one order. Default 10, at most 100.
    pub max_quantity: u32,
    /// A slice stops selling this long before its lease deadline, to absorb clock skew. Default 30 s.
    pub lease_safety_margin_secs: u64,
    /// How often expired reservations are swept. Default 1000 ms.
    pub expiry_sweep_ms: u64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        OrdersConfig {
            reservation_ttl_secs: 900,
            max_open_per_ip: 5,
            max_open_per_email: 5,
            max_quantity: 10,
            lease_safety_margin_secs: 30,
            expiry_sweep_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientIpConfig {
    /// CIDRs of the CDN or load balancers in front of the node. Default: none (the TCP peer is
    /// always the client).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Header carrying the client IP when the peer is trusted: "none", "cf-connecting-ip",
    /// "true-client-ip" or "x-forwarded-for" (right-most untrusted entry). Default "none".
    pub header: ClientIpHeader,
}

/// One hour: longer than Stripe's 30-minute minimum and the default reservation (15 min), so a
/// buyer still at Checkout when the reservation ends can pay (a late payment, delivered from stock
/// or first in line for it), and short enough that a forgotten session stops taking money the
/// same hour.
pub const DEFAULT_STRIPE_SESSION_TTL_SECS: u64 = 3600;
/// Stripe's minimum session lifetime (30 min from the session's creation) plus two minutes for
/// the creation's retries after the order.
pub const MIN_STRIPE_SESSION_TTL_SECS: u64 = 1920;

/// Six hours: a buyer who reaches the provider within the reservation, or pays a little late,
/// still comes back to the order; a return link seen in a provider's logs is dead the same day.
pub const DEFAULT_RETURN_LINK_TTL_SECS: u64 = 6 * 3600;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// Channel order per currency, e.g. `{ USD = ["stripe", "sandbox"], CNY = ["epay"] }`: order
    /// creation tries them in this order, skipping channels whose breaker is open, and a buyer may
    /// pick only among them. Default: for every currency, the enabled real channels in the order
    /// stripe, epay (its currency only); the sandbox only on a node without a real channel.
    pub routes: BTreeMap<String, Vec<String>>,
    /// How long the link that brings a buyer back from a hosted provider (Stripe, EPay) shows the
    /// order, counted from the order's creation. Default 21600 s (6 h); 300 to 86400.
    pub return_link_ttl_secs: u64,
    /// Extra CA certificate (PEM) trusted for providers' HTTPS APIs, besides the webpki roots.
    /// Default: none.
    pub extra_ca_file: Option<PathBuf>,
    /// Attempts per channel when creating a payment times out or gets a 5xx (same idempotency
    /// key each time). Default 3.
    pub create_attempts: u32,
    /// Bound on one creation attempt (and on one provider request). Default 5000 ms.
    pub create_timeout_ms: u64,
    /// Pause before retry n is n × this. Default 100 ms.
    pub retry_backoff_ms: u64,
    pub breaker: BreakerSettings,
    pub compensation: CompensationSettings,
    pub sandbox: SandboxConfig,
    pub stripe: StripeConfig,
    pub epay: EpayConfig,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            routes: BTreeMap::new(),
            extra_ca_file: None,
            create_attempts: 3,
            create_timeout_ms: 5_000,
            retry_backoff_ms: 100,
            return_link_ttl_secs: DEFAULT_RETURN_LINK_TTL_SECS,
            breaker: BreakerSettings::default(),
            compensation: CompensationSettings::default(),
            sandbox: SandboxConfig::default(),
            stripe: StripeConfig::default(),
            epay: EpayConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failed creations (all attempts failed or timed out) that open a channel's
    /// breaker. Default 5.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before letting probes through. Default 30000 ms.
    pub open_ms: u64,
    /// Calls let through at once while half-open. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 5, open_ms: 30_000, half_open_probes: 1 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompensationSettings {
    /// Query providers about orders left unconfirmed. Default true.
    pub enabled: bool,
    /// First query this long after an order is created; backoff doubles from here. Default
    /// 60000 ms.
    pub first_query_after_ms: u64,
    /// Longest pause between two queries of a young order; older orders are asked about more
    /// slowly (a quarter of their age, at most hourly). Default 300000 ms.
    pub max_backoff_ms: u64,
    /// Queries go on this long past the end of the provider's payment window (a Stripe Checkout
    /// Session's expiry). Default 900 s.
    pub grace_secs: u64,
    /// No order is queried longer than this after its creation; orders at providers whose
    /// payments never expire (EPay, the sandbox) are queried this long. Default 72 h; 1 to 720.
    pub max_window_hours: u64,
    /// How often the index of unconfirmed orders is scanned. Default 1000 ms.
    pub scan_every_ms: u64,
    /// Most queries in flight at once. Default 16.
    pub concurrency: usize,
}

impl Default for CompensationSettings {
    fn default() -> Self {
        CompensationSettings {
            enabled: true,
            first_query_after_ms: 60_000,
            max_backoff_ms: 300_000,
            grace_secs: 900,
            max_window_hours: 72,
            scan_every_ms: 1_000,
            concurrency: 16,
        }
    }
}

/// Serializes a secret as `"<set>"`, so printing the effective config never shows it.
pub(crate) fn redact<S: serde::Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_some("<set>"),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StripeConfig {
    /// Enables Stripe Checkout. Default false.
    pub enabled: bool,
    /// Base URL of the Stripe API. Default "https://api.stripe.com".
    pub api_base: String,
    /// Secret API key `sk_…` (env EDGECARD_STRIPE_SECRET_KEY overrides). Required when enabled.
    #[serde(serialize_with = "redact")]
    pub secret_key: Option<String>,
    /// Webhook endpoint signing secret `whsec_…` (env EDGECARD_STRIPE_WEBHOOK_SECRET overrides).
    /// Required when enabled. Point the endpoint at `{public_url}/api/v1/payments/stripe/callback`.
    #[serde(serialize_with = "redact")]
    pub webhook_secret: Option<String>,
    /// Accepted age of a webhook's `Stripe-Signature` timestamp. Default 300 s.
    pub tolerance_secs: u64,
    /// How long after the order's creation its Checkout Session takes payment (sent as
    /// `expires_at`). Default 3600 s; 1920 to 86400 (Stripe allows 30 min to 24 h after the
    /// session's creation, which may follow the order's by up to a minute of retries). At least
    /// `orders.reservation_ttl_secs` and at most `payments.return_link_ttl_secs`.
    pub session_ttl_secs: u64,
}

impl Default for StripeConfig {
    fn default() -> Self {
        StripeConfig {
            enabled: false,
            api_base: "https://api.stripe.com".into(),
            secret_key: None,
            webhook_secret: None,
            tolerance_secs: 300,
            session_ttl_secs: DEFAULT_STRIPE_SESSION_TTL_SECS,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpayConfig {
    /// Enables an EPay (易支付) aggregator. Default false.
    pub enabled: bool,
    /// The aggregator's base URL (`{gateway_url}/submit.php`, `{gateway_url}/api.php`). Required
    /// when enabled.
    pub gateway_url: String,
    /// Merchant id. Required when enabled.
    pub pid: String,
    /// Merchant key (env EDGECARD_EPAY_KEY overrides). Required when enabled.
    #[serde(serialize_with = "redact")]
    pub key: Option<String>,
    /// Payment method sent as `type`: "alipay", "wxpay", "qqpay", … Default "alipay".
    pub pay_type: String,
    /// Currency of the aggregator's amounts; orders in any other currency do not go to it.
    /// Default "CNY".
    pub currency: Currency,
}

impl Default for EpayConfig {
    fn default() -> Self {
        EpayConfig {
            enabled: false,
            gateway_url: String::new(),
            pid: String::new(),
            key: None,
            pay_type: "alipay".into(),
            currency: Currency(*b"CNY"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Enables the built-in test payment channel. Default false: never enable it on a shop that
    /// takes real money, since anyone can "pay" through it.
    pub enabled: bool,
    /// Lets the sandbox be enabled on a node that also has a real channel (stripe, epay); without
    /// it such a node refuses to start. Even then the sandbox serves only the currencies whose
    /// `payments.routes` list it, and the storefront and `/healthz` say that lab payments are on.
    /// Default false.
    pub allow_beside_real_channels: bool,
    /// HMAC key of sandbox callbacks (env EDGECARD_SANDBOX_SECRET overrides). Default: a random
    /// key made at start.
    pub secret: Option<String>,
    /// Accepted age of a callback's timestamp. Default 300 s.
    pub tolerance_secs: u64,
    /// Time between paying and the sandbox's callback, as a slow provider. Default 0 ms.
    pub callback_delay_ms: u64,
    /// Share of sandbox callbacks dropped, 0.0 to 1.0, as a lossy provider: those orders are
    /// confirmed by compensation. Default 0.0.
    pub callback_failure_rate: f64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: false,
            allow_beside_real_channels: false,
            secret: None,
            tolerance_secs: 300,
            callback_delay_ms: 0,
            callback_failure_rate: 0.0,
        }
    }
}

/// How the node reaches the coordinator (written by `edgecard nodes add`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorLinkConfig {
    /// The coordinator's QUIC sync address, `host:port`.
    pub addr: SocketAddr,
    /// The name in the coordinator's certificate. Default "localhost".
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The coordinator CA certificate (PEM): the only root trusted for the link.
    pub ca_cert: PathBuf,
    /// This node's certificate and key (PEM), issued by the coordinator's CA.
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    /// Upload (or poll for grants) at least this often while idle. Default 1000 ms.
    #[serde(default = "default_idle_poll_ms")]
    pub idle_poll_ms: u64,
}

fn default_server_name() -> String {
    "localhost".into()
}

fn default_idle_poll_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// sled page cache size. Default 32 MiB; kept small so a node's memory is predictable.
    pub cache_capacity_mb: u64,
    /// The key file that seals the store at rest (0600, made with a fresh key at the first
    /// start). Must lie outside `data_dir`. Default: beside it, `<data_dir>.sealing-key`. The
    /// environment variable EDGECARD_SEALING_KEY, when set, holds the key ring instead.
    pub sealing_key_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { cache_capacity_mb: 32, sealing_key_file: None }
    }
}

impl NodeConfig {
    /// The sealing key file in force (see [`StoreConfig::sealing_key_file`]).
    pub fn sealing_key_file(&self) -> PathBuf {
        self.store.sealing_key_file.clone().unwrap_or_else(|| edgecard_store::seal::default_key_file(&self.data_dir))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub sku: Sku,
    /// Title per language tag, e.g. `{ en = "Steam $20", "zh-CN" = "Steam 20 美元" }`. `en` required.
    pub title: BTreeMap<String, String>,
    /// Prices; the first is the default currency.
    pub prices: Vec<PriceConfig>,
}

#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Amount in the currency's minor unit (cents). Must be > 0.
    pub amount_minor: u64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: Currency,
}

/// An ISO 4217 currency code.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Currency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_uppercase) {
            Ok(Currency([b[0], b[1], b[2]]))
        } else {
            Err(format!("currency must be three upper-case letters (ISO 4217), got {s:?}"))
        }
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_string()
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_region() -> String {
    "default".into()
}

pub const MAX_QUANTITY_LIMIT: u32 = 100;

impl NodeConfig {
    /// Reads, parses, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = NodeConfig::parse(&text, path)?;
        config.apply_env(|name| std::env::var(name).ok());
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate(path)?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: one_line(&e.to_string()) })
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(secret) = get(ENV_SANDBOX_SECRET) {
            self.payments.sandbox.secret = Some(secret);
        }
        if let Some(token) = get(ENV_ADMIN_TOKEN) {
            self.admin.token = Some(token);
        }
        if let Some(key) = get(ENV_COORDINATOR_KEY) {
            self.trust.coordinator_key = key;
        }
        if let Some(key) = get(ENV_STRIPE_SECRET_KEY) {
            self.payments.stripe.secret_key = Some(key);
        }
        if let Some(secret) = get(ENV_STRIPE_WEBHOOK_SECRET) {
            self.payments.stripe.webhook_secret = Some(secret);
        }
        if let Some(key) = get(ENV_EPAY_KEY) {
            self.payments.epay.key = Some(key);
        }
        if let (Some(password), Some(mail)) = (get(crate::mail::config::ENV_SMTP_PASSWORD), self.mail.as_mut()) {
            mail.password = Some(password);
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        if let Some(p) = self.store.sealing_key_file.as_mut() {
            fix(p);
        }
        self.trust.grant_files.iter_mut().for_each(fix);
        if let Some(p) = self.http.tls_cert.as_mut() {
            fix(p);
        }
        if let Some(p) = self.http.tls_key.as_mut() {
            fix(p);
        }
        if let Some(link) = self.coordinator.as_mut() {
            fix(&mut link.ca_cert);
            fix(&mut link.node_cert);
            fix(&mut link.node_key);
        }
        if let Some(p) = self.payments.extra_ca_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.mail.as_mut().and_then(|m| m.ca_file.as_mut()) {
            fix(p);
        }
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if let Err(e) = edgecard_protocol::decode_verifying_key(&self.trust.coordinator_key) {
            return Err(invalid("trust.coordinator_key", e.to_string()));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(invalid("http.tls_cert", "tls_cert and tls_key must be set together".into()));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1".into()));
        }
        if self.http.max_body_bytes < 256 {
            return Err(invalid("http.max_body_bytes", "must be at least 256".into()));
        }
        if self.orders.reservation_ttl_secs == 0 {
            return Err(invalid("orders.reservation_ttl_secs", "must be at least 1".into()));
        }
        if self.orders.max_quantity == 0 || self.orders.max_quantity > MAX_QUANTITY_LIMIT {
            return Err(invalid("orders.max_quantity", format!("must be between 1 and {MAX_QUANTITY_LIMIT}")));
        }
        if self.orders.max_open_per_ip == 0 {
            return Err(invalid("orders.max_open_per_ip", "must be at least 1".into()));
        }
        if self.orders.max_open_per_email == 0 {
            return Err(invalid("orders.max_open_per_email", "must be at least 1".into()));
        }
        if self.orders.expiry_sweep_ms == 0 {
            return Err(invalid("orders.expiry_sweep_ms", "must be at least 1".into()));
        }
        self.limits.validate().map_err(|m| invalid("limits", m))?;
        self.abuse.validate().map_err(|(field, m)| invalid(&format!("abuse.{field}"), m))?;
        if let Some(url) = &self.public_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.ends_with('/') {
                return Err(invalid(
                    "public_url",
                    format!("must be http(s)://host[:port] without a trailing slash, got {url:?}"),
                ));
            }
        }
        if self.payments.sandbox.secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(invalid("payments.sandbox.secret", "must be at least 16 characters".into()));
        }
        self.validate_payments().map_err(|(field, message)| invalid(&field, message))?;
        if let Some(mail) = &self.mail {
            mail.validate().map_err(|(field, message)| invalid(&format!("mail.{field}"), message))?;
        }
        if let Some(link) = &self.coordinator {
            if link.idle_poll_ms == 0 || link.idle_poll_ms > 60_000 {
                return Err(invalid("coordinator.idle_poll_ms", "must be between 1 and 60000".into()));
            }
        }
        if self.store.cache_capacity_mb == 0 {
            return Err(invalid("store.cache_capacity_mb", "must be at least 1".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, product) in self.products.iter().enumerate() {
            let field = |name: &str| format!("products[{i}].{name}");
            if !seen.insert(product.sku.clone()) {
                return Err(invalid(&field("sku"), format!("duplicate sku {}", product.sku)));
            }
            if !product.title.contains_key("en") {
                return Err(invalid(&field("title"), "an `en` title is required".into()));
            }
            if product.title.values().any(|t| t.trim().is_empty() || t.len() > 200) {
                return Err(invalid(&field("title"), "titles must be 1 to 200 bytes".into()));
            }
            if product.prices.is_empty() {
                return Err(invalid(&field("prices"), "at least one price is required".into()));
            }
            let mut currencies = std::collections::BTreeSet::new();
            for price in &product.prices {
                if price.amount_minor == 0 {
                    return Err(invalid(&field("prices"), "amount_minor must be > 0".into()));
                }
                if !currencies.insert(price.currency) {
                    return Err(invalid(&field("prices"), format!("currency {} listed twice", price.currency)));
                }
            }
        }
        Ok(())
    }

    fn validate_payments(&self) -> Result<(), (String, String)> {
        let p = &self.payments;
        let err = |field: &str, message: &str| Err((format!("payments.{field}"), message.to_string()));
        let rate = p.sandbox.callback_failure_rate;
        if !(0.0..=1.0).contains(&rate) {
            return err("sandbox.callback_failure_rate", "must be between 0.0 and 1.0");
        }
        if p.sandbox.callback_delay_ms > 60_000 {
            return err("sandbox.callback_delay_ms", "must be at most 60000");
        }
        if p.create_attempts == 0 || p.create_attempts > 10 {
            return err("create_attempts", "must be between 1 and 10");
        }
        if p.create_timeout_ms == 0 {
            return err("create_timeout_ms", "must be at least 1");
        }
        if !(300..=86_400).contains(&p.return_link_ttl_secs) {
            return err("return_link_ttl_secs", "must be between 300 and 86400");
        }
        let real = self.real_channels();
        if p.sandbox.enabled && !real.is_empty() && !p.sandbox.allow_beside_real_channels {
            // Anyone can pay through the sandbox for free: beside real money it must be asked for.
            return Err((
                "payments.sandbox.enabled".into(),
                format!(
                    "the sandbox is a lab channel (anyone can pay through it for free) and cannot be enabled \
                     beside {} unless payments.sandbox.allow_beside_real_channels = true (test shops only)",
                    real.join(" and ")
                ),
            ));
        }
        if p.breaker.failure_threshold == 0 {
            return err("breaker.failure_threshold", "must be at least 1");
        }
        if p.breaker.open_ms == 0 {
            return err("breaker.open_ms", "must be at least 1");
        }
        if p.breaker.half_open_probes == 0 {
            return err("breaker.half_open_probes", "must be at least 1");
        }
        let c = &p.compensation;
        if c.first_query_after_ms == 0 {
            return err("compensation.first_query_after_ms", "must be at least 1");
        }
        if c.max_backoff_ms < c.first_query_after_ms {
            return err("compensation.max_backoff_ms", "must be at least first_query_after_ms");
        }
        if c.scan_every_ms == 0 {
            return err("compensation.scan_every_ms", "must be at least 1");
        }
        if c.concurrency == 0 {
            return err("compensation.concurrency", "must be at least 1");
        }
        if !(1..=720).contains(&c.max_window_hours) {
            return err("compensation.max_window_hours", "must be between 1 and 720");
        }
        let base_url = |url: &str| (url.starts_with("https://") || url.starts_with("http://")) && !url.ends_with('/');
        if p.stripe.enabled {
            if !base_url(&p.stripe.api_base) {
                return err("stripe.api_base", "must be http(s)://host[:port] without a trailing slash");
            }
            if !matches!(p.stripe.secret_key.as_deref(), Some(k) if !k.is_empty()) {
                return err("stripe.secret_key", "required when stripe is enabled (or EDGECARD_STRIPE_SECRET_KEY)");
            }
            if !matches!(p.stripe.webhook_secret.as_deref(), Some(s) if !s.is_empty()) {
                return err(
                    "stripe.webhook_secret",
                    "required when stripe is enabled (or EDGECARD_STRIPE_WEBHOOK_SECRET)",
                );
            }
            let ttl = p.stripe.session_ttl_secs;
            if !(MIN_STRIPE_SESSION_TTL_SECS..=86_400).contains(&ttl) {
                return err("stripe.session_ttl_secs", "must be between 1920 and 86400 (Stripe allows 30 min to 24 h)");
            }
            if ttl < self.orders.reservation_ttl_secs {
                return Err((
                    "payments.stripe.session_ttl_secs".into(),
                    format!(
                        "{ttl} s is shorter than orders.reservation_ttl_secs ({} s): buyers could not pay a reservation still open",
                        self.orders.reservation_ttl_secs
                    ),
                ));
            }
            if ttl > p.return_link_ttl_secs {
                return Err((
                    "payments.stripe.session_ttl_secs".into(),
                    format!(
                        "{ttl} s is longer than payments.return_link_ttl_secs ({} s): a buyer paying late would come back to a dead link",
                        p.return_link_ttl_secs
                    ),
                ));
            }
        }
        if p.epay.enabled {
            if !base_url(&p.epay.gateway_url) {
                return err("epay.gateway_url", "must be http(s)://host[:port] without a trailing slash");
            }
            if p.epay.pid.is_empty() || p.epay.pid.len() > 64 {
                return err("epay.pid", "required when epay is enabled, at most 64 characters");
            }
            if !matches!(p.epay.key.as_deref(), Some(k) if k.len() >= 8) {
                return err("epay.key", "required when epay is enabled (or EDGECARD_EPAY_KEY), at least 8 characters");
            }
            if p.epay.pay_type.is_empty() || !p.epay.pay_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return err("epay.pay_type", "must be a non-empty word such as alipay or wxpay");
            }
        }
        let enabled = self.enabled_channels();
        for (currency, route) in &p.routes {
            let field = format!("payments.routes.{currency}");
            if currency.parse::<Currency>().is_err() {
                return Err((field, "currency must be three upper-case letters (ISO 4217)".into()));
            }
            if route.is_empty() {
                return Err((field, "list at least one channel".into()));
            }
            for name in route {
                if !enabled.contains(&name.as_str()) {
                    return Err((field, format!("channel {name:?} is not enabled (enabled: {enabled:?})")));
                }
                if route.iter().filter(|n| *n == name).count() > 1 {
                    return Err((field, format!("channel {name:?} listed twice")));
                }
            }
        }
        Ok(())
    }

    /// The enabled channels that move real money (everything but the sandbox).
    pub fn real_channels(&self) -> Vec<&'static str> {
        self.enabled_channels().into_iter().filter(|name| *name != "sandbox").collect()
    }

    /// Names of the enabled payment channels, in default route order.
    pub fn enabled_channels(&self) -> Vec<&'static str> {
        let p = &self.payments;
        let mut names = Vec::new();
        if p.stripe.enabled {
            names.push("stripe");
        }
        if p.epay.enabled {
            names.push("epay");
        }
        if p.sandbox.enabled {
            names.push("sandbox");
        }
        names
    }

    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.clone(),
            None => format!("https://{}", self.http.listen),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn minimal() -> String {
        format!("node_id = \"eu-1\"\ndata_dir = \"data\"\n[trust]\ncoordinator_key = \"{KEY}\"\n")
    }

    fn check(text: &str) -> Result<NodeConfig, ConfigError> {
        let path = Path::new("node.toml");
        let config = NodeConfig::parse(text, path)?;
        config.validate(path)?;
        Ok(config)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = check(&minimal()).unwrap();
        assert_eq!(config.orders.reservation_ttl_secs, 900);
        assert_eq!(config.http.listen.port(), 8443);
        assert!(!config.payments.sandbox.enabled);
        assert_eq!(config.region, "default");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = check(&format!("{}[orders]\nreservation_ttl = 5\n", minimal())).unwrap_err().to_string();
        assert!(err.contains("reservation_ttl"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("[orders]\nmax_quantity = 0\n", "orders.max_quantity"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            ("[[products]]\nsku = \"a\"\ntitle = { en = \"A\" }\nprices = []\n", "products[0].prices"),
            ("[[products]]\nsku = \"a\"\ntitle = { zh = \"A\" }\nprices = [{ amount_minor = 1, currency = \"USD\" }]\n", "products[0].title"),
            ("public_url = \"ftp://x\"\n", "public_url"),
        ];
        for (extra, field) in cases {
            let text = if extra.starts_with("public_url") {
                format!("{extra}{}", minimal())
            } else {
                format!("{}{extra}", minimal())
            };
            let err = check(&text).unwrap_err().to_string();
            assert!(err.contains(field), "expected {field} in {err}");
        }
    }

    #[test]
    fn bad_currency_and_key_are_refused() {
        let err = check(&format!(
            "{}[[products]]\nsku = \"a\"\ntitle = {{ en = \"A\" }}\nprices = [{{ amount_minor = 1, currency = \"usd\" }}]\n",
            minimal()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("currency"), "{err}");
        let err = check(&minimal().replace(KEY, "abcd")).unwrap_err().to_string();
        assert!(err.contains("trust.coordinator_key"), "{err}");
    }

    #[test]
    fn payment_settings_are_validated_by_field() {
        let cases = [
            ("[payments.sandbox]\ncallback_failure_rate = 1.5\n", "payments.sandbox.callback_failure_rate"),
            ("[payments]\ncreate_attempts = 0\n", "payments.create_attempts"),
            ("[payments.breaker]\nfailure_threshold = 0\n", "payments.breaker.failure_threshold"),
            ("[payments.compensation]\nmax_backoff_ms = 5\n", "payments.compensation.max_backoff_ms"),
            ("[payments.stripe]\nenabled = true\nwebhook_secret = \"whsec\"\n", "payments.stripe.secret_key"),
            ("[payments.stripe]\nenabled = true\nsecret_key = \"sk\"\n", "payments.stripe.webhook_secret"),
            ("[payments.stripe]\nenabled = true\napi_base = \"ftp://x\"\n", "payments.stripe.api_base"),
            ("[payments.epay]\nenabled = true\npid = \"1\"\nkey = \"12345678\"\n", "payments.epay.gateway_url"),
            ("[payments.epay]\nenabled = true\ngateway_url = \"https://p\"\nkey = \"12345678\"\n", "payments.epay.pid"),
            ("[payments.epay]\nenabled = true\ngateway_url = \"https://p\"\npid = \"1\"\n", "payments.epay.key"),
            ("[payments.routes]\nUSD = [\"stripe\"]\n", "payments.routes.USD"),
            ("[payments.routes]\nusd = []\n", "payments.routes.usd"),
        ];
        for (extra, field) in cases {
            let err = check(&format!("{}{extra}", minimal())).unwrap_err().to_string();
            assert!(err.contains(field), "expected {field} in {err}");
        }
        let ok = format!(
            "{}[payments.routes]\nUSD = [\"sandbox\"]\n[payments.sandbox]\nenabled = true\ncallback_failure_rate = 0.2\n",
            minimal()
        );
        let config = check(&ok).unwrap();
        assert_eq!(config.payments.create_attempts, 3);
        assert_eq!(config.payments.compensation.grace_secs, 900);
        assert_eq!(config.payments.compensation.max_window_hours, 72);
        assert_eq!(config.payments.stripe.session_ttl_secs, 3600);
        assert_eq!(config.payments.epay.currency.as_str(), "CNY");
        assert_eq!(config.enabled_channels(), vec!["sandbox"]);
    }

    #[test]
    fn a_checkout_session_outlives_the_reservation_and_not_the_return_link() {
        let stripe = "[payments.stripe]\nenabled = true\nsecret_key = \"sk\"\nwebhook_secret = \"whsec\"\n";
        let with = |extra: &str| check(&format!("{}{extra}{stripe}", minimal()));
        assert!(with("").is_ok());
        for (extra, needle) in [
            ("[orders]\nreservation_ttl_secs = 7200\n", "shorter than orders.reservation_ttl_secs"),
            ("[payments]\nreturn_link_ttl_secs = 1800\n", "longer than payments.return_link_ttl_secs"),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(err.contains("payments.stripe.session_ttl_secs") && err.contains(needle), "{err}");
        }
        for ttl in [1800, 86_401] {
            let err = check(&format!("{}{stripe}session_ttl_secs = {ttl}\n", minimal())).unwrap_err().to_string();
            assert!(err.contains("payments.stripe.session_ttl_secs"), "{ttl}: {err}");
        }
        let err = check(&format!("{}[payments.compensation]\nmax_window_hours = 0\n", minimal())).unwrap_err();
        assert!(err.to_string().contains("payments.compensation.max_window_hours"), "{err}");
    }

    #[test]
    fn the_sandbox_beside_a_real_channel_needs_an_explicit_yes() {
        let stripe = "[payments.stripe]\nenabled = true\nsecret_key = \"sk\"\nwebhook_secret = \"whsec\"\n";
        let epay = "[payments.epay]\nenabled = true\ngateway_url = \"https://p\"\npid = \"1\"\nkey = \"12345678\"\n";
        for real in [stripe, epay] {
            let err =
                check(&format!("{}{real}[payments.sandbox]\nenabled = true\n", minimal())).unwrap_err().to_string();
            assert!(err.contains("payments.sandbox.enabled"), "{err}");
            assert!(err.contains("allow_beside_real_channels = true"), "the message names the way out: {err}");
            let allowed =
                format!("{}{real}[payments.sandbox]\nenabled = true\nallow_beside_real_channels = true\n", minimal());
            let config = check(&allowed).unwrap();
            assert_eq!(crate::payments::LabPayments::of(&config), crate::payments::LabPayments::BesideRealChannels);
        }
        let lab = check(&format!("{}[payments.sandbox]\nenabled = true\n", minimal())).unwrap();
        assert_eq!(crate::payments::LabPayments::of(&lab), crate::payments::LabPayments::LabNode);
        let real = check(&format!("{}{stripe}", minimal())).unwrap();
        assert_eq!(crate::payments::LabPayments::of(&real), crate::payments::LabPayments::Off);
        assert_eq!(real.payments.return_link_ttl_secs, 6 * 3600);
        for ttl in [0, 299, 86_401] {
            let err = check(&format!("{}[payments]\nreturn_link_ttl_secs = {ttl}\n", minimal())).unwrap_err();
            assert!(err.to_string().contains("payments.return_link_ttl_secs"), "{err}");
        }
    }

    #[test]
    fn payment_secrets_come_from_the_environment_and_never_print() {
        let mut config = check(&minimal()).unwrap();
        config.apply_env(|name| match name {
            ENV_STRIPE_SECRET_KEY => Some("sk_test_env".into()),
            ENV_STRIPE_WEBHOOK_SECRET => Some("whsec_env".into()),
            ENV_EPAY_KEY => Some("epay-key-env".into()),
            _ => None,
        });
        assert_eq!(config.payments.stripe.secret_key.as_deref(), Some("sk_test_env"));
        assert_eq!(config.payments.epay.key.as_deref(), Some("epay-key-env"));
        let printed = toml::to_string_pretty(&config).unwrap();
        for secret in ["sk_test_env", "whsec_env", "epay-key-env"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("<set>"));
    }

    #[test]
    fn environment_overrides_secrets() {
        let mut config = check(&minimal()).unwrap();
        config.apply_env(|name| (name == ENV_SANDBOX_SECRET).then(|| "from-the-environment".to_string()));
        assert_eq!(config.payments.sandbox.secret.as_deref(), Some("from-the-environment"));
    }
}
