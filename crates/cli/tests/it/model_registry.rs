//! The signed model registry end to end: a key ceremony, a release
//! published through a real hub, and a device that verifies the whole chain
//! (timestamp, snapshot, targets, manifest, artifact) before it would install
//! anything, including a download resumed half way. Tampering is refused.

use std::process::Command;

use registry::TrustedState;

use crate::support::{Hub, STRATA, device_client, failed, join, ok, strata};

#[tokio::test(flavor = "multi_thread")]
async fn a_published_model_verifies_on_a_device_and_tampering_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(tmp.path()).await;
    let token_file = tmp.path().join("operator.token");
    let keys = tmp.path().join("keys");
    let keys_arg = keys.display().to_string();

    let model = tmp.path().join("intents.safetensors");
    let weights: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&model, &weights).unwrap();
    let model_arg = model.display().to_string();
    hub.init_registry_keys(&keys);

    let publish = |version: &str, keys: &str| {
        strata(
            &[
                "model",
                "publish",
                &model_arg,
                "--name",
                "intents",
                "--version",
                version,
                "--keys",
                keys,
                "--metric",
                "accuracy=0.955",
            ],
            &hub,
            &token_file,
        )
    };
    let text = ok(&publish("1", &keys_arg));
    assert!(text.contains("published intents@1"), "{text}");
    let listed = ok(&strata(&["model", "list"], &hub, &token_file));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("intents") && l.contains(" 1 ")),
        "{listed}"
    );

    // The same release again, or an older one, is refused.
    let err = failed(&publish("1", &keys_arg));
    assert!(
        err.contains("not newer") || err.contains("rollback"),
        "{err}"
    );

    // A manifest signed by a key the root does not name is refused by the hub.
    let rogue = tmp.path().join("rogue");
    ok(&Command::new(STRATA)
        .args(["keys", "init", "--out"])
        .arg(&rogue)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap());
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(keys.join("root.json"), mixed.join("root.json")).unwrap();
    std::fs::copy(rogue.join("targets.key"), mixed.join("targets.key")).unwrap();
    let err = failed(&publish("2", &mixed.display().to_string()));
    assert!(err.contains("422") && err.contains("key"), "{err}");

    // A device, provisioned with root.json, verifies everything it fetches.
    let device_dir = tmp.path().join("device");
    assert!(join(&hub.token(&[]), &device_dir).status.success());
    let device = device_client(&hub.ca_pem(), &device_dir);
    let fetch = |path: String| {
        let device = device.clone();
        let url = format!("{}{path}", hub.url);
        async move {
            let r = device.get(url).send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.bytes().await.unwrap().to_vec()
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let mut trusted =
        TrustedState::bootstrap(&std::fs::read(keys.join("root.json")).unwrap(), now).unwrap();
    trusted
        .update_timestamp(&fetch("/v1/registry/timestamp".into()).await, now)
        .unwrap();
    trusted
        .update_snapshot(&fetch("/v1/registry/snapshot".into()).await, now)
        .unwrap();
    trusted
        .update_targets(&fetch("/v1/registry/targets".into()).await, now)
        .unwrap();
    let manifest = trusted
        .verify_manifest(&fetch("/v1/models/intents/1/manifest".into()).await, now)
        .expect("the manifest verifies");
    assert_eq!(manifest.metrics["accuracy"], 0.955);
    let sha = manifest.artifact.sha256.to_string();

    // A download cut half way resumes with a Range request.
    let half = weights.len() / 2;
    let url = format!("{}/v1/artifacts/{sha}", hub.url);
    let first = device
        .get(&url)
        .header("range", format!("bytes=0-{}", half - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 206);
    let mut got = first.bytes().await.unwrap().to_vec();
    let rest = device
        .get(&url)
        .header("range", format!("bytes={half}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(
        rest.headers()["content-range"].to_str().unwrap(),
        format!("bytes {half}-{}/{}", weights.len() - 1, weights.len())
    );
    got.extend_from_slice(&rest.bytes().await.unwrap());
    let artifact = manifest
        .clone()
        .check_artifact(&got)
        .expect("the resumed download verifies");
    trusted.record_installed(&artifact);
    let bad_range = device
        .get(&url)
        .header("range", "bytes=999999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_range.status(), 416);

    // One byte changed on the hub's disk: the device refuses the artifact.
    let stored = hub.dir.join("artifacts").join(&sha);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[1234] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();
    let tampered = fetch(format!("/v1/artifacts/{sha}")).await;
    let err = manifest.check_artifact(&tampered).unwrap_err().to_string();
    assert!(
        err.contains("sha256") || err.contains("SHA-256") || err.contains("hash"),
        "{err}"
    );

    // The installed version cannot be offered again (rollback protection).
    let err = trusted
        .verify_manifest(&fetch("/v1/models/intents/1/manifest".into()).await, now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("version") || err.contains("rollback"), "{err}");

    // Registry reads need a device certificate or the operator credential.
    let anonymous = hub
        .client()
        .get(format!("{}/v1/registry/targets", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}
