//! The agent's Prometheus metrics and live status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
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
        };
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
        }
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
        }
    }
}
