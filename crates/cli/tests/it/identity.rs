//! The hub knows a device only by its client certificate.

use std::time::Duration;

use protocol::DeviceStatus;

use crate::support::{Agent, Hub, ca_client, device_client, problem, wait_for};

fn heartbeat_body() -> serde_json::Value {
    serde_json::json!({"agent_version": "test", "uptime_secs": 1})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_can_act_only_as_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let a = Agent::enrol(&hub, tmp.path().join("a")).await;
    let b = Agent::enrol(&hub, tmp.path().join("b")).await;
    let a_id = a.wait_connected(1, Duration::from_secs(30)).await.device_id;
    let b_id = b.wait_connected(1, Duration::from_secs(30)).await.device_id;
    let as_a = device_client(&hub.ca_pem(), &a.dir);

    let own = as_a
        .post(format!("{}/v1/devices/{a_id}/heartbeat", hub.url))
        .json(&heartbeat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);

    for (method, path) in [("POST", "heartbeat"), ("GET", "events")] {
        let url = format!("{}/v1/devices/{b_id}/{path}", hub.url);
        let req = if method == "POST" {
            as_a.post(url).json(&heartbeat_body())
        } else {
            as_a.get(url)
        };
        let (status, p) = problem(req.send().await.unwrap()).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(p.problem_type, "urn:strata:problem:device-mismatch");
        assert!(p.detail.contains(a_id.as_str()) && p.detail.contains(b_id.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_certificate_or_with_a_foreign_one_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let a = Agent::enrol(&hub, tmp.path().join("a")).await;
    let id = a.wait_connected(1, Duration::from_secs(30)).await.device_id;

    let anonymous = ca_client(&hub.ca_pem());
    let r = anonymous
        .post(format!("{}/v1/devices/{id}/heartbeat", hub.url))
        .json(&heartbeat_body())
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!(status, 401);
    assert_eq!(
        p.problem_type,
        "urn:strata:problem:client-certificate-required"
    );

    // A self-made certificate claiming the same device id fails the TLS
    // handshake: it is not signed by the hub CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id.as_str());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    let forged = reqwest::Client::builder()
        .tls_backend_preconfigured(
            pki::tls::device_client_config(&hub.ca_pem(), &cert.pem(), &key.serialize_pem())
                .unwrap(),
        )
        .build()
        .unwrap();
    let result = forged
        .post(format!("{}/v1/devices/{id}/heartbeat", hub.url))
        .json(&heartbeat_body())
        .send()
        .await;
    assert!(
        result.is_err(),
        "a foreign certificate must not get an answer: {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_device_is_refused_on_its_next_call_and_its_agent_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let a = Agent::enrol(&hub, tmp.path().join("a")).await;
    let id = a.wait_connected(1, Duration::from_secs(30)).await.device_id;

    let r = hub
        .operator_post(&format!("/v1/devices/{id}/revoke"), serde_json::json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let device: protocol::Device = r.json().await.unwrap();
    assert_eq!(device.status, DeviceStatus::Revoked);

    // The running agent is told over its stream and stops calling.
    let status = wait_for(
        "the agent to learn it was revoked",
        Duration::from_secs(10),
        || async { a.status().await.filter(|s| s.revoked) },
    )
    .await;
    assert!(!status.hub_connected);

    // Its certificate no longer opens any door.
    let as_a = device_client(&hub.ca_pem(), &a.dir);
    let r = as_a
        .post(format!("{}/v1/devices/{id}/heartbeat", hub.url))
        .json(&heartbeat_body())
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!(status, 403);
    assert_eq!(p.problem_type, "urn:strata:problem:device-revoked");
    let r = as_a
        .get(format!("{}/v1/devices/{id}/events", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    wait_for(
        "the hub to show it offline",
        Duration::from_secs(10),
        || async {
            hub.devices()
                .await
                .into_iter()
                .find(|d| d.id == id && !d.online)
        },
    )
    .await;
}
