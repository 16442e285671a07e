//! The OpenAPI document of the hub API, generated from the handlers'
//! annotations so that it cannot drift from the code.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Strata hub API",
        description = "Device enrolment, identity and fleet state. Devices authenticate with \
            their client certificate (mutual TLS); operators with the bearer credential \
            the hub prints on its first start. Every error is an RFC 9457 problem body.",
    ),
    paths(
        api::health,
        api::openapi,
        api::metrics_text,
        api::enroll,
        api::create_token,
        api::list_devices,
        api::show_device,
        api::revoke_device,
        api::send_message,
        api::heartbeat,
        api::events,
        crate::insights::ingest,
        crate::insights::list,
        crate::insights::aggregates,
        crate::insights::trends,
        crate::insights::forecast,
        crate::registry::put_artifact,
        crate::registry::get_artifact,
        crate::registry::publish,
        crate::registry::list_models,
        crate::registry::get_manifest,
        crate::registry::get_doc,
        crate::registry::rotate_root,
        crate::rollouts::create,
        crate::rollouts::list,
        crate::rollouts::show,
        crate::rollouts::act,
        crate::rollouts::report,
        crate::federated::create,
        crate::federated::list,
        crate::federated::show,
        crate::federated::stop,
        crate::federated::operator_model,
        crate::federated::round_view,
        crate::federated::device_model,
        crate::federated::post_update,
        crate::federated::post_advertise,
        crate::federated::post_shares,
        crate::federated::get_shares,
        crate::federated::post_masked,
        crate::federated::post_unmask,
        crate::macro_tier::info,
        crate::macro_tier::chat,
        crate::macro_tier::embeddings,
    ),
    modifiers(&Security),
    tags(
        (name = "meta", description = "Health, metrics and this document"),
        (name = "devices", description = "Calls devices make"),
        (name = "operators", description = "Calls operators make"),
        (name = "registry", description = "The signed model registry: artifacts, manifests and TUF-style metadata"),
        (name = "insights", description = "Insights devices delivered, and the fleet views computed from them"),
        (name = "rollouts", description = "Staged, health-gated rollouts of model releases, and devices' reports on them"),
        (name = "federated", description = "Federated learning: tasks operators start, and the phases of a round devices take part in"),
        (name = "macro", description = "The macro tier: OpenAI-compatible chat and embeddings for devices (mutual TLS) and the operator"),
    )
)]
struct HubApi;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "operator",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "device_certificate",
            SecurityScheme::MutualTls {
                description: Some("the device certificate the hub issued at enrolment".into()),
                extensions: None,
            },
        );
    }
}

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = HubApi::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

/// The OpenAPI document as pretty JSON (what `/openapi.json` serves and
/// `docs/api/openapi.json` holds).
pub fn document_json() -> String {
    document().to_pretty_json().unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_document_is_current() {
        let committed = include_str!("../../../docs/api/openapi.json");
        let current = super::document_json();
        assert!(
            committed.trim() == current.trim(),
            "docs/api/openapi.json is stale: regenerate it with `strata hub openapi > docs/api/openapi.json`"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc = super::document();
        for path in [
            "/healthz",
            "/v1/enroll",
            "/v1/tokens",
            "/v1/devices",
            "/v1/devices/{id}",
            "/v1/devices/{id}/revoke",
            "/v1/devices/{id}/messages",
            "/v1/devices/{id}/heartbeat",
            "/v1/devices/{id}/events",
            "/v1/devices/{id}/insights",
            "/v1/insights",
            "/v1/insights/aggregates",
            "/v1/insights/trends",
            "/v1/insights/forecast",
            "/v1/fl/tasks",
            "/v1/fl/tasks/{id}",
            "/v1/fl/tasks/{id}/stop",
            "/v1/fl/tasks/{id}/model",
            "/v1/fl/tasks/{id}/rounds/{round}",
            "/v1/fl/tasks/{id}/rounds/{round}/model",
            "/v1/fl/tasks/{id}/rounds/{round}/update",
            "/v1/fl/tasks/{id}/rounds/{round}/advertise",
            "/v1/fl/tasks/{id}/rounds/{round}/shares",
            "/v1/fl/tasks/{id}/rounds/{round}/masked",
            "/v1/fl/tasks/{id}/rounds/{round}/unmask",
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} missing");
        }
    }
}
