//! The fuzz corpora as regression tests on stable: every file of `fuzz/corpus/<target>/` goes
//! through the target's harness, the same function its cargo-fuzz target calls (docs/fuzzing.md).
//!
//! Also the generator of the corpora's seed files (`seed-*`): real messages made by the real
//! encoders and signers, and real provider callbacks signed the way the test gateway signs
//! them. `seeds_are_what_the_encoders_make` checks the committed seeds against it;
//! `EDGECARD_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpora` rewrites them after a format
//! change. Other files in a corpus (`regress-*`) are inputs that once broke a harness.
#![allow(clippy::unwrap_used)]

#[path = "common/fake_gateway.rs"]
mod fake_gateway;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use edgecard_protocol::{
    CatalogProduct, ControlBody, ControlMessage, Epoch, GrantedKey, KeyId, LeaseRenewal, NodeId, OrderEvent,
    OrderEventBatch, OrderEventKind, OrderId, OrderLookup, RefusedControl, Secret, Sku, SliceGrant, SliceId,
    SliceStock, SyncAck, SyncUpload, UnixMillis,
};
use serde_json::{json, Value};

type Harness = fn(&[u8]);

/// Every cargo-fuzz target, with the harness it calls.
const TARGETS: &[(&str, Harness)] = &[
    ("envelope", edgecard_protocol::fuzzing::envelope),
    ("grant", edgecard_protocol::fuzzing::grant),
    ("sync_upload", edgecard_protocol::fuzzing::sync_upload),
    ("sync_ack", edgecard_protocol::fuzzing::sync_ack),
    ("import_keys", edgecard_coordinator::fuzzing::import_keys),
    ("join_token", edgecard_coordinator::fuzzing::join_token),
    ("enrol_request", edgecard_coordinator::fuzzing::enrol_request),
    ("stripe_webhook", edgecard_node::fuzzing::stripe_webhook),
    ("epay_notify", edgecard_node::fuzzing::epay_notify),
    ("storefront_form", edgecard_node::fuzzing::storefront_form),
    ("order_json", edgecard_node::fuzzing::order_json),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_target_has_a_harness_here_and_a_corpus() {
    let listed: BTreeSet<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(listed, on_disk, "fuzz/fuzz_targets and this test name the same targets");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let target = std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"))).unwrap();
        assert!(target.contains(&format!("::fuzzing::{name}(data)")), "fuzz target {name} calls the harness {name}");
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml declares {name}");
        let files = corpus_files(name);
        assert!(files.len() >= 5, "corpus of {name} has {} files", files.len());
        assert!(files.len() <= 64, "corpus of {name} has {} files: keep it small", files.len());
    }
}

#[test]
fn corpora_replay_through_their_harnesses() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, harness) in TARGETS {
        for file in corpus_files(name) {
            let data = std::fs::read(&file).unwrap();
            assert!(data.len() <= 64 * 1024, "{}: corpus files stay small", file.display());
            if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                failures.push(file.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(failures.is_empty(), "harnesses failed on: {failures:#?}");
    assert!(replayed >= 5 * TARGETS.len(), "replayed {replayed} files");
}

#[test]
fn seeds_are_what_the_encoders_make() {
    let write = std::env::var_os("EDGECARD_WRITE_FUZZ_SEEDS").is_some();
    let seeds = seeds();
    for (target, name, bytes) in &seeds {
        assert!(TARGETS.iter().any(|(t, _)| t == target), "seed for unknown target {target}");
        let path = fuzz_dir().join("corpus").join(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == *bytes,
            "{} is not what the encoders make now; rerun with EDGECARD_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
    // No stale seed is left behind.
    for (target, _) in TARGETS {
        for file in corpus_files(target) {
            let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(name) = file_name.strip_prefix("seed-") {
                let known = seeds.iter().any(|(t, n, _)| t == target && n == name);
                assert!(known, "{} is no longer generated", file.display());
            }
        }
    }
    // Each seed passes its own harness (the replay test covers regressions too).
    for (target, name, bytes) in &seeds {
        let harness = TARGETS.iter().find(|(t, _)| t == target).unwrap().1;
        assert!(catch_unwind(|| harness(bytes)).is_ok(), "seed {target}/{name}");
    }
}

type Seed = (&'static str, String, Vec<u8>);

fn seeds() -> Vec<Seed> {
    let mut all = Vec::new();
    all.extend(protocol_seeds());
    all.extend(import_seeds());
    all.extend(enrol_seeds());
    all.extend(stripe_seeds());
    all.extend(epay_seeds());
    all.extend(storefront_seeds());
    all.extend(order_json_seeds());
    all
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn sku(name: &str) -> Sku {
    Sku::new(name).unwrap()
}

fn grant(node_id: &str, first_key: u64, secrets: &[&str]) -> SliceGrant {
    SliceGrant {
        slice_id: SliceId(first_key),
        sku: sku("game-10"),
        node_id: node(node_id),
        epoch: Epoch(1),
        issued_at: UnixMillis(1_767_225_600_000),
        lease_deadline: UnixMillis(1_767_225_600_000 + 24 * 3_600_000),
        take_window: 10_000,
        keys: secrets
            .iter()
            .enumerate()
            .map(|(i, s)| GrantedKey {
                key_id: KeyId(first_key + i as u64),
                secret: Secret::new(s.to_string()).unwrap(),
            })
            .collect(),
    }
}

fn event(seq: u64, kind: OrderEventKind) -> OrderEvent {
    OrderEvent {
        node_id: node("eu-1"),
        seq,
        at: UnixMillis(1_767_225_600_000 + seq),
        order_id: if matches!(kind, OrderEventKind::Released { .. }) {
            OrderId::NONE
        } else {
            OrderId::from_bytes([0x40 + (seq as u8).div_ceil(2); 16])
        },
        sku: sku("game-10"),
        kind,
    }
}

/// Events of every kind, as a node writes them for two orders and a release.
fn events() -> Vec<OrderEvent> {
    vec![
        event(
            1,
            OrderEventKind::Reserved {
                key_ids: vec![KeyId(1), KeyId(2)],
                quantity: 2,
                amount_minor: 2000,
                currency: "USD".into(),
                expires_at: UnixMillis(1_767_226_500_000),
                token_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            },
        ),
        event(
            2,
            OrderEventKind::Paid {
                channel: "stripe".into(),
                provider_txn: "cs_test_a1b2c3".into(),
                amount_minor: 2000,
                currency: "USD".into(),
            },
        ),
        event(3, OrderEventKind::Delivered { key_ids: vec![KeyId(1), KeyId(2)] }),
        event(
            4,
            OrderEventKind::Reserved {
                key_ids: vec![KeyId(3)],
                quantity: 1,
                amount_minor: 7200,
                currency: "CNY".into(),
                expires_at: UnixMillis(1_767_226_500_004),
                token_sha256: String::new(),
            },
        ),
        event(5, OrderEventKind::Expired { key_ids: vec![KeyId(3)] }),
        event(6, OrderEventKind::AwaitingStock { quantity: 3 }),
        event(
            7,
            OrderEventKind::Released {
                slice_id: SliceId(1),
                epoch: Epoch(2),
                ticket: 11,
                key_ids: vec![KeyId(9), KeyId(10)],
            },
        ),
    ]
}

fn protocol_seeds() -> Vec<Seed> {
    let key = edgecard_protocol::fuzzing::coordinator_key();
    let other_key = SigningKey::from_bytes(&[0x11; 32]);
    let small = grant("eu-1", 1, &["GAME-AAAA-1111", "GAME-BBBB-2222", "GAME-CCCC-3333"]);
    let many: Vec<String> = (0..24).map(|i| format!("KEY-{i:04}-{:08x}", i * 2_654_435_761u64 % (1 << 32))).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let large = grant("eu-1", 100, &many);
    let unicode = grant("eu-1", 500, &["点卡-壹佰-0001", "Ключ 2", "clé avec espaces"]);
    let elsewhere = grant("us-1", 1, &["GAME-AAAA-1111"]);
    let signed = small.sign(&key).unwrap();
    let renewal = LeaseRenewal {
        slice_id: SliceId(1),
        node_id: node("eu-1"),
        epoch: Epoch(2),
        issued_at: UnixMillis(1_767_225_600_000),
        lease_deadline: UnixMillis(1_767_312_000_000),
    };
    let signed_renewal = renewal.sign(&key).unwrap();
    let batch = OrderEventBatch { node_id: node("eu-1"), events: events() };
    let poll = SyncUpload {
        node_id: node("eu-1"),
        incarnation: 0x5eed_1234,
        newest_seq: 0,
        events: Vec::new(),
        control_applied: 0,
        stock: Vec::new(),
        refused_control: Vec::new(),
        lookups: Vec::new(),
    };
    let upload = SyncUpload {
        newest_seq: 9,
        events: events(),
        control_applied: 4,
        stock: vec![
            SliceStock { slice_id: SliceId(1), sku: sku("game-10"), available: 197, selling: true },
            SliceStock { slice_id: SliceId(2), sku: sku("gift.card_50"), available: 0, selling: false },
        ],
        refused_control: vec![RefusedControl {
            seq: 3,
            reason: "grant signature does not verify against the pinned coordinator key".into(),
            holds_nothing: true,
        }],
        lookups: vec![OrderLookup { email: "buyer@example.com".into(), lang: "zh-CN".into() }],
        ..poll.clone()
    };
    let empty_ack = SyncAck {
        events_high_water: 0,
        control: Vec::new(),
        ledger_high_water: 0,
        restore: Vec::new(),
        confirmed: true,
    };
    let control = vec![
        ControlMessage { seq: 1, body: ControlBody::Grant { signed_grant: signed.to_bytes().unwrap() } },
        ControlMessage {
            seq: 2,
            body: ControlBody::Catalog {
                products: vec![CatalogProduct {
                    sku: sku("game-10"),
                    titles: vec![
                        ("en".into(), "Game card, 10 USD".into()),
                        ("zh-CN".into(), "游戏点卡 10 美元".into()),
                    ],
                    prices: vec![(1000, "USD".into()), (7200, "CNY".into())],
                }],
            },
        },
        ControlMessage { seq: 3, body: ControlBody::Renew { signed_renewal: signed_renewal.to_bytes().unwrap() } },
        ControlMessage {
            seq: 4,
            body: ControlBody::Shrink {
                slice_id: SliceId(1),
                sku: sku("game-10"),
                epoch: Epoch(2),
                count: 50,
                close: false,
                ticket: 11,
            },
        },
        ControlMessage {
            seq: 5,
            body: ControlBody::Shrink {
                slice_id: SliceId(2),
                sku: sku("game-10"),
                epoch: Epoch(3),
                count: 0,
                close: true,
                ticket: 12,
            },
        },
        ControlMessage {
            seq: 6,
            body: ControlBody::FindOrders {
                lookup: OrderLookup { email: "buyer@example.com".into(), lang: "en".into() },
            },
        },
    ];
    let ack = SyncAck { events_high_water: 7, control, ledger_high_water: 7, restore: Vec::new(), confirmed: true };
    let restoring = SyncAck {
        events_high_water: 2,
        control: Vec::new(),
        ledger_high_water: 7,
        restore: events()[2..].to_vec(),
        confirmed: false,
    };

    let mut seeds: Vec<Seed> = vec![
        ("envelope", "slice-grant".into(), small.to_bytes().unwrap()),
        ("envelope", "signed-grant".into(), signed.to_bytes().unwrap()),
        ("envelope", "event-batch".into(), batch.to_bytes().unwrap()),
        ("envelope", "sync-upload".into(), upload.to_bytes().unwrap()),
        ("envelope", "sync-ack".into(), ack.to_bytes().unwrap()),
        (
            "envelope",
            "lease-renewal".into(),
            edgecard_protocol::encode(edgecard_protocol::MessageKind::LeaseRenewal, &renewal).unwrap(),
        ),
        ("envelope", "signed-renewal".into(), signed_renewal.to_bytes().unwrap()),
        ("envelope", "header-only".into(), small.to_bytes().unwrap()[..12].to_vec()),
    ];
    for (name, g, k) in [
        ("small", &small, &key),
        ("large", &large, &key),
        ("unicode", &unicode, &key),
        ("other-node", &elsewhere, &key),
        ("other-key", &small, &other_key),
    ] {
        let signed = g.sign(k).unwrap();
        seeds.push(("grant", format!("signed-{name}"), signed.to_bytes().unwrap()));
    }
    seeds.push(("grant", "bytes-small".into(), small.to_bytes().unwrap()));
    seeds.push(("grant", "bytes-unicode".into(), unicode.to_bytes().unwrap()));
    seeds.push(("grant", "bytes-other-node".into(), elsewhere.to_bytes().unwrap()));

    seeds.push(("sync_upload", "poll".into(), poll.to_bytes().unwrap()));
    seeds.push(("sync_upload", "events-stock-refusals".into(), upload.to_bytes().unwrap()));
    let only_events =
        SyncUpload { stock: Vec::new(), refused_control: Vec::new(), lookups: Vec::new(), ..upload.clone() };
    seeds.push(("sync_upload", "events".into(), only_events.to_bytes().unwrap()));
    let restarted = SyncUpload { incarnation: u64::MAX, newest_seq: 3, events: events()[..3].to_vec(), ..poll };
    seeds.push(("sync_upload", "restarted".into(), restarted.to_bytes().unwrap()));
    seeds.push(("sync_upload", "not-an-upload".into(), ack.to_bytes().unwrap()));

    seeds.push(("sync_ack", "empty".into(), empty_ack.to_bytes().unwrap()));
    seeds.push(("sync_ack", "control".into(), ack.to_bytes().unwrap()));
    seeds.push(("sync_ack", "restore".into(), restoring.to_bytes().unwrap()));
    let beyond = SyncAck { events_high_water: 5000, ledger_high_water: 5000, ..empty_ack.clone() };
    seeds.push(("sync_ack", "beyond-upload".into(), beyond.to_bytes().unwrap()));
    seeds.push(("sync_ack", "not-an-ack".into(), upload.to_bytes().unwrap()));
    // Restored seqs at the top of the range: u64::MAX followed by 0 once wrapped to "contiguous".
    let at_the_top = |seq: u64| OrderEvent { seq, ..events()[2].clone() };
    let wrapping = SyncAck {
        events_high_water: 0,
        control: Vec::new(),
        ledger_high_water: u64::MAX,
        restore: vec![at_the_top(u64::MAX), at_the_top(0)],
        confirmed: false,
    };
    seeds.push(("sync_ack", "restore-wraps-at-u64-max".into(), wrapping.to_bytes().unwrap()));
    seeds
}

fn import_seeds() -> Vec<Seed> {
    let files: [(&str, String); 8] = [
        ("lines", (1..=12).map(|i| format!("GAME-{i:04}-ABCD-EFGH\n")).collect()),
        ("bom-crlf-blank-duplicates", "\u{feff}AAA-1\r\n\r\nBBB-2\r\nAAA-1\r\n  \r\nCCC-3\r\n".into()),
        ("no-final-newline", "KEY-ONE\nKEY-TWO\n  KEY-THREE  ".into()),
        ("invalid-rows", format!("GOOD-1\n{}\nBAD\u{1}KEY\nGOOD-2\n", "X".repeat(600))),
        (
            "csv-header-quotes",
            "serial,code,note\n1,\"AB,CD\",x\n2,EF\"\"GH,y\n3\n4,\"open\n5,\"say \"\"hi\"\"\",z\n".into(),
        ),
        (
            "csv-export",
            "id,key,sku,created\n17,GC-17-XXXX,game-10,2026-01-01\n18,GC-18-YYYY,game-10,2026-01-01\n".into(),
        ),
        ("unicode", "点卡-壹佰-0001\nКлюч 2\nclé avec espaces\n\u{2028}\n".into()),
        ("empty", String::new()),
    ];
    files.into_iter().map(|(name, text)| ("import_keys", name.to_string(), text.into_bytes())).collect()
}

/// A P-256 certificate signing request (made once; ECDSA signatures are randomized, so a seed
/// made at each run would differ).
const CSR_PEM: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHIMHECAQAwDzENMAsGA1UEAwwEZXUtMTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABJQSZXMIJY8JEiw2goZGKjhvxPOcxxCBQzmBc83Pva15zLZcKGujO6sdwItw
EFOEQq7WXf3S7vcCqNLAHvTOJ2qgADAKBggqhkjOPQQDAgNHADBEAiAuO/2yK/uL
kRUp0hun8YBhApiSS+diFHro6BqszlhJOAIgNfR6XyqXiAeylhoKo6bq50VG5J0n
m1TozsXiVW4Dq6g=
-----END CERTIFICATE REQUEST-----
";

fn enrol_seeds() -> Vec<Seed> {
    use edgecard_coordinator::enrol::token::{JoinToken, TokenSecret};
    let token = |addr: &str, name: &str, fill: u8| {
        JoinToken {
            secret: TokenSecret::from_bytes([fill; 32]),
            ca_fingerprint: [fill.wrapping_add(1); 32],
            enrol_addr: addr.parse().unwrap(),
            server_name: name.into(),
        }
        .encode()
        .unwrap()
    };
    let mut seeds: Vec<Seed> = vec![
        ("join_token", "v4".into(), token("203.0.113.10:7443", "coordinator.example", 7).into_bytes()),
        ("join_token", "v6".into(), token("[2001:db8::1]:7443", "localhost", 9).into_bytes()),
        ("join_token", "pasted".into(), format!("  {}\n", token("127.0.0.1:7443", "localhost", 1)).into_bytes()),
        ("join_token", "other-format".into(), b"ecj1_AgAAAA".to_vec()),
        ("join_token", "not-a-token".into(), b"edgecard".to_vec()),
    ];
    let request = |auth: &str, body: &str| {
        let mut bytes = vec![u8::try_from(auth.len()).unwrap()];
        bytes.extend_from_slice(auth.as_bytes());
        bytes.extend_from_slice(body.as_bytes());
        bytes
    };
    let bearer = format!("Bearer {}", TokenSecret::from_bytes([3; 32]).to_wire());
    let csr_body = json!({ "csr_pem": CSR_PEM }).to_string();
    seeds.push(("enrol_request", "csr".into(), request(&bearer, &csr_body)));
    seeds.push((
        "enrol_request",
        "csr-garbage".into(),
        request(
            &bearer,
            r#"{"csr_pem":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#,
        ),
    ));
    seeds.push(("enrol_request", "unknown-field".into(), request(&bearer, r#"{"csr_pem":"x","node":"us-1"}"#)));
    seeds.push(("enrol_request", "no-bearer".into(), request("Basic dXNlcjpwdw==", &csr_body)));
    seeds.push(("enrol_request", "short-secret".into(), request("Bearer abc", &csr_body)));
    seeds
}

const NOW: u64 = edgecard_node::fuzzing::NOW;

fn stripe_event(kind: &str, order: &OrderId, payment_status: &str, node_id: &str) -> Value {
    // The shape of the test gateway's sessions and events (tests/common/fake_gateway.rs).
    json!({
        "id": "evt_1", "object": "event", "type": kind, "created": NOW,
        "data": { "object": {
            "id": "cs_test_a1b2c3", "object": "checkout.session",
            "url": "https://127.0.0.1:4242/checkout/cs_test_a1b2c3",
            "amount_total": 2000, "currency": "usd",
            "client_reference_id": order.to_string(),
            "metadata": { "order_id": order.to_string(), "node_id": node_id },
            "mode": "payment",
            "payment_status": payment_status,
            "status": if payment_status == "paid" { "complete" } else { "open" },
        }}
    })
}

fn stripe_seeds() -> Vec<Seed> {
    assert_eq!(edgecard_node::fuzzing::STRIPE_WEBHOOK_SECRET, fake_gateway::STRIPE_WEBHOOK_SECRET);
    let secret = fake_gateway::STRIPE_WEBHOOK_SECRET;
    let order = OrderId::from_bytes([0x42; 16]);
    let mut bodies: Vec<(&str, Vec<u8>)> = vec![
        ("completed-paid", stripe_event("checkout.session.completed", &order, "paid", "eu-1").to_string().into_bytes()),
        (
            "completed-unpaid",
            stripe_event("checkout.session.completed", &order, "unpaid", "eu-1").to_string().into_bytes(),
        ),
        (
            "async-succeeded",
            stripe_event("checkout.session.async_payment_succeeded", &order, "paid", "eu-1").to_string().into_bytes(),
        ),
        (
            "async-failed",
            stripe_event("checkout.session.async_payment_failed", &order, "unpaid", "eu-1").to_string().into_bytes(),
        ),
        ("other-type", stripe_event("customer.created", &order, "paid", "eu-1").to_string().into_bytes()),
        ("other-node", stripe_event("checkout.session.completed", &order, "paid", "us-1").to_string().into_bytes()),
    ];
    let mut no_amount = stripe_event("checkout.session.completed", &order, "paid", "eu-1");
    no_amount["data"]["object"].as_object_mut().unwrap().remove("amount_total");
    bodies.push(("no-amount", no_amount.to_string().into_bytes()));
    let mut only_metadata = stripe_event("checkout.session.completed", &order, "paid", "eu-1");
    only_metadata["data"]["object"].as_object_mut().unwrap().remove("client_reference_id");
    bodies.push(("metadata-only", serde_json::to_vec_pretty(&only_metadata).unwrap()));
    let mut seeds: Vec<Seed> = bodies
        .iter()
        .map(|(name, body)| {
            let header = fake_gateway::stripe_signature(secret, NOW, body);
            ("stripe_webhook", name.to_string(), [header.as_bytes(), b"\n", body].concat())
        })
        .collect();
    let body = &bodies[0].1;
    let rotated = format!(
        "t={NOW},v1={},v1={},v0=abc",
        fake_gateway::stripe_signature("whsec_old_secret", NOW, body).split("v1=").nth(1).unwrap(),
        fake_gateway::stripe_signature(secret, NOW, body).split("v1=").nth(1).unwrap()
    );
    seeds.push(("stripe_webhook", "rotated-secrets".into(), [rotated.as_bytes(), b"\n", body].concat()));
    let stale = fake_gateway::stripe_signature(secret, NOW - 301, body);
    seeds.push(("stripe_webhook", "stale".into(), [stale.as_bytes(), b"\n", body].concat()));
    seeds
}

fn epay_seeds() -> Vec<Seed> {
    assert_eq!(edgecard_node::fuzzing::EPAY_KEY, fake_gateway::EPAY_KEY);
    assert_eq!(edgecard_node::fuzzing::EPAY_PID, fake_gateway::EPAY_PID);
    let order = OrderId::from_bytes([0x42; 16]).to_string();
    // The test gateway's notify parameters, signed with `key`.
    let notify = |pid: &str, money: &str, status: &str, name: &str, key: &str| {
        let mut params: Vec<(String, String)> = [
            ("pid", pid),
            ("trade_no", "202600000001"),
            ("out_trade_no", order.as_str()),
            ("type", "alipay"),
            ("name", name),
            ("money", money),
            ("trade_status", status),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sign = fake_gateway::epay_sign(&params, key);
        params.push(("sign".into(), sign));
        params.push(("sign_type".into(), "MD5".into()));
        fake_gateway::encode_form(&params).into_bytes()
    };
    let key = fake_gateway::EPAY_KEY;
    vec![
        ("epay_notify", "trade-success".into(), notify("1001", "72.00", "TRADE_SUCCESS", "game-10 x 1", key)),
        ("epay_notify", "wait-buyer-pay".into(), notify("1001", "72.00", "WAIT_BUYER_PAY", "game-10 x 1", key)),
        ("epay_notify", "one-decimal".into(), notify("1001", "72.5", "TRADE_SUCCESS", "游戏点卡 x 2", key)),
        ("epay_notify", "other-merchant".into(), notify("2002", "72.00", "TRADE_SUCCESS", "game-10 x 1", key)),
        ("epay_notify", "bad-money".into(), notify("1001", "72.001", "TRADE_SUCCESS", "game-10 x 1", key)),
        ("epay_notify", "wrong-key".into(), notify("1001", "72.00", "TRADE_SUCCESS", "game-10 x 1", "not-the-key")),
        ("epay_notify", "empty-name".into(), notify("1001", "0.01", "TRADE_SUCCESS", "", key)),
    ]
}

fn storefront_seeds() -> Vec<Seed> {
    // Bodies as the storefront's checkout form posts them (node/src/storefront/tests.rs).
    let bodies = [
        ("checkout", "sku=game-10&quantity=1&email=&channel=sandbox".to_string()),
        ("checkout-cny", "sku=game-10&quantity=1&currency=CNY&channel=sandbox".into()),
        ("checkout-email", "sku=game-10&quantity=2&email=buyer%40example.com&currency=USD&channel=stripe".into()),
        ("checkout-unicode", "sku=game-10&quantity=+3+&email=%E4%B9%B0%E5%AE%B6%40example.cn&channel=epay".into()),
        ("sku-only", "sku=game-10".into()),
        ("odd-escapes", "sku=game%2D10&quantity=%zz%4&flag&=&email=a+b%21".into()),
        ("lang-cookie", "a=1; lang=zh-CN".into()),
    ];
    bodies.into_iter().map(|(name, body)| ("storefront_form", name.to_string(), body.into_bytes())).collect()
}

fn order_json_seeds() -> Vec<Seed> {
    // Bodies as the README, the end-to-end tests and tests/hostile_input.rs send them.
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("sku-quantity", json!({ "sku": "game-card-10", "quantity": 1 }).to_string().into_bytes()),
        ("sku-only", json!({ "sku": "game-10" }).to_string().into_bytes()),
        (
            "all-fields",
            json!({ "sku": "game-10", "quantity": 2, "email": "buyer@example.com", "currency": "CNY", "channel": "epay" })
                .to_string()
                .into_bytes(),
        ),
        ("null-email", br#"{"sku": "game-10", "quantity": 3, "email": null, "currency": "USD"}"#.to_vec()),
        ("bad-currency", json!({ "sku": "game-10", "currency": "usd!" }).to_string().into_bytes()),
        ("bad-sku", json!({ "sku": "../../etc/passwd" }).to_string().into_bytes()),
        ("unknown-field", br#"{"sku": "game-10", "price": 1}"#.to_vec()),
        ("truncated", br#"{"sku": "game-10", "quantity": "#.to_vec()),
        ("huge-quantity", br#"{"sku": "game-10", "quantity": 1e30}"#.to_vec()),
        ("escaped", br#"{"sk\u0075": "game-10", "email": " Buyer@Example.COM "}"#.to_vec()),
    ];
    bodies.into_iter().map(|(name, body)| ("order_json", name.to_string(), body)).collect()
}
