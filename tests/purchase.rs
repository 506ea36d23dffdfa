//! End to end over real HTTPS against a real node process: catalog, reserve, pay, deliver, look up.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use edgecard::https_client::Request;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_reserves_pays_and_gets_a_granted_key() {
    let env = TestEnv::new();
    let secrets = make_secrets(10);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));
    bounded("purchase", LIMIT, async {
        let mut client = node.client().await;

        let products = client.products().await;
        assert_eq!(products.len(), 1, "{products:?}");
        let product = &products[0];
        assert_eq!(product["sku"], SKU);
        assert_eq!(product["title"], "Game card");
        assert_eq!(product["stock"], 10);
        assert_eq!(product["price"]["amount_minor"], PRICE_MINOR);
        assert_eq!(product["price"]["currency"], "USD");
        assert_eq!(product["prices"].as_array().unwrap().len(), 2);
        let zh = client.send(Request::get("/api/v1/products").header("accept-language", "zh-CN,zh;q=0.9")).await;
        assert_eq!(zh.json::<Vec<Value>>().unwrap()[0]["title"], "游戏卡");

        // Reserve.
        let response = client.create_order(&serde_json::json!({ "sku": SKU })).await;
        assert_eq!(response.status, 201, "{}", response.text());
        assert_eq!(response.header("cache-control"), Some("no-store"));
        let order = Created::from_response(&response);
        assert_eq!(order.body["status"], "reserved");
        assert_eq!(order.body["amount_minor"], PRICE_MINOR);
        assert_eq!(order.body["currency"], "USD");
        assert!(order.body["expires_at"].is_string(), "{}", order.body);
        assert_eq!(order.order_id.len(), 32, "{}", order.body);
        assert_eq!(order.token.len(), 32, "{}", order.body);
        assert_eq!(
            order.pay_url,
            format!("{}/pay/sandbox/{}?token={}", node.public_url, order.order_id, order.token),
            "the sandbox's own pay page, which needs the order token"
        );
        assert!(order.body.get("keys").is_none(), "a reservation shows no keys: {}", order.body);
        assert_eq!(client.stock().await, 9, "the reservation holds its key");

        // Before payment the order is reserved and shows no key.
        let view = client.fetch_ok(&order).await;
        assert_eq!(view["status"], "reserved", "{view}");
        assert!(view.get("keys").is_none(), "{view}");

        // Pay through the sandbox; the pay answer itself reveals nothing.
        let paid = client.pay(&order.pay_url).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.header("cache-control"), Some("no-store"));
        let paid_body: Value = paid.json().unwrap();
        assert_eq!(paid_body["status"], "delivered", "{paid_body}");
        assert_eq!(paid_body["order_id"], order.order_id.as_str());
        for secret in &secrets {
            assert!(!paid.text().contains(secret.as_str()), "the pay answer does not show keys");
        }

        // The key, to the token holder.
        let response = client.fetch(&order.order_id, Some(&order.token)).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("cache-control"), Some("no-store"));
        let view: Value = response.json().unwrap();
        assert_eq!(view["status"], "delivered", "{view}");
        let keys = keys_of(&view);
        assert_eq!(keys.len(), 1, "{view}");
        assert!(secrets.contains(&keys[0]), "delivered key {} is not one of the granted keys", keys[0]);
        assert_eq!(client.stock().await, 9);

        // Paying again changes nothing: same single key.
        let again = client.pay(&order.pay_url).await;
        assert_eq!(again.status, 200, "{}", again.text());
        assert_eq!(keys_of(&client.fetch_ok(&order).await), keys);
        assert_eq!(client.stock().await, 9);

        // Quantity 3: three distinct granted keys, none of them the first one.
        let (big, big_keys) = client.buy(3).await;
        assert_eq!(big.body["amount_minor"], 3 * PRICE_MINOR);
        let distinct: HashSet<&String> = big_keys.iter().collect();
        assert_eq!(distinct.len(), 3, "{big_keys:?}");
        assert!(big_keys.iter().all(|k| secrets.contains(k)), "{big_keys:?}");
        assert!(!big_keys.contains(&keys[0]), "a key was delivered twice");
        assert_eq!(client.stock().await, 6);

        // Another currency is priced from the catalog.
        let eur = client.create_order(&serde_json::json!({ "sku": SKU, "currency": "EUR" })).await;
        assert_eq!(eur.status, 201, "{}", eur.text());
        let eur = Created::from_response(&eur);
        assert_eq!(eur.body["currency"], "EUR");
        assert_eq!(eur.body["amount_minor"], 900);

        let metrics = node.metrics().await;
        assert!(metrics["edgecard_purchases_total"] >= 2.0, "{metrics:?}");
        assert!(metrics["edgecard_orders_created_total"] >= 3.0, "{metrics:?}");
        let text = node.metrics_text().await;
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a key appears in /metrics");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lookup_needs_the_order_token() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));
    bounded("lookup", LIMIT, async {
        let mut client = node.client().await;
        let (order, keys) = client.buy(1).await;
        assert_eq!(keys.len(), 1);

        let wrong_token = random_hex(16);
        let cases: Vec<(&str, Request, u16)> = vec![
            (
                "wrong token",
                Request::get(&format!("/api/v1/orders/{}", order.order_id))
                    .header("authorization", &format!("Bearer {wrong_token}")),
                404,
            ),
            (
                "malformed token",
                Request::get(&format!("/api/v1/orders/{}", order.order_id)).header("authorization", "Bearer abc"),
                404,
            ),
            (
                "token of another scheme",
                Request::get(&format!("/api/v1/orders/{}", order.order_id))
                    .header("authorization", &format!("Basic {}", order.token)),
                401,
            ),
            ("no token", Request::get(&format!("/api/v1/orders/{}", order.order_id)), 401),
            (
                "unknown order",
                Request::get(&format!("/api/v1/orders/{}", random_hex(16)))
                    .header("authorization", &format!("Bearer {}", order.token)),
                404,
            ),
            (
                "order id is not an id",
                Request::get("/api/v1/orders/1%20OR%201=1").header("authorization", &format!("Bearer {}", order.token)),
                404,
            ),
            (
                "token in the query string",
                Request::get(&format!("/api/v1/orders/{}?token={}", order.order_id, order.token)),
                401,
            ),
        ];
        for (what, request, status) in cases {
            let response = client.send(request).await;
            assert_eq!(response.status, status, "{what}: {}", response.text());
            assert_eq!(response.header("cache-control"), Some("no-store"), "{what}");
            let code = error_code(&response);
            assert!(!code.is_empty(), "{what}");
            assert!(!response.text().contains(&keys[0]), "{what}: the key leaked");
        }
        // Unknown id and wrong token answer the same, so ids cannot be probed.
        let wrong = client.fetch(&order.order_id, Some(&wrong_token)).await;
        let unknown = client.fetch(&random_hex(16), Some(&order.token)).await;
        assert_eq!(wrong.status, unknown.status);
        assert_eq!(wrong.text(), unknown.text());

        // The right token still works.
        assert_eq!(keys_of(&client.fetch_ok(&order).await), keys);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_is_cacheable_and_revalidates_with_etag() {
    let env = TestEnv::new();
    let secrets = make_secrets(5);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));
    bounded("catalog", LIMIT, async {
        let mut client = node.client().await;
        let first = client.send(Request::get("/api/v1/products")).await;
        assert_eq!(first.status, 200, "{}", first.text());
        assert!(first.header("content-type").unwrap().starts_with("application/json"));
        let cache_control = first.header("cache-control").unwrap().to_string();
        assert!(cache_control.contains("max-age="), "{cache_control}");
        assert!(cache_control.contains("stale-while-revalidate="), "{cache_control}");
        assert!(!cache_control.contains("no-store"), "{cache_control}");
        let etag = first.header("etag").expect("an ETag").to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

        // Same content, same tag: 304 without a body.
        let second = client.send(Request::get("/api/v1/products").header("if-none-match", &etag)).await;
        assert_eq!(second.status, 304, "{}", second.text());
        assert!(second.body.is_empty());
        assert_eq!(second.header("etag"), Some(etag.as_str()));
        assert!(second.header("cache-control").unwrap().contains("max-age="));
        let listed =
            client.send(Request::get("/api/v1/products").header("if-none-match", &format!("\"other\", {etag}"))).await;
        assert_eq!(listed.status, 304);
        let stale = client.send(Request::get("/api/v1/products").header("if-none-match", "\"not-the-tag\"")).await;
        assert_eq!(stale.status, 200);

        // A sale changes the stock, so the old tag no longer matches.
        client.buy(1).await;
        let after = client.send(Request::get("/api/v1/products").header("if-none-match", &etag)).await;
        assert_eq!(after.status, 200, "{}", after.text());
        assert_ne!(after.header("etag"), Some(etag.as_str()));
        assert_eq!(after.json::<Vec<Value>>().unwrap()[0]["stock"], 4);
        for secret in &secrets {
            assert!(!after.text().contains(secret.as_str()), "the catalog shows a key");
        }

        // Health for CDN origin checks, on both listeners.
        let health = client.send(Request::get("/healthz")).await;
        assert_eq!(health.status, 200);
        assert_eq!(node.admin_get("/healthz").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_pays_only_for_the_holder_of_the_order_token() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));
    bounded("sandbox token", LIMIT, async {
        let mut client = node.client().await;
        let order = client.reserve(1).await;
        let path = format!("/pay/sandbox/{}", order.order_id);
        let cases: Vec<(&str, Request, u16)> = vec![
            ("no token", Request::post(&path), 401),
            ("wrong token", Request::post(&path).header("authorization", &format!("Bearer {}", random_hex(16))), 404),
            ("malformed token", Request::post(&path).header("authorization", "Bearer abc"), 404),
            ("wrong token in the query", Request::post(&format!("{path}?token={}", random_hex(16))), 404),
            (
                "a form without the token",
                Request::post(&path).header("content-type", "application/x-www-form-urlencoded").body("token="),
                404,
            ),
        ];
        for (what, request, status) in cases {
            let response = client.send(request).await;
            assert_eq!(response.status, status, "{what}: {}", response.text());
            assert!(!response.text().contains("\"delivered\""), "{what}: {}", response.text());
        }
        let view = client.fetch_ok(&order).await;
        assert_eq!(view["status"], "reserved", "nothing was paid: {view}");
        assert!(keys_of(&view).is_empty());
        assert_eq!(node.metric("edgecard_purchases_total").await, 0.0);

        // The holder pays with the token as a bearer header (the demo's and README's call).
        let paid = client.send(Request::post(&path).header("authorization", &format!("Bearer {}", order.token))).await;
        assert_eq!(paid.status, 200, "{}", paid.text());
        assert_eq!(paid.json::<Value>().unwrap()["status"], "delivered");
        assert_eq!(keys_of(&client.fetch_ok(&order).await).len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pay_url_opened_in_a_browser_shows_the_order() {
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let node = env.start_node(&NodeOptions::with_grants(vec![env.grant_file(&secrets)]));
    bounded("pay_url in a browser", LIMIT, async {
        let mut client = node.client().await;
        let order = client.reserve(1).await;
        let page = client.browse(&order.pay_url).await;
        assert_eq!(page.status, 200, "{}", page.text());
        assert_eq!(page.header("cache-control"), Some("no-store"));
        assert!(page.header("content-type").unwrap().starts_with("text/html"));
        assert!(page.text().contains("Pay $10.00"), "the pay page of this order: {}", page.text());
        // The order view's pay_url (for a client that lost the first answer) opens too.
        let view = client.fetch_ok(&order).await;
        assert_eq!(view["pay_url"], order.pay_url.as_str());

        assert_eq!(client.pay(&order.pay_url).await.status, 200);
        let after = client.browse(&order.pay_url).await;
        assert_eq!(after.status, 200, "{}", after.text());
        let keys = keys_of(&client.fetch_ok(&order).await);
        assert!(after.text().contains(&keys[0]), "a paid order's pay_url leads to its keys: {}", after.text());
    })
    .await;
}

/// A node without a coordinator has nobody to acknowledge its events: it acknowledges them itself
/// once durable, so nothing piles up in its outbox or take windows, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_node_keeps_no_outbox() {
    let env = TestEnv::new();
    let secrets = make_secrets(10);
    let options = NodeOptions::with_grants(vec![env.grant_file(&secrets)]);
    let mut node = env.start_node(&options);
    bounded("standalone sales", LIMIT, async {
        let mut client = node.client().await;
        for _ in 0..3 {
            client.buy(1).await;
        }
        let unacked = |status: &Value| -> Vec<u64> {
            status["slices"].as_array().unwrap().iter().map(|s| s["unacknowledged_takes"].as_u64().unwrap()).collect()
        };
        let mut status = node.status().await;
        for _ in 0..50 {
            if unacked(&status).iter().all(|n| *n == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = node.status().await;
        }
        assert_eq!(unacked(&status), vec![0], "takes stay counted on a standalone node: {status}");
    })
    .await;
    node.terminate();
    let node = env.start_node(&options);
    bounded("after a restart", LIMIT, async {
        let status = node.status().await;
        assert_eq!(status["slices"][0]["unacknowledged_takes"], 0, "{status}");
        assert_eq!(node.client().await.stock().await, 7);
    })
    .await;
}

/// HSTS is off by default (a CDN usually sets it) and, when configured, on every buyer-facing
/// response, errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_sent_when_configured() {
    let env = TestEnv::new();
    let options = NodeOptions::with_grants(vec![env.grant_file(&make_secrets(2))]);
    let plain = env.start_node(&options);
    let mut client = plain.client().await;
    let response = client.send(Request::get("/api/v1/products")).await;
    assert_eq!(response.header("strict-transport-security"), None);
    drop(plain);

    let config = env.write_config(&options);
    common::coordinator::set_toml_field(&config, "http", "hsts_max_age_secs", toml::Value::Integer(31_536_000));
    let node = NodeProcess::start(&config, &[]);
    let mut client = node.client().await;
    for path in ["/api/v1/products", "/", "/no/such/page"] {
        let response = client.send(Request::get(path)).await;
        assert_eq!(response.header("strict-transport-security"), Some("max-age=31536000"), "{path}");
    }
}
