//! `strata demo`: a hub and a simulated fleet of real agents on one machine.
//!
//! Every device is a real `strata edge` process with its own data directory,
//! its own key and certificate, talking to a real `strata hub` process over
//! loopback mutual TLS. The demo is a sequence of acts over a [`Fleet`]:
//! today "enrol the fleet" and "watch it live"; later capabilities add their
//! own acts (a site going offline, a rollout, a federated round) that use the
//! same [`Fleet`] handle.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::{CreateTokenRequest, CreateTokenResponse, DeviceList, Labels};
use tokio::process::{Child, Command};

use crate::output::out;

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

/// The demo's hub and devices, for acts to act on.
pub(crate) struct Fleet {
    dir: PathBuf,
    hub: Option<Proc>,
    hub_url: String,
    operator_token: String,
    client: reqwest::Client,
    pub devices: Vec<DemoDevice>,
}

impl Fleet {
    fn hub_dir(&self) -> PathBuf {
        self.dir.join("hub")
    }

    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Starts the hub process and waits until it answers.
    async fn start_hub(dir: &Path) -> anyhow::Result<Self> {
        let hub_dir = dir.join("hub");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "# Written by strata demo.\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\nheartbeat_interval_secs = 2\n",
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

    /// The fleet as the hub sees it.
    pub async fn devices_on_hub(&self) -> anyhow::Result<DeviceList> {
        let response = self
            .client
            .get(format!("{}/v1/devices", self.hub_url))
            .bearer_auth(&self.operator_token)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("hub refused to list devices: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Enrols `count` devices across `sites` sites and starts their agents,
    /// each with the edge configuration `edge_config` if given.
    async fn enrol(
        &mut self,
        count: u16,
        sites: u16,
        edge_config: Option<&Path>,
    ) -> anyhow::Result<()> {
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
            let config_arg = edge_config.map(|p| p.display().to_string());
            if let Some(config) = &config_arg {
                args.extend(["--config", config]);
            }
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
    async fn wait_online(&self, within: Duration) -> anyhow::Result<()> {
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
    async fn local_api(&self, device: &DemoDevice, within: Duration) -> anyhow::Result<String> {
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

    async fn stop(mut self) {
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
    let mut fleet = Fleet::start_hub(&dir).await?;
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
    let edge_config = if args.no_models {
        None
    } else {
        Some(prepare_models(&fleet.dir).await?)
    };
    fleet
        .enrol(args.devices, args.sites, edge_config.as_deref())
        .await?;
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
    if edge_config.is_some() {
        ask_devices(fleet).await?;
        out("");
    }
    watch(fleet, args.duration.map(Into::into)).await
}

/// Trains the intent head (once, cached beside the assets) and writes the
/// edge configuration every demo device serves its models from.
async fn prepare_models(dir: &Path) -> anyhow::Result<PathBuf> {
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
        .join("intents-head.safetensors");
    if !head.exists() {
        out("Training the intent classifier head (once)…");
        let args = crate::cmd_model::TrainIntentsArgs::for_demo(head.clone());
        tokio::task::spawn_blocking(move || crate::cmd_model::train_intents(&args)).await??;
    }
    let config = dir.join("edge.toml");
    let text = format!(
        r#"# Written by strata demo: the models every demo device serves.
[inference]
max_concurrent = 2

[[models]]
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
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    Ok(config)
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
