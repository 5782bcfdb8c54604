//! The per-partition layout: figures left by the earlier per-symbol layout are merged by the
//! replica that takes the partition over and written by its first commit, nothing lost or
//! counted twice; closed bars go to per-epoch sets that are deleted whole once out of the
//! retention; a late trade changes the closed bar of its time.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use analytics::{
    AnalyticsConfig,
    aggregate::{AnalyticsKeys, Bar, Interval, SymbolStats},
};
use prost::Message;
use streams_core::{App, Env, Envelope, KeySpace, Partition, testing::RedisServer};
use tickflow_proto::{event_type as types, topology, v1};
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 4;
/// 1 s bars are kept 5 s back from the partition's newest bar.
const RETENTION_1S_MS: u64 = 5_000;

struct Analytics {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(server: &RedisServer, namespace: &str) -> Analytics {
    let shutdown = CancellationToken::new();
    let env = Env::from_pairs([
        ("REDIS_URL", server.url()),
        ("TICKFLOW_NAMESPACE", namespace.to_owned()),
        ("TICKFLOW_PARTITIONS", PARTITIONS.to_string()),
        ("TICKFLOW_BLOCK_MS", "200".into()),
        ("CONSUMER_NAME", "analytics-0".into()),
        ("ANALYTICS_RETENTION_1S_MS", RETENTION_1S_MS.to_string()),
    ]);
    let settings = AnalyticsConfig::from_env(&env).unwrap();
    let app = App::init("analytics", env, "127.0.0.1:0", shutdown.clone()).unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let task = tokio::spawn(analytics::run(app, settings, http));
    Analytics { shutdown, task }
}

impl Analytics {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn bar(t: u64, o: i64, h: i64, l: i64, c: i64, v: u64, n: u64) -> Bar {
    Bar {
        t,
        o,
        h,
        l,
        c,
        v,
        n,
    }
}

/// A `trade` entry of `symbol` whose origin is `at_ms`.
async fn trade(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
    symbol: &str,
    at_ms: u64,
    price_e6: i64,
    qty: u64,
) {
    let trade = v1::Trade {
        symbol: symbol.into(),
        price_e6,
        qty,
        ..Default::default()
    };
    let mut envelope = Envelope::new(types::TRADE, symbol, trade.encode_to_vec());
    envelope.origin_us = at_ms * 1_000;
    let stream = keys.stream(topology::MARKET, keys.partition_for(symbol.as_bytes()));
    let mut xadd = redis::cmd("XADD");
    xadd.arg(stream).arg("*");
    for (name, value) in envelope.to_fields() {
        xadd.arg(name).arg(value);
    }
    let _: String = xadd.query_async(conn).await.unwrap();
}

async fn stats(redis: &streams_core::Redis, keys: &AnalyticsKeys, symbol: &str) -> SymbolStats {
    let mut conn = redis.pooled().await.unwrap();
    keys.symbol_stats(&mut *conn, symbol).await.unwrap()
}

async fn bars(
    redis: &streams_core::Redis,
    keys: &AnalyticsKeys,
    symbol: &str,
    interval: Interval,
) -> Vec<Bar> {
    let mut conn = redis.pooled().await.unwrap();
    let retention = match interval {
        Interval::Second => RETENTION_1S_MS,
        Interval::Minute => 7 * 86_400_000,
    };
    keys.symbol_bars(&mut *conn, symbol, interval, (0, u64::MAX / 2), retention)
        .await
        .unwrap()
}

/// Waits until `symbol` has `trades` trades counted (committed).
async fn wait_trades(redis: &streams_core::Redis, keys: &AnalyticsKeys, symbol: &str, trades: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(redis, keys, symbol).await.trades != trades {
        assert!(Instant::now() < deadline, "{symbol}: {trades} trades");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn keys_of(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Two symbols of one partition.
fn two_symbols(keys: &KeySpace) -> (Partition, String, String) {
    let partition = keys.partition_for(b"AAPL");
    let other = (0..)
        .map(|i| format!("S{i}"))
        .find(|s| keys.partition_for(s.as_bytes()) == partition)
        .expect("a symbol in the same partition");
    (partition, "AAPL".to_owned(), other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_of_the_per_symbol_layout_are_merged_and_kept_through_a_takeover() {
    let server = RedisServer::start();
    let mut conn = server.connect().await;
    let redis = streams_core::Redis::new(&server.url(), 2).unwrap();
    let namespace = streams_core::testing::unique_namespace("analytics-layout");
    let space = KeySpace::new(namespace.as_str(), PARTITIONS);
    let keys = AnalyticsKeys::new(space.clone());
    let (partition, traded, quiet) = two_symbols(&space);
    let state = |name: &str| space.partition_state(topology::ANALYTICS_GROUP, name, partition);

    // Layout 1, as the earlier version left it: a statistics hash per symbol, a bar set per
    // symbol and interval (three 1 s bars, one 1 min bar), the partition's histogram.
    let t0 = 1_800_000_000_000u64; // a minute's start
    let old_second = [
        bar(t0, 100, 110, 90, 105, 30, 3),
        bar(t0 + 1_000, 105, 120, 105, 120, 10, 1),
        bar(t0 + 2_000, 120, 120, 118, 118, 20, 2),
    ];
    let old_minute = bar(t0, 100, 120, 90, 118, 60, 6);
    let mut pipe = redis::pipe();
    pipe.cmd("HSET").arg(keys.legacy_stats(&traded)).arg(&[
        ("trades", "6"),
        ("volume", "60"),
        ("notional", "6.5"),
        ("last_price_e6", "118"),
        ("ticks", "2"),
        ("last_tick_price_e6", "119"),
        ("exec_filled", "6"),
        ("exec_accepted", "8"),
    ]);
    pipe.cmd("HSET").arg(keys.legacy_stats(&quiet)).arg(&[
        ("trades", "0"),
        ("ticks", "4"),
        ("last_tick_price_e6", "7"),
    ]);
    for b in &old_second {
        pipe.cmd("ZADD")
            .arg(keys.legacy_bars(&traded, Interval::Second))
            .arg(b.t)
            .arg(serde_json::to_string(b).unwrap());
    }
    pipe.cmd("ZADD")
        .arg(keys.legacy_bars(&traded, Interval::Minute))
        .arg(old_minute.t)
        .arg(serde_json::to_string(&old_minute).unwrap());
    pipe.cmd("HSET")
        .arg(keys.legacy_latency(partition))
        .arg(&[(1000, 5), (2000, 1)]);
    let () = pipe.query_async(&mut conn).await.unwrap();

    // Before any replica ran: the readers answer from layout 1.
    let before = stats(&redis, &keys, &traded).await;
    assert_eq!(
        (
            before.trades,
            before.volume,
            before.ticks,
            before.last_price_e6
        ),
        (6, 60, 2, Some(118))
    );
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        old_second
    );

    // A replica takes the partition over; a trade in the newest 1 s bucket, then one in the
    // next: the first joins layout 1's newest bar, the second closes it.
    let analytics = start(&server, &namespace).await;
    trade(&mut conn, &space, &traded, t0 + 2_500, 121, 5).await;
    wait_trades(&redis, &keys, &traded, 7).await;
    // The first commit wrote the merge: layout 1's statistics and histogram are gone, its
    // newest bars were taken (the older ones stay in their set, named in the index).
    for gone in [keys.legacy_stats(&traded), keys.legacy_stats(&quiet)] {
        assert!(keys_of(&mut conn, &gone).await.is_empty(), "{gone} is left");
    }
    assert!(
        keys_of(&mut conn, &keys.legacy_latency(partition))
            .await
            .is_empty()
    );
    let legacy_left: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.legacy_bars(&traded, Interval::Second))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(legacy_left.len(), 2, "{legacy_left:?}");
    assert!(
        keys_of(&mut conn, &keys.legacy_bars(&traded, Interval::Minute))
            .await
            .is_empty()
    );
    let index: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(keys.legacy_bars_index(partition))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(index, [(format!("1s {traded}"), t0 + 1_000)].into());

    let after = stats(&redis, &keys, &traded).await;
    assert_eq!(
        (
            after.trades,
            after.volume,
            after.notional,
            after.last_price_e6
        ),
        (7, 65, 6.5 + 121e-6 * 5.0, Some(121))
    );
    assert_eq!((after.ticks, after.last_tick_price_e6), (2, Some(119)));
    assert_eq!(
        after.executions,
        [("accepted".to_owned(), 8), ("filled".to_owned(), 6)].into()
    );
    let quiet_stats = stats(&redis, &keys, &quiet).await;
    assert_eq!(
        (quiet_stats.ticks, quiet_stats.last_tick_price_e6),
        (4, Some(7))
    );
    let mut expected_second = old_second.to_vec();
    expected_second[2] = bar(t0 + 2_000, 120, 121, 118, 121, 25, 3);
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        expected_second
    );
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Minute).await,
        [bar(t0, 100, 121, 90, 121, 65, 7)]
    );
    let histogram = keys.latency_histogram(&mut conn).await.unwrap();
    assert_eq!(histogram[&1000], 5);
    assert_eq!(histogram.values().sum::<u64>(), 7, "{histogram:?}");

    trade(&mut conn, &space, &traded, t0 + 3_100, 119, 1).await;
    wait_trades(&redis, &keys, &traded, 8).await;
    expected_second.push(bar(t0 + 3_000, 119, 119, 119, 119, 1, 1));
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        expected_second
    );

    // A late trade (its origin in the bucket that just closed) changes that closed bar.
    trade(&mut conn, &space, &traded, t0 + 2_900, 122, 2).await;
    wait_trades(&redis, &keys, &traded, 9).await;
    expected_second[2] = bar(t0 + 2_000, 120, 122, 118, 122, 27, 4);
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        expected_second
    );

    // Another replica takes over (this one stopped): a late trade to a bar it does not hold
    // reads it first, from layout 1's set, and moves it into the closed bars.
    analytics.stop().await;
    let analytics = start(&server, &namespace).await;
    trade(&mut conn, &space, &traded, t0 + 1_500, 110, 4).await;
    wait_trades(&redis, &keys, &traded, 10).await;
    expected_second[1] = bar(t0 + 1_000, 105, 120, 105, 110, 14, 2);
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        expected_second
    );
    let legacy_left: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.legacy_bars(&traded, Interval::Second))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(legacy_left.len(), 1, "{legacy_left:?}");

    // Much later: everything older than the retention goes, the closed-bar set of the old
    // epoch and layout 1's set with it; the query shows the retention back from the newest.
    let later = t0 + 30 * 60_000;
    trade(&mut conn, &space, &traded, later, 130, 1).await;
    trade(&mut conn, &space, &traded, later + 1_000, 131, 1).await;
    wait_trades(&redis, &keys, &traded, 12).await;
    assert_eq!(
        bars(&redis, &keys, &traded, Interval::Second).await,
        [
            bar(later, 130, 130, 130, 130, 1, 1),
            bar(later + 1_000, 131, 131, 131, 131, 1, 1)
        ]
    );
    assert!(
        keys_of(&mut conn, &keys.legacy_bars(&traded, Interval::Second))
            .await
            .is_empty()
    );
    let closed_sets = keys_of(&mut conn, &format!("{}*", state("closed_bars:1s:"))).await;
    assert_eq!(
        closed_sets,
        [keys.closed_bars(
            partition,
            Interval::Second,
            later / Interval::Second.epoch_ms()
        )]
    );
    let epochs: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.closed_bar_epochs(partition))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !epochs.contains(&format!("1s {}", t0 / Interval::Second.epoch_ms())),
        "{epochs:?}"
    );
    let index: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(keys.legacy_bars_index(partition))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(index.is_empty(), "{index:?}");
    analytics.stop().await;
}
