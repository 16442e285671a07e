//! Staged rollouts: the operator API, the device report endpoint and the
//! controller that moves each rollout through its stages.
//!
//! The controller is a loop over the live rollouts, woken by every device
//! report and operator action and at least every
//! [`Config::rollout_interval`](crate::config::Config::rollout_interval). One
//! step of one rollout:
//!
//! 1. the cohort is read (active devices whose labels match), ordered as the
//!    [`rollout::Plan`] orders it, and the devices of the stages opened so
//!    far that were not asked yet are asked to install (the message is
//!    stored, so a device offline now gets it when it reconnects);
//! 2. the reports of the current stage's devices go to
//!    [`rollout::Plan::decide`], and the decision is carried out: open the
//!    next stage, complete, hold, or abort, which queues a roll-back message
//!    for every device that may run the new version.
//!
//! Everything the controller knows is in the store, so a hub restarted at
//! any point carries on where it was. The device decides on its own health:
//! `committed` is reported only after its health window, and a failed health
//! check rolls it back before it says so.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use protocol::DeviceId;
use protocol::rollout::{
    CreateRollout, PhaseCounts, RolloutDetail, RolloutDevice, RolloutList, RolloutState,
    RolloutView, UpdatePhase, UpdateReport,
};
use rand::RngCore;
use time::OffsetDateTime;
use tokio::sync::Notify;
use web::{ApiError, Json};

use crate::api::{AppState, DeviceAuth, OperatorAuth};
use crate::store::{self, ReportOutcome, RolloutRecord};

/// Default stages when the operator gives none.
const DEFAULT_STAGES: [f64; 3] = [5.0, 25.0, 100.0];

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Maps a device's phase to what the decision reads.
fn decision_state(phase: UpdatePhase) -> rollout::DeviceState {
    match phase {
        UpdatePhase::Notified | UpdatePhase::Downloading => rollout::DeviceState::Pending,
        UpdatePhase::Installed => rollout::DeviceState::Installed,
        UpdatePhase::Committed => rollout::DeviceState::Committed,
        UpdatePhase::Failed | UpdatePhase::RolledBack => rollout::DeviceState::Failed,
    }
}

fn counts(cohort: usize, devices: &[RolloutDevice]) -> PhaseCounts {
    let mut c = PhaseCounts {
        cohort: cohort as u64,
        in_stage: devices.len() as u64,
        ..PhaseCounts::default()
    };
    for d in devices {
        *match d.phase {
            UpdatePhase::Notified => &mut c.notified,
            UpdatePhase::Downloading => &mut c.downloading,
            UpdatePhase::Installed => &mut c.installed,
            UpdatePhase::Committed => &mut c.committed,
            UpdatePhase::Failed => &mut c.failed,
            UpdatePhase::RolledBack => &mut c.rolled_back,
        } += 1;
    }
    c
}

fn view(r: &RolloutRecord, cohort: usize, devices: &[RolloutDevice]) -> RolloutView {
    RolloutView {
        id: r.id.clone(),
        model: r.model.clone(),
        version: r.version,
        stages: r.plan.stages.clone(),
        stage: r.stage,
        cohort: r.plan.cohort.clone(),
        gates: r.gates.clone(),
        min_committed: r.plan.min_committed,
        max_failed: r.plan.max_failed,
        state: r.state,
        decision: r.decision.clone(),
        counts: counts(cohort, devices),
        created_at: from_ms(r.created_ms),
        updated_at: from_ms(r.updated_ms),
        finished_at: r.finished_ms.map(from_ms),
    }
}

/// The active devices whose labels match the plan's cohort.
async fn cohort(state: &AppState, plan: &rollout::Plan) -> Result<Vec<DeviceId>, crate::Error> {
    Ok(state
        .store()
        .devices()
        .await?
        .into_iter()
        .filter(|d| d.status == protocol::DeviceStatus::Active && plan.in_cohort(&d.labels))
        .map(|d| d.id)
        .collect())
}

async fn load_view(state: &AppState, r: &RolloutRecord) -> Result<RolloutDetail, ApiError> {
    let devices = state
        .store()
        .rollout_devices(r.id.clone())
        .await
        .map_err(ApiError::internal)?;
    let cohort = cohort(state, &r.plan).await.map_err(ApiError::internal)?;
    Ok(RolloutDetail {
        rollout: view(r, cohort.len(), &devices),
        devices,
    })
}

async fn find(state: &AppState, id: &str) -> Result<RolloutRecord, ApiError> {
    state
        .store()
        .rollout(id.to_owned())
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("no-such-rollout", format!("no rollout {id:?}")))
}

/// Starts a staged rollout of a published release.
#[utoipa::path(post, path = "/v1/rollouts", tag = "rollouts",
    security(("operator" = [])),
    request_body = CreateRollout,
    responses(
        (status = 201, description = "Created; the first stage is asked to install", body = RolloutView),
        (status = 400, description = "Bad stages, gate or threshold", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 404, description = "The release is not published", body = protocol::Problem),
        (status = 409, description = "The model has a live rollout already", body = protocol::Problem),
    ))]
pub async fn create(
    State(state): State<AppState>,
    operator: OperatorAuth,
    Json(req): Json<CreateRollout>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let id = format!("ro-{:08x}", rand::rng().next_u32());
    let gates = req
        .gates
        .iter()
        .map(|g| g.parse::<rollout::Gate>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request("bad-gate", e.to_string()))?;
    let mut plan = rollout::Plan::new(
        &id,
        req.stages.unwrap_or_else(|| DEFAULT_STAGES.to_vec()),
        req.cohort,
        gates,
    )
    .map_err(|e| ApiError::bad_request("bad-plan", e.to_string()))?;
    plan.min_committed = req.min_committed.unwrap_or(plan.min_committed);
    plan.max_failed = req.max_failed.unwrap_or(plan.max_failed);
    plan.validate()
        .map_err(|e| ApiError::bad_request("bad-plan", e.to_string()))?;
    let now = crate::store::to_ms(OffsetDateTime::now_utc());
    let record = RolloutRecord {
        id: id.clone(),
        model: req.model.clone(),
        version: req.version,
        plan,
        gates: req.gates,
        state: RolloutState::Active,
        stage: 0,
        decision: "starting stage 1".into(),
        created_ms: now,
        updated_ms: now,
        finished_ms: None,
    };
    match state
        .store()
        .create_rollout(record.clone())
        .await
        .map_err(ApiError::internal)?
    {
        store::CreateRollout::Created => {}
        store::CreateRollout::NoRelease => {
            return Err(ApiError::not_found(
                "no-such-release",
                format!("{}@{} is not published", req.model, req.version),
            ));
        }
        store::CreateRollout::Busy(other) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "rollout-in-progress",
                format!(
                    "{} has a live rollout, {other}: abort it or wait for it to finish",
                    req.model
                ),
            ));
        }
    }
    audit(&state, &operator, "rollout.create", &id, None).await;
    tracing::info!(rollout = %id, model = %req.model, version = req.version, "rollout created");
    step(&state, &record).await.map_err(ApiError::internal)?;
    let record = find(&state, &id).await?;
    let detail = load_view(&state, &record).await?;
    Ok((StatusCode::CREATED, Json(detail.rollout)))
}

async fn audit(
    state: &AppState,
    operator: &OperatorAuth,
    action: &'static str,
    id: &str,
    detail: Option<String>,
) {
    if let Err(e) = state
        .store()
        .audit(operator.id.clone(), action, Some(id.to_owned()), detail)
        .await
    {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

/// Rollouts, newest first.
#[utoipa::path(get, path = "/v1/rollouts", tag = "rollouts",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The rollouts", body = RolloutList),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn list(
    State(state): State<AppState>,
    _operator: OperatorAuth,
) -> Result<Json<RolloutList>, ApiError> {
    let records = state
        .store()
        .rollouts(false)
        .await
        .map_err(ApiError::internal)?;
    let mut rollouts = Vec::with_capacity(records.len());
    for r in &records {
        rollouts.push(load_view(&state, r).await?.rollout);
    }
    Ok(Json(RolloutList { rollouts }))
}

/// One rollout with its devices.
#[utoipa::path(get, path = "/v1/rollouts/{id}", tag = "rollouts",
    security(("operator" = [])),
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The rollout", body = RolloutDetail),
        (status = 404, description = "No such rollout", body = protocol::Problem),
    ))]
pub async fn show(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<RolloutDetail>, ApiError> {
    let record = find(&state, &id).await?;
    Ok(Json(load_view(&state, &record).await?))
}

/// Pauses, resumes or aborts a rollout.
#[utoipa::path(post, path = "/v1/rollouts/{id}/{action}", tag = "rollouts",
    security(("operator" = [])),
    params(("id" = String, Path), ("action" = String, Path, description = "`pause`, `resume` or `abort`")),
    responses(
        (status = 200, description = "Done", body = RolloutView),
        (status = 404, description = "No such rollout or action", body = protocol::Problem),
        (status = 409, description = "Not possible in the rollout's state", body = protocol::Problem),
    ))]
pub async fn act(
    State(state): State<AppState>,
    operator: OperatorAuth,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let record = find(&state, &id).await?;
    let conflict = |what: &str| {
        ApiError::new(
            StatusCode::CONFLICT,
            "rollout-state",
            format!(
                "rollout {id} is {}: cannot {what} it",
                record.state.as_str()
            ),
        )
    };
    let changed = match action.as_str() {
        "pause" | "resume" => {
            let (from, to) = if action == "pause" {
                (RolloutState::Active, RolloutState::Paused)
            } else {
                (RolloutState::Paused, RolloutState::Active)
            };
            if record.state != from {
                return Err(conflict(&action));
            }
            state
                .store()
                .set_rollout_state(
                    id.clone(),
                    to,
                    record.stage,
                    format!("{action}d by {}", operator.id),
                )
                .await
        }
        "abort" => {
            let reason = format!("aborted by {}", operator.id);
            let queued = state
                .store()
                .abort_rollout(id.clone(), reason, operator.id.clone())
                .await
                .map_err(ApiError::internal)?;
            match queued {
                None => return Err(conflict("abort")),
                Some(queued) => {
                    wake_devices(&state, &queued);
                    state.metrics().rollouts_aborted.inc();
                    Ok(true)
                }
            }
        }
        other => {
            return Err(ApiError::not_found(
                "no-such-action",
                format!("{other:?} is not a rollout action: pause, resume or abort"),
            ));
        }
    }
    .map_err(ApiError::internal)?;
    if !changed {
        return Err(conflict(&action));
    }
    if action != "abort" {
        audit(
            &state,
            &operator,
            "rollout.state",
            &id,
            Some(action.clone()),
        )
        .await;
    }
    tracing::info!(rollout = %id, %action, operator = %operator.id, "rollout changed by operator");
    state.rollout_wake().notify_one();
    let record = find(&state, &id).await?;
    Ok(Json(load_view(&state, &record).await?.rollout))
}

/// A device reports on its update for a rollout.
#[utoipa::path(post, path = "/v1/devices/{id}/rollouts/{rollout_id}", tag = "rollouts",
    security(("device_certificate" = [])),
    params(("id" = String, Path), ("rollout_id" = String, Path)),
    request_body = UpdateReport,
    responses(
        (status = 204, description = "Recorded (or older than what is recorded)"),
        (status = 400, description = "Malformed body", body = protocol::Problem),
        (status = 403, description = "Another device's id", body = protocol::Problem),
        (status = 404, description = "The device is not part of the rollout", body = protocol::Problem),
    ))]
pub async fn report(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((id, rollout_id)): Path<(String, String)>,
    Json(report): Json<UpdateReport>,
) -> Result<StatusCode, ApiError> {
    device.require_self(&id, &state)?;
    if report.phase == UpdatePhase::Notified {
        return Err(ApiError::bad_request(
            "bad-phase",
            "`notified` is the hub's phase; a device reports downloading, installed, committed, failed or rolled_back",
        ));
    }
    if report.p95_ms.is_some_and(|p| !p.is_finite() || p < 0.0) {
        return Err(ApiError::bad_request(
            "bad-latency",
            "p95_ms must be a finite, non-negative number",
        ));
    }
    let phase = report.phase;
    match state
        .store()
        .record_update_report(rollout_id.clone(), device.id.clone(), report)
        .await
        .map_err(ApiError::internal)?
    {
        ReportOutcome::NotInRollout => Err(ApiError::not_found(
            "not-in-rollout",
            format!("device {} is not part of rollout {rollout_id}", device.id),
        )),
        ReportOutcome::Stale => Ok(StatusCode::NO_CONTENT),
        ReportOutcome::Stored => {
            tracing::info!(device = %device.id, rollout = %rollout_id, phase = phase.as_str(), "update report");
            state.metrics().update_report(phase.as_str());
            state.rollout_wake().notify_one();
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

fn wake_devices(state: &AppState, queued: &[(DeviceId, protocol::DeviceMessageEnvelope)]) {
    for (device, envelope) in queued {
        state.bus().notify(device, envelope.seq);
    }
}

/// One controller step of one live rollout.
async fn step(state: &AppState, r: &RolloutRecord) -> Result<(), crate::Error> {
    if r.state != RolloutState::Active {
        return Ok(());
    }
    let cohort = cohort(state, &r.plan).await?;
    let ids: Vec<&str> = cohort.iter().map(DeviceId::as_str).collect();
    let order = r.plan.order(ids.iter().copied());
    let mut stage = r.stage;
    loop {
        let mut known: BTreeMap<DeviceId, RolloutDevice> = state
            .store()
            .rollout_devices(r.id.clone())
            .await?
            .into_iter()
            .map(|d| (d.device_id.clone(), d))
            .collect();
        let size = r.plan.stage_size(stage, order.len());
        let members: Vec<DeviceId> = order[..size].iter().map(|id| DeviceId::new(*id)).collect();
        let new: Vec<DeviceId> = members
            .iter()
            .filter(|d| !known.contains_key(*d))
            .cloned()
            .collect();
        if !new.is_empty() {
            let queued = state
                .store()
                .add_rollout_devices(r.clone(), stage, new)
                .await?;
            tracing::info!(rollout = %r.id, stage = stage + 1, devices = queued.len(), "devices asked to install");
            wake_devices(state, &queued);
            known = state
                .store()
                .rollout_devices(r.id.clone())
                .await?
                .into_iter()
                .map(|d| (d.device_id.clone(), d))
                .collect();
        }
        // The stage's reports: its members, and devices that left the cohort
        // after they were asked (their failures still count).
        let reports: Vec<rollout::Report> = known
            .values()
            .filter(|d| d.stage <= stage)
            .map(|d| rollout::Report {
                state: decision_state(d.phase),
                requests: d.requests,
                errors: d.errors,
                p95_ms: d.p95_ms,
            })
            .collect();
        match r.plan.decide(stage, &reports) {
            rollout::Decision::Hold { reason } => {
                if stage != r.stage {
                    state
                        .store()
                        .set_rollout_state(r.id.clone(), RolloutState::Active, stage, reason)
                        .await?;
                } else {
                    state
                        .store()
                        .set_rollout_decision(r.id.clone(), reason)
                        .await?;
                }
                return Ok(());
            }
            rollout::Decision::Promote { to_stage } => {
                let reason = format!("stage {} passed; opening stage {}", stage + 1, to_stage + 1);
                tracing::info!(rollout = %r.id, %reason, "rollout promoted");
                if !state
                    .store()
                    .set_rollout_state(r.id.clone(), RolloutState::Active, to_stage, reason)
                    .await?
                {
                    return Ok(());
                }
                state.metrics().rollout_stages_promoted.inc();
                stage = to_stage;
            }
            rollout::Decision::Complete => {
                let reason = format!(
                    "completed: {} of {} devices committed",
                    reports
                        .iter()
                        .filter(|r| r.state == rollout::DeviceState::Committed)
                        .count(),
                    reports.len()
                );
                tracing::info!(rollout = %r.id, %reason, "rollout completed");
                if state
                    .store()
                    .set_rollout_state(r.id.clone(), RolloutState::Completed, stage, reason)
                    .await?
                {
                    state.metrics().rollouts_completed.inc();
                }
                return Ok(());
            }
            rollout::Decision::Abort { reason } => {
                tracing::warn!(rollout = %r.id, %reason, "rollout aborted; rolling the stage back");
                if let Some(queued) = state
                    .store()
                    .abort_rollout(r.id.clone(), reason, "controller".into())
                    .await?
                {
                    wake_devices(state, &queued);
                    state.metrics().rollouts_aborted.inc();
                }
                return Ok(());
            }
        }
    }
}

/// Runs the rollout controller until the hub stops.
pub async fn controller(state: AppState) {
    let wake: Arc<Notify> = state.rollout_wake_handle();
    let interval = state.config().rollout_interval;
    loop {
        match state.store().rollouts(true).await {
            Ok(live) => {
                for r in &live {
                    if let Err(e) = step(&state, r).await {
                        tracing::error!(rollout = %r.id, error = %e, "rollout step failed");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the live rollouts"),
        }
        // Reports arrive in bursts; a short pause lets one step see many.
        let _ = tokio::time::timeout(interval, wake.notified()).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
