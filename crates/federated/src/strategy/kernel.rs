//! The inner loops every strategy spends its time in, written so that the
//! compiler vectorises them: fixed-width lanes of independent `f32`
//! accumulators (the compiler may not reorder one running float sum, but it
//! may keep sixteen in a vector register), folded into `f64` after every
//! group of 1,024 values so that long vectors lose no precision.

/// Independent accumulators per kernel: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// Values per group: each lane adds `GROUP / LANES` terms in `f32` before the
/// group's total moves to `f64`, which bounds the relative rounding error of
/// a group to about 64 ulp.
const GROUP: usize = 1024;

/// `a · b + c`, fused where the target has a fused multiply-add (one rounding
/// and one instruction) and as two operations elsewhere, because without the
/// instruction `mul_add` is a slow library call.
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(any(target_feature = "fma", target_arch = "aarch64"))]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(any(target_feature = "fma", target_arch = "aarch64")))]
    {
        a * b + c
    }
}

/// The index of the first value that is infinite or NaN, if any.
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    // The exponent field is all ones exactly for infinities and NaNs. Taking
    // the maximum exponent of a block vectorises, unlike a short-circuiting
    // `all(is_finite)`, so the common all-finite case costs one fast pass.
    const EXPONENT: u32 = 0x7f80_0000;
    for (block, values) in x.chunks(GROUP).enumerate() {
        let max_exponent = values
            .iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & EXPONENT));
        if max_exponent == EXPONENT {
            let offset = values.iter().position(|v| !v.is_finite())?;
            return Some(block * GROUP + offset);
        }
    }
    None
}

/// `Σ x²`, accumulated in `f64` so that neither large values overflow nor
/// long vectors lose precision; used for norms, which are one cheap pass.
pub(crate) fn sum_of_squares(x: &[f32]) -> f64 {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let mut acc = [0.0f64; LANES];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            let v = f64::from(v);
            *a += v * v;
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ a · b` over the common length, accumulated in `f64` like
/// [`sum_of_squares`].
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let len = a.len().min(b.len());
    let (a_chunks, a_rest) = a[..len].as_chunks::<LANES>();
    let (b_chunks, b_rest) = b[..len].as_chunks::<LANES>();
    let mut acc = [0.0f64; LANES];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for lane in 0..LANES {
            acc[lane] += f64::from(x[lane]) * f64::from(y[lane]);
        }
    }
    let tail: f64 = a_rest
        .iter()
        .zip(b_rest)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `‖a − b‖²` for vectors of equal length.
pub(crate) fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    a.chunks(GROUP)
        .zip(b.chunks(GROUP))
        .map(|(a, b)| {
            // Two registers' worth of lanes: a fused multiply-add takes four
            // cycles to produce its result, so a single accumulator register
            // would leave the unit idle waiting on itself.
            let (a_chunks, a_rest) = a.as_chunks::<{ 2 * LANES }>();
            let (b_chunks, b_rest) = b.as_chunks::<{ 2 * LANES }>();
            let mut acc = [0.0f32; 2 * LANES];
            for (x, y) in a_chunks.iter().zip(b_chunks) {
                for lane in 0..2 * LANES {
                    let d = x[lane] - y[lane];
                    acc[lane] = mul_add(d, d, acc[lane]);
                }
            }
            lanes_sum(&acc) + tail_distance(a_rest, b_rest)
        })
        .sum()
}

/// `‖a − b_k‖²` for four vectors `b_k` at once. Each value of `a` is loaded
/// once for four distances, and the four accumulators are independent, so
/// this runs about twice as fast per pair as [`squared_distance`].
pub(crate) fn squared_distances_x4(a: &[f32], b: [&[f32]; 4]) -> [f64; 4] {
    debug_assert!(b.iter().all(|b| b.len() == a.len()));
    let mut total = [0.0f64; 4];
    for (start, a) in (0..a.len()).step_by(GROUP).zip(a.chunks(GROUP)) {
        let end = start + a.len();
        let (a_chunks, a_rest) = a.as_chunks::<LANES>();
        let (b0, r0) = b[0][start..end].as_chunks::<LANES>();
        let (b1, r1) = b[1][start..end].as_chunks::<LANES>();
        let (b2, r2) = b[2][start..end].as_chunks::<LANES>();
        let (b3, r3) = b[3][start..end].as_chunks::<LANES>();
        // Four separate accumulators rather than an array of four: the
        // compiler keeps these in registers and vectorises the loop, which it
        // does not for the nested array.
        let (mut acc0, mut acc1, mut acc2, mut acc3) =
            ([0.0f32; LANES], [0.0; LANES], [0.0; LANES], [0.0; LANES]);
        // Zipped iterators rather than indexing, so that no bounds check
        // sits in the loop.
        for ((((x, y0), y1), y2), y3) in a_chunks.iter().zip(b0).zip(b1).zip(b2).zip(b3) {
            for lane in 0..LANES {
                let x = x[lane];
                let d0 = x - y0[lane];
                acc0[lane] = mul_add(d0, d0, acc0[lane]);
                let d1 = x - y1[lane];
                acc1[lane] = mul_add(d1, d1, acc1[lane]);
                let d2 = x - y2[lane];
                acc2[lane] = mul_add(d2, d2, acc2[lane]);
                let d3 = x - y3[lane];
                acc3[lane] = mul_add(d3, d3, acc3[lane]);
            }
        }
        for (k, (acc, rest)) in [(acc0, r0), (acc1, r1), (acc2, r2), (acc3, r3)]
            .into_iter()
            .enumerate()
        {
            total[k] += lanes_sum(&acc) + tail_distance(a_rest, rest);
        }
    }
    total
}

/// The sum of one group's lane accumulators, in `f64`.
#[inline(always)]
fn lanes_sum(acc: &[f32]) -> f64 {
    acc.iter().map(|&v| f64::from(v)).sum()
}

/// `‖a − b‖²` of the few values left over after the full lanes.
#[inline(always)]
fn tail_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_distance(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum()
    }

    fn vector(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    #[test]
    fn distances_match_the_naive_sum_for_every_tail_length() {
        for len in [0, 1, 15, 16, 17, 1023, 1024, 1025, 3000] {
            let a = vector(len, 1);
            let bs = [
                vector(len, 2),
                vector(len, 3),
                vector(len, 4),
                vector(len, 5),
            ];
            let x4 = squared_distances_x4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
            for (b, got4) in bs.iter().zip(x4) {
                let want = naive_distance(&a, b);
                let got = squared_distance(&a, b);
                assert!(
                    (got - want).abs() <= 1e-5 * want.max(1e-9),
                    "len {len}: {got} vs {want}"
                );
                assert!(
                    (got4 - want).abs() <= 1e-5 * want.max(1e-9),
                    "len {len}: {got4} vs {want}"
                );
            }
        }
    }

    #[test]
    fn sum_of_squares_does_not_overflow_for_large_values() {
        let x = vec![1e30f32; 33];
        let want = 33.0 * 1e30f64 * 1e30f64;
        let got = sum_of_squares(&x);
        assert!((got / want - 1.0).abs() < 1e-6, "{got}");
    }

    #[test]
    fn finds_the_first_non_finite_value() {
        let mut x = vec![1.0f32; 5000];
        assert_eq!(first_non_finite(&x), None);
        x[4097] = f32::NAN;
        x[4999] = f32::INFINITY;
        assert_eq!(first_non_finite(&x), Some(4097));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&x), Some(3));
        assert_eq!(
            first_non_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE]),
            None
        );
    }
}
