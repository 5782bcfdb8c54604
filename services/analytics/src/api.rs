//! The analytics query API.
//!
//! - `GET /v1/symbols/{symbol}/stats`: `symbol`, `trades`, `volume`, `vwap`, `last_price`,
//!   `ticks`, `last_tick_price`, `executions` (counts by status).
//! - `GET /v1/symbols/{symbol}/bars?interval=1s|1m&from=MS&to=MS`: bars, oldest first
//!   (`from`/`to` in ms since the epoch; default: the last hour).
//! - `GET /v1/latency`: end-to-end latency percentiles in µs over every partition.
//! - `GET /v1/unknown-symbols`: how many orders and cancels transform rejected because the
//!   reference data does not know their symbol (`rejections`, and `by_code`:
//!   `unknown_symbol`, `instrument_unavailable`), over every partition. They are counted
//!   here, not per symbol: `/v1/symbols/{symbol}/stats` of such a symbol stays empty.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};
use streams_core::Redis;

use crate::{
    aggregate::{AnalyticsKeys, Interval, Retention},
    latency,
};

#[derive(Clone, Debug)]
struct ApiState {
    redis: Redis,
    keys: AnalyticsKeys,
    retention: Retention,
}

/// The query routes; bars are shown for `retention` back from each symbol's newest.
pub fn router(redis: Redis, keys: AnalyticsKeys, retention: Retention) -> Router {
    Router::new()
        .route("/v1/symbols/{symbol}/stats", get(stats))
        .route("/v1/symbols/{symbol}/bars", get(bars))
        .route("/v1/latency", get(latency_percentiles))
        .route("/v1/unknown-symbols", get(unknown_symbols))
        .with_state(ApiState {
            redis,
            keys,
            retention,
        })
}

#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::BadRequest(m) => {
                (StatusCode::BAD_REQUEST, Json(json!({ "error": m }))).into_response()
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "analytics query failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "error": "Redis is unavailable" })),
                )
                    .into_response()
            }
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn normalize_symbol(symbol: &str) -> Result<String, ApiError> {
    let symbol = symbol.trim().to_ascii_uppercase();
    if symbol.is_empty() || symbol.len() > 32 {
        return Err(ApiError::BadRequest(
            "symbol must be 1 to 32 characters".into(),
        ));
    }
    Ok(symbol)
}

async fn stats(
    State(state): State<ApiState>,
    Path(symbol): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let symbol = normalize_symbol(&symbol)?;
    let mut conn = state.redis.pooled().await.map_err(unavailable)?;
    let stats = state
        .keys
        .symbol_stats(&mut *conn, &symbol)
        .await
        .map_err(unavailable)?;
    let price = |p: Option<i64>| p.map(|p| p as f64 / 1e6);
    let volume = stats.volume;
    Ok(Json(json!({
        "symbol": symbol,
        "trades": stats.trades,
        "volume": volume,
        "vwap": if volume > 0 { Some(stats.notional / volume as f64) } else { None },
        "last_price": price(stats.last_price_e6),
        "ticks": stats.ticks,
        "last_tick_price": price(stats.last_tick_price_e6),
        "executions": stats.executions,
    })))
}

#[derive(Debug, Deserialize)]
struct BarsQuery {
    interval: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
}

async fn bars(
    State(state): State<ApiState>,
    Path(symbol): Path<String>,
    Query(query): Query<BarsQuery>,
) -> Result<Json<Value>, ApiError> {
    let symbol = normalize_symbol(&symbol)?;
    let interval_name = query.interval.as_deref().unwrap_or("1s");
    let interval = Interval::parse(interval_name).ok_or_else(|| {
        ApiError::BadRequest(format!("interval must be 1s or 1m, not {interval_name:?}"))
    })?;
    let now_ms = streams_core::envelope::now_micros() / 1000;
    let to = query.to.unwrap_or(now_ms);
    let from = query.from.unwrap_or(to.saturating_sub(3_600_000));
    if from > to {
        return Err(ApiError::BadRequest("from must not be after to".into()));
    }
    let mut conn = state.redis.pooled().await.map_err(unavailable)?;
    let bars: Vec<Value> = state
        .keys
        .symbol_bars(
            &mut *conn,
            &symbol,
            interval,
            (from, to),
            state.retention.of(interval),
        )
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|b| {
            json!({
                "start_ms": b.t, "open": b.o as f64 / 1e6, "high": b.h as f64 / 1e6,
                "low": b.l as f64 / 1e6, "close": b.c as f64 / 1e6, "volume": b.v, "trades": b.n,
            })
        })
        .collect();
    Ok(Json(
        json!({ "symbol": symbol, "interval": interval.name(), "bars": bars }),
    ))
}

async fn latency_percentiles(
    State(state): State<ApiState>,
) -> Result<Json<latency::Percentiles>, ApiError> {
    let mut conn = state.redis.pooled().await.map_err(unavailable)?;
    let merged = state
        .keys
        .latency_histogram(&mut *conn)
        .await
        .map_err(unavailable)?;
    let list: Vec<(u64, u64)> = merged.into_iter().collect();
    Ok(Json(latency::percentiles(&list)))
}

async fn unknown_symbols(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let mut conn = state.redis.pooled().await.map_err(unavailable)?;
    let by_code = state
        .keys
        .unknown_symbol_rejections(&mut *conn)
        .await
        .map_err(unavailable)?;
    let rejections: u64 = by_code.values().sum();
    Ok(Json(
        json!({ "rejections": rejections, "by_code": by_code }),
    ))
}
