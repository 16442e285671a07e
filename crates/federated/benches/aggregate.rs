//! The cost of aggregating one round: 100 updates of 100,000 parameters for
//! each strategy, and the differential-privacy noise on the sum.
//!
//! Run: `cargo bench -p federated --bench aggregate` (add `-- --quick` for
//! a short run).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use federated::dp::add_gaussian_noise;
use federated::strategy::{Strategy, aggregate};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

const CLIENTS: usize = 100;
const DIM: usize = 100_000;

/// Honest-looking updates: a shared direction plus per-client noise, with
/// example counts between 10 and 1,000.
fn round() -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let spread = Normal::new(0.0f32, 0.01).expect("a positive standard deviation");
    let direction: Vec<f32> = (0..DIM).map(|_| spread.sample(&mut rng)).collect();
    let updates = (0..CLIENTS)
        .map(|_| {
            direction
                .iter()
                .map(|&d| d + spread.sample(&mut rng))
                .collect()
        })
        .collect();
    let weights = (0..CLIENTS).map(|i| 10.0 + (i * 97 % 991) as f32).collect();
    (updates, weights)
}

fn bench(c: &mut Criterion) {
    let (updates, weights) = round();
    let input: Vec<(&[f32], f32)> = updates
        .iter()
        .map(Vec::as_slice)
        .zip(weights.iter().copied())
        .collect();
    let mut group = c.benchmark_group("aggregate_100x100k");
    group.sample_size(10);
    for strategy in [
        Strategy::FedAvg,
        Strategy::Median { mixing: None },
        Strategy::TrimmedMean {
            beta: 0.1,
            mixing: None,
        },
        Strategy::MultiKrum {
            byzantine: 10,
            keep: 0,
        },
    ] {
        group.bench_function(strategy.name(), |b| {
            b.iter(|| aggregate(&strategy, DIM, black_box(&input)).expect("a valid round"));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("dp");
    group.sample_size(10);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut sum = vec![0.0f32; DIM];
    group.bench_function("gaussian_noise_100k", |b| {
        b.iter(|| add_gaussian_noise(black_box(&mut sum), 0.5, &mut rng));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
