//! The health/admin HTTP router every service mounts.
//!
//! | route                               | what                                                  |
//! |-------------------------------------|-------------------------------------------------------|
//! | `GET /livez`                        | the process is up (no Redis call)                     |
//! | `GET /readyz`                       | Redis answers and the groups exist; 503 with a reason |
//! | `GET /metrics`                      | Prometheus text                                       |
//! | `GET /admin/status`                 | per stage and partition: length, lag, pending, owner, consumers, DLQ, counters (cached 1 s) |
//! | `POST /admin/dlq/replay`            | `?stage=G[&partition=P][&count=N]`: dead letters back into their stream (token) |
//! | `DELETE /admin/consumers/{stage}/{consumer}` | delete a consumer from a group (token)       |
//!
//! Mutating routes need `Authorization: Bearer <ADMIN_TOKEN>` (401 otherwise) and are
//! disabled (403) when `ADMIN_TOKEN` is unset.
//!
//! Redis's own error text never reaches a client: it is logged, and the client is told
//! that Redis is unreachable or unavailable.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::{
    admin_ops::{self, PartitionStatus},
    config::Secret,
    connection::Redis,
    error::StreamsError,
    stage::ConsumeMode,
    stats::{StageCounters, StageStats, Stats},
};

/// What the admin router needs.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Redis, for readiness and status.
    pub redis: Redis,
    /// The stages of this process.
    pub stats: Stats,
    /// `ADMIN_TOKEN`; `None` disables mutating routes.
    pub admin_token: Option<Secret<String>>,
    /// The Prometheus recorder's handle, for `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// The service's name, shown in status.
    pub service: String,
}

/// How long a computed `/admin/status` is served to every request that asks for it.
/// A status costs Redis five commands per partition of every stage; with this cache,
/// polling it costs at most one such computation per second however often it is polled,
/// so dashboards and scripts cannot crowd the stages out of Redis or the pool.
pub const STATUS_CACHE_TTL: Duration = Duration::from_secs(1);

/// The router; merge it into the service's own.
pub fn router(state: AdminState) -> Router {
    let status_cache = Arc::new(StatusCache::default());
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/admin/status",
            get(move |State(state): State<Arc<AdminState>>| async move {
                status(&state, &status_cache).await
            }),
        )
        .route("/admin/dlq/replay", post(replay))
        .route(
            "/admin/consumers/{stage}/{consumer}",
            delete(delete_consumer),
        )
        .with_state(Arc::new(state))
}

/// An error as the admin API shows it: a status and a JSON `{"error": ...}` body.
#[derive(Debug, Clone)]
struct ApiError(StatusCode, String);

impl ApiError {
    /// A Redis failure during `action`: the detail goes to the log, not to the client.
    fn redis(action: &str, error: &StreamsError) -> Self {
        tracing::warn!(error = %error, "{action} failed: redis error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis unavailable (the service log has the detail)".into(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if let Err(e) = state.redis.ping(Duration::from_millis(500)).await {
        // Redis's error text can name hosts, users and internals: it is logged, not served.
        tracing::warn!(redis = state.redis.display_url(), error = %e, "readiness: redis unreachable");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "redis unreachable" })),
        )
            .into_response();
    }
    let not_ready: Vec<String> = state
        .stats
        .stages()
        .iter()
        .filter(|s| !s.groups_ready.load(std::sync::atomic::Ordering::Relaxed))
        .map(|s| s.group.clone())
        .collect();
    if !not_ready.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": format!("consumer groups not ready: {}", not_ready.join(", ")) })),
        )
            .into_response();
    }
    (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed\n").into_response(),
    }
}

/// `/admin/status` body.
#[derive(Debug, Clone, Serialize)]
struct Status {
    service: String,
    stages: Vec<StageStatus>,
}

#[derive(Debug, Clone, Serialize)]
struct StageStatus {
    group: String,
    mode: &'static str,
    counters: StageCounters,
    partitions: Vec<PartitionStatus>,
}

/// The partitions' state last read from Redis (or the failure), and when it was read. The
/// in-process counters are not cached: they cost nothing and must not lag.
/// Every stage's partitions as read, or why they could not be.
type PartitionsRead = Result<Vec<Vec<PartitionStatus>>, ApiError>;

#[derive(Debug, Default)]
struct StatusCache {
    /// Held while the partitions are read, so that concurrent requests wait for that one
    /// read and share its result instead of each starting their own.
    last: tokio::sync::Mutex<Option<(Instant, PartitionsRead)>>,
}

async fn status(state: &AdminState, cache: &StatusCache) -> Result<Json<Status>, ApiError> {
    let stats = state.stats.stages();
    let partitions = {
        let mut last = cache.last.lock().await;
        match last.as_ref() {
            Some((read_at, outcome))
                if read_at.elapsed() < STATUS_CACHE_TTL
                    && outcome.as_ref().map_or(true, |p| p.len() == stats.len()) =>
            {
                outcome.clone()
            }
            _ => {
                // A failure is cached too: while Redis is down, polling must not retry it
                // per request.
                let outcome = read_partitions(state, &stats).await;
                *last = Some((Instant::now(), outcome.clone()));
                outcome
            }
        }
    }?;
    let stages = stats
        .iter()
        .zip(partitions)
        .map(|(stage, partitions)| StageStatus {
            group: stage.group.clone(),
            mode: if stage.mode == ConsumeMode::Owned {
                "owned"
            } else {
                "shared"
            },
            counters: stage.counters(),
            partitions,
        })
        .collect();
    Ok(Json(Status {
        service: state.service.clone(),
        stages,
    }))
}

/// One round trip to Redis per stage (see [`admin_ops::partition_statuses`]).
async fn read_partitions(
    state: &AdminState,
    stages: &[Arc<crate::stats::StageStats>],
) -> PartitionsRead {
    let mut all = Vec::with_capacity(stages.len());
    for stage in stages {
        let owned = stage.mode == ConsumeMode::Owned;
        all.push(
            admin_ops::partition_statuses(&state.redis, &stage.sources, &stage.group, owned)
                .await
                .map_err(|e| ApiError::redis("admin status", &e))?,
        );
    }
    Ok(all)
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state
        .admin_token
        .as_ref()
        .map(Secret::expose_secret)
        .filter(|t| !t.is_empty())
    else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "admin actions are disabled: ADMIN_TOKEN is not set".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !tokens_match(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ));
    }
    Ok(())
}

/// Whether the token a client sent equals the expected one, in a time that depends only on
/// the length of what was sent: neither where the first difference is nor the expected
/// token's length shows in the timing. (`subtle`'s slice comparison returns at once on a
/// length mismatch, which would tell a client the token's length.) Every byte sent is
/// compared with the expected byte at the same position, wrapping around; the lengths are
/// compared in constant time too. `expected` must not be empty.
fn tokens_match(given: &[u8], expected: &[u8]) -> bool {
    let mut equal = (given.len() as u64).ct_eq(&(expected.len() as u64));
    for (position, byte) in given.iter().enumerate() {
        equal &= byte.ct_eq(&expected[position % expected.len()]);
    }
    equal.into()
}

fn find_stage(state: &AdminState, group: &str) -> Result<Arc<StageStats>, ApiError> {
    state.stats.stage(group).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no stage `{group}` in this service"),
        )
    })
}

#[derive(Debug, Deserialize)]
struct ReplayQuery {
    stage: String,
    partition: Option<u32>,
    count: Option<u64>,
}

async fn replay(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(query): Query<ReplayQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let stage = find_stage(&state, &query.stage)?;
    let count = query.count.unwrap_or(1000).clamp(1, 100_000);
    let mut replayed = 0;
    for source in stage
        .sources
        .iter()
        .filter(|s| query.partition.is_none_or(|p| p == s.partition))
    {
        replayed += admin_ops::replay_dead_letters(&state.redis, source, count)
            .await
            .map_err(|e| ApiError::redis("dead-letter replay", &e))?;
    }
    tracing::info!(stage = %query.stage, partition = ?query.partition, replayed, "dead letters replayed");
    Ok(Json(json!({ "replayed": replayed })))
}

async fn delete_consumer(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((group, consumer)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
    let stage = find_stage(&state, &group)?;
    let dropped = admin_ops::delete_consumer(&state.redis, &stage.sources, &group, &consumer)
        .await
        .map_err(|e| ApiError::redis("consumer deletion", &e))?;
    tracing::warn!(%group, %consumer, dropped, "consumer deleted by admin");
    Ok(Json(
        json!({ "deleted": consumer, "pending_dropped": dropped }),
    ))
}

#[cfg(test)]
mod tests {
    use super::tokens_match;

    #[test]
    fn only_the_exact_token_matches() {
        let expected = b"it-admin-token";
        assert!(tokens_match(b"it-admin-token", expected));
        for wrong in [
            &b""[..],
            b"it-admin-toke",
            b"it-admin-tokenx",
            b"it-admin-tokem",
            b"jt-admin-token",
            b"it-admin-tokenit-admin-token",
            b"IT-ADMIN-TOKEN",
        ] {
            assert!(
                !tokens_match(wrong, expected),
                "{}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert!(tokens_match(b"x", b"x"));
        assert!(!tokens_match(b"xx", b"x"), "a repeat of a short token");
    }
}
