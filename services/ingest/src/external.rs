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
        envelope.traceparent = delivery
            .field("traceparent")
            .and_then(|t| std::str::from_utf8(t).ok())
            .filter(|t| crate::http::is_valid_traceparent(t))
            .map(str::to_owned);
        envelope.tracestate = envelope
            .traceparent
            .as_ref()
            .and(delivery.field("tracestate"))
            .and_then(|t| std::str::from_utf8(t).ok())
            .map(str::to_owned);
        let partition = self.keys.partition_for(symbol.as_bytes());
        out.append(self.keys.stream(topology::INBOUND, partition), &envelope);
        Ok(())
    }
}
