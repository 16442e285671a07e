//! The verified model updater: installs the releases rollouts ask for, and
//! proves them healthy before it keeps them.
//!
//! For each update (an `install` message from the hub, recorded in
//! `agent.db` before the message is marked processed):
//!
//! 1. bring the trusted registry state up to date (roots, timestamp,
//!    snapshot, targets) and verify the release's manifest with it
//!    ([`registry::TrustedState::verify_manifest`]: signed by the targets
//!    role, listed, unexpired, newer than what is installed);
//! 2. download the artifact with `Range` resume and check its size and
//!    SHA-256 ([`fetch`]); nothing so far touches the served model;
//! 3. install it beside the current version ([`disk`]), mark it on trial,
//!    load it, run the manifest's health probes, and serve it; report
//!    `installed`;
//! 4. watch its requests for the health window; if the error rate stays
//!    within bounds, commit it and report `committed`; otherwise put the
//!    previous version back and report `failed`.
//!
//! Every decision in 3 and 4 is local: a device with no network rolls back
//! on its own, and its reports wait in `agent.db` until the hub is back. An
//! agent that starts and finds a version still on trial rolls it back
//! first ([`resolve_installed`]): the run that installed it died before it
//! was proven healthy.

pub mod disk;
pub mod fetch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::rollout::{InstalledModel, UpdatePhase, UpdateStatus};
use registry::{HealthCheck, Manifest, TrustedState, Verified, VerifiedArtifact};
use runtime::{ModelBackend, ModelSpec};
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::link::Backoff;
use crate::metrics::Status;
use crate::state::{PhaseChange, State, UpdateJob};
use disk::{Active, Disk};
use fetch::{FetchError, RegistryClient};
use serving::Inference;

/// `[updates]` settings.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// How long a new version serves on trial before it is committed.
    pub health_window: Duration,
    /// Largest error rate of the new version's requests in its window.
    pub max_error_rate: f64,
    /// Download speed cap in bytes per second (`None`: no cap).
    pub download_rate: Option<u64>,
    /// The registry root the device was provisioned with; without one the
    /// first root is read from the hub over the pinned channel.
    pub trust_root: Option<PathBuf>,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            health_window: Duration::from_secs(60),
            max_error_rate: 0.05,
            download_rate: None,
            trust_root: None,
        }
    }
}

/// Why an update did not go through (reported as the `failed` detail).
type Failure = String;

/// A release's artifact on disk, checked against its verified manifest:
/// the only thing the updater hands to the model loader. Built only from a
/// [`VerifiedArtifact`] (which only the `registry` crate makes) for the
/// file that was hashed.
#[derive(Debug, Clone)]
pub struct VerifiedFile {
    path: PathBuf,
    artifact: VerifiedArtifact,
}

impl VerifiedFile {
    /// The artifact's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest it matched.
    pub fn manifest(&self) -> &Manifest {
        self.artifact.manifest()
    }
}

/// Checks an artifact on disk against a manifest.
fn check_file(manifest: Verified<Manifest>, path: &Path) -> Result<VerifiedFile, String> {
    let artifact = fetch::verify_file(manifest, path).map_err(|e| e.to_string())?;
    Ok(VerifiedFile {
        path: path.to_owned(),
        artifact,
    })
}

/// Re-verifies installed `version` of `name` (signature and artifact hash).
fn verified_path(
    disk: &Disk,
    trusted: &TrustedState,
    name: &str,
    version: u64,
) -> Result<VerifiedFile, String> {
    let signed = disk
        .manifest(name, version)
        .map_err(|e| format!("manifest of {name}@{version}: {e}"))?;
    let manifest = trusted
        .verify_installed(&signed)
        .map_err(|e| e.to_string())?;
    if manifest.name != name || manifest.version != version {
        return Err(format!(
            "the manifest in {name}/{version} is for {}@{}",
            manifest.name, manifest.version
        ));
    }
    let path = disk
        .artifact(name, version)
        .map_err(|e| format!("artifact of {name}@{version}: {e}"))?;
    check_file(manifest, &path)
}

/// What [`resolve_installed`] found.
#[derive(Debug, Default)]
pub struct Resolved {
    /// The verified file each model loads from, where an installed release serves.
    pub files: BTreeMap<String, VerifiedFile>,
    /// The installed releases, for the status.
    pub installed: Vec<InstalledModel>,
}

/// Decides, before the catalogue loads, which file each model loads from:
/// the installed release in `active.json` if it still verifies, else the
/// version kept before it, else the catalogue's own file. A release found
/// on trial is rolled back here, and its update marked failed.
pub fn resolve_installed(disk: &Disk, state: &State, catalogue: &runtime::Catalogue) -> Resolved {
    let mut out = Resolved::default();
    let trusted = match disk.trusted() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the trusted registry state; serving the catalogue's files");
            None
        }
    };
    for entry in &catalogue.entries {
        let name = entry.id.as_str();
        let mut active = match disk.active(name) {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(model = name, error = %e, "cannot read active.json; serving the catalogue's file");
                continue;
            }
        };
        if active.trial {
            tracing::warn!(
                model = name,
                version = active.version,
                "found on trial at start: the last run died in its health window; rolling back"
            );
            if let Some(rollout) = &active.rollout_id
                && let Err(e) = state.set_update_phase(
                    rollout,
                    UpdatePhase::Failed,
                    PhaseChange {
                        serving_version: active.previous,
                        detail: Some(format!(
                            "the agent stopped during the health window of {name}@{}; rolled back",
                            active.version
                        )),
                        ..PhaseChange::default()
                    },
                )
            {
                tracing::error!(error = %e, "cannot record the rollback");
            }
            let back = active.previous.map(|version| Active {
                version,
                previous: None,
                trial: false,
                rollout_id: None,
            });
            if let Err(e) = disk.set_active(name, back.as_ref()) {
                tracing::error!(model = name, error = %e, "cannot write active.json");
            }
            match back {
                Some(b) => active = b,
                None => continue,
            }
        }
        let Some(trusted) = &trusted else {
            tracing::error!(
                model = name,
                "an installed release but no trusted registry state; serving the catalogue's file"
            );
            continue;
        };
        let mut candidates = vec![active.version];
        candidates.extend(active.previous);
        let mut chosen = None;
        for version in candidates {
            match verified_path(disk, trusted, name, version) {
                Ok(file) => {
                    chosen = Some((version, file));
                    break;
                }
                Err(e) => {
                    tracing::error!(model = name, version, error = %e, "installed release does not verify; not loading it")
                }
            }
        }
        match chosen {
            Some((version, file)) => {
                out.files.insert(name.to_owned(), file);
                out.installed.push(InstalledModel {
                    model: name.to_owned(),
                    version,
                    previous: active.previous.filter(|p| *p != version),
                    trial: false,
                });
            }
            None => tracing::error!(
                model = name,
                "no installed release verifies; serving the catalogue's file"
            ),
        }
    }
    out
}

/// Runs the manifest's health probes (or a smoke request) on a model just
/// loaded. Blocking.
pub fn health_check(
    model: &dyn ModelBackend,
    health: Option<&HealthCheck>,
) -> Result<String, Failure> {
    let smoke = [registry::Probe {
        input: "health check".into(),
        expect: String::new(),
    }];
    let (probes, min_pass, max_ms) = match health {
        Some(h) => (&h.probes[..], h.min_pass, h.max_latency_ms),
        None => (&smoke[..], 1.0, None),
    };
    let mut passed = 0usize;
    let mut latencies = Vec::with_capacity(probes.len());
    for (i, probe) in probes.iter().enumerate() {
        let started = Instant::now();
        let ok = probe_once(model, probe)?;
        // The first probe warms the model up (first allocations, caches);
        // latency is judged on the rest, as traffic will see it.
        if i > 0 || probes.len() == 1 {
            latencies.push(started.elapsed());
        }
        passed += usize::from(ok);
    }
    latencies.sort_unstable();
    // The median: the model's speed, not one scheduling hiccup.
    let median = latencies[latencies.len() / 2];
    let rate = passed as f64 / probes.len() as f64;
    let summary = format!(
        "{passed} of {} probes passed ({:.0} %, {:.0} % needed), median {} ms",
        probes.len(),
        rate * 100.0,
        min_pass * 100.0,
        median.as_millis()
    );
    if rate + 1e-9 < min_pass {
        return Err(format!("health check failed: {summary}"));
    }
    if let Some(max) = max_ms
        && median > Duration::from_millis(max)
    {
        return Err(format!(
            "health check failed: probes took {} ms (median), limit {max} ms",
            median.as_millis()
        ));
    }
    Ok(summary)
}

fn probe_once(model: &dyn ModelBackend, probe: &registry::Probe) -> Result<bool, Failure> {
    let failed = |e: runtime::Error| format!("health probe {:?}: {e}", probe.input);
    if let Some(c) = model.as_classifier() {
        let prediction = c.classify(&[probe.input.as_str()]).map_err(failed)?;
        let label = prediction.first().map(|p| p.label.as_str()).unwrap_or("");
        return Ok(probe.expect.is_empty() || label == probe.expect);
    }
    if let Some(g) = model.as_generator() {
        let mut request =
            runtime::GenerationRequest::chat(vec![runtime::ChatMessage::user(probe.input.clone())]);
        request.max_tokens = Some(32);
        request.sampling.temperature = 0.0;
        let generation = g
            .generate(&request, &runtime::CancelToken::new(), &mut |_| {
                std::ops::ControlFlow::Continue(())
            })
            .map_err(failed)?;
        return Ok(generation
            .text
            .to_lowercase()
            .contains(&probe.expect.to_lowercase()));
    }
    if let Some(e) = model.as_embedder() {
        let vectors = e.embed(&[probe.input.as_str()]).map_err(failed)?;
        let ok = vectors.iter().all(|v| {
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().all(|x| x.is_finite()) && (norm - 1.0).abs() < 1e-2
        });
        return Ok(ok);
    }
    Err(format!(
        "models of kind {} are not installed from the registry",
        model.kind()
    ))
}

/// The agent's updater.
pub struct Updater {
    disk: Disk,
    state: State,
    status: Arc<Status>,
    inference: Arc<Inference>,
    catalogue: runtime::Catalogue,
    embedders: Mutex<BTreeMap<String, Arc<runtime::Embedder>>>,
    registry: RegistryClient,
    config: UpdateConfig,
    backoff: (Duration, Duration),
    wake: Notify,
    report_wake: Notify,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater").finish_non_exhaustive()
    }
}

/// Everything the updater is built from.
pub struct UpdaterParts {
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// The agent's database.
    pub state: State,
    /// Live status.
    pub status: Arc<Status>,
    /// The served models.
    pub inference: Arc<Inference>,
    /// The catalogue (which entry a model name loads as).
    pub catalogue: runtime::Catalogue,
    /// Loaded embedding models (classifier releases read them).
    pub embedders: BTreeMap<String, Arc<runtime::Embedder>>,
    /// The registry over the device's mTLS client.
    pub registry: RegistryClient,
    /// `[updates]`.
    pub config: UpdateConfig,
    /// Retry backoff bounds.
    pub backoff: (Duration, Duration),
}

impl Updater {
    /// An updater; call [`run`](Self::run) and
    /// [`report_loop`](Self::report_loop) on it.
    pub fn new(parts: UpdaterParts) -> Arc<Self> {
        Arc::new(Self {
            disk: Disk::new(&parts.data_dir),
            state: parts.state,
            status: parts.status,
            inference: parts.inference,
            catalogue: parts.catalogue,
            embedders: Mutex::new(parts.embedders),
            registry: parts.registry,
            config: parts.config,
            backoff: parts.backoff,
            wake: Notify::new(),
            report_wake: Notify::new(),
        })
    }

    /// Records an `install` message durably and wakes the updater.
    pub fn install(&self, rollout_id: &str, model: &str, version: u64) -> Result<(), crate::Error> {
        if self.state.add_update(rollout_id, model, version)? {
            tracing::info!(rollout = rollout_id, model, version, "update asked for");
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Records a `roll_back` message durably and wakes the updater.
    pub fn roll_back(&self, rollout_id: &str) -> Result<(), crate::Error> {
        if self.state.request_rollback(rollout_id)? {
            tracing::warn!(rollout = rollout_id, "the hub asks to roll back");
        } else {
            tracing::info!(
                rollout = rollout_id,
                "roll-back for a rollout this device never took part in"
            );
        }
        self.wake.notify_one();
        Ok(())
    }

    fn phase(&self, job: &UpdateJob, phase: UpdatePhase, change: PhaseChange) {
        tracing::info!(rollout = %job.rollout_id, model = %job.model, version = job.version, phase = phase.as_str(), detail = change.detail.as_deref().unwrap_or(""), "update");
        let detail = change.detail.clone();
        if let Err(e) = self.state.set_update_phase(&job.rollout_id, phase, change) {
            tracing::error!(error = %e, "cannot record the update's phase");
        }
        self.status.with_update(|u| {
            if u.rollout_id == job.rollout_id {
                u.phase = phase;
                u.detail = detail;
            }
        });
        self.report_wake.notify_one();
    }

    fn refresh_installed(&self) {
        let mut installed = Vec::new();
        for entry in &self.catalogue.entries {
            if let Ok(Some(a)) = self.disk.active(&entry.id) {
                installed.push(InstalledModel {
                    model: entry.id.clone(),
                    version: a.version,
                    previous: a.previous,
                    trial: a.trial,
                });
            }
        }
        self.status.set_installed(installed);
    }

    /// Works through pending updates until the agent stops.
    pub async fn run(self: Arc<Self>) {
        self.refresh_installed();
        loop {
            let jobs = match self.state.pending_updates() {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pending updates");
                    Vec::new()
                }
            };
            if jobs.is_empty() {
                self.wake.notified().await;
                continue;
            }
            for job in jobs {
                self.clone().process(job).await;
            }
        }
    }

    async fn process(self: Arc<Self>, job: UpdateJob) {
        if job.rollback_requested {
            self.roll_back_job(&job).await;
            return;
        }
        match job.phase {
            UpdatePhase::Notified | UpdatePhase::Downloading => self.apply(job).await,
            // `installed` with no trial on disk: the run that installed it
            // was stopped after it committed on disk, before it said so.
            UpdatePhase::Installed => {
                let active = self.disk.active(&job.model).ok().flatten();
                let (phase, detail) = match active {
                    Some(a) if a.version == job.version && !a.trial => (
                        UpdatePhase::Committed,
                        "committed before the agent restarted",
                    ),
                    _ => (
                        UpdatePhase::Failed,
                        "the agent restarted before the health window ended; rolled back",
                    ),
                };
                self.phase(
                    &job,
                    phase,
                    PhaseChange {
                        serving_version: self.serving(&job.model),
                        detail: Some(detail.into()),
                        ..PhaseChange::default()
                    },
                );
            }
            _ => {}
        }
    }

    fn serving(&self, name: &str) -> Option<u64> {
        self.disk.active(name).ok().flatten().map(|a| a.version)
    }

    fn fail(&self, job: &UpdateJob, detail: String) {
        tracing::warn!(rollout = %job.rollout_id, model = %job.model, version = job.version, reason = %detail, "update failed; the current model keeps serving");
        self.phase(
            job,
            UpdatePhase::Failed,
            PhaseChange {
                serving_version: self.serving(&job.model),
                detail: Some(detail),
                ..PhaseChange::default()
            },
        );
    }

    /// The trusted state, bootstrapped from the provisioned root or the
    /// hub's first root if the device has none.
    async fn trusted(&self) -> Result<TrustedState, FetchError> {
        if let Some(t) = self.disk.trusted().map_err(|e| FetchError::Io {
            path: "registry/trusted.json".into(),
            source: e,
        })? {
            return Ok(t);
        }
        let root = match &self.config.trust_root {
            Some(path) => std::fs::read(path).map_err(|e| FetchError::Io {
                path: path.clone(),
                source: e,
            })?,
            None => self.registry.first_root().await?,
        };
        Ok(TrustedState::bootstrap(&root, OffsetDateTime::now_utc())?)
    }

    /// Steps 1 and 2: verify and download, retrying what is transient.
    async fn fetch(
        &self,
        job: &UpdateJob,
    ) -> Result<(Vec<u8>, registry::VerifiedArtifact, PathBuf), Failure> {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1.max(self.backoff.0));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.fetch_once(job, attempts).await {
                Ok(done) => return Ok(done),
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(rollout = %job.rollout_id, error = %e, ?delay, "update download interrupted; retrying");
                    self.status.with_update(|u| u.detail = Some(e.to_string()));
                    tokio::time::sleep(delay).await;
                    if self
                        .state
                        .update(&job.rollout_id)
                        .ok()
                        .flatten()
                        .is_some_and(|j| j.rollback_requested)
                    {
                        return Err("the rollout was aborted before the download finished".into());
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn fetch_once(
        &self,
        job: &UpdateJob,
        attempts: u32,
    ) -> Result<(Vec<u8>, registry::VerifiedArtifact, PathBuf), FetchError> {
        let now = OffsetDateTime::now_utc();
        let mut trusted = self.trusted().await?;
        let refreshed = self.registry.refresh(&mut trusted, now).await;
        // Whatever verified is kept, so that a replay of older metadata is
        // refused next time too.
        self.disk
            .save_trusted(&trusted)
            .map_err(|e| FetchError::Io {
                path: "registry/trusted.json".into(),
                source: e,
            })?;
        refreshed?;
        let (signed, manifest) = self
            .registry
            .manifest(&trusted, &job.model, job.version, now)
            .await?;
        self.check_runnable(&manifest).map_err(|reason| {
            FetchError::Verify(registry::Error::Invalid {
                what: "manifest",
                reason,
            })
        })?;
        let sha = manifest.artifact.sha256.to_string();
        let partial = self
            .disk
            .partial(&job.model, &sha)
            .map_err(|e| FetchError::Io {
                path: "models".into(),
                source: e,
            })?;
        let resumed_from = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        let total = manifest.artifact.size_bytes;
        self.status.set_update(UpdateStatus {
            rollout_id: job.rollout_id.clone(),
            model: job.model.clone(),
            version: job.version,
            phase: UpdatePhase::Downloading,
            downloaded_bytes: resumed_from,
            total_bytes: total,
            resumed_from,
            attempts,
            detail: None,
        });
        if resumed_from > 0 {
            tracing::info!(rollout = %job.rollout_id, resumed_from, total, "resuming the download");
        }
        let status = Arc::clone(&self.status);
        let mut last_logged = 0u64;
        let mut progress = move |done: u64, total: u64| {
            status.with_update(|u| {
                u.downloaded_bytes = done;
                u.total_bytes = total;
            });
            let tenth = total / 10;
            if tenth > 0 && done / tenth > last_logged / tenth {
                tracing::info!(
                    done,
                    total,
                    "download {:.0} %",
                    done as f64 * 100.0 / total as f64
                );
                last_logged = done;
            }
        };
        let artifact = self
            .registry
            .download(manifest, &partial, self.config.download_rate, &mut progress)
            .await?;
        Ok((signed, artifact, partial))
    }

    /// Checks what the manifest requires against this device and catalogue.
    fn check_runnable(&self, m: &Manifest) -> Result<(), String> {
        let entry = self
            .catalogue
            .entries
            .iter()
            .find(|e| e.id == m.name)
            .ok_or_else(|| format!("no model {:?} in this device's catalogue", m.name))?;
        let format_ok = matches!(
            (&entry.spec, m.artifact.format),
            (ModelSpec::Llm { .. }, registry::ArtifactFormat::Gguf)
                | (ModelSpec::Embedding { .. }, registry::ArtifactFormat::Gguf)
                | (
                    ModelSpec::Classifier { .. },
                    registry::ArtifactFormat::Safetensors
                )
        );
        if !format_ok {
            return Err(format!(
                "a {:?} artifact cannot serve the {} model {:?}",
                m.artifact.format,
                entry.spec.kind(),
                m.name
            ));
        }
        let arch_ok = match m.runtime.cpu_arch {
            registry::CpuArch::Any => true,
            registry::CpuArch::X86_64 => std::env::consts::ARCH == "x86_64",
            registry::CpuArch::Aarch64 => std::env::consts::ARCH == "aarch64",
        };
        if !arch_ok {
            return Err(format!(
                "built for {:?}, this device is {}",
                m.runtime.cpu_arch,
                std::env::consts::ARCH
            ));
        }
        let agent: registry::AgentVersion = env!("CARGO_PKG_VERSION")
            .parse()
            .map_err(|e: registry::Error| e.to_string())?;
        if m.runtime.min_agent_version > agent {
            return Err(format!(
                "needs agent {} or newer, this is {agent}",
                m.runtime.min_agent_version
            ));
        }
        Ok(())
    }

    /// Loads model `name` from a verified release, or from the catalogue's
    /// own file (`None`).
    async fn load(
        &self,
        name: &str,
        file: Option<VerifiedFile>,
    ) -> Result<Arc<dyn ModelBackend>, Failure> {
        let path = file.map(|f| f.path);
        let entry = self
            .catalogue
            .entries
            .iter()
            .find(|e| e.id == name)
            .cloned()
            .ok_or_else(|| format!("no model {name:?} in the catalogue"))?;
        let mut embedders = self
            .embedders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let loaded = tokio::task::spawn_blocking(move || {
            runtime::catalogue::load_entry(&entry, path.as_deref(), &mut embedders)
                .map(|m| (m, embedders))
        })
        .await
        .map_err(|e| format!("loading {name}: {e}"))?
        .map_err(|e| format!("loading {name}: {e}"))?;
        *self.embedders.lock().unwrap_or_else(|e| e.into_inner()) = loaded.1;
        Ok(loaded.0)
    }

    /// Steps 1 to 4 for one update.
    async fn apply(&self, job: UpdateJob) {
        self.phase(
            &job,
            UpdatePhase::Downloading,
            PhaseChange {
                serving_version: self.serving(&job.model),
                ..PhaseChange::default()
            },
        );
        let (signed, artifact, partial) = match self.fetch(&job).await {
            Ok(done) => done,
            Err(e) => return self.fail(&job, e),
        };
        let manifest: Manifest = (**artifact.manifest()).clone();
        let before = match self.disk.active(&job.model) {
            Ok(a) => a,
            Err(e) => return self.fail(&job, format!("reading active.json: {e}")),
        };
        let previous = before.as_ref().map(|a| a.version);
        // Install beside the current version; the served model is untouched.
        let path = match self.disk.install(
            &job.model,
            job.version,
            manifest.artifact.format,
            &partial,
            &signed,
        ) {
            Ok(p) => p,
            Err(e) => return self.fail(&job, format!("installing: {e}")),
        };
        // From here the device refuses this version and older ones from the
        // registry, whatever becomes of the install.
        match self.disk.trusted() {
            Ok(Some(mut trusted)) => {
                trusted.record_installed(&artifact);
                if let Err(e) = self.disk.save_trusted(&trusted) {
                    return self.fail(&job, format!("saving the trusted state: {e}"));
                }
            }
            _ => return self.fail(&job, "the trusted state vanished during the update".into()),
        }
        let trial = Active {
            version: job.version,
            previous,
            trial: true,
            rollout_id: Some(job.rollout_id.clone()),
        };
        if let Err(e) = self.disk.set_active(&job.model, Some(&trial)) {
            return self.fail(&job, format!("writing active.json: {e}"));
        }
        self.refresh_installed();
        // The file moved into place is the one that was hashed.
        let file = VerifiedFile {
            path,
            artifact: artifact.clone(),
        };
        let model = match self.load(&job.model, Some(file)).await {
            Ok(m) => m,
            Err(e) => return self.restore_failed(&job, before.as_ref(), e).await,
        };
        let health = manifest.health.clone();
        let probe_model = Arc::clone(&model);
        let checked =
            tokio::task::spawn_blocking(move || health_check(&*probe_model, health.as_ref()))
                .await
                .map_err(|e| format!("health check: {e}"))
                .and_then(|r| r);
        let summary = match checked {
            Ok(s) => s,
            Err(e) => return self.restore_failed(&job, before.as_ref(), e).await,
        };
        let watch = self.inference.watch(&job.model);
        let old = self.inference.replace(&job.model, model);
        self.phase(
            &job,
            UpdatePhase::Installed,
            PhaseChange {
                serving_version: Some(job.version),
                detail: Some(summary.clone()),
                ..PhaseChange::default()
            },
        );
        // The health window: the new version serves real traffic, watched.
        let deadline = tokio::time::Instant::now() + self.config.health_window;
        let mut aborted = false;
        while tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(250)),
                self.wake.notified(),
            )
            .await;
            if self
                .state
                .update(&job.rollout_id)
                .ok()
                .flatten()
                .is_some_and(|j| j.rollback_requested)
            {
                aborted = true;
                break;
            }
        }
        self.inference.unwatch(&job.model);
        let counts = watch.counts();
        let error_rate = if counts.requests == 0 {
            0.0
        } else {
            counts.errors as f64 / counts.requests as f64
        };
        let change = |serving: Option<u64>, detail: String| PhaseChange {
            serving_version: serving,
            detail: Some(detail),
            requests: counts.requests,
            errors: counts.errors,
            p95_ms: counts.p95_ms(),
        };
        if aborted || error_rate > self.config.max_error_rate {
            match old {
                Some(old) => {
                    self.inference.replace(&job.model, old);
                }
                None => self.restore(&job.model, before.as_ref()).await,
            }
            if let Err(e) = self.disk.set_active(&job.model, before.as_ref()) {
                tracing::error!(error = %e, "cannot write active.json");
            }
            self.refresh_installed();
            let (phase, detail) = if aborted {
                (
                    UpdatePhase::RolledBack,
                    format!(
                        "the rollout was aborted during the health window; back on {}",
                        version_name(previous)
                    ),
                )
            } else {
                (
                    UpdatePhase::Failed,
                    format!(
                        "error rate {:.1} % over {} requests in the health window (limit {:.1} %); rolled back to {}",
                        error_rate * 100.0,
                        counts.requests,
                        self.config.max_error_rate * 100.0,
                        version_name(previous)
                    ),
                )
            };
            self.phase(&job, phase, change(previous, detail));
            return;
        }
        let committed = Active {
            trial: false,
            ..trial
        };
        if let Err(e) = self.disk.set_active(&job.model, Some(&committed)) {
            tracing::error!(error = %e, "cannot write active.json");
        }
        let keep: Vec<u64> = [Some(job.version), previous]
            .into_iter()
            .flatten()
            .collect();
        if let Err(e) = self.disk.prune(&job.model, &keep) {
            tracing::warn!(error = %e, "cannot remove old releases");
        }
        self.refresh_installed();
        self.phase(
            &job,
            UpdatePhase::Committed,
            change(
                Some(job.version),
                format!(
                    "{summary}; {} requests, {} failed in the health window",
                    counts.requests, counts.errors
                ),
            ),
        );
    }

    /// Puts `before` back after a release failed before it served.
    async fn restore_failed(&self, job: &UpdateJob, before: Option<&Active>, reason: Failure) {
        if let Err(e) = self.disk.set_active(&job.model, before) {
            tracing::error!(model = %job.model, error = %e, "cannot write active.json");
        }
        self.refresh_installed();
        self.fail(job, reason);
    }

    /// Serves `active` again (`None`: the catalogue's file), loading it.
    async fn restore(&self, name: &str, active: Option<&Active>) {
        if let Err(e) = self.disk.set_active(name, active) {
            tracing::error!(model = name, error = %e, "cannot write active.json");
        }
        self.refresh_installed();
        let path = match active {
            None => None,
            Some(a) => {
                let trusted = self.disk.trusted().ok().flatten();
                match trusted.map(|t| verified_path(&self.disk, &t, name, a.version)) {
                    Some(Ok(p)) => Some(p),
                    other => {
                        tracing::error!(model = name, version = a.version, problem = ?other.map(|r| r.err()), "the previous release does not verify; serving the catalogue's file");
                        None
                    }
                }
            }
        };
        // The served model is replaced only by one that loads.
        match self.load(name, path).await {
            Ok(m) => {
                self.inference.replace(name, m);
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "cannot load the previous version; keeping what serves")
            }
        }
    }

    /// A roll-back asked for by the hub.
    async fn roll_back_job(&self, job: &UpdateJob) {
        let active = self.disk.active(&job.model).ok().flatten();
        match active {
            Some(a) if a.version == job.version => {
                let back = a.previous.map(|version| Active {
                    version,
                    previous: None,
                    trial: false,
                    rollout_id: None,
                });
                self.restore(&job.model, back.as_ref()).await;
                self.phase(
                    job,
                    UpdatePhase::RolledBack,
                    PhaseChange {
                        serving_version: a.previous,
                        detail: Some(format!(
                            "rolled back to {} as the hub asked",
                            version_name(a.previous)
                        )),
                        ..PhaseChange::default()
                    },
                );
            }
            _ => {
                let detail = if job.phase == UpdatePhase::Committed {
                    "this device no longer serves the rollout's version"
                } else {
                    "the rollout was aborted before this device installed it"
                };
                self.phase(
                    job,
                    UpdatePhase::RolledBack,
                    PhaseChange {
                        serving_version: active.map(|a| a.version),
                        detail: Some(detail.into()),
                        ..PhaseChange::default()
                    },
                );
            }
        }
    }

    /// Sends owed reports to the hub until the agent stops; a report waits
    /// in `agent.db` for as long as the hub is out of reach.
    pub async fn report_loop(self: Arc<Self>, client: reqwest::Client, base: String) {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1.max(self.backoff.0));
        loop {
            let reports = self.state.unsent_reports().unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read owed reports");
                Vec::new()
            });
            let mut failed = false;
            for (rollout_id, report) in reports {
                let response = client
                    .post(format!("{base}/rollouts/{rollout_id}"))
                    .timeout(Duration::from_secs(10))
                    .json(&report)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() || r.status().is_client_error() => {
                        if !r.status().is_success() {
                            tracing::warn!(rollout = %rollout_id, status = %r.status(), "the hub refused an update report; not sending it again");
                        }
                        if let Err(e) = self.state.report_sent(&rollout_id, report.seq) {
                            tracing::error!(error = %e, "cannot record a sent report");
                        }
                    }
                    Ok(r) => {
                        tracing::warn!(status = %r.status(), "update report not taken; retrying");
                        failed = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %crate::chain(&e), "update report not delivered; retrying");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                let _ =
                    tokio::time::timeout(backoff.next_delay(), self.report_wake.notified()).await;
            } else {
                backoff.reset();
                let _ = tokio::time::timeout(Duration::from_secs(30), self.report_wake.notified())
                    .await;
            }
        }
    }
}

fn version_name(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("version {v}"),
        None => "the catalogue's model".into(),
    }
}
