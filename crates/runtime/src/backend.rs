//! The one trait every loaded model implements, and its capabilities.
//!
//! A caller holding an `Arc<dyn ModelBackend>` asks for a capability with
//! `as_generator()`, `as_embedder()`, `as_classifier()` or
//! `as_anomaly_scorer()`; each returns `None` when the model cannot do that.
//! The capability traits are small on purpose, so that the edge agent's
//! tests can stand in fakes for real models.

use std::ops::ControlFlow;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::llm::{CancelToken, Generation, GenerationRequest, Prompt, StreamChunk};

/// The kinds of model the runtime serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A GGUF language model that generates text (llama.cpp).
    Llm,
    /// A BERT-style sentence-embedding model (safetensors + tokenizer.json).
    Embedding,
    /// A classifier head over sentence embeddings (safetensors + labels).
    Classifier,
    /// A streaming anomaly detector over numeric readings.
    Anomaly,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Llm => "llm",
            ModelKind::Embedding => "embedding",
            ModelKind::Classifier => "classifier",
            ModelKind::Anomaly => "anomaly",
        })
    }
}

/// What the runtime knows about a loaded model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The model's id in the catalogue.
    pub id: String,
    /// What kind of model it is.
    pub kind: ModelKind,
    /// The main file it was loaded from (`None` for models with no file,
    /// such as an anomaly detector that learns from scratch).
    pub path: Option<PathBuf>,
    /// The model's own name, from its metadata, when it has one.
    pub name: Option<String>,
    /// The architecture (`llama`, `qwen2`, `bert`, `mlp`, `half-space-trees`).
    pub architecture: String,
    /// Number of parameters (weights), when known.
    pub parameter_count: Option<u64>,
    /// Size of the model's files in bytes, when loaded from files.
    pub size_bytes: Option<u64>,
    /// Context length in tokens (LLMs: of the serving instance; embedding
    /// models: the truncation length).
    pub context_length: Option<usize>,
    /// Output dimension (embedding models) or number of labels (classifiers).
    pub output_dim: Option<usize>,
}

/// Text generation (an LLM).
pub trait TextGenerator: Send + Sync {
    /// Generates a completion, calling `on_chunk` as text is produced.
    ///
    /// The call blocks until generation ends; run it on a blocking thread in
    /// async code. The next token is generated only after `on_chunk`
    /// returns. Returning `ControlFlow::Break` from `on_chunk`, or
    /// cancelling `cancel` from another thread, stops generation after the
    /// current token with [`crate::FinishReason::Cancelled`].
    fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        on_chunk: &mut dyn FnMut(&StreamChunk) -> ControlFlow<()>,
    ) -> Result<Generation>;

    /// The context length (prompt plus completion) in tokens.
    fn context_length(&self) -> usize;

    /// The prompt's length in tokens, chat template included, whether or
    /// not it fits the context (the router compares it with each tier's).
    fn count_tokens(&self, prompt: &Prompt) -> Result<usize>;

    /// The UTF-8 bytes of a token (to show alternatives in log-probabilities).
    fn token_bytes(&self, token: u32) -> Vec<u8>;
}

/// Sentence embeddings.
pub trait TextEmbedder: Send + Sync {
    /// Embeds a batch of texts; one L2-normalised vector per text.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;

    /// Length of each embedding vector.
    fn dimension(&self) -> usize;

    /// Number of tokens each text is embedded from (after truncation), for
    /// usage accounting.
    fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>>;
}

/// One classification result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// The probability of every label, in the order of [`TextClassifier::labels`].
    pub probabilities: Vec<f32>,
}

/// Text classification (an embedding model plus a classifier head).
pub trait TextClassifier: Send + Sync {
    /// Classifies a batch of texts.
    fn classify(&self, texts: &[&str]) -> Result<Vec<Prediction>>;

    /// The labels the classifier chooses from.
    fn labels(&self) -> &[String];
}

/// Streaming anomaly scoring of numeric readings.
pub trait AnomalyScorer: Send + Sync {
    /// Scores a reading (higher is more anomalous, in [0, 1]) and then
    /// learns from it.
    fn score_and_learn(&self, reading: &[f64]) -> Result<f64>;

    /// Number of features a reading must have.
    fn n_features(&self) -> usize;
}

/// A loaded model of any kind.
pub trait ModelBackend: Send + Sync {
    /// What the runtime knows about the model.
    fn info(&self) -> &ModelInfo;

    /// The model's kind.
    fn kind(&self) -> ModelKind {
        self.info().kind
    }

    /// The model as a text generator, if it is one.
    fn as_generator(&self) -> Option<&dyn TextGenerator> {
        None
    }

    /// The model as a sentence embedder, if it is one.
    fn as_embedder(&self) -> Option<&dyn TextEmbedder> {
        None
    }

    /// The model as a text classifier, if it is one.
    fn as_classifier(&self) -> Option<&dyn TextClassifier> {
        None
    }

    /// The model as an anomaly scorer, if it is one.
    fn as_anomaly_scorer(&self) -> Option<&dyn AnomalyScorer> {
        None
    }
}
