//! Strata's model runtime: the models an edge device serves, behind one trait.
//!
//! It is: GGUF text generation through llama.cpp ([`llm`]), BERT-style
//! sentence embeddings with llama.cpp ([`embedding`]), small classifier heads
//! over those embeddings and the intent data set they are trained on
//! ([`classifier`], [`intents`]), streaming anomaly detection ([`anomaly`]),
//! and the catalogue that loads a device's models from local files
//! ([`catalogue`]). It is not a server: no HTTP, no network, no environment
//! variables; every path comes in as an argument, and the edge agent puts an
//! API in front of it.
//!
//! Start reading at [`ModelBackend`] (the trait every loaded model
//! implements, with its capability traits) and [`catalogue::load`]; then
//! [`LlmModel::generate`] for the streaming generation call.

pub mod anomaly;
pub mod backend;
pub mod catalogue;
pub mod classifier;
pub mod embedding;
pub mod error;
pub mod gguf;
pub mod intents;
pub mod llm;

pub use anomaly::{AnomalyModel, HstConfig, StreamingDetector};
pub use backend::{
    AnomalyScorer, ModelBackend, ModelInfo, ModelKind, Prediction, TextClassifier, TextEmbedder,
    TextGenerator,
};
pub use catalogue::{Catalogue, LoadedModels, ModelEntry, ModelSpec, RawCatalogue, RawModelEntry};
pub use classifier::{ClassifierHead, EmbeddingClassifier, TrainConfig};
pub use embedding::{Embedder, EmbeddingConfig, EmbeddingFiles};
pub use error::{Error, Result};
pub use llm::{
    CancelToken, ChatMessage, FinishReason, GeneratedToken, Generation, GenerationRequest,
    LlmConfig, LlmEngine, LlmModel, Prompt, SamplingParams, StreamChunk, Timings, TokenLogprob,
    Usage,
};
