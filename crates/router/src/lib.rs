//! Routing decisions for inference requests, pure: for each chat, completion
//! or embedding request the edge agent receives, decide whether the device's
//! local micro model answers it, the hub's macro model does, or nobody does
//! (a refusal with an HTTP status), and say why in reasons that carry their
//! facts.
//!
//! It is not the HTTP layer, the model runtime or the hub link: the agent
//! describes the request ([`Request`]: the text that would leave the device,
//! token counts, tools, the local intent model's view) and the live state
//! ([`LiveState`]: which tiers are up, the hub link, the circuit breaker,
//! today's spend), calls [`decide()`], and acts on the [`Decision`]. No I/O, no
//! clock (time comes in as `now_ms`), no environment variables, and no
//! request text in any reason, error or `Display` output: reasons name data
//! *classes* ("email", "keyword:health"), never what matched.
//!
//! Start reading at [`decide()`] (the order of the checks is in the
//! [`decide` module](mod@decide) documentation), then [`Policy`] for what
//! operators configure (with [`EXAMPLE_POLICY`]) and [`PrivacyClassifier`]
//! for what counts as private. [`Breaker`] and [`LatencyModel`] are the
//! small state machines whose snapshots the agent puts into [`LiveState`].
//!
//! ```
//! use router::{
//!     BreakerState, CompiledPolicy, Confidence, Kind, LiveState, Policy, Request, Tier,
//!     TierState, decide, escalate,
//! };
//!
//! let policy = CompiledPolicy::new(Policy::from_toml(router::EXAMPLE_POLICY)?)?;
//! let tier = |context_tokens| TierState {
//!     available: true,
//!     context_tokens,
//!     supports_tools: false,
//!     latency_ms: None,
//! };
//! let state = LiveState {
//!     local: tier(4096),
//!     remote: tier(32_768),
//!     hub_connected: true,
//!     breaker: BreakerState::Closed,
//!     spent_today_usd: 0.0,
//! };
//! let mut req = Request {
//!     kind: Kind::Chat,
//!     text: "what is the tallest mountain in Europe?",
//!     app: None,
//!     mode: None,
//!     caller_private: false,
//!     prompt_tokens: 12,
//!     max_tokens: 64,
//!     needs_tools: false,
//!     intent: None,
//!     latency_budget_ms: None,
//! };
//! let unsure = Confidence::MeanLogprob(-2.3);
//!
//! let decision = decide(&req, &policy, &state);
//! assert_eq!(decision.tier(), Some(Tier::Local));
//! // The local answer came back unsure: it escalates, once.
//! let escalated = escalate(&decision, unsure, &req, &policy, &state).unwrap();
//! assert_eq!(escalated.tier(), Some(Tier::Macro));
//! assert!(escalate(&escalated, unsure, &req, &policy, &state).is_none());
//!
//! // Private data stays on the device, however unsure the local answer.
//! req.text = "is my card 4111 1111 1111 1111 still valid?";
//! let decision = decide(&req, &policy, &state);
//! assert_eq!(decision.tier(), Some(Tier::Local));
//! assert_eq!(decision.data_classes()[0].name(), "payment_card");
//! assert!(escalate(&decision, unsure, &req, &policy, &state).is_none());
//! # Ok::<(), router::Error>(())
//! ```
//!
//! # Guarantees
//!
//! - **Privacy fails closed.** A request that the classifier flags, that the
//!   caller marks private, or that comes from an app the policy marks
//!   private is answered locally or refused; no mode, fault or confidence
//!   makes it a [`Decision::Macro`], and [`escalate`] re-checks privacy
//!   itself rather than trusting the decision it is given.
//! - **At most one escalation.** [`escalate`] accepts only a local decision
//!   that carries a [`Cascade`] and returns only [`Decision::Macro`], which it
//!   does not accept.
//! - **No panics on any input.** The detectors scan bytes with checked
//!   indices; property tests feed them arbitrary text.

pub mod breaker;
pub mod decide;
pub mod latency;
pub mod policy;
pub mod privacy;

pub use breaker::{Breaker, BreakerState};
pub use decide::{
    Cascade, Confidence, ConfidenceMeasure, Decision, Intent, Kind, LiveState, ModeSource, Reason,
    Refusal, Request, Tier, TierState, cost_usd, decide, escalate,
};
pub use latency::LatencyModel;
pub use policy::{
    AppPolicy, BreakerPolicy, CapabilityPolicy, CompiledPolicy, ConfidencePolicy, CostPolicy,
    Detector, EXAMPLE_POLICY, LatencyPolicy, Mode, NationalIdPattern, Policy, PrivacyPolicy,
};
pub use privacy::{DataClass, PrivacyClassifier};

/// Errors of policy parsing and validation, and of parsing the crate's
/// names (modes, data classes).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The policy is not valid TOML or does not have the policy's shape
    /// (an unknown field, a wrong type, a missing `version`).
    #[error("{at}: {message}")]
    Parse {
        /// Where: `policy line L column C`, or `policy` when unknown.
        at: String,
        /// What the TOML parser said.
        message: String,
    },
    /// A policy field has a value outside what it allows.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field's path, such as `policy.confidence.min_margin`.
        field: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A national-id pattern is not a usable regular expression.
    #[error("{field} {pattern:?}: {reason}")]
    Regex {
        /// The field's path, such as `policy.privacy.national_ids[1].pattern`.
        field: String,
        /// The pattern as given.
        pattern: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A routing mode name is not one of the four.
    #[error("unknown mode {0:?}: expected only_local, prefer_local, prefer_macro or only_macro")]
    UnknownMode(String),
    /// A data-class name does not parse.
    #[error(
        "unknown data class {0:?}: expected email, phone, payment_card, iban, keyword, national_id:NAME or keyword:NAME"
    )]
    UnknownDataClass(String),
    /// A latency smoothing factor is outside `(0, 1]`.
    #[error("latency smoothing factor {0} must be greater than 0 and at most 1")]
    Smoothing(f64),
}
