//! Forecasting a bucket series a few buckets ahead with additive exponential
//! smoothing.
//!
//! Four models, all in the state-space (ETS) form with additive errors of
//! Hyndman & Athanasopoulos, *Forecasting: Principles and Practice* (3rd ed.,
//! ch. 8):
//!
//! | trend | season | model | ETS |
//! |---|---|---|---|
//! | no | no | simple exponential smoothing | (A,N,N) |
//! | yes | no | Holt's linear | (A,A,N) |
//! | no | yes | additive seasonal | (A,N,A) |
//! | yes | yes | Holt-Winters additive | (A,A,A) |
//!
//! One step: `ŷ = l + b + s[t-m]`, `e = y - ŷ`, then `l ← l + b + αe`,
//! `b ← b + βe`, `s[t] ← s[t-m] + γe`. The reported `beta` and `gamma` are
//! these ETS ones, which relate to the textbook Holt-Winters `β*` and `γ*` by
//! `β = αβ*` and `γ = (1-α)γ*`; the search runs over `α`, `β*`, `γ*` in
//! `[0, 1]`, so the fitted model always satisfies `0 ≤ β ≤ α` and
//! `0 ≤ γ ≤ 1 - α`.
//!
//! The initial states are set from the data, not fitted: a least-squares
//! line through the first ten values (non-seasonal), or the means of the
//! first two seasons and the deviations of the first season from that line
//! (seasonal). The smoothing parameters minimise the sum of squared
//! one-step-ahead errors over the whole series: a coarse grid, then a
//! pattern search refined down to steps of 1e-5. Prediction intervals use
//! the residual variance `SSE / (n - number of smoothing parameters)` and the
//! exact h-step variance of each model (FPP3 table 8.8), assuming normal
//! errors.
//!
//! Minimum lengths (see [`ForecastConfig::min_len`]): 3 values without trend
//! or season, 4 with a trend, two full seasons with a season. Missing buckets
//! must be filled first, for example with [`fill_gaps`] or, for counts, with
//! zeros ([`crate::Statistic::Sum`] already gives 0 for an empty bucket).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bucket::MAX_BUCKETS;
use crate::{Error, Result, normal};

/// Which exponential smoothing model a forecast used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum ForecastModel {
    /// Level only, ETS(A,N,N).
    SimpleExponentialSmoothing,
    /// Level and trend, ETS(A,A,N).
    HoltLinear,
    /// Level and season, ETS(A,N,A).
    AdditiveSeasonal {
        /// Buckets per season, at least 2.
        season_length: usize,
    },
    /// Level, trend and season, ETS(A,A,A).
    HoltWintersAdditive {
        /// Buckets per season, at least 2.
        season_length: usize,
    },
}

impl ForecastModel {
    fn has_trend(self) -> bool {
        matches!(self, Self::HoltLinear | Self::HoltWintersAdditive { .. })
    }

    /// The season length, 1 for non-seasonal models.
    fn period(self) -> usize {
        match self {
            Self::AdditiveSeasonal { season_length }
            | Self::HoltWintersAdditive { season_length } => season_length,
            _ => 1,
        }
    }

    fn is_seasonal(self) -> bool {
        self.period() > 1
    }

    /// Number of fitted smoothing parameters.
    fn parameter_count(self) -> usize {
        1 + usize::from(self.has_trend()) + usize::from(self.is_seasonal())
    }

    /// The shortest series this model is fitted to.
    pub fn min_len(self) -> usize {
        match self {
            Self::SimpleExponentialSmoothing => 3,
            Self::HoltLinear => 4,
            Self::AdditiveSeasonal { season_length }
            | Self::HoltWintersAdditive { season_length } => (2 * season_length).max(4),
        }
    }
}

impl fmt::Display for ForecastModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SimpleExponentialSmoothing => f.write_str("simple exponential smoothing"),
            Self::HoltLinear => f.write_str("holt linear"),
            Self::AdditiveSeasonal { season_length } => {
                write!(f, "additive seasonal (season length {season_length})")
            }
            Self::HoltWintersAdditive { season_length } => {
                write!(f, "holt-winters additive (season length {season_length})")
            }
        }
    }
}

/// Settings for [`forecast()`]. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastConfig {
    /// Buckets to forecast, 0 to [`MAX_BUCKETS`]. Default 6.
    pub horizon: usize,
    /// Buckets per season (24 for a daily pattern in hourly buckets), at
    /// least 2, or `None` for no season. Default `None`.
    pub season_length: Option<usize>,
    /// Whether to model a trend. Default true.
    pub trend: bool,
    /// Coverage of the prediction interval, in (0, 1). Default 0.8.
    pub level: f64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            horizon: 6,
            season_length: None,
            trend: true,
            level: 0.8,
        }
    }
}

impl ForecastConfig {
    /// The model these settings select.
    pub fn model(&self) -> ForecastModel {
        match (self.trend, self.season_length) {
            (false, None) => ForecastModel::SimpleExponentialSmoothing,
            (true, None) => ForecastModel::HoltLinear,
            (false, Some(season_length)) => ForecastModel::AdditiveSeasonal { season_length },
            (true, Some(season_length)) => ForecastModel::HoltWintersAdditive { season_length },
        }
    }

    /// The shortest series [`forecast()`] accepts with these settings.
    pub fn min_len(&self) -> usize {
        self.model().min_len()
    }

    /// Checks every field's range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        if self.horizon > MAX_BUCKETS {
            return Err(Error::InvalidParameter {
                name: "forecast horizon",
                value: self.horizon.to_string(),
                expected: "at most 10000 buckets",
            });
        }
        if let Some(m) = self.season_length
            && !(2..=MAX_BUCKETS / 2).contains(&m)
        {
            return Err(Error::InvalidParameter {
                name: "forecast season_length",
                value: m.to_string(),
                expected: "between 2 and 5000 buckets",
            });
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            return Err(Error::InvalidParameter {
                name: "forecast interval level",
                value: self.level.to_string(),
                expected: "a number in (0, 1), such as 0.8 or 0.95",
            });
        }
        Ok(())
    }
}

/// The fitted smoothing parameters, in the ETS parametrisation described in
/// the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SmoothingParams {
    /// Level smoothing, in (0, 1].
    pub alpha: f64,
    /// Trend smoothing, in [0, alpha]; `None` without a trend.
    pub beta: Option<f64>,
    /// Seasonal smoothing, in [0, 1 - alpha]; `None` without a season.
    pub gamma: Option<f64>,
}

/// A forecast: point forecasts with prediction intervals, and the fit they
/// came from. `point`, `lower` and `upper` have one entry per bucket ahead,
/// the first being the bucket right after the last value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// The model fitted.
    pub model: ForecastModel,
    /// Its smoothing parameters.
    pub params: SmoothingParams,
    /// Number of values it was fitted to.
    pub fitted_len: usize,
    /// Sum of squared one-step-ahead errors over the fitted values.
    pub sse: f64,
    /// Standard deviation of the one-step-ahead errors.
    pub residual_sd: f64,
    /// Coverage of the intervals, e.g. 0.8.
    pub level: f64,
    /// Point forecasts.
    pub point: Vec<f64>,
    /// Lower interval bounds.
    pub lower: Vec<f64>,
    /// Upper interval bounds.
    pub upper: Vec<f64>,
}

/// Fills missing buckets: linearly between the nearest values on each side,
/// and with the first (last) value before the first (after the last) one.
///
/// # Errors
///
/// [`Error::NoData`] when every bucket is missing, and
/// [`Error::NonFiniteValue`] for a NaN or infinite value.
pub fn fill_gaps(values: &[Option<f64>]) -> Result<Vec<f64>> {
    let mut known = Vec::new();
    for (index, v) in values.iter().enumerate() {
        if let Some(value) = *v {
            if !value.is_finite() {
                return Err(Error::NonFiniteValue { index, value });
            }
            known.push((index, value));
        }
    }
    let (Some(&(_, first_v)), Some(&(last_i, last_v))) = (known.first(), known.last()) else {
        return Err(Error::NoData);
    };
    let mut out = vec![first_v; values.len()];
    out[last_i..].fill(last_v);
    for pair in known.windows(2) {
        let ((i0, v0), (i1, v1)) = (pair[0], pair[1]);
        for (i, slot) in out.iter_mut().enumerate().take(i1 + 1).skip(i0) {
            let t = (i - i0) as f64 / (i1 - i0) as f64;
            *slot = v0 + t * (v1 - v0);
        }
    }
    Ok(out)
}

/// The model's state before (or after) a run over the data.
#[derive(Debug, Clone, PartialEq)]
struct State {
    level: f64,
    trend: f64,
    /// `season[t % m]` is the seasonal term for time `t`; all zeros (and of
    /// length 1) for non-seasonal models.
    season: Vec<f64>,
}

/// Smoothing parameters in ETS form, 0 for absent components.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    alpha: f64,
    beta: f64,
    gamma: f64,
}

/// The smallest `alpha`: at 0 the level would never learn from the data.
const ALPHA_MIN: f64 = 1e-4;

impl Params {
    /// Maps search coordinates in `[0, 1]^3` onto the admissible region.
    fn from_unit(theta: [f64; 3], model: ForecastModel) -> Self {
        let alpha = ALPHA_MIN + (1.0 - ALPHA_MIN) * theta[0].clamp(0.0, 1.0);
        let beta = if model.has_trend() {
            alpha * theta[1].clamp(0.0, 1.0)
        } else {
            0.0
        };
        let gamma = if model.is_seasonal() {
            (1.0 - alpha) * theta[2].clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self { alpha, beta, gamma }
    }
}

/// The initial state from the data, as described in the module docs.
fn initial_state(y: &[f64], model: ForecastModel) -> State {
    let m = model.period();
    if m == 1 {
        let k = y.len().min(10);
        let head = &y[..k];
        let mean_y = head.iter().sum::<f64>() / k as f64;
        if !model.has_trend() {
            return State {
                level: mean_y,
                trend: 0.0,
                season: vec![0.0],
            };
        }
        let mean_x = (k - 1) as f64 / 2.0;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (i, &v) in head.iter().enumerate() {
            let dx = i as f64 - mean_x;
            sxy += dx * (v - mean_y);
            sxx += dx * dx;
        }
        let slope = sxy / sxx;
        let intercept = mean_y - slope * mean_x;
        // The state before t = 0, so that its one-step forecast for t = 0
        // is the line's value there.
        return State {
            level: intercept - slope,
            trend: slope,
            season: vec![0.0],
        };
    }
    let mean1 = y[..m].iter().sum::<f64>() / m as f64;
    let mean2 = y[m..2 * m].iter().sum::<f64>() / m as f64;
    let trend = if model.has_trend() {
        (mean2 - mean1) / m as f64
    } else {
        0.0
    };
    // mean1 is the line's value at the middle of the first season.
    let centre = (m - 1) as f64 / 2.0;
    let season = y[..m]
        .iter()
        .enumerate()
        .map(|(i, &v)| v - (mean1 + (i as f64 - centre) * trend))
        .collect();
    State {
        level: mean1 - (centre + 1.0) * trend,
        trend,
        season,
    }
}

/// Runs the model over `y` from `init`; returns the SSE of the one-step
/// errors (infinite if the run diverged) and the final state.
fn run(y: &[f64], init: &State, p: Params) -> (f64, State) {
    let mut s = init.clone();
    let m = s.season.len();
    let mut sse = 0.0;
    for (t, &obs) in y.iter().enumerate() {
        let slot = t % m;
        let error = obs - (s.level + s.trend + s.season[slot]);
        sse += error * error;
        s.level += s.trend + p.alpha * error;
        s.trend += p.beta * error;
        s.season[slot] += p.gamma * error;
    }
    (if sse.is_finite() { sse } else { f64::INFINITY }, s)
}

/// Finds the search coordinates with the least SSE: grid, then pattern
/// search. Ties keep the earlier candidate, so a perfectly fitted series
/// (every SSE 0) gets the first grid point.
fn fit(y: &[f64], init: &State, model: ForecastModel) -> [f64; 3] {
    const GRID_ALPHA: [f64; 11] = [0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99];
    const GRID_OTHER: [f64; 8] = [0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0];
    let sse = |theta: [f64; 3]| run(y, init, Params::from_unit(theta, model)).0;
    let betas: &[f64] = if model.has_trend() {
        &GRID_OTHER
    } else {
        &[0.0]
    };
    let gammas: &[f64] = if model.is_seasonal() {
        &GRID_OTHER
    } else {
        &[0.0]
    };

    let mut best = ([GRID_ALPHA[0], betas[0], gammas[0]], f64::INFINITY);
    for &a in &GRID_ALPHA {
        for &b in betas {
            for &g in gammas {
                let theta = [a, b, g];
                let e = sse(theta);
                if e < best.1 {
                    best = (theta, e);
                }
            }
        }
    }
    if best.1 == 0.0 || !best.1.is_finite() {
        return best.0;
    }

    let dims = [true, model.has_trend(), model.is_seasonal()];
    let mut step = 0.05;
    let mut rounds = 0;
    while step > 1e-5 && rounds < 400 {
        rounds += 1;
        let mut improved = false;
        for d in (0..3).filter(|&d| dims[d]) {
            for sign in [1.0, -1.0] {
                let mut theta = best.0;
                theta[d] = (theta[d] + sign * step).clamp(0.0, 1.0);
                if theta[d] == best.0[d] {
                    continue;
                }
                let e = sse(theta);
                if e < best.1 {
                    best = (theta, e);
                    improved = true;
                }
            }
        }
        if !improved {
            step /= 2.0;
        }
    }
    best.0
}

/// Forecasts `values` (one per bucket, oldest first, no gaps)
/// `config.horizon` buckets ahead. A flat series (zeros included) forecasts
/// the same value with zero-width intervals.
///
/// # Errors
///
/// [`Error::InvalidParameter`] for a bad config, [`Error::NonFiniteValue`]
/// for a NaN or infinite value, and [`Error::SeriesTooShort`] below
/// [`ForecastConfig::min_len`] values.
pub fn forecast(values: &[f64], config: &ForecastConfig) -> Result<Forecast> {
    config.validate()?;
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFiniteValue { index, value });
    }
    let model = config.model();
    let n = values.len();
    if n < model.min_len() {
        return Err(Error::SeriesTooShort {
            model: model.to_string(),
            needed: model.min_len(),
            got: n,
        });
    }

    // Fitting runs on values scaled into [-1, 1] so squared errors cannot
    // overflow whatever the units; everything is scaled back at the end.
    let scale = values.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let y: Vec<f64> = values.iter().map(|v| v / scale).collect();

    let init = initial_state(&y, model);
    let theta = fit(&y, &init, model);
    let p = Params::from_unit(theta, model);
    let (sse, last) = run(&y, &init, p);
    let sigma2 = sse / (n - model.parameter_count()) as f64;
    let z = normal::quantile(0.5 + config.level / 2.0);

    let m = last.season.len();
    let (mut point, mut lower, mut upper) = (Vec::new(), Vec::new(), Vec::new());
    for h in 1..=config.horizon {
        let hf = h as f64;
        let mean = last.level + hf * last.trend + last.season[(n + h - 1) % m];
        // FPP3 table 8.8; the seasonal term is 0 for non-seasonal models
        // because gamma is 0 there.
        let k = ((h - 1) / m) as f64;
        let (a, b, g) = (p.alpha, p.beta, p.gamma);
        let factor = 1.0
            + (hf - 1.0) * (a * a + a * b * hf + b * b * hf * (2.0 * hf - 1.0) / 6.0)
            + g * k * (2.0 * a + g + b * m as f64 * (k + 1.0));
        let half_width = z * (sigma2 * factor).sqrt() * scale;
        let mean = mean * scale;
        point.push(mean);
        lower.push(mean - half_width);
        upper.push(mean + half_width);
    }

    Ok(Forecast {
        model,
        params: SmoothingParams {
            alpha: p.alpha,
            beta: model.has_trend().then_some(p.beta),
            gamma: model.is_seasonal().then_some(p.gamma),
        },
        fitted_len: n,
        sse: sse * scale * scale,
        residual_sd: sigma2.sqrt() * scale,
        level: config.level,
        point,
        lower,
        upper,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
        }
    }

    fn config(horizon: usize, season_length: Option<usize>, trend: bool) -> ForecastConfig {
        ForecastConfig {
            horizon,
            season_length,
            trend,
            level: 0.8,
        }
    }

    /// Small deterministic noise in [-0.5, 0.5).
    fn noise(len: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    /// Noise-free series whose continuation is known exactly.
    #[test]
    fn exact_series_continue_exactly() {
        let pattern4 = [3.0, -1.0, 4.0, -6.0];
        let pattern7 = [0.0, 5.0, 9.0, 9.0, 5.0, 0.0, -28.0];
        type Case = (
            &'static str,
            Box<dyn Fn(usize) -> f64>,
            ForecastConfig,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "line, holt",
                Box::new(|t| 3.0 + 2.0 * t as f64),
                config(5, None, true),
                20,
            ),
            (
                "falling line, holt",
                Box::new(|t| 100.0 - 0.25 * t as f64),
                config(3, None, true),
                4,
            ),
            ("flat, holt", Box::new(|_| 5.0), config(4, None, true), 12),
            ("flat, ses", Box::new(|_| -7.5), config(4, None, false), 3),
            ("zeros, holt", Box::new(|_| 0.0), config(4, None, true), 10),
            (
                "zeros, holt-winters",
                Box::new(|_| 0.0),
                config(4, Some(4), true),
                8,
            ),
            (
                "season 4 on a rising line, holt-winters",
                Box::new(move |t| 10.0 + 0.5 * t as f64 + pattern4[t % 4]),
                config(8, Some(4), true),
                24,
            ),
            (
                "season 7, no trend",
                Box::new(move |t| 40.0 + pattern7[t % 7]),
                config(10, Some(7), false),
                21,
            ),
            (
                "season 7 at its minimum length",
                Box::new(move |t| 40.0 + pattern7[t % 7]),
                config(7, Some(7), true),
                14,
            ),
            (
                "huge values do not overflow",
                Box::new(|t| 1e300 + 1e298 * t as f64),
                config(2, None, true),
                10,
            ),
        ];
        for (name, f, cfg, len) in cases {
            let values: Vec<f64> = (0..len).map(&f).collect();
            let want: Vec<f64> = (len..len + cfg.horizon).map(&f).collect();
            let got = forecast(&values, &cfg).unwrap();
            let tol = 1e-9 * want.iter().fold(1.0f64, |a, w| a.max(w.abs()));
            assert_close(&got.point, &want, tol, name);
            assert_close(&got.lower, &want, tol, name);
            assert_close(&got.upper, &want, tol, name);
            assert!(got.sse <= tol * tol * len as f64, "{name}: sse {}", got.sse);
            assert_eq!(got.model, cfg.model(), "{name}");
        }
    }

    #[test]
    fn noisy_linear_series_follows_the_trend_with_widening_intervals() {
        let values: Vec<f64> = noise(60, 7)
            .iter()
            .enumerate()
            .map(|(t, e)| 20.0 + 0.5 * t as f64 + 2.0 * e)
            .collect();
        let f = forecast(&values, &config(10, None, true)).unwrap();
        for (h, p) in f.point.iter().enumerate() {
            let truth = 20.0 + 0.5 * (60 + h) as f64;
            assert!((p - truth).abs() < 2.5, "h={}: {p} vs {truth}", h + 1);
        }
        for i in 0..f.point.len() {
            assert!(f.lower[i] < f.point[i] && f.point[i] < f.upper[i]);
            if i > 0 {
                assert!(f.upper[i] - f.lower[i] > f.upper[i - 1] - f.lower[i - 1]);
            }
        }
        // Noise of sd 2/sqrt(12) ≈ 0.58: the one-step sd is close to it.
        assert!((0.4..0.9).contains(&f.residual_sd), "{}", f.residual_sd);
        let beta = f.params.beta.unwrap();
        assert!(f.params.gamma.is_none());
        assert!((0.0..=f.params.alpha).contains(&beta));
    }

    #[test]
    fn seasonal_model_beats_holt_on_seasonal_data() {
        let pattern = [0.0, 2.0, 6.0, 9.0, 6.0, 2.0];
        let values: Vec<f64> = noise(48, 3)
            .iter()
            .enumerate()
            .map(|(t, e)| 50.0 + pattern[t % 6] + e)
            .collect();
        let hw = forecast(&values, &config(6, Some(6), true)).unwrap();
        let holt = forecast(&values, &config(6, None, true)).unwrap();
        assert!(hw.sse < holt.sse / 4.0, "{} vs {}", hw.sse, holt.sse);
        for (h, p) in hw.point.iter().enumerate() {
            let truth = 50.0 + pattern[(48 + h) % 6];
            assert!((p - truth).abs() < 1.5, "h={}: {p} vs {truth}", h + 1);
        }
        let gamma = hw.params.gamma.unwrap();
        assert!((0.0..=1.0 - hw.params.alpha).contains(&gamma));
    }

    #[test]
    fn wider_level_gives_wider_intervals() {
        let values: Vec<f64> = noise(30, 11).iter().map(|e| 10.0 + e).collect();
        let width = |level| {
            let f = forecast(
                &values,
                &ForecastConfig {
                    level,
                    ..config(1, None, false)
                },
            )
            .unwrap();
            f.upper[0] - f.lower[0]
        };
        let (w80, w95) = (width(0.8), width(0.95));
        // z(0.975) / z(0.9) = 1.959964 / 1.281552.
        assert!((w95 / w80 - 1.529_35).abs() < 1e-4, "{w80} {w95}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let cases: &[(&[f64], ForecastConfig, Error)] = &[
            (
                &[1.0, 2.0],
                config(1, None, false),
                Error::SeriesTooShort {
                    model: "simple exponential smoothing".into(),
                    needed: 3,
                    got: 2,
                },
            ),
            (
                &[1.0, 2.0, 3.0],
                config(1, None, true),
                Error::SeriesTooShort {
                    model: "holt linear".into(),
                    needed: 4,
                    got: 3,
                },
            ),
            (
                &[1.0; 7],
                config(1, Some(4), true),
                Error::SeriesTooShort {
                    model: "holt-winters additive (season length 4)".into(),
                    needed: 8,
                    got: 7,
                },
            ),
            (
                &[],
                config(1, None, true),
                Error::SeriesTooShort {
                    model: "holt linear".into(),
                    needed: 4,
                    got: 0,
                },
            ),
            (
                &[1.0, f64::NAN, 3.0, 4.0],
                config(1, None, true),
                Error::NonFiniteValue {
                    index: 1,
                    value: f64::NAN,
                },
            ),
            (
                &[1.0; 10],
                config(1, Some(1), true),
                Error::InvalidParameter {
                    name: "forecast season_length",
                    value: "1".into(),
                    expected: "between 2 and 5000 buckets",
                },
            ),
            (
                &[1.0; 10],
                ForecastConfig {
                    level: 1.0,
                    ..ForecastConfig::default()
                },
                Error::InvalidParameter {
                    name: "forecast interval level",
                    value: "1".into(),
                    expected: "a number in (0, 1), such as 0.8 or 0.95",
                },
            ),
            (
                &[1.0; 10],
                config(MAX_BUCKETS + 1, None, true),
                Error::InvalidParameter {
                    name: "forecast horizon",
                    value: "10001".into(),
                    expected: "at most 10000 buckets",
                },
            ),
        ];
        for (values, cfg, want) in cases {
            let got = forecast(values, cfg).unwrap_err();
            // NaN != NaN, so compare the messages.
            assert_eq!(got.to_string(), want.to_string());
        }
        assert_eq!(
            forecast(&[1.0, 2.0, 3.0], &config(1, None, true))
                .unwrap_err()
                .to_string(),
            "holt linear forecast needs a series of at least 4 values, got 3"
        );
    }

    #[test]
    fn zero_horizon_gives_an_empty_forecast() {
        let f = forecast(&[1.0, 2.0, 3.0, 4.0], &config(0, None, true)).unwrap();
        assert!(f.point.is_empty() && f.lower.is_empty() && f.upper.is_empty());
    }

    /// One hand-computed run of the recursion with fixed parameters.
    #[test]
    fn recursion_by_hand() {
        let init = State {
            level: 1.0,
            trend: 0.5,
            season: vec![0.0],
        };
        let p = Params {
            alpha: 0.5,
            beta: 0.25,
            gamma: 0.0,
        };
        // t=0: ŷ=1.5, e=0.5, l=1+0.5+0.25=1.75, b=0.5+0.125=0.625
        // t=1: ŷ=2.375, e=-0.375, l=2.375-0.1875=2.1875, b=0.625-0.09375=0.53125
        let (sse, s) = run(&[2.0, 2.0], &init, p);
        assert!((sse - (0.25 + 0.140_625)).abs() < 1e-15);
        assert!((s.level - 2.1875).abs() < 1e-15);
        assert!((s.trend - 0.531_25).abs() < 1e-15);
    }

    #[test]
    fn fill_gaps_table() {
        type Case<'a> = (&'a [Option<f64>], Result<Vec<f64>>);
        let cases: &[Case] = &[
            (&[Some(1.0), None, Some(3.0)], Ok(vec![1.0, 2.0, 3.0])),
            (
                &[None, Some(2.0), None, None, Some(8.0), None],
                Ok(vec![2.0, 2.0, 4.0, 6.0, 8.0, 8.0]),
            ),
            (&[Some(5.0)], Ok(vec![5.0])),
            (&[], Err(Error::NoData)),
            (&[None, None], Err(Error::NoData)),
            (
                &[Some(1.0), Some(f64::INFINITY)],
                Err(Error::NonFiniteValue {
                    index: 1,
                    value: f64::INFINITY,
                }),
            ),
        ];
        for (values, want) in cases {
            assert_eq!(&fill_gaps(values), want, "{values:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any finite series long enough gives ordered, finite bounds.
        #[test]
        fn forecasts_are_finite_and_ordered(
            values in prop::collection::vec(-1e6f64..1e6, 16..60),
            season in prop::option::of(2usize..8),
            trend in any::<bool>(),
        ) {
            let cfg = ForecastConfig { horizon: 5, season_length: season, trend, level: 0.95 };
            let f = forecast(&values, &cfg).unwrap();
            for i in 0..5 {
                prop_assert!(f.point[i].is_finite());
                prop_assert!(f.lower[i] <= f.point[i] && f.point[i] <= f.upper[i]);
            }
            prop_assert!(f.params.alpha > 0.0 && f.params.alpha <= 1.0);
        }
    }
}
