//! Reading on Redis Cluster: one blocking reader per partition.
//!
//! On a single Redis the loop reads every partition it consumes with one `XREADGROUP … BLOCK`
//! over all their streams. On a cluster each partition is its own slot, usually on another
//! master, and a command may not name keys of two slots; so each partition gets a reader
//! task of its own, blocking on a dedicated connection to the master that serves its slot
//! (re-resolved after `MOVED`, a failover or a lost connection), and handing what it read to
//! the loop through one channel. The loop takes the first batch that arrives and whatever
//! else is already waiting, which plays the part of the single-Redis top-up read: one
//! wake-up brings what every partition holds.
//!
//! A reader reads again only once the loop has room for its batch, so at most a bounded
//! number of batches wait in the channel. What a reader has read is pending to this
//! consumer until the loop commits it; a reader stopped with entries in hand (its partition
//! handed over, shutdown) leaves them pending, to be claimed like any entry delivered to a
//! read whose reply was lost.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use redis::Value;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    connection::Redis,
    error::{Result, StreamsError},
    scripts::{RawEntry, parse_read_reply},
};

/// What a reader hands the loop: its source index and the entries of one read.
pub(super) type ReaderBatch = (usize, Result<Vec<RawEntry>>);

/// What every reader of a stage reads with.
#[derive(Clone, Debug)]
pub(super) struct ReadSettings {
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) count: usize,
    pub(super) block: Duration,
}

/// The readers of the partitions a loop reads now.
pub(super) struct PartitionReaders {
    redis: Redis,
    settings: ReadSettings,
    sender: mpsc::Sender<ReaderBatch>,
    receiver: mpsc::Receiver<ReaderBatch>,
    running: BTreeMap<usize, (CancellationToken, JoinHandle<()>)>,
}

impl std::fmt::Debug for PartitionReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReaders")
            .field("partitions", &self.running.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PartitionReaders {
    /// Readers for up to `sources` partitions; none runs until [`Self::read_only`].
    pub(super) fn new(redis: Redis, settings: ReadSettings, sources: usize) -> Self {
        // One batch per partition may wait; a reader blocks on the send otherwise.
        let (sender, receiver) = mpsc::channel(sources.max(1));
        Self {
            redis,
            settings,
            sender,
            receiver,
            running: BTreeMap::new(),
        }
    }

    /// Runs a reader for each of `wanted` (source index, stream key) and for nothing else.
    pub(super) fn read_only(&mut self, wanted: &[(usize, Arc<str>)]) {
        let keep: std::collections::BTreeSet<usize> = wanted.iter().map(|(s, _)| *s).collect();
        let stopped: Vec<usize> = self
            .running
            .keys()
            .copied()
            .filter(|s| !keep.contains(s))
            .collect();
        for source in stopped {
            if let Some((stop, task)) = self.running.remove(&source) {
                stop.cancel();
                task.abort();
            }
        }
        for (source, stream) in wanted {
            if self.running.contains_key(source) {
                continue;
            }
            let stop = CancellationToken::new();
            let task = tokio::spawn(read_partition(
                self.redis.clone(),
                self.settings.clone(),
                *source,
                stream.clone(),
                self.sender.clone(),
                stop.clone(),
            ));
            self.running.insert(*source, (stop, task));
        }
    }

    /// Waits up to `wait` for a batch, then takes every batch already waiting: the batches
    /// in arrival order (one source may appear more than once). Empty if none came.
    pub(super) async fn next(&mut self, wait: Duration) -> Vec<ReaderBatch> {
        let mut batches = Vec::new();
        match tokio::time::timeout(wait, self.receiver.recv()).await {
            Ok(Some(first)) => batches.push(first),
            Ok(None) | Err(_) => return batches,
        }
        while let Ok(more) = self.receiver.try_recv() {
            batches.push(more);
        }
        // Batches of partitions no longer read stay pending; the drain or a claim takes
        // them.
        batches.retain(|(source, _)| self.running.contains_key(source));
        batches
    }

    /// Stops every reader.
    pub(super) fn stop(&mut self) {
        self.read_only(&[]);
    }
}

impl Drop for PartitionReaders {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One partition's reader: blocking reads on a dedicated connection to its master, until
/// stopped.
async fn read_partition(
    redis: Redis,
    settings: ReadSettings,
    source: usize,
    stream: Arc<str>,
    sender: mpsc::Sender<ReaderBatch>,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut delay = Duration::from_millis(50);
    while !stop.is_cancelled() {
        if conn.is_none() {
            match redis.dedicated_for(&stream, settings.block).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !report(&sender, source, e, &stop, &mut delay).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&settings.group)
            .arg(&settings.consumer)
            .arg("COUNT")
            .arg(settings.count)
            .arg("BLOCK")
            .arg(settings.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&*stream)
            .arg(">");
        let read = cmd.query_async::<Value>(c);
        let reply = tokio::select! {
            reply = read => reply,
            _ = stop.cancelled() => return,
        };
        let entries = match reply.map_err(StreamsError::from).and_then(parse_read_reply) {
            Ok(streams) => streams.into_iter().flat_map(|(_, e)| e).collect::<Vec<_>>(),
            Err(e) => {
                // MOVED (a failover or resharding), a lost connection: resolve the
                // partition's master again.
                conn = None;
                if !report(&sender, source, e, &stop, &mut delay).await {
                    return;
                }
                continue;
            }
        };
        delay = Duration::from_millis(50);
        if entries.is_empty() {
            continue;
        }
        tokio::select! {
            sent = sender.send((source, Ok(entries))) => if sent.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Hands an error to the loop (which counts and logs it, and recreates a vanished group)
/// and waits before the next try. False once the reader should end.
async fn report(
    sender: &mpsc::Sender<ReaderBatch>,
    source: usize,
    error: StreamsError,
    stop: &CancellationToken,
    delay: &mut Duration,
) -> bool {
    tokio::select! {
        sent = sender.send((source, Err(error))) => if sent.is_err() { return false },
        _ = stop.cancelled() => return false,
    }
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = stop.cancelled() => return false,
    }
    *delay = (*delay * 2).min(Duration::from_secs(1));
    true
}
