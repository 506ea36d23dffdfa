//! A circuit breaker per payment channel. Pure: no clock, no I/O; callers pass `now` in
//! milliseconds of a monotonic clock.
//!
//! - **Closed**: calls pass. `failure_threshold` consecutive failures (errors or timeouts) open it.
//! - **Open**: calls are refused until `open_ms` has passed since it opened.
//! - **Half-open**: up to `half_open_probes` calls pass as probes. A probe's success closes the
//!   breaker; a probe's failure opens it again for another `open_ms`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_ms: u64,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failure_threshold: 5, open_ms: 30_000, half_open_probes: 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { consecutive_failures: u32 },
    Open { until: u64 },
    HalfOpen { probes_in_flight: u32 },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Inner,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker { config, inner: Inner::Closed { consecutive_failures: 0 } }
    }

    /// The state as of `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: u64) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Milliseconds until an open breaker lets a probe through (0 otherwise).
    pub fn retry_in(&self, now: u64) -> u64 {
        match self.inner {
            Inner::Open { until } => until.saturating_sub(now),
            _ => 0,
        }
    }

    /// Asks to make one call. `true` means go ahead, and the caller must report the result with
    /// [`Breaker::on_success`] or [`Breaker::on_failure`].
    pub fn try_acquire(&mut self, now: u64) -> bool {
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now >= until => {
                self.inner = Inner::HalfOpen { probes_in_flight: 1 };
                true
            }
            Inner::Open { .. } => false,
            Inner::HalfOpen { probes_in_flight } if probes_in_flight < self.config.half_open_probes.max(1) => {
                self.inner = Inner::HalfOpen { probes_in_flight: probes_in_flight + 1 };
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    pub fn on_success(&mut self, _now: u64) {
        self.inner = Inner::Closed { consecutive_failures: 0 };
    }

    pub fn on_failure(&mut self, now: u64) {
        let open = Inner::Open { until: now.saturating_add(self.config.open_ms) };
        self.inner = match self.inner {
            Inner::Closed { consecutive_failures } => {
                let failures = consecutive_failures.saturating_add(1);
                if failures >= self.config.failure_threshold.max(1) {
                    open
                } else {
                    Inner::Closed { consecutive_failures: failures }
                }
            }
            Inner::HalfOpen { .. } | Inner::Open { .. } => open,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig { failure_threshold: 3, open_ms: 1_000, half_open_probes: 1 })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = breaker();
        b.on_failure(0);
        b.on_failure(1);
        b.on_success(2);
        b.on_failure(3);
        b.on_failure(4);
        assert_eq!(b.state(5), BreakerState::Closed, "a success resets the count");
        assert!(b.try_acquire(5));
        b.on_failure(5);
        assert_eq!(b.state(6), BreakerState::Open);
        assert!(!b.try_acquire(6));
        assert_eq!(b.retry_in(6), 999);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_result_decides() {
        let mut b = breaker();
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(!b.try_acquire(1_001));
        assert_eq!(b.state(1_002), BreakerState::HalfOpen);
        assert!(b.try_acquire(1_002), "first probe");
        assert!(!b.try_acquire(1_003), "only one probe at a time");
        b.on_failure(1_010);
        assert_eq!(b.state(1_500), BreakerState::Open, "a failed probe reopens");
        assert!(!b.try_acquire(2_009));
        assert!(b.try_acquire(2_010));
        b.on_success(2_020);
        assert_eq!(b.state(2_021), BreakerState::Closed);
        assert!(b.try_acquire(2_021));
        assert!(b.try_acquire(2_021));
    }

    #[test]
    fn zero_threshold_and_zero_probes_behave_as_one() {
        let mut b = Breaker::new(BreakerConfig { failure_threshold: 0, open_ms: 10, half_open_probes: 0 });
        b.on_failure(0);
        assert_eq!(b.state(0), BreakerState::Open);
        assert!(b.try_acquire(10), "at least one probe even when configured with 0");
    }
}
