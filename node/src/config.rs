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
    #[serde(default)]
    pub payments: PaymentsConfig,
    #[serde(default)]
    pub store: StoreConfig,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    pub sandbox: SandboxConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Enables the built-in test payment channel. Default false: never enable it on a shop that
    /// takes real money, since anyone can "pay" through it.
    pub enabled: bool,
    /// HMAC key of sandbox callbacks (env EDGECARD_SANDBOX_SECRET overrides). Default: a random
    /// key made at start.
    pub secret: Option<String>,
    /// Accepted age of a callback's timestamp. Default 300 s.
    pub tolerance_secs: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig { enabled: false, secret: None, tolerance_secs: 300 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// sled page cache size. Default 32 MiB; kept small so a node's memory is predictable.
    pub cache_capacity_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { cache_capacity_mb: 32 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub sku: Sku,
    /// Title per language tag, e.g. `{ en = "Steam $20", "zh-CN" = "Steam 20 美元" }`. `en` required.
    pub title: BTreeMap<String, String>,
    /// Prices; the first is the default currency.
    pub prices: Vec<PriceConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Amount in the currency's minor unit (cents). Must be > 0.
    pub amount_minor: u64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: Currency,
}

/// An ISO 4217 currency code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        self.trust.grant_files.iter_mut().for_each(fix);
        if let Some(p) = self.http.tls_cert.as_mut() {
            fix(p);
        }
        if let Some(p) = self.http.tls_key.as_mut() {
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
    fn environment_overrides_secrets() {
        let mut config = check(&minimal()).unwrap();
        config.apply_env(|name| (name == ENV_SANDBOX_SECRET).then(|| "from-the-environment".to_string()));
        assert_eq!(config.payments.sandbox.secret.as_deref(), Some("from-the-environment"));
    }
}
