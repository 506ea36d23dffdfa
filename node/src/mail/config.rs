//! `[mail]` in `node.toml` (documented in docs/node-config.md). Absent: no mail is queued or sent.

use serde::{Deserialize, Serialize};

/// Overrides `mail.password`, so the SMTP password need not sit in the file.
pub const ENV_SMTP_PASSWORD: &str = "EDGECARD_NODE_SMTP_PASSWORD";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS; the server must offer it and its certificate must
    /// verify against the web PKI roots.
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Wrapper,
    /// No TLS at all: loopback labs and tests only (refused for any other host).
    None,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// SMTP server host name. Required.
    pub smtp_host: String,
    /// Default 587.
    #[serde(default = "default_port")]
    pub smtp_port: u16,
    /// Default `starttls`.
    #[serde(default = "default_tls")]
    pub tls: SmtpTls,
    /// Extra root certificate(s), PEM, trusted beside the web PKI roots: a private relay's CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// SMTP AUTH user and password; both or neither (the password also from
    /// `EDGECARD_NODE_SMTP_PASSWORD`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, serialize_with = "crate::config::redact")]
    pub password: Option<String>,
    /// The sender, `Name <address>` or `address`. Required.
    pub from: String,
    /// The shop's name in subjects and greetings. Default "Edgecard shop".
    #[serde(default = "default_shop_name")]
    pub shop_name: String,
    /// The merchant's opt-in to mailing the keys themselves once an order is delivered. Default
    /// false: the mail carries only the order link.
    #[serde(default)]
    pub include_keys: bool,
    /// How long the link in a mail opens its order, counted from the order's creation. Default 30.
    #[serde(default = "default_link_ttl_days")]
    pub link_ttl_days: u64,
    /// How long the buyer's address is kept after the order's mails are done (sent, failed or
    /// cancelled); then it is erased from the order and the queue record dropped. Default 30.
    #[serde(default = "default_keep_email_days")]
    pub keep_email_days: u64,
    /// SMTP attempts per mail before it is marked failed. Default 10.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Pause after the first failed attempt; doubles per failure up to `max_retry_secs`.
    /// Defaults 30 and 3600.
    #[serde(default = "default_first_retry_secs")]
    pub first_retry_secs: u64,
    #[serde(default = "default_max_retry_secs")]
    pub max_retry_secs: u64,
    /// How often the queue is looked at, in milliseconds. Default 2000.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Bound on one SMTP conversation, in seconds. Default 30.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Language of mails for orders made through the JSON API (`en` or `zh-CN`); storefront
    /// orders get the page's language. Default `en`.
    #[serde(default = "default_language")]
    pub default_language: String,
}

impl std::fmt::Debug for MailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("from", &self.from)
            .field("include_keys", &self.include_keys)
            .finish_non_exhaustive()
    }
}

fn default_port() -> u16 {
    587
}
fn default_tls() -> SmtpTls {
    SmtpTls::Starttls
}
fn default_shop_name() -> String {
    "Edgecard shop".into()
}
fn default_link_ttl_days() -> u64 {
    30
}
fn default_keep_email_days() -> u64 {
    30
}
fn default_max_attempts() -> u32 {
    10
}
fn default_first_retry_secs() -> u64 {
    30
}
fn default_max_retry_secs() -> u64 {
    3600
}
fn default_poll_ms() -> u64 {
    2000
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_language() -> String {
    "en".into()
}

impl MailConfig {
    /// Checks the settings; the error names the field (`mail.` is added by the caller).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.smtp_host.trim().is_empty() {
            return Err(("smtp_host", "must not be empty".into()));
        }
        if self.tls == SmtpTls::None && !is_loopback_host(&self.smtp_host) {
            return Err((
                "tls",
                format!("\"none\" is for loopback lab servers only; {:?} needs starttls or wrapper", self.smtp_host),
            ));
        }
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(("from", format!("not a mail address: {:?}", self.from)));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(("username", "username and password must be set together".into()));
        }
        if self.link_ttl_days == 0 || self.link_ttl_days > 366 {
            return Err(("link_ttl_days", "must be between 1 and 366".into()));
        }
        if self.keep_email_days > 3650 {
            return Err(("keep_email_days", "must be at most 3650".into()));
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(("max_attempts", "must be between 1 and 100".into()));
        }
        if self.first_retry_secs == 0 || self.max_retry_secs < self.first_retry_secs {
            return Err(("first_retry_secs", "must be at least 1 and at most max_retry_secs".into()));
        }
        if self.poll_ms == 0 || self.poll_ms > 600_000 {
            return Err(("poll_ms", "must be between 1 and 600000".into()));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 600 {
            return Err(("timeout_secs", "must be between 1 and 600".into()));
        }
        if !matches!(self.default_language.as_str(), "en" | "zh-CN") {
            return Err(("default_language", "must be \"en\" or \"zh-CN\"".into()));
        }
        Ok(())
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> MailConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn plain_smtp_is_refused_beyond_loopback() {
        let lab = config("smtp_host = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"shop@example.com\"");
        assert_eq!(lab.validate(), Ok(()));
        let remote = config("smtp_host = \"smtp.example.com\"\ntls = \"none\"\nfrom = \"shop@example.com\"");
        assert_eq!(remote.validate().map_err(|(field, _)| field), Err("tls"));
        let default = config("smtp_host = \"smtp.example.com\"\nfrom = \"Shop <shop@example.com>\"");
        assert_eq!(default.tls, SmtpTls::Starttls);
        assert_eq!(default.validate(), Ok(()));
    }

    #[test]
    fn a_bad_sender_is_named() {
        let bad = config("smtp_host = \"localhost\"\nfrom = \"not an address\"");
        assert_eq!(bad.validate().map_err(|(field, _)| field), Err("from"));
    }
}
