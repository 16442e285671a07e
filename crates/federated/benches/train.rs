//! The cost of one client's local training: the simulator runs a thousand
//! of these a round. Softmax regression over 384-dimensional sentence
//! embeddings into 43 intents, with the 10 examples a typical device holds
//! and the default two epochs; then the same with a 64-unit hidden layer.
//!
//! Run: `cargo bench -p federated --bench train` (add `-- --quick` for a
//! short run).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use federated::model::{Dataset, LocalTraining, ModelSpec, train_local};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const INPUTS: usize = 384;
const CLASSES: usize = 43;
const EXAMPLES: usize = 10;

/// Ten L2-normalised random embeddings with labels spread over the classes.
fn device_data() -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 1.0).expect("a positive standard deviation");
    let mut data = Dataset::new(INPUTS);
    for i in 0..EXAMPLES {
        let mut x: Vec<f32> = (0..INPUTS).map(|_| normal.sample(&mut rng)).collect();
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        x.iter_mut().for_each(|v| *v /= norm);
        data.push(&x, (i * 5 % CLASSES) as u32)
            .expect("rows have INPUTS values");
    }
    data
}

fn bench(c: &mut Criterion) {
    let data = device_data();
    let config = LocalTraining::default();
    for hidden in [0, 64] {
        let spec = ModelSpec {
            inputs: INPUTS,
            hidden,
            classes: CLASSES,
        };
        let global = spec.init(1);
        let name = format!("train_local/{INPUTS}-{hidden}-{CLASSES}/{EXAMPLES}_examples");
        c.bench_function(&name, |b| {
            b.iter(|| train_local(&spec, black_box(&global), &data, &config, 3))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
