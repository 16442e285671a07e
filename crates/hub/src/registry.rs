//! The model registry API: operators upload artifacts and publish signed
//! manifests; devices read the signed metadata and download artifacts.
//!
//! The hub holds only the online keys (snapshot and timestamp), read from
//! `DATA_DIR/registry/` where `strata keys init --hub-data-dir` puts them
//! with the root metadata. A publication brings a manifest and a new
//! targets document, both signed offline with the targets key; the hub signs
//! a new snapshot pinning that targets and a new timestamp pinning the
//! snapshot, then checks the whole chain exactly as a device will
//! ([`registry::TrustedState`]), the artifact included, before it stores
//! anything. What the hub serves is therefore what a device accepts.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use registry::{Manifest, Snapshot, Timestamp, TrustedState};
use serde::Deserialize;
use time::OffsetDateTime;
use web::{ApiError, Json, Query};

use crate::api::{AppState, DeviceAuth, OperatorAuth};
use crate::store::{Publication, PublishedModel};

/// How long the snapshot the hub signs stays valid.
const SNAPSHOT_LIFETIME: time::Duration = time::Duration::days(7);
/// How long the timestamp the hub signs stays valid (short: freeze defence).
const TIMESTAMP_LIFETIME: time::Duration = time::Duration::days(1);
/// Largest artifact accepted.
pub const MAX_ARTIFACT_BYTES: usize = 2 << 30;

/// Where the registry keeps its files in the hub's data directory.
fn registry_dir(state: &AppState) -> PathBuf {
    state.data_dir().join("registry")
}

fn artifact_path(state: &AppState, sha256: &str) -> PathBuf {
    state.data_dir().join("artifacts").join(sha256)
}

/// The root metadata and online keys the hub holds.
struct OnlineKeys {
    root: Vec<u8>,
    snapshot: registry::SigningKey,
    timestamp: registry::SigningKey,
}

fn not_initialised() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "registry-not-initialised",
        "the registry has no keys: run `strata keys init --hub-data-dir <hub data dir>` first",
    )
}

fn load_keys(dir: &Path) -> Result<OnlineKeys, ApiError> {
    let read = |name: &str| std::fs::read(dir.join(name));
    let (Ok(root), Ok(snapshot), Ok(timestamp)) = (
        read("root.json"),
        read("snapshot.key"),
        read("timestamp.key"),
    ) else {
        return Err(not_initialised());
    };
    let key = |bytes: Vec<u8>, name: &str| {
        registry::SigningKey::from_key_file(&String::from_utf8_lossy(&bytes))
            .map_err(|e| ApiError::internal(format!("registry key {name}: {e}")))
    };
    Ok(OnlineKeys {
        root,
        snapshot: key(snapshot, "snapshot.key")?,
        timestamp: key(timestamp, "timestamp.key")?,
    })
}

/// A caller allowed to read the registry: an enrolled device or an operator.
#[derive(Debug)]
pub struct Reader;

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            OperatorAuth::from_request_parts(parts, state).await?;
        } else {
            DeviceAuth::from_request_parts(parts, state).await?;
        }
        Ok(Reader)
    }
}

fn hex_sha(text: &str) -> Result<(), ApiError> {
    if text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad-digest",
            format!("{text:?} is not a lower-case hex SHA-256"),
        ))
    }
}

/// Uploads an artifact, stored under its SHA-256 (which must match).
#[utoipa::path(put, path = "/v1/artifacts/{sha256}", tag = "registry",
    security(("operator" = [])),
    params(("sha256" = String, Path, description = "Hex SHA-256 of the body")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored"),
        (status = 400, description = "The body does not hash to the path's digest", body = protocol::Problem),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 413, description = "Larger than 2 GiB", body = protocol::Problem),
    ))]
pub async fn put_artifact(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    UrlPath(sha256): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    hex_sha(&sha256)?;
    let got = registry::Sha256Digest::of(&body).to_string();
    if got != sha256 {
        return Err(ApiError::bad_request(
            "digest-mismatch",
            format!("the body's SHA-256 is {got}, not {sha256}"),
        ));
    }
    let path = artifact_path(&state, &sha256);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            durable::create_private_dir(dir)?;
        }
        durable::write_atomic(&path, &body, durable::PRIVATE)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(StatusCode::CREATED)
}

/// A publication: a signed manifest and the signed targets that lists it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The signed manifest (the JSON text `strata model publish` signed).
    pub manifest: String,
    /// The signed targets metadata listing it.
    pub targets: String,
}

/// What a publication made current.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Published {
    /// The release.
    pub model: PublishedModel,
    /// Version of the targets metadata now current.
    pub targets_version: u64,
    /// Version of the snapshot the hub signed.
    pub snapshot_version: u64,
    /// Version of the timestamp the hub signed.
    pub timestamp_version: u64,
}

fn refused(e: registry::Error) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "registry-refused",
        e.to_string(),
    )
}

/// Signs the online metadata over `targets`: a snapshot pinning it and a
/// timestamp pinning the snapshot, each with its key and version.
fn sign_online(
    (snapshot_key, snapshot_version): (&registry::SigningKey, u64),
    (timestamp_key, timestamp_version): (&registry::SigningKey, u64),
    targets: &[u8],
    now: OffsetDateTime,
) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    let snapshot = registry::sign(
        &Snapshot::new(snapshot_version, now + SNAPSHOT_LIFETIME, targets).map_err(refused)?,
        &[snapshot_key],
    )
    .map_err(refused)?;
    let timestamp = registry::sign(
        &Timestamp::new(timestamp_version, now + TIMESTAMP_LIFETIME, &snapshot).map_err(refused)?,
        &[timestamp_key],
    )
    .map_err(refused)?;
    Ok((snapshot, timestamp))
}

/// Publishes a model release: checks the signed manifest and targets the way
/// a device will, signs a new snapshot and timestamp, stores it all.
#[utoipa::path(post, path = "/v1/models", tag = "registry",
    security(("operator" = [])),
    request_body = PublishRequest,
    responses(
        (status = 201, description = "Published", body = Published),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 409, description = "Registry not initialised, or this release exists", body = protocol::Problem),
        (status = 422, description = "A signature, version, expiry or the artifact does not check out", body = protocol::Problem),
    ))]
pub async fn publish(
    State(state): State<AppState>,
    _operator: OperatorAuth,
    Json(req): Json<PublishRequest>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let keys = load_keys(&registry_dir(&state))?;
    let now = OffsetDateTime::now_utc();
    let store = state.store();
    let mut trusted = TrustedState::bootstrap(&keys.root, now).map_err(refused)?;
    let root_version = trusted.root().version;
    store
        .put_registry_doc("root", root_version, keys.root.clone())
        .await
        .map_err(ApiError::internal)?;
    // Bring the trusted view up to what is current, so versions only grow.
    let current = |kind| async move { store.registry_doc(kind, None).await };
    let (ts, snap, tg) = (
        current("timestamp").await.map_err(ApiError::internal)?,
        current("snapshot").await.map_err(ApiError::internal)?,
        current("targets").await.map_err(ApiError::internal)?,
    );
    let (ts_version, snap_version) = (
        ts.as_ref().map_or(0, |(v, _)| *v),
        snap.as_ref().map_or(0, |(v, _)| *v),
    );
    if let (Some((_, ts)), Some((_, snap)), Some((_, tg))) = (&ts, &snap, &tg) {
        // Past metadata may have expired; only monotonicity matters here.
        let _ = trusted
            .update_timestamp(ts, now)
            .and_then(|()| trusted.update_snapshot(snap, now))
            .and_then(|()| trusted.update_targets(tg, now));
    }

    let targets = req.targets.into_bytes();
    let (snapshot, timestamp) = sign_online(
        (&keys.snapshot, snap_version + 1),
        (&keys.timestamp, ts_version + 1),
        &targets,
        now,
    )?;
    trusted.update_timestamp(&timestamp, now).map_err(refused)?;
    trusted.update_snapshot(&snapshot, now).map_err(refused)?;
    trusted.update_targets(&targets, now).map_err(refused)?;
    let manifest_bytes = req.manifest.into_bytes();
    let verified = trusted
        .verify_manifest(&manifest_bytes, now)
        .map_err(refused)?;
    let manifest: &Manifest = &verified;
    let name = manifest.name.clone();
    let version = manifest.version;
    if let Some(newest) = store
        .models(Some(name.clone()))
        .await
        .map_err(ApiError::internal)?
        .first()
        && newest.version >= version
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "version-not-newer",
            format!(
                "{name} version {version} is not newer than the published {}",
                newest.version
            ),
        ));
    }
    let sha256 = manifest.artifact.sha256.to_string();
    let format = serde_json::to_value(manifest.artifact.format)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let size_bytes = manifest.artifact.size_bytes;
    let path = artifact_path(&state, &sha256);
    let artifact = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(ApiError::internal)?
        .map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "artifact-missing",
                format!("upload the artifact first: PUT /v1/artifacts/{sha256}"),
            )
        })?;
    verified.check_artifact(&artifact).map_err(refused)?;

    let target_version = trusted.targets().map_or(0, |t| t.version);
    let model = PublishedModel {
        name,
        version,
        sha256,
        size_bytes,
        format,
        published_ms: crate::store::to_ms(now),
    };
    let stored = store
        .publish(Publication {
            model: model.clone(),
            manifest: manifest_bytes,
            documents: vec![
                ("targets", target_version, targets),
                ("snapshot", snap_version + 1, snapshot),
                ("timestamp", ts_version + 1, timestamp),
            ],
        })
        .await
        .map_err(ApiError::internal)?;
    if !stored {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "release-exists",
            format!("{}@{} is already published", model.name, model.version),
        ));
    }
    tracing::info!(model = %model.name, version = model.version, "model published");
    Ok((
        StatusCode::CREATED,
        Json(Published {
            model,
            targets_version: target_version,
            snapshot_version: snap_version + 1,
            timestamp_version: ts_version + 1,
        }),
    ))
}

/// Published model releases, newest first.
#[utoipa::path(get, path = "/v1/models", tag = "registry",
    security(("operator" = [])),
    responses(
        (status = 200, description = "Releases", body = Vec<PublishedModel>),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
    ))]
pub async fn list_models(
    State(state): State<AppState>,
    _operator: OperatorAuth,
) -> Result<Json<Vec<PublishedModel>>, ApiError> {
    Ok(Json(
        state
            .store()
            .models(None)
            .await
            .map_err(ApiError::internal)?,
    ))
}

/// Query of a registry document: a version, or the current one.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DocQuery {
    /// A version (default: the current one).
    pub version: Option<u64>,
}

fn json_bytes(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A signed registry document: `root`, `timestamp`, `snapshot` or `targets`.
#[utoipa::path(get, path = "/v1/registry/{kind}", tag = "registry",
    security(("device_certificate" = []), ("operator" = [])),
    params(("kind" = String, Path, description = "root, timestamp, snapshot or targets"), DocQuery),
    responses(
        (status = 200, description = "The signed document", content_type = "application/json"),
        (status = 404, description = "No such document (nothing published yet)", body = protocol::Problem),
    ))]
pub async fn get_doc(
    State(state): State<AppState>,
    _reader: Reader,
    UrlPath(kind): UrlPath<String>,
    Query(q): Query<DocQuery>,
) -> Result<Response, ApiError> {
    serve_doc(&state, &kind, q).await
}

/// The root metadata (same as `/v1/registry/{kind}` with `root`; the path
/// also takes the operator's `POST` of a rotated root).
pub async fn get_root(
    State(state): State<AppState>,
    _reader: Reader,
    Query(q): Query<DocQuery>,
) -> Result<Response, ApiError> {
    serve_doc(&state, "root", q).await
}

async fn serve_doc(state: &AppState, kind: &str, q: DocQuery) -> Result<Response, ApiError> {
    let kind: &'static str = match kind {
        "root" => "root",
        "timestamp" => "timestamp",
        "snapshot" => "snapshot",
        "targets" => "targets",
        other => {
            return Err(ApiError::not_found(
                "no-such-document",
                format!(
                    "{other:?} is not a registry document (root, timestamp, snapshot, targets)"
                ),
            ));
        }
    };
    if kind == "timestamp" && q.version.is_none() {
        refresh_timestamp(state).await?;
    }
    let doc = state
        .store()
        .registry_doc(kind, q.version)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found("no-such-document", format!("no {kind} metadata yet"))
        })?;
    Ok(json_bytes(doc.1))
}

/// A new root metadata version to install.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// The new root, signed by a threshold of the current root's root keys
    /// and of its own (the JSON text `strata keys rotate` wrote).
    pub root: String,
}

/// What a root rotation made current.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Rotated {
    /// The root version now trusted.
    pub root_version: u64,
    /// The snapshot the hub re-signed with the (possibly new) online key.
    pub snapshot_version: Option<u64>,
    /// The timestamp the hub re-signed.
    pub timestamp_version: Option<u64>,
}

/// Installs the next root: checked against the current one as a device
/// checks it, stored for devices to walk, and followed at once by a fresh
/// snapshot and timestamp signed with the new root's online keys, which
/// `strata keys rotate` left beside the hub's keys as `*.key.next`.
#[utoipa::path(post, path = "/v1/registry/root", tag = "registry",
    security(("operator" = [])),
    request_body = RotateRequest,
    responses(
        (status = 201, description = "Installed", body = Rotated),
        (status = 401, description = "No or wrong operator credential", body = protocol::Problem),
        (status = 409, description = "Registry not initialised, or the new online keys are missing", body = protocol::Problem),
        (status = 422, description = "The new root does not verify against the current one", body = protocol::Problem),
    ))]
pub async fn rotate_root(
    State(state): State<AppState>,
    operator: OperatorAuth,
    Json(req): Json<RotateRequest>,
) -> Result<(StatusCode, Json<Rotated>), ApiError> {
    let dir = registry_dir(&state);
    let keys = load_keys(&dir)?;
    let now = OffsetDateTime::now_utc();
    let mut trusted = TrustedState::bootstrap(&keys.root, now).map_err(refused)?;
    let old_version = trusted.root().version;
    let new_root = req.root.into_bytes();
    trusted.update_root(&new_root).map_err(refused)?;
    let root = trusted.root().clone();
    // The online keys the new root names: the current ones, or the next
    // ones `strata keys rotate` left here.
    let pick = |role: registry::Role, current: registry::SigningKey, name: &str| {
        let wanted = &root.role(role).key_ids;
        if wanted.contains(&current.key_id()) {
            return Ok((current, None));
        }
        let next = dir.join(format!("{name}.key.next"));
        let key = std::fs::read_to_string(&next)
            .ok()
            .and_then(|text| registry::SigningKey::from_key_file(&text).ok())
            .filter(|k| wanted.contains(&k.key_id()))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "online-key-missing",
                    format!(
                        "the new root names another {name} key, and {} does not hold it: run `strata keys rotate --hub-data-dir`",
                        next.display()
                    ),
                )
            })?;
        Ok::<_, ApiError>((key, Some(next)))
    };
    let (snapshot_key, snapshot_next) = pick(registry::Role::Snapshot, keys.snapshot, "snapshot")?;
    let (timestamp_key, timestamp_next) =
        pick(registry::Role::Timestamp, keys.timestamp, "timestamp")?;
    let store = state.store();
    // Devices walk every root version: keep the old one served too.
    store
        .put_registry_doc("root", old_version, keys.root.clone())
        .await
        .map_err(ApiError::internal)?;
    // Fresh snapshot and timestamp under the new online keys, over the
    // current targets, so devices that moved to the new root can follow.
    let mut documents = Vec::new();
    let (mut snapshot_version, mut timestamp_version) = (None, None);
    if let (Some((tg_version, targets)), Some((snap, _)), Some((ts, _))) = (
        store
            .registry_doc("targets", None)
            .await
            .map_err(ApiError::internal)?,
        store
            .registry_doc("snapshot", None)
            .await
            .map_err(ApiError::internal)?,
        store
            .registry_doc("timestamp", None)
            .await
            .map_err(ApiError::internal)?,
    ) {
        let (snapshot, timestamp) = sign_online(
            (&snapshot_key, snap + 1),
            (&timestamp_key, ts + 1),
            &targets,
            now,
        )?;
        // Check the chain as a device that walked to the new root will.
        let mut device = trusted.clone();
        device.update_timestamp(&timestamp, now).map_err(refused)?;
        device.update_snapshot(&snapshot, now).map_err(refused)?;
        device.update_targets(&targets, now).map_err(refused)?;
        tracing::debug!(targets = tg_version, "re-signed over the current targets");
        documents.push(("snapshot", snap + 1, snapshot));
        documents.push(("timestamp", ts + 1, timestamp));
        snapshot_version = Some(snap + 1);
        timestamp_version = Some(ts + 1);
    }
    // The keys move into place before the documents they signed are
    // served; the root file last, as the commit point on disk.
    let write = |path: &Path, bytes: &[u8], mode| {
        durable::write_atomic(path, bytes, mode).map_err(ApiError::internal)
    };
    if snapshot_next.is_some() {
        write(
            &dir.join("snapshot.key"),
            snapshot_key.to_key_file().as_bytes(),
            durable::PRIVATE,
        )?;
    }
    if timestamp_next.is_some() {
        write(
            &dir.join("timestamp.key"),
            timestamp_key.to_key_file().as_bytes(),
            durable::PRIVATE,
        )?;
    }
    store
        .put_registry_doc("root", root.version, new_root.clone())
        .await
        .map_err(ApiError::internal)?;
    for (kind, version, body) in documents {
        store
            .put_registry_doc(kind, version, body)
            .await
            .map_err(ApiError::internal)?;
    }
    write(&dir.join("root.json"), &new_root, durable::PUBLIC)?;
    for next in [snapshot_next, timestamp_next].into_iter().flatten() {
        let _ = std::fs::remove_file(next);
    }
    if let Err(e) = state
        .store()
        .audit(
            operator.id.clone(),
            "registry.rotate_root",
            Some(format!("root v{}", root.version)),
            None,
        )
        .await
    {
        tracing::error!(error = %e, "cannot write the audit log");
    }
    tracing::info!(root = root.version, "registry root rotated");
    Ok((
        StatusCode::CREATED,
        Json(Rotated {
            root_version: root.version,
            snapshot_version,
            timestamp_version,
        }),
    ))
}

/// Signs a new timestamp when the current one is past half its lifetime:
/// the timestamp is short-lived so that a device notices a frozen hub, so
/// the hub, which holds the timestamp key online, keeps it fresh.
async fn refresh_timestamp(state: &AppState) -> Result<(), ApiError> {
    let store = state.store();
    let (Some((version, current)), Some((_, snapshot))) = (
        store
            .registry_doc("timestamp", None)
            .await
            .map_err(ApiError::internal)?,
        store
            .registry_doc("snapshot", None)
            .await
            .map_err(ApiError::internal)?,
    ) else {
        return Ok(());
    };
    let now = OffsetDateTime::now_utc();
    let body = registry::read_unverified::<Timestamp>(&current).map_err(ApiError::internal)?;
    if body.expires - now > TIMESTAMP_LIFETIME / 2 {
        return Ok(());
    }
    let keys = load_keys(&registry_dir(state))?;
    let fresh = Timestamp::new(version + 1, now + TIMESTAMP_LIFETIME, &snapshot)
        .and_then(|t| registry::sign(&t, &[&keys.timestamp]))
        .map_err(ApiError::internal)?;
    // Two requests may race here; the first stored version wins.
    store
        .put_registry_doc("timestamp", version + 1, fresh)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(version = version + 1, "timestamp re-signed");
    Ok(())
}

/// The signed manifest of a release.
#[utoipa::path(get, path = "/v1/models/{name}/{version}/manifest", tag = "registry",
    security(("device_certificate" = []), ("operator" = [])),
    params(("name" = String, Path), ("version" = u64, Path)),
    responses(
        (status = 200, description = "The signed manifest", content_type = "application/json"),
        (status = 404, description = "No such release", body = protocol::Problem),
    ))]
pub async fn get_manifest(
    State(state): State<AppState>,
    _reader: Reader,
    UrlPath((name, version)): UrlPath<(String, u64)>,
) -> Result<Response, ApiError> {
    let manifest = state
        .store()
        .manifest(name.clone(), version)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(
                "no-such-release",
                format!("{name}@{version} is not published"),
            )
        })?;
    Ok(json_bytes(manifest))
}

/// Parses `Range: bytes=START-` or `bytes=START-END` (one range).
fn parse_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "bad-range",
            format!("Range must be one `bytes=START-[END]` within the {len} bytes"),
        )
        .with_header(
            header::CONTENT_RANGE,
            header::HeaderValue::from_str(&format!("bytes */{len}"))
                .unwrap_or(header::HeaderValue::from_static("bytes */0")),
        )
    };
    let text = value.to_str().map_err(|_| bad())?;
    let spec = text.strip_prefix("bytes=").ok_or_else(bad)?;
    let (start, end) = spec.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = match end.trim() {
        "" => len.saturating_sub(1),
        e => e
            .parse::<u64>()
            .map_err(|_| bad())?
            .min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

/// Downloads an artifact; `Range: bytes=N-` resumes a cut download (206).
#[utoipa::path(get, path = "/v1/artifacts/{sha256}", tag = "registry",
    security(("device_certificate" = []), ("operator" = [])),
    params(("sha256" = String, Path)),
    responses(
        (status = 200, description = "The artifact", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 404, description = "No such artifact", body = protocol::Problem),
        (status = 416, description = "Range not satisfiable", body = protocol::Problem),
    ))]
pub async fn get_artifact(
    State(state): State<AppState>,
    _reader: Reader,
    UrlPath(sha256): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    hex_sha(&sha256)?;
    let path = artifact_path(&state, &sha256);
    let missing = || ApiError::not_found("no-such-artifact", format!("no artifact {sha256}"));
    let mut file = tokio::fs::File::open(&path).await.map_err(|_| missing())?;
    let len = file.metadata().await.map_err(|_| missing())?.len();
    let octets = (header::CONTENT_TYPE, "application/octet-stream");
    let ranges = (header::ACCEPT_RANGES, "bytes");
    let length = |n: u64| (header::CONTENT_LENGTH, n.to_string());
    match parse_range(&headers, len)? {
        None => Ok((
            [
                (octets.0, octets.1.to_owned()),
                (ranges.0, ranges.1.to_owned()),
                length(len),
            ],
            stream_file(file, len),
        )
            .into_response()),
        Some((start, end)) => {
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(ApiError::internal)?;
            let n = end - start + 1;
            let content_range = format!("bytes {start}-{end}/{len}");
            Ok((
                StatusCode::PARTIAL_CONTENT,
                [
                    (octets.0, octets.1.to_owned()),
                    (ranges.0, ranges.1.to_owned()),
                    (header::CONTENT_RANGE, content_range),
                    length(n),
                ],
                stream_file(file, n),
            )
                .into_response())
        }
    }
}

/// Streams `n` bytes of `file` from its current position in 64 KiB chunks,
/// so that a thousand devices downloading at once do not each hold a copy.
fn stream_file(file: tokio::fs::File, n: u64) -> axum::body::Body {
    use tokio::io::AsyncReadExt;
    const CHUNK: usize = 64 << 10;
    let reader = file.take(n);
    let chunks = futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = vec![0u8; CHUNK];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(read) => {
                buf.truncate(read);
                Some((Ok(Bytes::from(buf)), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    axum::body::Body::from_stream(chunks)
}
