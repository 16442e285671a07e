//! Wire types shared by the Strata hub, the edge agent and the CLI: request
//! and response bodies of the hub API, the join token, the messages the hub
//! pushes to devices, and the RFC 9457 problem body every error uses.
//!
//! This crate is data only: serde types, their OpenAPI schemas and the join
//! token codec. It does no I/O and holds no business logic.
//!
//! Start reading at [`JoinToken`] (how a device finds and trusts its hub),
//! then [`EnrollRequest`] and [`DeviceMessage`].

pub mod federated;
pub mod insight;
pub mod openai;
pub mod rollout;
pub mod route;
mod token;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

pub use insight::OutboxStatus;
pub use token::{JoinToken, TokenError};

/// Media type of RFC 9457 problem bodies.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Version of this API, reported by health endpoints.
pub const API_VERSION: &str = "v1";

/// Labels attached to a device (for example `site=store-12`).
pub type Labels = BTreeMap<String, String>;

/// A device's identity on the hub, e.g. `dev-3f2a9c0d41b7e8a2`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, example = "dev-3f2a9c0d41b7e8a2")]
pub struct DeviceId(String);

impl DeviceId {
    /// Wraps a string that the hub issued as a device id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An RFC 9457 problem body, the shape of every error the hub and the agent
/// return over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem type, e.g. `urn:strata:problem:token-expired`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short, human-readable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, in a sentence a person can act on.
    pub detail: String,
}

/// Liveness and version of a Strata server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
    /// Which server answered: `hub` or `edge`.
    pub role: String,
    /// Version of the Strata build.
    pub version: String,
    /// API version, currently `v1`.
    pub api: String,
}

/// An operator's request for a one-time join token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// How long the token stays valid, in seconds (default 3600, at most 30 days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Labels given to the device that joins with this token.
    #[serde(default)]
    pub labels: Labels,
}

/// A freshly issued join token. The secret is shown only here, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenResponse {
    /// The token to pass to `strata edge join --token`.
    pub token: String,
    /// The token's public id (the secret is not stored on the hub).
    pub token_id: String,
    /// When the token stops being accepted.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    /// Labels the joining device will get.
    pub labels: Labels,
}

/// A device asking to join, with its join token and a CSR for its own key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token, as printed by `strata hub token create`.
    pub token: String,
    /// A PKCS#10 certificate signing request, PEM, for the device's key.
    pub csr_pem: String,
    /// A human-friendly name for the device (defaults to its id).
    #[serde(default)]
    pub name: Option<String>,
}

/// The hub's answer to a successful enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The id the hub gave the device; it is also the certificate's common name.
    pub device_id: DeviceId,
    /// The device certificate, PEM, signed by the hub CA.
    pub certificate_pem: String,
    /// The hub CA certificate, PEM.
    pub ca_pem: String,
    /// Labels of the device, from its join token.
    pub labels: Labels,
}

/// What an agent reports with each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Version of the agent build.
    pub agent_version: String,
    /// Seconds since the agent process started.
    pub uptime_secs: u64,
    /// Address of the agent's local API, if it serves one.
    #[serde(default)]
    pub local_api: Option<String>,
    /// Sequence number of the last hub message the agent has processed.
    #[serde(default)]
    pub last_message_seq: Option<i64>,
}

/// The hub's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatAck {
    /// The hub's clock, so that agents can notice skew.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub server_time: OffsetDateTime,
    /// Seconds the hub wants between heartbeats.
    pub heartbeat_interval_secs: u64,
}

/// Whether a device may still talk to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Enrolled and allowed.
    Active,
    /// Revoked by an operator; every call is refused.
    Revoked,
}

/// A device as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device id.
    pub id: DeviceId,
    /// Human-friendly name.
    pub name: String,
    /// Labels from the join token.
    pub labels: Labels,
    /// Active or revoked.
    pub status: DeviceStatus,
    /// True while the device holds its event stream open.
    pub online: bool,
    /// SHA-256 fingerprint of the device certificate.
    pub cert_fingerprint: String,
    /// When the device certificate expires.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub cert_not_after: OffsetDateTime,
    /// When the device enrolled.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub enrolled_at: OffsetDateTime,
    /// When the hub last heard from the device.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen_at: Option<OffsetDateTime>,
    /// The last heartbeat the device sent.
    pub last_heartbeat: Option<Heartbeat>,
    /// When the device was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
}

/// The fleet, as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceList {
    /// Devices ordered by enrolment time.
    pub devices: Vec<Device>,
}

/// A message the hub pushes to one device over its event stream.
///
/// Messages are stored before they are sent and carry an increasing sequence
/// number, so that a device that was offline gets every message it missed
/// when it reconnects (the SSE `Last-Event-ID`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceMessage {
    /// A note from an operator; the agent logs it and acknowledges it. Used to
    /// check the push path end to end.
    Ping {
        /// Free text.
        note: String,
    },
    /// The device has been revoked; the agent stops calling the hub.
    Revoked,
    /// A rollout includes this device: verify and install `model` at
    /// `version` from the registry, then report on it.
    Install {
        /// The rollout.
        rollout_id: String,
        /// The model's name.
        model: String,
        /// The release to install.
        version: u64,
    },
    /// A federated task invites the device to a round: fetch the round and
    /// take part if the device has the task's data.
    FlInvite {
        /// The task.
        task_id: String,
        /// The round.
        round: u32,
    },
    /// The rollout was aborted: if the device runs `version` of `model`
    /// because of it, go back to the version it had before.
    RollBack {
        /// The rollout.
        rollout_id: String,
        /// The model's name.
        model: String,
        /// The release to leave.
        version: u64,
    },
}

/// A stored hub-to-device message with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceMessageEnvelope {
    /// Increasing per hub; the SSE event id.
    pub seq: i64,
    /// When the hub stored the message.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// The message itself.
    pub message: DeviceMessage,
}

/// An operator's request to push a message to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    /// The message.
    pub message: DeviceMessage,
}

/// The first event on every device stream: who the hub thinks is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamHello {
    /// The device the stream belongs to.
    pub device_id: DeviceId,
    /// The highest message sequence number the hub has stored for the device.
    pub latest_seq: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<EnrollRequest>(r#"{"token":"t","csr_pem":"c","colour":"blue"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn device_messages_are_tagged_by_kind() {
        let json = serde_json::to_string(&DeviceMessage::Ping { note: "hi".into() }).unwrap();
        assert_eq!(json, r#"{"kind":"ping","note":"hi"}"#);
        let back: DeviceMessage = serde_json::from_str(r#"{"kind":"revoked"}"#).unwrap();
        assert_eq!(back, DeviceMessage::Revoked);
    }
}

/// What an agent's local API reports at `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    /// This device's id.
    pub device_id: DeviceId,
    /// Display name.
    pub name: String,
    /// Labels from the join token.
    pub labels: Labels,
    /// The hub this device belongs to.
    pub hub_url: String,
    /// True while the event stream to the hub is open.
    pub hub_connected: bool,
    /// How many times the event stream has been (re)opened since start.
    pub stream_connects: u64,
    /// Heartbeats the hub acknowledged since start.
    pub heartbeats_ok: u64,
    /// Heartbeats that failed since start.
    pub heartbeats_failed: u64,
    /// When the hub last acknowledged a heartbeat.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_heartbeat_at: Option<OffsetDateTime>,
    /// Sequence number of the last hub message processed.
    pub last_message_seq: i64,
    /// Hub messages processed since start.
    pub messages_received: u64,
    /// True once the hub has revoked this device.
    pub revoked: bool,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// The models in the agent's catalogue and whether each loaded.
    pub models: Vec<LocalModel>,
    /// The insight outbox and its delivery.
    pub outbox: Option<insight::OutboxStatus>,
    /// Model versions installed from the registry.
    #[serde(default)]
    pub installed: Vec<rollout::InstalledModel>,
    /// The model update in progress or last finished, if any.
    #[serde(default)]
    pub update: Option<rollout::UpdateStatus>,
}

/// A model in an agent's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalModel {
    /// The id requests use.
    pub id: String,
    /// `llm`, `embedding`, `classifier` or `anomaly`.
    pub kind: String,
    /// True when the model is loaded and served.
    pub loaded: bool,
    /// Why it failed to load, if it did.
    pub error: Option<String>,
}
