//! A scripted session through all three ingest paths (HTTP JSON, gRPC `Publish` and
//! `PublishStream`, the external stream) gives exactly the expected trades, execution
//! reports and analytics.

use std::collections::BTreeMap;

use e2e::{Options, Pipeline, RedisKind, Role, stage_status};
use serde_json::json;
use tickflow_proto::{topology, v1};

use crate::support::{
    WAIT, assert_close, final_statuses, limit, limit_json, report, reports_of, trade, trade_view,
    wait_report, wait_trades,
};

on_both_backends!(a_scripted_session_through_every_ingest_path_gives_the_expected_results);

/// On a Redis Cluster: partitions spread over the masters, the external stream in a slot
/// of its own (forwarded through the dedupe gate), requests appended slot by slot.
async fn a_scripted_session_through_every_ingest_path_gives_the_expected_results(
    backend: RedisKind,
) {
    let p = Pipeline::start_with(Options {
        backend,
        ..Options::default()
    })
    .await;
    scripted_session(p).await;
}

async fn scripted_session(p: Pipeline) {
    let mut grpc = p.grpc_client().await;

    // 1. HTTP: two resting AAPL offers.
    let (status, body) = p
        .post_json("/v1/orders", &limit_json("AAPL", "sell", 172.50, 100, "s1"))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    wait_report(&p, "s1", "ACCEPTED").await;
    let (status, body) = p
        .post_json("/v1/orders", &limit_json("AAPL", "sell", 172.60, 50, "s2"))
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "s2", "ACCEPTED").await;

    // 2. gRPC Publish: a buy that takes all of s1 and part of s2.
    let reply = grpc
        .publish(v1::PublishRequest {
            events: vec![limit("AAPL", v1::Side::Buy, 172.60, 120.0, "b1")],
        })
        .await
        .expect("Publish b1")
        .into_inner();
    assert_eq!(reply.accepted, 1);
    assert_eq!(reply.ids.len(), 1);
    wait_trades(&p, "AAPL", 2).await;

    // 3. External stream: a market buy for the rest of s2 (asynchronous: wait for it).
    p.xadd_external(&[
        ("symbol", "AAPL"),
        ("side", "buy"),
        ("type", "market"),
        ("qty", "30"),
        ("client_order_id", "b2"),
    ])
    .await;
    wait_trades(&p, "AAPL", 3).await;

    // 4. Ticks: one through the external stream, one through HTTP.
    p.xadd_external(&[("symbol", "AAPL"), ("price", "172.55"), ("qty", "10")])
        .await;
    wait_ticks(&p, 1).await;
    let (status, body) = p
        .post_json(
            "/v1/ticks",
            &json!({ "symbol": "AAPL", "price": 172.56, "qty": 5 }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_ticks(&p, 2).await;

    // 5. gRPC PublishStream: MSFT orders that cross.
    let events = vec![
        limit("MSFT", v1::Side::Sell, 400.00, 10.0, "m1"),
        limit("MSFT", v1::Side::Sell, 400.50, 5.0, "m2"),
        limit("MSFT", v1::Side::Buy, 400.50, 12.0, "m3"),
    ];
    let reply = grpc
        .publish_stream(futures::stream::iter(events))
        .await
        .expect("PublishStream")
        .into_inner();
    assert_eq!(reply.accepted, 3);
    assert!(!reply.last_id.is_empty(), "{reply:?}");
    wait_trades(&p, "MSFT", 2).await;

    // 6. Cancels: a resting AAPL bid by DELETE, the rest of m2 by POST /v1/cancels.
    let (status, body) = p
        .post_json("/v1/orders", &limit_json("AAPL", "buy", 172.00, 10, "b3"))
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "b3", "ACCEPTED").await;
    let (status, body) = p.delete("/v1/orders/AAPL/b3").await;
    assert_eq!(status, 202, "{body}");
    let cancelled = wait_report(&p, "b3", "CANCELLED").await;
    assert_eq!(cancelled.reason, "cancel requested");
    let (status, body) = p
        .post_json(
            "/v1/cancels",
            &json!({ "symbol": "MSFT", "client_order_id": "m2" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "m2", "CANCELLED").await;

    p.wait_settled(WAIT).await;

    // Trades: exactly these, in book sequence per symbol.
    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![
            trade("AAPL", 172_500_000, 100, "b1", "s1", 4),
            trade("AAPL", 172_600_000, 20, "b1", "s2", 7),
            trade("AAPL", 172_600_000, 30, "b2", "s2", 11),
            trade("MSFT", 400_000_000, 10, "m3", "m1", 4),
            trade("MSFT", 400_500_000, 2, "m3", "m2", 7),
        ]
    );

    let reports = p.execution_reports().await;
    let expected_final: BTreeMap<String, String> = [
        ("s1", "FILLED"),
        ("s2", "FILLED"),
        ("b1", "FILLED"),
        ("b2", "FILLED"),
        ("b3", "CANCELLED"),
        ("m1", "FILLED"),
        ("m2", "CANCELLED"),
        ("m3", "FILLED"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(final_statuses(&reports), expected_final);

    // Analytics: per-symbol statistics.
    let stats = p.stats("AAPL").await;
    assert_eq!(stats["trades"], 3, "{stats}");
    assert_eq!(stats["volume"], 150, "{stats}");
    assert_close(
        &stats["vwap"],
        (100.0 * 172.50 + 50.0 * 172.60) / 150.0,
        "AAPL vwap",
    );
    assert_close(&stats["last_price"], 172.60, "AAPL last_price");
    assert_eq!(stats["ticks"], 2, "{stats}");
    assert_close(&stats["last_tick_price"], 172.56, "AAPL last_tick_price");
    assert_eq!(
        stats["executions"],
        json!({ "accepted": 5, "partially_filled": 2, "filled": 4, "cancelled": 1 }),
        "{stats}"
    );
    let stats = p.stats("msft").await;
    assert_eq!(stats["symbol"], "MSFT", "{stats}");
    assert_eq!(stats["trades"], 2, "{stats}");
    assert_eq!(stats["volume"], 12, "{stats}");
    assert_close(
        &stats["vwap"],
        (10.0 * 400.00 + 2.0 * 400.50) / 12.0,
        "MSFT vwap",
    );
    assert_close(&stats["last_price"], 400.50, "MSFT last_price");
    assert_eq!(stats["ticks"], 0, "{stats}");

    // Bars: their volumes and trade counts add up to the totals.
    for (symbol, volume, count) in [("AAPL", 150, 3), ("MSFT", 12, 2)] {
        let url = p.analytics_url(&format!("/v1/symbols/{symbol}/bars?interval=1s"));
        let (status, bars) = p.get_json(&url).await;
        assert_eq!(status, 200, "{bars}");
        let bars = bars["bars"].as_array().expect("bars").clone();
        assert!(!bars.is_empty(), "{symbol}: no 1s bars");
        let sum = |field: &str| bars.iter().map(|b| b[field].as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum("volume"), volume, "{symbol} bars: {bars:?}");
        assert_eq!(sum("trades"), count, "{symbol} bars: {bars:?}");
    }

    // 12 + 8 reports, 5 trades, 2 ticks, in 12 entries: one per order or cancel (6 of
    // AAPL, 4 of MSFT) and one per tick.
    assert_eq!(p.market_events().await.len(), 27);
    let market_entries = p.stream_entries(topology::MARKET).await.len() as u64;
    assert_eq!(market_entries, 12);
    // Latency: one measurement per market entry analytics consumed.
    let (status, latency) = p.get_json(&p.analytics_url("/v1/latency")).await;
    assert_eq!(status, 200, "{latency}");
    assert_eq!(latency["count"], market_entries, "{latency}");
    p.wait_until(
        WAIT,
        "analytics to count every market entry as processed",
        async || {
            let status = p.admin_status(Role::Analytics, 0).await;
            stage_status(&status, topology::ANALYTICS_GROUP)["counters"]["processed"]
                == market_entries
        },
    )
    .await;

    // Execution reports: every one, in order, per symbol (last: the most detailed check).
    let aapl = 172_500_000;
    let aapl_hi = 172_600_000;
    assert_eq!(
        reports_of(&reports, "AAPL"),
        vec![
            report("s1", "ACCEPTED", 0, 0, 0, 100, 1),
            report("s2", "ACCEPTED", 0, 0, 0, 50, 2),
            report("b1", "ACCEPTED", 0, 0, 0, 120, 3),
            report("b1", "PARTIALLY_FILLED", 100, aapl, 100, 20, 5),
            report("s1", "FILLED", 100, aapl, 100, 0, 6),
            report("b1", "FILLED", 20, aapl_hi, 120, 0, 8),
            report("s2", "PARTIALLY_FILLED", 20, aapl_hi, 20, 30, 9),
            report("b2", "ACCEPTED", 0, 0, 0, 30, 10),
            report("b2", "FILLED", 30, aapl_hi, 30, 0, 12),
            report("s2", "FILLED", 30, aapl_hi, 50, 0, 13),
            report("b3", "ACCEPTED", 0, 0, 0, 10, 14),
            report("b3", "CANCELLED", 0, 0, 0, 10, 15),
        ]
    );
    let (m_lo, m_hi) = (400_000_000, 400_500_000);
    assert_eq!(
        reports_of(&reports, "MSFT"),
        vec![
            report("m1", "ACCEPTED", 0, 0, 0, 10, 1),
            report("m2", "ACCEPTED", 0, 0, 0, 5, 2),
            report("m3", "ACCEPTED", 0, 0, 0, 12, 3),
            report("m3", "PARTIALLY_FILLED", 10, m_lo, 10, 2, 5),
            report("m1", "FILLED", 10, m_lo, 10, 0, 6),
            report("m3", "FILLED", 2, m_hi, 12, 0, 8),
            report("m2", "PARTIALLY_FILLED", 2, m_hi, 2, 3, 9),
            // A cancel report carries the order's cumulative quantity like every other:
            // cum_qty + leaves_qty is the order's quantity (2 + 3 = 5).
            report("m2", "CANCELLED", 0, 0, 2, 3, 10),
        ]
    );
    drop(grpc);
    p.shutdown().await;
}

/// Waits until the market stream holds `count` ticks.
async fn wait_ticks(p: &Pipeline, count: usize) {
    p.wait_until(
        WAIT,
        &format!("{count} ticks on the market stream"),
        async || {
            p.market_events()
                .await
                .iter()
                .filter(|(kind, _)| kind == tickflow_proto::event_type::VALIDATED_TICK)
                .count()
                >= count
        },
    )
    .await
}
