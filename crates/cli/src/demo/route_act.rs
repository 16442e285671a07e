//! The demo's routing act: requests of each kind go through one device's
//! local API, and the terminal shows where each ran (the device's micro
//! model, the hub's macro model, or nowhere) and why, from the decision
//! record every answer carries.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Fleet;
use crate::output::out;

/// One request of the act.
struct Case {
    what: &'static str,
    prompt: &'static str,
    mode: Option<&'static str>,
    private: bool,
    /// Shown instead of the prompt (the prompt carries personal data).
    shown: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        what: "device command",
        prompt: "turn on the lights in the kitchen",
        mode: None,
        private: false,
        shown: None,
    },
    Case {
        what: "general question",
        prompt: "Which planet is the largest in the solar system?",
        mode: None,
        private: false,
        shown: None,
    },
    Case {
        what: "fleet question",
        prompt: "how many anomalies did all the sites report this week",
        mode: None,
        private: false,
        shown: None,
    },
    Case {
        what: "personal data",
        prompt: "Send my receipt to jane.doe@example.com and charge card 4111 1111 1111 1111",
        mode: Some("prefer_macro"),
        private: false,
        shown: Some("send my receipt to <e-mail>, charge <card number>"),
    },
    Case {
        what: "personal data",
        prompt: "Send my receipt to jane.doe@example.com and charge card 4111 1111 1111 1111",
        mode: Some("only_macro"),
        private: false,
        shown: Some("the same, but only_macro"),
    },
    Case {
        what: "marked private",
        prompt: "Summarise the notes from my doctor's visit",
        mode: Some("prefer_macro"),
        private: true,
        shown: None,
    },
];

/// The device's `GET /v1/router`, once it knows what the hub's macro tier
/// offers (it learns that over its link), within a minute.
pub(crate) async fn router_status_once_macro_known(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s: Value = client
            .get(format!("{url}/v1/router"))
            .send()
            .await?
            .json()
            .await?;
        if s["macro_tier"].is_object() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the device did not learn the hub's macro tier within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the act on the fleet's first device.
pub(crate) async fn run(fleet: &Fleet) -> anyhow::Result<()> {
    let Some(device) = fleet.devices.first() else {
        bail!("the routing act needs a device");
    };
    let url = fleet.local_api(device, Duration::from_secs(60)).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let status = router_status_once_macro_known(&client, &url).await?;
    out(&format!(
        "The router on a device at {} decides where each request runs (policy {}, default {}; macro model {} on the hub):",
        device.site,
        status["policy_version"].as_str().unwrap_or("?"),
        status["default_mode"].as_str().unwrap_or("?"),
        status["macro_tier"]["chat_model"]
            .as_str()
            .unwrap_or("none"),
    ));
    for case in CASES {
        let mut body = json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": case.prompt}],
            "temperature": 0, "max_tokens": 24,
        });
        if let Some(mode) = case.mode {
            body["strata"] = json!({"mode": mode});
        }
        let mut request = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&body);
        if case.private {
            request = request.header(protocol::route::PRIVATE_HEADER, "true");
        }
        let started = Instant::now();
        let response = request.send().await.context("asking the device")?;
        let code = response.status().as_u16();
        let answer: Value = response.json().await.context("reading the answer")?;
        let ms = started.elapsed().as_millis();
        let record = &answer["strata"];
        let tier = record["tier"].as_str().unwrap_or("?");
        let model = record["model"].as_str().unwrap_or("-");
        let why: Vec<&str> = record["reasons"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["message"].as_str()).collect())
            .unwrap_or_default();
        let shown = case.shown.unwrap_or(case.prompt);
        let mode = case.mode.map(|m| format!(" [{m}]")).unwrap_or_default();
        let private = if case.private {
            " [marked private]"
        } else {
            ""
        };
        out(&format!("  {:<16} {shown:?}{mode}{private}", case.what));
        let outcome = match code {
            200 => {
                let text = answer["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .replace('\n', " ");
                let text: String = text.chars().take(60).collect();
                format!("{tier:<5} {model:<20} {ms:>5} ms  {text:?}")
            }
            _ => format!(
                "{code} refused          {ms:>5} ms  {}",
                answer["error"]["code"].as_str().unwrap_or("error")
            ),
        };
        out(&format!("      → {outcome}"));
        out(&format!("        why: {}", why.join("; ")));
    }
    let audit = std::fs::read_to_string(device.data_dir.join("audit.log")).unwrap_or_default();
    let left = audit.lines().count();
    let clean = !audit.contains("jane.doe") && !audit.contains("4111");
    out(&format!(
        "  {left} request(s) left the device, each in its audit log ({}); personal data in them: {}.",
        device.data_dir.join("audit.log").display(),
        if clean { "none" } else { "FOUND" }
    ));
    Ok(())
}
