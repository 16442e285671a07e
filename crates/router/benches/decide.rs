//! The cost of one routing decision, privacy classification included, on a
//! realistic mix of prompts.
//!
//! Run: `cargo bench -p router --bench decide` (add `-- --quick` for a
//! short run).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use router::{BreakerState, CompiledPolicy, Kind, LiveState, Policy, Request, TierState, decide};

const COMMAND: &str = "turn on the kitchen lights";

const QUESTION: &str = "I am planning a small vegetable garden behind the house this spring. \
The plot is about four by six metres, gets full sun in the morning and partial shade after \
3 pm, and the soil is fairly heavy clay that stays wet for a day or two after rain. I would \
like to grow tomatoes, courgettes, beans, lettuce and a few herbs such as basil and parsley. \
Which of these will cope best with the clay, how should I improve the soil before planting, \
and how far apart should the rows be? Also, is it worth building two raised beds of 1.2 m by \
2.4 m instead, and roughly how much compost would I need to fill them 30 cm deep?";

const EMAIL_AND_CARD: &str = "Please book the hotel for the 21st and send the confirmation to \
ann.lee@example.com. Charge it to my card 4111 1111 1111 1111, expiry 09/28, and ask for a \
quiet room away from the lift.";

const IBAN: &str = "Transfer 250 EUR to my landlord today, IBAN DE89 3704 0044 0532 0130 00, \
reference: rent November, and remind me on Friday if it has not gone through.";

/// Non-ASCII text with digits, which runs the national-id patterns.
const NON_ASCII: &str = "Könnten Sie bitte die Heizung im Wohnzimmer auf 21 °C stellen und \
um 22:30 Uhr wieder auf 18 °C absenken? Außerdem möchte ich wissen, wie viel Strom die \
Wärmepumpe gestern zwischen 6 und 9 Uhr verbraucht hat – im Vergleich zur Vorwoche. Danke! \
Und noch etwas: Läuft die Spülmaschine schon, oder startet sie erst um 23 Uhr? 😊";

fn request(text: &str) -> Request<'_> {
    Request {
        kind: Kind::Chat,
        text,
        app: Some("assistant"),
        mode: None,
        caller_private: false,
        prompt_tokens: (text.len() / 4) as u32,
        max_tokens: 256,
        needs_tools: false,
        intent: None,
        latency_budget_ms: Some(2000),
    }
}

fn state() -> LiveState {
    LiveState {
        local: TierState {
            available: true,
            context_tokens: 8192,
            supports_tools: false,
            latency_ms: Some(900.0),
        },
        remote: TierState {
            available: true,
            context_tokens: 32_768,
            supports_tools: true,
            latency_ms: Some(1400.0),
        },
        hub_connected: true,
        breaker: BreakerState::Closed,
        spent_today_usd: 0.12,
    }
}

fn bench(c: &mut Criterion) {
    let policy = CompiledPolicy::new(Policy::from_toml(router::EXAMPLE_POLICY).unwrap()).unwrap();
    let state = state();
    let mut group = c.benchmark_group("decide");
    for (name, text) in [
        ("command", COMMAND),
        ("question_500b", QUESTION),
        ("email_and_card", EMAIL_AND_CARD),
        ("iban", IBAN),
        ("non_ascii_500b", NON_ASCII),
    ] {
        let req = request(text);
        group.bench_function(name, |b| {
            b.iter(|| decide(black_box(&req), black_box(&policy), black_box(&state)))
        });
    }
    group.finish();
}

/// Percentiles of single decisions over the mix: criterion reports the
/// mean and median of batches, and the target is on the 99th percentile of
/// one call, so each call is also timed on its own here (`Instant` adds
/// some tens of nanoseconds to each).
fn percentiles(_c: &mut Criterion) {
    let policy = CompiledPolicy::new(Policy::from_toml(router::EXAMPLE_POLICY).unwrap()).unwrap();
    let state = state();
    let texts = [COMMAND, QUESTION, EMAIL_AND_CARD, IBAN, NON_ASCII];
    let requests: Vec<Request<'_>> = texts.iter().map(|t| request(t)).collect();
    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let req = &requests[i % requests.len()];
        let t = std::time::Instant::now();
        black_box(decide(
            black_box(req),
            black_box(&policy),
            black_box(&state),
        ));
        samples.push(t.elapsed());
    }
    samples.sort();
    let at = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "decide/mix: {n} single calls: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        at(0.50),
        at(0.99),
        at(0.999),
        samples[n - 1]
    );
}

criterion_group!(benches, bench, percentiles);
criterion_main!(benches);
