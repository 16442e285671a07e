//! Joining: the happy path and every way a join token can be wrong.

use std::time::Duration;

use protocol::{DeviceStatus, JoinToken};

use crate::support::{Agent, Hub, join, problem, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_device_joins_runs_and_receives_pushed_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let agent = Agent::enrol(&hub, tmp.path().join("a")).await;
    let status = agent.wait_connected(1, Duration::from_secs(30)).await;
    assert_eq!(status.labels.get("site").map(String::as_str), Some("test"));

    // The key never left the device: the hub holds only the certificate.
    let key = std::fs::read_to_string(agent.dir.join("identity/device.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"));

    let devices = hub.devices().await;
    assert_eq!(devices.len(), 1);
    let device = &devices[0];
    assert_eq!(device.id, status.device_id);
    assert_eq!(device.status, DeviceStatus::Active);
    assert!(device.online);

    // Heartbeats arrive.
    wait_for(
        "a heartbeat on the hub",
        Duration::from_secs(30),
        || async { hub.devices().await[0].last_heartbeat.clone() },
    )
    .await;

    // A message pushed by an operator reaches the device over its stream, once.
    let r = hub
        .operator_post(
            &format!("/v1/devices/{}/messages", device.id),
            serde_json::json!({"message": {"kind": "ping", "note": "hello"}}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let seq = r
        .json::<protocol::DeviceMessageEnvelope>()
        .await
        .unwrap()
        .seq;
    let status = wait_for("the ping to arrive", Duration::from_secs(10), || async {
        agent.status().await.filter(|s| s.last_message_seq == seq)
    })
    .await;
    assert_eq!(status.messages_received, 1);

    // Metrics on both sides.
    let hub_metrics = hub
        .client()
        .get(format!("{}/metrics", hub.url))
        .send()
        .await
        .unwrap();
    let text = hub_metrics.text().await.unwrap();
    assert!(text.contains("strata_hub_enrolments_total 1"), "{text}");
    let edge_metrics = reqwest::get(format!("{}/metrics", agent.local))
        .await
        .unwrap();
    assert!(
        edge_metrics
            .text()
            .await
            .unwrap()
            .contains("strata_edge_messages_received_total 1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let token = hub.token(&[]);
    assert!(join(&token, &tmp.path().join("a")).status.success());
    let second = join(&token, &tmp.path().join("b"));
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already used"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one readable line: {stderr}"
    );
    assert_eq!(hub.devices().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let token = hub.token(&[]);
    hub.expire(&token);
    let out = join(&token, &tmp.path().join("a"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"));
    assert!(hub.devices().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let real = JoinToken::decode(&hub.token(&[])).unwrap();
    let wrong_secret = JoinToken {
        secret: "guessed".into(),
        ..real.clone()
    };
    let unknown_id = JoinToken {
        id: "tok-0000000000000000".into(),
        ..real.clone()
    };
    for (i, forged) in [wrong_secret, unknown_id].iter().enumerate() {
        let out = join(&forged.encode(), &tmp.path().join(format!("f{i}")));
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not valid"), "{stderr}");
    }
    // Not a token at all.
    let out = join("hello", &tmp.path().join("g"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with"));
    // The hub refuses the forged token directly too, with a problem body.
    let r = hub
        .client()
        .post(format!("{}/v1/enroll", hub.url))
        .json(&serde_json::json!({
            "token": JoinToken { secret: "x".into(), ..real.clone() }.encode(),
            "csr_pem": "irrelevant",
        }))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!(status, 401);
    assert_eq!(p.problem_type, "urn:strata:problem:join-token-invalid");
    assert!(hub.devices().await.is_empty());
    // The real token still works afterwards.
    assert!(
        join(&real.encode(), &tmp.path().join("ok"))
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_whose_ca_does_not_match_the_pin_is_refused_by_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let real = Hub::start(&tmp.path().join("real")).await;
    let impostor = Hub::start(&tmp.path().join("impostor")).await;
    // A token for the real hub, but the device is steered to the impostor
    // (as DNS spoofing or a man in the middle would).
    let token = JoinToken {
        hub: impostor.url.clone(),
        ..JoinToken::decode(&real.token(&[])).unwrap()
    };
    let dir = tmp.path().join("device");
    let out = join(&token.encode(), &dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match the join token's pin"),
        "{stderr}"
    );
    assert!(!dir.join("identity/device.crt").exists());
    assert!(impostor.devices().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_join_twice_into_one_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let dir = tmp.path().join("a");
    assert!(join(&hub.token(&[]), &dir).status.success());
    let again = join(&hub.token(&[]), &dir);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds device"));
}
