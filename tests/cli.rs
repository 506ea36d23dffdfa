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
    // check-config loads the TLS files it names, so they must exist: the example's paths under
    // /etc/edgecard are pointed at a real certificate and key here, the rest is the example as is.
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["shop.example".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("fullchain.pem"), dir.path().join("privkey.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/node.example.toml")).unwrap();
    assert!(shipped.contains("/etc/edgecard/tls/fullchain.pem") && shipped.contains("/etc/edgecard/tls/privkey.pem"));
    let localised = shipped
        .replace("/etc/edgecard/tls/fullchain.pem", cert.to_str().unwrap())
        .replace("/etc/edgecard/tls/privkey.pem", key.to_str().unwrap());
    let example = dir.path().join("node.toml");
    std::fs::write(&example, localised).unwrap();
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
        (format!("node_id = \"eu-1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"{key}\"\n[abuse]\nmax_difficulty = 40\n"), "abuse.max_difficulty"),
        (format!("node_id = \"eu-1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"{key}\"\n[abuse]\nflash_sale_skus = [\"a b\"]\n"), "abuse.flash_sale_skus"),
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

/// `node check-config` loads the TLS files as the server will: a key that is not the
/// certificate's, or a key given as the certificate, is an error; an expired certificate warns.
#[test]
fn check_config_checks_the_certificate_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let names = vec!["shop.example".to_string()];
    let good = rcgen::generate_simple_self_signed(names.clone()).unwrap();
    let other = rcgen::generate_simple_self_signed(names.clone()).unwrap();
    let mut past = rcgen::CertificateParams::new(names).unwrap();
    past.not_before = rcgen::date_time_ymd(2020, 1, 1);
    past.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let past_key = rcgen::KeyPair::generate().unwrap();
    let expired = past.self_signed(&past_key).unwrap();

    let cert = write("cert.pem", &good.cert.pem());
    let key = write("key.pem", &good.key_pair.serialize_pem());
    let wrong_key = write("other-key.pem", &other.key_pair.serialize_pem());
    let old_cert = write("old-cert.pem", &expired.pem());
    let old_key = write("old-key.pem", &past_key.serialize_pem());
    let coordinator_key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let check = |cert: &Path, key: &Path| {
        let config = format!(
            "node_id = \"eu-1\"\ndata_dir = \"d\"\n[http]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[trust]\ncoordinator_key = \"{coordinator_key}\"\n",
            cert.display(),
            key.display()
        );
        let path = write("node.toml", &config);
        edgecard(&["node", "check-config", "--config", path.to_str().unwrap()])
    };

    let ok = check(&cert, &key);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("matches its key, valid until"), "{}", text(&ok.stdout));
    assert!(!text(&ok.stderr).contains("warning"), "{}", text(&ok.stderr));

    let mismatched = check(&cert, &wrong_key);
    assert!(!mismatched.status.success(), "a key of another certificate was accepted");
    assert!(text(&mismatched.stderr).contains("http.tls_cert and http.tls_key"), "{}", text(&mismatched.stderr));

    let swapped = check(&key, &key);
    assert!(!swapped.status.success(), "a key file was accepted as the certificate");
    assert!(text(&swapped.stderr).contains("no CERTIFICATE block"), "{}", text(&swapped.stderr));

    let old = check(&old_cert, &old_key);
    assert!(old.status.success(), "{}", text(&old.stderr));
    assert!(text(&old.stderr).contains("warning: the TLS certificate expired on 2021-01-01"), "{}", text(&old.stderr));
}

/// `check-config` says when a product's currency has no channel: buyers could not pay in it.
#[test]
fn check_config_warns_about_currencies_no_channel_serves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let products = "[[products]]\nsku = \"card\"\ntitle = { en = \"Card\" }\n\
                    prices = [{ amount_minor = 100, currency = \"USD\" }, { amount_minor = 700, currency = \"CNY\" }]\n";
    let base = format!("node_id = \"eu-1\"\ndata_dir = \"d\"\n[trust]\ncoordinator_key = \"{key}\"\n");
    let epay =
        "[payments.epay]\nenabled = true\ngateway_url = \"https://pay.example\"\npid = \"1\"\nkey = \"12345678\"\n";
    std::fs::write(&path, format!("{base}{epay}{products}")).unwrap();
    let out = edgecard(&["node", "check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("warning: product card: no enabled payment channel serves USD"), "{stderr}");
    assert!(!stderr.contains("serves CNY"), "EPay serves CNY: {stderr}");

    std::fs::write(&path, format!("{base}[payments.sandbox]\nenabled = true\n{products}")).unwrap();
    let out = edgecard(&["node", "check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("warning"), "a lab node serves every currency: {}", text(&out.stderr));
}
