//! Books stored in the earlier per-symbol layout (one orders hash per symbol, JSON) are read
//! by a replica taking the partition over and moved to the per-partition layout by its first
//! commit, whole and atomically: nothing is lost, the untouched books included.

use std::time::{Duration, Instant};

use engine::{Books, NewOrder, OrderBook, Side, stage};
use prost::Message;
use streams_core::{App, Env, Envelope, KeySpace, Partition, testing::RedisServer};
use tickflow_proto::{event_type as types, topology, v1};
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 4;

/// Two symbols of one partition.
fn two_symbols(keys: &KeySpace) -> (Partition, String, String) {
    let partition = keys.partition_for(b"AAA");
    let other = (0..)
        .map(|i| format!("S{i}"))
        .find(|s| keys.partition_for(s.as_bytes()) == partition)
        .expect("a symbol in the same partition");
    (partition, "AAA".to_owned(), other)
}

fn state(keys: &KeySpace, name: &str, partition: Partition) -> String {
    keys.partition_state(topology::ENGINE_GROUP, name, partition)
}

/// Stores `books` as the engine did until layout 2: a set of symbols, a JSON meta per book
/// and a hash of JSON orders per book.
async fn store_layout_1(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySpace,
    partition: Partition,
    books: &[(&str, &OrderBook)],
) {
    for (symbol, book) in books {
        let meta = serde_json::json!({
            "band_bps": book.band_bps(),
            "last_price": book.last_price(),
            "sequence": book.sequence(),
        });
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(state(keys, "symbols", partition))
            .arg(*symbol);
        pipe.cmd("HSET")
            .arg(state(keys, "meta", partition))
            .arg(*symbol)
            .arg(meta.to_string());
        let orders_key = state(keys, &format!("orders:{symbol}"), partition);
        for order in book.orders(Side::Buy).chain(book.orders(Side::Sell)) {
            pipe.cmd("HSET")
                .arg(&orders_key)
                .arg(&order.order_id)
                .arg(serde_json::to_string(order).unwrap());
        }
        let () = pipe.query_async(conn).await.unwrap();
    }
}

fn validated_order(symbol: &str, id: &str, side: v1::Side, price_e6: i64, qty: u64) -> Envelope {
    let order = v1::ValidatedOrder {
        symbol: symbol.into(),
        side: side as i32,
        r#type: v1::OrderType::Limit as i32,
        price_e6,
        qty,
        client_order_id: id.into(),
        instrument: None,
    };
    Envelope::new(types::VALIDATED_ORDER, symbol, order.encode_to_vec())
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_in_the_per_symbol_layout_are_moved_whole_with_the_first_commit() {
    let server = RedisServer::start();
    let mut conn = server.connect().await;
    let namespace = streams_core::testing::unique_namespace("engine-layout");
    let keys = KeySpace::new(namespace.as_str(), PARTITIONS);
    let (partition, traded, untouched) = two_symbols(&keys);

    // A deep book (more orders than one HSCAN page) and a small one, as layout 1 stored them.
    let mut deep = OrderBook::new(0);
    deep.on_tick(100_000_000);
    for i in 0..5_000u64 {
        let (side, price) = if i % 2 == 0 {
            (Side::Buy, 99_000_000 - (i as i64 % 7) * 10_000)
        } else {
            (Side::Sell, 101_000_000 + (i as i64 % 7) * 10_000)
        };
        deep.submit(NewOrder::limit(format!("d {i}"), side, price, 1 + i % 5));
    }
    let mut small = OrderBook::new(300);
    small.submit(NewOrder::limit("s1", Side::Sell, 50_000_000, 4));
    store_layout_1(
        &mut conn,
        &keys,
        partition,
        &[(&traded, &deep), (&untouched, &small)],
    )
    .await;
    let mut expected = Books::default();
    expected.insert(&traded, deep.clone());
    expected.insert(&untouched, small.clone());

    // Read as they are, before anything moved them.
    let loaded = stage::load_books(&server_redis(&server), &keys, partition)
        .await
        .unwrap();
    assert_eq!(loaded, expected);

    // An engine takes the partition over; one order sweeps the best asks of the deep book.
    let shutdown = CancellationToken::new();
    let env = Env::from_pairs([
        ("REDIS_URL", server.url()),
        ("TICKFLOW_NAMESPACE", namespace.clone()),
        ("TICKFLOW_PARTITIONS", PARTITIONS.to_string()),
        ("TICKFLOW_BLOCK_MS", "200".into()),
        ("CONSUMER_NAME", "engine-0".into()),
    ]);
    let app = App::init("engine", env, "127.0.0.1:0", shutdown.clone()).unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = tokio::spawn(engine::run(app, http));

    let sweep = validated_order(&traded, "taker", v1::Side::Buy, 101_010_000, 700);
    let stage::Applied::Book { events, .. } =
        stage::apply(&mut expected, &sweep, |_| true).unwrap()
    else {
        panic!("an order")
    };
    assert!(events.len() > 100, "the sweep trades: {}", events.len());
    let validated = keys.stream(topology::VALIDATED, partition);
    let market = keys.stream(topology::MARKET, partition);
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&validated).arg("*");
    for (name, value) in sweep.to_fields() {
        xadd.arg(name).arg(value);
    }
    let _: String = xadd.query_async(&mut conn).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let len: u64 = redis::cmd("XLEN")
            .arg(&market)
            .query_async(&mut conn)
            .await
            .unwrap();
        if len == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the engine did not commit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    engine.await.unwrap().unwrap();

    // The first commit moved both books: the old hashes are gone, every meta is layout 2,
    // and what loads is the books after the sweep, the untouched one included.
    for symbol in [&traded, &untouched] {
        let old = state(&keys, &format!("orders:{symbol}"), partition);
        assert!(!exists(&mut conn, &old).await, "{old} is left");
        let meta: String = redis::cmd("HGET")
            .arg(state(&keys, "meta", partition))
            .arg(symbol)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(meta.starts_with("2 "), "{symbol}: {meta}");
    }
    let resting: u64 = redis::cmd("HLEN")
        .arg(state(&keys, "resting", partition))
        .query_async(&mut conn)
        .await
        .unwrap();
    let books = |symbol: &str| expected.get(symbol).unwrap().len() as u64;
    // And the field that describes the layout.
    assert_eq!(resting, books(&traded) + books(&untouched) + 1);
    for hash in ["resting", "meta"] {
        let encoding: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(state(&keys, hash, partition))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(encoding, "hashtable", "{hash}");
    }
    let loaded = stage::load_books(&server_redis(&server), &keys, partition)
        .await
        .unwrap();
    assert_eq!(loaded, expected);
}

fn server_redis(server: &RedisServer) -> streams_core::Redis {
    streams_core::Redis::new(&server.url(), 2).unwrap()
}
