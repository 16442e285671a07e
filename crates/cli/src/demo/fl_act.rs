//! Act: federated learning. Every device holds its own labelled
//! utterances (a non-IID share of the Home Assistant intents, written into
//! its `[federated]` data file); the hub runs an intent-head task with
//! secure aggregation, so it learns only the sum of the devices' updates,
//! scores each round's model on sentences no device holds, and the
//! finished model is published as a signed release. Then the same task
//! runs over 1,000 simulated devices with differential privacy, which
//! needs a crowd that 8 devices are not, and the accountant's ε is shown.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use federated::model::ModelSpec;
use protocol::federated::{F32Vector, FlTask, FlTaskState};
use serde_json::json;

use super::Fleet;
use crate::output::out;

/// Where device `name` finds its utterances, relative to the demo
/// directory (its configuration file's directory).
pub(crate) fn data_file(name: &str) -> String {
    format!("fl/{name}.jsonl")
}

/// The rounds the demo's task runs.
const ROUNDS: u32 = 6;

/// The devices' utterances and the held-out set, from the intents package.
struct Split {
    intents: Vec<String>,
    /// Per device: (text, intent) lines.
    shards: Vec<Vec<(String, String)>>,
    held_out_texts: Vec<String>,
    held_out_labels: Vec<u32>,
}

fn split(devices: usize) -> anyhow::Result<Split> {
    let path = crate::cmd_model::assets_dir()
        .join("home-assistant-intents")
        .join("en.json");
    let set = runtime::intents::load(&path, &runtime::intents::ExpansionOptions::default())
        .with_context(|| format!("reading {}", path.display()))?;
    let labels = set
        .examples
        .iter()
        .map(|e| set.class_of(&e.intent).map(|c| c as u32))
        .collect::<Option<Vec<u32>>>()
        .context("an example's intent is not in the intent list")?;
    let (train, test) = federated::partition::train_test_split(&labels, 0.2, 7);
    let train_labels: Vec<u32> = train.iter().map(|&i| labels[i]).collect();
    let parts =
        federated::partition::dirichlet(&train_labels, set.intents.len(), devices, 0.5, 1, 7)?;
    let shards = parts
        .iter()
        .map(|part| {
            part.iter()
                .map(|&k| {
                    let e = &set.examples[train[k]];
                    (e.text.clone(), e.intent.clone())
                })
                .collect()
        })
        .collect();
    Ok(Split {
        shards,
        held_out_texts: test.iter().map(|&i| set.examples[i].text.clone()).collect(),
        held_out_labels: test.iter().map(|&i| labels[i]).collect(),
        intents: set.intents,
    })
}

/// Runs the act.
pub(crate) async fn run(fleet: &Fleet) -> anyhow::Result<()> {
    out(
        "Federated learning: the devices train an intent head together; their utterances never leave them.",
    );
    let n = fleet.devices.len();
    let split = tokio::task::spawn_blocking(move || split(n)).await??;
    for (device, shard) in fleet.devices.iter().zip(&split.shards) {
        let path = fleet.dir.join(data_file(&device.name()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        for (t, intent) in shard {
            text.push_str(&serde_json::to_string(
                &json!({"text": t, "intent": intent}),
            )?);
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let sizes: Vec<usize> = split.shards.iter().map(Vec::len).collect();
    out(&format!(
        "  {} utterances across {n} devices (non-IID, Dirichlet α = 0.5: {} to {} each); {} held out at the hub",
        sizes.iter().sum::<usize>(),
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        split.held_out_texts.len()
    ));

    // The operator embeds the held-out sentences for the hub's evaluation.
    let texts = split.held_out_texts.clone();
    let features = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f32>> {
        let dir = crate::cmd_model::assets_dir().join("all-minilm-l6-v2");
        let embedder = runtime::Embedder::load(
            "minilm",
            &runtime::EmbeddingFiles::in_dir(&dir),
            &runtime::EmbeddingConfig::default(),
        )?;
        let mut out = Vec::new();
        for chunk in texts.chunks(64) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            for v in embedder.embed(&refs)? {
                out.extend(v);
            }
        }
        Ok(out)
    })
    .await??;
    let model = ModelSpec {
        inputs: features.len() / split.held_out_labels.len().max(1),
        hidden: 0,
        classes: split.intents.len(),
    };
    let created = fleet
        .client
        .post(format!("{}/v1/fl/tasks", fleet.hub_url))
        .bearer_auth(&fleet.operator_token)
        .json(&json!({
            "name": "intents-fl",
            "model": model,
            "labels": split.intents,
            "dataset": "intents",
            "strategy": {"name": "fedavg"},
            "rounds": ROUNDS,
            "clients_per_round": n,
            "over_selection": 0.0,
            "min_clients": (n / 2).max(3).min(n),
            "round_deadline_secs": 60,
            "local": {"epochs": 5, "batch_size": 4, "learning_rate": 20.0},
            "server_learning_rate": 2.0,
            "secagg": {"fixed": {"scale_bits": 16, "clip": 4.0}},
            "seed": 7,
            "held_out": {"features": F32Vector(features), "labels": split.held_out_labels},
        }))
        .send()
        .await?;
    if !created.status().is_success() {
        bail!(
            "the hub refused the federated task: {}",
            created.text().await?
        );
    }
    let id = created.json::<FlTask>().await?.id;
    out(&format!(
        "  task {id}: FedAvg over {ROUNDS} rounds of all {n} devices, secure aggregation (the hub sees only the sum)"
    ));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut shown = 0;
    let done = loop {
        let t: FlTask = fleet.get(&format!("/v1/fl/tasks/{id}")).await?;
        for r in &t.history[shown..] {
            let accuracy = r
                .evaluation
                .map_or_else(|| "-".to_owned(), |e| format!("{:.3}", e.accuracy));
            out(&format!(
                "  {:>5.1}s round {}: {} masked updates summed, {} dropped; held-out accuracy {accuracy}",
                started.elapsed().as_secs_f64(),
                r.round,
                r.aggregated_updates,
                r.dropped
            ));
        }
        shown = t.history.len();
        if t.state != FlTaskState::Running {
            break t;
        }
        if Instant::now() > deadline {
            bail!("the federated task did not finish within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if done.state != FlTaskState::Completed {
        bail!(
            "the federated task ended {:?}: {}",
            done.state,
            done.detail.unwrap_or_default()
        );
    }

    // The finished model becomes a signed release (the rollout act made
    // the registry keys).
    let keys = fleet.dir.join("registry-keys");
    if keys.join("targets.key").exists() {
        let head = fleet.dir.join("intents-fl.safetensors");
        let text = super::rollout_act::strata(
            fleet,
            &[
                "fl",
                "publish",
                &id,
                "--version",
                "1",
                "--keys",
                &keys.display().to_string(),
                "--out",
                &head.display().to_string(),
            ],
        )
        .await?;
        if let Some(line) = text.lines().find(|l| l.starts_with("published")) {
            out(&format!("  {line}"));
        }
    }
    private_at_fleet_scale(fleet).await
}

/// The settings of the differentially private pass, as `strata fl simulate`
/// arguments: 1,000 devices, a tenth of them per round, noise σ = 1 on
/// updates clipped to norm 1.
const DP_RUN: [&str; 22] = [
    "--dataset",
    "intents",
    "--clients",
    "1000",
    "--per-round",
    "100",
    "--rounds",
    "10",
    "--epochs",
    "5",
    "--batch-size",
    "4",
    "--learning-rate",
    "20",
    "--server-learning-rate",
    "2",
    "--dp-noise",
    "1",
    "--clip",
    "1",
    "--epsilon-budget",
    "8",
];

/// Differential privacy hides each device in the crowd of a round, so it
/// needs a crowd: with 8 devices the noise that hides one of them drowns
/// the others' updates. The same task therefore runs again over 1,000
/// simulated devices (each enrolled with its own certificate, training
/// through the agent's own code path) against a hub of its own, with
/// client-level DP, and the accountant's ε is reported.
async fn private_at_fleet_scale(fleet: &Fleet) -> anyhow::Result<()> {
    out(&format!(
        "Differential privacy at fleet scale: the same task over 1,000 simulated devices, 100 per round, noise σ = 1 (strata fl simulate {})",
        DP_RUN.join(" ")
    ));
    let dir = fleet.dir.join("fl-dp");
    let report = dir.join("report.json");
    let (dir_arg, report_arg) = (dir.display().to_string(), report.display().to_string());
    let mut args = DP_RUN.to_vec();
    args.extend(["--no-baseline", "--dir", &dir_arg, "--json", &report_arg]);
    crate::cmd_fl::simulate_with(&args).await?;
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let epsilon = report["epsilon"]
        .as_f64()
        .context("the private run reported no ε")?;
    let rounds = report["rounds"].as_array().map_or(0, Vec::len);
    out(&format!(
        "  privacy: ε = {epsilon:.2} at δ = 1e-5 after {rounds} rounds (budget 8); held-out accuracy {:.3}",
        report["final_accuracy"].as_f64().unwrap_or(f64::NAN)
    ));
    Ok(())
}
