//! The store on a disk that lies: each test injects one fault through `FaultyDisk` and checks
//! that nothing reported durable is lost and nothing lost is reported durable.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecard_store::{FaultyDisk, Health, LogOptions, Store, StoreError, StoreMetrics, StoreOptions, WriteBatch};

fn options(disk: &FaultyDisk) -> StoreOptions {
    StoreOptions {
        disk: Arc::new(disk.attach()),
        cache_capacity: 4 << 20,
        log: LogOptions { segment_bytes: 64 << 10, disk_full_retry: Duration::from_millis(5), ..LogOptions::default() },
        // Checkpoints only when a test asks, so that what the log holds is what the test set up.
        checkpoint_bytes: u64::MAX,
        checkpoint_interval: Duration::from_secs(3600),
        sealer: None,
    }
}

fn open(dir: &Path, options: StoreOptions) -> Store {
    Store::open_with(dir, options, Arc::new(StoreMetrics::default())).unwrap()
}

fn put(key: String, value: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::default();
    batch.put(key.into_bytes(), value.to_vec());
    batch
}

/// Waits (bounded) until the log writer has written something it has not fsynced yet.
async fn wait_until_written(disk: &FaultyDisk) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while disk.unsynced_writes() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(disk.unsynced_writes() > 0, "the writer never wrote the batches");
}

fn keys(store: &Store, prefix: &[u8]) -> Vec<String> {
    store.scan_prefix(prefix).map(|kv| String::from_utf8(kv.unwrap().0).unwrap()).collect()
}

/// A batch whose commit was still in flight at the crash may be lost; one reported durable never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_write_lost_at_crash_was_never_reported_durable() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = Arc::new(open(dir.path(), options(&disk)));
    store.commit(put("k/0000".into(), b"before")).await.unwrap();

    disk.stall_syncs(true);
    let mut in_flight = Vec::new();
    for i in 1..=50u32 {
        let store = store.clone();
        in_flight.push(tokio::spawn(async move { store.commit(put(format!("k/{i:04}"), b"during")).await }));
    }
    wait_until_written(&disk).await;
    disk.crash();
    disk.stall_syncs(false);
    let mut reported_durable = 0;
    for task in in_flight {
        if task.await.unwrap().is_ok() {
            reported_durable += 1;
        }
    }
    assert_eq!(reported_durable, 0, "a commit whose fsync never happened was reported durable");
    store.halt();
    drop(store);

    let store = open(dir.path(), options(&disk));
    assert_eq!(keys(&store, b"k/"), vec!["k/0000".to_string()], "only the durable batch survives");
    store.commit(put("k/9999".into(), b"after")).await.unwrap();
    assert_eq!(store.get(b"k/9999").unwrap().as_deref(), Some(&b"after"[..]));
}

/// fsyncgate: after a failed fsync the kernel may have dropped the data while the page cache
/// still shows it, and the next fsync succeeds. The store must never report that data durable.
#[tokio::test]
async fn a_failed_fsync_is_never_followed_by_a_success_for_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    let mut health = store.subscribe_health();
    store.commit(put("k/a".into(), b"1")).await.unwrap();

    disk.fail_next_syncs(1);
    let failed = store.commit(put("k/b".into(), b"2")).await;
    assert!(matches!(failed, Err(StoreError::Poisoned { .. })), "{failed:?}");
    assert_eq!(store.health(), Health::Poisoned);
    tokio::time::timeout(Duration::from_secs(1), health.wait_for(|h| *h == Health::Poisoned)).await.unwrap().unwrap();
    assert_eq!(store.metrics().health.get(), 2);

    // The disk works again, but the store must not pretend that b is safe now.
    let again = store.durable().await;
    assert!(matches!(again, Err(StoreError::Poisoned { .. })), "{again:?}");
    let later = store.commit(put("k/c".into(), b"3")).await;
    assert!(matches!(later, Err(StoreError::Poisoned { .. })), "{later:?}");
    assert!(store.poison_reason().unwrap().contains("Input/output error"), "{:?}", store.poison_reason());

    disk.crash();
    store.halt();
    drop(store);
    let store = open(dir.path(), options(&disk));
    assert_eq!(store.health(), Health::Ok, "a restart recovers from disk");
    assert_eq!(keys(&store, b"k/"), vec!["k/a".to_string()]);
    store.commit(put("k/d".into(), b"4")).await.unwrap();
}

/// A full disk refuses writes (503 upstream) and resumes on its own once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_they_resume_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    let mut health = store.subscribe_health();
    // Room for the first segment and nothing more: the log fills it, then needs a second.
    disk.set_capacity(Some(disk.used() + 1024));
    let value = vec![7u8; 1000];
    let mut durable = Vec::new();
    let mut refused = None;
    for i in 0..1000u32 {
        match store.commit(put(format!("k/{i:04}"), &value)).await {
            Ok(()) => durable.push(format!("k/{i:04}")),
            Err(error) => {
                refused = Some((i, error));
                break;
            }
        }
    }
    let (first_refused, error) = refused.expect("the disk never filled");
    assert!(matches!(error, StoreError::DiskFull), "{error}");
    assert!(error.is_retryable());
    assert_eq!(store.health(), Health::DiskFull);
    // New batches queue (so callers' memory stays in step) but are not durable while it lasts.
    let queued = store.apply(put("k/queued".into(), b"q")).unwrap();
    assert!(matches!(store.wait_durable(queued).await, Err(StoreError::DiskFull)));

    disk.set_capacity(None);
    tokio::time::timeout(Duration::from_secs(5), health.wait_for(|h| *h == Health::Ok)).await.unwrap().unwrap();
    store.commit(put("k/after".into(), b"ok")).await.unwrap();
    assert!(store.metrics().disk_full_stalls.get() >= 1);

    // Reported durable, kept; the refused batch stayed queued and landed when space returned.
    disk.crash();
    store.halt();
    drop(store);
    let store = open(dir.path(), options(&disk));
    let after = keys(&store, b"k/");
    for key in &durable {
        assert!(after.contains(key), "{key} was reported durable and is gone");
    }
    assert!(after.contains(&format!("k/{first_refused:04}")));
    assert!(after.contains(&"k/after".to_string()));
    assert!(after.contains(&"k/queued".to_string()), "a batch queued on the full disk landed in order");
}

/// A write torn by a crash is cut off at recovery; what was durable comes back exactly, and the
/// log keeps working across more restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_and_recovery_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    for i in 0..20u32 {
        store.commit(put(format!("k/{i:02}"), &[i as u8; 100])).await.unwrap();
    }
    disk.stall_syncs(true);
    let lsn = store.apply(put("k/torn".into(), &[9u8; 300])).unwrap();
    wait_until_written(&disk).await;
    disk.crash_tearing_last_write(150);
    disk.stall_syncs(false);
    assert!(store.wait_durable(lsn).await.is_err());
    store.halt();
    drop(store);

    let expected: Vec<String> = (0..20u32).map(|i| format!("k/{i:02}")).collect();
    let store = open(dir.path(), options(&disk));
    assert_eq!(keys(&store, b"k/"), expected);
    assert_eq!(store.last_lsn(), 20, "the torn batch's lsn is given out again");
    for i in 0..20u32 {
        assert_eq!(store.get(format!("k/{i:02}").as_bytes()).unwrap(), Some(vec![i as u8; 100]));
    }
    store.commit(put("k/zz".into(), b"short")).await.unwrap();
    disk.crash();
    store.halt();
    drop(store);
    let store = open(dir.path(), options(&disk));
    let mut expected = expected;
    expected.push("k/zz".into());
    assert_eq!(keys(&store, b"k/"), expected, "a shorter frame over the torn one reads back cleanly");
}

/// Damage before the tail is not a torn write: start-up stops with a clear error.
#[tokio::test]
async fn corruption_before_the_tail_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    for i in 0..10u32 {
        store.commit(put(format!("k/{i}"), b"value")).await.unwrap();
    }
    store.halt();
    drop(store);
    let log = dir.path().join("log");
    let segment = disk.files_under(&log).into_iter().find(|p| p.extension().is_some_and(|e| e == "wal")).unwrap();
    // Byte 40 is inside the first frame (the segment header takes 32).
    assert!(disk.flip_byte(&segment, 40));
    let error = Store::open_with(dir.path(), options(&disk), Arc::new(StoreMetrics::default())).err().unwrap();
    assert!(matches!(error, StoreError::LogCorrupt { .. }), "{error}");
    assert!(error.to_string().contains("refusing to start"), "{error}");
}

/// Values far above sled's blob threshold (~128 KiB) survive a crash like small ones, both from
/// the log and after a checkpoint has put them into sled.
#[tokio::test]
async fn large_values_are_as_durable_as_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let store = open(dir.path(), options(&disk));
    store.commit(put("big/1".into(), &large)).await.unwrap();
    store.commit(put("small/1".into(), b"s")).await.unwrap();
    disk.crash();
    store.halt();
    drop(store);

    let store = open(dir.path(), options(&disk));
    assert_eq!(store.get(b"big/1").unwrap().as_deref(), Some(large.as_slice()), "from the log");
    // Opening after a replay starts a checkpoint in the background; this one may find it done.
    store.checkpoint_now().unwrap();
    assert_eq!(store.checkpoint_lsn(), 2);
    assert!(dir.path().join("sled/blobs").read_dir().unwrap().next().is_some(), "sled keeps it as a blob");
    store.commit(put("big/2".into(), &large)).await.unwrap();
    disk.crash();
    store.halt();
    drop(store);

    let store = open(dir.path(), options(&disk));
    assert_eq!(store.get(b"big/1").unwrap().as_deref(), Some(large.as_slice()), "from sled");
    assert_eq!(store.get(b"big/2").unwrap().as_deref(), Some(large.as_slice()), "from the log again");
    assert_eq!(store.get(b"small/1").unwrap().as_deref(), Some(&b"s"[..]));
}

/// Checkpoints move state into sled and recycle the log, and deletions reach sled too.
#[tokio::test]
async fn checkpoints_recycle_segments_and_keep_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    let value = vec![1u8; 4000];
    for i in 0..100u32 {
        store.commit(put(format!("k/{i:03}"), &value)).await.unwrap();
    }
    let mut delete = WriteBatch::default();
    delete.delete(b"k/000".to_vec());
    store.commit(delete).await.unwrap();
    assert!(store.sealed_log_segments() >= 4, "400 KB over 64 KiB segments");
    assert!(store.checkpoint_now().unwrap());
    assert_eq!(store.sealed_log_segments(), 0, "every sealed segment is past the checkpoint");
    assert!(!store.checkpoint_now().unwrap(), "nothing new, nothing to do");
    let live: Vec<_> = disk.files_under(&dir.path().join("log"));
    assert!(live.len() <= 4, "segments are reused or removed, not kept: {live:?}");
    for i in 100..200u32 {
        store.commit(put(format!("k/{i:03}"), &value)).await.unwrap();
    }
    disk.crash();
    store.halt();
    drop(store);
    let store = open(dir.path(), options(&disk));
    let found = keys(&store, b"k/");
    assert_eq!(found.len(), 199);
    assert_eq!(found.first().map(String::as_str), Some("k/001"));
    assert_eq!(store.last_with_prefix(b"k/").unwrap().map(|(k, _)| k), Some(b"k/199".to_vec()));
}

/// Writes can reach the platter out of order: a later frame can survive a crash that loses an
/// earlier one. The log then ends before that frame, and the next life writes over the gap; even
/// when its new frame ends exactly where the old one starts, the old frame (of an older life)
/// must never be read back as data.
#[tokio::test]
async fn a_frame_left_over_from_a_crashed_life_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = open(dir.path(), options(&disk));
    for i in 0..10u32 {
        store.commit(put(format!("k/{i:02}"), b"durable")).await.unwrap();
    }
    // A disk whose cache acknowledges flushes it never does: both frames stay pending.
    disk.lie_about_syncs(true);
    store.commit(put("k/lost".into(), b"eleventh")).await.unwrap();
    store.commit(put("k/late".into(), b"twelfth!")).await.unwrap();
    // The crash keeps the twelfth frame and loses the eleventh.
    disk.crash_tearing_last_write(usize::MAX);
    disk.lie_about_syncs(false);
    store.halt();
    drop(store);

    let store = open(dir.path(), options(&disk));
    assert_eq!(store.last_lsn(), 10, "the log ends where the eleventh frame is missing");
    // Same sizes as the lost frame, so the new frame ends where the old twelfth begins.
    store.commit(put("k/next".into(), b"new 11th")).await.unwrap();
    disk.crash();
    store.halt();
    drop(store);

    let store = open(dir.path(), options(&disk));
    assert_eq!(store.get(b"k/next").unwrap().as_deref(), Some(&b"new 11th"[..]));
    assert_eq!(store.get(b"k/late").unwrap(), None, "a frame of a crashed life came back");
    assert_eq!(store.last_lsn(), 11);
}

/// Shutting down while the disk is full does not hang on the stalled writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_on_a_full_disk_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultyDisk::new();
    let store = Arc::new(open(dir.path(), options(&disk)));
    disk.set_capacity(Some(disk.used()));
    let value = vec![7u8; 1000];
    let mut full = false;
    for i in 0..1000u32 {
        if let Err(StoreError::DiskFull) = store.commit(put(format!("k/{i:04}"), &value)).await {
            full = true;
            break;
        }
    }
    assert!(full, "the disk never filled");
    // A plain thread, so that a hung close fails this test instead of hanging the runtime.
    let (closed, done) = std::sync::mpsc::channel();
    let closing = store.clone();
    std::thread::spawn(move || {
        closing.close();
        let _ = closed.send(());
    });
    done.recv_timeout(Duration::from_secs(5)).expect("close hung on a full disk");
    assert!(matches!(store.apply(put("k/x".into(), b"x")), Err(StoreError::Closed)));
}
