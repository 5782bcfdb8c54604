//! The benchmark's report: one typed value per run, printed as a table or, with `--json`,
//! as one JSON object (the keys of earlier releases keep their meaning: scripts read them).

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// Commands the table shows per event.
pub const TOP_COMMANDS: usize = 10;

/// What one run measured. Everything but `stage_entries` and the services' peak memory is
/// of the measured flow alone: resting orders pre-loaded before it (`--resting`) are not
/// in its time, CPU, commands or latency.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Events the flow held.
    pub events: u64,
    /// Events ingest accepted.
    pub accepted: u64,
    /// How they were published: `grpc`, `http` or `stream`.
    pub via: &'static str,
    /// The pace asked for.
    pub rate: Rate,
    /// Partitions of the pipeline measured.
    pub partitions: u32,
    /// Instruments the flow spread over.
    pub symbol_count: usize,
    /// The Zipf exponent of their popularity (0: evenly, in turn).
    pub skew: f64,
    /// Seconds until ingest had accepted everything.
    pub publish_seconds: f64,
    /// Seconds until every event had gone through (or the deadline).
    pub seconds: f64,
    /// `accepted / seconds`.
    pub events_per_sec: f64,
    /// End-to-end latency percentiles, origin → analytics.
    pub latency_us: Latency,
    /// The same p50 and p99 in multiples of the round trip measured in the run
    /// (`redis_rtt_us.p50`).
    pub latency_rtt: LatencyInRtt,
    /// Redis's CPU seconds over the run: the server's, or on a cluster its masters' (the
    /// replicas' are in `redis.nodes`).
    pub redis_cpu_seconds: f64,
    /// `redis_cpu_seconds` per accepted event, µs.
    pub redis_cpu_us_per_event: f64,
    /// Commands Redis ran per accepted event (INFO commandstats of the server or the
    /// masters: a script call counts once, and once more for each command it runs), the
    /// bench's own reads and polls left out.
    pub redis_commands_per_event: f64,
    /// Redis's round trip, measured in the same run before and after the flow.
    pub redis_rtt_us: RoundTrip,
    /// What each Redis node did, and the commands Redis ran most.
    pub redis: RedisUsage,
    /// Orders rejected by transform or the engine.
    pub rejected: u64,
    /// The first rejection's order and reason.
    pub first_rejection: Option<String>,
    /// Orders with no accept/reject report (of the flow's and of the resting ones).
    pub lost: u64,
    /// Orders with more than one.
    pub duplicated: u64,
    /// What only one of the two benchmarks measures.
    #[serde(flatten)]
    pub mode: Mode,
}

/// The part of a report that depends on where the run went.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// On a pipeline the bench started.
    Local(LocalReport),
    /// On a running pipeline (`--attach`).
    Attach(AttachReport),
}

/// What a run on a pipeline of its own adds.
#[derive(Debug, Clone, Serialize)]
pub struct LocalReport {
    /// Its services' batch size.
    pub batch: usize,
    /// Its services' trace sampling ratio, if tracing.
    pub trace_ratio: Option<f64>,
    /// Spans its OTLP receiver got.
    pub spans_exported: u64,
    /// Resting orders pre-loaded before the flow.
    pub resting: u64,
    /// Its services' `TICKFLOW_WAIT_REPLICAS`.
    pub wait_replicas: u32,
    /// Entries in each stream at the end (`inbound`, `validated`, `market`), the resting
    /// orders' included.
    pub stage_entries: BTreeMap<String, u64>,
    /// CPU over the flow and peak memory over the whole run, of each service.
    pub services: BTreeMap<String, ServiceUsage>,
    /// Per stage (consumer group), what its timing histograms (`tickflow_*_seconds` with
    /// a `stage` label on the services' `/metrics`) gained over the flow, by metric
    /// (`ack_forward_duration`: a commit; `handler_duration`: the handling of a batch).
    pub stage_timings: BTreeMap<String, BTreeMap<String, Timing>>,
    /// Whether any stage exposes how long it waits before a read returns (a timing whose
    /// name has `wait` in it); when not, the wait is not in `stage_timings`.
    pub read_wait_exposed: bool,
}

/// One service's resources over a local run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServiceUsage {
    /// User + system CPU seconds over the measured flow.
    pub cpu_seconds: f64,
    /// Peak resident memory over the whole run (the resting orders' pre-load included),
    /// MiB.
    pub peak_rss_mib: f64,
}

/// What one timing histogram of a stage gained over the flow.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Timing {
    /// Observations (batches, commits).
    pub count: u64,
    /// Their mean, µs.
    pub mean_us: f64,
    /// The upper bound of the bucket holding the median, µs (`None`: above the last bucket).
    pub p50_le_us: Option<f64>,
    /// The same for the 99th percentile.
    pub p99_le_us: Option<f64>,
}

/// What an attached run adds.
#[derive(Debug, Clone, Serialize)]
pub struct AttachReport {
    /// The run's id (its orders are `bench-<run>-<n>`).
    pub run: String,
    /// Ingest's URL.
    pub target: String,
    /// The instruments traded.
    pub symbols: Vec<String>,
    /// Whether the deadline passed before every order was reported and analysed.
    pub timed_out: bool,
    /// Market entries of other traffic that did not decode.
    pub undecodable: u64,
    /// Orders left resting that were cancelled at the end.
    pub resting_cancelled: usize,
    /// Of those, the cancels not answered in time.
    pub left_resting: usize,
}

/// Redis's round trip: the p50 and p99 of `redis-benchmark -c 1 -n 20000 XADD k '*' f v`
/// on the node that serves `k` (a key outside the pipeline's namespace), or of the same
/// sequential XADDs sent by the bench itself when redis-benchmark cannot be used.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundTrip {
    /// The mean of the p50s before and after the flow, µs.
    pub p50: f64,
    /// The mean of the p99s, µs.
    pub p99: f64,
    /// Before the flow.
    pub before: RoundTripSample,
    /// After it.
    pub after: RoundTripSample,
    /// `redis-benchmark` or `in-process`.
    pub method: &'static str,
    /// The node measured, `host:port`.
    pub node: String,
}

/// One measurement of the round trip, µs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RoundTripSample {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl RoundTrip {
    /// The two measurements, and what both say together.
    pub fn of(
        before: RoundTripSample,
        after: RoundTripSample,
        method: &'static str,
        node: String,
    ) -> Self {
        Self {
            p50: (before.p50 + after.p50) / 2.0,
            p99: (before.p99 + after.p99) / 2.0,
            before,
            after,
            method,
            node,
        }
    }
}

/// Latency in round trips.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencyInRtt {
    /// p50 ÷ the round trip's p50.
    pub p50: f64,
    /// p99 ÷ the round trip's p50.
    pub p99: f64,
}

impl LatencyInRtt {
    /// `latency` in multiples of `rtt_us` (zero when the round trip is unknown).
    pub fn of(latency: &Latency, rtt_us: f64) -> Self {
        let ratio = |us: u64| {
            if rtt_us > 0.0 {
                us as f64 / rtt_us
            } else {
                0.0
            }
        };
        Self {
            p50: ratio(latency.p50),
            p99: ratio(latency.p99),
        }
    }
}

/// What the Redis nodes did over the flow.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RedisUsage {
    /// `standalone` or `cluster`.
    pub mode: &'static str,
    /// The replicas' CPU seconds (0 without replicas).
    pub replica_cpu_seconds: f64,
    /// Commands the server or the masters ran, the bench's own left out.
    pub commands: u64,
    /// Every command Redis ran, the one it spent most time in first (a script's time
    /// holds that of the commands it runs, which are listed too); the table shows the
    /// first [`TOP_COMMANDS`].
    pub top_commands: Vec<CommandUsage>,
    /// Each node: the server, or every master and replica of a cluster.
    pub nodes: Vec<NodeUsage>,
}

/// One command's share of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CommandUsage {
    /// Its name in INFO commandstats (`evalsha`, `xadd`, `xinfo|groups`, …).
    pub command: String,
    /// Calls over the flow.
    pub calls: u64,
    /// Calls per accepted event.
    pub per_event: f64,
    /// Redis's own time per call, µs.
    pub usec_per_call: f64,
    /// Redis's time in it per accepted event, µs.
    pub usec_per_event: f64,
}

/// One Redis node over the flow.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeUsage {
    /// `host:port`.
    pub addr: String,
    /// `server` (standalone), `master` or `replica`.
    pub role: &'static str,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Commands it ran (INFO commandstats; on a replica, what it applied from its master).
    pub commands: u64,
    /// `commands` per second of the flow.
    pub ops_per_sec: f64,
    /// The partitions whose slot it serves (a master's; every one for a server).
    pub partitions: Vec<u32>,
    /// Entries of those partitions' streams (inbound, validated, market) at the end.
    pub stream_entries: u64,
    /// Keys it holds at the end (DBSIZE: of every namespace).
    pub keys: u64,
}

/// The pace of a run: `"max"` or events per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            0 => serializer.serialize_str("max"),
            rate => serializer.serialize_u64(rate),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => f.write_str("\"max\""),
            rate => write!(f, "{rate}"),
        }
    }
}

/// Latency percentiles in µs (each the top of its histogram bucket).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Latency {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Highest.
    pub max: u64,
}

impl Latency {
    /// The percentiles of a histogram (bucket floor in µs → count).
    pub fn of(histogram: &BTreeMap<u64, u64>) -> Self {
        let list: Vec<(u64, u64)> = histogram.iter().map(|(b, c)| (*b, *c)).collect();
        let p = analytics::latency::percentiles(&list);
        Self {
            count: p.count,
            p50: p.p50_us,
            p90: p.p90_us,
            p99: p.p99_us,
            p999: p.p999_us,
            max: p.max_us,
        }
    }
}

impl Report {
    /// Whether every order got exactly one accept/reject report.
    pub fn exactly_once(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }

    /// The report as one JSON object, keys sorted (as every release has printed it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a report always serializes")
    }

    /// Prints the report: one JSON object with `json`, else a table.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
        } else {
            print!("{}", self.table());
        }
    }

    /// The report as the table `print` shows.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let setup = match &self.mode {
            Mode::Attach(a) => format!(
                "attached to {} ({} partitions), run {}",
                a.target, self.partitions, a.run
            ),
            Mode::Local(l) => format!(
                "{} partitions, batch {}, tracing {}, {} resting orders, WAIT {}",
                self.partitions,
                l.batch,
                l.trace_ratio
                    .map_or("off".into(), |t| format!("{:.0} %", t * 100.0)),
                l.resting,
                l.wait_replicas,
            ),
        };
        let _ = writeln!(
            out,
            "tickflow bench: {} events via {} at rate {} over {} symbols (skew {}) on {} Redis ({setup})",
            self.events, self.via, self.rate, self.symbol_count, self.skew, self.redis.mode,
        );
        let _ = writeln!(
            out,
            "  end to end      {:.0} events/s ({} events in {:.2} s; published in {:.2} s)",
            self.events_per_sec, self.accepted, self.seconds, self.publish_seconds,
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency (µs)    p50 {}  p90 {}  p99 {}  p999 {}  max {}  ({} market entries)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        let rtt = &self.redis_rtt_us;
        let _ = writeln!(
            out,
            "  round trips     p50 {:.1} RTT, p99 {:.1} RTT; RTT p50 {:.0} µs, p99 {:.0} µs \
             (before {:.0}, after {:.0}; {} XADD on {})",
            self.latency_rtt.p50,
            self.latency_rtt.p99,
            rtt.p50,
            rtt.p99,
            rtt.before.p50,
            rtt.after.p50,
            rtt.method,
            rtt.node,
        );
        if let Mode::Local(local) = &self.mode {
            let _ = writeln!(
                out,
                "  stream entries  {}",
                serde_json::to_value(&local.stage_entries).unwrap_or_default()
            );
            for (name, s) in &local.services {
                let _ = writeln!(
                    out,
                    "  {name:<10}      cpu {:.2} s, peak RSS {:.1} MiB",
                    s.cpu_seconds, s.peak_rss_mib
                );
            }
        }
        let replicas = if self.redis.replica_cpu_seconds > 0.0 {
            format!("; replicas {:.2} s", self.redis.replica_cpu_seconds)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  redis           cpu {:.2} s ({:.1} µs/event), {:.1} commands/event{replicas}",
            self.redis_cpu_seconds, self.redis_cpu_us_per_event, self.redis_commands_per_event,
        );
        let top: Vec<String> = self
            .redis
            .top_commands
            .iter()
            .take(TOP_COMMANDS)
            .map(|c| {
                format!(
                    "{} {:.2} × {:.1} µs",
                    c.command, c.per_event, c.usec_per_call
                )
            })
            .collect();
        let _ = writeln!(out, "  per event       {}", top.join(", "));
        for node in &self.redis.nodes {
            let served = if node.role == "replica" {
                String::new()
            } else {
                format!(
                    ", {} partitions {}, {} stream entries",
                    node.partitions.len(),
                    partition_list(&node.partitions),
                    node.stream_entries,
                )
            };
            let _ = writeln!(
                out,
                "  {:<21} {:<7} cpu {:.2} s, {:.0} ops/s{served}, {} keys",
                node.addr, node.role, node.cpu_seconds, node.ops_per_sec, node.keys,
            );
        }
        if let Mode::Local(local) = &self.mode {
            for (stage, timings) in &local.stage_timings {
                let shown: Vec<String> = timings
                    .iter()
                    .map(|(metric, t)| {
                        let bound = |b: Option<f64>| b.map_or("+Inf".into(), |b| format!("{b:.0}"));
                        format!(
                            "{metric} mean {:.0} µs (p50 ≤ {}, p99 ≤ {}; {})",
                            t.mean_us,
                            bound(t.p50_le_us),
                            bound(t.p99_le_us),
                            t.count
                        )
                    })
                    .collect();
                let _ = writeln!(out, "  {stage:<10}      {}", shown.join("; "));
            }
            if !local.read_wait_exposed {
                let _ = writeln!(
                    out,
                    "  read wait       not exposed by the services (no tickflow_stage_arrival_seconds)"
                );
            }
        }
        let _ = writeln!(
            out,
            "  exactly once    lost {} duplicated {} (rejected {}{})",
            self.lost,
            self.duplicated,
            self.rejected,
            self.first_rejection
                .as_deref()
                .map_or(String::new(), |first| format!(", the first: {first}"))
        );
        if let Mode::Attach(a) = &self.mode {
            let _ = writeln!(
                out,
                "  cleanup         {} resting orders cancelled, {} left resting{}",
                a.resting_cancelled,
                a.left_resting,
                if a.timed_out {
                    "; TIMED OUT waiting for the pipeline"
                } else {
                    ""
                }
            );
        }
        out
    }
}

/// `0-3 5 9-15`: partitions as ranges.
fn partition_list(partitions: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = partitions.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(if end > start {
            format!("{start}-{end}")
        } else {
            start.to_string()
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(mode: Mode) -> Report {
        let latency_us = Latency::of(&BTreeMap::from([(100, 10)]));
        let sample = RoundTripSample {
            p50: 20.0,
            p99: 60.0,
        };
        let redis_rtt_us = RoundTrip::of(
            sample,
            RoundTripSample {
                p50: 30.0,
                p99: 80.0,
            },
            "in-process",
            "127.0.0.1:6379".into(),
        );
        Report {
            events: 10,
            accepted: 10,
            via: "grpc",
            rate: Rate(0),
            partitions: 4,
            symbol_count: 16,
            skew: 1.0,
            publish_seconds: 0.5,
            seconds: 1.0,
            events_per_sec: 10.0,
            latency_rtt: LatencyInRtt::of(&latency_us, redis_rtt_us.p50),
            latency_us,
            redis_cpu_seconds: 0.25,
            redis_cpu_us_per_event: 25_000.0,
            redis_commands_per_event: 12.5,
            redis_rtt_us,
            redis: RedisUsage {
                mode: "standalone",
                replica_cpu_seconds: 0.0,
                commands: 125,
                top_commands: vec![CommandUsage {
                    command: "xadd".into(),
                    calls: 50,
                    per_event: 5.0,
                    usec_per_call: 1.5,
                    usec_per_event: 7.5,
                }],
                nodes: vec![NodeUsage {
                    addr: "127.0.0.1:6379".into(),
                    role: "server",
                    cpu_seconds: 0.25,
                    commands: 125,
                    ops_per_sec: 125.0,
                    partitions: vec![0, 1, 2, 3],
                    stream_entries: 30,
                    keys: 20,
                }],
            },
            rejected: 0,
            first_rejection: None,
            lost: 0,
            duplicated: 0,
            mode,
        }
    }

    /// What every report has, local or attached: the keys of earlier releases and the
    /// Redis figures.
    const SHARED_KEYS: &[&str] = &[
        "accepted",
        "duplicated",
        "events",
        "events_per_sec",
        "first_rejection",
        "latency_rtt",
        "latency_us",
        "lost",
        "mode",
        "partitions",
        "publish_seconds",
        "rate",
        "redis",
        "redis_commands_per_event",
        "redis_cpu_seconds",
        "redis_cpu_us_per_event",
        "redis_rtt_us",
        "rejected",
        "seconds",
        "skew",
        "symbol_count",
        "via",
    ];

    fn keys_of(json: &serde_json::Value) -> Vec<String> {
        json.as_object().unwrap().keys().cloned().collect()
    }

    fn expected(extra: &[&str]) -> Vec<String> {
        let mut keys: Vec<String> = SHARED_KEYS
            .iter()
            .chain(extra)
            .map(|k| k.to_string())
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn a_local_report_has_the_keys_every_release_printed_and_the_redis_figures() {
        let json = report(Mode::Local(LocalReport {
            batch: 256,
            trace_ratio: None,
            spans_exported: 0,
            resting: 0,
            wait_replicas: 0,
            stage_entries: BTreeMap::from([("inbound".into(), 10)]),
            services: BTreeMap::from([(
                "engine".into(),
                ServiceUsage {
                    cpu_seconds: 1.0,
                    peak_rss_mib: 20.0,
                },
            )]),
            stage_timings: BTreeMap::new(),
            read_wait_exposed: false,
        }))
        .to_json();
        assert_eq!(
            keys_of(&json),
            expected(&[
                "batch",
                "read_wait_exposed",
                "resting",
                "services",
                "spans_exported",
                "stage_entries",
                "stage_timings",
                "trace_ratio",
                "wait_replicas",
            ])
        );
        assert_eq!(json["mode"], "local");
        assert_eq!(json["rate"], "max");
        assert_eq!(json["trace_ratio"], serde_json::Value::Null);
        assert_eq!(json["services"]["engine"]["peak_rss_mib"], 20.0);
        assert_eq!(
            json["latency_us"],
            // The top of the bucket whose floor is 100 µs.
            serde_json::json!({"count": 10, "p50": 101, "p90": 101, "p99": 101, "p999": 101, "max": 101})
        );
        // 101 µs over a round trip of (20 + 30) / 2 µs.
        assert_eq!(json["redis_rtt_us"]["p50"], 25.0);
        assert_eq!(json["redis_rtt_us"]["p99"], 70.0);
        assert_eq!(json["latency_rtt"]["p50"], 4.04);
        assert_eq!(json["redis"]["nodes"][0]["role"], "server");
        assert_eq!(json["redis"]["top_commands"][0]["command"], "xadd");
    }

    #[test]
    fn an_attached_report_has_the_keys_every_release_printed_and_the_redis_figures() {
        let mut attached = report(Mode::Attach(AttachReport {
            run: "0000abcd".into(),
            target: "http://127.0.0.1:50051".into(),
            symbols: vec!["AAA".into()],
            timed_out: false,
            undecodable: 0,
            resting_cancelled: 3,
            left_resting: 0,
        }));
        attached.rate = Rate(500);
        let json = attached.to_json();
        assert_eq!(
            keys_of(&json),
            expected(&[
                "left_resting",
                "resting_cancelled",
                "run",
                "symbols",
                "target",
                "timed_out",
                "undecodable",
            ])
        );
        assert_eq!(json["mode"], "attach");
        assert_eq!(json["rate"], 500);
    }

    #[test]
    fn the_table_shows_round_trips_nodes_and_whether_the_read_wait_is_measured() {
        let table = report(Mode::Local(LocalReport {
            batch: 256,
            trace_ratio: None,
            spans_exported: 0,
            resting: 500,
            wait_replicas: 0,
            stage_entries: BTreeMap::new(),
            services: BTreeMap::new(),
            stage_timings: BTreeMap::from([(
                "engine".into(),
                BTreeMap::from([(
                    "ack_forward_duration".into(),
                    Timing {
                        count: 4,
                        mean_us: 300.0,
                        p50_le_us: Some(250.0),
                        p99_le_us: None,
                    },
                )]),
            )]),
            read_wait_exposed: false,
        }))
        .table();
        for expected in [
            "p50 4.0 RTT",
            "RTT p50 25 µs",
            "127.0.0.1:6379        server  cpu 0.25 s, 125 ops/s, 4 partitions 0-3",
            "xadd 5.00 × 1.5 µs",
            "ack_forward_duration mean 300 µs (p50 ≤ 250, p99 ≤ +Inf; 4)",
            "read wait       not exposed",
            "500 resting orders",
        ] {
            assert!(table.contains(expected), "{expected:?} in\n{table}");
        }
    }

    #[test]
    fn partitions_print_as_ranges() {
        assert_eq!(partition_list(&[0, 1, 2, 3, 5, 9, 10]), "0-3 5 9-10");
        assert_eq!(partition_list(&[]), "-");
    }
}
