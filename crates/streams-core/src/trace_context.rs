//! W3C trace context carried in stream entries (the envelope's `traceparent` and
//! `tracestate`), so one trace follows an event through every stage.
//!
//! A stage handles each entry inside a span whose parent is the context extracted from the
//! entry; whatever it appends carries that span's context ([`Envelope::derive`] copies the
//! input's, and the stage loop overwrites it with the handling span's before writing).

use std::collections::HashMap;

use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Envelope;

/// The OpenTelemetry context an entry was written in (empty when it carries none).
pub fn extract(traceparent: Option<&str>, tracestate: Option<&str>) -> opentelemetry::Context {
    let Some(traceparent) = traceparent else {
        return opentelemetry::Context::new();
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The W3C headers of `span`, if it is part of a valid trace.
pub fn headers_of(span: &tracing::Span) -> Option<(String, Option<String>)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let traceparent = carrier.remove("traceparent")?;
    Some((
        traceparent,
        carrier.remove("tracestate").filter(|s| !s.is_empty()),
    ))
}

/// Makes `span` a child of the context carried by `envelope` (no-op without one).
pub fn set_parent(span: &tracing::Span, envelope: &Envelope) {
    set_parent_from(
        span,
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
    );
}

/// Makes `span` a child of the context these W3C values carry (no-op without a valid
/// `traceparent`): for entries that are not envelopes, e.g. an external producer's flat
/// `traceparent` and `tracestate` fields.
pub fn set_parent_from(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let parent = extract(traceparent, tracestate);
    if parent.span().span_context().is_valid() {
        // Fails only if the span was already entered; callers set the parent first.
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s context into `envelope`, so what it carries continues the trace. When
/// tracing is off in this process the envelope keeps the context it was derived with.
pub fn inject(span: &tracing::Span, envelope: &mut Envelope) {
    if let Some((traceparent, tracestate)) = headers_of(span) {
        envelope.traceparent = Some(traceparent);
        envelope.tracestate = tracestate;
    }
}

/// The ids of a traced span, kept in its registry extensions so that log lines written
/// inside it can show them (a log formatter cannot ask OpenTelemetry itself: tracing does
/// not dispatch from inside a subscriber).
#[derive(Debug, Clone)]
pub(crate) struct TraceIds {
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
}

/// Records `span`'s trace and span ids for the JSON log format (no-op when untraced).
/// Call it after [`set_parent`], outside any subscriber callback.
pub fn stamp(span: &tracing::Span) {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    if !span_context.is_valid() {
        return;
    }
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(data) = tracing_subscriber::registry::LookupSpan::span(registry, id)
        {
            data.extensions_mut().insert(TraceIds {
                trace_id: span_context.trace_id().to_string(),
                span_id: span_context.span_id().to_string(),
            });
        }
    });
}

/// Whether a `traceparent` value is sampled (flags bit 0). Read straight off the text (the
/// stage asks this for every traced entry); a value that is not a trace context is not.
pub fn is_sampled(traceparent: &str) -> bool {
    traceparent.len() == 55
        && traceparent
            .get(53..55)
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
        && crate::envelope::is_valid_traceparent(traceparent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_a_valid_traceparent_and_ignores_garbage() {
        let cx = extract(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("congo=t61"),
        );
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(is_sampled(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!is_sampled(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        ));
        assert!(
            !extract(Some("garbage"), None)
                .span()
                .span_context()
                .is_valid()
        );
        assert!(!extract(None, None).span().span_context().is_valid());
    }
}
