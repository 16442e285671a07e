//! The federated-learning client: what a device does when the hub invites
//! it to a round.
//!
//! [`take_part`] fetches the round and the global model, evaluates the
//! model on the device's own data, trains on that data
//! ([`federated::model::train_local`]), clips the update when the task
//! asks, and sends only the update, either as it is or, with secure
//! aggregation, masked through the four phases of [`federated::secagg`]
//! (the hub passes the encrypted key shares on and learns only the sum).
//! The data never leaves the device.
//!
//! The agent calls it from its hub link on an `fl_invite` message; `strata
//! fl simulate` calls the same function for each of its virtual devices,
//! with a [`Behaviour`] that injects dropouts, stragglers and Byzantine
//! updates.

use std::sync::Arc;
use std::time::Duration;

mod agent_data;
pub use agent_data::AgentData;

use federated::model::{Dataset, ModelSpec};
use federated::secagg::{ClientSecrets, Roster};
use protocol::federated::{
    F32Vector, FlAdvertise, FlDataset, FlMasked, FlModel, FlPhase, FlRoundView, FlShares, FlUnmask,
    FlUpdate, U32Vector,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why taking part failed.
#[derive(Debug, thiserror::Error)]
pub enum FlError {
    /// The hub refused a call (a 4xx problem).
    #[error("the hub refused {what}: {status} {detail}")]
    Refused {
        /// The call.
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The problem's detail.
        detail: String,
    },
    /// The hub could not be reached, or kept failing, until the deadline.
    #[error("{what}: {reason}")]
    Unreachable {
        /// The call.
        what: &'static str,
        /// The last error.
        reason: String,
    },
    /// Training or masking failed.
    #[error(transparent)]
    Federated(#[from] federated::Error),
}

/// What became of an invitation.
#[derive(Debug, Clone, PartialEq)]
pub enum Participation {
    /// The device was not selected for the round.
    NotSelected,
    /// The round (or the device's part in it) was over before it could
    /// contribute.
    Closed,
    /// The device has no local data for the task's data set.
    NoData,
    /// The device stopped at a phase on purpose (the simulator's dropouts).
    Dropped(FlPhase),
    /// The device sent its update (plain, or masked and unmasked).
    Contributed {
        /// Local examples trained on.
        examples: usize,
        /// Norm of the update before clipping.
        update_norm: f32,
    },
}

/// A Byzantine transformation of the honest update: `(global, honest
/// delta) -> delta to send`.
pub type Tamper = dyn Fn(&[f32], Vec<f32>) -> Vec<f32> + Send + Sync;

/// How a device behaves in a round. The agent is always honest and
/// prompt; the simulator sets the rest.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Leave the round instead of sending this phase's message.
    pub drop_at: Option<FlPhase>,
    /// Wait this long after training before sending (a straggler).
    pub delay: Duration,
    /// Replace the honest update.
    pub tamper: Option<Arc<Tamper>>,
    /// Seed for local shuffling (default: drawn at random).
    pub seed: Option<u64>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("drop_at", &self.drop_at)
            .field("delay", &self.delay)
            .field("tamper", &self.tamper.is_some())
            .finish()
    }
}

/// The device's local data sets, by the name tasks use.
pub trait LocalData: Send + Sync {
    /// The examples for `dataset`, shaped for `model` and labelled by their
    /// index in `labels`, if the device has them.
    fn dataset(
        &self,
        dataset: FlDataset,
        model: &ModelSpec,
        labels: &[String],
    ) -> Option<Arc<Dataset>>;
}

/// A device's connection to the hub's federated endpoints (mutual TLS).
#[derive(Debug, Clone)]
pub struct FlClient {
    http: reqwest::Client,
    hub: String,
}

impl FlClient {
    /// A client for the hub at `hub` (`https://…`) over `http`, which
    /// presents the device's certificate.
    pub fn new(http: reqwest::Client, hub: impl Into<String>) -> Self {
        FlClient {
            http,
            hub: hub.into().trim_end_matches('/').to_owned(),
        }
    }

    fn url(&self, task: &str, round: u32, tail: &str) -> String {
        format!("{}/v1/fl/tasks/{task}/rounds/{round}{tail}", self.hub)
    }

    /// Sends one request, retrying transport errors and 5xx answers with
    /// backoff until `deadline`; a 4xx answer is final.
    async fn call<T: DeserializeOwned>(
        &self,
        what: &'static str,
        deadline: tokio::time::Instant,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Option<T>, FlError> {
        let mut delay = Duration::from_millis(100);
        loop {
            let reason = match request().send().await {
                Ok(r) if r.status().is_success() => {
                    if r.status() == reqwest::StatusCode::ACCEPTED {
                        return Ok(None);
                    }
                    match r.json::<T>().await {
                        Ok(v) => return Ok(Some(v)),
                        Err(e) => e.to_string(),
                    }
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status().as_u16();
                    let detail = r
                        .json::<protocol::Problem>()
                        .await
                        .map(|p| p.detail)
                        .unwrap_or_default();
                    return Err(FlError::Refused {
                        what,
                        status,
                        detail,
                    });
                }
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            let now = tokio::time::Instant::now();
            if now + delay > deadline {
                return Err(FlError::Unreachable { what, reason });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        what: &'static str,
        url: String,
        deadline: tokio::time::Instant,
    ) -> Result<T, FlError> {
        self.call(what, deadline, || self.http.get(&url))
            .await?
            .ok_or(FlError::Unreachable {
                what,
                reason: "no body".to_owned(),
            })
    }

    async fn post<B: Serialize>(
        &self,
        what: &'static str,
        url: String,
        body: &B,
        deadline: tokio::time::Instant,
    ) -> Result<(), FlError> {
        self.call::<serde_json::Value>(what, deadline, || self.http.post(&url).json(body))
            .await
            .map(|_| ())
    }

    /// The round as this device sees it; with `wait_past`, waits (long
    /// poll, repeated until `deadline`) for the round to leave that phase.
    async fn view(
        &self,
        task: &str,
        round: u32,
        wait_past: Option<FlPhase>,
        deadline: tokio::time::Instant,
    ) -> Result<FlRoundView, FlError> {
        let tail = match wait_past {
            Some(p) => format!(
                "?wait_past={}",
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        loop {
            let v: FlRoundView = self
                .get("the round", self.url(task, round, &tail), deadline)
                .await?;
            if wait_past.is_none_or(|p| v.phase != p) || tokio::time::Instant::now() >= deadline {
                return Ok(v);
            }
        }
    }
}

/// How long a device keeps trying to reach the hub within one phase, past
/// the phase's own deadline (clock skew, a hub restarting).
const GRACE: Duration = Duration::from_secs(30);

fn deadline_of(view: &FlRoundView) -> tokio::time::Instant {
    let left = view.phase_deadline - time::OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or_default();
    tokio::time::Instant::now() + left + GRACE
}

/// Takes part in round `round` of task `task`: everything a device does
/// between an invitation and its last message of the round.
pub async fn take_part(
    client: &FlClient,
    task: &str,
    round: u32,
    data: &dyn LocalData,
    behaviour: &Behaviour,
) -> Result<Participation, FlError> {
    let start = tokio::time::Instant::now() + GRACE;
    let view = client.view(task, round, None, start).await?;
    if view.phase == FlPhase::Closed {
        return Ok(Participation::Closed);
    }
    if !view.selected {
        return Ok(Participation::NotSelected);
    }
    let Some(dataset) = data.dataset(view.dataset, &view.model, &view.labels) else {
        tracing::info!(%task, round, dataset = view.dataset.as_str(), "no local data for the task");
        return Ok(Participation::NoData);
    };
    let deadline = deadline_of(&view);
    let model: FlModel = match client
        .get(
            "the global model",
            client.url(task, round, "/model"),
            deadline,
        )
        .await
    {
        Ok(m) => m,
        Err(FlError::Refused { status: 409, .. }) => return Ok(Participation::Closed),
        Err(e) => return Err(e),
    };
    let global = model.params.0;
    let spec = view.model.clone();
    let local = view.local;
    let seed = behaviour.seed.unwrap_or_else(rand::random);
    let train_data = Arc::clone(&dataset);
    let trained_from = global.clone();
    let (evaluation, update) = tokio::task::spawn_blocking(move || {
        let evaluation = spec.evaluate(&trained_from, &train_data)?;
        let update =
            federated::model::train_local(&spec, &trained_from, &train_data, &local, seed)?;
        Ok::<_, federated::Error>((evaluation, update))
    })
    .await
    .map_err(|e| FlError::Unreachable {
        what: "local training",
        reason: e.to_string(),
    })??;
    let examples = update.examples;
    let mut delta = update.delta;
    if let Some(tamper) = &behaviour.tamper {
        delta = tamper(&global, delta);
    }
    let update_norm = federated::screen::l2_norm(&delta);
    if let Some(clip) = view.clip_norm {
        federated::screen::clip_to_norm(&mut delta, clip);
    }
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let contributed = Participation::Contributed {
        examples,
        update_norm,
    };
    let Some(params) = view.secagg else {
        if behaviour.drop_at == Some(FlPhase::Train) {
            return Ok(Participation::Dropped(FlPhase::Train));
        }
        let body = FlUpdate {
            delta: F32Vector(delta),
            examples: examples as u32,
            evaluation,
        };
        client
            .post(
                "the update",
                client.url(task, round, "/update"),
                &body,
                deadline,
            )
            .await?;
        return Ok(contributed);
    };

    // Secure aggregation, phase 0: advertise this round's keys.
    if behaviour.drop_at == Some(FlPhase::Advertise) {
        return Ok(Participation::Dropped(FlPhase::Advertise));
    }
    let secrets = ClientSecrets::generate(&mut rand::rng());
    let body = FlAdvertise {
        keys: secrets.public_keys(),
    };
    client
        .post(
            "the keys",
            client.url(task, round, "/advertise"),
            &body,
            deadline,
        )
        .await?;

    // Phase 1: the roster is fixed; share the seeds with this device's
    // holders.
    let view = client
        .view(task, round, Some(FlPhase::Advertise), deadline)
        .await?;
    let roster_entries = match (view.phase, &view.roster) {
        (FlPhase::Share, Some(r)) => r.clone(),
        _ => return Ok(Participation::Closed),
    };
    let Some(me) = roster_entries
        .iter()
        .position(|e| e.keys == secrets.public_keys())
    else {
        return Ok(Participation::Closed);
    };
    let context = format!("strata-fl/{task}/{round}").into_bytes();
    let keys = roster_entries.iter().map(|e| e.keys).collect();
    // The view that carries the roster carries the settings the hub fixed
    // with it (the neighbourhood size among them).
    let params = view.secagg.unwrap_or(params);
    let roster = Roster::new(&params, &context, keys)?;
    if behaviour.drop_at == Some(FlPhase::Share) {
        return Ok(Participation::Dropped(FlPhase::Share));
    }
    let shares = federated::secagg::share_keys(&secrets, &roster, me, &mut rand::rng())?;
    let deadline = deadline_of(&view);
    client
        .post(
            "the shares",
            client.url(task, round, "/shares"),
            &FlShares { shares },
            deadline,
        )
        .await?;

    // Phase 2: mask the update with the delivered holders' seeds.
    let view = client
        .view(task, round, Some(FlPhase::Share), deadline)
        .await?;
    let (FlPhase::Masked, Some(u2)) = (view.phase, view.u2.clone()) else {
        return Ok(Participation::Closed);
    };
    let u2: Vec<usize> = u2.into_iter().map(|i| i as usize).collect();
    let deadline = deadline_of(&view);
    let received: FlShares = client
        .get("the shares", client.url(task, round, "/shares"), deadline)
        .await?;
    if behaviour.drop_at == Some(FlPhase::Masked) {
        return Ok(Participation::Dropped(FlPhase::Masked));
    }
    let dim = view.model.num_params();
    let masked = federated::secagg::mask_input(&secrets, &roster, me, &u2, &delta, dim)?;
    client
        .post(
            "the masked update",
            client.url(task, round, "/masked"),
            &FlMasked {
                masked: U32Vector(masked),
                evaluation,
            },
            deadline,
        )
        .await?;

    // Phase 3: reveal what lets the hub remove the masks, and nothing more.
    let view = client
        .view(task, round, Some(FlPhase::Masked), deadline)
        .await?;
    let (FlPhase::Unmask, Some(u3)) = (view.phase, view.u3.clone()) else {
        return Ok(Participation::Closed);
    };
    if behaviour.drop_at == Some(FlPhase::Unmask) {
        return Ok(Participation::Dropped(FlPhase::Unmask));
    }
    let u3: Vec<usize> = u3.into_iter().map(|i| i as usize).collect();
    let revealed = federated::secagg::unmask(&secrets, &roster, me, &u2, &u3, &received.shares)?;
    let deadline = deadline_of(&view);
    client
        .post(
            "the revealed shares",
            client.url(task, round, "/unmask"),
            &FlUnmask { revealed },
            deadline,
        )
        .await?;
    Ok(contributed)
}
