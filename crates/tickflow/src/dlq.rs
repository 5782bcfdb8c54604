//! `tickflow dlq list|show|replay|purge`: a stage's dead letters — why each was
//! dead-lettered, the entry itself decoded, back into the stream it came from, or gone.

use anyhow::bail;
use clap::{Args, Subcommand};
use streams_core::{
    connection::Connection,
    inspect::{self, OneReplay, StageInput},
};

use crate::{
    entries::{Read, range},
    format::{Paint, time_us},
    pipeline::{Pipeline, PipelineArgs, Stage},
    tail::is_stream_id,
};

/// The most dead letters one command reads or moves per partition.
const MAX_COUNT: u64 = 100_000;
/// Dead letters deleted per `XDEL`.
const PURGE_PAGE: usize = 1_000;

/// `tickflow dlq`'s commands.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// The dead letters, oldest first: id, partition, deliveries, what it was, and why.
    #[command(after_help = "Examples:
  tickflow dlq list --stage transform
  tickflow dlq list --stage engine --partition 3 --count 100 --json")]
    List {
        /// Which dead letters.
        #[command(flatten)]
        target: DlqTarget,
        /// The most to list [default: 20].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
        count: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, decoded: envelope, payload fields and every dlq.* field.
    #[command(after_help = "Examples:
  tickflow dlq show --stage transform --id 1764160000123-0")]
    Show {
        /// Which stage (and partition).
        #[command(flatten)]
        target: DlqTarget,
        /// The dead letter's id (as `dlq list` shows it).
        #[arg(long, value_name = "ID")]
        id: String,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back into the stream they came from (without their dlq.*
    /// fields), to be handled again: the oldest first, or one by --id.
    #[command(after_help = "Examples:
  tickflow dlq replay --stage transform                   # up to 1000 per partition
  tickflow dlq replay --stage engine --partition 3 --count 10
  tickflow dlq replay --stage engine --id 1764160000123-0

The same replay as the admin API's POST /admin/dlq/replay, with every service down too.
An entry that still cannot be handled is dead-lettered again.")]
    Replay {
        /// Which dead letters.
        #[command(flatten)]
        target: DlqTarget,
        /// The most to move per partition [default: 1000].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT), conflicts_with = "id")]
        count: Option<u64>,
        /// Only this dead letter.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
    /// Delete dead letters for good (the oldest first, or one by --id); prints what it
    /// would delete unless --yes is given.
    #[command(after_help = "Examples:
  tickflow dlq purge --stage transform                    # says what it would delete
  tickflow dlq purge --stage transform --yes
  tickflow dlq purge --stage engine --partition 3 --id 1764160000123-0 --yes")]
    Purge {
        /// Which dead letters.
        #[command(flatten)]
        target: DlqTarget,
        /// The most to delete per partition [default: all there are now].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=u64::MAX), conflicts_with = "id")]
        count: Option<u64>,
        /// Only this dead letter.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// Whose dead letters.
#[derive(Debug, Clone, Args)]
pub struct DlqTarget {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The stage (its consumer group: ingest, transform, engine, analytics).
    #[arg(long, value_name = "STAGE")]
    pub stage: String,
    /// Only this partition.
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
}

/// Runs one `tickflow dlq` command.
pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            target,
            count,
            json,
        } => list(&target, count.unwrap_or(20) as usize, json).await,
        DlqCommand::Show { target, id, json } => show(&target, &id, json).await,
        DlqCommand::Replay { target, count, id } => replay(&target, count, id).await,
        DlqCommand::Purge {
            target,
            count,
            id,
            yes,
        } => purge(&target, count, id, yes).await,
    }
}

fn resolve(target: &DlqTarget) -> anyhow::Result<(Pipeline, Stage)> {
    let pipeline = target.pipeline.pipeline()?;
    let stage = pipeline.stage(&target.stage)?.clone();
    stage.inputs_of(target.partition)?;
    Ok((pipeline, stage))
}

async fn list(target: &DlqTarget, count: usize, json: bool) -> anyhow::Result<()> {
    let (pipeline, stage) = resolve(target)?;
    let mut conn = pipeline.connection().await?;
    let inputs = stage.inputs_of(target.partition)?;
    let mut reads = Vec::new();
    let mut total = 0u64;
    for input in &inputs {
        let length: u64 = redis::cmd("XLEN")
            .arg(&input.dead_letter)
            .query_async(&mut conn)
            .await?;
        total += length;
        let entries = range(&mut conn, &input.dead_letter, "-", "+", count, false).await?;
        reads.extend(entries.into_iter().map(|entry| Read {
            stream: input.dead_letter.clone(),
            partition: Some(input.partition),
            entry,
        }));
    }
    reads.sort_by_key(Read::order);
    reads.truncate(count);
    if json {
        for read in &reads {
            crate::format::line(format_args!("{}", read.json()));
        }
        return Ok(());
    }
    let paint = Paint::stdout();
    crate::format::line(format_args!(
        "{} dead letters of stage {} ({}){}",
        total,
        stage.name(),
        stage.input_name(),
        if (reads.len() as u64) < total {
            format!(", the oldest {}", reads.len())
        } else {
            String::new()
        }
    ));
    if reads.is_empty() {
        return Ok(());
    }
    crate::format::line(format_args!(
        "  {:<20} {:>4} {:>4}  {:<24} REASON",
        "ID", "PART", "DLV", "WHAT"
    ));
    for read in &reads {
        let view = read.view();
        let what = match &view.envelope {
            Some(e) => format!("{} {}", e.event_type, e.key),
            None => "(not an envelope)".to_owned(),
        };
        let dlq = view.dlq.unwrap_or_default();
        crate::format::line(format_args!(
            "  {:<20} {:>4} {:>4}  {:<24} {}",
            read.entry.id,
            read.partition.map_or("-".into(), |p| p.to_string()),
            dlq.deliveries.map_or("?".into(), |d| d.to_string()),
            what,
            paint.warn(&dlq.reason),
        ));
    }
    Ok(())
}

/// Finds dead letter `id` among `inputs`.
async fn find(
    conn: &mut Connection,
    inputs: &[&StageInput],
    id: &str,
) -> anyhow::Result<Option<(StageInput, Read)>> {
    if !is_stream_id(id) {
        bail!("--id takes an entry id as `dlq list` shows it (1764160000123-0), not {id:?}");
    }
    for input in inputs {
        if let Some(entry) = range(conn, &input.dead_letter, id, id, 1, false)
            .await?
            .into_iter()
            .next()
        {
            let read = Read {
                stream: input.dead_letter.clone(),
                partition: Some(input.partition),
                entry,
            };
            return Ok(Some(((*input).clone(), read)));
        }
    }
    Ok(None)
}

async fn show(target: &DlqTarget, id: &str, json: bool) -> anyhow::Result<()> {
    let (pipeline, stage) = resolve(target)?;
    let mut conn = pipeline.connection().await?;
    let Some((_, read)) = find(&mut conn, &stage.inputs_of(target.partition)?, id).await? else {
        bail!("stage {} has no dead letter {id}", stage.name());
    };
    if json {
        crate::format::line(format_args!("{}", read.json()));
        return Ok(());
    }
    let view = read.view();
    let paint = Paint::stdout();
    crate::format::line(format_args!(
        "{} {}",
        paint.bold("dead letter"),
        read.entry.id
    ));
    crate::format::line(format_args!("  stream      {}", read.stream));
    if let Some(dlq) = &view.dlq {
        crate::format::line(format_args!("  reason      {}", paint.warn(&dlq.reason)));
        crate::format::line(format_args!("  group       {}", dlq.group));
        crate::format::line(format_args!(
            "  deliveries  {}",
            dlq.deliveries.map_or("?".into(), |d| d.to_string())
        ));
        crate::format::line(format_args!(
            "  from        {} {}",
            dlq.stream, dlq.source_id
        ));
        if let Some(at) = dlq.at_us {
            crate::format::line(format_args!("  at          {}", time_us(at)));
        }
    }
    match &view.envelope {
        Some(e) => {
            crate::format::line(format_args!("  type        {}", e.event_type));
            crate::format::line(format_args!("  key         {}", e.key));
            crate::format::line(format_args!("  origin      {}", time_us(e.origin_us)));
            if let Some(trace) = &e.traceparent {
                crate::format::line(format_args!("  traceparent {trace}"));
            }
            if let Some(payload) = &e.payload {
                crate::format::line(format_args!(
                    "  payload     {}",
                    serde_json::to_string_pretty(payload)?.replace('\n', "\n              ")
                ));
            }
        }
        None => {
            for (name, value) in &view.fields {
                crate::format::line(format_args!("  field       {name} = {value}"));
            }
        }
    }
    if let Some(error) = &view.error {
        crate::format::line(format_args!("  undecodable {}", paint.warn(error)));
    }
    Ok(())
}

async fn replay(target: &DlqTarget, count: Option<u64>, id: Option<String>) -> anyhow::Result<()> {
    let (pipeline, stage) = resolve(target)?;
    let inputs = stage.inputs_of(target.partition)?;
    if let Some(id) = id {
        let mut conn = pipeline.connection().await?;
        let Some((input, _)) = find(&mut conn, &inputs, &id).await? else {
            bail!("stage {} has no dead letter {id}", stage.name());
        };
        match inspect::replay_dead_letter(&pipeline.redis, &input, &id).await? {
            OneReplay::Moved => {
                crate::format::line(format_args!("replayed {id} into {}", input.stream))
            }
            OneReplay::Missing => bail!("dead letter {id} is gone (replayed or purged meanwhile)"),
            OneReplay::Changed => {
                bail!(
                    "{} changed while replaying {id}; nothing was done, try again",
                    input.dead_letter
                )
            }
            OneReplay::Kept => bail!(
                "dead letter {id} cannot go back whole (it kept only the first fields of its \
                 entry): it stays; `dlq show` has what it kept"
            ),
        }
        return Ok(());
    }
    let count = count.unwrap_or(1000);
    let mut total = 0;
    for input in inputs {
        let moved = inspect::replay_dead_letters(&pipeline.redis, input, count).await?;
        if moved > 0 {
            crate::format::line(format_args!("replayed {moved} into {}", input.stream));
        }
        total += moved;
    }
    crate::format::line(format_args!(
        "replayed {total} dead letters of stage {} (at most {count} per partition)",
        stage.name()
    ));
    Ok(())
}

async fn purge(
    target: &DlqTarget,
    count: Option<u64>,
    id: Option<String>,
    yes: bool,
) -> anyhow::Result<()> {
    let (pipeline, stage) = resolve(target)?;
    let inputs = stage.inputs_of(target.partition)?;
    let mut conn = pipeline.connection().await?;
    if let Some(id) = id {
        let Some((input, read)) = find(&mut conn, &inputs, &id).await? else {
            bail!("stage {} has no dead letter {id}", stage.name());
        };
        if !yes {
            crate::format::line(format_args!("would delete {}", read.line(Paint::stdout())));
            crate::format::line(format_args!("nothing deleted: run again with --yes"));
            return Ok(());
        }
        let _: u64 = redis::cmd("XDEL")
            .arg(&input.dead_letter)
            .arg(&id)
            .query_async(&mut conn)
            .await?;
        crate::format::line(format_args!("deleted {id} from {}", input.dead_letter));
        return Ok(());
    }
    let mut total = 0;
    for input in inputs {
        let length: u64 = redis::cmd("XLEN")
            .arg(&input.dead_letter)
            .query_async(&mut conn)
            .await?;
        let planned = count.map_or(length, |c| c.min(length));
        if planned == 0 {
            continue;
        }
        if !yes {
            crate::format::line(format_args!(
                "would delete {planned} of {length} from {}",
                input.dead_letter
            ));
            total += planned;
            continue;
        }
        // Only what is there now, oldest first: a dead letter added meanwhile is newer
        // than the last one read here and stays.
        let mut deleted = 0;
        while deleted < planned {
            let page = ((planned - deleted) as usize).min(PURGE_PAGE);
            let entries = range(&mut conn, &input.dead_letter, "-", "+", page, false).await?;
            if entries.is_empty() {
                break;
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let removed: u64 = redis::cmd("XDEL")
                .arg(&input.dead_letter)
                .arg(&ids)
                .query_async(&mut conn)
                .await?;
            deleted += removed.max(1);
        }
        crate::format::line(format_args!("deleted {deleted} from {}", input.dead_letter));
        total += deleted;
    }
    if yes {
        crate::format::line(format_args!(
            "deleted {total} dead letters of stage {}",
            stage.name()
        ));
    } else {
        crate::format::line(format_args!(
            "would delete {total} dead letters of stage {}; nothing deleted: run again with --yes",
            stage.name()
        ));
    }
    Ok(())
}
