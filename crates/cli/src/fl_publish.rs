//! `strata fl publish`: a finished federated task's model as a signed
//! registry release.
//!
//! The hub holds no targets key, so a task cannot publish by itself: the
//! operator who holds the key (from `strata keys init`) fetches the task's
//! final model, writes it as a classifier head in the runtime's file format
//! and publishes it through `strata model publish`'s path, with the task's
//! held-out and client evaluations as the release's metrics and the task id
//! as its provenance.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use protocol::federated::{FlDataset, FlModel, FlTask, FlTaskState};
use registry::Provenance;

use crate::cmd_publish::{PublishArgs, publish};
use crate::operator::{HubConnection, Operator};
use crate::output::out;

/// `strata fl publish TASK --version V --keys DIR`.
#[derive(Debug, Args)]
pub(crate) struct FlPublishArgs {
    /// The federated task (`fl-…`), completed or stopped after at least one
    /// aggregated round.
    task: String,
    /// The release number; must be above every published release of the
    /// task's model name.
    #[arg(long)]
    version: u64,
    /// The directory `strata keys init` wrote (its `root.json` and `targets.key`).
    #[arg(long, env = "STRATA_REGISTRY_KEYS")]
    keys: PathBuf,
    /// Where to keep the head file (default: `NAME-vVERSION.safetensors` in
    /// the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// How long the release stays installable (e.g. 90d).
    #[arg(long, default_value = "90d")]
    expires: humantime::Duration,
    #[command(flatten)]
    hub: HubConnection,
}

/// The release's metrics: the hub's held-out evaluation, the clients' own,
/// the rounds and, with differential privacy, the ε spent.
fn metrics(task: &FlTask) -> Vec<(String, f64)> {
    let mut m = vec![("fl_rounds".to_owned(), f64::from(task.completed_rounds))];
    if let Some(e) = task.evaluation {
        m.push(("held_out_accuracy".to_owned(), e.accuracy));
        m.push(("held_out_loss".to_owned(), e.loss));
        m.push(("held_out_examples".to_owned(), e.examples as f64));
    }
    if let Some(e) = task
        .history
        .iter()
        .rev()
        .find_map(|h| h.client_evaluation.filter(|_| h.aggregated))
    {
        m.push(("client_accuracy".to_owned(), e.accuracy));
    }
    if let (Some(eps), Some(dp)) = (task.epsilon, &task.spec.dp) {
        m.push(("dp_epsilon".to_owned(), eps));
        m.push(("dp_delta".to_owned(), dp.target_delta));
    }
    m
}

/// Runs `strata fl publish`.
pub(crate) async fn run(args: FlPublishArgs) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    let task: FlTask = serde_json::from_value(
        op.get(&format!("/v1/fl/tasks/{}", args.task), &[])
            .await
            .with_context(|| format!("reading task {}", args.task))?,
    )
    .context("the hub's task answer")?;
    if task.state == FlTaskState::Running {
        bail!(
            "task {} is still running (round {} of {}); publish it when it completes, or stop it first",
            task.id,
            task.completed_rounds,
            task.spec.rounds
        );
    }
    if task.completed_rounds == 0 {
        bail!(
            "task {} aggregated no round: there is no model to publish",
            task.id
        );
    }
    let model: FlModel = serde_json::from_value(
        op.get(&format!("/v1/fl/tasks/{}/model", task.id), &[])
            .await?,
    )
    .context("the hub's model answer")?;
    let tensors = task
        .spec
        .model
        .tensors(&model.params.0)
        .map_err(|e| anyhow::anyhow!("task {}'s model: {e}", task.id))?;
    let file = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("{}-v{}.safetensors", task.spec.name, args.version))
    });
    runtime::classifier::write_head(&file, &task.spec.labels, tensors)?;
    // What devices will load must load here first.
    runtime::classifier::ClassifierHead::load(&file)
        .with_context(|| format!("checking {}", file.display()))?;
    let metrics = metrics(&task);
    let input = match task.spec.dataset {
        FlDataset::Intents => "embedding",
        FlDataset::Shuttle => "tensors",
    };
    let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    out(&format!(
        "task {}: {} rounds, head written to {}; {}",
        task.id,
        task.completed_rounds,
        file.display(),
        shown.join(" ")
    ));
    publish(PublishArgs {
        file,
        name: task.spec.name.clone(),
        version: args.version,
        keys: args.keys,
        expires: args.expires,
        metrics,
        memory_bytes: None,
        min_agent_version: None,
        input: input.to_owned(),
        output: "labels".to_owned(),
        health: None,
        hub: args.hub,
        provenance: Some(Provenance::TrainingRun { run_id: task.id }),
    })
    .await
}
