//! Forwarding exactly once: the plain path, racing consumers, dead consumers, poison.

use std::time::Duration;

use redis::Value;
use streams_core::ConsumeMode;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_every_entry_once_in_partition_order() {
    let redis = TestRedis::start(4);
    for p in 0..4 {
        redis.produce(INPUT, p, &format!("p{p}"), 0..250).await;
    }
    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(
        Duration::from_secs(20),
        "1000 entries forwarded",
        || async { redis.all_payloads(OUTPUT).await.len() >= 1000 },
    )
    .await;
    for p in 0..4 {
        let out = redis.payloads(OUTPUT, p).await;
        assert_eq!(
            out,
            tags(&format!("p{p}"), 0..250).collect::<Vec<_>>(),
            "partition {p} in order"
        );
    }
    assert_eq!(redis.total_pending(INPUT, GROUP).await, 0);
    assert_eq!(stage.counters().processed, 1000);
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_racing_on_a_claimed_entry_forward_it_once() {
    let redis = TestRedis::start(1);
    // c1 takes the slow entry and is still handling it when its claim time (500 ms) passes;
    // c2 claims it and forwards it; c1's late commit must add nothing.
    let c1_config = redis.config("c1");
    let c1 = spawn_stage(
        &c1_config,
        spec(ConsumeMode::Shared),
        Forward::new(&c1_config).slow(Duration::from_millis(1500)),
    );
    redis.produce(INPUT, 0, "slow", 0..1).await;
    eventually(Duration::from_secs(5), "c1 has the entry", || async {
        redis.pending(INPUT, 0, GROUP).await == 1
    })
    .await;
    let c2_config = redis.config("c2");
    let c2 = spawn_stage(
        &c2_config,
        spec(ConsumeMode::Shared),
        Forward::new(&c2_config).slow(Duration::from_millis(1)),
    );
    eventually(
        Duration::from_secs(10),
        "both consumers committed",
        || async {
            let done = |r: &Running| {
                let c = r.counters();
                c.processed
            };
            done(&c1) >= 1 && done(&c2) >= 1
        },
    )
    .await;
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, tags("slow", 0..1));
    let skipped = c1.counters().duplicates_skipped + c2.counters().duplicates_skipped;
    assert_eq!(
        skipped, 1,
        "exactly one commit found the entry already acknowledged"
    );
    assert_eq!(c2.counters().claimed, 1);
    c1.stop().await;
    c2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_claimed_and_finished() {
    let redis = TestRedis::start(2);
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("p{p}"), 0..100).await;
    }
    // A consumer that reads entries and dies without acknowledging them.
    let mut conn = redis.conn().await;
    for p in 0..2 {
        redis.create_group(&redis.key(INPUT, p), GROUP).await;
        let _: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("dead")
            .arg("COUNT")
            .arg(40)
            .arg("STREAMS")
            .arg(redis.key(INPUT, p))
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(redis.total_pending(INPUT, GROUP).await, 80);
    let config = redis.config("alive");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(20), "all 200 forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= 200
    })
    .await;
    let expected = tags("p0", 0..100)
        .chain(tags("p1", 0..100))
        .collect::<Vec<_>>();
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, expected);
    assert_eq!(redis.total_pending(INPUT, GROUP).await, 0);
    assert_eq!(stage.counters().claimed, 80);
    stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_mid_batch_loses_and_doubles_nothing() {
    let redis = TestRedis::start(2);
    for p in 0..2 {
        redis.produce(INPUT, p, &format!("p{p}"), 0..300).await;
        redis
            .produce(INPUT, p, "slow", (p as u64) * 10..(p as u64) * 10 + 3)
            .await;
        redis.produce(INPUT, p, &format!("q{p}"), 0..300).await;
    }
    let config = redis.config("victim");
    let victim = spawn_stage(
        &config,
        spec(ConsumeMode::Shared),
        Forward::new(&config).slow(Duration::from_millis(300)),
    );
    eventually(
        Duration::from_secs(10),
        "the victim is inside a slow batch",
        || async {
            redis
                .all_payloads(OUTPUT)
                .await
                .iter()
                .any(|p| p.starts_with("p0") || p.starts_with("p1"))
                && redis.total_pending(INPUT, GROUP).await > 0
        },
    )
    .await;
    victim.kill();
    let config = redis.config("survivor");
    let survivor = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    eventually(Duration::from_secs(30), "everything forwarded", || async {
        redis.all_payloads(OUTPUT).await.len() >= 1206
    })
    .await;
    let expected: Vec<String> = (0..2u64)
        .flat_map(|p| {
            tags(&format!("p{p}"), 0..300)
                .chain(tags("slow", p * 10..p * 10 + 3))
                .chain(tags(&format!("q{p}"), 0..300))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_exactly_once(&redis.all_payloads(OUTPUT).await, expected);
    eventually(Duration::from_secs(5), "nothing pending", || async {
        redis.total_pending(INPUT, GROUP).await == 0
    })
    .await;
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_are_dead_lettered_with_their_reason_while_others_flow() {
    let redis = TestRedis::start(1);
    redis.produce(INPUT, 0, "good-a", 0..50).await;
    redis.produce(INPUT, 0, "poison", 0..1).await;
    redis.produce(INPUT, 0, "retry", 0..1).await;
    // Not an envelope at all: what a stray redis-cli XADD would write.
    let mut conn = redis.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(redis.key(INPUT, 0))
        .arg("*")
        .arg("symbol")
        .arg("AAPL")
        .arg("price")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    redis.produce(INPUT, 0, "good-b", 0..50).await;

    let config = redis.config("c1");
    let stage = spawn_stage(&config, spec(ConsumeMode::Shared), Forward::new(&config));
    let dlq = redis.dlq_key(INPUT, 0);
    eventually(Duration::from_secs(20), "three dead letters", || async {
        redis.xlen(&dlq).await >= 3
    })
    .await;
    let expected = tags("good-a", 0..50)
        .chain(tags("good-b", 0..50))
        .collect::<Vec<_>>();
    assert_exactly_once(&redis.payloads(OUTPUT, 0).await, expected);

    let dead = redis.entries(&dlq).await;
    assert_eq!(dead.len(), 3);
    let reason = |d: &std::collections::HashMap<String, Vec<u8>>| {
        String::from_utf8(d["dlq.reason"].clone()).unwrap()
    };
    let by_reason: Vec<String> = dead.iter().map(reason).collect();
    assert!(
        by_reason.iter().any(|r| r == "poison payload poison:0"),
        "{by_reason:?}"
    );
    assert!(
        by_reason
            .iter()
            .any(|r| r.starts_with("undecodable entry: missing field `h`")),
        "{by_reason:?}"
    );
    assert!(
        by_reason.iter().any(|r| r == "delivered 4 times (max 3)"),
        "{by_reason:?}"
    );
    for d in &dead {
        assert_eq!(d["dlq.group"], GROUP.as_bytes());
        assert!(d.contains_key("dlq.source_id") && d.contains_key("dlq.deliveries"));
    }
    // The original fields travel with the dead letter.
    let stray = dead
        .iter()
        .find(|d| reason(d).starts_with("undecodable"))
        .unwrap();
    assert_eq!(stray["symbol"], b"AAPL");
    assert_eq!(redis.pending(INPUT, 0, GROUP).await, 0);
    assert_eq!(stage.counters().dead_lettered, 3);
    stage.stop().await;
}

// ----- more pending entries than Lua's unpack takes (issue 17) ------------------------------

/// Entries left pending: more than the ~8,000 values Lua's `unpack` takes, so a claim or a
/// commit that put them in one argument list failed.
const MANY_PENDING: u64 = 9_000;

/// `TICKFLOW_BATCH_SIZE`'s largest value: a stage claims up to this many entries at once.
const LARGEST_BATCH: usize = 10_000;

/// A claim time no test waits for: the periodic claim of idle entries (which would also
/// finish them) stays out of the way of the recovery path under test.
const NEVER_IDLE: Duration = Duration::from_secs(3600);

/// Leaves [`MANY_PENDING`] entries of partition 0 pending to `consumer`, as a consumer that
/// read them and died would.
async fn leave_many_pending(redis: &TestRedis, consumer: &str) {
    redis.produce(INPUT, 0, "many", 0..MANY_PENDING).await;
    redis.create_group(&redis.key(INPUT, 0), GROUP).await;
    let mut conn = redis.conn().await;
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(MANY_PENDING)
        .arg("STREAMS")
        .arg(redis.key(INPUT, 0))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(redis.pending(INPUT, 0, GROUP).await, MANY_PENDING);
}

/// Starts consumer `consumer` in `mode` with the largest batch and claim time `claim_idle`
/// over what [`leave_many_pending`] left, and checks that it forwards every entry exactly
/// once and leaves nothing pending, with no failed commit. Returns the stage's counters.
async fn recover_many_pending(
    redis: &TestRedis,
    mode: ConsumeMode,
    consumer: &str,
    claim_idle: Duration,
) -> streams_core::stats::StageCounters {
    let mut config = redis.config(consumer);
    config.stage.batch_size = LARGEST_BATCH;
    config.stage.claim_idle = claim_idle;
    let stage = spawn_stage(&config, spec(mode), Forward::new(&config));
    eventually(
        Duration::from_secs(30),
        "every pending entry forwarded",
        || async { redis.payloads(OUTPUT, 0).await.len() as u64 >= MANY_PENDING },
    )
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        redis.pending(INPUT, 0, GROUP).await == 0
    })
    .await;
    assert_exactly_once(
        &redis.payloads(OUTPUT, 0).await,
        tags("many", 0..MANY_PENDING),
    );
    let counters = stage.counters();
    assert_eq!(counters.failed, 0, "no commit failed");
    assert_eq!(counters.processed, MANY_PENDING);
    stage.stop().await;
    counters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_the_largest_batch_claims_9000_idle_entries_of_a_dead_consumer() {
    // XAUTOCLAIM of entries idle longer than the claim time, from any consumer.
    let redis = TestRedis::start(1);
    leave_many_pending(&redis, "dead").await;
    let claim_idle = redis.config("alive").stage.claim_idle;
    let counters = recover_many_pending(&redis, ConsumeMode::Shared, "alive", claim_idle).await;
    assert_eq!(counters.claimed, MANY_PENDING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_the_largest_batch_restarted_with_9000_entries_of_its_own_pending_finishes_them()
 {
    // XPENDING and XCLAIM of the consumer's own entries, at start.
    let redis = TestRedis::start(1);
    leave_many_pending(&redis, "c1").await;
    let counters = recover_many_pending(&redis, ConsumeMode::Shared, "c1", NEVER_IDLE).await;
    assert_eq!(counters.claimed, 0, "none left for the idle claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_stage_with_the_largest_batch_takes_over_a_partition_with_9000_pending() {
    // XAUTOCLAIM with no idle time, fenced by the lease, when the partition is acquired.
    let redis = TestRedis::start(1);
    leave_many_pending(&redis, "dead").await;
    recover_many_pending(&redis, ConsumeMode::Owned, "alive", NEVER_IDLE).await;
}

// ----- a backlog over many partitions (TICKFLOW_READ_BUDGET) --------------------------------

/// [`Forward`], and the size of each partition's share of each batch it handled (what
/// [`Handler::batch_effects`] closes): what a stage held at once.
struct CountingBatches {
    inner: Forward,
    open: std::collections::BTreeMap<streams_core::Partition, u64>,
    shares: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl streams_core::Handler for CountingBatches {
    async fn handle(
        &mut self,
        delivery: &streams_core::Delivery,
        out: &mut streams_core::Outputs,
    ) -> Result<(), streams_core::HandlerError> {
        *self.open.entry(delivery.partition).or_default() += 1;
        self.inner.handle(delivery, out).await
    }

    fn batch_effects(
        &mut self,
        partition: streams_core::Partition,
        _out: &mut streams_core::Outputs,
    ) {
        let n = self.open.remove(&partition).unwrap_or(0);
        self.shares.lock().unwrap().push(n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_16_partitions_is_read_within_the_read_budget() {
    // 16 partitions holding 300 entries each when the stage starts: with a batch size of
    // 256, a read over all 16 took 256 from each (and the top-up read as many again); the
    // read budget (1,024 over 16 partitions: 64 each) bounds a partition's share of a batch
    // to the two reads' 64 + 64.
    const PARTITIONS: u32 = 16;
    const EACH: u64 = 300;
    let redis = TestRedis::start(PARTITIONS);
    for p in 0..PARTITIONS {
        redis.create_group(&redis.key(INPUT, p), GROUP).await;
        redis.produce(INPUT, p, &format!("p{p}"), 0..EACH).await;
    }
    let mut config = redis.config("reader");
    config.stage.batch_size = 256;
    config.stage.read_budget = 1024;
    let per_read = config.stage.read_count(PARTITIONS as usize);
    assert_eq!(per_read, 64);
    for mode in [ConsumeMode::Shared, ConsumeMode::Owned] {
        let shares = std::sync::Arc::default();
        let output_before: u64 = {
            let mut n = 0;
            for p in 0..PARTITIONS {
                n += redis.payloads(OUTPUT, p).await.len() as u64;
            }
            n
        };
        if output_before > 0 {
            // Second mode: the same backlog again.
            for p in 0..PARTITIONS {
                redis.produce(INPUT, p, &format!("again{p}"), 0..EACH).await;
            }
        }
        let handler = CountingBatches {
            inner: Forward::new(&config),
            open: Default::default(),
            shares: std::sync::Arc::clone(&shares),
        };
        let stage = spawn_stage(&config, spec(mode), handler);
        eventually(Duration::from_secs(30), "the backlog forwarded", || async {
            let mut n = 0;
            for p in 0..PARTITIONS {
                n += redis.payloads(OUTPUT, p).await.len() as u64;
            }
            n >= output_before + u64::from(PARTITIONS) * EACH
        })
        .await;
        stage.stop().await;
        let shares = shares.lock().unwrap().clone();
        let largest = shares.iter().copied().max().unwrap_or(0);
        assert!(
            largest <= 2 * per_read as u64,
            "{mode:?}: a partition's share of a batch was {largest} entries (at most {} allowed)",
            2 * per_read
        );
        assert_eq!(
            shares.iter().sum::<u64>(),
            u64::from(PARTITIONS) * EACH,
            "{mode:?}: every entry handled once"
        );
    }
    for p in 0..PARTITIONS {
        let tag = format!("p{p}");
        let again = format!("again{p}");
        assert_exactly_once(
            &redis.payloads(OUTPUT, p).await,
            tags(&tag, 0..EACH).chain(tags(&again, 0..EACH)),
        );
    }
}
