//! `tickflow bench`: the end-to-end benchmark.
//!
//! Starts a redis-server (unless `REDIS_URL` is set) and the four services as separate
//! processes (`tickflow serve …`), publishes N orders and ticks — through gRPC streaming by
//! default, HTTP or the external stream on request — at a fixed rate or as fast as they are
//! accepted, waits until every stage has handled everything, and reports: events/s end to
//! end, entries per stage, end-to-end latency percentiles (origin → analytics, from
//! analytics' histogram), CPU seconds of each service and of Redis, peak resident memory of
//! each service, and whether every order got exactly one accept/reject report.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
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

/// How events enter the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Grpc,
    Http,
    Stream,
}

#[derive(Debug, Clone)]
pub(crate) struct BenchOptions {
    events: u64,
    rate: u64,
    via: Via,
    symbols: usize,
    partitions: u32,
    batch: usize,
    trace_ratio: Option<f64>,
    json: bool,
    seed: u64,
}

pub(crate) fn parse(args: &[String]) -> anyhow::Result<BenchOptions> {
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
    };
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
            other => bail!("unknown option {other}; see `tickflow help`"),
        }
    }
    if o.events == 0 || o.symbols == 0 || o.partitions == 0 || o.batch == 0 {
        bail!("--events, --symbols, --partitions and --batch must be > 0");
    }
    Ok(o)
}

/// One service process.
struct Service {
    name: &'static str,
    child: Child,
    http: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The benchmark's instruments: `B00`…, tick 0.01, lot 1, no band.
fn instruments(count: usize) -> Vec<(String, f64)> {
    (0..count)
        .map(|i| (format!("B{i:02}"), 100.0 + i as f64 * 10.0))
        .collect()
}

/// A deterministic flow: limit orders around each symbol's mid, half of them crossing,
/// and one tick in ten.
fn flow(options: &BenchOptions) -> Vec<v1::Event> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let symbols = instruments(options.symbols);
    (0..options.events)
        .map(|i| {
            let (symbol, mid) = &symbols[i as usize % symbols.len()];
            let kind = if i % 10 == 9 {
                Kind::Tick(v1::MarketTick {
                    symbol: symbol.clone(),
                    price: *mid,
                    qty: 1.0,
                })
            } else {
                let buy = rng.random_bool(0.5);
                let offset = rng.random_range(-5..=5) as f64 * 0.01;
                Kind::NewOrder(v1::NewOrder {
                    symbol: symbol.clone(),
                    side: if buy { v1::Side::Buy } else { v1::Side::Sell } as i32,
                    r#type: v1::OrderType::Limit as i32,
                    price: ((mid + offset) * 100.0).round() / 100.0,
                    qty: rng.random_range(1..10) as f64,
                    client_order_id: format!("o{i}"),
                })
            };
            v1::Event { kind: Some(kind) }
        })
        .collect()
}

pub(crate) async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("tickflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let server = match std::env::var("REDIS_URL") {
        Ok(_) => None,
        Err(_) => Some(RedisServer::start()),
    };
    let redis_url = std::env::var("REDIS_URL")
        .unwrap_or_else(|_| server.as_ref().expect("started above").url());
    let namespace = streams_core::testing::unique_namespace("bench");
    let keys = KeySpace::new(namespace.as_str(), options.partitions);
    let mut conn = streams_core::testing::connect(&redis_url).await?;

    // Reference data.
    let refdata: Vec<Json> = instruments(options.symbols)
        .iter()
        .map(|(s, _)| json!({"symbol": s, "tick_size": 0.01, "lot_size": 1, "band_bps": 0}))
        .collect();
    let refdata_path = work.join("instruments.json");
    std::fs::write(&refdata_path, serde_json::to_vec(&refdata)?)?;
    let base_env: Vec<(String, String)> = vec![
        ("REDIS_URL".into(), redis_url.clone()),
        ("TICKFLOW_NAMESPACE".into(), namespace.clone()),
        ("TICKFLOW_PARTITIONS".into(), options.partitions.to_string()),
        ("TICKFLOW_BATCH_SIZE".into(), options.batch.to_string()),
        ("TICKFLOW_BLOCK_MS".into(), "1000".into()),
        ("TICKFLOW_TRIM_INTERVAL_MS".into(), "0".into()),
        ("INGEST_MAX_BACKLOG".into(), "100000000".into()),
        (
            "INGEST_STREAMS".into(),
            format!("{namespace}:ingest_stream"),
        ),
        (
            "RUST_LOG".into(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    transform::load_refdata_command(
        streams_core::Env::from_pairs(base_env.clone()),
        refdata_path.to_str().context("temp path is not UTF-8")?,
    )
    .await?;

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

    // The four services.
    let exe = std::env::current_exe()?;
    let grpc_port = streams_core::testing::free_port();
    let mut services = Vec::new();
    for name in ["ingest", "transform", "engine", "analytics"] {
        let http = streams_core::testing::free_port();
        let log = std::fs::File::create(work.join(format!("{name}.log")))?;
        let child = Command::new(&exe)
            .args(["serve", name])
            .envs(base_env.iter().cloned())
            .envs(otel_env.iter().cloned())
            .env("HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("CONSUMER_NAME", format!("{name}-1"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        services.push(Service { name, child, http });
    }
    let http = reqwest::Client::builder().no_proxy().build()?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    for service in &mut services {
        loop {
            if let Some(status) = service.child.try_wait()? {
                bail!(
                    "{} exited with {status}; see {}",
                    service.name,
                    work.display()
                );
            }
            let url = format!("http://127.0.0.1:{}/readyz", service.http);
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if Instant::now() > ready_by {
                bail!(
                    "{} not ready after 60 s; see {}",
                    service.name,
                    work.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let redis_cpu_before = redis_cpu(&mut conn).await?;
    let events = flow(&options);
    let orders: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::NewOrder(o)) => Some(o.client_order_id.clone()),
            _ => None,
        })
        .collect();

    // Publish, then wait until every stage has handled everything.
    let started = Instant::now();
    let accepted = match options.via {
        Via::Grpc => publish_grpc(grpc_port, events, options.rate).await?,
        Via::Http => publish_http(&http, services[0].http, events, options.rate).await?,
        Via::Stream => publish_stream(&mut conn, &namespace, events, options.rate).await?,
    };
    let published = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60 + options.events / 2_000);
    loop {
        if drained(&mut conn, &keys, accepted).await? {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the pipeline did not drain in time; see logs in {}",
                work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let redis_cpu = redis_cpu(&mut conn).await? - redis_cpu_before;

    // Measurements.
    let latency: Json = http
        .get(format!("http://127.0.0.1:{}/v1/latency", services[3].http))
        .send()
        .await?
        .json()
        .await?;
    let mut per_service = serde_json::Map::new();
    for service in &services {
        let (cpu, peak_rss_kib) = process_usage(service.child.id());
        per_service.insert(
            service.name.into(),
            json!({ "cpu_seconds": cpu, "peak_rss_mib": peak_rss_kib as f64 / 1024.0 }),
        );
    }
    let mut stage_entries = serde_json::Map::new();
    for stream in [topology::INBOUND, topology::VALIDATED, topology::MARKET] {
        stage_entries.insert(
            stream.into(),
            json!(total_length(&mut conn, &keys, stream).await?),
        );
    }
    let (lost, duplicated) = exactly_once(&mut conn, &keys, &orders).await?;

    // Stop the services gracefully (spans are flushed), then Redis.
    for service in &services {
        let _ = Command::new("kill")
            .args(["-TERM", &service.child.id().to_string()])
            .status();
    }
    for service in &mut services {
        let _ = service.child.wait();
    }
    drop(services);
    let _ = std::fs::remove_dir_all(&work);
    if server.is_none() {
        // A Redis we were given: leave it as we found it.
        delete_namespace(&mut conn, &namespace).await?;
    }

    let result = json!({
        "events": options.events,
        "accepted": accepted,
        "via": format!("{:?}", options.via).to_lowercase(),
        "rate": if options.rate == 0 { Json::from("max") } else { Json::from(options.rate) },
        "partitions": options.partitions,
        "batch": options.batch,
        "trace_ratio": options.trace_ratio,
        "spans_exported": spans.load(Ordering::Relaxed),
        "publish_seconds": published.as_secs_f64(),
        "seconds": seconds,
        "events_per_sec": accepted as f64 / seconds,
        "stage_entries": stage_entries,
        "latency_us": {
            "count": latency["count"], "p50": latency["p50_us"], "p90": latency["p90_us"],
            "p99": latency["p99_us"], "p999": latency["p999_us"], "max": latency["max_us"],
        },
        "services": per_service,
        "redis_cpu_seconds": redis_cpu,
        "lost": lost,
        "duplicated": duplicated,
    });
    if options.json {
        println!("{result}");
    } else {
        print_report(&result);
    }
    if lost > 0 || duplicated > 0 {
        bail!("{lost} orders lost and {duplicated} duplicated");
    }
    Ok(())
}

fn print_report(r: &Json) {
    println!(
        "tickflow bench: {} events via {} at rate {} ({} partitions, batch {}, tracing {})",
        r["events"],
        r["via"].as_str().unwrap_or_default(),
        r["rate"],
        r["partitions"],
        r["batch"],
        r["trace_ratio"]
            .as_f64()
            .map_or("off".into(), |t| format!("{:.0} %", t * 100.0)),
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
    println!("  stream entries  {}", r["stage_entries"]);
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
        "  exactly once    lost {} duplicated {}",
        r["lost"], r["duplicated"]
    );
}

/// Sends events through one gRPC `PublishStream`, paced at `rate` per second (0 = max).
async fn publish_grpc(port: u16, events: Vec<v1::Event>, rate: u64) -> anyhow::Result<u64> {
    let mut client = IngestServiceClient::connect(format!("http://127.0.0.1:{port}")).await?;
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

/// POSTs events to `/v1/orders` and `/v1/ticks` in batches of 500.
async fn publish_http(
    http: &reqwest::Client,
    port: u16,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    let accepted = Arc::new(AtomicU64::new(0));
    paced(events, rate, 500, |chunk| {
        let http = http.clone();
        let accepted = accepted.clone();
        async move {
            let (mut orders, mut ticks) = (Vec::new(), Vec::new());
            for event in chunk {
                match event.kind {
                    Some(Kind::NewOrder(o)) => orders.push(json!({
                        "symbol": o.symbol, "side": if o.side == v1::Side::Buy as i32 { "buy" } else { "sell" },
                        "price": o.price, "qty": o.qty, "client_order_id": o.client_order_id,
                    })),
                    Some(Kind::Tick(t)) => ticks.push(json!({"symbol": t.symbol, "price": t.price, "qty": t.qty})),
                    _ => {}
                }
            }
            for (path, body) in [("orders", orders), ("ticks", ticks)] {
                if body.is_empty() {
                    continue;
                }
                let reply: Json = http
                    .post(format!("http://127.0.0.1:{port}/v1/{path}"))
                    .json(&body)
                    .send()
                    .await?
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
            let Ok(Value::Array(groups)) = reply else {
                continue;
            };
            for g in groups {
                let fields = flat_map(g);
                if fields.get("name").map(String::as_str) != Some(group) {
                    continue;
                }
                let lag: u64 = fields.get("lag").and_then(|v| v.parse().ok()).unwrap_or(1);
                let pending: u64 = fields
                    .get("pending")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                if lag + pending > 0 {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

fn flat_map(value: Value) -> HashMap<String, String> {
    let items = match value {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    items
        .chunks(2)
        .filter_map(|kv| {
            let key: String = redis::from_redis_value(kv[0].clone()).ok()?;
            let value: String = match &kv[1] {
                Value::Int(i) => i.to_string(),
                other => redis::from_redis_value(other.clone()).ok()?,
            };
            Some((key, value))
        })
        .collect()
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

/// Counts, per order, the ACCEPTED or REJECTED reports on the market stream: an order with
/// none was lost, one with more than one was doubled.
async fn exactly_once(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
    orders: &[String],
) -> anyhow::Result<(u64, u64)> {
    let mut seen: HashMap<String, u32> = HashMap::with_capacity(orders.len());
    for p in keys.all_partitions() {
        let key = keys.stream(topology::MARKET, p);
        let mut start = "-".to_owned();
        loop {
            let reply: Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(10_000)
                .query_async(conn)
                .await?;
            let Value::Array(entries) = reply else { break };
            let fetched = entries.len();
            for entry in entries {
                let Value::Array(mut parts) = entry else {
                    continue;
                };
                let fields = parts.pop().unwrap_or(Value::Nil);
                let id: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))?;
                start = format!("({id}");
                let mut flat_fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                if let Value::Array(flat) = fields {
                    for kv in flat.chunks(2) {
                        flat_fields.push((
                            redis::from_redis_value(kv[0].clone())?,
                            redis::from_redis_value(kv[1].clone())?,
                        ));
                    }
                }
                let envelope = streams_core::Envelope::from_fields(
                    flat_fields
                        .iter()
                        .map(|(n, v)| (n.as_slice(), v.as_slice())),
                )?;
                let (kind, payload) = (envelope.event_type.as_bytes(), &envelope.payload[..]);
                // The engine's reports come in `order.events`; transform's rejections alone.
                let reports = if kind == event_type::ORDER_EVENTS.as_bytes() {
                    v1::OrderEvents::decode(payload)?
                        .reports()
                        .cloned()
                        .collect()
                } else if kind == event_type::EXECUTION.as_bytes() {
                    vec![v1::ExecutionReport::decode(payload)?]
                } else {
                    Vec::new()
                };
                for report in reports {
                    if report.status == v1::ExecStatus::Accepted as i32
                        || report.status == v1::ExecStatus::Rejected as i32
                    {
                        *seen.entry(report.client_order_id).or_default() += 1;
                    }
                }
            }
            if fetched < 10_000 {
                break;
            }
        }
    }
    let lost = orders
        .iter()
        .filter(|o| !seen.contains_key(o.as_str()))
        .count() as u64;
    let duplicated = seen.values().filter(|c| **c > 1).count() as u64;
    Ok((lost, duplicated))
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

async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
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

/// CPU seconds (user + system) and peak resident set (KiB) of a process, from /proc.
fn process_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat: 11 and 12 after the name.
    let cpu = (ticks(11) + ticks(12)) / clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, peak)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
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
