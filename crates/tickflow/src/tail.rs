//! `tickflow tail STREAM`: a stream's entries, decoded, across its partitions in id order;
//! with `--follow`, new ones as they come.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use redis::Value;
use tickflow_proto::topology;

use crate::{
    entries::{Read, id_order, range},
    format::Paint,
    pipeline::{Pipeline, PipelineArgs},
};

/// How long one blocking read of `--follow` waits (Ctrl-C is noticed between reads).
const FOLLOW_BLOCK: Duration = Duration::from_secs(1);
/// How often `--follow` reads again on a Redis Cluster, when nothing came.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The most entries one read of `--follow` brings.
const FOLLOW_COUNT: usize = 500;
/// The most entries `--count` or `--from -N` may ask for at once.
const MAX_COUNT: u64 = 100_000;

/// `tickflow tail`'s options.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  tickflow tail inbound                          # the last 10 entries of every partition, merged
  tickflow tail validated --partition 3 --from start --count 50
  tickflow tail market --from end --follow       # new entries as they come (Ctrl-C stops)
  tickflow tail dlq:inbound                      # transform's dead letters, with dlq.reason
  tickflow tail ingest_stream --json | jq .fields

STREAM is a logical stream (inbound, validated, market: every partition, or --partition),
dlq:<stream> for its dead letters, or any stream key as redis-cli names it (an external
stream such as ingest_stream, its dead letters ingest_stream:dlq, or a key like
'tickflow:{3}:s:inbound').")]
pub struct TailArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The stream (see below).
    pub stream: String,
    /// Only this partition of a logical stream.
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
    /// Where to start: `start`, `end` (only what comes next), an entry id, or `-N` (the
    /// last N entries).
    #[arg(
        long,
        default_value = "-10",
        allow_hyphen_values = true,
        value_name = "WHERE"
    )]
    pub from: String,
    /// The most entries to print from the start point [default: 10]; with --follow, stop
    /// after this many in all.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    pub count: Option<u64>,
    /// Keep printing new entries until Ctrl-C (or --count).
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Where `--from` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum From {
    Start,
    End,
    Id(String),
    Last(u64),
}

impl From {
    fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "start" => From::Start,
            "end" => From::End,
            last if last.starts_with('-') => {
                let n: u64 = last[1..].parse().map_err(|_| {
                    anyhow::anyhow!("--from -N takes a number of entries, not {last:?}")
                })?;
                if n == 0 || n > MAX_COUNT {
                    bail!("--from -N: N between 1 and {MAX_COUNT}");
                }
                From::Last(n)
            }
            id if is_stream_id(id) => From::Id(id.to_owned()),
            other => {
                bail!("--from takes start, end, an entry id (1700000000000-0) or -N, not {other:?}")
            }
        })
    }
}

/// Whether `text` is a stream id: `ms` or `ms-seq`.
pub fn is_stream_id(text: &str) -> bool {
    let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
    !ms.is_empty()
        && !seq.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && seq.bytes().all(|b| b.is_ascii_digit())
}

/// The Redis streams `name` stands for, with their partitions.
pub fn resolve(
    pipeline: &Pipeline,
    name: &str,
    partition: Option<u32>,
) -> anyhow::Result<Vec<(String, Option<u32>)>> {
    let keys = pipeline.keys();
    let logical = [topology::INBOUND, topology::VALIDATED, topology::MARKET];
    let (stream, dead_letters) = match name.strip_prefix("dlq:") {
        Some(stream) => (stream, true),
        None => (name, false),
    };
    if logical.contains(&stream) {
        if let Some(p) = partition
            && p >= keys.partitions()
        {
            bail!(
                "{stream} has partitions 0..{} (TICKFLOW_PARTITIONS), not {p}",
                keys.partitions()
            );
        }
        return Ok(keys
            .all_partitions()
            .filter(|p| partition.is_none_or(|only| only == *p))
            .map(|p| {
                let key = if dead_letters {
                    keys.dead_letter(stream, p)
                } else {
                    keys.stream(stream, p)
                };
                (key, Some(p))
            })
            .collect());
    }
    if dead_letters {
        bail!(
            "dlq: goes with a logical stream ({}); an external stream's dead letters are \
             <stream>:dlq",
            logical.join(", ")
        );
    }
    if partition.is_some() {
        bail!(
            "--partition goes with a logical stream ({})",
            logical.join(", ")
        );
    }
    Ok(vec![(name.to_owned(), None)])
}

/// Prints the entries asked for.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let from = From::parse(&args.from)?;
    let pipeline = args.pipeline.pipeline()?;
    let streams = resolve(&pipeline, &args.stream, args.partition)?;
    let mut conn = pipeline.connection().await?;
    if let [(key, None)] = streams.as_slice() {
        let exists: bool = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
        if !exists {
            // Most likely a typo: say so on stderr (with --follow it may still appear).
            eprintln!(
                "tickflow: no stream {key:?} in this Redis (the logical streams are inbound, \
                 validated, market; dlq:<stream> for their dead letters)"
            );
        }
    }
    let paint = Paint::stdout();
    let print = |read: &Read| {
        if args.json {
            crate::format::line(format_args!("{}", read.json()));
        } else {
            crate::format::line(format_args!("{}", read.line(paint)));
        }
    };
    let limit = args.count.map(|c| c as usize);
    let initial = match &from {
        From::Last(n) => limit.map_or(*n as usize, |c| c.min(*n as usize)),
        _ => limit.unwrap_or(10),
    };
    // Where --follow goes on from: each stream's last entry as of now.
    let mut cursors = Vec::new();
    for (stream, _) in &streams {
        let last = range(&mut conn, stream, "-", "+", 1, true).await?;
        cursors.push(last.first().map_or("0-0".to_owned(), |e| e.id.clone()));
    }
    let mut reads = Vec::new();
    for (stream, partition) in &streams {
        let entries = match &from {
            From::End => Vec::new(),
            From::Start => range(&mut conn, stream, "-", "+", initial, false).await?,
            From::Id(id) => range(&mut conn, stream, id, "+", initial, false).await?,
            From::Last(_) => range(&mut conn, stream, "-", "+", initial, true).await?,
        };
        reads.extend(entries.into_iter().map(|entry| Read {
            stream: stream.clone(),
            partition: *partition,
            entry,
        }));
    }
    reads.sort_by_key(Read::order);
    if matches!(from, From::Last(_)) {
        let skip = reads.len().saturating_sub(initial);
        reads.drain(..skip);
    } else {
        reads.truncate(initial);
    }
    let mut printed = 0;
    for read in &reads {
        print(read);
        printed += 1;
    }
    if !args.follow {
        return Ok(());
    }
    // One blocking read over every stream on a single Redis; on a cluster, whose streams
    // are in several slots, a read of each that does not block, every FOLLOW_POLL.
    let mut blocking = pipeline.blocking_connection(FOLLOW_BLOCK).await?;
    loop {
        if limit.is_some_and(|l| printed >= l) {
            return Ok(());
        }
        let read = |streams: &[&String], cursors: &[&String], block: bool| {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(FOLLOW_COUNT);
            if block {
                cmd.arg("BLOCK").arg(FOLLOW_BLOCK.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(streams).arg(cursors);
            cmd
        };
        let replies: Vec<Value> = match &mut blocking {
            Some(blocking) => {
                let cmd = read(
                    &streams.iter().map(|(s, _)| s).collect::<Vec<_>>(),
                    &cursors.iter().collect::<Vec<_>>(),
                    true,
                );
                tokio::select! {
                    reply = cmd.query_async(blocking) => vec![reply?],
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            None => {
                let cmds = streams
                    .iter()
                    .zip(&cursors)
                    .map(|((stream, _), cursor)| read(&[stream], &[cursor], false))
                    .collect();
                let replies = streams_core::connection::query_each(&conn, cmds)
                    .await
                    .into_iter()
                    .collect::<Result<Vec<Value>, _>>()?;
                if replies.iter().all(|r| *r == Value::Nil) {
                    tokio::select! {
                        _ = tokio::time::sleep(FOLLOW_POLL) => {}
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                    }
                }
                replies
            }
        };
        let mut batch = Vec::new();
        for (key, entries) in replies
            .into_iter()
            .map(streams_core::parse_read_reply)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
        {
            let Some(index) = streams.iter().position(|(s, _)| *s == key) else {
                continue;
            };
            if let Some(last) = entries.iter().map(|e| &e.id).max_by_key(|id| id_order(id)) {
                cursors[index] = last.clone();
            }
            batch.extend(entries.into_iter().map(|entry| Read {
                stream: key.clone(),
                partition: streams[index].1,
                entry,
            }));
        }
        batch.sort_by_key(Read::order);
        for read in &batch {
            if limit.is_some_and(|l| printed >= l) {
                return Ok(());
            }
            print(read);
            printed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_takes_start_end_an_id_or_the_last_n() {
        assert_eq!(From::parse("start").unwrap(), From::Start);
        assert_eq!(From::parse("end").unwrap(), From::End);
        assert_eq!(From::parse("-25").unwrap(), From::Last(25));
        assert_eq!(
            From::parse("1700000000000-3").unwrap(),
            From::Id("1700000000000-3".into())
        );
        assert_eq!(
            From::parse("1700000000000").unwrap(),
            From::Id("1700000000000".into())
        );
        for bad in ["-0", "-x", "yesterday", "1-", "-", "17-a"] {
            assert!(From::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_names_resolve_to_partitions_dead_letters_or_keys() {
        let pipeline = crate::pipeline::PipelineArgs {
            namespace: Some("t".into()),
            partitions: Some("2".into()),
            ..Default::default()
        }
        .pipeline()
        .unwrap();
        assert_eq!(
            resolve(&pipeline, "inbound", None).unwrap(),
            [
                ("t:{0}:s:inbound".into(), Some(0)),
                ("t:{1}:s:inbound".into(), Some(1))
            ]
        );
        assert_eq!(
            resolve(&pipeline, "dlq:market", Some(1)).unwrap(),
            [("t:{1}:dlq:market".into(), Some(1))]
        );
        assert_eq!(
            resolve(&pipeline, "ingest_stream", None).unwrap(),
            [("ingest_stream".into(), None)]
        );
        assert!(resolve(&pipeline, "inbound", Some(2)).is_err());
        assert!(resolve(&pipeline, "ingest_stream", Some(0)).is_err());
        assert!(resolve(&pipeline, "dlq:ingest_stream", None).is_err());
    }
}
