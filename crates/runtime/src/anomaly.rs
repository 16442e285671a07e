//! Streaming anomaly detection: Half-Space Trees over min-max-scaled readings.
//!
//! [`HalfSpaceTrees`] follows Tan, Ting & Liu, "Fast anomaly detection for
//! streaming data" (IJCAI 2011), in the variant river ships as
//! `anomaly.HalfSpaceTrees`: trees of fixed height are built up front over
//! the unit cube (each split on a feature picked with probability
//! proportional to the node's width along it, at a point drawn uniformly
//! from the middle 70% of that width); every reading adds to the mass of the
//! nodes on its path in the current window; at the end of each window of
//! `window_size` readings those masses become the reference masses the next
//! window is scored against. A reading that falls where the reference window
//! had little mass scores high.
//!
//! Half-space trees expect features in [0, 1]; [`MinMaxScaler`] learns each
//! feature's range online, and [`StreamingDetector`] chains the two the way
//! `MinMaxScaler() | HalfSpaceTrees()` does in river: score with the current
//! scaler, then learn.
//!
//! [`load_shuttle`] and [`evaluate`] run the detector over a labelled data
//! set and report ROC-AUC and F1 (flags by a [`ThresholdRule`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::{AnomalyScorer, ModelBackend, ModelInfo, ModelKind};
use crate::error::{Error, Result};

/// Parameters of a [`HalfSpaceTrees`] detector (river's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HstConfig {
    /// Number of trees. Default 10.
    pub n_trees: usize,
    /// Height of each tree (a tree has `2^(height+1) - 1` nodes). Default 8.
    pub height: u32,
    /// Readings per window (reference masses are swapped in after each). Default 250.
    pub window_size: usize,
    /// Seed of the random tree structure. Default 42.
    pub seed: u64,
}

impl Default for HstConfig {
    fn default() -> Self {
        HstConfig {
            n_trees: 10,
            height: 8,
            window_size: 250,
            seed: 42,
        }
    }
}

/// Fraction of a node's width on either side where no split is placed.
const PADDING: f64 = 0.15;

/// One tree, stored as a complete binary tree in arrays (node `i` has
/// children `2i+1` and `2i+2`; nodes at depth `height` are leaves).
#[derive(Debug, Clone)]
struct Tree {
    feature: Vec<usize>,
    threshold: Vec<f64>,
    /// Mass of the reference (previous) window.
    r_mass: Vec<u32>,
    /// Mass of the latest (current) window.
    l_mass: Vec<u32>,
}

/// A Half-Space Trees detector over features already scaled to [0, 1].
#[derive(Debug, Clone)]
pub struct HalfSpaceTrees {
    config: HstConfig,
    n_features: usize,
    trees: Vec<Tree>,
    counter: usize,
    first_window: bool,
    size_limit: f64,
    max_score: f64,
}

impl HalfSpaceTrees {
    /// Builds the trees for readings of `n_features` features.
    pub fn new(n_features: usize, config: HstConfig) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidInput {
            what: "half-space trees".to_owned(),
            reason: reason.to_owned(),
        };
        if n_features == 0 {
            return Err(invalid("at least one feature is needed"));
        }
        if config.n_trees == 0 || config.window_size == 0 {
            return Err(invalid("n_trees and window_size must be at least 1"));
        }
        if config.height == 0 || config.height > 20 {
            return Err(invalid("height must be between 1 and 20"));
        }
        let n_nodes = (1usize << (config.height + 1)) - 1;
        let n_internal = (1usize << config.height) - 1;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let trees = (0..config.n_trees)
            .map(|_| {
                let mut tree = Tree {
                    feature: vec![0; n_internal],
                    threshold: vec![0.0; n_internal],
                    r_mass: vec![0; n_nodes],
                    l_mass: vec![0; n_nodes],
                };
                let mut limits = vec![(0.0f64, 1.0f64); n_features];
                build(&mut tree, 0, n_internal, &mut limits, &mut rng);
                tree
            })
            .collect();
        let window = config.window_size as f64;
        Ok(HalfSpaceTrees {
            size_limit: 0.1 * window,
            max_score: config.n_trees as f64 * window * ((1u64 << (config.height + 1)) - 1) as f64,
            config,
            n_features,
            trees,
            counter: 0,
            first_window: true,
        })
    }

    /// Number of features a reading must have.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    fn check(&self, x: &[f64]) -> Result<()> {
        if x.len() != self.n_features {
            return Err(Error::FeatureCount {
                what: "half-space trees".to_owned(),
                expected: self.n_features,
                got: x.len(),
            });
        }
        if x.iter().any(|v| v.is_nan()) {
            return Err(Error::InvalidInput {
                what: "half-space trees".to_owned(),
                reason: "a feature is NaN".to_owned(),
            });
        }
        Ok(())
    }

    /// Anomaly score of a reading in [0, 1] (higher is more anomalous); 0
    /// during the first window, when there is no reference yet.
    pub fn score(&self, x: &[f64]) -> Result<f64> {
        self.check(x)?;
        if self.first_window {
            return Ok(0.0);
        }
        let n_internal = self.trees[0].feature.len();
        let mut score = 0.0;
        for tree in &self.trees {
            let mut node = 0usize;
            let mut depth = 0u32;
            loop {
                let mass = f64::from(tree.r_mass[node]);
                score += mass * f64::from(1u32 << depth);
                if mass < self.size_limit || node >= n_internal {
                    break;
                }
                node = child(tree, node, x);
                depth += 1;
            }
        }
        Ok(1.0 - score / self.max_score)
    }

    /// Adds a reading to the current window.
    pub fn learn(&mut self, x: &[f64]) -> Result<()> {
        self.check(x)?;
        let n_internal = self.trees[0].feature.len();
        for tree in &mut self.trees {
            let mut node = 0usize;
            loop {
                tree.l_mass[node] += 1;
                if node >= n_internal {
                    break;
                }
                node = child(tree, node, x);
            }
        }
        self.counter += 1;
        if self.counter == self.config.window_size {
            for tree in &mut self.trees {
                tree.r_mass.copy_from_slice(&tree.l_mass);
                tree.l_mass.fill(0);
            }
            self.first_window = false;
            self.counter = 0;
        }
        Ok(())
    }
}

fn child(tree: &Tree, node: usize, x: &[f64]) -> usize {
    if x[tree.feature[node]] < tree.threshold[node] {
        2 * node + 1
    } else {
        2 * node + 2
    }
}

/// Fills in the splits of the subtree at `node` over the box `limits`.
fn build(
    tree: &mut Tree,
    node: usize,
    n_internal: usize,
    limits: &mut [(f64, f64)],
    rng: &mut ChaCha8Rng,
) {
    if node >= n_internal {
        return;
    }
    // Pick a feature with probability proportional to the box's width along it.
    let total: f64 = limits.iter().map(|(a, b)| b - a).sum();
    let mut pick = rng.random::<f64>() * total;
    let mut on = limits.len() - 1;
    for (i, (a, b)) in limits.iter().enumerate() {
        pick -= b - a;
        if pick < 0.0 {
            on = i;
            break;
        }
    }
    let (a, b) = limits[on];
    let at = a + PADDING * (b - a) + rng.random::<f64>() * (1.0 - 2.0 * PADDING) * (b - a);
    tree.feature[node] = on;
    tree.threshold[node] = at;
    limits[on] = (a, at);
    build(tree, 2 * node + 1, n_internal, limits, rng);
    limits[on] = (at, b);
    build(tree, 2 * node + 2, n_internal, limits, rng);
    limits[on] = (a, b);
}

/// Scales each feature to [0, 1] with the minimum and maximum seen so far.
#[derive(Debug, Clone)]
pub struct MinMaxScaler {
    min: Vec<f64>,
    max: Vec<f64>,
}

impl MinMaxScaler {
    /// A scaler that has seen nothing.
    pub fn new(n_features: usize) -> Self {
        MinMaxScaler {
            min: vec![f64::INFINITY; n_features],
            max: vec![f64::NEG_INFINITY; n_features],
        }
    }

    /// Widens the ranges to include `x`.
    pub fn learn(&mut self, x: &[f64]) {
        for ((lo, hi), &v) in self.min.iter_mut().zip(self.max.iter_mut()).zip(x) {
            *lo = lo.min(v);
            *hi = hi.max(v);
        }
    }

    /// `x` scaled with the ranges seen so far (0 for a feature whose range
    /// is still empty or a single point).
    pub fn transform(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(self.min.iter().zip(&self.max))
            .map(|(&v, (&lo, &hi))| if hi > lo { (v - lo) / (hi - lo) } else { 0.0 })
            .collect()
    }
}

/// Min-max scaling followed by Half-Space Trees: river's
/// `MinMaxScaler() | HalfSpaceTrees()`.
#[derive(Debug, Clone)]
pub struct StreamingDetector {
    scaler: MinMaxScaler,
    trees: HalfSpaceTrees,
}

impl StreamingDetector {
    /// A detector for readings of `n_features` features.
    pub fn new(n_features: usize, config: HstConfig) -> Result<Self> {
        Ok(StreamingDetector {
            scaler: MinMaxScaler::new(n_features),
            trees: HalfSpaceTrees::new(n_features, config)?,
        })
    }

    /// Scores a reading against what was learnt so far.
    pub fn score(&self, x: &[f64]) -> Result<f64> {
        self.trees.check(x)?;
        self.trees.score(&self.scaler.transform(x))
    }

    /// Learns from a reading (scaler first, then the trees).
    pub fn learn(&mut self, x: &[f64]) -> Result<()> {
        self.trees.check(x)?;
        self.scaler.learn(x);
        self.trees.learn(&self.scaler.transform(x))
    }

    /// Scores a reading, then learns from it.
    pub fn score_and_learn(&mut self, x: &[f64]) -> Result<f64> {
        let score = self.score(x)?;
        self.learn(x)?;
        Ok(score)
    }

    /// Number of features a reading must have.
    pub fn n_features(&self) -> usize {
        self.trees.n_features()
    }
}

/// A labelled data set of readings.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledReadings {
    /// Feature names, from the CSV header.
    pub feature_names: Vec<String>,
    /// One row of features per reading.
    pub readings: Vec<Vec<f64>>,
    /// Whether each reading is an anomaly.
    pub labels: Vec<bool>,
}

/// Loads river's `shuttle.csv.gz` (or any gzipped CSV with a header, numeric
/// features and a final 0/1 label column).
pub fn load_shuttle(path: &Path) -> Result<LabelledReadings> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    read_labelled_csv(BufReader::new(flate2::read::GzDecoder::new(file)), path)
}

/// Reads a CSV with a header, numeric features and a final 0/1 label column.
pub fn read_labelled_csv<R: BufRead>(reader: R, path: &Path) -> Result<LabelledReadings> {
    let err = |line: usize, reason: String| Error::Dataset {
        path: PathBuf::from(path),
        line,
        reason,
    };
    let mut lines = reader.lines();
    let header = match lines.next() {
        Some(h) => h.map_err(Error::io(path))?,
        None => return Err(err(0, "the file is empty".to_owned())),
    };
    let mut columns: Vec<String> = header
        .trim()
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    if columns.len() < 2 {
        return Err(err(
            1,
            "need at least one feature and a label column".to_owned(),
        ));
    }
    columns.pop();
    let n = columns.len();
    let mut readings = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        let line = line.map_err(Error::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != n + 1 {
            return Err(err(
                line_no,
                format!("{} fields, expected {}", fields.len(), n + 1),
            ));
        }
        let row = fields[..n]
            .iter()
            .map(|f| {
                f.trim()
                    .parse::<f64>()
                    .map_err(|e| err(line_no, format!("feature {f:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let label = match fields[n].trim() {
            "0" | "false" | "False" => false,
            "1" | "true" | "True" => true,
            other => return Err(err(line_no, format!("label {other:?} is not 0 or 1"))),
        };
        readings.push(row);
        labels.push(label);
    }
    Ok(LabelledReadings {
        feature_names: columns,
        readings,
        labels,
    })
}

/// How scores become flags for F1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum ThresholdRule {
    /// Flag a reading when its score is at least this value.
    Fixed(f64),
    /// Flag the given fraction of readings with the highest scores (the
    /// expected contamination, a prior from the domain): the threshold is
    /// the `1 - fraction` quantile of the evaluated scores. Label-free and
    /// independent of the scores' scale, which varies with the trees drawn.
    Contamination(f64),
}

/// The result of running a detector over a labelled stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyEvaluation {
    /// Readings scored.
    pub n: usize,
    /// Readings labelled anomalous.
    pub n_anomalies: usize,
    /// Area under the ROC curve of the scores (exact, ties averaged).
    pub roc_auc: f64,
    /// The rule that turned scores into flags.
    pub rule: ThresholdRule,
    /// The threshold the rule gave: a reading is flagged when its score is at least this.
    pub threshold: f64,
    /// F1 of the anomaly class at `threshold`.
    pub f1: f64,
    /// Precision at `threshold`.
    pub precision: f64,
    /// Recall at `threshold`.
    pub recall: f64,
    /// The best F1 over all thresholds (an oracle figure: it peeks at the labels).
    pub best_f1: f64,
    /// The threshold that gives `best_f1`.
    pub best_f1_threshold: f64,
}

/// Runs `detector` over the stream in order (score each reading, then
/// learn from it, as river's progressive evaluation does) and scores the
/// result, flagging readings by `rule`.
pub fn evaluate(
    detector: &mut StreamingDetector,
    data: &LabelledReadings,
    rule: ThresholdRule,
) -> Result<AnomalyEvaluation> {
    let scores = data
        .readings
        .iter()
        .map(|x| detector.score_and_learn(x))
        .collect::<Result<Vec<_>>>()?;
    Ok(evaluate_scores(&scores, &data.labels, rule))
}

/// ROC-AUC and F1 of given scores against labels.
pub fn evaluate_scores(scores: &[f64], labels: &[bool], rule: ThresholdRule) -> AnomalyEvaluation {
    let n = scores.len().min(labels.len());
    let (scores, labels) = (&scores[..n], &labels[..n]);
    let n_pos = labels.iter().filter(|&&l| l).count();

    // Sort descending; walking down the ranks, each distinct score is a threshold.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let threshold = match rule {
        ThresholdRule::Fixed(t) => t,
        ThresholdRule::Contamination(fraction) => {
            let k = ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).clamp(1, n.max(1));
            order.get(k - 1).map_or(f64::INFINITY, |&i| scores[i])
        }
    };
    let (precision, recall, f1) = prf(scores, labels, threshold, n_pos);
    let mut best = (0.0, f64::INFINITY);
    let mut tp = 0usize;
    let mut i = 0;
    while i < n {
        let s = scores[order[i]];
        while i < n && scores[order[i]] == s {
            tp += usize::from(labels[order[i]]);
            i += 1;
        }
        let f = f1_from(tp, i - tp, n_pos);
        if f > best.0 {
            best = (f, s);
        }
    }

    AnomalyEvaluation {
        n,
        n_anomalies: n_pos,
        roc_auc: roc_auc(scores, labels),
        rule,
        threshold,
        f1,
        precision,
        recall,
        best_f1: best.0,
        best_f1_threshold: best.1,
    }
}

fn f1_from(tp: usize, fp: usize, n_pos: usize) -> f64 {
    let fn_ = n_pos - tp.min(n_pos);
    if tp == 0 {
        0.0
    } else {
        2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
    }
}

fn prf(scores: &[f64], labels: &[bool], threshold: f64, n_pos: usize) -> (f64, f64, f64) {
    let (mut tp, mut fp) = (0usize, 0usize);
    for (&s, &l) in scores.iter().zip(labels) {
        if s >= threshold {
            if l {
                tp += 1;
            } else {
                fp += 1;
            }
        }
    }
    let precision = if tp + fp > 0 {
        tp as f64 / (tp + fp) as f64
    } else {
        0.0
    };
    let recall = if n_pos > 0 {
        tp as f64 / n_pos as f64
    } else {
        0.0
    };
    (precision, recall, f1_from(tp, fp, n_pos))
}

/// Exact ROC-AUC: the probability that a random anomaly scores above a
/// random normal reading, ties counting one half (Mann-Whitney U). 0.5
/// when either class is absent.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let n = scores.len().min(labels.len());
    let n_pos = labels[..n].iter().filter(|&&l| l).count();
    let n_neg = n - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return 0.5;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j < n && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += avg_rank * order[i..j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j;
    }
    (rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos as f64 * n_neg as f64)
}

/// A streaming detector served as a model (shared, learning as it scores).
pub struct AnomalyModel {
    info: ModelInfo,
    detector: Mutex<StreamingDetector>,
}

impl std::fmt::Debug for AnomalyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalyModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl AnomalyModel {
    /// A fresh detector for readings of `n_features` features.
    pub fn new(id: &str, n_features: usize, config: HstConfig) -> Result<Self> {
        let nodes = (1u64 << (config.height.min(20) + 1)) - 1;
        let info = ModelInfo {
            id: id.to_owned(),
            kind: ModelKind::Anomaly,
            path: None,
            name: None,
            architecture: "half-space-trees".to_owned(),
            parameter_count: Some(config.n_trees as u64 * nodes),
            size_bytes: None,
            context_length: Some(config.window_size),
            output_dim: Some(1),
        };
        Ok(AnomalyModel {
            info,
            detector: Mutex::new(StreamingDetector::new(n_features, config)?),
        })
    }
}

impl AnomalyScorer for AnomalyModel {
    fn score_and_learn(&self, reading: &[f64]) -> Result<f64> {
        self.detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .score_and_learn(reading)
    }

    fn n_features(&self) -> usize {
        self.detector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .n_features()
    }
}

impl ModelBackend for AnomalyModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn as_anomaly_scorer(&self) -> Option<&dyn AnomalyScorer> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_auc_cases() {
        let cases: &[(&[f64], &[bool], f64)] = &[
            (&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true], 1.0),
            (&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true], 0.0),
            (&[0.5, 0.5, 0.5, 0.5], &[false, true, false, true], 0.5),
            (&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true], 0.75),
            (&[0.3], &[true], 0.5),
        ];
        for (s, l, want) in cases {
            assert!((roc_auc(s, l) - want).abs() < 1e-12, "{s:?} {l:?}");
        }
    }

    #[test]
    fn f1_at_threshold_and_best() {
        let scores = [0.1, 0.2, 0.8, 0.9, 0.85];
        let labels = [false, false, true, true, false];
        let e = evaluate_scores(&scores, &labels, ThresholdRule::Fixed(0.5));
        assert!((e.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.recall - 1.0).abs() < 1e-12);
        assert!((e.f1 - 0.8).abs() < 1e-12);
        assert!((e.best_f1 - 0.8).abs() < 1e-12);
        // The top 40% (two readings) are 0.9 and 0.85: one hit, one false alarm.
        let e = evaluate_scores(&scores, &labels, ThresholdRule::Contamination(0.4));
        assert_eq!(e.threshold, 0.85);
        assert!((e.precision - 0.5).abs() < 1e-12);
        assert!((e.recall - 0.5).abs() < 1e-12);
    }

    #[test]
    fn trees_are_deterministic_and_flag_outliers() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let config = HstConfig {
            window_size: 100,
            ..HstConfig::default()
        };
        let mut a = StreamingDetector::new(2, config.clone()).expect("valid");
        let mut b = StreamingDetector::new(2, config).expect("valid");
        // Normal readings cluster around (10, 10) inside a range that the
        // scaler has already seen both ends of.
        let mut scores_a = Vec::new();
        let mut labels = Vec::new();
        for i in 0..2000 {
            let outlier = i > 400 && i % 50 == 0;
            let x = if i == 0 {
                vec![0.0, 0.0]
            } else if i == 1 {
                vec![20.0, 20.0]
            } else if outlier {
                vec![18.0 + rng.random::<f64>(), 2.0 + rng.random::<f64>()]
            } else {
                vec![10.0 + rng.random::<f64>(), 10.0 + rng.random::<f64>()]
            };
            let sa = a.score_and_learn(&x).expect("scores");
            let sb = b.score_and_learn(&x).expect("scores");
            assert_eq!(sa, sb);
            assert!((0.0..=1.0).contains(&sa));
            if i > 400 {
                scores_a.push(sa);
                labels.push(outlier);
            }
        }
        let auc = roc_auc(&scores_a, &labels);
        assert!(auc > 0.95, "auc {auc}");
    }

    #[test]
    fn rejects_wrong_feature_count_and_nan() {
        let mut d = StreamingDetector::new(3, HstConfig::default()).expect("valid");
        assert!(matches!(
            d.score_and_learn(&[1.0]),
            Err(Error::FeatureCount { .. })
        ));
        assert!(d.score_and_learn(&[1.0, f64::NAN, 2.0]).is_err());
        assert!(StreamingDetector::new(0, HstConfig::default()).is_err());
    }

    #[test]
    fn csv_reader_reports_bad_lines() {
        let path = Path::new("data.csv");
        let ok = read_labelled_csv("a,b,label\n1,2,0\n3,4,1\n".as_bytes(), path).expect("valid");
        assert_eq!(ok.readings, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(ok.labels, vec![false, true]);
        let err = read_labelled_csv("a,b,label\n1,2,0\n3,x,1\n".as_bytes(), path).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let err = read_labelled_csv("a,b,label\n1,2\n".as_bytes(), path).unwrap_err();
        assert!(err.to_string().contains("expected 3"), "{err}");
    }
}
