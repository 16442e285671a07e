//! Sentence embeddings per second: `runtime::Embedder` (Strata's encoder) against the
//! numpy and ONNX Runtime peers in `bench/peers/`, on the same sentences,
//! at batch 1 and batch 32, with the same number of threads.
//!
//! Both sides run as child processes with the same command line shape and
//! the same JSON output (`embed_numpy.py`'s): W untimed passes over all
//! sentences, then R timed passes; tokenisation is timed too; sentences are
//! sorted by length before they are cut into batches (as
//! sentence-transformers' `encode` and `Embedder::embed` both do).
//!
//! Threads: Strata's side runs in its own process (`strata bench
//! embed-worker --threads N`), its encoder on a team of N threads. The peers
//! get `--threads` (which sets `OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS` and
//! `MKL_NUM_THREADS` before numpy loads, and ONNX Runtime's intra-op
//! threads) and the same variables in their environment.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use runtime::intents::IntentDataset;
use runtime::{Embedder, EmbeddingConfig, EmbeddingFiles};
use serde_json::{Value, json};
use tokio::process::Command;

use super::Settings;
use super::report::{Line, Report, Target};
use super::setup::{Paths, Progress, WorkDir};
use crate::output::out;

/// Sentences in the benchmark set.
const SENTENCES: usize = 256;
/// Batch sizes measured.
const BATCHES: [usize; 2] = [1, 32];
/// Truncation in tokens: sentence-transformers' `max_seq_length` for
/// all-MiniLM-L6-v2, which the peers use too.
const MAX_LENGTH: usize = 256;
/// Untimed passes over the sentences before the timed ones, per process.
const WARMUP: u32 = 1;

/// `strata bench embed-worker`: Strata's side of the embedding benchmark.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The model directory (model.safetensors, tokenizer.json, config.json).
    #[arg(long)]
    model_dir: PathBuf,
    /// Text file, one sentence per line (blank lines skipped).
    #[arg(long)]
    sentences: PathBuf,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch_size: u32,
    /// Untimed passes over all sentences.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Timed passes; the result is their mean.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// CPU threads of the encoder.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Weight precision of the packed model: f16 or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    precision: String,
}

/// Runs the worker and prints one JSON line in the peers' format.
pub(crate) async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let line = tokio::task::spawn_blocking(move || worker_blocking(&args)).await??;
    out(&line);
    Ok(())
}

fn worker_blocking(args: &WorkerArgs) -> anyhow::Result<String> {
    let sentences = read_sentences(&args.sentences)?;
    let batch = args.batch_size as usize;
    let embedder = Embedder::load(
        "minilm",
        &EmbeddingFiles::in_dir(&args.model_dir),
        &EmbeddingConfig {
            max_length: Some(MAX_LENGTH),
            max_batch: batch.min(runtime::embedding::MAX_BATCH_LIMIT),
            threads: args.threads,
            precision: if args.precision == "f32" {
                runtime::embedding::Precision::F32
            } else {
                runtime::embedding::Precision::F16
            },
        },
    )
    .with_context(|| format!("loading {}", args.model_dir.display()))?;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let tokens: usize = embedder.token_counts(&texts)?.iter().sum();
    // `embed` sorts all texts by length and cuts them into `max_batch`
    // batches: the peers' order and batching.
    for _ in 0..args.warmup {
        embedder.embed(&texts)?;
    }
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let start = Instant::now();
        embedder.embed(&texts)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let seconds = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(json!({
        "peer": "strata",
        "batch_size": batch,
        "sentences": texts.len(),
        "seconds": seconds,
        "sentences_per_s": texts.len() as f64 / seconds,
        "threads": args.threads,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "seconds_min": times.iter().copied().fold(f64::INFINITY, f64::min),
        "tokens": tokens,
        "sorted_by_length": true,
        "max_length": MAX_LENGTH,
    })
    .to_string())
}

/// Sentences of a file, one a line, blank lines skipped (as the peers read it).
fn read_sentences(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sentences: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if sentences.is_empty() {
        bail!("no sentences in {}", path.display());
    }
    Ok(sentences)
}

/// `n` distinct sentences spread evenly over the data set (which is grouped
/// by intent, so every intent contributes).
pub(crate) fn pick_sentences(dataset: &IntentDataset, n: usize) -> Vec<String> {
    let mut seen = HashSet::new();
    let all: Vec<String> = dataset
        .examples
        .iter()
        .map(|e| e.text.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|t| !t.is_empty() && seen.insert(t.clone()))
        .collect();
    if all.len() <= n {
        return all;
    }
    (0..n).map(|i| all[i * all.len() / n].clone()).collect()
}

/// Progress steps of this part.
pub(crate) fn steps(s: &Settings, onnx: bool) -> u64 {
    let engines = 2 + u64::from(onnx);
    1 + BATCHES.len() as u64 * u64::from(s.rounds) * engines
}

/// An engine of the embedding benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Strata,
    Numpy,
    Onnx,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Strata => "Strata",
            Engine::Numpy => "numpy",
            Engine::Onnx => "ONNX Runtime",
        }
    }
}

/// Measures and adds the embedding lines to the report.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    s: &Settings,
    paths: &Paths,
    work: &WorkDir,
    dataset: &IntentDataset,
    sentences_file: Option<&Path>,
    onnx: bool,
    progress: &Progress,
    report: &mut Report,
) -> anyhow::Result<()> {
    progress.step("writing the benchmark sentences");
    let (file, sentences) = match sentences_file {
        Some(file) => (file.to_path_buf(), read_sentences(file)?),
        None => {
            let sentences = pick_sentences(dataset, SENTENCES);
            let file = work.path().join("sentences.txt");
            std::fs::write(&file, sentences.join("\n") + "\n")
                .with_context(|| format!("writing {}", file.display()))?;
            (file, sentences)
        }
    };

    let mut engines = vec![Engine::Strata, Engine::Numpy];
    if onnx {
        engines.push(Engine::Onnx);
    }
    let mut details = serde_json::Map::new();
    for batch in BATCHES {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
        let mut raw = Vec::new();
        for round in 0..s.rounds {
            // Rotate the order so no engine always runs first.
            for k in 0..engines.len() {
                let i = (k + round as usize) % engines.len();
                let engine = engines[i];
                progress.step(&format!(
                    "embeddings, batch {batch}, round {}/{}: {}",
                    round + 1,
                    s.rounds,
                    engine.name()
                ));
                let result = measure(engine, s, paths, &file, batch).await?;
                let rate = result
                    .get("sentences_per_s")
                    .and_then(Value::as_f64)
                    .with_context(|| {
                        format!("{} printed no sentences_per_s: {result}", engine.name())
                    })?;
                if let Some(t) = result.get("threads").and_then(Value::as_u64)
                    && t != u64::from(s.threads)
                {
                    report.note(&format!(
                        "{} reported {t} threads, not the {} asked for",
                        engine.name(),
                        s.threads
                    ));
                }
                samples[i].push(rate);
                raw.push(result);
            }
        }
        for (i, engine) in engines.iter().enumerate().skip(1) {
            let id = match (batch, engine) {
                (1, Engine::Numpy) => "embed_b1_numpy",
                (1, _) => "embed_b1_onnx",
                (_, Engine::Numpy) => "embed_b32_numpy",
                _ => "embed_b32_onnx",
            };
            report.line(Line::new(
                id,
                format!("embeddings, batch {batch}, {} sentences", sentences.len()),
                "sent/s",
                &samples[0],
                engine.name(),
                &samples[i],
                Target::AtLeast(1.0),
            ));
        }
        details.insert(format!("batch_{batch}"), Value::Array(raw));
    }
    details.insert("sentences".into(), json!(sentences.len()));
    details.insert(
        "sentences_file".into(),
        json!(sentences_file.map(|f| f.display().to_string())),
    );
    report.detail("embeddings", Value::Object(details));
    Ok(())
}

/// One process run of an engine over the sentences file.
async fn measure(
    engine: Engine,
    s: &Settings,
    paths: &Paths,
    sentences: &Path,
    batch: usize,
) -> anyhow::Result<Value> {
    let threads = s.threads.to_string();
    let mut cmd = match engine {
        Engine::Strata => {
            let exe = std::env::current_exe().context("locating the strata binary")?;
            let mut cmd = Command::new(exe);
            cmd.args(["bench", "embed-worker", "--threads", &threads])
                .env("STRATA_LOG", "warn");
            cmd
        }
        Engine::Numpy | Engine::Onnx => {
            let script = if engine == Engine::Numpy {
                paths.numpy_script()
            } else {
                paths.onnx_script()
            };
            let mut cmd = Command::new(&paths.python);
            cmd.arg(script)
                .args(["--threads", &threads])
                .env("OMP_NUM_THREADS", &threads)
                .env("OPENBLAS_NUM_THREADS", &threads)
                .env("MKL_NUM_THREADS", &threads);
            cmd
        }
    };
    cmd.arg("--model-dir")
        .arg(&paths.minilm)
        .arg("--sentences")
        .arg(sentences)
        .args(["--batch-size", &batch.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(["--repeat", &s.repeat.to_string()])
        .stdin(Stdio::null());
    let output = cmd
        .output()
        .await
        .with_context(|| format!("running the {} embedding benchmark", engine.name()))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!(
            "the {} embedding benchmark failed ({}): {last}",
            engine.name(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).with_context(|| {
        format!(
            "the {} embedding benchmark printed no JSON line (got {last:?})",
            engine.name()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::intents::IntentExample;

    #[test]
    fn picks_distinct_sentences_evenly() {
        let examples: Vec<IntentExample> = (0..10)
            .map(|i| IntentExample {
                text: format!("sentence  {}", i / 2),
                intent: "I".into(),
            })
            .collect();
        let dataset = IntentDataset {
            intents: vec!["I".into()],
            examples,
        };
        // 5 distinct sentences, whitespace normalised.
        assert_eq!(pick_sentences(&dataset, 10).len(), 5);
        assert_eq!(
            pick_sentences(&dataset, 2),
            vec!["sentence 0".to_owned(), "sentence 2".to_owned()]
        );
    }
}
