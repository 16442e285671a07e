//! Federated learning, pure: everything a round computes, with no I/O, no
//! clock and no environment variables.
//!
//! - [`strategy`]: FedAvg, FedProx, coordinate-wise median, trimmed mean and
//!   Multi-Krum over flat `f32` updates, streaming where the maths allows.
//! - [`screen`]: update screening when updates are visible (norm bounds,
//!   cosine outliers) and the client-side norm clipping used when they are
//!   masked.
//! - [`dp`]: client-level clipping, Gaussian noise and the RDP accountant that
//!   reports (ε, δ) and refuses a round that would exceed a task's budget.
//! - [`secagg`] and [`fixed`]: secure aggregation after Bonawitz et al.
//!   (X25519 pairwise masks expanded by a PRG, Shamir shares of the seeds,
//!   fixed-point encoding in a modular ring), so the aggregator learns only
//!   the sum.
//! - [`model`], [`partition`] and [`attack`]: the models a device trains
//!   (softmax regression and a one-hidden-layer network over flat
//!   parameters), the local training step (with FedProx's proximal term),
//!   Dirichlet non-IID partitions, and the Byzantine behaviours the
//!   simulator injects.
//!
//! The hub's coordinator and the agent's client (HTTP, storage, timing) live
//! in `hub` and `edge`; they call into this crate for every number.

pub mod attack;
pub mod dp;
mod error;
pub mod fixed;
pub mod model;
pub mod partition;
pub mod screen;
pub mod secagg;
pub mod strategy;

pub use error::{Error, Result};
