//! The benchmark's report: one typed value per run, printed as a table or, with `--json`,
//! as one JSON object (the same keys and values for every release: scripts read them).

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// What one run measured.
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
    /// Seconds until ingest had accepted everything.
    pub publish_seconds: f64,
    /// Seconds until every event had gone through (or the deadline).
    pub seconds: f64,
    /// `accepted / seconds`.
    pub events_per_sec: f64,
    /// End-to-end latency percentiles, origin → analytics.
    pub latency_us: Latency,
    /// Redis's CPU seconds over the run.
    pub redis_cpu_seconds: f64,
    /// Orders rejected by transform or the engine.
    pub rejected: u64,
    /// The first rejection's order and reason.
    pub first_rejection: Option<String>,
    /// Orders with no accept/reject report.
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
    /// Entries in each stream at the end (`inbound`, `validated`, `market`).
    pub stage_entries: BTreeMap<String, u64>,
    /// CPU and memory of each service.
    pub services: BTreeMap<String, ServiceUsage>,
}

/// One service's resources over a local run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServiceUsage {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
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
            return;
        }
        let setup = match &self.mode {
            Mode::Attach(a) => format!(
                "attached to {} ({} partitions), run {}",
                a.target, self.partitions, a.run
            ),
            Mode::Local(l) => format!(
                "{} partitions, batch {}, tracing {}",
                self.partitions,
                l.batch,
                l.trace_ratio
                    .map_or("off".into(), |t| format!("{:.0} %", t * 100.0))
            ),
        };
        println!(
            "tickflow bench: {} events via {} at rate {} ({setup})",
            self.events, self.via, self.rate,
        );
        println!(
            "  end to end      {:.0} events/s ({} events in {:.2} s; published in {:.2} s)",
            self.events_per_sec, self.accepted, self.seconds, self.publish_seconds,
        );
        let l = &self.latency_us;
        println!(
            "  latency (µs)    p50 {}  p90 {}  p99 {}  p999 {}  max {}  ({} market entries)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        );
        if let Mode::Local(local) = &self.mode {
            println!(
                "  stream entries  {}",
                serde_json::to_value(&local.stage_entries).unwrap_or_default()
            );
            for (name, s) in &local.services {
                println!(
                    "  {name:<10}      cpu {:.2} s, peak RSS {:.1} MiB",
                    s.cpu_seconds, s.peak_rss_mib
                );
            }
        }
        println!("  redis           cpu {:.2} s", self.redis_cpu_seconds);
        println!(
            "  exactly once    lost {} duplicated {} (rejected {}{})",
            self.lost,
            self.duplicated,
            self.rejected,
            self.first_rejection
                .as_deref()
                .map_or(String::new(), |first| format!(", the first: {first}"))
        );
        if let Mode::Attach(a) = &self.mode {
            println!(
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(mode: Mode) -> Report {
        Report {
            events: 10,
            accepted: 10,
            via: "grpc",
            rate: Rate(0),
            partitions: 4,
            publish_seconds: 0.5,
            seconds: 1.0,
            events_per_sec: 10.0,
            latency_us: Latency::of(&BTreeMap::from([(100, 10)])),
            redis_cpu_seconds: 0.25,
            rejected: 0,
            first_rejection: None,
            lost: 0,
            duplicated: 0,
            mode,
        }
    }

    #[test]
    fn a_local_report_has_the_keys_every_release_printed() {
        let json = report(Mode::Local(LocalReport {
            batch: 256,
            trace_ratio: None,
            spans_exported: 0,
            stage_entries: BTreeMap::from([("inbound".into(), 10)]),
            services: BTreeMap::from([(
                "engine".into(),
                ServiceUsage {
                    cpu_seconds: 1.0,
                    peak_rss_mib: 20.0,
                },
            )]),
        }))
        .to_json();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "accepted",
                "batch",
                "duplicated",
                "events",
                "events_per_sec",
                "first_rejection",
                "latency_us",
                "lost",
                "mode",
                "partitions",
                "publish_seconds",
                "rate",
                "redis_cpu_seconds",
                "rejected",
                "seconds",
                "services",
                "spans_exported",
                "stage_entries",
                "trace_ratio",
                "via"
            ]
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
    }

    #[test]
    fn an_attached_report_has_the_keys_every_release_printed() {
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
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "accepted",
                "duplicated",
                "events",
                "events_per_sec",
                "first_rejection",
                "latency_us",
                "left_resting",
                "lost",
                "mode",
                "partitions",
                "publish_seconds",
                "rate",
                "redis_cpu_seconds",
                "rejected",
                "resting_cancelled",
                "run",
                "seconds",
                "symbols",
                "target",
                "timed_out",
                "undecodable",
                "via"
            ]
        );
        assert_eq!(json["mode"], "attach");
        assert_eq!(json["rate"], 500);
    }
}
