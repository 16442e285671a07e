//! Federated learning on the wire: the tasks operators create, the rounds
//! the hub runs, and what devices send in each phase of a round.
//!
//! Vectors travel as base64 of little-endian values ([`F32Vector`],
//! [`U32Vector`]) inside JSON, so every message is one strict JSON body.
//! The maths behind every field (strategies, differential privacy, secure
//! aggregation, models) lives in the pure `federated` crate; its types are
//! used here as they are.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use federated::dp::DpConfig;
use federated::model::{Evaluation, LocalTraining, ModelSpec};
use federated::screen::ScreenConfig;
use federated::secagg::{EncryptedShare, PublicKeys, RevealedShare, SecAggParams};
use federated::strategy::Strategy;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{DeviceId, Labels};

/// The data sets a device knows how to train a task on. The data stays on
/// the device; the task only names which of its local sets to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlDataset {
    /// Utterances labelled with Home Assistant intents, as MiniLM sentence
    /// embeddings (384 inputs).
    Intents,
    /// Shuttle sensor readings (9 features, standardised), labelled normal
    /// or anomalous.
    Shuttle,
}

impl FlDataset {
    /// The name used in configuration and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FlDataset::Intents => "intents",
            FlDataset::Shuttle => "shuttle",
        }
    }
}

/// An operator's request to start a federated task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFlTask {
    /// The model name the finished task publishes under (e.g. `intents-head`).
    pub name: String,
    /// The model every device trains.
    #[schema(value_type = Object)]
    pub model: ModelSpec,
    /// Class names, in the order of the model's outputs.
    pub labels: Vec<String>,
    /// Which local data set devices train on.
    pub dataset: FlDataset,
    /// How the hub combines updates.
    #[schema(value_type = Object)]
    pub strategy: Strategy,
    /// Rounds to run.
    pub rounds: u32,
    /// Updates the hub aggregates per round.
    pub clients_per_round: u32,
    /// Extra fraction of devices invited to cover dropouts (default 0.3).
    #[serde(default)]
    pub over_selection: Option<f64>,
    /// Fewest updates a round may aggregate at its deadline (default: half
    /// of `clients_per_round`, at least 1; at least 3 with secure aggregation).
    #[serde(default)]
    pub min_clients: Option<u32>,
    /// Seconds a round (or, with secure aggregation, each of its four
    /// phases) may take (default 60).
    #[serde(default)]
    pub round_deadline_secs: Option<u64>,
    /// The devices' local training.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub local: Option<LocalTraining>,
    /// The hub's step along each round's aggregate update (FedAvg with a
    /// server learning rate, Reddi et al. 2021); default 1, the plain
    /// average. Above 1 speeds up tasks whose devices hold little data.
    #[serde(default)]
    pub server_learning_rate: Option<f32>,
    /// Update screening when updates are visible (not with secure aggregation).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub screen: Option<ScreenConfig>,
    /// Client-level differential privacy.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub dp: Option<DpConfig>,
    /// Secure aggregation: the hub sees only the sum of the updates.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub secagg: Option<SecAggParams>,
    /// Only devices with all these labels take part (default: every device).
    #[serde(default)]
    pub eligibility: Labels,
    /// Seed for the initial model and client selection (default: random).
    #[serde(default)]
    pub seed: Option<u64>,
    /// A held-out evaluation set the hub scores every new global model on
    /// (operator data that no device trains on). Stored apart from the
    /// spec: task views leave it out and report its size instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<FlHeldOut>,
}

/// Labelled examples for the hub's own evaluation of a task's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlHeldOut {
    /// Examples, row after row, `model.inputs` values each.
    pub features: F32Vector,
    /// The class of each example.
    pub labels: Vec<u32>,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlTaskState {
    /// Rounds are running.
    Running,
    /// Every round ran, or the privacy budget was reached.
    Completed,
    /// Too many rounds in a row failed.
    Failed,
    /// An operator stopped it.
    Stopped,
}

/// The phase a round is in. Without secure aggregation a round has one
/// phase, `train`; with it, four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlPhase {
    /// Selected devices train and send their updates.
    Train,
    /// Secure aggregation, phase 0: selected devices advertise public keys.
    Advertise,
    /// Phase 1: devices in the roster send encrypted key shares.
    Share,
    /// Phase 2: devices whose shares were delivered send masked updates.
    Masked,
    /// Phase 3: devices whose masked updates arrived reveal shares.
    Unmask,
    /// The round is over (aggregated, or failed).
    Closed,
}

/// One finished round's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlRoundSummary {
    /// Round number, from 1.
    pub round: u32,
    /// Whether the round produced a new global model.
    pub aggregated: bool,
    /// Devices invited.
    pub invited: u32,
    /// Updates aggregated.
    pub aggregated_updates: u32,
    /// Updates screening or the strategy left out.
    pub excluded_updates: u32,
    /// Submissions refused, by reason (`wrong_shape`, `not_selected`,
    /// `late`, `replayed`, …).
    pub refused: std::collections::BTreeMap<String, u32>,
    /// Devices that dropped out after being counted in (secure aggregation).
    pub dropped: u32,
    /// The clients' evaluation of the round's starting model on their own
    /// data, weighted by examples.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub client_evaluation: Option<Evaluation>,
    /// The hub's evaluation of the round's resulting model on the task's
    /// held-out set, when it has one.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub evaluation: Option<Evaluation>,
    /// Privacy spent after this round, at the task's δ.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// Wall time of the round, milliseconds.
    pub duration_ms: u64,
    /// Why the round failed, when it did.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A task as the hub reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlTask {
    /// The task id.
    pub id: String,
    /// What the operator asked for, with defaults filled in.
    pub spec: CreateFlTask,
    /// Where the task is.
    pub state: FlTaskState,
    /// Rounds that produced a new global model.
    pub completed_rounds: u32,
    /// The round in progress, if any.
    #[serde(default)]
    pub current_round: Option<u32>,
    /// Its phase.
    #[serde(default)]
    pub phase: Option<FlPhase>,
    /// Every finished round, oldest first.
    pub history: Vec<FlRoundSummary>,
    /// Privacy spent so far, at the task's δ (with differential privacy).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// Examples in the held-out set the hub evaluates on, if any.
    #[serde(default)]
    pub held_out_examples: Option<u32>,
    /// The current global model on the held-out set (before the first
    /// round: the initial model).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub evaluation: Option<Evaluation>,
    /// Why the task stopped, when it did.
    #[serde(default)]
    pub detail: Option<String>,
    /// When the task was created.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// The tasks the hub knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlTaskList {
    /// Newest first.
    pub tasks: Vec<FlTask>,
}

/// What one device needs to know about a round, in its current phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlRoundView {
    /// The task.
    pub task_id: String,
    /// The round.
    pub round: u32,
    /// The round's phase now.
    pub phase: FlPhase,
    /// Whether this device was invited.
    pub selected: bool,
    /// When the current phase closes.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub phase_deadline: OffsetDateTime,
    /// The model to train.
    #[schema(value_type = Object)]
    pub model: ModelSpec,
    /// Which local data set to train on.
    pub dataset: FlDataset,
    /// Class names, in the order of the model's outputs: how a device maps
    /// its own labelled examples to classes.
    pub labels: Vec<String>,
    /// Local training settings.
    #[schema(value_type = Object)]
    pub local: LocalTraining,
    /// The norm every update is clipped to on the device (differential
    /// privacy or secure aggregation), if any.
    #[serde(default)]
    pub clip_norm: Option<f32>,
    /// Secure aggregation settings, when the task uses it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub secagg: Option<SecAggParams>,
    /// Phases `share` and later: the roster (devices whose keys were
    /// accepted), in roster order.
    #[serde(default)]
    pub roster: Option<Vec<FlRosterEntry>>,
    /// Phases `masked` and later: roster indices whose shares were delivered.
    #[serde(default)]
    pub u2: Option<Vec<u32>>,
    /// Phase `unmask`: roster indices whose masked updates arrived.
    #[serde(default)]
    pub u3: Option<Vec<u32>>,
}

/// A device in a secure-aggregation roster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlRosterEntry {
    /// The device.
    pub device_id: DeviceId,
    /// Its advertised keys.
    #[schema(value_type = Object)]
    pub keys: PublicKeys,
}

/// The global model a round starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlModel {
    /// The round it is for.
    pub round: u32,
    /// Flat parameters.
    pub params: F32Vector,
}

/// A device's plain update (no secure aggregation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlUpdate {
    /// Trained minus global parameters.
    pub delta: F32Vector,
    /// Local training examples.
    pub examples: u32,
    /// The round's starting model evaluated on the device's data.
    #[schema(value_type = Object)]
    pub evaluation: Evaluation,
}

/// Secure aggregation, phase 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlAdvertise {
    /// The device's public keys for this round.
    #[schema(value_type = Object)]
    pub keys: PublicKeys,
}

/// Secure aggregation, phase 1: shares for the device's neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlShares {
    /// Encrypted shares, one per holder other than the sender.
    #[schema(value_type = Vec<Object>)]
    pub shares: Vec<EncryptedShare>,
}

/// Secure aggregation, phase 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlMasked {
    /// The masked, fixed-point update.
    pub masked: U32Vector,
    /// The round's starting model evaluated on the device's data.
    #[schema(value_type = Object)]
    pub evaluation: Evaluation,
}

/// Secure aggregation, phase 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlUnmask {
    /// Revealed shares.
    #[schema(value_type = Vec<Object>)]
    pub revealed: Vec<RevealedShare>,
}

/// `f32` values as base64 of their little-endian bytes.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(value_type = String, format = Byte)]
pub struct F32Vector(pub Vec<f32>);

/// `u32` values as base64 of their little-endian bytes.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(value_type = String, format = Byte)]
pub struct U32Vector(pub Vec<u32>);

macro_rules! base64_vector {
    ($name:ident, $t:ty, $what:literal) => {
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut bytes = Vec::with_capacity(self.0.len() * 4);
                for v in &self.0 {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                s.serialize_str(&STANDARD.encode(bytes))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                let bytes = STANDARD
                    .decode(text.as_bytes())
                    .map_err(|e| D::Error::custom(format!("{} is not base64: {e}", $what)))?;
                if bytes.len() % 4 != 0 {
                    return Err(D::Error::custom(format!(
                        "{} has {} bytes, not a multiple of 4",
                        $what,
                        bytes.len()
                    )));
                }
                Ok($name(
                    bytes
                        .chunks_exact(4)
                        .map(|c| <$t>::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
        }
    };
}

base64_vector!(F32Vector, f32, "f32 vector");
base64_vector!(U32Vector, u32, "u32 vector");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_and_bad_lengths_are_refused() {
        let v = F32Vector(vec![1.5, -0.25, f32::MIN_POSITIVE]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<F32Vector>(&json).unwrap(), v);
        let u = U32Vector(vec![0, u32::MAX, 7]);
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<U32Vector>(&json).unwrap(), u);
        let three_bytes = format!("\"{}\"", STANDARD.encode([1u8, 2, 3]));
        let err = serde_json::from_str::<F32Vector>(&three_bytes).unwrap_err();
        assert!(err.to_string().contains("not a multiple of 4"), "{err}");
        assert!(serde_json::from_str::<F32Vector>("\"@@\"").is_err());
    }
}
