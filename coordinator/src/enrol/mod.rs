//! Node enrolment without shipping private keys.
//!
//! `nodes add` registers the node and issues a one-time, expiring join token ([`token`],
//! stored hashed by [`tokens`]); the node makes its own key pair and sends a certificate
//! signing request with the token's secret to the enrolment endpoint ([`server`]), which
//! answers with a certificate for the token's node. The node's private key never leaves it.
pub mod server;
pub mod token;
pub mod tokens;
