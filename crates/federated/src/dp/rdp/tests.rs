use super::*;
use proptest::prelude::*;

/// Rounds of `(sampling rate, noise multiplier, steps)`.
type Rounds<'a> = &'a [(f64, f64, u32)];

fn accountant(compositions: &[(f64, f64, u32)]) -> RdpAccountant {
    let mut accountant = RdpAccountant::new();
    for &(q, sigma, steps) in compositions {
        accountant.step(q, sigma, steps);
    }
    accountant
}

fn close(got: f64, want: f64, relative: f64) -> bool {
    (got - want).abs() <= relative * want.abs()
}

/// ε from Google's `dp_accounting` 0.6.0 (`RdpAccountant` with these same
/// integer orders, `PoissonSampledDpEvent` of a `GaussianDpEvent`,
/// `get_epsilon_and_optimal_order`), which implements the same RDP bound and
/// conversion independently (log-binomials by `gammaln`). The second row is
/// the composition in TF Privacy's `rdp_accountant_test`, whose older
/// conversion over fractional orders gave the looser 8.509656.
#[test]
fn matches_dp_accounting() {
    let cases: [(Rounds, f64, f64); 7] = [
        (&[(0.01, 1.1, 10_000)], 1e-5, 5.654_308_000_149_514_5),
        (
            &[(1e-4, 0.4, 40_000), (0.1, 2.0, 100)],
            1e-5,
            8.329_038_372_155_674,
        ),
        (&[(0.05, 0.8, 500)], 1e-6, 15.833_667_081_031_958),
        (&[(1.0, 1.0, 1)], 1e-5, 4.752_728_336_819_822),
        (&[(0.01, 4.0, 10_000)], 1e-5, 1.035_490_066_036_243_6),
        (&[(0.1, 1.0, 100)], 1e-5, 7.972_921_510_380_539),
        (&[(0.001, 0.6, 1000)], 1e-5, 2.611_574_252_703_379),
    ];
    for (compositions, delta, want) in cases {
        let got = accountant(compositions).epsilon(delta);
        assert!(close(got, want, 1e-9), "{compositions:?}: {got} vs {want}");
    }
    // The per-order RDP of one round, from the same library.
    for (alpha, want) in [
        (2, 1.285_100_82e-4),
        (32, 8.469_416_43e-0),
        (512, 2.069_560_66e2),
    ] {
        let got = round_rdp(0.01, 1.1, alpha);
        assert!(close(got, want, 1e-8), "order {alpha}: {got} vs {want}");
    }
}

#[test]
fn small_orders_match_their_closed_forms() {
    for (q, sigma) in [(0.01f64, 1.1f64), (0.3, 0.7), (0.9, 2.0), (1e-6, 0.5)] {
        let e = (1.0 / (sigma * sigma)).exp();
        // A_2 = (1 − q)² + 2q(1 − q) + q² e^(1/σ²) = 1 + q²(e^(1/σ²) − 1).
        let want2 = (q * q * (e - 1.0)).ln_1p();
        assert!(
            close(round_rdp(q, sigma, 2), want2, 1e-9),
            "q {q} σ {sigma}"
        );
        let p = 1.0 - q;
        // A_3 written out term by term, less the binomial weights' sum of 1
        // so that tiny q keeps its precision.
        let a3_minus_1 = 3.0 * p * q * q * (e - 1.0) + q.powi(3) * (e.powi(3) - 1.0);
        let want3 = a3_minus_1.ln_1p() / 2.0;
        assert!(
            close(round_rdp(q, sigma, 3), want3, 1e-9),
            "q {q} σ {sigma}"
        );
    }
}

#[test]
fn full_participation_is_the_gaussian_mechanism() {
    for alpha in ORDERS {
        assert_eq!(round_rdp(1.0, 2.0, alpha), f64::from(alpha) / 8.0);
        // Sampling almost everyone converges to the same value, through the
        // log-space sum rather than the closed form.
        let near = round_rdp(1.0 - 1e-12, 2.0, alpha);
        assert!(
            close(near, f64::from(alpha) / 8.0, 1e-6),
            "order {alpha}: {near}"
        );
    }
}

/// `1 − Φ`-style complementary error function (Numerical Recipes' `erfcc`,
/// relative error below 1.2e-7), enough to evaluate the exact δ below.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The exact δ(ε) of the Gaussian mechanism with sensitivity 1 and
/// `μ = 1/σ` (Balle and Wang 2018, Theorem 8):
/// `Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)`.
fn exact_gaussian_delta(epsilon: f64, mu: f64) -> f64 {
    let phi = |x: f64| 0.5 * erfc(-x / std::f64::consts::SQRT_2);
    phi(mu / 2.0 - epsilon / mu) - epsilon.exp() * phi(-mu / 2.0 - epsilon / mu)
}

/// With full participation, T rounds at noise σ are exactly one Gaussian
/// mechanism with `μ = √T / σ`, whose true privacy curve is known. The RDP
/// ε must be a valid guarantee (the exact δ at that ε is at most the target)
/// and not a wasteful one (within 15% of the exact ε).
#[test]
fn full_participation_is_sound_and_tight_against_the_exact_gaussian_curve() {
    for (sigma, steps, delta) in [
        (1.0, 1, 1e-5),
        (2.0, 1, 1e-5),
        (5.0, 100, 1e-5),
        (3.0, 10, 1e-7),
    ] {
        let epsilon = accountant(&[(1.0, sigma, steps)]).epsilon(delta);
        let mu = f64::from(steps).sqrt() / sigma;
        assert!(
            exact_gaussian_delta(epsilon, mu) <= delta,
            "σ {sigma}: not sound at ε {epsilon}"
        );
        assert!(
            exact_gaussian_delta(epsilon / 1.15, mu) > delta,
            "σ {sigma}: loose ε {epsilon}"
        );
    }
}

#[test]
fn edge_cases() {
    let fresh = RdpAccountant::new();
    assert_eq!(fresh.epsilon(1e-5), 0.0);
    assert_eq!(fresh.rounds(), 0);
    let spent = accountant(&[(0.1, 1.0, 10)]);
    assert_eq!(spent.epsilon(1.0), 0.0);
    assert_eq!(spent.epsilon(0.0), f64::INFINITY);
    assert_eq!(accountant(&[(0.1, 0.0, 1)]).epsilon(1e-5), f64::INFINITY);
    assert_eq!(accountant(&[(0.0, 1.0, 1000)]).epsilon(1e-5), 0.0);
    // Tiny σ drives the exponents of the large orders far past f64's range;
    // the log-space sum must stay finite and the small orders win.
    let noisy = accountant(&[(0.01, 0.3, 10)]).epsilon(1e-5);
    assert!(noisy.is_finite() && noisy > 0.0, "{noisy}");
}

#[test]
fn history_merges_runs_and_survives_serde() {
    let mut a = RdpAccountant::new();
    a.step(0.01, 1.1, 3);
    a.step(0.01, 1.1, 2);
    a.step(0.02, 1.1, 1);
    a.step(0.01, 1.1, 0);
    assert_eq!(a.rounds(), 6);
    assert_eq!(
        a.history(),
        [
            Composition {
                sampling_rate: 0.01,
                noise_multiplier: 1.1,
                steps: 5
            },
            Composition {
                sampling_rate: 0.02,
                noise_multiplier: 1.1,
                steps: 1
            },
        ]
    );
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(
        json,
        r#"{"history":[{"sampling_rate":0.01,"noise_multiplier":1.1,"steps":5},{"sampling_rate":0.02,"noise_multiplier":1.1,"steps":1}]}"#
    );
    let back: RdpAccountant = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    assert!(close(back.epsilon(1e-5), a.epsilon(1e-5), 1e-12));
    let bad = r#"{"history":[{"sampling_rate":1.5,"noise_multiplier":1.1,"steps":5}]}"#;
    assert!(serde_json::from_str::<RdpAccountant>(bad).is_err());
    assert!(serde_json::from_str::<RdpAccountant>(r#"{"history":[],"extra":1}"#).is_err());
}

#[test]
fn the_budget_refuses_the_round_that_would_exceed_it() {
    let config = DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.1,
        target_delta: 1e-5,
        epsilon_budget: 2.0,
    };
    let mut a = RdpAccountant::new();
    let mut rounds = 0;
    while let Ok(epsilon) = a.check_next_round(&config, 0.01) {
        assert_eq!(epsilon, a.epsilon_after(0.01, 1.1, 1e-5));
        a.step(0.01, 1.1, 1);
        assert_eq!(a.epsilon(1e-5), epsilon);
        rounds += 1;
        assert!(rounds < 100_000, "the budget never ran out");
    }
    assert!(a.epsilon(1e-5) <= 2.0);
    let Err(Error::BudgetExceeded {
        epsilon,
        delta,
        budget,
    }) = a.check_next_round(&config, 0.01)
    else {
        panic!("expected the budget to be exceeded");
    };
    assert!(epsilon > 2.0 && delta == 1e-5 && budget == 2.0);
    // Asking does not spend.
    assert_eq!(a.rounds(), rounds);
    assert!(matches!(
        a.check_next_round(&config, 1.5),
        Err(Error::Invalid { .. })
    ));
    let broken = DpConfig {
        target_delta: 0.0,
        ..config
    };
    assert!(matches!(
        a.check_next_round(&broken, 0.01),
        Err(Error::Invalid { .. })
    ));
}

#[test]
#[should_panic(expected = "sampling rate")]
fn stepping_an_impossible_rate_is_a_bug() {
    RdpAccountant::new().step(1.5, 1.0, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn epsilon_grows_with_steps_and_rate_and_falls_with_noise(
        q in 0.001f64..0.5,
        sigma in 0.5f64..5.0,
        steps in 1u32..2000,
        delta_exp in 3i32..10,
    ) {
        let delta = 10f64.powi(-delta_exp);
        let eps = |q, sigma, steps| accountant(&[(q, sigma, steps)]).epsilon(delta);
        let base = eps(q, sigma, steps);
        prop_assert!(base.is_finite() && base >= 0.0);
        prop_assert!(eps(q, sigma, steps * 2) >= base);
        prop_assert!(eps((q * 1.5).min(1.0), sigma, steps) >= base);
        prop_assert!(eps(q, sigma * 1.5, steps) <= base);
        // A smaller δ is a stronger claim and costs more ε.
        prop_assert!(accountant(&[(q, sigma, steps)]).epsilon(delta / 10.0) >= base);
        // Composition is additive: stepping in two parts is stepping once.
        let split = accountant(&[(q, sigma, steps), (q, sigma, steps)]).epsilon(delta);
        prop_assert!(close(split, eps(q, sigma, steps * 2), 1e-12));
    }
}
