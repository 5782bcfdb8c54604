//! The one wire format: every entry tickflow writes to a stream is an [`Envelope`].
//!
//! An entry's fields, in this order (values are binary-safe Redis strings):
//!
//! | field         | value                                                         |
//! |---------------|---------------------------------------------------------------|
//! | `v`           | format version, `1`                                           |
//! | `type`        | event type, e.g. `order.new` (what the payload's message is)  |
//! | `key`         | partition key (the symbol); routes the event to a partition   |
//! | `ts`          | origin timestamp, microseconds since the Unix epoch, decimal   |
//! | `traceparent` | W3C trace context of the span that wrote the entry (optional) |
//! | `tracestate`  | W3C trace state (optional, only when non-empty)               |
//! | `payload`     | the protobuf-encoded message                                  |
//!
//! Only this module encodes or decodes it: stages see [`Envelope`] values.
//!
//! The trace context is optional, and so is its validity: a `traceparent` that is not a W3C
//! trace context (or not UTF-8), and the `tracestate` that goes with it, are read as absent
//! (W3C: a receiver ignores an invalid `traceparent`), so they are neither a reason to
//! dead-letter an event nor carried on to the next stage. So is a `tracestate` longer than
//! [`MAX_TRACESTATE_LEN`].

use bytes::Bytes;

/// The envelope format version this build writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// The longest `tracestate` read (W3C: 32 members of at most 256 characters each would be
/// more; 512 is what every receiver must keep). A longer one is dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;

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
    #[error("unsupported envelope version `{0}` (this build reads version {FORMAT_VERSION})")]
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
        5 + usize::from(self.traceparent.is_some())
            + usize::from(self.tracestate.as_ref().is_some_and(|s| !s.is_empty()))
    }

    /// Calls `f` with each field's name and value, in wire order, without allocating.
    pub fn for_each_field(&self, mut f: impl FnMut(&[u8], &[u8])) {
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
        f(b"v", FORMAT_VERSION.as_bytes());
        f(b"type", self.event_type.as_bytes());
        f(b"key", self.partition_key.as_bytes());
        f(b"ts", &digits[at..]);
        if let Some(traceparent) = &self.traceparent {
            f(b"traceparent", traceparent.as_bytes());
        }
        if let Some(tracestate) = self.tracestate.as_ref().filter(|s| !s.is_empty()) {
            f(b"tracestate", tracestate.as_bytes());
        }
        f(b"payload", &self.payload);
    }

    /// The entry's fields as name/value pairs, in wire order.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut fields = Vec::with_capacity(7);
        fields.push(("v", FORMAT_VERSION.as_bytes().to_vec()));
        fields.push(("type", self.event_type.as_bytes().to_vec()));
        fields.push(("key", self.partition_key.as_bytes().to_vec()));
        fields.push(("ts", self.origin_us.to_string().into_bytes()));
        if let Some(traceparent) = &self.traceparent {
            fields.push(("traceparent", traceparent.as_bytes().to_vec()));
        }
        if let Some(tracestate) = self.tracestate.as_ref().filter(|s| !s.is_empty()) {
            fields.push(("tracestate", tracestate.as_bytes().to_vec()));
        }
        fields.push(("payload", self.payload.to_vec()));
        fields
    }

    /// Reads an envelope from a stream entry's fields. Unknown fields are ignored, so that a
    /// later minor addition does not break older readers.
    pub fn from_fields<'a>(
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
                        .filter(|t| t.len() <= MAX_TRACESTATE_LEN)
                        .map(str::to_owned);
                }
                b"payload" => payload = Some(Bytes::copy_from_slice(value)),
                _ => {}
            }
        }
        let version = version.ok_or(EnvelopeError::MissingField("v"))?;
        if version != FORMAT_VERSION.as_bytes() {
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
        assert_eq!(fields.len(), 7);
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
            Err(EnvelopeError::MissingField("v"))
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
