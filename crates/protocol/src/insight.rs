//! Insights: the small records devices derive from what they see and infer,
//! keep in their outbox while offline, and deliver to the hub exactly once.
//!
//! On the wire a batch carries each insight as the exact JSON text the
//! device stored ([`InsightBatch::insights`] are raw JSON values), so the
//! hub keeps them byte for byte; [`Insight::validate`] is the one check both
//! sides apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::DeviceId;

/// Most insights one delivery batch may carry.
pub const MAX_BATCH_INSIGHTS: usize = 1000;
/// Largest accepted delivery batch body, in bytes.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest accepted insight, as JSON text, in bytes.
pub const MAX_INSIGHT_BYTES: usize = 8 * 1024;

/// How urgent an insight is. Delivery sends higher priorities first, and
/// the outbox's overflow policy drops the lowest first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InsightPriority {
    /// Needs attention now (an anomaly).
    Alert,
    /// A derived figure (windowed counts).
    Insight,
    /// Health and housekeeping figures.
    Telemetry,
}

impl InsightPriority {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            InsightPriority::Alert => "alert",
            InsightPriority::Insight => "insight",
            InsightPriority::Telemetry => "telemetry",
        }
    }
}

/// One insight, as a device produces it and the hub stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Insight {
    /// Idempotency key, unique per device (`<outbox id>-<sequence>`): the hub
    /// stores an insight once per device and key, however often it arrives.
    pub key: String,
    /// What it measures: `intent_count`, `anomaly`, `model_health`, ...
    pub kind: String,
    /// The series within the kind: the intent name, the metric, the sensor.
    pub series: String,
    /// Delivery and overflow class.
    pub priority: InsightPriority,
    /// Start of the window it covers (or the time of the event), unix ms.
    pub start_ms: i64,
    /// Length of the window in ms; 0 for a point event.
    pub window_ms: i64,
    /// The figure: a count, a score, a latency.
    pub value: f64,
    /// A short human-readable summary (an anomaly's context), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Extra figures (small; for example the readings of an anomaly window).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, f64>,
}

impl Insight {
    /// Checks the fields a store relies on; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.:/@".contains(c))
        };
        if !name_ok(&self.key) {
            return Err("key must be 1-128 characters of [A-Za-z0-9_-.:/@]".into());
        }
        if !name_ok(&self.kind) {
            return Err("kind must be 1-128 characters of [A-Za-z0-9_-.:/@]".into());
        }
        if self.series.is_empty() || self.series.len() > 256 {
            return Err("series must be 1-256 bytes".into());
        }
        if !(0..=4_102_444_800_000).contains(&self.start_ms) {
            return Err(format!(
                "start_ms {} is not a unix time in ms between 1970 and 2100",
                self.start_ms
            ));
        }
        if !(0..=31 * 24 * 3_600_000).contains(&self.window_ms) {
            return Err(format!(
                "window_ms {} must be between 0 and 31 days",
                self.window_ms
            ));
        }
        if !self.value.is_finite() {
            return Err("value must be a finite number".into());
        }
        if self.summary.as_ref().is_some_and(|s| s.len() > 2048) {
            return Err("summary must be at most 2048 bytes".into());
        }
        if self.attributes.len() > 32 {
            return Err("at most 32 attributes".into());
        }
        if let Some((k, _)) = self
            .attributes
            .iter()
            .find(|(k, v)| !name_ok(k) || !v.is_finite())
        {
            return Err(format!(
                "attribute {k:?} needs a short name and a finite value"
            ));
        }
        Ok(())
    }
}

/// A batch of insights a device delivers (`POST /v1/devices/{id}/insights`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InsightBatch {
    /// The sending device; must be the device the client certificate names.
    pub device_id: DeviceId,
    /// The insights, each the exact JSON text of an [`Insight`] as stored on
    /// the device.
    #[schema(value_type = Vec<Insight>)]
    pub insights: Vec<Box<RawValue>>,
}

/// The hub's answer to a delivered batch, sent after the batch is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InsightBatchAck {
    /// Insights stored for the first time.
    pub stored: u64,
    /// Insights the hub already held (redelivered after a lost answer).
    pub duplicates: u64,
}

/// An insight as the hub's query API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredInsight {
    /// The device that produced it.
    pub device_id: DeviceId,
    /// The device's site label, if it has one.
    pub site: Option<String>,
    /// When the hub stored it, unix ms.
    pub received_ms: i64,
    /// The insight.
    pub insight: Insight,
    /// The exact JSON text the device sent.
    pub raw: String,
}

/// A page of insights (`GET /v1/insights`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InsightList {
    /// The insights, oldest first.
    pub insights: Vec<StoredInsight>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_after: Option<i64>,
}

/// The state of an agent's outbox and delivery, in its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboxStatus {
    /// Prefix of this outbox's insight keys.
    pub outbox_id: String,
    /// Insights waiting for delivery.
    pub pending: u64,
    /// Bytes they take (what the budget counts).
    pub pending_bytes: u64,
    /// The outbox's byte budget.
    pub budget_bytes: u64,
    /// Insights ever appended (the last sequence number).
    pub appended: u64,
    /// Insights the hub acknowledged, ever.
    pub acked: u64,
    /// Insights dropped by the overflow policy, ever.
    pub evicted: u64,
    /// The same, by priority.
    pub evicted_by_priority: BTreeMap<String, u64>,
    /// Appends refused because the budget was full of higher priorities, ever.
    pub refused: u64,
    /// Damaged records set aside at recovery.
    pub quarantined_frames: u64,
    /// Insights delivered by this process.
    pub delivered: u64,
    /// Insights the hub refused as malformed (dropped) by this process.
    pub rejected_by_hub: u64,
    /// Raw input bytes processed by this process (request bodies).
    pub raw_bytes: u64,
    /// Bytes of insight batches sent by this process.
    pub sent_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Insight {
        Insight {
            key: "a1b2-17".into(),
            kind: "intent_count".into(),
            series: "HassTurnOn".into(),
            priority: InsightPriority::Insight,
            start_ms: 1_790_000_000_000,
            window_ms: 60_000,
            value: 3.0,
            summary: None,
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn validation_names_the_field() {
        type Case = (&'static str, fn(&mut Insight));
        let cases: &[Case] = &[
            ("key", |i| i.key = String::new()),
            ("key", |i| i.key = "a b".into()),
            ("kind", |i| i.kind = "x".repeat(200)),
            ("series", |i| i.series = String::new()),
            ("start_ms", |i| i.start_ms = -1),
            ("window_ms", |i| i.window_ms = -5),
            ("value", |i| i.value = f64::NAN),
            ("summary", |i| i.summary = Some("s".repeat(3000))),
            ("attribute", |i| {
                i.attributes.insert("x".into(), f64::INFINITY);
            }),
        ];
        assert!(sample().validate().is_ok());
        for (field, break_it) in cases {
            let mut i = sample();
            break_it(&mut i);
            let err = i.validate().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn raw_batch_keeps_bytes() {
        let text = serde_json::to_string(&sample()).unwrap();
        let body = format!(r#"{{"device_id":"dev-1","insights":[{text}]}}"#);
        let batch: InsightBatch = serde_json::from_str(&body).unwrap();
        assert_eq!(batch.insights[0].get(), text);
    }
}
