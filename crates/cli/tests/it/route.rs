//! The router end to end: real agents and hubs on loopback, the real
//! micro model on the device and a real macro model on the hub, and the
//! faults the router must survive (hub down, hub killed mid-stream, local
//! model missing, failing upstream).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{Agent, Hub, assets, built_once, train_intents, wait_for};

const EMAIL: &str = "jane.doe@example.com";
const PRIVATE_PROMPT: &str =
    "Please send the receipt to jane.doe@example.com and charge card 4111 1111 1111 1111.";
const FLEET_QUESTION: &str = "how many anomalies did all the sites report this week";

fn smollm2() -> PathBuf {
    assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn minilm() -> PathBuf {
    assets().join("all-minilm-l6-v2")
}

/// The intent head with Strata's fleet-question intent, trained once.
fn fleet_head() -> PathBuf {
    let dir = built_once("route-head", |dir| {
        train_intents(&dir.join("intents.safetensors"), &["--fleet-questions"]);
    });
    dir.join("intents.safetensors")
}

/// A hub whose macro tier runs SmolLM2 and MiniLM itself (a small macro
/// model keeps the suite fast; the demo runs Qwen2.5).
fn macro_hub_config(dir: &Path) -> PathBuf {
    let path = dir.join("hub.toml");
    std::fs::write(
        &path,
        format!(
            "[macro]\n\n[[macro.models]]\nid = \"macro-chat\"\nkind = \"llm\"\npath = {:?}\ncontext_length = 2048\n\n[[macro.models]]\nid = \"macro-embed\"\nkind = \"embedding\"\npath = {:?}\n",
            smollm2().display().to_string(),
            minilm().display().to_string()
        ),
    )
    .unwrap();
    path
}

/// An agent config: SmolLM2 (or `llm_path`), MiniLM and the fleet head.
fn edge_config(dir: &Path, llm_path: &Path, extra: &str) -> PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "{extra}\n[[models]]\nid = \"smollm2\"\nkind = \"llm\"\npath = {:?}\ncontext_length = 1024\n\n[[models]]\nid = \"minilm\"\nkind = \"embedding\"\npath = {:?}\n\n[[models]]\nid = \"intents\"\nkind = \"classifier\"\npath = {:?}\nembedding_model = \"minilm\"\n",
            llm_path.display().to_string(),
            minilm().display().to_string(),
            fleet_head().display().to_string(),
        ),
    )
    .unwrap();
    path
}

async fn router_status(agent: &Agent) -> Option<Value> {
    reqwest::get(format!("{}/v1/router", agent.local))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Waits until the agent knows what the hub's macro tier offers.
async fn wait_macro_known(agent: &Agent) {
    wait_for(
        "the agent to learn the macro tier",
        Duration::from_secs(60),
        || async {
            router_status(agent)
                .await
                .filter(|s| s["hub_connected"] == true && s["macro_tier"].is_object())
        },
    )
    .await;
}

async fn chat(agent: &Agent, body: Value, headers: &[(&str, &str)]) -> (u16, Value, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", agent.local))
        .timeout(Duration::from_secs(300))
        .json(&body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let header = r
        .headers()
        .get("x-strata-route")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, r.json().await.unwrap(), header)
}

fn ask(content: &str, mode: Option<&str>) -> Value {
    let mut body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": 12,
    });
    if let Some(mode) = mode {
        body["strata"] = json!({"mode": mode});
    }
    body
}

fn codes(v: &Value) -> Vec<String> {
    v["strata"]["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn audit_lines(agent: &Agent) -> Vec<Value> {
    std::fs::read_to_string(agent.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    hub: Hub,
    agent: Agent,
}

async fn setup(llm: Option<&Path>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(tmp.path(), Some(&macro_hub_config(tmp.path())), &[]).await;
    let llm = llm.map_or_else(smollm2, Path::to_path_buf);
    let cfg = edge_config(tmp.path(), &llm, "");
    let agent = Agent::enrol_with_config(&hub, tmp.path().join("agent"), &cfg).await;
    wait_macro_known(&agent).await;
    Setup {
        _tmp: tmp,
        hub,
        agent,
    }
}

#[tokio::test]
async fn private_data_stays_on_the_device_and_fleet_questions_go_to_the_hub() {
    let s = setup(None).await;
    let agent = &s.agent;

    // A fleet-wide question needs the hub.
    let (status, body, header) = chat(agent, ask(FLEET_QUESTION, None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "macro", "{body}");
    assert_eq!(body["model"], "macro-chat");
    assert!(codes(&body).contains(&"fleet_data".to_owned()), "{body}");
    assert!(header.starts_with("tier=macro"), "{header}");
    assert!(body["strata"]["policy_version"].is_string());
    assert!(body["strata"]["cost_usd"].as_f64().unwrap() > 0.0, "{body}");
    assert!(body["strata"]["tokens"]["completion"].as_u64().unwrap() > 0);
    let audit = audit_lines(agent);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["data_class"], "general");
    assert_eq!(audit[0]["kind"], "chat");
    assert!(
        audit[0]["destination"]
            .as_str()
            .unwrap()
            .starts_with(&s.hub.url),
        "{audit:?}"
    );

    // A device command is the device's own business: local, no cascade.
    let (status, body, _) = chat(agent, ask("turn on the lights in the kitchen", None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "local", "{body}");
    assert!(codes(&body).contains(&"local_intent".to_owned()), "{body}");

    // Personal data never leaves, whatever the caller prefers.
    for mode in ["prefer_macro", "prefer_local"] {
        let (status, body, header) = chat(agent, ask(PRIVATE_PROMPT, Some(mode)), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["strata"]["tier"], "local", "{mode}: {body}");
        assert!(header.starts_with("tier=local"), "{header}");
        assert_eq!(codes(&body)[0], "private", "{body}");
        let classes = body["strata"]["data_classes"].to_string();
        assert!(
            classes.contains("email") && classes.contains("payment_card"),
            "{classes}"
        );
    }
    // Asked to run only on the macro tier, a private request is refused.
    let (status, body, _) = chat(agent, ask(PRIVATE_PROMPT, Some("only_macro")), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["strata"]["tier"], "none");
    assert!(body["error"]["message"].is_string());
    // A caller can mark any request private (here by header).
    let (status, body, _) = chat(
        agent,
        ask(FLEET_QUESTION, Some("prefer_macro")),
        &[("x-strata-private", "true")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "local", "{body}");
    // Nothing private reached the audit log or left the device.
    let audit_text = std::fs::read_to_string(agent.dir.join("audit.log")).unwrap();
    assert_eq!(audit_lines(agent).len(), 1, "{audit_text}");
    assert!(!audit_text.contains(EMAIL) && !audit_text.contains("4111"));

    // A streamed macro answer ends with the decision record, then [DONE].
    let mut body = ask("Say hello to the whole fleet.", Some("only_macro"));
    body["stream"] = true.into();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", agent.local))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["x-strata-route"]
            .to_str()
            .unwrap()
            .starts_with("tier=macro")
    );
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let record: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(record["strata"]["tier"], "macro", "{text}");
    assert!(events.len() > 3, "{text}");

    // Embeddings route too; the hub's MiniLM gives the device's vectors.
    let embed = |mode: &'static str| {
        let url = format!("{}/v1/embeddings", agent.local);
        async move {
            let v: Value = reqwest::Client::new()
                .post(url)
                .json(&json!({"model": "minilm", "input": "a feline rests on the rug", "strata": {"mode": mode}}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let remote = embed("only_macro").await;
    let local = embed("only_local").await;
    assert_eq!(remote["strata"]["tier"], "macro", "{remote}");
    assert_eq!(local["strata"]["tier"], "local", "{local}");
    let a: Vec<f64> = serde_json::from_value(remote["data"][0]["embedding"].clone()).unwrap();
    let b: Vec<f64> = serde_json::from_value(local["data"][0]["embedding"].clone()).unwrap();
    let cos: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(cos > 0.999, "cosine {cos}");

    // The router's figures are on /metrics.
    let metrics = reqwest::get(format!("{}/metrics", agent.local))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("strata_edge_route_decisions_total{tier=\"macro\",reason=\"fleet_data\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_the_hub_down_prefer_local_answers_here_and_only_macro_gets_503() {
    let mut s = setup(None).await;
    let agent = &s.agent;
    s.hub.kill();
    wait_for(
        "the agent to see the hub go",
        Duration::from_secs(60),
        || async {
            router_status(agent)
                .await
                .filter(|v| v["hub_connected"] == false)
        },
    )
    .await;
    let (status, body, _) = chat(agent, ask("What is the capital of France?", None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "local", "{body}");
    let (status, body, _) = chat(
        agent,
        ask("What is the capital of France?", Some("only_macro")),
        &[],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["strata"]["tier"], "none");
    assert!(
        codes(&body).contains(&"hub_unreachable".to_owned()),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("hub"), "{message}");
}

#[tokio::test]
async fn a_hub_killed_mid_stream_ends_the_stream_with_an_error_not_a_hang() {
    let mut s = setup(None).await;
    let mut body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper and the sea."}],
        "temperature": 0.8, "seed": 1, "max_tokens": 1500, "stream": true,
        "strata": {"mode": "only_macro"},
    });
    body["stream"] = true.into();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.agent.local))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    // Kill the hub once the answer is flowing.
    while !seen.contains("\"content\"") {
        let chunk = stream.next().await.expect("stream ended early").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    s.hub.kill();
    let started = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream hung after the hub died");
    assert!(
        seen.contains("macro_stream_failed"),
        "no error event after {:?}: {seen}",
        started.elapsed()
    );
    assert!(!seen.contains("[DONE]"), "{seen}");
}

#[tokio::test]
async fn a_private_request_with_the_local_model_down_is_refused() {
    // The device's chat model is a truncated file: it fails to load.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("truncated.gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 3]).unwrap();
    let s = setup(Some(&broken)).await;
    let (status, body, header) = chat(&s.agent, ask(PRIVATE_PROMPT, None), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["strata"]["tier"], "none", "{body}");
    assert!(header.starts_with("tier=none"), "{header}");
    assert!(codes(&body).contains(&"private".to_owned()), "{body}");
    assert!(audit_lines(&s.agent).is_empty());
    // Without personal data the macro tier answers instead.
    let (status, body, _) = chat(&s.agent, ask("Name a colour of the sky.", None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "macro", "{body}");
    assert_eq!(audit_lines(&s.agent).len(), 1);
}

/// A stand-in for an upstream OpenAI-compatible service whose behaviour
/// the test switches: 0 answers 500, 1 never answers, 2 answers properly.
/// The last request body it received is kept in `seen`.
async fn upstream(mode: Arc<AtomicU32>, seen: Arc<std::sync::Mutex<Value>>) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
            let mode = Arc::clone(&mode);
            *seen.lock().unwrap() = body;
            async move {
                use axum::response::IntoResponse;
                if headers.get("authorization").and_then(|v| v.to_str().ok())
                    != Some("Bearer upstream-secret")
                {
                    return (axum::http::StatusCode::UNAUTHORIZED, "no key").into_response();
                }
                match mode.load(Ordering::SeqCst) {
                    0 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
                    1 => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        "late".into_response()
                    }
                    _ => axum::Json(json!({
                        "id": "chatcmpl-up", "object": "chat.completion", "created": 0,
                        "model": "up-model",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                    }))
                    .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_failing_upstream_opens_the_breaker_which_closes_again() {
    let mode = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Value::Null));
    let url = upstream(Arc::clone(&mode), Arc::clone(&seen)).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[macro]\nupstream_url = {url:?}\nupstream_api_key_env = \"UPSTREAM_KEY\"\nupstream_chat_model = \"up-model\"\nupstream_timeout_ms = 1000\nbreaker_failures = 2\nbreaker_open_ms = 1500\n"
        ),
    )
    .unwrap();
    let hub = Hub::start_with(
        tmp.path(),
        Some(&cfg),
        &[("UPSTREAM_KEY", "upstream-secret")],
    )
    .await;
    let call = || async {
        let started = Instant::now();
        let r = hub
            .client()
            .post(format!("{}/v1/chat/completions", hub.url))
            .bearer_auth(&hub.operator_token)
            .json(&ask("hello", None))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (status, body, started.elapsed())
    };
    // Two 500s open the breaker; the next call is refused at once.
    for _ in 0..2 {
        let (status, body, _) = call().await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"]["code"], "upstream_failed");
    }
    let (status, body, took) = call().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_breaker_open");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // The upstream recovers: after the open period a probe closes it.
    mode.store(2, Ordering::SeqCst);
    let answer = wait_for("the breaker to close", Duration::from_secs(30), || async {
        let (status, body, _) = call().await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(answer["choices"][0]["message"]["content"], "fine");
    assert_eq!(seen.lock().unwrap()["model"], "up-model");
    // A fleet question reaches the model with the fleet's figures.
    let r = hub
        .client()
        .post(format!("{}/v1/chat/completions", hub.url))
        .bearer_auth(&hub.operator_token)
        .header("x-strata-context", "fleet")
        .json(&ask(FLEET_QUESTION, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = seen.lock().unwrap().clone();
    assert_eq!(body["messages"][0]["role"], "system", "{body}");
    let context = body["messages"][0]["content"].as_str().unwrap();
    assert!(context.contains("Whole fleet"), "{context}");
    assert_eq!(body["messages"][1]["content"], FLEET_QUESTION);
    // A hanging upstream counts too: two timeouts open it again.
    mode.store(1, Ordering::SeqCst);
    for _ in 0..2 {
        let (status, body, took) = call().await;
        assert_eq!(status, 502, "{body}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    let (status, _, _) = call().await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn unsure_answers_escalate_once_and_the_daily_budget_caps_the_macro_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(tmp.path(), Some(&macro_hub_config(tmp.path())), &[]).await;
    // Every local answer counts as unsure (and no intent is a device
    // command that would stay here); a macro token costs $0.001 and
    // the day's budget is $0.04: the router lets a request go only when
    // the budget covers its estimate (prompt plus max_tokens, about
    // $0.03 here), which the first escalation leaves it unable to.
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "version = \"test-7\"\n[confidence]\nmin_mean_logprob = -0.0001\n[capability]\nlocal_intents = []\n[cost]\nmacro_usd_per_1k_tokens = 1.0\ndaily_budget_usd = 0.04\n",
    )
    .unwrap();
    let cfg = edge_config(
        tmp.path(),
        &smollm2(),
        &format!(
            "[router]\npolicy_file = {:?}\n",
            policy.display().to_string()
        ),
    );
    let mut agent = Agent::enrol_with_config(&hub, tmp.path().join("agent"), &cfg).await;
    wait_macro_known(&agent).await;

    let (status, body, header) = chat(&agent, ask("Name a colour of the sky.", None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "macro", "{body}");
    assert_eq!(body["strata"]["escalated"], true);
    assert_eq!(body["strata"]["policy_version"], "test-7");
    assert!(
        codes(&body).contains(&"low_confidence".to_owned()),
        "{body}"
    );
    assert!(header.contains("escalated"), "{header}");
    let spent = body["strata"]["cost_usd"].as_f64().unwrap();
    assert!(spent > 0.015, "{body}");

    // The budget is spent: the next unsure answer stays local, and a
    // question only the hub can answer is refused with 429.
    let (status, body, _) = chat(&agent, ask("Name a colour of grass.", None), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strata"]["tier"], "local", "{body}");
    assert_eq!(body["strata"]["escalated"], false);
    let (status, body, _) = chat(&agent, ask(FLEET_QUESTION, None), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(codes(&body).contains(&"cost_budget".to_owned()), "{body}");

    // The day's spend survives a restart of the agent.
    agent.kill();
    let agent = Agent::start_with(tmp.path().join("agent"), Some(&cfg)).await;
    wait_macro_known(&agent).await;
    let status = router_status(&agent).await.unwrap();
    assert!(
        status["spent_today_usd"].as_f64().unwrap() >= spent,
        "{status}"
    );
    let (status, body, _) = chat(&agent, ask(FLEET_QUESTION, None), &[]).await;
    assert_eq!(status, 429, "{body}");
}
