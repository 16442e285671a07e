//! The decision record the edge agent's router attaches to every answer:
//! where the request ran, on which model, why, under which policy, how
//! long it took and what it cost. It rides in the `strata` object of a
//! response body (and the last chunk of a stream) and, condensed, in the
//! `x-strata-route` header.

use serde::{Deserialize, Serialize};

/// The response header that carries the condensed decision record.
pub const ROUTE_HEADER: &str = "x-strata-route";

/// Sent by a device to the macro tier with a question that needs
/// fleet-wide data (`fleet`): the hub answers it with the fleet's figures.
pub const CONTEXT_HEADER: &str = "x-strata-context";

/// Request headers a caller can use instead of the body's `strata` object.
pub const MODE_HEADER: &str = "x-strata-mode";
/// Marks a request private (`true`/`1`).
pub const PRIVATE_HEADER: &str = "x-strata-private";
/// Names the calling application (for per-app policy).
pub const APP_HEADER: &str = "x-strata-app";
/// A latency budget in milliseconds.
pub const LATENCY_BUDGET_HEADER: &str = "x-strata-latency-budget-ms";

/// Routing options a caller may put in a request body's `strata` object
/// (with the OpenAI Python client: `extra_body={"strata": {...}}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteOptions {
    /// `only_local`, `prefer_local`, `prefer_macro` or `only_macro`; wins
    /// over the app's and the policy's mode.
    #[serde(default)]
    pub mode: Option<String>,
    /// The caller marks the request private: it never leaves the device.
    #[serde(default)]
    pub private: Option<bool>,
    /// The calling application, for per-app policy.
    #[serde(default)]
    pub app: Option<String>,
    /// End-to-end latency budget in milliseconds.
    #[serde(default)]
    pub latency_budget_ms: Option<u64>,
}

/// One reason of a routing decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteReason {
    /// Stable machine-readable code (`private`, `mode`, `fleet_data`,
    /// `low_confidence`, …).
    pub code: String,
    /// A short human sentence. Names data classes, never request text.
    pub message: String,
}

/// Token counts of a routed answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteTokens {
    /// Prompt tokens.
    pub prompt: u32,
    /// Completion tokens.
    pub completion: u32,
}

/// The decision record of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteRecord {
    /// `local`, `macro`, or `none` for a refusal.
    pub tier: String,
    /// The model that answered, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its version, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why, in decision order.
    pub reasons: Vec<RouteReason>,
    /// The version of the routing policy that decided.
    pub policy_version: String,
    /// Personal-data classes found in the request (names only).
    #[serde(default)]
    pub data_classes: Vec<String>,
    /// The local answer was not confident enough and the request went on
    /// to the macro tier (at most once).
    #[serde(default)]
    pub escalated: bool,
    /// The macro tier failed and the local tier answered instead.
    #[serde(default)]
    pub fell_back: bool,
    /// Wall time from the request's arrival to its answer (for streams:
    /// to the last token).
    pub latency_ms: f64,
    /// The router's own decision time, privacy classification included.
    pub decision_us: f64,
    /// Price of the tokens at the policy's rates.
    pub cost_usd: f64,
    /// Tokens used.
    pub tokens: RouteTokens,
}

impl RouteRecord {
    /// The condensed form for the `x-strata-route` header:
    /// `tier=local; model=smollm2; reasons=private,mode; policy=builtin-1`.
    pub fn header_value(&self) -> String {
        let reasons: Vec<&str> = self.reasons.iter().map(|r| r.code.as_str()).collect();
        let mut out = format!("tier={}", self.tier);
        if let Some(m) = &self.model {
            out.push_str("; model=");
            out.push_str(m);
            if let Some(v) = &self.version {
                out.push('@');
                out.push_str(v);
            }
        }
        out.push_str("; reasons=");
        out.push_str(&reasons.join(","));
        out.push_str("; policy=");
        out.push_str(&self.policy_version);
        if self.escalated {
            out.push_str("; escalated");
        }
        if self.fell_back {
            out.push_str("; fell_back");
        }
        // Header values must be visible ASCII; model ids and versions come
        // from configuration, so keep only what a header can carry.
        out.retain(|c| c.is_ascii_graphic() || c == ' ');
        out
    }
}

/// What a hub's macro tier offers devices (`GET /v1/macro`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MacroInfo {
    /// The chat model's id, if the hub serves one.
    pub chat_model: Option<String>,
    /// The embedding model's id, if the hub serves one.
    pub embedding_model: Option<String>,
    /// Context length of the chat model in tokens.
    pub context_tokens: u32,
    /// The chat model takes tool definitions.
    pub supports_tools: bool,
    /// `local` (a model the hub runs) or `upstream` (a proxied
    /// OpenAI-compatible service).
    pub backend: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_condenses_the_record() {
        let record = RouteRecord {
            tier: "macro".into(),
            model: Some("qwen".into()),
            version: Some("3".into()),
            reasons: vec![
                RouteReason {
                    code: "mode".into(),
                    message: "m".into(),
                },
                RouteReason {
                    code: "fleet_data".into(),
                    message: "f".into(),
                },
            ],
            policy_version: "builtin-1".into(),
            escalated: true,
            ..RouteRecord::default()
        };
        assert_eq!(
            record.header_value(),
            "tier=macro; model=qwen@3; reasons=mode,fleet_data; policy=builtin-1; escalated"
        );
    }
}
