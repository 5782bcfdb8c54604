//! `tickflow status`: where events are, per stage and partition, straight from Redis.

use clap::Args;

use crate::{
    format::{Paint, age},
    pipeline::PipelineArgs,
    snapshot::{self, Snapshot, StageSnapshot},
};

/// `tickflow status`'s options.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  tickflow status                                # every stage
  tickflow status --stage engine
  tickflow status --json | jq '.stages[] | {stage, backlog: .totals.backlog}'
  REDIS_URL=redis://redis:6379 TICKFLOW_NAMESPACE=prod tickflow status

Columns: LENGTH entries in the stream; LAG not yet delivered to the stage (? when Redis
cannot tell); PENDING delivered, not yet acknowledged; OLDEST age of the oldest pending
entry; OWNER the consumer holding the partition's lease; DLQ dead letters. The slowest
partition is marked with >. The JSON schema is in docs/operations.md.")]
pub struct StatusArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// One JSON object (a stable schema) instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Only this stage (its consumer group: ingest, transform, engine, analytics).
    #[arg(long, value_name = "STAGE")]
    pub stage: Option<String>,
}

/// Prints the pipeline's status.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let pipeline = args.pipeline.pipeline()?;
    let mut conn = pipeline.connection().await?;
    let snapshot = snapshot::take(&pipeline, &mut conn, args.stage.as_deref()).await?;
    if args.json {
        crate::format::line(format_args!("{}", serde_json::to_string(&snapshot)?));
    } else {
        crate::format::line(render(&snapshot, Paint::stdout()).trim_end());
    }
    Ok(())
}

/// The tables, one per stage.
pub fn render(snapshot: &Snapshot, paint: Paint) -> String {
    let mut out = format!(
        "{} ({} partitions)\n",
        paint.bold(&format!("namespace {}", snapshot.namespace)),
        snapshot.partitions
    );
    for stage in &snapshot.stages {
        out.push('\n');
        out.push_str(&render_stage(stage, paint));
    }
    out
}

fn render_stage(stage: &StageSnapshot, paint: Paint) -> String {
    let mut out = format!(
        "{} ({}, reads {})\n",
        paint.bold(&stage.stage),
        stage.mode,
        stage.input
    );
    out.push_str(&format!(
        "  {:>4} {:>9} {:>8} {:>8} {:>7}  {:<18} {:>6}\n",
        "PART", "LENGTH", "LAG", "PENDING", "OLDEST", "OWNER", "DLQ"
    ));
    for p in &stage.partitions {
        let slowest = stage.slowest_partition == Some(p.partition);
        let row = format!(
            "{} {:>4} {:>9} {:>8} {:>8} {:>7}  {:<18} {:>6}",
            if slowest { ">" } else { " " },
            p.partition,
            p.length,
            p.lag.map_or("?".to_owned(), |l| l.to_string()),
            p.pending,
            p.oldest_pending_age_ms.map_or("-".to_owned(), age),
            truncate(
                p.owner
                    .as_deref()
                    .unwrap_or(if p.group_exists { "-" } else { "(no group)" }),
                18
            ),
            p.dead_letters,
        );
        out.push_str(&if slowest { paint.warn(&row) } else { row });
        out.push('\n');
    }
    let t = &stage.totals;
    let lag = if t.lag_unknown_partitions > 0 {
        format!("{}+?", t.lag)
    } else {
        t.lag.to_string()
    };
    out.push_str(&paint.bold(&format!(
        " {:>5} {:>9} {:>8} {:>8} {:>7}  {:<18} {:>6}",
        "total", t.length, lag, t.pending, "", "", t.dead_letters
    )));
    out.push('\n');
    let consumers = if stage.consumers.is_empty() {
        "none".to_owned()
    } else {
        stage
            .consumers
            .iter()
            .map(|c| {
                format!(
                    "{} (idle {}, pending {})",
                    c.name,
                    age(c.idle_ms),
                    c.pending
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!("  consumers: {consumers}\n"));
    if let Some(p) = stage.slowest_partition {
        out.push_str(&paint.dim(&format!(
            "  slowest: partition {p} (backlog {})\n",
            stage
                .partitions
                .iter()
                .find(|q| q.partition == p)
                .map_or(0, |q| q.backlog())
        )));
    }
    out
}

/// `text` cut to `width` characters, with `…` when cut.
fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}
