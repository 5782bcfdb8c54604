//! `tickflow bench --attach`: the benchmark against a pipeline that is already running
//! (docker compose, Kubernetes, `make run`), starting nothing.
//!
//! - Where: `REDIS_URL`, `TICKFLOW_NAMESPACE` and `TICKFLOW_PARTITIONS` name the pipeline's
//!   Redis, key prefix and partitions (read as every service reads them); ingest is at
//!   `--grpc URL` (default `INGEST_GRPC`, as for `tickflow load`, else
//!   `http://127.0.0.1:50051`) or, with `--via http`, at `--http URL` (default
//!   `http://127.0.0.1:8080`).
//! - First it checks that analytics reads every market stream of those partitions and of
//!   no more, so that a wrong `TICKFLOW_PARTITIONS` is a clear error, not a run that waits
//!   on the wrong streams.
//! - It trades the pipeline's own instruments (the first `--symbols` of its reference
//!   data, by symbol) around the engine's reference price (the last trade or tick), within
//!   their tick, lot, static limits and price band, under client order ids
//!   `bench-<run>-<n>`. `<run>` is printed
//!   at the start.
//! - It reads the market streams through a consumer group of its own,
//!   `tickflow-bench-<run>`, created before the first order: with NOACK nothing is left
//!   pending, and safe trimming keeps every entry it has not read yet. The group is removed
//!   at the end, on an error and on Ctrl-C.
//! - It waits until every order has its accept/reject report and analytics has committed
//!   the last entry of the run on each partition (not until the whole pipeline is idle:
//!   other traffic may go on), or gives up after a deadline (`timed_out` in the report).
//! - Latency is what analytics' histogram gained over the run: the run's own market
//!   entries, plus whatever other traffic the pipeline carried meanwhile.
//! - At the end it cancels the run's orders still resting in the books, so that the
//!   benchmark does not leave them to trade against real flow.
//! - The services' CPU and memory are not measured in this mode: they may run on other
//!   machines. Redis's CPU is (INFO), with everything else it did meanwhile.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use redis::{Value, aio::MultiplexedConnection};
use serde_json::json;
use streams_core::{KeySpace, RawEntry};
use tickflow_proto::{topology, v1};
use tokio_util::task::AbortOnDropHandle;
use transform::refdata::Instrument;

use crate::bench::{
    self, BenchOptions, MAX_LOTS, Market, PRICE_SPREAD_TICKS, Tally, Via, flow, order_ids,
};

/// How long the run may take, beyond publishing, to be reported and analysed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the resting orders' cancels may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries per stream per read.
const READ_COUNT: usize = 2_000;

/// Runs the attached benchmark and prints its report.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let config = streams_core::Config::from_env(&streams_core::Env::process(), "127.0.0.1:0")?;
    let keys = config.keys.clone();
    let mut conn = streams_core::testing::connect(&config.redis_url)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                streams_core::config::redact(&config.redis_url)
            )
        })?;
    check_partitions(&mut conn, &keys).await?;
    let markets = markets(&mut conn, &config.redis_url, &keys, options.symbols).await?;
    let target = match options.via {
        Via::Http => options
            .http
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8080".into()),
        _ => options
            .grpc
            .clone()
            .or_else(|| std::env::var("INGEST_GRPC").ok())
            .unwrap_or_else(|| "http://127.0.0.1:50051".into()),
    };
    let run_id = format!("{:08x}", rand::random::<u32>());
    let run = Run {
        group: format!("tickflow-bench-{run_id}"),
        prefix: format!("bench-{run_id}-"),
        streams: keys
            .all_partitions()
            .map(|p| keys.stream(topology::MARKET, p))
            .collect(),
        keys,
        target,
        run_id,
    };
    eprintln!(
        "tickflow bench --attach: run {} against {} ({} partitions of {:?}), orders {}<n>, group {}",
        run.run_id,
        run.target,
        run.streams.len(),
        run.keys.namespace(),
        run.prefix,
        run.group
    );
    run.create_groups(&mut conn).await?;
    let outcome = tokio::select! {
        outcome = run.measure(&options, &markets, &mut conn) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!(
            "interrupted: orders {}* may still rest in the books", run.prefix
        )),
    };
    // Removed whatever happened; a connection that was mid-command is replaced.
    let mut cleanup = streams_core::testing::connect(&config.redis_url).await?;
    let removed = run.destroy_groups(&mut cleanup).await;
    let result = outcome?;
    removed?;
    bench::print_result(&options, &result);
    let (lost, duplicated) = (result["lost"].as_u64(), result["duplicated"].as_u64());
    if lost != Some(0) || duplicated != Some(0) {
        bail!("{lost:?} orders lost and {duplicated:?} duplicated");
    }
    if result["timed_out"] == true {
        bail!(
            "the pipeline did not report every order and analyse the run within the deadline \
             (are all four services running? their /admin/status shows each stage's backlog)"
        );
    }
    Ok(())
}

/// One attached run.
struct Run {
    run_id: String,
    /// The consumer group the run reads the market streams through.
    group: String,
    /// Its orders' client order id prefix.
    prefix: String,
    keys: KeySpace,
    /// The market streams, by partition.
    streams: Vec<String>,
    /// Ingest's URL.
    target: String,
}

/// What the run read so far.
#[derive(Default)]
struct Seen {
    tally: Tally,
    /// Per market stream, the id of the last entry with a report of the run.
    last_ours: HashMap<usize, StreamId>,
}

/// A stream entry id, ordered as Redis orders them.
type StreamId = (u64, u64);

fn parse_id(id: &str) -> Option<StreamId> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl Run {
    async fn measure(
        &self,
        options: &BenchOptions,
        markets: &[Market],
        conn: &mut MultiplexedConnection,
    ) -> anyhow::Result<serde_json::Value> {
        let analytics = analytics::aggregate::AnalyticsKeys::new(self.keys.clone());
        let histogram_before = analytics.latency_histogram(conn).await?;
        let redis_cpu_before = bench::redis_cpu(conn).await?;
        let events = flow(markets, options.events, options.seed, &self.prefix);
        let orders = order_ids(&events);
        let mut seen = Seen::default();

        let started = Instant::now();
        // Stopped with the run (an error, Ctrl-C), not left publishing.
        let mut publisher = AbortOnDropHandle::new(tokio::spawn(publish(
            options.via,
            self.target.clone(),
            events,
            options.rate,
        )));
        // A read is never abandoned half way: with NOACK, what Redis delivered to a read
        // nobody waits for any more would be gone for the run.
        while !publisher.is_finished() {
            self.read(conn, &mut seen, Some(Duration::from_millis(20)))
                .await?;
        }
        let accepted = (&mut publisher).await??;
        let published = started.elapsed();
        let deadline =
            Instant::now() + SETTLE_TIMEOUT + Duration::from_secs(options.events / 2_000);
        let mut timed_out = false;
        while !(seen.tally.decided(&orders) && self.analytics_past(conn, &seen.last_ours).await?) {
            if Instant::now() > deadline {
                timed_out = true;
                break;
            }
            self.read(conn, &mut seen, Some(Duration::from_millis(5)))
                .await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let redis_cpu = bench::redis_cpu(conn).await? - redis_cpu_before;
        let mut histogram = analytics.latency_histogram(conn).await?;
        for (bucket, count) in &histogram_before {
            if let Some(after) = histogram.get_mut(bucket) {
                *after = after.saturating_sub(*count);
            }
        }
        // What else the streams hold by now (a late duplicate counts), within reason when
        // other traffic goes on.
        for _ in 0..100 {
            if self.read(conn, &mut seen, None).await? == 0 {
                break;
            }
        }
        let (lost, duplicated, rejected, first_rejection) = (
            seen.tally.lost(&orders),
            seen.tally.duplicated(),
            seen.tally.rejected,
            seen.tally.first_rejection.clone(),
        );
        let (resting_cancelled, left_resting) =
            self.cancel_resting(options.via, conn, &mut seen).await?;

        Ok(json!({
            "mode": "attach",
            "run": self.run_id,
            "target": self.target,
            "events": options.events,
            "accepted": accepted,
            "via": options.via.name(),
            "rate": if options.rate == 0 { json!("max") } else { json!(options.rate) },
            "partitions": self.streams.len(),
            "symbols": markets.iter().map(|m| m.symbol.as_str()).collect::<Vec<_>>(),
            "publish_seconds": published.as_secs_f64(),
            "seconds": seconds,
            "events_per_sec": accepted as f64 / seconds,
            "latency_us": bench::latency_json(&histogram),
            "redis_cpu_seconds": redis_cpu,
            "rejected": rejected,
            "first_rejection": first_rejection,
            "lost": lost,
            "duplicated": duplicated,
            "timed_out": timed_out,
            "resting_cancelled": resting_cancelled,
            "left_resting": left_resting,
        }))
    }

    /// One read of every market stream through the run's group (blocking up to `block`,
    /// or not at all); tallies the run's reports. Returns how many entries it read.
    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        seen: &mut Seen,
        block: Option<Duration>,
    ) -> anyhow::Result<usize> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg("bench")
            .arg("COUNT")
            .arg(READ_COUNT);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("NOACK").arg("STREAMS").arg(&self.streams);
        for _ in &self.streams {
            cmd.arg(">");
        }
        let reply: Value = cmd.query_async(conn).await?;
        let mut read = 0;
        for (key, entries) in stream_replies(reply)? {
            let Some(index) = self.streams.iter().position(|s| *s == key) else {
                continue;
            };
            read += entries.len();
            for entry in entries {
                let mut ours = false;
                for report in bench::reports_in(&entry)? {
                    if report.client_order_id.starts_with(&self.prefix) {
                        seen.tally.add(&report);
                        ours = true;
                    }
                }
                if ours && let Some(id) = parse_id(&entry.id) {
                    seen.last_ours.insert(index, id);
                }
            }
        }
        Ok(read)
    }

    /// Whether analytics has committed every market entry up to the run's last one on each
    /// partition: its group has been delivered past it and holds nothing pending at or
    /// before it.
    async fn analytics_past(
        &self,
        conn: &mut MultiplexedConnection,
        last_ours: &HashMap<usize, StreamId>,
    ) -> anyhow::Result<bool> {
        let mut pipe = redis::pipe();
        let mut checked = Vec::new();
        for (index, (ms, seq)) in last_ours {
            let stream = &self.streams[*index];
            pipe.cmd("XINFO").arg("GROUPS").arg(stream);
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(topology::ANALYTICS_GROUP)
                .arg("-")
                .arg(format!("{ms}-{seq}"))
                .arg(1);
            checked.push((*ms, *seq));
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        for (pair, last) in replies.chunks(2).zip(checked) {
            let delivered = streams_core::xinfo_records(pair[0].clone())
                .into_iter()
                .find(|g| g.get("name").map(String::as_str) == Some(topology::ANALYTICS_GROUP))
                .and_then(|g| g.get("last-delivered-id").and_then(|id| parse_id(id)));
            let pending = matches!(&pair[1], Value::Array(items) if !items.is_empty());
            if delivered.is_none_or(|d| d < last) || pending {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Cancels the run's orders that still rest and waits for their reports. Returns how
    /// many it cancelled and how many still rest.
    async fn cancel_resting(
        &self,
        via: Via,
        conn: &mut MultiplexedConnection,
        seen: &mut Seen,
    ) -> anyhow::Result<(usize, usize)> {
        let cancels: Vec<v1::Event> = seen
            .tally
            .resting
            .iter()
            .map(|(id, symbol)| v1::Event {
                kind: Some(v1::event::Kind::Cancel(v1::CancelOrder {
                    symbol: symbol.clone(),
                    client_order_id: id.clone(),
                })),
            })
            .collect();
        let count = cancels.len();
        if count > 0 {
            publish(via, self.target.clone(), cancels, 0).await?;
        }
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        while !seen.tally.resting.is_empty() && Instant::now() < deadline {
            self.read(conn, seen, Some(Duration::from_millis(20)))
                .await?;
        }
        Ok((count, seen.tally.resting.len()))
    }

    async fn create_groups(&self, conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
        for stream in &self.streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&self.group)
                .arg("$")
                .query_async(conn)
                .await;
            if let Err(e) = created {
                let _ = self.destroy_groups(conn).await;
                return Err(e)
                    .with_context(|| format!("creating group {} on {stream}", self.group));
            }
        }
        Ok(())
    }

    async fn destroy_groups(&self, conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for stream in &self.streams {
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(stream)
                .arg(&self.group)
                .ignore();
        }
        let _: () = pipe.query_async(conn).await.with_context(|| {
            format!("removing group {} (XGROUP DESTROY it by hand)", self.group)
        })?;
        Ok(())
    }
}

/// Publishes through ingest's API; returns how many events it accepted.
async fn publish(
    via: Via,
    target: String,
    events: Vec<v1::Event>,
    rate: u64,
) -> anyhow::Result<u64> {
    match via {
        Via::Http => bench::publish_http(&target, events, rate).await,
        _ => bench::publish_grpc(&target, events, rate).await,
    }
}

/// An XREADGROUP reply (RESP2 `[[key, entries], …]` or a RESP3 map; nil when nothing came)
/// as (key, entries) pairs.
fn stream_replies(reply: Value) -> anyhow::Result<Vec<(String, Vec<RawEntry>)>> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    Some((pair.next()?, pair.next()?))
                }
                _ => None,
            })
            .collect(),
        other => bail!("unexpected XREADGROUP reply {other:?}"),
    };
    pairs
        .into_iter()
        .map(|(key, entries)| {
            let key: String = redis::from_redis_value(key)?;
            Ok((key, streams_core::parse_entries(entries)?))
        })
        .collect()
}

/// Checks that analytics reads the market stream of every partition `keys` names, and that
/// the pipeline has no more partitions than that.
async fn check_partitions(conn: &mut MultiplexedConnection, keys: &KeySpace) -> anyhow::Result<()> {
    let partitions = keys.partitions();
    let mut pipe = redis::pipe();
    // One past the last: it must not be read, or the pipeline has more partitions.
    for p in 0..=partitions {
        pipe.cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.stream(topology::MARKET, p));
    }
    let replies: Vec<redis::RedisResult<Value>> = pipe.ignore_errors().query_async(conn).await?;
    let read_by_analytics: Vec<bool> = replies
        .into_iter()
        .map(|reply| {
            reply.is_ok_and(|groups| {
                streams_core::xinfo_records(groups)
                    .iter()
                    .any(|g| g.get("name").map(String::as_str) == Some(topology::ANALYTICS_GROUP))
            })
        })
        .collect();
    let namespace = keys.namespace();
    if let Some(p) = read_by_analytics[..partitions as usize]
        .iter()
        .position(|r| !r)
    {
        bail!(
            "analytics does not read {}: is a pipeline running with TICKFLOW_NAMESPACE={namespace} \
             and TICKFLOW_PARTITIONS={partitions} on this REDIS_URL?",
            keys.stream(topology::MARKET, p as u32)
        );
    }
    if read_by_analytics[partitions as usize] {
        bail!(
            "the pipeline in {namespace:?} has more than TICKFLOW_PARTITIONS={partitions} partitions \
             (analytics reads {}): set TICKFLOW_PARTITIONS to the pipeline's",
            keys.stream(topology::MARKET, partitions)
        );
    }
    Ok(())
}

/// The first `count` instruments of the pipeline's reference data, by symbol, with prices
/// around the engine's reference price (its last trade or tick: what its price band is
/// centred on).
async fn markets(
    conn: &mut MultiplexedConnection,
    redis_url: &str,
    keys: &KeySpace,
    count: usize,
) -> anyhow::Result<Vec<Market>> {
    let instruments: BTreeMap<String, Instrument> = transform::refdata::read_stored(conn, keys)
        .await?
        .into_iter()
        .collect();
    if instruments.is_empty() {
        bail!(
            "no instruments in {}: load the pipeline's reference data first \
             (transform load-refdata FILE)",
            keys.global("instruments")
        );
    }
    let redis = streams_core::Redis::new(redis_url, 1)?;
    let mut books = HashMap::new();
    let mut markets = Vec::new();
    for instrument in instruments.into_values().take(count) {
        let partition = keys.partition_for(instrument.symbol.as_bytes());
        let books = match books.entry(partition) {
            std::collections::hash_map::Entry::Occupied(loaded) => loaded.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(
                engine::stage::load_books(&redis, keys, partition)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the engine's books: {e}"))?,
            ),
        };
        let last_price = books
            .get(&instrument.symbol)
            .and_then(|book| book.last_price());
        markets.push(market(&instrument, last_price)?);
    }
    Ok(markets)
}

/// The prices and lots the flow may use on `instrument`, around `last_price_e6` (else the
/// middle of its static limits, else 100): within its static limits, and within its price
/// band of that reference price.
fn market(instrument: &Instrument, last_price_e6: Option<i64>) -> anyhow::Result<Market> {
    let symbol = &instrument.symbol;
    let tick_e6 = instrument.tick_e6();
    let to_ticks = |price: f64| price * 1e6 / tick_e6 as f64;
    let min_ticks = instrument
        .min_price
        .map_or(1, |p| (to_ticks(p) - 1e-9).ceil() as i64)
        .max(1);
    let max_ticks = instrument
        .max_price
        .map_or(i64::MAX / tick_e6, |p| (to_ticks(p) + 1e-9).floor() as i64);
    if min_ticks > max_ticks {
        bail!("{symbol}: no price on its tick between its min_price and max_price");
    }
    let reference = match (last_price_e6, instrument.min_price, instrument.max_price) {
        (Some(last), ..) => (last as f64 / tick_e6 as f64).round() as i64,
        (None, Some(_), Some(_)) => min_ticks + (max_ticks - min_ticks) / 2,
        _ => to_ticks(100.0).round() as i64,
    }
    .clamp(min_ticks, max_ticks);
    let band = i64::try_from(
        u128::from(reference.unsigned_abs()) * u128::from(instrument.band_bps) / 10_000,
    )
    .unwrap_or(i64::MAX);
    let spread = if instrument.band_bps > 0 {
        PRICE_SPREAD_TICKS.min(band)
    } else {
        PRICE_SPREAD_TICKS
    };
    let lot = instrument.lot_size.max(1);
    let max_lots = instrument
        .max_qty
        .map_or(MAX_LOTS, |max| (max / lot).min(MAX_LOTS));
    if max_lots == 0 {
        bail!("{symbol}: its max_qty is below one lot");
    }
    Ok(Market {
        symbol: symbol.clone(),
        tick_e6,
        reference,
        low: (reference - spread).max(min_ticks),
        high: (reference + spread).min(max_ticks),
        lot,
        max_lots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instrument(tick_size: f64, band_bps: u32, min: Option<f64>, max: Option<f64>) -> Instrument {
        Instrument {
            symbol: "X".into(),
            tick_size,
            lot_size: 10,
            band_bps,
            min_price: min,
            max_price: max,
            max_qty: Some(25),
            name: String::new(),
            currency: String::new(),
        }
    }

    #[test]
    fn prices_stay_around_the_last_trade_within_band_and_limits() {
        // Last trade 50.00, tick 0.05: reference 1000 ticks, ±5 ticks.
        let m = market(&instrument(0.05, 0, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.reference, m.low, m.high), (1_000, 995, 1_005));
        assert_eq!((m.lot, m.max_lots), (10, 2), "max_qty 25 is two lots of 10");
        // A band of 20 bps around 1000 ticks is 2 ticks wide each side.
        let m = market(&instrument(0.05, 20, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.low, m.high), (998, 1_002));
        // A band narrower than one tick: the reference price only, no panic.
        let m = market(&instrument(0.05, 1, None, None), Some(50_000_000)).unwrap();
        assert_eq!((m.low, m.high), (1_000, 1_000));
        // The static limits cut the range, and hold a last trade outside them.
        let m = market(
            &instrument(0.05, 0, Some(49.9), Some(50.1)),
            Some(70_000_000),
        )
        .unwrap();
        assert_eq!((m.reference, m.low, m.high), (1_002, 998, 1_002));
        // No trade yet: the middle of the limits, else 100.
        let m = market(&instrument(0.05, 0, Some(10.0), Some(20.0)), None).unwrap();
        assert_eq!(m.reference, 300);
        let m = market(&instrument(0.05, 0, None, None), None).unwrap();
        assert_eq!(m.reference, 2_000);
    }

    #[test]
    fn an_instrument_that_cannot_be_traded_is_a_clear_error() {
        let mut no_lot = instrument(0.05, 0, None, None);
        no_lot.max_qty = Some(5);
        assert!(
            market(&no_lot, None)
                .unwrap_err()
                .to_string()
                .contains("max_qty")
        );
        let no_price = instrument(1.0, 0, Some(10.2), Some(10.8));
        assert!(
            market(&no_price, None)
                .unwrap_err()
                .to_string()
                .contains("min_price")
        );
    }

    #[test]
    fn stream_ids_order_as_redis_orders_them() {
        assert!(parse_id("1700000000000-10") > parse_id("1700000000000-9"));
        assert!(parse_id("1700000000001-0") > parse_id("1700000000000-99"));
        assert_eq!(parse_id("garbage"), None);
    }
}
