//! Appending validated events to the pipeline's inbound stream, all or nothing per request.

use prost::Message;
use streams_core::{
    Envelope, KeySpace, Redis, StreamsError,
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
}

/// Appends events to partition `partition_for(symbol)` of the inbound stream.
#[derive(Clone, Debug)]
pub struct Publisher {
    redis: Redis,
    keys: KeySpace,
    backlog: Backlog,
    backlog_limit: u64,
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
        }
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
    /// `traceparent`/`tracestate` are the caller's W3C trace context: the append happens in
    /// a server span continuing it (or starting a trace), whose context each entry carries;
    /// with tracing off, the caller's context is carried unchanged.
    pub async fn publish(
        &self,
        route: &str,
        events: &[v1::Event],
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) -> Result<Vec<String>, PublishError> {
        let span = tracing::debug_span!(
            "ingest",
            otel.name = %route,
            otel.kind = "server",
            messaging.system = "redis",
            messaging.operation.type = "send",
            messaging.destination.name = topology::INBOUND,
            messaging.batch.message_count = events.len(),
        );
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
        self.append(events, traceparent.as_deref(), tracestate.as_deref())
            .instrument(span)
            .await
    }

    async fn append(
        &self,
        events: &[v1::Event],
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) -> Result<Vec<String>, PublishError> {
        self.check_capacity()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for event in events {
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
            pipe.cmd("XADD")
                .arg(self.keys.stream(topology::INBOUND, partition))
                .arg("*")
                .arg(envelope.to_fields());
        }
        let mut conn = self.redis.pooled().await?;
        let ids: Vec<String> = pipe
            .query_async(&mut *conn)
            .await
            .map_err(StreamsError::from)?;
        metrics::counter!("tickflow_ingest_events_total").increment(ids.len() as u64);
        Ok(ids)
    }
}
