//! LLM prefill and decode: `runtime::LlmModel` against llama.cpp's own
//! `llama-bench`, on the same GGUF with the same thread count.
//!
//! Strata evaluates a fixed prompt of `--prompt-tokens` tokens and then
//! greedily generates `--gen-tokens` tokens; its [`runtime::Timings`] give
//! prefill and decode tokens/s. Like `llama-bench`, Strata's side runs as a
//! process of its own (`strata bench llm-worker`: load, one warm-up
//! generation, `--repeat` timed ones), so both pay the same start-up and
//! neither shares its address space or threads with the other. `llama-bench` runs `-p N` (prefill of N
//! tokens into an empty context) and `-n M -d N` (M single-token decodes
//! after N tokens already in the context): the decode Strata does, at the
//! same depth. Its `-d 0` decode, the number llama-bench prints by default,
//! is recorded too. Each round runs both, alternating which goes first, and
//! the reported numbers are medians over the rounds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use runtime::{GenerationRequest, LlmConfig, LlmModel, Prompt, SamplingParams};
use serde_json::{Value, json};
use tokio::process::Command;

use super::report::{Line, Report, Target};
use super::setup::{Paths, Progress};
use super::{CONTEXT_LENGTH, Settings, median};
use crate::output::out;

/// Text the fixed prompt is cut from. Greedy decoding of repeated prose
/// keeps going (it does not end its turn), so every run decodes the same
/// number of tokens.
const PROMPT_TEXT: &str = "Edge devices run small models close to where the data is born. \
    They answer in milliseconds, keep private data on the device, and keep working when the \
    network is down. A hub in the data centre adds a bigger model and sees the whole fleet. ";

/// Progress steps of this part.
pub(crate) fn steps(s: &Settings) -> u64 {
    2 * u64::from(s.rounds)
}

/// One round's numbers from llama-bench.
#[derive(Debug, Clone, Default)]
struct PeerRound {
    prefill: Option<f64>,
    decode_at_depth: Option<f64>,
    decode_at_zero: Option<f64>,
    build: Option<String>,
    model_type: Option<String>,
}

/// `strata bench llm-worker`: Strata's side of the LLM benchmark.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The GGUF file.
    #[arg(long)]
    gguf: PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1536))]
    prompt_tokens: u32,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..=512))]
    gen_tokens: u32,
    /// Timed generations after one warm-up generation.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
}

/// Runs the worker and prints one JSON line.
pub(crate) async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let line = tokio::task::spawn_blocking(move || worker_blocking(&args)).await??;
    out(&line);
    Ok(())
}

fn worker_blocking(args: &WorkerArgs) -> anyhow::Result<String> {
    let config = LlmConfig {
        threads: args.threads,
        context_length: CONTEXT_LENGTH,
        slots: 1,
        ..LlmConfig::default()
    };
    let model = LlmModel::load("smollm2", &args.gguf, &config)
        .with_context(|| format!("loading {}", args.gguf.display()))?;
    let tokens = fixed_prompt(&model, args.prompt_tokens as usize)?;
    let request = GenerationRequest {
        max_tokens: Some(args.gen_tokens),
        sampling: SamplingParams::greedy(),
        ..GenerationRequest::new(Prompt::Tokens(tokens))
    };
    // Warm up, as llama-bench does: the first generation pays for page
    // faults and cold caches.
    model.complete(&request)?;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut generated = Vec::new();
    for _ in 0..args.repeat {
        let g = model.complete(&request)?;
        prefill.push(g.timings.prefill_tokens_per_s);
        decode.push(g.timings.decode_tokens_per_s);
        generated.push(g.usage.completion_tokens);
    }
    // The mean over repetitions, as llama-bench's avg_ts.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(json!({
        "prefill_tok_s": mean(&prefill),
        "decode_tok_s": mean(&decode),
        "prefill_samples": prefill,
        "decode_samples": decode,
        "generated": generated,
        "threads": args.threads,
    })
    .to_string())
}

/// Measures and adds the prefill and decode lines to the report.
pub(crate) async fn run(
    s: &Settings,
    paths: &Paths,
    progress: &Progress,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut strata_prefill = Vec::new();
    let mut strata_decode = Vec::new();
    let mut strata_generated = Vec::new();
    let mut peer = Vec::new();
    for round in 0..s.rounds {
        let strata_first = round % 2 == 0;
        for turn in 0..2 {
            if (turn == 0) == strata_first {
                progress.step(&format!(
                    "LLM round {}/{}: Strata, {} generations",
                    round + 1,
                    s.rounds,
                    s.repeat
                ));
                let r = strata_round(s, paths).await?;
                let num = |k: &str| r.get(k).and_then(Value::as_f64);
                let (Some(prefill), Some(decode)) = (num("prefill_tok_s"), num("decode_tok_s"))
                else {
                    bail!("strata bench llm-worker printed no timings: {r}");
                };
                strata_prefill.push(prefill);
                strata_decode.push(decode);
                if let Some(g) = r.get("generated").and_then(Value::as_array) {
                    strata_generated.extend(g.iter().filter_map(Value::as_u64));
                }
            } else {
                progress.step(&format!(
                    "LLM round {}/{}: llama-bench -r {}",
                    round + 1,
                    s.rounds,
                    s.repeat
                ));
                peer.push(llama_bench(s, paths).await?);
            }
        }
    }

    let peer_prefill: Vec<f64> = peer.iter().filter_map(|r| r.prefill).collect();
    let peer_decode: Vec<f64> = peer.iter().filter_map(|r| r.decode_at_depth).collect();
    let peer_decode_zero: Vec<f64> = peer.iter().filter_map(|r| r.decode_at_zero).collect();
    let build = peer.iter().find_map(|r| r.build.clone());
    let peer_name = match &build {
        Some(b) => format!("llama-bench {b}"),
        None => "llama-bench".to_owned(),
    };
    report.line(Line::new(
        "llm_prefill",
        format!("LLM prefill, {}-token prompt", s.prompt_tokens),
        "tok/s",
        &strata_prefill,
        &peer_name,
        &peer_prefill,
        Target::AtLeast(0.95),
    ));
    report.line(Line::new(
        "llm_decode",
        format!("LLM decode, {} tokens after the prompt", s.gen_tokens),
        "tok/s",
        &strata_decode,
        &peer_name,
        &peer_decode,
        Target::AtLeast(0.95),
    ));
    if let Some(zero) = median(&peer_decode_zero) {
        report.note(&format!(
            "llama-bench decode into an empty context (tg{} at depth 0, its default table row): {zero:.1} tok/s; the decode line compares at depth {} (llama-bench -d {}), where Strata decodes after its prompt",
            s.gen_tokens, s.prompt_tokens, s.prompt_tokens
        ));
    }
    let short = strata_generated
        .iter()
        .filter(|&&n| n < u64::from(s.gen_tokens))
        .count();
    if short > 0 {
        report.note(&format!(
            "{short} of Strata's LLM generations ended before {} tokens; their decode rate is over the tokens generated",
            s.gen_tokens
        ));
    }
    report.detail(
        "llm",
        serde_json::json!({
            "gguf": paths.gguf.display().to_string(),
            "llama_bench_model_type": peer.iter().find_map(|r| r.model_type.clone()),
            "llama_bench_build": build,
            "llama_bench_decode_depth0_tok_s": peer_decode_zero,
            "strata_generated_tokens": strata_generated,
        }),
    );
    Ok(())
}

/// `n` tokens of fixed prose.
fn fixed_prompt(model: &LlmModel, n: usize) -> anyhow::Result<Vec<u32>> {
    let once = model.tokenize(PROMPT_TEXT).len();
    if once == 0 {
        bail!("the model's tokenizer turns the prompt into no tokens");
    }
    let mut tokens = model.tokenize(&PROMPT_TEXT.repeat(n / once + 2));
    if tokens.len() < n {
        bail!("could not build a {n}-token prompt");
    }
    tokens.truncate(n);
    Ok(tokens)
}

/// One run of Strata's worker process.
async fn strata_round(s: &Settings, paths: &Paths) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let out = Command::new(exe)
        .args(["bench", "llm-worker", "--gguf"])
        .arg(&paths.gguf)
        .args(["--threads", &s.threads.to_string()])
        .args(["--prompt-tokens", &s.prompt_tokens.to_string()])
        .args(["--gen-tokens", &s.gen_tokens.to_string()])
        .args(["--repeat", &s.repeat.to_string()])
        .env("STRATA_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running strata bench llm-worker")?;
    if !out.status.success() {
        bail!(
            "strata bench llm-worker failed ({}): {}",
            out.status,
            last_line(&out.stderr)
        );
    }
    let stdout = last_line(&out.stdout);
    serde_json::from_str(&stdout)
        .with_context(|| format!("strata bench llm-worker printed no JSON line (got {stdout:?})"))
}

/// The last non-blank line of a process's output.
pub(crate) fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// One llama-bench run: prefill into an empty context, and decode at depth
/// 0 and at the prompt's depth.
async fn llama_bench(s: &Settings, paths: &Paths) -> anyhow::Result<PeerRound> {
    let started = Instant::now();
    let out = Command::new(&paths.llama_bench)
        .arg("-m")
        .arg(&paths.gguf)
        .args(["-t", &s.threads.to_string()])
        .args(["-p", &s.prompt_tokens.to_string()])
        .args(["-n", &s.gen_tokens.to_string()])
        .args(["-d", &format!("0,{}", s.prompt_tokens)])
        .args(["-r", &s.repeat.to_string()])
        .args(["-o", "json"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", paths.llama_bench.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("llama-bench failed ({}): {last}", out.status);
    }
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "llama-bench");
    parse_llama_bench(&out.stdout, s, &paths.gguf)
}

/// Picks the rows this benchmark needs out of llama-bench's JSON array.
fn parse_llama_bench(stdout: &[u8], s: &Settings, gguf: &Path) -> anyhow::Result<PeerRound> {
    let rows: Vec<Value> =
        serde_json::from_slice(stdout).context("llama-bench did not print a JSON array")?;
    let num = |row: &Value, key: &str| row.get(key).and_then(Value::as_u64);
    let find = |prompt: u32, gen_: u32, depth: u32| {
        rows.iter()
            .find(|r| {
                num(r, "n_prompt") == Some(u64::from(prompt))
                    && num(r, "n_gen") == Some(u64::from(gen_))
                    && num(r, "n_depth").unwrap_or(0) == u64::from(depth)
            })
            .and_then(|r| r.get("avg_ts").and_then(Value::as_f64))
    };
    let round = PeerRound {
        prefill: find(s.prompt_tokens, 0, 0),
        decode_at_depth: find(0, s.gen_tokens, s.prompt_tokens),
        decode_at_zero: find(0, s.gen_tokens, 0),
        build: rows.first().and_then(|r| {
            let commit = r.get("build_commit")?.as_str()?;
            Some(commit.to_owned())
        }),
        model_type: rows
            .first()
            .and_then(|r| r.get("model_type")?.as_str().map(str::to_owned)),
    };
    if round.prefill.is_none() || round.decode_at_depth.is_none() {
        bail!(
            "llama-bench's JSON for {} has no pp{} or tg{} @ d{} row",
            gguf.display(),
            s.prompt_tokens,
            s.gen_tokens,
            s.prompt_tokens
        );
    }
    Ok(round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_llama_bench_rows() {
        let json = br#"[
          {"build_commit":"0c1e570","model_type":"llama 256M Q4_1","n_prompt":128,"n_gen":0,"n_depth":0,"avg_ts":480.4},
          {"build_commit":"0c1e570","n_prompt":0,"n_gen":128,"n_depth":0,"avg_ts":163.2},
          {"build_commit":"0c1e570","n_prompt":128,"n_gen":0,"n_depth":128,"avg_ts":418.8},
          {"build_commit":"0c1e570","n_prompt":0,"n_gen":128,"n_depth":128,"avg_ts":136.4}
        ]"#;
        let s = Settings {
            threads: 2,
            prompt_tokens: 128,
            gen_tokens: 128,
            repeat: 3,
            rounds: 3,
        };
        let r = parse_llama_bench(json, &s, Path::new("m.gguf")).unwrap();
        assert_eq!(r.prefill, Some(480.4));
        assert_eq!(r.decode_at_depth, Some(136.4));
        assert_eq!(r.decode_at_zero, Some(163.2));
        assert_eq!(r.build.as_deref(), Some("0c1e570"));
        assert_eq!(r.model_type.as_deref(), Some("llama 256M Q4_1"));
        assert!(parse_llama_bench(b"[]", &s, Path::new("m.gguf")).is_err());
        assert!(parse_llama_bench(b"| md |", &s, Path::new("m.gguf")).is_err());
    }
}
