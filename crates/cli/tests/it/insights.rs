//! Insights end to end: the hub refuses bad batches and stores good ones
//! once; analytics over them; and the chaos test: agents producing insights
//! while the hub is SIGKILLed, the network is cut and agents are killed,
//! after which the hub holds every acknowledged insight exactly once, byte
//! for byte, and the outbox counters explain every one it does not.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netfault::FaultProxy;
use protocol::insight::InsightList;
use rand::Rng;
use serde_json::{Value, json};

use crate::support::{Agent, Hub, device_client, join, problem, wait_for};

/// Joins a device with a site label (no agent running) and returns its
/// directory and id.
async fn joined(hub: &Hub, root: &Path, name: &str, site: &str) -> (PathBuf, String) {
    let dir = root.join(name);
    let out = join(
        &hub.token(&[&format!("site={site}"), &format!("name={name}")]),
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = hub
        .devices()
        .await
        .into_iter()
        .find(|d| d.labels.get("name").map(String::as_str) == Some(name))
        .expect("the joined device is listed")
        .id
        .to_string();
    (dir, id)
}

fn insight(key: &str, series: &str, start_ms: i64, value: f64) -> Value {
    json!({
        "key": key, "kind": "intent_count", "series": series, "priority": "insight",
        "start_ms": start_ms, "window_ms": 60_000, "value": value
    })
}

async fn list_all(hub: &Hub, query: &str) -> InsightList {
    let query = if query.contains("limit=") {
        query.to_owned()
    } else {
        format!("limit=5000&{query}")
    };
    let r = hub
        .client()
        .get(format!("{}/v1/insights?{query}", hub.url))
        .bearer_auth(&hub.operator_token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_batches_are_refused_whole_and_good_ones_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let (dir, id) = joined(&hub, tmp.path(), "d1", "north").await;
    let (_, other) = joined(&hub, tmp.path(), "d2", "south").await;
    let device = device_client(&hub.ca_pem(), &dir);
    let post = |path_id: String, body: Value| {
        let device = device.clone();
        let url = format!("{}/v1/devices/{path_id}/insights", hub.url);
        async move { device.post(url).json(&body).send().await.unwrap() }
    };
    let t0 = 1_790_000_000_000i64;
    let good: Vec<Value> = (0..3)
        .map(|i| insight(&format!("k-{i}"), "HassTurnOn", t0 + i * 60_000, 1.0))
        .collect();

    let mut bad_value = good.clone();
    bad_value[1]["value"] = json!("many");
    let mut bad_key = good.clone();
    bad_key[2]["key"] = json!("has spaces");
    let cases: Vec<(&str, String, Value, u16, &str)> = vec![
        (
            "malformed record",
            id.clone(),
            json!({"device_id": id, "insights": bad_value}),
            400,
            "insight 1",
        ),
        (
            "invalid key",
            id.clone(),
            json!({"device_id": id, "insights": bad_key}),
            400,
            "insight 2",
        ),
        (
            "another device in the body",
            id.clone(),
            json!({"device_id": other, "insights": good}),
            403,
            "belongs to",
        ),
        (
            "another device in the path",
            other.clone(),
            json!({"device_id": other, "insights": good}),
            403,
            "belongs to",
        ),
        (
            "too many insights",
            id.clone(),
            json!({"device_id": id, "insights": (0..1001).map(|i| insight(&format!("x{i}"), "s", t0, 1.0)).collect::<Vec<_>>()}),
            413,
            "1000",
        ),
        (
            "too many bytes",
            id.clone(),
            json!({"device_id": id, "insights": [insight("big", &"s".repeat(200), t0, 1.0)], "pad": "x".repeat(1 << 21)}),
            413,
            "the most accepted is 1048576",
        ),
        (
            "unknown field",
            id.clone(),
            json!({"device_id": id, "insights": good, "extra": 1}),
            400,
            "extra",
        ),
    ];
    for (what, path_id, body, status, needle) in cases {
        let (got, p) = problem(post(path_id, body).await).await;
        assert_eq!(got, status, "{what}: {}", p.detail);
        assert!(p.detail.contains(needle), "{what}: {}", p.detail);
    }
    assert!(
        list_all(&hub, "").await.insights.is_empty(),
        "refused batches stored nothing"
    );

    // A good batch is stored once; sent again, it is recognised.
    for (stored, duplicates) in [(3, 0), (0, 3)] {
        let r = post(id.clone(), json!({"device_id": id, "insights": good})).await;
        assert_eq!(r.status(), 200);
        let ack: Value = r.json().await.unwrap();
        assert_eq!(ack, json!({"stored": stored, "duplicates": duplicates}));
    }
    let listed = list_all(&hub, "").await;
    assert_eq!(listed.insights.len(), 3);
    for (item, sent) in listed.insights.iter().zip(&good) {
        assert_eq!(item.site.as_deref(), Some("north"));
        assert_eq!(item.device_id.as_str(), id);
        assert_eq!(serde_json::from_str::<Value>(&item.raw).unwrap(), *sent);
    }
    // Filters and paging.
    assert_eq!(list_all(&hub, "site=south").await.insights.len(), 0);
    assert_eq!(
        list_all(&hub, &format!("from_ms={}", t0 + 60_000))
            .await
            .insights
            .len(),
        2
    );
    let page = list_all(&hub, "limit=2").await;
    assert_eq!(page.insights.len(), 2);
    let rest = list_all(&hub, &format!("after={}", page.next_after.unwrap())).await;
    assert_eq!(rest.insights.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregates_trends_and_forecasts_over_sites() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let width = 60_000i64;
    let t0 = 1_790_000_000_000i64 / width * width;
    let mut ids = Vec::new();
    for (name, site) in [("n1", "north"), ("s1", "south"), ("w1", "west")] {
        let (dir, id) = joined(&hub, tmp.path(), name, site).await;
        // North and south rise steadily; west stays flat.
        let rising = site != "west";
        let batch: Vec<Value> = (0..20)
            .map(|i| {
                let v = if rising {
                    10.0 + 3.0 * i as f64 + (i % 3) as f64
                } else {
                    7.0 + (i % 2) as f64
                };
                insight(&format!("{name}-{i}"), "HassTurnOn", t0 + i * width, v)
            })
            .collect();
        let r = device_client(&hub.ca_pem(), &dir)
            .post(format!("{}/v1/devices/{id}/insights", hub.url))
            .json(&json!({"device_id": id, "insights": batch}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(id);
    }
    let get = |path: String| {
        let client = hub.client();
        let token = hub.operator_token.clone();
        async move {
            let r = client.get(path).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let range = format!("bucket_secs=60&from_ms={t0}&to_ms={}", t0 + 20 * width);

    let (status, agg) = get(format!(
        "{}/v1/insights/aggregates?kind=intent_count&series=HassTurnOn&{range}",
        hub.url
    ))
    .await;
    assert_eq!(status, 200, "{agg}");
    let fleet = agg["fleet"].as_array().unwrap();
    assert_eq!(fleet.len(), 20);
    for (i, b) in fleet.iter().enumerate() {
        let site_sum: f64 = ["north", "south", "west"]
            .iter()
            .map(|s| agg["sites"][s][i]["sum"].as_f64().unwrap())
            .sum();
        assert_eq!(b["sum"].as_f64().unwrap(), site_sum, "bucket {i}");
        assert_eq!(b["count"], 3);
    }

    let (status, trends) = get(format!("{}/v1/insights/trends?{range}", hub.url)).await;
    assert_eq!(status, 200, "{trends}");
    assert_eq!(trends["examined"], 1);
    let findings = &trends["series"][0]["report"]["findings"];
    let cross = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "cross_site_trend")
        .unwrap_or_else(|| panic!("a cross-site trend is flagged: {findings}"));
    assert_eq!(cross["direction"], "increasing");
    let sites: Vec<&str> = cross["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["site"].as_str().unwrap())
        .collect();
    assert_eq!(sites, ["north", "south"], "{cross}");

    let (status, f) = get(format!(
        "{}/v1/insights/forecast?kind=intent_count&series=HassTurnOn&site=north&horizon=4&{range}",
        hub.url
    ))
    .await;
    assert_eq!(status, 200, "{f}");
    let points = f["forecast"]["point"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    let last = f["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_f64()
        .unwrap();
    assert!(
        points[3].as_f64().unwrap() > last,
        "a rising series forecasts higher: {f}"
    );

    // The same through `strata insights`, from the hub's data directory.
    let cli = |args: &[&str]| {
        std::process::Command::new(crate::support::STRATA)
            .arg("insights")
            .args(args)
            .arg("--hub-data-dir")
            .arg(&hub.dir)
            .arg("--operator-token-file")
            .arg(tmp.path().join("operator.token"))
            .env("STRATA_LOG", "warn")
            .output()
            .unwrap()
    };
    let listed = cli(&[
        "list", "--site", "north", "--since", "400d", "--limit", "100",
    ]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let text = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains("HassTurnOn")).count(),
        20,
        "{text}"
    );
    let bad = cli(&[
        "aggregate",
        "--kind",
        "intent_count",
        "--series",
        "HassTurnOn",
        "--bucket",
        "1s",
        "--since",
        "400d",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("buckets"), "{err}");

    // Bad queries are problems.
    for (query, status_wanted) in [
        ("kind=intent_count", 400),
        ("kind=intent_count&series=HassTurnOn&bucket_secs=0", 400),
        ("kind=intent_count&series=HassTurnOn&colour=red", 400),
        ("kind=intent_count&series=HassTurnOn&horizon=soon", 400),
        ("kind=intent_count&series=Nothing&horizon=3", 404),
        ("kind=intent_count&series=HassTurnOn&site=nowhere", 404),
    ] {
        let r = hub
            .client()
            .get(format!(
                "{}/v1/insights/forecast?{query}&from_ms={t0}&to_ms={}",
                hub.url,
                t0 + 20 * width
            ))
            .bearer_auth(&hub.operator_token)
            .send()
            .await
            .unwrap();
        let (got, p) = problem(r).await;
        assert_eq!(got, status_wanted, "{query}: {}", p.detail);
    }
}

/// What a producer was told about its insights: key to exact text.
type Acked = Arc<Mutex<HashMap<String, String>>>;

/// Posts batches of insights to an agent's local API until `stop`, keeping
/// those the agent acknowledged (201). Requests to a dead agent fail and are
/// retried against whatever address the agent has now.
async fn produce(dir: PathBuf, acked: Acked, stop: Arc<std::sync::atomic::AtomicBool>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let Ok(addr) = std::fs::read_to_string(dir.join("local-api.addr")) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let batch: Vec<Value> = (0..10)
            .map(|i| {
                json!({
                    "kind": "chaos", "series": format!("s{}", (n + i) % 7), "priority": "insight",
                    "start_ms": 1_790_000_000_000u64 + n + i, "window_ms": 0, "value": (n + i) as f64,
                    "summary": format!("insight {} of the chaos producer", n + i)
                })
            })
            .collect();
        match client
            .post(format!("http://{}/v1/insights", addr.trim()))
            .json(&batch)
            .send()
            .await
        {
            Ok(r) if r.status() == 201 => {
                let appended: Vec<Value> = r.json().await.unwrap();
                let mut acked = acked.lock().unwrap();
                for a in appended {
                    acked.insert(
                        a["key"].as_str().unwrap().to_owned(),
                        a["raw"].as_str().unwrap().to_owned(),
                    );
                }
                n += 10;
            }
            Ok(r) => {
                // The outbox refused (full of as-urgent insights): counted by
                // the agent, not acknowledged.
                assert_eq!(r.status(), 507, "unexpected answer {}", r.status());
                n += 10;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_every_acknowledged_insight_arrives_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(tmp.path()).await;
    let hub_addr = hub.url.trim_start_matches("https://").parse().unwrap();
    let proxy = FaultProxy::start(hub_addr).await.unwrap();

    // Three agents behind the proxy; the last has a small outbox, so the
    // outage overflows it and the overflow policy drops insights.
    let budgets = [16u64 << 20, 16 << 20, 64 << 10];
    let mut agents = Vec::new();
    let mut configs = Vec::new();
    for (i, budget) in budgets.iter().enumerate() {
        let config = tmp.path().join(format!("edge{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[hub]\nurl = \"https://{}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 400\nrequest_timeout_secs = 2\n\
                 [insights]\noutbox_budget_bytes = {budget}\nbatch_max = 200\n",
                proxy.addr()
            ),
        )
        .unwrap();
        agents
            .push(Agent::enrol_with_config(&hub, tmp.path().join(format!("a{i}")), &config).await);
        configs.push(config);
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Vec<Acked> = (0..agents.len()).map(|_| Acked::default()).collect();
    let producers: Vec<_> = agents
        .iter()
        .zip(&acked)
        .map(|(a, acked)| {
            tokio::spawn(produce(a.dir.clone(), Arc::clone(acked), Arc::clone(&stop)))
        })
        .collect();

    // Chaos for a bounded time: hub SIGKILLs, network cuts, agent SIGKILLs.
    let chaos_until = Instant::now() + Duration::from_secs(20);
    let mut rng = rand::rng();
    let mut actions = BTreeMap::<&str, u32>::new();
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        match rng.random_range(0..3) {
            0 => {
                hub.kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
                hub.restart().await;
                *actions.entry("hub killed").or_default() += 1;
            }
            1 => {
                proxy.cut();
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
                proxy.restore();
                *actions.entry("network cut").or_default() += 1;
            }
            _ => {
                let i = rng.random_range(0..agents.len());
                agents[i].kill();
                agents[i] = Agent::start_with(agents[i].dir.clone(), Some(&configs[i])).await;
                *actions.entry("agent killed").or_default() += 1;
            }
        }
    }
    // One long outage, so the small outbox overflows for certain.
    proxy.cut();
    wait_for(
        "the small outbox to overflow",
        Duration::from_secs(60),
        || async {
            agents[2]
                .status()
                .await
                .and_then(|s| s.outbox)
                .filter(|o| o.evicted > 0)
        },
    )
    .await;
    proxy.restore();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    eprintln!("chaos actions: {actions:?}");

    // Heal: every agent drains its outbox.
    for a in &agents {
        wait_for("the outbox to drain", Duration::from_secs(90), || async {
            a.status()
                .await
                .and_then(|s| s.outbox)
                .filter(|o| o.pending == 0)
        })
        .await;
    }

    let devices = hub.devices().await;
    let mut stored: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut after = 0;
    loop {
        let page = list_all(&hub, &format!("kind=chaos&after={after}")).await;
        for item in page.insights {
            let by_device = stored.entry(item.device_id.to_string()).or_default();
            assert!(
                by_device
                    .insert(item.insight.key.clone(), item.raw)
                    .is_none(),
                "insight {} stored twice",
                item.insight.key
            );
        }
        match page.next_after {
            Some(a) => after = a,
            None => break,
        }
    }
    for (i, a) in agents.iter().enumerate() {
        let status = a.status().await.unwrap();
        let outbox = status.outbox.unwrap();
        let id = status.device_id.to_string();
        assert!(devices.iter().any(|d| d.id.as_str() == id));
        let at_hub = stored.remove(&id).unwrap_or_default();
        let acked = acked[i].lock().unwrap();
        let mut missing = 0;
        for (key, raw) in acked.iter() {
            match at_hub.get(key) {
                Some(stored_raw) => assert_eq!(stored_raw, raw, "insight {key} byte for byte"),
                None => missing += 1,
            }
        }
        eprintln!(
            "agent {i}: {} acknowledged, {} at the hub, {missing} missing, {} evicted, {} refused",
            acked.len(),
            at_hub.len(),
            outbox.evicted,
            outbox.refused
        );
        assert!(!acked.is_empty(), "agent {i} produced insights");
        // Every acknowledged insight is at the hub, or was dropped by the
        // overflow policy and counted.
        assert!(
            missing as u64 <= outbox.evicted,
            "agent {i}: {missing} acknowledged insights missing but only {} evicted",
            outbox.evicted
        );
        if budgets[i] > 1 << 20 {
            assert_eq!(missing, 0, "agent {i} had room for everything");
            assert_eq!(outbox.evicted, 0);
        }
    }
    assert!(
        stored.is_empty(),
        "insights from unknown devices: {:?}",
        stored.keys()
    );
}
