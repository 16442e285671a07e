//! Choosing the next token from the logits, and its log-probability.
//!
//! Sampling runs in Rust on the logits llama.cpp returns, rather than in
//! llama.cpp's sampler chain, because the log-probabilities the API reports
//! have to be computed on those same logits anyway, and because a seeded
//! ChaCha stream makes a sampled answer reproducible across platforms.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How the next token is chosen.
///
/// The default is OpenAI's: temperature 1, no top-k, top-p 1, a random seed.
/// A temperature of 0 means greedy decoding (the most likely token, always).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 for greedy decoding. Accepted range 0 to 2.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probability adds up to at least `top_p`; 1 keeps all. Range (0, 1].
    pub top_p: f32,
    /// Seed of the random stream; `None` draws one from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every field against its accepted range.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(Error::InvalidParameter {
                name: "temperature",
                value: self.temperature.to_string(),
                expected: "0 to 2",
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidParameter {
                name: "top_p",
                value: self.top_p.to_string(),
                expected: "greater than 0, at most 1",
            });
        }
        Ok(())
    }
}

/// A token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// Natural log of the token's probability under the model (temperature 1,
    /// before any top-k/top-p filtering).
    pub logprob: f32,
}

/// The sampler of one generation.
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch space reused between tokens.
    scratch: Vec<(f32, u32)>,
}

/// How many candidates a partial sort looks at before falling back to a full one.
const NUCLEUS_WINDOW: usize = 256;

impl Sampler {
    pub(crate) fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// Chooses the next token from `logits`.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        if cands.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);

        // Keep the top-k (or, for nucleus sampling, a window of likely
        // candidates) without sorting the whole vocabulary.
        let k = p.top_k as usize;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }
        let max = cands.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += f64::from(c.0);
        }

        if p.top_p < 1.0 {
            let target = f64::from(p.top_p) * total;
            let sorted_prefix = |cands: &mut Vec<(f32, u32)>, n: usize| -> Option<usize> {
                if n < cands.len() {
                    cands.select_nth_unstable_by(n - 1, by_logit_desc);
                }
                let n = n.min(cands.len());
                cands[..n].sort_unstable_by(by_logit_desc);
                let mut acc = 0.0f64;
                for (i, c) in cands[..n].iter().enumerate() {
                    acc += f64::from(c.0);
                    if acc >= target {
                        return Some(i + 1);
                    }
                }
                None
            };
            let keep = match sorted_prefix(cands, NUCLEUS_WINDOW) {
                Some(n) => n,
                None => sorted_prefix(cands, cands.len()).unwrap_or(cands.len()),
            };
            cands.truncate(keep.max(1));
            total = cands.iter().map(|c| f64::from(c.0)).sum();
        }

        let mut u = self.rng.random::<f64>() * total;
        for c in cands.iter() {
            u -= f64::from(c.0);
            if u <= 0.0 {
                return c.1;
            }
        }
        // Rounding can leave a sliver; the last candidate takes it.
        cands.last().map_or_else(|| argmax(logits), |c| c.1)
    }
}

/// The index of the largest logit (the lowest index on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    // The maximum in lanes (vectorised), then the first index holding it.
    let max = max_of(logits);
    logits
        .iter()
        .position(|&l| l == max)
        .map_or(0, |i| i as u32)
}

/// Lanes of the vectorised reductions below.
const LANES: usize = 16;

/// The largest value (`-inf` for none; NaNs are ignored).
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// `e^x` for `x ≤ 0`, to about 2e-7 relative: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r`, and `2^n` built in
/// the exponent bits. Branch-free, so that a loop over it vectorises (the
/// library `expf` is a call per value).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n ≥ -126 here, so the biased exponent is a normal one.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `log Σ exp(logits)`, computed stably.
pub(crate) fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_of(logits);
    if !max.is_finite() {
        return max;
    }
    // Each term is at most 1; sixteen partial sums keep the rounding error
    // of 49,152 terms far below what a log-probability shows.
    let mut lanes = [0f32; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &l) in lanes.iter_mut().zip(chunk) {
            *s += exp_nonpositive(l - max);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&l| f64::from(exp_nonpositive(l - max)))
        .sum();
    let sum = lanes.iter().map(|&s| f64::from(s)).sum::<f64>() + tail;
    max + sum.ln() as f32
}

/// The `n` most likely tokens with their log-probabilities, most likely first.
pub(crate) fn top_logprobs(logits: &[f32], lse: f32, n: usize) -> Vec<TokenLogprob> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit_desc);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by_logit_desc);
    idx.into_iter()
        .map(|t| TokenLogprob {
            token: t,
            logprob: logits[t as usize] - lse,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_direct_formula() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let lse = log_sum_exp(&logits);
        let direct: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((lse - direct).abs() < 1e-5);
        let probs: f32 = logits.iter().map(|l| (l - lse).exp()).sum();
        assert!((probs - 1.0).abs() < 1e-5);
        let top = top_logprobs(&logits, lse, 2);
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![2, 1]);
        assert!((top[0].logprob - (3.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn fast_exp_and_log_sum_exp_match_f64() {
        for i in 0..=17_000 {
            let x = -(i as f32) * 0.005;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            assert!(
                (got - want).abs() <= 3e-7 * want + 1e-38,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_nonpositive(-200.0), exp_nonpositive(-87.0));
        // A vocabulary-sized vector with a tail that does not fill a lane.
        let logits: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919) % 1000) as f32 / 40.0 - 12.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want = f64::from(max)
            + logits
                .iter()
                .map(|&l| (f64::from(l) - f64::from(max)).exp())
                .sum::<f64>()
                .ln();
        let got = log_sum_exp(&logits);
        assert!((f64::from(got) - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        let mut peak = logits.clone();
        peak[49_156] = 100.0;
        assert_eq!(argmax(&peak), 49_156);
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 5.0, 5.0, -2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_is_respected() {
        // A permutation of 0..1000: distinct logits, so the top 5 are well defined.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 1000) as f32 / 100.0)
            .collect();
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 5,
            top_p: 1.0,
            seed: Some(7),
        };
        let mut top5: Vec<u32> = (0..1000u32).collect();
        top5.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        top5.truncate(5);
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|t| top5.contains(t)), "{a:?} outside {top5:?}");
        // More than one distinct token: it is really sampling.
        assert!(a.iter().any(|t| *t != a[0]));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds ~88% of the mass; top_p 0.5 keeps only it.
        let mut logits = vec![0.0f32; 10_000];
        logits[42] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: Some(1),
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 42);
        }
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
