//! `tickflow bench`: the end-to-end benchmark.
//!
//! By default it runs on a pipeline of its own ([`local`], feature `local-bench`): a
//! redis-server or a 3-master Redis Cluster (unless `REDIS_URL` is set) and the four
//! services as separate processes ([`crate::local::LocalPipeline`]). It can first fill the
//! books with resting orders that nothing trades with; then it publishes N orders and
//! ticks over up to 10,000 symbols, Zipf-skewed — through gRPC streaming by default, HTTP
//! or the external stream on request — at a fixed rate or as fast as they are accepted,
//! waits until every stage has handled everything, and reports: events/s end to end,
//! entries per stage, end-to-end latency percentiles (origin → analytics, from analytics'
//! histogram), also in multiples of Redis's round trip measured in the same run, Redis's
//! CPU and commands per event and what each Redis node did (`nodes.rs`), CPU seconds and
//! peak resident memory of each service, the stages' own timings (`timings.rs`), and
//! whether every order got exactly one accept/reject report.
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
mod nodes;
pub mod report;
#[cfg(feature = "local-bench")]
mod timings;

use anyhow::bail;
use clap::{Args, ValueEnum};
use streams_core::config::RedisMode;

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
    /// How many instruments the flow spreads over, 1 to 10,000 (with --attach: the first N
    /// of the pipeline's reference data, by symbol).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=MAX_SYMBOLS))]
    pub symbols: u64,
    /// How unevenly events spread over the symbols: the Zipf exponent S, the symbol of
    /// rank k getting a share of 1/k^S (the first the hottest). 1 gives 16 symbols' first
    /// 30 % of the events and 10,000 symbols' first 10 %; 0 spreads them evenly, in turn.
    #[arg(long, default_value_t = DEFAULT_SKEW)]
    pub skew: f64,
    /// Resting orders to put in the books before the measured flow, spread over the
    /// symbols and priced so that nothing trades with them; they are not in the flow's
    /// figures (not with --attach).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_RESTING))]
    pub resting: Option<u64>,
    /// Redis of the pipeline the bench starts: a redis-server, or a cluster of 3 masters
    /// with a replica each; with REDIS_URL set, which kind REDIS_URL names [default:
    /// $TICKFLOW_REDIS_MODE, else standalone] (not with --attach).
    #[arg(long, value_enum, value_name = "MODE")]
    pub redis_mode: Option<RedisModeArg>,
    /// Replicas each commit and append waits for (the services' TICKFLOW_WAIT_REPLICAS;
    /// needs a Redis with replicas, e.g. --redis-mode cluster) (not with --attach).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub wait_replicas: Option<u32>,
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

/// Most instruments a flow spreads over (`--symbols`).
pub const MAX_SYMBOLS: u64 = 10_000;
/// Most resting orders `--resting` puts in the books.
pub const MAX_RESTING: u64 = 1_000_000;
/// The Zipf exponent of the symbols' popularity unless `--skew` says otherwise.
pub const DEFAULT_SKEW: f64 = 1.0;
/// The highest `--skew` (at 5 the first symbol already gets 96 % of the events).
pub const MAX_SKEW: f64 = 5.0;

const BENCH_EXAMPLES: &str = "\
Examples:
  tickflow bench --events 100000                 # a pipeline of its own, as fast as it goes
  tickflow bench --events 100000 --rate 10000 --partitions 4 --json
  tickflow bench --events 100000 --symbols 10000 --resting 100000
  tickflow bench --events 50000 --rate 10000 --redis-mode cluster --wait-replicas 1
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

/// Which Redis the bench's own pipeline runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisModeArg {
    /// One redis-server.
    Standalone,
    /// A Redis Cluster.
    Cluster,
}

impl From<RedisModeArg> for RedisMode {
    fn from(mode: RedisModeArg) -> Self {
        match mode {
            RedisModeArg::Standalone => RedisMode::Standalone,
            RedisModeArg::Cluster => RedisMode::Cluster,
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
    /// How many instruments they spread over (1 to [`MAX_SYMBOLS`]).
    pub symbols: usize,
    /// The Zipf exponent of the instruments' popularity (0: evenly, in turn).
    pub skew: f64,
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
    /// Resting orders put in the books before the flow.
    pub resting: u64,
    /// Standalone or cluster (`None`: `TICKFLOW_REDIS_MODE`, else standalone).
    pub redis_mode: Option<RedisMode>,
    /// The services' `TICKFLOW_WAIT_REPLICAS`.
    pub wait_replicas: u32,
}

impl LocalOptions {
    /// The Redis mode: `--redis-mode`, else `TICKFLOW_REDIS_MODE` from `env`, else
    /// standalone. `redis_url_given` says whether `REDIS_URL` names a Redis to use; without
    /// one the bench starts its own, and a standalone server of its own has no replica to
    /// wait for.
    pub fn redis_mode(
        &self,
        env: &streams_core::Env,
        redis_url_given: bool,
    ) -> anyhow::Result<RedisMode> {
        let mode = match self.redis_mode {
            Some(mode) => mode,
            None => env.parse_or("TICKFLOW_REDIS_MODE", RedisMode::Standalone)?,
        };
        if self.wait_replicas > 0 && mode == RedisMode::Standalone && !redis_url_given {
            bail!(
                "--wait-replicas {}: the redis-server the bench starts has no replica; use \
                 --redis-mode cluster, or REDIS_URL naming a server with replicas",
                self.wait_replicas
            );
        }
        Ok(mode)
    }
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
        if !(0.0..=MAX_SKEW).contains(&self.skew) {
            bail!(
                "--skew is a Zipf exponent from 0 (even) to {MAX_SKEW}, not {}",
                self.skew
            );
        }
        let flow = FlowOptions {
            events: self.events,
            rate: self.rate,
            symbols: self.symbols as usize,
            skew: self.skew,
            seed: self.seed,
        };
        let target = if self.attach {
            for (flag, given) in [
                ("--partitions", self.partitions.is_some()),
                ("--batch", self.batch.is_some()),
                ("--trace-ratio", self.trace_ratio.is_some()),
                ("--resting", self.resting.is_some()),
                ("--redis-mode", self.redis_mode.is_some()),
                ("--wait-replicas", self.wait_replicas.is_some()),
            ] {
                if given {
                    bail!(
                        "{flag} sets up the pipeline the bench starts; with --attach the running \
                         pipeline has its own settings (TICKFLOW_PARTITIONS and \
                         TICKFLOW_REDIS_MODE name its partitions and its kind of Redis)"
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
                resting: self.resting.unwrap_or(0),
                redis_mode: self.redis_mode.map(RedisMode::from),
                wait_replicas: self.wait_replicas.unwrap_or(0),
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
        Target::Local(local) => {
            let mode = local.redis_mode(env, redis_url.is_some())?;
            run_local(&options.flow, local, redis_url, mode).await?
        }
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
    mode: RedisMode,
) -> anyhow::Result<Report> {
    local::run(flow, options, redis_url, mode).await
}

#[cfg(not(feature = "local-bench"))]
async fn run_local(
    _flow: &FlowOptions,
    _options: &LocalOptions,
    _redis_url: Option<String>,
    _mode: RedisMode,
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
            "--symbols 10001",
            "--partitions 0",
            "--attach --resting 10",
            "--attach --redis-mode cluster",
            "--attach --wait-replicas 1",
            "--resting 1000001",
            "--wait-replicas 17",
            "--redis-mode sentinel",
            "--skew -1",
            "--skew 5.5",
            "--skew NaN",
            "--skew inf",
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
    fn ten_thousand_skewed_symbols_deep_books_and_a_cluster_are_accepted() {
        let options = options(
            "--symbols 10000 --skew 0 --resting 1000000 --redis-mode cluster --wait-replicas 1",
        )
        .unwrap();
        assert_eq!((options.flow.symbols, options.flow.skew), (10_000, 0.0));
        let Target::Local(local) = options.target else {
            panic!("a local run")
        };
        assert_eq!(local.resting, 1_000_000);
        assert_eq!(local.redis_mode, Some(RedisMode::Cluster));
        assert_eq!(local.wait_replicas, 1);
        // The defaults: skew 1, no resting orders, no WAIT, the mode from the environment.
        let defaults = super::tests::options("").unwrap();
        assert_eq!(defaults.flow.skew, DEFAULT_SKEW);
        let Target::Local(local) = defaults.target else {
            panic!("a local run")
        };
        assert_eq!(
            (local.resting, local.wait_replicas, local.redis_mode),
            (0, 0, None)
        );
    }

    #[test]
    fn the_redis_mode_comes_from_the_flag_else_the_environment() {
        let local = |flags: &str| match options(flags).unwrap().target {
            Target::Local(local) => local,
            Target::Attach(_) => panic!("a local run"),
        };
        let cluster_env = streams_core::Env::from_pairs([("TICKFLOW_REDIS_MODE", "cluster")]);
        let empty = streams_core::Env::from_pairs::<&str, &str>([]);
        assert_eq!(
            local("").redis_mode(&empty, false).unwrap(),
            RedisMode::Standalone
        );
        assert_eq!(
            local("").redis_mode(&cluster_env, false).unwrap(),
            RedisMode::Cluster
        );
        assert_eq!(
            local("--redis-mode standalone")
                .redis_mode(&cluster_env, true)
                .unwrap(),
            RedisMode::Standalone
        );
        let bad_env = streams_core::Env::from_pairs([("TICKFLOW_REDIS_MODE", "sentinel")]);
        let refused = local("").redis_mode(&bad_env, false).unwrap_err();
        assert!(
            refused.to_string().contains("TICKFLOW_REDIS_MODE"),
            "{refused}"
        );
        // WAIT needs replicas: a server the bench starts has none; a given one may.
        let wait = local("--wait-replicas 1");
        let refused = wait.redis_mode(&empty, false).unwrap_err();
        assert!(refused.to_string().contains("no replica"), "{refused}");
        assert!(wait.redis_mode(&empty, true).is_ok());
        assert_eq!(
            wait.redis_mode(&cluster_env, false).unwrap(),
            RedisMode::Cluster
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
