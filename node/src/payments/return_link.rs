//! Return links: where a hosted provider (Stripe, EPay) sends the buyer back after paying.
//!
//! The order's token never leaves for a provider (it would sit in their logs and dashboards), so
//! the link carries a *return token* instead: `{expires}-{mac}`, where `expires` is unix seconds
//! (the order's creation plus `payments.return_link_ttl_secs`) and `mac` the first 16 bytes of
//! HMAC-SHA256 over a domain tag, the order id and `expires`, under a key of this node (kept in
//! `{data_dir}/return-link.key`). It is checked without any stored state; it opens one order's
//! page, until it expires, and nothing else (it cannot pay, and the API does not take it).
//!
//! The link is `{public_url}/order/{id}/return/{token}`: in the path, because EPay gateways append
//! their own query string to the return URL.

use std::io::Write;
use std::path::Path;

use edgecard_protocol::OrderId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::orders::OrderRecord;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"edgecard-return-link-v1\0";
const MAC_BYTES: usize = 16;
const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ReturnLinkError {
    #[error("malformed return link")]
    Malformed,
    #[error("return link does not verify")]
    BadMac,
    #[error("return link expired")]
    Expired,
}

/// Mints and checks return tokens. Cheap to clone (the key is a keyed MAC state).
#[derive(Clone)]
pub struct ReturnLinks {
    keyed: HmacSha256,
    ttl_secs: u64,
}

impl std::fmt::Debug for ReturnLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnLinks").field("ttl_secs", &self.ttl_secs).finish_non_exhaustive()
    }
}

impl ReturnLinks {
    pub fn new(key: &[u8], ttl_secs: u64) -> Result<Self, String> {
        let keyed = HmacSha256::new_from_slice(key).map_err(|_| "unusable return-link key".to_string())?;
        Ok(ReturnLinks { keyed, ttl_secs })
    }

    /// The node's key from `path`, made (random, 0600) on first use.
    pub fn load_or_create(path: &Path, ttl_secs: u64) -> Result<Self, String> {
        let key = match std::fs::read(path) {
            Ok(key) if key.len() == KEY_BYTES => key,
            Ok(_) => return Err(format!("{}: not a return-link key ({KEY_BYTES} bytes); remove it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(path, "return-link")?,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        ReturnLinks::new(&key, ttl_secs)
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// When `order`'s return links stop working (unix seconds).
    pub fn expires_at(&self, order: &OrderRecord) -> u64 {
        (order.created_at.0 / 1000).saturating_add(self.ttl_secs)
    }

    /// The return token of `order`. The same order always gets the same token, so a pay link
    /// derived twice is the same link.
    pub fn token(&self, order: &OrderRecord) -> String {
        let expires = self.expires_at(order);
        format!("{expires}-{}", hex::encode(self.mac(&order.id, expires)))
    }

    /// `{public_url}/order/{id}/return/{token}`.
    pub fn url(&self, public_url: &str, order: &OrderRecord) -> String {
        format!("{public_url}/order/{}/return/{}", order.id, self.token(order))
    }

    /// A link to order `id`'s page that works until `expires` (unix seconds), whatever this
    /// node's return-link lifetime: the links in order mails, which live longer.
    pub fn url_until(&self, public_url: &str, id: &OrderId, expires: u64) -> String {
        format!("{public_url}/order/{id}/return/{expires}-{}", hex::encode(self.mac(id, expires)))
    }

    /// Checks `token` for order `id` at `now_unix_secs` (constant-time MAC comparison).
    pub fn verify(&self, id: &OrderId, token: &str, now_unix_secs: u64) -> Result<(), ReturnLinkError> {
        let (expires, mac) = token.split_once('-').ok_or(ReturnLinkError::Malformed)?;
        if expires.is_empty() || expires.len() > 20 || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ReturnLinkError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| ReturnLinkError::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| ReturnLinkError::Malformed)?;
        if mac.len() != MAC_BYTES {
            return Err(ReturnLinkError::Malformed);
        }
        if !super::ct_eq(&mac, &self.mac(id, expires)) {
            return Err(ReturnLinkError::BadMac);
        }
        if now_unix_secs > expires {
            return Err(ReturnLinkError::Expired);
        }
        Ok(())
    }

    fn mac(&self, id: &OrderId, expires: u64) -> Vec<u8> {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(id.as_bytes());
        mac.update(&expires.to_be_bytes());
        mac.finalize().into_bytes()[..MAC_BYTES].to_vec()
    }
}

/// Writes a fresh random key (32 bytes) to `path` (0600; temp file, fsync, rename), and returns
/// it. `what` names the key in errors.
pub(crate) fn create_key(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use rand::RngCore;
    let mut key = vec![0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let tmp = path.with_extension("key.tmp");
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(&key)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("{}: cannot write the {what} key: {e}", path.display()))?;
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use edgecard_protocol::UnixMillis;

    use super::*;

    fn order(created_secs: u64) -> OrderRecord {
        let mut order = OrderRecord::for_tests("stripe", 1, 100, "USD");
        order.created_at = UnixMillis(created_secs * 1000);
        order
    }

    #[test]
    fn a_token_opens_its_order_until_it_expires() {
        let links = ReturnLinks::new(b"a return-link key for tests", 3600).unwrap();
        let order = order(1_000);
        let token = links.token(&order);
        assert_eq!(token, links.token(&order), "deterministic per order");
        assert_eq!(links.verify(&order.id, &token, 1_000), Ok(()));
        assert_eq!(links.verify(&order.id, &token, 4_600), Ok(()));
        assert_eq!(links.verify(&order.id, &token, 4_601), Err(ReturnLinkError::Expired));
        assert_eq!(
            links.url("https://shop.example", &order),
            format!("https://shop.example/order/{}/return/{token}", order.id)
        );
    }

    #[test]
    fn other_orders_keys_and_edits_are_refused() {
        let links = ReturnLinks::new(b"a return-link key for tests", 3600).unwrap();
        let order = order(1_000);
        let token = links.token(&order);
        let other = self::order(1_000);
        assert_eq!(links.verify(&other.id, &token, 1_000), Err(ReturnLinkError::BadMac), "another order");
        let foreign = ReturnLinks::new(b"another node's key", 3600).unwrap();
        assert_eq!(foreign.verify(&order.id, &token, 1_000), Err(ReturnLinkError::BadMac), "another key");
        let (_, mac) = token.split_once('-').unwrap();
        let extended = format!("{}-{mac}", 999_999);
        assert_eq!(links.verify(&order.id, &extended, 1_000), Err(ReturnLinkError::BadMac), "expiry moved");
        for bad in ["", "-", "4600", "4600-", "x-00", "4600-zz", "4600-00", "+4600-00", &format!("{token}0")] {
            assert!(links.verify(&order.id, bad, 1_000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_mail_link_verifies_until_its_own_expiry() {
        let links = ReturnLinks::new(b"a return-link key for tests", 3600).unwrap();
        let order = order(1_000);
        let url = links.url_until("https://shop.example", &order.id, 90_000);
        let token = url.rsplit('/').next().unwrap();
        assert!(token.starts_with("90000-"));
        assert_eq!(links.verify(&order.id, token, 80_000), Ok(()), "beyond the return-link lifetime");
        assert_eq!(links.verify(&order.id, token, 90_001), Err(ReturnLinkError::Expired));
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("return-link.key");
        let first = ReturnLinks::load_or_create(&path, 3600).unwrap();
        let again = ReturnLinks::load_or_create(&path, 3600).unwrap();
        let order = order(1_000);
        assert_eq!(again.verify(&order.id, &first.token(&order), 1_000), Ok(()), "same key after a restart");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, b"short").unwrap();
        assert!(ReturnLinks::load_or_create(&path, 3600).unwrap_err().contains("not a return-link key"));
    }
}
