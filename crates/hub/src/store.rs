//! The hub's durable state.
//!
//! Everything the hub must not forget across a restart lives here: operator
//! credentials (hashed), join tokens (hashed secrets), devices and their
//! certificates, hub-to-device messages, the audit log and the insights
//! devices deliver. The embedded
//! backend is SQLite in WAL mode with numbered migrations.
//!
//! All SQL of the hub is in this file and its submodules, behind async methods that speak in
//! domain types, so that the PostgreSQL backend for scale-out is a second
//! implementation of the same methods rather than a rewrite of the handlers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use protocol::{
    Device, DeviceId, DeviceMessage, DeviceMessageEnvelope, DeviceStatus, Heartbeat, Labels,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use crate::Error;

pub mod federated;
mod insights;
mod registry;
mod rollouts;

pub use federated::{FlRoundRecord, FlTaskRecord, Stored};
pub use insights::{Ingested, InsightFilter, NewInsight, SeriesPoint};
pub use registry::{Publication, PublishedModel};
pub use rollouts::{CreateRollout, ReportOutcome, RolloutRecord};

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many
/// have run. Never edit a released migration: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: identity and fleet.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    CREATE TABLE operators (
        id         TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE join_tokens (
        id          TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        labels      TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER,
        used_by     TEXT
    ) STRICT;
    CREATE TABLE devices (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL,
        labels           TEXT NOT NULL,
        status           TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        cert_fingerprint TEXT NOT NULL UNIQUE,
        cert_pem         TEXT NOT NULL,
        cert_not_after   INTEGER NOT NULL,
        enrolled_at      INTEGER NOT NULL,
        token_id         TEXT NOT NULL,
        last_seen_at     INTEGER,
        last_heartbeat   TEXT,
        revoked_at       INTEGER
    ) STRICT;
    CREATE TABLE device_messages (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id  TEXT NOT NULL REFERENCES devices(id),
        body       TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX device_messages_by_device ON device_messages (device_id, seq);
    CREATE TABLE audit_log (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        at     INTEGER NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT
    ) STRICT;
    "#,
    // 2: insights, once per device and key.
    r#"
    CREATE TABLE insights (
        id          INTEGER PRIMARY KEY,
        device_id   TEXT NOT NULL REFERENCES devices(id),
        key         TEXT NOT NULL,
        site        TEXT,
        kind        TEXT NOT NULL,
        series      TEXT NOT NULL,
        priority    TEXT NOT NULL,
        start_ms    INTEGER NOT NULL,
        window_ms   INTEGER NOT NULL,
        value       REAL NOT NULL,
        raw         TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        UNIQUE (device_id, key)
    ) STRICT;
    CREATE INDEX insights_by_series ON insights (kind, series, start_ms);
    "#,
    // 3: the model registry.
    r#"
    CREATE TABLE registry_docs (
        kind       TEXT NOT NULL CHECK (kind IN ('root', 'targets', 'snapshot', 'timestamp')),
        version    INTEGER NOT NULL,
        body       BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (kind, version)
    ) STRICT;
    CREATE TABLE models (
        name         TEXT NOT NULL,
        version      INTEGER NOT NULL,
        manifest     BLOB NOT NULL,
        sha256       TEXT NOT NULL,
        size_bytes   INTEGER NOT NULL,
        format       TEXT NOT NULL,
        published_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT;
    "#,
    // 4: staged rollouts and what their devices reported.
    r#"
    CREATE TABLE rollouts (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        plan        TEXT NOT NULL,
        gates       TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('active', 'paused', 'completed', 'aborted')),
        stage       INTEGER NOT NULL,
        decision    TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        finished_at INTEGER,
        FOREIGN KEY (model, version) REFERENCES models (name, version)
    ) STRICT;
    CREATE UNIQUE INDEX one_live_rollout_per_model ON rollouts (model)
        WHERE state IN ('active', 'paused');
    CREATE TABLE rollout_devices (
        rollout_id      TEXT NOT NULL REFERENCES rollouts(id),
        device_id       TEXT NOT NULL REFERENCES devices(id),
        stage           INTEGER NOT NULL,
        phase           TEXT NOT NULL CHECK (phase IN ('notified', 'downloading', 'installed',
                            'committed', 'failed', 'rolled_back')),
        report_seq      INTEGER NOT NULL DEFAULT 0,
        serving_version INTEGER,
        detail          TEXT,
        requests        INTEGER NOT NULL DEFAULT 0,
        errors          INTEGER NOT NULL DEFAULT 0,
        p95_ms          REAL,
        updated_at      INTEGER NOT NULL,
        PRIMARY KEY (rollout_id, device_id)
    ) STRICT;
    "#,
    // 5: federated tasks, rounds, and what devices submitted in the open
    // rounds (dropped when a round closes).
    r#"
    CREATE TABLE fl_tasks (
        id               TEXT PRIMARY KEY,
        spec             TEXT NOT NULL,
        state            TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed', 'stopped')),
        completed_rounds INTEGER NOT NULL,
        model            BLOB NOT NULL,
        accountant       TEXT NOT NULL,
        history          TEXT NOT NULL,
        detail           TEXT,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        held_out_features BLOB,
        held_out_labels  BLOB
    ) STRICT;
    CREATE TABLE fl_rounds (
        task_id        TEXT NOT NULL REFERENCES fl_tasks(id),
        round          INTEGER NOT NULL,
        phase          TEXT NOT NULL,
        phase_deadline INTEGER NOT NULL,
        started_at     INTEGER NOT NULL,
        selected       TEXT NOT NULL,
        eligible       INTEGER NOT NULL,
        roster         TEXT,
        u2             TEXT,
        u3             TEXT,
        refused        TEXT NOT NULL,
        PRIMARY KEY (task_id, round)
    ) STRICT;
    CREATE TABLE fl_submissions (
        task_id     TEXT NOT NULL,
        round       INTEGER NOT NULL,
        device_id   TEXT NOT NULL,
        kind        TEXT NOT NULL,
        body        BLOB NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (task_id, round, device_id, kind)
    ) STRICT;
    CREATE TABLE fl_shares (
        task_id   TEXT NOT NULL,
        round     INTEGER NOT NULL,
        recipient INTEGER NOT NULL,
        sender    INTEGER NOT NULL,
        body      BLOB NOT NULL,
        PRIMARY KEY (task_id, round, recipient, sender)
    ) STRICT;
    "#,
];

/// Milliseconds since the Unix epoch, the unit of every stored time.
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A join token as stored (the secret only as a hash).
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// Public id.
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Labels for the joining device.
    pub labels: Labels,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// Set once a device has joined with it.
    pub used_at: Option<OffsetDateTime>,
}

/// A device about to be stored at enrolment.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Id issued by the hub.
    pub id: DeviceId,
    /// Display name.
    pub name: String,
    /// Labels, copied from the token.
    pub labels: Labels,
    /// Fingerprint of the issued certificate.
    pub cert_fingerprint: String,
    /// The issued certificate.
    pub cert_pem: String,
    /// Its expiry.
    pub cert_not_after: OffsetDateTime,
}

/// The identity facts the hub checks on every device call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The device the certificate was issued to.
    pub id: DeviceId,
    /// Whether it may still call.
    pub status: DeviceStatus,
}

/// Outcome of consuming a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consume {
    /// The device was stored and the token marked used.
    Enrolled,
    /// Another enrolment used the token first.
    AlreadyUsed,
}

/// The hub's state store (SQLite).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(sqlite)")
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit the hub acknowledged survives power loss, not only a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection off the async executor.
    async fn call<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| Error::Poisoned)?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
    }

    /// Reads a meta value.
    pub async fn meta(&self, key: &'static str) -> Result<Option<String>, Error> {
        self.call(move |c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    /// Writes a meta value.
    pub async fn set_meta(&self, key: &'static str, value: String) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
        .await
    }

    /// Number of operator credentials.
    pub async fn operator_count(&self) -> Result<i64, Error> {
        self.call(|c| Ok(c.query_row("SELECT count(*) FROM operators", [], |r| r.get(0))?))
            .await
    }

    /// Stores an operator credential's hash.
    pub async fn add_operator(&self, id: String, token_hash: String) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO operators (id, token_hash, created_at) VALUES (?1, ?2, ?3)",
                params![id, token_hash, to_ms(OffsetDateTime::now_utc())],
            )?;
            Ok(())
        })
        .await
    }

    /// The operator whose credential hashes to `token_hash`, if any.
    pub async fn operator_by_hash(&self, token_hash: String) -> Result<Option<String>, Error> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id FROM operators WHERE token_hash = ?1",
                [token_hash],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Stores a new join token.
    pub async fn add_token(&self, token: StoredToken) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO join_tokens (id, secret_hash, labels, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    token.id,
                    token.secret_hash,
                    serde_json::to_string(&token.labels)?,
                    to_ms(OffsetDateTime::now_utc()),
                    to_ms(token.expires_at),
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Looks a join token up by id.
    pub async fn token(&self, id: String) -> Result<Option<StoredToken>, Error> {
        self.call(move |c| {
            let row = c
                .query_row(
                    "SELECT id, secret_hash, labels, expires_at, used_at FROM join_tokens WHERE id = ?1",
                    [id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(id, secret_hash, labels, expires_at, used_at)| {
                Ok(StoredToken {
                    id,
                    secret_hash,
                    labels: serde_json::from_str(&labels)?,
                    expires_at: from_ms(expires_at),
                    used_at: used_at.map(from_ms),
                })
            })
            .transpose()
        })
        .await
    }

    /// Atomically marks the token used and stores the device: either both
    /// happen or neither, and of two racing enrolments only one wins.
    pub async fn enroll(&self, token_id: String, device: NewDevice) -> Result<Consume, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = to_ms(OffsetDateTime::now_utc());
            let claimed = tx.execute(
                "UPDATE join_tokens SET used_at = ?1, used_by = ?2 WHERE id = ?3 AND used_at IS NULL",
                params![now, device.id.as_str(), token_id],
            )?;
            if claimed != 1 {
                return Ok(Consume::AlreadyUsed);
            }
            tx.execute(
                "INSERT INTO devices (id, name, labels, status, cert_fingerprint, cert_pem,
                                      cert_not_after, enrolled_at, token_id)
                 VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8)",
                params![
                    device.id.as_str(),
                    device.name,
                    serde_json::to_string(&device.labels)?,
                    device.cert_fingerprint,
                    device.cert_pem,
                    to_ms(device.cert_not_after),
                    now,
                    token_id,
                ],
            )?;
            audit(&tx, "token", "device.enroll", Some(device.id.as_str()), None)?;
            tx.commit()?;
            Ok(Consume::Enrolled)
        })
        .await
    }

    /// The device a certificate fingerprint belongs to.
    pub async fn identity_by_fingerprint(
        &self,
        fingerprint: String,
    ) -> Result<Option<DeviceIdentity>, Error> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, status FROM devices WHERE cert_fingerprint = ?1",
                [fingerprint],
                |r| {
                    Ok(DeviceIdentity {
                        id: DeviceId::new(r.get::<_, String>(0)?),
                        status: parse_status(&r.get::<_, String>(1)?),
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    /// One device. `online` is filled in by the caller from live state.
    pub async fn device(&self, id: DeviceId) -> Result<Option<Device>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_SELECT} WHERE id = ?1"))?;
            let device = stmt.query_row([id.as_str()], device_row).optional()?;
            Ok(device)
        })
        .await
    }

    /// Every device, in enrolment order.
    pub async fn devices(&self) -> Result<Vec<Device>, Error> {
        self.call(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{DEVICE_SELECT} ORDER BY enrolled_at, id"))?;
            let rows = stmt.query_map([], device_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records a heartbeat. Returns false if the device is unknown.
    pub async fn heartbeat(&self, id: DeviceId, heartbeat: Heartbeat) -> Result<bool, Error> {
        self.call(move |c| {
            let n = c.execute(
                "UPDATE devices SET last_seen_at = ?1, last_heartbeat = ?2 WHERE id = ?3",
                params![
                    to_ms(OffsetDateTime::now_utc()),
                    serde_json::to_string(&heartbeat)?,
                    id.as_str()
                ],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Notes that the device was seen (e.g. it opened its event stream).
    pub async fn touch(&self, id: DeviceId) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "UPDATE devices SET last_seen_at = ?1 WHERE id = ?2",
                params![to_ms(OffsetDateTime::now_utc()), id.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    /// Revokes a device and queues the `revoked` message for it, in one
    /// transaction. Returns `None` for an unknown device, `Some(false)` if it
    /// was already revoked.
    pub async fn revoke(
        &self,
        id: DeviceId,
        actor: String,
    ) -> Result<Option<(bool, Option<DeviceMessageEnvelope>)>, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let status: Option<String> = tx
                .query_row(
                    "SELECT status FROM devices WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(status) = status else {
                return Ok(None);
            };
            if parse_status(&status) == DeviceStatus::Revoked {
                return Ok(Some((false, None)));
            }
            let now = to_ms(OffsetDateTime::now_utc());
            tx.execute(
                "UPDATE devices SET status = 'revoked', revoked_at = ?1 WHERE id = ?2",
                params![now, id.as_str()],
            )?;
            let envelope = append_message(&tx, &id, &DeviceMessage::Revoked)?;
            audit(&tx, &actor, "device.revoke", Some(id.as_str()), None)?;
            tx.commit()?;
            Ok(Some((true, Some(envelope))))
        })
        .await
    }

    /// Stores a message for a device and returns it with its sequence number.
    pub async fn push_message(
        &self,
        id: DeviceId,
        message: DeviceMessage,
    ) -> Result<DeviceMessageEnvelope, Error> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let envelope = append_message(&tx, &id, &message)?;
            tx.commit()?;
            Ok(envelope)
        })
        .await
    }

    /// Messages for a device with a sequence number above `after`, oldest first.
    pub async fn messages_after(
        &self,
        id: DeviceId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeviceMessageEnvelope>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, created_at, body FROM device_messages
                 WHERE device_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![id.as_str(), after, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, created_at, body) = row?;
                out.push(DeviceMessageEnvelope {
                    seq,
                    created_at: from_ms(created_at),
                    message: serde_json::from_str(&body)?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Highest message sequence number stored for a device (0 if none).
    pub async fn latest_seq(&self, id: DeviceId) -> Result<i64, Error> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT coalesce(max(seq), 0) FROM device_messages WHERE device_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Appends to the audit log.
    pub async fn audit(
        &self,
        actor: String,
        action: &'static str,
        target: Option<String>,
        detail: Option<String>,
    ) -> Result<(), Error> {
        self.call(move |c| audit(c, &actor, action, target.as_deref(), detail.as_deref()))
            .await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        return Err(Error::SchemaTooNew {
            found: applied,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied hub schema migration");
    }
    Ok(())
}

fn audit(
    c: &Connection,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) -> Result<(), Error> {
    c.execute(
        "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            to_ms(OffsetDateTime::now_utc()),
            actor,
            action,
            target,
            detail
        ],
    )?;
    Ok(())
}

fn append_message(
    c: &Connection,
    id: &DeviceId,
    message: &DeviceMessage,
) -> Result<DeviceMessageEnvelope, Error> {
    let now = OffsetDateTime::now_utc();
    c.execute(
        "INSERT INTO device_messages (device_id, body, created_at) VALUES (?1, ?2, ?3)",
        params![id.as_str(), serde_json::to_string(message)?, to_ms(now)],
    )?;
    Ok(DeviceMessageEnvelope {
        seq: c.last_insert_rowid(),
        created_at: from_ms(to_ms(now)),
        message: message.clone(),
    })
}

fn parse_status(s: &str) -> DeviceStatus {
    match s {
        "active" => DeviceStatus::Active,
        // The CHECK constraint admits only the two values; anything else
        // is treated as revoked so that a damaged row fails closed.
        _ => DeviceStatus::Revoked,
    }
}

const DEVICE_SELECT: &str = "SELECT id, name, labels, status, cert_fingerprint, cert_not_after,
    enrolled_at, last_seen_at, last_heartbeat, revoked_at FROM devices";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    let json_err = |i: usize, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let labels: String = r.get(2)?;
    let heartbeat: Option<String> = r.get(8)?;
    Ok(Device {
        id: DeviceId::new(r.get::<_, String>(0)?),
        name: r.get(1)?,
        labels: serde_json::from_str(&labels).map_err(|e| json_err(2, e))?,
        status: parse_status(&r.get::<_, String>(3)?),
        online: false,
        cert_fingerprint: r.get(4)?,
        cert_not_after: from_ms(r.get(5)?),
        enrolled_at: from_ms(r.get(6)?),
        last_seen_at: r.get::<_, Option<i64>>(7)?.map(from_ms),
        last_heartbeat: heartbeat
            .map(|h| serde_json::from_str(&h))
            .transpose()
            .map_err(|e| json_err(8, e))?,
        revoked_at: r.get::<_, Option<i64>>(9)?.map(from_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, fp: &str) -> NewDevice {
        NewDevice {
            id: DeviceId::new(id),
            name: id.into(),
            labels: Labels::from([("site".to_string(), "a".to_string())]),
            cert_fingerprint: fp.into(),
            cert_pem: "pem".into(),
            cert_not_after: OffsetDateTime::now_utc(),
        }
    }

    async fn with_token(store: &Store, id: &str) {
        store
            .add_token(StoredToken {
                id: id.into(),
                secret_hash: "h".into(),
                labels: Labels::new(),
                expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
                used_at: None,
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_token_enrolls_exactly_one_device_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let store = Store::open(&path).unwrap();
        with_token(&store, "t1").await;
        assert_eq!(
            store
                .enroll("t1".into(), device("dev-a", "fa"))
                .await
                .unwrap(),
            Consume::Enrolled
        );
        assert_eq!(
            store
                .enroll("t1".into(), device("dev-b", "fb"))
                .await
                .unwrap(),
            Consume::AlreadyUsed
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        let devices = store.devices().await.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].id.as_str(), "dev-a");
        assert!(
            store
                .token("t1".into())
                .await
                .unwrap()
                .unwrap()
                .used_at
                .is_some()
        );
    }

    #[tokio::test]
    async fn revoke_queues_a_message_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hub.db")).unwrap();
        with_token(&store, "t1").await;
        store
            .enroll("t1".into(), device("dev-a", "fa"))
            .await
            .unwrap();
        let first = store
            .revoke(DeviceId::new("dev-a"), "op".into())
            .await
            .unwrap();
        assert!(matches!(first, Some((true, Some(_)))));
        let again = store
            .revoke(DeviceId::new("dev-a"), "op".into())
            .await
            .unwrap();
        assert_eq!(again.map(|(changed, _)| changed), Some(false));
        assert!(
            store
                .revoke(DeviceId::new("nope"), "op".into())
                .await
                .unwrap()
                .is_none()
        );
        let msgs = store
            .messages_after(DeviceId::new("dev-a"), 0, 10)
            .await
            .unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message, DeviceMessage::Revoked);
        let ident = store
            .identity_by_fingerprint("fa".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ident.status, DeviceStatus::Revoked);
    }

    #[test]
    fn a_database_from_a_newer_strata_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(&path),
            Err(Error::SchemaTooNew { found: 99, .. })
        ));
    }
}
