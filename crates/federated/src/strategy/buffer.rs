//! The store of a round's updates for the strategies that need all of them
//! at once.

use crate::Result;

/// A round's updates, back to back in one allocation (row `i` is
/// `values[i · dim .. (i + 1) · dim]`), with their weights. One allocation
/// rather than one per update keeps a thousand million-value updates from
/// fragmenting the heap and lets the row blocks be read sequentially.
pub(crate) struct UpdateBuffer {
    dim: usize,
    values: Vec<f32>,
    weights: Vec<f32>,
}

impl UpdateBuffer {
    /// An empty buffer for updates of `dim` values.
    pub(crate) fn new(dim: usize) -> Self {
        Self {
            dim,
            values: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Checks and appends one update.
    pub(crate) fn push(&mut self, update: &[f32], weight: f32) -> Result<()> {
        super::check_update(self.dim, update, weight)?;
        self.values.extend_from_slice(update);
        self.weights.push(weight);
        Ok(())
    }

    /// The number of updates.
    pub(crate) fn len(&self) -> usize {
        self.weights.len()
    }

    /// The dimension of the updates.
    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    /// The updates' weights, in the order they were added.
    pub(crate) fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// One slice per update, in the order they were added.
    pub(crate) fn rows(&self) -> Vec<&[f32]> {
        if self.dim == 0 {
            // `chunks_exact(0)` panics; zero-length updates still count.
            return vec![&[][..]; self.len()];
        }
        self.values.chunks_exact(self.dim).collect()
    }
}
