//! The router in the agent: every chat, completion and embedding request on
//! the local API goes through [`router::decide`] and then runs where the
//! decision says: on the device's own model, on the hub's macro tier (over
//! the device's mutual-TLS identity), or nowhere (a refusal that says why).
//!
//! What the pure router cannot know, this module measures: whether the
//! local model is loaded and how long its context is, what the macro tier
//! offers (`GET /v1/macro`, refreshed while the hub link is up), whether
//! the hub link is up, the circuit breaker over macro calls, live latency
//! estimates of both tiers, and the money spent today. Every answer carries
//! a decision record (`x-strata-route` header and the body's `strata`
//! object); every request that leaves the device is first written to the
//! append-only audit log ([`audit`]). Request text is never logged.
//!
//! A cascade (answer locally, escalate when unsure) decides on a whole local
//! answer, so a streamed request in a cascade sees its first token only
//! once the local answer is judged; requests that cannot escalate stream
//! token by token.

pub mod audit;
pub mod macro_client;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use protocol::openai::{
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, MessageContent,
};
use protocol::route::{
    APP_HEADER, LATENCY_BUDGET_HEADER, MODE_HEADER, MacroInfo, PRIVATE_HEADER, ROUTE_HEADER,
    RouteOptions, RouteReason, RouteRecord, RouteTokens,
};
use router::{
    Breaker, CompiledPolicy, Confidence, Decision, Intent, Kind, LatencyModel, LiveState, Mode,
    Request as Features, Tier, TierState,
};
use serde_json::Value;
use serving::{ApiError, Inference, OpenAiJson};

use self::audit::{AuditLog, AuditRecord};
use self::macro_client::{MacroClient, MacroError, StreamItem};
use crate::config::RouterConfig;
use crate::metrics::{RouteLabels, Status};

/// How often the macro tier's offer is fetched again while the link is up.
const INFO_REFRESH: Duration = Duration::from_secs(15);

/// The router's live state.
struct Live {
    breaker: Breaker,
    local_latency: LatencyModel,
    macro_latency: LatencyModel,
    /// Days since the Unix epoch (UTC) of `spent_usd`.
    spend_day: i64,
    spent_usd: f64,
}

/// The agent's routing of inference requests.
pub struct Routing {
    inference: Arc<Inference>,
    policy: CompiledPolicy,
    config: RouterConfig,
    chat_model: Option<String>,
    embedding_model: Option<String>,
    intent_model: Option<String>,
    client: MacroClient,
    info: RwLock<Option<MacroInfo>>,
    live: Mutex<Live>,
    audit: AuditLog,
    status: Arc<Status>,
    state: crate::state::State,
    origin: Instant,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("policy", &self.policy.policy().version)
            .finish_non_exhaustive()
    }
}

/// What `GET /v1/router` shows.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RouterStatus {
    /// The policy's version.
    pub policy_version: String,
    /// The default mode.
    pub default_mode: String,
    /// The local chat model routed requests use.
    pub chat_model: Option<String>,
    /// The local embedding model.
    pub embedding_model: Option<String>,
    /// The intent classifier for capability checks.
    pub intent_model: Option<String>,
    /// True while the hub link is up.
    pub hub_connected: bool,
    /// What the macro tier offers, once known.
    pub macro_tier: Option<MacroInfo>,
    /// The macro breaker's state.
    pub breaker: router::BreakerState,
    /// Estimated ms of a default-length local answer.
    pub local_estimate_ms: Option<f64>,
    /// Estimated ms of a default-length macro answer.
    pub macro_estimate_ms: Option<f64>,
    /// Spent on the macro tier today (UTC).
    pub spent_today_usd: f64,
    /// The audit log's file name in the data directory.
    pub audit_log: String,
}

/// The pieces [`Routing::new`] needs.
#[derive(Debug)]
pub struct RoutingParts {
    /// The models served.
    pub inference: Arc<Inference>,
    /// The validated `[router]` section.
    pub config: RouterConfig,
    /// The catalogue (to pick default models by kind).
    pub catalogue: runtime::Catalogue,
    /// The device's mTLS client.
    pub client: reqwest::Client,
    /// The hub's base URL.
    pub hub_url: String,
    /// Live status (hub link state, metrics, installed versions).
    pub status: Arc<Status>,
    /// The audit log's path.
    pub audit_path: std::path::PathBuf,
    /// The agent's database (the day's macro spend survives restarts).
    pub state: crate::state::State,
}

fn first_of(catalogue: &runtime::Catalogue, kind: runtime::ModelKind) -> Option<String> {
    catalogue
        .entries
        .iter()
        .find(|e| e.spec.kind() == kind)
        .map(|e| e.id.clone())
}

fn day_of(now: time::OffsetDateTime) -> i64 {
    now.unix_timestamp().div_euclid(86_400)
}

impl Routing {
    /// Builds the router from the agent's parts.
    pub fn new(parts: RoutingParts) -> Result<Arc<Self>, crate::Error> {
        let policy = CompiledPolicy::new(parts.config.policy.clone())
            .map_err(|e| crate::Error::Config(format!("router policy: {e}")))?;
        let audit = AuditLog::open(&parts.audit_path).map_err(|e| crate::Error::Io {
            path: parts.audit_path.clone(),
            source: e,
        })?;
        let c = &parts.config;
        let chat_model = c
            .chat_model
            .clone()
            .or_else(|| first_of(&parts.catalogue, runtime::ModelKind::Llm));
        let embedding_model = c
            .embedding_model
            .clone()
            .or_else(|| first_of(&parts.catalogue, runtime::ModelKind::Embedding));
        let intent_model = c
            .intent_model
            .clone()
            .or_else(|| first_of(&parts.catalogue, runtime::ModelKind::Classifier));
        let breaker = Breaker::new(policy.policy().breaker);
        let today = day_of(time::OffsetDateTime::now_utc());
        let spent_usd = parts.state.macro_spend(today)?;
        Ok(Arc::new(Self {
            client: MacroClient::new(
                parts.client,
                &parts.hub_url,
                c.macro_timeout,
                c.stream_idle_timeout,
            ),
            inference: parts.inference,
            policy,
            config: parts.config,
            chat_model,
            embedding_model,
            intent_model,
            info: RwLock::new(None),
            live: Mutex::new(Live {
                breaker,
                local_latency: LatencyModel::default(),
                macro_latency: LatencyModel::default(),
                spend_day: today,
                spent_usd,
            }),
            audit,
            status: parts.status,
            state: parts.state,
            origin: Instant::now(),
        }))
    }

    /// The routed inference routes, to merge into the local API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/router", axum::routing::get(router_status))
            .with_state(Arc::clone(self))
    }

    /// Keeps the macro tier's offer fresh while the hub link is up; runs
    /// until the process ends.
    pub async fn refresh_loop(self: Arc<Self>) {
        loop {
            if self.status.is_connected() {
                let known = match self.client.info().await {
                    Ok(info) => {
                        *self.info.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the macro tier's offer");
                        self.macro_info().is_some()
                    }
                };
                // Until the offer is known (a hub still loading its macro
                // model answers 503), ask again soon.
                tokio::time::sleep(if known {
                    INFO_REFRESH
                } else {
                    Duration::from_secs(1)
                })
                .await;
            } else {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let today = day_of(time::OffsetDateTime::now_utc());
        if live.spend_day != today {
            live.spend_day = today;
            live.spent_usd = 0.0;
        }
        live
    }

    fn macro_info(&self) -> Option<MacroInfo> {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn version_of(&self, model: &str) -> Option<String> {
        self.status
            .installed()
            .into_iter()
            .find(|m| m.model == model)
            .map(|m| m.version.to_string())
    }

    /// The live state the router decides on, for a request of `kind`.
    fn live_state(&self, kind: Kind, local: TierState, max_tokens: u32) -> LiveState {
        let info = self.macro_info();
        let remote_model = info.as_ref().and_then(|i| match kind {
            Kind::Chat => i.chat_model.clone(),
            Kind::Embedding => i.embedding_model.clone(),
            Kind::Completion => None,
        });
        let now = self.now_ms();
        let live = self.live();
        let remote = TierState {
            available: remote_model.is_some(),
            context_tokens: info.as_ref().map_or(0, |i| i.context_tokens),
            supports_tools: info.as_ref().is_some_and(|i| i.supports_tools),
            latency_ms: live.macro_latency.estimate_ms(max_tokens),
        };
        let local = TierState {
            latency_ms: local
                .latency_ms
                .or_else(|| live.local_latency.estimate_ms(max_tokens)),
            ..local
        };
        let breaker = live.breaker.state(now);
        self.status
            .metrics()
            .route
            .breaker_open
            .set(i64::from(matches!(
                breaker,
                router::BreakerState::Open { .. }
            )));
        LiveState {
            local,
            remote,
            hub_connected: self.status.is_connected() && info.is_some(),
            breaker,
            spent_today_usd: live.spent_usd,
        }
    }

    fn macro_succeeded(&self, ms: f64, tokens: RouteTokens) -> f64 {
        let cost = router::cost_usd(
            self.policy.policy(),
            Tier::Macro,
            tokens.prompt + tokens.completion,
        );
        let now = self.now_ms();
        let day = {
            let mut live = self.live();
            live.breaker.record_success(now);
            live.macro_latency.observe(ms, tokens.completion, ms);
            live.spent_usd += cost;
            live.spend_day
        };
        // The day's spend is kept in the agent's database, off the
        // executor (an fsync'd write).
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = state.add_macro_spend(day, cost) {
                tracing::error!(error = %e, "cannot record the macro spend");
            }
        });
        cost
    }

    /// Asks the breaker whether a macro call may go now (closed, or the
    /// one probe of a half-open breaker).
    fn macro_allowed(&self) -> Result<(), MacroError> {
        let now = self.now_ms();
        if self.live().breaker.allow(now) {
            Ok(())
        } else {
            Err(MacroError::BreakerOpen)
        }
    }

    fn macro_failed(&self, e: &MacroError) {
        if matches!(e, MacroError::BreakerOpen) {
            // Not a call that failed: no call was made.
            return;
        }
        tracing::warn!(error = %e, "macro tier call failed");
        self.status.metrics().route.macro_failures.inc();
        if e.is_tier_failure() {
            let now = self.now_ms();
            self.live().breaker.record_failure(now);
        }
    }

    /// Decides (timing the router, privacy classification included) and
    /// starts the request's decision record.
    fn decide(
        &self,
        features: &Features<'_>,
        state: &LiveState,
        started: Instant,
    ) -> (Decision, Recorder) {
        let t0 = Instant::now();
        let decision = router::decide(features, &self.policy, state);
        let decision_us = t0.elapsed().as_secs_f64() * 1e6;
        self.status.metrics().route.decision_us.observe(decision_us);
        let rec = Recorder {
            started,
            policy_version: self.policy.policy().version.clone(),
            data_classes: decision
                .data_classes()
                .iter()
                .map(|c| c.name().into_owned())
                .collect(),
            decision_us,
            reasons: reasons_of(&decision),
            escalated: false,
            fell_back: false,
        };
        (decision, rec)
    }

    /// Classifies `text` with the intent model, if one is loaded.
    async fn intent_of(&self, text: &str) -> Option<(String, f32)> {
        let id = self.intent_model.as_ref()?;
        let model = self.inference.get(id)?;
        model.as_classifier()?;
        let text = text.to_owned();
        tokio::task::spawn_blocking(move || {
            let c = model.as_classifier()?;
            let p = c.classify(&[text.as_str()]).ok()?.pop()?;
            let mut sorted = p.probabilities.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin =
                sorted.first().copied().unwrap_or(0.0) - sorted.get(1).copied().unwrap_or(0.0);
            Some((p.label, margin))
        })
        .await
        .ok()
        .flatten()
    }
}

/// The routing options of a request: the body's `strata` object, then the
/// `x-strata-*` headers for what the body leaves unset.
#[derive(Debug, Default)]
struct Options {
    mode: Option<Mode>,
    private: bool,
    app: Option<String>,
    latency_budget_ms: Option<u64>,
}

fn options(headers: &HeaderMap, body: Option<RouteOptions>) -> Result<Options, ApiError> {
    let body = body.unwrap_or_default();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let mode = match body.mode.as_deref().or(header(MODE_HEADER)) {
        None | Some("") => None,
        Some(m) => Some(m.parse::<Mode>().map_err(|_| {
            ApiError::invalid(
                "strata.mode",
                format!(
                    "mode must be only_local, prefer_local, prefer_macro or only_macro, got {m:?}"
                ),
            )
        })?),
    };
    let private = match body.private {
        Some(p) => p,
        None => match header(PRIVATE_HEADER) {
            None => false,
            Some("1" | "true" | "yes") => true,
            Some("0" | "false" | "no" | "") => false,
            Some(other) => {
                return Err(ApiError::invalid(
                    "x-strata-private",
                    format!("x-strata-private must be true or false, got {other:?}"),
                ));
            }
        },
    };
    let latency_budget_ms = match body.latency_budget_ms {
        Some(ms) => Some(ms),
        None => match header(LATENCY_BUDGET_HEADER) {
            None => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::invalid(
                    "x-strata-latency-budget-ms",
                    format!("latency budget must be whole milliseconds, got {v:?}"),
                )
            })?),
        },
    };
    Ok(Options {
        mode,
        private,
        app: body.app.or_else(|| header(APP_HEADER).map(str::to_owned)),
        latency_budget_ms,
    })
}

/// Builds the decision record of one request.
struct Recorder {
    started: Instant,
    policy_version: String,
    data_classes: Vec<String>,
    decision_us: f64,
    reasons: Vec<RouteReason>,
    escalated: bool,
    fell_back: bool,
}

fn reasons_of(d: &Decision) -> Vec<RouteReason> {
    d.reasons()
        .iter()
        .map(|r| RouteReason {
            code: r.code().to_owned(),
            message: r.to_string(),
        })
        .collect()
}

impl Recorder {
    fn record(
        &self,
        tier: &str,
        model: Option<String>,
        version: Option<String>,
        tokens: RouteTokens,
        cost_usd: f64,
    ) -> RouteRecord {
        RouteRecord {
            tier: tier.to_owned(),
            model,
            version,
            reasons: self.reasons.clone(),
            policy_version: self.policy_version.clone(),
            data_classes: self.data_classes.clone(),
            escalated: self.escalated,
            fell_back: self.fell_back,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            decision_us: self.decision_us,
            cost_usd,
            tokens,
        }
    }

    fn push(&mut self, code: &str, message: impl Into<String>) {
        self.reasons.push(RouteReason {
            code: code.to_owned(),
            message: message.into(),
        });
    }
}

fn count(r: &Routing, record: &RouteRecord) {
    r.status
        .metrics()
        .route
        .decisions
        .get_or_create(&RouteLabels {
            tier: record.tier.clone(),
            // The deciding reason: the first beyond the mode in force.
            reason: record
                .reasons
                .iter()
                .find(|r| r.code != "mode")
                .or(record.reasons.first())
                .map_or_else(|| "default".to_owned(), |r| r.code.clone()),
        })
        .inc();
}

fn with_header(mut response: Response, record: &RouteRecord) -> Response {
    if let Ok(v) = HeaderValue::from_str(&record.header_value()) {
        response.headers_mut().insert(ROUTE_HEADER, v);
    }
    response
}

/// Puts the record's fields into a JSON body's `strata` object (keeping
/// what is there, such as the hub's timings).
fn stamp(body: &mut Value, record: &RouteRecord) {
    let Ok(Value::Object(fields)) = serde_json::to_value(record) else {
        return;
    };
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let strata = obj
        .entry("strata")
        .or_insert_with(|| Value::Object(Default::default()));
    if !strata.is_object() {
        *strata = Value::Object(Default::default());
    }
    if let Some(s) = strata.as_object_mut() {
        s.extend(fields);
    }
}

fn json_response(mut body: Value, record: &RouteRecord) -> Response {
    stamp(&mut body, record);
    with_header(axum::Json(body).into_response(), record)
}

/// A refusal: an OpenAI error body with the decision record beside it.
fn refusal(status: StatusCode, code: &str, message: String, record: &RouteRecord) -> Response {
    let error_type = match status {
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYMENT_REQUIRED => "rate_limit_error",
        _ => "service_unavailable",
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": error_type, "param": null, "code": code},
        "strata": record,
    });
    with_header((status, axum::Json(body)).into_response(), record)
}

fn refusal_from(r: &Routing, rec: &Recorder, d: &Decision) -> Response {
    let Decision::Refuse { refusal: why, .. } = d else {
        unreachable!("refusal_from takes a refusal")
    };
    let message = d
        .reasons()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let record = rec.record("none", None, None, RouteTokens::default(), 0.0);
    count(r, &record);
    if *why == router::Refusal::TooLong {
        // OpenAI's answer to a prompt beyond the context, so that clients
        // handle it as they already do.
        let body = serde_json::json!({
            "error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"},
            "strata": record,
        });
        return with_header(
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response(),
            &record,
        );
    }
    let status = StatusCode::from_u16(why.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    refusal(status, why.code(), message, &record)
}

/// A macro failure that nothing can answer instead.
fn macro_unavailable(r: &Routing, rec: &mut Recorder, e: &MacroError) -> Response {
    rec.push("macro_failed", e.to_string());
    let record = rec.record("none", None, None, RouteTokens::default(), 0.0);
    count(r, &record);
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "macro_unavailable",
        format!("the request must run on the macro tier, which failed: {e}"),
        &record,
    )
}

fn chat_text(req: &ChatCompletionRequest) -> String {
    let mut out = String::new();
    for m in &req.messages {
        match &m.content {
            MessageContent::Text(t) => out.push_str(t),
            MessageContent::Parts(parts) => {
                for p in parts {
                    out.push_str(p.text.as_deref().unwrap_or_default());
                    out.push(' ');
                }
            }
        }
        out.push('\n');
    }
    out
}

fn last_user_text(req: &ChatCompletionRequest) -> String {
    req.messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| match &m.content {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join(" "),
        })
        .unwrap_or_default()
}

fn tokens_of(usage: &protocol::openai::Usage) -> RouteTokens {
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    RouteTokens {
        prompt: n(usage.prompt_tokens),
        completion: n(usage.completion_tokens),
    }
}

fn usage_tokens(v: &Value) -> RouteTokens {
    let n = |k: &str| {
        v.pointer(&format!("/usage/{k}"))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    RouteTokens {
        prompt: n("prompt_tokens"),
        completion: n("completion_tokens"),
    }
}

/// The local model a request names: the configured chat (or embedding)
/// model for `auto` or the macro model's id, or any model the device serves.
fn local_model(
    requested: &str,
    default: Option<&String>,
    info: Option<&MacroInfo>,
) -> Option<String> {
    let is_macro = info.is_some_and(|i| {
        i.chat_model.as_deref() == Some(requested)
            || i.embedding_model.as_deref() == Some(requested)
    });
    if requested == "auto" || is_macro {
        return default.cloned();
    }
    Some(requested.to_owned())
}

async fn router_status(State(r): State<Arc<Routing>>) -> axum::Json<RouterStatus> {
    let max = r.config.default_max_tokens;
    let now = r.now_ms();
    let live = r.live();
    axum::Json(RouterStatus {
        policy_version: r.policy.policy().version.clone(),
        default_mode: r.policy.policy().default_mode.to_string(),
        chat_model: r.chat_model.clone(),
        embedding_model: r.embedding_model.clone(),
        intent_model: r.intent_model.clone(),
        hub_connected: r.status.is_connected(),
        macro_tier: r.macro_info(),
        breaker: live.breaker.state(now),
        local_estimate_ms: live.local_latency.estimate_ms(max),
        macro_estimate_ms: live.macro_latency.estimate_ms(max),
        spent_today_usd: live.spent_usd,
        audit_log: r
            .audit
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

fn new_request_id() -> String {
    use rand::Rng;
    format!("req-{:016x}", rand::rng().random::<u64>())
}

/// Writes the audit line for a request about to leave the device.
async fn audit(
    r: &Routing,
    request: &str,
    kind: &str,
    path: &str,
    bytes: usize,
    rec: &Recorder,
) -> Result<(), ApiError> {
    let record = AuditRecord {
        time: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        request: request.to_owned(),
        kind: kind.to_owned(),
        destination: r.client.url(path),
        data_class: if rec.data_classes.is_empty() {
            "general".into()
        } else {
            rec.data_classes.join(",")
        },
        bytes: bytes as u64,
        reasons: rec.reasons.iter().map(|x| x.code.clone()).collect(),
    };
    r.audit.append(&record).await.map_err(|e| {
        // Nothing leaves the device unless the audit line is on disk.
        tracing::error!(error = %e, "cannot write the audit log; the request stays here");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "audit_log_unavailable",
            "the audit log cannot be written, so nothing may leave the device",
        )
    })
}

async fn chat(
    State(r): State<Arc<Routing>>,
    headers: HeaderMap,
    OpenAiJson(mut req): OpenAiJson<ChatCompletionRequest>,
) -> Response {
    match chat_inner(&r, &headers, &mut req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    r: &Arc<Routing>,
    headers: &HeaderMap,
    req: &mut ChatCompletionRequest,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request_id = new_request_id();
    let opts = options(headers, req.strata.take())?;
    let info = r.macro_info();
    let Some(local_id) = local_model(&req.model, r.chat_model.as_ref(), info.as_ref()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "model_not_found",
            "no local chat model is configured; name a model",
        ));
    };
    let local_loaded = r
        .inference
        .get(&local_id)
        .is_some_and(|m| m.as_generator().is_some());
    if r.inference.get(&local_id).is_none() && r.chat_model.as_ref() != Some(&local_id) {
        // Neither served nor the configured chat model: a wrong name, not
        // an outage the router could work around.
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "model_not_found",
            format!("model {local_id:?} is not served here; name a served model or \"auto\""),
        );
        e = e.with_param("model");
        return Err(e);
    }
    let needs_tools = req.tools.as_ref().is_some_and(|t| !t.is_empty());
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let text = chat_text(req);

    // The local job (validation errors are the client's, whatever the tier).
    let job = if local_loaded {
        let mut local = req.clone();
        local.model = local_id.clone();
        local.tools = None;
        local.tool_choice = None;
        Some(r.inference.chat_job(local)?)
    } else if r.inference.get(&local_id).is_some() {
        return Err(ApiError::invalid(
            "model",
            format!("model {local_id:?} is not a text generation model"),
        ));
    } else {
        None
    };
    let prompt_tokens = match &job {
        Some(j) => j.prompt_tokens()? as u32,
        None => (text.len() / 4) as u32,
    };
    let max_tokens = job
        .as_ref()
        .and_then(|j| j.max_tokens())
        .or(req.max_completion_tokens)
        .or(req.max_tokens)
        .unwrap_or(r.config.default_max_tokens);
    let intent = r.intent_of(&last_user_text(req)).await;
    let local = TierState {
        available: job.is_some(),
        context_tokens: job.as_ref().map_or(0, |j| j.context_tokens() as u32),
        supports_tools: false,
        latency_ms: None,
    };
    let state = r.live_state(Kind::Chat, local, max_tokens);
    let features = Features {
        kind: Kind::Chat,
        text: &text,
        app: opts.app.as_deref(),
        mode: opts.mode,
        caller_private: opts.private,
        prompt_tokens,
        max_tokens,
        needs_tools,
        intent: intent.as_ref().map(|(label, margin)| Intent {
            label,
            margin: *margin,
        }),
        latency_budget_ms: opts.latency_budget_ms,
    };
    let (decision, mut rec) = r.decide(&features, &state, started);
    let macro_model = info.as_ref().and_then(|i| i.chat_model.clone());

    match &decision {
        Decision::Refuse { .. } => Ok(refusal_from(r, &rec, &decision)),
        Decision::Local { cascade, .. } => {
            let Some(job) = job else {
                unreachable!("the router answers locally only when the local model is loaded")
            };
            if cascade.is_none() || macro_model.is_none() {
                return Ok(local_chat(r, job, rec, stream).await);
            }
            // Cascade: a whole local answer first, judged by its confidence.
            let local_version = r.version_of(&local_id);
            let mut answer = serving::run_chat(&r.inference, job).await?;
            observe_local(r, &answer);
            let confidence = Confidence::MeanLogprob(answer.strata.mean_logprob.unwrap_or(0.0));
            let state = r.live_state(Kind::Chat, local, max_tokens);
            match router::escalate(&decision, confidence, &features, &r.policy, &state) {
                Some(escalation) => {
                    r.status.metrics().route.escalations.inc();
                    rec.escalated = true;
                    rec.reasons = reasons_of(&escalation);
                    let body = macro_body(req, macro_model.as_deref(), stream);
                    let fallback = Fallback::Answer(Box::new(answer), local_version);
                    macro_chat(r, &request_id, body, rec, stream, include_usage, fallback).await
                }
                None => {
                    let tokens = tokens_of(&answer.usage);
                    let record = rec.record("local", Some(local_id), local_version, tokens, 0.0);
                    count(r, &record);
                    answer.strata.route = Some(record.clone());
                    let response = if stream {
                        serving::replay_chat(answer, include_usage)
                    } else {
                        axum::Json(answer).into_response()
                    };
                    Ok(with_header(response, &record))
                }
            }
        }
        Decision::Macro { fallback_local, .. } => {
            let body = macro_body(req, macro_model.as_deref(), stream);
            let fallback = match job {
                Some(job) if *fallback_local => Fallback::Run(job),
                _ => Fallback::None,
            };
            macro_chat(r, &request_id, body, rec, stream, include_usage, fallback).await
        }
    }
}

fn observe_local(r: &Routing, answer: &protocol::openai::ChatCompletion) {
    let t = &answer.strata;
    let total = t.queue_ms + t.prefill_ms + t.decode_ms;
    r.live().local_latency.observe(
        t.queue_ms + t.prefill_ms,
        tokens_of(&answer.usage).completion,
        total,
    );
}

/// Runs a chat job locally, streamed or whole, with its decision record.
async fn local_chat(
    r: &Arc<Routing>,
    job: serving::ChatJob,
    rec: Recorder,
    stream: bool,
) -> Response {
    let model = job.model_id().to_owned();
    let version = r.version_of(&model);
    if stream {
        let header_record = rec.record(
            "local",
            Some(model.clone()),
            version.clone(),
            RouteTokens::default(),
            0.0,
        );
        let routing = Arc::clone(r);
        let end: serving::StreamEnd = Box::new(move |outcome: serving::StreamOutcome| {
            let tokens = tokens_of(&outcome.usage);
            let total = rec.started.elapsed().as_secs_f64() * 1000.0;
            routing.live().local_latency.observe(
                outcome.queue_ms + outcome.prefill_ms,
                tokens.completion,
                total,
            );
            let record = rec.record("local", Some(model), version, tokens, 0.0);
            count(&routing, &record);
            Some(record)
        });
        let response = serving::stream_chat(Arc::clone(&r.inference), job, Some(end)).await;
        return with_header(response, &header_record);
    }
    match serving::run_chat(&r.inference, job).await {
        Ok(mut answer) => {
            observe_local(r, &answer);
            let tokens = tokens_of(&answer.usage);
            let record = rec.record("local", Some(model), version, tokens, 0.0);
            count(r, &record);
            answer.strata.route = Some(record.clone());
            with_header(axum::Json(answer).into_response(), &record)
        }
        Err(e) => e.into_response(),
    }
}

/// What answers when the macro tier fails.
enum Fallback {
    /// Nothing: the client gets a 503 naming the failure.
    None,
    /// The local model, from scratch.
    Run(serving::ChatJob),
    /// A local answer already made (the cascade's), with its model version.
    Answer(Box<protocol::openai::ChatCompletion>, Option<String>),
}

/// The request as the macro tier gets it: its model, no Strata options,
/// and usage in streams (for the cost).
fn macro_body(req: &ChatCompletionRequest, model: Option<&str>, stream: bool) -> Value {
    let mut body = serde_json::to_value(req).unwrap_or(Value::Null);
    if let Some(obj) = body.as_object_mut() {
        obj.remove("strata");
        if let Some(m) = model {
            obj.insert("model".into(), Value::String(m.to_owned()));
        }
        obj.insert("stream".into(), Value::Bool(stream));
        if stream {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        obj.retain(|_, v| !v.is_null());
    }
    body
}

async fn fall_back(
    r: &Arc<Routing>,
    mut rec: Recorder,
    fallback: Fallback,
    e: &MacroError,
    stream: bool,
    include_usage: bool,
) -> Response {
    match fallback {
        Fallback::None => macro_unavailable(r, &mut rec, e),
        Fallback::Run(job) => {
            r.status.metrics().route.fallbacks.inc();
            rec.fell_back = true;
            rec.push("macro_failed", e.to_string());
            local_chat(r, job, rec, stream).await
        }
        Fallback::Answer(mut answer, version) => {
            r.status.metrics().route.fallbacks.inc();
            rec.fell_back = true;
            rec.push("macro_failed", e.to_string());
            let tokens = tokens_of(&answer.usage);
            let record = rec.record("local", Some(answer.model.clone()), version, tokens, 0.0);
            count(r, &record);
            answer.strata.route = Some(record.clone());
            let response = if stream {
                serving::replay_chat(*answer, include_usage)
            } else {
                axum::Json(*answer).into_response()
            };
            with_header(response, &record)
        }
    }
}

async fn macro_chat(
    r: &Arc<Routing>,
    request_id: &str,
    body: Value,
    rec: Recorder,
    stream: bool,
    include_usage: bool,
    fallback: Fallback,
) -> Result<Response, ApiError> {
    const PATH: &str = "/v1/chat/completions";
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
    if let Err(e) = r.macro_allowed() {
        return Ok(fall_back(r, rec, fallback, &e, stream, include_usage).await);
    }
    audit(r, request_id, "chat", PATH, bytes.len(), &rec).await?;
    let fleet = rec.reasons.iter().any(|x| x.code == "fleet_data");
    if !stream {
        return Ok(match r.client.call(PATH, &bytes, fleet).await {
            Ok(answer) => {
                let tokens = usage_tokens(&answer);
                let ms = rec.started.elapsed().as_secs_f64() * 1000.0;
                let cost = r.macro_succeeded(ms, tokens);
                let record = rec.record("macro", model, None, tokens, cost);
                count(r, &record);
                json_response(answer, &record)
            }
            Err(e) => {
                r.macro_failed(&e);
                fall_back(r, rec, fallback, &e, false, include_usage).await
            }
        });
    }
    let mut rx = match r.client.stream(PATH, &bytes, fleet).await {
        Ok(rx) => rx,
        Err(e) => {
            r.macro_failed(&e);
            return Ok(fall_back(r, rec, fallback, &e, true, include_usage).await);
        }
    };
    let header_record = rec.record("macro", model.clone(), None, RouteTokens::default(), 0.0);
    let routing = Arc::clone(r);
    let (tx, events) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut tokens = RouteTokens::default();
        let mut last_id = Value::Null;
        let mut created = Value::Null;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(StreamItem::Chunk(chunk)) => {
                    last_id = chunk.get("id").cloned().unwrap_or(last_id);
                    created = chunk.get("created").cloned().unwrap_or(created);
                    let usage_only = chunk
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty)
                        && chunk.get("usage").is_some_and(|u| !u.is_null());
                    if usage_only {
                        tokens = usage_tokens(&chunk);
                        if !include_usage {
                            continue;
                        }
                    }
                    let Ok(event) = Event::default().json_data(&chunk) else {
                        continue;
                    };
                    if tx.send(event).await.is_err() {
                        // The client left; dropping `rx` closes the hub stream.
                        return;
                    }
                }
                Ok(StreamItem::Done) => {
                    let ms = rec.started.elapsed().as_secs_f64() * 1000.0;
                    let cost = routing.macro_succeeded(ms, tokens);
                    let record = rec.record("macro", model.clone(), None, tokens, cost);
                    count(&routing, &record);
                    let last = serde_json::json!({
                        "id": last_id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "strata": record,
                    });
                    if let Ok(event) = Event::default().json_data(last) {
                        let _ = tx.send(event).await;
                    }
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
                Err(e) => {
                    routing.macro_failed(&e);
                    // A clean end: an error event the OpenAI clients raise,
                    // then the end of the stream (no `[DONE]`).
                    let body = serde_json::json!({"error": {
                        "message": format!("the macro tier's answer broke off: {e}"),
                        "type": "server_error", "param": null, "code": "macro_stream_failed",
                    }});
                    if let Ok(event) = Event::default().json_data(body) {
                        let _ = tx.send(event).await;
                    }
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(events, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Ok(with_header(
        Sse::new(stream).into_response(),
        &header_record,
    ))
}

async fn completions(
    State(r): State<Arc<Routing>>,
    headers: HeaderMap,
    OpenAiJson(mut req): OpenAiJson<CompletionRequest>,
) -> Response {
    let started = Instant::now();
    let opts = match options(&headers, req.strata.take()) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let text = req.prompt.clone().into_vec().join("\n");
    let model = r.inference.get(&req.model);
    let available = model.as_ref().is_some_and(|m| m.as_generator().is_some());
    let max_tokens = req.max_tokens.unwrap_or(16);
    let local = TierState {
        available,
        context_tokens: model
            .as_ref()
            .and_then(|m| m.as_generator().map(|g| g.context_length() as u32))
            .unwrap_or(0),
        supports_tools: false,
        latency_ms: None,
    };
    let state = r.live_state(Kind::Completion, local, max_tokens);
    let features = Features {
        kind: Kind::Completion,
        text: &text,
        app: opts.app.as_deref(),
        mode: opts.mode,
        caller_private: opts.private,
        prompt_tokens: (text.len() / 4) as u32,
        max_tokens,
        needs_tools: false,
        intent: None,
        latency_budget_ms: opts.latency_budget_ms,
    };
    let (decision, rec) = r.decide(&features, &state, started);
    if decision.tier() != Some(Tier::Local) || !available {
        if let Decision::Refuse { .. } = decision {
            return refusal_from(&r, &rec, &decision);
        }
        // Legacy completions have no macro route; answering them anywhere
        // but here is not possible.
        let record = rec.record("none", None, None, RouteTokens::default(), 0.0);
        count(&r, &record);
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "macro_unavailable",
            "legacy completions run only on the device, and the router did not choose it".into(),
            &record,
        );
    }
    let model_id = req.model.clone();
    let stream = req.stream.unwrap_or(false);
    let response = match serving::complete(Arc::clone(&r.inference), req).await {
        Ok(response) => response,
        Err(e) => return e.into_response(),
    };
    let record = rec.record(
        "local",
        Some(model_id.clone()),
        r.version_of(&model_id),
        RouteTokens::default(),
        0.0,
    );
    count(&r, &record);
    if stream || response.status() != StatusCode::OK {
        return with_header(response, &record);
    }
    // Whole answers get the record in the body too.
    let bytes = match axum::body::to_bytes(response.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "inference_failed",
                e.to_string(),
            )
            .into_response();
        }
    };
    let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let tokens = usage_tokens(&body);
    let record = RouteRecord { tokens, ..record };
    stamp(&mut body, &record);
    with_header(axum::Json(body).into_response(), &record)
}

async fn embeddings(
    State(r): State<Arc<Routing>>,
    headers: HeaderMap,
    OpenAiJson(mut req): OpenAiJson<EmbeddingRequest>,
) -> Response {
    match embeddings_inner(&r, &headers, &mut req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn embeddings_inner(
    r: &Arc<Routing>,
    headers: &HeaderMap,
    req: &mut EmbeddingRequest,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request_id = new_request_id();
    let opts = options(headers, req.strata.take())?;
    let info = r.macro_info();
    let local_id = local_model(&req.model, r.embedding_model.as_ref(), info.as_ref())
        .unwrap_or_else(|| req.model.clone());
    let model = r.inference.get(&local_id);
    if model.as_ref().is_some_and(|m| m.as_embedder().is_none()) {
        return Err(ApiError::invalid(
            "model",
            format!("model {local_id:?} is not an embedding model"),
        ));
    }
    let texts = req.input.clone().into_vec();
    let text = texts.join("\n");
    let local = TierState {
        available: model.is_some(),
        context_tokens: u32::MAX,
        supports_tools: false,
        latency_ms: None,
    };
    let state = r.live_state(Kind::Embedding, local, 0);
    let features = Features {
        kind: Kind::Embedding,
        text: &text,
        app: opts.app.as_deref(),
        mode: opts.mode,
        caller_private: opts.private,
        prompt_tokens: (text.len() / 4) as u32,
        max_tokens: 0,
        needs_tools: false,
        intent: None,
        latency_budget_ms: opts.latency_budget_ms,
    };
    let (decision, mut rec) = r.decide(&features, &state, started);
    let local_embed = |mut rec: Recorder, req: EmbeddingRequest| {
        let r = Arc::clone(r);
        let local_id = local_id.clone();
        async move {
            let mut req = req;
            req.model = local_id.clone();
            let mut answer = serving::embed(&r.inference, req).await?;
            let tokens = RouteTokens {
                prompt: answer.usage.prompt_tokens as u32,
                completion: 0,
            };
            let version = r.version_of(&local_id);
            rec.escalated = false;
            let record = rec.record("local", Some(local_id), version, tokens, 0.0);
            count(&r, &record);
            answer.strata = Some(record.clone());
            Ok::<_, ApiError>(with_header(axum::Json(answer).into_response(), &record))
        }
    };
    match &decision {
        Decision::Refuse { .. } => Ok(refusal_from(r, &rec, &decision)),
        Decision::Local { .. } => local_embed(rec, req.clone()).await,
        Decision::Macro { fallback_local, .. } => {
            const PATH: &str = "/v1/embeddings";
            let mut body = serde_json::to_value(&*req).unwrap_or(Value::Null);
            let macro_model = info.as_ref().and_then(|i| i.embedding_model.clone());
            if let (Some(obj), Some(m)) = (body.as_object_mut(), &macro_model) {
                obj.remove("strata");
                obj.insert("model".into(), Value::String(m.clone()));
                obj.retain(|_, v| !v.is_null());
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let sent = match r.macro_allowed() {
                Ok(()) => {
                    audit(r, &request_id, "embedding", PATH, bytes.len(), &rec).await?;
                    r.client.call(PATH, &bytes, false).await
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(answer) => {
                    let tokens = usage_tokens(&answer);
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    let cost = r.macro_succeeded(ms, tokens);
                    let record = rec.record("macro", macro_model, None, tokens, cost);
                    count(r, &record);
                    Ok(json_response(answer, &record))
                }
                Err(e) => {
                    r.macro_failed(&e);
                    if *fallback_local && model.is_some() {
                        r.status.metrics().route.fallbacks.inc();
                        rec.fell_back = true;
                        rec.push("macro_failed", e.to_string());
                        local_embed(rec, req.clone()).await
                    } else {
                        Ok(macro_unavailable(r, &mut rec, &e))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn options_come_from_the_body_then_the_headers() {
        let o = options(
            &headers(&[
                (MODE_HEADER, "only_local"),
                (PRIVATE_HEADER, "true"),
                (APP_HEADER, "kiosk"),
                (LATENCY_BUDGET_HEADER, "250"),
            ]),
            Some(RouteOptions {
                mode: Some("prefer_macro".into()),
                ..RouteOptions::default()
            }),
        )
        .unwrap();
        assert_eq!(o.mode, Some(Mode::PreferMacro));
        assert!(o.private);
        assert_eq!(o.app.as_deref(), Some("kiosk"));
        assert_eq!(o.latency_budget_ms, Some(250));
        // The body's explicit `private: false` wins over the header.
        let o = options(
            &headers(&[(PRIVATE_HEADER, "1")]),
            Some(RouteOptions {
                private: Some(false),
                ..RouteOptions::default()
            }),
        )
        .unwrap();
        assert!(!o.private);
        assert!(options(&HeaderMap::new(), None).unwrap().mode.is_none());
    }

    #[test]
    fn bad_options_are_client_errors_naming_the_field() {
        for (h, param) in [
            ((MODE_HEADER, "sometimes"), "strata.mode"),
            ((PRIVATE_HEADER, "perhaps"), "x-strata-private"),
            (
                (LATENCY_BUDGET_HEADER, "fast"),
                "x-strata-latency-budget-ms",
            ),
        ] {
            let e = options(&headers(&[h]), None).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert_eq!(e.detail().param.as_deref(), Some(param));
        }
    }

    #[test]
    fn the_record_joins_the_strata_object_of_a_body() {
        let mut body = serde_json::json!({"id": "x", "strata": {"prefill_ms": 3.0}});
        let record = RouteRecord {
            tier: "macro".into(),
            policy_version: "p1".into(),
            ..RouteRecord::default()
        };
        stamp(&mut body, &record);
        assert_eq!(body["strata"]["prefill_ms"], 3.0);
        assert_eq!(body["strata"]["tier"], "macro");
        assert_eq!(body["strata"]["policy_version"], "p1");
        let mut bare = serde_json::json!({"id": "y"});
        stamp(&mut bare, &record);
        assert_eq!(bare["strata"]["tier"], "macro");
    }

    #[test]
    fn requests_name_a_local_model_auto_or_the_macro_model() {
        let info = MacroInfo {
            chat_model: Some("qwen".into()),
            embedding_model: None,
            context_tokens: 4096,
            supports_tools: false,
            backend: "local".into(),
        };
        let default = Some("smollm2".to_owned());
        assert_eq!(
            local_model("auto", default.as_ref(), None).as_deref(),
            Some("smollm2")
        );
        assert_eq!(
            local_model("qwen", default.as_ref(), Some(&info)).as_deref(),
            Some("smollm2")
        );
        assert_eq!(
            local_model("other", default.as_ref(), Some(&info)).as_deref(),
            Some("other")
        );
        assert_eq!(local_model("auto", None, None), None);
    }

    #[test]
    fn the_macro_tier_gets_its_model_and_no_strata_options() {
        let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "hi"}],
            "strata": {"mode": "prefer_macro"},
        }))
        .unwrap();
        let body = macro_body(&req, Some("qwen"), true);
        assert_eq!(body["model"], "qwen");
        assert!(body.get("strata").is_none());
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(body.get("temperature").is_none(), "nulls are dropped");
    }
}
