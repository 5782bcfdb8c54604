//! The one wire format: every entry tickflow writes to a stream is an [`Envelope`].
//!
//! An entry has two fields (format version 2), so it costs Redis and every reader little:
//!
//! | field | value                                                                      |
//! |-------|----------------------------------------------------------------------------|
//! | `h`   | header, ASCII: `2 <type> <key> <ts>[ <traceparent>[ <tracestate>]]`        |
//! | `p`   | the protobuf-encoded message                                               |
//!
//! `type` is the event type (what the payload's message is, e.g. `order.new`), `key` the
//! partition key (the symbol), `ts` the origin time in µs since the Unix epoch, then the W3C
//! trace context of the span that wrote the entry, when traced; the trace state is the rest
//! of the header and may hold spaces. Spaces, `%` and control characters in the type and key
//! are %-escaped. Version 1 entries (one field each: `v`, `type`, `key`, `ts`, `traceparent`,
//! `tracestate`, `payload`), as earlier builds wrote them, are still read.
//!
//! Only this module encodes or decodes it: stages see [`Envelope`] values.
//!
//! The trace context is optional, and so is its validity: a `traceparent` that is not a W3C
//! trace context (or not UTF-8), and the `tracestate` that goes with it, are read as absent
//! (W3C: a receiver ignores an invalid `traceparent`), so they are neither a reason to
//! dead-letter an event nor carried on to the next stage. So is a `tracestate` longer than
//! [`MAX_TRACESTATE_LEN`] or not a W3C list ([`crate::trace_context::is_valid_tracestate`]).

use bytes::Bytes;

/// The envelope format version this build writes (it reads 1 as well).
pub const FORMAT_VERSION: &str = "2";

/// The longest `tracestate` read; a longer one (or one that is not a W3C list, see
/// [`crate::trace_context::is_valid_tracestate`]) is dropped.
pub use crate::trace_context::MAX_TRACESTATE_LEN;

/// One event as it travels between stages.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Envelope {
    /// What the payload is, e.g. `order.new`, `tick`, `trade`.
    pub event_type: String,
    /// The partition key, normally the instrument symbol.
    pub partition_key: String,
    /// When the event entered the pipeline, µs since the Unix epoch.
    pub origin_us: u64,
    /// W3C `traceparent` of the writer's span, if traced.
    pub traceparent: Option<String>,
    /// W3C `tracestate`, if any.
    pub tracestate: Option<String>,
    /// The protobuf-encoded message.
    pub payload: Bytes,
}

/// Why an entry is not a valid envelope. The text goes into the dead-letter entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// The version field names a format this build does not read.
    #[error("unsupported envelope version `{0}` (this build reads versions 1 and 2)")]
    UnsupportedVersion(String),
    /// A field's value is not valid.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Envelope {
    /// The name of the header field.
    pub const HEADER_FIELD: &'static str = "h";
    /// The name of the payload field.
    pub const PAYLOAD_FIELD: &'static str = "p";

    /// A new envelope stamped with the current time as its origin.
    pub fn new(
        event_type: impl Into<String>,
        partition_key: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            partition_key: partition_key.into(),
            origin_us: now_micros(),
            traceparent: None,
            tracestate: None,
            payload: payload.into(),
        }
    }

    /// A follow-up event that keeps this one's origin time and trace context.
    pub fn derive(&self, event_type: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            event_type: event_type.into(),
            partition_key: self.partition_key.clone(),
            origin_us: self.origin_us,
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            payload: payload.into(),
        }
    }

    /// How many fields [`Envelope::for_each_field`] yields.
    pub fn field_count(&self) -> usize {
        2
    }

    /// The `h` field: `2 <type> <key> <ts>`, then ` <traceparent>` and ` <tracestate>` when
    /// present. Spaces, `%` and control characters in the type and key are %-escaped.
    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(
            24 + self.event_type.len()
                + self.partition_key.len()
                + self.traceparent.as_ref().map_or(0, |t| t.len() + 1)
                + self.tracestate.as_ref().map_or(0, |t| t.len() + 1),
        );
        h.extend_from_slice(FORMAT_VERSION.as_bytes());
        h.push(b' ');
        escape_into(&mut h, self.event_type.as_bytes());
        h.push(b' ');
        escape_into(&mut h, self.partition_key.as_bytes());
        h.push(b' ');
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut ts = self.origin_us;
        loop {
            at -= 1;
            digits[at] = b'0' + (ts % 10) as u8;
            ts /= 10;
            if ts == 0 {
                break;
            }
        }
        h.extend_from_slice(&digits[at..]);
        if let Some(traceparent) = &self.traceparent {
            h.push(b' ');
            h.extend_from_slice(traceparent.as_bytes());
            if let Some(tracestate) = self.tracestate.as_ref().filter(|s| !s.is_empty()) {
                h.push(b' ');
                h.extend_from_slice(tracestate.as_bytes());
            }
        }
        h
    }

    /// Calls `f` with each field's name and value, in wire order.
    pub fn for_each_field(&self, mut f: impl FnMut(&[u8], &[u8])) {
        f(Self::HEADER_FIELD.as_bytes(), &self.header());
        f(Self::PAYLOAD_FIELD.as_bytes(), &self.payload);
    }

    /// The entry's fields as name/value pairs, in wire order.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (Self::HEADER_FIELD, self.header()),
            (Self::PAYLOAD_FIELD, self.payload.to_vec()),
        ]
    }

    /// Reads an envelope from a stream entry's fields. Unknown fields are ignored, so that a
    /// later minor addition does not break older readers.
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, EnvelopeError> {
        let mut header = None;
        let mut v2_payload = None;
        let mut v1 = Vec::new();
        for (name, value) in fields {
            match name {
                b"h" => header = Some(value),
                b"p" => v2_payload = Some(value),
                _ => v1.push((name, value)),
            }
        }
        match header {
            Some(header) => Self::from_header(header, v2_payload),
            None => Self::from_v1_fields(v1),
        }
    }

    /// Reads the current format: the `h` header and the `p` payload.
    fn from_header(header: &[u8], payload: Option<&[u8]>) -> Result<Self, EnvelopeError> {
        let invalid = |reason: &str| EnvelopeError::InvalidField {
            field: "h",
            reason: reason.to_owned(),
        };
        let mut parts = header.splitn(6, |b| *b == b' ');
        let version = parts.next().unwrap_or_default();
        if version != FORMAT_VERSION.as_bytes() {
            return Err(EnvelopeError::UnsupportedVersion(
                String::from_utf8_lossy(version).into_owned(),
            ));
        }
        let (Some(event_type), Some(key), Some(ts)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "expected `<version> <type> <key> <ts>` and an optional trace context",
            ));
        };
        let event_type =
            unescape(event_type).ok_or_else(|| invalid("the type is not %-escaped UTF-8"))?;
        if event_type.is_empty() {
            return Err(invalid("empty type"));
        }
        let partition_key =
            unescape(key).ok_or_else(|| invalid("the key is not %-escaped UTF-8"))?;
        let origin_us = std::str::from_utf8(ts)
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| invalid("the time is not a non-negative integer of microseconds"))?;
        // An invalid trace context is read as absent (W3C), with the state that goes with it.
        let traceparent = parts
            .next()
            .and_then(|t| std::str::from_utf8(t).ok())
            .filter(|t| is_valid_traceparent(t))
            .map(str::to_owned);
        let tracestate = parts
            .next()
            .filter(|_| traceparent.is_some())
            .and_then(|t| std::str::from_utf8(t).ok())
            .filter(|t| crate::trace_context::is_valid_tracestate(t))
            .map(str::to_owned);
        Ok(Self {
            event_type,
            partition_key,
            origin_us,
            traceparent,
            tracestate,
            payload: Bytes::copy_from_slice(payload.ok_or(EnvelopeError::MissingField("p"))?),
        })
    }

    /// Reads format version 1 (one field each: `v`, `type`, `key`, `ts`, `traceparent`,
    /// `tracestate`, `payload`), which entries written by earlier builds still hold.
    fn from_v1_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, EnvelopeError> {
        let mut version = None;
        let mut event_type = None;
        let mut partition_key = None;
        let mut origin = None;
        let mut traceparent = None;
        let mut tracestate = None;
        let mut payload = None;
        for (name, value) in fields {
            match name {
                b"v" => version = Some(value),
                b"type" => event_type = Some(text("type", value)?),
                b"key" => partition_key = Some(text("key", value)?),
                b"ts" => origin = Some(value),
                b"traceparent" => {
                    traceparent = std::str::from_utf8(value)
                        .ok()
                        .filter(|t| is_valid_traceparent(t))
                        .map(str::to_owned);
                }
                b"tracestate" => {
                    tracestate = std::str::from_utf8(value)
                        .ok()
                        .filter(|t| crate::trace_context::is_valid_tracestate(t))
                        .map(str::to_owned);
                }
                b"payload" => payload = Some(Bytes::copy_from_slice(value)),
                _ => {}
            }
        }
        let Some(version) = version else {
            return Err(EnvelopeError::MissingField("h"));
        };
        if version != b"1" {
            return Err(EnvelopeError::UnsupportedVersion(
                String::from_utf8_lossy(version).into_owned(),
            ));
        }
        let origin = origin.ok_or(EnvelopeError::MissingField("ts"))?;
        let origin_us = std::str::from_utf8(origin)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| EnvelopeError::InvalidField {
                field: "ts",
                reason: "not a non-negative integer of microseconds".into(),
            })?;
        let event_type = event_type.ok_or(EnvelopeError::MissingField("type"))?;
        if event_type.is_empty() {
            return Err(EnvelopeError::InvalidField {
                field: "type",
                reason: "empty".into(),
            });
        }
        // A trace state means nothing without the trace it belongs to.
        let tracestate = tracestate.filter(|_| traceparent.is_some());
        Ok(Self {
            event_type,
            partition_key: partition_key.ok_or(EnvelopeError::MissingField("key"))?,
            origin_us,
            traceparent,
            tracestate,
            payload: payload.ok_or(EnvelopeError::MissingField("payload"))?,
        })
    }
}

/// Whether `value` is a W3C `traceparent`: `<2 hex>-<32 hex>-<16 hex>-<2 hex>`, version not
/// `ff`, neither id all zeros.
pub fn is_valid_traceparent(value: &str) -> bool {
    // Version 00 is exactly 55 characters: refuse anything else before looking further.
    if value.len() != 55 {
        return false;
    }
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|c| c.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|c| c != b'0');
    parts.len() == 4
        && hex(parts[0], 2)
        && !parts[0].eq_ignore_ascii_case("ff")
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && nonzero(parts[1])
        && nonzero(parts[2])
}

fn text(field: &'static str, value: &[u8]) -> Result<String, EnvelopeError> {
    String::from_utf8(value.to_vec()).map_err(|_| EnvelopeError::InvalidField {
        field,
        reason: "not valid UTF-8".into(),
    })
}

/// Appends `text` with spaces, `%` and control characters %-escaped (`%20`, `%25`, ...).
fn escape_into(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        if b == b' ' || b == b'%' || b < 0x20 || b == 0x7f {
            out.push(b'%');
            out.push(b"0123456789ABCDEF"[usize::from(b >> 4)]);
            out.push(b"0123456789ABCDEF"[usize::from(b & 0xf)]);
        } else {
            out.push(b);
        }
    }
}

/// Undoes [`escape_into`]; `None` if an escape is broken or the result is not UTF-8.
fn unescape(text: &[u8]) -> Option<String> {
    if !text.contains(&b'%') {
        return String::from_utf8(text.to_vec()).ok();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        if b == b'%' {
            let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
            let (hi, lo) = (hex(bytes.next())?, hex(bytes.next())?);
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Microseconds since the Unix epoch, by this host's clock.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_refs(fields: &[(&'static str, Vec<u8>)]) -> Vec<(&'static [u8], Vec<u8>)> {
        fields
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.clone()))
            .collect()
    }

    #[test]
    fn round_trips_with_and_without_trace_context() {
        let mut envelope = Envelope::new("order.new", "AAPL", vec![0, 1, 2, 255]);
        let fields = as_refs(&envelope.to_fields());
        let decoded = Envelope::from_fields(fields.iter().map(|(n, v)| (*n, v.as_slice())));
        assert_eq!(decoded.unwrap(), envelope);

        envelope.traceparent =
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        envelope.tracestate = Some("congo=t61rcWkgMzE".into());
        let fields = as_refs(&envelope.to_fields());
        assert_eq!(fields.len(), 2);
        let decoded = Envelope::from_fields(fields.iter().map(|(n, v)| (*n, v.as_slice())));
        assert_eq!(decoded.unwrap(), envelope);
    }

    #[test]
    fn for_each_field_matches_to_fields() {
        for origin_us in [0, 7, 1_764_160_000_123_456, u64::MAX] {
            let mut envelope = Envelope::new("t", "K", vec![1, 2]);
            envelope.origin_us = origin_us;
            envelope.traceparent =
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
            let mut streamed = Vec::new();
            envelope.for_each_field(|n, v| streamed.push((n.to_vec(), v.to_vec())));
            let listed: Vec<(Vec<u8>, Vec<u8>)> = envelope
                .to_fields()
                .into_iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v))
                .collect();
            assert_eq!(streamed, listed);
            assert_eq!(envelope.field_count(), listed.len());
        }
    }

    #[test]
    fn the_header_is_readable_and_escapes_what_would_break_it() {
        let mut envelope = Envelope::new("order.new", "AAPL", b"x".to_vec());
        envelope.origin_us = 1_764_160_000_123_456;
        assert_eq!(envelope.header(), b"2 order.new AAPL 1764160000123456");
        envelope.traceparent =
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        envelope.tracestate = Some("a=1, b=2".into());
        assert_eq!(
            envelope.header(),
            b"2 order.new AAPL 1764160000123456 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 a=1, b=2"
        );
        let fields = as_refs(&envelope.to_fields());
        let decoded = Envelope::from_fields(fields.iter().map(|(n, v)| (*n, v.as_slice())));
        assert_eq!(decoded.unwrap(), envelope, "a tracestate with spaces");

        for key in ["BRK B", "100%", "tab\there", "new\nline", "é", ""] {
            let envelope = Envelope::new("t", key, vec![]);
            let header = envelope.header();
            assert_eq!(header.iter().filter(|b| **b == b' ').count(), 3, "{key:?}");
            assert!(header.iter().all(|b| *b >= 0x20), "{key:?}");
            let decoded = Envelope::from_fields([(&b"h"[..], &header[..]), (b"p", b"")]);
            assert_eq!(decoded.unwrap().partition_key, key);
        }
    }

    #[test]
    fn version_1_entries_are_still_read() {
        let fields: [(&[u8], &[u8]); 6] = [
            (b"v", b"1"),
            (b"type", b"tick"),
            (b"key", b"AAPL"),
            (b"ts", b"5"),
            (
                b"traceparent",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            (b"payload", b"\x01"),
        ];
        let envelope = Envelope::from_fields(fields).unwrap();
        assert_eq!(
            (
                envelope.event_type.as_str(),
                envelope.partition_key.as_str()
            ),
            ("tick", "AAPL")
        );
        assert_eq!(envelope.origin_us, 5);
        assert!(envelope.traceparent.is_some());
        assert_eq!(&envelope.payload[..], b"\x01");
    }

    #[test]
    fn a_bad_header_is_rejected_with_a_reason() {
        let decode = |header: &[u8], payload: Option<&[u8]>| {
            let mut fields: Vec<(&[u8], &[u8])> = vec![(b"h", header)];
            if let Some(payload) = payload {
                fields.push((b"p", payload));
            }
            Envelope::from_fields(fields).map_err(|e| e.to_string())
        };
        assert!(decode(b"2 tick AAPL 5", Some(b"")).is_ok());
        for (header, payload, says) in [
            (&b"2 tick AAPL 5"[..], None, "missing field `p`"),
            (
                b"9 tick AAPL 5",
                Some(&b""[..]),
                "unsupported envelope version `9`",
            ),
            (b"", Some(b""), "unsupported envelope version ``"),
            (b"2 tick AAPL", Some(b""), "invalid field `h`: expected"),
            (b"2  AAPL 5", Some(b""), "invalid field `h`: empty type"),
            (b"2 tick AAPL -5", Some(b""), "microseconds"),
            (b"2 tick AAPL 1.5e15", Some(b""), "microseconds"),
            (
                b"2 tick AAPL 184467440737095516160",
                Some(b""),
                "microseconds",
            ),
            (b"2 tick %ZZ 5", Some(b""), "the key is not %-escaped UTF-8"),
            (
                b"2 tick \xff\xfe 5",
                Some(b""),
                "the key is not %-escaped UTF-8",
            ),
            (
                b"2 ti\xffck AAPL 5",
                Some(b""),
                "the type is not %-escaped UTF-8",
            ),
        ] {
            let error = decode(header, payload).expect_err(says);
            assert!(error.contains(says), "{header:?}: {error}");
        }
        // A broken trace context is read as absent, with its state.
        let envelope = Envelope::from_fields([
            (&b"h"[..], &b"2 tick AAPL 5 not-a-traceparent k=v"[..]),
            (b"p", b""),
        ])
        .unwrap();
        assert_eq!((envelope.traceparent, envelope.tracestate), (None, None));
    }

    #[test]
    fn a_bad_trace_context_is_read_as_absent() {
        let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let decode = |traceparent: &[u8], tracestate: &[u8]| {
            let fields: [(&[u8], &[u8]); 7] = [
                (b"v", b"1"),
                (b"type", b"tick"),
                (b"key", b"AAPL"),
                (b"ts", b"5"),
                (b"traceparent", traceparent),
                (b"tracestate", tracestate),
                (b"payload", b""),
            ];
            let envelope = Envelope::from_fields(fields).expect("the event is read");
            (envelope.traceparent, envelope.tracestate)
        };
        assert_eq!(
            decode(valid.as_bytes(), b"k=v"),
            (Some(valid.to_owned()), Some("k=v".to_owned()))
        );
        for bad in [
            &b"garbage"[..],
            &[0xff, 0xfe],
            b"",
            b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            b"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert_eq!(decode(bad, b"k=v"), (None, None), "{bad:?}");
        }
        let long = "k=".to_owned() + &"v".repeat(MAX_TRACESTATE_LEN);
        assert_eq!(
            decode(valid.as_bytes(), long.as_bytes()),
            (Some(valid.to_owned()), None)
        );
        assert_eq!(
            decode(valid.as_bytes(), &[0xff]),
            (Some(valid.to_owned()), None)
        );
    }

    #[test]
    fn rejects_bad_entries_with_a_reason() {
        let decode = |fields: &[(&str, &str)]| {
            Envelope::from_fields(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        assert_eq!(
            decode(&[("symbol", "AAPL")]),
            Err(EnvelopeError::MissingField("h"))
        );
        assert_eq!(
            decode(&[("v", "9"), ("type", "x")]),
            Err(EnvelopeError::UnsupportedVersion("9".into()))
        );
        let err = decode(&[
            ("v", "1"),
            ("type", "x"),
            ("key", "A"),
            ("ts", "-5"),
            ("payload", ""),
        ]);
        assert!(matches!(
            err,
            Err(EnvelopeError::InvalidField { field: "ts", .. })
        ));
        assert_eq!(
            decode(&[("v", "1"), ("type", "x"), ("key", "A"), ("ts", "5")]),
            Err(EnvelopeError::MissingField("payload"))
        );
        let invalid_utf8 = [(b"v".as_slice(), b"1".as_slice()), (b"type", &[0xff, 0xfe])];
        assert!(matches!(
            Envelope::from_fields(invalid_utf8),
            Err(EnvelopeError::InvalidField { field: "type", .. })
        ));
    }
}
