//! Owned mode: the loop of a stage whose partitions are each read by one consumer at a time
//! ([`ConsumeMode::Owned`](super::ConsumeMode::Owned)), and [`OwnedPartitions`], the state
//! machine of which partitions it holds and which must drain their pending entries first.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;

use super::{ClaimMode, DrainOutcome, Handler, Pending, Stage};
use crate::{
    error::Result,
    keys::Partition,
    ownership::{Ownership, OwnershipChanges},
};

/// How soon a partition drains again after a drain was halted (an outage, a retryable
/// handler error).
const DRAIN_RETRY: Duration = Duration::from_millis(200);
/// How soon a partition drains after a refused or failed commit, once its state reloaded.
const DRAIN_AFTER_RELOAD: Duration = Duration::from_millis(20);

/// The partitions (by source index) an owned-mode loop holds, with their fencing tokens,
/// and which of them must handle their pending entries before reading new ones (after a
/// takeover, a refused commit, a retryable failure or a periodic sweep), and from when.
///
/// Invariant: a partition drains only while it is held; releasing or losing it forgets
/// both.
#[derive(Debug, Default)]
pub(super) struct OwnedPartitions {
    held: BTreeMap<usize, String>,
    drain_at: BTreeMap<usize, Instant>,
}

impl OwnedPartitions {
    /// Takes `source` with `token`: it drains first, from `now`. Returns the token of an
    /// earlier ownership that had not been noticed as ended, if any.
    pub(super) fn acquire(&mut self, source: usize, token: String, now: Instant) -> Option<String> {
        let previous = self.held.insert(source, token);
        self.drain_at.insert(source, now);
        previous
    }

    /// Stops holding `source` (released, lost or given up); its token, if it was held.
    pub(super) fn remove(&mut self, source: usize) -> Option<String> {
        self.drain_at.remove(&source);
        self.held.remove(&source)
    }

    /// The token of `source`, if held.
    pub(super) fn token(&self, source: usize) -> Option<&str> {
        self.held.get(&source).map(String::as_str)
    }

    /// Whether `source` is held.
    pub(super) fn holds(&self, source: usize) -> bool {
        self.held.contains_key(&source)
    }

    /// Whether `source` is held and readable (not waiting to drain).
    pub(super) fn is_readable(&self, source: usize) -> bool {
        self.holds(source) && !self.drain_at.contains_key(&source)
    }

    /// The partitions held, in order.
    pub(super) fn held(&self) -> impl Iterator<Item = usize> + '_ {
        self.held.keys().copied()
    }

    /// `source` drains at `at` (unless it is already due earlier); nothing if not held.
    pub(super) fn drain_from(&mut self, source: usize, at: Instant) {
        if self.holds(source) {
            let due = self.drain_at.entry(source).or_insert(at);
            *due = (*due).min(at);
        }
    }

    /// `source` drains at `at`, replacing an earlier time (a halted drain waits).
    pub(super) fn drain_later(&mut self, source: usize, at: Instant) {
        if self.holds(source) {
            self.drain_at.insert(source, at);
        }
    }

    /// `source` needs no drain (it was given up, or its drain is being run).
    pub(super) fn drained(&mut self, source: usize) {
        self.drain_at.remove(&source);
    }

    /// The partitions whose drain is due at `now`, with their tokens; they are taken off
    /// the drain list (a drain that does not finish puts them back).
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(usize, String)> {
        let due: Vec<usize> = self
            .drain_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| *s)
            .collect();
        due.into_iter()
            .filter_map(|source| {
                self.drain_at.remove(&source);
                self.held.get(&source).map(|t| (source, t.clone()))
            })
            .collect()
    }

    /// Every readable partition drains from `now` (the periodic sweep for leftovers).
    pub(super) fn sweep(&mut self, now: Instant) {
        for &source in self.held.keys() {
            self.drain_at.entry(source).or_insert(now);
        }
    }

    /// The readable partitions and their tokens.
    pub(super) fn readable(&self) -> HashMap<usize, String> {
        self.held
            .iter()
            .filter(|(s, _)| !self.drain_at.contains_key(s))
            .map(|(s, t)| (*s, t.clone()))
            .collect()
    }

    /// Every held partition and its token.
    pub(super) fn tokens(&self) -> HashMap<usize, String> {
        self.held.iter().map(|(s, t)| (*s, t.clone())).collect()
    }

    /// Stops holding everything; the partitions that were held.
    pub(super) fn clear(&mut self) -> Vec<usize> {
        self.drain_at.clear();
        std::mem::take(&mut self.held).into_keys().collect()
    }
}

/// The newest entry of each owned partition that this consumer has committed since it last
/// loaded the partition's state (took the partition, or reloaded it).
///
/// A commit of an entry goes through only while no older entry of the partition is
/// pending, and a read hands out only entries newer than every one delivered before; so
/// Redis hands out an entry at or below this mark again only if it lost writes this
/// consumer saw succeed: a failover to a replica that had not received them
/// (`TICKFLOW_WAIT_REPLICAS=0`), or a Redis that reloaded older data. The handler's state
/// then holds what Redis no longer does, and must be reloaded before such an entry is
/// handled, or it would be applied to that state twice.
#[derive(Debug, Default)]
pub(super) struct Committed(std::sync::Mutex<HashMap<usize, (u64, u64)>>);

impl Committed {
    /// Notes that `ids` of `source` were committed.
    pub(super) fn record<'a>(&self, source: usize, ids: impl Iterator<Item = &'a str>) {
        let Some(newest) = ids.map(id_order).max() else {
            return;
        };
        let mut marks = self.0.lock().expect("committed marks");
        let mark = marks.entry(source).or_insert(newest);
        *mark = (*mark).max(newest);
    }

    /// Forgets `source`'s mark: its state was (re)loaded from Redis, or it was given up.
    pub(super) fn forget(&self, source: usize) {
        self.0.lock().expect("committed marks").remove(&source);
    }

    /// Whether Redis handed out `id` of `source` although this consumer had committed it
    /// (or a newer entry) since the partition's state was loaded.
    pub(super) fn handed_out_again(&self, source: usize, id: &str) -> bool {
        self.0
            .lock()
            .expect("committed marks")
            .get(&source)
            .is_some_and(|mark| id_order(id) <= *mark)
    }
}

/// `ms-seq` as a pair that orders as Redis orders stream ids.
fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl<H: Handler> Stage<H> {
    pub(super) async fn run_owned(&mut self) -> Result<()> {
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
        let mut owned = OwnedPartitions::default();
        let mut reader: Option<MultiplexedConnection> = None;
        let sweep_every = (self.tuning.claim_idle / 2).max(Duration::from_millis(50));
        let mut next_sweep = Instant::now() + sweep_every;
        let mut prefetched: Option<Result<Vec<Pending>>> = None;
        while !self.shutdown.is_cancelled() {
            let changes =
                ownership.changes(&owned.held().map(|s| self.sources[s].partition).collect());
            self.apply_ownership_changes(&ownership, changes, &mut owned)
                .await;
            for (source, token) in owned.take_due(Instant::now()) {
                // The drain claims whatever is pending, read-ahead entries included: they
                // must not be handled a second time from the read-ahead, nor (on a
                // cluster) from what the partition's reader has queued.
                if let Some(Ok(batch)) = &mut prefetched {
                    batch.retain(|p| p.source != source);
                }
                if let Some(readers) = self.readers.lock().await.as_mut() {
                    readers.stop_reading(source);
                }
                match self
                    .drain_pending(source, ClaimMode::Takeover, Some(&token))
                    .await
                {
                    DrainOutcome::Done => {}
                    DrainOutcome::Halted => {
                        owned.drain_later(source, Instant::now() + DRAIN_RETRY);
                    }
                    DrainOutcome::Stale => {
                        if self.reload(&ownership, source, &mut owned).await {
                            owned.drain_later(source, Instant::now() + DRAIN_AFTER_RELOAD);
                        }
                    }
                    DrainOutcome::Fenced => self.lose(&ownership, source, &mut owned),
                }
            }
            let readable = owned.readable();
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
                owned.sweep(Instant::now());
                next_sweep = Instant::now() + sweep_every;
                continue;
            }
            let mut sources: Vec<usize> = readable.keys().copied().collect();
            sources.sort_unstable();
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
                    let batch = self
                        .set_aside_handed_out_again(batch, &ownership, &mut owned)
                        .await;
                    if batch.is_empty() {
                        continue;
                    }
                    let handled = self.handle(batch).await;
                    let (outcome, next) = self
                        .commit_and_read_ahead(handled, &readable, &mut reader, &sources)
                        .await;
                    prefetched = next;
                    for &source in &outcome.stale {
                        if !self.reload(&ownership, source, &mut owned).await {
                            owned.drained(source);
                        }
                    }
                    let soon = Instant::now() + DRAIN_AFTER_RELOAD;
                    for &source in outcome.halted.iter().chain(&outcome.stale) {
                        owned.drain_from(source, soon);
                    }
                    for source in outcome.fenced {
                        self.lose(&ownership, source, &mut owned);
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
                .filter(|p| owned.is_readable(p.source))
                .collect();
            if !batch.is_empty() {
                self.process(batch, &owned.tokens()).await;
            }
        }
        for source in owned.clear() {
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
        owned: &mut OwnedPartitions,
    ) {
        for partition in changes.lost {
            if let Some(source) = self.source_index(partition) {
                self.lose(ownership, source, owned);
            }
        }
        for partition in changes.to_release {
            let Some(source) = self.source_index(partition) else {
                continue;
            };
            self.committed.forget(source);
            if let Some(token) = owned.remove(source) {
                self.handler.partition_released(partition);
                ownership.release(partition, &token).await;
                tracing::info!(group = %self.spec.group, partition, "partition handed over");
            }
        }
        for (partition, token) in changes.acquired {
            let Some(source) = self.source_index(partition) else {
                continue;
            };
            if owned.remove(source).is_some() {
                // Lost and taken again since the loop last looked: the old ownership ended.
                self.handler.partition_released(partition);
            }
            self.committed.forget(source);
            match self.handler.partition_acquired(partition).await {
                Ok(()) => {
                    tracing::info!(group = %self.spec.group, partition, "partition acquired");
                    owned.acquire(source, token, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(group = %self.spec.group, partition, error = %e, "could not take partition; releasing it");
                    ownership.release(partition, &token).await;
                }
            }
        }
    }

    /// Takes out of `batch` the partitions of which Redis handed out an entry this consumer
    /// had committed already ([`Committed`]): their state is reloaded from Redis and they
    /// drain, which hands those entries (now pending to this consumer) out again, in order.
    async fn set_aside_handed_out_again(
        &mut self,
        mut batch: Vec<Pending>,
        ownership: &Ownership,
        owned: &mut OwnedPartitions,
    ) -> Vec<Pending> {
        let again: std::collections::BTreeSet<usize> = batch
            .iter()
            .filter(|p| self.committed.handed_out_again(p.source, &p.entry.id))
            .map(|p| p.source)
            .collect();
        if again.is_empty() {
            return batch;
        }
        batch.retain(|p| !again.contains(&p.source));
        for source in again {
            self.warn_handed_out_again(source);
            if self.reload(ownership, source, owned).await {
                owned.drain_from(source, Instant::now());
            }
        }
        batch
    }

    /// Reloads the handler's state of an owned partition whose commit did not go through
    /// (refused for older pending entries, or failed): what it handled in that batch is in
    /// its state but not in Redis, and will be handled again. False if the partition had to
    /// be given up (its state could not be loaded).
    async fn reload(
        &mut self,
        ownership: &Ownership,
        source: usize,
        owned: &mut OwnedPartitions,
    ) -> bool {
        let partition = self.sources[source].partition;
        let Some(token) = owned.token(source).map(str::to_owned) else {
            return false;
        };
        self.committed.forget(source);
        self.handler.partition_released(partition);
        match self.handler.partition_acquired(partition).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(group = %self.spec.group, partition, error = %e, "could not reload the partition's state; releasing it");
                owned.remove(source);
                ownership.release(partition, &token).await;
                false
            }
        }
    }

    fn lose(&mut self, ownership: &Ownership, source: usize, owned: &mut OwnedPartitions) {
        let partition = self.sources[source].partition;
        self.committed.forget(source);
        if let Some(token) = owned.remove(source) {
            tracing::warn!(group = %self.spec.group, partition, "lease lost; dropping partition");
            self.handler.partition_released(partition);
            // Only the lease this token named: the manager may hold a newer one already.
            ownership.forget(partition, &token);
        }
    }

    fn source_index(&self, partition: Partition) -> Option<usize> {
        self.sources.iter().position(|s| s.partition == partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, base: Instant) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn an_acquired_partition_drains_before_it_is_read() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        assert_eq!(owned.acquire(3, "t1".into(), now), None);
        assert!(owned.holds(3));
        assert!(!owned.is_readable(3));
        assert!(owned.readable().is_empty());
        assert_eq!(owned.take_due(now), vec![(3, "t1".to_owned())]);
        assert!(owned.is_readable(3));
        assert_eq!(owned.readable(), HashMap::from([(3, "t1".to_owned())]));
    }

    #[test]
    fn a_drain_is_taken_only_when_due_and_only_once() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        owned.acquire(1, "a".into(), now);
        owned.take_due(now);
        owned.drain_later(1, at(200, now));
        assert!(owned.take_due(at(100, now)).is_empty());
        assert!(!owned.is_readable(1), "waiting to drain is not readable");
        assert_eq!(owned.take_due(at(200, now)), vec![(1, "a".to_owned())]);
        assert!(owned.take_due(at(300, now)).is_empty());
    }

    #[test]
    fn drain_from_keeps_the_earlier_time_and_drain_later_replaces_it() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        owned.acquire(1, "a".into(), at(50, now));
        owned.drain_from(1, at(500, now));
        assert_eq!(
            owned.take_due(at(60, now)).len(),
            1,
            "the earlier time stands"
        );
        owned.drain_from(1, at(100, now));
        owned.drain_later(1, at(400, now));
        assert!(
            owned.take_due(at(300, now)).is_empty(),
            "a halted drain waits"
        );
        assert_eq!(owned.take_due(at(400, now)).len(), 1);
    }

    #[test]
    fn a_partition_not_held_never_drains() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        owned.drain_from(7, now);
        owned.drain_later(7, now);
        owned.sweep(now);
        assert!(owned.take_due(at(1, now)).is_empty());
        owned.acquire(7, "x".into(), now);
        assert_eq!(owned.remove(7), Some("x".to_owned()));
        assert!(
            owned.take_due(at(1, now)).is_empty(),
            "removing forgets the drain"
        );
        assert!(!owned.holds(7));
        assert_eq!(owned.token(7), None);
    }

    #[test]
    fn taking_a_partition_again_returns_the_old_token() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        owned.acquire(2, "old".into(), now);
        owned.take_due(now);
        assert_eq!(owned.acquire(2, "new".into(), now), Some("old".to_owned()));
        assert_eq!(owned.token(2), Some("new"));
        assert!(!owned.is_readable(2), "a new ownership drains first");
    }

    #[test]
    fn an_entry_at_or_below_the_newest_committed_is_handed_out_again() {
        let committed = Committed::default();
        assert!(
            !committed.handed_out_again(0, "5-0"),
            "nothing committed yet"
        );
        committed.record(0, ["10-2", "9-7", "10-1"].into_iter());
        committed.record(0, std::iter::empty());
        for (id, again) in [
            ("10-2", true),
            ("10-1", true),
            ("9-99", true),
            ("10-3", false),
        ] {
            assert_eq!(committed.handed_out_again(0, id), again, "{id}");
        }
        assert!(!committed.handed_out_again(1, "1-0"), "per partition");
        committed.record(0, ["3-0"].into_iter());
        assert!(
            committed.handed_out_again(0, "10-2"),
            "the mark never goes back"
        );
        committed.forget(0);
        assert!(
            !committed.handed_out_again(0, "10-2"),
            "forgotten on a reload"
        );
    }

    #[test]
    fn a_sweep_drains_every_held_partition_and_clear_forgets_all() {
        let now = Instant::now();
        let mut owned = OwnedPartitions::default();
        for s in [4, 1, 9] {
            owned.acquire(s, format!("t{s}"), now);
        }
        owned.take_due(now);
        assert_eq!(owned.readable().len(), 3);
        owned.sweep(at(10, now));
        assert!(owned.readable().is_empty());
        let mut due: Vec<usize> = owned
            .take_due(at(10, now))
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        due.sort_unstable();
        assert_eq!(due, [1, 4, 9]);
        assert_eq!(owned.tokens().len(), 3);
        assert_eq!(owned.clear(), [1, 4, 9]);
        assert_eq!(owned.held().count(), 0);
    }
}
