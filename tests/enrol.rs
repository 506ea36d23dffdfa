//! Node enrolment with join tokens, end to end with real processes: `edgecard coordinator run`,
//! `edgecard nodes add` (which prints a join token), `edgecard node enrol` (which makes the key
//! on the node's side and sends only a signing request to the enrolment endpoint), then
//! `edgecard node run` syncing over QUIC with the enrolled certificate.
//!
//! What each test shows: the enrolled node gets its slice over the sync link and the coordinator
//! never held its key; a token works once, also across a `kill -9` of the coordinator; expired,
//! unknown, malformed and revoked-node tokens are refused with their reason and write nothing;
//! a token whose pinned CA is not the one the endpoint presents makes the node refuse to send
//! its request at all; one client address gets a burst of requests, then one per 6 s.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::coordinator::*;
use common::*;
use edgecard_coordinator::enrol::token::{JoinToken, TokenSecret};
use serde_json::Value;

/// `nodes add NAME --region R --json` (optionally with `--ttl`): the answer with the join token.
async fn join_token(lab: &Lab, name: &str, extra: &[&str]) -> Value {
    let mut args = vec!["nodes", "add", name, "--region", "eu"];
    args.extend_from_slice(extra);
    let answer = lab.json(&args).await;
    assert!(answer["join_token"].as_str().unwrap().starts_with("ecj1_"), "{answer}");
    assert!(!answer.to_string().contains("PRIVATE KEY"), "the admin API handed out a key: {answer}");
    answer
}

/// `edgecard node enrol --join-token T --dir D [extra]`.
async fn enrol(token: &str, dir: &Path, extra: &[&str]) -> CliOutput {
    let dir = dir.display().to_string();
    let mut args = vec!["node", "enrol", "--join-token", token, "--dir", &dir];
    args.extend_from_slice(extra);
    edgecard(&args, &[]).await
}

/// The enrolment failed with one line naming `reason`, and wrote nothing.
fn assert_refused(out: &CliOutput, reason: &str, dir: &Path) {
    assert_eq!(out.code, Some(1), "enrolment should fail:\n{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(reason), "expected {reason:?} in: {}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    for file in ["node.toml", "node-key.pem", "node-cert.pem", "ca-cert.pem"] {
        assert!(!dir.join(file).exists(), "{file} written by a failed enrolment");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrols_with_a_join_token_syncs_and_the_token_works_once() {
    let mut lab = Lab::start(Ports::Fixed).await;
    lab.add_product(SKU, PRICE_MINOR).await;
    lab.import(SKU, &make_secrets(20)).await;
    let answer = join_token(&lab, "eu-1", &[]).await;
    let token = answer["join_token"].as_str().unwrap().to_string();
    assert!(!lab.coordinator.current_log().contains(&token), "the token reached the coordinator's log");

    let dir = lab.dir.path().join("eu-1");
    let out = enrol(&token, &dir, &[]).await;
    assert_eq!(out.code, Some(0), "enrolment failed:\n{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("node run --config"), "{}", out.stdout);

    // The key was made here, is owner-only, and is the one the certificate certifies.
    let key_pem = std::fs::read_to_string(dir.join("node-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.join("node-key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap();
    let cert_pem = std::fs::read_to_string(dir.join("node-cert.pem")).unwrap();
    let node = edgecard_coordinator::pki::check_node_cert(&cert_pem, &ca_pem, &key.public_key_der()).unwrap();
    assert_eq!(node.as_str(), "eu-1");
    let private_body: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!lab.coordinator.logs().contains(&private_body[..40]));
    assert!(!lab.coordinator.logs().contains(&token), "the token reached the coordinator's log");

    // The enrolled node syncs with that certificate: its slice arrives over QUIC.
    let config = dir.join("node.toml");
    make_runnable(&config);
    lab.allocate(SKU, "eu-1", 5).await;
    let mut node = start_node(&config).await;
    wait_for_stock(&node, 5).await;
    let status = lab.status().await;
    let eu = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "eu-1").unwrap().clone();
    assert!(eu["last_contact"].as_u64().is_some(), "{status:#}");

    // A second use is refused, also after the coordinator was killed and restarted.
    let again = lab.dir.path().join("again");
    assert_refused(&enrol(&token, &again, &[]).await, "token_used", &again);
    lab.restart_coordinator().await;
    assert_refused(&enrol(&token, &again, &[]).await, "token_used", &again);
    // A fresh token for the same node works (a rebuilt machine), and never into a dir holding a node.
    let fresh = lab.json(&["nodes", "token", "eu-1"]).await;
    let fresh = fresh["join_token"].as_str().unwrap();
    let out = enrol(fresh, &dir, &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("holds a node"), "{}", out.stderr);
    let out = enrol(fresh, &again, &[]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    node.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_unknown_revoked_and_foreign_ca_tokens_are_refused() {
    let lab = Lab::start(Ports::Any).await;
    let nowhere = lab.dir.path().join("node");

    let short = join_token(&lab, "us-1", &["--ttl", "1s"]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_refused(&enrol(short["join_token"].as_str().unwrap(), &nowhere, &[]).await, "token_expired", &nowhere);

    // The real token's address and CA pin with a secret the coordinator never issued.
    let real = join_token(&lab, "ap-1", &[]).await;
    let real = real["join_token"].as_str().unwrap();
    let unknown = JoinToken { secret: TokenSecret::generate(), ..JoinToken::parse(real).unwrap() }.encode().unwrap();
    assert_refused(&enrol(&unknown, &nowhere, &[]).await, "token_unknown", &nowhere);
    assert_refused(&enrol("ecj1_not-a-token", &nowhere, &[]).await, "join token", &nowhere);

    let revoked = join_token(&lab, "sa-1", &[]).await;
    lab.ok(&["nodes", "revoke", "sa-1"]).await;
    assert_refused(&enrol(revoked["join_token"].as_str().unwrap(), &nowhere, &[]).await, "node_revoked", &nowhere);

    // Another coordinator's token, sent to this one's endpoint: the CA it presents is not the
    // pinned one, so the node stops in the handshake and sends nothing.
    let other = Lab::start(Ports::Any).await;
    let foreign = join_token(&other, "eu-9", &[]).await;
    let foreign = foreign["join_token"].as_str().unwrap();
    let here = lab.coordinator_enrol_addr();
    let before = lab.coordinator.current_log();
    assert_refused(&enrol(foreign, &nowhere, &["--coordinator", &here]).await, "pins", &nowhere);
    let after = lab.coordinator.current_log();
    assert!(!after[before.len()..].contains("enrol"), "the coordinator saw a request: {}", &after[before.len()..]);
    // That token was not spent: at its own coordinator it still enrols.
    let out = enrol(foreign, &nowhere, &[]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);

    // Every refusal above left the real token alone.
    let ok_dir = lab.dir.path().join("ap-1");
    let out = enrol(real, &ok_dir, &[]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrolment_endpoint_rate_limits_each_client_address() {
    let lab = Lab::start(Ports::Any).await;
    let real = join_token(&lab, "eu-1", &[]).await;
    let unknown = JoinToken {
        secret: TokenSecret::generate(),
        ..JoinToken::parse(real["join_token"].as_str().unwrap()).unwrap()
    };
    let unknown = unknown.encode().unwrap();
    let dir = lab.dir.path().join("node");
    // The burst: each request is answered on its merits.
    for _ in 0..10 {
        assert_refused(&enrol(&unknown, &dir, &[]).await, "token_unknown", &dir);
    }
    // Then the address is held to one request per 6 s (bounded: these attempts take far less).
    let mut limited = false;
    for _ in 0..10 {
        let out = enrol(&unknown, &dir, &[]).await;
        if out.stderr.contains("rate_limited") {
            assert_refused(&out, "rate_limited", &dir);
            limited = true;
            break;
        }
        assert_refused(&out, "token_unknown", &dir);
    }
    assert!(limited, "20 requests from one address within seconds were all served");
    // Once the address's next request is due, the real token (untouched by all this) enrols.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let out = enrol(real["join_token"].as_str().unwrap(), &dir, &[]).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);

    // The operator sees it all in the coordinator's metrics.
    let admin = edgecard::https_client::Endpoint::parse(&lab.admin_url(), None).unwrap();
    let bearer = format!("Bearer {}", lab.token);
    let metrics = admin.request(edgecard::https_client::Request::get("/metrics").header("authorization", &bearer));
    let metrics = parse_metrics(&metrics.await.unwrap().text());
    let count = |result: &str| metrics.get(&format!("edgecard_enrol_requests_total{{result=\"{result}\"}}")).copied();
    let enrol: Vec<_> = metrics.iter().filter(|(series, _)| series.starts_with("edgecard_enrol")).collect();
    assert!(count("token_unknown").is_some_and(|n| n >= 10.0), "{enrol:?}");
    assert_eq!(count("rate_limited"), Some(1.0), "{enrol:?}");
    assert_eq!(count("enrolled"), Some(1.0), "{enrol:?}");
}
