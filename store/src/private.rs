//! Data dirs are private to the service's user: directories 0700, files 0600. Card keys are in
//! them; other local users must not even list them.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and its parents) 0700, or, if it exists, makes it and everything under it
/// private: directories 0700, files 0600. Returns the paths whose modes were looser and were
/// tightened, so the caller can warn about them.
pub fn make_private(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut tightened = Vec::new();
    tighten(dir, &mut tightened)?;
    Ok(tightened)
}

fn tighten(path: &Path, tightened: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        // Removed meanwhile (sled drops old snapshots as it goes).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = metadata.file_type();
    if kind.is_symlink() {
        return Ok(());
    }
    let wanted = if kind.is_dir() { 0o700 } else { 0o600 };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o077 | wanted & 0o700))?;
        tightened.push(path.to_path_buf());
    }
    if kind.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path(), tightened)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_dirs_are_private_and_loose_trees_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        assert!(make_private(&fresh).unwrap().is_empty());
        assert_eq!(mode(&fresh), 0o700);

        let loose = root.path().join("loose");
        std::fs::create_dir_all(loose.join("sub")).unwrap();
        std::fs::write(loose.join("sub/db"), b"secret").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(loose.join("sub"), std::fs::Permissions::from_mode(0o775)).unwrap();
        std::fs::set_permissions(loose.join("sub/db"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let tightened = make_private(&loose).unwrap();
        assert_eq!(tightened.len(), 3, "{tightened:?}");
        assert_eq!((mode(&loose), mode(&loose.join("sub")), mode(&loose.join("sub/db"))), (0o700, 0o700, 0o600));
        assert!(make_private(&loose).unwrap().is_empty(), "nothing left to tighten");
    }
}
