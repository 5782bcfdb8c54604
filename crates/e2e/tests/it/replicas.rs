//! Replicas: two engines (and two transforms and analytics) split the partitions and
//! produce exactly what one engine produces; a replica stopped gracefully mid-flow hands
//! its partitions over without changing any trade.

use std::collections::{BTreeMap, BTreeSet};

use e2e::{MarketEvent, Options, Pipeline, RedisKind, Role, stage_status};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tickflow_proto::{topology, v1};

use crate::support::{
    ReportView, TradeView, WAIT, cancel, limit, market, report_view, tick, trade_view,
};

/// Symbols of the demo reference data: (symbol, tick in millionths, lot, starting mid in
/// ticks). They fall into every partition but 0 of 4.
pub(crate) const SYMBOLS: [(&str, i64, u64, i64); 8] = [
    ("AAPL", 10_000, 1, 17_250),
    ("MSFT", 10_000, 1, 40_000),
    ("NVDA", 10_000, 1, 12_000),
    ("TSLA", 10_000, 1, 25_000),
    ("AMZN", 10_000, 1, 18_000),
    ("ES", 250_000, 1, 21_600),
    ("BTC-USD", 500_000, 1, 130_000),
    ("EURUSD", 10, 1_000, 108_000),
];

/// Events per gRPC `Publish` call.
const CHUNK: usize = 25;

/// A deterministic flow of `count` events over [`SYMBOLS`]: limit orders around a
/// drifting mid that often cross, some market orders, cancels (of live, filled or
/// cancelled orders alike) and ticks.
pub(crate) fn flow(seed: u64, count: usize) -> Vec<v1::Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mids: Vec<i64> = SYMBOLS.iter().map(|s| s.3).collect();
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); SYMBOLS.len()];
    let mut events = Vec::with_capacity(count);
    for n in 0..count {
        let i = rng.random_range(0..SYMBOLS.len());
        let (symbol, tick_e6, lot, _) = SYMBOLS[i];
        mids[i] += rng.random_range(-1..=1);
        let price = |ticks: i64| (ticks * tick_e6) as f64 / 1e6;
        let qty = (rng.random_range(1..=40u64) * lot) as f64;
        let roll = rng.random_range(0..100);
        let event = if roll < 5 {
            tick(symbol, price(mids[i] + rng.random_range(-2..=2)), qty)
        } else if roll < 12 && !ids[i].is_empty() {
            let which = rng.random_range(0..ids[i].len());
            cancel(symbol, &ids[i][which])
        } else {
            let id = format!("{symbol}-{n}");
            ids[i].push(id.clone());
            let side = if rng.random_bool(0.5) {
                v1::Side::Buy
            } else {
                v1::Side::Sell
            };
            if roll < 20 {
                market(symbol, side, qty, &id)
            } else {
                // Buyers bid a little under to a little over the mid, sellers the reverse:
                // about a third of the orders cross.
                let offset = rng.random_range(-5..=2);
                let offset = if side == v1::Side::Buy {
                    offset
                } else {
                    -offset
                };
                limit(symbol, side, price(mids[i] + offset), qty, &id)
            }
        };
        events.push(event);
    }
    events
}

/// Sends `events` through gRPC `Publish`, in chunks, in order.
async fn send(p: &Pipeline, events: &[v1::Event]) {
    let mut grpc = p.grpc_client().await;
    for chunk in events.chunks(CHUNK) {
        let reply = grpc
            .publish(v1::PublishRequest {
                events: chunk.to_vec(),
            })
            .await
            .expect("Publish")
            .into_inner();
        assert_eq!(reply.accepted as usize, chunk.len());
    }
}

/// Trades and execution reports per symbol, in the order the engine wrote them.
#[derive(Debug, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) trades: BTreeMap<String, Vec<TradeView>>,
    pub(crate) reports: BTreeMap<String, Vec<ReportView>>,
}

pub(crate) async fn outcome(p: &Pipeline) -> Outcome {
    let mut trades: BTreeMap<String, Vec<TradeView>> = BTreeMap::new();
    let mut reports: BTreeMap<String, Vec<ReportView>> = BTreeMap::new();
    // A symbol's events are all in one partition: stream order is the order written.
    for (_, event) in p.market_events().await {
        match event {
            MarketEvent::Trade(t) => trades
                .entry(t.symbol.clone())
                .or_default()
                .push(trade_view(&t)),
            MarketEvent::Execution(r) => reports
                .entry(r.symbol.clone())
                .or_default()
                .push(report_view(&r)),
            MarketEvent::Tick(_) => {}
        }
    }
    Outcome { trades, reports }
}
/// The whole flow through a pipeline with one replica of everything.
pub(crate) async fn reference(events: &[v1::Event]) -> Outcome {
    let p = Pipeline::start_with(Options {
        name: "one-engine".into(),
        ..Options::default()
    })
    .await;
    send(&p, events).await;
    p.wait_settled(WAIT).await;
    let outcome = outcome(&p).await;
    p.shutdown().await;
    outcome
}

fn two_of_everything(name: &str, backend: RedisKind) -> Options {
    Options {
        backend,
        engines: 2,
        transforms: 2,
        analytics: 2,
        name: name.into(),
        ..Options::default()
    }
}

/// Checks the reference outcome is a meaningful one: every symbol traded.
pub(crate) fn assert_busy(outcome: &Outcome) {
    let traded: BTreeSet<&str> = outcome.trades.keys().map(String::as_str).collect();
    let all: BTreeSet<&str> = SYMBOLS.iter().map(|s| s.0).collect();
    assert_eq!(traded, all, "every symbol trades in the flow");
    let count: usize = outcome.trades.values().map(Vec::len).sum();
    assert!(count >= 50, "only {count} trades");
}

/// Each book numbers its events 1, 2, 3, … without gaps or repeats: the sequences of a
/// symbol's trades and reports, merged, in the order written, are exactly that.
#[track_caller]
fn assert_sequences(outcome: &Outcome) {
    for (symbol, reports) in &outcome.reports {
        let trades = outcome
            .trades
            .get(symbol)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut seqs: Vec<u64> = reports
            .iter()
            .map(|r| r.6)
            .chain(trades.iter().map(|t| t.5))
            .collect();
        seqs.retain(|s| *s != 0); // transform's rejections have no book sequence
        let in_order: Vec<u64> = reports.iter().map(|r| r.6).filter(|s| *s != 0).collect();
        if let Some(w) = in_order.windows(2).find(|w| w[1] <= w[0]) {
            panic!(
                "{symbol}: report sequence goes from {} to {}: the book restarted",
                w[0], w[1]
            );
        }
        seqs.sort_unstable();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{symbol}: book sequences are not 1..=n");
    }
}

/// Compares symbol by symbol, so that a failure shows the first difference.
#[track_caller]
pub(crate) fn assert_same(actual: &Outcome, expected: &Outcome) {
    let symbols: BTreeSet<&String> = actual.trades.keys().chain(expected.trades.keys()).collect();
    for symbol in symbols {
        let a = actual.trades.get(symbol).cloned().unwrap_or_default();
        let e = expected.trades.get(symbol).cloned().unwrap_or_default();
        if let Some(i) = (0..a.len().max(e.len())).find(|&i| a.get(i) != e.get(i)) {
            panic!(
                "{symbol}: trades differ from trade {i} on ({} vs {} trades)\n  got:      {:?}\n  expected: {:?}",
                a.len(),
                e.len(),
                &a[i.min(a.len())..a.len().min(i + 3)],
                &e[i.min(e.len())..e.len().min(i + 3)],
            );
        }
    }
    assert_eq!(actual.trades, expected.trades);
    assert_eq!(actual.reports, expected.reports);
    assert_sequences(actual);
}

on_both_backends!(two_engine_replicas_split_the_partitions_and_trade_like_one);

async fn two_engine_replicas_split_the_partitions_and_trade_like_one(backend: RedisKind) {
    let events = flow(7, 400);
    let expected = reference(&events).await;
    assert_busy(&expected);
    assert_sequences(&expected);

    let p = Pipeline::start_with(two_of_everything("two-engines", backend)).await;
    // Both replicas own partitions (start_with waited for the assignment to settle).
    let mut owned = BTreeSet::new();
    for index in 0..2 {
        let mine = p.owned_partitions(Role::Engine, index).await;
        assert!(!mine.is_empty(), "engine-{index} owns no partition");
        for partition in &mine {
            assert!(
                owned.insert(*partition),
                "partition {partition} owned twice"
            );
        }
    }
    assert_eq!(owned, p.keys().all_partitions().collect());

    send(&p, &events).await;
    p.wait_settled(WAIT).await;
    assert_same(&outcome(&p).await, &expected);

    // Both did work, and the partitions never moved.
    for index in 0..2 {
        let status = p.admin_status(Role::Engine, index).await;
        let processed = stage_status(&status, topology::ENGINE_GROUP)["counters"]["processed"]
            .as_u64()
            .unwrap();
        assert!(processed > 0, "engine-{index} processed nothing: {status}");
    }
    p.check_assignment().await.expect("the assignment held");
    // Analytics saw the same thing through two replicas.
    for symbol in ["AAPL", "NVDA", "ES"] {
        let stats = p.stats(symbol).await;
        let trades = expected.trades[symbol].len();
        let volume: u64 = expected.trades[symbol].iter().map(|t| t.2).sum();
        assert_eq!(stats["trades"], trades, "{symbol}: {stats}");
        assert_eq!(stats["volume"], volume, "{symbol}: {stats}");
    }
    p.shutdown().await;
}

on_both_backends!(an_engine_replica_stopped_mid_flow_hands_over_without_changing_a_trade);

async fn an_engine_replica_stopped_mid_flow_hands_over_without_changing_a_trade(
    backend: RedisKind,
) {
    let events = flow(11, 400);
    let expected = reference(&events).await;
    assert_busy(&expected);
    assert_sequences(&expected);

    let mut p = Pipeline::start_with(two_of_everything("handover", backend)).await;
    let (first, second) = events.split_at(events.len() / 2);
    send(&p, first).await;
    p.wait_settled(WAIT).await;

    // engine-1 owns partitions 1 and 3 (with resting orders); it stops gracefully and
    // engine-0 takes them over.
    assert!(!p.owned_partitions(Role::Engine, 1).await.is_empty());
    p.stop_replica(Role::Engine, 1)
        .await
        .expect("engine-1 stops cleanly");
    p.wait_for(WAIT, async || p.check_assignment().await).await;
    let owned = p.owned_partitions(Role::Engine, 0).await;
    assert_eq!(owned, p.keys().all_partitions().collect::<Vec<_>>());

    send(&p, second).await;
    p.wait_settled(WAIT).await;
    let actual = outcome(&p).await;
    assert_sequences(&actual);
    assert_same(&actual, &expected);
    p.shutdown().await;
}
