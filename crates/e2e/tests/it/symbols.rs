//! Symbols the reference data does not know, or knows only by an invalid instrument, against
//! the real services as processes (a panic ends a process, as in production; each process
//! has its own metrics): a malformed instrument written to Redis is skipped while the other
//! symbols trade on, and orders of invented symbols are counted, never keyed or kept per
//! symbol.

use std::{collections::BTreeSet, time::Duration};

use e2e::{
    MarketEvent, RedisKind, Role, market_events,
    processes::{ProcessOptions, ProcessPipeline, metric_sum},
    service_binaries,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tickflow_proto::{topology, v1};

use crate::support::{WAIT, limit_json, status_name};

/// How long 5,000 orders may take to go through four debug builds on a loaded machine.
const SETTLE: Duration = Duration::from_secs(180);

/// The symbols of `demo/instruments.json`, which every pipeline starts with.
const DEMO_SYMBOLS: [&str; 8] = [
    "AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "ES", "BTC-USD", "EURUSD",
];

async fn start(name: &str, backend: RedisKind) -> ProcessPipeline {
    ProcessPipeline::start(
        service_binaries!(),
        ProcessOptions {
            backend,
            name: name.into(),
            ..ProcessOptions::default()
        },
    )
    .await
}

/// Every execution report on the market stream, in stream order.
async fn execution_reports(p: &ProcessPipeline) -> Vec<v1::ExecutionReport> {
    market_events(p.stream_entries(topology::MARKET).await)
        .into_iter()
        .filter_map(|(_, event)| match event {
            MarketEvent::Execution(report) => Some(report),
            _ => None,
        })
        .collect()
}

/// Waits until order `id` has a report with `status`; returns it.
async fn wait_report(p: &ProcessPipeline, id: &str, status: &str) -> v1::ExecutionReport {
    p.wait_for(WAIT, async || {
        let reports = execution_reports(p).await;
        reports
            .iter()
            .find(|r| r.client_order_id == id && status_name(r.status) == status)
            .cloned()
            .ok_or_else(|| {
                let seen: Vec<(String, String)> = reports
                    .iter()
                    .filter(|r| r.client_order_id == id)
                    .map(|r| (status_name(r.status), r.reason.clone()))
                    .collect();
                format!("a {status} report of {id} (seen: {seen:?})")
            })
    })
    .await
}

/// Waits until transform's `tickflow_refdata_invalid_instruments` gauge reads `count`: it
/// has read the reference data's latest version.
async fn wait_invalid_instruments(p: &ProcessPipeline, count: u64) {
    p.wait_for(WAIT, async || {
        let text = p.metrics(Role::Transform).await;
        let seen = metric_sum(&text, "tickflow_refdata_invalid_instruments", &[]) as u64;
        if seen == count && text.contains("tickflow_refdata_invalid_instruments") {
            Ok(())
        } else {
            Err(format!("{count} invalid instruments (gauge: {seen})"))
        }
    })
    .await;
}

/// Writes `fields` into the instruments hash as an operator would (HSET), then bumps the
/// version so that transform reads it again.
async fn hset_instruments(p: &ProcessPipeline, fields: &[(&str, &str)]) {
    let keys = p.keys();
    let mut pipe = redis::pipe();
    for (symbol, json) in fields {
        pipe.hset(keys.global("instruments"), *symbol, *json)
            .ignore();
    }
    pipe.incr(keys.global("instruments:version"), 1).ignore();
    let _: () = pipe
        .query_async(&mut p.conn())
        .await
        .expect("HSET instruments");
}

on_both_backends!(a_malformed_instrument_in_redis_leaves_transform_alive_and_other_symbols_trading);

async fn a_malformed_instrument_in_redis_leaves_transform_alive_and_other_symbols_trading(
    backend: RedisKind,
) {
    let mut p = start("refdata", backend).await;

    // A resting MSFT sell from before its instrument breaks.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!([limit_json("MSFT", "sell", 400.0, 10, "m-rest")]),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "m-rest", "ACCEPTED").await;

    // Each way an instrument can be malformed; MSFT's is the one that used to divide by 0.
    let malformed = [
        (
            "MSFT",
            r#"{"symbol": "MSFT", "tick_size": 0.01, "lot_size": 0}"#,
            "lot_size 0",
        ),
        (
            "NVDA",
            r#"{"symbol": "NVDA", "tick_size": 0}"#,
            "tick_size 0",
        ),
        (
            "TSLA",
            r#"{"symbol": "TSLA", "tick_size": 0.01, "band_bps": -500}"#,
            "integer `-500`",
        ),
        (
            "AMZN",
            r#"{"symbol": "AMZN", "tick_size": "0.01"}"#,
            "invalid type: string",
        ),
        ("ES", r#"{"symbol": "ES"}"#, "missing field `tick_size`"),
    ];
    let fields: Vec<(&str, &str)> = malformed.iter().map(|(s, j, _)| (*s, *j)).collect();
    hset_instruments(&p, &fields).await;
    wait_invalid_instruments(&p, malformed.len() as u64).await;

    // Limit and market orders of every malformed symbol, a cancel of the resting MSFT
    // sell, and a trade of a good symbol.
    let mut orders = vec![
        limit_json("AAPL", "sell", 172.50, 100, "a-sell"),
        limit_json("AAPL", "buy", 172.60, 60, "a-buy"),
    ];
    for (symbol, _, _) in &malformed {
        orders.push(limit_json(
            symbol,
            "buy",
            10.0,
            1,
            &format!("{symbol}-limit"),
        ));
        orders.push(json!({
            "symbol": symbol, "side": "buy", "type": "market", "qty": 5,
            "client_order_id": format!("{symbol}-market"),
        }));
    }
    let (status, body) = p.post_json("/v1/orders", &Value::Array(orders), &[]).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = p.delete("/v1/orders/MSFT/m-rest").await;
    assert!((200..300).contains(&status), "{status} {body}");

    wait_report(&p, "a-buy", "FILLED").await;
    for (symbol, _, problem) in &malformed {
        for kind in ["limit", "market"] {
            let report = wait_report(&p, &format!("{symbol}-{kind}"), "REJECTED").await;
            assert_eq!(
                report.reject_code,
                v1::RejectCode::InstrumentUnavailable as i32,
                "{report:?}"
            );
            assert!(
                report
                    .reason
                    .starts_with(&format!("instrument {symbol} is unavailable"))
                    && report.reason.contains(problem),
                "{symbol}: {}",
                report.reason
            );
        }
    }
    // A cancel needs no trading rules: the resting order comes off the book.
    wait_report(&p, "m-rest", "CANCELLED").await;
    p.assert_running();
    let log = p.log(Role::Transform);
    for (symbol, _, problem) in &malformed {
        assert!(
            log.lines()
                .any(|line| line.contains("skipping an invalid instrument")
                    && line.contains(symbol)
                    && line.contains(problem)),
            "no error naming {symbol} and {problem:?} in transform's log:\n{log}"
        );
    }

    // Fixed in Redis: MSFT trades again, without a restart.
    hset_instruments(
        &p,
        &[(
            "MSFT",
            r#"{"symbol": "MSFT", "tick_size": 0.01, "lot_size": 1, "band_bps": 1000}"#,
        )],
    )
    .await;
    wait_invalid_instruments(&p, malformed.len() as u64 - 1).await;
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!([
                limit_json("MSFT", "sell", 400.0, 10, "m-sell"),
                limit_json("MSFT", "buy", 400.0, 10, "m-buy"),
            ]),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "m-buy", "FILLED").await;
    p.stop().await;
}

on_both_backends!(orders_of_5000_unknown_symbols_are_counted_and_leave_no_key_or_memory_per_symbol);

async fn orders_of_5000_unknown_symbols_are_counted_and_leave_no_key_or_memory_per_symbol(
    backend: RedisKind,
) {
    let mut p = start("unknown", backend).await;
    const UNKNOWN: usize = 5_000;
    let mut rng = StdRng::seed_from_u64(17);
    let mut unknown = BTreeSet::new();
    while unknown.len() < UNKNOWN {
        let symbol: String = (0..8)
            .map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[rng.random_range(0..36)]))
            .collect();
        if !DEMO_SYMBOLS.contains(&symbol.as_str()) {
            unknown.insert(symbol);
        }
    }
    let orders: Vec<Value> = unknown
        .iter()
        .enumerate()
        .map(|(i, symbol)| limit_json(symbol, "buy", 10.0, 1, &format!("u{i}")))
        .collect();
    for chunk in orders.chunks(1_000) {
        let (status, body) = p.post_json("/v1/orders", &json!(chunk), &[]).await;
        assert_eq!(status, 202, "{body}");
    }
    // And a known symbol's trade, whose statistics are kept per symbol as ever.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &json!([
                limit_json("AAPL", "sell", 172.50, 100, "a-sell"),
                limit_json("AAPL", "buy", 172.60, 60, "a-buy"),
            ]),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    p.wait_settled(SETTLE).await;

    // Every one was rejected as unknown, with its code.
    let rejected: BTreeSet<String> = execution_reports(&p)
        .await
        .into_iter()
        .filter(|r| r.reject_code == v1::RejectCode::UnknownSymbol as i32)
        .map(|r| r.symbol)
        .collect();
    assert_eq!(rejected, unknown);

    // No key names one of them: every key of the namespace (on every master of a
    // cluster), segment by segment.
    let mut conn = p.conn();
    let keys = p.backend().scan(&format!("{}:*", p.namespace())).await;
    assert!(
        keys.contains(&p.keys().stream(topology::MARKET, 0)),
        "the scan sees the pipeline's keys: {} of them",
        keys.len()
    );
    let keyed: Vec<&String> = keys
        .iter()
        .filter(|key| key.split(':').any(|segment| unknown.contains(segment)))
        .collect();
    assert!(
        keyed.is_empty(),
        "{} of {} keys name an unknown symbol, e.g. {:?}",
        keyed.len(),
        keys.len(),
        keyed.iter().take(5).collect::<Vec<_>>()
    );
    // Nor does the engine's list of books.
    for partition in p.keys().all_partitions() {
        let books: Vec<String> = redis::cmd("SMEMBERS")
            .arg(
                p.keys()
                    .partition_state(topology::ENGINE_GROUP, "symbols", partition),
            )
            .query_async(&mut conn)
            .await
            .expect("SMEMBERS");
        assert!(
            books.iter().all(|s| DEMO_SYMBOLS.contains(&s.as_str())),
            "{books:?}"
        );
    }

    // Counted: by analytics (its query API and its metrics) and by transform.
    let (status, counted) = p
        .get_json(&p.url(Role::Analytics, "/v1/unknown-symbols"))
        .await;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(
        counted,
        json!({ "rejections": UNKNOWN, "by_code": { "unknown_symbol": UNKNOWN } })
    );
    let analytics = p.metrics(Role::Analytics).await;
    let metric =
        |text: &str, name: &str, labels: &[(&str, &str)]| metric_sum(text, name, labels) as u64;
    assert_eq!(
        metric(
            &analytics,
            "tickflow_analytics_unknown_symbol_rejections_total",
            &[("code", "unknown_symbol")]
        ),
        UNKNOWN as u64
    );
    // Analytics' memory holds the one symbol that traded, not the 5,000.
    assert_eq!(
        metric(&analytics, "tickflow_analytics_symbols_in_memory", &[]),
        1,
        "{analytics}"
    );
    let transform = p.metrics(Role::Transform).await;
    assert_eq!(
        metric(
            &transform,
            "tickflow_transform_rejections_total",
            &[("code", "unknown_symbol")]
        ),
        UNKNOWN as u64
    );
    let stats = p.stats("AAPL").await;
    assert_eq!(stats["trades"], 1, "{stats}");
    p.stop().await;
}
