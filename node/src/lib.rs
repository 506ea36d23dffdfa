//! The Edgecard edge node: sells card keys from signed slices it holds, over HTTPS.
//!
//! Pure logic (limiter keys, client-IP resolution, config validation; what the node holds and may
//! sell is `edgecard_protocol::holdings`) sits apart from the modules that do I/O (store, engine,
//! HTTP), so it can be tested without sockets.

pub mod abuse;
pub mod admin;
pub mod api;
pub mod catalog;
pub mod client_ip;
pub mod config;
/// Fuzz harnesses (see `fuzz/`); not used by the node itself.
#[doc(hidden)]
pub mod fuzzing;
pub mod http_metrics;
pub mod limiter;
pub mod mail;
pub mod metrics;
pub mod orders;
pub mod payments;
pub mod runtime;
pub mod store;
pub mod storefront;
pub mod sync_link;
pub mod time_fmt;

/// TLS and the HTTP connection layer live in the shared `edgecard-net` crate.
pub use edgecard_net::{http_server, tls};
