//! Orders by buyer address, for "find my order": `fe/{tag}{order id}` → empty, where `tag` is
//! HMAC-SHA256 over the normalized address under a key of this node (`m/find_key`, made on first
//! start). The entry is written in the batch that creates the order and erased with the address
//! (retention, `forget-email`), so a lookup reads only the entries of one address and never scans
//! orders. The tag is keyed so the index alone (or a backup of it) does not confirm a guessed
//! address.

use edgecard_protocol::OrderId;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::store::{Store, StoreError, WriteBatch};

pub const ENTRY: &[u8] = b"fe/";
pub const KEY: &[u8] = b"m/find_key";
const DOMAIN: &[u8] = b"edgecard-find-order-v1\0";
const KEY_BYTES: usize = 32;
pub const TAG_BYTES: usize = 32;

/// The address tag of this node: same address (after normalizing), same tag.
#[derive(Clone)]
pub struct EmailIndex {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for EmailIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmailIndex")
    }
}

impl EmailIndex {
    pub fn new(key: [u8; KEY_BYTES]) -> Self {
        // HMAC takes a key of any length, so this never falls back.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
        EmailIndex { keyed }
    }

    /// The node's index key from the store, made (random) and committed on first use.
    pub async fn load_or_create(store: &Store) -> Result<Self, StoreError> {
        if let Some(raw) = store.get(KEY)? {
            let key: [u8; KEY_BYTES] = raw
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt { key: "m/find_key".into(), reason: "bad length".into() })?;
            return Ok(EmailIndex::new(key));
        }
        let key: [u8; KEY_BYTES] = rand::random();
        let mut batch = WriteBatch::default();
        batch.put(KEY.to_vec(), key.to_vec());
        store.commit(batch).await?;
        Ok(EmailIndex::new(key))
    }

    /// The tag of an address already normalized (`orders::engine::normalize_email`).
    pub fn tag(&self, normalized: &str) -> [u8; TAG_BYTES] {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(normalized.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn entry_key(&self, normalized: &str, order: &OrderId) -> Vec<u8> {
        [ENTRY, &self.tag(normalized)[..], order.as_bytes()].concat()
    }

    /// The orders indexed under `normalized`, at most `limit`.
    pub fn orders(&self, store: &Store, normalized: &str, limit: usize) -> Result<Vec<OrderId>, StoreError> {
        let prefix = [ENTRY, &self.tag(normalized)[..]].concat();
        let mut found = Vec::new();
        for item in store.scan_prefix(&prefix).take(limit) {
            let (key, _) = item?;
            let id: Option<[u8; 16]> = key.get(prefix.len()..).and_then(|b| b.try_into().ok());
            if let Some(id) = id {
                found.push(OrderId::from_bytes(id));
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_depends_on_the_address_and_the_nodes_key_only() {
        let a = EmailIndex::new([1; 32]);
        let b = EmailIndex::new([2; 32]);
        assert_eq!(a.tag("buyer@example.com"), a.tag("buyer@example.com"));
        assert_ne!(a.tag("buyer@example.com"), a.tag("other@example.com"));
        assert_ne!(a.tag("buyer@example.com"), b.tag("buyer@example.com"), "keyed per node");
        let order = OrderId::random();
        let key = a.entry_key("buyer@example.com", &order);
        assert_eq!(key.len(), ENTRY.len() + TAG_BYTES + 16);
        assert!(key.ends_with(order.as_bytes()));
    }

    #[tokio::test]
    async fn entries_are_found_by_address_and_the_key_survives_a_reopen() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let open = || {
            Store::open(dir.path(), 1 << 20, Arc::new(crate::metrics::StoreMetrics::default()))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let store = open();
        let index = EmailIndex::load_or_create(&store).await.unwrap_or_else(|e| panic!("{e}"));
        let (mine, other) = (OrderId::random(), OrderId::random());
        let mut batch = WriteBatch::default();
        batch.put(index.entry_key("buyer@example.com", &mine), Vec::new());
        batch.put(index.entry_key("other@example.com", &other), Vec::new());
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(index.orders(&store, "buyer@example.com", 10).unwrap_or_default(), vec![mine]);
        assert!(index.orders(&store, "nobody@example.com", 10).unwrap_or_default().is_empty());
        drop(store);
        let store = open();
        let again = EmailIndex::load_or_create(&store).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.tag("buyer@example.com"), index.tag("buyer@example.com"));
    }
}
