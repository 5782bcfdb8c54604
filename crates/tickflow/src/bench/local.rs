//! `tickflow bench` on a pipeline of its own: a redis-server (unless `REDIS_URL` is set)
//! and the four services as separate processes ([`LocalPipeline`]). Built with the
//! `local-bench` feature only: it starts Redis with streams-core's test harness, which the
//! shipped binary leaves out.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use redis::Value;
use streams_core::{KeySpace, inspect::GroupInfo, testing::RedisServer};
use tickflow_proto::{
    topology,
    v1::{self, event::Kind},
};

use super::{
    FlowOptions, LocalOptions, Via,
    flow::{
        MAX_LOTS, Market, PRICE_SPREAD_TICKS, Tally, flow, order_ids, paced, publish_grpc,
        publish_http, redis_cpu, reports_in,
    },
    report::{Latency, LocalReport, Mode, Rate, Report, ServiceUsage},
};
use crate::local::LocalPipeline;

/// Runs the benchmark on a pipeline of its own, on `redis_url` (else a redis-server it
/// starts), and returns its report.
pub(crate) async fn run(
    flow_options: &FlowOptions,
    options: &LocalOptions,
    redis_url: Option<String>,
) -> anyhow::Result<Report> {
    let work = std::env::temp_dir().join(format!("tickflow-bench-{}", std::process::id()));
    let server = match redis_url {
        Some(_) => None,
        None => Some(RedisServer::start()),
    };
    let redis_url = redis_url.unwrap_or_else(|| server.as_ref().expect("started above").url());
    let namespace = streams_core::testing::unique_namespace("bench");
    let keys = KeySpace::new(namespace.as_str(), options.partitions);
    let mut conn = streams_core::testing::connect(&redis_url).await?;
    let result = measure(flow_options, options, &redis_url, &keys, &mut conn, &work).await;
    if server.is_none() {
        // A Redis we were given: leave it as we found it.
        delete_namespace(&mut conn, &namespace).await?;
    }
    let result = result?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(result)
}
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

/// Starts the pipeline, publishes, waits for it to drain and measures.
async fn measure(
    flow_options: &FlowOptions,
    options: &LocalOptions,
    redis_url: &str,
    keys: &KeySpace,
    conn: &mut redis::aio::MultiplexedConnection,
    work: &std::path::Path,
) -> anyhow::Result<Report> {
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
    transform::refdata::store(&redis, keys, &bench_instruments(flow_options.symbols)).await?;

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
        &bench_markets(flow_options.symbols),
        flow_options.events,
        flow_options.seed,
        "o",
    );
    let orders = order_ids(&events);

    // Publish, then wait until every stage has handled everything.
    let started = Instant::now();
    let accepted = match options.via {
        Via::Grpc => publish_grpc(&pipeline.grpc_url(), events, flow_options.rate).await?,
        Via::Http => publish_http(&pipeline.http_url("ingest"), events, flow_options.rate).await?,
        Via::Stream => publish_stream(conn, namespace, events, flow_options.rate).await?,
    };
    let published = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60 + flow_options.events / 2_000);
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
    let services = pipeline
        .usage()
        .into_iter()
        .map(|(name, usage)| {
            let usage = ServiceUsage {
                cpu_seconds: usage.cpu_seconds,
                peak_rss_mib: usage.peak_rss_mib,
            };
            (name.to_owned(), usage)
        })
        .collect();
    let mut stage_entries = BTreeMap::new();
    for stream in [topology::INBOUND, topology::VALIDATED, topology::MARKET] {
        stage_entries.insert(stream.to_owned(), total_length(conn, keys, stream).await?);
    }
    let tally = tally_market(conn, keys).await?;

    // Stop the services gracefully (spans are flushed).
    pipeline.stop().await;

    Ok(Report {
        events: flow_options.events,
        accepted,
        via: options.via.name(),
        rate: Rate(flow_options.rate),
        partitions: options.partitions,
        publish_seconds: published.as_secs_f64(),
        seconds,
        events_per_sec: accepted as f64 / seconds,
        latency_us: Latency::of(&histogram),
        redis_cpu_seconds: redis_cpu,
        rejected: tally.rejected,
        first_rejection: tally.first_rejection.clone(),
        lost: tally.lost(&orders),
        duplicated: tally.duplicated(),
        mode: Mode::Local(LocalReport {
            batch: options.batch,
            trace_ratio: options.trace_ratio,
            spans_exported: spans.load(Ordering::Relaxed),
            stage_entries,
            services,
        }),
    })
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
            pipe.add_command(GroupInfo::command(&keys.stream(stream, p)));
        }
        let replies: Vec<redis::RedisResult<Value>> =
            pipe.ignore_errors().query_async(conn).await?;
        for reply in replies {
            let Ok(groups) = reply else { continue };
            if let Some(group) = GroupInfo::find(groups, group)
                && (group.lag != Some(0) || group.pending > 0)
            {
                return Ok(false);
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
