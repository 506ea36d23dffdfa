//! The join token: the one string an operator hands to a new node (pure, no I/O).
//!
//! `ecj1_` followed by base64url (no padding) of:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version (1) |
//! | 32 | the secret: 256 random bits, the token's only credential |
//! | 32 | SHA-256 of the coordinator CA certificate (DER) the node must find at the endpoint |
//! | 1 + n | the enrolment address (`ip:port`), UTF-8 |
//! | 1 + n | the TLS server name the endpoint's certificate carries, UTF-8 |
//!
//! and nothing after. The coordinator stores only [`TokenSecret::digest`], never the secret, so
//! a reader of its store cannot enrol a node.

use std::net::SocketAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// What every join token starts with.
pub const TOKEN_PREFIX: &str = "ecj1_";
const FORMAT_VERSION: u8 = 1;
/// Longest token accepted: the fields' limits (two names of at most 255 bytes) in base64.
pub const MAX_TOKEN_CHARS: usize = TOKEN_PREFIX.len() + (1usize + 32 + 32 + 2 * 256).div_ceil(3) * 4;
/// Domain tag of the stored digest, so the digest is of no use anywhere else.
const DIGEST_DOMAIN: &[u8] = b"edgecard join token v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a join token (it starts with {TOKEN_PREFIX})")]
    Prefix,
    #[error("join token is longer than {MAX_TOKEN_CHARS} characters")]
    TooLong,
    #[error("join token is not base64url")]
    Encoding,
    #[error("join token format {0} is not supported (this build reads format 1)")]
    Version(u8),
    #[error("join token is truncated or has trailing bytes")]
    Length,
    #[error("join token's {0} is invalid")]
    Field(&'static str),
}

/// The token's secret. Prints as `***`; compare digests, not secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret([u8; 32]);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(***)")
    }
}

impl TokenSecret {
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        TokenSecret(secret)
    }

    /// A secret from given bytes (tests and fuzz seeds; real secrets come from [`TokenSecret::generate`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TokenSecret(bytes)
    }

    /// What the coordinator stores and looks tokens up by.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::new().chain_update(DIGEST_DOMAIN).chain_update(self.0).finalize().into()
    }

    /// The secret as the enrolment request carries it (base64url).
    pub fn to_wire(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_wire(text: &str) -> Result<Self, TokenError> {
        if text.len() > 64 {
            return Err(TokenError::TooLong);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| TokenError::Encoding)?;
        bytes.try_into().map(TokenSecret).map_err(|_| TokenError::Length)
    }
}

/// SHA-256 of a certificate's DER: how a token names the CA.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// A decoded join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: TokenSecret,
    pub ca_fingerprint: [u8; 32],
    pub enrol_addr: SocketAddr,
    pub server_name: String,
}

impl JoinToken {
    pub fn encode(&self) -> Result<String, TokenError> {
        let addr = self.enrol_addr.to_string();
        check_server_name(&self.server_name)?;
        let mut bytes = Vec::with_capacity(67 + addr.len() + self.server_name.len());
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(&self.secret.0);
        bytes.extend_from_slice(&self.ca_fingerprint);
        for field in [addr.as_bytes(), self.server_name.as_bytes()] {
            // Both checked above to be at most 255 bytes (an address always is).
            bytes.push(u8::try_from(field.len()).map_err(|_| TokenError::Field("length"))?);
            bytes.extend_from_slice(field);
        }
        Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Reads a token as an operator pasted it (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLong);
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Encoding)?;
        let (&version, rest) = bytes.split_first().ok_or(TokenError::Length)?;
        if version != FORMAT_VERSION {
            return Err(TokenError::Version(version));
        }
        let (secret, rest) = take::<32>(rest)?;
        let (ca_fingerprint, rest) = take::<32>(rest)?;
        let (addr, rest) = take_field(rest)?;
        let (server_name, rest) = take_field(rest)?;
        if !rest.is_empty() {
            return Err(TokenError::Length);
        }
        let enrol_addr: SocketAddr = addr.parse().map_err(|_| TokenError::Field("enrolment address"))?;
        // Only the canonical spelling (`[2001:db8::1]`, not `[2001:DB8:0::1]`): one token, one string.
        if enrol_addr.to_string() != addr {
            return Err(TokenError::Field("enrolment address"));
        }
        check_server_name(server_name)?;
        Ok(JoinToken { secret: TokenSecret(secret), ca_fingerprint, enrol_addr, server_name: server_name.to_owned() })
    }
}

fn check_server_name(name: &str) -> Result<(), TokenError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if valid {
        Ok(())
    } else {
        Err(TokenError::Field("server name"))
    }
}

fn take<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), TokenError> {
    if bytes.len() < N {
        return Err(TokenError::Length);
    }
    let (head, rest) = bytes.split_at(N);
    let head: [u8; N] = head.try_into().map_err(|_| TokenError::Length)?;
    Ok((head, rest))
}

fn take_field(bytes: &[u8]) -> Result<(&str, &[u8]), TokenError> {
    let (&len, rest) = bytes.split_first().ok_or(TokenError::Length)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(TokenError::Length);
    }
    let (field, rest) = rest.split_at(len);
    let text = std::str::from_utf8(field).map_err(|_| TokenError::Field("text"))?;
    Ok((text, rest))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            secret: TokenSecret::generate(),
            ca_fingerprint: fingerprint(b"a CA certificate"),
            enrol_addr: "203.0.113.10:7443".parse().unwrap(),
            server_name: "coordinator.example".into(),
        }
    }

    #[test]
    fn tokens_round_trip() {
        let token = sample();
        let text = token.encode().unwrap();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert!(text.len() <= MAX_TOKEN_CHARS);
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), token);
        let v6 = JoinToken { enrol_addr: "[2001:db8::1]:7443".parse().unwrap(), ..sample() };
        assert_eq!(JoinToken::parse(&v6.encode().unwrap()).unwrap(), v6);
    }

    #[test]
    fn secrets_are_random_and_never_printed() {
        let (a, b) = (TokenSecret::generate(), TokenSecret::generate());
        assert_ne!(a, b);
        assert_ne!(a.digest(), b.digest());
        assert_eq!(TokenSecret::from_wire(&a.to_wire()).unwrap(), a);
        let token = JoinToken { secret: a.clone(), ..sample() };
        assert!(!format!("{token:?}").contains(&a.to_wire()));
        assert!(format!("{a:?}").contains("***"));
    }

    #[test]
    fn the_digest_is_domain_separated() {
        let secret = TokenSecret::generate();
        assert_ne!(secret.digest(), fingerprint(&secret.0), "a bare SHA-256 of the secret");
        assert_eq!(secret.digest(), secret.clone().digest());
    }

    #[test]
    fn malformed_tokens_are_refused_with_their_reason() {
        let text = sample().encode().unwrap();
        let body = URL_SAFE_NO_PAD.decode(&text[TOKEN_PREFIX.len()..]).unwrap();
        let reencode = |bytes: &[u8]| format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(JoinToken::parse("ecj2_AAAA"), Err(TokenError::Prefix));
        assert_eq!(JoinToken::parse("ecj1_!!!"), Err(TokenError::Encoding));
        assert_eq!(JoinToken::parse(&"x".repeat(MAX_TOKEN_CHARS + 1)), Err(TokenError::TooLong));
        assert_eq!(JoinToken::parse(&reencode(&body[..body.len() - 1])), Err(TokenError::Length));
        assert_eq!(JoinToken::parse(&reencode(&[body.as_slice(), b"x"].concat())), Err(TokenError::Length));
        assert_eq!(JoinToken::parse(&reencode(&body[..40])), Err(TokenError::Length));
        assert_eq!(JoinToken::parse(TOKEN_PREFIX), Err(TokenError::Length));
        let mut version = body.clone();
        version[0] = 2;
        assert_eq!(JoinToken::parse(&reencode(&version)), Err(TokenError::Version(2)));
        let mut addr = body.clone();
        addr[66] = b'x';
        assert_eq!(JoinToken::parse(&reencode(&addr)), Err(TokenError::Field("enrolment address")));
        assert!(JoinToken { server_name: "bad name".into(), ..sample() }.encode().is_err());
        // An address spelled otherwise than it is written back (found by the join_token fuzz target).
        let v6 = JoinToken { enrol_addr: "[2001:db8::1]:7443".parse().unwrap(), ..sample() }.encode().unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&v6[TOKEN_PREFIX.len()..]).unwrap();
        let at = bytes.windows(4).position(|w| w == b"2001").unwrap();
        bytes.splice(at..at + 4, b"200A".iter().copied());
        assert_eq!(JoinToken::parse(&reencode(&bytes)), Err(TokenError::Field("enrolment address")));
        assert!(TokenSecret::from_wire("short").is_err());
    }
}
