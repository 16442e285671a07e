//! Byzantine client behaviours the simulator injects, to measure what the
//! robust strategies and update screening withstand.
//!
//! An attacker trains honestly, then replaces its update by
//! [`Attack::apply`]'s. Sign flipping and scaling are the crude attacks that
//! norm screening catches; "a little is enough" (Baruch et al., NeurIPS
//! 2019) is the subtle one: colluding attackers send the benign mean shifted
//! by a fraction of a standard deviation in every coordinate, small enough
//! to pass as honest to median- and distance-based defences, yet, summed
//! over many coordinates and rounds, enough to stall training.

use crate::{Error, Result};

/// One Byzantine behaviour. Serialised with the attack's
/// [`name`](Attack::name) in a `kind` field, e.g.
/// `{"kind": "sign_flip", "scale": 4.0}`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attack {
    /// Send `-scale` times the honest update: gradient ascent.
    SignFlip {
        /// How much the flipped update is amplified; 1 is a plain flip.
        scale: f32,
    },
    /// Send the honest update multiplied by `factor`, to dominate an
    /// unweighted mean (a model-replacement boost).
    Scaling {
        /// The amplification.
        factor: f32,
    },
    /// Baruch et al. 2019: send, in every coordinate, the mean of the
    /// benign updates minus `z` of their standard deviations.
    LittleIsEnough {
        /// How many standard deviations to shift by; when absent, the
        /// largest shift the paper's argument keeps undetected,
        /// [`z_max`]`(n_clients, n_attackers)`.
        #[serde(default)]
        z: Option<f32>,
    },
}

impl Attack {
    /// The attack's `kind` in its serialised form.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SignFlip { .. } => "sign_flip",
            Self::Scaling { .. } => "scaling",
            Self::LittleIsEnough { .. } => "little_is_enough",
        }
    }

    /// Checks that the attack's parameters are finite, since a NaN factor
    /// would test NaN handling rather than the attack.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a non-finite parameter.
    pub fn validate(&self) -> Result<()> {
        let value = match *self {
            Self::SignFlip { scale: v } | Self::Scaling { factor: v } => v,
            Self::LittleIsEnough { z } => z.unwrap_or(0.0),
        };
        if value.is_finite() {
            Ok(())
        } else {
            Err(Error::Invalid {
                what: "attack",
                reason: format!("the {} parameter {value} is not finite", self.name()),
            })
        }
    }

    /// The update an attacker sends in place of its `honest` one.
    ///
    /// `benign` are the honest updates the attackers collude on, used only
    /// by little-is-enough: it returns the coordinate-wise mean minus `z`
    /// population standard deviations of those of them that have the
    /// honest update's length, and the honest update itself when there are
    /// none (with nothing to estimate from, the attackers stay honest).
    /// `n_clients` and `n_attackers` (the round's participants and how many
    /// of them attack) only choose the default `z`.
    pub fn apply(
        &self,
        honest: &[f32],
        benign: &[&[f32]],
        n_clients: usize,
        n_attackers: usize,
    ) -> Vec<f32> {
        match *self {
            Self::SignFlip { scale } => honest.iter().map(|&v| -scale * v).collect(),
            Self::Scaling { factor } => honest.iter().map(|&v| factor * v).collect(),
            Self::LittleIsEnough { z } => {
                let z = z.unwrap_or_else(|| z_max(n_clients, n_attackers));
                little_is_enough(honest, benign, z)
            }
        }
    }
}

fn little_is_enough(honest: &[f32], benign: &[&[f32]], z: f32) -> Vec<f32> {
    let d = honest.len();
    let usable = || benign.iter().filter(|u| u.len() == d);
    let k = usable().count();
    if k == 0 {
        return honest.to_vec();
    }
    // Two passes in f64, update by update so that memory is read in order:
    // the one-pass formula E[x²] − E[x]² cancels catastrophically when the
    // spread is small next to the mean, which is exactly this attack's case.
    let mut mean = vec![0.0f64; d];
    for u in usable() {
        for (m, &v) in mean.iter_mut().zip(*u) {
            *m += f64::from(v);
        }
    }
    let inv_k = 1.0 / k as f64;
    mean.iter_mut().for_each(|m| *m *= inv_k);
    let mut var = vec![0.0f64; d];
    for u in usable() {
        for ((s, &m), &v) in var.iter_mut().zip(&mean).zip(*u) {
            let e = f64::from(v) - m;
            *s += e * e;
        }
    }
    let z = f64::from(z);
    mean.iter()
        .zip(&var)
        .map(|(&m, &s)| (m - z * (s * inv_k).sqrt()) as f32)
        .collect()
}

/// The largest shift little-is-enough can make while staying undetected,
/// from Baruch et al. 2019: with `n` clients of which `m` attack, the
/// attackers need `s = ⌊n/2 + 1⌋ − m` benign clients on their side of the
/// mean to sway a majority, and `z = Φ⁻¹((n − s) / n)` is the shift that
/// many benign updates lie beyond, for normally distributed coordinates.
///
/// When the attackers alone are a majority (`s ≤ 0`) the argument bounds
/// nothing; the probability is capped at `1 − 10⁻⁴`, `z ≈ 3.72`. No clients
/// gives 0.
pub fn z_max(n_clients: usize, n_attackers: usize) -> f32 {
    if n_clients == 0 {
        return 0.0;
    }
    let n = n_clients as f64;
    let s = (n / 2.0 + 1.0).floor() - n_attackers as f64;
    let p = ((n - s) / n).clamp(1e-12, 1.0 - 1e-4);
    analytics::normal::quantile(p) as f32
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sign_flip_and_scaling_transform_the_honest_update() {
        let honest = [1.0, -2.0, 0.5];
        assert_eq!(
            Attack::SignFlip { scale: 1.0 }.apply(&honest, &[], 10, 2),
            [-1.0, 2.0, -0.5]
        );
        assert_eq!(
            Attack::SignFlip { scale: 4.0 }.apply(&honest, &[], 10, 2),
            [-4.0, 8.0, -2.0]
        );
        assert_eq!(
            Attack::Scaling { factor: 10.0 }.apply(&honest, &[], 10, 2),
            [10.0, -20.0, 5.0]
        );
    }

    #[test]
    fn little_is_enough_is_mean_minus_z_std() {
        let a = [1.0, 0.0, 5.0];
        let b = [3.0, 0.0, 5.0];
        let c = [2.0, 3.0, 5.0];
        let out = Attack::LittleIsEnough { z: Some(1.5) }.apply(&[9.0; 3], &[&a, &b, &c], 10, 2);
        // Coordinate 0: mean 2, population std √(2/3); coordinate 1: mean
        // 1, std √2; coordinate 2: no spread.
        let expected = [
            2.0 - 1.5 * (2.0f64 / 3.0).sqrt(),
            1.0 - 1.5 * 2.0f64.sqrt(),
            5.0,
        ];
        for (o, e) in out.iter().zip(expected) {
            assert!((f64::from(*o) - e).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn little_is_enough_without_benign_updates_stays_honest() {
        let honest = [1.0, 2.0];
        let attack = Attack::LittleIsEnough { z: None };
        assert_eq!(attack.apply(&honest, &[], 10, 2), honest);
        // Updates of another length cannot be combined coordinate-wise.
        assert_eq!(attack.apply(&honest, &[&[1.0, 2.0, 3.0]], 10, 2), honest);
    }

    #[test]
    fn little_is_enough_uses_z_max_by_default() {
        let (a, b) = ([0.0f32, 10.0], [2.0f32, 10.0]);
        let z = z_max(50, 10);
        let out = Attack::LittleIsEnough { z: None }.apply(&[0.0; 2], &[&a, &b], 50, 10);
        assert!((out[0] - (1.0 - z)).abs() < 1e-6, "{out:?}");
        assert_eq!(out[1], 10.0);
    }

    #[test]
    fn z_max_follows_the_paper() {
        // n = 50, m = 10: s = 26 − 10 = 16, z = Φ⁻¹(34/50) = Φ⁻¹(0.68).
        assert!((z_max(50, 10) - 0.467_699).abs() < 1e-5);
        // More attackers need fewer benign supporters, so may shift more.
        assert!(z_max(50, 20) > z_max(50, 10));
        assert!(z_max(100, 80).is_finite());
        assert_eq!(z_max(0, 0), 0.0);
    }

    #[test]
    fn serde_uses_the_kind_tag() {
        let cases = [
            (
                Attack::SignFlip { scale: 4.0 },
                r#"{"kind":"sign_flip","scale":4.0}"#,
            ),
            (
                Attack::Scaling { factor: 10.0 },
                r#"{"kind":"scaling","factor":10.0}"#,
            ),
            (
                Attack::LittleIsEnough { z: Some(0.5) },
                r#"{"kind":"little_is_enough","z":0.5}"#,
            ),
        ];
        for (attack, json) in cases {
            assert_eq!(serde_json::to_string(&attack).unwrap(), json);
            assert_eq!(serde_json::from_str::<Attack>(json).unwrap(), attack);
            assert!(json.contains(attack.name()));
            attack.validate().unwrap();
        }
        assert_eq!(
            serde_json::from_str::<Attack>(r#"{"kind":"little_is_enough"}"#).unwrap(),
            Attack::LittleIsEnough { z: None }
        );
        assert!(serde_json::from_str::<Attack>(r#"{"kind":"scaling","factor":2,"x":1}"#).is_err());
        assert!(Attack::Scaling { factor: f32::NAN }.validate().is_err());
        assert!(
            Attack::LittleIsEnough {
                z: Some(f32::INFINITY)
            }
            .validate()
            .is_err()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// With `0 ≤ z ≤ 1/√(k−1)` the result stays within the benign
        /// range of every coordinate: by the Bhatia–Davis and Samuelson
        /// inequalities, mean − min ≥ std/√(k−1).
        #[test]
        fn little_is_enough_with_small_z_stays_in_benign_range(
            benign in proptest::collection::vec(proptest::collection::vec(-10.0f32..10.0, 4), 2..12),
            t in 0.0f32..=1.0,
        ) {
            let k = benign.len();
            let z = t / ((k - 1) as f32).sqrt();
            let refs: Vec<&[f32]> = benign.iter().map(Vec::as_slice).collect();
            let out = Attack::LittleIsEnough { z: Some(z) }.apply(&[0.0; 4], &refs, 20, 4);
            for (j, &v) in out.iter().enumerate() {
                let column = benign.iter().map(|u| u[j]);
                let min = column.clone().fold(f32::INFINITY, f32::min);
                let max = column.fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(v >= min - 1e-4 && v <= max + 1e-4, "{} not in [{}, {}]", v, min, max);
            }
        }
    }
}
