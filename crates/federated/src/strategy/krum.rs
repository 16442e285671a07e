//! Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
//! Byzantine Tolerant Gradient Descent"; El Mhamdi et al. 2018).
//!
//! Each update is scored by the sum of its squared distances to its
//! `n − f − 2` nearest others; the `keep` lowest scores are averaged. The
//! cost is the `n(n − 1)/2` pairwise distances, each a pass over `dim`
//! values, so that is where the work goes: the pairs are computed a column
//! block at a time (all rows' blocks of a few thousand values stay in
//! cache while every pair is visited), four pairs per pass over a row
//! ([`squared_distances_x4`]), and large rounds split the rows across
//! threads in ranges of equal pair counts.

use super::buffer::UpdateBuffer;
use super::kernel::{squared_distance, squared_distances_x4};
use super::mean::WeightedMean;
use super::{Aggregate, Aggregator};
use crate::{Error, Result};

/// The aggregator of [`Strategy::MultiKrum`](super::Strategy::MultiKrum).
pub(crate) struct KrumAggregator {
    buffer: UpdateBuffer,
    byzantine: usize,
    keep: usize,
}

impl KrumAggregator {
    /// An aggregator for updates of `dim` values tolerating `byzantine`
    /// attackers and averaging `keep` updates (`0` means `n − f`).
    pub(crate) fn new(dim: usize, byzantine: usize, keep: usize) -> Self {
        Self {
            buffer: UpdateBuffer::new(dim),
            byzantine,
            keep,
        }
    }
}

impl Aggregator for KrumAggregator {
    fn add(&mut self, update: &[f32], weight: f32) -> Result<()> {
        self.buffer.push(update, weight)
    }

    fn len(&self) -> usize {
        self.buffer.len()
    }

    fn finish(self: Box<Self>) -> Result<Aggregate> {
        let n = self.buffer.len();
        let f = self.byzantine;
        // Krum's guarantee needs n > 2f + 2, which also leaves every update
        // at least one neighbour to be scored against.
        let need = f.saturating_mul(2).saturating_add(3);
        if n < need {
            return Err(Error::TooFew {
                what: "updates",
                need,
                have: n,
            });
        }
        let keep = if self.keep == 0 { n - f } else { self.keep };
        // Keeping more than n − f would always let an attacker in.
        if keep.saturating_add(f) > n {
            return Err(Error::TooFew {
                what: "updates",
                need: keep.saturating_add(f),
                have: n,
            });
        }
        let rows = self.buffer.rows();
        let scores = scores(&rows, n - f - 2);
        let kept = lowest(&scores, keep);

        let mut mean = WeightedMean::new(self.buffer.dim());
        let weights = self.buffer.weights();
        for &i in &kept {
            mean.add(rows[i], weights[i]);
        }
        let mut is_kept = vec![false; n];
        for &i in &kept {
            is_kept[i] = true;
        }
        Ok(Aggregate {
            delta: mean.finish()?,
            used: kept.len(),
            excluded: (0..n).filter(|&i| !is_kept[i]).collect(),
        })
    }
}

/// The indices of the `keep` lowest scores, ties going to the earlier
/// update, in ascending index order.
fn lowest(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// Each row's Krum score: the sum of its squared distances to its `closest`
/// nearest other rows (`1 <= closest < rows.len()`).
pub(crate) fn scores(rows: &[&[f32]], closest: usize) -> Vec<f64> {
    let n = rows.len();
    debug_assert!(closest >= 1 && closest < n);
    let distances = pairwise_distances(rows);
    let mut others = Vec::with_capacity(n - 1);
    (0..n)
        .map(|i| {
            others.clear();
            others.extend((0..n).filter(|&j| j != i).map(|j| distances.get(i, j)));
            let (nearest, &mut last, _) =
                others.select_nth_unstable_by(closest - 1, f64::total_cmp);
            nearest.iter().sum::<f64>() + last
        })
        .collect()
}

/// Squared distances between all pairs of rows, as a packed upper triangle.
pub(crate) struct Triangle {
    n: usize,
    /// Row `i` holds the distances to rows `i + 1 .. n`.
    values: Vec<f64>,
}

impl Triangle {
    /// Where row `i` starts in `values`: the pairs of all earlier rows.
    fn offset(n: usize, i: usize) -> usize {
        i * (2 * n - i - 1) / 2
    }

    /// The squared distance between rows `i` and `j` (0 when `i == j`).
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        let (i, j) = match i.cmp(&j) {
            std::cmp::Ordering::Less => (i, j),
            std::cmp::Ordering::Greater => (j, i),
            std::cmp::Ordering::Equal => return 0.0,
        };
        self.values[Self::offset(self.n, i) + (j - i - 1)]
    }
}

/// All pairwise squared distances of `rows`, which share one length.
pub(crate) fn pairwise_distances(rows: &[&[f32]]) -> Triangle {
    let n = rows.len();
    let dim = rows.first().map_or(0, |r| r.len());
    let pairs = n * n.saturating_sub(1) / 2;
    let mut values = vec![0.0f64; pairs];
    // A thread is worth starting for a few million multiply-adds.
    let threads = super::threads_for(pairs.saturating_mul(dim), 1 << 22);
    if threads <= 1 {
        distance_rows(rows, 0..n, &mut values);
    } else {
        // Row i has n − 1 − i pairs, so equal row counts would give the
        // first thread most of the work; cut where the pair count reaches
        // each thread's share instead.
        let mut cuts = vec![0];
        let mut done = 0;
        for i in 0..n {
            done += n - 1 - i;
            if done * threads >= pairs * cuts.len() && cuts.len() < threads {
                cuts.push(i + 1);
            }
        }
        cuts.push(n);
        cuts.dedup();
        std::thread::scope(|scope| {
            let mut rest = &mut values[..];
            for range in cuts.windows(2).map(|w| w[0]..w[1]) {
                let len = Triangle::offset(n, range.end) - Triangle::offset(n, range.start);
                let (mine, tail) = rest.split_at_mut(len);
                rest = tail;
                scope.spawn(move || distance_rows(rows, range, mine));
            }
        });
    }
    Triangle { n, values }
}

/// Fills `out` with the distances of rows `range` to every later row, in
/// the triangle's layout.
fn distance_rows(rows: &[&[f32]], range: std::ops::Range<usize>, out: &mut [f64]) {
    let n = rows.len();
    let dim = rows.first().map_or(0, |r| r.len());
    // All rows' slices of one column block should stay in the L2 cache (or
    // at worst L3) while every pair is visited; with a floor so that each
    // kernel call still has a few hundred values to amortise its set-up.
    let block = ((512 * 1024) / (4 * n.max(1))).clamp(256, 4096) / 16 * 16;
    for start in (0..dim).step_by(block) {
        let end = (start + block).min(dim);
        let mut o = 0;
        for i in range.clone() {
            let a = &rows[i][start..end];
            let mut j = i + 1;
            while j + 4 <= n {
                let d = squared_distances_x4(
                    a,
                    [
                        &rows[j][start..end],
                        &rows[j + 1][start..end],
                        &rows[j + 2][start..end],
                        &rows[j + 3][start..end],
                    ],
                );
                for (out, d) in out[o..o + 4].iter_mut().zip(d) {
                    *out += d;
                }
                o += 4;
                j += 4;
            }
            for b in &rows[j..] {
                out[o] += squared_distance(a, &b[start..end]);
                o += 1;
            }
        }
    }
}
