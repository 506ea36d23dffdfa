//! A real SMTP server process (Python's aiosmtpd, installed by `.ci/install-tools`) on loopback,
//! and what it received.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct SmtpSink {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// One message the server took (or refused).
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub message_id: String,
    pub body: String,
    /// Whether the session was upgraded with STARTTLS.
    pub tls: bool,
}

impl Received {
    fn read(path: &std::path::Path) -> Received {
        let value: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let text = |k: &str| value[k].as_str().unwrap_or_default().to_string();
        Received {
            from: text("from"),
            to: value["to"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect(),
            subject: text("subject"),
            message_id: text("message_id"),
            body: text("body"),
            tls: value["tls"].as_bool().unwrap_or(false),
        }
    }

    /// The first `https://…` URL in the body.
    pub fn link(&self) -> String {
        self.body
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .unwrap_or_else(|| panic!("no link in {}", self.body))
            .to_string()
    }
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        Self::spawn(false)
    }

    /// A server that offers STARTTLS (a certificate for 127.0.0.1 from [`SmtpSink::ca_pem`]) and
    /// takes no mail before it.
    pub fn start_tls() -> SmtpSink {
        Self::spawn(true)
    }

    /// The certificate a TLS sink presents (self-signed: it is its own CA).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn spawn(tls: bool) -> SmtpSink {
        let dir = tempfile::tempdir().unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/common/smtp_sink.py");
        let mut command = Command::new("python3");
        command.arg(&script).arg(dir.path());
        if tls {
            let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert, certified.cert.pem()).unwrap();
            std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
            command.arg(&cert).arg(&key);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 {}: {e}", script.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!("the SMTP sink did not start (is aiosmtpd installed? run .ci/install-tools): {line:?}")
        });
        SmtpSink { child, port, dir }
    }

    /// The `[mail]` section of a node sending to this server (plain SMTP: loopback only).
    pub fn mail_toml(&self, extra: &str) -> String {
        format!(
            "[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\ntls = \"none\"\nfrom = \"Shop <orders@shop.example>\"\nshop_name = \"Test shop\"\npoll_ms = 100\nfirst_retry_secs = 1\nmax_retry_secs = 1\n{extra}\n",
            self.port
        )
    }

    /// Refuses the next `n` messages with a 451.
    pub fn fail_next(&self, n: u32) {
        std::fs::write(self.dir.path().join("fail"), n.to_string()).unwrap();
    }

    fn files(&self, refused: bool) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.ends_with(".json") && !name.starts_with('.') && name.starts_with("refused-") == refused
            })
            .collect();
        names.sort();
        names.iter().map(|p| Received::read(p)).collect()
    }

    pub fn received(&self) -> Vec<Received> {
        self.files(false)
    }

    pub fn refused(&self) -> Vec<Received> {
        self.files(true)
    }

    /// Waits (at most `limit`) until at least `n` messages arrived; returns them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(start.elapsed() < limit, "{} of {n} mails arrived within {limit:?}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
