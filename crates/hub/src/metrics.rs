//! The hub's Prometheus metrics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why an enrolment was refused (a bounded set, used as a label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `malformed`, `invalid`, `expired`, `used`, `csr`.
    pub reason: &'static str,
}

/// A device update report's phase (a bounded set, used as a label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `downloading`, `installed`, `committed`, `failed`, `rolled_back`.
    pub phase: &'static str,
}

/// Why a federated submission was refused, or how a round ended (bounded
/// sets, used as a label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlLabels {
    /// Refusals: `wrong_shape`, `not_selected`, `late`, `replayed`,
    /// `wrong_phase`, `invalid`; rounds: `aggregated`, `failed`.
    pub reason: &'static str,
}

/// Counters and gauges the hub exports on `/metrics`.
#[derive(Clone, Debug)]
pub struct HubMetrics {
    /// Shared request metrics.
    pub http: web::HttpMetrics,
    /// Devices enrolled since start.
    pub enrolments: Counter,
    /// Enrolments refused, by reason.
    pub enrolments_refused: Family<RefusalLabels, Counter>,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Device calls refused for identity reasons (no certificate, revoked, mismatch).
    pub device_auth_refused: Counter,
    /// Event streams currently open.
    pub streams_open: Gauge,
    /// Messages pushed to devices.
    pub messages_sent: Counter,
    /// Devices enrolled, set at scrape time.
    pub devices_enrolled: Gauge,
    /// Devices with an open stream, set at scrape time.
    pub devices_online: Gauge,
    /// Insights stored for the first time.
    pub insights_stored: Counter,
    /// Insights delivered again and recognised as duplicates.
    pub insights_duplicate: Counter,
    /// Insight batches accepted.
    pub insight_batches: Counter,
    /// Insight batches refused for a malformed record.
    pub insights_refused: Counter,
    /// Device update reports stored, by phase.
    pub update_reports: Family<PhaseLabels, Counter>,
    /// Rollout stages promoted.
    pub rollout_stages_promoted: Counter,
    /// Rollouts completed.
    pub rollouts_completed: Counter,
    /// Rollouts aborted (by an operator or a failed stage).
    pub rollouts_aborted: Counter,
    /// Federated submissions accepted (updates, keys, shares, masked
    /// updates, revealed shares).
    pub fl_submissions: Counter,
    /// Federated submissions refused, by reason.
    pub fl_refused: Family<FlLabels, Counter>,
    /// Federated rounds finished, by outcome.
    pub fl_rounds: Family<FlLabels, Counter>,
}

impl HubMetrics {
    /// Creates the metrics and a registry holding them under `strata_hub_`.
    pub fn new() -> (Self, Arc<Registry>) {
        let mut registry = Registry::with_prefix("strata_hub");
        let metrics = Self {
            http: web::HttpMetrics::register(&mut registry),
            enrolments: Counter::default(),
            enrolments_refused: Family::default(),
            heartbeats: Counter::default(),
            device_auth_refused: Counter::default(),
            streams_open: Gauge::default(),
            messages_sent: Counter::default(),
            devices_enrolled: Gauge::default(),
            devices_online: Gauge::default(),
            insights_stored: Counter::default(),
            insights_duplicate: Counter::default(),
            insight_batches: Counter::default(),
            insights_refused: Counter::default(),
            update_reports: Family::default(),
            rollout_stages_promoted: Counter::default(),
            rollouts_completed: Counter::default(),
            rollouts_aborted: Counter::default(),
            fl_submissions: Counter::default(),
            fl_refused: Family::default(),
            fl_rounds: Family::default(),
        };
        registry.register(
            "fl_submissions",
            "Federated submissions accepted",
            metrics.fl_submissions.clone(),
        );
        registry.register(
            "fl_refused",
            "Federated submissions refused, by reason",
            metrics.fl_refused.clone(),
        );
        registry.register(
            "fl_rounds",
            "Federated rounds finished, by outcome",
            metrics.fl_rounds.clone(),
        );
        registry.register("enrolments", "Devices enrolled", metrics.enrolments.clone());
        registry.register(
            "enrolments_refused",
            "Enrolments refused, by reason",
            metrics.enrolments_refused.clone(),
        );
        registry.register(
            "heartbeats",
            "Device heartbeats received",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "device_auth_refused",
            "Device calls refused: no certificate, unknown, revoked or acting as another device",
            metrics.device_auth_refused.clone(),
        );
        registry.register(
            "streams_open",
            "Device event streams open",
            metrics.streams_open.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages sent to devices",
            metrics.messages_sent.clone(),
        );
        registry.register(
            "devices_enrolled",
            "Devices enrolled (active and revoked)",
            metrics.devices_enrolled.clone(),
        );
        registry.register(
            "devices_online",
            "Devices holding an event stream open",
            metrics.devices_online.clone(),
        );
        registry.register(
            "insights_stored",
            "Insights stored for the first time",
            metrics.insights_stored.clone(),
        );
        registry.register(
            "insights_duplicate",
            "Insights delivered again and recognised as duplicates",
            metrics.insights_duplicate.clone(),
        );
        registry.register(
            "insight_batches",
            "Insight batches accepted",
            metrics.insight_batches.clone(),
        );
        registry.register(
            "insight_batches_refused",
            "Insight batches refused for a malformed record",
            metrics.insights_refused.clone(),
        );
        registry.register(
            "update_reports",
            "Device update reports stored, by phase",
            metrics.update_reports.clone(),
        );
        registry.register(
            "rollout_stages_promoted",
            "Rollout stages promoted",
            metrics.rollout_stages_promoted.clone(),
        );
        registry.register(
            "rollouts_completed",
            "Rollouts completed",
            metrics.rollouts_completed.clone(),
        );
        registry.register(
            "rollouts_aborted",
            "Rollouts aborted by an operator or a failed stage",
            metrics.rollouts_aborted.clone(),
        );
        (metrics, Arc::new(registry))
    }

    /// Counts a stored device update report.
    pub fn update_report(&self, phase: &'static str) {
        self.update_reports
            .get_or_create(&PhaseLabels { phase })
            .inc();
    }
}
