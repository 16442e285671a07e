//! Time bucketing: a validated range cut into fixed-width buckets, and dense
//! per-bucket aggregates (count, sum, min, max, mean) over `(time, value)`
//! points.
//!
//! A point belongs to the bucket that contains its `time_ms` (for an insight,
//! the start of the window it covers). Points outside `[from, to)` are not
//! aggregated but counted in [`BucketSeries::outside_range`]. NaN and
//! infinite values are skipped, not rejected, and counted in
//! [`BucketSeries::skipped_non_finite`]: one device sending a bad value should
//! not take a whole fleet dashboard down, and the count lets the hub log it.
//!
//! Every series over the same [`BucketSpec`] has the same buckets, empty ones
//! included with a count of 0, so series from different sites line up index
//! by index and [`BucketSeries::merge`] can add them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The most buckets one [`BucketSpec`] may have. It bounds the memory and the
/// work of one query (10,000 buckets is a week at one minute, or more than a
/// year at one hour).
pub const MAX_BUCKETS: usize = 10_000;

/// One measurement: a value at a time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Unix time in milliseconds; for an insight, the start of its window.
    pub time_ms: i64,
    /// The measured value. NaN and infinities are skipped when bucketing.
    pub value: f64,
}

impl Point {
    /// A point with value `value` at `time_ms`.
    pub fn new(time_ms: i64, value: f64) -> Self {
        Self { time_ms, value }
    }
}

/// A time range `[from_ms, to_ms)` cut into buckets of `width_ms`, starting
/// at `from_ms`. The last bucket is cut short at `to_ms` when the range is not
/// a whole number of widths. Construct with [`BucketSpec::new`] or
/// [`BucketSpec::aligned`]; both validate, and so does deserialising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawBucketSpec")]
pub struct BucketSpec {
    from_ms: i64,
    to_ms: i64,
    width_ms: u64,
    #[serde(skip_serializing)]
    buckets: usize,
}

/// The unvalidated wire form of [`BucketSpec`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucketSpec {
    from_ms: i64,
    to_ms: i64,
    width_ms: u64,
}

impl TryFrom<RawBucketSpec> for BucketSpec {
    type Error = Error;

    fn try_from(raw: RawBucketSpec) -> Result<Self> {
        Self::new(raw.from_ms, raw.to_ms, raw.width_ms)
    }
}

impl BucketSpec {
    /// Buckets of `width_ms` from `from_ms` (inclusive) to `to_ms`
    /// (exclusive).
    ///
    /// # Errors
    ///
    /// [`Error::ZeroBucketWidth`], [`Error::EmptyRange`] when
    /// `from_ms >= to_ms`, and [`Error::TooManyBuckets`] past [`MAX_BUCKETS`].
    pub fn new(from_ms: i64, to_ms: i64, width_ms: u64) -> Result<Self> {
        if width_ms == 0 {
            return Err(Error::ZeroBucketWidth);
        }
        if from_ms >= to_ms {
            return Err(Error::EmptyRange { from_ms, to_ms });
        }
        // i128 holds every difference of two i64 and every product below.
        let span_ms = (i128::from(to_ms) - i128::from(from_ms)) as u128;
        let buckets = span_ms.div_ceil(u128::from(width_ms));
        if buckets > MAX_BUCKETS as u128 {
            return Err(Error::TooManyBuckets {
                span_ms,
                width_ms,
                buckets,
                max: MAX_BUCKETS,
            });
        }
        Ok(Self {
            from_ms,
            to_ms,
            width_ms,
            buckets: buckets as usize,
        })
    }

    /// Like [`BucketSpec::new`], but widens the range outwards to whole
    /// multiples of `width_ms` since the unix epoch, so that hourly buckets
    /// start on the hour whatever `from_ms` the caller had.
    ///
    /// # Errors
    ///
    /// As [`BucketSpec::new`]; also [`Error::TooManyBuckets`] if widening
    /// would leave the `i64` range.
    pub fn aligned(from_ms: i64, to_ms: i64, width_ms: u64) -> Result<Self> {
        if width_ms == 0 {
            return Err(Error::ZeroBucketWidth);
        }
        if from_ms >= to_ms {
            return Err(Error::EmptyRange { from_ms, to_ms });
        }
        let w = i128::from(width_ms);
        let from = i128::from(from_ms).div_euclid(w) * w;
        let to = (i128::from(to_ms) + w - 1).div_euclid(w) * w;
        match (i64::try_from(from), i64::try_from(to)) {
            (Ok(from), Ok(to)) => Self::new(from, to, width_ms),
            _ => Err(Error::TooManyBuckets {
                span_ms: (to - from) as u128,
                width_ms,
                buckets: ((to - from) / w) as u128,
                max: MAX_BUCKETS,
            }),
        }
    }

    /// Start of the range, inclusive, unix ms.
    pub fn from_ms(&self) -> i64 {
        self.from_ms
    }

    /// End of the range, exclusive, unix ms.
    pub fn to_ms(&self) -> i64 {
        self.to_ms
    }

    /// Width of each bucket in ms (the last may be cut short at `to_ms`).
    pub fn width_ms(&self) -> u64 {
        self.width_ms
    }

    /// Number of buckets, between 1 and [`MAX_BUCKETS`].
    pub fn bucket_count(&self) -> usize {
        self.buckets
    }

    /// Start of bucket `index`, unix ms, or `None` past the last bucket.
    pub fn bucket_start_ms(&self, index: usize) -> Option<i64> {
        if index >= self.buckets {
            return None;
        }
        let start = i128::from(self.from_ms) + index as i128 * i128::from(self.width_ms);
        // Below `to_ms` because `index` is below the bucket count.
        i64::try_from(start).ok()
    }

    /// Index of the bucket containing `time_ms`, or `None` outside
    /// `[from_ms, to_ms)`.
    pub fn index_of(&self, time_ms: i64) -> Option<usize> {
        if time_ms < self.from_ms || time_ms >= self.to_ms {
            return None;
        }
        let offset = i128::from(time_ms) - i128::from(self.from_ms);
        Some((offset / i128::from(self.width_ms)) as usize)
    }
}

impl fmt::Display for BucketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{} ms, {} ms) in {} ms buckets",
            self.from_ms, self.to_ms, self.width_ms
        )
    }
}

/// Which per-bucket number to read out of a [`BucketSeries`] with
/// [`BucketSeries::values`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Number of points; 0 for an empty bucket.
    Count,
    /// Sum of values; 0 for an empty bucket (right for counts such as
    /// `intent_count`).
    Sum,
    /// Smallest value; missing for an empty bucket.
    Min,
    /// Largest value; missing for an empty bucket.
    Max,
    /// Mean value; missing for an empty bucket (right for levels such as
    /// `latency_ms_p95`).
    Mean,
}

/// Aggregates of the points that fell in one bucket. Fields are private so
/// that `mean` always agrees with `sum / count`; read them with the methods.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    start_ms: i64,
    count: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
}

impl Bucket {
    /// An empty bucket starting at `start_ms`.
    pub fn empty(start_ms: i64) -> Self {
        Self {
            start_ms,
            count: 0,
            sum: 0.0,
            min: None,
            max: None,
            mean: None,
        }
    }

    /// Start of the bucket, unix ms.
    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// Number of points in the bucket.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the values, 0 when empty.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Smallest value, `None` when empty.
    pub fn min(&self) -> Option<f64> {
        self.min
    }

    /// Largest value, `None` when empty.
    pub fn max(&self) -> Option<f64> {
        self.max
    }

    /// `sum / count`, `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        self.mean
    }

    /// True when no point fell in the bucket.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The statistic `stat` of this bucket (see [`Statistic`] for empty
    /// buckets).
    pub fn value(&self, stat: Statistic) -> Option<f64> {
        match stat {
            Statistic::Count => Some(self.count as f64),
            Statistic::Sum => Some(self.sum),
            Statistic::Min => self.min,
            Statistic::Max => self.max,
            Statistic::Mean => self.mean,
        }
    }

    /// Adds one finite value. Callers filter non-finite values first.
    fn add(&mut self, value: f64) {
        debug_assert!(value.is_finite());
        self.count += 1;
        self.sum += value;
        self.min = Some(self.min.map_or(value, |m| m.min(value)));
        self.max = Some(self.max.map_or(value, |m| m.max(value)));
        self.mean = Some(self.sum / self.count as f64);
    }

    /// Folds another bucket's aggregates into this one.
    fn merge(&mut self, other: &Bucket) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = min_opt(self.min, other.min);
        self.max = max_opt(self.max, other.max);
        self.mean = Some(self.sum / self.count as f64);
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A dense series of buckets over one [`BucketSpec`]: one [`Bucket`] per
/// bucket of the spec, in time order, empty ones included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketSeries {
    spec: BucketSpec,
    buckets: Vec<Bucket>,
    skipped_non_finite: u64,
    outside_range: u64,
}

impl BucketSeries {
    /// A series over `spec` with every bucket empty.
    pub fn empty(spec: BucketSpec) -> Self {
        let buckets = (0..spec.bucket_count())
            .filter_map(|i| spec.bucket_start_ms(i))
            .map(Bucket::empty)
            .collect();
        Self {
            spec,
            buckets,
            skipped_non_finite: 0,
            outside_range: 0,
        }
    }

    /// Aggregates `points` over `spec`.
    pub fn from_points(spec: BucketSpec, points: impl IntoIterator<Item = Point>) -> Self {
        let mut series = Self::empty(spec);
        series.extend(points);
        series
    }

    /// Adds one point: to its bucket if it is finite and inside the range,
    /// otherwise to the matching skip counter.
    pub fn push(&mut self, point: Point) {
        if !point.value.is_finite() {
            self.skipped_non_finite += 1;
            return;
        }
        match self.spec.index_of(point.time_ms) {
            Some(i) => self.buckets[i].add(point.value),
            None => self.outside_range += 1,
        }
    }

    /// Folds `other` into `self`, bucket by bucket; skip counters add up.
    /// Merging the series of every site gives the fleet series: the same
    /// counts, minima and maxima as aggregating all points directly, and the
    /// same sums up to floating-point rounding.
    ///
    /// # Errors
    ///
    /// [`Error::MisalignedBuckets`] when the two specs differ.
    pub fn merge(&mut self, other: &BucketSeries) -> Result<()> {
        if self.spec != other.spec {
            return Err(Error::MisalignedBuckets {
                left: self.spec,
                right: other.spec,
            });
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.merge(theirs);
        }
        self.skipped_non_finite += other.skipped_non_finite;
        self.outside_range += other.outside_range;
        Ok(())
    }

    /// Merges all of `series` into one series over `spec` (for example every
    /// site's series into the fleet's). No series gives an all-empty one.
    ///
    /// # Errors
    ///
    /// [`Error::MisalignedBuckets`] when any series is over another spec.
    pub fn merged<'a>(
        spec: BucketSpec,
        series: impl IntoIterator<Item = &'a BucketSeries>,
    ) -> Result<Self> {
        let mut merged = Self::empty(spec);
        for s in series {
            merged.merge(s)?;
        }
        Ok(merged)
    }

    /// The spec the series is over.
    pub fn spec(&self) -> &BucketSpec {
        &self.spec
    }

    /// The buckets, one per bucket of the spec, in time order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// How many points had a NaN or infinite value and were skipped.
    pub fn skipped_non_finite(&self) -> u64 {
        self.skipped_non_finite
    }

    /// How many finite points fell outside `[from_ms, to_ms)`.
    pub fn outside_range(&self) -> u64 {
        self.outside_range
    }

    /// The statistic `stat` of every bucket, aligned with
    /// [`BucketSeries::buckets`]; the input to [`crate::detect_trends`] and,
    /// after [`crate::fill_gaps`], to [`crate::forecast()`].
    pub fn values(&self, stat: Statistic) -> Vec<Option<f64>> {
        self.buckets.iter().map(|b| b.value(stat)).collect()
    }
}

impl Extend<Point> for BucketSeries {
    fn extend<I: IntoIterator<Item = Point>>(&mut self, points: I) {
        for p in points {
            self.push(p);
        }
    }
}

/// Aggregates keyed points over `spec`, one series per key (a site, a device,
/// or one constant key for the whole fleet). A key appears in the result if it
/// has at least one point, even one outside the range; callers that want a row
/// for a silent site insert [`BucketSeries::empty`] themselves.
pub fn bucket_by_key<K: Ord>(
    spec: BucketSpec,
    points: impl IntoIterator<Item = (K, Point)>,
) -> BTreeMap<K, BucketSeries> {
    let mut out: BTreeMap<K, BucketSeries> = BTreeMap::new();
    for (key, point) in points {
        out.entry(key)
            .or_insert_with(|| BucketSeries::empty(spec))
            .push(point);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: u64 = 60_000;

    #[test]
    fn spec_validation() {
        let cases: &[(i64, i64, u64, Result<usize>)] = &[
            (0, 60_000, MIN, Ok(1)),
            (0, 60_001, MIN, Ok(2)),
            (0, 3_600_000, MIN, Ok(60)),
            (-120_000, 0, MIN, Ok(2)),
            (0, 1, u64::MAX, Ok(1)),
            (i64::MIN, i64::MAX, u64::MAX, Ok(1)),
            (0, 10_000, 1, Ok(10_000)),
            (0, 60_000, 0, Err(Error::ZeroBucketWidth)),
            (
                5,
                5,
                MIN,
                Err(Error::EmptyRange {
                    from_ms: 5,
                    to_ms: 5,
                }),
            ),
            (
                6,
                5,
                MIN,
                Err(Error::EmptyRange {
                    from_ms: 6,
                    to_ms: 5,
                }),
            ),
            (
                0,
                10_001,
                1,
                Err(Error::TooManyBuckets {
                    span_ms: 10_001,
                    width_ms: 1,
                    buckets: 10_001,
                    max: MAX_BUCKETS,
                }),
            ),
        ];
        for (from, to, width, want) in cases {
            let got = BucketSpec::new(*from, *to, *width).map(|s| s.bucket_count());
            assert_eq!(&got, want, "new({from}, {to}, {width})");
        }
    }

    #[test]
    fn aligned_widens_to_whole_buckets() {
        // (from, to, width, (aligned from, aligned to, buckets))
        type Case = (i64, i64, u64, (i64, i64, usize));
        let cases: &[Case] = &[
            (90_000, 150_000, MIN, (60_000, 180_000, 2)),
            (60_000, 120_000, MIN, (60_000, 120_000, 1)),
            (-1, 1, MIN, (-60_000, 60_000, 2)),
        ];
        for (from, to, width, (want_from, want_to, want_n)) in cases {
            let s = BucketSpec::aligned(*from, *to, *width).unwrap();
            assert_eq!(
                (s.from_ms(), s.to_ms(), s.bucket_count()),
                (*want_from, *want_to, *want_n)
            );
        }
        assert!(BucketSpec::aligned(i64::MAX - 1, i64::MAX, MIN).is_err());
    }

    #[test]
    fn index_of_and_starts() {
        let s = BucketSpec::new(1_000, 1_250, 100).unwrap();
        let cases: &[(i64, Option<usize>)] = &[
            (999, None),
            (1_000, Some(0)),
            (1_099, Some(0)),
            (1_100, Some(1)),
            (1_249, Some(2)),
            (1_250, None),
        ];
        for (t, want) in cases {
            assert_eq!(s.index_of(*t), *want, "index_of({t})");
        }
        let starts: Vec<_> = (0..4).map(|i| s.bucket_start_ms(i)).collect();
        assert_eq!(starts, [Some(1_000), Some(1_100), Some(1_200), None]);
    }

    #[test]
    fn spec_deserialisation_validates() {
        let ok: BucketSpec =
            serde_json::from_str(r#"{"from_ms":0,"to_ms":120000,"width_ms":60000}"#).unwrap();
        assert_eq!(ok.bucket_count(), 2);
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(json, r#"{"from_ms":0,"to_ms":120000,"width_ms":60000}"#);
        assert!(
            serde_json::from_str::<BucketSpec>(r#"{"from_ms":0,"to_ms":1,"width_ms":0}"#).is_err()
        );
    }

    #[test]
    fn dense_aggregates_with_empty_buckets_and_skips() {
        let spec = BucketSpec::new(0, 400, 100).unwrap();
        let points = [
            Point::new(0, 1.0),
            Point::new(50, 3.0),
            Point::new(99, 2.0),
            Point::new(250, -4.0),
            Point::new(260, f64::NAN),
            Point::new(270, f64::INFINITY),
            Point::new(400, 9.0),
            Point::new(-1, 9.0),
        ];
        let s = BucketSeries::from_points(spec, points);
        // (start, count, sum, min, max, mean)
        type Row = (i64, u64, f64, Option<f64>, Option<f64>, Option<f64>);
        let want: &[Row] = &[
            (0, 3, 6.0, Some(1.0), Some(3.0), Some(2.0)),
            (100, 0, 0.0, None, None, None),
            (200, 1, -4.0, Some(-4.0), Some(-4.0), Some(-4.0)),
            (300, 0, 0.0, None, None, None),
        ];
        let got: Vec<_> = s
            .buckets()
            .iter()
            .map(|b| (b.start_ms(), b.count(), b.sum(), b.min(), b.max(), b.mean()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(s.skipped_non_finite(), 2);
        assert_eq!(s.outside_range(), 2);
        assert_eq!(
            s.values(Statistic::Sum),
            [Some(6.0), Some(0.0), Some(-4.0), Some(0.0)]
        );
        assert_eq!(
            s.values(Statistic::Mean),
            [Some(2.0), None, Some(-4.0), None]
        );
        assert_eq!(
            s.values(Statistic::Count),
            [Some(3.0), Some(0.0), Some(1.0), Some(0.0)]
        );
    }

    #[test]
    fn merging_misaligned_series_is_an_error() {
        let a = BucketSpec::new(0, 400, 100).unwrap();
        let b = BucketSpec::new(0, 400, 200).unwrap();
        let mut s = BucketSeries::empty(a);
        assert_eq!(
            s.merge(&BucketSeries::empty(b)),
            Err(Error::MisalignedBuckets { left: a, right: b })
        );
    }

    #[test]
    fn bucket_by_key_groups_and_aligns() {
        let spec = BucketSpec::new(0, 300, 100).unwrap();
        let points = [
            ("b", Point::new(150, 2.0)),
            ("a", Point::new(10, 1.0)),
            ("a", Point::new(210, 5.0)),
        ];
        let by_site = bucket_by_key(spec, points);
        assert_eq!(by_site.keys().copied().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            by_site["a"].values(Statistic::Mean),
            [Some(1.0), None, Some(5.0)]
        );
        assert_eq!(
            by_site["b"].values(Statistic::Mean),
            [None, Some(2.0), None]
        );
        let fleet = BucketSeries::merged(spec, by_site.values()).unwrap();
        assert_eq!(
            fleet.values(Statistic::Mean),
            [Some(1.0), Some(2.0), Some(5.0)]
        );
    }

    fn arb_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            8 => -1e6f64..1e6,
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
        ]
    }

    proptest! {
        /// Merging per-site series equals aggregating every point at once.
        #[test]
        fn merge_of_sites_equals_direct_aggregation(
            from in -1_000_000i64..1_000_000,
            span in 1i64..100_000,
            width in 1u64..20_000,
            points in prop::collection::vec(
                (0u8..5, -200_000i64..200_000, arb_value()),
                0..300,
            ),
        ) {
            prop_assume!(span as u64 / width < MAX_BUCKETS as u64);
            let spec = BucketSpec::new(from, from + span, width).unwrap();
            let keyed = points.iter().map(|&(site, dt, v)| (site, Point::new(from + dt, v)));
            let by_site = bucket_by_key(spec, keyed);
            let merged = BucketSeries::merged(spec, by_site.values()).unwrap();
            let direct = BucketSeries::from_points(
                spec,
                points.iter().map(|&(_, dt, v)| Point::new(from + dt, v)),
            );
            prop_assert_eq!(merged.skipped_non_finite(), direct.skipped_non_finite());
            prop_assert_eq!(merged.outside_range(), direct.outside_range());
            prop_assert_eq!(merged.buckets().len(), direct.buckets().len());
            for (m, d) in merged.buckets().iter().zip(direct.buckets()) {
                prop_assert_eq!(m.start_ms(), d.start_ms());
                prop_assert_eq!(m.count(), d.count());
                prop_assert_eq!(m.min(), d.min());
                prop_assert_eq!(m.max(), d.max());
                // Sums differ only by rounding: at most count * eps * sum|v|.
                let tol = 1e-9 * (1.0 + d.count() as f64 * 1e6);
                prop_assert!((m.sum() - d.sum()).abs() <= tol, "{} vs {}", m.sum(), d.sum());
                match (m.mean(), d.mean()) {
                    (Some(a), Some(b)) => prop_assert!((a - b).abs() <= tol),
                    (a, b) => prop_assert_eq!(a, b),
                }
            }
        }

        /// Any input either errors cleanly or yields a well-formed series.
        #[test]
        fn bucketing_never_panics(
            from in any::<i64>(),
            to in any::<i64>(),
            width in any::<u64>(),
            points in prop::collection::vec((any::<i64>(), any::<f64>()), 0..50),
        ) {
            if let Ok(spec) = BucketSpec::new(from, to, width) {
                let s = BucketSeries::from_points(
                    spec,
                    points.iter().map(|&(t, v)| Point::new(t, v)),
                );
                prop_assert_eq!(s.buckets().len(), spec.bucket_count());
                prop_assert!(s.buckets().len() <= MAX_BUCKETS);
                let counted: u64 = s.buckets().iter().map(Bucket::count).sum();
                prop_assert_eq!(
                    counted + s.skipped_non_finite() + s.outside_range(),
                    points.len() as u64
                );
                for b in s.buckets() {
                    prop_assert!(b.start_ms() >= from && b.start_ms() < to);
                }
            }
            let _ = BucketSpec::aligned(from, to, width);
        }
    }
}
