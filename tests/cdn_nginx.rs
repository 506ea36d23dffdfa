//! The shipped nginx configuration (deploy/cdn/edgecard-nginx.conf) in front of a real node, with
//! a real nginx process on loopback: the catalog, the storefront's pages and static assets are
//! served from the cache (per language, revalidated with weak ETags), orders never are, the origin's
//! certificate is verified, and the node keys buyers by their own address, not by what they claim
//! in `X-Forwarded-For`.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgecard::https_client::{Endpoint, Request, Response};
use serde_json::{json, Value};

/// nginx's address towards the node: the only one the node trusts as a proxy, so that the
/// buyer (on 127.0.0.1) is an ordinary client to it.
const PROXY_HOP: &str = "127.0.0.2";

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The shipped file with its placeholders filled, wrapped in a main context a non-root nginx can
/// run with.
fn start_nginx(dir: &Path, origin: &str, origin_ca: &Path) -> (Nginx, u16) {
    let port = free_port();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cdn/edgecard-nginx.conf")).unwrap();
    let site = shipped
        .replace("CACHE_DIR", &dir.join("cache").display().to_string())
        .replace("LISTEN", &format!("127.0.0.1:{port}"))
        .replace("SERVER_NAME", "eu.shop.test")
        .replace("ORIGIN_NAME", "localhost")
        .replace("ORIGIN_CA", &origin_ca.display().to_string())
        .replace("ORIGIN", origin)
        // Only for this test: leave from the address the node trusts as its proxy.
        .replace("proxy_http_version 1.1;", &format!("proxy_http_version 1.1;\n    proxy_bind {PROXY_HOP};"));
    std::fs::write(dir.join("site.conf"), site).unwrap();
    let temp = dir.join("temp");
    std::fs::create_dir_all(&temp).unwrap();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log stderr warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  \
         fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n  \
         include {site};\n}}\n",
        pid = dir.join("nginx.pid").display(),
        t = temp.display(),
        site = dir.join("site.conf").display(),
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let nginx = which("nginx").unwrap_or_else(|| panic!("nginx is not installed: run `bash .ci/install-tools`"));
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg("stderr")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let nginx = Nginx(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (nginx, port)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
}

fn cache_status(response: &Response) -> String {
    response.header("x-cache-status").unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_config_caches_what_is_public_and_nothing_else() {
    let env = TestEnv::new();
    let secrets = make_secrets(10);
    let options = NodeOptions {
        trusted_proxies: vec![format!("{PROXY_HOP}/32")],
        create_order_limit: (1, 2),
        ..NodeOptions::with_grants(vec![env.grant_file(&secrets)])
    };
    let node = env.start_node(&options);
    let origin = node.https_url.trim_start_matches("https://").to_string();
    let origin_ca = env.path("data-eu-1").join("tls/self-signed-cert.pem");
    let (_nginx, port) = start_nginx(&env.path(""), &origin, &origin_ca);
    let cdn = Endpoint::parse(&format!("http://127.0.0.1:{port}"), None).unwrap().with_timeout(REQUEST_TIMEOUT);
    let get = |path: &str| Request::get(path).header("host", "eu.shop.test");

    bounded("through the CDN", Duration::from_secs(60), async {
        // The catalog: a miss, then hits, per language; the English and Chinese variants differ.
        let first = cdn.request(get("/api/v1/products").header("accept-language", "en-GB,en;q=0.9")).await.unwrap();
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(cache_status(&first), "MISS");
        let again = cdn.request(get("/api/v1/products").header("accept-language", "en-US")).await.unwrap();
        assert_eq!(cache_status(&again), "HIT", "another English browser shares the entry");
        let zh = cdn.request(get("/api/v1/products").header("accept-language", "zh-CN,zh;q=0.9")).await.unwrap();
        assert_eq!(cache_status(&zh), "MISS");
        assert_eq!(zh.json::<Vec<Value>>().unwrap()[0]["title"], "游戏卡");
        let zh = cdn.request(get("/api/v1/products").header("accept-language", "zh-TW")).await.unwrap();
        assert_eq!(cache_status(&zh), "HIT");

        // A weak validator from the browser gets a 304 through the cache.
        let etag = first.header("etag").unwrap().to_string();
        let weak = format!("W/{}", etag.trim_start_matches("W/"));
        let revalidated = cdn
            .request(get("/api/v1/products").header("accept-language", "en").header("if-none-match", &weak))
            .await
            .unwrap();
        assert_eq!(revalidated.status, 304, "{}", revalidated.text());

        // The storefront's home page and its static assets are cached too.
        let home = cdn.request(get("/")).await.unwrap();
        assert_eq!(home.status, 200);
        assert_eq!(cache_status(&cdn.request(get("/")).await.unwrap()), "HIT");
        let html = home.text();
        let asset = html.split('"').find(|s| s.starts_with("/static/")).unwrap().to_string();
        assert_eq!(cache_status(&cdn.request(get(&asset)).await.unwrap()), "MISS");
        assert_eq!(cache_status(&cdn.request(get(&asset)).await.unwrap()), "HIT");

        // Orders are never stored: the same order fetched twice goes to the origin twice.
        let created = cdn
            .request(
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU }))
                    .header("host", "eu.shop.test")
                    .header("x-forwarded-for", "203.0.113.9"),
            )
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{}", created.text());
        let order = Created::from_response(&created);
        for _ in 0..2 {
            let fetched = cdn
                .request(
                    get(&format!("/api/v1/orders/{}", order.order_id))
                        .header("authorization", &format!("Bearer {}", order.token)),
                )
                .await
                .unwrap();
            assert_eq!(fetched.status, 200);
            assert!(matches!(cache_status(&fetched).as_str(), "" | "BYPASS"), "{}", cache_status(&fetched));
            assert_eq!(fetched.header("cache-control"), Some("no-store"));
        }

        // The node keys the buyer by the buyer's own address (127.0.0.1), whatever it claims:
        // with a burst of 2 creations per address, one more through the CDN (claiming yet
        // another address) and one straight to the node from the same address use the bucket up.
        let mut direct = node.client().await;
        direct.forwarded_for = None;
        assert_eq!(direct.create_order(&json!({ "sku": SKU })).await.status, 201);
        let refused = cdn
            .request(
                Request::post_json("/api/v1/orders", &json!({ "sku": SKU }))
                    .header("host", "eu.shop.test")
                    .header("x-forwarded-for", "198.51.100.7"),
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 429, "a claimed address escaped the buyer's limit: {}", refused.text());
    })
    .await;
}
