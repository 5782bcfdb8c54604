//! Appending validated events to the pipeline's inbound stream, all or nothing per request.

use prost::Message;
use streams_core::{
    Envelope, KeySpace, Redis, StreamsError,
    append::{AppendError, Appended, Once, append},
    backpressure::{Backlog, Overloaded},
};
use tickflow_proto::{topology, v1};
use tracing::Instrument;

use crate::validate;

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The pipeline is too far behind: the client should retry later (429 / RESOURCE_EXHAUSTED).
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// Redis could not take the events (503 / UNAVAILABLE); nothing was appended.
    #[error("could not append to Redis: {0}")]
    Redis(#[from] StreamsError),
    /// The idempotency key was used for a different request (422 / INVALID_ARGUMENT);
    /// nothing was appended.
    #[error("the idempotency key was already used for a different request")]
    KeyReused,
    /// The events were appended but not confirmed by `TICKFLOW_WAIT_REPLICAS` replicas
    /// in time (503 / UNAVAILABLE): a failover could still lose them, so the client must
    /// retry with the same idempotency key.
    #[error("not confirmed by {0} replicas; retry with the same idempotency key")]
    NotConfirmed(u32),
}

impl From<AppendError> for PublishError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::KeyReused(_) => PublishError::KeyReused,
            AppendError::Redis(e) => PublishError::Redis(e),
            AppendError::NotConfirmed { wanted, .. } => PublishError::NotConfirmed(wanted),
        }
    }
}

/// Appends events to partition `partition_for(symbol)` of the inbound stream.
#[derive(Clone, Debug)]
pub struct Publisher {
    redis: Redis,
    keys: KeySpace,
    backlog: Backlog,
    backlog_limit: u64,
    idempotency_ttl_ms: u64,
}

/// How long an idempotency key is remembered by default (10 minutes).
pub const DEFAULT_IDEMPOTENCY_TTL_MS: u64 = 600_000;

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Why an idempotency key is refused (the client's mistake: 400 / INVALID_ARGUMENT).
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

impl Publisher {
    /// A publisher refusing work while transform's backlog exceeds `backlog_limit`.
    pub fn new(redis: Redis, keys: KeySpace, backlog_limit: u64) -> Self {
        let backlog = Backlog::new(
            redis.clone(),
            &keys,
            topology::INBOUND,
            topology::TRANSFORM_GROUP,
        );
        Self {
            redis,
            keys,
            backlog,
            backlog_limit,
            idempotency_ttl_ms: DEFAULT_IDEMPOTENCY_TTL_MS,
        }
    }

    /// Remember idempotency keys for `ttl_ms` (a retry after that appends again).
    pub fn with_idempotency_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.idempotency_ttl_ms = ttl_ms;
        self
    }

    /// The backlog monitor, to be started once with `spawn_monitor`.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// Refuses when the downstream backlog is over the limit.
    pub fn check_capacity(&self) -> Result<(), Overloaded> {
        self.backlog.check(self.backlog_limit)
    }

    /// Appends `events` (already validated) atomically; returns their stream ids in order.
    /// `traceparent`/`tracestate` are the caller's W3C trace context, as received: what is
    /// invalid of it is dropped here ([`streams_core::trace_context::from_input`]: an
    /// oversize `tracestate` would otherwise be copied into every event), then the append
    /// happens in a server span continuing it (or starting a trace), whose context each entry
    /// carries; with tracing off, the caller's checked context is carried. With an
    /// `idempotency_key` (checked by [`check_idempotency_key`]), a request already appended
    /// under that key is not appended again: the first append's ids come back, marked
    /// `replayed`.
    pub async fn publish(
        &self,
        route: &str,
        events: &[v1::Event],
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, PublishError> {
        let span = tracing::debug_span!(
            "ingest",
            otel.name = %route,
            otel.kind = "server",
            messaging.system = "redis",
            messaging.operation.type = "send",
            messaging.destination.name = topology::INBOUND,
            messaging.batch.message_count = events.len(),
        );
        let (traceparent, tracestate) =
            streams_core::trace_context::from_input(traceparent, tracestate);
        let parent = streams_core::trace_context::extract(traceparent, tracestate);
        {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            if parent.span().span_context().is_valid() {
                let _ = span.set_parent(parent);
            }
        }
        streams_core::trace_context::stamp(&span);
        let (traceparent, tracestate) = match streams_core::trace_context::headers_of(&span) {
            Some((tp, ts)) => (Some(tp), ts),
            None => (
                traceparent.map(str::to_owned),
                tracestate.map(str::to_owned),
            ),
        };
        self.append(
            events,
            traceparent.as_deref(),
            tracestate.as_deref(),
            idempotency_key,
        )
        .instrument(span)
        .await
    }

    async fn append(
        &self,
        events: &[v1::Event],
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, PublishError> {
        self.check_capacity()?;
        let entries: Vec<(String, Envelope)> = events
            .iter()
            .map(|event| {
                let symbol = validate::symbol(event);
                let payload = match &event.kind {
                    Some(v1::event::Kind::NewOrder(m)) => m.encode_to_vec(),
                    Some(v1::event::Kind::Cancel(m)) => m.encode_to_vec(),
                    Some(v1::event::Kind::Tick(m)) => m.encode_to_vec(),
                    None => Vec::new(),
                };
                let mut envelope = Envelope::new(validate::event_type(event), symbol, payload);
                envelope.traceparent = traceparent.map(str::to_owned);
                envelope.tracestate = tracestate.map(str::to_owned);
                let partition = self.keys.partition_for(symbol.as_bytes());
                (self.keys.stream(topology::INBOUND, partition), envelope)
            })
            .collect();
        let key = idempotency_key.map(|k| self.keys.idempotency("ingest", k));
        let once = key.as_deref().map(|key| Once {
            key,
            ttl_ms: self.idempotency_ttl_ms,
        });
        let appended = append(&self.redis, &entries, once).await?;
        if appended.replayed {
            metrics::counter!("tickflow_ingest_replayed_requests_total").increment(1);
        } else {
            metrics::counter!("tickflow_ingest_events_total").increment(appended.ids.len() as u64);
        }
        Ok(appended)
    }
}
