//! Data dirs are private: a coordinator and a node, as real processes, keep their dirs 0700 and
//! their files 0600 (card keys are in them), and a node whose data dir was left open to other
//! users makes it private at start, with a warning.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::coordinator::*;
use common::*;

/// Every path under `dir` (itself included) whose mode lets group or others in.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mode = std::fs::symlink_metadata(dir).unwrap().permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        found.push((dir.to_path_buf(), mode));
    }
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            found.extend(open_to_others(&entry.unwrap().path()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dirs_are_private_and_loose_ones_are_tightened_at_start() {
    let lab = Lab::start(Ports::Any).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(5)).await;
    let config = lab.add_node("eu-1", "eu").await;
    lab.allocate(SKU, "eu-1", 5).await;
    let mut node = start_node(&config).await;
    wait_for_stock(&node, 5).await;
    node.client().await.buy(1).await;

    let data_dir = config.parent().unwrap().join("data");
    assert_eq!(open_to_others(&lab.coordinator_dir()), vec![], "the coordinator's dir");
    assert_eq!(open_to_others(&data_dir), vec![], "the node's data dir");

    // An operator's copy or a careless chmod opened it up; the next start closes it again.
    node.terminate();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data_dir.join("store/sled/db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(open_to_others(&data_dir).len(), 2);
    let node = start_node(&config).await;
    assert_eq!(open_to_others(&data_dir), vec![]);
    assert!(node.stderr().contains("made private"), "a warning says so:\n{}", node.stderr());
}
