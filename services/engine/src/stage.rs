//! The engine stage: validated orders, cancels and ticks of each owned partition go through
//! that partition's [`Books`]; execution reports and trades (and the ticks, passed through)
//! are appended to the market stream, in the order the books produced them.
//!
//! One replica owns a partition at a time (owned mode), so a symbol's book is never split.
//! The books of a partition live in memory while owned; `partition_released` drops them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use streams_core::{
    Delivery, Envelope, Handler, HandlerError, KeySpace, Outputs, Partition, Redis,
};
use tickflow_proto::{
    event_type as types, rules, topology,
    v1::{self, ExecStatus},
};

use crate::book::{Books, CancelReason, Event, NewOrder, OrderBook, OrderKind, Resting, Side};

/// The engine handler: the books of every partition this replica owns.
#[derive(Debug)]
pub struct Matching {
    keys: KeySpace,
    redis: Redis,
    books: HashMap<Partition, Books>,
    /// Per partition, the symbols the batch in hand touched and the orders it changed:
    /// what `batch_effects` writes back.
    touched: HashMap<Partition, BTreeMap<String, BTreeSet<String>>>,
    /// Per partition, the symbols its stored set names (so each is added once).
    stored_symbols: HashMap<Partition, BTreeSet<String>>,
}

impl Matching {
    /// An engine writing into `keys`' namespace.
    pub fn new(keys: KeySpace, redis: Redis) -> Self {
        Self {
            keys,
            redis,
            books: HashMap::new(),
            touched: HashMap::new(),
            stored_symbols: HashMap::new(),
        }
    }

    fn touch(&mut self, partition: Partition, symbol: &str) -> &mut BTreeSet<String> {
        self.touched
            .entry(partition)
            .or_default()
            .entry(symbol.to_owned())
            .or_default()
    }

    /// The books of `partition`, if owned.
    pub fn books(&self, partition: Partition) -> Option<&Books> {
        self.books.get(&partition)
    }
}

/// The symbols with a book in `partition` (a set).
fn symbols_key(keys: &KeySpace, partition: Partition) -> String {
    keys.partition_state(topology::ENGINE_GROUP, "symbols", partition)
}

/// Each book's band, last price and sequence in `partition` (hash: symbol → JSON).
fn meta_key(keys: &KeySpace, partition: Partition) -> String {
    keys.partition_state(topology::ENGINE_GROUP, "meta", partition)
}

/// The resting orders of `symbol` (hash: order id → JSON).
fn orders_key(keys: &KeySpace, partition: Partition, symbol: &str) -> String {
    keys.partition_state(
        topology::ENGINE_GROUP,
        &format!("orders:{symbol}"),
        partition,
    )
}

/// The books of `partition` as of its last acknowledged batch (empty if it never had
/// any): what a replica taking the partition over starts from.
pub async fn load_books(
    redis: &Redis,
    keys: &KeySpace,
    partition: Partition,
) -> Result<Books, String> {
    let mut conn = redis.pooled().await.map_err(|e| e.to_string())?;
    let symbols: Vec<String> = redis::cmd("SMEMBERS")
        .arg(symbols_key(keys, partition))
        .query_async(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut books = Books::default();
    for symbol in symbols {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(meta_key(keys, partition)).arg(&symbol);
        pipe.cmd("HVALS").arg(orders_key(keys, partition, &symbol));
        let (meta, orders): (Option<String>, Vec<String>) = pipe
            .query_async(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        let book = restore(meta.as_deref(), &orders)
            .map_err(|e| format!("the stored book of {symbol} is invalid: {e}"))?;
        books.insert(&symbol, book);
    }
    Ok(books)
}

/// What one validated entry did to its partition's books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// An order or a cancel of `symbol`, and the events it produced, in order.
    Book {
        /// The instrument.
        symbol: String,
        /// What the book did.
        events: Vec<Event>,
    },
    /// A tick of `symbol` (it moves the reference price; passed through to the market
    /// stream as it is).
    Tick {
        /// The instrument.
        symbol: String,
    },
}

/// Applies one validated entry to `books`: the whole of matching, with no I/O. The same
/// entries in the same order always give the same events and books, which is what lets
/// any replica continue a partition exactly.
///
/// An entry no transform would have written (a bad symbol or order id, a price that is not
/// positive, a symbol `in_partition` says belongs elsewhere) is refused before it touches
/// a book: a permanent error, so the stage dead-letters it with the reason.
pub fn apply(
    books: &mut Books,
    envelope: &Envelope,
    in_partition: impl Fn(&str) -> bool,
) -> Result<Applied, HandlerError> {
    let check_symbol = |symbol: &str| {
        if let Some(problem) = rules::symbol_problem(symbol) {
            return Err(invalid(format!("symbol {problem}")));
        }
        if !in_partition(symbol) {
            return Err(invalid(format!(
                "symbol {symbol} belongs to another partition"
            )));
        }
        Ok(())
    };
    let check_id = |id: &str| match rules::order_id_problem(id) {
        Some(problem) => Err(invalid(format!("client_order_id {problem}"))),
        None => Ok(()),
    };
    match envelope.event_type.as_str() {
        types::VALIDATED_ORDER => {
            let order: v1::ValidatedOrder = decode(envelope)?;
            check_symbol(&order.symbol)?;
            check_id(&order.client_order_id)?;
            let side = match v1::Side::try_from(order.side) {
                Ok(v1::Side::Buy) => Side::Buy,
                Ok(v1::Side::Sell) => Side::Sell,
                _ => {
                    return Err(HandlerError::Permanent(format!(
                        "order {} without a side",
                        order.client_order_id
                    )));
                }
            };
            let kind = if order.r#type == v1::OrderType::Market as i32 {
                OrderKind::Market
            } else {
                if order.price_e6 <= 0 {
                    return Err(invalid(format!(
                        "price of limit order {} is not positive ({} e-6)",
                        order.client_order_id, order.price_e6
                    )));
                }
                OrderKind::Limit {
                    price: order.price_e6,
                }
            };
            let book = books.book_mut(&order.symbol);
            book.set_band_bps(order.instrument.as_ref().map_or(0, |i| i.band_bps));
            let events = book.submit(NewOrder {
                client_order_id: order.client_order_id,
                side,
                kind,
                qty: order.qty,
            });
            Ok(Applied::Book {
                symbol: order.symbol,
                events,
            })
        }
        types::VALIDATED_CANCEL => {
            let cancel: v1::ValidatedCancel = decode(envelope)?;
            check_symbol(&cancel.symbol)?;
            check_id(&cancel.client_order_id)?;
            let events = books
                .book_mut(&cancel.symbol)
                .cancel(&cancel.client_order_id);
            Ok(Applied::Book {
                symbol: cancel.symbol,
                events,
            })
        }
        types::VALIDATED_TICK => {
            let tick: v1::ValidatedTick = decode(envelope)?;
            check_symbol(&tick.symbol)?;
            if tick.price_e6 <= 0 {
                return Err(invalid(format!(
                    "price of a {} tick is not positive ({} e-6)",
                    tick.symbol, tick.price_e6
                )));
            }
            books.book_mut(&tick.symbol).on_tick(tick.price_e6);
            Ok(Applied::Tick {
                symbol: tick.symbol,
            })
        }
        other => Err(HandlerError::Permanent(format!(
            "engine does not handle event type {other:?}"
        ))),
    }
}

fn invalid(reason: String) -> HandlerError {
    HandlerError::Permanent(reason)
}

fn decode<M: Message + Default>(envelope: &Envelope) -> Result<M, HandlerError> {
    M::decode(envelope.payload.as_ref()).map_err(|e| {
        HandlerError::Permanent(format!(
            "payload of {} is not valid: {e}",
            envelope.event_type
        ))
    })
}

impl Handler for Matching {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let envelope = delivery.envelope.as_ref().expect("envelope stage");
        let market = self.keys.stream(topology::MARKET, delivery.partition);
        let books = self.books.entry(delivery.partition).or_default();
        let keys = &self.keys;
        let in_partition =
            |symbol: &str| keys.partition_for(symbol.as_bytes()) == delivery.partition;
        let (symbol, events) = match apply(books, envelope, in_partition)? {
            Applied::Book { symbol, events } => (symbol, events),
            Applied::Tick { symbol } => {
                self.touch(delivery.partition, &symbol);
                out.append(
                    market,
                    &envelope.derive(types::VALIDATED_TICK, envelope.payload.clone()),
                );
                return Ok(());
            }
        };
        let changed = self.touch(delivery.partition, &symbol);
        for event in &events {
            match event {
                Event::Accepted { order_id, .. }
                | Event::Fill { order_id, .. }
                | Event::Cancelled { order_id, .. } => {
                    changed.insert(order_id.clone());
                }
                Event::Rejected { .. } | Event::Trade { .. } => {}
            }
        }
        if !events.is_empty() {
            let order_events = v1::OrderEvents {
                events: events
                    .into_iter()
                    .map(|event| market_event(&symbol, event))
                    .collect(),
            };
            out.append(
                market,
                &envelope.derive(types::ORDER_EVENTS, order_events.encode_to_vec()),
            );
        }
        Ok(())
    }

    /// Loads the partition's books as of its last acknowledged batch (none if it never
    /// had any), so a replica taking a partition over continues exactly where the last
    /// owner committed.
    async fn partition_acquired(&mut self, partition: Partition) -> Result<(), HandlerError> {
        let books = load_books(&self.redis, &self.keys, partition)
            .await
            .map_err(|e| {
                HandlerError::Retry(format!("loading the books of partition {partition}: {e}"))
            })?;
        self.stored_symbols
            .insert(partition, books.symbols().map(str::to_owned).collect());
        self.books.insert(partition, books);
        self.touched.remove(&partition);
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        self.books.remove(&partition);
        self.touched.remove(&partition);
        self.stored_symbols.remove(&partition);
    }

    /// What the batch changed in the books, stored atomically with its acknowledgement:
    /// each touched book's band, last price and sequence, and each changed order (written
    /// while it rests, deleted once filled or cancelled). The cost follows the changes, not
    /// the size of the books.
    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        let Some(touched) = self.touched.remove(&partition) else {
            return;
        };
        let Some(books) = self.books.get(&partition) else {
            return;
        };
        let mut meta = Vec::new();
        let mut symbols = Vec::new();
        let stored = self.stored_symbols.entry(partition).or_default();
        for (symbol, orders) in touched {
            let Some(book) = books.get(&symbol) else {
                continue;
            };
            if !stored.contains(&symbol) {
                // Added once; a commit that does not go through reloads this set.
                stored.insert(symbol.clone());
                symbols.push(symbol.clone().into_bytes());
            }
            let book_meta = serde_json::json!({
                "band_bps": book.band_bps(),
                "last_price": book.last_price(),
                "sequence": book.sequence(),
            });
            meta.push(symbol.clone().into_bytes());
            meta.push(book_meta.to_string().into_bytes());
            let (mut resting, mut gone) = (Vec::new(), Vec::new());
            for id in orders {
                match book.order(&id) {
                    Some(order) => {
                        let json = serde_json::to_vec(order).expect("orders serialize");
                        resting.push(id.into_bytes());
                        resting.push(json);
                    }
                    None => gone.push(id.into_bytes()),
                }
            }
            let key = orders_key(&self.keys, partition, &symbol);
            if !resting.is_empty() {
                out.command("HSET", key.clone(), resting);
            }
            if !gone.is_empty() {
                out.command("HDEL", key, gone);
            }
        }
        if !symbols.is_empty() {
            out.command("SADD", symbols_key(&self.keys, partition), symbols);
        }
        if !meta.is_empty() {
            out.command("HSET", meta_key(&self.keys, partition), meta);
        }
    }
}

/// Rebuilds a book from its stored meta and resting orders (priority from price, then
/// `accepted_seq`), through the book's own snapshot checks.
fn restore(meta: Option<&str>, orders: &[String]) -> Result<OrderBook, String> {
    let meta: serde_json::Value = match meta {
        Some(text) => serde_json::from_str(text).map_err(|e| e.to_string())?,
        None => serde_json::json!({ "band_bps": 0, "last_price": null, "sequence": 0 }),
    };
    let resting: Vec<Resting> = orders
        .iter()
        .map(|o| serde_json::from_str(o).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let (mut bids, mut asks): (Vec<Resting>, Vec<Resting>) =
        resting.into_iter().partition(|o| o.side == Side::Buy);
    bids.sort_by(|a, b| {
        b.price
            .cmp(&a.price)
            .then(a.accepted_seq.cmp(&b.accepted_seq))
    });
    asks.sort_by(|a, b| {
        a.price
            .cmp(&b.price)
            .then(a.accepted_seq.cmp(&b.accepted_seq))
    });
    let snapshot = serde_json::json!({
        "band_bps": meta["band_bps"],
        "last_price": meta["last_price"],
        "sequence": meta["sequence"],
        "bids": bids,
        "asks": asks,
    });
    serde_json::from_value(snapshot).map_err(|e| e.to_string())
}

/// An engine event as it goes into the market stream's [`v1::OrderEvents`].
pub fn market_event(symbol: &str, event: Event) -> v1::MarketEvent {
    use v1::market_event::Kind;
    let report = |order_id: String, status: ExecStatus, seq: u64| v1::ExecutionReport {
        symbol: symbol.to_owned(),
        client_order_id: order_id,
        status: status as i32,
        sequence: seq,
        ..Default::default()
    };
    let kind = match event {
        Event::Accepted {
            seq, order_id, qty, ..
        } => {
            let mut r = report(order_id, ExecStatus::Accepted, seq);
            r.leaves_qty = qty;
            Kind::Execution(r)
        }
        Event::Rejected {
            seq,
            order_id,
            reason,
        } => {
            let mut r = report(order_id, ExecStatus::Rejected, seq);
            r.reason = reason.to_string();
            Kind::Execution(r)
        }
        Event::Fill {
            seq,
            order_id,
            qty,
            price,
            leaves_qty,
            cumulative_qty,
            ..
        } => {
            let status = if leaves_qty == 0 {
                ExecStatus::Filled
            } else {
                ExecStatus::PartiallyFilled
            };
            let mut r = report(order_id, status, seq);
            r.last_price_e6 = price;
            r.last_qty = qty;
            r.cum_qty = cumulative_qty;
            r.leaves_qty = leaves_qty;
            Kind::Execution(r)
        }
        Event::Cancelled {
            seq,
            order_id,
            leaves_qty,
            cumulative_qty,
            reason,
        } => {
            let mut r = report(order_id, ExecStatus::Cancelled, seq);
            r.leaves_qty = leaves_qty;
            r.cum_qty = cumulative_qty;
            r.reason = match reason {
                CancelReason::Requested => "cancel requested".into(),
                CancelReason::MarketRemainder => "market order remainder".into(),
            };
            Kind::Execution(r)
        }
        Event::Trade {
            seq,
            buy_order_id,
            sell_order_id,
            price,
            qty,
            aggressor,
        } => {
            let trade = v1::Trade {
                symbol: symbol.to_owned(),
                price_e6: price,
                qty,
                buy_order_id,
                sell_order_id,
                aggressor: match aggressor {
                    Side::Buy => v1::Side::Buy,
                    Side::Sell => v1::Side::Sell,
                } as i32,
                sequence: seq,
            };
            Kind::Trade(trade)
        }
    };
    v1::MarketEvent { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_book_restores_from_its_meta_and_resting_orders() {
        let mut book = OrderBook::new(500);
        book.on_tick(100_000_000);
        for (i, (side, price, qty)) in [
            (Side::Buy, 99_000_000, 5),
            (Side::Buy, 99_500_000, 3),
            (Side::Buy, 99_000_000, 2),
            (Side::Sell, 101_000_000, 4),
            (Side::Sell, 100_500_000, 1),
            (Side::Sell, 99_500_000, 2),
        ]
        .into_iter()
        .enumerate()
        {
            book.submit(NewOrder::limit(format!("o{i}"), side, price, qty));
        }
        let meta = serde_json::json!({
            "band_bps": book.band_bps(), "last_price": book.last_price(), "sequence": book.sequence(),
        })
        .to_string();
        let orders: Vec<String> = book
            .orders(Side::Sell)
            .chain(book.orders(Side::Buy))
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        let restored = restore(Some(&meta), &orders).unwrap();
        assert_eq!(restored, book);
        // And it continues identically.
        let (mut a, mut b) = (book.clone(), restored);
        let next = NewOrder::limit("x", Side::Sell, 99_000_000, 9);
        assert_eq!(a.submit(next.clone()), b.submit(next));
        assert_eq!(a, b);
    }
}
