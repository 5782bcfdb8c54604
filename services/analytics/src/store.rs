//! How analytics keeps its figures in Redis: the layout and its encoding, reading a
//! partition back when a replica takes it over (and moving what the earlier per-symbol
//! layout stored), and the query API's readers.
//!
//! # Layout
//!
//! Per partition, under its hash tag ([`KeySpace::partition_state`], `…:state:analytics:`):
//! - `stats` hash: symbol → the symbol's [`SymbolStats`] ([`SymbolStats::encode`]): counts, last prices, and
//!   its newest bar at each interval (the bar in progress); and a field [`HEADER`];
//! - `closed_bars:{1s|1m}:{epoch}` sorted sets: every other bar of the partition's symbols
//!   whose start falls in the epoch (`epoch = start / interval's epoch length`,
//!   [`Interval::epoch_ms`]: 10 min of 1 s bars, a day of 1 min bars), all scored 0 and
//!   ordered by their member, `"{symbol} {start, 20 digits} {open} {high} {low} {close}
//!   {volume} {trades}"`, so that one symbol's bars over a time range are one `ZRANGEBYLEX`
//!   per epoch;
//! - `closed_bar_epochs` set: `"{1s|1m} {epoch}"` of every closed-bar set that exists;
//! - `legacy_bars` hash: `"{1s|1m} {symbol}"` → the newest start in that symbol's sorted
//!   set of layout 1 (below), while it still holds bars;
//! - `latency` hash: latency bucket floor (µs) → count ([`crate::latency`]);
//! - `unknown_symbols` hash: reject code → count.
//!
//! A batch writes one HSET of `stats` (every symbol it changed), one ZADD per closed-bar
//! set it closed bars into (a bar is written when the next one of its symbol opens, not at
//! every trade), one HSET of `latency`: a fixed number of commands, whatever the number of
//! symbols. Bars are kept for the interval's retention counted back from the newest bar of
//! the partition: a closed-bar set is deleted (`UNLINK`, freed in the background) when its
//! whole epoch is older than that, so at most one epoch length more is kept; the query API
//! shows a symbol's bars of the retention counted back from that symbol's newest bar, as
//! layout 1 kept them.
//!
//! # Layout 1
//!
//! Until December 2026 analytics kept, per symbol, a hash `stats:{symbol}` (counts as
//! fields) and a sorted set per interval `bars:{1s|1m}:{symbol}` (score: start, member: the
//! bar as JSON), and the histogram in `latency_us`. Every commit of that version wrote
//! `latency_us`, so a partition holding anything of layout 1 has it: a replica taking the
//! partition over finds it with one `EXISTS`, then lists the partition's keys ([`load`],
//! SCAN on the partition's node) and merges them into what it loaded: counts are added,
//! each symbol's newest bar joins its bar in progress, and the older bars stay in their
//! set, which the query API reads too (`legacy_bars` names them) until they are older than
//! the retention and deleted. The partition's next commit writes the merged figures and
//! deletes what was merged, atomically with its acknowledgement; until then the query API
//! adds the old keys to the new ones, so an answer never misses or doubles a count. Since
//! the merge adds, the counts of a replica of the earlier version that runs on the
//! partition meanwhile (a rolling upgrade) are merged too, at the next takeover.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use streams_core::{KeySpace, Partition};
use tickflow_proto::topology::ANALYTICS_GROUP;

/// The field every HSET of `stats` also writes, with the layout described in its value,
/// longer than Redis's `hash-max-listpack-value` (64 bytes): Redis then keeps the hash as a
/// hash table, where an HSET of a batch's symbols costs a lookup each, not a scan of the
/// whole hash each (its compact encoding, used for up to 512 short fields).
pub const HEADER: &str = "~layout";

pub(crate) const STATS_LAYOUT: &[u8] =
    b"tickflow analytics layout 2: {symbol} -> its figures and bars in progress, as JSON";

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

    /// How much time one closed-bar set of this interval covers, in ms: the most kept past
    /// the retention, and what a query of one hour (1 s bars) or one week (1 min bars)
    /// reads at most 7 or 8 sets for.
    pub fn epoch_ms(self) -> u64 {
        match self {
            Interval::Second => 600_000,
            Interval::Minute => 86_400_000,
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

    /// 0 or 1, for arrays indexed by interval.
    pub(crate) fn index(self) -> usize {
        self as usize
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

impl Bar {
    /// An empty bar starting at `t`.
    pub fn empty(t: u64) -> Self {
        Bar {
            t,
            o: 0,
            h: 0,
            l: 0,
            c: 0,
            v: 0,
            n: 0,
        }
    }

    /// Counts one trade.
    pub fn add(&mut self, price_e6: i64, qty: u64) {
        if self.n == 0 {
            self.o = price_e6;
            self.h = price_e6;
            self.l = price_e6;
        }
        self.h = self.h.max(price_e6);
        self.l = self.l.min(price_e6);
        self.c = price_e6;
        self.v = self.v.saturating_add(qty);
        self.n += 1;
    }

    /// Adds `later`, a bar of the same start counted from trades after this one's.
    pub fn merge(&mut self, later: &Bar) {
        if later.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = later.clone();
            return;
        }
        self.h = self.h.max(later.h);
        self.l = self.l.min(later.l);
        self.c = later.c;
        self.v = self.v.saturating_add(later.v);
        self.n += later.n;
    }

    /// Its member in a closed-bar set.
    pub(crate) fn member(&self, symbol: &str) -> String {
        format!(
            "{symbol} {:020} {} {} {} {} {} {}",
            self.t, self.o, self.h, self.l, self.c, self.v, self.n
        )
    }

    /// Reads a closed-bar set's member: the symbol and the bar.
    pub(crate) fn parse_member(member: &str) -> Option<(&str, Bar)> {
        let mut parts = member.split(' ');
        let symbol = parts.next()?;
        let mut number = || parts.next();
        let bar = Bar {
            t: number()?.parse().ok()?,
            o: number()?.parse().ok()?,
            h: number()?.parse().ok()?,
            l: number()?.parse().ok()?,
            c: number()?.parse().ok()?,
            v: number()?.parse().ok()?,
            n: number()?.parse().ok()?,
        };
        parts.next().is_none().then_some((symbol, bar))
    }
}

/// One symbol's figures (a field of the partition's `stats` hash, [`SymbolStats::encode`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SymbolStats {
    /// Trades counted.
    pub trades: u64,
    /// Their summed quantity.
    pub volume: u64,
    /// Their summed price × quantity.
    pub notional: f64,
    /// The last trade's price.
    pub last_price_e6: Option<i64>,
    /// Ticks counted.
    pub ticks: u64,
    /// The last tick's price.
    pub last_tick_price_e6: Option<i64>,
    /// Execution reports counted, by status (`filled`, ...).
    pub executions: BTreeMap<String, u64>,
    /// The symbol's newest 1 s bar (in progress; older ones are closed bars).
    pub second: Option<Bar>,
    /// The symbol's newest 1 min bar.
    pub minute: Option<Bar>,
}

impl SymbolStats {
    /// The newest bar at `interval`.
    pub fn bar(&self, interval: Interval) -> Option<&Bar> {
        match interval {
            Interval::Second => self.second.as_ref(),
            Interval::Minute => self.minute.as_ref(),
        }
    }

    pub(crate) fn bar_mut(&mut self, interval: Interval) -> &mut Option<Bar> {
        match interval {
            Interval::Second => &mut self.second,
            Interval::Minute => &mut self.minute,
        }
    }

    /// Layout 1's hash (`stats:{symbol}`); a field that does not parse counts as absent.
    pub(crate) fn from_legacy_hash(hash: &HashMap<String, String>) -> Self {
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
            second: None,
            minute: None,
        }
    }

    /// Adds the counts of `later` (counted after this one's: its last prices win). Bars are
    /// not merged here.
    pub(crate) fn add_counts(&mut self, later: &SymbolStats) {
        self.trades += later.trades;
        self.volume = self.volume.saturating_add(later.volume);
        self.notional += later.notional;
        self.last_price_e6 = later.last_price_e6.or(self.last_price_e6);
        self.ticks += later.ticks;
        self.last_tick_price_e6 = later.last_tick_price_e6.or(self.last_tick_price_e6);
        for (status, count) in &later.executions {
            *self.executions.entry(status.clone()).or_default() += count;
        }
    }

    /// `{trades} {volume} {notional} {last price or -} {ticks} {last tick price or -};
    /// {status}={count},…;{1 s bar};{1 min bar}`, a bar as `{start} {open} {high} {low}
    /// {close} {volume} {trades}` or empty. Compact, because every batch writes the value of
    /// every symbol it changed, and the bytes of a commit cost Redis time (~1.4 ns a byte,
    /// measured: this is half as long as the same as JSON).
    pub(crate) fn encode(&self) -> Vec<u8> {
        use std::fmt::Write;
        let price = |p: Option<i64>| p.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let mut text = format!(
            "{} {} {} {} {} {};",
            self.trades,
            self.volume,
            self.notional,
            price(self.last_price_e6),
            self.ticks,
            price(self.last_tick_price_e6)
        );
        for (i, (status, count)) in self.executions.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(text, "{comma}{status}={count}");
        }
        for bar in [&self.second, &self.minute] {
            text.push(';');
            if let Some(b) = bar {
                let _ = write!(
                    text,
                    "{} {} {} {} {} {} {}",
                    b.t, b.o, b.h, b.l, b.c, b.v, b.n
                );
            }
        }
        text.into_bytes()
    }

    pub(crate) fn decode(text: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(text).map_err(|e| e.to_string())?;
        let bad = || format!("{text:?} is not `counts;executions;bar;bar`");
        let mut sections = text.split(';');
        let (Some(counts), Some(executions), Some(second), Some(minute), None) = (
            sections.next(),
            sections.next(),
            sections.next(),
            sections.next(),
            sections.next(),
        ) else {
            return Err(bad());
        };
        let counts: Vec<&str> = counts.split(' ').collect();
        let [trades, volume, notional, last, ticks, last_tick] = counts[..] else {
            return Err(bad());
        };
        let number = |t: &str| t.parse::<u64>().map_err(|_| bad());
        let price = |t: &str| match t {
            "-" => Ok(None),
            p => p.parse::<i64>().map(Some).map_err(|_| bad()),
        };
        let bar = |t: &str| -> Result<Option<Bar>, String> {
            if t.is_empty() {
                return Ok(None);
            }
            let n: Vec<&str> = t.split(' ').collect();
            let [t, o, h, l, c, v, n] = n[..] else {
                return Err(bad());
            };
            let int = |x: &str| x.parse::<i64>().map_err(|_| bad());
            Ok(Some(Bar {
                t: number(t)?,
                o: int(o)?,
                h: int(h)?,
                l: int(l)?,
                c: int(c)?,
                v: number(v)?,
                n: number(n)?,
            }))
        };
        let mut counted = BTreeMap::new();
        for pair in executions.split(',').filter(|p| !p.is_empty()) {
            let (status, count) = pair.split_once('=').ok_or_else(bad)?;
            counted.insert(status.to_owned(), number(count)?);
        }
        Ok(SymbolStats {
            trades: number(trades)?,
            volume: number(volume)?,
            notional: notional.parse().map_err(|_| bad())?,
            last_price_e6: price(last)?,
            ticks: number(ticks)?,
            last_tick_price_e6: price(last_tick)?,
            executions: counted,
            second: bar(second)?,
            minute: bar(minute)?,
        })
    }
}

/// Where analytics keeps its figures ([module docs](self)), and the query API's readers.
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

    /// Every partition.
    pub fn partitions(&self) -> impl Iterator<Item = Partition> {
        self.keys.all_partitions()
    }

    fn state(&self, name: &str, partition: Partition) -> String {
        self.keys.partition_state(ANALYTICS_GROUP, name, partition)
    }

    /// The figures of `partition`'s symbols (hash: symbol → [`SymbolStats`] JSON).
    pub fn stats(&self, partition: Partition) -> String {
        self.state("stats", partition)
    }

    /// The closed bars at `interval` of `partition` whose start is in `epoch`.
    pub fn closed_bars(&self, partition: Partition, interval: Interval, epoch: u64) -> String {
        self.state(
            &format!("closed_bars:{}:{epoch}", interval.name()),
            partition,
        )
    }

    /// The closed-bar sets of `partition` that exist (set of `"{interval} {epoch}"`).
    pub fn closed_bar_epochs(&self, partition: Partition) -> String {
        self.state("closed_bar_epochs", partition)
    }

    /// Layout 1's bar sets that still hold bars (hash: `"{interval} {symbol}"` → newest
    /// start).
    pub fn legacy_bars_index(&self, partition: Partition) -> String {
        self.state("legacy_bars", partition)
    }

    /// The latency histogram of `partition`.
    pub fn latency(&self, partition: Partition) -> String {
        self.state("latency", partition)
    }

    /// The counts of `partition`'s rejections of symbols the reference data does not know,
    /// by reject code.
    pub fn unknown_symbols(&self, partition: Partition) -> String {
        self.state("unknown_symbols", partition)
    }

    /// Layout 1: the statistics hash of `symbol`.
    pub fn legacy_stats(&self, symbol: &str) -> String {
        self.state(&format!("stats:{symbol}"), self.partition(symbol))
    }

    /// Layout 1: the bar set of `symbol` at `interval`.
    pub fn legacy_bars(&self, symbol: &str, interval: Interval) -> String {
        self.state(
            &format!("bars:{}:{symbol}", interval.name()),
            self.partition(symbol),
        )
    }

    /// Layout 1: the latency histogram of `partition`.
    pub fn legacy_latency(&self, partition: Partition) -> String {
        self.state("latency_us", partition)
    }

    /// Every partition's rejections of unknown symbols, summed by reject code (the query
    /// API's reader).
    pub async fn unknown_symbol_rejections(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Clone + Send),
    ) -> redis::RedisResult<BTreeMap<String, u64>> {
        let hashes: Vec<HashMap<String, u64>> =
            hgetall_each(conn, self.partitions().map(|p| self.unknown_symbols(p))).await?;
        let mut summed = BTreeMap::new();
        for (code, count) in hashes.into_iter().flatten() {
            *summed.entry(code).or_default() += count;
        }
        Ok(summed)
    }

    /// Every partition's latency histogram, merged: bucket floor in µs → count (layout 1's
    /// too, until it is merged). The one reader of the histograms (the query API,
    /// `tickflow top` and `tickflow bench` use it).
    pub async fn latency_histogram(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Clone + Send),
    ) -> redis::RedisResult<BTreeMap<u64, u64>> {
        let keys = self
            .partitions()
            .flat_map(|p| [self.latency(p), self.legacy_latency(p)]);
        let hashes: Vec<HashMap<u64, u64>> = hgetall_each(conn, keys).await?;
        let mut merged = BTreeMap::new();
        for (bucket, count) in hashes.into_iter().flatten() {
            *merged.entry(bucket).or_default() += count;
        }
        Ok(merged)
    }

    /// The figures of `symbol` (none counted: all zero), from both layouts.
    pub async fn symbol_stats(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        symbol: &str,
    ) -> redis::RedisResult<SymbolStats> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET")
            .arg(self.stats(self.partition(symbol)))
            .arg(symbol);
        pipe.cmd("HGETALL").arg(self.legacy_stats(symbol));
        let (stored, legacy): (Option<Vec<u8>>, HashMap<String, String>) =
            pipe.query_async(conn).await?;
        let mut stats = decode_stored(stored)?;
        stats.add_counts(&SymbolStats::from_legacy_hash(&legacy));
        Ok(stats)
    }

    /// The bars of `symbol` at `interval` that start within `from..=to` (ms), oldest first:
    /// those of the `retention_ms` counted back from the symbol's newest bar.
    pub async fn symbol_bars(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        symbol: &str,
        interval: Interval,
        (from, to): (u64, u64),
        retention_ms: u64,
    ) -> redis::RedisResult<Vec<Bar>> {
        let partition = self.partition(symbol);
        let legacy_key = self.legacy_bars(symbol, interval);
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(self.stats(partition)).arg(symbol);
        pipe.cmd("SMEMBERS").arg(self.closed_bar_epochs(partition));
        pipe.cmd("ZRANGE")
            .arg(&legacy_key)
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES");
        let (stored, epochs, legacy_newest): (Option<Vec<u8>>, Vec<String>, Scored) =
            pipe.query_async(conn).await?;
        let current = decode_stored(stored)?.bar(interval).cloned();
        let newest = current
            .iter()
            .map(|bar| bar.t)
            .chain(legacy_newest.iter().map(|(_, t)| *t as u64))
            .max();
        let Some(newest) = newest else {
            return Ok(Vec::new());
        };
        let (from, to) = (
            from.max(newest.saturating_sub(retention_ms)),
            to.min(newest),
        );
        if from > to {
            return Ok(Vec::new());
        }
        let epoch_ms = interval.epoch_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE").arg(&legacy_key).arg(from).arg(to);
        for epoch in parse_epochs(&epochs, interval) {
            if epoch * epoch_ms <= to && (epoch + 1) * epoch_ms > from {
                pipe.cmd("ZRANGEBYLEX")
                    .arg(self.closed_bars(partition, interval, epoch))
                    .arg(format!("[{symbol} {from:020}"))
                    .arg(format!("({symbol} {:020}", to + 1));
            }
        }
        let mut replies: Vec<Vec<String>> = pipe.query_async(conn).await?;
        let legacy = replies.remove(0);
        // Bars of one start in two places (only across a layout 1 replica's run) are merged,
        // layout 1's first.
        let mut bars: BTreeMap<u64, Bar> = BTreeMap::new();
        let mut put = |bar: Bar| match bars.get_mut(&bar.t) {
            Some(known) => known.merge(&bar),
            None => {
                bars.insert(bar.t, bar);
            }
        };
        for json in &legacy {
            if let Ok(bar) = serde_json::from_str::<Bar>(json) {
                put(bar);
            }
        }
        for member in replies.iter().flatten() {
            if let Some((_, bar)) = Bar::parse_member(member) {
                put(bar);
            }
        }
        if let Some(bar) = current.filter(|bar| (from..=to).contains(&bar.t)) {
            put(bar);
        }
        Ok(bars.into_values().collect())
    }
}

/// A ZRANGE … WITHSCORES reply.
type Scored = Vec<(String, f64)>;

/// A `stats` field as read (absent: nothing counted yet).
fn decode_stored(stored: Option<Vec<u8>>) -> redis::RedisResult<SymbolStats> {
    match stored {
        None => Ok(SymbolStats::default()),
        Some(text) => SymbolStats::decode(&text).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "stored statistics are not valid",
                e,
            ))
        }),
    }
}

/// The epochs of `interval` among `closed_bar_epochs`' members.
pub(crate) fn parse_epochs(members: &[String], interval: Interval) -> BTreeSet<u64> {
    members
        .iter()
        .filter_map(|m| {
            m.strip_prefix(interval.name())?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .collect()
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

/// A partition's figures as stored, merged with what layout 1 left there.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) symbols: HashMap<String, SymbolStats>,
    pub(crate) latency: HashMap<u64, u64>,
    pub(crate) unknown_symbols: HashMap<String, u64>,
    /// Per interval, the epochs of the closed-bar sets that exist.
    pub(crate) epochs: [BTreeSet<u64>; 2],
    /// Per interval, layout 1's bar sets that hold bars: symbol → newest start.
    pub(crate) legacy_bars: [HashMap<String, u64>; 2],
    /// What merging layout 1 needs written, if anything was merged.
    pub(crate) migration: Option<Migration>,
}

/// What the commit after a merge of layout 1 writes besides the merged figures.
#[derive(Debug, Default)]
pub(crate) struct Migration {
    /// Keys merged whole: deleted.
    pub(crate) merged_keys: Vec<String>,
    /// Bars of layout 1's sets that became a symbol's bar in progress: removed from there
    /// (key, member).
    pub(crate) taken_bars: Vec<(String, String)>,
    /// Bars in progress that a newer bar of layout 1 closed: (interval, symbol, bar).
    pub(crate) closed: Vec<(Interval, String, Bar)>,
    /// How many symbols had figures in layout 1.
    pub(crate) symbols: usize,
}

/// A `stats` hash as read: symbol → JSON.
type StatsHash = HashMap<String, Vec<u8>>;

/// SCAN pages asked for while looking for layout 1's keys.
const SCAN_COUNT: usize = 1_000;

/// Reads `partition`'s figures ([`Loaded`]), merging layout 1's if the partition has any.
pub(crate) async fn load(
    conn: &mut streams_core::connection::Connection,
    keys: &AnalyticsKeys,
    partition: Partition,
) -> Result<Loaded, String> {
    let error = |e: redis::RedisError| e.to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(keys.stats(partition));
    pipe.cmd("HGETALL").arg(keys.latency(partition));
    pipe.cmd("HGETALL").arg(keys.unknown_symbols(partition));
    pipe.cmd("SMEMBERS").arg(keys.closed_bar_epochs(partition));
    pipe.cmd("HGETALL").arg(keys.legacy_bars_index(partition));
    pipe.cmd("EXISTS").arg(keys.legacy_latency(partition));
    let replies: Vec<redis::Value> = pipe.query_async(conn).await.map_err(error)?;
    let mut replies = replies.into_iter();
    let stats: StatsHash = next_reply(&mut replies)?;
    let latency: HashMap<u64, u64> = next_reply(&mut replies)?;
    let unknown_symbols: HashMap<String, u64> = next_reply(&mut replies)?;
    let epochs: Vec<String> = next_reply(&mut replies)?;
    let legacy_bars: HashMap<String, u64> = next_reply(&mut replies)?;
    let legacy: bool = next_reply(&mut replies)?;
    let mut loaded = Loaded {
        latency,
        unknown_symbols,
        epochs: Interval::ALL.map(|i| parse_epochs(&epochs, i)),
        ..Loaded::default()
    };
    for (symbol, text) in stats {
        if symbol == HEADER {
            continue;
        }
        let stats = SymbolStats::decode(&text)
            .map_err(|e| format!("the stored statistics of {symbol} are invalid: {e}"))?;
        loaded.symbols.insert(symbol, stats);
    }
    for (field, newest) in legacy_bars {
        let Some((interval, symbol)) = field
            .split_once(' ')
            .and_then(|(i, s)| Some((Interval::parse(i)?, s)))
        else {
            continue;
        };
        loaded.legacy_bars[interval.index()].insert(symbol.to_owned(), newest);
    }
    if legacy {
        merge_layout_1(conn, keys, partition, &mut loaded).await?;
    }
    Ok(loaded)
}

/// The next of a pipeline's replies, as a `T`.
fn next_reply<T: redis::FromRedisValue>(
    replies: &mut impl Iterator<Item = redis::Value>,
) -> Result<T, String> {
    let reply = replies.next().ok_or("a reply is missing")?;
    redis::from_redis_value(reply).map_err(|e| e.to_string())
}

/// Finds layout 1's keys of `partition` and merges them into `loaded`.
async fn merge_layout_1(
    conn: &mut streams_core::connection::Connection,
    keys: &AnalyticsKeys,
    partition: Partition,
    loaded: &mut Loaded,
) -> Result<(), String> {
    let error = |e: redis::RedisError| e.to_string();
    let prefix = keys.state("", partition);
    let pattern = format!("{}*", glob_escape(&prefix));
    let scan = redis::Script::new(include_str!("legacy_scan.lua"));
    let mut migration = Migration::default();
    let mut stats_keys = Vec::new();
    let mut bar_keys = Vec::new();
    let mut cursor = String::from("0");
    loop {
        let (next, page): (String, Vec<String>) = scan
            .key(keys.stats(partition))
            .arg(&cursor)
            .arg(&pattern)
            .arg(SCAN_COUNT)
            .invoke_async(conn)
            .await
            .map_err(error)?;
        for key in page {
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(symbol) = name.strip_prefix("stats:") {
                stats_keys.push((symbol.to_owned(), key.clone()));
            } else if let Some((interval, symbol)) = name
                .strip_prefix("bars:")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(i, s)| Some((Interval::parse(i)?, s)))
            {
                bar_keys.push((interval, symbol.to_owned(), key.clone()));
            }
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    // A key SCAN returned twice (as it may while the keyspace is rehashed) is merged once.
    stats_keys.sort();
    stats_keys.dedup();
    bar_keys.sort();
    bar_keys.dedup();

    let latency_key = keys.legacy_latency(partition);
    let latency: HashMap<u64, u64> = redis::cmd("HGETALL")
        .arg(&latency_key)
        .query_async(conn)
        .await
        .map_err(error)?;
    for (bucket, count) in latency {
        *loaded.latency.entry(bucket).or_default() += count;
    }
    migration.merged_keys.push(latency_key);

    for chunk in stats_keys.chunks(SCAN_COUNT) {
        let mut pipe = redis::pipe();
        for (_, key) in chunk {
            pipe.cmd("HGETALL").arg(key);
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(conn).await.map_err(error)?;
        for ((symbol, key), hash) in chunk.iter().zip(hashes) {
            loaded
                .symbols
                .entry(symbol.clone())
                .or_default()
                .add_counts(&SymbolStats::from_legacy_hash(&hash));
            migration.merged_keys.push(key.clone());
        }
    }
    migration.symbols = stats_keys.len();

    for chunk in bar_keys.chunks(SCAN_COUNT) {
        let mut pipe = redis::pipe();
        for (_, _, key) in chunk {
            pipe.cmd("ZRANGE")
                .arg(key)
                .arg(-2)
                .arg(-1)
                .arg("WITHSCORES");
        }
        let tops: Vec<Scored> = pipe.query_async(conn).await.map_err(error)?;
        for ((interval, symbol, key), top) in chunk.iter().zip(tops) {
            let Some((member, score)) = top.last() else {
                continue;
            };
            let mut newest_left = Some(*score as u64);
            if let Ok(bar) = serde_json::from_str::<Bar>(member) {
                let current = loaded
                    .symbols
                    .entry(symbol.clone())
                    .or_default()
                    .bar_mut(*interval);
                let taken = match current {
                    None => {
                        *current = Some(bar);
                        true
                    }
                    Some(known) if known.t < bar.t => {
                        let closed = std::mem::replace(known, bar);
                        migration.closed.push((*interval, symbol.clone(), closed));
                        true
                    }
                    Some(known) if known.t == bar.t => {
                        known.merge(&bar);
                        true
                    }
                    Some(_) => false,
                };
                if taken {
                    migration.taken_bars.push((key.clone(), member.clone()));
                    newest_left = (top.len() == 2).then(|| top[0].1 as u64);
                }
            }
            let index = &mut loaded.legacy_bars[interval.index()];
            match newest_left {
                Some(t) => {
                    index.insert(symbol.clone(), t);
                }
                None => {
                    index.remove(symbol);
                }
            }
        }
    }
    loaded.migration = Some(migration);
    Ok(())
}

/// `text` with the characters SCAN's MATCH treats specially escaped.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_bar_member_reads_back_and_sorts_by_symbol_then_start() {
        let bar = Bar {
            t: 1_733_450_400_000,
            o: 1,
            h: 3,
            l: 1,
            c: 2,
            v: 30,
            n: 3,
        };
        let member = bar.member("BRK.B");
        assert_eq!(Bar::parse_member(&member), Some(("BRK.B", bar.clone())));
        let later = Bar {
            t: bar.t + 1_000,
            ..bar.clone()
        };
        assert!(bar.member("A") < later.member("A"));
        // A symbol that is another's prefix sorts apart from it.
        assert!(later.member("A") < bar.member("A-"));
        assert!(later.member("A") < format!("A {:020}", later.t + 1));
        for bad in [
            "",
            "A",
            "A 1 2 3 4 5 6",
            "A 1 2 3 4 5 6 7 8",
            "A x 2 3 4 5 6 7",
        ] {
            assert_eq!(Bar::parse_member(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counts_add_and_the_later_prices_win() {
        let mut stats = SymbolStats {
            trades: 2,
            volume: 20,
            notional: 3.5,
            last_price_e6: Some(1),
            ticks: 1,
            last_tick_price_e6: Some(7),
            executions: [("filled".to_owned(), 2)].into(),
            ..SymbolStats::default()
        };
        let later = SymbolStats {
            trades: 1,
            volume: 5,
            notional: 1.0,
            last_price_e6: Some(2),
            executions: [("filled".to_owned(), 1), ("accepted".to_owned(), 4)].into(),
            ..SymbolStats::default()
        };
        stats.add_counts(&later);
        assert_eq!(
            (
                stats.trades,
                stats.volume,
                stats.notional,
                stats.last_price_e6
            ),
            (3, 25, 4.5, Some(2))
        );
        assert_eq!((stats.ticks, stats.last_tick_price_e6), (1, Some(7)));
        assert_eq!(
            stats.executions,
            [("accepted".to_owned(), 4), ("filled".to_owned(), 3)].into()
        );
        stats.second = Some(Bar {
            t: 1_000,
            o: 5,
            h: 9,
            l: -1,
            c: 7,
            v: 12,
            n: 3,
        });
        for figures in [stats, SymbolStats::default()] {
            let text = figures.encode();
            assert_eq!(SymbolStats::decode(&text).unwrap(), figures, "{text:?}");
        }
        assert_eq!(
            String::from_utf8(SymbolStats::default().encode()).unwrap(),
            "0 0 0 - 0 -;;;"
        );
        for bad in [
            "",
            "{}",
            "0 0 0 - 0 -;;",
            "0 0 0 - 0;;;",
            "0 0 x - 0 -;;;",
            "0 0 0 - 0 -;a;;",
            "0 0 0 - 0 -;;1 2;",
        ] {
            assert!(SymbolStats::decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scan_patterns_match_the_namespace_literally() {
        assert_eq!(glob_escape("a*b?[c]\\:{1}:"), "a\\*b\\?\\[c\\]\\\\:{1}:");
    }
}
