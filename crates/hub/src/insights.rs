//! The insights API: devices deliver batches, operators query them and the
//! fleet-wide views computed from them (aggregates, trends, forecasts).
//!
//! Delivery is exactly once by construction: a batch is validated whole
//! (one bad record refuses the batch and stores nothing), stored in one
//! transaction that skips keys the device already delivered, and answered
//! only after the commit. A device that never hears the answer sends the
//! batch again and is told the insights are duplicates.

use axum::extract::{Path, State};
use protocol::insight::{
    Insight, InsightBatch, InsightBatchAck, InsightList, MAX_BATCH_BYTES, MAX_BATCH_INSIGHTS,
    MAX_INSIGHT_BYTES,
};
use serde::Deserialize;
use utoipa::IntoParams;
use web::{ApiError, Json, Query};

use crate::api::{AppState, DeviceAuth, OperatorAuth};
use crate::store::{InsightFilter, NewInsight};

/// Bodies larger than this are cut off while being read (connection closed).
pub const TRANSPORT_LIMIT_BYTES: usize = 4 * MAX_BATCH_BYTES;

/// Receives a batch of insights from a device.
#[utoipa::path(post, path = "/v1/devices/{id}/insights", tag = "devices",
    security(("device_certificate" = [])),
    params(("id" = String, Path, description = "The calling device's own id")),
    request_body = InsightBatch,
    responses(
        (status = 200, description = "Stored (or already held); safe to delete on the device", body = InsightBatchAck),
        (status = 400, description = "A malformed record; nothing was stored", body = protocol::Problem),
        (status = 403, description = "Revoked, unknown, or another device's id", body = protocol::Problem),
        (status = 413, description = "Batch too large; nothing was stored", body = protocol::Problem),
        (status = 415, description = "Not JSON", body = protocol::Problem),
    ))]
pub async fn ingest(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<InsightBatchAck>, ApiError> {
    device.require_self(&id, &state)?;
    // The size is checked on the body as read, not by refusing early: a
    // client still sending when the answer comes would see a reset instead
    // of the 413 (bodies past TRANSPORT_LIMIT_BYTES still are cut off).
    if body.len() > MAX_BATCH_BYTES {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            format!(
                "batch is {} bytes; the most accepted is {MAX_BATCH_BYTES}",
                body.len()
            ),
        ));
    }
    let batch: InsightBatch = web::json_from_bytes(&headers, &body)?;
    if batch.device_id != device.id {
        state.metrics().device_auth_refused.inc();
        return Err(ApiError::forbidden(
            "device-mismatch",
            format!(
                "batch is for device {}, but the client certificate belongs to {}",
                batch.device_id, device.id
            ),
        ));
    }
    if batch.insights.len() > MAX_BATCH_INSIGHTS {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            format!(
                "batch holds {} insights; the most accepted is {MAX_BATCH_INSIGHTS}",
                batch.insights.len()
            ),
        ));
    }
    let mut records = Vec::with_capacity(batch.insights.len());
    for (i, raw) in batch.insights.iter().enumerate() {
        let text = raw.get();
        let bad = |why: String| {
            state.metrics().insights_refused.inc();
            ApiError::bad_request("malformed-insight", format!("insight {i}: {why}"))
        };
        if text.len() > MAX_INSIGHT_BYTES {
            return Err(bad(format!(
                "{} bytes; the most accepted is {MAX_INSIGHT_BYTES}",
                text.len()
            )));
        }
        let insight: Insight = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        insight.validate().map_err(bad)?;
        records.push(NewInsight {
            insight,
            raw: text.to_owned(),
        });
    }
    let n = records.len();
    let ingested = state
        .store()
        .ingest_insights(device.id.clone(), records)
        .await
        .map_err(ApiError::internal)?;
    let m = state.metrics();
    m.insights_stored.inc_by(ingested.stored);
    m.insights_duplicate.inc_by(ingested.duplicates);
    m.insight_batches.inc();
    tracing::debug!(device = %device.id, insights = n, stored = ingested.stored, duplicates = ingested.duplicates, "insight batch");
    Ok(Json(InsightBatchAck {
        stored: ingested.stored,
        duplicates: ingested.duplicates,
    }))
}

/// Most insights one page of `GET /v1/insights` returns.
const MAX_PAGE: usize = 5000;

/// Query parameters of `GET /v1/insights`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this device.
    pub device: Option<String>,
    /// Only devices with this `site` label.
    pub site: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this series.
    pub series: Option<String>,
    /// Only insights starting at or after this time (unix ms).
    pub from_ms: Option<i64>,
    /// Only insights starting before this time (unix ms).
    pub to_ms: Option<i64>,
    /// The `next_after` of the previous page.
    pub after: Option<i64>,
    /// Page size (default 500, at most 5000).
    pub limit: Option<usize>,
}

/// Lists stored insights, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/insights", tag = "insights",
    security(("operator" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of insights", body = InsightList),
        (status = 400, description = "A bad parameter", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn list(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Query(q): Query<ListQuery>,
) -> Result<Json<InsightList>, ApiError> {
    let limit = q.limit.unwrap_or(500);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "bad-query",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let filter = InsightFilter {
        device: q.device,
        site: q.site,
        kind: q.kind,
        series: q.series,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
    };
    let (insights, next_after) = state
        .store()
        .insights(filter, q.after.unwrap_or(0), limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(InsightList {
        insights,
        next_after,
    }))
}

/// Default look-back of the analytics endpoints, in buckets.
const DEFAULT_BUCKETS: i64 = 60;

/// Sites of devices without a `site` label are grouped under this name.
pub const NO_SITE: &str = "(no site)";

/// Query parameters shared by the analytics endpoints.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    /// The insight kind (e.g. `intent_count`). Required except for trends.
    pub kind: Option<String>,
    /// The series (e.g. an intent name). Required except for trends.
    pub series: Option<String>,
    /// Bucket width in seconds (default 60).
    pub bucket_secs: Option<u64>,
    /// Start of the range, unix ms (default: 60 buckets before `to_ms`).
    pub from_ms: Option<i64>,
    /// End of the range, unix ms, exclusive (default: now).
    pub to_ms: Option<i64>,
    /// What each bucket reports: `sum` (default), `count`, `mean`, `min`, `max`.
    #[param(value_type = Option<String>)]
    pub stat: Option<analytics::Statistic>,
    /// Forecasts: buckets ahead (default 6).
    pub horizon: Option<usize>,
    /// Forecasts: season length in buckets, if the series is seasonal.
    pub season: Option<usize>,
    /// Forecasts: only this site (default: the whole fleet).
    pub site: Option<String>,
}

impl SeriesQuery {
    fn spec(&self) -> Result<analytics::BucketSpec, ApiError> {
        let width_ms = self.bucket_secs.unwrap_or(60).saturating_mul(1000);
        let to_ms = self.to_ms.unwrap_or_else(now_ms);
        let from_ms = self
            .from_ms
            .unwrap_or_else(|| to_ms - DEFAULT_BUCKETS * width_ms as i64);
        analytics::BucketSpec::aligned(from_ms, to_ms, width_ms)
            .map_err(|e| ApiError::bad_request("bad-query", e.to_string()))
    }

    fn kind_and_series(&self) -> Result<(String, String), ApiError> {
        match (&self.kind, &self.series) {
            (Some(k), Some(s)) => Ok((k.clone(), s.clone())),
            _ => Err(ApiError::bad_request(
                "bad-query",
                "kind and series are required",
            )),
        }
    }
}

fn now_ms() -> i64 {
    crate::store::to_ms(time::OffsetDateTime::now_utc())
}

/// One bucket of an aggregate.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AggregateBucket {
    /// Start of the bucket, unix ms.
    pub start_ms: i64,
    /// Insights in it.
    pub count: u64,
    /// Sum of their values.
    pub sum: f64,
    /// Smallest value (absent when empty).
    pub min: Option<f64>,
    /// Largest value (absent when empty).
    pub max: Option<f64>,
    /// Mean value (absent when empty).
    pub mean: Option<f64>,
}

/// Per-site and fleet-wide buckets of one series.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Aggregates {
    /// The kind.
    pub kind: String,
    /// The series.
    pub series: String,
    /// Bucket width, ms.
    pub bucket_ms: u64,
    /// Start of the first bucket, unix ms.
    pub from_ms: i64,
    /// End of the last bucket, unix ms.
    pub to_ms: i64,
    /// The whole fleet.
    pub fleet: Vec<AggregateBucket>,
    /// Each site (devices without a site label under `(no site)`).
    pub sites: std::collections::BTreeMap<String, Vec<AggregateBucket>>,
}

fn buckets(series: &analytics::BucketSeries) -> Vec<AggregateBucket> {
    series
        .buckets()
        .iter()
        .map(|b| AggregateBucket {
            start_ms: b.start_ms(),
            count: b.count(),
            sum: b.sum(),
            min: b.min(),
            max: b.max(),
            mean: b.mean(),
        })
        .collect()
}

/// Reads a series' points and buckets them per site.
async fn site_buckets(
    state: &AppState,
    kind: &str,
    series: &str,
    spec: &analytics::BucketSpec,
) -> Result<std::collections::BTreeMap<String, analytics::BucketSeries>, ApiError> {
    let points = state
        .store()
        .series_points(
            kind.to_owned(),
            series.to_owned(),
            spec.from_ms(),
            spec.to_ms(),
        )
        .await
        .map_err(ApiError::internal)?;
    Ok(analytics::bucket_by_key(
        *spec,
        points.into_iter().map(|p| {
            (
                p.site.unwrap_or_else(|| NO_SITE.to_owned()),
                analytics::Point::new(p.start_ms, p.value),
            )
        }),
    ))
}

/// Time-bucketed aggregates of one series, per site and fleet-wide.
#[utoipa::path(get, path = "/v1/insights/aggregates", tag = "insights",
    security(("operator" = [])),
    params(SeriesQuery),
    responses(
        (status = 200, description = "Aggregates", body = Aggregates),
        (status = 400, description = "A bad parameter", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn aggregates(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<Aggregates>, ApiError> {
    let (kind, series) = q.kind_and_series()?;
    let spec = q.spec()?;
    let sites = site_buckets(&state, &kind, &series, &spec).await?;
    let fleet =
        analytics::BucketSeries::merged(spec, sites.values()).map_err(ApiError::internal)?;
    Ok(Json(Aggregates {
        kind,
        series,
        bucket_ms: spec.width_ms(),
        from_ms: spec.from_ms(),
        to_ms: spec.to_ms(),
        fleet: buckets(&fleet),
        sites: sites.iter().map(|(k, v)| (k.clone(), buckets(v))).collect(),
    }))
}

/// Trend findings of one series.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SeriesTrends {
    /// The kind.
    pub kind: String,
    /// The series.
    pub series: String,
    /// Mann-Kendall / Sen's slope per site and for the fleet, and findings
    /// (`cross_site_trend`, `site_divergence`).
    #[schema(value_type = Object)]
    pub report: analytics::TrendReport,
}

/// Trends across the fleet.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Trends {
    /// Bucket width, ms.
    pub bucket_ms: u64,
    /// Start of the range, unix ms.
    pub from_ms: i64,
    /// End of the range, unix ms.
    pub to_ms: i64,
    /// Series examined.
    pub examined: usize,
    /// Series with at least one finding.
    pub series: Vec<SeriesTrends>,
}

/// Flags cross-site trends (and single sites diverging from the fleet) in
/// every series, or one series if `kind` and `series` are given.
#[utoipa::path(get, path = "/v1/insights/trends", tag = "insights",
    security(("operator" = [])),
    params(SeriesQuery),
    responses(
        (status = 200, description = "Series with findings", body = Trends),
        (status = 400, description = "A bad parameter", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn trends(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<Trends>, ApiError> {
    let spec = q.spec()?;
    let stat = q.stat.unwrap_or(analytics::Statistic::Sum);
    let all = match (&q.kind, &q.series) {
        (Some(k), Some(s)) => vec![(k.clone(), s.clone())],
        (None, None) => state
            .store()
            .insight_series(spec.from_ms(), spec.to_ms())
            .await
            .map_err(ApiError::internal)?
            .into_iter()
            .map(|(k, s, _)| (k, s))
            .collect(),
        _ => {
            return Err(ApiError::bad_request(
                "bad-query",
                "give both kind and series, or neither",
            ));
        }
    };
    let config = analytics::TrendConfig {
        window_buckets: spec.bucket_count(),
        ..analytics::TrendConfig::default()
    };
    let mut out = Vec::new();
    for (kind, series) in &all {
        let sites = site_buckets(&state, kind, series, &spec).await?;
        let report = analytics::detect_bucket_trends(
            sites.iter().map(|(k, v)| (k.clone(), v)),
            stat,
            &config,
        )
        .map_err(|e| ApiError::bad_request("bad-query", e.to_string()))?;
        if !report.findings.is_empty() {
            out.push(SeriesTrends {
                kind: kind.clone(),
                series: series.clone(),
                report,
            });
        }
    }
    Ok(Json(Trends {
        bucket_ms: spec.width_ms(),
        from_ms: spec.from_ms(),
        to_ms: spec.to_ms(),
        examined: all.len(),
        series: out,
    }))
}

/// A forecast of one series.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SeriesForecast {
    /// The kind.
    pub kind: String,
    /// The series.
    pub series: String,
    /// The site, or `None` for the fleet.
    pub site: Option<String>,
    /// Bucket width, ms.
    pub bucket_ms: u64,
    /// Start of each history bucket, unix ms.
    pub history_start_ms: Vec<i64>,
    /// The history the model was fitted on (gaps filled by interpolation).
    pub history: Vec<f64>,
    /// Start of the first forecast bucket, unix ms.
    pub forecast_start_ms: i64,
    /// The fitted model, its parameters, the point forecasts and the
    /// prediction interval.
    #[schema(value_type = Object)]
    pub forecast: analytics::Forecast,
}

/// Forecasts a series a few buckets ahead with exponential smoothing (Holt's
/// linear trend, Holt-Winters when a season is given).
#[utoipa::path(get, path = "/v1/insights/forecast", tag = "insights",
    security(("operator" = [])),
    params(SeriesQuery),
    responses(
        (status = 200, description = "The forecast", body = SeriesForecast),
        (status = 400, description = "A bad parameter", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 404, description = "No such series (or site) in the range", body = protocol::Problem),
        (status = 422, description = "Too little history to forecast", body = protocol::Problem),
    ))]
pub async fn forecast(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<SeriesForecast>, ApiError> {
    let (kind, series) = q.kind_and_series()?;
    let spec = q.spec()?;
    let stat = q.stat.unwrap_or(analytics::Statistic::Sum);
    let sites = site_buckets(&state, &kind, &series, &spec).await?;
    let chosen = match &q.site {
        Some(site) => sites.get(site).cloned().ok_or_else(|| {
            ApiError::not_found(
                "no-such-series",
                format!("site {site} has no {kind}/{series} insights in the range"),
            )
        })?,
        None => {
            analytics::BucketSeries::merged(spec, sites.values()).map_err(ApiError::internal)?
        }
    };
    if chosen.buckets().iter().all(|b| b.count() == 0) {
        return Err(ApiError::not_found(
            "no-such-series",
            format!("no {kind}/{series} insights in the range"),
        ));
    }
    let unprocessable = |detail: String| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "not-enough-history",
            detail,
        )
    };
    let history = analytics::fill_gaps(&chosen.values(stat))
        .map_err(|e| unprocessable(format!("{kind}/{series}: {e}")))?;
    let config = analytics::ForecastConfig {
        horizon: q.horizon.unwrap_or(6),
        season_length: q.season,
        ..analytics::ForecastConfig::default()
    };
    config
        .validate()
        .map_err(|e| ApiError::bad_request("bad-query", e.to_string()))?;
    let forecast = analytics::forecast(&history, &config)
        .map_err(|e| unprocessable(format!("{kind}/{series}: {e}")))?;
    Ok(Json(SeriesForecast {
        kind,
        series,
        site: q.site,
        bucket_ms: spec.width_ms(),
        history_start_ms: (0..spec.bucket_count())
            .filter_map(|i| spec.bucket_start_ms(i))
            .collect(),
        history,
        forecast_start_ms: spec.to_ms(),
        forecast,
    }))
}
