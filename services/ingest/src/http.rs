//! The ingest HTTP API. Errors become statuses here, and only here.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/orders` | order object or array | 202 `{"accepted": n, "ids": [...]}` |
//! | `POST /v1/ticks` | tick object or array | 202, same shape |
//! | `POST /v1/cancels` | `{"symbol", "client_order_id"}` or array | 202, same shape |
//! | `DELETE /v1/orders/{symbol}/{client_order_id}` | — | 202, same shape |
//!
//! 400 names every bad field (`{"error", "details": [{"index", "field", "message"}]}`) and
//! appends nothing; 413 for a body over the limit; 415 for a POST whose `content-type` is
//! not JSON (so that a browser form, which cannot send JSON without the server's consent,
//! cannot place or cancel orders); 429 with `Retry-After` when the pipeline is too far
//! behind; 503 when Redis cannot take the events.

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, post},
};
use serde_json::json;
use tickflow_proto::v1;

use crate::{
    publish::{self, PublishError, Publisher},
    validate::{self, FieldError, JsonKind},
};

/// Limits of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest accepted body, bytes (`INGEST_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Most events per request (`INGEST_MAX_EVENTS`).
    pub max_events: usize,
}

#[derive(Clone, Debug)]
struct HttpState {
    publisher: Publisher,
    limits: HttpLimits,
}

/// The ingest routes.
pub fn router(publisher: Publisher, limits: HttpLimits) -> Router {
    let body_limit = limits.max_body_bytes;
    Router::new()
        .route("/v1/orders", post(orders))
        .route("/v1/ticks", post(ticks))
        .route("/v1/cancels", post(cancels))
        .route("/v1/orders/{symbol}/{client_order_id}", delete(cancel_one))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(HttpState { publisher, limits })
}

/// Everything the API can answer besides success.
#[derive(Debug)]
enum ApiError {
    Invalid(Vec<FieldError>),
    TooLarge(usize),
    NotJson(String),
    Publish(PublishError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Invalid(details) => (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({ "error": "invalid request; nothing was accepted", "details": details }),
                ),
            )
                .into_response(),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({ "error": format!("body larger than {limit} bytes") })),
            )
                .into_response(),
            ApiError::NotJson(content_type) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({
                    "error": format!(
                        "content-type must be application/json, not {content_type:?}; \
                         nothing was accepted"
                    )
                })),
            )
                .into_response(),
            ApiError::Publish(PublishError::Overloaded(e)) => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({ "error": e.to_string(), "backlog": e.backlog, "limit": e.limit })),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
            ApiError::Publish(PublishError::KeyReused) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({
                    "error": "idempotency-key was already used for a different request; nothing was accepted"
                })),
            )
                .into_response(),
            ApiError::Publish(PublishError::Redis(e)) => {
                tracing::warn!(error = %e, "publish failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "error": "the pipeline's Redis is unavailable; nothing was accepted" })),
                )
                    .into_response()
            }
            ApiError::Publish(e @ PublishError::NotConfirmed(_)) => {
                tracing::warn!(error = %e, "publish not confirmed by replicas");
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "error": e.to_string() })),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

async fn orders(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    accept(&state, &headers, body, JsonKind::Order, "POST /v1/orders").await
}

async fn ticks(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    accept(&state, &headers, body, JsonKind::Tick, "POST /v1/ticks").await
}

async fn cancels(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    accept(&state, &headers, body, JsonKind::Cancel, "POST /v1/cancels").await
}

async fn cancel_one(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path((symbol, client_order_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let mut event = v1::Event {
        kind: Some(v1::event::Kind::Cancel(v1::CancelOrder {
            symbol,
            client_order_id,
        })),
    };
    validate::normalize(&mut event)
        .map_err(|problems| ApiError::Invalid(to_field_errors(problems)))?;
    publish(
        &state,
        &headers,
        "DELETE /v1/orders/{symbol}/{client_order_id}",
        vec![event],
    )
    .await
}

async fn accept(
    state: &HttpState,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    kind: JsonKind,
    route: &str,
) -> Result<Response, ApiError> {
    check_json_content_type(headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(state.limits.max_body_bytes)
        } else {
            ApiError::Invalid(vec![FieldError {
                index: 0,
                field: "body".into(),
                message: rejection.body_text(),
            }])
        }
    })?;
    // Refuse early, before parsing, when the pipeline cannot take more.
    state
        .publisher
        .check_capacity()
        .map_err(|e| ApiError::Publish(e.into()))?;
    let events = validate::events_from_json(&body, kind, state.limits.max_events)
        .map_err(ApiError::Invalid)?;
    publish(state, headers, route, events).await
}

async fn publish(
    state: &HttpState,
    headers: &HeaderMap,
    route: &str,
    events: Vec<v1::Event>,
) -> Result<Response, ApiError> {
    // Checked (and an oversize tracestate dropped) by the publisher, for every source.
    let traceparent = header_text(headers, "traceparent");
    let tracestate = header_text(headers, "tracestate");
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| "must be printable ASCII".to_owned());
            let key = key.and_then(|k| publish::check_idempotency_key(k).map(|()| k));
            Some(key.map_err(|message| {
                ApiError::Invalid(vec![FieldError {
                    index: 0,
                    field: IDEMPOTENCY_KEY.into(),
                    message,
                }])
            })?)
        }
    };
    let appended = state
        .publisher
        .publish(route, &events, traceparent, tracestate, idempotency_key)
        .await
        .map_err(ApiError::Publish)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": appended.ids.len(),
            "ids": appended.ids,
            "replayed": appended.replayed,
        })),
    )
        .into_response())
}

/// Refuses a body not declared as JSON: `application/json` or `application/<x>+json`, with
/// any parameters. A browser sends a cross-origin form (url-encoded, multipart or
/// `text/plain`) without asking first; JSON it sends only after a CORS preflight, which this
/// API never grants.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let is_json = declared.as_deref().is_some_and(|value| {
        let media_type = value.split(';').next().unwrap_or_default().trim();
        let media_type = media_type.to_ascii_lowercase();
        media_type == "application/json"
            || (media_type.starts_with("application/") && media_type.ends_with("+json"))
    });
    if is_json {
        Ok(())
    } else {
        let shown: String = declared
            .unwrap_or_else(|| "none".into())
            .chars()
            .take(100)
            .collect();
        Err(ApiError::NotJson(shown))
    }
}

/// The header carrying a client's idempotency key: a retry with the same key is not
/// appended twice.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn to_field_errors(problems: Vec<(&'static str, String)>) -> Vec<FieldError> {
    problems
        .into_iter()
        .map(|(field, message)| FieldError {
            index: 0,
            field: field.into(),
            message,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodies_declared_as_json_are_taken() {
        let with = |content_type: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = content_type {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            }
            check_json_content_type(&headers).is_ok()
        };
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.tickflow+json",
        ] {
            assert!(with(Some(json)), "{json}");
        }
        for form in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            "text/json",
            "application/jsonx",
        ] {
            assert!(!with(Some(form)), "{form}");
        }
        assert!(!with(None));
    }
}
