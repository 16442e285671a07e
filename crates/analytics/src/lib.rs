//! Fleet analytics for the hub: turns the insights that devices send (small
//! `(time, value)` points per device, site and series) into time-bucketed
//! aggregates per site and for the fleet, flags trends that several sites
//! share (or that one site shows alone), and forecasts a series a few buckets
//! ahead.
//!
//! This crate is pure maths. It does no I/O, reads no clock (callers pass
//! every time as unix milliseconds), spawns nothing and is not async; storing
//! insights, choosing time ranges and serving results as JSON belong to the
//! hub. Every public result type derives serde's `Serialize`/`Deserialize` so
//! the hub can return it as is.
//!
//! Where to start reading:
//! - [`bucket`]: [`BucketSpec`] (a validated `[from, to)` range cut into
//!   fixed-width buckets) and [`BucketSeries`] (a dense series of
//!   count/sum/min/max/mean per bucket, empty buckets included, so series from
//!   different sites align). Merging per-site series gives exactly the fleet
//!   series that aggregating all points directly would give.
//! - [`trend`]: the Mann-Kendall test (normal approximation, tie correction)
//!   and Sen's slope per site, and [`detect_trends`], which turns them into
//!   typed [`Finding`]s: a [`Finding::CrossSiteTrend`] when enough sites trend
//!   the same way, a [`Finding::SiteDivergence`] when one site trends and the
//!   fleet does not.
//! - [`forecast`](mod@forecast): additive exponential smoothing (simple, Holt's linear, or
//!   Holt-Winters with a seasonal period) in its state-space (ETS) form, with
//!   smoothing parameters fitted by minimising the one-step-ahead squared
//!   error and prediction intervals from the residual variance.
//!
//! ```
//! use analytics::{
//!     BucketSeries, BucketSpec, ForecastConfig, Point, Statistic, TrendConfig, bucket_by_key,
//!     detect_bucket_trends, fill_gaps, forecast,
//! };
//!
//! // Twelve one-minute buckets; two sites whose latency rises, one flat.
//! let spec = BucketSpec::new(0, 12 * 60_000, 60_000)?;
//! let points = (0..12i64).flat_map(|minute| {
//!     let wiggle = [0.3, -0.3, 0.1][minute as usize % 3];
//!     [("north", 2.0), ("south", 1.0), ("west", 0.0)].map(|(site, slope)| {
//!         (site, Point::new(minute * 60_000, 40.0 + slope * minute as f64 + wiggle))
//!     })
//! });
//! let by_site = bucket_by_key(spec, points);
//! let fleet = BucketSeries::merged(spec, by_site.values())?;
//!
//! let report = detect_bucket_trends(
//!     by_site.iter().map(|(site, series)| (*site, series)),
//!     Statistic::Mean,
//!     &TrendConfig::default(),
//! )?;
//! assert_eq!(report.findings.len(), 1); // a cross-site rise: north and south
//!
//! let values = fill_gaps(&fleet.values(Statistic::Mean))?;
//! let ahead = forecast(&values, &ForecastConfig { horizon: 3, ..Default::default() })?;
//! assert!(ahead.point[0] > values[11]);
//! # Ok::<(), analytics::Error>(())
//! ```
//!
//! # Why the forecasting is written here
//!
//! The wish was a standard method from a maintained crate if one fits.
//! Grafana's `augurs-ets` 0.10.3 (AutoETS, a port of statsforecast) was
//! evaluated: it builds, needs 43 crates, 19 of them new to the workspace
//! (nalgebra, simba, lstsq, a second `rand` 0.8 stack), all pure Rust, and it
//! forecasts linear and flat series well. But its seasonal models are not
//! implemented: fitting any seasonal specification (`"AAA"` with a season
//! length of 4, say) reaches `unimplemented!("seasonal component not
//! implemented yet")` and panics. Seasonal forecasting (daily and weekly
//! patterns of intents) is a core need and a panic in the hub is a bug, so
//! this crate implements the four additive ETS models itself (about 350
//! lines with their docs), with the exact prediction variances of Hyndman &
//! Athanasopoulos, *Forecasting: Principles and Practice*, and needs only
//! `libm` beyond serde and thiserror. Worth re-evaluating when augurs ships
//! seasonal ETS.

pub mod bucket;
pub mod forecast;
pub mod normal;
pub mod trend;

pub use bucket::{Bucket, BucketSeries, BucketSpec, MAX_BUCKETS, Point, Statistic, bucket_by_key};
pub use forecast::{Forecast, ForecastConfig, ForecastModel, SmoothingParams, fill_gaps, forecast};
pub use trend::{
    Direction, Finding, MAX_TREND_POINTS, MannKendall, SiteTrend, TrendConfig, TrendReport,
    TrendTest, detect_bucket_trends, detect_trends, mann_kendall, sen_slope,
};

/// Everything that can go wrong in this crate. Each message names the value
/// that was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A bucket width of zero milliseconds was asked for.
    #[error("bucket width is 0 ms, it must be at least 1 ms")]
    ZeroBucketWidth,
    /// The time range is empty or reversed.
    #[error("time range from {from_ms} ms to {to_ms} ms is empty: `from` must be before `to`")]
    EmptyRange {
        /// Start of the range (inclusive), unix ms.
        from_ms: i64,
        /// End of the range (exclusive), unix ms.
        to_ms: i64,
    },
    /// The range and width would make more buckets than [`MAX_BUCKETS`].
    #[error(
        "time range of {span_ms} ms at {width_ms} ms per bucket needs {buckets} buckets, more than the maximum of {max}"
    )]
    TooManyBuckets {
        /// Length of the range in ms.
        span_ms: u128,
        /// Bucket width in ms.
        width_ms: u64,
        /// Number of buckets the range would need.
        buckets: u128,
        /// The cap, [`MAX_BUCKETS`].
        max: usize,
    },
    /// Two bucket series with different ranges or widths were merged.
    #[error("bucket series do not align: {left} vs {right}")]
    MisalignedBuckets {
        /// The spec of the series merged into.
        left: BucketSpec,
        /// The spec of the series being merged.
        right: BucketSpec,
    },
    /// A series passed to trend detection has a different length from the
    /// fleet series.
    #[error("series of `{series}` has {len} buckets but the fleet series has {expected}")]
    MisalignedSeries {
        /// Name of the offending series (a site, or `fleet`).
        series: String,
        /// Its length in buckets.
        len: usize,
        /// The length expected.
        expected: usize,
    },
    /// A value that must be finite is NaN or infinite.
    #[error("value at index {index} is {value}, expected a finite number")]
    NonFiniteValue {
        /// Position of the value in the input slice.
        index: usize,
        /// The value itself (NaN or ±inf).
        value: f64,
    },
    /// Too few values for a statistical test.
    #[error("{what} needs at least {needed} values, got {got}")]
    TooFewPoints {
        /// What was being computed, e.g. `mann-kendall test`.
        what: &'static str,
        /// Minimum number of non-missing values.
        needed: usize,
        /// Number of non-missing values given.
        got: usize,
    },
    /// Too many values for a quadratic-cost statistic.
    #[error("{what} takes at most {max} values, got {got}")]
    TooManyPoints {
        /// What was being computed, e.g. `sen slope`.
        what: &'static str,
        /// The cap, [`MAX_TREND_POINTS`].
        max: usize,
        /// Number of non-missing values given.
        got: usize,
    },
    /// The series is too short for the forecasting model asked for.
    #[error("{model} forecast needs a series of at least {needed} values, got {got}")]
    SeriesTooShort {
        /// The model, e.g. `holt-winters additive (season length 24)`.
        model: String,
        /// Minimum length.
        needed: usize,
        /// Length given.
        got: usize,
    },
    /// A series with no value at all was given where one is needed.
    #[error("series has no values: every bucket is empty")]
    NoData,
    /// A configuration parameter is out of range.
    #[error("{name} is {value}, expected {expected}")]
    InvalidParameter {
        /// Name of the parameter, e.g. `trend significance level alpha`.
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// What was expected, e.g. `a number in (0, 1)`.
        expected: &'static str,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
