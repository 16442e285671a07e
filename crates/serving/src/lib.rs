//! OpenAI-compatible serving of runtime models: `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings` and `/v1/models`, plus Strata's
//! `/v1/classify` and `/v1/anomaly`, over a set of loaded
//! [`runtime::ModelBackend`]s.
//!
//! The edge agent serves its catalogue through it (behind its router, which
//! uses the library half: [`Inference::chat_job`], [`run_chat`],
//! [`stream_chat`]); the hub serves its macro model through [`router`]. It
//! is not a router and knows nothing of devices, hubs or insights: what a
//! deployment wants to learn from the traffic it gets through [`Observer`].
//!
//! Errors use OpenAI's error body (`{"error": {...}}`) so that OpenAI
//! clients report them properly. Work is admitted through [`Admission`]: a
//! bounded number of requests run, a bounded number wait, and the rest get
//! 429 with `Retry-After` at once rather than piling up.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use protocol::openai::{
    AnomalyRequest, AnomalyResponse, AnomalyScore, AssistantMessage, ChatChoice, ChatChunkChoice,
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs,
    Classification, ClassifyRequest, ClassifyResponse, Completion, CompletionChoice,
    CompletionLogprobs, CompletionRequest, Embedding, EmbeddingRequest, EmbeddingResponse,
    EmbeddingUsage, EmbeddingVector, ErrorBody, ErrorDetail, MessageContent, Model, ModelList,
    StrataTimings, TokenLogprob, TopLogprob, Usage,
};
use protocol::route::RouteRecord;
use runtime::{
    CancelToken, GeneratedToken, Generation, GenerationRequest, ModelBackend, Prompt,
    SamplingParams, StreamChunk, TextGenerator,
};
use tokio::sync::{Semaphore, mpsc};

/// An error in OpenAI's format.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with an HTTP status, OpenAI's error `type`, a `code` and a
    /// message.
    pub fn new(
        status: StatusCode,
        error_type: &str,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                message: message.into(),
                error_type: error_type.to_owned(),
                param: None,
                code: Some(code.to_owned()),
            },
            retry_after: None,
        }
    }

    /// A 400 for request parameter `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message,
        );
        e.detail.param = Some(param.to_owned());
        e
    }

    /// Names the request parameter at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.detail.param = Some(param.to_owned());
        self
    }

    /// Retry after `secs` seconds (sent as `Retry-After`).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body's inside.
    pub fn detail(&self) -> &ErrorDetail {
        &self.detail
    }

    fn from_runtime(e: runtime::Error) -> Self {
        match e {
            runtime::Error::PromptTooLong { .. } => {
                let mut err = Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "context_length_exceeded",
                    e.to_string(),
                );
                err.detail.param = Some("messages".into());
                err
            }
            runtime::Error::EmptyPrompt
            | runtime::Error::InvalidParameter { .. }
            | runtime::Error::InvalidToken { .. }
            | runtime::Error::ChatTemplate { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                e.to_string(),
            ),
            other => {
                tracing::error!(error = %other, "inference failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "inference_failed",
                    other.to_string(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body whose rejection is an OpenAI error.
pub struct OpenAiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                let status = match rejection {
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    JsonRejection::BytesRejection(_) => rejection.status(),
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError::new(
                    status,
                    "invalid_request_error",
                    "invalid_body",
                    rejection.body_text(),
                ))
            }
        }
    }
}

/// Bounded admission: `running` requests at a time, `queued` more waiting.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    wait_timeout: Duration,
}

/// A running request's slot; released on drop.
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    queued_for: Duration,
}

impl Admission {
    /// `running` concurrent requests, `max_waiting` queued, each waiting at
    /// most `wait_timeout`.
    pub fn new(running: usize, max_waiting: usize, wait_timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(running.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
            wait_timeout,
        }
    }

    fn busy() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "server_busy",
            "the device is busy with other requests; retry shortly",
        );
        e.retry_after = Some(1);
        e
    }

    /// Waits for a slot, or refuses at once when the queue is full.
    pub async fn admit(&self) -> Result<Slot, ApiError> {
        let start = Instant::now();
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(Slot {
                _permit: permit,
                queued_for: Duration::ZERO,
            });
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Self::busy());
        }
        let acquired =
            tokio::time::timeout(self.wait_timeout, Arc::clone(&self.permits).acquire_owned())
                .await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        match acquired {
            Ok(Ok(permit)) => Ok(Slot {
                _permit: permit,
                queued_for: start.elapsed(),
            }),
            _ => Err(Self::busy()),
        }
    }
}

/// Requests to one model counted while it is watched (an update's health
/// window); see [`Inference::watch`].
#[derive(Debug, Default)]
pub struct ModelWatch {
    inner: std::sync::Mutex<WatchCounts>,
}

/// What a [`ModelWatch`] counted.
#[derive(Debug, Default, Clone)]
pub struct WatchCounts {
    /// Requests served.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Latency of each request, in ms (the first 10,000).
    pub latencies_ms: Vec<f64>,
}

impl WatchCounts {
    /// The 95th-percentile latency, if any request was timed.
    pub fn p95_ms(&self) -> Option<f64> {
        if self.latencies_ms.is_empty() {
            return None;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((sorted.len() as f64) * 0.95).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

impl ModelWatch {
    fn record(&self, ms: f64, failed: bool) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.requests += 1;
        c.errors += u64::from(failed);
        if c.latencies_ms.len() < 10_000 {
            c.latencies_ms.push(ms);
        }
    }

    /// What was counted so far.
    pub fn counts(&self) -> WatchCounts {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A text generation model, checked to be one.
struct Generator(Arc<dyn ModelBackend>);

impl Generator {
    fn get(&self) -> &dyn TextGenerator {
        match self.0.as_generator() {
            Some(g) => g,
            // `generator()` builds a Generator only from a model that is one.
            None => unreachable!("a Generator wraps a text generation model"),
        }
    }
}

/// What a deployment learns from the traffic: the edge agent turns these
/// into insights and health figures. Every method must return quickly.
pub trait Observer: Send + Sync {
    /// One request to `model` ended after `ms`, failed or not.
    fn request(&self, model: &str, ms: f64, failed: bool);
    /// Raw input bytes a request brought to a model.
    fn raw_bytes(&self, bytes: u64);
    /// A text was classified as `label`.
    fn intent(&self, label: &str);
    /// Readings were scored by anomaly detector `model`; the response waits
    /// for the returned future (so that an alert is stored before the caller
    /// hears of the scores).
    fn anomalies<'a>(
        &'a self,
        model: &'a str,
        readings: &'a [Vec<f64>],
        scores: &'a [f64],
    ) -> futures_util::future::BoxFuture<'a, ()>;
}

/// The models served.
pub struct Inference {
    models: std::sync::RwLock<BTreeMap<String, Arc<dyn ModelBackend>>>,
    watches: std::sync::Mutex<BTreeMap<String, Arc<ModelWatch>>>,
    loaded_at: i64,
    admission: Admission,
    observer: Option<Arc<dyn Observer>>,
}

/// Times one request to a model for the insights' health figures. Dropped
/// without [`RequestTimer::ok`], the request counts as failed.
struct RequestTimer {
    observer: Option<Arc<dyn Observer>>,
    watch: Option<Arc<ModelWatch>>,
    model: String,
    started: Instant,
    ok: bool,
}

impl RequestTimer {
    fn ok(mut self) {
        self.ok = true;
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if let Some(observer) = &self.observer {
            observer.request(&self.model, ms, !self.ok);
        }
        if let Some(watch) = &self.watch {
            watch.record(ms, !self.ok);
        }
    }
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("models", &self.model_ids())
            .finish_non_exhaustive()
    }
}

impl Inference {
    /// Serves `models` with the given admission limits.
    pub fn new(models: BTreeMap<String, Arc<dyn ModelBackend>>, admission: Admission) -> Self {
        Self {
            models: std::sync::RwLock::new(models),
            watches: std::sync::Mutex::default(),
            loaded_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            admission,
            observer: None,
        }
    }

    /// Reports what is served to `observer` (intents, anomalies, health).
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn timer(&self, model: &str) -> RequestTimer {
        RequestTimer {
            observer: self.observer.clone(),
            watch: self
                .watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(model)
                .cloned(),
            model: model.to_owned(),
            started: Instant::now(),
            ok: false,
        }
    }

    fn observe_raw(&self, bytes: usize) {
        if let Some(o) = &self.observer {
            o.raw_bytes(bytes as u64);
        }
    }

    fn model_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn ModelBackend>>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every write is one insert), so recover from poisoning.
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn model_ids(&self) -> Vec<String> {
        self.model_map().keys().cloned().collect()
    }

    /// The model served as `id`, if any.
    pub fn get(&self, id: &str) -> Option<Arc<dyn ModelBackend>> {
        self.model_map().get(id).cloned()
    }

    /// Serves `model` as `id` from the next request on; requests already
    /// running finish on the model they started with. Returns the model it
    /// replaces.
    pub fn replace(&self, id: &str, model: Arc<dyn ModelBackend>) -> Option<Arc<dyn ModelBackend>> {
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), model)
    }

    /// Starts counting the requests to model `id` (replacing any earlier
    /// watch of it), until [`unwatch`](Self::unwatch).
    pub fn watch(&self, id: &str) -> Arc<ModelWatch> {
        let watch = Arc::new(ModelWatch::default());
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), Arc::clone(&watch));
        watch
    }

    /// Stops counting the requests to model `id`.
    pub fn unwatch(&self, id: &str) {
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn model(&self, id: &str) -> Result<Arc<dyn ModelBackend>, ApiError> {
        self.get(id).ok_or_else(|| {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "model_not_found",
                format!(
                    "model {id:?} is not served here; available: {}",
                    self.model_ids().join(", ")
                ),
            );
            e.detail.param = Some("model".into());
            e
        })
    }

    fn wrong_kind(id: &str, wanted: &str) -> ApiError {
        let mut e = ApiError::invalid("model", format!("model {id:?} is not {wanted}"));
        e.detail.code = Some("model_not_supported".into());
        e
    }
}

/// The routes that only the device's own models serve: `/v1/models`,
/// `/v1/classify` and `/v1/anomaly` (the edge agent routes the rest).
pub fn predict_router(inference: Arc<Inference>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/classify", post(classify))
        .route("/v1/anomaly", post(anomaly))
        .with_state(inference)
}

/// Every inference route, served straight from the models.
pub fn router(inference: Arc<Inference>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route("/v1/anomaly", post(anomaly))
        .with_state(inference)
}

async fn models(State(inf): State<Arc<Inference>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: inf
            .model_map()
            .iter()
            .map(|(id, m)| Model {
                id: id.clone(),
                object: "model".into(),
                created: inf.loaded_at,
                owned_by: "strata".into(),
                kind: m.kind().to_string(),
            })
            .collect(),
    })
}

struct Sampling {
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Vec<String>,
    top_logprobs: u8,
}

fn generation_request(prompt: Prompt, s: Sampling) -> Result<GenerationRequest, ApiError> {
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.unwrap_or(defaults.top_k),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        seed: s.seed,
    };
    if !(0.0..=2.0).contains(&sampling.temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
    }
    if s.stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    if s.max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    Ok(GenerationRequest {
        prompt,
        max_tokens: s.max_tokens,
        sampling,
        stop: s.stop,
        top_logprobs: s.top_logprobs,
    })
}

fn generator(inf: &Inference, id: &str) -> Result<Generator, ApiError> {
    let model = inf.model(id)?;
    if model.as_generator().is_none() {
        return Err(Inference::wrong_kind(id, "a text generation model"));
    }
    Ok(Generator(model))
}

fn text_of(content: MessageContent) -> Result<String, ApiError> {
    match content {
        MessageContent::Text(t) => Ok(t),
        MessageContent::Parts(parts) => {
            let mut out = String::new();
            for p in parts {
                if p.part_type != "text" {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("content parts of type {:?} are not supported", p.part_type),
                    ));
                }
                out.push_str(p.text.as_deref().unwrap_or_default());
            }
            Ok(out)
        }
    }
}

fn token_logprob(g: &dyn TextGenerator, t: &GeneratedToken) -> TokenLogprob {
    TokenLogprob {
        token: String::from_utf8_lossy(&t.bytes).into_owned(),
        logprob: t.logprob,
        bytes: t.bytes.clone(),
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|alt| {
                let bytes = g.token_bytes(alt.token);
                TopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    logprob: alt.logprob,
                    bytes,
                }
            })
            .collect(),
    }
}

fn timings(g: &Generation) -> StrataTimings {
    let mean_logprob = (!g.tokens.is_empty())
        .then(|| g.tokens.iter().map(|t| t.logprob).sum::<f32>() / g.tokens.len() as f32);
    StrataTimings {
        queue_ms: g.timings.queue_ms,
        prefill_ms: g.timings.prefill_ms,
        decode_ms: g.timings.decode_ms,
        prefill_tokens_per_s: g.timings.prefill_tokens_per_s,
        decode_tokens_per_s: g.timings.decode_tokens_per_s,
        mean_logprob,
        route: None,
    }
}

fn usage(g: &Generation) -> Usage {
    Usage {
        prompt_tokens: g.usage.prompt_tokens,
        completion_tokens: g.usage.completion_tokens,
        total_tokens: g.usage.prompt_tokens + g.usage.completion_tokens,
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn response_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}-{:016x}", rand::rng().random::<u64>())
}

/// Runs a generation on a blocking thread, sending chunks to `tx` as they
/// come. Generation stops when the receiver goes away (the client left).
fn spawn_generation(
    model: Arc<dyn ModelBackend>,
    request: GenerationRequest,
    tx: mpsc::Sender<StreamChunk>,
) -> tokio::task::JoinHandle<Result<Generation, ApiError>> {
    tokio::task::spawn_blocking(move || {
        let generator = model
            .as_generator()
            .ok_or_else(|| ApiError::invalid("model", "not a text generation model"))?;
        let cancel = CancelToken::new();
        generator
            .generate(&request, &cancel, &mut |chunk| {
                if tx.blocking_send(chunk.clone()).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .map_err(ApiError::from_runtime)
    })
}

/// A validated chat request, ready to run on its model.
pub struct ChatJob {
    model: Arc<dyn ModelBackend>,
    request: GenerationRequest,
    model_id: String,
    want_logprobs: bool,
    include_usage: bool,
    stream: bool,
}

impl std::fmt::Debug for ChatJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatJob")
            .field("model", &self.model_id)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl ChatJob {
    /// The client asked for a stream.
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// The client asked for usage in the stream's last chunk.
    pub fn include_usage(&self) -> bool {
        self.include_usage
    }

    /// The id of the model it runs on.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The model's context length in tokens.
    pub fn context_tokens(&self) -> usize {
        self.model.as_generator().map_or(0, |g| g.context_length())
    }

    /// The completion tokens asked for, if the client set a limit.
    pub fn max_tokens(&self) -> Option<u32> {
        self.request.max_tokens
    }

    /// The prompt's length in tokens of the model, chat template included.
    pub fn prompt_tokens(&self) -> Result<usize, ApiError> {
        let g = self
            .model
            .as_generator()
            .ok_or_else(|| Inference::wrong_kind(&self.model_id, "a text generation model"))?;
        g.count_tokens(&self.request.prompt)
            .map_err(ApiError::from_runtime)
    }
}

impl Inference {
    /// Checks a chat request and binds it to its model.
    pub fn chat_job(&self, req: ChatCompletionRequest) -> Result<ChatJob, ApiError> {
        let model = generator(self, &req.model)?.0;
        if req.n.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            let mut e = ApiError::invalid(
                "tools",
                format!("model {:?} does not take tools", req.model),
            );
            e.detail.code = Some("tools_not_supported".into());
            return Err(e);
        }
        for (name, v) in [
            ("frequency_penalty", req.frequency_penalty),
            ("presence_penalty", req.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(name, format!("{name} is not supported")));
            }
        }
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            let role = match m.role.as_str() {
                "developer" => "system".to_owned(),
                "system" | "user" | "assistant" => m.role.clone(),
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("message role {other:?} is not supported"),
                    ));
                }
            };
            messages.push(runtime::ChatMessage::new(role, text_of(m.content)?));
        }
        let want_logprobs = req.logprobs.unwrap_or(false);
        let top = req.top_logprobs.unwrap_or(0);
        if top > 20 {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs must be at most 20",
            ));
        }
        let request = generation_request(
            Prompt::Chat(messages),
            Sampling {
                max_tokens: req.max_completion_tokens.or(req.max_tokens),
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k,
                seed: req.seed,
                stop: req.stop.map(|s| s.into_vec()).unwrap_or_default(),
                top_logprobs: if want_logprobs { top } else { 0 },
            },
        )?;
        Ok(ChatJob {
            model,
            request,
            model_id: req.model,
            want_logprobs,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            stream: req.stream.unwrap_or(false),
        })
    }
}

/// Runs a chat job to its end and answers it whole (whatever the job's
/// `stream` flag). `strata.mean_logprob` carries the answer's confidence.
pub async fn run_chat(inf: &Inference, job: ChatJob) -> Result<ChatCompletion, ApiError> {
    let id = response_id("chatcmpl");
    let created = now();
    let model = Arc::clone(&job.model);
    let generation = generate_whole(inf, Arc::clone(&model), job.request).await?;
    let g = Generator(model);
    let g = g.get();
    Ok(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model: job.model_id,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: generation.text.clone(),
            },
            finish_reason: generation.finish_reason.as_openai().into(),
            logprobs: job.want_logprobs.then(|| ChoiceLogprobs {
                content: generation
                    .tokens
                    .iter()
                    .map(|t| token_logprob(g, t))
                    .collect(),
            }),
        }],
        usage: usage(&generation),
        strata: timings(&generation),
    })
}

/// What a finished stream reports to its [`StreamEnd`] hook.
#[derive(Debug, Clone, Copy)]
pub struct StreamOutcome {
    /// Token counts.
    pub usage: Usage,
    /// Mean log-probability of the generated tokens.
    pub mean_logprob: Option<f32>,
    /// Time spent waiting for a slot, in ms.
    pub queue_ms: f64,
    /// Time to evaluate the prompt, in ms.
    pub prefill_ms: f64,
}

/// Called when a stream's generation ends; what it returns is sent as a
/// last chunk of its own (no choices) before `[DONE]`.
pub type StreamEnd = Box<dyn FnOnce(StreamOutcome) -> Option<RouteRecord> + Send>;

/// Runs a chat job as a Server-Sent Events stream.
pub async fn stream_chat(inf: Arc<Inference>, job: ChatJob, end: Option<StreamEnd>) -> Response {
    let id = response_id("chatcmpl");
    let created = now();
    let model_id = job.model_id.clone();
    let want_logprobs = job.want_logprobs;
    let include_usage = job.include_usage;
    let mut end = end;
    let chunk = move |choices: Vec<ChatChunkChoice>,
                      usage: Option<Usage>,
                      strata: Option<RouteRecord>| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk".into(),
        created,
        model: model_id.clone(),
        choices,
        usage,
        strata,
    };
    stream_response(inf, job.model, job.request, move |item| match item {
        StreamItem::Start => vec![chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                finish_reason: None,
                logprobs: None,
            }],
            None,
            None,
        )],
        StreamItem::Chunk(generator, c) => {
            if c.text.is_empty() && !want_logprobs {
                return Vec::new();
            }
            vec![chunk(
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: None,
                        content: Some(c.text.clone()),
                    },
                    finish_reason: None,
                    logprobs: want_logprobs.then(|| ChoiceLogprobs {
                        content: c
                            .token
                            .iter()
                            .map(|t| token_logprob(generator, t))
                            .collect(),
                    }),
                }],
                None,
                None,
            )]
        }
        StreamItem::End(generation) => {
            let mut out = vec![chunk(
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta::default(),
                    finish_reason: Some(generation.finish_reason.as_openai().into()),
                    logprobs: None,
                }],
                None,
                None,
            )];
            if include_usage {
                out.push(chunk(Vec::new(), Some(usage(generation)), None));
            }
            if let Some(end) = end.take() {
                let t = timings(generation);
                let outcome = StreamOutcome {
                    usage: usage(generation),
                    mean_logprob: t.mean_logprob,
                    queue_ms: t.queue_ms,
                    prefill_ms: t.prefill_ms,
                };
                if let Some(record) = end(outcome) {
                    out.push(chunk(Vec::new(), None, Some(record)));
                }
            }
            out
        }
    })
    .await
}

/// Sends a whole chat answer as a Server-Sent Events stream, in the chunks
/// a live stream would have (the router's cascade decides on a whole local
/// answer before the client sees a token).
pub fn replay_chat(answer: ChatCompletion, include_usage: bool) -> Response {
    let base = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>, strata| ChatCompletionChunk {
        id: answer.id.clone(),
        object: "chat.completion.chunk".into(),
        created: answer.created,
        model: answer.model.clone(),
        choices,
        usage,
        strata,
    };
    let mut chunks = Vec::new();
    for choice in &answer.choices {
        chunks.push(base(
            vec![ChatChunkChoice {
                index: choice.index,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(choice.message.content.clone()),
                },
                finish_reason: None,
                logprobs: choice.logprobs.clone(),
            }],
            None,
            None,
        ));
        chunks.push(base(
            vec![ChatChunkChoice {
                index: choice.index,
                delta: ChatDelta::default(),
                finish_reason: Some(choice.finish_reason.clone()),
                logprobs: None,
            }],
            None,
            None,
        ));
    }
    if include_usage {
        chunks.push(base(Vec::new(), Some(answer.usage), None));
    }
    if let Some(record) = answer.strata.route.clone() {
        chunks.push(base(Vec::new(), None, Some(record)));
    }
    let mut events: Vec<Result<Event, Infallible>> = chunks
        .into_iter()
        .filter_map(|c| Event::default().json_data(c).ok())
        .map(Ok)
        .collect();
    events.push(Ok(Event::default().data("[DONE]")));
    Sse::new(futures_util::stream::iter(events)).into_response()
}

async fn chat(
    State(inf): State<Arc<Inference>>,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let job = inf.chat_job(req)?;
    if job.stream() {
        return Ok(stream_chat(inf, job, None).await);
    }
    Ok(Json(run_chat(&inf, job).await?).into_response())
}

/// A blocking task that died (it panicked or the runtime is shutting down).
fn task_failed(e: tokio::task::JoinError) -> ApiError {
    tracing::error!(error = %e, "inference task failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "inference_failed",
        "the inference task failed; see the agent's log",
    )
}

/// Runs model work on a blocking thread, off the async executor.
async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(task_failed)?
}

/// Runs a generation to its end within an admission slot (non-streaming
/// responses), counting the wait for the slot as queue time.
async fn generate_whole(
    inf: &Inference,
    model: Arc<dyn ModelBackend>,
    request: GenerationRequest,
) -> Result<Generation, ApiError> {
    let timer = inf.timer(&model.info().id);
    let slot = inf.admission.admit().await?;
    let (tx, mut rx) = mpsc::channel(64);
    let handle = spawn_generation(model, request, tx);
    while rx.recv().await.is_some() {}
    let mut generation = handle.await.map_err(task_failed)??;
    generation.timings.queue_ms += slot.queued_for.as_secs_f64() * 1000.0;
    timer.ok();
    Ok(generation)
}

/// What a streaming response is made of.
enum StreamItem<'a> {
    Start,
    Chunk(&'a dyn TextGenerator, &'a StreamChunk),
    End(&'a Generation),
}

/// Streams a generation as Server-Sent Events, rendering each item with
/// `render`, ending with `data: [DONE]`.
async fn stream_response<T, F>(
    inf: Arc<Inference>,
    model: Arc<dyn ModelBackend>,
    request: GenerationRequest,
    mut render: F,
) -> Response
where
    T: serde::Serialize,
    F: FnMut(StreamItem<'_>) -> Vec<T> + Send + 'static,
{
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    let slot = match inf.admission.admit().await {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    tokio::spawn(async move {
        // The slot is held until the generation ends or the client leaves.
        let _slot = slot;
        let send = |tx: &mpsc::Sender<Event>, items: Vec<T>| {
            let events: Vec<Event> = items
                .into_iter()
                .filter_map(|i| Event::default().json_data(i).ok())
                .collect();
            let tx = tx.clone();
            async move {
                for e in events {
                    if tx.send(e).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if !send(&events_tx, render(StreamItem::Start)).await {
            return;
        }
        let (tx, mut rx) = mpsc::channel(64);
        let handle = spawn_generation(Arc::clone(&model), request, tx);
        let Some(generator) = model.as_generator() else {
            return;
        };
        while let Some(chunk) = rx.recv().await {
            if !send(&events_tx, render(StreamItem::Chunk(generator, &chunk))).await {
                // The client went away: dropping `rx` stops the generation.
                return;
            }
        }
        match handle.await {
            Ok(Ok(generation)) => {
                if send(&events_tx, render(StreamItem::End(&generation))).await {
                    let _ = events_tx.send(Event::default().data("[DONE]")).await;
                }
            }
            Ok(Err(e)) => {
                let _ = events_tx
                    .send(
                        Event::default()
                            .json_data(ErrorBody { error: e.detail })
                            .unwrap_or_default(),
                    )
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "generation task failed"),
        }
    });
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream).into_response()
}

async fn completions(
    State(inf): State<Arc<Inference>>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    complete(inf, req).await
}

/// Answers a legacy completion request (`POST /v1/completions`), whole or
/// streamed as the request asks.
pub async fn complete(inf: Arc<Inference>, req: CompletionRequest) -> Result<Response, ApiError> {
    generator(&inf, &req.model)?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let mut prompts = req.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::invalid(
            "prompt",
            "exactly one prompt is supported",
        ));
    }
    let prompt = prompts.remove(0);
    let top = req.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(ApiError::invalid("logprobs", "logprobs must be at most 5"));
    }
    let want_logprobs = req.logprobs.is_some();
    let request = generation_request(
        Prompt::Text(prompt),
        Sampling {
            max_tokens: Some(req.max_tokens.unwrap_or(16)),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop.map(|s| s.into_vec()).unwrap_or_default(),
            top_logprobs: top,
        },
    )?;
    let model = inf.model(&req.model)?;
    let id = response_id("cmpl");
    let created = now();
    let model_id = req.model.clone();
    let logprobs_of = move |g: &dyn TextGenerator, tokens: &[GeneratedToken]| {
        let mut lp = CompletionLogprobs::default();
        let mut offset = 0;
        for t in tokens {
            let text = String::from_utf8_lossy(&t.bytes).into_owned();
            lp.text_offset.push(offset);
            offset += text.len();
            lp.tokens.push(text);
            lp.token_logprobs.push(t.logprob);
            lp.top_logprobs.push(
                t.top_logprobs
                    .iter()
                    .map(|a| {
                        (
                            String::from_utf8_lossy(&g.token_bytes(a.token)).into_owned(),
                            a.logprob,
                        )
                    })
                    .collect(),
            );
        }
        lp
    };

    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream_response(inf, model, request, move |item| {
            let chunk = |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model_id.clone(),
                choices,
                usage,
                strata: None,
            };
            match item {
                StreamItem::Start => Vec::new(),
                StreamItem::Chunk(g, c) => {
                    if c.text.is_empty() && !want_logprobs {
                        return Vec::new();
                    }
                    vec![chunk(
                        vec![CompletionChoice {
                            text: c.text.clone(),
                            index: 0,
                            logprobs: want_logprobs.then(|| logprobs_of(g, c.token.as_slice())),
                            finish_reason: None,
                        }],
                        None,
                    )]
                }
                StreamItem::End(generation) => {
                    let mut out = vec![chunk(
                        vec![CompletionChoice {
                            text: String::new(),
                            index: 0,
                            logprobs: None,
                            finish_reason: Some(generation.finish_reason.as_openai().into()),
                        }],
                        None,
                    )];
                    if include_usage {
                        out.push(chunk(Vec::new(), Some(usage(generation))));
                    }
                    out
                }
            }
        })
        .await);
    }

    let generation = generate_whole(&inf, model, request).await?;
    let g_model = generator(&inf, &model_id)?;
    let g = g_model.get();
    Ok(Json(Completion {
        id,
        object: "text_completion".into(),
        created,
        model: model_id,
        choices: vec![CompletionChoice {
            text: generation.text.clone(),
            index: 0,
            logprobs: want_logprobs.then(|| logprobs_of(g, &generation.tokens)),
            finish_reason: Some(generation.finish_reason.as_openai().into()),
        }],
        usage: Some(usage(&generation)),
        strata: Some(timings(&generation)),
    })
    .into_response())
}

/// Most inputs per embeddings or classify request.
const MAX_BATCH: usize = 2048;

fn inputs(input: protocol::openai::OneOrMany) -> Result<Vec<String>, ApiError> {
    let texts = input.into_vec();
    if texts.is_empty() {
        return Err(ApiError::invalid("input", "input must not be empty"));
    }
    if texts.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "input",
            format!(
                "at most {MAX_BATCH} inputs per request, got {}",
                texts.len()
            ),
        ));
    }
    Ok(texts)
}

async fn embeddings(
    State(inf): State<Arc<Inference>>,
    OpenAiJson(req): OpenAiJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    embed(&inf, req).await.map(Json)
}

/// Answers an embeddings request (`POST /v1/embeddings`).
pub async fn embed(inf: &Inference, req: EmbeddingRequest) -> Result<EmbeddingResponse, ApiError> {
    let model = inf.model(&req.model)?;
    let embedder = model
        .as_embedder()
        .ok_or_else(|| Inference::wrong_kind(&req.model, "an embedding model"))?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64, got {other:?}"),
            ));
        }
    };
    if let Some(d) = req.dimensions
        && d != embedder.dimension()
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "model {} produces {} dimensions",
                req.model,
                embedder.dimension()
            ),
        ));
    }
    let texts = inputs(req.input)?;
    let timer = inf.timer(&req.model);
    inf.observe_raw(texts.iter().map(String::len).sum());
    let _slot = inf.admission.admit().await?;
    let id = req.model.clone();
    let (vectors, tokens) = blocking(move || {
        let embedder = model
            .as_embedder()
            .ok_or_else(|| Inference::wrong_kind(&id, "an embedding model"))?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens: usize = embedder
            .token_counts(&refs)
            .map_err(ApiError::from_runtime)?
            .iter()
            .sum();
        let vectors = embedder.embed(&refs).map_err(ApiError::from_runtime)?;
        Ok((vectors, tokens))
    })
    .await?;
    timer.ok();
    Ok(EmbeddingResponse {
        object: "list".into(),
        data: vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Embedding {
                object: "embedding".into(),
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    EmbeddingVector::Float(v)
                },
            })
            .collect(),
        model: req.model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
        strata: None,
    })
}

async fn classify(
    State(inf): State<Arc<Inference>>,
    OpenAiJson(req): OpenAiJson<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let model = inf.model(&req.model)?;
    if model.as_classifier().is_none() {
        return Err(Inference::wrong_kind(&req.model, "a classifier"));
    }
    let texts = inputs(req.input)?;
    let timer = inf.timer(&req.model);
    inf.observe_raw(texts.iter().map(String::len).sum());
    let _slot = inf.admission.admit().await?;
    let id = req.model.clone();
    let (labels, predictions) = blocking(move || {
        let c = model
            .as_classifier()
            .ok_or_else(|| Inference::wrong_kind(&id, "a classifier"))?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let predictions = c.classify(&refs).map_err(ApiError::from_runtime)?;
        Ok((c.labels().to_vec(), predictions))
    })
    .await?;
    if let Some(observer) = &inf.observer {
        for p in &predictions {
            observer.intent(&p.label);
        }
    }
    timer.ok();
    Ok(Json(ClassifyResponse {
        model: req.model,
        data: predictions
            .into_iter()
            .enumerate()
            .map(|(index, p)| {
                let mut sorted = p.probabilities.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let margin =
                    sorted.first().copied().unwrap_or(0.0) - sorted.get(1).copied().unwrap_or(0.0);
                Classification {
                    index,
                    label: p.label,
                    confidence: p.confidence,
                    margin,
                    probabilities: labels.iter().cloned().zip(p.probabilities).collect(),
                }
            })
            .collect(),
    }))
}

async fn anomaly(
    State(inf): State<Arc<Inference>>,
    OpenAiJson(req): OpenAiJson<AnomalyRequest>,
) -> Result<Json<AnomalyResponse>, ApiError> {
    let model = inf.model(&req.model)?;
    let scorer = model
        .as_anomaly_scorer()
        .ok_or_else(|| Inference::wrong_kind(&req.model, "an anomaly detector"))?;
    if req.readings.is_empty() || req.readings.len() > 100_000 {
        return Err(ApiError::invalid(
            "readings",
            "between 1 and 100000 readings per request",
        ));
    }
    let n = scorer.n_features();
    if let Some((i, r)) = req
        .readings
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != n || r.iter().any(|x| !x.is_finite()))
    {
        return Err(ApiError::invalid(
            "readings",
            format!(
                "reading {i} must have {n} finite numbers, got {} values",
                r.len()
            ),
        ));
    }
    let timer = inf.timer(&req.model);
    inf.observe_raw(req.readings.len() * n * std::mem::size_of::<f64>());
    let mut data = Vec::with_capacity(req.readings.len());
    for (index, r) in req.readings.iter().enumerate() {
        let score = scorer.score_and_learn(r).map_err(ApiError::from_runtime)?;
        data.push(AnomalyScore { index, score });
    }
    if let Some(observer) = &inf.observer {
        let scores: Vec<f64> = data.iter().map(|d| d.score).collect();
        observer.anomalies(&req.model, &req.readings, &scores).await;
    }
    timer.ok();
    Ok(Json(AnomalyResponse {
        model: req.model,
        data,
    }))
}
