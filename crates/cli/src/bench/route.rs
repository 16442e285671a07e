//! `strata bench route`: the router against RouteLLM-style baselines on a
//! labelled evaluation set ([`super::route_eval`]), with a real hub running
//! the macro model (Qwen2.5-Coder-0.5B-Instruct) and a real device running
//! SmolLM2, MiniLM and the intent head.
//!
//! Every prompt is answered three times: by the macro model directly (the
//! quality reference, and the always-macro baseline), by the device with
//! `only_local` (the always-local baseline) and by the device's router
//! under its default policy. The random baseline sends the same share of
//! prompts to the macro tier as the router did, chosen at random (averaged
//! over many draws). Quality is the cosine similarity of an answer's
//! MiniLM embedding to the macro answer's (for fleet questions, the macro
//! answer given the fleet's figures, as the router asks for it); privacy
//! violations are prompts with personal data answered by the macro tier.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use super::route_eval::{self, Class};
use crate::demo::Fleet;
use crate::output::out;

/// `strata bench route`.
#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// Prompts of each class (device command, fleet question, personal
    /// data, general).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=500))]
    per_class: u64,
    /// Completion tokens per answer.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=512))]
    max_tokens: u32,
    /// Seed of the evaluation set's draws and of the random baseline.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Directory for the hub and the device (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One prompt's three answers.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    class: Class,
    macro_ms: f64,
    macro_tokens: u32,
    local_ms: f64,
    router_ms: f64,
    router_tier: String,
    router_cost_usd: f64,
    decision_us: f64,
    escalated: bool,
    #[serde(skip)]
    texts: [String; 3],
    local_quality: f64,
    router_quality: f64,
}

/// One strategy's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct Outcome {
    name: String,
    privacy_violations: f64,
    local_share: f64,
    quality: f64,
    cost_usd: f64,
    p50_ms: f64,
    p95_ms: f64,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * p).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

pub(crate) async fn run(args: RouteArgs) -> anyhow::Result<()> {
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("strata-bench-route-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let assets = crate::cmd_model::assets_dir();
    let prompts = route_eval::build(&assets, args.per_class as usize, args.seed)?;
    let (models, _) = crate::demo::prepare_models().await?;
    let mut fleet = Fleet::start_hub(&dir, &crate::demo::macro_config()?).await?;
    let result = bench(&args, &mut fleet, &models, &prompts).await;
    fleet.stop().await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn bench(
    args: &RouteArgs,
    fleet: &mut Fleet,
    models: &str,
    prompts: &[route_eval::Prompt],
) -> anyhow::Result<()> {
    fleet.enrol(1, 1, models).await?;
    fleet.wait_online(Duration::from_secs(120)).await?;
    let device = fleet.devices.first().context("no device")?;
    let local = fleet.local_api(device, Duration::from_secs(60)).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let status = crate::demo::route_act::router_status_once_macro_known(&http, &local).await?;
    let macro_model = status["macro_tier"]["chat_model"]
        .as_str()
        .unwrap_or("macro")
        .to_owned();
    let hub_chat = format!("{}/v1/chat/completions", fleet.hub_url);
    let device_chat = format!("{local}/v1/chat/completions");
    let body = |text: &str, model: &str, mode: Option<&str>| {
        let mut b = json!({
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0, "max_tokens": args.max_tokens,
        });
        if let Some(m) = mode {
            b["strata"] = json!({"mode": m});
        }
        b
    };
    let bar = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("answering");
    let mut rows = Vec::with_capacity(prompts.len());
    for p in prompts {
        let t = Instant::now();
        // The reference is the best macro answer: a fleet question gets
        // the fleet's figures, as the router's escalation does.
        let mut reference = fleet.client.post(&hub_chat);
        if p.class == Class::Fleet {
            reference = reference.header(protocol::route::CONTEXT_HEADER, "fleet");
        }
        let reference: Value = reference
            .timeout(Duration::from_secs(600))
            .bearer_auth(&fleet.operator_token)
            .json(&body(&p.text, &macro_model, None))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let macro_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let local_answer: Value = http
            .post(&device_chat)
            .json(&body(&p.text, "smollm2", Some("only_local")))
            .send()
            .await?
            .json()
            .await?;
        let local_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let routed: Value = http
            .post(&device_chat)
            .json(&body(&p.text, "smollm2", None))
            .send()
            .await?
            .json()
            .await?;
        let router_ms = t.elapsed().as_secs_f64() * 1000.0;
        let record = &routed["strata"];
        rows.push(Row {
            class: p.class,
            macro_ms,
            macro_tokens: reference["usage"]["total_tokens"].as_u64().unwrap_or(0) as u32,
            local_ms,
            router_ms,
            router_tier: record["tier"].as_str().unwrap_or("none").to_owned(),
            router_cost_usd: record["cost_usd"].as_f64().unwrap_or(0.0),
            decision_us: record["decision_us"].as_f64().unwrap_or(0.0),
            escalated: record["escalated"].as_bool().unwrap_or(false),
            texts: [
                text_of(&reference),
                text_of(&local_answer),
                text_of(&routed),
            ],
            local_quality: 0.0,
            router_quality: 0.0,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Quality: cosine of each answer's embedding to the macro answer's.
    let embed = |texts: Vec<String>| {
        let http = http.clone();
        let url = format!("{local}/v1/embeddings");
        async move {
            let texts: Vec<String> = texts
                .into_iter()
                .map(|t| {
                    if t.trim().is_empty() {
                        "(no answer)".into()
                    } else {
                        t
                    }
                })
                .collect();
            let v: Value = http
                .post(url)
                .json(&json!({"model": "minilm", "input": texts, "strata": {"mode": "only_local"}}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let vectors: Vec<Vec<f64>> = v["data"]
                .as_array()
                .context("no embeddings")?
                .iter()
                .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap_or_default())
                .collect();
            anyhow::Ok(vectors)
        }
    };
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for chunk in rows.chunks_mut(32) {
        let texts: Vec<String> = chunk.iter().flat_map(|r| r.texts.clone()).collect();
        let v = embed(texts).await?;
        for (i, r) in chunk.iter_mut().enumerate() {
            let (m, l, x) = (&v[3 * i], &v[3 * i + 1], &v[3 * i + 2]);
            r.local_quality = cos(l, m);
            r.router_quality = cos(x, m);
        }
    }

    let price = router::Policy::default().cost.macro_usd_per_1k_tokens / 1000.0;
    let n = rows.len() as f64;
    let is_private = |r: &Row| r.class == Class::Private;
    let strata = Outcome {
        name: "Strata router".into(),
        privacy_violations: rows
            .iter()
            .filter(|r| is_private(r) && r.router_tier == "macro")
            .count() as f64,
        local_share: rows.iter().filter(|r| r.router_tier == "local").count() as f64 / n,
        quality: rows.iter().map(|r| r.router_quality).sum::<f64>() / n,
        cost_usd: rows.iter().map(|r| r.router_cost_usd).sum(),
        p50_ms: percentile(&rows.iter().map(|r| r.router_ms).collect::<Vec<_>>(), 0.5),
        p95_ms: percentile(&rows.iter().map(|r| r.router_ms).collect::<Vec<_>>(), 0.95),
    };
    let macro_count = rows.iter().filter(|r| r.router_tier == "macro").count();
    let local_ms: Vec<f64> = rows.iter().map(|r| r.local_ms).collect();
    let macro_ms: Vec<f64> = rows.iter().map(|r| r.macro_ms).collect();
    let always_local = Outcome {
        name: "always local".into(),
        privacy_violations: 0.0,
        local_share: 1.0,
        quality: rows.iter().map(|r| r.local_quality).sum::<f64>() / n,
        cost_usd: 0.0,
        p50_ms: percentile(&local_ms, 0.5),
        p95_ms: percentile(&local_ms, 0.95),
    };
    let always_macro = Outcome {
        name: "always macro".into(),
        privacy_violations: rows.iter().filter(|r| is_private(r)).count() as f64,
        local_share: 0.0,
        quality: 1.0,
        cost_usd: rows.iter().map(|r| f64::from(r.macro_tokens) * price).sum(),
        p50_ms: percentile(&macro_ms, 0.5),
        p95_ms: percentile(&macro_ms, 0.95),
    };
    // Random at the router's macro share, averaged over draws.
    let draws = 200;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    let (mut viol, mut qual, mut cost) = (0.0, 0.0, 0.0);
    let mut lat = Vec::new();
    for _ in 0..draws {
        idx.shuffle(&mut rng);
        let chosen: std::collections::HashSet<usize> = idx[..macro_count].iter().copied().collect();
        for (i, r) in rows.iter().enumerate() {
            if chosen.contains(&i) {
                viol += f64::from(u8::from(is_private(r)));
                qual += 1.0;
                cost += f64::from(r.macro_tokens) * price;
                lat.push(r.macro_ms);
            } else {
                qual += r.local_quality;
                lat.push(r.local_ms);
            }
        }
    }
    let random = Outcome {
        name: "random (same macro share)".into(),
        privacy_violations: viol / f64::from(draws),
        local_share: 1.0 - macro_count as f64 / n,
        quality: qual / (f64::from(draws) * n),
        cost_usd: cost / f64::from(draws),
        p50_ms: percentile(&lat, 0.5),
        p95_ms: percentile(&lat, 0.95),
    };
    let outcomes = [strata, always_local, always_macro, random];

    out(&format!(
        "strata bench route: {} prompts ({} per class), {} completion tokens, device SmolLM2-135M, hub {macro_model}",
        rows.len(),
        args.per_class,
        args.max_tokens
    ));
    out("");
    out(&format!(
        "{:<28} {:>10} {:>11} {:>8} {:>11} {:>9} {:>9}",
        "strategy", "privacy", "local", "quality", "cost", "p50", "p95"
    ));
    for o in &outcomes {
        out(&format!(
            "{:<28} {:>10.1} {:>10.0}% {:>8.3} {:>10.5}$ {:>7.0}ms {:>7.0}ms",
            o.name,
            o.privacy_violations,
            o.local_share * 100.0,
            o.quality,
            o.cost_usd,
            o.p50_ms,
            o.p95_ms
        ));
    }
    out("");
    out("Router decisions by class (share answered locally, escalations):");
    for class in Class::ALL {
        let of: Vec<&Row> = rows.iter().filter(|r| r.class == class).collect();
        if of.is_empty() {
            continue;
        }
        let local = of.iter().filter(|r| r.router_tier == "local").count();
        let refused = of.iter().filter(|r| r.router_tier == "none").count();
        let escalated = of.iter().filter(|r| r.escalated).count();
        out(&format!(
            "  {:<16} local {:>3}/{:<3} macro {:>3} refused {:>3} escalated {:>3}",
            class.name(),
            local,
            of.len(),
            of.iter().filter(|r| r.router_tier == "macro").count(),
            refused,
            escalated
        ));
    }
    let decisions: Vec<f64> = rows.iter().map(|r| r.decision_us).collect();
    out(&format!(
        "Router decision time in the agent (privacy classification included): p50 {:.1} µs, p99 {:.1} µs",
        percentile(&decisions, 0.5),
        percentile(&decisions, 0.99)
    ));
    if let Some(path) = &args.json {
        let doc = json!({"outcomes": outcomes, "rows": rows, "macro_model": macro_model});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
