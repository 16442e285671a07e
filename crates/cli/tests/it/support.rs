//! Starting and stopping real `strata` processes, and waiting for events
//! with deadlines.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use protocol::{AgentStatus, Device, DeviceList, JoinToken};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// The stdout of a command that must have succeeded (else its output).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an operator command of `strata` against `hub`.
pub fn strata(args: &[&str], hub: &Hub, token_file: &Path) -> Output {
    Command::new(STRATA)
        .args(args)
        .arg("--hub-data-dir")
        .arg(&hub.dir)
        .arg("--operator-token-file")
        .arg(token_file)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap()
}

/// The one readable error line of a command that must fail with exit code 1.
pub fn failed(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one readable line: {err}");
    err
}

/// Trains an intent head (`strata model train-intents --out OUT EXTRA…`),
/// which must succeed, and returns what the command printed.
pub fn train_intents(out: &Path, extra: &[&str]) -> String {
    ok(&Command::new(STRATA)
        .args(["model", "train-intents", "--out"])
        .arg(out)
        .args(extra)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap())
}

/// Polls `probe` until it returns `Some`, failing the test after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn init() {
    pki::tls::install_default_provider();
}

/// A client trusting the hub CA, presenting no certificate.
pub fn ca_client(ca_pem: &str) -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .tls_backend_preconfigured(pki::tls::ca_client_config(ca_pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client presenting a device's certificate.
pub fn device_client(ca_pem: &str, agent_dir: &Path) -> reqwest::Client {
    init();
    let read = |f: &str| std::fs::read_to_string(agent_dir.join("identity").join(f)).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(
            pki::tls::device_client_config(ca_pem, &read("device.crt"), &read("device.key"))
                .unwrap(),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A running hub process (killed on drop).
pub struct Hub {
    pub dir: PathBuf,
    pub url: String,
    pub operator_token: String,
    listen: String,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Hub {
    /// Starts a hub with a new data directory under `root`.
    pub async fn start(root: &Path) -> Self {
        Self::start_with(root, None, &[]).await
    }

    /// Starts a hub with a configuration file and extra environment.
    pub async fn start_with(root: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let mut hub = Hub {
            dir: root.join("hub"),
            url: String::new(),
            operator_token: String::new(),
            listen: "127.0.0.1:0".into(),
            config: config.map(Path::to_path_buf),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        hub.spawn().await;
        // The credential file is written just after the URL file.
        let token_file = root.join("operator.token");
        hub.operator_token = wait_for(
            "the operator credential",
            Duration::from_secs(10),
            || async {
                std::fs::read_to_string(&token_file)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
            },
        )
        .await;
        hub
    }

    async fn spawn(&mut self) {
        let url_file = self.dir.join("hub.url");
        let _ = std::fs::remove_file(&url_file);
        let token_file = self.dir.parent().unwrap().join("operator.token");
        let mut cmd = Command::new(STRATA);
        cmd.args(["hub", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--operator-token-file"])
            .arg(&token_file);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .env("STRATA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.url = wait_for(
            "the hub to write its URL",
            Duration::from_secs(30),
            || async {
                std::fs::read_to_string(&url_file)
                    .ok()
                    .map(|s| s.trim().to_owned())
            },
        )
        .await;
        // The URL file is written after the listener is bound; check it answers.
        let client = ca_client(&self.ca_pem());
        let health = format!("{}/healthz", self.url);
        wait_for("the hub to answer", Duration::from_secs(30), || async {
            client
                .get(&health)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
        self.listen = self.url.trim_start_matches("https://").to_owned();
    }

    /// SIGKILLs the hub.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the hub again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("tls").join("ca.crt")).unwrap()
    }

    pub fn client(&self) -> reqwest::Client {
        ca_client(&self.ca_pem())
    }

    /// Runs the registry key ceremony (`strata keys init`) into `out` and
    /// installs the online keys and root in this hub, which must succeed.
    pub fn init_registry_keys(&self, out: &Path) {
        ok(&Command::new(STRATA)
            .args(["keys", "init", "--out"])
            .arg(out)
            .arg("--hub-data-dir")
            .arg(&self.dir)
            .env("STRATA_LOG", "warn")
            .output()
            .unwrap());
    }

    /// Issues a join token with the CLI, against the data directory.
    pub fn token(&self, labels: &[&str]) -> String {
        let mut cmd = Command::new(STRATA);
        cmd.args(["hub", "token", "create", "--data-dir"])
            .arg(&self.dir);
        for l in labels {
            cmd.args(["--label", l]);
        }
        let out = cmd.env("STRATA_LOG", "warn").output().unwrap();
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Makes a stored token expire now, as if its TTL had passed.
    pub fn expire(&self, token: &str) {
        let id = JoinToken::decode(token).unwrap().id;
        let db = rusqlite::Connection::open(self.dir.join("hub.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        let n = db
            .execute("UPDATE join_tokens SET expires_at = 0 WHERE id = ?1", [id])
            .unwrap();
        assert_eq!(n, 1);
    }

    pub async fn devices(&self) -> Vec<Device> {
        let r = self
            .client()
            .get(format!("{}/v1/devices", self.url))
            .bearer_auth(&self.operator_token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.json::<DeviceList>().await.unwrap().devices
    }

    pub async fn operator_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client()
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.operator_token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `strata edge join`, returning the process output.
pub fn join(token: &str, dir: &Path) -> Output {
    Command::new(STRATA)
        .args(["edge", "join", "--token", token, "--data-dir"])
        .arg(dir)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap()
}

/// A running agent process (killed on drop).
pub struct Agent {
    pub dir: PathBuf,
    pub local: String,
    child: Option<Child>,
}

impl Agent {
    /// Joins with `token` into `dir` and starts the agent.
    pub async fn enrol(hub: &Hub, dir: PathBuf) -> Self {
        let out = join(&hub.token(&["site=test"]), &dir);
        assert!(
            out.status.success(),
            "join failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start(dir).await
    }

    /// Starts an already enrolled agent.
    pub async fn start(dir: PathBuf) -> Self {
        Self::start_with(dir, None).await
    }

    /// Joins and starts an agent with a configuration file.
    pub async fn enrol_with_config(hub: &Hub, dir: PathBuf, config: &Path) -> Self {
        let out = join(&hub.token(&["site=test"]), &dir);
        assert!(
            out.status.success(),
            "join failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start_with(dir, Some(config)).await
    }

    /// Starts an already enrolled agent, optionally with a configuration file.
    pub async fn start_with(dir: PathBuf, config: Option<&Path>) -> Self {
        let addr_file = dir.join("local-api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(STRATA);
        cmd.args(["edge", "run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir);
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .env("STRATA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let local = wait_for(
            "the agent's local API",
            Duration::from_secs(120),
            || async {
                std::fs::read_to_string(&addr_file)
                    .ok()
                    .map(|s| format!("http://{}", s.trim()))
            },
        )
        .await;
        Self {
            dir,
            local,
            child: Some(child),
        }
    }

    pub async fn status(&self) -> Option<AgentStatus> {
        let r = reqwest::get(format!("{}/v1/status", self.local))
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until the agent holds its event stream open, `connects` times in all.
    pub async fn wait_connected(&self, connects: u64, within: Duration) -> AgentStatus {
        wait_for("the agent to connect to the hub", within, || async {
            self.status()
                .await
                .filter(|s| s.hub_connected && s.stream_connects >= connects)
        })
        .await
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads an RFC 9457 problem body, checking the media type.
pub async fn problem(r: reqwest::Response) -> (u16, protocol::Problem) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(ct, protocol::PROBLEM_CONTENT_TYPE, "status {status}");
    (status, r.json().await.unwrap())
}

/// The directory of the real models and data sets (`scripts/fetch-assets`).
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("STRATA_ASSETS").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/strata/assets")
        },
        PathBuf::from,
    );
    assert!(
        dir.join("smollm2-135m-instruct").is_dir(),
        "model assets missing in {}: run scripts/fetch-assets",
        dir.display()
    );
    dir
}

/// A directory under the target's scratch space whose contents `build`
/// makes once for all test processes: the first process to take the lock
/// file builds while the others wait (and take over if it died).
pub fn built_once(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let done = dir.join("done");
    let lock = dir.join("lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let mut build = Some(build);
    while !done.exists() {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => {
                std::fs::write(&lock, std::process::id().to_string()).unwrap();
                if let Some(build) = build.take() {
                    build(&dir);
                }
                std::fs::write(&done, b"").unwrap();
                let _ = std::fs::remove_file(&lock);
            }
            Err(_) => {
                let holder = std::fs::read_to_string(&lock).unwrap_or_default();
                if !holder.is_empty() && !Path::new(&format!("/proc/{}", holder.trim())).exists() {
                    let _ = std::fs::remove_file(&lock);
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for {name}"
                );
                // Another process is building; poll its done marker.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    dir
}
