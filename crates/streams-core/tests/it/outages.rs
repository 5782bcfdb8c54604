//! Redis outages: a crash and AOF restart under load (shared and owned stages), readiness
//! while Redis is down, a restart that lost everything (NOGROUP), a shutdown in the middle
//! of a batch (with Redis up, and with Redis down), and a stage started before Redis.
//!
//! Redis is crashed with SIGKILL and brought back on the same port; the stage under test is
//! never told: it must notice, wait, reconnect and go on by itself.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::Ordering,
    time::Duration,
};

use redis::{Value, aio::MultiplexedConnection};
use streams_core::{
    ConsumeMode, Envelope, Partition,
    admin::{AdminState, router},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

// ----- the tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stage_survives_a_redis_crash_mid_stream_exactly_once() {
    crash_and_restart_mid_stream(ConsumeMode::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_stage_survives_a_redis_crash_mid_stream_exactly_once_and_in_order() {
    crash_and_restart_mid_stream(ConsumeMode::Owned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_is_503_while_redis_is_down_and_200_after_restart() {
    let mut redis = TestRedis::start_with(1, true);
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let admin = Admin::serve(AdminState {
        redis: redis.redis(),
        stats: stage.stats.clone(),
        admin_token: None,
        metrics: None,
        service: "test".into(),
    })
    .await;

    eventually(Duration::from_secs(10), "/readyz 200 at start", || async {
        admin.readyz().await.0 == 200
    })
    .await;
    redis.produce(INPUT, 0, "before", 0..20).await;
    eventually(Duration::from_secs(10), "20 forwarded", || async {
        redis.payloads(OUTPUT, 0).await.len() >= 20
    })
    .await;

    kill_redis(&mut redis);
    eventually(
        Duration::from_secs(10),
        "/readyz 503 while Redis is down",
        || async { admin.readyz().await.0 == 503 },
    )
    .await;
    let (status, body) = admin.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(reason.contains("redis"), "503 reason names Redis: {body}");
    // The process itself is alive.
    assert_eq!(admin.get("/livez").await, 200);

    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_redis(&mut redis);
    eventually(
        Duration::from_secs(15),
        "/readyz 200 after the restart",
        || async { admin.readyz().await.0 == 200 },
    )
    .await;
    let (_, body) = admin.readyz().await;
    assert_eq!(body["ready"], true, "{body}");

    // And the stage works again.
    redis.produce(INPUT, 0, "after", 0..20).await;
    eventually(Duration::from_secs(15), "40 forwarded", || async {
        redis.payloads(OUTPUT, 0).await.len() >= 40
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    assert_exactly_once(
        &redis.payloads(OUTPUT, 0).await,
        tags("before", 0..20).chain(tags("after", 0..20)),
    );
    stage.stop().await;
    admin.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stage_recreates_its_group_after_redis_restarts_empty() {
    restart_empty_recreates_the_group(ConsumeMode::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_stage_recreates_its_group_after_redis_restarts_empty() {
    restart_empty_recreates_the_group(ConsumeMode::Owned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stage_stopped_inside_a_batch_leaves_nothing_half_done() {
    stop_inside_a_batch(ConsumeMode::Shared).await;
}

/// SRC BUG REGRESSION: this test failed against `src/ownership.rs` as committed, whose lease
/// manager returned on `shutdown.cancelled()` and so stopped renewing leases while the loop
/// was still finishing the batch in hand: when the rest of the batch outlasted the lease
/// TTL the commit was fenced ("lease lost; dropping partition") and the whole batch stayed
/// pending, unforwarded, though Redis was up. Passes with the fix that keeps renewing held
/// leases until `Ownership::stop` (and takes no new ones after shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_stage_stopped_inside_a_batch_leaves_nothing_half_done() {
    stop_inside_a_batch(ConsumeMode::Owned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stage_stopped_inside_a_batch_with_redis_down_leaves_it_pending_unforwarded() {
    stop_inside_a_batch_with_redis_down(ConsumeMode::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_stage_stopped_inside_a_batch_with_redis_down_leaves_it_pending_unforwarded() {
    stop_inside_a_batch_with_redis_down(ConsumeMode::Owned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stage_started_while_redis_is_down_starts_when_it_comes_up() {
    started_while_redis_is_down(ConsumeMode::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owned_stage_started_while_redis_is_down_starts_when_it_comes_up() {
    started_while_redis_is_down(ConsumeMode::Owned).await;
}

// ----- scenarios shared by several tests -----------------------------------------------------

/// A producer writes continuously to two partitions; Redis is SIGKILLed while the stage is
/// inside a batch (entries handled but not yet committed), stays down ~1 s, and comes back
/// from its AOF. Every input must come out exactly once, and nothing may stay pending.
async fn crash_and_restart_mid_stream(mode: ConsumeMode) {
    let mut redis = TestRedis::start_with(2, true);
    let config = redis.config("c1");
    // Every payload contains "slow": 1 ms per entry, so a batch takes a while and the
    // stage is inside one most of the time.
    let handler = Forward::new(&config).slow(Duration::from_millis(1));
    let seen = handler.seen.clone();
    let stage = spawn_stage(&config, spec(mode), handler);
    let producer = Producer::start(&redis, "slow");

    eventually(
        Duration::from_secs(20),
        "the stage is inside a batch, after forwarding some",
        || async {
            let handled = seen.lock().unwrap().len();
            let forwarded = redis.all_payloads(OUTPUT).await.len();
            forwarded >= 100 && handled > forwarded
        },
    )
    .await;
    kill_redis(&mut redis);
    tokio::time::sleep(Duration::from_secs(1)).await;
    restart_redis(&mut redis);

    let at_restart = redis.all_payloads(OUTPUT).await.len();
    eventually(
        Duration::from_secs(20),
        "forwarding resumes after the restart",
        || async { redis.all_payloads(OUTPUT).await.len() >= at_restart + 100 },
    )
    .await;
    producer.stop().await;

    // The producer wrote each sequence number once, in order (it resumes from what Redis
    // kept); this is the ground truth the output is checked against.
    let mut expected = Vec::new();
    for p in 0..redis.partitions {
        let input = redis.payloads(INPUT, p).await;
        assert_eq!(
            input,
            tags(&format!("slow{p}"), 0..input.len() as u64).collect::<Vec<_>>(),
            "producer wrote partition {p} without gaps or repeats"
        );
        expected.extend(input);
    }
    eventually(Duration::from_secs(20), "every input forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= expected.len()
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, expected);
    if mode == ConsumeMode::Owned {
        for p in 0..redis.partitions {
            let out = redis.payloads(OUTPUT, p).await;
            assert_eq!(
                out,
                tags(&format!("slow{p}"), 0..out.len() as u64).collect::<Vec<_>>(),
                "owned partition {p} left in input order"
            );
        }
    } else {
        assert!(
            stage.counters().reconnects >= 1,
            "the read connection was re-established: {:?}",
            stage.counters()
        );
    }
    assert!(!stage.task.is_finished(), "the stage is still running");
    stage.stop().await;
}

/// Redis loses everything (groups, streams); the stage recreates its group and goes on
/// with what is produced afterwards, without crashing or crash-looping.
async fn restart_empty_recreates_the_group(mode: ConsumeMode) {
    let mut redis = TestRedis::start_with(2, true);
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(mode), Forward::new(&config));
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("before{p}"), 0..50).await;
    }
    eventually(Duration::from_secs(15), "100 forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= 100
    })
    .await;

    restart_redis_empty(&mut redis);
    assert!(
        redis.all_payloads(INPUT).await.is_empty() && redis.all_payloads(OUTPUT).await.is_empty(),
        "the restarted server lost its data"
    );
    let after = |tag: &'static str| {
        (0..2u32).flat_map(move |p| tags(&format!("{tag}{p}"), 0..50).collect::<Vec<_>>())
    };
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("after{p}"), 0..50).await;
    }
    eventually(
        Duration::from_secs(20),
        "entries produced after the empty restart are forwarded",
        || async { redis.all_payloads(OUTPUT).await.len() >= 100 },
    )
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, after("after"));
    assert!(
        !stage.task.is_finished(),
        "the stage survived the lost group"
    );
    assert!(
        group_exists(&redis, 0).await && group_exists(&redis, 1).await,
        "the group was recreated on every partition"
    );

    // Still healthy: later entries flow too, and the loop is still up.
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("later{p}"), 0..50).await;
    }
    eventually(Duration::from_secs(15), "200 forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= 200
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    assert_exactly_once(
        &redis.all_payloads(OUTPUT).await,
        after("after").chain(after("later")),
    );
    assert!(!stage.task.is_finished(), "the stage is still running");
    stage.stop().await;
}

/// The stage is spawned while Redis is down: it waits (no crash, groups not ready), then
/// creates its groups and forwards everything once Redis is up.
async fn started_while_redis_is_down(mode: ConsumeMode) {
    let mut redis = TestRedis::start_with(2, true);
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("early{p}"), 0..50).await;
    }
    kill_redis(&mut redis);
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(mode), Forward::new(&config));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !stage.task.is_finished(),
        "the stage waits for Redis instead of returning"
    );
    assert!(
        !stage.stats.stages()[0].groups_ready.load(Ordering::Relaxed),
        "no group can be ready while Redis is down"
    );

    restart_redis(&mut redis);
    eventually(
        Duration::from_secs(20),
        "entries produced before the outage are forwarded",
        || async { redis.all_payloads(OUTPUT).await.len() >= 100 },
    )
    .await;
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("late{p}"), 0..50).await;
    }
    eventually(Duration::from_secs(15), "200 forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= 200
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    let expected = (0..2u32).flat_map(|p| {
        tags(&format!("early{p}"), 0..50)
            .chain(tags(&format!("late{p}"), 0..50))
            .collect::<Vec<_>>()
    });
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, expected);
    assert!(stage.stats.stages()[0].groups_ready.load(Ordering::Relaxed));
    stage.stop().await;
}

/// A graceful stop ([`Running::stop`]: cancel, then wait) while the handler is inside a
/// batch: the batch in hand is finished and committed, its outputs appended with its
/// acknowledgements; nothing is left half done, and another consumer finishes the rest
/// exactly once.
async fn stop_inside_a_batch(mode: ConsumeMode) {
    let redis = TestRedis::start_with(1, true);
    produce_with_a_slow_stretch(&redis).await;
    let config = redis.config("c1");
    let handler = Forward::new(&config).slow(Duration::from_millis(400));
    let seen = handler.seen.clone();
    let stage = spawn_stage(&config, spec(mode), handler);
    eventually(
        Duration::from_secs(10),
        "the stage is inside the slow batch",
        || async { seen.lock().unwrap().iter().any(|p| p == "slow:0") },
    )
    .await;
    stage.stop().await;

    let handled = seen.lock().unwrap().clone();
    let forwarded = redis.payloads(OUTPUT, 0).await;
    let pending = pending_payloads(&redis, 0).await;
    assert_nothing_half_done(&handled, &forwarded, &pending);
    // Redis was up: the batch in hand was finished, not abandoned.
    assert!(
        pending.is_empty(),
        "a graceful stop with Redis up leaves nothing pending: {pending:?}"
    );
    assert!(
        forwarded.iter().any(|p| p == "slow:3"),
        "the whole slow batch was committed: {forwarded:?}"
    );

    finish_with_another_consumer(&redis, mode).await;
}

/// The same stop, but Redis dies while the batch is in the handler: the batch cannot be
/// committed, the shutdown grace runs out, and every entry of it is left pending and NOT
/// forwarded, for another consumer to finish, exactly once (and in order, when owned).
async fn stop_inside_a_batch_with_redis_down(mode: ConsumeMode) {
    let mut redis = TestRedis::start_with(1, true);
    produce_with_a_slow_stretch(&redis).await;
    let mut config = redis.config("c1");
    config.stage.shutdown_grace = Duration::from_secs(1);
    let handler = Forward::new(&config).slow(Duration::from_millis(400));
    let seen = handler.seen.clone();
    let stage = spawn_stage(&config, spec(mode), handler);
    eventually(
        Duration::from_secs(10),
        "the stage is inside the slow batch",
        || async { seen.lock().unwrap().iter().any(|p| p == "slow:0") },
    )
    .await;
    kill_redis(&mut redis);
    stage.stop().await;
    restart_redis(&mut redis);

    let handled = seen.lock().unwrap().clone();
    let forwarded = redis.payloads(OUTPUT, 0).await;
    let pending = pending_payloads(&redis, 0).await;
    assert_nothing_half_done(&handled, &forwarded, &pending);
    assert!(
        pending.iter().any(|p| p == "slow:0"),
        "the uncommitted batch is still pending: {pending:?}"
    );

    finish_with_another_consumer(&redis, mode).await;
}

/// 10 fast entries, 4 slow ones, then 200 fast ones: with batches of 64 the first batch
/// holds all the slow ones, so a handler inside `slow:0` is in the middle of a batch.
async fn produce_with_a_slow_stretch(redis: &TestRedis) {
    redis.produce(INPUT, 0, "a", 0..10).await;
    redis.produce(INPUT, 0, "slow", 0..4).await;
    redis.produce(INPUT, 0, "b", 0..200).await;
}

/// Starts a second consumer that takes over what the first left and finishes everything
/// [`produce_with_a_slow_stretch`] wrote, exactly once (and in order, when owned).
async fn finish_with_another_consumer(redis: &TestRedis, mode: ConsumeMode) {
    let config = redis.config("c2");
    let c2 = spawn_stage(&config, spec(mode), Forward::new(&config));
    eventually(Duration::from_secs(20), "all 214 forwarded", || async {
        redis.payloads(OUTPUT, 0).await.len() >= 214
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.pending(INPUT, 0, GROUP).await == 0
    })
    .await;
    let expected: Vec<String> = tags("a", 0..10)
        .chain(tags("slow", 0..4))
        .chain(tags("b", 0..200))
        .collect();
    let out = redis.payloads(OUTPUT, 0).await;
    assert_exactly_once(&out, expected.clone());
    if mode == ConsumeMode::Owned {
        assert_eq!(out, expected, "owned partition left in input order");
    }
    c2.stop().await;
}

/// Every entry the handler saw is either forwarded (and so acknowledged: nothing of it is
/// pending) or still pending and not forwarded; nothing is forwarded twice or unseen.
fn assert_nothing_half_done(handled: &[String], forwarded: &[String], pending: &[String]) {
    let forwarded_set: HashSet<&str> = forwarded.iter().map(String::as_str).collect();
    assert_eq!(
        forwarded_set.len(),
        forwarded.len(),
        "something was forwarded twice: {forwarded:?}"
    );
    let pending_set: HashSet<&str> = pending.iter().map(String::as_str).collect();
    let both: Vec<&&str> = forwarded_set.intersection(&pending_set).collect();
    assert!(both.is_empty(), "forwarded AND still pending: {both:?}");
    let handled_set: HashSet<&str> = handled.iter().map(String::as_str).collect();
    let neither: Vec<&&str> = handled_set
        .iter()
        .filter(|p| !forwarded_set.contains(**p) && !pending_set.contains(**p))
        .collect();
    assert!(
        neither.is_empty(),
        "handled but neither forwarded nor pending (acknowledged without its output?): {neither:?}"
    );
    let unseen: Vec<&&str> = forwarded_set
        .iter()
        .filter(|p| !handled_set.contains(**p))
        .collect();
    assert!(unseen.is_empty(), "forwarded but never handled: {unseen:?}");
}

// ----- helpers -------------------------------------------------------------------------------

/// The `RedisServer` methods block (they poll with `std::thread::sleep`): run them without
/// stalling the runtime's workers.
fn kill_redis(redis: &mut TestRedis) {
    tokio::task::block_in_place(|| redis.server.kill());
}

fn restart_redis(redis: &mut TestRedis) {
    tokio::task::block_in_place(|| redis.server.restart());
}

fn restart_redis_empty(redis: &mut TestRedis) {
    tokio::task::block_in_place(|| redis.server.restart_empty());
}

/// Payloads of the entries of partition `partition` of the input still pending for the
/// group, in id order.
async fn pending_payloads(redis: &TestRedis, partition: Partition) -> Vec<String> {
    let key = redis.key(INPUT, partition);
    let mut conn = redis.conn().await;
    let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
        .arg(&key)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(&mut conn)
        .await;
    let ids: Vec<String> = match reply {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|item| {
                let Value::Array(parts) = item else {
                    panic!("XPENDING item {item:?}")
                };
                redis::from_redis_value(parts[0].clone()).unwrap()
            })
            .collect(),
        _ => Vec::new(),
    };
    let by_id = payloads_by_id(&mut conn, &key).await;
    ids.iter()
        .map(|id| {
            by_id
                .get(id)
                .cloned()
                .unwrap_or_else(|| panic!("pending id {id} is not in the stream"))
        })
        .collect()
}

/// Id -> payload of every entry of the stream `key`.
async fn payloads_by_id(conn: &mut MultiplexedConnection, key: &str) -> HashMap<String, String> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let Value::Array(items) = reply else {
        return HashMap::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut parts) = item else {
                return None;
            };
            let fields = parts.pop()?;
            let id: String = redis::from_redis_value(parts.pop()?).ok()?;
            Some((id, payload_of(fields)?))
        })
        .collect()
}

/// The payload of an envelope entry's flat field list.
fn payload_of(fields: Value) -> Option<String> {
    let Value::Array(flat) = fields else {
        return None;
    };
    let fields: Vec<(Vec<u8>, Vec<u8>)> = flat
        .chunks(2)
        .map(|kv| {
            Some((
                redis::from_redis_value(kv[0].clone()).ok()?,
                redis::from_redis_value(kv[1].clone()).ok()?,
            ))
        })
        .collect::<Option<_>>()?;
    let envelope =
        Envelope::from_fields(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))).ok()?;
    String::from_utf8(envelope.payload.to_vec()).ok()
}

async fn group_exists(redis: &TestRedis, partition: Partition) -> bool {
    let mut conn = redis.conn().await;
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(redis.key(INPUT, partition))
        .query_async(&mut conn)
        .await;
    match reply {
        Ok(Value::Array(groups)) => groups.iter().any(|g| {
            let Value::Array(flat) = g else { return false };
            flat.chunks(2).any(|kv| {
                redis::from_redis_value::<String>(kv[0].clone()).is_ok_and(|n| n == "name")
                    && redis::from_redis_value::<String>(kv[1].clone()).is_ok_and(|v| v == GROUP)
            })
        }),
        _ => false,
    }
}

/// Writes envelopes `"{tag}{p}:{seq}"` to every partition of the input, a few every 20 ms,
/// until stopped. It rides out outages: after any error it reconnects and resumes from the
/// last sequence number Redis actually holds, so each number is written exactly once even
/// when a reply was lost.
struct Producer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Producer {
    const CHUNK: u64 = 5;

    fn start(redis: &TestRedis, tag: &str) -> Self {
        let url = redis.server.url();
        let keys: Vec<String> = (0..redis.partitions).map(|p| redis.key(INPUT, p)).collect();
        let tag = tag.to_owned();
        let stop = CancellationToken::new();
        let task = tokio::spawn(Self::run(url, keys, tag, stop.clone()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("producer did not panic");
    }

    async fn run(url: String, keys: Vec<String>, tag: String, stop: CancellationToken) {
        let mut conn: Option<MultiplexedConnection> = None;
        let mut next = vec![0u64; keys.len()];
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if conn.is_none() {
                let Ok(mut fresh) = streams_core::testing::connect(&url).await else {
                    continue;
                };
                match Self::resync(&mut fresh, &keys).await {
                    Ok(resumed) => next = resumed,
                    Err(_) => continue,
                }
                conn = Some(fresh);
            }
            let c = conn.as_mut().expect("connected above");
            let mut failed = false;
            for (p, key) in keys.iter().enumerate() {
                let mut pipe = redis::pipe();
                for seq in next[p]..next[p] + Self::CHUNK {
                    let envelope = Envelope::new(
                        "test",
                        format!("k{p}"),
                        format!("{tag}{p}:{seq}").into_bytes(),
                    );
                    pipe.xadd(key, "*", &envelope.to_fields()).ignore();
                }
                match pipe.query_async::<()>(c).await {
                    Ok(()) => next[p] += Self::CHUNK,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                conn = None;
            }
        }
    }

    /// The next sequence number of each stream: one past its last entry's.
    async fn resync(
        conn: &mut MultiplexedConnection,
        keys: &[String],
    ) -> redis::RedisResult<Vec<u64>> {
        let mut next = Vec::with_capacity(keys.len());
        for key in keys {
            let last: Value = redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            let seq = match last {
                Value::Array(mut items) if !items.is_empty() => {
                    let Value::Array(mut parts) = items.remove(0) else {
                        panic!("XREVRANGE entry")
                    };
                    let payload = payload_of(parts.pop().unwrap_or(Value::Nil)).unwrap();
                    let seq: u64 = payload.rsplit(':').next().unwrap().parse().unwrap();
                    seq + 1
                }
                _ => 0,
            };
            next.push(seq);
        }
        Ok(next)
    }
}

/// The admin router served on a free local port.
struct Admin {
    base: String,
    client: reqwest::Client,
    task: JoinHandle<()>,
}

impl Admin {
    async fn serve(state: AdminState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            // No proxy from the environment for a local address.
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            task,
        }
    }

    async fn get(&self, path: &str) -> u16 {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `/readyz`: status and JSON body.
    async fn readyz(&self) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    fn stop(self) {
        self.task.abort();
    }
}
