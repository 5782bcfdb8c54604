//! `tickflow bench`: the end-to-end benchmark.
//!
//! By default it runs on a pipeline of its own ([`local`], feature `local-bench`): a
//! redis-server (unless `REDIS_URL` is set) and the four services as separate processes
//! ([`crate::local::LocalPipeline`]). It publishes N orders and ticks — through gRPC
//! streaming by default, HTTP or the external stream on request — at a fixed rate or as
//! fast as they are accepted, waits until every stage has handled everything, and reports:
//! events/s end to end, entries per stage, end-to-end latency percentiles (origin →
//! analytics, from analytics' histogram), CPU seconds of each service and of Redis, peak
//! resident memory of each service, and whether every order got exactly one accept/reject
//! report.
//!
//! With `--attach` it starts nothing and measures a pipeline that is already running
//! ([`attach`]).
//!
//! Layout: [`BenchArgs`] (the command line) becomes [`BenchOptions`], whose [`Target`]
//! holds only the settings that target has; [`flow`] is what both share (the flow,
//! publishing, the tally); [`report`] the typed report both print.

pub mod attach;
pub mod flow;
#[cfg(feature = "local-bench")]
pub mod local;
pub mod report;

use anyhow::bail;
use clap::{Args, ValueEnum};

pub use flow::reports_in;
pub use report::Report;

/// `tickflow bench`'s command line. [`BenchArgs::options`] turns it into [`BenchOptions`],
/// refusing a flag that the chosen target would ignore, so that nobody reads a figure as
/// measured with a setting it did not have.
#[derive(Debug, Clone, Args)]
#[command(after_help = BENCH_EXAMPLES)]
pub struct BenchArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Events per second (0: as fast as they are accepted).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How events enter the pipeline (`stream`: flat fields XADDed to ingest's external
    /// stream; not with --attach).
    #[arg(long, value_enum, default_value_t = Via::Grpc)]
    pub via: Via,
    /// How many instruments the flow spreads over (with --attach: the first N of the
    /// pipeline's reference data, by symbol).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..10_000))]
    pub symbols: u64,
    /// Partitions of the pipeline the bench starts (not with --attach).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: Option<u32>,
    /// Batch size of the services the bench starts (not with --attach).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: Option<u64>,
    /// Trace sampling ratio (0..1) of the services the bench starts; tracing is off
    /// without it (not with --attach).
    #[arg(long)]
    pub trace_ratio: Option<f64>,
    /// The flow's random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure the running pipeline that REDIS_URL, TICKFLOW_NAMESPACE and
    /// TICKFLOW_PARTITIONS name, instead of starting one.
    #[arg(long)]
    pub attach: bool,
    /// With --attach: ingest's gRPC URL [default: $INGEST_GRPC, else http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    pub grpc: Option<String>,
    /// With --attach --via http: ingest's HTTP base URL [default: http://127.0.0.1:8080].
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
}

const BENCH_EXAMPLES: &str = "\
Examples:
  tickflow bench --events 100000                 # a pipeline of its own, as fast as it goes
  tickflow bench --events 100000 --rate 10000 --partitions 4 --json
  tickflow bench --attach --grpc http://127.0.0.1:50051 --events 20000 --rate 2000
  tickflow bench --attach --via http --http http://127.0.0.1:8080

Environment (--attach): REDIS_URL, TICKFLOW_NAMESPACE and TICKFLOW_PARTITIONS name the
running pipeline, as every service reads them; INGEST_GRPC is the default of --grpc.
Without --attach, REDIS_URL (if set) is the Redis the bench's own pipeline runs on.";

/// How events enter the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Ingest's gRPC `PublishStream`.
    Grpc,
    /// Ingest's HTTP API.
    Http,
    /// Flat-field entries XADDed to ingest's external stream.
    Stream,
}

impl Via {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Via::Grpc => "grpc",
            Via::Http => "http",
            Via::Stream => "stream",
        }
    }
}

/// `tickflow bench`'s options, as checked: what to publish, and where.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The flow and its pace.
    pub flow: FlowOptions,
    /// One JSON object instead of the table.
    pub json: bool,
    /// Which pipeline is measured, with that target's own settings.
    pub target: Target,
}

/// The flow every benchmark publishes.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Events to publish (≥ 1).
    pub events: u64,
    /// Events per second (0: as fast as they are accepted).
    pub rate: u64,
    /// How many instruments they spread over (≥ 1).
    pub symbols: usize,
    /// The flow's random seed.
    pub seed: u64,
}

/// The pipeline a run measures.
#[derive(Debug, Clone)]
pub enum Target {
    /// A pipeline the bench starts, with these settings.
    Local(LocalOptions),
    /// A running pipeline, published to through this ingest API.
    Attach(Ingest),
}

/// The settings of the pipeline the bench starts.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// How events are published.
    pub via: Via,
    /// Partitions.
    pub partitions: u32,
    /// The services' batch size.
    pub batch: usize,
    /// The services' trace sampling ratio (`None`: no tracing).
    pub trace_ratio: Option<f64>,
}

/// A running pipeline's ingest API (its external stream is not offered: what goes there
/// cannot be told apart from other programs' entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingest {
    /// gRPC `PublishStream` at this URL.
    Grpc(String),
    /// The HTTP API at this base URL.
    Http(String),
}

impl Ingest {
    /// The URL published to.
    pub fn url(&self) -> &str {
        match self {
            Ingest::Grpc(url) | Ingest::Http(url) => url,
        }
    }

    /// How: `grpc` or `http`.
    pub fn via(&self) -> Via {
        match self {
            Ingest::Grpc(_) => Via::Grpc,
            Ingest::Http(_) => Via::Http,
        }
    }
}

impl BenchArgs {
    /// The checked options; `ingest_grpc` is `INGEST_GRPC`, the default of `--grpc`.
    pub fn options(self, ingest_grpc: Option<String>) -> anyhow::Result<BenchOptions> {
        let flow = FlowOptions {
            events: self.events,
            rate: self.rate,
            symbols: self.symbols as usize,
            seed: self.seed,
        };
        let target = if self.attach {
            for (flag, given) in [
                ("--partitions", self.partitions.is_some()),
                ("--batch", self.batch.is_some()),
                ("--trace-ratio", self.trace_ratio.is_some()),
            ] {
                if given {
                    bail!(
                        "{flag} sets up the pipeline the bench starts; with --attach the running \
                         pipeline has its own settings (TICKFLOW_PARTITIONS names its partitions)"
                    );
                }
            }
            Target::Attach(match self.via {
                Via::Stream => {
                    bail!("--attach publishes through ingest's API: --via grpc or http")
                }
                Via::Grpc if self.http.is_some() => bail!("--http goes with --via http"),
                Via::Http if self.grpc.is_some() => bail!("--grpc goes with --via grpc"),
                Via::Grpc => Ingest::Grpc(
                    self.grpc
                        .or(ingest_grpc)
                        .unwrap_or_else(|| "http://127.0.0.1:50051".into()),
                ),
                Via::Http => {
                    Ingest::Http(self.http.unwrap_or_else(|| "http://127.0.0.1:8080".into()))
                }
            })
        } else {
            if self.grpc.is_some() || self.http.is_some() {
                bail!("--grpc and --http name a running pipeline's ingest: they go with --attach");
            }
            if let Some(ratio) = self.trace_ratio
                && !(0.0..=1.0).contains(&ratio)
            {
                bail!("--trace-ratio is a ratio between 0 and 1, not {ratio}");
            }
            Target::Local(LocalOptions {
                via: self.via,
                partitions: self.partitions.unwrap_or(16),
                batch: self.batch.unwrap_or(256) as usize,
                trace_ratio: self.trace_ratio,
            })
        };
        Ok(BenchOptions {
            flow,
            json: self.json,
            target,
        })
    }
}

/// Runs the benchmark the options ask for, prints its report, and fails when an order
/// was lost or doubled (or, attached, when the pipeline did not finish in time).
/// `redis_url` is `REDIS_URL` for a local run; an attached run reads its pipeline's
/// configuration from `env`.
pub async fn run(
    options: BenchOptions,
    redis_url: Option<String>,
    env: &streams_core::Env,
) -> anyhow::Result<()> {
    let report = match &options.target {
        Target::Local(local) => run_local(&options.flow, local, redis_url).await?,
        Target::Attach(ingest) => attach::run(&options.flow, ingest, env).await?,
    };
    report.print(options.json);
    if !report.exactly_once() {
        bail!(
            "{} orders lost and {} duplicated",
            report.lost,
            report.duplicated
        );
    }
    if let report::Mode::Attach(attached) = &report.mode
        && attached.timed_out
    {
        bail!(
            "the pipeline did not report every order and analyse the run within the deadline \
             (are all four services running? `tickflow status` shows each stage's backlog)"
        );
    }
    Ok(())
}

#[cfg(feature = "local-bench")]
async fn run_local(
    flow: &FlowOptions,
    options: &LocalOptions,
    redis_url: Option<String>,
) -> anyhow::Result<Report> {
    local::run(flow, options, redis_url).await
}

#[cfg(not(feature = "local-bench"))]
async fn run_local(
    _flow: &FlowOptions,
    _options: &LocalOptions,
    _redis_url: Option<String>,
) -> anyhow::Result<Report> {
    bail!(
        "this build of tickflow measures running pipelines only (`tickflow bench --attach`); \
         `make bench` (cargo build -p tickflow --features local-bench) builds the one that \
         starts a pipeline of its own"
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn options(text: &str) -> anyhow::Result<BenchOptions> {
        let args = std::iter::once("bench").chain(text.split_whitespace());
        Command::try_parse_from(args)?.bench.options(None)
    }

    #[test]
    fn flags_the_chosen_target_would_ignore_are_refused() {
        for refused in [
            "--attach --partitions 4",
            "--attach --batch 64",
            "--attach --trace-ratio 1",
            "--attach --via stream",
            "--attach --http http://x:8080",
            "--attach --via http --grpc http://x:50051",
            "--grpc http://x:50051",
            "--http http://x:8080",
            "--trace-ratio 2",
            "--events 0",
            "--symbols 0",
            "--partitions 0",
        ] {
            assert!(options(refused).is_err(), "{refused}");
        }
        let attach = options("--attach --via http --http http://x:8080 --events 5").unwrap();
        assert!(
            matches!(attach.target, Target::Attach(Ingest::Http(ref url)) if url == "http://x:8080")
        );
        assert_eq!(attach.flow.events, 5);
        let local = options("--partitions 4 --batch 64 --trace-ratio 0.5").unwrap();
        let Target::Local(local) = local.target else {
            panic!("a local run")
        };
        assert_eq!(
            (local.partitions, local.batch, local.trace_ratio),
            (4, 64, Some(0.5))
        );
    }

    #[test]
    fn an_attached_run_defaults_to_ingest_grpc() {
        let args = Command::try_parse_from(["bench", "--attach"])
            .unwrap()
            .bench;
        let options = args.options(Some("http://ingest:50051".into())).unwrap();
        assert!(
            matches!(options.target, Target::Attach(Ingest::Grpc(ref url)) if url == "http://ingest:50051")
        );
    }
}
