//! `strata fl`: federated learning from the command line.
//!
//! `strata fl simulate` runs a federated task end to end on this machine: a
//! real hub process on loopback, and many virtual devices, each enrolled
//! with its own certificate, invited over its own event stream, and taking
//! part through the agent's own client code ([`edge::federated::take_part`])
//! on its own non-IID slice of a real data set. Dropouts, stragglers and
//! Byzantine devices are injected; the global model is evaluated after
//! every round on a held-out split no device trains on, next to a model
//! trained centrally on the same training data.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use edge::federated::{Behaviour, FlClient, LocalData, Participation, Tamper};
use federated::attack::Attack;
use federated::dp::DpConfig;
use federated::fixed::FixedPoint;
use federated::model::{Dataset, LocalTraining, ModelSpec};
use federated::screen::ScreenConfig;
use federated::secagg::SecAggParams;
use federated::strategy::Strategy;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::DeviceMessage;
use protocol::federated::{
    CreateFlTask, F32Vector, FlDataset, FlHeldOut, FlPhase, FlTask, FlTaskState,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::output::out;
use crate::simfleet::SimHub;

/// `strata fl …`.
#[derive(Debug, Subcommand)]
pub(crate) enum FlCommand {
    /// Run a federated task with many virtual devices against a real hub on
    /// this machine, and report accuracy per round against centralised
    /// training on the same data.
    Simulate(SimulateArgs),
    /// Publish a finished task's model as a signed registry release.
    ///
    /// Fetches the task's final model from the hub, writes it as a
    /// classifier head (safetensors, the runtime's format) and publishes it
    /// like `strata model publish`, with the task's held-out and client
    /// evaluations (and ε, with differential privacy) as metrics and the
    /// task id as provenance.
    #[command(disable_version_flag = true)]
    Publish(crate::fl_publish::FlPublishArgs),
}

/// The data a simulation trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SimDataset {
    /// Home Assistant intents (42), as MiniLM sentence embeddings;
    /// softmax regression.
    Intents,
    /// Shuttle sensor readings, normal or anomalous; a one-hidden-layer
    /// network.
    Shuttle,
}

/// Strategies by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StrategyName {
    /// Example-weighted mean (McMahan et al. 2017).
    Fedavg,
    /// FedAvg with a proximal term in local training (Li et al. 2020).
    Fedprox,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Multi-Krum.
    MultiKrum,
}

/// Byzantine behaviours by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AttackName {
    /// Send the honest update negated and scaled (×4).
    SignFlip,
    /// Send the honest update boosted (×10).
    Scaling,
    /// A little is enough (Baruch et al. 2019): the benign mean shifted by
    /// z standard deviations.
    Lie,
}

/// `strata fl simulate`.
#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// The data set and model.
    #[arg(long, value_enum, default_value_t = SimDataset::Intents)]
    dataset: SimDataset,
    /// Virtual devices.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(3..=20_000))]
    clients: u64,
    /// Updates aggregated per round.
    #[arg(long, default_value_t = 1000)]
    per_round: u32,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// The hub's strategy.
    #[arg(long, value_enum, default_value_t = StrategyName::Fedavg)]
    strategy: StrategyName,
    /// FedProx's proximal weight.
    #[arg(long, default_value_t = 0.01)]
    mu: f32,
    /// Trimmed mean: fraction cut at each end.
    #[arg(long, default_value_t = 0.3)]
    beta: f32,
    /// Multi-Krum: Byzantine devices assumed per round (default: the
    /// injected share of a round).
    #[arg(long)]
    krum_f: Option<usize>,
    /// Median and trimmed mean: mix each update with its nearest others
    /// first (nearest-neighbour mixing), assuming `--krum-f` Byzantine
    /// devices per round.
    #[arg(long)]
    mixing: bool,
    /// Screening: leave out updates longer than this L2 norm (visible
    /// updates only, not with --secagg).
    #[arg(long)]
    screen_max_norm: Option<f32>,
    /// Screening: leave out updates whose cosine distance to the
    /// coordinate-wise median of the round's updates is above this (0 to
    /// 2; 1 is orthogonal).
    #[arg(long)]
    screen_cosine: Option<f32>,
    /// Dirichlet concentration of the non-IID split over labels.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.5)]
    learning_rate: f32,
    /// The hub's step along each round's average update (1: plain FedAvg).
    #[arg(long, default_value_t = 1.0)]
    server_learning_rate: f32,
    /// Local mini-batch size.
    #[arg(long, default_value_t = 16)]
    batch_size: u32,
    /// Fraction of devices that are Byzantine.
    #[arg(long, default_value_t = 0.0)]
    byzantine: f64,
    /// What Byzantine devices send.
    #[arg(long, value_enum, default_value_t = AttackName::SignFlip)]
    attack: AttackName,
    /// Chance that a device drops out of a round it was invited to (with
    /// secure aggregation: after sharing its keys, the hard case).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Chance that a device answers after the round's deadline.
    #[arg(long, default_value_t = 0.0)]
    stragglers: f64,
    /// Secure aggregation: the hub sees only the sum.
    #[arg(long)]
    secagg: bool,
    /// Secure aggregation: masking neighbours per device. Unset, the hub
    /// sizes them so that a round survives `--secagg-dropout`.
    #[arg(long)]
    neighbours: Option<usize>,
    /// Secure aggregation: the fraction of devices a round must survive
    /// losing at random between sharing keys and unmasking.
    #[arg(long, default_value_t = SecAggParams::DEFAULT_DROPOUT)]
    secagg_dropout: f64,
    /// Differential privacy: noise multiplier (0 = off).
    #[arg(long, default_value_t = 0.0)]
    dp_noise: f64,
    /// Differential privacy (or secure aggregation): update clipping norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Differential privacy: the task's ε budget at δ = 1e-5.
    #[arg(long, default_value_t = 8.0)]
    epsilon_budget: f64,
    /// Seconds each round (or secure-aggregation phase) may take.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// Seed for the split, the partition and the behaviours.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Devices enrolled at once.
    #[arg(long, default_value_t = 16)]
    enrol_concurrency: usize,
    /// Skip centralised training (the baseline).
    #[arg(long)]
    no_baseline: bool,
    /// Directory for the hub and the devices (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs `strata fl simulate` with `args` as they would be written after it
/// on the command line (the demo runs one this way, so that what it shows
/// can be run again by hand).
pub(crate) async fn simulate_with(args: &[&str]) -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    struct Simulate {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let parsed = <Simulate as clap::Parser>::try_parse_from(
        std::iter::once("simulate").chain(args.iter().copied()),
    )?;
    simulate(parsed.args).await
}

pub(crate) async fn run(cmd: FlCommand) -> anyhow::Result<()> {
    match cmd {
        FlCommand::Simulate(args) => simulate(args).await,
        FlCommand::Publish(args) => crate::fl_publish::run(args).await,
    }
}

/// A loaded data set: examples, class names and the model to train.
struct Loaded {
    data: Dataset,
    labels: Vec<String>,
    spec: ModelSpec,
    dataset: FlDataset,
}

fn load(which: SimDataset) -> anyhow::Result<Loaded> {
    let assets = crate::cmd_model::assets_dir();
    match which {
        SimDataset::Intents => load_intents(&assets),
        SimDataset::Shuttle => {
            let path = assets.join("river").join("shuttle.csv.gz");
            let readings = runtime::anomaly::load_shuttle(&path).with_context(|| {
                format!("reading {} (run scripts/fetch-assets)", path.display())
            })?;
            let inputs = readings.feature_names.len();
            // Standardised features: shuttle's columns differ by orders of
            // magnitude. The scale is public knowledge of the sensor, so
            // every device may use the same one.
            let n = readings.readings.len().max(1) as f64;
            let mut mean = vec![0.0; inputs];
            let mut sq = vec![0.0; inputs];
            for r in &readings.readings {
                for (j, v) in r.iter().enumerate() {
                    mean[j] += v / n;
                    sq[j] += v * v / n;
                }
            }
            let std: Vec<f64> = (0..inputs)
                .map(|j| (sq[j] - mean[j] * mean[j]).max(1e-12).sqrt())
                .collect();
            let mut data = Dataset::new(inputs);
            for (r, &anomaly) in readings.readings.iter().zip(&readings.labels) {
                let x: Vec<f32> = r
                    .iter()
                    .enumerate()
                    .map(|(j, v)| ((v - mean[j]) / std[j]) as f32)
                    .collect();
                data.push(&x, u32::from(anomaly))?;
            }
            Ok(Loaded {
                data,
                labels: vec!["normal".to_owned(), "anomaly".to_owned()],
                spec: ModelSpec {
                    inputs,
                    hidden: 16,
                    classes: 2,
                },
                dataset: FlDataset::Shuttle,
            })
        }
    }
}

/// Home Assistant's sentences as MiniLM embeddings, cached by content.
fn load_intents(assets: &Path) -> anyhow::Result<Loaded> {
    use sha2::Digest;
    let path = assets.join("home-assistant-intents").join("en.json");
    // Many sentences per template, so that a thousand devices each hold a
    // few dozen.
    let options = runtime::intents::ExpansionOptions {
        per_template: 32,
        per_intent: None,
        ..runtime::intents::ExpansionOptions::default()
    };
    let set = runtime::intents::load(&path, &options).with_context(|| {
        format!(
            "reading intents from {} (run scripts/fetch-assets)",
            path.display()
        )
    })?;
    let texts: Vec<&str> = set.examples.iter().map(|e| e.text.as_str()).collect();
    let mut hash = sha2::Sha256::new();
    for t in &texts {
        hash.update(t.as_bytes());
        hash.update([0]);
    }
    let key = hex::encode(&hash.finalize()[..8]);
    let cache = crate::bench::setup::cache_dir("derived").join(format!("fl-intents-{key}.f32"));
    let dim = 384;
    let vectors: Vec<f32> = match std::fs::read(&cache) {
        Ok(bytes) if bytes.len() == texts.len() * dim * 4 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => {
            let model_dir = assets.join("all-minilm-l6-v2");
            let embedder = runtime::Embedder::load(
                "embedding",
                &runtime::EmbeddingFiles::in_dir(&model_dir),
                &runtime::EmbeddingConfig::default(),
            )
            .with_context(|| format!("loading the embedding model from {}", model_dir.display()))?;
            let bar = ProgressBar::new(texts.len() as u64).with_style(
                ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message("embedding");
            let mut out = Vec::with_capacity(texts.len() * dim);
            for chunk in texts.chunks(64) {
                for v in embedder.embed(chunk)? {
                    if v.len() != dim {
                        bail!(
                            "the embedding model gives {} values, expected {dim}",
                            v.len()
                        );
                    }
                    out.extend(v);
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            if let Some(dir) = cache.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            durable::write_atomic(&cache, &bytes, 0o644)
                .with_context(|| format!("writing {}", cache.display()))?;
            out
        }
    };
    let mut data = Dataset::new(dim);
    for (e, x) in set.examples.iter().zip(vectors.chunks_exact(dim)) {
        let class = set
            .class_of(&e.intent)
            .context("an example's intent is not in the intent list")?;
        data.push(x, class as u32)?;
    }
    Ok(Loaded {
        data,
        labels: set.intents.clone(),
        spec: ModelSpec {
            inputs: dim,
            hidden: 0,
            classes: set.intents.len(),
        },
        dataset: FlDataset::Intents,
    })
}

/// One virtual device's data.
struct DeviceData {
    kind: FlDataset,
    data: Arc<Dataset>,
}

impl LocalData for DeviceData {
    fn dataset(
        &self,
        dataset: FlDataset,
        model: &ModelSpec,
        _labels: &[String],
    ) -> Option<Arc<Dataset>> {
        (dataset == self.kind && model.inputs == self.data.inputs).then(|| Arc::clone(&self.data))
    }
}

/// What the Byzantine devices share: the attack, and for "a little is
/// enough" the benign updates they compute together from their own data.
struct Coalition {
    attack: Attack,
    spec: ModelSpec,
    local: LocalTraining,
    data: Vec<Arc<Dataset>>,
    per_round: usize,
    attackers_per_round: usize,
    /// (fingerprint of the global model, malicious update) for this round.
    cache: Mutex<Option<(u64, Vec<f32>)>>,
}

fn fingerprint(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3)
    })
}

impl Coalition {
    fn tamper(&self, global: &[f32], honest: Vec<f32>) -> Vec<f32> {
        if !matches!(self.attack, Attack::LittleIsEnough { .. }) {
            return self
                .attack
                .apply(&honest, &[], self.per_round, self.attackers_per_round);
        }
        let key = fingerprint(global);
        let Ok(mut cache) = self.cache.lock() else {
            return honest;
        };
        if let Some((k, v)) = cache.as_ref()
            && *k == key
        {
            return v.clone();
        }
        // The colluders' honest updates from this global model, computed
        // once per round, estimate the benign mean and spread.
        let benign: Vec<Vec<f32>> = self
            .data
            .iter()
            .take(16)
            .enumerate()
            .filter_map(|(i, d)| {
                federated::model::train_local(&self.spec, global, d, &self.local, i as u64)
                    .ok()
                    .map(|u| u.delta)
            })
            .collect();
        let refs: Vec<&[f32]> = benign.iter().map(Vec::as_slice).collect();
        let v = self
            .attack
            .apply(&honest, &refs, self.per_round, self.attackers_per_round);
        *cache = Some((key, v.clone()));
        v
    }
}

/// One row of the per-round table.
#[derive(Debug, Clone, Serialize)]
struct RoundRow {
    round: u32,
    accuracy: f64,
    loss: f64,
    aggregated: u32,
    excluded: u32,
    dropped: u32,
    refused: u32,
    epsilon: Option<f64>,
    duration_ms: u64,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    dataset: &'static str,
    clients: u64,
    per_round: u32,
    strategy: String,
    alpha: f64,
    byzantine: f64,
    attack: Option<String>,
    dropout: f64,
    stragglers: f64,
    secagg: bool,
    dp_noise: f64,
    screen_max_norm: Option<f32>,
    screen_cosine: Option<f32>,
    train_examples: usize,
    test_examples: usize,
    centralised_accuracy: Option<f64>,
    final_accuracy: f64,
    best_accuracy: f64,
    rounds_to_within_2_points: Option<u32>,
    epsilon: Option<f64>,
    wall_secs: f64,
    rounds: Vec<RoundRow>,
    state: String,
    detail: Option<String>,
}

fn strategy_of(args: &SimulateArgs, expected_byzantine: usize) -> Strategy {
    let f = args.krum_f.unwrap_or(expected_byzantine);
    let mixing = args.mixing.then_some(f);
    match args.strategy {
        StrategyName::Fedavg => Strategy::FedAvg,
        StrategyName::Fedprox => Strategy::FedProx { mu: args.mu },
        StrategyName::Median => Strategy::Median { mixing },
        StrategyName::TrimmedMean => Strategy::TrimmedMean {
            beta: args.beta,
            mixing,
        },
        StrategyName::MultiKrum => Strategy::MultiKrum {
            byzantine: f,
            keep: 0,
        },
    }
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--byzantine", args.byzantine),
        ("--dropout", args.dropout),
        ("--stragglers", args.stragglers),
    ] {
        if !(0.0..0.5).contains(&v) {
            bail!("{name} must be at least 0 and below 0.5, got {v}");
        }
    }
    if args.per_round == 0 || u64::from(args.per_round) > args.clients {
        bail!(
            "--per-round must be between 1 and --clients ({}), got {}",
            args.clients,
            args.per_round
        );
    }
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("strata-fl-simulate-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_simulation(&args, &dir).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_simulation(args: &SimulateArgs, dir: &Path) -> anyhow::Result<()> {
    let which = args.dataset;
    let loaded = tokio::task::spawn_blocking(move || load(which)).await??;
    let classes = loaded.spec.classes;
    let (train_idx, test_idx) =
        federated::partition::train_test_split(&loaded.data.labels, 0.2, args.seed);
    let train = loaded.data.subset(&train_idx);
    let test = loaded.data.subset(&test_idx);
    let local = LocalTraining {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        ..LocalTraining::default()
    };
    let baseline = if args.no_baseline {
        None
    } else {
        let (spec, train, test) = (loaded.spec.clone(), train.clone(), test.clone());
        let epochs = (args.epochs * args.rounds).clamp(5, 40);
        let central = LocalTraining { epochs, ..local };
        let seed = args.seed;
        Some(
            tokio::task::spawn_blocking(move || {
                let params = federated::model::train_central(&spec, &train, &central, seed)?;
                spec.evaluate(&params, &test)
            })
            .await??
            .accuracy,
        )
    };
    let parts = federated::partition::dirichlet(
        &train.labels,
        classes,
        args.clients as usize,
        args.alpha,
        1,
        args.seed,
    )?;

    let hub = SimHub::start(dir).await?;
    let result = drive(
        args, dir, &hub, &loaded, &train, &test, parts, local, baseline,
    )
    .await;
    hub.stop().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &SimulateArgs,
    dir: &Path,
    hub: &SimHub,
    loaded: &Loaded,
    train: &Dataset,
    test: &Dataset,
    parts: Vec<Vec<usize>>,
    local: LocalTraining,
    baseline: Option<f64>,
) -> anyhow::Result<()> {
    let wall = Instant::now();
    let labels = [("fleet".to_owned(), "fl-sim".to_owned())].into();
    let devices = hub
        .enrol(dir, args.clients, &labels, args.enrol_concurrency)
        .await?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..devices.len()).collect();
    order.shuffle(&mut rng);
    let n_byzantine = (args.byzantine * devices.len() as f64).round() as usize;
    let byzantine: HashSet<usize> = order.iter().take(n_byzantine).copied().collect();
    let per_round = args.per_round as usize;
    let attackers_per_round = (args.byzantine * per_round as f64).round() as usize;
    let attack = match args.attack {
        AttackName::SignFlip => Attack::SignFlip { scale: 4.0 },
        AttackName::Scaling => Attack::Scaling { factor: 10.0 },
        AttackName::Lie => Attack::LittleIsEnough { z: None },
    };
    let datasets: Vec<Arc<Dataset>> = parts.iter().map(|p| Arc::new(train.subset(p))).collect();
    let coalition = Arc::new(Coalition {
        attack,
        spec: loaded.spec.clone(),
        local,
        data: byzantine
            .iter()
            .map(|&i| Arc::clone(&datasets[i]))
            .collect(),
        per_round,
        attackers_per_round,
        cache: Mutex::new(None),
    });
    let deadline = Duration::from_secs(args.deadline_secs);
    let contributed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for (i, device) in devices.iter().enumerate() {
        let data = Arc::new(DeviceData {
            kind: loaded.dataset,
            data: Arc::clone(&datasets[i]),
        });
        let client = FlClient::new(device.client.clone(), hub.url.clone());
        let tamper: Option<Arc<Tamper>> = byzantine.contains(&i).then(|| {
            let c = Arc::clone(&coalition);
            Arc::new(move |g: &[f32], h: Vec<f32>| c.tamper(g, h)) as Arc<Tamper>
        });
        let (device, url) = (device.clone(), hub.url.clone());
        let (dropout, stragglers, secagg, seed) =
            (args.dropout, args.stragglers, args.secagg, args.seed);
        let contributed = Arc::clone(&contributed);
        tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
            device
                .listen(&url, |envelope| {
                    let DeviceMessage::FlInvite { task_id, round } = envelope.message else {
                        return std::future::ready(());
                    };
                    let behaviour = Behaviour {
                        drop_at: rng.random_bool(dropout).then_some(if secagg {
                            FlPhase::Masked
                        } else {
                            FlPhase::Train
                        }),
                        delay: if rng.random_bool(stragglers) {
                            deadline + Duration::from_secs(1)
                        } else {
                            Duration::ZERO
                        },
                        tamper: tamper.clone(),
                        seed: Some(rng.random()),
                    };
                    let (client, data, contributed) =
                        (client.clone(), Arc::clone(&data), Arc::clone(&contributed));
                    // Each invitation runs on its own so that the stream
                    // keeps reading (a straggler must not hold the next
                    // round's invitation).
                    tokio::spawn(async move {
                        match edge::federated::take_part(
                            &client,
                            &task_id,
                            round,
                            data.as_ref(),
                            &behaviour,
                        )
                        .await
                        {
                            Ok(Participation::Contributed { .. }) => {
                                contributed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(round, error = %e, "virtual device left the round")
                            }
                        }
                    });
                    std::future::ready(())
                })
                .await;
        });
    }
    // Every device holds its stream open before the task starts, so that
    // every invitation is delivered live.
    let online_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = hub
            .operator
            .get(format!("{}/metrics", hub.url))
            .send()
            .await?
            .text()
            .await?;
        let online = metrics
            .lines()
            .find(|l| l.starts_with("strata_hub_devices_online "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if online >= args.clients {
            break;
        }
        if Instant::now() > online_deadline {
            bail!(
                "only {online} of {} virtual devices came online",
                args.clients
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let strategy = strategy_of(args, attackers_per_round);
    let spec = CreateFlTask {
        name: format!("sim-{}", loaded.dataset.as_str()),
        model: loaded.spec.clone(),
        labels: loaded.labels.clone(),
        dataset: loaded.dataset,
        strategy: strategy.clone(),
        rounds: args.rounds,
        clients_per_round: args.per_round,
        over_selection: Some(if args.dropout + args.stragglers > 0.0 {
            ((args.dropout + args.stragglers) * 1.5).min(1.0)
        } else {
            0.0
        }),
        min_clients: Some(
            ((per_round as f64 * 0.5).ceil() as u32).max(if args.secagg { 3 } else { 1 }),
        ),
        round_deadline_secs: Some(args.deadline_secs),
        local: Some(local),
        server_learning_rate: Some(args.server_learning_rate),
        screen: (args.screen_max_norm.is_some() || args.screen_cosine.is_some()).then_some(
            ScreenConfig {
                max_norm: args.screen_max_norm,
                max_cosine_distance: args.screen_cosine,
            },
        ),
        dp: (args.dp_noise > 0.0).then_some(DpConfig {
            clip_norm: args.clip,
            noise_multiplier: args.dp_noise,
            target_delta: 1e-5,
            epsilon_budget: args.epsilon_budget,
        }),
        secagg: args.secagg.then_some(SecAggParams {
            dropout: args.secagg_dropout,
            neighbours: args.neighbours,
            fixed: FixedPoint {
                scale_bits: 16,
                clip: args.clip,
            },
        }),
        eligibility: labels,
        seed: Some(args.seed),
        // The hub scores every round's model on the held-out split, which
        // no virtual device trains on.
        held_out: Some(FlHeldOut {
            features: F32Vector(test.features.clone()),
            labels: test.labels.clone(),
        }),
    };
    let created = hub
        .operator
        .post(format!("{}/v1/fl/tasks", hub.url))
        .bearer_auth(&hub.token)
        .json(&spec)
        .send()
        .await?;
    if !created.status().is_success() {
        let status = created.status();
        bail!(
            "the hub refused the task: {status} {}",
            created.text().await?
        );
    }
    let task: FlTask = created.json().await?;
    out(&format!(
        "{} virtual devices online ({} Byzantine, {:?}); task {} with {} over {} rounds of {} updates{}{}",
        devices.len(),
        n_byzantine,
        if n_byzantine > 0 {
            Some(attack.name())
        } else {
            None
        },
        task.id,
        strategy.name(),
        args.rounds,
        args.per_round,
        if args.secagg {
            ", secure aggregation"
        } else {
            ""
        },
        if args.dp_noise > 0.0 {
            ", differential privacy"
        } else {
            ""
        },
    ));

    let bar = ProgressBar::new(u64::from(args.rounds)).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} rounds {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("training");
    let mut rows: Vec<RoundRow> = Vec::new();
    let mut seen = 0usize;
    let task = loop {
        let task: FlTask = hub
            .operator
            .get(format!("{}/v1/fl/tasks/{}", hub.url, task.id))
            .bearer_auth(&hub.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if task.history.len() > seen {
            for summary in &task.history[seen..] {
                let (accuracy, loss) = match summary.evaluation {
                    Some(e) => (e.accuracy, e.loss),
                    // A failed round left the model as it was.
                    None => rows
                        .last()
                        .map_or((0.0, 0.0), |r: &RoundRow| (r.accuracy, r.loss)),
                };
                rows.push(RoundRow {
                    round: summary.round,
                    accuracy,
                    loss,
                    aggregated: summary.aggregated_updates,
                    excluded: summary.excluded_updates,
                    dropped: summary.dropped,
                    refused: summary.refused.values().sum(),
                    epsilon: summary.epsilon,
                    duration_ms: summary.duration_ms,
                });
            }
            seen = task.history.len();
            bar.set_position(u64::from(task.completed_rounds));
        }
        if task.state != FlTaskState::Running {
            break task;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();

    out(&format!(
        "{:>5}  {:>8}  {:>7}  {:>10}  {:>8}  {:>7}  {:>7}  {:>8}  {:>8}",
        "round",
        "accuracy",
        "loss",
        "aggregated",
        "excluded",
        "dropped",
        "refused",
        "epsilon",
        "time_ms"
    ));
    for r in &rows {
        out(&format!(
            "{:>5}  {:>8.4}  {:>7.4}  {:>10}  {:>8}  {:>7}  {:>7}  {:>8}  {:>8}",
            r.round,
            r.accuracy,
            r.loss,
            r.aggregated,
            r.excluded,
            r.dropped,
            r.refused,
            r.epsilon.map_or("-".to_owned(), |e| format!("{e:.3}")),
            r.duration_ms
        ));
    }
    let final_accuracy = rows.last().map_or(0.0, |r| r.accuracy);
    let best_accuracy = rows.iter().map(|r| r.accuracy).fold(0.0, f64::max);
    let within = baseline.and_then(|b| {
        rows.iter()
            .find(|r| r.accuracy >= b - 0.02)
            .map(|r| r.round)
    });
    if let Some(b) = baseline {
        out(&format!(
            "held-out accuracy: federated {final_accuracy:.4} (best {best_accuracy:.4}), centralised {b:.4}, gap {:+.2} points; within 2 points from round {}",
            (final_accuracy - b) * 100.0,
            within.map_or("never".to_owned(), |r| r.to_string())
        ));
    } else {
        out(&format!("held-out accuracy: federated {final_accuracy:.4}"));
    }
    if let Some(e) = task.epsilon {
        out(&format!("privacy spent: ε = {e:.3} at δ = 1e-5"));
    }
    out(&format!(
        "task {}: {:?}{}; {:.1}s",
        task.id,
        task.state,
        task.detail
            .as_ref()
            .map_or(String::new(), |d| format!(" ({d})")),
        wall.elapsed().as_secs_f64()
    ));
    if let Some(path) = &args.json {
        let report = Report {
            dataset: loaded.dataset.as_str(),
            clients: args.clients,
            per_round: args.per_round,
            strategy: strategy.name().to_owned(),
            alpha: args.alpha,
            byzantine: args.byzantine,
            attack: (n_byzantine > 0).then(|| attack.name().to_owned()),
            dropout: args.dropout,
            stragglers: args.stragglers,
            secagg: args.secagg,
            dp_noise: args.dp_noise,
            screen_max_norm: args.screen_max_norm,
            screen_cosine: args.screen_cosine,
            train_examples: train.len(),
            test_examples: test.len(),
            centralised_accuracy: baseline,
            final_accuracy,
            best_accuracy,
            rounds_to_within_2_points: within,
            epsilon: task.epsilon,
            wall_secs: wall.elapsed().as_secs_f64(),
            rounds: rows,
            state: format!("{:?}", task.state).to_lowercase(),
            detail: task.detail.clone(),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if task.state != FlTaskState::Completed {
        bail!(
            "the task ended {:?}: {}",
            task.state,
            task.detail.unwrap_or_default()
        );
    }
    Ok(())
}
