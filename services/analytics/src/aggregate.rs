//! The analytics stage's handler: every trade, tick and execution report updates per-symbol
//! statistics, OHLCV bars and the latency histogram in Redis. This consumer owns the
//! partition, so its memory holds the truth: each statistic and latency bucket is loaded once
//! (when first needed), counted in memory, and what a batch changed is written back whole, as
//! the batch's effects, atomically with its acknowledgement. Each event counts exactly once,
//! at one command per changed symbol (statistics), one per changed bar and one per partition
//! (latency) and batch; a commit that does not go through makes the stage reload the
//! partition (`partition_released`), so memory never runs ahead of Redis.
//!
//! Keys, all under the event's partition hash tag:
//! - `…:state:analytics:stats:{SYMBOL}` hash: `trades`, `volume`, `notional`,
//!   `last_price_e6`, `ticks`, `last_tick_price_e6`, `exec_<status>` counts;
//! - `…:state:analytics:bars:{1s|1m}:{SYMBOL}` sorted set: score = bucket start (ms),
//!   member = the bar's JSON;
//! - `…:state:analytics:latency_us` hash: latency bucket floor (µs) → count (see [`latency`]);
//! - `…:state:analytics:unknown_symbols` hash: reject code (`unknown_symbol`,
//!   `instrument_unavailable`) → how many of transform's rejections named a symbol the
//!   reference data does not know.
//!
//! Nothing is kept per symbol, in Redis or in memory, for a rejection whose code says the
//! reference data does not know its symbol ([`v1::RejectCode::symbol_unknown`]): such
//! symbols are whatever clients invent, so they are counted per partition instead. Every
//! other event's symbol was validated by transform against the reference data.

use std::collections::HashMap;

use prost::Message;
use serde::{Deserialize, Serialize};
use streams_core::{
    Delivery, Envelope, Handler, HandlerError, KeySpace, Outputs, Partition, Redis,
    envelope::now_micros,
};
use tickflow_proto::{event_type as types, rules, v1};

use crate::latency;

/// A bar interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Interval {
    /// One second.
    #[serde(rename = "1s")]
    Second,
    /// One minute.
    #[serde(rename = "1m")]
    Minute,
}

impl Interval {
    /// Every interval kept.
    pub const ALL: [Interval; 2] = [Interval::Second, Interval::Minute];

    /// Its length in ms.
    pub fn millis(self) -> u64 {
        match self {
            Interval::Second => 1_000,
            Interval::Minute => 60_000,
        }
    }

    /// Its name in keys and the API.
    pub fn name(self) -> &'static str {
        match self {
            Interval::Second => "1s",
            Interval::Minute => "1m",
        }
    }

    /// Parses `1s` or `1m`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1s" => Some(Interval::Second),
            "1m" => Some(Interval::Minute),
            _ => None,
        }
    }
}

/// One OHLCV bar. Prices in millionths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// Bucket start, ms since the epoch.
    pub t: u64,
    /// Open.
    pub o: i64,
    /// High.
    pub h: i64,
    /// Low.
    pub l: i64,
    /// Close.
    pub c: i64,
    /// Volume.
    pub v: u64,
    /// Trades.
    pub n: u64,
}

/// Where analytics keeps a symbol's data.
#[derive(Debug, Clone)]
pub struct AnalyticsKeys {
    keys: KeySpace,
}

impl AnalyticsKeys {
    /// Keys in `keys`' namespace.
    pub fn new(keys: KeySpace) -> Self {
        Self { keys }
    }

    /// The partition of a symbol.
    pub fn partition(&self, symbol: &str) -> Partition {
        self.keys.partition_for(symbol.as_bytes())
    }

    /// The stats hash of `symbol`.
    pub fn stats(&self, symbol: &str) -> String {
        self.keys.partition_state(
            tickflow_proto::topology::ANALYTICS_GROUP,
            &format!("stats:{symbol}"),
            self.partition(symbol),
        )
    }

    /// The bar set of `symbol` at `interval`.
    pub fn bars(&self, symbol: &str, interval: Interval) -> String {
        self.keys.partition_state(
            tickflow_proto::topology::ANALYTICS_GROUP,
            &format!("bars:{}:{symbol}", interval.name()),
            self.partition(symbol),
        )
    }

    /// The counts of `partition`'s rejections of symbols the reference data does not know,
    /// by reject code.
    pub fn unknown_symbols(&self, partition: Partition) -> String {
        self.keys.partition_state(
            tickflow_proto::topology::ANALYTICS_GROUP,
            "unknown_symbols",
            partition,
        )
    }

    /// Every partition's rejections of unknown symbols, summed by reject code (the query
    /// API's reader).
    pub async fn unknown_symbol_rejections(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Clone + Send),
    ) -> redis::RedisResult<std::collections::BTreeMap<String, u64>> {
        let hashes: Vec<HashMap<String, u64>> =
            hgetall_each(conn, self.partitions().map(|p| self.unknown_symbols(p))).await?;
        let mut summed = std::collections::BTreeMap::new();
        for (code, count) in hashes.into_iter().flatten() {
            *summed.entry(code).or_default() += count;
        }
        Ok(summed)
    }

    /// The latency histogram of `partition`.
    pub fn latency(&self, partition: Partition) -> String {
        self.keys.partition_state(
            tickflow_proto::topology::ANALYTICS_GROUP,
            "latency_us",
            partition,
        )
    }

    /// Every partition.
    pub fn partitions(&self) -> impl Iterator<Item = Partition> {
        self.keys.all_partitions()
    }

    /// Every partition's latency histogram, merged: bucket floor in µs → count. The one
    /// reader of the histograms (the query API and `tickflow bench --attach` use it).
    pub async fn latency_histogram(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Clone + Send),
    ) -> redis::RedisResult<std::collections::BTreeMap<u64, u64>> {
        let hashes: Vec<HashMap<u64, u64>> =
            hgetall_each(conn, self.partitions().map(|p| self.latency(p))).await?;
        let mut merged = std::collections::BTreeMap::new();
        for (bucket, count) in hashes.into_iter().flatten() {
            *merged.entry(bucket).or_default() += count;
        }
        Ok(merged)
    }
}

/// HGETALL of every key in `keys`, at once (each partition is a slot of its own on a
/// cluster, so not as one pipeline).
async fn hgetall_each<T: redis::FromRedisValue>(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    keys: impl Iterator<Item = String>,
) -> redis::RedisResult<Vec<T>> {
    let cmds = keys
        .map(|key| redis::cmd("HGETALL").arg(key).clone())
        .collect();
    streams_core::connection::query_each(conn, cmds)
        .await
        .into_iter()
        .map(|reply| reply.and_then(|value| Ok(redis::from_redis_value(value)?)))
        .collect()
}

/// How long bars are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// 1 s bars (`ANALYTICS_RETENTION_1S_MS`, default 1 h).
    pub second_bars_ms: u64,
    /// 1 min bars (`ANALYTICS_RETENTION_1M_MS`, default 7 days).
    pub minute_bars_ms: u64,
}

/// The analytics handler.
#[derive(Debug)]
pub struct Aggregator {
    keys: AnalyticsKeys,
    redis: Redis,
    retention: Retention,
    /// Bars touched recently, by (symbol, interval, bucket): the truth for this partition
    /// owner until committed, since Redis only sees them at the batch's commit.
    bars: HashMap<(Partition, String, Interval, u64), Bar>,
    /// Each symbol's statistics, as stored plus what was counted since (loaded on first use).
    stats: HashMap<Partition, HashMap<String, SymbolStats>>,
    /// Each partition's latency histogram, likewise.
    latency: HashMap<Partition, HashMap<u64, u64>>,
    /// Each partition's rejections of unknown symbols by reject code, likewise.
    unknown_symbols: HashMap<Partition, HashMap<String, u64>>,
    /// What the batch in hand changed, per partition, written by `batch_effects`.
    batch: HashMap<Partition, BatchDelta>,
}

/// What a batch changed in one partition's state: written back whole by `batch_effects`.
#[derive(Debug, Default)]
struct BatchDelta {
    stats: std::collections::BTreeSet<String>,
    bars: std::collections::BTreeSet<(String, Interval, u64)>,
    /// The bars of `bars` that did not exist before this batch: only a new bar can push an
    /// older one out of the retention, so only these trim.
    opened: std::collections::BTreeSet<(String, Interval, u64)>,
    latency: std::collections::BTreeSet<u64>,
    /// Whether the partition's rejections of unknown symbols changed.
    unknown_symbols: bool,
}

/// One symbol's statistics hash (`…:stats:{SYMBOL}`).
#[derive(Debug, Default, Clone, PartialEq)]
struct SymbolStats {
    trades: u64,
    volume: u64,
    notional: f64,
    last_price_e6: Option<i64>,
    ticks: u64,
    last_tick_price_e6: Option<i64>,
    /// `exec_<status>` counts.
    executions: std::collections::BTreeMap<String, u64>,
}

impl SymbolStats {
    /// Reads the stored hash; a field that does not parse counts as absent.
    fn from_hash(hash: &HashMap<String, String>) -> Self {
        let int = |name: &str| hash.get(name).and_then(|v| v.parse::<u64>().ok());
        let price = |name: &str| hash.get(name).and_then(|v| v.parse::<i64>().ok());
        Self {
            trades: int("trades").unwrap_or(0),
            volume: int("volume").unwrap_or(0),
            notional: hash
                .get("notional")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0),
            last_price_e6: price("last_price_e6"),
            ticks: int("ticks").unwrap_or(0),
            last_tick_price_e6: price("last_tick_price_e6"),
            executions: hash
                .iter()
                .filter_map(|(name, value)| {
                    let status = name.strip_prefix("exec_")?;
                    Some((status.to_owned(), value.parse().ok()?))
                })
                .collect(),
        }
    }

    /// Its fields and values, for HSET.
    fn to_hash(&self) -> Vec<Vec<u8>> {
        let mut args = Vec::with_capacity(16);
        let mut field = |name: &str, value: String| {
            args.push(name.as_bytes().to_vec());
            args.push(value.into_bytes());
        };
        field("trades", self.trades.to_string());
        field("volume", self.volume.to_string());
        field("notional", self.notional.to_string());
        if let Some(p) = self.last_price_e6 {
            field("last_price_e6", p.to_string());
        }
        field("ticks", self.ticks.to_string());
        if let Some(p) = self.last_tick_price_e6 {
            field("last_tick_price_e6", p.to_string());
        }
        for (status, count) in &self.executions {
            field(&format!("exec_{status}"), count.to_string());
        }
        args
    }
}

impl Aggregator {
    /// A handler writing into `keys`' namespace.
    pub fn new(keys: KeySpace, redis: Redis, retention: Retention) -> Self {
        Self {
            keys: AnalyticsKeys::new(keys),
            redis,
            retention,
            bars: HashMap::new(),
            stats: HashMap::new(),
            latency: HashMap::new(),
            unknown_symbols: HashMap::new(),
            batch: HashMap::new(),
        }
    }

    /// How many symbols' statistics this replica holds in memory, over all its partitions
    /// (also the `tickflow_analytics_symbols_in_memory` gauge): bounded by the reference
    /// data, whatever symbols clients send.
    pub fn symbols_in_memory(&self) -> usize {
        self.stats.values().map(HashMap::len).sum()
    }

    fn report_symbols_in_memory(&self) {
        metrics::gauge!("tickflow_analytics_symbols_in_memory")
            .set(self.symbols_in_memory() as f64);
    }

    /// Loads `symbol`'s statistics into memory if they are not there yet.
    async fn load_stats(&mut self, partition: Partition, symbol: &str) -> Result<(), HandlerError> {
        if self
            .stats
            .get(&partition)
            .is_some_and(|s| s.contains_key(symbol))
        {
            return Ok(());
        }
        let hash: HashMap<String, String> = self.hash(&self.keys.stats(symbol)).await?;
        self.stats
            .entry(partition)
            .or_default()
            .insert(symbol.to_owned(), SymbolStats::from_hash(&hash));
        self.report_symbols_in_memory();
        Ok(())
    }

    /// Loads the partition's rejections of unknown symbols into memory if they are not
    /// there yet.
    async fn load_unknown_symbols(&mut self, partition: Partition) -> Result<(), HandlerError> {
        if self.unknown_symbols.contains_key(&partition) {
            return Ok(());
        }
        let hash: HashMap<String, u64> = self.hash(&self.keys.unknown_symbols(partition)).await?;
        self.unknown_symbols.insert(partition, hash);
        Ok(())
    }

    /// Loads what counting `reports` needs ([`Self::count_executions`]).
    async fn load_executions(
        &mut self,
        partition: Partition,
        reports: &[(v1::ExecutionReport, String)],
    ) -> Result<(), HandlerError> {
        for (report, _) in reports {
            if unknown_symbol(report).is_some() {
                self.load_unknown_symbols(partition).await?;
            } else {
                self.load_stats(partition, &report.symbol).await?;
            }
        }
        Ok(())
    }

    /// Counts execution reports, loaded before ([`Self::load_executions`]): per symbol,
    /// except rejections of symbols the reference data does not know, which are counted
    /// per partition by code.
    fn count_executions(
        &mut self,
        partition: Partition,
        reports: Vec<(v1::ExecutionReport, String)>,
    ) {
        for (report, status) in reports {
            match unknown_symbol(&report) {
                Some(code) => {
                    metrics::counter!(
                        "tickflow_analytics_unknown_symbol_rejections_total",
                        "code" => code.label()
                    )
                    .increment(1);
                    *self
                        .unknown_symbols
                        .get_mut(&partition)
                        .expect("loaded above")
                        .entry(code.label().to_owned())
                        .or_default() += 1;
                    self.batch.entry(partition).or_default().unknown_symbols = true;
                }
                None => self.execution(partition, &report.symbol, status),
            }
        }
    }

    /// Loads the partition's latency histogram into memory if it is not there yet.
    async fn load_latency(&mut self, partition: Partition) -> Result<(), HandlerError> {
        if self.latency.contains_key(&partition) {
            return Ok(());
        }
        let hash: HashMap<u64, u64> = self.hash(&self.keys.latency(partition)).await?;
        self.latency.insert(partition, hash);
        Ok(())
    }

    /// The hash at `key` (a Redis error is a retry: the entry waits for Redis).
    async fn hash<T: redis::FromRedisValue>(&self, key: &str) -> Result<T, HandlerError> {
        let mut conn = self
            .redis
            .pooled()
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut *conn)
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))
    }

    /// The statistics of `symbol`, loaded before (`load_stats`), marked as changed.
    fn stats_mut(&mut self, partition: Partition, symbol: &str) -> &mut SymbolStats {
        let delta = self.batch.entry(partition).or_default();
        if !delta.stats.contains(symbol) {
            delta.stats.insert(symbol.to_owned());
        }
        self.stats
            .get_mut(&partition)
            .and_then(|s| s.get_mut(symbol))
            .expect("statistics are loaded before they are counted")
    }

    async fn bar(
        &mut self,
        partition: Partition,
        symbol: &str,
        interval: Interval,
        bucket: u64,
    ) -> Result<Bar, HandlerError> {
        let key = (partition, symbol.to_owned(), interval, bucket);
        if let Some(bar) = self.bars.get(&key) {
            return Ok(bar.clone());
        }
        let mut conn = self
            .redis
            .pooled()
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        let stored: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.bars(symbol, interval))
            .arg(bucket)
            .arg(bucket)
            .query_async(&mut *conn)
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        Ok(stored
            .first()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or(Bar {
                t: bucket,
                o: 0,
                h: 0,
                l: 0,
                c: 0,
                v: 0,
                n: 0,
            }))
    }

    /// Counts `trades` (a lone `trade` entry's, or those of one `order.events`, which share
    /// the entry's origin time) into the batch and the bar cache.
    async fn trades(
        &mut self,
        partition: Partition,
        envelope: &Envelope,
        trades: &[v1::Trade],
    ) -> Result<(), HandlerError> {
        let at_ms = envelope.origin_us / 1000;
        for trade in trades {
            self.load_stats(partition, &trade.symbol).await?;
        }
        // Compute every bar first, so a Redis error leaves the cache and the batch untouched.
        // With each: whether it is new.
        let mut updated: Vec<((String, Interval, u64), Bar, bool)> = Vec::new();
        for trade in trades {
            for interval in Interval::ALL {
                let bucket = at_ms - at_ms % interval.millis();
                let found = updated.iter().position(|((s, i, b), _, _)| {
                    *s == trade.symbol && *i == interval && *b == bucket
                });
                let index = match found {
                    Some(index) => index,
                    None => {
                        let bar = self.bar(partition, &trade.symbol, interval, bucket).await?;
                        let new = bar.n == 0;
                        updated.push(((trade.symbol.clone(), interval, bucket), bar, new));
                        updated.len() - 1
                    }
                };
                let bar = &mut updated[index].1;
                if bar.n == 0 {
                    bar.o = trade.price_e6;
                    bar.h = trade.price_e6;
                    bar.l = trade.price_e6;
                }
                bar.h = bar.h.max(trade.price_e6);
                bar.l = bar.l.min(trade.price_e6);
                bar.c = trade.price_e6;
                bar.v = bar.v.saturating_add(trade.qty);
                bar.n += 1;
            }
        }
        let delta = self.batch.entry(partition).or_default();
        for ((symbol, interval, bucket), bar, new) in updated {
            if new {
                delta.opened.insert((symbol.clone(), interval, bucket));
            }
            delta.bars.insert((symbol.clone(), interval, bucket));
            self.bars.insert((partition, symbol, interval, bucket), bar);
        }
        for trade in trades {
            let stats = self.stats_mut(partition, &trade.symbol);
            stats.trades += 1;
            stats.volume = stats.volume.saturating_add(trade.qty);
            stats.notional += trade.price_e6 as f64 / 1e6 * trade.qty as f64;
            stats.last_price_e6 = Some(trade.price_e6);
        }
        self.evict(at_ms);
        Ok(())
    }

    fn execution(&mut self, partition: Partition, symbol: &str, status: String) {
        *self
            .stats_mut(partition, symbol)
            .executions
            .entry(status)
            .or_default() += 1;
    }

    /// Keeps the cache small: forgets bars more than two minutes older than `now_ms`.
    fn evict(&mut self, now_ms: u64) {
        if self.bars.len() > 4096 {
            self.bars
                .retain(|(_, _, _, bucket), _| *bucket + 120_000 >= now_ms);
        }
    }
}

fn decode<M: Message + Default>(envelope: &Envelope) -> Result<M, HandlerError> {
    M::decode(envelope.payload.as_ref()).map_err(|e| {
        HandlerError::Permanent(format!(
            "payload of {} is not valid: {e}",
            envelope.event_type
        ))
    })
}

/// The largest trade quantity counted: what transform lets through (1e15), so that the
/// volumes summed stay far within 64 bits.
pub const MAX_TRADE_QTY: u64 = 1_000_000_000_000_000;

/// Why a market event of `symbol` read from `partition` cannot be counted, if it cannot:
/// the symbol is not one, or its statistics live in another partition (whose owner counts
/// them; a second writer would race it).
fn symbol_problem(
    keys: &AnalyticsKeys,
    what: &str,
    symbol: &str,
    partition: Partition,
) -> Option<String> {
    if let Some(problem) = rules::symbol_problem(symbol) {
        return Some(format!("{what} symbol {problem}"));
    }
    let home = keys.partition(symbol);
    (home != partition)
        .then(|| format!("{what} of {symbol} belongs to partition {home}, not {partition}"))
}

/// What makes a trade impossible to count, if anything.
pub fn trade_problem(
    keys: &AnalyticsKeys,
    trade: &v1::Trade,
    partition: Partition,
) -> Option<String> {
    if let Some(problem) = symbol_problem(keys, "trade", &trade.symbol, partition) {
        Some(problem)
    } else if trade.qty == 0 {
        Some("trade qty is 0".into())
    } else if trade.qty > MAX_TRADE_QTY {
        Some(format!(
            "trade qty {} is too large (at most {MAX_TRADE_QTY})",
            trade.qty
        ))
    } else if trade.price_e6 <= 0 {
        Some(format!("trade price_e6 {} is not positive", trade.price_e6))
    } else {
        None
    }
}

/// What makes a tick impossible to count, if anything.
pub fn tick_problem(
    keys: &AnalyticsKeys,
    tick: &v1::ValidatedTick,
    partition: Partition,
) -> Option<String> {
    if let Some(problem) = symbol_problem(keys, "tick", &tick.symbol, partition) {
        Some(problem)
    } else if tick.price_e6 <= 0 {
        Some(format!("tick price_e6 {} is not positive", tick.price_e6))
    } else {
        None
    }
}

/// The code of a rejection whose symbol the reference data does not know, if `report` is
/// one: then nothing may be kept per symbol for it.
fn unknown_symbol(report: &v1::ExecutionReport) -> Option<v1::RejectCode> {
    v1::RejectCode::try_from(report.reject_code)
        .ok()
        .filter(|code| code.symbol_unknown())
}

/// The lower-case name of an execution report's status (`filled`), or what makes the report
/// impossible to count.
pub fn execution_status(
    keys: &AnalyticsKeys,
    report: &v1::ExecutionReport,
    partition: Partition,
) -> Result<String, String> {
    if let Some(problem) = symbol_problem(keys, "execution report", &report.symbol, partition) {
        return Err(problem);
    }
    match v1::ExecStatus::try_from(report.status) {
        Ok(status) if status != v1::ExecStatus::Unspecified => Ok(status
            .as_str_name()
            .trim_start_matches("EXEC_STATUS_")
            .to_ascii_lowercase()),
        _ => Err(format!(
            "execution report status {} is not a known status",
            report.status
        )),
    }
}

impl Handler for Aggregator {
    async fn handle(
        &mut self,
        delivery: &Delivery,
        _out: &mut Outputs,
    ) -> Result<(), HandlerError> {
        let envelope = delivery.envelope.as_ref().expect("envelope stage");
        let partition = delivery.partition;
        // Everything this entry needs from Redis is loaded before anything is counted, so a
        // Redis error (a retry) leaves memory as it was.
        self.load_latency(partition).await?;
        match envelope.event_type.as_str() {
            types::TRADE => {
                let trade: v1::Trade = decode(envelope)?;
                if let Some(problem) = trade_problem(&self.keys, &trade, partition) {
                    return Err(HandlerError::Permanent(problem));
                }
                self.trades(partition, envelope, &[trade]).await?;
            }
            types::VALIDATED_TICK => {
                let tick: v1::ValidatedTick = decode(envelope)?;
                if let Some(problem) = tick_problem(&self.keys, &tick, partition) {
                    return Err(HandlerError::Permanent(problem));
                }
                self.load_stats(partition, &tick.symbol).await?;
                let stats = self.stats_mut(partition, &tick.symbol);
                stats.ticks += 1;
                stats.last_tick_price_e6 = Some(tick.price_e6);
            }
            types::EXECUTION => {
                let report: v1::ExecutionReport = decode(envelope)?;
                let status = execution_status(&self.keys, &report, partition)
                    .map_err(HandlerError::Permanent)?;
                let reports = vec![(report, status)];
                self.load_executions(partition, &reports).await?;
                self.count_executions(partition, reports);
            }
            types::ORDER_EVENTS => {
                let events: v1::OrderEvents = decode(envelope)?;
                if events.events.is_empty() {
                    return Err(HandlerError::Permanent("order events hold no event".into()));
                }
                // Check them all before counting any: one entry counts whole or not at all.
                let mut trades = Vec::new();
                let mut executions = Vec::new();
                for event in events.events {
                    match event.kind {
                        Some(v1::market_event::Kind::Trade(trade)) => {
                            if let Some(problem) = trade_problem(&self.keys, &trade, partition) {
                                return Err(HandlerError::Permanent(problem));
                            }
                            trades.push(trade);
                        }
                        Some(v1::market_event::Kind::Execution(report)) => {
                            let status = execution_status(&self.keys, &report, partition)
                                .map_err(HandlerError::Permanent)?;
                            executions.push((report, status));
                        }
                        None => {
                            return Err(HandlerError::Permanent(
                                "order events hold an event that is neither a report nor a trade"
                                    .into(),
                            ));
                        }
                    }
                }
                self.load_executions(partition, &executions).await?;
                self.trades(partition, envelope, &trades).await?;
                self.count_executions(partition, executions);
            }
            other => {
                return Err(HandlerError::Permanent(format!(
                    "analytics does not handle event type {other:?}"
                )));
            }
        }
        let latency_us = now_micros().saturating_sub(envelope.origin_us);
        metrics::histogram!("tickflow_e2e_latency_seconds").record(latency_us as f64 / 1e6);
        let bucket = latency::floor(latency_us);
        *self
            .latency
            .get_mut(&partition)
            .expect("loaded above")
            .entry(bucket)
            .or_default() += 1;
        self.batch
            .entry(partition)
            .or_default()
            .latency
            .insert(bucket);
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        // What this consumer holds may not have been committed; the next owner (or this one,
        // reloading) reads Redis.
        self.bars.retain(|(p, _, _, _), _| *p != partition);
        self.stats.remove(&partition);
        self.latency.remove(&partition);
        self.unknown_symbols.remove(&partition);
        self.batch.remove(&partition);
        self.report_symbols_in_memory();
    }

    /// The batch's changes, applied with its acknowledgement (so each event counts once):
    /// each changed symbol's statistics whole, each changed bar, and the changed latency
    /// buckets.
    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        let Some(delta) = self.batch.remove(&partition) else {
            return;
        };
        let int = |v: u64| v.to_string().into_bytes();
        if let Some(stats) = self.stats.get(&partition) {
            for symbol in delta.stats {
                if let Some(stats) = stats.get(&symbol) {
                    out.command("HSET", self.keys.stats(&symbol), stats.to_hash());
                }
            }
        }
        for (symbol, interval, bucket) in delta.bars {
            let Some(bar) = self
                .bars
                .get(&(partition, symbol.clone(), interval, bucket))
            else {
                continue;
            };
            let key = self.keys.bars(&symbol, interval);
            let json = serde_json::to_vec(bar).expect("bars serialize");
            let opened = delta.opened.contains(&(symbol, interval, bucket));
            if !opened {
                // The bar's previous version.
                out.command(
                    "ZREMRANGEBYSCORE",
                    key.clone(),
                    vec![int(bucket), int(bucket)],
                );
            }
            out.command("ZADD", key.clone(), vec![int(bucket), json]);
            // The retention is counted back from the newest bar, so a bar that only changed
            // cannot age another one out: trim when a bar opens.
            if !opened {
                continue;
            }
            let keep_ms = match interval {
                Interval::Second => self.retention.second_bars_ms,
                Interval::Minute => self.retention.minute_bars_ms,
            };
            let oldest = bucket.saturating_sub(keep_ms);
            out.command(
                "ZREMRANGEBYSCORE",
                key,
                vec![b"-inf".to_vec(), format!("({oldest}").into_bytes()],
            );
        }
        if let Some(histogram) = self.latency.get(&partition)
            && !delta.latency.is_empty()
        {
            let mut args = Vec::with_capacity(delta.latency.len() * 2);
            for bucket in delta.latency {
                args.push(bucket.to_string().into_bytes());
                args.push(int(histogram.get(&bucket).copied().unwrap_or(0)));
            }
            out.command("HSET", self.keys.latency(partition), args);
        }
        if delta.unknown_symbols
            && let Some(counts) = self.unknown_symbols.get(&partition)
        {
            let args = counts
                .iter()
                .flat_map(|(code, count)| [code.clone().into_bytes(), int(*count)])
                .collect();
            out.command("HSET", self.keys.unknown_symbols(partition), args);
        }
    }
}

#[cfg(test)]
mod tests {
    use streams_core::Handler as _;

    use super::*;

    fn keys() -> AnalyticsKeys {
        AnalyticsKeys::new(KeySpace::new("t", 4))
    }

    fn trade(symbol: &str, price_e6: i64, qty: u64) -> v1::Trade {
        v1::Trade {
            symbol: symbol.into(),
            price_e6,
            qty,
            ..Default::default()
        }
    }

    #[test]
    fn market_events_that_cannot_be_counted_are_named() {
        let keys = keys();
        let home = keys.partition("AAPL");
        let elsewhere = (home + 1) % 4;
        assert_eq!(trade_problem(&keys, &trade("AAPL", 1, 1), home), None);
        for (bad, says) in [
            (trade("", 1, 1), "trade symbol is empty"),
            (trade(&"A".repeat(1 << 20), 1, 1), "longer than 32"),
            (trade("AAPL", 1, 0), "qty is 0"),
            (trade("AAPL", 1, u64::MAX), "too large"),
            (trade("AAPL", 0, 1), "price_e6 0 is not positive"),
        ] {
            let problem = trade_problem(&keys, &bad, home).unwrap();
            assert!(problem.contains(says), "{problem}");
            assert!(problem.len() < 200, "{problem}");
        }
        let problem = trade_problem(&keys, &trade("AAPL", 1, 1), elsewhere).unwrap();
        assert!(
            problem.contains(&format!("belongs to partition {home}")),
            "{problem}"
        );

        let tick = |price_e6| v1::ValidatedTick {
            symbol: "AAPL".into(),
            price_e6,
            qty: 1,
        };
        assert_eq!(tick_problem(&keys, &tick(1), home), None);
        assert!(
            tick_problem(&keys, &tick(0), home)
                .unwrap()
                .contains("price")
        );
        assert!(
            tick_problem(&keys, &v1::ValidatedTick::default(), home)
                .unwrap()
                .contains("symbol is empty")
        );

        let report = |status| v1::ExecutionReport {
            symbol: "AAPL".into(),
            status,
            ..Default::default()
        };
        let filled = v1::ExecStatus::Filled as i32;
        assert_eq!(
            execution_status(&keys, &report(filled), home).as_deref(),
            Ok("filled")
        );
        assert!(
            execution_status(&keys, &report(99), home)
                .unwrap_err()
                .contains("status 99")
        );
        assert!(
            execution_status(&keys, &report(0), home)
                .unwrap_err()
                .contains("status 0")
        );
        assert!(
            execution_status(&keys, &v1::ExecutionReport::default(), home)
                .unwrap_err()
                .contains("symbol is empty")
        );
    }

    /// An `execution` entry of `partition` holding a rejection of `symbol` with `code`.
    fn rejection(
        keys: &AnalyticsKeys,
        symbol: &str,
        code: v1::RejectCode,
    ) -> streams_core::Delivery {
        let report = v1::ExecutionReport {
            symbol: symbol.into(),
            client_order_id: "o1".into(),
            status: v1::ExecStatus::Rejected as i32,
            reason: "unknown symbol".into(),
            reject_code: code as i32,
            ..Default::default()
        };
        streams_core::Delivery {
            partition: keys.partition(symbol),
            stream: "market".into(),
            id: "1-0".into(),
            deliveries: 1,
            fields: Vec::new(),
            envelope: Some(Envelope::new(
                types::EXECUTION,
                symbol,
                report.encode_to_vec(),
            )),
        }
    }

    #[tokio::test]
    async fn rejections_of_unknown_symbols_are_counted_per_partition_not_kept_per_symbol() {
        let server = streams_core::testing::RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let space = KeySpace::new(streams_core::testing::unique_namespace("agg"), 4);
        let keys = AnalyticsKeys::new(space.clone());
        let retention = Retention {
            second_bars_ms: 60_000,
            minute_bars_ms: 600_000,
        };
        let mut aggregator = Aggregator::new(space, redis, retention);
        let codes = [
            v1::RejectCode::UnknownSymbol,
            v1::RejectCode::InstrumentUnavailable,
        ];
        for i in 0..500 {
            let delivery = rejection(&keys, &format!("U{i}"), codes[i % 2]);
            aggregator
                .handle(&delivery, &mut Outputs::default())
                .await
                .unwrap();
        }
        assert_eq!(aggregator.symbols_in_memory(), 0);
        let mut counted = std::collections::BTreeMap::<String, u64>::new();
        for partition in keys.partitions() {
            let mut out = Outputs::default();
            aggregator.batch_effects(partition, &mut out);
            // The latency histogram and the partition's count: nothing per symbol.
            assert_eq!(out.len(), 2, "partition {partition}: {out:?}");
            for (code, count) in &aggregator.unknown_symbols[&partition] {
                *counted.entry(code.clone()).or_default() += count;
            }
        }
        assert_eq!(
            counted,
            [
                ("instrument_unavailable".to_owned(), 250),
                ("unknown_symbol".to_owned(), 250)
            ]
            .into()
        );

        // A rejection by the instrument's rules is the symbol's own statistic.
        let delivery = rejection(&keys, "AAPL", v1::RejectCode::InstrumentRule);
        aggregator
            .handle(&delivery, &mut Outputs::default())
            .await
            .unwrap();
        assert_eq!(aggregator.symbols_in_memory(), 1);
    }
}
