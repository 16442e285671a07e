use std::io;
use std::path::PathBuf;

use crate::Priority;

/// Everything that can go wrong in the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed; `path` is the file or directory.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done, e.g. "fsync segment".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another [`crate::Outbox`] in this one) owns the
    /// directory.
    #[error("outbox directory {dir} is locked by another outbox (see the pid in its LOCK file)")]
    Locked {
        /// The outbox directory.
        dir: PathBuf,
    },
    /// A record can never fit: its frame is larger than the byte budget or
    /// than the format's limit. Counted in [`crate::Stats::refused`].
    #[error(
        "{priority} record of {frame_bytes} bytes is larger than the limit of {limit_bytes} bytes"
    )]
    TooLarge {
        /// Priority of the refused record.
        priority: Priority,
        /// Size of its frame (payload plus 32 bytes of header).
        frame_bytes: u64,
        /// The budget or the format's limit, whichever is smaller.
        limit_bytes: u64,
    },
    /// The budget is held by records of higher priority than the incoming
    /// one, so evicting cannot make room. Counted in [`crate::Stats::refused`].
    #[error(
        "no room for {priority} record of {frame_bytes} bytes: the budget of {budget_bytes} bytes is held by records of higher priority"
    )]
    BudgetFull {
        /// Priority of the refused record.
        priority: Priority,
        /// Size of its frame (payload plus 32 bytes of header).
        frame_bytes: u64,
        /// The configured budget.
        budget_bytes: u64,
    },
    /// An earlier write or fsync failed, so what is on disk is no longer known;
    /// drop this [`crate::Outbox`] and open the directory again to recover.
    #[error("outbox at {dir} stopped after a failed write or fsync; reopen it to recover")]
    Stopped {
        /// The outbox directory.
        dir: PathBuf,
    },
    /// A [`crate::Config`] value is out of range.
    #[error("outbox config {field} {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// A copy for each waiter of a failed batch (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self, dir: &std::path::Path) -> Error {
        match self {
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            _ => Error::Stopped { dir: dir.into() },
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
