//! Simulated rounds: masks cancel, dropouts are recovered up to the
//! threshold and refused beyond it, and clients and hub refuse inconsistent
//! messages.

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::Error;

/// What a client does in a simulated round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Stays,
    DropsBeforeSharing,
    DropsAfterSharing,
}

/// A round's clients, their inputs and the RNG the clients draw from.
struct Sim {
    roster: Roster,
    secrets: Vec<ClientSecrets>,
    inputs: Vec<Vec<f32>>,
    rng: ChaCha20Rng,
}

impl Sim {
    fn new(neighbours: usize, n: usize, dim: usize, seed: u64) -> Sim {
        Sim::with(
            SecAggParams {
                neighbours: Some(neighbours),
                ..SecAggParams::default()
            },
            n,
            dim,
            seed,
        )
    }

    fn with(params: SecAggParams, n: usize, dim: usize, seed: u64) -> Sim {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let secrets: Vec<ClientSecrets> =
            (0..n).map(|_| ClientSecrets::generate(&mut rng)).collect();
        let keys = secrets.iter().map(ClientSecrets::public_keys).collect();
        let roster = Roster::new(&params, b"task 1, round 1", keys).unwrap();
        // Values beyond the clip of 1.0 so that clamping is part of the sum.
        let inputs = (0..n)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.5f32..1.5)).collect())
            .collect();
        Sim {
            roster,
            secrets,
            inputs,
            rng,
        }
    }

    fn n(&self) -> usize {
        self.roster.len()
    }

    fn dim(&self) -> usize {
        self.inputs[0].len()
    }

    /// Round 1 for the clients in `u2`: every encrypted share they send.
    fn share_all(&mut self, u2: &[usize]) -> Vec<EncryptedShare> {
        let mut outbox = Vec::new();
        for &i in u2 {
            outbox.extend(share_keys(&self.secrets[i], &self.roster, i, &mut self.rng).unwrap());
        }
        outbox
    }

    /// The whole round, with each client's fate; any refusal ends it.
    fn run(&mut self, fates: &[Fate]) -> Result<SecAggSum> {
        let u2: Vec<usize> = (0..self.n())
            .filter(|&i| fates[i] != Fate::DropsBeforeSharing)
            .collect();
        let outbox = self.share_all(&u2);
        let mut aggregator = Aggregator::new(&self.roster, self.dim())?;
        for &i in u2.iter().filter(|&&i| fates[i] == Fate::Stays) {
            let y = mask_input(
                &self.secrets[i],
                &self.roster,
                i,
                &u2,
                &self.inputs[i],
                self.dim(),
            )?;
            aggregator.add_masked(i, &y)?;
        }
        let u3 = aggregator.survivors();
        let mut revealed = Vec::new();
        for &i in &u3 {
            let received = addressed_to(&outbox, i);
            revealed.extend(unmask(
                &self.secrets[i],
                &self.roster,
                i,
                &u2,
                &u3,
                &received,
            )?);
        }
        aggregator.finish(&u2, &revealed)
    }

    /// The plain sum of the clamped inputs of the clients that stay.
    fn expected(&self, fates: &[Fate]) -> Vec<f64> {
        let clip = f64::from(self.roster.params().fixed.clip);
        (0..self.dim())
            .map(|j| {
                (0..self.n())
                    .filter(|&i| fates[i] == Fate::Stays)
                    .map(|i| f64::from(self.inputs[i][j]).clamp(-clip, clip))
                    .sum()
            })
            .collect()
    }

    /// Whether the round can finish: someone stays, and every client that
    /// shared keys keeps at least `t` holders that stay.
    fn feasible(&self, fates: &[Fate]) -> bool {
        let r = &self.roster;
        fates.contains(&Fate::Stays)
            && (0..self.n())
                .filter(|&v| fates[v] != Fate::DropsBeforeSharing)
                .all(|v| r.holders(v).filter(|&j| fates[j] == Fate::Stays).count() >= r.threshold())
    }

    /// Asserts that `got` is the sum of the staying clients' inputs.
    fn assert_sum(&self, fates: &[Fate], got: &SecAggSum) {
        let stays: Vec<usize> = (0..self.n()).filter(|&i| fates[i] == Fate::Stays).collect();
        assert_eq!(got.count, stays.len());
        let dropped: Vec<usize> = (0..self.n()).filter(|&i| fates[i] != Fate::Stays).collect();
        assert_eq!(got.dropped, dropped);
        let resolution = self.roster.params().fixed.resolution();
        for (j, (&g, e)) in got.sum.iter().zip(self.expected(fates)).enumerate() {
            let tolerance = stays.len() as f64 * resolution + e.abs() * f64::from(f32::EPSILON);
            assert!(
                (f64::from(g) - e).abs() <= tolerance,
                "coordinate {j}: got {g}, expected {e}"
            );
        }
    }
}

fn addressed_to(outbox: &[EncryptedShare], to: usize) -> Vec<EncryptedShare> {
    outbox
        .iter()
        .filter(|s| s.to as usize == to)
        .cloned()
        .collect()
}

/// `dropping` clients chosen at random get `fate`, the others stay.
fn fates_with(n: usize, dropping: usize, fate: Fate, seed: u64) -> Vec<Fate> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let mut fates = vec![Fate::Stays; n];
    for &i in &order[..dropping] {
        fates[i] = fate;
    }
    fates
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn masks_cancel_without_dropouts(
        n in 3usize..=12, neighbours in 1usize..=12, dim in 1usize..=20, seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(neighbours, n, dim, seed);
        let fates = vec![Fate::Stays; n];
        let sum = sim.run(&fates).unwrap();
        sim.assert_sum(&fates, &sum);
    }

    #[test]
    fn complete_graph_recovers_a_third_dropping_after_sharing(
        n in 3usize..=12, dim in 1usize..=20, seed in any::<u64>(), fraction in 0.0f64..=1.0,
    ) {
        let mut sim = Sim::new(n, n, dim, seed);
        prop_assert!(sim.roster.is_complete());
        let dropping = ((n / 3) as f64 * fraction).round() as usize;
        let fates = fates_with(n, dropping, Fate::DropsAfterSharing, seed);
        let sum = sim.run(&fates).unwrap();
        sim.assert_sum(&fates, &sum);
    }

    #[test]
    fn complete_graph_ignores_a_third_dropping_before_sharing(
        n in 3usize..=12, dim in 1usize..=20, seed in any::<u64>(), fraction in 0.0f64..=1.0,
    ) {
        let mut sim = Sim::new(n, n, dim, seed);
        let dropping = ((n / 3) as f64 * fraction).round() as usize;
        let fates = fates_with(n, dropping, Fate::DropsBeforeSharing, seed);
        let sum = sim.run(&fates).unwrap();
        sim.assert_sum(&fates, &sum);
    }

    /// Whatever the graph and the dropouts, a round either gives the right
    /// sum or, exactly when some client kept fewer than `t` holders, fails
    /// with `TooFew`: never a wrong sum.
    #[test]
    fn any_dropout_pattern_gives_the_sum_or_too_few(
        n in 3usize..=12,
        neighbours in 1usize..=12,
        dim in 1usize..=20,
        seed in any::<u64>(),
        fates in prop::collection::vec(
            prop_oneof![
                6 => Just(Fate::Stays),
                1 => Just(Fate::DropsBeforeSharing),
                1 => Just(Fate::DropsAfterSharing),
            ],
            12,
        ),
    ) {
        let mut sim = Sim::new(neighbours, n, dim, seed);
        let fates = &fates[..n];
        match sim.run(fates) {
            Ok(sum) => {
                prop_assert!(sim.feasible(fates));
                sim.assert_sum(fates, &sum);
            }
            Err(e) => {
                prop_assert!(!sim.feasible(fates), "feasible round failed: {e}");
                prop_assert!(matches!(e, Error::TooFew { .. }), "{e}");
            }
        }
    }
}

/// Each client drops independently with probability `rate`.
fn random_fates(n: usize, rate: f64, fate: Fate, rng: &mut ChaCha20Rng) -> Vec<Fate> {
    (0..n)
        .map(|_| {
            if rng.random_bool(rate) {
                fate
            } else {
                Fate::Stays
            }
        })
        .collect()
}

#[test]
fn neighbourhoods_are_sized_for_the_dropout_rate() {
    let third = SecAggParams::default();
    let tenth = SecAggParams {
        dropout: 0.1,
        ..third
    };
    // (params, n) → k; small rosters use the complete graph.
    let table = [
        (third, 3, 2),
        (third, 12, 11),
        (third, 100, 99),
        (third, 1000, 312),
        (third, 10_000, 350),
        (tenth, 1000, 38),
        (tenth, 10_000, 42),
        (
            SecAggParams {
                dropout: 0.0,
                ..third
            },
            1000,
            2,
        ),
        (
            SecAggParams {
                neighbours: Some(16),
                ..third
            },
            1000,
            16,
        ),
    ];
    for (params, n, k) in table {
        assert_eq!(params.neighbours_for(n), k, "n = {n}, {params:?}");
        assert_eq!(params.resolved(n).neighbours, Some(k));
        assert_eq!(params.resolved(n).neighbours_for(n + 500), k);
    }
    // The bound holds at the chosen size and not one size below.
    let tail = |k: usize| 1000.0 * binomial_at_most(k, 2.0 / 3.0, k / 2);
    assert!(tail(312) <= SecAggParams::FAILURE_BOUND);
    assert!(tail(310) > SecAggParams::FAILURE_BOUND);
    // The binomial tail against exact sums.
    assert!((binomial_at_most(4, 0.5, 1) - 5.0 / 16.0).abs() < 1e-12);
    assert!((binomial_at_most(10, 0.3, 10) - 1.0).abs() < 1e-12);
    assert!((binomial_at_most(3, 0.9, 0) - 0.001).abs() < 1e-12);
}

#[test]
fn a_thousand_clients_keep_their_thresholds_with_a_third_dropping_at_random() {
    let n = 1000;
    let sim = Sim::with(SecAggParams::default(), n, 1, 7);
    assert_eq!(
        (sim.roster.holders_len(), sim.roster.threshold()),
        (313, 157)
    );
    let narrow = Sim::new(32, n, 1, 7);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut narrow_failures = 0;
    for _ in 0..200 {
        let fates = random_fates(n, 1.0 / 3.0, Fate::DropsAfterSharing, &mut rng);
        assert!(sim.feasible(&fates));
        if !narrow.feasible(&fates) {
            narrow_failures += 1;
        }
    }
    // Fixed neighbourhoods of 33 lose half of some neighbourhood in most
    // rounds at this rate.
    assert!(narrow_failures > 150, "{narrow_failures}");
}

#[test]
fn two_hundred_clients_recover_a_fifth_dropping_at_random() {
    let (n, dim) = (200, 64);
    let params = SecAggParams {
        dropout: 0.2,
        ..SecAggParams::default()
    };
    let mut sim = Sim::with(params, n, dim, 2024);
    let k = params.neighbours_for(n);
    assert!(!sim.roster.is_complete());
    assert_eq!(sim.roster.holders_len(), k + 1);
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    for fate in [Fate::DropsAfterSharing, Fate::DropsBeforeSharing] {
        let fates = random_fates(n, 0.2, fate, &mut rng);
        assert!(fates.iter().filter(|&&f| f == fate).count() > 20);
        let sum = sim.run(&fates).unwrap();
        sim.assert_sum(&fates, &sum);
    }
}

#[test]
fn a_neighbourhood_losing_half_is_too_few_not_a_wrong_sum() {
    let n = 200;
    let mut sim = Sim::new(16, n, 8, 99);
    assert_eq!((sim.roster.holders_len(), sim.roster.threshold()), (17, 9));
    // Nine consecutive clients: client 100's 17 holders keep only 8.
    let mut fates = vec![Fate::Stays; n];
    for f in &mut fates[92..101] {
        *f = Fate::DropsAfterSharing;
    }
    assert!(!sim.feasible(&fates));
    assert!(matches!(
        sim.run(&fates),
        Err(Error::TooFew { need: 9, .. })
    ));
}

#[test]
fn half_dropping_in_the_complete_graph_is_refused_by_the_clients() {
    // Nine clients, threshold 5: five dropping leaves four.
    let mut sim = Sim::new(8, 9, 4, 3);
    assert_eq!(sim.roster.threshold(), 5);
    for fate in [Fate::DropsAfterSharing, Fate::DropsBeforeSharing] {
        let fates = fates_with(9, 5, fate, 1);
        assert!(matches!(
            sim.run(&fates),
            Err(Error::TooFew {
                need: 5,
                have: 4,
                ..
            })
        ));
        // Four dropping leaves five, enough.
        let fates = fates_with(9, 4, fate, 1);
        let sum = sim.run(&fates).unwrap();
        sim.assert_sum(&fates, &sum);
    }
}

/// Runs rounds 1 to 3 with everyone staying and returns what the hub holds
/// before finishing: the aggregator, U2 and the revealed shares.
fn hub_before_finish(
    sim: &mut Sim,
    fates: &[Fate],
) -> (Aggregator, Vec<usize>, Vec<RevealedShare>) {
    let u2: Vec<usize> = (0..sim.n())
        .filter(|&i| fates[i] != Fate::DropsBeforeSharing)
        .collect();
    let outbox = sim.share_all(&u2);
    let mut aggregator = Aggregator::new(&sim.roster, sim.dim()).unwrap();
    for &i in u2.iter().filter(|&&i| fates[i] == Fate::Stays) {
        let y = mask_input(
            &sim.secrets[i],
            &sim.roster,
            i,
            &u2,
            &sim.inputs[i],
            sim.dim(),
        )
        .unwrap();
        aggregator.add_masked(i, &y).unwrap();
    }
    let u3 = aggregator.survivors();
    let revealed = u3
        .iter()
        .flat_map(|&i| {
            unmask(
                &sim.secrets[i],
                &sim.roster,
                i,
                &u2,
                &u3,
                &addressed_to(&outbox, i),
            )
            .unwrap()
        })
        .collect();
    (aggregator, u2, revealed)
}

#[test]
fn the_hub_refuses_to_finish_with_fewer_than_t_shares_of_a_client() {
    let mut sim = Sim::new(5, 6, 3, 11);
    let t = sim.roster.threshold();
    assert_eq!(t, 4);
    let fates = vec![Fate::Stays; 6];
    let (aggregator, u2, mut revealed) = hub_before_finish(&mut sim, &fates);
    // Keep only t - 1 shares of client 2.
    let mut kept = 0;
    revealed.retain(|r| {
        if r.of != 2 {
            return true;
        }
        kept += 1;
        kept < t
    });
    assert!(matches!(
        aggregator.finish(&u2, &revealed),
        Err(Error::TooFew {
            need: 4,
            have: 3,
            ..
        })
    ));
}

#[test]
fn a_corrupt_mask_key_share_is_caught_not_summed() {
    let mut sim = Sim::new(6, 7, 5, 12);
    let mut fates = vec![Fate::Stays; 7];
    fates[3] = Fate::DropsAfterSharing;
    let (aggregator, u2, mut revealed) = hub_before_finish(&mut sim, &fates);
    // The lowest holder's share is always among those interpolated.
    let victim = revealed
        .iter_mut()
        .filter(|r| r.of == 3)
        .min_by_key(|r| r.share.x)
        .unwrap();
    assert_eq!(victim.kind, ShareKind::MaskKey);
    victim.share.y[0] = (victim.share.y[0] + 1) % shamir::P;
    assert!(matches!(
        aggregator.finish(&u2, &revealed),
        Err(Error::SecAgg(_))
    ));
}

#[test]
fn a_masked_input_looks_nothing_like_the_encoding() {
    let dim = 4096;
    let sim = Sim::new(4, 5, dim, 21);
    let u2: Vec<usize> = (0..5).collect();
    let x = vec![0.25f32; dim];
    let encoded = sim.roster.params().fixed.encode(&x);
    let y = mask_input(&sim.secrets[0], &sim.roster, 0, &u2, &x, dim).unwrap();
    let equal = y.iter().zip(&encoded).filter(|(a, b)| a == b).count();
    assert!(equal <= 1, "{equal} coordinates left unmasked");
    // The masked words look uniform: about half of their bits are set
    // (mean 65,536, standard deviation 256).
    let ones: u32 = y.iter().map(|w| w.count_ones()).sum();
    assert!((64_000..67_000).contains(&ones), "{ones} bits set");
    // The same input masked in a fresh round (new secrets) is unrelated.
    let other = Sim::new(4, 5, dim, 22);
    let y2 = mask_input(&other.secrets[0], &other.roster, 0, &u2, &x, dim).unwrap();
    assert!(y.iter().zip(&y2).filter(|(a, b)| a == b).count() <= 1);
}

#[test]
fn a_tampered_share_does_not_authenticate() {
    let mut sim = Sim::new(4, 5, 2, 31);
    let all: Vec<usize> = (0..5).collect();
    let outbox = sim.share_all(&all);
    assert!(
        outbox
            .iter()
            .all(|s| s.ciphertext.len() == SHARE_CIPHERTEXT_LEN)
    );
    let clean = addressed_to(&outbox, 1);
    for byte in [0, NONCE_LEN, SHARE_CIPHERTEXT_LEN - 1] {
        let mut received = clean.clone();
        received[0].ciphertext[byte] ^= 1;
        let refused = unmask(&sim.secrets[1], &sim.roster, 1, &all, &all, &received);
        assert!(matches!(refused, Err(Error::SecAgg(_))), "byte {byte}");
    }
    // Relabelling the sender is caught by the associated data.
    let mut received = clean.clone();
    let (a, b) = (received[0].from, received[1].from);
    received[0].from = b;
    received[1].from = a;
    assert!(matches!(
        unmask(&sim.secrets[1], &sim.roster, 1, &all, &all, &received),
        Err(Error::SecAgg(_))
    ));
    let mut truncated = clean.clone();
    truncated[0].ciphertext.pop();
    assert!(matches!(
        unmask(&sim.secrets[1], &sim.roster, 1, &all, &all, &truncated),
        Err(Error::SecAgg(_))
    ));
    assert!(unmask(&sim.secrets[1], &sim.roster, 1, &all, &all, &clean).is_ok());
}

#[test]
fn shares_from_another_round_do_not_decrypt() {
    let mut sim = Sim::new(4, 5, 2, 41);
    let all: Vec<usize> = (0..5).collect();
    let outbox = sim.share_all(&all);
    // The same clients and keys, the next round.
    let next = Roster::new(
        sim.roster.params(),
        b"task 1, round 2",
        sim.roster.all_keys().to_vec(),
    )
    .unwrap();
    assert_ne!(next.digest(), sim.roster.digest());
    let refused = unmask(
        &sim.secrets[2],
        &next,
        2,
        &all,
        &all,
        &addressed_to(&outbox, 2),
    );
    assert!(matches!(refused, Err(Error::SecAgg(_))));
    // The masks change too, so old masked inputs do not combine with new.
    let x = vec![0.5f32; 2];
    let old = mask_input(&sim.secrets[2], &sim.roster, 2, &all, &x, 2).unwrap();
    let new = mask_input(&sim.secrets[2], &next, 2, &all, &x, 2).unwrap();
    assert_ne!(old, new);
}

#[test]
fn clients_refuse_inconsistent_requests() {
    // Seven clients, two neighbours each: client 0 holds shares of 6, 0, 1.
    let mut sim = Sim::new(2, 7, 2, 51);
    let all: Vec<usize> = (0..7).collect();
    let outbox = sim.share_all(&all);
    let (r, s) = (&sim.roster, &sim.secrets);
    let x = [0.1f32, 0.2];
    let mine = addressed_to(&outbox, 0);
    let secagg = |result: Result<Vec<RevealedShare>>| matches!(result, Err(Error::SecAgg(_)));

    // Survivors that did not share keys, and a client not among survivors.
    assert!(secagg(unmask(
        &s[0],
        r,
        0,
        &[0, 1, 2, 3, 4, 5],
        &all,
        &mine
    )));
    assert!(secagg(unmask(
        &s[0],
        r,
        0,
        &all,
        &[1, 2, 3, 4, 5, 6],
        &mine
    )));
    // Indices outside the roster.
    assert!(secagg(unmask(
        &s[0],
        r,
        0,
        &[0, 1, 2, 3, 4, 5, 6, 7],
        &all,
        &mine
    )));
    // Another client's roster entry.
    assert!(secagg(unmask(&s[1], r, 0, &all, &all, &mine)));
    // A share addressed to someone else, from a non-neighbour, repeated,
    // missing, or from a client outside U2.
    let mut misaddressed = mine.clone();
    misaddressed.push(addressed_to(&outbox, 1)[0].clone());
    assert!(secagg(unmask(&s[0], r, 0, &all, &all, &misaddressed)));
    let mut stranger = mine.clone();
    stranger.extend(
        addressed_to(&outbox, 3)
            .into_iter()
            .filter(|e| e.from == 3)
            .map(|mut e| {
                e.to = 0;
                e
            }),
    );
    assert!(secagg(unmask(&s[0], r, 0, &all, &all, &stranger)));
    let mut repeated = mine.clone();
    repeated.push(mine[0].clone());
    assert!(secagg(unmask(&s[0], r, 0, &all, &all, &repeated)));
    assert!(secagg(unmask(&s[0], r, 0, &all, &all, &mine[1..])));
    let without_six = [0, 1, 2, 3, 4, 5];
    assert!(secagg(unmask(
        &s[0],
        r,
        0,
        &without_six,
        &[0, 1, 2, 3, 4],
        &mine
    )));
    // The consistent request succeeds and reveals one share per holder.
    let revealed = unmask(&s[0], r, 0, &all, &all, &mine).unwrap();
    assert_eq!(revealed.len(), 3);
    assert!(
        revealed
            .iter()
            .all(|v| v.kind == ShareKind::SelfSeed && v.holder == 0 && v.share.x == 1)
    );

    // Masking: not in U2, wrong length, non-finite values.
    assert!(matches!(
        mask_input(&s[0], r, 0, &[1, 2, 3], &x, 2),
        Err(Error::SecAgg(_))
    ));
    assert!(matches!(
        mask_input(&s[0], r, 0, &all, &x, 3),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        mask_input(&s[0], r, 0, &all, &[f32::NAN, 0.0], 2),
        Err(Error::Invalid { .. })
    ));
    // Holders 6 and 1 both missing from U2 leave one of three, below t = 2.
    assert!(matches!(
        mask_input(&s[0], r, 0, &[0, 2, 3, 4, 5], &x, 2),
        Err(Error::TooFew {
            need: 2,
            have: 1,
            ..
        })
    ));
}

#[test]
fn the_aggregator_refuses_bad_inputs() {
    let mut sim = Sim::new(4, 5, 3, 61);
    assert!(matches!(
        Aggregator::new(&sim.roster, 0),
        Err(Error::Invalid { .. })
    ));
    let mut aggregator = Aggregator::new(&sim.roster, 3).unwrap();
    assert!(matches!(
        aggregator.add_masked(5, &[0; 3]),
        Err(Error::SecAgg(_))
    ));
    assert!(matches!(
        aggregator.add_masked(0, &[0; 2]),
        Err(Error::Shape { .. })
    ));
    aggregator.add_masked(0, &[0; 3]).unwrap();
    assert!(matches!(
        aggregator.add_masked(0, &[0; 3]),
        Err(Error::SecAgg(_))
    ));
    assert_eq!(aggregator.count(), 1);
    // A survivor that never shared keys.
    assert!(matches!(
        aggregator.finish(&[1, 2, 3, 4], &[]),
        Err(Error::SecAgg(_))
    ));
    // Nobody survived.
    let empty = Aggregator::new(&sim.roster, 3).unwrap();
    assert!(matches!(
        empty.finish(&[0, 1, 2, 3, 4], &[]),
        Err(Error::TooFew { .. })
    ));

    let mut fates = vec![Fate::Stays; 5];
    fates[4] = Fate::DropsAfterSharing;
    let (aggregator, u2, revealed) = hub_before_finish(&mut sim, &fates);
    let tampered: [fn(&mut RevealedShare); 4] = [
        // The wrong kind for a survivor, a holder that did not survive, an
        // x coordinate that is not the holder's, a client outside U2.
        |r| r.kind = ShareKind::MaskKey,
        |r| r.holder = 4,
        |r| r.share.x += 1,
        |r| r.of = 9,
    ];
    for (k, tamper) in tampered.iter().enumerate() {
        let mut bad = revealed.clone();
        let target = bad.iter_mut().find(|r| r.of == 0).unwrap();
        tamper(target);
        let fresh = hub_before_finish(&mut sim, &fates).0;
        assert!(
            matches!(fresh.finish(&u2, &bad), Err(Error::SecAgg(_))),
            "tampering {k}"
        );
    }
    let mut repeated = revealed.clone();
    repeated.push(*revealed.iter().find(|r| r.of == 0).unwrap());
    let fresh = hub_before_finish(&mut sim, &fates).0;
    assert!(matches!(
        fresh.finish(&u2, &repeated),
        Err(Error::SecAgg(_))
    ));
    let sum = aggregator.finish(&u2, &revealed).unwrap();
    sim.assert_sum(&fates, &sum);
}

#[test]
fn roster_graph_and_thresholds() {
    // (n, neighbours) → (holders, threshold, complete)
    let table = [
        ((3, 1), (3, 2, true)),
        ((5, 2), (3, 2, false)),
        ((5, 3), (5, 3, true)),
        ((10, 4), (5, 3, false)),
        ((10, 9), (10, 6, true)),
        ((10, 100), (10, 6, true)),
        ((100, 32), (33, 17, false)),
        ((1000, 16), (17, 9, false)),
    ];
    let mut rng = ChaCha20Rng::seed_from_u64(71);
    for ((n, k), (h, t, complete)) in table {
        let params = SecAggParams {
            neighbours: Some(k),
            ..SecAggParams::default()
        };
        let keys = (0..n)
            .map(|_| ClientSecrets::generate(&mut rng).public_keys())
            .collect();
        let roster = Roster::new(&params, b"", keys).unwrap();
        assert_eq!(
            (
                roster.holders_len(),
                roster.threshold(),
                roster.is_complete()
            ),
            (h, t, complete),
            "n = {n}, k = {k}"
        );
        for i in [0, n / 2, n - 1] {
            let mut holders: Vec<usize> = roster.holders(i).collect();
            assert_eq!(holders[0], i);
            holders.sort_unstable();
            holders.dedup();
            assert_eq!(holders.len(), h, "holders of {i} repeat");
            for j in 0..n {
                assert_eq!(
                    roster.is_neighbour(i, j),
                    roster.neighbours(i).any(|v| v == j)
                );
                assert_eq!(roster.is_neighbour(i, j), roster.is_neighbour(j, i));
                assert_eq!(roster.holds(j, i), holders.binary_search(&j).is_ok());
            }
        }
    }
    let mut rng = ChaCha20Rng::seed_from_u64(72);
    let roster = Roster::new(
        &SecAggParams {
            neighbours: Some(4),
            ..SecAggParams::default()
        },
        b"",
        (0..10)
            .map(|_| ClientSecrets::generate(&mut rng).public_keys())
            .collect(),
    )
    .unwrap();
    assert_eq!(roster.neighbours(0).collect::<Vec<_>>(), [1, 9, 2, 8]);
}

#[test]
fn roster_refuses_bad_rounds() {
    let mut rng = ChaCha20Rng::seed_from_u64(81);
    let keys: Vec<PublicKeys> = (0..4)
        .map(|_| ClientSecrets::generate(&mut rng).public_keys())
        .collect();
    let params = SecAggParams::default();
    let invalid = |p: &SecAggParams, k: Vec<PublicKeys>| {
        matches!(Roster::new(p, b"", k), Err(Error::Invalid { .. }))
    };
    assert!(invalid(&params, keys[..2].to_vec()));
    assert!(invalid(
        &SecAggParams {
            neighbours: Some(0),
            ..params
        },
        keys.clone()
    ));
    for dropout in [-0.1, 0.5, 0.9, f64::NAN] {
        assert!(invalid(&SecAggParams { dropout, ..params }, keys.clone()));
    }
    let mut twice = keys.clone();
    twice[3] = twice[1];
    assert!(invalid(&params, twice));
    let mut shared_mask_key = keys.clone();
    shared_mask_key[3].mask_pk = shared_mask_key[0].mask_pk;
    assert!(invalid(&params, shared_mask_key));
    let overflowing = SecAggParams {
        fixed: FixedPoint {
            scale_bits: 24,
            clip: 100.0,
        },
        ..params
    };
    assert!(invalid(&overflowing, keys.clone()));
    assert!(Roster::new(&params, b"", keys).is_ok());
}

#[test]
fn a_small_order_peer_key_is_refused() {
    let mut sim = Sim::new(4, 5, 2, 91);
    let mut keys = sim.roster.all_keys().to_vec();
    // Points of small order (u = 0 and u = 1): the shared secret with them
    // is the same whatever the other key, so anyone can compute it.
    keys[1].mask_pk = [0; 32];
    keys[1].cipher_pk = [0; 32];
    keys[1].cipher_pk[0] = 1;
    let roster = Roster::new(sim.roster.params(), b"x", keys).unwrap();
    let all: Vec<usize> = (0..5).collect();
    assert!(matches!(
        share_keys(&sim.secrets[0], &roster, 0, &mut sim.rng),
        Err(Error::SecAgg(_))
    ));
    assert!(matches!(
        mask_input(&sim.secrets[0], &roster, 0, &all, &[0.0, 0.0], 2),
        Err(Error::SecAgg(_))
    ));
}

#[test]
fn messages_round_trip_through_json() {
    let mut sim = Sim::new(4, 5, 2, 101);
    let all: Vec<usize> = (0..5).collect();
    let outbox = sim.share_all(&all);
    let revealed = unmask(
        &sim.secrets[0],
        &sim.roster,
        0,
        &all,
        &all,
        &addressed_to(&outbox, 0),
    )
    .unwrap();
    fn round_trip<
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    >(
        v: &T,
    ) {
        let json = serde_json::to_string(v).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v, "{json}");
    }
    round_trip(&SecAggParams::default());
    round_trip(&sim.roster.keys(0).clone());
    round_trip(&outbox[0]);
    round_trip(&revealed[0]);
    assert!(
        serde_json::to_string(&revealed[0])
            .unwrap()
            .contains(r#""kind":"self_seed""#)
    );
}
