//! Rollouts: the plan, where the controller has got to, and what each device
//! reported. The controller's every step is one transaction here, so a hub
//! killed at any point resumes from what the store says.

use protocol::rollout::{RolloutDevice, RolloutState, UpdatePhase, UpdateReport};
use protocol::{DeviceId, DeviceMessage, DeviceMessageEnvelope};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{Store, append_message, from_ms, to_ms};
use crate::Error;

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    /// Its id.
    pub id: String,
    /// The model.
    pub model: String,
    /// The release.
    pub version: u64,
    /// The plan: stages, cohort, parsed gates and thresholds.
    pub plan: rollout::Plan,
    /// The gates as the operator wrote them.
    pub gates: Vec<String>,
    /// Where it is.
    pub state: RolloutState,
    /// The current stage, 0-based.
    pub stage: usize,
    /// The controller's last decision, in words.
    pub decision: String,
    /// Created, unix ms.
    pub created_ms: i64,
    /// Last state or stage change, unix ms.
    pub updated_ms: i64,
    /// Completed or aborted, unix ms.
    pub finished_ms: Option<i64>,
}

/// Why a rollout could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRollout {
    /// Created.
    Created,
    /// The release is not published.
    NoRelease,
    /// Another rollout of the model is active or paused.
    Busy(String),
}

/// What became of a device's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Stored.
    Stored,
    /// Older than a report already stored; ignored.
    Stale,
    /// The device is not part of the rollout (or the rollout is unknown).
    NotInRollout,
}

const ROLLOUT_SELECT: &str = "SELECT id, model, version, plan, gates, state, stage, decision,
    created_at, updated_at, finished_at FROM rollouts";

fn json<T: serde::de::DeserializeOwned>(i: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRecord> {
    let state: String = r.get(5)?;
    Ok(RolloutRecord {
        id: r.get(0)?,
        model: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
        plan: json(3, r.get(3)?)?,
        gates: json(4, r.get(4)?)?,
        // The CHECK constraint admits only the four states; a damaged row
        // reads as aborted, which stops it.
        state: RolloutState::parse(&state).unwrap_or(RolloutState::Aborted),
        stage: r.get::<_, i64>(6)? as usize,
        decision: r.get(7)?,
        created_ms: r.get(8)?,
        updated_ms: r.get(9)?,
        finished_ms: r.get(10)?,
    })
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutDevice> {
    let phase: String = r.get(2)?;
    Ok(RolloutDevice {
        device_id: DeviceId::new(r.get::<_, String>(0)?),
        stage: r.get::<_, i64>(1)? as usize,
        phase: UpdatePhase::parse(&phase).unwrap_or(UpdatePhase::Failed),
        detail: r.get(3)?,
        requests: r.get::<_, i64>(4)? as u64,
        errors: r.get::<_, i64>(5)? as u64,
        p95_ms: r.get(6)?,
        updated_at: from_ms(r.get(7)?),
    })
}

impl Store {
    /// Creates a rollout, unless the release is unknown or the model has a
    /// live rollout already.
    pub async fn create_rollout(&self, r: RolloutRecord) -> Result<CreateRollout, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let published: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM models WHERE name = ?1 AND version = ?2",
                    params![r.model, r.version as i64],
                    |row| row.get(0),
                )
                .optional()?;
            if published.is_none() {
                return Ok(CreateRollout::NoRelease);
            }
            let live: Option<String> = tx
                .query_row(
                    "SELECT id FROM rollouts WHERE model = ?1 AND state IN ('active', 'paused')",
                    [&r.model],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(id) = live {
                return Ok(CreateRollout::Busy(id));
            }
            tx.execute(
                "INSERT INTO rollouts (id, model, version, plan, gates, state, stage, decision,
                 created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?8)",
                params![
                    r.id,
                    r.model,
                    r.version as i64,
                    serde_json::to_string(&r.plan)?,
                    serde_json::to_string(&r.gates)?,
                    r.state.as_str(),
                    r.decision,
                    r.created_ms,
                ],
            )?;
            tx.commit()?;
            Ok(CreateRollout::Created)
        })
        .await
    }

    /// Rollouts, newest first; only the live ones (active or paused) if `live`.
    pub async fn rollouts(&self, live: bool) -> Result<Vec<RolloutRecord>, Error> {
        self.call(move |c| {
            let sql = if live {
                format!(
                    "{ROLLOUT_SELECT} WHERE state IN ('active', 'paused') ORDER BY created_at DESC"
                )
            } else {
                format!("{ROLLOUT_SELECT} ORDER BY created_at DESC, id")
            };
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map([], rollout_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One rollout.
    pub async fn rollout(&self, id: String) -> Result<Option<RolloutRecord>, Error> {
        self.call(move |c| {
            Ok(c.query_row(
                &format!("{ROLLOUT_SELECT} WHERE id = ?1"),
                [id],
                rollout_row,
            )
            .optional()?)
        })
        .await
    }

    /// The devices a rollout has asked to install, by stage then id.
    pub async fn rollout_devices(&self, id: String) -> Result<Vec<RolloutDevice>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT device_id, stage, phase, detail, requests, errors, p95_ms, updated_at
                 FROM rollout_devices WHERE rollout_id = ?1 ORDER BY stage, device_id",
            )?;
            let rows = stmt.query_map([id], device_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Brings `devices` into the rollout at `stage` and queues the install
    /// message for each, in one transaction. Devices already in it are
    /// skipped. Returns the messages queued, to wake their streams.
    pub async fn add_rollout_devices(
        &self,
        rollout: RolloutRecord,
        stage: usize,
        devices: Vec<DeviceId>,
    ) -> Result<Vec<(DeviceId, DeviceMessageEnvelope)>, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = to_ms(OffsetDateTime::now_utc());
            let message = DeviceMessage::Install {
                rollout_id: rollout.id.clone(),
                model: rollout.model.clone(),
                version: rollout.version,
            };
            let mut queued = Vec::new();
            for device in devices {
                let added = tx.execute(
                    "INSERT INTO rollout_devices (rollout_id, device_id, stage, phase, updated_at)
                     VALUES (?1, ?2, ?3, 'notified', ?4) ON CONFLICT DO NOTHING",
                    params![rollout.id, device.as_str(), stage as i64, now],
                )?;
                if added == 1 {
                    let envelope = append_message(&tx, &device, &message)?;
                    queued.push((device, envelope));
                }
            }
            tx.commit()?;
            Ok(queued)
        })
        .await
    }

    /// Moves a rollout to `state` at `stage` with a decision, unless it is
    /// already finished (completed or aborted rollouts stay so). Returns
    /// false if nothing changed.
    pub async fn set_rollout_state(
        &self,
        id: String,
        state: RolloutState,
        stage: usize,
        decision: String,
    ) -> Result<bool, Error> {
        self.call(move |c| {
            let now = to_ms(OffsetDateTime::now_utc());
            let finished =
                matches!(state, RolloutState::Completed | RolloutState::Aborted).then_some(now);
            let n = c.execute(
                "UPDATE rollouts SET state = ?2, stage = ?3, decision = ?4, updated_at = ?5,
                 finished_at = ?6 WHERE id = ?1 AND state IN ('active', 'paused')",
                params![id, state.as_str(), stage as i64, decision, now, finished],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Records the controller's latest reason for holding (no state change).
    pub async fn set_rollout_decision(&self, id: String, decision: String) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "UPDATE rollouts SET decision = ?2 WHERE id = ?1 AND decision <> ?2",
                params![id, decision],
            )?;
            Ok(())
        })
        .await
    }

    /// Aborts a live rollout and queues a roll-back message for each of its
    /// devices that may run the new version, in one transaction. Returns
    /// `None` if the rollout is not live.
    pub async fn abort_rollout(
        &self,
        id: String,
        reason: String,
        actor: String,
    ) -> Result<Option<Vec<(DeviceId, DeviceMessageEnvelope)>>, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = to_ms(OffsetDateTime::now_utc());
            let row: Option<(String, i64)> = tx
                .query_row(
                    "SELECT model, version FROM rollouts
                     WHERE id = ?1 AND state IN ('active', 'paused')",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((model, version)) = row else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE rollouts SET state = 'aborted', decision = ?2, updated_at = ?3,
                 finished_at = ?3 WHERE id = ?1",
                params![id, reason, now],
            )?;
            let devices: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT device_id FROM rollout_devices WHERE rollout_id = ?1
                     AND phase NOT IN ('failed', 'rolled_back') ORDER BY device_id",
                )?;
                let rows = stmt.query_map([&id], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let message = DeviceMessage::RollBack {
                rollout_id: id.clone(),
                model,
                version: version as u64,
            };
            let mut queued = Vec::new();
            for device in devices {
                let device = DeviceId::new(device);
                let envelope = append_message(&tx, &device, &message)?;
                queued.push((device, envelope));
            }
            super::audit(&tx, &actor, "rollout.abort", Some(&id), Some(&reason))?;
            tx.commit()?;
            Ok(Some(queued))
        })
        .await
    }

    /// Stores a device's report on a rollout if it is newer than the last.
    pub async fn record_update_report(
        &self,
        rollout_id: String,
        device: DeviceId,
        report: UpdateReport,
    ) -> Result<ReportOutcome, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let seen: Option<i64> = tx
                .query_row(
                    "SELECT report_seq FROM rollout_devices WHERE rollout_id = ?1 AND device_id = ?2",
                    params![rollout_id, device.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(seen) = seen else {
                return Ok(ReportOutcome::NotInRollout);
            };
            if report.seq as i64 <= seen {
                return Ok(ReportOutcome::Stale);
            }
            tx.execute(
                // Health figures accumulate: a later report without them
                // (a roll-back) keeps what the health window measured.
                "UPDATE rollout_devices SET report_seq = ?3, phase = ?4, serving_version = ?5,
                 detail = ?6, requests = max(requests, ?7), errors = max(errors, ?8),
                 p95_ms = coalesce(?9, p95_ms), updated_at = ?10
                 WHERE rollout_id = ?1 AND device_id = ?2",
                params![
                    rollout_id,
                    device.as_str(),
                    report.seq as i64,
                    report.phase.as_str(),
                    report.serving_version.map(|v| v as i64),
                    report.detail,
                    report.requests as i64,
                    report.errors as i64,
                    report.p95_ms,
                    to_ms(OffsetDateTime::now_utc()),
                ],
            )?;
            tx.commit()?;
            Ok(ReportOutcome::Stored)
        })
        .await
    }
}
