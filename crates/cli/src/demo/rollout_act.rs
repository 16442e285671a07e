//! Act: over-the-air model updates. The fleet's intent classifier gets a
//! new release, signed and rolled out in stages; then a release that is
//! signed correctly but answers wrongly is caught by its health probes on
//! the canary and rolled back, and the rest of the fleet never sees it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use protocol::rollout::{RolloutDetail, RolloutState, RolloutView};

use super::{DemoDevice, Fleet, agent_status};
use crate::operator::run_strata;
use crate::output::out;

/// Runs the `strata` binary itself for an operator command on the demo's hub.
pub(super) async fn strata(fleet: &Fleet, args: &[&str]) -> anyhow::Result<String> {
    let token = fleet.dir.join("operator.token");
    run_strata(args, Some((&fleet.hub_dir(), &token))).await
}

/// The releases: a retrained head with its health probes (cached beside
/// the assets), and the catalogue's head under rotated labels.
async fn releases(fleet: &Fleet, head: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let derived = head.parent().map(Path::to_owned).unwrap_or_default();
    let retrained = derived.join("intents-head-seed7.safetensors");
    let health = derived.join("intents-health.json");
    if !retrained.exists() || !health.exists() {
        out("  training release 1 of the intent classifier (once)…");
        let args = crate::cmd_model::TrainIntentsArgs::for_demo(retrained.clone())
            .with_seed(7, health.clone());
        tokio::task::spawn_blocking(move || crate::cmd_model::train_intents(&args)).await??;
    }
    let broken = fleet.dir.join("intents-broken.safetensors");
    let source = head.to_owned();
    let target = broken.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let head = runtime::ClassifierHead::load(&source)?;
        let mut labels = head.labels().to_vec();
        labels.rotate_left(1);
        head.relabel(labels)?.save(&target)?;
        Ok(())
    })
    .await??;
    Ok((retrained, health, broken))
}

async fn detail(fleet: &Fleet, id: &str) -> anyhow::Result<RolloutDetail> {
    fleet.get(&format!("/v1/rollouts/{id}")).await
}

/// Follows a rollout, printing each stage as it opens, until it finishes.
async fn follow(fleet: &Fleet, id: &str) -> anyhow::Result<RolloutDetail> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let mut shown_stage = usize::MAX;
    loop {
        let d = detail(fleet, id).await?;
        let r: &RolloutView = &d.rollout;
        if r.stage != shown_stage && r.state == RolloutState::Active {
            shown_stage = r.stage;
            out(&format!(
                "  {:>5.1}s stage {}/{} ({}%): {} devices asked to install",
                started.elapsed().as_secs_f64(),
                r.stage + 1,
                r.stages.len(),
                r.stages[r.stage],
                r.counts.in_stage
            ));
        }
        if matches!(r.state, RolloutState::Completed | RolloutState::Aborted) {
            let finished = d.devices.iter().all(|x| x.phase.is_final());
            if finished || Instant::now() > deadline {
                return Ok(d);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "rollout {id} did not finish within 3 minutes: {}",
                r.decision
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The version of `intents` each device serves.
async fn versions(fleet: &Fleet, devices: &[&DemoDevice]) -> anyhow::Result<Vec<Option<u64>>> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for d in devices {
        let url = fleet.local_api(d, Duration::from_secs(30)).await?;
        let status = agent_status(&client, &url).await?;
        out.push(
            status
                .installed
                .iter()
                .find(|m| m.model == "intents")
                .map(|m| m.version),
        );
    }
    Ok(out)
}

fn rollout_id(created: &str) -> anyhow::Result<String> {
    created
        .split_whitespace()
        .nth(1)
        .filter(|id| id.starts_with("ro-"))
        .map(str::to_owned)
        .with_context(|| format!("no rollout id in {created:?}"))
}

/// The act. `head` is the catalogue's intent head.
pub(crate) async fn run(fleet: &Fleet, head: &Path) -> anyhow::Result<()> {
    out("Over-the-air model updates: signed releases, staged, health-gated.");
    let keys = fleet.dir.join("registry-keys");
    let keys_arg = keys.display().to_string();
    let hub_dir = fleet.hub_dir().display().to_string();
    run_strata(
        &[
            "keys",
            "init",
            "--out",
            &keys_arg,
            "--hub-data-dir",
            &hub_dir,
        ],
        None,
    )
    .await?;
    out(
        "  key ceremony: 2-of-3 offline root keys, an offline targets key; the hub holds only the online snapshot and timestamp keys",
    );
    let (retrained, health, broken) = releases(fleet, head).await?;
    let health_arg = health.display().to_string();
    let publish = |file: &Path, version: &str| {
        let file = file.display().to_string();
        let version = version.to_owned();
        let keys_arg = keys_arg.clone();
        let health_arg = health_arg.clone();
        async move {
            strata(
                fleet,
                &[
                    "model",
                    "publish",
                    &file,
                    "--name",
                    "intents",
                    "--version",
                    &version,
                    "--keys",
                    &keys_arg,
                    "--health",
                    &health_arg,
                    "--input",
                    "text",
                    "--output",
                    "labels",
                ],
            )
            .await
        }
    };
    let all: Vec<&DemoDevice> = fleet.devices.iter().collect();

    // A good release, stage by stage.
    let published = publish(&retrained, "1").await?;
    out(&format!("  {}", published.trim()));
    let created = strata(
        fleet,
        &[
            "rollout",
            "create",
            "intents@1",
            "--stages",
            "25%,50%,100%",
            "--gate",
            "error_rate<5%",
        ],
    )
    .await?;
    let id = rollout_id(&created)?;
    out(&format!(
        "  rollout {id} of intents@1: stages 25%, 50%, 100%, gate error_rate<5%"
    ));
    let started = Instant::now();
    let d = follow(fleet, &id).await?;
    if d.rollout.state != RolloutState::Completed {
        bail!(
            "rollout {id} of a healthy release did not complete: {}",
            d.rollout.decision
        );
    }
    let on_v1 = versions(fleet, &all).await?;
    let committed = on_v1.iter().filter(|v| **v == Some(1)).count();
    out(&format!(
        "  completed in {:.1}s: intents@1 committed on {committed}/{} devices, each after its own health probes and health window",
        started.elapsed().as_secs_f64(),
        all.len()
    ));

    // A signed release that answers wrongly.
    let published = publish(&broken, "2").await?;
    out(&format!(
        "  {} (signed correctly, but its labels are wrong)",
        published.trim()
    ));
    let created = strata(
        fleet,
        &["rollout", "create", "intents@2", "--stages", "10%,100%"],
    )
    .await?;
    let id = rollout_id(&created)?;
    out(&format!(
        "  rollout {id} of intents@2: stages 10% (the canary), 100%"
    ));
    let d = follow(fleet, &id).await?;
    if d.rollout.state != RolloutState::Aborted {
        bail!("the broken release was not stopped: {}", d.rollout.decision);
    }
    let canary = d
        .devices
        .iter()
        .map(|x| {
            format!(
                "{} {}: {}",
                x.device_id.as_str(),
                x.phase.as_str(),
                x.detail.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    out(&format!(
        "  caught at the canary and rolled back: {} of {} devices were asked ({canary})",
        d.devices.len(),
        all.len()
    ));
    out(&format!("  rollout {id} aborted: {}", d.rollout.decision));
    let still = versions(fleet, &all).await?;
    let on_v1 = still.iter().filter(|v| **v == Some(1)).count();
    out(&format!(
        "  {on_v1}/{} devices serve intents@1; none serves the broken release",
        all.len()
    ));
    if still.contains(&Some(2)) {
        bail!("a device serves the broken release");
    }
    Ok(())
}
