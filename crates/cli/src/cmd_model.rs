//! `strata model …`: building and inspecting models.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;

use crate::output::out;

#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Train the intent classifier head from the Home Assistant intents.
    ///
    /// Expands the intent templates with their slot values into sentences,
    /// keeps a deterministic held-out split, embeds the sentences with the
    /// sentence-embedding model, trains a one-hidden-layer MLP head and
    /// reports its accuracy on the held-out split. The head is written as
    /// safetensors with its label list in the metadata.
    TrainIntents(TrainIntentsArgs),
    /// Sign a model and publish it to the hub's registry.
    ///
    /// Writes the manifest (artifact SHA-256 and size, runtime needs,
    /// schema, metrics, provenance, expiry), signs it and a new targets
    /// document with the targets key from `strata keys init`, checks the
    /// hub's current metadata against `root.json` first, uploads the
    /// artifact and registers the release. The hub signs a fresh snapshot
    /// and timestamp and refuses anything a device would refuse.
    #[command(disable_version_flag = true)]
    Publish(Box<crate::cmd_publish::PublishArgs>),
    /// List the releases published to the hub's registry.
    List(crate::cmd_publish::ListArgs),
    /// Show a release's signed manifest: artifact, runtime needs, schema,
    /// metrics, provenance, health probes, expiry and signatures.
    Show(crate::cmd_publish::ShowArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TrainIntentsArgs {
    /// The Home Assistant intents file (`en.json`); default: from the assets.
    #[arg(long)]
    intents: Option<PathBuf>,
    /// The embedding model directory (model.safetensors, tokenizer.json,
    /// config.json); default: all-MiniLM-L6-v2 from the assets.
    #[arg(long)]
    embedding_model: Option<PathBuf>,
    /// Where to write the head (`.safetensors`).
    #[arg(long)]
    out: PathBuf,
    /// Fraction of sentences held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    held_out: f64,
    /// Hidden units; 0 trains softmax regression.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write a health check for `strata model publish --health`:
    /// held-out sentences with their intents as probes, 80 % to pass.
    #[arg(long)]
    health_out: Option<PathBuf>,
    /// Also learn Strata's fleet-question intent (`StrataFleetQuery`), which
    /// tells the edge router that a question needs data from the whole
    /// fleet and so belongs on the hub.
    #[arg(long)]
    fleet_questions: bool,
}

impl TrainIntentsArgs {
    /// Defaults, writing the head to `out`.
    pub(crate) fn for_demo(out: PathBuf) -> Self {
        Self {
            intents: None,
            embedding_model: None,
            out,
            held_out: 0.2,
            hidden: 128,
            epochs: 40,
            seed: 42,
            health_out: None,
            fleet_questions: true,
        }
    }

    /// The demo's training of a second release: another seed, with its
    /// health check written beside it.
    pub(crate) fn with_seed(mut self, seed: u64, health_out: PathBuf) -> Self {
        self.seed = seed;
        self.health_out = Some(health_out);
        self
    }
}

/// The directory holding the real models and data sets (`scripts/fetch-assets`).
pub(crate) fn assets_dir() -> PathBuf {
    std::env::var_os("STRATA_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| crate::bench::setup::cache_dir("assets"), PathBuf::from)
}

/// Trains an intent head and returns its held-out accuracy.
pub(crate) fn train_intents(args: &TrainIntentsArgs) -> anyhow::Result<f64> {
    let assets = assets_dir();
    let intents = args
        .intents
        .clone()
        .unwrap_or_else(|| assets.join("home-assistant-intents").join("en.json"));
    let model_dir = args
        .embedding_model
        .clone()
        .unwrap_or_else(|| assets.join("all-minilm-l6-v2"));
    if !(0.05..=0.5).contains(&args.held_out) {
        bail!(
            "--held-out must be between 0.05 and 0.5, got {}",
            args.held_out
        );
    }
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message(format!("expanding intents from {}", intents.display()));
    let mut dataset =
        runtime::intents::load(&intents, &runtime::intents::ExpansionOptions::default())
            .with_context(|| {
                format!(
                    "reading intents from {} (run scripts/fetch-assets)",
                    intents.display()
                )
            })?;
    if args.fleet_questions {
        dataset = dataset.merge(runtime::intents::expand(
            runtime::intents::FLEET_INTENTS_JSON,
            std::path::Path::new("fleet-intents.json"),
            &runtime::intents::ExpansionOptions::default(),
        )?);
    }
    spinner.set_message(format!(
        "loading the embedding model from {}",
        model_dir.display()
    ));
    let embedder = runtime::Embedder::load(
        "embedding",
        &runtime::EmbeddingFiles::in_dir(&model_dir),
        &runtime::EmbeddingConfig::default(),
    )
    .with_context(|| format!("loading the embedding model from {}", model_dir.display()))?;
    spinner.set_message(format!(
        "embedding {} sentences of {} intents and training",
        dataset.examples.len(),
        dataset.intents.len()
    ));
    let start = Instant::now();
    let config = runtime::TrainConfig {
        hidden: args.hidden,
        epochs: args.epochs,
        seed: args.seed,
        ..runtime::TrainConfig::default()
    };
    let eval = runtime::intents::train_and_evaluate(&embedder, &dataset, args.held_out, &config)?;
    spinner.finish_and_clear();
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    eval.head
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if let Some(path) = &args.health_out {
        let (_, held_out) = dataset.split(args.held_out);
        // Every few held-out sentences, spread over the intents.
        let step = (held_out.len() / 48).max(1);
        let probes: Vec<registry::Probe> = held_out
            .iter()
            .step_by(step)
            .take(48)
            .map(|e| registry::Probe {
                input: e.text.clone(),
                expect: e.intent.clone(),
            })
            .collect();
        let health = registry::HealthCheck {
            probes,
            min_pass: 0.8,
            max_latency_ms: Some(5000),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&health)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out(&format!(
        "Trained an intent head on {} sentences ({} intents) in {:.1}s: held-out accuracy {:.3} on {} sentences (train {:.3}). Wrote {}",
        eval.n_train,
        dataset.intents.len(),
        start.elapsed().as_secs_f64(),
        eval.held_out_accuracy,
        eval.n_held_out,
        eval.train_accuracy,
        args.out.display()
    ));
    Ok(eval.held_out_accuracy)
}

pub(crate) async fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Publish(args) => crate::cmd_publish::publish(*args).await,
        ModelCommand::List(args) => crate::cmd_publish::list(args).await,
        ModelCommand::Show(args) => crate::cmd_publish::show(args).await,
        ModelCommand::TrainIntents(args) => {
            tokio::task::spawn_blocking(move || train_intents(&args)).await??;
            Ok(())
        }
    }
}
