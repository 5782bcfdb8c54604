//! The limit order book of one symbol ([`OrderBook`]) and the books of one partition
//! ([`Books`]).
//!
//! Everything here is deterministic: the same commands in the same order produce the same
//! events and the same state, on any machine, including after a snapshot/restore round trip
//! through serde. There are no floats, clocks, random numbers or hash-map iterations on any
//! path that produces output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A price in micro-units: `price × 1_000_000` (see [`PRICE_SCALE`]).
pub type Price = i64;

/// A quantity in whole lots (normalized upstream).
pub type Qty = u64;

/// The number of [`Price`] units in one unit of the quote currency.
pub const PRICE_SCALE: i64 = 1_000_000;

/// Basis points in one whole (100 %).
const BPS_PER_UNIT: i128 = 10_000;

/// The side of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// A bid: wants to buy.
    Buy,
    /// An offer: wants to sell.
    Sell,
}

impl Side {
    /// The other side.
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        })
    }
}

/// How an order is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderKind {
    /// Execute at `price` or better; the remainder rests in the book.
    Limit {
        /// The limit price.
        price: Price,
    },
    /// Execute against whatever rests on the other side (within the price band); the
    /// remainder is cancelled, never rested.
    Market,
}

/// An order as submitted to the book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// The client's id of the order; unique among the book's live (resting) orders.
    pub client_order_id: String,
    /// Buy or sell.
    pub side: Side,
    /// Limit (with its price) or market.
    pub kind: OrderKind,
    /// The quantity, in lots; must be positive.
    pub qty: Qty,
}

impl NewOrder {
    /// A limit order.
    pub fn limit(client_order_id: impl Into<String>, side: Side, price: Price, qty: Qty) -> Self {
        NewOrder {
            client_order_id: client_order_id.into(),
            side,
            kind: OrderKind::Limit { price },
            qty,
        }
    }

    /// A market order.
    pub fn market(client_order_id: impl Into<String>, side: Side, qty: Qty) -> Self {
        NewOrder {
            client_order_id: client_order_id.into(),
            side,
            kind: OrderKind::Market,
            qty,
        }
    }
}

/// An order resting in the book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resting {
    /// The client's id of the order.
    pub order_id: String,
    /// Buy or sell.
    pub side: Side,
    /// The limit price, which is also its level.
    pub price: Price,
    /// The quantity originally submitted.
    pub qty: Qty,
    /// What is left to fill; always positive for an order in the book.
    pub leaves_qty: Qty,
    /// The sequence number of the order's `Accepted` event (its time priority).
    pub accepted_seq: u64,
}

impl Resting {
    /// The quantity filled so far.
    pub fn filled_qty(&self) -> Qty {
        self.qty - self.leaves_qty
    }
}

/// Why an order or a cancel was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum RejectReason {
    /// The order's quantity was zero.
    #[error("quantity is zero")]
    ZeroQuantity,
    /// A live order with the same client order id rests in the book.
    #[error("a live order has the same client order id")]
    DuplicateOrderId,
    /// The limit price lies outside the band `[low, high]` around the reference price.
    #[error("price {price} is outside the band [{low}, {high}]")]
    OutsidePriceBand {
        /// The order's limit price.
        price: Price,
        /// The lowest price the band allows.
        low: Price,
        /// The highest price the band allows.
        high: Price,
    },
    /// A cancel named no live order (never seen, already filled or already cancelled).
    #[error("no live order has this client order id")]
    UnknownOrder,
    /// A market order found nothing to execute against: the other side is empty, or has
    /// nothing within the price band.
    #[error("no liquidity to execute against")]
    NoLiquidity,
}

/// Why a live order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The client asked for it.
    Requested,
    /// The unfilled rest of a market order (market orders never rest).
    MarketRemainder,
}

/// What the book reports. Every event carries `seq`, the book's sequence number, which
/// grows by one per event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The order passed validation; fills (and maybe a cancel) follow.
    Accepted {
        /// Sequence number.
        seq: u64,
        /// The client order id.
        order_id: String,
        /// Buy or sell.
        side: Side,
        /// Limit (with its price) or market.
        kind: OrderKind,
        /// The submitted quantity.
        qty: Qty,
    },
    /// The order or the cancel was refused; the book did not change.
    Rejected {
        /// Sequence number.
        seq: u64,
        /// The client order id of the order or the cancel.
        order_id: String,
        /// Why.
        reason: RejectReason,
    },
    /// One side of an execution, for one order. Each execution yields a [`Event::Trade`]
    /// followed by the taker's fill and then the maker's.
    Fill {
        /// Sequence number.
        seq: u64,
        /// The client order id.
        order_id: String,
        /// The order's side.
        side: Side,
        /// The quantity of this execution.
        qty: Qty,
        /// The execution price (the maker's price).
        price: Price,
        /// What is left of the order after this fill; `0` means it is completely filled.
        leaves_qty: Qty,
        /// The order's total filled quantity, this fill included.
        cumulative_qty: Qty,
        /// Whether the order was the incoming (aggressing) one.
        is_taker: bool,
    },
    /// An execution between a buy and a sell order, at the maker's price.
    Trade {
        /// Sequence number.
        seq: u64,
        /// The buying order's client order id.
        buy_order_id: String,
        /// The selling order's client order id.
        sell_order_id: String,
        /// The execution price (the resting order's price).
        price: Price,
        /// The executed quantity.
        qty: Qty,
        /// The side of the incoming order.
        aggressor: Side,
    },
    /// A live order left the book without being completely filled.
    Cancelled {
        /// Sequence number.
        seq: u64,
        /// The client order id.
        order_id: String,
        /// The quantity that will never be filled.
        leaves_qty: Qty,
        /// The order's total filled quantity before it left the book.
        cumulative_qty: Qty,
        /// Why.
        reason: CancelReason,
    },
}

impl Event {
    /// The event's sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Accepted { seq, .. }
            | Event::Rejected { seq, .. }
            | Event::Fill { seq, .. }
            | Event::Trade { seq, .. }
            | Event::Cancelled { seq, .. } => *seq,
        }
    }
}

/// One side of the book: price → orders at that price, in arrival order. A level is never
/// empty.
type Levels = BTreeMap<Price, VecDeque<Resting>>;

/// The limit order book of one symbol.
///
/// Matching is price-time priority: the best price first, and at one price the earliest
/// order first. Executions happen at the resting (maker) order's price. See the crate docs
/// for the rules.
///
/// Serde: the book serializes as its snapshot (see the crate docs for the format) and
/// deserializing validates it and rebuilds the order index, so a restored book is equal to
/// the original and continues identically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBook {
    bids: Levels,
    asks: Levels,
    /// client order id → where the order rests. Derived from the levels; never iterated.
    index: HashMap<String, (Side, Price)>,
    last_price: Option<Price>,
    sequence: u64,
    band_bps: u32,
}

impl Default for OrderBook {
    /// An empty book without a price band.
    fn default() -> Self {
        OrderBook::new(0)
    }
}

impl OrderBook {
    /// An empty book with a price band of `band_bps` basis points around the reference
    /// price (`0`: no band).
    pub fn new(band_bps: u32) -> Self {
        OrderBook {
            bids: Levels::new(),
            asks: Levels::new(),
            index: HashMap::new(),
            last_price: None,
            sequence: 0,
            band_bps,
        }
    }

    /// Submits an order and returns what happened, in order.
    pub fn submit(&mut self, order: NewOrder) -> Vec<Event> {
        let mut events = Vec::new();
        let NewOrder {
            client_order_id,
            side,
            kind,
            qty,
        } = order;

        if qty == 0 {
            self.reject(client_order_id, RejectReason::ZeroQuantity, &mut events);
            return events;
        }
        if self.index.contains_key(&client_order_id) {
            self.reject(client_order_id, RejectReason::DuplicateOrderId, &mut events);
            return events;
        }
        let band = self.band();
        match kind {
            OrderKind::Limit { price } => {
                if let Some((low, high)) = band
                    && !(low..=high).contains(&price)
                {
                    let reason = RejectReason::OutsidePriceBand { price, low, high };
                    self.reject(client_order_id, reason, &mut events);
                    return events;
                }
                self.accept(&client_order_id, side, kind, qty, &mut events);
                let accepted_seq = self.sequence;
                let leaves = self.execute(&client_order_id, side, qty, Some(price), &mut events);
                if leaves > 0 {
                    self.rest(Resting {
                        order_id: client_order_id,
                        side,
                        price,
                        qty,
                        leaves_qty: leaves,
                        accepted_seq,
                    });
                }
            }
            OrderKind::Market => {
                // Fixed at arrival: the band does not move while the order sweeps.
                let bound = band.map(|(low, high)| match side {
                    Side::Buy => high,
                    Side::Sell => low,
                });
                let executable = match side {
                    Side::Buy => self.best_ask(),
                    Side::Sell => self.best_bid(),
                }
                .is_some_and(|best| bound.is_none_or(|bound| crosses(side, bound, best)));
                if !executable {
                    self.reject(client_order_id, RejectReason::NoLiquidity, &mut events);
                    return events;
                }
                self.accept(&client_order_id, side, kind, qty, &mut events);
                let leaves = self.execute(&client_order_id, side, qty, bound, &mut events);
                if leaves > 0 {
                    events.push(Event::Cancelled {
                        seq: next_seq(&mut self.sequence),
                        order_id: client_order_id,
                        leaves_qty: leaves,
                        cumulative_qty: qty - leaves,
                        reason: CancelReason::MarketRemainder,
                    });
                }
            }
        }
        events
    }

    /// Cancels the live order `client_order_id`: `Cancelled` with its leaves, or `Rejected`
    /// with [`RejectReason::UnknownOrder`] if no such order rests in the book.
    pub fn cancel(&mut self, client_order_id: &str) -> Vec<Event> {
        let mut events = Vec::new();
        let Some((side, price)) = self.index.remove(client_order_id) else {
            self.reject(
                client_order_id.to_owned(),
                RejectReason::UnknownOrder,
                &mut events,
            );
            return events;
        };
        let levels = match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        let queue = levels
            .get_mut(&price)
            .expect("an indexed order's level exists");
        let position = queue
            .iter()
            .position(|o| o.order_id == client_order_id)
            .expect("an indexed order is in its level");
        let order = queue.remove(position).expect("position is in range");
        if queue.is_empty() {
            levels.remove(&price);
        }
        events.push(Event::Cancelled {
            seq: next_seq(&mut self.sequence),
            cumulative_qty: order.filled_qty(),
            order_id: order.order_id,
            leaves_qty: order.leaves_qty,
            reason: CancelReason::Requested,
        });
        events
    }

    /// Sets the reference price (e.g. from a market-data tick). Emits nothing.
    pub fn on_tick(&mut self, price: Price) {
        self.last_price = Some(price);
    }

    /// Changes the price band (`0`: no band). Applies to orders submitted from now on;
    /// resting orders are not re-checked.
    pub fn set_band_bps(&mut self, band_bps: u32) {
        self.band_bps = band_bps;
    }

    /// The band, in basis points around the reference price (`0`: no band).
    pub fn band_bps(&self) -> u32 {
        self.band_bps
    }

    /// The band `(low, high)` (inclusive) that applies now, or `None` if there is no band
    /// (`band_bps == 0`) or no reference price yet. Its half-width is
    /// `|reference| × band_bps / 10_000`, rounded toward zero (so the band never allows
    /// more than configured), clamped to the `Price` range.
    pub fn band(&self) -> Option<(Price, Price)> {
        if self.band_bps == 0 {
            return None;
        }
        let reference = i128::from(self.last_price?);
        let half_width = reference.abs() * i128::from(self.band_bps) / BPS_PER_UNIT;
        Some((
            clamp_price(reference - half_width),
            clamp_price(reference + half_width),
        ))
    }

    /// The reference price: the last trade's or tick's, whichever came last.
    pub fn last_price(&self) -> Option<Price> {
        self.last_price
    }

    /// The sequence number of the last event emitted (`0`: none yet).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The highest bid.
    pub fn best_bid(&self) -> Option<Price> {
        self.bids.last_key_value().map(|(price, _)| *price)
    }

    /// The lowest offer.
    pub fn best_ask(&self) -> Option<Price> {
        self.asks.first_key_value().map(|(price, _)| *price)
    }

    /// The levels of one side, best first, as (price, total leaves quantity).
    pub fn depth(&self, side: Side) -> Vec<(Price, Qty)> {
        let total = |(price, queue): (&Price, &VecDeque<Resting>)| {
            (*price, queue.iter().map(|o| o.leaves_qty).sum())
        };
        match side {
            Side::Buy => self.bids.iter().rev().map(total).collect(),
            Side::Sell => self.asks.iter().map(total).collect(),
        }
    }

    /// The live order `client_order_id`, if it rests in the book.
    pub fn order(&self, client_order_id: &str) -> Option<&Resting> {
        let (side, price) = self.index.get(client_order_id)?;
        self.levels(*side)
            .get(price)?
            .iter()
            .find(|o| o.order_id == client_order_id)
    }

    /// The resting orders of one side in priority order (best price first, then arrival).
    pub fn orders(&self, side: Side) -> impl Iterator<Item = &Resting> + '_ {
        let levels: Box<dyn Iterator<Item = &VecDeque<Resting>> + '_> = match side {
            Side::Buy => Box::new(self.bids.values().rev()),
            Side::Sell => Box::new(self.asks.values()),
        };
        levels.flatten()
    }

    /// The number of resting orders.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no order rests in the book.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn levels(&self, side: Side) -> &Levels {
        match side {
            Side::Buy => &self.bids,
            Side::Sell => &self.asks,
        }
    }

    fn reject(&mut self, order_id: String, reason: RejectReason, events: &mut Vec<Event>) {
        events.push(Event::Rejected {
            seq: next_seq(&mut self.sequence),
            order_id,
            reason,
        });
    }

    fn accept(
        &mut self,
        order_id: &str,
        side: Side,
        kind: OrderKind,
        qty: Qty,
        events: &mut Vec<Event>,
    ) {
        events.push(Event::Accepted {
            seq: next_seq(&mut self.sequence),
            order_id: order_id.to_owned(),
            side,
            kind,
            qty,
        });
    }

    /// Executes an incoming order of `qty` against the other side, best level first, FIFO
    /// within a level, while the resting price is at `limit` or better (any price when
    /// `None`). Returns the unexecuted quantity.
    fn execute(
        &mut self,
        taker_id: &str,
        side: Side,
        qty: Qty,
        limit: Option<Price>,
        events: &mut Vec<Event>,
    ) -> Qty {
        let mut leaves = qty;
        while leaves > 0 {
            let best = match side {
                Side::Buy => self.asks.first_entry(),
                Side::Sell => self.bids.last_entry(),
            };
            let Some(mut level) = best else { break };
            let price = *level.key();
            if limit.is_some_and(|limit| !crosses(side, limit, price)) {
                break;
            }
            let queue = level.get_mut();
            let maker = queue.front_mut().expect("levels are never empty");
            let fill = leaves.min(maker.leaves_qty);
            leaves -= fill;
            maker.leaves_qty -= fill;

            let (buy_order_id, sell_order_id) = match side {
                Side::Buy => (taker_id.to_owned(), maker.order_id.clone()),
                Side::Sell => (maker.order_id.clone(), taker_id.to_owned()),
            };
            events.push(Event::Trade {
                seq: next_seq(&mut self.sequence),
                buy_order_id,
                sell_order_id,
                price,
                qty: fill,
                aggressor: side,
            });
            events.push(Event::Fill {
                seq: next_seq(&mut self.sequence),
                order_id: taker_id.to_owned(),
                side,
                qty: fill,
                price,
                leaves_qty: leaves,
                cumulative_qty: qty - leaves,
                is_taker: true,
            });
            events.push(Event::Fill {
                seq: next_seq(&mut self.sequence),
                order_id: maker.order_id.clone(),
                side: maker.side,
                qty: fill,
                price,
                leaves_qty: maker.leaves_qty,
                cumulative_qty: maker.filled_qty(),
                is_taker: false,
            });
            self.last_price = Some(price);

            if maker.leaves_qty == 0 {
                let done = queue.pop_front().expect("the maker is at the front");
                self.index.remove(&done.order_id);
                if queue.is_empty() {
                    level.remove();
                }
            }
        }
        leaves
    }

    fn rest(&mut self, order: Resting) {
        self.index
            .insert(order.order_id.clone(), (order.side, order.price));
        let levels = match order.side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        // A new level holds one order until a second comes (VecDeque's first push would
        // reserve room for four: most levels of a deep book hold one or two orders).
        levels
            .entry(order.price)
            .or_insert_with(|| VecDeque::with_capacity(1))
            .push_back(order);
    }

    /// Rebuilds a book from its parts, checked exactly as a deserialized snapshot is: the
    /// band, the reference price, the sequence, and each side's resting orders in priority
    /// order (best price first, then arrival).
    pub fn from_parts(
        band_bps: u32,
        last_price: Option<Price>,
        sequence: u64,
        bids: Vec<Resting>,
        asks: Vec<Resting>,
    ) -> Result<Self, SnapshotError> {
        OrderBook::from_snapshot(Snapshot {
            band_bps,
            last_price,
            sequence,
            bids,
            asks,
        })
    }

    /// Rebuilds a book from its snapshot, checking every invariant the book relies on.
    fn from_snapshot(snapshot: Snapshot) -> Result<Self, SnapshotError> {
        let Snapshot {
            band_bps,
            last_price,
            sequence,
            bids,
            asks,
        } = snapshot;
        let mut book = OrderBook::new(band_bps);
        book.last_price = last_price;
        book.sequence = sequence;
        for (side, orders) in [(Side::Buy, bids), (Side::Sell, asks)] {
            let mut previous: Option<Price> = None;
            for order in orders {
                let id = order.order_id.clone();
                if order.side != side {
                    return Err(SnapshotError::WrongSide(id));
                }
                if order.leaves_qty == 0 || order.leaves_qty > order.qty {
                    return Err(SnapshotError::BadQuantity(id));
                }
                if order.accepted_seq == 0 || order.accepted_seq > sequence {
                    return Err(SnapshotError::BadSequence(id));
                }
                // Best price first: bids descending, asks ascending.
                if previous.is_some_and(|p| !crosses(side, p, order.price)) {
                    return Err(SnapshotError::OutOfOrder(id));
                }
                if book.index.contains_key(&id) {
                    return Err(SnapshotError::DuplicateOrderId(id));
                }
                previous = Some(order.price);
                book.rest(order);
            }
        }
        if let (Some(bid), Some(ask)) = (book.best_bid(), book.best_ask())
            && bid >= ask
        {
            return Err(SnapshotError::Crossed { bid, ask });
        }
        Ok(book)
    }
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// An order is listed under the other side.
    #[error("order {0:?} is on the wrong side")]
    WrongSide(String),
    /// An order's leaves are zero or exceed its quantity.
    #[error("order {0:?} has leaves of zero or above its quantity")]
    BadQuantity(String),
    /// An order's `accepted_seq` is zero or after the book's sequence.
    #[error("order {0:?} has an accepted_seq outside 1..=sequence")]
    BadSequence(String),
    /// The orders of a side are not in priority order (best price first).
    #[error("order {0:?} is out of price order")]
    OutOfOrder(String),
    /// Two live orders share a client order id.
    #[error("order id {0:?} appears twice")]
    DuplicateOrderId(String),
    /// The best bid is not below the best ask.
    #[error("the book is crossed: bid {bid} >= ask {ask}")]
    Crossed {
        /// The best bid.
        bid: Price,
        /// The best ask.
        ask: Price,
    },
}

/// The serialized form of an [`OrderBook`] (the order index is derived from the levels).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    band_bps: u32,
    last_price: Option<Price>,
    sequence: u64,
    bids: Vec<Resting>,
    asks: Vec<Resting>,
}

impl Serialize for OrderBook {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("OrderBook", 5)?;
        s.serialize_field("band_bps", &self.band_bps)?;
        s.serialize_field("last_price", &self.last_price)?;
        s.serialize_field("sequence", &self.sequence)?;
        s.serialize_field("bids", &SideOrders(self, Side::Buy))?;
        s.serialize_field("asks", &SideOrders(self, Side::Sell))?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for OrderBook {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let snapshot = Snapshot::deserialize(deserializer)?;
        OrderBook::from_snapshot(snapshot).map_err(serde::de::Error::custom)
    }
}

/// Serializes one side's orders in priority order without copying them.
struct SideOrders<'a>(&'a OrderBook, Side);

impl Serialize for SideOrders<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.orders(self.1))
    }
}

/// What a partition's engine applies to one symbol's book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// [`OrderBook::submit`].
    Submit {
        /// The order.
        order: NewOrder,
    },
    /// [`OrderBook::cancel`].
    Cancel {
        /// The order to cancel.
        client_order_id: String,
    },
    /// [`OrderBook::on_tick`].
    Tick {
        /// The new reference price.
        price: Price,
    },
}

/// The books of one partition: symbol → [`OrderBook`], each created on the first command
/// for its symbol with the partition's band. This is what an engine replica holds (and
/// snapshots) per owned partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Books {
    band_bps: u32,
    books: BTreeMap<String, OrderBook>,
}

impl Books {
    /// No books yet; each new book gets a band of `band_bps` (`0`: no band).
    pub fn new(band_bps: u32) -> Self {
        Books {
            band_bps,
            books: BTreeMap::new(),
        }
    }

    /// Applies `command` to the book of `symbol` (creating it if needed) and returns its
    /// events. Sequence numbers are per book.
    pub fn apply(&mut self, symbol: &str, command: Command) -> Vec<Event> {
        let band_bps = self.band_bps;
        let book = self
            .books
            .entry(symbol.to_owned())
            .or_insert_with(|| OrderBook::new(band_bps));
        match command {
            Command::Submit { order } => book.submit(order),
            Command::Cancel { client_order_id } => book.cancel(&client_order_id),
            Command::Tick { price } => {
                book.on_tick(price);
                Vec::new()
            }
        }
    }

    /// Puts a restored book in place for `symbol`.
    pub fn insert(&mut self, symbol: &str, book: OrderBook) {
        self.books.insert(symbol.to_owned(), book);
    }

    /// The book of `symbol`, created (with the partition's band) if needed.
    pub fn book_mut(&mut self, symbol: &str) -> &mut OrderBook {
        let band_bps = self.band_bps;
        self.books
            .entry(symbol.to_owned())
            .or_insert_with(|| OrderBook::new(band_bps))
    }

    /// The book of `symbol`, if any command reached it.
    pub fn get(&self, symbol: &str) -> Option<&OrderBook> {
        self.books.get(symbol)
    }

    /// The symbols with a book, in order.
    pub fn symbols(&self) -> impl Iterator<Item = &str> + '_ {
        self.books.keys().map(String::as_str)
    }

    /// The band new books get.
    pub fn band_bps(&self) -> u32 {
        self.band_bps
    }

    /// The number of books.
    pub fn len(&self) -> usize {
        self.books.len()
    }

    /// Whether there is no book.
    pub fn is_empty(&self) -> bool {
        self.books.is_empty()
    }
}

/// Whether an order of `side` with limit `limit` may execute at `price`.
fn crosses(side: Side, limit: Price, price: Price) -> bool {
    match side {
        Side::Buy => price <= limit,
        Side::Sell => price >= limit,
    }
}

fn next_seq(sequence: &mut u64) -> u64 {
    *sequence += 1;
    *sequence
}

fn clamp_price(price: i128) -> Price {
    Price::try_from(price).unwrap_or(if price < 0 { Price::MIN } else { Price::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole units to a price.
    fn px(units: i64) -> Price {
        units * PRICE_SCALE
    }

    fn limit(id: &str, side: Side, price: i64, qty: Qty) -> NewOrder {
        NewOrder::limit(id, side, px(price), qty)
    }

    /// The (buy, sell, price, qty) of each trade.
    fn trades(events: &[Event]) -> Vec<(String, String, Price, Qty)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Trade {
                    buy_order_id,
                    sell_order_id,
                    price,
                    qty,
                    ..
                } => Some((buy_order_id.clone(), sell_order_id.clone(), *price, *qty)),
                _ => None,
            })
            .collect()
    }

    fn trade(buy: &str, sell: &str, price: i64, qty: Qty) -> (String, String, Price, Qty) {
        (buy.to_owned(), sell.to_owned(), px(price), qty)
    }

    fn rejection(events: &[Event]) -> Option<RejectReason> {
        match events {
            [Event::Rejected { reason, .. }] => Some(reason.clone()),
            _ => None,
        }
    }

    fn book_with(band_bps: u32, orders: &[NewOrder]) -> OrderBook {
        let mut book = OrderBook::new(band_bps);
        for order in orders {
            let events = book.submit(order.clone());
            assert!(matches!(events[0], Event::Accepted { .. }), "{events:?}");
        }
        book
    }

    #[test]
    fn same_price_fills_in_arrival_order() {
        let mut book = book_with(
            0,
            &[
                limit("a1", Side::Sell, 100, 5),
                limit("a2", Side::Sell, 100, 5),
            ],
        );
        let events = book.submit(limit("b", Side::Buy, 100, 7));
        assert_eq!(
            trades(&events),
            [trade("b", "a1", 100, 5), trade("b", "a2", 100, 2)]
        );
        assert!(book.order("a1").is_none());
        assert_eq!(book.order("a2").unwrap().leaves_qty, 3);
        assert!(book.order("b").is_none());
    }

    #[test]
    fn better_price_fills_first() {
        let mut book = book_with(
            0,
            &[
                limit("a101", Side::Sell, 101, 5),
                limit("a100", Side::Sell, 100, 5),
                limit("b98", Side::Buy, 98, 5),
                limit("b99", Side::Buy, 99, 5),
            ],
        );
        let events = book.submit(limit("buy", Side::Buy, 101, 6));
        assert_eq!(
            trades(&events),
            [trade("buy", "a100", 100, 5), trade("buy", "a101", 101, 1)]
        );
        let events = book.submit(NewOrder::market("sell", Side::Sell, 6));
        assert_eq!(
            trades(&events),
            [trade("b99", "sell", 99, 5), trade("b98", "sell", 98, 1)]
        );
    }

    #[test]
    fn partial_fill_rests_taker_remainder() {
        let mut book = book_with(0, &[limit("a", Side::Sell, 100, 3)]);
        let events = book.submit(limit("b", Side::Buy, 101, 10));
        assert_eq!(
            events,
            [
                Event::Accepted {
                    seq: 2,
                    order_id: "b".into(),
                    side: Side::Buy,
                    kind: OrderKind::Limit { price: px(101) },
                    qty: 10,
                },
                Event::Trade {
                    seq: 3,
                    buy_order_id: "b".into(),
                    sell_order_id: "a".into(),
                    price: px(100),
                    qty: 3,
                    aggressor: Side::Buy,
                },
                Event::Fill {
                    seq: 4,
                    order_id: "b".into(),
                    side: Side::Buy,
                    qty: 3,
                    price: px(100),
                    leaves_qty: 7,
                    cumulative_qty: 3,
                    is_taker: true,
                },
                Event::Fill {
                    seq: 5,
                    order_id: "a".into(),
                    side: Side::Sell,
                    qty: 3,
                    price: px(100),
                    leaves_qty: 0,
                    cumulative_qty: 3,
                    is_taker: false,
                },
            ]
        );
        let resting = book.order("b").unwrap();
        assert_eq!(
            (resting.price, resting.qty, resting.leaves_qty),
            (px(101), 10, 7)
        );
        assert_eq!(resting.filled_qty(), 3);
        assert_eq!(resting.accepted_seq, 2);
        assert_eq!(book.best_bid(), Some(px(101)));
        assert_eq!(book.best_ask(), None);
    }

    #[test]
    fn partial_fill_of_maker_keeps_its_priority() {
        let mut book = book_with(
            0,
            &[
                limit("a1", Side::Sell, 100, 10),
                limit("a2", Side::Sell, 100, 10),
            ],
        );
        let events = book.submit(limit("b1", Side::Buy, 100, 4));
        assert!(events.contains(&Event::Fill {
            seq: 6,
            order_id: "a1".into(),
            side: Side::Sell,
            qty: 4,
            price: px(100),
            leaves_qty: 6,
            cumulative_qty: 4,
            is_taker: false,
        }));
        let events = book.submit(limit("b2", Side::Buy, 100, 8));
        assert_eq!(
            trades(&events),
            [trade("b2", "a1", 100, 6), trade("b2", "a2", 100, 2)]
        );
        let [
            ..,
            Event::Fill {
                order_id,
                leaves_qty,
                cumulative_qty,
                ..
            },
        ] = events.as_slice()
        else {
            panic!("{events:?}")
        };
        assert_eq!(
            (order_id.as_str(), *leaves_qty, *cumulative_qty),
            ("a2", 8, 2)
        );
        assert_eq!(book.depth(Side::Sell), [(px(100), 8)]);
    }

    #[test]
    fn trades_execute_at_the_maker_price() {
        let mut book = book_with(0, &[limit("a", Side::Sell, 100, 5)]);
        let events = book.submit(limit("b", Side::Buy, 110, 5));
        assert_eq!(trades(&events), [trade("b", "a", 100, 5)]);
        assert_eq!(book.last_price(), Some(px(100)));

        let mut book = book_with(0, &[limit("b", Side::Buy, 100, 5)]);
        let events = book.submit(limit("a", Side::Sell, 90, 5));
        assert_eq!(trades(&events), [trade("b", "a", 100, 5)]);
        assert!(events.iter().all(|e| match e {
            Event::Fill { price, .. } => *price == px(100),
            _ => true,
        }));
    }

    #[test]
    fn limit_order_that_does_not_cross_rests() {
        let mut book = book_with(
            0,
            &[
                limit("a", Side::Sell, 101, 5),
                limit("b", Side::Buy, 100, 5),
            ],
        );
        assert_eq!(book.best_bid(), Some(px(100)));
        assert_eq!(book.best_ask(), Some(px(101)));
        let events = book.submit(limit("b2", Side::Buy, 100, 1));
        assert_eq!(events.len(), 1);
        assert_eq!(book.depth(Side::Buy), [(px(100), 6)]);
        assert_eq!(book.len(), 3);
    }

    #[test]
    fn market_order_against_empty_book_is_rejected() {
        let mut book = OrderBook::new(0);
        let events = book.submit(NewOrder::market("m", Side::Buy, 5));
        assert_eq!(
            events,
            [Event::Rejected {
                seq: 1,
                order_id: "m".into(),
                reason: RejectReason::NoLiquidity,
            }]
        );
        // Liquidity on the same side does not help.
        let mut book = book_with(0, &[limit("b", Side::Buy, 100, 5)]);
        let events = book.submit(NewOrder::market("m", Side::Buy, 5));
        assert_eq!(rejection(&events), Some(RejectReason::NoLiquidity));
        assert_eq!(book.depth(Side::Buy), [(px(100), 5)]);
    }

    #[test]
    fn market_order_against_thin_book_cancels_the_remainder() {
        let mut book = book_with(
            0,
            &[
                limit("a1", Side::Sell, 100, 2),
                limit("a2", Side::Sell, 105, 3),
            ],
        );
        let events = book.submit(NewOrder::market("m", Side::Buy, 10));
        assert_eq!(
            trades(&events),
            [trade("m", "a1", 100, 2), trade("m", "a2", 105, 3)]
        );
        assert_eq!(
            events.last(),
            Some(&Event::Cancelled {
                seq: 10,
                order_id: "m".into(),
                leaves_qty: 5,
                cumulative_qty: 5,
                reason: CancelReason::MarketRemainder,
            })
        );
        assert!(book.is_empty());
        assert!(book.order("m").is_none());
        assert_eq!(book.last_price(), Some(px(105)));
    }

    #[test]
    fn market_order_filled_completely_has_no_cancel() {
        let mut book = book_with(0, &[limit("b", Side::Buy, 100, 10)]);
        let events = book.submit(NewOrder::market("m", Side::Sell, 4));
        assert!(!events.iter().any(|e| matches!(e, Event::Cancelled { .. })));
        assert_eq!(book.depth(Side::Buy), [(px(100), 6)]);
    }

    #[test]
    fn cancel_resting_order() {
        let mut book = book_with(
            0,
            &[
                limit("a1", Side::Sell, 100, 5),
                limit("a2", Side::Sell, 100, 7),
                limit("a3", Side::Sell, 100, 9),
            ],
        );
        book.submit(limit("b", Side::Buy, 100, 2));
        assert_eq!(
            book.cancel("a1"),
            [Event::Cancelled {
                seq: 8,
                order_id: "a1".into(),
                leaves_qty: 3,
                cumulative_qty: 2,
                reason: CancelReason::Requested,
            }]
        );
        assert!(book.order("a1").is_none());
        // Cancelling from the middle of a level keeps the others' order.
        book.cancel("a3");
        let events = book.submit(limit("b2", Side::Buy, 100, 7));
        assert_eq!(trades(&events), [trade("b2", "a2", 100, 7)]);
        assert!(book.is_empty());
        assert_eq!(book.depth(Side::Sell), []);
        assert_eq!(book.best_ask(), None);
    }

    #[test]
    fn cancel_unknown_filled_or_cancelled_order_is_rejected() {
        let mut book = book_with(0, &[limit("a", Side::Sell, 100, 5)]);
        assert_eq!(
            rejection(&book.cancel("nope")),
            Some(RejectReason::UnknownOrder)
        );

        book.submit(limit("b", Side::Buy, 100, 5));
        assert_eq!(
            rejection(&book.cancel("a")),
            Some(RejectReason::UnknownOrder)
        );
        assert_eq!(
            rejection(&book.cancel("b")),
            Some(RejectReason::UnknownOrder)
        );

        book.submit(limit("c", Side::Buy, 100, 5));
        assert!(matches!(
            book.cancel("c").as_slice(),
            [Event::Cancelled { .. }]
        ));
        assert_eq!(
            rejection(&book.cancel("c")),
            Some(RejectReason::UnknownOrder)
        );
    }

    #[test]
    fn duplicate_live_id_is_rejected_but_ids_can_be_reused() {
        let mut book = book_with(0, &[limit("x", Side::Buy, 100, 5)]);
        let events = book.submit(limit("x", Side::Sell, 100, 5));
        assert_eq!(rejection(&events), Some(RejectReason::DuplicateOrderId));
        let events = book.submit(NewOrder::market("x", Side::Sell, 5));
        assert_eq!(rejection(&events), Some(RejectReason::DuplicateOrderId));
        assert_eq!(book.depth(Side::Buy), [(px(100), 5)]);

        book.cancel("x");
        let events = book.submit(limit("x", Side::Sell, 100, 5));
        assert!(matches!(events.as_slice(), [Event::Accepted { .. }]));
    }

    #[test]
    fn zero_quantity_is_rejected() {
        let mut book = book_with(0, &[limit("a", Side::Sell, 100, 5)]);
        let events = book.submit(limit("b", Side::Buy, 100, 0));
        assert_eq!(rejection(&events), Some(RejectReason::ZeroQuantity));
        let events = book.submit(NewOrder::market("m", Side::Buy, 0));
        assert_eq!(rejection(&events), Some(RejectReason::ZeroQuantity));
        // Zero quantity is checked before duplicates.
        let events = book.submit(limit("a", Side::Sell, 100, 0));
        assert_eq!(rejection(&events), Some(RejectReason::ZeroQuantity));
        assert_eq!(book.depth(Side::Sell), [(px(100), 5)]);
    }

    #[test]
    fn limit_price_band() {
        let mut book = OrderBook::new(500); // ±5 %
        // No reference price yet: no band.
        assert_eq!(book.band(), None);
        assert!(matches!(
            book.submit(limit("far", Side::Buy, 1, 1)).as_slice(),
            [Event::Accepted { .. }]
        ));

        book.on_tick(px(100));
        assert_eq!(book.band(), Some((px(95), px(105))));
        let events = book.submit(NewOrder::limit("low", Side::Buy, px(95) - 1, 1));
        assert_eq!(
            rejection(&events),
            Some(RejectReason::OutsidePriceBand {
                price: px(95) - 1,
                low: px(95),
                high: px(105),
            })
        );
        let events = book.submit(limit("high", Side::Sell, 106, 1));
        assert!(matches!(
            rejection(&events),
            Some(RejectReason::OutsidePriceBand { .. })
        ));
        // The edges are inside.
        for (id, side, price) in [("e1", Side::Buy, 95), ("e2", Side::Sell, 105)] {
            let events = book.submit(limit(id, side, price, 1));
            assert!(matches!(events[0], Event::Accepted { .. }), "{events:?}");
        }
    }

    #[test]
    fn band_zero_means_no_band() {
        let mut book = OrderBook::new(0);
        book.on_tick(px(100));
        assert_eq!(book.band(), None);
        let events = book.submit(limit("b", Side::Buy, 1, 1));
        assert!(matches!(events[0], Event::Accepted { .. }));
    }

    #[test]
    fn band_follows_the_last_trade() {
        let mut book = OrderBook::new(100); // ±1 %
        book.on_tick(px(100));
        book.submit(limit("a", Side::Sell, 101, 1));
        book.submit(limit("b", Side::Buy, 101, 1));
        assert_eq!(book.last_price(), Some(px(101)));
        assert_eq!(
            book.band(),
            Some((px(101) - 1_010_000, px(101) + 1_010_000))
        );
        book.on_tick(px(200));
        assert_eq!(book.band(), Some((px(198), px(202))));
    }

    #[test]
    fn band_rounds_toward_the_reference_and_saturates() {
        let mut book = OrderBook::new(1); // 0.01 %
        book.on_tick(99); // half-width 0.0099 → 0
        assert_eq!(book.band(), Some((99, 99)));
        book.on_tick(-px(100));
        assert_eq!(book.band(), Some((-px(100) - 10_000, -px(100) + 10_000)));
        book.set_band_bps(u32::MAX);
        book.on_tick(Price::MAX);
        assert_eq!(book.band().unwrap().1, Price::MAX);
    }

    #[test]
    fn market_order_stops_at_the_band_edge() {
        let mut book = book_with(
            500,
            &[
                limit("a100", Side::Sell, 100, 2),
                limit("a104", Side::Sell, 104, 2),
                limit("a106", Side::Sell, 106, 2),
                limit("b96", Side::Buy, 96, 2),
                limit("b90", Side::Buy, 90, 2),
            ],
        );
        book.on_tick(px(100)); // band [95, 105]
        // The band is taken at arrival: the trade at 104 (whose band would reach 109.2)
        // does not let the order go on to 106.
        let events = book.submit(NewOrder::market("m", Side::Buy, 10));
        assert_eq!(
            trades(&events),
            [trade("m", "a100", 100, 2), trade("m", "a104", 104, 2)]
        );
        assert!(matches!(
            events.last(),
            Some(Event::Cancelled {
                leaves_qty: 6,
                reason: CancelReason::MarketRemainder,
                ..
            })
        ));
        assert_eq!(book.depth(Side::Sell), [(px(106), 2)]);

        book.on_tick(px(100));
        let events = book.submit(NewOrder::market("s", Side::Sell, 10));
        assert_eq!(trades(&events), [trade("b96", "s", 96, 2)]);
        assert_eq!(book.depth(Side::Buy), [(px(90), 2)]);
    }

    #[test]
    fn market_order_with_nothing_inside_the_band_is_rejected() {
        let mut book = book_with(500, &[limit("a", Side::Sell, 110, 2)]);
        book.on_tick(px(100));
        let events = book.submit(NewOrder::market("m", Side::Buy, 1));
        assert_eq!(rejection(&events), Some(RejectReason::NoLiquidity));
        assert_eq!(book.depth(Side::Sell), [(px(110), 2)]);
    }

    #[test]
    fn limit_order_may_execute_below_the_band_at_a_better_maker_price() {
        // Resting orders are not re-checked when the band moves; a crossing buy gets the
        // better (lower) maker price even if that is below the band.
        let mut book = book_with(500, &[limit("a", Side::Sell, 90, 1)]);
        book.on_tick(px(100));
        let events = book.submit(limit("b", Side::Buy, 100, 1));
        assert_eq!(trades(&events), [trade("b", "a", 90, 1)]);
    }

    #[test]
    fn self_trade_is_allowed() {
        // The book has no owner concept: any buy and sell that cross execute.
        let mut book = book_with(0, &[limit("me-1", Side::Sell, 100, 1)]);
        let events = book.submit(limit("me-2", Side::Buy, 100, 1));
        assert_eq!(trades(&events), [trade("me-2", "me-1", 100, 1)]);
    }

    #[test]
    fn sequence_numbers_count_every_event() {
        let mut book = OrderBook::new(0);
        let mut all = Vec::new();
        all.extend(book.submit(limit("a", Side::Sell, 100, 1)));
        all.extend(book.submit(limit("b", Side::Buy, 100, 0)));
        book.on_tick(px(1));
        all.extend(book.submit(limit("b", Side::Buy, 100, 2)));
        all.extend(book.cancel("b"));
        all.extend(book.cancel("b"));
        let seqs: Vec<u64> = all.iter().map(Event::seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        assert_eq!(book.sequence(), 8);
    }

    #[test]
    fn depth_aggregates_levels_best_first() {
        let book = book_with(
            0,
            &[
                limit("b1", Side::Buy, 98, 1),
                limit("b2", Side::Buy, 99, 2),
                limit("b3", Side::Buy, 98, 3),
                limit("a1", Side::Sell, 102, 4),
                limit("a2", Side::Sell, 101, 5),
                limit("a3", Side::Sell, 101, 6),
            ],
        );
        assert_eq!(book.depth(Side::Buy), [(px(99), 2), (px(98), 4)]);
        assert_eq!(book.depth(Side::Sell), [(px(101), 11), (px(102), 4)]);
        let ids: Vec<&str> = book
            .orders(Side::Sell)
            .map(|o| o.order_id.as_str())
            .collect();
        assert_eq!(ids, ["a2", "a3", "a1"]);
    }

    #[test]
    fn event_json_shape() {
        let events = [
            Event::Accepted {
                seq: 1,
                order_id: "o".into(),
                side: Side::Buy,
                kind: OrderKind::Limit { price: 5 },
                qty: 2,
            },
            Event::Rejected {
                seq: 2,
                order_id: "o".into(),
                reason: RejectReason::OutsidePriceBand {
                    price: 1,
                    low: 2,
                    high: 3,
                },
            },
            Event::Cancelled {
                seq: 3,
                order_id: "o".into(),
                leaves_qty: 1,
                cumulative_qty: 1,
                reason: CancelReason::MarketRemainder,
            },
        ];
        let json = serde_json::to_string(&events).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"[{"type":"accepted","seq":1,"order_id":"o","side":"buy","#,
                r#""kind":{"type":"limit","price":5},"qty":2},"#,
                r#"{"type":"rejected","seq":2,"order_id":"o","#,
                r#""reason":{"code":"outside_price_band","price":1,"low":2,"high":3}},"#,
                r#"{"type":"cancelled","seq":3,"order_id":"o","leaves_qty":1,"cumulative_qty":1,"#,
                r#""reason":"market_remainder"}]"#,
            )
        );
        let back: Vec<Event> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, events);
    }

    #[test]
    fn snapshot_round_trips_and_continues_identically() {
        let mut book = book_with(
            300,
            &[
                limit("b1", Side::Buy, 99, 3),
                limit("b2", Side::Buy, 99, 4),
                limit("b3", Side::Buy, 98, 5),
                limit("a1", Side::Sell, 101, 6),
                limit("a2", Side::Sell, 102, 7),
            ],
        );
        book.submit(limit("x", Side::Sell, 99, 2));
        book.on_tick(px(100));

        let json = serde_json::to_string(&book).unwrap();
        let mut restored: OrderBook = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, book);
        assert_eq!(serde_json::to_string(&restored).unwrap(), json);
        assert_eq!(restored.order("b1"), book.order("b1"));

        let script = [
            NewOrder::market("m", Side::Sell, 9),
            limit("y", Side::Buy, 103, 20),
            limit("z", Side::Buy, 90, 1),
        ];
        for order in script {
            assert_eq!(restored.submit(order.clone()), book.submit(order));
        }
        assert_eq!(restored.cancel("y"), book.cancel("y"));
        assert_eq!(restored, book);
    }

    #[test]
    fn snapshot_format() {
        let mut book = book_with(
            0,
            &[limit("b", Side::Buy, 1, 2), limit("a", Side::Sell, 3, 4)],
        );
        book.on_tick(7);
        assert_eq!(
            serde_json::to_value(&book).unwrap(),
            serde_json::json!({
                "band_bps": 0,
                "last_price": 7,
                "sequence": 2,
                "bids": [{"order_id": "b", "side": "buy", "price": px(1), "qty": 2,
                          "leaves_qty": 2, "accepted_seq": 1}],
                "asks": [{"order_id": "a", "side": "sell", "price": px(3), "qty": 4,
                          "leaves_qty": 4, "accepted_seq": 2}],
            })
        );
    }

    #[test]
    fn invalid_snapshots_are_refused() {
        let order = |id: &str, side: &str, price: i64, leaves: u64| {
            serde_json::json!({"order_id": id, "side": side, "price": price, "qty": 5,
                               "leaves_qty": leaves, "accepted_seq": 1})
        };
        let snapshot = |bids: serde_json::Value, asks: serde_json::Value| {
            serde_json::json!({"band_bps": 0, "last_price": null, "sequence": 9,
                               "bids": bids, "asks": asks})
        };
        let cases = [
            (
                snapshot(
                    serde_json::json!([order("a", "buy", 1, 5), order("a", "buy", 1, 5)]),
                    serde_json::json!([]),
                ),
                "appears twice",
            ),
            (
                snapshot(
                    serde_json::json!([order("a", "buy", 1, 5)]),
                    serde_json::json!([order("b", "sell", 1, 5)]),
                ),
                "crossed",
            ),
            (
                snapshot(
                    serde_json::json!([order("a", "sell", 1, 5)]),
                    serde_json::json!([]),
                ),
                "wrong side",
            ),
            (
                snapshot(
                    serde_json::json!([]),
                    serde_json::json!([order("a", "sell", 2, 5), order("b", "sell", 1, 5)]),
                ),
                "out of price order",
            ),
            (
                snapshot(
                    serde_json::json!([order("a", "buy", 1, 0)]),
                    serde_json::json!([]),
                ),
                "leaves",
            ),
            (
                snapshot(
                    serde_json::json!([order("a", "buy", 1, 6)]),
                    serde_json::json!([]),
                ),
                "leaves",
            ),
        ];
        let mut late = order("a", "buy", 1, 5);
        late["accepted_seq"] = 10.into();
        let cases = cases.into_iter().chain([(
            snapshot(serde_json::json!([late]), serde_json::json!([])),
            "accepted_seq",
        )]);
        for (json, expected) in cases {
            let error = serde_json::from_value::<OrderBook>(json.clone()).unwrap_err();
            assert!(error.to_string().contains(expected), "{json}: {error}");
        }
        // The same shapes, valid, restore.
        let ok = snapshot(
            serde_json::json!([order("a", "buy", 2, 5), order("b", "buy", 1, 5)]),
            serde_json::json!([order("c", "sell", 3, 5), order("d", "sell", 3, 5)]),
        );
        let book: OrderBook = serde_json::from_value(ok).unwrap();
        assert_eq!(book.depth(Side::Sell), [(3, 10)]);
        assert_eq!(book.order("b").unwrap().price, 1);
    }

    #[test]
    fn books_route_by_symbol_with_independent_sequences() {
        let mut books = Books::new(500);
        let submit = |order| Command::Submit { order };
        books.apply("AAA", submit(limit("a", Side::Sell, 100, 5)));
        let events = books.apply("BBB", submit(limit("b", Side::Buy, 100, 5)));
        assert_eq!(events[0].seq(), 1, "each book has its own sequence");
        assert!(
            books
                .apply("BBB", Command::Tick { price: px(50) })
                .is_empty()
        );
        let events = books.apply("BBB", submit(limit("c", Side::Sell, 100, 1)));
        assert!(matches!(
            rejection(&events),
            Some(RejectReason::OutsidePriceBand { .. })
        ));
        let events = books.apply(
            "AAA",
            Command::Cancel {
                client_order_id: "b".into(),
            },
        );
        assert_eq!(rejection(&events), Some(RejectReason::UnknownOrder));
        assert_eq!(books.symbols().collect::<Vec<_>>(), ["AAA", "BBB"]);
        assert_eq!(books.get("AAA").unwrap().best_ask(), Some(px(100)));
        assert_eq!(books.get("BBB").unwrap().band_bps(), 500);
        assert!(books.get("CCC").is_none());

        let json = serde_json::to_string(&books).unwrap();
        let mut restored: Books = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, books);
        let command = submit(NewOrder::market("m", Side::Buy, 3));
        assert_eq!(
            restored.apply("AAA", command.clone()),
            books.apply("AAA", command)
        );
        assert_eq!(restored, books);
    }

    #[test]
    fn command_json_shape() {
        let command = Command::Submit {
            order: NewOrder::market("m", Side::Sell, 3),
        };
        let json = serde_json::to_string(&command).unwrap();
        assert_eq!(
            json,
            r#"{"type":"submit","order":{"client_order_id":"m","side":"sell","kind":{"type":"market"},"qty":3}}"#
        );
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), command);
    }
}
