//! TLS for the node's HTTPS listener: the one crypto provider, server configs from PEM, and
//! self-signed certificates for the demo and tests.
//!
//! The whole binary uses a single rustls crypto provider, `ring` (see DESIGN.md, "Crypto").
//! Configs built here name that provider explicitly, so they work whether or not
//! [`install_crypto_provider`] ran first; call it at start anyway, for code that relies on the
//! process default (quinn, client builders).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols offered by the HTTPS listener, most preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Errors from loading or generating TLS material. Bad input never panics.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name}: invalid PEM: {reason}")]
    Pem { source_name: String, reason: String },
    #[error("{source_name}: no CERTIFICATE block found")]
    NoCertificate { source_name: String },
    #[error("{source_name}: no private key block found (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")]
    NoPrivateKey { source_name: String },
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{source_name}: the certificate does not parse: {reason}")]
    Certificate { source_name: String, reason: String },
}

/// The crypto provider of the whole binary.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process-wide rustls crypto provider. Idempotent: a provider already
/// installed (by an earlier call) is left in place.
pub fn install_crypto_provider() {
    // `Err` only means a default is already installed; only ring is compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a server config from a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1), offering ALPN `h2` and `http/1.1`.
pub fn server_config_from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    build_server_config(cert_chain_pem, "certificate chain PEM", key_pem, "private key PEM")
}

/// Reads a PEM certificate chain and private key from disk and builds a server config as
/// [`server_config_from_pem`] does. Errors name the file at fault.
pub fn load_server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_pem = read_file(cert_path)?;
    let key_pem = read_file(key_path)?;
    build_server_config(&cert_pem, &cert_path.display().to_string(), &key_pem, &key_path.display().to_string())
}

/// Checks a configured certificate chain and key the way the server will use them (both parse,
/// the key belongs to the leaf certificate) and returns when the leaf expires, in unix seconds.
pub fn check_server_files(cert_path: &Path, key_path: &Path) -> Result<i64, TlsError> {
    load_server_config(cert_path, key_path)?;
    leaf_not_after(&read_file(cert_path)?, &cert_path.display().to_string())
}

/// When the first certificate of a PEM chain stops being valid, in unix seconds.
pub fn leaf_not_after(pem: &[u8], source_name: &str) -> Result<i64, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs = parse_certificates(pem, source_name)?;
    let leaf = certs.first().ok_or_else(|| TlsError::NoCertificate { source_name: source_name.to_owned() })?;
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| TlsError::Certificate { source_name: source_name.to_owned(), reason: e.to_string() })?;
    Ok(parsed.validity().not_after.timestamp())
}

/// A self-signed certificate and its private key, both PEM.
#[derive(Clone)]
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// Generates a self-signed ECDSA P-256 certificate for the given names. Names that parse as IP
/// addresses become IP SANs, the rest DNS SANs.
pub fn self_signed(subject_alt_names: &[String]) -> Result<SelfSigned, TlsError> {
    let certified = rcgen::generate_simple_self_signed(subject_alt_names.to_vec())?;
    Ok(SelfSigned { cert_pem: certified.cert.pem(), key_pem: certified.key_pair.serialize_pem() })
}

/// Parses every CERTIFICATE block of a PEM document; at least one is required.
pub fn parse_certificates(pem: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { source_name: source_name.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { source_name: source_name.to_owned() });
    }
    Ok(certs)
}

/// Parses the first private key block of a PEM document.
pub fn parse_private_key(pem: &[u8], source_name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey { source_name: source_name.to_owned() },
        other => TlsError::Pem { source_name: source_name.to_owned(), reason: other.to_string() },
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

fn build_server_config(
    cert_chain_pem: &[u8],
    cert_name: &str,
    key_pem: &[u8],
    key_name: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = parse_certificates(cert_chain_pem, cert_name)?;
    let key = parse_private_key(key_pem, key_name)?;
    let config_error = |source| TlsError::Config { cert: cert_name.to_owned(), key: key_name.to_owned(), source };
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(config_error)?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()]
    }

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }

    #[test]
    fn self_signed_round_trips_into_a_server_config() {
        let ss = self_signed(&names()).unwrap();
        assert!(ss.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(ss.key_pem.contains("PRIVATE KEY"));
        let config = server_config_from_pem(ss.cert_pem.as_bytes(), ss.key_pem.as_bytes()).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(!format!("{ss:?}").contains(&ss.key_pem));
    }

    #[test]
    fn ip_names_become_ip_sans() {
        let ss = self_signed(&names()).unwrap();
        let der = parse_certificates(ss.cert_pem.as_bytes(), "test").unwrap();
        // An IP SAN is GeneralName context tag [7] with the raw address octets.
        let bytes = der[0].as_ref();
        assert!(bytes.windows(6).any(|w| w == [0x87, 4, 127, 0, 0, 1]));
        let mut v6 = vec![0x87, 16];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        assert!(bytes.windows(18).any(|w| w == v6.as_slice()));
        // "localhost" is a DNS name: context tag [2].
        assert!(bytes.windows(11).any(|w| w == b"\x82\x09localhost"));
    }

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        let ss = self_signed(&names()).unwrap();
        let cert = ss.cert_pem.as_bytes();
        let key = ss.key_pem.as_bytes();

        let inputs: Vec<(&[u8], &[u8])> = vec![
            (b"", key),
            (cert, b""),
            (b"not pem at all", key),
            (cert, b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n"),
            (b"-----BEGIN CERTIFICATE-----\nAAAA\n", key),
            (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", key),
            (key, cert),
        ];
        for (c, k) in inputs {
            assert!(server_config_from_pem(c, k).is_err());
        }
        assert!(matches!(server_config_from_pem(b"", key), Err(TlsError::NoCertificate { .. })));
        assert!(matches!(server_config_from_pem(cert, b""), Err(TlsError::NoPrivateKey { .. })));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let a = self_signed(&names()).unwrap();
        let b = self_signed(&names()).unwrap();
        let err = server_config_from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::Config { .. }), "{err}");
    }

    #[test]
    fn load_from_files_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ss = self_signed(&names()).unwrap();
        let cert_path = dir.path().join("node.crt");
        let key_path = dir.path().join("node.key");
        std::fs::write(&cert_path, &ss.cert_pem).unwrap();
        std::fs::write(&key_path, &ss.key_pem).unwrap();
        load_server_config(&cert_path, &key_path).unwrap();

        let missing = dir.path().join("missing.key");
        let err = load_server_config(&cert_path, &missing).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");

        std::fs::write(&key_path, "garbage").unwrap();
        let err = load_server_config(&cert_path, &key_path).unwrap_err();
        assert!(err.to_string().contains("node.key"), "{err}");
    }
}
