//! The stage loop: read a batch through a consumer group, hand each entry to a [`Handler`],
//! then acknowledge the batch and append its outputs in one script call (ACK_FORWARD, for
//! every partition in the batch), sent ahead of the next read on the loop's connection.
//!
//! A stage is a [`StageSpec`] (which streams, which group, shared or owned partitions, the
//! input format) plus a [`Handler`]; [`Stage::run`] drives it until shutdown. Everything
//! that can go wrong between reading and acknowledging is handled here, once:
//!
//! - **Exactly-once forwarding.** An entry's outputs are appended in the same script call
//!   that acknowledges it, and only if that XACK removed it from the pending list.
//! - **Recovery.** On start a consumer re-handles its own pending entries; every
//!   `claim_idle / 2` it claims entries other consumers left idle (XAUTOCLAIM).
//! - **Poison entries** (undecodable, rejected by the handler, or delivered more than
//!   `max_deliveries` times) go to the partition's dead-letter stream with the reason,
//!   atomically with their acknowledgement.
//! - **Outages.** Computed outputs are kept and the script call retried until Redis answers
//!   (or the shutdown grace ends); a vanished group is recreated.
//! - **Owned partitions** ([`ConsumeMode::Owned`]): see [`crate::ownership`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use opentelemetry::trace::TraceContextExt;
use redis::{Cmd, Value, aio::MultiplexedConnection};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    config::{Config, StageTuning},
    connection::Redis,
    envelope::{Envelope, now_micros},
    error::{Result, StreamsError},
    keys::{KeySpace, Partition},
    ownership::{Ownership, OwnershipChanges},
    scripts::{self, FENCED, RawEntry, as_int, as_string, parse_entries, scripts},
    stats::{StageStats, Stats},
};

/// How a stage's replicas share the partitions of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeMode {
    /// Every consumer reads every partition through the group: the fastest way when the
    /// order of events does not matter.
    Shared,
    /// Each partition is read by exactly one consumer at a time, holding a lease; events of
    /// one partition leave the stage in the order they entered it, across crashes and
    /// rebalancing.
    Owned,
}

/// What a stage's input entries are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// tickflow [`Envelope`]s; an entry that is not one is dead-lettered.
    Envelope,
    /// Arbitrary flat fields, as an outside producer XADDs them.
    Raw,
}

/// Which streams a stage reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// Every partition of a logical tickflow stream.
    Partitioned(String),
    /// Streams named outside tickflow's key layout (one partition each, in order), such as
    /// an `ingest_stream` that other programs XADD to. Each gets `<key>:dlq`.
    External(Vec<String>),
}

/// A stage's shape: its group, its inputs, how replicas share them, and the input format.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// The consumer group, also the stage's name in metrics and admin status.
    pub group: String,
    /// The streams it consumes.
    pub inputs: Inputs,
    /// Shared or owned partitions.
    pub mode: ConsumeMode,
    /// Envelopes or raw fields.
    pub format: InputFormat,
}

/// One input entry handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The input partition (for [`Inputs::External`], the stream's index).
    pub partition: Partition,
    /// The Redis key of the stream it was read from.
    pub stream: Arc<str>,
    /// Its stream id.
    pub id: String,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
    /// Its fields as read.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// The decoded envelope ([`InputFormat::Envelope`] stages only).
    pub envelope: Option<Envelope>,
}

impl Delivery {
    /// The value of field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// Why a handler could not handle an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// It may work later (a dependency is down): the entry stays pending and is delivered
    /// again; after `max_deliveries` it is dead-lettered.
    #[error("retryable: {0}")]
    Retry(String),
    /// It can never work (corrupt payload, ...): the entry is dead-lettered with this reason.
    #[error("{0}")]
    Permanent(String),
}

/// What handling one entry produces; applied atomically with the entry's acknowledgement.
#[derive(Debug, Default)]
pub struct Outputs {
    ops: Vec<Op>,
}

#[derive(Debug)]
enum Op {
    /// XADD an envelope (encoded straight into the script call).
    AppendEnvelope { key: String, envelope: Envelope },
    /// XADD arbitrary fields (dead letters).
    Append {
        key: String,
        fields: Vec<(Cow<'static, [u8]>, Vec<u8>)>,
    },
    Command {
        name: &'static str,
        key: String,
        args: Vec<Vec<u8>>,
    },
}

impl Op {
    /// The key the op writes.
    fn key(&self) -> &str {
        match self {
            Op::AppendEnvelope { key, .. } | Op::Append { key, .. } | Op::Command { key, .. } => {
                key
            }
        }
    }
}

impl Outputs {
    /// Append `envelope` to the stream `key` (from [`KeySpace::stream`]).
    /// The entry carries the trace context of the span handling the input (when traced),
    /// so the next stage continues the trace.
    pub fn append(&mut self, key: impl Into<String>, envelope: &Envelope) {
        let mut envelope = envelope.clone();
        if let Some((traceparent, tracestate)) =
            crate::trace_context::headers_of(&tracing::Span::current())
        {
            envelope.traceparent = Some(traceparent);
            envelope.tracestate = tracestate;
        }
        self.ops.push(Op::AppendEnvelope {
            key: key.into(),
            envelope,
        });
    }

    /// Run `name key args...` (e.g. `HINCRBY`) if and only if the entry is acknowledged now.
    /// The key should share the input partition's hash tag.
    pub fn command(&mut self, name: &'static str, key: impl Into<String>, args: Vec<Vec<u8>>) {
        self.ops.push(Op::Command {
            name,
            key: key.into(),
            args,
        });
    }

    /// How many effects there are.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A stage's logic. It is called for one entry at a time, in the order read.
pub trait Handler: Send + Sync + 'static {
    /// Handle one entry, pushing what it produces into `out`. On error `out` is discarded.
    fn handle(
        &mut self,
        delivery: &Delivery,
        out: &mut Outputs,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// This consumer now owns `partition` (owned mode), before any of its entries arrive.
    /// A stateful stage loads the partition's state here.
    fn partition_acquired(
        &mut self,
        _partition: Partition,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// This consumer no longer owns `partition`; state held for it is stale from now on.
    fn partition_released(&mut self, _partition: Partition) {}

    /// Called once per partition after a batch's entries were handled, before the commit:
    /// effects pushed here (e.g. a snapshot of the partition's state) are applied in the
    /// same script call, if any entry of the batch is acknowledged by it.
    fn batch_effects(&mut self, _partition: Partition, _out: &mut Outputs) {}
}

/// A resolved input stream.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) partition: Partition,
    /// The logical stream (or external key) it is a partition of.
    pub(crate) logical: Arc<str>,
    pub(crate) stream: Arc<str>,
    pub(crate) dead_letter: String,
    pub(crate) lease: String,
}

impl StageSpec {
    /// The Redis keys this stage reads, with their dead-letter and lease keys.
    pub(crate) fn sources(&self, keys: &KeySpace) -> Vec<Source> {
        match &self.inputs {
            Inputs::Partitioned(logical) => keys
                .all_partitions()
                .map(|p| Source {
                    partition: p,
                    logical: logical.as_str().into(),
                    stream: keys.stream(logical, p).into(),
                    dead_letter: keys.dead_letter(logical, p),
                    lease: keys.lease(&self.group, p),
                })
                .collect(),
            Inputs::External(streams) => streams
                .iter()
                .enumerate()
                .map(|(i, key)| Source {
                    partition: i as Partition,
                    logical: key.as_str().into(),
                    stream: key.as_str().into(),
                    dead_letter: format!("{key}:dlq"),
                    lease: format!("{key}:lease:{}", self.group),
                })
                .collect(),
        }
    }
}

/// A runnable stage: spec, handler, Redis, tuning and the shutdown signal.
pub struct Stage<H> {
    spec: StageSpec,
    handler: H,
    redis: Redis,
    keys: KeySpace,
    consumer: String,
    tuning: StageTuning,
    shutdown: CancellationToken,
    stats: Arc<StageStats>,
    sources: Vec<Source>,
    source_by_key: HashMap<Arc<str>, usize>,
    metrics: StageMetrics,
}

/// The metrics a stage records for every batch, registered once (not looked up, labels
/// and all, per batch).
struct StageMetrics {
    batch_size: metrics::Histogram,
    handler_duration: metrics::Histogram,
    ack_forward_duration: metrics::Histogram,
    /// `tickflow_events_processed_total` of each source.
    processed: Vec<metrics::Counter>,
}

impl StageMetrics {
    fn new(group: &str, sources: &[Source]) -> Self {
        // The recorder must exist before handles are taken (it is installed once).
        crate::telemetry::install_metrics();
        let group = group.to_owned();
        Self {
            batch_size: metrics::histogram!("tickflow_batch_size", "stage" => group.clone()),
            handler_duration: metrics::histogram!("tickflow_handler_duration_seconds", "stage" => group.clone()),
            ack_forward_duration: metrics::histogram!("tickflow_ack_forward_duration_seconds", "stage" => group.clone()),
            processed: sources
                .iter()
                .map(|s| metrics::counter!("tickflow_events_processed_total", "stage" => group.clone(), "partition" => s.partition.to_string()))
                .collect(),
        }
    }
}

impl<H> std::fmt::Debug for Stage<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("spec", &self.spec)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// One entry read and waiting to be handled.
struct Pending {
    source: usize,
    entry: RawEntry,
    deliveries: u32,
    /// Its source's entries in this batch came from two reads (see `read_group`).
    merged: bool,
}

/// Entries of one partition to acknowledge, with their effects.
#[derive(Default)]
struct Commit {
    entries: Vec<(String, Vec<Op>)>,
    /// Effects of the whole batch (Handler::batch_effects).
    batch_ops: Vec<Op>,
    /// Span contexts of the traced entries: the commit span's parent and links.
    traces: Vec<opentelemetry::trace::SpanContext>,
    processed: u64,
    dead_lettered: u64,
    /// The entries came from two reads of the stream: the commit checks for a gap.
    merged: bool,
}

impl<H: Handler> Stage<H> {
    /// A stage for `spec` that will run `handler`, registered in `stats` for admin status.
    pub fn new(
        spec: StageSpec,
        handler: H,
        redis: Redis,
        config: &Config,
        stats: &Stats,
        shutdown: CancellationToken,
    ) -> Self {
        let sources = spec.sources(&config.keys);
        let source_by_key = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.stream.clone(), i))
            .collect();
        let stage_stats = stats.register(&spec, &config.keys);
        let metrics = StageMetrics::new(&spec.group, &sources);
        Self {
            spec,
            handler,
            redis,
            keys: config.keys.clone(),
            consumer: config.consumer_name.clone(),
            tuning: config.stage.clone(),
            shutdown,
            stats: stage_stats,
            sources,
            source_by_key,
            metrics,
        }
    }

    /// Runs until the shutdown token is cancelled, then finishes the batch in hand (within
    /// the grace period) and returns. Redis outages are waited out, never returned.
    pub async fn run(mut self) -> Result<()> {
        tracing::info!(
            group = %self.spec.group,
            consumer = %self.consumer,
            mode = ?self.spec.mode,
            inputs = self.sources.len(),
            "stage starting"
        );
        let maintenance = tokio::spawn(crate::maintenance::run(
            self.redis.clone(),
            self.spec.group.clone(),
            self.consumer.clone(),
            self.sources.clone(),
            self.tuning.clone(),
            self.stats.clone(),
            self.shutdown.clone(),
        ));
        self.ensure_groups().await;
        let result = match self.spec.mode {
            ConsumeMode::Shared => self.run_shared().await,
            ConsumeMode::Owned => self.run_owned().await,
        };
        let _ = maintenance.await;
        tracing::info!(group = %self.spec.group, consumer = %self.consumer, "stage stopped");
        result
    }

    // ----- shared mode -------------------------------------------------------------------

    async fn run_shared(&mut self) -> Result<()> {
        let all: Vec<usize> = (0..self.sources.len()).collect();
        // Our own pending entries first: what a previous run of this consumer left.
        for source in all.clone() {
            self.drain_pending(source, ClaimMode::Own, None).await;
        }
        let mut reader: Option<MultiplexedConnection> = None;
        let claim_every = (self.tuning.claim_idle / 2).max(Duration::from_millis(50));
        let mut next_claim = Instant::now() + claim_every;
        // A batch read while the previous one was being committed.
        let mut prefetched: Option<Result<Vec<Pending>>> = None;
        while !self.shutdown.is_cancelled() {
            if Instant::now() >= next_claim {
                for source in all.clone() {
                    self.drain_pending(source, ClaimMode::Idle, None).await;
                }
                next_claim = Instant::now() + claim_every;
            }
            let read = match prefetched.take() {
                Some(read) => read,
                None => self.read_group(&mut reader, &all).await,
            };
            match read {
                Ok(batch) if !batch.is_empty() => {
                    let handled = self.handle(batch).await;
                    let no_tokens = HashMap::new();
                    let (_, next) = self
                        .commit_and_read_ahead(handled, &no_tokens, &mut reader, &all)
                        .await;
                    prefetched = next;
                }
                Ok(_) => {}
                Err(e) => self.on_read_error(e, &mut reader).await,
            }
        }
        // Entries read ahead are pending to this consumer: finish them within the grace.
        if let Some(Ok(batch)) = prefetched.take()
            && !batch.is_empty()
        {
            self.process(batch, &HashMap::new()).await;
        }
        Ok(())
    }

    /// Commits a handled batch while reading the next one, so that Redis runs the commit
    /// while this process parses and handles, and the reverse. The next batch is handled
    /// only after this commit returned, so each partition's outputs keep their order. No
    /// read ahead once shutdown began.
    async fn commit_and_read_ahead(
        &self,
        handled: Handled,
        tokens: &HashMap<usize, String>,
        reader: &mut Option<MultiplexedConnection>,
        sources: &[usize],
    ) -> (ProcessOutcome, Option<Result<Vec<Pending>>>) {
        if self.shutdown.is_cancelled() {
            return (self.commit_handled(handled, tokens, None).await, None);
        }
        if reader.is_none() {
            // An error here is the read's to report; the commit goes through the pool.
            *reader = self.redis.dedicated(self.tuning.block).await.ok();
        }
        // The commit goes out on the reading connection just ahead of the read, so one
        // write carries both and Redis reads one socket; its reply comes first.
        let on_reader = reader.clone();
        let (outcome, read) = tokio::join!(
            self.commit_handled(handled, tokens, on_reader),
            self.read_group(reader, sources)
        );
        (outcome, Some(read))
    }

    /// `XREADGROUP … BLOCK` over `sources` on the loop's dedicated connection.
    async fn read_group(
        &self,
        reader: &mut Option<MultiplexedConnection>,
        sources: &[usize],
    ) -> Result<Vec<Pending>> {
        if reader.is_none() {
            *reader = Some(self.redis.dedicated(self.tuning.block).await?);
        }
        let conn = reader.as_mut().expect("connected above");
        let read = |block: bool| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.spec.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(self.tuning.batch_size);
            if block {
                cmd.arg("BLOCK").arg(self.tuning.block.as_millis() as u64);
            }
            cmd.arg("STREAMS");
            for &source in sources {
                cmd.arg(&*self.sources[source].stream);
            }
            for _ in sources {
                cmd.arg(">");
            }
            cmd
        };
        if sources.len() == 1 {
            let reply: Value = read(true).query_async(conn).await?;
            self.stats.mark_ready(true);
            return self.parse_read_reply(reply);
        }
        // Redis (7.0) answers a read blocked on several streams with the entries of the one
        // stream that woke it. A second read that does not block, sent with it, runs right
        // after it and takes what the other streams hold by then, so one wake-up brings the
        // whole of what an upstream batch wrote, without another round trip.
        let mut pipe = redis::pipe();
        pipe.add_command(read(true)).add_command(read(false));
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        self.stats.mark_ready(true);
        let mut replies = replies.into_iter();
        let mut batch = self.parse_read_reply(replies.next().unwrap_or(Value::Nil))?;
        let more = self.parse_read_reply(replies.next().unwrap_or(Value::Nil))?;
        if !more.is_empty() {
            // A source in both reads may have a gap between them (an entry another consumer
            // read meanwhile), which its commit must check for.
            let first: BTreeSet<usize> = batch.iter().map(|p| p.source).collect();
            let twice: BTreeSet<usize> = more
                .iter()
                .map(|p| p.source)
                .filter(|s| first.contains(s))
                .collect();
            batch.extend(more);
            if !twice.is_empty() {
                for pending in &mut batch {
                    pending.merged = twice.contains(&pending.source);
                }
            }
        }
        Ok(batch)
    }

    fn parse_read_reply(&self, reply: Value) -> Result<Vec<Pending>> {
        let mut batch = Vec::new();
        for (key, entries) in scripts::parse_read_reply(reply)? {
            let Some(&source) = self.source_by_key.get(key.as_str()) else {
                continue;
            };
            batch.extend(entries.into_iter().map(|entry| Pending {
                source,
                entry,
                deliveries: 1,
                merged: false,
            }));
        }
        Ok(batch)
    }

    async fn on_read_error(
        &mut self,
        error: StreamsError,
        reader: &mut Option<MultiplexedConnection>,
    ) {
        if error.is_no_group() {
            tracing::warn!(group = %self.spec.group, "consumer group vanished (Redis restarted empty?); recreating it");
            self.stats.groups_ready.store(false, Ordering::Relaxed);
            self.ensure_groups().await;
            return;
        }
        *reader = None;
        self.stats.mark_ready(false);
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tickflow_redis_reconnects_total", "stage" => self.spec.group.clone())
            .increment(1);
        tracing::warn!(group = %self.spec.group, error = %error, "read failed; reconnecting");
        self.backoff(Duration::from_millis(200)).await;
    }

    // ----- owned mode --------------------------------------------------------------------

    async fn run_owned(&mut self) -> Result<()> {
        let ownership = Ownership::start(
            self.redis.clone(),
            &self.keys,
            &self.spec.group,
            &self.consumer,
            self.sources
                .iter()
                .map(|s| (s.partition, s.lease.clone()))
                .collect(),
            self.tuning.lease_ttl,
            self.shutdown.clone(),
        );
        // Partitions this loop reads now, with their fencing tokens.
        let mut active: BTreeMap<usize, String> = BTreeMap::new();
        // Partitions whose pending entries must be handled before new ones (after taking a
        // partition over, or after a retryable failure), with when to try.
        let mut needs_drain: BTreeMap<usize, Instant> = BTreeMap::new();
        let mut reader: Option<MultiplexedConnection> = None;
        let sweep_every = (self.tuning.claim_idle / 2).max(Duration::from_millis(50));
        let mut next_sweep = Instant::now() + sweep_every;
        let mut prefetched: Option<Result<Vec<Pending>>> = None;
        while !self.shutdown.is_cancelled() {
            let changes =
                ownership.changes(&active.keys().map(|&s| self.sources[s].partition).collect());
            self.apply_ownership_changes(&ownership, changes, &mut active, &mut needs_drain)
                .await;
            let now = Instant::now();
            let due: Vec<usize> = needs_drain
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(s, _)| *s)
                .collect();
            for source in due {
                needs_drain.remove(&source);
                // The drain claims whatever is pending, read-ahead entries included: they
                // must not be handled a second time from the read-ahead.
                if let Some(Ok(batch)) = &mut prefetched {
                    batch.retain(|p| p.source != source);
                }
                let Some(token) = active.get(&source).cloned() else {
                    continue;
                };
                match self
                    .drain_pending(source, ClaimMode::Takeover, Some(&token))
                    .await
                {
                    DrainOutcome::Done => {}
                    DrainOutcome::Halted => {
                        needs_drain.insert(source, Instant::now() + Duration::from_millis(200));
                    }
                    DrainOutcome::Stale => {
                        if self.reload(&ownership, source, &mut active).await {
                            needs_drain.insert(source, Instant::now() + Duration::from_millis(20));
                        }
                    }
                    DrainOutcome::Fenced => self.lose(&ownership, source, &mut active),
                }
            }
            let readable: BTreeMap<usize, String> = active
                .iter()
                .filter(|(s, _)| !needs_drain.contains_key(s))
                .map(|(s, t)| (*s, t.clone()))
                .collect();
            if readable.is_empty() {
                tokio::select! {
                    _ = ownership.changed() => {}
                    _ = self.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.tuning.block.min(Duration::from_millis(200))) => {}
                }
                continue;
            }
            if Instant::now() >= next_sweep {
                // Leftovers (a read whose reply was lost, a commit that failed for good)
                // would otherwise wait for the next commit's order check.
                for &source in readable.keys() {
                    needs_drain.entry(source).or_insert_with(Instant::now);
                }
                next_sweep = Instant::now() + sweep_every;
                continue;
            }
            let sources: Vec<usize> = readable.keys().copied().collect();
            let read = match prefetched.take() {
                // Entries read ahead of partitions no longer readable (lost, or waiting for
                // older entries to be drained) stay pending; the drain takes them in order.
                Some(read) => read.map(|batch| {
                    batch
                        .into_iter()
                        .filter(|p| readable.contains_key(&p.source))
                        .collect()
                }),
                None => tokio::select! {
                    read = self.read_group(&mut reader, &sources) => read,
                    _ = ownership.changed() => {
                        // Dropping a blocked read may leave entries delivered to it pending:
                        // the order check and the sweep hand them back, in order.
                        reader = None;
                        continue;
                    }
                },
            };
            match read {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    let tokens: HashMap<usize, String> = readable.into_iter().collect();
                    let handled = self.handle(batch).await;
                    let (outcome, next) = self
                        .commit_and_read_ahead(handled, &tokens, &mut reader, &sources)
                        .await;
                    prefetched = next;
                    for source in outcome.stale.iter().copied() {
                        if !self.reload(&ownership, source, &mut active).await {
                            needs_drain.remove(&source);
                        }
                    }
                    for source in outcome.halted.into_iter().chain(outcome.stale) {
                        if active.contains_key(&source) {
                            needs_drain
                                .entry(source)
                                .or_insert_with(|| Instant::now() + Duration::from_millis(20));
                        }
                    }
                    for source in outcome.fenced {
                        self.lose(&ownership, source, &mut active);
                    }
                }
                Err(e) if e.is_no_group() => {
                    self.stats.groups_ready.store(false, Ordering::Relaxed);
                    self.ensure_groups().await;
                }
                Err(e) => self.on_read_error(e, &mut reader).await,
            }
        }
        // Entries read ahead of partitions still held: finish them within the grace.
        if let Some(Ok(batch)) = prefetched.take() {
            let batch: Vec<Pending> = batch
                .into_iter()
                .filter(|p| active.contains_key(&p.source) && !needs_drain.contains_key(&p.source))
                .collect();
            if !batch.is_empty() {
                let tokens: HashMap<usize, String> =
                    active.iter().map(|(s, t)| (*s, t.clone())).collect();
                self.process(batch, &tokens).await;
            }
        }
        for source in std::mem::take(&mut active).into_keys() {
            self.handler
                .partition_released(self.sources[source].partition);
        }
        // Releases every lease the manager holds (renewed until now, so the last batch could
        // still commit), including any taken while that batch was in hand.
        ownership.stop().await;
        Ok(())
    }

    async fn apply_ownership_changes(
        &mut self,
        ownership: &Ownership,
        changes: OwnershipChanges,
        active: &mut BTreeMap<usize, String>,
        needs_drain: &mut BTreeMap<usize, Instant>,
    ) {
        for partition in changes.lost {
            if let Some(source) = self.source_index(partition) {
                self.lose(ownership, source, active);
            }
        }
        for partition in changes.to_release {
            let Some(source) = self.source_index(partition) else {
                continue;
            };
            if let Some(token) = active.remove(&source) {
                needs_drain.remove(&source);
                self.handler.partition_released(partition);
                ownership.release(partition, &token).await;
                tracing::info!(group = %self.spec.group, partition, "partition handed over");
            }
        }
        for (partition, token) in changes.acquired {
            let Some(source) = self.source_index(partition) else {
                continue;
            };
            if active.remove(&source).is_some() {
                // Lost and taken again since the loop last looked: the old ownership ended.
                needs_drain.remove(&source);
                self.handler.partition_released(partition);
            }
            match self.handler.partition_acquired(partition).await {
                Ok(()) => {
                    tracing::info!(group = %self.spec.group, partition, "partition acquired");
                    active.insert(source, token);
                    needs_drain.insert(source, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(group = %self.spec.group, partition, error = %e, "could not take partition; releasing it");
                    ownership.release(partition, &token).await;
                }
            }
        }
    }

    /// Reloads the handler's state of an owned partition whose commit did not go through
    /// (refused for older pending entries, or failed): what it handled in that batch is in
    /// its state but not in Redis, and will be handled again. False if the partition had to
    /// be given up (its state could not be loaded).
    async fn reload(
        &mut self,
        ownership: &Ownership,
        source: usize,
        active: &mut BTreeMap<usize, String>,
    ) -> bool {
        let partition = self.sources[source].partition;
        let Some(token) = active.get(&source).cloned() else {
            return false;
        };
        self.handler.partition_released(partition);
        match self.handler.partition_acquired(partition).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(group = %self.spec.group, partition, error = %e, "could not reload the partition's state; releasing it");
                active.remove(&source);
                ownership.release(partition, &token).await;
                false
            }
        }
    }

    fn lose(&mut self, ownership: &Ownership, source: usize, active: &mut BTreeMap<usize, String>) {
        let partition = self.sources[source].partition;
        if let Some(token) = active.remove(&source) {
            tracing::warn!(group = %self.spec.group, partition, "lease lost; dropping partition");
            self.handler.partition_released(partition);
            // Only the lease this token named: the manager may hold a newer one already.
            ownership.forget(partition, &token);
        }
    }

    fn source_index(&self, partition: Partition) -> Option<usize> {
        self.sources.iter().position(|s| s.partition == partition)
    }

    // ----- recovery ----------------------------------------------------------------------

    /// Claims and handles pending entries of one source until none are left (or, in
    /// owned mode, until one cannot be handled yet).
    async fn drain_pending(
        &mut self,
        source: usize,
        mode: ClaimMode,
        token: Option<&str>,
    ) -> DrainOutcome {
        let mut cursor = "0-0".to_owned();
        let tokens: HashMap<usize, String> = token
            .map(|t| HashMap::from([(source, t.to_owned())]))
            .unwrap_or_default();
        loop {
            if self.shutdown.is_cancelled() {
                return DrainOutcome::Halted;
            }
            let claimed = match self.claim(source, mode, &cursor, token).await {
                Ok(claimed) => claimed,
                Err(StreamsError::Fenced { .. }) => return DrainOutcome::Fenced,
                Err(e) if e.is_no_group() => {
                    self.ensure_groups().await;
                    return DrainOutcome::Halted;
                }
                Err(e) => {
                    tracing::warn!(group = %self.spec.group, error = %e, "claiming pending entries failed");
                    return DrainOutcome::Halted;
                }
            };
            if !claimed.batch.is_empty() {
                if mode == ClaimMode::Idle {
                    self.stats
                        .claimed
                        .fetch_add(claimed.batch.len() as u64, Ordering::Relaxed);
                    metrics::counter!("tickflow_claimed_total", "stage" => self.spec.group.clone())
                        .increment(claimed.batch.len() as u64);
                }
                let outcome = self.process(claimed.batch, &tokens).await;
                if !outcome.fenced.is_empty() {
                    return DrainOutcome::Fenced;
                }
                if !outcome.stale.is_empty() {
                    return DrainOutcome::Stale;
                }
                if !outcome.halted.is_empty() {
                    return DrainOutcome::Halted;
                }
            }
            if claimed.next == "0-0" {
                return DrainOutcome::Done;
            }
            cursor = claimed.next;
        }
    }

    async fn claim(
        &mut self,
        source: usize,
        mode: ClaimMode,
        cursor: &str,
        token: Option<&str>,
    ) -> Result<Claimed> {
        let src = &self.sources[source];
        let min_idle = match mode {
            ClaimMode::Idle => self.tuning.claim_idle.as_millis() as u64,
            ClaimMode::Own | ClaimMode::Takeover => 0,
        };
        let lease_key = if token.is_some() {
            src.lease.as_str()
        } else {
            &*src.stream
        };
        let mut conn = self.redis.pooled().await?;
        let reply = scripts()
            .claim
            .run(
                &mut *conn,
                &[&*src.stream, lease_key],
                &[
                    self.spec.group.as_str(),
                    self.consumer.as_str(),
                    &min_idle.to_string(),
                    cursor,
                    &self.tuning.batch_size.to_string(),
                    token.unwrap_or(""),
                    if mode == ClaimMode::Own {
                        "own"
                    } else {
                        "auto"
                    },
                ],
            )
            .await
            .map_err(|e| fenced_or(e, src.partition))?;
        let Value::Array(mut parts) = reply else {
            return Err(scripts::protocol("claim reply", &reply));
        };
        if parts.len() != 3 {
            return Err(StreamsError::Protocol("claim reply without 3 parts".into()));
        }
        let counts = parts.pop().unwrap_or(Value::Nil);
        let entries = parse_entries(parts.pop().unwrap_or(Value::Nil))?;
        let next = as_string(parts.pop().unwrap_or(Value::Nil))?;
        let counts: Vec<i64> = match counts {
            Value::Array(values) => values.iter().map(as_int).collect::<Result<_>>()?,
            _ => Vec::new(),
        };
        let batch = entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| Pending {
                merged: false,
                source,
                entry,
                deliveries: counts.get(i).copied().unwrap_or(1).max(1) as u32,
            })
            .collect();
        Ok(Claimed { next, batch })
    }

    // ----- handling and committing -------------------------------------------------------

    /// Handles a batch in order and commits it. `tokens` holds the fencing token of each
    /// owned source (empty in shared mode).
    async fn process(
        &mut self,
        batch: Vec<Pending>,
        tokens: &HashMap<usize, String>,
    ) -> ProcessOutcome {
        let handled = self.handle(batch).await;
        self.commit_handled(handled, tokens, None).await
    }

    /// Handles a batch in order: what to commit per source, and the sources halted.
    async fn handle(&mut self, batch: Vec<Pending>) -> Handled {
        let started = Instant::now();
        let owned = self.spec.mode == ConsumeMode::Owned;
        let mut commits: BTreeMap<usize, Commit> = BTreeMap::new();
        let mut halted: BTreeSet<usize> = BTreeSet::new();
        let mut failed = 0u64;
        let batch_len = batch.len();
        for pending in batch {
            if halted.contains(&pending.source) {
                continue;
            }
            let src = &self.sources[pending.source];
            let mut delivery = Delivery {
                partition: src.partition,
                stream: src.stream.clone(),
                id: pending.entry.id,
                deliveries: pending.deliveries,
                fields: pending.entry.fields,
                envelope: None,
            };
            let verdict = if delivery.deliveries > self.tuning.max_deliveries {
                Err(format!(
                    "delivered {} times (max {})",
                    delivery.deliveries, self.tuning.max_deliveries
                ))
            } else if self.spec.format == InputFormat::Envelope {
                match Envelope::from_fields(
                    delivery
                        .fields
                        .iter()
                        .map(|(n, v)| (n.as_slice(), v.as_slice())),
                ) {
                    Ok(envelope) => {
                        delivery.envelope = Some(envelope);
                        Ok(())
                    }
                    Err(e) => Err(format!("undecodable entry: {e}")),
                }
            } else {
                Ok(())
            };
            let mut outputs = Outputs::default();
            let span = self.entry_span(&delivery);
            let verdict = match verdict {
                Ok(()) => match self
                    .handler
                    .handle(&delivery, &mut outputs)
                    .instrument(span.clone())
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(HandlerError::Permanent(reason)) => Err(reason),
                    Err(HandlerError::Retry(reason)) => {
                        failed += 1;
                        metrics::counter!("tickflow_events_failed_total", "stage" => self.spec.group.clone(), "partition" => delivery.partition.to_string())
                            .increment(1);
                        tracing::debug!(group = %self.spec.group, id = %delivery.id, %reason, "handler asked for a retry");
                        if owned {
                            // Later entries of this partition must wait for this one.
                            halted.insert(pending.source);
                        }
                        continue;
                    }
                },
                Err(reason) => Err(reason),
            };
            let commit = commits.entry(pending.source).or_default();
            commit.merged |= pending.merged;
            let span_context = span.context().span().span_context().clone();
            if span_context.is_valid() && commit.traces.len() < 128 {
                commit.traces.push(span_context);
            }
            match verdict {
                Ok(()) => {
                    commit.processed += 1;
                    commit.entries.push((delivery.id, outputs.ops));
                }
                Err(reason) => {
                    tracing::warn!(group = %self.spec.group, id = %delivery.id, stream = %delivery.stream, %reason, "dead-lettering entry");
                    commit.dead_lettered += 1;
                    let op = self.dead_letter_op(pending.source, &delivery, &reason);
                    commit.entries.push((delivery.id, vec![op]));
                }
            }
        }
        for (source, commit) in commits.iter_mut() {
            if commit.processed > 0 {
                let mut batch = Outputs::default();
                self.handler
                    .batch_effects(self.sources[*source].partition, &mut batch);
                commit.batch_ops = batch.ops;
            }
        }
        Handled {
            commits,
            halted,
            failed,
            batch_len,
            duration: started.elapsed(),
        }
    }

    /// Commits a handled batch and records its metrics.
    async fn commit_handled(
        &self,
        handled: Handled,
        tokens: &HashMap<usize, String>,
        reader: Option<MultiplexedConnection>,
    ) -> ProcessOutcome {
        let Handled {
            commits,
            halted,
            failed,
            batch_len,
            duration,
        } = handled;
        let commit_started = Instant::now();
        let committed = self.commit_all(commits, tokens, reader).await;
        self.metrics.batch_size.record(batch_len as f64);
        self.metrics.handler_duration.record(duration.as_secs_f64());
        self.metrics
            .ack_forward_duration
            .record(commit_started.elapsed().as_secs_f64());
        if failed > 0 {
            self.stats.failed.fetch_add(failed, Ordering::Relaxed);
        }
        ProcessOutcome {
            halted: halted.into_iter().collect(),
            fenced: committed.fenced,
            stale: committed.stale,
        }
    }

    /// The span an entry is handled in (OpenTelemetry messaging conventions), a child of
    /// the context the entry carries. Disabled, and free, unless tracing is on.
    fn entry_span(&self, delivery: &Delivery) -> tracing::Span {
        // A trace its root decided not to sample gets no span here either (a parent-based
        // sampler would drop it, after building it): the outputs carry the entry's context
        // on, unchanged, and the cost of a span per entry is saved.
        if let Some(traceparent) = delivery
            .envelope
            .as_ref()
            .and_then(|e| e.traceparent.as_deref())
            && !crate::trace_context::is_sampled(traceparent)
        {
            return tracing::Span::none();
        }
        let source = self
            .sources
            .iter()
            .find(|s| s.partition == delivery.partition)
            .map_or("", |s| &*s.logical);
        let span = tracing::debug_span!(
            "process",
            otel.name = %format_args!("process {source}"),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation.type = "process",
            messaging.destination.name = %delivery.stream,
            messaging.destination.partition.id = delivery.partition,
            messaging.message.id = %delivery.id,
            messaging.consumer.group.name = %self.spec.group,
            messaging.message.delivery_count = delivery.deliveries,
        );
        if let Some(envelope) = &delivery.envelope {
            crate::trace_context::set_parent(&span, envelope);
        } else {
            // A raw entry (an external producer's flat fields) may carry W3C fields too.
            let text = |name| {
                delivery
                    .field(name)
                    .and_then(|v| std::str::from_utf8(v).ok())
            };
            crate::trace_context::set_parent_from(&span, text("traceparent"), text("tracestate"));
        }
        crate::trace_context::stamp(&span);
        span
    }

    fn dead_letter_op(&self, source: usize, delivery: &Delivery, reason: &str) -> Op {
        let mut fields: Vec<(Cow<'static, [u8]>, Vec<u8>)> = delivery
            .fields
            .iter()
            .map(|(n, v)| (Cow::Owned(n.clone()), v.clone()))
            .collect();
        let meta: [(&'static str, Vec<u8>); 6] = [
            ("dlq.reason", reason.as_bytes().to_vec()),
            ("dlq.group", self.spec.group.as_bytes().to_vec()),
            (
                "dlq.deliveries",
                delivery.deliveries.to_string().into_bytes(),
            ),
            ("dlq.source_id", delivery.id.as_bytes().to_vec()),
            ("dlq.stream", delivery.stream.as_bytes().to_vec()),
            ("dlq.at_us", now_micros().to_string().into_bytes()),
        ];
        fields.extend(
            meta.into_iter()
                .map(|(n, v)| (Cow::Borrowed(n.as_bytes()), v)),
        );
        Op::Append {
            key: self.sources[source].dead_letter.clone(),
            fields,
        }
    }

    /// Commits every partition's entries in one script call (several for a batch larger
    /// than [`MAX_ENTRIES_PER_CALL`], pipelined), retrying through outages. The first try
    /// goes on `reader` when given (the read loop's connection, ahead of its next read);
    /// retries go through the pool. Returns the sources whose lease was lost or whose older
    /// entries must be handled first.
    async fn commit_all(
        &self,
        commits: BTreeMap<usize, Commit>,
        tokens: &HashMap<usize, String>,
        mut reader: Option<MultiplexedConnection>,
    ) -> CommitOutcome {
        let mut outcome = CommitOutcome::default();
        let mut remaining: Vec<(usize, Commit)> = commits.into_iter().collect();
        let mut delay = Duration::from_millis(50);
        let mut grace_deadline: Option<Instant> = None;
        while !remaining.is_empty() {
            let calls = calls_of(&remaining);
            let results: Vec<Result<Vec<SourceReply>>> = match reader.take() {
                // The script only by its SHA: a NOSCRIPT is retried through the pool, not
                // behind the blocking read queued on this connection.
                Some(conn) => {
                    self.commit_calls(conn, &remaining, &calls, tokens, false)
                        .await
                }
                None => match self.redis.pooled().await {
                    Ok(conn) => {
                        let conn: crate::connection::Connection = conn.clone();
                        self.commit_calls(conn, &remaining, &calls, tokens, true)
                            .await
                    }
                    Err(e) => calls
                        .iter()
                        .map(|_| Err(StreamsError::Pool(e.to_string())))
                        .collect(),
                },
            };
            let mut retry = Vec::new();
            let mut last_error = None;
            let mut retry_now = true;
            let mut remaining_iter = remaining.into_iter();
            for (range, result) in calls.into_iter().zip(results) {
                let part: Vec<(usize, Commit)> =
                    remaining_iter.by_ref().take(range.len()).collect();
                match result {
                    Ok(replies) => {
                        for ((source, commit), reply) in part.into_iter().zip(replies) {
                            self.settle(source, commit, reply, &mut outcome);
                        }
                    }
                    Err(e) if e.is_no_script() => retry.extend(part),
                    Err(e) if e.is_transient() => {
                        last_error = Some(e);
                        retry_now = false;
                        retry.extend(part);
                    }
                    Err(e) => {
                        // Not an outage: a logic or data error. The entries stay pending and
                        // will be claimed again; max deliveries bounds the repetition.
                        let entries: usize = part.iter().map(|(_, c)| c.entries.len()).sum();
                        self.stats
                            .failed
                            .fetch_add(entries as u64, Ordering::Relaxed);
                        tracing::error!(group = %self.spec.group, error = %e, "ack-and-forward failed");
                        outcome.stale.extend(part.iter().map(|(source, _)| *source));
                    }
                }
            }
            remaining = retry;
            if remaining.is_empty() || retry_now {
                continue;
            }
            self.stats.mark_ready(false);
            let error = last_error.map(|e| e.to_string()).unwrap_or_default();
            if self.shutdown.is_cancelled() {
                let deadline = *grace_deadline
                    .get_or_insert_with(|| Instant::now() + self.tuning.shutdown_grace);
                if Instant::now() >= deadline {
                    tracing::warn!(group = %self.spec.group, error, entries = remaining.iter().map(|(_, c)| c.entries.len()).sum::<usize>(),
                        "shutdown grace over with Redis unreachable; unfinished entries stay pending for a peer to claim");
                    break;
                }
            }
            tracing::warn!(group = %self.spec.group, error, retry_in = ?delay, "ack-and-forward failed; keeping the outputs and retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
        outcome
    }

    /// The calls of one commit attempt on `conn`, sent together.
    async fn commit_calls<C>(
        &self,
        conn: C,
        remaining: &[(usize, Commit)],
        calls: &[std::ops::Range<usize>],
        tokens: &HashMap<usize, String>,
        load_script: bool,
    ) -> Vec<Result<Vec<SourceReply>>>
    where
        C: redis::aio::ConnectionLike + Clone + Send,
    {
        futures::future::join_all(calls.iter().map(|range| {
            let mut conn = conn.clone();
            let part = &remaining[range.clone()];
            async move { self.commit_call(&mut conn, part, tokens, load_script).await }
        }))
        .await
    }

    /// What one source's part of a commit came to.
    fn settle(
        &self,
        source: usize,
        commit: Commit,
        reply: SourceReply,
        outcome: &mut CommitOutcome,
    ) {
        match reply {
            SourceReply::Acked(acked) => self.record_commit(source, &commit, acked),
            SourceReply::Fenced => outcome.fenced.push(source),
            SourceReply::OutOfOrder => outcome.stale.push(source),
            SourceReply::Failed(error) => {
                // An effect command failed (a key of another type, ...): what came before it
                // is done, the rest stays pending and will be claimed again.
                self.stats
                    .failed
                    .fetch_add(commit.entries.len() as u64, Ordering::Relaxed);
                tracing::error!(group = %self.spec.group, partition = self.sources[source].partition, %error, "ack-and-forward failed");
                outcome.stale.push(source);
            }
        }
    }

    /// One ACK_FORWARD call for `part`'s sources; a reply per source, in order.
    async fn commit_call(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        part: &[(usize, Commit)],
        tokens: &HashMap<usize, String>,
        load_script: bool,
    ) -> Result<Vec<SourceReply>> {
        let call = CommitCall::new(&self.sources, part, tokens);
        let span = tracing::debug_span!(
            "ack_forward",
            otel.name = "EVALSHA ack_forward",
            otel.kind = "client",
            db.system = "redis",
            db.operation.name = "EVALSHA",
            messaging.destination.name = %self.sources[part[0].0].logical,
            messaging.batch.message_count = call.entries,
        );
        let mut traces = part.iter().flat_map(|(_, c)| &c.traces);
        if let Some(first) = traces.next() {
            let _ = span
                .set_parent(opentelemetry::Context::new().with_remote_span_context(first.clone()));
            for other in traces.take(127) {
                span.add_link(other.clone());
            }
        }
        let fill = |cmd: &mut Cmd| call.fill(cmd, &self.spec.group);
        let script = &scripts().ack_forward;
        let reply = if load_script {
            script
                .run_with(conn, call.keys.len(), fill)
                .instrument(span)
                .await?
        } else {
            script
                .run_loaded(conn, call.keys.len(), fill)
                .instrument(span)
                .await?
        };
        parse_commit_reply(reply, part.len())
    }

    fn record_commit(&self, source: usize, commit: &Commit, acked: Vec<bool>) {
        let duplicates = acked.iter().filter(|a| !**a).count() as u64;
        let partition = || self.sources[source].partition.to_string();
        let group = || self.spec.group.clone();
        self.stats
            .processed
            .fetch_add(commit.processed, Ordering::Relaxed);
        self.stats
            .dead_lettered
            .fetch_add(commit.dead_lettered, Ordering::Relaxed);
        self.stats
            .duplicates_skipped
            .fetch_add(duplicates, Ordering::Relaxed);
        self.metrics.processed[source].increment(commit.processed);
        if commit.dead_lettered > 0 {
            metrics::counter!("tickflow_events_dead_lettered_total", "stage" => group(), "partition" => partition())
                .increment(commit.dead_lettered);
        }
        if duplicates > 0 {
            metrics::counter!("tickflow_duplicates_skipped_total", "stage" => group(), "partition" => partition())
                .increment(duplicates);
        }
        self.stats.mark_ready(true);
    }

    // ----- groups and helpers ------------------------------------------------------------

    /// Creates the group on every input (from the stream's start, creating the stream),
    /// retrying until Redis answers or shutdown.
    async fn ensure_groups(&mut self) {
        let mut delay = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            match crate::admin_ops::ensure_groups(&self.redis, &self.sources, &self.spec.group)
                .await
            {
                Ok(()) => {
                    self.stats.groups_ready.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    self.stats.groups_ready.store(false, Ordering::Relaxed);
                    self.stats.mark_ready(false);
                    tracing::warn!(group = %self.spec.group, error = %e, "cannot create consumer groups yet");
                    self.backoff(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn backoff(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }
}

fn fenced_or(error: StreamsError, partition: Partition) -> StreamsError {
    match &error {
        StreamsError::Redis(e) if e.code() == Some(FENCED) || e.to_string().contains(FENCED) => {
            StreamsError::Fenced { partition }
        }
        _ => error,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimMode {
    /// This consumer's own pending entries (after a restart).
    Own,
    /// Entries idle longer than the claim time, from any consumer.
    Idle,
    /// Every pending entry of a partition just taken over, whatever its idle time.
    Takeover,
}

enum DrainOutcome {
    Done,
    Halted,
    /// A commit did not go through: the handler's state of the partition must be reloaded.
    Stale,
    Fenced,
}

struct Claimed {
    next: String,
    batch: Vec<Pending>,
}

/// A batch handled and not yet committed.
struct Handled {
    commits: BTreeMap<usize, Commit>,
    halted: BTreeSet<usize>,
    failed: u64,
    batch_len: usize,
    duration: Duration,
}

#[derive(Default)]
struct CommitOutcome {
    fenced: Vec<usize>,
    /// Sources whose commit was refused for older pending entries, or failed.
    stale: Vec<usize>,
}

struct ProcessOutcome {
    halted: Vec<usize>,
    fenced: Vec<usize>,
    /// Sources whose commit found older entries pending, or failed: nothing of the batch
    /// was done for them, though the handler saw it. Owned partitions reload the handler's
    /// state and drain their pending entries, in order.
    stale: Vec<usize>,
}

/// The most entries one ACK_FORWARD call carries. A script runs alone on Redis, so a larger
/// batch is split into several calls (pipelined) to keep other clients from waiting long.
const MAX_ENTRIES_PER_CALL: usize = 512;

/// The ranges of `commits` that go in one call each: whole sources, up to
/// [`MAX_ENTRIES_PER_CALL`] entries (a larger source alone).
fn calls_of(commits: &[(usize, Commit)]) -> Vec<std::ops::Range<usize>> {
    let mut calls = Vec::new();
    let (mut start, mut entries) = (0, 0);
    for (i, (_, commit)) in commits.iter().enumerate() {
        if i > start && entries + commit.entries.len() > MAX_ENTRIES_PER_CALL {
            calls.push(start..i);
            (start, entries) = (i, 0);
        }
        entries += commit.entries.len();
    }
    if start < commits.len() {
        calls.push(start..commits.len());
    }
    calls
}

/// What one source's part of an ACK_FORWARD call came back as.
#[derive(Debug)]
enum SourceReply {
    /// Per entry, whether this call acknowledged it (and so applied its effects).
    Acked(Vec<bool>),
    /// The lease is not held: nothing changed.
    Fenced,
    /// Older entries are pending: nothing changed.
    OutOfOrder,
    /// An effect command failed, with Redis's error.
    Failed(String),
}

/// The keys and arguments of one ACK_FORWARD call (layout in `scripts.rs`).
struct CommitCall<'a> {
    keys: Vec<&'a str>,
    /// Each effect key's index in KEYS (1-based, as the script reads it).
    index: HashMap<&'a str, usize>,
    part: &'a [(usize, Commit)],
    tokens: Vec<&'a str>,
    entries: usize,
}

impl<'a> CommitCall<'a> {
    fn new(
        sources: &'a [Source],
        part: &'a [(usize, Commit)],
        tokens: &'a HashMap<usize, String>,
    ) -> Self {
        let mut keys: Vec<&str> = Vec::with_capacity(part.len() * 2 + 8);
        let mut source_tokens = Vec::with_capacity(part.len());
        for (source, _) in part {
            let src = &sources[*source];
            let token = tokens.get(source).map(String::as_str);
            keys.push(&src.stream);
            keys.push(token.map_or(&*src.stream, |_| src.lease.as_str()));
            source_tokens.push(token.unwrap_or(""));
        }
        let mut index = HashMap::new();
        let mut entries = 0;
        for (_, commit) in part {
            entries += commit.entries.len();
            let ops = commit.entries.iter().flat_map(|(_, ops)| ops);
            for op in ops.chain(&commit.batch_ops) {
                let key = op.key();
                if !index.contains_key(key) {
                    keys.push(key);
                    index.insert(key, keys.len());
                }
            }
        }
        Self {
            keys,
            index,
            part,
            tokens: source_tokens,
            entries,
        }
    }

    fn fill(&self, cmd: &mut Cmd, group: &str) {
        for key in &self.keys {
            cmd.arg(*key);
        }
        cmd.arg(group).arg(self.part.len());
        cmd.arg(Envelope::HEADER_FIELD).arg(Envelope::PAYLOAD_FIELD);
        for token in &self.tokens {
            cmd.arg(*token);
        }
        for (_, commit) in self.part {
            cmd.arg(if commit.merged { "1" } else { "0" });
        }
        for (_, commit) in self.part {
            cmd.arg(commit.entries.len());
            for (id, ops) in &commit.entries {
                cmd.arg(id).arg(ops.len());
                for op in ops {
                    self.encode(cmd, op);
                }
            }
            cmd.arg(commit.batch_ops.len());
            for op in &commit.batch_ops {
                self.encode(cmd, op);
            }
        }
    }

    fn encode(&self, cmd: &mut Cmd, op: &Op) {
        let key_index = self.index[op.key()];
        match op {
            Op::AppendEnvelope { envelope, .. } => {
                cmd.arg("E")
                    .arg(key_index)
                    .arg(envelope.header())
                    .arg(&envelope.payload[..]);
            }
            Op::Append { fields, .. } => {
                cmd.arg("X").arg(key_index).arg(fields.len() * 2);
                for (name, value) in fields {
                    cmd.arg(name.as_ref()).arg(value.as_slice());
                }
            }
            Op::Command { name, args, .. } => {
                cmd.arg(*name).arg(key_index).arg(args.len());
                for arg in args {
                    cmd.arg(arg.as_slice());
                }
            }
        }
    }
}

/// Reads ACK_FORWARD's reply: one item per source, acknowledgements or a status.
fn parse_commit_reply(reply: Value, sources: usize) -> Result<Vec<SourceReply>> {
    let Value::Array(items) = reply else {
        return Err(scripts::protocol("ack_forward reply", &reply));
    };
    if items.len() != sources {
        return Err(StreamsError::Protocol(format!(
            "ack_forward replied for {} sources, not {sources}",
            items.len()
        )));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(acks) => Ok(SourceReply::Acked(
                acks.iter()
                    .map(|v| as_int(v).map(|i| i == 1))
                    .collect::<Result<_>>()?,
            )),
            Value::BulkString(_) | Value::SimpleString(_) => {
                let status = as_string(item)?;
                if status == FENCED {
                    Ok(SourceReply::Fenced)
                } else if status == scripts::OUT_OF_ORDER {
                    Ok(SourceReply::OutOfOrder)
                } else if let Some(error) = status.strip_prefix(scripts::FAILED) {
                    Ok(SourceReply::Failed(error.trim().to_owned()))
                } else {
                    Err(StreamsError::Protocol(format!(
                        "unknown ack_forward status {status:?}"
                    )))
                }
            }
            other => Err(scripts::protocol("ack_forward source reply", &other)),
        })
        .collect()
}
