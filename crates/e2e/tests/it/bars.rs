//! Bars: one per symbol, interval and bucket, replaced in place as trades come in, and 1 s
//! bars older than their retention gone once a newer one opens.

use std::{collections::BTreeSet, time::Duration};

use e2e::{Options, Pipeline, RedisKind};
use serde_json::Value;

use crate::support::{WAIT, limit_json};

async fn trade(p: &Pipeline, n: usize) {
    for (side, id) in [("sell", format!("s{n}")), ("buy", format!("b{n}"))] {
        let (status, body) = p
            .post_json("/v1/orders", &limit_json("AAPL", side, 172.50, 10, &id))
            .await;
        assert_eq!(status, 202, "{id}: {body}");
    }
}

async fn wait_trades(p: &Pipeline, trades: u64) {
    p.wait_until(WAIT, &format!("{trades} AAPL trades counted"), async || {
        p.stats("AAPL").await["trades"].as_u64() == Some(trades)
    })
    .await;
}

/// The bars of AAPL at `interval`, checked to hold one bar per bucket; with the sums of
/// their trades and volumes.
async fn bars(p: &Pipeline, interval: &str) -> (Vec<Value>, u64, u64) {
    let url = p.analytics_url(&format!("/v1/symbols/AAPL/bars?interval={interval}"));
    let (status, body) = p.get_json(&url).await;
    assert_eq!(status, 200, "{body}");
    let bars = body["bars"].as_array().expect("bars").clone();
    let starts: BTreeSet<u64> = bars
        .iter()
        .map(|b| b["start_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(starts.len(), bars.len(), "one bar per bucket: {bars:?}");
    let sum = |field: &str| bars.iter().map(|b| b[field].as_u64().unwrap()).sum::<u64>();
    let (trades, volume) = (sum("trades"), sum("volume"));
    (bars, trades, volume)
}

on_both_backends!(bars_are_replaced_in_place_and_age_out_when_a_newer_one_opens);

async fn bars_are_replaced_in_place_and_age_out_when_a_newer_one_opens(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "bars".into(),
        env: vec![("ANALYTICS_RETENTION_1S_MS".into(), "1000".into())],
        ..Options::default()
    })
    .await;

    // Three trades in quick succession: one or two 1 s buckets, each bar updated in place.
    for n in 0..3 {
        trade(&p, n).await;
    }
    wait_trades(&p, 3).await;
    let (_, trades, volume) = bars(&p, "1s").await;
    assert_eq!((trades, volume), (3, 30));
    let (_, trades, _) = bars(&p, "1m").await;
    assert_eq!(trades, 3);

    // Well past the retention, a new trade opens a new 1 s bar at least 2 s after the last
    // one: every older 1 s bar is now out of the retention and trimmed. 1 min bars stay.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    trade(&p, 3).await;
    wait_trades(&p, 4).await;
    p.wait_settled(WAIT).await;
    let (second_bars, trades, volume) = bars(&p, "1s").await;
    assert_eq!(
        (second_bars.len(), trades, volume),
        (1, 1, 10),
        "{second_bars:?}"
    );
    let (_, trades, volume) = bars(&p, "1m").await;
    assert_eq!((trades, volume), (4, 40));
    p.shutdown().await;
}
