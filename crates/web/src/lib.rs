//! HTTP plumbing shared by the Strata hub API and the agent's local API:
//! RFC 9457 problem responses, a JSON extractor that answers bad bodies with
//! a 400 problem instead of axum's plain-text rejection, 404/405 fallbacks,
//! and per-route request metrics for Prometheus.
//!
//! It knows nothing of devices, tokens or models; those live in `hub` and
//! `edge`. Start reading at [`ApiError`].

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::{PROBLEM_CONTENT_TYPE, Problem};
use serde::de::DeserializeOwned;

/// An HTTP error answered with an RFC 9457 problem body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short machine-readable slug; the problem `type` is `urn:strata:problem:<slug>`.
    pub slug: &'static str,
    /// What went wrong, for a person.
    pub detail: String,
    /// Extra headers, e.g. `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    /// A problem with the given status, slug and detail.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, detail)
    }

    /// 401 Unauthorized, with a `WWW-Authenticate` challenge.
    pub fn unauthorized(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, slug, detail)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 403 Forbidden.
    pub fn forbidden(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, slug, detail)
    }

    /// 404 Not Found.
    pub fn not_found(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, slug, detail)
    }

    /// 500 Internal Server Error; the detail is logged, not sent.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle the request; see its log",
        )
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The problem body.
    pub fn problem(&self) -> Problem {
        Problem {
            problem_type: format!("urn:strata:problem:{}", self.slug),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.slug, self.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// A JSON body extractor whose rejections are problem bodies. Malformed JSON,
/// a wrong type or an unknown field (all body types deny unknown fields) give
/// 400; a missing `Content-Type: application/json` gives 415.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Parses an already-read JSON body exactly as [`Json`] does (415 without a
/// JSON content type, 400 naming the field for a malformed body), for
/// handlers that must look at the raw body first (its size, say).
pub fn json_from_bytes<T: DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    bytes: &[u8],
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "request body must be JSON with `Content-Type: application/json`",
        ));
    }
    axum::Json::<T>::from_bytes(bytes)
        .map(|axum::Json(v)| v)
        .map_err(json_rejection)
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let detail = rejection.body_text();
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "request body must be JSON with `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(_) => {
            ApiError::new(rejection.status(), "unreadable-body", detail)
        }
        // Syntax and data errors (including unknown fields) are the client's
        // mistake in the body: 400, with serde's message naming the field.
        _ => ApiError::bad_request("malformed-body", detail),
    }
}

/// A query string extractor whose rejections are problem bodies: a missing
/// or malformed parameter, or an unknown one (for types that deny unknown
/// fields), gives 400 `bad-query` naming it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request("bad-query", rejection.body_text())),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Fallback for unknown routes: 404 problem.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        "no-such-route",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

/// Turns axum's plain 405 into a problem body.
pub async fn problem_for_405(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let allow = response.headers().get(header::ALLOW).cloned();
        let mut err = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{method} is not allowed on {path}"),
        );
        if let Some(allow) = allow {
            err = err.with_header(header::ALLOW, allow);
        }
        return err.into_response();
    }
    response
}

/// Labels of the per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// Route template, e.g. `/v1/devices/{id}` (never the raw path, to keep
    /// cardinality bounded).
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// Request counters and latency histograms per route.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RouteLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpMetrics")
    }
}

impl HttpMetrics {
    /// Creates the metrics and registers them under `prefix` (e.g. `strata_hub`).
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RouteLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "http_requests",
            "HTTP requests handled, by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to produce the response head, by route and status",
            duration.clone(),
        );
        Self { requests, duration }
    }
}

/// Middleware recording [`HttpMetrics`]; install with
/// `axum::middleware::from_fn_with_state(metrics, web::track)`.
pub async fn track(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let labels = RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.requests.get_or_create(&labels).inc();
    metrics
        .duration
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}

/// Renders a registry in the Prometheus text format.
pub fn metrics_response(registry: &Arc<Registry>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return ApiError::internal(format!("encoding metrics: {e}")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body1 {
        #[allow(dead_code)]
        a: u32,
    }

    async fn echo(Json(_): Json<Body1>) -> &'static str {
        "ok"
    }

    async fn call(body: &str, content_type: Option<&str>) -> (StatusCode, String, String) {
        let app = Router::new().route("/", post(echo));
        let mut req = Request::post("/");
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let res = app
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, ct, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn bad_bodies_are_400_problems_naming_the_fault() {
        let json = Some("application/json");
        let cases = [
            ("{", StatusCode::BAD_REQUEST, "malformed-body"),
            (
                r#"{"a":1,"b":2}"#,
                StatusCode::BAD_REQUEST,
                "unknown field `b`",
            ),
            (r#"{"a":"x"}"#, StatusCode::BAD_REQUEST, "malformed-body"),
        ];
        for (body, status, needle) in cases {
            let (got, ct, text) = call(body, json).await;
            assert_eq!(got, status, "{body}");
            assert_eq!(ct, PROBLEM_CONTENT_TYPE);
            assert!(text.contains(needle), "{body}: {text}");
            let problem: Problem = serde_json::from_str(&text).unwrap();
            assert_eq!(problem.status, status.as_u16());
        }
        let (got, _, _) = call(r#"{"a":1}"#, json).await;
        assert_eq!(got, StatusCode::OK);
        let (got, ct, _) = call(r#"{"a":1}"#, None).await;
        assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(ct, PROBLEM_CONTENT_TYPE);
    }
}
