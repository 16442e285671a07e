//! `strata bench rollout`: a staged rollout to a large simulated fleet on
//! this machine, against a real hub process.
//!
//! Each simulated device is enrolled like a real one (its own key, CSR and
//! certificate), holds its own mutual-TLS event stream open, and on the
//! `install` message does what the agent's updater does over the network:
//! brings a [`registry::TrustedState`] up to date, verifies the manifest,
//! downloads the artifact with the agent's own client code and checks its
//! SHA-256, then reports `installed` and, after its health window,
//! `committed`. It does not load a model (that is the agent's local cost,
//! measured by `strata bench runtime`).
//!
//! Measured: time from `POST /v1/rollouts` to the rollout's completion
//! (every device committed), and the hub process's CPU time and resident
//! memory over that span, read from `/proc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::DeviceMessage;
use protocol::rollout::{RolloutDetail, RolloutState, UpdatePhase, UpdateReport};
use serde_json::json;

use crate::operator::run_strata;
use crate::output::out;
use crate::simfleet::{SimDevice, SimHub};

/// `strata bench rollout`.
#[derive(Debug, Args)]
pub(crate) struct RolloutArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    devices: u64,
    /// Size of the release's artifact, in KiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    artifact_kib: u64,
    /// Each device's health window, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    health_window_ms: u64,
    /// Stage percentages.
    #[arg(long, default_value = "5%,25%,100%")]
    stages: String,
    /// Devices enrolled at once.
    #[arg(long, default_value_t = 16)]
    enrol_concurrency: usize,
    /// Directory for the hub and the devices (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// CPU time (user + system) of a process, from `/proc/PID/stat`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line, in clock ticks (100 per s).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Counters the simulated devices share.
#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    failed: AtomicU64,
    downloaded_bytes: AtomicU64,
}

async fn report(
    device: &SimDevice,
    hub: &str,
    rollout: &str,
    seq: u64,
    phase: UpdatePhase,
    version: Option<u64>,
    detail: Option<String>,
) -> anyhow::Result<()> {
    let body = UpdateReport {
        seq,
        phase,
        serving_version: version,
        detail,
        requests: 0,
        errors: 0,
        p95_ms: None,
    };
    let mut delay = Duration::from_millis(50);
    loop {
        let sent = device
            .client
            .post(format!("{hub}/v1/devices/{}/rollouts/{rollout}", device.id))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_client_error() => bail!("report refused: {}", r.status()),
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What every simulated device shares.
struct Fleet {
    hub: String,
    root: Vec<u8>,
    dir: PathBuf,
    window: Duration,
    counters: Counters,
}

/// What a device does with one install message.
async fn install(
    device: &SimDevice,
    fleet: &Fleet,
    rollout: &str,
    model: &str,
    version: u64,
) -> anyhow::Result<()> {
    let (hub, root, dir, window, counters) = (
        fleet.hub.as_str(),
        fleet.root.as_slice(),
        fleet.dir.as_path(),
        fleet.window,
        &fleet.counters,
    );
    report(
        device,
        hub,
        rollout,
        1,
        UpdatePhase::Downloading,
        None,
        None,
    )
    .await?;
    let registry = edge::updater::fetch::RegistryClient::new(
        device.client.clone(),
        hub,
        Duration::from_secs(60),
    );
    let now = time::OffsetDateTime::now_utc();
    let outcome: anyhow::Result<()> = async {
        let mut trusted = registry::TrustedState::bootstrap(root, now)?;
        registry.refresh(&mut trusted, now).await?;
        let (_, manifest) = registry.manifest(&trusted, model, version, now).await?;
        let size = manifest.artifact.size_bytes;
        let partial = dir.join(format!("{}.partial", device.id));
        let artifact = registry
            .download(manifest, &partial, None, &mut |_, _| {})
            .await?;
        trusted.record_installed(&artifact);
        counters.downloaded_bytes.fetch_add(size, Ordering::Relaxed);
        let _ = std::fs::remove_file(&partial);
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        counters.failed.fetch_add(1, Ordering::Relaxed);
        report(
            device,
            hub,
            rollout,
            2,
            UpdatePhase::Failed,
            None,
            Some(e.to_string()),
        )
        .await?;
        return Ok(());
    }
    report(
        device,
        hub,
        rollout,
        2,
        UpdatePhase::Installed,
        Some(version),
        None,
    )
    .await?;
    tokio::time::sleep(window).await;
    report(
        device,
        hub,
        rollout,
        3,
        UpdatePhase::Committed,
        Some(version),
        None,
    )
    .await?;
    counters.committed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Holds the device's event stream open and acts on install messages.
async fn simulate(device: SimDevice, fleet: Arc<Fleet>) {
    let hub = fleet.hub.clone();
    device
        .listen(&hub, |envelope| {
            let (device, fleet) = (&device, &fleet);
            async move {
                if let DeviceMessage::Install {
                    rollout_id,
                    model,
                    version,
                } = envelope.message
                {
                    let result = install(device, fleet, &rollout_id, &model, version).await;
                    if let Err(e) = result {
                        tracing::warn!(device = %device.id, error = %e, "simulated update failed");
                    }
                }
            }
        })
        .await;
}

/// Runs `strata bench rollout`.
pub(crate) async fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("strata-bench-rollout-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &dir).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn bench(args: &RolloutArgs, dir: &Path) -> anyhow::Result<()> {
    let hub = SimHub::start(dir).await?;
    let (pid, url, hub_dir, token_file) = (
        hub.pid,
        hub.url.clone(),
        hub.dir.clone(),
        hub.token_file.clone(),
    );
    let (operator, token) = (hub.operator.clone(), hub.token.clone());

    // The registry and one release.
    let keys = dir.join("keys");
    let keys_arg = keys.display().to_string();
    let hub_arg = hub_dir.display().to_string();
    run_strata(
        &[
            "keys",
            "init",
            "--out",
            &keys_arg,
            "--hub-data-dir",
            &hub_arg,
        ],
        None,
    )
    .await?;
    let artifact = dir.join("bench-model.onnx");
    let bytes: Vec<u8> = (0..args.artifact_kib * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&artifact, &bytes)?;
    run_strata(
        &[
            "model",
            "publish",
            &artifact.display().to_string(),
            "--name",
            "bench-model",
            "--version",
            "1",
            "--keys",
            &keys_arg,
        ],
        Some((&hub_dir, &token_file)),
    )
    .await?;
    let root = std::fs::read(keys.join("root.json"))?;

    // Enrol the fleet.
    let labels = [("fleet".to_owned(), "bench".to_owned())].into();
    let enrolled = hub
        .enrol(dir, args.devices, &labels, args.enrol_concurrency)
        .await?;
    let scratch = dir.join("downloads");
    std::fs::create_dir_all(&scratch)?;
    let fleet = Arc::new(Fleet {
        hub: url.clone(),
        root,
        dir: scratch,
        window: Duration::from_millis(args.health_window_ms),
        counters: Counters::default(),
    });
    let counters = &fleet.counters;
    let mut n = 0u64;
    for device in enrolled {
        tokio::spawn(simulate(device, Arc::clone(&fleet)));
        n += 1;
    }
    // Every stream open before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list: protocol::DeviceList = operator
            .get(format!("{url}/v1/devices"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let online = list.devices.iter().filter(|d| d.online).count() as u64;
        if online >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {online} of {n} simulated devices came online");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out(&format!(
        "{n} simulated devices enrolled and online; artifact {} KiB, health window {} ms, stages {}",
        args.artifact_kib, args.health_window_ms, args.stages
    ));

    // The rollout.
    let rss_before = rss(pid);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let stages = rollout::parse_stages(&args.stages)?;
    let created: protocol::rollout::RolloutView = operator
        .post(format!("{url}/v1/rollouts"))
        .bearer_auth(&token)
        .json(&json!({"model": "bench-model", "version": 1, "stages": stages}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let bar = ProgressBar::new(n).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} committed {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("rolling out");
    let mut peak_rss = rss_before;
    let mut stage_times = Vec::new();
    let mut last_stage = 0usize;
    let mut completed_at = None;
    let detail = loop {
        peak_rss = peak_rss.max(rss(pid));
        let detail: RolloutDetail = operator
            .get(format!("{url}/v1/rollouts/{}", created.id))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        bar.set_position(detail.rollout.counts.committed);
        if detail.rollout.stage != last_stage {
            stage_times.push(started.elapsed().as_secs_f64());
            last_stage = detail.rollout.stage;
        }
        match detail.rollout.state {
            // The controller completes at `min_committed` (90 %) of the last
            // stage; the clock runs on until every device has committed.
            RolloutState::Completed => {
                completed_at.get_or_insert(started.elapsed().as_secs_f64());
                if detail.rollout.counts.committed >= n {
                    break detail;
                }
            }
            RolloutState::Aborted => bail!("the rollout aborted: {}", detail.rollout.decision),
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the rollout did not complete in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    bar.finish_and_clear();
    let committed = detail.rollout.counts.committed;
    out(&format!(
        "rollout to {n} devices: 100% committed in {elapsed:.1}s ({} stages; stages opened at {}; the rollout completed at {:.1}s)",
        detail.rollout.stages.len(),
        stage_times
            .iter()
            .map(|t| format!("{t:.1}s"))
            .collect::<Vec<_>>()
            .join(", "),
        completed_at.unwrap_or(elapsed)
    ));
    out(&format!(
        "  devices committed: {committed}; failed: {}; artifact bytes served: {} MiB",
        counters.failed.load(Ordering::Relaxed),
        counters.downloaded_bytes.load(Ordering::Relaxed) >> 20
    ));
    out(&format!(
        "  hub CPU: {cpu:.1} s over {elapsed:.1} s ({:.2} cores on average); hub memory: {} MiB before, {} MiB peak",
        cpu / elapsed,
        rss_before >> 20,
        peak_rss >> 20
    ));
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "devices": n,
                "artifact_kib": args.artifact_kib,
                "health_window_ms": args.health_window_ms,
                "stages": detail.rollout.stages,
                "seconds_to_all_committed": elapsed,
                "seconds_to_rollout_completed": completed_at,
                "stage_opened_at_s": stage_times,
                "hub_cpu_seconds": cpu,
                "hub_rss_before_bytes": rss_before,
                "hub_rss_peak_bytes": peak_rss,
            }))?,
        )?;
    }
    hub.stop().await;
    Ok(())
}
