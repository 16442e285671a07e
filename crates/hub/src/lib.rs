//! The Strata hub: the central server devices enrol with and stay connected
//! to. It owns the certificate authority, knows every device by its client
//! certificate, keeps fleet state in SQLite, and pushes messages to devices
//! over per-device Server-Sent Event streams.
//!
//! This crate is the hub as a library; the `strata` binary in `cli` reads the
//! command line and calls [`server::start`]. Start reading at
//! [`server::start`] (bootstrap and the TLS accept loop), then [`api`]
//! (routes and the authentication extractors), then [`store`].

pub mod api;
pub mod config;
pub mod events;
pub mod federated;
pub mod insights;
pub mod macro_tier;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod rollouts;
pub mod server;
pub mod store;
pub mod tokens;

pub use config::{Config, RawConfig};
pub use server::{RunningHub, start};

/// Errors of the hub outside request handling (which answers with problems).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is invalid.
    #[error("invalid hub configuration: {0}")]
    Config(String),
    /// SQLite failed.
    #[error("hub database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer Strata.
    #[error(
        "hub database has schema version {found}, this build knows up to {known}; upgrade strata"
    )]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Highest version this build knows.
        known: i64,
    },
    /// A stored JSON value could not be read or written.
    #[error("hub state JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Certificates or keys.
    #[error(transparent)]
    Pki(#[from] pki::Error),
    /// Files in the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A lock was poisoned by a panic elsewhere.
    #[error("hub state lock poisoned")]
    Poisoned,
    /// Anything else that should not happen.
    #[error("{0}")]
    Internal(String),
}

/// Generates `n` random bytes from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

/// Lower-case hex SHA-256 of a secret, the only form secrets are stored in.
pub(crate) fn hash_secret(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
