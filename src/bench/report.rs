//! The KPI table: figures of a run, each against its threshold, as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::audit::AuditReport;
use super::histogram::StepReport;
use super::node_metrics::{StoreReport, SyncReport};

/// Thresholds a run is held to (defaults: the field's figures for a good shop).
#[derive(Clone, Debug, Serialize)]
pub struct Thresholds {
    pub min_tps: f64,
    pub max_avg_ms: f64,
    pub max_p99_ms: f64,
    /// Percent.
    pub max_error_rate: f64,
    /// Percent.
    pub min_payment_success: f64,
    pub max_store_commit_ms: f64,
}

/// The plain-HTTP ceiling measured in the same run (`--baseline`).
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub path: String,
    pub requests: u64,
    pub elapsed_secs: f64,
    pub requests_per_sec: f64,
    pub errors: BTreeMap<String, u64>,
    pub latency: StepReport,
}

/// Flash-sale outcome.
#[derive(Clone, Debug, Serialize)]
pub struct FlashSale {
    pub buyers: usize,
    pub sold_out: bool,
    pub keys_sold: u64,
}

/// One KPI: measured against its threshold.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Kpi {
    pub name: String,
    pub measured: f64,
    pub unit: String,
    pub threshold: String,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub nodes: Vec<String>,
    pub concurrency: usize,
    pub elapsed_secs: f64,
    /// Purchases completed (keys received), or requests answered for `browse`.
    pub completed: u64,
    pub per_sec: f64,
    pub attempts: u64,
    pub errors: BTreeMap<String, u64>,
    /// Errors over attempts; sold out is an outcome, not an error.
    pub error_rate: f64,
    /// The same without 429s (a flash sale's crowd is expected to meet the rate limits).
    pub error_rate_excluding_429: f64,
    pub pay_attempts: u64,
    pub delivered: u64,
    /// Order attempts answered with a proof-of-work challenge, solved by the buyer (an outcome).
    pub challenges_solved: u64,
    pub payment_success: Option<f64>,
    pub steps: Vec<StepReport>,
    pub baseline: Option<Baseline>,
    pub flash_sale: Option<FlashSale>,
    pub store: Vec<StoreReport>,
    pub sync: Vec<SyncReport>,
    pub audit: Option<AuditReport>,
    pub thresholds: Thresholds,
    pub kpis: Vec<Kpi>,
    pub passed: bool,
}

fn kpi(name: &str, measured: f64, unit: &str, threshold: String, pass: bool) -> Kpi {
    Kpi { name: name.into(), measured, unit: unit.into(), threshold, pass }
}

impl Report {
    /// The headline latency row: the whole purchase, or the request for `browse`.
    pub fn headline(&self) -> Option<&StepReport> {
        self.steps.last()
    }

    /// Fills `kpis` and `passed` from the figures and thresholds.
    pub fn judge(&mut self) {
        let t = &self.thresholds;
        let unit_name = if self.payment_success.is_some() { "purchases/s" } else { "requests/s" };
        let mut kpis = vec![kpi(
            &format!("TPS ({unit_name})"),
            self.per_sec,
            "/s",
            format!(">= {}", t.min_tps),
            self.per_sec >= t.min_tps,
        )];
        if let Some(head) = self.headline() {
            kpis.push(kpi(
                "average response",
                head.avg_ms,
                "ms",
                format!("< {}", t.max_avg_ms),
                head.avg_ms < t.max_avg_ms,
            ));
            kpis.push(kpi(
                "p99 response",
                head.p99_ms,
                "ms",
                format!("<= {}", t.max_p99_ms),
                head.p99_ms <= t.max_p99_ms,
            ));
        }
        let (rate, label) = if self.flash_sale.is_some() {
            (self.error_rate_excluding_429, "error rate (excl. 429)")
        } else {
            (self.error_rate, "error rate")
        };
        kpis.push(kpi(label, rate * 100.0, "%", format!("< {}%", t.max_error_rate), rate * 100.0 < t.max_error_rate));
        if let Some(success) = self.payment_success {
            kpis.push(kpi(
                "payment success",
                success * 100.0,
                "%",
                format!("> {}%", t.min_payment_success),
                success * 100.0 > t.min_payment_success,
            ));
        }
        for store in &self.store {
            if let Some(head) = store.headline() {
                let host = store.node.split_once("://").map_or(store.node.as_str(), |(_, h)| h);
                let name = format!("store commit {host}");
                kpis.push(kpi(
                    &name,
                    head.avg_ms,
                    "ms",
                    format!("< {}", t.max_store_commit_ms),
                    head.avg_ms < t.max_store_commit_ms,
                ));
            }
        }
        if let Some(flash) = &self.flash_sale {
            kpis.push(kpi("sold out", if flash.sold_out { 1.0 } else { 0.0 }, "bool", "yes".into(), flash.sold_out));
        }
        if let Some(audit) = &self.audit {
            let twice = (audit.keys_seen_twice.len() + audit.ledger_keys_twice.len()) as f64;
            kpis.push(kpi("keys delivered twice", twice, "", "0".into(), twice == 0.0));
            let unpaid = audit.paid_not_delivered.len() as f64;
            kpis.push(kpi("paid, not delivered", unpaid, "", "0".into(), unpaid == 0.0));
            kpis.push(kpi("ledger audit", if audit.passed { 1.0 } else { 0.0 }, "bool", "pass".into(), audit.passed));
        }
        self.passed = kpis.iter().all(|k| k.pass);
        self.kpis = kpis;
    }

    /// The human-readable table.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nedgecard bench {} — {} buyers on {} node(s), {:.1} s",
            self.scenario,
            self.concurrency,
            self.nodes.len(),
            self.elapsed_secs
        );
        if let Some(baseline) = &self.baseline {
            let l = &baseline.latency;
            let _ = writeln!(
                out,
                "\n  baseline GET {}: {} requests, {:.0} req/s, avg {:.2} ms, p99 {:.2} ms, errors {}",
                baseline.path,
                baseline.requests,
                baseline.requests_per_sec,
                l.avg_ms,
                l.p99_ms,
                baseline.errors.values().sum::<u64>()
            );
        }
        let _ = writeln!(
            out,
            "\n  {:<11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step", "count", "avg ms", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "  {:<11} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.step, s.count, s.avg_ms, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
            );
        }
        for store in &self.store {
            let fmt = |h: &Option<super::node_metrics::HistogramDelta>| match h {
                Some(h) => format!(
                    "avg {:.2} ms, p99 <= {}",
                    h.avg_ms,
                    h.p99_at_most_ms.map_or("?".to_string(), |p| format!("{p} ms"))
                ),
                None => "n/a".to_string(),
            };
            let _ = writeln!(
                out,
                "\n  store ({}): commit wait {}; flush {}; {:.0} flushes/s, {:.1} commits per flush",
                store.node,
                fmt(&store.commit_wait),
                fmt(&store.flush),
                store.flushes_per_sec,
                store.avg_group_size
            );
        }
        for sync in &self.sync {
            let _ = writeln!(
                out,
                "  sync ({}): {:.0} events/s acknowledged on average, {:.0}/s at peak; lag max {:.0} events, \
                 p99 {:.2} s, max {:.2} s",
                sync.node,
                sync.acked_per_sec,
                sync.peak_acked_per_sec,
                sync.max_lag_events,
                sync.p99_lag_secs,
                sync.max_lag_secs
            );
        }
        if let Some(flash) = &self.flash_sale {
            let _ = writeln!(
                out,
                "\n  flash sale: {} buyers released at once; {} keys sold; sold out: {}",
                flash.buyers,
                flash.keys_sold,
                if flash.sold_out { "yes" } else { "no" }
            );
        }
        let _ = writeln!(out, "\n  {:<30} {:>12}   {:<14} result", "KPI", "measured", "threshold");
        for k in &self.kpis {
            let measured = match k.unit.as_str() {
                "%" => format!("{:.3}%", k.measured),
                "ms" => format!("{:.2} ms", k.measured),
                "/s" => format!("{:.0}/s", k.measured),
                "bool" if k.pass => "yes".to_string(),
                "bool" => "no".to_string(),
                _ => format!("{}", k.measured),
            };
            let _ = writeln!(
                out,
                "  {:<30} {:>12}   {:<14} {}",
                k.name,
                measured,
                k.threshold,
                if k.pass { "ok" } else { "MISS" }
            );
        }
        if self.challenges_solved > 0 {
            let _ = writeln!(out, "\n  challenged and solved (proof of work): {}", self.challenges_solved);
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\n  outcomes other than success, by kind: {:?}", self.errors);
        }
        if let Some(audit) = &self.audit {
            let _ = writeln!(
                out,
                "\n  audit: {} orders seen, {} paid, {} delivered; ledger knows {}, delivered {}; \
                 caught up: {} after {:.1} s; new alarms: {}",
                audit.orders_seen,
                audit.paid_seen,
                audit.delivered_seen,
                audit.ledger_known,
                audit.ledger_delivered,
                audit.caught_up,
                audit.waited_secs,
                audit.new_alarms
            );
            for (what, list) in [
                ("paid, not delivered", &audit.paid_not_delivered),
                ("delivered, missing in ledger", &audit.delivered_missing_in_ledger),
                ("key count differs", &audit.key_count_mismatch),
            ] {
                if !list.is_empty() {
                    let _ = writeln!(out, "  {what}: {}", list.join(", "));
                }
            }
            for (a, b) in &audit.keys_seen_twice {
                let _ = writeln!(out, "  DOUBLE DELIVERY: orders {a} and {b} were shown the same key");
            }
            for d in &audit.ledger_keys_twice {
                let _ = writeln!(
                    out,
                    "  DOUBLE DELIVERY in the ledger: key {} of {} in orders {}",
                    d.key_id,
                    d.sku,
                    d.orders.join(", ")
                );
            }
        }
        let _ = writeln!(out, "\n  result: {}", if self.passed { "PASS" } else { "FAIL" });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(avg_ms: f64, p99_ms: f64) -> StepReport {
        StepReport {
            step: "purchase".into(),
            count: 10,
            avg_ms,
            p50_ms: avg_ms,
            p95_ms: p99_ms,
            p99_ms,
            max_ms: p99_ms,
        }
    }

    fn report() -> Report {
        Report {
            scenario: "purchase".into(),
            nodes: vec!["https://127.0.0.1:1".into()],
            concurrency: 4,
            elapsed_secs: 1.0,
            completed: 2000,
            per_sec: 2000.0,
            attempts: 2000,
            errors: BTreeMap::new(),
            error_rate: 0.0,
            error_rate_excluding_429: 0.0,
            pay_attempts: 2000,
            delivered: 2000,
            challenges_solved: 0,
            payment_success: Some(1.0),
            steps: vec![step(20.0, 40.0)],
            baseline: None,
            flash_sale: None,
            store: Vec::new(),
            sync: Vec::new(),
            audit: None,
            thresholds: Thresholds {
                min_tps: 1000.0,
                max_avg_ms: 500.0,
                max_p99_ms: 500.0,
                max_error_rate: 0.1,
                min_payment_success: 99.5,
                max_store_commit_ms: 50.0,
            },
            kpis: Vec::new(),
            passed: false,
        }
    }

    #[test]
    fn every_kpi_is_held_to_its_threshold() {
        let mut r = report();
        r.judge();
        assert!(r.passed, "{:?}", r.kpis);
        assert_eq!(r.kpis.len(), 5);

        let mut slow = report();
        slow.per_sec = 999.0;
        slow.judge();
        assert!(!slow.passed);
        assert_eq!(
            slow.kpis.iter().filter(|k| !k.pass).map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["TPS (purchases/s)"]
        );

        let mut errors = report();
        errors.error_rate = 0.001; // 0.1% is not below 0.1%
        errors.payment_success = Some(0.995);
        errors.judge();
        let missed: Vec<&str> = errors.kpis.iter().filter(|k| !k.pass).map(|k| k.name.as_str()).collect();
        assert_eq!(missed, ["error rate", "payment success"]);
        assert!(errors.render_table().contains("MISS"));
    }

    #[test]
    fn a_failed_audit_fails_the_run_and_is_shown() {
        let mut r = report();
        r.audit = Some(AuditReport {
            keys_seen_twice: vec![("a".into(), "b".into())],
            passed: false,
            ..AuditReport::default()
        });
        r.judge();
        assert!(!r.passed);
        let table = r.render_table();
        assert!(table.contains("DOUBLE DELIVERY: orders a and b"), "{table}");
        assert!(table.contains("result: FAIL"), "{table}");
        let json = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(json["passed"], false);
        assert_eq!(json["audit"]["keys_seen_twice"][0][1], "b");
    }
}
