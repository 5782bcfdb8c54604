//! The Redis servers behind a run, each through a connection of its own: the one server,
//! or every node of a cluster (masters and replicas, as `CLUSTER NODES` lists them). What
//! a run reads from them: CPU (`INFO cpu`) and commands (`INFO commandstats`) before and
//! after the measured flow, the keys each holds (`DBSIZE`), the partitions each master
//! serves, and Redis's round trip.
//!
//! The round trip is that of `redis-benchmark -c 1 -n 20000 XADD k '*' f v` (its p50 and
//! p99), on the node that serves `k`, a key outside the pipeline's namespace, deleted
//! afterwards. Without `redis-benchmark` on `PATH`, or for a Redis that needs a password
//! or TLS (which would have to go on its command line), the bench sends the same XADDs
//! itself, one after the other, and times each.
//!
//! Per-node connections go to the address a node announces, with the scheme and
//! credentials of `REDIS_URL`'s first seed, as `streams_core::Redis::dedicated_for` does.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, aio::MultiplexedConnection};
use streams_core::{KeySpace, config::RedisMode, connection::node_info};
use tickflow_proto::topology;

use super::report::{CommandUsage, NodeUsage, RedisUsage, RoundTrip, RoundTripSample};

/// Requests of one round-trip measurement (as the issue's `redis-benchmark -n 20000`).
const RTT_REQUESTS: usize = 20_000;
/// How long one reply on a node's connection may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Redis nodes of a run.
pub(crate) struct Nodes {
    mode: RedisMode,
    nodes: Vec<Node>,
}

/// One node and its connection.
struct Node {
    /// `host:port`.
    addr: String,
    role: Role,
    info: ConnectionInfo,
    conn: MultiplexedConnection,
    /// The slot ranges it serves (a cluster master's).
    slots: Vec<(u16, u16)>,
}

/// A node's part; ordered as reports list them (servers and masters before replicas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Server,
    Master,
    Replica,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }

    /// Whether the node serves clients' commands (a server or a master).
    fn serves(self) -> bool {
        self != Role::Replica
    }
}

/// Every node's counters at one moment.
pub(crate) struct Snapshot(Vec<Counters>);

/// One node's counters.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counters {
    cpu_seconds: f64,
    /// Calls and µs by command (INFO commandstats).
    commands: BTreeMap<String, (u64, u64)>,
}

/// Commands the bench itself sent during the measured flow (its reads and polls), by
/// their INFO commandstats name: they are left out of what the pipeline cost.
#[derive(Debug, Default, Clone)]
pub(crate) struct OwnCommands(BTreeMap<&'static str, u64>);

impl OwnCommands {
    /// Counts `calls` more of `command`.
    pub(crate) fn add(&mut self, command: &'static str, calls: u64) {
        *self.0.entry(command).or_default() += calls;
    }
}

impl Nodes {
    /// Connects to the server `url` names, or to every node of the cluster whose seeds it
    /// lists.
    pub(crate) async fn discover(url: &str, mode: RedisMode) -> anyhow::Result<Self> {
        let nodes = match mode {
            RedisMode::Standalone => {
                let info = url.into_connection_info()?;
                let conn = connect(&info).await.with_context(|| {
                    format!("connecting to {}", streams_core::config::redact(url))
                })?;
                vec![Node {
                    addr: address(info.addr()),
                    role: Role::Server,
                    info,
                    conn,
                    slots: Vec::new(),
                }]
            }
            RedisMode::Cluster => cluster_nodes(url).await?,
        };
        Ok(Self { mode, nodes })
    }

    /// `standalone` or `cluster`.
    pub(crate) fn mode_name(&self) -> &'static str {
        match self.mode {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        }
    }

    /// Every node's CPU and command counters now.
    pub(crate) async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let replies = futures::future::join_all(self.nodes.iter().map(|node| async move {
            let mut conn = node.conn.clone();
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .with_context(|| format!("INFO on {}", node.addr))?;
            Ok::<_, anyhow::Error>(parse_counters(&info))
        }))
        .await;
        Ok(Snapshot(
            replies.into_iter().collect::<anyhow::Result<_>>()?,
        ))
    }

    /// What the nodes did since `before`, over a flow of `events` events and `seconds`
    /// seconds, leaving out the bench's own commands; with each node's keys and the
    /// partitions (of `keys`) it serves, whose streams held `partition_entries` entries.
    pub(crate) async fn usage_since(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        window: Window<'_>,
    ) -> anyhow::Result<RedisUsage> {
        let owners = self.partition_owners(window.keys).await?;
        let mut nodes = Vec::new();
        let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut replica_cpu = 0.0;
        for (index, node) in self.nodes.iter().enumerate() {
            let delta = after.0[index].since(&before.0[index]);
            let commands: u64 = delta.commands.values().map(|(calls, _)| calls).sum();
            if node.role.serves() {
                for (name, (calls, usec)) in &delta.commands {
                    let total = totals.entry(name.clone()).or_default();
                    total.0 += calls;
                    total.1 += usec;
                }
            } else {
                replica_cpu += delta.cpu_seconds;
            }
            let mut conn = node.conn.clone();
            let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
            let partitions: Vec<u32> = owners
                .iter()
                .enumerate()
                .filter(|(_, owner)| **owner == Some(index))
                .map(|(p, _)| p as u32)
                .collect();
            nodes.push(NodeUsage {
                addr: node.addr.clone(),
                role: node.role.name(),
                cpu_seconds: delta.cpu_seconds,
                commands,
                ops_per_sec: commands as f64 / window.seconds.max(1e-9),
                stream_entries: partitions
                    .iter()
                    .map(|p| {
                        window
                            .partition_entries
                            .get(*p as usize)
                            .copied()
                            .unwrap_or(0)
                    })
                    .sum(),
                partitions,
                keys,
            });
        }
        // The first snapshot's INFO is counted once it has run: in the window.
        let serving = self.nodes.iter().filter(|n| n.role.serves()).count() as u64;
        let own = window.own.0.iter().chain([(&"info", &serving)]);
        for (name, calls) in own {
            if let Some(total) = totals.get_mut(*name) {
                total.0 = total.0.saturating_sub(*calls);
            }
        }
        let commands = totals.values().map(|(calls, _)| calls).sum();
        let per_event = |calls: u64| calls as f64 / window.events.max(1) as f64;
        let mut top: Vec<(u64, CommandUsage)> = totals
            .into_iter()
            .filter(|(_, (calls, _))| *calls > 0)
            .map(|(command, (calls, usec))| {
                let usage = CommandUsage {
                    per_event: per_event(calls),
                    usec_per_call: usec as f64 / calls as f64,
                    usec_per_event: usec as f64 / window.events.max(1) as f64,
                    command,
                    calls,
                };
                (usec, usage)
            })
            .collect();
        // By Redis's time: what costs, not only what is frequent.
        top.sort_by(|(a, a_usage), (b, b_usage)| {
            b.cmp(a).then(a_usage.command.cmp(&b_usage.command))
        });
        let top = top.into_iter().map(|(_, usage)| usage).collect();
        Ok(RedisUsage {
            mode: self.mode_name(),
            replica_cpu_seconds: replica_cpu,
            commands,
            top_commands: top,
            nodes,
        })
    }

    /// The CPU seconds of the server or the masters between two snapshots.
    pub(crate) fn serving_cpu(&self, before: &Snapshot, after: &Snapshot) -> f64 {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.role.serves())
            .map(|(i, _)| after.0[i].cpu_seconds - before.0[i].cpu_seconds)
            .sum()
    }

    /// For each partition of `keys`, the index of the node that serves its slot (every
    /// partition's is the server's in standalone mode).
    async fn partition_owners(&self, keys: &KeySpace) -> anyhow::Result<Vec<Option<usize>>> {
        if self.mode == RedisMode::Standalone {
            return Ok(keys.all_partitions().map(|_| Some(0)).collect());
        }
        let mut slots = Vec::new();
        for p in keys.all_partitions() {
            slots.push(self.slot_of(&keys.stream(topology::INBOUND, p)).await?);
        }
        Ok(slots.into_iter().map(|slot| self.master_of(slot)).collect())
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, asked of the first master).
    async fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let node = self.first_master()?;
        let mut conn = node.conn.clone();
        Ok(redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await?)
    }

    fn first_master(&self) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.role.serves())
            .context("no master in the cluster's view")
    }

    /// The index of the master serving `slot`.
    fn master_of(&self, slot: u16) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.role.serves()
                && node
                    .slots
                    .iter()
                    .any(|(start, end)| (*start..=*end).contains(&slot))
        })
    }

    /// Redis's round trip now (see the module docs), on a key of its own outside every
    /// namespace.
    pub(crate) async fn round_trip(
        &self,
    ) -> anyhow::Result<(RoundTripSample, &'static str, String)> {
        let key = format!(
            "tickflow-bench-rtt-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let node = match self.mode {
            RedisMode::Standalone => &self.nodes[0],
            RedisMode::Cluster => {
                let slot = self.slot_of(&key).await?;
                let index = self
                    .master_of(slot)
                    .with_context(|| format!("no master serves slot {slot}"))?;
                &self.nodes[index]
            }
        };
        let measured = match benchmark_command(&node.info) {
            Some(args) if redis_benchmark_present() => redis_benchmark(&args, &key)
                .await
                .map(|s| (s, "redis-benchmark")),
            _ => sequential_xadds(&node.info, &key)
                .await
                .map(|s| (s, "in-process")),
        };
        let mut conn = node.conn.clone();
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
        let (sample, method) = measured?;
        Ok((sample, method, node.addr.clone()))
    }

    /// `CONFIG SET name value` on every node.
    #[cfg(feature = "local-bench")]
    pub(crate) async fn config_set(&self, name: &str, value: &str) -> anyhow::Result<()> {
        for node in &self.nodes {
            let mut conn = node.conn.clone();
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut conn)
                .await
                .with_context(|| format!("CONFIG SET {name} {value} on {}", node.addr))?;
        }
        Ok(())
    }

    /// Deletes every key of `namespace` on every master (one `UNLINK` per key: keys of one
    /// node may still lie in different slots).
    #[cfg(feature = "local-bench")]
    pub(crate) async fn delete_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        let pattern = format!("{namespace}:*");
        for node in self.nodes.iter().filter(|n| n.role.serves()) {
            let mut conn = node.conn.clone();
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                if !keys.is_empty() {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("UNLINK").arg(key).ignore();
                    }
                    let _: () = pipe.query_async(&mut conn).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

/// What [`Nodes::usage_since`] measures over.
pub(crate) struct Window<'a> {
    /// Events accepted in it.
    pub(crate) events: u64,
    /// Its length.
    pub(crate) seconds: f64,
    /// The bench's own commands in it.
    pub(crate) own: &'a OwnCommands,
    /// The pipeline's partitions.
    pub(crate) keys: &'a KeySpace,
    /// Entries of each partition's streams at the end.
    pub(crate) partition_entries: &'a [u64],
}

/// A report's round trip from the measurements before and after the flow.
pub(crate) fn round_trip(
    before: (RoundTripSample, &'static str, String),
    after: (RoundTripSample, &'static str, String),
) -> RoundTrip {
    RoundTrip::of(before.0, after.0, before.1, before.2)
}

impl Counters {
    fn since(&self, before: &Counters) -> Counters {
        let commands = self
            .commands
            .iter()
            .map(|(name, (calls, usec))| {
                let (calls_before, usec_before) =
                    before.commands.get(name).copied().unwrap_or_default();
                (
                    name.clone(),
                    (
                        calls.saturating_sub(calls_before),
                        usec.saturating_sub(usec_before),
                    ),
                )
            })
            .collect();
        Counters {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            commands,
        }
    }
}

/// CPU seconds and commandstats from an `INFO cpu commandstats` reply.
fn parse_counters(info: &str) -> Counters {
    let mut counters = Counters::default();
    for line in info.lines() {
        let line = line.trim();
        if let Some(value) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            counters.cpu_seconds += value.parse::<f64>().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let field = |wanted: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(wanted)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            counters
                .commands
                .insert(name.to_owned(), (field("calls"), field("usec")));
        }
    }
    counters
}

/// `host:port` (or the socket path) of an address.
fn address(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => other.to_string(),
    }
}

/// A connection to one node, replies within [`RESPONSE_TIMEOUT`].
async fn connect(info: &ConnectionInfo) -> anyhow::Result<MultiplexedConnection> {
    let info = info
        .clone()
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    Ok(redis::Client::open(info)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Every live node of the cluster whose seeds `url` lists, from the first seed that
/// answers `CLUSTER NODES`.
async fn cluster_nodes(url: &str) -> anyhow::Result<Vec<Node>> {
    let seeds = streams_core::config::cluster_seeds(url)?;
    let mut view = None;
    let mut seed_info = None;
    for seed in &seeds {
        let info = seed.as_str().into_connection_info()?;
        let Ok(mut conn) = connect(&info).await else {
            continue;
        };
        if let Ok(text) = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
        {
            view = Some(text);
            seed_info = Some(info);
            break;
        }
    }
    let (Some(view), Some(seed_info)) = (view, seed_info) else {
        bail!(
            "no seed of {} answered CLUSTER NODES",
            streams_core::config::redact_seeds(url)
        );
    };
    let mut nodes = Vec::new();
    for listed in parse_cluster_nodes(&view) {
        let info = node_info(&seed_info, listed.host.clone(), listed.port);
        let conn = connect(&info).await.with_context(|| {
            format!("connecting to cluster node {}:{}", listed.host, listed.port)
        })?;
        nodes.push(Node {
            addr: format!("{}:{}", listed.host, listed.port),
            role: if listed.master {
                Role::Master
            } else {
                Role::Replica
            },
            info,
            conn,
            slots: listed.slots,
        });
    }
    if !nodes.iter().any(|n| n.role == Role::Master) {
        bail!("the cluster lists no live master");
    }
    // Masters first, each in port order, then the replicas.
    nodes.sort_by(|a, b| (a.role, &a.addr).cmp(&(b.role, &b.addr)));
    Ok(nodes)
}

/// One live node of a `CLUSTER NODES` reply.
#[derive(Debug, PartialEq, Eq)]
struct ListedNode {
    host: String,
    port: u16,
    master: bool,
    slots: Vec<(u16, u16)>,
}

/// The live nodes of a `CLUSTER NODES` reply: `<id> <ip:port@cport[,hostname]> <flags>
/// <master> <ping> <pong> <epoch> <link> <slot>…`; a node flagged `fail`, `noaddr` or
/// `handshake` is left out, and so are slots being migrated (`[…]`).
fn parse_cluster_nodes(text: &str) -> Vec<ListedNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let flags: Vec<&str> = fields[2].split(',').collect();
            if flags
                .iter()
                .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            let endpoint = fields[1].split(['@', ',']).next()?;
            let (host, port) = endpoint.rsplit_once(':')?;
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|one| (one, one)),
                })
                .collect();
            Some(ListedNode {
                host: host.to_owned(),
                port: port.parse().ok()?,
                master: flags.contains(&"master"),
                slots,
            })
        })
        .collect()
}

/// redis-benchmark's arguments naming `info`'s server, or `None` when it cannot be
/// reached that way without a password on the command line (ACL, TLS, a socket).
fn benchmark_command(info: &ConnectionInfo) -> Option<Vec<String>> {
    let settings = info.redis_settings();
    if settings.password().is_some() || settings.username().is_some() {
        return None;
    }
    let ConnectionAddr::Tcp(host, port) = info.addr() else {
        return None;
    };
    Some(vec![
        "-h".into(),
        host.clone(),
        "-p".into(),
        port.to_string(),
        "--dbnum".into(),
        settings.db().to_string(),
    ])
}

fn redis_benchmark_present() -> bool {
    std::process::Command::new("redis-benchmark")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `redis-benchmark … -c 1 -n 20000 --csv XADD key * f v`: its p50 and p99.
async fn redis_benchmark(target: &[String], key: &str) -> anyhow::Result<RoundTripSample> {
    let output = tokio::process::Command::new("redis-benchmark")
        .args(target)
        .args([
            "-c",
            "1",
            "-n",
            &RTT_REQUESTS.to_string(),
            "--csv",
            "XADD",
            key,
            "*",
            "f",
            "v",
        ])
        .output()
        .await
        .context("running redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_benchmark_csv(&stdout)
        .with_context(|| format!("reading redis-benchmark's output {stdout:?}"))
}

/// The p50 and p99 (ms in the CSV, µs here) of redis-benchmark's `--csv` output:
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
/// "p99_latency_ms","max_latency_ms"` and one row.
fn parse_benchmark_csv(text: &str) -> Option<RoundTripSample> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()?
        .split(',')
        .map(|f| f.trim_matches('"').to_owned())
        .collect();
    // The test's name (the command) is quoted and has no comma: XADD k * f v.
    let row: Vec<&str> = lines
        .next()?
        .split(',')
        .map(|f| f.trim_matches('"'))
        .collect();
    let column = |name: &str| -> Option<f64> {
        let index = header.iter().position(|h| h == name)?;
        row.get(index)?.parse::<f64>().ok()
    };
    Some(RoundTripSample {
        p50: column("p50_latency_ms")? * 1000.0,
        p99: column("p99_latency_ms")? * 1000.0,
    })
}

/// The same XADDs sent one after the other on a connection of their own, each timed.
async fn sequential_xadds(info: &ConnectionInfo, key: &str) -> anyhow::Result<RoundTripSample> {
    let mut conn = connect(info).await?;
    let mut times = Vec::with_capacity(RTT_REQUESTS);
    let mut xadd = redis::cmd("XADD");
    xadd.arg(key).arg("*").arg("f").arg("v");
    for _ in 0..RTT_REQUESTS {
        let started = std::time::Instant::now();
        let _: redis::Value = xadd.query_async(&mut conn).await?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(sample_of(&mut times))
}

/// The p50 and p99 of round trips in µs.
fn sample_of(times: &mut [f64]) -> RoundTripSample {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if times.is_empty() {
            return 0.0;
        }
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
        times[rank - 1]
    };
    RoundTripSample {
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Entries of each partition's streams (inbound, validated and market) now, one `XLEN`
/// per stream (each partition is a slot of its own on a cluster).
pub(crate) async fn partition_entries(
    conn: &streams_core::connection::Connection,
    keys: &KeySpace,
) -> anyhow::Result<Vec<u64>> {
    let streams = [topology::INBOUND, topology::VALIDATED, topology::MARKET];
    let cmds = keys
        .all_partitions()
        .flat_map(|p| streams.map(|stream| redis::cmd("XLEN").arg(keys.stream(stream, p)).clone()))
        .collect();
    let lengths = streams_core::connection::query_each(conn, cmds).await;
    let mut entries = vec![0; keys.partitions() as usize];
    for (i, length) in lengths.into_iter().enumerate() {
        entries[i / streams.len()] += redis::from_redis_value::<u64>(length?)?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_info_cpu_and_commandstats() {
        let info = "# CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:2.500000\r\n\
                    used_cpu_sys_children:9.0\r\n\r\n# Commandstats\r\n\
                    cmdstat_xadd:calls=10,usec=25,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_xinfo|groups:calls=4,usec=8,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n";
        let counters = parse_counters(info);
        assert_eq!(counters.cpu_seconds, 3.75, "children's CPU is not Redis's");
        assert_eq!(counters.commands["xadd"], (10, 25));
        assert_eq!(counters.commands["xinfo|groups"], (4, 8));
        let mut later = counters.clone();
        later.cpu_seconds = 4.0;
        later.commands.insert("xadd".into(), (15, 30));
        later.commands.insert("evalsha".into(), (2, 100));
        let delta = later.since(&counters);
        assert_eq!(delta.cpu_seconds, 0.25);
        assert_eq!(delta.commands["xadd"], (5, 5));
        assert_eq!(delta.commands["evalsha"], (2, 100));
        assert_eq!(delta.commands["xinfo|groups"], (0, 0));
    }

    #[test]
    fn cluster_nodes_lists_live_nodes_with_their_slots() {
        let view = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,host-b master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 myself,master - 0 1426238318243 3 connected 10923-16383 [93-<-292f]
e7d1 127.0.0.1:30001@40001 master - 0 1426238317741 1 connected 0-5460 7
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238316232 5 disconnected
";
        let nodes = parse_cluster_nodes(view);
        assert_eq!(nodes.len(), 4, "the failed node is left out: {nodes:?}");
        assert_eq!(
            nodes[0],
            ListedNode {
                host: "127.0.0.1".into(),
                port: 30004,
                master: false,
                slots: vec![],
            }
        );
        assert_eq!(
            (nodes[1].port, nodes[1].slots.clone()),
            (30002, vec![(5461, 10922)])
        );
        assert_eq!(
            nodes[2].slots,
            vec![(10923, 16383)],
            "a migrating slot is not served"
        );
        assert_eq!(nodes[3].slots, vec![(0, 5460), (7, 7)]);
    }

    #[test]
    fn redis_benchmarks_csv_gives_p50_and_p99_in_microseconds() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"XADD k * f v\",\"29542.10\",\"0.029\",\"0.016\",\"0.023\",\"0.031\",\"0.071\",\"8.663\"\n";
        let sample = parse_benchmark_csv(csv).unwrap();
        assert!(
            (sample.p50 - 23.0).abs() < 1e-9 && (sample.p99 - 71.0).abs() < 1e-9,
            "{sample:?}"
        );
        assert_eq!(parse_benchmark_csv("garbage"), None);
    }

    #[test]
    fn redis_benchmark_is_used_only_without_credentials_or_tls() {
        let plain = "redis://127.0.0.1:6390/2".into_connection_info().unwrap();
        assert_eq!(
            benchmark_command(&plain).unwrap(),
            ["-h", "127.0.0.1", "-p", "6390", "--dbnum", "2"]
        );
        for url in ["redis://:pw@127.0.0.1:6390", "redis://u:pw@127.0.0.1:6390"] {
            assert_eq!(
                benchmark_command(&url.into_connection_info().unwrap()),
                None,
                "{url}"
            );
        }
    }

    #[test]
    fn round_trip_percentiles_are_of_the_sorted_times() {
        let mut times: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(
            sample_of(&mut times),
            RoundTripSample {
                p50: 50.0,
                p99: 99.0
            }
        );
        assert_eq!(sample_of(&mut []), RoundTripSample { p50: 0.0, p99: 0.0 });
    }
}
