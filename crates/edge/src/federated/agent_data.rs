//! The agent's own training data, as `[federated]` in its configuration
//! names it: labelled utterances embedded with the device's embedding model,
//! and sensor readings. Read when a task first asks for them and kept for
//! as long as the task's labels and model shape stay the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use federated::model::{Dataset, ModelSpec};
use protocol::federated::FlDataset;
use serde::Deserialize;

use super::LocalData;

/// One line of an intents file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Utterance {
    text: String,
    intent: String,
}

/// Most examples read from one local file.
const MAX_EXAMPLES: usize = 100_000;

/// (data set, inputs, labels): what a read of the local data depends on.
type CacheKey = (FlDataset, usize, Vec<String>);

/// The agent's local data sets.
pub struct AgentData {
    intents: Option<PathBuf>,
    shuttle: Option<PathBuf>,
    embedder: Option<Arc<runtime::Embedder>>,
    cache: Mutex<HashMap<CacheKey, Arc<Dataset>>>,
}

impl std::fmt::Debug for AgentData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentData")
            .field("intents", &self.intents)
            .field("shuttle", &self.shuttle)
            .field("embedder", &self.embedder.is_some())
            .finish()
    }
}

impl AgentData {
    /// The data sets `config` names; utterances are embedded with
    /// `embedder`.
    pub fn new(
        config: &crate::config::FederatedConfig,
        embedder: Option<Arc<runtime::Embedder>>,
    ) -> Self {
        AgentData {
            intents: config.intents.clone(),
            shuttle: config.shuttle.clone(),
            embedder,
            cache: Mutex::default(),
        }
    }

    /// Whether no data set is configured.
    pub fn is_empty(&self) -> bool {
        self.intents.is_none() && self.shuttle.is_none()
    }

    fn load(
        &self,
        dataset: FlDataset,
        model: &ModelSpec,
        labels: &[String],
    ) -> Result<Dataset, String> {
        let class = |name: &str| labels.iter().position(|l| l == name).map(|i| i as u32);
        match dataset {
            FlDataset::Intents => {
                let path = self.intents.as_deref().ok_or("no intents file")?;
                let embedder = self
                    .embedder
                    .as_ref()
                    .ok_or("no embedding model is loaded")?;
                let text = read(path)?;
                let mut texts = Vec::new();
                let mut classes = Vec::new();
                for (n, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let u: Utterance = serde_json::from_str(line)
                        .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
                    if let Some(c) = class(&u.intent) {
                        texts.push(u.text);
                        classes.push(c);
                    }
                    if texts.len() >= MAX_EXAMPLES {
                        break;
                    }
                }
                let mut data = Dataset::new(model.inputs);
                for (chunk, cs) in texts.chunks(64).zip(classes.chunks(64)) {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    let vectors = embedder.embed(&refs).map_err(|e| e.to_string())?;
                    for (v, &c) in vectors.iter().zip(cs) {
                        data.push(v, c).map_err(|e| {
                            format!("the embedding model does not fit the task: {e}")
                        })?;
                    }
                }
                Ok(data)
            }
            FlDataset::Shuttle => {
                let path = self.shuttle.as_deref().ok_or("no shuttle file")?;
                let text = read(path)?;
                let mut data = Dataset::new(model.inputs);
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let at =
                        |reason: String| format!("{} line {}: {reason}", path.display(), n + 1);
                    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
                    let Some((label, values)) = fields.split_last() else {
                        continue;
                    };
                    let x = values
                        .iter()
                        .map(|v| v.parse::<f32>().ok().filter(|v| v.is_finite()))
                        .collect::<Option<Vec<f32>>>()
                        .ok_or_else(|| at("a feature is not a finite number".to_owned()))?;
                    if let Some(c) = class(label) {
                        data.push(&x, c).map_err(|e| at(e.to_string()))?;
                    }
                    if data.len() >= MAX_EXAMPLES {
                        break;
                    }
                }
                Ok(data)
            }
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

impl LocalData for AgentData {
    fn dataset(
        &self,
        dataset: FlDataset,
        model: &ModelSpec,
        labels: &[String],
    ) -> Option<Arc<Dataset>> {
        let key = (dataset, model.inputs, labels.to_vec());
        if let Some(d) = self.cache.lock().ok()?.get(&key) {
            return Some(Arc::clone(d));
        }
        match self.load(dataset, model, labels) {
            Ok(d) if !d.is_empty() => {
                let d = Arc::new(d);
                tracing::info!(
                    dataset = dataset.as_str(),
                    examples = d.len(),
                    "local training data read"
                );
                self.cache.lock().ok()?.insert(key, Arc::clone(&d));
                Some(d)
            }
            Ok(_) => {
                tracing::warn!(
                    dataset = dataset.as_str(),
                    "no local example has one of the task's labels"
                );
                None
            }
            Err(e) => {
                tracing::warn!(dataset = dataset.as_str(), error = %e, "local training data unusable");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["normal".to_owned(), "anomaly".to_owned()]
    }

    #[test]
    fn shuttle_lines_map_to_the_tasks_classes_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        std::fs::write(
            &path,
            "# features then class\n0.5,1,anomaly\n-1,2,normal\n3,3,other\n",
        )
        .unwrap();
        let config = crate::config::FederatedConfig {
            enabled: true,
            shuttle: Some(path.clone()),
            ..Default::default()
        };
        let data = AgentData::new(&config, None);
        let model = ModelSpec {
            inputs: 2,
            hidden: 0,
            classes: 2,
        };
        let d = data.dataset(FlDataset::Shuttle, &model, &labels()).unwrap();
        assert_eq!(d.labels, [1, 0]);
        assert_eq!(d.features, [0.5, 1.0, -1.0, 2.0]);
        // No intents file, no embedder: the device declines.
        assert!(
            data.dataset(FlDataset::Intents, &model, &labels())
                .is_none()
        );

        std::fs::write(&path, "0.5,x,anomaly\n").unwrap();
        let fresh = AgentData::new(&config, None);
        let err = fresh
            .load(FlDataset::Shuttle, &model, &labels())
            .unwrap_err();
        assert!(err.contains("line 1") && err.contains("finite"), "{err}");
        // A row of the wrong width is refused, not truncated.
        std::fs::write(&path, "0.5,1,2,anomaly\n").unwrap();
        let err = fresh
            .load(FlDataset::Shuttle, &model, &labels())
            .unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
