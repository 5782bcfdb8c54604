//! The commit protocol: acknowledging a handled batch and applying its effects in one
//! ACK_FORWARD script call per batch, all partitions of the batch in it.
//!
//! This module is the protocol's one owner: the script (`ack_forward.lua`), the typed call
//! ([`AckForward`], built from [`SourceCommit`]s, which alone lays out the script's keys and
//! arguments), the typed reply ([`SourceReply`]), and the stage's side (splitting a batch
//! into calls, retrying through outages, settling each source's reply).
//!
//! The rule it keeps: **each source (partition) of a call is applied whole or not at all.**
//! The script reads the whole call and checks every thing that can fail (the call's shape,
//! the lease, the order of pending entries, the type of every key it will write, the size of
//! every entry it will append) before its first write; variadic commands are sent in chunks,
//! so no list is ever `unpack`ed whole (Lua stops at ~8,000 values). An entry's effects are
//! applied only if the same call's XACK removed it from the pending list, so a batch
//! committed twice is forwarded once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use opentelemetry::trace::TraceContextExt;
use redis::{Cmd, Value, aio::ConnectionLike, aio::MultiplexedConnection};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{Handler, Stage, handler::Op};
use crate::{
    connection::ReplicaWait,
    envelope::Envelope,
    error::{Result, StreamsError},
    keys::{dedupe_set, slot_tag},
    scripts::{FAILED, FENCED, LuaScript, OUT_OF_ORDER, as_int, as_string, protocol},
};

/// Entries of one partition to acknowledge, with their effects.
#[derive(Default)]
pub(super) struct Commit {
    pub(super) entries: Vec<(String, Vec<Op>)>,
    /// Effects of the whole batch (Handler::batch_effects).
    pub(super) batch_ops: Vec<Op>,
    /// Span contexts of the traced entries: the commit span's parent and links.
    pub(super) traces: Vec<opentelemetry::trace::SpanContext>,
    pub(super) processed: u64,
    pub(super) dead_lettered: u64,
    /// The entries came from two reads of the stream: the commit checks for a gap.
    pub(super) merged: bool,
    /// The entries are whole: every entry one XREADGROUP `>` delivered of the stream (or
    /// two, `merged`, with `seam`), none left out ([`Gate::Pending`]).
    pub(super) whole: bool,
    /// Of entries `merged` from two reads: the id of the first read's last and of the
    /// second read's first, space-separated.
    pub(super) seam: Option<String>,
}

#[derive(Default)]
pub(super) struct CommitOutcome {
    pub(super) fenced: Vec<usize>,
    /// Sources whose commit was refused for older pending entries, or failed.
    pub(super) stale: Vec<usize>,
}

impl<H: Handler> Stage<H> {
    /// Commits every partition's entries in one script call (several for a batch larger
    /// than [`MAX_ENTRIES_PER_CALL`], pipelined), retrying through outages. The first try
    /// goes on `reader` when given (the read loop's connection, ahead of its next read);
    /// retries go through the pool. Returns the sources whose lease was lost or whose older
    /// entries must be handled first.
    pub(super) async fn commit_all(
        &self,
        commits: BTreeMap<usize, Commit>,
        tokens: &HashMap<usize, String>,
        mut reader: Option<MultiplexedConnection>,
    ) -> CommitOutcome {
        let mut outcome = CommitOutcome::default();
        let mut remaining: Vec<(usize, Commit)> = commits.into_iter().collect();
        if self.redis.is_cluster() {
            remaining = self.apply_foreign_effects(remaining, &mut outcome).await;
        }
        let mut delay = Duration::from_millis(50);
        let mut grace_deadline: Option<Instant> = None;
        while !remaining.is_empty() {
            let calls = calls_of(&remaining, self.redis.is_cluster());
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
                            let owned = tokens.contains_key(&source);
                            self.settle(source, commit, reply, owned, &mut outcome);
                        }
                    }
                    Err(e) if e.is_no_script() => retry.extend(part),
                    Err(e) if e.is_transient() => {
                        self.count_unconfirmed(&e);
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

    /// On a cluster, the effects of a source's entries on keys outside the source's slot
    /// (an external stream forwarding into partitions, its dead letters) cannot go in the
    /// call that acknowledges the entries. They are applied first, one call per slot, each
    /// gated by a dedupe set in that slot ([`Gate::Dedupe`]: an entry's id is added with its
    /// effects, so a repeated call, after a lost reply, a crash before the acknowledgement
    /// or a claim by another consumer, applies them once); then the acknowledging call
    /// carries what is left. An entry no longer pending (another consumer committed it) is
    /// left out first. A source whose foreign effects could not be applied is not
    /// acknowledged: its entries stay pending and come back. Exactly once holds while an
    /// entry is handled again within `TICKFLOW_DEDUPE_WINDOW_MS` of its first commit.
    async fn apply_foreign_effects(
        &self,
        commits: Vec<(usize, Commit)>,
        outcome: &mut CommitOutcome,
    ) -> Vec<(usize, Commit)> {
        let mut kept = Vec::with_capacity(commits.len());
        for (source, mut commit) in commits {
            let stream = &*self.sources[source].stream;
            let home = slot_tag(stream);
            let foreign = |op: &Op| slot_tag(op.key()) != home;
            if !commit.entries.iter().flat_map(|(_, ops)| ops).any(foreign) {
                kept.push((source, commit));
                continue;
            }
            if commit.batch_ops.iter().any(foreign) {
                tracing::error!(group = %self.spec.group, stream, "batch effects outside the partition's slot are not supported on a cluster");
                outcome.stale.push(source);
                continue;
            }
            match self.foreign_calls(stream, &mut commit).await {
                Ok(()) => kept.push((source, commit)),
                Err(e) => {
                    tracing::warn!(group = %self.spec.group, stream, error = %e, "effects in other slots failed; the entries stay pending");
                    self.stats
                        .failed
                        .fetch_add(commit.entries.len() as u64, Ordering::Relaxed);
                    outcome.stale.push(source);
                }
            }
        }
        kept
    }

    /// Takes `commit`'s effects outside `stream`'s slot out of it and applies them, one
    /// gated call per slot, retrying through outages within the shutdown grace.
    async fn foreign_calls(&self, stream: &str, commit: &mut Commit) -> Result<()> {
        let home = slot_tag(stream).to_owned();
        // An entry not seen pending is left out of this commit whole: committed already by
        // another consumer (nothing to do), or, if the look-up missed it, left pending to
        // come back, rather than acknowledged without its effects.
        let still_pending = self.pending_ids(stream, &commit.entries).await?;
        let before = commit.entries.len();
        // Some may be left out.
        commit.whole = false;
        commit
            .entries
            .retain(|(id, _)| still_pending.contains(id.as_str()));
        commit.processed = commit
            .processed
            .saturating_sub((before - commit.entries.len()) as u64);
        // Per slot, in entry order: (id, effects).
        let mut by_slot: BTreeMap<String, Vec<(String, Vec<Op>)>> = BTreeMap::new();
        for (id, ops) in &mut commit.entries {
            let (foreign, own): (Vec<Op>, Vec<Op>) = std::mem::take(ops)
                .into_iter()
                .partition(|op| slot_tag(op.key()) != home);
            *ops = own;
            for op in foreign {
                let entries = by_slot.entry(slot_tag(op.key()).to_owned()).or_default();
                match entries.last_mut() {
                    Some((last, ops)) if last == id => ops.push(op),
                    _ => entries.push((id.clone(), vec![op])),
                }
            }
        }
        let window_ms = self.tuning.dedupe_window.as_millis() as u64;
        let mut delay = Duration::from_millis(50);
        let mut deadline: Option<Instant> = None;
        for (tag, entries) in by_slot {
            let dedupe = dedupe_set(&tag, &self.spec.group, stream);
            let call = AckForward::new(
                &self.spec.group,
                vec![SourceCommit {
                    stream: &dedupe,
                    fence: None,
                    gate: Gate::Dedupe { window_ms },
                    entries: &entries,
                    batch_ops: &[],
                }],
            )?;
            loop {
                let attempt = match self.redis.pooled().await {
                    Ok(conn) => {
                        let mut conn: crate::connection::Connection = conn.clone();
                        call.run(&mut conn, true, self.redis.replica_wait()).await
                    }
                    Err(e) => Err(StreamsError::Pool(e.to_string())),
                };
                match attempt {
                    Ok(replies) => match replies.into_iter().next() {
                        Some(SourceReply::Acked(_)) => break,
                        Some(SourceReply::Failed(why)) => return Err(StreamsError::Protocol(why)),
                        other => {
                            return Err(StreamsError::Protocol(format!(
                                "unexpected dedupe reply {other:?}"
                            )));
                        }
                    },
                    Err(e) if e.is_transient() || e.is_no_script() => {
                        self.count_unconfirmed(&e);
                        if self.shutdown.is_cancelled()
                            && Instant::now()
                                >= *deadline.get_or_insert_with(|| {
                                    Instant::now() + self.tuning.shutdown_grace
                                })
                        {
                            return Err(e);
                        }
                        tracing::warn!(group = %self.spec.group, error = %e, retry_in = ?delay, "effects in another slot failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The ids among `entries` still pending in `stream`'s group (one XPENDING over their
    /// range): an entry no longer pending was committed by another consumer.
    async fn pending_ids(
        &self,
        stream: &str,
        entries: &[(String, Vec<Op>)],
    ) -> Result<std::collections::HashSet<String>> {
        let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
            return Ok(Default::default());
        };
        let mut conn = self.redis.pooled().await?;
        let reply: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.spec.group)
            .arg(first)
            .arg(last)
            .arg(entries.len() * 2 + 16)
            .query_async(&mut *conn)
            .await?;
        let Value::Array(rows) = reply else {
            return Err(protocol("XPENDING rows", &reply));
        };
        rows.into_iter()
            .map(|row| match row {
                Value::Array(mut fields) if !fields.is_empty() => as_string(fields.swap_remove(0)),
                other => Err(protocol("XPENDING row", &other)),
            })
            .collect()
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

    /// What one source's part of a commit came to. `owned`: the source is an owned
    /// partition, whose handler keeps state between batches.
    fn settle(
        &self,
        source: usize,
        commit: Commit,
        reply: SourceReply,
        owned: bool,
        outcome: &mut CommitOutcome,
    ) {
        match reply {
            SourceReply::Acked(acked) => {
                let not_pending = acked.iter().any(|acked| !acked);
                if owned {
                    self.committed
                        .record(source, commit.entries.iter().map(|(id, _)| id.as_str()));
                }
                self.record_commit(source, &commit, acked);
                // Entries of an owned partition that were no longer pending: an earlier try
                // of this commit went through (its reply lost, or not confirmed by the
                // replicas), or Redis lost them or their delivery (a failover to a replica
                // that had not received them, a Redis that restarted empty); then they come
                // back, or their producer sends them again. The handler's state has them
                // either way, and only Redis knows which case this is: the partition's
                // state is reloaded from what Redis holds (as for an out-of-order commit),
                // so that nothing is applied twice to it.
                if owned && not_pending {
                    tracing::warn!(group = %self.spec.group, partition = self.sources[source].partition,
                        "entries were no longer pending when committed; reloading the partition's state");
                    outcome.stale.push(source);
                }
            }
            SourceReply::Fenced => {
                self.stats
                    .record_fenced(&self.sources[source], commit.entries.len() as u64);
                outcome.fenced.push(source);
            }
            SourceReply::OutOfOrder => outcome.stale.push(source),
            SourceReply::Failed(error) => {
                // A check failed (a key of another type, ...): nothing of the source was
                // written; its entries stay pending and will be claimed again (and
                // dead-lettered after max deliveries if the cause stays).
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
        let call = AckForward::new(
            &self.spec.group,
            part.iter()
                .map(|(source, commit)| {
                    let src = &self.sources[*source];
                    SourceCommit {
                        stream: &src.stream,
                        fence: tokens
                            .get(source)
                            .map(|token| (src.lease.as_str(), token.as_str())),
                        gate: Gate::Pending {
                            merged: commit.merged,
                            whole: commit.whole.then(|| commit.seam.as_deref().unwrap_or("")),
                        },
                        entries: &commit.entries,
                        batch_ops: &commit.batch_ops,
                    }
                })
                .collect(),
        )?
        .trusting(|key| self.type_checked_recently(key));
        let span = tracing::debug_span!(
            "ack_forward",
            otel.name = "EVALSHA ack_forward",
            otel.kind = "client",
            db.system = "redis",
            db.operation.name = "EVALSHA",
            messaging.destination.name = %self.sources[part[0].0].logical,
            messaging.batch.message_count = call.entries(),
        );
        let mut traces = part.iter().flat_map(|(_, c)| &c.traces);
        if let Some(first) = traces.next() {
            let _ = span
                .set_parent(opentelemetry::Context::new().with_remote_span_context(first.clone()));
            for other in traces.take(127) {
                span.add_link(other.clone());
            }
        }
        let replies = call
            .run(conn, load_script, self.redis.replica_wait())
            .instrument(span)
            .await?;
        if !replies.iter().any(|r| matches!(r, SourceReply::Failed(_))) {
            self.note_types_checked(call.checked_keys());
        }
        Ok(replies)
    }

    /// Counts a commit that replicas did not confirm in time (`TICKFLOW_WAIT_REPLICAS`).
    fn count_unconfirmed(&self, error: &StreamsError) {
        if matches!(error, StreamsError::NotConfirmed { .. }) {
            metrics::counter!("tickflow_replica_wait_unconfirmed_total", "stage" => self.spec.group.clone(), "operation" => "commit")
                .increment(1);
        }
    }

    /// Whether this stage saw `key` with the type its effects need less than
    /// [`TYPE_RECHECK`] ago.
    fn type_checked_recently(&self, key: &str) -> bool {
        let checked = self.type_checks.lock().expect("type checks");
        checked
            .get(key)
            .is_some_and(|at| at.elapsed() < TYPE_RECHECK)
    }

    /// Remembers that a commit found `keys` of the right type just now.
    fn note_types_checked<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        let now = Instant::now();
        let mut checked = self.type_checks.lock().expect("type checks");
        for key in keys {
            match checked.get_mut(key) {
                Some(at) => *at = now,
                None => {
                    checked.insert(key.to_owned(), now);
                }
            }
        }
        // Keys no longer written (a partition handed over, a symbol gone quiet) are
        // forgotten, so the map stays the size of what the stage writes now.
        if checked.len() > 4096 {
            checked.retain(|_, at| at.elapsed() < TYPE_RECHECK);
        }
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
}

/// The most entries one ACK_FORWARD call carries. A script runs alone on Redis, so a larger
/// batch is split into several calls (pipelined) to keep other clients from waiting long.
const MAX_ENTRIES_PER_CALL: usize = 512;

/// The ranges of `commits` that go in one call each: whole sources, up to
/// [`MAX_ENTRIES_PER_CALL`] entries (a larger source alone); on a cluster, one source per
/// call, since each partition is a slot of its own.
fn calls_of(commits: &[(usize, Commit)], one_source_per_call: bool) -> Vec<std::ops::Range<usize>> {
    if one_source_per_call {
        return (0..commits.len()).map(|i| i..i + 1).collect();
    }
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

/// One source's part of an ACK_FORWARD call: a partition's entries, their effects, and
/// the batch's effects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceCommit<'a> {
    /// The input stream the entries were read from.
    pub(crate) stream: &'a str,
    /// The lease key and the fencing token the caller holds (owned partitions).
    pub(crate) fence: Option<(&'a str, &'a str)>,
    /// What decides that an entry's effects are applied now.
    pub(crate) gate: Gate<'a>,
    /// Each entry's id and effects.
    pub(crate) entries: &'a [(String, Vec<Op>)],
    /// Effects applied if any entry is acknowledged by the call.
    pub(crate) batch_ops: &'a [Op],
}

/// What makes an entry's effects apply exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate<'a> {
    /// The entry's XACK on its stream removed it from the pending list. `merged`: the
    /// entries came from two reads of the stream, and the script checks for a gap. `whole`
    /// (Some): they are every entry of the stream from the first to the last, as one
    /// XREADGROUP `>` delivered them (no claim, none left out: not handled, set aside), or
    /// as two did, merged, with the seam between them: `"<first read's last id> <second
    /// read's first id>"` (else ""). Then the script acknowledges them together when the
    /// group's pending list shows that all of them (and only they) are pending
    /// (`ack_forward.lua`).
    Pending {
        merged: bool,
        whole: Option<&'a str>,
    },
    /// The entry's id was not yet in the sorted set `stream` names (ids older than the
    /// window are forgotten): effects in another slot than the entry's stream (Redis
    /// Cluster), applied before the entry is acknowledged there.
    Dedupe { window_ms: u64 },
}

/// One ACK_FORWARD call: the only code that lays out the script's keys and arguments
/// (`ack_forward.lua` has the layout).
#[derive(Debug)]
pub(crate) struct AckForward<'a> {
    group: &'a str,
    sources: Vec<SourceCommit<'a>>,
    keys: Vec<&'a str>,
    /// Each effect key's index in KEYS (1-based, as the script reads it).
    index: HashMap<&'a str, usize>,
    /// The streams more than one source of the call reads.
    read_twice: HashSet<&'a str>,
    /// The type each key must have, a character per source stream, then per effect key
    /// (`Op::key_type`; `*`: not checked).
    types: String,
}

impl<'a> AckForward<'a> {
    /// A call committing `sources` for `group`, or why it cannot be made: an effect the
    /// script could not apply whole ([`Op::key_type`]), or a key written as two types.
    pub(crate) fn new(group: &'a str, sources: Vec<SourceCommit<'a>>) -> Result<Self> {
        let mut keys: Vec<&str> = Vec::with_capacity(sources.len() * 2 + 8);
        let mut read = HashSet::with_capacity(sources.len());
        let mut read_twice = HashSet::new();
        for source in &sources {
            keys.push(source.stream);
            keys.push(source.fence.map_or(source.stream, |(lease, _)| lease));
            if !read.insert(source.stream) {
                read_twice.insert(source.stream);
            }
        }
        let mut index = HashMap::new();
        let mut types: String = sources
            .iter()
            .map(|source| match source.gate {
                Gate::Pending { .. } => 's',
                Gate::Dedupe { .. } => 'z',
            })
            .collect();
        for source in &sources {
            let ops = source.entries.iter().flat_map(|(_, ops)| ops);
            for op in ops.chain(source.batch_ops) {
                let key = op.key();
                let wanted = op.key_type().map_err(StreamsError::InvalidEffect)?;
                match index.get(key) {
                    None => {
                        keys.push(key);
                        index.insert(key, keys.len());
                        types.push(wanted);
                    }
                    Some(&at) => {
                        let position = at - 1 - sources.len();
                        let known = types.as_bytes()[position] as char;
                        if known == '*' {
                            types.replace_range(position..=position, &wanted.to_string());
                        } else if wanted != '*' && known != wanted {
                            return Err(StreamsError::InvalidEffect(format!(
                                "{key} written as two types ({known} and {wanted})"
                            )));
                        }
                    }
                }
            }
        }
        Ok(Self {
            group,
            sources,
            keys,
            index,
            read_twice,
            types,
        })
    }

    /// Leaves unchecked the keys `recently_checked` says this process saw with their type
    /// moments ago (see [`TYPE_RECHECK`]).
    pub(crate) fn trusting(mut self, recently_checked: impl Fn(&str) -> bool) -> Self {
        let sources = self.sources.len();
        let keys: Vec<&str> = self
            .sources
            .iter()
            .map(|s| s.stream)
            .chain(self.keys[2 * sources..].iter().copied())
            .collect();
        self.types = self
            .types
            .chars()
            .zip(keys)
            .map(|(code, key)| if recently_checked(key) { '*' } else { code })
            .collect();
        self
    }

    /// Every key whose type the call checks (or checked).
    pub(crate) fn checked_keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        let sources = self.sources.len();
        self.sources
            .iter()
            .map(|s| s.stream)
            .chain(self.keys[2 * sources..].iter().copied())
            .zip(self.types.chars())
            .filter(|(_, code)| *code != '*')
            .map(|(key, _)| key)
    }

    /// How many entries the call acknowledges.
    pub(crate) fn entries(&self) -> usize {
        self.sources.iter().map(|s| s.entries.len()).sum()
    }

    /// Runs the call: by SHA only when `load_script` is false (a connection where a second
    /// request would queue behind a blocking read), else loading the script on NOSCRIPT;
    /// followed by `WAIT` on the same connection when `wait` asks for replicas (a call not
    /// confirmed by them is [`StreamsError::NotConfirmed`], to be repeated like one whose
    /// reply was lost). One reply per source, in order.
    pub(crate) async fn run(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        load_script: bool,
        wait: ReplicaWait,
    ) -> Result<Vec<SourceReply>> {
        let fill = |cmd: &mut Cmd| self.fill(cmd);
        let reply = ack_forward_script()
            .run_confirmed(conn, self.keys.len(), fill, load_script, wait)
            .await?;
        SourceReply::parse_all(reply, self.sources.len())
    }

    fn fill(&self, cmd: &mut Cmd) {
        for key in &self.keys {
            cmd.arg(*key);
        }
        cmd.arg(self.group).arg(self.sources.len());
        cmd.arg(Envelope::HEADER_FIELD).arg(Envelope::PAYLOAD_FIELD);
        for source in &self.sources {
            cmd.arg(source.fence.map_or("", |(_, token)| token));
        }
        for source in &self.sources {
            match source.gate {
                Gate::Pending {
                    merged,
                    whole: Some(seam),
                } if merged != seam.is_empty() && self.alone(source.stream) => {
                    cmd.arg(format!("W{seam}"))
                }
                Gate::Pending { merged: true, .. } => cmd.arg("1"),
                Gate::Pending { .. } => cmd.arg("0"),
                Gate::Dedupe { window_ms } => cmd.arg(format!("D{window_ms}")),
            };
        }
        // Where each source's section starts (ARGV is 1-based; the header is 4 values, 4 per
        // source and the types), so the script reaches any source without reading the others.
        let mut at = 4 + 4 * self.sources.len() + 2;
        for source in &self.sources {
            cmd.arg(at);
            at += 2
                + source
                    .entries
                    .iter()
                    .map(|(_, ops)| match single_envelope(ops) {
                        Some(_) => 4,
                        None => 2 + ops.iter().map(op_len).sum::<usize>(),
                    })
                    .sum::<usize>()
                + source.batch_ops.iter().map(op_len).sum::<usize>();
        }
        for source in &self.sources {
            cmd.arg(source.entries.last().map_or("", |(id, _)| id.as_str()));
        }
        cmd.arg(&self.types);
        for source in &self.sources {
            cmd.arg(source.entries.len());
            for (id, ops) in source.entries {
                cmd.arg(id);
                if let Some(envelope) = single_envelope(ops) {
                    // The common entry in one value: `e<key index>`, header, payload.
                    let key_index = self.index[ops[0].key()];
                    cmd.arg(format!("e{key_index}"))
                        .arg(envelope.header())
                        .arg(&envelope.payload[..]);
                    continue;
                }
                cmd.arg(ops.len());
                for op in ops {
                    self.encode(cmd, op);
                }
            }
            cmd.arg(source.batch_ops.len());
            for op in source.batch_ops {
                self.encode(cmd, op);
            }
        }
    }

    /// Whether nothing of the call but its own source's acknowledgements changes `stream`'s
    /// pending list: no other source reads it, no effect writes it (a DEL of it would
    /// acknowledge its entries behind the script's back).
    fn alone(&self, stream: &str) -> bool {
        !self.index.contains_key(stream) && !self.read_twice.contains(stream)
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

/// How long a key whose type a commit checked is trusted to keep it: a commit checks the
/// type of every key it writes (a WRONGTYPE half-way would leave half a commit), but each
/// check costs Redis about a microsecond per key inside the script, which for a stage
/// writing dozens of keys per call was a fifth of its Redis time (BENCHMARKS.md,
/// 2026-12-06). tickflow never changes a key's type, so a key checked this recently is
/// left unchecked; only something else writing a key of another type in that window can
/// still make a commit fail part-way (reported as `TICKFLOW_FAILED`).
pub(crate) const TYPE_RECHECK: Duration = Duration::from_secs(10);

/// The envelope of an entry whose one effect appends an envelope.
fn single_envelope(ops: &[Op]) -> Option<&Envelope> {
    match ops {
        [Op::AppendEnvelope { envelope, .. }] => Some(envelope),
        _ => None,
    }
}

/// How many ARGV values `op` takes in a call.
fn op_len(op: &Op) -> usize {
    match op {
        Op::AppendEnvelope { .. } => 4,
        Op::Append { fields, .. } => 3 + 2 * fields.len(),
        Op::Command { args, .. } => 3 + args.len(),
    }
}

/// The script, compiled once per process.
fn ack_forward_script() -> &'static LuaScript {
    static SCRIPT: OnceLock<LuaScript> = OnceLock::new();
    SCRIPT.get_or_init(|| LuaScript::new(include_str!("ack_forward.lua")))
}

/// What one source's part of an ACK_FORWARD call came back as. Every status but `Acked`
/// means that nothing of the source was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceReply {
    /// Per entry, whether this call acknowledged it (and so applied its effects).
    Acked(Vec<bool>),
    /// The lease is not held.
    Fenced,
    /// Older entries are pending.
    OutOfOrder,
    /// A check failed (a key of another type), with the reason.
    Failed(String),
}

impl SourceReply {
    /// Reads ACK_FORWARD's reply: one item per source, acknowledgements or a status.
    fn parse_all(reply: Value, sources: usize) -> Result<Vec<SourceReply>> {
        let Value::Array(items) = reply else {
            return Err(protocol("ack_forward reply", &reply));
        };
        if items.len() != sources {
            return Err(StreamsError::Protocol(format!(
                "ack_forward replied for {} sources, not {sources}",
                items.len()
            )));
        }
        items.into_iter().map(Self::parse).collect()
    }

    fn parse(item: Value) -> Result<SourceReply> {
        match item {
            Value::Array(acks) => Ok(SourceReply::Acked(
                acks.iter()
                    .map(|v| as_int(v).map(|i| i == 1))
                    .collect::<Result<_>>()?,
            )),
            // Every entry of the source acknowledged: their count.
            Value::Int(count) => match usize::try_from(count) {
                Ok(count) => Ok(SourceReply::Acked(vec![true; count])),
                Err(_) => Err(protocol("ack_forward acknowledged count", &item)),
            },
            Value::BulkString(_) | Value::SimpleString(_) => {
                let status = as_string(item)?;
                if status == FENCED {
                    Ok(SourceReply::Fenced)
                } else if status == OUT_OF_ORDER {
                    Ok(SourceReply::OutOfOrder)
                } else if let Some(error) = status.strip_prefix(FAILED) {
                    Ok(SourceReply::Failed(error.trim().to_owned()))
                } else {
                    Err(StreamsError::Protocol(format!(
                        "unknown ack_forward status {status:?}"
                    )))
                }
            }
            other => Err(protocol("ack_forward source reply", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use redis::aio::MultiplexedConnection;

    use super::*;
    use crate::{
        scripts::{MAX_ENTRY_FIELDS, parse_entries},
        testing::RedisServer,
    };

    /// An effect: XADD `from <id>` to `key`.
    fn forward(key: &str, id: &str) -> Op {
        Op::Append {
            key: key.to_owned(),
            fields: vec![(Cow::Borrowed(b"from"), id.as_bytes().to_vec())],
        }
    }

    fn command(name: &'static str, key: &str, args: Vec<Vec<u8>>) -> Op {
        Op::Command {
            name,
            key: key.to_owned(),
            args,
        }
    }

    /// Entries `ids`, each forwarded to `out`.
    fn forwarded(ids: &[String], out: &str) -> Vec<(String, Vec<Op>)> {
        ids.iter()
            .map(|id| (id.clone(), vec![forward(out, id)]))
            .collect()
    }

    fn source<'a>(
        stream: &'a str,
        fence: Option<(&'a str, &'a str)>,
        entries: &'a [(String, Vec<Op>)],
        batch_ops: &'a [Op],
    ) -> SourceCommit<'a> {
        SourceCommit {
            stream,
            fence,
            gate: Gate::Pending {
                merged: false,
                whole: None,
            },
            entries,
            batch_ops,
        }
    }

    /// One ACK_FORWARD call of group `g`.
    async fn commit(
        conn: &mut MultiplexedConnection,
        sources: Vec<SourceCommit<'_>>,
    ) -> Result<Vec<SourceReply>> {
        AckForward::new("g", sources)?
            .run(conn, true, ReplicaWait::default())
            .await
    }

    /// Group `g` on stream `key`, from its start (creating the stream).
    async fn create_group(conn: &mut MultiplexedConnection, key: &str) {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn set(conn: &mut MultiplexedConnection, key: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn xadd(conn: &mut MultiplexedConnection, key: &str) -> String {
        redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("n")
            .arg(1)
            .query_async(conn)
            .await
            .unwrap()
    }

    /// `n` entries added to `key`, then read by consumer `c` of group `g`.
    async fn delivered(conn: &mut MultiplexedConnection, key: &str, n: usize) -> Vec<String> {
        for _ in 0..n {
            xadd(conn, key).await;
        }
        read(conn, key, "c").await
    }

    async fn read(conn: &mut MultiplexedConnection, key: &str, consumer: &str) -> Vec<String> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(consumer)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(conn)
            .await
            .unwrap();
        crate::scripts::parse_read_reply(reply)
            .unwrap()
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|e| e.id)
            .collect()
    }

    async fn len(conn: &mut MultiplexedConnection, key: &str) -> u64 {
        redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
    }

    async fn pending(conn: &mut MultiplexedConnection, key: &str) -> i64 {
        let summary: Value = redis::cmd("XPENDING")
            .arg(key)
            .arg("g")
            .query_async(conn)
            .await
            .unwrap();
        let Value::Array(summary) = summary else {
            panic!("summary")
        };
        as_int(&summary[0]).unwrap()
    }

    async fn hlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
        redis::cmd("HLEN").arg(key).query_async(conn).await.unwrap()
    }

    fn acked(n: usize) -> SourceReply {
        SourceReply::Acked(vec![true; n])
    }

    /// How many times the server ran `command` (INFO commandstats).
    async fn calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// `TICKFLOW_WAIT_REPLICAS`: a call that no replica confirmed (a lone server has none)
    /// is an error to retry, though the master applied it (the first call also loaded the
    /// script: NOSCRIPT, then EVAL, each with its WAIT); the retry acknowledges nothing
    /// twice. Without replicas to wait for, no `WAIT` is sent at all.
    #[tokio::test]
    async fn a_commit_not_confirmed_by_replicas_is_retried_and_acknowledges_nothing_twice() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 3).await;
        let entries = forwarded(&ids, "out");
        let wait = ReplicaWait {
            replicas: 1,
            timeout: Duration::from_millis(20),
        };
        let call = AckForward::new("g", vec![source("in", None, &entries[..2], &[])]).unwrap();
        let error = call.run(&mut conn, true, wait).await.unwrap_err();
        assert!(
            matches!(
                error,
                StreamsError::NotConfirmed {
                    wanted: 1,
                    confirmed: 0
                }
            ),
            "{error}"
        );
        assert!(error.is_transient(), "commit_all retries it");
        assert_eq!(calls(&mut conn, "wait").await, 2);
        assert_eq!(len(&mut conn, "out").await, 2);
        assert_eq!(pending(&mut conn, "in").await, 1);

        assert_eq!(
            call.run(&mut conn, true, ReplicaWait::default())
                .await
                .unwrap(),
            [SourceReply::Acked(vec![false; 2])]
        );
        assert_eq!(
            commit(&mut conn, vec![source("in", None, &entries[2..], &[])])
                .await
                .unwrap(),
            [acked(1)]
        );
        assert_eq!(len(&mut conn, "out").await, 3);
        assert_eq!(calls(&mut conn, "wait").await, 2, "a WAIT for no replica");
    }

    #[tokio::test]
    async fn the_same_batch_submitted_twice_is_forwarded_once() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 5).await;
        let entries = forwarded(&ids, "out");
        let call = || vec![source("in", None, &entries, &[])];
        assert_eq!(commit(&mut conn, call()).await.unwrap(), [acked(5)]);
        // A retry after a lost reply, or a second consumer's commit: acknowledged already.
        assert_eq!(
            commit(&mut conn, call()).await.unwrap(),
            [SourceReply::Acked(vec![false; 5])]
        );
        assert_eq!(len(&mut conn, "out").await, 5);
        assert_eq!(pending(&mut conn, "in").await, 0);
    }

    #[tokio::test]
    async fn a_wrong_fencing_token_acknowledges_and_forwards_nothing() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 1).await;
        set(&mut conn, "lease", "new-owner#2").await;
        let entries = forwarded(&ids, "out");
        let reply = commit(
            &mut conn,
            vec![source("in", Some(("lease", "old-owner#1")), &entries, &[])],
        )
        .await
        .unwrap();
        assert_eq!(reply, [SourceReply::Fenced]);
        assert_eq!(len(&mut conn, "out").await, 0);
        let reply = commit(
            &mut conn,
            vec![source("in", Some(("lease", "new-owner#2")), &entries, &[])],
        )
        .await
        .unwrap();
        assert_eq!(reply, [acked(1)]);
    }

    /// Three sources in one call: a fenced one and one that would write a key of another
    /// type are refused whole, before any write, and the third is committed whole.
    #[tokio::test]
    async fn each_source_of_a_call_is_applied_whole_or_not_at_all() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        let mut ids = Vec::new();
        for key in ["a", "b", "c"] {
            create_group(&mut conn, key).await;
            ids.push(delivered(&mut conn, key, 3).await);
        }
        set(&mut conn, "lease:b", "someone-else#1").await;
        set(&mut conn, "not-a-hash", "x").await;
        let a = forwarded(&ids[0], "out");
        let b = forwarded(&ids[1], "out");
        // c: the first entry forwards, the second writes a hash key that holds a string.
        let mut c = forwarded(&ids[2], "out");
        c[1].1 = vec![command(
            "HSET",
            "not-a-hash",
            vec![b"f".to_vec(), b"1".to_vec()],
        )];
        let batch_a = [forward("out", "batch-a")];
        let batch_c = [forward("out", "batch-c")];
        let reply = commit(
            &mut conn,
            vec![
                source("a", None, &a, &batch_a),
                source("b", Some(("lease:b", "my-token#2")), &b, &[]),
                source("c", None, &c, &batch_c),
            ],
        )
        .await
        .unwrap();
        assert_eq!(reply[0], acked(3));
        assert_eq!(reply[1], SourceReply::Fenced);
        let SourceReply::Failed(why) = &reply[2] else {
            panic!("{reply:?}")
        };
        assert!(
            why.contains("WRONGTYPE") && why.contains("not-a-hash"),
            "{why}"
        );
        // a's three entries and its batch op; nothing of b or c, not even c's first entry.
        assert_eq!(len(&mut conn, "out").await, 4);
        assert_eq!(pending(&mut conn, "a").await, 0);
        assert_eq!(pending(&mut conn, "b").await, 3);
        assert_eq!(pending(&mut conn, "c").await, 3);
    }

    /// The engine's snapshot of a swept book: one HSET and one HDEL of far more arguments
    /// than Lua's unpack takes (~8,000), applied whole.
    #[tokio::test]
    async fn variadic_effects_of_any_size_are_applied_whole() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 2).await;
        let orders = 12_000;
        let resting: Vec<Vec<u8>> = (0..orders)
            .flat_map(|k| {
                [
                    format!("o{k}").into_bytes(),
                    format!("{{\"qty\":{k}}}").into_bytes(),
                ]
            })
            .collect();
        let first = vec![(ids[0].clone(), vec![command("HSET", "book", resting)])];
        assert_eq!(
            commit(&mut conn, vec![source("in", None, &first, &[])])
                .await
                .unwrap(),
            [acked(1)]
        );
        assert_eq!(hlen(&mut conn, "book").await, orders);
        // The sweep: every order gone in one HDEL, the members of a set, a sorted set.
        let gone: Vec<Vec<u8>> = (0..orders).map(|k| format!("o{k}").into_bytes()).collect();
        let scored: Vec<Vec<u8>> = (0..orders)
            .flat_map(|k| [k.to_string().into_bytes(), format!("m{k}").into_bytes()])
            .collect();
        let second = vec![(
            ids[1].clone(),
            vec![
                command("HDEL", "book", gone.clone()),
                command("SADD", "symbols", gone),
                command("ZADD", "bars", scored),
            ],
        )];
        assert_eq!(
            commit(&mut conn, vec![source("in", None, &second, &[])])
                .await
                .unwrap(),
            [acked(1)]
        );
        assert_eq!(hlen(&mut conn, "book").await, 0);
        let members: u64 = redis::cmd("SCARD")
            .arg("symbols")
            .query_async(&mut conn)
            .await
            .unwrap();
        let scores: u64 = redis::cmd("ZCARD")
            .arg("bars")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!((members, scores), (orders, orders));
    }

    /// A malformed call (an entry too large for one XADD, a command effects may not use,
    /// a bad score) is refused whole before any write, whatever came before it.
    #[tokio::test]
    async fn a_call_with_an_effect_the_script_could_not_apply_whole_is_never_sent() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 2).await;
        let huge = Op::Append {
            key: "out".into(),
            fields: (0..MAX_ENTRY_FIELDS + 1)
                .map(|k| (Cow::Owned(format!("f{k}").into_bytes()), b"v".to_vec()))
                .collect(),
        };
        let bad_ops = [
            huge,
            command("FLUSHALL", "out", vec![]),
            command("ZADD", "z", vec![b"nan".to_vec(), b"m".to_vec()]),
            command("HSET", "h", vec![b"odd".to_vec()]),
            command("SET", "s", vec![b"v".to_vec(), b"NX".to_vec()]),
            command("SET", "out", vec![b"v".to_vec()]),
        ];
        for bad in bad_ops {
            let entries = vec![
                (ids[0].clone(), vec![forward("out", &ids[0])]),
                (ids[1].clone(), vec![bad]),
            ];
            let err = commit(&mut conn, vec![source("in", None, &entries, &[])])
                .await
                .unwrap_err();
            assert!(matches!(err, StreamsError::InvalidEffect(_)), "{err}");
            assert_eq!(len(&mut conn, "out").await, 0);
            assert_eq!(pending(&mut conn, "in").await, 2);
        }
        // An entry of exactly the limit goes through.
        let largest = Op::Append {
            key: "out".into(),
            fields: (0..MAX_ENTRY_FIELDS)
                .map(|k| (Cow::Owned(format!("f{k}").into_bytes()), b"v".to_vec()))
                .collect(),
        };
        let entries = vec![(ids[0].clone(), vec![largest])];
        assert_eq!(
            commit(&mut conn, vec![source("in", None, &entries, &[])])
                .await
                .unwrap(),
            [acked(1)]
        );
        assert_eq!(len(&mut conn, "out").await, 1);
    }

    /// The dedupe gate (effects in another slot than the entries' stream, on a cluster):
    /// a call repeated, whole or in part, applies each entry's effects once; a refused
    /// gate key of another type writes nothing.
    #[tokio::test]
    async fn a_dedupe_gate_applies_each_entry_once_however_often_it_is_called() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        let ids: Vec<String> = (1..=3).map(|k| format!("{k}-0")).collect();
        let entries = forwarded(&ids, "out");
        let gated = |entries| SourceCommit {
            stream: "dedupe",
            fence: None,
            gate: Gate::Dedupe { window_ms: 60_000 },
            entries,
            batch_ops: &[],
        };
        assert_eq!(
            commit(&mut conn, vec![gated(&entries)]).await.unwrap(),
            [acked(3)]
        );
        let again = forwarded(&ids[1..], "out");
        assert_eq!(
            commit(&mut conn, vec![gated(&again)]).await.unwrap(),
            [SourceReply::Acked(vec![false, false])]
        );
        assert_eq!(len(&mut conn, "out").await, 3);
        set(&mut conn, "not-a-zset", "x").await;
        let wrong = SourceCommit {
            stream: "not-a-zset",
            ..gated(&entries)
        };
        let SourceReply::Failed(why) = &commit(&mut conn, vec![wrong]).await.unwrap()[0] else {
            panic!("refused")
        };
        assert!(why.contains("WRONGTYPE"), "{why}");
        assert_eq!(len(&mut conn, "out").await, 3);
    }

    /// A batch of one partition read in two reads is refused when another consumer holds an
    /// entry between its first and last (a gap), and accepted without one.
    #[tokio::test]
    async fn a_gap_between_two_reads_of_an_owned_partition_is_refused() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        set(&mut conn, "lease", "me#1").await;
        let mut ids = Vec::new();
        for consumer in ["me", "zombie", "me"] {
            ids.push(xadd(&mut conn, "in").await);
            read(&mut conn, "in", consumer).await;
        }
        let merged = |entries| SourceCommit {
            stream: "in",
            fence: Some(("lease", "me#1")),
            gate: Gate::Pending {
                merged: true,
                whole: None,
            },
            entries,
            batch_ops: &[],
        };
        // Entries 0 and 2 were read by two reads, with entry 1 taken by another consumer in
        // between: refused, nothing done.
        let both = forwarded(&[ids[0].clone(), ids[2].clone()], "out");
        let reply = commit(&mut conn, vec![merged(&both)]).await.unwrap();
        assert_eq!(reply, [SourceReply::OutOfOrder]);
        assert_eq!(len(&mut conn, "out").await, 0);
        assert_eq!(pending(&mut conn, "in").await, 3);
        // Entry 0 alone has no gap; then, once entry 1 is done, entry 2.
        let first = forwarded(&ids[..1], "out");
        assert_eq!(
            commit(&mut conn, vec![merged(&first)]).await.unwrap(),
            [acked(1)]
        );
        let _: i64 = redis::cmd("XACK")
            .arg("in")
            .arg("g")
            .arg(&ids[1])
            .query_async(&mut conn)
            .await
            .unwrap();
        let last = forwarded(&ids[2..], "out");
        assert_eq!(
            commit(&mut conn, vec![merged(&last)]).await.unwrap(),
            [acked(1)]
        );
        assert_eq!(len(&mut conn, "out").await, 2);
        let out: Value = redis::cmd("XRANGE")
            .arg("out")
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(parse_entries(out).unwrap().len(), 2);
    }

    /// An effect: XADD an envelope whose payload is `text` to `key` (an entry with this one
    /// effect goes in the call's short form).
    fn envelope(key: &str, text: &str) -> Op {
        Op::AppendEnvelope {
            key: key.to_owned(),
            envelope: Envelope::new("test", "k", text.as_bytes().to_vec()),
        }
    }

    /// The payloads of the envelopes in stream `key`, in order.
    async fn payloads(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        parse_entries(reply)
            .unwrap()
            .into_iter()
            .map(|entry| {
                let envelope = Envelope::from_fields(
                    entry
                        .fields
                        .iter()
                        .map(|(n, v)| (n.as_slice(), v.as_slice())),
                )
                .unwrap();
                String::from_utf8(envelope.payload.to_vec()).unwrap()
            })
            .collect()
    }

    async fn xack(conn: &mut MultiplexedConnection, key: &str, id: &str) {
        let acked: i64 = redis::cmd("XACK")
            .arg(key)
            .arg("g")
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(acked, 1);
    }

    /// Entries in the short form (one envelope) and in the general form (several effects,
    /// none, a dead letter) in one batch, some of which another consumer acknowledged
    /// first (it claimed them and committed): each entry's effects are applied once, by
    /// the call that removed it from the pending list, and a repeated call applies nothing.
    #[tokio::test]
    async fn each_entry_of_a_partly_acknowledged_batch_is_applied_once() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 7).await;
        let entries: Vec<(String, Vec<Op>)> = vec![
            (ids[0].clone(), vec![envelope("out", "e0")]),
            (
                ids[1].clone(),
                vec![
                    envelope("out", "e1"),
                    command("HSET", "h", vec![b"e1".to_vec(), b"1".to_vec()]),
                ],
            ),
            (ids[2].clone(), vec![envelope("out2", "e2")]),
            (ids[3].clone(), vec![]),
            (ids[4].clone(), vec![forward("dead", &ids[4])]),
            (
                ids[5].clone(),
                vec![
                    command("HSET", "h", vec![b"e5".to_vec(), b"1".to_vec()]),
                    envelope("out", "e5"),
                ],
            ),
            (ids[6].clone(), vec![envelope("out", "e6")]),
        ];
        let batch = [envelope("out", "batch")];
        // Another consumer committed entries 1, 2 and 6 first.
        for k in [1, 2, 6] {
            xack(&mut conn, "in", &ids[k]).await;
        }
        let call = || vec![source("in", None, &entries, &batch)];
        assert_eq!(
            commit(&mut conn, call()).await.unwrap(),
            [SourceReply::Acked(vec![
                true, false, false, true, true, true, false
            ])]
        );
        assert_eq!(payloads(&mut conn, "out").await, ["e0", "e5", "batch"]);
        assert_eq!(len(&mut conn, "out2").await, 0);
        assert_eq!(len(&mut conn, "dead").await, 1);
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg("h")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(fields, ["e5"]);
        assert_eq!(pending(&mut conn, "in").await, 0);
        // Repeated (a lost reply): nothing more.
        assert_eq!(
            commit(&mut conn, call()).await.unwrap(),
            [SourceReply::Acked(vec![false; 7])]
        );
        assert_eq!(len(&mut conn, "out").await, 3);
        assert_eq!(len(&mut conn, "dead").await, 1);
        // A batch acknowledged whole comes back as a count, read as one `true` per entry.
        let more = delivered(&mut conn, "in", 3).await;
        let entries: Vec<(String, Vec<Op>)> = more
            .iter()
            .map(|id| (id.clone(), vec![envelope("out", id)]))
            .collect();
        assert_eq!(
            commit(&mut conn, vec![source("in", None, &entries, &[])])
                .await
                .unwrap(),
            [acked(3)]
        );
        assert_eq!(payloads(&mut conn, "out").await[3..], more[..]);
    }

    /// A source whose short-form entries append to a key of another type is refused whole;
    /// the other source of the call is committed.
    #[tokio::test]
    async fn a_short_form_entry_writing_a_key_of_another_type_refuses_its_source() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "a").await;
        create_group(&mut conn, "b").await;
        let a = delivered(&mut conn, "a", 2).await;
        let b = delivered(&mut conn, "b", 2).await;
        set(&mut conn, "not-a-stream", "x").await;
        let a: Vec<(String, Vec<Op>)> = vec![
            (a[0].clone(), vec![envelope("out", "a0")]),
            (a[1].clone(), vec![envelope("not-a-stream", "a1")]),
        ];
        let b: Vec<(String, Vec<Op>)> = b
            .iter()
            .map(|id| (id.clone(), vec![envelope("out", id)]))
            .collect();
        let reply = commit(
            &mut conn,
            vec![source("a", None, &a, &[]), source("b", None, &b, &[])],
        )
        .await
        .unwrap();
        let SourceReply::Failed(why) = &reply[0] else {
            panic!("{reply:?}")
        };
        assert!(
            why.contains("WRONGTYPE") && why.contains("not-a-stream"),
            "{why}"
        );
        assert_eq!(reply[1], acked(2));
        assert_eq!(payloads(&mut conn, "out").await.len(), 2);
        assert_eq!(pending(&mut conn, "a").await, 2);
        assert_eq!(pending(&mut conn, "b").await, 0);
    }

    /// Entries `ids` appending to `out`, the second to a stream `full` whose last possible
    /// id is used up (its XADD fails in the script's writes).
    async fn second_append_fails(
        conn: &mut MultiplexedConnection,
        ids: &[String],
    ) -> Vec<(String, Vec<Op>)> {
        let _: String = redis::cmd("XADD")
            .arg("full")
            .arg("18446744073709551615-18446744073709551615")
            .arg("f")
            .arg("v")
            .query_async(conn)
            .await
            .unwrap();
        vec![
            (ids[0].clone(), vec![envelope("out", "e0")]),
            (ids[1].clone(), vec![envelope("full", "e1")]),
            (ids[2].clone(), vec![envelope("out", "e2")]),
        ]
    }

    /// An append that fails in the writes (a stream whose last possible id is used up)
    /// stops its source there and is reported; the entries after it stay pending.
    #[tokio::test]
    async fn a_short_form_append_that_fails_stops_its_source_and_is_reported() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 3).await;
        let entries = second_append_fails(&mut conn, &ids).await;
        let reply = commit(&mut conn, vec![source("in", None, &entries, &[])])
            .await
            .unwrap();
        let SourceReply::Failed(why) = &reply[0] else {
            panic!("{reply:?}")
        };
        assert!(why.contains("last possible ID"), "{why}");
        assert_eq!(payloads(&mut conn, "out").await, ["e0"]);
        assert_eq!(len(&mut conn, "full").await, 1);
        assert_eq!(pending(&mut conn, "in").await, 1, "the third entry");
    }

    /// `source`, declared whole (every entry one `>` read delivered, none left out).
    fn whole<'a>(
        stream: &'a str,
        fence: Option<(&'a str, &'a str)>,
        entries: &'a [(String, Vec<Op>)],
        batch_ops: &'a [Op],
    ) -> SourceCommit<'a> {
        SourceCommit {
            gate: Gate::Pending {
                merged: false,
                whole: Some(""),
            },
            ..source(stream, fence, entries, batch_ops)
        }
    }

    /// Entries of every form: one envelope, several effects, none, a dead letter.
    fn mixed(ids: &[String], out: &str) -> Vec<(String, Vec<Op>)> {
        ids.iter()
            .enumerate()
            .map(|(k, id)| {
                let ops = match k % 4 {
                    0 => vec![envelope(out, id)],
                    1 => vec![
                        command("HSET", "h", vec![id.as_bytes().to_vec(), b"1".to_vec()]),
                        envelope(out, id),
                    ],
                    2 => vec![],
                    _ => vec![forward("dead", id)],
                };
                (id.clone(), ops)
            })
            .collect()
    }

    async fn xclaim(conn: &mut MultiplexedConnection, key: &str, consumer: &str, id: &str) {
        let _: Value = redis::cmd("XCLAIM")
            .arg(key)
            .arg("g")
            .arg(consumer)
            .arg(0)
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
    }

    /// A whole batch, all pending, is acknowledged by one XACK (one per 1,000 entries) and
    /// applied once; repeated, alone pending or with later entries pending, it applies
    /// nothing more.
    #[tokio::test]
    async fn a_whole_batch_is_acknowledged_together_and_applied_once() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 6).await;
        let entries = mixed(&ids, "out");
        let batch = [envelope("out", "batch")];
        let call = || vec![whole("in", None, &entries, &batch)];
        assert_eq!(commit(&mut conn, call()).await.unwrap(), [acked(6)]);
        assert_eq!(calls(&mut conn, "xack").await, 1);
        assert_eq!(
            payloads(&mut conn, "out").await,
            [&ids[0], &ids[1], &ids[4], &ids[5], "batch"]
        );
        assert_eq!(hlen(&mut conn, "h").await, 2);
        assert_eq!(len(&mut conn, "dead").await, 1);
        assert_eq!(pending(&mut conn, "in").await, 0);
        // Repeated with nothing pending: no XACK at all, nothing applied.
        assert_eq!(
            commit(&mut conn, call()).await.unwrap(),
            [SourceReply::Acked(vec![false; 6])]
        );
        assert_eq!(calls(&mut conn, "xack").await, 1);
        // Repeated with later entries pending (the next read): one by one, nothing applied.
        let later = delivered(&mut conn, "in", 6).await;
        assert_eq!(
            commit(&mut conn, call()).await.unwrap(),
            [SourceReply::Acked(vec![false; 6])]
        );
        assert_eq!(len(&mut conn, "out").await, 5);
        assert_eq!(len(&mut conn, "dead").await, 1);
        assert_eq!(pending(&mut conn, "in").await, 6);
        // Larger than a chunk of XACK.
        let later = [later, delivered(&mut conn, "in", 2494).await].concat();
        let entries = forwarded(&later, "big");
        let before = calls(&mut conn, "xack").await;
        assert_eq!(
            commit(&mut conn, vec![whole("in", None, &entries, &[])])
                .await
                .unwrap(),
            [acked(2500)]
        );
        assert_eq!(calls(&mut conn, "xack").await, before + 3);
        assert_eq!(len(&mut conn, "big").await, 2500);
        assert_eq!(pending(&mut conn, "in").await, 0);
    }

    /// What a whole batch comes to when it is not all pending: another consumer claimed
    /// some entries and committed them (the first, a middle one, the last), or claimed one
    /// without committing it yet, with or without later or older entries pending (so that
    /// the group's pending count is the batch's size). Each case is played on a stream
    /// committed as whole and on one committed entry by entry: the replies and everything
    /// written are the same, each entry's effects applied once.
    #[tokio::test]
    async fn a_whole_batch_not_all_pending_is_applied_as_one_entry_at_a_time() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        // (entries committed by another consumer, entries claimed by it, later entries
        // read, an older entry left pending)
        let cases: [(&[usize], &[usize], usize, bool); 9] = [
            (&[0], &[], 0, false),
            (&[3], &[], 0, false),
            (&[7], &[], 0, false),
            (&[1, 2, 6], &[], 0, false),
            (&[7], &[], 1, false),
            (&[3], &[], 1, false),
            (&[0], &[], 0, true),
            (&[4], &[], 0, true),
            (&[], &[2, 7], 0, false),
        ];
        for (case, (committed, claimed, later, older)) in cases.into_iter().enumerate() {
            let mut replies = Vec::new();
            let mut written = Vec::new();
            for declared_whole in [false, true] {
                let stream = format!("in-{case}-{declared_whole}");
                let out = format!("out-{case}-{declared_whole}");
                let _: () = redis::cmd("DEL")
                    .arg(&["h", "dead"])
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                create_group(&mut conn, &stream).await;
                if older {
                    delivered(&mut conn, &stream, 1).await;
                }
                let ids = delivered(&mut conn, &stream, 8).await;
                delivered(&mut conn, &stream, later).await;
                for &k in committed {
                    xclaim(&mut conn, &stream, "other", &ids[k]).await;
                    xack(&mut conn, &stream, &ids[k]).await;
                }
                for &k in claimed {
                    xclaim(&mut conn, &stream, "other", &ids[k]).await;
                }
                let entries = mixed(&ids, &out);
                let batch = [envelope(&out, "batch")];
                let sources = if declared_whole {
                    vec![whole(&stream, None, &entries, &batch)]
                } else {
                    vec![source(&stream, None, &entries, &batch)]
                };
                let reply = commit(&mut conn, sources).await.unwrap();
                let expected: Vec<bool> = (0..8).map(|k| !committed.contains(&k)).collect();
                assert_eq!(reply, [SourceReply::Acked(expected)], "case {case}");
                // The other consumer's commit of what it claimed: nothing left to apply.
                let theirs: Vec<(String, Vec<Op>)> = claimed
                    .iter()
                    .map(|&k| (ids[k].clone(), vec![envelope(&out, "twice")]))
                    .collect();
                if !theirs.is_empty() {
                    assert_eq!(
                        commit(&mut conn, vec![whole(&stream, None, &theirs, &[])])
                            .await
                            .unwrap(),
                        [SourceReply::Acked(vec![false; theirs.len()])]
                    );
                }
                let mut fields: Vec<String> = redis::cmd("HKEYS")
                    .arg("h")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                fields.sort();
                let ranks = |list: Vec<String>| -> Vec<String> {
                    list.iter()
                        .map(|id| {
                            ids.iter()
                                .position(|i| i == id)
                                .map_or(id.clone(), |k| k.to_string())
                        })
                        .collect()
                };
                written.push((
                    ranks(payloads(&mut conn, &out).await),
                    ranks(fields),
                    len(&mut conn, "dead").await,
                    pending(&mut conn, &stream).await,
                ));
                replies.push(reply);
            }
            assert_eq!(replies[0], replies[1], "case {case}");
            assert_eq!(written[0], written[1], "case {case}");
            let (out, _, _, pending) = &written[1];
            let expected: Vec<String> = (0..8)
                .filter(|k| k % 4 < 2 && !committed.contains(k))
                .map(|k| k.to_string())
                .chain(["batch".to_owned()])
                .collect();
            assert_eq!(out, &expected, "case {case}");
            assert_eq!(*pending, (later + usize::from(older)) as i64, "case {case}");
        }
    }

    /// A whole batch from two reads of its stream, between which another consumer's read
    /// took an entry (a gap), and from which that consumer committed the second read's first
    /// entry: the group's pending list then holds as many entries as the batch, the least
    /// its first and the greatest its last, but the gap's is one of them. The entries are
    /// acknowledged one by one, each applied once. All pending without a gap: together.
    #[tokio::test]
    async fn a_whole_batch_of_two_reads_with_a_gap_is_applied_as_one_entry_at_a_time() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        for gap in [true, false] {
            let stream = format!("in-{gap}");
            create_group(&mut conn, &stream).await;
            let mut ids = delivered(&mut conn, &stream, 2).await;
            if gap {
                xadd(&mut conn, &stream).await;
                assert_eq!(read(&mut conn, &stream, "other").await.len(), 1);
            }
            let second = delivered(&mut conn, &stream, 2).await;
            let seam = format!("{} {}", ids[1], second[0]);
            ids.extend(second);
            xclaim(&mut conn, &stream, "other", &ids[2]).await;
            xack(&mut conn, &stream, &ids[2]).await;
            let entries = mixed(&ids, "out");
            let merged = SourceCommit {
                gate: Gate::Pending {
                    merged: true,
                    whole: Some(&seam),
                },
                ..source(&stream, None, &entries, &[])
            };
            let xacks = calls(&mut conn, "xack").await;
            assert_eq!(
                commit(&mut conn, vec![merged]).await.unwrap(),
                [SourceReply::Acked(vec![true, true, false, true])],
                "gap {gap}"
            );
            // One by one either way (without a gap, only three are pending).
            assert_eq!(calls(&mut conn, "xack").await, xacks + 4, "gap {gap}");
            assert_eq!(pending(&mut conn, &stream).await, i64::from(gap));
        }
        // Entries 0, 1 and 3 of both streams: 0 and 1 append, 3 dead-letters.
        assert_eq!(len(&mut conn, "out").await, 4);
        assert_eq!(len(&mut conn, "dead").await, 2);
        // All pending, no gap, an owned partition: together.
        create_group(&mut conn, "in").await;
        set(&mut conn, "lease", "me#1").await;
        let mut ids = delivered(&mut conn, "in", 3).await;
        ids.extend(delivered(&mut conn, "in", 3).await);
        let seam = format!("{} {}", ids[2], ids[3]);
        let entries = forwarded(&ids, "out2");
        let merged = SourceCommit {
            gate: Gate::Pending {
                merged: true,
                whole: Some(&seam),
            },
            ..source("in", Some(("lease", "me#1")), &entries, &[])
        };
        let xacks = calls(&mut conn, "xack").await;
        assert_eq!(commit(&mut conn, vec![merged]).await.unwrap(), [acked(6)]);
        assert_eq!(calls(&mut conn, "xack").await, xacks + 1);
        assert_eq!(len(&mut conn, "out2").await, 6);
    }

    /// A whole source is still refused for a wrong token or an older pending entry, and a
    /// whole batch whose effects delete its own stream (which acknowledges its entries
    /// behind the script's back) is acknowledged entry by entry.
    #[tokio::test]
    async fn a_whole_source_keeps_every_check_of_its_source() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        set(&mut conn, "lease", "me#2").await;
        let older = delivered(&mut conn, "in", 1).await;
        let ids = delivered(&mut conn, "in", 3).await;
        let entries = forwarded(&ids, "out");
        assert_eq!(
            commit(
                &mut conn,
                vec![whole("in", Some(("lease", "me#1")), &entries, &[])]
            )
            .await
            .unwrap(),
            [SourceReply::Fenced]
        );
        assert_eq!(
            commit(
                &mut conn,
                vec![whole("in", Some(("lease", "me#2")), &entries, &[])]
            )
            .await
            .unwrap(),
            [SourceReply::OutOfOrder]
        );
        assert_eq!(len(&mut conn, "out").await, 0);
        assert_eq!(pending(&mut conn, "in").await, 4);
        xack(&mut conn, "in", &older[0]).await;
        let deleting: Vec<(String, Vec<Op>)> = vec![
            (ids[0].clone(), vec![forward("out", &ids[0])]),
            (ids[1].clone(), vec![command("DEL", "in", vec![])]),
            (ids[2].clone(), vec![forward("out", &ids[2])]),
        ];
        let call = AckForward::new(
            "g",
            vec![whole("in", Some(("lease", "me#2")), &deleting, &[])],
        )
        .unwrap();
        assert!(!call.alone("in"));
        assert_eq!(
            call.run(&mut conn, true, ReplicaWait::default())
                .await
                .unwrap(),
            [SourceReply::Acked(vec![true, true, false])]
        );
        assert_eq!(len(&mut conn, "out").await, 1);
    }

    /// A whole source whose append fails in the writes stops there, as one acknowledged
    /// entry by entry would: the entries up to the failure are acknowledged, the rest pending.
    #[tokio::test]
    async fn a_whole_source_whose_append_fails_keeps_the_rest_pending() {
        let server = RedisServer::start();
        let mut conn = server.connect().await;
        create_group(&mut conn, "in").await;
        let ids = delivered(&mut conn, "in", 3).await;
        let entries = second_append_fails(&mut conn, &ids).await;
        let reply = commit(&mut conn, vec![whole("in", None, &entries, &[])])
            .await
            .unwrap();
        let SourceReply::Failed(why) = &reply[0] else {
            panic!("{reply:?}")
        };
        assert!(why.contains("last possible ID"), "{why}");
        assert_eq!(payloads(&mut conn, "out").await, ["e0"]);
        assert_eq!(pending(&mut conn, "in").await, 1, "the third entry");
        // A group that vanished: no error, nothing applied, as entry by entry.
        let _: () = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg("in")
            .arg("g")
            .query_async(&mut conn)
            .await
            .unwrap();
        let rest = forwarded(&ids[2..], "out");
        assert_eq!(
            commit(&mut conn, vec![whole("in", None, &rest, &[])])
                .await
                .unwrap(),
            [SourceReply::Acked(vec![false])]
        );
        assert_eq!(len(&mut conn, "out").await, 1);
    }
}
