//! Throughput of one stage on one redis-server: how many envelopes per second a single
//! forwarding stage moves from `in` to `out`, next to what the same server takes as raw
//! pipelined XADD.
//!
//! ```text
//! cargo run --release -p streams-core --features test-util --example stage_bench -- \
//!     [--entries N] [--partitions P] [--batch 64,256,1024] [--modes shared,owned] \
//!     [--xadd-chunk 1000] [--json]
//! ```
//!
//! Uses `REDIS_URL` if set (keys go under a fresh namespace per run and are deleted after
//! it), else starts a private redis-server. For each batch size and mode, in a fresh
//! namespace:
//!
//! 1. pre-fills N envelopes (~100-byte protobuf-like payloads) round-robin over the P
//!    partitions of `in`, with pipelined XADD on one connection: the timed baseline;
//! 2. starts one stage (one consumer, `InputFormat::Envelope`) whose handler appends each
//!    envelope to the same partition of `out`, and times it from start until the `out`
//!    partitions hold N entries (polled every 5 ms on a separate connection);
//! 3. stops the stage gracefully and checks: N entries out, nothing pending, nothing
//!    dead-lettered. A failed check prints a loud error and the exit status is non-zero.
//!
//! Next to the wall time it records the CPU time of redis-server (`INFO cpu`) and of this
//! process (`/proc/self/stat`, the stage and the 5 ms poller), redis' time per command
//! (`INFO commandstats`), and the stage's own batch/handler/ack-forward histograms.
//!
//! `--json` prints one JSON object per run on stdout instead of the tables; progress
//! always goes to stderr. `RUST_LOG` filters the stage's logs (default `warn`, to stderr).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redis::{AsyncConnectionConfig, aio::MultiplexedConnection};
use serde_json::json;
use streams_core::{
    Config, ConsumeMode, Delivery, Envelope, Handler, HandlerError, InputFormat, Inputs, KeySpace,
    Outputs, Redis, Stage, StageSpec, Stats,
    config::{StageTuning, redact},
    telemetry,
    testing::{RedisServer, unique_namespace},
};
use tokio_util::sync::CancellationToken;

const INPUT: &str = "in";
const OUTPUT: &str = "out";
const PAYLOAD_BYTES: usize = 100;
const POLL_EVERY: Duration = Duration::from_millis(5);
/// A run whose output has not grown for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "\
usage: stage_bench [--entries N] [--partitions P] [--batch B[,B...]] [--modes shared,owned]
                   [--xadd-chunk C] [--json]
  --entries N      entries per run (default 200000)
  --partitions P   partitions of `in` and `out` (default 16)
  --batch LIST     stage batch sizes to run in turn (default 256), e.g. 64,256,1024
  --modes LIST     consume modes to run for each batch size (default shared,owned)
  --xadd-chunk C   XADDs per pipeline in the pre-fill (default 1000)
  --json           one JSON object per run on stdout instead of the tables
REDIS_URL: use this server instead of starting a private redis-server.";

// ----- arguments -------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Args {
    entries: u64,
    partitions: u32,
    batches: Vec<usize>,
    modes: Vec<ConsumeMode>,
    xadd_chunk: usize,
    json: bool,
}

impl Args {
    fn parse(raw: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut args = Self {
            entries: 200_000,
            partitions: 16,
            batches: vec![256],
            modes: vec![ConsumeMode::Shared, ConsumeMode::Owned],
            xadd_chunk: 1000,
            json: false,
        };
        let mut raw = raw.into_iter();
        while let Some(arg) = raw.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| raw.next())
                    .with_context(|| format!("{name} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--entries" => args.entries = parse_number("--entries", &value("--entries")?)?,
                "--partitions" => {
                    args.partitions = parse_number("--partitions", &value("--partitions")?)?;
                }
                "--batch" => {
                    args.batches = value("--batch")?
                        .split(',')
                        .map(|b| parse_number("--batch", b))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--modes" => {
                    args.modes = value("--modes")?
                        .split(',')
                        .map(|m| match m.trim() {
                            "shared" => Ok(ConsumeMode::Shared),
                            "owned" => Ok(ConsumeMode::Owned),
                            other => bail!("unknown mode {other:?} (shared or owned)"),
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                "--xadd-chunk" => {
                    args.xadd_chunk = parse_number("--xadd-chunk", &value("--xadd-chunk")?)?;
                }
                "--json" => args.json = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if args.entries == 0 || args.partitions == 0 || args.xadd_chunk == 0 {
            bail!("--entries, --partitions and --xadd-chunk must be positive");
        }
        if args.batches.is_empty() || args.batches.iter().any(|b| !(1..=10_000).contains(b)) {
            bail!("--batch sizes must be between 1 and 10000");
        }
        if args.modes.is_empty() {
            bail!("--modes must name at least one mode");
        }
        Ok(args)
    }
}

fn parse_number<T: std::str::FromStr>(flag: &str, text: &str) -> anyhow::Result<T> {
    let cleaned: String = text.trim().chars().filter(|c| *c != '_').collect();
    cleaned
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not a positive integer"))
}

fn mode_name(mode: ConsumeMode) -> &'static str {
    match mode {
        ConsumeMode::Shared => "shared",
        ConsumeMode::Owned => "owned",
    }
}

// ----- the handler -----------------------------------------------------------------------

/// Appends every envelope, unchanged, to the same partition of `out`.
#[derive(Debug)]
struct Forward {
    out_keys: Vec<String>,
}

impl Handler for Forward {
    async fn handle(&mut self, delivery: &Delivery, out: &mut Outputs) -> Result<(), HandlerError> {
        let envelope = delivery
            .envelope
            .as_ref()
            .ok_or_else(|| HandlerError::Permanent("not an envelope".into()))?;
        let key = self
            .out_keys
            .get(delivery.partition as usize)
            .ok_or_else(|| HandlerError::Permanent("partition out of range".into()))?;
        out.append(key.as_str(), envelope);
        Ok(())
    }
}

// ----- workload --------------------------------------------------------------------------

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn field_varint(buf: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(buf, field << 3);
    put_varint(buf, v);
}

fn field_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(buf, (field << 3) | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A protobuf-encoded order-like message of exactly `PAYLOAD_BYTES` bytes.
fn payload(i: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(PAYLOAD_BYTES);
    field_bytes(&mut buf, 1, format!("SYM{:04}", i % 5000).as_bytes());
    field_varint(&mut buf, 2, i);
    field_varint(&mut buf, 3, 10_000 + (i * 7919) % 90_000);
    field_varint(&mut buf, 4, 1 + (i * 31) % 500);
    field_varint(&mut buf, 5, i % 2);
    field_varint(&mut buf, 6, 1_700_000_000_000_000 + i);
    field_bytes(
        &mut buf,
        7,
        format!("client-{:06}-order-{i:012}", i % 997).as_bytes(),
    );
    // Pad with an opaque bytes field (tag + 1-byte length + data).
    if let Some(pad) = PAYLOAD_BYTES.checked_sub(buf.len() + 2) {
        let data: Vec<u8> = (0..pad).map(|k| (i as u8).wrapping_add(k as u8)).collect();
        field_bytes(&mut buf, 15, &data);
    }
    buf
}

fn envelope(i: u64, partition: u32) -> Envelope {
    Envelope::new("order.new", format!("SYM{partition:04}"), payload(i))
}

/// Bytes of field names and values of one entry (what XADD stores, before overheads).
fn entry_bytes() -> usize {
    envelope(123_456, 3)
        .to_fields()
        .iter()
        .map(|(n, v)| n.len() + v.len())
        .sum()
}

// ----- measurements ----------------------------------------------------------------------

/// What is known about the machine and the server.
#[derive(Debug, Clone)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    redis_version: String,
    redis: String,
    loadavg: String,
    clock_ticks: f64,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `sysconf(_SC_CLK_TCK)` without unsafe code: ask getconf, assume 100 if that fails.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of this process, all threads (10 ms resolution).
fn own_cpu_seconds(ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / ticks
}

/// One call's statistics from `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default)]
struct CommandStat {
    calls: u64,
    usec: u64,
}

/// A moment's CPU counters of both processes and redis' per-command times.
#[derive(Debug, Clone)]
struct Probe {
    at: Instant,
    client_cpu: f64,
    redis_user: f64,
    redis_sys: f64,
    redis_main_thread: f64,
    commands: BTreeMap<String, CommandStat>,
}

fn info_value(info: &str, name: &str) -> Option<f64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

async fn probe(conn: &mut MultiplexedConnection, ticks: f64) -> anyhow::Result<Probe> {
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut commands = BTreeMap::new();
    for line in stats.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let mut stat = CommandStat::default();
        for kv in rest.split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => stat.calls = v.parse().unwrap_or(0),
                Some(("usec", v)) => stat.usec = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        commands.insert(name.to_owned(), stat);
    }
    let user = info_value(&cpu, "used_cpu_user").unwrap_or(f64::NAN);
    let sys = info_value(&cpu, "used_cpu_sys").unwrap_or(f64::NAN);
    let main = info_value(&cpu, "used_cpu_user_main_thread").unwrap_or(f64::NAN)
        + info_value(&cpu, "used_cpu_sys_main_thread").unwrap_or(f64::NAN);
    Ok(Probe {
        at: Instant::now(),
        client_cpu: own_cpu_seconds(ticks),
        redis_user: user,
        redis_sys: sys,
        redis_main_thread: main,
        commands,
    })
}

/// Where the time of one phase went.
#[derive(Debug, Clone)]
struct Cost {
    wall: f64,
    client_cpu: f64,
    redis_user: f64,
    redis_sys: f64,
    redis_main_thread: f64,
    /// Per command: calls and seconds, largest first (script-internal calls included, and
    /// also counted in their EVALSHA's time).
    commands: Vec<(String, u64, f64)>,
}

impl Cost {
    fn between(before: &Probe, after: &Probe) -> Self {
        let mut commands: Vec<(String, u64, f64)> = after
            .commands
            .iter()
            .filter_map(|(name, a)| {
                let b = before.commands.get(name).copied().unwrap_or_default();
                let calls = a.calls.saturating_sub(b.calls);
                let usec = a.usec.saturating_sub(b.usec);
                (calls > 0).then(|| (name.clone(), calls, usec as f64 / 1e6))
            })
            .collect();
        commands.sort_by(|a, b| b.2.total_cmp(&a.2));
        Self {
            wall: after.at.duration_since(before.at).as_secs_f64(),
            client_cpu: after.client_cpu - before.client_cpu,
            redis_user: after.redis_user - before.redis_user,
            redis_sys: after.redis_sys - before.redis_sys,
            redis_main_thread: after.redis_main_thread - before.redis_main_thread,
            commands,
        }
    }

    fn redis_cpu(&self) -> f64 {
        self.redis_user + self.redis_sys
    }

    fn commands_json(&self) -> serde_json::Value {
        self.commands
            .iter()
            .map(|(name, calls, secs)| json!({"command": name, "calls": calls, "seconds": secs}))
            .collect()
    }

    fn json(&self, entries: u64) -> serde_json::Value {
        let per_entry = |s: f64| s * 1e6 / entries as f64;
        json!({
            "wall_seconds": self.wall,
            "client_cpu_seconds": self.client_cpu,
            "redis_cpu_user_seconds": self.redis_user,
            "redis_cpu_sys_seconds": self.redis_sys,
            "redis_main_thread_cpu_seconds": self.redis_main_thread,
            "client_cpu_us_per_entry": per_entry(self.client_cpu),
            "redis_cpu_us_per_entry": per_entry(self.redis_cpu()),
            "redis_commands": self.commands_json(),
        })
    }
}

/// The stage's own histograms for one run (group label), from the Prometheus recorder.
#[derive(Debug, Clone, Default)]
struct Phases {
    batches: f64,
    entries: f64,
    handle_seconds: f64,
    ack_forward_seconds: f64,
}

fn metric(text: &str, name: &str, group: &str) -> f64 {
    let label = format!("stage=\"{group}\"");
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn phases(rendered: &str, group: &str) -> Phases {
    Phases {
        batches: metric(rendered, "tickflow_batch_size_count", group),
        entries: metric(rendered, "tickflow_batch_size_sum", group),
        handle_seconds: metric(rendered, "tickflow_handler_duration_seconds_sum", group),
        ack_forward_seconds: metric(rendered, "tickflow_ack_forward_duration_seconds_sum", group),
    }
}

// ----- redis helpers ---------------------------------------------------------------------

async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    Ok(streams_core::connection::client(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

async fn lengths(conn: &mut MultiplexedConnection, keys: &[String]) -> anyhow::Result<u64> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("XLEN").arg(key);
    }
    let lens: Vec<u64> = pipe.query_async(conn).await?;
    Ok(lens.iter().sum())
}

async fn pending(
    conn: &mut MultiplexedConnection,
    keys: &[String],
    group: &str,
) -> anyhow::Result<u64> {
    let mut total = 0;
    for key in keys {
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(key)
            .arg(group)
            .query_async(conn)
            .await?;
        let redis::Value::Array(parts) = reply else {
            bail!("XPENDING {key} answered {reply:?}");
        };
        let count: u64 = redis::from_redis_value(
            parts
                .into_iter()
                .next()
                .context("XPENDING without a count")?,
        )?;
        total += count;
    }
    Ok(total)
}

/// Deletes every key of `namespace`.
async fn delete_namespace(conn: &mut MultiplexedConnection, namespace: &str) -> anyhow::Result<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

// ----- one run ---------------------------------------------------------------------------

#[derive(Debug)]
struct RunReport {
    index: usize,
    mode: ConsumeMode,
    batch: usize,
    entries: u64,
    xadd: Cost,
    stage: Cost,
    phases: Phases,
    failures: Vec<String>,
}

impl RunReport {
    fn xadd_rate(&self) -> f64 {
        self.entries as f64 / self.xadd.wall
    }

    fn stage_rate(&self) -> f64 {
        self.entries as f64 / self.stage.wall
    }
}

struct Bench {
    url: String,
    args: Args,
    machine: Machine,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Bench {
    async fn run(
        &self,
        index: usize,
        mode: ConsumeMode,
        batch: usize,
    ) -> anyhow::Result<RunReport> {
        let n = self.args.entries;
        let ticks = self.machine.clock_ticks;
        let namespace = unique_namespace("bench");
        let keys = KeySpace::new(namespace.clone(), self.args.partitions);
        let in_keys: Vec<String> = keys
            .all_partitions()
            .map(|p| keys.stream(INPUT, p))
            .collect();
        let out_keys: Vec<String> = keys
            .all_partitions()
            .map(|p| keys.stream(OUTPUT, p))
            .collect();
        let dlq_keys: Vec<String> = keys
            .all_partitions()
            .map(|p| keys.dead_letter(INPUT, p))
            .collect();
        let mut conn = connect(&self.url).await?;
        let mut poll = connect(&self.url).await?;

        // 1. Pre-fill, pipelines built before the clock starts.
        eprintln!(
            "[run {index}] {} batch {batch}: pre-filling {n} entries over {} partitions",
            mode_name(mode),
            self.args.partitions
        );
        let mut pipelines = Vec::new();
        let mut pipe = redis::pipe();
        let mut in_pipe = 0;
        for i in 0..n {
            let p = (i % u64::from(self.args.partitions)) as u32;
            let fields = envelope(i, p).to_fields();
            pipe.xadd(&in_keys[p as usize], "*", &fields).ignore();
            in_pipe += 1;
            if in_pipe == self.args.xadd_chunk {
                pipelines.push(std::mem::replace(&mut pipe, redis::pipe()));
                in_pipe = 0;
            }
        }
        if in_pipe > 0 {
            pipelines.push(pipe);
        }
        let before = probe(&mut conn, ticks).await?;
        for pipe in &pipelines {
            let () = pipe.query_async(&mut conn).await?;
        }
        let after = probe(&mut conn, ticks).await?;
        let xadd = Cost::between(&before, &after);
        drop(pipelines);
        let filled = lengths(&mut conn, &in_keys).await?;
        if filled != n {
            bail!("pre-fill wrote {filled} entries, expected {n}");
        }
        eprintln!(
            "[run {index}] raw pipelined XADD: {:.3} s, {:.0} entries/s",
            xadd.wall,
            n as f64 / xadd.wall
        );

        // 2. One stage, timed until the output holds every entry.
        let group = format!("bench-{}-{batch}-{index}", mode_name(mode));
        let mut config = Config::for_tests(&self.url, &namespace, self.args.partitions);
        config.consumer_name = "bench-consumer".into();
        config.pool_size = 16;
        config.stage = StageTuning {
            batch_size: batch,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(60),
            trim_interval: Duration::ZERO,
            ..StageTuning::default()
        };
        let spec = StageSpec {
            group: group.clone(),
            inputs: Inputs::Partitioned(INPUT.into()),
            mode,
            format: InputFormat::Envelope,
        };
        let handler = Forward {
            out_keys: out_keys.clone(),
        };
        let shutdown = CancellationToken::new();
        let stats = Stats::default();
        let stage = Stage::new(
            spec,
            handler,
            Redis::from_config(&config)?,
            &config,
            &stats,
            shutdown.clone(),
        );
        let mut failures = Vec::new();
        let before = probe(&mut poll, ticks).await?;
        let task = tokio::spawn(stage.run());
        let mut last = 0;
        let mut last_progress = Instant::now();
        loop {
            let done = lengths(&mut poll, &out_keys).await?;
            if done >= n {
                break;
            }
            if done > last {
                last = done;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL_TIMEOUT {
                failures.push(format!(
                    "no progress for {STALL_TIMEOUT:?}: {done} of {n} entries forwarded"
                ));
                break;
            }
            if task.is_finished() {
                failures.push(format!(
                    "the stage stopped by itself after {done} of {n} entries"
                ));
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let after = probe(&mut poll, ticks).await?;
        let stage_cost = Cost::between(&before, &after);

        // 3. Graceful stop, then the checks.
        shutdown.cancel();
        match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Err(_) => failures.push(format!("the stage did not stop within {STOP_TIMEOUT:?}")),
            Ok(Err(e)) => failures.push(format!("the stage task failed: {e}")),
            Ok(Ok(Err(e))) => failures.push(format!("the stage returned an error: {e}")),
            Ok(Ok(Ok(()))) => {}
        }
        let forwarded = lengths(&mut conn, &out_keys).await?;
        if forwarded != n {
            failures.push(format!("{forwarded} entries in `out`, expected {n}"));
        }
        let still_pending = pending(&mut conn, &in_keys, &group).await?;
        if still_pending != 0 {
            failures.push(format!(
                "XPENDING of group {group}: {still_pending} entries, expected 0"
            ));
        }
        let dead = lengths(&mut conn, &dlq_keys).await?;
        if dead != 0 {
            failures.push(format!("{dead} entries dead-lettered, expected 0"));
        }
        if let Some(counters) = stats.stages().first().map(|s| s.counters())
            && (counters.processed != n || counters.failed != 0 || counters.dead_lettered != 0)
        {
            failures.push(format!(
                "stage counters: processed {} (expected {n}), failed {}, dead-lettered {}",
                counters.processed, counters.failed, counters.dead_lettered
            ));
        }
        let phases = phases(&self.metrics.render(), &group);
        delete_namespace(&mut conn, &namespace).await?;
        eprintln!(
            "[run {index}] stage {} batch {batch}: {:.3} s, {:.0} entries/s{}",
            mode_name(mode),
            stage_cost.wall,
            n as f64 / stage_cost.wall,
            if failures.is_empty() {
                String::new()
            } else {
                " (FAILED)".into()
            }
        );
        Ok(RunReport {
            index,
            mode,
            batch,
            entries: n,
            xadd,
            stage: stage_cost,
            phases,
            failures,
        })
    }

    fn json(&self, run: &RunReport) -> serde_json::Value {
        let m = &self.machine;
        json!({
            "run": run.index,
            "mode": mode_name(run.mode),
            "batch": run.batch,
            "entries": run.entries,
            "partitions": self.args.partitions,
            "payload_bytes": PAYLOAD_BYTES,
            "entry_bytes": entry_bytes(),
            "seconds": run.stage.wall,
            "entries_per_sec": run.stage_rate(),
            "xadd_chunk": self.args.xadd_chunk,
            "xadd_seconds": run.xadd.wall,
            "xadd_entries_per_sec": run.xadd_rate(),
            "ok": run.failures.is_empty(),
            "failures": run.failures,
            "stage": run.stage.json(run.entries),
            "xadd": run.xadd.json(run.entries),
            "stage_phases": {
                "batches": run.phases.batches,
                "entries": run.phases.entries,
                "handle_seconds": run.phases.handle_seconds,
                "ack_forward_seconds": run.phases.ack_forward_seconds,
            },
            "machine": {
                "nproc": m.nproc,
                "cpu_model": m.cpu_model,
                "redis_version": m.redis_version,
                "redis": m.redis,
                "loadavg_at_start": m.loadavg,
                "loadavg_now": loadavg(),
            },
        })
    }
}

// ----- output ----------------------------------------------------------------------------

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_tables(bench: &Bench, runs: &[RunReport]) {
    let m = &bench.machine;
    let a = &bench.args;
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(out, "tickflow stage_bench: one stage, one redis-server");
    let _ = writeln!(
        out,
        "machine: nproc={}  cpu=\"{}\"  redis-server {} ({})",
        m.nproc, m.cpu_model, m.redis_version, m.redis
    );
    let _ = writeln!(
        out,
        "load average at start: {}   now: {}",
        m.loadavg,
        loadavg()
    );
    let _ = writeln!(
        out,
        "workload: {} entries/run over {} partitions, payload {} B, {} B of fields/entry, \
         pre-fill XADD pipelines of {}",
        a.entries,
        a.partitions,
        PAYLOAD_BYTES,
        entry_bytes(),
        a.xadd_chunk
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>3}  {:<6}  {:>5}  {:>8}  {:>7}  {:>10}  {:>11}  {:>6}  {:>9}  {:>10}",
        "run",
        "mode",
        "batch",
        "entries",
        "seconds",
        "entries/s",
        "raw XADD/s",
        "/XADD",
        "redis CPU",
        "client CPU"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:>3}  {:<6}  {:>5}  {:>8}  {:>7.3}  {:>10}  {:>11}  {:>5.2}x  {:>8.0}%  {:>9.0}%{}",
            r.index,
            mode_name(r.mode),
            r.batch,
            r.entries,
            r.stage.wall,
            thousands(r.stage_rate()),
            thousands(r.xadd_rate()),
            r.stage_rate() / r.xadd_rate(),
            100.0 * r.stage.redis_cpu() / r.stage.wall,
            100.0 * r.stage.client_cpu / r.stage.wall,
            if r.failures.is_empty() {
                ""
            } else {
                "  FAILED"
            }
        );
    }
    let rates: Vec<f64> = runs.iter().map(RunReport::xadd_rate).collect();
    let _ = writeln!(
        out,
        "raw pipelined XADD baseline (pre-fill of each run, same server): median {} entries/s \
         (min {}, max {})",
        thousands(median(rates.clone())),
        thousands(rates.iter().copied().fold(f64::INFINITY, f64::min)),
        thousands(rates.iter().copied().fold(0.0, f64::max)),
    );
    let _ = writeln!(
        out,
        "CPU columns: CPU-seconds per wall-second during the stage phase (100% = one core); \
         client = this whole process (stage + 5 ms XLEN poller)."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "where the time goes (stage phase; µs of CPU per entry):"
    );
    for r in runs {
        let per = |s: f64| s * 1e6 / r.entries as f64;
        let p = &r.phases;
        let avg_batch = if p.batches > 0.0 {
            p.entries / p.batches
        } else {
            0.0
        };
        let rest = r.stage.wall - p.handle_seconds - p.ack_forward_seconds;
        let commands: Vec<String> = r
            .stage
            .commands
            .iter()
            .filter(|(name, _, _)| name != "info")
            .take(5)
            .map(|(name, calls, secs)| format!("{name} {secs:.2}s/{calls}"))
            .collect();
        let _ = writeln!(
            out,
            "{:>3} {} /{}: redis {:.2} µs/entry (user {:.2}s sys {:.2}s), client {:.2} µs/entry | \
             {:.0} batches of {:.0} | handle {:.2}s, ack+forward {:.2}s, read+rest {:.2}s | \
             redis cmds: {}",
            r.index,
            mode_name(r.mode),
            r.batch,
            per(r.stage.redis_cpu()),
            r.stage.redis_user,
            r.stage.redis_sys,
            per(r.stage.client_cpu),
            p.batches,
            avg_batch,
            p.handle_seconds,
            p.ack_forward_seconds,
            rest,
            commands.join(", ")
        );
        let _ = writeln!(
            out,
            "    pre-fill: redis {:.2} µs/entry, client {:.2} µs/entry",
            per(r.xadd.redis_cpu()),
            per(r.xadd.client_cpu)
        );
        for failure in &r.failures {
            let _ = writeln!(out, "    FAILED: {failure}");
        }
    }
    let _ = writeln!(
        out,
        "(redis command times: seconds/calls from INFO commandstats; commands run inside \
         scripts appear both on their own and inside evalsha)"
    );
    print!("{out}");
}

// ----- main ------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    match real_main().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("stage_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn real_main() -> anyhow::Result<bool> {
    let args = Args::parse(std::env::args().skip(1))?;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    // The stage's histograms (as in production, where services install the recorder).
    let metrics = telemetry::install_metrics();

    let (server, url, source) = match std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => {
            let source = format!("REDIS_URL={}", redact(&url));
            (None, url, source)
        }
        None => {
            let server = RedisServer::start();
            let url = server.url();
            let source = format!("private redis-server at {url}");
            (Some(server), url, source)
        }
    };
    let mut conn = connect(&url).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let redis_version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let machine = Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        redis_version,
        redis: source,
        loadavg: loadavg(),
        clock_ticks: clock_ticks(),
    };
    eprintln!(
        "stage_bench: {} entries, {} partitions, batch sizes {:?}, modes {:?}; {}; nproc {}, \
         load average {}",
        args.entries,
        args.partitions,
        args.batches,
        args.modes.iter().map(|m| mode_name(*m)).collect::<Vec<_>>(),
        machine.redis,
        machine.nproc,
        machine.loadavg
    );
    let bench = Bench {
        url,
        args: args.clone(),
        machine,
        metrics,
    };
    let mut runs = Vec::new();
    for &batch in &args.batches {
        for &mode in &args.modes {
            let run = bench.run(runs.len() + 1, mode, batch).await?;
            for failure in &run.failures {
                eprintln!(
                    "\n!!!!!!!!!! CORRECTNESS FAILURE in run {} ({} batch {}): {failure} !!!!!!!!!!\n",
                    run.index,
                    mode_name(run.mode),
                    run.batch
                );
            }
            if args.json {
                println!("{}", bench.json(&run));
            }
            runs.push(run);
        }
    }
    if !args.json {
        print_tables(&bench, &runs);
    }
    drop(server);
    let failed: Vec<usize> = runs
        .iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| r.index)
        .collect();
    if failed.is_empty() {
        Ok(true)
    } else {
        eprintln!(
            "\n!!!!!!!!!! stage_bench: CORRECTNESS CHECKS FAILED in runs {failed:?} !!!!!!!!!!"
        );
        Ok(false)
    }
}
