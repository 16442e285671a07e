//! Strata's own BERT encoder: the forward pass of MiniLM-style models on
//! the CPU, for texts packed end to end without padding.
//!
//! Weights are read from `model.safetensors` one tensor at a time (the file
//! is never held in memory whole) and packed for [`kernels`]: the matrices
//! as half-precision panels by default, Q, K and V fused into one product
//! with `1/√d` folded into Q. Activations stay in single precision.
//!
//! Per layer: one fused QKV product; attention of each text to itself, head
//! by head; the output product with the residual added as it is stored;
//! LayerNorm; the up-projection with GELU applied as it is stored; the
//! down-projection with its residual; LayerNorm. Then mean pooling over
//! each text's tokens and L2 normalisation. Every step is split between the
//! threads of a [`Team`].

// Attention writes each (text, head) block of a shared buffer from the
// thread that owns it; see `Shared2d`.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::kernels::{Floats, Linear, Shared2d, Team, for_rows, share};
use crate::error::{Error, Result};

/// The fields of a BERT `config.json` the encoder reads.
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

/// A loaded encoder.
pub(crate) struct Encoder {
    hidden: usize,
    heads: usize,
    eps: f32,
    max_positions: usize,
    vocab: usize,
    /// Token embeddings, `vocab × hidden`.
    word: Floats,
    /// Position embeddings plus the embedding of token type 0, `max_positions × hidden`.
    position: Vec<f32>,
    norm: Norm,
    layers: Vec<Layer>,
    parameters: u64,
}

struct Layer {
    qkv: Linear,
    output: Linear,
    norm1: Norm,
    up: Linear,
    down: Linear,
    norm2: Norm,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// Work buffers, kept between calls so that a call does not fault pages in.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    y: Vec<f32>,
    up: Vec<f32>,
}

impl Encoder {
    /// Reads and packs the model in `weights` (safetensors) described by `config`.
    pub(crate) fn load(weights: &Path, config: &BertConfig, f16_weights: bool) -> Result<Encoder> {
        let file = Tensors::open(weights)?;
        let h = config.hidden_size;
        if h == 0 || config.intermediate_size == 0 {
            return Err(file.bad("hidden_size and intermediate_size must be positive".into()));
        }
        let inter = config.intermediate_size;
        let heads = config.num_attention_heads;
        let scale = 1.0 / ((h / heads) as f32).sqrt();
        let word_shape = file.shape("embeddings.word_embeddings.weight")?;
        let vocab = word_shape.first().copied().unwrap_or(0);
        let word = if f16_weights {
            let mut table = Vec::with_capacity(vocab * h);
            file.read_into(
                "embeddings.word_embeddings.weight",
                &[vocab, h],
                &mut |chunk| {
                    table.extend(chunk.iter().map(|&v| half::f16::from_f32(v).to_bits()));
                },
            )?;
            Floats::F16(table)
        } else {
            Floats::F32(file.read("embeddings.word_embeddings.weight", &[vocab, h])?)
        };
        let mut read = Reader {
            file: &file,
            parameters: (vocab * h) as u64,
        };

        let max_positions = config.max_position_embeddings;
        let mut position =
            read.values("embeddings.position_embeddings.weight", &[max_positions, h])?;
        let types = file.shape("embeddings.token_type_embeddings.weight")?;
        let token_type = read.values("embeddings.token_type_embeddings.weight", &types)?;
        if types.len() != 2 || types[1] != h || types[0] == 0 {
            return Err(file.bad(format!("token type embeddings have shape {types:?}")));
        }
        for row in position.chunks_exact_mut(h) {
            for (p, t) in row.iter_mut().zip(&token_type[..h]) {
                *p += t;
            }
        }
        let embedding_norm = read.norm("embeddings.LayerNorm", h)?;

        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for (part, s) in [("query", scale), ("key", 1.0), ("value", 1.0)] {
                let w = read.values(&format!("{p}.attention.self.{part}.weight"), &[h, h])?;
                let b = read.values(&format!("{p}.attention.self.{part}.bias"), &[h])?;
                qkv_w.extend(w.iter().map(|v| v * s));
                qkv_b.extend(b.iter().map(|v| v * s));
            }
            let qkv = Linear::pack(&qkv_w, &qkv_b, 3 * h, h, f16_weights);
            drop((qkv_w, qkv_b));
            let output = read.linear(&format!("{p}.attention.output.dense"), h, h, f16_weights)?;
            let norm1 = read.norm(&format!("{p}.attention.output.LayerNorm"), h)?;
            let up = read.linear(&format!("{p}.intermediate.dense"), inter, h, f16_weights)?;
            let down = read.linear(&format!("{p}.output.dense"), h, inter, f16_weights)?;
            let norm2 = read.norm(&format!("{p}.output.LayerNorm"), h)?;
            layers.push(Layer {
                qkv,
                output,
                norm1,
                up,
                down,
                norm2,
            });
        }
        let parameters = read.parameters;
        Ok(Encoder {
            hidden: h,
            heads,
            eps: config.layer_norm_eps as f32,
            max_positions,
            vocab,
            word,
            position,
            norm: embedding_norm,
            layers,
            parameters,
        })
    }

    /// Values in the checkpoint's tensors that the encoder uses.
    pub(crate) fn parameters(&self) -> u64 {
        self.parameters
    }

    /// Length of an embedding.
    pub(crate) fn dimension(&self) -> usize {
        self.hidden
    }

    /// Most tokens a text may have.
    pub(crate) fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Bytes the weights take in memory.
    pub(crate) fn weight_bytes(&self) -> usize {
        let table = self.word.bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes() + l.output.bytes() + l.up.bytes() + l.down.bytes() + 16 * self.hidden
            })
            .sum();
        table + self.position.len() * 4 + layers
    }

    /// The L2-normalised, mean-pooled embedding of each text (token ids,
    /// special tokens included; none empty, none longer than
    /// [`Encoder::max_positions`]).
    pub(crate) fn encode(
        &self,
        team: &Team,
        scratch: &mut Scratch,
        texts: &[Vec<u32>],
    ) -> std::result::Result<Vec<Vec<f32>>, String> {
        let h = self.hidden;
        let mut starts = Vec::with_capacity(texts.len() + 1);
        let mut total = 0;
        for ids in texts {
            if ids.is_empty() || ids.len() > self.max_positions {
                return Err(format!(
                    "a text has {} tokens; the encoder takes 1 to {}",
                    ids.len(),
                    self.max_positions
                ));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.vocab
                ));
            }
            starts.push(total);
            total += ids.len();
        }
        starts.push(total);
        if total == 0 {
            return Ok(Vec::new());
        }
        let inter = self.layers.first().map_or(0, |l| l.up.outputs());
        let Scratch {
            x,
            qkv,
            context,
            y,
            up,
        } = scratch;
        fit(x, total * h);
        fit(qkv, total * 3 * h);
        fit(context, total * h);
        fit(y, total * h);
        fit(up, total * inter);

        // Token and position embeddings, then LayerNorm.
        let rows: Vec<(u32, usize)> = texts
            .iter()
            .flat_map(|ids| ids.iter().enumerate().map(|(pos, &id)| (id, pos)))
            .collect();
        for_rows(team, x, total, h, &|first, out| {
            for (row, dst) in out.chunks_exact_mut(h).enumerate() {
                let (id, pos) = rows[first + row];
                self.word.read(id as usize * h, dst);
                for (d, p) in dst.iter_mut().zip(&self.position[pos * h..(pos + 1) * h]) {
                    *d += p;
                }
                layer_norm(dst, &self.norm, self.eps);
            }
        });

        for layer in &self.layers {
            layer.qkv.forward(team, x, total, qkv, None, false);
            self.attention(team, qkv, context, &starts);
            layer
                .output
                .forward(team, context, total, y, Some(x), false);
            for_rows(team, y, total, h, &|_, out| {
                for row in out.chunks_exact_mut(h) {
                    layer_norm(row, &layer.norm1, self.eps);
                }
            });
            layer.up.forward(team, y, total, up, None, true);
            layer.down.forward(team, up, total, x, Some(y), false);
            for_rows(team, x, total, h, &|_, out| {
                for row in out.chunks_exact_mut(h) {
                    layer_norm(row, &layer.norm2, self.eps);
                }
            });
        }

        Ok(starts
            .windows(2)
            .map(|w| {
                let mut pooled = vec![0f32; h];
                for row in x[w[0] * h..w[1] * h].chunks_exact(h) {
                    for (p, v) in pooled.iter_mut().zip(row) {
                        *p += v;
                    }
                }
                let count = (w[1] - w[0]) as f32;
                for p in &mut pooled {
                    *p /= count;
                }
                let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                pooled.iter().map(|v| v / norm).collect()
            })
            .collect())
    }

    /// Self-attention of each text: `context` (`total × hidden`) from the
    /// fused `qkv` (`total × 3·hidden`), one (text, head) pair per task.
    fn attention(&self, team: &Team, qkv: &[f32], context: &mut [f32], starts: &[usize]) {
        let h = self.hidden;
        let d = h / self.heads;
        let texts = starts.len() - 1;
        let total = starts[texts];
        let tasks = texts * self.heads;
        let out = Shared2d::new(context, total, h);
        team.run(&|t, n| {
            let (first, last) = share(tasks, t, n);
            let mut scores = Vec::new();
            for task in first..last {
                let (text, head) = (task / self.heads, task % self.heads);
                let (s, e) = (starts[text], starts[text + 1]);
                let len = e - s;
                scores.clear();
                scores.resize(len, 0.0);
                let q_at = head * d;
                let k_at = h + head * d;
                let v_at = 2 * h + head * d;
                for i in 0..len {
                    let q = &qkv[(s + i) * 3 * h + q_at..][..d];
                    let mut max = f32::NEG_INFINITY;
                    for (j, score) in scores.iter_mut().enumerate() {
                        let k = &qkv[(s + j) * 3 * h + k_at..][..d];
                        *score = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        max = max.max(*score);
                    }
                    let mut sum = 0.0;
                    for score in scores.iter_mut() {
                        *score = (*score - max).exp();
                        sum += *score;
                    }
                    // SAFETY: (text, head) pairs are shared out disjointly,
                    // so this thread alone writes the head's columns of the
                    // text's rows; `context` outlives `team.run`.
                    let dst = unsafe { out.part_mut(s + i, head * d, d) };
                    dst.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let v = &qkv[(s + j) * 3 * h + v_at..][..d];
                        let p = p / sum;
                        for (o, x) in dst.iter_mut().zip(v) {
                            *o += p * x;
                        }
                    }
                }
            }
        });
    }
}

/// Sets `v` to `len` values, keeping its allocation.
fn fit(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

/// In place: `(v − mean) / √(var + eps) · γ + β`.
fn layer_norm(v: &mut [f32], norm: &Norm, eps: f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, g), b) in v.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
        *x = (*x - mean) * inv * g + b;
    }
}

/// Reads tensors and counts the values read.
struct Reader<'a> {
    file: &'a Tensors,
    parameters: u64,
}

impl Reader<'_> {
    fn values(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.file.read(name, shape)?;
        self.parameters += v.len() as u64;
        Ok(v)
    }

    fn norm(&mut self, prefix: &str, width: usize) -> Result<Norm> {
        Ok(Norm {
            gamma: self.values(&format!("{prefix}.weight"), &[width])?,
            beta: self.values(&format!("{prefix}.bias"), &[width])?,
        })
    }

    fn linear(&mut self, prefix: &str, n: usize, k: usize, f16_weights: bool) -> Result<Linear> {
        let w = self.values(&format!("{prefix}.weight"), &[n, k])?;
        let b = self.values(&format!("{prefix}.bias"), &[n])?;
        Ok(Linear::pack(&w, &b, n, k, f16_weights))
    }
}

/// The tensors of a safetensors file, read one at a time.
struct Tensors {
    path: PathBuf,
    file: File,
    data_start: u64,
    file_len: u64,
    entries: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Largest header the reader accepts (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl Tensors {
    fn open(path: &Path) -> Result<Tensors> {
        let file = File::open(path).map_err(Error::io(path))?;
        let file_len = file.metadata().map_err(Error::io(path))?.len();
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!(
                "header length {header_len} does not fit a file of {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let mut entries = BTreeMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_owned();
            entries.insert(name, entry);
        }
        Ok(Tensors {
            path: path.to_path_buf(),
            file,
            data_start: 8 + header_len,
            file_len,
            entries,
        })
    }

    fn bad(&self, reason: String) -> Error {
        Error::Safetensors {
            path: self.path.clone(),
            reason,
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// The values of tensor `name`, which must have shape `shape`, as f32.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(shape.iter().product());
        self.read_into(name, shape, &mut |chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    /// Passes the values of tensor `name` (shape `shape`) to `sink` as f32,
    /// in order, a bounded chunk at a time: a large tensor is never in
    /// memory twice.
    fn read_into(&self, name: &str, shape: &[usize], sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(self.bad(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                entry.shape
            )));
        }
        let width: usize = match entry.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(self.bad(format!(
                    "tensor {name} has dtype {other}, not F32, F16 or BF16"
                )));
            }
        };
        let count: usize = shape.iter().product();
        let [begin, end] = entry.data_offsets;
        if end < begin
            || end - begin != (count * width) as u64
            || self.data_start + end > self.file_len
        {
            return Err(self.bad(format!(
                "tensor {name} has data offsets {begin}..{end}, which do not fit its shape or the file"
            )));
        }
        const CHUNK_VALUES: usize = 1 << 18;
        let mut bytes = vec![0u8; CHUNK_VALUES.min(count) * width];
        let mut values = Vec::with_capacity(CHUNK_VALUES.min(count));
        let mut done = 0;
        while done < count {
            let n = CHUNK_VALUES.min(count - done);
            let buf = &mut bytes[..n * width];
            self.file
                .read_exact_at(buf, self.data_start + begin + (done * width) as u64)
                .map_err(|e| self.bad(format!("cannot read tensor {name}: {e}")))?;
            values.clear();
            match entry.dtype.as_str() {
                "F32" => values.extend(
                    buf.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                "F16" => values.extend(
                    buf.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                _ => values.extend(
                    buf.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
            sink(&values);
            done += n;
        }
        Ok(())
    }
}
