//! The CLI as operators use it: config checks, key generation and grant signing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn edgecard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgecard")).args(args).env("EDGECARD_LOG", "warn").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/node.example.toml");
    let out = edgecard(&["node", "check-config", "--config", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("reservation_ttl_secs = 900"), "{stdout}");
}

#[test]
fn a_bad_config_is_one_clear_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let cases = [
        (format!("node_id = \"eu-1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"{key}\"\n[orders]\nmax_quantity = 0\n"), "orders.max_quantity"),
        (format!("node_id = \"EU 1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"{key}\"\n"), "node_id"),
        ("node_id = \"eu-1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"nothex\"\n".to_string(), "trust.coordinator_key"),
        (format!("node_id = \"eu-1\"\ndata_dir = \"d\"\nlisten = 1\n[trust]\ncoordinator_key = \"{key}\"\n"), "listen"),
        ("this is = = not toml".to_string(), "node.toml"),
    ];
    for (config, field) in cases {
        std::fs::write(&path, &config).unwrap();
        let out = edgecard(&["node", "check-config", "--config", path.to_str().unwrap()]);
        assert!(!out.status.success(), "accepted:\n{config}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(field), "error for {field} does not name it: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = edgecard(&["node", "check-config", "--config", "/nonexistent/node.toml"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/node.toml"));
}

#[test]
fn keygen_and_sign_make_a_grant_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let out = edgecard(&["grant", "keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("verifying key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = edgecard(&["grant", "keygen", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success(), "an existing signing key must not be overwritten");

    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "\u{feff}AAAA-1111\r\n\r\nBBBB-2222\r\n").unwrap();
    let grant = dir.path().join("eu-1.grant");
    let args = [
        "grant",
        "sign",
        "--signing-key",
        key.to_str().unwrap(),
        "--node",
        "eu-1",
        "--sku",
        "game-10",
        "--keys",
        keys.to_str().unwrap(),
        "--slice-id",
        "7",
        "--out",
        grant.to_str().unwrap(),
    ];
    let out = edgecard(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 keys"), "{}", text(&out.stdout));
    let signed = edgecard_protocol::SignedGrant::from_bytes(&std::fs::read(&grant).unwrap()).unwrap();
    let verifying = edgecard::grant_tool::load_signing_key(&key).unwrap().verifying_key();
    let decoded = signed.verify(&verifying, &edgecard_protocol::NodeId::new("eu-1").unwrap()).unwrap();
    assert_eq!(decoded.keys.len(), 2);
    assert_eq!(decoded.keys[1].secret.expose(), "BBBB-2222");

    std::fs::write(&keys, "GOOD-KEY\nBAD\u{7}KEY\n").unwrap();
    let out = edgecard(&args);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("line 2"), "{}", text(&out.stderr));
}
