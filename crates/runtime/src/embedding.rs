//! Sentence embeddings from BERT-style models (all-MiniLM-L6-v2 and kin).
//!
//! The model directory holds `model.safetensors`, `tokenizer.json` and
//! `config.json` (the Hugging Face layout); a GGUF file of a `bert` model
//! (with its `tokenizer.json`) loads as well. Texts are tokenised with
//! WordPiece by the model's own `tokenizer.json`, truncated to the model's
//! maximum, run through the encoder by llama.cpp on the CPU, mean-pooled over
//! each text's tokens and L2-normalised: the sentence-transformers recipe for
//! these models.
//!
//! A safetensors checkpoint runs on Strata's own encoder ([`encoder`]):
//! weights packed once at load time (half precision by default), texts of a
//! batch packed end to end with no padding (each text attends only to
//! itself, so an embedding is the same whatever it is batched with), and
//! every product split between a small team of threads ([`kernels`]). It
//! replaced llama.cpp for these models because it measured faster on the
//! same sentences (BENCHMARKS.md): a BERT call is a few dozen small
//! products, and llama.cpp builds and allocates a graph for each call. A
//! GGUF `bert` file still runs on llama.cpp, through one worker thread that
//! owns its context (a context is not safe to share between threads).

mod encoder;
pub(crate) mod kernels;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use tokenizers::{Tokenizer, TruncationParams};

use crate::backend::{ModelBackend, ModelInfo, ModelKind, TextEmbedder};
use crate::error::{Error, Result};
use crate::gguf;
use encoder::{BertConfig, Encoder, Scratch};
use kernels::Team;

/// Most texts one llama.cpp batch may hold (llama.cpp's sequence limit).
pub const MAX_BATCH_LIMIT: usize = 256;

/// How the weights of a safetensors model are stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Half-precision matrices (computed in single precision): half the
    /// memory and faster; embeddings differ slightly from `F32`.
    #[default]
    F16,
    /// The checkpoint's own 32-bit floats.
    F32,
}

/// How an embedding model is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// Texts are truncated to this many tokens (special tokens included);
    /// `None` uses the model's `max_position_embeddings` (512 for MiniLM).
    pub max_length: Option<usize>,
    /// The most texts run through the encoder at once (at most
    /// [`MAX_BATCH_LIMIT`]). Default 32.
    pub max_batch: usize,
    /// CPU threads the encoder uses. Default 2.
    pub threads: u32,
    /// Weight precision of a safetensors model. Default `F16`.
    pub precision: Precision,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig {
            max_length: None,
            max_batch: 32,
            threads: 2,
            precision: Precision::F16,
        }
    }
}

/// Where the files of an embedding model are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingFiles {
    /// The weights: `model.safetensors`, or a `.gguf` file of a `bert` model.
    pub weights: PathBuf,
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: PathBuf,
    /// The model configuration (`config.json`); not read for a GGUF file.
    pub config: PathBuf,
}

impl EmbeddingFiles {
    /// The files of a model directory in the Hugging Face layout.
    pub fn in_dir(dir: &Path) -> Self {
        EmbeddingFiles {
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
            config: dir.join("config.json"),
        }
    }

    fn is_gguf(&self) -> bool {
        self.weights
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    }
}

/// Packed texts on their way to the worker.
struct Job {
    batches: Vec<Vec<Vec<u32>>>,
    reply: mpsc::Sender<Result<Vec<Vec<f32>>>>,
}

/// What runs the encoder.
enum Engine {
    /// Strata's encoder; one call at a time uses the team.
    Native {
        encoder: Box<Encoder>,
        state: Mutex<NativeState>,
    },
    /// llama.cpp's, on its worker thread.
    Llama(mpsc::Sender<Job>),
}

struct NativeState {
    team: Team,
    scratch: Scratch,
}

/// A loaded sentence-embedding model. `Send + Sync`; `embed` takes `&self`.
pub struct Embedder {
    info: ModelInfo,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    dimension: usize,
    max_batch: usize,
    /// Most tokens one batch holds (at least one longest text).
    batch_tokens: usize,
    engine: Engine,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads a model from its files.
    pub fn load(id: &str, files: &EmbeddingFiles, config: &EmbeddingConfig) -> Result<Embedder> {
        if config.threads == 0 || config.max_batch == 0 || config.max_batch > MAX_BATCH_LIMIT {
            return Err(Error::Catalogue {
                id: id.to_owned(),
                reason: format!(
                    "threads must be at least 1 and max_batch between 1 and {MAX_BATCH_LIMIT}"
                ),
            });
        }
        let loaded = if files.is_gguf() {
            Self::load_llama(files)?
        } else {
            Self::load_native(id, files, config)?
        };
        let tok_err = |reason: String| Error::Tokenizer {
            path: files.tokenizer.clone(),
            reason,
        };
        let mut tokenizer =
            Tokenizer::from_file(&files.tokenizer).map_err(|e| tok_err(e.to_string()))?;
        let Loaded {
            engine,
            dimension,
            trained,
            parameters,
            size_bytes,
            format,
        } = loaded;

        let max_length = config.max_length.unwrap_or(trained).clamp(1, trained);
        // Texts are packed without padding; the file's own padding (often
        // fixed to 128) would only add work.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;
        // One batch holds a longest text, or a full batch of ordinary
        // sentences, whichever is more.
        let batch_tokens = max_length.max(512);
        let engine = match engine {
            PendingEngine::Native(encoder) => Engine::Native {
                encoder: Box::new(encoder),
                state: Mutex::new(NativeState {
                    team: Team::new(config.threads as usize, &format!("embed-{id}")).map_err(
                        |e| Error::LlamaLoad {
                            path: files.weights.clone(),
                            reason: format!("cannot start encoder threads: {e}"),
                        },
                    )?,
                    scratch: Scratch::default(),
                }),
            },
            PendingEngine::Llama(model) => {
                Engine::Llama(Self::start_llama(id, files, config, model, batch_tokens)?)
            }
        };

        let info = ModelInfo {
            id: id.to_owned(),
            kind: ModelKind::Embedding,
            path: Some(files.weights.clone()),
            name: None,
            architecture: "bert".to_owned(),
            parameter_count: Some(parameters),
            size_bytes: Some(size_bytes),
            context_length: Some(max_length),
            output_dim: Some(dimension),
        };
        tracing::info!(
            model = id,
            path = %files.weights.display(),
            format,
            precision = ?config.precision,
            "loaded embedding model"
        );
        Ok(Embedder {
            info,
            tokenizer,
            tokenizer_path: files.tokenizer.clone(),
            dimension,
            max_batch: config.max_batch,
            batch_tokens,
            engine,
        })
    }

    /// Reads a safetensors checkpoint into Strata's encoder.
    fn load_native(id: &str, files: &EmbeddingFiles, config: &EmbeddingConfig) -> Result<Loaded> {
        let bert = BertConfig::read(&files.config)?;
        let size_bytes = std::fs::metadata(&files.weights)
            .map_err(Error::io(&files.weights))?
            .len();
        let encoder = Encoder::load(&files.weights, &bert, config.precision == Precision::F16)?;
        tracing::debug!(
            model = id,
            weight_bytes = encoder.weight_bytes(),
            "packed encoder weights"
        );
        Ok(Loaded {
            dimension: encoder.dimension(),
            trained: encoder.max_positions().max(1),
            parameters: encoder.parameters(),
            size_bytes,
            format: "safetensors",
            engine: PendingEngine::Native(encoder),
        })
    }

    /// Loads a GGUF `bert` file into llama.cpp.
    fn load_llama(files: &EmbeddingFiles) -> Result<Loaded> {
        let load_err = |reason: String| Error::LlamaLoad {
            path: files.weights.clone(),
            reason,
        };
        let backend = crate::llm::backend().map_err(load_err)?;
        let summary = gguf::inspect(&files.weights)?;
        if summary.architecture() != Some("bert") {
            return Err(Error::InvalidGguf {
                path: files.weights.clone(),
                reason: format!(
                    "architecture {:?} is not an embedding model (expected \"bert\")",
                    summary.architecture().unwrap_or("none")
                ),
            });
        }
        let model =
            LlamaModel::load_from_file(backend, &files.weights, &LlamaModelParams::default())
                .map_err(|e| load_err(e.to_string()))?;
        Ok(Loaded {
            dimension: usize::try_from(model.n_embd()).unwrap_or(0),
            trained: usize::try_from(model.n_ctx_train()).unwrap_or(512).max(1),
            parameters: summary.parameter_count,
            size_bytes: summary.file_bytes,
            format: "gguf",
            engine: PendingEngine::Llama(Arc::new(model)),
        })
    }

    /// Starts the worker thread that owns the llama.cpp context.
    fn start_llama(
        id: &str,
        files: &EmbeddingFiles,
        config: &EmbeddingConfig,
        model: Arc<LlamaModel>,
        batch_tokens: usize,
    ) -> Result<mpsc::Sender<Job>> {
        let load_err = |reason: String| Error::LlamaLoad {
            path: files.weights.clone(),
            reason,
        };
        let backend = crate::llm::backend().map_err(load_err)?;
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let worker = Worker {
            model_id: id.to_owned(),
            dimension: usize::try_from(model.n_embd()).unwrap_or(0),
            model,
        };
        let threads = i32::try_from(config.threads).unwrap_or(i32::MAX);
        let max_batch = config.max_batch;
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::Builder::new()
            .name(format!("embed-{id}"))
            .spawn(move || worker.run(backend, batch_tokens, max_batch, threads, jobs_rx, ready_tx))
            .map_err(|e| load_err(format!("cannot start worker thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(jobs_tx),
            Ok(Err(reason)) => Err(load_err(reason)),
            Err(_) => Err(load_err("worker thread stopped while starting".into())),
        }
    }

    /// What the runtime knows about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Length of each embedding vector.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Number of tokens each text becomes (special tokens included, after truncation).
    pub fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>> {
        texts
            .iter()
            .map(|t| self.encode(t).map(|ids| ids.len()))
            .collect()
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                path: self.tokenizer_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Embeds texts: one L2-normalised vector of [`Self::dimension`] floats per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        // Pack texts in order of length, so that a batch's sizes are alike,
        // up to `max_batch` texts and `batch_tokens` tokens per batch.
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut batches: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut tokens = 0;
        for &i in &order {
            let len = encoded[i].len();
            let fits = batches
                .last()
                .is_some_and(|b| b.len() < self.max_batch && tokens + len <= self.batch_tokens);
            if !fits {
                batches.push(Vec::new());
                members.push(Vec::new());
                tokens = 0;
            }
            tokens += len;
            if let (Some(b), Some(m)) = (batches.last_mut(), members.last_mut()) {
                b.push(encoded[i].clone());
                m.push(i);
            }
        }

        let vectors = match &self.engine {
            Engine::Native { encoder, state } => {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                let NativeState { team, scratch } = &mut *state;
                let mut all = Vec::with_capacity(encoded.len());
                for texts in &batches {
                    let vectors =
                        encoder
                            .encode(team, scratch, texts)
                            .map_err(|reason| Error::Decode {
                                model: self.info.id.clone(),
                                reason,
                            })?;
                    all.extend(vectors);
                }
                all
            }
            Engine::Llama(jobs) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                let sent = jobs.send(Job {
                    batches,
                    reply: reply_tx,
                });
                let stopped = || Error::WorkersStopped {
                    model: self.info.id.clone(),
                };
                sent.map_err(|_| stopped())?;
                reply_rx.recv().map_err(|_| stopped())??
            }
        };

        let mut out = vec![Vec::new(); encoded.len()];
        for (i, v) in members.into_iter().flatten().zip(vectors) {
            out[i] = v;
        }
        Ok(out)
    }
}

/// What loading found, before the engine starts.
struct Loaded {
    engine: PendingEngine,
    dimension: usize,
    /// Longest text the model was trained for.
    trained: usize,
    parameters: u64,
    size_bytes: u64,
    format: &'static str,
}

enum PendingEngine {
    Native(Encoder),
    Llama(Arc<LlamaModel>),
}

/// The thread that owns the llama.cpp context.
struct Worker {
    model_id: String,
    model: Arc<LlamaModel>,
    dimension: usize,
}

impl Worker {
    fn run(
        self,
        backend: &llama_cpp_2::llama_backend::LlamaBackend,
        batch_tokens: usize,
        max_batch: usize,
        threads: i32,
        jobs: mpsc::Receiver<Job>,
        ready: mpsc::Sender<Result<(), String>>,
    ) {
        let n = u32::try_from(batch_tokens).unwrap_or(u32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n))
            .with_n_batch(n)
            .with_n_ubatch(n)
            .with_n_seq_max(u32::try_from(max_batch).unwrap_or(1))
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::Mean)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let Some(mut ctx) = crate::llm::new_context(&self.model, backend, params, &ready) else {
            return;
        };
        let mut batch = LlamaBatch::new(batch_tokens, 1);
        // The embedder was dropped when the channel closes.
        while let Ok(job) = jobs.recv() {
            let mut result = Ok(Vec::new());
            for texts in &job.batches {
                match self.encode_batch(&mut ctx, &mut batch, texts) {
                    Ok(vectors) => {
                        if let Ok(all) = &mut result {
                            all.extend(vectors);
                        }
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = job.reply.send(result);
        }
    }

    fn encode_batch(
        &self,
        ctx: &mut LlamaContext<'_>,
        batch: &mut LlamaBatch,
        texts: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let err = |reason: String| Error::Decode {
            model: self.model_id.clone(),
            reason,
        };
        batch.clear();
        for (seq, ids) in texts.iter().enumerate() {
            let seq = i32::try_from(seq).unwrap_or(i32::MAX);
            for (pos, &id) in ids.iter().enumerate() {
                let token = LlamaToken(i32::try_from(id).unwrap_or(0));
                let pos = i32::try_from(pos).unwrap_or(i32::MAX);
                batch
                    .add(token, pos, &[seq], true)
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        ctx.decode(batch).map_err(|e| err(e.to_string()))?;
        (0..texts.len())
            .map(|seq| {
                let pooled = ctx
                    .embeddings_seq_ith(i32::try_from(seq).unwrap_or(i32::MAX))
                    .map_err(|e| err(e.to_string()))?;
                if pooled.len() != self.dimension {
                    return Err(err(format!(
                        "pooled embedding has {} values, expected {}",
                        pooled.len(),
                        self.dimension
                    )));
                }
                Ok(l2_normalised(pooled))
            })
            .collect()
    }
}

/// `v / |v|` (a zero vector stays zero).
fn l2_normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

impl TextEmbedder for Embedder {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Embedder::embed(self, texts)
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>> {
        Embedder::token_counts(self, texts)
    }
}

impl ModelBackend for Embedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn as_embedder(&self) -> Option<&dyn TextEmbedder> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_cases() {
        let cases: &[(&[f32], &[f32], f32)] = &[
            (&[1.0, 0.0], &[1.0, 0.0], 1.0),
            (&[1.0, 0.0], &[0.0, 2.0], 0.0),
            (&[1.0, 1.0], &[-1.0, -1.0], -1.0),
            (&[0.0, 0.0], &[1.0, 0.0], 0.0),
        ];
        for (a, b, want) in cases {
            assert!((cosine(a, b) - want).abs() < 1e-6, "{a:?} {b:?}");
        }
    }

    #[test]
    fn missing_files_name_the_file() {
        let files = EmbeddingFiles::in_dir(Path::new("no-such-model-dir"));
        let err = Embedder::load("m", &files, &EmbeddingConfig::default()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
