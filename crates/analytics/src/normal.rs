//! The standard normal distribution: the two-sided tail probability for the
//! Mann-Kendall test, and the quantile for prediction intervals and for the
//! simulator's "a little is enough" attack.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// `P(|Z| >= |z|)` for a standard normal `Z`.
pub(crate) fn two_sided_p(z: f64) -> f64 {
    // erfc keeps full relative precision far in the tail, where 1 - cdf
    // would cancel to 0.
    libm::erfc(z.abs() * FRAC_1_SQRT_2).clamp(0.0, 1.0)
}

/// The cumulative distribution function.
fn cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

/// The quantile function (inverse cdf) for `p` in (0, 1): Acklam's rational
/// approximation (relative error below 1.2e-9), polished by one Halley step.
/// `p` outside (0, 1) is a caller's bug.
pub fn quantile(p: f64) -> f64 {
    debug_assert!(p > 0.0 && p < 1.0);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let x = if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let e = cdf(x) - p;
    let u = e * (2.0 * PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // (p, quantile) from standard tables.
        let cases = [
            (0.5, 0.0),
            (0.9, 1.281_551_565_544_601),
            (0.975, 1.959_963_984_540_054),
            (0.995, 2.575_829_303_548_901),
            (0.01, -2.326_347_874_040_841),
            (1e-6, -4.753_424_308_822_899),
        ];
        for (p, z) in cases {
            assert!(
                (quantile(p) - z).abs() < 1e-9,
                "quantile({p}) = {}",
                quantile(p)
            );
        }
        let tails = [
            (0.0, 1.0),
            (1.959_963_984_540_054, 0.05),
            (-2.575_829_303_548_901, 0.01),
        ];
        for (z, p) in tails {
            assert!((two_sided_p(z) - p).abs() < 1e-12, "two_sided_p({z})");
        }
    }

    proptest::proptest! {
        #[test]
        fn quantile_is_odd_and_increasing(p in 1e-12f64..0.5, dp in 1e-7f64..0.1) {
            let x = quantile(p);
            proptest::prop_assert!((x + quantile(1.0 - p)).abs() < 1e-6 * x.abs().max(1.0));
            proptest::prop_assert!(quantile((p + dp).min(0.999_999)) > x);
        }
    }
}
