//! The signed documents: model manifests and the four TUF roles' metadata.
//!
//! Every document is a plain struct with public fields, so the signing side
//! builds it directly; [`crate::sign`] validates and signs it, and
//! [`crate::TrustedState`] is the only way back from bytes to a trusted one.
//! Every struct refuses unknown fields: a field this version does not know
//! could carry a meaning it would silently ignore.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use crate::keys::{KeyId, PublicKey, Sha256Digest};
use crate::{Error, signed};

/// What a signed document is; written in its `_type` field, which the
/// signature covers, so a signature on one kind never verifies as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`Root`] metadata.
    Root,
    /// [`Targets`] metadata.
    Targets,
    /// [`Snapshot`] metadata.
    Snapshot,
    /// [`Timestamp`] metadata.
    Timestamp,
    /// A model [`Manifest`].
    Manifest,
}

impl Kind {
    /// The name written in `_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Root => "root",
            Kind::Targets => "targets",
            Kind::Snapshot => "snapshot",
            Kind::Timestamp => "timestamp",
            Kind::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing role: a set of keys and a threshold, listed in [`Root`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Signs root metadata (offline keys).
    Root,
    /// Signs targets metadata and model manifests (offline keys).
    Targets,
    /// Signs snapshot metadata (online, held by the hub).
    Snapshot,
    /// Signs timestamp metadata (online, held by the hub).
    Timestamp,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Targets => "targets",
            Role::Snapshot => "snapshot",
            Role::Timestamp => "timestamp",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Root {}
    impl Sealed for super::Targets {}
    impl Sealed for super::Snapshot {}
    impl Sealed for super::Timestamp {}
    impl Sealed for super::Manifest {}
}

/// A document this crate signs and verifies. Sealed: the five kinds are
/// [`Root`], [`Targets`], [`Snapshot`], [`Timestamp`] and [`Manifest`].
pub trait Metadata: Serialize + DeserializeOwned + sealed::Sealed {
    /// The `_type` this document is written with.
    const KIND: Kind;
    /// The role whose keys sign it.
    const SIGNER: Role;
    /// The document's version (for a manifest, the model's version).
    fn version(&self) -> u64;
    /// When the document stops being trusted.
    fn expires(&self) -> OffsetDateTime;
    /// Checks the invariants serde cannot express.
    fn validate(&self) -> Result<(), Error>;
}

// ---------------------------------------------------------------------------
// Model manifest.

/// A model manifest: what a model is, what it needs and how to check its
/// artifact. Signed by the targets role and listed in [`Targets`].
///
/// `version` is a `u64` that the publisher increases with every release of
/// the same `name`: a total order with no pre-release or build-metadata
/// corner cases, which is what rollback protection needs. A human-readable
/// release name, if wanted, belongs in the model's own docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model's name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
    pub name: String,
    /// The release number, strictly increasing per name.
    pub version: u64,
    /// The weights file this manifest vouches for.
    pub artifact: Artifact,
    /// What a device must have to run the model.
    pub runtime: RuntimeRequirements,
    /// The model's inputs and outputs.
    pub schema: IoSchema,
    /// Evaluation metrics by name (for example `"accuracy": 0.93`); finite.
    pub metrics: BTreeMap<String, f64>,
    /// Where the weights came from.
    pub provenance: Provenance,
    /// What the device checks before it serves the new version (absent:
    /// the model must load and answer one smoke request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// When this manifest stops being installable (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

/// The artifact (weights file) a manifest vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// SHA-256 of the file's bytes.
    pub sha256: Sha256Digest,
    /// The file's length in bytes.
    pub size_bytes: u64,
    /// The file format.
    pub format: ArtifactFormat,
}

/// Weight-file formats the agent can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactFormat {
    /// llama.cpp's GGUF.
    Gguf,
    /// Hugging Face safetensors.
    Safetensors,
    /// ONNX.
    Onnx,
}

/// What a device must have to run a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeRequirements {
    /// The CPU architecture the artifact is built for.
    pub cpu_arch: CpuArch,
    /// The oldest agent that can load it.
    pub min_agent_version: AgentVersion,
    /// Memory the model needs, in bytes.
    pub memory_bytes: u64,
}

/// CPU architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuArch {
    /// Any architecture (portable weights, such as safetensors).
    #[serde(rename = "any")]
    Any,
    /// 64-bit x86.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit ARM.
    #[serde(rename = "aarch64")]
    Aarch64,
}

/// An agent release, `major.minor.patch`, ordered numerically field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl fmt::Display for AgentVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for AgentVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid {
            what: "agent version",
            reason: format!("{s:?} is not major.minor.patch"),
        };
        let mut parts = s.split('.').map(|p| {
            // Leading zeros and signs would give one version two spellings.
            if p.is_empty()
                || (p.len() > 1 && p.starts_with('0'))
                || !p.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            p.parse::<u32>().map_err(|_| bad())
        });
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Self {
            major: major?,
            minor: minor?,
            patch: patch?,
        })
    }
}

impl Serialize for AgentVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AgentVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A model's input and output description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoSchema {
    /// What the model takes.
    pub input: Schema,
    /// What the model gives.
    pub output: Schema,
}

/// One side of a model's interface: what kind of data, in which fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// What the data means.
    pub kind: SchemaKind,
    /// The named tensors or values, in order.
    pub fields: Vec<Field>,
}

/// What a model's input or output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaKind {
    /// Text (a prompt or generated text).
    Text,
    /// Token ids.
    Tokens,
    /// An embedding vector.
    Embedding,
    /// Class labels with scores.
    Labels,
    /// Plain tensors.
    Tensors,
}

/// One named tensor or value of a [`Schema`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The field's name; not empty.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; `null` is a dimension fixed only at run time (batch, length).
    pub shape: Vec<Option<u64>>,
}

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// Unsigned byte.
    U8,
    /// Boolean.
    Bool,
    /// UTF-8 string.
    String,
}

/// Where a model's weights came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Provenance {
    /// Trained by Strata: `{"training_run": {"run_id": "…"}}`.
    TrainingRun {
        /// The training run's id.
        run_id: String,
    },
    /// Imported from a file: `{"source": {"file": "…", "sha256": "…"}}`.
    Source {
        /// The source file's name or URL, as the publisher recorded it.
        file: String,
        /// SHA-256 of the source file.
        sha256: Sha256Digest,
    },
}

/// The publisher's definition of a healthy install: probe inputs with the
/// answers a working model gives, checked on the device after the new
/// version loads and before it is served. Signed with the manifest, so a
/// device never takes the hub's word for what healthy means.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The probes (at most 256).
    pub probes: Vec<Probe>,
    /// Fraction of the probes that must pass, in `(0, 1]`.
    pub min_pass: f64,
    /// Largest acceptable median latency of the probes, in milliseconds
    /// (the first probe warms the model up and is not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<u64>,
}

/// One health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// The input text.
    pub input: String,
    /// What a working model answers: the label (classifiers) or a substring
    /// of the greedy completion (language models); empty for models whose
    /// output is only checked to be well-formed (embeddings).
    pub expect: String,
}

/// Most probes a health check may list.
pub const MAX_PROBES: usize = 256;

impl HealthCheck {
    fn validate(&self) -> Result<(), Error> {
        if self.probes.is_empty() || self.probes.len() > MAX_PROBES {
            return Err(invalid(
                "manifest",
                format!(
                    "a health check needs 1 to {MAX_PROBES} probes, has {}",
                    self.probes.len()
                ),
            ));
        }
        if !(self.min_pass > 0.0 && self.min_pass <= 1.0) {
            return Err(invalid(
                "manifest",
                format!("health min_pass {} must be in (0, 1]", self.min_pass),
            ));
        }
        Ok(())
    }
}

fn invalid(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        reason: reason.into(),
    }
}

/// Whether `name` is a valid model name (see [`Manifest::name`]).
pub(crate) fn valid_model_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Metadata for Manifest {
    const KIND: Kind = Kind::Manifest;
    const SIGNER: Role = Role::Targets;
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> OffsetDateTime {
        self.expires
    }
    fn validate(&self) -> Result<(), Error> {
        if !valid_model_name(&self.name) {
            return Err(invalid(
                "manifest",
                format!(
                    "model name {:?} is not 1-128 of A-Z a-z 0-9 . _ -",
                    self.name
                ),
            ));
        }
        if let Some((name, value)) = self
            .metrics
            .iter()
            .find(|(n, v)| n.is_empty() || !v.is_finite())
        {
            return Err(invalid(
                "manifest",
                format!("metric {name:?} = {value} must be named and finite"),
            ));
        }
        let fields = self
            .schema
            .input
            .fields
            .iter()
            .chain(&self.schema.output.fields);
        if fields.into_iter().any(|f| f.name.is_empty()) {
            return Err(invalid("manifest", "a schema field has an empty name"));
        }
        if let Some(health) = &self.health {
            health.validate()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Roles.

/// Root metadata: the keys of every role and how many must sign.
///
/// Signed by a threshold of its own root keys; a new root is signed by a
/// threshold of the previous root's root keys as well.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Increases by exactly one with every new root.
    pub version: u64,
    /// When the root stops being trusted (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// Every key any role uses, by key id (hex SHA-256 of the key bytes).
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// Which keys sign for each role.
    pub roles: Roles,
}

/// The four roles' keys and thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Root role.
    pub root: RoleKeys,
    /// Targets role.
    pub targets: RoleKeys,
    /// Snapshot role.
    pub snapshot: RoleKeys,
    /// Timestamp role.
    pub timestamp: RoleKeys,
}

/// One role's key ids and threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    /// The keys that may sign for the role.
    pub key_ids: BTreeSet<KeyId>,
    /// How many distinct keys of `key_ids` must sign; at least 1.
    pub threshold: u32,
}

/// A role's keys and threshold, as [`Root::new`] takes them.
#[derive(Clone, Debug)]
pub struct RoleSpec {
    /// How many distinct keys must sign.
    pub threshold: u32,
    /// The public keys.
    pub keys: Vec<PublicKey>,
}

impl Root {
    /// A root listing `roles`' keys, validated.
    pub fn new(
        version: u64,
        expires: OffsetDateTime,
        root: RoleSpec,
        targets: RoleSpec,
        snapshot: RoleSpec,
        timestamp: RoleSpec,
    ) -> Result<Self, Error> {
        let mut keys = BTreeMap::new();
        let mut role = |spec: RoleSpec| RoleKeys {
            key_ids: spec
                .keys
                .into_iter()
                .map(|k| {
                    keys.insert(k.key_id(), k);
                    k.key_id()
                })
                .collect(),
            threshold: spec.threshold,
        };
        let roles = Roles {
            root: role(root),
            targets: role(targets),
            snapshot: role(snapshot),
            timestamp: role(timestamp),
        };
        let root = Root {
            version,
            expires,
            keys,
            roles,
        };
        root.validate()?;
        Ok(root)
    }

    /// The keys and threshold of `role`.
    pub fn role(&self, role: Role) -> &RoleKeys {
        match role {
            Role::Root => &self.roles.root,
            Role::Targets => &self.roles.targets,
            Role::Snapshot => &self.roles.snapshot,
            Role::Timestamp => &self.roles.timestamp,
        }
    }
}

impl Metadata for Root {
    const KIND: Kind = Kind::Root;
    const SIGNER: Role = Role::Root;
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> OffsetDateTime {
        self.expires
    }
    fn validate(&self) -> Result<(), Error> {
        for (id, key) in &self.keys {
            if key.key_id() != *id {
                return Err(invalid(
                    "root",
                    format!(
                        "key listed as {} has id {}",
                        id.short(),
                        key.key_id().short()
                    ),
                ));
            }
        }
        for role in [Role::Root, Role::Targets, Role::Snapshot, Role::Timestamp] {
            let keys = self.role(role);
            if let Some(id) = keys.key_ids.iter().find(|id| !self.keys.contains_key(id)) {
                return Err(invalid(
                    "root",
                    format!(
                        "{role} role names key {} that root does not list",
                        id.short()
                    ),
                ));
            }
            if keys.threshold == 0 || keys.threshold as usize > keys.key_ids.len() {
                return Err(invalid(
                    "root",
                    format!(
                        "{role} threshold {} must be between 1 and its {} keys",
                        keys.threshold,
                        keys.key_ids.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Targets metadata: the current manifest of every model.
///
/// Manifests are signed by the targets keys themselves *and* listed here by
/// the SHA-256 of their canonical encoding. The signature lets a manifest
/// travel and be audited on its own; the listing is what makes it current,
/// because targets is pinned by snapshot, which is pinned by timestamp. A
/// validly signed manifest that targets no longer lists (withdrawn, or an
/// old one replayed) is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Increases with every new targets metadata.
    pub version: u64,
    /// When it stops being trusted (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// The current manifest of each model, by model name.
    pub manifests: BTreeMap<String, ManifestRef>,
}

/// A manifest as [`Targets`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestRef {
    /// The manifest's model version.
    pub version: u64,
    /// SHA-256 of the manifest's canonical encoding (see [`crate::digest`]).
    pub sha256: Sha256Digest,
}

impl Targets {
    /// Targets metadata listing no manifest yet.
    pub fn new(version: u64, expires: OffsetDateTime) -> Self {
        Self {
            version,
            expires,
            manifests: BTreeMap::new(),
        }
    }

    /// Lists `manifest` as its model's current release, replacing any other.
    pub fn list(&mut self, manifest: &Manifest) -> Result<(), Error> {
        manifest.validate()?;
        let entry = ManifestRef {
            version: manifest.version,
            sha256: signed::digest(manifest),
        };
        self.manifests.insert(manifest.name.clone(), entry);
        Ok(())
    }
}

impl Metadata for Targets {
    const KIND: Kind = Kind::Targets;
    const SIGNER: Role = Role::Targets;
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> OffsetDateTime {
        self.expires
    }
    fn validate(&self) -> Result<(), Error> {
        match self.manifests.keys().find(|name| !valid_model_name(name)) {
            Some(name) => Err(invalid(
                "targets",
                format!("model name {name:?} is not 1-128 of A-Z a-z 0-9 . _ -"),
            )),
            None => Ok(()),
        }
    }
}

/// A version and content hash pinning one metadata document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaRef {
    /// The document's version.
    pub version: u64,
    /// SHA-256 of its canonical `signed` body (see [`crate::digest`]).
    pub sha256: Sha256Digest,
}

impl fmt::Display for MetaRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{} (sha256 {})", self.version, self.sha256.short())
    }
}

/// Snapshot metadata: pins the current targets metadata, so a client never
/// combines targets and snapshot from different moments (mix-and-match).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Increases with every new snapshot.
    pub version: u64,
    /// When it stops being trusted (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// The current targets metadata.
    pub targets: MetaRef,
}

impl Snapshot {
    /// A snapshot pinning the signed targets metadata `signed_targets`.
    pub fn new(
        version: u64,
        expires: OffsetDateTime,
        signed_targets: &[u8],
    ) -> Result<Self, Error> {
        let targets = signed::meta_ref::<Targets>(signed_targets)?;
        Ok(Self {
            version,
            expires,
            targets,
        })
    }
}

impl Metadata for Snapshot {
    const KIND: Kind = Kind::Snapshot;
    const SIGNER: Role = Role::Snapshot;
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> OffsetDateTime {
        self.expires
    }
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Timestamp metadata: short-lived, pins the current snapshot, so a client
/// notices when it is fed old but validly signed metadata (freeze attack).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    /// Increases with every new timestamp.
    pub version: u64,
    /// When it stops being trusted (RFC 3339); hours, not months.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// The current snapshot metadata.
    pub snapshot: MetaRef,
}

impl Timestamp {
    /// A timestamp pinning the signed snapshot metadata `signed_snapshot`.
    pub fn new(
        version: u64,
        expires: OffsetDateTime,
        signed_snapshot: &[u8],
    ) -> Result<Self, Error> {
        let snapshot = signed::meta_ref::<Snapshot>(signed_snapshot)?;
        Ok(Self {
            version,
            expires,
            snapshot,
        })
    }
}

impl Metadata for Timestamp {
    const KIND: Kind = Kind::Timestamp;
    const SIGNER: Role = Role::Timestamp;
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> OffsetDateTime {
        self.expires
    }
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_versions_parse_and_order() {
        let cases = [
            ("0.1.0", Some((0, 1, 0))),
            ("10.20.30", Some((10, 20, 30))),
            ("1.2", None),
            ("1.2.3.4", None),
            ("01.2.3", None),
            ("1.-2.3", None),
            ("1.+2.3", None),
            ("", None),
            ("a.b.c", None),
        ];
        for (text, want) in cases {
            let got = text
                .parse::<AgentVersion>()
                .ok()
                .map(|v| (v.major, v.minor, v.patch));
            assert_eq!(got, want, "{text:?}");
        }
        let v = |s: &str| s.parse::<AgentVersion>().unwrap();
        assert!(v("0.10.0") > v("0.9.9"));
        assert!(v("1.0.0") > v("0.99.99"));
    }

    #[test]
    fn model_names() {
        for (name, ok) in [
            ("llama-3.2-1b", true),
            ("a", true),
            ("A_b.C-9", true),
            ("", false),
            (".hidden", false),
            ("a/b", false),
            ("a b", false),
            ("é", false),
        ] {
            assert_eq!(valid_model_name(name), ok, "{name:?}");
        }
        assert!(valid_model_name(&"x".repeat(128)));
        assert!(!valid_model_name(&"x".repeat(129)));
    }
}
