//! The store on the real disk: reopen, group commit, close, layout migration.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use edgecard_store::{Store, StoreError, StoreMetrics, WriteBatch};

fn open(dir: &Path) -> Store {
    Store::open(dir, 8 << 20, Arc::new(StoreMetrics::default())).unwrap()
}

#[tokio::test]
async fn committed_batches_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let mut batch = WriteBatch::default();
        batch.put(b"a/1".to_vec(), b"one".to_vec());
        batch.put(b"a/2".to_vec(), b"two".to_vec());
        store.commit(batch).await.unwrap();
        let mut batch = WriteBatch::default();
        batch.delete(b"a/1".to_vec());
        store.commit(batch).await.unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.get(b"a/1").unwrap(), None);
    assert_eq!(store.get(b"a/2").unwrap().as_deref(), Some(&b"two"[..]));
    let keys: Vec<_> = store.scan_prefix(b"a/").map(|kv| kv.unwrap().0).collect();
    assert_eq!(keys, vec![b"a/2".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut batch = WriteBatch::default();
            batch.put(format!("k/{i:05}").into_bytes(), i.to_be_bytes().to_vec());
            store.commit(batch).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let fsyncs = store.metrics().flushes.get();
    assert!(fsyncs >= 1);
    assert!(fsyncs < 400, "400 concurrent commits took {fsyncs} fsyncs: no grouping");
    assert_eq!(store.scan_prefix(b"k/").count(), 400);
}

#[tokio::test]
async fn writes_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.close();
    let mut batch = WriteBatch::default();
    batch.put(b"k".to_vec(), b"v".to_vec());
    assert!(matches!(store.commit(batch).await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn a_store_from_before_the_log_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The layout of earlier releases: sled's files directly in the store directory.
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"o/1", b"order".to_vec()).unwrap();
        db.flush().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.get(b"o/1").unwrap().as_deref(), Some(&b"order"[..]));
    assert!(dir.path().join("sled/db").exists() && !dir.path().join("db").exists());
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.get(b"o/1").unwrap().as_deref(), Some(&b"order"[..]));
}

#[tokio::test]
async fn a_store_of_another_format_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "edgecard-store 9\n").unwrap();
    let error = Store::open(dir.path(), 8 << 20, Arc::new(StoreMetrics::default())).err().unwrap();
    assert!(error.to_string().contains("another version of edgecard"), "{error}");
}

#[test]
fn the_data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = open(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let mode = std::fs::metadata(path.join("log")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    drop(store);
}

#[tokio::test]
async fn range_scans_start_where_asked_across_memory_and_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut batch = WriteBatch::default();
    for i in 0..10u8 {
        batch.put(vec![b'e', b'/', i], vec![i]);
    }
    batch.put(b"f/0".to_vec(), b"other prefix".to_vec());
    store.commit(batch).await.unwrap();
    store.checkpoint_now().unwrap();
    let mut batch = WriteBatch::default();
    batch.delete(vec![b'e', b'/', 6]);
    batch.put(vec![b'e', b'/', 7], vec![70]);
    store.commit(batch).await.unwrap();
    let found: Vec<(Vec<u8>, Vec<u8>)> =
        store.scan_prefix_from(b"e/", &[b'e', b'/', 5]).map(|kv| kv.unwrap()).collect();
    let expected: Vec<(Vec<u8>, Vec<u8>)> =
        [(5, 5), (7, 70), (8, 8), (9, 9)].iter().map(|(k, v)| (vec![b'e', b'/', *k], vec![*v])).collect();
    assert_eq!(found, expected);
    assert_eq!(store.last_with_prefix(b"e/").unwrap(), Some((vec![b'e', b'/', 9], vec![9])));
}
