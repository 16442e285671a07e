//! The operator side of the hub API, for CLI commands that call a running
//! hub: how to reach it (URL, CA, credential) and a small client.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

/// How to reach the hub's operator API.
#[derive(Debug, Args)]
pub(crate) struct HubConnection {
    /// The hub's data directory, on the hub's machine: its URL, CA and the
    /// operator token file are read from there unless given below.
    #[arg(long, env = "STRATA_HUB_DATA_DIR", global = true)]
    hub_data_dir: Option<PathBuf>,
    /// The hub's URL (e.g. https://hub.example:8443).
    #[arg(long, env = "STRATA_HUB_URL", global = true)]
    hub_url: Option<String>,
    /// The hub's CA certificate (PEM), to verify the hub.
    #[arg(long, env = "STRATA_HUB_CA", global = true)]
    ca: Option<PathBuf>,
    /// File holding the operator credential (as written by
    /// `strata hub --operator-token-file`).
    #[arg(long, env = "STRATA_OPERATOR_TOKEN_FILE", global = true)]
    operator_token_file: Option<PathBuf>,
}

impl HubConnection {
    /// The hub's data directory, when the command runs on the hub's machine.
    pub(crate) fn data_dir(&self) -> Option<&std::path::Path> {
        self.hub_data_dir.as_deref()
    }
}

/// Runs this `strata` binary with `args` (for example `strata model
/// publish` from the demo and the benchmarks) and returns its stdout; a
/// failure carries the command and its error line. With `hub`, the command
/// reaches that hub: its data directory and operator credential file.
pub(crate) async fn run_strata(
    args: &[&str],
    hub: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let mut command = tokio::process::Command::new(exe);
    command.args(args).env("STRATA_LOG", "warn");
    if let Some((data_dir, token_file)) = hub {
        command
            .arg("--hub-data-dir")
            .arg(data_dir)
            .arg("--operator-token-file")
            .arg(token_file);
    }
    let output = command.output().await?;
    if !output.status.success() {
        bail!(
            "strata {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A client for the operator API.
pub(crate) struct Operator {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Operator {
    pub(crate) fn connect(c: &HubConnection) -> anyhow::Result<Operator> {
        let from_dir = |name: &str| c.hub_data_dir.as_ref().map(|d| d.join(name));
        let url = match (&c.hub_url, from_dir("hub.url")) {
            (Some(url), _) => url.clone(),
            (None, Some(file)) => std::fs::read_to_string(&file)
                .with_context(|| format!("reading the hub URL from {}", file.display()))?
                .trim()
                .to_owned(),
            (None, None) => bail!("give --hub-url (or --hub-data-dir on the hub's machine)"),
        };
        let ca_file =
            c.ca.clone()
                .or_else(|| from_dir("tls/ca.crt"))
                .context("give --ca with the hub's CA certificate (or --hub-data-dir)")?;
        let ca = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("reading the hub CA {}", ca_file.display()))?;
        let token = match &c.operator_token_file {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the operator credential {}", file.display()))?,
            None => std::env::var("STRATA_OPERATOR_TOKEN").context(
                "give --operator-token-file or set STRATA_OPERATOR_TOKEN to the operator credential",
            )?,
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(pki::tls::ca_client_config(&ca)?)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Operator {
            client,
            url: url.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
        })
    }

    pub(crate) async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .query(query)
            .send()
            .await
            .with_context(|| format!("reaching the hub at {}", self.url))?;
        Self::answer(response).await
    }

    /// Sends `body` as JSON and returns the answer's JSON.
    pub(crate) async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("reaching the hub at {}", self.url))?;
        Self::answer(response).await
    }

    /// Uploads `bytes`.
    pub(crate) async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let response = self
            .client
            .put(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .with_context(|| format!("reaching the hub at {}", self.url))?;
        if !response.status().is_success() {
            Self::answer(response).await?;
        }
        Ok(())
    }

    /// A signed registry document as the hub serves it, or `None` (404).
    pub(crate) async fn get_raw(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("reaching the hub at {}", self.url))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            Self::answer(response).await?;
            bail!("hub refused the request");
        }
        Ok(Some(response.bytes().await?.to_vec()))
    }

    /// The answer's JSON, or the hub's problem detail as an error.
    async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = response.json().await.context("reading the hub's answer")?;
        if !status.is_success() {
            let detail = body["detail"].as_str().unwrap_or("no detail");
            bail!("hub refused ({status}): {detail}");
        }
        Ok(body)
    }
}
