//! The simulation's constants and the per-seed parameters.
//!
//! Clock bound: a node's wall clock is within `MAX_SKEW_MS` of true time, which is the
//! coordinator's clock. The coordinator reclaims with exactly that margin
//! (`lease::reclaimable(deadline, now, MAX_SKEW_MS)`), and nodes keep a safety margin of their
//! own (`0..=MAX_SAFETY_MARGIN_MS`, zero included) on top. The monotonic clock every lease is
//! measured on runs at true rate and restarts from zero with each boot.

use edgecard_protocol::SyncTiming;

use crate::rng::Rng;

/// True time at the start of every run (Unix ms), far from zero so negative skews stay valid.
pub const EPOCH_MS: u64 = 1_700_000_000_000;
pub const LEASE_MS: u64 = 4_000;
pub const MAX_SKEW_MS: u64 = 300;
pub const MAX_SAFETY_MARGIN_MS: u64 = 100;
pub const RESERVATION_TTL_MS: u64 = 1_500;
/// A node resets an upload stream that has had no ack for this long.
pub const UPLOAD_TIMEOUT_MS: u64 = 800;
pub const MAX_QUANTITY: u64 = 3;
/// True time one step advances, at most.
pub const MAX_TICK_MS: u64 = 40;
/// How long, after healing everything, the system may take to settle.
pub const QUIESCE_LIMIT_MS: u64 = 60_000;
/// Key ids of sku `i` are `i * KEY_BLOCK + 1 ..`, so a key id alone names its sku.
pub const KEY_BLOCK: u64 = 1_000_000;

pub fn sync_timing() -> SyncTiming {
    SyncTiming { idle_poll_ms: 250, backoff_min_ms: 100, backoff_max_ms: 1_600, max_batch_events: 6 }
}

/// A rule changed from the one this simulation holds correct: broken on purpose, to show the
/// checker catches what it claims to, or as written elsewhere where the simulation showed that
/// wording broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    None,
    /// The coordinator reclaims a dark node's keys without the take-window quarantine.
    ReclaimWithoutWindow,
    /// Nodes install every slice with an unbounded take window.
    NodeIgnoresWindow,
    /// A restarted node forgets the takes its outbox shows unacknowledged.
    NodeForgetsTakesOnRestart,
    /// The coordinator reclaims right at the deadline, without the clock-skew margin.
    ReclaimWithoutSkewMargin,
    /// A reclaimed slice's reconcile close is queued when its node next uploads, behind grants queued meanwhile, which may hold keys that the close would have
    /// released first (the node refuses such a grant, and no one hears of it).
    ReconcileOnNextUpload,
    /// A node that refuses a coordinator grant whose lease has passed, silently (the node now
    /// installs such a grant, selling nothing).
    NodeRefusesExpiredGrants,
}

impl Mutation {
    pub const ALL: [Mutation; 7] = [
        Mutation::None,
        Mutation::ReclaimWithoutWindow,
        Mutation::NodeIgnoresWindow,
        Mutation::NodeForgetsTakesOnRestart,
        Mutation::ReclaimWithoutSkewMargin,
        Mutation::ReconcileOnNextUpload,
        Mutation::NodeRefusesExpiredGrants,
    ];

    /// The variant named `name` as spelled in this enum.
    pub fn named(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| format!("{m:?}") == name)
    }
}

/// What varies between seeds besides the random actions.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub skus: usize,
    pub keys_per_sku: u64,
    pub max_take_window: u64,
    pub loss: f64,
    pub duplicate: f64,
    /// Share of messages held up long enough to overtake one another and time out.
    pub slow: f64,
}

impl Params {
    pub fn draw(rng: &mut Rng) -> Self {
        Params {
            nodes: rng.range(2, 4) as usize,
            skus: rng.range(1, 2) as usize,
            keys_per_sku: rng.range(12, 40),
            max_take_window: rng.range(1, 4),
            loss: [0.0, 0.02, 0.1][rng.below(3)],
            duplicate: [0.0, 0.03, 0.1][rng.below(3)],
            slow: [0.0, 0.05, 0.2][rng.below(3)],
        }
    }
}
