//! The tickflow command line, run as users run it.
//!
//! - A small `tickflow bench` on a pipeline of its own must deliver every order exactly
//!   once. (Its figures are not checked: speed lives in BENCHMARKS.md, not in tests.)
//! - `tickflow bench --attach` against four running `tickflow serve` processes that trim
//!   their streams every 200 ms, through gRPC and HTTP: every order once, no consumer group
//!   and no order of its own left behind, and a clear error when it is pointed at the wrong
//!   partitions.
//! - `--help` prints an overview, each command's help its own examples; an unknown
//!   command fails; completions are printed for bash, zsh and fish.

use std::{
    io::Read,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use streams_core::{KeySpace, inspect::GroupInfo, testing::RedisServer};
use tickflow::local::LocalPipeline;
use tickflow_proto::topology;
use transform::refdata::Instrument;

/// How long one `tickflow` command may take before the test kills it and fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `tickflow ARGS` with `env` (and none of the caller's pipeline variables), and
/// kills it if it outlives [`COMMAND_TIMEOUT`].
fn tickflow(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickflow"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("TICKFLOW_NAMESPACE")
        .env_remove("TICKFLOW_PARTITIONS")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tickflow");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tickflow") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tickflow {args:?} still running after {COMMAND_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
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

#[test]
fn a_small_bench_delivers_every_order_exactly_once() {
    let report = report(&tickflow(
        &[
            "bench",
            "--events",
            "2000",
            "--partitions",
            "4",
            "--symbols",
            "4",
            "--json",
        ],
        &[],
    ));
    assert_eq!(report["events"], 2000);
    assert_eq!(report["accepted"], 2000);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["stage_entries"]["inbound"], 2000);
    assert!(report["latency_us"]["count"].as_u64().unwrap() >= 2000);
    for service in ["ingest", "transform", "engine", "analytics"] {
        assert!(
            report["services"][service]["peak_rss_mib"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{service}"
        );
    }
}

#[test]
fn help_is_per_command_with_examples_and_an_unknown_command_fails() {
    // The overview names every command; each command's help has its own examples.
    let commands = ["load", "bench", "serve", "healthcheck", "completions"];
    for args in [&["--help"][..], &["help"], &["-h"], &[]] {
        let output = tickflow(args, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {output:?}");
        for command in commands {
            assert!(
                stdout.contains(command),
                "{args:?} lists {command}: {stdout}"
            );
        }
    }
    for (args, example) in [
        (&["bench", "--help"][..], "tickflow bench --attach --grpc"),
        (
            &["bench", "--attach", "--help"],
            "tickflow bench --attach --grpc",
        ),
        (&["help", "bench"], "tickflow bench --attach --grpc"),
        (&["load", "-h"], "tickflow load --rate 1000"),
        (&["completions", "--help"], "tickflow completions zsh"),
    ] {
        let output = tickflow(args, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert!(stdout.contains(example), "{args:?}: {stdout}");
        assert!(
            !stdout.contains("tickflow serve engine"),
            "{args:?} is not the overview"
        );
    }
    for args in [
        &["bnech"][..],
        &["bench", "--nonsense"],
        &["load", "--rate"],
        &["bench", "--attach", "--partitions", "4"],
    ] {
        let output = tickflow(args, &[]);
        assert!(!output.status.success(), "{args:?}: {output:?}");
        assert!(!output.stderr.is_empty(), "{args:?} says why");
    }
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tickflow"),
        ("fish", "complete -c tickflow"),
    ] {
        let output = tickflow(&["completions", shell], &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{shell}: {output:?}");
        assert!(stdout.contains(marker), "{shell}: {stdout}");
        assert!(stdout.contains("bench"), "{shell} completes the commands");
    }
}

/// Instruments with other ticks, lots, limits and bands than the bench's own.
fn instruments() -> Vec<Instrument> {
    let instrument = |symbol: &str, tick_size, lot_size, band_bps, min, max, max_qty| Instrument {
        symbol: symbol.into(),
        tick_size,
        lot_size,
        band_bps,
        min_price: min,
        max_price: max,
        max_qty,
        name: String::new(),
        currency: String::new(),
    };
    vec![
        instrument("AAA", 0.01, 1, 1000, None, None, None),
        instrument("BBB", 0.05, 10, 20, Some(50.0), Some(150.0), Some(40)),
        instrument("CCC", 0.5, 100, 0, None, None, None),
        instrument("DDD", 0.01, 1, 1, None, Some(20.0), None),
    ]
}

/// A running pipeline: four `tickflow serve` processes on a private Redis.
struct Running {
    // Dropped first (fields drop in order): the services stop before their Redis does.
    pipeline: LocalPipeline,
    _redis: RedisServer,
    url: String,
    keys: KeySpace,
    _logs: tempfile::TempDir,
}

impl Running {
    async fn start(partitions: u32) -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let keys = KeySpace::new(
            streams_core::testing::unique_namespace("attach"),
            partitions,
        );
        let handle = streams_core::Redis::new(&url, 2).unwrap();
        transform::refdata::store(&handle, &keys, &instruments())
            .await
            .unwrap();
        let env: Vec<(String, String)> = [
            ("REDIS_URL", url.clone()),
            ("TICKFLOW_NAMESPACE", keys.namespace().to_owned()),
            ("TICKFLOW_PARTITIONS", partitions.to_string()),
            ("TICKFLOW_TRIM_INTERVAL_MS", "200".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let logs = tempfile::tempdir().unwrap();
        let pipeline =
            LocalPipeline::start(env!("CARGO_BIN_EXE_tickflow").as_ref(), &env, logs.path())
                .await
                .unwrap();
        Self {
            _redis: redis,
            pipeline,
            url,
            keys,
            _logs: logs,
        }
    }

    fn env(&self, partitions: u32) -> Vec<(&'static str, String)> {
        vec![
            ("REDIS_URL", self.url.clone()),
            ("TICKFLOW_NAMESPACE", self.keys.namespace().to_owned()),
            ("TICKFLOW_PARTITIONS", partitions.to_string()),
        ]
    }

    /// Each market stream's consumer groups.
    async fn market_groups(&self) -> Vec<Vec<String>> {
        let mut conn = streams_core::testing::connect(&self.url).await.unwrap();
        let mut groups = Vec::new();
        for p in self.keys.all_partitions() {
            let stream = self.keys.stream(topology::MARKET, p);
            let read = GroupInfo::read(&mut conn, &stream).await.unwrap();
            groups.push(read.into_iter().map(|g| g.name).collect());
        }
        groups
    }

    /// The orders resting in the engine's books (as of its last commit) whose id starts
    /// with `prefix`.
    async fn resting(&self, prefix: &str) -> Vec<String> {
        let redis = streams_core::Redis::new(&self.url, 1).unwrap();
        let mut resting = Vec::new();
        for p in self.keys.all_partitions() {
            let books = engine::stage::load_books(&redis, &self.keys, p)
                .await
                .unwrap();
            for symbol in books.symbols() {
                let book = books.get(symbol).unwrap();
                for side in [engine::book::Side::Buy, engine::book::Side::Sell] {
                    resting.extend(
                        book.orders(side)
                            .filter(|o| o.order_id.starts_with(prefix))
                            .map(|o| o.order_id.clone()),
                    );
                }
            }
        }
        resting
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_bench_measures_a_running_pipeline_and_leaves_nothing_behind() {
    let running = Running::start(4).await;
    let grpc = running.pipeline.grpc_url();
    let http = running.pipeline.http_url("ingest");
    for (via, url_flag, url) in [("grpc", "--grpc", grpc), ("http", "--http", http)] {
        let output = tickflow(
            &[
                "bench",
                "--attach",
                "--via",
                via,
                url_flag,
                &url,
                "--events",
                "1500",
                "--symbols",
                "4",
                "--json",
            ],
            &running.env(4),
        );
        let report = report(&output);
        eprintln!("{via}: {report}");
        assert_eq!(report["mode"], "attach", "{report}");
        assert_eq!(report["accepted"], 1500, "{report}");
        assert_eq!(report["lost"], 0, "{report}");
        assert_eq!(report["duplicated"], 0, "{report}");
        assert_eq!(report["timed_out"], false, "{report}");
        // Prices stay within half of each band around its reference: nothing is refused.
        assert_eq!(report["rejected"], 0, "{report}");
        assert_eq!(
            report["symbols"],
            serde_json::json!(["AAA", "BBB", "CCC", "DDD"])
        );
        // 1350 orders and 150 ticks, one market entry each; the count is the run's own
        // (the first run's cancels may land in the second's).
        let count = report["latency_us"]["count"].as_u64().unwrap();
        assert!((1350..=3000).contains(&count), "{report}");
        assert!(
            report["latency_us"]["p50"].as_u64().unwrap() > 0,
            "{report}"
        );

        // The run's orders that rested were cancelled: the engine's books hold none.
        assert!(
            report["resting_cancelled"].as_u64().unwrap() > 0,
            "{report}"
        );
        assert_eq!(report["left_resting"], 0, "{report}");
        let run = report["run"].as_str().unwrap();
        let resting = running.resting(&format!("bench-{run}-")).await;
        assert!(
            resting.is_empty(),
            "{} left resting: {report}",
            resting.len()
        );
    }
    // The bench's consumer groups are gone: analytics alone reads the market streams.
    for groups in running.market_groups().await {
        assert_eq!(groups, ["analytics"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_bench_pointed_at_the_wrong_partitions_says_so() {
    let running = Running::start(4).await;
    let grpc = running.pipeline.grpc_url();
    for (partitions, expected) in [
        (2, "more than TICKFLOW_PARTITIONS=2 partitions"),
        (8, "analytics does not read"),
    ] {
        let output = tickflow(
            &["bench", "--attach", "--grpc", &grpc, "--events", "10"],
            &running.env(partitions),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{partitions}: {stderr}");
        assert!(stderr.contains(expected), "{partitions}: {stderr}");
    }
    let mut wrong_namespace = running.env(4);
    wrong_namespace[1].1 = "nobody".into();
    let output = tickflow(&["bench", "--attach", "--grpc", &grpc], &wrong_namespace);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("analytics does not read"),
        "{stderr}"
    );
    // Nothing was published and no group was made.
    for groups in running.market_groups().await {
        assert_eq!(groups, ["analytics"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_bench_stopped_by_sigterm_removes_its_group_and_warns_of_stale_ones() {
    let running = Running::start(4).await;
    let mut conn = streams_core::testing::connect(&running.url).await.unwrap();
    let market0 = running.keys.stream(topology::MARKET, 0);
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&market0)
        .arg("tickflow-bench-left-behind")
        .arg("$")
        .query_async(&mut conn)
        .await
        .unwrap();

    // A slow run (100 events/s for 1000 s), stopped once it has started publishing.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickflow"))
        .args(["bench", "--attach", "--grpc", &running.pipeline.grpc_url()])
        .args(["--events", "100000", "--rate", "100"])
        .env("RUST_LOG", "warn")
        .envs(running.env(4))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("tickflow bench --attach: run") {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "tickflow exited early: {said}"
        );
        said.push_str(&line);
    }
    assert!(
        said.contains(&format!("warning: {market0} tickflow-bench-left-behind")),
        "{said}"
    );
    // Its group is there while it runs, next to analytics' and the stale one.
    let run_groups = |groups: &[String]| {
        groups
            .iter()
            .filter(|g| g.starts_with("tickflow-bench-"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_groups(&running.market_groups().await[1]) == 0 {
        assert!(Instant::now() < deadline, "the run made no group");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tickflow did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert!(!status.success(), "{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    // Only the stale group (which is not its to remove) and analytics' are left.
    let groups = running.market_groups().await;
    assert_eq!(groups[0], ["analytics", "tickflow-bench-left-behind"]);
    for groups in &groups[1..] {
        assert_eq!(groups, &["analytics"]);
    }
}
