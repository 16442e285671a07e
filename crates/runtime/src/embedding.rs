//! Sentence embeddings from BERT-style models (all-MiniLM-L6-v2 and kin).
//!
//! The model directory holds `model.safetensors`, `tokenizer.json` and
//! `config.json` (the Hugging Face layout). Texts are tokenised with
//! WordPiece, padded per batch to the longest text (the fixed padding some
//! `tokenizer.json` files carry is switched off), truncated to the model's
//! maximum, run through the encoder on the CPU with candle, mean-pooled over
//! the real tokens only (the attention mask) and L2-normalised: the
//! sentence-transformers recipe for these models.
//!
//! Batches are sorted by length before they are cut into sub-batches, so
//! short texts are not padded to the length of a long one.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{Tokenizer, TruncationParams};

use crate::backend::{ModelBackend, ModelInfo, ModelKind, TextEmbedder};
use crate::error::{Error, Result};

/// How an embedding model is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// Texts are truncated to this many tokens (special tokens included);
    /// `None` uses the model's `max_position_embeddings` (512 for MiniLM).
    pub max_length: Option<usize>,
    /// The most texts run through the encoder at once. Default 32.
    pub max_batch: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig {
            max_length: None,
            max_batch: 32,
        }
    }
}

/// Where the files of an embedding model are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingFiles {
    /// The weights (`model.safetensors`).
    pub weights: PathBuf,
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: PathBuf,
    /// The model configuration (`config.json`).
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
}

/// A loaded sentence-embedding model. `Send + Sync`; `embed` takes `&self`.
pub struct Embedder {
    info: ModelInfo,
    model: BertModel,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    device: Device,
    dimension: usize,
    max_batch: usize,
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
        let config_text =
            std::fs::read_to_string(&files.config).map_err(Error::io(&files.config))?;
        let bert_config: BertConfig =
            serde_json::from_str(&config_text).map_err(|source| Error::Json {
                path: files.config.clone(),
                source,
            })?;

        let weights = std::fs::read(&files.weights).map_err(Error::io(&files.weights))?;
        let size_bytes = weights.len() as u64;
        let parameter_count = {
            let st = safetensors::SafeTensors::deserialize(&weights).map_err(|e| {
                Error::Safetensors {
                    path: files.weights.clone(),
                    reason: e.to_string(),
                }
            })?;
            st.tensors()
                .iter()
                .map(|(_, view)| view.shape().iter().product::<usize>() as u64)
                .sum::<u64>()
        };
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device).map_err(
            Error::tensor(format!("loading weights {}", files.weights.display())),
        )?;
        let model = BertModel::load(vb, &bert_config).map_err(Error::tensor(format!(
            "building a bert model from {}",
            files.weights.display()
        )))?;

        let tok_err = |reason: String| Error::Tokenizer {
            path: files.tokenizer.clone(),
            reason,
        };
        let mut tokenizer =
            Tokenizer::from_file(&files.tokenizer).map_err(|e| tok_err(e.to_string()))?;
        let max_length = config
            .max_length
            .unwrap_or(bert_config.max_position_embeddings)
            .min(bert_config.max_position_embeddings);
        // Padding is done per batch here; the file's own (often fixed to 128)
        // would waste work on short texts.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;

        let info = ModelInfo {
            id: id.to_owned(),
            kind: ModelKind::Embedding,
            path: Some(files.weights.clone()),
            name: None,
            architecture: bert_config
                .model_type
                .clone()
                .unwrap_or_else(|| "bert".to_owned()),
            parameter_count: Some(parameter_count),
            size_bytes: Some(size_bytes),
            context_length: Some(max_length),
            output_dim: Some(bert_config.hidden_size),
        };
        tracing::info!(model = id, path = %files.weights.display(), "loaded embedding model");
        Ok(Embedder {
            info,
            model,
            tokenizer,
            tokenizer_path: files.tokenizer.clone(),
            device,
            dimension: bert_config.hidden_size,
            max_batch: config.max_batch.max(1),
        })
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
        let encoded = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        // Sort by length so that each sub-batch pads as little as possible.
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut out = vec![Vec::new(); encoded.len()];
        for chunk in order.chunks(self.max_batch) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let vectors = self
                .embed_batch(&batch)
                .map_err(Error::tensor("computing embeddings"))?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Runs one padded batch through the encoder and pools it.
    fn embed_batch(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let len = batch.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, seq) in batch.iter().enumerate() {
            ids[row * len..row * len + seq.len()].copy_from_slice(seq);
            mask[row * len..row * len + seq.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let type_ids = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        // Mean over the real tokens: padded positions have mask 0.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
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
