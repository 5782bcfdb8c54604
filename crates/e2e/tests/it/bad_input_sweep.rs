//! The bad-input sweep: malformed entries thrown straight at every stage's input stream
//! (transform's `inbound`, the engine's `validated`, analytics' `market`, ingest's external
//! `ingest_stream`), and malformed requests at the ingest APIs (HTTP and gRPC).
//!
//! Every bad entry must end in its stage's dead-letter stream with a reason that names the
//! problem, acknowledged (nothing left pending); every bad request must be refused with a
//! clear 4xx or gRPC status and append nothing. No service may stop, and the good events
//! sent before and after the bad ones must give exactly the trades and statistics they
//! would give alone. `bad_inputs.rs` has the first example of each kind; this is the table.
//!
//! A bad `traceparent` is not a reason to lose an event: like every ingest path, the stages
//! handle the event and drop the bad context (it is not forwarded).
//!
//! What the HTTP API accepts on purpose, and is not swept: unknown fields (ignored). A
//! `content-type` other than JSON is refused (415), so that a browser form cannot post.

use std::collections::{BTreeSet, HashMap};

use e2e::{Options, Pipeline, RedisKind, Role, stage_status};
use prost::Message;
use serde_json::{Value, json};
use streams_core::{Envelope, Partition, envelope::now_micros};
use tickflow_proto::{event_type as types, topology, v1};

use crate::support::{WAIT, limit, limit_json, tick, trade, trade_view, wait_report, wait_trades};

const MIB: usize = 1 << 20;

/// A stream entry's fields, binary-safe.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One malformed entry, where it goes, and what its dead letter's reason must say.
#[derive(Debug, Clone)]
struct Bad {
    name: String,
    /// The partition of the input stream it is appended to.
    partition: Partition,
    fields: Fields,
    /// Each must appear in `dlq.reason`.
    reason: Vec<String>,
}

fn bad(name: &str, partition: Partition, fields: Fields, reason: &[&str]) -> Bad {
    Bad {
        name: name.to_owned(),
        partition,
        fields,
        reason: reason.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// A bad entry as appended: its id and stream.
#[derive(Debug)]
struct Injected {
    bad: Bad,
    id: String,
    stream: String,
}

fn fields(pairs: &[(&str, &[u8])]) -> Fields {
    pairs
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

/// A well-formed envelope's fields in the current format (version 2, now as origin).
fn current_envelope(event_type: &str, key: &str, payload: Vec<u8>) -> Fields {
    Envelope::new(event_type, key, payload)
        .to_fields()
        .into_iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v))
        .collect()
}

/// A well-formed envelope's fields in format version 1, which earlier builds wrote and every
/// stage still reads (now as origin).
fn envelope(event_type: &str, key: &str, payload: Vec<u8>) -> Fields {
    fields(&[
        ("v", b"1"),
        ("type", event_type.as_bytes()),
        ("key", key.as_bytes()),
        ("ts", now_micros().to_string().as_bytes()),
        ("payload", &payload),
    ])
}

fn without(entry: &Fields, name: &str) -> Fields {
    entry
        .iter()
        .filter(|(n, _)| n.as_slice() != name.as_bytes())
        .cloned()
        .collect()
}

/// `entry` with field `name` set to `value` (replaced in place, or appended).
fn with(entry: &Fields, name: &str, value: impl AsRef<[u8]>) -> Fields {
    let mut entry = entry.clone();
    let value = value.as_ref().to_vec();
    match entry
        .iter_mut()
        .find(|(n, _)| n.as_slice() == name.as_bytes())
    {
        Some((_, v)) => *v = value,
        None => entry.push((name.as_bytes().to_vec(), value)),
    }
    entry
}

fn field<'a>(entry: &'a Fields, name: &str) -> Option<&'a [u8]> {
    entry
        .iter()
        .find(|(n, _)| n.as_slice() == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// At most `max` characters of `text`, for messages.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!(
            "{}… ({} bytes)",
            text.chars().take(max).collect::<String>(),
            text.len()
        )
    }
}

// ----- payloads ----------------------------------------------------------------------------

fn new_order(symbol: &str, side: i32, order_type: i32, price: f64, qty: f64, id: &str) -> Vec<u8> {
    v1::NewOrder {
        symbol: symbol.into(),
        side,
        r#type: order_type,
        price,
        qty,
        client_order_id: id.into(),
    }
    .encode_to_vec()
}

fn buy_limit(symbol: &str, price: f64, qty: f64, id: &str) -> Vec<u8> {
    new_order(
        symbol,
        v1::Side::Buy as i32,
        v1::OrderType::Limit as i32,
        price,
        qty,
        id,
    )
}

fn market_tick(symbol: &str, price: f64, qty: f64) -> Vec<u8> {
    v1::MarketTick {
        symbol: symbol.into(),
        price,
        qty,
    }
    .encode_to_vec()
}

fn validated_order(symbol: &str, side: i32, price_e6: i64, qty: u64, id: &str) -> Vec<u8> {
    v1::ValidatedOrder {
        symbol: symbol.into(),
        side,
        r#type: v1::OrderType::Limit as i32,
        price_e6,
        qty,
        client_order_id: id.into(),
        instrument: Some(v1::Instrument {
            symbol: symbol.into(),
            tick_size_e6: 10_000,
            lot_size: 1,
            band_bps: 1000,
            name: String::new(),
            currency: "USD".into(),
        }),
    }
    .encode_to_vec()
}

fn validated_tick(symbol: &str, price_e6: i64, qty: u64) -> Vec<u8> {
    v1::ValidatedTick {
        symbol: symbol.into(),
        price_e6,
        qty,
    }
    .encode_to_vec()
}

fn trade_payload(symbol: &str, price_e6: i64, qty: u64, buy: &str, sell: &str) -> Vec<u8> {
    v1::Trade {
        symbol: symbol.into(),
        price_e6,
        qty,
        buy_order_id: buy.into(),
        sell_order_id: sell.into(),
        aggressor: v1::Side::Buy as i32,
        sequence: 999,
    }
    .encode_to_vec()
}

fn execution_payload(symbol: &str, status: i32, id: &str) -> Vec<u8> {
    v1::ExecutionReport {
        symbol: symbol.into(),
        client_order_id: id.into(),
        status,
        ..Default::default()
    }
    .encode_to_vec()
}

/// An `order.events` payload holding `events` (`None`: an event without a kind).
fn order_events_payload(events: Vec<Option<v1::market_event::Kind>>) -> Vec<u8> {
    v1::OrderEvents {
        events: events
            .into_iter()
            .map(|kind| v1::MarketEvent { kind })
            .collect(),
    }
    .encode_to_vec()
}

// ----- the envelope-level table --------------------------------------------------------------

/// The malformations every envelope stage must dead-letter, as entries of partition
/// `partition`: `good_payload` is a well-formed payload of `event_type` (symbol AAPL), and
/// `other_message` the payload of another message that does not decode as `event_type`'s.
fn envelope_cases(
    partition: Partition,
    event_type: &str,
    good_payload: Vec<u8>,
    other_message: Vec<u8>,
) -> Vec<Bad> {
    let good = envelope(event_type, "AAPL", good_payload.clone());
    let current = current_envelope(event_type, "AAPL", good_payload.clone());
    let payload_of = format!("payload of {event_type}");
    let payload_of = payload_of.as_str();
    // Field 1 (the symbol of every message) as two bytes that are not UTF-8, then the rest.
    let mut not_utf8_symbol = vec![0x0a, 0x02, 0xff, 0xfe];
    not_utf8_symbol.extend_from_slice(&good_payload);
    let not_utf8: &[u8] = &[0xff, 0xfe, 0x80];
    let case = |name: &str, fields: Fields, reason: &[&str]| bad(name, partition, fields, reason);
    vec![
        case("no v", without(&good, "v"), &["missing field `h`"]),
        case("no type", without(&good, "type"), &["missing field `type`"]),
        case("no key", without(&good, "key"), &["missing field `key`"]),
        case("no ts", without(&good, "ts"), &["missing field `ts`"]),
        case(
            "no payload",
            without(&good, "payload"),
            &["missing field `payload`"],
        ),
        case(
            "ts not a number",
            with(&good, "ts", "yesterday"),
            &["invalid field `ts`", "integer"],
        ),
        case(
            "ts negative",
            with(&good, "ts", "-5"),
            &["invalid field `ts`"],
        ),
        case(
            "ts beyond u64",
            with(&good, "ts", "184467440737095516160"),
            &["invalid field `ts`"],
        ),
        case(
            "ts a float",
            with(&good, "ts", "1.7e15"),
            &["invalid field `ts`"],
        ),
        case(
            "v not a number",
            with(&good, "v", "one"),
            &["unsupported envelope version `one`"],
        ),
        case(
            "v=99",
            with(&good, "v", "99"),
            &[
                "unsupported envelope version `99`",
                "reads versions 1 and 2",
            ],
        ),
        case(
            "v empty",
            with(&good, "v", ""),
            &["unsupported envelope version"],
        ),
        case(
            "unknown type",
            with(&good, "type", "order.teleport"),
            &["does not handle event type \"order.teleport\""],
        ),
        case(
            "empty type",
            with(&good, "type", ""),
            &["invalid field `type`: empty"],
        ),
        case(
            "garbage protobuf payload",
            with(&good, "payload", [0xff; 12]),
            &[payload_of, "failed to decode"],
        ),
        case(
            "payload of another message type",
            with(&good, "payload", other_message),
            &[payload_of, "invalid wire type"],
        ),
        case(
            "1 MiB payload",
            with(&good, "payload", vec![0xff; MIB]),
            &[payload_of, "failed to decode"],
        ),
        case(
            "invalid UTF-8 type",
            with(&good, "type", not_utf8),
            &["invalid field `type`: not valid UTF-8"],
        ),
        case(
            "invalid UTF-8 key",
            with(&good, "key", not_utf8),
            &["invalid field `key`: not valid UTF-8"],
        ),
        case(
            "invalid UTF-8 v",
            with(&good, "v", not_utf8),
            &["unsupported envelope version"],
        ),
        case(
            "invalid UTF-8 ts",
            with(&good, "ts", not_utf8),
            &["invalid field `ts`"],
        ),
        case(
            "invalid UTF-8 symbol in the payload",
            with(&good, "payload", not_utf8_symbol),
            &[payload_of, "UTF-8"],
        ),
        case(
            "one junk field",
            fields(&[("junk", b"x")]),
            &["missing field `h`"],
        ),
        case(
            "one empty field",
            fields(&[("", b"")]),
            &["missing field `h`"],
        ),
        // The current format: a header and a payload.
        case("no p", without(&current, "p"), &["missing field `p`"]),
        case(
            "h version 9",
            with(&current, "h", "9 tick AAPL 5"),
            &["unsupported envelope version `9`"],
        ),
        case(
            "h empty",
            with(&current, "h", ""),
            &["unsupported envelope version ``"],
        ),
        case(
            "h without a time",
            with(&current, "h", format!("2 {event_type} AAPL")),
            &["invalid field `h`: expected `<version> <type> <key> <ts>`"],
        ),
        case(
            "h time not a number",
            with(&current, "h", format!("2 {event_type} AAPL yesterday")),
            &["invalid field `h`", "microseconds"],
        ),
        case(
            "h empty type",
            with(&current, "h", "2  AAPL 5"),
            &["invalid field `h`: empty type"],
        ),
        case(
            "h broken escape",
            with(&current, "h", format!("2 {event_type} AA%G1 5")),
            &["the key is not %-escaped UTF-8"],
        ),
        case(
            "h key not UTF-8",
            with(
                &current,
                "h",
                [b"2 tick ".as_slice(), not_utf8, b" 5"].concat(),
            ),
            &["the key is not %-escaped UTF-8"],
        ),
        case(
            "h unknown type",
            with(&current, "h", "2 order.teleport AAPL 5"),
            &["does not handle event type \"order.teleport\""],
        ),
        case(
            "p garbage protobuf",
            with(&current, "p", [0xff; 12]),
            &[payload_of, "failed to decode"],
        ),
    ]
}

/// An entry's `traceparent` and `tracestate`.
type TraceContext = (Option<String>, Option<String>);

const VALID_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The trace context (`traceparent`, `tracestate`) the stage's output for each of
/// [`bad_trace_contexts`] carries (tracing is off in the harness: an output keeps its
/// input's context, what is left of it).
fn kept_trace_contexts() -> Vec<TraceContext> {
    vec![
        (None, None),
        (None, None),
        (None, None),
        (Some(VALID_TRACEPARENT.to_owned()), None),
        (None, None),
        (Some(VALID_TRACEPARENT.to_owned()), None),
    ]
}

/// Well-formed entries of `event_type` with a bad trace context: they must be handled as
/// usual, the context dropped.
fn bad_trace_contexts(event_type: &str, payload: &[u8]) -> Vec<Fields> {
    let good = envelope(event_type, "AAPL", payload.to_vec());
    let current = current_envelope(event_type, "AAPL", payload.to_vec());
    let header = String::from_utf8(field(&current, "h").unwrap_or_default().to_vec())
        .expect("an ASCII header");
    vec![
        with(
            &with(&good, "traceparent", "not-a-trace-context"),
            "tracestate",
            "x=y",
        ),
        with(&good, "traceparent", [0xff, 0xfe]),
        with(
            &good,
            "traceparent",
            "00-00000000000000000000000000000000-0000000000000000-01",
        ),
        with(
            &with(&good, "traceparent", VALID_TRACEPARENT),
            "tracestate",
            "k=".to_owned() + &"v".repeat(MIB),
        ),
        // The same in the current format's header.
        with(&current, "h", format!("{header} not-a-trace-context x=y")),
        with(
            &current,
            "h",
            format!("{header} {VALID_TRACEPARENT} k={}", "v".repeat(MIB)),
        ),
    ]
}

// ----- Redis helpers -------------------------------------------------------------------------

async fn xadd(p: &Pipeline, key: &str, entry: &Fields) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (name, value) in entry {
        cmd.arg(name.as_slice()).arg(value.as_slice());
    }
    cmd.query_async(&mut p.conn())
        .await
        .unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

async fn xrange(p: &Pipeline, key: &str) -> Vec<(String, Fields)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut p.conn())
        .await
        .unwrap_or_else(|e| panic!("XRANGE {key}: {e}"))
}

/// Entries of every partition of `logical`, summed.
async fn stream_len(p: &Pipeline, logical: &str) -> u64 {
    let mut total = 0;
    for partition in p.keys().all_partitions() {
        let len: u64 = redis::cmd("XLEN")
            .arg(p.keys().stream(logical, partition))
            .query_async(&mut p.conn())
            .await
            .expect("XLEN");
        total += len;
    }
    total
}

/// Appends every bad entry to its partition of `logical` (or, for `None`, to the external
/// stream), in table order.
async fn inject(p: &Pipeline, logical: Option<&str>, cases: Vec<Bad>) -> Vec<Injected> {
    let mut injected = Vec::new();
    for bad in cases {
        let stream = match logical {
            Some(logical) => p.keys().stream(logical, bad.partition),
            None => p.external_stream().to_owned(),
        };
        let id = xadd(p, &stream, &bad.fields).await;
        injected.push(Injected { bad, id, stream });
    }
    injected
}

/// Every entry of every partition of `logical` that is an envelope and not one of `skip`.
async fn envelopes_except(
    p: &Pipeline,
    logical: &str,
    skip: &[Injected],
) -> Vec<(Partition, String, Envelope)> {
    let mut all = Vec::new();
    for partition in p.keys().all_partitions() {
        let stream = p.keys().stream(logical, partition);
        for (id, entry) in xrange(p, &stream).await {
            if skip.iter().any(|i| i.id == id && i.stream == stream) {
                continue;
            }
            let envelope = Envelope::from_fields(entry.iter().map(|(n, v)| (&n[..], &v[..])))
                .unwrap_or_else(|e| panic!("{logical} entry {id} is not an envelope: {e}"));
            all.push((partition, id, envelope));
        }
    }
    all.sort_by_key(|(_, id, _)| e2e::stream_id(id));
    all
}

/// Checks the dead-letter streams `dlq_keys` hold exactly one dead letter per injected
/// entry, by source id: with the stage's group, the source stream, the original fields and
/// a reason saying what the table says (and not echoing a huge input back). Reports every
/// problem at once.
async fn assert_dead_lettered(
    p: &Pipeline,
    group: &str,
    dlq_keys: &BTreeSet<String>,
    injected: &[Injected],
) {
    // By source stream and id: streams of different partitions may hold the same id.
    let mut dead: HashMap<(String, String), Fields> = HashMap::new();
    let mut problems = Vec::new();
    for key in dlq_keys {
        for (id, entry) in xrange(p, key).await {
            let text = |f: &str| field(&entry, f).map(|v| String::from_utf8_lossy(v).into_owned());
            let (Some(stream), Some(source)) = (text("dlq.stream"), text("dlq.source_id")) else {
                problems.push(format!(
                    "dead letter {id} in {key} does not say where it came from"
                ));
                continue;
            };
            if dead
                .insert((stream.clone(), source.clone()), entry)
                .is_some()
            {
                problems.push(format!("{stream} {source} dead-lettered twice"));
            }
        }
    }
    for injected in injected {
        let name = &injected.bad.name;
        let Some(entry) = dead.remove(&(injected.stream.clone(), injected.id.clone())) else {
            problems.push(format!("{name}: not dead-lettered"));
            continue;
        };
        let text = |f: &str| field(&entry, f).map(|v| String::from_utf8_lossy(v).into_owned());
        let Some(reason) = text("dlq.reason") else {
            problems.push(format!("{name}: dead letter without dlq.reason"));
            continue;
        };
        if reason.trim().is_empty() {
            problems.push(format!("{name}: empty dlq.reason"));
        }
        for want in &injected.bad.reason {
            if !reason.contains(want.as_str()) {
                problems.push(format!(
                    "{name}: reason {:?} does not say {want:?}",
                    clip(&reason, 300)
                ));
            }
        }
        if reason.len() > 1024 {
            problems.push(format!(
                "{name}: the reason echoes the input ({} bytes): {:?}",
                reason.len(),
                clip(&reason, 120)
            ));
        }
        if text("dlq.group").as_deref() != Some(group) {
            problems.push(format!("{name}: dlq.group {:?}", text("dlq.group")));
        }
        for (n, v) in &injected.bad.fields {
            if !entry.iter().any(|(en, ev)| en == n && ev == v) {
                problems.push(format!(
                    "{name}: the original field {:?} is not kept",
                    String::from_utf8_lossy(n)
                ));
            }
        }
    }
    for ((stream, source), entry) in dead {
        let reason = field(&entry, "dlq.reason").map(String::from_utf8_lossy);
        problems.push(format!(
            "unexpected dead letter of {stream} {source}: {:?}",
            reason.map(|r| clip(&r, 200))
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the dead letters of {group}:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// The stage's counters in its `/admin/status`: `dead` dead-lettered, nothing failed.
async fn assert_counters(p: &Pipeline, role: Role, group: &str, dead: usize) {
    let status = p.admin_status(role, 0).await;
    let counters = &stage_status(&status, group)["counters"];
    assert_eq!(counters["dead_lettered"], dead, "{group}: {counters}");
    assert_eq!(counters["failed"], 0, "{group}: {counters}");
}

/// The dead-letter streams of every partition of `logical`.
/// The dead letters of every partition of `input` and the counters of `role`'s stage on
/// it: exactly `injected`, each with its reason.
async fn assert_stage_dead_lettered(
    p: &Pipeline,
    role: Role,
    input: &str,
    group: &str,
    injected: &[Injected],
) {
    let keys = dlq_keys(p, input);
    assert_dead_lettered(p, group, &keys, injected).await;
    assert_counters(p, role, group, injected.len()).await;
}

/// Only the good orders were reported on, and AAPL's stats hold their one trade (10 at
/// one price) and the `ticks` good ticks.
async fn assert_only_the_good_trade(p: &Pipeline, ticks: usize) {
    for report in p.execution_reports().await {
        assert!(report.client_order_id.starts_with("good-"), "{report:?}");
    }
    let stats = p.stats("AAPL").await;
    assert_eq!(
        (&stats["trades"], &stats["volume"], &stats["ticks"]),
        (&json!(1), &json!(10), &json!(ticks)),
        "{stats}"
    );
}

fn dlq_keys(p: &Pipeline, logical: &str) -> BTreeSet<String> {
    p.keys()
        .all_partitions()
        .map(|partition| p.keys().dead_letter(logical, partition))
        .collect()
}

/// Waits until analytics' stats of `symbol` show `trades` trades; returns them.
async fn wait_stats(p: &Pipeline, symbol: &str, trades: u64) -> Value {
    p.wait_for(WAIT, async || {
        let stats = p.stats(symbol).await;
        if stats["trades"].as_u64() == Some(trades) {
            Ok(stats)
        } else {
            Err(format!("{trades} trades in the stats of {symbol}: {stats}"))
        }
    })
    .await
}

async fn post_order(p: &Pipeline, side: &str, qty: u64, id: &str) {
    let (status, body) = p
        .post_json("/v1/orders", &limit_json("AAPL", side, 172.50, qty, id))
        .await;
    assert_eq!(status, 202, "{id}: {body}");
}

/// A partition other than `partition`.
fn other_partition(p: &Pipeline, partition: Partition) -> Partition {
    (partition + 1) % p.keys().partitions()
}

// ----- the stages ----------------------------------------------------------------------------

on_both_backends!(transform_dead_letters_every_malformed_inbound_entry_and_keeps_trading);

async fn transform_dead_letters_every_malformed_inbound_entry_and_keeps_trading(
    backend: RedisKind,
) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "sweep-transform".into(),
        ..Options::default()
    })
    .await;
    let aapl = p.keys().partition_for(b"AAPL");
    let elsewhere = other_partition(&p, aapl);

    post_order(&p, "sell", 10, "good-s1").await;
    wait_report(&p, "good-s1", "ACCEPTED").await;

    let order = |payload: Vec<u8>| envelope(types::NEW_ORDER, "AAPL", payload);
    let limit_side = |side: i32| {
        new_order(
            "AAPL",
            side,
            v1::OrderType::Limit as i32,
            100.0,
            1.0,
            "bad-side",
        )
    };
    let mut cases = envelope_cases(
        aapl,
        types::NEW_ORDER,
        buy_limit("AAPL", 100.0, 1.0, "bad-envelope"),
        trade_payload("AAPL", 1, 1, "bad-b", "bad-s"),
    );
    let payload_error = &["payload of order.new", "not a valid NewOrder"];
    cases.extend([
        bad(
            "a tick.validated payload read as an order",
            aapl,
            order(validated_tick("AAPL", 172_500_000, 10)),
            &[payload_error[0], payload_error[1], "side"],
        ),
        bad(
            "side 7",
            aapl,
            order(limit_side(7)),
            &[payload_error[1], "side 7"],
        ),
        bad(
            "side unspecified",
            aapl,
            order(limit_side(0)),
            &[payload_error[1], "side 0"],
        ),
        bad(
            "order type 9",
            aapl,
            order(new_order(
                "AAPL",
                v1::Side::Buy as i32,
                9,
                100.0,
                1.0,
                "bad-type",
            )),
            &[payload_error[1], "type 9"],
        ),
        bad(
            "empty payload",
            aapl,
            order(Vec::new()),
            &[payload_error[1], "symbol"],
        ),
        bad(
            "empty symbol",
            aapl,
            order(buy_limit("", 100.0, 1.0, "bad-empty-symbol")),
            &[payload_error[1], "symbol", "empty"],
        ),
        bad(
            "1 MiB symbol",
            aapl,
            order(buy_limit(&"A".repeat(MIB), 100.0, 1.0, "bad-huge-symbol")),
            &[payload_error[1], "symbol", "longer than 32"],
        ),
        bad(
            "empty client_order_id",
            aapl,
            order(buy_limit("AAPL", 100.0, 1.0, "")),
            &[payload_error[1], "client_order_id"],
        ),
        bad(
            "client_order_id with a control character",
            aapl,
            order(buy_limit("AAPL", 100.0, 1.0, "bad\u{0}id")),
            &[payload_error[1], "client_order_id"],
        ),
        bad(
            "key is another symbol",
            aapl,
            envelope(
                types::NEW_ORDER,
                "MSFT",
                buy_limit("AAPL", 100.0, 1.0, "bad-key"),
            ),
            &["key", "MSFT", "AAPL"],
        ),
        bad(
            "1 MiB key",
            aapl,
            envelope(
                types::NEW_ORDER,
                &"K".repeat(MIB),
                buy_limit("AAPL", 100.0, 1.0, "bad-huge-key"),
            ),
            &["key", "AAPL"],
        ),
        bad(
            "an AAPL order in another partition",
            elsewhere,
            order(buy_limit("AAPL", 100.0, 1.0, "bad-partition")),
            &["AAPL", "partition"],
        ),
        bad(
            "cancel without a symbol",
            aapl,
            envelope(
                types::CANCEL_ORDER,
                "AAPL",
                v1::CancelOrder {
                    symbol: String::new(),
                    client_order_id: "bad-cancel".into(),
                }
                .encode_to_vec(),
            ),
            &["not a valid CancelOrder", "symbol"],
        ),
        bad(
            "cancel without a client_order_id",
            aapl,
            envelope(
                types::CANCEL_ORDER,
                "AAPL",
                v1::CancelOrder {
                    symbol: "AAPL".into(),
                    client_order_id: String::new(),
                }
                .encode_to_vec(),
            ),
            &["not a valid CancelOrder", "client_order_id"],
        ),
        bad(
            "tick with a NaN price",
            aapl,
            envelope(types::TICK, "AAPL", market_tick("AAPL", f64::NAN, 1.0)),
            &["price"],
        ),
        bad(
            "tick with a price beyond any tick count",
            aapl,
            envelope(types::TICK, "AAPL", market_tick("AAPL", 1e300, 1.0)),
            &["price", "too large"],
        ),
        bad(
            "tick without a symbol",
            aapl,
            envelope(types::TICK, "AAPL", market_tick("", 172.5, 1.0)),
            &["not a valid MarketTick", "symbol"],
        ),
    ]);
    let injected = inject(&p, Some(topology::INBOUND), cases).await;
    let traced = bad_trace_contexts(types::TICK, &market_tick("AAPL", 172.50, 1.0));
    for entry in &traced {
        xadd(&p, &p.keys().stream(topology::INBOUND, aapl), entry).await;
    }

    // A limit price far beyond what a tick count can hold is a business rejection (to the
    // client, as a report), not a crash.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "buy", 1e300, 1, "good-huge-price"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let rejected = wait_report(&p, "good-huge-price", "REJECTED").await;
    assert!(rejected.reason.contains("too large"), "{rejected:?}");

    post_order(&p, "buy", 10, "good-b1").await;
    wait_trades(&p, "AAPL", 1).await;
    p.wait_settled(WAIT).await;

    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3)]
    );
    // The engine's input: the good orders, and the ticks without their bad trace context.
    let validated: Vec<(String, TraceContext)> = p
        .stream_entries(topology::VALIDATED)
        .await
        .into_iter()
        .map(|e| {
            let context = (e.envelope.traceparent, e.envelope.tracestate);
            (e.envelope.event_type, context)
        })
        .collect();
    let order = (types::VALIDATED_ORDER.to_owned(), (None, None));
    let mut expected = vec![order.clone()];
    expected.extend(
        kept_trace_contexts()
            .into_iter()
            .map(|context| (types::VALIDATED_TICK.to_owned(), context)),
    );
    expected.push(order);
    assert_eq!(validated, expected, "the engine's input");
    assert_only_the_good_trade(&p, traced.len()).await;

    assert_stage_dead_lettered(
        &p,
        Role::Transform,
        topology::INBOUND,
        topology::TRANSFORM_GROUP,
        &injected,
    )
    .await;
    p.shutdown().await;
}

on_both_backends!(engine_dead_letters_every_malformed_validated_entry_and_keeps_matching);

async fn engine_dead_letters_every_malformed_validated_entry_and_keeps_matching(
    backend: RedisKind,
) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "sweep-engine".into(),
        ..Options::default()
    })
    .await;
    let aapl = p.keys().partition_for(b"AAPL");

    post_order(&p, "sell", 10, "good-s1").await;
    wait_report(&p, "good-s1", "ACCEPTED").await;

    let mut cases = envelope_cases(
        aapl,
        types::VALIDATED_ORDER,
        validated_order("AAPL", v1::Side::Buy as i32, 100_000_000, 1, "bad-envelope"),
        trade_payload("AAPL", 1, 1, "bad-b", "bad-s"),
    );
    cases.push(bad(
        "empty payload (an order without a symbol or a side)",
        aapl,
        envelope(types::VALIDATED_ORDER, "AAPL", Vec::new()),
        &["symbol"],
    ));
    let injected = inject(&p, Some(topology::VALIDATED), cases).await;
    let traced = bad_trace_contexts(
        types::VALIDATED_TICK,
        &validated_tick("AAPL", 172_500_000, 1),
    );
    for entry in &traced {
        xadd(&p, &p.keys().stream(topology::VALIDATED, aapl), entry).await;
    }

    post_order(&p, "buy", 10, "good-b1").await;
    wait_trades(&p, "AAPL", 1).await;
    p.wait_settled(WAIT).await;

    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3)]
    );
    // What the engine wrote: the good orders' reports and trade, and the ticks, passed
    // through without the bad trace context.
    let ticks: Vec<TraceContext> = p
        .stream_entries(topology::MARKET)
        .await
        .into_iter()
        .filter(|e| e.envelope.event_type == types::VALIDATED_TICK)
        .map(|e| (e.envelope.traceparent, e.envelope.tracestate))
        .collect();
    assert_eq!(ticks, kept_trace_contexts());
    assert_only_the_good_trade(&p, traced.len()).await;

    assert_stage_dead_lettered(
        &p,
        Role::Engine,
        topology::VALIDATED,
        topology::ENGINE_GROUP,
        &injected,
    )
    .await;
    p.shutdown().await;
}

on_both_backends!(engine_dead_letters_validated_payloads_that_decode_but_are_invalid);

/// Validated entries that decode, but as nothing the engine should act on: without the
/// checks in `engine::stage::apply` it would open a book for an empty or 1 MiB symbol,
/// move the reference price to 0, and match an order in a partition its symbol does not
/// belong to (a second book of the same symbol).
async fn engine_dead_letters_validated_payloads_that_decode_but_are_invalid(backend: RedisKind) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "sweep-engine-semantics".into(),
        ..Options::default()
    })
    .await;
    let aapl = p.keys().partition_for(b"AAPL");
    let elsewhere = other_partition(&p, aapl);

    post_order(&p, "sell", 10, "good-s1").await;
    wait_report(&p, "good-s1", "ACCEPTED").await;

    let order = |payload: Vec<u8>| envelope(types::VALIDATED_ORDER, "AAPL", payload);
    let buy = v1::Side::Buy as i32;
    let cases = vec![
        bad(
            "tick with an empty payload",
            aapl,
            envelope(types::VALIDATED_TICK, "AAPL", Vec::new()),
            &["symbol"],
        ),
        bad(
            "tick at price 0",
            aapl,
            envelope(types::VALIDATED_TICK, "AAPL", validated_tick("AAPL", 0, 1)),
            &["price"],
        ),
        bad(
            "order with a 1 MiB symbol",
            aapl,
            order(validated_order(
                &"A".repeat(MIB),
                buy,
                100_000_000,
                1,
                "bad-huge",
            )),
            &["symbol"],
        ),
        bad(
            "order without a client_order_id",
            aapl,
            order(validated_order("AAPL", buy, 100_000_000, 1, "")),
            &["client_order_id"],
        ),
        bad(
            "limit order at a negative price",
            aapl,
            order(validated_order(
                "AAPL",
                buy,
                -100_000_000,
                1,
                "bad-negative",
            )),
            &["price"],
        ),
        bad(
            "cancel without a symbol",
            aapl,
            envelope(
                types::VALIDATED_CANCEL,
                "AAPL",
                v1::ValidatedCancel {
                    symbol: String::new(),
                    client_order_id: "good-s1".into(),
                }
                .encode_to_vec(),
            ),
            &["symbol"],
        ),
        bad(
            "an AAPL order in another partition",
            elsewhere,
            order(validated_order(
                "AAPL",
                buy,
                172_500_000,
                10,
                "bad-partition",
            )),
            &["AAPL", "partition"],
        ),
    ];
    let injected = inject(&p, Some(topology::VALIDATED), cases).await;

    post_order(&p, "buy", 10, "good-b1").await;
    p.wait_settled(WAIT).await;
    assert_stage_dead_lettered(
        &p,
        Role::Engine,
        topology::VALIDATED,
        topology::ENGINE_GROUP,
        &injected,
    )
    .await;
    // With the bad entries dead-lettered, the good orders trade as if they were alone (a
    // tick at 0 would have moved the price band away from them).
    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3)]
    );
    for report in p.execution_reports().await {
        assert!(report.client_order_id.starts_with("good-"), "{report:?}");
    }
    p.shutdown().await;
}

on_both_backends!(analytics_dead_letters_every_malformed_market_entry_and_keeps_counting);

async fn analytics_dead_letters_every_malformed_market_entry_and_keeps_counting(
    backend: RedisKind,
) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "sweep-analytics".into(),
        ..Options::default()
    })
    .await;
    let aapl = p.keys().partition_for(b"AAPL");
    let elsewhere = other_partition(&p, aapl);

    post_order(&p, "sell", 10, "good-s1").await;
    post_order(&p, "buy", 10, "good-b1").await;
    wait_stats(&p, "AAPL", 1).await;

    let mut cases = envelope_cases(
        aapl,
        types::TRADE,
        trade_payload("AAPL", 100_000_000, 1, "bad-b", "bad-s"),
        buy_limit("AAPL", 100.0, 1.0, "bad-order"),
    );
    let on_market = |event_type: &str, payload: Vec<u8>| envelope(event_type, "AAPL", payload);
    let filled = v1::ExecStatus::Filled as i32;
    cases.extend([
        bad(
            "trade with an empty payload",
            aapl,
            on_market(types::TRADE, Vec::new()),
            &["trade", "symbol"],
        ),
        bad(
            "trade of qty 0",
            aapl,
            on_market(
                types::TRADE,
                trade_payload("AAPL", 100_000_000, 0, "b", "s"),
            ),
            &["trade", "qty"],
        ),
        bad(
            "trade at a negative price",
            aapl,
            on_market(types::TRADE, trade_payload("AAPL", -1, 1, "b", "s")),
            &["trade", "price"],
        ),
        bad(
            "trade of qty u64::MAX",
            aapl,
            on_market(
                types::TRADE,
                trade_payload("AAPL", 100_000_000, u64::MAX, "b", "s"),
            ),
            &["trade", "qty", "too large"],
        ),
        bad(
            "trade of a 1 MiB symbol",
            aapl,
            on_market(
                types::TRADE,
                trade_payload(&"A".repeat(MIB), 100_000_000, 1, "b", "s"),
            ),
            &["trade", "symbol", "longer than 32"],
        ),
        bad(
            "trade of AAPL in another partition",
            elsewhere,
            on_market(
                types::TRADE,
                trade_payload("AAPL", 100_000_000, 1, "b", "s"),
            ),
            &["AAPL", "partition"],
        ),
        bad(
            "tick with an empty payload",
            aapl,
            on_market(types::VALIDATED_TICK, Vec::new()),
            &["tick", "symbol"],
        ),
        bad(
            "tick at price 0",
            aapl,
            on_market(types::VALIDATED_TICK, validated_tick("AAPL", 0, 1)),
            &["tick", "price"],
        ),
        bad(
            "execution report with an empty payload",
            aapl,
            on_market(types::EXECUTION, Vec::new()),
            &["execution", "symbol"],
        ),
        bad(
            "execution report of status 99",
            aapl,
            on_market(types::EXECUTION, execution_payload("AAPL", 99, "x")),
            &["execution", "status 99"],
        ),
        bad(
            "execution report without a symbol",
            aapl,
            on_market(types::EXECUTION, execution_payload("", filled, "x")),
            &["execution", "symbol"],
        ),
        bad(
            "order events that are not protobuf",
            aapl,
            on_market(types::ORDER_EVENTS, vec![0xff; 7]),
            &["order.events", "not valid"],
        ),
        bad(
            "order events holding no event",
            aapl,
            on_market(types::ORDER_EVENTS, order_events_payload(Vec::new())),
            &["order events", "no event"],
        ),
        bad(
            "order events holding an event without a kind",
            aapl,
            on_market(types::ORDER_EVENTS, order_events_payload(vec![None])),
            &["neither a report nor a trade"],
        ),
        // A good report before a bad trade: the entry counts whole or not at all, so the
        // executions asserted below stay what the good orders made.
        bad(
            "order events with a good report and a trade of qty 0",
            aapl,
            on_market(
                types::ORDER_EVENTS,
                order_events_payload(vec![
                    Some(v1::market_event::Kind::Execution(
                        v1::ExecutionReport::decode(
                            execution_payload("AAPL", v1::ExecStatus::Accepted as i32, "x")
                                .as_slice(),
                        )
                        .unwrap(),
                    )),
                    Some(v1::market_event::Kind::Trade(
                        v1::Trade::decode(
                            trade_payload("AAPL", 100_000_000, 0, "b", "s").as_slice(),
                        )
                        .unwrap(),
                    )),
                ]),
            ),
            &["trade", "qty"],
        ),
        bad(
            "order events with a report of AAPL in another partition",
            elsewhere,
            on_market(
                types::ORDER_EVENTS,
                order_events_payload(vec![Some(v1::market_event::Kind::Execution(
                    v1::ExecutionReport::decode(execution_payload("AAPL", filled, "x").as_slice())
                        .unwrap(),
                ))]),
            ),
            &["AAPL", "partition"],
        ),
    ]);
    let injected = inject(&p, Some(topology::MARKET), cases).await;
    let traced = bad_trace_contexts(
        types::VALIDATED_TICK,
        &validated_tick("AAPL", 172_400_000, 1),
    );
    for entry in &traced {
        xadd(&p, &p.keys().stream(topology::MARKET, aapl), entry).await;
    }

    post_order(&p, "sell", 5, "good-s2").await;
    post_order(&p, "buy", 5, "good-b2").await;
    let stats = wait_stats(&p, "AAPL", 2).await;
    p.wait_settled(WAIT).await;
    let stats_after = p.stats("AAPL").await;
    assert_eq!(stats, stats_after, "nothing counted after settling");

    assert_eq!(stats["volume"], 15, "{stats}");
    assert_eq!(stats["vwap"], 172.5, "{stats}");
    assert_eq!(stats["last_price"], 172.5, "{stats}");
    assert_eq!(stats["ticks"], traced.len(), "{stats}");
    assert_eq!(stats["last_tick_price"], 172.4, "{stats}");
    assert_eq!(
        stats["executions"],
        json!({ "accepted": 4, "filled": 4 }),
        "{stats}"
    );
    // The good trades, as the engine wrote them around the bad entries.
    let trades: Vec<_> = envelopes_except(&p, topology::MARKET, &injected)
        .await
        .into_iter()
        .filter(|(_, _, e)| e.event_type == types::ORDER_EVENTS)
        .flat_map(|(_, _, e)| {
            v1::OrderEvents::decode(e.payload.as_ref())
                .expect("order events")
                .trades()
                .map(trade_view)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        trades,
        vec![
            trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3),
            trade("AAPL", 172_500_000, 5, "good-b2", "good-s2", 8),
        ]
    );

    assert_stage_dead_lettered(
        &p,
        Role::Analytics,
        topology::MARKET,
        topology::ANALYTICS_GROUP,
        &injected,
    )
    .await;
    p.shutdown().await;
}

on_both_backends!(ingest_dead_letters_every_malformed_external_entry_and_keeps_ingesting);

async fn ingest_dead_letters_every_malformed_external_entry_and_keeps_ingesting(
    backend: RedisKind,
) {
    let p = Pipeline::start_with(Options {
        backend,
        name: "sweep-external".into(),
        ..Options::default()
    })
    .await;
    let order = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    };
    let good = |side: &str, id: &str| {
        order(&[
            ("symbol", "AAPL"),
            ("side", side),
            ("price", "172.50"),
            ("qty", "10"),
            ("client_order_id", id),
        ])
    };
    let xadd_text = async |entry: Vec<(String, String)>| {
        let pairs: Vec<(&str, &str)> = entry.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        p.xadd_external(&pairs).await
    };
    xadd_text(good("sell", "good-s1")).await;
    wait_report(&p, "good-s1", "ACCEPTED").await;

    let tick = fields(&[("symbol", b"AAPL"), ("price", b"172.5"), ("qty", b"1")]);
    let limit = with(&with(&tick, "side", "buy"), "client_order_id", "bad-x");
    let huge = "9".repeat(MIB);
    let huge_letters = "x".repeat(MIB);
    let not_utf8: &[u8] = &[0xff, 0xfe];
    let finite = "must be a finite number > 0";
    let case = |name: &str, fields: Fields, reason: &[&str]| bad(name, 0, fields, reason);
    let cases = vec![
        case(
            "one junk field",
            fields(&[("junk", b"x")]),
            &["field `symbol` is required"],
        ),
        case(
            "no symbol",
            without(&tick, "symbol"),
            &["field `symbol` is required"],
        ),
        case(
            "price not a number",
            with(&tick, "price", "abc"),
            &["field `price` is not a number"],
        ),
        case(
            "price NaN",
            with(&tick, "price", "NaN"),
            &["field `price`", finite],
        ),
        case(
            "price inf",
            with(&tick, "price", "inf"),
            &["field `price`", finite],
        ),
        case(
            "price -Infinity",
            with(&limit, "price", "-Infinity"),
            &["field `price`"],
        ),
        case(
            "price 1e400",
            with(&tick, "price", "1e400"),
            &["field `price`", finite],
        ),
        case(
            "price of a million nines",
            with(&tick, "price", &huge),
            &["field `price`", finite],
        ),
        case(
            "price of a million letters",
            with(&tick, "price", &huge_letters),
            &["field `price` is not a number"],
        ),
        case(
            "qty negative",
            with(&tick, "qty", "-5"),
            &["field `qty`", finite],
        ),
        case(
            "qty zero",
            with(&limit, "qty", "0"),
            &["field `qty`", finite],
        ),
        case(
            "limit order without a price",
            without(&limit, "price"),
            &["field `price` is required"],
        ),
        case(
            "unknown side",
            with(&limit, "side", "up"),
            &["field `side` must be buy or sell"],
        ),
        case(
            "a million-letter side",
            with(&limit, "side", &huge_letters),
            &["field `side` must be buy or sell"],
        ),
        case(
            "unknown order type",
            with(&limit, "type", "stop"),
            &["field `type` must be limit or market"],
        ),
        case(
            "symbol not UTF-8",
            with(&tick, "symbol", not_utf8),
            &["field `symbol` is not valid UTF-8"],
        ),
        case(
            "price not UTF-8",
            with(&tick, "price", not_utf8),
            &["field `price` is not valid UTF-8"],
        ),
        case(
            "1 MiB symbol",
            with(&tick, "symbol", "A".repeat(MIB)),
            &["field `symbol` is longer than 32 characters"],
        ),
        case(
            "symbol with a space",
            with(&tick, "symbol", "AA PL"),
            &["field `symbol` may hold only"],
        ),
        case(
            "cancel without a client_order_id",
            fields(&[("action", b"cancel"), ("symbol", b"AAPL")]),
            &["field `client_order_id` is required"],
        ),
        case(
            "1 MiB client_order_id",
            with(&limit, "client_order_id", "o".repeat(MIB)),
            &["field `client_order_id` is longer than 64 characters"],
        ),
    ];
    let count = cases.len();
    let injected = inject(&p, None, cases).await;
    // Good ticks with a bad trace context: handled, what is bad in the context dropped.
    xadd(
        &p,
        p.external_stream(),
        &with(&with(&tick, "traceparent", "garbage"), "tracestate", "a=b"),
    )
    .await;
    let huge_state = "k=".to_owned() + &"v".repeat(MIB);
    xadd(
        &p,
        p.external_stream(),
        &with(
            &with(&tick, "traceparent", VALID_TRACEPARENT),
            "tracestate",
            &huge_state,
        ),
    )
    .await;
    xadd_text(good("buy", "good-b1")).await;
    wait_trades(&p, "AAPL", 1).await;
    p.wait_settled(WAIT).await;

    let trades: Vec<_> = p.trades().await.iter().map(trade_view).collect();
    assert_eq!(
        trades,
        vec![trade("AAPL", 172_500_000, 10, "good-b1", "good-s1", 3)]
    );
    let inbound: Vec<(String, Option<String>)> = p
        .stream_entries(topology::INBOUND)
        .await
        .into_iter()
        .map(|e| (e.envelope.event_type, e.envelope.traceparent))
        .collect();
    assert_eq!(
        inbound,
        vec![
            (types::NEW_ORDER.to_owned(), None),
            (types::TICK.to_owned(), None),
            (types::TICK.to_owned(), Some(VALID_TRACEPARENT.to_owned())),
            (types::NEW_ORDER.to_owned(), None),
        ]
    );
    // Not even written: the megabyte of trace state stayed out of the pipeline.
    for partition in p.keys().all_partitions() {
        for (id, entry) in xrange(&p, &p.keys().stream(topology::INBOUND, partition)).await {
            assert_eq!(field(&entry, "tracestate"), None, "inbound entry {id}");
        }
    }
    let keys = BTreeSet::from([p.external_dead_letter_stream()]);
    assert_dead_lettered(&p, topology::INGEST_GROUP, &keys, &injected).await;
    assert_counters(&p, Role::Ingest, topology::INGEST_GROUP, count).await;
    p.shutdown().await;
}

// ----- the ingest APIs -----------------------------------------------------------------------

/// One request the HTTP API must refuse.
struct Refusal {
    name: &'static str,
    method: reqwest::Method,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    /// The `field` of a 400's details naming the problem (empty: look at the whole answer).
    field: &'static str,
    /// What that detail's message (or the answer) says.
    says: &'static str,
}

fn refusal(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    field: &'static str,
    says: &'static str,
) -> Refusal {
    Refusal {
        name,
        method: reqwest::Method::POST,
        path: "/v1/orders".into(),
        content_type: "application/json",
        body: body.into(),
        status: 400,
        field,
        says,
    }
}

/// A buy order as raw JSON text with `price` and `qty` spliced in as they are, so that they
/// can be what serde_json would never write (`NaN`, `1e400`).
fn order_text(price: &str, qty: &str) -> String {
    format!(
        r#"{{"symbol":"AAPL","side":"buy","price":{price},"qty":{qty},"client_order_id":"bad-http"}}"#
    )
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// Sends `head` and then `body` in chunks (`Transfer-Encoding: chunked`, so no length is
/// announced) over a raw connection; returns the answer's status and text. The server may
/// answer and close before the body is all sent: write errors are expected then.
async fn chunked_post(addr: std::net::SocketAddr, path: &str, body: Vec<u8>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(64 * 1024) {
            write
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            write.write_all(chunk).await?;
            write.write_all(b"\r\n").await?;
        }
        write.write_all(b"0\r\n\r\n").await?;
        write.flush().await
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read_all = async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("an answer to the chunked request");
    let _ = writer.await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {:?}", clip(&text, 200)));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_api_refuses_every_malformed_request_and_stays_up() {
    let p = Pipeline::start_with(Options {
        name: "sweep-http".into(),
        ..Options::default()
    })
    .await;
    let http = http_client();
    let too_many = format!("[{}]", vec!["{}"; 10_001].join(","));
    let not_json = "is not valid JSON";
    let positive = "finite number > 0";
    let mut cases = vec![
        refusal("malformed JSON", r#"{"symbol": "AAPL", "side": "buy","#, "body", not_json),
        refusal("empty body", "", "body", not_json),
        refusal("only whitespace", " \n\t ", "body", not_json),
        refusal("JSON null", "null", "body", "must be a JSON object"),
        refusal("a JSON number", "42", "body", "must be a JSON object"),
        refusal("a JSON string", r#""AAPL""#, "body", "must be a JSON object"),
        refusal("an empty array", "[]", "body", "at least one event"),
        refusal("an array of non-objects", r#"[1, "x"]"#, "event", "must be a JSON object"),
        refusal(
            "wrong JSON types",
            r#"{"symbol":["AAPL"],"side":true,"type":5,"price":{},"qty":"10","client_order_id":7}"#,
            "qty",
            "must be a number",
        ),
        refusal("negative qty", order_text("172.5", "-1"), "qty", positive),
        refusal("zero qty", order_text("172.5", "0"), "qty", positive),
        refusal("negative price", order_text("-172.5", "1"), "price", positive),
        refusal("zero price", order_text("0", "1"), "price", positive),
        refusal("NaN literal", order_text("NaN", "1"), "body", not_json),
        refusal("Infinity literal", order_text("Infinity", "1"), "body", not_json),
        refusal("-Infinity literal", order_text("172.5", "-Infinity"), "body", not_json),
        refusal("price 1e400", order_text("1e400", "1"), "body", not_json),
        refusal("qty 1e-400 (0 as a double)", order_text("172.5", "1e-400"), "qty", positive),
        refusal("NaN as a string", order_text(r#""NaN""#, "1"), "price", "must be a number"),
        refusal(
            "Infinity as a string",
            order_text("172.5", r#""Infinity""#),
            "qty",
            "must be a number",
        ),
        refusal("100k nested arrays", "[".repeat(100_000), "body", "recursion limit"),
        refusal("50k nested objects", r#"{"a":"#.repeat(50_000), "body", "recursion limit"),
        refusal(
            "invalid UTF-8 in a string",
            [&br#"{"symbol":""#[..], &[0xff, 0xfe], &br#"","side":"buy","price":1,"qty":1}"#[..]]
                .concat(),
            "body",
            not_json,
        ),
        refusal("invalid UTF-8 outside strings", vec![0xff, 0xfe, 0xfd], "body", not_json),
        refusal(
            "a symbol of 100 KB",
            json!({"symbol": "A".repeat(100_000), "side": "buy", "price": 1, "qty": 1}).to_string(),
            "symbol",
            "longer than 32",
        ),
        refusal(
            "a symbol with a space and braces",
            json!({"symbol": "AA {PL}", "side": "buy", "price": 1, "qty": 1}).to_string(),
            "symbol",
            "may hold only",
        ),
        refusal(
            "a client_order_id of 100 KB",
            json!({"symbol": "AAPL", "side": "buy", "price": 1, "qty": 1, "client_order_id": "o".repeat(100_000)}).to_string(),
            "client_order_id",
            "longer than 64",
        ),
        refusal(
            "a client_order_id with a NUL",
            json!({"symbol": "AAPL", "side": "buy", "price": 1, "qty": 1, "client_order_id": "a\u{0}b"}).to_string(),
            "client_order_id",
            "control characters",
        ),
        refusal(
            "an unknown side",
            json!({"symbol": "AAPL", "side": "sideways", "price": 1, "qty": 1}).to_string(),
            "side",
            "must be",
        ),
        refusal(
            "an unknown order type",
            json!({"symbol": "AAPL", "side": "buy", "type": "stop", "price": 1, "qty": 1}).to_string(),
            "type",
            "must be",
        ),
        refusal("more events than INGEST_MAX_EVENTS", too_many, "body", "at most 10000"),
        Refusal {
            content_type: "application/x-www-form-urlencoded",
            status: 415,
            ..refusal(
                "a form-encoded body",
                "symbol=AAPL&side=buy&price=1&qty=1",
                "",
                "content-type must be application/json",
            )
        },
        Refusal {
            content_type: "text/plain; charset=utf-16",
            status: 415,
            ..refusal(
                "a UTF-16 body",
                [0xff, 0xfe, b'{', 0, b'}', 0],
                "",
                "content-type must be application/json",
            )
        },
        Refusal {
            path: "/v1/ticks".into(),
            ..refusal(
                "a tick with a NaN literal",
                r#"{"symbol":"AAPL","price":NaN,"qty":1}"#,
                "body",
                not_json,
            )
        },
        Refusal {
            path: "/v1/ticks".into(),
            ..refusal(
                "a tick with a price as a string",
                r#"{"symbol":"AAPL","price":"172.5","qty":1}"#,
                "price",
                "must be a number",
            )
        },
        Refusal {
            path: "/v1/cancels".into(),
            ..refusal(
                "a cancel without client_order_id",
                r#"{"symbol":"AAPL"}"#,
                "client_order_id",
                "is required",
            )
        },
        Refusal {
            method: reqwest::Method::DELETE,
            path: "/v1/orders/AA%20PL/o1".into(),
            ..refusal("a cancel of an invalid symbol", "", "symbol", "may hold only")
        },
        Refusal {
            method: reqwest::Method::DELETE,
            path: "/v1/orders/%FF%FE/o1".into(),
            ..refusal("a cancel whose symbol is not UTF-8", "", "", "UTF-8")
        },
        Refusal {
            status: 413,
            ..refusal(
                "a body over INGEST_MAX_BODY_BYTES",
                format!("[{}]", vec![order_text("172.5", "1"); 20_000].join(",")),
                "",
                "larger than 1048576 bytes",
            )
        },
    ];
    assert!(cases.last().expect("cases").body.len() > MIB);
    for case in cases.drain(..) {
        let response = http
            .request(case.method.clone(), p.ingest_url(&case.path))
            .header("content-type", case.content_type)
            .body(case.body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let name = case.name;
        assert_eq!(status, case.status, "{name}: {}", clip(&text, 300));
        if case.field.is_empty() {
            assert!(text.contains(case.says), "{name}: {}", clip(&text, 300));
        } else {
            let answer: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {}", clip(&text, 300)));
            assert!(answer["error"].is_string(), "{name}: {answer}");
            let named = answer["details"].as_array().is_some_and(|details| {
                details.iter().any(|d| {
                    d["field"] == case.field
                        && d["message"].as_str().is_some_and(|m| m.contains(case.says))
                })
            });
            assert!(
                named,
                "{name}: no detail of `{}` saying {:?}: {}",
                case.field,
                case.says,
                clip(&text, 300)
            );
        }
        assert_eq!(
            stream_len(&p, topology::INBOUND).await,
            0,
            "{name}: a refused request appended something"
        );
    }

    // Over the limit without announcing a length: the limit holds while reading.
    let addr = p.service(Role::Ingest, 0).http_addr();
    let body = format!("[{}]", vec![order_text("172.5", "1"); 20_000].join(","));
    let (status, text) = chunked_post(addr, "/v1/orders", body.into_bytes()).await;
    assert_eq!(
        status,
        413,
        "chunked body over the limit: {}",
        clip(&text, 300)
    );
    assert!(
        text.contains("larger than 1048576 bytes"),
        "{}",
        clip(&text, 300)
    );
    assert_eq!(stream_len(&p, topology::INBOUND).await, 0);

    // Still up: a good request is taken, and only it.
    let (status, body) = p
        .post_json(
            "/v1/orders",
            &limit_json("AAPL", "sell", 172.50, 1, "good-after"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_report(&p, "good-after", "ACCEPTED").await;
    assert_eq!(stream_len(&p, topology::INBOUND).await, 1);
    p.wait_settled(WAIT).await;
    p.shutdown().await;
}

/// A codec that sends a request's bytes as they are: what no generated client would write.
#[derive(Debug, Clone, Copy, Default)]
struct RawRequest;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct ResponseDecoder;

impl tonic::codec::Codec for RawRequest {
    type Encode = Vec<u8>;
    type Decode = v1::PublishResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = v1::PublishResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<v1::PublishResponse>, tonic::Status> {
        v1::PublishResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// `Publish` with `bytes` as the request message.
async fn publish_raw(p: &Pipeline, bytes: Vec<u8>) -> Result<v1::PublishResponse, tonic::Status> {
    let addr = p
        .service(Role::Ingest, 0)
        .grpc_addr()
        .expect("gRPC address");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to ingest gRPC");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(bytes),
        tonic::codegen::http::uri::PathAndQuery::from_static("/tickflow.v1.IngestService/Publish"),
        RawRequest,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Field `tag` (length-delimited) holding `bytes`.
fn len_field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_api_refuses_every_malformed_request_and_stays_up() {
    let p = Pipeline::start_with(Options {
        name: "sweep-grpc".into(),
        ..Options::default()
    })
    .await;
    let mut grpc = p.grpc_client().await;
    use tonic::Code::{InvalidArgument, ResourceExhausted};
    let buy = v1::Side::Buy;
    let order = |f: &dyn Fn(&mut v1::NewOrder)| {
        let mut event = limit("AAPL", buy, 172.5, 1.0, "bad-grpc");
        if let Some(v1::event::Kind::NewOrder(o)) = event.kind.as_mut() {
            f(o);
        }
        event
    };
    let cancel = |symbol: &str, id: &str| v1::Event {
        kind: Some(v1::event::Kind::Cancel(v1::CancelOrder {
            symbol: symbol.into(),
            client_order_id: id.into(),
        })),
    };
    let cases: Vec<(&str, Vec<v1::Event>, tonic::Code, &str)> = vec![
        ("no events", vec![], InvalidArgument, "no events"),
        (
            "an event without a kind",
            vec![v1::Event { kind: None }],
            InvalidArgument,
            "kind",
        ),
        (
            "NaN price",
            vec![order(&|o| o.price = f64::NAN)],
            InvalidArgument,
            "`price`",
        ),
        (
            "+inf price",
            vec![order(&|o| o.price = f64::INFINITY)],
            InvalidArgument,
            "`price`",
        ),
        (
            "-inf qty",
            vec![order(&|o| o.qty = f64::NEG_INFINITY)],
            InvalidArgument,
            "`qty`",
        ),
        (
            "negative qty",
            vec![order(&|o| o.qty = -1.0)],
            InvalidArgument,
            "`qty`",
        ),
        (
            "zero qty",
            vec![order(&|o| o.qty = 0.0)],
            InvalidArgument,
            "`qty`",
        ),
        (
            "negative price",
            vec![order(&|o| o.price = -0.01)],
            InvalidArgument,
            "`price`",
        ),
        (
            "NaN tick qty",
            vec![tick("AAPL", 172.5, f64::NAN)],
            InvalidArgument,
            "`qty`",
        ),
        (
            "inf tick price",
            vec![tick("AAPL", f64::INFINITY, 1.0)],
            InvalidArgument,
            "`price`",
        ),
        (
            "empty symbol",
            vec![order(&|o| o.symbol.clear())],
            InvalidArgument,
            "`symbol`",
        ),
        (
            "blank symbol",
            vec![tick("   ", 1.0, 1.0)],
            InvalidArgument,
            "`symbol`",
        ),
        (
            "a symbol of 100 KB",
            vec![order(&|o| o.symbol = "A".repeat(100_000))],
            InvalidArgument,
            "`symbol` is longer than 32",
        ),
        (
            "side unspecified",
            vec![order(&|o| o.side = 0)],
            InvalidArgument,
            "`side`",
        ),
        (
            "side 99",
            vec![order(&|o| o.side = 99)],
            InvalidArgument,
            "`side`",
        ),
        (
            "order type 99",
            vec![order(&|o| o.r#type = 99)],
            InvalidArgument,
            "`type`",
        ),
        (
            "a client_order_id with control characters",
            vec![order(&|o| o.client_order_id = "a\nb".into())],
            InvalidArgument,
            "`client_order_id`",
        ),
        (
            "a cancel without an id",
            vec![cancel("AAPL", "")],
            InvalidArgument,
            "`client_order_id`",
        ),
        (
            "more events than INGEST_MAX_EVENTS",
            vec![tick("AAPL", 172.5, 1.0); 10_001],
            InvalidArgument,
            "at most 10000",
        ),
        (
            "a 5 MiB message",
            vec![order(&|o| o.client_order_id = "o".repeat(5 * MIB))],
            ResourceExhausted,
            "too large",
        ),
    ];
    for (name, events, code, says) in cases {
        let status = grpc
            .publish(v1::PublishRequest { events })
            .await
            .expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(says),
            "{name}: {:?} does not say {says:?}",
            clip(status.message(), 300)
        );
        assert_eq!(stream_len(&p, topology::INBOUND).await, 0, "{name}");
    }

    // PublishStream: the same checks, one event at a time.
    let streamed: Vec<(&str, v1::Event, tonic::Code, &str)> = vec![
        (
            "NaN price",
            order(&|o| o.price = f64::NAN),
            InvalidArgument,
            "`price`",
        ),
        (
            "empty symbol",
            tick("", 1.0, 1.0),
            InvalidArgument,
            "`symbol`",
        ),
        (
            "a 5 MiB event",
            order(&|o| o.symbol = "A".repeat(5 * MIB)),
            ResourceExhausted,
            "too large",
        ),
    ];
    for (name, event, code, says) in streamed {
        let status = grpc
            .publish_stream(futures::stream::iter(vec![event]))
            .await
            .expect_err(name);
        assert_eq!(status.code(), code, "stream, {name}: {status:?}");
        assert!(
            status.message().contains(says),
            "stream, {name}: {:?} does not say {says:?}",
            clip(status.message(), 300)
        );
        assert_eq!(stream_len(&p, topology::INBOUND).await, 0, "stream, {name}");
    }

    // Bytes no generated client writes: not protobuf, and a symbol that is not UTF-8.
    let good_order = v1::NewOrder {
        symbol: "AAPL".into(),
        side: buy as i32,
        r#type: v1::OrderType::Limit as i32,
        price: 172.5,
        qty: 1.0,
        client_order_id: "bad-raw".into(),
    }
    .encode_to_vec();
    let not_utf8_symbol = [len_field(1, &[0xff, 0xfe]), good_order].concat();
    let raw: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage bytes", vec![0xff; 16], "decode"),
        (
            "a symbol that is not UTF-8",
            len_field(1, &len_field(1, &not_utf8_symbol)),
            "UTF-8",
        ),
        (
            "a truncated message",
            len_field(1, &[0x0a, 0x7f, 0x01]),
            "decode",
        ),
    ];
    for (name, bytes, says) in raw {
        let status = publish_raw(&p, bytes).await.expect_err(name);
        assert_eq!(status.code(), InvalidArgument, "raw, {name}: {status:?}");
        assert!(
            status.message().contains(says),
            "raw, {name}: {:?} does not say {says:?}",
            status.message()
        );
        assert_eq!(stream_len(&p, topology::INBOUND).await, 0, "raw, {name}");
    }

    // Still up: a good request is taken, and only it.
    let accepted = grpc
        .publish(v1::PublishRequest {
            events: vec![limit("AAPL", buy, 172.5, 1.0, "good-after")],
        })
        .await
        .expect("a good request after the bad ones")
        .into_inner();
    assert_eq!(accepted.accepted, 1);
    wait_report(&p, "good-after", "ACCEPTED").await;
    assert_eq!(stream_len(&p, topology::INBOUND).await, 1);
    p.wait_settled(WAIT).await;
    drop(grpc);
    p.shutdown().await;
}
