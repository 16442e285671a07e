//! Bad input gets a clear 4xx with a problem body, never a crash.

use crate::support::{Hub, problem};

#[tokio::test(flavor = "multi_thread")]
async fn operator_endpoints_need_the_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let client = hub.client();
    let cases = [
        ("GET", "/v1/devices"),
        ("GET", "/v1/devices/dev-x"),
        ("POST", "/v1/devices/dev-x/revoke"),
        ("POST", "/v1/devices/dev-x/messages"),
        ("POST", "/v1/tokens"),
    ];
    for (method, path) in cases {
        for auth in [None, Some("sop_wrong")] {
            let url = format!("{}{path}", hub.url);
            let mut req = if method == "GET" {
                client.get(url)
            } else {
                client.post(url).json(&serde_json::json!({}))
            };
            if let Some(token) = auth {
                req = req.bearer_auth(token);
            }
            let r = req.send().await.unwrap();
            assert!(r.headers().contains_key("www-authenticate"), "{path}");
            let (status, p) = problem(r).await;
            assert_eq!(status, 401, "{method} {path} with {auth:?}");
            assert!(
                p.problem_type
                    .starts_with("urn:strata:problem:operator-credential")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_and_unknown_fields_are_400_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let client = hub.client();
    let post = |path: &str, body: &'static str| {
        client
            .post(format!("{}{path}", hub.url))
            .bearer_auth(&hub.operator_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        ("/v1/enroll", "{\"token\": ", "malformed-body", "EOF"),
        (
            "/v1/enroll",
            "{\"token\":\"t\",\"csr_pem\":\"c\",\"admin\":true}",
            "malformed-body",
            "unknown field `admin`",
        ),
        (
            "/v1/tokens",
            "{\"ttl_secs\": \"soon\"}",
            "malformed-body",
            "ttl_secs",
        ),
        (
            "/v1/tokens",
            "{\"labels\": {}, \"role\": \"root\"}",
            "malformed-body",
            "unknown field `role`",
        ),
        (
            "/v1/tokens",
            "{\"ttl_secs\": 99999999}",
            "invalid-token-request",
            "ttl",
        ),
        (
            "/v1/tokens",
            "{\"labels\": {\"bad key\": \"x\"}}",
            "invalid-token-request",
            "bad key",
        ),
        (
            "/v1/enroll",
            "{\"token\":\"strata1.e30\",\"csr_pem\":\"c\"}",
            "join-token-malformed",
            "malformed",
        ),
    ];
    for (path, body, slug, needle) in cases {
        let (status, p) = problem(post(path, body).await.unwrap()).await;
        assert_eq!(status, 400, "{path} {body}: {p:?}");
        assert_eq!(
            p.problem_type,
            format!("urn:strata:problem:{slug}"),
            "{body}"
        );
        assert!(p.detail.contains(needle), "{body}: {}", p.detail);
    }
    // A CSR that is not one, with a valid token: refused, token not consumed.
    let token = hub.token(&[]);
    let r = client
        .post(format!("{}/v1/enroll", hub.url))
        .json(&serde_json::json!({"token": token, "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!(status, 400);
    assert_eq!(p.problem_type, "urn:strata:problem:invalid-csr");
    assert!(
        crate::support::join(&token, &tmp.path().join("a"))
            .status
            .success()
    );

    // Unknown routes and methods are problems too.
    let (status, _) = problem(
        client
            .get(format!("{}/v2/nothing", hub.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = problem(
        client
            .delete(format!("{}/v1/enroll", hub.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_serves_its_openapi_document_and_health() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let doc: serde_json::Value = hub
        .client()
        .get(format!("{}/openapi.json", hub.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/v1/enroll"]["post"].is_object());
    let health: protocol::Health = hub
        .client()
        .get(format!("{}/healthz", hub.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health.role, "hub");
}
