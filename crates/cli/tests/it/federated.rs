//! Federated learning end to end: a real hub coordinating rounds for
//! enrolled devices over mutual TLS, and `strata fl simulate` driving a
//! virtual fleet through the agent's client code.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use protocol::federated::{FlModel, FlRoundView, FlTask, FlTaskState};
use serde_json::json;

use crate::support::{
    Agent, Hub, STRATA, device_client, failed, join, ok, problem, strata, wait_for,
};

fn update(values: usize, value: f32) -> serde_json::Value {
    let delta = protocol::federated::F32Vector(vec![value; values]);
    json!({
        "delta": delta,
        "examples": 10,
        "evaluation": { "accuracy": 0.5, "loss": 0.7, "examples": 10 },
    })
}

async fn task(hub: &Hub, id: &str) -> FlTask {
    hub.client()
        .get(format!("{}/v1/fl/tasks/{id}", hub.url))
        .bearer_auth(&hub.operator_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn model(hub: &Hub, id: &str) -> FlModel {
    hub.client()
        .get(format!("{}/v1/fl/tasks/{id}/model", hub.url))
        .bearer_auth(&hub.operator_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Submissions that do not fit are refused with a problem and counted by
/// reason while the round goes on; a hub killed in the middle of the round
/// resumes it from its store; the aggregate is the mean of what was sent.
#[tokio::test(flavor = "multi_thread")]
async fn bad_submissions_are_refused_and_counted_and_a_round_survives_a_hub_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(tmp.path()).await;
    let ca = hub.ca_pem();
    let mut devices = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("d{i}"));
        ok(&join(&hub.token(&["site=fl"]), &dir));
        devices.push(device_client(&ca, &dir));
    }
    // Softmax regression over shuttle's 9 features: 20 parameters.
    let params = 9 * 2 + 2;
    let r = hub
        .operator_post(
            "/v1/fl/tasks",
            json!({
                "name": "shuttle-head",
                "model": { "inputs": 9, "hidden": 0, "classes": 2 },
                "labels": ["normal", "anomaly"],
                "dataset": "shuttle",
                "strategy": { "name": "fedavg" },
                "rounds": 1,
                "clients_per_round": 2,
                "over_selection": 0.0,
                "min_clients": 2,
                "round_deadline_secs": 600,
                "seed": 11,
                // Two examples the hub scores every model on.
                "held_out": {
                    "features": protocol::federated::F32Vector(vec![0.5; 18]),
                    "labels": [0, 1],
                },
            }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let created: FlTask = r.json().await.unwrap();
    let id = created.id.clone();
    assert_eq!(created.held_out_examples, Some(2));
    assert!(created.evaluation.is_some(), "the initial model is scored");
    let initial = model(&hub, &id).await.params.0;
    assert_eq!(initial.len(), params);

    // A bad spec is a 400 problem, not a task.
    let (status, p) = problem(
        hub.operator_post(
            "/v1/fl/tasks",
            json!({
                "name": "bad", "model": { "inputs": 9, "hidden": 0, "classes": 2 },
                "labels": ["only-one"], "dataset": "shuttle", "strategy": { "name": "median" },
                "rounds": 1, "clients_per_round": 2, "secagg": { "neighbours": 4, "fixed": { "scale_bits": 16, "clip": 1.0 } },
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert!(p.detail.contains("labels"), "{}", p.detail);
    // So is a robust strategy that rounds this small could never run, and
    // a secure-aggregation dropout rate a majority would not survive.
    for (strategy, secagg, clients, says) in [
        (
            json!({ "name": "median", "mixing": 1 }),
            None,
            2,
            "at least 3 updates per round",
        ),
        (
            json!({ "name": "multi_krum", "byzantine": 1 }),
            None,
            4,
            "at least 5 updates per round",
        ),
        (
            json!({ "name": "fedavg" }),
            Some(json!({ "dropout": 0.5, "fixed": { "scale_bits": 16, "clip": 1.0 } })),
            4,
            "dropout",
        ),
    ] {
        let (status, p) = problem(
            hub.operator_post(
                "/v1/fl/tasks",
                json!({
                    "name": "bad", "model": { "inputs": 9, "hidden": 0, "classes": 2 },
                    "labels": ["normal", "anomaly"], "dataset": "shuttle", "strategy": strategy,
                    "rounds": 1, "clients_per_round": clients, "secagg": secagg,
                }),
            )
            .await,
        )
        .await;
        assert_eq!(status, 400, "{strategy}");
        assert!(p.detail.contains(says), "{}", p.detail);
    }

    wait_for("round 1 to open", Duration::from_secs(30), || async {
        (task(&hub, &id).await.current_round == Some(1)).then_some(())
    })
    .await;
    let base = hub.url.clone();
    let url = |tail: &str| format!("{base}/v1/fl/tasks/{id}/rounds/1{tail}");
    let mut selected = Vec::new();
    let mut left_out = Vec::new();
    for d in &devices {
        let view: FlRoundView = d.get(url("")).send().await.unwrap().json().await.unwrap();
        if view.selected {
            selected.push(d.clone());
        } else {
            left_out.push(d.clone());
        }
    }
    assert_eq!((selected.len(), left_out.len()), (2, 1));

    let post =
        |d: &reqwest::Client, body: serde_json::Value| d.post(url("/update")).json(&body).send();
    let (status, p) = problem(post(&left_out[0], update(params, 0.1)).await.unwrap()).await;
    assert_eq!(
        (status, p.problem_type.ends_with("not-selected")),
        (403, true),
        "{p:?}"
    );
    let (status, p) = problem(post(&selected[0], update(params - 1, 0.1)).await.unwrap()).await;
    assert_eq!(
        (status, p.problem_type.ends_with("fl-wrong-shape")),
        (400, true),
        "{p:?}"
    );
    let r = post(&selected[0], update(params, 0.1)).await.unwrap();
    assert_eq!(r.status(), 202);

    // The hub dies in the middle of the round and comes back.
    hub.restart().await;
    let view: FlRoundView = selected[1]
        .get(url(""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view.phase, protocol::federated::FlPhase::Train);
    let (status, p) = problem(post(&selected[0], update(params, 0.1)).await.unwrap()).await;
    assert_eq!(
        (status, p.problem_type.ends_with("fl-replayed")),
        (409, true),
        "{p:?}"
    );
    let r = post(&selected[1], update(params, 0.3)).await.unwrap();
    assert_eq!(r.status(), 202);

    let done = wait_for("the task to complete", Duration::from_secs(30), || async {
        let t = task(&hub, &id).await;
        (t.state == FlTaskState::Completed).then_some(t)
    })
    .await;
    let round = &done.history[0];
    assert!(round.aggregated);
    assert_eq!(round.aggregated_updates, 2);
    for reason in ["not_selected", "wrong_shape", "replayed"] {
        assert_eq!(
            round.refused.get(reason),
            Some(&1),
            "{reason}: {:?}",
            round.refused
        );
    }
    // Example-weighted mean of 0.1 and 0.3 (10 examples each).
    let after = model(&hub, &id).await.params.0;
    for (a, b) in after.iter().zip(&initial) {
        assert!((a - b - 0.2).abs() < 1e-5, "{a} - {b}");
    }
    // An update for a round that is over is a replay.
    let (status, _) = problem(post(&selected[1], update(params, 0.3)).await.unwrap()).await;
    assert_eq!(status, 409);

    // The hub scored the new model on the held-out pair: both examples are
    // identical, so exactly one of them is right.
    let held_out = round.evaluation.expect("held-out evaluation");
    assert_eq!((held_out.examples, held_out.accuracy), (2, 0.5));

    // The finished task's model becomes a signed release with its metrics.
    let keys = tmp.path().join("keys");
    hub.init_registry_keys(&keys);
    let token_file = tmp.path().join("operator.token");
    let head = tmp.path().join("head.safetensors");
    let (keys_arg, head_arg) = (keys.display().to_string(), head.display().to_string());
    let publish = |version: &str| {
        strata(
            &[
                "fl",
                "publish",
                &id,
                "--version",
                version,
                "--keys",
                &keys_arg,
                "--out",
                &head_arg,
            ],
            &hub,
            &token_file,
        )
    };
    let text = ok(&publish("1"));
    assert!(text.contains("published shuttle-head@1"), "{text}");
    assert!(text.contains("held_out_accuracy=0.5000"), "{text}");
    let shown = ok(&strata(
        &["model", "show", "shuttle-head@1"],
        &hub,
        &token_file,
    ));
    assert!(
        shown.contains("held_out_accuracy") && shown.contains(&id),
        "{shown}"
    );
    let head = runtime::classifier::ClassifierHead::load(&head).unwrap();
    assert_eq!(head.labels(), ["normal", "anomaly"]);
    // A task that does not exist is one readable error.
    let err = failed(&strata(
        &[
            "fl",
            "publish",
            "fl-nope",
            "--version",
            "2",
            "--keys",
            &keys_arg,
        ],
        &hub,
        &token_file,
    ));
    assert!(err.contains("fl-nope"), "{err}");
}

fn simulate(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let json = dir.join("report.json");
    let out = Command::new(STRATA)
        .args(["fl", "simulate", "--dataset", "shuttle", "--dir"])
        .arg(dir.join("sim"))
        .arg("--json")
        .arg(&json)
        .args(extra)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap();
    ok(&out);
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// Plain FedAvg over a non-IID split reaches centralised accuracy on the
/// held-out readings.
#[test]
fn simulated_fedavg_matches_centralised_training() {
    let tmp = tempfile::tempdir().unwrap();
    let report = simulate(
        tmp.path(),
        &["--clients", "20", "--per-round", "10", "--rounds", "6"],
    );
    let fed = report["final_accuracy"].as_f64().unwrap();
    let central = report["centralised_accuracy"].as_f64().unwrap();
    assert!(
        fed >= central - 0.02,
        "federated {fed}, centralised {central}"
    );
    assert_eq!(report["rounds"].as_array().unwrap().len(), 6);
}

/// Secure aggregation with a fifth of the devices dropping out after
/// sharing their keys still recovers the sum, and the model still learns.
/// The roster of 12 is smaller than the neighbourhood, so every device
/// masks with every other, and the sum survives whenever no more than a
/// third of the roster drops (a round where more drop fails, and the next
/// round runs).
#[test]
fn secure_aggregation_survives_dropouts() {
    let tmp = tempfile::tempdir().unwrap();
    let report = simulate(
        tmp.path(),
        &[
            "--clients",
            "16",
            "--per-round",
            "12",
            "--rounds",
            "3",
            "--secagg",
            "--dropout",
            "0.2",
            "--deadline-secs",
            "5",
        ],
    );
    let rounds = report["rounds"].as_array().unwrap();
    let dropped: u64 = rounds.iter().map(|r| r["dropped"].as_u64().unwrap()).sum();
    assert!(dropped > 0, "no device dropped: {rounds:?}");
    let fed = report["final_accuracy"].as_f64().unwrap();
    let central = report["centralised_accuracy"].as_f64().unwrap();
    assert!(
        fed >= central - 0.05,
        "federated {fed}, centralised {central}"
    );
}

/// The accountant stops the task before its ε budget is spent.
#[test]
fn differential_privacy_stops_at_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let report = simulate(
        tmp.path(),
        &[
            "--clients",
            "50",
            "--per-round",
            "10",
            "--rounds",
            "40",
            "--dp-noise",
            "1.5",
            "--epsilon-budget",
            "3.0",
            "--no-baseline",
        ],
    );
    let eps = report["epsilon"].as_f64().unwrap();
    assert!(eps > 0.0 && eps <= 3.0, "ε = {eps}");
    let rounds = report["rounds"].as_array().unwrap().len();
    assert!(rounds < 40, "{rounds} rounds ran");
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("privacy budget"),
        "{report}"
    );
}

/// Real agents take part from their own data named in `[federated]`: each
/// trains on its readings and sends only its update; an agent without data
/// declines, and its rounds close at the deadline with the others' updates.
#[tokio::test(flavor = "multi_thread")]
async fn agents_train_on_their_own_data() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    // Readings of two features: anomalous when the first is positive. Each
    // agent sees a different part of the space (non-IID).
    let mut agents = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("agent{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("edge.toml");
        if i < 2 {
            let mut csv = String::new();
            for k in 0..40 {
                let x = (k as f32 - 20.0) / 10.0 + if i == 0 { 0.5 } else { -0.5 };
                let y = (k % 7) as f32 / 7.0 - 0.5;
                let class = if x > 0.0 { "anomaly" } else { "normal" };
                csv.push_str(&format!("{x},{y},{class}\n"));
            }
            std::fs::write(dir.join("readings.csv"), csv).unwrap();
            std::fs::write(&config, "[federated]\nshuttle = \"readings.csv\"\n").unwrap();
        } else {
            std::fs::write(&config, "").unwrap();
        }
        agents.push(Agent::enrol_with_config(&hub, dir.join("data"), &config).await);
    }
    for a in &agents {
        a.wait_connected(1, Duration::from_secs(60)).await;
    }
    let held_out: Vec<f32> = [-1.5, 0.2, -0.4, -0.3, 0.6, 0.1, 1.4, -0.2]
        .into_iter()
        .collect();
    let r = hub
        .operator_post(
            "/v1/fl/tasks",
            json!({
                "name": "readings",
                "model": { "inputs": 2, "hidden": 0, "classes": 2 },
                "labels": ["normal", "anomaly"],
                "dataset": "shuttle",
                "strategy": { "name": "fedavg" },
                "rounds": 2,
                "clients_per_round": 3,
                "over_selection": 0.0,
                "min_clients": 2,
                "round_deadline_secs": 5,
                "local": { "epochs": 20, "batch_size": 8, "learning_rate": 1.0 },
                "seed": 5,
                "held_out": {
                    "features": protocol::federated::F32Vector(held_out),
                    "labels": [0, 0, 1, 1],
                },
            }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let created = r.json::<FlTask>().await.unwrap();
    let (id, before) = (created.id, created.evaluation.expect("initial evaluation"));
    let done = wait_for("the task to complete", Duration::from_secs(60), || async {
        let t = task(&hub, &id).await;
        (t.state != FlTaskState::Running).then_some(t)
    })
    .await;
    assert_eq!(done.state, FlTaskState::Completed, "{done:?}");
    for round in &done.history {
        assert!(round.aggregated, "{round:?}");
        assert_eq!(
            (round.invited, round.aggregated_updates),
            (3, 2),
            "{round:?}"
        );
        let seen = round.client_evaluation.expect("the agents' own evaluation");
        assert_eq!(seen.examples, 80);
    }
    let e = done.evaluation.expect("held-out evaluation");
    assert_eq!(e.accuracy, 1.0, "{e:?}");
    assert!(e.loss < before.loss * 0.8, "{before:?} -> {e:?}");
}
