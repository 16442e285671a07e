//! `strata bench fl-aggregate`: the `federated` crate's aggregation strategies
//! against Flower's server-side aggregation on the same updates, in one run.
//!
//! The updates are generated once, deterministically, into a raw
//! little-endian `f32` file (client after client) with a JSON sidecar, in a
//! cache outside the repository, and reused while the sidecar matches.
//! Honest updates cluster around one common direction with noise and spread
//! in length; every twentieth client is an outlier (a sign flip, pure noise,
//! or a scaled-up update), so Multi-Krum has clients to leave out.
//!
//! Each side aggregates each strategy in a process of its own, so that the
//! process's peak resident set (`VmHWM`) is that strategy's alone: Strata's
//! side is `strata bench fl-aggregate-worker`, which streams the updates
//! from the file into a `federated::strategy::Aggregator` one at a time, as
//! the hub receives them; Flower's is `bench/peers/flower_aggregate.py`
//! under the Flower venv, which holds every update as its own ndarray, as
//! Flower's server does. Both time only the aggregation (Strata: the `add`
//! calls and `finish`; Flower: the aggregate call), write the aggregate to a
//! file, and the two aggregates are compared value by value.
//!
//! Flower 1.42 ships two server APIs and both are measured: the
//! `flwr.server.strategy` functions (`aggregate`, `aggregate_median`,
//! `aggregate_trimmed_avg`, `aggregate_krum`) and the Message API's
//! (`flwr.serverapp.strategy`). The first computes Krum's distances in a
//! Python loop over all n² pairs, which takes far too long for a thousand
//! million-value updates, so that row runs at `--krum-clients`.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use federated::strategy::Strategy;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::process::Command;

use super::llm::last_line;
use super::setup::{self, Paths, Progress, WorkDir};
use crate::output::out;

/// Version of the update generator; a cached file made by another version
/// is regenerated.
const GENERATOR: u32 = 1;
/// Every `OUTLIER_EVERY`-th client (indices 19, 39, …) is an outlier, so any
/// prefix of the file holds its share of them.
const OUTLIER_EVERY: usize = 20;
/// Scale of the honest clients' common direction, per coordinate.
const DIRECTION_SCALE: f32 = 0.01;
/// Standard deviation of the honest clients' own noise, per coordinate.
const NOISE_SCALE: f32 = 0.01;
/// Relative spread of the honest updates' length along the direction.
const LENGTH_SPREAD: f32 = 0.2;
/// The range of examples per client (the FedAvg weights).
const EXAMPLES: std::ops::RangeInclusive<u32> = 20..=600;
/// A Strata aggregate and Flower's agree when no value differs by more than
/// this share of the largest absolute value of Strata's: well above the
/// rounding of single-precision sums of a thousand terms, far below any
/// real difference of method.
const AGREEMENT: f64 = 1e-5;

/// A strategy both sides implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum StrategyName {
    /// Weighted mean (FedAvg; FedProx aggregates the same way).
    #[value(name = "fedavg")]
    FedAvg,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    #[value(name = "trimmed_mean", alias = "trimmed-mean")]
    TrimmedMean,
    /// Multi-Krum.
    #[value(name = "multi_krum", alias = "multi-krum", alias = "krum")]
    MultiKrum,
}

impl StrategyName {
    /// The name both programs take on their command lines.
    fn arg(self) -> &'static str {
        match self {
            StrategyName::FedAvg => "fedavg",
            StrategyName::Median => "median",
            StrategyName::TrimmedMean => "trimmed_mean",
            StrategyName::MultiKrum => "multi_krum",
        }
    }
}

/// Which of Flower's two server APIs aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum FlowerApi {
    /// `flwr.server.strategy` and its `aggregate` module (FedAvg, FedMedian,
    /// FedTrimmedAvg, Krum over `FitRes`).
    Legacy,
    /// `flwr.serverapp.strategy`, the Message API (FedAvg, FedMedian,
    /// FedTrimmedAvg, MultiKrum over `RecordDict`s).
    Serverapp,
}

impl FlowerApi {
    fn arg(self) -> &'static str {
        match self {
            FlowerApi::Legacy => "legacy",
            FlowerApi::Serverapp => "serverapp",
        }
    }

    fn module(self) -> &'static str {
        match self {
            FlowerApi::Legacy => "flwr.server.strategy",
            FlowerApi::Serverapp => "flwr.serverapp.strategy",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct FlAggregateArgs {
    /// Updates per round (clients).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,
    /// Parameters per update.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    params: u64,
    /// Strategies to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,median,trimmed_mean,multi_krum"
    )]
    strategies: Vec<StrategyName>,
    /// Updates per round for Multi-Krum against Flower's
    /// `flwr.server.strategy` Krum, whose distance matrix is a Python loop
    /// over all n² pairs (minutes for a thousand million-value updates);
    /// both sides run that row at this size, capped at --clients
    /// [default: --clients].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    krum_clients: Option<u64>,
    /// Flower server APIs to compare against (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "legacy,serverapp")]
    flower_api: Vec<FlowerApi>,
    /// Trimmed mean: the fraction cut at each end (FedTrimmedAvg's default).
    #[arg(long, default_value_t = 0.2)]
    beta: f32,
    /// Seed of the generated updates.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Threads of Flower's BLAS (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS);
    /// Strata's aggregators use every CPU the process may use.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Where the generated updates are cached [default:
    /// $XDG_CACHE_HOME/strata/bench/fl-aggregate, else
    /// ~/.cache/strata/bench/fl-aggregate].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory of the peers from `scripts/build-peers` (venv-flower/)
    /// [default: $XDG_CACHE_HOME/strata/peers, else ~/.cache/strata/peers].
    #[arg(long, env = "STRATA_PEERS")]
    peers: Option<PathBuf>,
    /// Directory of the peer programs (the repository's `bench/peers`).
    #[arg(long)]
    peer_scripts: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `strata bench fl-aggregate-worker`: Strata's side of one row.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The raw little-endian `f32` updates.
    #[arg(long)]
    updates: PathBuf,
    /// Their JSON sidecar (clients, params, weights).
    #[arg(long)]
    meta: PathBuf,
    /// Use the first K clients.
    #[arg(long)]
    clients: usize,
    /// The strategy.
    #[arg(long)]
    strategy: StrategyName,
    /// Trimmed mean: the fraction cut at each end.
    #[arg(long, default_value_t = 0.2)]
    beta: f32,
    /// Multi-Krum: f, the Byzantine clients tolerated.
    #[arg(long, default_value_t = 0)]
    byzantine: usize,
    /// Multi-Krum: the clients kept and averaged.
    #[arg(long, default_value_t = 0)]
    keep: usize,
    /// Write the aggregate here as raw little-endian `f32`.
    #[arg(long)]
    delta_out: Option<PathBuf>,
}

/// The JSON sidecar of an updates file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sidecar {
    /// The layout of the data file.
    format: String,
    /// [`GENERATOR`] of the program that wrote it.
    generator: u32,
    /// Clients (rows).
    clients: usize,
    /// Parameters per client (columns).
    params: usize,
    /// The generator's seed.
    seed: u64,
    /// Examples per client, the FedAvg weights (`num_examples`).
    weights: Vec<u32>,
    /// Indices of the outlier clients, ascending.
    outliers: Vec<usize>,
    /// How the updates were made, for people reading the file.
    recipe: String,
}

impl Sidecar {
    fn new(clients: usize, params: usize, seed: u64, weights: Vec<u32>) -> Sidecar {
        Sidecar {
            format: "f32 little-endian, client-major (clients x params)".to_owned(),
            generator: GENERATOR,
            clients,
            params,
            seed,
            weights,
            outliers: (0..clients).filter(|&i| is_outlier(i)).collect(),
            recipe: format!(
                "honest: c*(1+{LENGTH_SPREAD}*a) + {NOISE_SCALE}*e with c ~ {DIRECTION_SCALE}*N(0,1) \
                 per coordinate shared by all, a ~ N(0,1) per client, e ~ N(0,1) per value; every \
                 {OUTLIER_EVERY}th client (i % {OUTLIER_EVERY} = {}) an outlier, in turn -c + \
                 {NOISE_SCALE}*e (sign flip), {}*e (noise), 5c + {NOISE_SCALE}*e (scaled)",
                OUTLIER_EVERY - 1,
                5.0 * NOISE_SCALE,
            ),
        }
    }

    /// The outliers among the first `clients` clients.
    fn outliers_in(&self, clients: usize) -> usize {
        self.outliers.iter().filter(|&&i| i < clients).count()
    }
}

/// Whether client `i` of a generated file is an outlier.
fn is_outlier(i: usize) -> bool {
    i % OUTLIER_EVERY == OUTLIER_EVERY - 1
}

/// An updates file and its sidecar.
#[derive(Debug, Clone)]
struct Dataset {
    data: PathBuf,
    meta: PathBuf,
    sidecar: Sidecar,
}

impl Dataset {
    /// The file names for a size and seed in `dir`.
    fn paths(dir: &Path, clients: usize, params: usize, seed: u64) -> (PathBuf, PathBuf) {
        let stem = format!("updates-v{GENERATOR}-{clients}x{params}-seed{seed}");
        (
            dir.join(format!("{stem}.f32")),
            dir.join(format!("{stem}.json")),
        )
    }

    /// The cached file, if its sidecar matches and the data has the right
    /// size.
    fn cached(dir: &Path, clients: usize, params: usize, seed: u64) -> Option<Dataset> {
        let (data, meta) = Dataset::paths(dir, clients, params, seed);
        let sidecar: Sidecar = serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
        let expected = Sidecar::new(clients, params, seed, sidecar.weights.clone());
        let bytes = (clients * params * 4) as u64;
        (sidecar == expected
            && sidecar.weights.len() == clients
            && std::fs::metadata(&data).ok()?.len() == bytes)
            .then_some(Dataset {
                data,
                meta,
                sidecar,
            })
    }

    /// Generates the updates into `dir` (the data first, then the sidecar,
    /// each through a temporary name, so an interrupted run leaves nothing
    /// that looks complete).
    fn generate(dir: &Path, clients: usize, params: usize, seed: u64) -> anyhow::Result<Dataset> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (data, meta) = Dataset::paths(dir, clients, params, seed);
        let partial = data.with_extension("f32.partial");
        let file =
            File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut writer = BufWriter::with_capacity(1 << 22, file);
        let mut generator = UpdateGenerator::new(params, seed);
        let mut row = vec![0f32; params];
        let mut bytes = Vec::with_capacity(params * 4);
        let mut weights = Vec::with_capacity(clients);
        for i in 0..clients {
            weights.push(generator.next_update(i, &mut row));
            bytes.clear();
            bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
            writer
                .write_all(&bytes)
                .with_context(|| format!("writing {}", partial.display()))?;
        }
        writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &data)
            .with_context(|| format!("renaming {}", partial.display()))?;
        let sidecar = Sidecar::new(clients, params, seed, weights);
        let partial = meta.with_extension("json.partial");
        std::fs::write(&partial, serde_json::to_vec_pretty(&sidecar)?)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &meta)
            .with_context(|| format!("renaming {}", partial.display()))?;
        Ok(Dataset {
            data,
            meta,
            sidecar,
        })
    }
}

/// The deterministic source of the benchmark's updates.
struct UpdateGenerator {
    rng: ChaCha8Rng,
    direction: Vec<f32>,
}

impl UpdateGenerator {
    fn new(params: usize, seed: u64) -> UpdateGenerator {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let direction = (0..params)
            .map(|_| DIRECTION_SCALE * rng.sample::<f32, _>(StandardNormal))
            .collect();
        UpdateGenerator { rng, direction }
    }

    /// Fills `row` with client `i`'s update and returns its example count.
    /// Clients must be asked for in order: each draws from the one stream.
    fn next_update(&mut self, i: usize, row: &mut [f32]) -> u32 {
        let weight = self.rng.random_range(EXAMPLES);
        let rng = &mut self.rng;
        let mut noise = move || rng.sample::<f32, _>(StandardNormal);
        let (along, spread) = if !is_outlier(i) {
            (1.0 + LENGTH_SPREAD * noise(), NOISE_SCALE)
        } else {
            match (i / OUTLIER_EVERY) % 3 {
                0 => (-1.0, NOISE_SCALE),
                1 => (0.0, 5.0 * NOISE_SCALE),
                _ => (5.0, NOISE_SCALE),
            }
        };
        for (value, c) in row.iter_mut().zip(&self.direction) {
            *value = along * c + spread * noise();
        }
        weight
    }
}

/// One row of the comparison: a strategy at a size against one Flower API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    strategy: StrategyName,
    api: FlowerApi,
    clients: usize,
}

/// The parameters both sides get for one strategy at one size.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Round {
    strategy: StrategyName,
    clients: usize,
    beta: f32,
    /// Multi-Krum's f: the outliers among the round's clients.
    byzantine: usize,
    /// Multi-Krum's kept clients: all but f.
    keep: usize,
}

impl Round {
    fn new(strategy: StrategyName, clients: usize, beta: f32, sidecar: &Sidecar) -> Round {
        let byzantine = sidecar.outliers_in(clients);
        Round {
            strategy,
            clients,
            beta,
            byzantine,
            keep: clients - byzantine,
        }
    }

    /// The strategy as the `federated` crate spells it.
    fn strategy(&self) -> Strategy {
        match self.strategy {
            StrategyName::FedAvg => Strategy::FedAvg,
            StrategyName::Median => Strategy::Median { mixing: None },
            StrategyName::TrimmedMean => Strategy::TrimmedMean {
                beta: self.beta,
                mixing: None,
            },
            StrategyName::MultiKrum => Strategy::MultiKrum {
                byzantine: self.byzantine,
                keep: self.keep,
            },
        }
    }

    /// The arguments both programs share.
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--clients".to_owned(),
            self.clients.to_string(),
            "--strategy".to_owned(),
            self.strategy.arg().to_owned(),
        ];
        match self.strategy {
            StrategyName::TrimmedMean => args.extend(["--beta".to_owned(), self.beta.to_string()]),
            StrategyName::MultiKrum => args.extend([
                "--byzantine".to_owned(),
                self.byzantine.to_string(),
                "--keep".to_owned(),
                self.keep.to_string(),
            ]),
            StrategyName::FedAvg | StrategyName::Median => {}
        }
        args
    }

    /// How the table names it.
    fn label(&self) -> String {
        match self.strategy {
            StrategyName::FedAvg => "FedAvg".to_owned(),
            StrategyName::Median => "median".to_owned(),
            StrategyName::TrimmedMean => format!("trimmed mean β={}", self.beta),
            StrategyName::MultiKrum => {
                format!("Multi-Krum f={} keep={}", self.byzantine, self.keep)
            }
        }
    }
}

/// The rows to run: every strategy against every API, Multi-Krum against
/// the legacy API at `krum_clients`.
fn plan(
    strategies: &[StrategyName],
    apis: &[FlowerApi],
    clients: usize,
    krum_clients: usize,
) -> Vec<Row> {
    let mut strategies = strategies.to_vec();
    strategies.sort();
    strategies.dedup();
    let mut apis = apis.to_vec();
    apis.sort();
    apis.dedup();
    let mut rows = Vec::new();
    for &strategy in &strategies {
        for &api in &apis {
            let clients = if strategy == StrategyName::MultiKrum && api == FlowerApi::Legacy {
                krum_clients.min(clients)
            } else {
                clients
            };
            rows.push(Row {
                strategy,
                api,
                clients,
            });
        }
    }
    rows
}

/// What one side reported for one row.
#[derive(Debug, Clone)]
struct Measured {
    seconds: f64,
    peak_bytes: u64,
    /// Multi-Krum's kept clients, ascending.
    selected: Option<Vec<usize>>,
    delta: PathBuf,
    raw: Value,
}

impl Measured {
    fn parse(raw: Value, delta: PathBuf, who: &str) -> anyhow::Result<Measured> {
        let seconds = raw
            .get("seconds")
            .and_then(Value::as_f64)
            .with_context(|| format!("{who} printed no seconds: {raw}"))?;
        let peak_bytes = raw
            .get("peak_rss_bytes")
            .and_then(Value::as_u64)
            .with_context(|| format!("{who} printed no peak_rss_bytes: {raw}"))?;
        let selected = match raw.get("selected") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<Vec<usize>>(v.clone())
                    .with_context(|| format!("{who} printed a bad selected list: {v}"))?,
            ),
        };
        Ok(Measured {
            seconds,
            peak_bytes,
            selected,
            delta,
            raw,
        })
    }
}

/// One finished row.
#[derive(Debug, Clone)]
struct Compared {
    row: Row,
    round: Round,
    strata: Measured,
    flower: Measured,
    max_abs_diff: f64,
    max_abs_strata: f64,
}

impl Compared {
    fn time_ratio(&self) -> f64 {
        self.flower.seconds / self.strata.seconds
    }

    fn memory_ratio(&self) -> f64 {
        self.flower.peak_bytes as f64 / self.strata.peak_bytes as f64
    }

    fn same_selection(&self) -> Option<bool> {
        match (&self.strata.selected, &self.flower.selected) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        }
    }

    fn agrees(&self) -> bool {
        self.max_abs_diff <= AGREEMENT * self.max_abs_strata.max(f64::MIN_POSITIVE)
            && self.same_selection() != Some(false)
    }

    fn json(&self) -> Value {
        json!({
            "strategy": self.row.strategy.arg(),
            "flower_api": self.row.api.module(),
            "clients": self.round.clients,
            "beta": (self.round.strategy == StrategyName::TrimmedMean).then_some(self.round.beta),
            "byzantine": (self.round.strategy == StrategyName::MultiKrum).then_some(self.round.byzantine),
            "keep": (self.round.strategy == StrategyName::MultiKrum).then_some(self.round.keep),
            "strata_seconds": self.strata.seconds,
            "flower_seconds": self.flower.seconds,
            "time_ratio": self.time_ratio(),
            "strata_peak_bytes": self.strata.peak_bytes,
            "flower_peak_bytes": self.flower.peak_bytes,
            "memory_ratio": self.memory_ratio(),
            "max_abs_diff": self.max_abs_diff,
            "max_abs_strata": self.max_abs_strata,
            "same_selection": self.same_selection(),
            "agrees": self.agrees(),
            "strata": self.strata.raw,
            "flower": self.flower.raw,
        })
    }
}

pub(crate) async fn run(args: FlAggregateArgs) -> anyhow::Result<()> {
    let clients = usize::try_from(args.clients)?;
    let params = usize::try_from(args.params)?;
    let krum_clients = usize::try_from(args.krum_clients.unwrap_or(args.clients))?;
    if !(0.0..0.5).contains(&args.beta) {
        bail!("--beta must be in [0, 0.5), not {}", args.beta);
    }
    if args.strategies.is_empty() || args.flower_api.is_empty() {
        bail!("--strategies and --flower-api need at least one value each");
    }
    let rows = plan(&args.strategies, &args.flower_api, clients, krum_clients);
    // Multi-Krum needs more than 2f + 2 updates; f is 0 below 20 clients.
    if rows
        .iter()
        .any(|r| r.strategy == StrategyName::MultiKrum && r.clients < 3)
    {
        bail!("Multi-Krum needs at least 3 clients (--clients, --krum-clients)");
    }

    // Every program is checked before anything is generated or measured.
    let paths = Paths::find(None, args.peers.clone(), args.peer_scripts.clone());
    let python = flower_python(&paths.peers);
    if !python.is_file() {
        bail!(
            "Flower's Python venv is missing ({}): run scripts/build-peers (or pass --peers DIR / set STRATA_PEERS)",
            python.display()
        );
    }
    let script = paths
        .scripts
        .clone()
        .unwrap_or_default()
        .join("flower_aggregate.py");
    if !script.is_file() {
        bail!(
            "the Flower peer program bench/peers/flower_aggregate.py was not found: run from the repository or pass --peer-scripts DIR"
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| setup::cache_dir("bench").join("fl-aggregate"));

    let strata_runs = {
        let mut keys: Vec<(StrategyName, usize)> =
            rows.iter().map(|r| (r.strategy, r.clients)).collect();
        keys.sort();
        keys.dedup();
        keys.len() as u64
    };
    let progress = Progress::new(1 + strata_runs + rows.len() as u64);
    let work = WorkDir::create()?;
    let outcome = measure_all(
        &args, &rows, clients, params, &data_dir, &python, &script, &work, &progress,
    )
    .await;
    progress.finish();
    let (dataset, compared) = match outcome {
        Ok(v) => v,
        Err(e) => {
            return Err(e.context(format!(
                "benchmark stopped; its files are in {}",
                work.path().display()
            )));
        }
    };
    work.remove();

    let (cpu, cpus) = setup::machine();
    for line in table(&compared, params) {
        out(&line);
    }
    for note in notes(&compared, &dataset, krum_clients.min(clients), clients) {
        out(&note);
    }
    if let Some(path) = &args.out {
        let flower_versions = compared.first().map(|c| {
            json!({
                "flwr": c.flower.raw.get("flwr"),
                "numpy": c.flower.raw.get("numpy"),
                "python": c.flower.raw.get("python"),
                "blas_core": c.flower.raw.get("blas_core"),
            })
        });
        let report = json!({
            "machine": {"cpu": cpu, "cpus": cpus},
            "data": {
                "file": dataset.data.display().to_string(),
                "clients": dataset.sidecar.clients,
                "params": params,
                "seed": dataset.sidecar.seed,
                "outliers": dataset.sidecar.outliers.len(),
                "recipe": dataset.sidecar.recipe,
            },
            "flower": flower_versions,
            "flower_threads": args.threads,
            "agreement_tolerance": AGREEMENT,
            "rows": compared.iter().map(Compared::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    if let Some(bad) = compared.iter().find(|c| !c.agrees()) {
        bail!(
            "Strata and Flower disagree on {} against {} (max |Δ| {:e}, same selection {:?})",
            bad.round.label(),
            bad.row.api.module(),
            bad.max_abs_diff,
            bad.same_selection()
        );
    }
    Ok(())
}

/// The Flower venv's Python under a peers directory.
fn flower_python(peers: &Path) -> PathBuf {
    peers.join("venv-flower").join("bin").join("python")
}

#[allow(clippy::too_many_arguments)]
async fn measure_all(
    args: &FlAggregateArgs,
    rows: &[Row],
    clients: usize,
    params: usize,
    data_dir: &Path,
    python: &Path,
    script: &Path,
    work: &WorkDir,
    progress: &Progress,
) -> anyhow::Result<(Dataset, Vec<Compared>)> {
    let (seed, dir) = (args.seed, data_dir.to_path_buf());
    let dataset = match Dataset::cached(&dir, clients, params, seed) {
        Some(d) => {
            progress.step(&format!("reusing {}", d.data.display()));
            d
        }
        None => {
            progress.step(&format!(
                "generating {clients} updates of {params} parameters ({:.1} GiB) in {}",
                (clients * params * 4) as f64 / f64::from(1u32 << 30),
                dir.display()
            ));
            let started = Instant::now();
            let d =
                tokio::task::spawn_blocking(move || Dataset::generate(&dir, clients, params, seed))
                    .await??;
            tracing::debug!(seconds = started.elapsed().as_secs_f64(), file = %d.data.display(), "generated updates");
            d
        }
    };

    // Strata's runs by strategy and size: one serves every Flower API.
    let mut measured: BTreeMap<(StrategyName, usize), Measured> = BTreeMap::new();
    let mut compared = Vec::new();
    for row in rows {
        let round = Round::new(row.strategy, row.clients, args.beta, &dataset.sidecar);
        let key = (row.strategy, row.clients);
        let strata = match measured.entry(key) {
            Entry::Occupied(done) => done.get().clone(),
            Entry::Vacant(slot) => {
                progress.step(&format!(
                    "Strata {} on {} × {params}",
                    round.label(),
                    round.clients
                ));
                let m = run_strata(&round, &dataset, work).await?;
                tracing::debug!(
                    strategy = row.strategy.arg(),
                    clients = row.clients,
                    seconds = m.seconds,
                    peak = m.peak_bytes,
                    "strata"
                );
                slot.insert(m).clone()
            }
        };
        progress.step(&format!(
            "Flower {} ({}) on {} × {params}",
            round.label(),
            row.api.module(),
            round.clients
        ));
        let flower = run_flower(
            &round,
            row.api,
            &dataset,
            python,
            script,
            args.threads,
            work,
        )
        .await?;
        tracing::debug!(
            strategy = row.strategy.arg(),
            api = row.api.arg(),
            clients = row.clients,
            seconds = flower.seconds,
            peak = flower.peak_bytes,
            "flower"
        );
        let (a, b) = (read_f32(&strata.delta)?, read_f32(&flower.delta)?);
        if a.len() != params || b.len() != params {
            bail!(
                "aggregates of {} and {} values, expected {params}",
                a.len(),
                b.len()
            );
        }
        compared.push(Compared {
            row: *row,
            round,
            max_abs_diff: max_abs_diff(&a, &b),
            max_abs_strata: a.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))),
            strata,
            flower,
        });
    }
    Ok((dataset, compared))
}

/// Runs Strata's worker for one round.
async fn run_strata(round: &Round, dataset: &Dataset, work: &WorkDir) -> anyhow::Result<Measured> {
    let delta = work.path().join(format!(
        "strata-{}-{}.f32",
        round.strategy.arg(),
        round.clients
    ));
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "fl-aggregate-worker", "--updates"])
        .arg(&dataset.data)
        .arg("--meta")
        .arg(&dataset.meta)
        .args(round.args())
        .arg("--delta-out")
        .arg(&delta)
        .env("STRATA_LOG", "warn");
    let raw = run_json(cmd, "strata bench fl-aggregate-worker").await?;
    Measured::parse(raw, delta, "strata bench fl-aggregate-worker")
}

/// Runs Flower's peer for one round.
async fn run_flower(
    round: &Round,
    api: FlowerApi,
    dataset: &Dataset,
    python: &Path,
    script: &Path,
    threads: u32,
    work: &WorkDir,
) -> anyhow::Result<Measured> {
    let delta = work.path().join(format!(
        "flower-{}-{}-{}.f32",
        api.arg(),
        round.strategy.arg(),
        round.clients
    ));
    let threads = threads.to_string();
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--updates")
        .arg(&dataset.data)
        .arg("--meta")
        .arg(&dataset.meta)
        .args(["--api", api.arg(), "--threads", &threads])
        .args(round.args())
        .arg("--delta-out")
        .arg(&delta)
        .env("OMP_NUM_THREADS", &threads)
        .env("OPENBLAS_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads);
    let raw = run_json(cmd, "the Flower peer").await?;
    Measured::parse(raw, delta, "the Flower peer")
}

/// Runs a program and parses the last line it prints as JSON.
async fn run_json(mut cmd: Command, what: &str) -> anyhow::Result<Value> {
    let output = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            last_line(&output.stderr)
        );
    }
    let line = last_line(&output.stdout);
    serde_json::from_str(&line)
        .with_context(|| format!("{what} printed no JSON line (got {line:?})"))
}

/// A raw little-endian `f32` file.
fn read_f32(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() % 4 != 0 {
        bail!("{} is not a whole number of f32 values", path.display());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The largest absolute difference between two equally long vectors.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

/// A duration for the table, in a unit that leaves two or three digits.
fn seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 100.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.0} s")
    }
}

/// Bytes as MiB.
fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / f64::from(1u32 << 20))
}

/// The results table, one line per row.
fn table(rows: &[Compared], params: usize) -> Vec<String> {
    let mut lines = vec![
        format!(
            "Federated aggregation, Strata (federated crate) vs Flower 1.42 server-side, {params} parameters per update:"
        ),
        format!(
            "{:<28} {:>7} {:<24} {:>10} {:>10} {:>7} {:>10} {:>10} {:>6} {:>10}",
            "strategy",
            "clients",
            "Flower API",
            "Strata",
            "Flower",
            "time×",
            "Strata MiB",
            "Flower MiB",
            "mem×",
            "max |Δ|"
        ),
    ];
    for c in rows {
        lines.push(format!(
            "{:<28} {:>7} {:<24} {:>10} {:>10} {:>7.1} {:>10} {:>10} {:>6.1} {:>10.1e}{}",
            c.round.label(),
            c.round.clients,
            c.row.api.module(),
            seconds(c.strata.seconds),
            seconds(c.flower.seconds),
            c.time_ratio(),
            mib(c.strata.peak_bytes),
            mib(c.flower.peak_bytes),
            c.memory_ratio(),
            c.max_abs_diff,
            if c.agrees() { "" } else { "  DISAGREE" },
        ));
    }
    lines
}

/// What the table needs said beside it.
fn notes(rows: &[Compared], dataset: &Dataset, krum_clients: usize, clients: usize) -> Vec<String> {
    let mut notes = vec![
        "time× and mem×: Flower's over Strata's (above 1: Strata faster / smaller). Time is the \
         aggregation call only; memory is each process's peak resident set (VmHWM), loading \
         included. Strata's worker takes the updates in one at a time, as the hub receives them \
         (FedAvg keeps a running sum, the robust strategies buffer every update); Flower's peer \
         holds them all, as its server does, before it aggregates."
            .to_owned(),
    ];
    if rows
        .iter()
        .any(|r| r.row.strategy == StrategyName::MultiKrum && r.row.api == FlowerApi::Legacy)
        && krum_clients < clients
    {
        notes.push(format!(
            "Multi-Krum against flwr.server.strategy runs at {krum_clients} clients on both sides \
             (--krum-clients): its aggregate_krum computes the distances in a Python loop over all \
             n² pairs; flwr.serverapp.strategy's MultiKrum uses one matrix product and runs \
             with all {clients} clients."
        ));
    }
    for r in rows {
        if let Some(same) = r.same_selection() {
            let outliers_out = r
                .strata
                .selected
                .as_ref()
                .is_some_and(|s| s.iter().all(|&i| !dataset.sidecar.outliers.contains(&i)));
            notes.push(format!(
                "{} against {} at {} clients: {} {} clients; Strata {} the {} outliers.",
                r.round.label(),
                r.row.api.module(),
                r.round.clients,
                if same {
                    "Strata and Flower kept the same"
                } else {
                    "Strata and Flower kept different sets of"
                },
                r.round.keep,
                if outliers_out {
                    "left out all"
                } else {
                    "did not leave out all"
                },
                r.round.byzantine,
            ));
        }
    }
    notes
}

/// Runs the worker and prints one JSON line.
pub(crate) async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let line = tokio::task::spawn_blocking(move || worker_blocking(&args)).await??;
    out(&line);
    Ok(())
}

fn worker_blocking(args: &WorkerArgs) -> anyhow::Result<String> {
    let sidecar: Sidecar = serde_json::from_slice(
        &std::fs::read(&args.meta).with_context(|| format!("reading {}", args.meta.display()))?,
    )
    .with_context(|| format!("parsing {}", args.meta.display()))?;
    if args.clients == 0 || args.clients > sidecar.clients {
        bail!(
            "--clients must be in 1..={}, not {}",
            sidecar.clients,
            args.clients
        );
    }
    let round = Round {
        strategy: args.strategy,
        clients: args.clients,
        beta: args.beta,
        byzantine: args.byzantine,
        keep: args.keep,
    };
    let strategy = round.strategy();
    strategy.validate()?;
    let params = sidecar.params;
    let mut file =
        File::open(&args.updates).with_context(|| format!("opening {}", args.updates.display()))?;
    let mut bytes = vec![0u8; params * 4];
    let mut update = vec![0f32; params];
    let mut aggregator = strategy.aggregator(params);
    // Only the aggregator's work is timed, as on Flower's side: reading and
    // decoding the file stands in for receiving the update.
    let mut add = Duration::ZERO;
    for (i, &weight) in sidecar.weights.iter().take(args.clients).enumerate() {
        file.read_exact(&mut bytes)
            .with_context(|| format!("reading client {i} of {}", args.updates.display()))?;
        for (v, b) in update.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        let started = Instant::now();
        aggregator.add(&update, weight as f32)?;
        add += started.elapsed();
    }
    drop((bytes, update, file));
    let rss_before = setup::memory_status(std::process::id())?
        .get("VmRSS")
        .copied();
    let started = Instant::now();
    let aggregate = aggregator.finish()?;
    let finish = started.elapsed();
    let peak = setup::memory_status(std::process::id())?
        .get("VmHWM")
        .copied();
    if let Some(path) = &args.delta_out {
        let bytes: Vec<u8> = aggregate
            .delta
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let selected = (args.strategy == StrategyName::MultiKrum).then(|| {
        (0..args.clients)
            .filter(|i| aggregate.excluded.binary_search(i).is_err())
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "peer": "strata",
        "strategy": args.strategy.arg(),
        "clients": args.clients,
        "params": params,
        "seconds": (add + finish).as_secs_f64(),
        "add_seconds": add.as_secs_f64(),
        "finish_seconds": finish.as_secs_f64(),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "used": aggregate.used,
        "streaming": strategy.is_streaming(),
        "threads": std::thread::available_parallelism().map_or(1, usize::from),
        "selected": selected,
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temporary directory")
    }

    #[test]
    fn generation_is_deterministic_and_cached() {
        let tmp = dir();
        let a = Dataset::generate(tmp.path(), 45, 64, 7).expect("generate");
        let first = std::fs::read(&a.data).expect("data");
        assert_eq!(first.len(), 45 * 64 * 4);
        assert_eq!(a.sidecar.outliers, vec![19, 39]);
        assert!(a.sidecar.weights.iter().all(|w| EXAMPLES.contains(w)));

        let cached = Dataset::cached(tmp.path(), 45, 64, 7).expect("reused");
        assert_eq!(cached.sidecar, a.sidecar);
        // Another seed or size is another file.
        assert!(Dataset::cached(tmp.path(), 45, 64, 8).is_none());
        assert!(Dataset::cached(tmp.path(), 44, 64, 7).is_none());

        let again = dir();
        Dataset::generate(again.path(), 45, 64, 7).expect("generate");
        let (data, _) = Dataset::paths(again.path(), 45, 64, 7);
        assert_eq!(std::fs::read(data).expect("data"), first);

        // A truncated data file is not reused.
        std::fs::write(&a.data, &first[..100]).expect("truncate");
        assert!(Dataset::cached(tmp.path(), 45, 64, 7).is_none());
    }

    #[test]
    fn multi_krum_leaves_out_exactly_the_outliers() {
        let (clients, params) = (80, 4096);
        let mut generator = UpdateGenerator::new(params, 1);
        let mut values = vec![0f32; clients * params];
        let weights: Vec<f32> = values
            .chunks_exact_mut(params)
            .enumerate()
            .map(|(i, row)| generator.next_update(i, row) as f32)
            .collect();
        let updates: Vec<(&[f32], f32)> = values.chunks_exact(params).zip(weights).collect();
        let outliers: Vec<usize> = (0..clients).filter(|&i| is_outlier(i)).collect();
        assert_eq!(outliers, vec![19, 39, 59, 79]);
        let strategy = Strategy::MultiKrum {
            byzantine: outliers.len(),
            keep: clients - outliers.len(),
        };
        let aggregate =
            federated::strategy::aggregate(&strategy, params, &updates).expect("multi-krum");
        assert_eq!(aggregate.excluded, outliers);
    }

    #[test]
    fn worker_aggregates_the_file_like_the_library() {
        let tmp = dir();
        let d = Dataset::generate(tmp.path(), 40, 32, 3).expect("generate");
        let bytes = std::fs::read(&d.data).expect("data");
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for strategy in [
            StrategyName::FedAvg,
            StrategyName::Median,
            StrategyName::TrimmedMean,
            StrategyName::MultiKrum,
        ] {
            let round = Round::new(strategy, 40, 0.2, &d.sidecar);
            let out = tmp.path().join("delta.f32");
            let line = worker_blocking(&WorkerArgs {
                updates: d.data.clone(),
                meta: d.meta.clone(),
                clients: round.clients,
                strategy,
                beta: round.beta,
                byzantine: round.byzantine,
                keep: round.keep,
                delta_out: Some(out.clone()),
            })
            .expect("worker");
            let updates: Vec<(&[f32], f32)> = values
                .chunks_exact(32)
                .zip(&d.sidecar.weights)
                .map(|(u, &w)| (u, w as f32))
                .collect();
            let want =
                federated::strategy::aggregate(&round.strategy(), 32, &updates).expect("aggregate");
            assert_eq!(read_f32(&out).expect("delta"), want.delta, "{strategy:?}");
            let v: Value = serde_json::from_str(&line).expect("json");
            assert!(v["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
            if strategy == StrategyName::MultiKrum {
                // The two outliers (19, 39) are the ones left out.
                let selected: Vec<usize> =
                    serde_json::from_value(v["selected"].clone()).expect("selected");
                assert_eq!(selected.len(), 38);
                assert!(!selected.contains(&19) && !selected.contains(&39));
            } else {
                assert!(v["selected"].is_null());
            }
        }
    }

    #[test]
    fn krum_against_the_legacy_api_runs_at_the_smaller_size() {
        let rows = plan(
            &[
                StrategyName::MultiKrum,
                StrategyName::FedAvg,
                StrategyName::FedAvg,
            ],
            &[FlowerApi::Serverapp, FlowerApi::Legacy],
            1000,
            200,
        );
        let got: Vec<(StrategyName, FlowerApi, usize)> = rows
            .iter()
            .map(|r| (r.strategy, r.api, r.clients))
            .collect();
        assert_eq!(
            got,
            vec![
                (StrategyName::FedAvg, FlowerApi::Legacy, 1000),
                (StrategyName::FedAvg, FlowerApi::Serverapp, 1000),
                (StrategyName::MultiKrum, FlowerApi::Legacy, 200),
                (StrategyName::MultiKrum, FlowerApi::Serverapp, 1000),
            ]
        );
        // --krum-clients above --clients is capped.
        assert_eq!(
            plan(&[StrategyName::MultiKrum], &[FlowerApi::Legacy], 20, 200)[0].clients,
            20
        );
    }

    #[test]
    fn krum_parameters_follow_the_outliers_in_the_prefix() {
        let sidecar = Sidecar::new(1000, 1, 0, vec![1; 1000]);
        let cases = [(1000, 50), (200, 10), (39, 1), (19, 0)];
        for (clients, f) in cases {
            let round = Round::new(StrategyName::MultiKrum, clients, 0.2, &sidecar);
            assert_eq!((round.byzantine, round.keep), (f, clients - f), "{clients}");
        }
    }

    #[test]
    fn differences_and_agreement() {
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.0, -2.5, 3.25]), 0.5);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
        let measured = |selected: Option<Vec<usize>>| Measured {
            seconds: 2.0,
            peak_bytes: 1 << 20,
            selected,
            delta: PathBuf::new(),
            raw: Value::Null,
        };
        let mut c = Compared {
            row: Row {
                strategy: StrategyName::MultiKrum,
                api: FlowerApi::Legacy,
                clients: 4,
            },
            round: Round {
                strategy: StrategyName::MultiKrum,
                clients: 4,
                beta: 0.2,
                byzantine: 0,
                keep: 4,
            },
            strata: measured(Some(vec![0, 1, 2])),
            flower: Measured {
                seconds: 6.0,
                peak_bytes: 3 << 20,
                ..measured(Some(vec![0, 1, 2]))
            },
            max_abs_diff: 1e-7,
            max_abs_strata: 0.1,
        };
        assert_eq!(c.time_ratio(), 3.0);
        assert_eq!(c.memory_ratio(), 3.0);
        assert!(c.agrees());
        c.flower.selected = Some(vec![0, 1, 3]);
        assert!(!c.agrees(), "a different selection disagrees");
        c.flower.selected = c.strata.selected.clone();
        c.max_abs_diff = 1e-3;
        assert!(!c.agrees(), "a large difference disagrees");
        assert!(table(&[c], 8)[2].ends_with("DISAGREE"));
    }

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(seconds(0.000_042), "42 µs");
        assert_eq!(seconds(0.0123), "12 ms");
        assert_eq!(seconds(9.5), "9.50 s");
        assert_eq!(seconds(412.6), "413 s");
        assert_eq!(mib(3 << 20), "3");
    }
}
