//! Events that other programs XADD, as flat fields, to external streams (`ingest_stream`):
//! each becomes an envelope on the inbound stream, exactly once; a bad one goes to the
//! external stream's dead-letter stream (`<name>:dlq`) with the reason.

use prost::Message;
use streams_core::{Delivery, Envelope, Handler, HandlerError, KeySpace, Outputs};
use tickflow_proto::{topology, v1};

use crate::validate;

/// The handler of the external-stream stage.
#[derive(Debug, Clone)]
pub struct ExternalEvents {
    keys: KeySpace,
}

impl ExternalEvents {
    /// Routes into the inbound stream of `keys`.
    pub fn new(keys: KeySpace) -> Self {
        Self { keys }
    }
}

impl Handler for ExternalEvents {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let event =
            validate::event_from_fields(&delivery.fields).map_err(HandlerError::Permanent)?;
        let symbol = validate::symbol(&event).to_owned();
        let payload = match &event.kind {
            Some(v1::event::Kind::NewOrder(m)) => m.encode_to_vec(),
            Some(v1::event::Kind::Cancel(m)) => m.encode_to_vec(),
            Some(v1::event::Kind::Tick(m)) => m.encode_to_vec(),
            None => Vec::new(),
        };
        let mut envelope = Envelope::new(validate::event_type(&event), symbol.as_str(), payload);
        (envelope.traceparent, envelope.tracestate) = trace_context(delivery);
        let partition = self.keys.partition_for(symbol.as_bytes());
        out.append(self.keys.stream(topology::INBOUND, partition), &envelope);
        Ok(())
    }
}

/// The producer's W3C trace context in an entry's `traceparent` and `tracestate` fields,
/// what is valid of it ([`streams_core::trace_context::from_input`]): no `traceparent`
/// unless it is one, no `tracestate` without it, over W3C's bounds or malformed.
fn trace_context(delivery: &Delivery) -> (Option<String>, Option<String>) {
    let text = |name| {
        delivery
            .field(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    };
    let (traceparent, tracestate) =
        streams_core::trace_context::from_input(text("traceparent"), text("tracestate"));
    (
        traceparent.map(str::to_owned),
        tracestate.map(str::to_owned),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(pairs: &[(&str, &[u8])]) -> Delivery {
        Delivery {
            partition: 0,
            stream: "ingest_stream".into(),
            id: "1-0".into(),
            deliveries: 1,
            fields: pairs
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
                .collect(),
            envelope: None,
        }
    }

    #[test]
    fn only_what_is_valid_of_a_trace_context_is_carried() {
        let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let huge = "k=".to_owned() + &"v".repeat(1 << 20);
        let owned = |s: &str| Some(s.to_owned());
        for (pairs, expected) in [
            (
                vec![("traceparent", valid.as_bytes()), ("tracestate", b"k=v")],
                (owned(valid), owned("k=v")),
            ),
            (
                vec![
                    ("traceparent", valid.as_bytes()),
                    ("tracestate", huge.as_bytes()),
                ],
                (owned(valid), None),
            ),
            (
                vec![("traceparent", valid.as_bytes()), ("tracestate", &[0xff])],
                (owned(valid), None),
            ),
            (
                vec![("traceparent", b"garbage"), ("tracestate", b"k=v")],
                (None, None),
            ),
            (vec![("traceparent", &[0xff, 0xfe])], (None, None)),
            (vec![("tracestate", b"k=v")], (None, None)),
        ] {
            assert_eq!(trace_context(&delivery(&pairs)), expected, "{pairs:?}");
        }
    }
}
