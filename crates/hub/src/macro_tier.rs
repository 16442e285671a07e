//! The macro tier: OpenAI-compatible `/v1/chat/completions` and
//! `/v1/embeddings` for enrolled devices (over their mutual-TLS identity)
//! and the operator, plus `GET /v1/macro`, which tells a device what the
//! tier offers.
//!
//! Answers come from models the hub runs itself (through the same
//! `serving` code the agents use) or from an upstream OpenAI-compatible
//! service, whose failures (errors, 5xx, timeouts, silence inside a stream)
//! open a circuit breaker: while it is open the hub answers 503 at once
//! instead of making every device wait for the upstream's timeout, and
//! after the open period one probe request decides whether it closes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use protocol::openai::{ChatCompletionRequest, EmbeddingRequest};
use protocol::route::MacroInfo;
use serde_json::Value;
use serving::{Admission, ApiError, Inference};

use crate::Error;
use crate::api::{AppState, DeviceAuth, OperatorAuth, Peer};
use crate::config::{MacroConfig, UpstreamConfig};

/// The hub's macro tier.
pub struct MacroTier {
    info: MacroInfo,
    backend: Backend,
}

impl std::fmt::Debug for MacroTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacroTier")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

enum Backend {
    Local(Arc<Inference>),
    Upstream(Upstream),
}

struct Upstream {
    client: reqwest::Client,
    config: UpstreamConfig,
    breaker: Mutex<router::Breaker>,
    origin: Instant,
}

impl MacroTier {
    /// Loads the configured models (off the async executor) or prepares
    /// the upstream client; `None` when the hub has no macro tier.
    pub async fn start(config: &MacroConfig) -> Result<Option<Arc<Self>>, Error> {
        if let Some(up) = &config.upstream {
            let client = reqwest::Client::builder()
                .connect_timeout(up.timeout.min(Duration::from_secs(10)))
                .build()
                .map_err(|e| Error::Config(format!("macro upstream client: {e}")))?;
            tracing::info!(url = %up.url, "macro tier proxies an upstream service");
            return Ok(Some(Arc::new(Self {
                info: MacroInfo {
                    chat_model: up.chat_model.clone(),
                    embedding_model: up.embedding_model.clone(),
                    context_tokens: up.context_tokens,
                    supports_tools: up.supports_tools,
                    backend: "upstream".into(),
                },
                backend: Backend::Upstream(Upstream {
                    client,
                    config: up.clone(),
                    breaker: Mutex::new(router::Breaker::new(config.breaker)),
                    origin: Instant::now(),
                }),
            })));
        }
        if config.catalogue.entries.is_empty() {
            return Ok(None);
        }
        let catalogue = config.catalogue.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            runtime::catalogue::load(&catalogue, &Default::default())
        })
        .await
        .map_err(|e| Error::Config(format!("macro models: {e}")))?;
        for (id, e) in &loaded.failures {
            tracing::error!(model = %id, error = %e, "macro model failed to load");
        }
        let chat_model = config
            .chat_model
            .clone()
            .filter(|id| loaded.models.contains_key(id));
        let embedding_model = config
            .embedding_model
            .clone()
            .filter(|id| loaded.models.contains_key(id));
        let context_tokens = chat_model
            .as_ref()
            .and_then(|id| loaded.models.get(id))
            .and_then(|m| m.as_generator().map(|g| g.context_length()))
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        tracing::info!(chat = ?chat_model, embedding = ?embedding_model, "macro tier serves its own models");
        let inference = Inference::new(
            loaded.models,
            Admission::new(
                config.max_concurrent,
                config.max_queued,
                Duration::from_secs(120),
            ),
        );
        Ok(Some(Arc::new(Self {
            info: MacroInfo {
                chat_model,
                embedding_model,
                context_tokens,
                supports_tools: false,
                backend: "local".into(),
            },
            backend: Backend::Local(Arc::new(inference)),
        })))
    }

    /// What the tier offers.
    pub fn info(&self) -> &MacroInfo {
        &self.info
    }
}

/// A caller of the macro tier: an enrolled device (by its client
/// certificate) or the operator (by the bearer credential).
#[derive(Debug)]
pub struct MacroCaller;

impl FromRequestParts<AppState> for MacroCaller {
    type Rejection = web::ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let has_cert = parts
            .extensions
            .get::<Peer>()
            .is_some_and(|p| p.client_cert.is_some());
        if has_cert {
            DeviceAuth::from_request_parts(parts, state).await?;
        } else {
            OperatorAuth::from_request_parts(parts, state).await?;
        }
        Ok(Self)
    }
}

fn tier(state: &AppState) -> Result<Arc<MacroTier>, ApiError> {
    state.macro_tier().ok_or_else(|| {
        if state.macro_configured() {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "macro_loading",
                "the macro tier is still loading its models",
            )
            .retry_after(1);
        }
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "macro_not_configured",
            "this hub has no macro tier ([macro] in its configuration)",
        )
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_body",
            format!("the request body is not a valid request: {e}"),
        )
    })
}

/// `GET /v1/macro`: what the macro tier offers.
#[utoipa::path(get, path = "/v1/macro", tag = "macro",
    responses((status = 200, description = "The macro tier's offer", body = MacroInfo),
              (status = 503, description = "This hub has no macro tier")))]
pub async fn info(_caller: MacroCaller, State(state): State<AppState>) -> Response {
    match tier(&state) {
        Ok(t) => axum::Json(t.info.clone()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/chat/completions`: a chat answer from the macro model,
/// whole or streamed (OpenAI's format).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "macro",
    responses((status = 200, description = "An OpenAI chat completion or an event stream of chunks"),
              (status = 503, description = "No macro tier, or its upstream is failing")))]
pub async fn chat(
    _caller: MacroCaller,
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let t = match tier(&state) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let Some(model) = t.info.chat_model.clone() else {
        return no_model("chat");
    };
    // A question that needs fleet-wide data gets the fleet's figures.
    let fleet = headers
        .get(protocol::route::CONTEXT_HEADER)
        .is_some_and(|v| v.as_bytes() == b"fleet");
    let body = if fleet {
        match with_fleet_context(&state, &body).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        }
    } else {
        body
    };
    match &t.backend {
        Backend::Local(inference) => {
            let mut req: ChatCompletionRequest = match parse(&body) {
                Ok(r) => r,
                Err(e) => return e.into_response(),
            };
            req.model = model;
            req.strata = None;
            let job = match inference.chat_job(req) {
                Ok(j) => j,
                Err(e) => return e.into_response(),
            };
            if job.stream() {
                return serving::stream_chat(Arc::clone(inference), job, None).await;
            }
            match serving::run_chat(inference, job).await {
                Ok(answer) => axum::Json(answer).into_response(),
                Err(e) => e.into_response(),
            }
        }
        Backend::Upstream(up) => up.forward("/chat/completions", &body, &model).await,
    }
}

/// `POST /v1/embeddings`: embeddings from the macro tier's model.
#[utoipa::path(post, path = "/v1/embeddings", tag = "macro",
    responses((status = 200, description = "An OpenAI embeddings response"),
              (status = 503, description = "No macro tier, or its upstream is failing")))]
pub async fn embeddings(
    _caller: MacroCaller,
    State(state): State<AppState>,
    body: Bytes,
) -> Response {
    let t = match tier(&state) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let Some(model) = t.info.embedding_model.clone() else {
        return no_model("embedding");
    };
    match &t.backend {
        Backend::Local(inference) => {
            let mut req: EmbeddingRequest = match parse(&body) {
                Ok(r) => r,
                Err(e) => return e.into_response(),
            };
            req.model = model;
            req.strata = None;
            match serving::embed(inference, req).await {
                Ok(answer) => axum::Json(answer).into_response(),
                Err(e) => e.into_response(),
            }
        }
        Backend::Upstream(up) => up.forward("/embeddings", &body, &model).await,
    }
}

/// How far back the fleet context of a question reaches.
const FLEET_CONTEXT_MS: i64 = 7 * 24 * 3600 * 1000;

/// Puts a system message with the fleet's insight figures (last 7 days,
/// per site, kind and series) before the request's messages.
async fn with_fleet_context(state: &AppState, body: &[u8]) -> Result<Bytes, ApiError> {
    let mut value: Value = parse(body)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let rows = state
        .store()
        .insight_summary(now - FLEET_CONTEXT_MS, now + 60_000, 40)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "fleet_data_unavailable",
                format!("cannot read the fleet's insights: {e}"),
            )
        })?;
    let mut context = String::from(
        "You answer questions about a fleet of edge devices, using the hub's figures \
         below: insights the devices reported over the last 7 days, per site, as \
         kind/series: number of insights (sum of their values). Answer from these \
         figures only, briefly; if they do not cover the question, say so.\n",
    );
    if rows.is_empty() {
        context.push_str("(no insights in the last 7 days)\n");
    }
    // Fleet-wide totals first: a small model adds up poorly.
    let mut totals: std::collections::BTreeMap<(String, String), (u64, f64)> = Default::default();
    for (_, kind, series, count, sum) in &rows {
        let t = totals.entry((kind.clone(), series.clone())).or_default();
        t.0 += count;
        t.1 += sum;
    }
    let sites: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    context.push_str(&format!("Whole fleet ({} sites):\n", sites.len()));
    for ((kind, series), (count, sum)) in &totals {
        context.push_str(&format!(
            "  all sites: {kind}/{series}: {count} ({sum:.1})\n"
        ));
    }
    context.push_str("Per site:\n");
    for (site, kind, series, count, sum) in &rows {
        context.push_str(&format!("  {site}: {kind}/{series}: {count} ({sum:.1})\n"));
    }
    if let Some(messages) = value.get_mut("messages").and_then(Value::as_array_mut) {
        messages.insert(0, serde_json::json!({"role": "system", "content": context}));
    }
    Ok(Bytes::from(serde_json::to_vec(&value).unwrap_or_default()))
}

fn no_model(kind: &str) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        "macro_model_unavailable",
        format!("the macro tier has no {kind} model"),
    )
    .into_response()
}

impl Upstream {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, router::Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, why: &str) -> Response {
        let now = self.now_ms();
        self.breaker().record_failure(now);
        tracing::warn!(upstream = %self.config.url, why, "macro upstream failed");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_failed",
            format!("the macro tier's upstream failed: {why}"),
        )
        .into_response()
    }

    /// Sends `body` to the upstream's `path` with the upstream model's
    /// name, and relays the answer (streamed answers as they come).
    async fn forward(&self, path: &str, body: &[u8], model: &str) -> Response {
        let now = self.now_ms();
        if !self.breaker().allow(now) {
            let retry = match self.breaker().state(now) {
                router::BreakerState::Open { retry_in_ms } => retry_in_ms.div_ceil(1000).max(1),
                _ => 1,
            };
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "upstream_breaker_open",
                "the macro tier's upstream is failing; its circuit breaker is open",
            )
            .retry_after(retry)
            .into_response();
        }
        let mut value: Value = match parse(body) {
            Ok(v) => v,
            Err(e) => return e.into_response(),
        };
        let stream = value
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(obj) = value.as_object_mut() {
            obj.insert("model".into(), Value::String(model.to_owned()));
            obj.remove("strata");
        }
        let mut request = self
            .client
            .post(format!("{}{path}", self.config.url))
            .json(&value);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let timeout = self.config.timeout;
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return self.failed(&format!("no answer within {} ms", timeout.as_millis())),
            Ok(Err(e)) => return self.failed(&e.to_string()),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return self.failed(&format!("it answered {status}"));
        }
        if !status.is_success() {
            // The upstream refused this request: the request's fault, not
            // the upstream's health. Relay it.
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = response.bytes().await.unwrap_or_default();
            return (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
        }
        if !stream {
            return match tokio::time::timeout(timeout, response.bytes()).await {
                Err(_) => self.failed("the answer did not arrive in time"),
                Ok(Err(e)) => self.failed(&e.to_string()),
                Ok(Ok(bytes)) => {
                    self.breaker().record_success(self.now_ms());
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        bytes,
                    )
                        .into_response()
                }
            };
        }
        self.breaker().record_success(self.now_ms());
        // Relay the stream; silence longer than the timeout ends it (the
        // device sees a stream without `[DONE]` and reports a clean error).
        let bytes = response.bytes_stream();
        let relayed = futures_util::stream::unfold(bytes, move |mut bytes| async move {
            match tokio::time::timeout(timeout, bytes.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok::<_, std::io::Error>(chunk), bytes)),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), bytes)),
                Ok(None) | Err(_) => None,
            }
        });
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(relayed),
        )
            .into_response()
    }
}
