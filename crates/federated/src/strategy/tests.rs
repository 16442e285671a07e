use super::*;
use proptest::prelude::{
    Just, ProptestConfig, prop, prop_assert, prop_assert_eq, prop_assume, prop_oneof, proptest,
};
use proptest::strategy::Strategy as _;

// ----- Naive references, written for obviousness rather than speed. -----

fn naive_weighted_mean(rows: &[Vec<f32>], weights: &[f32]) -> Vec<f64> {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let dim = rows[0].len();
    (0..dim)
        .map(|c| {
            if total > 0.0 {
                rows.iter()
                    .zip(weights)
                    .map(|(r, &w)| f64::from(w) * f64::from(r[c]))
                    .sum::<f64>()
                    / total
            } else {
                rows.iter().map(|r| f64::from(r[c])).sum::<f64>() / rows.len() as f64
            }
        })
        .collect()
}

fn sorted_column(rows: &[Vec<f32>], c: usize) -> Vec<f64> {
    let mut column: Vec<f64> = rows.iter().map(|r| f64::from(r[c])).collect();
    column.sort_by(f64::total_cmp);
    column
}

/// numpy's `median(axis=0)`.
fn naive_median(rows: &[Vec<f32>]) -> Vec<f64> {
    (0..rows[0].len())
        .map(|c| {
            let column = sorted_column(rows, c);
            let n = column.len();
            if n % 2 == 1 {
                column[n / 2]
            } else {
                (column[n / 2 - 1] + column[n / 2]) / 2.0
            }
        })
        .collect()
}

/// scipy's `trim_mean(axis=0)`, which cuts `int(beta · n)` at each end.
fn naive_trimmed_mean(rows: &[Vec<f32>], cut: usize) -> Vec<f64> {
    (0..rows[0].len())
        .map(|c| {
            let column = sorted_column(rows, c);
            let kept = &column[cut..column.len() - cut];
            kept.iter().sum::<f64>() / kept.len() as f64
        })
        .collect()
}

fn naive_krum_scores(rows: &[Vec<f32>], f: usize) -> Vec<f64> {
    let n = rows.len();
    let distance = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum()
    };
    (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distance(&rows[i], &rows[j]))
                .collect();
            d.sort_by(f64::total_cmp);
            d[..n - f - 2].iter().sum()
        })
        .collect()
}

fn slices<'a>(rows: &'a [Vec<f32>], weights: &[f32]) -> Vec<(&'a [f32], f32)> {
    rows.iter()
        .map(Vec::as_slice)
        .zip(weights.iter().copied())
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len());
    for (c, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= tolerance * w.abs().max(1.0),
            "coordinate {c}: {g} vs {w}"
        );
    }
}

/// `n` rows of `dim` values and `n` weights, some of them zero.
fn round(
    max_n: usize,
    max_dim: usize,
) -> impl proptest::strategy::Strategy<Value = (Vec<Vec<f32>>, Vec<f32>)> {
    (1..=max_n, 1..=max_dim).prop_flat_map(|(n, dim)| {
        (
            prop::collection::vec(prop::collection::vec(-100.0f32..100.0, dim), n),
            prop::collection::vec(prop_oneof![Just(0.0f32), 0.0f32..50.0], n),
        )
    })
}

/// Deterministic pseudo-random values in [-1, 1) for the larger cases.
fn noise(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            (0..dim)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        })
        .collect()
}

// ----- Properties against the references. -----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn fedavg_is_the_weighted_mean((rows, weights) in round(12, 40)) {
        let dim = rows[0].len();
        for strategy in [Strategy::FedAvg, Strategy::FedProx { mu: 0.01 }] {
            let out = aggregate(&strategy, dim, &slices(&rows, &weights)).unwrap();
            assert_close(&out.delta, &naive_weighted_mean(&rows, &weights), 1e-6);
            prop_assert_eq!(out.used, rows.len());
            prop_assert!(out.excluded.is_empty());
        }
    }

    #[test]
    fn median_matches_the_sorting_reference((rows, weights) in round(15, 40)) {
        let out = aggregate(&Strategy::Median { mixing: None }, rows[0].len(), &slices(&rows, &weights)).unwrap();
        assert_close(&out.delta, &naive_median(&rows), 1e-7);
        prop_assert_eq!(out.used, rows.len());
    }

    #[test]
    fn trimmed_mean_matches_the_sorting_reference_and_stays_in_range(
        (rows, weights) in round(15, 40),
        beta in 0.0f32..0.5,
    ) {
        let strategy = Strategy::TrimmedMean { beta, mixing: None };
        let out = aggregate(&strategy, rows[0].len(), &slices(&rows, &weights)).unwrap();
        let cut = coordinate::trim_count(beta, rows.len());
        prop_assert!(2 * cut < rows.len());
        assert_close(&out.delta, &naive_trimmed_mean(&rows, cut), 1e-6);
        for (c, &value) in out.delta.iter().enumerate() {
            let column = sorted_column(&rows, c);
            prop_assert!(column[0] as f32 <= value && value <= *column.last().unwrap() as f32);
        }
    }

    /// Replacing fewer than half of the updates with anything at all keeps
    /// every coordinate of the median within the honest values' range.
    #[test]
    fn median_is_robust_to_a_minority(
        (mut rows, weights) in round(15, 20),
        attack in prop::collection::vec(prop_oneof![-1e30f32..1e30, Just(1e30f32), Just(-1e30f32)], 20),
    ) {
        let n = rows.len();
        let attackers = (n - 1) / 2;
        let honest = rows[attackers..].to_vec();
        for (k, row) in rows[..attackers].iter_mut().enumerate() {
            for (c, value) in row.iter_mut().enumerate() {
                *value = attack[(c + k) % attack.len()];
            }
        }
        let out = aggregate(&Strategy::Median { mixing: None }, rows[0].len(), &slices(&rows, &weights)).unwrap();
        for (c, &value) in out.delta.iter().enumerate() {
            let column = sorted_column(&honest, c);
            prop_assert!(column[0] as f32 <= value && value <= *column.last().unwrap() as f32,
                "coordinate {} = {} outside the honest range {:?}", c, value, column);
        }
    }

    #[test]
    fn multi_krum_matches_the_naive_reference(
        (rows, weights) in round(14, 30),
        f in 0usize..4,
        keep in 0usize..6,
    ) {
        let n = rows.len();
        prop_assume!(n > 2 * f + 2 && keep + f <= n);
        let strategy = Strategy::MultiKrum { byzantine: f, keep };
        let out = aggregate(&strategy, rows[0].len(), &slices(&rows, &weights)).unwrap();

        let want = naive_krum_scores(&rows, f);
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let got = krum::scores(&refs, n - f - 2);
        for (g, w) in got.iter().zip(&want) {
            prop_assert!((g - w).abs() <= 1e-5 * w.max(1e-3), "score {} vs {}", g, w);
        }
        let m = if keep == 0 { n - f } else { keep };
        prop_assert_eq!(out.used, m);
        prop_assert_eq!(out.excluded.len(), n - m);
        // Which updates are kept is only checked when no near-tie at the
        // cut makes the choice depend on rounding.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| want[a].total_cmp(&want[b]).then(a.cmp(&b)));
        let clear_cut = m == n || want[order[m]] - want[order[m - 1]] > 1e-4 * want[order[m]];
        if clear_cut {
            let mut kept = order[..m].to_vec();
            kept.sort_unstable();
            let mut excluded = order[m..].to_vec();
            excluded.sort_unstable();
            prop_assert_eq!(&out.excluded, &excluded);
            let kept_rows: Vec<Vec<f32>> = kept.iter().map(|&i| rows[i].clone()).collect();
            let kept_weights: Vec<f32> = kept.iter().map(|&i| weights[i]).collect();
            assert_close(&out.delta, &naive_weighted_mean(&kept_rows, &kept_weights), 1e-6);
        }
    }
}

// ----- Large rounds, which take the blocked and threaded paths. -----

#[test]
fn large_rounds_match_the_references() {
    // 40 × 20,000 crosses the thresholds for threads in both the coordinate
    // strategies and the pairwise distances, and spans several blocks.
    let (n, dim) = (40, 20_003);
    let rows = noise(n, dim, 11);
    let weights: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let input = slices(&rows, &weights);

    let median = aggregate(&Strategy::Median { mixing: None }, dim, &input).unwrap();
    assert_close(&median.delta, &naive_median(&rows), 1e-7);
    let trimmed = aggregate(
        &Strategy::TrimmedMean {
            beta: 0.1,
            mixing: None,
        },
        dim,
        &input,
    )
    .unwrap();
    assert_close(&trimmed.delta, &naive_trimmed_mean(&rows, 4), 1e-6);
    let fedavg = aggregate(&Strategy::FedAvg, dim, &input).unwrap();
    assert_close(&fedavg.delta, &naive_weighted_mean(&rows, &weights), 1e-6);

    let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
    let got = krum::scores(&refs, n - 3 - 2);
    for (g, w) in got.iter().zip(naive_krum_scores(&rows, 3)) {
        assert!((g - w).abs() <= 1e-6 * w, "score {g} vs {w}");
    }
}

#[test]
fn multi_krum_excludes_planted_far_updates() {
    let (n, dim) = (12, 500);
    let mut rows: Vec<Vec<f32>> = noise(n, dim, 5)
        .into_iter()
        .map(|r| r.into_iter().map(|v| 1.0 + 0.1 * v).collect())
        .collect();
    // Two colluding attackers send the same far-away update: they are each
    // other's nearest neighbour, but Krum sums over n − f − 2 neighbours,
    // which must include honest ones.
    rows[4] = vec![30.0; dim];
    rows[9] = vec![30.0; dim];
    let weights = vec![1.0; n];
    let out = aggregate(
        &Strategy::MultiKrum {
            byzantine: 2,
            keep: 0,
        },
        dim,
        &slices(&rows, &weights),
    )
    .unwrap();
    assert_eq!(out.excluded, [4, 9]);
    assert_eq!(out.used, 10);
    assert!(out.delta.iter().all(|&v| (0.9..=1.1).contains(&v)));

    let one = aggregate(
        &Strategy::MultiKrum {
            byzantine: 2,
            keep: 1,
        },
        dim,
        &slices(&rows, &weights),
    )
    .unwrap();
    assert_eq!(one.used, 1);
    assert!(!one.excluded.contains(&usize::MAX) && one.excluded.len() == 11);
    assert!(one.excluded.contains(&4) && one.excluded.contains(&9));
}

#[test]
fn trimmed_mean_drops_outliers_at_both_ends() {
    let rows: Vec<Vec<f32>> = [-1000.0, 1.0, 2.0, 3.0, 1000.0]
        .iter()
        .map(|&v| vec![v, v * 2.0])
        .collect();
    let weights = [1.0; 5];
    let out = aggregate(
        &Strategy::TrimmedMean {
            beta: 0.2,
            mixing: None,
        },
        2,
        &slices(&rows, &weights),
    )
    .unwrap();
    assert_eq!(out.delta, [2.0, 4.0]);
    let median = aggregate(
        &Strategy::Median { mixing: None },
        2,
        &slices(&rows[..4], &weights[..4]),
    )
    .unwrap();
    assert_eq!(median.delta, [1.5, 3.0]);
}

/// Non-IID in miniature: each honest client's update is large on its own
/// "class" coordinate and small elsewhere, so the coordinate-wise median
/// is near zero everywhere (most clients do not hold any one class) while
/// the mean is not. Mixing first brings the median close to the honest
/// mean, and sign-flipped attackers still cannot pull it far.
#[test]
fn mixing_removes_the_median_bias_on_non_iid_updates_and_stays_robust() {
    let (honest, attackers, dim) = (35, 15, 5);
    let mut rows: Vec<Vec<f32>> = (0..honest)
        .map(|i| {
            let mut r = vec![0.1f32; dim];
            r[i % dim] = 5.0;
            r
        })
        .collect();
    let mean: Vec<f32> = (0..dim)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / honest as f32)
        .collect();
    rows.extend((0..attackers).map(|_| mean.iter().map(|v| -4.0 * v).collect::<Vec<f32>>()));
    let weights = vec![1.0; rows.len()];
    let input = slices(&rows, &weights);
    let error = |delta: &[f32]| {
        delta
            .iter()
            .zip(&mean)
            .map(|(d, m)| (d - m).abs())
            .fold(0.0f32, f32::max)
    };
    let plain = aggregate(&Strategy::Median { mixing: None }, dim, &input).unwrap();
    let mixed = aggregate(
        &Strategy::Median {
            mixing: Some(attackers),
        },
        dim,
        &input,
    )
    .unwrap();
    let trimmed = aggregate(
        &Strategy::TrimmedMean {
            beta: 0.3,
            mixing: Some(attackers),
        },
        dim,
        &input,
    )
    .unwrap();
    // The honest mean is 1.08 on every coordinate; the plain median sits at
    // 0.1, the mixed rules within a few hundredths of the mean.
    assert!(error(&plain.delta) > 0.9, "{:?}", plain.delta);
    assert!(error(&mixed.delta) < 0.05, "{:?}", mixed.delta);
    assert!(error(&trimmed.delta) < 0.05, "{:?}", trimmed.delta);
    assert_eq!(mixed.used, rows.len());
    // Mixing needs more than 2f updates.
    assert!(matches!(
        aggregate(&Strategy::Median { mixing: Some(25) }, dim, &input),
        Err(Error::TooFew {
            need: 51,
            have: 50,
            ..
        })
    ));
}

#[test]
fn the_trim_count_reads_beta_as_written() {
    // 0.35f32 is 0.3499999940…, so a plain product would floor to 6.
    assert_eq!(coordinate::trim_count(0.35, 20), 7);
    assert_eq!(coordinate::trim_count(0.1, 10), 1);
    assert_eq!(coordinate::trim_count(0.0, 10), 0);
    assert_eq!(coordinate::trim_count(0.49, 3), 1);
    assert_eq!(coordinate::trim_count(0.49, 2), 0);
}

#[test]
fn fedavg_falls_back_to_the_plain_mean_when_all_weights_are_zero() {
    let rows = [vec![1.0f32, 2.0], vec![3.0, 6.0]];
    let out = aggregate(&Strategy::FedAvg, 2, &slices(&rows, &[0.0, 0.0])).unwrap();
    assert_eq!(out.delta, [2.0, 4.0]);
    // A later positive weight makes the earlier zero-weight update count for
    // nothing.
    let rows = [vec![1.0f32, 2.0], vec![3.0, 6.0], vec![5.0, 0.0]];
    let out = aggregate(&Strategy::FedAvg, 2, &slices(&rows, &[0.0, 1.0, 3.0])).unwrap();
    assert_eq!(out.delta, [4.5, 1.5]);
}

// ----- Errors. -----

#[test]
fn bad_updates_are_rejected_and_leave_the_aggregator_unchanged() {
    let strategies = [
        Strategy::FedAvg,
        Strategy::FedProx { mu: 0.1 },
        Strategy::Median { mixing: None },
        Strategy::TrimmedMean {
            beta: 0.1,
            mixing: None,
        },
        Strategy::MultiKrum {
            byzantine: 0,
            keep: 0,
        },
    ];
    for strategy in strategies {
        let mut aggregator = strategy.aggregator(3);
        assert!(aggregator.is_empty());
        let shape = aggregator.add(&[1.0, 2.0], 1.0).unwrap_err();
        assert_eq!(
            shape,
            Error::Shape {
                what: "update",
                expected: 3,
                got: 2
            }
        );
        let nan = aggregator.add(&[1.0, f32::NAN, 2.0], 1.0).unwrap_err();
        assert_eq!(
            nan,
            Error::Invalid {
                what: "update",
                reason: "the value at index 1 is not finite".into()
            }
        );
        assert!(matches!(
            aggregator.add(&[f32::INFINITY, 0.0, 0.0], 1.0),
            Err(Error::Invalid { .. })
        ));
        for weight in [-1.0, f32::NAN, f32::INFINITY] {
            let error = aggregator.add(&[1.0, 2.0, 3.0], weight).unwrap_err();
            assert!(
                matches!(
                    error,
                    Error::Invalid {
                        what: "update weight",
                        ..
                    }
                ),
                "{error}"
            );
        }
        assert_eq!(aggregator.len(), 0);
        let empty = aggregator.finish().unwrap_err();
        // Multi-Krum needs n > 2f + 2 even with f = 0.
        let need = if let Strategy::MultiKrum { .. } = strategy {
            3
        } else {
            1
        };
        assert_eq!(
            empty,
            Error::TooFew {
                what: "updates",
                need,
                have: 0
            },
            "{}",
            strategy.name()
        );

        let mut aggregator = strategy.aggregator(3);
        for k in 0..3 {
            aggregator.add(&[k as f32, 1.0, 2.0], 1.0).unwrap();
        }
        aggregator.add(&[0.0; 4], 1.0).unwrap_err();
        assert_eq!(aggregator.len(), 3);
        let out = aggregator.finish().unwrap();
        assert_eq!(out.delta[1..], [1.0, 2.0], "{}", strategy.name());
    }
}

#[test]
fn multi_krum_needs_enough_updates() {
    let rows = noise(6, 4, 1);
    let weights = [1.0; 6];
    let input = slices(&rows, &weights);
    let too_many_byzantine = aggregate(
        &Strategy::MultiKrum {
            byzantine: 2,
            keep: 0,
        },
        4,
        &input,
    );
    assert_eq!(
        too_many_byzantine.unwrap_err(),
        Error::TooFew {
            what: "updates",
            need: 7,
            have: 6
        }
    );
    let keep_too_many = aggregate(
        &Strategy::MultiKrum {
            byzantine: 1,
            keep: 6,
        },
        4,
        &input,
    );
    assert_eq!(
        keep_too_many.unwrap_err(),
        Error::TooFew {
            what: "updates",
            need: 7,
            have: 6
        }
    );
    assert!(
        aggregate(
            &Strategy::MultiKrum {
                byzantine: 1,
                keep: 5
            },
            4,
            &input
        )
        .is_ok()
    );
    let absurd = aggregate(
        &Strategy::MultiKrum {
            byzantine: usize::MAX,
            keep: 0,
        },
        4,
        &input,
    );
    assert!(matches!(absurd, Err(Error::TooFew { .. })));
}

#[test]
fn parameters_are_validated() {
    for strategy in [
        Strategy::TrimmedMean {
            beta: 0.5,
            mixing: None,
        },
        Strategy::TrimmedMean {
            beta: -0.1,
            mixing: None,
        },
        Strategy::TrimmedMean {
            beta: f32::NAN,
            mixing: None,
        },
        Strategy::FedProx { mu: -1.0 },
        Strategy::FedProx { mu: f32::INFINITY },
    ] {
        assert!(
            matches!(strategy.validate(), Err(Error::Invalid { .. })),
            "{strategy:?}"
        );
        // An aggregator built regardless reports it when finishing.
        let mut aggregator = strategy.aggregator(1);
        aggregator.add(&[1.0], 1.0).unwrap();
        assert!(matches!(aggregator.finish(), Err(Error::Invalid { .. })));
        assert!(matches!(
            aggregate(&strategy, 1, &[(&[1.0], 1.0)]),
            Err(Error::Invalid { .. })
        ));
    }
}

#[test]
fn zero_dimensional_updates_aggregate_to_nothing() {
    for strategy in [
        Strategy::FedAvg,
        Strategy::Median { mixing: None },
        Strategy::MultiKrum {
            byzantine: 0,
            keep: 0,
        },
    ] {
        let out = aggregate(&strategy, 0, &[(&[], 1.0), (&[], 2.0), (&[], 3.0)]).unwrap();
        assert!(out.delta.is_empty());
    }
}

// ----- Names and configuration. -----

#[test]
fn names_serde_and_streaming() {
    let cases = [
        (Strategy::FedAvg, "fedavg", r#"{"name":"fedavg"}"#, true),
        (
            Strategy::FedProx { mu: 0.5 },
            "fedprox",
            r#"{"name":"fedprox","mu":0.5}"#,
            true,
        ),
        (
            Strategy::Median { mixing: None },
            "median",
            r#"{"name":"median"}"#,
            false,
        ),
        (
            Strategy::TrimmedMean {
                beta: 0.25,
                mixing: None,
            },
            "trimmed_mean",
            r#"{"name":"trimmed_mean","beta":0.25}"#,
            false,
        ),
        (
            Strategy::Median { mixing: Some(3) },
            "median",
            r#"{"name":"median","mixing":3}"#,
            false,
        ),
        (
            Strategy::TrimmedMean {
                beta: 0.25,
                mixing: Some(3),
            },
            "trimmed_mean",
            r#"{"name":"trimmed_mean","beta":0.25,"mixing":3}"#,
            false,
        ),
        (
            Strategy::MultiKrum {
                byzantine: 2,
                keep: 0,
            },
            "multi_krum",
            r#"{"name":"multi_krum","byzantine":2,"keep":0}"#,
            false,
        ),
    ];
    for (strategy, name, json, streaming) in cases {
        assert_eq!(strategy.name(), name);
        assert_eq!(strategy.is_streaming(), streaming);
        assert_eq!(serde_json::to_string(&strategy).unwrap(), json);
        assert_eq!(serde_json::from_str::<Strategy>(json).unwrap(), strategy);
    }
    assert_eq!(
        serde_json::from_str::<Strategy>(r#"{"name":"fed_avg"}"#).unwrap(),
        Strategy::FedAvg
    );
    assert_eq!(
        serde_json::from_str::<Strategy>(r#"{"name":"multi_krum","byzantine":2}"#).unwrap(),
        Strategy::MultiKrum {
            byzantine: 2,
            keep: 0
        }
    );
    for bad in [
        r#"{"name":"trimmed_mean","beta":0.1,"gamma":1}"#,
        r#"{"name":"krum"}"#,
        r#"{"name":"median","beta":0.1}"#,
        r#"{"name":"fedavg","mu":0.1}"#,
    ] {
        assert!(serde_json::from_str::<Strategy>(bad).is_err(), "{bad}");
    }
}
