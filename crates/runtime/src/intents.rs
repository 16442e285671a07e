//! Intent data from the Home Assistant intents file, and training an intent
//! classifier on it.
//!
//! The file (`home-assistant-intents`, one JSON file per language) lists,
//! for each intent, sentence templates in hassil syntax:
//!
//! - `(a|b)`: one of the alternatives; `(a;b)`: the parts in any order;
//! - `[x]` or `[a|b]`: optional;
//! - `{list}` or `{list:slot}`: a value from the file's `lists` (fixed
//!   values, themselves templates; a numeric range; or a wildcard);
//! - `<rule>`: a template from the file's `expansion_rules`.
//!
//! Full expansion explodes combinatorially, so [`expand`] draws random
//! expansions instead: up to `per_template` distinct sentences per template,
//! then up to `per_intent` per intent taken round-robin over the intent's
//! templates, which keeps the set balanced between intents with one
//! template and intents with a hundred. Slot lists the file leaves to the
//! user's home (`name`, `area`, `floor`) and wildcards get sample values from
//! [`ExpansionOptions::slot_samples`]. Everything is drawn from a seeded
//! ChaCha stream: the same file and options give the same data set.
//!
//! [`IntentDataset::split`] holds out a deterministic share of sentences (by
//! a hash of their text), and [`train_and_evaluate`] embeds, trains a
//! [`ClassifierHead`] and reports held-out accuracy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::backend::TextEmbedder;
use crate::classifier::{ClassifierHead, TrainConfig, accuracy};
use crate::error::{Error, Result};

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub enum Template {
    /// Literal text.
    Text(String),
    /// Parts one after the other.
    Seq(Vec<Template>),
    /// One of the alternatives (an optional is an alternative with an empty branch).
    Alt(Vec<Template>),
    /// The parts in any order, separated by spaces.
    Perm(Vec<Template>),
    /// A value from the named slot list.
    List(String),
    /// The named expansion rule.
    Rule(String),
}

impl Template {
    /// Parses hassil template syntax.
    pub fn parse(text: &str) -> Result<Template> {
        let chars: Vec<char> = text.chars().collect();
        let mut p = Parser {
            chars: &chars,
            pos: 0,
            source: text,
        };
        let t = p.alternatives(None)?;
        if p.pos != chars.len() {
            return Err(p.err(format!("unexpected {:?}", chars[p.pos])));
        }
        Ok(t)
    }
}

struct Parser<'a> {
    chars: &'a [char],
    pos: usize,
    source: &'a str,
}

impl Parser<'_> {
    fn err(&self, reason: String) -> Error {
        Error::Template {
            template: self.source.to_owned(),
            reason: format!("{reason} at character {}", self.pos),
        }
    }

    /// `seq (('|' | ';') seq)*` up to `close` (or the end when `None`).
    fn alternatives(&mut self, close: Option<char>) -> Result<Template> {
        let mut alts = Vec::new();
        let mut perm_parts = vec![self.sequence()?];
        loop {
            match self.chars.get(self.pos) {
                Some('|') => {
                    self.pos += 1;
                    alts.push(finish_perm(std::mem::take(&mut perm_parts)));
                    perm_parts.push(self.sequence()?);
                }
                Some(';') => {
                    self.pos += 1;
                    perm_parts.push(self.sequence()?);
                }
                Some(&c) if Some(c) == close => {
                    self.pos += 1;
                    break;
                }
                Some(&c) => return Err(self.err(format!("unexpected {c:?}"))),
                None if close.is_none() => break,
                None => return Err(self.err(format!("missing {:?}", close.unwrap_or(')')))),
            }
        }
        alts.push(finish_perm(perm_parts));
        Ok(if alts.len() == 1 {
            alts.pop().unwrap_or(Template::Seq(Vec::new()))
        } else {
            Template::Alt(alts)
        })
    }

    fn sequence(&mut self) -> Result<Template> {
        let mut items = Vec::new();
        let mut text = String::new();
        while let Some(&c) = self.chars.get(self.pos) {
            match c {
                '|' | ';' | ')' | ']' => break,
                '(' | '[' | '{' | '<' => {
                    if !text.is_empty() {
                        items.push(Template::Text(std::mem::take(&mut text)));
                    }
                    self.pos += 1;
                    items.push(match c {
                        '(' => self.alternatives(Some(')'))?,
                        '[' => Template::Alt(vec![
                            self.alternatives(Some(']'))?,
                            Template::Text(String::new()),
                        ]),
                        '{' => Template::List(self.name('}')?),
                        _ => Template::Rule(self.name('>')?),
                    });
                }
                '}' | '>' => return Err(self.err(format!("unexpected {c:?}"))),
                _ => {
                    text.push(c);
                    self.pos += 1;
                }
            }
        }
        if !text.is_empty() {
            items.push(Template::Text(text));
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Template::Seq(Vec::new()))
        } else {
            Template::Seq(items)
        })
    }

    fn name(&mut self, close: char) -> Result<String> {
        let start = self.pos;
        while let Some(&c) = self.chars.get(self.pos) {
            if c == close {
                let name: String = self.chars[start..self.pos].iter().collect();
                self.pos += 1;
                // `{list:slot}` names the list before the colon.
                let list = name.split(':').next().unwrap_or_default().trim().to_owned();
                if list.is_empty() {
                    return Err(self.err("empty name".to_owned()));
                }
                return Ok(list);
            }
            self.pos += 1;
        }
        Err(self.err(format!("missing {close:?}")))
    }
}

fn finish_perm(mut parts: Vec<Template>) -> Template {
    if parts.len() == 1 {
        parts.pop().unwrap_or(Template::Seq(Vec::new()))
    } else {
        Template::Perm(parts)
    }
}

/// The parts of the intents file the expansion needs.
#[derive(Debug, Deserialize)]
struct IntentsFile {
    intents: BTreeMap<String, IntentEntry>,
    #[serde(default)]
    lists: HashMap<String, SlotList>,
    #[serde(default)]
    expansion_rules: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IntentEntry {
    data: Vec<IntentData>,
}

#[derive(Debug, Deserialize)]
struct IntentData {
    sentences: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SlotList {
    #[serde(default)]
    values: Option<Vec<SlotValue>>,
    #[serde(default)]
    range: Option<SlotRange>,
    // A list with neither (`"wildcard": true` in the file) takes sample values.
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SlotValue {
    Plain(String),
    Mapped {
        #[serde(rename = "in")]
        input: String,
    },
}

#[derive(Debug, Deserialize)]
struct SlotRange {
    from: i64,
    to: i64,
    #[serde(default)]
    step: Option<i64>,
    #[serde(default)]
    fractions: Option<String>,
}

/// How sentences are drawn from the templates.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpansionOptions {
    /// Most distinct sentences drawn from one template. Default 4.
    pub per_template: usize,
    /// Most sentences kept per intent (round-robin over its templates);
    /// `None` keeps all. Default 60.
    pub per_intent: Option<usize>,
    /// Seed of the random draws. Default 7.
    pub seed: u64,
    /// Sample values for slot lists the file does not define (`name`,
    /// `area`, `floor`) and for wildcard lists, by list name. A list with no
    /// entry here uses the `*` entry.
    pub slot_samples: HashMap<String, Vec<String>>,
}

impl Default for ExpansionOptions {
    fn default() -> Self {
        let samples = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let slot_samples = HashMap::from([
            (
                "name".to_owned(),
                samples(&[
                    "kitchen light",
                    "ceiling fan",
                    "front door",
                    "garage door",
                    "living room lamp",
                    "thermostat",
                    "tv",
                    "bedroom blinds",
                    "shopping",
                    "coffee maker",
                ]),
            ),
            (
                "area".to_owned(),
                samples(&[
                    "kitchen",
                    "living room",
                    "bedroom",
                    "office",
                    "garage",
                    "bathroom",
                    "hallway",
                    "garden",
                ]),
            ),
            (
                "floor".to_owned(),
                samples(&[
                    "first floor",
                    "ground floor",
                    "upstairs",
                    "downstairs",
                    "basement",
                    "attic",
                ]),
            ),
            (
                "message".to_owned(),
                samples(&[
                    "dinner is ready",
                    "the laundry is done",
                    "time to leave",
                    "welcome home",
                ]),
            ),
            (
                "search_query".to_owned(),
                samples(&[
                    "jazz",
                    "the beatles",
                    "relaxing music",
                    "the latest news",
                    "abbey road",
                ]),
            ),
            (
                "zone".to_owned(),
                samples(&["home", "work", "school", "the gym"]),
            ),
            (
                "timer_name".to_owned(),
                samples(&["pizza", "laundry", "tea", "pasta", "oven"]),
            ),
            (
                "timer_command".to_owned(),
                samples(&["turn off the oven", "turn on the lights", "stop the music"]),
            ),
            (
                "shopping_list_item".to_owned(),
                samples(&["milk", "eggs", "bread", "apples", "coffee beans"]),
            ),
            (
                "todo_list_item".to_owned(),
                samples(&[
                    "call mom",
                    "pay the bills",
                    "water the plants",
                    "walk the dog",
                ]),
            ),
            ("*".to_owned(), samples(&["something", "this thing"])),
        ]);
        ExpansionOptions {
            per_template: 4,
            per_intent: Some(60),
            seed: 7,
            slot_samples,
        }
    }
}

/// One sentence and the intent it expresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentExample {
    /// The sentence.
    pub text: String,
    /// The intent's name (e.g. `HassTurnOn`).
    pub intent: String,
}

/// Sentences drawn from an intents file.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentDataset {
    /// Every intent in the file, sorted (the class order of a trained head).
    pub intents: Vec<String>,
    /// The sentences, grouped by intent in that order.
    pub examples: Vec<IntentExample>,
}

impl IntentDataset {
    /// Splits into (train, held-out); a sentence is held out when a hash of
    /// its text falls in the first `held_out_fraction` of the hash range, so
    /// the split does not depend on order or on the other sentences.
    pub fn split(&self, held_out_fraction: f64) -> (Vec<&IntentExample>, Vec<&IntentExample>) {
        let cut = (held_out_fraction.clamp(0.0, 1.0) * 10_000.0) as u64;
        self.examples
            .iter()
            .partition(|e| fnv1a(e.text.as_bytes()) % 10_000 >= cut)
    }

    /// The class index of an intent.
    pub fn class_of(&self, intent: &str) -> Option<usize> {
        self.intents
            .binary_search_by(|i| i.as_str().cmp(intent))
            .ok()
    }
}

/// Strata's own intents file (Home Assistant's template format): questions
/// that need data from the whole fleet (`StrataFleetQuery`), which the
/// edge router sends to the hub. Train a head with them
/// ([`IntentDataset::merge`]) and the router can tell them apart from
/// device commands.
pub const FLEET_INTENTS_JSON: &str = include_str!("../data/fleet-intents.json");

/// The intent of [`FLEET_INTENTS_JSON`].
pub const FLEET_INTENT: &str = "StrataFleetQuery";

impl IntentDataset {
    /// The union of two data sets: intents sorted, sentences grouped by
    /// intent in that order; a sentence both contain keeps its first intent.
    pub fn merge(self, other: IntentDataset) -> IntentDataset {
        let mut intents: Vec<String> = self.intents.iter().chain(&other.intents).cloned().collect();
        intents.sort();
        intents.dedup();
        let mut seen = HashSet::new();
        let mut all: Vec<IntentExample> = self
            .examples
            .into_iter()
            .chain(other.examples)
            .filter(|e| seen.insert(e.text.clone()))
            .collect();
        // Stable: each intent's sentences keep their order.
        all.sort_by_key(|e| intents.binary_search(&e.intent).unwrap_or(usize::MAX));
        IntentDataset {
            intents,
            examples: all,
        }
    }
}

/// 64-bit FNV-1a: a stable hash (unlike std's, which is randomly seeded).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Reads an intents file and draws sentences from it.
pub fn load(path: &Path, options: &ExpansionOptions) -> Result<IntentDataset> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    expand(&text, path, options)
}

/// Draws sentences from the JSON text of an intents file (`path` is only for
/// error messages).
pub fn expand(json: &str, path: &Path, options: &ExpansionOptions) -> Result<IntentDataset> {
    let file: IntentsFile = serde_json::from_str(json).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let mut ctx = Expander {
        rules: HashMap::new(),
        lists: HashMap::new(),
        options,
    };
    for (name, rule) in &file.expansion_rules {
        ctx.rules.insert(name.clone(), Template::parse(rule)?);
    }
    for (name, list) in &file.lists {
        let values = if let Some(values) = &list.values {
            ListValues::Templates(
                values
                    .iter()
                    .map(|v| match v {
                        SlotValue::Plain(s) => Template::parse(s),
                        SlotValue::Mapped { input } => Template::parse(input),
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        } else if let Some(r) = &list.range {
            ListValues::Range {
                from: r.from,
                to: r.to,
                step: r.step.unwrap_or(1).max(1),
                halves: r.fractions.is_some(),
            }
        } else {
            // Wildcards, and lists with neither values nor a range, take samples.
            ListValues::Samples(ctx.samples_for(name))
        };
        ctx.lists.insert(name.clone(), values);
    }

    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut seen = HashSet::new();
    let mut examples = Vec::new();
    let intents: Vec<String> = file.intents.keys().cloned().collect();
    for (intent, entry) in &file.intents {
        let mut per_template: Vec<Vec<String>> = Vec::new();
        for data in &entry.data {
            for sentence in &data.sentences {
                let template = Template::parse(sentence)?;
                let mut drawn = Vec::new();
                for _ in 0..options.per_template.saturating_mul(8) {
                    if drawn.len() >= options.per_template {
                        break;
                    }
                    let text = normalise(&ctx.sample(&template, &mut rng, 0)?);
                    if !text.is_empty() && !drawn.contains(&text) {
                        drawn.push(text);
                    }
                }
                per_template.push(drawn);
            }
        }
        // Round-robin over templates, so a capped intent keeps its variety.
        let cap = options.per_intent.unwrap_or(usize::MAX);
        let mut kept = 0;
        let longest = per_template.iter().map(Vec::len).max().unwrap_or(0);
        'outer: for round in 0..longest {
            for drawn in &per_template {
                if kept >= cap {
                    break 'outer;
                }
                if let Some(text) = drawn.get(round) {
                    // A sentence two intents share would teach nothing; the first keeps it.
                    if seen.insert(text.clone()) {
                        examples.push(IntentExample {
                            text: text.clone(),
                            intent: intent.clone(),
                        });
                        kept += 1;
                    }
                }
            }
        }
    }
    Ok(IntentDataset { intents, examples })
}

enum ListValues {
    Templates(Vec<Template>),
    Range {
        from: i64,
        to: i64,
        step: i64,
        halves: bool,
    },
    Samples(Vec<String>),
}

struct Expander<'a> {
    rules: HashMap<String, Template>,
    lists: HashMap<String, ListValues>,
    options: &'a ExpansionOptions,
}

/// Rules that refer to rules deeper than this are taken to be a cycle.
const MAX_RULE_DEPTH: usize = 16;

impl Expander<'_> {
    fn samples_for(&self, name: &str) -> Vec<String> {
        self.options
            .slot_samples
            .get(name)
            .or_else(|| self.options.slot_samples.get("*"))
            .cloned()
            .unwrap_or_else(|| vec!["something".to_owned()])
    }

    fn sample(&self, t: &Template, rng: &mut ChaCha8Rng, depth: usize) -> Result<String> {
        Ok(match t {
            Template::Text(s) => s.clone(),
            Template::Seq(items) => {
                let mut out = String::new();
                for item in items {
                    out.push_str(&self.sample(item, rng, depth)?);
                }
                out
            }
            Template::Alt(alts) => match alts.choose(rng) {
                Some(alt) => self.sample(alt, rng, depth)?,
                None => String::new(),
            },
            Template::Perm(parts) => {
                let mut order: Vec<&Template> = parts.iter().collect();
                order.shuffle(rng);
                let mut out = Vec::new();
                for part in order {
                    out.push(self.sample(part, rng, depth)?);
                }
                out.join(" ")
            }
            Template::Rule(name) => {
                let rule = self.rules.get(name).ok_or_else(|| Error::Template {
                    template: format!("<{name}>"),
                    reason: "no such expansion rule".to_owned(),
                })?;
                if depth >= MAX_RULE_DEPTH {
                    return Err(Error::Template {
                        template: format!("<{name}>"),
                        reason: "expansion rules refer to each other in a cycle".to_owned(),
                    });
                }
                self.sample(rule, rng, depth + 1)?
            }
            Template::List(name) => match self.lists.get(name) {
                Some(ListValues::Templates(values)) => match values.choose(rng) {
                    Some(v) => self.sample(v, rng, depth)?,
                    None => String::new(),
                },
                Some(ListValues::Range {
                    from,
                    to,
                    step,
                    halves,
                }) => {
                    let (lo, hi) = (*from.min(to), *from.max(to));
                    let n = (hi - lo) / step;
                    let v = lo + rng.random_range(0..=n) * step;
                    if *halves && rng.random_bool(0.2) {
                        format!("{v}.5")
                    } else {
                        v.to_string()
                    }
                }
                Some(ListValues::Samples(samples)) => {
                    samples.choose(rng).cloned().unwrap_or_default()
                }
                None => self
                    .samples_for(name)
                    .choose(rng)
                    .cloned()
                    .unwrap_or_default(),
            },
        })
    }
}

/// Collapses runs of spaces and trims.
fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The outcome of [`train_and_evaluate`].
#[derive(Debug, Clone)]
pub struct IntentEvaluation {
    /// The trained head (labels are the data set's intents).
    pub head: ClassifierHead,
    /// Accuracy on the held-out sentences, in [0, 1].
    pub held_out_accuracy: f64,
    /// Accuracy on the training sentences, in [0, 1].
    pub train_accuracy: f64,
    /// Number of training sentences.
    pub n_train: usize,
    /// Number of held-out sentences.
    pub n_held_out: usize,
}

/// Embeds the data set, trains a head on the training split and measures
/// its accuracy on the held-out split.
pub fn train_and_evaluate(
    embedder: &dyn TextEmbedder,
    dataset: &IntentDataset,
    held_out_fraction: f64,
    config: &TrainConfig,
) -> Result<IntentEvaluation> {
    let (train, test) = dataset.split(held_out_fraction);
    let xy = |set: &[&IntentExample]| -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
        let texts: Vec<&str> = set.iter().map(|e| e.text.as_str()).collect();
        let x = if texts.is_empty() {
            Vec::new()
        } else {
            embedder.embed(&texts)?
        };
        let y = set
            .iter()
            .map(|e| {
                dataset.class_of(&e.intent).ok_or_else(|| Error::Training {
                    what: "intent classifier".to_owned(),
                    reason: format!("intent {} is not in the data set's intent list", e.intent),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((x, y))
    };
    let (train_x, train_y) = xy(&train)?;
    let (test_x, test_y) = xy(&test)?;
    let head = ClassifierHead::train(&train_x, &train_y, dataset.intents.clone(), config)?;
    Ok(IntentEvaluation {
        held_out_accuracy: accuracy(&head, &test_x, &test_y)?,
        train_accuracy: accuracy(&head, &train_x, &train_y)?,
        n_train: train.len(),
        n_held_out: test.len(),
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sentence a template can produce (for small templates).
    fn all(t: &Template) -> Vec<String> {
        match t {
            Template::Text(s) => vec![s.clone()],
            Template::Seq(items) => items.iter().fold(vec![String::new()], |acc, item| {
                acc.iter()
                    .flat_map(|a| all(item).into_iter().map(move |b| format!("{a}{b}")))
                    .collect()
            }),
            Template::Alt(alts) => alts.iter().flat_map(all).collect(),
            Template::Perm(parts) if parts.len() == 2 => {
                let (a, b) = (all(&parts[0]), all(&parts[1]));
                let mut out = Vec::new();
                for x in &a {
                    for y in &b {
                        out.push(format!("{x} {y}"));
                        out.push(format!("{y} {x}"));
                    }
                }
                out
            }
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn parses_hassil_syntax() {
        // (template, every normalised sentence it can produce)
        let cases: &[(&str, &[&str])] = &[
            ("turn on", &["turn on"]),
            ("(open|close) it", &["open it", "close it"]),
            ("[the] light", &["the light", "light"]),
            ("[the|my] light", &["the light", "my light", "light"]),
            ("a (b;c)", &["a b c", "a c b"]),
            ("x[ ]y", &["x y", "xy"]),
        ];
        for (text, want) in cases {
            let t = Template::parse(text).expect("parses");
            let mut got: Vec<String> = all(&t).iter().map(|s| normalise(s)).collect();
            got.sort();
            got.dedup();
            let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
            want.sort();
            assert_eq!(got, want, "template {text:?}");
        }
        assert_eq!(
            Template::parse("set {brightness:level} on <the> x").expect("parses"),
            Template::Seq(vec![
                Template::Text("set ".into()),
                Template::List("brightness".into()),
                Template::Text(" on ".into()),
                Template::Rule("the".into()),
                Template::Text(" x".into()),
            ])
        );
    }

    #[test]
    fn rejects_unbalanced_templates() {
        for bad in ["(a|b", "[a", "a)", "{x", "<y", "a]", "{}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    const FILE: &str = r#"{
        "language": "en",
        "intents": {
            "Lights": {"data": [{"sentences": ["<turn> on [the] {area} lights", "lights on in {area}"]}]},
            "Timer": {"data": [{"sentences": ["set a {minutes:m} minute timer [for {name}]"]}]}
        },
        "lists": {
            "minutes": {"range": {"from": 1, "to": 100}},
            "state": {"values": [{"in": "(on|off)", "out": "on"}, "plain"]},
            "thing": {"wildcard": true}
        },
        "expansion_rules": {"turn": "(turn|switch)"}
    }"#;

    #[test]
    fn expands_a_small_file_deterministically() {
        let options = ExpansionOptions {
            per_template: 3,
            per_intent: Some(5),
            ..ExpansionOptions::default()
        };
        let a = expand(FILE, Path::new("en.json"), &options).expect("expands");
        let b = expand(FILE, Path::new("en.json"), &options).expect("expands");
        assert_eq!(a, b);
        assert_eq!(a.intents, vec!["Lights".to_owned(), "Timer".to_owned()]);
        let lights: Vec<_> = a.examples.iter().filter(|e| e.intent == "Lights").collect();
        let timers: Vec<_> = a.examples.iter().filter(|e| e.intent == "Timer").collect();
        assert_eq!(lights.len(), 5, "{lights:?}");
        assert_eq!(timers.len(), 3, "{timers:?}");
        for e in &a.examples {
            assert!(!e.text.contains(['{', '<', '[', '(', '|']), "{e:?}");
            assert!(!e.text.contains("  "), "{e:?}");
        }
        assert!(timers.iter().all(|e| e.text.starts_with("set a ")));
    }

    #[test]
    fn split_is_stable_and_disjoint() {
        let data =
            expand(FILE, Path::new("en.json"), &ExpansionOptions::default()).expect("expands");
        let (train, test) = data.split(0.3);
        assert_eq!(train.len() + test.len(), data.examples.len());
        let (train2, _) = data.split(0.3);
        assert_eq!(train, train2);
        assert!(train.iter().all(|e| !test.contains(e)));
    }

    #[test]
    fn unknown_rule_is_an_error() {
        let file = r#"{"intents": {"A": {"data": [{"sentences": ["<nope> x"]}]}}}"#;
        let err = expand(file, Path::new("en.json"), &ExpansionOptions::default()).unwrap_err();
        assert!(err.to_string().contains("<nope>"), "{err}");
    }
}
