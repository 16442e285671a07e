//! End-to-end scenarios: a repository signed by every role, a device that
//! follows it, and one test (or table row) per attack.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::*;

/// The device's clock in these tests.
const NOW: OffsetDateTime = datetime!(2026-11-21 10:00 UTC);
/// Far enough ahead that nothing expires unless a test says so.
const FAR: OffsetDateTime = datetime!(2036-01-01 00:00 UTC);

fn key(seed: u64) -> SigningKey {
    SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

fn spec(threshold: u32, keys: &[&SigningKey]) -> RoleSpec {
    RoleSpec {
        threshold,
        keys: keys.iter().map(|k| k.public_key()).collect(),
    }
}

fn manifest(name: &str, version: u64, artifact: &[u8]) -> Manifest {
    Manifest {
        name: name.to_owned(),
        version,
        artifact: Artifact {
            sha256: Sha256Digest::of(artifact),
            size_bytes: artifact.len() as u64,
            format: ArtifactFormat::Gguf,
        },
        runtime: RuntimeRequirements {
            cpu_arch: CpuArch::Aarch64,
            min_agent_version: "0.3.1".parse().unwrap(),
            memory_bytes: 2 << 30,
        },
        schema: IoSchema {
            input: Schema {
                kind: SchemaKind::Text,
                fields: vec![Field {
                    name: "prompt".into(),
                    dtype: DType::String,
                    shape: vec![None],
                }],
            },
            output: Schema {
                kind: SchemaKind::Labels,
                fields: vec![Field {
                    name: "scores".into(),
                    dtype: DType::F32,
                    shape: vec![None, Some(4)],
                }],
            },
        },
        metrics: BTreeMap::from([
            ("accuracy".to_owned(), 0.913),
            ("latency_ms_p99".to_owned(), 41.5),
        ]),
        provenance: Provenance::TrainingRun {
            run_id: "run-2026-11-20-a".into(),
        },
        health: None,
        expires: FAR,
    }
}

/// The keys of a repository: 2-of-3 root keys and one key per other role.
struct Keys {
    root: [SigningKey; 3],
    targets: SigningKey,
    snapshot: SigningKey,
    timestamp: SigningKey,
    stranger: SigningKey,
}

impl Keys {
    fn new() -> Self {
        Self {
            root: [key(1), key(2), key(3)],
            targets: key(10),
            snapshot: key(20),
            timestamp: key(30),
            stranger: key(99),
        }
    }

    fn root(&self, version: u64, expires: OffsetDateTime) -> Root {
        let [a, b, c] = &self.root;
        Root::new(
            version,
            expires,
            spec(2, &[a, b, c]),
            spec(1, &[&self.targets]),
            spec(1, &[&self.snapshot]),
            spec(1, &[&self.timestamp]),
        )
        .unwrap()
    }

    fn signed_root(&self) -> Vec<u8> {
        sign(&self.root(1, FAR), &[&self.root[0], &self.root[1]]).unwrap()
    }
}

/// Expiry of each document of a release.
#[derive(Clone, Copy)]
struct Expiry {
    targets: OffsetDateTime,
    snapshot: OffsetDateTime,
    timestamp: OffsetDateTime,
    manifest: OffsetDateTime,
}

const NEVER: Expiry = Expiry {
    targets: FAR,
    snapshot: FAR,
    timestamp: FAR,
    manifest: FAR,
};

/// One publication: every model's signed manifest plus targets, snapshot
/// and timestamp, all at `version`.
struct Release {
    manifests: Vec<Vec<u8>>,
    targets: Vec<u8>,
    snapshot: Vec<u8>,
    timestamp: Vec<u8>,
}

fn release(keys: &Keys, version: u64, models: &[Manifest], expiry: Expiry) -> Release {
    let mut targets = Targets::new(version, expiry.targets);
    let mut manifests = Vec::new();
    for m in models {
        let m = Manifest {
            expires: expiry.manifest,
            ..m.clone()
        };
        targets.list(&m).unwrap();
        manifests.push(sign(&m, &[&keys.targets]).unwrap());
    }
    let targets = sign(&targets, &[&keys.targets]).unwrap();
    let snapshot = sign(
        &Snapshot::new(version, expiry.snapshot, &targets).unwrap(),
        &[&keys.snapshot],
    )
    .unwrap();
    let timestamp = sign(
        &Timestamp::new(version, expiry.timestamp, &snapshot).unwrap(),
        &[&keys.timestamp],
    )
    .unwrap();
    Release {
        manifests,
        targets,
        snapshot,
        timestamp,
    }
}

fn apply(state: &mut TrustedState, release: &Release, now: OffsetDateTime) -> Result<(), Error> {
    state.update_timestamp(&release.timestamp, now)?;
    state.update_snapshot(&release.snapshot, now)?;
    state.update_targets(&release.targets, now)
}

fn device(keys: &Keys, release: &Release) -> TrustedState {
    let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
    apply(&mut state, release, NOW).unwrap();
    state
}

/// A check that an error is the expected one.
type Check = fn(&Error) -> bool;

const WEIGHTS: &[u8] = b"GGUF\x03\x00\x00\x00 not really weights, but bytes all the same";

#[test]
fn happy_path_installs_a_model() {
    let keys = Keys::new();
    let r1 = release(
        &keys,
        1,
        &[manifest("intent-classifier", 7, WEIGHTS)],
        NEVER,
    );
    let mut state = device(&keys, &r1);

    let verified = state.verify_manifest(&r1.manifests[0], NOW).unwrap();
    assert_eq!(verified.name, "intent-classifier");
    assert_eq!(verified.version, 7);
    assert_eq!(
        verified.sha256(),
        state.targets().unwrap().manifests["intent-classifier"].sha256
    );

    let artifact = verified.clone().check_artifact(WEIGHTS).unwrap();
    let mut checker = verified.artifact_checker();
    for chunk in WEIGHTS.chunks(5) {
        checker.update(chunk).unwrap();
    }
    assert_eq!(checker.finish().unwrap(), artifact);

    state.record_installed(&artifact);
    assert_eq!(state.installed_version("intent-classifier"), Some(7));

    // The device's state survives a round trip through its file.
    let json = serde_json::to_vec(&state).unwrap();
    let back: TrustedState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, state);

    // The next release installs over it.
    let r2 = release(
        &keys,
        2,
        &[manifest("intent-classifier", 8, WEIGHTS)],
        NEVER,
    );
    apply(&mut state, &r2, NOW).unwrap();
    state.verify_manifest(&r2.manifests[0], NOW).unwrap();
}

#[test]
fn installed_manifests_load_again_without_network_or_listing() {
    let keys = Keys::new();
    let v7 = manifest("intent-classifier", 7, WEIGHTS);
    let r1 = release(&keys, 1, std::slice::from_ref(&v7), NEVER);
    let mut state = device(&keys, &r1);
    // Not installed yet: refused.
    let err = state.verify_installed(&r1.manifests[0]).unwrap_err();
    assert!(
        matches!(err, Error::NotInstalled { version: 7, .. }),
        "{err}"
    );
    let artifact = state
        .verify_manifest(&r1.manifests[0], NOW)
        .unwrap()
        .check_artifact(WEIGHTS)
        .unwrap();
    state.record_installed(&artifact);
    // v8 is installed over it; v7 stays loadable (the rollback target),
    // even once every document has expired and targets lists only v8.
    let r2 = release(
        &keys,
        2,
        &[manifest("intent-classifier", 8, WEIGHTS)],
        NEVER,
    );
    apply(&mut state, &r2, NOW).unwrap();
    let v8 = state
        .verify_manifest(&r2.manifests[0], NOW)
        .unwrap()
        .check_artifact(WEIGHTS)
        .unwrap();
    state.record_installed(&v8);
    let again = state.verify_installed(&r1.manifests[0]).unwrap();
    assert_eq!(again.version, 7);
    again.check_artifact(WEIGHTS).unwrap();
    // A manifest signed by a stranger is not loaded, whatever its version.
    let forged = sign(&v7, &[&keys.stranger]).unwrap();
    assert!(matches!(
        state.verify_installed(&forged).unwrap_err(),
        Error::UnknownKey { .. }
    ));
}

#[test]
fn health_checks_are_validated() {
    let mut m = manifest("intent-classifier", 7, WEIGHTS);
    let probe = Probe {
        input: "turn on the lights".into(),
        expect: "HassTurnOn".into(),
    };
    m.health = Some(HealthCheck {
        probes: vec![probe.clone()],
        min_pass: 0.9,
        max_latency_ms: Some(200),
    });
    m.validate().unwrap();
    for (probes, min_pass) in [
        (vec![], 0.9),
        (vec![probe.clone()], 0.0),
        (vec![probe], 1.5),
    ] {
        m.health = Some(HealthCheck {
            probes,
            min_pass,
            max_latency_ms: None,
        });
        assert!(matches!(m.validate(), Err(Error::Invalid { .. })));
    }
}

#[test]
fn altered_artifacts_are_refused() {
    let keys = Keys::new();
    let r1 = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], NEVER);
    let state = device(&keys, &r1);
    let verified = state.verify_manifest(&r1.manifests[0], NOW).unwrap();

    let mut flipped = WEIGHTS.to_vec();
    flipped[3] ^= 1;
    let longer = [WEIGHTS, b"!"].concat();
    let cases: [(&str, &[u8], Check); 4] = [
        ("one byte changed", &flipped, |e| {
            matches!(e, Error::ArtifactHash { .. })
        }),
        (
            "truncated",
            &WEIGHTS[1..],
            |e| matches!(e, Error::ArtifactSize { got, .. } if *got + 1 == WEIGHTS.len() as u64),
        ),
        ("one byte longer", &longer, |e| {
            matches!(e, Error::ArtifactSize { .. })
        }),
        ("empty", b"", |e| {
            matches!(e, Error::ArtifactSize { got: 0, .. })
        }),
    ];
    for (name, bytes, want) in cases {
        let err = verified.clone().check_artifact(bytes).unwrap_err();
        assert!(want(&err), "{name}: {err}");
    }
    let err = verified.clone().check_artifact(&flipped).unwrap_err();
    assert!(err.to_string().starts_with("artifact sha256 "), "{err}");
}

fn resign(body: &Manifest, signers: &[&SigningKey]) -> Vec<u8> {
    sign(body, signers).unwrap()
}

/// Changes one byte of the first occurrence of `from` in `bytes`.
fn tamper(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    text.replacen(from, to, 1).into_bytes()
}

#[test]
fn manifest_signature_attacks_are_refused() {
    let keys = Keys::new();
    let body = manifest("m", 1, WEIGHTS);
    let r1 = release(&keys, 1, std::slice::from_ref(&body), NEVER);
    let state = device(&keys, &r1);
    let good = &r1.manifests[0];

    let sig_start = String::from_utf8(good.clone())
        .unwrap()
        .find("\"sig\":\"")
        .unwrap()
        + 7;
    let mut bad_sig = good.clone();
    bad_sig[sig_start] = if bad_sig[sig_start] == b'0' {
        b'1'
    } else {
        b'0'
    };

    let other_body = Manifest {
        metrics: BTreeMap::new(),
        ..body.clone()
    };
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        (
            "signed by an unknown key",
            resign(&body, &[&keys.stranger]),
            |e| {
                matches!(
                    e,
                    Error::UnknownKey {
                        kind: Kind::Manifest,
                        ..
                    }
                )
            },
        ),
        (
            "signed by the snapshot key",
            resign(&body, &[&keys.snapshot]),
            |e| {
                matches!(
                    e,
                    Error::WrongRole {
                        role: Role::Targets,
                        ..
                    }
                )
            },
        ),
        (
            "signed by a root key",
            resign(&body, &[&keys.root[0]]),
            |e| matches!(e, Error::WrongRole { .. }),
        ),
        ("not signed", resign(&body, &[]), |e| {
            matches!(
                e,
                Error::BelowThreshold {
                    valid: 0,
                    threshold: 1,
                    ..
                }
            )
        }),
        ("signature altered", bad_sig, |e| {
            matches!(
                e,
                Error::BadSignature {
                    kind: Kind::Manifest,
                    ..
                }
            )
        }),
        (
            "body altered after signing",
            tamper(good, "\"version\":1", "\"version\":2"),
            |e| matches!(e, Error::BadSignature { .. }),
        ),
        (
            "validly signed but not the listed manifest",
            resign(&other_body, &[&keys.targets]),
            |e| matches!(e, Error::ManifestNotListed { .. }),
        ),
        (
            "targets metadata passed as a manifest",
            r1.targets.clone(),
            |e| {
                matches!(
                    e,
                    Error::WrongKind {
                        expected: Kind::Manifest,
                        ..
                    }
                )
            },
        ),
        (
            "unknown field",
            tamper(good, "\"version\":1", "\"version\":1,\"extra\":1"),
            |e| matches!(e, Error::Malformed { .. }),
        ),
        ("not json", b"{\"signatures\":[".to_vec(), |e| {
            matches!(e, Error::Malformed { .. })
        }),
    ];
    for (name, bytes, want) in cases {
        let err = state.verify_manifest(&bytes, NOW).unwrap_err();
        assert!(want(&err), "{name}: got {err}");
    }
    // An extra signature by a stranger does not hurt a valid one.
    let with_stranger = cosign::<Manifest>(good, &keys.stranger).unwrap();
    state.verify_manifest(&with_stranger, NOW).unwrap();
}

#[test]
fn error_messages_name_the_problem() {
    let keys = Keys::new();
    let body = manifest("m", 1, WEIGHTS);
    let r1 = release(&keys, 1, std::slice::from_ref(&body), NEVER);
    let state = device(&keys, &r1);
    let err = state
        .verify_manifest(&sign(&body, &[&keys.stranger]).unwrap(), NOW)
        .unwrap_err();
    let short = keys.stranger.key_id().short();
    assert_eq!(
        err.to_string(),
        format!("manifest metadata is signed by key {short}, which the trusted root does not know")
    );
}

#[test]
fn root_needs_a_threshold_of_distinct_root_keys() {
    let keys = Keys::new();
    let body = keys.root(1, FAR);
    let [a, b, c] = &keys.root;
    let cases: Vec<(&str, Vec<&SigningKey>, Option<Check>)> = vec![
        ("2 of 3", vec![a, b], None),
        ("3 of 3", vec![a, b, c], None),
        ("2 of 3 and a stranger", vec![&keys.stranger, c, a], None),
        (
            "1 of 3",
            vec![a],
            Some(|e| {
                matches!(
                    e,
                    Error::BelowThreshold {
                        valid: 1,
                        threshold: 2,
                        ..
                    }
                )
            }),
        ),
        (
            "the same key twice",
            vec![a, a],
            Some(|e| {
                matches!(
                    e,
                    Error::BelowThreshold {
                        valid: 1,
                        threshold: 2,
                        ..
                    }
                )
            }),
        ),
        (
            "the same key three times",
            vec![b, b, b],
            Some(|e| matches!(e, Error::BelowThreshold { valid: 1, .. })),
        ),
        (
            "targets key",
            vec![&keys.targets],
            Some(|e| {
                matches!(
                    e,
                    Error::WrongRole {
                        role: Role::Root,
                        ..
                    }
                )
            }),
        ),
        (
            "timestamp key and one root key",
            vec![&keys.timestamp, a],
            Some(|e| matches!(e, Error::BelowThreshold { valid: 1, .. })),
        ),
        (
            "stranger",
            vec![&keys.stranger],
            Some(|e| {
                matches!(
                    e,
                    Error::UnknownKey {
                        kind: Kind::Root,
                        ..
                    }
                )
            }),
        ),
    ];
    for (name, signers, want) in cases {
        let bytes = sign(&body, &signers).unwrap();
        match (TrustedState::bootstrap(&bytes, NOW), want) {
            (Ok(_), None) => {}
            (Err(err), Some(want)) => assert!(want(&err), "{name}: got {err}"),
            (Ok(_), Some(_)) => panic!("{name}: accepted"),
            (Err(err), None) => panic!("{name}: refused: {err}"),
        }
    }

    // Duplicates on the targets role, too: 2-of-2 targets, one key twice.
    let root = Root::new(
        1,
        FAR,
        spec(2, &[a, b, c]),
        spec(2, &[&keys.targets, &keys.stranger]),
        spec(1, &[&keys.snapshot]),
        spec(1, &[&keys.timestamp]),
    )
    .unwrap();
    let mut state = TrustedState::bootstrap(&sign(&root, &[a, b]).unwrap(), NOW).unwrap();
    let targets = Targets::new(1, FAR);
    let twice = sign(&targets, &[&keys.targets, &keys.targets]).unwrap();
    let both = sign(&targets, &[&keys.targets, &keys.stranger]).unwrap();
    let snapshot = sign(&Snapshot::new(1, FAR, &both).unwrap(), &[&keys.snapshot]).unwrap();
    let timestamp = sign(
        &Timestamp::new(1, FAR, &snapshot).unwrap(),
        &[&keys.timestamp],
    )
    .unwrap();
    state.update_timestamp(&timestamp, NOW).unwrap();
    state.update_snapshot(&snapshot, NOW).unwrap();
    let err = state.update_targets(&twice, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BelowThreshold {
                valid: 1,
                threshold: 2,
                ..
            }
        ),
        "{err}"
    );
    state.update_targets(&both, NOW).unwrap();
}

#[test]
fn cosigning_builds_a_threshold() {
    let keys = Keys::new();
    let body = keys.root(1, FAR);
    let one = sign(&body, &[&keys.root[0]]).unwrap();
    assert!(TrustedState::bootstrap(&one, NOW).is_err());
    let again = cosign::<Root>(&one, &keys.root[0]).unwrap();
    assert!(matches!(
        TrustedState::bootstrap(&again, NOW),
        Err(Error::BelowThreshold { valid: 1, .. })
    ));
    let two = cosign::<Root>(&again, &keys.root[2]).unwrap();
    TrustedState::bootstrap(&two, NOW).unwrap();
    assert!(
        cosign::<Targets>(&two, &keys.targets).is_err(),
        "co-signing checks the kind"
    );
}

#[test]
fn older_or_equal_model_versions_are_refused_after_install() {
    let keys = Keys::new();
    let r1 = release(&keys, 1, &[manifest("m", 5, WEIGHTS)], NEVER);
    let mut state = device(&keys, &r1);
    let artifact = state
        .verify_manifest(&r1.manifests[0], NOW)
        .unwrap()
        .check_artifact(WEIGHTS)
        .unwrap();
    state.record_installed(&artifact);

    for (model_version, ok) in [(4, false), (5, false), (6, true)] {
        let mut s = state.clone();
        let r = release(&keys, 2, &[manifest("m", model_version, WEIGHTS)], NEVER);
        apply(&mut s, &r, NOW).unwrap();
        match s.verify_manifest(&r.manifests[0], NOW) {
            Ok(_) => assert!(ok, "v{model_version} accepted"),
            Err(Error::ModelRollback {
                installed: 5, got, ..
            }) => assert!(!ok && got == model_version),
            Err(err) => panic!("v{model_version}: {err}"),
        }
    }
    // The same manifest again is refused, too: it is no longer newer.
    let err = state.verify_manifest(&r1.manifests[0], NOW).unwrap_err();
    assert!(matches!(err, Error::ModelRollback { .. }), "{err}");
}

#[test]
fn expired_metadata_of_every_role_is_refused() {
    let keys = Keys::new();
    let soon = NOW + Duration::hours(1);
    let later = NOW + Duration::hours(2);
    let cases = [
        (
            Kind::Timestamp,
            Expiry {
                timestamp: soon,
                ..NEVER
            },
        ),
        (
            Kind::Snapshot,
            Expiry {
                snapshot: soon,
                ..NEVER
            },
        ),
        (
            Kind::Targets,
            Expiry {
                targets: soon,
                ..NEVER
            },
        ),
        (
            Kind::Manifest,
            Expiry {
                manifest: soon,
                ..NEVER
            },
        ),
    ];
    for (kind, expiry) in cases {
        let r = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], expiry);
        // Fine while fresh...
        let state = device(&keys, &r);
        state.verify_manifest(&r.manifests[0], NOW).unwrap();
        // ...refused once the device's clock passes the expiry (a frozen
        // repository that stopped publishing looks exactly like this).
        let err = state.verify_manifest(&r.manifests[0], later).unwrap_err();
        assert!(
            matches!(err, Error::Expired { kind: k, .. } if k == kind),
            "{kind}: got {err}"
        );
        // And an update with already expired metadata is refused as well.
        if kind != Kind::Manifest {
            let mut fresh = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
            let err = apply(&mut fresh, &r, later).unwrap_err();
            assert!(
                matches!(err, Error::Expired { kind: k, .. } if k == kind),
                "{kind}: got {err}"
            );
        }
    }

    // Root: accepted while fresh, then every update and verification refuses.
    let root = sign(&keys.root(1, soon), &[&keys.root[0], &keys.root[1]]).unwrap();
    let mut state = TrustedState::bootstrap(&root, NOW).unwrap();
    let r = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], NEVER);
    apply(&mut state, &r, NOW).unwrap();
    let err = state.verify_manifest(&r.manifests[0], later).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Expired {
                kind: Kind::Root,
                ..
            }
        ),
        "{err}"
    );
    let err = state.update_timestamp(&r.timestamp, later).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Expired {
                kind: Kind::Root,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        TrustedState::bootstrap(&root, later),
        Err(Error::Expired {
            kind: Kind::Root,
            ..
        })
    ));
}

#[test]
fn replayed_timestamp_or_snapshot_is_a_freeze() {
    let keys = Keys::new();
    let r1 = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], NEVER);
    let r2 = release(&keys, 2, &[manifest("m", 2, WEIGHTS)], NEVER);
    let mut state = device(&keys, &r1);
    apply(&mut state, &r2, NOW).unwrap();

    let err = state.update_timestamp(&r1.timestamp, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Freeze {
                kind: Kind::Timestamp,
                trusted: 2,
                got: 1
            }
        ),
        "{err}"
    );
    let err = state.update_snapshot(&r1.snapshot, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Freeze {
                kind: Kind::Snapshot,
                trusted: 2,
                got: 1
            }
        ),
        "{err}"
    );

    // A newer timestamp that points back at the old snapshot.
    let stale = sign(
        &Timestamp::new(3, FAR, &r1.snapshot).unwrap(),
        &[&keys.timestamp],
    )
    .unwrap();
    let err = state.update_timestamp(&stale, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Freeze {
                kind: Kind::Snapshot,
                trusted: 2,
                got: 1
            }
        ),
        "{err}"
    );

    // The same version with other content is equivocation.
    let forked = sign(
        &Timestamp::new(2, FAR - Duration::DAY, &r2.snapshot).unwrap(),
        &[&keys.timestamp],
    )
    .unwrap();
    let err = state.update_timestamp(&forked, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VersionReused {
                kind: Kind::Timestamp,
                version: 2
            }
        ),
        "{err}"
    );

    // Re-applying the current documents is harmless, and nothing changed.
    let before = state.clone();
    apply(&mut state, &r2, NOW).unwrap();
    assert_eq!(state, before);
}

#[test]
fn mixed_metadata_is_refused() {
    let keys = Keys::new();
    let r1 = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], NEVER);
    let r2 = release(&keys, 2, &[manifest("m", 2, WEIGHTS)], NEVER);

    // Snapshot says targets v2, the mirror serves targets v1.
    let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
    state.update_timestamp(&r2.timestamp, NOW).unwrap();
    state.update_snapshot(&r2.snapshot, NOW).unwrap();
    let err = state.update_targets(&r1.targets, NOW).unwrap_err();
    assert!(
        matches!(&err, Error::MixAndMatch { kind: Kind::Targets, got, listed, .. } if got.version == 1 && listed.version == 2),
        "{err}"
    );
    assert!(err.to_string().contains("mix-and-match"), "{err}");

    // Timestamp names snapshot v2, the mirror serves snapshot v1.
    let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
    state.update_timestamp(&r2.timestamp, NOW).unwrap();
    let err = state.update_snapshot(&r1.snapshot, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MixAndMatch {
                kind: Kind::Snapshot,
                ..
            }
        ),
        "{err}"
    );

    // An update cycle cut short: new timestamp, old snapshot and targets.
    let mut state = device(&keys, &r1);
    state.update_timestamp(&r2.timestamp, NOW).unwrap();
    let err = state.verify_manifest(&r1.manifests[0], NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MixAndMatch {
                kind: Kind::Snapshot,
                ..
            }
        ),
        "{err}"
    );
    state.update_snapshot(&r2.snapshot, NOW).unwrap();
    let err = state.verify_manifest(&r1.manifests[0], NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MixAndMatch {
                kind: Kind::Targets,
                ..
            }
        ),
        "{err}"
    );
    state.update_targets(&r2.targets, NOW).unwrap();
    // Now the old, validly signed manifest is no longer listed.
    let err = state.verify_manifest(&r1.manifests[0], NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ManifestNotListed {
                version: 1,
                targets_version: 2,
                ..
            }
        ),
        "{err}"
    );
    state.verify_manifest(&r2.manifests[0], NOW).unwrap();

    // A snapshot that rolls targets back below the trusted version.
    let back = sign(
        &Snapshot::new(3, FAR, &r1.targets).unwrap(),
        &[&keys.snapshot],
    )
    .unwrap();
    let ts = sign(&Timestamp::new(3, FAR, &back).unwrap(), &[&keys.timestamp]).unwrap();
    state.update_timestamp(&ts, NOW).unwrap();
    let err = state.update_snapshot(&back, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rollback {
                kind: Kind::Targets,
                trusted: 2,
                got: 1
            }
        ),
        "{err}"
    );

    // Missing steps are named.
    let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
    let err = state.update_snapshot(&r1.snapshot, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Missing {
                kind: Kind::Timestamp
            }
        ),
        "{err}"
    );
    let err = state.update_targets(&r1.targets, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Missing {
                kind: Kind::Snapshot
            }
        ),
        "{err}"
    );
    let err = state.update_timestamp(&r1.snapshot, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongKind {
                expected: Kind::Timestamp,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn root_rotation_needs_old_and_new_thresholds() {
    let keys = Keys::new();
    let [a, b, c] = &keys.root;
    let (d, e) = (key(4), key(5));
    // v2 replaces root key `a` with `d` and `e`: 2-of-4 {b, c, d, e}.
    let rotated = |version| {
        Root::new(
            version,
            FAR,
            spec(2, &[b, c, &d, &e]),
            spec(1, &[&keys.targets]),
            spec(1, &[&keys.snapshot]),
            spec(1, &[&keys.timestamp]),
        )
        .unwrap()
    };
    // A full rotation: v2 with only new keys {d, e}.
    let fully_new = Root::new(
        2,
        FAR,
        spec(2, &[&d, &e]),
        spec(1, &[&keys.targets]),
        spec(1, &[&keys.snapshot]),
        spec(1, &[&keys.timestamp]),
    )
    .unwrap();
    let cases: Vec<(&str, Root, Vec<&SigningKey>, Option<Check>)> = vec![
        ("old a+b, new d+e", rotated(2), vec![a, b, &d, &e], None),
        ("b+c are in both", rotated(2), vec![b, c], None),
        (
            "full rotation, old a+b, new d+e",
            fully_new.clone(),
            vec![a, b, &d, &e],
            None,
        ),
        (
            "full rotation, only new keys",
            fully_new.clone(),
            vec![&d, &e],
            Some(|e| {
                matches!(
                    e,
                    Error::UnknownKey {
                        kind: Kind::Root,
                        ..
                    }
                )
            }),
        ),
        (
            "full rotation, only old keys",
            fully_new.clone(),
            vec![a, b],
            Some(|e| {
                matches!(
                    e,
                    Error::UnknownKey {
                        kind: Kind::Root,
                        ..
                    }
                )
            }),
        ),
        (
            "old threshold missed",
            rotated(2),
            vec![a, &d, &e],
            Some(|e| {
                matches!(
                    e,
                    Error::BelowThreshold {
                        valid: 1,
                        threshold: 2,
                        ..
                    }
                )
            }),
        ),
        (
            "new threshold missed",
            rotated(2),
            vec![a, b],
            Some(|e| {
                matches!(
                    e,
                    Error::BelowThreshold {
                        valid: 1,
                        threshold: 2,
                        ..
                    }
                )
            }),
        ),
        (
            "skips a version",
            rotated(3),
            vec![a, b, &d, &e],
            Some(|e| matches!(e, Error::RootVersionSkipped { trusted: 1, got: 3 })),
        ),
        (
            "same version",
            rotated(1),
            vec![a, b, &d, &e],
            Some(|e| {
                matches!(
                    e,
                    Error::Rollback {
                        kind: Kind::Root,
                        trusted: 1,
                        got: 1
                    }
                )
            }),
        ),
        (
            "signed by online keys",
            rotated(2),
            vec![&keys.timestamp, &keys.snapshot],
            Some(|e| {
                matches!(
                    e,
                    Error::WrongRole {
                        role: Role::Root,
                        ..
                    }
                )
            }),
        ),
    ];
    for (name, body, signers, want) in cases {
        let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
        let before = state.clone();
        match (state.update_root(&sign(&body, &signers).unwrap()), want) {
            (Ok(()), None) => assert_eq!(state.root(), &body, "{name}"),
            (Err(err), Some(want)) => {
                assert!(want(&err), "{name}: got {err}");
                assert_eq!(state, before, "{name}: a refused root changed the state");
            }
            (Ok(()), Some(_)) => panic!("{name}: accepted"),
            (Err(err), None) => panic!("{name}: refused: {err}"),
        }
    }

    // A device two versions behind walks v2 then v3, even past an expired v2.
    let mut state = TrustedState::bootstrap(&keys.signed_root(), NOW).unwrap();
    let v2 = Root {
        expires: NOW - Duration::DAY,
        ..rotated(2)
    };
    let v3 = rotated(3);
    state
        .update_root(&sign(&v2, &[a, b, &d, &e]).unwrap())
        .unwrap();
    state.update_root(&sign(&v3, &[&d, &e]).unwrap()).unwrap();
    assert_eq!(state.root().version, 3);
    // The retired key `a` no longer counts.
    let v4 = rotated(4);
    let err = state
        .update_root(&sign(&v4, &[a, &d]).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, Error::BelowThreshold { valid: 1, .. }),
        "{err}"
    );
}

#[test]
fn rotating_online_keys_forgets_timestamp_and_snapshot() {
    let keys = Keys::new();
    let [a, b, _] = &keys.root;
    let r1 = release(&keys, 1, &[manifest("m", 1, WEIGHTS)], NEVER);
    let mut state = device(&keys, &r1);
    // Pretend the old timestamp key pushed far-future versions...
    let ahead = sign(
        &Timestamp::new(1_000_000, FAR, &r1.snapshot).unwrap(),
        &[&keys.timestamp],
    )
    .unwrap();
    state.update_timestamp(&ahead, NOW).unwrap();
    // ...then the root replaces it.
    let new_ts = key(31);
    let [ka, kb, kc] = &keys.root;
    let v2 = Root::new(
        2,
        FAR,
        spec(2, &[ka, kb, kc]),
        spec(1, &[&keys.targets]),
        spec(1, &[&keys.snapshot]),
        spec(1, &[&new_ts]),
    )
    .unwrap();
    state.update_root(&sign(&v2, &[a, b]).unwrap()).unwrap();
    // Version 2 from the new key is accepted again; targets are kept.
    let ts = sign(&Timestamp::new(2, FAR, &r1.snapshot).unwrap(), &[&new_ts]).unwrap();
    state.update_timestamp(&ts, NOW).unwrap();
    state.update_snapshot(&r1.snapshot, NOW).unwrap();
    state.verify_manifest(&r1.manifests[0], NOW).unwrap();
    // The old timestamp key is now a stranger.
    let err = state.update_timestamp(&r1.timestamp, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownKey {
                kind: Kind::Timestamp,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_documents_are_not_signed() {
    let keys = Keys::new();
    let cases: Vec<(&str, Manifest)> = vec![
        (
            "bad name",
            Manifest {
                name: "a/b".into(),
                ..manifest("m", 1, WEIGHTS)
            },
        ),
        (
            "nan metric",
            Manifest {
                metrics: BTreeMap::from([("loss".into(), f64::NAN)]),
                ..manifest("m", 1, WEIGHTS)
            },
        ),
        (
            "unnamed metric",
            Manifest {
                metrics: BTreeMap::from([(String::new(), 1.0)]),
                ..manifest("m", 1, WEIGHTS)
            },
        ),
    ];
    for (name, m) in cases {
        assert!(
            matches!(sign(&m, &[&keys.targets]), Err(Error::Invalid { .. })),
            "{name}"
        );
    }
    let [a, b, c] = &keys.root;
    let zero = Root::new(
        1,
        FAR,
        spec(0, &[a]),
        spec(1, &[b]),
        spec(1, &[c]),
        spec(1, &[c]),
    );
    assert!(matches!(zero, Err(Error::Invalid { .. })));
    let too_high = Root::new(
        1,
        FAR,
        spec(2, &[a]),
        spec(1, &[b]),
        spec(1, &[c]),
        spec(1, &[c]),
    );
    assert!(matches!(too_high, Err(Error::Invalid { .. })));
}

#[test]
fn manifest_json_is_readable_and_strict() {
    let m = manifest("m", 3, b"x");
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(
        json["provenance"],
        serde_json::json!({"training_run": {"run_id": "run-2026-11-20-a"}})
    );
    assert_eq!(json["runtime"]["cpu_arch"], "aarch64");
    assert_eq!(json["runtime"]["min_agent_version"], "0.3.1");
    assert_eq!(json["expires"], "2036-01-01T00:00:00Z");
    assert_eq!(
        json["schema"]["output"]["fields"][0]["shape"],
        serde_json::json!([null, 4])
    );
    let source = Provenance::Source {
        file: "hf://org/model/model.gguf".into(),
        sha256: Sha256Digest::of(b"s"),
    };
    let back: Provenance = serde_json::from_value(serde_json::to_value(&source).unwrap()).unwrap();
    assert_eq!(back, source);
    let extra = serde_json::json!({"training_run": {"run_id": "r", "x": 1}});
    assert!(serde_json::from_value::<Provenance>(extra).is_err());
}

#[test]
fn signing_is_deterministic_and_canonical() {
    let keys = Keys::new();
    let m = manifest("m", 3, WEIGHTS);
    let one = sign(&m, &[&keys.targets]).unwrap();
    assert_eq!(one, sign(&m, &[&keys.targets]).unwrap());
    let text = String::from_utf8(one.clone()).unwrap();
    // The exact bytes a reviewer should expect: sorted keys, no whitespace.
    let signed = concat!(
        r#""signed":{"_type":"manifest","artifact":{"format":"gguf","sha256":"#,
        r#""2a6b89bc2e25b0e44c3c49540385c68d09f74035b93e21caed8fd7f3ba6fbd6f","size_bytes":51},"#,
        r#""expires":"2036-01-01T00:00:00Z","metrics":{"accuracy":0.913,"latency_ms_p99":41.5},"#,
        r#""name":"m","provenance":{"training_run":{"run_id":"run-2026-11-20-a"}},"#,
        r#""runtime":{"cpu_arch":"aarch64","memory_bytes":2147483648,"min_agent_version":"0.3.1"},"#,
        r#""schema":{"input":{"fields":[{"dtype":"string","name":"prompt","shape":[null]}],"kind":"text"},"#,
        r#""output":{"fields":[{"dtype":"f32","name":"scores","shape":[null,4]}],"kind":"labels"}},"#,
        r#""version":3}}"#,
    );
    let key_id = keys.targets.key_id();
    assert!(
        text.starts_with(&format!(r#"{{"signatures":[{{"key_id":"{key_id}","sig":""#)),
        "{text}"
    );
    assert!(text.ends_with(signed), "{text}");
    // Pretty-printing the envelope does not break it: signatures cover the
    // canonical form, not the bytes on the wire.
    let pretty =
        serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&one).unwrap())
            .unwrap();
    let r = release(&keys, 1, std::slice::from_ref(&m), NEVER);
    let state = device(&keys, &r);
    assert_eq!(
        state.verify_manifest(&pretty, NOW).unwrap(),
        state.verify_manifest(&one, NOW).unwrap()
    );
}

// ---------------------------------------------------------------------------
// Properties.

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    let artifact = (
        any::<[u8; 32]>(),
        any::<u64>(),
        prop::sample::select(vec![
            ArtifactFormat::Gguf,
            ArtifactFormat::Safetensors,
            ArtifactFormat::Onnx,
        ]),
    )
        .prop_map(|(sha, size_bytes, format)| Artifact {
            sha256: Sha256Digest(sha),
            size_bytes,
            format,
        });
    let runtime = (
        prop::sample::select(vec![CpuArch::Any, CpuArch::X86_64, CpuArch::Aarch64]),
        any::<(u32, u32, u32)>(),
        any::<u64>(),
    )
        .prop_map(
            |(cpu_arch, (major, minor, patch), memory_bytes)| RuntimeRequirements {
                cpu_arch,
                min_agent_version: AgentVersion {
                    major,
                    minor,
                    patch,
                },
                memory_bytes,
            },
        );
    let field = (
        "[a-z_]{1,8}",
        prop::sample::select(vec![DType::F32, DType::I64, DType::String]),
        prop::collection::vec(any::<Option<u64>>(), 0..3),
    )
        .prop_map(|(name, dtype, shape)| Field { name, dtype, shape });
    let schema = (
        prop::sample::select(vec![
            SchemaKind::Text,
            SchemaKind::Embedding,
            SchemaKind::Tensors,
        ]),
        prop::collection::vec(field, 0..3),
    )
        .prop_map(|(kind, fields)| Schema { kind, fields });
    let metrics = prop::collection::btree_map(
        ".{1,10}",
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        0..4,
    );
    let provenance = prop_oneof![
        ".{0,16}".prop_map(|run_id| Provenance::TrainingRun { run_id }),
        (".{0,16}", any::<[u8; 32]>()).prop_map(|(file, sha)| Provenance::Source {
            file,
            sha256: Sha256Digest(sha)
        }),
    ];
    // Expiry between one day and ~40 years after NOW, to the second.
    let expires = (86_400i64..1_262_304_000).prop_map(|s| NOW + Duration::seconds(s));
    (
        "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
        any::<u64>(),
        artifact,
        runtime,
        (schema.clone(), schema),
        metrics,
        provenance,
        expires,
    )
        .prop_map(
            |(name, version, artifact, runtime, (input, output), metrics, provenance, expires)| {
                Manifest {
                    name,
                    version,
                    artifact,
                    runtime,
                    schema: IoSchema { input, output },
                    metrics,
                    provenance,
                    health: (version % 2 == 0).then(|| HealthCheck {
                        probes: vec![Probe {
                            input: format!("probe {version}"),
                            expect: "label".into(),
                        }],
                        min_pass: 0.5,
                        max_latency_ms: Some(version % 1000),
                    }),
                    expires,
                }
            },
        )
}

proptest! {
    /// Any manifest signs and verifies; changing any one byte of the signed
    /// document either breaks it or (as with a float spelled differently
    /// that parses to the same number) leaves the very same manifest.
    #[test]
    fn signed_manifests_verify_and_resist_any_byte_change(
        m in arb_manifest(),
        index in any::<prop::sample::Index>(),
        delta in 1u8..=255,
    ) {
        let keys = Keys::new();
        let r = release(&keys, 1, std::slice::from_ref(&m), Expiry { manifest: m.expires, ..NEVER });
        let state = device(&keys, &r);
        let expected = m.clone();
        let signed = &r.manifests[0];
        let verified = state.verify_manifest(signed, NOW).unwrap();
        prop_assert_eq!(&*verified, &expected);

        // The canonical encoding round-trips through the typed manifest.
        let body = crate::digest(&expected);
        prop_assert_eq!(verified.sha256(), body);

        let mut altered = signed.clone();
        let i = index.index(altered.len());
        altered[i] = altered[i].wrapping_add(delta);
        if let Ok(v) = state.verify_manifest(&altered, NOW) {
            prop_assert_eq!(v, verified);
        }
    }
}
