//! The model registry: signed metadata documents and published models.

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{Store, to_ms};
use crate::Error;

/// A published model release, as listed to operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PublishedModel {
    /// The model's name.
    pub name: String,
    /// The release number.
    pub version: u64,
    /// Hex SHA-256 of the artifact.
    pub sha256: String,
    /// The artifact's size.
    pub size_bytes: u64,
    /// The artifact's format (`gguf`, `safetensors`, `onnx`).
    pub format: String,
    /// When it was published, unix ms.
    pub published_ms: i64,
}

/// What one publication stores, in one transaction.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The release.
    pub model: PublishedModel,
    /// The signed manifest.
    pub manifest: Vec<u8>,
    /// `(kind, version, signed bytes)` of the new targets, snapshot and timestamp.
    pub documents: Vec<(&'static str, u64, Vec<u8>)>,
}

impl Store {
    /// The newest version of a registry document kind (`root`, `targets`,
    /// `snapshot`, `timestamp`), or a given version.
    pub async fn registry_doc(
        &self,
        kind: &'static str,
        version: Option<u64>,
    ) -> Result<Option<(u64, Vec<u8>)>, Error> {
        self.call(move |c| {
            let row = match version {
                Some(v) => c
                    .query_row(
                        "SELECT version, body FROM registry_docs WHERE kind = ?1 AND version = ?2",
                        params![kind, v as i64],
                        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                    )
                    .optional()?,
                None => c
                    .query_row(
                        "SELECT version, body FROM registry_docs WHERE kind = ?1
                         ORDER BY version DESC LIMIT 1",
                        [kind],
                        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                    )
                    .optional()?,
            };
            Ok(row)
        })
        .await
    }

    /// Stores a registry document (idempotent for identical bytes).
    pub async fn put_registry_doc(
        &self,
        kind: &'static str,
        version: u64,
        body: Vec<u8>,
    ) -> Result<(), Error> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO registry_docs (kind, version, body, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, version) DO NOTHING",
                params![kind, version as i64, body, to_ms(OffsetDateTime::now_utc())],
            )?;
            Ok(())
        })
        .await
    }

    /// Stores a publication: the model row, its manifest and the new
    /// metadata, all or nothing. Fails if the release already exists.
    pub async fn publish(&self, p: Publication) -> Result<bool, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let m = &p.model;
            let inserted = tx.execute(
                "INSERT INTO models (name, version, manifest, sha256, size_bytes, format, published_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name, version) DO NOTHING",
                params![
                    m.name,
                    m.version as i64,
                    p.manifest,
                    m.sha256,
                    m.size_bytes as i64,
                    m.format,
                    m.published_ms
                ],
            )?;
            if inserted == 0 {
                return Ok(false);
            }
            for (kind, version, body) in &p.documents {
                tx.execute(
                    "INSERT INTO registry_docs (kind, version, body, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![kind, *version as i64, body, m.published_ms],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Published releases, newest first; one model's if `name` is given.
    pub async fn models(&self, name: Option<String>) -> Result<Vec<PublishedModel>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, version, sha256, size_bytes, format, published_at FROM models
                 WHERE ?1 IS NULL OR name = ?1 ORDER BY name, version DESC",
            )?;
            let rows = stmt.query_map([name], |r| {
                Ok(PublishedModel {
                    name: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                    size_bytes: r.get::<_, i64>(3)? as u64,
                    format: r.get(4)?,
                    published_ms: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The signed manifest of a release.
    pub async fn manifest(&self, name: String, version: u64) -> Result<Option<Vec<u8>>, Error> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT manifest FROM models WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }
}
