//! `strata`: one binary for every role of Strata. `strata hub` runs the
//! central server, `strata edge` the agent on a device, `strata demo` a hub
//! and a simulated fleet on one machine.
//!
//! This crate owns the command line, configuration files, logging and exit
//! codes; the behaviour lives in the `hub` and `edge` crates.

mod bench;
mod cmd_edge;
mod cmd_fl;
mod cmd_hub;
mod cmd_insights;
mod cmd_keys;
mod cmd_model;
mod cmd_publish;
mod cmd_rollout;
mod demo;
mod fl_publish;
mod operator;
mod output;
mod simfleet;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Strata: AI on the edge and in the hub, as one system.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub (enrolment, device identity, fleet state), or manage it.
    ///
    /// With no subcommand, serves the hub API over HTTPS. On first start it
    /// creates its certificate authority, its database and an operator
    /// credential, which it prints once.
    Hub(cmd_hub::HubArgs),
    /// Join a hub, or run the agent on this device.
    #[command(subcommand)]
    Edge(cmd_edge::EdgeCommand),
    /// What the fleet reported: insights, aggregates, trends, forecasts.
    Insights(cmd_insights::InsightsArgs),
    /// The model registry's signing keys.
    #[command(subcommand)]
    Keys(cmd_keys::KeysCommand),
    /// Build and inspect models.
    #[command(subcommand)]
    Model(cmd_model::ModelCommand),
    /// Roll published model releases out to the fleet in health-gated stages.
    #[command(subcommand)]
    Rollout(cmd_rollout::RolloutCommand),
    /// Start a hub and a simulated fleet of real agents on this machine and
    /// show the fleet live.
    Demo(demo::DemoArgs),
    /// Federated learning: simulate a fleet training together, and publish a
    /// finished task's model as a signed release.
    #[command(subcommand)]
    Fl(cmd_fl::FlCommand),
    /// Measure Strata side by side with the engines the field uses.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// An error the user can act on, reported as one line and exit code 1.
fn report(e: &anyhow::Error) -> ExitCode {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    eprintln!("strata: error: {line}");
    ExitCode::FAILURE
}

fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STRATA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Simulated fleets enrol many devices in this process; one line per
    // enrolment would bury the report.
    init_logging(match cli.command {
        Command::Fl(_) | Command::Bench(_) => "info,edge::join=warn",
        _ => "info",
    });
    pki::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&anyhow::Error::new(e).context("starting the async runtime")),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Hub(args) => cmd_hub::run(args).await,
            Command::Edge(cmd) => cmd_edge::run(cmd).await,
            Command::Model(cmd) => cmd_model::run(cmd).await,
            Command::Insights(args) => cmd_insights::run(args).await,
            Command::Keys(cmd) => cmd_keys::run(cmd).await,
            Command::Rollout(cmd) => cmd_rollout::run(cmd).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Fl(cmd) => cmd_fl::run(cmd).await,
            Command::Bench(cmd) => bench::run(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// Reads a TOML config file, if one was named.
fn read_config(path: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    path.map(|p| {
        std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display()))
    })
    .transpose()
}

/// Waits for ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments are consistent (unique names, valid
    /// defaults), which clap otherwise checks only when that subcommand is
    /// parsed.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
