//! Proof-of-work challenges and wait tickets: minted and checked without per-challenge state.
//!
//! A token is the hex of
//! `version(1) kind(1) difficulty(1) issued_at(8) not_before(8) expires_at(8) nonce(16) mac(16)`
//! (times in unix seconds, big-endian), where `mac` is the first 16 bytes of HMAC-SHA256 under the
//! node's challenge key over a domain tag, every field before it, the client's binding (its IPv4
//! address, or the /64 of its IPv6 address) and the sku. A token therefore only works for the
//! address (or /64) and sku it was minted for, within its time window, on the node that holds the
//! key. Single use is the caller's job ([`super::seen_set::SeenSet`], keyed by the nonce).
//!
//! * A **challenge** (`kind` 1) is solved by a decimal counter `n` such that
//!   `SHA-256(token || ":" || n)` starts with `difficulty` zero bits ([`ALGORITHM`]).
//! * A **wait ticket** (`kind` 2) needs no solution; it is usable from `not_before` on. It is the
//!   fallback of buyers without JavaScript.

use std::net::IpAddr;

use edgecard_protocol::Sku;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::limiter::limit_key;

type HmacSha256 = Hmac<Sha256>;

/// The algorithm name in the API's challenge object.
pub const ALGORITHM: &str = "sha256-leading-zero-bits";
/// The hardest challenge a node may ask for (the solver's expected work is `2^difficulty`).
pub const MAX_DIFFICULTY: u8 = 32;

const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"edgecard-challenge-v1\0";
const NONCE_BYTES: usize = 16;
const MAC_BYTES: usize = 16;
const TOKEN_BYTES: usize = 3 + 8 * 3 + NONCE_BYTES + MAC_BYTES;
/// The longest counter accepted (`u64::MAX` has 20 digits).
const MAX_SOLUTION_DIGITS: usize = 20;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Solve the proof of work, then order.
    Challenge = 1,
    /// Wait until `not_before`, then order.
    WaitTicket = 2,
}

/// A token's fields, as minted or as verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub difficulty: u8,
    pub issued_at: u64,
    pub not_before: u64,
    pub expires_at: u64,
    /// Random; the single-use key.
    pub nonce: [u8; NONCE_BYTES],
    /// The hex string given to the client.
    pub text: String,
}

/// Why a presented token or solution was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the challenge token is malformed")]
    Malformed,
    /// A bad MAC: forged, altered, or minted for another address, sku or node.
    #[error("the challenge token is not valid for this address and sku")]
    Forged,
    #[error("the challenge has expired")]
    Expired,
    #[error("the wait ticket is not usable yet")]
    TooEarly,
    #[error("the solution does not solve the challenge")]
    WrongSolution,
    #[error("the challenge was already used")]
    Replayed,
}

impl Refusal {
    /// A stable label for metrics and API messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed | Refusal::Forged | Refusal::WrongSolution => "failed",
            Refusal::Expired => "expired",
            Refusal::TooEarly => "too_early",
            Refusal::Replayed => "replayed",
        }
    }
}

/// Mints and checks tokens under one node's key. Cheap to clone.
#[derive(Clone)]
pub struct Challenger {
    keyed: HmacSha256,
}

impl std::fmt::Debug for Challenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenger").finish_non_exhaustive()
    }
}

/// The address a token is bound to: an IPv4 address, or the /64 of an IPv6 address (a buyer's
/// privacy address changes within its /64 between page loads).
pub fn binding(client: IpAddr) -> String {
    limit_key(client).to_string()
}

impl Challenger {
    pub fn new(key: &[u8]) -> Result<Self, String> {
        let keyed = HmacSha256::new_from_slice(key).map_err(|_| "unusable challenge key".to_string())?;
        Ok(Challenger { keyed })
    }

    /// A challenge of `difficulty` bits for `client` and `sku`, valid `ttl_secs` from `now`.
    pub fn challenge(&self, client: IpAddr, sku: &Sku, difficulty: u8, now: u64, ttl_secs: u64) -> Token {
        let difficulty = difficulty.min(MAX_DIFFICULTY);
        self.mint(Kind::Challenge, difficulty, client, sku, now, now, now.saturating_add(ttl_secs), random_nonce())
    }

    /// A wait ticket for `client` and `sku`, usable from `not_before` for `ttl_secs`.
    pub fn wait_ticket(&self, client: IpAddr, sku: &Sku, now: u64, not_before: u64, ttl_secs: u64) -> Token {
        let not_before = not_before.max(now);
        self.mint(
            Kind::WaitTicket,
            0,
            client,
            sku,
            now,
            not_before,
            not_before.saturating_add(ttl_secs),
            random_nonce(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn mint(
        &self,
        kind: Kind,
        difficulty: u8,
        client: IpAddr,
        sku: &Sku,
        issued_at: u64,
        not_before: u64,
        expires_at: u64,
        nonce: [u8; NONCE_BYTES],
    ) -> Token {
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.extend_from_slice(&[VERSION, kind as u8, difficulty]);
        bytes.extend_from_slice(&issued_at.to_be_bytes());
        bytes.extend_from_slice(&not_before.to_be_bytes());
        bytes.extend_from_slice(&expires_at.to_be_bytes());
        bytes.extend_from_slice(&nonce);
        let mac = self.mac(&bytes, client, sku);
        bytes.extend_from_slice(&mac);
        Token { kind, difficulty, issued_at, not_before, expires_at, nonce, text: hex::encode(bytes) }
    }

    fn mac(&self, fields: &[u8], client: IpAddr, sku: &Sku) -> [u8; MAC_BYTES] {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(fields);
        mac.update(binding(client).as_bytes());
        mac.update(b"\0");
        mac.update(sku.as_str().as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// Checks `text` was minted by this node for `client` and `sku`, and is within its window at
    /// `now`. Says nothing about its solution or whether it was used before.
    pub fn open(&self, text: &str, client: IpAddr, sku: &Sku, now: u64) -> Result<Token, Refusal> {
        let token = self.decode(text, client, sku)?;
        if now > token.expires_at {
            return Err(Refusal::Expired);
        }
        if now < token.not_before {
            return Err(Refusal::TooEarly);
        }
        Ok(token)
    }

    /// Checks `text` was minted by this node for `client` and `sku`, whatever the time.
    pub fn decode(&self, text: &str, client: IpAddr, sku: &Sku) -> Result<Token, Refusal> {
        let text = text.trim();
        if text.len() != TOKEN_BYTES * 2 {
            return Err(Refusal::Malformed);
        }
        let bytes = hex::decode(text).map_err(|_| Refusal::Malformed)?;
        let (fields, mac) = bytes.split_at(TOKEN_BYTES - MAC_BYTES);
        if fields[0] != VERSION {
            return Err(Refusal::Malformed);
        }
        if !crate::payments::ct_eq(mac, &self.mac(fields, client, sku)) {
            return Err(Refusal::Forged);
        }
        let kind = match fields[1] {
            1 => Kind::Challenge,
            2 => Kind::WaitTicket,
            _ => return Err(Refusal::Malformed),
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&fields[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&fields[27..27 + NONCE_BYTES]);
        let token = Token {
            kind,
            difficulty: fields[2],
            issued_at: u64_at(3),
            not_before: u64_at(11),
            expires_at: u64_at(19),
            nonce,
            text: text.to_ascii_lowercase(),
        };
        Ok(token)
    }
}

/// Whether `solution` (a decimal counter) solves `token`.
pub fn is_solution(token: &Token, solution: &str) -> bool {
    let solution = solution.trim();
    if solution.is_empty() || solution.len() > MAX_SOLUTION_DIGITS || !solution.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Ok(counter) = solution.parse::<u64>() else { return false };
    leading_zero_bits(&proof_hash(&token.text, counter)) >= u32::from(token.difficulty)
}

/// `SHA-256(token || ":" || counter)`.
pub fn proof_hash(token_text: &str, counter: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(token_text.as_bytes());
    hasher.update(b":");
    hasher.update(counter.to_string().as_bytes());
    hasher.finalize().into()
}

pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// The difficulty a token's text asks for, read without the key (what a client needs to solve
/// it). `None` if it is not a well-formed challenge token.
pub fn difficulty_of(token_text: &str) -> Option<u8> {
    let text = token_text.trim();
    if text.len() != TOKEN_BYTES * 2 {
        return None;
    }
    let bytes = hex::decode(text).ok()?;
    (bytes[0] == VERSION && bytes[1] == Kind::Challenge as u8).then_some(bytes[2])
}

/// Solves a challenge by counting from 0, trying at most `max_tries` counters. The client side
/// (`edgecard challenge solve`, `edgecard bench`); the browser does the same in a Web Worker.
pub fn solve(token_text: &str, max_tries: u64) -> Option<u64> {
    let text = token_text.trim().to_ascii_lowercase();
    let difficulty = u32::from(difficulty_of(&text)?);
    (0..max_tries).find(|counter| leading_zero_bits(&proof_hash(&text, *counter)) >= difficulty)
}

fn random_nonce() -> [u8; NONCE_BYTES] {
    use rand::RngCore;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    fn challenger() -> Challenger {
        Challenger::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn a_solved_challenge_opens_for_its_address_and_sku_only() {
        let c = challenger();
        let t = c.challenge(ip("198.51.100.7"), &sku("game-10"), 8, 1_000, 120);
        assert_eq!(t.text.len(), TOKEN_BYTES * 2);
        assert_eq!(difficulty_of(&t.text), Some(8));
        let opened = c.open(&t.text, ip("198.51.100.7"), &sku("game-10"), 1_050).unwrap();
        assert_eq!(opened, t);
        let n = solve(&t.text, 1 << 20).unwrap();
        assert!(is_solution(&opened, &n.to_string()));
        assert!(leading_zero_bits(&proof_hash(&t.text, n)) >= 8);
        // Another address, another sku, another node's key: a forgery.
        assert_eq!(c.open(&t.text, ip("198.51.100.8"), &sku("game-10"), 1_050), Err(Refusal::Forged));
        assert_eq!(c.open(&t.text, ip("198.51.100.7"), &sku("game-20"), 1_050), Err(Refusal::Forged));
        let other = Challenger::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(&t.text, ip("198.51.100.7"), &sku("game-10"), 1_050), Err(Refusal::Forged));
    }

    #[test]
    fn ipv6_binds_to_the_64() {
        let c = challenger();
        let t = c.challenge(ip("2001:db8:1:2::10"), &sku("game-10"), 4, 1_000, 120);
        assert!(c.open(&t.text, ip("2001:db8:1:2:ffff::1"), &sku("game-10"), 1_000).is_ok());
        assert_eq!(c.open(&t.text, ip("2001:db8:1:3::10"), &sku("game-10"), 1_000), Err(Refusal::Forged));
    }

    #[test]
    fn altered_tokens_are_forged_and_garbage_is_malformed() {
        let c = challenger();
        let t = c.challenge(ip("198.51.100.7"), &sku("game-10"), 20, 1_000, 120);
        // Lowering the difficulty (byte 2) or extending the expiry breaks the MAC.
        for at in [5, 40, 60] {
            let mut bytes = hex::decode(&t.text).unwrap();
            bytes[at / 2] ^= 1;
            let forged = hex::encode(bytes);
            assert_eq!(c.open(&forged, ip("198.51.100.7"), &sku("game-10"), 1_000), Err(Refusal::Forged), "byte {at}");
        }
        for bad in ["", "zz", &t.text[..10], &format!("{}00", t.text), &t.text.replace(|_: char| true, "g")] {
            assert_eq!(c.open(bad, ip("198.51.100.7"), &sku("game-10"), 1_000), Err(Refusal::Malformed));
        }
        let mut bytes = hex::decode(&t.text).unwrap();
        bytes[0] = 9;
        assert_eq!(c.open(&hex::encode(bytes), ip("198.51.100.7"), &sku("game-10"), 1_000), Err(Refusal::Malformed));
    }

    #[test]
    fn windows_are_enforced() {
        let c = challenger();
        let t = c.challenge(ip("198.51.100.7"), &sku("game-10"), 4, 1_000, 120);
        assert!(c.open(&t.text, ip("198.51.100.7"), &sku("game-10"), 1_120).is_ok());
        assert_eq!(c.open(&t.text, ip("198.51.100.7"), &sku("game-10"), 1_121), Err(Refusal::Expired));
        let w = c.wait_ticket(ip("198.51.100.7"), &sku("game-10"), 1_000, 1_020, 300);
        assert_eq!(w.kind, Kind::WaitTicket);
        assert_eq!(difficulty_of(&w.text), None, "a ticket is not a challenge");
        assert_eq!(c.open(&w.text, ip("198.51.100.7"), &sku("game-10"), 1_019), Err(Refusal::TooEarly));
        assert!(c.open(&w.text, ip("198.51.100.7"), &sku("game-10"), 1_020).is_ok());
        assert_eq!(c.open(&w.text, ip("198.51.100.7"), &sku("game-10"), 1_321), Err(Refusal::Expired));
    }

    #[test]
    fn wrong_solutions_are_refused() {
        let c = challenger();
        let t = c.challenge(ip("198.51.100.7"), &sku("game-10"), 12, 1_000, 120);
        let n = solve(&t.text, 1 << 24).unwrap();
        assert!(is_solution(&t, &n.to_string()));
        assert!(is_solution(&t, &format!(" {n} ")));
        for bad in ["", "-1", "1e3", "0x10", "99999999999999999999999", "abc"] {
            assert!(!is_solution(&t, bad), "{bad:?}");
        }
        // Counters below the first solution do not solve it.
        assert!((0..n).all(|k| !is_solution(&t, &k.to_string())));
    }

    #[test]
    fn leading_zero_bits_counts_across_bytes() {
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0x01]), 7);
        assert_eq!(leading_zero_bits(&[0x00, 0x00, 0x10]), 19);
        assert_eq!(leading_zero_bits(&[0; 4]), 32);
    }
}
