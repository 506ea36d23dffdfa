//! Reading a data dir back as bytes, to prove what is (not) on disk: every file under a dir, the
//! secrets whose bytes appear in any of them, a snapshot to compare before and after. Used by
//! the sealing tests of this crate and of the end-to-end suite; symlinks are not followed.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Every file under `root`, at any depth.
pub fn files_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if std::fs::symlink_metadata(&path)?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// Every (file, secret) pair under `root` where the secret's bytes are in the file.
pub fn secrets_in_files(root: &Path, secrets: &[String]) -> io::Result<Vec<(PathBuf, String)>> {
    let mut hits = Vec::new();
    for file in files_under(root)? {
        let bytes = std::fs::read(&file)?;
        for secret in secrets.iter().filter(|s| contains(&bytes, s.as_bytes())) {
            hits.push((file.clone(), secret.clone()));
        }
    }
    Ok(hits)
}

/// Every file under `root` with its contents.
pub fn snapshot(root: &Path) -> io::Result<BTreeMap<PathBuf, Vec<u8>>> {
    files_under(root)?.into_iter().map(|f| std::fs::read(&f).map(|bytes| (f, bytes))).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else { return true };
    // Candidates by first byte: a plain window scan over 16 MiB log segments is slow in debug builds.
    haystack
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == first)
        .any(|(i, _)| haystack.get(i..i + needle.len()) == Some(needle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_secret_in_a_nested_file_and_only_there() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("a/b")).unwrap();
        std::fs::write(root.path().join("a/b/seg"), b"xxSECRET-1yy").unwrap();
        std::fs::write(root.path().join("other"), b"SECRET-").unwrap();
        let secrets = vec!["SECRET-1".to_string(), "SECRET-2".to_string()];
        let hits = secrets_in_files(root.path(), &secrets).unwrap();
        assert_eq!(hits, vec![(root.path().join("a/b/seg"), "SECRET-1".to_string())]);
        assert_eq!(snapshot(root.path()).unwrap().len(), 2);
    }
}
