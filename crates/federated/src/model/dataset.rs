//! Labelled examples as one dense matrix.

use crate::{Error, Result};

/// Examples as a dense row-major matrix: `features.len() == labels.len() * inputs`.
///
/// The fields are public so that callers can build a dataset from vectors
/// they already hold; every function that reads a dataset checks this
/// invariant (and that the labels fit the model) before using it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// Number of features of every example.
    pub inputs: usize,
    /// The examples' features, one row of `inputs` values after another.
    pub features: Vec<f32>,
    /// The examples' class labels, one per row.
    pub labels: Vec<u32>,
}

impl Dataset {
    /// An empty dataset of examples with `inputs` features each.
    pub fn new(inputs: usize) -> Self {
        Self {
            inputs,
            features: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Appends one example.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `x` does not have `inputs` values, and
    /// [`Error::Invalid`] if one of them is not finite: a NaN feature would
    /// silently poison every model trained on the dataset.
    pub fn push(&mut self, x: &[f32], label: u32) -> Result<()> {
        if x.len() != self.inputs {
            return Err(Error::Shape {
                what: "example",
                expected: self.inputs,
                got: x.len(),
            });
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid {
                what: "example",
                reason: format!("feature {i} is not finite"),
            });
        }
        self.features.extend_from_slice(x);
        self.labels.push(label);
        Ok(())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features of example `i`.
    ///
    /// # Panics
    ///
    /// If `i` is not below [`len`](Self::len), like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.inputs..(i + 1) * self.inputs]
    }

    /// A new dataset of the examples at `indices`, in that order (an index
    /// may repeat).
    ///
    /// # Panics
    ///
    /// If an index is not below [`len`](Self::len), like slice indexing.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.inputs);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            inputs: self.inputs,
            features,
            labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_checks_width_and_finiteness() {
        let mut d = Dataset::new(2);
        d.push(&[1.0, 2.0], 0).unwrap();
        d.push(&[3.0, 4.0], 1).unwrap();
        assert!(matches!(
            d.push(&[1.0], 0),
            Err(Error::Shape {
                expected: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            d.push(&[1.0, f32::NAN], 0),
            Err(Error::Invalid { .. })
        ));
        assert_eq!(d.len(), 2);
        assert!(!d.is_empty());
        assert_eq!(d.row(1), &[3.0, 4.0]);
    }

    #[test]
    fn subset_keeps_order_and_repeats() {
        let mut d = Dataset::new(1);
        for i in 0..4u8 {
            d.push(&[f32::from(i)], u32::from(i)).unwrap();
        }
        let s = d.subset(&[3, 1, 1]);
        assert_eq!(s.features, vec![3.0, 1.0, 1.0]);
        assert_eq!(s.labels, vec![3, 1, 1]);
        assert_eq!(s.inputs, 1);
        assert!(d.subset(&[]).is_empty());
    }
}
