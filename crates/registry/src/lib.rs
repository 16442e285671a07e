//! Strata's signed model registry: the model manifest data model, the four
//! signing roles of The Update Framework (TUF), the signing side that the
//! CLI (`strata keys init`, `strata model publish`) and the hub's online
//! roles use, and the device-side verification that decides whether a model
//! may be installed.
//!
//! This crate is pure: no files, no network, no clock. Callers pass bytes in
//! and get bytes out, pass `now`, and pass an RNG to key generation. It is
//! not a repository server or a download client; the hub serves the signed
//! documents and the agent fetches them and stores [`TrustedState`].
//!
//! Start reading at [`TrustedState`] (the device's view), then [`sign`] and
//! the metadata types in [`Root`], [`Targets`], [`Snapshot`], [`Timestamp`]
//! and [`Manifest`].
//!
//! # Roles
//!
//! ```text
//!                  root      offline keys, k-of-n; signs itself, and every
//!                   │        new root is signed by the old root's keys too
//!                   │ lists every role's keys and threshold
//!      ┌────────────┼──────────────────────┐
//!      ▼            ▼                      ▼
//!   targets      snapshot               timestamp
//!   offline      online (hub)           online (hub), expires in hours
//!      │         pins targets           pins snapshot
//!      │         version + sha256       version + sha256
//!      ▼
//!   manifest     signed by targets keys, listed in targets by sha256
//!      │ pins artifact sha256 + size_bytes
//!      ▼
//!   artifact
//!
//!   a device reads: timestamp ─► snapshot ─► targets ─► manifest ─► artifact
//! ```
//!
//! What each check defends against:
//!
//! | check | attack | error |
//! |---|---|---|
//! | threshold of the role's keys, each key counted once | one stolen key; a signature repeated | [`Error::BelowThreshold`] |
//! | signer must be a key of that role | a targets or online key signing root | [`Error::WrongRole`], [`Error::UnknownKey`] |
//! | every claimed role signature verifies | tampered bytes | [`Error::BadSignature`] |
//! | `_type` inside the signed bytes | a signature on one kind passed off as another | [`Error::WrongKind`] |
//! | new root signed by old *and* new root thresholds, version + 1 | key-compromise takeover through a forged root | [`Error::BelowThreshold`], [`Error::RootVersionSkipped`] |
//! | expiry of every document at `now` | freeze: serving old, validly signed metadata forever | [`Error::Expired`] |
//! | timestamp/snapshot versions never go backwards | freeze by replay | [`Error::Freeze`] |
//! | root/targets versions never go backwards | rollback to old metadata | [`Error::Rollback`] |
//! | same version must mean same bytes | equivocation by a signing key | [`Error::VersionReused`] |
//! | timestamp pins snapshot, snapshot pins targets, by version and sha256 | mix-and-match of metadata from different moments | [`Error::MixAndMatch`] |
//! | manifest listed by sha256 in targets | replay of a withdrawn or old manifest | [`Error::ManifestNotListed`] |
//! | model version above the installed one | rollback to an older, perhaps vulnerable model | [`Error::ModelRollback`] |
//! | artifact size and sha256 | swapped or corrupted weights; endless download | [`Error::ArtifactSize`], [`Error::ArtifactHash`] |
//!
//! # Formats
//!
//! Every signed document is `{"signatures":[{"key_id","sig"}],"signed":{…}}`
//! where each signature is Ed25519 over the *canonical JSON* of `signed`:
//! object keys sorted by UTF-8 bytes, no whitespace, scalars as `serde_json`
//! writes them. `signed._type` names the kind. Key ids are the hex SHA-256 of
//! the 32 public-key bytes; all binary values are lower-case hex; times are
//! RFC 3339. Signing keys are stored as a [`KeyFile`].
//!
//! A document's digest (what [`MetaRef`] and [`ManifestRef`] pin, and
//! [`digest`] computes) is the SHA-256 of that same canonical `signed`
//! object, so re-encoding an envelope (pretty-printing, reordering keys,
//! adding a co-signature) never changes it. Hex is lower case only, so every
//! value has one spelling.
//!
//! A device persists [`TrustedState`] with serde as JSON; it holds the trusted
//! bodies, their digests and the installed versions, and is as trustworthy
//! as the file the agent keeps it in (mode 0600, written only by the agent).

mod canonical;
mod client;
mod keys;
mod metadata;
mod signed;

pub use client::{ArtifactChecker, TrustedState, Verified, VerifiedArtifact};
pub use keys::{Algorithm, KeyFile, KeyId, PublicKey, Sha256Digest, SignatureBytes, SigningKey};
pub use metadata::{
    AgentVersion, Artifact, ArtifactFormat, CpuArch, DType, Field, HealthCheck, IoSchema, Kind,
    MAX_PROBES, Manifest, ManifestRef, MetaRef, Metadata, Probe, Provenance, Role, RoleKeys,
    RoleSpec, Roles, Root, RuntimeRequirements, Schema, SchemaKind, Snapshot, Targets, Timestamp,
};
pub use signed::{cosign, digest, read_unverified, sign};

use time::OffsetDateTime;

/// Everything that can go wrong reading, signing or verifying registry data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a well-formed document of that kind.
    #[error("malformed {what}: {source}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The document parses but breaks a rule serde cannot express.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being read or built.
        what: &'static str,
        /// Which rule, and the offending value.
        reason: String,
    },
    /// The `_type` of the signed body is not the kind expected.
    #[error("expected {expected} metadata, found _type {}", found.as_deref().unwrap_or("missing"))]
    WrongKind {
        /// The kind expected.
        expected: Kind,
        /// The `_type` found, if any.
        found: Option<String>,
    },
    /// No signature counted, and the first one is by a key the trusted root
    /// does not list at all.
    #[error("{kind} metadata is signed by key {}, which the trusted root does not know", key_id.short())]
    UnknownKey {
        /// The document.
        kind: Kind,
        /// The stranger.
        key_id: KeyId,
    },
    /// No signature counted, and the first one is by a key of another role.
    #[error("{kind} metadata is signed by key {}, which is not a {role} key", key_id.short())]
    WrongRole {
        /// The document.
        kind: Kind,
        /// The role that should have signed.
        role: Role,
        /// The key of another role.
        key_id: KeyId,
    },
    /// A signature by a key of the signing role does not verify.
    #[error("{kind} metadata signature does not verify with key {}", key_id.short())]
    BadSignature {
        /// The document.
        kind: Kind,
        /// The key whose signature failed.
        key_id: KeyId,
    },
    /// Fewer distinct keys of the role signed than its threshold.
    #[error(
        "{kind} metadata has valid signatures from {valid} {role} keys, threshold is {threshold}"
    )]
    BelowThreshold {
        /// The document.
        kind: Kind,
        /// The signing role.
        role: Role,
        /// Distinct role keys whose signatures verified.
        valid: usize,
        /// How many are needed.
        threshold: usize,
    },
    /// A manifest to load again was never installed on this device.
    #[error("{name} version {version} was never installed here")]
    NotInstalled {
        /// The model.
        name: String,
        /// The version offered.
        version: u64,
    },
    /// The document expired at or before `now`.
    #[error("{kind} v{version} expired at {}", rfc3339(*expires))]
    Expired {
        /// The document.
        kind: Kind,
        /// Its version.
        version: u64,
        /// Its expiry.
        expires: OffsetDateTime,
    },
    /// Root or targets metadata older than (or, for root, as old as) the
    /// trusted one.
    #[error("{kind} metadata v{got} is not newer than trusted v{trusted}: rollback")]
    Rollback {
        /// The document.
        kind: Kind,
        /// The trusted version.
        trusted: u64,
        /// The offered version.
        got: u64,
    },
    /// A root that skips versions; roots must be applied one at a time.
    #[error("root metadata v{got} skips versions: trusted is v{trusted}, apply v{} first", trusted + 1)]
    RootVersionSkipped {
        /// The trusted root version.
        trusted: u64,
        /// The offered version.
        got: u64,
    },
    /// Timestamp or snapshot metadata older than the trusted one: old
    /// metadata replayed to hide newer releases.
    #[error(
        "{kind} metadata v{got} is older than trusted v{trusted}: replayed metadata (freeze attack)"
    )]
    Freeze {
        /// The document.
        kind: Kind,
        /// The trusted version.
        trusted: u64,
        /// The offered version.
        got: u64,
    },
    /// Different content under the version of the trusted document.
    #[error("{kind} metadata v{version} differs from the trusted document of the same version")]
    VersionReused {
        /// The document.
        kind: Kind,
        /// The shared version.
        version: u64,
    },
    /// A document is not the one its parent pins.
    #[error("{kind} metadata {got} is not the {listed} that {listed_by} lists: mix-and-match")]
    MixAndMatch {
        /// The pinned document.
        kind: Kind,
        /// What it is.
        got: MetaRef,
        /// The document that pins it.
        listed_by: Kind,
        /// What that one pins.
        listed: MetaRef,
    },
    /// The manifest is validly signed but not the one targets lists for its
    /// model.
    #[error("manifest {name} v{version} (sha256 {}) is not listed in targets v{targets_version}", sha256.short())]
    ManifestNotListed {
        /// Model name.
        name: String,
        /// Model version.
        version: u64,
        /// Digest of the manifest.
        sha256: Sha256Digest,
        /// The trusted targets version.
        targets_version: u64,
    },
    /// The model version is not newer than the one installed.
    #[error("model {name} v{got} is not newer than installed v{installed}: rollback")]
    ModelRollback {
        /// Model name.
        name: String,
        /// Installed version.
        installed: u64,
        /// Offered version.
        got: u64,
    },
    /// An update needs metadata the device does not have yet.
    #[error("no trusted {kind} metadata yet: update {kind} first")]
    Missing {
        /// The missing document.
        kind: Kind,
    },
    /// The artifact's SHA-256 is not the manifest's.
    #[error("artifact sha256 {} does not match manifest {name} v{version}'s {}", got.short(), expected.short())]
    ArtifactHash {
        /// Model name.
        name: String,
        /// Model version.
        version: u64,
        /// What the manifest says.
        expected: Sha256Digest,
        /// What the bytes hash to.
        got: Sha256Digest,
    },
    /// The artifact's length is not the manifest's.
    #[error("artifact is {got} bytes (so far), manifest {name} v{version} says {expected}")]
    ArtifactSize {
        /// Model name.
        name: String,
        /// Model version.
        version: u64,
        /// What the manifest says.
        expected: u64,
        /// Bytes seen.
        got: u64,
    },
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests;
