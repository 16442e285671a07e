//! Staged rollout decisions, pure: which devices a stage includes, what a
//! health gate means, and whether the controller should promote a stage,
//! hold it, or abort the rollout and roll the stage back.
//!
//! It is not the controller loop, the store or the API: the hub's rollout
//! controller feeds it what devices reported and acts on the [`Decision`].
//! No I/O and no clock.
//!
//! Start reading at [`Plan`] and [`Plan::decide`].
//!
//! # Stages
//!
//! A plan has increasing stage percentages (for example 5 %, 25 %, 100 %)
//! over a cohort (the devices whose labels match). Each device has a fixed
//! position from the SHA-256 of its id and the rollout id ([`position`]);
//! the cohort sorted by position is the rollout order, and stage `k`
//! includes the first `ceil(p_k · n)` devices of it, at least one
//! ([`Plan::stage_members`]). Stages are therefore nested (a device in
//! stage 1 stays in every later stage), stable across restarts and hub
//! replicas, independent between rollouts, and a fleet of eight still gets
//! a one-device canary.
//!
//! # Decisions
//!
//! A stage is promoted only when at least `min_committed` (default 90 %) of
//! its devices have committed (passed their health window) *and* every gate
//! holds over the stage's reports; it is aborted as soon as failures
//! (a failed install, health check or rollback) exceed `max_failed`
//! (default 10 %) of the stage, or a gate is breached once at least
//! `min_committed` of the stage has reported. Otherwise it holds.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Positions are in `[0, POSITIONS)`; ties are broken by device id.
pub const POSITIONS: u32 = 10_000;

/// Errors of plan construction and gate parsing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The stages are not increasing percentages ending at 100.
    #[error("stages {0}: must be increasing percentages in (0, 100], ending at 100")]
    Stages(String),
    /// A gate expression does not parse.
    #[error("gate {gate:?}: {reason}")]
    Gate {
        /// The expression as given.
        gate: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A fraction setting is outside `[0, 1]`.
    #[error("{name} {value} must be between 0 and 1")]
    Fraction {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f64,
    },
}

/// A device's fixed position for a rollout: the first four bytes of
/// SHA-256(`rollout_id` NUL `device_id`), reduced to `[0, POSITIONS)`.
pub fn position(rollout_id: &str, device_id: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(rollout_id.as_bytes());
    h.update([0u8]);
    h.update(device_id.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % POSITIONS
}

/// Parses stage percentages such as `5%,25%,100%` (the `%` is optional).
pub fn parse_stages(text: &str) -> Result<Vec<f64>, Error> {
    let bad = || Error::Stages(text.to_owned());
    let stages: Vec<f64> = text
        .split(',')
        .map(|s| s.trim().trim_end_matches('%').trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let increasing = stages.windows(2).all(|w| w[0] < w[1]);
    let in_range = stages.iter().all(|&p| p > 0.0 && p <= 100.0);
    if stages.is_empty() || !increasing || !in_range || stages.last() != Some(&100.0) {
        return Err(bad());
    }
    Ok(stages)
}

/// A health metric a gate reads, aggregated over a stage's reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Failed requests / requests, as a fraction (written in percent).
    ErrorRate,
    /// The 95th-percentile latency in ms (the worst device's p95).
    P95Ms,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    /// `<`
    #[serde(rename = "<")]
    Below,
    /// `<=`
    #[serde(rename = "<=")]
    AtMost,
}

/// A health gate such as `error_rate<1%` or `p95_ms<200`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// What it reads.
    pub metric: Metric,
    /// How it compares.
    pub comparison: Comparison,
    /// The bound (a fraction for `error_rate`, ms for `p95_ms`).
    pub bound: f64,
}

impl FromStr for Gate {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let err = |reason: &str| Error::Gate {
            gate: text.to_owned(),
            reason: reason.to_owned(),
        };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (name, comparison, value) = if let Some((n, v)) = compact.split_once("<=") {
            (n, Comparison::AtMost, v)
        } else if let Some((n, v)) = compact.split_once('<') {
            (n, Comparison::Below, v)
        } else {
            return Err(err("expected METRIC<VALUE or METRIC<=VALUE"));
        };
        let metric = match name {
            "error_rate" => Metric::ErrorRate,
            "p95_ms" => Metric::P95Ms,
            _ => return Err(err("the metric must be error_rate or p95_ms")),
        };
        let (number, percent) = match value.strip_suffix('%') {
            Some(n) => (n, true),
            None => (value, false),
        };
        let number: f64 = number
            .parse()
            .map_err(|_| err("the bound is not a number"))?;
        if !number.is_finite() || number < 0.0 {
            return Err(err("the bound must be a finite number at least 0"));
        }
        let bound = match (metric, percent) {
            (Metric::ErrorRate, true) => number / 100.0,
            (Metric::ErrorRate, false) if number <= 1.0 => number,
            (Metric::ErrorRate, false) => return Err(err("an error rate above 1 needs a %")),
            (Metric::P95Ms, false) => number,
            (Metric::P95Ms, true) => return Err(err("p95_ms is in milliseconds, not %")),
        };
        Ok(Gate {
            metric,
            comparison,
            bound,
        })
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.comparison {
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
        };
        match self.metric {
            Metric::ErrorRate => write!(f, "error_rate{op}{}%", self.bound * 100.0),
            Metric::P95Ms => write!(f, "p95_ms{op}{}", self.bound),
        }
    }
}

impl Gate {
    fn holds(&self, value: f64) -> bool {
        match self.comparison {
            Comparison::Below => value < self.bound,
            Comparison::AtMost => value <= self.bound,
        }
    }
}

/// A rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The rollout's id (it seeds device positions).
    pub id: String,
    /// Increasing stage percentages, the last 100.
    pub stages: Vec<f64>,
    /// Only devices with all these labels take part.
    pub cohort: BTreeMap<String, String>,
    /// Health gates every stage must pass.
    pub gates: Vec<Gate>,
    /// Fraction of a stage that must have committed to promote it.
    pub min_committed: f64,
    /// Fraction of a stage whose failure aborts the rollout.
    pub max_failed: f64,
}

impl Plan {
    /// A plan with the default thresholds (90 % committed, 10 % failed).
    pub fn new(
        id: &str,
        stages: Vec<f64>,
        cohort: BTreeMap<String, String>,
        gates: Vec<Gate>,
    ) -> Result<Plan, Error> {
        let plan = Plan {
            id: id.to_owned(),
            stages,
            cohort,
            gates,
            min_committed: 0.9,
            max_failed: 0.1,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Checks the stages and fractions.
    pub fn validate(&self) -> Result<(), Error> {
        let text = self
            .stages
            .iter()
            .map(|s| format!("{s}%"))
            .collect::<Vec<_>>()
            .join(",");
        parse_stages(&text)?;
        for (name, value) in [
            ("min_committed", self.min_committed),
            ("max_failed", self.max_failed),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::Fraction { name, value });
            }
        }
        Ok(())
    }

    /// True if a device with these labels is in the cohort.
    pub fn in_cohort(&self, labels: &BTreeMap<String, String>) -> bool {
        self.cohort.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// How many devices of a cohort of `cohort` stages `0..=stage` include:
    /// the stage's share rounded up, and at least one device (the canary)
    /// when the cohort is not empty, so that a small fleet still gets a
    /// first stage smaller than the whole. 0 past the last stage.
    pub fn stage_size(&self, stage: usize, cohort: usize) -> usize {
        let Some(&percent) = self.stages.get(stage) else {
            return 0;
        };
        if cohort == 0 {
            return 0;
        }
        let share = (percent * cohort as f64 / 100.0 - 1e-9).ceil() as usize;
        share.clamp(1, cohort)
    }

    /// The cohort in rollout order: by [`position`], then id. Stage `k`
    /// includes the first [`stage_size`](Self::stage_size)`(k, n)` devices,
    /// so stages are nested, and the order does not depend on the order the
    /// ids are given in.
    pub fn order<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut ranked: Vec<(u32, &str)> = ids
            .into_iter()
            .map(|id| (position(&self.id, id), id))
            .collect();
        ranked.sort_unstable();
        ranked.into_iter().map(|(_, id)| id).collect()
    }

    /// The devices of `cohort` in stages `0..=stage`.
    pub fn stage_members<'a>(
        &self,
        stage: usize,
        cohort: impl IntoIterator<Item = &'a str>,
    ) -> Vec<&'a str> {
        let mut ordered = self.order(cohort);
        ordered.truncate(self.stage_size(stage, ordered.len()));
        ordered
    }

    /// What the controller should do about stage `stage`, given the
    /// reports of the cohort devices in it.
    pub fn decide(&self, stage: usize, reports: &[Report]) -> Decision {
        let total = reports.len();
        if total == 0 {
            return if stage + 1 >= self.stages.len() {
                Decision::Complete
            } else {
                Decision::Promote {
                    to_stage: stage + 1,
                }
            };
        }
        let count = |f: fn(&DeviceState) -> bool| reports.iter().filter(|r| f(&r.state)).count();
        let failed = count(|s| matches!(s, DeviceState::Failed));
        let committed = count(|s| matches!(s, DeviceState::Committed));
        let reported = total - count(|s| matches!(s, DeviceState::Pending));
        let fraction = |n: usize| n as f64 / total as f64;
        if fraction(failed) > self.max_failed {
            return Decision::Abort {
                reason: format!(
                    "{failed} of {total} devices in stage {} failed (more than {:.0} %)",
                    stage + 1,
                    self.max_failed * 100.0
                ),
            };
        }
        // Gates read the devices that have run the new version.
        let requests: u64 = reports.iter().map(|r| r.requests).sum();
        let errors: u64 = reports.iter().map(|r| r.errors).sum();
        let error_rate = if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        };
        let p95 = reports.iter().filter_map(|r| r.p95_ms).fold(0.0, f64::max);
        let breached: Vec<String> = self
            .gates
            .iter()
            .filter(|g| {
                let value = match g.metric {
                    Metric::ErrorRate => error_rate,
                    Metric::P95Ms => p95,
                };
                !g.holds(value)
            })
            .map(|g| match g.metric {
                Metric::ErrorRate => format!("{g} (is {:.2}%)", error_rate * 100.0),
                Metric::P95Ms => format!("{g} (is {p95:.0})"),
            })
            .collect();
        let enough = fraction(committed) >= self.min_committed;
        if !breached.is_empty() {
            if fraction(reported) >= self.min_committed {
                return Decision::Abort {
                    reason: format!(
                        "gate breached in stage {}: {}",
                        stage + 1,
                        breached.join(", ")
                    ),
                };
            }
            return Decision::Hold {
                reason: format!("gate not met yet: {}", breached.join(", ")),
            };
        }
        if !enough {
            return Decision::Hold {
                reason: format!(
                    "{committed} of {total} devices committed; {:.0} % needed",
                    self.min_committed * 100.0
                ),
            };
        }
        if stage + 1 >= self.stages.len() {
            Decision::Complete
        } else {
            Decision::Promote {
                to_stage: stage + 1,
            }
        }
    }
}

/// Where a device is with the rollout's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not reported yet (offline, downloading).
    Pending,
    /// Installed, in its health window.
    Installed,
    /// Passed its health window.
    Committed,
    /// Failed to install, failed its health check, or rolled back.
    Failed,
}

/// What a device in the stage reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its state.
    pub state: DeviceState,
    /// Requests served on the new version.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Its p95 latency on the new version, if measured.
    pub p95_ms: Option<f64>,
}

/// What the controller should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Open the next stage.
    Promote {
        /// The stage to open (0-based).
        to_stage: usize,
    },
    /// Wait for more reports.
    Hold {
        /// Why.
        reason: String,
    },
    /// Stop the rollout and roll the stage back.
    Abort {
        /// Why.
        reason: String,
    },
    /// The last stage is done.
    Complete,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: DeviceState, requests: u64, errors: u64, p95: f64) -> Report {
        Report {
            state,
            requests,
            errors,
            p95_ms: Some(p95),
        }
    }

    #[test]
    fn stages_parse_and_refuse_nonsense() {
        assert_eq!(parse_stages("5%,25%,100%").unwrap(), vec![5.0, 25.0, 100.0]);
        assert_eq!(parse_stages("100").unwrap(), vec![100.0]);
        for bad in [
            "",
            "5%,5%,100%",
            "25%,5%,100%",
            "5%,50%",
            "0%,100%",
            "5%,x,100%",
            "50%,150%",
        ] {
            assert!(parse_stages(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gates_parse_with_units() {
        let cases = [
            ("error_rate<1%", Metric::ErrorRate, Comparison::Below, 0.01),
            (
                "error_rate <= 0.05",
                Metric::ErrorRate,
                Comparison::AtMost,
                0.05,
            ),
            ("p95_ms<200", Metric::P95Ms, Comparison::Below, 200.0),
        ];
        for (text, metric, comparison, bound) in cases {
            let g: Gate = text.parse().unwrap();
            assert_eq!((g.metric, g.comparison), (metric, comparison), "{text}");
            assert!((g.bound - bound).abs() < 1e-12, "{text}");
            assert_eq!(
                g.to_string().parse::<Gate>().unwrap(),
                g,
                "{text} round trips"
            );
        }
        for bad in [
            "latency<3",
            "error_rate>1%",
            "p95_ms<200%",
            "error_rate<5",
            "p95_ms<-1",
            "p95_ms<",
        ] {
            let err = bad.parse::<Gate>().unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn stages_are_nested_stable_and_near_their_share() {
        let plan = Plan::new("r1", vec![5.0, 25.0, 100.0], BTreeMap::new(), vec![]).unwrap();
        let devices: Vec<String> = (0..4000).map(|i| format!("dev-{i:016x}")).collect();
        let ids = || devices.iter().map(String::as_str);
        let mut previous: Vec<&str> = Vec::new();
        for (stage, want) in [(0, 200), (1, 1000), (2, 4000)] {
            let inside = plan.stage_members(stage, ids());
            assert_eq!(inside.len(), want, "stage {stage}");
            assert_eq!(
                &inside[..previous.len()],
                &previous[..],
                "stages are nested"
            );
            previous = inside;
        }
        // The order does not depend on how the cohort is listed.
        let reversed = plan.stage_members(1, ids().rev());
        assert_eq!(reversed, plan.stage_members(1, ids()));
        // Another rollout orders the fleet differently.
        let other = Plan::new("r2", vec![5.0, 100.0], BTreeMap::new(), vec![]).unwrap();
        assert_ne!(other.stage_members(0, ids()), plan.stage_members(0, ids()));
        assert!(plan.stage_members(3, ids()).is_empty());
        assert_eq!(position("r1", "dev-1"), position("r1", "dev-1"));
    }

    #[test]
    fn small_cohorts_still_get_a_canary_stage() {
        let plan = Plan::new("r", vec![5.0, 25.0, 100.0], BTreeMap::new(), vec![]).unwrap();
        assert_eq!(
            (0..3).map(|s| plan.stage_size(s, 8)).collect::<Vec<_>>(),
            vec![1, 2, 8]
        );
        assert_eq!(plan.stage_size(0, 0), 0);
        assert_eq!(plan.stage_size(2, 1), 1);
        assert_eq!(plan.stage_size(1, 100), 25);
    }

    #[test]
    fn cohorts_match_every_label() {
        let cohort = BTreeMap::from([("site".to_owned(), "north".to_owned())]);
        let plan = Plan::new("r", vec![100.0], cohort, vec![]).unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(plan.in_cohort(&labels(&[("site", "north"), ("line", "2")])));
        assert!(!plan.in_cohort(&labels(&[("site", "south")])));
        assert!(!plan.in_cohort(&labels(&[])));
    }

    #[test]
    fn decisions() {
        let gates = vec![
            "error_rate<1%".parse().unwrap(),
            "p95_ms<200".parse().unwrap(),
        ];
        let plan = Plan::new("r", vec![5.0, 25.0, 100.0], BTreeMap::new(), gates).unwrap();
        use DeviceState::*;
        let healthy = |s| report(s, 1000, 2, 80.0);
        type Case = (&'static str, usize, Vec<Report>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "all committed and healthy",
                0,
                vec![healthy(Committed); 10],
                "promote",
            ),
            (
                "last stage done",
                2,
                vec![healthy(Committed); 10],
                "complete",
            ),
            (
                "too few committed",
                0,
                [vec![healthy(Committed); 5], vec![healthy(Installed); 5]].concat(),
                "hold",
            ),
            (
                "too many failed",
                0,
                [vec![healthy(Committed); 8], vec![healthy(Failed); 2]].concat(),
                "abort",
            ),
            (
                "one failure tolerated",
                1,
                [vec![healthy(Committed); 19], vec![healthy(Failed); 1]].concat(),
                "promote",
            ),
            (
                "error gate breached",
                0,
                vec![report(Committed, 1000, 50, 80.0); 10],
                "abort",
            ),
            (
                "latency gate breached",
                0,
                vec![report(Committed, 1000, 0, 450.0); 10],
                "abort",
            ),
            (
                "gate breached before enough reported",
                0,
                [
                    vec![report(Installed, 100, 50, 80.0); 2],
                    vec![report(Pending, 0, 0, 0.0); 8],
                ]
                .concat(),
                "hold",
            ),
            ("an empty stage moves on", 0, vec![], "promote"),
        ];
        for (what, stage, reports, want) in cases {
            let got = match plan.decide(stage, &reports) {
                Decision::Promote { to_stage } => {
                    assert_eq!(to_stage, stage + 1, "{what}");
                    "promote"
                }
                Decision::Hold { .. } => "hold",
                Decision::Abort { .. } => "abort",
                Decision::Complete => "complete",
            };
            assert_eq!(got, want, "{what}");
        }
        let Decision::Abort { reason } =
            plan.decide(0, &vec![report(Committed, 1000, 50, 80.0); 10])
        else {
            panic!("abort expected");
        };
        assert!(
            reason.contains("error_rate<1%") && reason.contains("5.00%"),
            "{reason}"
        );
    }

    #[test]
    fn plans_serialise() {
        let plan = Plan::new(
            "r",
            vec![5.0, 100.0],
            BTreeMap::new(),
            vec!["p95_ms<=250".parse().unwrap()],
        )
        .unwrap();
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
        let bad = Plan {
            max_failed: 1.5,
            ..plan
        };
        assert!(bad.validate().is_err());
    }
}
