//! `tickflow bench`'s measurements of issues 18 and 19, run as users run them, small and
//! untimed (speed lives in BENCHMARKS.md): every order exactly once, and the report's
//! Redis figures present and plausible.
//!
//! - 10,000 skewed symbols over books pre-loaded with resting orders: the resting orders
//!   are counted once each but left out of the flow's latency, commands and CPU.
//! - Its own pipeline on a 3-master Redis Cluster with `--wait-replicas 1`: the partitions
//!   spread over every master, each node measured.
//! - `--attach` to a pipeline running on a cluster: per-partition commands only, and its
//!   consumer groups removed afterwards.

use std::{
    io::Read,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use streams_core::{
    KeySpace,
    connection::{Connection, query_each},
    inspect::GroupInfo,
    testing::RedisCluster,
};
use tickflow::local::LocalPipeline;
use tickflow_proto::topology;

/// How long one `tickflow` command may take before the test kills it and fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `tickflow ARGS` with `env` (and none of the caller's pipeline variables); kills it
/// if it outlives [`COMMAND_TIMEOUT`].
fn tickflow(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickflow"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("TICKFLOW_REDIS_MODE")
        .env_remove("TICKFLOW_NAMESPACE")
        .env_remove("TICKFLOW_PARTITIONS")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tickflow");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tickflow") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tickflow {args:?} still running after {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The one JSON object a successful `--json` run prints.
fn report(output: &Output) -> Json {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tickflow failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

fn number(report: &Json, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Json::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is a number in {report}"))
}

/// Every order once; the round trip measured and latency expressed in it; Redis's CPU and
/// commands per event.
fn assert_exactly_once_with_redis_figures(report: &Json, events: u64) {
    assert_eq!(report["accepted"], events, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["rejected"], 0, "{report}");
    let rtt = number(report, "/redis_rtt_us/p50");
    assert!(rtt > 0.0 && rtt < 100_000.0, "{report}");
    for when in ["before", "after"] {
        assert!(number(report, &format!("/redis_rtt_us/{when}/p50")) > 0.0);
    }
    assert!(
        ["redis-benchmark", "in-process"]
            .contains(&report["redis_rtt_us"]["method"].as_str().unwrap()),
        "{report}"
    );
    let p50 = number(report, "/latency_us/p50");
    let in_rtt = number(report, "/latency_rtt/p50");
    assert!(
        (in_rtt - p50 / rtt).abs() < 1e-6 * in_rtt.max(1.0),
        "{report}"
    );
    assert!(number(report, "/redis_cpu_us_per_event") > 0.0, "{report}");
    // Each event is appended to three streams (inbound, validated, market): three XADDs
    // per event of the flow, whatever came before it.
    let xadd = report["redis"]["top_commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["command"] == "xadd")
        .unwrap_or_else(|| panic!("xadd among the commands: {report}"));
    let xadds_per_event = xadd["per_event"].as_f64().unwrap();
    assert!((2.9..3.3).contains(&xadds_per_event), "{report}");
    let commands = number(report, "/redis_commands_per_event");
    assert!((xadds_per_event..200.0).contains(&commands), "{report}");
}

#[test]
fn ten_thousand_skewed_symbols_over_deep_books_count_every_order_once() {
    let report = report(&tickflow(
        &[
            "bench",
            "--events",
            "2000",
            "--symbols",
            "10000",
            "--resting",
            "500",
            "--json",
        ],
        &[],
    ));
    assert_exactly_once_with_redis_figures(&report, 2000);
    assert_eq!(report["symbol_count"], 10_000);
    assert_eq!(report["skew"], 1.0);
    assert_eq!(report["resting"], 500);
    // The resting orders went through the pipeline (they are in the streams and were
    // counted once each above), but the flow's latency is of its own 2000 events.
    assert_eq!(report["stage_entries"]["inbound"], 2500, "{report}");
    assert_eq!(report["latency_us"]["count"], 2000, "{report}");
    let nodes = report["redis"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{report}");
    assert_eq!(nodes[0]["role"], "server");
    assert_eq!(nodes[0]["partitions"].as_array().unwrap().len(), 16);
    assert_eq!(nodes[0]["stream_entries"], 7500, "{report}");
    assert!(number(&nodes[0], "/ops_per_sec") > 0.0);
    for stage in ["transform", "engine", "analytics"] {
        assert!(
            number(
                &report,
                &format!("/stage_timings/{stage}/ack_forward_duration/count")
            ) > 0.0,
            "{stage}: {report}"
        );
    }
    assert!(report["read_wait_exposed"].is_boolean());
    for service in ["ingest", "transform", "engine", "analytics"] {
        assert!(number(&report, &format!("/services/{service}/peak_rss_mib")) > 0.0);
    }
}

/// Which partitions each master of a report serves, and whether they cover `partitions`
/// once each.
fn assert_spread_over_every_master(report: &Json, partitions: u32) {
    let nodes = report["redis"]["nodes"].as_array().unwrap();
    let masters: Vec<&Json> = nodes.iter().filter(|n| n["role"] == "master").collect();
    let replicas = nodes.iter().filter(|n| n["role"] == "replica").count();
    assert_eq!((masters.len(), replicas), (3, 3), "{report}");
    let mut served: Vec<u64> = Vec::new();
    for master in &masters {
        let own: Vec<u64> = master["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect();
        assert!(!own.is_empty(), "every master serves a partition: {report}");
        assert!(number(master, "/ops_per_sec") > 0.0, "{report}");
        served.extend(own);
    }
    served.sort_unstable();
    assert_eq!(served, (0..u64::from(partitions)).collect::<Vec<_>>());
}

#[test]
fn a_bench_on_a_redis_cluster_spreads_the_partitions_over_every_master() {
    let report = report(&tickflow(
        &[
            "bench",
            "--redis-mode",
            "cluster",
            "--wait-replicas",
            "1",
            "--events",
            "1000",
            "--symbols",
            "64",
            "--json",
        ],
        &[],
    ));
    assert_exactly_once_with_redis_figures(&report, 1000);
    assert_eq!(report["redis"]["mode"], "cluster");
    assert_eq!(report["wait_replicas"], 1);
    assert_spread_over_every_master(&report, 16);
    // The replicas applied the writes; the commits and appends waited for them.
    assert!(
        number(&report, "/redis/replica_cpu_seconds") > 0.0,
        "{report}"
    );
    let commands = report["redis"]["top_commands"].as_array().unwrap();
    assert!(commands.iter().any(|c| c["command"] == "wait"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_bench_measures_a_pipeline_on_a_redis_cluster_and_leaves_no_group() {
    let cluster = RedisCluster::start();
    let seeds = cluster.seeds();
    let keys = KeySpace::new(streams_core::testing::unique_namespace("attach-cluster"), 4);
    let redis = streams_core::Redis::new_cluster(&seeds).unwrap();
    let instruments: Vec<transform::refdata::Instrument> = ["AAA", "BBB", "CCC", "DDD"]
        .iter()
        .map(|symbol| transform::refdata::Instrument {
            symbol: (*symbol).into(),
            tick_size: 0.01,
            lot_size: 1,
            band_bps: 1000,
            min_price: None,
            max_price: None,
            max_qty: None,
            name: String::new(),
            currency: String::new(),
        })
        .collect();
    transform::refdata::store(&redis, &keys, &instruments)
        .await
        .unwrap();
    let env = [
        ("REDIS_URL", seeds.clone()),
        ("TICKFLOW_REDIS_MODE", "cluster".to_owned()),
        ("TICKFLOW_NAMESPACE", keys.namespace().to_owned()),
        ("TICKFLOW_PARTITIONS", "4".to_owned()),
    ];
    let service_env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain([("RUST_LOG".to_owned(), "warn".to_owned())])
        .collect();
    let logs = tempfile::tempdir().unwrap();
    let pipeline = LocalPipeline::start(
        env!("CARGO_BIN_EXE_tickflow").as_ref(),
        &service_env,
        logs.path(),
    )
    .await
    .unwrap();

    let grpc = pipeline.grpc_url();
    let report = report(&tickflow(
        &[
            "bench",
            "--attach",
            "--grpc",
            &grpc,
            "--events",
            "1000",
            "--symbols",
            "4",
            "--json",
        ],
        &env,
    ));
    assert_eq!(report["mode"], "attach", "{report}");
    assert_eq!(report["timed_out"], false, "{report}");
    assert_exactly_once_with_redis_figures(&report, 1000);
    assert_eq!(report["redis"]["mode"], "cluster");
    assert_spread_over_every_master(&report, 4);

    // Analytics alone reads the market streams again.
    let conn: Connection = redis.pooled().await.unwrap().clone();
    let cmds = keys
        .all_partitions()
        .map(|p| GroupInfo::command(&keys.stream(topology::MARKET, p)))
        .collect();
    for reply in query_each(&conn, cmds).await {
        let groups: Vec<String> = GroupInfo::parse(reply.unwrap())
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(groups, ["analytics"]);
    }
    pipeline.stop().await;
}
