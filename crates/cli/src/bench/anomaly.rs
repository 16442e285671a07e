//! `strata bench anomaly`: Strata's streaming Half-Space Trees against
//! river's `HalfSpaceTrees` on the same shuttle stream, in one run.
//!
//! Both run the same model (a min-max scaler learnt online in front of 10
//! trees of height 8, windows of 250 readings, seed 42) over the 49,097
//! readings in file order, scoring each reading before learning from it.
//! Both are judged by the same rules: ROC-AUC (ties averaged) and F1 at the
//! rate-matched threshold (flag the P highest scores, P = the number of true
//! anomalies), plus the best F1 over all thresholds.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use runtime::anomaly::{
    HstConfig, StreamingDetector, ThresholdRule, evaluate_scores, load_shuttle,
};

use crate::bench::setup::Paths;
use crate::output::out;

#[derive(Debug, Args)]
pub(crate) struct AnomalyArgs {
    /// Directory of the models and data sets (default: `$STRATA_ASSETS`,
    /// else the cache `scripts/fetch-assets` fills).
    #[arg(long, env = "STRATA_ASSETS")]
    assets: Option<PathBuf>,
    /// Directory of the peers `scripts/build-peers` installs.
    #[arg(long, env = "STRATA_PEERS")]
    peers: Option<PathBuf>,
    /// Directory of the peer programs (the repository's `bench/peers`).
    #[arg(long)]
    peer_scripts: Option<PathBuf>,
    /// Seed of Strata's tree structure.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What river's peer prints.
#[derive(Debug)]
struct RiverResult {
    rows: usize,
    roc_auc: f64,
    f1: f64,
    f1_best: Option<f64>,
    seconds: f64,
    rows_per_s: f64,
}

impl RiverResult {
    fn parse(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        Some(Self {
            rows: usize::try_from(v.get("rows")?.as_u64()?).ok()?,
            roc_auc: num("roc_auc")?,
            f1: num("f1")?,
            f1_best: num("f1_best"),
            seconds: num("seconds")?,
            rows_per_s: num("rows_per_s")?,
        })
    }
}

pub(crate) async fn run(args: AnomalyArgs) -> anyhow::Result<()> {
    let paths = Paths::find(args.assets, args.peers, args.peer_scripts);
    let data_path = paths.assets.join("river").join("shuttle.csv.gz");
    if !data_path.is_file() {
        bail!(
            "{} not found: run scripts/fetch-assets",
            data_path.display()
        );
    }
    let script = paths
        .scripts
        .clone()
        .unwrap_or_default()
        .join("hst_river.py");
    if !script.is_file() {
        bail!(
            "the river peer program bench/peers/hst_river.py was not found: run from the repository or pass --peer-scripts DIR"
        );
    }
    if !paths.python.is_file() {
        bail!(
            "{} not found: run scripts/build-peers",
            paths.python.display()
        );
    }

    let seed = args.seed;
    let data = data_path.clone();
    let (strata, strata_secs) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let stream = load_shuttle(&data)?;
        let config = HstConfig {
            n_trees: 10,
            height: 8,
            window_size: 250,
            seed,
        };
        let mut detector = StreamingDetector::new(stream.readings[0].len(), config)?;
        let start = Instant::now();
        let scores = stream
            .readings
            .iter()
            .map(|x| detector.score_and_learn(x))
            .collect::<Result<Vec<f64>, _>>()?;
        let secs = start.elapsed().as_secs_f64();
        // Rate-matched threshold: the P-th highest score, P true anomalies.
        let p = stream.labels.iter().filter(|l| **l).count().max(1);
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[(p - 1).min(sorted.len() - 1)];
        Ok((
            evaluate_scores(&scores, &stream.labels, ThresholdRule::Fixed(threshold)),
            secs,
        ))
    })
    .await??;

    let output = Command::new(&paths.python)
        .arg(&script)
        .arg("--data")
        .arg(&data_path)
        .output()
        .context("running river's HalfSpaceTrees peer")?;
    if !output.status.success() {
        bail!(
            "the river peer failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let river: RiverResult = stdout
        .lines()
        .rev()
        .find_map(RiverResult::parse)
        .context("the river peer printed no result line")?;
    if river.rows != strata.n {
        bail!(
            "river scored {} readings, Strata {}: not the same stream",
            river.rows,
            strata.n
        );
    }

    let strata_rate = strata.n as f64 / strata_secs;
    out(&format!(
        "Half-Space Trees on shuttle ({} readings, {} anomalies), scored then learnt in stream order:",
        strata.n, strata.n_anomalies
    ));
    out(&format!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "Strata", "river", "ratio"
    ));
    out(&format!(
        "{:<34} {:>12.4} {:>12.4} {:>8.3}",
        "ROC-AUC",
        strata.roc_auc,
        river.roc_auc,
        strata.roc_auc / river.roc_auc
    ));
    out(&format!(
        "{:<34} {:>12.4} {:>12.4} {:>8.3}",
        "F1 (flag the top P, P = anomalies)",
        strata.f1,
        river.f1,
        strata.f1 / river.f1
    ));
    if let Some(best) = river.f1_best {
        out(&format!(
            "{:<34} {:>12.4} {:>12.4} {:>8.3}",
            "best F1 over thresholds (oracle)",
            strata.best_f1,
            best,
            strata.best_f1 / best
        ));
    }
    out(&format!(
        "{:<34} {:>12.0} {:>12.0} {:>8.1}",
        "readings per second",
        strata_rate,
        river.rows_per_s,
        strata_rate / river.rows_per_s
    ));
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "readings": strata.n,
            "anomalies": strata.n_anomalies,
            "strata": {
                "roc_auc": strata.roc_auc, "f1": strata.f1, "best_f1": strata.best_f1,
                "seconds": strata_secs, "readings_per_s": strata_rate,
            },
            "river": {
                "roc_auc": river.roc_auc, "f1": river.f1, "best_f1": river.f1_best,
                "seconds": river.seconds, "readings_per_s": river.rows_per_s,
            },
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
