//! Rewriting a whole store sealed under the current key: the migration of a plaintext store and
//! the second half of a key rotation.
//!
//! Old plaintext (or values under a retired key) must not linger in log segments, spare segments
//! or sled's log-structured pages, so the store is not re-sealed in place: every live entry is
//! read, sealed and written into a fresh store beside it (`<dir>.resealing`, fresh sled, empty
//! log), which then replaces the old directory; the old one is deleted whole.
//!
//! Crash safety: the new store is complete and durable before the first rename. At open,
//! [`finish_interrupted`] completes or discards an interrupted swap:
//!
//! | found | meaning | done |
//! |---|---|---|
//! | `.resealing`, no `.resealed-old` | the build was interrupted; `dir` is intact | remove `.resealing` |
//! | `.resealing` and `.resealed-old` | interrupted between the renames; the build is complete | move `.resealing` to `dir` |
//! | `.resealed-old` only | interrupted while deleting the old store | remove it |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::fsync_tree;
use crate::error::StoreError;
use crate::metrics::StoreMetrics;
use crate::seal::Sealer;
use crate::store::{write_durably, Store, StoreOptions, FORMAT_SEALED, SEALING_CHECK};

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_at(dir))
}

fn parent(dir: &Path) -> &Path {
    dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Completes or discards a re-seal a crash interrupted (see the module doc).
pub(crate) fn finish_interrupted(dir: &Path) -> Result<(), StoreError> {
    let building = sibling(dir, ".resealing");
    let old = sibling(dir, ".resealed-old");
    match (building.exists(), old.exists()) {
        (false, false) => return Ok(()),
        (true, false) => {
            tracing::warn!(dir = %dir.display(), "an interrupted re-seal left a partial copy; removed it");
            std::fs::remove_dir_all(&building).map_err(io_at(&building))?;
        }
        (true, true) => {
            // The caller may have made `dir` again, empty, before opening.
            if dir.exists() {
                std::fs::remove_dir(dir).map_err(io_at(dir))?;
            }
            std::fs::rename(&building, dir).map_err(io_at(dir))?;
            fsync_dir(parent(dir))?;
            tracing::warn!(dir = %dir.display(), "completed an interrupted re-seal");
            std::fs::remove_dir_all(&old).map_err(io_at(&old))?;
        }
        (false, true) => std::fs::remove_dir_all(&old).map_err(io_at(&old))?,
    }
    fsync_dir(parent(dir))
}

/// Rewrites the store in `dir` with every value sealed under `writer`'s current key. The store's
/// values are read as plaintext (`sealed_values` false) or opened with `writer`'s ring.
pub(crate) fn reseal(
    dir: &Path,
    options: &StoreOptions,
    sealed_values: bool,
    writer: &Arc<Sealer>,
) -> Result<u64, StoreError> {
    let started = std::time::Instant::now();
    let building = sibling(dir, ".resealing");
    let old = sibling(dir, ".resealed-old");
    let source = Store::open_layout(dir, options.clone(), Arc::new(StoreMetrics::default()), sealed_values)?;
    let written = build(&source, &building, options, writer);
    // Nothing of the source is needed any more: stop it without a last checkpoint.
    source.halt();
    drop(source);
    let written = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    std::fs::rename(dir, &old).map_err(io_at(dir))?;
    std::fs::rename(&building, dir).map_err(io_at(dir))?;
    fsync_dir(parent(dir))?;
    std::fs::remove_dir_all(&old).map_err(io_at(&old))?;
    fsync_dir(parent(dir))?;
    tracing::info!(
        dir = %dir.display(),
        entries = written,
        key_version = writer.current_version(),
        from_plaintext = !sealed_values,
        seconds = started.elapsed().as_secs_f64(),
        "store re-sealed under the current key; the old files are deleted"
    );
    Ok(written)
}

fn build(source: &Store, building: &Path, options: &StoreOptions, writer: &Sealer) -> Result<u64, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if building.exists() {
        std::fs::remove_dir_all(building).map_err(io_at(building))?;
    }
    let sled_dir = building.join("sled");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&sled_dir).map_err(io_at(&sled_dir))?;
    let db = crate::store::open_sled(&sled_dir, options.cache_capacity)?;
    let mut written = 0u64;
    for entry in source.scan_prefix(b"") {
        let (key, value) = entry?;
        db.insert(key.as_slice(), writer.seal(&key, &value))?;
        written += 1;
    }
    db.flush()?;
    drop(db);
    crate::private::make_private(building).map_err(io_at(building))?;
    fsync_tree(&sled_dir).map_err(io_at(&sled_dir))?;
    write_durably(&building.join(SEALING_CHECK), &writer.check_value())?;
    write_durably(&building.join("FORMAT"), FORMAT_SEALED.as_bytes())?;
    Ok(written)
}
