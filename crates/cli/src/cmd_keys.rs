//! `strata keys`: the model registry's signing keys.
//!
//! `strata keys init` is the key ceremony: it creates the offline root keys
//! (several, with a threshold), the offline targets key that signs model
//! manifests, and the online snapshot and timestamp keys the hub holds, and
//! writes the first root metadata, signed by every root key. Nothing leaves
//! the machine: key files are written with mode 0600, and the root
//! metadata is what devices and the hub are given to trust.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use registry::{RoleSpec, Root, SigningKey};

use crate::output::out;

/// `strata keys …`
#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create the registry's keys and its first signed root metadata.
    ///
    /// Writes, into DIR: `root-1.key` … `root-N.key` (offline: keep them
    /// apart, each with its holder), `targets.key` (offline: signs model
    /// manifests on publish), `online/snapshot.key` and
    /// `online/timestamp.key` (for the hub, which signs fresh snapshot and
    /// timestamp metadata), and `root.json` (version 1, signed by every
    /// root key; give it to the hub and to devices). Refuses a directory
    /// that already holds a root.
    Init(InitArgs),
    /// Rotate the online snapshot and timestamp keys (after a hub
    /// compromise, or on schedule): sign the next root version with the
    /// root keys in DIR, hand the new online keys to the hub (its
    /// `registry/`, as `*.key.next`) and install the root through the hub
    /// API. The hub checks the new root against the current one as a
    /// device does, then re-signs its snapshot and timestamp with the new
    /// keys; devices walk to the new root on their next update.
    Rotate(RotateArgs),
}

/// `strata keys rotate`.
#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// The directory `strata keys init` wrote (root keys, `root.json`).
    #[arg(long, env = "STRATA_REGISTRY_KEYS")]
    keys: PathBuf,
    /// How long the new root metadata stays valid (e.g. 365d).
    #[arg(long, default_value = "365d")]
    expires: humantime::Duration,
    #[command(flatten)]
    hub: crate::operator::HubConnection,
}

/// `strata keys init`.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory to write the keys and `root.json` into (created, mode 0700).
    #[arg(long)]
    out: PathBuf,
    /// Number of root keys.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    root_keys: u32,
    /// How many root keys must sign a new root.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    root_threshold: u32,
    /// How long the root metadata stays valid (e.g. 365d).
    #[arg(long, default_value = "365d")]
    expires: humantime::Duration,
    /// Also install `root.json` and the online keys into this hub data
    /// directory (its `registry/`), for a hub on this machine.
    #[arg(long)]
    hub_data_dir: Option<PathBuf>,
}

/// Runs `strata keys …`.
pub(crate) async fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Init(args) => init(&args),
        KeysCommand::Rotate(args) => rotate(args).await,
    }
}

async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let Some(hub_dir) = args.hub.data_dir() else {
        bail!("--hub-data-dir is needed: the new online keys go into the hub's data directory");
    };
    let root_file = args.keys.join("root.json");
    let current =
        std::fs::read(&root_file).with_context(|| format!("reading {}", root_file.display()))?;
    let now = time::OffsetDateTime::now_utc();
    let trusted = registry::TrustedState::bootstrap(&current, now)
        .with_context(|| format!("checking {}", root_file.display()))?;
    let old = trusted.root().clone();
    // Every root key held here that the current root names.
    let mut roots = Vec::new();
    for entry in
        std::fs::read_dir(&args.keys).with_context(|| format!("reading {}", args.keys.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("root-") && name.ends_with(".key") {
            let key = SigningKey::from_key_file(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            if old.roles.root.key_ids.contains(&key.key_id()) {
                roots.push(key);
            }
        }
    }
    if roots.len() < old.roles.root.threshold as usize {
        bail!(
            "{} holds {} of the root keys; {} must sign a new root",
            args.keys.display(),
            roots.len(),
            old.roles.root.threshold
        );
    }
    let mut rng = rand::rng();
    let snapshot = SigningKey::generate(&mut rng);
    let timestamp = SigningKey::generate(&mut rng);
    let pick = |role: registry::Role| RoleSpec {
        threshold: old.role(role).threshold,
        keys: old
            .role(role)
            .key_ids
            .iter()
            .filter_map(|id| old.keys.get(id).copied())
            .collect(),
    };
    let next = Root::new(
        old.version + 1,
        now + *args.expires,
        pick(registry::Role::Root),
        pick(registry::Role::Targets),
        RoleSpec {
            threshold: 1,
            keys: vec![snapshot.public_key()],
        },
        RoleSpec {
            threshold: 1,
            keys: vec![timestamp.public_key()],
        },
    )?;
    let signed = registry::sign(&next, &roots.iter().collect::<Vec<_>>())?;
    // The hub takes the keys only with a root that names them.
    let registry_dir = hub_dir.join("registry");
    write_key(&registry_dir.join("snapshot.key.next"), &snapshot)?;
    write_key(&registry_dir.join("timestamp.key.next"), &timestamp)?;
    let op = crate::operator::Operator::connect(&args.hub)?;
    let answer = op
        .post_json(
            "/v1/registry/root",
            &serde_json::json!({"root": String::from_utf8(signed.clone())?}),
        )
        .await
        .context("installing the new root on the hub")?;
    // Keep the old root beside the new one; devices provisioned with it
    // walk forward.
    let kept = args.keys.join(format!("root-v{}.json", old.version));
    durable::write_atomic(&kept, &current, durable::PUBLIC)
        .with_context(|| format!("writing {}", kept.display()))?;
    let online = args.keys.join("online");
    write_key(&online.join("snapshot.key"), &snapshot)?;
    write_key(&online.join("timestamp.key"), &timestamp)?;
    durable::write_atomic(&root_file, &signed, durable::PUBLIC)
        .with_context(|| format!("writing {}", root_file.display()))?;
    out(&format!(
        "root v{} installed: new snapshot key {}, new timestamp key {}; the hub re-signed snapshot v{} and timestamp v{}",
        next.version,
        snapshot.key_id().short(),
        timestamp.key_id().short(),
        answer["snapshot_version"],
        answer["timestamp_version"]
    ));
    Ok(())
}

fn write_key(path: &Path, key: &SigningKey) -> anyhow::Result<()> {
    durable::write_atomic(path, key.to_key_file().as_bytes(), durable::PRIVATE)
        .with_context(|| format!("writing {}", path.display()))
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    if args.root_threshold > args.root_keys {
        bail!(
            "--root-threshold {} is more than the {} root keys",
            args.root_threshold,
            args.root_keys
        );
    }
    let root_file = args.out.join("root.json");
    if root_file.exists() {
        bail!(
            "{} already holds registry keys (root.json exists); refusing to overwrite them",
            args.out.display()
        );
    }
    let online = args.out.join("online");
    for dir in [&args.out, &online] {
        durable::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut rng = rand::rng();
    let roots: Vec<SigningKey> = (0..args.root_keys)
        .map(|_| SigningKey::generate(&mut rng))
        .collect();
    let targets = SigningKey::generate(&mut rng);
    let snapshot = SigningKey::generate(&mut rng);
    let timestamp = SigningKey::generate(&mut rng);

    let expires = time::OffsetDateTime::now_utc() + *args.expires;
    let spec = |threshold: u32, keys: &[&SigningKey]| RoleSpec {
        threshold,
        keys: keys.iter().map(|k| k.public_key()).collect(),
    };
    let root = Root::new(
        1,
        expires,
        spec(args.root_threshold, &roots.iter().collect::<Vec<_>>()),
        spec(1, &[&targets]),
        spec(1, &[&snapshot]),
        spec(1, &[&timestamp]),
    )?;
    let signed = registry::sign(&root, &roots.iter().collect::<Vec<_>>())?;

    for (i, key) in roots.iter().enumerate() {
        write_key(&args.out.join(format!("root-{}.key", i + 1)), key)?;
    }
    write_key(&args.out.join("targets.key"), &targets)?;
    write_key(&online.join("snapshot.key"), &snapshot)?;
    write_key(&online.join("timestamp.key"), &timestamp)?;
    // The root goes last: its presence marks a complete set of keys.
    durable::write_atomic(&root_file, &signed, durable::PUBLIC)
        .with_context(|| format!("writing {}", root_file.display()))?;

    if let Some(hub) = &args.hub_data_dir {
        let dir = hub.join("registry");
        durable::create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_key(&dir.join("snapshot.key"), &snapshot)?;
        write_key(&dir.join("timestamp.key"), &timestamp)?;
        durable::write_atomic(&dir.join("root.json"), &signed, durable::PUBLIC)
            .with_context(|| format!("writing {}", dir.join("root.json").display()))?;
        out(&format!(
            "installed root.json and the online keys in {}",
            dir.display()
        ));
    }
    out(&format!(
        "registry keys in {} (root metadata version 1, valid until {})",
        args.out.display(),
        expires.date()
    ));
    for (i, key) in roots.iter().enumerate() {
        out(&format!(
            "  root-{}.key       {}  (offline; {} of {} sign a new root)",
            i + 1,
            key.key_id().short(),
            args.root_threshold,
            args.root_keys
        ));
    }
    out(&format!(
        "  targets.key      {}  (offline; signs model manifests)",
        targets.key_id().short()
    ));
    out(&format!(
        "  online/snapshot.key   {}  (for the hub)",
        snapshot.key_id().short()
    ));
    out(&format!(
        "  online/timestamp.key  {}  (for the hub)",
        timestamp.key_id().short()
    ));
    out("  root.json: give it to the hub and to every device as the registry's trust anchor");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_private_keys_and_a_root_devices_can_trust() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let args = InitArgs {
            out: dir.clone(),
            root_keys: 3,
            root_threshold: 2,
            expires: "30d".parse().unwrap(),
            hub_data_dir: None,
        };
        init(&args).unwrap();

        let root = std::fs::read(dir.join("root.json")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let trusted = registry::TrustedState::bootstrap(&root, now).expect("the root verifies");
        assert_eq!(trusted.root().version, 1);
        assert_eq!(trusted.root().roles.root.threshold, 2);
        assert_eq!(trusted.root().roles.root.key_ids.len(), 3);

        for name in [
            "root-1.key",
            "root-3.key",
            "targets.key",
            "online/timestamp.key",
        ] {
            let path = dir.join(name);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
            let key = SigningKey::from_key_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert!(
                trusted.root().keys.contains_key(&key.key_id()),
                "{name} is in the root"
            );
        }
        let targets =
            SigningKey::from_key_file(&std::fs::read_to_string(dir.join("targets.key")).unwrap())
                .unwrap();
        assert!(
            trusted
                .root()
                .roles
                .targets
                .key_ids
                .contains(&targets.key_id())
        );

        // A second ceremony into the same directory is refused.
        let again = init(&args).unwrap_err().to_string();
        assert!(again.contains("refusing to overwrite"), "{again}");
        // A threshold above the key count is refused.
        let bad = InitArgs {
            out: tmp.path().join("other"),
            root_keys: 2,
            root_threshold: 3,
            expires: "30d".parse().unwrap(),
            hub_data_dir: None,
        };
        assert!(
            init(&bad)
                .unwrap_err()
                .to_string()
                .contains("--root-threshold")
        );
    }
}
