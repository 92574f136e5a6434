use anyhow::Result;
use clap::Parser;
use lbctl::cli::{Cli, Command};

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(a) => lbctl::cli::agent::execute(a).await,
        Command::Services(a) => lbctl::cli::services::execute(a),
    }
}
