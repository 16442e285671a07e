//! How the simulator splits a data set across clients and into training
//! and test examples.
//!
//! Real fleets are not IID: each device sees a few classes far more often
//! than others. [`dirichlet`] reproduces that with the label-skew scheme of
//! Hsu et al. (2019), the one Flower Datasets' `DirichletPartitioner`
//! implements; [`iid`] is the control. Everything is a deterministic
//! function of a seed, so a simulation can be replayed.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::{Error, Result};

/// How many times [`dirichlet`] draws partitions looking for one that gives
/// every client `min_per_client` examples before settling for the best.
pub const MAX_ATTEMPTS: usize = 100;

/// Splits example indices across `clients` non-IID: for each class, draw
/// proportions from Dirichlet(`alpha`) over clients and deal that class's
/// (shuffled) examples accordingly (the scheme of Hsu et al. 2019 used by
/// Flower Datasets' `DirichletPartitioner`). Deterministic from `seed`.
/// Every index appears in exactly one partition; each partition is sorted.
///
/// Small `alpha` (0.1) gives each client a few dominant classes; large
/// `alpha` (100) approaches an IID split. With `min_per_client > 0` the
/// split is redrawn, at most [`MAX_ATTEMPTS`] times, until every client has
/// at least that many examples; if no draw achieves it (or it is impossible,
/// `min_per_client · clients > labels.len()`), the draw whose smallest
/// partition is largest is returned.
///
/// # Errors
///
/// [`Error::Invalid`] if `classes` or `clients` is 0, `alpha` is not
/// positive and finite, or a label is not below `classes`.
pub fn dirichlet(
    labels: &[u32],
    classes: usize,
    clients: usize,
    alpha: f64,
    min_per_client: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    let invalid = |what, reason: String| Err(Error::Invalid { what, reason });
    if classes == 0 {
        return invalid("classes", "a partition needs at least one class".into());
    }
    if clients == 0 {
        return invalid("clients", "a partition needs at least one client".into());
    }
    // Gamma::new accepts an infinite shape, whose draws are useless, so the
    // range is checked here rather than left to it.
    let gamma = match Gamma::new(alpha, 1.0) {
        Ok(gamma) if alpha.is_finite() => gamma,
        _ => return invalid("alpha", format!("{alpha} is not positive and finite")),
    };
    let mut by_class = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        match by_class.get_mut(label as usize) {
            Some(class) => class.push(i),
            None => {
                return invalid(
                    "label",
                    format!("label {label} of example {i} is not below {classes} classes"),
                );
            }
        }
    }

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let feasible = min_per_client.saturating_mul(clients) <= labels.len();
    let attempts = if min_per_client > 0 && feasible {
        MAX_ATTEMPTS
    } else {
        1
    };
    let mut best: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut proportions = vec![0.0f64; clients];
    for _ in 0..attempts {
        let parts = draw(&by_class, &gamma, &mut proportions, &mut rng);
        let smallest = parts.iter().map(Vec::len).min().unwrap_or(0);
        if best.as_ref().is_none_or(|(s, _)| smallest > *s) {
            best = Some((smallest, parts));
        }
        if smallest >= min_per_client {
            break;
        }
    }
    let (_, mut parts) = best.expect("at least one attempt is made");
    for part in &mut parts {
        part.sort_unstable();
    }
    Ok(parts)
}

/// One draw of a Dirichlet partition; `proportions` is scratch space of one
/// value per client.
fn draw(
    by_class: &[Vec<usize>],
    gamma: &Gamma<f64>,
    proportions: &mut [f64],
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let clients = proportions.len();
    let mut parts = vec![Vec::new(); clients];
    for class in by_class {
        let mut shuffled = class.clone();
        shuffled.shuffle(rng);
        // A Dirichlet sample is a vector of independent Gamma(alpha, 1)
        // draws divided by their sum.
        let mut total = 0.0;
        for p in proportions.iter_mut() {
            *p = gamma.sample(rng);
            total += *p;
        }
        if !(total > 0.0 && total.is_finite()) {
            // With a tiny alpha every Gamma draw can underflow to zero; the
            // limit of the Dirichlet as alpha → 0 puts all the mass on one
            // client chosen uniformly, so do exactly that.
            proportions.fill(0.0);
            proportions[rand::Rng::random_range(rng, 0..clients)] = 1.0;
            total = 1.0;
        }
        // Cut the shuffled class at the rounded cumulative proportions, so
        // the pieces always add up to the whole class.
        let n = shuffled.len();
        let (mut start, mut cumulative) = (0, 0.0);
        for (k, (part, &p)) in parts.iter_mut().zip(proportions.iter()).enumerate() {
            cumulative += p / total;
            let end = if k + 1 == clients {
                n
            } else {
                ((cumulative * n as f64).round() as usize).clamp(start, n)
            };
            part.extend_from_slice(&shuffled[start..end]);
            start = end;
        }
    }
    parts
}

/// Splits the indices `0..n` uniformly at random across `clients`, sizes
/// differing by at most one. Deterministic from `seed`; each partition is
/// sorted. No clients gives no partitions.
pub fn iid(n: usize, clients: usize, seed: u64) -> Vec<Vec<usize>> {
    if clients == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let (size, extra) = (n / clients, n % clients);
    let mut rest = order.as_slice();
    (0..clients)
        .map(|k| {
            let (part, tail) = rest.split_at(size + usize::from(k < extra));
            rest = tail;
            let mut part = part.to_vec();
            part.sort_unstable();
            part
        })
        .collect()
}

/// Deterministic stratified train/test split: `test_fraction` of each class
/// (rounded to the nearest example) goes to the test side, chosen at random
/// from `seed`. Returns `(train, test)`, each sorted. A fraction outside
/// `[0, 1]` is clamped into it, and NaN counts as 0.
pub fn train_test_split(labels: &[u32], test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let fraction = if test_fraction.is_nan() {
        0.0
    } else {
        test_fraction.clamp(0.0, 1.0)
    };
    // A BTreeMap visits the classes in label order, so the draws from the
    // generator, and therefore the split, depend only on the seed.
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut class in by_class.into_values() {
        class.shuffle(&mut rng);
        let n_test = ((class.len() as f64 * fraction).round() as usize).min(class.len());
        test.extend_from_slice(&class[..n_test]);
        train.extend_from_slice(&class[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `per_class` examples of each class, interleaved.
    fn balanced(classes: u32, per_class: usize) -> Vec<u32> {
        (0..per_class).flat_map(|_| 0..classes).collect()
    }

    fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    /// Mean over non-empty clients of the entropy of their label
    /// distribution, normalised so that 1 is perfectly mixed.
    fn mean_label_entropy(labels: &[u32], classes: usize, parts: &[Vec<usize>]) -> f64 {
        let mut total = 0.0;
        let mut counted = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            let mut counts = vec![0usize; classes];
            for &i in part {
                counts[labels[i] as usize] += 1;
            }
            let n = part.len() as f64;
            let h: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n;
                    -p * p.ln()
                })
                .sum();
            total += h / (classes as f64).ln();
            counted += 1;
        }
        total / f64::from(counted)
    }

    #[test]
    fn small_alpha_skews_labels_more_than_large_alpha() {
        let labels = balanced(10, 100);
        let entropy = |alpha| {
            let parts = dirichlet(&labels, 10, 20, alpha, 0, 7).unwrap();
            assert_exact_cover(&parts, labels.len());
            mean_label_entropy(&labels, 10, &parts)
        };
        let (skewed, middle, mixed) = (entropy(0.1), entropy(1.0), entropy(100.0));
        assert!(
            skewed < middle && middle < mixed,
            "{skewed} {middle} {mixed}"
        );
        assert!(
            skewed < 0.5,
            "alpha 0.1 leaves clients with few classes: {skewed}"
        );
        assert!(mixed > 0.95, "alpha 100 is close to IID: {mixed}");
    }

    #[test]
    fn min_per_client_is_met_when_possible_and_abandoned_when_not() {
        let labels = balanced(10, 100);
        // A seed whose first, unconstrained draw leaves a client short, so
        // that meeting the minimum takes redraws.
        let short = |seed| {
            let parts = dirichlet(&labels, 10, 10, 0.5, 0, seed).unwrap();
            parts.iter().any(|p| p.len() < 30)
        };
        let seed = (0..100)
            .find(|&s| short(s))
            .expect("alpha 0.5 is skewed enough");
        let parts = dirichlet(&labels, 10, 10, 0.5, 30, seed).unwrap();
        assert_exact_cover(&parts, labels.len());
        assert!(parts.iter().all(|p| p.len() >= 30));

        // 20 clients of 60 examples each cannot be made from 1000 examples:
        // the split still covers every example once.
        let parts = dirichlet(&labels, 10, 20, 0.3, 60, 1).unwrap();
        assert_exact_cover(&parts, labels.len());
    }

    #[test]
    fn tiny_alpha_gives_each_class_to_one_client() {
        let labels = balanced(5, 40);
        let parts = dirichlet(&labels, 5, 8, 1e-6, 0, 3).unwrap();
        assert_exact_cover(&parts, labels.len());
        for class in 0..5 {
            let holders = parts
                .iter()
                .filter(|p| p.iter().any(|&i| labels[i] == class))
                .count();
            assert_eq!(holders, 1, "class {class}");
        }
    }

    #[test]
    fn dirichlet_rejects_bad_arguments() {
        let labels = [0, 1, 2];
        for (classes, clients, alpha) in [
            (3, 2, 0.0),
            (3, 2, -1.0),
            (3, 2, f64::NAN),
            (3, 2, f64::INFINITY),
            (3, 0, 1.0),
            (0, 2, 1.0),
            (2, 2, 1.0),
        ] {
            assert!(
                matches!(
                    dirichlet(&labels, classes, clients, alpha, 0, 0),
                    Err(Error::Invalid { .. })
                ),
                "{classes} {clients} {alpha}"
            );
        }
        assert_eq!(
            dirichlet(&[], 3, 2, 1.0, 1, 0).unwrap(),
            vec![Vec::<usize>::new(); 2]
        );
    }

    #[test]
    fn split_is_stratified() {
        let mut labels = balanced(3, 50);
        labels.extend([3; 7]);
        let (train, test) = train_test_split(&labels, 0.2, 5);
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
        for (class, expected) in [(0, 10), (1, 10), (2, 10), (3, 1)] {
            let n = test.iter().filter(|&&i| labels[i] == class).count();
            assert_eq!(n, expected, "class {class}");
        }
        assert_eq!(
            train_test_split(&labels, 0.2, 5),
            (train.clone(), test.clone())
        );
        assert_ne!(train_test_split(&labels, 0.2, 6).1, test);
        assert!(train_test_split(&labels, f64::NAN, 5).1.is_empty());
        assert!(train_test_split(&labels, 2.0, 5).0.is_empty());
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        let parts = iid(103, 10, 4);
        assert_exact_cover(&parts, 103);
        assert!(parts.iter().all(|p| p.len() == 10 || p.len() == 11));
        assert_eq!(parts, iid(103, 10, 4));
        assert_ne!(parts, iid(103, 10, 5));
        assert!(iid(5, 0, 0).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn dirichlet_covers_every_index_once_deterministically(
            labels in proptest::collection::vec(0u32..6, 0..300),
            clients in 1usize..30,
            alpha in 0.01f64..100.0,
            min in 0usize..5,
            seed in any::<u64>(),
        ) {
            let parts = dirichlet(&labels, 6, clients, alpha, min, seed).unwrap();
            prop_assert_eq!(parts.len(), clients);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
            prop_assert_eq!(parts, dirichlet(&labels, 6, clients, alpha, min, seed).unwrap());
        }

        #[test]
        fn split_test_side_is_the_rounded_fraction_of_each_class(
            labels in proptest::collection::vec(0u32..4, 0..200),
            fraction in 0.0f64..=1.0,
            seed in any::<u64>(),
        ) {
            let (train, test) = train_test_split(&labels, fraction, seed);
            prop_assert_eq!(train.len() + test.len(), labels.len());
            for class in 0..4 {
                let n = labels.iter().filter(|&&l| l == class).count();
                let t = test.iter().filter(|&&i| labels[i] == class).count();
                prop_assert_eq!(t, (n as f64 * fraction).round() as usize);
            }
        }
    }
}
