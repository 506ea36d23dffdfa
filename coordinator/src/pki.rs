//! The coordinator's private certificate authority for the sync link's mutual TLS.
//!
//! The CA issues two kinds of leaf certificates, each good for one direction only:
//!
//! - **node** certificates: client-auth only, naming the node as the DNS SAN
//!   `<node-id>.node.edgecard` and as the subject CN. The coordinator learns who is uploading
//!   from this SAN ([`node_id_from_cert`]); nothing the node sends can change it.
//! - **server** certificates: server-auth only, for the coordinator's QUIC endpoint, with IP SANs
//!   for names that parse as addresses and DNS SANs for the rest.
//!
//! Keys are ECDSA P-256 (ring). Certificates carry rcgen's default validity (no practical
//! expiry): a node loses access by revocation (see `quic::SyncHandler::is_revoked`), not by
//! expiry. The CA key never leaves the coordinator; [`IssuedCert`] and the CA do not print keys.

use edgecard_protocol::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The DNS suffix of a node's SAN: node `eu-1` is `eu-1.node.edgecard`.
pub const NODE_SAN_SUFFIX: &str = ".node.edgecard";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("CA certificate PEM: {0}")]
    CaCert(String),
    #[error("CA private key PEM: {0}")]
    CaKey(String),
    #[error("CA certificate and private key do not match")]
    KeyMismatch,
    #[error("invalid certificate name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("certificate is not valid DER X.509: {0}")]
    BadCertificate(String),
    #[error("certificate names no node (expected one DNS SAN `<node-id>{NODE_SAN_SUFFIX}`)")]
    NoNodeName,
    #[error("certificate names more than one node")]
    AmbiguousNodeName,
    #[error("certificate names an invalid node id: {0}")]
    BadNodeId(String),
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("the certificate is not the one asked for: {0}")]
    NotAsked(String),
}

/// A leaf certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// The private CA: its certificate and signing key.
pub struct CertificateAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The certificate as given (for a loaded CA) or generated: the bytes peers trust.
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("cert_pem", &self.cert_pem).field("key", &"<redacted>").finish()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh key, `name` as its CN.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        check_text_name(name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(CertificateAuthority { cert, key, cert_pem })
    }

    /// Loads a CA written by [`CertificateAuthority::cert_pem`] and [`CertificateAuthority::key_pem`]
    /// (or any CA certificate with its key). Certificates it issues chain to `cert_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::CaKey(e.to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| PkiError::CaCert(e.to_string()))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(PkiError::CaCert("not a CA certificate (basicConstraints CA:TRUE missing)".into()));
        }
        let der = first_pem_der(cert_pem).ok_or_else(|| PkiError::CaCert("no CERTIFICATE block".into()))?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| PkiError::CaCert(e.to_string()))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch);
        }
        // Re-signing the parsed parameters gives an issuer with the same subject and key
        // identifier as the certificate peers trust; only that certificate is ever handed out.
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { cert, key, cert_pem: cert_pem.to_owned() })
    }

    /// The CA certificate, PEM: what nodes and the coordinator pin as their only root.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PEM (PKCS#8). Keep it on the coordinator only.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A client certificate for `node`: client-auth only, DNS SAN `<node-id>.node.edgecard`,
    /// CN the node id.
    pub fn issue_node(&self, node: &NodeId) -> Result<IssuedCert, PkiError> {
        self.sign(node_params(node)?)
    }

    /// A client certificate for `node` on the public key of a certificate signing request (PEM),
    /// whose signature proves the requester holds the private key. Everything else the request
    /// asks for (names, usages, extensions) is ignored: the certificate is exactly what
    /// [`CertificateAuthority::issue_node`] makes. Only ECDSA P-256 keys are accepted.
    pub fn issue_node_from_csr(&self, node: &NodeId, csr_pem: &str) -> Result<String, PkiError> {
        let mut csr = parse_csr(csr_pem)?;
        csr.params = node_params(node)?;
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }

    /// A server certificate for the coordinator's sync endpoint: server-auth only. Names that
    /// parse as IP addresses become IP SANs, the rest DNS SANs; the first name is the CN.
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        let Some(first) = names.first() else {
            return Err(PkiError::BadName { name: String::new(), reason: "at least one name is required".into() });
        };
        for name in names {
            check_text_name(name)?;
        }
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| PkiError::BadName { name: names.join(","), reason: e.to_string() })?;
        params.distinguished_name = distinguished_name(first);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn node_params(node: &NodeId) -> Result<CertificateParams, PkiError> {
    node.validate().map_err(|e| PkiError::BadNodeId(e.to_string()))?;
    let san = format!("{node}{NODE_SAN_SUFFIX}");
    let mut params = CertificateParams::new(vec![san.clone()])
        .map_err(|e| PkiError::BadName { name: san, reason: e.to_string() })?;
    params.distinguished_name = distinguished_name(node.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Largest certificate signing request read (a P-256 request is about 500 bytes of PEM).
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;

/// Parses a PEM certificate signing request and checks its self-signature and key type.
pub fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(PkiError::BadCsr(format!("larger than {MAX_CSR_PEM_BYTES} bytes")));
    }
    // rcgen verifies the request's signature with its own key while parsing.
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadCsr(e.to_string()))?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::BadCsr("the key must be ECDSA P-256".into()));
    }
    Ok(csr)
}

/// What a node checks of the certificate it got back from enrolment: it parses, it is signed
/// by `ca_cert_pem`'s key, it names exactly one node, and it certifies `public_key_der` (the
/// SubjectPublicKeyInfo of the key the node made). Returns the node it names.
pub fn check_node_cert(cert_pem: &str, ca_cert_pem: &str, public_key_der: &[u8]) -> Result<NodeId, PkiError> {
    let cert_der = first_pem_der(cert_pem).ok_or_else(|| PkiError::BadCertificate("no CERTIFICATE block".into()))?;
    let ca_der = first_pem_der(ca_cert_pem).ok_or_else(|| PkiError::CaCert("no CERTIFICATE block".into()))?;
    let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| PkiError::CaCert(e.to_string()))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| PkiError::NotAsked("it is not signed by the coordinator's CA".into()))?;
    if cert.public_key().raw != public_key_der {
        return Err(PkiError::NotAsked("it certifies another key than the one this node made".into()));
    }
    node_id_from_cert(&cert_der)
}

/// The DER of the first CERTIFICATE block of `pem`.
pub fn certificate_der(pem: &str) -> Option<Vec<u8>> {
    first_pem_der(pem)
}

/// The node a (DER) client certificate was issued to, from its one DNS SAN
/// `<node-id>.node.edgecard`. Call it only on a certificate the TLS layer has verified against
/// the CA; this function checks names, not signatures.
pub fn node_id_from_cert(der: &[u8]) -> Result<NodeId, PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut found: Option<NodeId> = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        let GeneralName::DNSName(dns) = name else { continue };
        let Some(label) = dns.strip_suffix(NODE_SAN_SUFFIX) else { continue };
        let node = NodeId::new(label).map_err(|e| PkiError::BadNodeId(e.to_string()))?;
        if found.is_some() {
            return Err(PkiError::AmbiguousNodeName);
        }
        found = Some(node);
    }
    found.ok_or(PkiError::NoNodeName)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Edgecard");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn check_text_name(name: &str) -> Result<(), PkiError> {
    if name.trim().is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
        return Err(PkiError::BadName {
            name: name.to_owned(),
            reason: "must be 1 to 253 bytes without control characters".into(),
        });
    }
    Ok(())
}

/// The DER bytes of the first CERTIFICATE block of a PEM document.
fn first_pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok().map(|der| der.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    #[test]
    fn node_certificates_name_their_node() {
        let ca = CertificateAuthority::generate("Edgecard test CA").unwrap();
        let node = NodeId::new("eu-1").unwrap();
        let issued = ca.issue_node(&node).unwrap();
        assert_eq!(node_id_from_cert(&der(&issued.cert_pem)).unwrap(), node);
        assert!(!format!("{issued:?}").contains(&issued.key_pem));
        assert!(!format!("{ca:?}").contains(&ca.key_pem()));
    }

    #[test]
    fn server_certificates_name_no_node() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let issued = ca.issue_server(&["127.0.0.1".into(), "coordinator.example".into()]).unwrap();
        assert!(matches!(node_id_from_cert(&der(&issued.cert_pem)), Err(PkiError::NoNodeName)));
        let bytes = der(&issued.cert_pem);
        assert!(bytes.windows(6).any(|w| w == [0x87, 4, 127, 0, 0, 1]), "IP SAN");
        assert!(ca.issue_server(&[]).is_err());
        assert!(ca.issue_server(&["bad\nname".into()]).is_err());
    }

    #[test]
    fn reloaded_ca_issues_certificates_that_chain_to_the_same_root() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let loaded = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let leaf = loaded.issue_node(&NodeId::new("us-1").unwrap()).unwrap();
        let leaf_der = der(&leaf.cert_pem);
        let (_, leaf_cert) = X509Certificate::from_der(&leaf_der).unwrap();
        let ca_der = der(&ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        assert_eq!(leaf_cert.issuer(), ca_cert.subject());
        leaf_cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn bad_ca_material_is_an_error() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let other = CertificateAuthority::generate("other").unwrap();
        assert!(matches!(CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()), Err(PkiError::KeyMismatch)));
        assert!(CertificateAuthority::from_pem("", &ca.key_pem()).is_err());
        assert!(CertificateAuthority::from_pem(&ca.cert_pem(), "garbage").is_err());
        let leaf = ca.issue_node(&NodeId::new("eu-1").unwrap()).unwrap();
        assert!(CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).is_err(), "a leaf is no CA");
        assert!(CertificateAuthority::generate("").is_err());
    }

    fn csr_for(key: &KeyPair, names: Vec<String>) -> String {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = distinguished_name("someone-else");
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn certificates_from_requests_name_the_given_node_and_the_requesters_key() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let key = KeyPair::generate().unwrap();
        // The request asks for a server certificate of another node: ignored.
        let csr = csr_for(&key, vec!["us-9.node.edgecard".into(), "coordinator.example".into()]);
        let node = NodeId::new("eu-1").unwrap();
        let cert_pem = ca.issue_node_from_csr(&node, &csr).unwrap();
        assert_eq!(check_node_cert(&cert_pem, &ca.cert_pem(), &key.public_key_der()).unwrap(), node);
        let der = certificate_der(&cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth, "client-auth only");
        assert!(!cert.is_ca());
        // Another key, another CA: refused.
        let other_key = KeyPair::generate().unwrap();
        assert!(check_node_cert(&cert_pem, &ca.cert_pem(), &other_key.public_key_der()).is_err());
        let other_ca = CertificateAuthority::generate("other").unwrap();
        assert!(check_node_cert(&cert_pem, &other_ca.cert_pem(), &key.public_key_der()).is_err());
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let node = NodeId::new("eu-1").unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&key, vec![]);
        for bad in ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
            assert!(matches!(ca.issue_node_from_csr(&node, bad), Err(PkiError::BadCsr(_))), "{bad:?}");
        }
        // A request whose signature does not match its key (a byte of the signature flipped).
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap().as_ref().to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let forged = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        assert!(matches!(ca.issue_node_from_csr(&node, &forged), Err(PkiError::BadCsr(_))));
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(ca.issue_node_from_csr(&node, &csr_for(&ed25519, vec![])), Err(PkiError::BadCsr(_))));
        assert!(matches!(ca.issue_node_from_csr(&node, &"A".repeat(MAX_CSR_PEM_BYTES + 1)), Err(PkiError::BadCsr(_))));
        assert!(ca.issue_node_from_csr(&node, &csr).is_ok());
    }

    #[test]
    fn garbage_certificates_are_errors_not_panics() {
        for input in [&b""[..], b"\x30", b"\x30\x82\xff\xff", b"random bytes that are not DER"] {
            assert!(node_id_from_cert(input).is_err());
        }
    }
}
