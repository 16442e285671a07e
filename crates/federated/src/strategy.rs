//! Aggregation strategies: how a round turns the clients' updates into one
//! change of the global model.
//!
//! An update is a flat `&[f32]` parameter delta (the client's model minus the
//! global model) of a fixed dimension, with a non-negative weight, the
//! client's number of training examples. [`Strategy`] is the serialisable
//! choice a task makes; [`Strategy::aggregator`] builds the [`Aggregator`]
//! that a round feeds update by update and finishes into an [`Aggregate`].
//!
//! FedAvg and FedProx stream: their memory is one `f64` accumulator whatever
//! the number of clients. The robust strategies (coordinate-wise median,
//! trimmed mean, Multi-Krum) must see every update at once, so they buffer
//! all of them in one contiguous allocation and do their work in `finish`,
//! in parallel when the work is large.

mod buffer;
mod coordinate;
mod kernel;
mod krum;
mod mean;
mod mixing;

pub(crate) use coordinate::coordinate_median;
pub(crate) use kernel::{dot, sum_of_squares};

use crate::{Error, Result};

/// How a round combines its updates. Serialised with the strategy's
/// [`name`](Strategy::name) in a `name` field, e.g.
/// `{"name": "trimmed_mean", "beta": 0.1}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(
    tag = "name",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "RawStrategy"
)]
pub enum Strategy {
    /// Federated averaging (McMahan et al. 2017): the mean of the updates
    /// weighted by the clients' example counts.
    #[serde(rename = "fedavg", alias = "fed_avg")]
    FedAvg,
    /// FedProx (Li et al. 2020): aggregation is FedAvg's; the difference is
    /// on the clients, which add a proximal term to their local loss.
    #[serde(rename = "fedprox", alias = "fed_prox")]
    FedProx {
        /// Weight of the clients' proximal term `mu / 2 · ‖w − w_global‖²`.
        mu: f32,
    },
    /// Coordinate-wise median of the updates, unweighted (Yin et al. 2018).
    /// An even count takes the mean of the two middle values.
    Median {
        /// `f` for nearest-neighbour mixing first (Allouah et al. 2023):
        /// each update is replaced by the mean of its `n − f` nearest, which
        /// keeps the median robust to `f` attackers and removes most of its
        /// bias on non-IID updates. A round then needs more than `2f`
        /// updates. Unset, the median of the raw updates.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mixing: Option<usize>,
    },
    /// Coordinate-wise trimmed mean, unweighted (Yin et al. 2018): at each
    /// coordinate drop the `floor(beta · n)` smallest and largest values and
    /// average the rest.
    TrimmedMean {
        /// Fraction trimmed at each end, `0 <= beta < 0.5`.
        beta: f32,
        /// `f` for nearest-neighbour mixing first, as for
        /// [`Median`](Strategy::Median).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mixing: Option<usize>,
    },
    /// Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): score each
    /// update by the sum of its squared distances to its `n − f − 2` closest
    /// others, keep the lowest-scoring ones and average them weighted like
    /// FedAvg.
    MultiKrum {
        /// `f`, the number of Byzantine clients tolerated; a round needs
        /// more than `2f + 2` updates.
        byzantine: usize,
        /// How many updates to keep and average; `0` (the default when
        /// deserialising) means `n − f`.
        keep: usize,
    },
}

/// The deserialised form of [`Strategy`]. Serde ignores extra fields next
/// to the tag of a unit variant even with `deny_unknown_fields`, so
/// `{"name": "median", "beta": 0.1}` (a trimmed mean configured under the
/// wrong name) would pass silently; as empty struct variants the unit
/// strategies reject it like the others.
#[derive(serde::Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
enum RawStrategy {
    #[serde(rename = "fedavg", alias = "fed_avg")]
    FedAvg {},
    #[serde(rename = "fedprox", alias = "fed_prox")]
    FedProx { mu: f32 },
    Median {
        #[serde(default)]
        mixing: Option<usize>,
    },
    TrimmedMean {
        beta: f32,
        #[serde(default)]
        mixing: Option<usize>,
    },
    MultiKrum {
        byzantine: usize,
        // Optional in configuration: 0, meaning n − f, is the usual choice.
        #[serde(default)]
        keep: usize,
    },
}

impl From<RawStrategy> for Strategy {
    fn from(raw: RawStrategy) -> Self {
        match raw {
            RawStrategy::FedAvg {} => Strategy::FedAvg,
            RawStrategy::FedProx { mu } => Strategy::FedProx { mu },
            RawStrategy::Median { mixing } => Strategy::Median { mixing },
            RawStrategy::TrimmedMean { beta, mixing } => Strategy::TrimmedMean { beta, mixing },
            RawStrategy::MultiKrum { byzantine, keep } => Strategy::MultiKrum { byzantine, keep },
        }
    }
}

impl Strategy {
    /// A fresh aggregator for updates of `dim` values.
    ///
    /// Parameters are not checked here (see [`validate`](Self::validate));
    /// an aggregator built from an invalid strategy reports the problem from
    /// [`Aggregator::finish`].
    pub fn aggregator(&self, dim: usize) -> Box<dyn Aggregator + Send> {
        match *self {
            Strategy::FedAvg | Strategy::FedProx { .. } => {
                Box::new(mean::MeanAggregator::new(dim, self.validate().err()))
            }
            Strategy::Median { mixing } => Box::new(coordinate::CoordinateAggregator::new(
                dim,
                coordinate::Reducer::Median,
                mixing,
                None,
            )),
            Strategy::TrimmedMean { beta, mixing } => {
                Box::new(coordinate::CoordinateAggregator::new(
                    dim,
                    coordinate::Reducer::TrimmedMean { beta },
                    mixing,
                    self.validate().err(),
                ))
            }
            Strategy::MultiKrum { byzantine, keep } => {
                Box::new(krum::KrumAggregator::new(dim, byzantine, keep))
            }
        }
    }

    /// Whether the aggregator's memory is independent of the number of
    /// clients (FedAvg and FedProx), so a coordinator can accept any number
    /// of updates without holding them.
    pub fn is_streaming(&self) -> bool {
        matches!(self, Strategy::FedAvg | Strategy::FedProx { .. })
    }

    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Strategy::FedAvg | Strategy::Median { .. } | Strategy::MultiKrum { .. } => Ok(()),
            Strategy::FedProx { mu } => {
                if mu.is_finite() && mu >= 0.0 {
                    Ok(())
                } else {
                    Err(Error::Invalid {
                        what: "fedprox mu",
                        reason: format!("{mu} is not a finite non-negative number"),
                    })
                }
            }
            Strategy::TrimmedMean { beta, .. } => {
                if (0.0..0.5).contains(&beta) {
                    Ok(())
                } else {
                    Err(Error::Invalid {
                        what: "trimmed mean beta",
                        reason: format!("{beta} is outside [0, 0.5)"),
                    })
                }
            }
        }
    }

    /// The fewest updates a round needs for this strategy to run: one, more
    /// than `2f` with nearest-neighbour mixing, and for Multi-Krum more
    /// than `2f + 2` and at least `keep + f`.
    pub fn min_updates(&self) -> usize {
        match *self {
            Strategy::FedAvg | Strategy::FedProx { .. } => 1,
            Strategy::Median { mixing } | Strategy::TrimmedMean { mixing, .. } => {
                mixing.map_or(1, |f| f.saturating_mul(2).saturating_add(1))
            }
            Strategy::MultiKrum { byzantine, keep } => byzantine
                .saturating_mul(2)
                .saturating_add(3)
                .max(keep.saturating_add(byzantine)),
        }
    }

    /// The strategy's name as it appears in configuration and metrics:
    /// `fedavg`, `fedprox`, `median`, `trimmed_mean` or `multi_krum`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedProx { .. } => "fedprox",
            Strategy::Median { .. } => "median",
            Strategy::TrimmedMean { .. } => "trimmed_mean",
            Strategy::MultiKrum { .. } => "multi_krum",
        }
    }
}

/// One round's aggregation in progress: updates go in one at a time, the
/// aggregate comes out once.
pub trait Aggregator {
    /// Adds one client's update with its weight (its number of examples).
    ///
    /// Fails with [`Error::Shape`] when the update does not have the
    /// aggregator's dimension and with [`Error::Invalid`] when a value is not
    /// finite or the weight is negative or not finite; a rejected update
    /// leaves the aggregator unchanged.
    fn add(&mut self, update: &[f32], weight: f32) -> Result<()>;

    /// The number of updates added so far.
    fn len(&self) -> usize;

    /// Whether no update has been added yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Combines the updates.
    ///
    /// Fails with [`Error::TooFew`] when the strategy cannot run on so few
    /// updates (none at all for every strategy; Multi-Krum needs more than
    /// `2f + 2`, and at least `keep + f`; mixing needs more than `2f`) and with [`Error::Invalid`] when
    /// the strategy's parameters are out of range.
    fn finish(self: Box<Self>) -> Result<Aggregate>;
}

/// The result of a round's aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The change to apply to the global model.
    pub delta: Vec<f32>,
    /// How many updates contributed to `delta`.
    pub used: usize,
    /// Indices, in the order the updates were added, of the updates the
    /// strategy left out (only Multi-Krum leaves any out), ascending.
    pub excluded: Vec<usize>,
}

/// Aggregates a whole round at once: validates `strategy`, adds every
/// `(update, weight)` in order and finishes.
pub fn aggregate(strategy: &Strategy, dim: usize, updates: &[(&[f32], f32)]) -> Result<Aggregate> {
    strategy.validate()?;
    let mut aggregator = strategy.aggregator(dim);
    for &(update, weight) in updates {
        aggregator.add(update, weight)?;
    }
    aggregator.finish()
}

/// Checks one update against the aggregators' contract: the right length, a
/// finite non-negative weight and finite values.
fn check_update(dim: usize, update: &[f32], weight: f32) -> Result<()> {
    if update.len() != dim {
        return Err(Error::Shape {
            what: "update",
            expected: dim,
            got: update.len(),
        });
    }
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(Error::Invalid {
            what: "update weight",
            reason: format!("{weight} is not a finite non-negative number"),
        });
    }
    if let Some(index) = kernel::first_non_finite(update) {
        return Err(Error::Invalid {
            what: "update",
            reason: format!("the value at index {index} is not finite"),
        });
    }
    Ok(())
}

/// The length of the pieces that split `len` items into at most `parts`
/// pieces of whole `align`-sized blocks, for handing to threads.
fn piece_len(len: usize, parts: usize, align: usize) -> usize {
    let align = align.max(1);
    len.div_ceil(parts.max(1)).div_ceil(align).max(1) * align
}

/// The number of threads worth using for `work` units of simple arithmetic,
/// where one thread should get at least `min_per_thread` units to pay for
/// its start.
fn threads_for(work: usize, min_per_thread: usize) -> usize {
    let available = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    available.min(work / min_per_thread.max(1)).max(1)
}

#[cfg(test)]
mod tests;
