//! Property tests of the order book over random sequences of submits, cancels and ticks.
//!
//! Prices come from a small grid and ids from a small pool, so orders cross, ids collide,
//! cancels hit live, filled and unknown orders, and the band rejects some prices. A
//! `Checker` follows the event stream with an independent model of every order and checks
//! each event and the book after each operation.

use std::collections::{BTreeMap, HashMap};

use engine::{
    Books, CancelReason, Command, Event, NewOrder, OrderBook, OrderKind, PRICE_SCALE, Price, Qty,
    RejectReason, Side,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

#[derive(Debug, Clone)]
enum Op {
    Submit(NewOrder),
    Cancel(String),
    Tick(Price),
}

impl Op {
    fn command(&self) -> Command {
        match self {
            Op::Submit(order) => Command::Submit {
                order: order.clone(),
            },
            Op::Cancel(id) => Command::Cancel {
                client_order_id: id.clone(),
            },
            Op::Tick(price) => Command::Tick { price: *price },
        }
    }
}

/// 95.0 to 105.0 in steps of 0.5.
fn price() -> impl Strategy<Value = Price> {
    (190i64..=210).prop_map(|half_units| half_units * PRICE_SCALE / 2)
}

fn id() -> impl Strategy<Value = String> {
    (0u8..16).prop_map(|i| format!("o{i}"))
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Buy), Just(Side::Sell)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (id(), side(), price(), 0u64..=10)
            .prop_map(|(id, side, price, qty)| Op::Submit(NewOrder::limit(id, side, price, qty))),
        1 => (id(), side(), 0u64..=10)
            .prop_map(|(id, side, qty)| Op::Submit(NewOrder::market(id, side, qty))),
        2 => id().prop_map(Op::Cancel),
        1 => price().prop_map(Op::Tick),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..=200)
}

fn band_bps() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(200), Just(500)]
}

fn symbol_ops() -> impl Strategy<Value = Vec<(&'static str, Op)>> {
    prop::collection::vec((prop_oneof![Just("AAA"), Just("BBB")], op()), 0..=200)
}

fn apply(book: &mut OrderBook, op: &Op) -> Vec<Event> {
    match op {
        Op::Submit(order) => book.submit(order.clone()),
        Op::Cancel(id) => book.cancel(id),
        Op::Tick(price) => {
            book.on_tick(*price);
            Vec::new()
        }
    }
}

/// A live order as the model sees it.
#[derive(Debug)]
struct Live {
    side: Side,
    kind: OrderKind,
    qty: Qty,
    filled: Qty,
    /// For a market order: the band edge it may not execute beyond.
    bound: Option<Price>,
}

impl Live {
    fn remaining(&self) -> Qty {
        self.qty - self.filled
    }
}

/// What the checker saw, to make sure the generators reach every path.
#[derive(Debug, Default)]
struct Coverage {
    trades: usize,
    partial_fills: usize,
    rests_after_trading: usize,
    market_remainders: usize,
    requested_cancels: usize,
    rejects: BTreeMap<&'static str, usize>,
}

/// Follows a book's events with an independent model and checks them.
#[derive(Debug, Default)]
struct Checker {
    band_bps: u32,
    last_price: Option<Price>,
    open: HashMap<String, Live>,
    next_seq: u64,
    accepted_qty: u128,
    filled_qty: u128,
    cancelled_qty: u128,
    coverage: Coverage,
}

impl Checker {
    fn new(band_bps: u32) -> Self {
        Checker {
            band_bps,
            next_seq: 1,
            ..Checker::default()
        }
    }

    fn band(&self) -> Option<(Price, Price)> {
        if self.band_bps == 0 {
            return None;
        }
        let reference = self.last_price?;
        let half = reference.abs() as i128 * self.band_bps as i128 / 10_000;
        let half = half as i64;
        Some((reference - half, reference + half))
    }

    /// Applies `op` to `book` and checks the events and the book afterwards.
    fn step(&mut self, book: &mut OrderBook, op: &Op) -> Vec<Event> {
        let (best_bid, best_ask) = (book.best_bid(), book.best_ask());
        let band = self.band();
        assert_eq!(book.band(), band);
        let events = apply(book, op);
        for event in &events {
            assert_eq!(event.seq(), self.next_seq, "sequence gap at {event:?}");
            self.next_seq += 1;
        }
        match op {
            Op::Submit(order) => self.check_submit(order, band, best_bid, best_ask, &events),
            Op::Cancel(id) => self.check_cancel(id, &events),
            Op::Tick(price) => {
                assert!(events.is_empty());
                self.last_price = Some(*price);
            }
        }
        self.check_book(book);
        events
    }

    fn check_submit(
        &mut self,
        order: &NewOrder,
        band: Option<(Price, Price)>,
        best_bid: Option<Price>,
        best_ask: Option<Price>,
        events: &[Event],
    ) {
        let id = &order.client_order_id;
        let bound = band.map(|(low, high)| match order.side {
            Side::Buy => high,
            Side::Sell => low,
        });
        let expected_reject = if order.qty == 0 {
            Some(RejectReason::ZeroQuantity)
        } else if self.open.contains_key(id) {
            Some(RejectReason::DuplicateOrderId)
        } else {
            match order.kind {
                OrderKind::Limit { price } => match band {
                    Some((low, high)) if price < low || price > high => {
                        Some(RejectReason::OutsidePriceBand { price, low, high })
                    }
                    _ => None,
                },
                OrderKind::Market => {
                    let best = match order.side {
                        Side::Buy => best_ask,
                        Side::Sell => best_bid,
                    };
                    let executable = match (best, bound) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(best), Some(bound)) => crosses(order.side, bound, best),
                    };
                    (!executable).then_some(RejectReason::NoLiquidity)
                }
            }
        };
        if let Some(reason) = expected_reject {
            let name = match reason {
                RejectReason::ZeroQuantity => "zero_quantity",
                RejectReason::DuplicateOrderId => "duplicate",
                RejectReason::OutsidePriceBand { .. } => "band",
                RejectReason::NoLiquidity => "no_liquidity",
                RejectReason::UnknownOrder => "unknown",
            };
            *self.coverage.rejects.entry(name).or_default() += 1;
            assert_eq!(
                events,
                [Event::Rejected {
                    seq: events[0].seq(),
                    order_id: id.clone(),
                    reason,
                }]
            );
            return;
        }

        let Some((
            Event::Accepted {
                order_id,
                side,
                kind,
                qty,
                ..
            },
            rest,
        )) = events.split_first()
        else {
            panic!("expected Accepted first: {events:?}");
        };
        assert_eq!(
            (order_id, *side, *kind, *qty),
            (id, order.side, order.kind, order.qty)
        );
        self.accepted_qty += u128::from(order.qty);
        self.open.insert(
            id.clone(),
            Live {
                side: order.side,
                kind: order.kind,
                qty: order.qty,
                filled: 0,
                bound: matches!(order.kind, OrderKind::Market)
                    .then_some(bound)
                    .flatten(),
            },
        );

        let mut rest = rest;
        let mut traded = false;
        while let [Event::Trade { .. }, _, _, tail @ ..] = rest {
            self.check_execution(id, &rest[..3]);
            traded = true;
            rest = tail;
        }
        match (order.kind, rest) {
            (
                OrderKind::Market,
                [
                    Event::Cancelled {
                        order_id,
                        leaves_qty,
                        reason: CancelReason::MarketRemainder,
                        ..
                    },
                ],
            ) => {
                assert_eq!(order_id, id);
                assert!(traded, "a market order that cannot trade is rejected");
                self.coverage.market_remainders += 1;
                self.close_cancelled(id, *leaves_qty);
            }
            (_, []) => {
                if let OrderKind::Market = order.kind {
                    assert!(!self.open.contains_key(id), "a market order never rests");
                } else if traded && self.open.contains_key(id) {
                    self.coverage.rests_after_trading += 1;
                }
            }
            _ => panic!("unexpected events after executions: {rest:?}"),
        }
    }

    /// Checks one execution (`Trade`, taker `Fill`, maker `Fill`) of taker `taker_id`.
    fn check_execution(&mut self, taker_id: &str, events: &[Event]) {
        let [
            Event::Trade {
                buy_order_id,
                sell_order_id,
                price,
                qty,
                aggressor,
                ..
            },
            taker_fill,
            maker_fill,
        ] = events
        else {
            panic!("not an execution: {events:?}");
        };
        let taker = &self.open[taker_id];
        assert_eq!(*aggressor, taker.side);
        let (taker_ref, maker_id) = match taker.side {
            Side::Buy => (buy_order_id, sell_order_id),
            Side::Sell => (sell_order_id, buy_order_id),
        };
        assert_eq!(taker_ref, taker_id);
        let maker = self
            .open
            .get(maker_id.as_str())
            .unwrap_or_else(|| panic!("maker {maker_id} is not live"));
        assert_eq!(maker.side, taker.side.opposite());
        // Quantity: positive and within what both sides had left before the trade.
        assert!(*qty > 0);
        assert!(
            *qty <= taker.remaining(),
            "trade beyond the taker's remaining"
        );
        assert!(
            *qty <= maker.remaining(),
            "trade beyond the maker's remaining"
        );
        // Price: the maker's, acceptable to the taker, and within a market taker's band.
        let OrderKind::Limit { price: maker_price } = maker.kind else {
            panic!("a market order rested");
        };
        assert_eq!(*price, maker_price, "trades execute at the maker's price");
        match taker.kind {
            OrderKind::Limit { price: limit } => assert!(crosses(taker.side, limit, *price)),
            OrderKind::Market => {
                if let Some(bound) = taker.bound {
                    assert!(crosses(taker.side, bound, *price), "beyond the band edge");
                }
            }
        }
        self.coverage.trades += 1;
        self.last_price = Some(*price);
        let maker_id = maker_id.clone();
        self.check_fill(taker_fill, taker_id, *qty, *price, true);
        self.check_fill(maker_fill, &maker_id, *qty, *price, false);
    }

    fn check_fill(&mut self, event: &Event, id: &str, qty: Qty, price: Price, taker: bool) {
        let Event::Fill {
            order_id,
            side,
            qty: fill_qty,
            price: fill_price,
            leaves_qty,
            cumulative_qty,
            is_taker,
            ..
        } = event
        else {
            panic!("expected a fill: {event:?}");
        };
        assert_eq!(
            (order_id.as_str(), *fill_qty, *fill_price, *is_taker),
            (id, qty, price, taker)
        );
        let live = self.open.get_mut(id).unwrap();
        assert_eq!(*side, live.side);
        live.filled += qty;
        assert_eq!(*cumulative_qty, live.filled);
        assert_eq!(*leaves_qty, live.remaining());
        self.filled_qty += u128::from(qty);
        if *leaves_qty == 0 {
            let live = self.open.remove(id).unwrap();
            assert_eq!(live.filled, live.qty);
        } else {
            self.coverage.partial_fills += 1;
        }
    }

    fn check_cancel(&mut self, id: &str, events: &[Event]) {
        match self.open.get(id) {
            Some(live) => {
                assert_eq!(
                    events,
                    [Event::Cancelled {
                        seq: events[0].seq(),
                        order_id: id.to_owned(),
                        leaves_qty: live.remaining(),
                        cumulative_qty: live.filled,
                        reason: CancelReason::Requested,
                    }]
                );
                self.coverage.requested_cancels += 1;
                self.close_cancelled(id, live.remaining());
            }
            None => {
                *self.coverage.rejects.entry("unknown").or_default() += 1;
                assert_eq!(
                    events,
                    [Event::Rejected {
                        seq: events[0].seq(),
                        order_id: id.to_owned(),
                        reason: RejectReason::UnknownOrder,
                    }]
                );
            }
        }
    }

    fn close_cancelled(&mut self, id: &str, leaves: Qty) {
        let live = self.open.remove(id).unwrap();
        // filled + cancelled == submitted
        assert!(leaves > 0);
        assert_eq!(live.filled + leaves, live.qty);
        self.cancelled_qty += u128::from(leaves);
    }

    /// The book agrees with the model and is consistent.
    fn check_book(&self, book: &OrderBook) {
        assert_eq!(book.sequence(), self.next_seq - 1);
        assert_eq!(book.last_price(), self.last_price);
        if let (Some(bid), Some(ask)) = (book.best_bid(), book.best_ask()) {
            assert!(bid < ask, "crossed book: {bid} >= {ask}");
        }
        // Every live order rests, with filled + resting == submitted.
        assert_eq!(book.len(), self.open.len());
        let mut resting = [0u128; 2];
        for (id, live) in &self.open {
            let order = book.order(id).unwrap_or_else(|| panic!("{id} not in book"));
            let OrderKind::Limit { price } = live.kind else {
                panic!("market order {id} rests");
            };
            assert_eq!(
                (order.side, order.price, order.qty),
                (live.side, price, live.qty)
            );
            assert_eq!(live.filled + order.leaves_qty, live.qty);
            resting[live.side as usize] += u128::from(order.leaves_qty);
        }
        // Over all orders: submitted == filled + resting + cancelled. (Each fill counts
        // once for each of its two orders.)
        assert_eq!(
            self.accepted_qty,
            self.filled_qty + resting[0] + resting[1] + self.cancelled_qty
        );
        // Depth: best first, non-empty levels, totals matching the live orders.
        for side in [Side::Buy, Side::Sell] {
            let depth = book.depth(side);
            assert!(depth.iter().all(|(_, qty)| *qty > 0));
            assert!(depth.windows(2).all(|w| match side {
                Side::Buy => w[0].0 > w[1].0,
                Side::Sell => w[0].0 < w[1].0,
            }));
            let total: u128 = depth.iter().map(|(_, qty)| u128::from(*qty)).sum();
            assert_eq!(total, resting[side as usize]);
        }
        assert_eq!(book.best_bid(), book.depth(Side::Buy).first().map(|l| l.0));
        assert_eq!(book.best_ask(), book.depth(Side::Sell).first().map(|l| l.0));
    }
}

fn crosses(side: Side, limit: Price, price: Price) -> bool {
    match side {
        Side::Buy => price <= limit,
        Side::Sell => price >= limit,
    }
}

fn run(band_bps: u32, ops: &[Op]) -> (Vec<Vec<Event>>, OrderBook) {
    let mut book = OrderBook::new(band_bps);
    let events = ops.iter().map(|op| apply(&mut book, op)).collect();
    (events, book)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Failing seeds go to tests/book_props.proptest-regressions (the default looks for
        // a lib.rs next to the test, which an integration test does not have).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    /// Every event and the book after every operation agree with the model: never crossed,
    /// trades within both sides' remaining and at the maker's price, contiguous sequence
    /// numbers, and filled + resting + cancelled == submitted for every order.
    #[test]
    fn invariants_hold(band_bps in band_bps(), ops in ops()) {
        let mut book = OrderBook::new(band_bps);
        let mut checker = Checker::new(band_bps);
        for op in &ops {
            checker.step(&mut book, op);
        }
    }

    /// The same operations give the same events and the same state.
    #[test]
    fn deterministic(band_bps in band_bps(), ops in ops()) {
        let (events_a, book_a) = run(band_bps, &ops);
        let (events_b, book_b) = run(band_bps, &ops);
        prop_assert_eq!(events_a, events_b);
        prop_assert_eq!(
            serde_json::to_string(&book_a).unwrap(),
            serde_json::to_string(&book_b).unwrap()
        );
        prop_assert_eq!(book_a, book_b);
    }

    /// Snapshot at any point, restore, continue: the same events and state as a run that
    /// never stopped.
    #[test]
    fn snapshot_restore_continues_identically(
        band_bps in band_bps(),
        ops in ops(),
        split in any::<Index>(),
    ) {
        let split = split.index(ops.len() + 1);
        let (events, book) = run(band_bps, &ops);

        let (_, before) = run(band_bps, &ops[..split]);
        let json = serde_json::to_string(&before).unwrap();
        let mut restored: OrderBook = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&restored, &before);
        prop_assert_eq!(serde_json::to_string(&restored).unwrap(), json);

        let continued: Vec<Vec<Event>> =
            ops[split..].iter().map(|op| apply(&mut restored, op)).collect();
        prop_assert_eq!(&continued[..], &events[split..]);
        prop_assert_eq!(
            serde_json::to_string(&restored).unwrap(),
            serde_json::to_string(&book).unwrap()
        );
        prop_assert_eq!(restored, book);
    }

    /// The same for a partition's `Books`, with two symbols interleaved.
    #[test]
    fn books_snapshot_restore_continues_identically(
        band_bps in band_bps(),
        ops in symbol_ops(),
        split in any::<Index>(),
    ) {
        let split = split.index(ops.len() + 1);
        let mut books = Books::new(band_bps);
        let mut events = Vec::new();
        let mut restored = None;
        for (i, (symbol, op)) in ops.iter().enumerate() {
            if i == split {
                restored = Some(books.clone());
            }
            events.push(books.apply(symbol, op.command()));
        }
        let before = restored.unwrap_or_else(|| books.clone());
        let json = serde_json::to_string(&before).unwrap();
        let mut restored: Books = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&restored, &before);

        for (i, (symbol, op)) in ops.iter().enumerate().skip(split) {
            prop_assert_eq!(&restored.apply(symbol, op.command()), &events[i]);
        }
        prop_assert_eq!(&restored, &books);
        prop_assert_eq!(
            serde_json::to_string(&restored).unwrap(),
            serde_json::to_string(&books).unwrap()
        );
        // Each symbol's book is the book those commands alone would build.
        for symbol in books.symbols() {
            let own: Vec<Op> = ops.iter().filter(|(s, _)| *s == symbol).map(|(_, op)| op.clone()).collect();
            let (_, alone) = run(band_bps, &own);
            prop_assert_eq!(books.get(symbol).unwrap(), &alone);
        }
    }
}

/// The generators reach every path the invariants are about; otherwise the properties
/// above could pass vacuously.
#[test]
fn generators_cover_every_path() {
    let mut runner = TestRunner::deterministic();
    let mut coverage = Coverage::default();
    for _ in 0..100 {
        let band_bps = band_bps().new_tree(&mut runner).unwrap().current();
        let ops = ops().new_tree(&mut runner).unwrap().current();
        let mut book = OrderBook::new(band_bps);
        let mut checker = Checker::new(band_bps);
        for op in &ops {
            checker.step(&mut book, op);
        }
        let c = checker.coverage;
        coverage.trades += c.trades;
        coverage.partial_fills += c.partial_fills;
        coverage.rests_after_trading += c.rests_after_trading;
        coverage.market_remainders += c.market_remainders;
        coverage.requested_cancels += c.requested_cancels;
        for (name, n) in c.rejects {
            *coverage.rejects.entry(name).or_default() += n;
        }
    }
    assert!(coverage.trades > 100, "{coverage:?}");
    assert!(coverage.partial_fills > 10, "{coverage:?}");
    assert!(coverage.rests_after_trading > 10, "{coverage:?}");
    assert!(coverage.market_remainders > 10, "{coverage:?}");
    assert!(coverage.requested_cancels > 10, "{coverage:?}");
    for name in [
        "zero_quantity",
        "duplicate",
        "band",
        "no_liquidity",
        "unknown",
    ] {
        assert!(
            coverage.rejects.get(name).copied().unwrap_or(0) > 10,
            "{coverage:?}"
        );
    }
    println!("{coverage:?}");
}
