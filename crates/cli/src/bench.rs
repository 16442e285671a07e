//! `strata bench …`: Strata's runtime measured side by side with the peers
//! the field uses, in one run, on the same files and the same thread count.
//!
//! `strata bench runtime` has three parts, each in its own module:
//!
//! - [`llm`]: prefill and decode tokens/s of `runtime::LlmModel` against
//!   llama.cpp's own `llama-bench`, alternating the two;
//! - [`embed`]: sentences/s of `runtime::Embedder` at batch 1 and 32 against
//!   the numpy (and ONNX Runtime) peers in `bench/peers/`;
//! - [`http`]: time to first token and streamed tokens/s through the HTTP API
//!   of a real enrolled agent against `llama-server`, and the agent's peak
//!   memory with its micro-LLM, embedder and intent head loaded.
//!
//! The peers come from `scripts/build-peers`, the models from
//! `scripts/fetch-assets`; [`setup`] finds them and says which script to run
//! when one is missing. [`report`] prints the table and writes the JSON.
//! `strata bench anomaly` ([`anomaly`]) compares the streaming anomaly
//! detector with river's on the shuttle stream. `strata bench insights`
//! ([`insights`]) measures the outbox and the hub's insight store.
//! `strata bench rollout` ([`rollout`]) rolls a release out to a simulated
//! fleet against a real hub. `strata bench fl-aggregate` ([`fl_aggregate`])
//! compares the federated aggregation strategies with Flower's.

mod anomaly;
mod embed;
mod fl_aggregate;
mod http;
mod insights;
mod llm;
mod report;
mod rollout;
mod route;
mod route_eval;
pub(crate) mod setup;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use crate::output::out;
use report::Report;
use setup::{Paths, Progress, WorkDir};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Measure the runtime side by side with llama.cpp and the embedding
    /// peers: LLM prefill/decode, HTTP time to first token and tokens/s,
    /// embeddings/s, and the agent's peak memory.
    ///
    /// Every comparison runs in this one invocation, on the same GGUF, the
    /// same sentences and the same thread count, alternating Strata and the
    /// peer so that noise from other work on the machine hits both; each
    /// number is the median over the rounds, and the ratio the median of the
    /// per-round ratios (each pair ran back to back). Prints a table with
    /// Strata's number, the peer's, their ratio and the target.
    ///
    /// Needs the models (`scripts/fetch-assets`) and the peers
    /// (`scripts/build-peers`: llama-bench, llama-server and a Python venv).
    Runtime(RuntimeArgs),
    /// Strata's streaming Half-Space Trees against river's HalfSpaceTrees
    /// on the same shuttle stream, in one run: ROC-AUC, F1 and readings per
    /// second. Needs the data (`scripts/fetch-assets`) and the peers' Python
    /// environment (`scripts/build-peers`).
    Anomaly(anomaly::AnomalyArgs),
    /// The device outbox and the hub's insight store: durable appends per
    /// second (group commit), hub ingest per second on SQLite, and the disk
    /// and memory each takes per million insights. Needs nothing installed.
    Insights(insights::InsightsArgs),
    /// A staged rollout to a simulated fleet (1,000 devices by default)
    /// against a real hub process: each device enrolls, holds its mTLS
    /// event stream, verifies the signed metadata, downloads and checks the
    /// artifact, and reports installed then committed. Prints the time from
    /// create to 100% committed and the hub's CPU and memory over it.
    /// Needs nothing installed.
    Rollout(rollout::RolloutArgs),
    /// The router against always-local, always-macro and random routing on
    /// a labelled evaluation set built from real text (Home Assistant
    /// commands, fleet questions, presidio-evaluator prompts with and
    /// without personal data): privacy violations, share answered locally,
    /// answer quality against the macro answer, cost, and p50/p95 latency,
    /// with a real hub running Qwen2.5-Coder-0.5B and a real device.
    /// Needs the models (`scripts/fetch-assets`).
    Route(route::RouteArgs),
    /// Federated aggregation against Flower 1.42's server-side aggregation
    /// on the same generated updates (1,000 updates of 1,000,000 parameters
    /// by default), in one run: time and peak memory of FedAvg, coordinate-
    /// wise median, trimmed mean and Multi-Krum, each side in a process of
    /// its own per strategy, and the largest difference between the two
    /// aggregates. Needs Flower's Python environment (`scripts/build-peers`).
    FlAggregate(fl_aggregate::FlAggregateArgs),
    /// Internal: Strata's side of the LLM benchmark, run as a child process
    /// as llama-bench is.
    #[command(hide = true)]
    LlmWorker(llm::WorkerArgs),
    /// Internal: Strata's side of the embedding benchmark, run as a child
    /// process so that its thread pools start with the requested size.
    #[command(hide = true)]
    EmbedWorker(embed::WorkerArgs),
    /// Internal: Strata's side of the federated aggregation benchmark, one
    /// strategy per process so that its peak memory is that strategy's own.
    #[command(hide = true)]
    FlAggregateWorker(fl_aggregate::WorkerArgs),
}

/// A part of `strata bench runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Part {
    /// LLM prefill and decode tokens/s against llama-bench.
    Llm,
    /// Sentence embeddings/s at batch 1 and 32 against the Python peers.
    Embeddings,
    /// HTTP time to first token and tokens/s against llama-server, and the
    /// agent's peak memory.
    Http,
}

#[derive(Debug, Args)]
pub(crate) struct RuntimeArgs {
    /// Directory of the models and data sets from `scripts/fetch-assets`
    /// [default: $XDG_CACHE_HOME/strata/assets, else ~/.cache/strata/assets].
    #[arg(long, env = "STRATA_ASSETS")]
    assets: Option<PathBuf>,
    /// Directory of the peers from `scripts/build-peers` (bin/llama-bench,
    /// bin/llama-server, venv/) [default: $XDG_CACHE_HOME/strata/peers,
    /// else ~/.cache/strata/peers].
    #[arg(long, env = "STRATA_PEERS")]
    peers: Option<PathBuf>,
    /// Directory of the peer programs (embed_numpy.py, embed_onnx.py)
    /// [default: bench/peers in the current directory or above the strata
    /// binary].
    #[arg(long)]
    peer_scripts: Option<PathBuf>,
    /// CPU threads for every engine: llama.cpp's -t, Strata's LLM threads,
    /// the embedding encoder's threads and the
    /// peers' BLAS/ONNX Runtime threads (OMP_NUM_THREADS and kin).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Prompt length of the LLM benchmark in tokens (llama-bench -p).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1536))]
    prompt_tokens: u32,
    /// Tokens generated per LLM run and per HTTP request (llama-bench -n,
    /// max_tokens).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..=512))]
    gen_tokens: u32,
    /// Repetitions within a round: generations per engine (llama-bench -r),
    /// timed passes over the sentences per embedding process, and HTTP
    /// requests per server.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Rounds: each round runs Strata and the peer one after the other
    /// (alternating who goes first); each reported number is the median
    /// over the rounds, each ratio the median of the rounds' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Sentences for the embedding benchmark, one a line [default: 256
    /// utterances drawn from the Home Assistant intents].
    #[arg(long)]
    sentences: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these parts (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Part>,
    /// Keep the working directory (logs, configs, the trained head) instead
    /// of removing it at the end.
    #[arg(long)]
    keep: bool,
}

/// The settings every part shares.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    threads: u32,
    prompt_tokens: u32,
    gen_tokens: u32,
    repeat: u32,
    rounds: u32,
}

impl RuntimeArgs {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

pub(crate) async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Runtime(args) => runtime_bench(args).await,
        BenchCommand::Anomaly(args) => anomaly::run(args).await,
        BenchCommand::Insights(args) => insights::run(args).await,
        BenchCommand::Rollout(args) => rollout::run(args).await,
        BenchCommand::Route(args) => route::run(args).await,
        BenchCommand::FlAggregate(args) => fl_aggregate::run(args).await,
        BenchCommand::LlmWorker(args) => llm::worker(args).await,
        BenchCommand::EmbedWorker(args) => embed::worker(args).await,
        BenchCommand::FlAggregateWorker(args) => fl_aggregate::worker(args).await,
    }
}

/// The context length Strata's LLM and llama-server are given.
const CONTEXT_LENGTH: u32 = 2048;

async fn runtime_bench(args: RuntimeArgs) -> anyhow::Result<()> {
    if args.prompt_tokens + args.gen_tokens >= CONTEXT_LENGTH {
        anyhow::bail!(
            "--prompt-tokens plus --gen-tokens must stay below the context length of {CONTEXT_LENGTH}"
        );
    }
    let settings = Settings {
        threads: args.threads,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repeat: args.repeat,
        rounds: args.rounds,
    };
    let (llm_on, embed_on, http_on) = (
        args.runs(Part::Llm),
        args.runs(Part::Embeddings),
        args.runs(Part::Http),
    );
    // Every file and program is checked before anything is measured, so a
    // missing peer fails in a second, not after minutes of measuring.
    let paths = Paths::find(
        args.assets.clone(),
        args.peers.clone(),
        args.peer_scripts.clone(),
    );
    paths.check(llm_on, embed_on, http_on)?;
    if let Some(file) = &args.sentences
        && !file.is_file()
    {
        anyhow::bail!("the sentences file {} does not exist", file.display());
    }
    let versions = paths.peer_versions(embed_on).await;
    let onnx = embed_on && versions.onnxruntime.is_some() && paths.onnx_script().exists();

    let work = WorkDir::create()?;
    let mut report = Report::new(&settings, &paths, &versions);
    if embed_on && !onnx {
        report.note(
            "ONNX Runtime peer skipped: bench/peers/embed_onnx.py or onnxruntime in the peers venv is missing (scripts/build-peers installs it)",
        );
    }
    let steps = llm::steps(&settings) * u64::from(llm_on)
        + embed::steps(&settings, onnx) * u64::from(embed_on)
        + http::steps(&settings) * u64::from(http_on)
        + 1;
    let progress = Progress::new(steps);

    let outcome = async {
        progress.step("expanding the Home Assistant intents into sentences");
        let dataset = if embed_on || http_on {
            let intents = paths.intents.clone();
            Some(
                tokio::task::spawn_blocking(move || {
                    runtime::intents::load(&intents, &runtime::intents::ExpansionOptions::default())
                })
                .await?
                .with_context(|| format!("reading {}", paths.intents.display()))?,
            )
        } else {
            None
        };
        if llm_on {
            llm::run(&settings, &paths, &progress, &mut report).await?;
        }
        if let (true, Some(dataset)) = (embed_on, &dataset) {
            embed::run(
                &settings,
                &paths,
                &work,
                dataset,
                args.sentences.as_deref(),
                onnx,
                &progress,
                &mut report,
            )
            .await?;
        }
        if let (true, Some(dataset)) = (http_on, &dataset) {
            http::run(&settings, &paths, &work, dataset, &progress, &mut report).await?;
        }
        anyhow::Ok(())
    }
    .await;
    progress.finish();
    if let Err(e) = outcome {
        // The logs of the child processes explain most failures: keep them.
        return Err(e.context(format!(
            "benchmark stopped; logs are in {}",
            work.path().display()
        )));
    }
    if args.keep {
        eprintln!("bench: kept {}", work.path().display());
    } else {
        work.remove();
    }

    out(&report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The median of some samples (`None` for none).
pub(crate) fn median(samples: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Milliseconds of a duration, as a float.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let cases: &[(&[f64], Option<f64>)] = &[
            (&[], None),
            (&[3.0], Some(3.0)),
            (&[3.0, 1.0, 2.0], Some(2.0)),
            (&[4.0, 1.0, 2.0, 3.0], Some(2.5)),
            (&[f64::NAN, 1.0], Some(1.0)),
        ];
        for (samples, want) in cases {
            assert_eq!(median(samples), *want, "{samples:?}");
        }
    }
}
