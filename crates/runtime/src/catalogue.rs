//! The model catalogue: which models a device serves, from which files.
//!
//! The agent deserialises a [`RawCatalogue`] from its configuration (any
//! serde format; unknown fields are rejected), [`RawCatalogue::validate`]
//! turns it into a [`Catalogue`] once (ids unique, paths resolved against a
//! base directory, references between entries checked), and [`load`] loads
//! every entry. A model that fails to load does not stop the others: the
//! result lists the loaded models and, separately, each failure, so the
//! agent keeps serving what it can and reports the rest.
//!
//! ```toml
//! [[models]]
//! id = "smollm2"
//! kind = "llm"
//! path = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
//! threads = 2
//! context_length = 2048
//!
//! [[models]]
//! id = "minilm"
//! kind = "embedding"
//! path = "all-minilm-l6-v2"
//!
//! [[models]]
//! id = "intents"
//! kind = "classifier"
//! path = "intent-head.safetensors"
//! embedding_model = "minilm"
//!
//! [[models]]
//! id = "shuttle"
//! kind = "anomaly"
//! n_features = 9
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::anomaly::{AnomalyModel, HstConfig};
use crate::backend::{ModelBackend, ModelKind};
use crate::classifier::EmbeddingClassifier;
use crate::embedding::{Embedder, EmbeddingConfig, EmbeddingFiles, MAX_BATCH_LIMIT, Precision};
use crate::error::{Error, Result};
use crate::llm::{LlmConfig, LlmEngine, LlmModel};

/// The catalogue as written in configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCatalogue {
    /// The models to serve.
    #[serde(default)]
    pub models: Vec<RawModelEntry>,
}

/// One model as written in configuration. Which fields apply depends on `kind`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelEntry {
    /// Unique id the model is served under (for example `smollm2`).
    pub id: String,
    /// What kind of model it is: `llm`, `embedding`, `classifier` or `anomaly`.
    pub kind: ModelKind,
    /// The model's main file or directory, absolute or relative to the
    /// catalogue's base directory: the `.gguf` file (llm), the model
    /// directory holding `model.safetensors`, `tokenizer.json` and
    /// `config.json`, or a `bert` `.gguf` file with `tokenizer.json` beside
    /// it (embedding), the head's `.safetensors` file
    /// (classifier). Anomaly detectors learn from scratch and take none.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Embedding models: the tokenizer file, if not `tokenizer.json` in `path`.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Embedding models: the model configuration, if not `config.json` in `path`.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// LLMs: CPU threads per generation; embedding models: CPU threads of
    /// the encoder (default 2 for both).
    #[serde(default)]
    pub threads: Option<u32>,
    /// Embedding models given as safetensors: the precision their weights
    /// are held in, `f16` (default; half the memory, faster) or `f32`.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// LLMs: the engine that evaluates the model: `auto` (default: Strata's
    /// native engine for llama-architecture Q4_1/Q8_0 files on CPUs with
    /// AVX-512 VNNI, llama.cpp for everything else), `native` or
    /// `llama.cpp`.
    #[serde(default)]
    pub engine: Option<LlmEngine>,
    /// LLMs: context length in tokens, prompt plus completion (default
    /// 2048, capped at the model's training length). Embedding models:
    /// truncation length in tokens (default: the model's maximum).
    #[serde(default)]
    pub context_length: Option<u32>,
    /// LLMs: requests served at once, each with its own KV cache (default 1).
    #[serde(default)]
    pub slots: Option<u32>,
    /// Embedding models: the most texts encoded in one batch (default 32,
    /// at most 256).
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// Classifiers: the id of the embedding model whose vectors the head reads.
    #[serde(default)]
    pub embedding_model: Option<String>,
    /// Anomaly detectors: number of features in each reading.
    #[serde(default)]
    pub n_features: Option<usize>,
    /// Anomaly detectors: number of half-space trees (default 10).
    #[serde(default)]
    pub n_trees: Option<usize>,
    /// Anomaly detectors: height of each tree (default 8).
    #[serde(default)]
    pub height: Option<u32>,
    /// Anomaly detectors: readings per reference window (default 250).
    #[serde(default)]
    pub window_size: Option<usize>,
    /// Anomaly detectors: seed of the tree structure (default 42).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// A validated catalogue entry: what to load, and how.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A GGUF language model.
    Llm {
        /// The `.gguf` file.
        path: PathBuf,
        /// How it is served.
        config: LlmConfig,
    },
    /// A sentence-embedding model.
    Embedding {
        /// Its files.
        files: EmbeddingFiles,
        /// How it is served.
        config: EmbeddingConfig,
    },
    /// A classifier head over an embedding model.
    Classifier {
        /// The head's safetensors file.
        path: PathBuf,
        /// The id of the embedding model it reads.
        embedding_model: String,
    },
    /// A streaming anomaly detector.
    Anomaly {
        /// Features per reading.
        n_features: usize,
        /// Detector parameters.
        config: HstConfig,
    },
}

/// A validated catalogue entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model's id.
    pub id: String,
    /// What to load.
    pub spec: ModelSpec,
}

impl ModelSpec {
    /// The kind of model this entry loads.
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelSpec::Llm { .. } => ModelKind::Llm,
            ModelSpec::Embedding { .. } => ModelKind::Embedding,
            ModelSpec::Classifier { .. } => ModelKind::Classifier,
            ModelSpec::Anomaly { .. } => ModelKind::Anomaly,
        }
    }
}

/// A validated catalogue, in load order (embedding models before the
/// classifiers that read them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalogue {
    /// The entries.
    pub entries: Vec<ModelEntry>,
}

impl RawCatalogue {
    /// Checks the catalogue and resolves relative paths against `base_dir`.
    ///
    /// Fails on the first entry that is invalid as written (a duplicate id, a
    /// missing path, a field that does not apply to its kind, a classifier
    /// naming an embedding model that is not in the catalogue). Whether the
    /// files exist is checked at load time, per model.
    pub fn validate(&self, base_dir: &Path) -> Result<Catalogue> {
        let mut ids = HashSet::new();
        let mut entries = Vec::new();
        for raw in &self.models {
            let err = |reason: String| Error::Catalogue {
                id: raw.id.clone(),
                reason,
            };
            if raw.id.trim().is_empty() {
                return Err(err("id is empty".to_owned()));
            }
            if !ids.insert(raw.id.clone()) {
                return Err(err("id is used by another entry".to_owned()));
            }
            let path = raw.path.as_ref().map(|p| base_dir.join(p));
            let need_path = || {
                path.clone()
                    .ok_or_else(|| err(format!("a {} model needs a path", raw.kind)))
            };
            let not_for = |field: &str, present: bool| -> Result<()> {
                if present {
                    Err(err(format!(
                        "field {field} does not apply to a {} model",
                        raw.kind
                    )))
                } else {
                    Ok(())
                }
            };
            let anomaly_fields = raw.n_features.is_some()
                || raw.n_trees.is_some()
                || raw.height.is_some()
                || raw.window_size.is_some()
                || raw.seed.is_some();
            let spec = match raw.kind {
                ModelKind::Llm => {
                    not_for(
                        "tokenizer/config",
                        raw.tokenizer.is_some() || raw.config.is_some(),
                    )?;
                    not_for("max_batch", raw.max_batch.is_some())?;
                    not_for("embedding_model", raw.embedding_model.is_some())?;
                    not_for("n_features/n_trees/height/window_size/seed", anomaly_fields)?;
                    not_for("precision", raw.precision.is_some())?;
                    let d = LlmConfig::default();
                    let config = LlmConfig {
                        threads: raw.threads.unwrap_or(d.threads),
                        context_length: raw.context_length.unwrap_or(d.context_length),
                        slots: raw.slots.unwrap_or(d.slots),
                        batch_size: d.batch_size,
                        engine: raw.engine.unwrap_or(d.engine),
                    };
                    if config.threads == 0 || config.slots == 0 || config.context_length == 0 {
                        return Err(err(
                            "threads, slots and context_length must be at least 1".to_owned()
                        ));
                    }
                    ModelSpec::Llm {
                        path: need_path()?,
                        config,
                    }
                }
                ModelKind::Embedding => {
                    not_for("engine", raw.engine.is_some())?;
                    not_for("slots", raw.slots.is_some())?;
                    not_for("embedding_model", raw.embedding_model.is_some())?;
                    not_for("n_features/n_trees/height/window_size/seed", anomaly_fields)?;
                    let path = need_path()?;
                    let is_gguf = path
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                    let mut files = if is_gguf {
                        let dir = path.parent().unwrap_or(base_dir);
                        EmbeddingFiles {
                            weights: path.clone(),
                            tokenizer: dir.join("tokenizer.json"),
                            config: dir.join("config.json"),
                        }
                    } else {
                        EmbeddingFiles::in_dir(&path)
                    };
                    if let Some(t) = &raw.tokenizer {
                        files.tokenizer = base_dir.join(t);
                    }
                    if let Some(c) = &raw.config {
                        files.config = base_dir.join(c);
                    }
                    let d = EmbeddingConfig::default();
                    let max_batch = raw.max_batch.unwrap_or(d.max_batch);
                    if max_batch == 0 || max_batch > MAX_BATCH_LIMIT {
                        return Err(err(format!(
                            "max_batch {max_batch} must be between 1 and {MAX_BATCH_LIMIT}"
                        )));
                    }
                    let threads = raw.threads.unwrap_or(d.threads);
                    if threads == 0 {
                        return Err(err("threads must be at least 1".to_owned()));
                    }
                    ModelSpec::Embedding {
                        files,
                        config: EmbeddingConfig {
                            max_length: raw.context_length.map(|c| c as usize),
                            max_batch,
                            threads,
                            precision: raw.precision.unwrap_or(d.precision),
                        },
                    }
                }
                ModelKind::Classifier => {
                    not_for("engine", raw.engine.is_some())?;
                    not_for("threads", raw.threads.is_some())?;
                    not_for("slots", raw.slots.is_some())?;
                    not_for("context_length", raw.context_length.is_some())?;
                    not_for(
                        "tokenizer/config",
                        raw.tokenizer.is_some() || raw.config.is_some(),
                    )?;
                    not_for("max_batch", raw.max_batch.is_some())?;
                    not_for("n_features/n_trees/height/window_size/seed", anomaly_fields)?;
                    not_for("precision", raw.precision.is_some())?;
                    let embedding_model = raw
                        .embedding_model
                        .clone()
                        .ok_or_else(|| err("a classifier needs embedding_model".to_owned()))?;
                    let target = self.models.iter().find(|m| m.id == embedding_model);
                    if target.map(|m| m.kind) != Some(ModelKind::Embedding) {
                        return Err(err(format!(
                            "embedding_model {embedding_model:?} is not an embedding model in the catalogue"
                        )));
                    }
                    ModelSpec::Classifier {
                        path: need_path()?,
                        embedding_model,
                    }
                }
                ModelKind::Anomaly => {
                    not_for("engine", raw.engine.is_some())?;
                    not_for("path", raw.path.is_some())?;
                    not_for("precision", raw.precision.is_some())?;
                    not_for("threads", raw.threads.is_some())?;
                    not_for("slots", raw.slots.is_some())?;
                    not_for("context_length", raw.context_length.is_some())?;
                    not_for(
                        "tokenizer/config",
                        raw.tokenizer.is_some() || raw.config.is_some(),
                    )?;
                    not_for("max_batch", raw.max_batch.is_some())?;
                    not_for("embedding_model", raw.embedding_model.is_some())?;
                    let d = HstConfig::default();
                    let n_features = raw.n_features.filter(|&n| n > 0).ok_or_else(|| {
                        err("an anomaly detector needs n_features of at least 1".to_owned())
                    })?;
                    ModelSpec::Anomaly {
                        n_features,
                        config: HstConfig {
                            n_trees: raw.n_trees.unwrap_or(d.n_trees),
                            height: raw.height.unwrap_or(d.height),
                            window_size: raw.window_size.unwrap_or(d.window_size),
                            seed: raw.seed.unwrap_or(d.seed),
                        },
                    }
                }
            };
            entries.push(ModelEntry {
                id: raw.id.clone(),
                spec,
            });
        }
        // Embedding models first, so classifiers find theirs loaded.
        entries.sort_by_key(|e| !matches!(e.spec, ModelSpec::Embedding { .. }));
        Ok(Catalogue { entries })
    }
}

/// The outcome of loading a catalogue.
#[derive(Default)]
pub struct LoadedModels {
    /// The models that loaded, by id.
    pub models: BTreeMap<String, Arc<dyn ModelBackend>>,
    /// The models that did not, with why.
    pub failures: Vec<(String, Error)>,
    /// The embedding models that loaded, by id (classifiers read them).
    pub embedders: BTreeMap<String, Arc<Embedder>>,
}

impl std::fmt::Debug for LoadedModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModels")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("failures", &self.failures)
            .finish()
    }
}

/// Loads one catalogue entry, from `path` instead of the entry's own file
/// when given (an installed release of the model). A classifier finds its
/// embedding model in `embedders`; an embedding model that loads is added
/// there.
pub fn load_entry(
    entry: &ModelEntry,
    path: Option<&Path>,
    embedders: &mut BTreeMap<String, Arc<Embedder>>,
) -> Result<Arc<dyn ModelBackend>> {
    let id = entry.id.as_str();
    match &entry.spec {
        ModelSpec::Llm { path: own, config } => {
            LlmModel::load(id, path.unwrap_or(own), config).map(|m| Arc::new(m) as _)
        }
        ModelSpec::Embedding { files, config } => {
            let files = match path {
                Some(p) => EmbeddingFiles {
                    weights: p.to_owned(),
                    ..files.clone()
                },
                None => files.clone(),
            };
            Embedder::load(id, &files, config).map(|m| {
                let m = Arc::new(m);
                embedders.insert(id.to_owned(), Arc::clone(&m));
                m as _
            })
        }
        ModelSpec::Classifier {
            path: own,
            embedding_model,
        } => match embedders.get(embedding_model) {
            Some(e) => EmbeddingClassifier::load(id, path.unwrap_or(own), Arc::clone(e))
                .map(|m| Arc::new(m) as _),
            None => Err(Error::Catalogue {
                id: id.to_owned(),
                reason: format!("its embedding model {embedding_model:?} did not load"),
            }),
        },
        ModelSpec::Anomaly { n_features, config } => {
            AnomalyModel::new(id, *n_features, config.clone()).map(|m| Arc::new(m) as _)
        }
    }
}

/// Loads every model in the catalogue, carrying on past failures; `paths`
/// overrides an entry's file by id (installed releases).
pub fn load(catalogue: &Catalogue, paths: &BTreeMap<String, std::path::PathBuf>) -> LoadedModels {
    let mut out = LoadedModels::default();
    for entry in &catalogue.entries {
        let id = entry.id.as_str();
        match load_entry(
            entry,
            paths.get(id).map(|p| p.as_path()),
            &mut out.embedders,
        ) {
            Ok(model) => {
                out.models.insert(id.to_owned(), model);
            }
            Err(e) => {
                tracing::warn!(model = id, error = %e, "model did not load");
                out.failures.push((id.to_owned(), e));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawCatalogue {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = serde_json::from_str::<RawCatalogue>(
            r#"{"models": [{"id": "a", "kind": "llm", "pth": "x"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("pth"), "{err}");
        let err = serde_json::from_str::<RawCatalogue>(r#"{"model": []}"#).unwrap_err();
        assert!(err.to_string().contains("model"), "{err}");
    }

    #[test]
    fn validation_cases() {
        // (catalogue, expected error fragment or None when valid)
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"models": [{"id": "a", "kind": "llm", "path": "a.gguf"}]}"#,
                None,
            ),
            (
                r#"{"models": [{"id": "a", "kind": "llm"}]}"#,
                Some("needs a path"),
            ),
            (
                r#"{"models": [{"id": "a", "kind": "llm", "path": "x"}, {"id": "a", "kind": "llm", "path": "y"}]}"#,
                Some("used by another"),
            ),
            (
                r#"{"models": [{"id": "a", "kind": "llm", "path": "x", "n_features": 3}]}"#,
                Some("does not apply"),
            ),
            (
                r#"{"models": [{"id": "c", "kind": "classifier", "path": "h"}]}"#,
                Some("needs embedding_model"),
            ),
            (
                r#"{"models": [{"id": "c", "kind": "classifier", "path": "h", "embedding_model": "e"}]}"#,
                Some("not an embedding model"),
            ),
            (
                r#"{"models": [{"id": "d", "kind": "anomaly"}]}"#,
                Some("n_features"),
            ),
            (
                r#"{"models": [{"id": "d", "kind": "anomaly", "n_features": 9}]}"#,
                None,
            ),
            (
                r#"{"models": [{"id": " ", "kind": "anomaly", "n_features": 9}]}"#,
                Some("id is empty"),
            ),
        ];
        for (json, want) in cases {
            let got = raw(json).validate(Path::new("/models"));
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(fragment), Err(e)) => {
                    assert!(e.to_string().contains(fragment), "{json}: {e}")
                }
                (want, got) => panic!("{json}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn resolves_paths_and_orders_embeddings_first() {
        let cat = raw(
            r#"{"models": [
                {"id": "c", "kind": "classifier", "path": "head.safetensors", "embedding_model": "e"},
                {"id": "e", "kind": "embedding", "path": "minilm", "max_batch": 8}
            ]}"#,
        )
        .validate(Path::new("/models"))
        .expect("valid");
        assert_eq!(cat.entries[0].id, "e");
        match &cat.entries[0].spec {
            ModelSpec::Embedding { files, config } => {
                assert_eq!(files.weights, Path::new("/models/minilm/model.safetensors"));
                assert_eq!(config.max_batch, 8);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn load_keeps_going_past_failures() {
        let cat = raw(
            r#"{"models": [
                {"id": "broken", "kind": "llm", "path": "does-not-exist.gguf"},
                {"id": "e", "kind": "embedding", "path": "no-such-dir"},
                {"id": "c", "kind": "classifier", "path": "head.safetensors", "embedding_model": "e"},
                {"id": "d", "kind": "anomaly", "n_features": 2}
            ]}"#,
        )
        .validate(Path::new("."))
        .expect("valid");
        let loaded = load(&cat, &BTreeMap::new());
        assert_eq!(loaded.models.keys().collect::<Vec<_>>(), vec!["d"]);
        let failed: Vec<&str> = loaded.failures.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(failed, vec!["e", "broken", "c"]);
        let d = &loaded.models["d"];
        assert_eq!(d.kind(), ModelKind::Anomaly);
        assert!(d.as_generator().is_none());
        let scorer = d.as_anomaly_scorer().expect("scores");
        assert_eq!(scorer.score_and_learn(&[1.0, 2.0]).expect("scores"), 0.0);
    }
}
