//! Sending one message over SMTP (lettre on tokio, rustls with the ring provider).
//!
//! Failures come back as a [`SendFailure`]: a class and whether trying again may help, never the
//! server's text (a refusal often quotes the recipient's address).

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{MailConfig, SmtpTls};

/// A message ready to go.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// Stable per (order, kind): a resend carries the same one, so it reads as the same mail.
    pub message_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// `address`, `connect`, `timeout`, `tls`, `smtp 451`, …: safe to log and to store.
    pub class: String,
    /// Whether a later attempt may succeed (a 5xx refusal will not).
    pub transient: bool,
}

pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// Bound on a whole conversation: lettre's own timeout covers only the TCP connect, and a
    /// server that accepts and then says nothing would hold the worker for good.
    timeout: Duration,
}

impl std::fmt::Debug for SmtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSender").finish_non_exhaustive()
    }
}

impl SmtpSender {
    pub fn new(config: &MailConfig) -> Result<Self, String> {
        let from: Mailbox =
            config.from.parse().map_err(|_| format!("mail.from: not a mail address: {:?}", config.from))?;
        // Web PKI roots, plus the private relay's CA when one is configured.
        let extra_root = match &config.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("mail.ca_file {}: {e}", path.display()))?;
                Some(Certificate::from_pem(&pem).map_err(|e| format!("mail.ca_file {}: {e}", path.display()))?)
            }
            None => None,
        };
        let tls_parameters = || {
            let mut builder = TlsParameters::builder(config.smtp_host.clone());
            if let Some(root) = &extra_root {
                builder = builder.add_root_certificate(root.clone());
            }
            builder.build().map_err(|e| format!("mail: TLS parameters: {e}"))
        };
        let tls = match config.tls {
            SmtpTls::Starttls => Tls::Required(tls_parameters()?),
            SmtpTls::Wrapper => Tls::Wrapper(tls_parameters()?),
            SmtpTls::None => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.smtp_host.clone())
            .port(config.smtp_port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(config.timeout_secs)));
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(SmtpSender { transport: builder.build(), from, timeout: Duration::from_secs(config.timeout_secs) })
    }

    /// The domain of the sender's address, for Message-IDs.
    pub fn from_domain(&self) -> String {
        self.from.email.domain().to_string()
    }

    pub async fn send(&self, mail: &Outgoing) -> Result<(), SendFailure> {
        let permanent = |class: &str| SendFailure { class: class.into(), transient: false };
        let to: Mailbox = mail.to.parse().map_err(|_| permanent("address"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .message_id(Some(mail.message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|_| permanent("message"))?;
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(sent) => sent.map(|_| ()).map_err(|e| classify(&e)),
            Err(_) => Err(SendFailure { class: "timeout".into(), transient: true }),
        }
    }
}

fn classify(e: &lettre::transport::smtp::Error) -> SendFailure {
    if let Some(code) = e.status() {
        return SendFailure { class: format!("smtp {code}"), transient: !e.is_permanent() };
    }
    let class = if e.is_timeout() {
        "timeout"
    } else if e.is_tls() {
        "tls"
    } else if e.is_client() {
        "client"
    } else if e.is_response() {
        "response"
    } else {
        "connect"
    };
    SendFailure { class: class.into(), transient: true }
}
