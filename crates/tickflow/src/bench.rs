//! `tickflow bench`: the end-to-end benchmark.
//!
//! By default it runs on a pipeline of its own: a redis-server (unless `REDIS_URL` is set)
//! and the four services as separate processes ([`LocalPipeline`]). It publishes N orders
//! and ticks — through gRPC streaming by default, HTTP or the external stream on request —
//! at a fixed rate or as fast as they are accepted, waits until every stage has handled
//! everything, and reports: events/s end to end, entries per stage, end-to-end latency
//! percentiles (origin → analytics, from analytics' histogram), CPU seconds of each service
//! and of Redis, peak resident memory of each service, and whether every order got exactly
//! one accept/reject report.
//!
//! With `--attach` it starts nothing and measures a pipeline that is already running
//! ([`crate::attach`]).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use redis::Value;
use serde_json::{Value as Json, json};
use streams_core::{KeySpace, testing::RedisServer};
use tickflow_proto::{
    event_type, topology,
    v1::{self, event::Kind, ingest_service_client::IngestServiceClient},
};

use crate::local::LocalPipeline;

/// The usage of `tickflow bench`, part of `tickflow help`.
pub const USAGE: &str = "\
  tickflow bench [--events 200000] [--rate 0] [--via grpc|http|stream] [--symbols 16]
                 [--partitions 16] [--batch 256] [--trace-ratio R] [--seed 42] [--json]
  tickflow bench --attach [--grpc URL | --via http --http URL] [--events 200000] [--rate 0]
                 [--symbols 16] [--seed 42] [--json]
      (REDIS_URL, TICKFLOW_NAMESPACE and TICKFLOW_PARTITIONS name the running pipeline)";

/// How events enter the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// `tickflow bench`'s options.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events to publish.
    pub events: u64,
    /// Events per second (0: as fast as they are accepted).
    pub rate: u64,
    /// How they are published.
    pub via: Via,
    /// How many instruments they spread over.
    pub symbols: usize,
    /// Partitions of the pipeline the bench starts.
    pub partitions: u32,
    /// Its services' batch size.
    pub batch: usize,
    /// Its services' trace sampling ratio (`None`: no tracing).
    pub trace_ratio: Option<f64>,
    /// One JSON object instead of the table.
    pub json: bool,
    /// The flow's random seed.
    pub seed: u64,
    /// Measure a running pipeline instead of starting one.
    pub attach: bool,
    /// With `--attach`: ingest's gRPC URL.
    pub grpc: Option<String>,
    /// With `--attach --via http`: ingest's HTTP base URL.
    pub http: Option<String>,
}

/// Parses `tickflow bench`'s arguments. A flag that the chosen mode would ignore is an
/// error, so that nobody reads a figure as measured with a setting it did not have.
pub fn parse(args: &[String]) -> anyhow::Result<BenchOptions> {
    let mut o = BenchOptions {
        events: 200_000,
        rate: 0,
        via: Via::Grpc,
        symbols: 16,
        partitions: 16,
        batch: 256,
        trace_ratio: None,
        json: false,
        seed: 42,
        attach: false,
        grpc: None,
        http: None,
    };
    let mut given = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => o.events = value()?.parse().context("--events")?,
            "--rate" => o.rate = value()?.parse().context("--rate (events/s, 0 = max)")?,
            "--via" => {
                o.via = match value()?.as_str() {
                    "grpc" => Via::Grpc,
                    "http" => Via::Http,
                    "stream" => Via::Stream,
                    other => bail!("--via grpc|http|stream, not {other}"),
                }
            }
            "--symbols" => o.symbols = value()?.parse().context("--symbols")?,
            "--partitions" => o.partitions = value()?.parse().context("--partitions")?,
            "--batch" => o.batch = value()?.parse().context("--batch")?,
            "--trace-ratio" => {
                o.trace_ratio = Some(value()?.parse().context("--trace-ratio 0..1")?)
            }
            "--seed" => o.seed = value()?.parse().context("--seed")?,
            "--json" => o.json = true,
            "--attach" => o.attach = true,
            "--grpc" => o.grpc = Some(value()?.clone()),
            "--http" => o.http = Some(value()?.clone()),
            other => bail!("unknown option {other}; see `tickflow help`"),
        }
        given.push(flag.as_str());
    }
    if o.events == 0 || o.symbols == 0 || o.partitions == 0 || o.batch == 0 {
        bail!("--events, --symbols, --partitions and --batch must be > 0");
    }
    if o.attach {
        for flag in ["--partitions", "--batch", "--trace-ratio"] {
            if given.contains(&flag) {
                bail!(
                    "{flag} sets up the pipeline the bench starts; with --attach the running \
                     pipeline has its own settings (TICKFLOW_PARTITIONS names its partitions)"
                );
            }
        }
        match o.via {
            Via::Stream => bail!("--attach publishes through ingest's API: --via grpc or http"),
            Via::Grpc if o.http.is_some() => bail!("--http goes with --via http"),
            Via::Http if o.grpc.is_some() => bail!("--grpc goes with --via grpc"),
            _ => {}
        }
    } else if o.grpc.is_some() || o.http.is_some() {
        bail!("--grpc and --http name a running pipeline's ingest: they go with --attach");
    }
    Ok(o)
}

/// Runs the benchmark the options ask for.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    if options.attach {
        crate::attach::run(options).await
    } else {
        run_local(options).await
    }
}

/// One instrument the flow trades, with the prices it may use.
#[derive(Debug, Clone)]
pub(crate) struct Market {
    pub(crate) symbol: String,
    /// Price increment, in millionths.
    pub(crate) tick_e6: i64,
    /// The reference price, in ticks: ticks are printed there.
    pub(crate) reference: i64,
    /// The lowest and highest limit prices, in ticks (`low <= reference <= high`).
    pub(crate) low: i64,
    pub(crate) high: i64,
    /// Quantity increment, whole units.
    pub(crate) lot: u64,
    /// Most lots per order (≥ 1).
    pub(crate) max_lots: u64,
}

impl Market {
    fn price(&self, ticks: i64) -> f64 {
        (ticks * self.tick_e6) as f64 / 1e6
    }
}

/// How far from the reference price the flow's limit orders go, in ticks.
pub(crate) const PRICE_SPREAD_TICKS: i64 = 5;
/// Most lots per order.
pub(crate) const MAX_LOTS: u64 = 9;

/// The benchmark's own instruments: `B00`…, tick 0.01, lot 1, no band.
fn bench_instruments(count: usize) -> Vec<transform::refdata::Instrument> {
    (0..count)
        .map(|i| transform::refdata::Instrument {
            symbol: format!("B{i:02}"),
            tick_size: 0.01,
            lot_size: 1,
            band_bps: 0,
            min_price: None,
            max_price: None,
            max_qty: None,
            name: String::new(),
            currency: String::new(),
        })
        .collect()
}

/// The markets of [`bench_instruments`]: mids at 100, 110, 120, …
fn bench_markets(count: usize) -> Vec<Market> {
    (0..count)
        .map(|i| {
            let reference = 10_000 + i as i64 * 1_000;
            Market {
                symbol: format!("B{i:02}"),
                tick_e6: 10_000,
                reference,
                low: reference - PRICE_SPREAD_TICKS,
                high: reference + PRICE_SPREAD_TICKS,
                lot: 1,
                max_lots: MAX_LOTS,
            }
        })
        .collect()
}

/// A deterministic flow over `markets`: limit orders between each market's low and high,
/// about half of them crossing, and one tick in ten at the reference price. Order `i` is
/// `{id_prefix}{i}`.
pub(crate) fn flow(markets: &[Market], events: u64, seed: u64, id_prefix: &str) -> Vec<v1::Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..events)
        .map(|i| {
            let market = &markets[i as usize % markets.len()];
            let kind = if i % 10 == 9 {
                Kind::Tick(v1::MarketTick {
                    symbol: market.symbol.clone(),
                    price: market.price(market.reference),
                    qty: market.lot as f64,
                })
            } else {
                let buy = rng.random_bool(0.5);
                let price = rng.random_range(market.low..=market.high);
                let lots = rng.random_range(1..=market.max_lots);
                Kind::NewOrder(v1::NewOrder {
                    symbol: market.symbol.clone(),
                    side: if buy { v1::Side::Buy } else { v1::Side::Sell } as i32,
                    r#type: v1::OrderType::Limit as i32,
                    price: market.price(price),
                    qty: (lots * market.lot) as f64,
                    client_order_id: format!("{id_prefix}{i}"),
                })
            };
            v1::Event { kind: Some(kind) }
        })
        .collect()
}

/// The client order ids of the orders in `events`.
pub(crate) fn order_ids(events: &[v1::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::NewOrder(o)) => Some(o.client_order_id.clone()),
            _ => None,
        })
        .collect()
}

async fn run_local(options: BenchOptions) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("tickflow-bench-{}", std::process::id()));
    let server = match std::env::var("REDIS_URL") {
        Ok(_) => None,
        Err(_) => Some(RedisServer::start()),
    };
    let redis_url = std::env::var("REDIS_URL")
        .unwrap_or_else(|_| server.as_ref().expect("started above").url());
    let namespace = streams_core::testing::unique_namespace("bench");
    let keys = KeySpace::new(namespace.as_str(), options.partitions);
    let mut conn = streams_core::testing::connect(&redis_url).await?;
    let result = measure_local(&options, &redis_url, &keys, &mut conn, &work).await;
    if server.is_none() {
        // A Redis we were given: leave it as we found it.
        delete_namespace(&mut conn, &namespace).await?;
    }
    let result = result?;
    let _ = std::fs::remove_dir_all(&work);
    print_result(&options, &result);
    let (lost, duplicated) = (result["lost"].as_u64(), result["duplicated"].as_u64());
    if lost != Some(0) || duplicated != Some(0) {
        bail!("{lost:?} orders lost and {duplicated:?} duplicated");
    }
    Ok(())
}

/// Starts the pipeline, publishes, waits for it to drain and measures.
async fn measure_local(
    options: &BenchOptions,
    redis_url: &str,
    keys: &KeySpace,
    conn: &mut redis::aio::MultiplexedConnection,
    work: &std::path::Path,
) -> anyhow::Result<Json> {
    let namespace = keys.namespace();
    let env: Vec<(String, String)> = [
        ("REDIS_URL", redis_url.to_owned()),
        ("TICKFLOW_NAMESPACE", namespace.to_owned()),
        ("TICKFLOW_PARTITIONS", options.partitions.to_string()),
        ("TICKFLOW_BATCH_SIZE", options.batch.to_string()),
        ("TICKFLOW_BLOCK_MS", "1000".into()),
        ("TICKFLOW_TRIM_INTERVAL_MS", "0".into()),
        ("INGEST_MAX_BACKLOG", "100000000".into()),
        ("INGEST_STREAMS", format!("{namespace}:ingest_stream")),
        (
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let redis = streams_core::Redis::new(redis_url, 2)?;
    transform::refdata::store(&redis, keys, &bench_instruments(options.symbols)).await?;

    // Tracing: a local OTLP receiver that counts and discards spans.
    let spans = Arc::new(AtomicU64::new(0));
    let mut otel_env = Vec::new();
    if let Some(ratio) = options.trace_ratio {
        let port = otlp_sink(spans.clone()).await?;
        otel_env = vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                format!("http://127.0.0.1:{port}"),
            ),
            (
                "OTEL_TRACES_SAMPLER".to_owned(),
                "parentbased_traceidratio".to_owned(),
            ),
            ("OTEL_TRACES_SAMPLER_ARG".to_owned(), ratio.to_string()),
        ];
    }
    let env = [env, otel_env].concat();
    let pipeline = LocalPipeline::start(&std::env::current_exe()?, &env, work).await?;

    let redis_cpu_before = redis_cpu(conn).await?;
    let events = flow(
        &bench_markets(options.symbols),
        options.events,
        options.seed,
        "o",
    );
    let orders = order_ids(&events);

    // Publish, then wait until every stage has handled everything.
    let started = Instant::now();
    let accepted = match options.via {
        Via::Grpc => publish_grpc(&pipeline.grpc_url(), events, options.rate).await?,
        Via::Http => publish_http(&pipeline.http_url("ingest"), events, options.rate).await?,
        Via::Stream => publish_stream(conn, namespace, events, options.rate).await?,
    };
    let published = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60 + options.events / 2_000);
    while !drained(conn, keys, accepted).await? {
        if Instant::now() > deadline {
            bail!(
                "the pipeline did not drain in time; see logs in {}",
                work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let redis_cpu = redis_cpu(conn).await? - redis_cpu_before;

    // Measurements.
    let histogram = analytics::aggregate::AnalyticsKeys::new(keys.clone())
        .latency_histogram(conn)
        .await?;
    let mut per_service = serde_json::Map::new();
    for (name, usage) in pipeline.usage() {
        per_service.insert(
            name.into(),
            json!({ "cpu_seconds": usage.cpu_seconds, "peak_rss_mib": usage.peak_rss_mib }),
        );
    }
    let mut stage_entries = serde_json::Map::new();
    for stream in [topology::INBOUND, topology::VALIDATED, topology::MARKET] {
        stage_entries.insert(
            stream.into(),
            json!(total_length(conn, keys, stream).await?),
        );
    }
    let tally = tally_market(conn, keys).await?;

    // Stop the services gracefully (spans are flushed).
    pipeline.stop().await;

    Ok(json!({
        "mode": "local",
        "events": options.events,
        "accepted": accepted,
        "via": options.via.name(),
        "rate": if options.rate == 0 { Json::from("max") } else { Json::from(options.rate) },
        "partitions": options.partitions,
        "batch": options.batch,
        "trace_ratio": options.trace_ratio,
        "spans_exported": spans.load(Ordering::Relaxed),
        "publish_seconds": published.as_secs_f64(),
        "seconds": seconds,
        "events_per_sec": accepted as f64 / seconds,
        "stage_entries": stage_entries,
        "latency_us": latency_json(&histogram),
        "services": per_service,
        "redis_cpu_seconds": redis_cpu,
        "rejected": tally.rejected,
        "first_rejection": tally.first_rejection,
        "lost": tally.lost(&orders),
        "duplicated": tally.duplicated(),
    }))
}

/// The report's `latency_us` object from a histogram (bucket floor in µs → count).
pub(crate) fn latency_json(histogram: &std::collections::BTreeMap<u64, u64>) -> Json {
    let list: Vec<(u64, u64)> = histogram.iter().map(|(b, c)| (*b, *c)).collect();
    let p = analytics::latency::percentiles(&list);
    json!({
        "count": p.count, "p50": p.p50_us, "p90": p.p90_us,
        "p99": p.p99_us, "p999": p.p999_us, "max": p.max_us,
    })
}

/// Prints the report: one JSON object with `--json`, else a table.
pub(crate) fn print_result(options: &BenchOptions, r: &Json) {
    if options.json {
        println!("{r}");
        return;
    }
    let tracing = r["trace_ratio"]
        .as_f64()
        .map_or("off".into(), |t| format!("{:.0} %", t * 100.0));
    let setup = if r["mode"] == "attach" {
        format!(
            "attached to {} ({} partitions), run {}",
            r["target"].as_str().unwrap_or_default(),
            r["partitions"],
            r["run"].as_str().unwrap_or_default()
        )
    } else {
        format!(
            "{} partitions, batch {}, tracing {tracing}",
            r["partitions"], r["batch"]
        )
    };
    println!(
        "tickflow bench: {} events via {} at rate {} ({setup})",
        r["events"],
        r["via"].as_str().unwrap_or_default(),
        r["rate"],
    );
    println!(
        "  end to end      {:.0} events/s ({} events in {:.2} s; published in {:.2} s)",
        r["events_per_sec"].as_f64().unwrap_or_default(),
        r["accepted"],
        r["seconds"].as_f64().unwrap_or_default(),
        r["publish_seconds"].as_f64().unwrap_or_default(),
    );
    let l = &r["latency_us"];
    println!(
        "  latency (µs)    p50 {}  p90 {}  p99 {}  p999 {}  max {}  ({} market entries)",
        l["p50"], l["p90"], l["p99"], l["p999"], l["max"], l["count"]
    );
    if let Some(entries) = r.get("stage_entries") {
        println!("  stream entries  {entries}");
    }
    for (name, s) in r["services"].as_object().into_iter().flatten() {
        println!(
            "  {name:<10}      cpu {:.2} s, peak RSS {:.1} MiB",
            s["cpu_seconds"].as_f64().unwrap_or_default(),
            s["peak_rss_mib"].as_f64().unwrap_or_default()
        );
    }
    println!(
        "  redis           cpu {:.2} s",
        r["redis_cpu_seconds"].as_f64().unwrap_or_default()
    );
    println!(
        "  exactly once    lost {} duplicated {} (rejected {}{})",
        r["lost"],
        r["duplicated"],
        r["rejected"],
        r["first_rejection"]
            .as_str()
            .map_or(String::new(), |first| format!(", the first: {first}"))
    );
    if r["mode"] == "attach" {
        println!(
            "  cleanup         {} resting orders cancelled, {} left resting{}",
            r["resting_cancelled"],
            r["left_resting"],
            if r["timed_out"] == true {
                "; TIMED OUT waiting for the pipeline"
            } else {
                ""
            }
        );
    }
}

/// Events sent per gRPC `PublishStream`: below ingest's default `INGEST_MAX_STREAM_EVENTS`
/// (1,000,000), past which a stream is refused.
const EVENTS_PER_STREAM: usize = 500_000;

/// Sends events through gRPC `PublishStream`s (one per [`EVENTS_PER_STREAM`] events, one
/// after the other), paced at `rate` per second (0 = max).
pub(crate) async fn publish_grpc(
    url: &str,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    let mut client = IngestServiceClient::connect(url.to_owned())
        .await
        .with_context(|| format!("connecting to ingest's gRPC API at {url}"))?;
    let mut accepted = 0;
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let part: Vec<v1::Event> = events.by_ref().take(EVENTS_PER_STREAM).collect();
        accepted += publish_one_stream(&mut client, part, rate).await?;
    }
    Ok(accepted)
}

async fn publish_one_stream(
    client: &mut IngestServiceClient<tonic::transport::Channel>,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    let (tx, rx) = futures::channel::mpsc::channel::<v1::Event>(4096);
    let sender = tokio::spawn(async move {
        let mut tx = tx;
        paced(events, rate, 100, |chunk| {
            let mut tx = tx.clone();
            async move {
                for event in chunk {
                    futures::SinkExt::send(&mut tx, event).await?;
                }
                Ok(())
            }
        })
        .await?;
        futures::SinkExt::close(&mut tx).await?;
        Ok::<_, anyhow::Error>(())
    });
    let reply = client.publish_stream(rx).await?.into_inner();
    sender.await??;
    Ok(u64::from(reply.accepted))
}

/// POSTs events to `/v1/orders`, `/v1/ticks` and `/v1/cancels` under `base` in batches of
/// 500.
pub(crate) async fn publish_http(
    base: &str,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let accepted = Arc::new(AtomicU64::new(0));
    paced(events, rate, 500, |chunk| {
        let http = http.clone();
        let accepted = accepted.clone();
        async move {
            let (mut orders, mut ticks, mut cancels) = (Vec::new(), Vec::new(), Vec::new());
            for event in chunk {
                match event.kind {
                    Some(Kind::NewOrder(o)) => orders.push(json!({
                        "symbol": o.symbol, "side": if o.side == v1::Side::Buy as i32 { "buy" } else { "sell" },
                        "price": o.price, "qty": o.qty, "client_order_id": o.client_order_id,
                    })),
                    Some(Kind::Tick(t)) => ticks.push(json!({"symbol": t.symbol, "price": t.price, "qty": t.qty})),
                    Some(Kind::Cancel(c)) => cancels.push(json!({"symbol": c.symbol, "client_order_id": c.client_order_id})),
                    None => {}
                }
            }
            for (path, body) in [("orders", orders), ("ticks", ticks), ("cancels", cancels)] {
                if body.is_empty() {
                    continue;
                }
                let url = format!("{base}/v1/{path}");
                let reply: Json = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?
                    .error_for_status()?
                    .json()
                    .await?;
                accepted.fetch_add(reply["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    Ok(accepted.load(Ordering::Relaxed))
}

/// XADDs flat fields to the external stream, pipelined in chunks of 1000.
async fn publish_stream(
    conn: &mut redis::aio::MultiplexedConnection,
    namespace: &str,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    let key = format!("{namespace}:ingest_stream");
    let count = events.len() as u64;
    paced(events, rate, 1000, |chunk| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let mut pipe = redis::pipe();
            for event in chunk {
                let cmd = pipe.cmd("XADD").arg(&key).arg("*");
                match event.kind {
                    Some(Kind::NewOrder(o)) => {
                        let side = if o.side == v1::Side::Buy as i32 {
                            "buy"
                        } else {
                            "sell"
                        };
                        cmd.arg("symbol")
                            .arg(o.symbol)
                            .arg("side")
                            .arg(side)
                            .arg("price")
                            .arg(o.price)
                            .arg("qty")
                            .arg(o.qty)
                            .arg("client_order_id")
                            .arg(o.client_order_id);
                    }
                    Some(Kind::Tick(t)) => {
                        cmd.arg("symbol")
                            .arg(t.symbol)
                            .arg("price")
                            .arg(t.price)
                            .arg("qty")
                            .arg(t.qty);
                    }
                    _ => {}
                }
                cmd.ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
            Ok(())
        }
    })
    .await?;
    Ok(count)
}

/// Sends `events` in chunks of `chunk`, at `rate` events/s (0: as fast as `send` goes).
async fn paced<F, Fut>(
    events: Vec<v1::Event>,
    rate: u64,
    chunk: usize,
    mut send: F,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<v1::Event>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let mut sent = 0u64;
    // At a fixed rate, send every millisecond what is due, so pacing stays smooth.
    let chunk = if rate > 0 {
        ((rate / 1000) as usize).clamp(1, chunk)
    } else {
        chunk
    };
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let batch: Vec<v1::Event> = events.by_ref().take(chunk).collect();
        sent += batch.len() as u64;
        send(batch).await?;
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    Ok(())
}

/// Whether every group has read and acknowledged everything, and ingest appended `accepted`.
async fn drained(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
    accepted: u64,
) -> anyhow::Result<bool> {
    if total_length(conn, keys, topology::INBOUND).await? < accepted {
        return Ok(false);
    }
    for (stream, group) in [
        (topology::INBOUND, topology::TRANSFORM_GROUP),
        (topology::VALIDATED, topology::ENGINE_GROUP),
        (topology::MARKET, topology::ANALYTICS_GROUP),
    ] {
        let mut pipe = redis::pipe();
        for p in keys.all_partitions() {
            pipe.cmd("XINFO").arg("GROUPS").arg(keys.stream(stream, p));
        }
        let replies: Vec<redis::RedisResult<Value>> =
            pipe.ignore_errors().query_async(conn).await?;
        for reply in replies {
            let Ok(groups) = reply else { continue };
            for fields in streams_core::xinfo_records(groups) {
                if fields.get("name").map(String::as_str) != Some(group) {
                    continue;
                }
                let count = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
                if count("lag").unwrap_or(1) + count("pending").unwrap_or(1) > 0 {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

async fn total_length(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
    stream: &str,
) -> anyhow::Result<u64> {
    let mut pipe = redis::pipe();
    for p in keys.all_partitions() {
        pipe.cmd("XLEN").arg(keys.stream(stream, p));
    }
    let lengths: Vec<u64> = pipe.query_async(conn).await?;
    Ok(lengths.iter().sum())
}

/// What the market streams said about the benchmark's orders.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// ACCEPTED or REJECTED reports per order: exactly one each when nothing is lost or
    /// doubled.
    decisions: HashMap<String, u32>,
    /// Orders rejected (by transform or the engine).
    pub(crate) rejected: u64,
    /// The reason of the first rejection, so that a run's rejections can be told apart.
    pub(crate) first_rejection: Option<String>,
    /// Orders whose last report leaves a quantity resting in the book, with their symbol.
    pub(crate) resting: HashMap<String, String>,
}

impl Tally {
    /// Counts one execution report.
    pub(crate) fn add(&mut self, report: &v1::ExecutionReport) {
        let status = v1::ExecStatus::try_from(report.status).unwrap_or_default();
        let id = &report.client_order_id;
        match status {
            v1::ExecStatus::Accepted | v1::ExecStatus::Rejected => {
                *self.decisions.entry(id.clone()).or_default() += 1;
                if status == v1::ExecStatus::Rejected {
                    self.rejected += 1;
                    self.first_rejection
                        .get_or_insert_with(|| format!("{id}: {}", report.reason));
                }
            }
            _ => {}
        }
        match status {
            v1::ExecStatus::Accepted | v1::ExecStatus::PartiallyFilled if report.leaves_qty > 0 => {
                self.resting.insert(id.clone(), report.symbol.clone());
            }
            _ => {
                self.resting.remove(id);
            }
        }
    }

    /// Orders of `orders` that got no accept/reject report.
    pub(crate) fn lost(&self, orders: &[String]) -> u64 {
        self.undecided(orders).count() as u64
    }

    /// Orders that got more than one.
    pub(crate) fn duplicated(&self) -> u64 {
        self.decisions.values().filter(|c| **c > 1).count() as u64
    }

    /// The orders of `orders` with no accept/reject report.
    pub(crate) fn undecided<'a>(&self, orders: &'a [String]) -> impl Iterator<Item = &'a String> {
        orders
            .iter()
            .filter(|o| !self.decisions.contains_key(o.as_str()))
    }

    /// Whether every order of `orders` has its accept/reject report (cheap until the
    /// counts match: it is asked every few milliseconds).
    pub(crate) fn decided(&self, orders: &[String]) -> bool {
        self.decisions.len() >= orders.len()
            && orders.iter().all(|o| self.decisions.contains_key(o))
    }
}

/// The execution reports in one market-stream entry: the engine's come in `order.events`,
/// transform's rejections alone.
pub fn reports_in(entry: &streams_core::RawEntry) -> anyhow::Result<Vec<v1::ExecutionReport>> {
    let envelope = streams_core::Envelope::from_fields(
        entry
            .fields
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice())),
    )?;
    let (kind, payload) = (envelope.event_type.as_str(), &envelope.payload[..]);
    Ok(if kind == event_type::ORDER_EVENTS {
        v1::OrderEvents::decode(payload)?
            .reports()
            .cloned()
            .collect()
    } else if kind == event_type::EXECUTION {
        vec![v1::ExecutionReport::decode(payload)?]
    } else {
        Vec::new()
    })
}

/// Reads every market stream from the start and tallies the reports.
async fn tally_market(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
) -> anyhow::Result<Tally> {
    const PAGE: usize = 10_000;
    let mut tally = Tally::default();
    for p in keys.all_partitions() {
        let key = keys.stream(topology::MARKET, p);
        let mut start = "-".to_owned();
        loop {
            let reply: Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(conn)
                .await?;
            let entries = streams_core::parse_entries(reply)?;
            for entry in &entries {
                for report in reports_in(entry)? {
                    tally.add(&report);
                }
            }
            match entries.last() {
                Some(last) if entries.len() == PAGE => start = format!("({}", last.id),
                _ => break,
            }
        }
    }
    Ok(tally)
}

/// Deletes every key of `namespace` (the run's streams, state and reference data).
async fn delete_namespace(
    conn: &mut redis::aio::MultiplexedConnection,
    namespace: &str,
) -> anyhow::Result<()> {
    let pattern = format!("{namespace}:*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Redis's CPU seconds (user + system) so far.
pub(crate) async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

/// A local OTLP/gRPC receiver that counts spans and drops them; returns its port.
async fn otlp_sink(spans: Arc<AtomicU64>) -> anyhow::Result<u16> {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };

    struct Sink(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let count: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(count as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(spans)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_the_chosen_mode_would_ignore_are_refused() {
        for refused in [
            "--attach --partitions 4",
            "--attach --batch 64",
            "--attach --trace-ratio 1",
            "--attach --via stream",
            "--attach --http http://x:8080",
            "--attach --via http --grpc http://x:50051",
            "--grpc http://x:50051",
            "--http http://x:8080",
        ] {
            assert!(parse(&args(refused)).is_err(), "{refused}");
        }
        let attach = parse(&args("--attach --via http --http http://x:8080 --events 5")).unwrap();
        assert!(attach.attach);
        assert_eq!(attach.via, Via::Http);
        assert_eq!(attach.http.as_deref(), Some("http://x:8080"));
        assert!(parse(&args("--partitions 4 --batch 64 --trace-ratio 0.5")).is_ok());
    }

    #[test]
    fn the_flow_stays_within_each_markets_prices_and_lots() {
        let market = Market {
            symbol: "X".into(),
            tick_e6: 50_000,
            reference: 2_000,
            low: 1_998,
            high: 2_001,
            lot: 10,
            max_lots: 3,
        };
        let events = flow(std::slice::from_ref(&market), 1_000, 7, "bench-r-");
        let mut ticks = 0;
        for event in &events {
            match event.kind.as_ref().unwrap() {
                Kind::NewOrder(o) => {
                    let ticks_of_price = (o.price * 1e6 / 50_000.0).round() as i64;
                    assert!((1_998..=2_001).contains(&ticks_of_price), "{o:?}");
                    assert!([10.0, 20.0, 30.0].contains(&o.qty), "{o:?}");
                    assert!(o.client_order_id.starts_with("bench-r-"));
                }
                Kind::Tick(t) => {
                    assert_eq!(t.price, 100.0);
                    ticks += 1;
                }
                Kind::Cancel(_) => panic!("the flow cancels nothing"),
            }
        }
        assert_eq!(ticks, 100);
        assert_eq!(order_ids(&events).len(), 900);
    }
}
