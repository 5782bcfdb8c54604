//! In-process counters of each stage, read by `/admin/status` and `/readyz`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde::Serialize;

use crate::{
    keys::KeySpace,
    stage::spec::{ConsumeMode, Source, StageSpec},
};

/// The registry of every stage running in this process.
#[derive(Clone, Default, Debug)]
pub struct Stats {
    stages: Arc<Mutex<Vec<Arc<StageStats>>>>,
}

/// The counters of one stage in this process.
#[derive(Debug)]
pub struct StageStats {
    /// The consumer group.
    pub group: String,
    /// Shared or owned.
    pub mode: ConsumeMode,
    pub(crate) sources: Vec<Source>,
    /// Entries handled and acknowledged (with their outputs).
    pub processed: AtomicU64,
    /// Handler failures that left an entry pending for a retry.
    pub failed: AtomicU64,
    /// Entries moved to a dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Entries handled again whose outputs were not appended (already acknowledged).
    pub duplicates_skipped: AtomicU64,
    /// Entries claimed from other consumers.
    pub claimed: AtomicU64,
    /// Entries handled whose commit was refused because this consumer no longer held
    /// their partition's lease (taken over, expired, or lost in a failover): nothing of
    /// them was written.
    pub fenced: AtomicU64,
    /// Times the blocking read connection was re-established.
    pub reconnects: AtomicU64,
    /// Entries trimmed after every group acknowledged them.
    pub trimmed: AtomicU64,
    /// Entries deleted by the hard cap before every group had acknowledged them.
    pub trimmed_unacknowledged: AtomicU64,
    /// The oldest dead letters dropped because a dead-letter stream grew past its cap
    /// (`TICKFLOW_DLQ_MAX_LEN`).
    pub dead_letters_dropped: AtomicU64,
    /// Whether the consumer groups exist (created or verified).
    pub groups_ready: AtomicBool,
    /// Whether the last Redis call of the loop succeeded.
    pub redis_ok: AtomicBool,
}

/// A snapshot of a stage's counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StageCounters {
    /// See [`StageStats::processed`].
    pub processed: u64,
    /// See [`StageStats::failed`].
    pub failed: u64,
    /// See [`StageStats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`StageStats::duplicates_skipped`].
    pub duplicates_skipped: u64,
    /// See [`StageStats::claimed`].
    pub claimed: u64,
    /// See [`StageStats::fenced`].
    pub fenced: u64,
    /// See [`StageStats::reconnects`].
    pub reconnects: u64,
    /// See [`StageStats::trimmed`].
    pub trimmed: u64,
    /// See [`StageStats::trimmed_unacknowledged`].
    pub trimmed_unacknowledged: u64,
    /// See [`StageStats::dead_letters_dropped`].
    pub dead_letters_dropped: u64,
}

impl Stats {
    /// Registers a stage and returns its counters.
    pub(crate) fn register(&self, spec: &StageSpec, keys: &KeySpace) -> Arc<StageStats> {
        let stats = Arc::new(StageStats {
            group: spec.group.clone(),
            mode: spec.mode,
            sources: spec.sources(keys),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates_skipped: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
            trimmed_unacknowledged: AtomicU64::new(0),
            dead_letters_dropped: AtomicU64::new(0),
            groups_ready: AtomicBool::new(false),
            redis_ok: AtomicBool::new(false),
        });
        self.stages
            .lock()
            .expect("stats poisoned")
            .push(stats.clone());
        stats
    }

    /// Every registered stage.
    pub fn stages(&self) -> Vec<Arc<StageStats>> {
        self.stages.lock().expect("stats poisoned").clone()
    }

    /// The stage registered for `group`, if any.
    pub fn stage(&self, group: &str) -> Option<Arc<StageStats>> {
        self.stages().into_iter().find(|s| s.group == group)
    }
}

impl StageStats {
    pub(crate) fn mark_ready(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counters(&self) -> StageCounters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StageCounters {
            processed: load(&self.processed),
            failed: load(&self.failed),
            dead_lettered: load(&self.dead_lettered),
            duplicates_skipped: load(&self.duplicates_skipped),
            claimed: load(&self.claimed),
            fenced: load(&self.fenced),
            reconnects: load(&self.reconnects),
            trimmed: load(&self.trimmed),
            trimmed_unacknowledged: load(&self.trimmed_unacknowledged),
            dead_letters_dropped: load(&self.dead_letters_dropped),
        }
    }

    /// Records that a commit of `entries` entries of `source` was refused because this
    /// consumer's lease of the partition is gone: in the counter, the metric
    /// `tickflow_fenced_total{stage,partition}` and the log, in one place.
    pub(crate) fn record_fenced(&self, source: &Source, entries: u64) {
        self.fenced.fetch_add(entries, Ordering::Relaxed);
        metrics::counter!(
            "tickflow_fenced_total",
            "stage" => self.group.clone(),
            "partition" => source.partition.to_string()
        )
        .increment(entries);
        tracing::warn!(
            group = %self.group,
            partition = source.partition,
            entries,
            "commit refused: this consumer's lease of the partition is gone (taken over, \
             expired, or lost in a failover); nothing of the batch was written"
        );
    }

    /// Records that the cap `max_len` dropped `dropped` of the oldest entries of
    /// `source`'s dead-letter stream: in the counter, the metric
    /// `tickflow_dead_letters_dropped_total{stage,partition}` and the log, in one place.
    pub(crate) fn record_dead_letters_dropped(&self, source: &Source, dropped: u64, max_len: u64) {
        if dropped == 0 {
            return;
        }
        self.dead_letters_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        metrics::counter!(
            "tickflow_dead_letters_dropped_total",
            "stage" => self.group.clone(),
            "partition" => source.partition.to_string()
        )
        .increment(dropped);
        tracing::warn!(
            group = %self.group,
            dead_letter = %source.dead_letter,
            dropped,
            max_len,
            "dead-letter stream over TICKFLOW_DLQ_MAX_LEN: its oldest entries were dropped"
        );
    }
}
