//! The benchmark's results: one [`Line`] per comparison, rendered as a table
//! for people and as JSON for machines.

use serde_json::{Map, Value, json};

use super::setup::{Paths, Versions, machine};
use super::{Settings, median};

/// What a ratio (Strata ÷ peer) must be to meet the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    /// At least this (more is better: throughput).
    AtLeast(f64),
    /// At most this (less is better: latency, memory).
    AtMost(f64),
}

impl Target {
    fn met(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(t) => ratio >= t,
            Target::AtMost(t) => ratio <= t,
        }
    }

    fn render(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {t:.2}x"),
            Target::AtMost(t) => format!("<= {t:.2}x"),
        }
    }
}

/// One comparison: Strata's number, the peer's, their ratio and the target.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    id: &'static str,
    what: String,
    unit: &'static str,
    strata: Option<f64>,
    peer: Option<f64>,
    peer_name: String,
    target: Target,
    strata_samples: Vec<f64>,
    peer_samples: Vec<f64>,
    ratio: Option<f64>,
}

impl Line {
    /// A line from the samples of each side; the numbers are their medians.
    /// Samples of the two sides taken in pairs (the same count, sample `i`
    /// of each from the same round, one right after the other) give the
    /// median of the per-round ratios: on a machine whose speed drifts
    /// between rounds, that compares each pair under the same conditions.
    /// Otherwise the ratio is that of the medians.
    pub(crate) fn new(
        id: &'static str,
        what: String,
        unit: &'static str,
        strata_samples: &[f64],
        peer_name: &str,
        peer_samples: &[f64],
        target: Target,
    ) -> Line {
        Line {
            id,
            what,
            unit,
            strata: median(strata_samples),
            peer: median(peer_samples),
            peer_name: peer_name.to_owned(),
            target,
            strata_samples: strata_samples.to_vec(),
            peer_samples: peer_samples.to_vec(),
            ratio: paired_ratio(strata_samples, peer_samples).or_else(|| {
                match (median(strata_samples), median(peer_samples)) {
                    (Some(s), Some(p)) if p > 0.0 => Some(s / p),
                    _ => None,
                }
            }),
        }
    }

    /// Strata ÷ peer.
    fn ratio(&self) -> Option<f64> {
        self.ratio
    }

    fn met(&self) -> Option<bool> {
        self.ratio().map(|r| self.target.met(r))
    }
}

/// The median of `strata[i] / peer[i]`, for two or more pairs with
/// positive peer samples.
fn paired_ratio(strata: &[f64], peer: &[f64]) -> Option<f64> {
    if strata.len() != peer.len() || strata.len() < 2 || peer.iter().any(|&p| p <= 0.0) {
        return None;
    }
    let ratios: Vec<f64> = strata.iter().zip(peer).map(|(s, p)| s / p).collect();
    median(&ratios)
}

/// Everything one run measured.
#[derive(Debug)]
pub(crate) struct Report {
    meta: Map<String, Value>,
    lines: Vec<Line>,
    notes: Vec<String>,
    details: Map<String, Value>,
}

impl Report {
    /// An empty report describing the run's settings, machine and peers.
    pub(crate) fn new(s: &Settings, paths: &Paths, versions: &Versions) -> Report {
        let (cpu, cpus) = machine();
        let mut meta = Map::new();
        meta.insert(
            "settings".into(),
            json!({
                "threads": s.threads,
                "prompt_tokens": s.prompt_tokens,
                "gen_tokens": s.gen_tokens,
                "repeat": s.repeat,
                "rounds": s.rounds,
            }),
        );
        meta.insert(
            "machine".into(),
            json!({ "cpu": cpu, "cpus": cpus, "os": std::env::consts::OS, "arch": std::env::consts::ARCH }),
        );
        meta.insert(
            "versions".into(),
            json!({
                "strata": env!("CARGO_PKG_VERSION"),
                "llama_cpp": versions.llama_cpp,
                "python": versions.python,
                "numpy": versions.numpy,
                "onnxruntime": versions.onnxruntime,
            }),
        );
        meta.insert(
            "paths".into(),
            json!({
                "assets": paths.assets.display().to_string(),
                "peers": paths.peers.display().to_string(),
            }),
        );
        Report {
            meta,
            lines: Vec::new(),
            notes: Vec::new(),
            details: Map::new(),
        }
    }

    /// Adds a comparison.
    pub(crate) fn line(&mut self, line: Line) {
        self.lines.push(line);
    }

    /// Adds a sentence printed under the table.
    pub(crate) fn note(&mut self, note: &str) {
        self.notes.push(note.to_owned());
    }

    /// Adds raw data of a part to the JSON.
    pub(crate) fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.to_owned(), value);
    }

    /// The table for people.
    pub(crate) fn table(&self) -> String {
        let header = [
            "what", "unit", "strata", "peer", "ratio", "target", "met", "peer is",
        ];
        let rows: Vec<[String; 8]> = self
            .lines
            .iter()
            .map(|l| {
                [
                    l.what.clone(),
                    l.unit.to_owned(),
                    number(l.strata),
                    number(l.peer),
                    l.ratio().map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                    l.target.render(),
                    match l.met() {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None => "-".into(),
                    },
                    l.peer_name.clone(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let render = |cells: &[String]| -> String {
            let mut line = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Text columns left-aligned, numbers right-aligned.
                let pad = w.saturating_sub(cell.chars().count());
                if (2..=4).contains(&i) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i + 1 < cells.len() {
                        line.push_str(&" ".repeat(pad));
                    }
                }
                if i + 1 < cells.len() {
                    line.push_str("  ");
                }
            }
            line
        };
        let mut out = render(&header.map(str::to_owned));
        out.push('\n');
        for row in &rows {
            out.push_str(&render(row));
            out.push('\n');
        }
        if let Some(settings) = self.meta.get("settings") {
            out.push_str(&format!("\nsettings: {settings}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }

    /// The results as pretty-printed JSON.
    pub(crate) fn json(&self) -> String {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|l| {
                let (kind, value) = match l.target {
                    Target::AtLeast(t) => ("at_least", t),
                    Target::AtMost(t) => ("at_most", t),
                };
                json!({
                    "id": l.id,
                    "what": l.what,
                    "unit": l.unit,
                    "strata": l.strata,
                    "peer": l.peer,
                    "peer_name": l.peer_name,
                    "ratio": l.ratio(),
                    "target": { kind: value },
                    "met": l.met(),
                    "strata_samples": l.strata_samples,
                    "peer_samples": l.peer_samples,
                })
            })
            .collect();
        let mut doc = self.meta.clone();
        doc.insert("lines".into(), Value::Array(lines));
        doc.insert("notes".into(), json!(self.notes));
        doc.insert("details".into(), Value::Object(self.details.clone()));
        let mut text = serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// A number with as many decimals as its size deserves.
fn number(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_targets() {
        /// Strata's samples, the peer's, the target, the ratio, met.
        type Case<'a> = (&'a [f64], &'a [f64], Target, Option<f64>, Option<bool>);
        let cases: &[Case<'_>] = &[
            (
                &[95.0],
                &[100.0],
                Target::AtLeast(0.95),
                Some(0.95),
                Some(true),
            ),
            (
                &[90.0],
                &[100.0],
                Target::AtLeast(0.95),
                Some(0.9),
                Some(false),
            ),
            (&[30.0], &[20.0], Target::AtMost(1.5), Some(1.5), Some(true)),
            (
                &[40.0],
                &[20.0],
                Target::AtMost(1.5),
                Some(2.0),
                Some(false),
            ),
            (&[1.0], &[], Target::AtLeast(1.0), None, None),
            (&[1.0], &[0.0], Target::AtLeast(1.0), None, None),
            // Paired rounds: the median of the per-round ratios (1.05,
            // 0.6, 1.0345), not the ratio of the medians (100 / 100).
            (
                &[100.0, 60.0, 300.0],
                &[95.0, 100.0, 290.0],
                Target::AtLeast(1.0),
                Some(300.0 / 290.0),
                Some(true),
            ),
            // Unequal counts: the ratio of the medians.
            (
                &[100.0, 60.0, 300.0],
                &[95.0, 100.0],
                Target::AtLeast(1.0),
                Some(100.0 / 97.5),
                Some(true),
            ),
        ];
        for (s, p, target, ratio, met) in cases {
            let line = Line::new("x", "x".into(), "u", s, "peer", p, *target);
            match (line.ratio(), ratio) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{s:?} {p:?}"),
                (a, b) => assert_eq!(a, *b),
            }
            assert_eq!(line.met(), *met, "{s:?} {p:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(number(None), "-");
        assert_eq!(number(Some(480.44)), "480");
        assert_eq!(number(Some(48.04)), "48.0");
        assert_eq!(number(Some(4.804)), "4.80");
    }
}
