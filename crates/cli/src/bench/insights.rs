//! `strata bench insights`: the device outbox and the hub's insight store.
//!
//! - Outbox appends per second with durability on (every append returned
//!   only after its group commit's fdatasync), from many producer threads
//!   appending one insight at a time, and from producers appending batches.
//! - Hub ingest per second on SQLite: batches of insights through the same
//!   store call the ingest endpoint makes (one transaction per batch,
//!   synchronous=FULL, dedupe by device and key).
//! - Disk and memory per million insights for both.
//!
//! Each insight is a real one: the JSON text an agent stores and sends
//! (about 250 bytes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hub::store::{NewDevice, NewInsight, Store};
use outbox::{NewRecord, Outbox, Priority};
use protocol::DeviceId;
use protocol::insight::{Insight, InsightPriority};
use serde_json::json;

use crate::output::out;

/// `strata bench insights`.
#[derive(Debug, Args)]
pub(crate) struct InsightsArgs {
    /// Seconds each outbox configuration runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Insights ingested by the hub store.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1000..=10_000_000))]
    hub_insights: u64,
    /// Insights per hub batch (the agent's default is 500).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch: u64,
    /// Directory for the benchmark's files (default: a temporary directory
    /// on the same disk as the system's temporary files).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn sample(i: u64) -> Insight {
    Insight {
        key: format!("5f1c2a9e0b7d4c33-{i}"),
        kind: "intent_count".into(),
        series: [
            "HassTurnOn",
            "HassTurnOff",
            "HassLightSet",
            "HassClimateGetTemperature",
        ][(i % 4) as usize]
            .into(),
        priority: InsightPriority::Insight,
        start_ms: 1_790_000_000_000 + (i as i64) * 60_000,
        window_ms: 60_000,
        value: (i % 17) as f64,
        summary: Some("counted on the device over one window".into()),
        attributes: [("p95_ms".to_owned(), 41.5)].into(),
    }
}

/// Resident set size of this process, bytes (Linux).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            };
        }
    }
    total
}

/// Appends from `threads` producers, each appending `batch` records per
/// call, for `seconds`; returns appends per second.
fn outbox_rate(
    dir: &std::path::Path,
    threads: usize,
    batch: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let mut config = outbox::Config::new(dir);
    config.budget_bytes = 8 << 30;
    let outbox = Arc::new(Outbox::open(config)?);
    let payload = serde_json::to_vec(&sample(1))?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (outbox, stop, count, payload) = (
                Arc::clone(&outbox),
                Arc::clone(&stop),
                Arc::clone(&count),
                payload.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let records = (0..batch)
                        .map(|_| NewRecord::new(Priority::Insight, 0, payload.clone()))
                        .collect();
                    for r in outbox.append_batch(records)? {
                        r?;
                    }
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("an outbox producer panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(args: InsightsArgs) -> anyhow::Result<()> {
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let mut rows: Vec<(String, f64, String)> = Vec::new();

    // Outbox disk and memory per million pending insights, first, while the
    // process is fresh (later runs would leave freed memory to reuse).
    let dir = root.join("outbox-million");
    let (disk_per_m, mem_per_m) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
            let _ = std::fs::remove_dir_all(&dir);
            let mut config = outbox::Config::new(&dir);
            config.budget_bytes = 8 << 30;
            let outbox = Outbox::open(config)?;
            let before = rss_bytes();
            let n = 1_000_000u64;
            let mut i = 0;
            while i < n {
                let records = (i..(i + 1000).min(n))
                    .map(|j| {
                        Ok(NewRecord::new(
                            Priority::Insight,
                            0,
                            serde_json::to_vec(&sample(j))?,
                        ))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for r in outbox.append_batch(records)? {
                    r?;
                }
                i += 1000;
            }
            let mem = rss_bytes().saturating_sub(before) as f64;
            let disk = dir_bytes(&dir) as f64;
            drop(outbox);
            let _ = std::fs::remove_dir_all(&dir);
            Ok((disk, mem))
        })
        .await??;
    out(&format!(
        "outbox: 1M pending insights take {:.0} MB on disk, {:.0} MB of memory",
        disk_per_m / 1e6,
        mem_per_m / 1e6
    ));

    // Outbox appends/s with group commit.
    for (threads, batch) in [(64usize, 1usize), (256, 1), (16, 16), (1, 500)] {
        let dir = root.join(format!("outbox-{threads}x{batch}"));
        let seconds = args.seconds;
        let rate = tokio::task::spawn_blocking(move || outbox_rate(&dir, threads, batch, seconds))
            .await??;
        out(&format!(
            "outbox: {threads} producers x {batch} per append: {rate:.0} appends/s"
        ));
        rows.push((
            format!("outbox appends/s, {threads} producers x {batch} per call, fsync'd"),
            rate,
            "≥ 50000".into(),
        ));
    }

    // Hub ingest on SQLite.
    let db_dir = root.join("hub");
    let _ = std::fs::remove_dir_all(&db_dir);
    std::fs::create_dir_all(&db_dir)?;
    let store = Store::open(&db_dir.join("hub.db"))?;
    let device = DeviceId::new("dev-bench0000000001");
    enrol(&store, &device).await?;
    let batches: Vec<Vec<NewInsight>> = (0..args.hub_insights)
        .collect::<Vec<_>>()
        .chunks(args.batch as usize)
        .map(|c| {
            c.iter()
                .map(|&i| {
                    let insight = sample(i);
                    let raw = serde_json::to_string(&insight).unwrap_or_default();
                    NewInsight { insight, raw }
                })
                .collect()
        })
        .collect();
    let before = rss_bytes();
    let start = Instant::now();
    let mut stored = 0;
    for batch in batches {
        stored += store.ingest_insights(device.clone(), batch).await?.stored;
    }
    let secs = start.elapsed().as_secs_f64();
    let hub_rate = stored as f64 / secs;
    let hub_mem = rss_bytes().saturating_sub(before) as f64;
    let hub_disk = dir_bytes(&db_dir) as f64 * 1e6 / stored.max(1) as f64;
    out(&format!(
        "hub: {stored} insights in batches of {} in {secs:.2}s: {hub_rate:.0} insights/s; {:.0} MB on disk per million",
        args.batch,
        hub_disk / 1e6
    ));
    rows.push((
        format!("hub ingest insights/s, SQLite, batches of {}", args.batch),
        hub_rate,
        "≥ 20000".into(),
    ));

    out("");
    out(&format!("{:<62} {:>12}  TARGET", "MEASURE", "STRATA"));
    for (what, v, target) in &rows {
        out(&format!("{what:<62} {v:>12.0}  {target}"));
    }
    out(&format!(
        "{:<62} {:>12.0}",
        "outbox disk bytes per pending insight",
        disk_per_m / 1e6
    ));
    out(&format!(
        "{:<62} {:>12.1}",
        "outbox memory bytes per pending insight",
        mem_per_m / 1e6
    ));
    out(&format!(
        "{:<62} {:>12.0}",
        "hub disk bytes per stored insight",
        hub_disk / 1e6
    ));
    out(&format!(
        "{:<62} {:>12.1}",
        "hub memory growth while storing them, MB",
        hub_mem / 1e6
    ));
    if let Some(path) = &args.json {
        let j = json!({
            "rows": rows.iter().map(|(w, v, t)| json!({"measure": w, "strata": v, "target": t})).collect::<Vec<_>>(),
            "outbox_disk_bytes_per_insight": disk_per_m / 1e6,
            "outbox_memory_bytes_per_insight": mem_per_m / 1e6,
            "hub_disk_bytes_per_insight": hub_disk / 1e6,
            "hub_memory_growth_bytes": hub_mem,
        });
        std::fs::write(path, j.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("strata-bench-insights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Stores a device for the benchmark's insights to belong to.
async fn enrol(store: &Store, device: &DeviceId) -> anyhow::Result<()> {
    let token_id = "bench-token".to_owned();
    store
        .add_token(hub::store::StoredToken {
            id: token_id.clone(),
            secret_hash: String::new(),
            labels: [("site".to_owned(), "bench".to_owned())].into(),
            expires_at: time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
            used_at: None,
        })
        .await?;
    store
        .enroll(
            token_id,
            NewDevice {
                id: device.clone(),
                name: "bench".into(),
                labels: [("site".to_owned(), "bench".to_owned())].into(),
                cert_fingerprint: "00".repeat(32),
                cert_pem: String::new(),
                cert_not_after: time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
            },
        )
        .await?;
    Ok(())
}
