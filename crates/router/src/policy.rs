//! The routing policy: what operators configure, parsed from TOML, checked
//! once, and compiled with its privacy classifier into a [`CompiledPolicy`].
//!
//! Every table refuses unknown fields, so a misspelt setting is an error
//! rather than a silently ignored line. Every field but `version` has a
//! default; [`Policy::default`] is the built-in policy (`builtin-1`), and
//! [`EXAMPLE_POLICY`] shows every field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::privacy::PrivacyClassifier;

/// An example policy that sets every field, for operators to start from.
/// It parses (a test checks it).
pub const EXAMPLE_POLICY: &str = include_str!("../../../docs/examples/policy.toml");

/// Where a request is answered, as the operator prefers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Only the local micro model; refuse what it cannot serve.
    OnlyLocal,
    /// The local model unless capability, latency or confidence call for
    /// the macro model (the default).
    #[default]
    PreferLocal,
    /// The macro model when it is reachable; the local model otherwise.
    PreferMacro,
    /// Only the macro model; refuse when it is unreachable. Private
    /// requests are refused in this mode.
    OnlyMacro,
}

impl Mode {
    /// Every mode, from the most local to the most remote.
    pub const ALL: [Mode; 4] = [
        Mode::OnlyLocal,
        Mode::PreferLocal,
        Mode::PreferMacro,
        Mode::OnlyMacro,
    ];

    /// The mode's name, as in TOML (`prefer_local`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::OnlyLocal => "only_local",
            Mode::PreferLocal => "prefer_local",
            Mode::PreferMacro => "prefer_macro",
            Mode::OnlyMacro => "only_macro",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| Error::UnknownMode(s.to_owned()))
    }
}

/// A structured privacy detector (see [`crate::privacy`] for what each
/// recognises).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// Telephone numbers, international and national formats.
    Phone,
    /// Payment card numbers that pass the Luhn check.
    PaymentCard,
    /// IBANs that pass the ISO 13616 mod-97 check.
    Iban,
}

/// The routing policy as written in TOML. Check it with
/// [`Policy::validate`] (done by [`Policy::from_toml`] and
/// [`CompiledPolicy::new`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy's version, logged with every decision; required, not
    /// empty.
    pub version: String,
    /// The mode of requests that neither name a mode nor come from an app
    /// with one.
    #[serde(default)]
    pub default_mode: Mode,
    /// Per-app settings, keyed by the app id callers send.
    #[serde(default)]
    pub apps: BTreeMap<String, AppPolicy>,
    /// What makes a request private.
    #[serde(default)]
    pub privacy: PrivacyPolicy,
    /// When a local answer escalates to the macro model.
    #[serde(default)]
    pub confidence: ConfidencePolicy,
    /// What only the macro model can answer.
    #[serde(default)]
    pub capability: CapabilityPolicy,
    /// The default latency budget.
    #[serde(default)]
    pub latency: LatencyPolicy,
    /// Prices and the daily macro budget.
    #[serde(default)]
    pub cost: CostPolicy,
    /// The macro tier's circuit breaker.
    #[serde(default)]
    pub breaker: BreakerPolicy,
}

/// Settings of one app.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppPolicy {
    /// The app's mode; the policy's `default_mode` when absent. A mode
    /// named in the request wins over it.
    pub mode: Option<Mode>,
    /// The app's latency budget in milliseconds; the policy's when absent.
    /// A budget named in the request wins over it.
    pub latency_budget_ms: Option<u64>,
    /// Every request of this app is private: it is answered locally or
    /// refused, whatever its text.
    pub private: bool,
}

/// What makes a request private.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// The structured detectors to run (default: all four).
    pub detectors: Vec<Detector>,
    /// National identifiers, as named regular expressions (default: US
    /// social security numbers, `us_ssn`, and UK national insurance
    /// numbers, `uk_nino`, with ASCII word boundaries and digits).
    pub national_ids: Vec<NationalIdPattern>,
    /// Keywords that make a request private, matched as whole words and
    /// ignoring ASCII case; surrounding whitespace is ignored. A match is
    /// reported as the data class `keyword`.
    pub keywords: Vec<String>,
    /// Named data classes and their keywords (matched like `keywords`); a
    /// match is reported as `keyword:<class>`. Names are ASCII letters,
    /// digits, `_` and `-`; `keyword` is reserved.
    pub classes: BTreeMap<String, Vec<String>>,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        PrivacyPolicy {
            detectors: vec![
                Detector::Email,
                Detector::Phone,
                Detector::PaymentCard,
                Detector::Iban,
            ],
            national_ids: vec![
                NationalIdPattern {
                    name: "us_ssn".to_owned(),
                    pattern: r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)".to_owned(),
                },
                NationalIdPattern {
                    name: "uk_nino".to_owned(),
                    pattern: r"(?-u:\b)[A-CEGHJ-PR-TW-Z]{2}\s?[0-9]{2}\s?[0-9]{2}\s?[0-9]{2}\s?[A-D](?-u:\b)"
                        .to_owned(),
                },
            ],
            keywords: [
                "password",
                "date of birth",
                "social security",
                "passport number",
                "diagnosis",
                "medical record",
            ]
            .map(str::to_owned)
            .to_vec(),
            classes: BTreeMap::new(),
        }
    }
}

/// A national identifier's pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NationalIdPattern {
    /// The identifier's name, reported as `national_id:<name>`: ASCII
    /// letters, digits, `_` and `-`, unique within the policy.
    pub name: String,
    /// A regular expression in Rust `regex` syntax that matches the
    /// identifier; it must not match the empty string. Patterns that
    /// plainly need a digit (`[0-9]` or `\d` outside groups and
    /// alternations) are skipped for text without one. Prefer ASCII word
    /// boundaries, `(?-u:\b)`: with a Unicode `\b` the regex engine falls
    /// back to a matcher about ten times slower on non-ASCII text.
    pub pattern: String,
}

/// When a local answer escalates to the macro model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfidencePolicy {
    /// A generation whose mean token log-probability is below this
    /// escalates (at most 0; default -1.0).
    pub min_mean_logprob: f32,
    /// A classification whose top-1 minus top-2 probability margin is below
    /// this escalates (between 0 and 1; default 0.2).
    pub min_margin: f32,
    /// Whether local answers may escalate at all (default true).
    pub cascade: bool,
}

impl Default for ConfidencePolicy {
    fn default() -> Self {
        ConfidencePolicy {
            min_mean_logprob: -1.0,
            min_margin: 0.2,
            cascade: true,
        }
    }
}

/// What only the macro model can answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilityPolicy {
    /// Labels of the local intent model that mean "this question needs
    /// fleet-wide data" (default `["StrataFleetQuery"]`).
    pub fleet_intents: Vec<String>,
    /// A fleet or local intent counts only when the intent model's margin
    /// is at least this (between 0 and 1; default 0.3).
    pub min_intent_margin: f32,
    /// Labels of the local intent model that the device handles itself
    /// (device commands): a request read as one of them is answered on the
    /// device without the cascade, since the macro model cannot act on a
    /// device either. A trailing `*` matches a prefix (default `["Hass*"]`,
    /// the Home Assistant intents).
    pub local_intents: Vec<String>,
}

impl CapabilityPolicy {
    /// Whether `label` is one of [`local_intents`](Self::local_intents).
    pub fn is_local_intent(&self, label: &str) -> bool {
        self.local_intents
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => label.starts_with(prefix),
                None => p == label,
            })
    }
}

impl Default for CapabilityPolicy {
    fn default() -> Self {
        CapabilityPolicy {
            fleet_intents: vec!["StrataFleetQuery".to_owned()],
            min_intent_margin: 0.3,
            local_intents: vec!["Hass*".to_owned()],
        }
    }
}

/// The default latency budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyPolicy {
    /// The latency budget of a request that names none and whose app has
    /// none, in milliseconds (at least 1; default: no budget).
    pub budget_ms: Option<u64>,
}

/// Prices and the daily macro budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostPolicy {
    /// What 1000 tokens cost on the local tier, in USD (default 0).
    pub local_usd_per_1k_tokens: f64,
    /// What 1000 tokens cost on the macro tier, in USD (default 0.0005).
    pub macro_usd_per_1k_tokens: f64,
    /// Macro spend allowed per day, in USD; once spent (or when a request
    /// would overspend it), requests stay local (default: no budget).
    pub daily_budget_usd: Option<f64>,
}

impl Default for CostPolicy {
    fn default() -> Self {
        CostPolicy {
            local_usd_per_1k_tokens: 0.0,
            macro_usd_per_1k_tokens: 0.0005,
            daily_budget_usd: None,
        }
    }
}

/// The macro tier's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker (at least 1; default 3).
    pub failures_to_open: u32,
    /// How long the breaker stays open before one probe may go through, in
    /// milliseconds (default 10 000).
    pub open_ms: u64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures_to_open: 3,
            open_ms: 10_000,
        }
    }
}

impl Default for Policy {
    /// The built-in policy, version `builtin-1`: prefer local, all
    /// detectors, the default keywords, cascade on, no latency or cost
    /// budget.
    fn default() -> Self {
        Policy {
            version: "builtin-1".to_owned(),
            default_mode: Mode::default(),
            apps: BTreeMap::new(),
            privacy: PrivacyPolicy::default(),
            confidence: ConfidencePolicy::default(),
            capability: CapabilityPolicy::default(),
            latency: LatencyPolicy::default(),
            cost: CostPolicy::default(),
            breaker: BreakerPolicy::default(),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// True for names made of ASCII letters, digits, `_` and `-`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_fraction(field: &str, value: f32) -> Result<(), Error> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be between 0 and 1")))
    }
}

fn check_price(field: &str, value: f64) -> Result<(), Error> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} must be a finite number at least 0"),
        ))
    }
}

fn check_keywords(field: &str, keywords: &[String]) -> Result<(), Error> {
    for (i, k) in keywords.iter().enumerate() {
        if k.trim().is_empty() {
            return Err(invalid(format!("{field}[{i}]"), "must not be empty"));
        }
    }
    Ok(())
}

/// The one-line reason of a regex error: the regex crate's syntax errors
/// span several lines (the pattern, a caret, the message), and only the
/// message is kept, since the pattern is printed beside it.
pub(crate) fn regex_reason(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(text) => {
            let message = text
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("invalid syntax");
            let message = message.strip_prefix("error: ").unwrap_or(message);
            format!("regex parse error: {message}")
        }
        regex::Error::CompiledTooBig(limit) => {
            format!("regex is larger than the {limit}-byte limit once compiled")
        }
        other => other.to_string(),
    }
}

impl Policy {
    /// Parses and validates a policy written in TOML.
    pub fn from_toml(text: &str) -> Result<Policy, Error> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let at = match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!("policy line {line} column {column}")
                }
                None => "policy".to_owned(),
            };
            Error::Parse {
                at,
                message: e.message().trim().to_owned(),
            }
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every field: a non-empty version, thresholds in range, budgets
    /// positive, prices at least 0, names well formed and unique, keywords
    /// not empty, and national-id patterns that compile and do not match
    /// the empty string.
    pub fn validate(&self) -> Result<(), Error> {
        if self.version.trim().is_empty() {
            return Err(invalid("policy.version", "must not be empty"));
        }
        for (name, app) in &self.apps {
            if name.is_empty() {
                return Err(invalid("policy.apps", "an app id must not be empty"));
            }
            if app.latency_budget_ms == Some(0) {
                return Err(invalid(
                    format!("policy.apps.{name}.latency_budget_ms"),
                    "must be at least 1",
                ));
            }
        }
        self.validate_privacy()?;
        let c = &self.confidence;
        if !(c.min_mean_logprob.is_finite() && c.min_mean_logprob <= 0.0) {
            return Err(invalid(
                "policy.confidence.min_mean_logprob",
                format!(
                    "{} must be a finite number at most 0 (a log-probability)",
                    c.min_mean_logprob
                ),
            ));
        }
        check_fraction("policy.confidence.min_margin", c.min_margin)?;
        check_fraction(
            "policy.capability.min_intent_margin",
            self.capability.min_intent_margin,
        )?;
        for (i, label) in self.capability.local_intents.iter().enumerate() {
            if label.is_empty() || label == "*" {
                return Err(invalid(
                    format!("policy.capability.local_intents[{i}]"),
                    "must name a label or a prefix followed by *",
                ));
            }
        }
        for (i, label) in self.capability.fleet_intents.iter().enumerate() {
            if label.is_empty() {
                return Err(invalid(
                    format!("policy.capability.fleet_intents[{i}]"),
                    "must not be empty",
                ));
            }
        }
        if self.latency.budget_ms == Some(0) {
            return Err(invalid("policy.latency.budget_ms", "must be at least 1"));
        }
        check_price(
            "policy.cost.local_usd_per_1k_tokens",
            self.cost.local_usd_per_1k_tokens,
        )?;
        check_price(
            "policy.cost.macro_usd_per_1k_tokens",
            self.cost.macro_usd_per_1k_tokens,
        )?;
        if let Some(budget) = self.cost.daily_budget_usd {
            check_price("policy.cost.daily_budget_usd", budget)?;
        }
        if self.breaker.failures_to_open == 0 {
            return Err(invalid(
                "policy.breaker.failures_to_open",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_privacy(&self) -> Result<(), Error> {
        let privacy = &self.privacy;
        let mut seen = BTreeSet::new();
        for (i, d) in privacy.detectors.iter().enumerate() {
            if !seen.insert(*d) {
                return Err(invalid(
                    format!("policy.privacy.detectors[{i}]"),
                    "is listed twice",
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, id) in privacy.national_ids.iter().enumerate() {
            if !is_name(&id.name) {
                return Err(invalid(
                    format!("policy.privacy.national_ids[{i}].name"),
                    format!(
                        "{:?} must be ASCII letters, digits, _ and -, not empty",
                        id.name
                    ),
                ));
            }
            if !names.insert(id.name.as_str()) {
                return Err(invalid(
                    format!("policy.privacy.national_ids[{i}].name"),
                    format!("{:?} is used twice", id.name),
                ));
            }
            let field = format!("policy.privacy.national_ids[{i}].pattern");
            let regex = regex::Regex::new(&id.pattern).map_err(|e| Error::Regex {
                field: field.clone(),
                pattern: id.pattern.clone(),
                reason: regex_reason(&e),
            })?;
            if regex.is_match("") {
                return Err(Error::Regex {
                    field,
                    pattern: id.pattern.clone(),
                    reason: "matches the empty string, so it would flag every request".to_owned(),
                });
            }
        }
        check_keywords("policy.privacy.keywords", &privacy.keywords)?;
        for (name, keywords) in &privacy.classes {
            if !is_name(name) || name == "keyword" {
                return Err(invalid(
                    "policy.privacy.classes",
                    format!(
                        "class name {name:?} must be ASCII letters, digits, _ and -, and not \"keyword\""
                    ),
                ));
            }
            if keywords.is_empty() {
                return Err(invalid(
                    format!("policy.privacy.classes.{name}"),
                    "must list at least one keyword",
                ));
            }
            check_keywords(&format!("policy.privacy.classes.{name}"), keywords)?;
        }
        Ok(())
    }
}

/// A validated [`Policy`] with its compiled [`PrivacyClassifier`]: what
/// [`crate::decide()`] takes. Build it once per policy version and share it.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    policy: Policy,
    classifier: PrivacyClassifier,
}

impl CompiledPolicy {
    /// Validates the policy and compiles its classifier.
    pub fn new(policy: Policy) -> Result<CompiledPolicy, Error> {
        policy.validate()?;
        let classifier = PrivacyClassifier::new(&policy.privacy)?;
        Ok(CompiledPolicy { policy, classifier })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The compiled privacy classifier.
    pub fn classifier(&self) -> &PrivacyClassifier {
        &self.classifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_policy_parses_and_sets_every_field() {
        let p = Policy::from_toml(EXAMPLE_POLICY).unwrap();
        assert_eq!(p.version, "example-1");
        assert_eq!(p.default_mode, Mode::PreferLocal);
        assert_eq!(p.apps.len(), 3);
        assert!(p.apps["health-notes"].private);
        assert_eq!(p.apps["assistant"].latency_budget_ms, Some(1500));
        assert_eq!(p.apps["fleet-report"].mode, Some(Mode::PreferMacro));
        assert_eq!(p.privacy.detectors.len(), 4);
        assert_eq!(
            p.privacy.national_ids,
            PrivacyPolicy::default().national_ids
        );
        assert_eq!(p.privacy.keywords, PrivacyPolicy::default().keywords);
        assert_eq!(p.privacy.classes["health"].len(), 3);
        assert_eq!(p.confidence, ConfidencePolicy::default());
        assert_eq!(p.capability, CapabilityPolicy::default());
        assert_eq!(p.latency.budget_ms, Some(2000));
        assert_eq!(p.cost.daily_budget_usd, Some(5.0));
        assert_eq!(p.breaker, BreakerPolicy::default());
        CompiledPolicy::new(p).unwrap();
    }

    #[test]
    fn every_field_of_the_policy_appears_in_the_example() {
        // Serialising the parsed example must give back every key the
        // types have; a field added to a struct but not to the example
        // shows up here as a key missing from the example's text.
        let p = Policy::from_toml(EXAMPLE_POLICY).unwrap();
        let value = toml::Value::try_from(&p).unwrap();
        fn keys(value: &toml::Value, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        keys(&value, &mut all);
        for key in all {
            assert!(
                EXAMPLE_POLICY.contains(&key),
                "{key} missing from EXAMPLE_POLICY"
            );
        }
    }

    #[test]
    fn only_the_version_is_required() {
        let p = Policy::from_toml("version = \"v1\"").unwrap();
        assert_eq!(
            p,
            Policy {
                version: "v1".to_owned(),
                ..Policy::default()
            }
        );
        let e = Policy::from_toml("").unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }

    #[test]
    fn the_builtin_policy_is_valid_and_round_trips_through_toml() {
        let p = Policy::default();
        assert_eq!(p.version, "builtin-1");
        p.validate().unwrap();
        let text = toml::to_string(&p).unwrap();
        assert_eq!(Policy::from_toml(&text).unwrap(), p);
    }

    #[test]
    fn modes_parse_and_print_by_their_toml_names() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
            let toml_text = format!("version = \"v\"\ndefault_mode = \"{m}\"");
            assert_eq!(Policy::from_toml(&toml_text).unwrap().default_mode, m);
        }
        assert_eq!(
            "local".parse::<Mode>().unwrap_err().to_string(),
            "unknown mode \"local\": expected only_local, prefer_local, prefer_macro or only_macro"
        );
    }

    #[test]
    fn invalid_policies_name_the_wrong_field() {
        let cases: &[(&str, &str)] = &[
            ("version = \" \"", "policy.version: must not be empty"),
            (
                "version = \"v\"\nsurprise = 1",
                "policy line 2 column 1: unknown field `surprise`",
            ),
            (
                "version = \"v\"\n[confidence]\nmin_margin = 1.5",
                "policy.confidence.min_margin: 1.5 must be between 0 and 1",
            ),
            (
                "version = \"v\"\n[confidence]\nmin_mean_logprob = 0.5",
                "policy.confidence.min_mean_logprob: 0.5 must be a finite number at most 0",
            ),
            (
                "version = \"v\"\n[capability]\nmin_intent_margin = -0.1",
                "policy.capability.min_intent_margin: -0.1 must be between 0 and 1",
            ),
            (
                "version = \"v\"\n[cost]\nmacro_usd_per_1k_tokens = -1.0",
                "policy.cost.macro_usd_per_1k_tokens: -1 must be a finite number at least 0",
            ),
            (
                "version = \"v\"\n[cost]\ndaily_budget_usd = -2.0",
                "policy.cost.daily_budget_usd: -2 must be",
            ),
            (
                "version = \"v\"\n[breaker]\nfailures_to_open = 0",
                "policy.breaker.failures_to_open: must be at least 1",
            ),
            (
                "version = \"v\"\n[latency]\nbudget_ms = 0",
                "policy.latency.budget_ms: must be at least 1",
            ),
            (
                "version = \"v\"\n[apps.a]\nlatency_budget_ms = 0",
                "policy.apps.a.latency_budget_ms: must be at least 1",
            ),
            (
                "version = \"v\"\n[apps.a]\nprivat = true",
                "unknown field `privat`",
            ),
            (
                "version = \"v\"\n[privacy]\ndetectors = [\"email\", \"email\"]",
                "policy.privacy.detectors[1]: is listed twice",
            ),
            (
                "version = \"v\"\n[privacy]\ndetectors = [\"fingerprint\"]",
                "unknown variant `fingerprint`",
            ),
            (
                "version = \"v\"\n[privacy]\nkeywords = [\"ok\", \"  \"]",
                "policy.privacy.keywords[1]: must not be empty",
            ),
            (
                "version = \"v\"\n[privacy.classes]\nkeyword = [\"x\"]",
                "class name \"keyword\"",
            ),
            (
                "version = \"v\"\n[privacy.classes]\nhealth = []",
                "policy.privacy.classes.health: must list at least one keyword",
            ),
            (
                "version = \"v\"\n[[privacy.national_ids]]\nname = \"a\"\npattern = '\\d'\n[[privacy.national_ids]]\nname = \"b\"\npattern = '('",
                "policy.privacy.national_ids[1].pattern \"(\": regex parse error: unclosed group",
            ),
            (
                "version = \"v\"\n[[privacy.national_ids]]\nname = \"a\"\npattern = '\\d*'",
                "policy.privacy.national_ids[0].pattern \"\\\\d*\": matches the empty string",
            ),
            (
                "version = \"v\"\n[[privacy.national_ids]]\nname = \"a b\"\npattern = '\\d'",
                "policy.privacy.national_ids[0].name: \"a b\" must be",
            ),
            (
                "version = \"v\"\n[[privacy.national_ids]]\nname = \"a\"\npattern = '\\d'\n[[privacy.national_ids]]\nname = \"a\"\npattern = '\\d\\d'",
                "policy.privacy.national_ids[1].name: \"a\" is used twice",
            ),
            (
                "version = \"v\"\n[capability]\nfleet_intents = [\"\"]",
                "policy.capability.fleet_intents[0]: must not be empty",
            ),
        ];
        for (text, want) in cases {
            let err = Policy::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}:\n got  {err}\n want {want}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn compiled_policy_validates_a_hand_built_policy() {
        let mut p = Policy::default();
        p.confidence.min_margin = f32::NAN;
        assert!(CompiledPolicy::new(p).is_err());
    }

    #[test]
    fn local_intents_match_labels_and_prefixes() {
        let c = CapabilityPolicy {
            local_intents: vec!["Hass*".into(), "GetTime".into()],
            ..CapabilityPolicy::default()
        };
        assert!(c.is_local_intent("HassTurnOn"));
        assert!(c.is_local_intent("GetTime"));
        assert!(!c.is_local_intent("GetTimer"));
        assert!(!c.is_local_intent("StrataFleetQuery"));
        let bad = "version = \"x\"\n[capability]\nlocal_intents = [\"*\"]\n";
        let e = Policy::from_toml(bad).unwrap_err().to_string();
        assert!(e.contains("policy.capability.local_intents[0]"), "{e}");
    }
}
