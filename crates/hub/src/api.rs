//! The hub's HTTP API: routes, handlers, and the two ways a caller proves who
//! it is.
//!
//! - A device proves its identity with its client certificate, checked by
//!   rustls against the hub CA during the handshake. [`DeviceAuth`] maps the
//!   certificate's fingerprint to the device the hub issued it to, and
//!   refuses unknown and revoked devices; handlers then refuse a device that
//!   names another device in the path.
//! - An operator presents the bearer credential created on the hub's first
//!   start ([`OperatorAuth`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use protocol::{
    CreateTokenRequest, CreateTokenResponse, Device, DeviceId, DeviceList, DeviceMessage,
    DeviceMessageEnvelope, DeviceStatus, EnrollRequest, EnrollResponse, Health, Heartbeat,
    HeartbeatAck, JoinToken, SendMessageRequest, StreamHello,
};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use web::{ApiError, Json};

use crate::config::Config;
use crate::events::EventBus;
use crate::metrics::{HubMetrics, RefusalLabels};
use crate::store::{Consume, NewDevice, Store};
use crate::{hash_secret, random_bytes};

/// What the TLS layer learnt about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// Fingerprint of the verified client certificate, if one was presented.
    pub client_cert: Option<pki::Fingerprint>,
}

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    store: Store,
    bus: EventBus,
    ca: pki::CertificateAuthority,
    config: Config,
    hub_url: String,
    metrics: HubMetrics,
    registry: Arc<Registry>,
    rollout_wake: Arc<tokio::sync::Notify>,
    /// Set once the macro tier's models have loaded (in the background,
    /// so that a large model does not hold the hub's start up).
    macro_tier: std::sync::OnceLock<Arc<crate::macro_tier::MacroTier>>,
    macro_configured: bool,
    coordinator: crate::federated::Coordinator,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("hub_url", &self.inner.hub_url)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Bundles the hub's shared state.
    pub fn new(
        store: Store,
        ca: pki::CertificateAuthority,
        config: Config,
        hub_url: String,
        metrics: HubMetrics,
        registry: Arc<Registry>,
        macro_configured: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                store,
                bus: EventBus::default(),
                ca,
                config,
                hub_url,
                metrics,
                registry,
                rollout_wake: Arc::default(),
                macro_tier: std::sync::OnceLock::new(),
                macro_configured,
                coordinator: crate::federated::Coordinator::default(),
            }),
        }
    }

    /// The state store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Live stream state.
    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    /// The hub's metrics.
    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    /// The hub's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.config.data_dir
    }

    /// The hub's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The macro tier, if the hub has one.
    pub fn macro_tier(&self) -> Option<Arc<crate::macro_tier::MacroTier>> {
        self.inner.macro_tier.get().cloned()
    }

    /// Whether the configuration asks for a macro tier (loaded or not yet).
    pub fn macro_configured(&self) -> bool {
        self.inner.macro_configured
    }

    /// Serves `tier` from now on (once).
    pub fn set_macro_tier(&self, tier: Arc<crate::macro_tier::MacroTier>) {
        let _ = self.inner.macro_tier.set(tier);
    }

    /// The federated-learning coordinator.
    pub fn coordinator(&self) -> &crate::federated::Coordinator {
        &self.inner.coordinator
    }

    /// Wakes the rollout controller (a report or an operator action).
    pub fn rollout_wake(&self) -> &tokio::sync::Notify {
        &self.inner.rollout_wake
    }

    pub(crate) fn rollout_wake_handle(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.inner.rollout_wake)
    }
}

/// The hub's routes.
pub fn router(state: AppState) -> Router {
    let metrics = state.inner.metrics.http.clone();
    Router::new()
        .route("/healthz", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics_text))
        .route("/v1/enroll", post(enroll))
        .route("/v1/tokens", post(create_token))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/revoke", post(revoke_device))
        .route("/v1/devices/{id}/messages", post(send_message))
        .route("/v1/devices/{id}/heartbeat", post(heartbeat))
        .route("/v1/devices/{id}/events", get(events))
        .route(
            "/v1/devices/{id}/insights",
            post(crate::insights::ingest).layer(axum::extract::DefaultBodyLimit::max(
                crate::insights::TRANSPORT_LIMIT_BYTES,
            )),
        )
        .route("/v1/insights", get(crate::insights::list))
        .route(
            "/v1/artifacts/{sha256}",
            get(crate::registry::get_artifact)
                .put(crate::registry::put_artifact)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::registry::MAX_ARTIFACT_BYTES,
                )),
        )
        .route(
            "/v1/models",
            get(crate::registry::list_models).post(crate::registry::publish),
        )
        .route(
            "/v1/models/{name}/{version}/manifest",
            get(crate::registry::get_manifest),
        )
        .route("/v1/registry/{kind}", get(crate::registry::get_doc))
        .route(
            "/v1/registry/root",
            get(crate::registry::get_root).post(crate::registry::rotate_root),
        )
        .route(
            "/v1/rollouts",
            get(crate::rollouts::list).post(crate::rollouts::create),
        )
        .route("/v1/rollouts/{id}", get(crate::rollouts::show))
        .route("/v1/rollouts/{id}/{action}", post(crate::rollouts::act))
        .route(
            "/v1/devices/{id}/rollouts/{rollout_id}",
            post(crate::rollouts::report),
        )
        .route("/v1/insights/aggregates", get(crate::insights::aggregates))
        .route("/v1/insights/trends", get(crate::insights::trends))
        .route("/v1/insights/forecast", get(crate::insights::forecast))
        .route(
            "/v1/fl/tasks",
            post(crate::federated::create)
                .get(crate::federated::list)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::federated::MAX_BODY_BYTES,
                )),
        )
        .route("/v1/fl/tasks/{id}", get(crate::federated::show))
        .route("/v1/fl/tasks/{id}/stop", post(crate::federated::stop))
        .route(
            "/v1/fl/tasks/{id}/model",
            get(crate::federated::operator_model),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}",
            get(crate::federated::round_view),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/model",
            get(crate::federated::device_model),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/update",
            post(crate::federated::post_update).layer(axum::extract::DefaultBodyLimit::max(
                crate::federated::MAX_BODY_BYTES,
            )),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/advertise",
            post(crate::federated::post_advertise),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/shares",
            post(crate::federated::post_shares).get(crate::federated::get_shares),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/masked",
            post(crate::federated::post_masked).layer(axum::extract::DefaultBodyLimit::max(
                crate::federated::MAX_BODY_BYTES,
            )),
        )
        .route(
            "/v1/fl/tasks/{id}/rounds/{round}/unmask",
            post(crate::federated::post_unmask),
        )
        .route("/v1/macro", get(crate::macro_tier::info))
        .route("/v1/chat/completions", post(crate::macro_tier::chat))
        .route("/v1/embeddings", post(crate::macro_tier::embeddings))
        .fallback(web::not_found)
        .layer(axum::middleware::from_fn(web::problem_for_405))
        .layer(axum::middleware::from_fn_with_state(metrics, web::track))
        .with_state(state)
}

/// A device, authenticated by its client certificate.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// The device the certificate was issued to.
    pub id: DeviceId,
}

impl DeviceAuth {
    /// Refuses a device acting as another device.
    pub(crate) fn require_self(&self, path_id: &str, state: &AppState) -> Result<(), ApiError> {
        if self.id.as_str() == path_id {
            return Ok(());
        }
        state.inner.metrics.device_auth_refused.inc();
        tracing::warn!(device = %self.id, claimed = path_id, "device tried to act as another device");
        Err(ApiError::forbidden(
            "device-mismatch",
            format!(
                "client certificate belongs to device {}, not {path_id}",
                self.id
            ),
        ))
    }
}

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let refused = |e: ApiError| {
            state.inner.metrics.device_auth_refused.inc();
            e
        };
        let fingerprint = parts
            .extensions
            .get::<Peer>()
            .and_then(|p| p.client_cert)
            .ok_or_else(|| {
                refused(ApiError::unauthorized(
                    "client-certificate-required",
                    "this endpoint needs the device's client certificate (mutual TLS)",
                ))
            })?;
        let identity = state
            .inner
            .store
            .identity_by_fingerprint(fingerprint.hex())
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                refused(ApiError::forbidden(
                    "unknown-certificate",
                    "client certificate is signed by this hub but belongs to no enrolled device",
                ))
            })?;
        if identity.status == DeviceStatus::Revoked {
            return Err(refused(ApiError::forbidden(
                "device-revoked",
                format!("device {} has been revoked", identity.id),
            )));
        }
        Ok(Self { id: identity.id })
    }
}

/// An operator, authenticated by the bearer credential.
#[derive(Debug, Clone)]
pub struct OperatorAuth {
    /// The operator's id.
    pub id: String,
}

impl FromRequestParts<AppState> for OperatorAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let credential = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "operator-credential-required",
                    "this endpoint needs the operator credential: `Authorization: Bearer <token>`",
                )
            })?;
        let id = state
            .inner
            .store
            .operator_by_hash(hash_secret(credential))
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "operator-credential-invalid",
                    "the operator credential is not valid",
                )
            })?;
        Ok(Self { id })
    }
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The hub is up", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        role: "hub".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api: protocol::API_VERSION.into(),
    })
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition", content_type = "application/openmetrics-text")))]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let m = &state.inner.metrics;
    m.devices_online.set(state.inner.bus.online_count() as i64);
    if let Ok(devices) = state.inner.store.devices().await {
        m.devices_enrolled.set(devices.len() as i64);
    }
    web::metrics_response(&state.inner.registry)
}

fn refuse(state: &AppState, reason: &'static str, err: ApiError) -> ApiError {
    state
        .inner
        .metrics
        .enrolments_refused
        .get_or_create(&RefusalLabels { reason })
        .inc();
    tracing::warn!(reason, detail = %err.detail, "enrolment refused");
    err
}

fn invalid_token() -> ApiError {
    ApiError::unauthorized("join-token-invalid", "join token is not valid for this hub")
}

/// Enrols a device: consumes a one-time join token and signs the device's CSR.
#[utoipa::path(post, path = "/v1/enroll", tag = "devices",
    request_body = EnrollRequest,
    responses(
        (status = 201, description = "Enrolled", body = EnrollResponse),
        (status = 400, description = "Malformed body, token or CSR", body = protocol::Problem),
        (status = 401, description = "Token forged, expired or already used", body = protocol::Problem),
    ))]
pub async fn enroll(
    State(state): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let token = JoinToken::decode(&req.token).map_err(|e| {
        refuse(
            &state,
            "malformed",
            ApiError::bad_request("join-token-malformed", e.to_string()),
        )
    })?;
    if token.ca != state.inner.ca.fingerprint().to_string() {
        return Err(refuse(&state, "invalid", invalid_token()));
    }
    let stored = state
        .inner
        .store
        .token(token.id.clone())
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| refuse(&state, "invalid", invalid_token()))?;
    let presented = hash_secret(&token.secret);
    if !bool::from(presented.as_bytes().ct_eq(stored.secret_hash.as_bytes())) {
        return Err(refuse(&state, "invalid", invalid_token()));
    }
    // From here on the caller holds the real secret, so saying precisely
    // what is wrong with the token leaks nothing.
    if stored.used_at.is_some() {
        return Err(refuse(
            &state,
            "used",
            ApiError::unauthorized(
                "join-token-used",
                format!("join token {} was already used", stored.id),
            ),
        ));
    }
    let now = OffsetDateTime::now_utc();
    if stored.expires_at <= now {
        return Err(refuse(
            &state,
            "expired",
            ApiError::unauthorized(
                "join-token-expired",
                format!("join token {} expired at {}", stored.id, stored.expires_at),
            ),
        ));
    }
    let device_id = DeviceId::new(format!("dev-{}", hex::encode(random_bytes::<8>())));
    let name = match req.name {
        Some(name) => {
            let name = name.trim().to_owned();
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "invalid-name",
                    "device name must be 1-64 printable characters",
                ));
            }
            name
        }
        None => device_id.to_string(),
    };
    let validity = state.inner.config.device_cert_validity;
    let cert_pem = state
        .inner
        .ca
        .sign_device_csr(&req.csr_pem, device_id.as_str(), validity)
        .map_err(|e| {
            refuse(
                &state,
                "csr",
                ApiError::bad_request("invalid-csr", e.to_string()),
            )
        })?;
    let fingerprint = pki::fingerprint_pem(&cert_pem).map_err(ApiError::internal)?;
    let outcome = state
        .inner
        .store
        .enroll(
            stored.id.clone(),
            NewDevice {
                id: device_id.clone(),
                name: name.clone(),
                labels: stored.labels.clone(),
                cert_fingerprint: fingerprint.hex(),
                cert_pem: cert_pem.clone(),
                cert_not_after: now + validity,
            },
        )
        .await
        .map_err(ApiError::internal)?;
    if outcome == Consume::AlreadyUsed {
        return Err(refuse(
            &state,
            "used",
            ApiError::unauthorized(
                "join-token-used",
                format!("join token {} was already used", stored.id),
            ),
        ));
    }
    state.inner.metrics.enrolments.inc();
    tracing::info!(device = %device_id, %name, labels = ?stored.labels, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            device_id,
            certificate_pem: cert_pem,
            ca_pem: state.inner.ca.cert_pem().to_owned(),
            labels: stored.labels,
        }),
    ))
}

/// Issues a one-time join token.
#[utoipa::path(post, path = "/v1/tokens", tag = "operators",
    request_body = CreateTokenRequest,
    security(("operator" = [])),
    responses(
        (status = 201, description = "Token issued; the secret is shown only here", body = CreateTokenResponse),
        (status = 400, description = "Bad ttl or labels", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn create_token(
    State(state): State<AppState>,
    operator: OperatorAuth,
    Json(req): Json<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreateTokenResponse>), ApiError> {
    let ttl = req
        .ttl_secs
        .map_or(state.inner.config.default_token_ttl, Duration::from_secs);
    let created = crate::tokens::create(
        &state.inner.store,
        &state.inner.hub_url,
        &state.inner.ca.fingerprint(),
        ttl,
        req.labels,
    )
    .await
    .map_err(|e| match e {
        crate::Error::Config(detail) => ApiError::bad_request("invalid-token-request", detail),
        other => ApiError::internal(other),
    })?;
    tracing::info!(operator = %operator.id, token = %created.token_id, "join token issued");
    Ok((StatusCode::CREATED, Json(created)))
}

fn with_online(state: &AppState, mut device: Device) -> Device {
    device.online = state.inner.bus.is_online(&device.id);
    device
}

/// Lists every enrolled device.
#[utoipa::path(get, path = "/v1/devices", tag = "operators",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The fleet", body = DeviceList),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn list_devices(
    State(state): State<AppState>,
    _operator: OperatorAuth,
) -> Result<Json<DeviceList>, ApiError> {
    let devices = state
        .inner
        .store
        .devices()
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(DeviceList {
        devices: devices
            .into_iter()
            .map(|d| with_online(&state, d))
            .collect(),
    }))
}

async fn find_device(state: &AppState, id: &str) -> Result<Device, ApiError> {
    state
        .inner
        .store
        .device(DeviceId::new(id))
        .await
        .map_err(ApiError::internal)?
        .map(|d| with_online(state, d))
        .ok_or_else(|| ApiError::not_found("no-such-device", format!("no device {id}")))
}

/// Shows one device.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "operators",
    security(("operator" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 404, description = "No such device", body = protocol::Problem),
    ))]
pub async fn show_device(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    find_device(&state, &id).await.map(Json)
}

/// Revokes a device: its next call is refused and its open stream is told
/// and closed.
#[utoipa::path(post, path = "/v1/devices/{id}/revoke", tag = "operators",
    security(("operator" = [])),
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "Revoked (or already revoked)", body = Device),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 404, description = "No such device", body = protocol::Problem),
    ))]
pub async fn revoke_device(
    State(state): State<AppState>,
    operator: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    let device_id = DeviceId::new(&id);
    let outcome = state
        .inner
        .store
        .revoke(device_id.clone(), operator.id.clone())
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("no-such-device", format!("no device {id}")))?;
    if let (true, Some(envelope)) = outcome {
        tracing::info!(device = %device_id, operator = %operator.id, "device revoked");
        state.inner.bus.notify(&device_id, envelope.seq);
    }
    find_device(&state, &id).await.map(Json)
}

/// Pushes a message to a device; it is stored first and delivered when the
/// device's stream is (or next is) open.
#[utoipa::path(post, path = "/v1/devices/{id}/messages", tag = "operators",
    security(("operator" = [])),
    params(("id" = String, Path, description = "Device id")),
    request_body = SendMessageRequest,
    responses(
        (status = 202, description = "Stored for delivery", body = DeviceMessageEnvelope),
        (status = 400, description = "Malformed body", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 404, description = "No such device", body = protocol::Problem),
    ))]
pub async fn send_message(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Path(id): Path<String>,
    Json(req): Json<SendMessageRequest>,
) -> Result<(StatusCode, Json<DeviceMessageEnvelope>), ApiError> {
    let device = find_device(&state, &id).await?;
    if device.status == DeviceStatus::Revoked {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device-revoked",
            format!("device {id} is revoked"),
        ));
    }
    match req.message {
        DeviceMessage::Revoked => {
            return Err(ApiError::bad_request(
                "use-revoke",
                "revoke a device with POST /v1/devices/{id}/revoke",
            ));
        }
        DeviceMessage::Install { .. } | DeviceMessage::RollBack { .. } => {
            return Err(ApiError::bad_request(
                "use-rollouts",
                "install and roll back models with POST /v1/rollouts",
            ));
        }
        DeviceMessage::FlInvite { .. } => {
            return Err(ApiError::bad_request(
                "use-fl-tasks",
                "federated rounds invite their devices; start one with POST /v1/fl/tasks",
            ));
        }
        DeviceMessage::Ping { .. } => {}
    }
    let envelope = state
        .inner
        .store
        .push_message(device.id.clone(), req.message)
        .await
        .map_err(ApiError::internal)?;
    state.inner.bus.notify(&device.id, envelope.seq);
    Ok((StatusCode::ACCEPTED, Json(envelope)))
}

/// A device's heartbeat.
#[utoipa::path(post, path = "/v1/devices/{id}/heartbeat", tag = "devices",
    security(("device_certificate" = [])),
    params(("id" = String, Path, description = "The calling device's own id")),
    request_body = Heartbeat,
    responses(
        (status = 200, description = "Recorded", body = HeartbeatAck),
        (status = 400, description = "Malformed body", body = protocol::Problem),
        (status = 401, description = "No client certificate", body = protocol::Problem),
        (status = 403, description = "Revoked, unknown, or another device's id", body = protocol::Problem),
    ))]
pub async fn heartbeat(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path(id): Path<String>,
    Json(beat): Json<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    device.require_self(&id, &state)?;
    state
        .inner
        .store
        .heartbeat(device.id.clone(), beat)
        .await
        .map_err(ApiError::internal)?;
    state.inner.metrics.heartbeats.inc();
    Ok(Json(HeartbeatAck {
        server_time: OffsetDateTime::now_utc(),
        heartbeat_interval_secs: state.inner.config.heartbeat_interval.as_secs(),
    }))
}

/// Most messages sent per store read while catching a device up.
const BATCH: usize = 256;

/// The device's event stream (Server-Sent Events). The first event is
/// `hello`; then every stored message after `Last-Event-ID` as a `message`
/// event whose id is its sequence number, then new ones as they come.
#[utoipa::path(get, path = "/v1/devices/{id}/events", tag = "devices",
    security(("device_certificate" = [])),
    params(
        ("id" = String, Path, description = "The calling device's own id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Sequence number of the last message the device processed"),
    ),
    responses(
        (status = 200, description = "An open event stream", content_type = "text/event-stream"),
        (status = 400, description = "Bad Last-Event-ID", body = protocol::Problem),
        (status = 401, description = "No client certificate", body = protocol::Problem),
        (status = 403, description = "Revoked, unknown, or another device's id", body = protocol::Problem),
    ))]
pub async fn events(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    device.require_self(&id, &state)?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad-last-event-id",
                    "Last-Event-ID must be a non-negative integer",
                )
            })?,
    };
    state
        .inner
        .store
        .touch(device.id.clone())
        .await
        .map_err(ApiError::internal)?;
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(stream_device(state.clone(), device.id, after, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response())
}

async fn stream_device(state: AppState, id: DeviceId, mut after: i64, tx: mpsc::Sender<Event>) {
    let shared = &state.inner;
    let _online = shared.bus.online(&id);
    shared.metrics.streams_open.inc();
    // Subscribe before reading the store so that a message stored in between
    // still wakes the loop below.
    let mut signal = shared.bus.subscribe(&id);
    tracing::info!(device = %id, after, "device stream opened");
    let result: Result<(), String> = async {
        let latest_seq = shared
            .store
            .latest_seq(id.clone())
            .await
            .map_err(|e| e.to_string())?;
        let hello = Event::default()
            .event("hello")
            .json_data(StreamHello {
                device_id: id.clone(),
                latest_seq,
            })
            .map_err(|e| e.to_string())?;
        tx.send(hello).await.map_err(|_| "closed".to_owned())?;
        loop {
            let batch = shared
                .store
                .messages_after(id.clone(), after, BATCH)
                .await
                .map_err(|e| e.to_string())?;
            let full = batch.len() == BATCH;
            for envelope in batch {
                let revoked = envelope.message == DeviceMessage::Revoked;
                let event = Event::default()
                    .event("message")
                    .id(envelope.seq.to_string())
                    .json_data(&envelope)
                    .map_err(|e| e.to_string())?;
                tx.send(event).await.map_err(|_| "closed".to_owned())?;
                shared.metrics.messages_sent.inc();
                after = envelope.seq;
                if revoked {
                    return Ok(());
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = signal.changed() => if changed.is_err() { return Ok(()) },
                () = tx.closed() => return Ok(()),
            }
        }
    }
    .await;
    shared.metrics.streams_open.dec();
    match result {
        Ok(()) => tracing::info!(device = %id, "device stream closed"),
        Err(e) if e == "closed" => tracing::info!(device = %id, "device went away"),
        Err(e) => tracing::error!(device = %id, error = %e, "device stream failed"),
    }
}
