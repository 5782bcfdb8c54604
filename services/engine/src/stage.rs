//! The engine stage: validated orders, cancels and ticks of each owned partition go through
//! that partition's [`Books`]; execution reports and trades (and the ticks, passed through)
//! are appended to the market stream, in the order the books produced them.
//!
//! One replica owns a partition at a time (owned mode), so a symbol's book is never split.
//! The books of a partition live in memory while owned; `partition_released` drops them.

use std::collections::HashMap;

use prost::Message;
use streams_core::{
    Delivery, Envelope, Handler, HandlerError, KeySpace, Outputs, Partition, Redis,
};
use tickflow_proto::{
    event_type as types, topology,
    v1::{self, ExecStatus},
};

use crate::book::{Books, CancelReason, Event, NewOrder, OrderKind, Side};

/// The engine handler: the books of every partition this replica owns.
#[derive(Debug)]
pub struct Matching {
    keys: KeySpace,
    redis: Redis,
    books: HashMap<Partition, Books>,
}

impl Matching {
    /// An engine writing into `keys`' namespace.
    pub fn new(keys: KeySpace, redis: Redis) -> Self {
        Self {
            keys,
            redis,
            books: HashMap::new(),
        }
    }

    /// Where the books of `partition` are kept, as of its last acknowledged batch.
    pub fn snapshot_key(&self, partition: Partition) -> String {
        self.keys
            .partition_state(topology::ENGINE_GROUP, "books", partition)
    }

    /// The books of `partition`, if owned.
    pub fn books(&self, partition: Partition) -> Option<&Books> {
        self.books.get(&partition)
    }
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
        let (symbol, events) = match envelope.event_type.as_str() {
            types::VALIDATED_ORDER => {
                let order: v1::ValidatedOrder = decode(envelope)?;
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
                (order.symbol, events)
            }
            types::VALIDATED_CANCEL => {
                let cancel: v1::ValidatedCancel = decode(envelope)?;
                let events = books
                    .book_mut(&cancel.symbol)
                    .cancel(&cancel.client_order_id);
                (cancel.symbol, events)
            }
            types::VALIDATED_TICK => {
                let tick: v1::ValidatedTick = decode(envelope)?;
                books.book_mut(&tick.symbol).on_tick(tick.price_e6);
                out.append(
                    market,
                    &envelope.derive(types::VALIDATED_TICK, envelope.payload.clone()),
                );
                return Ok(());
            }
            other => {
                return Err(HandlerError::Permanent(format!(
                    "engine does not handle event type {other:?}"
                )));
            }
        };
        for event in events {
            let (event_type, payload) = encode(&symbol, event);
            out.append(market.clone(), &envelope.derive(event_type, payload));
        }
        Ok(())
    }

    /// Loads the partition's books as of its last acknowledged batch (empty if none), so
    /// a replica taking a partition over continues exactly where the last owner committed.
    async fn partition_acquired(&mut self, partition: Partition) -> Result<(), HandlerError> {
        let retry = |e: &dyn std::fmt::Display| {
            HandlerError::Retry(format!("loading the books of partition {partition}: {e}"))
        };
        let mut conn = self.redis.pooled().await.map_err(|e| retry(&e))?;
        let stored: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.snapshot_key(partition))
            .query_async(&mut *conn)
            .await
            .map_err(|e| retry(&e))?;
        let books = match stored {
            None => Books::default(),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| retry(&e))?,
        };
        self.books.insert(partition, books);
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        self.books.remove(&partition);
    }

    /// The books after the batch, stored atomically with its acknowledgement: whoever owns
    /// the partition next starts from exactly there.
    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        let Some(books) = self.books.get(&partition) else {
            return;
        };
        match serde_json::to_vec(books) {
            Ok(json) => out.command("SET", self.snapshot_key(partition), vec![json]),
            Err(e) => tracing::error!(partition, error = %e, "books do not serialize"),
        }
    }
}

/// The message an engine event becomes on the market stream.
pub fn encode(symbol: &str, event: Event) -> (&'static str, Vec<u8>) {
    let report = |order_id: String, status: ExecStatus, seq: u64| v1::ExecutionReport {
        symbol: symbol.to_owned(),
        client_order_id: order_id,
        status: status as i32,
        sequence: seq,
        ..Default::default()
    };
    match event {
        Event::Accepted {
            seq, order_id, qty, ..
        } => {
            let mut r = report(order_id, ExecStatus::Accepted, seq);
            r.leaves_qty = qty;
            (types::EXECUTION, r.encode_to_vec())
        }
        Event::Rejected {
            seq,
            order_id,
            reason,
        } => {
            let mut r = report(order_id, ExecStatus::Rejected, seq);
            r.reason = reason.to_string();
            (types::EXECUTION, r.encode_to_vec())
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
            (types::EXECUTION, r.encode_to_vec())
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
            (types::EXECUTION, r.encode_to_vec())
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
            (types::TRADE, trade.encode_to_vec())
        }
    }
}
