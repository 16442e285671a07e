//! `strata edge …`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::output::out;

#[derive(Debug, Subcommand)]
pub(crate) enum EdgeCommand {
    /// Join a hub with a one-time token: generate this device's key, check
    /// the hub's CA against the token's pin, and obtain a device certificate.
    Join(JoinArgs),
    /// Run the agent: mutual-TLS link to the hub (heartbeats, event stream)
    /// and the local API on loopback.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// The join token from `strata hub token create`.
    #[arg(long, env = "STRATA_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Directory for this device's identity and state.
    #[arg(long, env = "STRATA_EDGE_DATA_DIR")]
    data_dir: PathBuf,
    /// A display name for this device (default: the id the hub gives it).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Configuration file (TOML; see docs/configuration.md). Flags override it.
    #[arg(long, short, env = "STRATA_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Directory holding the device identity created by `strata edge join`.
    #[arg(long, env = "STRATA_EDGE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the local API (default 127.0.0.1:7070; port 0 picks one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Reach the hub at this URL instead of the one in the join token (a
    /// relay, or a hub that moved). Its certificate is still checked
    /// against the hub CA.
    #[arg(long)]
    hub_url: Option<String>,
}

pub(crate) async fn run(cmd: EdgeCommand) -> anyhow::Result<()> {
    match cmd {
        EdgeCommand::Join(args) => {
            let enrolment = edge::join(&args.token, &args.data_dir, args.name).await?;
            out(&format!(
                "Joined {} as {} ({})",
                enrolment.hub_url, enrolment.device_id, enrolment.name
            ));
            Ok(())
        }
        EdgeCommand::Run(args) => {
            let mut raw = match crate::read_config(args.config.as_ref())? {
                Some(text) => edge::RawConfig::from_toml(&text)?,
                None => edge::RawConfig::default(),
            };
            if args.data_dir.is_some() {
                raw.data_dir = args.data_dir;
            }
            if args.hub_url.is_some() {
                raw.hub.url = args.hub_url;
            }
            if args.listen.is_some() {
                raw.local_api.listen = args.listen;
            }
            // Model paths in the file are relative to the file.
            let base = match &args.config {
                Some(path) => path
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default(),
                None => std::env::current_dir().context("reading the current directory")?,
            };
            let policy_file = raw.router.policy_file.clone().map(|p| base.join(p));
            let mut config = raw.validate_in(&base)?;
            if let Some(path) = policy_file {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the routing policy {}", path.display()))?;
                config.router.policy = router::Policy::from_toml(&text)
                    .with_context(|| format!("routing policy {}", path.display()))?;
            }
            let dir = config.data_dir.clone();
            let agent = edge::agent::run(config)
                .await
                .with_context(|| format!("starting the agent in {}", dir.display()))?;
            out(&format!(
                "Agent {} running; local API on http://{}",
                agent.device_id, agent.local_addr
            ));
            tokio::select! {
                () = agent.wait() => bail!("the agent stopped"),
                () = crate::shutdown_signal() => {
                    tracing::info!("shutting down");
                    Ok(())
                }
            }
        }
    }
}
