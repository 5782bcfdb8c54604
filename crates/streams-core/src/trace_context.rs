//! W3C trace context carried in stream entries (the envelope's `traceparent` and
//! `tracestate`), so one trace follows an event through every stage.
//!
//! A stage handles each entry inside a span whose parent is the context extracted from the
//! entry; whatever it appends carries that span's context ([`Envelope::derive`] copies the
//! input's, and the stage loop overwrites it with the handling span's before writing).
//!
//! A trace context comes from outside (an HTTP header, gRPC metadata, an external producer's
//! entry fields) and would otherwise be copied into every event it arrives with, so it is
//! checked here, once, for every path: [`from_input`] keeps a `traceparent` only if it is
//! one, and a `tracestate` only with it and within W3C's bounds ([`is_valid_tracestate`]);
//! [`extract`] applies the same rule, so a span's context (which the stage loop writes into
//! what it appends) never carries more either.

use std::collections::HashMap;

use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Envelope;

/// The longest `tracestate` kept, bytes. W3C: a vendor must propagate at least 512
/// characters and may drop a longer one; every event carries it, so tickflow keeps no more.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// The most list members a `tracestate` may have (W3C: 32).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// What is valid of a trace context received from outside: the `traceparent` if it is a W3C
/// one (see [`crate::envelope::is_valid_traceparent`]), and the `tracestate` only with it
/// and only if [`is_valid_tracestate`]. An invalid `tracestate` is dropped whole (W3C allows
/// a receiver to discard it); the `traceparent` is kept.
pub fn from_input<'a>(
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
) -> (Option<&'a str>, Option<&'a str>) {
    let traceparent = traceparent.filter(|t| crate::envelope::is_valid_traceparent(t));
    let tracestate = traceparent
        .and(tracestate)
        .filter(|state| is_valid_tracestate(state));
    (traceparent, tracestate)
}

/// Whether `value` is a W3C `tracestate` tickflow carries: non-empty, at most
/// [`MAX_TRACESTATE_LEN`] bytes and [`MAX_TRACESTATE_MEMBERS`] members, each `key=value`
/// with a key of lower-case letters, digits and `_-*/@` (starting with a letter or digit)
/// and a value of printable ASCII without `,` or `=` that does not end in a space. Empty
/// members between commas are allowed, as W3C allows them. The check is a little looser
/// than the grammar (it does not limit where `@` goes, or key lengths within the total).
pub fn is_valid_tracestate(value: &str) -> bool {
    if value.is_empty() || value.len() > MAX_TRACESTATE_LEN {
        return false;
    }
    let mut members = 0;
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return false;
        }
        let Some((key, state)) = member.split_once('=') else {
            return false;
        };
        let key_ok = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(&b));
        let state_ok = !state.is_empty()
            && !state.ends_with(' ')
            && state
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
        if !key_ok || !state_ok {
            return false;
        }
    }
    members > 0
}

/// The OpenTelemetry context an entry was written in (empty when it carries none). The
/// values are checked as [`from_input`] checks them, so whatever is invalid is left out.
pub fn extract(traceparent: Option<&str>, tracestate: Option<&str>) -> opentelemetry::Context {
    let (Some(traceparent), tracestate) = from_input(traceparent, tracestate) else {
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

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_tracestate_within_w3c_bounds_is_kept() {
        let full_members: Vec<String> = (0..MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect();
        let at_the_length_limit = "k=".to_owned() + &"v".repeat(MAX_TRACESTATE_LEN - 2);
        for state in [
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "a=1, b=2",
            "a=1 ,\tb=2,,",
            "tenant@vendor=x y",
            "k_-*/=!\"#$%&'()*+-./:;<>?@[]^_`{|}~",
            &full_members.join(","),
            &at_the_length_limit,
        ] {
            assert!(is_valid_tracestate(state), "{state:?}");
            assert_eq!(
                from_input(Some(VALID), Some(state)),
                (Some(VALID), Some(state))
            );
        }
    }

    #[test]
    fn an_oversize_or_malformed_tracestate_is_dropped_and_the_traceparent_kept() {
        let too_many = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let too_long = "k=".to_owned() + &"v".repeat(MAX_TRACESTATE_LEN - 1);
        let huge = "k=v,".repeat(50_000);
        for state in [
            "",
            " , ",
            "novalue",
            "=v",
            "Upper=v",
            "_k=v",
            "k=",
            "k=\u{7f}",
            "k=a=b",
            "k=caf\u{e9}",
            "k=tab\there",
            &too_many,
            &too_long,
            &huge,
        ] {
            assert!(!is_valid_tracestate(state), "{state:?}");
            assert_eq!(from_input(Some(VALID), Some(state)), (Some(VALID), None));
            let cx = extract(Some(VALID), Some(state));
            assert!(cx.span().span_context().is_valid(), "{state:?}");
            assert_eq!(cx.span().span_context().trace_state().header(), "");
        }
        // No state without a trace to go with it; no trace from a broken traceparent.
        assert_eq!(from_input(None, Some("k=v")), (None, None));
        assert_eq!(from_input(Some("00-garbage"), Some("k=v")), (None, None));
        let long_parent = VALID.to_owned() + &"0".repeat(200_000);
        assert_eq!(from_input(Some(&long_parent), Some("k=v")), (None, None));
    }
}
