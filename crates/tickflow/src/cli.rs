//! The command line: every `tickflow` command, its flags and its help, in one clap
//! definition, and the dispatch to the module that does the work.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::{bench, dlq, groups, load, status, tail, top};

/// tickflow: a trading pipeline on Redis Streams, and the tools to run and look at it.
#[derive(Debug, Parser)]
#[command(
    name = "tickflow",
    version,
    arg_required_else_help = false,
    after_help = TOP_EXAMPLES
)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Option<Command>,
}

const TOP_EXAMPLES: &str = "\
Examples:
  tickflow status                               # where events are, per stage and partition
  tickflow tail inbound --follow                # entries as they come, decoded
  tickflow dlq list --stage transform           # dead letters and why
  tickflow top                                  # a live view
  tickflow load --rate 200                      # demo traffic into ingest's gRPC API
  tickflow bench --events 100000                # the end-to-end benchmark
  tickflow bench --attach                       # ... against the running pipeline
  tickflow serve engine                         # one service, as its own binary runs it
  tickflow completions bash > /etc/bash_completion.d/tickflow

`tickflow help COMMAND` (or `tickflow COMMAND --help`) shows a command's flags and examples.";

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Each stage's position: length, lag, pending, oldest pending, owner, consumers,
    /// dead letters, per partition (from Redis; works with every service down).
    Status(status::StatusArgs),
    /// Print a stream's entries decoded (envelope, payload, dead-letter reason).
    Tail(tail::TailArgs),
    /// A stage's dead letters: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Consumer groups: move a stage's position.
    #[command(subcommand)]
    Groups(groups::GroupsCommand),
    /// A live view: per stage throughput, lag, pending, dead letters, consumers, and the
    /// end-to-end latency.
    Top(top::TopArgs),
    /// Send a steady demo load of orders, cancels and ticks through ingest's gRPC API.
    Load(load::LoadOptions),
    /// Measure the pipeline end to end: throughput, latency, CPU, memory, exactly once.
    Bench(bench::BenchArgs),
    /// Run one service, exactly as its own binary does.
    #[command(
        after_help = "Examples:\n  REDIS_URL=redis://127.0.0.1:6379 tickflow serve transform"
    )]
    Serve {
        /// The service.
        service: Service,
    },
    /// Exit 0 when a service's /readyz (on HTTP_ADDR, else its default address) answers 200.
    #[command(after_help = "Examples:\n  HTTP_ADDR=127.0.0.1:8081 tickflow healthcheck transform")]
    Healthcheck {
        /// The service.
        service: Service,
    },
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  tickflow completions bash > ~/.local/share/bash-completion/completions/tickflow
  tickflow completions zsh > \"${fpath[1]}/_tickflow\"
  tickflow completions fish > ~/.config/fish/completions/tickflow.fish")]
    Completions {
        /// The shell.
        shell: Shell,
    },
}

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// HTTP, gRPC and external streams into the pipeline.
    Ingest,
    /// Validation and normalization against the reference data.
    Transform,
    /// The order books.
    Engine,
    /// Stats, bars, latency, and the query API.
    Analytics,
}

/// A shell `tickflow completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        // `tickflow` alone: the overview, as `tickflow --help` prints it.
        Cli::command().print_help()?;
        return Ok(());
    };
    match command {
        Command::Status(args) => status::run(args).await,
        Command::Tail(args) => tail::run(args).await,
        Command::Dlq(command) => dlq::run(command).await,
        Command::Groups(command) => groups::run(command).await,
        Command::Top(args) => top::run(args).await,
        Command::Load(options) => load::load(options).await,
        Command::Bench(args) => {
            let env = streams_core::Env::process();
            let options = args.options(env.get("INGEST_GRPC"))?;
            bench::run(options, env.get("REDIS_URL"), &env).await
        }
        Command::Serve { service } => serve(service).await,
        Command::Healthcheck { service } => healthcheck(service),
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tickflow",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

async fn serve(service: Service) -> anyhow::Result<()> {
    let env = streams_core::Env::process();
    let shutdown = streams_core::shutdown::on_signals();
    match service {
        Service::Ingest => ingest::main_with(env, shutdown).await,
        Service::Transform => transform::main_with(env, shutdown).await,
        Service::Engine => engine::main_with(env, shutdown).await,
        Service::Analytics => analytics::main_with(env, shutdown).await,
    }
}

/// `tickflow healthcheck SERVICE`: the same check as `SERVICE healthcheck`.
fn healthcheck(service: Service) -> anyhow::Result<()> {
    let default = match service {
        Service::Ingest => ingest::DEFAULT_HTTP_ADDR,
        Service::Transform => transform::DEFAULT_HTTP_ADDR,
        Service::Engine => engine::DEFAULT_HTTP_ADDR,
        Service::Analytics => analytics::DEFAULT_HTTP_ADDR,
    };
    let (code, line) = streams_core::healthcheck::run(&streams_core::Env::process(), default);
    println!("{line}");
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
