//! Network plumbing shared by the node and the coordinator: the one rustls crypto provider,
//! certificates, and the HTTP connection layer (TLS accept, HTTP/1.1 and HTTP/2, timeouts,
//! connection cap, graceful shutdown), and the metrics plumbing (`/metrics` text, build info,
//! process metrics). Nothing here knows about routes or orders.

pub mod auth;
pub mod http_server;
pub mod metrics;
pub mod process_metrics;
pub mod tls;
