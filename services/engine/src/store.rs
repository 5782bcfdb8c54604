//! Where the engine keeps each partition's books in Redis, and how a replica reads them
//! back: the layout, its encoding, loading in pages, and the move of books stored in the
//! earlier per-symbol layout.
//!
//! # Layout
//!
//! Per partition, under its hash tag ([`KeySpace::partition_state`]):
//! - `…:state:engine:resting` hash: `"{symbol} {order id}"` → `"{b|s} {price} {qty}
//!   {leaves} {accepted_seq}"`, one field per resting order of every book of the partition
//!   (a symbol holds no space, so the first space splits the field);
//! - `…:state:engine:meta` hash: symbol → `"2 {band_bps} {last_price or -} {sequence}"`;
//! - `…:state:engine:symbols` set: the symbols with a book.
//!
//! Each hash also holds a field [`HEADER`] that describes the layout and keeps Redis from
//! storing the hash in its compact encoding (see there why).
//!
//! So a batch writes one HSET and one HDEL of `resting` and one HSET of `meta` (and an
//! SADD when a book opens), however many books it touched ([`Changes`]), and a replica
//! taking the partition over reads `meta` and then `resting` in pages of [`PAGE`] fields
//! ([`load`]): no request is proportional to the books' size.
//!
//! # The layout before (layout 1)
//!
//! Until December 2026 each book's orders had a hash of their own,
//! `…:state:engine:orders:{symbol}` (order id → the order as JSON), and `meta` held JSON.
//! [`load`] reads both: a symbol whose meta is JSON (or that `symbols` names without a
//! meta) still has its orders in layout 1, and [`Changes::move_legacy`] writes such books
//! in layout 2 and deletes their old hashes in the partition's next commit, atomically with
//! it. An engine of the earlier version that takes over a partition already moved cannot
//! parse a layout-2 meta: its `load_books` fails and it leaves the partition to a newer
//! replica, rather than trading on books it cannot see.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis::Value;
use streams_core::{KeySpace, Outputs, Partition, Redis};
use tickflow_proto::topology;

use crate::book::{Books, OrderBook, Price, Resting, Side};

/// Fields asked for per HSCAN call while loading (Redis may return somewhat more or
/// fewer).
pub const PAGE: usize = 2_000;

/// The field every HSET of `resting` and `meta` also writes, with the layout described in
/// its value. The value is longer than Redis's `hash-max-listpack-value` (64 bytes), which
/// makes Redis keep the hash as a hash table from its first write on (and the field keeps it
/// from ever being empty, which would delete it): in its compact listpack encoding, used
/// for hashes of up to `hash-max-listpack-entries` (512) short fields, every field an HSET
/// or HDEL names is a scan of the whole hash, and a batch's HDEL of ~100 orders from a
/// 400-order book took ~300 µs instead of ~8 µs (measured with `tickflow bench`).
pub const HEADER: &str = "~layout";

const RESTING_LAYOUT: &[u8] =
    b"tickflow engine layout 2: \"{symbol} {order id}\" -> \"{b|s} {price} {qty} {leaves} {accepted_seq}\"";
const META_LAYOUT: &[u8] =
    b"tickflow engine layout 2: {symbol} -> \"2 {band_bps} {last_price or -} {sequence}\" (prices in millionths)";

/// The keys of one partition's books.
#[derive(Debug, Clone)]
pub struct BookKeys {
    keys: KeySpace,
    partition: Partition,
}

impl BookKeys {
    /// The keys of `partition` in `keys`' namespace.
    pub fn new(keys: &KeySpace, partition: Partition) -> Self {
        Self {
            keys: keys.clone(),
            partition,
        }
    }

    fn state(&self, name: &str) -> String {
        self.keys
            .partition_state(topology::ENGINE_GROUP, name, self.partition)
    }

    /// Every resting order of the partition (hash: `"{symbol} {order id}"` → order).
    pub fn resting(&self) -> String {
        self.state("resting")
    }

    /// Each book's band, last price and sequence (hash: symbol → meta).
    pub fn meta(&self) -> String {
        self.state("meta")
    }

    /// The symbols with a book (set).
    pub fn symbols(&self) -> String {
        self.state("symbols")
    }

    /// Layout 1: the resting orders of `symbol` (hash: order id → JSON).
    pub fn legacy_orders(&self, symbol: &str) -> String {
        self.state(&format!("orders:{symbol}"))
    }
}

/// A partition's books as stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// The books.
    pub books: Books,
    /// The symbols whose books are still stored in layout 1.
    pub legacy: BTreeSet<String>,
}

/// The books of `partition` as of its last acknowledged batch, from either layout, each
/// checked (sorted, not crossed, unique ids); empty if it never had any.
pub async fn load(redis: &Redis, keys: &KeySpace, partition: Partition) -> Result<Stored, String> {
    let keys = BookKeys::new(keys, partition);
    let mut conn = redis.pooled().await.map_err(|e| e.to_string())?;
    let conn = &mut *conn;
    let mut metas: BTreeMap<String, Meta> = BTreeMap::new();
    let mut legacy = BTreeSet::new();
    for (symbol, text) in hscan(conn, &keys.meta()).await? {
        if symbol == HEADER {
            continue;
        }
        let meta = Meta::parse(&text)
            .map_err(|e| format!("the stored meta of {symbol} is invalid: {e}"))?;
        if meta.legacy {
            legacy.insert(symbol.clone());
        }
        metas.insert(symbol, meta);
    }
    let symbols: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.symbols())
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    for symbol in symbols {
        if !metas.contains_key(&symbol) {
            metas.insert(symbol.clone(), Meta::legacy_default());
            legacy.insert(symbol);
        }
    }
    let mut orders: HashMap<String, Vec<Resting>> = HashMap::new();
    for (field, value) in hscan(conn, &keys.resting()).await? {
        if field == HEADER {
            continue;
        }
        let (symbol, id) = field
            .split_once(' ')
            .ok_or_else(|| format!("a stored order named {field:?} has no symbol"))?;
        let order = decode_order(id, &value)
            .map_err(|e| format!("the stored order {id:?} of {symbol} is invalid: {e}"))?;
        match orders.get_mut(symbol) {
            Some(book) => book.push(order),
            None => {
                orders.insert(symbol.to_owned(), vec![order]);
            }
        }
    }
    for symbol in &legacy {
        let book = orders.entry(symbol.clone()).or_default();
        for (id, json) in hscan(conn, &keys.legacy_orders(symbol)).await? {
            let order: Resting = serde_json::from_str(&json)
                .map_err(|e| format!("the stored order {id:?} of {symbol} is invalid: {e}"))?;
            book.push(order);
        }
    }
    let mut books = Books::default();
    for (symbol, meta) in metas {
        let resting = orders.remove(&symbol).unwrap_or_default();
        let book = restore(&meta, resting)
            .map_err(|e| format!("the stored book of {symbol} is invalid: {e}"))?;
        books.insert(&symbol, book);
    }
    if let Some(symbol) = orders.keys().next() {
        return Err(format!(
            "{} stored orders of {symbol} belong to no book (no meta)",
            orders[symbol].len()
        ));
    }
    Ok(Stored { books, legacy })
}

/// Every field and value of the hash `key`, read by HSCAN in pages of about [`PAGE`]
/// fields. A field may come twice (HSCAN returns a field again if the hash was rehashed
/// between two pages): the callers keep one.
async fn hscan(
    conn: &mut streams_core::connection::Connection,
    key: &str,
) -> Result<Vec<(String, String)>, String> {
    let bad = |what: &str| format!("HSCAN {key}: {what}");
    let text = |value: Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| bad("not UTF-8")),
        other => Err(bad(&format!("{other:?} is not a string"))),
    };
    let mut all = Vec::new();
    let mut cursor = String::from("0");
    loop {
        let reply: Value = redis::cmd("HSCAN")
            .arg(key)
            .arg(&cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        let Value::Array(mut reply) = reply else {
            return Err(bad("the reply is not an array"));
        };
        let (Some(Value::Array(page)), Some(next), None) = (reply.pop(), reply.pop(), reply.pop())
        else {
            return Err(bad("the reply is not [cursor, page]"));
        };
        all.reserve(page.len() / 2);
        let mut page = page.into_iter();
        while let (Some(field), Some(value)) = (page.next(), page.next()) {
            all.push((text(field)?, text(value)?));
        }
        cursor = text(next)?;
        if cursor == "0" {
            break;
        }
    }
    Ok(all)
}

/// A book's band, last price and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    band_bps: u32,
    last_price: Option<Price>,
    sequence: u64,
    /// Read from layout 1 (JSON).
    legacy: bool,
}

impl Meta {
    /// What layout 1 assumed of a book without a stored meta.
    fn legacy_default() -> Self {
        Meta {
            band_bps: 0,
            last_price: None,
            sequence: 0,
            legacy: true,
        }
    }

    fn of(book: &OrderBook) -> Self {
        Meta {
            band_bps: book.band_bps(),
            last_price: book.last_price(),
            sequence: book.sequence(),
            legacy: false,
        }
    }

    /// `2 {band_bps} {last_price or -} {sequence}`.
    fn encode(&self) -> Vec<u8> {
        let last = self
            .last_price
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        format!("2 {} {last} {}", self.band_bps, self.sequence).into_bytes()
    }

    /// Layout 2's text, or layout 1's JSON.
    fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('{') {
            #[derive(serde::Deserialize)]
            struct Json {
                band_bps: u32,
                last_price: Option<Price>,
                sequence: u64,
            }
            let json: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
            return Ok(Meta {
                band_bps: json.band_bps,
                last_price: json.last_price,
                sequence: json.sequence,
                legacy: true,
            });
        }
        let mut parts = text.split(' ');
        let (Some("2"), Some(band), Some(last), Some(sequence), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format!("{text:?} is not `2 band last sequence`"));
        };
        let number = |what: &str, text: &str| format!("{what} {text:?} is not a number");
        Ok(Meta {
            band_bps: band.parse().map_err(|_| number("band", band))?,
            last_price: match last {
                "-" => None,
                price => Some(price.parse().map_err(|_| number("last price", price))?),
            },
            sequence: sequence.parse().map_err(|_| number("sequence", sequence))?,
            legacy: false,
        })
    }
}

/// A stored order's value: `{b|s} {price} {qty} {leaves} {accepted_seq}`.
fn encode_order(order: &Resting) -> Vec<u8> {
    let side = match order.side {
        Side::Buy => 'b',
        Side::Sell => 's',
    };
    format!(
        "{side} {} {} {} {}",
        order.price, order.qty, order.leaves_qty, order.accepted_seq
    )
    .into_bytes()
}

fn decode_order(id: &str, value: &str) -> Result<Resting, String> {
    let mut parts = value.split(' ');
    let (Some(side), Some(price), Some(qty), Some(leaves), Some(seq), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!("{value:?} is not `side price qty leaves seq`"));
    };
    let number = |text: &str| format!("{text:?} in {value:?} is not a number");
    Ok(Resting {
        order_id: id.to_owned(),
        side: match side {
            "b" => Side::Buy,
            "s" => Side::Sell,
            other => return Err(format!("side {other:?} is neither b nor s")),
        },
        price: price.parse().map_err(|_| number(price))?,
        qty: qty.parse().map_err(|_| number(qty))?,
        leaves_qty: leaves.parse().map_err(|_| number(leaves))?,
        accepted_seq: seq.parse().map_err(|_| number(seq))?,
    })
}

/// The field of an order in `resting`.
fn order_field(symbol: &str, order_id: &str) -> Vec<u8> {
    let mut field = Vec::with_capacity(symbol.len() + 1 + order_id.len());
    field.extend_from_slice(symbol.as_bytes());
    field.push(b' ');
    field.extend_from_slice(order_id.as_bytes());
    field
}

/// Rebuilds a book from its meta and its resting orders in any order (priority: price,
/// then `accepted_seq`), through the book's own snapshot checks.
fn restore(meta: &Meta, resting: Vec<Resting>) -> Result<OrderBook, String> {
    let (mut bids, mut asks): (Vec<Resting>, Vec<Resting>) =
        resting.into_iter().partition(|o| o.side == Side::Buy);
    bids.sort_unstable_by(|a, b| {
        b.price
            .cmp(&a.price)
            .then(a.accepted_seq.cmp(&b.accepted_seq))
    });
    asks.sort_unstable_by(|a, b| {
        a.price
            .cmp(&b.price)
            .then(a.accepted_seq.cmp(&b.accepted_seq))
    });
    // An order HSCAN returned twice is the same order twice, next to itself once sorted.
    bids.dedup();
    asks.dedup();
    OrderBook::from_parts(meta.band_bps, meta.last_price, meta.sequence, bids, asks)
        .map_err(|e| e.to_string())
}

/// What one batch changed in a partition's books, as the effects that store it: one HSET
/// and one HDEL of `resting`, one HSET of `meta`, one SADD of new symbols, and, for books
/// still in layout 1, their move.
#[derive(Debug)]
pub struct Changes<'a> {
    keys: BookKeys,
    books: &'a Books,
    resting: Vec<Vec<u8>>,
    gone: Vec<Vec<u8>>,
    meta: Vec<Vec<u8>>,
    new_symbols: Vec<Vec<u8>>,
    deleted: Vec<String>,
}

impl<'a> Changes<'a> {
    /// No changes yet to `books`, stored under `keys`.
    pub fn new(keys: BookKeys, books: &'a Books) -> Self {
        Self {
            keys,
            books,
            resting: Vec::new(),
            gone: Vec::new(),
            meta: Vec::new(),
            new_symbols: Vec::new(),
            deleted: Vec::new(),
        }
    }

    /// The book of `symbol` changed: its meta, and each of `orders` (written while it
    /// rests, deleted once filled or cancelled). `new`: the symbol is not in `symbols` yet.
    pub fn book(&mut self, symbol: &str, orders: impl IntoIterator<Item = String>, new: bool) {
        let Some(book) = self.books.get(symbol) else {
            return;
        };
        if new {
            self.new_symbols.push(symbol.as_bytes().to_vec());
        }
        self.meta.push(symbol.as_bytes().to_vec());
        self.meta.push(Meta::of(book).encode());
        for id in orders {
            match book.order(&id) {
                Some(order) => {
                    self.resting.push(order_field(symbol, &id));
                    self.resting.push(encode_order(order));
                }
                None => self.gone.push(order_field(symbol, &id)),
            }
        }
    }

    /// The book of `symbol`, stored in layout 1, is written whole in layout 2 and its old
    /// hash deleted.
    pub fn move_legacy(&mut self, symbol: &str) {
        let Some(book) = self.books.get(symbol) else {
            return;
        };
        self.meta.push(symbol.as_bytes().to_vec());
        self.meta.push(Meta::of(book).encode());
        for order in book.orders(Side::Buy).chain(book.orders(Side::Sell)) {
            self.resting.push(order_field(symbol, &order.order_id));
            self.resting.push(encode_order(order));
        }
        self.deleted.push(self.keys.legacy_orders(symbol));
    }

    /// The effects, into `out`.
    pub fn write(mut self, out: &mut Outputs) {
        if !self.resting.is_empty() {
            self.resting.push(HEADER.as_bytes().to_vec());
            self.resting.push(RESTING_LAYOUT.to_vec());
            out.command("HSET", self.keys.resting(), self.resting);
        }
        if !self.gone.is_empty() {
            out.command("HDEL", self.keys.resting(), self.gone);
        }
        if !self.meta.is_empty() {
            self.meta.push(HEADER.as_bytes().to_vec());
            self.meta.push(META_LAYOUT.to_vec());
            out.command("HSET", self.keys.meta(), self.meta);
        }
        if !self.new_symbols.is_empty() {
            out.command("SADD", self.keys.symbols(), self.new_symbols);
        }
        for key in self.deleted {
            out.command("DEL", key, Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::NewOrder;

    fn book() -> OrderBook {
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
            book.submit(NewOrder::limit(format!("o {i}"), side, price, qty));
        }
        book
    }

    #[test]
    fn a_book_restores_from_its_meta_and_resting_orders_in_any_order() {
        let book = book();
        let meta = Meta::parse(std::str::from_utf8(&Meta::of(&book).encode()).unwrap()).unwrap();
        assert!(!meta.legacy);
        // Stored and read back in an order unrelated to priority.
        let mut orders: Vec<Resting> = book
            .orders(Side::Sell)
            .chain(book.orders(Side::Buy))
            .map(|o| {
                let value = String::from_utf8(encode_order(o)).unwrap();
                decode_order(&o.order_id, &value).unwrap()
            })
            .collect();
        orders.reverse();
        // HSCAN may return an order twice: kept once. Two orders of one id are refused.
        let mut twice = orders.clone();
        twice.push(orders[2].clone());
        assert_eq!(restore(&meta, twice).unwrap(), book);
        let mut clash = orders.clone();
        clash.push(Resting {
            qty: orders[2].qty + 1,
            ..orders[2].clone()
        });
        assert!(restore(&meta, clash).unwrap_err().contains("twice"));
        let restored = restore(&meta, orders).unwrap();
        assert_eq!(restored, book);
        // And it continues identically.
        let (mut a, mut b) = (book.clone(), restored);
        let next = NewOrder::limit("x", Side::Sell, 99_000_000, 9);
        assert_eq!(a.submit(next.clone()), b.submit(next));
        assert_eq!(a, b);
    }

    #[test]
    fn the_header_makes_redis_keep_each_hash_as_a_hash_table() {
        // Redis's `hash-max-listpack-value` is 64 bytes by default.
        assert!(RESTING_LAYOUT.len() > 64 && META_LAYOUT.len() > 64);
        // No symbol is called so, and it holds no space (so no order is named so).
        assert!(tickflow_proto::rules::symbol_problem(HEADER).is_some());
        assert!(!HEADER.contains(' '));
    }

    #[test]
    fn layout_1_meta_is_read_and_bad_values_are_named() {
        let meta = Meta::parse(r#"{"band_bps":500,"last_price":100000000,"sequence":9}"#).unwrap();
        assert_eq!(
            meta,
            Meta {
                band_bps: 500,
                last_price: Some(100_000_000),
                sequence: 9,
                legacy: true
            }
        );
        assert_eq!(
            Meta::parse("2 0 - 0").unwrap(),
            Meta {
                band_bps: 0,
                last_price: None,
                sequence: 0,
                legacy: false
            }
        );
        for bad in ["", "2 0 -", "3 0 - 0", "2 x - 0", "2 0 - 0 9", "{"] {
            assert!(Meta::parse(bad).is_err(), "{bad:?}");
        }
        assert!(decode_order("a", "b 1 2 2 1").is_ok());
        for bad in [
            "",
            "x 1 2 2 1",
            "b 1 2 2",
            "b 1 2 2 1 0",
            "b one 2 2 1",
            "b 1 -2 2 1",
        ] {
            assert!(decode_order("a", bad).is_err(), "{bad:?}");
        }
        // Layout 1's engine fails to read layout 2's meta (it wants JSON), so it refuses a
        // moved partition rather than trading on books it cannot see.
        assert!(serde_json::from_str::<serde_json::Value>("2 0 - 0").is_err());
    }
}
