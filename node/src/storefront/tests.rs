//! The storefront against a real engine on a temp sled store, without sockets: pages, headers,
//! languages, escaping, every error page, and the whole purchase through the forms.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use edgecard_protocol::{Epoch, GrantedKey, KeyId, NodeId, Secret, Sku, SliceGrant, SliceId, UnixMillis};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::*;
use crate::api::NodeApi;
use crate::catalog::Catalog;
use crate::client_ip::{ClientIpHeader, ClientIpResolver};
use crate::config::{OrdersConfig, PriceConfig};
use crate::limiter::{LimiterConfig, Limiters, Quota};
use crate::metrics::{HttpMetrics, OrderMetrics, PaymentMetrics, StoreMetrics};
use crate::orders::engine::now_millis;
use crate::orders::OrderEngine;
use crate::payments::return_link::ReturnLinks;
use crate::payments::router::{Router, RouterOptions, Routes};
use crate::payments::sandbox::SandboxChannel;
use crate::payments::PaymentChannel;
use crate::store::Store;

const XSS_TITLE: &str = "<script>alert(1)</script> & \"quoted\"";
const HOST: &str = "shop.example";

struct World {
    _dir: tempfile::TempDir,
    api: NodeApi,
}

fn product(sku: &str, en: &str, zh: Option<&str>, prices: &[(u64, &str)]) -> ProductConfig {
    let mut title = BTreeMap::from([("en".to_string(), en.to_string())]);
    if let Some(zh) = zh {
        title.insert("zh-CN".into(), zh.into());
    }
    ProductConfig {
        sku: Sku::new(sku).unwrap(),
        title,
        prices: prices.iter().map(|(a, c)| PriceConfig { amount_minor: *a, currency: c.parse().unwrap() }).collect(),
    }
}

async fn world_with(keys: u64, orders: OrdersConfig, limits: LimiterConfig) -> World {
    world_routed(keys, orders, limits, None, LabPayments::LabNode).await
}

/// A world whose one channel (the sandbox) serves the currencies of `routes` only (all when
/// `None`), with lab payments reported as `lab`.
async fn world_routed(
    keys: u64,
    orders: OrdersConfig,
    limits: LimiterConfig,
    routes: Option<Routes>,
    lab: LabPayments,
) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 8 << 20, Arc::new(StoreMetrics::default())).unwrap());
    let catalog = Arc::new(Catalog::new(vec![
        product("game-10", "Game card", Some("游戏卡"), &[(1000, "USD"), (7200, "CNY")]),
        product("xss", XSS_TITLE, None, &[(500, "USD")]),
    ]));
    let engine = Arc::new(
        OrderEngine::open(NodeId::new("eu-1").unwrap(), store, catalog, orders, Arc::new(OrderMetrics::default()))
            .await
            .unwrap(),
    );
    if keys > 0 {
        let now = now_millis();
        engine
            .install_grant(SliceGrant {
                slice_id: SliceId(1),
                sku: Sku::new("game-10").unwrap(),
                node_id: NodeId::new("eu-1").unwrap(),
                epoch: Epoch(1),
                issued_at: now,
                lease_deadline: now.saturating_add_ms(3_600_000),
                take_window: 1_000_000,
                keys: (1..=keys)
                    .map(|k| GrantedKey { key_id: KeyId(k), secret: Secret::new(format!("SECRET-{k:06}")).unwrap() })
                    .collect(),
            })
            .await
            .unwrap();
    }
    let sandbox = Arc::new(SandboxChannel::new(b"a sandbox secret for tests", 300).unwrap());
    let mut channels: HashMap<&'static str, Arc<dyn PaymentChannel>> = HashMap::new();
    channels.insert(sandbox::NAME, sandbox.clone());
    let router = match routes {
        None => Router::with_defaults(channels.values().cloned().collect()),
        Some(routes) => Router::new(
            channels.values().cloned().collect(),
            routes,
            RouterOptions::default(),
            Arc::new(PaymentMetrics::new(&[sandbox::NAME])),
        ),
    };
    let api = NodeApi {
        engine,
        limiters: Arc::new(Limiters::new(&limits).unwrap()),
        client_ip: ClientIpResolver::new(Vec::new(), ClientIpHeader::None),
        router: Arc::new(router),
        channels,
        sandbox: Some(sandbox),
        return_links: ReturnLinks::new(b"return-link key for tests", 3600).unwrap(),
        lab,
        public_url: format!("https://{HOST}"),
        max_body_bytes: 16 * 1024,
        metrics: Arc::new(HttpMetrics::default()),
        abuse: Arc::new(
            crate::abuse::Abuse::new(
                crate::abuse::AbuseConfig::default(),
                b"challenge key for tests",
                Arc::new(crate::metrics::ChallengeMetrics::default()),
            )
            .unwrap(),
        ),
    };
    World { _dir: dir, api }
}

async fn world(keys: u64) -> World {
    let orders = OrdersConfig { max_open_per_ip: 100, ..OrdersConfig::default() };
    world_with(keys, orders, LimiterConfig::default()).await
}

struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn location(&self) -> String {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{}", self.body);
        self.header("location").to_string()
    }

    fn assert_html_security(&self) {
        assert_eq!(self.header("content-type"), "text/html; charset=utf-8");
        assert_eq!(self.header("content-security-policy"), CSP);
        assert_eq!(self.header("x-frame-options"), "DENY");
        assert_eq!(self.header("referrer-policy"), "no-referrer");
        assert!(!has_event_handler(&self.body), "an inline event handler: {}", self.body);
        assert!(!self.body.contains("style="), "inline style");
        assert!(!self.body.contains("<script>"), "inline script");
    }
}

/// ` onclick=`-like attributes.
fn has_event_handler(html: &str) -> bool {
    html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    })
}

fn get(path: &str) -> http::request::Builder {
    Request::builder().method(Method::GET).uri(path).header("host", HOST)
}

/// A form POST as a browser sends it from one of the shop's pages.
fn post_form(path: &str) -> http::request::Builder {
    post_form_from(path, &format!("https://{HOST}"), "same-origin")
}

fn post_form_from(path: &str, origin: &str, fetch_site: &str) -> http::request::Builder {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", HOST)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", origin)
        .header("sec-fetch-site", fetch_site)
}

/// Routes like `NodeApi::route` does for browser requests.
async fn send(w: &World, request: http::request::Builder, body: &str) -> Page {
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let client = IpAddr::from([192, 0, 2, 1]);
    let path = request.uri().path().to_string();
    let response = match path.strip_prefix("/pay/sandbox/") {
        Some(id) if request.method() == Method::POST && is_browser_form(request.headers()) => {
            let id = id.to_string();
            sandbox_pay_form(&w.api, request, client, &id).await
        }
        _ => handle(&w.api, request, client).await,
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Page { status: parts.status, headers: parts.headers, body: String::from_utf8(body.to_vec()).unwrap() }
}

async fn open(w: &World, path: &str) -> Page {
    send(w, get(path), "").await
}

/// Checkout of `quantity` game cards; returns the 303's location.
async fn checkout(w: &World, quantity: u32) -> Page {
    send(w, post_form("/checkout"), &format!("sku=game-10&quantity={quantity}&email=&channel=sandbox")).await
}

fn order_link(pay_location: &str) -> (String, String) {
    let rest = pay_location.strip_prefix("/pay/sandbox/").unwrap();
    let (id, token) = rest.split_once("?token=").unwrap();
    (id.to_string(), token.to_string())
}

async fn pay(w: &World, id: &str, token: &str) -> Page {
    send(w, post_form(&format!("/pay/sandbox/{id}")), &format!("token={token}")).await
}

#[tokio::test]
async fn script_in_a_product_title_renders_as_text() {
    let w = world(3).await;
    for path in ["/", "/p/xss"] {
        let page = open(&w, path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        page.assert_html_security();
        assert!(!page.body.contains("<script>alert(1)"), "{path}: raw script in {}", page.body);
        assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;"), "{path}");
    }
}

#[tokio::test]
async fn the_whole_purchase_works_through_the_forms() {
    let w = world(3).await;
    let list = open(&w, "/").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.header("cache-control"), CATALOG_CACHE);
    assert_eq!(list.header("vary"), "Accept-Language, Cookie");
    assert!(list.body.contains("Game card") && list.body.contains("$10.00") && list.body.contains("Only 3 left"));
    assert!(list.body.contains(&format!("/static/{}", assets::CSS.name)));

    let product = open(&w, "/p/game-10").await;
    assert_eq!(product.status, StatusCode::OK);
    assert!(product.body.contains("action=\"/checkout\"") && product.body.contains("value=\"sandbox\""));

    let location = checkout(&w, 2).await.location();
    assert!(location.starts_with("/pay/sandbox/"), "{location}");
    let (id, token) = order_link(&location);

    let pay_page = open(&w, &location).await;
    assert_eq!(pay_page.status, StatusCode::OK, "{}", pay_page.body);
    pay_page.assert_html_security();
    assert_eq!(pay_page.header("cache-control"), "no-store");
    assert!(pay_page.body.contains("Pay $20.00"), "{}", pay_page.body);

    let order_location = pay(&w, &id, &token).await.location();
    assert_eq!(order_location, format!("/order/{id}?token={token}"));
    let order = open(&w, &order_location).await;
    assert_eq!(order.status, StatusCode::OK);
    order.assert_html_security();
    assert_eq!(order.header("cache-control"), "no-store");
    assert!(order.body.contains("SECRET-000001") && order.body.contains("SECRET-000002"), "{}", order.body);
    assert!(order.body.contains("Delivered") && order.body.contains("data-copy=\"key-0\""));
    assert!(!order.body.contains("data-poll-order"), "a delivered order does not poll");

    // Paying again changes nothing and still lands on the order; the pay page now redirects.
    assert_eq!(pay(&w, &id, &token).await.location(), order_location);
    assert_eq!(open(&w, &location).await.location(), order_location);
}

#[tokio::test]
async fn reserved_order_page_polls_and_links_to_the_pay_page() {
    let w = world(3).await;
    let location = checkout(&w, 1).await.location();
    let (id, token) = order_link(&location);
    let order = open(&w, &format!("/order/{id}?token={token}")).await;
    assert_eq!(order.status, StatusCode::OK);
    assert!(order.body.contains("Awaiting payment"));
    assert!(order.body.contains(&format!("href=\"{location}\"")), "{}", order.body);
    assert!(order.body.contains(&format!("data-poll-order=\"{id}\"")) && order.body.contains("http-equiv=\"refresh\""));
}

#[tokio::test]
async fn pages_follow_accept_language_and_the_lang_switch_sticks() {
    let w = world(20).await;
    let zh = send(&w, get("/").header("accept-language", "zh-CN,zh;q=0.9,en;q=0.8"), "").await;
    assert_eq!(zh.status, StatusCode::OK);
    assert_eq!(zh.header("content-language"), "zh-CN");
    assert!(zh.body.contains("<html lang=\"zh-CN\">"));
    assert!(zh.body.contains("商品列表") && zh.body.contains("游戏卡") && zh.body.contains("¥72.00"), "{}", zh.body);
    assert!(zh.body.contains("有货"));
    assert!(!zh.body.contains("Products"));

    // The switch: ?lang= wins over Accept-Language and sets the cookie.
    let switched = send(&w, get("/p/game-10?lang=en").header("accept-language", "zh-CN"), "").await;
    assert!(switched.body.contains("<html lang=\"en\">") && switched.body.contains("$10.00"));
    let cookie = switched.header("set-cookie");
    for part in ["lang=en", "Path=/", "HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(cookie.contains(part), "{part} missing from {cookie}");
    }
    assert_eq!(switched.header("cache-control"), "no-store", "a response setting a cookie is never cached");

    // The cookie wins over Accept-Language on later pages.
    let sticky = send(&w, get("/").header("accept-language", "en-US").header("cookie", "lang=zh-CN"), "").await;
    assert!(sticky.body.contains("<html lang=\"zh-CN\">"));
    assert!(sticky.header("set-cookie").is_empty());
    // A nonsense cookie or ?lang= falls back to Accept-Language.
    let fallback = send(&w, get("/?lang=xx").header("cookie", "lang=<b>").header("accept-language", "zh"), "").await;
    assert!(fallback.body.contains("<html lang=\"zh-CN\">"));

    // The whole purchase in Chinese, prices in the order's currency.
    let location = send(
        &w,
        post_form("/checkout").header("cookie", "lang=zh-CN"),
        "sku=game-10&quantity=1&currency=CNY&channel=sandbox",
    )
    .await
    .location();
    let pay_page = send(&w, get(&location).header("cookie", "lang=zh-CN"), "").await;
    assert!(pay_page.body.contains("支付 ¥72.00"), "{}", pay_page.body);
    assert!(pay_page.body.contains("lang=en\""), "the switch keeps the token: {}", pay_page.body);
    let (id, token) = order_link(&location);
    let order_location = pay(&w, &id, &token).await.location();
    let order = send(&w, get(&order_location).header("cookie", "lang=zh-CN"), "").await;
    assert!(order.body.contains("已发货") && order.body.contains("您的卡密") && order.body.contains("复制"));
    assert!(order.body.contains("SECRET-"));
}

#[tokio::test]
async fn unknown_orders_wrong_tokens_and_unknown_pages_get_404_pages() {
    let w = world(3).await;
    let (id, token) = order_link(&checkout(&w, 1).await.location());
    let other_token = "0".repeat(32);
    for path in [
        format!("/order/{id}?token={other_token}"),
        format!("/order/{id}"),
        format!("/order/{id}?token=zz"),
        format!("/order/{}?token={token}", "1".repeat(32)),
        format!("/order/not-an-id?token={token}"),
        format!("/pay/sandbox/{id}?token={other_token}"),
    ] {
        let page = open(&w, &path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        page.assert_html_security();
        assert!(page.body.contains("Order not found"), "{path}");
        assert!(!page.body.contains(&token), "the token does not echo back");
    }
    let paid_with_wrong_token = pay(&w, &id, &other_token).await;
    assert_eq!(paid_with_wrong_token.status, StatusCode::NOT_FOUND);
    assert!(open(&w, &format!("/order/{id}?token={token}")).await.body.contains("Awaiting payment"));

    let unknown_product = open(&w, "/p/nope").await;
    assert_eq!(unknown_product.status, StatusCode::NOT_FOUND);
    assert!(unknown_product.body.contains("Product not found"));
    let unknown = open(&w, "/nothing/here").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.body.contains("Page not found"));
    let zh = send(&w, get("/nothing").header("accept-language", "zh"), "").await;
    assert!(zh.body.contains("页面不存在"));
}

#[tokio::test]
async fn sold_out_gets_a_clear_page() {
    let w = world(1).await;
    checkout(&w, 1).await.location();
    let page = checkout(&w, 1).await;
    assert_eq!(page.status, StatusCode::CONFLICT);
    page.assert_html_security();
    assert!(page.body.contains("Sold out") && page.body.contains("href=\"/p/game-10\""), "{}", page.body);
    let product = open(&w, "/p/game-10").await;
    assert!(product.body.contains("Sold out") && !product.body.contains("action=\"/checkout\""));
}

#[tokio::test]
async fn rate_limits_say_when_to_retry() {
    let limits = LimiterConfig { create_order: Quota { per_second: 1, burst: 1 }, ..LimiterConfig::default() };
    let w = world_with(5, OrdersConfig::default(), limits).await;
    checkout(&w, 1).await.location();
    let page = checkout(&w, 1).await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    let secs = page.header("retry-after").to_string();
    assert!(secs.parse::<u64>().unwrap() >= 1);
    assert!(page.body.contains(&format!("Please wait {secs} seconds")), "{}", page.body);
    assert_eq!(page.header("cache-control"), "no-store");
}

#[tokio::test]
async fn too_many_unpaid_orders_gets_its_own_page() {
    let orders = OrdersConfig { max_open_per_ip: 1, ..OrdersConfig::default() };
    let w = world_with(5, orders, LimiterConfig::default()).await;
    checkout(&w, 1).await.location();
    let page = send(&w, post_form("/checkout").header("accept-language", "zh-CN"), "sku=game-10&quantity=1").await;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(page.header("retry-after"), "60");
    assert!(page.body.contains("未支付订单过多") && page.body.contains("60 秒"), "{}", page.body);
}

#[tokio::test]
async fn expired_and_paid_awaiting_stock_orders_explain_themselves() {
    let w = world(1).await;
    let (late_id, late_token) = order_link(&checkout(&w, 1).await.location());
    let later = UnixMillis(now_millis().0 + 3_600_000);
    assert_eq!(w.api.engine.expire_due(later).await.unwrap(), 1);
    let expired = open(&w, &format!("/order/{late_id}?token={late_token}")).await;
    assert_eq!(expired.status, StatusCode::OK);
    assert!(expired.body.contains("Reservation expired") && expired.body.contains("href=\"/p/game-10\""));
    assert!(!expired.body.contains("data-poll-order"));

    // Someone else buys the key; the late payment then waits for stock.
    let (id, token) = order_link(&checkout(&w, 1).await.location());
    pay(&w, &id, &token).await.location();
    let location = pay(&w, &late_id, &late_token).await.location();
    let waiting = send(&w, get(&location).header("accept-language", "zh-CN"), "").await;
    assert!(waiting.body.contains("已支付，等待补货"), "{}", waiting.body);
    assert!(waiting.body.contains("data-poll-status=\"paid_awaiting_stock\""));
}

#[tokio::test]
async fn cross_site_posts_are_refused() {
    let w = world(3).await;
    let own = format!("https://{HOST}");
    let cross = send(&w, post_form_from("/checkout", &own, "cross-site"), "sku=game-10").await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);
    cross.assert_html_security();
    assert!(cross.body.contains("Request refused"));
    let foreign = send(&w, post_form_from("/checkout", "https://evil.example", "none"), "sku=game-10").await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    let same_site = send(&w, post_form_from("/checkout", &own, "same-site"), "sku=game-10").await;
    assert_eq!(same_site.status, StatusCode::FORBIDDEN);
    let null_cross = send(&w, post_form_from("/checkout", "null", "cross-site"), "sku=game-10").await;
    assert_eq!(null_cross.status, StatusCode::FORBIDDEN);
    let pay_cross = send(&w, post_form_from("/pay/sandbox/x", &own, "cross-site"), "token=x").await;
    assert_eq!(pay_cross.status, StatusCode::FORBIDDEN);
    assert_eq!(w.api.engine.open_reservations(), 0);
    // Same-origin forms under `Referrer-Policy: no-referrer` send `Origin: null`.
    let null_same = send(&w, post_form_from("/checkout", "null", "same-origin"), "sku=game-10").await;
    assert_eq!(null_same.status, StatusCode::SEE_OTHER);
    // A client that sends neither header (curl, old browsers) is allowed.
    let plain = Request::builder()
        .method(Method::POST)
        .uri("/checkout")
        .header("host", "127.0.0.1:8443")
        .header("content-type", "application/x-www-form-urlencoded");
    assert_eq!(send(&w, plain, "sku=game-10").await.status, StatusCode::SEE_OTHER);
    // The origin the request was sent to is this node's own.
    let direct = Request::builder()
        .method(Method::POST)
        .uri("/checkout")
        .header("host", "127.0.0.1:8443")
        .header("origin", "https://127.0.0.1:8443")
        .header("content-type", "application/x-www-form-urlencoded");
    assert_eq!(send(&w, direct, "sku=game-10").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn form_mistakes_come_back_on_the_product_page() {
    let w = world(20).await;
    let cases = [
        ("sku=game-10&quantity=abc", "Choose a quantity from 1 to 10."),
        ("sku=game-10&quantity=0", "Choose a quantity from 1 to 10."),
        ("sku=game-10&quantity=11", "Choose a quantity from 1 to 10."),
        ("sku=game-10&quantity=1&email=not-an-email", "That email address does not look right."),
        ("sku=game-10&quantity=1&currency=EUR", "This product is not sold in that currency."),
        ("sku=game-10&quantity=1&channel=bitcoin", "Choose one of the payment methods listed."),
    ];
    for (body, message) in cases {
        let page = send(&w, post_form("/checkout"), body).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(page.body.contains(message), "{body}: {}", page.body);
        assert!(page.body.contains("action=\"/checkout\""), "{body}: the form is shown again");
        assert_eq!(page.header("cache-control"), "no-store");
    }
    let echoed = send(&w, post_form("/checkout"), "sku=game-10&quantity=1&email=%3Cb%3Ex").await;
    assert!(echoed.body.contains("value=\"&lt;b&gt;x\""), "echoed values are escaped: {}", echoed.body);
    let json = Request::builder().method(Method::POST).uri("/checkout").header("content-type", "application/json");
    let wrong_type = send(&w, json, "{}").await;
    assert_eq!(wrong_type.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let unknown_sku = send(&w, post_form("/checkout"), "sku=%00&quantity=1").await;
    assert_eq!(unknown_sku.status, StatusCode::NOT_FOUND);
    let too_big = send(&w, post_form("/checkout"), &"a".repeat(20_000)).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(w.api.engine.open_reservations(), 0);
}

#[tokio::test]
async fn static_assets_have_hashed_names_and_long_lifetimes() {
    let w = world(0).await;
    for asset in [&*assets::CSS, &*assets::JS] {
        let page = open(&w, &assets::url(asset)).await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(page.header("cache-control"), "public, max-age=31536000, immutable");
        assert_eq!(page.body.as_bytes(), asset.body);
    }
    assert_eq!(open(&w, "/static/app.000000000000.css").await.status, StatusCode::NOT_FOUND);
    assert!(assets::CSS.name.starts_with("app.") && assets::CSS.name.ends_with(".css"));
}

#[tokio::test]
async fn wrong_methods_and_hostile_input_get_pages_not_panics() {
    let w = world(2).await;
    let delete = send(&w, Request::builder().method(Method::DELETE).uri("/").header("host", HOST), "").await;
    assert_eq!(delete.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(delete.header("allow"), "GET, HEAD");
    let get_checkout = open(&w, "/checkout").await;
    assert_eq!(get_checkout.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get_checkout.header("allow"), "POST");
    for path in [
        "/p/%3Cscript%3E",
        "/p/",
        "/p/a/b",
        "/order/",
        "/order/%ff?token=%ff%fe",
        "/pay/sandbox/?token=",
        "/?lang=%ff&currency=%00",
        "/?currency=JPY&currency=USD",
        "//////",
        "/static/",
        "/static/..%2f..%2fetc%2fpasswd",
    ] {
        let page = open(&w, path).await;
        assert!(page.status.is_client_error() || page.status.is_success(), "{path}: {}", page.status);
        assert!(!page.body.contains("<script>"), "{path}");
    }
    for body in ["", "&&&", "sku", "sku=game-10&quantity=99999999999999999999", "quantity=1&sku=game-10&sku=xss"] {
        let page = send(&w, post_form("/checkout"), body).await;
        assert!(page.status.is_client_error() || page.status.is_redirection(), "{body}: {}", page.status);
    }
}

/// The path a hosted provider sends the buyer back to for order `id`.
async fn return_path(w: &World, id: &str) -> String {
    let record = w.api.engine.order_for_payment(&id.parse().unwrap()).unwrap();
    format!("/order/{id}/return/{}", w.api.return_links.token(&record))
}

#[tokio::test]
async fn a_return_link_shows_the_order_and_its_keys_without_the_order_token() {
    let w = world(3).await;
    let (id, token) = order_link(&checkout(&w, 1).await.location());
    let back = return_path(&w, &id).await;
    let reserved = open(&w, &back).await;
    assert_eq!(reserved.status, StatusCode::OK, "{}", reserved.body);
    assert!(reserved.body.contains("Awaiting payment"), "{}", reserved.body);
    assert!(!reserved.body.contains("/pay/sandbox/"), "no pay link without the order token");

    pay(&w, &id, &token).await.location();
    // EPay gateways append their signed result to the return URL; it changes nothing.
    for path in [back.clone(), format!("{back}?pid=1001&trade_status=TRADE_SUCCESS&sign=x")] {
        let page = open(&w, &path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        page.assert_html_security();
        assert_eq!(page.header("cache-control"), "no-store");
        assert!(page.body.contains("Delivered") && page.body.contains("SECRET-000001"), "{}", page.body);
        assert!(page.body.contains("id=\"return-link\""), "says until when the link works: {}", page.body);
        assert!(!page.body.contains(&token), "the order token is never on a return page");
    }
    let zh = send(&w, get(&back).header("accept-language", "zh-CN"), "").await;
    assert!(zh.body.contains("您已从支付页面返回"), "{}", zh.body);
}

#[tokio::test]
async fn forged_foreign_and_expired_return_links_show_nothing() {
    let w = world(3).await;
    let (id, token) = order_link(&checkout(&w, 1).await.location());
    pay(&w, &id, &token).await.location();
    let (other, _) = order_link(&checkout(&w, 1).await.location());
    let back = return_path(&w, &id).await;
    let rt = back.rsplit('/').next().unwrap().to_string();
    let foreign = ReturnLinks::new(b"another node's return-link key", 3600).unwrap();
    let record = w.api.engine.order_for_payment(&id.parse().unwrap()).unwrap();
    for path in [
        format!("/order/{other}/return/{rt}"),
        format!("/order/{id}/return/{}", foreign.token(&record)),
        format!("/order/{id}/return/{token}"),
        format!("/order/{id}/return/1-00"),
        format!("/order/{id}/return/"),
        format!("/order/not-an-id/return/{rt}"),
    ] {
        let page = open(&w, &path).await;
        assert!(page.status == StatusCode::NOT_FOUND, "{path}: {}", page.status);
        assert!(!page.body.contains("SECRET-"), "{path}");
    }
    // A link of this order minted long ago (its creation time decides its expiry).
    let mut old = record.clone();
    old.created_at = UnixMillis(1_000_000);
    let expired = open(&w, &format!("/order/{id}/return/{}", w.api.return_links.token(&old))).await;
    assert_eq!(expired.status, StatusCode::GONE, "{}", expired.body);
    assert!(expired.body.contains("Link expired") && !expired.body.contains("SECRET-"), "{}", expired.body);
}

#[tokio::test]
async fn lab_payments_beside_real_channels_are_announced_on_every_page() {
    let lab =
        world_routed(3, OrdersConfig::default(), LimiterConfig::default(), None, LabPayments::BesideRealChannels).await;
    let (id, token) = order_link(&checkout(&lab, 1).await.location());
    for path in ["/".to_string(), "/p/game-10".into(), format!("/order/{id}?token={token}"), "/nothing".into()] {
        let page = open(&lab, &path).await;
        assert!(page.body.contains("id=\"lab-payments\"") && page.body.contains("test payments are enabled"), "{path}");
    }
    let quiet = world(3).await;
    assert!(!open(&quiet, "/").await.body.contains("lab-payments"), "a lab node's own pages need no banner");
}

#[tokio::test]
async fn a_product_no_channel_serves_shows_no_buy_button() {
    // The sandbox serves EUR only; the game card sells in USD and CNY.
    let routes = Routes { by_currency: BTreeMap::from([("EUR".into(), vec![0])]), default: vec![] };
    let w =
        world_routed(3, OrdersConfig::default(), LimiterConfig::default(), Some(routes), LabPayments::LabNode).await;
    let list = open(&w, "/").await;
    assert!(list.body.contains("Not available for purchase"), "{}", list.body);
    assert!(!list.body.contains("class=\"button\" href=\"/p/game-10\""), "no Buy: {}", list.body);
    let product = open(&w, "/p/game-10").await;
    assert_eq!(product.status, StatusCode::OK);
    assert!(product.body.contains("Not available for purchase"), "{}", product.body);
    assert!(!product.body.contains("action=\"/checkout\""), "{}", product.body);
    let refused = send(&w, post_form("/checkout"), "sku=game-10&quantity=1").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(w.api.engine.open_reservations(), 0);

    // Served in CNY only: the form offers CNY alone, and USD is refused at submit.
    let routes = Routes { by_currency: BTreeMap::from([("CNY".into(), vec![0])]), default: vec![] };
    let w =
        world_routed(3, OrdersConfig::default(), LimiterConfig::default(), Some(routes), LabPayments::LabNode).await;
    let product = open(&w, "/p/game-10").await;
    assert!(product.body.contains("name=\"currency\" value=\"CNY\""), "{}", product.body);
    assert!(!product.body.contains("value=\"USD\""), "{}", product.body);
    let usd = send(&w, post_form("/checkout"), "sku=game-10&quantity=1&currency=USD&channel=sandbox").await;
    assert_eq!(usd.status, StatusCode::BAD_REQUEST);
    let cny = send(&w, post_form("/checkout"), "sku=game-10&quantity=1&currency=CNY&channel=sandbox").await;
    assert!(cny.location().starts_with("/pay/sandbox/"));
}

#[tokio::test]
async fn a_checkout_queues_its_mail_in_the_pages_language() {
    let w = world(3).await;
    w.api.engine.enable_mail(crate::mail::Queueing { include_keys: false, default_language: "en".into() });
    let form = "sku=game-10&quantity=1&email=buyer%40example.com&channel=sandbox";
    let location = send(&w, post_form("/checkout").header("accept-language", "zh-CN,zh;q=0.9"), form).await.location();
    assert!(location.starts_with("/pay/sandbox/"), "{location}");
    send(&w, post_form("/checkout").header("accept-language", "en"), form).await.location();
    let jobs = crate::mail::queue::all_jobs(w.api.engine.store()).unwrap();
    let mut langs: Vec<&str> = jobs.iter().map(|j| j.lang.as_str()).collect();
    langs.sort_unstable();
    assert_eq!(langs, ["en", "zh-CN"]);
    assert!(jobs.iter().all(|j| j.kind == crate::mail::queue::MailKind::OrderLink));
    // No address, no mail.
    send(&w, post_form("/checkout"), "sku=game-10&quantity=1&email=&channel=sandbox").await.location();
    assert_eq!(crate::mail::queue::all_jobs(w.api.engine.store()).unwrap().len(), 2);
}
