//! The `edgecard` binary's library: the CLI's pieces, shared with the integration tests.

pub mod admin_client;
pub mod bench;
pub mod demo;
pub mod enrol;
pub mod grant_tool;
pub mod https_client;
pub mod logging;
pub mod ops;
