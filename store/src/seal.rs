//! Sealing at rest: every value a sealed store writes is encrypted with XChaCha20-Poly1305 before
//! it reaches the log or sled, so neither holds a card key (or an email, or a queued grant) in
//! plaintext.
//!
//! ```text
//! sealed value: key version (1) | nonce (24, random) | ciphertext + tag (16)
//! AAD:          the value's store key (so a sealed value cannot be moved to another record)
//! ```
//! The data-encryption keys come from a key file (or the environment) outside the data dir: see
//! [`KeyRing`]. The highest version is current and seals; every version in the ring opens, so a
//! rotation can re-seal in its own time. Key bytes are zeroized on drop and never printed.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroizing;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// The environment variable that, when set, holds the key ring instead of a key file.
pub const ENV_SEALING_KEY: &str = "EDGECARD_SEALING_KEY";

/// What the check value of a data dir seals, under the AAD [`CHECK_AAD`]: opening it proves the
/// key ring holds the key the dir was sealed with.
const CHECK_PLAIN: &[u8] = b"edgecard sealed store";
const CHECK_AAD: &[u8] = b"\0edgecard sealing check";

const KEY_FILE_HEADER: &str =
    "# edgecard sealing key ring: version, then 32 bytes in hex; the highest version seals.\n\
# Keep this file outside the data dir, mode 0600; without it the data dir cannot be read.\n";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealing key {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("sealed value does not open: {0}")]
    Open(&'static str),
}

/// One data-encryption key and its version. Not `Debug`: it must never reach a log.
struct VersionedKey {
    version: u8,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

/// The keys of a data dir: the current one (highest version) and any older ones still being
/// re-sealed away.
pub struct KeyRing {
    keys: Vec<VersionedKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("versions", &self.versions()).finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A ring of one fresh random key, version 1.
    pub fn generate() -> KeyRing {
        KeyRing { keys: vec![fresh_key(1)] }
    }

    /// The versions held, lowest first.
    pub fn versions(&self) -> Vec<u8> {
        self.keys.iter().map(|k| k.version).collect()
    }

    pub fn current_version(&self) -> u8 {
        self.keys.last().map_or(0, |k| k.version)
    }

    /// Adds a fresh key one version above the current one, which becomes current.
    pub fn rotate(&mut self) -> Result<u8, SealError> {
        let next = self.current_version().checked_add(1).ok_or(SealError::KeyFile {
            path: String::new(),
            message: "key version 255 reached; start a new ring".into(),
        })?;
        self.keys.push(fresh_key(next));
        Ok(next)
    }

    /// Drops every key but the current one (after a re-seal finished).
    pub fn retire_old(&mut self) {
        let keep = self.keys.len().saturating_sub(1);
        self.keys.drain(..keep);
    }

    /// Parses the key file's text: `v<version> <64 hex>` per line; `#` comments and blank lines.
    pub fn parse(text: &str, source: &str) -> Result<KeyRing, SealError> {
        let bad = |message: String| SealError::KeyFile { path: source.to_string(), message };
        let mut keys: Vec<VersionedKey> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (version, hex_key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad(format!("line {}: expected `v<version> <64 hex characters>`", n + 1)))?;
            let version: u8 = version
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| bad(format!("line {}: the version must be v1 to v255", n + 1)))?;
            let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
            hex::decode_to_slice(hex_key.trim(), bytes.as_mut_slice())
                .map_err(|_| bad(format!("line {}: the key must be 64 hex characters", n + 1)))?;
            if keys.iter().any(|k| k.version == version) {
                return Err(bad(format!("line {}: version {version} appears twice", n + 1)));
            }
            keys.push(VersionedKey { version, bytes });
        }
        if keys.is_empty() {
            return Err(bad("no key in it".into()));
        }
        keys.sort_by_key(|k| k.version);
        Ok(KeyRing { keys })
    }

    /// The key file's text (holds key material: write it only to a 0600 file).
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::from(KEY_FILE_HEADER));
        for key in &self.keys {
            text.push_str(&format!("v{} {}\n", key.version, hex::encode(key.bytes.as_slice())));
        }
        text
    }

    /// The ring from `EDGECARD_SEALING_KEY` if set, else from `path`, created (0600, with a fresh
    /// key) if it does not exist. The bool says whether a new key file was made.
    pub fn load_or_create(path: &Path, env: Option<String>) -> Result<(KeyRing, bool), SealError> {
        if let Some(text) = env.map(Zeroizing::new) {
            return Ok((KeyRing::parse(&text, ENV_SEALING_KEY)?, false));
        }
        match std::fs::read_to_string(path).map(Zeroizing::new) {
            Ok(text) => {
                check_private(path)?;
                Ok((KeyRing::parse(&text, &path.display().to_string())?, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ring = KeyRing::generate();
                ring.write(path)?;
                Ok((ring, true))
            }
            Err(e) => Err(SealError::KeyFile { path: path.display().to_string(), message: e.to_string() }),
        }
    }

    /// Replaces the key file at `path` (0600, written to a temporary file, fsynced, renamed).
    pub fn write(&self, path: &Path) -> Result<(), SealError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |e: std::io::Error| SealError::KeyFile { path: path.display().to_string(), message: e.to_string() };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(fail)?;
        file.write_all(self.to_text().as_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(fail)?;
        }
        Ok(())
    }
}

fn fresh_key(version: u8) -> VersionedKey {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut_slice());
    VersionedKey { version, bytes }
}

/// A key file others can read is refused: it would be a copy of every key in the store.
fn check_private(path: &Path) -> Result<(), SealError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| SealError::KeyFile { path: path.display().to_string(), message: e.to_string() })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(SealError::KeyFile {
            path: path.display().to_string(),
            message: format!("mode {:o} lets other users read it; chmod 600 it", mode & 0o777),
        });
    }
    Ok(())
}

/// Whether `key_file` lies inside `data_dir` (after resolving what exists of both): a key kept
/// beside the data it seals protects nothing.
pub fn is_inside(key_file: &Path, data_dir: &Path) -> bool {
    let resolve = |p: &Path| -> std::path::PathBuf {
        // The file may not exist yet: resolve its parent, keep its name.
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
                std::fs::canonicalize(parent).map(|d| d.join(name)).unwrap_or_else(|_| p.to_path_buf())
            }
            _ => std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
        }
    };
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    resolve(key_file).starts_with(dir)
}

/// Seals and opens values with a [`KeyRing`]'s keys.
pub struct Sealer {
    /// Lowest version first; the last one seals.
    ciphers: Vec<(u8, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("current_version", &self.current_version()).finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(ring: &KeyRing) -> Sealer {
        let ciphers = ring
            .keys
            .iter()
            .map(|k| (k.version, XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(k.bytes.as_slice()))))
            .collect();
        Sealer { ciphers }
    }

    pub fn current_version(&self) -> u8 {
        self.ciphers.last().map_or(0, |(v, _)| *v)
    }

    /// `plain` sealed under the current key, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let Some((version, cipher)) = self.ciphers.last() else {
            return Vec::new();
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(*version);
        out.extend_from_slice(&nonce);
        // Encryption fails only for inputs over 256 GiB, which no store value reaches.
        match cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad }) {
            Ok(sealed) => out.extend_from_slice(&sealed),
            Err(_) => out.truncate(0),
        }
        out
    }

    /// Opens a value sealed by [`Sealer::seal`] under any key of the ring, for the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < OVERHEAD {
            return Err(SealError::Open("too short"));
        }
        let version = sealed[0];
        let (_, cipher) = self
            .ciphers
            .iter()
            .find(|(v, _)| *v == version)
            .ok_or(SealError::Open("sealed under a key version this key ring does not hold"))?;
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        cipher
            .decrypt(nonce, Payload { msg: &sealed[1 + NONCE_LEN..], aad })
            .map_err(|_| SealError::Open("authentication failed (wrong key, altered bytes, or moved)"))
    }

    /// The key version `sealed` was sealed under.
    pub fn version_of(sealed: &[u8]) -> Option<u8> {
        sealed.first().copied()
    }

    /// A data dir's check value: lets a later start tell whether it has the right key.
    pub fn check_value(&self) -> Vec<u8> {
        self.seal(CHECK_AAD, CHECK_PLAIN)
    }

    /// Whether `check` (from [`Sealer::check_value`]) opens with this ring.
    pub fn verify_check(&self, check: &[u8]) -> Result<(), SealError> {
        match self.open(CHECK_AAD, check) {
            Ok(plain) if plain == CHECK_PLAIN => Ok(()),
            Ok(_) => Err(SealError::Open("check value holds something else")),
            Err(e) => Err(e),
        }
    }
}

/// The default key file of a data dir: beside it, never in it (`/srv/eu-1/data` →
/// `/srv/eu-1/data.sealing-key`).
pub fn default_key_file(data_dir: &Path) -> std::path::PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(".sealing-key");
    std::path::PathBuf::from(name)
}

/// Whether the store in `store_dir` is sealed (its `FORMAT` says so).
pub fn store_is_sealed(store_dir: &Path) -> bool {
    std::fs::read_to_string(store_dir.join("FORMAT")).is_ok_and(|f| f == crate::store::FORMAT_SEALED)
}

/// The sealer of the store in `store_dir` (part of `data_dir`): the ring from
/// `EDGECARD_SEALING_KEY` if set, else from `key_file`, which must lie outside `data_dir`. A
/// missing key file is made (0600, fresh key) only for a store not sealed yet: a sealed store
/// without its key stays closed. Returns whether a key file was made.
pub fn load_sealer(key_file: &Path, data_dir: &Path, store_dir: &Path) -> Result<(Sealer, bool), SealError> {
    let env = std::env::var(ENV_SEALING_KEY).ok();
    let shown = key_file.display().to_string();
    if env.is_none() {
        if is_inside(key_file, data_dir) {
            return Err(SealError::KeyFile {
                path: shown,
                message: format!("it lies inside the data dir {}: keep it elsewhere", data_dir.display()),
            });
        }
        if !key_file.exists() && store_is_sealed(store_dir) {
            return Err(SealError::KeyFile {
                path: shown,
                message: format!(
                    "missing, and the store {} is sealed: restore the key file it was sealed with",
                    store_dir.display()
                ),
            });
        }
    }
    let (ring, created) = KeyRing::load_or_create(key_file, env)?;
    Ok((Sealer::new(&ring), created))
}

/// What `rotate-key` did.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub new_version: u8,
    pub entries: u64,
}

/// Rotates the key of the store in `store_dir` (the process that owns it must be stopped): a
/// new key is added to `key_file` and becomes current, the store is re-sealed under it whole
/// (old log segments and sled files deleted), and only then are the older keys dropped from the
/// file. Interrupted anywhere, the key file still holds every key needed, and the next open
/// finishes the re-seal.
pub fn rotate_key(key_file: &Path, store_dir: &Path, cache_capacity: u64) -> Result<Rotation, RotateError> {
    if std::env::var(ENV_SEALING_KEY).is_ok() {
        return Err(RotateError::Env);
    }
    if !store_is_sealed(store_dir) {
        return Err(RotateError::NotSealed(store_dir.display().to_string()));
    }
    let (mut ring, _) = KeyRing::load_or_create(key_file, None)?;
    let open = |ring: &KeyRing| {
        let options = crate::StoreOptions {
            cache_capacity,
            sealer: Some(std::sync::Arc::new(Sealer::new(ring))),
            ..crate::StoreOptions::default()
        };
        crate::Store::open_with(store_dir, options, std::sync::Arc::new(crate::StoreMetrics::default()))
    };
    // First with the key file as it is: refused (and nothing changed) if it is the wrong key or
    // the service still runs (sled locks its files).
    open(&ring)?.close();
    let new_version = ring.rotate()?;
    ring.write(key_file)?;
    let store = open(&ring)?;
    let entries = store.scan_prefix(b"").count() as u64;
    store.close();
    drop(store);
    ring.retire_old();
    ring.write(key_file)?;
    Ok(Rotation { new_version, entries })
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("the key ring comes from {ENV_SEALING_KEY}: rotate it there (add a higher version, restart, then drop the old one)")]
    Env,
    #[error("the store {0} is not sealed yet: start the service once first")]
    NotSealed(String),
    #[error(transparent)]
    Key(#[from] SealError),
    #[error(transparent)]
    Store(#[from] crate::StoreError),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sealer() -> (KeyRing, Sealer) {
        let ring = KeyRing::generate();
        let sealer = Sealer::new(&ring);
        (ring, sealer)
    }

    #[test]
    fn a_sealed_value_opens_to_itself_and_does_not_contain_it() {
        let (_, sealer) = sealer();
        let secret = b"CARD-KEY-0123456789-ABCDEFGHIJ";
        let sealed = sealer.seal(b"k/1", secret);
        assert_eq!(sealed.len(), secret.len() + OVERHEAD);
        assert!(!sealed.windows(secret.len()).any(|w| w == secret));
        assert_eq!(sealer.open(b"k/1", &sealed).unwrap(), secret);
        assert_ne!(sealer.seal(b"k/1", secret), sealed, "a fresh nonce each time");
    }

    #[test]
    fn the_wrong_key_does_not_open() {
        let (_, a) = sealer();
        let (_, b) = sealer();
        let sealed = a.seal(b"k/1", b"secret");
        assert!(b.open(b"k/1", &sealed).is_err());
        assert!(b.verify_check(&a.check_value()).is_err());
        a.verify_check(&a.check_value()).unwrap();
    }

    #[test]
    fn a_value_moved_to_another_record_does_not_open() {
        let (_, sealer) = sealer();
        let sealed = sealer.seal(b"o/order-1", b"secret");
        assert!(sealer.open(b"o/order-2", &sealed).is_err());
    }

    #[test]
    fn every_altered_byte_is_detected() {
        let (_, sealer) = sealer();
        let sealed = sealer.seal(b"k", b"secret value");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(sealer.open(b"k", &bad).is_err(), "byte {i}");
        }
        assert!(sealer.open(b"k", &sealed[..sealed.len() - 1]).is_err());
        assert!(sealer.open(b"k", &[]).is_err());
    }

    #[test]
    fn after_rotation_old_values_still_open_and_new_ones_use_the_new_key() {
        let (mut ring, old) = sealer();
        let before = old.seal(b"k", b"v");
        assert_eq!(ring.rotate().unwrap(), 2);
        let both = Sealer::new(&ring);
        assert_eq!(both.open(b"k", &before).unwrap(), b"v");
        let after = both.seal(b"k", b"v");
        assert_eq!(Sealer::version_of(&after), Some(2));
        ring.retire_old();
        assert_eq!(ring.versions(), vec![2]);
        let new_only = Sealer::new(&ring);
        assert!(new_only.open(b"k", &before).is_err());
        assert_eq!(new_only.open(b"k", &after).unwrap(), b"v");
    }

    #[test]
    fn key_file_text_round_trips_and_bad_files_are_refused() {
        let (mut ring, _) = sealer();
        ring.rotate().unwrap();
        let parsed = KeyRing::parse(&ring.to_text(), "test").unwrap();
        assert_eq!(parsed.versions(), vec![1, 2]);
        let sealed = Sealer::new(&ring).seal(b"k", b"v");
        assert_eq!(Sealer::new(&parsed).open(b"k", &sealed).unwrap(), b"v");
        for bad in ["", "# only a comment\n", "v1 abcd\n", "1 ".to_string().as_str(), "v0 00\n"] {
            assert!(KeyRing::parse(bad, "test").is_err(), "{bad:?}");
        }
        let twice = format!("v1 {}\nv1 {}\n", "00".repeat(32), "11".repeat(32));
        assert!(KeyRing::parse(&twice, "test").unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn debug_output_never_holds_key_material() {
        let (ring, sealer) = sealer();
        let hex_key = hex::encode(ring.keys[0].bytes.as_slice());
        for shown in [format!("{ring:?}"), format!("{sealer:?}")] {
            assert!(!shown.contains(&hex_key[..16]), "{shown}");
        }
    }

    #[test]
    fn key_files_are_created_private_and_refused_when_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.sealing-key");
        let (ring, created) = KeyRing::load_or_create(&path, None).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, created) = KeyRing::load_or_create(&path, None).unwrap();
        assert!(!created);
        let sealed = Sealer::new(&ring).seal(b"k", b"v");
        assert_eq!(Sealer::new(&again).open(b"k", &sealed).unwrap(), b"v");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(KeyRing::load_or_create(&path, None).unwrap_err().to_string().contains("chmod 600"));
        assert!(is_inside(&dir.path().join("data/x.key"), dir.path()));
        assert!(!is_inside(&dir.path().join("data.sealing-key"), &dir.path().join("data")));
    }
}
