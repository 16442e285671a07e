//! The agent's link to its hub: heartbeats and the event stream, both over
//! mutual TLS, both reconnecting with jittered exponential backoff.
//!
//! The link never gives up while the device is enrolled: a hub restart, a
//! network cut or a half-open connection (detected by the absence of the
//! hub's keep-alives) all end in a reconnect. Only a revocation stops it.

pub mod delivery;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use protocol::{DeviceMessage, DeviceMessageEnvelope, Heartbeat, HeartbeatAck};
use rand::Rng;

use crate::config::Config;
use crate::metrics::Status;
use crate::sse::SseDecoder;
use crate::state::State;
use crate::{Error, chain, refused};

/// The hub sends a keep-alive every 5 s; after this long without a byte the
/// connection is presumed dead.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Exponential backoff with full jitter (AWS architecture blog's "full
/// jitter"): the n-th delay is uniform in `[min, min(max, min·2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        if cap <= self.min {
            return self.min;
        }
        rand::rng().random_range(self.min..=cap)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The hub link of one agent.
#[derive(Debug, Clone)]
pub struct Link {
    client: reqwest::Client,
    base: String,
    status: Arc<Status>,
    state: State,
    config: Config,
    local_api: Option<String>,
    updater: Option<Arc<crate::updater::Updater>>,
    federated: Option<Arc<crate::federated::AgentData>>,
}

impl Link {
    /// A link for the enrolled device described by `status`.
    pub fn new(
        client: reqwest::Client,
        status: Arc<Status>,
        state: State,
        config: Config,
        local_api: Option<String>,
    ) -> Self {
        let e = status.enrolment();
        let base = format!("{}/v1/devices/{}", e.hub_url, e.device_id);
        Self {
            client,
            base,
            status,
            state,
            config,
            local_api,
            updater: None,
            federated: None,
        }
    }

    /// Takes part in federated rounds it is invited to, training on `data`.
    pub fn with_federated(mut self, data: Arc<crate::federated::AgentData>) -> Self {
        self.federated = Some(data);
        self
    }

    /// Hands `install` and `roll_back` messages to `updater`.
    pub fn with_updater(mut self, updater: Arc<crate::updater::Updater>) -> Self {
        self.updater = Some(updater);
        self
    }

    /// Sends one heartbeat.
    pub async fn heartbeat(&self) -> Result<HeartbeatAck, Error> {
        let beat = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.status.uptime_secs(),
            local_api: self.local_api.clone(),
            last_message_seq: Some(self.status.last_message_seq()),
        };
        let response = self
            .client
            .post(format!("{}/heartbeat", self.base))
            .timeout(self.config.request_timeout)
            .json(&beat)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(refused(response).await);
        }
        response.json().await.map_err(|e| self.unreachable(&e))
    }

    fn unreachable(&self, e: &reqwest::Error) -> Error {
        Error::Unreachable {
            url: self.status.enrolment().hub_url.clone(),
            reason: chain(e),
        }
    }

    /// Handles a refusal that means the device may no longer call the hub.
    fn check_revoked(&self, e: &Error) -> bool {
        if let Error::Refused { slug, .. } = e
            && (slug == "device-revoked" || slug == "unknown-certificate")
        {
            tracing::error!(error = %e, "hub refuses this device; stopping the hub link");
            self.status.set_revoked();
            return true;
        }
        false
    }

    /// Heartbeats until the device is revoked.
    pub async fn heartbeat_loop(self) {
        let mut interval = self.config.heartbeat_interval;
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        while !self.status.is_revoked() {
            match self.heartbeat().await {
                Ok(ack) => {
                    self.status.heartbeat(true);
                    backoff.reset();
                    interval = Duration::from_secs(ack.heartbeat_interval_secs.clamp(1, 3600));
                    tokio::time::sleep(interval).await;
                }
                Err(e) => {
                    self.status.heartbeat(false);
                    if self.check_revoked(&e) {
                        return;
                    }
                    tracing::warn!(error = %e, "heartbeat failed");
                    tokio::time::sleep(backoff.next_delay().min(interval)).await;
                }
            }
        }
    }

    /// Keeps the event stream open until the device is revoked.
    pub async fn stream_loop(self) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        while !self.status.is_revoked() {
            let result = self.stream_once(&mut backoff).await;
            self.status.set_connected(false);
            match result {
                Ok(()) => tracing::info!("hub closed the event stream"),
                Err(e) => {
                    if self.check_revoked(&e) {
                        return;
                    }
                    tracing::warn!(error = %e, "event stream failed");
                }
            }
            if self.status.is_revoked() {
                return;
            }
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the hub");
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream_once(&self, backoff: &mut Backoff) -> Result<(), Error> {
        let response = self
            .client
            .get(format!("{}/events", self.base))
            .header("accept", "text/event-stream")
            .header("last-event-id", self.status.last_message_seq().to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(refused(response).await);
        }
        let mut body = response.bytes_stream();
        let mut decoder = SseDecoder::default();
        loop {
            let chunk = match tokio::time::timeout(STREAM_IDLE_TIMEOUT, body.next()).await {
                Err(_) => {
                    return Err(Error::Unreachable {
                        url: self.status.enrolment().hub_url.clone(),
                        reason: format!("no keep-alive for {STREAM_IDLE_TIMEOUT:?}"),
                    });
                }
                Ok(None) => return Ok(()),
                Ok(Some(chunk)) => chunk.map_err(|e| self.unreachable(&e))?,
            };
            let events = decoder.push(&chunk).map_err(|e| Error::Unreachable {
                url: self.status.enrolment().hub_url.clone(),
                reason: e.to_string(),
            })?;
            for event in events {
                match event.event.as_str() {
                    "hello" => {
                        self.status.set_connected(true);
                        backoff.reset();
                        tracing::info!(data = %event.data, "event stream open");
                    }
                    "message" => {
                        let envelope: DeviceMessageEnvelope = serde_json::from_str(&event.data)?;
                        self.handle(envelope)?;
                        if self.status.is_revoked() {
                            return Ok(());
                        }
                    }
                    other => tracing::debug!(event = other, "ignoring unknown hub event"),
                }
            }
        }
    }

    fn handle(&self, envelope: DeviceMessageEnvelope) -> Result<(), Error> {
        // Updates are recorded durably (idempotently, per rollout) before
        // the message is marked processed, so a crash in between repeats
        // the recording rather than losing the update.
        if let Some(updater) = &self.updater {
            match &envelope.message {
                DeviceMessage::Install {
                    rollout_id,
                    model,
                    version,
                } => updater.install(rollout_id, model, *version)?,
                DeviceMessage::RollBack { rollout_id, .. } => updater.roll_back(rollout_id)?,
                _ => {}
            }
        }
        // Record first: a message is acted on once even if the hub redelivers
        // it after a reconnect.
        if !self.state.record_message(&envelope)? {
            return Ok(());
        }
        self.status.message(envelope.seq);
        match envelope.message {
            DeviceMessage::Ping { note } => {
                tracing::info!(seq = envelope.seq, %note, "ping from the hub");
            }
            DeviceMessage::Revoked => {
                tracing::error!("the hub revoked this device; stopping the hub link");
                self.status.set_revoked();
            }
            DeviceMessage::Install {
                rollout_id,
                model,
                version,
            } => {
                if self.updater.is_none() {
                    tracing::warn!(%rollout_id, %model, version, "an install message, but this agent runs no updater");
                }
            }
            DeviceMessage::RollBack { .. } => {}
            DeviceMessage::FlInvite { task_id, round } => match &self.federated {
                None => {
                    tracing::info!(%task_id, round, "federated invitation declined: this agent has no local training data configured");
                }
                Some(data) => {
                    // The round runs on its own, so that the stream keeps
                    // reading while the device trains.
                    let client = crate::federated::FlClient::new(
                        self.client.clone(),
                        self.status.enrolment().hub_url.clone(),
                    );
                    let data = Arc::clone(data);
                    tokio::spawn(async move {
                        let behaviour = crate::federated::Behaviour::default();
                        match crate::federated::take_part(
                            &client,
                            &task_id,
                            round,
                            data.as_ref(),
                            &behaviour,
                        )
                        .await
                        {
                            Ok(outcome) => {
                                tracing::info!(%task_id, round, ?outcome, "federated round");
                            }
                            Err(e) => {
                                tracing::warn!(%task_id, round, error = %e, "federated round failed on this device");
                            }
                        }
                    });
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(min, max);
        for attempt in 0..30u32 {
            let d = b.next_delay();
            let cap = min.saturating_mul(1 << attempt.min(20)).min(max);
            assert!(d >= min && d <= cap, "attempt {attempt}: {d:?}");
        }
        b.reset();
        assert_eq!(b.next_delay(), min);
    }
}
