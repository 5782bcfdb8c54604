//! One reading of every stage's position, straight from Redis: what `tickflow status`
//! prints and `tickflow top` refreshes. Its JSON form is `tickflow status --json`'s stable
//! schema (docs/operations.md): fields are only ever added, and `schema` counts
//! incompatible changes.

use std::collections::BTreeMap;

use redis::Value;
use serde::Serialize;
use streams_core::{
    ConsumeMode,
    connection::{Connection, query_each},
    inspect::{ConsumerInfo, GroupInfo},
};

use crate::pipeline::{Pipeline, Stage};

/// The version of the JSON schema; raised only when a field changes meaning or goes.
pub const SCHEMA: u32 = 1;

/// Every stage's position at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// [`SCHEMA`].
    pub schema: u32,
    /// `TICKFLOW_NAMESPACE`.
    pub namespace: String,
    /// `TICKFLOW_PARTITIONS`.
    pub partitions: u32,
    /// Redis's clock when the snapshot was taken, ms since the Unix epoch (ages are
    /// measured against it, so that the reader's clock does not matter).
    pub taken_at_ms: u64,
    /// The stages, in pipeline order.
    pub stages: Vec<StageSnapshot>,
}

/// One stage (consumer group) and its inputs.
#[derive(Debug, Clone, Serialize)]
pub struct StageSnapshot {
    /// The stage: its consumer group's name.
    pub stage: String,
    /// `owned` (one consumer per partition, under a lease) or `shared`.
    pub mode: &'static str,
    /// What it reads: a logical stream, or the external streams' keys.
    pub input: String,
    /// Each input partition.
    pub partitions: Vec<PartitionSnapshot>,
    /// The group's consumers over every partition.
    pub consumers: Vec<ConsumerSnapshot>,
    /// Sums over the partitions.
    pub totals: Totals,
    /// The partition furthest behind (largest backlog, then oldest pending entry), when
    /// any partition is behind at all.
    pub slowest_partition: Option<u32>,
}

/// One input partition of a stage.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionSnapshot {
    /// The partition.
    pub partition: u32,
    /// The stream's key.
    pub stream: String,
    /// Entries in the stream (XLEN).
    pub length: u64,
    /// Whether the stage's group exists on the stream (it is created when the stage
    /// first starts).
    pub group_exists: bool,
    /// Entries not yet delivered to the group; `null` when Redis cannot tell (after a
    /// trim of undelivered entries or a `groups reset` to an id or time).
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    /// The oldest pending entry's id.
    pub oldest_pending_id: Option<String>,
    /// How long ago that entry was appended, ms.
    pub oldest_pending_age_ms: Option<u64>,
    /// The group's last delivered id.
    pub last_delivered_id: Option<String>,
    /// Entries the group has read, as Redis counts them.
    pub entries_read: Option<u64>,
    /// The consumer holding the partition's lease (owned stages).
    pub owner: Option<String>,
    /// Entries in the partition's dead-letter stream.
    pub dead_letters: u64,
}

impl PartitionSnapshot {
    /// What the stage has still to handle here: lag (the whole stream when Redis cannot
    /// tell, or the group does not exist yet) plus pending.
    pub fn backlog(&self) -> u64 {
        self.lag.unwrap_or(self.length) + self.pending
    }
}

/// A consumer of a stage's group, over every partition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConsumerSnapshot {
    /// Its name.
    pub name: String,
    /// ms since it last tried to read, on its most recently read partition.
    pub idle_ms: u64,
    /// Entries delivered to it and not yet acknowledged, over every partition.
    pub pending: u64,
}

/// Sums over a stage's partitions.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// Entries in the streams.
    pub length: u64,
    /// Entries not yet delivered, over the partitions where Redis can tell.
    pub lag: u64,
    /// Partitions whose lag Redis cannot tell (counted at their length in `backlog`).
    pub lag_unknown_partitions: u32,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    /// Lag plus pending: what the stage has still to handle.
    pub backlog: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Entries the group has read, over the partitions where Redis can tell (what `top`
    /// derives throughput from).
    pub entries_read: u64,
}

/// Takes a snapshot of `stages` (every stage of `pipeline` when `None`).
pub async fn take(
    pipeline: &Pipeline,
    conn: &mut Connection,
    only: Option<&str>,
) -> anyhow::Result<Snapshot> {
    let stages: Vec<&Stage> = match only {
        Some(name) => vec![pipeline.stage(name)?],
        None => pipeline.stages.iter().collect(),
    };
    let now_ms = crate::pipeline::redis_now_ms(conn).await?;
    let mut snapshots = Vec::new();
    for stage in stages {
        snapshots.push(stage_snapshot(stage, conn, now_ms).await?);
    }
    Ok(Snapshot {
        schema: SCHEMA,
        namespace: pipeline.keys().namespace().to_owned(),
        partitions: pipeline.keys().partitions(),
        taken_at_ms: now_ms,
        stages: snapshots,
    })
}

async fn stage_snapshot(
    stage: &Stage,
    conn: &Connection,
    now_ms: u64,
) -> anyhow::Result<StageSnapshot> {
    let group = stage.name();
    // Six commands per partition, all sent at once (one request each, since partitions are
    // slots of their own on a cluster; a multiplexed connection still writes them together,
    // one round trip per node); a stream or group that does not exist yet makes its XINFO
    // and XPENDING fail, which reads as "nothing there".
    const PER_INPUT: usize = 6;
    let mut cmds = Vec::with_capacity(stage.inputs.len() * PER_INPUT);
    for input in &stage.inputs {
        cmds.push(redis::cmd("XLEN").arg(&input.stream).clone());
        // An external stream's dead letters may be in another slot: no pipeline.
        cmds.push(redis::cmd("XLEN").arg(&input.dead_letter).clone());
        cmds.push(match &input.lease {
            Some(lease) => redis::cmd("GET").arg(lease).clone(),
            // A keyless placeholder, so that every input has six replies.
            None => redis::cmd("XLEN").arg(&input.stream).clone(),
        });
        cmds.push(GroupInfo::command(&input.stream));
        cmds.push(ConsumerInfo::command(&input.stream, group));
        cmds.push(redis::cmd("XPENDING").arg(&input.stream).arg(group).clone());
    }
    let replies = query_each(conn, cmds).await;
    // Other errors read as "nothing there", as they did in a pipeline; an unreachable Redis
    // is not nothing.
    if let Some(Err(e)) = replies
        .iter()
        .find(|reply| reply.as_ref().is_err_and(is_unreachable))
    {
        anyhow::bail!("reading stage {}'s streams: {e}", stage.name());
    }
    let mut partitions = Vec::new();
    let mut consumers: BTreeMap<String, ConsumerSnapshot> = BTreeMap::new();
    for (input, replies) in stage.inputs.iter().zip(replies.chunks(PER_INPUT)) {
        let number = |reply: &redis::RedisResult<Value>| match reply {
            Ok(Value::Int(n)) => (*n).max(0) as u64,
            _ => 0,
        };
        let length = number(&replies[0]);
        let dead_letters = number(&replies[1]);
        let owner = match &replies[2] {
            Ok(Value::BulkString(lease)) if input.lease.is_some() => {
                let holder = String::from_utf8_lossy(lease);
                // A lease's value is `consumer#token`.
                Some(holder.split('#').next().unwrap_or_default().to_owned())
            }
            _ => None,
        };
        let info = replies[3]
            .as_ref()
            .ok()
            .and_then(|reply| GroupInfo::find(reply.clone(), group));
        if let Ok(reply) = &replies[4] {
            for consumer in ConsumerInfo::parse(reply.clone()) {
                let entry = consumers
                    .entry(consumer.name.clone())
                    .or_insert(ConsumerSnapshot {
                        name: consumer.name,
                        idle_ms: consumer.idle_ms,
                        pending: 0,
                    });
                entry.idle_ms = entry.idle_ms.min(consumer.idle_ms);
                entry.pending += consumer.pending;
            }
        }
        let oldest_pending_id = match &replies[5] {
            Ok(Value::Array(summary)) => match summary.get(1) {
                Some(Value::BulkString(id)) => Some(String::from_utf8_lossy(id).into_owned()),
                _ => None,
            },
            _ => None,
        };
        let oldest_pending_age_ms = oldest_pending_id
            .as_deref()
            .and_then(|id| id.split('-').next()?.parse::<u64>().ok())
            .map(|appended_ms| now_ms.saturating_sub(appended_ms));
        partitions.push(PartitionSnapshot {
            partition: input.partition,
            stream: input.stream.clone(),
            length,
            group_exists: info.is_some(),
            lag: info.as_ref().and_then(|g| g.bounded_lag(length)),
            pending: info.as_ref().map_or(0, |g| g.pending),
            oldest_pending_id,
            oldest_pending_age_ms,
            last_delivered_id: info.as_ref().map(|g| g.last_delivered_id.clone()),
            entries_read: info.as_ref().and_then(|g| g.entries_read),
            owner,
            dead_letters,
        });
    }
    let totals = totals(&partitions);
    let slowest_partition = partitions
        .iter()
        .filter(|p| p.backlog() > 0)
        .max_by_key(|p| (p.backlog(), p.oldest_pending_age_ms.unwrap_or(0)))
        .map(|p| p.partition);
    Ok(StageSnapshot {
        stage: group.to_owned(),
        mode: match stage.spec.mode {
            ConsumeMode::Owned => "owned",
            ConsumeMode::Shared => "shared",
        },
        input: stage.input_name(),
        partitions,
        consumers: consumers.into_values().collect(),
        totals,
        slowest_partition,
    })
}

/// Whether `e` says Redis (or the node of a slot) could not be reached.
fn is_unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
}

fn totals(partitions: &[PartitionSnapshot]) -> Totals {
    let mut totals = Totals::default();
    for p in partitions {
        totals.length += p.length;
        match p.lag {
            Some(lag) => totals.lag += lag,
            None => totals.lag_unknown_partitions += 1,
        }
        totals.pending += p.pending;
        totals.backlog += p.backlog();
        totals.dead_letters += p.dead_letters;
        totals.entries_read += p.entries_read.unwrap_or(0);
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(partition: u32, lag: Option<u64>, pending: u64) -> PartitionSnapshot {
        PartitionSnapshot {
            partition,
            stream: format!("t:{{{partition}}}:s:x"),
            length: 10,
            group_exists: true,
            lag,
            pending,
            oldest_pending_id: None,
            oldest_pending_age_ms: None,
            last_delivered_id: None,
            entries_read: Some(1),
            owner: None,
            dead_letters: 1,
        }
    }

    #[test]
    fn totals_count_an_unknown_lag_at_the_streams_length() {
        let partitions = [partition(0, Some(2), 1), partition(1, None, 0)];
        assert_eq!(
            totals(&partitions),
            Totals {
                length: 20,
                lag: 2,
                lag_unknown_partitions: 1,
                pending: 1,
                backlog: 13,
                dead_letters: 2,
                entries_read: 2,
            }
        );
    }
}
