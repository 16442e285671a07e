//! The Rényi-DP accountant of the sampled Gaussian mechanism.
//!
//! One round with Poisson sampling rate `q` and noise multiplier `σ` is
//! `ε_α`-RDP at every order `α > 1` with (Mironov, Talwar and Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism", integer
//! orders)
//!
//! ```text
//! ε_α = log(A_α) / (α − 1),
//! A_α = Σ_{k=0..α} C(α, k) (1 − q)^(α−k) q^k exp((k² − k) / (2σ²)),
//! ```
//!
//! and `α / (2σ²)` for `q = 1` (the plain Gaussian mechanism). RDP composes
//! by addition, so the accountant keeps one running sum per order. The
//! conversion to (ε, δ) is Proposition 12 of Canonne, Kamath and Steinke
//! 2020 (also Balle et al. 2020), the one Opacus and Google's
//! `dp_accounting` use:
//! `ε = min_α ε_α + log(1 − 1/α) − log(δ · α) / (α − 1)`.
//! The orders are those libraries' defaults restricted to integers.

use crate::dp::DpConfig;
use crate::{Error, Result};

/// The RDP orders tracked: 2 to 64, then a few large ones for very small
/// δ or very noisy rounds.
const ORDERS: [u32; 68] = {
    let mut orders = [0u32; 68];
    let mut i = 0;
    while i < 63 {
        orders[i] = i as u32 + 2;
        i += 1;
    }
    orders[63] = 80;
    orders[64] = 96;
    orders[65] = 128;
    orders[66] = 256;
    orders[67] = 512;
    orders
};

/// A run of identical rounds in an accountant's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Composition {
    /// The probability that a given client takes part in a round.
    pub sampling_rate: f64,
    /// The noise's standard deviation as a multiple of the clip norm.
    pub noise_multiplier: f64,
    /// How many rounds ran with these settings.
    pub steps: u64,
}

impl Composition {
    /// Checks that the composition describes a real mechanism.
    fn validate(&self) -> Result<()> {
        check_mechanism(self.sampling_rate, self.noise_multiplier)
    }
}

/// Tracks the privacy a task has spent over its rounds.
///
/// Serialised as its history of [`Composition`]s (consecutive rounds with
/// the same settings merged), from which the per-order totals are rebuilt on
/// loading, so the hub can persist it as a small JSON value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Record", into = "Record")]
pub struct RdpAccountant {
    history: Vec<Composition>,
    /// The composed RDP at each of [`ORDERS`].
    rdp: Vec<f64>,
}

/// The persisted form of an [`RdpAccountant`].
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    history: Vec<Composition>,
}

impl TryFrom<Record> for RdpAccountant {
    type Error = Error;

    fn try_from(record: Record) -> Result<Self> {
        let mut accountant = RdpAccountant::new();
        for composition in record.history {
            composition.validate()?;
            accountant.compose(composition);
        }
        Ok(accountant)
    }
}

impl From<RdpAccountant> for Record {
    fn from(accountant: RdpAccountant) -> Self {
        Record {
            history: accountant.history,
        }
    }
}

/// Two accountants are equal when their histories are: the per-order totals
/// follow from the history, and may differ in the last bits between an
/// accountant that stepped round by round and one rebuilt from merged runs.
impl PartialEq for RdpAccountant {
    fn eq(&self, other: &Self) -> bool {
        self.history == other.history
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant that has spent nothing.
    pub fn new() -> Self {
        Self {
            history: Vec::new(),
            rdp: vec![0.0; ORDERS.len()],
        }
    }

    /// Composes `steps` rounds of the sampled Gaussian mechanism with
    /// sampling rate `sampling_rate` and noise multiplier `noise_multiplier`.
    ///
    /// # Panics
    ///
    /// If `sampling_rate` is outside `[0, 1]` or `noise_multiplier` is
    /// negative or not finite: spending privacy that cannot be accounted
    /// for is a bug. [`check_next_round`](Self::check_next_round) reports
    /// such settings as errors before a round runs.
    pub fn step(&mut self, sampling_rate: f64, noise_multiplier: f64, steps: u32) {
        if let Err(error) = check_mechanism(sampling_rate, noise_multiplier) {
            panic!("{error}");
        }
        self.compose(Composition {
            sampling_rate,
            noise_multiplier,
            steps: u64::from(steps),
        });
    }

    /// The runs of rounds composed so far, oldest first.
    pub fn history(&self) -> &[Composition] {
        &self.history
    }

    /// The total number of rounds composed.
    pub fn rounds(&self) -> u64 {
        self.history.iter().map(|c| c.steps).sum()
    }

    /// The ε the rounds so far have spent at `delta`: 0 before any round or
    /// for `delta >= 1`, infinite for `delta <= 0` or noiseless rounds.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon(&self.rdp, delta)
    }

    /// The ε at `delta` after one more round with these settings; the
    /// accountant itself is unchanged.
    ///
    /// # Panics
    ///
    /// On the settings [`step`](Self::step) panics on.
    pub fn epsilon_after(&self, sampling_rate: f64, noise_multiplier: f64, delta: f64) -> f64 {
        if let Err(error) = check_mechanism(sampling_rate, noise_multiplier) {
            panic!("{error}");
        }
        let rdp: Vec<f64> = ORDERS
            .iter()
            .zip(&self.rdp)
            .map(|(&alpha, &spent)| spent + round_rdp(sampling_rate, noise_multiplier, alpha))
            .collect();
        epsilon(&rdp, delta)
    }

    /// Whether the task can afford one more round at `sampling_rate`: the ε
    /// it would reach at the configured δ, or [`Error::BudgetExceeded`] if
    /// that is above the budget ([`Error::Invalid`] for invalid settings).
    pub fn check_next_round(&self, config: &DpConfig, sampling_rate: f64) -> Result<f64> {
        config.validate()?;
        check_mechanism(sampling_rate, config.noise_multiplier)?;
        let epsilon =
            self.epsilon_after(sampling_rate, config.noise_multiplier, config.target_delta);
        if epsilon > config.epsilon_budget {
            return Err(Error::BudgetExceeded {
                epsilon,
                delta: config.target_delta,
                budget: config.epsilon_budget,
            });
        }
        Ok(epsilon)
    }

    /// Adds a validated composition to the totals and the history.
    fn compose(&mut self, composition: Composition) {
        if composition.steps == 0 {
            return;
        }
        let steps = composition.steps as f64;
        for (total, &alpha) in self.rdp.iter_mut().zip(&ORDERS) {
            *total += steps
                * round_rdp(
                    composition.sampling_rate,
                    composition.noise_multiplier,
                    alpha,
                );
        }
        match self.history.last_mut() {
            Some(last)
                if last.sampling_rate == composition.sampling_rate
                    && last.noise_multiplier == composition.noise_multiplier =>
            {
                last.steps += composition.steps;
            }
            _ => self.history.push(composition),
        }
    }
}

/// Checks a round's settings: `0 <= q <= 1` and a finite non-negative `σ`
/// (zero means no noise, and infinite ε).
fn check_mechanism(sampling_rate: f64, noise_multiplier: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&sampling_rate) {
        return Err(Error::Invalid {
            what: "dp sampling rate",
            reason: format!("{sampling_rate} is outside [0, 1]"),
        });
    }
    if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
        return Err(Error::Invalid {
            what: "dp noise multiplier",
            reason: format!("{noise_multiplier} is not a finite non-negative number"),
        });
    }
    Ok(())
}

/// The RDP at integer order `alpha >= 2` of one round of the sampled
/// Gaussian mechanism.
fn round_rdp(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    let alpha_f = f64::from(alpha);
    if q == 1.0 {
        return alpha_f / (2.0 * sigma * sigma);
    }
    // A_α ≥ 1 in exact arithmetic, so a slightly negative log is rounding.
    (log_a(q, sigma, alpha) / (alpha_f - 1.0)).max(0.0)
}

/// `log A_α` for integer `alpha` and `0 < q < 1`.
///
/// The binomial weights `C(α, k) (1 − q)^(α−k) q^k` sum to one, so
/// `A_α − 1 = Σ_{k≥2} C(α, k) (1 − q)^(α−k) q^k (exp((k² − k)/(2σ²)) − 1)`,
/// a sum of positive terms (those for `k < 2` vanish). Summing that instead
/// of `A_α` keeps full relative precision when `A_α` is barely above one
/// (small `q`, where summing `A_α` itself would cancel to a few digits), and
/// summing in log space keeps the exponents, which reach the hundreds of
/// thousands for large orders and small `σ`, from overflowing.
fn log_a(q: f64, sigma: f64, alpha: u32) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    // log C(α, 2), then C(α, k + 1) = C(α, k) · (α − k) / (k + 1).
    let mut log_binomial = (f64::from(alpha) * f64::from(alpha - 1) / 2.0).ln();
    let terms: Vec<f64> = (2..=alpha)
        .map(|k| {
            let kf = f64::from(k);
            let term = log_binomial
                + kf * log_q
                + f64::from(alpha - k) * log_1mq
                + ln_exp_m1((kf * kf - kf) / two_var);
            if k < alpha {
                log_binomial += f64::from(alpha - k).ln() - (kf + 1.0).ln();
            }
            term
        })
        .collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_a_minus_1 = max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    // log A = log(1 + e^L), written so that neither a large nor a very
    // negative L loses precision or overflows.
    if log_a_minus_1 > 0.0 {
        log_a_minus_1 + (-log_a_minus_1).exp().ln_1p()
    } else {
        log_a_minus_1.exp().ln_1p()
    }
}

/// `log(eˣ − 1)` for `x > 0`, without overflow for large `x`.
fn ln_exp_m1(x: f64) -> f64 {
    if x > 1.0 {
        x + (-(-x).exp()).ln_1p()
    } else {
        x.exp_m1().ln()
    }
}

/// The (ε, δ) conversion of per-order RDP totals, minimised over orders.
fn epsilon(rdp: &[f64], delta: f64) -> f64 {
    if delta >= 1.0 {
        return 0.0;
    }
    // Also catches a NaN δ.
    if delta.is_nan() || delta <= 0.0 {
        return f64::INFINITY;
    }
    ORDERS
        .iter()
        .zip(rdp)
        .map(|(&alpha, &r)| {
            // δ ≥ sqrt(1 − exp(−KL)) means (0, δ)-DP already, and the RDP
            // at any order bounds the KL divergence (the order-1 RDP).
            if delta * delta + (-r).exp_m1() > 0.0 {
                return 0.0;
            }
            let alpha = f64::from(alpha);
            r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

#[cfg(test)]
mod tests;
