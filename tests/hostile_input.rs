//! Hostile input against a real node: forged grants (at start and over the admin API), malformed
//! order requests and forged payment callbacks. Each gets a clear 4xx and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ed25519_dalek::SigningKey;
use edgecard::https_client::{Request, Response};
use edgecard_protocol::{
    decode, Epoch, GrantedKey, KeyId, MessageKind, NodeId, Secret, SignedGrant, Sku, SliceGrant, SliceId, UnixMillis,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

fn other_signing_key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

/// `genuine` with its key list changed by `tamper`, re-encoded, still carrying the old signature.
fn tampered(genuine: &SignedGrant, tamper: impl FnOnce(&mut Vec<GrantedKey>)) -> SignedGrant {
    let mut grant: SliceGrant = decode(MessageKind::SliceGrant, &genuine.grant_bytes).unwrap();
    tamper(&mut grant.keys);
    let grant_bytes = grant.to_bytes().unwrap();
    assert_ne!(grant_bytes, genuine.grant_bytes);
    SignedGrant { grant_bytes, signature: genuine.signature }
}

fn granted(id: u64, secret: &str) -> GrantedKey {
    GrantedKey { key_id: KeyId(id), secret: Secret::new(secret.to_string()).unwrap() }
}

/// The forged grants every node must refuse, with a label. Their secrets are in `attacker_keys`.
fn forged_grants(env: &TestEnv, genuine: &SignedGrant, attacker_keys: &[String]) -> Vec<(&'static str, SignedGrant)> {
    assert!(attacker_keys.len() >= 4);
    let swapped_keys = attacker_keys[..3].to_vec();
    let extra_key = attacker_keys[3].clone();
    vec![
        ("signed by another key", sign_grant(&other_signing_key(), "eu-1", 1, 1, &attacker_keys[..3])),
        ("for another node", env.grant("us-1", 1, 1, &attacker_keys[..3])),
        (
            "key list swapped",
            tampered(genuine, move |keys| {
                for (key, secret) in keys.iter_mut().zip(&swapped_keys) {
                    key.secret = Secret::new(secret.clone()).unwrap();
                }
            }),
        ),
        (
            "key added",
            tampered(genuine, move |keys| {
                let next = keys.last().unwrap().key_id.0 + 1;
                keys.push(granted(next, &extra_key));
            }),
        ),
    ]
}

async fn assert_stock(node: &NodeProcess, expected: u64) {
    let mut client = node.client().await;
    assert_eq!(client.stock().await, expected);
    assert_eq!(node.metrics().await[&format!("edgecard_stock_keys{{sku=\"{SKU}\"}}")], expected as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_grant_files_are_refused_at_start() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let attacker_keys = make_secrets(4);
    let genuine = env.grant("eu-1", 1, 1, &secrets);
    let files: Vec<_> = forged_grants(&env, &genuine, &attacker_keys)
        .iter()
        .enumerate()
        .map(|(i, (_, grant))| env.write_grant(&format!("forged-{i}.grant"), grant))
        .collect();
    let junk = env.path("junk.grant");
    std::fs::write(&junk, b"not a grant at all").unwrap();
    let mut grant_files = files.clone();
    grant_files.push(junk);
    let node = env.start_node(&NodeOptions::with_grants(grant_files));

    bounded("forged grant files", LIMIT, async {
        assert_stock(&node, 0).await;
        let stderr = node.stderr();
        assert_eq!(stderr.matches("grant file refused").count(), files.len() + 1, "{stderr}");
        assert!(stderr.contains("signature does not verify"), "{stderr}");
        assert!(stderr.contains("us-1"), "the wrong-node refusal names the node: {stderr}");
        for secret in secrets.iter().chain(&attacker_keys) {
            assert!(!stderr.contains(secret.as_str()), "a refused grant's key was logged");
        }
        let metrics = node.metrics().await;
        assert_eq!(metrics["edgecard_grants_refused_total"], (files.len() + 1) as f64);
        assert_eq!(metrics["edgecard_grants_installed_total"], 0.0);
        let status = node.status().await;
        assert_eq!(status["slices"].as_array().unwrap().len(), 0, "{status}");
        let mut client = node.client().await;
        let response = client.create_order(&json!({ "sku": SKU })).await;
        assert_eq!(response.status, 409, "{}", response.text());
        assert_eq!(error_code(&response), "sold_out");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_grants_are_refused_by_the_admin_api() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let attacker_keys = make_secrets(4);
    let genuine = env.grant("eu-1", 1, 1, &secrets);
    let node = env.start_node(&NodeOptions::default());

    bounded("admin grants", LIMIT, async {
        assert_stock(&node, 0).await;
        for (what, grant) in forged_grants(&env, &genuine, &attacker_keys) {
            let response = node.install_grant(&grant.to_bytes().unwrap()).await;
            assert_eq!(response.status, 400, "{what}: {}", response.text());
            assert_eq!(error_code(&response), "grant_refused", "{what}");
            for secret in &attacker_keys {
                assert!(!response.text().contains(secret.as_str()), "{what}: the refusal shows a key");
            }
        }
        for (what, bytes) in
            [("junk", b"junk".to_vec()), ("empty", Vec::new()), ("random", random_hex(512).into_bytes())]
        {
            let response = node.install_grant(&bytes).await;
            assert_eq!(response.status, 400, "{what}: {}", response.text());
            assert_eq!(error_code(&response), "grant_refused", "{what}");
        }
        // A lease that already ran out, properly signed.
        let now = unix_secs() * 1000;
        let expired = SliceGrant {
            slice_id: SliceId(7),
            sku: Sku::new(SKU).unwrap(),
            node_id: NodeId::new("eu-1").unwrap(),
            epoch: Epoch(1),
            issued_at: UnixMillis(now - 7_200_000),
            lease_deadline: UnixMillis(now - 3_600_000),
            take_window: 10,
            keys: vec![granted(500, &attacker_keys[0])],
        }
        .sign(&env.signing_key)
        .unwrap();
        let response = node.install_grant(&expired.to_bytes().unwrap()).await;
        assert_eq!(response.status, 400, "expired lease: {}", response.text());
        assert_stock(&node, 0).await;

        // The admin token is required.
        for auth in [None, Some("Bearer wrong-token"), Some("admin-token-123")] {
            let mut request = Request::post("/admin/v1/grants").body(genuine.to_bytes().unwrap());
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = node.admin.request(request).await.unwrap();
            assert_eq!(response.status, 401, "{auth:?}: {}", response.text());
        }
        assert_stock(&node, 0).await;

        // The genuine grant installs; installing it again changes nothing.
        let response = node.install_grant(&genuine.to_bytes().unwrap()).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_stock(&node, 3).await;
        let again = node.install_grant(&genuine.to_bytes().unwrap()).await;
        assert_eq!(again.status, 200, "{}", again.text());
        assert_stock(&node, 3).await;

        // Properly signed, but re-granting key ids this node already holds: refused.
        let overlapping = env.grant("eu-1", 2, 2, &attacker_keys[..2]);
        let response = node.install_grant(&overlapping.to_bytes().unwrap()).await;
        assert_eq!(response.status, 400, "overlapping key ids: {}", response.text());
        assert_eq!(error_code(&response), "grant_refused");
        assert_stock(&node, 3).await;

        // Only the genuine keys are sold.
        let mut client = node.client().await;
        let (_, keys) = client.buy(3).await;
        for key in &keys {
            assert!(secrets.contains(key), "sold a key that was never genuinely granted");
        }
        let metrics = node.metrics().await;
        assert_eq!(metrics["edgecard_grants_installed_total"], 1.0, "{metrics:?}");
    })
    .await;
}

/// Sends a raw order request with the given content type and body.
fn raw_order(content_type: Option<&str>, body: Vec<u8>) -> Request {
    let mut request = Request::post("/api/v1/orders").body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request
}

fn assert_json_error(what: &str, response: &Response, status: u16, code: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert!(
        response.header("content-type").is_some_and(|v| v.starts_with("application/json")),
        "{what}: {:?}",
        response.header("content-type")
    );
    assert_eq!(error_code(response), code, "{what}");
    assert_eq!(response.header("cache-control"), Some("no-store"), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_order_requests_get_clear_errors_and_change_nothing() {
    let env = TestEnv::new();
    let secrets = make_secrets(5);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));

    bounded("bad order requests", LIMIT, async {
        let mut client = node.client().await;
        let created_before = node.metric("edgecard_orders_created_total").await;
        assert_eq!(client.stock().await, 5);
        let json = Some("application/json");
        let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        let oversized = json!({ "sku": SKU, "email": format!("{}@example.com", "a".repeat(20 * 1024)) });
        let cases: Vec<(&str, Request, u16, &str)> = vec![
            ("malformed JSON", raw_order(json, br#"{"sku": "game-10", "quantity": "#.to_vec()), 400, "invalid_json"),
            ("JSON that is not an object", raw_order(json, b"[1, 2, 3]".to_vec()), 400, "invalid_json"),
            ("empty body", raw_order(json, Vec::new()), 400, "invalid_json"),
            ("missing sku", raw_order(json, br#"{"quantity": 1}"#.to_vec()), 400, "invalid_json"),
            ("unknown field", raw_order(json, br#"{"sku": "game-10", "price": 1}"#.to_vec()), 400, "invalid_json"),
            (
                "negative quantity",
                raw_order(json, br#"{"sku": "game-10", "quantity": -1}"#.to_vec()),
                400,
                "invalid_json",
            ),
            (
                "huge quantity",
                raw_order(json, br#"{"sku": "game-10", "quantity": 1e30}"#.to_vec()),
                400,
                "invalid_json",
            ),
            ("body over 16 KiB", Request::post_json("/api/v1/orders", &oversized), 413, "body_too_large"),
            ("unknown sku", Request::post_json("/api/v1/orders", &json!({ "sku": "game-99" })), 404, "unknown_sku"),
            (
                "sku that is not an id",
                Request::post_json("/api/v1/orders", &json!({ "sku": "../../etc/passwd" })),
                404,
                "unknown_sku",
            ),
            (
                "quantity 0",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "quantity": 0 })),
                400,
                "invalid_quantity",
            ),
            (
                "quantity 1 000 000",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "quantity": 1_000_000 })),
                400,
                "invalid_quantity",
            ),
            (
                "unsupported currency",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "currency": "JPY" })),
                400,
                "unsupported_currency",
            ),
            (
                "malformed currency",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "currency": "usd!" })),
                400,
                "invalid_currency",
            ),
            (
                "unknown channel",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "channel": "paypal" })),
                400,
                "unknown_channel",
            ),
            (
                "malformed email",
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU, "email": "not an email" })),
                400,
                "invalid_email",
            ),
            (
                "text/plain",
                raw_order(Some("text/plain"), json!({ "sku": SKU }).to_string().into_bytes()),
                415,
                "unsupported_media_type",
            ),
            (
                "form",
                raw_order(Some("application/x-www-form-urlencoded"), b"sku=game-10".to_vec()),
                415,
                "unsupported_media_type",
            ),
            (
                "no content type",
                raw_order(None, json!({ "sku": SKU }).to_string().into_bytes()),
                415,
                "unsupported_media_type",
            ),
            ("random bytes as JSON", raw_order(json, random.clone()), 400, "invalid_json"),
            ("random bytes", raw_order(Some("application/octet-stream"), random), 415, "unsupported_media_type"),
        ];
        for (what, request, status, code) in cases {
            let response = client.send(request).await;
            assert_json_error(what, &response, status, code);
        }

        // Other paths and methods.
        let response = client.send(Request::new(http::Method::DELETE, "/api/v1/orders")).await;
        assert_json_error("DELETE orders", &response, 405, "method_not_allowed");
        let response = client.send(Request::get("/api/v1/nothing-here")).await;
        assert_json_error("unknown path", &response, 404, "not_found");
        let unknown = format!("/pay/sandbox/{}", random_hex(16));
        let response = client.send(Request::post(&unknown)).await;
        assert_json_error("paying without a token", &response, 401, "missing_token");
        let bearer = format!("Bearer {}", random_hex(16));
        let response = client.send(Request::post(&unknown).header("authorization", &bearer)).await;
        assert_eq!(response.status, 404, "paying an unknown order: {}", response.text());
        error_code(&response);
        let response = client.send(Request::post("/pay/sandbox/not-an-id")).await;
        assert_eq!(response.status, 404, "{}", response.text());

        // Nothing changed, and the node still sells.
        assert_eq!(client.stock().await, 5);
        assert_eq!(node.metric("edgecard_orders_created_total").await, created_before);
        assert_eq!(node.status().await["open_reservations"], 0);
        let (_, keys) = client.buy(1).await;
        assert!(secrets.contains(&keys[0]));
        assert!(!node.stderr().contains("panicked"), "{}", node.stderr());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_payment_callbacks_are_refused() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));

    bounded("forged callbacks", LIMIT, async {
        let mut client = node.client().await;
        let order = client.reserve(1).await;
        let body = json!({
            "order_id": order.order_id,
            "txn_id": "sbx_forged",
            "amount_minor": PRICE_MINOR,
            "currency": "USD",
            "status": "succeeded",
        })
        .to_string();
        let now = unix_secs();
        let callback = |signature: Option<String>| {
            let mut request = Request::post("/api/v1/payments/sandbox/callback")
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(signature) = signature {
                request = request.header("edgecard-sandbox-signature", &signature);
            }
            request
        };
        let forgeries = [
            ("no signature", None),
            ("made-up signature", Some(format!("t={now},v1={}", random_hex(32)))),
            ("two made-up signatures", Some(format!("t={now},v1={},v1={}", random_hex(32), random_hex(32)))),
            ("stale made-up signature", Some(format!("t=1,v1={}", random_hex(32)))),
            ("malformed signature", Some("sha256=deadbeef".to_string())),
            ("empty signature", Some(format!("t={now},v1="))),
        ];
        for (what, signature) in &forgeries {
            let response = client.send(callback(signature.clone())).await;
            assert_json_error(what, &response, 400, "invalid_callback");
        }
        let response = client
            .send(
                Request::post("/api/v1/payments/paypal/callback")
                    .header("content-type", "application/json")
                    .body(body.clone()),
            )
            .await;
        assert_eq!(response.status, 404, "unknown channel: {}", response.text());

        // The order is untouched: still reserved, no key shown, nothing sold.
        let view = client.fetch_ok(&order).await;
        assert_eq!(view["status"], "reserved", "{view}");
        assert!(view.get("keys").is_none(), "{view}");
        assert_eq!(client.stock().await, 2);
        let metrics = node.metrics().await;
        assert_eq!(metrics["edgecard_purchases_total"], 0.0);
        let refused = metrics["edgecard_payment_callbacks_total{channel=\"sandbox\",result=\"refused\"}"];
        assert!(refused >= forgeries.len() as f64, "{metrics:?}");
        assert_eq!(metrics["edgecard_payment_callbacks_total{channel=\"sandbox\",result=\"accepted\"}"], 0.0);
        let stderr = node.stderr();
        assert!(stderr.contains("payment callback refused"), "{stderr}");

        // The real payment still goes through.
        let paid = client.pay(&order.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered");
        assert_eq!(keys_of(&client.fetch_ok(&order).await).len(), 1);

        // Paying again replays the same signed callback: a replay, not a second accepted payment.
        let again = client.pay(&order.pay_url).await;
        assert_eq!(again.status, 200, "{}", again.text());
        let metrics = node.metrics().await;
        let callbacks = |result: &str| {
            metrics[&format!("edgecard_payment_callbacks_total{{channel=\"sandbox\",result=\"{result}\"}}")]
        };
        assert_eq!((callbacks("accepted"), callbacks("replayed")), (1.0, 1.0), "{metrics:?}");
        assert_eq!(metrics["edgecard_duplicate_payments_total"], 0.0);
    })
    .await;
}

/// A properly signed grant for a slice the node already holds, with the same sku and number of keys
/// but other keys, is not a lease renewal: the node must refuse it rather than answer `Renewed` and
/// keep selling the old keys under the new grant's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_changes_a_held_slice_is_refused() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let other_keys = make_secrets(3);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));

    bounded("changed slice", LIMIT, async {
        assert_stock(&node, 3).await;
        for (what, changed) in [
            ("other key ids and keys", env.grant("eu-1", 1, 100, &other_keys)),
            ("same key ids, other keys", env.grant("eu-1", 1, 1, &other_keys)),
        ] {
            let response = node.install_grant(&changed.to_bytes().unwrap()).await;
            assert_eq!(response.status, 400, "{what}: {}", response.text());
            assert_eq!(error_code(&response), "grant_refused", "{what}");
        }
        assert_stock(&node, 3).await;
        assert_eq!(node.metric("edgecard_grants_installed_total").await, 1.0);
    })
    .await;
}
