//! Over-the-air model updates end to end: releases published through a real
//! hub, rolled out in stages to real agents that verify, install, health
//! check and commit them, and every attack and fault the updater must
//! survive while the device keeps serving its current model.
//!
//! The model is the intent classifier: release A (the catalogue's own
//! file), release B (trained with another seed, healthy) and a broken
//! release (A's weights under rotated labels: it loads and answers, wrongly,
//! so only its health probes catch it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use protocol::AgentStatus;
use protocol::rollout::{RolloutDetail, RolloutState, UpdatePhase};

use crate::support::{Agent, Hub, STRATA, assets, ok, train_intents, wait_for};

/// The classifier releases, trained once per target directory.
struct Heads {
    a: PathBuf,
    b: PathBuf,
    broken: PathBuf,
    health: PathBuf,
}

fn train(out: &Path, seed: u64, health: &Path) {
    let health = health.display().to_string();
    train_intents(out, &["--seed", &seed.to_string(), "--health-out", &health]);
}

/// Trains the heads once per target directory (test processes share them).
fn heads() -> Heads {
    let dir = crate::support::built_once("rollout-heads", |dir| {
        let health = dir.join("health.json");
        train(&dir.join("a.safetensors"), 42, &health);
        train(&dir.join("b.safetensors"), 7, &dir.join("scratch.json"));
        // These tests are about verification and rollback, not speed: a
        // debug build on a busy machine gets a generous latency bound for
        // its probes.
        let mut h: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&health).unwrap()).unwrap();
        h["max_latency_ms"] = 60_000.into();
        std::fs::write(&health, serde_json::to_vec(&h).unwrap()).unwrap();
        let head = runtime::ClassifierHead::load(&dir.join("a.safetensors")).unwrap();
        let mut labels = head.labels().to_vec();
        labels.rotate_left(1);
        head.relabel(labels)
            .unwrap()
            .save(&dir.join("broken.safetensors"))
            .unwrap();
    });
    Heads {
        a: dir.join("a.safetensors"),
        b: dir.join("b.safetensors"),
        broken: dir.join("broken.safetensors"),
        health: dir.join("health.json"),
    }
}

/// A hub with registry keys, and a place for agents.
struct Setup {
    tmp: tempfile::TempDir,
    hub: Hub,
    keys: PathBuf,
    token_file: PathBuf,
    heads: Heads,
}

impl Setup {
    async fn new() -> Self {
        let heads = heads();
        let tmp = tempfile::tempdir().unwrap();
        let hub = Hub::start(tmp.path()).await;
        let keys = tmp.path().join("keys");
        hub.init_registry_keys(&keys);
        let token_file = tmp.path().join("operator.token");
        Self {
            tmp,
            hub,
            keys,
            token_file,
            heads,
        }
    }

    fn strata(&self, args: &[&str]) -> Output {
        Command::new(STRATA)
            .args(args)
            .arg("--hub-data-dir")
            .arg(&self.hub.dir)
            .arg("--operator-token-file")
            .arg(&self.token_file)
            .env("STRATA_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Publishes `file` as `intents@version` with the health probes.
    fn publish(&self, file: &Path, version: u64, extra: &[&str]) {
        let mut args = vec![
            "model".to_owned(),
            "publish".into(),
            file.display().to_string(),
            "--name".into(),
            "intents".into(),
            "--version".into(),
            version.to_string(),
            "--keys".into(),
            self.keys.display().to_string(),
            "--health".into(),
            self.heads.health.display().to_string(),
            "--input".into(),
            "text".into(),
            "--output".into(),
            "labels".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = ok(&self.strata(&args));
        assert!(
            text.contains(&format!("published intents@{version}")),
            "{text}"
        );
    }

    /// Joins and starts an agent serving release A, with a short health window.
    async fn agent(&self, name: &str, extra: &str) -> Agent {
        let minilm = assets().join("all-minilm-l6-v2");
        let config = self.tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[updates]
health_window_secs = 2
{extra}

[[models]]
id = "minilm"
kind = "embedding"
path = {minilm:?}

[[models]]
id = "intents"
kind = "classifier"
path = {head:?}
embedding_model = "minilm"
"#,
                minilm = minilm.display().to_string(),
                head = self.heads.a.display().to_string(),
            ),
        )
        .unwrap();
        let agent = Agent::enrol_with_config(&self.hub, self.tmp.path().join(name), &config).await;
        agent.wait_connected(1, Duration::from_secs(60)).await;
        agent
    }

    /// Starts a rollout of `intents@version`; returns its id.
    fn rollout(&self, version: u64, stages: &str) -> String {
        self.rollout_with(version, stages, &[])
    }

    /// Starts a rollout with more flags (gates, thresholds).
    fn rollout_with(&self, version: u64, stages: &str, extra: &[&str]) -> String {
        let release = format!("intents@{version}");
        let mut args = vec!["rollout", "create", &release, "--stages", stages];
        args.extend_from_slice(extra);
        let text = ok(&self.strata(&args));
        text.split_whitespace()
            .nth(1)
            .filter(|id| id.starts_with("ro-"))
            .unwrap_or_else(|| panic!("no rollout id in {text}"))
            .to_owned()
    }

    async fn detail(&self, id: &str) -> RolloutDetail {
        let r = self
            .hub
            .client()
            .get(format!("{}/v1/rollouts/{id}", self.hub.url))
            .bearer_auth(&self.hub.operator_token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.json().await.unwrap()
    }

    /// Waits for the rollout to finish in `state`.
    async fn finished(&self, id: &str, state: RolloutState) -> RolloutDetail {
        let detail = wait_for(
            "the rollout to finish",
            Duration::from_secs(120),
            || async {
                let d = self.detail(id).await;
                matches!(
                    d.rollout.state,
                    RolloutState::Completed | RolloutState::Aborted
                )
                .then_some(d)
            },
        )
        .await;
        assert_eq!(detail.rollout.state, state, "{detail:#?}");
        detail
    }

    /// Waits until every device of the rollout has a final phase (their
    /// reports can arrive after the controller decided).
    async fn settled(&self, id: &str) -> RolloutDetail {
        wait_for(
            "every device's last report",
            Duration::from_secs(60),
            || async {
                let d = self.detail(id).await;
                d.devices.iter().all(|x| x.phase.is_final()).then_some(d)
            },
        )
        .await
    }

    fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.hub.dir.join("hub.db")).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }
}

/// The label the agent gives `text`.
async fn classify(agent: &Agent, text: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/classify", agent.local))
        .json(&serde_json::json!({"model": "intents", "input": [text]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let body: serde_json::Value = r.json().await.unwrap();
    body["data"][0]["label"].as_str().unwrap().to_owned()
}

/// The installed version of `intents` the agent serves (`None`: the catalogue's).
async fn serving(agent: &Agent) -> Option<u64> {
    let status: AgentStatus = agent.status().await.unwrap();
    status
        .installed
        .iter()
        .find(|m| m.model == "intents")
        .map(|m| m.version)
}

const LIGHTS: &str = "turn on the kitchen lights";

/// The one device's phase and detail in a single-device rollout.
fn only_device(detail: &RolloutDetail) -> (UpdatePhase, String) {
    assert_eq!(detail.devices.len(), 1, "{detail:#?}");
    let d = &detail.devices[0];
    (d.phase, d.detail.clone().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_rolls_out_in_stages_and_a_broken_one_stops_at_the_canary() {
    let s = Setup::new().await;
    let mut agents = Vec::new();
    for i in 0..4 {
        agents.push(s.agent(&format!("agent-{i}"), "").await);
    }
    assert_eq!(classify(&agents[0], LIGHTS).await, "HassTurnOn");

    // A healthy release goes through both stages.
    s.publish(&s.heads.b, 1, &[]);
    let good = s.rollout(1, "25%,100%");
    let detail = s.finished(&good, RolloutState::Completed).await;
    assert_eq!(detail.rollout.counts.committed, 4, "{detail:#?}");
    assert_eq!(detail.devices.iter().filter(|d| d.stage == 0).count(), 1);
    for agent in &agents {
        assert_eq!(serving(agent).await, Some(1));
        assert_eq!(classify(agent, LIGHTS).await, "HassTurnOn");
    }

    // A signed but broken release fails its health probes on the canary:
    // the rollout aborts there and no other device is asked.
    s.publish(&s.heads.broken, 2, &[]);
    let bad = s.rollout(2, "25%,100%");
    s.finished(&bad, RolloutState::Aborted).await;
    let detail = s.settled(&bad).await;
    assert_eq!(detail.devices.len(), 1, "only the canary: {detail:#?}");
    let (phase, why) = only_device(&detail);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("health check failed"), "{why}");
    assert!(
        detail.rollout.decision.contains("failed"),
        "{}",
        detail.rollout.decision
    );
    for agent in &agents {
        assert_eq!(serving(agent).await, Some(1), "everyone still on release 1");
        assert_eq!(classify(agent, LIGHTS).await, "HassTurnOn");
    }
    // The status says the same, device by device.
    let text = ok(&s.strata(&["rollout", "status", &bad]));
    assert!(
        text.contains("aborted") && text.contains("failed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_with_one_byte_changed_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    let sha = hex_sha(&std::fs::read(&s.heads.b).unwrap());
    let stored = s.hub.dir.join("artifacts").join(&sha);
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();

    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("SHA-256") || why.contains("sha256"), "{why}");
    assert_eq!(serving(&agent).await, None, "still the catalogue's model");
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

fn hex_sha(bytes: &[u8]) -> String {
    registry::Sha256Digest::of(bytes).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_signed_by_an_unknown_key_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    // Someone with write access to the hub's store swaps in the same
    // manifest signed by a key of their own.
    let rogue = s.tmp.path().join("rogue");
    ok(&Command::new(STRATA)
        .args(["keys", "init", "--out"])
        .arg(&rogue)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap());
    let rogue_key = registry::SigningKey::from_key_file(
        &std::fs::read_to_string(rogue.join("targets.key")).unwrap(),
    )
    .unwrap();
    let db = s.db();
    let signed: Vec<u8> = db
        .query_row(
            "SELECT manifest FROM models WHERE name = 'intents' AND version = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let body = registry::read_unverified::<registry::Manifest>(&signed).unwrap();
    let forged = registry::sign(&body, &[&rogue_key]).unwrap();
    db.execute(
        "UPDATE models SET manifest = ?1 WHERE name = 'intents'",
        [forged],
    )
    .unwrap();

    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("does not know"), "{why}");
    assert_eq!(serving(&agent).await, None);
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_signed_below_its_threshold_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    // A root rotation signed by one of the three root keys (threshold 2).
    let root = registry::read_unverified::<registry::Root>(
        &std::fs::read(s.keys.join("root.json")).unwrap(),
    )
    .unwrap();
    let next = registry::Root {
        version: root.version + 1,
        ..root
    };
    let one_key = std::fs::read_dir(&s.keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("root"))
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .expect("a root key file");
    let key =
        registry::SigningKey::from_key_file(&std::fs::read_to_string(one_key).unwrap()).unwrap();
    let signed = registry::sign(&next, &[&key]).unwrap();
    s.db()
        .execute(
            "INSERT INTO registry_docs (kind, version, body, created_at) VALUES ('root', ?1, ?2, 0)",
            rusqlite::params![next.version as i64, signed],
        )
        .unwrap();

    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("threshold"), "{why}");
    assert_eq!(serving(&agent).await, None);
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_release_than_the_device_has_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    s.publish(&s.heads.a, 2, &[]);
    // `model show` prints the signed manifest, the newest by default.
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&s.strata(&["model", "show", "intents"]))).unwrap();
    assert_eq!(shown["signed"]["version"], 2);
    assert_eq!(shown["signed"]["health"]["min_pass"], 0.8);
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&s.strata(&["model", "show", "intents@1"]))).unwrap();
    assert_eq!(shown["signed"]["version"], 1);
    let missing = s.strata(&["model", "show", "nothing"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no release"));

    let id = s.rollout(2, "100%");
    s.finished(&id, RolloutState::Completed).await;
    assert_eq!(serving(&agent).await, Some(2));

    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("verification failed"), "{why}");
    assert_eq!(serving(&agent).await, Some(2), "still on release 2");
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_metadata_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    // The publisher signs targets and manifest valid for three seconds.
    s.publish(&s.heads.b, 1, &["--expires", "3s"]);
    let expires = std::time::Instant::now() + Duration::from_secs(3);
    wait_for("the release to expire", Duration::from_secs(10), || async {
        (std::time::Instant::now() > expires).then_some(())
    })
    .await;
    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("expired"), "{why}");
    assert_eq!(serving(&agent).await, None);
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_snapshot_replayed_is_refused() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    s.publish(&s.heads.a, 2, &[]);
    let id = s.rollout(2, "100%");
    s.finished(&id, RolloutState::Completed).await;
    // Release 3 is published, then the hub's store is rolled back to the
    // metadata of release 1: the device has seen newer, so it is a freeze.
    s.publish(&s.heads.b, 3, &[]);
    s.db()
        .execute(
            "DELETE FROM registry_docs WHERE kind IN ('timestamp', 'snapshot', 'targets') AND version >= 2",
            [],
        )
        .unwrap();
    let id = s.rollout(3, "100%");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("freeze") || why.contains("older"), "{why}");
    assert_eq!(serving(&agent).await, Some(2));
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_cut_half_way_resumes_and_verifies() {
    let s = Setup::new().await;
    let proxy =
        netfault::FaultProxy::start(s.hub.url.trim_start_matches("https://").parse().unwrap())
            .await
            .unwrap();
    let size = std::fs::metadata(&s.heads.b).unwrap().len();
    // A slow uplink, so that the cut lands mid-download: about four seconds
    // (the agent caps itself at the same rate).
    let rate = (size / 4).max(1024);
    proxy.throttle(Some(rate));
    let agent = s
        .agent(
            "agent",
            &format!(
                "download_rate_bytes_per_sec = {rate}\n[hub]\nurl = \"https://{}\"\nreconnect_max_ms = 500\n",
                proxy.addr()
            ),
        )
        .await;
    s.publish(&s.heads.b, 1, &[]);
    let id = s.rollout(1, "100%");
    wait_for("half the download", Duration::from_secs(60), || async {
        let u = agent.status().await?.update?;
        (u.downloaded_bytes >= u.total_bytes / 2 && u.downloaded_bytes < u.total_bytes)
            .then_some(())
    })
    .await;
    proxy.cut();
    wait_for(
        "the agent to notice the cut",
        Duration::from_secs(30),
        || async {
            let u = agent.status().await?.update?;
            u.detail.filter(|d| !d.is_empty()).map(|_| ())
        },
    )
    .await;
    proxy.restore();
    s.finished(&id, RolloutState::Completed).await;
    let update = agent.status().await.unwrap().update.unwrap();
    assert!(update.attempts >= 2, "{update:?}");
    assert!(
        update.resumed_from > 0 && update.resumed_from < update.total_bytes,
        "the second attempt resumed: {update:?}"
    );
    assert_eq!(update.downloaded_bytes, size);
    assert_eq!(serving(&agent).await, Some(1));
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_in_its_health_window_comes_back_on_a_working_model() {
    let s = Setup::new().await;
    let config_extra = "";
    let mut agent = s.agent("agent", config_extra).await;
    // A long health window, so the kill lands inside it.
    let config = s.tmp.path().join("agent.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("health_window_secs = 2", "health_window_secs = 600");
    std::fs::write(&config, text).unwrap();
    agent.kill();
    let mut agent = Agent::start_with(agent.dir.clone(), Some(&config)).await;
    agent.wait_connected(1, Duration::from_secs(60)).await;

    s.publish(&s.heads.b, 1, &[]);
    let id = s.rollout(1, "100%");
    wait_for("the release on trial", Duration::from_secs(60), || async {
        let status = agent.status().await?;
        status
            .installed
            .iter()
            .any(|m| m.model == "intents" && m.version == 1 && m.trial)
            .then_some(())
    })
    .await;
    agent.kill();

    let agent = Agent::start_with(agent.dir.clone(), Some(&config)).await;
    agent.wait_connected(1, Duration::from_secs(60)).await;
    assert_eq!(serving(&agent).await, None, "back on the catalogue's model");
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
    s.finished(&id, RolloutState::Aborted).await;
    let (phase, why) = only_device(&s.settled(&id).await);
    assert_eq!(phase, UpdatePhase::Failed);
    assert!(why.contains("health window"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_device_catches_up_and_the_rollout_survives_a_hub_restart() {
    let mut s = Setup::new().await;
    let online = s.agent("online", "").await;
    let mut offline = s.agent("offline", "").await;
    let offline_config = s.tmp.path().join("offline.toml");
    offline.kill();
    s.publish(&s.heads.b, 1, &[]);
    let id = s.rollout(1, "100%");

    // Paused, it asks nobody new; resumed, it goes on. Resuming an active
    // rollout is refused with one readable line.
    let paused = ok(&s.strata(&["rollout", "pause", &id]));
    assert!(paused.contains("paused"), "{paused}");
    let err = s.strata(&["rollout", "pause", &id]);
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("cannot pause"));
    ok(&s.strata(&["rollout", "resume", &id]));

    // The online device commits; with half the stage committed the
    // controller holds (90 % needed) and waits for the offline one.
    wait_for(
        "the online device to commit",
        Duration::from_secs(60),
        || async {
            let d = s.detail(&id).await;
            (d.rollout.counts.committed == 1).then_some(())
        },
    )
    .await;
    assert_eq!(serving(&online).await, Some(1));
    let d = wait_for(
        "the controller to hold",
        Duration::from_secs(30),
        || async {
            let d = s.detail(&id).await;
            d.rollout
                .decision
                .contains("1 of 2 devices committed")
                .then_some(d)
        },
    )
    .await;
    assert_eq!(d.rollout.state, RolloutState::Active, "{d:#?}");

    // The hub restarts mid-rollout, then the device comes back: it gets
    // the install it missed, and the restarted controller completes.
    s.hub.restart().await;
    let back = Agent::start_with(offline.dir.clone(), Some(&offline_config)).await;
    s.finished(&id, RolloutState::Completed).await;
    assert_eq!(serving(&back).await, Some(1));
    assert_eq!(classify(&back, LIGHTS).await, "HassTurnOn");
    let text = ok(&s.strata(&["rollout", "status"]));
    assert!(text.contains(&id) && text.contains("completed"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_breached_gate_aborts_the_rollout_and_rolls_committed_devices_back() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    // Traffic on the device throughout, so the new release's latency is
    // measured in its health window; the gate cannot hold (p95 < 1 µs).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), agent.local.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = client
                    .post(format!("{url}/v1/classify"))
                    .json(&serde_json::json!({"model": "intents", "input": [LIGHTS]}))
                    .send()
                    .await;
            }
        })
    };
    let id = s.rollout_with(1, "100%", &["--gate", "p95_ms<0.001"]);
    let detail = s.finished(&id, RolloutState::Aborted).await;
    assert!(
        detail.rollout.decision.contains("gate breached"),
        "{}",
        detail.rollout.decision
    );
    // The device had committed; the abort sends it back.
    let detail = wait_for(
        "the device to roll back",
        Duration::from_secs(60),
        || async {
            let d = s.detail(&id).await;
            (only_device(&d).0 == UpdatePhase::RolledBack).then_some(d)
        },
    )
    .await;
    let why = only_device(&detail).1;
    assert!(why.contains("as the hub asked"), "{why}");
    assert!(detail.devices[0].requests > 0 && detail.devices[0].p95_ms.is_some());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    traffic.await.unwrap();
    assert_eq!(serving(&agent).await, None, "back on the catalogue's model");
    assert_eq!(classify(&agent, LIGHTS).await, "HassTurnOn");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_requests_that_cannot_be_honoured_get_problem_bodies() {
    use crate::support::{device_client, problem};
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    let cases = [
        (
            serde_json::json!({"model": "intents", "version": 9}),
            404,
            "no-such-release",
        ),
        (
            serde_json::json!({"model": "intents", "version": 1, "stages": [50, 20, 100]}),
            400,
            "bad-plan",
        ),
        (
            serde_json::json!({"model": "intents", "version": 1, "gates": ["latency<5"]}),
            400,
            "bad-gate",
        ),
        (
            serde_json::json!({"model": "intents", "version": 1, "max_failed": 3.0}),
            400,
            "bad-plan",
        ),
        (
            serde_json::json!({"model": "intents", "version": 1, "colour": "red"}),
            400,
            "",
        ),
    ];
    for (body, status, slug) in cases {
        let (got, p) = problem(s.hub.operator_post("/v1/rollouts", body.clone()).await).await;
        assert_eq!(got, status, "{body}: {p:?}");
        assert!(p.problem_type.ends_with(slug), "{body}: {p:?}");
    }
    // One live rollout per model: a second is refused while the first runs.
    let paused = s.rollout(1, "100%");
    ok(&s.strata(&["rollout", "pause", &paused]));
    let (got, p) = problem(
        s.hub
            .operator_post(
                "/v1/rollouts",
                serde_json::json!({"model": "intents", "version": 1}),
            )
            .await,
    )
    .await;
    assert_eq!(got, 409, "{p:?}");
    assert!(p.detail.contains(&paused), "{p:?}");
    // A device reports only on rollouts it is part of, only as itself, and
    // only in the phases a device reports.
    let device = device_client(&s.hub.ca_pem(), &agent.dir);
    let me = agent.status().await.unwrap().device_id;
    let report = |path: String, body: serde_json::Value| {
        let device = device.clone();
        let url = format!("{}{path}", s.hub.url);
        async move { device.post(url).json(&body).send().await.unwrap() }
    };
    let body = serde_json::json!({"seq": 1, "phase": "committed", "serving_version": 1});
    let (got, _) = problem(
        report(
            format!("/v1/devices/{me}/rollouts/ro-00000000"),
            body.clone(),
        )
        .await,
    )
    .await;
    assert_eq!(got, 404);
    let (got, _) = problem(
        report(
            format!("/v1/devices/dev-someone-else/rollouts/{paused}"),
            body,
        )
        .await,
    )
    .await;
    assert_eq!(got, 403);
    let (got, p) = problem(
        report(
            format!("/v1/devices/{me}/rollouts/{paused}"),
            serde_json::json!({"seq": 1, "phase": "notified", "serving_version": null}),
        )
        .await,
    )
    .await;
    assert_eq!(got, 400, "{p:?}");
    // Unknown actions and rollouts are 404s; the CLI says so in one line.
    let (got, _) = problem(
        s.hub
            .operator_post(
                &format!("/v1/rollouts/{paused}/explode"),
                serde_json::json!({}),
            )
            .await,
    )
    .await;
    assert_eq!(got, 404);
    let out = s.strata(&["rollout", "abort", "ro-nothere"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no rollout"), "{err}");
    let out = s.strata(&["rollout", "create", "intents", "--stages", "5%,100%"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name@version"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_online_keys_rotate_and_devices_follow_the_new_root() {
    let s = Setup::new().await;
    let agent = s.agent("agent", "").await;
    s.publish(&s.heads.b, 1, &[]);
    let id = s.rollout(1, "100%");
    s.finished(&id, RolloutState::Completed).await;

    // New snapshot and timestamp keys, under root v2 signed by the root keys.
    let keys = s.keys.display().to_string();
    let rotated = ok(&s.strata(&["keys", "rotate", "--keys", &keys]));
    assert!(rotated.contains("root v2 installed"), "{rotated}");
    assert!(s.keys.join("root-v1.json").exists());
    let next_keys: Vec<_> = std::fs::read_dir(s.hub.dir.join("registry"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".next"))
        .collect();
    assert!(
        next_keys.is_empty(),
        "the hub took its new keys: {next_keys:?}"
    );

    // The next release goes out under the new keys; the device, provisioned
    // with root v1, walks to v2 and accepts metadata only v2 vouches for.
    s.publish(&s.heads.a, 2, &[]);
    let id = s.rollout(2, "100%");
    s.finished(&id, RolloutState::Completed).await;
    assert_eq!(serving(&agent).await, Some(2));
    let trusted: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.dir.join("registry").join("trusted.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(trusted["root"]["body"]["version"], 2, "{trusted}");

    // A root that skips a version, or is signed by too few root keys, is
    // refused by the hub as a device would refuse it.
    let root = registry::read_unverified::<registry::Root>(
        &std::fs::read(s.keys.join("root.json")).unwrap(),
    )
    .unwrap();
    let key = registry::SigningKey::from_key_file(
        &std::fs::read_to_string(s.keys.join("root-1.key")).unwrap(),
    )
    .unwrap();
    let weak = registry::sign(
        &registry::Root {
            version: root.version + 1,
            ..root
        },
        &[&key],
    )
    .unwrap();
    let (status, p) = crate::support::problem(
        s.hub
            .operator_post(
                "/v1/registry/root",
                serde_json::json!({"root": String::from_utf8(weak).unwrap()}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 422, "{p:?}");
    assert!(p.detail.contains("threshold"), "{p:?}");
}
