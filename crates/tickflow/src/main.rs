//! The `tickflow` binary: parses the command line and runs it ([`tickflow::cli`]).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tickflow::cli::run(tickflow::cli::Cli::parse()).await
}
