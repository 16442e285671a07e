//! Insights: stored once per device and key, queryable by device, site,
//! kind, series and time.

use protocol::insight::{Insight, StoredInsight};
use protocol::{DeviceId, Labels};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{Store, to_ms};
use crate::Error;

/// One insight of a delivered batch: its parsed form and its exact text.
#[derive(Debug, Clone)]
pub struct NewInsight {
    /// The parsed, validated insight.
    pub insight: Insight,
    /// The JSON text the device sent.
    pub raw: String,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ingested {
    /// Insights stored for the first time.
    pub stored: u64,
    /// Insights already held (same device and key).
    pub duplicates: u64,
}

/// Which insights a query wants. `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct InsightFilter {
    /// One device.
    pub device: Option<String>,
    /// One site (the device's `site` label).
    pub site: Option<String>,
    /// One kind.
    pub kind: Option<String>,
    /// One series.
    pub series: Option<String>,
    /// `start_ms` at or after this.
    pub from_ms: Option<i64>,
    /// `start_ms` before this.
    pub to_ms: Option<i64>,
}

/// A point of a series, for aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoint {
    /// The device's site, if it has one.
    pub site: Option<String>,
    /// `start_ms` of the insight.
    pub start_ms: i64,
    /// Its value.
    pub value: f64,
}

impl InsightFilter {
    /// The SQL condition and its parameters (numbered from `?1`).
    fn sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let mut clauses = Vec::new();
        let mut values: Vec<Value> = Vec::new();
        let mut push = |clause: &str, v: Value| {
            values.push(v);
            clauses.push(clause.replace('?', &format!("?{}", values.len())));
        };
        if let Some(d) = &self.device {
            push("device_id = ?", Value::Text(d.clone()));
        }
        if let Some(s) = &self.site {
            push("site = ?", Value::Text(s.clone()));
        }
        if let Some(k) = &self.kind {
            push("kind = ?", Value::Text(k.clone()));
        }
        if let Some(s) = &self.series {
            push("series = ?", Value::Text(s.clone()));
        }
        if let Some(f) = self.from_ms {
            push("start_ms >= ?", Value::Integer(f));
        }
        if let Some(t) = self.to_ms {
            push("start_ms < ?", Value::Integer(t));
        }
        if clauses.is_empty() {
            ("1 = 1".to_owned(), values)
        } else {
            (clauses.join(" AND "), values)
        }
    }
}

impl Store {
    /// Stores a device's batch in one transaction: each insight once per
    /// device and key. Nothing is stored unless everything is; the caller
    /// acknowledges only after this returns.
    pub async fn ingest_insights(
        &self,
        device: DeviceId,
        batch: Vec<NewInsight>,
    ) -> Result<Ingested, Error> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let labels: Option<String> = tx
                .query_row(
                    "SELECT labels FROM devices WHERE id = ?1",
                    [device.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let site = match labels {
                Some(text) => serde_json::from_str::<Labels>(&text)?.remove("site"),
                None => None,
            };
            let now = to_ms(OffsetDateTime::now_utc());
            let mut out = Ingested::default();
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO insights (device_id, key, site, kind, series, priority,
                         start_ms, window_ms, value, raw, received_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (device_id, key) DO NOTHING",
                )?;
                for item in &batch {
                    let i = &item.insight;
                    let n = stmt.execute(params![
                        device.as_str(),
                        i.key,
                        site,
                        i.kind,
                        i.series,
                        i.priority.as_str(),
                        i.start_ms,
                        i.window_ms,
                        i.value,
                        item.raw,
                        now,
                    ])?;
                    if n == 1 {
                        out.stored += 1;
                    } else {
                        out.duplicates += 1;
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Insights matching `filter`, oldest first by storage order, after the
    /// row `after` (a cursor from the previous page).
    pub async fn insights(
        &self,
        filter: InsightFilter,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<StoredInsight>, Option<i64>), Error> {
        self.call(move |c| {
            let (cond, mut values) = filter.sql();
            values.push(rusqlite::types::Value::Integer(after));
            let after_n = values.len();
            values.push(rusqlite::types::Value::Integer(limit as i64 + 1));
            let limit_n = values.len();
            let sql = format!(
                "SELECT id, device_id, site, received_ms, raw FROM insights
                 WHERE {cond} AND id > ?{after_n} ORDER BY id LIMIT ?{limit_n}"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            let mut last = None;
            for row in rows {
                let (id, device, site, received_ms, raw) = row?;
                if out.len() == limit {
                    return Ok((out, last));
                }
                out.push(StoredInsight {
                    device_id: DeviceId::new(device),
                    site,
                    received_ms,
                    insight: serde_json::from_str(&raw)?,
                    raw,
                });
                last = Some(id);
            }
            Ok((out, None))
        })
        .await
    }

    /// The points of one series (kind and series) in a time range, with
    /// the site of the device that sent each.
    pub async fn series_points(
        &self,
        kind: String,
        series: String,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<SeriesPoint>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT site, start_ms, value FROM insights
                 WHERE kind = ?1 AND series = ?2 AND start_ms >= ?3 AND start_ms < ?4
                 ORDER BY start_ms",
            )?;
            let rows = stmt.query_map(params![kind, series, from_ms, to_ms], |r| {
                Ok(SeriesPoint {
                    site: r.get(0)?,
                    start_ms: r.get(1)?,
                    value: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Every (kind, series) with an insight in the time range, with its count.
    pub async fn insight_series(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, String, u64)>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, series, count(*) FROM insights
                 WHERE start_ms >= ?1 AND start_ms < ?2
                 GROUP BY kind, series ORDER BY kind, series",
            )?;
            let rows = stmt.query_map(params![from_ms, to_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Per site, kind and series: the number of insights in the time range
    /// and the sum of their values, most frequent first (at most `limit`).
    pub async fn insight_summary(
        &self,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, String, String, u64, f64)>, Error> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT coalesce(site, '(no site)'), kind, series, count(*), total(value)
                 FROM insights WHERE start_ms >= ?1 AND start_ms < ?2
                 GROUP BY 1, kind, series ORDER BY count(*) DESC, 1, kind, series LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![from_ms, to_ms, limit], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)? as u64,
                    r.get(4)?,
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Number of insights stored.
    pub async fn insight_count(&self) -> Result<u64, Error> {
        self.call(|c| {
            Ok(c.query_row("SELECT count(*) FROM insights", [], |r| r.get::<_, i64>(0))? as u64)
        })
        .await
    }
}
