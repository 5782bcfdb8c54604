//! Owned partitions: one consumer per partition at a time, order kept across hand-overs and
//! crashes, a fenced former owner, and partitions spread over the live consumers.

use std::{collections::BTreeMap, time::Duration};

use redis::{AsyncCommands, Value};
use streams_core::{ConsumeMode, Envelope, Partition};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// An owned-mode consumer and its handler's shared records (`seen`, `events`).
fn spawn_owned(redis: &TestRedis, name: &str, slow: Duration) -> (Running, Forward) {
    let config = redis.config(name);
    let handler = Forward::new(&config).slow(slow);
    let running = spawn_stage(&config, spec(ConsumeMode::Owned), handler.clone());
    (running, handler)
}

/// Every payload in partition `partition` of `stream`, in stream order, read in pages.
async fn payloads(redis: &TestRedis, stream: &str, partition: Partition) -> Vec<String> {
    let mut conn = redis.conn().await;
    let key = redis.key(stream, partition);
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply =
            conn.xrange_count(&key, &start, "+", 1000).await.unwrap();
        let Some(last) = page.ids.last() else {
            return out;
        };
        start = format!("({}", last.id);
        for entry in &page.ids {
            let fields: Vec<(String, Vec<u8>)> = entry
                .map
                .iter()
                .map(|(n, v)| (n.clone(), redis::from_redis_value(v.clone()).unwrap()))
                .collect();
            let envelope =
                Envelope::from_fields(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())))
                    .expect("an envelope");
            out.push(String::from_utf8(envelope.payload.to_vec()).unwrap());
        }
    }
}

fn lease_key(redis: &TestRedis, partition: Partition) -> String {
    redis.config("x").keys.lease(GROUP, partition)
}

/// The value of every partition's lease key (`None`: nobody holds it).
async fn leases(redis: &TestRedis) -> Vec<Option<String>> {
    let mut conn = redis.conn().await;
    let mut values = Vec::new();
    for p in 0..redis.partitions {
        let value: Option<String> = conn.get(lease_key(redis, p)).await.unwrap();
        values.push(value);
    }
    values
}

/// How many leases each consumer holds (tokens are `<consumer>#<random>`).
async fn holdings(redis: &TestRedis) -> BTreeMap<String, usize> {
    let mut held = BTreeMap::new();
    for value in leases(redis).await.into_iter().flatten() {
        let owner = value.split_once('#').map_or(value.as_str(), |(o, _)| o);
        *held.entry(owner.to_owned()).or_default() += 1;
    }
    held
}

/// Whether every partition is held, by exactly the consumers and counts of `expected`.
async fn spread_is(redis: &TestRedis, expected: &[(&str, usize)]) -> bool {
    let want: BTreeMap<String, usize> = expected
        .iter()
        .map(|(name, n)| ((*name).to_owned(), *n))
        .collect();
    holdings(redis).await == want
}

async fn wait_for_spread(redis: &TestRedis, expected: &[(&str, usize)]) {
    let what = format!("leases spread as {expected:?}");
    eventually(Duration::from_secs(8), &what, || spread_is(redis, expected)).await;
}

/// Live members of the group, as the membership sorted set holds them.
async fn members(redis: &TestRedis) -> Vec<String> {
    let mut conn = redis.conn().await;
    conn.zrange(redis.config("x").keys.members(GROUP), 0, -1)
        .await
        .unwrap()
}

/// Pending entries of `group` per consumer, over every partition of `stream`.
async fn pending_by_consumer(redis: &TestRedis, stream: &str) -> BTreeMap<String, u64> {
    let mut conn = redis.conn().await;
    let mut by_consumer = BTreeMap::new();
    for p in 0..redis.partitions {
        let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(redis.key(stream, p))
            .arg(GROUP)
            .query_async(&mut conn)
            .await;
        let Ok(Value::Array(parts)) = reply else {
            continue;
        };
        let Some(Value::Array(consumers)) = parts.get(3) else {
            continue;
        };
        for consumer in consumers {
            let (name, count): (String, u64) = redis::from_redis_value(consumer.clone()).unwrap();
            *by_consumer.entry(name).or_default() += count;
        }
    }
    by_consumer
}

/// Appends `"{tag}{p}:{seq}"` envelopes to every partition of `INPUT` in the background,
/// `per_round` per partition every `every`, until `total` per partition or `finish`.
struct Producer {
    stop: CancellationToken,
    task: JoinHandle<Vec<u64>>,
}

impl Producer {
    fn start(redis: &TestRedis, tag: &str, total: u64, per_round: u64, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let keys: Vec<String> = (0..redis.partitions).map(|p| redis.key(INPUT, p)).collect();
        let url = redis.server.url();
        let tag = tag.to_owned();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut conn = streams_core::testing::connect(&url).await.unwrap();
            let mut counts = vec![0u64; keys.len()];
            while !token.is_cancelled() && counts.iter().any(|c| *c < total) {
                let mut pipe = redis::pipe();
                for (p, key) in keys.iter().enumerate() {
                    let end = (counts[p] + per_round).min(total);
                    for seq in counts[p]..end {
                        let envelope =
                            Envelope::new("test", format!("k{p}"), format!("{tag}{p}:{seq}"));
                        pipe.xadd(key, "*", &envelope.to_fields()).ignore();
                    }
                    counts[p] = end;
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(every).await;
            }
            counts
        });
        Self { stop, task }
    }

    /// Waits until `total` entries were produced in every partition.
    async fn done(self) -> Vec<u64> {
        self.task.await.unwrap()
    }

    /// Stops producing; returns how many entries each partition got.
    async fn finish(self) -> Vec<u64> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Waits until every partition's output is at least as long as its expected payloads, then
/// asserts each partition's output is exactly its expected payloads, in order.
async fn assert_partitions_forwarded_in_order(redis: &TestRedis, expected: &[Vec<String>]) {
    eventually(
        Duration::from_secs(30),
        "every partition forwarded",
        || async {
            for (p, want) in expected.iter().enumerate() {
                if redis.xlen(&redis.key(OUTPUT, p as Partition)).await < want.len() as u64 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for (p, want) in expected.iter().enumerate() {
        let out = payloads(redis, OUTPUT, p as Partition).await;
        if out != *want {
            let at = out
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(out.len().min(want.len()));
            let window = |v: &[String]| v[at.saturating_sub(2)..(at + 3).min(v.len())].to_vec();
            panic!(
                "partition {p}: output differs from input at index {at} (output {} entries, \
                 input {}): output {:?}, input {:?}",
                out.len(),
                want.len(),
                window(&out),
                window(want),
            );
        }
    }
}

fn expected_from_counts(tag: &str, counts: &[u64]) -> Vec<Vec<String>> {
    counts
        .iter()
        .enumerate()
        .map(|(p, n)| tags(&format!("{tag}{p}"), 0..*n).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_partitions_leave_in_the_order_they_entered() {
    let redis = TestRedis::start(4);
    let (c1, _) = spawn_owned(&redis, "c1", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 4)]).await;
    // 3000 entries per partition, produced over about a second while c1, then c1 and c2,
    // consume: c2 joins mid-stream and two partitions are handed over under load.
    let producer = Producer::start(&redis, "t", 3000, 30, Duration::from_millis(10));
    eventually(
        Duration::from_secs(10),
        "some entries forwarded",
        || async { redis.xlen(&redis.key(OUTPUT, 0)).await >= 300 },
    )
    .await;
    let (c2, _) = spawn_owned(&redis, "c2", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 2), ("c2", 2)]).await;
    let counts = producer.done().await;
    assert_eq!(counts, vec![3000; 4]);
    assert_partitions_forwarded_in_order(&redis, &expected_from_counts("t", &counts)).await;
    assert!(
        c2.counters().processed > 0,
        "c2 took part: {:?}",
        c2.counters()
    );
    assert_eq!(redis.total_pending(INPUT, GROUP).await, 0);
    c1.stop().await;
    c2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_order_survives_an_owner_killed_mid_batch() {
    let redis = TestRedis::start(4);
    let slow = Duration::from_millis(400);
    let (victim, victim_handler) = spawn_owned(&redis, "c1", slow);
    let (survivor, _) = spawn_owned(&redis, "c2", slow);
    wait_for_spread(&redis, &[("c1", 2), ("c2", 2)]).await;
    let mut expected: Vec<Vec<String>> = Vec::new();
    for p in 0..4 {
        redis.produce(INPUT, p, &format!("p{p}"), 0..1500).await;
        redis.produce(INPUT, p, &format!("slow{p}"), 0..2).await;
        redis.produce(INPUT, p, &format!("q{p}"), 0..1500).await;
        expected.push(
            tags(&format!("p{p}"), 0..1500)
                .chain(tags(&format!("slow{p}"), 0..2))
                .chain(tags(&format!("q{p}"), 0..1500))
                .collect(),
        );
    }
    eventually(
        Duration::from_secs(15),
        "the victim is handling a slow entry",
        || async {
            victim_handler
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.starts_with("slow"))
        },
    )
    .await;
    let in_flight = pending_by_consumer(&redis, INPUT).await;
    victim.kill();
    assert!(
        in_flight.get("c1").copied().unwrap_or(0) > 0,
        "the victim had a batch in flight: {in_flight:?}"
    );
    // More input after the crash: the survivor must finish the victim's batch first.
    for (p, want) in expected.iter_mut().enumerate() {
        let p = p as Partition;
        redis.produce(INPUT, p, &format!("r{p}"), 0..500).await;
        want.extend(tags(&format!("r{p}"), 0..500));
    }
    assert_partitions_forwarded_in_order(&redis, &expected).await;
    eventually(Duration::from_secs(5), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    assert!(
        spread_is(&redis, &[("c2", 4)]).await,
        "{:?}",
        leases(&redis).await
    );
    assert_eq!(survivor.counters().dead_lettered, 0);
    survivor.stop().await;
}

/// A consumer inside a slow handler loses its lease (to `steal`); its commit must be
/// refused, and the partition's legitimate owner finishes the entry once. `steal` returns
/// the lease a holds again by the time its commit is refused, if it does.
async fn former_owner_is_fenced(steal: impl AsyncFnOnce(&TestRedis, &str) -> Option<String>) {
    let redis = TestRedis::start(1);
    let (a, handler) = spawn_owned(&redis, "a", Duration::from_millis(1500));
    wait_for_spread(&redis, &[("a", 1)]).await;
    redis.produce(INPUT, 0, "slow", 0..1).await;
    eventually(
        Duration::from_secs(5),
        "a is handling the entry",
        || async { handler.seen.lock().unwrap().len() == 1 },
    )
    .await;
    let retaken = steal(&redis, &lease_key(&redis, 0)).await;
    eventually(
        Duration::from_secs(5),
        "a is told it lost partition 0",
        || async { handler.events.lock().unwrap().contains(&"-0".to_owned()) },
    )
    .await;
    // The handler has returned and the commit was attempted (the loss is only noticed once
    // the batch is done): nothing may have been acknowledged or forwarded.
    assert_eq!(payloads(&redis, OUTPUT, 0).await, Vec::<String>::new());
    assert_eq!(redis.pending(INPUT, 0, GROUP).await, 1);
    assert_eq!(a.counters().processed, 0);
    // (a may have taken the partition again already: "+0" may follow.)
    assert_eq!(handler.events.lock().unwrap()[..2], ["+0", "-0"]);
    // a is the only live member, so it is the legitimate owner once the lease is free: it
    // takes the partition again, handles the entry again and forwards it once.
    eventually(Duration::from_secs(10), "the entry is finished", || async {
        redis.pending(INPUT, 0, GROUP).await == 0
    })
    .await;
    assert_exactly_once(&payloads(&redis, OUTPUT, 0).await, tags("slow", 0..1));
    assert_eq!(*handler.events.lock().unwrap(), vec!["+0", "-0", "+0"]);
    assert_eq!(*handler.seen.lock().unwrap(), vec!["slow:0", "slow:0"]);
    assert_eq!(a.counters().processed, 1);
    if let Some(token) = retaken {
        // The refused commit must not make a forget the lease it took again meanwhile (it
        // would then sit unrenewed until it expired, stalling the partition).
        let now: Option<String> = redis.conn().await.get(lease_key(&redis, 0)).await.unwrap();
        assert_eq!(now, Some(token), "a finished under the lease it took again");
    }
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_former_owner_whose_lease_was_taken_can_neither_ack_nor_forward() {
    former_owner_is_fenced(async |redis, lease| {
        // As if b had taken the partition over while a was paused.
        let mut conn = redis.conn().await;
        let _: () = redis::cmd("SET")
            .arg(lease)
            .arg("b#00000000000000ff")
            .arg("PX")
            .arg(3000)
            .query_async(&mut conn)
            .await
            .unwrap();
        None
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_under_an_expired_lease_is_refused_even_after_retaking_it() {
    former_owner_is_fenced(async |redis, lease| {
        // As if a's lease had expired: its lease manager takes the partition again at once,
        // with a new token, while the batch read under the old one is still in hand.
        let mut conn = redis.conn().await;
        let old: String = conn.get(lease).await.unwrap();
        let _: () = conn.del(lease).await.unwrap();
        eventually(Duration::from_secs(5), "a holds a new lease", || async {
            let now: Option<String> = redis.conn().await.get(lease).await.unwrap();
            now.is_some_and(|t| t != old && t.starts_with("a#"))
        })
        .await;
        redis.conn().await.get(lease).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_spread_over_live_consumers_and_move_when_they_come_and_go() {
    let redis = TestRedis::start(12);
    // Entries keep flowing into every partition through every change below.
    let producer = Producer::start(&redis, "t", u64::MAX, 3, Duration::from_millis(10));
    let (c1, _) = spawn_owned(&redis, "c1", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 12)]).await;
    let (c2, _) = spawn_owned(&redis, "c2", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 6), ("c2", 6)]).await;
    let (c3, _) = spawn_owned(&redis, "c3", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 4), ("c2", 4), ("c3", 4)]).await;

    // A crash: c2's leases and membership expire, c1 and c3 split the partitions.
    c2.kill();
    wait_for_spread(&redis, &[("c1", 6), ("c3", 6)]).await;
    let (c4, _) = spawn_owned(&redis, "c4", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 4), ("c3", 4), ("c4", 4)]).await;

    // A graceful stop: c1 releases its leases and leaves before `stop` returns, so the
    // others need not wait for anything to expire.
    c1.stop().await;
    let left = holdings(&redis).await;
    assert!(!left.contains_key("c1"), "c1 released its leases: {left:?}");
    let live = members(&redis).await;
    assert!(!live.contains(&"c1".to_owned()), "c1 left: {live:?}");
    wait_for_spread(&redis, &[("c3", 6), ("c4", 6)]).await;

    let counts = producer.finish().await;
    assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
    assert_partitions_forwarded_in_order(&redis, &expected_from_counts("t", &counts)).await;
    eventually(Duration::from_secs(5), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    c3.stop().await;
    c4.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_releases_every_lease_even_one_taken_during_the_last_batch() {
    let redis = TestRedis::start(2);
    let (c1, c1_handler) = spawn_owned(&redis, "c1", Duration::from_millis(1500));
    let (c2, _) = spawn_owned(&redis, "c2", Duration::ZERO);
    wait_for_spread(&redis, &[("c1", 1), ("c2", 1)]).await;
    // c1 owns partition 0 (first by name) and is busy with a slow entry of it...
    redis.produce(INPUT, 0, "slow", 0..1).await;
    eventually(
        Duration::from_secs(5),
        "c1 is handling the entry",
        || async { c1_handler.seen.lock().unwrap().len() == 1 },
    )
    .await;
    // ...when c2 leaves: c1's lease manager takes partition 1 while the batch is in hand.
    c2.stop().await;
    wait_for_spread(&redis, &[("c1", 2)]).await;
    // c1 stops before its loop got to partition 1: it finishes its batch, and must give up
    // both leases, not only the one its loop was reading.
    c1.stop().await;
    assert_eq!(
        leases(&redis).await,
        vec![None, None],
        "every lease released"
    );
    assert_eq!(members(&redis).await, Vec::<String>::new());
    assert_exactly_once(&payloads(&redis, OUTPUT, 0).await, tags("slow", 0..1));
    assert_eq!(redis.total_pending(INPUT, GROUP).await, 0);
}

/// A commit refused because an older entry is pending (here one a former owner's read took,
/// as a zombie would) is handled again after that entry, in order: a stateful handler must
/// count what it had handled in the refused batch once, not twice, so the stage reloads its
/// state for the partition before the entries are handled again.
#[tokio::test]
async fn a_commit_refused_for_an_older_pending_entry_leaves_handler_state_counted_once() {
    let redis = TestRedis::start(1);
    let config = redis.config("c1");
    let handler = Tally::new(&config, redis.redis());
    let running = spawn_stage(&config, spec(ConsumeMode::Owned), handler);
    let mut conn = redis.conn().await;
    let stored = async |conn: &mut redis::aio::MultiplexedConnection| -> u64 {
        let value: Option<u64> = conn.get(Tally::key(&config.keys, 0)).await.unwrap();
        value.unwrap_or(0)
    };
    redis.produce(INPUT, 0, "t", 0..3).await;
    eventually(Duration::from_secs(10), "the first three counted", || {
        let (redis, stored) = (&redis, &stored);
        async move { stored(&mut redis.conn().await).await == 3 }
    })
    .await;

    // Entry 3 is appended and, in the same transaction, read by another consumer of the
    // group (a zombie): the stage never sees it delivered, and it stays pending there.
    let key = redis.key(INPUT, 0);
    let fields = Envelope::new("test", "k0", b"t:3".to_vec()).to_fields();
    let mut pipe = redis::pipe();
    pipe.atomic()
        .xadd(&key, "*", &fields)
        .ignore()
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("zombie")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    // The next ones reach the stage, whose commit of them is refused until entry 3 is
    // claimed back and handled first.
    redis.produce(INPUT, 0, "t", 4..6).await;
    eventually(Duration::from_secs(10), "everything acknowledged", || {
        let redis = &redis;
        async move { redis.pending(INPUT, 0, GROUP).await == 0 }
    })
    .await;
    assert_eq!(
        payloads(&redis, OUTPUT, 0).await,
        (0..6).map(|i| format!("t:{i}")).collect::<Vec<_>>(),
        "forwarded once each, in order"
    );
    assert_eq!(stored(&mut conn).await, 6, "each entry counted once");
    running.stop().await;
}
