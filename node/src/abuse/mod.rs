//! Proof-of-work challenges on order creation for clients that look like bots, and for skus in
//! flash-sale mode (docs/abuse.md).
//!
//! * [`challenge`] (pure): HMAC-signed challenges and wait tickets, bound to address, sku and
//!   time; the proof-of-work check and solver.
//! * [`suspicion`] (pure): per-address and per-/64 sliding counters, and the difficulty they ask.
//! * [`seen_set`] (pure): the bounded single-use set.
//! * [`Abuse`]: the three together, with the node's key and metrics; the API and the storefront
//!   ask it at every order attempt (after the per-IP rate limiter).

pub mod challenge;
pub mod config;
pub mod http;
pub mod seen_set;
pub mod suspicion;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use edgecard_protocol::Sku;
use parking_lot::Mutex;

use self::challenge::{Challenger, Kind, Refusal, Token};
pub use self::config::AbuseConfig;
use self::seen_set::SeenSet;
use self::suspicion::Suspicion;
use crate::limiter::LimitKey;
use crate::metrics::ChallengeMetrics;

/// The challenge key's file in the data dir (32 random bytes, 0600, made at first start).
pub const CHALLENGE_KEY_FILE: &str = "challenge.key";
const KEY_BYTES: usize = 32;

/// Metric label values.
const CHALLENGE: &str = "challenge";
const WAIT_TICKET: &str = "wait_ticket";

/// What the client sent along with its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    Nothing,
    /// A challenge token and its solution (a decimal counter).
    Solution {
        token: &'a str,
        solution: &'a str,
    },
    /// A wait ticket.
    Ticket {
        token: &'a str,
    },
}

/// The verdict on an order attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Solve this first. `refused` says why what was presented did not do.
    Challenge {
        challenge: Token,
        refused: Option<Refusal>,
    },
}

pub struct Abuse {
    config: AbuseConfig,
    flash_sale: HashSet<String>,
    challenger: Challenger,
    suspicion: Mutex<Suspicion>,
    seen: Mutex<SeenSet>,
    metrics: Arc<ChallengeMetrics>,
}

impl std::fmt::Debug for Abuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Abuse").field("enabled", &self.config.enabled).finish_non_exhaustive()
    }
}

impl Abuse {
    pub fn new(config: AbuseConfig, key: &[u8], metrics: Arc<ChallengeMetrics>) -> Result<Self, String> {
        Ok(Abuse {
            flash_sale: config.flash_sale_skus.iter().cloned().collect(),
            challenger: Challenger::new(key)?,
            suspicion: Mutex::new(Suspicion::new(&config)),
            seen: Mutex::new(SeenSet::new(config.seen_capacity)),
            config,
            metrics,
        })
    }

    /// With the node's key from `data_dir`, made on first start.
    pub fn load_or_create(
        config: AbuseConfig,
        data_dir: &Path,
        metrics: Arc<ChallengeMetrics>,
    ) -> Result<Self, String> {
        let path = data_dir.join(CHALLENGE_KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(key) if key.len() == KEY_BYTES => key,
            Ok(_) => return Err(format!("{}: not a challenge key ({KEY_BYTES} bytes); remove it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::payments::return_link::create_key(&path, "challenge")?
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Abuse::new(config, &key, metrics)
    }

    pub fn config(&self) -> &AbuseConfig {
        &self.config
    }

    pub fn metrics(&self) -> &ChallengeMetrics {
        &self.metrics
    }

    pub fn is_flash_sale(&self, sku: &Sku) -> bool {
        self.flash_sale.contains(sku.as_str())
    }

    /// Judges an order attempt by `client` for `sku` at `now_ms` (unix milliseconds): counts it,
    /// and lets it through if the client is not suspicious, or presented a valid, unused, solved
    /// challenge or due wait ticket for this address and sku. Otherwise a fresh challenge.
    pub fn gate(&self, client: IpAddr, sku: &Sku, presented: Presented<'_>, now_ms: u64) -> Gate {
        if !self.config.enabled {
            return Gate::Pass;
        }
        let required = self.suspicion.lock().order_attempt(client, self.is_flash_sale(sku), now_ms);
        let now = now_ms / 1000;
        let refused = match presented {
            Presented::Nothing => None,
            Presented::Solution { token, solution } => match self.redeem(client, sku, token, Some(solution), now) {
                Ok(()) => return Gate::Pass,
                Err(refusal) => Some(refusal),
            },
            Presented::Ticket { token } => match self.redeem(client, sku, token, None, now) {
                Ok(()) => return Gate::Pass,
                // A ticket presented early stays valid: the page says how long to wait.
                Err(refusal) => Some(refusal),
            },
        };
        // A client that would not be challenged passes whatever it sent along.
        let Some(difficulty) = required else { return Gate::Pass };
        let challenge = self.challenger.challenge(client, sku, difficulty, now, self.config.challenge_ttl_secs);
        self.metrics.count(CHALLENGE, "issued");
        Gate::Challenge { challenge, refused }
    }

    /// Checks a presented token (and solution) and marks it used.
    fn redeem(&self, client: IpAddr, sku: &Sku, text: &str, solution: Option<&str>, now: u64) -> Result<(), Refusal> {
        let kind_label = if solution.is_some() { CHALLENGE } else { WAIT_TICKET };
        let result = self.check(client, sku, text, solution, now);
        let label = match result {
            Ok(()) => "solved",
            Err(refusal) => refusal.as_str(),
        };
        self.metrics.count(kind_label, label);
        result
    }

    fn check(&self, client: IpAddr, sku: &Sku, text: &str, solution: Option<&str>, now: u64) -> Result<(), Refusal> {
        let token = self.challenger.open(text, client, sku, now)?;
        match (token.kind, solution) {
            (Kind::Challenge, Some(solution)) if challenge::is_solution(&token, solution) => {}
            (Kind::WaitTicket, None) => {}
            _ => return Err(Refusal::WrongSolution),
        }
        if !self.seen.lock().first_use(token.nonce, token.expires_at, now) {
            return Err(Refusal::Replayed);
        }
        Ok(())
    }

    /// A wait ticket for a buyer without JavaScript facing a challenge of `difficulty`: usable
    /// after `wait_ticket_secs`, doubled for each bit above `min_difficulty` (capped at
    /// `max_wait_secs`), and after the client's previous ticket.
    pub fn wait_ticket(&self, client: IpAddr, sku: &Sku, difficulty: u8, now_ms: u64) -> Token {
        let delay = self.ticket_delay(difficulty);
        let due = self.suspicion.lock().ticket_due(client, delay, now_ms);
        let due = due.min(now_ms / 1000 + self.config.max_wait_secs);
        self.metrics.count(WAIT_TICKET, "issued");
        self.challenger.wait_ticket(client, sku, now_ms / 1000, due, self.config.challenge_ttl_secs)
    }

    fn ticket_delay(&self, difficulty: u8) -> u64 {
        let extra = u32::from(difficulty.saturating_sub(self.config.min_difficulty)).min(20);
        self.config.wait_ticket_secs.saturating_mul(1 << extra).min(self.config.max_wait_secs)
    }

    /// The genuine wait ticket `text` of `client` for `sku`, if it is not yet usable at `now_ms`:
    /// the token and the seconds left. (A page shows it again rather than queueing a new one.)
    pub fn pending_ticket(&self, client: IpAddr, sku: &Sku, text: &str, now_ms: u64) -> Option<(Token, u64)> {
        let token = self.challenger.decode(text, client, sku).ok()?;
        let now = now_ms / 1000;
        (token.kind == Kind::WaitTicket && now < token.not_before).then(|| {
            let left = token.not_before - now;
            (token, left)
        })
    }

    /// An unpaid reservation of the client under `key` expired.
    pub fn note_expired(&self, key: LimitKey, now_ms: u64) {
        self.suspicion.lock().expired(key, now_ms);
    }

    /// A payment for an order made from `client` failed.
    pub fn note_failed_payment(&self, client: IpAddr, now_ms: u64) {
        self.suspicion.lock().failed_payment(client, now_ms);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn abuse(config: AbuseConfig) -> Abuse {
        Abuse::new(config, &[3u8; 32], Arc::new(ChallengeMetrics::default())).unwrap()
    }

    fn flash(sku: &str) -> AbuseConfig {
        AbuseConfig {
            flash_sale_skus: vec![sku.into()],
            min_difficulty: 6,
            max_difficulty: 8,
            ..AbuseConfig::default()
        }
    }

    fn challenge_of(gate: Gate) -> (Token, Option<Refusal>) {
        match gate {
            Gate::Challenge { challenge, refused } => (challenge, refused),
            Gate::Pass => panic!("expected a challenge"),
        }
    }

    #[test]
    fn a_solved_challenge_passes_once() {
        let a = abuse(flash("game-10"));
        let sku = Sku::new("game-10").unwrap();
        let client = ip("198.51.100.1");
        let (token, refused) = challenge_of(a.gate(client, &sku, Presented::Nothing, 1_000_000));
        assert_eq!(refused, None);
        assert_eq!(token.difficulty, 6);
        let solution = challenge::solve(&token.text, 1 << 20).unwrap().to_string();
        let presented = Presented::Solution { token: &token.text, solution: &solution };
        assert_eq!(a.gate(client, &sku, presented, 1_001_000), Gate::Pass);
        let (_, refused) = challenge_of(a.gate(client, &sku, presented, 1_002_000));
        assert_eq!(refused, Some(Refusal::Replayed));
        // Another address cannot use it; a wrong counter is refused.
        let (_, refused) = challenge_of(a.gate(ip("198.51.100.2"), &sku, presented, 1_002_000));
        assert_eq!(refused, Some(Refusal::Forged));
        let (fresh, _) = challenge_of(a.gate(client, &sku, Presented::Nothing, 1_003_000));
        let wrong = (0..1u64 << 20).find(|n| !challenge::is_solution(&fresh, &n.to_string())).unwrap().to_string();
        let (_, refused) =
            challenge_of(a.gate(client, &sku, Presented::Solution { token: &fresh.text, solution: &wrong }, 1_003_000));
        assert_eq!(refused, Some(Refusal::WrongSolution));
        assert_eq!(a.metrics().get(CHALLENGE, "solved"), 1);
        assert_eq!(a.metrics().get(CHALLENGE, "replayed"), 1);
        assert_eq!(a.metrics().get(CHALLENGE, "failed"), 2);
        assert_eq!(a.metrics().get(CHALLENGE, "issued"), 5);
    }

    #[test]
    fn other_skus_and_a_disabled_section_pass() {
        let a = abuse(flash("game-10"));
        assert_eq!(a.gate(ip("198.51.100.1"), &Sku::new("game-20").unwrap(), Presented::Nothing, 0), Gate::Pass);
        let off = abuse(AbuseConfig { enabled: false, ..flash("game-10") });
        assert_eq!(off.gate(ip("198.51.100.1"), &Sku::new("game-10").unwrap(), Presented::Nothing, 0), Gate::Pass);
    }

    #[test]
    fn a_wait_ticket_works_once_after_its_delay() {
        let a = abuse(AbuseConfig { wait_ticket_secs: 10, ..flash("game-10") });
        let sku = Sku::new("game-10").unwrap();
        let client = ip("198.51.100.1");
        let ticket = a.wait_ticket(client, &sku, 6, 1_000_000);
        assert_eq!(ticket.not_before, 1_010);
        let presented = Presented::Ticket { token: &ticket.text };
        let (_, refused) = challenge_of(a.gate(client, &sku, presented, 1_005_000));
        assert_eq!(refused, Some(Refusal::TooEarly));
        assert_eq!(a.gate(client, &sku, presented, 1_010_000), Gate::Pass);
        let (_, refused) = challenge_of(a.gate(client, &sku, presented, 1_011_000));
        assert_eq!(refused, Some(Refusal::Replayed));
        // A ticket is no challenge solution, nor the reverse.
        let (_, refused) =
            challenge_of(a.gate(client, &sku, Presented::Solution { token: &ticket.text, solution: "0" }, 1_012_000));
        assert_eq!(refused, Some(Refusal::WrongSolution));
        // Harder challenges mean longer waits, capped.
        assert_eq!(a.ticket_delay(6), 10);
        assert_eq!(a.ticket_delay(8), 40);
        assert_eq!(a.ticket_delay(32), 600);
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(ChallengeMetrics::default());
        let a = Abuse::load_or_create(flash("game-10"), dir.path(), metrics.clone()).unwrap();
        let sku = Sku::new("game-10").unwrap();
        let (token, _) = challenge_of(a.gate(ip("198.51.100.1"), &sku, Presented::Nothing, 0));
        let again = Abuse::load_or_create(flash("game-10"), dir.path(), metrics.clone()).unwrap();
        assert!(again.challenger.open(&token.text, ip("198.51.100.1"), &sku, 0).is_ok(), "same key after restart");
        std::fs::write(dir.path().join(CHALLENGE_KEY_FILE), b"short").unwrap();
        assert!(Abuse::load_or_create(flash("game-10"), dir.path(), metrics).is_err());
    }
}
