//! Classifier heads over sentence embeddings, and the text classifier that
//! pairs one with an embedding model.
//!
//! A [`ClassifierHead`] is softmax regression (`hidden = 0`) or a
//! one-hidden-layer ReLU network. It is trained with candle's autograd and
//! AdamW, full-precision on the CPU; weights are initialised and mini-batches
//! shuffled from a seeded ChaCha stream, so the same data and seed give the
//! same head.
//!
//! # File format
//!
//! A head is one safetensors file. Tensors (all `F32`):
//! `hidden.weight` `[hidden, input_dim]` and `hidden.bias` `[hidden]` (only
//! when there is a hidden layer), `output.weight` `[labels, hidden or
//! input_dim]` and `output.bias` `[labels]`. The header's `__metadata__`
//! holds `format` = `strata-classifier-head`, `version` = `1`, `activation` =
//! `relu`, and `labels`: a JSON array of the label strings, in the order of
//! the output rows.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{ModelBackend, ModelInfo, ModelKind, Prediction, TextClassifier};
use crate::embedding::Embedder;
use crate::error::{Error, Result};

/// The `format` value in a head file's metadata.
pub const HEAD_FORMAT: &str = "strata-classifier-head";

/// How a head is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Width of the hidden layer; 0 trains softmax regression. Default 128.
    pub hidden: usize,
    /// Passes over the training data. Default 40.
    pub epochs: usize,
    /// AdamW learning rate. Default 0.005.
    pub learning_rate: f64,
    /// AdamW weight decay. Default 0.0001.
    pub weight_decay: f64,
    /// Examples per gradient step. Default 32.
    pub batch_size: usize,
    /// Seed for initialisation and shuffling. Default 42.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            hidden: 128,
            epochs: 40,
            learning_rate: 0.005,
            weight_decay: 1e-4,
            batch_size: 32,
            seed: 42,
        }
    }
}

/// A trained classifier head: embeddings in, label probabilities out.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    labels: Vec<String>,
    input_dim: usize,
    hidden: Option<(Tensor, Tensor)>,
    output: (Tensor, Tensor),
}

fn training_err(reason: impl Into<String>) -> Error {
    Error::Training {
        what: "classifier head".to_owned(),
        reason: reason.into(),
    }
}

/// A `[rows, cols]` tensor of uniform values in ±1/√fan_in (PyTorch's default
/// for linear layers), drawn from `rng`.
fn uniform(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    fan_in: usize,
) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    if rows == 1 {
        Tensor::from_vec(values, cols, &Device::Cpu)
    } else {
        Tensor::from_vec(values, (rows, cols), &Device::Cpu)
    }
}

impl ClassifierHead {
    /// Trains a head on embeddings `x` with class indices `y` into `labels`.
    pub fn train(
        x: &[Vec<f32>],
        y: &[usize],
        labels: Vec<String>,
        config: &TrainConfig,
    ) -> Result<ClassifierHead> {
        if x.is_empty() || x.len() != y.len() {
            return Err(training_err(format!(
                "{} embeddings and {} labels: need the same, non-zero number",
                x.len(),
                y.len()
            )));
        }
        if labels.len() < 2 {
            return Err(training_err("need at least two labels"));
        }
        if let Some(&bad) = y.iter().find(|&&c| c >= labels.len()) {
            return Err(training_err(format!(
                "class index {bad} is outside the {} labels",
                labels.len()
            )));
        }
        let dim = x[0].len();
        if dim == 0 || x.iter().any(|v| v.len() != dim) {
            return Err(training_err(
                "embeddings must all have the same, non-zero length",
            ));
        }
        Self::train_inner(x, y, labels, dim, config)
            .map_err(Error::tensor("training classifier head"))
    }

    fn train_inner(
        x: &[Vec<f32>],
        y: &[usize],
        labels: Vec<String>,
        dim: usize,
        config: &TrainConfig,
    ) -> candle_core::Result<ClassifierHead> {
        let dev = Device::Cpu;
        let n = x.len();
        let n_labels = labels.len();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let xs = Tensor::from_vec(x.concat(), (n, dim), &dev)?;
        let ys = Tensor::from_vec(y.iter().map(|&c| c as u32).collect::<Vec<_>>(), n, &dev)?;

        let hidden = if config.hidden > 0 {
            let w = Var::from_tensor(&uniform(&mut rng, config.hidden, dim, dim)?)?;
            let b = Var::from_tensor(&uniform(&mut rng, 1, config.hidden, dim)?)?;
            Some((w, b))
        } else {
            None
        };
        let out_in = if config.hidden > 0 {
            config.hidden
        } else {
            dim
        };
        let ow = Var::from_tensor(&uniform(&mut rng, n_labels, out_in, out_in)?)?;
        let ob = Var::from_tensor(&uniform(&mut rng, 1, n_labels, out_in)?)?;

        let mut vars = vec![ow.clone(), ob.clone()];
        if let Some((w, b)) = &hidden {
            vars.push(w.clone());
            vars.push(b.clone());
        }
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: config.learning_rate,
                weight_decay: config.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        for _ in 0..config.epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(config.batch_size.max(1)) {
                let idx = Tensor::from_slice(chunk, chunk.len(), &dev)?;
                let xb = xs.index_select(&idx, 0)?;
                let yb = ys.index_select(&idx, 0)?;
                let logits = forward(
                    &xb,
                    hidden.as_ref().map(|(w, b)| (w.as_tensor(), b.as_tensor())),
                    (ow.as_tensor(), ob.as_tensor()),
                )?;
                let loss = candle_nn::loss::cross_entropy(&logits, &yb)?;
                opt.backward_step(&loss)?;
            }
        }
        Ok(ClassifierHead {
            labels,
            input_dim: dim,
            hidden: hidden.map(|(w, b)| (w.as_tensor().detach(), b.as_tensor().detach())),
            output: (ow.as_tensor().detach(), ob.as_tensor().detach()),
        })
    }

    /// The labels, in the order of the probabilities.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The same weights under other label names (one per output, in order):
    /// to rename classes, or to build a release whose labels are wrong on
    /// purpose, as rollout drills do.
    pub fn relabel(mut self, labels: Vec<String>) -> Result<ClassifierHead> {
        if labels.len() != self.labels.len() {
            return Err(training_err(format!(
                "{} labels given for a head with {} outputs",
                labels.len(),
                self.labels.len()
            )));
        }
        self.labels = labels;
        Ok(self)
    }

    /// Length of the embeddings the head takes.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Width of the hidden layer (0 for softmax regression).
    pub fn hidden_width(&self) -> usize {
        self.hidden.as_ref().map_or(0, |(w, _)| w.dims()[0])
    }

    /// Label probabilities for each embedding.
    pub fn predict_proba(&self, x: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(v) = x.iter().find(|v| v.len() != self.input_dim) {
            return Err(Error::FeatureCount {
                what: "classifier head".to_owned(),
                expected: self.input_dim,
                got: v.len(),
            });
        }
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let xs = Tensor::from_vec(x.concat(), (x.len(), self.input_dim), &Device::Cpu)?;
            let logits = forward(
                &xs,
                self.hidden.as_ref().map(|(w, b)| (w, b)),
                (&self.output.0, &self.output.1),
            )?;
            candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()
        };
        run().map_err(Error::tensor("running classifier head"))
    }

    /// The most probable label for each embedding, with all probabilities.
    pub fn predict(&self, x: &[Vec<f32>]) -> Result<Vec<Prediction>> {
        Ok(self
            .predict_proba(x)?
            .into_iter()
            .map(|probabilities| {
                let best = probabilities
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                Prediction {
                    label: self.labels.get(best).cloned().unwrap_or_default(),
                    confidence: probabilities.get(best).copied().unwrap_or(0.0),
                    probabilities,
                }
            })
            .collect())
    }

    /// Saves the head as a safetensors file (see the module docs for the layout).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(&str, &Tensor)> = vec![
            ("output.weight", &self.output.0),
            ("output.bias", &self.output.1),
        ];
        if let Some((w, b)) = &self.hidden {
            tensors.push(("hidden.weight", w));
            tensors.push(("hidden.bias", b));
        }
        let mut owned = Vec::new();
        for (name, t) in tensors {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(Error::tensor(format!("reading tensor {name}")))?;
            owned.push((name, t.dims().to_vec(), values));
        }
        write_head(
            path,
            &self.labels,
            owned.iter().map(|(n, s, v)| (*n, s.clone(), v.as_slice())),
        )
    }

    /// Loads a head saved by [`ClassifierHead::save`].
    pub fn load(path: &Path) -> Result<ClassifierHead> {
        let err = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(HEAD_FORMAT) {
            return Err(err(format!("metadata format is not {HEAD_FORMAT:?}")));
        }
        if meta.get("version").map(String::as_str) != Some("1") {
            return Err(err("metadata version is not \"1\"".to_owned()));
        }
        let labels: Vec<String> = meta
            .get("labels")
            .ok_or_else(|| err("metadata has no labels".to_owned()))
            .and_then(|l| {
                serde_json::from_str(l)
                    .map_err(|e| err(format!("labels are not a json string array: {e}")))
            })?;

        let tensor = |name: &str, dims: usize| -> Result<Option<Tensor>> {
            let view = match st.tensor(name) {
                Ok(v) => v,
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
                Err(e) => return Err(err(format!("tensor {name}: {e}"))),
            };
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != dims {
                return Err(err(format!(
                    "tensor {name} must be f32 with {dims} dimensions"
                )));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(values, view.shape(), &Device::Cpu)
                .map(Some)
                .map_err(Error::tensor(format!("loading tensor {name}")))
        };
        let missing = |name: &str| err(format!("tensor {name} is missing"));
        let ow = tensor("output.weight", 2)?.ok_or_else(|| missing("output.weight"))?;
        let ob = tensor("output.bias", 1)?.ok_or_else(|| missing("output.bias"))?;
        let hidden = match (tensor("hidden.weight", 2)?, tensor("hidden.bias", 1)?) {
            (Some(w), Some(b)) => Some((w, b)),
            (None, None) => None,
            _ => {
                return Err(err(
                    "hidden.weight and hidden.bias must come together".to_owned()
                ));
            }
        };
        let (n_out, out_in) = (ow.dims()[0], ow.dims()[1]);
        if n_out != labels.len() || ob.dims()[0] != n_out {
            return Err(err(format!(
                "{} labels but output layer has {n_out} rows",
                labels.len()
            )));
        }
        let input_dim = match &hidden {
            Some((w, b)) => {
                if w.dims()[0] != out_in || b.dims()[0] != out_in {
                    return Err(err(
                        "hidden layer width does not match output layer".to_owned()
                    ));
                }
                w.dims()[1]
            }
            None => out_in,
        };
        Ok(ClassifierHead {
            labels,
            input_dim,
            hidden,
            output: (ow, ob),
        })
    }
}

/// Writes a head file from its tensors, `(name, shape, values)` in the
/// layout of the module docs, with `labels` in its metadata. Heads trained
/// elsewhere (a federated task's model) are written with this;
/// [`ClassifierHead::load`] checks the shapes when the file is read.
pub fn write_head<'a>(
    path: &Path,
    labels: &[String],
    tensors: impl IntoIterator<Item = (&'a str, Vec<usize>, &'a [f32])>,
) -> Result<()> {
    let write_err = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_owned(), shape, bytes)
        })
        .collect();
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let labels = serde_json::to_string(labels).map_err(|e| write_err(e.to_string()))?;
    let metadata = HashMap::from([
        ("format".to_owned(), HEAD_FORMAT.to_owned()),
        ("version".to_owned(), "1".to_owned()),
        ("activation".to_owned(), "relu".to_owned()),
        ("labels".to_owned(), labels),
    ]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The head's forward pass: logits for a `[n, input_dim]` batch.
fn forward(
    x: &Tensor,
    hidden: Option<(&Tensor, &Tensor)>,
    output: (&Tensor, &Tensor),
) -> candle_core::Result<Tensor> {
    let x = match hidden {
        Some((w, b)) => x.matmul(&w.t()?)?.broadcast_add(b)?.relu()?,
        None => x.clone(),
    };
    x.matmul(&output.0.t()?)?.broadcast_add(output.1)
}

/// Accuracy of a head on embeddings with known classes, in [0, 1].
pub fn accuracy(head: &ClassifierHead, x: &[Vec<f32>], y: &[usize]) -> Result<f64> {
    if x.is_empty() {
        return Ok(0.0);
    }
    let probs = head.predict_proba(x)?;
    let correct = probs
        .iter()
        .zip(y)
        .filter(|(p, c)| argmax(p) == Some(**c))
        .count();
    Ok(correct as f64 / x.len() as f64)
}

/// A text classifier: an embedding model followed by a classifier head.
pub struct EmbeddingClassifier {
    info: ModelInfo,
    embedder: Arc<Embedder>,
    head: ClassifierHead,
}

impl std::fmt::Debug for EmbeddingClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingClassifier")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl EmbeddingClassifier {
    /// Pairs a head loaded from `path` with an embedding model.
    pub fn load(id: &str, path: &Path, embedder: Arc<Embedder>) -> Result<EmbeddingClassifier> {
        let head = ClassifierHead::load(path)?;
        Self::new(id, Some(path), head, embedder)
    }

    /// Pairs a head with an embedding model; their dimensions must agree.
    pub fn new(
        id: &str,
        path: Option<&Path>,
        head: ClassifierHead,
        embedder: Arc<Embedder>,
    ) -> Result<Self> {
        if head.input_dim() != embedder.dimension() {
            return Err(Error::FeatureCount {
                what: format!("classifier head of {id}"),
                expected: head.input_dim(),
                got: embedder.dimension(),
            });
        }
        let hidden = head.hidden_width();
        let n_labels = head.labels().len();
        let params = if hidden > 0 {
            hidden * head.input_dim() + hidden + n_labels * hidden + n_labels
        } else {
            n_labels * head.input_dim() + n_labels
        };
        let info = ModelInfo {
            id: id.to_owned(),
            kind: ModelKind::Classifier,
            path: path.map(Path::to_path_buf),
            name: None,
            architecture: if hidden > 0 {
                "mlp"
            } else {
                "softmax-regression"
            }
            .to_owned(),
            parameter_count: Some(params as u64),
            size_bytes: path
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.len()),
            context_length: embedder.info().context_length,
            output_dim: Some(n_labels),
        };
        Ok(EmbeddingClassifier {
            info,
            embedder,
            head,
        })
    }

    /// The head.
    pub fn head(&self) -> &ClassifierHead {
        &self.head
    }
}

impl TextClassifier for EmbeddingClassifier {
    fn classify(&self, texts: &[&str]) -> Result<Vec<Prediction>> {
        let x = self.embedder.embed(texts)?;
        self.head.predict(&x)
    }

    fn labels(&self) -> &[String] {
        self.head.labels()
    }
}

impl ModelBackend for EmbeddingClassifier {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn as_classifier(&self) -> Option<&dyn TextClassifier> {
        Some(self)
    }
}

/// Index of the largest value (used by callers that work with raw probabilities).
pub fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated clusters in 8 dimensions.
    fn blobs(seed: u64, per_class: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for c in 0..3 {
            for _ in 0..per_class {
                let v: Vec<f32> = (0..8)
                    .map(|d| if d == c { 1.0 } else { 0.0 } + rng.random_range(-0.3f32..0.3))
                    .collect();
                x.push(v);
                y.push(c);
            }
        }
        (x, y)
    }

    fn labels() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn learns_separable_data_deterministically_and_round_trips() {
        let (x, y) = blobs(1, 30);
        let (tx, ty) = blobs(2, 10);
        for hidden in [0, 16] {
            let config = TrainConfig {
                hidden,
                epochs: 30,
                learning_rate: 0.02,
                ..TrainConfig::default()
            };
            let head = ClassifierHead::train(&x, &y, labels(), &config).expect("trains");
            let again = ClassifierHead::train(&x, &y, labels(), &config).expect("trains");
            let p1 = head.predict_proba(&tx).expect("predicts");
            assert_eq!(
                p1,
                again.predict_proba(&tx).expect("predicts"),
                "same seed, same head"
            );
            let acc = accuracy(&head, &tx, &ty).expect("evaluates");
            assert!(acc > 0.95, "hidden {hidden}: accuracy {acc}");

            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("head.safetensors");
            head.save(&path).expect("saves");
            let loaded = ClassifierHead::load(&path).expect("loads");
            assert_eq!(loaded.labels(), head.labels());
            assert_eq!(loaded.hidden_width(), hidden);
            assert_eq!(loaded.predict_proba(&tx).expect("predicts"), p1);
        }
    }

    #[test]
    fn rejects_bad_training_input() {
        let x = vec![vec![0.0f32; 4]; 3];
        assert!(ClassifierHead::train(&x, &[0, 1], labels(), &TrainConfig::default()).is_err());
        assert!(ClassifierHead::train(&x, &[0, 1, 5], labels(), &TrainConfig::default()).is_err());
        assert!(
            ClassifierHead::train(&x, &[0, 0, 0], vec!["only".into()], &TrainConfig::default())
                .is_err()
        );
    }

    #[test]
    fn load_rejects_a_foreign_safetensors_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("other.safetensors");
        let data = vec![0u8; 8];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data)
            .expect("view");
        let bytes = safetensors::serialize([("w", view)], None).expect("serialises");
        std::fs::write(&path, bytes).expect("writes");
        let err = ClassifierHead::load(&path).unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
        let err = ClassifierHead::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
