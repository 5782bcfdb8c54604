//! Syntactic validation of inbound events, from every source, into protobuf messages.
//!
//! Ingest checks shape and ranges (a symbol, a side, positive finite numbers); business
//! rules (known symbol, tick and lot sizes, price bands) are transform's.

use serde::Serialize;
use serde_json::Value;
use tickflow_proto::v1::{self, event::Kind};

/// One problem with one field of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position of the event in the request (0 for a single object).
    pub index: usize,
    /// The field's name.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event {}: `{}` {}", self.index, self.field, self.message)
    }
}

/// The longest symbol accepted.
pub const MAX_SYMBOL_LEN: usize = tickflow_proto::rules::MAX_SYMBOL_LEN;
/// The longest client order id accepted.
pub const MAX_ORDER_ID_LEN: usize = tickflow_proto::rules::MAX_ORDER_ID_LEN;

/// Which kind of event a JSON body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// `POST /v1/orders`.
    Order,
    /// `POST /v1/ticks`.
    Tick,
    /// `POST /v1/cancels`.
    Cancel,
}

/// Parses a JSON body (one object or an array of them) into events, or every field error.
pub fn events_from_json(
    body: &[u8],
    kind: JsonKind,
    max_events: usize,
) -> Result<Vec<v1::Event>, Vec<FieldError>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        vec![FieldError {
            index: 0,
            field: "body".into(),
            message: format!("is not valid JSON: {e}"),
        }]
    })?;
    let items = match value {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        _ => {
            return Err(vec![FieldError {
                index: 0,
                field: "body".into(),
                message: "must be a JSON object or an array of objects".into(),
            }]);
        }
    };
    if items.is_empty() {
        return Err(vec![error(0, "body", "must hold at least one event")]);
    }
    if items.len() > max_events {
        return Err(vec![error(
            0,
            "body",
            &format!(
                "holds {} events; at most {max_events} per request",
                items.len()
            ),
        )]);
    }
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let Value::Object(fields) = item else {
            errors.push(error(index, "event", "must be a JSON object"));
            continue;
        };
        let get = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let mut problems = Vec::new();
        let event = match kind {
            JsonKind::Order => {
                let side = match get("side") {
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("buy") => v1::Side::Buy,
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("sell") => v1::Side::Sell,
                    Some(_) => {
                        problems.push(("side", "must be \"buy\" or \"sell\"".to_owned()));
                        v1::Side::Unspecified
                    }
                    None => {
                        problems.push(("side", "is required".to_owned()));
                        v1::Side::Unspecified
                    }
                };
                let order_type = match get("type") {
                    None => v1::OrderType::Limit,
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("limit") => {
                        v1::OrderType::Limit
                    }
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("market") => {
                        v1::OrderType::Market
                    }
                    Some(_) => {
                        problems.push(("type", "must be \"limit\" or \"market\"".to_owned()));
                        v1::OrderType::Limit
                    }
                };
                let order = v1::NewOrder {
                    symbol: string_field(get("symbol"), "symbol", &mut problems),
                    side: side as i32,
                    r#type: order_type as i32,
                    price: number_field(get("price"), "price", false, &mut problems),
                    qty: number_field(get("qty"), "qty", true, &mut problems),
                    client_order_id: match get("client_order_id") {
                        None => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(_) => {
                            problems.push(("client_order_id", "must be a string".to_owned()));
                            String::new()
                        }
                    },
                };
                Kind::NewOrder(order)
            }
            JsonKind::Tick => Kind::Tick(v1::MarketTick {
                symbol: string_field(get("symbol"), "symbol", &mut problems),
                price: number_field(get("price"), "price", true, &mut problems),
                qty: number_field(get("qty"), "qty", true, &mut problems),
            }),
            JsonKind::Cancel => Kind::Cancel(v1::CancelOrder {
                symbol: string_field(get("symbol"), "symbol", &mut problems),
                client_order_id: string_field(
                    get("client_order_id"),
                    "client_order_id",
                    &mut problems,
                ),
            }),
        };
        let mut event = v1::Event { kind: Some(event) };
        if let Err(list) = normalize(&mut event) {
            for (field, message) in list {
                if !problems.iter().any(|(f, _)| *f == field) {
                    problems.push((field, message));
                }
            }
        }
        if problems.is_empty() {
            events.push(event);
        }
        errors.extend(problems.into_iter().map(|(field, message)| FieldError {
            index,
            field: field.to_owned(),
            message,
        }));
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

/// Checks an event (from any source) and fills defaults: symbol trimmed and upper-cased, a
/// client order id generated when absent. Returns every problem found.
pub fn normalize(event: &mut v1::Event) -> Result<(), Vec<(&'static str, String)>> {
    let mut problems = Vec::new();
    match event.kind.as_mut() {
        None => problems.push(("kind", "is required (new_order, cancel or tick)".to_owned())),
        Some(Kind::NewOrder(order)) => {
            check_symbol(&mut order.symbol, &mut problems);
            if order.side == v1::Side::Unspecified as i32 || v1::Side::try_from(order.side).is_err()
            {
                problems.push(("side", "must be buy or sell".to_owned()));
            }
            let market = order.r#type == v1::OrderType::Market as i32;
            if v1::OrderType::try_from(order.r#type).is_err() {
                problems.push(("type", "must be limit or market".to_owned()));
            }
            let positive_price = order.price.is_finite() && order.price > 0.0;
            if !market && !positive_price {
                problems.push((
                    "price",
                    "must be a finite number > 0 for a limit order".to_owned(),
                ));
            }
            if market && !(order.price.is_finite() && order.price >= 0.0) {
                problems.push((
                    "price",
                    "must be a finite number (or absent) for a market order".to_owned(),
                ));
            }
            check_positive(order.qty, "qty", &mut problems);
            if order.client_order_id.is_empty() {
                order.client_order_id = generate_order_id();
            } else {
                check_order_id(&order.client_order_id, &mut problems);
            }
        }
        Some(Kind::Cancel(cancel)) => {
            check_symbol(&mut cancel.symbol, &mut problems);
            if cancel.client_order_id.is_empty() {
                problems.push(("client_order_id", "is required".to_owned()));
            } else {
                check_order_id(&cancel.client_order_id, &mut problems);
            }
        }
        Some(Kind::Tick(tick)) => {
            check_symbol(&mut tick.symbol, &mut problems);
            check_positive(tick.price, "price", &mut problems);
            check_positive(tick.qty, "qty", &mut problems);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The symbol of an event (its partition key).
pub fn symbol(event: &v1::Event) -> &str {
    match &event.kind {
        Some(Kind::NewOrder(o)) => &o.symbol,
        Some(Kind::Cancel(c)) => &c.symbol,
        Some(Kind::Tick(t)) => &t.symbol,
        None => "",
    }
}

/// The envelope type of an event.
pub fn event_type(event: &v1::Event) -> &'static str {
    use tickflow_proto::event_type as t;
    match &event.kind {
        Some(Kind::NewOrder(_)) => t::NEW_ORDER,
        Some(Kind::Cancel(_)) => t::CANCEL_ORDER,
        Some(Kind::Tick(_)) | None => t::TICK,
    }
}

/// Reads an event from flat stream fields, as a redis-cli or redis-py producer writes them:
/// `symbol price qty` is a tick; with `side` it is an order (`type`, `client_order_id`
/// optional); `action cancel` with `symbol client_order_id` is a cancel.
pub fn event_from_fields(fields: &[(Vec<u8>, Vec<u8>)]) -> Result<v1::Event, String> {
    let get = |name: &str| -> Result<Option<&str>, String> {
        match fields.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
            None => Ok(None),
            Some((_, v)) => std::str::from_utf8(v)
                .map(|s| Some(s.trim()))
                .map_err(|_| format!("field `{name}` is not valid UTF-8")),
        }
    };
    let number = |name: &str| -> Result<f64, String> {
        let text = get(name)?.ok_or_else(|| format!("field `{name}` is required"))?;
        text.parse::<f64>()
            .map_err(|_| format!("field `{name}` is not a number: {}", quoted(text)))
    };
    let symbol = get("symbol")?
        .ok_or("field `symbol` is required")?
        .to_owned();
    let kind = if get("action")?.is_some_and(|a| a.eq_ignore_ascii_case("cancel")) {
        Kind::Cancel(v1::CancelOrder {
            symbol,
            client_order_id: get("client_order_id")?.unwrap_or_default().to_owned(),
        })
    } else if let Some(side) = get("side")? {
        let side = match side.to_ascii_lowercase().as_str() {
            "buy" => v1::Side::Buy,
            "sell" => v1::Side::Sell,
            other => {
                return Err(format!(
                    "field `side` must be buy or sell, not {}",
                    quoted(other)
                ));
            }
        };
        let order_type = match get("type")?.map(str::to_ascii_lowercase).as_deref() {
            None | Some("limit") => v1::OrderType::Limit,
            Some("market") => v1::OrderType::Market,
            Some(other) => {
                return Err(format!(
                    "field `type` must be limit or market, not {}",
                    quoted(other)
                ));
            }
        };
        let price = if order_type == v1::OrderType::Market && get("price")?.is_none() {
            0.0
        } else {
            number("price")?
        };
        Kind::NewOrder(v1::NewOrder {
            symbol,
            side: side as i32,
            r#type: order_type as i32,
            price,
            qty: number("qty")?,
            client_order_id: get("client_order_id")?.unwrap_or_default().to_owned(),
        })
    } else {
        Kind::Tick(v1::MarketTick {
            symbol,
            price: number("price")?,
            qty: number("qty")?,
        })
    };
    let mut event = v1::Event { kind: Some(kind) };
    normalize(&mut event).map_err(|problems| {
        problems
            .into_iter()
            .map(|(field, message)| format!("field `{field}` {message}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(event)
}

/// A value quoted in a reason: at most 32 characters of it, so that a huge field does not
/// come back as a huge reason (in the dead letter and the log).
fn quoted(value: &str) -> String {
    const MAX: usize = 32;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

fn error(index: usize, field: &str, message: &str) -> FieldError {
    FieldError {
        index,
        field: field.into(),
        message: message.into(),
    }
}

fn string_field(
    value: Option<&Value>,
    name: &'static str,
    problems: &mut Vec<(&'static str, String)>,
) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            problems.push((name, "must be a string".to_owned()));
            String::new()
        }
        None => {
            problems.push((name, "is required".to_owned()));
            String::new()
        }
    }
}

fn number_field(
    value: Option<&Value>,
    name: &'static str,
    required: bool,
    problems: &mut Vec<(&'static str, String)>,
) -> f64 {
    match value {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(_) => {
            problems.push((name, "must be a number".to_owned()));
            f64::NAN
        }
        None if required => {
            problems.push((name, "is required".to_owned()));
            f64::NAN
        }
        None => 0.0,
    }
}

fn check_symbol(symbol: &mut String, problems: &mut Vec<(&'static str, String)>) {
    let trimmed = symbol.trim();
    if trimmed.is_empty() {
        problems.push(("symbol", "must not be empty".to_owned()));
    } else if let Some(problem) = tickflow_proto::rules::symbol_problem(trimmed) {
        problems.push(("symbol", problem));
    } else {
        // Symbols are case-insensitive: one spelling, so one partition, per instrument.
        *symbol = trimmed.to_ascii_uppercase();
    }
}

fn check_positive(value: f64, name: &'static str, problems: &mut Vec<(&'static str, String)>) {
    if value.is_nan() {
        // Already reported as missing or mistyped, or NaN sent over gRPC.
        if !problems.iter().any(|(f, _)| *f == name) {
            problems.push((name, "must be a finite number > 0".to_owned()));
        }
    } else if !(value.is_finite() && value > 0.0) {
        problems.push((name, "must be a finite number > 0".to_owned()));
    }
}

fn check_order_id(id: &str, problems: &mut Vec<(&'static str, String)>) {
    // An empty id is allowed here: ingest generates one.
    if let Some(problem) = (!id.is_empty())
        .then(|| tickflow_proto::rules::order_id_problem(id))
        .flatten()
    {
        problems.push(("client_order_id", problem));
    }
}

fn generate_order_id() -> String {
    format!(
        "tf-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_order_gets_defaults() {
        let events = events_from_json(
            br#"{"symbol":" aapl ","side":"buy","price":172.5,"qty":10}"#,
            JsonKind::Order,
            10,
        )
        .unwrap();
        let Some(Kind::NewOrder(order)) = &events[0].kind else {
            panic!()
        };
        assert_eq!(order.symbol, "AAPL");
        assert_eq!(order.r#type, v1::OrderType::Limit as i32);
        assert!(order.client_order_id.starts_with("tf-"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let body = br#"[{"symbol":"A","side":"buy","price":1,"qty":1},{"symbol":5,"side":"up","price":-1,"qty":"x"}]"#;
        let errors = events_from_json(body, JsonKind::Order, 10).unwrap_err();
        let fields: Vec<(usize, &str)> =
            errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(
            fields,
            vec![(1, "side"), (1, "symbol"), (1, "qty"), (1, "price")]
        );
    }

    #[test]
    fn market_orders_need_no_price_and_limits_do() {
        assert!(
            events_from_json(
                br#"{"symbol":"A","side":"sell","type":"market","qty":3}"#,
                JsonKind::Order,
                1
            )
            .is_ok()
        );
        let errors = events_from_json(
            br#"{"symbol":"A","side":"sell","qty":3}"#,
            JsonKind::Order,
            1,
        )
        .unwrap_err();
        assert_eq!(errors[0].field, "price");
    }

    #[test]
    fn malformed_and_oversized_bodies_are_refused() {
        assert_eq!(
            events_from_json(b"{not json", JsonKind::Tick, 1).unwrap_err()[0].field,
            "body"
        );
        assert_eq!(
            events_from_json(b"[]", JsonKind::Tick, 1).unwrap_err()[0].field,
            "body"
        );
        let two = br#"[{"symbol":"A","price":1,"qty":1},{"symbol":"A","price":1,"qty":1}]"#;
        assert!(
            events_from_json(two, JsonKind::Tick, 1).unwrap_err()[0]
                .message
                .contains("at most 1")
        );
        let nested = format!("{}{}", "[".repeat(500), "]".repeat(500));
        assert_eq!(
            events_from_json(nested.as_bytes(), JsonKind::Tick, 1).unwrap_err()[0].field,
            "body"
        );
    }

    #[test]
    fn flat_fields_read_like_redis_cli_writes_them() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        let tick = event_from_fields(&fields(&[
            ("symbol", "AAPL"),
            ("price", "172.5"),
            ("qty", "10"),
        ]))
        .unwrap();
        assert!(matches!(tick.kind, Some(Kind::Tick(_))));
        let order = event_from_fields(&fields(&[
            ("symbol", "AAPL"),
            ("price", "172.5"),
            ("qty", "10"),
            ("side", "buy"),
        ]))
        .unwrap();
        assert!(matches!(order.kind, Some(Kind::NewOrder(_))));
        let cancel = event_from_fields(&fields(&[
            ("action", "cancel"),
            ("symbol", "AAPL"),
            ("client_order_id", "o1"),
        ]))
        .unwrap();
        assert!(matches!(cancel.kind, Some(Kind::Cancel(_))));
        assert_eq!(
            event_from_fields(&fields(&[("price", "1")])).unwrap_err(),
            "field `symbol` is required"
        );
        assert!(
            event_from_fields(&fields(&[("symbol", "A"), ("price", "abc"), ("qty", "1")]))
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            event_from_fields(&fields(&[("symbol", "A"), ("price", "-1"), ("qty", "1")]))
                .unwrap_err()
                .contains("price")
        );
        assert!(
            event_from_fields(&fields(&[("symbol", "A"), ("price", "inf"), ("qty", "1")])).is_err()
        );
        assert!(
            event_from_fields(&fields(&[("symbol", "A"), ("price", "NaN"), ("qty", "1")])).is_err()
        );
    }

    #[test]
    fn huge_flat_fields_are_not_echoed_back() {
        let huge = "x".repeat(1 << 20);
        let fields = |pairs: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        for (pairs, says) in [
            (
                vec![("symbol", "A"), ("price", &huge[..]), ("qty", "1")],
                "field `price` is not a number: \"xxxx",
            ),
            (
                vec![
                    ("symbol", "A"),
                    ("side", &huge[..]),
                    ("price", "1"),
                    ("qty", "1"),
                ],
                "field `side` must be buy or sell, not \"xxxx",
            ),
            (
                vec![
                    ("symbol", "A"),
                    ("side", "buy"),
                    ("type", &huge[..]),
                    ("qty", "1"),
                ],
                "field `type` must be limit or market, not \"xxxx",
            ),
        ] {
            let reason = event_from_fields(&fields(&pairs)).unwrap_err();
            assert!(reason.starts_with(says), "{reason}");
            assert!(reason.ends_with("… (1048576 bytes)"), "{reason}");
            assert!(reason.len() < 200, "{reason}");
        }
        assert_eq!(
            quoted("é".repeat(32).as_str()),
            format!("{:?}", "é".repeat(32))
        );
        assert!(quoted("é".repeat(33).as_str()).ends_with("… (66 bytes)"));
    }
}
