//! The agent's Prometheus metrics and live status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::{AgentStatus, LocalModel};
use time::OffsetDateTime;

use crate::state::Enrolment;

/// Counters the agent exports on its local `/metrics`.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Shared request metrics of the local API.
    pub http: web::HttpMetrics,
    /// Heartbeats the hub acknowledged.
    pub heartbeats_ok: Counter,
    /// Heartbeats that failed.
    pub heartbeats_failed: Counter,
    /// Times the event stream was opened.
    pub stream_connects: Counter,
    /// 1 while the event stream is open.
    pub hub_connected: Gauge,
    /// Hub messages processed.
    pub messages_received: Counter,
    /// Outbox figures, set at scrape time from the outbox's own counters.
    pub outbox: OutboxGauges,
    /// The router's figures.
    pub route: RouteMetrics,
}

/// Labels of a routing decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RouteLabels {
    /// `local`, `macro` or `none` (refused).
    pub tier: String,
    /// The deciding reason's code (the first beyond the mode in force).
    pub reason: String,
}

/// What the router did.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    /// Answers by tier and first reason.
    pub decisions: Family<RouteLabels, Counter>,
    /// Local answers escalated to the macro tier for low confidence.
    pub escalations: Counter,
    /// Macro failures answered locally instead.
    pub fallbacks: Counter,
    /// Macro calls that failed (unreachable, timeout, 5xx, broken stream).
    pub macro_failures: Counter,
    /// 1 while the macro tier's circuit breaker is open.
    pub breaker_open: Gauge,
    /// Router decision time in microseconds, privacy classification included.
    pub decision_us: Histogram,
}

/// The outbox's figures as gauges (the outbox keeps the counts, some of them
/// across restarts; these mirror them when `/metrics` is read).
#[derive(Clone, Debug, Default)]
pub struct OutboxGauges {
    /// Insights waiting for delivery.
    pub pending: Gauge,
    /// Bytes they take.
    pub pending_bytes: Gauge,
    /// Insights ever appended.
    pub appended: Gauge,
    /// Insights ever acknowledged by the hub.
    pub acked: Gauge,
    /// Insights ever dropped by the overflow policy.
    pub evicted: Gauge,
    /// Appends ever refused for lack of room.
    pub refused: Gauge,
    /// Damaged records set aside.
    pub quarantined: Gauge,
    /// Raw input bytes processed since start.
    pub raw_bytes: Gauge,
    /// Insight bytes sent since start.
    pub sent_bytes: Gauge,
}

impl OutboxGauges {
    /// Copies a status snapshot into the gauges.
    pub fn set(&self, s: &protocol::OutboxStatus) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pending.set(g(s.pending));
        self.pending_bytes.set(g(s.pending_bytes));
        self.appended.set(g(s.appended));
        self.acked.set(g(s.acked));
        self.evicted.set(g(s.evicted));
        self.refused.set(g(s.refused));
        self.quarantined.set(g(s.quarantined_frames));
        self.raw_bytes.set(g(s.raw_bytes));
        self.sent_bytes.set(g(s.sent_bytes));
    }
}

impl AgentMetrics {
    /// Creates the metrics and a registry holding them under `strata_edge_`.
    pub fn new() -> (Self, Arc<Registry>) {
        let mut registry = Registry::with_prefix("strata_edge");
        let m = Self {
            http: web::HttpMetrics::register(&mut registry),
            heartbeats_ok: Counter::default(),
            heartbeats_failed: Counter::default(),
            stream_connects: Counter::default(),
            hub_connected: Gauge::default(),
            messages_received: Counter::default(),
            outbox: OutboxGauges::default(),
            route: RouteMetrics {
                decisions: Family::default(),
                escalations: Counter::default(),
                fallbacks: Counter::default(),
                macro_failures: Counter::default(),
                breaker_open: Gauge::default(),
                decision_us: Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0]),
            },
        };
        registry.register(
            "route_decisions",
            "Routed answers by tier and first reason",
            m.route.decisions.clone(),
        );
        registry.register(
            "route_escalations",
            "Local answers escalated to the macro tier for low confidence",
            m.route.escalations.clone(),
        );
        registry.register(
            "route_fallbacks",
            "Macro failures answered locally instead",
            m.route.fallbacks.clone(),
        );
        registry.register(
            "route_macro_failures",
            "Macro calls that failed",
            m.route.macro_failures.clone(),
        );
        registry.register(
            "route_breaker_open",
            "1 while the macro tier's circuit breaker is open",
            m.route.breaker_open.clone(),
        );
        registry.register(
            "route_decision_us",
            "Router decision time in microseconds, privacy classification included",
            m.route.decision_us.clone(),
        );
        registry.register(
            "heartbeats_ok",
            "Heartbeats the hub acknowledged",
            m.heartbeats_ok.clone(),
        );
        registry.register(
            "heartbeats_failed",
            "Heartbeats that failed",
            m.heartbeats_failed.clone(),
        );
        registry.register(
            "stream_connects",
            "Times the hub event stream was opened",
            m.stream_connects.clone(),
        );
        registry.register(
            "hub_connected",
            "1 while the hub event stream is open",
            m.hub_connected.clone(),
        );
        registry.register(
            "messages_received",
            "Hub messages processed",
            m.messages_received.clone(),
        );
        let o = &m.outbox;
        for (name, help, gauge) in [
            (
                "outbox_pending",
                "Insights waiting for delivery",
                &o.pending,
            ),
            (
                "outbox_pending_bytes",
                "Bytes of insights waiting for delivery",
                &o.pending_bytes,
            ),
            (
                "outbox_appended",
                "Insights ever appended to the outbox",
                &o.appended,
            ),
            (
                "outbox_acked",
                "Insights ever acknowledged by the hub",
                &o.acked,
            ),
            (
                "outbox_evicted",
                "Insights ever dropped by the overflow policy",
                &o.evicted,
            ),
            (
                "outbox_refused",
                "Insights ever refused for lack of room",
                &o.refused,
            ),
            (
                "outbox_quarantined",
                "Damaged outbox records set aside",
                &o.quarantined,
            ),
            (
                "insights_raw_bytes",
                "Raw input bytes processed since start",
                &o.raw_bytes,
            ),
            (
                "insights_sent_bytes",
                "Insight bytes sent to the hub since start",
                &o.sent_bytes,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        (m, Arc::new(registry))
    }
}

/// Live status shared by the link tasks and the local API.
#[derive(Debug)]
pub struct Status {
    enrolment: Enrolment,
    started: Instant,
    connected: AtomicBool,
    revoked: AtomicBool,
    stream_connects: AtomicU64,
    heartbeats_ok: AtomicU64,
    heartbeats_failed: AtomicU64,
    messages_received: AtomicU64,
    last_message_seq: AtomicI64,
    last_heartbeat_ms: AtomicI64,
    metrics: AgentMetrics,
    models: Vec<LocalModel>,
    updates: std::sync::Mutex<Updates>,
}

/// What the updater shows in the status.
#[derive(Debug, Default, Clone)]
struct Updates {
    installed: Vec<protocol::rollout::InstalledModel>,
    current: Option<protocol::rollout::UpdateStatus>,
}

impl Status {
    /// Fresh status for an enrolled device.
    pub fn new(
        enrolment: Enrolment,
        last_message_seq: i64,
        metrics: AgentMetrics,
        models: Vec<LocalModel>,
    ) -> Self {
        Self {
            enrolment,
            started: Instant::now(),
            connected: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            stream_connects: AtomicU64::new(0),
            heartbeats_ok: AtomicU64::new(0),
            heartbeats_failed: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            last_message_seq: AtomicI64::new(last_message_seq),
            last_heartbeat_ms: AtomicI64::new(0),
            metrics,
            models,
            updates: std::sync::Mutex::default(),
        }
    }

    fn updates(&self) -> std::sync::MutexGuard<'_, Updates> {
        self.updates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shows the model versions installed from the registry.
    pub fn set_installed(&self, installed: Vec<protocol::rollout::InstalledModel>) {
        self.updates().installed = installed;
    }

    /// Shows the update in progress (or the last one).
    pub fn set_update(&self, update: protocol::rollout::UpdateStatus) {
        self.updates().current = Some(update);
    }

    /// Changes the update in progress in place, if there is one.
    pub fn with_update(&self, f: impl FnOnce(&mut protocol::rollout::UpdateStatus)) {
        if let Some(u) = self.updates().current.as_mut() {
            f(u);
        }
    }

    /// True while the hub's event stream is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// The model versions installed from the registry.
    pub fn installed(&self) -> Vec<protocol::rollout::InstalledModel> {
        self.updates().installed.clone()
    }

    /// The enrolment facts.
    pub fn enrolment(&self) -> &Enrolment {
        &self.enrolment
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Marks the event stream open or closed.
    pub fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::SeqCst);
        self.metrics.hub_connected.set(i64::from(connected));
        if connected && !was {
            self.stream_connects.fetch_add(1, Ordering::SeqCst);
            self.metrics.stream_connects.inc();
        }
    }

    /// Records a heartbeat outcome.
    pub fn heartbeat(&self, ok: bool) {
        if ok {
            self.heartbeats_ok.fetch_add(1, Ordering::SeqCst);
            self.metrics.heartbeats_ok.inc();
            let now = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            self.last_heartbeat_ms.store(now, Ordering::SeqCst);
        } else {
            self.heartbeats_failed.fetch_add(1, Ordering::SeqCst);
            self.metrics.heartbeats_failed.inc();
        }
    }

    /// Records a processed hub message.
    pub fn message(&self, seq: i64) {
        self.last_message_seq.fetch_max(seq, Ordering::SeqCst);
        self.messages_received.fetch_add(1, Ordering::SeqCst);
        self.metrics.messages_received.inc();
    }

    /// Last processed message sequence number.
    pub fn last_message_seq(&self) -> i64 {
        self.last_message_seq.load(Ordering::SeqCst)
    }

    /// Marks the device revoked; the link stops.
    pub fn set_revoked(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    /// True once revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// A snapshot for the local API.
    pub fn snapshot(&self) -> AgentStatus {
        let last = self.last_heartbeat_ms.load(Ordering::SeqCst);
        let updates = self.updates().clone();
        AgentStatus {
            device_id: self.enrolment.device_id.clone(),
            name: self.enrolment.name.clone(),
            labels: self.enrolment.labels.clone(),
            hub_url: self.enrolment.hub_url.clone(),
            hub_connected: self.connected.load(Ordering::SeqCst),
            stream_connects: self.stream_connects.load(Ordering::SeqCst),
            heartbeats_ok: self.heartbeats_ok.load(Ordering::SeqCst),
            heartbeats_failed: self.heartbeats_failed.load(Ordering::SeqCst),
            last_heartbeat_at: (last > 0).then(|| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(last) * 1_000_000)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH)
            }),
            last_message_seq: self.last_message_seq(),
            messages_received: self.messages_received.load(Ordering::SeqCst),
            revoked: self.is_revoked(),
            uptime_secs: self.uptime_secs(),
            models: self.models.clone(),
            outbox: None,
            installed: updates.installed,
            update: updates.current,
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }
}
