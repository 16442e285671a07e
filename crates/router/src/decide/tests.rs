use super::*;
use crate::policy::{AppPolicy, CompiledPolicy, Policy};
use proptest::prelude::*;

/// A request, the live state and the policy, each case changing a few.
struct Setup {
    req: Request<'static>,
    state: LiveState,
    policy: Policy,
}

fn setup() -> Setup {
    let mut policy = Policy::default();
    let app = |mode, latency_budget_ms, private| AppPolicy {
        mode,
        latency_budget_ms,
        private,
    };
    policy
        .apps
        .insert("notes".to_owned(), app(None, None, true));
    policy.apps.insert(
        "fleet".to_owned(),
        app(Some(Mode::PreferMacro), None, false),
    );
    policy
        .apps
        .insert("voice".to_owned(), app(None, Some(500), false));
    policy.cost.daily_budget_usd = Some(1.0);
    Setup {
        req: Request {
            kind: Kind::Chat,
            text: "turn on the kitchen lights",
            app: None,
            mode: None,
            caller_private: false,
            prompt_tokens: 20,
            max_tokens: 50,
            needs_tools: false,
            intent: None,
            latency_budget_ms: None,
        },
        state: LiveState {
            local: TierState {
                available: true,
                context_tokens: 2048,
                supports_tools: false,
                latency_ms: Some(300.0),
            },
            remote: TierState {
                available: true,
                context_tokens: 32_768,
                supports_tools: true,
                latency_ms: Some(800.0),
            },
            hub_connected: true,
            breaker: BreakerState::Closed,
            spent_today_usd: 0.0,
        },
        policy,
    }
}

fn outcome(d: &Decision) -> String {
    match d {
        Decision::Local {
            cascade: Some(_), ..
        } => "local+cascade".to_owned(),
        Decision::Local { .. } => "local".to_owned(),
        Decision::Macro {
            fallback_local: true,
            ..
        } => "macro+fallback".to_owned(),
        Decision::Macro { .. } => "macro".to_owned(),
        Decision::Refuse { refusal, .. } => format!("refuse:{}", refusal.code()),
    }
}

fn codes(d: &Decision) -> Vec<&'static str> {
    d.reasons().iter().map(Reason::code).collect()
}

const FLEET: Intent<'static> = Intent {
    label: "StrataFleetQuery",
    margin: 0.8,
};

type Case = (
    &'static str,
    fn(&mut Setup),
    &'static str,
    &'static [&'static str],
);

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Step 7: preference.
    ("prefer_local answers locally with a cascade", |_| {}, "local+cascade", &["mode"]),
    ("embeddings never cascade", |s| { s.req.kind = Kind::Embedding; s.req.max_tokens = 0 }, "local", &["mode"]),
    ("no cascade when the policy turns it off", |s| s.policy.confidence.cascade = false, "local", &["mode"]),
    ("prefer_macro goes to macro with a local fallback", |s| s.req.mode = Some(Mode::PreferMacro), "macro+fallback", &["mode"]),
    ("prefer_macro embeddings do not fall back", |s| { s.req.mode = Some(Mode::PreferMacro); s.req.kind = Kind::Embedding }, "macro", &["mode"]),
    ("the app's mode applies", |s| s.req.app = Some("fleet"), "macro+fallback", &["mode"]),
    ("the request's mode wins over the app's", |s| { s.req.app = Some("fleet"); s.req.mode = Some(Mode::PreferLocal) }, "local+cascade", &["mode"]),
    ("an unknown app gets the policy's mode", |s| s.req.app = Some("nobody"), "local+cascade", &["mode"]),
    ("the policy's default mode applies", |s| s.policy.default_mode = Mode::PreferMacro, "macro+fallback", &["mode"]),
    // Step 1: privacy.
    ("an e-mail address keeps it local, without a cascade", |s| s.req.text = "mail the report to ann@example.com", "local", &["private"]),
    ("a card number keeps it local", |s| s.req.text = "charge 4111 1111 1111 1111", "local", &["private"]),
    ("a keyword keeps it local", |s| s.req.text = "what is my wifi password", "local", &["private"]),
    ("the caller's mark keeps it local", |s| s.req.caller_private = true, "local", &["caller_private"]),
    ("a private app keeps it local", |s| s.req.app = Some("notes"), "local", &["app_private"]),
    ("every privacy reason is listed", |s| { s.req.text = "ann@example.com"; s.req.caller_private = true; s.req.app = Some("notes") }, "local", &["private", "caller_private", "app_private"]),
    ("private in prefer_macro stays local", |s| { s.req.mode = Some(Mode::PreferMacro); s.req.caller_private = true }, "local", &["caller_private"]),
    ("private in only_macro is forbidden", |s| { s.req.mode = Some(Mode::OnlyMacro); s.req.caller_private = true }, "refuse:policy_forbids", &["caller_private", "mode"]),
    ("private with the local tier down is refused", |s| { s.req.caller_private = true; s.state.local.available = false }, "refuse:private_local_unavailable", &["caller_private", "tier_unavailable"]),
    ("private and too long for the local tier is refused", |s| { s.req.caller_private = true; s.req.prompt_tokens = 5000 }, "refuse:too_long", &["caller_private", "context_too_long"]),
    ("private with tools the local tier lacks is refused", |s| { s.req.caller_private = true; s.req.needs_tools = true }, "refuse:private_local_unavailable", &["caller_private", "needs_tools"]),
    ("private with a fleet intent stays local", |s| { s.req.caller_private = true; s.req.intent = Some(FLEET) }, "local", &["caller_private"]),
    ("private with the local tier too slow stays local", |s| { s.req.caller_private = true; s.req.latency_budget_ms = Some(100) }, "local", &["caller_private"]),
    // Step 2: hard modes.
    ("only_local answers locally without a cascade", |s| s.req.mode = Some(Mode::OnlyLocal), "local", &["mode"]),
    ("only_local with the local tier down is refused", |s| { s.req.mode = Some(Mode::OnlyLocal); s.state.local.available = false }, "refuse:local_unavailable", &["mode", "tier_unavailable"]),
    ("only_local and too long is refused", |s| { s.req.mode = Some(Mode::OnlyLocal); s.req.prompt_tokens = 5000 }, "refuse:too_long", &["mode", "context_too_long"]),
    ("only_local with tools the local tier lacks is refused", |s| { s.req.mode = Some(Mode::OnlyLocal); s.req.needs_tools = true }, "refuse:local_unavailable", &["mode", "needs_tools"]),
    ("only_local ignores a fleet intent", |s| { s.req.mode = Some(Mode::OnlyLocal); s.req.intent = Some(FLEET) }, "local", &["mode"]),
    ("only_macro goes to macro without a fallback", |s| s.req.mode = Some(Mode::OnlyMacro), "macro", &["mode"]),
    ("only_macro with the hub down is refused", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.hub_connected = false }, "refuse:macro_unavailable", &["mode", "hub_unreachable"]),
    ("only_macro with the breaker open is refused", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.breaker = BreakerState::Open { retry_in_ms: 5 } }, "refuse:macro_unavailable", &["mode", "breaker_open"]),
    ("only_macro probes a half-open breaker", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.breaker = BreakerState::HalfOpen }, "macro", &["mode"]),
    ("only_macro with the macro tier down is refused", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.remote.available = false }, "refuse:macro_unavailable", &["mode", "tier_unavailable"]),
    ("only_macro and too long for the macro tier is refused", |s| { s.req.mode = Some(Mode::OnlyMacro); s.req.prompt_tokens = 40_000 }, "refuse:too_long", &["mode", "context_too_long"]),
    ("only_macro with the budget spent is refused", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.spent_today_usd = 1.0 }, "refuse:budget_exhausted", &["mode", "cost_budget"]),
    ("only_macro does not fall back when the local tier is fine", |s| { s.req.mode = Some(Mode::OnlyMacro); s.state.hub_connected = false; s.state.local.supports_tools = true }, "refuse:macro_unavailable", &["mode", "hub_unreachable"]),
    // Step 3: capability.
    ("too long for the local tier goes to macro", |s| s.req.prompt_tokens = 5000, "macro", &["mode", "context_too_long"]),
    ("too long counts the completion tokens", |s| { s.req.prompt_tokens = 2000; s.req.max_tokens = 100 }, "macro", &["mode", "context_too_long"]),
    ("too long with the hub down is too long", |s| { s.req.prompt_tokens = 5000; s.state.hub_connected = false }, "refuse:too_long", &["mode", "context_too_long", "hub_unreachable"]),
    ("too long with the budget spent is too long", |s| { s.req.prompt_tokens = 5000; s.state.spent_today_usd = 2.0 }, "refuse:too_long", &["mode", "context_too_long", "cost_budget"]),
    ("too long for both tiers is too long", |s| s.req.prompt_tokens = 40_000, "refuse:too_long", &["mode", "context_too_long", "context_too_long"]),
    ("tools the local tier lacks go to macro", |s| s.req.needs_tools = true, "macro", &["mode", "needs_tools"]),
    ("tools with the hub down are refused", |s| { s.req.needs_tools = true; s.state.hub_connected = false }, "refuse:macro_unavailable", &["mode", "needs_tools", "hub_unreachable"]),
    ("tools the local tier has stay local", |s| { s.req.needs_tools = true; s.state.local.supports_tools = true }, "local+cascade", &["mode"]),
    ("tools neither tier has are refused", |s| { s.req.needs_tools = true; s.state.remote.supports_tools = false }, "refuse:macro_unavailable", &["mode", "needs_tools", "needs_tools"]),
    ("a fleet intent goes to macro", |s| s.req.intent = Some(FLEET), "macro", &["mode", "fleet_data"]),
    ("a fleet intent in prefer_macro has no fallback", |s| { s.req.intent = Some(FLEET); s.req.mode = Some(Mode::PreferMacro) }, "macro", &["mode", "fleet_data"]),
    ("a fleet intent below the margin is ignored", |s| s.req.intent = Some(Intent { margin: 0.1, ..FLEET }), "local+cascade", &["mode"]),
    ("a fleet intent at the margin counts", |s| s.req.intent = Some(Intent { margin: 0.3, ..FLEET }), "macro", &["mode", "fleet_data"]),
    ("a device command stays local without the cascade", |s| s.req.intent = Some(Intent { label: "HassTurnOn", margin: 0.9 }), "local", &["mode", "local_intent"]),
    ("a device command below the margin keeps the cascade", |s| s.req.intent = Some(Intent { label: "HassTurnOn", margin: 0.1 }), "local+cascade", &["mode"]),
    ("a device command in prefer_macro goes to macro", |s| { s.req.intent = Some(Intent { label: "HassTurnOn", margin: 0.9 }); s.req.mode = Some(Mode::PreferMacro) }, "macro+fallback", &["mode"]),
    ("another intent is ignored", |s| s.req.intent = Some(Intent { label: "GetRecipe", margin: 0.9 }), "local+cascade", &["mode"]),
    ("a fleet intent with the breaker open is refused", |s| { s.req.intent = Some(FLEET); s.state.breaker = BreakerState::Open { retry_in_ms: 5 } }, "refuse:macro_unavailable", &["mode", "fleet_data", "breaker_open"]),
    ("a fleet intent with the budget spent is refused", |s| { s.req.intent = Some(FLEET); s.state.spent_today_usd = 1.0 }, "refuse:budget_exhausted", &["mode", "fleet_data", "cost_budget"]),
    ("the local tier down goes to macro", |s| s.state.local.available = false, "macro", &["mode", "tier_unavailable"]),
    ("both tiers down is refused", |s| { s.state.local.available = false; s.state.remote.available = false }, "refuse:macro_unavailable", &["mode", "tier_unavailable", "tier_unavailable"]),
    // Step 4: connectivity.
    ("prefer_local with the hub down stays local without a cascade", |s| s.state.hub_connected = false, "local", &["mode", "hub_unreachable"]),
    ("prefer_macro with the hub down answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.hub_connected = false }, "local", &["mode", "hub_unreachable"]),
    ("prefer_macro with the breaker open answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.breaker = BreakerState::Open { retry_in_ms: 5 } }, "local", &["mode", "breaker_open"]),
    ("prefer_macro with the macro tier down answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.remote.available = false }, "local", &["mode", "tier_unavailable"]),
    ("prefer_macro with tools only the local tier has answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.req.needs_tools = true; s.state.local.supports_tools = true; s.state.remote.supports_tools = false }, "local", &["mode", "needs_tools"]),
    // Step 5: cost.
    ("prefer_macro with the budget spent answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.spent_today_usd = 1.0 }, "local", &["mode", "cost_budget"]),
    ("prefer_macro that would overspend answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.spent_today_usd = 0.9999; s.req.prompt_tokens = 1000 }, "local", &["mode", "cost_budget"]),
    ("prefer_local with the budget spent has no cascade", |s| s.state.spent_today_usd = 1.0, "local", &["mode", "cost_budget"]),
    ("a spend that is not a number counts as spent", |s| { s.req.mode = Some(Mode::PreferMacro); s.state.spent_today_usd = f64::NAN }, "local", &["mode", "cost_budget"]),
    ("without a budget any spend is fine", |s| { s.req.mode = Some(Mode::PreferMacro); s.policy.cost.daily_budget_usd = None; s.state.spent_today_usd = 1e9 }, "macro+fallback", &["mode"]),
    ("a budget of 0 allows no macro spend", |s| { s.req.mode = Some(Mode::PreferMacro); s.policy.cost.daily_budget_usd = Some(0.0) }, "local", &["mode", "cost_budget"]),
    // Step 6: latency.
    ("prefer_local too slow with macro in budget goes to macro", |s| { s.req.latency_budget_ms = Some(500); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0) }, "macro+fallback", &["mode", "latency_budget", "faster"]),
    ("prefer_macro too slow with local in budget answers locally", |s| { s.req.mode = Some(Mode::PreferMacro); s.req.latency_budget_ms = Some(500) }, "local", &["mode", "latency_budget", "faster"]),
    ("both tiers too slow keeps the preference", |s| s.req.latency_budget_ms = Some(100), "local+cascade", &["mode"]),
    ("the preferred tier in budget keeps the preference", |s| { s.req.mode = Some(Mode::PreferMacro); s.req.latency_budget_ms = Some(1000) }, "macro+fallback", &["mode"]),
    ("an unknown estimate keeps the preference", |s| { s.req.latency_budget_ms = Some(500); s.state.local.latency_ms = None; s.state.remote.latency_ms = Some(400.0) }, "local+cascade", &["mode"]),
    ("a NaN estimate keeps the preference", |s| { s.req.latency_budget_ms = Some(500); s.state.local.latency_ms = Some(f64::NAN); s.state.remote.latency_ms = Some(400.0) }, "local+cascade", &["mode"]),
    ("the app's latency budget applies", |s| { s.req.app = Some("voice"); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0) }, "macro+fallback", &["mode", "latency_budget", "faster"]),
    ("the request's latency budget wins over the app's", |s| { s.req.app = Some("voice"); s.req.latency_budget_ms = Some(1000); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0) }, "local+cascade", &["mode"]),
    ("the policy's latency budget applies", |s| { s.policy.latency.budget_ms = Some(500); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0) }, "macro+fallback", &["mode", "latency_budget", "faster"]),
    ("latency does not override the hub being down", |s| { s.req.latency_budget_ms = Some(500); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0); s.state.hub_connected = false }, "local", &["mode", "hub_unreachable"]),
    ("latency toward macro for an embedding has no fallback", |s| { s.req.kind = Kind::Embedding; s.req.latency_budget_ms = Some(500); s.state.local.latency_ms = Some(900.0); s.state.remote.latency_ms = Some(400.0) }, "macro", &["mode", "latency_budget", "faster"]),
];

#[test]
fn decisions() {
    let mut failures = Vec::new();
    for (name, change, want, want_codes) in CASES {
        let mut s = setup();
        change(&mut s);
        let policy = CompiledPolicy::new(s.policy).unwrap();
        let d = decide(&s.req, &policy, &s.state);
        if outcome(&d) != *want || codes(&d) != *want_codes {
            failures.push(format!(
                "{name}: got {} {:?}, want {want} {want_codes:?}",
                outcome(&d),
                codes(&d)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<_> = CASES.iter().map(|c| c.0).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n);
}

fn decide_setup(s: &Setup) -> (CompiledPolicy, Decision) {
    let policy = CompiledPolicy::new(s.policy.clone()).unwrap();
    let d = decide(&s.req, &policy, &s.state);
    (policy, d)
}

#[test]
fn reasons_carry_their_facts() {
    let mut s = setup();
    s.req.app = Some("fleet");
    s.req.prompt_tokens = 4000;
    let (_, d) = decide_setup(&s);
    assert_eq!(
        d.reasons(),
        [
            Reason::Mode {
                mode: Mode::PreferMacro,
                source: ModeSource::App
            },
            Reason::ContextTooLong {
                tier: Tier::Local,
                needed_tokens: 4050,
                limit_tokens: 2048
            },
        ]
    );
    assert_eq!(d.tier(), Some(Tier::Macro));
    assert_eq!(d.refusal(), None);

    let mut s = setup();
    s.req.text = "call +44 20 7946 0958 or mail ann@example.com";
    let (_, d) = decide_setup(&s);
    assert_eq!(d.data_classes(), [DataClass::Email, DataClass::Phone]);

    let mut s = setup();
    s.req.mode = Some(Mode::OnlyMacro);
    s.state.breaker = BreakerState::Open { retry_in_ms: 1234 };
    let (_, d) = decide_setup(&s);
    assert_eq!(d.refusal(), Some(Refusal::MacroUnavailable));
    assert_eq!(d.refusal().map(Refusal::http_status), Some(503));
    assert_eq!(d.tier(), None);
    assert_eq!(d.reasons()[1], Reason::BreakerOpen { retry_in_ms: 1234 });
    assert!(d.data_classes().is_empty());
}

#[test]
fn reasons_never_show_request_text() {
    let secret_texts = [
        "mail zed.quux@example.com about zebra-quux",
        "card 4111 1111 1111 1111 for zebra-quux",
        "zebra-quux password hunter2",
    ];
    for text in secret_texts {
        for mode in Mode::ALL {
            let mut s = setup();
            s.req.text = text;
            s.req.mode = Some(mode);
            s.req.app = Some("notes");
            let (_, d) = decide_setup(&s);
            let json = serde_json::to_string(&d).unwrap();
            for shown in d.reasons().iter().map(ToString::to_string).chain([json]) {
                for word in ["zebra", "quux", "4111", "hunter2"] {
                    assert!(!shown.contains(word), "{shown}");
                }
            }
        }
    }
}

fn every_reason() -> Vec<Reason> {
    vec![
        Reason::Private {
            classes: vec![DataClass::Email, DataClass::Keyword("health".into())],
        },
        Reason::CallerPrivate,
        Reason::AppPrivate {
            app: "notes".into(),
        },
        Reason::Mode {
            mode: Mode::PreferLocal,
            source: ModeSource::Policy,
        },
        Reason::ContextTooLong {
            tier: Tier::Local,
            needed_tokens: 5000,
            limit_tokens: 2048,
        },
        Reason::NeedsTools { tier: Tier::Local },
        Reason::FleetData {
            intent: "StrataFleetQuery".into(),
            margin: 0.8,
        },
        Reason::HubUnreachable,
        Reason::BreakerOpen { retry_in_ms: 250 },
        Reason::TierUnavailable { tier: Tier::Macro },
        Reason::LatencyBudget {
            tier: Tier::Local,
            estimate_ms: 912.4,
            budget_ms: 500,
        },
        Reason::Faster {
            tier: Tier::Macro,
            estimate_ms: 400.0,
        },
        Reason::CostBudget {
            spent_usd: 1.0,
            budget_usd: 1.0,
        },
        Reason::LowConfidence {
            measure: ConfidenceMeasure::MeanLogprob,
            value: -1.5,
            threshold: -1.0,
        },
    ]
}

#[test]
fn reason_codes_are_the_serde_tags_and_round_trip() {
    let mut seen = std::collections::BTreeSet::new();
    for r in every_reason() {
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["code"], r.code(), "{json}");
        assert_eq!(serde_json::from_value::<Reason>(json).unwrap(), r);
        assert!(seen.insert(r.code()), "{} twice", r.code());
    }
}

#[test]
fn reasons_read_as_sentences() {
    let shown: Vec<String> = every_reason().iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "the request contains private data (email, keyword:health)",
            "the caller marked the request private",
            "every request of app \"notes\" is private",
            "mode prefer_local, set by the policy",
            "the request needs 5000 tokens and the local context holds 2048",
            "the request uses tools and the local model has none",
            "intent \"StrataFleetQuery\" (margin 0.80) needs fleet-wide data",
            "the hub is unreachable",
            "the macro circuit breaker is open for 250 ms more",
            "the macro model is unavailable",
            "the local model's estimated 912 ms exceed the 500 ms budget",
            "the macro model's estimated 400 ms fit the budget",
            "the daily macro budget cannot pay for the request (1.0000 of 1.0000 USD spent)",
            "the local answer's mean log-probability -1.500 is below -1.000",
        ]
    );
}

#[test]
fn decisions_serialise_with_an_outcome_tag() {
    let d = Decision::Refuse {
        reasons: vec![Reason::CallerPrivate],
        refusal: Refusal::TooLong,
    };
    assert_eq!(
        serde_json::to_string(&d).unwrap(),
        r#"{"outcome":"refuse","reasons":[{"code":"caller_private"}],"refusal":"too_long"}"#
    );
    let d = Decision::Local {
        reasons: vec![],
        cascade: Some(Cascade {
            min_mean_logprob: -1.0,
            min_margin: 0.25,
        }),
    };
    assert_eq!(
        serde_json::to_string(&d).unwrap(),
        r#"{"outcome":"local","reasons":[],"cascade":{"min_mean_logprob":-1.0,"min_margin":0.25}}"#
    );
}

#[test]
fn refusals_map_to_http_statuses() {
    let cases = [
        (Refusal::PrivateLocalUnavailable, 503),
        (Refusal::LocalUnavailable, 503),
        (Refusal::MacroUnavailable, 503),
        (Refusal::PolicyForbids, 403),
        (Refusal::TooLong, 413),
        (Refusal::BudgetExhausted, 429),
    ];
    for (refusal, status) in cases {
        assert_eq!(refusal.http_status(), status, "{refusal}");
        assert_eq!(
            serde_json::to_value(refusal).unwrap(),
            refusal.code(),
            "{refusal}"
        );
    }
}

#[test]
fn cost_is_priced_per_thousand_tokens() {
    let p = Policy::default();
    assert_eq!(cost_usd(&p, Tier::Local, 2000), 0.0);
    assert!((cost_usd(&p, Tier::Macro, 2000) - 0.001).abs() < 1e-12);
    assert_eq!(cost_usd(&p, Tier::Macro, 0), 0.0);
}

#[test]
fn tiers_and_sources_print_their_names() {
    assert_eq!(Tier::Local.to_string(), "local");
    assert_eq!(Tier::Macro.to_string(), "macro");
    assert_eq!(serde_json::to_value(Tier::Macro).unwrap(), "macro");
    assert_eq!(ModeSource::App.to_string(), "app");
}

// ------------------------------------------------------------- escalate

const LOW: Confidence = Confidence::MeanLogprob(-2.5);

type EscalateCase = (&'static str, fn(&mut Setup), Confidence, bool);

#[rustfmt::skip]
const ESCALATE_CASES: &[EscalateCase] = &[
    ("a low mean log-probability escalates", |_| {}, LOW, true),
    ("a low margin escalates", |_| {}, Confidence::Margin(0.05), true),
    ("a confident generation stays", |_| {}, Confidence::MeanLogprob(-0.3), false),
    ("the threshold itself stays", |_| {}, Confidence::MeanLogprob(-1.0), false),
    ("a confident margin stays", |_| {}, Confidence::Margin(0.6), false),
    ("NaN is not low", |_| {}, Confidence::MeanLogprob(f32::NAN), false),
    ("the hub went down since", |s| s.state.hub_connected = false, LOW, false),
    ("the breaker opened since", |s| s.state.breaker = BreakerState::Open { retry_in_ms: 9 }, LOW, false),
    ("a half-open breaker lets it probe", |s| s.state.breaker = BreakerState::HalfOpen, LOW, true),
    ("the macro tier went down since", |s| s.state.remote.available = false, LOW, false),
    ("the budget was spent since", |s| s.state.spent_today_usd = 1.0, LOW, false),
    ("the request is too long for the macro tier", |s| s.state.remote.context_tokens = 10, LOW, false),
    ("a request marked private does not escalate", |s| s.req.caller_private = true, LOW, false),
    ("a private app does not escalate", |s| s.req.app = Some("notes"), LOW, false),
    ("private text does not escalate", |s| s.req.text = "my password is hunter2", LOW, false),
    ("only_local does not escalate", |s| s.req.mode = Some(Mode::OnlyLocal), LOW, false),
    ("an embedding does not escalate", |s| s.req.kind = Kind::Embedding, LOW, false),
];

#[test]
fn escalation() {
    // Each case escalates a cascading local decision made in the default
    // setup, after changing the request or the state: escalate must not
    // trust the decision but check again.
    let cascade = Cascade {
        min_mean_logprob: -1.0,
        min_margin: 0.2,
    };
    let local = Decision::Local {
        reasons: vec![Reason::Mode {
            mode: Mode::PreferLocal,
            source: ModeSource::Policy,
        }],
        cascade: Some(cascade),
    };
    for (name, change, confidence, want) in ESCALATE_CASES {
        let mut s = setup();
        change(&mut s);
        let policy = CompiledPolicy::new(s.policy).unwrap();
        let got = escalate(&local, *confidence, &s.req, &policy, &s.state);
        assert_eq!(got.is_some(), *want, "{name}: {got:?}");
        if let Some(d) = got {
            assert_eq!(outcome(&d), "macro+fallback", "{name}");
            assert_eq!(codes(&d), ["mode", "low_confidence"], "{name}");
            assert_eq!(
                escalate(&d, *confidence, &s.req, &policy, &s.state),
                None,
                "{name}: escalated twice"
            );
        }
    }
}

#[test]
fn escalate_records_the_measure() {
    let s = setup();
    let (policy, d) = decide_setup(&s);
    assert_eq!(outcome(&d), "local+cascade");
    let up = escalate(&d, Confidence::Margin(0.05), &s.req, &policy, &s.state).unwrap();
    assert_eq!(
        up.reasons().last(),
        Some(&Reason::LowConfidence {
            measure: ConfidenceMeasure::Margin,
            value: 0.05,
            threshold: 0.2
        })
    );
}

#[test]
fn only_a_cascading_local_decision_escalates() {
    let s = setup();
    let policy = CompiledPolicy::new(s.policy.clone()).unwrap();
    let decisions = [
        Decision::Local {
            reasons: vec![],
            cascade: None,
        },
        Decision::Macro {
            reasons: vec![],
            fallback_local: true,
        },
        Decision::Refuse {
            reasons: vec![],
            refusal: Refusal::TooLong,
        },
    ];
    for d in decisions {
        assert_eq!(escalate(&d, LOW, &s.req, &policy, &s.state), None, "{d:?}");
    }
}

// ------------------------------------------------------------- properties

const TEXTS: &[&str] = &[
    "turn on the kitchen lights",
    "what is the capital of France?",
    "mail the minutes to ann@example.com",
    "pay with 4111 1111 1111 1111",
    "IBAN GB82 WEST 1234 5698 7654 32",
    "call me at (555) 123-4567",
    "ssn 123-45-6789",
    "my password is hunter2",
    "the medical record of patient 7",
    "summarise the 2026-11-21 incident at 10:30",
];

const APPS: &[&str] = &["notes", "fleet", "voice", "nobody"];

const LABELS: &[&str] = &["StrataFleetQuery", "HassTurnOn", ""];

fn tier_state() -> impl Strategy<Value = TierState> {
    (
        any::<bool>(),
        prop_oneof![Just(0u32), Just(2048), Just(32_768), any::<u32>()],
        any::<bool>(),
        prop_oneof![
            Just(None),
            (0.0f64..5000.0).prop_map(Some),
            Just(Some(f64::NAN))
        ],
    )
        .prop_map(
            |(available, context_tokens, supports_tools, latency_ms)| TierState {
                available,
                context_tokens,
                supports_tools,
                latency_ms,
            },
        )
}

fn live_state() -> impl Strategy<Value = LiveState> {
    (
        tier_state(),
        tier_state(),
        any::<bool>(),
        prop_oneof![
            Just(BreakerState::Closed),
            Just(BreakerState::HalfOpen),
            (0u64..10_000).prop_map(|retry_in_ms| BreakerState::Open { retry_in_ms }),
        ],
        prop_oneof![Just(0.0f64), 0.0f64..2.0, Just(f64::NAN)],
    )
        .prop_map(
            |(local, remote, hub_connected, breaker, spent_today_usd)| LiveState {
                local,
                remote,
                hub_connected,
                breaker,
                spent_today_usd,
            },
        )
}

fn request() -> impl Strategy<Value = Request<'static>> {
    (
        prop::sample::select(vec![Kind::Chat, Kind::Completion, Kind::Embedding]),
        prop::sample::select(TEXTS),
        prop::option::of(prop::sample::select(APPS)),
        prop::option::of(prop::sample::select(Mode::ALL.to_vec())),
        any::<bool>(),
        0u32..50_000,
        0u32..5000,
        any::<bool>(),
        prop::option::of((prop::sample::select(LABELS), 0.0f32..1.0)),
        prop::option::of(1u64..5000),
    )
        .prop_map(
            |(
                kind,
                text,
                app,
                mode,
                caller_private,
                prompt_tokens,
                max_tokens,
                needs_tools,
                intent,
                latency_budget_ms,
            )| Request {
                kind,
                text,
                app,
                mode,
                caller_private,
                prompt_tokens,
                max_tokens,
                needs_tools,
                intent: intent.map(|(label, margin)| Intent { label, margin }),
                latency_budget_ms,
            },
        )
}

fn confidence() -> impl Strategy<Value = Confidence> {
    prop_oneof![
        (-10.0f32..0.0).prop_map(Confidence::MeanLogprob),
        (0.0f32..1.0).prop_map(Confidence::Margin),
    ]
}

fn test_policy(default_mode: Mode, budget: Option<f64>, cascade: bool) -> CompiledPolicy {
    let mut p = setup().policy;
    p.default_mode = default_mode;
    p.cost.daily_budget_usd = budget;
    p.confidence.cascade = cascade;
    CompiledPolicy::new(p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn private_requests_never_go_to_macro(
        req in request(),
        state in live_state(),
        confidence in confidence(),
        default_mode in prop::sample::select(Mode::ALL.to_vec()),
        budget in prop::option::of(0.0f64..2.0),
        cascade in any::<bool>(),
    ) {
        let policy = test_policy(default_mode, budget, cascade);
        let private = req.caller_private
            || req.app == Some("notes")
            || !policy.classifier().classify(req.text).is_empty();
        let d = decide(&req, &policy, &state);
        let escalated = escalate(&d, confidence, &req, &policy, &state);
        if private {
            prop_assert_ne!(d.tier(), Some(Tier::Macro), "{:?}", d);
            let stays = matches!(d, Decision::Local { cascade: None, .. } | Decision::Refuse { .. });
            prop_assert!(stays, "{:?}", d);
            prop_assert_eq!(&escalated, &None);
            // Even a forged cascading decision does not escalate.
            let forged = Decision::Local {
                reasons: vec![],
                cascade: Some(Cascade { min_mean_logprob: 0.0, min_margin: 1.0 }),
            };
            prop_assert_eq!(escalate(&forged, confidence, &req, &policy, &state), None);
        }
        // A chosen tier can serve the request right now.
        match &d {
            Decision::Local { .. } => prop_assert!(state.local.available),
            Decision::Macro { .. } => {
                prop_assert!(state.hub_connected && !state.breaker.is_open() && state.remote.available);
            }
            Decision::Refuse { .. } => {}
        }
        // At most one escalation.
        if let Some(up) = escalated {
            let macro_with_fallback = matches!(up, Decision::Macro { fallback_local: true, .. });
            prop_assert!(macro_with_fallback, "{:?}", up);
            prop_assert_eq!(escalate(&up, confidence, &req, &policy, &state), None);
        }
    }

    #[test]
    fn decide_never_panics_on_any_text(text in any::<String>(), state in live_state()) {
        let s = setup();
        let policy = CompiledPolicy::new(s.policy).unwrap();
        let req = Request { text: &text, ..s.req };
        let d = decide(&req, &policy, &state);
        prop_assert!(!d.reasons().is_empty());
    }
}
