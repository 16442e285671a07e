//! What the benchmark needs around the measurements: where the models, peer
//! binaries and peer scripts are (with one clear error naming the script that
//! installs a missing one), a working directory, child processes, and the
//! progress bar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::process::{Child, Command};

/// The SmolLM2 GGUF, relative to the assets directory.
const GGUF: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The MiniLM model directory, relative to the assets directory.
const MINILM: &str = "all-minilm-l6-v2";
/// The Home Assistant intents file, relative to the assets directory.
const INTENTS: &str = "home-assistant-intents/en.json";

/// Every file and program the benchmark uses.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// The assets directory.
    pub assets: PathBuf,
    /// The peers directory.
    pub peers: PathBuf,
    /// The SmolLM2-135M Q4_1 GGUF.
    pub gguf: PathBuf,
    /// The all-MiniLM-L6-v2 directory.
    pub minilm: PathBuf,
    /// The Home Assistant intents file.
    pub intents: PathBuf,
    /// llama.cpp's `llama-bench`.
    pub llama_bench: PathBuf,
    /// llama.cpp's `llama-server`.
    pub llama_server: PathBuf,
    /// The peers venv's Python.
    pub python: PathBuf,
    /// The directory holding `embed_numpy.py` (if found).
    pub scripts: Option<PathBuf>,
}

/// Versions of the peers, as far as they could be found out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Versions {
    /// `llama-server --version`, e.g. `0.5.0-dev (build 1, commit 0c1e570)`.
    pub llama_cpp: Option<String>,
    /// The venv's Python.
    pub python: Option<String>,
    /// numpy in the venv.
    pub numpy: Option<String>,
    /// onnxruntime in the venv (absent: the ONNX peer is skipped).
    pub onnxruntime: Option<String>,
}

/// `$XDG_CACHE_HOME/strata/<name>`, else `~/.cache/strata/<name>`: where
/// `scripts/fetch-assets` and `scripts/build-peers` put things.
pub(crate) fn cache_dir(name: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("strata").join(name)
}

/// `bench/peers` in the current directory or in a directory above the
/// running binary (`target/release/strata` sits two levels below the
/// repository).
fn find_scripts() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join("bench").join("peers")));
    }
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().map(|d| d.join("bench").join("peers")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("embed_numpy.py").is_file())
}

impl Paths {
    /// Resolves the defaults; nothing is checked yet.
    pub(crate) fn find(
        assets: Option<PathBuf>,
        peers: Option<PathBuf>,
        scripts: Option<PathBuf>,
    ) -> Paths {
        // An empty value (`STRATA_ASSETS=`) means "not set", as in the scripts.
        let assets = assets
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| cache_dir("assets"));
        let peers = peers
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| cache_dir("peers"));
        Paths {
            gguf: assets.join(GGUF),
            minilm: assets.join(MINILM),
            intents: assets.join(INTENTS),
            llama_bench: peers.join("bin").join("llama-bench"),
            llama_server: peers.join("bin").join("llama-server"),
            python: peers.join("venv").join("bin").join("python"),
            scripts: scripts.or_else(find_scripts),
            assets,
            peers,
        }
    }

    /// The numpy peer program.
    pub(crate) fn numpy_script(&self) -> PathBuf {
        self.scripts
            .clone()
            .unwrap_or_default()
            .join("embed_numpy.py")
    }

    /// The ONNX Runtime peer program.
    pub(crate) fn onnx_script(&self) -> PathBuf {
        self.scripts
            .clone()
            .unwrap_or_default()
            .join("embed_onnx.py")
    }

    /// Fails with one line naming the first missing file and the script
    /// that provides it.
    pub(crate) fn check(&self, llm: bool, embed: bool, http: bool) -> anyhow::Result<()> {
        let asset = |path: &Path, what: &str| -> anyhow::Result<()> {
            if path.exists() {
                Ok(())
            } else {
                bail!(
                    "{what} is missing ({}): run scripts/fetch-assets (or pass --assets DIR / set STRATA_ASSETS)",
                    path.display()
                )
            }
        };
        let peer = |path: &Path, what: &str| -> anyhow::Result<()> {
            if path.is_file() {
                Ok(())
            } else {
                bail!(
                    "{what} is missing ({}): run scripts/build-peers (or pass --peers DIR / set STRATA_PEERS)",
                    path.display()
                )
            }
        };
        if llm || http {
            asset(&self.gguf, "the SmolLM2-135M GGUF")?;
        }
        if embed || http {
            for file in ["model.safetensors", "tokenizer.json", "config.json"] {
                asset(&self.minilm.join(file), "the all-MiniLM-L6-v2 model")?;
            }
            asset(&self.intents, "the Home Assistant intents file")?;
        }
        if llm {
            peer(&self.llama_bench, "llama-bench")?;
        }
        if http {
            peer(&self.llama_server, "llama-server")?;
        }
        if embed {
            peer(&self.python, "the peers' Python venv")?;
            if self.scripts.is_none() {
                bail!(
                    "the embedding peer program bench/peers/embed_numpy.py was not found: run from the repository or pass --peer-scripts DIR"
                );
            }
            if !self.numpy_script().is_file() {
                bail!(
                    "{} not found: pass --peer-scripts DIR pointing at the repository's bench/peers",
                    self.numpy_script().display()
                );
            }
        }
        Ok(())
    }

    /// Asks the peers for their versions (best effort).
    pub(crate) async fn peer_versions(&self, python: bool) -> Versions {
        let mut v = Versions::default();
        if self.llama_server.is_file()
            && let Ok(out) = Command::new(&self.llama_server)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .await
        {
            // llama.cpp prints its version on stderr.
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            v.llama_cpp = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("version:"))
                .map(|s| s.trim().to_owned());
        }
        if python && self.python.is_file() {
            const PROBE: &str = "import json, sys\n\
                d = {'python': sys.version.split()[0]}\n\
                try:\n    import numpy; d['numpy'] = numpy.__version__\nexcept Exception:\n    pass\n\
                try:\n    import onnxruntime; d['onnxruntime'] = onnxruntime.__version__\nexcept Exception:\n    pass\n\
                print(json.dumps(d))\n";
            if let Ok(out) = Command::new(&self.python)
                .args(["-c", PROBE])
                .stdin(Stdio::null())
                .output()
                .await
                && let Ok(d) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            {
                let get = |k: &str| d.get(k).and_then(|x| x.as_str()).map(str::to_owned);
                v.python = get("python");
                v.numpy = get("numpy");
                v.onnxruntime = get("onnxruntime");
            }
        }
        v
    }
}

/// A temporary directory for configs, logs and data of one run.
pub(crate) struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates a fresh directory under the system's temporary directory.
    pub(crate) fn create() -> anyhow::Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("strata-bench-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Where child processes write their logs.
    pub(crate) fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }

    /// Removes the directory (best effort).
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A long-running child process (hub, agent, llama-server), killed when
/// dropped; its stdout and stderr go to a log file.
pub(crate) struct Service {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Service {
    /// Starts `cmd`, logging to `<logs>/<name>.log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, logs: &Path) -> anyhow::Result<Service> {
        let log = logs.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let file2 = file
            .try_clone()
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Service {
            name: name.to_owned(),
            log,
            child,
        })
    }

    /// The process id (`None` once it has been reaped).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails if the process has exited, pointing at its log.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); see {}",
                self.name,
                self.log.display()
            ),
            Err(e) => bail!("cannot watch {}: {e}", self.name),
        }
    }

    /// Waits until `probe` returns a value, checking that the process is
    /// still running, for at most `within`.
    pub(crate) async fn wait_for<T, F, Fut>(
        &mut self,
        what: &str,
        within: Duration,
        mut probe: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = probe().await {
                return Ok(v);
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not {what} within {} s; see {}",
                    self.name,
                    within.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process and waits for it.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port that was free a moment ago (for servers that cannot
/// report the port they picked).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The memory lines of `/proc/<pid>/status` this benchmark reports.
const MEMORY_FIELDS: [&str; 5] = ["VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"];

/// A process's memory figures in bytes (Linux): `VmHWM` (peak resident set
/// size) and the current `VmRSS` with its anonymous and file-backed parts.
pub(crate) fn memory_status(pid: u32) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (peak memory is measured on Linux only)"))?;
    let fields = parse_memory(&status);
    if !fields.contains_key("VmHWM") {
        bail!("no VmHWM line in {path}");
    }
    Ok(fields)
}

/// The [`MEMORY_FIELDS`] of a `/proc/<pid>/status` text, in bytes.
fn parse_memory(status: &str) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for line in status.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(&field) = MEMORY_FIELDS.iter().find(|&&f| f == key) else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let value = parts.next().and_then(|v| v.parse::<u64>().ok());
        if let (Some(v), Some("kB") | None) = (value, parts.next()) {
            out.insert(field, v * 1024);
        }
    }
    out
}

/// The CPU model and the number of CPUs this process may use.
pub(crate) fn machine() -> (String, usize) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (model, cpus)
}

/// The progress bar on stderr; when stderr is not a terminal, each step is
/// printed as a line instead.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `steps` steps.
    pub(crate) fn new(steps: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar }
    }

    /// Starts the next step.
    pub(crate) fn step(&self, message: &str) {
        if self.bar.is_hidden() {
            eprintln!("bench: {message}");
        }
        self.bar.set_message(message.to_owned());
        self.bar.inc(1);
    }

    /// Clears the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_lines() {
        let cases: &[(&str, Option<u64>)] = &[
            (
                "Name:\tstrata\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB\n",
                Some(123_456 * 1024),
            ),
            ("VmHWM: 7\n", Some(7 * 1024)),
            ("VmRSS:\t 1 kB\n", None),
            ("VmHWM:\t x kB\n", None),
            ("VmHWM:\t 5 MB\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_memory(text).get("VmHWM").copied(), *want, "{text:?}");
        }
        let all =
            parse_memory("VmHWM: 3 kB\nVmRSS: 2 kB\nRssAnon: 1 kB\nRssFile: 1 kB\nThreads: 9\n");
        assert_eq!(all.len(), 4);
        assert_eq!(all.get("RssFile"), Some(&1024));
    }
}
