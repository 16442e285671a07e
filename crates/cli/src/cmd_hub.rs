//! `strata hub …`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use protocol::Labels;

use crate::output::out;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct HubArgs {
    #[command(subcommand)]
    command: Option<HubCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML; see docs/configuration.md). Flags override it.
    #[arg(long, short, env = "STRATA_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the hub's state (database, CA, certificates).
    #[arg(long, env = "STRATA_HUB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7443 (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// URL devices use to reach the hub (embedded in join tokens).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Also write the operator credential created on first start to this
    /// file (mode 0600), for automation.
    #[arg(long)]
    operator_token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum HubCommand {
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the OpenAPI document of the hub API.
    Openapi,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a one-time join token and print it on stdout.
    ///
    /// Runs on the hub machine against the hub's data directory (the hub may
    /// be running). The token embeds the hub URL and pins the hub CA's
    /// fingerprint; give it to `strata edge join --token`.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
struct TokenCreateArgs {
    /// Hub configuration file, to find the data directory.
    #[arg(long, short, env = "STRATA_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// The hub's data directory.
    #[arg(long, env = "STRATA_HUB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How long the token stays valid (e.g. 30m, 1h, 7d).
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// A label for the device that joins, as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Hub URL to embed, if not the one the hub last started with.
    #[arg(long)]
    hub_url: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn hub_config(
    config: Option<&PathBuf>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<hub::RawConfig> {
    let mut raw = match crate::read_config(config)? {
        Some(text) => hub::RawConfig::from_toml(&text)?,
        None => hub::RawConfig::default(),
    };
    if data_dir.is_some() {
        raw.data_dir = data_dir;
    }
    Ok(raw)
}

pub(crate) async fn run(args: HubArgs) -> anyhow::Result<()> {
    match args.command {
        None => serve(args.serve).await,
        Some(HubCommand::Openapi) => {
            out(&hub::openapi::document_json());
            Ok(())
        }
        Some(HubCommand::Token(TokenCommand::Create(a))) => token_create(a).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut raw = hub_config(args.config.as_ref(), args.data_dir)?;
    if args.listen.is_some() {
        raw.listen = args.listen;
    }
    if args.advertise_url.is_some() {
        raw.advertise_url = args.advertise_url;
    }
    // Model paths in the file are relative to the file.
    let base = match &args.config {
        Some(path) => path
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
        None => std::env::current_dir().context("reading the current directory")?,
    };
    let mut config = raw.validate_in(&base)?;
    if let Some(up) = &mut config.macro_tier.upstream
        && let Some(var) = &up.api_key_env
    {
        up.api_key = Some(std::env::var(var).with_context(|| {
            format!("macro.upstream_api_key_env names {var}, which is not set")
        })?);
    }
    let data_dir = config.data_dir.clone();
    let hub = hub::start(config)
        .await
        .with_context(|| format!("starting the hub in {}", data_dir.display()))?;
    if let Some(token) = &hub.new_operator_token {
        if let Some(path) = &args.operator_token_file {
            durable::write_atomic(path, format!("{token}\n").as_bytes(), durable::PRIVATE)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        out("Created the operator credential. It is shown only this once; keep it safe:");
        out(&format!("  STRATA_OPERATOR_TOKEN={token}"));
    }
    out(&format!("Hub listening on {}", hub.url));
    out(&format!("  CA fingerprint {}", hub.ca_fingerprint));
    out(&format!("  CA certificate {}", hub.ca_cert_path.display()));
    tokio::select! {
        () = hub.wait() => bail!("the hub's listener stopped"),
        () = crate::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let config = hub_config(args.config.as_ref(), args.data_dir)?.validate()?;
    let dir = hub::server::DataDir::new(&config.data_dir);
    if !dir.database().exists() {
        bail!(
            "{} holds no hub state; start `strata hub --data-dir {}` once first",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let ca = hub::server::load_or_create_ca(&dir)?;
    let store = hub::store::Store::open(&dir.database())?;
    let hub_url = match args.hub_url {
        Some(url) => url,
        None => store
            .meta("hub_url")
            .await?
            .context("the hub has never started, so its URL is unknown; pass --hub-url")?,
    };
    let labels: Labels = args.labels.into_iter().collect();
    let ttl: Duration = args.ttl.into();
    let created = hub::tokens::create(&store, &hub_url, &ca.fingerprint(), ttl, labels).await?;
    eprintln!(
        "join token {} for {hub_url}, expires {}",
        created.token_id, created.expires_at
    );
    out(&created.token);
    Ok(())
}
