//! `strata rollout`: staged, health-gated rollouts of published releases.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use protocol::rollout::{RolloutDetail, RolloutList, RolloutState, RolloutView};
use serde_json::json;

use crate::operator::{HubConnection, Operator};
use crate::output::out;

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Roll a published release out in stages.
    ///
    /// Each stage asks a growing share of the cohort (devices with all the
    /// `--cohort` labels) to install the release. Devices verify it, install
    /// it beside their current version, run its health probes, serve it on
    /// trial for their health window and only then report `committed`. A
    /// stage opens when enough of the previous one committed and every
    /// `--gate` holds; too many failures, or a breached gate, abort the
    /// rollout and roll its devices back.
    Create(CreateArgs),
    /// Show one rollout and its devices, or list them all.
    Status(StatusArgs),
    /// Stop asking new devices to install (devices already on it carry on).
    Pause(IdArgs),
    /// Resume a paused rollout.
    Resume(IdArgs),
    /// Stop the rollout and roll every device on it back.
    Abort(IdArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The release, `name@version`.
    release: String,
    /// Stage sizes as percentages of the cohort, increasing, ending at 100.
    #[arg(long, default_value = "5%,25%,100%")]
    stages: String,
    /// Only devices with this label take part, `key=value` (repeatable).
    #[arg(long = "cohort", value_parser = parse_label)]
    cohort: Vec<(String, String)>,
    /// A health gate every stage must pass, such as `error_rate<1%` or
    /// `p95_ms<200` (repeatable).
    #[arg(long = "gate")]
    gates: Vec<String>,
    /// Fraction of a stage that must commit before the next opens.
    #[arg(long, default_value_t = 0.9)]
    min_committed: f64,
    /// Fraction of a stage whose failure aborts the rollout.
    #[arg(long, default_value_t = 0.1)]
    max_failed: f64,
    /// Wait until the rollout completes or aborts, showing its progress;
    /// exits 1 if it aborts.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    hub: HubConnection,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The rollout's id (default: list every rollout).
    id: Option<String>,
    #[command(flatten)]
    hub: HubConnection,
}

#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    /// The rollout's id.
    id: String,
    #[command(flatten)]
    hub: HubConnection,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    if k.trim().is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn summary(r: &RolloutView) -> String {
    let c = &r.counts;
    format!(
        "{} {}@{} {} stage {}/{} ({}%): {} committed, {} installed, {} downloading, {} waiting, {} failed, {} rolled back of {} in stage, {} in cohort; {}",
        r.id,
        r.model,
        r.version,
        r.state.as_str(),
        r.stage + 1,
        r.stages.len(),
        r.stages.get(r.stage).copied().unwrap_or(100.0),
        c.committed,
        c.installed,
        c.downloading,
        c.notified,
        c.failed,
        c.rolled_back,
        c.in_stage,
        c.cohort,
        r.decision
    )
}

pub(crate) async fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Create(args) => create(args).await,
        RolloutCommand::Status(args) => status(args).await,
        RolloutCommand::Pause(args) => act(args, "pause").await,
        RolloutCommand::Resume(args) => act(args, "resume").await,
        RolloutCommand::Abort(args) => act(args, "abort").await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let (model, version) = args
        .release
        .split_once('@')
        .with_context(|| format!("{:?} is not name@version", args.release))?;
    let version: u64 = version
        .parse()
        .with_context(|| format!("{version:?} is not a version number"))?;
    let stages = rollout::parse_stages(&args.stages)?;
    for gate in &args.gates {
        gate.parse::<rollout::Gate>()?;
    }
    let op = Operator::connect(&args.hub)?;
    let cohort: BTreeMap<String, String> = args.cohort.into_iter().collect();
    let answer = op
        .post_json(
            "/v1/rollouts",
            &json!({
                "model": model,
                "version": version,
                "stages": stages,
                "cohort": cohort,
                "gates": args.gates,
                "min_committed": args.min_committed,
                "max_failed": args.max_failed,
            }),
        )
        .await?;
    let view: RolloutView = serde_json::from_value(answer).context("reading the hub's answer")?;
    out(&format!("created {}", summary(&view)));
    if args.wait {
        let last = wait(&op, &view.id).await?;
        out(&summary(&last));
        if last.state == RolloutState::Aborted {
            bail!("rollout {} aborted: {}", last.id, last.decision);
        }
    }
    Ok(())
}

/// Follows a rollout until it completes or aborts, with a progress bar of
/// committed devices over the cohort.
async fn wait(op: &Operator, id: &str) -> anyhow::Result<RolloutView> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} committed  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    loop {
        let detail: RolloutDetail =
            serde_json::from_value(op.get(&format!("/v1/rollouts/{id}"), &[]).await?)
                .context("reading the hub's answer")?;
        let r = detail.rollout;
        bar.set_length(r.counts.cohort.max(1));
        bar.set_position(r.counts.committed);
        bar.set_message(format!(
            "stage {}/{}: {}",
            r.stage + 1,
            r.stages.len(),
            r.decision
        ));
        bar.tick();
        if matches!(r.state, RolloutState::Completed | RolloutState::Aborted) {
            bar.finish_and_clear();
            out(&format!(
                "{} after {:.1}s",
                r.state.as_str(),
                started.elapsed().as_secs_f64()
            ));
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    match args.id {
        None => {
            let list: RolloutList = serde_json::from_value(op.get("/v1/rollouts", &[]).await?)
                .context("reading the hub's answer")?;
            if list.rollouts.is_empty() {
                out("no rollouts");
            }
            for r in &list.rollouts {
                out(&summary(r));
            }
        }
        Some(id) => {
            let detail: RolloutDetail =
                serde_json::from_value(op.get(&format!("/v1/rollouts/{id}"), &[]).await?)
                    .context("reading the hub's answer")?;
            out(&summary(&detail.rollout));
            if !detail.rollout.gates.is_empty() {
                out(&format!("gates: {}", detail.rollout.gates.join(", ")));
            }
            out(&format!(
                "{:<22} {:>5}  {:<12} {:>8} {:>6} {:>8}  DETAIL",
                "DEVICE", "STAGE", "PHASE", "REQUESTS", "ERRORS", "P95 MS"
            ));
            for d in &detail.devices {
                out(&format!(
                    "{:<22} {:>5}  {:<12} {:>8} {:>6} {:>8}  {}",
                    d.device_id.as_str(),
                    d.stage + 1,
                    d.phase.as_str(),
                    d.requests,
                    d.errors,
                    d.p95_ms
                        .map(|p| format!("{p:.0}"))
                        .unwrap_or_else(|| "-".into()),
                    d.detail.as_deref().unwrap_or("")
                ));
            }
        }
    }
    Ok(())
}

async fn act(args: IdArgs, action: &str) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    let answer = op
        .post_json(&format!("/v1/rollouts/{}/{action}", args.id), &json!({}))
        .await?;
    let view: RolloutView = serde_json::from_value(answer).context("reading the hub's answer")?;
    out(&summary(&view));
    Ok(())
}
