//! Prefill and decode speed of a GGUF model (greedy, one slot).
//!
//! ```text
//! cargo run --release --example bench_llm [-- MODEL.gguf [THREADS [ENGINE]]]
//! ```
//!
//! The model defaults to SmolLM2-135M Q4_1 under `$STRATA_ASSETS` (assets
//! from `scripts/fetch-assets`); threads default to 2; the engine (`auto`,
//! `native` or `llama.cpp`) to `auto`.

use std::path::PathBuf;

use runtime::{
    ChatMessage, GenerationRequest, LlmConfig, LlmEngine, LlmModel, Prompt, SamplingParams,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => {
            let assets = std::env::var_os("STRATA_ASSETS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/strata/assets")
                });
            assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    let threads: u32 = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let engine = match args.next().as_deref() {
        None | Some("auto") => LlmEngine::Auto,
        Some("native") => LlmEngine::Native,
        Some("llama.cpp") => LlmEngine::LlamaCpp,
        Some(other) => return Err(format!("unknown engine {other:?}").into()),
    };
    let model = LlmModel::load(
        "bench",
        &path,
        &LlmConfig {
            threads,
            engine,
            ..LlmConfig::default()
        },
    )?;

    // A short prompt (decode speed near an empty context) and one of a few
    // hundred tokens (prefill speed); 128 generated tokens each.
    let context = "Edge devices run small models close to where data is born. ".repeat(20);
    let prompts = [
        (
            "short",
            "Write a long story about a robot who learns to paint.".to_owned(),
        ),
        (
            "long",
            format!("{context}\nWrite a long story about a robot who learns to paint."),
        ),
    ];
    for (name, prompt) in prompts {
        let request = GenerationRequest {
            max_tokens: Some(128),
            sampling: SamplingParams::greedy(),
            ..GenerationRequest::new(Prompt::Chat(vec![ChatMessage::user(prompt)]))
        };
        model.complete(&request)?; // warm up
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut usage = None;
        for i in 0..3 {
            let out = model.complete(&request)?;
            if i == 0 {
                let text: String = out.text.chars().take(160).collect();
                println!("{name}: {text:?}");
            }
            prefill.push(out.timings.prefill_tokens_per_s);
            decode.push(out.timings.decode_tokens_per_s);
            usage = Some(out.usage);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        if let Some(u) = usage {
            println!(
                "{name} prompt ({} tokens, {} generated), {threads} threads, median of 3: prefill {:.0} tok/s, decode {:.0} tok/s",
                u.prompt_tokens,
                u.completion_tokens,
                median(&mut prefill),
                median(&mut decode)
            );
        }
    }
    Ok(())
}
