//! The federated-learning coordinator: the operator's task API, the device
//! endpoints of a round, and the controller that moves every round through
//! its phases.
//!
//! A round without secure aggregation has one phase, `train`: the selected
//! devices (the round's target plus an over-selection margin, drawn from
//! the eligible devices) are invited over their event streams, fetch the
//! global model, train on their own data and send their updates; the round
//! closes when the target is reached, or at its deadline with at least
//! `min_clients` updates (otherwise it fails and the next round starts). The
//! updates are screened, clipped and noised as the task says and combined
//! by its strategy ([`federated::strategy`]).
//!
//! With secure aggregation the round has the four phases of Bonawitz et al.
//! (`advertise`, `share`, `masked`, `unmask`, see [`federated::secagg`]),
//! each with its own deadline; the hub passes the encrypted shares on and
//! learns only the sum of the masked updates.
//!
//! Everything the controller decides is written to the store before it is
//! acted on, and every submission is stored before it is counted, so a hub
//! killed in any phase resumes the round from the store. Submissions that
//! do not fit (wrong shape, a device that was not selected, after the
//! deadline, for an earlier round, twice) are refused with a problem body
//! and counted by reason, and the round goes on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use federated::dp::RdpAccountant;
use federated::model::{Evaluation, LocalTraining};
use federated::secagg::{EncryptedShare, PublicKeys, RevealedShare};
use federated::strategy::Strategy;
use protocol::DeviceId;
use protocol::federated::{
    CreateFlTask, F32Vector, FlAdvertise, FlMasked, FlModel, FlPhase, FlRosterEntry,
    FlRoundSummary, FlRoundView, FlShares, FlTask, FlTaskList, FlTaskState, FlUnmask, FlUpdate,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use web::{ApiError, Json};

use crate::api::{AppState, DeviceAuth, OperatorAuth};
use crate::metrics::FlLabels;
use crate::store::{FlRoundRecord, FlTaskRecord, Stored};

/// Rounds in a row that may fail before the task fails.
const MAX_FAILED_ROUNDS: u32 = 3;
/// Longest a device's round view may wait for the next phase.
const LONG_POLL: Duration = Duration::from_secs(20);
/// Largest request body of the federated routes that carry vectors (a task
/// with its held-out set, an update, a masked update).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Most parameters a task's model may have.
const MAX_PARAMS: usize = 4 << 20;
/// Most examples in a task's held-out set.
const MAX_HELD_OUT: usize = 200_000;

/// The coordinator's live state: every task, and its open round. The store
/// holds the same facts; this is what handlers check submissions against.
#[derive(Debug)]
pub struct Coordinator {
    tasks: Mutex<HashMap<String, TaskRt>>,
    wake: Notify,
    /// Bumped on every phase change; long-polling devices wait on it.
    changed: watch::Sender<u64>,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            tasks: Mutex::default(),
            wake: Notify::new(),
            changed: watch::channel(0).0,
        }
    }
}

#[derive(Debug, Clone)]
struct TaskRt {
    rec: FlTaskRecord,
    round: Option<RoundRt>,
    failed_in_row: u32,
    /// Why no round is running, when the task waits (e.g. too few devices).
    waiting: Option<String>,
    /// The current global model on the held-out set, if the task has one.
    evaluation: Option<Evaluation>,
}

#[derive(Debug, Clone)]
struct RoundRt {
    rec: FlRoundRecord,
    selected: HashSet<DeviceId>,
    /// Secure aggregation: the roster and each member's index.
    roster: Vec<FlRosterEntry>,
    index_of: HashMap<DeviceId, u32>,
    /// Who submitted what (kind → devices).
    submitted: HashMap<&'static str, HashSet<DeviceId>>,
    refused: BTreeMap<String, u32>,
    /// Set while the controller aggregates, so that late submissions are
    /// refused.
    closing: bool,
}

impl RoundRt {
    fn count(&self, kind: &str) -> usize {
        self.submitted.get(kind).map_or(0, HashSet::len)
    }

    fn refused_json(&self) -> String {
        serde_json::to_string(&self.refused).unwrap_or_else(|_| "{}".to_owned())
    }
}

fn now_ms() -> i64 {
    crate::store::to_ms(OffsetDateTime::now_utc())
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn deadline_ms(spec: &CreateFlTask) -> i64 {
    spec.round_deadline_secs.unwrap_or(60) as i64 * 1000
}

fn invite_count(spec: &CreateFlTask) -> usize {
    let extra = spec.over_selection.unwrap_or(0.0);
    ((f64::from(spec.clients_per_round) * (1.0 + extra)).ceil() as usize).max(1)
}

fn min_clients(spec: &CreateFlTask) -> usize {
    spec.min_clients.unwrap_or(1) as usize
}

/// The round context bound into every secure-aggregation key and message.
fn secagg_context(task_id: &str, round: u32) -> Vec<u8> {
    format!("strata-fl/{task_id}/{round}").into_bytes()
}

/// Checks a task spec and fills in its defaults.
pub fn validate(mut spec: CreateFlTask) -> Result<CreateFlTask, ApiError> {
    let bad = |detail: String| ApiError::bad_request("invalid-fl-task", detail);
    if spec.name.is_empty()
        || spec.name.len() > 64
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad(
            "name must be 1 to 64 letters, digits, '-' or '_'".to_owned()
        ));
    }
    spec.model.validate().map_err(|e| bad(e.to_string()))?;
    if spec.model.num_params() > MAX_PARAMS {
        return Err(bad(format!(
            "the model has {} parameters, at most {MAX_PARAMS} are supported",
            spec.model.num_params()
        )));
    }
    if let Some(h) = &spec.held_out {
        let inputs = spec.model.inputs;
        if h.labels.is_empty() || h.labels.len() > MAX_HELD_OUT {
            return Err(bad(format!(
                "held_out needs 1 to {MAX_HELD_OUT} examples, it has {}",
                h.labels.len()
            )));
        }
        if h.features.0.len() != h.labels.len() * inputs {
            return Err(bad(format!(
                "held_out has {} feature values for {} examples of {inputs} inputs",
                h.features.0.len(),
                h.labels.len()
            )));
        }
        if h.features.0.iter().any(|v| !v.is_finite()) {
            return Err(bad("held_out features must be finite".to_owned()));
        }
        if let Some(l) = h.labels.iter().find(|&&l| l as usize >= spec.model.classes) {
            return Err(bad(format!(
                "held_out label {l} is not below the model's {} classes",
                spec.model.classes
            )));
        }
    }
    if spec.labels.len() != spec.model.classes {
        return Err(bad(format!(
            "labels has {} names, the model has {} classes",
            spec.labels.len(),
            spec.model.classes
        )));
    }
    spec.strategy.validate().map_err(|e| bad(e.to_string()))?;
    if !(1..=10_000).contains(&spec.rounds) {
        return Err(bad("rounds must be between 1 and 10000".to_owned()));
    }
    if !(1..=100_000).contains(&spec.clients_per_round) {
        return Err(bad(
            "clients_per_round must be between 1 and 100000".to_owned()
        ));
    }
    let over = spec.over_selection.unwrap_or(0.3);
    if !(0.0..=3.0).contains(&over) {
        return Err(bad("over_selection must be between 0 and 3".to_owned()));
    }
    spec.over_selection = Some(over);
    // A round of fewer updates than the strategy needs could not be
    // aggregated.
    let needed = spec.strategy.min_updates();
    if needed > spec.clients_per_round as usize {
        return Err(bad(format!(
            "{} as configured needs at least {needed} updates per round; clients_per_round is {}",
            spec.strategy.name(),
            spec.clients_per_round
        )));
    }
    let floor = if spec.secagg.is_some() { 3 } else { 1 }.max(needed as u32);
    let min = spec
        .min_clients
        .unwrap_or((spec.clients_per_round / 2).max(floor));
    if min < floor || min > spec.clients_per_round {
        return Err(bad(format!(
            "min_clients must be between {floor} and clients_per_round ({})",
            spec.clients_per_round
        )));
    }
    spec.min_clients = Some(min);
    let deadline = spec.round_deadline_secs.unwrap_or(60);
    if !(1..=86_400).contains(&deadline) {
        return Err(bad(
            "round_deadline_secs must be between 1 and 86400".to_owned()
        ));
    }
    spec.round_deadline_secs = Some(deadline);
    let step = spec.server_learning_rate.unwrap_or(1.0);
    if !(step.is_finite() && step > 0.0 && step <= 100.0) {
        return Err(bad(format!(
            "server_learning_rate must be above 0 and at most 100, got {step}"
        )));
    }
    spec.server_learning_rate = Some(step);
    let local = spec.local.unwrap_or_default();
    if local.epochs == 0
        || local.batch_size == 0
        || !(local.learning_rate.is_finite() && local.learning_rate > 0.0)
        || !(local.proximal_mu.is_finite() && local.proximal_mu >= 0.0)
    {
        return Err(bad(
            "local training needs epochs, batch_size and learning_rate above 0 and proximal_mu of 0 or more"
                .to_owned(),
        ));
    }
    if let Strategy::FedProx { mu } = spec.strategy {
        if local.proximal_mu == 0.0 {
            spec.local = Some(LocalTraining {
                proximal_mu: mu,
                ..local
            });
        } else {
            spec.local = Some(local);
        }
    } else {
        spec.local = Some(local);
    }
    let averaging = matches!(spec.strategy, Strategy::FedAvg | Strategy::FedProx { .. });
    if let Some(secagg) = &spec.secagg {
        if !averaging {
            return Err(bad(format!(
                "secure aggregation reveals only the sum, which {} cannot use; use fedavg or fedprox",
                spec.strategy.name()
            )));
        }
        if spec.screen.is_some() {
            return Err(bad(
                "screening needs visible updates; it cannot be combined with secure aggregation"
                    .to_owned(),
            ));
        }
        secagg.check().map_err(|e| bad(e.to_string()))?;
        secagg
            .fixed
            .check(invite_count(&spec))
            .map_err(|e| bad(e.to_string()))?;
    }
    if let Some(dp) = &spec.dp {
        if !averaging {
            return Err(bad(format!(
                "differential privacy is accounted for averaging; {} is not supported with it",
                spec.strategy.name()
            )));
        }
        dp.validate().map_err(|e| bad(e.to_string()))?;
    }
    if spec.seed.is_none() {
        spec.seed = Some(u64::from_le_bytes(crate::random_bytes::<8>()));
    }
    Ok(spec)
}

/// The norm updates are clipped to on the device, if any.
fn clip_norm(spec: &CreateFlTask) -> Option<f32> {
    match (&spec.dp, &spec.secagg) {
        (Some(dp), _) => Some(dp.clip_norm),
        (None, Some(s)) => Some(s.fixed.clip),
        (None, None) => None,
    }
}

/// The task's global model on its held-out set, if it has one.
fn held_out_evaluation(rec: &FlTaskRecord) -> Option<Evaluation> {
    let data = rec.held_out.as_deref()?;
    match rec.spec.model.evaluate(&rec.model, data) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(task = %rec.id, error = %e, "held-out evaluation failed");
            None
        }
    }
}

fn epsilon(rec: &FlTaskRecord) -> Option<f64> {
    let dp = rec.spec.dp.as_ref()?;
    let acc: RdpAccountant = serde_json::from_str(&rec.accountant).ok()?;
    Some(acc.epsilon(dp.target_delta))
}

fn task_view(t: &TaskRt) -> FlTask {
    FlTask {
        id: t.rec.id.clone(),
        spec: t.rec.spec.clone(),
        state: t.rec.state,
        completed_rounds: t.rec.completed_rounds,
        current_round: t.round.as_ref().map(|r| r.rec.round),
        phase: t.round.as_ref().map(|r| r.rec.phase),
        history: t.rec.history.clone(),
        epsilon: epsilon(&t.rec),
        held_out_examples: t.rec.held_out.as_ref().map(|d| d.len() as u32),
        evaluation: t.evaluation,
        detail: t.rec.detail.clone().or_else(|| t.waiting.clone()),
        created_at: from_ms(t.rec.created_ms),
    }
}

impl Coordinator {
    /// Loads every task and open round from the store (at start).
    pub async fn load(&self, store: &crate::store::Store) -> Result<(), crate::Error> {
        let tasks = store.fl_tasks().await?;
        let rounds = store.fl_open_rounds().await?;
        let mut live = HashMap::new();
        for rec in tasks {
            let evaluation = match rec.history.iter().rev().find(|h| h.aggregated) {
                Some(last) => last.evaluation,
                None => held_out_evaluation(&rec),
            };
            let mut rt = TaskRt {
                rec,
                round: None,
                failed_in_row: 0,
                waiting: None,
                evaluation,
            };
            if let Some(r) = rounds.iter().find(|r| r.task_id == rt.rec.id) {
                let mut submitted: HashMap<&'static str, HashSet<DeviceId>> = HashMap::new();
                for (device, kind) in store.fl_submitters(r.task_id.clone(), r.round).await? {
                    if let Some(k) = KINDS.iter().find(|k| **k == kind) {
                        submitted.entry(k).or_default().insert(device);
                    }
                }
                let roster: Vec<FlRosterEntry> = match &r.roster {
                    Some(text) => serde_json::from_str(text)?,
                    None => Vec::new(),
                };
                rt.round = Some(RoundRt {
                    selected: r.selected.iter().cloned().collect(),
                    index_of: roster
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.device_id.clone(), i as u32))
                        .collect(),
                    roster,
                    submitted,
                    refused: serde_json::from_str(&r.refused).unwrap_or_default(),
                    rec: r.clone(),
                    closing: false,
                });
                tracing::info!(task = %rt.rec.id, round = r.round, phase = ?r.phase, "resuming federated round");
            }
            live.insert(rt.rec.id.clone(), rt);
        }
        *self.tasks.lock().map_err(|_| crate::Error::Poisoned)? = live;
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, TaskRt>>, ApiError> {
        self.tasks
            .lock()
            .map_err(|_| ApiError::internal("coordinator lock poisoned"))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

const KINDS: [&str; 5] = ["update", "keys", "shares", "masked", "unmask"];

// ---------------------------------------------------------------------------
// Operator API

/// Starts a federated task.
#[utoipa::path(post, path = "/v1/fl/tasks", tag = "federated",
    security(("operator" = [])),
    request_body = CreateFlTask,
    responses(
        (status = 201, description = "Created; the first round starts when enough devices are eligible", body = FlTask),
        (status = 400, description = "Invalid spec", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn create(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Json(spec): Json<CreateFlTask>,
) -> Result<(StatusCode, Json<FlTask>), ApiError> {
    let mut spec = validate(spec)?;
    let id = format!("fl-{}", hex::encode(crate::random_bytes::<6>()));
    let model = spec.model.init(spec.seed.unwrap_or(0));
    let held_out = spec.held_out.take().map(|h| {
        std::sync::Arc::new(federated::model::Dataset {
            inputs: spec.model.inputs,
            features: h.features.0,
            labels: h.labels,
        })
    });
    let rec = FlTaskRecord {
        id: id.clone(),
        held_out,
        spec,
        state: FlTaskState::Running,
        completed_rounds: 0,
        model,
        accountant: serde_json::to_string(&RdpAccountant::new()).map_err(ApiError::internal)?,
        history: Vec::new(),
        detail: None,
        created_ms: now_ms(),
    };
    state
        .store()
        .create_fl_task(rec.clone())
        .await
        .map_err(ApiError::internal)?;
    let rt = TaskRt {
        evaluation: held_out_evaluation(&rec),
        rec,
        round: None,
        failed_in_row: 0,
        waiting: None,
    };
    let view = task_view(&rt);
    state.coordinator().lock()?.insert(id.clone(), rt);
    state.coordinator().wake.notify_one();
    tracing::info!(task = %id, "federated task created");
    Ok((StatusCode::CREATED, Json(view)))
}

/// Lists federated tasks, newest first.
#[utoipa::path(get, path = "/v1/fl/tasks", tag = "federated",
    security(("operator" = [])),
    responses((status = 200, body = FlTaskList)))]
pub async fn list(
    State(state): State<AppState>,
    _op: OperatorAuth,
) -> Result<Json<FlTaskList>, ApiError> {
    let tasks = state.coordinator().lock()?;
    let mut out: Vec<FlTask> = tasks.values().map(task_view).collect();
    out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
    Ok(Json(FlTaskList { tasks: out }))
}

fn no_task(id: &str) -> ApiError {
    ApiError::not_found("no-such-fl-task", format!("no federated task {id:?}"))
}

/// Shows one task with its round history.
#[utoipa::path(get, path = "/v1/fl/tasks/{id}", tag = "federated",
    security(("operator" = [])),
    responses((status = 200, body = FlTask), (status = 404, body = protocol::Problem)))]
pub async fn show(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<FlTask>, ApiError> {
    let tasks = state.coordinator().lock()?;
    tasks
        .get(&id)
        .map(|t| Json(task_view(t)))
        .ok_or_else(|| no_task(&id))
}

/// Stops a running task; its model stays as the last round left it.
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/stop", tag = "federated",
    security(("operator" = [])),
    responses((status = 200, body = FlTask), (status = 404, body = protocol::Problem),
        (status = 409, description = "The task is not running", body = protocol::Problem)))]
pub async fn stop(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<FlTask>, ApiError> {
    let rec = {
        let mut tasks = state.coordinator().lock()?;
        let t = tasks.get_mut(&id).ok_or_else(|| no_task(&id))?;
        if t.rec.state != FlTaskState::Running {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "fl-task-not-running",
                format!("task {id} is not running"),
            ));
        }
        t.rec.state = FlTaskState::Stopped;
        t.rec.detail = Some("stopped by an operator".to_owned());
        if let Some(r) = t.round.as_mut() {
            r.closing = true;
        }
        t.rec.clone()
    };
    state
        .store()
        .update_fl_task(rec)
        .await
        .map_err(ApiError::internal)?;
    state.coordinator().bump();
    let tasks = state.coordinator().lock()?;
    Ok(Json(task_view(&tasks[&id])))
}

/// The task's current global model (the finished model once it completed).
#[utoipa::path(get, path = "/v1/fl/tasks/{id}/model", tag = "federated",
    security(("operator" = [])),
    responses((status = 200, body = FlModel), (status = 404, body = protocol::Problem)))]
pub async fn operator_model(
    State(state): State<AppState>,
    _op: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<FlModel>, ApiError> {
    let tasks = state.coordinator().lock()?;
    let t = tasks.get(&id).ok_or_else(|| no_task(&id))?;
    Ok(Json(FlModel {
        round: t.rec.completed_rounds,
        params: F32Vector(t.rec.model.clone()),
    }))
}

// ---------------------------------------------------------------------------
// Device API

/// How long a round view may wait.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewQuery {
    /// Wait (up to 20 s) until the round has left this phase.
    #[serde(default)]
    pub wait_past: Option<FlPhase>,
}

fn build_view(t: &TaskRt, round: u32, device: &DeviceId) -> Result<FlRoundView, ApiError> {
    let spec = &t.rec.spec;
    let base = |phase: FlPhase, selected: bool, deadline: i64| FlRoundView {
        task_id: t.rec.id.clone(),
        round,
        phase,
        selected,
        phase_deadline: from_ms(deadline),
        model: spec.model.clone(),
        dataset: spec.dataset,
        labels: spec.labels.clone(),
        local: spec.local.unwrap_or_default(),
        clip_norm: clip_norm(spec),
        secagg: spec.secagg,
        roster: None,
        u2: None,
        u3: None,
    };
    match &t.round {
        Some(r) if r.rec.round == round => {
            let phase = if r.closing || t.rec.state != FlTaskState::Running {
                FlPhase::Closed
            } else {
                r.rec.phase
            };
            let mut v = base(phase, r.selected.contains(device), r.rec.phase_deadline_ms);
            if !r.roster.is_empty() {
                v.roster = Some(r.roster.clone());
                // The neighbourhood size is fixed with the roster, so
                // every device builds the hub's graph.
                v.secagg = spec.secagg.map(|p| p.resolved(r.roster.len()));
            }
            v.u2 = r.rec.u2.clone();
            v.u3 = r.rec.u3.clone();
            Ok(v)
        }
        Some(r) if round > r.rec.round => Err(no_round(&t.rec.id, round)),
        _ if round == 0 => Err(no_round(&t.rec.id, round)),
        None if round > t.rec.history.len() as u32 + t.failed_in_row + 1 => {
            Err(no_round(&t.rec.id, round))
        }
        _ => Ok(base(FlPhase::Closed, false, now_ms())),
    }
}

fn no_round(task: &str, round: u32) -> ApiError {
    ApiError::not_found(
        "no-such-fl-round",
        format!("task {task} has no round {round}"),
    )
}

/// A round as one device sees it; with `wait_past`, waits for the next
/// phase (long poll).
#[utoipa::path(get, path = "/v1/fl/tasks/{id}/rounds/{round}", tag = "federated",
    params(("wait_past" = Option<String>, Query, description = "Wait (up to 20 s) until the round leaves this phase")),
    responses((status = 200, body = FlRoundView), (status = 404, body = protocol::Problem)))]
pub async fn round_view(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Query(q): Query<ViewQuery>,
) -> Result<Json<FlRoundView>, ApiError> {
    let coordinator = state.coordinator();
    let mut rx = coordinator.changed.subscribe();
    let until = tokio::time::Instant::now() + LONG_POLL;
    loop {
        let view = {
            let tasks = coordinator.lock()?;
            let t = tasks.get(&id).ok_or_else(|| no_task(&id))?;
            build_view(t, round, &device.id)?
        };
        let waiting = q
            .wait_past
            .is_some_and(|p| p == view.phase && p != FlPhase::Closed);
        if !waiting {
            return Ok(Json(view));
        }
        match tokio::time::timeout_at(until, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Json(view)),
        }
    }
}

/// The global model a round starts from.
#[utoipa::path(get, path = "/v1/fl/tasks/{id}/rounds/{round}/model", tag = "federated",
    responses((status = 200, body = FlModel), (status = 403, body = protocol::Problem),
        (status = 409, description = "The round is over", body = protocol::Problem)))]
pub async fn device_model(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
) -> Result<Json<FlModel>, ApiError> {
    let tasks = state.coordinator().lock()?;
    let t = tasks.get(&id).ok_or_else(|| no_task(&id))?;
    match &t.round {
        Some(r) if r.rec.round == round && !r.closing => {
            if !r.selected.contains(&device.id) {
                return Err(ApiError::forbidden(
                    "not-selected",
                    format!("device {} was not selected for round {round}", device.id),
                ));
            }
            Ok(Json(FlModel {
                round,
                params: F32Vector(t.rec.model.clone()),
            }))
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "round-over",
            format!("round {round} of task {id} is not open"),
        )),
    }
}

/// Why a submission was refused: the problem and the counted reason.
struct Refusal {
    reason: &'static str,
    error: ApiError,
}

fn refuse(reason: &'static str, status: StatusCode, detail: String) -> Refusal {
    let slug = match reason {
        "wrong_shape" => "fl-wrong-shape",
        "not_selected" => "not-selected",
        "late" => "fl-late",
        "replayed" => "fl-replayed",
        "wrong_phase" => "fl-wrong-phase",
        _ => "fl-invalid",
    };
    Refusal {
        reason,
        error: ApiError::new(status, slug, detail),
    }
}

/// Checks that `device` may submit `kind` in `round` now. Counts and
/// returns the refusal otherwise, once the count is stored.
async fn admit(
    state: &AppState,
    id: &str,
    round: u32,
    device: &DeviceId,
    kind: &'static str,
    phase: FlPhase,
) -> Result<(FlTaskRecord, Option<u32>), ApiError> {
    match admit_now(state, id, round, device, kind, phase)? {
        Ok(admitted) => Ok(admitted),
        Err((counts, error)) => {
            store_refusals(counts).await;
            Err(error)
        }
    }
}

/// A refusal counted in memory: the counts to store, and the error.
type Counted = (Option<RefusalCounts>, ApiError);

/// [`admit`] under the coordinator's lock: the task and the device's
/// roster index, or the counted refusal.
#[allow(clippy::type_complexity)]
fn admit_now(
    state: &AppState,
    id: &str,
    round: u32,
    device: &DeviceId,
    kind: &'static str,
    phase: FlPhase,
) -> Result<Result<(FlTaskRecord, Option<u32>), Counted>, ApiError> {
    let mut tasks = state.coordinator().lock()?;
    let t = tasks.get_mut(id).ok_or_else(|| no_task(id))?;
    let refusal = (|| {
        let current = t.round.as_ref().map(|r| r.rec.round);
        let Some(r) = t.round.as_ref().filter(|r| r.rec.round == round) else {
            return Err(match current {
                Some(c) if round > c => refuse(
                    "invalid",
                    StatusCode::NOT_FOUND,
                    format!("round {round} has not started"),
                ),
                _ => refuse(
                    "replayed",
                    StatusCode::CONFLICT,
                    format!("round {round} of task {id} is over"),
                ),
            });
        };
        if !r.selected.contains(device) {
            return Err(refuse(
                "not_selected",
                StatusCode::FORBIDDEN,
                format!("device {device} was not selected for round {round}"),
            ));
        }
        if r.submitted.get(kind).is_some_and(|s| s.contains(device)) {
            return Err(refuse(
                "replayed",
                StatusCode::CONFLICT,
                format!("device {device} already sent its {kind} for round {round}"),
            ));
        }
        if r.closing || t.rec.state != FlTaskState::Running || now_ms() > r.rec.phase_deadline_ms {
            return Err(refuse(
                "late",
                StatusCode::CONFLICT,
                format!("the {kind} phase of round {round} has closed"),
            ));
        }
        if r.rec.phase != phase {
            let reason = if r.rec.phase > phase {
                "late"
            } else {
                "wrong_phase"
            };
            return Err(refuse(
                reason,
                StatusCode::CONFLICT,
                format!(
                    "round {round} is in phase {:?}, not {:?}",
                    r.rec.phase, phase
                ),
            ));
        }
        let index = r.index_of.get(device).copied();
        if matches!(phase, FlPhase::Share | FlPhase::Masked | FlPhase::Unmask) && index.is_none() {
            return Err(refuse(
                "not_selected",
                StatusCode::FORBIDDEN,
                format!("device {device} is not in round {round}'s roster"),
            ));
        }
        Ok(index)
    })();
    Ok(match refusal {
        Ok(index) => Ok((t.rec.clone(), index)),
        Err(r) => Err((count_refusal(state, t, r.reason), r.error)),
    })
}

/// A round's refusal counts as they stood after one more refusal.
struct RefusalCounts {
    store: crate::store::Store,
    task: String,
    round: u32,
    refused: String,
}

/// Counts a refusal in memory and in the metrics; what it returns is
/// stored (by [`store_refusals`]) before the refusal is answered, so that a
/// restarted hub still reports every refusal a device was told of.
fn count_refusal(state: &AppState, t: &mut TaskRt, reason: &'static str) -> Option<RefusalCounts> {
    state
        .metrics()
        .fl_refused
        .get_or_create(&FlLabels { reason })
        .inc();
    let r = t.round.as_mut()?;
    *r.refused.entry(reason.to_owned()).or_default() += 1;
    Some(RefusalCounts {
        store: state.store().clone(),
        task: t.rec.id.clone(),
        round: r.rec.round,
        refused: r.refused_json(),
    })
}

/// Stores a round's refusal counts. Counts only grow, and the store keeps
/// the larger of each, so concurrent refusals stored out of order lose
/// nothing.
async fn store_refusals(counts: Option<RefusalCounts>) {
    if let Some(c) = counts
        && let Err(e) = c.store.set_fl_refused(c.task, c.round, c.refused).await
    {
        tracing::warn!(error = %e, "cannot store a round's refusal counts");
    }
}

/// Counts a refusal found after admission (a bad body).
async fn refuse_late(state: &AppState, id: &str, r: Refusal) -> ApiError {
    let counts = match state.coordinator().lock() {
        Ok(mut tasks) => tasks
            .get_mut(id)
            .and_then(|t| count_refusal(state, t, r.reason)),
        Err(_) => None,
    };
    store_refusals(counts).await;
    r.error
}

/// Stores a submission that passed its checks and counts it; one that
/// did not is refused with its problem and counted by reason.
async fn record<T: Serialize>(
    state: &AppState,
    id: &str,
    round: u32,
    device: &DeviceId,
    kind: &'static str,
    checked: Result<(), Refusal>,
    body: &T,
) -> Result<StatusCode, ApiError> {
    if let Err(r) = checked {
        return Err(refuse_late(state, id, r).await);
    }
    let body = serde_json::to_vec(body).map_err(ApiError::internal)?;
    let stored = state
        .store()
        .put_fl_submission(id.to_owned(), round, device.clone(), kind, body)
        .await
        .map_err(ApiError::internal)?;
    mark(state, id, round, device, kind, stored).await
}

async fn mark(
    state: &AppState,
    id: &str,
    round: u32,
    device: &DeviceId,
    kind: &'static str,
    stored: Stored,
) -> Result<StatusCode, ApiError> {
    if stored == Stored::Duplicate {
        return Err(refuse_late(
            state,
            id,
            refuse(
                "replayed",
                StatusCode::CONFLICT,
                format!("device {device} already sent its {kind} for round {round}"),
            ),
        )
        .await);
    }
    {
        let mut tasks = state.coordinator().lock()?;
        if let Some(r) = tasks
            .get_mut(id)
            .and_then(|t| t.round.as_mut())
            .filter(|r| r.rec.round == round)
        {
            r.submitted.entry(kind).or_default().insert(device.clone());
        }
    }
    state.metrics().fl_submissions.inc();
    state.coordinator().wake.notify_one();
    Ok(StatusCode::ACCEPTED)
}

fn check_evaluation(e: &Evaluation) -> Result<(), Refusal> {
    if !(0.0..=1.0).contains(&e.accuracy) || !e.loss.is_finite() || e.loss < 0.0 {
        return Err(refuse(
            "invalid",
            StatusCode::BAD_REQUEST,
            "evaluation needs an accuracy between 0 and 1 and a finite, non-negative loss"
                .to_owned(),
        ));
    }
    Ok(())
}

/// A device's plain update (tasks without secure aggregation).
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/rounds/{round}/update", tag = "federated",
    request_body = FlUpdate,
    responses((status = 202, description = "Stored"),
        (status = 400, description = "Wrong shape or values", body = protocol::Problem),
        (status = 403, description = "Not selected for the round", body = protocol::Problem),
        (status = 409, description = "After the deadline, for an earlier round, or twice", body = protocol::Problem)))]
pub async fn post_update(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Json(update): Json<FlUpdate>,
) -> Result<StatusCode, ApiError> {
    let (task, _) = admit(&state, &id, round, &device.id, "update", FlPhase::Train).await?;
    let dim = task.spec.model.num_params();
    let checked = (|| {
        if update.delta.0.len() != dim {
            return Err(refuse(
                "wrong_shape",
                StatusCode::BAD_REQUEST,
                format!(
                    "update has {} values, the model has {dim} parameters",
                    update.delta.0.len()
                ),
            ));
        }
        if update.delta.0.iter().any(|v| !v.is_finite()) {
            return Err(refuse(
                "invalid",
                StatusCode::BAD_REQUEST,
                "update has a value that is not finite".to_owned(),
            ));
        }
        if update.examples == 0 {
            return Err(refuse(
                "invalid",
                StatusCode::BAD_REQUEST,
                "an update needs at least one example".to_owned(),
            ));
        }
        check_evaluation(&update.evaluation)
    })();
    record(&state, &id, round, &device.id, "update", checked, &update).await
}

/// Secure aggregation, phase 0: the device's public keys.
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/rounds/{round}/advertise", tag = "federated",
    request_body = FlAdvertise,
    responses((status = 202, description = "Stored"), (status = 403, body = protocol::Problem),
        (status = 409, body = protocol::Problem)))]
pub async fn post_advertise(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Json(body): Json<FlAdvertise>,
) -> Result<StatusCode, ApiError> {
    let (task, _) = admit(&state, &id, round, &device.id, "keys", FlPhase::Advertise).await?;
    let checked = match task.spec.secagg {
        Some(_) => Ok(()),
        None => Err(refuse(
            "wrong_phase",
            StatusCode::CONFLICT,
            "this task does not use secure aggregation".to_owned(),
        )),
    };
    record(&state, &id, round, &device.id, "keys", checked, &body.keys).await
}

/// Secure aggregation, phase 1: encrypted shares for the device's holders.
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/rounds/{round}/shares", tag = "federated",
    request_body = FlShares,
    responses((status = 202, description = "Stored"), (status = 400, body = protocol::Problem),
        (status = 403, body = protocol::Problem), (status = 409, body = protocol::Problem)))]
pub async fn post_shares(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Json(body): Json<FlShares>,
) -> Result<StatusCode, ApiError> {
    let (task, index) = admit(&state, &id, round, &device.id, "shares", FlPhase::Share).await?;
    let me = index.unwrap_or(u32::MAX) as usize;
    let roster = {
        let tasks = state.coordinator().lock()?;
        let keys: Vec<PublicKeys> = tasks
            .get(&id)
            .and_then(|t| t.round.as_ref())
            .map(|r| r.roster.iter().map(|e| e.keys).collect())
            .unwrap_or_default();
        let params = task.spec.secagg.unwrap_or_default();
        federated::secagg::Roster::new(&params, &secagg_context(&id, round), keys)
            .map_err(|e| ApiError::internal(fed_err(e)))?
    };
    // Exactly one share to each holder of the sender's secrets (the
    // sender itself among them), all from the sender.
    let mut expected: HashSet<usize> = if me < roster.len() {
        roster.holders(me).collect()
    } else {
        HashSet::new()
    };
    let exact = body.shares.len() == expected.len()
        && body
            .shares
            .iter()
            .all(|s| s.from as usize == me && expected.remove(&(s.to as usize)));
    if !exact {
        return Err(refuse_late(
            &state,
            &id,
            refuse(
                "invalid",
                StatusCode::BAD_REQUEST,
                format!(
                    "shares must come from the sender's roster index {me} and go once to each of its {} holders",
                    roster.holders_len()
                ),
            ),
        )
        .await);
    }
    let rows = body
        .shares
        .iter()
        .map(|s| {
            serde_json::to_vec(s)
                .map(|b| (s.from, s.to, b))
                .map_err(ApiError::internal)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stored = state
        .store()
        .put_fl_shares(id.clone(), round, device.id.clone(), rows)
        .await
        .map_err(ApiError::internal)?;
    mark(&state, &id, round, &device.id, "shares", stored).await
}

/// Secure aggregation, phase 2: the shares addressed to this device.
#[utoipa::path(get, path = "/v1/fl/tasks/{id}/rounds/{round}/shares", tag = "federated",
    responses((status = 200, body = FlShares), (status = 403, body = protocol::Problem),
        (status = 409, body = protocol::Problem)))]
pub async fn get_shares(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
) -> Result<Json<FlShares>, ApiError> {
    let index = {
        let tasks = state.coordinator().lock()?;
        let t = tasks.get(&id).ok_or_else(|| no_task(&id))?;
        let r = t
            .round
            .as_ref()
            .filter(|r| r.rec.round == round && r.rec.phase >= FlPhase::Masked)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "fl-wrong-phase",
                    format!("round {round}'s shares are not ready"),
                )
            })?;
        let index = r.index_of.get(&device.id).copied().ok_or_else(|| {
            ApiError::forbidden(
                "not-selected",
                format!("device {} is not in round {round}'s roster", device.id),
            )
        })?;
        let u2 = r.rec.u2.clone().unwrap_or_default();
        (index, u2)
    };
    let (me, u2) = index;
    let rows = state
        .store()
        .fl_shares_for(id, round, me)
        .await
        .map_err(ApiError::internal)?;
    let shares = rows
        .into_iter()
        .filter(|(sender, _)| u2.contains(sender))
        .map(|(_, body)| serde_json::from_slice::<EncryptedShare>(&body))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    Ok(Json(FlShares { shares }))
}

/// Secure aggregation, phase 2: the masked update.
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/rounds/{round}/masked", tag = "federated",
    request_body = FlMasked,
    responses((status = 202, description = "Stored"), (status = 400, body = protocol::Problem),
        (status = 403, body = protocol::Problem), (status = 409, body = protocol::Problem)))]
pub async fn post_masked(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Json(body): Json<FlMasked>,
) -> Result<StatusCode, ApiError> {
    let (task, index) = admit(&state, &id, round, &device.id, "masked", FlPhase::Masked).await?;
    let in_u2 = {
        let tasks = state.coordinator().lock()?;
        tasks
            .get(&id)
            .and_then(|t| t.round.as_ref())
            .and_then(|r| r.rec.u2.as_ref())
            .is_some_and(|u2| index.is_some_and(|i| u2.contains(&i)))
    };
    let dim = task.spec.model.num_params();
    let checked = if !in_u2 {
        Err(refuse(
            "not_selected",
            StatusCode::FORBIDDEN,
            format!(
                "device {}'s shares were not delivered in round {round}",
                device.id
            ),
        ))
    } else if body.masked.0.len() != dim {
        Err(refuse(
            "wrong_shape",
            StatusCode::BAD_REQUEST,
            format!(
                "masked update has {} values, the model has {dim} parameters",
                body.masked.0.len()
            ),
        ))
    } else {
        check_evaluation(&body.evaluation)
    };
    record(&state, &id, round, &device.id, "masked", checked, &body).await
}

/// Secure aggregation, phase 3: revealed shares.
#[utoipa::path(post, path = "/v1/fl/tasks/{id}/rounds/{round}/unmask", tag = "federated",
    request_body = FlUnmask,
    responses((status = 202, description = "Stored"), (status = 403, body = protocol::Problem),
        (status = 409, body = protocol::Problem)))]
pub async fn post_unmask(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, round)): Path<(String, u32)>,
    Json(body): Json<FlUnmask>,
) -> Result<StatusCode, ApiError> {
    let (_, index) = admit(&state, &id, round, &device.id, "unmask", FlPhase::Unmask).await?;
    let checked = if body.revealed.iter().any(|s| Some(s.holder) != index) {
        Err(refuse(
            "invalid",
            StatusCode::BAD_REQUEST,
            "revealed shares must be the sender's own".to_owned(),
        ))
    } else {
        Ok(())
    };
    record(
        &state,
        &id,
        round,
        &device.id,
        "unmask",
        checked,
        &body.revealed,
    )
    .await
}

// ---------------------------------------------------------------------------
// The controller

/// Runs the coordinator: loads the store's tasks and rounds, then steps
/// every running task when woken (a submission, a new task) and at least
/// every 200 ms, for the deadlines.
pub async fn controller(state: AppState) {
    if let Err(e) = state.coordinator().load(state.store()).await {
        tracing::error!(error = %e, "cannot load federated tasks; the coordinator is off");
        return;
    }
    loop {
        let ids: Vec<String> = match state.coordinator().tasks.lock() {
            Ok(tasks) => tasks
                .values()
                .filter(|t| t.rec.state == FlTaskState::Running)
                .map(|t| t.rec.id.clone())
                .collect(),
            Err(_) => return,
        };
        for id in ids {
            if let Err(e) = step(&state, &id).await {
                tracing::error!(task = %id, error = %e, "federated step failed");
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            state.coordinator().wake.notified(),
        )
        .await;
    }
}

fn snapshot(state: &AppState, id: &str) -> Result<Option<TaskRt>, crate::Error> {
    let tasks = state
        .coordinator()
        .tasks
        .lock()
        .map_err(|_| crate::Error::Poisoned)?;
    Ok(tasks.get(id).cloned())
}

fn with_task<R>(state: &AppState, id: &str, f: impl FnOnce(&mut TaskRt) -> R) -> Option<R> {
    let mut tasks = state.coordinator().tasks.lock().ok()?;
    tasks.get_mut(id).map(f)
}

async fn step(state: &AppState, id: &str) -> Result<(), crate::Error> {
    let Some(t) = snapshot(state, id)? else {
        return Ok(());
    };
    if t.rec.state != FlTaskState::Running {
        return Ok(());
    }
    match &t.round {
        None => start_round(state, t).await,
        Some(r) => advance(state, &t, r).await,
    }
}

async fn finish_task(
    state: &AppState,
    mut rec: FlTaskRecord,
    to: FlTaskState,
    detail: String,
) -> Result<(), crate::Error> {
    tracing::info!(task = %rec.id, state = ?to, detail = %detail, "federated task finished");
    rec.state = to;
    rec.detail = Some(detail);
    state.store().update_fl_task(rec.clone()).await?;
    with_task(state, &rec.id.clone(), |t| {
        t.rec = rec;
        t.round = None;
    });
    state.coordinator().bump();
    Ok(())
}

async fn start_round(state: &AppState, t: TaskRt) -> Result<(), crate::Error> {
    let spec = &t.rec.spec;
    if t.rec.completed_rounds >= spec.rounds {
        let detail = format!("{} rounds done", t.rec.completed_rounds);
        return finish_task(state, t.rec, FlTaskState::Completed, detail).await;
    }
    if t.failed_in_row >= MAX_FAILED_ROUNDS {
        let detail = format!("{} rounds in a row failed", t.failed_in_row);
        return finish_task(state, t.rec, FlTaskState::Failed, detail).await;
    }
    let mut eligible: Vec<DeviceId> = state
        .store()
        .devices()
        .await?
        .into_iter()
        .filter(|d| {
            d.status == protocol::DeviceStatus::Active
                && spec
                    .eligibility
                    .iter()
                    .all(|(k, v)| d.labels.get(k) == Some(v))
        })
        .map(|d| d.id)
        .collect();
    let need = min_clients(spec);
    if eligible.len() < need {
        let waiting = format!(
            "waiting for devices: {} eligible, a round needs at least {need}",
            eligible.len()
        );
        with_task(state, &t.rec.id, |rt| rt.waiting = Some(waiting));
        return Ok(());
    }
    let invite = invite_count(spec).min(eligible.len());
    if let Some(dp) = &spec.dp {
        let acc: RdpAccountant = serde_json::from_str(&t.rec.accountant)?;
        let q = invite as f64 / eligible.len() as f64;
        if let Err(e) = acc.check_next_round(dp, q) {
            return finish_task(state, t.rec, FlTaskState::Completed, e.to_string()).await;
        }
    }
    let number = state.store().fl_last_round(t.rec.id.clone()).await? + 1;
    let eligible_count = eligible.len() as u32;
    eligible.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed.unwrap_or(0) ^ (u64::from(number) << 32));
    eligible.shuffle(&mut rng);
    eligible.truncate(invite);
    let now = now_ms();
    let rec = FlRoundRecord {
        task_id: t.rec.id.clone(),
        round: number,
        phase: if spec.secagg.is_some() {
            FlPhase::Advertise
        } else {
            FlPhase::Train
        },
        phase_deadline_ms: now + deadline_ms(spec),
        started_ms: now,
        selected: eligible,
        // The sampling rate's denominator: the population the round drew
        // from.
        eligible: eligible_count,
        roster: None,
        u2: None,
        u3: None,
        refused: "{}".to_owned(),
    };
    let sent = state.store().open_fl_round(rec.clone()).await?;
    with_task(state, &t.rec.id, |rt| {
        rt.waiting = None;
        rt.round = Some(RoundRt {
            selected: rec.selected.iter().cloned().collect(),
            roster: Vec::new(),
            index_of: HashMap::new(),
            submitted: HashMap::new(),
            refused: BTreeMap::new(),
            rec: rec.clone(),
            closing: false,
        });
    });
    for (device, seq) in sent {
        state.bus().notify(&device, seq);
        state.metrics().messages_sent.inc();
    }
    state.coordinator().bump();
    tracing::info!(task = %t.rec.id, round = number, invited = invite, "federated round started");
    Ok(())
}

async fn advance(state: &AppState, t: &TaskRt, r: &RoundRt) -> Result<(), crate::Error> {
    if r.closing {
        return Ok(());
    }
    let spec = &t.rec.spec;
    let now = now_ms();
    let expired = now > r.rec.phase_deadline_ms;
    let target = spec.clients_per_round as usize;
    let min = min_clients(spec);
    let u2_len = r.rec.u2.as_ref().map_or(0, Vec::len);
    let u3_len = r.rec.u3.as_ref().map_or(0, Vec::len);
    let done = match r.rec.phase {
        FlPhase::Train => r.count("update") >= target.min(r.selected.len()),
        FlPhase::Advertise => r.count("keys") >= target.min(r.selected.len()),
        FlPhase::Share => r.count("shares") >= r.roster.len(),
        FlPhase::Masked => r.count("masked") >= u2_len,
        FlPhase::Unmask => r.count("unmask") >= u3_len,
        FlPhase::Closed => return Ok(()),
    };
    if !done && !expired {
        return Ok(());
    }
    let mut next = r.rec.clone();
    next.refused = r.refused_json();
    next.phase_deadline_ms = now + deadline_ms(spec);
    match r.rec.phase {
        FlPhase::Train => {
            if r.count("update") < min {
                return fail_round(
                    state,
                    t,
                    r,
                    format!(
                        "{} updates by the deadline, the round needs {min}",
                        r.count("update")
                    ),
                )
                .await;
            }
            mark_closing(state, &t.rec.id);
            aggregate(state, t, r).await
        }
        FlPhase::Advertise => {
            let keyed = state
                .store()
                .fold_fl_submissions(
                    t.rec.id.clone(),
                    r.rec.round,
                    "keys",
                    Vec::<(DeviceId, PublicKeys)>::new(),
                    |out, device, body| {
                        out.push((device, serde_json::from_slice(body)?));
                        Ok(())
                    },
                )
                .await?;
            if keyed.len() < min.max(3) {
                return fail_round(
                    state,
                    t,
                    r,
                    format!(
                        "{} devices advertised keys, the round needs {}",
                        keyed.len(),
                        min.max(3)
                    ),
                )
                .await;
            }
            let roster: Vec<FlRosterEntry> = keyed
                .into_iter()
                .map(|(device_id, keys)| FlRosterEntry { device_id, keys })
                .collect();
            next.phase = FlPhase::Share;
            next.roster = Some(serde_json::to_string(&roster)?);
            state.store().advance_fl_round(next.clone()).await?;
            with_task(state, &t.rec.id, |rt| {
                if let Some(live) = rt.round.as_mut() {
                    live.index_of = roster
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.device_id.clone(), i as u32))
                        .collect();
                    live.roster = roster;
                    live.rec = next;
                }
            });
            state.coordinator().bump();
            Ok(())
        }
        FlPhase::Share | FlPhase::Masked => {
            let kind = if r.rec.phase == FlPhase::Share {
                "shares"
            } else {
                "masked"
            };
            let mut set: Vec<u32> = r
                .submitted
                .get(kind)
                .into_iter()
                .flatten()
                .filter_map(|d| r.index_of.get(d).copied())
                .collect();
            set.sort_unstable();
            if set.len() < min.max(3) {
                return fail_round(
                    state,
                    t,
                    r,
                    format!(
                        "{} devices sent their {kind}, the round needs {}",
                        set.len(),
                        min.max(3)
                    ),
                )
                .await;
            }
            if r.rec.phase == FlPhase::Share {
                next.phase = FlPhase::Masked;
                next.u2 = Some(set);
            } else {
                next.phase = FlPhase::Unmask;
                next.u3 = Some(set);
            }
            state.store().advance_fl_round(next.clone()).await?;
            with_task(state, &t.rec.id, |rt| {
                if let Some(live) = rt.round.as_mut() {
                    live.rec = next;
                }
            });
            state.coordinator().bump();
            Ok(())
        }
        FlPhase::Unmask => {
            mark_closing(state, &t.rec.id);
            aggregate(state, t, r).await
        }
        FlPhase::Closed => Ok(()),
    }
}

fn mark_closing(state: &AppState, id: &str) {
    with_task(state, id, |rt| {
        if let Some(r) = rt.round.as_mut() {
            r.closing = true;
        }
    });
    state.coordinator().bump();
}

async fn fail_round(
    state: &AppState,
    t: &TaskRt,
    r: &RoundRt,
    detail: String,
) -> Result<(), crate::Error> {
    tracing::warn!(task = %t.rec.id, round = r.rec.round, detail = %detail, "federated round failed");
    state
        .metrics()
        .fl_rounds
        .get_or_create(&FlLabels { reason: "failed" })
        .inc();
    let mut rec = t.rec.clone();
    rec.history.push(FlRoundSummary {
        round: r.rec.round,
        aggregated: false,
        invited: r.selected.len() as u32,
        aggregated_updates: 0,
        excluded_updates: 0,
        refused: r.refused.clone(),
        dropped: 0,
        client_evaluation: None,
        evaluation: None,
        epsilon: epsilon(&rec),
        duration_ms: (now_ms() - r.rec.started_ms).max(0) as u64,
        detail: Some(detail),
    });
    state
        .store()
        .finish_fl_round(rec.clone(), r.rec.round, r.refused_json())
        .await?;
    with_task(state, &rec.id.clone(), |rt| {
        rt.rec = rec;
        rt.round = None;
        rt.failed_in_row += 1;
    });
    state.coordinator().bump();
    state.coordinator().wake.notify_one();
    Ok(())
}

/// Example-weighted mean of the clients' evaluations.
#[derive(Debug, Default, Clone, Copy)]
struct EvalSum {
    accuracy: f64,
    loss: f64,
    examples: usize,
}

impl EvalSum {
    fn add(&mut self, e: &Evaluation) {
        self.accuracy += e.accuracy * e.examples as f64;
        self.loss += e.loss * e.examples as f64;
        self.examples += e.examples;
    }

    fn mean(&self) -> Option<Evaluation> {
        (self.examples > 0).then(|| Evaluation {
            accuracy: self.accuracy / self.examples as f64,
            loss: self.loss / self.examples as f64,
            examples: self.examples,
        })
    }
}

/// What one round's aggregation produced.
struct Outcome {
    delta: Vec<f32>,
    used: usize,
    excluded: usize,
    dropped: usize,
    evaluation: Option<Evaluation>,
}

fn fed_err(e: federated::Error) -> crate::Error {
    crate::Error::Internal(format!("aggregation: {e}"))
}

/// Plain rounds: screening (which needs every update), client clipping for
/// differential privacy, then the task's strategy; streaming when nothing
/// needs the whole set.
async fn aggregate_plain(
    state: &AppState,
    t: &TaskRt,
    r: &RoundRt,
) -> Result<Outcome, crate::Error> {
    let spec = t.rec.spec.clone();
    let dim = spec.model.num_params();
    let clip = spec.dp.as_ref().map(|d| d.clip_norm);
    let dp = spec.dp.is_some();
    let store = state.store();
    let (task_id, round) = (t.rec.id.clone(), r.rec.round);
    let (agg, eval, excluded) = if let Some(screen) = spec.screen.clone() {
        let updates = store
            .fold_fl_submissions(
                task_id,
                round,
                "update",
                Vec::new(),
                |out, _device, body| {
                    out.push(serde_json::from_slice::<FlUpdate>(body)?);
                    Ok(())
                },
            )
            .await?;
        let strategy = spec.strategy.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&[f32]> = updates.iter().map(|u| u.delta.0.as_slice()).collect();
            let verdicts = federated::screen::screen(&screen, &refs);
            let mut agg = strategy.aggregator(dim);
            let mut eval = EvalSum::default();
            let mut excluded = 0;
            for (u, v) in updates.iter().zip(&verdicts) {
                eval.add(&u.evaluation);
                if !matches!(v, federated::screen::Verdict::Accept) {
                    excluded += 1;
                    continue;
                }
                agg.add(&u.delta.0, u.examples as f32).map_err(fed_err)?;
            }
            Ok::<_, crate::Error>((agg, eval, excluded))
        })
        .await
        .map_err(|e| crate::Error::Internal(e.to_string()))??
    } else {
        let init = (spec.strategy.aggregator(dim), EvalSum::default(), 0usize);
        store
            .fold_fl_submissions(task_id, round, "update", init, move |acc, _device, body| {
                let mut u: FlUpdate = serde_json::from_slice(body)?;
                acc.1.add(&u.evaluation);
                if let Some(c) = clip {
                    federated::screen::clip_to_norm(&mut u.delta.0, c);
                }
                // Differential privacy bounds each device's influence, so
                // its update counts once whatever its example count.
                let weight = if dp { 1.0 } else { u.examples as f32 };
                acc.0.add(&u.delta.0, weight).map_err(fed_err)
            })
            .await?
    };
    if agg.len() < min_clients(&spec) {
        return Err(crate::Error::Internal(format!(
            "{} updates passed screening, the round needs {}",
            agg.len(),
            min_clients(&spec)
        )));
    }
    let done = tokio::task::spawn_blocking(move || agg.finish())
        .await
        .map_err(|e| crate::Error::Internal(e.to_string()))?
        .map_err(fed_err)?;
    let mut delta = done.delta;
    if let Some(dp) = &spec.dp {
        let stddev = federated::dp::noise_stddev(dp) / done.used.max(1) as f64;
        federated::dp::add_gaussian_noise(&mut delta, stddev, &mut rand::rng());
    }
    Ok(Outcome {
        delta,
        used: done.used,
        excluded: excluded + done.excluded.len(),
        dropped: 0,
        evaluation: eval.mean(),
    })
}

/// Secure-aggregation rounds: the masked updates are summed as they are
/// read, the revealed shares remove the masks, and only the sum is known.
async fn aggregate_secure(
    state: &AppState,
    t: &TaskRt,
    r: &RoundRt,
) -> Result<Outcome, crate::Error> {
    let spec = t.rec.spec.clone();
    let params = spec
        .secagg
        .ok_or_else(|| crate::Error::Internal("secure round without settings".to_owned()))?;
    let dim = spec.model.num_params();
    let keys: Vec<PublicKeys> = r.roster.iter().map(|e| e.keys).collect();
    let context = secagg_context(&t.rec.id, r.rec.round);
    let roster = federated::secagg::Roster::new(&params, &context, keys).map_err(fed_err)?;
    let aggregator = federated::secagg::Aggregator::new(&roster, dim).map_err(fed_err)?;
    let index_of = r.index_of.clone();
    let store = state.store();
    let (task_id, round) = (t.rec.id.clone(), r.rec.round);
    let (aggregator, eval) = store
        .fold_fl_submissions(
            task_id.clone(),
            round,
            "masked",
            (aggregator, EvalSum::default()),
            move |acc, device, body| {
                let m: FlMasked = serde_json::from_slice(body)?;
                let Some(&i) = index_of.get(&device) else {
                    return Ok(());
                };
                acc.1.add(&m.evaluation);
                acc.0.add_masked(i as usize, &m.masked.0).map_err(fed_err)
            },
        )
        .await?;
    let revealed = store
        .fold_fl_submissions(
            task_id,
            round,
            "unmask",
            Vec::new(),
            |out, _device, body| {
                out.extend(serde_json::from_slice::<Vec<RevealedShare>>(body)?);
                Ok(())
            },
        )
        .await?;
    let u2: Vec<usize> = r
        .rec
        .u2
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let sum = tokio::task::spawn_blocking(move || aggregator.finish(&u2, &revealed))
        .await
        .map_err(|e| crate::Error::Internal(e.to_string()))?
        .map_err(fed_err)?;
    let count = sum.count.max(1);
    let mut delta: Vec<f32> = sum.sum.iter().map(|v| v / count as f32).collect();
    if let Some(dp) = &spec.dp {
        let stddev = federated::dp::noise_stddev(dp) / count as f64;
        federated::dp::add_gaussian_noise(&mut delta, stddev, &mut rand::rng());
    }
    Ok(Outcome {
        delta,
        used: sum.count,
        excluded: 0,
        dropped: sum.dropped.len(),
        evaluation: eval.mean(),
    })
}

async fn aggregate(state: &AppState, t: &TaskRt, r: &RoundRt) -> Result<(), crate::Error> {
    let outcome = if t.rec.spec.secagg.is_some() {
        aggregate_secure(state, t, r).await
    } else {
        aggregate_plain(state, t, r).await
    };
    // The round's refusals as they stand now (submissions kept arriving
    // while it closed).
    let r = snapshot(state, &t.rec.id)?
        .and_then(|live| live.round)
        .filter(|live| live.rec.round == r.rec.round)
        .unwrap_or_else(|| r.clone());
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return fail_round(state, t, &r, e.to_string()).await,
    };
    let mut rec = t.rec.clone();
    let step = rec.spec.server_learning_rate.unwrap_or(1.0);
    for (w, d) in rec.model.iter_mut().zip(&outcome.delta) {
        *w += step * d;
    }
    if let Some(dp) = &rec.spec.dp {
        let mut acc: RdpAccountant = serde_json::from_str(&rec.accountant)?;
        let q = (r.selected.len() as f64 / f64::from(r.rec.eligible.max(1))).min(1.0);
        acc.step(q, dp.noise_multiplier, 1);
        rec.accountant = serde_json::to_string(&acc)?;
    }
    rec.completed_rounds += 1;
    let evaluation = held_out_evaluation(&rec);
    rec.history.push(FlRoundSummary {
        round: r.rec.round,
        aggregated: true,
        invited: r.selected.len() as u32,
        aggregated_updates: outcome.used as u32,
        excluded_updates: outcome.excluded as u32,
        refused: r.refused.clone(),
        dropped: outcome.dropped as u32,
        client_evaluation: outcome.evaluation,
        evaluation,
        epsilon: epsilon(&rec),
        duration_ms: (now_ms() - r.rec.started_ms).max(0) as u64,
        detail: None,
    });
    state
        .store()
        .finish_fl_round(rec.clone(), r.rec.round, r.refused_json())
        .await?;
    state
        .metrics()
        .fl_rounds
        .get_or_create(&FlLabels {
            reason: "aggregated",
        })
        .inc();
    tracing::info!(
        task = %rec.id,
        round = r.rec.round,
        updates = outcome.used,
        excluded = outcome.excluded,
        dropped = outcome.dropped,
        "federated round aggregated"
    );
    with_task(state, &rec.id.clone(), |rt| {
        rt.rec = rec;
        rt.round = None;
        rt.failed_in_row = 0;
        rt.evaluation = evaluation;
    });
    state.coordinator().bump();
    state.coordinator().wake.notify_one();
    Ok(())
}
