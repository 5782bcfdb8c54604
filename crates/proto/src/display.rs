//! Payloads for people: an envelope's payload decoded by its event type into JSON, with
//! enums by name (`buy`, `limit`, `accepted`) and prices and quantities as the message
//! holds them (`price_e6` in millionths). `tickflow tail` and `tickflow dlq show` print
//! entries through it, with the envelope decoded by `streams_core::inspect`.

use prost::Message;
use serde::Serializer;

use crate::{event_type, v1};

/// Why a payload could not be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// No message is known for this event type.
    UnknownType(String),
    /// The bytes are not the message the event type names.
    Undecodable {
        /// The event type.
        event_type: String,
        /// What prost said.
        reason: String,
    },
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::UnknownType(t) => write!(f, "no message is known for type {t:?}"),
            PayloadError::Undecodable { event_type, reason } => {
                write!(f, "not a valid {event_type} message: {reason}")
            }
        }
    }
}

impl std::error::Error for PayloadError {}

/// The fields of `payload`, decoded as the message `event_type` names.
pub fn payload_json(event_type: &str, payload: &[u8]) -> Result<serde_json::Value, PayloadError> {
    fn decode<M: Message + Default + serde::Serialize>(
        event_type: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, PayloadError> {
        let message = M::decode(payload).map_err(|e| PayloadError::Undecodable {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(serde_json::to_value(message).expect("messages serialize"))
    }
    match event_type {
        event_type::NEW_ORDER => decode::<v1::NewOrder>(event_type, payload),
        event_type::CANCEL_ORDER => decode::<v1::CancelOrder>(event_type, payload),
        event_type::TICK => decode::<v1::MarketTick>(event_type, payload),
        event_type::VALIDATED_ORDER => decode::<v1::ValidatedOrder>(event_type, payload),
        event_type::VALIDATED_CANCEL => decode::<v1::ValidatedCancel>(event_type, payload),
        event_type::VALIDATED_TICK => decode::<v1::ValidatedTick>(event_type, payload),
        event_type::EXECUTION => decode::<v1::ExecutionReport>(event_type, payload),
        event_type::TRADE => decode::<v1::Trade>(event_type, payload),
        event_type::ORDER_EVENTS => decode::<v1::OrderEvents>(event_type, payload),
        other => Err(PayloadError::UnknownType(other.to_owned())),
    }
}

/// An enum's name without its prefix, lower-cased (`SIDE_BUY` → `buy`); a value this
/// build does not know stays a number.
fn enum_name<S: Serializer>(
    name: Option<&str>,
    prefix: &str,
    value: i32,
    s: S,
) -> Result<S::Ok, S::Error> {
    match name {
        Some(name) => s.serialize_str(&name.trim_start_matches(prefix).to_ascii_lowercase()),
        None => s.serialize_i32(value),
    }
}

pub(crate) fn side<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = v1::Side::try_from(*value).ok().map(|e| e.as_str_name());
    enum_name(name, "SIDE_", *value, s)
}

pub(crate) fn order_type<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = v1::OrderType::try_from(*value)
        .ok()
        .map(|e| e.as_str_name());
    enum_name(name, "ORDER_TYPE_", *value, s)
}

pub(crate) fn exec_status<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = v1::ExecStatus::try_from(*value)
        .ok()
        .map(|e| e.as_str_name());
    enum_name(name, "EXEC_STATUS_", *value, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_show_their_fields_with_enums_by_name() {
        let order = v1::NewOrder {
            symbol: "AAPL".into(),
            side: v1::Side::Buy as i32,
            r#type: v1::OrderType::Limit as i32,
            price: 101.5,
            qty: 5.0,
            client_order_id: "o-1".into(),
        };
        assert_eq!(
            payload_json(event_type::NEW_ORDER, &order.encode_to_vec()).unwrap(),
            serde_json::json!({
                "symbol": "AAPL", "side": "buy", "type": "limit", "price": 101.5, "qty": 5.0,
                "client_order_id": "o-1"
            })
        );
        let events = v1::OrderEvents {
            events: vec![v1::MarketEvent {
                kind: Some(v1::market_event::Kind::Execution(v1::ExecutionReport {
                    symbol: "AAPL".into(),
                    client_order_id: "o-1".into(),
                    status: v1::ExecStatus::Accepted as i32,
                    leaves_qty: 5,
                    ..Default::default()
                })),
            }],
        };
        let json = payload_json(event_type::ORDER_EVENTS, &events.encode_to_vec()).unwrap();
        assert_eq!(json["events"][0]["kind"]["execution"]["status"], "accepted");
        assert_eq!(json["events"][0]["kind"]["execution"]["leaves_qty"], 5);
        // An unknown enum value stays a number; garbage and unknown types say why.
        let odd = v1::Trade {
            aggressor: 9,
            ..Default::default()
        };
        assert_eq!(
            payload_json(event_type::TRADE, &odd.encode_to_vec()).unwrap()["aggressor"],
            9
        );
        assert!(matches!(
            payload_json(event_type::NEW_ORDER, b"\xff\xff\xff"),
            Err(PayloadError::Undecodable { .. })
        ));
        assert_eq!(
            payload_json("nope", b"").unwrap_err().to_string(),
            "no message is known for type \"nope\""
        );
    }
}
