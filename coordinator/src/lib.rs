//! The Edgecard coordinator: master inventory, ledger, slice planner, QUIC server and admin API.
//!
//! Pure logic (key-file parsing, records) sits apart from the modules that do I/O (the service
//! over the store, the QUIC server, the admin API).
pub mod admin_api;
pub mod enrol;
/// Fuzz harness (see `fuzz/`); not used by the coordinator itself.
#[doc(hidden)]
pub mod find_orders;
pub mod fuzzing;
pub mod import;
pub mod layout;
pub mod metrics;
pub mod pki;
pub mod quic;
pub mod records;
pub mod refunds;
pub mod runtime;
pub mod service;
pub mod slices;
