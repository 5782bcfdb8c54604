//! The health/admin HTTP router every service mounts.
//!
//! | route                               | what                                                  |
//! |-------------------------------------|-------------------------------------------------------|
//! | `GET /livez`                        | the process is up (no Redis call)                     |
//! | `GET /readyz`                       | Redis answers and the groups exist; 503 with a reason |
//! | `GET /metrics`                      | Prometheus text                                       |
//! | `GET /admin/status`                 | per stage and partition: length, lag, pending, owner, consumers, DLQ, counters |
//! | `POST /admin/dlq/replay`            | `?stage=G[&partition=P][&count=N]`: dead letters back into their stream (token) |
//! | `DELETE /admin/consumers/{stage}/{consumer}` | delete a consumer from a group (token)       |
//!
//! Mutating routes need `Authorization: Bearer <ADMIN_TOKEN>` (401 otherwise) and are
//! disabled (403) when `ADMIN_TOKEN` is unset.

use std::{sync::Arc, time::Duration};

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

use crate::{
    admin_ops::{self, PartitionStatus},
    connection::Redis,
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
    pub admin_token: Option<String>,
    /// The Prometheus recorder's handle, for `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// The service's name, shown in status.
    pub service: String,
}

/// The router; merge it into the service's own.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/status", get(status))
        .route("/admin/dlq/replay", post(replay))
        .route(
            "/admin/consumers/{stage}/{consumer}",
            delete(delete_consumer),
        )
        .with_state(Arc::new(state))
}

/// An error as the admin API shows it: a status and a JSON `{"error": ...}` body.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if let Err(e) = state.redis.ping(Duration::from_millis(500)).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": format!("redis unreachable: {e}") })),
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
#[derive(Debug, Serialize)]
struct Status {
    service: String,
    stages: Vec<StageStatus>,
}

#[derive(Debug, Serialize)]
struct StageStatus {
    group: String,
    mode: &'static str,
    counters: StageCounters,
    partitions: Vec<PartitionStatus>,
}

async fn status(State(state): State<Arc<AdminState>>) -> Result<Json<Status>, ApiError> {
    let mut stages = Vec::new();
    for stage in state.stats.stages() {
        let owned = stage.mode == ConsumeMode::Owned;
        let reads = stage
            .sources
            .iter()
            .map(|s| admin_ops::partition_status(&state.redis, s, &stage.group, owned));
        let partitions = futures::future::try_join_all(reads)
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")))?;
        stages.push(StageStatus {
            group: stage.group.clone(),
            mode: if owned { "owned" } else { "shared" },
            counters: stage.counters(),
            partitions,
        });
    }
    Ok(Json(Status {
        service: state.service.clone(),
        stages,
    }))
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_ref().filter(|t| !t.is_empty()) else {
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
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")))?;
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
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}")))?;
    tracing::warn!(%group, %consumer, dropped, "consumer deleted by admin");
    Ok(Json(
        json!({ "deleted": consumer, "pending_dropped": dropped }),
    ))
}
