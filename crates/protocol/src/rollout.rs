//! Staged rollouts of model releases: what operators ask for, what the hub
//! reports, and what devices say about their updates.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{DeviceId, Labels};

/// An operator's request to roll a published release out to the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// The model's name.
    pub model: String,
    /// The published release to install.
    pub version: u64,
    /// Increasing percentages of the cohort, the last 100 (default `[5, 25, 100]`).
    #[serde(default)]
    pub stages: Option<Vec<f64>>,
    /// Only devices with all these labels take part (default: every device).
    #[serde(default)]
    pub cohort: Labels,
    /// Health gates every stage must pass, such as `error_rate<1%` or `p95_ms<200`.
    #[serde(default)]
    pub gates: Vec<String>,
    /// Fraction of a stage that must commit before the next opens (default 0.9).
    #[serde(default)]
    pub min_committed: Option<f64>,
    /// Fraction of a stage whose failure aborts the rollout (default 0.1).
    #[serde(default)]
    pub max_failed: Option<f64>,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Stages open as they pass.
    Active,
    /// An operator paused it: no new device is asked to install.
    Paused,
    /// Every stage passed.
    Completed,
    /// Stopped, and its devices told to go back to their previous version.
    Aborted,
}

impl RolloutState {
    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "active" => RolloutState::Active,
            "paused" => RolloutState::Paused,
            "completed" => RolloutState::Completed,
            "aborted" => RolloutState::Aborted,
            _ => return None,
        })
    }
}

/// Where one device is with a rollout's release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// The hub asked the device to install; nothing heard since.
    Notified,
    /// Downloading and verifying.
    Downloading,
    /// Installed and serving, in its health window.
    Installed,
    /// Passed its health window: the release is kept.
    Committed,
    /// Refused (verification), failed to install, or failed its health
    /// check; the device serves its previous version.
    Failed,
    /// Went back to its previous version because the rollout was aborted.
    RolledBack,
}

impl UpdatePhase {
    /// The phase's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePhase::Notified => "notified",
            UpdatePhase::Downloading => "downloading",
            UpdatePhase::Installed => "installed",
            UpdatePhase::Committed => "committed",
            UpdatePhase::Failed => "failed",
            UpdatePhase::RolledBack => "rolled_back",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "notified" => UpdatePhase::Notified,
            "downloading" => UpdatePhase::Downloading,
            "installed" => UpdatePhase::Installed,
            "committed" => UpdatePhase::Committed,
            "failed" => UpdatePhase::Failed,
            "rolled_back" => UpdatePhase::RolledBack,
            _ => return None,
        })
    }

    /// True once the device will not move on its own any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpdatePhase::Committed | UpdatePhase::Failed | UpdatePhase::RolledBack
        )
    }
}

/// Counts of a rollout's devices by phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseCounts {
    /// Devices in the cohort.
    pub cohort: u64,
    /// Devices in the stages opened so far.
    pub in_stage: u64,
    /// Asked to install, not heard from since.
    pub notified: u64,
    /// Downloading.
    pub downloading: u64,
    /// In their health window.
    pub installed: u64,
    /// Committed.
    pub committed: u64,
    /// Failed.
    pub failed: u64,
    /// Rolled back after an abort.
    pub rolled_back: u64,
}

/// A rollout as the hub reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutView {
    /// The rollout's id, e.g. `ro-5f3a9c0d`.
    pub id: String,
    /// The model.
    pub model: String,
    /// The release being rolled out.
    pub version: u64,
    /// The stage percentages.
    pub stages: Vec<f64>,
    /// The current stage, 0-based.
    pub stage: usize,
    /// The cohort's labels.
    pub cohort: Labels,
    /// The health gates.
    pub gates: Vec<String>,
    /// Fraction of a stage that must commit to promote it.
    pub min_committed: f64,
    /// Fraction of a stage whose failure aborts.
    pub max_failed: f64,
    /// Active, paused, completed or aborted.
    pub state: RolloutState,
    /// The controller's last decision, in words.
    pub decision: String,
    /// Devices by phase.
    pub counts: PhaseCounts,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// When its state or stage last changed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// When it completed or was aborted.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<OffsetDateTime>,
}

/// Rollouts, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutList {
    /// The rollouts.
    pub rollouts: Vec<RolloutView>,
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutDevice {
    /// The device.
    pub device_id: DeviceId,
    /// The stage (0-based) that brought it in.
    pub stage: usize,
    /// Where it is.
    pub phase: UpdatePhase,
    /// What it said last (an error, a health result).
    pub detail: Option<String>,
    /// Requests served on the new version during its health window.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// p95 latency on the new version, in ms.
    pub p95_ms: Option<f64>,
    /// When it last reported.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

/// A rollout with its devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutDetail {
    /// The rollout.
    pub rollout: RolloutView,
    /// Its devices, by stage then id.
    pub devices: Vec<RolloutDevice>,
}

/// A device's report on its update for a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    /// Increases with every report the device makes for this rollout; the
    /// hub ignores a report older than one it has (reports can be retried
    /// and arrive out of order).
    pub seq: u64,
    /// Where the device is.
    pub phase: UpdatePhase,
    /// The version it serves now.
    pub serving_version: Option<u64>,
    /// An error or health result, in words.
    #[serde(default)]
    pub detail: Option<String>,
    /// Requests served on the new version during its health window.
    #[serde(default)]
    pub requests: u64,
    /// Of which failed.
    #[serde(default)]
    pub errors: u64,
    /// p95 latency on the new version, in ms.
    #[serde(default)]
    pub p95_ms: Option<f64>,
}

/// The device's model update, as its local status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateStatus {
    /// The rollout.
    pub rollout_id: String,
    /// The model.
    pub model: String,
    /// The version being installed.
    pub version: u64,
    /// Where the update is.
    pub phase: UpdatePhase,
    /// Artifact bytes on disk so far.
    pub downloaded_bytes: u64,
    /// The artifact's size.
    pub total_bytes: u64,
    /// Bytes already on disk when the last download attempt started (a
    /// resumed download starts above 0).
    pub resumed_from: u64,
    /// Download attempts so far.
    pub attempts: u32,
    /// The last error or health result.
    pub detail: Option<String>,
}

/// The version of a model a device serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstalledModel {
    /// The model.
    pub model: String,
    /// The version served.
    pub version: u64,
    /// The version kept to roll back to.
    pub previous: Option<u64>,
    /// True while the served version is in its health window.
    pub trial: bool,
}
