//! The transform stage's handler: validates events against reference data, normalizes
//! prices to ticks and quantities to lots, enriches orders with their instrument, and turns
//! business rule violations into rejection reports.

use prost::Message;
use streams_core::{Delivery, Envelope, Handler, HandlerError, KeySpace, Outputs, Partition};
use tickflow_proto::{
    event_type as types, rules, topology,
    v1::{self, ExecStatus, RejectCode},
};

use crate::refdata::{Instrument, RefData, Snapshot};

/// The transform handler.
#[derive(Debug, Clone)]
pub struct Transform {
    keys: KeySpace,
    refdata: RefData,
    tick_tolerance: f64,
}

/// A business rejection: reported downstream, not dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// What kind of rejection, for programs: analytics keeps nothing per symbol for one
    /// whose symbol the reference data does not know.
    pub code: RejectCode,
    /// Why, for people.
    pub reason: String,
}

impl Rejection {
    /// The order breaks a rule of its instrument.
    fn rule(reason: String) -> Self {
        Self {
            code: RejectCode::InstrumentRule,
            reason,
        }
    }
}

/// The usable instrument of `symbol` (normalized), or why there is none: the reference data
/// does not know the symbol, or skipped its instrument as invalid.
fn instrument<'a>(refdata: &'a Snapshot, symbol: &str) -> Result<&'a Instrument, Rejection> {
    if let Some(instrument) = refdata.instruments.get(symbol) {
        return Ok(instrument);
    }
    Err(match refdata.invalid.get(symbol) {
        Some(problem) => Rejection {
            code: RejectCode::InstrumentUnavailable,
            reason: format!(
                "instrument {symbol} is unavailable: its reference data is invalid ({problem})"
            ),
        },
        None => Rejection {
            code: RejectCode::UnknownSymbol,
            reason: format!("unknown symbol {symbol}"),
        },
    })
}

impl Transform {
    /// `tick_tolerance` is the fraction of a tick a price may be off and still be rounded
    /// (`TRANSFORM_TICK_TOLERANCE`); beyond it the order is rejected.
    pub fn new(keys: KeySpace, refdata: RefData, tick_tolerance: f64) -> Self {
        Self {
            keys,
            refdata,
            tick_tolerance,
        }
    }

    /// Normalizes a new order, or says why it is rejected.
    pub fn order(&self, order: &v1::NewOrder) -> Result<v1::ValidatedOrder, Rejection> {
        let symbol = order.symbol.trim().to_ascii_uppercase();
        let refdata = self.refdata.snapshot();
        let instrument = instrument(&refdata, &symbol)?;
        let market = order.r#type == v1::OrderType::Market as i32;
        let price_e6 = if market {
            0
        } else {
            self.price(order.price, instrument)?
        };
        let qty = lots(order.qty, instrument)?;
        if let Some(max) = instrument.max_qty.filter(|max| qty > *max) {
            return Err(Rejection::rule(format!(
                "quantity {qty} above the maximum {max} for {symbol}"
            )));
        }
        Ok(v1::ValidatedOrder {
            symbol: symbol.clone(),
            side: order.side,
            r#type: if market {
                v1::OrderType::Market
            } else {
                v1::OrderType::Limit
            } as i32,
            price_e6,
            qty,
            client_order_id: order.client_order_id.clone(),
            instrument: Some(v1::Instrument {
                symbol,
                tick_size_e6: instrument.tick_e6(),
                lot_size: instrument.lot_size,
                band_bps: instrument.band_bps,
                name: instrument.name.clone(),
                currency: instrument.currency.clone(),
            }),
        })
    }

    fn price(&self, price: f64, instrument: &Instrument) -> Result<i64, Rejection> {
        if !(price.is_finite() && price > 0.0) {
            return Err(Rejection::rule(format!(
                "price {price} is not a positive number"
            )));
        }
        let tick = instrument.tick_e6() as f64;
        let ticks = price * 1e6 / tick;
        if !(ticks.is_finite() && ticks < MAX_TICKS) {
            return Err(Rejection::rule(format!(
                "price {price} is too large for the tick size {} of {}",
                instrument.tick_size, instrument.symbol
            )));
        }
        let rounded = ticks.round();
        if (ticks - rounded).abs() > self.tick_tolerance + 1e-9 {
            return Err(Rejection::rule(format!(
                "price {price} is off the tick size {} of {}",
                instrument.tick_size, instrument.symbol
            )));
        }
        if rounded < 1.0 {
            return Err(Rejection::rule(format!("price {price} is below one tick")));
        }
        let price_e6 = (rounded as i64)
            .checked_mul(instrument.tick_e6())
            .ok_or_else(|| Rejection::rule(format!("price {price} is too large")))?;
        let as_decimal = price_e6 as f64 / 1e6;
        if instrument.min_price.is_some_and(|min| as_decimal < min)
            || instrument.max_price.is_some_and(|max| as_decimal > max)
        {
            return Err(Rejection::rule(format!(
                "price {price} outside the static band [{}, {}] of {}",
                instrument.min_price.unwrap_or(0.0),
                instrument.max_price.unwrap_or(f64::INFINITY),
                instrument.symbol
            )));
        }
        Ok(price_e6)
    }

    /// Normalizes a tick, or says why it cannot be used.
    pub fn tick(&self, tick: &v1::MarketTick) -> Result<v1::ValidatedTick, Rejection> {
        let symbol = tick.symbol.trim().to_ascii_uppercase();
        let refdata = self.refdata.snapshot();
        let instrument = instrument(&refdata, &symbol)?;
        // Outside prints are rounded to our tick whatever their precision.
        let tick_e6 = instrument.tick_e6();
        if !(tick.price.is_finite() && tick.price > 0.0 && tick.qty.is_finite() && tick.qty > 0.0) {
            return Err(Rejection::rule(
                "tick price and qty must be positive numbers".into(),
            ));
        }
        let ticks = (tick.price * 1e6 / tick_e6 as f64).round();
        let price_e6 = Some(ticks)
            .filter(|t| *t < MAX_TICKS)
            .and_then(|t| (t as i64).max(1).checked_mul(tick_e6))
            .ok_or_else(|| Rejection::rule(format!("tick price {} is too large", tick.price)))?;
        if tick.qty > MAX_QTY {
            return Err(Rejection::rule(format!(
                "tick qty {} is too large",
                tick.qty
            )));
        }
        Ok(v1::ValidatedTick {
            symbol,
            price_e6,
            qty: tick.qty.round().max(1.0) as u64,
        })
    }
}

/// The largest quantity taken (orders and ticks), and the largest lot an instrument may have.
pub(crate) const MAX_QTY: f64 = 1e15;

/// Tick counts from here on do not fit a price in millionths (`i64`).
const MAX_TICKS: f64 = i64::MAX as f64;

/// Rounds a quantity down to whole lots (never more than asked).
fn lots(qty: f64, instrument: &Instrument) -> Result<u64, Rejection> {
    if !(qty.is_finite() && qty > 0.0) {
        return Err(Rejection::rule(format!(
            "quantity {qty} is not a positive number"
        )));
    }
    if qty > MAX_QTY {
        return Err(Rejection::rule(format!("quantity {qty} is too large")));
    }
    // A lot of 0 never passes the reference data's checks; should one get here anyway, the
    // order is rejected instead of the stage dividing by zero.
    let lots = ((qty + 1e-9).floor() as u64)
        .checked_div(instrument.lot_size)
        .unwrap_or(0);
    if lots == 0 {
        return Err(Rejection::rule(format!(
            "quantity {qty} is below one lot of {} for {}",
            instrument.lot_size, instrument.symbol
        )));
    }
    Ok(lots * instrument.lot_size)
}

/// Decodes the payload as an `M` and checks it with `check`: an entry that is not one (it
/// was not written by ingest, which checks the same) is dead-lettered, naming the problem.
fn decode<M: Message + Default>(
    delivery: &Delivery,
    envelope: &Envelope,
    check: fn(&M) -> Vec<String>,
) -> Result<M, HandlerError> {
    let invalid = |problem: String| {
        HandlerError::Permanent(format!(
            "payload of {} entry {} is not a valid {}: {problem}",
            envelope.event_type,
            delivery.id,
            std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("message")
        ))
    };
    let message = M::decode(envelope.payload.as_ref()).map_err(|e| invalid(e.to_string()))?;
    let problems = check(&message);
    if problems.is_empty() {
        Ok(message)
    } else {
        Err(invalid(problems.join("; ")))
    }
}

fn symbol_problems(symbol: &str, problems: &mut Vec<String>) {
    if let Some(problem) = rules::symbol_problem(symbol.trim()) {
        problems.push(format!("symbol {problem}"));
    }
}

fn order_id_problems(id: &str, problems: &mut Vec<String>) {
    if let Some(problem) = rules::order_id_problem(id) {
        problems.push(format!("client_order_id {problem}"));
    }
}

/// What makes a new order unreadable (prices and quantities are business rules, reported).
pub fn order_problems(order: &v1::NewOrder) -> Vec<String> {
    let mut problems = Vec::new();
    symbol_problems(&order.symbol, &mut problems);
    if !matches!(
        v1::Side::try_from(order.side),
        Ok(v1::Side::Buy | v1::Side::Sell)
    ) {
        problems.push(format!("side {} is not buy or sell", order.side));
    }
    if v1::OrderType::try_from(order.r#type).is_err() {
        problems.push(format!("type {} is not limit or market", order.r#type));
    }
    order_id_problems(&order.client_order_id, &mut problems);
    problems
}

/// What makes a cancel unreadable.
pub fn cancel_problems(cancel: &v1::CancelOrder) -> Vec<String> {
    let mut problems = Vec::new();
    symbol_problems(&cancel.symbol, &mut problems);
    order_id_problems(&cancel.client_order_id, &mut problems);
    problems
}

/// What makes a tick unreadable (its price and quantity are checked by [`Transform::tick`]).
pub fn tick_problems(tick: &v1::MarketTick) -> Vec<String> {
    let mut problems = Vec::new();
    symbol_problems(&tick.symbol, &mut problems);
    problems
}

/// Why an event of `symbol` (normalized) read from `partition` with envelope key `key` is
/// not where ingest puts it, if it is not: the key is the symbol, and the partition the
/// symbol's. Handling it anyway would keep a second book of the symbol in another partition.
pub fn routing_problem(
    keys: &KeySpace,
    partition: Partition,
    key: &str,
    symbol: &str,
) -> Option<String> {
    let home = keys.partition_for(symbol.as_bytes());
    if key != symbol {
        let shown: String = key.chars().take(40).collect();
        let more = if shown.len() < key.len() { "…" } else { "" };
        Some(format!(
            "the envelope key {shown:?}{more} is not the event's symbol {symbol}"
        ))
    } else if home != partition {
        Some(format!(
            "symbol {symbol} belongs to partition {home} of {}, not {partition} (is \
             TICKFLOW_PARTITIONS the same for every process?)",
            keys.partitions()
        ))
    } else {
        None
    }
}

impl Handler for Transform {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let envelope = delivery.envelope.as_ref().expect("envelope stage");
        let validated = self.keys.stream(topology::VALIDATED, delivery.partition);
        let market = self.keys.stream(topology::MARKET, delivery.partition);
        let routed = |symbol: &str| match routing_problem(
            &self.keys,
            delivery.partition,
            &envelope.partition_key,
            &symbol.trim().to_ascii_uppercase(),
        ) {
            Some(problem) => Err(HandlerError::Permanent(problem)),
            None => Ok(()),
        };
        match envelope.event_type.as_str() {
            types::NEW_ORDER => {
                let order: v1::NewOrder = decode(delivery, envelope, order_problems)?;
                routed(&order.symbol)?;
                match self.order(&order) {
                    Ok(valid) => out.append(
                        validated,
                        &envelope.derive(types::VALIDATED_ORDER, valid.encode_to_vec()),
                    ),
                    Err(rejection) => reject(
                        out,
                        market,
                        envelope,
                        order.symbol.trim().to_ascii_uppercase(),
                        order.client_order_id,
                        rejection,
                    ),
                }
            }
            types::CANCEL_ORDER => {
                let cancel: v1::CancelOrder = decode(delivery, envelope, cancel_problems)?;
                routed(&cancel.symbol)?;
                let symbol = cancel.symbol.trim().to_ascii_uppercase();
                let refdata = self.refdata.snapshot();
                // A cancel needs no trading rules, so one of a symbol whose instrument was
                // skipped as invalid still reaches the book: its resting orders can be taken
                // off while the reference data is being fixed.
                if refdata.instruments.contains_key(&symbol)
                    || refdata.invalid.contains_key(&symbol)
                {
                    let valid = v1::ValidatedCancel {
                        symbol,
                        client_order_id: cancel.client_order_id,
                    };
                    out.append(
                        validated,
                        &envelope.derive(types::VALIDATED_CANCEL, valid.encode_to_vec()),
                    );
                } else {
                    let rejection = Rejection {
                        code: RejectCode::UnknownSymbol,
                        reason: format!("cancel: unknown symbol {symbol}"),
                    };
                    reject(
                        out,
                        market,
                        envelope,
                        symbol,
                        cancel.client_order_id,
                        rejection,
                    );
                }
            }
            types::TICK => {
                let tick: v1::MarketTick = decode(delivery, envelope, tick_problems)?;
                routed(&tick.symbol)?;
                // A tick has no sender to answer: an unusable one is dead-lettered with the reason.
                let valid = self
                    .tick(&tick)
                    .map_err(|rejection| HandlerError::Permanent(rejection.reason))?;
                out.append(
                    validated,
                    &envelope.derive(types::VALIDATED_TICK, valid.encode_to_vec()),
                );
            }
            other => {
                return Err(HandlerError::Permanent(format!(
                    "transform does not handle event type {other:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Reports `rejection` of the order or cancel `client_order_id` of `symbol` on the market
/// stream `market`, and counts it by code.
fn reject(
    out: &mut Outputs,
    market: String,
    envelope: &Envelope,
    symbol: String,
    client_order_id: String,
    rejection: Rejection,
) {
    metrics::counter!("tickflow_transform_rejections_total", "code" => rejection.code.label())
        .increment(1);
    let report = v1::ExecutionReport {
        symbol,
        client_order_id,
        status: ExecStatus::Rejected as i32,
        reason: rejection.reason,
        reject_code: rejection.code as i32,
        ..Default::default()
    };
    out.append(
        market,
        &envelope.derive(types::EXECUTION, report.encode_to_vec()),
    );
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashMap},
        sync::Arc,
    };

    use super::*;

    fn transform() -> Transform {
        let instrument = Instrument {
            symbol: "AAPL".into(),
            tick_size: 0.01,
            lot_size: 10,
            band_bps: 500,
            min_price: Some(1.0),
            max_price: Some(1000.0),
            max_qty: Some(1_000_000),
            name: "Apple".into(),
            currency: "USD".into(),
        };
        let refdata = RefData::default();
        refdata.replace(Arc::new(Snapshot {
            version: 1,
            instruments: HashMap::from([("AAPL".to_owned(), instrument)]),
            invalid: BTreeMap::from([(
                "MSFT".to_owned(),
                "MSFT: lot_size 0 must be between 1 and 1000000000000000".to_owned(),
            )]),
        }));
        Transform::new(KeySpace::new("t", 4), refdata, 0.1)
    }

    fn order(symbol: &str, price: f64, qty: f64) -> v1::NewOrder {
        v1::NewOrder {
            symbol: symbol.into(),
            side: v1::Side::Buy as i32,
            r#type: v1::OrderType::Limit as i32,
            price,
            qty,
            client_order_id: "o1".into(),
        }
    }

    #[test]
    fn normalizes_and_enriches() {
        let valid = transform()
            .order(&order("aapl", 172.5000001, 25.0))
            .unwrap();
        assert_eq!(valid.symbol, "AAPL");
        assert_eq!(valid.price_e6, 172_500_000);
        assert_eq!(valid.qty, 20, "rounded down to the lot of 10");
        assert_eq!(valid.instrument.unwrap().tick_size_e6, 10_000);
    }

    #[test]
    fn business_rules_reject_with_a_reason() {
        let t = transform();
        assert_eq!(
            t.order(&order("GOOG", 1.0, 10.0)).unwrap_err(),
            Rejection {
                code: RejectCode::UnknownSymbol,
                reason: "unknown symbol GOOG".into()
            }
        );
        assert_eq!(
            t.order(&order("AAPL", 172.505, 10.0)).unwrap_err().code,
            RejectCode::InstrumentRule
        );
        assert!(
            t.order(&order("AAPL", 172.505, 10.0))
                .unwrap_err()
                .reason
                .contains("off the tick")
        );
        assert!(
            t.order(&order("AAPL", 10.0, 5.0))
                .unwrap_err()
                .reason
                .contains("below one lot")
        );
        assert!(
            t.order(&order("AAPL", 5000.0, 10.0))
                .unwrap_err()
                .reason
                .contains("static band")
        );
        assert!(
            t.order(&order("AAPL", 10.0, 1e7))
                .unwrap_err()
                .reason
                .contains("maximum")
        );
    }

    #[test]
    fn prices_beyond_what_a_tick_count_holds_are_rejected_not_overflowed() {
        let t = transform();
        for price in [1e300, f64::MAX, 1e15] {
            let reason = t.order(&order("AAPL", price, 10.0)).unwrap_err().reason;
            assert!(reason.contains("too large"), "{price}: {reason}");
            let tick = v1::MarketTick {
                symbol: "AAPL".into(),
                price,
                qty: 1.0,
            };
            let reason = t.tick(&tick).unwrap_err().reason;
            assert!(reason.contains("too large"), "{price}: {reason}");
        }
        let tick = v1::MarketTick {
            symbol: "AAPL".into(),
            price: 1.0,
            qty: 1e300,
        };
        assert!(t.tick(&tick).unwrap_err().reason.contains("qty"));
    }

    #[test]
    fn payloads_no_ingest_would_write_are_named() {
        let mut bad = order("AAPL", 1.0, 1.0);
        bad.side = 7;
        bad.r#type = 9;
        bad.client_order_id.clear();
        assert_eq!(
            order_problems(&bad),
            vec![
                "side 7 is not buy or sell",
                "type 9 is not limit or market",
                "client_order_id is empty"
            ]
        );
        assert_eq!(
            order_problems(&v1::NewOrder::default()),
            vec![
                "symbol is empty",
                "side 0 is not buy or sell",
                "client_order_id is empty"
            ]
        );
        assert!(order_problems(&order(" aapl ", 1.0, 1.0)).is_empty());
        assert!(order_problems(&order(&"A".repeat(1 << 20), 1.0, 1.0))[0].contains("longer"));
        assert_eq!(
            cancel_problems(&v1::CancelOrder::default()),
            vec!["symbol is empty", "client_order_id is empty"]
        );
        assert_eq!(
            tick_problems(&v1::MarketTick::default()),
            vec!["symbol is empty"]
        );
    }

    #[test]
    fn events_must_be_in_their_symbols_partition_under_their_symbols_key() {
        let keys = KeySpace::new("t", 4);
        let home = keys.partition_for(b"AAPL");
        assert_eq!(routing_problem(&keys, home, "AAPL", "AAPL"), None);
        let reason = routing_problem(&keys, (home + 1) % 4, "AAPL", "AAPL").unwrap();
        assert!(
            reason.contains(&format!("belongs to partition {home} of 4")),
            "{reason}"
        );
        let reason = routing_problem(&keys, home, "MSFT", "AAPL").unwrap();
        assert!(
            reason.contains("\"MSFT\" is not the event's symbol AAPL"),
            "{reason}"
        );
        let reason = routing_problem(&keys, home, &"K".repeat(1 << 20), "AAPL").unwrap();
        assert!(reason.len() < 200, "{reason}");
    }

    #[test]
    fn ticks_round_to_our_tick() {
        let tick = transform()
            .tick(&v1::MarketTick {
                symbol: "aapl".into(),
                price: 172.503,
                qty: 3.0,
            })
            .unwrap();
        assert_eq!(tick.price_e6, 172_500_000);
        assert!(
            transform()
                .tick(&v1::MarketTick {
                    symbol: "X".into(),
                    price: 1.0,
                    qty: 1.0
                })
                .is_err()
        );
    }

    #[test]
    fn a_symbol_whose_instrument_was_skipped_is_rejected_as_unavailable_naming_why() {
        let t = transform();
        let rejection = t.order(&order("msft", 1.0, 10.0)).unwrap_err();
        assert_eq!(rejection.code, RejectCode::InstrumentUnavailable);
        assert!(
            rejection
                .reason
                .starts_with("instrument MSFT is unavailable")
                && rejection.reason.contains("lot_size 0"),
            "{}",
            rejection.reason
        );
        let tick = v1::MarketTick {
            symbol: "MSFT".into(),
            price: 1.0,
            qty: 1.0,
        };
        assert_eq!(
            t.tick(&tick).unwrap_err().code,
            RejectCode::InstrumentUnavailable
        );
    }

    #[test]
    fn an_instrument_that_escaped_the_checks_rejects_orders_instead_of_panicking() {
        // Snapshots are built from checked instruments only; this one is built by hand to
        // show the arithmetic itself cannot fail on it.
        let broken = Instrument {
            symbol: "ZERO".into(),
            tick_size: 0.0,
            lot_size: 0,
            band_bps: 0,
            min_price: None,
            max_price: None,
            max_qty: None,
            name: String::new(),
            currency: String::new(),
        };
        let refdata = RefData::default();
        refdata.replace(Arc::new(Snapshot {
            version: 1,
            instruments: HashMap::from([("ZERO".to_owned(), broken)]),
            invalid: BTreeMap::new(),
        }));
        let t = Transform::new(KeySpace::new("t", 4), refdata, 0.1);
        assert!(t.order(&order("ZERO", 1.0, 10.0)).is_err());
        let mut market = order("ZERO", 0.0, 10.0);
        market.r#type = v1::OrderType::Market as i32;
        assert!(
            t.order(&market)
                .unwrap_err()
                .reason
                .contains("below one lot")
        );
        let tick = v1::MarketTick {
            symbol: "ZERO".into(),
            price: 1.0,
            qty: 1.0,
        };
        assert!(t.tick(&tick).is_err());
    }
}
