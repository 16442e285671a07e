//! `strata model publish` and `strata model list`: releasing a model through
//! the signed registry.
//!
//! Publishing signs offline and uploads: the publisher holds the targets
//! key (from `strata keys init`), reads the hub's current metadata and
//! checks it against the root it trusts, writes the manifest (artifact
//! SHA-256 and size, runtime needs, schema, metrics, provenance, expiry),
//! signs it, lists it in a new targets document, signs that, uploads the
//! artifact and registers both. The hub adds the online snapshot and
//! timestamp and checks the chain as a device will.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use registry::{
    AgentVersion, Artifact, ArtifactFormat, CpuArch, DType, Field, IoSchema, Manifest, Provenance,
    RuntimeRequirements, Schema, SchemaKind, Sha256Digest, SigningKey, Targets, TrustedState,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::operator::{HubConnection, Operator};
use crate::output::out;

/// `strata model publish FILE --name N --version V`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The weights file (`.gguf`, `.safetensors` or `.onnx`).
    pub(crate) file: PathBuf,
    /// The model's name (1-128 of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    pub(crate) name: String,
    /// The release number; must be above every published release of the name.
    #[arg(long)]
    pub(crate) version: u64,
    /// The directory `strata keys init` wrote (its `root.json` and `targets.key`).
    #[arg(long, env = "STRATA_REGISTRY_KEYS")]
    pub(crate) keys: PathBuf,
    /// How long the manifest stays installable (e.g. 90d).
    #[arg(long, default_value = "90d")]
    pub(crate) expires: humantime::Duration,
    /// An evaluation metric to record, `name=value` (repeatable).
    #[arg(long = "metric", value_parser = parse_metric)]
    pub(crate) metrics: Vec<(String, f64)>,
    /// Memory the model needs on a device, in bytes (default: twice the file).
    #[arg(long)]
    pub(crate) memory_bytes: Option<u64>,
    /// The oldest agent that can load it (default: this build's version).
    #[arg(long)]
    pub(crate) min_agent_version: Option<String>,
    /// What the model reads: text, tokens, embedding, labels or tensors.
    #[arg(long, default_value = "text")]
    pub(crate) input: String,
    /// What the model gives: text, tokens, embedding, labels or tensors.
    #[arg(long, default_value = "text")]
    pub(crate) output: String,
    /// The health check devices run before serving the release: a JSON
    /// file `{"probes": [{"input": "…", "expect": "…"}], "min_pass": 0.9,
    /// "max_latency_ms": 500}` (expect: the label of a classifier, a
    /// substring of a language model's answer, empty for embeddings).
    #[arg(long)]
    pub(crate) health: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) hub: HubConnection,
    /// Where the weights came from (default: the file, by name and hash).
    #[arg(skip)]
    pub(crate) provenance: Option<Provenance>,
}

fn parse_metric(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not name=value"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("metric {name:?}: {value:?} is not a number"))?;
    if !value.is_finite() {
        return Err(format!("metric {name:?} must be finite"));
    }
    Ok((name.trim().to_owned(), value))
}

fn schema_kind(text: &str) -> anyhow::Result<SchemaKind> {
    serde_json::from_value(json!(text)).with_context(|| {
        format!("{text:?} is not a schema kind (text, tokens, embedding, labels, tensors)")
    })
}

fn format_of(file: &std::path::Path) -> anyhow::Result<ArtifactFormat> {
    match file.extension().and_then(|e| e.to_str()) {
        Some("gguf") => Ok(ArtifactFormat::Gguf),
        Some("safetensors") => Ok(ArtifactFormat::Safetensors),
        Some("onnx") => Ok(ArtifactFormat::Onnx),
        _ => bail!(
            "{} is not a .gguf, .safetensors or .onnx file",
            file.display()
        ),
    }
}

/// Runs `strata model publish`.
pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path = args.keys.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let root = read("root.json")?;
    let targets_key = SigningKey::from_key_file(&String::from_utf8_lossy(&read("targets.key")?))?;
    let format = format_of(&args.file)?;
    let bytes = tokio::fs::read(&args.file)
        .await
        .with_context(|| format!("reading {}", args.file.display()))?;
    let sha256 = Sha256Digest::of(&bytes);
    let now = OffsetDateTime::now_utc();

    // The hub's current metadata, checked against the root this publisher
    // trusts: a hub serving anything else is not published to.
    let op = Operator::connect(&args.hub)?;
    let mut trusted = TrustedState::bootstrap(&root, now).context("checking root.json")?;
    let current = match op.get_raw("/v1/registry/timestamp").await? {
        None => None,
        Some(timestamp) => {
            let snapshot = op
                .get_raw("/v1/registry/snapshot")
                .await?
                .context("the hub has a timestamp but no snapshot")?;
            let targets = op
                .get_raw("/v1/registry/targets")
                .await?
                .context("the hub has a snapshot but no targets")?;
            trusted
                .update_timestamp(&timestamp, now)
                .and_then(|()| trusted.update_snapshot(&snapshot, now))
                .and_then(|()| trusted.update_targets(&targets, now))
                .context("the hub's registry metadata does not verify against root.json")?;
            trusted.targets().cloned()
        }
    };

    let health = match &args.health {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str::<registry::HealthCheck>(&text)
                    .with_context(|| format!("{} is not a health check", path.display()))?,
            )
        }
    };
    let min_agent_version: AgentVersion = args
        .min_agent_version
        .as_deref()
        .unwrap_or(env!("CARGO_PKG_VERSION"))
        .parse()?;
    let field = |name: &str, dtype| Field {
        name: name.to_owned(),
        dtype,
        shape: vec![None],
    };
    let manifest = Manifest {
        name: args.name.clone(),
        version: args.version,
        artifact: Artifact {
            sha256,
            size_bytes: bytes.len() as u64,
            format,
        },
        runtime: RuntimeRequirements {
            cpu_arch: CpuArch::Any,
            min_agent_version,
            memory_bytes: args.memory_bytes.unwrap_or(bytes.len() as u64 * 2),
        },
        schema: IoSchema {
            input: Schema {
                kind: schema_kind(&args.input)?,
                fields: vec![field("input", DType::String)],
            },
            output: Schema {
                kind: schema_kind(&args.output)?,
                fields: vec![field("output", DType::String)],
            },
        },
        metrics: args.metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
        provenance: args
            .provenance
            .clone()
            .unwrap_or_else(|| Provenance::Source {
                file: args
                    .file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sha256,
            }),
        health,
        expires: now + *args.expires,
    };
    let mut targets = match current {
        Some(t) => Targets {
            version: t.version + 1,
            expires: now + *args.expires,
            ..t
        },
        None => Targets::new(1, now + *args.expires),
    };
    targets.list(&manifest)?;
    let signed_manifest = registry::sign(&manifest, &[&targets_key])?;
    let signed_targets = registry::sign(&targets, &[&targets_key])?;

    op.put_bytes(&format!("/v1/artifacts/{sha256}"), bytes)
        .await
        .context("uploading the artifact")?;
    let answer = op
        .post_json(
            "/v1/models",
            &json!({
                "manifest": String::from_utf8(signed_manifest)?,
                "targets": String::from_utf8(signed_targets)?,
            }),
        )
        .await
        .context("publishing")?;
    out(&format!(
        "published {}@{} (artifact {}, {} bytes); targets v{}, snapshot v{}, timestamp v{}",
        args.name,
        args.version,
        sha256.short(),
        manifest.artifact.size_bytes,
        answer["targets_version"],
        answer["snapshot_version"],
        answer["timestamp_version"]
    ));
    Ok(())
}

/// `strata model list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    hub: HubConnection,
}

/// Runs `strata model list`.
pub(crate) async fn list(args: ListArgs) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    let models = op.get("/v1/models", &[]).await?;
    out(&format!(
        "{:<24} {:>8} {:<12} {:>12}  SHA-256",
        "MODEL", "VERSION", "FORMAT", "BYTES"
    ));
    for m in models.as_array().into_iter().flatten() {
        out(&format!(
            "{:<24} {:>8} {:<12} {:>12}  {}",
            m["name"].as_str().unwrap_or(""),
            m["version"],
            m["format"].as_str().unwrap_or(""),
            m["size_bytes"],
            m["sha256"].as_str().unwrap_or(""),
        ));
    }
    Ok(())
}

/// `strata model show NAME[@VERSION]`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The release, `name@version`, or `name` for the newest.
    release: String,
    #[command(flatten)]
    hub: HubConnection,
}

/// Runs `strata model show`.
pub(crate) async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    let (name, version) = match args.release.split_once('@') {
        Some((n, v)) => (
            n.to_owned(),
            v.parse::<u64>()
                .with_context(|| format!("{v:?} is not a version number"))?,
        ),
        None => {
            let models = op.get("/v1/models", &[]).await?;
            let newest = models
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["name"] == args.release.as_str())
                .filter_map(|m| m["version"].as_u64())
                .max();
            match newest {
                Some(v) => (args.release.clone(), v),
                None => bail!("no release of {:?} is published", args.release),
            }
        }
    };
    let signed = op
        .get_raw(&format!("/v1/models/{name}/{version}/manifest"))
        .await?
        .with_context(|| format!("{name}@{version} is not published"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&signed).context("the hub sent a manifest that is not JSON")?;
    out(&serde_json::to_string_pretty(&value)?);
    Ok(())
}
