//! The agent's durable state: its identity files and a SQLite database.
//!
//! Layout of the data directory:
//! - `identity/device.key`: the device's private key (0600), generated here
//!   and never sent anywhere;
//! - `identity/device.crt`, `identity/ca.crt`: what the hub issued;
//! - `agent.db`: enrolment facts and the hub messages processed so far;
//! - `local-api.addr`: where the running agent's local API listens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::rollout::{UpdatePhase, UpdateReport};
use protocol::{DeviceId, DeviceMessageEnvelope, Labels};
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE enrolment (
        singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
        device_id   TEXT NOT NULL,
        name        TEXT NOT NULL,
        hub_url     TEXT NOT NULL,
        labels      TEXT NOT NULL,
        enrolled_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE hub_messages (
        seq         INTEGER PRIMARY KEY,
        body        TEXT NOT NULL,
        received_at INTEGER NOT NULL
    ) STRICT;
"#,
    // 2: model updates asked for by rollouts, and the reports owed on them.
    r#"
    CREATE TABLE updates (
        rollout_id         TEXT PRIMARY KEY,
        model              TEXT NOT NULL,
        version            INTEGER NOT NULL,
        phase              TEXT NOT NULL,
        detail             TEXT,
        serving_version    INTEGER,
        requests           INTEGER NOT NULL DEFAULT 0,
        errors             INTEGER NOT NULL DEFAULT 0,
        p95_ms             REAL,
        rollback_requested INTEGER NOT NULL DEFAULT 0,
        seq                INTEGER NOT NULL DEFAULT 0,
        sent_seq           INTEGER NOT NULL DEFAULT 0,
        created_at         INTEGER NOT NULL,
        updated_at         INTEGER NOT NULL
    ) STRICT;
"#,
    // Money spent on the macro tier per UTC day (days since the epoch),
    // so that the daily budget holds across restarts.
    r#"
    CREATE TABLE macro_spend (
        day INTEGER PRIMARY KEY,
        usd REAL NOT NULL
    ) STRICT;
"#,
];

/// Paths in the agent's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Identity directory.
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }
    /// Device private key.
    pub fn key(&self) -> PathBuf {
        self.identity().join("device.key")
    }
    /// Device certificate.
    pub fn cert(&self) -> PathBuf {
        self.identity().join("device.crt")
    }
    /// Hub CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.identity().join("ca.crt")
    }
    /// SQLite state.
    pub fn database(&self) -> PathBuf {
        self.root.join("agent.db")
    }
    /// Address of the running local API.
    pub fn local_api_addr(&self) -> PathBuf {
        self.root.join("local-api.addr")
    }
}

/// What the agent learnt when it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// Id the hub gave this device.
    pub device_id: DeviceId,
    /// Display name.
    pub name: String,
    /// Hub base URL.
    pub hub_url: String,
    /// Labels from the join token.
    pub labels: Labels,
}

/// The agent's SQLite state.
#[derive(Clone)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State(sqlite)")
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl State {
    /// Opens (creating if needed) and migrates the database.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if applied > MIGRATIONS.len() as i64 {
            return Err(Error::Config(format!(
                "agent database has schema version {applied}, this build knows up to {}; upgrade strata",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, Error> {
        self.conn
            .lock()
            .map_err(|_| Error::Config("agent state lock poisoned".into()))
    }

    /// Records the enrolment (once).
    pub fn save_enrolment(&self, e: &Enrolment) -> Result<(), Error> {
        self.lock()?.execute(
            "INSERT INTO enrolment (singleton, device_id, name, hub_url, labels, enrolled_at)
             VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![
                e.device_id.as_str(),
                e.name,
                e.hub_url,
                serde_json::to_string(&e.labels)?,
                now_ms()
            ],
        )?;
        Ok(())
    }

    /// The enrolment, if the device has joined.
    pub fn enrolment(&self) -> Result<Option<Enrolment>, Error> {
        let row = self
            .lock()?
            .query_row(
                "SELECT device_id, name, hub_url, labels FROM enrolment WHERE singleton = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, name, hub_url, labels)| {
            Ok(Enrolment {
                device_id: DeviceId::new(id),
                name,
                hub_url,
                labels: serde_json::from_str(&labels)?,
            })
        })
        .transpose()
    }

    /// Records a processed hub message. Returns false if it was already
    /// recorded (a redelivery after reconnect), so that handlers act once.
    pub fn record_message(&self, envelope: &DeviceMessageEnvelope) -> Result<bool, Error> {
        let n = self.lock()?.execute(
            "INSERT OR IGNORE INTO hub_messages (seq, body, received_at) VALUES (?1, ?2, ?3)",
            params![
                envelope.seq,
                serde_json::to_string(&envelope.message)?,
                now_ms()
            ],
        )?;
        Ok(n == 1)
    }

    /// Sequence number of the last processed hub message (0 if none).
    pub fn last_message_seq(&self) -> Result<i64, Error> {
        Ok(self
            .lock()?
            .query_row("SELECT coalesce(max(seq), 0) FROM hub_messages", [], |r| {
                r.get(0)
            })?)
    }
}

/// A model update a rollout asked for, as the agent keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateJob {
    /// The rollout.
    pub rollout_id: String,
    /// The model.
    pub model: String,
    /// The release to install.
    pub version: u64,
    /// Where it is.
    pub phase: UpdatePhase,
    /// The last error or health result.
    pub detail: Option<String>,
    /// True once the hub asked to roll it back.
    pub rollback_requested: bool,
}

/// A change of an update's phase, with what goes in its report.
#[derive(Debug, Clone, Default)]
pub struct PhaseChange {
    /// The version served after the change.
    pub serving_version: Option<u64>,
    /// An error or health result.
    pub detail: Option<String>,
    /// Requests served on the new version in its health window.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Their p95 latency.
    pub p95_ms: Option<f64>,
}

const JOB_SELECT: &str =
    "SELECT rollout_id, model, version, phase, detail, rollback_requested FROM updates";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UpdateJob> {
    let phase: String = r.get(3)?;
    Ok(UpdateJob {
        rollout_id: r.get(0)?,
        model: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
        phase: UpdatePhase::parse(&phase).unwrap_or(UpdatePhase::Failed),
        detail: r.get(4)?,
        rollback_requested: r.get::<_, i64>(5)? != 0,
    })
}

impl State {
    /// Records an update a rollout asks for (once per rollout). Returns
    /// false if it was already recorded.
    pub fn add_update(&self, rollout_id: &str, model: &str, version: u64) -> Result<bool, Error> {
        let now = now_ms();
        let n = self.lock()?.execute(
            "INSERT OR IGNORE INTO updates (rollout_id, model, version, phase, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'notified', ?4, ?4)",
            params![rollout_id, model, version as i64, now],
        )?;
        Ok(n == 1)
    }

    /// Notes that the hub asked to roll an update back. Returns false if
    /// the rollout is unknown here.
    pub fn request_rollback(&self, rollout_id: &str) -> Result<bool, Error> {
        let n = self.lock()?.execute(
            "UPDATE updates SET rollback_requested = 1 WHERE rollout_id = ?1",
            [rollout_id],
        )?;
        Ok(n == 1)
    }

    /// One update.
    pub fn update(&self, rollout_id: &str) -> Result<Option<UpdateJob>, Error> {
        Ok(self
            .lock()?
            .query_row(
                &format!("{JOB_SELECT} WHERE rollout_id = ?1"),
                [rollout_id],
                job_row,
            )
            .optional()?)
    }

    /// Updates to act on, oldest first: not finished, or asked to roll back.
    pub fn pending_updates(&self) -> Result<Vec<UpdateJob>, Error> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(&format!(
            "{JOB_SELECT} WHERE phase IN ('notified', 'downloading', 'installed')
             OR (rollback_requested = 1 AND phase = 'committed') ORDER BY created_at, rollout_id"
        ))?;
        let rows = stmt.query_map([], job_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Moves an update to `phase` and queues a report of it.
    pub fn set_update_phase(
        &self,
        rollout_id: &str,
        phase: UpdatePhase,
        change: PhaseChange,
    ) -> Result<(), Error> {
        self.lock()?.execute(
            "UPDATE updates SET phase = ?2, detail = ?3, serving_version = ?4, requests = ?5,
             errors = ?6, p95_ms = ?7, seq = seq + 1, updated_at = ?8 WHERE rollout_id = ?1",
            params![
                rollout_id,
                phase.as_str(),
                change.detail,
                change.serving_version.map(|v| v as i64),
                change.requests as i64,
                change.errors as i64,
                change.p95_ms,
                now_ms()
            ],
        )?;
        Ok(())
    }

    /// Reports not yet acknowledged by the hub: the latest state of each
    /// update whose report changed since it was last sent.
    pub fn unsent_reports(&self) -> Result<Vec<(String, UpdateReport)>, Error> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(
            "SELECT rollout_id, seq, phase, serving_version, detail, requests, errors, p95_ms
             FROM updates WHERE seq > sent_seq ORDER BY updated_at",
        )?;
        let rows = stmt.query_map([], |r| {
            let phase: String = r.get(2)?;
            Ok((
                r.get::<_, String>(0)?,
                UpdateReport {
                    seq: r.get::<_, i64>(1)? as u64,
                    phase: UpdatePhase::parse(&phase).unwrap_or(UpdatePhase::Failed),
                    serving_version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    detail: r.get(4)?,
                    requests: r.get::<_, i64>(5)? as u64,
                    errors: r.get::<_, i64>(6)? as u64,
                    p95_ms: r.get(7)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds `usd` to the macro spend of `day` (days since the epoch, UTC)
    /// and returns the day's total.
    pub fn add_macro_spend(&self, day: i64, usd: f64) -> Result<f64, Error> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT INTO macro_spend (day, usd) VALUES (?1, ?2)
             ON CONFLICT (day) DO UPDATE SET usd = usd + excluded.usd",
            params![day, usd],
        )?;
        Ok(conn.query_row(
            "SELECT usd FROM macro_spend WHERE day = ?1",
            params![day],
            |r| r.get(0),
        )?)
    }

    /// The macro spend of `day` so far.
    pub fn macro_spend(&self, day: i64) -> Result<f64, Error> {
        Ok(self
            .lock()?
            .query_row(
                "SELECT usd FROM macro_spend WHERE day = ?1",
                params![day],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0.0))
    }

    /// Notes that the hub has the report numbered `seq` of a rollout.
    pub fn report_sent(&self, rollout_id: &str, seq: u64) -> Result<(), Error> {
        self.lock()?.execute(
            "UPDATE updates SET sent_seq = max(sent_seq, ?2) WHERE rollout_id = ?1",
            params![rollout_id, seq as i64],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_spend_adds_up_per_day_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let state = State::open(&path).unwrap();
        assert_eq!(state.macro_spend(20_000).unwrap(), 0.0);
        state.add_macro_spend(20_000, 0.25).unwrap();
        assert_eq!(state.add_macro_spend(20_000, 0.5).unwrap(), 0.75);
        state.add_macro_spend(20_001, 1.0).unwrap();
        drop(state);
        let state = State::open(&path).unwrap();
        assert_eq!(state.macro_spend(20_000).unwrap(), 0.75);
        assert_eq!(state.macro_spend(20_001).unwrap(), 1.0);
    }
    use protocol::DeviceMessage;

    #[test]
    fn messages_are_recorded_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let state = State::open(&path).unwrap();
        let envelope = DeviceMessageEnvelope {
            seq: 7,
            created_at: time::OffsetDateTime::now_utc(),
            message: DeviceMessage::Ping { note: "x".into() },
        };
        assert!(state.record_message(&envelope).unwrap());
        assert!(!state.record_message(&envelope).unwrap());
        drop(state);
        let state = State::open(&path).unwrap();
        assert_eq!(state.last_message_seq().unwrap(), 7);
        assert!(state.enrolment().unwrap().is_none());
    }

    #[test]
    fn updates_survive_reopen_and_owe_only_their_latest_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let state = State::open(&path).unwrap();
        assert!(state.add_update("ro-1", "intents", 2).unwrap());
        assert!(
            !state.add_update("ro-1", "intents", 2).unwrap(),
            "once per rollout"
        );
        assert_eq!(state.pending_updates().unwrap().len(), 1);
        for phase in [UpdatePhase::Downloading, UpdatePhase::Installed] {
            state
                .set_update_phase("ro-1", phase, PhaseChange::default())
                .unwrap();
        }
        // Two phase changes, one report owed: the latest, numbered 2.
        let owed = state.unsent_reports().unwrap();
        assert_eq!(owed.len(), 1);
        assert_eq!(
            (owed[0].1.seq, owed[0].1.phase),
            (2, UpdatePhase::Installed)
        );
        state.report_sent("ro-1", 2).unwrap();
        assert!(state.unsent_reports().unwrap().is_empty());
        state
            .set_update_phase(
                "ro-1",
                UpdatePhase::Committed,
                PhaseChange {
                    serving_version: Some(2),
                    requests: 10,
                    errors: 1,
                    p95_ms: Some(12.5),
                    detail: Some("ok".into()),
                },
            )
            .unwrap();
        drop(state);
        let state = State::open(&path).unwrap();
        assert!(
            state.pending_updates().unwrap().is_empty(),
            "committed is done"
        );
        let owed = state.unsent_reports().unwrap();
        assert_eq!(owed[0].1.seq, 3);
        assert_eq!(owed[0].1.requests, 10);
        // A roll-back asked for a committed update makes it pending again.
        assert!(state.request_rollback("ro-1").unwrap());
        assert!(!state.request_rollback("ro-unknown").unwrap());
        let pending = state.pending_updates().unwrap();
        assert!(pending[0].rollback_requested);
    }
}
