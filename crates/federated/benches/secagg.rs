//! The cost of secure aggregation against plain aggregation: 100 clients,
//! 16,555 values each (a 384-feature, 43-class softmax regression: 384 · 43
//! weights and 43 biases), the default settings (neighbourhoods sized for
//! a third dropping out, which at 100 clients is every client masking with
//! every other), with no dropouts and with 10% and a third of the clients
//! dropping after sharing keys. Client work is one client's three messages; server work is
//! adding every masked input and finishing. Bytes per client are printed
//! before the timings.
//!
//! Run: `cargo bench -p federated --bench secagg`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use federated::secagg::{
    Aggregator, ClientSecrets, EncryptedShare, RevealedShare, Roster, SHARE_CIPHERTEXT_LEN,
    SecAggParams, mask_input, share_keys, unmask,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const CLIENTS: usize = 100;
const DIM: usize = 384 * 43 + 43;

/// A round's clients, their inputs and everything they send.
struct Round {
    roster: Roster,
    secrets: Vec<ClientSecrets>,
    inputs: Vec<Vec<f32>>,
    outbox: Vec<EncryptedShare>,
}

/// What the hub holds before finishing, for one dropout pattern.
struct HubView {
    u2: Vec<usize>,
    u3: Vec<usize>,
    masked: Vec<(usize, Vec<u32>)>,
    revealed: Vec<RevealedShare>,
}

fn round(rng: &mut ChaCha20Rng) -> Round {
    let params = SecAggParams::default();
    let secrets: Vec<ClientSecrets> = (0..CLIENTS).map(|_| ClientSecrets::generate(rng)).collect();
    let keys = secrets.iter().map(ClientSecrets::public_keys).collect();
    let roster = Roster::new(&params, b"bench task, round 1", keys).expect("a valid roster");
    let inputs = (0..CLIENTS)
        .map(|_| (0..DIM).map(|_| rng.random_range(-0.05f32..0.05)).collect())
        .collect();
    let mut outbox = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        outbox.extend(share_keys(s, &roster, i, rng).expect("shares"));
    }
    Round {
        roster,
        secrets,
        inputs,
        outbox,
    }
}

fn addressed_to(outbox: &[EncryptedShare], to: usize) -> Vec<EncryptedShare> {
    outbox
        .iter()
        .filter(|s| s.to as usize == to)
        .cloned()
        .collect()
}

fn hub_view(r: &Round, dropping: usize, rng: &mut ChaCha20Rng) -> HubView {
    let u2: Vec<usize> = (0..CLIENTS).collect();
    let mut order = u2.clone();
    order.shuffle(rng);
    let mut u3 = order[dropping..].to_vec();
    u3.sort_unstable();
    let masked = u3
        .iter()
        .map(|&i| {
            let y = mask_input(&r.secrets[i], &r.roster, i, &u2, &r.inputs[i], DIM)
                .expect("a masked input");
            (i, y)
        })
        .collect();
    let revealed = u3
        .iter()
        .flat_map(|&i| {
            unmask(
                &r.secrets[i],
                &r.roster,
                i,
                &u2,
                &u3,
                &addressed_to(&r.outbox, i),
            )
            .expect("revealed shares")
        })
        .collect();
    HubView {
        u2,
        u3,
        masked,
        revealed,
    }
}

/// Payload bytes per client, whatever the framing: keys, shares out,
/// shares back, masked input, revealed shares (index, index, kind, share).
fn print_bytes(r: &Round) {
    let h = r.roster.holders_len();
    let advertise = 64;
    let encrypted = 4 + 4 + SHARE_CIPHERTEXT_LEN;
    let shares_out = h * encrypted;
    let shares_in = h * encrypted;
    let masked = 4 * DIM;
    let revealed = h * (4 + 4 + 1 + 4 + 5 * 8);
    let up = advertise + shares_out + masked + revealed;
    let down = shares_in + CLIENTS * advertise;
    println!(
        "secagg bytes per client (n = {CLIENTS}, dim = {DIM}, holders = {h}, threshold = {}): \
         advertise {advertise}, shares sent {shares_out}, shares received {shares_in}, \
         masked input {masked}, revealed {revealed}; upload {up} vs plain {} ({:.3}x), \
         download {down} (roster of {CLIENTS} keys plus shares)",
        r.roster.threshold(),
        4 * DIM,
        up as f64 / (4 * DIM) as f64,
    );
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let r = round(&mut rng);
    print_bytes(&r);
    let views = [
        (0, hub_view(&r, 0, &mut rng)),
        (10, hub_view(&r, 10, &mut rng)),
        (33, hub_view(&r, 33, &mut rng)),
    ];

    let mut group = c.benchmark_group("secagg_100x16555");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    group.bench_function("plain_sum_f32", |b| {
        b.iter(|| {
            let mut sum = vec![0f32; DIM];
            for x in black_box(&r.inputs) {
                for (s, v) in sum.iter_mut().zip(x) {
                    *s += v;
                }
            }
            sum
        });
    });

    for (percent, view) in &views {
        // The dropouts are drawn at random, so time the first survivor.
        let me = view.u3[0];
        let received = addressed_to(&r.outbox, me);
        let mut client_rng = ChaCha20Rng::seed_from_u64(8);
        group.bench_function(format!("client_dropout_{percent}pct"), |b| {
            b.iter(|| {
                let s = &r.secrets[me];
                let shares = share_keys(s, &r.roster, me, &mut client_rng).expect("shares");
                let y = mask_input(s, &r.roster, me, &view.u2, &r.inputs[me], DIM)
                    .expect("a masked input");
                let revealed =
                    unmask(s, &r.roster, me, &view.u2, &view.u3, &received).expect("revealed");
                (shares, y, revealed)
            });
        });
        group.bench_function(format!("server_dropout_{percent}pct"), |b| {
            b.iter(|| {
                let mut aggregator = Aggregator::new(&r.roster, DIM).expect("an aggregator");
                for (i, y) in &view.masked {
                    aggregator.add_masked(*i, y).expect("a masked input");
                }
                aggregator
                    .finish(&view.u2, black_box(&view.revealed))
                    .expect("a sum")
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
