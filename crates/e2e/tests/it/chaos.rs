//! Chaos: the four services as processes (two replicas each of transform, engine and
//! analytics) take a deterministic order flow while stage processes are killed with
//! SIGKILL at random moments and restarted, and Redis (AOF, `appendfsync always`) is
//! killed and restarted once. Trimming runs all along.
//!
//! Then conservation is checked, exactly:
//! - every event the client sent was accepted once (the client retries with the same
//!   `idempotency-key` until it is answered) and reached the validated stream once, in the
//!   order sent per symbol;
//! - each partition's market stream is exactly what an undisturbed engine makes of that
//!   partition's validated entries (the same code, in this process, from empty books): the
//!   same trades and execution reports, in the same order, nothing missing or repeated;
//! - the books the engines stored equal the undisturbed books (resting orders survive);
//! - analytics' totals match those trades and reports;
//! - nothing is dead-lettered, nothing is left pending, and every process stops cleanly.
//!
//! `TICKFLOW_CHAOS_EVENTS` (default 20 000), `TICKFLOW_CHAOS_RATE` (events/s, default
//! 1 500) and `TICKFLOW_CHAOS_SEED` (the flow and the kill schedule) size it; `make chaos`
//! runs a longer one.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::{
    Role,
    processes::{ProcessOptions, ProcessPipeline},
    service_binaries,
};
use engine::{Books, stage::Applied};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use streams_core::{Envelope, Partition, Redis, testing::RedisOptions};
use tickflow_proto::{event_type as types, topology, v1};
use tokio::sync::watch;

use crate::support::{cancel, limit, market, tick};

/// Events per request.
const BATCH: usize = 100;
/// Partitions: with these, [`SYMBOLS`] fall in every one of them.
const PARTITIONS: u32 = 5;
/// Symbols of the demo reference data, with their tick sizes and a starting mid price.
const SYMBOLS: [(&str, f64, f64); 6] = [
    ("AAPL", 0.01, 172.50),
    ("MSFT", 0.01, 410.00),
    ("NVDA", 0.01, 120.00),
    ("AMZN", 0.01, 185.00),
    ("BTC-USD", 0.5, 60_000.00),
    ("ES", 0.25, 5_000.00),
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
        .unwrap_or(default)
}

/// What the flow sent for one symbol, in order: the kind and, for orders and cancels, the
/// client order id.
type Sent = BTreeMap<String, Vec<(&'static str, String)>>;

/// A deterministic flow of limit and market orders, cancels and ticks over [`SYMBOLS`].
fn flow(events: usize, seed: u64) -> (Vec<v1::Event>, Sent) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mids: Vec<i64> = SYMBOLS
        .iter()
        .map(|(_, tick, mid)| (mid / tick).round() as i64)
        .collect();
    let mut live: Vec<Vec<String>> = vec![Vec::new(); SYMBOLS.len()];
    let mut sent = Sent::new();
    let mut out = Vec::with_capacity(events);
    for n in 0..events {
        let s = rng.random_range(0..SYMBOLS.len());
        let (symbol, tick_size, _) = SYMBOLS[s];
        if rng.random_range(0..20) == 0 {
            mids[s] += rng.random_range(-1..=1);
        }
        let side = if rng.random_bool(0.5) {
            v1::Side::Buy
        } else {
            v1::Side::Sell
        };
        let roll = rng.random_range(0..100);
        let (event, kind, id) = if roll < 70 {
            // Mostly near the touch, sometimes through it.
            let offset = rng.random_range(-6..=8);
            let ticks = match side {
                v1::Side::Buy => mids[s] - offset,
                _ => mids[s] + offset,
            };
            let id = format!("c{n}");
            live[s].push(id.clone());
            let qty = rng.random_range(1..=20) as f64;
            let event = limit(symbol, side, ticks as f64 * tick_size, qty, &id);
            (event, "order", id)
        } else if roll < 80 {
            let id = format!("m{n}");
            let qty = rng.random_range(1..=15) as f64;
            (market(symbol, side, qty, &id), "order", id)
        } else if roll < 92 && !live[s].is_empty() {
            // Any earlier order: resting, filled or already cancelled.
            let id = live[s][rng.random_range(0..live[s].len())].clone();
            (cancel(symbol, &id), "cancel", id)
        } else {
            let ticks = mids[s] + rng.random_range(-4..=4);
            let qty = rng.random_range(1..=50) as f64;
            (
                tick(symbol, ticks as f64 * tick_size, qty),
                "tick",
                String::new(),
            )
        };
        sent.entry(symbol.to_owned()).or_default().push((kind, id));
        out.push(event);
    }
    (out, sent)
}

/// How far [`publish`] got, while it runs: events accepted (whole batches) and requests
/// sent again after an error.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) accepted: AtomicUsize,
    pub(crate) retries: AtomicUsize,
}

/// Sends `events` in batches of [`BATCH`] at about `rate` events/s through gRPC `Publish`,
/// each batch under its own idempotency key, retrying a batch (to whichever ingest is up)
/// until it is answered. Returns every id ingest answered, in order.
pub(crate) async fn publish(
    events: Vec<v1::Event>,
    rate: u64,
    mut ingest: watch::Receiver<SocketAddr>,
    progress: Arc<Progress>,
) -> (Vec<String>, usize) {
    let started = Instant::now();
    let mut ids = Vec::with_capacity(events.len());
    let mut retries = 0;
    let mut client = None;
    for (n, batch) in events.chunks(BATCH).enumerate() {
        let due = started + Duration::from_secs_f64((n * BATCH) as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let key = format!("chaos-batch-{n}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                Instant::now() < deadline,
                "batch {n} not accepted within 120 s"
            );
            if ingest.has_changed().unwrap_or(false) {
                client = None;
            }
            if client.is_none() {
                let addr = *ingest.borrow_and_update();
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await;
                match channel {
                    Ok(channel) => {
                        client = Some(v1::ingest_service_client::IngestServiceClient::new(channel));
                    }
                    Err(_) => {
                        retries += 1;
                        progress.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let mut request = tonic::Request::new(v1::PublishRequest {
                events: batch.to_vec(),
            });
            request
                .metadata_mut()
                .insert("idempotency-key", key.parse().expect("ascii key"));
            match client.as_mut().expect("connected").publish(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    assert_eq!(reply.ids.len(), batch.len(), "batch {n}: {reply:?}");
                    ids.extend(reply.ids);
                    break;
                }
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::ResourceExhausted
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Unknown
                                | tonic::Code::Internal
                                | tonic::Code::Cancelled
                        ),
                        "batch {n} refused: {status:?}"
                    );
                    retries += 1;
                    progress.retries.fetch_add(1, Ordering::Relaxed);
                    client = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        progress.accepted.store((n + 1) * BATCH, Ordering::Relaxed);
    }
    (ids, retries)
}

/// The entries of every partition of `stream`, per partition in stream order.
async fn per_partition(p: &ProcessPipeline, stream: &str) -> BTreeMap<Partition, Vec<Envelope>> {
    let mut out: BTreeMap<Partition, Vec<Envelope>> = BTreeMap::new();
    for entry in p.stream_entries(stream).await {
        out.entry(entry.partition).or_default().push(entry.envelope);
    }
    out
}

fn symbol_and_id(envelope: &Envelope) -> (String, &'static str, String) {
    let payload = envelope.payload.as_ref();
    match envelope.event_type.as_str() {
        types::VALIDATED_ORDER => {
            let o = v1::ValidatedOrder::decode(payload).expect("validated order");
            (o.symbol, "order", o.client_order_id)
        }
        types::VALIDATED_CANCEL => {
            let c = v1::ValidatedCancel::decode(payload).expect("validated cancel");
            (c.symbol, "cancel", c.client_order_id)
        }
        types::VALIDATED_TICK => {
            let t = v1::ValidatedTick::decode(payload).expect("validated tick");
            (t.symbol, "tick", String::new())
        }
        other => panic!("unexpected {other} on the validated stream"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_doubled_when_stages_and_redis_crash() {
    let events = env_or("TICKFLOW_CHAOS_EVENTS", 20_000) as usize;
    let rate = env_or("TICKFLOW_CHAOS_RATE", 1_500).max(1);
    let seed = env_or("TICKFLOW_CHAOS_SEED", 20_261_126);
    eprintln!("chaos: {events} events at {rate}/s, seed {seed}");

    let mut p = ProcessPipeline::start(
        service_binaries!(),
        ProcessOptions {
            name: "chaos".into(),
            partitions: PARTITIONS,
            replicas: [1, 2, 2, 2],
            redis: RedisOptions { aof: true },
            env: [
                ("TICKFLOW_TRIM_INTERVAL_MS", "300"),
                ("TICKFLOW_SHUTDOWN_GRACE_MS", "3000"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..ProcessOptions::default()
        },
    )
    .await;

    // Keep every validated and market entry for the checks: trimming never goes past a
    // group's acknowledged point, and this group acknowledges nothing.
    let mut conn = p.conn();
    for stream in [topology::VALIDATED, topology::MARKET] {
        for partition in p.keys().all_partitions() {
            let () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(p.keys().stream(stream, partition))
                .arg("chaos-audit")
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await
                .expect("create the audit group");
        }
    }

    let (flow, sent) = flow(events, seed);
    let ingest_addr = |p: &ProcessPipeline| {
        p.service(Role::Ingest)
            .grpc_addr()
            .expect("ingest has a gRPC address")
    };
    let (addr_tx, addr_rx) = watch::channel(ingest_addr(&p));
    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish(flow, rate, addr_rx, progress.clone()));

    // The chaos: a crash every 0.4–1.2 s, Redis once, past a third of the flow.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut redis_crashed = false;
    let mut kills: BTreeMap<Role, usize> = BTreeMap::new();
    let mut generation = 0;
    // At least `MIN_KILLS` crashes, even if the flow is short.
    const MIN_KILLS: usize = 4;
    while !publisher.is_finished() || !redis_crashed || kills.values().sum::<usize>() < MIN_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1200))).await;
        if !redis_crashed
            && (progress.accepted.load(Ordering::Relaxed) >= events / 3 || publisher.is_finished())
        {
            eprintln!(
                "chaos: redis killed at {} events",
                progress.accepted.load(Ordering::Relaxed)
            );
            p.kill_redis();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            p.restart_redis().await;
            redis_crashed = true;
            continue;
        }
        let role = [Role::Transform, Role::Engine, Role::Analytics, Role::Ingest]
            [rng.random_range(0..7) % 4];
        let replicas = p.replicas(role).count();
        let index = rng.random_range(0..replicas);
        p.kill(role, index);
        *kills.entry(role).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        generation += 1;
        // The engine keeps its name (a StatefulSet pod); the others come back as new
        // consumers (Deployment pods).
        let consumer = match role {
            Role::Engine => format!("{role}-{index}"),
            _ => format!("{role}-{index}-g{generation}"),
        };
        p.restart(role, index, consumer);
        if role == Role::Ingest {
            addr_tx
                .send(ingest_addr(&p))
                .expect("the publisher listens");
        }
    }
    let (ids, retries) = publisher.await.expect("the publisher");
    eprintln!(
        "chaos: kills {kills:?}, {retries} retried requests; redis {} ns {}",
        p.redis_url(),
        p.namespace()
    );

    // Everything acknowledged, by the processes now running.
    p.wait_ready().await;
    p.wait_settled(Duration::from_secs(240)).await;

    // 1. Every event was answered (each batch once: retries under its key are replays).
    assert_eq!(ids.len(), events);

    // 2. The validated stream holds each event once, in the order sent per symbol.
    let validated = per_partition(&p, topology::VALIDATED).await;
    let mut seen = Sent::new();
    for envelopes in validated.values() {
        for envelope in envelopes {
            let (symbol, kind, id) = symbol_and_id(envelope);
            seen.entry(symbol).or_default().push((kind, id));
        }
    }
    for (symbol, expected) in &sent {
        let got = seen.get(symbol).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), expected.len(), "{symbol}: validated entries");
        if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "{symbol}: validated entry {at} is {:?}, sent {:?}",
                got[at], expected[at]
            );
        }
    }

    // 3. Each partition's market stream is what an undisturbed engine makes of it.
    let market = per_partition(&p, topology::MARKET).await;
    let redis = Redis::new(&p.redis_url(), 2).expect("redis handle");
    let mut trades: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let mut executions: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut ticks: BTreeMap<String, i64> = BTreeMap::new();
    for partition in p.keys().all_partitions() {
        let mut books = Books::default();
        let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
        for envelope in validated.get(&partition).into_iter().flatten() {
            match engine::stage::apply(&mut books, envelope, |_| true).expect("a valid entry") {
                Applied::Tick { symbol } => {
                    *ticks.entry(symbol).or_default() += 1;
                    expected.push((types::VALIDATED_TICK.into(), envelope.payload.to_vec()));
                }
                Applied::Book { symbol, events } => {
                    let mut order_events = v1::OrderEvents::default();
                    for event in events {
                        if let engine::Event::Trade { qty, .. } = &event {
                            let t = trades.entry(symbol.clone()).or_default();
                            t.0 += 1;
                            t.1 += qty;
                        }
                        let event = engine::stage::market_event(&symbol, event);
                        if let Some(v1::market_event::Kind::Execution(r)) = &event.kind {
                            let status = v1::ExecStatus::try_from(r.status)
                                .unwrap()
                                .as_str_name()
                                .trim_start_matches("EXEC_STATUS_")
                                .to_ascii_lowercase();
                            *executions.entry((symbol.clone(), status)).or_default() += 1;
                        }
                        order_events.events.push(event);
                    }
                    if !order_events.events.is_empty() {
                        expected.push((types::ORDER_EVENTS.into(), order_events.encode_to_vec()));
                    }
                }
            }
        }
        let got: Vec<(String, Vec<u8>)> = market
            .get(&partition)
            .into_iter()
            .flatten()
            .map(|e| (e.event_type.clone(), e.payload.to_vec()))
            .collect();
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "partition {partition}: market entry {at} is {:?}, an undisturbed engine gives {:?}",
                got[at].0, expected[at].0
            );
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "partition {partition}: market entries"
        );

        // 4. The stored books are the undisturbed books.
        let stored = engine::stage::load_books(&redis, p.keys(), partition)
            .await
            .expect("the stored books load");
        for symbol in books.symbols() {
            assert_eq!(
                stored.get(symbol),
                books.get(symbol),
                "partition {partition}: the stored book of {symbol}"
            );
        }
    }
    eprintln!("chaos: trades (count, volume) {trades:?}");
    assert_eq!(
        validated.len(),
        PARTITIONS as usize,
        "the flow reaches every partition"
    );
    assert!(
        trades.values().map(|t| t.0).sum::<i64>() > 100,
        "the flow trades"
    );

    // 5. Analytics counted each trade, report and tick once.
    for (symbol, _, _) in SYMBOLS {
        let stats = p.stats(symbol).await;
        let (count, volume) = trades.get(symbol).copied().unwrap_or_default();
        assert_eq!(stats["trades"], count, "{symbol}: {stats}");
        assert_eq!(stats["volume"], volume, "{symbol}: {stats}");
        assert_eq!(
            stats["ticks"],
            ticks.get(symbol).copied().unwrap_or_default(),
            "{symbol}: {stats}"
        );
        for ((s, status), n) in &executions {
            if s == symbol {
                assert_eq!(
                    stats["executions"][status], *n,
                    "{symbol} {status}: {stats}"
                );
            }
        }
    }

    // 6. Nothing dead-lettered.
    for stream in [topology::INBOUND, topology::VALIDATED, topology::MARKET] {
        for partition in p.keys().all_partitions() {
            let key = p.keys().dead_letter(stream, partition);
            assert_eq!(p.xlen(&key).await, 0, "{key} holds dead letters");
        }
    }

    // Trimming ran: the inbound stream (no audit group) was trimmed below what was sent.
    let mut inbound = 0;
    for partition in p.keys().all_partitions() {
        inbound += p.xlen(&p.keys().stream(topology::INBOUND, partition)).await;
    }
    assert!(
        inbound < events as u64,
        "inbound holds {inbound} of {events}: trimming never ran"
    );

    p.stop().await;
}
