//! Latency estimates: an exponentially weighted moving average (EWMA) of a
//! tier's time to first token and of its time per further token, learned
//! from the requests it served. Keep one [`LatencyModel`] per tier and put
//! its [`estimate_ms`](LatencyModel::estimate_ms) for the request at hand
//! into [`crate::TierState::latency_ms`].

use crate::Error;

/// The default smoothing factor: each observation moves the estimate a
/// fifth of the way.
pub const DEFAULT_ALPHA: f64 = 0.2;

/// A tier's latency estimate; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    alpha: f64,
    ttft_ms: Option<f64>,
    ms_per_token: Option<f64>,
}

impl Default for LatencyModel {
    /// No observations, smoothing [`DEFAULT_ALPHA`].
    fn default() -> Self {
        LatencyModel {
            alpha: DEFAULT_ALPHA,
            ttft_ms: None,
            ms_per_token: None,
        }
    }
}

fn ewma(old: Option<f64>, new: f64, alpha: f64) -> f64 {
    match old {
        Some(old) => old + alpha * (new - old),
        None => new,
    }
}

impl LatencyModel {
    /// A model with smoothing factor `alpha` in `(0, 1]`: the weight of the
    /// newest observation (1 keeps only the last one).
    pub fn new(alpha: f64) -> Result<LatencyModel, Error> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::Smoothing(alpha));
        }
        Ok(LatencyModel {
            alpha,
            ..LatencyModel::default()
        })
    }

    /// The smoothing factor.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Learns from a served request: `ttft_ms` until the first token,
    /// `tokens` generated in all, `total_ms` until the last. The first
    /// token arrives at `ttft_ms`, so the time per token is
    /// `(total_ms - ttft_ms) / (tokens - 1)`, learned only from requests
    /// with at least two tokens (an embedding, 0 tokens, teaches only the
    /// time to first result). Observations that are negative, not finite,
    /// or end before their first token are ignored.
    pub fn observe(&mut self, ttft_ms: f64, tokens: u32, total_ms: f64) {
        if !(ttft_ms.is_finite() && ttft_ms >= 0.0) {
            return;
        }
        if tokens >= 2 {
            if !(total_ms.is_finite() && total_ms >= ttft_ms) {
                return;
            }
            let per_token = (total_ms - ttft_ms) / f64::from(tokens - 1);
            self.ms_per_token = Some(ewma(self.ms_per_token, per_token, self.alpha));
        }
        self.ttft_ms = Some(ewma(self.ttft_ms, ttft_ms, self.alpha));
    }

    /// The estimated time to generate `max_tokens` tokens, in milliseconds:
    /// time to first token plus time per token for the rest. `None` before
    /// the first observation, and for more than one token before the first
    /// observation with at least two tokens.
    pub fn estimate_ms(&self, max_tokens: u32) -> Option<f64> {
        let ttft = self.ttft_ms?;
        if max_tokens <= 1 {
            return Some(ttft);
        }
        Some(ttft + self.ms_per_token? * f64::from(max_tokens - 1))
    }

    /// The estimated time to first token, in milliseconds.
    pub fn ttft_ms(&self) -> Option<f64> {
        self.ttft_ms
    }

    /// The estimated time per token after the first, in milliseconds.
    pub fn ms_per_token(&self) -> Option<f64> {
        self.ms_per_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn no_estimate_before_the_first_observation() {
        let m = LatencyModel::default();
        assert_eq!(m.estimate_ms(0), None);
        assert_eq!(m.estimate_ms(100), None);
        assert_eq!(m.alpha(), DEFAULT_ALPHA);
    }

    #[test]
    fn the_first_observation_is_the_estimate() {
        let mut m = LatencyModel::default();
        // 100 ms to the first token, then 10 more tokens at 20 ms each.
        m.observe(100.0, 11, 300.0);
        assert!(close(m.ttft_ms(), 100.0));
        assert!(close(m.ms_per_token(), 20.0));
        assert!(close(m.estimate_ms(1), 100.0));
        assert!(close(m.estimate_ms(51), 1100.0));
    }

    #[test]
    fn later_observations_move_the_estimate_by_alpha() {
        let mut m = LatencyModel::new(0.5).unwrap();
        m.observe(100.0, 11, 300.0);
        m.observe(200.0, 11, 600.0);
        assert!(close(m.ttft_ms(), 150.0));
        assert!(close(m.ms_per_token(), 30.0));
        let mut last_only = LatencyModel::new(1.0).unwrap();
        last_only.observe(100.0, 2, 110.0);
        last_only.observe(50.0, 2, 55.0);
        assert!(close(last_only.estimate_ms(3), 60.0));
    }

    #[test]
    fn embeddings_teach_only_the_time_to_first_result() {
        let mut m = LatencyModel::default();
        m.observe(12.0, 0, 12.0);
        assert!(close(m.estimate_ms(0), 12.0));
        assert_eq!(m.estimate_ms(10), None);
    }

    #[test]
    fn nonsense_observations_are_ignored() {
        let mut m = LatencyModel::default();
        m.observe(f64::NAN, 5, 10.0);
        m.observe(-1.0, 5, 10.0);
        m.observe(10.0, 5, 5.0);
        m.observe(10.0, 5, f64::INFINITY);
        assert_eq!(m.ttft_ms(), None);
        assert_eq!(m.ms_per_token(), None);
    }

    #[test]
    fn smoothing_must_be_in_range() {
        for alpha in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(LatencyModel::new(alpha).is_err(), "{alpha}");
        }
        assert_eq!(
            LatencyModel::new(2.0).unwrap_err().to_string(),
            "latency smoothing factor 2 must be greater than 0 and at most 1"
        );
    }
}
