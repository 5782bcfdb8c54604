//! Shared helpers of the integration tests: a real redis-server per test, a key namespace
//! per test, a forwarding handler with switches for failures, and polling helpers.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{AsyncCommands, Value};
use streams_core::{
    Config, ConsumeMode, Delivery, Envelope, Handler, HandlerError, InputFormat, Inputs, Outputs,
    Partition, Redis, Stage, StageSpec, Stats,
    testing::{RedisOptions, RedisServer, unique_namespace},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The logical input and output streams of the test stage.
pub(crate) const INPUT: &str = "in";
pub(crate) const OUTPUT: &str = "out";
pub(crate) const GROUP: &str = "fwd";

/// A redis-server and a namespace of its own.
pub(crate) struct TestRedis {
    pub(crate) server: RedisServer,
    pub(crate) namespace: String,
    pub(crate) partitions: u32,
}

impl TestRedis {
    pub(crate) fn start(partitions: u32) -> Self {
        Self::start_with(partitions, false)
    }

    pub(crate) fn start_with(partitions: u32, aof: bool) -> Self {
        Self {
            server: RedisServer::start_with(RedisOptions { aof }),
            namespace: unique_namespace("it"),
            partitions,
        }
    }

    /// A test configuration for consumer `consumer`.
    pub(crate) fn config(&self, consumer: &str) -> Config {
        let mut config = Config::for_tests(&self.server.url(), &self.namespace, self.partitions);
        config.consumer_name = consumer.to_owned();
        config
    }

    pub(crate) fn redis(&self) -> Redis {
        Redis::new(&self.server.url(), 4).unwrap()
    }

    pub(crate) async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.server.connect().await
    }

    pub(crate) fn key(&self, stream: &str, partition: Partition) -> String {
        self.config("x").keys.stream(stream, partition)
    }

    pub(crate) fn dlq_key(&self, stream: &str, partition: Partition) -> String {
        self.config("x").keys.dead_letter(stream, partition)
    }

    /// Appends envelopes whose payloads are `"{tag}:{seq}"` for `seq` in `seqs`, to
    /// partition `partition` of `stream`.
    pub(crate) async fn produce(
        &self,
        stream: &str,
        partition: Partition,
        tag: &str,
        seqs: std::ops::Range<u64>,
    ) {
        let mut conn = self.conn().await;
        let key = self.key(stream, partition);
        let mut pipe = redis::pipe();
        for seq in seqs {
            let envelope = Envelope::new(
                "test",
                format!("k{partition}"),
                format!("{tag}:{seq}").into_bytes(),
            );
            let fields: Vec<(&str, Vec<u8>)> = envelope.to_fields();
            pipe.xadd(&key, "*", &fields).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }

    /// Every payload in partition `partition` of `stream`, in stream order.
    pub(crate) async fn payloads(&self, stream: &str, partition: Partition) -> Vec<String> {
        let key = self.key(stream, partition);
        self.entries(&key)
            .await
            .into_iter()
            .map(|fields| String::from_utf8(payload_of(&fields)).unwrap())
            .collect()
    }

    /// All payloads of every partition of `stream`.
    pub(crate) async fn all_payloads(&self, stream: &str) -> Vec<String> {
        let mut all = Vec::new();
        for p in 0..self.partitions {
            all.extend(self.payloads(stream, p).await);
        }
        all
    }

    /// Every entry of the Redis stream `key` as a field map.
    pub(crate) async fn entries(&self, key: &str) -> Vec<HashMap<String, Vec<u8>>> {
        let mut conn = self.conn().await;
        let reply: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(items) = reply else {
            return Vec::new();
        };
        items
            .into_iter()
            .map(|item| {
                let Value::Array(parts) = item else {
                    panic!("entry")
                };
                let Value::Array(flat) = &parts[1] else {
                    panic!("fields")
                };
                flat.chunks(2)
                    .map(|kv| {
                        let name: String = redis::from_redis_value(kv[0].clone()).unwrap();
                        let value: Vec<u8> = redis::from_redis_value(kv[1].clone()).unwrap();
                        (name, value)
                    })
                    .collect()
            })
            .collect()
    }

    /// Pending entries of `group` on partition `partition` of `stream`.
    pub(crate) async fn pending(&self, stream: &str, partition: Partition, group: &str) -> u64 {
        let mut conn = self.conn().await;
        let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(self.key(stream, partition))
            .arg(group)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(Value::Array(parts)) => redis::from_redis_value(parts[0].clone()).unwrap_or(0),
            _ => 0,
        }
    }

    pub(crate) async fn total_pending(&self, stream: &str, group: &str) -> u64 {
        let mut total = 0;
        for p in 0..self.partitions {
            total += self.pending(stream, p, group).await;
        }
        total
    }

    /// Creates consumer group `group` of `key` (and the stream), reading from its start.
    pub(crate) async fn create_group(&self, key: &str, group: &str) {
        let mut conn = self.conn().await;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    pub(crate) async fn xlen(&self, key: &str) -> u64 {
        let mut conn = self.conn().await;
        conn.xlen(key).await.unwrap()
    }
}

/// The payload of an envelope entry given as a field map.
pub(crate) fn payload_of(fields: &HashMap<String, Vec<u8>>) -> Vec<u8> {
    let envelope = Envelope::from_fields(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())))
        .expect("an envelope");
    envelope.payload.to_vec()
}

/// What the forwarding handler does with a payload, by its content.
/// - contains `poison`: permanent error (dead-lettered at once);
/// - contains `retry`: retryable error, always (dead-lettered after max deliveries);
/// - contains `slow`: sleeps `slow_for` first;
/// - otherwise: appended unchanged to partition p of `out`.
#[derive(Clone)]
pub(crate) struct Forward {
    pub(crate) namespace_config: Config,
    pub(crate) slow_for: Duration,
    pub(crate) seen: Arc<Mutex<Vec<String>>>,
    pub(crate) events: Arc<Mutex<Vec<String>>>,
}

impl Forward {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            namespace_config: config.clone(),
            slow_for: Duration::from_millis(0),
            seen: Arc::default(),
            events: Arc::default(),
        }
    }

    pub(crate) fn slow(mut self, slow_for: Duration) -> Self {
        self.slow_for = slow_for;
        self
    }
}

impl Handler for Forward {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let envelope = delivery.envelope.as_ref().expect("envelope stage");
        let payload = String::from_utf8_lossy(&envelope.payload).into_owned();
        self.seen.lock().unwrap().push(payload.clone());
        if payload.contains("poison") {
            return Err(HandlerError::Permanent(format!("poison payload {payload}")));
        }
        if payload.contains("retry") {
            return Err(HandlerError::Retry("asked to retry".into()));
        }
        if payload.contains("slow") {
            tokio::time::sleep(self.slow_for).await;
        }
        let next = envelope.derive("forwarded", envelope.payload.clone());
        out.append(
            self.namespace_config
                .keys
                .stream(OUTPUT, delivery.partition),
            &next,
        );
        Ok(())
    }

    async fn partition_acquired(&mut self, partition: Partition) -> Result<(), HandlerError> {
        self.events.lock().unwrap().push(format!("+{partition}"));
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        self.events.lock().unwrap().push(format!("-{partition}"));
    }
}

/// A running stage task and the token that stops it.
pub(crate) struct Running {
    pub(crate) task: JoinHandle<streams_core::error::Result<()>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stats: Stats,
}

impl Running {
    /// Graceful stop: cancel and wait for the loop to return.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("stage stops within its grace period")
            .expect("stage task did not panic")
            .expect("stage returned Ok");
    }

    /// A crash: the task is aborted wherever it is, nothing is finished or released.
    pub(crate) fn kill(self) {
        self.task.abort();
    }

    pub(crate) fn counters(&self) -> streams_core::stats::StageCounters {
        self.stats.stages()[0].counters()
    }
}

pub(crate) fn spec(mode: ConsumeMode) -> StageSpec {
    StageSpec {
        group: GROUP.into(),
        inputs: Inputs::Partitioned(INPUT.into()),
        mode,
        format: InputFormat::Envelope,
    }
}

/// Starts a stage task for `handler` with `config`.
pub(crate) fn spawn_stage<H: Handler>(config: &Config, spec: StageSpec, handler: H) -> Running {
    let shutdown = CancellationToken::new();
    let stats = Stats::default();
    let redis = Redis::from_config(config).unwrap();
    let stage = Stage::new(spec, handler, redis, config, &stats, shutdown.clone());
    Running {
        task: tokio::spawn(stage.run()),
        shutdown,
        stats,
    }
}

/// Polls `check` every 20 ms until it is true; panics with `what` after `timeout`.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that `payloads` holds each of `expected` exactly once (and nothing else).
pub(crate) fn assert_exactly_once(payloads: &[String], expected: impl IntoIterator<Item = String>) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    let expected: Vec<String> = expected.into_iter().collect();
    let doubled: Vec<_> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(p, c)| format!("{p} x{c}"))
        .collect();
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !counts.contains_key(e.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} entries, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(payloads.len(), expected.len(), "unexpected extra entries");
}

pub(crate) fn tags(tag: &str, seqs: std::ops::Range<u64>) -> impl Iterator<Item = String> + '_ {
    seqs.map(move |s| format!("{tag}:{s}"))
}

/// A stateful handler, as the engine is: per partition, how many entries it has counted,
/// held in memory, stored whole with each commit, loaded when the partition is acquired.
/// Every entry is also forwarded, so the order it was handled in shows. A payload with
/// `slow` in it takes `slow_for` to handle.
#[derive(Clone)]
pub(crate) struct Tally {
    keys: streams_core::KeySpace,
    redis: Redis,
    counts: HashMap<Partition, u64>,
    touched: std::collections::BTreeSet<Partition>,
    slow_for: Duration,
    /// Every payload handed to the handler, in order.
    pub(crate) seen: Arc<Mutex<Vec<String>>>,
}

impl Tally {
    pub(crate) fn new(config: &Config, redis: Redis) -> Self {
        Self {
            keys: config.keys.clone(),
            redis,
            counts: HashMap::new(),
            touched: Default::default(),
            slow_for: Duration::ZERO,
            seen: Arc::default(),
        }
    }

    pub(crate) fn slow(mut self, slow_for: Duration) -> Self {
        self.slow_for = slow_for;
        self
    }

    /// Where partition `partition`'s count is stored.
    pub(crate) fn key(keys: &streams_core::KeySpace, partition: Partition) -> String {
        keys.partition_state(GROUP, "tally", partition)
    }
}

impl Handler for Tally {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let envelope = delivery.envelope.as_ref().expect("envelope stage");
        let payload = String::from_utf8_lossy(&envelope.payload).into_owned();
        self.seen.lock().unwrap().push(payload.clone());
        if payload.contains("slow") {
            tokio::time::sleep(self.slow_for).await;
        }
        *self.counts.entry(delivery.partition).or_default() += 1;
        self.touched.insert(delivery.partition);
        out.append(
            self.keys.stream(OUTPUT, delivery.partition),
            &envelope.derive("forwarded", envelope.payload.clone()),
        );
        Ok(())
    }

    async fn partition_acquired(&mut self, partition: Partition) -> Result<(), HandlerError> {
        let mut conn = self
            .redis
            .pooled()
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        let stored: Option<u64> = conn
            .get(Self::key(&self.keys, partition))
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        self.counts.insert(partition, stored.unwrap_or(0));
        Ok(())
    }

    fn partition_released(&mut self, partition: Partition) {
        self.counts.remove(&partition);
        self.touched.remove(&partition);
    }

    fn batch_effects(&mut self, partition: Partition, out: &mut Outputs) {
        if self.touched.remove(&partition) {
            let count = self.counts.get(&partition).copied().unwrap_or(0);
            out.command(
                "SET",
                Self::key(&self.keys, partition),
                vec![count.to_string().into_bytes()],
            );
        }
    }
}
