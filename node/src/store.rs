//! The node's durable store (see the `edgecard-store` crate).

pub use edgecard_store::{Health, Store, StoreError, WriteBatch};
