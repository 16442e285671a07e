//! Client-level differential privacy: DP-FedAvg (McMahan et al. 2018,
//! "Learning Differentially Private Recurrent Language Models") and the
//! Rényi-DP accountant that tracks what a task has spent.
//!
//! Each sampled client clips its update to `clip_norm` (see
//! [`clip_to_norm`](crate::screen::clip_to_norm)), so one client changes the
//! sum of clipped updates by at most `clip_norm`; the hub adds Gaussian noise
//! of standard deviation `noise_multiplier · clip_norm` to that sum
//! ([`add_gaussian_noise`], [`noise_stddev`]) before dividing. One round is
//! then the sampled Gaussian mechanism with sampling rate `q` (the expected
//! fraction of the population taking part) and noise multiplier `σ`, and
//! [`RdpAccountant`] composes the rounds and converts to (ε, δ).

mod rdp;

pub use rdp::{Composition, RdpAccountant};

use crate::{Error, Result};
use rand_distr::{Distribution, StandardNormal};

/// A task's differential-privacy settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// The L2 norm each client clips its update to: the sensitivity of the
    /// sum of updates to one client.
    pub clip_norm: f32,
    /// `σ`: the noise's standard deviation as a multiple of `clip_norm`.
    pub noise_multiplier: f64,
    /// The δ at which ε is reported and budgeted, typically below one over
    /// the number of clients.
    pub target_delta: f64,
    /// The largest ε the task may reach at `target_delta`; a round that
    /// would exceed it is refused.
    pub epsilon_budget: f64,
}

impl DpConfig {
    /// Checks the settings' ranges: a positive finite clip norm, a positive
    /// finite noise multiplier, `0 < target_delta < 1` and a positive finite
    /// budget.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what, reason: String| Err(Error::Invalid { what, reason });
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return invalid(
                "dp clip_norm",
                format!("{} is not a finite positive number", self.clip_norm),
            );
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return invalid(
                "dp noise_multiplier",
                format!("{} is not a finite positive number", self.noise_multiplier),
            );
        }
        if !(self.target_delta > 0.0 && self.target_delta < 1.0) {
            return invalid(
                "dp target_delta",
                format!("{} is outside (0, 1)", self.target_delta),
            );
        }
        if !(self.epsilon_budget.is_finite() && self.epsilon_budget > 0.0) {
            return invalid(
                "dp epsilon_budget",
                format!("{} is not a finite positive number", self.epsilon_budget),
            );
        }
        Ok(())
    }
}

/// The standard deviation of the noise the hub adds to the SUM of clipped
/// updates: `noise_multiplier · clip_norm`.
pub fn noise_stddev(config: &DpConfig) -> f64 {
    config.noise_multiplier * f64::from(config.clip_norm)
}

/// Adds independent `N(0, stddev²)` noise to every value of `sum`.
///
/// The noise is drawn in `f64` and added before rounding to `f32`. Like
/// every DP library working in floating point, this does not defend against
/// attacks on the low-order bits of the noise (Mironov 2012); the model
/// updates themselves are far noisier than those bits.
///
/// # Panics
///
/// If `stddev` is negative or not finite: calibrated noise is what makes
/// the release private, so a wrong value is a bug to stop at, not to
/// ignore. [`DpConfig::validate`] rules it out.
pub fn add_gaussian_noise(sum: &mut [f32], stddev: f64, rng: &mut impl rand::Rng) {
    assert!(
        stddev.is_finite() && stddev >= 0.0,
        "noise stddev must be finite and non-negative, got {stddev}"
    );
    if stddev == 0.0 {
        return;
    }
    for value in sum {
        let noise: f64 = StandardNormal.sample(rng);
        *value = (f64::from(*value) + stddev * noise) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn config() -> DpConfig {
        DpConfig {
            clip_norm: 0.5,
            noise_multiplier: 1.2,
            target_delta: 1e-5,
            epsilon_budget: 8.0,
        }
    }

    #[test]
    fn noise_has_the_requested_moments() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut sum = vec![3.0f32; 200_000];
        let stddev = noise_stddev(&config());
        assert!((stddev - 0.6).abs() < 1e-12);
        add_gaussian_noise(&mut sum, stddev, &mut rng);
        let n = sum.len() as f64;
        let mean = sum.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = sum
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        // Standard errors: 0.6/√n ≈ 0.0013 for the mean, about 0.3% of the
        // variance; the bounds are several of them.
        assert!((mean - 3.0).abs() < 0.008, "mean {mean}");
        assert!(
            (var.sqrt() / stddev - 1.0).abs() < 0.01,
            "stddev {}",
            var.sqrt()
        );
        let within_one = sum
            .iter()
            .filter(|&&v| (f64::from(v) - 3.0).abs() < stddev)
            .count();
        assert!((within_one as f64 / n - 0.6827).abs() < 0.01);
    }

    #[test]
    fn zero_noise_changes_nothing_and_seeds_reproduce() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut sum = vec![1.5f32, -2.0];
        add_gaussian_noise(&mut sum, 0.0, &mut rng);
        assert_eq!(sum, [1.5, -2.0]);
        let noisy = |seed| {
            let mut v = vec![0.0f32; 8];
            add_gaussian_noise(&mut v, 1.0, &mut ChaCha20Rng::seed_from_u64(seed));
            v
        };
        assert_eq!(noisy(3), noisy(3));
        assert_ne!(noisy(3), noisy(4));
    }

    #[test]
    #[should_panic(expected = "noise stddev")]
    fn negative_noise_is_a_bug() {
        add_gaussian_noise(&mut [0.0], -1.0, &mut ChaCha20Rng::seed_from_u64(0));
    }

    #[test]
    fn config_validation() {
        assert!(config().validate().is_ok());
        let cases = [
            DpConfig {
                clip_norm: 0.0,
                ..config()
            },
            DpConfig {
                clip_norm: f32::NAN,
                ..config()
            },
            DpConfig {
                noise_multiplier: 0.0,
                ..config()
            },
            DpConfig {
                target_delta: 1.0,
                ..config()
            },
            DpConfig {
                target_delta: 0.0,
                ..config()
            },
            DpConfig {
                epsilon_budget: f64::INFINITY,
                ..config()
            },
        ];
        for case in cases {
            assert!(
                matches!(case.validate(), Err(Error::Invalid { .. })),
                "{case:?}"
            );
        }
        let json = serde_json::to_string(&config()).unwrap();
        assert_eq!(serde_json::from_str::<DpConfig>(&json).unwrap(), config());
    }
}
