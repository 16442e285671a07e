//! A hub process and a fleet of simulated devices on this machine, shared by
//! `strata bench rollout` and `strata fl simulate`.
//!
//! Each simulated device is enrolled like a real one (its own key, CSR and
//! certificate) and calls the hub over its own mutual-TLS client; its event
//! stream is read with the agent's own SSE decoder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::{CreateTokenRequest, CreateTokenResponse, DeviceMessageEnvelope, Labels};

/// A hub process started for a simulation, with an operator client.
pub(crate) struct SimHub {
    child: tokio::process::Child,
    /// The hub's process id.
    pub(crate) pid: u32,
    /// `https://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// The operator credential.
    pub(crate) token: String,
    /// The hub CA certificate (PEM).
    pub(crate) ca: String,
    /// An HTTPS client that trusts the hub CA.
    pub(crate) operator: reqwest::Client,
    /// The hub's data directory.
    pub(crate) dir: PathBuf,
    /// Where the operator credential was written.
    pub(crate) token_file: PathBuf,
}

impl SimHub {
    /// Starts `strata hub` on a free loopback port with its data in
    /// `dir/hub`, and waits until it serves.
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<SimHub> {
        let hub_dir = dir.join("hub");
        let token_file = dir.join("operator.token");
        let exe = std::env::current_exe()?;
        let child = tokio::process::Command::new(&exe)
            .args(["hub", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&hub_dir)
            .arg("--operator-token-file")
            .arg(&token_file)
            .env("STRATA_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the hub")?;
        let pid = child.id().context("the hub has no pid")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (url, token) = loop {
            let url = std::fs::read_to_string(hub_dir.join("hub.url")).ok();
            let token = std::fs::read_to_string(&token_file).ok();
            if let (Some(u), Some(t)) = (url, token)
                && !t.trim().is_empty()
            {
                break (u.trim().to_owned(), t.trim().to_owned());
            }
            if Instant::now() > deadline {
                bail!("the hub did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ca = std::fs::read_to_string(hub_dir.join("tls").join("ca.crt"))?;
        let operator = reqwest::Client::builder()
            .tls_backend_preconfigured(pki::tls::ca_client_config(&ca)?)
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(SimHub {
            child,
            pid,
            url,
            token,
            ca,
            operator,
            dir: hub_dir,
            token_file,
        })
    }

    /// Stops the hub.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Enrols `n` devices with `labels`, `concurrency` at a time, keeping
    /// their identities under `dir/devices`.
    pub(crate) async fn enrol(
        &self,
        dir: &Path,
        n: u64,
        labels: &Labels,
        concurrency: usize,
    ) -> anyhow::Result<Vec<SimDevice>> {
        let bar = ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("enrolling");
        let devices_dir = dir.join("devices");
        let enrolled: Vec<anyhow::Result<SimDevice>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let devices_dir = devices_dir.clone();
                let bar = bar.clone();
                async move {
                    let join: CreateTokenResponse = self
                        .operator
                        .post(format!("{}/v1/tokens", self.url))
                        .bearer_auth(&self.token)
                        .json(&CreateTokenRequest {
                            ttl_secs: Some(3600),
                            labels: labels.clone(),
                        })
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let data_dir = devices_dir.join(format!("d{i}"));
                    let enrolment =
                        edge::join(&join.token, &data_dir, Some(format!("sim-{i}"))).await?;
                    let read = |f: &str| std::fs::read_to_string(data_dir.join("identity").join(f));
                    let client = reqwest::Client::builder()
                        .tls_backend_preconfigured(pki::tls::device_client_config(
                            &self.ca,
                            &read("device.crt")?,
                            &read("device.key")?,
                        )?)
                        .build()?;
                    bar.inc(1);
                    Ok(SimDevice {
                        id: enrolment.device_id.to_string(),
                        client,
                    })
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        bar.finish_and_clear();
        enrolled.into_iter().collect()
    }
}

/// A simulated device: enrolled identity and its mTLS client.
#[derive(Clone)]
pub(crate) struct SimDevice {
    /// The device id the hub issued.
    pub(crate) id: String,
    /// A client presenting the device's certificate.
    pub(crate) client: reqwest::Client,
}

impl SimDevice {
    /// Holds the device's event stream open for ever (reconnecting after
    /// 200 ms when it breaks) and calls `on_message` with every message
    /// in order.
    pub(crate) async fn listen<F, Fut>(&self, hub: &str, mut on_message: F)
    where
        F: FnMut(DeviceMessageEnvelope) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut last = 0i64;
        loop {
            let response = self
                .client
                .get(format!("{hub}/v1/devices/{}/events", self.id))
                .header("accept", "text/event-stream")
                .header("last-event-id", last.to_string())
                .send()
                .await;
            let Ok(response) = response else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut body = response.bytes_stream();
            let mut decoder = edge::sse::SseDecoder::default();
            while let Some(Ok(chunk)) = body.next().await {
                let Ok(events) = decoder.push(&chunk) else {
                    break;
                };
                for event in events.into_iter().filter(|e| e.event == "message") {
                    let Ok(envelope) = serde_json::from_str::<DeviceMessageEnvelope>(&event.data)
                    else {
                        continue;
                    };
                    if envelope.seq <= last {
                        continue;
                    }
                    last = envelope.seq;
                    on_message(envelope).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
