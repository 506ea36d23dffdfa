//! Static assets, embedded in the binary and served under content-hashed names, so they can be
//! cached for a year (`immutable`) and a new build never serves a stale file.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

pub struct Asset {
    /// `app.<hash>.css`
    pub name: String,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

fn asset(stem: &str, ext: &str, content_type: &'static str, body: &'static [u8]) -> Asset {
    let hash = hex::encode(&Sha256::digest(body)[..6]);
    Asset { name: format!("{stem}.{hash}.{ext}"), content_type, body }
}

pub static CSS: LazyLock<Asset> =
    LazyLock::new(|| asset("app", "css", "text/css; charset=utf-8", include_bytes!("../../assets/app.css")));
pub static JS: LazyLock<Asset> =
    LazyLock::new(|| asset("app", "js", "text/javascript; charset=utf-8", include_bytes!("../../assets/app.js")));

/// The proof-of-work solver, run in a Web Worker by the challenge page (docs/abuse.md).
pub static POW_WORKER: LazyLock<Asset> = LazyLock::new(|| {
    asset("pow-worker", "js", "text/javascript; charset=utf-8", include_bytes!("../../assets/pow-worker.js"))
});

/// The asset named `name` (the hashed name only).
pub fn find(name: &str) -> Option<&'static Asset> {
    [&*CSS, &*JS, &*POW_WORKER].into_iter().find(|a| a.name == name)
}

/// `/static/<hashed name>`
pub fn url(asset: &Asset) -> String {
    format!("/static/{}", asset.name)
}
