use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::*;

/// `per_class` examples around each of `classes` random centres, every
/// example L2-normalised like a sentence embedding.
fn blobs(classes: usize, inputs: usize, per_class: usize, noise: f32, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| normalised((0..inputs).map(|_| normal.sample(&mut rng)).collect()))
        .collect();
    let mut data = Dataset::new(inputs);
    for i in 0..classes * per_class {
        let c = i % classes;
        let x: Vec<f32> = centres[c]
            .iter()
            .map(|&m| m + noise * normal.sample(&mut rng) / (inputs as f32).sqrt())
            .collect();
        data.push(&normalised(x), c as u32).unwrap();
    }
    data
}

fn normalised(mut x: Vec<f32>) -> Vec<f32> {
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    x.iter_mut().for_each(|v| *v /= norm);
    x
}

/// Points of the square `[-1, 1]²` away from the axes, labelled by whether
/// their coordinates have the same sign: no line separates the classes.
fn xor(n: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = Dataset::new(2);
    while data.len() < n {
        let x: [f32; 2] = [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)];
        if x[0].abs() < 0.1 || x[1].abs() < 0.1 {
            continue;
        }
        data.push(&x, u32::from((x[0] > 0.0) != (x[1] > 0.0)))
            .unwrap();
    }
    data
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn softmax_spec(inputs: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        inputs,
        hidden: 0,
        classes,
    }
}

#[test]
fn softmax_regression_separates_blobs() {
    let train = blobs(8, 32, 40, 0.5, 1);
    let test = blobs(8, 32, 20, 0.5, 1_000);
    // Same centres need the same seed: rebuild the test set from the
    // training generator's centres by drawing more examples of it.
    let all = blobs(8, 32, 60, 0.5, 1);
    let test_idx: Vec<usize> = (train.len()..all.len()).collect();
    let test_same = all.subset(&test_idx);
    let spec = softmax_spec(32, 8);
    let config = LocalTraining {
        epochs: 20,
        ..LocalTraining::default()
    };
    let params = train_central(&spec, &train, &config, 7).unwrap();
    let on_train = spec.evaluate(&params, &train).unwrap();
    let on_test = spec.evaluate(&params, &test_same).unwrap();
    assert!(on_train.accuracy > 0.95, "{on_train:?}");
    assert!(on_test.accuracy > 0.95, "{on_test:?}");
    assert_eq!(on_test.examples, test_same.len());
    // Blobs with other centres are a different task: chance level, which
    // shows the accuracy above is learnt, not an artefact of the metric.
    assert!(spec.evaluate(&params, &test).unwrap().accuracy < 0.5);
}

#[test]
fn hidden_layer_learns_xor_that_softmax_regression_cannot() {
    let train = xor(400, 3);
    let test = xor(200, 4);
    let config = LocalTraining {
        epochs: 60,
        batch_size: 16,
        learning_rate: 0.2,
        ..LocalTraining::default()
    };
    let linear = softmax_spec(2, 2);
    let params = train_central(&linear, &train, &config, 5).unwrap();
    let linear_acc = linear.evaluate(&params, &test).unwrap().accuracy;
    assert!(
        linear_acc < 0.75,
        "a line cannot do XOR, yet got {linear_acc}"
    );

    let mlp = ModelSpec {
        inputs: 2,
        hidden: 16,
        classes: 2,
    };
    let params = train_central(&mlp, &train, &config, 5).unwrap();
    let mlp_eval = mlp.evaluate(&params, &test).unwrap();
    assert!(mlp_eval.accuracy > 0.95, "{mlp_eval:?}");
}

/// Compares the backward pass with central finite differences of the mean
/// loss, accumulated in `f64`.
fn check_gradient(spec: &ModelSpec, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut params = spec.init(seed);
    // Non-zero everywhere, so that every parameter's gradient is exercised.
    for p in &mut params {
        *p += 0.3 * normal.sample(&mut rng);
    }
    let mut data = Dataset::new(spec.inputs);
    for i in 0..6 {
        let x: Vec<f32> = (0..spec.inputs).map(|_| normal.sample(&mut rng)).collect();
        data.push(&x, (i % spec.classes) as u32).unwrap();
    }
    let layout = Layout::new(spec);
    let (_, grad) = net::loss_and_gradient(&layout, &params, &data);
    let eps = 1e-3f32;
    for i in 0..params.len() {
        let mut plus = params.clone();
        plus[i] += eps;
        let mut minus = params.clone();
        minus[i] -= eps;
        let (lp, _) = net::loss_and_gradient(&layout, &plus, &data);
        let (lm, _) = net::loss_and_gradient(&layout, &minus, &data);
        let numeric = (lp - lm) / (f64::from(plus[i]) - f64::from(minus[i]));
        let analytic = f64::from(grad[i]);
        assert!(
            (numeric - analytic).abs() <= 2e-3 + 1e-2 * analytic.abs(),
            "{spec:?} parameter {i}: analytic {analytic}, numeric {numeric}"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    for seed in 0..3 {
        check_gradient(&softmax_spec(4, 3), seed);
        check_gradient(
            &ModelSpec {
                inputs: 4,
                hidden: 5,
                classes: 3,
            },
            seed,
        );
    }
}

#[test]
fn fedprox_update_shrinks_as_mu_grows() {
    let data = blobs(5, 16, 8, 0.5, 11);
    let spec = ModelSpec {
        inputs: 16,
        hidden: 8,
        classes: 5,
    };
    let global = spec.init(2);
    let norms: Vec<f64> = [0.0, 0.1, 1.0, 10.0, 100.0, 1e4]
        .iter()
        .map(|&mu| {
            let config = LocalTraining {
                epochs: 5,
                batch_size: 4,
                proximal_mu: mu,
                ..LocalTraining::default()
            };
            norm(
                &train_local(&spec, &global, &data, &config, 9)
                    .unwrap()
                    .delta,
            )
        })
        .collect();
    for pair in norms.windows(2) {
        assert!(pair[1] < pair[0], "{norms:?}");
    }
    // A very strong pull (lr · mu = 5000, far past where an explicit step
    // would diverge) keeps the client at the global model.
    assert!(norms[5] < 1e-2 * norms[0], "{norms:?}");
}

#[test]
fn weight_decay_shrinks_the_trained_model() {
    let data = blobs(4, 8, 10, 0.3, 12);
    let spec = softmax_spec(8, 4);
    let plain = LocalTraining {
        epochs: 10,
        ..LocalTraining::default()
    };
    let decayed = LocalTraining {
        weight_decay: 0.1,
        ..plain
    };
    let a = train_central(&spec, &data, &plain, 1).unwrap();
    let b = train_central(&spec, &data, &decayed, 1).unwrap();
    assert!(norm(&b) < norm(&a));
}

#[test]
fn train_local_is_deterministic_for_a_seed_and_lowers_the_loss() {
    let data = blobs(4, 12, 6, 0.4, 21);
    let spec = ModelSpec {
        inputs: 12,
        hidden: 6,
        classes: 4,
    };
    let global = spec.init(1);
    let config = LocalTraining {
        batch_size: 4,
        ..LocalTraining::default()
    };
    let a = train_local(&spec, &global, &data, &config, 42).unwrap();
    let b = train_local(&spec, &global, &data, &config, 42).unwrap();
    let c = train_local(&spec, &global, &data, &config, 43).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.delta, c.delta, "another seed shuffles differently");
    assert_eq!(a.examples, data.len());
    assert_eq!(a.delta.len(), spec.num_params());

    let before = spec.evaluate(&global, &data).unwrap().loss;
    let trained: Vec<f32> = global.iter().zip(&a.delta).map(|(g, d)| g + d).collect();
    let after = spec.evaluate(&trained, &data).unwrap().loss;
    assert!(after < before, "loss {before} -> {after}");
    assert!(a.loss.is_finite() && a.loss > 0.0);
}

#[test]
fn train_central_is_deterministic_for_a_seed() {
    let data = xor(64, 1);
    let spec = ModelSpec {
        inputs: 2,
        hidden: 4,
        classes: 2,
    };
    let config = LocalTraining::default();
    let a = train_central(&spec, &data, &config, 3).unwrap();
    assert_eq!(a, train_central(&spec, &data, &config, 3).unwrap());
    assert_ne!(a, train_central(&spec, &data, &config, 4).unwrap());
}

#[test]
fn init_is_deterministic_zero_for_softmax_and_bounded_for_hidden() {
    assert!(softmax_spec(5, 3).init(9).iter().all(|&w| w == 0.0));
    let spec = ModelSpec {
        inputs: 24,
        hidden: 10,
        classes: 3,
    };
    let p = spec.init(9);
    assert_eq!(p, spec.init(9));
    assert_ne!(p, spec.init(10));
    let t = spec.tensors(&p).unwrap();
    let he = (6.0f32 / 24.0).sqrt();
    let xavier = (6.0f32 / 13.0).sqrt();
    assert!(t[0].2.iter().all(|w| w.abs() <= he));
    assert!(t[0].2.iter().any(|w| w.abs() > he / 2.0));
    assert!(t[1].2.iter().all(|&b| b == 0.0));
    assert!(t[2].2.iter().all(|w| w.abs() <= xavier));
    assert!(t[3].2.iter().all(|&b| b == 0.0));
}

#[test]
fn tensors_name_the_head_layout() {
    let spec = ModelSpec {
        inputs: 3,
        hidden: 2,
        classes: 4,
    };
    let params: Vec<f32> = (0..spec.num_params()).map(|i| i as f32).collect();
    let t = spec.tensors(&params).unwrap();
    let names: Vec<&str> = t.iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        [
            "hidden.weight",
            "hidden.bias",
            "output.weight",
            "output.bias"
        ]
    );
    assert_eq!(t[0].1, [2, 3]);
    assert_eq!(t[2].1, [4, 2]);
    // Row-major: the second row of hidden.weight starts at its fourth value.
    assert_eq!(t[0].2[3], 3.0);
    assert_eq!(t[1].2, [6.0, 7.0]);
    assert_eq!(*t[3].2.last().unwrap(), (params.len() - 1) as f32);

    let linear = softmax_spec(3, 4);
    let p = vec![0.0; linear.num_params()];
    let t = linear.tensors(&p).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!((t[0].0, t[0].1.clone()), ("output.weight", vec![4, 3]));
    assert!(matches!(
        linear.tensors(&p[1..]),
        Err(Error::Shape {
            expected: 16,
            got: 15,
            ..
        })
    ));
}

#[test]
fn bad_inputs_are_errors() {
    let spec = softmax_spec(2, 2);
    let global = vec![0.0; spec.num_params()];
    let config = LocalTraining::default();
    let mut data = Dataset::new(2);
    assert!(matches!(
        train_local(&spec, &global, &data, &config, 0),
        Err(Error::Invalid {
            what: "dataset",
            ..
        })
    ));
    data.push(&[1.0, 0.0], 2).unwrap();
    assert!(matches!(
        train_local(&spec, &global, &data, &config, 0),
        Err(Error::Invalid { what: "label", .. })
    ));
    data.labels[0] = 1;
    assert!(matches!(
        train_local(&spec, &global[1..], &data, &config, 0),
        Err(Error::Shape { .. })
    ));
    let wide = Dataset {
        inputs: 3,
        features: vec![0.0; 3],
        labels: vec![0],
    };
    assert!(matches!(
        spec.evaluate(&global, &wide),
        Err(Error::Shape {
            expected: 2,
            got: 3,
            ..
        })
    ));
    let ragged = Dataset {
        inputs: 2,
        features: vec![0.0; 3],
        labels: vec![0],
    };
    assert!(matches!(
        spec.evaluate(&global, &ragged),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        spec.predict(&global, &[1.0]),
        Err(Error::Shape { .. })
    ));
    for bad in [
        LocalTraining {
            epochs: 0,
            ..config
        },
        LocalTraining {
            batch_size: 0,
            ..config
        },
        LocalTraining {
            learning_rate: 0.0,
            ..config
        },
        LocalTraining {
            proximal_mu: f32::NAN,
            ..config
        },
        LocalTraining {
            weight_decay: -1.0,
            ..config
        },
    ] {
        assert!(
            train_local(&spec, &global, &data, &bad, 0).is_err(),
            "{bad:?}"
        );
    }
    for bad in [
        softmax_spec(0, 2),
        softmax_spec(2, 1),
        ModelSpec {
            inputs: usize::MAX,
            hidden: 2,
            classes: 2,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn divergence_is_an_error_not_a_nan_update() {
    let spec = softmax_spec(2, 2);
    let mut data = Dataset::new(2);
    data.push(&[1e30, -1e30], 0).unwrap();
    data.push(&[-1e30, 1e30], 1).unwrap();
    let config = LocalTraining {
        learning_rate: 1e30,
        ..LocalTraining::default()
    };
    let global = vec![0.0; spec.num_params()];
    let err = train_local(&spec, &global, &data, &config, 0).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
}

#[test]
fn serde_round_trips_and_rejects_unknown_fields() {
    let spec = ModelSpec {
        inputs: 384,
        hidden: 0,
        classes: 43,
    };
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
    assert!(
        serde_json::from_str::<ModelSpec>(r#"{"inputs":1,"hidden":0,"classes":2,"x":1}"#).is_err()
    );
    let partial: LocalTraining = serde_json::from_str(r#"{"epochs": 5}"#).unwrap();
    assert_eq!(
        partial,
        LocalTraining {
            epochs: 5,
            ..LocalTraining::default()
        }
    );
    assert!(serde_json::from_str::<LocalTraining>(r#"{"lr": 1}"#).is_err());
    let e = Evaluation {
        accuracy: 0.5,
        loss: 0.7,
        examples: 4,
    };
    assert_eq!(
        serde_json::from_str::<Evaluation>(&serde_json::to_string(&e).unwrap()).unwrap(),
        e
    );
    LocalTraining::default().validate().unwrap();
}

fn arb_spec() -> impl Strategy<Value = ModelSpec> {
    (1usize..12, 0usize..6, 2usize..6).prop_map(|(inputs, hidden, classes)| ModelSpec {
        inputs,
        hidden,
        classes,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tensor_lengths_sum_to_num_params(spec in arb_spec()) {
        let params = vec![0.0; spec.num_params()];
        let tensors = spec.tensors(&params).unwrap();
        let mut offset = 0;
        for (_, shape, values) in &tensors {
            prop_assert_eq!(shape.iter().product::<usize>(), values.len());
            // Consecutive tensors tile the flat vector in order.
            prop_assert_eq!(values.as_ptr(), params[offset..].as_ptr());
            offset += values.len();
        }
        prop_assert_eq!(offset, spec.num_params());
        prop_assert_eq!(tensors.len(), if spec.hidden > 0 { 4 } else { 2 });
    }

    #[test]
    fn evaluate_accuracy_agrees_with_predict(
        spec in arb_spec(),
        seed in any::<u64>(),
        n in 1usize..20,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params: Vec<f32> = (0..spec.num_params()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut data = Dataset::new(spec.inputs);
        for _ in 0..n {
            let x: Vec<f32> = (0..spec.inputs).map(|_| rng.random_range(-2.0..2.0)).collect();
            data.push(&x, rng.random_range(0..spec.classes as u32)).unwrap();
        }
        let eval = spec.evaluate(&params, &data).unwrap();
        let hits = (0..n)
            .filter(|&i| spec.predict(&params, data.row(i)).unwrap() == data.labels[i] as usize)
            .count();
        prop_assert_eq!(eval.accuracy, hits as f64 / n as f64);
        prop_assert!(eval.loss >= 0.0 && eval.loss.is_finite());
        prop_assert_eq!(eval.examples, n);
    }
}
