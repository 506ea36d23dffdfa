//! The correctness audit at the end of a run: what the buyers saw against the coordinator's
//! ledger. [`audit`] is a pure function of the two; [`wait_and_audit`] fetches the ledger
//! until it has caught up with what the buyers saw (bounded), then audits.
//!
//! The checks:
//! - no key delivered twice: no secret seen by buyers in two orders, and no (sku, key id) in two
//!   delivered orders of the ledger;
//! - every paid order delivered: each order whose payment the node accepted (pay answered 200) is
//!   delivered in the ledger, and the buyer saw its keys;
//! - counts match: orders the buyers saw delivered are delivered in the ledger, with as many keys
//!   as the buyer received.
//!
//! Secrets never appear in the report: duplicates are named by order ids (buyer side) or key
//! ids (ledger side).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::admin_client::AdminClient;

/// One order as a simulated buyer saw it.
#[derive(Clone, Debug, Default)]
pub struct SeenOrder {
    pub order_id: String,
    /// The pay link answered 200: the node accepted the payment.
    pub paid: bool,
    /// The keys the buyer fetched (empty: none were shown).
    pub keys: Vec<String>,
    /// The order's token, to look it up again (kept in memory only).
    pub token: String,
    /// Which node (index into the bench's endpoints) sold it.
    pub node: usize,
    /// The pay or key-fetch answer was lost (connection cut, node killed): what happened is
    /// unknown until the order is looked up again.
    pub unsettled: bool,
}

/// One order as the coordinator's ledger lists it (`GET /v1/orders`); unknown fields ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LedgerOrder {
    pub order_id: String,
    #[serde(default)]
    pub node: String,
    pub sku: String,
    pub status: String,
    #[serde(default)]
    pub key_ids: Vec<u64>,
}

/// A key the ledger lists in more than one delivered order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LedgerDuplicate {
    pub sku: String,
    pub key_id: u64,
    pub orders: Vec<String>,
}

/// Outcome of the audit. `passed` is true only when every list of problems is empty.
#[derive(Clone, Debug, Serialize, PartialEq, Default)]
pub struct AuditReport {
    /// Orders the buyers created and saw an id for.
    pub orders_seen: u64,
    pub paid_seen: u64,
    pub delivered_seen: u64,
    /// Of the orders seen, how many the ledger knows, and how many it lists as delivered.
    pub ledger_known: u64,
    pub ledger_delivered: u64,
    /// Delivered orders in the fetched ledger (all of them, not only this run's).
    pub ledger_delivered_total: u64,
    /// Order-id pairs whose buyers were shown the same secret.
    pub keys_seen_twice: Vec<(String, String)>,
    /// Keys the ledger lists in two delivered orders.
    pub ledger_keys_twice: Vec<LedgerDuplicate>,
    /// Paid (pay answered 200), but not delivered in the ledger, or the buyer saw no keys.
    pub paid_not_delivered: Vec<String>,
    /// Seen delivered by the buyer, but unknown to the ledger or not delivered there.
    pub delivered_missing_in_ledger: Vec<String>,
    /// Delivered on both sides, with a different number of keys.
    pub key_count_mismatch: Vec<String>,
    pub passed: bool,
    /// Time the ledger took to catch up after the run ended, when fetched by [`wait_and_audit`].
    pub waited_secs: f64,
    /// Whether the ledger caught up within the bound.
    pub caught_up: bool,
    /// Ledger alarms raised during the run (refused events: key_delivered_twice and the like).
    pub new_alarms: u64,
}

/// Most problems listed per kind; the counts stay exact in the lists' lengths up to this.
const MAX_LISTED: usize = 50;

fn push_capped<T>(list: &mut Vec<T>, item: T) {
    if list.len() < MAX_LISTED {
        list.push(item);
    }
}

/// Audits what buyers saw against the ledger. Pure: no I/O, no clock.
pub fn audit(seen: &[SeenOrder], ledger: &[LedgerOrder]) -> AuditReport {
    let mut report = AuditReport { orders_seen: seen.len() as u64, ..AuditReport::default() };

    // Buyer side: a secret shown in two orders.
    let mut first_order_of_secret: HashMap<&str, &str> = HashMap::new();
    for order in seen {
        if order.paid {
            report.paid_seen += 1;
        }
        if !order.keys.is_empty() {
            report.delivered_seen += 1;
        }
        for key in &order.keys {
            match first_order_of_secret.get(key.as_str()) {
                Some(first) if *first != order.order_id => {
                    push_capped(&mut report.keys_seen_twice, (first.to_string(), order.order_id.clone()))
                }
                Some(_) => {}
                None => {
                    first_order_of_secret.insert(key, &order.order_id);
                }
            }
        }
    }

    // Ledger side: a key in two delivered orders.
    let mut orders_of_key: BTreeMap<(&str, u64), Vec<&str>> = BTreeMap::new();
    for order in ledger.iter().filter(|o| o.status == "delivered") {
        report.ledger_delivered_total += 1;
        for key_id in &order.key_ids {
            orders_of_key.entry((order.sku.as_str(), *key_id)).or_default().push(&order.order_id);
        }
    }
    for ((sku, key_id), orders) in &orders_of_key {
        if orders.len() > 1 {
            let duplicate = LedgerDuplicate {
                sku: sku.to_string(),
                key_id: *key_id,
                orders: orders.iter().map(|o| o.to_string()).collect(),
            };
            push_capped(&mut report.ledger_keys_twice, duplicate);
        }
    }

    // Each order the buyers saw against its ledger entry.
    let by_id: HashMap<&str, &LedgerOrder> = ledger.iter().map(|o| (o.order_id.as_str(), o)).collect();
    for order in seen {
        let entry = by_id.get(order.order_id.as_str());
        let delivered_in_ledger = entry.is_some_and(|e| e.status == "delivered");
        if entry.is_some() {
            report.ledger_known += 1;
        }
        if delivered_in_ledger {
            report.ledger_delivered += 1;
        }
        if order.paid && (!delivered_in_ledger || order.keys.is_empty()) {
            push_capped(&mut report.paid_not_delivered, order.order_id.clone());
        }
        if !order.keys.is_empty() {
            match entry {
                Some(e) if e.status == "delivered" => {
                    if e.key_ids.len() != order.keys.len() {
                        push_capped(&mut report.key_count_mismatch, order.order_id.clone());
                    }
                }
                _ => push_capped(&mut report.delivered_missing_in_ledger, order.order_id.clone()),
            }
        }
    }
    report.passed = report.keys_seen_twice.is_empty()
        && report.ledger_keys_twice.is_empty()
        && report.paid_not_delivered.is_empty()
        && report.delivered_missing_in_ledger.is_empty()
        && report.key_count_mismatch.is_empty();
    report
}

/// Whether the ledger has caught up: every order the buyers saw delivered is delivered there.
fn caught_up(seen: &[SeenOrder], ledger: &[LedgerOrder]) -> bool {
    let delivered: std::collections::HashSet<&str> =
        ledger.iter().filter(|o| o.status == "delivered").map(|o| o.order_id.as_str()).collect();
    seen.iter().filter(|o| !o.keys.is_empty() || o.paid).all(|o| delivered.contains(o.order_id.as_str()))
}

#[derive(Deserialize)]
struct LedgerAlarm {
    at: u64,
}

/// Fetches the ledger's orders created since `since_ms` until it has caught up with `seen`, or
/// `timeout` has passed, then audits. The ledger fills as nodes sync, so its lag after the run is
/// part of the result (`waited_secs`).
pub async fn wait_and_audit(
    client: &AdminClient,
    seen: &[SeenOrder],
    since_ms: u64,
    timeout: Duration,
) -> Result<AuditReport> {
    let started = Instant::now();
    let deadline = started + timeout;
    let path = format!("/v1/orders?since={since_ms}");
    let mut pause = Duration::from_millis(100);
    let (ledger, caught) = loop {
        let raw = client.get(&path).await.context("fetching the coordinator's ledger")?;
        let ledger: Vec<LedgerOrder> =
            serde_json::from_value(raw).context("the coordinator's /v1/orders is not a list of orders")?;
        let caught = caught_up(seen, &ledger);
        if caught || Instant::now() + pause > deadline {
            break (ledger, caught);
        }
        tokio::time::sleep(pause).await;
        // Listing a large ledger costs the coordinator; back off to once a second.
        pause = (pause * 2).min(Duration::from_secs(1));
    };
    let mut report = audit(seen, &ledger);
    report.waited_secs = started.elapsed().as_secs_f64();
    report.caught_up = caught;
    let alarms: Vec<LedgerAlarm> = serde_json::from_value(client.get("/v1/alarms").await?)
        .context("the coordinator's /v1/alarms is not a list of alarms")?;
    report.new_alarms = alarms.iter().filter(|a| a.at >= since_ms).count() as u64;
    if report.new_alarms > 0 {
        report.passed = false;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, paid: bool, keys: &[&str]) -> SeenOrder {
        SeenOrder {
            order_id: id.into(),
            paid,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            ..SeenOrder::default()
        }
    }

    fn ledger(id: &str, status: &str, key_ids: &[u64]) -> LedgerOrder {
        LedgerOrder {
            order_id: id.into(),
            node: "eu-1".into(),
            sku: "game-10".into(),
            status: status.into(),
            key_ids: key_ids.to_vec(),
        }
    }

    #[test]
    fn a_clean_run_passes_with_matching_counts() {
        let buyers = [seen("a", true, &["K1"]), seen("b", true, &["K2", "K3"]), seen("c", false, &[])];
        let book = [ledger("a", "delivered", &[1]), ledger("b", "delivered", &[2, 3]), ledger("c", "reserved", &[4])];
        let report = audit(&buyers, &book);
        assert!(report.passed, "{report:?}");
        assert_eq!((report.orders_seen, report.paid_seen, report.delivered_seen), (3, 2, 2));
        assert_eq!((report.ledger_known, report.ledger_delivered, report.ledger_delivered_total), (3, 2, 2));
        assert!(caught_up(&buyers, &book));
    }

    #[test]
    fn a_secret_shown_to_two_buyers_fails() {
        let buyers = [seen("a", true, &["SAME"]), seen("b", true, &["SAME"])];
        let book = [ledger("a", "delivered", &[1]), ledger("b", "delivered", &[2])];
        let report = audit(&buyers, &book);
        assert!(!report.passed);
        assert_eq!(report.keys_seen_twice, vec![("a".to_string(), "b".to_string())]);
        // The report names orders, never the secret.
        assert!(!format!("{report:?}").contains("SAME"));
    }

    #[test]
    fn a_key_in_two_delivered_ledger_orders_fails() {
        let buyers = [seen("a", true, &["K1"]), seen("b", true, &["K2"])];
        let book = [ledger("a", "delivered", &[7]), ledger("b", "delivered", &[7]), ledger("x", "expired", &[7])];
        let report = audit(&buyers, &book);
        assert!(!report.passed);
        assert_eq!(
            report.ledger_keys_twice,
            vec![LedgerDuplicate { sku: "game-10".into(), key_id: 7, orders: vec!["a".into(), "b".into()] }]
        );
        // The same key id in another sku is a different key.
        let mut other_sku = ledger("b", "delivered", &[7]);
        other_sku.sku = "gift-25".into();
        let report = audit(&buyers, &[ledger("a", "delivered", &[7]), other_sku]);
        assert!(report.passed, "{report:?}");
    }

    #[test]
    fn a_paid_order_the_ledger_has_not_delivered_fails() {
        let buyers = [seen("a", true, &["K1"]), seen("b", true, &[])];
        let book = [ledger("a", "paid", &[1]), ledger("b", "delivered", &[2])];
        let report = audit(&buyers, &book);
        assert!(!report.passed);
        // a: paid, ledger not delivered; b: paid, buyer saw no keys.
        assert_eq!(report.paid_not_delivered, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(report.delivered_missing_in_ledger, vec!["a".to_string()]);
        assert!(!caught_up(&buyers, &book));
    }

    #[test]
    fn an_order_missing_from_the_ledger_or_with_other_key_counts_fails() {
        let buyers = [seen("a", false, &["K1"]), seen("b", true, &["K2", "K3"])];
        let report = audit(&buyers, &[ledger("b", "delivered", &[2])]);
        assert!(!report.passed);
        assert_eq!(report.delivered_missing_in_ledger, vec!["a".to_string()]);
        assert_eq!(report.key_count_mismatch, vec!["b".to_string()]);
        assert_eq!(report.ledger_known, 1);
    }

    #[test]
    fn an_empty_run_passes() {
        let report = audit(&[], &[ledger("old", "delivered", &[1])]);
        assert!(report.passed);
        assert_eq!(report.ledger_delivered_total, 1);
    }

    #[test]
    fn ledger_orders_decode_from_the_admin_api_shape() {
        let raw = serde_json::json!([{
            "order_id": "00112233445566778899aabbccddeeff", "node": "eu-1", "sku": "game-10", "quantity": 1,
            "amount_minor": 1000, "currency": "USD", "status": "delivered", "created_at": 1, "updated_at": 2,
            "key_ids": [5], "channel": "sandbox", "provider_txn": "sbx_x"
        }]);
        let orders: Vec<LedgerOrder> = serde_json::from_value(raw).unwrap_or_default();
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].key_ids, vec![5]);
        assert_eq!(orders[0].status, "delivered");
    }
}
