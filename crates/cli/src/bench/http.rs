//! End to end through the HTTP API, and the agent's peak memory.
//!
//! A real hub and a real agent enrolled with it run as child processes of
//! this binary (as in `strata demo`); the agent serves SmolLM2, MiniLM and
//! an intent head trained here. `llama-server` serves the same GGUF with the
//! same threads, context length (2048) and one slot, with its prompt cache
//! off: Strata evaluates every prompt afresh, and a server answering the same
//! request again from its cache would measure the cache, not the engine.
//!
//! Both get the same streaming `/v1/chat/completions` request (same
//! messages, including a system message so that both render the same
//! ChatML prompt; `max_tokens`; temperature 0), one after the other,
//! alternating which goes first. Time to first token runs from sending the
//! request to the first non-empty content delta; streamed tokens/s is the
//! content deltas after the first over the time after the first.
//!
//! Afterwards the agent embeds and classifies a few batches, and its peak
//! resident memory (`VmHWM`) is compared with the size of its model files.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use runtime::intents::IntentDataset;
use serde_json::{Value, json};
use tokio::process::Command;

use super::embed::pick_sentences;
use super::llm::last_line;
use super::report::{Line, Report, Target};
use super::setup::{Paths, Progress, Service, WorkDir, free_port, memory_status};
use super::{CONTEXT_LENGTH, Settings, median, ms};

/// The conversation both servers answer.
const SYSTEM: &str = "You are a helpful assistant.";
const USER: &str = "Write a long story about a robot who learns to paint.";

/// Progress steps of this part.
pub(crate) fn steps(s: &Settings) -> u64 {
    4 + 2 * u64::from(s.rounds) * u64::from(s.repeat)
}

/// The hub, the agent and llama-server.
struct Servers {
    hub: Service,
    agent: Service,
    agent_url: String,
    llama: Service,
    llama_url: String,
}

impl Servers {
    async fn stop(self) {
        self.llama.stop().await;
        self.agent.stop().await;
        self.hub.stop().await;
    }
}

/// One streamed answer.
#[derive(Debug, Clone)]
struct Sample {
    ttft_ms: f64,
    tokens: usize,
    tokens_per_s: Option<f64>,
    text: String,
}

/// Measures and adds the HTTP and memory lines to the report.
pub(crate) async fn run(
    s: &Settings,
    paths: &Paths,
    work: &WorkDir,
    dataset: &IntentDataset,
    progress: &Progress,
    report: &mut Report,
) -> anyhow::Result<()> {
    progress.step("training the agent's intent head (strata model train-intents)");
    let head = work.path().join("intent-head.safetensors");
    let sentences = pick_sentences(dataset, 64);
    let trained = train_head(paths, s.threads, &head).await?;
    report.detail("intent_head", json!({ "train_intents": trained }));

    progress.step("starting a hub, an enrolled agent and llama-server");
    let mut servers = start(s, paths, work, &head).await?;
    let outcome = measure(s, paths, &head, &sentences, &mut servers, progress, report).await;
    servers.stop().await;
    outcome
}

/// Trains the intent head the agent serves with `strata model
/// train-intents`; returns what that command printed.
async fn train_head(paths: &Paths, threads: u32, out: &Path) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let threads = threads.to_string();
    let output = Command::new(exe)
        .args(["model", "train-intents", "--intents"])
        .arg(&paths.intents)
        .arg("--embedding-model")
        .arg(&paths.minilm)
        .arg("--out")
        .arg(out)
        .env("RAYON_NUM_THREADS", &threads)
        .env("CANDLE_NUM_THREADS", &threads)
        .env("STRATA_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running strata model train-intents")?;
    if !output.status.success() {
        bail!(
            "strata model train-intents failed ({}): {}",
            output.status,
            last_line(&output.stderr)
        );
    }
    Ok(last_line(&output.stdout))
}

/// A TOML basic string holding a path.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

async fn start(
    s: &Settings,
    paths: &Paths,
    work: &WorkDir,
    head: &Path,
) -> anyhow::Result<Servers> {
    let exe = std::env::current_exe().context("locating the strata binary")?;
    let logs = work.logs();
    let client = client()?;

    // The hub.
    let hub_dir = work.path().join("hub");
    let hub_config = work.path().join("hub.toml");
    std::fs::write(
        &hub_config,
        format!(
            "# Written by strata bench.\ndata_dir = {}\nlisten = \"127.0.0.1:0\"\n",
            toml_path(&hub_dir)
        ),
    )
    .with_context(|| format!("writing {}", hub_config.display()))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("hub")
        .arg("--config")
        .arg(&hub_config)
        .env("STRATA_LOG", "info");
    let mut hub = Service::spawn("hub", cmd, &logs)?;
    let url_file = hub_dir.join("hub.url");
    hub.wait_for("start", Duration::from_secs(60), || {
        let exists = url_file.exists();
        async move { exists.then_some(()) }
    })
    .await?;

    // A join token, and the device's enrolment.
    let token = Command::new(&exe)
        .args(["hub", "token", "create", "--ttl", "10m", "--data-dir"])
        .arg(&hub_dir)
        .env("STRATA_LOG", "warn")
        .output()
        .await
        .context("creating a join token")?;
    if !token.status.success() {
        bail!(
            "strata hub token create failed: {}",
            String::from_utf8_lossy(&token.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let device_dir = work.path().join("device");
    let join = Command::new(&exe)
        .args(["edge", "join", "--name", "bench-agent", "--data-dir"])
        .arg(&device_dir)
        .env("STRATA_JOIN_TOKEN", &token)
        .env("STRATA_LOG", "warn")
        .output()
        .await
        .context("enrolling the agent")?;
    if !join.status.success() {
        bail!(
            "strata edge join failed: {}",
            String::from_utf8_lossy(&join.stderr).trim()
        );
    }

    // The agent, serving the micro-LLM, the embedder and the intent head.
    let edge_config = work.path().join("edge.toml");
    std::fs::write(
        &edge_config,
        format!(
            r#"# Written by strata bench.
data_dir = {data_dir}

[local_api]
listen = "127.0.0.1:0"

[[models]]
id = "smollm2"
kind = "llm"
path = {gguf}
threads = {threads}
context_length = {context}

[[models]]
id = "minilm"
kind = "embedding"
path = {minilm}

[[models]]
id = "intents"
kind = "classifier"
path = {head}
embedding_model = "minilm"
"#,
            data_dir = toml_path(&device_dir),
            gguf = toml_path(&paths.gguf),
            minilm = toml_path(&paths.minilm),
            head = toml_path(head),
            threads = s.threads,
            context = CONTEXT_LENGTH,
        ),
    )
    .with_context(|| format!("writing {}", edge_config.display()))?;
    let threads = s.threads.to_string();
    let mut cmd = Command::new(&exe);
    cmd.args(["edge", "run", "--config"])
        .arg(&edge_config)
        .env("RAYON_NUM_THREADS", &threads)
        .env("CANDLE_NUM_THREADS", &threads)
        .env("STRATA_LOG", "info");
    let mut agent = Service::spawn("agent", cmd, &logs)?;
    let addr_file = device_dir.join("local-api.addr");
    let agent_url = agent
        .wait_for("start its local API", Duration::from_secs(120), || {
            let addr = std::fs::read_to_string(&addr_file).ok();
            async move { addr.map(|a| format!("http://{}", a.trim())) }
        })
        .await?;
    let models: Value = client
        .get(format!("{agent_url}/v1/models"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .context("reading the agent's /v1/models")?;
    for id in ["smollm2", "minilm", "intents"] {
        let listed = models
            .get("data")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|m| m.get("id") == Some(&json!(id))));
        if !listed {
            bail!(
                "the agent did not load model {id}; see {}",
                logs.join("agent.log").display()
            );
        }
    }

    // llama-server on the same GGUF.
    let port = free_port()?;
    let mut cmd = Command::new(&paths.llama_server);
    cmd.arg("-m")
        .arg(&paths.gguf)
        .args(["-t", &threads])
        .args(["-c", &CONTEXT_LENGTH.to_string()])
        .args(["-np", "1", "--no-cache-prompt"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()]);
    let mut llama = Service::spawn("llama-server", cmd, &logs)?;
    let llama_url = format!("http://127.0.0.1:{port}");
    let health = format!("{llama_url}/health");
    let probe_client = &client;
    let health = &health;
    llama
        .wait_for("answer /health", Duration::from_secs(120), || async move {
            let r = probe_client.get(health).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
    Ok(Servers {
        hub,
        agent,
        agent_url,
        llama,
        llama_url,
    })
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .context("building the HTTP client")
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    s: &Settings,
    paths: &Paths,
    head: &Path,
    sentences: &[String],
    servers: &mut Servers,
    progress: &Progress,
    report: &mut Report,
) -> anyhow::Result<()> {
    let client = client()?;
    let body = json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
        ],
        "max_tokens": s.gen_tokens,
        "temperature": 0,
        "stream": true,
    });
    let strata_url = format!("{}/v1/chat/completions", servers.agent_url);
    let llama_url = format!("{}/v1/chat/completions", servers.llama_url);

    progress.step("HTTP warm-up: one request to each server");
    stream_chat(&client, &strata_url, &body)
        .await
        .context("streaming a chat completion from the agent")?;
    stream_chat(&client, &llama_url, &body)
        .await
        .context("streaming a chat completion from llama-server")?;

    let mut strata = Vec::new();
    let mut llama = Vec::new();
    let n = s.rounds * s.repeat;
    for i in 0..n {
        for turn in 0..2 {
            let strata_turn = (turn == 0) == (i % 2 == 0);
            let name = if strata_turn {
                "Strata agent"
            } else {
                "llama-server"
            };
            progress.step(&format!("HTTP request {}/{n}: {name}", i + 1));
            let (url, samples) = if strata_turn {
                (&strata_url, &mut strata)
            } else {
                (&llama_url, &mut llama)
            };
            let sample = stream_chat(&client, url, &body)
                .await
                .with_context(|| format!("streaming a chat completion from {name}"))?;
            servers.agent.check_running()?;
            servers.llama.check_running()?;
            samples.push(sample);
        }
    }
    let ttft = |v: &[Sample]| v.iter().map(|x| x.ttft_ms).collect::<Vec<_>>();
    let rate = |v: &[Sample]| v.iter().filter_map(|x| x.tokens_per_s).collect::<Vec<_>>();
    let peer = "llama-server";
    report.line(Line::new(
        "http_ttft",
        "HTTP time to first token, streaming chat".to_owned(),
        "ms",
        &ttft(&strata),
        peer,
        &ttft(&llama),
        Target::AtMost(1.0),
    ));
    report.line(Line::new(
        "http_decode",
        "HTTP streamed tokens/s after the first".to_owned(),
        "tok/s",
        &rate(&strata),
        peer,
        &rate(&llama),
        Target::AtLeast(1.0),
    ));
    let tokens = |v: &[Sample]| median(&v.iter().map(|x| x.tokens as f64).collect::<Vec<_>>());
    let same_text = strata.first().map(|x| &x.text) == llama.first().map(|x| &x.text);
    report.note(&format!(
        "HTTP: Strata streamed {} tokens per answer, llama-server {} (max_tokens {}); the answers are {}",
        tokens(&strata).map_or("-".into(), |t| format!("{t:.0}")),
        tokens(&llama).map_or("-".into(), |t| format!("{t:.0}")),
        s.gen_tokens,
        if same_text { "identical" } else { "not identical" }
    ));

    progress.step("agent memory: embeddings and intents, then VmHWM");
    let agent = servers.agent_url.clone();
    for _ in 0..3 {
        post_ok(
            &client,
            &format!("{agent}/v1/embeddings"),
            &json!({"model": "minilm", "input": sentences}),
        )
        .await?;
        post_ok(
            &client,
            &format!("{agent}/v1/classify"),
            &json!({"model": "intents", "input": sentences}),
        )
        .await?;
    }
    for sentence in sentences.iter().take(8) {
        post_ok(
            &client,
            &format!("{agent}/v1/classify"),
            &json!({"model": "intents", "input": sentence}),
        )
        .await?;
    }
    let pid = servers
        .agent
        .pid()
        .context("the agent process has no id any more")?;
    let agent_memory = memory_status(pid)?;
    let agent_peak = agent_memory.get("VmHWM").copied().unwrap_or(0);
    let llama_memory = servers.llama.pid().and_then(|p| memory_status(p).ok());
    let llama_peak = llama_memory.as_ref().and_then(|m| m.get("VmHWM").copied());
    let files: Vec<PathBuf> = vec![
        paths.gguf.clone(),
        paths.minilm.join("model.safetensors"),
        head.to_path_buf(),
    ];
    let mut sizes = serde_json::Map::new();
    let mut total = 0u64;
    for f in &files {
        let size = std::fs::metadata(f)
            .with_context(|| format!("reading the size of {}", f.display()))?
            .len();
        total += size;
        sizes.insert(f.display().to_string(), json!(size));
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.line(Line::new(
        "agent_peak_memory",
        "agent peak RSS (LLM + embedder + intent head)".to_owned(),
        "MiB",
        &[mib(agent_peak)],
        "sum of model files",
        &[mib(total)],
        Target::AtMost(1.5),
    ));
    report.detail(
        "http",
        json!({
            "strata_ttft_ms": ttft(&strata),
            "llama_server_ttft_ms": ttft(&llama),
            "strata_tokens": strata.iter().map(|x| x.tokens).collect::<Vec<_>>(),
            "llama_server_tokens": llama.iter().map(|x| x.tokens).collect::<Vec<_>>(),
            "llama_server_args": ["-t", s.threads.to_string(), "-c", CONTEXT_LENGTH.to_string(), "-np", "1", "--no-cache-prompt"],
            "request": body,
        }),
    );
    report.detail(
        "memory",
        json!({
            "agent_bytes": agent_memory,
            "llama_server_bytes": llama_memory,
            "model_files_bytes": sizes,
            "model_files_total_bytes": total,
        }),
    );
    let get = |k: &str| mib(agent_memory.get(k).copied().unwrap_or(0));
    report.note(&format!(
        "agent memory after the requests: VmRSS {:.0} MiB = {:.0} MiB anonymous (heap: weights copied in, KV cache, buffers) + {:.0} MiB file-backed (the mapped GGUF, binary); peak {:.0} MiB",
        get("VmRSS"),
        get("RssAnon"),
        get("RssFile"),
        get("VmHWM")
    ));
    if let Some(peak) = llama_peak {
        report.note(&format!(
            "llama-server alone (the LLM only, same context length) peaked at {:.0} MiB",
            mib(peak)
        ));
    }
    Ok(())
}

/// POSTs JSON and fails on an error status.
async fn post_ok(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<()> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("POST {url} answered {status}: {text}");
    }
    Ok(())
}

/// Sends one streaming chat request and times its content deltas.
async fn stream_chat(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Sample> {
    let mut start = Instant::now();
    let mut response = match client.post(url).json(body).send().await {
        Ok(r) => r,
        // A keep-alive connection the server closed just as it was reused:
        // the request never reached it. Send it again, timed afresh.
        Err(e) if e.is_request() => {
            start = Instant::now();
            client.post(url).json(body).send().await?
        }
        Err(e) => return Err(e.into()),
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("answered {status}: {text}");
    }
    let mut stream = SseTimer::default();
    while let Some(bytes) = response.chunk().await? {
        stream.push(&bytes, start)?;
        if stream.done {
            break;
        }
    }
    stream.sample()
}

/// Splits a Server-Sent Events stream of chat chunks into lines and notes
/// when each content delta arrived.
#[derive(Debug, Default)]
struct SseTimer {
    buffer: Vec<u8>,
    first: Option<Instant>,
    last: Option<Instant>,
    ttft: Option<Duration>,
    tokens: usize,
    text: String,
    done: bool,
}

impl SseTimer {
    fn push(&mut self, bytes: &[u8], start: Instant) -> anyhow::Result<()> {
        let now = Instant::now();
        self.buffer.extend_from_slice(bytes);
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\r', '\n']), now, start)?;
        }
        Ok(())
    }

    fn line(&mut self, line: &str, now: Instant, start: Instant) -> anyhow::Result<()> {
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(()); // comments, event names, blank separators
        };
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data)
            .with_context(|| format!("a stream event is not JSON: {data}"))?;
        if let Some(error) = chunk.get("error") {
            bail!("the stream carried an error: {error}");
        }
        let content = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !content.is_empty() {
            if self.first.is_none() {
                self.first = Some(now);
                self.ttft = Some(now - start);
            }
            self.last = Some(now);
            self.tokens += 1;
            self.text.push_str(content);
        }
        Ok(())
    }

    fn sample(self) -> anyhow::Result<Sample> {
        let (Some(first), Some(last), Some(ttft)) = (self.first, self.last, self.ttft) else {
            bail!("the stream ended without any content");
        };
        let after = (last - first).as_secs_f64();
        Ok(Sample {
            ttft_ms: ms(ttft),
            tokens: self.tokens,
            tokens_per_s: (self.tokens >= 2 && after > 0.0)
                .then(|| (self.tokens - 1) as f64 / after),
            text: self.text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_split_across_chunks() {
        let start = Instant::now();
        let mut t = SseTimer::default();
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Once\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\" upon\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        // Feed it in awkward pieces.
        for piece in stream.as_bytes().chunks(7) {
            t.push(piece, start).unwrap();
        }
        assert!(t.done);
        let s = t.sample().unwrap();
        assert_eq!(s.tokens, 2);
        assert_eq!(s.text, "Once upon");
    }

    #[test]
    fn sse_errors_and_empty_streams() {
        let start = Instant::now();
        let mut t = SseTimer::default();
        assert!(t.push(b"data: {\"error\":\"boom\"}\n", start).is_err());
        let mut t = SseTimer::default();
        assert!(t.push(b"data: not json\n", start).is_err());
        let mut t = SseTimer::default();
        t.push(b"data: [DONE]\n", start).unwrap();
        assert!(t.sample().is_err());
    }
}
