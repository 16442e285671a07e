//! FedAvg and FedProx: the streaming weighted mean.

use super::{Aggregate, Aggregator};
use crate::{Error, Result};

/// A running weighted mean with an `f64` accumulator, so that a thousand
/// updates sum without the rounding an `f32` sum would collect.
///
/// While every weight so far is zero the accumulator holds the unweighted
/// sum, because a round whose clients all report zero examples falls back to
/// the plain mean. The first positive weight clears it: the zero-weight
/// updates before it contribute nothing to a weighted mean, so starting
/// again from zero is exact and needs no second accumulator.
pub(crate) struct WeightedMean {
    sum: Vec<f64>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    /// An empty mean of vectors of `dim` values.
    pub(crate) fn new(dim: usize) -> Self {
        Self {
            sum: vec![0.0; dim],
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Adds a vector already checked by `check_update`.
    pub(crate) fn add(&mut self, update: &[f32], weight: f32) {
        debug_assert_eq!(update.len(), self.sum.len());
        let weight = f64::from(weight);
        if weight > 0.0 {
            if self.total_weight == 0.0 && self.count > 0 {
                self.sum.fill(0.0);
            }
            self.total_weight += weight;
            for (s, &x) in self.sum.iter_mut().zip(update) {
                *s += weight * f64::from(x);
            }
        } else if self.total_weight == 0.0 {
            for (s, &x) in self.sum.iter_mut().zip(update) {
                *s += f64::from(x);
            }
        }
        self.count += 1;
    }

    /// The number of vectors added.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The mean, weighted unless every weight was zero.
    pub(crate) fn finish(self) -> Result<Vec<f32>> {
        if self.count == 0 {
            return Err(Error::TooFew {
                what: "updates",
                need: 1,
                have: 0,
            });
        }
        let divisor = if self.total_weight > 0.0 {
            self.total_weight
        } else {
            self.count as f64
        };
        Ok(self.sum.iter().map(|&s| (s / divisor) as f32).collect())
    }
}

/// The aggregator of FedAvg and FedProx.
pub(crate) struct MeanAggregator {
    dim: usize,
    mean: WeightedMean,
    /// The strategy's parameter error, reported by `finish`.
    invalid: Option<Error>,
}

impl MeanAggregator {
    /// An aggregator for updates of `dim` values.
    pub(crate) fn new(dim: usize, invalid: Option<Error>) -> Self {
        Self {
            dim,
            mean: WeightedMean::new(dim),
            invalid,
        }
    }
}

impl Aggregator for MeanAggregator {
    fn add(&mut self, update: &[f32], weight: f32) -> Result<()> {
        super::check_update(self.dim, update, weight)?;
        self.mean.add(update, weight);
        Ok(())
    }

    fn len(&self) -> usize {
        self.mean.count()
    }

    fn finish(self: Box<Self>) -> Result<Aggregate> {
        if let Some(error) = self.invalid {
            return Err(error);
        }
        let used = self.mean.count();
        Ok(Aggregate {
            delta: self.mean.finish()?,
            used,
            excluded: Vec::new(),
        })
    }
}
