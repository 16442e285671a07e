//! The device side: what a device trusts, how new metadata is admitted, and
//! the [`Verified`] types the agent's loader demands.

use std::collections::BTreeMap;
use std::ops::Deref;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::metadata::{
    Kind, Manifest, MetaRef, Metadata, Role, Root, Snapshot, Targets, Timestamp,
};
use crate::signed::{self, Parsed};
use crate::{Error, Sha256Digest};

/// A document this crate has verified. Only this crate can make one (the
/// fields are private and there is no `Deserialize`), so a function that
/// takes `Verified<Manifest>` cannot be handed an unchecked manifest.
///
/// ```compile_fail
/// // Outside this crate a `Verified` cannot be built by hand.
/// let forged = registry::Verified { value: 7u32, sha256: registry::Sha256Digest([0; 32]) };
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Verified<T> {
    value: T,
    sha256: Sha256Digest,
}

impl<T> Verified<T> {
    /// SHA-256 of the document's canonical encoding (what targets lists).
    pub fn sha256(&self) -> Sha256Digest {
        self.sha256
    }

    /// The document, no longer marked verified.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl Verified<Manifest> {
    /// Checks that `bytes` is the artifact this manifest vouches for: the
    /// same size and SHA-256.
    pub fn check_artifact(self, bytes: &[u8]) -> Result<VerifiedArtifact, Error> {
        let mut checker = self.artifact_checker();
        checker.update(bytes)?;
        checker.finish()
    }

    /// A streaming checker for an artifact too large to hold in memory: feed
    /// it the file in chunks, then [`ArtifactChecker::finish`].
    pub fn artifact_checker(self) -> ArtifactChecker {
        ArtifactChecker {
            manifest: self,
            hasher: Sha256::new(),
            size_bytes: 0,
        }
    }
}

/// Hashes an artifact chunk by chunk and compares it with its manifest.
#[derive(Debug)]
pub struct ArtifactChecker {
    manifest: Verified<Manifest>,
    hasher: Sha256,
    size_bytes: u64,
}

impl ArtifactChecker {
    /// Feeds the next chunk; fails as soon as the artifact is longer than the
    /// manifest says, so an endless download is cut short.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.size_bytes = self.size_bytes.saturating_add(chunk.len() as u64);
        let expected = self.manifest.artifact.size_bytes;
        if self.size_bytes > expected {
            return Err(self.size_error());
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Compares the size and SHA-256 of everything fed so far with the manifest.
    pub fn finish(self) -> Result<VerifiedArtifact, Error> {
        if self.size_bytes != self.manifest.artifact.size_bytes {
            return Err(self.size_error());
        }
        let sha256 = Sha256Digest(self.hasher.finalize().into());
        if sha256 != self.manifest.artifact.sha256 {
            return Err(Error::ArtifactHash {
                name: self.manifest.name.clone(),
                version: self.manifest.version,
                expected: self.manifest.artifact.sha256,
                got: sha256,
            });
        }
        Ok(VerifiedArtifact {
            manifest: self.manifest,
        })
    }

    fn size_error(&self) -> Error {
        Error::ArtifactSize {
            name: self.manifest.name.clone(),
            version: self.manifest.version,
            expected: self.manifest.artifact.size_bytes,
            got: self.size_bytes,
        }
    }
}

/// An artifact whose bytes matched a [`Verified<Manifest>`]: what the
/// agent's loader and [`TrustedState::record_installed`] accept.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedArtifact {
    manifest: Verified<Manifest>,
}

impl VerifiedArtifact {
    /// The manifest the artifact matched.
    pub fn manifest(&self) -> &Verified<Manifest> {
        &self.manifest
    }
}

/// A trusted document together with the digest that pins it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pinned<T> {
    body: T,
    sha256: Sha256Digest,
}

impl<T: Metadata> Pinned<T> {
    fn meta_ref(&self) -> MetaRef {
        MetaRef {
            version: self.body.version(),
            sha256: self.sha256,
        }
    }
}

impl<T: Metadata> From<Parsed<T>> for Pinned<T> {
    fn from(parsed: Parsed<T>) -> Self {
        Self {
            body: parsed.body,
            sha256: parsed.digest,
        }
    }
}

/// What a device trusts: its root, the latest timestamp, snapshot and targets
/// metadata it accepted, and the highest version it installed of each model.
///
/// The agent persists it as JSON (serde) in a file only it can write; the
/// state is exactly as trustworthy as that file. The first root comes from
/// provisioning, through [`TrustedState::bootstrap`].
///
/// An update cycle is: [`update_root`](Self::update_root) for each newer root
/// in turn, then [`update_timestamp`](Self::update_timestamp),
/// [`update_snapshot`](Self::update_snapshot),
/// [`update_targets`](Self::update_targets), and
/// [`verify_manifest`](Self::verify_manifest) for each model to install. A
/// failed update leaves the state unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedState {
    root: Pinned<Root>,
    timestamp: Option<Pinned<Timestamp>>,
    snapshot: Option<Pinned<Snapshot>>,
    targets: Option<Pinned<Targets>>,
    installed: BTreeMap<String, u64>,
}

fn check_fresh<T: Metadata>(body: &T, now: OffsetDateTime) -> Result<(), Error> {
    if now >= body.expires() {
        return Err(Error::Expired {
            kind: T::KIND,
            version: body.version(),
            expires: body.expires(),
        });
    }
    Ok(())
}

fn require<T>(slot: &Option<Pinned<T>>, kind: Kind) -> Result<&Pinned<T>, Error> {
    slot.as_ref().ok_or(Error::Missing { kind })
}

/// Refuses a document older than the trusted one, or a different document
/// with the same version; `older` builds the error for the first case.
fn check_not_older<T: Metadata>(
    trusted: Option<&Pinned<T>>,
    new: &Parsed<T>,
    older: impl FnOnce(u64, u64) -> Error,
) -> Result<(), Error> {
    let Some(trusted) = trusted else {
        return Ok(());
    };
    let (have, got) = (trusted.body.version(), new.body.version());
    if got < have {
        return Err(older(have, got));
    }
    if got == have && new.digest != trusted.sha256 {
        return Err(Error::VersionReused {
            kind: T::KIND,
            version: got,
        });
    }
    Ok(())
}

impl TrustedState {
    /// Starts trusting `signed_root`, which the device got from a trusted
    /// channel (its provisioning bundle). It must be signed by a threshold of
    /// its own root keys and not be expired.
    pub fn bootstrap(signed_root: &[u8], now: OffsetDateTime) -> Result<Self, Error> {
        let root = signed::parse::<Root>(signed_root)?;
        root.check_signed_by(&root.body)?;
        check_fresh(&root.body, now)?;
        Ok(Self {
            root: root.into(),
            timestamp: None,
            snapshot: None,
            targets: None,
            installed: BTreeMap::new(),
        })
    }

    /// The trusted root.
    pub fn root(&self) -> &Root {
        &self.root.body
    }

    /// The trusted targets metadata: the models available, if any.
    pub fn targets(&self) -> Option<&Targets> {
        self.targets.as_ref().map(|t| &t.body)
    }

    /// The highest installed version of model `name`.
    pub fn installed_version(&self, name: &str) -> Option<u64> {
        self.installed.get(name).copied()
    }

    /// Moves to the next root, which must be exactly one version newer and
    /// signed by a threshold of the trusted root's root keys and of its own.
    ///
    /// A client several versions behind applies each root in turn. Expiry is
    /// not checked here, because roots on the way may long have expired; the
    /// root the walk ends on is checked by every later update.
    ///
    /// When the new root changes the timestamp or snapshot keys, the trusted
    /// timestamp and snapshot are dropped (as TUF does), so that metadata
    /// pushed to a far-future version by a leaked online key does not lock
    /// the device out after the key is replaced.
    pub fn update_root(&mut self, signed_root: &[u8]) -> Result<(), Error> {
        let new = signed::parse::<Root>(signed_root)?;
        let trusted = self.root.body.version;
        let got = new.body.version;
        if got <= trusted {
            return Err(Error::Rollback {
                kind: Kind::Root,
                trusted,
                got,
            });
        }
        if got != trusted + 1 {
            return Err(Error::RootVersionSkipped { trusted, got });
        }
        new.check_signed_by(&self.root.body)?;
        new.check_signed_by(&new.body)?;
        let old = &self.root.body;
        let online_rotated = old.role(Role::Timestamp) != new.body.role(Role::Timestamp)
            || old.role(Role::Snapshot) != new.body.role(Role::Snapshot)
            || [Role::Timestamp, Role::Snapshot].iter().any(|r| {
                old.role(*r)
                    .key_ids
                    .iter()
                    .any(|id| old.keys.get(id) != new.body.keys.get(id))
            });
        if online_rotated {
            self.timestamp = None;
            self.snapshot = None;
        }
        self.root = new.into();
        Ok(())
    }

    /// Admits new timestamp metadata: signed by the timestamp role, not older
    /// than the trusted timestamp nor pointing at an older snapshot (freeze),
    /// and not expired.
    pub fn update_timestamp(
        &mut self,
        signed_timestamp: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        check_fresh(&self.root.body, now)?;
        let new = signed::parse::<Timestamp>(signed_timestamp)?;
        new.check_signed_by(&self.root.body)?;
        let freeze = |kind| move |trusted, got| Error::Freeze { kind, trusted, got };
        check_not_older(self.timestamp.as_ref(), &new, freeze(Kind::Timestamp))?;
        if let Some(snapshot) = &self.snapshot {
            let (trusted, got) = (snapshot.body.version, new.body.snapshot.version);
            if got < trusted {
                return Err(freeze(Kind::Snapshot)(trusted, got));
            }
        }
        check_fresh(&new.body, now)?;
        self.timestamp = Some(new.into());
        Ok(())
    }

    /// Admits new snapshot metadata: signed by the snapshot role, exactly the
    /// version and digest the trusted timestamp names, not older than the
    /// trusted snapshot, not pointing at older targets, and not expired.
    pub fn update_snapshot(
        &mut self,
        signed_snapshot: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        check_fresh(&self.root.body, now)?;
        let timestamp = require(&self.timestamp, Kind::Timestamp)?;
        let new = signed::parse::<Snapshot>(signed_snapshot)?;
        new.check_signed_by(&self.root.body)?;
        check_not_older(self.snapshot.as_ref(), &new, |trusted, got| Error::Freeze {
            kind: Kind::Snapshot,
            trusted,
            got,
        })?;
        if new.meta_ref() != timestamp.body.snapshot {
            return Err(Error::MixAndMatch {
                kind: Kind::Snapshot,
                got: new.meta_ref(),
                listed_by: Kind::Timestamp,
                listed: timestamp.body.snapshot,
            });
        }
        if let Some(targets) = &self.targets {
            let (trusted, got) = (targets.body.version, new.body.targets.version);
            if got < trusted {
                return Err(Error::Rollback {
                    kind: Kind::Targets,
                    trusted,
                    got,
                });
            }
        }
        check_fresh(&new.body, now)?;
        self.snapshot = Some(new.into());
        Ok(())
    }

    /// Admits new targets metadata: signed by the targets role, exactly the
    /// version and digest the trusted snapshot names, not older than the
    /// trusted targets, and not expired.
    pub fn update_targets(
        &mut self,
        signed_targets: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        check_fresh(&self.root.body, now)?;
        let snapshot = require(&self.snapshot, Kind::Snapshot)?;
        let new = signed::parse::<Targets>(signed_targets)?;
        new.check_signed_by(&self.root.body)?;
        check_not_older(self.targets.as_ref(), &new, |trusted, got| {
            Error::Rollback {
                kind: Kind::Targets,
                trusted,
                got,
            }
        })?;
        if new.meta_ref() != snapshot.body.targets {
            return Err(Error::MixAndMatch {
                kind: Kind::Targets,
                got: new.meta_ref(),
                listed_by: Kind::Snapshot,
                listed: snapshot.body.targets,
            });
        }
        check_fresh(&new.body, now)?;
        self.targets = Some(new.into());
        Ok(())
    }

    /// Verifies a signed manifest against the trusted metadata.
    ///
    /// The whole chain must be consistent (timestamp names the trusted
    /// snapshot, snapshot names the trusted targets) and unexpired at `now`;
    /// the manifest must be signed by the targets role, listed by digest in
    /// targets, unexpired, and newer than the installed version of its model.
    pub fn verify_manifest(
        &self,
        signed_manifest: &[u8],
        now: OffsetDateTime,
    ) -> Result<Verified<Manifest>, Error> {
        check_fresh(&self.root.body, now)?;
        let timestamp = require(&self.timestamp, Kind::Timestamp)?;
        let snapshot = require(&self.snapshot, Kind::Snapshot)?;
        let targets = require(&self.targets, Kind::Targets)?;
        // An update cycle cut short can leave a new timestamp over an old
        // snapshot; refuse to combine them rather than trust the stale one.
        for (kind, got, listed_by, listed) in [
            (
                Kind::Snapshot,
                snapshot.meta_ref(),
                Kind::Timestamp,
                timestamp.body.snapshot,
            ),
            (
                Kind::Targets,
                targets.meta_ref(),
                Kind::Snapshot,
                snapshot.body.targets,
            ),
        ] {
            if got != listed {
                return Err(Error::MixAndMatch {
                    kind,
                    got,
                    listed_by,
                    listed,
                });
            }
        }
        check_fresh(&timestamp.body, now)?;
        check_fresh(&snapshot.body, now)?;
        check_fresh(&targets.body, now)?;

        let manifest = signed::parse::<Manifest>(signed_manifest)?;
        manifest.check_signed_by(&self.root.body)?;
        let body = &manifest.body;
        let listed = targets.body.manifests.get(&body.name);
        if listed.is_none_or(|l| l.sha256 != manifest.digest || l.version != body.version) {
            return Err(Error::ManifestNotListed {
                name: body.name.clone(),
                version: body.version,
                sha256: manifest.digest,
                targets_version: targets.body.version,
            });
        }
        check_fresh(body, now)?;
        if let Some(&installed) = self.installed.get(&body.name)
            && body.version <= installed
        {
            return Err(Error::ModelRollback {
                name: body.name.clone(),
                installed,
                got: body.version,
            });
        }
        Ok(Verified {
            value: manifest.body,
            sha256: manifest.digest,
        })
    }

    /// Re-verifies a manifest the device installed earlier, to load it again
    /// (after a restart, or to roll back to the previous version).
    ///
    /// The manifest must be signed by the trusted root's targets role and be
    /// a version this state recorded as installed or older (it was verified
    /// in full when it was installed). Neither expiry nor the current
    /// targets listing is checked: a device with no network, or whose
    /// publisher has moved on to a newer release, keeps serving what it has.
    pub fn verify_installed(&self, signed_manifest: &[u8]) -> Result<Verified<Manifest>, Error> {
        let manifest = signed::parse::<Manifest>(signed_manifest)?;
        manifest.check_signed_by(&self.root.body)?;
        let body = &manifest.body;
        match self.installed.get(&body.name) {
            Some(&installed) if body.version <= installed => Ok(Verified {
                value: manifest.body,
                sha256: manifest.digest,
            }),
            _ => Err(Error::NotInstalled {
                name: body.name.clone(),
                version: body.version,
            }),
        }
    }

    /// Records that `artifact` is installed, so older or equal versions of its
    /// model are refused from now on.
    pub fn record_installed(&mut self, artifact: &VerifiedArtifact) {
        let manifest = artifact.manifest();
        let entry = self.installed.entry(manifest.name.clone()).or_insert(0);
        *entry = (*entry).max(manifest.version);
    }
}
