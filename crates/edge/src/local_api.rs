//! The agent's local HTTP API, served on loopback for applications on the
//! device: health, status and metrics here, the routed inference routes of
//! [`crate::route`] and the device-only prediction routes of [`serving`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use protocol::{AgentStatus, Health};
use web::{ApiError, Json};

use crate::insights::{Appended, Draft, Insights};
use crate::metrics::Status;

/// Shared state of the local API.
#[derive(Clone, Debug)]
pub struct LocalState {
    /// Live status.
    pub status: Arc<Status>,
    /// Metrics registry.
    pub registry: Arc<Registry>,
    /// The device's insights.
    pub insights: Arc<Insights>,
}

/// The local API's routes.
pub fn router(
    state: LocalState,
    http: web::HttpMetrics,
    inference: Arc<serving::Inference>,
    routing: &Arc<crate::route::Routing>,
) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/insights", post(add_insights))
        .with_state(state)
        .merge(serving::predict_router(inference))
        .merge(routing.router())
        .fallback(web::not_found)
        .layer(axum::middleware::from_fn(web::problem_for_405))
        .layer(axum::middleware::from_fn_with_state(http, web::track))
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        role: "edge".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api: protocol::API_VERSION.into(),
    })
}

async fn status(State(state): State<LocalState>) -> Json<AgentStatus> {
    let mut status = state.status.snapshot();
    status.outbox = Some(state.insights.snapshot());
    Json(status)
}

async fn metrics(State(state): State<LocalState>) -> Response {
    state
        .status
        .metrics()
        .outbox
        .set(&state.insights.snapshot());
    web::metrics_response(&state.registry)
}

/// Insights an application on the device adds: one draft or a list.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Drafts {
    One(Draft),
    Many(Vec<Draft>),
}

/// Most insights one `POST /v1/insights` may carry.
const MAX_DRAFTS: usize = 1000;

/// `POST /v1/insights`: appends insights to the outbox and answers, 201,
/// once they are on disk (with the key and exact text the hub will store).
async fn add_insights(
    State(state): State<LocalState>,
    Json(drafts): Json<Drafts>,
) -> Result<(StatusCode, Json<Vec<Appended>>), ApiError> {
    let drafts = match drafts {
        Drafts::One(d) => vec![d],
        Drafts::Many(v) => v,
    };
    if drafts.is_empty() || drafts.len() > MAX_DRAFTS {
        return Err(ApiError::bad_request(
            "bad-insights",
            format!("send between 1 and {MAX_DRAFTS} insights"),
        ));
    }
    let appended = state.insights.append(drafts).await.map_err(|e| match e {
        crate::Error::InvalidInsight(why) => ApiError::bad_request("bad-insights", why),
        full @ crate::Error::OutboxFull { .. } => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "outbox-full",
            full.to_string(),
        ),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox-unavailable",
            other.to_string(),
        ),
    })?;
    Ok((StatusCode::CREATED, Json(appended)))
}
