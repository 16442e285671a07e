//! Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing: A
//! Recipe for Optimal Byzantine ML under Heterogeneity").
//!
//! Before a coordinate-wise rule runs, each update is replaced by the mean
//! of its `n − f` nearest updates (itself included). An honest update's
//! nearest `n − f` hold at most `f` attackers, who must sit close to it to
//! be picked, so the mixed honest updates stay near the honest mean; and
//! they are averages of many non-IID updates, so they agree with each other
//! far more than the raw updates do. The median of non-IID updates is
//! biased towards what most clients hold and learns classes that few of
//! them hold slowly; after mixing that bias mostly goes, while the rule
//! keeps its robustness to `f` attackers.
//!
//! The cost is the pairwise distances (as for Multi-Krum) plus `n · (n − f)`
//! row additions, so mixing suits rounds of up to a few hundred updates.

use super::krum::pairwise_distances;
use crate::{Error, Result};

/// The mixed rows of `rows` (all of one length `dim`), back to back: row `i`
/// is the mean of the `n − f` rows nearest to row `i`, ties going to the
/// earlier row. Needs `n > 2f`.
pub(crate) fn mix(rows: &[&[f32]], dim: usize, f: usize) -> Result<Vec<f32>> {
    let n = rows.len();
    let need = f.saturating_mul(2).saturating_add(1);
    if n < need {
        return Err(Error::TooFew {
            what: "updates for nearest-neighbour mixing",
            need,
            have: n,
        });
    }
    let distances = pairwise_distances(rows);
    let k = n - f;
    let nearest: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                distances
                    .get(i, a)
                    .total_cmp(&distances.get(i, b))
                    .then(a.cmp(&b))
            });
            order.truncate(k);
            order
        })
        .collect();
    let mut out = vec![0.0f32; n * dim];
    if dim == 0 {
        return Ok(out);
    }
    let mix_rows = |first: usize, out: &mut [f32]| {
        let mut acc = vec![0.0f64; dim];
        for (i, row_out) in out.chunks_exact_mut(dim).enumerate() {
            acc.fill(0.0);
            for &j in &nearest[first + i] {
                for (a, &x) in acc.iter_mut().zip(rows[j]) {
                    *a += f64::from(x);
                }
            }
            for (o, a) in row_out.iter_mut().zip(&acc) {
                *o = (a / k as f64) as f32;
            }
        }
    };
    let threads = super::threads_for(n * k * dim, 1 << 22);
    if threads <= 1 {
        mix_rows(0, &mut out);
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|scope| {
            for (t, out) in out.chunks_mut(per * dim).enumerate() {
                let mix_rows = &mix_rows;
                scope.spawn(move || mix_rows(t * per, out));
            }
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_becomes_the_mean_of_its_nearest() {
        // Three close rows and one far: with f = 1 each close row mixes the
        // three close ones, and the far row mixes itself and its two
        // nearest close rows.
        let rows: [&[f32]; 4] = [&[0.0, 0.0], &[1.0, 0.0], &[0.0, 1.0], &[10.0, 10.0]];
        let mixed = mix(&rows, 2, 1).unwrap();
        let close = [1.0 / 3.0, 1.0 / 3.0];
        for i in 0..3 {
            assert!((mixed[2 * i] - close[0]).abs() < 1e-6);
            assert!((mixed[2 * i + 1] - close[1]).abs() < 1e-6);
        }
        // Row 3 is nearest to rows 1 and 2 (equal distances) before row 0.
        assert!((mixed[6] - 11.0 / 3.0).abs() < 1e-6);
        assert!((mixed[7] - 11.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn f_zero_is_the_mean_everywhere_and_too_few_is_refused() {
        let rows: [&[f32]; 3] = [&[1.0], &[2.0], &[6.0]];
        assert_eq!(mix(&rows, 1, 0).unwrap(), vec![3.0; 3]);
        assert!(matches!(
            mix(&rows, 1, 2),
            Err(Error::TooFew {
                need: 5,
                have: 3,
                ..
            })
        ));
        let empty: [&[f32]; 3] = [&[], &[], &[]];
        assert_eq!(mix(&empty, 0, 1).unwrap(), Vec::<f32>::new());
    }
}
