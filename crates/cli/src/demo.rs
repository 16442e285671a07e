//! `strata demo`: a hub and a simulated fleet of real agents on one machine.
//!
//! Every device is a real `strata edge` process with its own data directory,
//! its own key and certificate, talking to a real `strata hub` process over
//! loopback mutual TLS. The demo is a sequence of acts over a [`Fleet`]:
//! enrol the fleet, ask its models, take a site offline and back, roll a
//! good and a broken model release out ([`rollout_act`]), train an intent
//! head together by federated learning with secure aggregation
//! ([`fl_act`]), watch it live.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::{CreateTokenRequest, CreateTokenResponse, DeviceList, Labels};
use tokio::process::{Child, Command};

use netfault::FaultProxy;

use crate::output::out;

mod fl_act;
mod rollout_act;
pub(crate) mod route_act;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=200))]
    devices: u16,
    /// Number of sites the devices are spread across.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=50))]
    sites: u16,
    /// Directory for the demo's hub and devices (default: a new temporary
    /// directory, removed at exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Stop after this long (e.g. 30s) instead of running until ctrl-c.
    #[arg(long)]
    duration: Option<humantime::Duration>,
    /// Run the fleet without models (no inference act).
    #[arg(long)]
    no_models: bool,
}

/// A running child process of the demo, killed when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, args: &[&str], log_dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the strata binary")?;
        let log_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One simulated device.
pub(crate) struct DemoDevice {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its site label.
    pub site: String,
    proc: Option<Proc>,
}

impl DemoDevice {
    /// Its name (`site-1-dev-1`), the last part of its data directory.
    pub(crate) fn name(&self) -> String {
        self.data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The demo's hub and devices, for acts to act on.
pub(crate) struct Fleet {
    dir: PathBuf,
    hub: Option<Proc>,
    pub(crate) hub_url: String,
    pub(crate) operator_token: String,
    /// A client that trusts the hub's CA.
    pub(crate) client: reqwest::Client,
    pub devices: Vec<DemoDevice>,
    /// Each site's uplink to the hub: a proxy the demo can cut.
    uplinks: std::collections::BTreeMap<String, FaultProxy>,
}

impl Fleet {
    fn hub_dir(&self) -> PathBuf {
        self.dir.join("hub")
    }

    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Starts the hub process and waits until it answers.
    pub(crate) async fn start_hub(dir: &Path, macro_tier: &str) -> anyhow::Result<Self> {
        let hub_dir = dir.join("hub");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "# Written by strata demo.\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\nheartbeat_interval_secs = 2\n{macro_tier}",
                hub_dir.display().to_string()
            ),
        )
        .context("writing the demo hub config")?;
        let token_file = dir.join("operator.token");
        let hub = Proc::spawn(
            "hub",
            &[
                "hub",
                "--config",
                &config.display().to_string(),
                "--operator-token-file",
                &token_file.display().to_string(),
            ],
            &logs,
        )?;
        let url_file = hub_dir.join("hub.url");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (hub_url, operator_token) = loop {
            if let (Ok(url), Ok(token)) = (
                std::fs::read_to_string(&url_file),
                std::fs::read_to_string(&token_file),
            ) {
                break (url.trim().to_owned(), token.trim().to_owned());
            }
            if Instant::now() > deadline {
                bail!(
                    "the hub did not start within 30 s; see {}",
                    logs.join("hub.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ca = std::fs::read_to_string(hub_dir.join("tls").join("ca.crt"))
            .context("reading the hub CA")?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(pki::tls::ca_client_config(&ca)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            dir: dir.to_owned(),
            hub: Some(hub),
            hub_url,
            operator_token,
            client,
            devices: Vec::new(),
            uplinks: std::collections::BTreeMap::new(),
        })
    }

    /// Issues a join token through the operator API.
    async fn token(&self, labels: Labels) -> anyhow::Result<String> {
        let response = self
            .client
            .post(format!("{}/v1/tokens", self.hub_url))
            .bearer_auth(&self.operator_token)
            .json(&CreateTokenRequest {
                ttl_secs: Some(600),
                labels,
            })
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("hub refused to issue a token: {}", response.text().await?);
        }
        Ok(response.json::<CreateTokenResponse>().await?.token)
    }

    /// `GET path` on the hub's operator API, as JSON.
    pub(crate) async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<T> {
        let response = self
            .client
            .get(format!("{}{path}", self.hub_url))
            .bearer_auth(&self.operator_token)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("the hub refused GET {path}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// The fleet as the hub sees it.
    pub async fn devices_on_hub(&self) -> anyhow::Result<DeviceList> {
        self.get("/v1/devices").await
    }

    /// Enrols `count` devices across `sites` sites and starts their agents.
    /// Each site reaches the hub through its own uplink (a proxy the demo
    /// can cut); `models` is the `[[models]]` part of the edge configuration.
    pub(crate) async fn enrol(
        &mut self,
        count: u16,
        sites: u16,
        models: &str,
    ) -> anyhow::Result<()> {
        let hub_addr: std::net::SocketAddr = self
            .hub_url
            .trim_start_matches("https://")
            .parse()
            .with_context(|| format!("reading the hub address from {}", self.hub_url))?;
        let mut configs = std::collections::BTreeMap::new();
        for s in 1..=sites {
            let site = format!("site-{s}");
            let uplink = FaultProxy::start(hub_addr)
                .await
                .context("starting a site uplink")?;
            let config = self.dir.join(format!("edge-{site}.toml"));
            let text = format!(
                "# Written by strata demo: the configuration of every device of {site}.\n\
                 [hub]\n# The site's uplink to the hub.\nurl = \"https://{}\"\nreconnect_max_ms = 2000\n\n\
                 [inference]\nmax_concurrent = 2\n\n\
                 [insights]\n# Short windows, so the demo shows insights within seconds.\nwindow_secs = 5\n\n\
                 [updates]\n# A short health window, so a rollout finishes within the demo.\nhealth_window_secs = 3\n\n{models}",
                uplink.addr()
            );
            std::fs::write(&config, &text)
                .with_context(|| format!("writing {}", config.display()))?;
            configs.insert(site.clone(), (config, text));
            self.uplinks.insert(site, uplink);
        }
        let bar = ProgressBar::new(u64::from(count)).with_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message("enrolling");
        let exe = std::env::current_exe()?;
        for i in 0..count {
            let site = format!("site-{}", i % sites + 1);
            let name = format!("{site}-dev-{}", i / sites + 1);
            let data_dir = self.dir.join("devices").join(&name);
            let token = self
                .token(Labels::from([("site".to_owned(), site.clone())]))
                .await?;
            let status = Command::new(&exe)
                .args(["edge", "join", "--data-dir"])
                .arg(&data_dir)
                .args(["--name", &name])
                .env("STRATA_JOIN_TOKEN", &token)
                .env("STRATA_LOG", "warn")
                .stdout(Stdio::null())
                .status()
                .await?;
            if !status.success() {
                bail!("{name} failed to join the hub");
            }
            let data_arg = data_dir.display().to_string();
            let mut args = vec![
                "edge",
                "run",
                "--data-dir",
                &data_arg,
                "--listen",
                "127.0.0.1:0",
            ];
            // With models, each device also names its own federated
            // training data (written by the federated act).
            let config_arg = match configs.get(&site) {
                Some((_, text)) if !models.is_empty() => {
                    let config = self.dir.join(format!("edge-{name}.toml"));
                    let text = format!(
                        "{text}\n# This device's own labelled utterances; they never leave it.\n[federated]\nintents = \"{}\"\n",
                        fl_act::data_file(&name)
                    );
                    std::fs::write(&config, text)
                        .with_context(|| format!("writing {}", config.display()))?;
                    config.display().to_string()
                }
                Some((config, _)) => config.display().to_string(),
                None => String::new(),
            };
            args.extend(["--config", &config_arg]);
            let proc = Proc::spawn(&name, &args, &self.logs())?;
            self.devices.push(DemoDevice {
                data_dir,
                site,
                proc: Some(proc),
            });
            bar.inc(1);
        }
        bar.finish_with_message("enrolled");
        Ok(())
    }

    /// Waits until every device holds its stream open.
    pub(crate) async fn wait_online(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let list = self.devices_on_hub().await?;
            if list.devices.iter().filter(|d| d.online).count() == self.devices.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not every device came online within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The local API URL of a device, once its agent has started.
    pub(crate) async fn local_api(
        &self,
        device: &DemoDevice,
        within: Duration,
    ) -> anyhow::Result<String> {
        let file = device.data_dir.join("local-api.addr");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(addr) = std::fs::read_to_string(&file) {
                return Ok(format!("http://{}", addr.trim()));
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start its local API within {within:?}",
                    device.site
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn stop(mut self) {
        for device in &mut self.devices {
            if let Some(p) = device.proc.take() {
                p.stop().await;
            }
        }
        if let Some(hub) = self.hub.take() {
            tracing::debug!(name = %hub.name, "stopping");
            hub.stop().await;
        }
    }
}

/// Renders the fleet table.
fn table(list: &DeviceList) -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut s = format!(
        "{:<20} {:<16} {:<8} {:<8} {:<8} {:>9} {:>6}\n",
        "DEVICE", "NAME", "SITE", "STATUS", "LINK", "LAST SEEN", "UPTIME"
    );
    for d in &list.devices {
        let seen = d.last_seen_at.map_or_else(
            || "never".to_owned(),
            |t| format!("{:.1}s", (now - t).as_seconds_f64().max(0.0)),
        );
        let uptime = d
            .last_heartbeat
            .as_ref()
            .map_or_else(|| "-".to_owned(), |h| format!("{}s", h.uptime_secs));
        s.push_str(&format!(
            "{:<20} {:<16} {:<8} {:<8} {:<8} {:>9} {:>6}\n",
            d.id.as_str(),
            d.name,
            d.labels.get("site").map_or("-", String::as_str),
            format!("{:?}", d.status).to_lowercase(),
            if d.online { "online" } else { "offline" },
            seen,
            uptime,
        ));
    }
    let online = list.devices.iter().filter(|d| d.online).count();
    s.push_str(&format!("{online}/{} devices online\n", list.devices.len()));
    s
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (dir, remove_at_exit) = match args.dir.clone() {
        Some(dir) => (dir, false),
        None => (
            std::env::temp_dir().join(format!("strata-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    out(&format!("Strata demo in {}", dir.display()));
    let macro_tier = if args.no_models {
        String::new()
    } else {
        macro_config()?
    };
    let mut fleet = Fleet::start_hub(&dir, &macro_tier).await?;
    let outcome = acts(&mut fleet, &args).await;
    fleet.stop().await;
    if remove_at_exit {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

/// The demo's acts, in order. Each later capability adds its act here.
async fn acts(fleet: &mut Fleet, args: &DemoArgs) -> anyhow::Result<()> {
    out(&format!("Hub up at {}", fleet.hub_url));
    let (models, head) = if args.no_models {
        (String::new(), None)
    } else {
        let (models, head) = prepare_models().await?;
        (models, Some(head))
    };
    fleet.enrol(args.devices, args.sites, &models).await?;
    fleet.wait_online(Duration::from_secs(120)).await?;
    let sites: std::collections::BTreeSet<&str> =
        fleet.devices.iter().map(|d| d.site.as_str()).collect();
    out(&format!(
        "{} devices across {} sites joined over mutual TLS.",
        fleet.devices.len(),
        sites.len()
    ));
    out("");
    out("Reach the hub API:");
    out(&format!(
        "  curl --cacert {} -H \"Authorization: Bearer $(cat {})\" {}/v1/devices",
        fleet.hub_dir().join("tls").join("ca.crt").display(),
        fleet.dir.join("operator.token").display(),
        fleet.hub_url
    ));
    out(&format!(
        "  OpenAPI: {}/openapi.json   metrics: {}/metrics",
        fleet.hub_url, fleet.hub_url
    ));
    if let Some(addr) = fleet
        .devices
        .first()
        .and_then(|d| std::fs::read_to_string(d.data_dir.join("local-api.addr")).ok())
    {
        out(&format!(
            "  A device's local API: curl http://{}/v1/status",
            addr.trim()
        ));
    }
    out("");
    if !args.no_models {
        ask_devices(fleet).await?;
        out("");
        route_act::run(fleet).await?;
        out("");
    }
    if args.sites >= 2 {
        site_offline(fleet, !args.no_models).await?;
        out("");
    }
    if let Some(head) = &head {
        rollout_act::run(fleet, head).await?;
        out("");
        fl_act::run(fleet).await?;
        out("");
    }
    watch(fleet, args.duration.map(Into::into)).await
}

/// The hub's `[macro]` section: Qwen2.5-Coder-0.5B-Instruct for chat and
/// MiniLM for embeddings, run by the hub itself.
pub(crate) fn macro_config() -> anyhow::Result<String> {
    let assets = crate::cmd_model::assets_dir();
    let qwen = assets.join("qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let minilm = assets.join("all-minilm-l6-v2");
    if !qwen.exists() {
        bail!(
            "the macro model is not in {}: run scripts/fetch-assets (or pass --no-models)",
            assets.display()
        );
    }
    Ok(format!(
        r#"
[macro]
chat_model = "qwen2.5-coder-0.5b"

[[macro.models]]
id = "qwen2.5-coder-0.5b"
kind = "llm"
path = {qwen:?}
threads = 2
context_length = 2048

[[macro.models]]
id = "minilm"
kind = "embedding"
path = {minilm:?}
"#,
        qwen = qwen.display().to_string(),
        minilm = minilm.display().to_string(),
    ))
}

/// Trains the intent head (once, cached beside the assets) and returns the
/// `[[models]]` part of the edge configuration every demo device serves.
pub(crate) async fn prepare_models() -> anyhow::Result<(String, PathBuf)> {
    let assets = crate::cmd_model::assets_dir();
    let gguf = assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let minilm = assets.join("all-minilm-l6-v2");
    if !gguf.exists() || !minilm.join("model.safetensors").exists() {
        bail!(
            "model assets not found in {}: run scripts/fetch-assets (or pass --no-models)",
            assets.display()
        );
    }
    let head = assets
        .parent()
        .unwrap_or(&assets)
        .join("derived")
        .join("intents-fleet-head.safetensors");
    if !head.exists() {
        out("Training the intent classifier head (once)…");
        let args = crate::cmd_model::TrainIntentsArgs::for_demo(head.clone());
        tokio::task::spawn_blocking(move || crate::cmd_model::train_intents(&args)).await??;
    }
    let models = format!(
        r#"[[models]]
id = "smollm2"
kind = "llm"
path = {gguf:?}
threads = 1
context_length = 1024

[[models]]
id = "minilm"
kind = "embedding"
path = {minilm:?}

[[models]]
id = "intents"
kind = "classifier"
path = {head:?}
embedding_model = "minilm"

[[models]]
id = "sensors"
kind = "anomaly"
n_features = 9
"#,
        gguf = gguf.display().to_string(),
        minilm = minilm.display().to_string(),
        head = head.display().to_string(),
    );
    Ok((models, head))
}

/// Sends each kind of request to a device of each site and shows the answers.
async fn ask_devices(fleet: &Fleet) -> anyhow::Result<()> {
    use protocol::openai::{AnomalyResponse, ChatCompletion, ClassifyResponse};
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let shuttle = runtime::anomaly::load_shuttle(
        &crate::cmd_model::assets_dir().join("river/shuttle.csv.gz"),
    )
    .context("reading the shuttle sensor data (run scripts/fetch-assets)")?;
    let mut seen_sites = std::collections::BTreeSet::new();
    for device in &fleet.devices {
        if !seen_sites.insert(device.site.clone()) {
            continue;
        }
        let url = fleet.local_api(device, Duration::from_secs(60)).await?;
        out(&format!(
            "Asking a device at {} (local API {url}):",
            device.site
        ));

        let start = Instant::now();
        let chat: ChatCompletion = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0, "max_tokens": 32,
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        out(&format!(
            "  chat      {:>5} ms  {:?} (confidence {:.2}, {:.0} tok/s)",
            start.elapsed().as_millis(),
            chat.choices
                .first()
                .map_or("", |c| c.message.content.as_str()),
            chat.strata.mean_logprob.map_or(0.0, f32::exp),
            chat.strata.decode_tokens_per_s,
        ));

        let start = Instant::now();
        let intents: ClassifyResponse = client
            .post(format!("{url}/v1/classify"))
            .json(&serde_json::json!({
                "model": "intents",
                "input": ["turn off the lights in the kitchen", "set a timer for ten minutes"],
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let labels: Vec<String> = intents
            .data
            .iter()
            .map(|c| format!("{} ({:.2})", c.label, c.confidence))
            .collect();
        out(&format!(
            "  intents   {:>5} ms  {}",
            start.elapsed().as_millis(),
            labels.join(", ")
        ));

        // Stream sensor readings: the first 1,000 to learn what normal looks
        // like, then score a normal and an anomalous reading.
        let normal = shuttle
            .labels
            .iter()
            .skip(1000)
            .position(|l| !l)
            .map(|i| i + 1000);
        let anomalous = shuttle
            .labels
            .iter()
            .skip(1000)
            .position(|l| *l)
            .map(|i| i + 1000);
        if let (Some(n), Some(a)) = (normal, anomalous) {
            let mut readings: Vec<&Vec<f64>> = shuttle.readings.iter().take(1000).collect();
            readings.push(&shuttle.readings[n]);
            readings.push(&shuttle.readings[a]);
            let start = Instant::now();
            let scores: AnomalyResponse = client
                .post(format!("{url}/v1/anomaly"))
                .json(&serde_json::json!({"model": "sensors", "readings": readings}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let k = scores.data.len();
            if k >= 2 {
                out(&format!(
                    "  sensors   {:>5} ms  {} readings; normal reading scores {:.2}, anomalous {:.2}",
                    start.elapsed().as_millis(),
                    k,
                    scores.data[k - 2].score,
                    scores.data[k - 1].score
                ));
            }
        }
    }
    Ok(())
}

/// Shows the fleet live until ctrl-c or the duration ends.
async fn watch(fleet: &Fleet, duration: Option<Duration>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let end = duration.map(|d| Instant::now() + d);
    let mut last_plain = Instant::now() - Duration::from_secs(3600);
    let mut last_table = String::new();
    if tty {
        out("Live fleet (ctrl-c to stop):");
    }
    loop {
        let list = fleet.devices_on_hub().await?;
        let text = table(&list);
        if tty {
            // Redraw in place: move up over the previous table.
            let lines = last_table.lines().count();
            if lines > 0 {
                print!("\x1b[{lines}A\x1b[J");
            }
            print!("{text}");
            last_table = text;
        } else if last_plain.elapsed() >= Duration::from_secs(10)
            || end.is_some_and(|e| Instant::now() >= e)
        {
            out(&text);
            last_plain = Instant::now();
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {},
            () = crate::shutdown_signal() => {
                out("Stopping the demo.");
                return Ok(());
            }
        }
    }
}

/// The status of a device's agent, from its local API.
async fn agent_status(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<protocol::AgentStatus> {
    Ok(client
        .get(format!("{url}/v1/status"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Number of insights the hub holds from a device.
async fn insights_on_hub(fleet: &Fleet, device: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut after = 0i64;
    loop {
        let page: protocol::insight::InsightList = fleet
            .client
            .get(format!("{}/v1/insights", fleet.hub_url))
            .bearer_auth(&fleet.operator_token)
            .query(&[
                ("device", device.to_owned()),
                ("limit", "5000".to_owned()),
                ("after", after.to_string()),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        total += page.insights.len() as u64;
        match page.next_after {
            Some(a) => after = a,
            None => return Ok(total),
        }
    }
}

/// Act: the last site loses its uplink. Its devices keep answering and
/// keep their insights on disk; when the link returns they catch up, and
/// the hub's counts match what the devices produced.
async fn site_offline(fleet: &Fleet, models: bool) -> anyhow::Result<()> {
    let Some((site, uplink)) = fleet.uplinks.iter().next_back() else {
        return Ok(());
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let devices: Vec<&DemoDevice> = fleet.devices.iter().filter(|d| &d.site == site).collect();
    let mut urls = Vec::new();
    for d in &devices {
        urls.push(fleet.local_api(d, Duration::from_secs(60)).await?);
    }

    out(&format!("{site} loses its uplink to the hub."));
    uplink.cut();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = fleet.devices_on_hub().await?;
        let online = list
            .devices
            .iter()
            .filter(|d| d.labels.get("site") == Some(site) && d.online)
            .count();
        if online == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the hub still sees {online} devices of {site} online");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out(&format!(
        "  the hub sees {} devices of {site} offline; they keep working:",
        devices.len()
    ));

    // Work while offline: intents classified on the device (or, without
    // models, insights an application on the device reports), until every
    // device holds undelivered insights.
    let until = Instant::now() + Duration::from_secs(6);
    let mut requests = 0u64;
    let utterances = [
        "turn on the kitchen lights",
        "switch off the fan in the bedroom",
        "what is the temperature in the living room",
        "open the garage door",
    ];
    while Instant::now() < until {
        for url in &urls {
            if models {
                client
                    .post(format!("{url}/v1/classify"))
                    .json(&serde_json::json!({"model": "intents", "input": utterances}))
                    .send()
                    .await?
                    .error_for_status()?;
            } else {
                let now =
                    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
                client
                    .post(format!("{url}/v1/insights"))
                    .json(&serde_json::json!({
                        "kind": "door_opened", "series": "garage", "priority": "insight",
                        "start_ms": now, "value": 1.0
                    }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
            requests += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let mut all = true;
        let mut held = 0;
        for url in &urls {
            let pending = agent_status(&client, url)
                .await?
                .outbox
                .map_or(0, |o| o.pending);
            held += pending;
            all &= pending > 0;
        }
        if all {
            break held;
        }
        if Instant::now() > deadline {
            bail!("the devices of {site} did not keep insights while offline");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out(&format!(
        "  {requests} requests answered on the devices; {held} insights kept in their outboxes"
    ));

    uplink.restore();
    out(&format!("{site} is back online; its devices catch up."));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let (produced, on_hub, raw, sent) = loop {
        let mut produced = 0;
        let mut on_hub = 0;
        let mut drained = true;
        let (mut raw, mut sent) = (0, 0);
        for url in &urls {
            let status = agent_status(&client, url).await?;
            let Some(outbox) = status.outbox else {
                bail!("device {} reported no outbox", status.device_id);
            };
            drained &= outbox.pending == 0;
            produced += outbox.appended - outbox.evicted;
            raw += outbox.raw_bytes;
            sent += outbox.sent_bytes;
            on_hub += insights_on_hub(fleet, status.device_id.as_str()).await?;
        }
        if drained && produced == on_hub {
            break (produced, on_hub, raw, sent);
        }
        if Instant::now() > deadline {
            bail!("{site} did not catch up: {on_hub} of {produced} insights on the hub");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out(&format!(
        "  caught up in {:.1}s: the hub holds {on_hub} of the {produced} insights {site} produced, none lost, none twice",
        started.elapsed().as_secs_f64()
    ));
    if raw > 0 {
        out(&format!(
            "  raw data stayed on the devices: {raw} bytes processed, {sent} bytes of insights sent ({:.1} : 1)",
            raw as f64 / sent.max(1) as f64
        ));
    }
    Ok(())
}
