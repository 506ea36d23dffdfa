//! `[abuse]` in `node.toml`: when order creation asks for a proof of work (docs/abuse.md).

use serde::{Deserialize, Serialize};

use super::challenge::MAX_DIFFICULTY;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbuseConfig {
    /// Challenges at all. Default true.
    pub enabled: bool,
    /// The sliding window the counters below are kept over, in seconds. Default 600.
    pub window_secs: u64,
    /// Order attempts per client address (IPv4 address, IPv6 address) within the window before
    /// its attempts are challenged. Default 20.
    pub orders_per_ip: u32,
    /// Order attempts per IPv6 /64 within the window before they are challenged. Default 60.
    pub orders_per_64: u32,
    /// Unpaid reservations of one address (IPv6: its /64) that expired within the window before
    /// its attempts are challenged. Default 5.
    pub expired_per_ip: u32,
    /// Failed payments of one address (or /64) within the window before it is challenged.
    /// Default 5.
    pub failed_payments_per_ip: u32,
    /// Difficulty (leading zero bits) of a challenge at the threshold. Default 16.
    pub min_difficulty: u8,
    /// The cap. Default 22.
    pub max_difficulty: u8,
    /// Bits added each time the suspicion (count over threshold) doubles. Default 2.
    pub bits_per_doubling: u8,
    /// Skus in flash-sale mode: every order attempt for them is challenged. Default none.
    pub flash_sale_skus: Vec<String>,
    /// How long a challenge may be solved and used, in seconds. Default 300.
    pub challenge_ttl_secs: u64,
    /// The no-JavaScript wait ticket's delay at `min_difficulty`, in seconds; it doubles with
    /// each bit above. Default 15.
    pub wait_ticket_secs: u64,
    /// The cap on a wait ticket's delay, in seconds. Default 600.
    pub max_wait_secs: u64,
    /// Client addresses and /64s tracked at once (memory bound). Default 100000.
    pub tracked_clients: usize,
    /// Used challenges and tickets remembered at once (memory bound). Default 100000.
    pub seen_capacity: usize,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            enabled: true,
            window_secs: 600,
            orders_per_ip: 20,
            orders_per_64: 60,
            expired_per_ip: 5,
            failed_payments_per_ip: 5,
            min_difficulty: 16,
            max_difficulty: 22,
            bits_per_doubling: 2,
            flash_sale_skus: Vec::new(),
            challenge_ttl_secs: 300,
            wait_ticket_secs: 15,
            max_wait_secs: 600,
            tracked_clients: 100_000,
            seen_capacity: 100_000,
        }
    }
}

impl AbuseConfig {
    /// Checks the section; the error names the field (without the `abuse.` prefix).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let at_least_one = |field: &'static str, value: u64| {
            if value == 0 {
                Err((field, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        at_least_one("window_secs", self.window_secs)?;
        at_least_one("orders_per_ip", self.orders_per_ip.into())?;
        at_least_one("orders_per_64", self.orders_per_64.into())?;
        at_least_one("expired_per_ip", self.expired_per_ip.into())?;
        at_least_one("failed_payments_per_ip", self.failed_payments_per_ip.into())?;
        at_least_one("challenge_ttl_secs", self.challenge_ttl_secs)?;
        at_least_one("tracked_clients", self.tracked_clients as u64)?;
        at_least_one("seen_capacity", self.seen_capacity as u64)?;
        if self.window_secs > 86_400 {
            return Err(("window_secs", "must be at most 86400".into()));
        }
        if self.min_difficulty == 0 || self.min_difficulty > MAX_DIFFICULTY {
            return Err(("min_difficulty", format!("must be between 1 and {MAX_DIFFICULTY}")));
        }
        if self.max_difficulty < self.min_difficulty || self.max_difficulty > MAX_DIFFICULTY {
            return Err(("max_difficulty", format!("must be between min_difficulty and {MAX_DIFFICULTY}")));
        }
        if self.max_wait_secs < self.wait_ticket_secs {
            return Err(("max_wait_secs", "must be at least wait_ticket_secs".into()));
        }
        for sku in &self.flash_sale_skus {
            if edgecard_protocol::Sku::new(sku.clone()).is_err() {
                return Err(("flash_sale_skus", format!("{sku:?} is not a valid sku")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        assert_eq!(AbuseConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut AbuseConfig)| {
            let mut c = AbuseConfig::default();
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert_eq!(bad(|c| c.window_secs = 0), "window_secs");
        assert_eq!(bad(|c| c.orders_per_64 = 0), "orders_per_64");
        assert_eq!(bad(|c| c.min_difficulty = 0), "min_difficulty");
        assert_eq!(bad(|c| c.min_difficulty = 33), "min_difficulty");
        assert_eq!(bad(|c| c.max_difficulty = 10), "max_difficulty");
        assert_eq!(bad(|c| c.max_wait_secs = 1), "max_wait_secs");
        assert_eq!(bad(|c| c.flash_sale_skus = vec!["no spaces".into()]), "flash_sale_skus");
        assert_eq!(bad(|c| c.seen_capacity = 0), "seen_capacity");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<AbuseConfig>("orders_per_ipp = 3").is_err());
        let c: AbuseConfig = toml::from_str("flash_sale_skus = [\"game-10\"]").unwrap();
        assert_eq!(c.flash_sale_skus, vec!["game-10".to_string()]);
        assert_eq!(c.orders_per_ip, 20);
    }
}
