//! Producer-side backpressure: how far behind the downstream group is (lag plus pending,
//! summed over partitions), measured in the background so that the hot path only reads a
//! number.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{connection::Redis, error::Result, inspect::GroupInfo, keys::KeySpace};

/// The backlog of one group on one logical stream.
#[derive(Clone, Debug)]
pub struct Backlog {
    redis: Redis,
    streams: Vec<String>,
    group: String,
    value: Arc<AtomicU64>,
    known: Arc<AtomicBool>,
}

/// The downstream group is further behind than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pipeline is {backlog} entries behind (limit {limit}); retry later")]
pub struct Overloaded {
    /// Entries not yet handled by the downstream group.
    pub backlog: u64,
    /// The configured limit.
    pub limit: u64,
}

impl Backlog {
    /// The backlog of `group` over every partition of the logical stream `stream`.
    pub fn new(redis: Redis, keys: &KeySpace, stream: &str, group: &str) -> Self {
        Self {
            redis,
            streams: keys
                .all_partitions()
                .map(|p| keys.stream(stream, p))
                .collect(),
            group: group.to_owned(),
            value: Arc::new(AtomicU64::new(0)),
            known: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Measures now: for each partition, the group's lag plus pending. A partition whose
    /// group does not exist yet counts its whole length; when Redis cannot tell the lag
    /// (after trimming undelivered entries), the stream length stands in for it.
    pub async fn measure(&self) -> Result<u64> {
        let conn: crate::connection::Connection = self.redis.pooled().await?.clone();
        let mut cmds = Vec::with_capacity(self.streams.len() * 2);
        for stream in &self.streams {
            cmds.push(redis::cmd("XLEN").arg(stream).clone());
            cmds.push(GroupInfo::command(stream));
        }
        // XINFO fails on a stream that does not exist yet: that partition's backlog is 0.
        let replies = crate::connection::query_each(&conn, cmds).await;
        let mut total = 0u64;
        for pair in replies.chunks(2) {
            let length = match &pair[0] {
                Ok(v) => crate::scripts::as_int(v).unwrap_or(0).max(0) as u64,
                Err(e) => return Err(e.clone().into()),
            };
            let group = pair[1]
                .as_ref()
                .ok()
                .and_then(|groups| GroupInfo::find(groups.clone(), &self.group));
            total += group.and_then(|g| g.backlog(length)).unwrap_or(length);
        }
        self.value.store(total, Ordering::Relaxed);
        self.known.store(true, Ordering::Relaxed);
        Ok(total)
    }

    /// The last measured backlog (0 before the first measurement).
    pub fn current(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// `Err(Overloaded)` when the last measured backlog exceeds `limit`.
    pub fn check(&self, limit: u64) -> Result<(), Overloaded> {
        let backlog = self.current();
        if backlog > limit {
            metrics::counter!("tickflow_backpressure_rejections_total", "group" => self.group.clone())
                .increment(1);
            return Err(Overloaded { backlog, limit });
        }
        Ok(())
    }

    /// Re-measures every `interval` until shutdown.
    pub fn spawn_monitor(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.measure().await {
                    tracing::debug!(error = %e, "backlog measurement failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    }
}
