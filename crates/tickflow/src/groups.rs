//! `tickflow groups reset STAGE --to …`: moves a stage's position in its input streams
//! (`XGROUP SETID` on every partition), to read again from an earlier point or to skip a
//! backlog. Printed as a dry run unless `--yes`; refused while the stage has live
//! consumers unless `--force`.

use anyhow::bail;
use clap::{Args, Subcommand};
use redis::Value;
use streams_core::{
    ConsumeMode,
    connection::{Connection, query_each},
    inspect::{ConsumerInfo, GroupInfo},
};

use crate::{
    format::Paint,
    pipeline::{PipelineArgs, Stage},
    tail::is_stream_id,
};

/// A consumer of a shared stage that tried to read this recently counts as live: every
/// consumer reads again at least every `TICKFLOW_BLOCK_MS`, which is at most 60 s.
const LIVE_IDLE_MS: u64 = 60_000;

/// `tickflow groups`'s commands.
#[derive(Debug, Clone, Subcommand)]
pub enum GroupsCommand {
    /// Move a stage's position in its input (XGROUP SETID per partition).
    #[command(after_help = "Examples:
  tickflow groups reset analytics --to start            # dry run: what would change
  tickflow groups reset analytics --to start --yes      # with analytics stopped
  tickflow groups reset engine --to 2026-12-06T09:30:00Z --partition 3 --yes
  tickflow groups reset transform --to end --yes         # skip the backlog

--to start: every entry still in the stream is delivered again; end: only new ones; an
entry id or an RFC 3339 time: the entries after it. Pending entries stay pending (the
stage handles them first). After a reset to an id or a time Redis cannot tell the lag
until the group has read past it (`status` shows ?). Entries handled again are handled
again: the stage's outputs and state (books, analytics' counts) see them twice.")]
    Reset(ResetArgs),
}

/// `tickflow groups reset`'s options.
#[derive(Debug, Clone, Args)]
pub struct ResetArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The stage (its consumer group).
    pub stage: String,
    /// Where to: start, end, an entry id, or an RFC 3339 time.
    #[arg(long, value_name = "WHERE")]
    pub to: String,
    /// Only this partition.
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
    /// Apply it (without: print what would change).
    #[arg(long)]
    pub yes: bool,
    /// Even while the stage has live consumers (their batches in hand are committed
    /// after the move, and they read on from the new position).
    #[arg(long)]
    pub force: bool,
}

/// Where a reset moves the group to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Before the first entry (`0`).
    Start,
    /// After the last entry (`$`).
    End,
    /// After this entry id.
    Id(String),
    /// After every entry appended before this time (ms since the Unix epoch).
    Time(u64),
}

impl Position {
    /// Parses `--to`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "start" => Position::Start,
            "end" => Position::End,
            id if is_stream_id(id) => Position::Id(id.to_owned()),
            time => match time.parse::<jiff::Timestamp>() {
                Ok(t) if t.as_millisecond() >= 0 => Position::Time(t.as_millisecond() as u64),
                _ => bail!(
                    "--to takes start, end, an entry id (1764160000123-0) or an RFC 3339 time \
                     (2026-12-06T09:30:00Z), not {time:?}"
                ),
            },
        })
    }

    /// The `XGROUP SETID` arguments: the id, and `ENTRIESREAD` when it is known.
    pub fn setid_args(&self) -> Vec<String> {
        match self {
            // Nothing read yet: Redis can then tell the lag again at once.
            Position::Start => vec!["0".into(), "ENTRIESREAD".into(), "0".into()],
            Position::End => vec!["$".into()],
            Position::Id(id) => vec![id.clone()],
            // Entries appended at or after the time are delivered: the group's last
            // delivered id is the last one possible just before it.
            Position::Time(0) => vec!["0".into()],
            Position::Time(ms) => vec![format!("{}-{}", ms - 1, u64::MAX)],
        }
    }

    fn describe(&self) -> String {
        match self {
            Position::Start => "start".into(),
            Position::End => "end".into(),
            Position::Id(id) => format!("after {id}"),
            Position::Time(ms) => {
                format!("from {}", crate::format::time_us(ms.saturating_mul(1000)))
            }
        }
    }
}

/// Runs `tickflow groups …`.
pub async fn run(command: GroupsCommand) -> anyhow::Result<()> {
    match command {
        GroupsCommand::Reset(args) => reset(args).await,
    }
}

async fn reset(args: ResetArgs) -> anyhow::Result<()> {
    let position = Position::parse(&args.to)?;
    let pipeline = args.pipeline.pipeline()?;
    let stage = pipeline.stage(&args.stage)?;
    let inputs = stage.inputs_of(args.partition)?;
    let mut conn = pipeline.connection().await?;
    let paint = Paint::stdout();

    let live = live_consumers(&pipeline, stage, &mut conn).await?;
    crate::format::line(format_args!(
        "{} {} --to {} ({}){}",
        paint.bold("groups reset"),
        stage.name(),
        args.to,
        position.describe(),
        if args.yes {
            ""
        } else {
            ": dry run, nothing changes without --yes"
        }
    ));
    crate::format::line(format_args!(
        "  {:>4}  {:<24} {:>8} {:>8}",
        "PART", "LAST-DELIVERED", "LAG", "PENDING"
    ));
    let mut present = Vec::new();
    for input in &inputs {
        let group = GroupInfo::read(&mut conn, &input.stream)
            .await?
            .into_iter()
            .find(|g| g.name == stage.name());
        match group {
            Some(group) => {
                crate::format::line(format_args!(
                    "  {:>4}  {:<24} {:>8} {:>8}",
                    input.partition,
                    group.last_delivered_id,
                    group.lag.map_or("?".into(), |l| l.to_string()),
                    group.pending
                ));
                present.push(*input);
            }
            None => crate::format::line(format_args!(
                "  {:>4}  (no group yet: the stage creates it when it starts; left alone)",
                input.partition
            )),
        }
    }
    crate::format::line(format_args!(
        "  → every partition above moves to {} (pending entries stay pending)",
        position.describe()
    ));
    if !live.is_empty() {
        let names = live.join(", ");
        if !args.force {
            bail!(
                "stage {} has live consumers ({names}): stop it first (or --force, and its \
                 batches in hand are committed after the move)",
                stage.name()
            );
        }
        crate::format::line(format_args!(
            "{}",
            paint.warn(&format!("  live consumers ({names}): going on (--force)"))
        ));
    }
    if !args.yes {
        return Ok(());
    }
    // One request per partition (each is a slot of its own on a cluster), sent at once.
    let moves = present
        .iter()
        .map(|input| {
            redis::cmd("XGROUP")
                .arg("SETID")
                .arg(&input.stream)
                .arg(stage.name())
                .arg(position.setid_args())
                .clone()
        })
        .collect();
    let failed: Vec<String> = query_each(&conn, moves)
        .await
        .into_iter()
        .zip(&present)
        .filter_map(|(reply, input)| {
            Some(format!("partition {}: {}", input.partition, reply.err()?))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "moving stage {}'s partitions failed, the others moved: {}",
            stage.name(),
            failed.join("; ")
        );
    }
    crate::format::line(format_args!(
        "moved {} partitions of stage {} to {}",
        present.len(),
        stage.name(),
        position.describe()
    ));
    Ok(())
}

/// The stage's live consumers: for an owned stage, its unexpired members (a consumer that
/// stops leaves at once); for a shared one, consumers that tried to read within
/// [`LIVE_IDLE_MS`].
async fn live_consumers(
    pipeline: &crate::pipeline::Pipeline,
    stage: &Stage,
    conn: &mut Connection,
) -> anyhow::Result<Vec<String>> {
    match stage.spec.mode {
        ConsumeMode::Owned => {
            let now_ms = crate::pipeline::redis_now_ms(conn).await?;
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(pipeline.keys().members(stage.name()))
                .arg(format!("({now_ms}"))
                .arg("+inf")
                .arg("BYSCORE")
                .query_async(conn)
                .await?;
            Ok(members)
        }
        ConsumeMode::Shared => {
            let mut live = std::collections::BTreeSet::new();
            for input in &stage.inputs {
                let reply: redis::RedisResult<Value> =
                    ConsumerInfo::command(&input.stream, stage.name())
                        .query_async(conn)
                        .await;
                if let Ok(reply) = reply {
                    live.extend(
                        ConsumerInfo::parse(reply)
                            .into_iter()
                            .filter(|c| c.idle_ms < LIVE_IDLE_MS)
                            .map(|c| c.name),
                    );
                }
            }
            Ok(live.into_iter().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_start_end_an_id_or_a_time() {
        assert_eq!(
            Position::parse("start").unwrap().setid_args(),
            ["0", "ENTRIESREAD", "0"]
        );
        assert_eq!(Position::parse("end").unwrap().setid_args(), ["$"]);
        assert_eq!(
            Position::parse("1764160000123-4").unwrap(),
            Position::Id("1764160000123-4".into())
        );
        let at = Position::parse("2023-11-14T22:13:20.123+01:00").unwrap();
        assert_eq!(at, Position::Time(1_699_996_400_123));
        assert_eq!(
            at.setid_args(),
            [format!("1699996400122-{}", u64::MAX)],
            "an entry appended at that very millisecond is read again"
        );
        for bad in ["yesterday", "2023-13-01T00:00:00Z", "", "12-x"] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
    }
}
