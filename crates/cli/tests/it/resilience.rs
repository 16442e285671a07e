//! Killing processes loses nothing and every agent comes back.

use std::time::{Duration, Instant};

use crate::support::{Agent, Hub, join, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn agents_reconnect_within_30s_after_the_hub_is_killed_and_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(tmp.path()).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(Agent::enrol(&hub, tmp.path().join(format!("a{i}"))).await);
    }
    for a in &agents {
        a.wait_connected(1, Duration::from_secs(30)).await;
    }
    let before = hub.devices().await;
    let used_token = hub.token(&[]);
    assert!(join(&used_token, &tmp.path().join("late")).status.success());
    let unused_token = hub.token(&[]);

    hub.kill();
    for a in &agents {
        wait_for(
            "the agent to notice the hub is gone",
            Duration::from_secs(30),
            || async { a.status().await.filter(|s| !s.hub_connected) },
        )
        .await;
    }
    hub.restart().await;
    let restarted = Instant::now();
    for a in &agents {
        a.wait_connected(2, Duration::from_secs(30)).await;
    }
    assert!(restarted.elapsed() < Duration::from_secs(30));

    // No state lost: same devices, same identities, tokens remember their use.
    let after = hub.devices().await;
    assert_eq!(after.len(), before.len() + 1);
    for d in &before {
        let same = after
            .iter()
            .find(|a| a.id == d.id)
            .expect("device survived");
        assert_eq!(same.cert_fingerprint, d.cert_fingerprint);
        assert_eq!(same.labels, d.labels);
    }
    wait_for(
        "every running agent online on the hub",
        Duration::from_secs(10),
        || async {
            let devices = hub.devices().await;
            (devices.iter().filter(|d| d.online).count() == agents.len()).then_some(())
        },
    )
    .await;
    let reused = join(&used_token, &tmp.path().join("again"));
    assert!(!reused.status.success());
    assert!(
        join(&unused_token, &tmp.path().join("fresh"))
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_are_delivered_once_across_agent_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let mut agent = Agent::enrol(&hub, tmp.path().join("a")).await;
    let id = agent
        .wait_connected(1, Duration::from_secs(30))
        .await
        .device_id;
    let dir = agent.dir.clone();
    agent.kill();

    // Stored while the agent is down, delivered when it is back.
    let mut seqs = Vec::new();
    for i in 0..3 {
        let r = hub
            .operator_post(
                &format!("/v1/devices/{id}/messages"),
                serde_json::json!({"message": {"kind": "ping", "note": format!("n{i}")}}),
            )
            .await;
        assert_eq!(r.status(), 202);
        seqs.push(
            r.json::<protocol::DeviceMessageEnvelope>()
                .await
                .unwrap()
                .seq,
        );
    }
    let mut agent = Agent::start(dir.clone()).await;
    let last = *seqs.last().unwrap();
    let status = wait_for("the backlog to arrive", Duration::from_secs(30), || async {
        agent.status().await.filter(|s| s.last_message_seq == last)
    })
    .await;
    assert_eq!(status.messages_received, 3);

    // After another restart nothing is redelivered.
    agent.kill();
    let agent = Agent::start(dir).await;
    let status = agent.wait_connected(1, Duration::from_secs(30)).await;
    assert_eq!(status.last_message_seq, last);
    assert_eq!(status.messages_received, 0);
}
