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

use crate::{
    book::{Books, CancelReason, Event, NewOrder, OrderKind, Side},
    store,
};

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
    /// Per partition, the books still stored in the earlier layout: moved with the next
    /// commit ([`store`](crate::store)).
    legacy: HashMap<Partition, BTreeSet<String>>,
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
            legacy: HashMap::new(),
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

/// The books of `partition` as of its last acknowledged batch (empty if it never had
/// any): what a replica taking the partition over starts from ([`store::load`], which reads
/// either layout).
pub async fn load_books(
    redis: &Redis,
    keys: &KeySpace,
    partition: Partition,
) -> Result<Books, String> {
    Ok(store::load(redis, keys, partition).await?.books)
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
        let stored = store::load(&self.redis, &self.keys, partition)
            .await
            .map_err(|e| {
                HandlerError::Retry(format!("loading the books of partition {partition}: {e}"))
            })?;
        if !stored.legacy.is_empty() {
            tracing::info!(
                partition,
                books = stored.legacy.len(),
                "books stored in the earlier per-symbol layout; moving them with the next commit"
            );
        }
        self.stored_symbols.insert(
            partition,
            stored.books.symbols().map(str::to_owned).collect(),
        );
        self.books.insert(partition, stored.books);
        self.legacy.insert(partition, stored.legacy);
        self.touched.remove(&partition);
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        self.books.remove(&partition);
        self.touched.remove(&partition);
        self.stored_symbols.remove(&partition);
        self.legacy.remove(&partition);
    }

    /// What the batch changed in the books, stored atomically with its acknowledgement:
    /// each touched book's band, last price and sequence, and each changed order (written
    /// while it rests, deleted once filled or cancelled), as one HSET and one HDEL of the
    /// partition's orders and one HSET of its metas ([`store::Changes`]). The cost follows
    /// the changes, not the size of the books or how many there are. Books still stored in
    /// the earlier layout are moved whole by the same commit.
    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        let touched = self.touched.remove(&partition).unwrap_or_default();
        let legacy = self.legacy.remove(&partition).unwrap_or_default();
        let Some(books) = self.books.get(&partition) else {
            return;
        };
        let stored = self.stored_symbols.entry(partition).or_default();
        let mut changes = store::Changes::new(store::BookKeys::new(&self.keys, partition), books);
        for symbol in &legacy {
            changes.move_legacy(symbol);
        }
        for (symbol, orders) in touched {
            if legacy.contains(&symbol) {
                // Written whole above.
                continue;
            }
            // Added once; a commit that does not go through reloads this set.
            let new = stored.insert(symbol.clone());
            changes.book(&symbol, orders, new);
        }
        changes.write(out);
    }
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
