//! The `tickflow` binary: parses the command line and runs it ([`tickflow::cli`]).

use clap::Parser;

#[tokio::main]
async fn main() {
    if let Err(e) = tickflow::cli::run(tickflow::cli::Cli::parse()).await {
        // The error and its causes on one line, without a backtrace (RUST_BACKTRACE is
        // for panics).
        eprintln!("tickflow: {e:#}");
        std::process::exit(1);
    }
}
