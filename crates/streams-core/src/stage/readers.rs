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
//!
//! Before the loop drains a partition's pending entries (a takeover, a sweep, a reload), it
//! stops that partition's reader ([`PartitionReaders::stop_reading`]): the drain claims
//! every pending entry, those a reader read and queued included, so a batch queued before
//! the drain must not be handled again after it (an owned handler would apply it to its
//! state twice). Each reader started is a new generation, and only the running
//! generation's batches come out of [`PartitionReaders::next`].

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

/// What goes through the channel: a [`ReaderBatch`] and the generation of the reader that
/// read it.
type QueuedBatch = (usize, u64, Result<Vec<RawEntry>>);

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
    sender: mpsc::Sender<QueuedBatch>,
    receiver: mpsc::Receiver<QueuedBatch>,
    /// Each running reader: how to stop it, its task, its generation.
    running: BTreeMap<usize, (CancellationToken, JoinHandle<()>, u64)>,
    /// The generation of the next reader started.
    next_generation: u64,
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
            next_generation: 0,
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
            self.stop_reading(source);
        }
        for (source, stream) in wanted {
            if self.running.contains_key(source) {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let stop = CancellationToken::new();
            let task = tokio::spawn(read_partition(
                self.redis.clone(),
                self.settings.clone(),
                (*source, generation),
                stream.clone(),
                self.sender.clone(),
                stop.clone(),
            ));
            self.running.insert(*source, (stop, task, generation));
        }
    }

    /// Stops the reader of `source`, if one runs, and forgets what it queued: its batches
    /// stay pending to this consumer (for the drain that follows, or a later one). The
    /// next [`Self::read_only`] naming `source` starts a new reader.
    pub(super) fn stop_reading(&mut self, source: usize) {
        if let Some((stop, task, _)) = self.running.remove(&source) {
            stop.cancel();
            task.abort();
        }
    }

    /// Waits up to `wait` for a batch, then takes every batch already waiting: the batches
    /// in arrival order (one source may appear more than once). Empty if none came.
    pub(super) async fn next(&mut self, wait: Duration) -> Vec<ReaderBatch> {
        let mut batches = Vec::new();
        match tokio::time::timeout(wait, self.receiver.recv()).await {
            Ok(Some(first)) => batches.push(first),
            Ok(None) | Err(_) => return Vec::new(),
        }
        while let Ok(more) = self.receiver.try_recv() {
            batches.push(more);
        }
        // Batches of partitions no longer read, or read by a reader since stopped, stay
        // pending; the drain or a claim takes them.
        batches
            .into_iter()
            .filter(|(source, generation, _)| {
                self.running
                    .get(source)
                    .is_some_and(|(_, _, running)| running == generation)
            })
            .map(|(source, _, read)| (source, read))
            .collect()
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
    (source, generation): (usize, u64),
    stream: Arc<str>,
    sender: mpsc::Sender<QueuedBatch>,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut delay = Duration::from_millis(50);
    while !stop.is_cancelled() {
        if conn.is_none() {
            match redis.dedicated_for(&stream, settings.block).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !report(&sender, (source, generation), e, &stop, &mut delay).await {
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
                if !report(&sender, (source, generation), e, &stop, &mut delay).await {
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
            sent = sender.send((source, generation, Ok(entries))) => if sent.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Hands an error to the loop (which counts and logs it, and recreates a vanished group)
/// and waits before the next try. False once the reader should end.
async fn report(
    sender: &mpsc::Sender<QueuedBatch>,
    (source, generation): (usize, u64),
    error: StreamsError,
    stop: &CancellationToken,
    delay: &mut Duration,
) -> bool {
    tokio::select! {
        sent = sender.send((source, generation, Err(error))) => if sent.is_err() { return false },
        _ = stop.cancelled() => return false,
    }
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = stop.cancelled() => return false,
    }
    *delay = (*delay * 2).min(Duration::from_secs(1));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    /// A drain claims what a stopped reader had queued: a reader started again for the
    /// partition hands out only what it reads itself, never its predecessor's batch.
    #[tokio::test]
    async fn a_batch_queued_before_a_reader_stopped_is_not_handed_out_after_it_restarts() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let mut conn = server.connect().await;
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("s")
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        let settings = ReadSettings {
            group: "g".into(),
            consumer: "c".into(),
            count: 10,
            block: Duration::from_millis(100),
        };
        let mut readers = PartitionReaders::new(redis, settings, 1);
        let wanted = [(0, Arc::<str>::from("s"))];
        readers.read_only(&wanted);
        let xadd = |n: u32| {
            redis::cmd("XADD")
                .arg("s")
                .arg("*")
                .arg("n")
                .arg(n)
                .to_owned()
        };
        let _: String = xadd(1).query_async(&mut conn).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while readers.receiver.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reader queued nothing"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        readers.stop_reading(0);
        // The stopped reader's last blocking read ends (an entry it got would stay pending
        // to the consumer, for a drain) before the next entry comes.
        loop {
            let clients: String = redis::cmd("INFO")
                .arg("clients")
                .query_async(&mut conn)
                .await
                .unwrap();
            if clients.contains("blocked_clients:0") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stopped read still blocks"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        readers.read_only(&wanted);
        let second: String = xadd(2).query_async(&mut conn).await.unwrap();
        let mut ids = Vec::new();
        while ids.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new reader read nothing"
            );
            for (source, read) in readers.next(Duration::from_secs(1)).await {
                assert_eq!(source, 0);
                ids.extend(read.unwrap().into_iter().map(|entry| entry.id));
            }
        }
        assert_eq!(ids, [second]);
    }
}
