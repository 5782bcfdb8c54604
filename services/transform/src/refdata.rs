//! Instrument reference data: kept in Redis, loaded from a JSON file, cached in memory and
//! refreshed while the service runs, so it can change without a restart.
//!
//! Redis layout: the hash `{ns}:g:instruments` (field: symbol, value: the instrument's JSON)
//! and the counter `{ns}:g:instruments:version`, bumped on every load. The file format is
//! a JSON array of instruments:
//!
//! ```json
//! [{"symbol": "AAPL", "tick_size": 0.01, "lot_size": 1, "band_bps": 1000,
//!   "name": "Apple Inc.", "currency": "USD"}]
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use streams_core::{KeySpace, Redis, StreamsError};
use tokio_util::sync::CancellationToken;

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
    /// Checks the rules make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.symbol.is_empty() || self.symbol != self.symbol.to_ascii_uppercase() {
            return Err(format!(
                "symbol {:?} must be non-empty upper case",
                self.symbol
            ));
        }
        if !(self.tick_size.is_finite() && self.tick_size > 0.0 && self.tick_size * 1e6 >= 1.0) {
            return Err(format!("{}: tick_size must be ≥ 0.000001", self.symbol));
        }
        if self.lot_size == 0 {
            return Err(format!("{}: lot_size must be ≥ 1", self.symbol));
        }
        Ok(())
    }

    /// The tick in millionths.
    pub fn tick_e6(&self) -> i64 {
        (self.tick_size * 1e6).round() as i64
    }
}

/// Parses a reference data file's text.
pub fn parse(text: &str) -> Result<Vec<Instrument>, RefDataError> {
    let mut instruments: Vec<Instrument> =
        serde_json::from_str(text).map_err(|e| RefDataError::Invalid(e.to_string()))?;
    for instrument in &mut instruments {
        instrument.symbol = instrument.symbol.trim().to_ascii_uppercase();
        instrument.validate().map_err(RefDataError::Invalid)?;
    }
    Ok(instruments)
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

/// The instruments stored in Redis, by symbol. One that does not parse is logged and
/// left out.
pub async fn read_stored(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &KeySpace,
) -> redis::RedisResult<HashMap<String, Instrument>> {
    let raw: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.global("instruments"))
        .query_async(conn)
        .await?;
    let mut instruments = HashMap::with_capacity(raw.len());
    for (symbol, json) in raw {
        match serde_json::from_str::<Instrument>(&json) {
            Ok(instrument) => {
                instruments.insert(symbol, instrument);
            }
            Err(e) => tracing::error!(%symbol, error = %e, "ignoring invalid instrument in Redis"),
        }
    }
    Ok(instruments)
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
        if version == self.snapshot().version && version != 0 {
            return Ok(false);
        }
        let instruments = read_stored(&mut *conn, keys)
            .await
            .map_err(StreamsError::from)?;
        tracing::info!(
            version,
            instruments = instruments.len(),
            "reference data loaded"
        );
        self.replace(Arc::new(Snapshot {
            version,
            instruments,
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
