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
}

/// Longest join-token lifetime the hub accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl RawConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks every field and fills in defaults.
    pub fn validate(self) -> Result<Config, Error> {
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
