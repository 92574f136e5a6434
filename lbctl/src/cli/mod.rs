//! Command line: one module per subcommand (its arguments and `execute`).

pub mod agent;
pub mod render;
pub mod services;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::datapath::pins::DEFAULT_BPFFS;

#[derive(Debug, Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Kubernetes Service load balancer on eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the agent's maps are pinned; shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct PinArgs {
    /// bpffs folder of the agent's pinned maps and links.
    #[arg(long, env = "LBCTL_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep the datapath in sync with the Services.
    Agent(agent::Args),
    /// List Services as the datapath has them.
    #[command(alias = "svc")]
    Services(services::Args),
}

/// The whole program: logging to stderr, then the subcommand.
pub fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(a) => tokio::runtime::Runtime::new()?.block_on(agent::execute(a)),
        Command::Services(a) => services::execute(a),
    }
}
