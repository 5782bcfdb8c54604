//! The analytics stage's handler: every trade, tick and execution report updates per-symbol
//! statistics, OHLCV bars and the latency histogram. This consumer owns the partition, so
//! its memory holds the truth: a partition's figures are read once, when it is taken over
//! ([`crate::store`] has the layout), counted in memory, and what a batch changed is written
//! back as the batch's effects, atomically with its acknowledgement. Each event counts
//! exactly once, and a batch costs a fixed number of commands per partition (one HSET of
//! the changed symbols' figures, one ZADD per closed-bar set it closed bars into, one HSET
//! of the histogram), whatever the number of symbols; a commit that does not go through
//! makes the stage reload the partition (`partition_released`), so memory never runs ahead
//! of Redis.
//!
//! Nothing is kept per symbol, in Redis or in memory, for a rejection whose code says the
//! reference data does not know its symbol ([`v1::RejectCode::symbol_unknown`]): such
//! symbols are whatever clients invent, so they are counted per partition instead. Every
//! other event's symbol was validated by transform against the reference data, so the
//! symbols held are bounded by it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use streams_core::{
    Delivery, Envelope, Handler, HandlerError, Outputs, Partition, Redis, envelope::now_micros,
};
use tickflow_proto::{event_type as types, rules, v1};

pub use crate::store::{AnalyticsKeys, Bar, Interval, SymbolStats};
use crate::{
    latency,
    store::{self, Migration},
};

/// How long bars are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// 1 s bars (`ANALYTICS_RETENTION_1S_MS`, default 1 h).
    pub second_bars_ms: u64,
    /// 1 min bars (`ANALYTICS_RETENTION_1M_MS`, default 7 days).
    pub minute_bars_ms: u64,
}

impl Retention {
    /// The retention of `interval`'s bars, in ms.
    pub fn of(&self, interval: Interval) -> u64 {
        match interval {
            Interval::Second => self.second_bars_ms,
            Interval::Minute => self.minute_bars_ms,
        }
    }
}

/// The analytics handler.
#[derive(Debug)]
pub struct Aggregator {
    keys: AnalyticsKeys,
    redis: Redis,
    retention: Retention,
    partitions: HashMap<Partition, PartitionState>,
}

/// What this replica holds of one owned partition.
#[derive(Debug, Default)]
struct PartitionState {
    /// Every symbol's figures, its bars in progress included.
    symbols: HashMap<String, SymbolStats>,
    latency: HashMap<u64, u64>,
    /// Rejections of symbols the reference data does not know, by reject code.
    unknown_symbols: HashMap<String, u64>,
    /// Per interval, the closed-bar sets that exist (their epochs).
    epochs: [BTreeSet<u64>; 2],
    /// Per interval, layout 1's bar sets that still hold bars: symbol → newest start.
    legacy_bars: [HashMap<String, u64>; 2],
    /// Per interval, the newest bar start of any symbol: the retention counts back from it.
    newest: [u64; 2],
    /// Each symbol's last closed bar per interval and where it is stored: a trade that
    /// arrives just after its symbol's bar closed (its origin time is the previous
    /// bucket's) updates it without a read.
    previous: HashMap<(String, Interval), Closed>,
    /// What the batch in hand changed, written by `batch_effects`.
    batch: BatchDelta,
}

/// A closed bar, and the member that stores it now (key, member), if stored.
#[derive(Debug, Clone)]
struct Closed {
    bar: Bar,
    stored: Option<(String, String)>,
}

/// What a batch changed in one partition's state.
#[derive(Debug, Default)]
struct BatchDelta {
    stats: BTreeSet<String>,
    /// Closed bars to store (new, or changed by a late trade), by interval, symbol, start.
    closed: BTreeMap<(Interval, String, u64), Closed>,
    latency: BTreeSet<u64>,
    unknown_symbols: bool,
    /// Layout 1's figures merged on takeover: written (and the merged keys deleted) now.
    migration: Option<Migration>,
}

impl PartitionState {
    fn from_loaded(loaded: store::Loaded) -> Self {
        let newest = Interval::ALL.map(|interval| {
            loaded
                .symbols
                .values()
                .filter_map(|s| s.bar(interval).map(|b| b.t))
                .max()
                .unwrap_or(0)
        });
        let mut state = PartitionState {
            symbols: loaded.symbols,
            latency: loaded.latency,
            unknown_symbols: loaded.unknown_symbols,
            epochs: loaded.epochs,
            legacy_bars: loaded.legacy_bars,
            newest,
            previous: HashMap::new(),
            batch: BatchDelta::default(),
        };
        if let Some(mut migration) = loaded.migration {
            // Everything merged is written with the next commit.
            state.batch.stats = state.symbols.keys().cloned().collect();
            state.batch.latency = state.latency.keys().copied().collect();
            for (interval, symbol, bar) in std::mem::take(&mut migration.closed) {
                let closed = Closed { bar, stored: None };
                state
                    .batch
                    .closed
                    .insert((interval, symbol, closed.bar.t), closed);
            }
            state.batch.migration = Some(migration);
        }
        state
    }

    /// The statistics of `symbol`, marked as changed by the batch.
    fn stats_mut(&mut self, symbol: &str) -> &mut SymbolStats {
        if !self.batch.stats.contains(symbol) {
            self.batch.stats.insert(symbol.to_owned());
        }
        self.symbols.entry(symbol.to_owned()).or_default()
    }

    /// Whether a bar of `interval` starting at `t` is beyond the retention (`retention_ms`)
    /// counted back from the partition's newest bar: not kept.
    fn expired(&self, interval: Interval, t: u64, retention_ms: u64) -> bool {
        t < self.newest[interval.index()].saturating_sub(retention_ms)
    }

    /// The closed bar of `symbol` at `interval` starting at `t` if this replica holds it
    /// (changed by the batch, or the symbol's last closed one); `None`: it must be read.
    fn held_closed(&self, symbol: &str, interval: Interval, t: u64) -> Option<Closed> {
        if let Some(closed) = self.batch.closed.get(&(interval, symbol.to_owned(), t)) {
            return Some(closed.clone());
        }
        self.previous
            .get(&(symbol.to_owned(), interval))
            .filter(|closed| closed.bar.t == t)
            .cloned()
    }
}

impl Aggregator {
    /// A handler writing into `keys`' namespace.
    pub fn new(keys: streams_core::KeySpace, redis: Redis, retention: Retention) -> Self {
        Self {
            keys: AnalyticsKeys::new(keys),
            redis,
            retention,
            partitions: HashMap::new(),
        }
    }

    /// How many symbols' statistics this replica holds in memory, over all its partitions
    /// (also the `tickflow_analytics_symbols_in_memory` gauge): bounded by the reference
    /// data, whatever symbols clients send.
    pub fn symbols_in_memory(&self) -> usize {
        self.partitions.values().map(|p| p.symbols.len()).sum()
    }

    fn report_symbols_in_memory(&self) {
        metrics::gauge!("tickflow_analytics_symbols_in_memory")
            .set(self.symbols_in_memory() as f64);
    }

    /// Reads `partition`'s figures if this replica does not hold them yet.
    async fn load(&mut self, partition: Partition) -> Result<(), HandlerError> {
        if self.partitions.contains_key(&partition) {
            return Ok(());
        }
        let retry = |e: String| {
            HandlerError::Retry(format!("loading analytics of partition {partition}: {e}"))
        };
        let mut conn = self
            .redis
            .pooled()
            .await
            .map_err(|e| retry(e.to_string()))?;
        let loaded = store::load(&mut conn, &self.keys, partition)
            .await
            .map_err(retry)?;
        if let Some(migration) = &loaded.migration {
            tracing::info!(
                partition,
                symbols = migration.symbols,
                keys = migration.merged_keys.len(),
                "figures of the earlier per-symbol layout merged; written with the next commit"
            );
        }
        self.partitions
            .insert(partition, PartitionState::from_loaded(loaded));
        self.report_symbols_in_memory();
        Ok(())
    }

    fn state(&mut self, partition: Partition) -> &mut PartitionState {
        self.partitions
            .get_mut(&partition)
            .expect("the partition is loaded before it is counted")
    }

    /// Counts `trades` (a lone `trade` entry's, or those of one `order.events`, which share
    /// the entry's origin time): statistics and bars.
    async fn trades(
        &mut self,
        partition: Partition,
        envelope: &Envelope,
        trades: &[v1::Trade],
    ) -> Result<(), HandlerError> {
        let at_ms = envelope.origin_us / 1000;
        // A trade later than its symbol's newest bar (its origin time is an older bucket's)
        // changes a closed bar: one this replica does not hold is read first, so that a
        // Redis error leaves memory untouched.
        let mut read = Vec::new();
        {
            let state = &self.partitions[&partition];
            for trade in trades {
                for interval in Interval::ALL {
                    let t = at_ms - at_ms % interval.millis();
                    let current = state
                        .symbols
                        .get(&trade.symbol)
                        .and_then(|s| s.bar(interval));
                    if current.is_some_and(|bar| bar.t > t)
                        && !state.expired(interval, t, self.retention.of(interval))
                        && state.held_closed(&trade.symbol, interval, t).is_none()
                        && !read.contains(&(trade.symbol.clone(), interval, t))
                    {
                        read.push((trade.symbol.clone(), interval, t));
                    }
                }
            }
        }
        let mut found = HashMap::new();
        for (symbol, interval, t) in read {
            let closed = self.read_closed(partition, &symbol, interval, t).await?;
            found.insert((interval, symbol, t), closed);
        }

        let retention = self.retention;
        let state = self.state(partition);
        for trade in trades {
            let stats = state.stats_mut(&trade.symbol);
            stats.trades += 1;
            stats.volume = stats.volume.saturating_add(trade.qty);
            stats.notional += trade.price_e6 as f64 / 1e6 * trade.qty as f64;
            stats.last_price_e6 = Some(trade.price_e6);
            for interval in Interval::ALL {
                let t = at_ms - at_ms % interval.millis();
                let index = interval.index();
                let current = state
                    .symbols
                    .get_mut(&trade.symbol)
                    .expect("counted above")
                    .bar_mut(interval);
                match current {
                    Some(bar) if bar.t == t => bar.add(trade.price_e6, trade.qty),
                    Some(bar) if bar.t > t => {
                        // Late: a closed bar.
                        if state.expired(interval, t, retention.of(interval)) {
                            continue;
                        }
                        let key = (interval, trade.symbol.clone(), t);
                        let mut closed = state
                            .held_closed(&trade.symbol, interval, t)
                            .or_else(|| found.get(&key).cloned().flatten())
                            .unwrap_or(Closed {
                                bar: Bar::empty(t),
                                stored: None,
                            });
                        closed.bar.add(trade.price_e6, trade.qty);
                        state.batch.closed.insert(key, closed);
                    }
                    _ => {
                        // A new bar: the one it follows (if any) is closed.
                        let mut bar = Bar::empty(t);
                        bar.add(trade.price_e6, trade.qty);
                        if let Some(closed) = current.replace(bar) {
                            let key = (interval, trade.symbol.clone(), closed.t);
                            let closed = Closed {
                                bar: closed,
                                stored: None,
                            };
                            state.batch.closed.insert(key, closed);
                        }
                        state.newest[index] = state.newest[index].max(t);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the stored closed bar of `symbol` at `interval` starting at `t`, if there is
    /// one, with where it is stored.
    async fn read_closed(
        &self,
        partition: Partition,
        symbol: &str,
        interval: Interval,
        t: u64,
    ) -> Result<Option<Closed>, HandlerError> {
        let retry = |e: redis::RedisError| HandlerError::Retry(e.to_string());
        let state = &self.partitions[&partition];
        let epoch = t / interval.epoch_ms();
        let closed_key = self.keys.closed_bars(partition, interval, epoch);
        let legacy_key = self.keys.legacy_bars(symbol, interval);
        let mut pipe = redis::pipe();
        let exact = format!("{symbol} {t:020} ");
        pipe.cmd("ZRANGEBYLEX")
            .arg(&closed_key)
            .arg(format!("[{exact}"))
            .arg(format!("({symbol} {t:020}!"));
        let legacy = state.legacy_bars[interval.index()].contains_key(symbol);
        if legacy {
            pipe.cmd("ZRANGEBYSCORE").arg(&legacy_key).arg(t).arg(t);
        }
        let mut conn = self
            .redis
            .pooled()
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        let replies: Vec<Vec<String>> = pipe.query_async(&mut *conn).await.map_err(retry)?;
        let mut replies = replies.into_iter();
        if let Some(member) = replies.next().into_iter().flatten().next()
            && let Some((_, bar)) = Bar::parse_member(&member)
        {
            return Ok(Some(Closed {
                bar,
                stored: Some((closed_key, member)),
            }));
        }
        if let Some(json) = replies.next().into_iter().flatten().next()
            && let Ok(bar) = serde_json::from_str::<Bar>(&json)
        {
            return Ok(Some(Closed {
                bar,
                stored: Some((legacy_key, json)),
            }));
        }
        Ok(None)
    }

    /// Counts execution reports: per symbol, except rejections of symbols the reference
    /// data does not know, which are counted per partition by code.
    fn count_executions(
        &mut self,
        partition: Partition,
        reports: Vec<(v1::ExecutionReport, String)>,
    ) {
        let state = self.state(partition);
        for (report, status) in reports {
            match unknown_symbol(&report) {
                Some(code) => {
                    metrics::counter!(
                        "tickflow_analytics_unknown_symbol_rejections_total",
                        "code" => code.label()
                    )
                    .increment(1);
                    *state
                        .unknown_symbols
                        .entry(code.label().to_owned())
                        .or_default() += 1;
                    state.batch.unknown_symbols = true;
                }
                None => {
                    *state
                        .stats_mut(&report.symbol)
                        .executions
                        .entry(status)
                        .or_default() += 1;
                }
            }
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
        // Everything this entry needs from Redis is read before anything is counted, so a
        // Redis error (a retry) leaves memory as it was.
        self.load(partition).await?;
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
                let stats = self.state(partition).stats_mut(&tick.symbol);
                stats.ticks += 1;
                stats.last_tick_price_e6 = Some(tick.price_e6);
            }
            types::EXECUTION => {
                let report: v1::ExecutionReport = decode(envelope)?;
                let status = execution_status(&self.keys, &report, partition)
                    .map_err(HandlerError::Permanent)?;
                self.count_executions(partition, vec![(report, status)]);
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
        let state = self.state(partition);
        *state.latency.entry(bucket).or_default() += 1;
        state.batch.latency.insert(bucket);
        self.report_symbols_in_memory();
        Ok(())
    }

    /// Reads the partition's figures (merging what the earlier layout left there), so a
    /// replica taking a partition over continues exactly where the last owner committed.
    async fn partition_acquired(&mut self, partition: Partition) -> Result<(), HandlerError> {
        self.partitions.remove(&partition);
        self.load(partition).await
    }

    fn partition_released(&mut self, partition: Partition) {
        // What this consumer holds may not have been committed; the next owner (or this one,
        // reloading) reads Redis.
        self.partitions.remove(&partition);
        self.report_symbols_in_memory();
    }

    /// The batch's changes, applied with its acknowledgement (so each event counts once):
    /// one HSET of the changed symbols' figures, the bars closed (one ZADD per closed-bar
    /// set, a ZREM of the previous version of a closed bar a late trade changed), the
    /// changed latency buckets, and the closed-bar sets (and layout 1's bar sets) that fell
    /// out of the retention.
    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        let retention = self.retention;
        let keys = &self.keys;
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        let delta = std::mem::take(&mut state.batch);
        let int = |v: u64| v.to_string().into_bytes();
        let mut removed: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut unlinked: BTreeSet<String> = BTreeSet::new();
        if let Some(migration) = &delta.migration {
            for (key, member) in &migration.taken_bars {
                removed
                    .entry(key.clone())
                    .or_default()
                    .push(member.clone().into_bytes());
            }
            unlinked.extend(migration.merged_keys.iter().cloned());
        }
        if !delta.stats.is_empty() {
            let mut args = Vec::with_capacity(delta.stats.len() * 2);
            for symbol in &delta.stats {
                if let Some(stats) = state.symbols.get(symbol) {
                    args.push(symbol.clone().into_bytes());
                    args.push(stats.encode());
                }
            }
            args.push(store::HEADER.as_bytes().to_vec());
            args.push(store::STATS_LAYOUT.to_vec());
            out.command("HSET", keys.stats(partition), args);
        }

        // Closed bars, into the set of their epoch; those beyond the retention are dropped.
        let mut added: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut new_epochs = Vec::new();
        for ((interval, symbol, t), closed) in delta.closed {
            if state.expired(interval, t, retention.of(interval)) {
                continue;
            }
            let epoch = t / interval.epoch_ms();
            let key = keys.closed_bars(partition, interval, epoch);
            let member = closed.bar.member(&symbol);
            match closed.stored {
                Some(stored) if stored == (key.clone(), member.clone()) => continue,
                Some((old_key, old_member)) => removed
                    .entry(old_key)
                    .or_default()
                    .push(old_member.into_bytes()),
                None => {}
            }
            let set = added.entry(key.clone()).or_default();
            set.push(b"0".to_vec());
            set.push(member.clone().into_bytes());
            if state.epochs[interval.index()].insert(epoch) {
                new_epochs.push(format!("{} {epoch}", interval.name()).into_bytes());
            }
            let previous = state.previous.entry((symbol, interval));
            let closed = Closed {
                bar: closed.bar,
                stored: Some((key, member)),
            };
            match previous {
                std::collections::hash_map::Entry::Occupied(mut known) => {
                    if known.get().bar.t <= t {
                        known.insert(closed);
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(closed);
                }
            }
        }

        // What fell out of the retention: whole epochs, and layout 1's sets whose newest bar
        // is older than it.
        let mut old_epochs = Vec::new();
        let mut legacy_index = Vec::new();
        let mut legacy_gone = Vec::new();
        for interval in Interval::ALL {
            let index = interval.index();
            let cutoff = state.newest[index].saturating_sub(retention.of(interval));
            let first_kept = cutoff / interval.epoch_ms();
            let expired: Vec<u64> = state.epochs[index].range(..first_kept).copied().collect();
            for epoch in expired {
                state.epochs[index].remove(&epoch);
                unlinked.insert(keys.closed_bars(partition, interval, epoch));
                old_epochs.push(format!("{} {epoch}", interval.name()).into_bytes());
            }
            state.legacy_bars[index].retain(|symbol, newest| {
                let field = format!("{} {symbol}", interval.name()).into_bytes();
                if *newest < cutoff {
                    unlinked.insert(keys.legacy_bars(symbol, interval));
                    legacy_gone.push(field);
                    false
                } else {
                    if delta.migration.is_some() {
                        legacy_index.push(field);
                        legacy_index.push(int(*newest));
                    }
                    true
                }
            });
            state
                .previous
                .retain(|(_, i), closed| *i != interval || closed.bar.t >= cutoff);
        }

        for (key, members) in removed {
            out.command("ZREM", key, members);
        }
        for (key, members) in added {
            out.command("ZADD", key, members);
        }
        if !new_epochs.is_empty() {
            out.command("SADD", keys.closed_bar_epochs(partition), new_epochs);
        }
        if !old_epochs.is_empty() {
            out.command("SREM", keys.closed_bar_epochs(partition), old_epochs);
        }
        if !legacy_index.is_empty() {
            out.command("HSET", keys.legacy_bars_index(partition), legacy_index);
        }
        if !legacy_gone.is_empty() {
            out.command("HDEL", keys.legacy_bars_index(partition), legacy_gone);
        }
        for key in unlinked {
            out.command("UNLINK", key, Vec::new());
        }
        if !delta.latency.is_empty() {
            let mut args = Vec::with_capacity(delta.latency.len() * 2);
            for bucket in delta.latency {
                args.push(int(bucket));
                args.push(int(state.latency.get(&bucket).copied().unwrap_or(0)));
            }
            out.command("HSET", keys.latency(partition), args);
        }
        if delta.unknown_symbols {
            let args = state
                .unknown_symbols
                .iter()
                .flat_map(|(code, count)| [code.clone().into_bytes(), int(*count)])
                .collect();
            out.command("HSET", keys.unknown_symbols(partition), args);
        }
    }
}

#[cfg(test)]
mod tests {
    use streams_core::{Handler as _, KeySpace};

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
            for (code, count) in &aggregator.partitions[&partition].unknown_symbols {
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
