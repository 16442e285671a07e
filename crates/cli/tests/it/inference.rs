//! The agent's inference API on the real models, through real HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use protocol::openai::{
    ChatCompletion, ClassifyResponse, EmbeddingResponse, EmbeddingVector, ErrorBody, ModelList,
};

use crate::support::{Agent, Hub, assets, train_intents};

fn smollm2() -> PathBuf {
    assets().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Writes an edge config serving the given `[[models]]` TOML.
fn config(dir: &Path, inference: &str, models: &str) -> PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(&path, format!("{inference}\n{models}")).unwrap();
    path
}

fn train_head(dir: &Path) -> PathBuf {
    let out = dir.join("intents.safetensors");
    let stdout = train_intents(&out, &[]);
    let accuracy: f64 = stdout
        .split("held-out accuracy ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {stdout}"));
    assert!(accuracy > 0.9, "held-out accuracy {accuracy}");
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
}

async fn post(agent: &Agent, path: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", agent.local))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn openai_error(r: reqwest::Response) -> (u16, ErrorBody) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_api_serves_every_kind_of_model_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let head = train_head(tmp.path());
    // A model file cut short must not stop the others.
    let bytes = std::fs::read(smollm2()).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let assets = assets();
    let models = format!(
        r#"
[[models]]
id = "smollm2"
kind = "llm"
path = "{}"
context_length = 512

[[models]]
id = "minilm"
kind = "embedding"
path = "{}"

[[models]]
id = "intents"
kind = "classifier"
path = "{}"
embedding_model = "minilm"

[[models]]
id = "shuttle"
kind = "anomaly"
n_features = 9

[[models]]
id = "broken"
kind = "llm"
path = "{}"
"#,
        smollm2().display(),
        assets.join("all-minilm-l6-v2").display(),
        head.display(),
        truncated.display()
    );
    let cfg = config(tmp.path(), "", &models);
    let agent = Agent::enrol_with_config(&hub, tmp.path().join("a"), &cfg).await;

    let status = agent.status().await.unwrap();
    let broken = status.models.iter().find(|m| m.id == "broken").unwrap();
    assert!(!broken.loaded);
    assert!(
        broken.error.as_deref().unwrap().contains("truncated"),
        "{broken:?}"
    );
    assert_eq!(status.models.iter().filter(|m| m.loaded).count(), 4);

    let list: ModelList = reqwest::get(format!("{}/v1/models", agent.local))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["intents", "minilm", "shuttle", "smollm2"]);

    // Greedy chat gives the reference answer, with confidence and timings.
    let question = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 20,
        "logprobs": true,
    });
    let r = post(&agent, "/v1/chat/completions", question.clone()).await;
    assert_eq!(r.status(), 200);
    let chat: ChatCompletion = r.json().await.unwrap();
    assert_eq!(
        chat.choices[0].message.content,
        "The capital of France is Paris."
    );
    assert_eq!(chat.choices[0].finish_reason, "stop");
    assert_eq!(chat.usage.prompt_tokens, 16);
    assert_eq!(
        chat.choices[0].logprobs.as_ref().unwrap().content.len(),
        chat.usage.completion_tokens
    );
    let confidence = chat.strata.mean_logprob.unwrap();
    assert!(confidence < 0.0 && confidence > -1.0, "{confidence}");

    // Streaming gives the same text, chunk by chunk, then [DONE].
    let mut stream_req = question.clone();
    stream_req["stream"] = serde_json::json!(true);
    stream_req["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post(&agent, "/v1/chat/completions", stream_req).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut raw = String::new();
    while let Some(chunk) = body.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let datas: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let mut text = String::new();
    let mut usage = None;
    for d in &datas[..datas.len() - 1] {
        let chunk: protocol::openai::ChatCompletionChunk = serde_json::from_str(d).unwrap();
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or_default());
        }
        usage = usage.or(chunk.usage);
    }
    assert!(datas.len() > 5, "streamed in pieces: {datas:?}");
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(
        usage.unwrap().completion_tokens,
        chat.usage.completion_tokens
    );

    // Plain completion stops at max_tokens.
    let r = post(
        &agent,
        "/v1/completions",
        serde_json::json!({
            "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
        }),
    )
    .await;
    let completion: protocol::openai::Completion = r.json().await.unwrap();
    assert_eq!(
        completion.choices[0].finish_reason.as_deref(),
        Some("length")
    );
    assert_eq!(completion.usage.unwrap().completion_tokens, 5);

    // Embeddings: the reference similarity, one vector per input.
    let r = post(
        &agent,
        "/v1/embeddings",
        serde_json::json!({
            "model": "minilm", "input": ["The cat sits on the mat", "A feline rests on the rug"],
        }),
    )
    .await;
    let emb: EmbeddingResponse = r.json().await.unwrap();
    let vecs: Vec<Vec<f32>> = emb
        .data
        .into_iter()
        .map(|e| match e.embedding {
            EmbeddingVector::Float(v) => v,
            EmbeddingVector::Base64(_) => panic!("asked for floats"),
        })
        .collect();
    assert_eq!(vecs.len(), 2);
    assert_eq!(vecs[0].len(), 384);
    assert!((cosine(&vecs[0], &vecs[1]) - 0.5607).abs() < 0.005);
    assert!(emb.usage.prompt_tokens > 10);

    // Intent classification.
    let r = post(&agent, "/v1/classify", serde_json::json!({
        "model": "intents", "input": ["turn on the lights in the kitchen", "what is the weather like"],
    }))
    .await;
    let classified: ClassifyResponse = r.json().await.unwrap();
    assert_eq!(classified.data[0].label, "HassTurnOn");
    assert_eq!(classified.data[1].label, "HassGetWeather");
    assert!(classified.data[0].margin > 0.0);

    // Anomaly scores.
    let reading: Vec<f64> = vec![50.0, 0.0, 80.0, 0.0, 40.0, 2.0, 30.0, 40.0, 8.0];
    let r = post(
        &agent,
        "/v1/anomaly",
        serde_json::json!({
            "model": "shuttle", "readings": vec![reading.clone(); 20],
        }),
    )
    .await;
    let scores: protocol::openai::AnomalyResponse = r.json().await.unwrap();
    assert_eq!(scores.data.len(), 20);
    assert!(scores.data.iter().all(|s| (0.0..=1.0).contains(&s.score)));

    // Bad input: OpenAI-format errors with the right status.
    let (status, e) = openai_error(
        post(
            &agent,
            "/v1/chat/completions",
            serde_json::json!({
                "model": "gpt-17", "messages": [{"role": "user", "content": "hi"}],
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(e.error.code.as_deref(), Some("model_not_found"));
    let long = "word ".repeat(2000);
    let (status, e) = openai_error(
        post(
            &agent,
            "/v1/chat/completions",
            serde_json::json!({
                "model": "smollm2", "messages": [{"role": "user", "content": long}],
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e.error.code.as_deref(), Some("context_length_exceeded"));
    assert!(e.error.message.contains("512"), "{}", e.error.message);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", agent.local))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let (status, _) = openai_error(r).await;
    assert_eq!(status, 400);
    let (status, e) = openai_error(
        post(
            &agent,
            "/v1/embeddings",
            serde_json::json!({
                "model": "smollm2", "input": "x",
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e.error.param.as_deref(), Some("model"));
    let (status, _) = openai_error(
        post(
            &agent,
            "/v1/anomaly",
            serde_json::json!({
                "model": "shuttle", "readings": [[1.0, 2.0]],
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = openai_error(post(&agent, "/v1/chat/completions", serde_json::json!({
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": 7,
    })).await).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_agent_answers_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let models = format!(
        "[[models]]\nid = \"smollm2\"\nkind = \"llm\"\npath = \"{}\"\ncontext_length = 1024\n",
        smollm2().display()
    );
    let cfg = config(
        tmp.path(),
        "[inference]\nmax_concurrent = 1\nmax_queued = 0\n",
        &models,
    );
    let agent = Agent::enrol_with_config(&hub, tmp.path().join("a"), &cfg).await;
    let long_request = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 400, "temperature": 0, "stream": true,
    });
    let first = post(&agent, "/v1/chat/completions", long_request.clone()).await;
    assert_eq!(first.status(), 200);
    let mut first_body = first.bytes_stream();
    // The first request holds the only slot once it has streamed something.
    first_body.next().await.unwrap().unwrap();
    let second = post(&agent, "/v1/chat/completions", long_request).await;
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "1");
    let (_, e) = openai_error(second).await;
    assert_eq!(e.error.error_type, "rate_limit_error");
    // Dropping the first client cancels its generation and frees the slot.
    drop(first_body);
    crate::support::wait_for("the slot to be freed", Duration::from_secs(30), || async {
        let r = post(
            &agent,
            "/v1/completions",
            serde_json::json!({
                "model": "smollm2", "prompt": "Hi", "max_tokens": 2,
            }),
        )
        .await;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// The Python interpreter of the peers' virtual environment (`scripts/build-peers`).
fn peers_python() -> PathBuf {
    let peers = std::env::var_os("STRATA_PEERS").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/strata/peers")
        },
        PathBuf::from,
    );
    let python = peers.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/build-peers (it installs the openai client)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_talks_to_the_local_api() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let models = format!(
        "[[models]]\nid = \"smollm2\"\nkind = \"llm\"\npath = \"{}\"\n\n[[models]]\nid = \"minilm\"\nkind = \"embedding\"\npath = \"{}\"\n",
        smollm2().display(),
        assets().join("all-minilm-l6-v2").display()
    );
    let cfg = config(tmp.path(), "", &models);
    let agent = Agent::enrol_with_config(&hub, tmp.path().join("a"), &cfg).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let local = format!("{}/v1", agent.local);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(peers_python())
            .arg(script)
            .arg(local)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
