//! `strata demo` on its defaults brings up a hub and 8 devices across 2
//! sites, each serving real models, takes a site offline and back, and
//! rolls a good and a broken model release out to the fleet.

use std::process::Command;

use crate::support::STRATA;

#[test]
fn the_demo_enrols_its_fleet_and_shows_it_online() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(STRATA)
        .args(["demo", "--duration", "3s", "--dir"])
        .arg(tmp.path())
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("8 devices across 2 sites joined over mutual TLS"),
        "{stdout}"
    );
    assert!(stdout.contains("8/8 devices online"), "{stdout}");
    assert!(stdout.contains("site-1") && stdout.contains("site-2"));
    // Devices of both sites answer with their local models.
    assert_eq!(
        stdout
            .matches("\"The capital of France is Paris.\"")
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(stdout.matches("HassTurnOff").count(), 2, "{stdout}");
    // The router: a fleet question goes to the hub's macro model, personal
    // data stays on the device (and is refused in only_macro), and nothing
    // personal reaches the audit log.
    let routed = |what: &str, nth: usize| -> String {
        let lines: Vec<&str> = stdout.lines().collect();
        let i = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with(what))
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("no {what:?} line: {stdout}"));
        format!("{}\n{}", lines[i + 1], lines[i + 2])
    };
    let fleet = routed("fleet question", 0);
    assert!(fleet.contains("→ macro qwen2.5-coder-0.5b"), "{fleet}");
    assert!(fleet.contains("fleet-wide"), "{fleet}");
    let private = routed("personal data", 0);
    assert!(private.contains("→ local"), "{private}");
    assert!(
        routed("personal data", 1).contains("403 refused"),
        "{stdout}"
    );
    assert!(routed("marked private", 0).contains("→ local"), "{stdout}");
    assert!(stdout.contains("personal data in them: none."), "{stdout}");
    // The last site goes offline, keeps working, and catches up: the hub
    // ends with exactly what the site's devices produced.
    assert!(stdout.contains("site-2 loses its uplink"), "{stdout}");
    assert!(
        stdout.contains("insights kept in their outboxes"),
        "{stdout}"
    );
    let caught_up = stdout
        .lines()
        .find(|l| l.contains("caught up in"))
        .unwrap_or_else(|| panic!("no catch-up line: {stdout}"));
    assert!(caught_up.contains("none lost, none twice"), "{caught_up}");
    // A healthy release rolls out in stages to every device; a signed but
    // broken one fails its health probes on the one-device canary, the
    // rollout aborts, and every device still serves the healthy release.
    assert!(
        stdout.contains("intents@1 committed on 8/8 devices"),
        "{stdout}"
    );
    assert!(stdout.contains("stage 3/3 (100%)"), "{stdout}");
    let caught = stdout
        .lines()
        .find(|l| l.contains("caught at the canary"))
        .unwrap_or_else(|| panic!("no canary line: {stdout}"));
    assert!(caught.contains("1 of 8 devices were asked"), "{caught}");
    assert!(caught.contains("health check failed"), "{caught}");
    assert!(
        stdout.contains("8/8 devices serve intents@1; none serves the broken release"),
        "{stdout}"
    );
    // The devices train an intent head together with secure aggregation:
    // every round sums all eight masked updates, the held-out accuracy the
    // hub measures rises, and the model becomes a signed release.
    let rounds: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("masked updates summed"))
        .collect();
    assert_eq!(rounds.len(), 6, "{stdout}");
    let accuracy = |line: &str| -> f64 {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no accuracy in {line}"))
    };
    for line in &rounds {
        assert!(line.contains(": 8 masked updates summed"), "{line}");
    }
    let (first, last) = (accuracy(rounds[0]), accuracy(rounds[5]));
    assert!(last > first && last > 0.6, "{first} -> {last}: {stdout}");
    assert!(stdout.contains("published intents-fl@1"), "{stdout}");
    // The same task at fleet scale with differential privacy: the
    // accountant's ε is reported, within the task's budget, and the noisy
    // model still learns.
    let privacy = stdout
        .lines()
        .find(|l| l.contains("privacy: ε = "))
        .unwrap_or_else(|| panic!("no privacy line: {stdout}"));
    let epsilon: f64 = privacy
        .split("ε = ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ε in {privacy}"));
    assert!(epsilon > 1.0 && epsilon <= 8.0, "{privacy}");
    assert!(privacy.contains("after 10 rounds"), "{privacy}");
    assert!(accuracy(privacy) > 0.4, "{privacy}");
    // Each device has its own identity.
    let certs: std::collections::BTreeSet<Vec<u8>> = std::fs::read_dir(tmp.path().join("devices"))
        .unwrap()
        .map(|d| std::fs::read(d.unwrap().path().join("identity/device.crt")).unwrap())
        .collect();
    assert_eq!(certs.len(), 8);
}
