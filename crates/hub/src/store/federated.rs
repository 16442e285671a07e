//! Federated tasks, their rounds and what devices submitted. The
//! coordinator writes every state change here before it acts on it, so a hub
//! killed in the middle of a round resumes the round, in its phase, from
//! these rows.

use protocol::federated::{CreateFlTask, FlPhase, FlRoundSummary, FlTaskState};
use protocol::{DeviceId, DeviceMessage};
use rusqlite::{OptionalExtension, params};

use super::{Store, append_message};
use crate::Error;

/// A task as stored.
#[derive(Debug, Clone)]
pub struct FlTaskRecord {
    /// Its id.
    pub id: String,
    /// The spec, defaults filled in.
    pub spec: CreateFlTask,
    /// Where it is.
    pub state: FlTaskState,
    /// Rounds that produced a model.
    pub completed_rounds: u32,
    /// The global model.
    pub model: Vec<f32>,
    /// The privacy accountant, as JSON.
    pub accountant: String,
    /// Finished rounds.
    pub history: Vec<FlRoundSummary>,
    /// Why it stopped.
    pub detail: Option<String>,
    /// Created, unix ms.
    pub created_ms: i64,
    /// The operator's held-out evaluation set, if any (never changes).
    pub held_out: Option<std::sync::Arc<federated::model::Dataset>>,
}

/// A round as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FlRoundRecord {
    /// The task.
    pub task_id: String,
    /// The round number, from 1.
    pub round: u32,
    /// Its phase.
    pub phase: FlPhase,
    /// When the phase closes, unix ms.
    pub phase_deadline_ms: i64,
    /// When the round started, unix ms.
    pub started_ms: i64,
    /// Invited devices.
    pub selected: Vec<DeviceId>,
    /// Eligible devices when it started (the sampling rate's denominator).
    pub eligible: u32,
    /// Secure aggregation: the roster, as JSON.
    pub roster: Option<String>,
    /// Secure aggregation: roster indices whose shares were delivered.
    pub u2: Option<Vec<u32>>,
    /// Secure aggregation: roster indices whose masked updates arrived.
    pub u3: Option<Vec<u32>>,
    /// Refused submissions by reason, as JSON.
    pub refused: String,
}

/// What became of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored for the first time.
    New,
    /// The device had already submitted this kind in this round.
    Duplicate,
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn json<T: serde::de::DeserializeOwned>(i: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn task_state(s: &str) -> FlTaskState {
    match s {
        "running" => FlTaskState::Running,
        "completed" => FlTaskState::Completed,
        "stopped" => FlTaskState::Stopped,
        _ => FlTaskState::Failed,
    }
}

/// The stored name of a task state.
pub fn task_state_str(s: FlTaskState) -> &'static str {
    match s {
        FlTaskState::Running => "running",
        FlTaskState::Completed => "completed",
        FlTaskState::Failed => "failed",
        FlTaskState::Stopped => "stopped",
    }
}

/// The stored name of a phase.
pub fn phase_str(p: FlPhase) -> &'static str {
    match p {
        FlPhase::Train => "train",
        FlPhase::Advertise => "advertise",
        FlPhase::Share => "share",
        FlPhase::Masked => "masked",
        FlPhase::Unmask => "unmask",
        FlPhase::Closed => "closed",
    }
}

fn phase(s: &str) -> FlPhase {
    match s {
        "train" => FlPhase::Train,
        "advertise" => FlPhase::Advertise,
        "share" => FlPhase::Share,
        "masked" => FlPhase::Masked,
        "unmask" => FlPhase::Unmask,
        _ => FlPhase::Closed,
    }
}

const TASK_SELECT: &str = "SELECT id, spec, state, completed_rounds, model, accountant, history,
    detail, created_at, held_out_features, held_out_labels FROM fl_tasks";

fn spec_inputs(r: &rusqlite::Row<'_>) -> rusqlite::Result<usize> {
    let spec: CreateFlTask = json(1, r.get(1)?)?;
    Ok(spec.model.inputs)
}

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FlTaskRecord> {
    Ok(FlTaskRecord {
        id: r.get(0)?,
        spec: json(1, r.get(1)?)?,
        state: task_state(&r.get::<_, String>(2)?),
        completed_rounds: r.get::<_, i64>(3)? as u32,
        model: from_blob(&r.get::<_, Vec<u8>>(4)?),
        accountant: r.get(5)?,
        history: json(6, r.get(6)?)?,
        detail: r.get(7)?,
        created_ms: r.get(8)?,
        held_out: match (
            r.get::<_, Option<Vec<u8>>>(9)?,
            r.get::<_, Option<Vec<u8>>>(10)?,
        ) {
            (Some(features), Some(labels)) => {
                Some(std::sync::Arc::new(federated::model::Dataset {
                    inputs: spec_inputs(r)?,
                    features: from_blob(&features),
                    labels: labels
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                }))
            }
            _ => None,
        },
    })
}

const ROUND_SELECT: &str = "SELECT task_id, round, phase, phase_deadline, started_at, selected,
    eligible, roster, u2, u3, refused FROM fl_rounds";

fn round_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FlRoundRecord> {
    let opt_json = |i: usize| -> rusqlite::Result<Option<Vec<u32>>> {
        r.get::<_, Option<String>>(i)?
            .map(|t| json(i, t))
            .transpose()
    };
    Ok(FlRoundRecord {
        task_id: r.get(0)?,
        round: r.get::<_, i64>(1)? as u32,
        phase: phase(&r.get::<_, String>(2)?),
        phase_deadline_ms: r.get(3)?,
        started_ms: r.get(4)?,
        selected: json(5, r.get(5)?)?,
        eligible: r.get::<_, i64>(6)? as u32,
        roster: r.get(7)?,
        u2: opt_json(8)?,
        u3: opt_json(9)?,
        refused: r.get(10)?,
    })
}

impl Store {
    /// Stores a new task.
    pub async fn create_fl_task(&self, t: FlTaskRecord) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO fl_tasks (id, spec, state, completed_rounds, model, accountant,
                 history, detail, created_at, updated_at, held_out_features, held_out_labels)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11)",
                params![
                    t.id,
                    serde_json::to_string(&t.spec)?,
                    task_state_str(t.state),
                    i64::from(t.completed_rounds),
                    to_blob(&t.model),
                    t.accountant,
                    serde_json::to_string(&t.history)?,
                    t.detail,
                    t.created_ms,
                    t.held_out.as_ref().map(|d| to_blob(&d.features)),
                    t.held_out.as_ref().map(|d| d
                        .labels
                        .iter()
                        .flat_map(|l| l.to_le_bytes())
                        .collect::<Vec<u8>>()),
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Every task, newest first.
    pub async fn fl_tasks(&self) -> Result<Vec<FlTaskRecord>, Error> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!("{TASK_SELECT} ORDER BY created_at DESC, id"))?;
            let rows = stmt.query_map([], task_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The open (not closed) round of every task.
    pub async fn fl_open_rounds(&self) -> Result<Vec<FlRoundRecord>, Error> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!("{ROUND_SELECT} WHERE phase != 'closed'"))?;
            let rows = stmt.query_map([], round_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The highest round number a task has started (0 if none).
    pub async fn fl_last_round(&self, task_id: String) -> Result<u32, Error> {
        self.call(move |c| {
            let n: Option<i64> = c.query_row(
                "SELECT MAX(round) FROM fl_rounds WHERE task_id = ?1",
                [task_id],
                |r| r.get(0),
            )?;
            Ok(n.unwrap_or(0) as u32)
        })
        .await
    }

    /// Opens a round and stores an invitation for every selected device, in
    /// one transaction. Returns the invitations' sequence numbers.
    pub async fn open_fl_round(&self, r: FlRoundRecord) -> Result<Vec<(DeviceId, i64)>, Error> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO fl_rounds (task_id, round, phase, phase_deadline, started_at,
                 selected, eligible, roster, u2, u3, refused)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL, NULL, ?8)",
                params![
                    r.task_id,
                    i64::from(r.round),
                    phase_str(r.phase),
                    r.phase_deadline_ms,
                    r.started_ms,
                    serde_json::to_string(&r.selected)?,
                    i64::from(r.eligible),
                    r.refused,
                ],
            )?;
            let mut sent = Vec::with_capacity(r.selected.len());
            for d in &r.selected {
                let envelope = append_message(
                    &tx,
                    d,
                    &DeviceMessage::FlInvite {
                        task_id: r.task_id.clone(),
                        round: r.round,
                    },
                )?;
                sent.push((d.clone(), envelope.seq));
            }
            tx.commit()?;
            Ok(sent)
        })
        .await
    }

    /// Moves a round to its next phase, with what the phase fixes.
    pub async fn advance_fl_round(&self, r: FlRoundRecord) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "UPDATE fl_rounds SET phase = ?3, phase_deadline = ?4, roster = ?5, u2 = ?6,
                 u3 = ?7, refused = ?8 WHERE task_id = ?1 AND round = ?2",
                params![
                    r.task_id,
                    i64::from(r.round),
                    phase_str(r.phase),
                    r.phase_deadline_ms,
                    r.roster,
                    r.u2.as_ref().map(serde_json::to_string).transpose()?,
                    r.u3.as_ref().map(serde_json::to_string).transpose()?,
                    r.refused,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Records the refusal counts of a round (a JSON object of counts by
    /// reason), keeping for each reason the larger of the stored and the
    /// given count: counts only grow, so a snapshot that arrives after a
    /// newer one takes nothing back.
    pub async fn set_fl_refused(
        &self,
        task_id: String,
        round: u32,
        refused: String,
    ) -> Result<(), Error> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let stored: Option<String> = tx
                .query_row(
                    "SELECT refused FROM fl_rounds WHERE task_id = ?1 AND round = ?2",
                    params![task_id, i64::from(round)],
                    |r| r.get(0),
                )
                .optional()?;
            let parse = |text: &str| {
                serde_json::from_str::<std::collections::BTreeMap<String, u64>>(text)
                    .unwrap_or_default()
            };
            let mut counts = parse(&refused);
            for (reason, n) in parse(stored.as_deref().unwrap_or("{}")) {
                let c = counts.entry(reason).or_default();
                *c = (*c).max(n);
            }
            let merged = serde_json::to_string(&counts).unwrap_or(refused);
            tx.execute(
                "UPDATE fl_rounds SET refused = ?3 WHERE task_id = ?1 AND round = ?2",
                params![task_id, i64::from(round), merged],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Stores one device's submission of one kind in a round, once.
    pub async fn put_fl_submission(
        &self,
        task_id: String,
        round: u32,
        device: DeviceId,
        kind: &'static str,
        body: Vec<u8>,
    ) -> Result<Stored, Error> {
        self.call(move |c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO fl_submissions (task_id, round, device_id, kind, body,
                 received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    task_id,
                    i64::from(round),
                    device.as_str(),
                    kind,
                    body,
                    super::to_ms(time::OffsetDateTime::now_utc()),
                ],
            )?;
            Ok(if n == 1 {
                Stored::New
            } else {
                Stored::Duplicate
            })
        })
        .await
    }

    /// Which devices submitted what in a round: `(device, kind)` pairs.
    pub async fn fl_submitters(
        &self,
        task_id: String,
        round: u32,
    ) -> Result<Vec<(DeviceId, String)>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT device_id, kind FROM fl_submissions WHERE task_id = ?1 AND round = ?2",
            )?;
            let rows = stmt.query_map(params![task_id, i64::from(round)], |r| {
                Ok((
                    DeviceId::new(r.get::<_, String>(0)?),
                    r.get::<_, String>(1)?,
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Folds every submission of `kind` in a round into `acc`, one at a
    /// time, so that a streaming aggregation never holds them all. Runs on
    /// the blocking pool.
    pub async fn fold_fl_submissions<A, F>(
        &self,
        task_id: String,
        round: u32,
        kind: &'static str,
        mut acc: A,
        mut each: F,
    ) -> Result<A, Error>
    where
        A: Send + 'static,
        F: FnMut(&mut A, DeviceId, &[u8]) -> Result<(), Error> + Send + 'static,
    {
        self.call(move |c| {
            {
                let mut stmt = c.prepare(
                    "SELECT device_id, body FROM fl_submissions
                     WHERE task_id = ?1 AND round = ?2 AND kind = ?3 ORDER BY device_id",
                )?;
                let mut rows = stmt.query(params![task_id, i64::from(round), kind])?;
                while let Some(row) = rows.next()? {
                    let device = DeviceId::new(row.get::<_, String>(0)?);
                    let body = row.get_ref(1)?.as_blob().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Blob,
                            Box::new(e),
                        )
                    })?;
                    each(&mut acc, device, body)?;
                }
            }
            Ok(acc)
        })
        .await
    }

    /// Stores the encrypted shares a roster member sent, addressed by
    /// recipient, in one transaction with its submission marker.
    pub async fn put_fl_shares(
        &self,
        task_id: String,
        round: u32,
        device: DeviceId,
        shares: Vec<(u32, u32, Vec<u8>)>,
    ) -> Result<Stored, Error> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO fl_submissions (task_id, round, device_id, kind, body,
                 received_at) VALUES (?1, ?2, ?3, 'shares', x'', ?4)",
                params![
                    task_id,
                    i64::from(round),
                    device.as_str(),
                    super::to_ms(time::OffsetDateTime::now_utc()),
                ],
            )?;
            if n == 0 {
                return Ok(Stored::Duplicate);
            }
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO fl_shares (task_id, round, recipient, sender, body)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (sender, recipient, body) in shares {
                    stmt.execute(params![
                        task_id,
                        i64::from(round),
                        i64::from(recipient),
                        i64::from(sender),
                        body
                    ])?;
                }
            }
            tx.commit()?;
            Ok(Stored::New)
        })
        .await
    }

    /// The encrypted shares addressed to roster index `recipient`.
    pub async fn fl_shares_for(
        &self,
        task_id: String,
        round: u32,
        recipient: u32,
    ) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT sender, body FROM fl_shares
                 WHERE task_id = ?1 AND round = ?2 AND recipient = ?3 ORDER BY sender",
            )?;
            let rows = stmt.query_map(
                params![task_id, i64::from(round), i64::from(recipient)],
                |r| Ok((r.get::<_, i64>(0)? as u32, r.get::<_, Vec<u8>>(1)?)),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Closes a round and stores the task's new state in one transaction,
    /// then drops the round's submissions (the model is what remains).
    pub async fn finish_fl_round(
        &self,
        task: FlTaskRecord,
        round: u32,
        refused: String,
    ) -> Result<(), Error> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE fl_rounds SET phase = 'closed', refused = ?3
                 WHERE task_id = ?1 AND round = ?2",
                params![task.id, i64::from(round), refused],
            )?;
            update_task(&tx, &task)?;
            tx.execute(
                "DELETE FROM fl_submissions WHERE task_id = ?1 AND round = ?2",
                params![task.id, i64::from(round)],
            )?;
            tx.execute(
                "DELETE FROM fl_shares WHERE task_id = ?1 AND round = ?2",
                params![task.id, i64::from(round)],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Stores a task's state (no round change).
    pub async fn update_fl_task(&self, task: FlTaskRecord) -> Result<(), Error> {
        self.call(move |c| update_task(c, &task)).await
    }

    /// One task.
    pub async fn fl_task(&self, id: String) -> Result<Option<FlTaskRecord>, Error> {
        self.call(move |c| {
            Ok(
                c.query_row(&format!("{TASK_SELECT} WHERE id = ?1"), [id], task_row)
                    .optional()?,
            )
        })
        .await
    }
}

fn update_task(c: &rusqlite::Connection, task: &FlTaskRecord) -> Result<(), Error> {
    c.execute(
        "UPDATE fl_tasks SET state = ?2, completed_rounds = ?3, model = ?4, accountant = ?5,
         history = ?6, detail = ?7, updated_at = ?8 WHERE id = ?1",
        params![
            task.id,
            task_state_str(task.state),
            i64::from(task.completed_rounds),
            to_blob(&task.model),
            task.accountant,
            serde_json::to_string(&task.history)?,
            task.detail,
            super::to_ms(time::OffsetDateTime::now_utc()),
        ],
    )?;
    Ok(())
}
