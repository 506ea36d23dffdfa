//! Sealing at rest on a real disk: no value's bytes in any file of a sealed store, the wrong key
//! refused with nothing changed, plaintext stores migrated, key rotation re-sealing everything.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgecard_store::{
    disk_scan, KeyRing, LogOptions, Sealer, Store, StoreError, StoreMetrics, StoreOptions, WriteBatch,
};
use rand::RngCore;

fn options(sealer: Option<&KeyRing>) -> StoreOptions {
    StoreOptions {
        cache_capacity: 4 << 20,
        log: LogOptions { segment_bytes: 256 << 10, ..LogOptions::default() },
        checkpoint_bytes: u64::MAX,
        checkpoint_interval: Duration::from_secs(3600),
        sealer: sealer.map(|ring| Arc::new(Sealer::new(ring))),
        ..StoreOptions::default()
    }
}

fn open(dir: &Path, ring: Option<&KeyRing>) -> Result<Store, StoreError> {
    Store::open_with(dir, options(ring), Arc::new(StoreMetrics::default()))
}

/// Long random secrets, so that finding one in a file means it was written there.
fn secrets(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut bytes = [0u8; 24];
            rand::thread_rng().fill_bytes(&mut bytes);
            format!("SECRET-{}", hex::encode(bytes))
        })
        .collect()
}

/// Writes half the secrets and checkpoints them into sled, then the other half into the log only.
fn write_secrets(store: &Store, secrets: &[String]) {
    let (in_sled, in_log) = secrets.split_at(secrets.len() / 2);
    for (i, secret) in in_sled.iter().enumerate() {
        let mut batch = WriteBatch::default();
        batch.put(format!("k/{i:04}").into_bytes(), secret.as_bytes().to_vec());
        store.apply(batch).unwrap();
    }
    store.wait_durable_blocking(store.last_lsn()).unwrap();
    store.checkpoint_now().unwrap();
    for (i, secret) in in_log.iter().enumerate() {
        let mut batch = WriteBatch::default();
        batch.put(format!("k/{:04}", in_sled.len() + i).into_bytes(), secret.as_bytes().to_vec());
        store.apply(batch).unwrap();
    }
    store.wait_durable_blocking(store.last_lsn()).unwrap();
}

fn read_all(store: &Store) -> Vec<String> {
    store.scan_prefix(b"k/").map(|kv| String::from_utf8(kv.unwrap().1).unwrap()).collect()
}

fn found(root: &Path, secrets: &[String]) -> Vec<(PathBuf, String)> {
    disk_scan::secrets_in_files(root, secrets).unwrap()
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    disk_scan::snapshot(root).unwrap()
}

#[test]
fn a_sealed_store_holds_no_value_bytes_in_any_file_and_reads_them_back() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let ring = KeyRing::generate();
    let secrets = secrets(40);
    let store = open(&dir, Some(&ring)).unwrap();
    assert!(store.is_sealed());
    write_secrets(&store, &secrets);
    assert_eq!(read_all(&store), secrets, "readable while open, from sled and from the memtable");
    store.halt();
    drop(store);
    assert_eq!(found(root.path(), &secrets), vec![], "no secret in the log or sled");

    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets, "recovered from the log and sled, opened");
}

#[test]
fn the_wrong_key_is_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let ring = KeyRing::generate();
    let store = open(&dir, Some(&ring)).unwrap();
    write_secrets(&store, &secrets(4));
    store.close();
    drop(store);
    let before = snapshot(root.path());

    let error = open(&dir, Some(&KeyRing::generate())).err().unwrap();
    assert!(matches!(error, StoreError::WrongSealingKey { .. }), "{error}");
    assert!(error.to_string().contains("the sealing key does not match this data dir"), "{error}");
    let error = open(&dir, None).err().unwrap();
    assert!(error.to_string().contains("sealed and no sealing key"), "{error}");
    assert_eq!(snapshot(root.path()), before, "a refused open changes no file");
}

#[test]
fn a_plaintext_store_is_migrated_and_its_plaintext_is_gone_from_every_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let secrets = secrets(40);
    let store = open(&dir, None).unwrap();
    assert!(!store.is_sealed());
    write_secrets(&store, &secrets);
    store.halt();
    drop(store);
    assert!(!found(root.path(), &secrets).is_empty(), "the old store holds plaintext (else this proves nothing)");

    let ring = KeyRing::generate();
    let store = open(&dir, Some(&ring)).unwrap();
    assert!(store.is_sealed());
    assert_eq!(read_all(&store), secrets);
    store.close();
    drop(store);
    assert_eq!(found(root.path(), &secrets), vec![], "no plaintext left in log segments, spares or sled");
    let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["store"], "no copy left beside the store");
    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets);
}

#[test]
fn rotation_reseals_everything_under_the_new_key_and_the_old_key_stops_working() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let secrets = secrets(20);
    let mut ring = KeyRing::generate();
    let store = open(&dir, Some(&ring)).unwrap();
    write_secrets(&store, &secrets);
    store.close();
    drop(store);
    let old_only = KeyRing::parse(&ring.to_text(), "copy").unwrap();

    ring.rotate().unwrap();
    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets, "re-sealed at open under version 2");
    store.close();
    drop(store);
    ring.retire_old();
    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets, "version 2 alone opens everything");
    store.close();
    drop(store);
    let error = open(&dir, Some(&old_only)).err().unwrap();
    assert!(matches!(error, StoreError::WrongSealingKey { .. }), "{error}");
}

#[test]
fn an_interrupted_reseal_is_completed_or_discarded_at_open() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let secrets = secrets(6);
    let ring = KeyRing::generate();
    let store = open(&dir, Some(&ring)).unwrap();
    write_secrets(&store, &secrets);
    store.close();
    drop(store);

    // Interrupted while building: the partial copy goes, the store stays.
    std::fs::create_dir(root.path().join("store.resealing")).unwrap();
    std::fs::write(root.path().join("store.resealing/FORMAT"), b"partial").unwrap();
    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets);
    store.close();
    drop(store);
    assert!(!root.path().join("store.resealing").exists());

    // Interrupted between the renames (and the caller made an empty dir meanwhile): the complete
    // copy becomes the store.
    std::fs::rename(&dir, root.path().join("store.resealing")).unwrap();
    std::fs::create_dir(root.path().join("store.resealed-old")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let store = open(&dir, Some(&ring)).unwrap();
    assert_eq!(read_all(&store), secrets);
    assert!(!root.path().join("store.resealed-old").exists());
}
