//! The store's health, as callers, `/healthz` and metrics see it.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::metrics::StoreMetrics;

/// What the store can do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Writes are accepted and become durable.
    Ok,
    /// The disk is full: writes are refused until space returns, then resume by themselves.
    DiskFull,
    /// An fsync or write failed: what the disk holds is unknown, so every later write is refused
    /// for good. The process must exit and recover from disk.
    Poisoned,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::DiskFull => "disk_full",
            Health::Poisoned => "poisoned",
        }
    }

    /// The value of the `edgecard_store_health` gauge.
    pub fn code(self) -> i64 {
        match self {
            Health::Ok => 0,
            Health::DiskFull => 1,
            Health::Poisoned => 2,
        }
    }
}

/// Shared health with a change feed; poisoned is final.
pub struct HealthCell {
    tx: watch::Sender<Health>,
    poison_reason: Mutex<Option<String>>,
    metrics: Arc<StoreMetrics>,
}

impl HealthCell {
    pub fn new(metrics: Arc<StoreMetrics>) -> Self {
        metrics.health.set(Health::Ok.code());
        HealthCell { tx: watch::Sender::new(Health::Ok), poison_reason: Mutex::new(None), metrics }
    }

    pub fn get(&self) -> Health {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Health> {
        self.tx.subscribe()
    }

    /// Moves between `Ok` and `DiskFull`; never out of `Poisoned`.
    pub fn set(&self, health: Health) {
        self.tx.send_if_modified(|now| {
            if *now == Health::Poisoned || *now == health {
                return false;
            }
            *now = health;
            true
        });
        self.metrics.health.set(self.get().code());
    }

    pub fn poison(&self, reason: String) {
        let mut first = self.poison_reason.lock();
        if first.is_none() {
            tracing::error!(%reason, "store poisoned: refusing all writes; restart to recover from disk");
            *first = Some(reason);
        }
        drop(first);
        self.tx.send_replace(Health::Poisoned);
        self.metrics.health.set(Health::Poisoned.code());
    }

    pub fn poison_reason(&self) -> Option<String> {
        self.poison_reason.lock().clone()
    }
}
