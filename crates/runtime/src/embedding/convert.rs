//! Converts a BERT encoder in the Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`) to a GGUF file llama.cpp runs.
//!
//! Tensor names follow llama.cpp's `bert` architecture; matrices are stored
//! as `F16` (or `F32`), norms and biases as `F32`. The WordPiece vocabulary
//! goes in too, so the file stands on its own, but the runtime still
//! tokenises with the `tokenizer.json` it came with: that tokenizer is the
//! model's reference.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{EmbeddingFiles, Precision};
use crate::error::{Error, Result};
use crate::gguf::write::{Builder, TensorInfo, TensorType, Value, write_tensor};

/// The fields of a BERT `config.json` the conversion reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
}

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".to_owned()
}
fn default_position() -> String {
    "absolute".to_owned()
}
fn default_type_vocab() -> usize {
    2
}

impl BertConfig {
    pub(crate) fn read(path: &Path) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let unsupported = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(t) = &config.model_type
            && t != "bert"
        {
            return Err(unsupported(format!(
                "model_type {t:?} is not supported (only \"bert\")"
            )));
        }
        if config.hidden_act != "gelu" {
            return Err(unsupported(format!(
                "hidden_act {:?} is not supported (only \"gelu\")",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(unsupported(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                config.position_embedding_type
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }
}

/// Maps a Hugging Face BERT tensor name to llama.cpp's, or `None` for
/// tensors the encoder does not use (the pooler, position ids).
fn gguf_name(hf: &str) -> Option<String> {
    let name = hf.strip_prefix("bert.").unwrap_or(hf);
    let fixed = match name {
        "embeddings.word_embeddings.weight" => Some("token_embd.weight"),
        "embeddings.position_embeddings.weight" => Some("position_embd.weight"),
        "embeddings.token_type_embeddings.weight" => Some("token_types.weight"),
        "embeddings.LayerNorm.weight" => Some("token_embd_norm.weight"),
        "embeddings.LayerNorm.bias" => Some("token_embd_norm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = name.strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let target = match module {
        "attention.self.query" => "attn_q",
        "attention.self.key" => "attn_k",
        "attention.self.value" => "attn_v",
        "attention.output.dense" => "attn_output",
        "attention.output.LayerNorm" => "attn_output_norm",
        "intermediate.dense" => "ffn_up",
        "output.dense" => "ffn_down",
        "output.LayerNorm" => "layer_output_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{target}.{param}"))
}

/// The vocabulary of a WordPiece `tokenizer.json`, by token id.
fn wordpiece_vocab(path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct File {
        model: Model,
    }
    #[derive(Deserialize)]
    struct Model {
        #[serde(rename = "type")]
        kind: String,
        vocab: BTreeMap<String, u32>,
    }
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let file: File = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| Error::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    if file.model.kind != "WordPiece" {
        return Err(bad(format!(
            "model type {:?} is not WordPiece",
            file.model.kind
        )));
    }
    let mut tokens = vec![None; file.model.vocab.len()];
    for (token, id) in file.model.vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad(format!("token id {id} is beyond the vocabulary size")))?;
        *slot = Some(token);
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.ok_or_else(|| bad(format!("token id {id} is missing"))))
        .collect()
}

/// Writes the GGUF file of a BERT model to `out`, one tensor at a time;
/// returns its parameter count.
pub(crate) fn write_gguf<W: std::io::Write>(
    files: &EmbeddingFiles,
    config: &BertConfig,
    precision: Precision,
    mut out: W,
) -> Result<u64> {
    let weights = std::fs::read(&files.weights).map_err(Error::io(&files.weights))?;
    let st_err = |reason: String| Error::Safetensors {
        path: files.weights.clone(),
        reason,
    };
    let st = SafeTensors::deserialize(&weights).map_err(|e| st_err(e.to_string()))?;
    let vocab = wordpiece_vocab(&files.tokenizer)?;

    let mut b = Builder::new();
    let arch = "bert";
    let u32_of = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    b.meta("general.architecture", Value::String(arch.into()))
        .meta("general.file_type", Value::U32(precision.file_type()))
        .meta(
            &format!("{arch}.context_length"),
            u32_of(config.max_position_embeddings),
        )
        .meta(
            &format!("{arch}.embedding_length"),
            u32_of(config.hidden_size),
        )
        .meta(
            &format!("{arch}.feed_forward_length"),
            u32_of(config.intermediate_size),
        )
        .meta(
            &format!("{arch}.block_count"),
            u32_of(config.num_hidden_layers),
        )
        .meta(
            &format!("{arch}.attention.head_count"),
            u32_of(config.num_attention_heads),
        )
        .meta(
            &format!("{arch}.attention.layer_norm_epsilon"),
            Value::F32(config.layer_norm_eps as f32),
        )
        .meta(&format!("{arch}.attention.causal"), Value::Bool(false))
        // 1 = mean pooling, the sentence-transformers recipe for MiniLM.
        .meta(&format!("{arch}.pooling_type"), Value::U32(1));

    // llama.cpp's WordPiece tokenizer wants word-initial pieces marked with
    // '▁' and continuation pieces without their "##".
    let special = |t: &str| t.starts_with('[') && t.ends_with(']');
    let token_types: Vec<i32> = vocab
        .iter()
        .map(|t| if special(t) { 3 } else { 1 })
        .collect();
    let find = |name: &str| vocab.iter().position(|t| t == name).map(|i| i as u32);
    let gguf_tokens: Vec<String> = vocab
        .iter()
        .map(|t| {
            if special(t) {
                t.clone()
            } else if let Some(rest) = t.strip_prefix("##") {
                rest.to_owned()
            } else {
                format!("\u{2581}{t}")
            }
        })
        .collect();
    b.meta("tokenizer.ggml.model", Value::String("bert".into()))
        .meta("tokenizer.ggml.tokens", Value::Strings(gguf_tokens))
        .meta("tokenizer.ggml.token_type", Value::I32s(token_types))
        .meta(
            "tokenizer.ggml.token_type_count",
            u32_of(config.type_vocab_size),
        );
    for (key, token) in [
        ("tokenizer.ggml.cls_token_id", "[CLS]"),
        ("tokenizer.ggml.seperator_token_id", "[SEP]"),
        ("tokenizer.ggml.unknown_token_id", "[UNK]"),
        ("tokenizer.ggml.padding_token_id", "[PAD]"),
        ("tokenizer.ggml.mask_token_id", "[MASK]"),
    ] {
        if let Some(id) = find(token) {
            b.meta(key, Value::U32(id));
        }
    }

    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut sources = Vec::new();
    for hf_name in names {
        let Some(name) = gguf_name(&hf_name) else {
            continue;
        };
        let view = st.tensor(&hf_name).map_err(|e| st_err(e.to_string()))?;
        if view.dtype() != Dtype::F32 {
            return Err(st_err(format!(
                "tensor {hf_name} is {:?}; only F32 weights are supported",
                view.dtype()
            )));
        }
        // Matrices (and the token and position tables) take the chosen
        // precision; vectors llama.cpp adds or normalises with, and the
        // token-type table it adds as a row, must stay F32.
        let dtype = if view.shape().len() >= 2 && name != "token_types.weight" {
            precision.tensor_type()
        } else {
            TensorType::F32
        };
        let info = TensorInfo::row_major(&name, view.shape(), dtype);
        b.tensor(info.clone());
        sources.push((info, view));
    }
    let expected = 5 + 16 * config.num_hidden_layers;
    if sources.len() != expected {
        return Err(st_err(format!(
            "found {} encoder tensors, expected {expected} for {} layers",
            sources.len(),
            config.num_hidden_layers
        )));
    }

    let write_err = |e: std::io::Error| Error::Safetensors {
        path: files.weights.clone(),
        reason: format!("writing the converted model: {e}"),
    };
    b.write_header(&mut out).map_err(write_err)?;
    // One pair of buffers serves every tensor: converting a model leaves no
    // trail of freed allocations behind in the process's heap.
    let mut parameters = 0u64;
    let mut values: Vec<f32> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    for (info, view) in sources {
        values.clear();
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        parameters += values.len() as u64;
        info.encode_into(&values, &mut bytes);
        write_tensor(&mut out, &info, &bytes).map_err(write_err)?;
    }
    out.flush().map_err(write_err)?;
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_llama_cpp() {
        let cases = [
            (
                "embeddings.word_embeddings.weight",
                Some("token_embd.weight"),
            ),
            (
                "bert.embeddings.LayerNorm.bias",
                Some("token_embd_norm.bias"),
            ),
            (
                "encoder.layer.3.attention.self.query.weight",
                Some("blk.3.attn_q.weight"),
            ),
            (
                "encoder.layer.0.attention.output.LayerNorm.bias",
                Some("blk.0.attn_output_norm.bias"),
            ),
            (
                "encoder.layer.5.output.dense.bias",
                Some("blk.5.ffn_down.bias"),
            ),
            (
                "encoder.layer.5.intermediate.dense.weight",
                Some("blk.5.ffn_up.weight"),
            ),
            ("pooler.dense.weight", None),
            ("embeddings.position_ids", None),
            ("encoder.layer.x.output.dense.bias", None),
        ];
        for (hf, want) in cases {
            assert_eq!(gguf_name(hf).as_deref(), want, "{hf}");
        }
    }
}
