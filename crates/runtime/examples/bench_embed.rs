//! Sentence-embedding throughput of all-MiniLM-L6-v2 at batch 1 and batch 32.
//!
//! ```text
//! cargo run --release --example bench_embed [-- MODEL_DIR]
//! ```
//!
//! MODEL_DIR defaults to `$STRATA_ASSETS/all-minilm-l6-v2` (assets from
//! `scripts/fetch-assets`).

use std::path::PathBuf;
use std::time::Instant;

use runtime::{Embedder, EmbeddingConfig, EmbeddingFiles};

const SENTENCES: [&str; 32] = [
    "Turn on the kitchen lights",
    "What is the weather like tomorrow?",
    "Set a timer for ten minutes",
    "The cat sits on the mat",
    "A feline rests on the rug",
    "Play some relaxing jazz in the living room",
    "How warm is it in the bedroom right now?",
    "Lock the front door before you go to bed",
    "Remind me to water the plants every Sunday morning",
    "Is the garage door open?",
    "Dim the lights in the office to thirty percent",
    "Add milk and eggs to the shopping list",
    "The quick brown fox jumps over the lazy dog",
    "Machine learning models can run on small devices",
    "Close all the blinds upstairs",
    "What time is it in Tokyo?",
    "Skip to the next song",
    "Cancel the pasta timer",
    "The sensor reported an unusual temperature spike",
    "Edge devices answer in milliseconds without a network",
    "Turn the fan speed down to low",
    "Are any windows open on the ground floor?",
    "Start vacuuming the hallway",
    "Pause the movie in the den",
    "Set the thermostat to twenty one degrees",
    "Which lights are still on downstairs?",
    "Broadcast that dinner is ready",
    "Increase the volume by ten percent",
    "Nevermind",
    "How many doors are unlocked?",
    "The hub aggregates insights from every site",
    "Tell me a joke about computers",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => {
            let assets = std::env::var_os("STRATA_ASSETS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/strata/assets")
                });
            assets.join("all-minilm-l6-v2")
        }
    };
    let model = Embedder::load(
        "minilm",
        &EmbeddingFiles::in_dir(&dir),
        &EmbeddingConfig::default(),
    )?;

    // Warm up.
    model.embed(&SENTENCES)?;

    let rounds = 10;
    let start = Instant::now();
    for _ in 0..rounds {
        for s in SENTENCES {
            model.embed(&[s])?;
        }
    }
    let n = (rounds * SENTENCES.len()) as f64;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "batch 1:  {:.1} sentences/s ({:.2} ms per sentence)",
        n / secs,
        secs * 1000.0 / n
    );

    let start = Instant::now();
    for _ in 0..rounds {
        model.embed(&SENTENCES)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "batch 32: {:.1} sentences/s ({:.1} ms per batch)",
        n / secs,
        secs * 1000.0 / rounds as f64
    );
    Ok(())
}
