//! How long an engine takes to take over a partition holding many resting orders, and what
//! a resting order costs in Redis and in the engine's memory.
//!
//! ```sh
//! cargo run --release -p engine --example takeover_bench [-- --orders 100000 --symbols 16 --runs 5]
//! ```
//!
//! It starts a redis-server of its own (streams-core's test harness) and an engine stage
//! in-process on one partition, appends `--orders` limit orders that never cross (bids
//! below 100, asks above 101, over 200 price levels per side) to the validated stream, and
//! lets the engine rest them, so the books are stored by the real code path (each batch's
//! commit). It stops that engine, deletes the streams (what is left is the books' state),
//! and reads Redis's `used_memory` against the empty server's. Then it times
//! `partition_acquired` of a fresh engine handler, `--runs` times: the pause during which a
//! replica taking the partition over reads nothing (its stage loop waits for it), and the
//! growth of this process's resident memory (`/proc/self/statm`, with the engine's
//! allocator, mimalloc) while the loaded books are held; the first run's is the telling one,
//! later runs reuse what the previous one freed.

use std::time::{Duration, Instant};

use prost::Message;
use streams_core::{App, Env, Envelope, Handler, KeySpace, Redis, testing::RedisServer};
use tickflow_proto::{event_type as types, topology, v1};
use tokio_util::sync::CancellationToken;

struct Options {
    orders: u64,
    symbols: u64,
    runs: usize,
}

fn options() -> Options {
    let mut options = Options {
        orders: 100_000,
        symbols: 16,
        runs: 5,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_default();
        let number = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{} takes a number, not {value:?}", pair[0]))
        };
        match pair[0].as_str() {
            "--orders" => options.orders = number(),
            "--symbols" => options.symbols = number().max(1),
            "--runs" => options.runs = number().max(1) as usize,
            other => panic!("unknown argument {other}: --orders N --symbols N --runs N"),
        }
    }
    options
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

/// The `i`th order: never crossing, spread over the symbols and 200 levels a side.
fn order(i: u64, symbols: u64) -> Envelope {
    let symbol = format!("T{:02}", i % symbols);
    let level = ((i / symbols) % 200) as i64;
    let (side, price_e6) = if (i / symbols / 200).is_multiple_of(2) {
        (v1::Side::Buy, 99_000_000 - level * 10_000)
    } else {
        (v1::Side::Sell, 101_000_000 + level * 10_000)
    };
    let order = v1::ValidatedOrder {
        symbol: symbol.clone(),
        side: side as i32,
        r#type: v1::OrderType::Limit as i32,
        price_e6,
        qty: 1 + i % 9,
        client_order_id: format!("bench-{i}"),
        instrument: None,
    };
    Envelope::new(types::VALIDATED_ORDER, symbol, order.encode_to_vec())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    let server = RedisServer::start();
    let mut conn = server.connect().await;
    let namespace = streams_core::testing::unique_namespace("takeover");
    let keys = KeySpace::new(namespace.as_str(), 1);
    let empty = used_memory(&mut conn).await;

    // The books, stored by an engine through its commits.
    let shutdown = CancellationToken::new();
    let env = Env::from_pairs([
        ("REDIS_URL", server.url()),
        ("TICKFLOW_NAMESPACE", namespace.clone()),
        ("TICKFLOW_PARTITIONS", "1".into()),
        ("TICKFLOW_TRIM_INTERVAL_MS", "0".into()),
        ("CONSUMER_NAME", "engine-0".into()),
        ("RUST_LOG", "warn".into()),
    ]);
    let app = App::init("engine", env, "127.0.0.1:0", shutdown.clone()).expect("engine");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = tokio::spawn(engine::run(app, http));
    let validated = keys.stream(topology::VALIDATED, 0);
    let market = keys.stream(topology::MARKET, 0);
    let started = Instant::now();
    for chunk in (0..options.orders).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let cmd = pipe.cmd("XADD").arg(&validated).arg("*");
            for (name, value) in order(i, options.symbols).to_fields() {
                cmd.arg(name).arg(value);
            }
            cmd.ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    loop {
        let handled: u64 = redis::cmd("XLEN")
            .arg(&market)
            .query_async(&mut conn)
            .await
            .unwrap();
        if handled >= options.orders {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the engine handled {handled} of {} orders in 10 minutes",
            options.orders
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored_in = started.elapsed();
    shutdown.cancel();
    engine.await.unwrap().unwrap();
    let () = redis::cmd("DEL")
        .arg(&validated)
        .arg(&market)
        .query_async(&mut conn)
        .await
        .unwrap();
    let state = used_memory(&mut conn).await - empty;
    let orders = options.orders as f64;
    println!(
        "stored {} resting orders over {} symbols through the engine in {:.1} s",
        options.orders,
        options.symbols,
        stored_in.as_secs_f64()
    );
    println!(
        "redis: {:.1} MiB of state, {:.0} bytes per resting order (INFO used_memory delta)",
        state as f64 / (1 << 20) as f64,
        state as f64 / orders
    );

    // The takeover, as a replica's stage loop runs it.
    let redis = Redis::new(&server.url(), 4).unwrap();
    let mut pauses = Vec::new();
    for run in 0..options.runs {
        let rss_before = rss_bytes();
        let mut handler = engine::stage::Matching::new(keys.clone(), redis.clone());
        let at = Instant::now();
        handler.partition_acquired(0).await.expect("takeover");
        let pause = at.elapsed();
        let rss = rss_bytes() as i64 - rss_before as i64;
        let resting: usize = handler
            .books(0)
            .map(|books| {
                books
                    .symbols()
                    .map(|s| books.get(s).map_or(0, |b| b.len()))
                    .sum()
            })
            .unwrap_or(0);
        assert_eq!(resting as u64, options.orders, "every order loaded");
        println!(
            "takeover {}: pause {:.0} ms; engine RSS {:+.0} bytes per resting order",
            run + 1,
            pause.as_secs_f64() * 1e3,
            rss as f64 / orders
        );
        pauses.push(pause);
        drop(handler);
    }
    pauses.sort();
    println!(
        "pause: median {:.0} ms, max {:.0} ms over {} takeovers of {} resting orders",
        pauses[pauses.len() / 2].as_secs_f64() * 1e3,
        pauses[pauses.len() - 1].as_secs_f64() * 1e3,
        pauses.len(),
        options.orders
    );
}
