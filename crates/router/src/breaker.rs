//! The macro tier's circuit breaker: a pure state machine over
//! caller-supplied time.
//!
//! ```text
//!            failures_to_open consecutive failures
//!   Closed ─────────────────────────────────────────▶ Open
//!     ▲                                              │  ▲
//!     │ the probe succeeds          open_ms passed,  │  │ the probe fails
//!     │                             allow() → true   ▼  │ (a fresh open period)
//!     └──────────────────────────────────────────── HalfOpen
//! ```
//!
//! While open, [`Breaker::allow`] refuses every call; once `open_ms` have
//! passed it lets exactly one probe through and refuses the rest until the
//! probe's outcome is recorded. A probe whose outcome never comes (the
//! caller lost it) is given up after another `open_ms`, and the next call
//! becomes the probe, so the breaker cannot stay half-open for ever.
//!
//! Outcomes recorded while the breaker is open belong to calls that started
//! before it opened; they neither extend the open period nor close it.
//! While half-open, any outcome counts as the probe's.
//!
//! [`crate::decide()`] reads only a snapshot ([`Breaker::state`]) and treats
//! half-open as reachable; the agent claims the probe with
//! [`Breaker::allow`] before it sends a routed request, and when that
//! returns false (another request holds the probe) it answers as if the
//! macro call had failed: locally when the decision allows a local
//! fallback, else with a 503.

use serde::{Deserialize, Serialize};

use crate::policy::BreakerPolicy;

/// A snapshot of a breaker, as [`crate::decide()`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    #[default]
    Closed,
    /// Calls are refused for this much longer.
    Open {
        /// Milliseconds until a probe may go through.
        retry_in_ms: u64,
    },
    /// One probe may go through (or is under way).
    HalfOpen,
}

impl BreakerState {
    /// True when calls are refused outright.
    pub fn is_open(&self) -> bool {
        matches!(self, BreakerState::Open { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed { failures: u32 },
    Open { until_ms: u64 },
    HalfOpen { probe_since_ms: u64 },
}

/// A circuit breaker; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    phase: Phase,
}

impl Breaker {
    /// A closed breaker. A `failures_to_open` of 0 counts as 1.
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            phase: Phase::Closed { failures: 0 },
        }
    }

    /// The breaker's state at `now_ms`.
    pub fn state(&self, now_ms: u64) -> BreakerState {
        match self.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { until_ms } if now_ms < until_ms => BreakerState::Open {
                retry_in_ms: until_ms - now_ms,
            },
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go through at `now_ms`. While half-open this is
    /// true once (the probe), then false until the probe's outcome is
    /// recorded or the probe is given up after `open_ms`.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        match self.phase {
            Phase::Closed { .. } => true,
            Phase::Open { until_ms } if now_ms < until_ms => false,
            Phase::Open { .. } => {
                self.phase = Phase::HalfOpen {
                    probe_since_ms: now_ms,
                };
                true
            }
            Phase::HalfOpen { probe_since_ms } => {
                let lost = now_ms.saturating_sub(probe_since_ms) >= self.policy.open_ms;
                if lost {
                    self.phase = Phase::HalfOpen {
                        probe_since_ms: now_ms,
                    };
                }
                lost
            }
        }
    }

    /// Records a call that succeeded: it resets the failure count, and a
    /// successful probe closes the breaker.
    pub fn record_success(&mut self, _now_ms: u64) {
        match self.phase {
            Phase::Closed { .. } | Phase::HalfOpen { .. } => {
                self.phase = Phase::Closed { failures: 0 };
            }
            Phase::Open { .. } => {}
        }
    }

    /// Records a call that failed: `failures_to_open` in a row open the
    /// breaker, and a failed probe opens it again for a fresh `open_ms`.
    pub fn record_failure(&mut self, now_ms: u64) {
        let reopen = Phase::Open {
            until_ms: now_ms.saturating_add(self.policy.open_ms),
        };
        self.phase = match self.phase {
            Phase::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.policy.failures_to_open.max(1) {
                    reopen
                } else {
                    Phase::Closed { failures }
                }
            }
            Phase::HalfOpen { .. } => reopen,
            open @ Phase::Open { .. } => open,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures_to_open: 3,
            open_ms: 1000,
        })
    }

    #[test]
    fn closed_allows_and_opens_after_consecutive_failures() {
        let mut b = breaker();
        assert_eq!(b.state(0), BreakerState::Closed);
        assert!(b.allow(0));
        b.record_failure(10);
        b.record_failure(20);
        assert_eq!(b.state(20), BreakerState::Closed);
        assert!(b.allow(20));
        b.record_failure(30);
        assert_eq!(b.state(30), BreakerState::Open { retry_in_ms: 1000 });
        assert_eq!(b.state(500), BreakerState::Open { retry_in_ms: 530 });
        assert!(!b.allow(500));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut b = breaker();
        b.record_failure(0);
        b.record_failure(1);
        b.record_success(2);
        b.record_failure(3);
        b.record_failure(4);
        assert_eq!(b.state(4), BreakerState::Closed);
        b.record_failure(5);
        assert!(b.state(5).is_open());
    }

    #[test]
    fn open_lets_one_probe_through_after_open_ms() {
        let mut b = breaker();
        (0..3).for_each(|_| b.record_failure(0));
        assert!(!b.allow(999));
        assert_eq!(b.state(1000), BreakerState::HalfOpen);
        assert!(b.allow(1000), "the probe");
        assert_eq!(b.state(1001), BreakerState::HalfOpen);
        assert!(!b.allow(1001), "only one probe");
        assert!(!b.allow(1500));
    }

    #[test]
    fn a_successful_probe_closes() {
        let mut b = breaker();
        (0..3).for_each(|_| b.record_failure(0));
        assert!(b.allow(1000));
        b.record_success(1100);
        assert_eq!(b.state(1100), BreakerState::Closed);
        assert!(b.allow(1100));
        // The count starts afresh.
        b.record_failure(1200);
        b.record_failure(1200);
        assert_eq!(b.state(1200), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_fresh_period() {
        let mut b = breaker();
        (0..3).for_each(|_| b.record_failure(0));
        assert!(b.allow(1000));
        b.record_failure(1200);
        assert_eq!(b.state(1200), BreakerState::Open { retry_in_ms: 1000 });
        assert!(!b.allow(2199));
        assert!(b.allow(2200));
    }

    #[test]
    fn a_lost_probe_is_given_up_after_open_ms() {
        let mut b = breaker();
        (0..3).for_each(|_| b.record_failure(0));
        assert!(b.allow(1000));
        assert!(!b.allow(1999));
        assert!(b.allow(2000), "a new probe");
        assert!(!b.allow(2001));
    }

    #[test]
    fn late_outcomes_while_open_are_ignored() {
        let mut b = breaker();
        (0..3).for_each(|_| b.record_failure(0));
        b.record_success(10);
        assert_eq!(b.state(10), BreakerState::Open { retry_in_ms: 990 });
        b.record_failure(500);
        assert_eq!(b.state(500), BreakerState::Open { retry_in_ms: 500 });
    }

    #[test]
    fn time_going_backwards_or_overflowing_does_not_panic() {
        let mut b = Breaker::new(BreakerPolicy {
            failures_to_open: 0,
            open_ms: u64::MAX,
        });
        b.record_failure(u64::MAX);
        assert!(b.state(0).is_open());
        assert!(!b.allow(0));
        assert_eq!(b.state(u64::MAX), BreakerState::HalfOpen);
        assert!(b.allow(u64::MAX));
        assert!(!b.allow(0));
    }

    #[test]
    fn state_serialises_with_a_snake_case_tag() {
        let cases = [
            (BreakerState::Closed, r#"{"state":"closed"}"#),
            (
                BreakerState::Open { retry_in_ms: 250 },
                r#"{"state":"open","retry_in_ms":250}"#,
            ),
            (BreakerState::HalfOpen, r#"{"state":"half_open"}"#),
        ];
        for (state, json) in cases {
            assert_eq!(serde_json::to_string(&state).unwrap(), json);
            assert_eq!(serde_json::from_str::<BreakerState>(json).unwrap(), state);
        }
    }
}
