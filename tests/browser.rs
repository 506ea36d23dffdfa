//! The storefront as buyers use it: a real headless chromium (Debian's, driven over W3C
//! WebDriver) against the real `edgecard node run` over HTTPS, at a phone's width, in English and
//! in Chinese, with a screenshot of every step in `target/test-artifacts/browser/`. Plus the
//! storefront's guarantees checked over HTTPS without a browser: escaping, order-page headers,
//! language and error pages.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver`: `bash .ci/install-browser`.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "browser/webdriver.rs"]
mod webdriver;

use std::time::{Duration, Instant};

use common::{make_secrets, NodeOptions, NodeProcess, TestEnv, SKU};
use edgecard::https_client::Request;
use webdriver::WebDriver;

/// A product whose title tries to run script: it must show as text.
const XSS_SKU: &str = "xss-test";
const XSS_TITLE: &str = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">";
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// A phone's viewport, and the narrowest one the pages must fit.
const PHONE: (u32, u32) = (390, 844);
const NARROW: (u32, u32) = (360, 740);

fn xss_product() -> String {
    format!(
        "[[products]]\nsku = \"{XSS_SKU}\"\ntitle = {{ en = {} }}\nprices = [{{ amount_minor = 500, currency = \"USD\" }}]\n",
        toml::Value::String(XSS_TITLE.into())
    )
}

fn start_shop(env: &TestEnv, secrets: &[String]) -> NodeProcess {
    let options = NodeOptions::with_grants(vec![env.grant_file(secrets)]);
    env.start_node_with(&options, &xss_product())
}

struct Shot {
    dir: std::path::PathBuf,
}

impl Shot {
    async fn take(&self, driver: &WebDriver, name: &str) {
        driver.screenshot(&self.dir.join(format!("{name}.png"))).await;
    }
}

/// Buys one key through the pages, from the product list on; returns the key shown.
async fn buy_through_the_pages(driver: &WebDriver, shot: &Shot, prefix: &str, texts: &Texts) -> String {
    // 1. The store.
    let heading = driver.wait_for("main h1", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&heading).await, texts.list_title);
    let lang = driver.execute("return document.documentElement.lang").await;
    assert_eq!(lang, texts.lang, "page language");
    assert_fits(driver).await;
    let xss_card = driver.wait_for(&format!("a[href=\"/p/{XSS_SKU}\"]"), STEP_TIMEOUT).await;
    assert_eq!(driver.text(&xss_card).await, XSS_TITLE, "a title with markup shows as text");
    assert_eq!(driver.execute("return window.__pwned === undefined").await, true, "the title's script ran");
    shot.take(driver, &format!("{prefix}-1-store")).await;

    // 2. The product page and its checkout form.
    let buy = driver.wait_for(&format!("a.button[href=\"/p/{SKU}\"]"), STEP_TIMEOUT).await;
    driver.click(&buy).await;
    let quantity = driver.wait_for("input#quantity", STEP_TIMEOUT).await;
    driver.clear(&quantity).await;
    driver.type_text(&quantity, "1").await;
    let sandbox = driver.wait_for("input[name=channel][value=sandbox]", STEP_TIMEOUT).await;
    assert_eq!(driver.attribute(&sandbox, "checked").await.as_deref(), Some("true"));
    assert_fits(driver).await;
    shot.take(driver, &format!("{prefix}-2-product")).await;

    // 3. Checkout → the sandbox pay page.
    let submit = driver.wait_for("form[action=\"/checkout\"] button[type=submit]", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&submit).await, texts.submit);
    driver.click(&submit).await;
    let pay = driver.wait_for("button#pay", STEP_TIMEOUT).await;
    assert!(driver.current_url().await.contains("/pay/sandbox/"), "{}", driver.current_url().await);
    assert_eq!(driver.text(&pay).await, texts.pay_button);
    shot.take(driver, &format!("{prefix}-3-pay")).await;

    // 4. Pay → the order page with the key.
    driver.click(&pay).await;
    let key = driver.wait_for("ul#keys code", STEP_TIMEOUT).await;
    let url = driver.current_url().await;
    assert!(url.contains("/order/") && url.contains("?token="), "{url}");
    let status = driver.wait_for("#status", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&status).await, texts.delivered);
    let copy = driver.wait_for("ul#keys button[data-copy]", STEP_TIMEOUT).await;
    assert!(driver.is_displayed(&copy).await, "the copy button shows once the script runs");
    assert_eq!(driver.text(&copy).await, texts.copy);
    assert_fits(driver).await;
    shot.take(driver, &format!("{prefix}-4-order")).await;
    driver.text(&key).await
}

/// The page is laid out for the viewport: no sideways scrolling.
async fn assert_fits(driver: &WebDriver) {
    let sizes = driver
        .execute(
            "return [window.innerWidth, document.documentElement.scrollWidth, document.documentElement.clientWidth]",
        )
        .await;
    let sizes: Vec<u64> = sizes.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(sizes[1] <= sizes[2], "the page scrolls sideways at {} px: {sizes:?}", sizes[0]);
}

struct Texts {
    lang: &'static str,
    list_title: &'static str,
    submit: &'static str,
    pay_button: &'static str,
    delivered: &'static str,
    copy: &'static str,
}

const EN: Texts = Texts {
    lang: "en",
    list_title: "Products",
    submit: "Continue to payment",
    pay_button: "Pay $10.00",
    delivered: "Delivered",
    copy: "Copy",
};

const ZH_CN: Texts = Texts {
    lang: "zh-CN",
    list_title: "商品列表",
    submit: "去支付",
    pay_button: "支付 US$10.00",
    delivered: "已发货",
    copy: "复制",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_buys_a_key_in_a_real_browser_in_english_and_chinese() {
    webdriver::require_browser();
    let started = Instant::now();
    let env = TestEnv::new();
    let secrets = make_secrets(6);
    let node = start_shop(&env, &secrets);
    let shot = Shot { dir: webdriver::artifacts_dir() };

    // English, as Accept-Language says.
    let driver = WebDriver::start(PHONE.0, PHONE.1, "en-US,en").await;
    driver.goto(&format!("{}/", node.https_url)).await;
    assert_eq!(driver.execute("return window.innerWidth").await, PHONE.0, "viewport width");
    let key = buy_through_the_pages(&driver, &shot, "en", &EN).await;
    assert!(secrets.contains(&key), "{key} is not one of the granted keys");

    // Switch to Chinese on the order page: same order, the token kept, the choice sticks.
    let order_url = driver.current_url().await;
    let switch = driver.wait_for("nav.lang a[hreflang=\"zh-CN\"]", STEP_TIMEOUT).await;
    driver.click(&switch).await;
    let status = driver.wait_for("#status", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&status).await, ZH_CN.delivered);
    let same_key = driver.wait_for("ul#keys code", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&same_key).await, key);
    assert!(driver.current_url().await.starts_with(&order_url), "the switch keeps the order link");

    driver.goto(&format!("{}/", node.https_url)).await;
    let zh_key = buy_through_the_pages(&driver, &shot, "zh-CN", &ZH_CN).await;
    assert!(secrets.contains(&zh_key) && zh_key != key, "a second, different key");
    driver.quit().await;

    // A browser whose language is Chinese gets Chinese from the first page, and the pages fit
    // the narrowest phones.
    let driver = WebDriver::start(NARROW.0, NARROW.1, "zh-CN,zh").await;
    driver.goto(&format!("{}/", node.https_url)).await;
    let heading = driver.wait_for("main h1", STEP_TIMEOUT).await;
    assert_eq!(driver.text(&heading).await, ZH_CN.list_title);
    assert_fits(&driver).await;
    driver.goto(&format!("{}/p/{SKU}", node.https_url)).await;
    driver.wait_for("input#quantity", STEP_TIMEOUT).await;
    assert_fits(&driver).await;
    shot.take(&driver, "zh-CN-5-product-360px").await;
    driver.quit().await;

    let logs = node.stderr();
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a key reached the node's log");
    }
    assert!(!logs.contains("/order/") && !logs.contains("token="), "paths or tokens reached the node's log");
    eprintln!("browser test: {:?}; screenshots in {}", started.elapsed(), shot.dir.display());
}

/// POSTs a form the way the pages do.
fn form_post(node: &NodeProcess, path: &str, body: &str) -> Request {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", &node.https_url)
        .header("sec-fetch-site", "same-origin")
        .body(body.as_bytes().to_vec())
}

#[tokio::test]
async fn order_pages_over_https_are_never_stored_and_carry_the_csp() {
    let env = TestEnv::new();
    let secrets = make_secrets(2);
    let node = start_shop(&env, &secrets);
    let mut client = node.client().await;

    let checkout = client.send(form_post(&node, "/checkout", &format!("sku={SKU}&quantity=1"))).await;
    assert_eq!(checkout.status, 303, "{}", checkout.text());
    let pay_page = checkout.header("location").unwrap().to_string();
    assert_eq!(checkout.header("cache-control"), Some("no-store"));
    let (path, token) = pay_page.split_once("?token=").unwrap();
    let id = path.strip_prefix("/pay/sandbox/").unwrap();

    let page = client.send(Request::get(&pay_page)).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("cache-control"), Some("no-store"));

    let paid = client.send(form_post(&node, &format!("/pay/sandbox/{id}"), &format!("token={token}"))).await;
    assert_eq!(paid.status, 303, "{}", paid.text());
    let order_page = paid.header("location").unwrap().to_string();
    assert_eq!(order_page, format!("/order/{id}?token={token}"));

    let order = client.send(Request::get(&order_page)).await;
    assert_eq!(order.status, 200);
    assert_eq!(order.header("cache-control"), Some("no-store"));
    let csp = order.header("content-security-policy").unwrap();
    for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "form-action 'self'"] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert_eq!(order.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(order.header("x-frame-options"), Some("DENY"));
    assert_eq!(order.header("x-content-type-options"), Some("nosniff"));
    assert!(order.header("content-type").unwrap().starts_with("text/html"));
    let body = order.text();
    assert!(secrets.iter().any(|s| body.contains(s.as_str())), "the key is on the order page");

    // The JSON API still answers script clients at the same pay URL, token included; without
    // the token it pays nothing.
    let second = client.send(form_post(&node, "/checkout", &format!("sku={SKU}&quantity=1"))).await;
    let pay_url = second.header("location").unwrap().to_string();
    let (path, _) = pay_url.split_once("?token=").unwrap();
    assert_eq!(client.send(Request::post(path)).await.status, 401, "a sandbox payment without the token");
    let api_paid = client.send(Request::post(&pay_url)).await;
    assert_eq!(api_paid.status, 200, "{}", api_paid.text());
    assert_eq!(api_paid.json::<serde_json::Value>().unwrap()["status"], "delivered");
}

#[tokio::test]
async fn script_in_a_title_is_text_and_pages_speak_chinese_over_https() {
    let env = TestEnv::new();
    let node = start_shop(&env, &make_secrets(3));
    let mut client = node.client().await;

    let list = client.send(Request::get("/")).await;
    assert_eq!(list.status, 200);
    let body = list.text();
    assert!(!body.contains("<script>window.__pwned"), "raw script in the page");
    assert!(body.contains("&lt;script&gt;window.__pwned=1&lt;/script&gt;&lt;img src=x onerror=&quot;"), "{body}");

    let zh = client.send(Request::get("/").header("accept-language", "zh-CN,zh;q=0.9")).await;
    assert_eq!(zh.header("content-language"), Some("zh-CN"));
    let body = zh.text();
    assert!(body.contains("商品列表") && body.contains("游戏卡") && body.contains("US$10.00"), "{body}");

    let unknown = client.send(Request::get(&format!("/order/{}?token={}", "a".repeat(32), "b".repeat(32)))).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.text().contains("Order not found"));
    let api_unknown = client.send(Request::get("/api/v1/nothing")).await;
    assert_eq!(api_unknown.status, 404);
    assert!(api_unknown.text().starts_with('{'), "unknown API paths stay JSON");
}

/// A flash sale: the checkout is challenged, and the browser solves the proof of work in a Web
/// Worker (under the strict CSP) and places the order without the buyer doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_solves_the_flash_sale_challenge_in_a_web_worker() {
    webdriver::require_browser();
    let env = TestEnv::new();
    let secrets = make_secrets(3);
    let abuse =
        format!("flash_sale_skus = [\"{SKU}\"]\nmin_difficulty = 14\nmax_difficulty = 14\nwait_ticket_secs = 600\n");
    let node =
        env.start_node(&NodeOptions { abuse: Some(abuse), ..NodeOptions::with_grants(vec![env.grant_file(&secrets)]) });
    let shot = Shot { dir: webdriver::artifacts_dir() };
    let driver = WebDriver::start(PHONE.0, PHONE.1, "en-US,en").await;
    driver.goto(&format!("{}/p/{SKU}", node.https_url)).await;
    let submit = driver.wait_for("form[action=\"/checkout\"] button[type=submit]", STEP_TIMEOUT).await;
    driver.click(&submit).await;
    // The wait ticket needs ten minutes: reaching the pay page in time means the worker solved it.
    let pay = driver.wait_for("button#pay", Duration::from_secs(60)).await;
    assert!(driver.current_url().await.contains("/pay/sandbox/"), "{}", driver.current_url().await);
    shot.take(&driver, "challenge-solved-pay").await;
    driver.click(&pay).await;
    let key = driver.wait_for("ul#keys code", STEP_TIMEOUT).await;
    assert!(secrets.contains(&driver.text(&key).await));
    driver.quit().await;

    let metrics = node.metrics().await;
    assert_eq!(metrics[r#"edgecard_challenges_total{kind="challenge",result="issued"}"#], 1.0);
    assert_eq!(metrics[r#"edgecard_challenges_total{kind="challenge",result="solved"}"#], 1.0);
}
