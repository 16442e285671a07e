//! The routing decision: [`decide`] a request's tier, and [`escalate`] a
//! local answer whose confidence is too low.
//!
//! # Decision order
//!
//! The first step that settles the request wins; every decision lists the
//! [`Reason`]s that led to it.
//!
//! 1. **Privacy** (hard, fails closed). The text holds a data class the
//!    [`crate::PrivacyClassifier`] finds, the caller marked the request
//!    private, or the app is private: the request stays on the device. It
//!    is answered locally when the local tier is available and fits it
//!    (context, tools), without a cascade; otherwise it is refused:
//!    [`Refusal::TooLong`] when it exceeds the local context,
//!    [`Refusal::PrivateLocalUnavailable`] when the local tier is down or
//!    lacks tools, and [`Refusal::PolicyForbids`] in mode `only_macro`.
//! 2. **Mode** `only_local` and `only_macro` (hard). `only_local`: local, or
//!    refused ([`Refusal::LocalUnavailable`], [`Refusal::TooLong`]).
//!    `only_macro`: macro when the hub is connected, the breaker is not
//!    open, the macro tier is available and fits, and the cost budget has
//!    room; else refused ([`Refusal::MacroUnavailable`],
//!    [`Refusal::TooLong`], [`Refusal::BudgetExhausted`]), never answered
//!    locally.
//! 3. **Capability** (`prefer_*` from here on). The local tier is down, the
//!    request exceeds its context or needs tools it lacks, or the intent
//!    model sees a fleet intent (a label in `fleet_intents` with a margin of
//!    at least `min_intent_margin`): macro, if it can be had, without a
//!    local fallback. Otherwise refused: [`Refusal::TooLong`] when the
//!    request is too long for the local tier, else as in `only_macro`.
//! 4. **Connectivity**. The hub is unreachable, the breaker is open, or the
//!    macro tier is down or does not fit the request: local.
//! 5. **Cost**. The daily macro budget is spent, or this request would
//!    overspend it (prompt plus `max_tokens` at the macro price): local.
//! 6. **Latency**. A budget is set (request, else app, else policy), the
//!    preferred tier's estimate exceeds it and the other tier's fits it: the
//!    other tier (and no cascade).
//! 7. **Preference**. `prefer_macro`: macro, with a local fallback should the
//!    macro call fail. `prefer_local`: local, with a [`Cascade`] when the
//!    policy enables it, except for a device command (a `local_intents`
//!    label with at least `min_intent_margin`), which the device handles
//!    and the macro model could not act on either. Embeddings never cascade and never fall back, since
//!    vectors from two different models do not mix.
//!
//! Every `prefer_*` decision from step 4 on has a tier that can serve the
//! request, and none depends on the order of the checks within a step.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;
use crate::policy::{AppPolicy, CompiledPolicy, Mode, Policy};
use crate::privacy::DataClass;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A chat completion.
    Chat,
    /// A text completion.
    Completion,
    /// Embeddings; they never cascade and never fall back to another tier.
    Embedding,
}

/// The local intent model's view of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intent<'a> {
    /// The top label.
    pub label: &'a str,
    /// The top-1 minus top-2 probability.
    pub margin: f32,
}

/// What the router knows about a request. It borrows the request's text
/// for classification and keeps none of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request<'a> {
    /// What the request asks for.
    pub kind: Kind,
    /// All the text that would leave the device (messages, prompt, inputs,
    /// tool definitions), for the privacy classifier.
    pub text: &'a str,
    /// The app the request comes from, if it says.
    pub app: Option<&'a str>,
    /// A mode named in the request; it wins over the app's and the
    /// policy's.
    pub mode: Option<Mode>,
    /// The caller marked the request private.
    pub caller_private: bool,
    /// Prompt tokens, counted with the local tokenizer.
    pub prompt_tokens: u32,
    /// Completion tokens asked for (0 for embeddings).
    pub max_tokens: u32,
    /// The request carries tools or function definitions.
    pub needs_tools: bool,
    /// The local intent model's view, when it ran.
    pub intent: Option<Intent<'a>>,
    /// A latency budget named in the request, in milliseconds; else the
    /// app's, else the policy's.
    pub latency_budget_ms: Option<u64>,
}

/// What a tier can do right now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TierState {
    /// A model of this tier is loaded and serving.
    pub available: bool,
    /// Its context window, in tokens (prompt plus completion).
    pub context_tokens: u32,
    /// It accepts tool and function definitions.
    pub supports_tools: bool,
    /// Its estimated latency for this request in milliseconds (from its
    /// [`crate::LatencyModel`]), when known.
    pub latency_ms: Option<f64>,
}

/// The live state a decision depends on, snapshotted by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// The device's micro tier.
    pub local: TierState,
    /// The hub's macro tier, as last reported.
    pub remote: TierState,
    /// The agent's link to the hub is up.
    pub hub_connected: bool,
    /// The macro tier's circuit breaker ([`crate::Breaker::state`]).
    pub breaker: BreakerState,
    /// Macro spend so far today, in USD.
    pub spent_today_usd: f64,
}

/// A tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The device's micro model.
    Local,
    /// The hub's macro model.
    Macro,
}

impl Tier {
    /// The tier's name: `local` or `macro`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Macro => "macro",
        }
    }

    fn other(self) -> Tier {
        match self {
            Tier::Local => Tier::Macro,
            Tier::Macro => Tier::Local,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request's mode came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeSource {
    /// The request named it.
    Request,
    /// The app's policy set it.
    App,
    /// The policy's `default_mode`.
    Policy,
}

impl fmt::Display for ModeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModeSource::Request => "request",
            ModeSource::App => "app",
            ModeSource::Policy => "policy",
        })
    }
}

/// A confidence measure of a local answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceMeasure {
    /// The mean log-probability of the generated tokens.
    MeanLogprob,
    /// A classifier's top-1 minus top-2 probability.
    Margin,
}

impl fmt::Display for ConfidenceMeasure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfidenceMeasure::MeanLogprob => "mean log-probability",
            ConfidenceMeasure::Margin => "margin",
        })
    }
}

/// How confident the local model was in its answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Confidence {
    /// The mean log-probability of the generated tokens (at most 0).
    MeanLogprob(f32),
    /// A classifier's top-1 minus top-2 probability (0 to 1).
    Margin(f32),
}

/// The thresholds under which a local answer escalates to the macro tier,
/// from the policy's `[confidence]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cascade {
    /// A generation whose mean log-probability is below this escalates.
    pub min_mean_logprob: f32,
    /// A classification whose margin is below this escalates.
    pub min_margin: f32,
}

/// Why a request is refused; each maps to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A private request that the local tier cannot serve right now (down,
    /// or without tools): 503.
    PrivateLocalUnavailable,
    /// The local tier cannot serve an `only_local` request right now: 503.
    LocalUnavailable,
    /// The macro tier is needed and cannot be had (hub unreachable, breaker
    /// open, tier down or without tools): 503.
    MacroUnavailable,
    /// The policy forbids it (a private request in mode `only_macro`): 403.
    PolicyForbids,
    /// The request exceeds the context of every tier it may use: 413.
    TooLong,
    /// The macro tier is needed and the daily budget cannot pay for it: 429,
    /// which OpenAI clients understand as "quota exceeded" (OpenAI answers
    /// an exhausted quota with 429 `insufficient_quota`), where 402 would
    /// be unknown to them.
    BudgetExhausted,
}

impl Refusal {
    /// The HTTP status to answer with.
    pub fn http_status(self) -> u16 {
        match self {
            Refusal::PrivateLocalUnavailable
            | Refusal::LocalUnavailable
            | Refusal::MacroUnavailable => 503,
            Refusal::PolicyForbids => 403,
            Refusal::TooLong => 413,
            Refusal::BudgetExhausted => 429,
        }
    }

    /// A stable snake_case code, for error bodies and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::PrivateLocalUnavailable => "private_local_unavailable",
            Refusal::LocalUnavailable => "local_unavailable",
            Refusal::MacroUnavailable => "macro_unavailable",
            Refusal::PolicyForbids => "policy_forbids",
            Refusal::TooLong => "too_long",
            Refusal::BudgetExhausted => "budget_exhausted",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::PrivateLocalUnavailable => {
                "the request is private and the local model cannot serve it now"
            }
            Refusal::LocalUnavailable => "the local model cannot serve the request now",
            Refusal::MacroUnavailable => "the macro model is needed and cannot be reached now",
            Refusal::PolicyForbids => "the routing policy forbids this request",
            Refusal::TooLong => "the request is too long for every model it may use",
            Refusal::BudgetExhausted => "the daily macro budget is spent",
        })
    }
}

/// Why a decision was made. Each reason carries its facts; none carries
/// request text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    /// The privacy classifier found these data classes.
    Private {
        /// The classes found.
        classes: Vec<DataClass>,
    },
    /// The caller marked the request private.
    CallerPrivate,
    /// The app's requests are all private.
    AppPrivate {
        /// The app.
        app: String,
    },
    /// The request's mode.
    Mode {
        /// The mode.
        mode: Mode,
        /// Where it came from.
        source: ModeSource,
    },
    /// The request exceeds a tier's context.
    ContextTooLong {
        /// The tier.
        tier: Tier,
        /// Prompt plus completion tokens.
        needed_tokens: u32,
        /// The tier's context.
        limit_tokens: u32,
    },
    /// The request uses tools the tier does not support.
    NeedsTools {
        /// The tier.
        tier: Tier,
    },
    /// The intent model says the request needs fleet-wide data.
    FleetData {
        /// The intent label.
        intent: String,
        /// The intent model's margin.
        margin: f32,
    },
    /// The intent model reads the request as a device command the device
    /// handles itself.
    LocalIntent {
        /// The intent label.
        intent: String,
        /// The intent model's margin.
        margin: f32,
    },
    /// The agent's link to the hub is down.
    HubUnreachable,
    /// The macro tier's circuit breaker is open.
    BreakerOpen {
        /// Milliseconds until it lets a probe through.
        retry_in_ms: u64,
    },
    /// A tier has no model serving.
    TierUnavailable {
        /// The tier.
        tier: Tier,
    },
    /// A tier's latency estimate exceeds the request's budget.
    LatencyBudget {
        /// The tier.
        tier: Tier,
        /// Its estimate.
        estimate_ms: f64,
        /// The budget.
        budget_ms: u64,
    },
    /// A tier's latency estimate fits the request's budget where the
    /// preferred tier's does not.
    Faster {
        /// The tier.
        tier: Tier,
        /// Its estimate.
        estimate_ms: f64,
    },
    /// The daily macro budget cannot pay for the request.
    CostBudget {
        /// Spent so far today.
        spent_usd: f64,
        /// The daily budget.
        budget_usd: f64,
    },
    /// The local answer's confidence is below the policy's threshold.
    LowConfidence {
        /// What was measured.
        measure: ConfidenceMeasure,
        /// The measurement.
        value: f32,
        /// The threshold it is below.
        threshold: f32,
    },
}

impl Reason {
    /// A stable snake_case code (also the `code` tag of the serialised
    /// reason).
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Private { .. } => "private",
            Reason::CallerPrivate => "caller_private",
            Reason::AppPrivate { .. } => "app_private",
            Reason::Mode { .. } => "mode",
            Reason::ContextTooLong { .. } => "context_too_long",
            Reason::NeedsTools { .. } => "needs_tools",
            Reason::FleetData { .. } => "fleet_data",
            Reason::LocalIntent { .. } => "local_intent",
            Reason::HubUnreachable => "hub_unreachable",
            Reason::BreakerOpen { .. } => "breaker_open",
            Reason::TierUnavailable { .. } => "tier_unavailable",
            Reason::LatencyBudget { .. } => "latency_budget",
            Reason::Faster { .. } => "faster",
            Reason::CostBudget { .. } => "cost_budget",
            Reason::LowConfidence { .. } => "low_confidence",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Private { classes } => {
                f.write_str("the request contains private data (")?;
                for (i, class) in classes.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{class}")?;
                }
                f.write_str(")")
            }
            Reason::CallerPrivate => f.write_str("the caller marked the request private"),
            Reason::AppPrivate { app } => write!(f, "every request of app {app:?} is private"),
            Reason::Mode { mode, source } => write!(f, "mode {mode}, set by the {source}"),
            Reason::ContextTooLong {
                tier,
                needed_tokens,
                limit_tokens,
            } => write!(
                f,
                "the request needs {needed_tokens} tokens and the {tier} context holds {limit_tokens}"
            ),
            Reason::NeedsTools { tier } => {
                write!(f, "the request uses tools and the {tier} model has none")
            }
            Reason::FleetData { intent, margin } => write!(
                f,
                "intent {intent:?} (margin {margin:.2}) needs fleet-wide data"
            ),
            Reason::LocalIntent { intent, margin } => write!(
                f,
                "intent {intent:?} (margin {margin:.2}) is a device command, served here"
            ),
            Reason::HubUnreachable => f.write_str("the hub is unreachable"),
            Reason::BreakerOpen { retry_in_ms } => write!(
                f,
                "the macro circuit breaker is open for {retry_in_ms} ms more"
            ),
            Reason::TierUnavailable { tier } => write!(f, "the {tier} model is unavailable"),
            Reason::LatencyBudget {
                tier,
                estimate_ms,
                budget_ms,
            } => write!(
                f,
                "the {tier} model's estimated {estimate_ms:.0} ms exceed the {budget_ms} ms budget"
            ),
            Reason::Faster { tier, estimate_ms } => write!(
                f,
                "the {tier} model's estimated {estimate_ms:.0} ms fit the budget"
            ),
            Reason::CostBudget {
                spent_usd,
                budget_usd,
            } => write!(
                f,
                "the daily macro budget cannot pay for the request ({spent_usd:.4} of {budget_usd:.4} USD spent)"
            ),
            Reason::LowConfidence {
                measure,
                value,
                threshold,
            } => write!(
                f,
                "the local answer's {measure} {value:.3} is below {threshold:.3}"
            ),
        }
    }
}

/// Where a request goes, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Decision {
    /// Answer with the local micro model.
    Local {
        /// Why.
        reasons: Vec<Reason>,
        /// When set, the local answer may still escalate: pass its
        /// confidence to [`escalate`].
        cascade: Option<Cascade>,
    },
    /// Send to the hub's macro model.
    Macro {
        /// Why.
        reasons: Vec<Reason>,
        /// If the macro call fails, answering locally is allowed. Never for
        /// private requests (they never get here), `only_macro`, requests
        /// only the macro tier can serve, or embeddings.
        fallback_local: bool,
    },
    /// Refuse the request.
    Refuse {
        /// Why.
        reasons: Vec<Reason>,
        /// The refusal, with its HTTP status.
        refusal: Refusal,
    },
}

impl Decision {
    /// The tier that answers, `None` for a refusal.
    pub fn tier(&self) -> Option<Tier> {
        match self {
            Decision::Local { .. } => Some(Tier::Local),
            Decision::Macro { .. } => Some(Tier::Macro),
            Decision::Refuse { .. } => None,
        }
    }

    /// The reasons, in the order the checks made them.
    pub fn reasons(&self) -> &[Reason] {
        match self {
            Decision::Local { reasons, .. }
            | Decision::Macro { reasons, .. }
            | Decision::Refuse { reasons, .. } => reasons,
        }
    }

    /// The data classes the privacy classifier found (empty when none).
    pub fn data_classes(&self) -> &[DataClass] {
        self.reasons()
            .iter()
            .find_map(|r| match r {
                Reason::Private { classes } => Some(classes.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The refusal, for a refused request.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Decision::Refuse { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }
}

/// What `tokens` tokens cost on `tier` under `policy`, in USD.
pub fn cost_usd(policy: &Policy, tier: Tier, tokens: u32) -> f64 {
    let per_1k = match tier {
        Tier::Local => policy.cost.local_usd_per_1k_tokens,
        Tier::Macro => policy.cost.macro_usd_per_1k_tokens,
    };
    per_1k * f64::from(tokens) / 1000.0
}

/// What a decision needs to know about the request under the policy.
struct Context<'r, 'p> {
    req: &'r Request<'r>,
    policy: &'p Policy,
    state: &'r LiveState,
    app: Option<(&'r str, &'p AppPolicy)>,
    mode: Mode,
    source: ModeSource,
    needed_tokens: u32,
}

impl<'r, 'p> Context<'r, 'p> {
    fn new(req: &'r Request<'r>, policy: &'p Policy, state: &'r LiveState) -> Self {
        let app = req
            .app
            .and_then(|name| policy.apps.get(name).map(|a| (name, a)));
        let (mode, source) = match (req.mode, app.and_then(|(_, a)| a.mode)) {
            (Some(m), _) => (m, ModeSource::Request),
            (None, Some(m)) => (m, ModeSource::App),
            (None, None) => (policy.default_mode, ModeSource::Policy),
        };
        Context {
            req,
            policy,
            state,
            app,
            mode,
            source,
            needed_tokens: req.prompt_tokens.saturating_add(req.max_tokens),
        }
    }

    /// The reasons that make the request private; empty when it is not.
    fn private_reasons(&self, classes: Vec<DataClass>) -> Vec<Reason> {
        let mut reasons = Vec::new();
        if !classes.is_empty() {
            reasons.push(Reason::Private { classes });
        }
        if self.req.caller_private {
            reasons.push(Reason::CallerPrivate);
        }
        if let Some((name, app)) = self.app
            && app.private
        {
            reasons.push(Reason::AppPrivate {
                app: name.to_owned(),
            });
        }
        reasons
    }

    fn mode_reason(&self) -> Reason {
        Reason::Mode {
            mode: self.mode,
            source: self.source,
        }
    }

    /// Why `tier` cannot serve the request, if it cannot.
    fn unfit(&self, tier: Tier) -> Option<Reason> {
        let t = match tier {
            Tier::Local => &self.state.local,
            Tier::Macro => &self.state.remote,
        };
        if !t.available {
            Some(Reason::TierUnavailable { tier })
        } else if self.needed_tokens > t.context_tokens {
            Some(Reason::ContextTooLong {
                tier,
                needed_tokens: self.needed_tokens,
                limit_tokens: t.context_tokens,
            })
        } else if self.req.needs_tools && !t.supports_tools {
            Some(Reason::NeedsTools { tier })
        } else {
            None
        }
    }

    /// Why the macro tier cannot be used right now, if it cannot: the hub
    /// link, the breaker, the tier itself, the cost budget.
    fn macro_blocked(&self) -> Option<Reason> {
        if !self.state.hub_connected {
            return Some(Reason::HubUnreachable);
        }
        if let BreakerState::Open { retry_in_ms } = self.state.breaker {
            return Some(Reason::BreakerOpen { retry_in_ms });
        }
        if let Some(reason) = self.unfit(Tier::Macro) {
            return Some(reason);
        }
        let budget_usd = self.policy.cost.daily_budget_usd?;
        let spent_usd = self.state.spent_today_usd;
        let cost = cost_usd(self.policy, Tier::Macro, self.needed_tokens);
        // A spend that is not a number cannot be shown to be within budget.
        let within =
            spent_usd.is_finite() && spent_usd < budget_usd && spent_usd + cost <= budget_usd;
        (!within).then_some(Reason::CostBudget {
            spent_usd,
            budget_usd,
        })
    }

    fn latency_budget_ms(&self) -> Option<u64> {
        self.req
            .latency_budget_ms
            .or(self.app.and_then(|(_, a)| a.latency_budget_ms))
            .or(self.policy.latency.budget_ms)
    }

    fn estimate_ms(&self, tier: Tier) -> Option<f64> {
        let t = match tier {
            Tier::Local => &self.state.local,
            Tier::Macro => &self.state.remote,
        };
        t.latency_ms.filter(|ms| ms.is_finite() && *ms >= 0.0)
    }

    fn fleet_intent(&self) -> Option<Reason> {
        let intent = self.req.intent?;
        let capability = &self.policy.capability;
        let fleet = capability.fleet_intents.iter().any(|l| l == intent.label)
            && intent.margin >= capability.min_intent_margin;
        fleet.then(|| Reason::FleetData {
            intent: intent.label.to_owned(),
            margin: intent.margin,
        })
    }

    fn local_intent(&self) -> Option<Reason> {
        let intent = self.req.intent?;
        let capability = &self.policy.capability;
        (capability.is_local_intent(intent.label) && intent.margin >= capability.min_intent_margin)
            .then(|| Reason::LocalIntent {
                intent: intent.label.to_owned(),
                margin: intent.margin,
            })
    }

    fn embedding(&self) -> bool {
        self.req.kind == Kind::Embedding
    }

    fn cascade(&self) -> Option<Cascade> {
        let c = &self.policy.confidence;
        (c.cascade && !self.embedding()).then_some(Cascade {
            min_mean_logprob: c.min_mean_logprob,
            min_margin: c.min_margin,
        })
    }
}

fn refuse(mut reasons: Vec<Reason>, last: Reason, refusal: Refusal) -> Decision {
    reasons.push(last);
    Decision::Refuse { reasons, refusal }
}

/// The refusal for a request that needs the macro tier when `blocked` says
/// why it cannot have it.
fn macro_refusal(blocked: &Reason) -> Refusal {
    match blocked {
        Reason::ContextTooLong { .. } => Refusal::TooLong,
        Reason::CostBudget { .. } => Refusal::BudgetExhausted,
        _ => Refusal::MacroUnavailable,
    }
}

/// Decides where `req` goes; see the [module documentation](self) for the
/// order of the checks. Runs the policy's privacy classifier on
/// `req.text`.
pub fn decide(req: &Request<'_>, policy: &CompiledPolicy, state: &LiveState) -> Decision {
    let cx = Context::new(req, policy.policy(), state);

    // 1. Privacy.
    let mut reasons = cx.private_reasons(policy.classifier().classify(req.text));
    if !reasons.is_empty() {
        if cx.mode == Mode::OnlyMacro {
            return refuse(reasons, cx.mode_reason(), Refusal::PolicyForbids);
        }
        return match cx.unfit(Tier::Local) {
            None => Decision::Local {
                reasons,
                cascade: None,
            },
            Some(r @ Reason::ContextTooLong { .. }) => refuse(reasons, r, Refusal::TooLong),
            Some(r) => refuse(reasons, r, Refusal::PrivateLocalUnavailable),
        };
    }

    // 2. Hard modes.
    reasons.push(cx.mode_reason());
    match cx.mode {
        Mode::OnlyLocal => {
            return match cx.unfit(Tier::Local) {
                None => Decision::Local {
                    reasons,
                    cascade: None,
                },
                Some(r @ Reason::ContextTooLong { .. }) => refuse(reasons, r, Refusal::TooLong),
                Some(r) => refuse(reasons, r, Refusal::LocalUnavailable),
            };
        }
        Mode::OnlyMacro => {
            return match cx.macro_blocked() {
                None => Decision::Macro {
                    reasons,
                    fallback_local: false,
                },
                Some(r) => {
                    let refusal = macro_refusal(&r);
                    refuse(reasons, r, refusal)
                }
            };
        }
        Mode::PreferLocal | Mode::PreferMacro => {}
    }

    // 3. Capability: what only the macro tier can serve.
    let local_unfit = cx.unfit(Tier::Local);
    let too_long_locally = matches!(local_unfit, Some(Reason::ContextTooLong { .. }));
    let needs: Vec<Reason> = local_unfit.into_iter().chain(cx.fleet_intent()).collect();
    let blocked = cx.macro_blocked();
    if !needs.is_empty() {
        reasons.extend(needs);
        return match blocked {
            None => Decision::Macro {
                reasons,
                fallback_local: false,
            },
            Some(r) => {
                let refusal = if too_long_locally {
                    Refusal::TooLong
                } else {
                    macro_refusal(&r)
                };
                refuse(reasons, r, refusal)
            }
        };
    }

    // 4 and 5. Connectivity and cost: the local tier serves what the macro
    // tier cannot have.
    if let Some(r) = blocked {
        reasons.push(r);
        return Decision::Local {
            reasons,
            cascade: None,
        };
    }

    // 6. Latency.
    let preferred = if cx.mode == Mode::PreferMacro {
        Tier::Macro
    } else {
        Tier::Local
    };
    if let Some(budget_ms) = cx.latency_budget_ms()
        && let Some(preferred_ms) = cx.estimate_ms(preferred)
        && let Some(other_ms) = cx.estimate_ms(preferred.other())
        && preferred_ms > budget_ms as f64
        && other_ms <= budget_ms as f64
    {
        let other = preferred.other();
        reasons.push(Reason::LatencyBudget {
            tier: preferred,
            estimate_ms: preferred_ms,
            budget_ms,
        });
        reasons.push(Reason::Faster {
            tier: other,
            estimate_ms: other_ms,
        });
        return match other {
            Tier::Local => Decision::Local {
                reasons,
                cascade: None,
            },
            Tier::Macro => Decision::Macro {
                reasons,
                fallback_local: !cx.embedding(),
            },
        };
    }

    // 7. Preference. A device command stays here without the cascade.
    match preferred {
        Tier::Macro => Decision::Macro {
            reasons,
            fallback_local: !cx.embedding(),
        },
        Tier::Local => match cx.local_intent() {
            Some(reason) => {
                reasons.push(reason);
                Decision::Local {
                    reasons,
                    cascade: None,
                }
            }
            None => Decision::Local {
                reasons,
                cascade: cx.cascade(),
            },
        },
    }
}

/// Escalates a local answer to the macro tier when its confidence is below
/// the cascade's threshold: `Some(Decision::Macro { .. })` with the
/// decision's reasons and [`Reason::LowConfidence`], and a local fallback
/// (the local answer is at hand), or `None` to keep the local answer.
///
/// It escalates only a [`Decision::Local`] that carries a [`Cascade`], only
/// when the measure is below its threshold (a NaN is not), and only when
/// the macro tier is allowed right now: it re-checks privacy itself (the
/// classifier, the caller's and the app's marks), the mode (not
/// `only_local`), the kind (not an embedding), the hub link, the breaker,
/// the macro tier's fit and the cost budget against `state`.
///
/// A request cannot escalate twice: this function accepts only a local
/// decision and returns only a macro one, which it does not accept.
pub fn escalate(
    decision: &Decision,
    confidence: Confidence,
    req: &Request<'_>,
    policy: &CompiledPolicy,
    state: &LiveState,
) -> Option<Decision> {
    let Decision::Local {
        reasons,
        cascade: Some(cascade),
    } = decision
    else {
        return None;
    };
    let (measure, value, threshold) = match confidence {
        Confidence::MeanLogprob(v) => (ConfidenceMeasure::MeanLogprob, v, cascade.min_mean_logprob),
        Confidence::Margin(v) => (ConfidenceMeasure::Margin, v, cascade.min_margin),
    };
    if value.is_nan() || value >= threshold {
        return None;
    }
    let cx = Context::new(req, policy.policy(), state);
    if cx.embedding()
        || cx.mode == Mode::OnlyLocal
        || !cx
            .private_reasons(policy.classifier().classify(req.text))
            .is_empty()
        || cx.macro_blocked().is_some()
    {
        return None;
    }
    let mut reasons = reasons.clone();
    reasons.push(Reason::LowConfidence {
        measure,
        value,
        threshold,
    });
    Some(Decision::Macro {
        reasons,
        fallback_local: true,
    })
}

#[cfg(test)]
mod tests;
