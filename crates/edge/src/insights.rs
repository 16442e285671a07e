//! Insights: what the device derives from what it serves, kept in a durable
//! outbox until the hub has them.
//!
//! Producers: the inference API reports every classified intent, every
//! scored sensor reading and every request's latency here; applications on
//! the device add their own insights with `POST /v1/insights`. Intents and
//! model health are counted over fixed windows (`[insights] window_secs`)
//! and become one insight per intent and per model when a window closes;
//! an anomaly score at or above the threshold becomes an alert at once,
//! with a short summary of its context. Raw inputs never leave the device:
//! the status reports how many raw bytes were processed per byte sent.
//!
//! An insight is appended to the outbox (crash-safe, group-committed) with
//! every field but its key; the key is `<outbox id>-<sequence>`, and the
//! text sent to the hub is rendered from the stored bytes and the key by
//! [`render`], the same way every time, so the hub stores exactly the text
//! the producer was told about.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::{NewRecord, Outbox, Priority};
use protocol::insight::{Insight, InsightPriority};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{Error, io_err};

/// An insight before it has a key: what producers make and the outbox keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Draft {
    /// See [`Insight::kind`].
    pub kind: String,
    /// See [`Insight::series`].
    pub series: String,
    /// See [`Insight::priority`].
    pub priority: InsightPriority,
    /// See [`Insight::start_ms`].
    pub start_ms: i64,
    /// See [`Insight::window_ms`].
    #[serde(default)]
    pub window_ms: i64,
    /// See [`Insight::value`].
    pub value: f64,
    /// See [`Insight::summary`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// See [`Insight::attributes`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, f64>,
}

impl Draft {
    fn with_key(self, key: String) -> Insight {
        Insight {
            key,
            kind: self.kind,
            series: self.series,
            priority: self.priority,
            start_ms: self.start_ms,
            window_ms: self.window_ms,
            value: self.value,
            summary: self.summary,
            attributes: self.attributes,
        }
    }
}

/// The key of the insight stored as sequence `seq` of outbox `outbox_id`.
pub fn key(outbox_id: &str, seq: u64) -> String {
    format!("{outbox_id}-{seq}")
}

/// The exact JSON text the hub receives for a stored draft.
pub fn render(outbox_id: &str, seq: u64, payload: &[u8]) -> Result<String, String> {
    let draft: Draft =
        serde_json::from_slice(payload).map_err(|e| format!("stored insight {seq}: {e}"))?;
    serde_json::to_string(&draft.with_key(key(outbox_id, seq)))
        .map_err(|e| format!("stored insight {seq}: {e}"))
}

fn outbox_priority(p: InsightPriority) -> Priority {
    match p {
        InsightPriority::Alert => Priority::Alert,
        InsightPriority::Insight => Priority::Insight,
        InsightPriority::Telemetry => Priority::Telemetry,
    }
}

/// Unix time in ms.
pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Counts of one window, per model.
#[derive(Debug, Default)]
struct ModelWindow {
    requests: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
}

/// What the producers have counted in the current window.
#[derive(Debug)]
struct Window {
    start_ms: i64,
    intents: BTreeMap<String, u64>,
    models: BTreeMap<String, ModelWindow>,
}

/// The device's insights: producers, outbox and counters.
pub struct Insights {
    outbox: Outbox,
    outbox_id: String,
    window_ms: i64,
    anomaly_threshold: f64,
    window: Mutex<Window>,
    /// Woken when something was appended.
    pub(crate) appended: Notify,
    raw_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
}

impl std::fmt::Debug for Insights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insights")
            .field("outbox_id", &self.outbox_id)
            .finish_non_exhaustive()
    }
}

/// What `POST /v1/insights` answers: the insight is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Its key at the hub.
    pub key: String,
    /// Its sequence number in the outbox.
    pub seq: u64,
    /// The exact JSON text the hub will store.
    pub raw: String,
}

impl Insights {
    /// Opens the outbox in `dir` (creating it and its id on first use).
    pub fn open(
        dir: &Path,
        budget_bytes: u64,
        window: Duration,
        anomaly_threshold: f64,
    ) -> Result<Insights, Error> {
        durable::create_private_dir(dir).map_err(io_err(dir))?;
        // The outbox id makes keys unique across outbox lifetimes: a device
        // whose outbox is wiped starts again at sequence 1 under a new id,
        // and the hub does not mistake its new insights for old ones.
        let id_file = dir.join("outbox-id");
        let outbox_id = match std::fs::read_to_string(&id_file) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
            _ => {
                let id = format!("{:016x}", rand::random::<u64>());
                durable::write_atomic(&id_file, format!("{id}\n").as_bytes(), durable::PUBLIC)
                    .map_err(io_err(&id_file))?;
                id
            }
        };
        let mut config = outbox::Config::new(dir.join("log"));
        config.budget_bytes = budget_bytes;
        let outbox = Outbox::open(config).map_err(|e| Error::Outbox(e.to_string()))?;
        let window_ms = window.as_millis().max(1) as i64;
        let now = now_ms();
        Ok(Insights {
            outbox,
            outbox_id,
            window_ms,
            anomaly_threshold,
            window: Mutex::new(Window {
                start_ms: now - now.rem_euclid(window_ms),
                intents: BTreeMap::new(),
                models: BTreeMap::new(),
            }),
            appended: Notify::new(),
            raw_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// The id that prefixes this outbox's keys.
    pub fn outbox_id(&self) -> &str {
        &self.outbox_id
    }

    /// The outbox.
    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Appends drafts durably (blocking: call off the async executor).
    /// Returns once they are on disk.
    pub fn append_blocking(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, Error> {
        if drafts.is_empty() {
            return Ok(Vec::new());
        }
        let mut records = Vec::with_capacity(drafts.len());
        let mut payloads = Vec::with_capacity(drafts.len());
        for d in &drafts {
            d.clone()
                .with_key(key(&self.outbox_id, 1))
                .validate()
                .map_err(Error::InvalidInsight)?;
            let payload =
                serde_json::to_vec(d).map_err(|e| Error::InvalidInsight(e.to_string()))?;
            records.push(NewRecord::new(
                outbox_priority(d.priority),
                u64::try_from(d.start_ms).unwrap_or(0),
                payload.clone(),
            ));
            payloads.push(payload);
        }
        let outcomes = self
            .outbox
            .append_batch(records)
            .map_err(|e| Error::Outbox(e.to_string()))?;
        self.appended.notify_one();
        let mut stored = Vec::with_capacity(outcomes.len());
        let mut refused = Vec::new();
        for (i, (outcome, payload)) in outcomes.into_iter().zip(payloads).enumerate() {
            match outcome {
                Ok(seq) => {
                    let raw = render(&self.outbox_id, seq, &payload).map_err(Error::Outbox)?;
                    stored.push(Appended {
                        key: key(&self.outbox_id, seq),
                        seq,
                        raw,
                    });
                }
                Err(e) => refused.push(format!("insight {i}: {e}")),
            }
        }
        if !refused.is_empty() {
            return Err(Error::OutboxFull {
                refused,
                stored: stored.into_iter().map(|a| a.key).collect(),
            });
        }
        Ok(stored)
    }

    /// Appends drafts from async code.
    pub async fn append(self: &Arc<Self>, drafts: Vec<Draft>) -> Result<Vec<Appended>, Error> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.append_blocking(drafts))
            .await
            .map_err(|e| Error::Outbox(format!("append task failed: {e}")))?
    }

    /// Counts raw input bytes the device processed (request bodies).
    pub fn observe_raw(&self, bytes: u64) {
        self.raw_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts an intent the classifier assigned.
    pub fn observe_intent(&self, label: &str) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        *w.intents.entry(label.to_owned()).or_default() += 1;
    }

    /// Counts a request to a model: its latency and whether it failed.
    pub fn observe_request(&self, model: &str, latency_ms: f64, failed: bool) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let m = w.models.entry(model.to_owned()).or_default();
        m.requests += 1;
        m.errors += u64::from(failed);
        if m.latencies_ms.len() < 100_000 {
            m.latencies_ms.push(latency_ms);
        }
    }

    /// The alert for scored readings, if any score reaches the threshold:
    /// one alert per request, summarising the worst reading and its context.
    pub fn anomaly_alert(
        &self,
        model: &str,
        readings: &[Vec<f64>],
        scores: &[f64],
    ) -> Option<Draft> {
        let (worst, &score) = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))?;
        if score < self.anomaly_threshold {
            return None;
        }
        let flagged = scores
            .iter()
            .filter(|&&s| s >= self.anomaly_threshold)
            .count();
        let reading = readings.get(worst)?;
        let mut attributes = BTreeMap::new();
        for (i, v) in reading.iter().enumerate().take(16) {
            attributes.insert(format!("x{i}"), *v);
        }
        attributes.insert("flagged".into(), flagged as f64);
        attributes.insert("readings".into(), scores.len() as f64);
        let shown: Vec<String> = reading.iter().take(6).map(|v| format!("{v:.3}")).collect();
        Some(Draft {
            kind: "anomaly".into(),
            series: model.to_owned(),
            priority: InsightPriority::Alert,
            start_ms: now_ms(),
            window_ms: 0,
            value: score,
            summary: Some(format!(
                "{flagged} of {} readings scored at or above {:.2}; worst {score:.3} at reading {worst} [{}{}]",
                scores.len(),
                self.anomaly_threshold,
                shown.join(", "),
                if reading.len() > 6 { ", …" } else { "" }
            )),
            attributes,
        })
    }

    /// Closes the current window if it has ended by `now_ms` and returns its
    /// insights: one `intent_count` per intent seen, and per model one
    /// `model_health` insight for each of requests, errors and p95 latency.
    pub fn close_window(&self, now_ms: i64) -> Vec<Draft> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms < w.start_ms + self.window_ms {
            return Vec::new();
        }
        let start_ms = w.start_ms;
        let window_ms = self.window_ms;
        let intents = std::mem::take(&mut w.intents);
        let models = std::mem::take(&mut w.models);
        w.start_ms = now_ms - now_ms.rem_euclid(window_ms);
        drop(w);
        let draft = |kind: &str, series: String, priority, value: f64| Draft {
            kind: kind.into(),
            series,
            priority,
            start_ms,
            window_ms,
            value,
            summary: None,
            attributes: BTreeMap::new(),
        };
        let mut out = Vec::new();
        for (label, n) in intents {
            out.push(draft(
                "intent_count",
                label,
                InsightPriority::Insight,
                n as f64,
            ));
        }
        for (model, mut m) in models {
            out.push(draft(
                "model_requests",
                model.clone(),
                InsightPriority::Telemetry,
                m.requests as f64,
            ));
            out.push(draft(
                "model_errors",
                model.clone(),
                InsightPriority::Telemetry,
                m.errors as f64,
            ));
            if !m.latencies_ms.is_empty() {
                m.latencies_ms.sort_by(f64::total_cmp);
                let i = ((m.latencies_ms.len() as f64) * 0.95).ceil() as usize;
                let p95 = m.latencies_ms[i.clamp(1, m.latencies_ms.len()) - 1];
                out.push(draft(
                    "model_latency_p95_ms",
                    model,
                    InsightPriority::Telemetry,
                    p95,
                ));
            }
        }
        out
    }

    /// Records a delivered batch.
    pub(crate) fn delivered(&self, insights: u64, bytes: u64) {
        self.delivered.fetch_add(insights, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records an insight the hub refused as malformed (dropped, counted).
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot for the status API and metrics.
    pub fn snapshot(&self) -> protocol::OutboxStatus {
        let s = self.outbox.stats();
        protocol::OutboxStatus {
            outbox_id: self.outbox_id.clone(),
            pending: s.pending_records.total(),
            pending_bytes: s.pending_bytes.total(),
            budget_bytes: s.budget_bytes,
            appended: s.appended,
            acked: s.acked,
            evicted: s.evicted.total(),
            evicted_by_priority: s
                .evicted
                .iter()
                .map(|(p, n)| (p.as_str().to_owned(), *n))
                .collect(),
            refused: s.refused.total(),
            quarantined_frames: s.quarantined_frames,
            delivered: self.delivered.load(Ordering::Relaxed),
            rejected_by_hub: self.rejected.load(Ordering::Relaxed),
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Feeds what the inference API serves into the insights: request health,
/// raw bytes, classified intents and anomaly alerts.
#[derive(Debug, Clone)]
pub struct InsightObserver(pub Arc<Insights>);

impl serving::Observer for InsightObserver {
    fn request(&self, model: &str, ms: f64, failed: bool) {
        self.0.observe_request(model, ms, failed);
    }

    fn raw_bytes(&self, bytes: u64) {
        self.0.observe_raw(bytes);
    }

    fn intent(&self, label: &str) {
        self.0.observe_intent(label);
    }

    fn anomalies<'a>(
        &'a self,
        model: &'a str,
        readings: &'a [Vec<f64>],
        scores: &'a [f64],
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(alert) = self.0.anomaly_alert(model, readings, scores) {
                // The alert is on disk before the caller hears of the scores.
                if let Err(e) = self.0.append(vec![alert]).await {
                    tracing::error!(error = %e, "cannot store an anomaly alert");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Insights {
        Insights::open(dir, 1 << 20, Duration::from_secs(60), 0.9).unwrap()
    }

    #[test]
    fn appended_insights_render_the_same_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let insights = open(dir.path());
        let draft = Draft {
            kind: "intent_count".into(),
            series: "HassTurnOn".into(),
            priority: InsightPriority::Insight,
            start_ms: 1_790_000_000_000,
            window_ms: 60_000,
            value: 4.0,
            summary: None,
            attributes: BTreeMap::new(),
        };
        let appended = insights.append_blocking(vec![draft]).unwrap();
        let id = insights.outbox_id().to_owned();
        drop(insights);
        let again = open(dir.path());
        assert_eq!(again.outbox_id(), id, "the outbox id is kept");
        let pending = again.outbox().pending(10, 1 << 20).unwrap();
        assert_eq!(pending.len(), 1);
        let raw = render(&id, pending[0].seq, &pending[0].payload).unwrap();
        assert_eq!(raw, appended[0].raw);
        let parsed: Insight = serde_json::from_str(&raw).unwrap();
        assert_eq!(parsed.key, appended[0].key);
    }

    #[test]
    fn invalid_drafts_are_refused_before_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let insights = open(dir.path());
        let bad = Draft {
            kind: "bad kind".into(),
            series: "s".into(),
            priority: InsightPriority::Insight,
            start_ms: 0,
            window_ms: 0,
            value: 1.0,
            summary: None,
            attributes: BTreeMap::new(),
        };
        assert!(insights.append_blocking(vec![bad]).is_err());
        assert_eq!(insights.snapshot().appended, 0);
    }

    #[test]
    fn windows_close_into_counts_and_health() {
        let dir = tempfile::tempdir().unwrap();
        let insights = open(dir.path());
        for label in ["HassTurnOn", "HassTurnOn", "HassTurnOff"] {
            insights.observe_intent(label);
        }
        for ms in [10.0, 20.0, 30.0] {
            insights.observe_request("intents", ms, false);
        }
        insights.observe_request("intents", 5.0, true);
        let start = insights.window.lock().unwrap().start_ms;
        assert!(
            insights.close_window(start + 1).is_empty(),
            "window still open"
        );
        let out = insights.close_window(start + 60_000);
        let find = |kind: &str, series: &str| {
            out.iter()
                .find(|d| d.kind == kind && d.series == series)
                .map(|d| d.value)
        };
        assert_eq!(find("intent_count", "HassTurnOn"), Some(2.0));
        assert_eq!(find("intent_count", "HassTurnOff"), Some(1.0));
        assert_eq!(find("model_requests", "intents"), Some(4.0));
        assert_eq!(find("model_errors", "intents"), Some(1.0));
        assert_eq!(find("model_latency_p95_ms", "intents"), Some(30.0));
        assert!(
            out.iter()
                .all(|d| d.start_ms == start && d.window_ms == 60_000)
        );
        assert!(
            insights.close_window(start + 60_001).is_empty(),
            "counts were taken"
        );
    }

    #[test]
    fn anomaly_alerts_only_past_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let insights = open(dir.path());
        let readings = vec![vec![1.0, 2.0], vec![9.0, 9.5]];
        assert!(
            insights
                .anomaly_alert("sensors", &readings, &[0.2, 0.5])
                .is_none()
        );
        let alert = insights
            .anomaly_alert("sensors", &readings, &[0.2, 0.95])
            .unwrap();
        assert_eq!(alert.priority, InsightPriority::Alert);
        assert_eq!(alert.value, 0.95);
        assert_eq!(alert.attributes["x1"], 9.5);
        assert!(alert.summary.unwrap().contains("1 of 2 readings"));
    }
}
