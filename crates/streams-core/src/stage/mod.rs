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

mod commit;
mod handler;
mod owned;
mod readers;
pub(crate) mod spec;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use opentelemetry::trace::TraceContextExt;
use redis::{Value, aio::MultiplexedConnection};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use self::{
    commit::Commit,
    readers::{PartitionReaders, ReadSettings},
    spec::Source,
};
/// For replays across slots (`admin_ops`): the commit's call, its dedupe gate and effects.
pub(crate) use self::{
    commit::{AckForward, Gate, SourceCommit, SourceReply},
    handler::Op,
};
pub use self::{
    handler::{Delivery, EFFECT_COMMANDS, Handler, HandlerError, Outputs},
    spec::{ConsumeMode, InputFormat, Inputs, StageSpec},
};
use crate::{
    config::{Config, StageTuning},
    connection::Redis,
    envelope::{Envelope, now_micros},
    error::{Result, StreamsError},
    keys::{KeySpace, Partition},
    scripts::{
        self, FENCED, MAX_ENTRY_FIELDS, RawEntry, as_int, as_string, parse_entries, scripts,
    },
    stats::{StageStats, Stats},
};

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
    /// On a cluster, the partitions' blocking readers (started on the first read).
    readers: tokio::sync::Mutex<Option<PartitionReaders>>,
    /// When a commit last found each key it writes of the right type (`commit::TYPE_RECHECK`).
    type_checks: std::sync::Mutex<HashMap<String, Instant>>,
    /// Owned mode: the newest entry committed of each partition since its state was loaded.
    committed: owned::Committed,
}

/// The metrics a stage records for every batch, registered once (not looked up, labels
/// and all, per batch).
struct StageMetrics {
    batch_size: metrics::Histogram,
    handler_duration: metrics::Histogram,
    ack_forward_duration: metrics::Histogram,
    /// `tickflow_stage_arrival_seconds`: from an event's origin to this stage's read of
    /// it. One per stage; the difference between two stages' is the hop between them.
    arrival: metrics::Histogram,
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
            arrival: metrics::histogram!("tickflow_stage_arrival_seconds", "stage" => group.clone()),
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
    /// Delivered by an XREADGROUP `>` (not claimed), or by the second of the two that
    /// `read_group` sends together.
    fresh: bool,
    /// Delivered by the second of those two reads, which read its source too (`merged`).
    second: bool,
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
            readers: tokio::sync::Mutex::new(None),
            type_checks: std::sync::Mutex::new(HashMap::new()),
            committed: owned::Committed::default(),
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
        // Readers stopped now read nothing more that would wait, pending, for a claim.
        self.readers.lock().await.take();
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
        if reader.is_none() && !self.redis.is_cluster() {
            // An error here is the read's to report; the commit goes through the pool.
            *reader = self.redis.dedicated(self.tuning.block).await.ok();
        }
        // The commit goes out on the reading connection just ahead of the read, so one
        // write carries both and Redis reads one socket; its reply comes first. (On a
        // cluster the partitions' readers have connections of their own, and the commit
        // goes through the cluster connection, which routes each call to its slot.)
        let on_reader = reader.clone();
        let (outcome, read) = tokio::join!(
            self.commit_handled(handled, tokens, on_reader),
            self.read_group(reader, sources)
        );
        (outcome, Some(read))
    }

    /// `XREADGROUP … BLOCK` over `sources` on the loop's dedicated connection (on a
    /// cluster, from the partitions' readers).
    async fn read_group(
        &self,
        reader: &mut Option<MultiplexedConnection>,
        sources: &[usize],
    ) -> Result<Vec<Pending>> {
        if self.redis.is_cluster() {
            return self.read_partitions(sources).await;
        }
        if reader.is_none() {
            *reader = Some(self.redis.dedicated(self.tuning.block).await?);
        }
        let conn = reader.as_mut().expect("connected above");
        let count = self.tuning.read_count(sources.len());
        let read = |block: bool| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.spec.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count);
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
            let at = batch.len();
            batch.extend(more);
            if !twice.is_empty() {
                for (k, pending) in batch.iter_mut().enumerate() {
                    pending.merged = twice.contains(&pending.source);
                    pending.second = pending.merged && k >= at;
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
                fresh: true,
                second: false,
            }));
        }
        Ok(batch)
    }

    /// A read on a cluster: the first batch any of `sources`' readers brings within the
    /// block time, and every batch already waiting.
    async fn read_partitions(&self, sources: &[usize]) -> Result<Vec<Pending>> {
        let mut readers = self.readers.lock().await;
        let readers = readers.get_or_insert_with(|| {
            PartitionReaders::new(
                self.redis.clone(),
                ReadSettings {
                    group: self.spec.group.clone(),
                    consumer: self.consumer.clone(),
                    count: self.tuning.read_count(self.sources.len()),
                    block: self.tuning.block,
                },
                self.sources.len(),
            )
        });
        let wanted: Vec<(usize, Arc<str>)> = sources
            .iter()
            .map(|&s| (s, self.sources[s].stream.clone()))
            .collect();
        readers.read_only(&wanted);
        let mut batch = Vec::new();
        let mut error = None;
        let mut seen = BTreeSet::new();
        let mut twice = BTreeSet::new();
        for (source, read) in readers.next(self.tuning.block).await {
            match read {
                Ok(entries) => {
                    if !seen.insert(source) {
                        twice.insert(source);
                    }
                    batch.extend(entries.into_iter().map(|entry| Pending {
                        source,
                        entry,
                        deliveries: 1,
                        merged: false,
                        fresh: true,
                        second: false,
                    }));
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            // The loop recreates a vanished group and counts a reconnect; the partitions
            // that did read are handled next time round (their entries are pending to
            // this consumer).
            Some(e) if batch.is_empty() || e.is_no_group() => return Err(e),
            Some(e) => {
                tracing::warn!(group = %self.spec.group, error = %e, "a partition's read failed; its reader reconnects");
            }
            None => self.stats.mark_ready(true),
        }
        if !twice.is_empty() {
            // A partition read twice may have a gap between the reads, which its commit
            // checks for. (Its reads are not told apart: its commit is not whole.)
            for pending in &mut batch {
                pending.merged = twice.contains(&pending.source);
                pending.fresh &= !pending.merged;
            }
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
            if token.is_some()
                && claimed
                    .batch
                    .iter()
                    .any(|p| self.committed.handed_out_again(source, &p.entry.id))
            {
                // What the claim took stays pending to this consumer, for the drain that
                // follows the reload.
                self.warn_handed_out_again(source);
                return DrainOutcome::Stale;
            }
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

    /// Logs that Redis handed out entries of `source` that this consumer had committed.
    fn warn_handed_out_again(&self, source: usize) {
        tracing::warn!(group = %self.spec.group, partition = self.sources[source].partition,
            "Redis handed out again entries this consumer had committed (a failover lost \
             acknowledged writes, or Redis loaded older data); reloading the partition's state");
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
                fresh: false,
                second: false,
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
        let read_at_us = now_micros();
        let owned = self.spec.mode == ConsumeMode::Owned;
        let mut commits: BTreeMap<usize, Commit> = BTreeMap::new();
        let mut halted: BTreeSet<usize> = BTreeSet::new();
        // Sources whose commit is not whole (see `Commit::whole`): claimed or twice-read
        // entries, or some left out.
        let mut partial: BTreeSet<usize> = BTreeSet::new();
        let mut failed = 0u64;
        let batch_len = batch.len();
        for pending in batch {
            if !pending.fresh {
                partial.insert(pending.source);
            }
            if halted.contains(&pending.source) {
                partial.insert(pending.source);
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
                        // First deliveries only: a claimed entry's age is the outage's.
                        if delivery.deliveries == 1 && envelope.origin_us <= read_at_us {
                            self.metrics
                                .arrival
                                .record((read_at_us - envelope.origin_us) as f64 / 1e6);
                        }
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
                    // An effect the commit could not apply whole is the handler's bug: the
                    // entry is dead-lettered with the reason rather than the batch refused.
                    Ok(()) => match outputs.ops.iter().find_map(|op| op.key_type().err()) {
                        None => Ok(()),
                        Some(why) => Err(format!("invalid effect: {why}")),
                    },
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
                        partial.insert(pending.source);
                        continue;
                    }
                },
                Err(reason) => Err(reason),
            };
            let commit = commits.entry(pending.source).or_default();
            commit.merged |= pending.merged;
            if pending.second && commit.seam.is_none() {
                // The first entry of the second read: the seam follows the first read's last.
                match commit.entries.last() {
                    Some((last, _)) => commit.seam = Some(format!("{last} {}", delivery.id)),
                    None => {
                        partial.insert(pending.source);
                    }
                }
            }
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
        let mut invalid = BTreeSet::new();
        for (source, commit) in commits.iter_mut() {
            commit.whole = !partial.contains(source) && (!commit.merged || commit.seam.is_some());
            if commit.processed > 0 {
                let mut batch = Outputs::default();
                self.handler
                    .batch_effects(self.sources[*source].partition, &mut batch);
                if let Some(why) = batch.ops.iter().find_map(|op| op.key_type().err()) {
                    // The handler's bug: nothing of the partition's batch is committed; its
                    // entries stay pending (and are dead-lettered after max deliveries).
                    tracing::error!(group = %self.spec.group, partition = self.sources[*source].partition, %why, "invalid batch effect; the batch is not committed");
                    invalid.insert(*source);
                }
                commit.batch_ops = batch.ops;
            }
        }
        // Not committed, the partition's state is reloaded and its entries handled again.
        commits.retain(|source, _| !invalid.contains(source));
        halted.extend(invalid);
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
        // One XADD cannot carry more than MAX_ENTRY_FIELDS fields: an entry with more keeps
        // its first ones, and the dead letter says how many were dropped (it was refused
        // for being far from any event we accept anyway).
        const META: usize = 7;
        let room = MAX_ENTRY_FIELDS - META;
        let dropped = delivery.fields.len().saturating_sub(room);
        let mut fields: Vec<(Cow<'static, [u8]>, Vec<u8>)> = delivery
            .fields
            .iter()
            .take(room)
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
        if dropped > 0 {
            fields.push((
                Cow::Borrowed(b"dlq.fields_dropped"),
                dropped.to_string().into_bytes(),
            ));
        }
        Op::Append {
            key: self.sources[source].dead_letter.clone(),
            fields,
        }
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

struct ProcessOutcome {
    halted: Vec<usize>,
    fenced: Vec<usize>,
    /// Sources whose commit found older entries pending, or failed: nothing of the batch
    /// was done for them, though the handler saw it. Owned partitions reload the handler's
    /// state and drain their pending entries, in order.
    stale: Vec<usize>,
}
