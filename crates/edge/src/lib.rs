//! The Strata edge agent: the process on each device. It joins a hub once
//! (key generated here, CA checked against the join token's pin, certificate
//! obtained by CSR), then keeps a mutual-TLS link to the hub alive
//! (heartbeats, an event stream with reconnect and jittered backoff) and
//! serves the local HTTP API on loopback. What it learns becomes insights,
//! kept in a durable outbox and delivered to the hub exactly once
//! ([`insights`], [`link::delivery`](link)).
//!
//! The `strata` binary in `cli` reads the command line and calls [`join()`]
//! or [`agent::run`]. Start reading at [`join()`], then [`agent::run`], then
//! [`link`] (the hub link) and [`local_api`].

pub mod agent;
pub mod config;
pub mod federated;
pub mod insights;
pub mod join;
pub mod link;
pub mod local_api;
pub mod metrics;
pub mod route;
pub mod sse;
pub mod state;
pub mod updater;

pub use config::{Config, RawConfig};
pub use join::join;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is invalid.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// The join token could not be read.
    #[error("join token: {0}")]
    Token(#[from] protocol::TokenError),
    /// The hub presented a CA other than the one the token pins.
    #[error(
        "hub at {hub} presented a CA that does not match the join token's pin {pin}; refusing to join"
    )]
    PinMismatch {
        /// The hub URL dialled.
        hub: String,
        /// The pinned fingerprint.
        pin: String,
    },
    /// The hub could not be reached.
    #[error("cannot reach hub at {url}: {reason}")]
    Unreachable {
        /// The URL dialled.
        url: String,
        /// Why.
        reason: String,
    },
    /// The hub answered with a problem.
    #[error("hub refused: {detail} ({status})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The problem type slug, e.g. `join-token-used`.
        slug: String,
        /// The problem detail.
        detail: String,
    },
    /// The data directory already holds an enrolled device.
    #[error("{dir} already holds device {device_id}; use another --data-dir to join again")]
    AlreadyEnrolled {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The device enrolled there.
        device_id: String,
    },
    /// The data directory holds no enrolled device.
    #[error(
        "{dir} holds no enrolled device; run `strata edge join --token … --data-dir {dir}` first"
    )]
    NotEnrolled {
        /// The data directory.
        dir: std::path::PathBuf,
    },
    /// SQLite failed.
    #[error("agent database: {0}")]
    Db(#[from] rusqlite::Error),
    /// JSON in state or on the wire.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Keys or certificates.
    #[error(transparent)]
    Pki(#[from] pki::Error),
    /// The insight outbox failed.
    #[error("insight outbox: {0}")]
    Outbox(String),
    /// The outbox refused insights: its budget is full of insights at least
    /// as urgent. The others of the same call were stored.
    #[error("outbox full: {} refused ({}); stored: {}", refused.len(), refused.join("; "), stored.join(", "))]
    OutboxFull {
        /// Why each refused insight was refused.
        refused: Vec<String>,
        /// Keys of the insights that were stored.
        stored: Vec<String>,
    },
    /// An insight is malformed.
    #[error("invalid insight: {0}")]
    InvalidInsight(String),
    /// Files in the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Turns a non-success hub response into [`Error::Refused`].
pub(crate) async fn refused(response: reqwest::Response) -> Error {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<protocol::Problem>(&text) {
        Ok(problem) => Error::Refused {
            status,
            slug: problem
                .problem_type
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned(),
            detail: problem.detail,
        },
        Err(_) => Error::Refused {
            status,
            slug: String::new(),
            detail: text.chars().take(200).collect(),
        },
    }
}

/// Full error chain of a transport error, which reqwest hides behind
/// "error sending request".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
