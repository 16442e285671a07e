//! Fixed-point encoding of `f32` vectors in the ring of integers modulo
//! 2^32, the ring secure aggregation masks and sums in.
//!
//! A value is clamped to `[-clip, clip]`, scaled by `2^scale_bits`, rounded
//! to the nearest integer and stored as the two's-complement `u32`. Sums are
//! taken with wrapping addition, so the sum of `n` encodings is the encoding
//! of the sum as long as that sum fits in an `i32`;
//! [`FixedPoint::max_summands`] is the largest `n` for which it always does.

use crate::{Error, Result};

/// The fixed-point encoding a secure-aggregation round uses. Every client and
/// the hub must agree on it, so it travels in the round's parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedPoint {
    /// Number of fractional bits: a value is multiplied by `2^scale_bits`
    /// before rounding, so the resolution is `2^-scale_bits`. At most 24.
    pub scale_bits: u32,
    /// Values are clamped to `[-clip, clip]` before encoding. Finite and
    /// positive.
    pub clip: f32,
}

impl Default for FixedPoint {
    /// 16 fractional bits and a clip of 1.0: a resolution of about 1.5e-5 and
    /// room for 32,767 summands.
    fn default() -> Self {
        FixedPoint {
            scale_bits: 16,
            clip: 1.0,
        }
    }
}

impl FixedPoint {
    /// The largest `scale_bits` [`check`](FixedPoint::check) accepts. Beyond
    /// 24 bits an `f32` has no more precision to keep, and the room left for
    /// summands shrinks for nothing.
    pub const MAX_SCALE_BITS: u32 = 24;

    /// `2^scale_bits` as a float.
    fn scale(&self) -> f64 {
        // `powi` rather than a shift so that an unchecked, absurd
        // `scale_bits` gives a huge float instead of an overflow panic.
        2f64.powi(i32::try_from(self.scale_bits).unwrap_or(i32::MAX))
    }

    /// The resolution of the encoding, `2^-scale_bits`: each encoded value is
    /// within half of it of the clamped input.
    pub fn resolution(&self) -> f64 {
        self.scale().recip()
    }

    /// Encodes `x` value by value. Values are clamped to `[-clip, clip]`;
    /// NaN encodes as zero (callers refuse non-finite updates before they
    /// get here, this only keeps the function total).
    pub fn encode(&self, x: &[f32]) -> Vec<u32> {
        let mut out = vec![0; x.len()];
        self.encode_into(x, &mut out);
        out
    }

    /// Encodes `x` into `out`, which has the same length.
    pub(crate) fn encode_into(&self, x: &[f32], out: &mut [u32]) {
        debug_assert_eq!(x.len(), out.len());
        let scale = self.scale();
        let clip = f64::from(self.clip);
        for (o, &v) in out.iter_mut().zip(x) {
            // `max`/`min` rather than `clamp`, which panics when the bounds
            // are NaN or reversed; `check` is what rejects such a clip.
            let v = if v.is_nan() {
                0.0
            } else {
                f64::from(v).max(-clip).min(clip)
            };
            // The cast to `i64` saturates and the cast to `u32` keeps the low
            // 32 bits, which is the two's-complement encoding we want.
            *o = (v * scale).round() as i64 as u32;
        }
    }

    /// Decodes a wrapping sum of encodings: each word is read as an `i32`
    /// and divided by `2^scale_bits`. The result is a sum, not a mean.
    pub fn decode_sum(&self, sum: &[u32]) -> Vec<f32> {
        let scale = self.scale();
        sum.iter()
            .map(|&w| (f64::from(w as i32) / scale) as f32)
            .collect()
    }

    /// The largest number of vectors whose sum can never overflow an `i32`:
    /// `floor((2^31 - 1) / round(clip · 2^scale_bits))`, the denominator
    /// being the largest magnitude an encoded value can have. Zero when the
    /// clip is not finite and positive.
    pub fn max_summands(&self) -> usize {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return 0;
        }
        let largest = (f64::from(self.clip) * self.scale()).round();
        // A clip so small that every value rounds to zero allows any count;
        // the division then gives infinity, which the cast saturates.
        (f64::from(i32::MAX) / largest).floor() as usize
    }

    /// Checks that the encoding is well formed and that a sum of `n` vectors
    /// cannot overflow.
    pub fn check(&self, n: usize) -> Result<()> {
        if self.scale_bits > Self::MAX_SCALE_BITS {
            return Err(Error::Invalid {
                what: "fixed-point scale_bits",
                reason: format!(
                    "{} exceeds the maximum of {}",
                    self.scale_bits,
                    Self::MAX_SCALE_BITS
                ),
            });
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(Error::Invalid {
                what: "fixed-point clip",
                reason: format!("must be finite and positive, got {}", self.clip),
            });
        }
        let max = self.max_summands();
        if n > max {
            return Err(Error::Invalid {
                what: "fixed-point encoding",
                reason: format!(
                    "a sum of {n} vectors clipped at {} with {} fractional bits could overflow 32 bits, at most {max} fit",
                    self.clip, self.scale_bits
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wrapping_sum(fixed: &FixedPoint, xs: &[Vec<f32>]) -> Vec<u32> {
        let mut sum = vec![0u32; xs[0].len()];
        for x in xs {
            for (s, e) in sum.iter_mut().zip(fixed.encode(x)) {
                *s = s.wrapping_add(e);
            }
        }
        sum
    }

    #[test]
    fn default_is_sixteen_bits_clipped_at_one() {
        let fixed = FixedPoint::default();
        assert_eq!((fixed.scale_bits, fixed.clip), (16, 1.0));
        assert_eq!(fixed.max_summands(), 32_767);
        assert!(fixed.check(32_767).is_ok());
        assert!(matches!(fixed.check(32_768), Err(Error::Invalid { .. })));
    }

    #[test]
    fn encodes_negative_values_in_twos_complement_and_clamps() {
        let fixed = FixedPoint {
            scale_bits: 8,
            clip: 2.0,
        };
        assert_eq!(
            fixed.encode(&[1.0, -1.0, 0.5, 3.0, -7.0, f32::NAN, f32::INFINITY]),
            vec![256, (-256i32) as u32, 128, 512, (-512i32) as u32, 0, 512]
        );
    }

    #[test]
    fn check_refuses_bad_parameters() {
        let bad = [
            FixedPoint {
                scale_bits: 25,
                clip: 1.0,
            },
            FixedPoint {
                scale_bits: 16,
                clip: 0.0,
            },
            FixedPoint {
                scale_bits: 16,
                clip: -1.0,
            },
            FixedPoint {
                scale_bits: 16,
                clip: f32::NAN,
            },
            FixedPoint {
                scale_bits: 16,
                clip: f32::INFINITY,
            },
        ];
        for fixed in bad {
            assert!(
                matches!(fixed.check(1), Err(Error::Invalid { .. })),
                "{fixed:?} accepted"
            );
        }
    }

    #[test]
    fn the_largest_allowed_sum_of_extremes_does_not_wrap() {
        let fixed = FixedPoint {
            scale_bits: 24,
            clip: 1.0,
        };
        let n = fixed.max_summands();
        assert_eq!(n, 127);
        for sign in [1.0f32, -1.0] {
            let xs = vec![vec![sign * 5.0; 3]; n];
            let sum = fixed.decode_sum(&wrapping_sum(&fixed, &xs));
            assert!(sum.iter().all(|&s| s == sign * n as f32), "{sum:?}");
        }
        // One more would wrap, which is why `check` refuses it.
        let xs = vec![vec![1.0f32; 1]; n + 1];
        assert!(fixed.decode_sum(&wrapping_sum(&fixed, &xs))[0] < 0.0);
        assert!(fixed.check(n + 1).is_err());
    }

    #[test]
    fn serde_round_trip_refuses_unknown_fields() {
        let fixed = FixedPoint {
            scale_bits: 12,
            clip: 0.5,
        };
        let json = serde_json::to_string(&fixed).unwrap();
        assert_eq!(serde_json::from_str::<FixedPoint>(&json).unwrap(), fixed);
        assert!(serde_json::from_str::<FixedPoint>(r#"{"scale_bits":1,"clip":1,"x":0}"#).is_err());
    }

    fn fixed_point_and_vectors() -> impl Strategy<Value = (FixedPoint, Vec<Vec<f32>>)> {
        (0u32..=24, 0.01f32..100.0, 1usize..=40, 1usize..=16)
            .prop_filter("the sum must fit", |&(bits, clip, n, _)| {
                FixedPoint {
                    scale_bits: bits,
                    clip,
                }
                .check(n)
                .is_ok()
            })
            .prop_flat_map(|(bits, clip, n, dim)| {
                let fixed = FixedPoint {
                    scale_bits: bits,
                    clip,
                };
                // Values up to twice the clip so that clamping is exercised.
                let value = -2.0 * clip..2.0 * clip;
                (
                    Just(fixed),
                    prop::collection::vec(prop::collection::vec(value, dim), n),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decoded_sum_is_within_n_resolutions_of_the_clamped_sum(
            (fixed, xs) in fixed_point_and_vectors()
        ) {
            let n = xs.len() as f64;
            let decoded = fixed.decode_sum(&wrapping_sum(&fixed, &xs));
            let clip = f64::from(fixed.clip);
            for (j, &got) in decoded.iter().enumerate() {
                let exact: f64 = xs.iter().map(|x| f64::from(x[j]).clamp(-clip, clip)).sum();
                // Each rounding is off by at most half a resolution; the
                // final cast to f32 adds one relative rounding of the sum.
                let tolerance = n * fixed.resolution() + exact.abs() * f64::from(f32::EPSILON);
                prop_assert!(
                    (f64::from(got) - exact).abs() <= tolerance,
                    "coordinate {j}: got {got}, exact {exact}, tolerance {tolerance}"
                );
            }
        }
    }
}
