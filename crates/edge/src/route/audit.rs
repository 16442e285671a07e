//! The device's append-only audit log of everything that leaves it for the
//! macro tier: one JSON line per request, written and fsync'd before the
//! request is sent. It records what left (kind, size, data class,
//! destination), never the text.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, RFC 3339 UTC.
    pub time: String,
    /// The request's id (the one in its decision record).
    pub request: String,
    /// `chat`, `completion` or `embedding`.
    pub kind: String,
    /// Where it went.
    pub destination: String,
    /// The data class of what left: `general` when the privacy classifier
    /// found no personal data (the only class the router lets out).
    pub data_class: String,
    /// Bytes of the request body sent.
    pub bytes: u64,
    /// Why it left (the decision's reason codes).
    pub reasons: Vec<String>,
}

/// The append-only audit log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl AuditLog {
    /// Opens (creating) the log at `path`, for appending only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and waits until it is on disk.
    pub async fn append(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
            // One write of the whole line: with O_APPEND the line lands
            // whole at the end even if another process appends too.
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Every record in the log (for status pages and tests).
    pub fn read_all(path: &Path) -> std::io::Result<Vec<AuditRecord>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let record = |n: u64| AuditRecord {
            time: "2026-11-21T00:00:00Z".into(),
            request: format!("r{n}"),
            kind: "chat".into(),
            destination: "https://hub/v1/chat/completions".into(),
            data_class: "general".into(),
            bytes: n,
            reasons: vec!["fleet_data".into()],
        };
        AuditLog::open(&path)
            .unwrap()
            .append(&record(1))
            .await
            .unwrap();
        AuditLog::open(&path)
            .unwrap()
            .append(&record(2))
            .await
            .unwrap();
        let all = AuditLog::read_all(&path).unwrap();
        assert_eq!(all, vec![record(1), record(2)]);
    }
}
