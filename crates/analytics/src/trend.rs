//! Trend detection over aligned bucket series.
//!
//! Per series, the Mann-Kendall test decides whether the values rise or fall
//! monotonically more than chance would explain, and Sen's slope (the median
//! of the slopes between every pair of values) says by how much per bucket.
//! Both are rank-based, so one outlier bucket neither makes nor hides a
//! trend, and neither assumes normally distributed values. Significance uses
//! the normal approximation of S with the tie correction of its variance
//! (Kendall 1975; Gilbert 1987, ch. 16), and a continuity correction of 1.
//!
//! Missing buckets (`None`) are left out of both statistics; Sen's slope uses
//! the true bucket distance between the values it pairs. The test assumes
//! independent values: strongly autocorrelated series (a slowly drifting
//! level) come out significant more often than `alpha` says, which is why a
//! cross-site finding needs several sites to agree.
//!
//! [`detect_trends`] runs the test per site and for the fleet and reports
//! typed [`Finding`]s.

use serde::{Deserialize, Serialize};

use crate::bucket::{BucketSeries, Statistic};
use crate::{Error, Result, normal};

/// The most non-missing values a single Mann-Kendall test or Sen slope takes.
/// Both are quadratic in the number of values (Sen's slope also in memory:
/// 2,000 values make two million slopes, 16 MB).
pub const MAX_TREND_POINTS: usize = 2_000;

/// The Mann-Kendall statistics of one series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MannKendall {
    /// Number of non-missing values tested.
    pub n: usize,
    /// `S`: the number of rising pairs minus the number of falling pairs.
    pub s: i64,
    /// Variance of `S` under no trend, corrected for ties.
    pub var_s: f64,
    /// Normal score of `S` with a continuity correction of 1.
    pub z: f64,
    /// Two-sided p-value from the normal approximation.
    pub p_value: f64,
    /// Kendall's tau, `S / (n (n - 1) / 2)`, in `[-1, 1]`.
    pub tau: f64,
}

/// Which way a significant trend goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Values rise over time.
    Increasing,
    /// Values fall over time.
    Decreasing,
}

/// The non-missing values of `values` with their bucket index, or the index
/// of the first non-finite one.
fn present(values: &[Option<f64>]) -> Result<Vec<(usize, f64)>> {
    let mut out = Vec::with_capacity(values.len());
    for (index, v) in values.iter().enumerate() {
        if let Some(value) = *v {
            if !value.is_finite() {
                return Err(Error::NonFiniteValue { index, value });
            }
            out.push((index, value));
        }
    }
    Ok(out)
}

fn check_len(what: &'static str, got: usize, needed: usize) -> Result<()> {
    if got < needed {
        return Err(Error::TooFewPoints { what, needed, got });
    }
    if got > MAX_TREND_POINTS {
        return Err(Error::TooManyPoints {
            what,
            max: MAX_TREND_POINTS,
            got,
        });
    }
    Ok(())
}

/// The Mann-Kendall test for a monotonic trend, missing values left out.
///
/// # Errors
///
/// [`Error::TooFewPoints`] below 3 non-missing values,
/// [`Error::TooManyPoints`] above [`MAX_TREND_POINTS`], and
/// [`Error::NonFiniteValue`] for a NaN or infinite value.
pub fn mann_kendall(values: &[Option<f64>]) -> Result<MannKendall> {
    let points = present(values)?;
    let n = points.len();
    check_len("mann-kendall test", n, 3)?;
    let mut s: i64 = 0;
    for (i, &(_, a)) in points.iter().enumerate() {
        for &(_, b) in &points[i + 1..] {
            // Equal values (a tie) count neither way.
            s += match b.partial_cmp(&a) {
                Some(std::cmp::Ordering::Greater) => 1,
                Some(std::cmp::Ordering::Less) => -1,
                _ => 0,
            };
        }
    }
    let var_term = |t: usize| {
        let t = t as f64;
        t * (t - 1.0) * (2.0 * t + 5.0)
    };
    let mut sorted: Vec<f64> = points.iter().map(|&(_, v)| v).collect();
    sorted.sort_by(f64::total_cmp);
    let ties: f64 = sorted
        .chunk_by(|a, b| a == b)
        .map(|group| var_term(group.len()))
        .sum();
    let var_s = ((var_term(n) - ties) / 18.0).max(0.0);
    let z = if var_s == 0.0 {
        0.0
    } else {
        match s.signum() {
            1 => (s - 1) as f64 / var_s.sqrt(),
            -1 => (s + 1) as f64 / var_s.sqrt(),
            _ => 0.0,
        }
    };
    Ok(MannKendall {
        n,
        s,
        var_s,
        z,
        p_value: normal::two_sided_p(z),
        tau: s as f64 / (n * (n - 1) / 2) as f64,
    })
}

/// Sen's slope: the median over all pairs of non-missing values of
/// `(y_j - y_i) / (j - i)`, in units per bucket.
///
/// # Errors
///
/// [`Error::TooFewPoints`] below 2 non-missing values,
/// [`Error::TooManyPoints`] above [`MAX_TREND_POINTS`], and
/// [`Error::NonFiniteValue`] for a NaN or infinite value.
pub fn sen_slope(values: &[Option<f64>]) -> Result<f64> {
    let points = present(values)?;
    check_len("sen slope", points.len(), 2)?;
    let mut slopes = Vec::with_capacity(points.len() * (points.len() - 1) / 2);
    for (i, &(xi, yi)) in points.iter().enumerate() {
        for &(xj, yj) in &points[i + 1..] {
            slopes.push((yj - yi) / (xj - xi) as f64);
        }
    }
    // Finite values can still overflow to an infinite difference; such a
    // slope sorts to the end and only matters if most slopes are infinite.
    slopes.sort_by(f64::total_cmp);
    let mid = slopes.len() / 2;
    Ok(if slopes.len() % 2 == 1 {
        slopes[mid]
    } else {
        slopes[mid - 1] / 2.0 + slopes[mid] / 2.0
    })
}

/// The trend of one series: Mann-Kendall significance and Sen's slope.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrendTest {
    /// Number of non-missing values tested.
    pub n: usize,
    /// Mann-Kendall `S`.
    pub s: i64,
    /// Normal score of `S`.
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Kendall's tau.
    pub tau: f64,
    /// Sen's slope, in the series' units per bucket.
    pub sen_slope_per_bucket: f64,
    /// `Some` when `p_value < alpha`: the sign of `S`.
    pub direction: Option<Direction>,
}

impl TrendTest {
    /// Tests `values` at significance level `alpha`.
    ///
    /// # Errors
    ///
    /// As [`mann_kendall`].
    pub fn of(values: &[Option<f64>], alpha: f64) -> Result<Self> {
        let mk = mann_kendall(values)?;
        let sen_slope_per_bucket = sen_slope(values)?;
        let direction = if mk.p_value < alpha {
            match mk.s.signum() {
                1 => Some(Direction::Increasing),
                -1 => Some(Direction::Decreasing),
                _ => None,
            }
        } else {
            None
        };
        Ok(Self {
            n: mk.n,
            s: mk.s,
            z: mk.z,
            p_value: mk.p_value,
            tau: mk.tau,
            sen_slope_per_bucket,
            direction,
        })
    }
}

/// One site's trend test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteTrend {
    /// The site.
    pub site: String,
    /// Its test over the window.
    pub test: TrendTest,
}

/// What [`detect_trends`] found worth telling an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Enough sites trend significantly the same way.
    CrossSiteTrend {
        /// The shared direction.
        direction: Direction,
        /// The sites trending that way, each with its Sen slope and p-value.
        sites: Vec<SiteTrend>,
        /// Sites with enough data in the window to be tested.
        sites_with_data: usize,
        /// How many agreeing sites were needed: the larger of
        /// [`TrendConfig::min_sites`] and [`TrendConfig::min_site_fraction`]
        /// of `sites_with_data`, rounded up.
        sites_required: usize,
        /// The fleet series' own test (its Sen slope is the fleet-level
        /// slope), if the fleet series had enough data.
        fleet: Option<TrendTest>,
    },
    /// A site trends significantly while the fleet series does not trend
    /// that way (it is flat, or trends the other way), and the site is not
    /// part of a cross-site trend in that direction.
    SiteDivergence {
        /// The diverging site and its test.
        site: SiteTrend,
        /// The fleet series' test, whose `direction` differs from the site's.
        fleet: TrendTest,
    },
}

/// Settings for [`detect_trends`]. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrendConfig {
    /// Significance level of each Mann-Kendall test, in (0, 1). Default 0.05.
    pub alpha: f64,
    /// Least number of sites that must trend the same way for a cross-site
    /// finding, at least 1. Default 2.
    pub min_sites: usize,
    /// Least fraction of the sites with data that must trend the same way,
    /// in [0, 1]. Default 0.5.
    pub min_site_fraction: f64,
    /// How many of the most recent buckets to test, 1 to
    /// [`MAX_TREND_POINTS`]. Default 48.
    pub window_buckets: usize,
    /// Least number of non-missing buckets in the window for a series to be
    /// tested, at least 3 (with 5 or fewer a trend can never reach p < 0.05).
    /// Default 6.
    pub min_points: usize,
}

impl Default for TrendConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            min_sites: 2,
            min_site_fraction: 0.5,
            window_buckets: 48,
            min_points: 6,
        }
    }
}

impl TrendConfig {
    /// Checks every field's range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let invalid = |name, value: String, expected| {
            Err(Error::InvalidParameter {
                name,
                value,
                expected,
            })
        };
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return invalid(
                "trend significance level alpha",
                self.alpha.to_string(),
                "a number in (0, 1)",
            );
        }
        if self.min_sites == 0 {
            return invalid("trend min_sites", "0".into(), "at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_site_fraction) {
            return invalid(
                "trend min_site_fraction",
                self.min_site_fraction.to_string(),
                "a number in [0, 1]",
            );
        }
        if self.window_buckets == 0 || self.window_buckets > MAX_TREND_POINTS {
            return invalid(
                "trend window_buckets",
                self.window_buckets.to_string(),
                "between 1 and 2000",
            );
        }
        if self.min_points < 3 {
            return invalid(
                "trend min_points",
                self.min_points.to_string(),
                "at least 3",
            );
        }
        Ok(())
    }
}

/// The outcome of [`detect_trends`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrendReport {
    /// Number of buckets actually tested (the window, or fewer if the series
    /// are shorter).
    pub window_buckets: usize,
    /// The significance level used.
    pub alpha: f64,
    /// Every site with enough data, in input order, trending or not.
    pub sites: Vec<SiteTrend>,
    /// Sites with fewer than [`TrendConfig::min_points`] values in the window.
    pub insufficient_data: Vec<String>,
    /// The fleet series' test, if it had enough data.
    pub fleet: Option<TrendTest>,
    /// Cross-site trends first (increasing, then decreasing), then site
    /// divergences in input order.
    pub findings: Vec<Finding>,
}

/// Tests the last [`TrendConfig::window_buckets`] buckets of each site's
/// series and of the fleet series, and reports findings.
///
/// `sites` are `(site, values)` pairs and `fleet` the fleet's series; all
/// must have the same length and be over the same buckets (as
/// [`BucketSeries::values`] of series over one spec are). The fleet series is
/// the caller's because only the caller knows how sites combine (summed
/// counts, merged means); [`detect_bucket_trends`] does it for bucket series.
///
/// # Errors
///
/// [`Error::InvalidParameter`] for a bad config,
/// [`Error::MisalignedSeries`] for a series of another length, and
/// [`Error::NonFiniteValue`] for a NaN or infinite value.
pub fn detect_trends<S, V>(
    sites: impl IntoIterator<Item = (S, V)>,
    fleet: &[Option<f64>],
    config: &TrendConfig,
) -> Result<TrendReport>
where
    S: Into<String>,
    V: AsRef<[Option<f64>]>,
{
    config.validate()?;
    let len = fleet.len();
    let window = config.window_buckets.min(len);
    let recent = |values: &[Option<f64>]| -> Result<Option<TrendTest>> {
        let tail = &values[values.len() - window..];
        let n = tail.iter().filter(|v| v.is_some()).count();
        if n < config.min_points {
            // Still reject junk that will not be tested.
            present(tail)?;
            return Ok(None);
        }
        TrendTest::of(tail, config.alpha).map(Some)
    };

    let mut tested = Vec::new();
    let mut insufficient_data = Vec::new();
    for (site, values) in sites {
        let site = site.into();
        let values = values.as_ref();
        if values.len() != len {
            return Err(Error::MisalignedSeries {
                series: site,
                len: values.len(),
                expected: len,
            });
        }
        match recent(values)? {
            Some(test) => tested.push(SiteTrend { site, test }),
            None => insufficient_data.push(site),
        }
    }
    let fleet_test = recent(fleet)?;

    let sites_with_data = tested.len();
    let sites_required = config
        .min_sites
        .max((config.min_site_fraction * sites_with_data as f64).ceil() as usize);
    let mut findings = Vec::new();
    let mut in_cross_site = |direction| {
        let agreeing: Vec<SiteTrend> = tested
            .iter()
            .filter(|t| t.test.direction == Some(direction))
            .cloned()
            .collect();
        let flagged = !agreeing.is_empty() && agreeing.len() >= sites_required;
        if flagged {
            findings.push(Finding::CrossSiteTrend {
                direction,
                sites: agreeing,
                sites_with_data,
                sites_required,
                fleet: fleet_test,
            });
        }
        flagged
    };
    let up = in_cross_site(Direction::Increasing);
    let down = in_cross_site(Direction::Decreasing);

    if let Some(fleet_test) = fleet_test {
        for site in &tested {
            let Some(direction) = site.test.direction else {
                continue;
            };
            let covered = match direction {
                Direction::Increasing => up,
                Direction::Decreasing => down,
            };
            if !covered && fleet_test.direction != Some(direction) {
                findings.push(Finding::SiteDivergence {
                    site: site.clone(),
                    fleet: fleet_test,
                });
            }
        }
    }

    Ok(TrendReport {
        window_buckets: window,
        alpha: config.alpha,
        sites: tested,
        insufficient_data,
        fleet: fleet_test,
        findings,
    })
}

/// [`detect_trends`] over per-site bucket series: reads `stat` from each,
/// and takes as the fleet series the merge of all of them (so the fleet's
/// mean is over all points, not a mean of site means).
///
/// # Errors
///
/// [`Error::MisalignedBuckets`] when the series are over different specs, and
/// the errors of [`detect_trends`]. No series at all gives an empty report.
pub fn detect_bucket_trends<'a, S: Into<String>>(
    sites: impl IntoIterator<Item = (S, &'a BucketSeries)>,
    stat: Statistic,
    config: &TrendConfig,
) -> Result<TrendReport> {
    let sites: Vec<(String, &BucketSeries)> =
        sites.into_iter().map(|(s, b)| (s.into(), b)).collect();
    let Some((_, first)) = sites.first() else {
        config.validate()?;
        return Ok(TrendReport {
            window_buckets: 0,
            alpha: config.alpha,
            sites: Vec::new(),
            insufficient_data: Vec::new(),
            fleet: None,
            findings: Vec::new(),
        });
    };
    let fleet = BucketSeries::merged(*first.spec(), sites.iter().map(|(_, b)| *b))?;
    detect_trends(
        sites.iter().map(|(s, b)| (s.clone(), b.values(stat))),
        &fleet.values(stat),
        config,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{BucketSpec, Point};

    fn some(values: &[f64]) -> Vec<Option<f64>> {
        values.iter().copied().map(Some).collect()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Reference values from pymannkendall 1.4.3 (`original_test`), which
    /// implements the same normal approximation with tie correction; `S` and
    /// `var_s` are also easy to check by hand.
    #[test]
    fn mann_kendall_known_answers() {
        // (values, S, var_s, z, two-sided p, tau)
        type Case<'a> = (&'a [f64], i64, f64, f64, f64, f64);
        let cases: &[Case] = &[
            // Perfectly increasing, n = 5: S = 10, var = 5 * 4 * 15 / 18.
            (
                &[1.0, 2.0, 3.0, 4.0, 5.0],
                10,
                16.666_666_666_666_668,
                2.204_540_768_504_860_4,
                0.027_486_336_111_510_3,
                1.0,
            ),
            // Perfectly decreasing, n = 4.
            (
                &[4.0, 3.0, 2.0, 1.0],
                -6,
                8.666_666_666_666_666,
                -1.698_415_551_216_893_7,
                0.089_429_359_028_993_63,
                -1.0,
            ),
            // No trend; two tie groups of 2 take 2 * 18 / 18 off the variance.
            (
                &[1.0, 3.0, 2.0, 3.0, 1.0],
                0,
                14.666_666_666_666_666,
                0.0,
                1.0,
                0.0,
            ),
            // Ties {2 x2}, {3 x3}.
            (
                &[2.0, 3.0, 2.0, 3.0, 4.0, 3.0, 5.0],
                13,
                39.666_666_666_666_664,
                1.905_322_046_489_867_5,
                0.056_738_221_375_193_465,
                0.619_047_619_047_619_1,
            ),
            // A noisy rise over ten values.
            (
                &[10.0, 12.0, 11.0, 14.0, 13.0, 15.0, 18.0, 16.0, 19.0, 20.0],
                39,
                125.0,
                3.398_823_325_799_680_3,
                0.000_676_764_180_121_081_1,
                0.866_666_666_666_666_7,
            ),
            // All tied: no variance, no trend.
            (&[5.0, 5.0, 5.0, 5.0], 0, 0.0, 0.0, 1.0, 0.0),
            (
                &[1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0, 4.0],
                14,
                58.0,
                1.706_983_627_176_393_2,
                0.087_825_095_630_194_92,
                0.5,
            ),
        ];
        for &(values, s, var_s, z, p, tau) in cases {
            let mk = mann_kendall(&some(values)).unwrap();
            assert_eq!(mk.s, s, "{values:?}");
            assert_eq!(mk.n, values.len());
            assert!(close(mk.var_s, var_s, 1e-9), "{values:?}: var {}", mk.var_s);
            assert!(close(mk.z, z, 1e-9), "{values:?}: z {}", mk.z);
            assert!(close(mk.p_value, p, 1e-9), "{values:?}: p {}", mk.p_value);
            assert!(close(mk.tau, tau, 1e-12), "{values:?}: tau {}", mk.tau);
        }
    }

    #[test]
    fn mann_kendall_rejects_bad_input() {
        let cases: &[(Vec<Option<f64>>, Error)] = &[
            (
                some(&[1.0, 2.0]),
                Error::TooFewPoints {
                    what: "mann-kendall test",
                    needed: 3,
                    got: 2,
                },
            ),
            (
                vec![Some(1.0), None, None, Some(2.0)],
                Error::TooFewPoints {
                    what: "mann-kendall test",
                    needed: 3,
                    got: 2,
                },
            ),
            (
                vec![Some(1.0), Some(f64::INFINITY), Some(2.0)],
                Error::NonFiniteValue {
                    index: 1,
                    value: f64::INFINITY,
                },
            ),
            (
                vec![Some(0.0); MAX_TREND_POINTS + 1],
                Error::TooManyPoints {
                    what: "mann-kendall test",
                    max: MAX_TREND_POINTS,
                    got: MAX_TREND_POINTS + 1,
                },
            ),
        ];
        for (values, want) in cases {
            assert_eq!(&mann_kendall(values).unwrap_err(), want);
        }
    }

    #[test]
    fn sen_slope_known_answers() {
        let cases: &[(Vec<Option<f64>>, f64)] = &[
            // A line y = 3 - 0.5 x.
            (some(&[3.0, 2.5, 2.0, 1.5, 1.0, 0.5]), -0.5),
            // The same line with gaps: slopes use the true bucket distance.
            (
                vec![Some(3.0), None, Some(2.0), None, None, Some(0.5)],
                -0.5,
            ),
            // One wild outlier does not move the median slope.
            (some(&[1.0, 2.0, 3.0, 400.0, 5.0, 6.0, 7.0]), 1.0),
            // y = [0, 1, 3]: pair slopes 1, 1.5, 2.
            (some(&[0.0, 1.0, 3.0]), 1.5),
            // Even number of slopes (n = 4 gives 6): y = [0, 1, 1, 4] gives
            // 1, 0.5, 4/3, 0, 1.5, 3; sorted 0, 0.5, 1, 4/3, 1.5, 3.
            (some(&[0.0, 1.0, 1.0, 4.0]), (1.0 + 4.0 / 3.0) / 2.0),
            (some(&[7.0, 7.0]), 0.0),
            // pymannkendall 1.4.3 `sens_slope`.
            (some(&[2.0, 3.0, 2.0, 3.0, 4.0, 3.0, 5.0]), 0.4),
            (
                some(&[1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0, 4.0]),
                0.366_666_666_666_666_7,
            ),
        ];
        for (values, want) in cases {
            let got = sen_slope(values).unwrap();
            assert!(close(got, *want, 1e-12), "{values:?}: {got} != {want}");
        }
        assert!(matches!(
            sen_slope(&[Some(1.0)]),
            Err(Error::TooFewPoints {
                needed: 2,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = [
            TrendConfig {
                alpha: 0.0,
                ..TrendConfig::default()
            },
            TrendConfig {
                alpha: f64::NAN,
                ..TrendConfig::default()
            },
            TrendConfig {
                min_sites: 0,
                ..TrendConfig::default()
            },
            TrendConfig {
                min_site_fraction: 1.5,
                ..TrendConfig::default()
            },
            TrendConfig {
                window_buckets: 0,
                ..TrendConfig::default()
            },
            TrendConfig {
                min_points: 2,
                ..TrendConfig::default()
            },
        ];
        let names: Vec<_> = bad
            .iter()
            .map(|c| match c.validate() {
                Err(Error::InvalidParameter { name, .. }) => name,
                other => panic!("{c:?} gave {other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "trend significance level alpha",
                "trend significance level alpha",
                "trend min_sites",
                "trend min_site_fraction",
                "trend window_buckets",
                "trend min_points",
            ]
        );
        TrendConfig::default().validate().unwrap();
    }

    /// A rising, falling or flat series of 12 buckets with a little
    /// deterministic wiggle.
    fn shaped(slope: f64, offset: f64) -> Vec<Option<f64>> {
        (0..12)
            .map(|i| Some(offset + slope * i as f64 + [0.3, -0.2, 0.1, -0.3][i % 4]))
            .collect()
    }

    fn flat(offset: f64) -> Vec<Option<f64>> {
        (0..12)
            .map(|i| Some(offset + [0.3, -0.2, 0.1, -0.3, 0.0, 0.2][i % 6]))
            .collect()
    }

    fn mean_of(sites: &[(&str, Vec<Option<f64>>)]) -> Vec<Option<f64>> {
        (0..12)
            .map(|i| {
                let sum: f64 = sites.iter().map(|(_, v)| v[i].unwrap()).sum();
                Some(sum / sites.len() as f64)
            })
            .collect()
    }

    /// What each finding says, compactly: kind, direction, sites.
    fn summary(report: &TrendReport) -> Vec<(String, Direction, Vec<String>)> {
        report
            .findings
            .iter()
            .map(|f| match f {
                Finding::CrossSiteTrend {
                    direction, sites, ..
                } => (
                    "cross_site".to_string(),
                    *direction,
                    sites.iter().map(|s| s.site.clone()).collect(),
                ),
                Finding::SiteDivergence { site, .. } => (
                    "divergence".to_string(),
                    site.test.direction.unwrap(),
                    vec![site.site.clone()],
                ),
            })
            .collect()
    }

    #[test]
    fn findings_table() {
        use Direction::{Decreasing as Down, Increasing as Up};
        type Case = (
            &'static str,
            Vec<(&'static str, Vec<Option<f64>>)>,
            Vec<(&'static str, Direction, Vec<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "all flat: nothing",
                vec![("a", flat(10.0)), ("b", flat(20.0)), ("c", flat(30.0))],
                vec![],
            ),
            (
                "two of three rising: cross-site",
                vec![
                    ("a", shaped(1.0, 10.0)),
                    ("b", shaped(2.0, 0.0)),
                    ("c", flat(5.0)),
                ],
                vec![("cross_site", Up, vec!["a", "b"])],
            ),
            (
                "one of four rising, fleet flat: divergence",
                vec![
                    ("a", flat(100.0)),
                    ("b", flat(100.0)),
                    ("c", shaped(0.5, 10.0)),
                    ("d", shaped(-0.5, 10.0)),
                ],
                vec![
                    ("divergence", Up, vec!["c"]),
                    ("divergence", Down, vec!["d"]),
                ],
            ),
            (
                "one site falling against a rising fleet: divergence",
                vec![
                    ("a", shaped(3.0, 0.0)),
                    ("b", shaped(3.0, 0.0)),
                    ("c", shaped(3.0, 0.0)),
                    ("d", shaped(-1.0, 50.0)),
                ],
                vec![
                    ("cross_site", Up, vec!["a", "b", "c"]),
                    ("divergence", Down, vec!["d"]),
                ],
            ),
            (
                "single site: min_sites 2 is never met, fleet is the site",
                vec![("a", shaped(1.0, 0.0))],
                vec![],
            ),
        ];
        for (name, sites, want) in cases {
            let fleet = mean_of(&sites);
            let report = detect_trends(
                sites.iter().map(|(s, v)| (*s, v)),
                &fleet,
                &TrendConfig::default(),
            )
            .unwrap();
            let want: Vec<_> = want
                .into_iter()
                .map(|(k, d, s)| {
                    (
                        k.to_string(),
                        d,
                        s.into_iter().map(String::from).collect::<Vec<_>>(),
                    )
                })
                .collect();
            assert_eq!(summary(&report), want, "{name}");
        }
    }

    #[test]
    fn cross_site_finding_carries_its_reasons() {
        let sites = [("a", shaped(1.0, 0.0)), ("b", shaped(1.0, 5.0))];
        let fleet = mean_of(&sites);
        let report = detect_trends(
            sites.iter().map(|(s, v)| (*s, v)),
            &fleet,
            &TrendConfig::default(),
        )
        .unwrap();
        let [
            Finding::CrossSiteTrend {
                direction,
                sites,
                sites_with_data,
                sites_required,
                fleet,
            },
        ] = report.findings.as_slice()
        else {
            panic!("{:?}", report.findings);
        };
        assert_eq!(*direction, Direction::Increasing);
        assert_eq!((*sites_with_data, *sites_required), (2, 2));
        for s in sites {
            assert!(close(s.test.sen_slope_per_bucket, 1.0, 0.15), "{s:?}");
            assert!(s.test.p_value < 0.001);
        }
        let fleet = fleet.unwrap();
        assert!(close(fleet.sen_slope_per_bucket, 1.0, 0.15));
        assert_eq!(fleet.direction, Some(Direction::Increasing));
        // The report is JSON for the hub.
        let json = serde_json::to_value(&report.findings[0]).unwrap();
        assert_eq!(json["kind"], "cross_site_trend");
        assert_eq!(json["direction"], "increasing");
    }

    #[test]
    fn window_and_missing_data() {
        // 20 buckets: falling for the first 14, rising over the last 6.
        let series: Vec<Option<f64>> = (0..20)
            .map(|i| {
                Some(if i < 14 {
                    100.0 - i as f64
                } else {
                    i as f64 * 10.0
                })
            })
            .collect();
        let sparse: Vec<Option<f64>> = (0..20).map(|i| (i % 5 == 0).then_some(1.0)).collect();
        let config = TrendConfig {
            window_buckets: 6,
            min_sites: 1,
            ..TrendConfig::default()
        };
        let report =
            detect_trends([("a", &series), ("sparse", &sparse)], &series, &config).unwrap();
        assert_eq!(report.window_buckets, 6);
        assert_eq!(report.insufficient_data, ["sparse"]);
        assert_eq!(report.sites[0].test.direction, Some(Direction::Increasing));
        assert_eq!(report.sites[0].test.n, 6);
    }

    #[test]
    fn misaligned_series_is_an_error() {
        let err = detect_trends(
            [("a", some(&[1.0, 2.0]))],
            &some(&[1.0, 2.0, 3.0]),
            &TrendConfig::default(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            Error::MisalignedSeries {
                series: "a".into(),
                len: 2,
                expected: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "series of `a` has 2 buckets but the fleet series has 3"
        );
    }

    #[test]
    fn bucket_trends_end_to_end() {
        let spec = BucketSpec::new(0, 12 * 60_000, 60_000).unwrap();
        let sites = ["north", "south", "west"];
        let points = (0..12i64).flat_map(|minute| {
            sites.iter().enumerate().map(move |(k, &site)| {
                // north and south rise, west stays put.
                let slope = [2.0, 1.0, 0.0][k];
                let wiggle = [0.4, -0.4, 0.1][(minute % 3) as usize];
                (
                    site,
                    Point::new(
                        minute * 60_000 + 1_000,
                        50.0 + slope * minute as f64 + wiggle,
                    ),
                )
            })
        });
        let by_site = crate::bucket_by_key(spec, points);
        let report = detect_bucket_trends(
            by_site.iter().map(|(s, b)| (*s, b)),
            Statistic::Mean,
            &TrendConfig::default(),
        )
        .unwrap();
        assert_eq!(
            summary(&report),
            [(
                "cross_site".to_string(),
                Direction::Increasing,
                vec!["north".to_string(), "south".to_string()]
            )]
        );
        let fleet = report.fleet.unwrap();
        assert!(close(fleet.sen_slope_per_bucket, 1.0, 0.1), "{fleet:?}");
        let empty = detect_bucket_trends(
            Vec::<(&str, &BucketSeries)>::new(),
            Statistic::Mean,
            &TrendConfig::default(),
        )
        .unwrap();
        assert!(empty.findings.is_empty());
    }
}
