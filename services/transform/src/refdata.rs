//! Instrument reference data: kept in Redis, loaded from a JSON file, cached in memory and
//! refreshed while the service runs, so it can change without a restart.
//!
//! Redis layout: the hash `{ns}:{g}:instruments` (field: symbol, value: the instrument's JSON)
//! and the counter `{ns}:{g}:instruments:version`, bumped on every load. The file format is
//! a JSON array of instruments:
//!
//! ```json
//! [{"symbol": "AAPL", "tick_size": 0.01, "lot_size": 1, "band_bps": 1000,
//!   "name": "Apple Inc.", "currency": "USD"}]
//! ```
//!
//! What is read from Redis is checked exactly as a file is ([`Instrument::validate`]), since
//! anyone with access to Redis can write the hash: a file with one bad instrument is refused
//! whole, while a bad instrument in Redis is skipped (logged with its reason, counted in the
//! `tickflow_refdata_invalid_instruments` gauge) and the others stay in use. Transform
//! rejects the orders of a skipped symbol as unavailable, naming the reason.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use streams_core::{KeySpace, Redis, StreamsError};
use tickflow_proto::rules;
use tokio_util::sync::CancellationToken;

use crate::normalize::MAX_QTY;

/// The coarsest tick: prices in millionths of many ticks still fit an `i64`, and no market
/// quotes in steps of more than a billion.
pub const MAX_TICK_SIZE: f64 = 1e9;

/// One instrument's trading rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instrument {
    /// Upper-case symbol.
    pub symbol: String,
    /// Price increment (> 0), e.g. 0.01.
    pub tick_size: f64,
    /// Quantity increment in whole units (≥ 1).
    #[serde(default = "one")]
    pub lot_size: u64,
    /// Price band around the last trade or tick, basis points (0: none). The engine enforces it.
    #[serde(default)]
    pub band_bps: u32,
    /// Lowest acceptable limit price, if any.
    #[serde(default)]
    pub min_price: Option<f64>,
    /// Highest acceptable limit price, if any.
    #[serde(default)]
    pub max_price: Option<f64>,
    /// Largest quantity per order, if any.
    #[serde(default)]
    pub max_qty: Option<u64>,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Quote currency.
    #[serde(default)]
    pub currency: String,
}

fn one() -> u64 {
    1
}

/// Why reference data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RefDataError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is not a list of instruments.
    #[error("invalid reference data: {0}")]
    Invalid(String),
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] StreamsError),
}

impl Instrument {
    /// Checks the rules make sense: every number transform divides by, multiplies with or
    /// compares to is in a range where that can neither fail nor overflow, and an order can
    /// satisfy them all.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(problem) = rules::symbol_problem(&self.symbol) {
            return Err(format!("symbol {} {problem}", shown(&self.symbol)));
        }
        if self.symbol != self.symbol.to_ascii_uppercase() {
            return Err(format!("symbol {} must be upper case", shown(&self.symbol)));
        }
        let symbol = &self.symbol;
        if !(self.tick_size.is_finite()
            && self.tick_size * 1e6 >= 1.0
            && self.tick_size <= MAX_TICK_SIZE)
        {
            return Err(format!(
                "{symbol}: tick_size {} must be between 0.000001 and {MAX_TICK_SIZE}",
                self.tick_size
            ));
        }
        if !(1..=MAX_QTY as u64).contains(&self.lot_size) {
            return Err(format!(
                "{symbol}: lot_size {} must be between 1 and {}",
                self.lot_size, MAX_QTY as u64
            ));
        }
        for (name, limit) in [("min_price", self.min_price), ("max_price", self.max_price)] {
            if let Some(price) = limit.filter(|p| !(p.is_finite() && *p > 0.0)) {
                return Err(format!(
                    "{symbol}: {name} {price} must be a positive number"
                ));
            }
        }
        if let (Some(min), Some(max)) = (self.min_price, self.max_price)
            && min > max
        {
            return Err(format!(
                "{symbol}: min_price {min} is above max_price {max}"
            ));
        }
        if let Some(max_qty) = self.max_qty.filter(|max| *max < self.lot_size) {
            return Err(format!(
                "{symbol}: max_qty {max_qty} is below one lot of {}",
                self.lot_size
            ));
        }
        Ok(())
    }

    /// The tick in millionths.
    pub fn tick_e6(&self) -> i64 {
        (self.tick_size * 1e6).round() as i64
    }
}

/// At most this much of a symbol is shown in a message (one read from Redis can be any size).
const SHOWN_SYMBOL_CHARS: usize = 40;

/// `symbol` quoted for a message, cut after [`SHOWN_SYMBOL_CHARS`] characters.
fn shown(symbol: &str) -> String {
    let cut: String = symbol.chars().take(SHOWN_SYMBOL_CHARS).collect();
    if cut.len() < symbol.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The one check of an instrument, wherever it comes from: its symbol upper-cased (so a
/// file may say `aapl`), then [`Instrument::validate`].
fn checked(mut instrument: Instrument) -> Result<Instrument, String> {
    instrument.symbol = instrument.symbol.trim().to_ascii_uppercase();
    instrument.validate()?;
    Ok(instrument)
}

/// Parses a reference data file's text. One invalid instrument refuses the whole file: it
/// is loaded by hand, so the one loading it hears of it at once.
pub fn parse(text: &str) -> Result<Vec<Instrument>, RefDataError> {
    let instruments: Vec<Instrument> =
        serde_json::from_str(text).map_err(|e| RefDataError::Invalid(e.to_string()))?;
    instruments
        .into_iter()
        .map(|instrument| checked(instrument).map_err(RefDataError::Invalid))
        .collect()
}

/// The instruments stored in Redis, checked as a file's are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    /// The valid instruments, by symbol.
    pub instruments: HashMap<String, Instrument>,
    /// The hash fields whose value is not a valid instrument, with why: skipped.
    pub invalid: BTreeMap<String, String>,
}

impl Stored {
    /// Checks each field and value of the instruments hash: the value must be an instrument
    /// that passes the file's checks, stored under its own symbol. Neither needs to be
    /// UTF-8: whatever is there is reported, not failed on.
    pub fn check(raw: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        let mut stored = Self::default();
        for (field, value) in raw {
            let field = String::from_utf8_lossy(&field).into_owned();
            let instrument = serde_json::from_slice::<Instrument>(&value)
                .map_err(|e| format!("not an instrument: {e}"))
                .and_then(checked)
                .and_then(|instrument| {
                    if instrument.symbol == field {
                        Ok(instrument)
                    } else {
                        Err(format!(
                            "stored under the field {}, not under its symbol {}",
                            shown(&field),
                            instrument.symbol
                        ))
                    }
                });
            match instrument {
                Ok(instrument) => {
                    stored.instruments.insert(field, instrument);
                }
                Err(reason) => {
                    stored.invalid.insert(field, reason);
                }
            }
        }
        stored
    }

    /// Logs each invalid instrument, naming its symbol and what is wrong with it.
    fn log_invalid(&self) {
        for (symbol, reason) in &self.invalid {
            tracing::error!(
                symbol = %shown(symbol),
                %reason,
                "skipping an invalid instrument in Redis: its orders are rejected until it is fixed"
            );
        }
    }
}

/// Reads the instruments hash and checks it ([`Stored::check`]).
pub async fn read_checked(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &KeySpace,
) -> redis::RedisResult<Stored> {
    let raw: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(keys.global("instruments"))
        .query_async(conn)
        .await?;
    Ok(Stored::check(raw))
}

/// Loads a file into Redis (replacing what was there) and bumps the version.
pub async fn load_file(redis: &Redis, keys: &KeySpace, path: &str) -> Result<usize, RefDataError> {
    let text = std::fs::read_to_string(path).map_err(|source| RefDataError::Io {
        path: path.to_owned(),
        source,
    })?;
    store(redis, keys, &parse(&text)?).await
}

/// Replaces the instruments in Redis, atomically, and bumps the version.
pub async fn store(
    redis: &Redis,
    keys: &KeySpace,
    instruments: &[Instrument],
) -> Result<usize, RefDataError> {
    let hash = keys.global("instruments");
    let mut pipe = redis::pipe();
    pipe.atomic().del(&hash).ignore();
    for instrument in instruments {
        let json =
            serde_json::to_string(instrument).map_err(|e| RefDataError::Invalid(e.to_string()))?;
        pipe.hset(&hash, &instrument.symbol, json).ignore();
    }
    pipe.incr(keys.global("instruments:version"), 1).ignore();
    let mut conn = redis.pooled().await?;
    let _: () = pipe
        .query_async(&mut *conn)
        .await
        .map_err(StreamsError::from)?;
    Ok(instruments.len())
}

/// The valid instruments stored in Redis, by symbol. One that is invalid is logged and
/// left out.
pub async fn read_stored(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &KeySpace,
) -> redis::RedisResult<HashMap<String, Instrument>> {
    let stored = read_checked(conn, keys).await?;
    stored.log_invalid();
    Ok(stored.instruments)
}

/// The in-memory copy the handler reads.
#[derive(Debug, Clone, Default)]
pub struct RefData {
    current: Arc<RwLock<Arc<Snapshot>>>,
}

/// One version of the reference data.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The version counter it was read at.
    pub version: i64,
    /// Instruments by symbol.
    pub instruments: HashMap<String, Instrument>,
    /// The symbols whose stored instrument is invalid, with why (see [`Stored::invalid`]).
    pub invalid: BTreeMap<String, String>,
}

impl RefData {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("refdata lock").clone()
    }

    /// Installs a snapshot (tests, and `refresh`).
    pub fn replace(&self, snapshot: Arc<Snapshot>) {
        *self.current.write().expect("refdata lock") = snapshot;
    }

    /// Reads Redis if the version changed. Returns whether it did.
    pub async fn refresh(&self, redis: &Redis, keys: &KeySpace) -> Result<bool, RefDataError> {
        let mut conn = redis.pooled().await?;
        let version: Option<i64> = redis::cmd("GET")
            .arg(keys.global("instruments:version"))
            .query_async(&mut *conn)
            .await
            .map_err(StreamsError::from)?;
        let version = version.unwrap_or(0);
        let previous = self.snapshot();
        if version == previous.version && version != 0 {
            return Ok(false);
        }
        let stored = read_checked(&mut *conn, keys)
            .await
            .map_err(StreamsError::from)?;
        // Without a version counter the hash is read on every refresh: say what is wrong
        // when it changes, not every time.
        if version != previous.version || stored.invalid != previous.invalid {
            stored.log_invalid();
            tracing::info!(
                version,
                instruments = stored.instruments.len(),
                invalid = stored.invalid.len(),
                "reference data loaded"
            );
        }
        metrics::gauge!("tickflow_refdata_instruments").set(stored.instruments.len() as f64);
        metrics::gauge!("tickflow_refdata_invalid_instruments").set(stored.invalid.len() as f64);
        self.replace(Arc::new(Snapshot {
            version,
            instruments: stored.instruments,
            invalid: stored.invalid,
        }));
        Ok(true)
    }

    /// Refreshes every `interval` until shutdown.
    pub fn spawn_refresh(
        &self,
        redis: Redis,
        keys: KeySpace,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.cancelled() => return,
                }
                if let Err(e) = this.refresh(&redis, &keys).await {
                    tracing::warn!(error = %e, "reference data refresh failed; keeping the last version");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use streams_core::testing::{RedisServer, unique_namespace};

    use super::*;

    const VALID: &str = r#"{"symbol": "AAPL", "tick_size": 0.01, "lot_size": 1, "band_bps": 1000}"#;

    /// The stored hash `fields`, checked.
    fn check(fields: &[(&str, &str)]) -> Stored {
        Stored::check(
            fields
                .iter()
                .map(|(f, v)| (f.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn stored_instruments_are_checked_like_a_files_and_the_bad_ones_skipped_with_why() {
        let stored = check(&[
            ("AAPL", VALID),
            (
                "LOT",
                r#"{"symbol": "LOT", "tick_size": 0.01, "lot_size": 0}"#,
            ),
            ("TICK", r#"{"symbol": "TICK", "tick_size": 0}"#),
            (
                "BAND",
                r#"{"symbol": "BAND", "tick_size": 0.01, "band_bps": -5}"#,
            ),
            (
                "NUM",
                r#"{"symbol": "NUM", "tick_size": 0.01, "lot_size": "ten"}"#,
            ),
            ("MISS", r#"{"symbol": "MISS"}"#),
            ("JUNK", "not json"),
            ("FIELD", VALID),
            (
                "LIMITS",
                r#"{"symbol": "LIMITS", "tick_size": 0.01, "min_price": 5, "max_price": 1}"#,
            ),
            (
                "QTY",
                r#"{"symbol": "QTY", "tick_size": 0.01, "lot_size": 10, "max_qty": 5}"#,
            ),
            ("HUGE", r#"{"symbol": "HUGE", "tick_size": 1e300}"#),
        ]);
        assert_eq!(
            stored.instruments.keys().collect::<Vec<_>>(),
            vec!["AAPL"],
            "{stored:?}"
        );
        let says = |symbol: &str, what: &str| {
            let reason = &stored.invalid[symbol];
            assert!(reason.contains(what), "{symbol}: {reason}");
        };
        says("LOT", "lot_size 0");
        says("TICK", "tick_size 0");
        says("BAND", "integer `-5`, expected u32");
        says("NUM", "invalid type: string \"ten\", expected u64");
        says("MISS", "missing field `tick_size`");
        says("JUNK", "not an instrument");
        says(
            "FIELD",
            "stored under the field \"FIELD\", not under its symbol AAPL",
        );
        says("LIMITS", "min_price 5 is above max_price 1");
        says("QTY", "max_qty 5 is below one lot of 10");
        says("HUGE", "tick_size");
        assert_eq!(stored.invalid.len(), 10);
    }

    #[test]
    fn bytes_that_are_not_text_are_reported_not_failed_on() {
        let stored = Stored::check(vec![
            (b"AAPL".to_vec(), VALID.as_bytes().to_vec()),
            (vec![0xff, b'X'], VALID.as_bytes().to_vec()),
            (b"BIN".to_vec(), vec![0xff, 0xfe]),
        ]);
        assert_eq!(stored.instruments.len(), 1);
        assert_eq!(stored.invalid.len(), 2, "{stored:?}");
        assert!(stored.invalid["BIN"].contains("not an instrument"));
    }

    #[test]
    fn a_file_with_one_bad_instrument_is_refused_whole_and_symbols_are_upper_cased() {
        let loaded = parse(r#"[{"symbol": " aapl ", "tick_size": 0.01}]"#).unwrap();
        assert_eq!(loaded[0].symbol, "AAPL");
        let refused =
            parse(r#"[{"symbol": "A", "tick_size": 0.01}, {"symbol": "B", "tick_size": 0.01, "lot_size": 0}]"#)
                .unwrap_err();
        assert!(refused.to_string().contains("B: lot_size 0"), "{refused}");
        let refused = parse(r#"[{"symbol": "A B", "tick_size": 0.01}]"#).unwrap_err();
        assert!(refused.to_string().contains("may hold only"), "{refused}");
        let long = format!(
            r#"[{{"symbol": "{}", "tick_size": 0.01}}]"#,
            "A".repeat(1 << 16)
        );
        let refused = parse(&long).unwrap_err().to_string();
        assert!(refused.len() < 200, "{refused}");
    }

    #[tokio::test]
    async fn a_malformed_instrument_written_to_redis_is_skipped_and_the_rest_stays_in_use() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let keys = KeySpace::new(unique_namespace("refdata"), 4);
        let good = |symbol: &str| Instrument {
            symbol: symbol.into(),
            ..serde_json::from_str(VALID).unwrap()
        };
        store(&redis, &keys, &[good("AAPL"), good("MSFT")])
            .await
            .unwrap();
        let refdata = RefData::default();
        assert!(refdata.refresh(&redis, &keys).await.unwrap());
        assert_eq!(refdata.snapshot().instruments.len(), 2);

        // As an operator would break it: HSET one field, bump the version.
        let mut conn = server.connect().await;
        let _: () = redis::pipe()
            .hset(
                keys.global("instruments"),
                "MSFT",
                r#"{"symbol": "MSFT", "tick_size": 0.01, "lot_size": 0}"#,
            )
            .incr(keys.global("instruments:version"), 1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(refdata.refresh(&redis, &keys).await.unwrap());
        let snapshot = refdata.snapshot();
        assert_eq!(
            snapshot.instruments.keys().collect::<Vec<_>>(),
            vec!["AAPL"]
        );
        assert!(snapshot.invalid["MSFT"].contains("lot_size 0"));
        // Its orders are refused with the reason (they divided by the lot of 0 before);
        // the other symbol's go through.
        let transform = crate::normalize::Transform::new(keys.clone(), refdata.clone(), 0.1);
        let order = |symbol: &str| tickflow_proto::v1::NewOrder {
            symbol: symbol.into(),
            side: tickflow_proto::v1::Side::Buy as i32,
            r#type: tickflow_proto::v1::OrderType::Market as i32,
            qty: 5.0,
            client_order_id: "o1".into(),
            ..Default::default()
        };
        let rejection = transform.order(&order("MSFT")).unwrap_err();
        assert_eq!(
            rejection.code,
            tickflow_proto::v1::RejectCode::InstrumentUnavailable
        );
        assert!(rejection.reason.contains("lot_size 0"), "{rejection:?}");
        assert_eq!(transform.order(&order("AAPL")).unwrap().qty, 5);
        // The CLI's reader (tickflow bench --attach) sees the same.
        let valid = read_stored(&mut conn, &keys).await.unwrap();
        assert_eq!(valid.keys().collect::<Vec<_>>(), vec!["AAPL"]);
        // Unchanged version: nothing read again.
        assert!(!refdata.refresh(&redis, &keys).await.unwrap());
    }
}
