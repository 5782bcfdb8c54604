//! The background duties of a stage: trimming its input streams below what every group has
//! acknowledged, capping its dead-letter streams, and deleting consumers that have been idle
//! with nothing pending.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    admin_ops::{backlog_gauges, delete_idle_consumers, trim_stream},
    config::StageTuning,
    connection::Redis,
    stage::spec::Source,
    stats::StageStats,
};

pub(crate) async fn run(
    redis: Redis,
    group: String,
    consumer: String,
    sources: Vec<Source>,
    tuning: StageTuning,
    stats: Arc<StageStats>,
    shutdown: CancellationToken,
) {
    let cleanup_every =
        (tuning.consumer_idle_delete / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut next_cleanup = Instant::now() + cleanup_every;
    let mut next_trim = Instant::now() + tuning.trim_interval;
    let mut next_gauges = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_gauges {
            export_gauges(&redis, &group, &sources).await;
            next_gauges = Instant::now() + GAUGE_INTERVAL;
        }
        if !tuning.trim_interval.is_zero() && now >= next_trim {
            trim(&redis, &group, &sources, tuning.max_len, &stats).await;
            trim_dead_letters(&redis, &group, &sources, tuning.dead_letter_max_len, &stats).await;
            next_trim = Instant::now() + tuning.trim_interval;
        }
        if now >= next_cleanup {
            let idle_ms = tuning.consumer_idle_delete.as_millis() as u64;
            match delete_idle_consumers(&redis, &sources, &group, &consumer, idle_ms).await {
                Ok(deleted) if !deleted.is_empty() => {
                    tracing::info!(%group, ?deleted, "deleted idle consumers");
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%group, error = %e, "idle consumer cleanup failed"),
            }
            next_cleanup = Instant::now() + cleanup_every;
        }
        let mut wake = next_cleanup.min(next_gauges);
        if !tuning.trim_interval.is_zero() {
            wake = wake.min(next_trim);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// How often the stream length, lag, pending and dead-letter gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

async fn export_gauges(redis: &Redis, group: &str, sources: &[Source]) {
    for source in sources {
        let Ok((length, lag, pending, dead_letters)) = backlog_gauges(redis, source, group).await
        else {
            continue;
        };
        let stream = source.logical.to_string();
        let partition = source.partition.to_string();
        metrics::gauge!("tickflow_stream_length", "stream" => stream.clone(), "partition" => partition.clone())
            .set(length as f64);
        metrics::gauge!("tickflow_dead_letter_length", "stream" => stream.clone(), "partition" => partition.clone())
            .set(dead_letters as f64);
        metrics::gauge!("tickflow_group_pending", "group" => group.to_owned(), "stream" => stream.clone(), "partition" => partition.clone())
            .set(pending as f64);
        if let Some(lag) = lag {
            metrics::gauge!("tickflow_group_lag", "group" => group.to_owned(), "stream" => stream, "partition" => partition)
                .set(lag as f64);
        }
    }
}

async fn trim(redis: &Redis, group: &str, sources: &[Source], max_len: u64, stats: &StageStats) {
    for source in sources {
        match trim_stream(redis, &source.stream, max_len).await {
            Ok(outcome) => {
                stats.trimmed.fetch_add(outcome.trimmed, Ordering::Relaxed);
                metrics::counter!("tickflow_trimmed_total", "stream" => source.stream.to_string())
                    .increment(outcome.trimmed);
                if outcome.trimmed_unacknowledged > 0 {
                    stats
                        .trimmed_unacknowledged
                        .fetch_add(outcome.trimmed_unacknowledged, Ordering::Relaxed);
                    metrics::counter!("tickflow_trimmed_unacknowledged_total", "stream" => source.stream.to_string())
                        .increment(outcome.trimmed_unacknowledged);
                    tracing::error!(
                        %group,
                        stream = %source.stream,
                        deleted = outcome.trimmed_unacknowledged,
                        max_len,
                        "hard cap TICKFLOW_MAX_LEN deleted entries that a group had not acknowledged"
                    );
                }
            }
            Err(e) => tracing::debug!(%group, stream = %source.stream, error = %e, "trim failed"),
        }
    }
}

/// Caps every dead-letter stream of the stage at `max_len` entries, dropping the oldest.
/// Nothing else bounds them: a flood of bad input would otherwise grow them, and Redis's
/// memory, without end. The trim script serves as it is: a dead-letter stream has no
/// consumer group, so everything it deletes is counted as forced by the cap.
async fn trim_dead_letters(
    redis: &Redis,
    group: &str,
    sources: &[Source],
    max_len: u64,
    stats: &StageStats,
) {
    for source in sources {
        match trim_stream(redis, &source.dead_letter, max_len).await {
            Ok(outcome) => stats.record_dead_letters_dropped(
                source,
                outcome.trimmed + outcome.trimmed_unacknowledged,
                max_len,
            ),
            Err(e) => tracing::debug!(
                %group,
                dead_letter = %source.dead_letter,
                error = %e,
                "dead-letter trim failed"
            ),
        }
    }
}
