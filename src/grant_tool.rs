//! Standalone grant tooling: a signing key, and signed grants made from a key file. This is how a
//! node runs before (or without) a coordinator, and how tests forge and sign grants.

use std::path::Path;

use ed25519_dalek::SigningKey;
use edgecard_protocol::{
    decode_signing_key, encode_signing_key, encode_verifying_key, Epoch, GrantedKey, KeyId, NodeId, Secret,
    SignedGrant, Sku, SliceGrant, SliceId, UnixMillis,
};

#[derive(Debug, thiserror::Error)]
pub enum GrantToolError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{0}")]
    Grant(#[from] edgecard_protocol::GrantError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GrantToolError + '_ {
    move |source| GrantToolError::Io { path: path.display().to_string(), source }
}

/// Writes `contents` readable by the owner only: signing keys and grants are secrets.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), GrantToolError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Creates a signing key file; returns the verifying key as hex for node configs.
pub fn keygen(out: &Path) -> Result<String, GrantToolError> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    write_private(out, encode_signing_key(&key).as_bytes())?;
    Ok(encode_verifying_key(&key.verifying_key()))
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, GrantToolError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    decode_signing_key(&text)
        .map_err(|e| GrantToolError::Invalid { path: path.display().to_string(), message: e.to_string() })
}

/// Reads one secret per line; blank lines are skipped, anything invalid is an error naming the line.
pub fn read_secrets(path: &Path) -> Result<Vec<Secret>, GrantToolError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut secrets = Vec::new();
    for (i, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let secret = Secret::new(line.to_string()).map_err(|e| GrantToolError::Invalid {
            path: path.display().to_string(),
            message: format!("line {}: {e}", i + 1),
        })?;
        secrets.push(secret);
    }
    if secrets.is_empty() {
        return Err(GrantToolError::Invalid { path: path.display().to_string(), message: "no keys".into() });
    }
    Ok(secrets)
}

#[derive(Debug, Clone)]
pub struct GrantSpec {
    pub slice_id: SliceId,
    pub sku: Sku,
    pub node: NodeId,
    pub epoch: Epoch,
    pub first_key_id: u64,
    pub lease: std::time::Duration,
}

/// Builds and signs a grant of `secrets`, numbering keys from `spec.first_key_id`.
pub fn sign_grant(key: &SigningKey, spec: &GrantSpec, secrets: Vec<Secret>) -> Result<SignedGrant, GrantToolError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let keys: Vec<GrantedKey> = secrets
        .into_iter()
        .enumerate()
        .map(|(i, secret)| GrantedKey { key_id: KeyId(spec.first_key_id + i as u64), secret })
        .collect();
    let grant = SliceGrant {
        slice_id: spec.slice_id,
        sku: spec.sku.clone(),
        node_id: spec.node.clone(),
        epoch: spec.epoch,
        issued_at: UnixMillis(now),
        lease_deadline: UnixMillis(now + spec.lease.as_millis() as u64),
        // A standalone node has no coordinator to acknowledge its sales or reclaim its keys, so
        // nothing limits its takes but the slice itself.
        take_window: u64::MAX,
        keys,
    };
    Ok(grant.sign(key)?)
}
