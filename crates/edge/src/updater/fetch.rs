//! The registry as a device reads it: the signed metadata chain, manifests,
//! and artifacts downloaded with `Range` resume. Nothing here is trusted
//! until [`registry::TrustedState`] says so.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use registry::{Manifest, TrustedState, Verified, VerifiedArtifact};
use time::OffsetDateTime;

/// Why fetching an update failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The hub could not be reached or the transfer broke: worth retrying.
    #[error("{0}")]
    Network(String),
    /// The hub answered, but not with what the device needs: retrying
    /// will not help (or not soon).
    #[error("hub answered {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// What it said.
        detail: String,
    },
    /// The metadata or artifact does not verify: never retried as is.
    #[error("verification failed: {0}")]
    Verify(#[from] registry::Error),
    /// The device's own disk failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl FetchError {
    /// True when another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Network(_) => true,
            FetchError::Refused { status, .. } => *status >= 500 || *status == 429,
            FetchError::Verify(_) | FetchError::Io { .. } => false,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks a file on disk against a verified manifest (size and SHA-256),
/// reading it in chunks. Blocking.
pub fn verify_file(
    manifest: Verified<Manifest>,
    path: &Path,
) -> Result<VerifiedArtifact, FetchError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut checker = manifest.artifact_checker();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        checker.update(&buf[..n])?;
    }
    Ok(checker.finish()?)
}

/// Progress of a download: bytes on disk, of the total.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Reads the registry of one hub over the device's mutual-TLS client.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    client: reqwest::Client,
    hub: String,
    timeout: Duration,
}

impl RegistryClient {
    /// A client for the hub at `hub` (its base URL).
    pub fn new(client: reqwest::Client, hub: &str, timeout: Duration) -> Self {
        Self {
            client,
            hub: hub.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// GETs a small document; `None` on 404.
    async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let response = self
            .client
            .get(format!("{}{path}", self.hub))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| FetchError::Network(crate::chain(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let detail = response.text().await.unwrap_or_default();
            return Err(FetchError::Refused {
                status: status.as_u16(),
                detail: detail.chars().take(300).collect(),
            });
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| FetchError::Network(crate::chain(&e)))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn require(&self, path: &str) -> Result<Vec<u8>, FetchError> {
        self.get(path).await?.ok_or_else(|| FetchError::Refused {
            status: 404,
            detail: format!("{path} not found"),
        })
    }

    /// The first root, from the hub, for a device not provisioned with one:
    /// trusted because it comes over the channel the join pinned.
    pub async fn first_root(&self) -> Result<Vec<u8>, FetchError> {
        self.require("/v1/registry/root?version=1").await
    }

    /// Brings `trusted` up to the hub's current metadata: each newer root
    /// in turn, then timestamp, snapshot and targets. On error `trusted` may
    /// have taken some of the steps, each of which verified.
    pub async fn refresh(
        &self,
        trusted: &mut TrustedState,
        now: OffsetDateTime,
    ) -> Result<(), FetchError> {
        loop {
            let next = trusted.root().version + 1;
            match self
                .get(&format!("/v1/registry/root?version={next}"))
                .await?
            {
                Some(root) => trusted.update_root(&root)?,
                None => break,
            }
        }
        let timestamp = self.require("/v1/registry/timestamp").await?;
        trusted.update_timestamp(&timestamp, now)?;
        let snapshot = self.require("/v1/registry/snapshot").await?;
        trusted.update_snapshot(&snapshot, now)?;
        let targets = self.require("/v1/registry/targets").await?;
        trusted.update_targets(&targets, now)?;
        Ok(())
    }

    /// Fetches and verifies the manifest of `name` at `version`; returns
    /// the signed bytes (kept beside the installed artifact) too.
    pub async fn manifest(
        &self,
        trusted: &TrustedState,
        name: &str,
        version: u64,
        now: OffsetDateTime,
    ) -> Result<(Vec<u8>, Verified<Manifest>), FetchError> {
        let signed = self
            .require(&format!("/v1/models/{name}/{version}/manifest"))
            .await?;
        let verified = trusted.verify_manifest(&signed, now)?;
        if verified.name != name || verified.version != version {
            return Err(FetchError::Verify(registry::Error::Invalid {
                what: "manifest",
                reason: format!(
                    "asked for {name}@{version}, the hub served {}@{}",
                    verified.name, verified.version
                ),
            }));
        }
        Ok((signed, verified))
    }

    /// Downloads the artifact of `manifest` into `partial`, resuming from
    /// what is already there, then checks its size and SHA-256 against the
    /// manifest. `rate` caps the transfer in bytes per second. A file that
    /// fails the check is deleted, so the next attempt starts over.
    pub async fn download(
        &self,
        manifest: Verified<Manifest>,
        partial: &Path,
        rate: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<VerifiedArtifact, FetchError> {
        let total = manifest.artifact.size_bytes;
        let mut have = match std::fs::metadata(partial) {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        if have > total {
            std::fs::remove_file(partial).map_err(io(partial))?;
            have = 0;
        }
        if have < total {
            let mut request = self
                .client
                .get(format!(
                    "{}/v1/artifacts/{}",
                    self.hub, manifest.artifact.sha256
                ))
                .timeout(Duration::from_secs(24 * 3600));
            if have > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let response = request
                .send()
                .await
                .map_err(|e| FetchError::Network(crate::chain(&e)))?;
            let status = response.status();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(partial)
                .map_err(io(partial))?;
            match status {
                reqwest::StatusCode::PARTIAL_CONTENT => {}
                reqwest::StatusCode::OK => {
                    // The hub sent the whole file: start over.
                    file.set_len(0).map_err(io(partial))?;
                    have = 0;
                }
                _ => {
                    let detail = response.text().await.unwrap_or_default();
                    return Err(FetchError::Refused {
                        status: status.as_u16(),
                        detail: detail.chars().take(300).collect(),
                    });
                }
            }
            progress(have, total);
            let started = Instant::now();
            let start_have = have;
            let mut body = response.bytes_stream();
            let mut since_sync = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| FetchError::Network(crate::chain(&e)))?;
                if have + chunk.len() as u64 > total {
                    drop(file);
                    std::fs::remove_file(partial).map_err(io(partial))?;
                    return Err(FetchError::Verify(registry::Error::Invalid {
                        what: "artifact",
                        reason: format!("the download is longer than the manifest's {total} bytes"),
                    }));
                }
                file.write_all(&chunk).map_err(io(partial))?;
                have += chunk.len() as u64;
                since_sync += chunk.len() as u64;
                // What is on disk is what a resumed download continues from:
                // keep it durable every few MiB.
                if since_sync >= 4 << 20 {
                    file.sync_data().map_err(io(partial))?;
                    since_sync = 0;
                }
                progress(have, total);
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64((have - start_have) as f64 / rate as f64);
                    let elapsed = started.elapsed();
                    if due > elapsed {
                        tokio::time::sleep(due - elapsed).await;
                    }
                }
            }
            file.sync_data().map_err(io(partial))?;
            if have < total {
                return Err(FetchError::Network(format!(
                    "the download ended at {have} of {total} bytes"
                )));
            }
        }
        // Check what is on disk, not what went past: a resumed download is
        // hashed whole.
        let path = partial.to_owned();
        let checked = tokio::task::spawn_blocking(move || verify_file(manifest, &path))
            .await
            .map_err(|e| FetchError::Network(format!("checking the artifact: {e}")))?;
        if checked.is_err() {
            let _ = std::fs::remove_file(partial);
        }
        checked
    }
}
