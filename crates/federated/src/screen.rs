//! Update screening for rounds whose updates the hub can see (no secure
//! aggregation), and the norm clipping clients apply themselves when it
//! cannot.
//!
//! Screening is a cheap first filter in front of any strategy: an update
//! whose norm is far larger than a round's usual updates (a scaling or
//! boosting attack) or whose direction disagrees with the round's consensus
//! (a sign flip) is rejected before it reaches the aggregator. The
//! consensus direction is the coordinate-wise median of the updates that
//! passed the norm check, which a minority of attackers cannot drag far.

use crate::strategy::{coordinate_median, dot, sum_of_squares};
use crate::{Error, Result};

/// Screening thresholds for one task; `None` turns a check off.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenConfig {
    /// The largest accepted L2 norm of an update.
    #[serde(default)]
    pub max_norm: Option<f32>,
    /// The largest accepted cosine distance (`1 − cos`, from 0 for the same
    /// direction to 2 for the opposite one) between an update and the
    /// coordinate-wise median of the round's updates.
    #[serde(default)]
    pub max_cosine_distance: Option<f32>,
}

impl ScreenConfig {
    /// Checks the thresholds' ranges: a finite non-negative norm and a
    /// cosine distance within `[0, 2]`.
    pub fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_norm
            && !(max.is_finite() && max >= 0.0)
        {
            return Err(Error::Invalid {
                what: "screen max_norm",
                reason: format!("{max} is not a finite non-negative number"),
            });
        }
        if let Some(max) = self.max_cosine_distance
            && !(0.0..=2.0).contains(&max)
        {
            return Err(Error::Invalid {
                what: "screen max_cosine_distance",
                reason: format!("{max} is outside [0, 2]"),
            });
        }
        Ok(())
    }
}

/// What screening decided about one update.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The update passed every configured check.
    Accept,
    /// The update's L2 norm is above the bound, or is not finite (an update
    /// with an infinite or NaN value is always rejected).
    RejectNorm {
        /// The update's norm.
        norm: f32,
        /// The bound (infinite when no bound is configured).
        max: f32,
    },
    /// The update points away from the round's median direction.
    RejectCosine {
        /// The update's cosine distance to the median direction.
        distance: f32,
        /// The bound.
        max: f32,
    },
}

impl Verdict {
    /// Whether the update was accepted.
    pub fn is_accept(&self) -> bool {
        matches!(self, Verdict::Accept)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Verdict::Accept => f.write_str("accepted"),
            Verdict::RejectNorm { norm, max } => {
                write!(f, "norm {norm} exceeds the bound {max}")
            }
            Verdict::RejectCosine { distance, max } => write!(
                f,
                "cosine distance {distance} to the median direction exceeds the bound {max}"
            ),
        }
    }
}

/// The L2 norm of `x`, accumulated in `f64`.
pub fn l2_norm(x: &[f32]) -> f32 {
    sum_of_squares(x).sqrt() as f32
}

/// Scales `x` in place so that its L2 norm is at most `max_norm`, and
/// returns its norm before scaling. A vector already within the bound is
/// left as it is.
///
/// This is the client-side clipping that bounds each client's contribution
/// under secure aggregation (where the hub cannot screen) and under
/// differential privacy (where the clip norm is the sensitivity the noise
/// is calibrated to), so the bound is guaranteed, not approximate: after the
/// call `l2_norm(x) <= max_norm` holds exactly, rounding included. A
/// negative or NaN `max_norm` clips to zero. A vector with an infinite or NaN
/// value cannot be scaled meaningfully; it is left untouched and its
/// non-finite norm returned for the caller to reject.
pub fn clip_to_norm(x: &mut [f32], max_norm: f32) -> f32 {
    let norm = sum_of_squares(x).sqrt();
    let bound = if max_norm >= 0.0 {
        f64::from(max_norm)
    } else {
        0.0
    };
    if !norm.is_finite() || norm <= bound {
        return norm as f32;
    }
    let mut current = norm;
    // Rounding each scaled value to f32 can leave the norm an ulp or two
    // above the bound. Each further pass shrinks a little more than the
    // measured excess, with a margin that grows fourfold per pass; the last
    // margin is 1, which zeroes the vector, so the loop always ends within
    // the bound.
    for pass in 0..=10 {
        let margin = if pass == 0 {
            0.0
        } else {
            (2.0f64).powi(2 * pass - 20)
        };
        let scale = bound / current * (1.0 - margin);
        for v in x.iter_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
        current = sum_of_squares(x).sqrt();
        if current <= bound {
            break;
        }
    }
    norm as f32
}

/// Screens a round's updates; one verdict per update, in order.
///
/// First each update's norm is checked against `max_norm` (a non-finite
/// norm is always rejected). Then, if `max_cosine_distance` is set and at
/// least 3 updates passed, each passing update's cosine distance to the
/// coordinate-wise median of the passing updates is checked. With fewer
/// than 3 there is no meaningful consensus, and when the median is the zero
/// vector there is no direction, so the cosine check is skipped. An update
/// that is itself zero has no direction either; it counts as orthogonal
/// (distance 1).
///
/// Updates are expected to share one length (the aggregator enforces it);
/// if they do not, directions are compared over the common prefix.
pub fn screen(config: &ScreenConfig, updates: &[&[f32]]) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = updates
        .iter()
        .map(|update| {
            let norm = l2_norm(update);
            let max = config.max_norm.unwrap_or(f32::INFINITY);
            if norm.is_finite() && norm <= max {
                Verdict::Accept
            } else {
                Verdict::RejectNorm { norm, max }
            }
        })
        .collect();

    let Some(max_distance) = config.max_cosine_distance else {
        return verdicts;
    };
    let passed: Vec<usize> = (0..updates.len())
        .filter(|&i| verdicts[i].is_accept())
        .collect();
    if passed.len() < 3 {
        return verdicts;
    }
    let dim = passed.iter().map(|&i| updates[i].len()).min().unwrap_or(0);
    let rows: Vec<&[f32]> = passed.iter().map(|&i| &updates[i][..dim]).collect();
    let reference = coordinate_median(&rows, dim);
    let reference_norm = sum_of_squares(&reference).sqrt();
    if reference_norm == 0.0 {
        return verdicts;
    }
    for (&i, row) in passed.iter().zip(rows) {
        let norm = sum_of_squares(row).sqrt();
        let distance = if norm == 0.0 {
            1.0
        } else {
            (1.0 - dot(row, &reference) / (norm * reference_norm)).clamp(0.0, 2.0)
        };
        // Asked this way round, a NaN threshold (which `validate` rules out)
        // rejects rather than accepts.
        let within = distance <= f64::from(max_distance);
        if !within {
            verdicts[i] = Verdict::RejectCosine {
                distance: distance as f32,
                max: max_distance,
            };
        }
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Honest updates: a shared direction plus a little per-client spread.
    fn honest(n: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|c| {
                (0..dim)
                    .map(|i| 1.0 + 0.3 * ((i * 7 + c * 13) % 11) as f32 / 11.0 - 0.15)
                    .collect()
            })
            .collect()
    }

    fn refs(updates: &[Vec<f32>]) -> Vec<&[f32]> {
        updates.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn rejects_a_scaled_update_by_norm() {
        let mut updates = honest(8, 50);
        updates[3].iter_mut().for_each(|v| *v *= 100.0);
        let config = ScreenConfig {
            max_norm: Some(20.0),
            max_cosine_distance: None,
        };
        let verdicts = screen(&config, &refs(&updates));
        for (i, verdict) in verdicts.iter().enumerate() {
            if i == 3 {
                let Verdict::RejectNorm { norm, max } = *verdict else {
                    panic!("expected a norm rejection, got {verdict:?}");
                };
                assert!((norm - l2_norm(&updates[3])).abs() < 1e-3 && max == 20.0);
            } else {
                assert_eq!(*verdict, Verdict::Accept, "update {i}");
            }
        }
    }

    #[test]
    fn rejects_a_sign_flipped_update_by_direction() {
        let mut updates = honest(7, 40);
        updates[5].iter_mut().for_each(|v| *v = -*v);
        let config = ScreenConfig {
            max_norm: Some(100.0),
            max_cosine_distance: Some(0.5),
        };
        let verdicts = screen(&config, &refs(&updates));
        for (i, verdict) in verdicts.iter().enumerate() {
            if i == 5 {
                let Verdict::RejectCosine { distance, .. } = *verdict else {
                    panic!("expected a cosine rejection, got {verdict:?}");
                };
                assert!(distance > 1.9, "{distance}");
            } else {
                assert!(verdict.is_accept(), "update {i}: {verdict}");
            }
        }
    }

    #[test]
    fn the_norm_rejected_do_not_sway_the_reference_direction() {
        // Three huge flipped updates would outvote three honest ones in the
        // median; the norm check removes them first.
        let mut updates = honest(6, 30);
        for update in &mut updates[..3] {
            update.iter_mut().for_each(|v| *v *= -1000.0);
        }
        let config = ScreenConfig {
            max_norm: Some(50.0),
            max_cosine_distance: Some(0.3),
        };
        let verdicts = screen(&config, &refs(&updates));
        assert!(
            verdicts[..3]
                .iter()
                .all(|v| matches!(v, Verdict::RejectNorm { .. }))
        );
        assert!(verdicts[3..].iter().all(Verdict::is_accept), "{verdicts:?}");
    }

    #[test]
    fn skips_the_cosine_check_with_fewer_than_three_updates() {
        let updates = [vec![1.0f32, 0.0], vec![-1.0, 0.0]];
        let config = ScreenConfig {
            max_norm: None,
            max_cosine_distance: Some(0.1),
        };
        assert_eq!(screen(&config, &refs(&updates)), vec![Verdict::Accept; 2]);
        assert!(screen(&config, &[]).is_empty());
    }

    #[test]
    fn always_rejects_non_finite_updates() {
        let updates = [
            vec![1.0f32, f32::NAN],
            vec![f32::INFINITY, 0.0],
            vec![1.0, 1.0],
        ];
        let verdicts = screen(&ScreenConfig::default(), &refs(&updates));
        assert!(matches!(verdicts[0], Verdict::RejectNorm { .. }));
        assert!(matches!(verdicts[1], Verdict::RejectNorm { max, .. } if max == f32::INFINITY));
        assert_eq!(verdicts[2], Verdict::Accept);
    }

    #[test]
    fn a_zero_update_counts_as_orthogonal() {
        let mut updates = honest(5, 10);
        updates[0] = vec![0.0; 10];
        let strict = ScreenConfig {
            max_norm: None,
            max_cosine_distance: Some(0.5),
        };
        let verdicts = screen(&strict, &refs(&updates));
        assert_eq!(
            verdicts[0],
            Verdict::RejectCosine {
                distance: 1.0,
                max: 0.5
            }
        );
        assert!(verdicts[1..].iter().all(Verdict::is_accept));
    }

    #[test]
    fn verdicts_display_in_lower_case() {
        assert_eq!(Verdict::Accept.to_string(), "accepted");
        assert_eq!(
            Verdict::RejectNorm {
                norm: 12.5,
                max: 10.0
            }
            .to_string(),
            "norm 12.5 exceeds the bound 10"
        );
        assert_eq!(
            Verdict::RejectCosine {
                distance: 1.5,
                max: 0.5
            }
            .to_string(),
            "cosine distance 1.5 to the median direction exceeds the bound 0.5"
        );
    }

    #[test]
    fn config_validation_and_serde() {
        assert!(ScreenConfig::default().validate().is_ok());
        let bad_norm = ScreenConfig {
            max_norm: Some(-1.0),
            max_cosine_distance: None,
        };
        assert!(matches!(bad_norm.validate(), Err(Error::Invalid { .. })));
        let bad_cosine = ScreenConfig {
            max_norm: None,
            max_cosine_distance: Some(2.5),
        };
        assert!(matches!(bad_cosine.validate(), Err(Error::Invalid { .. })));
        let parsed: ScreenConfig = serde_json::from_str(r#"{"max_norm": 3.5}"#).unwrap();
        assert_eq!(
            parsed,
            ScreenConfig {
                max_norm: Some(3.5),
                max_cosine_distance: None
            }
        );
        assert!(serde_json::from_str::<ScreenConfig>(r#"{"max_nrm": 3.5}"#).is_err());
    }

    #[test]
    fn clipping_leaves_short_vectors_alone_and_handles_edge_bounds() {
        let mut x = vec![3.0f32, 4.0];
        assert_eq!(clip_to_norm(&mut x, 5.0), 5.0);
        assert_eq!(x, [3.0, 4.0]);
        assert_eq!(clip_to_norm(&mut x, 2.5), 5.0);
        assert!((x[0] - 1.5).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6);
        assert_eq!(clip_to_norm(&mut x, -1.0), 2.5);
        assert_eq!(x, [0.0, 0.0]);
        let mut bad = vec![f32::NAN, 1.0];
        assert!(clip_to_norm(&mut bad, 1.0).is_nan());
        assert_eq!(bad[1], 1.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn clipping_bounds_the_norm_and_keeps_the_direction(
            x in prop::collection::vec(-1e6f32..1e6, 0..200),
            max_norm in 0.0f32..1e3,
        ) {
            let mut clipped = x.clone();
            let before = clip_to_norm(&mut clipped, max_norm);
            prop_assert!(l2_norm(&clipped) <= max_norm);
            prop_assert!((before - l2_norm(&x)).abs() <= 1e-6 * before.max(1.0));
            if before > max_norm && max_norm > 0.0 {
                // Clipping only scales: the result is parallel to the input.
                let cos = dot(&x, &clipped) / (f64::from(before) * f64::from(l2_norm(&clipped)));
                prop_assert!(cos > 1.0 - 1e-6, "cos {cos}");
                prop_assert!(l2_norm(&clipped) >= max_norm * (1.0 - 1e-5));
            } else if before <= max_norm {
                prop_assert_eq!(clipped, x);
            }
        }
    }
}
