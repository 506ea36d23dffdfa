//! `edgecard node enrol`: a node joins a coordinator with a join token, making its own key.
//!
//! The key pair is made here and never leaves this machine: only a certificate signing request
//! goes to the coordinator's enrolment endpoint, over TLS verified against the CA the token
//! pins (by SHA-256; no other roots). The certificate that comes back must be signed by that
//! CA, certify this key and name one node; only then are the key (0600), the certificates and
//! `node.toml` written. Any failure writes nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgecard_coordinator::enrol::server::ENROL_PATH;
use edgecard_coordinator::enrol::token::{fingerprint, JoinToken};
use edgecard_coordinator::pki::{certificate_der, check_node_cert};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use serde_json::json;

use crate::https_client::{Endpoint, Request};

/// Environment variable that can carry the join token instead of the command line.
pub const ENV_JOIN_TOKEN: &str = "EDGECARD_JOIN_TOKEN";
/// Bound on the whole enrolment exchange.
const ENROL_TIMEOUT: Duration = Duration::from_secs(30);
/// What an enrolment writes; a directory holding any of them already holds a node.
const NODE_FILES: [&str; 4] = ["node.toml", "node-key.pem", "node-cert.pem", "ca-cert.pem"];

#[derive(Args, Debug)]
pub struct EnrolArgs {
    /// The join token `edgecard nodes add` printed (env EDGECARD_JOIN_TOKEN).
    #[arg(long, env = ENV_JOIN_TOKEN, hide_env_values = true)]
    pub join_token: String,
    /// The coordinator's enrolment address, IP:PORT (default: the one in the token).
    #[arg(long)]
    pub coordinator: Option<SocketAddr>,
    /// Directory for the key, certificates and node.toml; must not hold a node yet.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// The enrolment endpoint's answer.
#[derive(Debug, Deserialize)]
struct Enrolled {
    node_id: String,
    region: String,
    node_cert_pem: String,
    ca_cert_pem: String,
    coordinator_key: String,
    coordinator_addr: String,
    coordinator_server_name: String,
}

#[derive(Debug, Deserialize)]
struct Refused {
    error: RefusedDetail,
}

#[derive(Debug, Deserialize)]
struct RefusedDetail {
    code: String,
    message: String,
}

pub async fn run(args: EnrolArgs) -> Result<()> {
    let config = enrol(&args).await?;
    println!("node enrolled; its key, certificate and config are in {}", args.dir.display());
    println!("start it with: edgecard node run --config {}", config.display());
    Ok(())
}

/// Enrols and writes the node's files; returns the path of node.toml.
pub async fn enrol(args: &EnrolArgs) -> Result<PathBuf> {
    edgecard_node::tls::install_crypto_provider();
    let token = JoinToken::parse(&args.join_token).context("--join-token")?;
    check_dir_is_free(&args.dir)?;
    let key = rcgen::KeyPair::generate().context("making the node's key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).context("building the signing request")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr_pem =
        params.serialize_request(&key).and_then(|csr| csr.pem()).context("building the certificate signing request")?;

    let addr = args.coordinator.unwrap_or(token.enrol_addr);
    let verifier =
        Arc::new(PinnedCa { fingerprint: token.ca_fingerprint, provider: edgecard_node::tls::crypto_provider() });
    let tls = rustls::ClientConfig::builder_with_provider(edgecard_node::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let endpoint =
        Endpoint::parse_with_tls(&format!("https://{addr}"), tls, &token.server_name)?.with_timeout(ENROL_TIMEOUT);
    let request = Request::post_json(ENROL_PATH, &json!({ "csr_pem": csr_pem }))
        .header("authorization", &format!("Bearer {}", token.secret.to_wire()));
    let response = endpoint.request(request).await.with_context(|| format!("enrolling at {addr}"))?;
    if !response.is_success() {
        match response.json::<Refused>() {
            Ok(refused) => bail!("enrolment refused ({}): {}", refused.error.code, refused.error.message),
            Err(_) => bail!("enrolment refused with status {}", response.status),
        }
    }
    let enrolled: Enrolled = response.json().context("the enrolment answer")?;

    // The answer came over the pinned channel; check it all the same before trusting it.
    let ca_der = certificate_der(&enrolled.ca_cert_pem).context("the coordinator's CA certificate does not parse")?;
    if fingerprint(&ca_der) != token.ca_fingerprint {
        bail!("the coordinator sent a CA certificate that is not the one the join token pins");
    }
    let node = check_node_cert(&enrolled.node_cert_pem, &enrolled.ca_cert_pem, &key.public_key_der())
        .context("the certificate the coordinator issued")?;
    if node.as_str() != enrolled.node_id {
        bail!("the certificate names node {node}, the answer {}", enrolled.node_id);
    }
    let bundle = json!({
        "node_id": enrolled.node_id,
        "region": enrolled.region,
        "node_cert_pem": enrolled.node_cert_pem,
        "node_key_pem": key.serialize_pem(),
        "ca_cert_pem": enrolled.ca_cert_pem,
        "coordinator_key": enrolled.coordinator_key,
        "coordinator_addr": enrolled.coordinator_addr,
        "coordinator_server_name": enrolled.coordinator_server_name,
    });
    crate::ops::write_bundle(&args.dir, &bundle)
}

fn check_dir_is_free(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if let Some(found) = NODE_FILES.iter().map(|name| dir.join(name)).find(|path| path.exists()) {
        bail!("{} already exists: {} holds a node; enrol into an empty directory", found.display(), dir.display());
    }
    Ok(())
}

/// Accepts the server only if its chain carries the CA whose SHA-256 the join token pins and
/// its certificate verifies under that CA alone, for the token's server name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|cert| fingerprint(cert.as_ref()) == self.fingerprint) else {
            return Err(rustls::Error::General(
                "the coordinator's CA is not the one the join token pins; nothing was sent".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
