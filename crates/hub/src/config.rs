//! Hub configuration: a TOML file whose every field is documented here, with
//! command-line flags layered on top by the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// The hub's configuration file, as written by people. Unknown fields are
/// refused so that a typo never silently falls back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Directory for the hub's state: SQLite database, CA and server
    /// certificates. Created on first start. Default: `./strata-hub`.
    pub data_dir: Option<PathBuf>,
    /// Address the HTTPS API listens on. Default: `0.0.0.0:7443`.
    pub listen: Option<SocketAddr>,
    /// Base URL devices use to reach the hub, embedded in join tokens.
    /// Default: `https://<listen address>`, with `127.0.0.1` for an
    /// unspecified listen address.
    pub advertise_url: Option<String>,
    /// Extra DNS names or IP addresses for the hub's server certificate
    /// (`localhost`, `127.0.0.1`, `::1` and the advertised host are always in it).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// Seconds between device heartbeats that the hub asks for. Default: 10.
    pub heartbeat_interval_secs: Option<u64>,
    /// Days a device certificate is valid. Default: 365.
    pub device_cert_validity_days: Option<u32>,
    /// Default lifetime of a join token in seconds. Default: 3600.
    pub default_token_ttl_secs: Option<u64>,
    /// Longest time in milliseconds between two checks of every live
    /// rollout (device reports and operator actions trigger one at once).
    /// Default: 1000.
    pub rollout_interval_ms: Option<u64>,
    /// The macro tier devices reach for what their own models cannot do.
    #[serde(default, rename = "macro")]
    pub macro_tier: RawMacro,
}

/// `[macro]`: the hub's macro tier, OpenAI-compatible `/v1/chat/completions`
/// and `/v1/embeddings` for enrolled devices (and the operator). Served by
/// models the hub runs itself (`[[macro.models]]`) or by an upstream
/// OpenAI-compatible service (`upstream_url`); with neither, the hub has
/// no macro tier.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMacro {
    /// Models the hub runs, with the same fields as the agent's
    /// `[[models]]`. Relative paths are resolved against the configuration
    /// file's directory.
    #[serde(default)]
    pub models: Vec<runtime::RawModelEntry>,
    /// The chat model among `models`. Default: the first `llm`.
    pub chat_model: Option<String>,
    /// The embedding model among `models`. Default: the first `embedding`.
    pub embedding_model: Option<String>,
    /// Base URL of an upstream OpenAI-compatible API (for example
    /// `https://api.openai.com/v1`); requests go to
    /// `<url>/chat/completions` and `<url>/embeddings`. Exclusive with
    /// `models`.
    pub upstream_url: Option<String>,
    /// Name of the environment variable holding the upstream API key
    /// (sent as `Authorization: Bearer`). The key itself never goes in
    /// this file.
    pub upstream_api_key_env: Option<String>,
    /// The upstream chat model's name.
    pub upstream_chat_model: Option<String>,
    /// The upstream embedding model's name.
    pub upstream_embedding_model: Option<String>,
    /// The upstream chat model's context length in tokens. Default: 8192.
    pub upstream_context_tokens: Option<u32>,
    /// Whether the upstream chat model takes tools. Default: true.
    pub upstream_supports_tools: Option<bool>,
    /// Longest wait for the upstream's whole answer or first byte of a
    /// stream (and longest silence inside one), in ms. Default: 30000.
    pub upstream_timeout_ms: Option<u64>,
    /// Consecutive upstream failures (errors, 5xx, timeouts) that open the
    /// circuit breaker. Default: 3.
    pub breaker_failures: Option<u32>,
    /// How long the open breaker refuses before letting one probe through,
    /// in ms. Default: 10000.
    pub breaker_open_ms: Option<u64>,
    /// Requests the hub's own models serve at once. Default: 1.
    pub max_concurrent: Option<usize>,
    /// Requests waiting for them; beyond this, 429. Default: 32.
    pub max_queued: Option<usize>,
}

/// The upstream OpenAI-compatible service of the macro tier.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL, without a trailing slash.
    pub url: String,
    /// See [`RawMacro::upstream_api_key_env`].
    pub api_key_env: Option<String>,
    /// The key, read from that variable by the binary.
    pub api_key: Option<String>,
    /// See [`RawMacro::upstream_chat_model`].
    pub chat_model: Option<String>,
    /// See [`RawMacro::upstream_embedding_model`].
    pub embedding_model: Option<String>,
    /// See [`RawMacro::upstream_context_tokens`].
    pub context_tokens: u32,
    /// See [`RawMacro::upstream_supports_tools`].
    pub supports_tools: bool,
    /// See [`RawMacro::upstream_timeout_ms`].
    pub timeout: Duration,
}

/// The validated `[macro]` section.
#[derive(Debug, Clone, Default)]
pub struct MacroConfig {
    /// Models the hub runs.
    pub catalogue: runtime::Catalogue,
    /// See [`RawMacro::chat_model`].
    pub chat_model: Option<String>,
    /// See [`RawMacro::embedding_model`].
    pub embedding_model: Option<String>,
    /// The upstream service, if configured.
    pub upstream: Option<UpstreamConfig>,
    /// The upstream circuit breaker.
    pub breaker: router::BreakerPolicy,
    /// See [`RawMacro::max_concurrent`].
    pub max_concurrent: usize,
    /// See [`RawMacro::max_queued`].
    pub max_queued: usize,
}

impl RawMacro {
    fn validate(&self, base_dir: &std::path::Path) -> Result<MacroConfig, Error> {
        let bad = |m: String| Error::Config(format!("macro.{m}"));
        let catalogue = runtime::RawCatalogue {
            models: self.models.clone(),
        }
        .validate(base_dir)
        .map_err(|e| bad(format!("models: {e}")))?;
        let first = |kind: runtime::ModelKind| {
            catalogue
                .entries
                .iter()
                .find(|e| e.spec.kind() == kind)
                .map(|e| e.id.clone())
        };
        let pick = |named: &Option<String>, kind: runtime::ModelKind, field: &str| match named {
            Some(id) => match catalogue.entries.iter().find(|e| &e.id == id) {
                Some(e) if e.spec.kind() == kind => Ok(Some(id.clone())),
                Some(_) => Err(bad(format!("{field}: model {id:?} is not of kind {kind}"))),
                None => Err(bad(format!("{field}: no model {id:?} in [[macro.models]]"))),
            },
            None => Ok(first(kind)),
        };
        let chat_model = pick(&self.chat_model, runtime::ModelKind::Llm, "chat_model")?;
        let embedding_model = pick(
            &self.embedding_model,
            runtime::ModelKind::Embedding,
            "embedding_model",
        )?;
        let upstream = match &self.upstream_url {
            None => None,
            Some(url) => {
                if !catalogue.entries.is_empty() {
                    return Err(bad(
                        "upstream_url: set either [[macro.models]] or upstream_url, not both"
                            .into(),
                    ));
                }
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(bad(format!(
                        "upstream_url must be an http:// or https:// URL, got {url:?}"
                    )));
                }
                if self.upstream_chat_model.is_none() && self.upstream_embedding_model.is_none() {
                    return Err(bad(
                        "upstream_url: name upstream_chat_model or upstream_embedding_model".into(),
                    ));
                }
                let timeout = self.upstream_timeout_ms.unwrap_or(30_000);
                if !(100..=600_000).contains(&timeout) {
                    return Err(bad(format!(
                        "upstream_timeout_ms must be between 100 and 600000, got {timeout}"
                    )));
                }
                Some(UpstreamConfig {
                    url: url.trim_end_matches('/').to_owned(),
                    api_key_env: self.upstream_api_key_env.clone(),
                    api_key: None,
                    chat_model: self.upstream_chat_model.clone(),
                    embedding_model: self.upstream_embedding_model.clone(),
                    context_tokens: self.upstream_context_tokens.unwrap_or(8192),
                    supports_tools: self.upstream_supports_tools.unwrap_or(true),
                    timeout: Duration::from_millis(timeout),
                })
            }
        };
        let failures = self.breaker_failures.unwrap_or(3);
        if !(1..=1000).contains(&failures) {
            return Err(bad(format!(
                "breaker_failures must be between 1 and 1000, got {failures}"
            )));
        }
        let open_ms = self.breaker_open_ms.unwrap_or(10_000);
        if !(10..=3_600_000).contains(&open_ms) {
            return Err(bad(format!(
                "breaker_open_ms must be between 10 and 3600000, got {open_ms}"
            )));
        }
        let max_concurrent = self.max_concurrent.unwrap_or(1);
        if !(1..=64).contains(&max_concurrent) {
            return Err(bad(format!(
                "max_concurrent must be between 1 and 64, got {max_concurrent}"
            )));
        }
        Ok(MacroConfig {
            catalogue,
            chat_model,
            embedding_model,
            upstream,
            breaker: router::BreakerPolicy {
                failures_to_open: failures,
                open_ms,
            },
            max_concurrent,
            max_queued: self.max_queued.unwrap_or(32),
        })
    }
}

/// Validated hub configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`RawConfig::data_dir`].
    pub data_dir: PathBuf,
    /// See [`RawConfig::listen`].
    pub listen: SocketAddr,
    /// See [`RawConfig::advertise_url`]; `None` means derive from the bound address.
    pub advertise_url: Option<String>,
    /// See [`RawConfig::server_names`].
    pub server_names: Vec<String>,
    /// See [`RawConfig::heartbeat_interval_secs`].
    pub heartbeat_interval: Duration,
    /// See [`RawConfig::device_cert_validity_days`].
    pub device_cert_validity: time::Duration,
    /// See [`RawConfig::default_token_ttl_secs`].
    pub default_token_ttl: Duration,
    /// See [`RawConfig::rollout_interval_ms`].
    pub rollout_interval: Duration,
    /// See [`RawMacro`].
    pub macro_tier: MacroConfig,
}

/// Longest join-token lifetime the hub accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl RawConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks every field and fills in defaults; relative model paths are
    /// resolved against the current directory.
    pub fn validate(self) -> Result<Config, Error> {
        self.validate_in(std::path::Path::new("."))
    }

    /// Checks every field and fills in defaults; relative model paths are
    /// resolved against `base_dir` (the configuration file's directory).
    pub fn validate_in(self, base_dir: &std::path::Path) -> Result<Config, Error> {
        let macro_tier = self.macro_tier.validate(base_dir)?;
        let heartbeat = self.heartbeat_interval_secs.unwrap_or(10);
        if !(1..=3600).contains(&heartbeat) {
            return Err(Error::Config(format!(
                "heartbeat_interval_secs must be between 1 and 3600, got {heartbeat}"
            )));
        }
        let validity = self.device_cert_validity_days.unwrap_or(365);
        if !(1..=3650).contains(&validity) {
            return Err(Error::Config(format!(
                "device_cert_validity_days must be between 1 and 3650, got {validity}"
            )));
        }
        let ttl = Duration::from_secs(self.default_token_ttl_secs.unwrap_or(3600));
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Error::Config(format!(
                "default_token_ttl_secs must be between 1 and {}, got {}",
                MAX_TOKEN_TTL.as_secs(),
                ttl.as_secs()
            )));
        }
        let rollout_interval = self.rollout_interval_ms.unwrap_or(1000);
        if !(10..=600_000).contains(&rollout_interval) {
            return Err(Error::Config(format!(
                "rollout_interval_ms must be between 10 and 600000, got {rollout_interval}"
            )));
        }
        if let Some(url) = &self.advertise_url
            && !url.starts_with("https://")
        {
            return Err(Error::Config(format!(
                "advertise_url must start with https://, got {url:?}"
            )));
        }
        Ok(Config {
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("strata-hub")),
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7443))),
            advertise_url: self
                .advertise_url
                .map(|u| u.trim_end_matches('/').to_owned()),
            server_names: self.server_names,
            heartbeat_interval: Duration::from_secs(heartbeat),
            device_cert_validity: time::Duration::days(i64::from(validity)),
            default_token_ttl: ttl,
            rollout_interval: Duration::from_millis(rollout_interval),
            macro_tier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../../docs/examples/hub.toml");
        let config = RawConfig::from_toml(text).unwrap().validate().unwrap();
        assert_eq!(config.listen.port(), 7443);
        assert_eq!(
            config.macro_tier.chat_model.as_deref(),
            Some("qwen2.5-coder-0.5b")
        );
        assert_eq!(config.macro_tier.catalogue.entries.len(), 2);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("colour = 1", "unknown field `colour`"),
            ("heartbeat_interval_secs = 0", "heartbeat_interval_secs"),
            ("advertise_url = \"http://x\"", "advertise_url"),
            (
                "default_token_ttl_secs = 99999999",
                "default_token_ttl_secs",
            ),
            ("listen = \"nowhere\"", "listen"),
            ("rollout_interval_ms = 1", "rollout_interval_ms"),
            (
                "[macro]\nupstream_url = \"ftp://x\"\nupstream_chat_model = \"m\"",
                "macro.upstream_url",
            ),
            (
                "[macro]\nupstream_url = \"https://x/v1\"",
                "upstream_chat_model",
            ),
            (
                "[macro]\nupstream_url = \"https://x/v1\"\nupstream_chat_model = \"m\"\nupstream_timeout_ms = 1",
                "macro.upstream_timeout_ms",
            ),
            (
                "[macro]\nupstream_url = \"https://x/v1\"\nupstream_chat_model = \"m\"\nbreaker_failures = 0",
                "macro.breaker_failures",
            ),
            ("[macro]\nchat_model = \"nope\"", "macro.chat_model"),
            ("[macro]\ncolour = 1", "unknown field `colour`"),
        ];
        for (text, needle) in cases {
            let err = RawConfig::from_toml(text)
                .and_then(RawConfig::validate)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
