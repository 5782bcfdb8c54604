//! What both benchmarks share: the deterministic flow of orders and ticks, publishing it
//! through ingest's APIs at a pace, and tallying the execution reports that come back.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value as Json, json};
use tickflow_proto::{
    event_type,
    v1::{self, event::Kind, ingest_service_client::IngestServiceClient},
};

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
/// Price levels of the resting orders on each side of a book.
#[cfg(any(test, feature = "local-bench"))]
pub(crate) const RESTING_LEVELS: i64 = 20;

/// A deterministic flow over `markets`: limit orders between each market's low and high,
/// about half of them crossing, and one tick in ten at the reference price; which market
/// each event goes to is [`SymbolPicker`]'s choice with exponent `skew`. Order `i` is
/// `{id_prefix}{i}`.
pub(crate) fn flow(
    markets: &[Market],
    events: u64,
    seed: u64,
    skew: f64,
    id_prefix: &str,
) -> Vec<v1::Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut picker = SymbolPicker::new(markets.len(), skew, seed);
    (0..events)
        .map(|i| {
            let market = &markets[picker.pick(i)];
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

/// Which market each event of a flow goes to. With a skew S > 0, a Zipf distribution over
/// the markets' ranks, the first the hottest: the market of rank k (1-based) is picked with
/// probability proportional to 1/k^S (S = 1, the default of `--skew`, gives 16 markets'
/// first 30 % of the events and 10,000 markets' first 10 %, their first 100 half); the
/// draws come from a random stream of their own, so the orders' sides, prices and sizes do
/// not depend on the skew. With S = 0, every market in turn (round robin), as the flow
/// always did. (`rand_distr`'s Zipf is not in the tree; the inverse of the cumulative
/// distribution over at most 10,000 ranks is exact, and a binary search per event.)
pub(crate) struct SymbolPicker {
    count: usize,
    /// Cumulative weights by rank (empty: round robin).
    cumulative: Vec<f64>,
    rng: StdRng,
}

impl SymbolPicker {
    /// A picker over `count` (≥ 1) markets with exponent `skew` (finite, ≥ 0).
    pub(crate) fn new(count: usize, skew: f64, seed: u64) -> Self {
        let cumulative = if skew > 0.0 {
            let mut total = 0.0;
            (1..=count)
                .map(|rank| {
                    total += (rank as f64).powf(-skew);
                    total
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            count,
            cumulative,
            // Its own stream: a fixed odd constant apart from the flow's seed.
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The market (index) of event `i`.
    pub(crate) fn pick(&mut self, i: u64) -> usize {
        let Some(total) = self.cumulative.last() else {
            return (i % self.count as u64) as usize;
        };
        let u = self.rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c <= u)
            .min(self.count - 1)
    }
}

/// `count` resting limit orders `{id_prefix}{j}`, spread over `markets` in turn, buys and
/// sells alternating on each, priced outside every price the flow uses (buys from the
/// market's `low` - 1 down, sells from its `high` + 1 up, over [`RESTING_LEVELS`] levels):
/// they never trade, with each other or with the flow, and make the books deep.
#[cfg(any(test, feature = "local-bench"))]
pub(crate) fn resting_orders(markets: &[Market], count: u64, id_prefix: &str) -> Vec<v1::Event> {
    let n = markets.len() as u64;
    (0..count)
        .map(|j| {
            let market = &markets[(j % n) as usize];
            let round = j / n;
            let buy = (round + j % n).is_multiple_of(2);
            let level = (round / 2) as i64 % RESTING_LEVELS;
            let ticks = if buy {
                (market.low - 1 - level).max(1)
            } else {
                market.high + 1 + level
            };
            v1::Event {
                kind: Some(Kind::NewOrder(v1::NewOrder {
                    symbol: market.symbol.clone(),
                    side: if buy { v1::Side::Buy } else { v1::Side::Sell } as i32,
                    r#type: v1::OrderType::Limit as i32,
                    price: market.price(ticks),
                    qty: market.lot as f64,
                    client_order_id: format!("{id_prefix}{j}"),
                })),
            }
        })
        .collect()
}

/// What a latency histogram (bucket floor → count) gained from `before` to `after`.
pub(crate) fn histogram_since(
    before: &std::collections::BTreeMap<u64, u64>,
    mut after: std::collections::BTreeMap<u64, u64>,
) -> std::collections::BTreeMap<u64, u64> {
    for (bucket, count) in before {
        if let Some(now) = after.get_mut(bucket) {
            *now = now.saturating_sub(*count);
        }
    }
    after.retain(|_, count| *count > 0);
    after
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

/// Sends `events` in chunks of `chunk`, at `rate` events/s (0: as fast as `send` goes).
pub(crate) async fn paced<F, Fut>(
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let events = flow(std::slice::from_ref(&market), 1_000, 7, 1.0, "bench-r-");
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

    fn markets(count: usize) -> Vec<Market> {
        (0..count)
            .map(|i| Market {
                symbol: format!("M{i}"),
                tick_e6: 10_000,
                reference: 10_000 + i as i64 * 1_000,
                low: 10_000 + i as i64 * 1_000 - PRICE_SPREAD_TICKS,
                high: 10_000 + i as i64 * 1_000 + PRICE_SPREAD_TICKS,
                lot: 1,
                max_lots: MAX_LOTS,
            })
            .collect()
    }

    /// How many of `draws` picks land on each market.
    fn picks(count: usize, skew: f64, draws: u64) -> Vec<u64> {
        let mut picker = SymbolPicker::new(count, skew, 42);
        let mut seen = vec![0u64; count];
        for i in 0..draws {
            seen[picker.pick(i)] += 1;
        }
        seen
    }

    #[test]
    fn without_skew_every_symbol_gets_its_turn() {
        assert_eq!(picks(4, 0.0, 10), [3, 3, 2, 2]);
    }

    #[test]
    fn the_zipf_picker_follows_one_over_rank_to_the_skew() {
        let draws = 400_000;
        for (count, skew) in [(16, 1.0), (10_000, 1.0), (50, 2.0)] {
            let seen = picks(count, skew, draws);
            let norm: f64 = (1..=count).map(|k| (k as f64).powf(-skew)).sum();
            // The hottest ranks within 3 % of their expected share (each expected count is
            // thousands, its standard deviation ~1 %).
            for rank in [1usize, 2, 3, 10] {
                let expected = draws as f64 * (rank as f64).powf(-skew) / norm;
                let got = seen[rank - 1] as f64;
                assert!(
                    (got - expected).abs() < 0.03 * expected,
                    "{count} symbols, skew {skew}, rank {rank}: {got} against {expected}"
                );
            }
            assert_eq!(seen.iter().sum::<u64>(), draws);
        }
        // The default over 10,000 symbols: a long tail, most symbols picked at all.
        let seen = picks(10_000, 1.0, draws);
        assert!(seen.iter().filter(|c| **c > 0).count() > 9_000);
        assert!(seen[9_999] < seen[0] / 1_000);
    }

    #[test]
    fn the_flow_is_the_same_for_the_same_seed_and_its_prices_do_not_depend_on_the_skew() {
        let markets = markets(100);
        let a = flow(&markets, 1_000, 3, 1.0, "o");
        assert_eq!(a, flow(&markets, 1_000, 3, 1.0, "o"));
        let b = flow(&markets, 1_000, 3, 0.0, "o");
        let offsets = |events: &[v1::Event]| -> Vec<(i32, i64)> {
            events
                .iter()
                .filter_map(|e| match &e.kind {
                    Some(Kind::NewOrder(o)) => {
                        let m = markets.iter().find(|m| m.symbol == o.symbol).unwrap();
                        Some((o.side, (o.price * 100.0).round() as i64 - m.reference))
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(offsets(&a), offsets(&b));
        assert_ne!(a, b, "the symbols differ");
    }

    #[test]
    fn resting_orders_spread_over_the_symbols_and_never_cross_the_flow_or_each_other() {
        let markets = markets(3);
        let resting = resting_orders(&markets, 300, "r");
        assert_eq!(order_ids(&resting).len(), 300);
        let mut per_symbol = HashMap::<String, (i64, i64, u32, u32)>::new();
        for event in &resting {
            let Some(Kind::NewOrder(o)) = &event.kind else {
                panic!("only orders")
            };
            let m = markets.iter().find(|m| m.symbol == o.symbol).unwrap();
            let ticks = (o.price * 100.0).round() as i64;
            let entry = per_symbol
                .entry(o.symbol.clone())
                .or_insert((i64::MIN, i64::MAX, 0, 0));
            if o.side == v1::Side::Buy as i32 {
                assert!(ticks < m.low, "{o:?}");
                entry.0 = entry.0.max(ticks);
                entry.2 += 1;
            } else {
                assert!(ticks > m.high, "{o:?}");
                entry.1 = entry.1.min(ticks);
                entry.3 += 1;
            }
        }
        assert_eq!(per_symbol.len(), 3);
        for (symbol, (best_bid, best_ask, buys, sells)) in per_symbol {
            assert!(best_bid < best_ask, "{symbol}");
            assert_eq!((buys, sells), (50, 50), "{symbol}");
        }
    }

    #[test]
    fn a_histogram_since_is_what_it_gained() {
        let before = std::collections::BTreeMap::from([(100, 5), (200, 1)]);
        let after = std::collections::BTreeMap::from([(100, 7), (200, 1), (400, 3)]);
        assert_eq!(
            histogram_since(&before, after),
            std::collections::BTreeMap::from([(100, 2), (400, 3)])
        );
    }
}
