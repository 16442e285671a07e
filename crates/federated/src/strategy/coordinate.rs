//! Coordinate-wise median and trimmed mean.
//!
//! Both need, for each coordinate, all `n` values of that coordinate. The
//! updates are stored row after row, so reading one coordinate's column is a
//! strided gather that touches a new cache line per value; over million-value
//! updates that is memory-bound. Instead a block of adjacent coordinates is
//! transposed at once (each row contributes a short contiguous run), after
//! which every column of the block is contiguous and is reduced in place by
//! `select_nth_unstable`, an expected-linear selection rather than a sort.
//! During the transposition each value becomes an integer key that orders
//! like the float under `f32::total_cmp`; selecting on plain integers is
//! about twice as fast as selecting with a float comparator. Blocks are
//! independent, so large rounds split them across threads.

use super::buffer::UpdateBuffer;
use super::{Aggregate, Aggregator};
use crate::{Error, Result};

/// What to compute per coordinate.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reducer {
    /// The median; an even count takes the mean of the two middle values.
    Median,
    /// The mean after dropping `floor(beta · n)` values at each end.
    TrimmedMean {
        /// The fraction dropped at each end.
        beta: f32,
    },
}

/// The aggregator of [`Strategy::Median`](super::Strategy::Median) and
/// [`Strategy::TrimmedMean`](super::Strategy::TrimmedMean).
pub(crate) struct CoordinateAggregator {
    buffer: UpdateBuffer,
    reducer: Reducer,
    /// `f` for nearest-neighbour mixing before the reduction.
    mixing: Option<usize>,
    /// The strategy's parameter error, reported by `finish`.
    invalid: Option<Error>,
}

impl CoordinateAggregator {
    /// An aggregator for updates of `dim` values.
    pub(crate) fn new(
        dim: usize,
        reducer: Reducer,
        mixing: Option<usize>,
        invalid: Option<Error>,
    ) -> Self {
        Self {
            buffer: UpdateBuffer::new(dim),
            reducer,
            mixing,
            invalid,
        }
    }
}

impl Aggregator for CoordinateAggregator {
    fn add(&mut self, update: &[f32], weight: f32) -> Result<()> {
        self.buffer.push(update, weight)
    }

    fn len(&self) -> usize {
        self.buffer.len()
    }

    fn finish(self: Box<Self>) -> Result<Aggregate> {
        if let Some(error) = self.invalid {
            return Err(error);
        }
        let n = self.buffer.len();
        if n == 0 {
            return Err(Error::TooFew {
                what: "updates",
                need: 1,
                have: 0,
            });
        }
        let (rows, dim) = (self.buffer.rows(), self.buffer.dim());
        let delta = match self.mixing {
            Some(f) => {
                let mixed = super::mixing::mix(&rows, dim, f)?;
                if dim == 0 {
                    Vec::new()
                } else {
                    let mixed: Vec<&[f32]> = mixed.chunks_exact(dim).collect();
                    reduce(&mixed, dim, self.reducer)
                }
            }
            None => reduce(&rows, dim, self.reducer),
        };
        Ok(Aggregate {
            delta,
            used: n,
            excluded: Vec::new(),
        })
    }
}

/// The coordinate-wise median of the first `dim` values of `rows`, which
/// must not be empty.
pub(crate) fn coordinate_median(rows: &[&[f32]], dim: usize) -> Vec<f32> {
    reduce(rows, dim, Reducer::Median)
}

/// How many values a trimmed mean of `n` drops at each end: `floor(beta · n)`
/// as scipy's `trim_mean` computes it.
pub(super) fn trim_count(beta: f32, n: usize) -> usize {
    // The configured fraction is a decimal such as 0.35, whose nearest `f32`
    // lies just below it; `0.35f32 · 20` would floor to 6 instead of 7. The
    // shortest decimal that reads back as the same `f32` is the number the
    // operator wrote, so the product is taken on that.
    let beta = beta.to_string().parse::<f64>().unwrap_or(f64::from(beta));
    let count = (beta * n as f64).floor();
    // Validation keeps beta below one half, but the clamp keeps at least one
    // value even if an unchecked reducer got here.
    (count.max(0.0) as usize).min(n.saturating_sub(1) / 2)
}

/// Reduces every coordinate `0..dim` of `rows` (at least one row, each at
/// least `dim` long).
fn reduce(rows: &[&[f32]], dim: usize, reducer: Reducer) -> Vec<f32> {
    let n = rows.len();
    debug_assert!(n > 0 && rows.iter().all(|r| r.len() >= dim));
    let trim = match reducer {
        Reducer::Median => 0,
        Reducer::TrimmedMean { beta } => trim_count(beta, n),
    };
    // The transposition writes one cache line per coordinate of the block
    // for each row; keeping the block's lines within the L1 cache (about
    // 32 KiB of columns) measured fastest, with a floor so each row still
    // contributes a run of at least one cache line.
    let block = ((8 * 1024) / n).clamp(16, 256) / 16 * 16;
    let mut out = vec![0.0f32; dim];
    // A selection over n values costs a few n comparisons; a thread is worth
    // starting for a few hundred thousand of them.
    let threads = super::threads_for(n * dim, 1 << 18);
    if threads <= 1 {
        reduce_range(rows, 0, &mut out, block, reducer, trim);
    } else {
        let piece = super::piece_len(dim, threads, block);
        std::thread::scope(|scope| {
            for (k, out) in out.chunks_mut(piece).enumerate() {
                scope.spawn(move || reduce_range(rows, k * piece, out, block, reducer, trim));
            }
        });
    }
    out
}

/// Reduces coordinates `start .. start + out.len()` into `out`, `block`
/// coordinates at a time.
fn reduce_range(
    rows: &[&[f32]],
    start: usize,
    out: &mut [f32],
    block: usize,
    reducer: Reducer,
    trim: usize,
) {
    let n = rows.len();
    // Column `j` of the current block is `columns[j · n .. (j + 1) · n]`.
    let mut columns = vec![0i32; block * n];
    for (b, out) in out.chunks_mut(block).enumerate() {
        let first = start + b * block;
        let width = out.len();
        for (i, row) in rows.iter().enumerate() {
            for (j, &value) in row[first..first + width].iter().enumerate() {
                columns[j * n + i] = key(value);
            }
        }
        for (out, column) in out.iter_mut().zip(columns.chunks_exact_mut(n)) {
            *out = match reducer {
                Reducer::Median => median(column),
                Reducer::TrimmedMean { .. } => trimmed_mean(column, trim),
            };
        }
    }
}

/// An integer that orders like `value` under `f32::total_cmp`: negative
/// floats have their magnitude bits flipped so that larger magnitudes sort
/// lower. The map is its own inverse.
#[inline(always)]
fn key(value: f32) -> i32 {
    let bits = value.to_bits() as i32;
    bits ^ ((((bits >> 31) as u32) >> 1) as i32)
}

/// The float whose [`key`] is `key`.
#[inline(always)]
fn value(key: i32) -> f32 {
    let bits = key ^ ((((key >> 31) as u32) >> 1) as i32);
    f32::from_bits(bits as u32)
}

/// The median of a non-empty column of keys, which it reorders.
fn median(column: &mut [i32]) -> f32 {
    let n = column.len();
    let (below, &mut upper, _) = column.select_nth_unstable(n / 2);
    if n % 2 == 1 {
        return value(upper);
    }
    // Everything before the selected element is no larger, so the lower
    // middle value is the largest of them.
    let lower = below.iter().copied().max().unwrap_or(upper);
    ((f64::from(value(lower)) + f64::from(value(upper))) / 2.0) as f32
}

/// The mean of a non-empty column of keys without its `trim` smallest and
/// `trim` largest values (`2 · trim < len`), which it reorders.
fn trimmed_mean(column: &mut [i32], trim: usize) -> f32 {
    let n = column.len();
    if trim > 0 {
        // The first selection puts the `trim` smallest values before index
        // `trim`; the second, over what follows, puts the `trim` largest at
        // the end. What lies between is what the mean keeps.
        let (_, _, above) = column.select_nth_unstable(trim);
        let keep_above = n - 2 * trim - 1;
        if keep_above < above.len() {
            above.select_nth_unstable(keep_above);
        }
    }
    let kept = &column[trim..n - trim];
    let sum: f64 = kept.iter().map(|&k| f64::from(value(k))).sum();
    (sum / kept.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_total_cmp_and_invert() {
        let values = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1.5,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(key(pair[0]) < key(pair[1]), "{} vs {}", pair[0], pair[1]);
        }
        for v in values {
            assert_eq!(value(key(v)).to_bits(), v.to_bits());
        }
    }
}
