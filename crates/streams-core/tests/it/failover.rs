//! Owned partitions across a Redis Cluster failover, on a real local cluster (3 masters, a
//! replica each): the master serving a partition dies after its replication was cut, so
//! that what it took after the cut (a lease, commits) is missing from the replica promoted
//! in its place.
//!
//! - A lease the promoted replica never received: another consumer takes the partition
//!   there, and the former holder, still running and mid-batch, can commit nothing more
//!   (every commit checks the lease token in the same call, on the master that applies it).
//! - A lease that survived, but commits that did not: the holder keeps the partition, and
//!   must not go on from the state it had in memory (what Redis lost is handled again, and
//!   would be counted twice).
//!
//! Each with `TICKFLOW_WAIT_REPLICAS=0` and `=1`.

use std::time::Duration;

use redis::{AsyncCommands, Value};
use streams_core::{
    Config, ConsumeMode, Envelope, Redis,
    config::RedisMode,
    connection::Connection,
    testing::{RedisCluster, unique_namespace},
};

use crate::support::*;

/// How long the replica stays frozen after the cut: the master is killed well within it,
/// and it is promoted only after it wakes.
const FROZEN: Duration = Duration::from_secs(6);
/// Leases that outlive the failover: a lease is gone from the promoted replica because it
/// was never replicated, not because it expired.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// A Redis Cluster and a namespace of its own, with one partition.
struct TestCluster {
    cluster: RedisCluster,
    namespace: String,
    redis: Redis,
}

impl TestCluster {
    fn start() -> Self {
        let cluster = RedisCluster::start();
        let redis = Redis::new_cluster(&cluster.seeds()).unwrap();
        Self {
            cluster,
            namespace: unique_namespace("failover"),
            redis,
        }
    }

    /// Consumer `consumer`'s configuration: cluster mode, one partition, batches of 4,
    /// leases of [`LEASE_TTL`], commits waiting for `wait_replicas`.
    fn config(&self, consumer: &str, wait_replicas: u32) -> Config {
        let mut config = Config::for_tests(&self.cluster.seeds(), &self.namespace, 1);
        config.redis_mode = RedisMode::Cluster;
        config.consumer_name = consumer.to_owned();
        config.wait_replicas = wait_replicas;
        config.wait_timeout = Duration::from_millis(500);
        config.stage.batch_size = 4;
        config.stage.lease_ttl = LEASE_TTL;
        config
    }

    fn key(&self, stream: &str) -> String {
        self.config("x", 0).keys.stream(stream, 0)
    }

    async fn conn(&self) -> Connection {
        self.redis.pooled().await.unwrap().clone()
    }

    /// Appends envelopes with `payloads` to partition 0 of the input.
    async fn produce(&self, payloads: &[String]) {
        let mut pipe = redis::pipe();
        for payload in payloads {
            let fields = Envelope::new("test", "k0", payload.clone().into_bytes()).to_fields();
            pipe.xadd(self.key(INPUT), "*", &fields).ignore();
        }
        let _: () = pipe.query_async(&mut self.conn().await).await.unwrap();
    }

    /// Waits until the partition's replica has everything its master has now: a write
    /// of our own to the partition's slot, then `WAIT 1` (which counts the replicas that
    /// have the master's stream up to that write).
    async fn replicated(&self) {
        let probe = self.config("x", 0).keys.partition_state(GROUP, "probe", 0);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&probe).arg(1).ignore();
        pipe.cmd("WAIT").arg(1).arg(2_000);
        let (replicas,): (u32,) = pipe.query_async(&mut self.conn().await).await.unwrap();
        assert_eq!(replicas, 1, "the partition's replica is attached");
    }

    /// Every payload of partition 0 of the output, in stream order.
    async fn outputs(&self) -> Vec<String> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(self.key(OUTPUT))
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        streams_core::parse_entries(reply)
            .unwrap()
            .into_iter()
            .map(|entry| {
                let envelope = Envelope::from_fields(
                    entry
                        .fields
                        .iter()
                        .map(|(n, v)| (n.as_slice(), v.as_slice())),
                )
                .expect("an envelope");
                String::from_utf8(envelope.payload.to_vec()).unwrap()
            })
            .collect()
    }

    /// Entries of the input pending in the group.
    async fn pending(&self) -> u64 {
        let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(self.key(INPUT))
            .arg(GROUP)
            .query_async(&mut self.conn().await)
            .await;
        match reply {
            Ok(Value::Array(parts)) => redis::from_redis_value(parts[0].clone()).unwrap_or(0),
            _ => u64::MAX,
        }
    }

    /// Who holds partition 0's lease (the consumer part of its value).
    async fn lease_holder(&self) -> Option<String> {
        let lease = self.config("x", 0).keys.lease(GROUP, 0);
        let value: Option<String> = self.conn().await.get(lease).await.unwrap();
        value.map(|v| v.split('#').next().unwrap_or_default().to_owned())
    }

    /// The count [`Tally`] stored for partition 0.
    async fn stored_tally(&self) -> Option<u64> {
        let key = Tally::key(&self.config("x", 0).keys, 0);
        self.conn().await.get(key).await.unwrap()
    }

    /// Cuts replication from the partition's master to its replica for [`FROZEN`].
    fn cut(&self) -> (u16, u16) {
        tokio::task::block_in_place(|| self.cluster.cut_replication(&self.key(INPUT), FROZEN))
    }

    /// Kills `master`, waits for its replica's promotion, starts `master` again (it comes
    /// back as the new master's replica, so that commits waiting for a replica can be
    /// confirmed again) and waits until the cluster is whole.
    fn fail_over(&mut self, master: u16, replica: u16) {
        let key = self.key(INPUT);
        tokio::task::block_in_place(|| {
            self.cluster.kill_node(master);
            self.cluster.wait_until_stable();
            assert_eq!(
                self.cluster.node_for_key(&key),
                replica,
                "the replica took over"
            );
            self.cluster.restart_node(master);
            self.cluster.wait_until_stable();
        });
    }
}

/// Consumer `a` takes partition 0 on its master M after M's replication was cut: its lease
/// never reaches the replica, nor do the commits it makes under it. With 4-entry batches
/// and a slow entry ninth, `a` is mid-batch when M is SIGKILLed (with `WAIT 0` it has
/// committed two batches on M, and is in the slow entry's handler; with `WAIT 1` its
/// first commit, never confirmed, is being retried). The replica is promoted without the
/// lease, and `b` starts and takes the partition there. `a`'s commit, when it comes, must
/// be refused (fenced) and `a` drop the partition; every entry is forwarded once, in
/// order.
async fn a_lease_lost_in_a_failover_fences_its_former_holder(wait_replicas: u32) {
    let mut c = TestCluster::start();
    let expected: Vec<String> = tags("t", 0..8)
        .chain(tags("slow", 0..1))
        .chain(tags("u", 0..7))
        .collect();
    c.produce(&expected).await;
    c.replicated().await;
    let (master, replica) = c.cut();

    // "c2" sorts after "c1": once b ("c1") is a member, the partition is b's. The slow
    // entry keeps a in its handler until well after b has taken the partition.
    let a_config = c.config("c2", wait_replicas);
    let a_handler = Forward::new(&a_config).slow(Duration::from_secs(12));
    let a = spawn_stage(&a_config, spec(ConsumeMode::Owned), a_handler.clone());
    let what = if wait_replicas == 0 {
        "a is in the slow entry, two batches committed on the master"
    } else {
        "a has handled its first batch"
    };
    eventually(Duration::from_secs(10), what, || async {
        let seen = a_handler.seen.lock().unwrap();
        if wait_replicas == 0 {
            seen.iter().any(|s| s.starts_with("slow"))
        } else {
            seen.len() >= 4
        }
    })
    .await;
    let committed = a.counters().processed;
    if wait_replicas == 0 {
        assert_eq!(committed, 8, "two batches committed on the master");
    } else {
        // Its commit waits 500 ms for the replica, is not confirmed, and is retried.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(a.counters().processed, 0, "nothing confirmed after the cut");
    }
    assert_eq!(c.lease_holder().await.as_deref(), Some("c2"));

    let key = c.key(INPUT);
    tokio::task::block_in_place(|| {
        c.cluster.kill_node(master);
        c.cluster.wait_until_stable();
        assert_eq!(
            c.cluster.node_for_key(&key),
            replica,
            "the replica took over"
        );
    });
    let b_config = c.config("c1", wait_replicas);
    let b = spawn_stage(&b_config, spec(ConsumeMode::Owned), Forward::new(&b_config));
    // Back as the new master's replica, so that commits waiting for one are confirmed.
    tokio::task::block_in_place(|| {
        c.cluster.restart_node(master);
        c.cluster.wait_until_stable();
    });

    eventually(
        Duration::from_secs(30),
        "every entry forwarded and acknowledged",
        || async { c.outputs().await.len() >= expected.len() && c.pending().await == 0 },
    )
    .await;
    eventually(Duration::from_secs(20), "a's commit refused", || async {
        a.counters().fenced > 0
    })
    .await;
    assert_eq!(
        c.outputs().await,
        expected,
        "every entry forwarded once, in order"
    );
    let counters = a.counters();
    assert!(
        counters.fenced >= 4,
        "a's batch in hand refused whole: {counters:?}"
    );
    let events = a_handler.events.lock().unwrap().clone();
    assert_eq!(
        events[..2],
        ["+0", "-0"],
        "a dropped the partition: {events:?}"
    );
    eventually(Duration::from_secs(20), "b holds the lease", || async {
        c.lease_holder().await.as_deref() == Some("c1")
    })
    .await;
    assert!(b.counters().processed > 0, "{:?}", b.counters());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_0_a_lease_lost_in_a_failover_fences_its_former_holder() {
    a_lease_lost_in_a_failover_fences_its_former_holder(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_1_a_lease_lost_in_a_failover_fences_its_former_holder() {
    a_lease_lost_in_a_failover_fences_its_former_holder(1).await;
}

/// Consumer `a` holds partition 0 under a lease the replica has (leases outlive the
/// failover). It counts entries ([`Tally`]) and stores the count with each commit. Four
/// entries are committed and replicated; a slow fifth is delivered and replicated; then
/// replication is cut while `a` handles it, four more entries come in, and the master
/// dies. The promoted replica has the count of four, the fifth entry pending, and neither
/// the later entries nor any commit after the cut. `a` keeps the partition there: it must
/// count the fifth entry once more on top of four, not on top of what it had in memory
/// (with `WAIT 0` it had committed nine on the lost master; with `WAIT 1` none of that
/// was confirmed, and it retried).
async fn commits_lost_in_a_failover_are_not_counted_twice(wait_replicas: u32) {
    let mut c = TestCluster::start();
    let config = c.config("a", wait_replicas);
    let handler = Tally::new(&config, Redis::new_cluster(&c.cluster.seeds()).unwrap())
        .slow(Duration::from_millis(2_500));
    let seen = handler.seen.clone();
    let a = spawn_stage(&config, spec(ConsumeMode::Owned), handler);
    c.produce(&tags("t", 0..4).collect::<Vec<_>>()).await;
    eventually(Duration::from_secs(10), "four entries counted", || async {
        c.stored_tally().await == Some(4)
    })
    .await;
    c.produce(&tags("slow", 0..1).collect::<Vec<_>>()).await;
    eventually(
        Duration::from_secs(10),
        "a is in the slow entry",
        || async { seen.lock().unwrap().iter().any(|s| s.starts_with("slow")) },
    )
    .await;
    // The lease, the count of four and the slow entry's delivery are on the replica.
    c.replicated().await;
    let (master, replica) = c.cut();
    c.produce(&tags("t", 4..8).collect::<Vec<_>>()).await;
    if wait_replicas == 0 {
        eventually(
            Duration::from_secs(10),
            "nine counted on the master",
            || async { c.stored_tally().await == Some(9) },
        )
        .await;
    } else {
        // The slow entry's commit is not confirmed, and retried.
        tokio::time::sleep(Duration::from_millis(3_500)).await;
    }
    c.fail_over(master, replica);

    let survivors: Vec<String> = tags("t", 0..4).chain(tags("slow", 0..1)).collect();
    eventually(
        Duration::from_secs(30),
        "the surviving entries forwarded and acknowledged",
        || async { c.outputs().await.len() >= survivors.len() && c.pending().await == 0 },
    )
    .await;
    // Time for a sweep (every 250 ms) to have handled anything left.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.outputs().await, survivors, "forwarded once, in order");
    assert_eq!(
        c.stored_tally().await,
        Some(survivors.len() as u64),
        "each surviving entry counted once (handled: {:?})",
        seen.lock().unwrap()
    );
    assert_eq!(c.lease_holder().await.as_deref(), Some("a"));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_0_commits_lost_in_a_failover_are_not_counted_twice() {
    commits_lost_in_a_failover_are_not_counted_twice(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_1_commits_lost_in_a_failover_are_not_counted_twice() {
    commits_lost_in_a_failover_are_not_counted_twice(1).await;
}
