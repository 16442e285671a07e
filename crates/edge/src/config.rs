//! Agent configuration: a TOML file whose every field is documented here,
//! with command-line flags layered on top by the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// The agent's configuration file, as written by people. Unknown fields are
/// refused so that a typo never silently falls back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Directory for the agent's identity (key, certificates) and SQLite
    /// state. Default: `./strata-edge`.
    pub data_dir: Option<PathBuf>,
    /// The local API.
    #[serde(default)]
    pub local_api: RawLocalApi,
    /// The link to the hub.
    #[serde(default)]
    pub hub: RawHubLink,
    /// Limits of the inference API.
    #[serde(default)]
    pub inference: RawInference,
    /// Insights: what the device derives, keeps and delivers.
    #[serde(default)]
    pub insights: RawInsights,
    /// Model updates from the registry.
    #[serde(default)]
    pub updates: RawUpdates,
    /// The router: which requests run here, go to the hub's macro model,
    /// or are refused.
    #[serde(default)]
    pub router: RawRouter,
    /// Federated learning: the local data this device trains on when a
    /// task invites it.
    #[serde(default)]
    pub federated: RawFederated,
    /// The models this device serves (`[[models]]` tables; see the runtime
    /// catalogue for the fields of each kind). Relative paths are resolved
    /// against the directory of the configuration file.
    #[serde(default)]
    pub models: Vec<runtime::RawModelEntry>,
}

/// `[federated]`: the device's own training data for federated tasks. The
/// data never leaves the device; only model updates do. A task names the
/// data set it trains on; a device without that set declines the round.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederated {
    /// Take part in federated tasks at all. Default: true.
    pub enabled: Option<bool>,
    /// Labelled utterances for intent tasks: JSON lines of
    /// `{"text": "turn on the kitchen light", "intent": "HassTurnOn"}`,
    /// embedded on the device with its sentence-embedding model. Lines
    /// whose intent the task does not know are skipped. Relative to the
    /// configuration file.
    pub intents: Option<PathBuf>,
    /// Sensor readings for shuttle tasks: CSV lines of the task's feature
    /// values, as the model takes them, then the class name
    /// (`normal` or `anomaly`). Relative to the configuration file.
    pub shuttle: Option<PathBuf>,
    /// The embedding model (`id` in `[[models]]`) that turns utterances
    /// into the intent task's inputs. Default: the first `embedding` model.
    pub embedding_model: Option<String>,
}

/// `[federated]`, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FederatedConfig {
    /// See [`RawFederated::enabled`].
    pub enabled: bool,
    /// See [`RawFederated::intents`].
    pub intents: Option<PathBuf>,
    /// See [`RawFederated::shuttle`].
    pub shuttle: Option<PathBuf>,
    /// See [`RawFederated::embedding_model`].
    pub embedding_model: Option<String>,
}

/// `[router]`: how the agent routes chat, completion and embedding
/// requests between its own models and the hub's macro tier.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouter {
    /// A routing policy file (TOML, see the operator guide). Relative to
    /// the configuration file. Default: the built-in policy
    /// (`prefer_local`, personal data stays on the device, cascade on).
    pub policy_file: Option<PathBuf>,
    /// The local chat model answering routed requests. Default: the first
    /// `llm` in `[[models]]`.
    pub chat_model: Option<String>,
    /// The local embedding model answering routed embedding requests.
    /// Default: the first `embedding` model.
    pub embedding_model: Option<String>,
    /// The intent classifier whose labels tell the router that a question
    /// needs fleet-wide data. Default: the first `classifier`.
    pub intent_model: Option<String>,
    /// Longest wait for the macro tier's answer (whole answers) or its
    /// first byte (streams), in milliseconds. Default: 60000.
    pub macro_timeout_ms: Option<u64>,
    /// Longest silence inside a streamed macro answer before the stream is
    /// ended with an error, in milliseconds. Default: 15000.
    pub stream_idle_timeout_ms: Option<u64>,
    /// Completion tokens assumed for latency and cost estimates when a
    /// request sets no `max_tokens`. Default: 256.
    pub default_max_tokens: Option<u32>,
}

/// The validated `[router]` section.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The routing policy (read from [`RawRouter::policy_file`] by the
    /// binary, or the built-in one).
    pub policy: router::Policy,
    /// See [`RawRouter::chat_model`].
    pub chat_model: Option<String>,
    /// See [`RawRouter::embedding_model`].
    pub embedding_model: Option<String>,
    /// See [`RawRouter::intent_model`].
    pub intent_model: Option<String>,
    /// See [`RawRouter::macro_timeout_ms`].
    pub macro_timeout: Duration,
    /// See [`RawRouter::stream_idle_timeout_ms`].
    pub stream_idle_timeout: Duration,
    /// See [`RawRouter::default_max_tokens`].
    pub default_max_tokens: u32,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            policy: router::Policy::default(),
            chat_model: None,
            embedding_model: None,
            intent_model: None,
            macro_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(15),
            default_max_tokens: 256,
        }
    }
}

/// `[inference]`: admission limits of the inference API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    /// Requests served at once across all models. Default: 2.
    pub max_concurrent: Option<usize>,
    /// Requests waiting for a slot; beyond this the API answers 429 with
    /// `Retry-After`. Default: 16.
    pub max_queued: Option<usize>,
    /// Longest a request waits for a slot before 429, in milliseconds.
    /// Default: 30000.
    pub queue_timeout_ms: Option<u64>,
}

/// `[insights]`: the insights the device derives from what it serves, the
/// outbox that keeps them while the hub is out of reach, and their delivery.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInsights {
    /// Length of the windows intents and model health are counted over, in
    /// seconds. Default: 60.
    pub window_secs: Option<u64>,
    /// Bytes of undelivered insights the outbox keeps on disk. When an
    /// insight would exceed it, the lowest-priority, oldest undelivered
    /// insights are dropped (and counted); alerts are never dropped for
    /// lower priorities. Default: 67108864 (64 MiB).
    pub outbox_budget_bytes: Option<u64>,
    /// Most insights sent in one delivery batch. Default: 500.
    pub batch_max: Option<usize>,
    /// An anomaly score at or above this raises an `anomaly` alert.
    /// Default: 0.9.
    pub anomaly_threshold: Option<f64>,
}

/// `[updates]`: how the device installs the model releases rollouts send.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdates {
    /// Seconds a new release serves on trial, watched, before it is
    /// committed; a failed window rolls it back. Default: 60.
    pub health_window_secs: Option<u64>,
    /// Largest fraction of the new release's requests that may fail in
    /// its health window. Default: 0.05.
    pub max_error_rate: Option<f64>,
    /// Cap on download speed, in bytes per second, for devices on metered
    /// or shared links. Default: no cap.
    pub download_rate_bytes_per_sec: Option<u64>,
    /// The registry's `root.json` this device was provisioned with. Default:
    /// the hub's first root, read over the channel the join pinned.
    pub trust_root: Option<PathBuf>,
}

/// `[local_api]`: the HTTP API applications on the device call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalApi {
    /// Address to listen on. Loopback only unless you mean otherwise.
    /// Default: `127.0.0.1:7070`; port 0 picks a free port.
    pub listen: Option<SocketAddr>,
}

/// `[hub]`: how the agent keeps its link to the hub.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHubLink {
    /// Reach the hub at this URL instead of the one in the join token (a
    /// relay, or a hub that moved); its certificate is still checked
    /// against the hub CA. Default: the join token's URL.
    pub url: Option<String>,
    /// Seconds between heartbeats, until the hub asks for another interval.
    /// Default: 10.
    pub heartbeat_interval_secs: Option<u64>,
    /// First reconnect delay after the link drops, in milliseconds; it
    /// doubles on each failure up to `reconnect_max_ms`, with full jitter.
    /// Default: 250.
    pub reconnect_min_ms: Option<u64>,
    /// Longest reconnect delay, in milliseconds. Default: 5000.
    pub reconnect_max_ms: Option<u64>,
    /// Timeout of each request to the hub (not of the event stream), in
    /// seconds. Default: 10.
    pub request_timeout_secs: Option<u64>,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`RawConfig::data_dir`].
    pub data_dir: PathBuf,
    /// See [`RawLocalApi::listen`].
    pub local_api_listen: SocketAddr,
    /// See [`RawHubLink::heartbeat_interval_secs`].
    pub heartbeat_interval: Duration,
    /// See [`RawHubLink::reconnect_min_ms`].
    pub reconnect_min: Duration,
    /// See [`RawHubLink::reconnect_max_ms`].
    pub reconnect_max: Duration,
    /// See [`RawHubLink::request_timeout_secs`].
    pub request_timeout: Duration,
    /// See [`RawHubLink::url`].
    pub hub_url: Option<String>,
    /// See [`RawInference::max_concurrent`].
    pub max_concurrent: usize,
    /// See [`RawInference::max_queued`].
    pub max_queued: usize,
    /// See [`RawInference::queue_timeout_ms`].
    pub queue_timeout: Duration,
    /// The validated model catalogue.
    pub catalogue: runtime::Catalogue,
    /// See [`RawInsights::window_secs`].
    pub insight_window: Duration,
    /// See [`RawInsights::outbox_budget_bytes`].
    pub outbox_budget_bytes: u64,
    /// See [`RawInsights::batch_max`].
    pub insight_batch_max: usize,
    /// See [`RawInsights::anomaly_threshold`].
    pub anomaly_threshold: f64,
    /// See [`RawUpdates`].
    pub updates: crate::updater::UpdateConfig,
    /// See [`RawRouter`].
    pub router: RouterConfig,
    /// See [`RawFederated`].
    pub federated: FederatedConfig,
}

impl RawConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks every field and fills in defaults; relative model paths are
    /// resolved against `base_dir` (the configuration file's directory).
    pub fn validate_in(self, base_dir: &std::path::Path) -> Result<Config, Error> {
        let catalogue = runtime::RawCatalogue {
            models: self.models.clone(),
        }
        .validate(base_dir)
        .map_err(|e| Error::Config(format!("models: {e}")))?;
        let max_concurrent = self.inference.max_concurrent.unwrap_or(2);
        if !(1..=256).contains(&max_concurrent) {
            return Err(Error::Config(format!(
                "inference.max_concurrent must be between 1 and 256, got {max_concurrent}"
            )));
        }
        let mut config = self.clone().validate()?;
        config.max_concurrent = max_concurrent;
        config.max_queued = self.inference.max_queued.unwrap_or(16);
        config.queue_timeout =
            Duration::from_millis(self.inference.queue_timeout_ms.unwrap_or(30_000));
        config.catalogue = catalogue;
        for path in [&mut config.federated.intents, &mut config.federated.shuttle]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
        if let Some(id) = &config.federated.embedding_model
            && !config.catalogue.entries.iter().any(|e| &e.id == id)
        {
            return Err(Error::Config(format!(
                "federated.embedding_model {id:?} is not a model in [[models]]"
            )));
        }
        if let Some(root) = &mut config.updates.trust_root
            && root.is_relative()
        {
            *root = base_dir.join(&*root);
        }
        Ok(config)
    }

    /// Checks every field and fills in defaults, with no models.
    pub fn validate(self) -> Result<Config, Error> {
        let heartbeat = self.hub.heartbeat_interval_secs.unwrap_or(10);
        if !(1..=3600).contains(&heartbeat) {
            return Err(Error::Config(format!(
                "hub.heartbeat_interval_secs must be between 1 and 3600, got {heartbeat}"
            )));
        }
        let min = self.hub.reconnect_min_ms.unwrap_or(250);
        let max = self.hub.reconnect_max_ms.unwrap_or(5000);
        if min == 0 || max < min || max > 600_000 {
            return Err(Error::Config(format!(
                "hub.reconnect_min_ms ({min}) must be at least 1 and at most hub.reconnect_max_ms ({max}), which must be at most 600000"
            )));
        }
        let window = self.insights.window_secs.unwrap_or(60);
        if !(1..=86_400).contains(&window) {
            return Err(Error::Config(format!(
                "insights.window_secs must be between 1 and 86400, got {window}"
            )));
        }
        let budget = self.insights.outbox_budget_bytes.unwrap_or(64 << 20);
        if budget < 64 * 1024 {
            return Err(Error::Config(format!(
                "insights.outbox_budget_bytes must be at least 65536, got {budget}"
            )));
        }
        let batch_max = self.insights.batch_max.unwrap_or(500);
        if !(1..=protocol::insight::MAX_BATCH_INSIGHTS).contains(&batch_max) {
            return Err(Error::Config(format!(
                "insights.batch_max must be between 1 and {}, got {batch_max}",
                protocol::insight::MAX_BATCH_INSIGHTS
            )));
        }
        let threshold = self.insights.anomaly_threshold.unwrap_or(0.9);
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(Error::Config(format!(
                "insights.anomaly_threshold must be in (0, 1], got {threshold}"
            )));
        }
        let window = self.updates.health_window_secs.unwrap_or(60);
        if !(1..=86_400).contains(&window) {
            return Err(Error::Config(format!(
                "updates.health_window_secs must be between 1 and 86400, got {window}"
            )));
        }
        let max_error_rate = self.updates.max_error_rate.unwrap_or(0.05);
        if !(0.0..=1.0).contains(&max_error_rate) {
            return Err(Error::Config(format!(
                "updates.max_error_rate must be between 0 and 1, got {max_error_rate}"
            )));
        }
        if let Some(rate) = self.updates.download_rate_bytes_per_sec
            && rate < 1024
        {
            return Err(Error::Config(format!(
                "updates.download_rate_bytes_per_sec must be at least 1024, got {rate}"
            )));
        }
        let updates = crate::updater::UpdateConfig {
            health_window: Duration::from_secs(window),
            max_error_rate,
            download_rate: self.updates.download_rate_bytes_per_sec,
            trust_root: self.updates.trust_root.clone(),
        };
        let macro_timeout = self.router.macro_timeout_ms.unwrap_or(60_000);
        if !(100..=600_000).contains(&macro_timeout) {
            return Err(Error::Config(format!(
                "router.macro_timeout_ms must be between 100 and 600000, got {macro_timeout}"
            )));
        }
        let idle = self.router.stream_idle_timeout_ms.unwrap_or(15_000);
        if !(100..=600_000).contains(&idle) {
            return Err(Error::Config(format!(
                "router.stream_idle_timeout_ms must be between 100 and 600000, got {idle}"
            )));
        }
        let default_max_tokens = self.router.default_max_tokens.unwrap_or(256);
        if !(1..=65_536).contains(&default_max_tokens) {
            return Err(Error::Config(format!(
                "router.default_max_tokens must be between 1 and 65536, got {default_max_tokens}"
            )));
        }
        let router = RouterConfig {
            policy: router::Policy::default(),
            chat_model: self.router.chat_model.clone(),
            embedding_model: self.router.embedding_model.clone(),
            intent_model: self.router.intent_model.clone(),
            macro_timeout: Duration::from_millis(macro_timeout),
            stream_idle_timeout: Duration::from_millis(idle),
            default_max_tokens,
        };
        let timeout = self.hub.request_timeout_secs.unwrap_or(10);
        if !(1..=300).contains(&timeout) {
            return Err(Error::Config(format!(
                "hub.request_timeout_secs must be between 1 and 300, got {timeout}"
            )));
        }
        Ok(Config {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("strata-edge")),
            local_api_listen: self
                .local_api
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
            heartbeat_interval: Duration::from_secs(heartbeat),
            reconnect_min: Duration::from_millis(min),
            reconnect_max: Duration::from_millis(max),
            request_timeout: Duration::from_secs(timeout),
            hub_url: match self.hub.url {
                Some(url) if !(url.starts_with("https://") && url.len() > 8) => {
                    return Err(Error::Config(format!(
                        "hub.url must be an https:// URL, got {url:?}"
                    )));
                }
                url => url.map(|u| u.trim_end_matches('/').to_owned()),
            },
            max_concurrent: 2,
            max_queued: 16,
            queue_timeout: Duration::from_secs(30),
            catalogue: runtime::Catalogue::default(),
            insight_window: Duration::from_secs(window),
            outbox_budget_bytes: budget,
            insight_batch_max: batch_max,
            anomaly_threshold: threshold,
            updates,
            router,
            federated: FederatedConfig {
                enabled: self.federated.enabled.unwrap_or(true),
                intents: self.federated.intents.clone(),
                shuttle: self.federated.shuttle.clone(),
                embedding_model: self.federated.embedding_model.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../../docs/examples/edge.toml");
        let config = RawConfig::from_toml(text)
            .unwrap()
            .validate_in(std::path::Path::new("/etc/strata"))
            .unwrap();
        assert_eq!(config.local_api_listen.port(), 7070);
        assert_eq!(config.catalogue.entries.len(), 4);
        assert_eq!(config.max_queued, 16);
        assert_eq!(config.reconnect_max, Duration::from_secs(5));
        assert_eq!(config.router.chat_model.as_deref(), Some("smollm2"));
        assert_eq!(config.router.macro_timeout, Duration::from_secs(60));
        assert_eq!(
            config.federated.intents.as_deref(),
            Some(std::path::Path::new("/etc/strata/fl/utterances.jsonl"))
        );
        // The policy file it names is the documented example, which parses.
        let policy = include_str!("../../../docs/examples/policy.toml");
        assert!(router::Policy::from_toml(policy).is_ok());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("colour = 1", "unknown field `colour`"),
            ("[router]\nmacro_timeout_ms = 5", "router.macro_timeout_ms"),
            (
                "[router]\nstream_idle_timeout_ms = 0",
                "router.stream_idle_timeout_ms",
            ),
            (
                "[router]\ndefault_max_tokens = 0",
                "router.default_max_tokens",
            ),
            ("[router]\npolicy = \"x\"", "unknown field `policy`"),
            ("[hub]\nheartbeat = 3", "unknown field `heartbeat`"),
            (
                "[hub]\nheartbeat_interval_secs = 0",
                "heartbeat_interval_secs",
            ),
            (
                "[hub]\nreconnect_min_ms = 10\nreconnect_max_ms = 5",
                "reconnect_min_ms",
            ),
            ("[local_api]\nlisten = \"x\"", "listen"),
            ("[insights]\nwindow_secs = 0", "window_secs"),
            (
                "[insights]\noutbox_budget_bytes = 10",
                "outbox_budget_bytes",
            ),
            ("[insights]\nbatch_max = 5000", "batch_max"),
            ("[insights]\nanomaly_threshold = 1.5", "anomaly_threshold"),
            ("[updates]\nhealth_window_secs = 0", "health_window_secs"),
            ("[updates]\nmax_error_rate = 2", "max_error_rate"),
            (
                "[updates]\ndownload_rate_bytes_per_sec = 5",
                "download_rate_bytes_per_sec",
            ),
            (
                "[federated]\nembedding_model = \"nope\"",
                "federated.embedding_model",
            ),
            ("[federated]\ndata = \"x\"", "unknown field `data`"),
        ];
        for (text, needle) in cases {
            let err = RawConfig::from_toml(text)
                .and_then(|c| c.validate_in(std::path::Path::new("/etc/strata")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
