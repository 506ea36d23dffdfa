//! Text forms of the grant signing and verifying keys.
//!
//! The signing key lives in a file on the coordinator; the verifying key is
//! pasted into node config. A versioned prefix on the signing key makes a
//! mixed-up file (a TLS key, a verifying key) fail loudly instead of being
//! read as 32 random bytes.

use ed25519_dalek::{SigningKey, VerifyingKey};

pub const SIGNING_KEY_PREFIX: &str = "edgecard-grant-signing-key-v1:";

/// Why a key text was refused. Never includes the key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("not an edgecard grant signing key: expected it to start with {SIGNING_KEY_PREFIX:?}")]
    WrongPrefix,
    #[error("{what} must be {expected} hex characters, found {found}")]
    BadLength { what: &'static str, expected: usize, found: usize },
    #[error("{what} is not valid hex")]
    BadHex { what: &'static str },
    #[error("verifying key is not a valid ed25519 point")]
    InvalidPoint,
    #[error("verifying key is a weak (small-order) point")]
    WeakKey,
}

fn decode_32(what: &'static str, s: &str) -> Result<[u8; 32], KeyFileError> {
    if s.len() != 64 {
        return Err(KeyFileError::BadLength { what, expected: 64, found: s.chars().count() });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyFileError::BadHex { what })?;
    Ok(out)
}

/// `edgecard-grant-signing-key-v1:<64 hex>\n`
pub fn encode_signing_key(key: &SigningKey) -> String {
    format!("{SIGNING_KEY_PREFIX}{}\n", hex::encode(key.to_bytes()))
}

pub fn decode_signing_key(text: &str) -> Result<SigningKey, KeyFileError> {
    let body = text.trim().strip_prefix(SIGNING_KEY_PREFIX).ok_or(KeyFileError::WrongPrefix)?;
    let mut bytes = decode_32("signing key", body)?;
    let key = SigningKey::from_bytes(&bytes);
    bytes.fill(0);
    Ok(key)
}

/// 64 lowercase hex characters, no prefix, so it fits on one config line.
pub fn encode_verifying_key(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

pub fn decode_verifying_key(text: &str) -> Result<VerifyingKey, KeyFileError> {
    let text = text.trim();
    if text.starts_with(SIGNING_KEY_PREFIX) {
        // Someone pasted the private key where the public one belongs; say so
        // without echoing it.
        return Err(KeyFileError::BadLength {
            what: "verifying key (this looks like the signing key)",
            expected: 64,
            found: text.chars().count(),
        });
    }
    let bytes = decode_32("verifying key", text)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyFileError::InvalidPoint)?;
    if key.is_weak() {
        return Err(KeyFileError::WeakKey);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signing_key_round_trip() {
        let k = SigningKey::from_bytes(&[7; 32]);
        let text = encode_signing_key(&k);
        assert!(text.starts_with(SIGNING_KEY_PREFIX));
        assert!(text.ends_with('\n'));
        assert_eq!(text.len(), SIGNING_KEY_PREFIX.len() + 64 + 1);
        assert_eq!(decode_signing_key(&text).unwrap().to_bytes(), k.to_bytes());
        let padded = format!("  \n{}\r\n\n", text.trim());
        assert_eq!(decode_signing_key(&padded).unwrap().to_bytes(), k.to_bytes());
    }

    #[test]
    fn signing_key_errors() {
        let k = SigningKey::from_bytes(&[7; 32]);
        let text = encode_signing_key(&k);
        let hexpart = &text.trim()[SIGNING_KEY_PREFIX.len()..];
        assert_eq!(decode_signing_key(hexpart), Err(KeyFileError::WrongPrefix));
        assert_eq!(
            decode_signing_key(&format!("edgecard-grant-signing-key-v2:{hexpart}")),
            Err(KeyFileError::WrongPrefix)
        );
        assert!(matches!(
            decode_signing_key(&format!("{SIGNING_KEY_PREFIX}{}", &hexpart[..62])),
            Err(KeyFileError::BadLength { found: 62, .. })
        ));
        let bad = format!("{SIGNING_KEY_PREFIX}{}zz", &hexpart[..62]);
        let err = decode_signing_key(&bad).unwrap_err();
        assert!(matches!(err, KeyFileError::BadHex { .. }));
        assert!(!err.to_string().contains(&hexpart[..62]));
        // Multi-byte junk of 64 bytes must not panic on a char boundary.
        let junk = format!("{SIGNING_KEY_PREFIX}{}", "é".repeat(32));
        assert!(decode_signing_key(&junk).is_err());
    }

    #[test]
    fn verifying_key_round_trip() {
        let vk = SigningKey::from_bytes(&[9; 32]).verifying_key();
        let text = encode_verifying_key(&vk);
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(decode_verifying_key(&text).unwrap(), vk);
        assert_eq!(decode_verifying_key(&format!(" {text}\n")).unwrap(), vk);
    }

    #[test]
    fn verifying_key_errors() {
        assert!(matches!(decode_verifying_key("abcd"), Err(KeyFileError::BadLength { found: 4, .. })));
        assert!(matches!(decode_verifying_key(&"g".repeat(64)), Err(KeyFileError::BadHex { .. })));
        // The identity point (y = 1) is small-order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(decode_verifying_key(&hex::encode(identity)), Err(KeyFileError::WeakKey));
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(decode_verifying_key(&hex::encode(off_curve)), Err(KeyFileError::InvalidPoint));
        let sk = encode_signing_key(&SigningKey::from_bytes(&[1; 32]));
        let err = decode_verifying_key(&sk).unwrap_err();
        assert!(err.to_string().contains("signing key"));
        assert!(!err.to_string().contains(&sk.trim()[SIGNING_KEY_PREFIX.len()..]));
    }
}
