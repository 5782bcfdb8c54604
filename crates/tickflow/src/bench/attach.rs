//! `tickflow bench --attach`: the benchmark against a pipeline that is already running
//! (docker compose, Kubernetes, `make run`), starting nothing.
//!
//! - Where: `REDIS_URL`, `TICKFLOW_NAMESPACE` and `TICKFLOW_PARTITIONS` name the pipeline's
//!   Redis, key prefix and partitions (read as every service reads them); ingest is at
//!   `--grpc URL` (default `INGEST_GRPC`, as for `tickflow load`, else
//!   `http://127.0.0.1:50051`) or, with `--via http`, at `--http URL` (default
//!   `http://127.0.0.1:8080`).
//! - First it checks that analytics reads every market stream of those partitions and of
//!   no more, so that a wrong `TICKFLOW_PARTITIONS` is a clear error, not a run that waits
//!   on the wrong streams. It warns of bench groups an earlier run left behind.
//! - It trades the pipeline's own instruments (the first `--symbols` of its reference
//!   data, by symbol) around the engine's reference price (the last trade or tick), within
//!   their tick, lot, static limits and half their price band, under client order ids
//!   `bench-<run>-<n>`. `<run>` is printed at the start. Its ticks are printed at that
//!   reference price; for an instrument that has none yet, they set one.
//! - It reads the market streams through a consumer group of its own,
//!   `tickflow-bench-<run>`, created (all partitions at once) before the first order: with
//!   NOACK nothing is left pending, and safe trimming keeps every entry it has not read
//!   yet. The group is removed at the end, on an error, a panic, SIGTERM and Ctrl-C.
//! - It waits until every order has its accept/reject report and analytics has committed
//!   the last entry with a report of the run on each partition (not until the whole
//!   pipeline is idle: other traffic may go on), or gives up after a deadline (`timed_out`
//!   in the report).
//! - Latency is what analytics' histogram gained over the run: the run's own market
//!   entries (but for ticks published after a partition's last order, which may land
//!   after), plus whatever other traffic the pipeline carried meanwhile.
//! - At the end, and after an error once every order was published, it cancels the run's
//!   orders that may still rest (those whose last report leaves a quantity, and those not
//!   reported at all), so that the benchmark does not leave them to trade against real
//!   flow; `left_resting` counts the cancels not answered in time. After Ctrl-C or SIGTERM
//!   it only removes its group.
//! - Entries of other traffic that do not decode are skipped and counted (`undecodable`).
//! - The services' CPU and memory are not measured in this mode: they may run on other
//!   machines. Redis's CPU and commands are (INFO, on the server or on every node of a
//!   cluster), with everything else it did meanwhile but the bench's own reads; so is
//!   Redis's round trip, on a key of the bench's own outside the namespace, before and
//!   after the run.
//! - On a Redis Cluster (`TICKFLOW_REDIS_MODE=cluster`) no command names keys of two
//!   partitions: each partition's market stream is read, and its group created and removed,
//!   by a command of its own (a non-blocking read per partition, then a short sleep when
//!   none had anything).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::FutureExt;
use redis::Value;
use streams_core::{
    KeySpace,
    config::RedisMode,
    connection::{Connection, query_each},
    inspect::GroupInfo,
};
use tickflow_proto::{topology, v1};
use tokio_util::task::AbortOnDropHandle;
use transform::refdata::Instrument;

use super::{
    FlowOptions, Ingest,
    flow::{
        self, MAX_LOTS, Market, PRICE_SPREAD_TICKS, Tally, histogram_since, order_ids,
        publish_grpc, publish_http, reports_in,
    },
    nodes::{self, Nodes, OwnCommands, Window},
    report::{AttachReport, Latency, LatencyInRtt, Mode, Rate, Report},
};

/// How long the run may take, beyond publishing, to be reported and analysed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the resting orders' cancels may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries per stream per read.
const READ_COUNT: usize = 2_000;
/// The highest limit price the flow uses, in millionths (a billion): far above any
/// instrument's, and low enough that no price arithmetic overflows.
const MAX_PRICE_E6: i64 = 1_000_000_000 * 1_000_000;
/// The prefix of every bench group's name.
const GROUP_PREFIX: &str = "tickflow-bench-";

/// Runs the attached benchmark against the pipeline `env` names (`REDIS_URL`,
/// `TICKFLOW_NAMESPACE`, `TICKFLOW_PARTITIONS`), publishing to `ingest`; returns its report.
pub(crate) async fn run(
    options: &FlowOptions,
    ingest: &Ingest,
    env: &streams_core::Env,
) -> anyhow::Result<Report> {
    let config = streams_core::Config::from_env(env, "127.0.0.1:0")?;
    let keys = config.keys.clone();
    // The services' kind of connection: a standalone pool's (the run's blocking reads, of
    // 20 ms, hold nothing else up: its commands go one after the other), or the cluster's.
    let redis = streams_core::Redis::from_config(&config)?;
    let connecting = || format!("connecting to {}", redis.display_url());
    let checkout = redis.pooled().await.with_context(connecting)?;
    let mut conn: Connection = checkout.clone();
    let nodes = Nodes::discover(config.redis_url.expose_secret(), config.redis_mode)
        .await
        .with_context(connecting)?;
    for stale in check_partitions(&mut conn, &keys).await? {
        eprintln!(
            "warning: {stale}: left by an earlier run? It holds back trimming until removed \
             (redis-cli XGROUP DESTROY <stream> <group>)"
        );
    }
    let markets = markets(&mut conn, &redis, &keys, options.symbols).await?;
    let run_id = format!("{:08x}", rand::random::<u32>());
    let run = Run {
        group: format!("{GROUP_PREFIX}{run_id}"),
        prefix: format!("bench-{run_id}-"),
        streams: keys
            .all_partitions()
            .map(|p| keys.stream(topology::MARKET, p))
            .collect(),
        keys,
        ingest: ingest.clone(),
        run_id,
        cluster: config.redis_mode == RedisMode::Cluster,
        nodes,
    };
    let events = flow::flow(
        &markets,
        options.events,
        options.seed,
        options.skew,
        &run.prefix,
    );
    let orders = Orders::of(&events);
    eprintln!(
        "tickflow bench --attach: run {} against {} ({} partitions of {:?}), orders {}<n>, group {}",
        run.run_id,
        run.ingest.url(),
        run.streams.len(),
        run.keys.namespace(),
        run.prefix,
        run.group
    );

    // From here on the group exists: every way out goes through its removal below.
    let stop = streams_core::shutdown::on_signals();
    run.create_groups(&mut conn).await?;
    let mut progress = Progress::default();
    let outcome = tokio::select! {
        outcome = AssertUnwindSafe(run.measure(options, &markets, events, &orders, &mut conn, &mut progress)).catch_unwind() => {
            outcome.unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(anyhow::anyhow!("the run panicked: {message}"))
            })
        }
        _ = stop.cancelled() => Err(anyhow::anyhow!(
            "interrupted: orders {}* may still rest in the books", run.prefix
        )),
    };
    // The multiplexed connection drops the reply of a command the run left half way.
    let cancelled = if stop.is_cancelled() {
        None
    } else {
        let cleanup = run.cancel_orders(&mut conn, &mut progress, &orders);
        Some(
            tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("ingest did not take the cancels in time"))
                }),
        )
    };
    let removed = run.destroy_groups(&mut conn).await;
    let mut report = outcome?;
    removed?;
    let (resting_cancelled, left_resting) = cancelled
        .transpose()
        .with_context(|| format!("cancelling orders {}* left resting", run.prefix))?
        .unwrap_or_default();
    if let Mode::Attach(attached) = &mut report.mode {
        attached.resting_cancelled = resting_cancelled;
        attached.left_resting = left_resting;
    }
    Ok(report)
}

/// One attached run.
struct Run {
    run_id: String,
    /// The consumer group the run reads the market streams through.
    group: String,
    /// Its orders' client order id prefix.
    prefix: String,
    keys: KeySpace,
    /// The market streams, by partition.
    streams: Vec<String>,
    /// Ingest's API.
    ingest: Ingest,
    /// Whether Redis is a cluster (commands per partition).
    cluster: bool,
    /// Redis's nodes, measured before and after.
    nodes: Nodes,
}

/// The run's orders: ids in flow order, and each one's symbol (for its cancel).
struct Orders {
    ids: Vec<String>,
    symbols: HashMap<String, String>,
}

impl Orders {
    fn of(events: &[v1::Event]) -> Self {
        let symbols = events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(v1::event::Kind::NewOrder(o)) => {
                    Some((o.client_order_id.clone(), o.symbol.clone()))
                }
                _ => None,
            })
            .collect();
        Self {
            ids: order_ids(events),
            symbols,
        }
    }
}

/// What the run has done and read so far; kept outside the measurement, so that the
/// cleanup knows it whatever became of the measurement.
#[derive(Default)]
struct Progress {
    tally: Tally,
    /// Per market stream, the id of the last entry with a report of the run.
    last_ours: HashMap<usize, StreamId>,
    /// Whether ingest took every event.
    published_all: bool,
    /// Cancelled orders that have not had a report that ends them yet.
    awaiting_cancel: HashSet<String>,
    /// Entries of the market streams that did not decode (other traffic's).
    undecodable: u64,
    /// The run's own reads and polls.
    own: OwnCommands,
}

/// A stream entry id, ordered as Redis orders them.
type StreamId = (u64, u64);

fn parse_id(id: &str) -> Option<StreamId> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl Run {
    async fn measure(
        &self,
        options: &FlowOptions,
        markets: &[Market],
        events: Vec<v1::Event>,
        orders: &Orders,
        conn: &mut Connection,
        progress: &mut Progress,
    ) -> anyhow::Result<Report> {
        let nodes = &self.nodes;
        let analytics = analytics::aggregate::AnalyticsKeys::new(self.keys.clone());
        let rtt_before = nodes.round_trip().await?;
        let histogram_before = analytics.latency_histogram(conn).await?;
        let redis_before = nodes.snapshot().await?;
        progress.own = OwnCommands::default();
        let count = events.len() as u64;

        let started = Instant::now();
        // Stopped with the run (an error, a signal), not left publishing.
        let mut publisher = AbortOnDropHandle::new(tokio::spawn(publish(
            self.ingest.clone(),
            events,
            options.rate,
        )));
        // A read is never abandoned half way: with NOACK, what Redis delivered to a read
        // nobody waits for any more would be gone for the run.
        while !publisher.is_finished() {
            self.read(conn, progress, Some(Duration::from_millis(20)))
                .await?;
        }
        let accepted = (&mut publisher).await??;
        progress.published_all = accepted == count;
        let published = started.elapsed();
        let deadline =
            Instant::now() + SETTLE_TIMEOUT + Duration::from_secs(options.events / 2_000);
        let mut timed_out = false;
        while !(progress.tally.decided(&orders.ids)
            && self
                .analytics_past(conn, &progress.last_ours, &mut progress.own)
                .await?)
        {
            if Instant::now() > deadline {
                timed_out = true;
                break;
            }
            self.read(conn, progress, Some(Duration::from_millis(5)))
                .await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let redis_after = nodes.snapshot().await?;
        let histogram =
            histogram_since(&histogram_before, analytics.latency_histogram(conn).await?);
        let rtt_after = nodes.round_trip().await?;
        let partition_entries = nodes::partition_entries(conn, &self.keys).await?;
        let redis = nodes
            .usage_since(
                &redis_before,
                &redis_after,
                Window {
                    events: accepted,
                    seconds,
                    own: &progress.own,
                    keys: &self.keys,
                    partition_entries: &partition_entries,
                },
            )
            .await?;
        let redis_cpu = nodes.serving_cpu(&redis_before, &redis_after);
        let latency_us = Latency::of(&histogram);
        let redis_rtt_us = nodes::round_trip(rtt_before, rtt_after);
        // What else the streams hold by now (a late duplicate counts), within reason when
        // other traffic goes on.
        for _ in 0..100 {
            if self.read(conn, progress, None).await? == 0 {
                break;
            }
        }
        let tally = &progress.tally;
        Ok(Report {
            events: options.events,
            accepted,
            via: self.ingest.via().name(),
            rate: Rate(options.rate),
            partitions: self.streams.len() as u32,
            symbol_count: markets.len(),
            skew: options.skew,
            publish_seconds: published.as_secs_f64(),
            seconds,
            events_per_sec: accepted as f64 / seconds,
            latency_rtt: LatencyInRtt::of(&latency_us, redis_rtt_us.p50),
            latency_us,
            redis_cpu_seconds: redis_cpu,
            redis_cpu_us_per_event: redis_cpu * 1e6 / accepted.max(1) as f64,
            redis_commands_per_event: redis.commands as f64 / accepted.max(1) as f64,
            redis_rtt_us,
            redis,
            rejected: tally.rejected,
            first_rejection: tally.first_rejection.clone(),
            lost: tally.lost(&orders.ids),
            duplicated: tally.duplicated(),
            mode: Mode::Attach(AttachReport {
                run: self.run_id.clone(),
                target: self.ingest.url().to_owned(),
                symbols: markets.iter().map(|m| m.symbol.clone()).collect(),
                timed_out,
                undecodable: progress.undecodable,
                // Filled in once the cleanup has run.
                resting_cancelled: 0,
                left_resting: 0,
            }),
        })
    }

    /// One read of every market stream through the run's group (blocking up to `block`,
    /// or not at all); tallies the run's reports. Returns how many entries it read. On a
    /// cluster, one non-blocking read per partition, then a sleep of `block` if none had
    /// anything.
    async fn read(
        &self,
        conn: &mut Connection,
        progress: &mut Progress,
        block: Option<Duration>,
    ) -> anyhow::Result<usize> {
        let command = |streams: &[String], block: Option<Duration>| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg("bench")
                .arg("COUNT")
                .arg(READ_COUNT);
            if let Some(block) = block {
                cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
            }
            cmd.arg("NOACK").arg("STREAMS").arg(streams);
            for _ in streams {
                cmd.arg(">");
            }
            cmd
        };
        let replies: Vec<Value> = if self.cluster {
            let cmds = self
                .streams
                .iter()
                .map(|stream| command(std::slice::from_ref(stream), None))
                .collect();
            progress.own.add("xreadgroup", self.streams.len() as u64);
            query_each(&*conn, cmds)
                .await
                .into_iter()
                .collect::<redis::RedisResult<_>>()?
        } else {
            progress.own.add("xreadgroup", 1);
            vec![command(&self.streams, block).query_async(conn).await?]
        };
        let mut read = 0;
        for reply in replies {
            read += self.tally(reply, progress)?;
        }
        if self.cluster
            && read == 0
            && let Some(block) = block
        {
            tokio::time::sleep(block).await;
        }
        Ok(read)
    }

    /// Tallies the run's reports in one XREADGROUP reply; returns how many entries it had.
    fn tally(&self, reply: Value, progress: &mut Progress) -> anyhow::Result<usize> {
        let mut read = 0;
        for (key, entries) in streams_core::parse_read_reply(reply)? {
            let Some(index) = self.streams.iter().position(|s| *s == key) else {
                continue;
            };
            read += entries.len();
            for entry in entries {
                let Ok(reports) = reports_in(&entry) else {
                    // Not the run's: its entries are the engine's and transform's own.
                    progress.undecodable += 1;
                    continue;
                };
                let mut ours = false;
                for report in reports {
                    if report.client_order_id.starts_with(&self.prefix) {
                        progress.tally.add(&report);
                        if ends_the_order(&report) {
                            progress.awaiting_cancel.remove(&report.client_order_id);
                        }
                        ours = true;
                    }
                }
                if ours && let Some(id) = parse_id(&entry.id) {
                    progress.last_ours.insert(index, id);
                }
            }
        }
        Ok(read)
    }

    /// Whether analytics has committed every market entry up to the run's last one on each
    /// partition: its group has been delivered past it and holds nothing pending at or
    /// before it.
    async fn analytics_past(
        &self,
        conn: &mut Connection,
        last_ours: &HashMap<usize, StreamId>,
        own: &mut OwnCommands,
    ) -> anyhow::Result<bool> {
        let mut cmds = Vec::new();
        let mut checked = Vec::new();
        for (index, (ms, seq)) in last_ours {
            let stream = &self.streams[*index];
            cmds.push(GroupInfo::command(stream));
            cmds.push(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(topology::ANALYTICS_GROUP)
                    .arg("-")
                    .arg(format!("{ms}-{seq}"))
                    .arg(1)
                    .clone(),
            );
            checked.push((*ms, *seq));
        }
        own.add("xinfo|groups", checked.len() as u64);
        own.add("xpending", checked.len() as u64);
        let replies: Vec<Value> = query_each(&*conn, cmds)
            .await
            .into_iter()
            .collect::<redis::RedisResult<_>>()?;
        for (pair, last) in replies.chunks(2).zip(checked) {
            let delivered = GroupInfo::find(pair[0].clone(), topology::ANALYTICS_GROUP)
                .and_then(|g| parse_id(&g.last_delivered_id));
            let pending = matches!(&pair[1], Value::Array(items) if !items.is_empty());
            if delivered.is_none_or(|d| d < last) || pending {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Cancels the run's orders that may still rest: those whose last report leaves a
    /// quantity and, once every event was published, those with no report at all (a
    /// cancel of an order the engine does not hold is only rejected). Waits for their
    /// answers; returns how many it cancelled and how many were not answered.
    async fn cancel_orders(
        &self,
        conn: &mut Connection,
        progress: &mut Progress,
        orders: &Orders,
    ) -> anyhow::Result<(usize, usize)> {
        let mut targets: BTreeMap<String, String> = progress
            .tally
            .resting
            .iter()
            .map(|(id, symbol)| (id.clone(), symbol.clone()))
            .collect();
        if progress.published_all {
            for id in progress.tally.undecided(&orders.ids) {
                targets.insert(id.clone(), orders.symbols[id].clone());
            }
        }
        if targets.is_empty() {
            return Ok((0, 0));
        }
        progress.awaiting_cancel = targets.keys().cloned().collect();
        let cancels: Vec<v1::Event> = targets
            .into_iter()
            .map(|(client_order_id, symbol)| v1::Event {
                kind: Some(v1::event::Kind::Cancel(v1::CancelOrder {
                    symbol,
                    client_order_id,
                })),
            })
            .collect();
        let count = cancels.len();
        publish(self.ingest.clone(), cancels, 0).await?;
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        while !progress.awaiting_cancel.is_empty() && Instant::now() < deadline {
            self.read(conn, progress, Some(Duration::from_millis(20)))
                .await?;
        }
        Ok((count, progress.awaiting_cancel.len()))
    }

    /// Creates the run's group on every market stream, at the end of each, before the
    /// first order (one command per stream: a cluster's partitions are slots of their own);
    /// if one fails, removes those made.
    async fn create_groups(&self, conn: &mut Connection) -> anyhow::Result<()> {
        let created = self.on_every_stream(conn, "CREATE").await;
        if let Err(e) = created {
            let _ = self.destroy_groups(conn).await;
            return Err(e).with_context(|| format!("creating group {}", self.group));
        }
        Ok(())
    }

    async fn destroy_groups(&self, conn: &mut Connection) -> anyhow::Result<()> {
        self.on_every_stream(conn, "DESTROY")
            .await
            .with_context(|| format!("removing group {} (XGROUP DESTROY it by hand)", self.group))
    }

    /// `XGROUP <subcommand>` of the run's group on every market stream; the first error.
    async fn on_every_stream(
        &self,
        conn: &mut Connection,
        subcommand: &str,
    ) -> redis::RedisResult<()> {
        let cmds = self
            .streams
            .iter()
            .map(|stream| {
                let mut cmd = redis::cmd("XGROUP");
                cmd.arg(subcommand).arg(stream).arg(&self.group);
                if subcommand == "CREATE" {
                    cmd.arg("$");
                }
                cmd
            })
            .collect();
        for reply in query_each(&*conn, cmds).await {
            reply?;
        }
        Ok(())
    }
}

/// Whether `report` leaves nothing of its order in the book.
fn ends_the_order(report: &v1::ExecutionReport) -> bool {
    matches!(
        v1::ExecStatus::try_from(report.status),
        Ok(v1::ExecStatus::Filled | v1::ExecStatus::Cancelled | v1::ExecStatus::Rejected)
    )
}

/// Publishes through ingest's API; returns how many events it accepted.
async fn publish(ingest: Ingest, events: Vec<v1::Event>, rate: u64) -> anyhow::Result<u64> {
    match ingest {
        Ingest::Http(url) => publish_http(&url, events, rate).await,
        Ingest::Grpc(url) => publish_grpc(&url, events, rate).await,
    }
}

/// Checks that analytics reads the market stream of every partition `keys` names, and that
/// the pipeline has no more partitions than that. Returns the bench groups found on them
/// (`stream group`), which earlier runs left behind.
async fn check_partitions(conn: &mut Connection, keys: &KeySpace) -> anyhow::Result<Vec<String>> {
    let partitions = keys.partitions();
    // One past the last: it must not be read, or the pipeline has more partitions.
    let cmds = (0..=partitions)
        .map(|p| GroupInfo::command(&keys.stream(topology::MARKET, p)))
        .collect();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for reply in query_each(&*conn, cmds).await {
        groups.push(match reply {
            Ok(reply) => GroupInfo::parse(reply)
                .into_iter()
                .map(|g| g.name)
                .collect(),
            // A stream nobody wrote to: no group reads it.
            Err(e) if e.to_string().contains("no such key") => Vec::new(),
            Err(e) => return Err(e).context("asking which groups read the market streams"),
        });
    }
    let read_by_analytics = |p: u32| {
        groups[p as usize]
            .iter()
            .any(|g| g == topology::ANALYTICS_GROUP)
    };
    let namespace = keys.namespace();
    if let Some(p) = (0..partitions).find(|p| !read_by_analytics(*p)) {
        bail!(
            "analytics does not read {}: is a pipeline running with TICKFLOW_NAMESPACE={namespace} \
             and TICKFLOW_PARTITIONS={partitions} on this REDIS_URL?",
            keys.stream(topology::MARKET, p)
        );
    }
    if read_by_analytics(partitions) {
        bail!(
            "the pipeline in {namespace:?} has more than TICKFLOW_PARTITIONS={partitions} partitions \
             (analytics reads {}): set TICKFLOW_PARTITIONS to the pipeline's",
            keys.stream(topology::MARKET, partitions)
        );
    }
    Ok((0..partitions)
        .flat_map(|p| {
            let stream = keys.stream(topology::MARKET, p);
            groups[p as usize]
                .iter()
                .filter(|g| g.starts_with(GROUP_PREFIX))
                .map(move |g| format!("{stream} {g}"))
        })
        .collect())
}

/// The first `count` instruments of the pipeline's reference data, by symbol, with prices
/// around the engine's reference price (its last trade or tick: what its price band is
/// centred on).
async fn markets(
    conn: &mut Connection,
    redis: &streams_core::Redis,
    keys: &KeySpace,
    count: usize,
) -> anyhow::Result<Vec<Market>> {
    let instruments: BTreeMap<String, Instrument> = transform::refdata::read_stored(conn, keys)
        .await?
        .into_iter()
        .collect();
    if instruments.is_empty() {
        bail!(
            "no instruments in {}: load the pipeline's reference data first \
             (transform load-refdata FILE)",
            keys.global("instruments")
        );
    }
    let mut books = HashMap::new();
    let mut markets = Vec::new();
    for instrument in instruments.into_values().take(count) {
        let partition = keys.partition_for(instrument.symbol.as_bytes());
        let books = match books.entry(partition) {
            std::collections::hash_map::Entry::Occupied(loaded) => loaded.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(
                engine::stage::load_books(redis, keys, partition)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the engine's books: {e}"))?,
            ),
        };
        let last_price = books
            .get(&instrument.symbol)
            .and_then(|book| book.last_price());
        markets.push(market(&instrument, last_price)?);
    }
    Ok(markets)
}

/// The prices and lots the flow may use on `instrument`, around `last_price_e6` (else the
/// middle of its static limits, else 100): within its static limits, and within half its
/// price band of that reference price, so that an order stays in the band wherever the
/// run's own trades move its centre.
fn market(instrument: &Instrument, last_price_e6: Option<i64>) -> anyhow::Result<Market> {
    let symbol = &instrument.symbol;
    instrument
        .validate()
        .map_err(|e| anyhow::anyhow!("the pipeline's reference data: {e}"))?;
    let tick_e6 = instrument.tick_e6();
    let to_ticks = |price: f64| price * 1e6 / tick_e6 as f64;
    // Every price in ticks stays within [1, MAX_PRICE_E6 / tick_e6]: no overflow below.
    let ceiling = MAX_PRICE_E6 / tick_e6;
    let min_ticks = instrument
        .min_price
        .map_or(1.0, |p| (to_ticks(p) - 1e-9).ceil())
        .clamp(1.0, ceiling as f64) as i64;
    let max_ticks = instrument
        .max_price
        .map_or(ceiling as f64, |p| (to_ticks(p) + 1e-9).floor())
        .clamp(0.0, ceiling as f64) as i64;
    if min_ticks > max_ticks {
        bail!("{symbol}: no price on its tick between its min_price and max_price");
    }
    let reference = match (last_price_e6, instrument.min_price, instrument.max_price) {
        (Some(last), ..) => (last as f64 / tick_e6 as f64).round(),
        (None, Some(_), Some(_)) => (min_ticks + (max_ticks - min_ticks) / 2) as f64,
        _ => to_ticks(100.0).round(),
    }
    .clamp(min_ticks as f64, max_ticks as f64) as i64;
    let spread = if instrument.band_bps > 0 {
        let band = i128::from(reference) * i128::from(instrument.band_bps) / 10_000;
        // Strictly under half: the band's width is computed from its (moving) centre.
        PRICE_SPREAD_TICKS.min(((band - 1).max(0) / 2) as i64)
    } else {
        PRICE_SPREAD_TICKS
    };
    let lot = instrument.lot_size;
    let max_lots = instrument
        .max_qty
        .map_or(MAX_LOTS, |max| (max / lot).min(MAX_LOTS));
    if max_lots == 0 {
        bail!("{symbol}: its max_qty is below one lot");
    }
    Ok(Market {
        symbol: symbol.clone(),
        tick_e6,
        reference,
        low: (reference - spread).max(min_ticks),
        high: (reference + spread).min(max_ticks),
        lot,
        max_lots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instrument(tick_size: f64, band_bps: u32, min: Option<f64>, max: Option<f64>) -> Instrument {
        Instrument {
            symbol: "X".into(),
            tick_size,
            lot_size: 10,
            band_bps,
            min_price: min,
            max_price: max,
            max_qty: Some(25),
            name: String::new(),
            currency: String::new(),
        }
    }

    #[test]
    fn prices_stay_around_the_last_trade_within_band_and_limits() {
        // Last trade 50.00, tick 0.05: reference 1000 ticks, ±5 ticks.
        let m = market(&instrument(0.05, 0, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.reference, m.low, m.high), (1_000, 995, 1_005));
        assert_eq!((m.lot, m.max_lots), (10, 2), "max_qty 25 is two lots of 10");
        // A band of 50 bps around 1000 ticks is 5 ticks wide each side: under half of it.
        let m = market(&instrument(0.05, 50, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.low, m.high), (998, 1_002));
        // A band narrower than one tick: the reference price only, no panic.
        let m = market(&instrument(0.05, 1, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.low, m.high), (1_000, 1_000));
        // The static limits cut the range, and hold a last trade outside them.
        let m = market(
            &instrument(0.05, 0, Some(49.9), Some(50.1)),
            Some(70_000_000),
        )
        .unwrap();
        assert_eq!((m.reference, m.low, m.high), (1_002, 998, 1_002));
        // No trade yet: the middle of the limits, else 100.
        let m = market(&instrument(0.05, 0, Some(10.0), Some(20.0)), None).unwrap();
        assert_eq!(m.reference, 300);
        let m = market(&instrument(0.05, 0, None, None), None).unwrap();
        assert_eq!(m.reference, 2_000);
    }

    #[test]
    fn an_instrument_that_cannot_be_traded_is_a_clear_error() {
        let mut no_lot = instrument(0.05, 0, None, None);
        no_lot.max_qty = Some(5);
        assert!(
            market(&no_lot, None)
                .unwrap_err()
                .to_string()
                .contains("max_qty")
        );
        let no_price = instrument(1.0, 0, Some(10.2), Some(10.8));
        assert!(
            market(&no_price, None)
                .unwrap_err()
                .to_string()
                .contains("min_price")
        );
        let no_tick = instrument(0.0, 0, None, None);
        assert!(
            market(&no_tick, None)
                .unwrap_err()
                .to_string()
                .contains("tick_size")
        );
    }

    #[test]
    fn extreme_prices_neither_overflow_nor_leave_the_limits() {
        // The middle of [0.01, 1e14] and a last trade near i64::MAX, on the smallest tick.
        for (inst, last) in [
            (instrument(0.01, 0, Some(0.01), Some(1e14)), None),
            (instrument(0.000_001, 5, None, None), Some(i64::MAX - 1)),
            (instrument(0.000_001, 10_000, None, None), Some(1)),
        ] {
            let m = market(&inst, last).unwrap();
            assert!(
                1 <= m.low && m.low <= m.reference && m.reference <= m.high,
                "{m:?}"
            );
            let events = crate::bench::flow::flow(std::slice::from_ref(&m), 100, 1, 1.0, "x");
            for event in events {
                if let Some(v1::event::Kind::NewOrder(o)) = event.kind {
                    assert!(o.price > 0.0 && o.price <= 1e9, "{o:?}");
                }
            }
        }
    }

    #[test]
    fn stream_ids_order_as_redis_orders_them() {
        assert!(parse_id("1700000000000-10") > parse_id("1700000000000-9"));
        assert!(parse_id("1700000000001-0") > parse_id("1700000000000-99"));
        assert_eq!(parse_id("garbage"), None);
    }
}
