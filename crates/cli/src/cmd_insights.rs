//! `strata insights`: what the fleet's devices have reported, through the
//! hub's operator API: the insights themselves, per-site and fleet-wide
//! aggregates, cross-site trends and forecasts.

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::operator::{HubConnection, Operator};
use crate::output::out;

/// `strata insights …`
#[derive(Debug, Args)]
pub(crate) struct InsightsArgs {
    #[command(subcommand)]
    command: InsightsCommand,
    #[command(flatten)]
    hub: HubConnection,
    /// Print the hub's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// Time range and bucket of a query.
#[derive(Debug, Args)]
struct Range {
    /// How far back to look (e.g. 30m, 6h, 2d).
    #[arg(long, default_value = "1h")]
    since: humantime::Duration,
    /// Bucket width (e.g. 1m, 1h).
    #[arg(long, default_value = "1m")]
    bucket: humantime::Duration,
}

impl Range {
    fn params(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let bucket = self.bucket.as_secs();
        if bucket == 0 {
            bail!("--bucket must be at least one second");
        }
        let now = now_ms();
        Ok(vec![
            ("bucket_secs", bucket.to_string()),
            ("from_ms", (now - self.since.as_millis() as i64).to_string()),
            ("to_ms", now.to_string()),
        ])
    }
}

#[derive(Debug, Subcommand)]
enum InsightsCommand {
    /// List insights, oldest first.
    List {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// Only this kind (intent_count, anomaly, model_requests, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only this series.
        #[arg(long)]
        series: Option<String>,
        /// How far back to look (e.g. 30m, 6h).
        #[arg(long, default_value = "1h")]
        since: humantime::Duration,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Per-site and fleet-wide buckets of one series.
    Aggregate {
        /// The kind.
        #[arg(long)]
        kind: String,
        /// The series.
        #[arg(long)]
        series: String,
        #[command(flatten)]
        range: Range,
    },
    /// Cross-site trends and diverging sites, in every series.
    Trends {
        #[command(flatten)]
        range: Range,
    },
    /// Forecast one series a few buckets ahead (Holt / Holt-Winters).
    Forecast {
        /// The kind.
        #[arg(long)]
        kind: String,
        /// The series.
        #[arg(long)]
        series: String,
        /// Only this site (default: the fleet).
        #[arg(long)]
        site: Option<String>,
        /// Buckets ahead.
        #[arg(long, default_value_t = 6)]
        horizon: usize,
        /// Season length in buckets, for a seasonal series.
        #[arg(long)]
        season: Option<usize>,
        #[command(flatten)]
        range: Range,
    },
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Runs `strata insights …`.
pub(crate) async fn run(args: InsightsArgs) -> anyhow::Result<()> {
    let op = Operator::connect(&args.hub)?;
    let json = args.json;
    match args.command {
        InsightsCommand::List {
            device,
            site,
            kind,
            series,
            since,
            limit,
        } => {
            let mut q = vec![
                ("from_ms", (now_ms() - since.as_millis() as i64).to_string()),
                ("limit", limit.to_string()),
            ];
            for (name, v) in [
                ("device", device),
                ("site", site),
                ("kind", kind),
                ("series", series),
            ] {
                if let Some(v) = v {
                    q.push((name, v));
                }
            }
            let body = op.get("/v1/insights", &q).await?;
            if json {
                out(&body.to_string());
                return Ok(());
            }
            out(&format!(
                "{:<24} {:<20} {:<10} {:<22} {:<24} {:>10}  SUMMARY",
                "TIME (UTC)", "DEVICE", "SITE", "KIND", "SERIES", "VALUE"
            ));
            for item in body["insights"].as_array().into_iter().flatten() {
                let i = &item["insight"];
                out(&format!(
                    "{:<24} {:<20} {:<10} {:<22} {:<24} {:>10}  {}",
                    time_text(i["start_ms"].as_i64().unwrap_or(0)),
                    item["device_id"].as_str().unwrap_or(""),
                    item["site"].as_str().unwrap_or("-"),
                    i["kind"].as_str().unwrap_or(""),
                    i["series"].as_str().unwrap_or(""),
                    number(&i["value"]),
                    i["summary"].as_str().unwrap_or(""),
                ));
            }
        }
        InsightsCommand::Aggregate {
            kind,
            series,
            range,
        } => {
            let mut q = range.params()?;
            q.push(("kind", kind));
            q.push(("series", series));
            let body = op.get("/v1/insights/aggregates", &q).await?;
            if json {
                out(&body.to_string());
                return Ok(());
            }
            let sites: Vec<(&String, &Value)> = body["sites"]
                .as_object()
                .map(|m| m.iter().collect())
                .unwrap_or_default();
            let mut header = format!("{:<24} {:>10}", "BUCKET (UTC)", "FLEET");
            for (site, _) in &sites {
                header.push_str(&format!(" {site:>12}"));
            }
            out(&header);
            for (i, b) in body["fleet"].as_array().into_iter().flatten().enumerate() {
                let mut line = format!(
                    "{:<24} {:>10}",
                    time_text(b["start_ms"].as_i64().unwrap_or(0)),
                    number(&b["sum"])
                );
                for (_, buckets) in &sites {
                    line.push_str(&format!(" {:>12}", number(&buckets[i]["sum"])));
                }
                out(&line);
            }
        }
        InsightsCommand::Trends { range } => {
            let body = op.get("/v1/insights/trends", &range.params()?).await?;
            if json {
                out(&body.to_string());
                return Ok(());
            }
            let series = body["series"].as_array().cloned().unwrap_or_default();
            out(&format!(
                "{} series examined, {} with findings",
                body["examined"],
                series.len()
            ));
            for s in &series {
                for f in s["report"]["findings"].as_array().into_iter().flatten() {
                    let what = f["kind"].as_str().unwrap_or("finding");
                    let detail = match what {
                        "cross_site_trend" => format!(
                            "{} at {} sites: {}",
                            f["direction"].as_str().unwrap_or("?"),
                            f["sites"].as_array().map_or(0, Vec::len),
                            f["sites"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|t| t["site"].as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        _ => format!(
                            "site {} {}",
                            f["site"]["site"].as_str().unwrap_or("?"),
                            f["site"]["test"]["direction"].as_str().unwrap_or("trends")
                        ),
                    };
                    out(&format!(
                        "{}/{}: {what}: {detail}",
                        s["kind"].as_str().unwrap_or(""),
                        s["series"].as_str().unwrap_or("")
                    ));
                }
            }
        }
        InsightsCommand::Forecast {
            kind,
            series,
            site,
            horizon,
            season,
            range,
        } => {
            let mut q = range.params()?;
            q.push(("kind", kind));
            q.push(("series", series));
            q.push(("horizon", horizon.to_string()));
            if let Some(site) = site {
                q.push(("site", site));
            }
            if let Some(season) = season {
                q.push(("season", season.to_string()));
            }
            let body = op.get("/v1/insights/forecast", &q).await?;
            if json {
                out(&body.to_string());
                return Ok(());
            }
            let f = &body["forecast"];
            out(&format!(
                "model {}, fitted on {} buckets",
                f["model"]["kind"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| f["model"].to_string()),
                f["fitted_len"]
            ));
            let start = body["forecast_start_ms"].as_i64().unwrap_or(0);
            let width = body["bucket_ms"].as_i64().unwrap_or(60_000);
            out(&format!(
                "{:<24} {:>10} {:>10} {:>10}",
                "BUCKET (UTC)", "FORECAST", "LOWER", "UPPER"
            ));
            for (i, p) in f["point"].as_array().into_iter().flatten().enumerate() {
                out(&format!(
                    "{:<24} {:>10} {:>10} {:>10}",
                    time_text(start + i as i64 * width),
                    number(p),
                    number(&f["lower"][i]),
                    number(&f["upper"][i])
                ));
            }
        }
    }
    Ok(())
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e12 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
        None => "-".to_owned(),
    }
}

fn time_text(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    t.format(&f).unwrap_or_default()
}
