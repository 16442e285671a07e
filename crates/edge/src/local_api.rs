//! The agent's local HTTP API, served on loopback for applications on the
//! device: health, status and metrics here, and the inference routes of
//! [`crate::inference`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::registry::Registry;
use protocol::{AgentStatus, Health};
use web::Json;

use crate::metrics::Status;

/// Shared state of the local API.
#[derive(Clone, Debug)]
pub struct LocalState {
    /// Live status.
    pub status: Arc<Status>,
    /// Metrics registry.
    pub registry: Arc<Registry>,
}

/// The local API's routes.
pub fn router(
    state: LocalState,
    http: web::HttpMetrics,
    inference: Arc<crate::inference::Inference>,
) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(crate::inference::router(inference))
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
    Json(state.status.snapshot())
}

async fn metrics(State(state): State<LocalState>) -> Response {
    web::metrics_response(&state.registry)
}
