//! Card keys are sealed at rest: a coordinator and a node, as real processes, import keys, sell
//! some, sync, stop; then no file under either data dir holds the bytes of any imported key.
//! Their sealing keys sit outside the data dirs (0600); a start with the wrong key is refused
//! with a clear message and changes nothing; `rotate-key` re-seals under a new key and the shop
//! still shows its buyers their keys.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::coordinator::*;
use common::*;
use edgecard_store::disk_scan;

/// Long random keys, so that finding one in a file means it was written there.
fn long_random_keys(n: usize) -> Vec<String> {
    (0..n).map(|_| format!("CARD-{}", random_hex(32))).collect()
}

/// Every (file, key) where the key's bytes appear in the file, anywhere under `root`.
fn keys_found_under(root: &Path, keys: &[String]) -> Vec<(PathBuf, String)> {
    disk_scan::secrets_in_files(root, keys).unwrap()
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    disk_scan::snapshot(root).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A different, valid key ring in `path`'s place; returns the original text.
fn swap_in_another_key(path: &Path) -> String {
    let original = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, format!("v1 {}\n", random_hex(32))).unwrap();
    original
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_imported_key_is_on_disk_and_the_wrong_key_is_refused() {
    let mut lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    let keys = long_random_keys(30);
    lab.import(SKU, &keys).await;
    let config = lab.add_node("eu-1", "eu").await;
    // 20 to the node (sold and unsold ones there), 10 stay in the coordinator's pool.
    lab.allocate(SKU, "eu-1", 20).await;
    let mut node = start_node(&config).await;
    wait_for_stock(&node, 20).await;
    let mut client = node.client().await;
    let mut bought = Vec::new();
    for _ in 0..3 {
        let (order, delivered) = client.buy(2).await;
        assert!(delivered.iter().all(|k| keys.contains(k)), "delivered keys are imported ones");
        bought.push((order, delivered));
    }
    lab.wait_for_ledger("the sales reached the ledger", Duration::from_secs(20), |orders| {
        orders.iter().filter(|o| o["status"] == "delivered").count() == 3
    })
    .await;
    drop(client);
    assert!(node.terminate().success(), "node stops cleanly");
    assert!(lab.coordinator.terminate(), "coordinator stops cleanly");

    let coordinator_dir = lab.coordinator_dir();
    let bundle_dir = config.parent().unwrap().to_path_buf();
    let data_dir = bundle_dir.join("data");
    assert!(data_dir.join("store/FORMAT").exists() && coordinator_dir.join("store/FORMAT").exists());
    let mut found = keys_found_under(&coordinator_dir, &keys);
    found.extend(keys_found_under(&bundle_dir, &keys));
    assert_eq!(found, vec![], "imported keys in plaintext under a data dir (log, sled, grants, anything)");

    // The sealing keys: beside the data dirs, never in them, private.
    let node_key = PathBuf::from(format!("{}.sealing-key", data_dir.display()));
    let coordinator_key = PathBuf::from(format!("{}.sealing-key", coordinator_dir.display()));
    for key_file in [&node_key, &coordinator_key] {
        assert!(key_file.exists(), "{} exists", key_file.display());
        assert_eq!(mode(key_file), 0o600, "{}", key_file.display());
    }

    // The wrong key: refused, clearly, non-zero, nothing changed.
    let node_dir_before = snapshot(&data_dir);
    let coordinator_dir_before = snapshot(&coordinator_dir);
    let original_node_key = swap_in_another_key(&node_key);
    let original_coordinator_key = swap_in_another_key(&coordinator_key);
    let config_arg = config.display().to_string();
    let refused = edgecard(&["node", "run", "--config", &config_arg], &[]).await;
    assert_ne!(refused.code, Some(0), "node started with the wrong key");
    assert!(refused.stderr.contains("the sealing key does not match this data dir"), "{}", refused.stderr);
    let dir_arg = coordinator_dir.display().to_string();
    let refused = edgecard(&["coordinator", "run", "--dir", &dir_arg], &[]).await;
    assert_ne!(refused.code, Some(0), "coordinator started with the wrong key");
    assert!(refused.stderr.contains("the sealing key does not match this data dir"), "{}", refused.stderr);
    assert!(snapshot(&data_dir) == node_dir_before, "a refused node start changed its data dir");
    assert!(snapshot(&coordinator_dir) == coordinator_dir_before, "a refused coordinator start changed its dir");

    // The right key again, rotated: everything re-sealed under a new key, still readable.
    std::fs::write(&node_key, original_node_key).unwrap();
    std::fs::write(&coordinator_key, original_coordinator_key).unwrap();
    let rotated = edgecard(&["node", "rotate-key", "--config", &config_arg], &[]).await;
    assert_eq!(rotated.code, Some(0), "{}", rotated.stderr);
    let rotated = edgecard(&["coordinator", "rotate-key", "--dir", &dir_arg], &[]).await;
    assert_eq!(rotated.code, Some(0), "{}", rotated.stderr);
    for key_file in [&node_key, &coordinator_key] {
        let text = std::fs::read_to_string(key_file).unwrap();
        assert!(text.contains("\nv2 ") && !text.contains("\nv1 "), "only the new key is left:\n{}", key_file.display());
        assert_eq!(mode(key_file), 0o600);
    }
    lab.restart_coordinator().await;
    let node = start_node(&config).await;
    let mut client = node.client().await;
    for (order, delivered) in &bought {
        let view = client.fetch_ok(order).await;
        assert_eq!(&keys_of(&view), delivered, "the buyer still gets the keys after rotation");
    }
    assert_eq!(lab.orders().await.len(), 3, "the ledger is intact after rotation");
    assert_eq!(keys_found_under(&data_dir, &keys), vec![]);
}

/// Waits (at most 30 s) until the coordinator confirmed the restarted node's data dir.
async fn wait_until_confirmed(node: &NodeProcess) {
    let started = std::time::Instant::now();
    while node.metric("edgecard_sync_confirmed").await != 1.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "node not confirmed\n{}", node.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rewrites the sealed store in `store_dir` as the previous release wrote it: the same records,
/// in plaintext (`edgecard-store 2`), half checkpointed into sled, half only in the log.
fn unseal_as_an_earlier_release_wrote_it(store_dir: &Path, key_file: &Path) {
    use edgecard_store::{KeyRing, Sealer, Store, StoreMetrics, StoreOptions, WriteBatch};
    use std::sync::Arc;
    let ring = KeyRing::parse(&std::fs::read_to_string(key_file).unwrap(), "test").unwrap();
    let options = StoreOptions { sealer: Some(Arc::new(Sealer::new(&ring))), ..StoreOptions::default() };
    let sealed = Store::open_with(store_dir, options, Arc::new(StoreMetrics::default())).unwrap();
    let entries: Vec<(Vec<u8>, Vec<u8>)> = sealed.scan_prefix(b"").map(Result::unwrap).collect();
    sealed.close();
    drop(sealed);
    std::fs::remove_dir_all(store_dir).unwrap();
    let plain = Store::open(store_dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap();
    assert!(!plain.is_sealed());
    let half = entries.len() / 2;
    for (i, chunk) in [&entries[..half], &entries[half..]].into_iter().enumerate() {
        let mut batch = WriteBatch::default();
        for (key, value) in chunk {
            batch.put(key.clone(), value.clone());
        }
        let lsn = plain.apply(batch).unwrap();
        plain.wait_durable_blocking(lsn).unwrap();
        if i == 0 {
            plain.checkpoint_now().unwrap();
        }
    }
    plain.halt();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_stores_of_an_earlier_release_are_resealed_at_start_and_their_plaintext_is_gone() {
    let mut lab = Lab::start(Ports::Fixed).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    let keys = long_random_keys(12);
    lab.import(SKU, &keys).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", 8).await;
    let mut node = start_node(&config).await;
    wait_for_stock(&node, 8).await;
    let (order, delivered) = node.client().await.buy(2).await;
    lab.wait_for_ledger("the sale reached the ledger", Duration::from_secs(20), |orders| {
        orders.iter().any(|o| o["status"] == "delivered")
    })
    .await;
    assert!(node.terminate().success());
    assert!(lab.coordinator.terminate());

    let coordinator_dir = lab.coordinator_dir();
    let data_dir = config.parent().unwrap().join("data");
    let node_key = PathBuf::from(format!("{}.sealing-key", data_dir.display()));
    let coordinator_key = PathBuf::from(format!("{}.sealing-key", coordinator_dir.display()));
    unseal_as_an_earlier_release_wrote_it(&data_dir.join("store"), &node_key);
    unseal_as_an_earlier_release_wrote_it(&coordinator_dir.join("store"), &coordinator_key);
    assert!(!keys_found_under(&data_dir, &keys).is_empty(), "the node's old store holds plaintext keys");
    assert!(!keys_found_under(&coordinator_dir, &keys).is_empty(), "the coordinator's old store does");

    lab.restart_coordinator().await;
    let node = start_node(&config).await;
    let mut client = node.client().await;
    assert_eq!(keys_of(&client.fetch_ok(&order).await), delivered, "the migrated order still shows its keys");
    wait_until_confirmed(&node).await;
    let (_, more) = client.buy(1).await;
    assert!(keys.contains(&more[0]), "the migrated slice still sells");
    drop(client);
    let mut node = node;
    assert!(node.terminate().success());
    assert!(lab.coordinator.terminate());
    let mut found = keys_found_under(&coordinator_dir, &keys);
    found.extend(keys_found_under(config.parent().unwrap(), &keys));
    assert_eq!(found, vec![], "plaintext left behind by the migration");
    let store_dirs: Vec<_> = std::fs::read_dir(&data_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!store_dirs.iter().any(|n| n.to_string_lossy().contains("reseal")), "{store_dirs:?}");
}
