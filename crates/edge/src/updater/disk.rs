//! Where installed releases live on the device, and how one is installed
//! without ever leaving a half-written model where the loader looks.
//!
//! ```text
//! models/<name>/<version>/artifact.<ext>   the verified weights
//! models/<name>/<version>/manifest.json    the signed manifest, re-verified at load
//! models/<name>/active.json                which version serves, which is kept
//!                                          to roll back to, and whether the
//!                                          served one is still on trial
//! models/<name>/.partial-<sha256>          a download in progress
//! registry/trusted.json                    the device's TrustedState (0600)
//! ```
//!
//! Installing writes the version directory under a temporary name, syncs
//! it and renames it into place; `active.json` is replaced atomically after
//! that. A crash at any point leaves either the old `active.json` (the new
//! directory is ignored) or the new one, pointing at a complete directory.

use std::path::{Path, PathBuf};

use registry::{ArtifactFormat, TrustedState};
use serde::{Deserialize, Serialize};

/// Which installed version of a model serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Active {
    /// The version served.
    pub version: u64,
    /// The version to roll back to; `None` means the catalogue's own file.
    pub previous: Option<u64>,
    /// True from install until the health window passes. An agent that
    /// starts and finds a version still on trial rolls it back: the last
    /// run died before proving it healthy.
    pub trial: bool,
    /// The rollout that installed it.
    pub rollout_id: Option<String>,
}

/// The device's model and trust directories.
#[derive(Debug, Clone)]
pub struct Disk {
    models: PathBuf,
    registry: PathBuf,
}

fn extension(format: ArtifactFormat) -> &'static str {
    match format {
        ArtifactFormat::Gguf => "gguf",
        ArtifactFormat::Safetensors => "safetensors",
        ArtifactFormat::Onnx => "onnx",
    }
}

impl Disk {
    /// The layout under the agent's data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            models: data_dir.join("models"),
            registry: data_dir.join("registry"),
        }
    }

    fn model(&self, name: &str) -> PathBuf {
        self.models.join(name)
    }

    /// Where a download of `sha256` for `name` accumulates.
    pub fn partial(&self, name: &str, sha256: &str) -> std::io::Result<PathBuf> {
        let dir = self.model(name);
        durable::create_private_dir(&self.models)?;
        durable::create_private_dir(&dir)?;
        Ok(dir.join(format!(".partial-{sha256}")))
    }

    /// The directory of an installed version.
    pub fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.model(name).join(version.to_string())
    }

    /// The artifact of an installed version (whatever its extension).
    pub fn artifact(&self, name: &str, version: u64) -> std::io::Result<PathBuf> {
        let dir = self.version_dir(name, version);
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_stem().is_some_and(|s| s == "artifact") {
                return Ok(path);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no artifact in {}", dir.display()),
        ))
    }

    /// The signed manifest of an installed version.
    pub fn manifest(&self, name: &str, version: u64) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.version_dir(name, version).join("manifest.json"))
    }

    /// Moves a verified download into place as `version` of `name`, with
    /// its signed manifest. Returns the artifact's path.
    pub fn install(
        &self,
        name: &str,
        version: u64,
        format: ArtifactFormat,
        partial: &Path,
        signed_manifest: &[u8],
    ) -> std::io::Result<PathBuf> {
        let model = self.model(name);
        let staging = model.join(format!(".install-{version}"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        durable::create_private_dir(&staging)?;
        let artifact = staging.join(format!("artifact.{}", extension(format)));
        std::fs::rename(partial, &artifact)?;
        std::fs::File::open(&artifact)?.sync_all()?;
        durable::write_atomic(
            &staging.join("manifest.json"),
            signed_manifest,
            durable::PRIVATE,
        )?;
        durable::sync_dir(&staging)?;
        let target = self.version_dir(name, version);
        if target.exists() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(&staging, &target)?;
        durable::sync_dir(&model)?;
        Ok(target.join(format!("artifact.{}", extension(format))))
    }

    /// Which version of `name` serves, if one was installed.
    pub fn active(&self, name: &str) -> std::io::Result<Option<Active>> {
        match std::fs::read(self.model(name).join("active.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `active` what serves (`None`: the catalogue's own file).
    pub fn set_active(&self, name: &str, active: Option<&Active>) -> std::io::Result<()> {
        let model = self.model(name);
        durable::create_private_dir(&self.models)?;
        durable::create_private_dir(&model)?;
        let path = model.join("active.json");
        match active {
            Some(a) => {
                let json = serde_json::to_vec_pretty(a).map_err(std::io::Error::other)?;
                durable::write_atomic(&path, &json, durable::PRIVATE)
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => durable::sync_dir(&model),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// Deletes installed versions of `name` other than `keep`, and stale
    /// downloads.
    pub fn prune(&self, name: &str, keep: &[u64]) -> std::io::Result<()> {
        let model = self.model(name);
        let Ok(entries) = std::fs::read_dir(&model) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            let stale = match file_name.parse::<u64>() {
                Ok(v) => !keep.contains(&v),
                Err(_) => file_name.starts_with(".partial-") || file_name.starts_with(".install-"),
            };
            if stale {
                let path = entry.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        durable::sync_dir(&model)
    }

    fn trusted_path(&self) -> PathBuf {
        self.registry.join("trusted.json")
    }

    /// The device's trusted registry state, if it has one.
    pub fn trusted(&self) -> std::io::Result<Option<TrustedState>> {
        match std::fs::read(self.trusted_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Persists the trusted state, readable and writable by the agent only.
    pub fn save_trusted(&self, state: &TrustedState) -> std::io::Result<()> {
        durable::create_private_dir(&self.registry)?;
        let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        durable::write_atomic(&self.trusted_path(), &json, durable::PRIVATE)
    }
}
