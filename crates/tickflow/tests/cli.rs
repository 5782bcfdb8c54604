//! The tickflow command line, run as users run it.
//!
//! - A small `tickflow bench` on a pipeline of its own must deliver every order exactly
//!   once. (Its figures are not checked: speed lives in BENCHMARKS.md, not in tests.)
//! - `tickflow bench --attach` against four running `tickflow serve` processes that trim
//!   their streams every 200 ms, through gRPC and HTTP: every order once, no consumer group
//!   and no order of its own left behind, and a clear error when it is pointed at the wrong
//!   partitions.
//! - The operator commands against a pipeline with its engine stopped: `status --json`
//!   shows the backlog, `tail --json` decodes the orders, garbage in front of the engine
//!   is dead-lettered with its reason (`dlq list`, `show`), `dlq replay` moves it back,
//!   `purge` needs --yes, `groups reset` is refused while the stage runs and then makes it
//!   read everything again; `top` in tmux shows the stages and their numbers, and q quits.
//! - `--help` prints an overview, each command's help its own examples; an unknown
//!   command fails; completions are printed for bash, zsh and fish.

use std::{
    io::Read,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use streams_core::{
    KeySpace,
    connection::Connection,
    inspect::GroupInfo,
    testing::{RedisCluster, RedisServer},
};
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
    let commands = [
        "status",
        "tail",
        "dlq",
        "groups",
        "top",
        "load",
        "bench",
        "serve",
        "healthcheck",
        "completions",
    ];
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
        (&["status", "--help"], "tickflow status --stage engine"),
        (
            &["dlq", "replay", "--help"],
            "tickflow dlq replay --stage engine --id",
        ),
        (
            &["groups", "reset", "--help"],
            "tickflow groups reset analytics --to start --yes",
        ),
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

/// The variables that point the services and `tickflow` at a pipeline on `url` (a Redis
/// Cluster's seeds when `cluster`) with `keys`, read as having `partitions`.
fn pipeline_env(
    url: &str,
    cluster: bool,
    keys: &KeySpace,
    partitions: u32,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("REDIS_URL", url.to_owned()),
        ("TICKFLOW_NAMESPACE", keys.namespace().to_owned()),
        ("TICKFLOW_PARTITIONS", partitions.to_string()),
        ("INGEST_STREAMS", external_stream(keys)),
    ];
    if cluster {
        env.push(("TICKFLOW_REDIS_MODE", "cluster".to_owned()));
    }
    env
}

/// The external stream ingest reads: one of the namespace's own, so that pipelines sharing
/// a cluster do not share it.
fn external_stream(keys: &KeySpace) -> String {
    format!("{}:ingest_stream", keys.namespace())
}

/// A handle on the Redis at `url`, as the services open one.
fn handle(url: &str, cluster: bool) -> streams_core::Redis {
    if cluster {
        streams_core::Redis::new_cluster(url).unwrap()
    } else {
        streams_core::Redis::new(url, 2).unwrap()
    }
}

/// A running pipeline: four `tickflow serve` processes on a private Redis, or on the test
/// binary's shared Redis Cluster (`TICKFLOW_REDIS_MODE=cluster`, a namespace and an
/// external stream of its own).
struct Running {
    // Dropped first (fields drop in order): the services stop before their Redis does.
    pipeline: LocalPipeline,
    /// `None` on the shared cluster (which outlives the test).
    _redis: Option<RedisServer>,
    url: String,
    cluster: bool,
    keys: KeySpace,
    _logs: tempfile::TempDir,
}

impl Running {
    async fn start(partitions: u32) -> Self {
        Self::start_with(partitions, &[("TICKFLOW_TRIM_INTERVAL_MS", "200")]).await
    }

    /// A pipeline with `extra` variables besides the Redis, namespace and partitions.
    async fn start_with(partitions: u32, extra: &[(&str, &str)]) -> Self {
        Self::start_on(false, partitions, extra).await
    }

    /// [`Self::start_with`] on a redis-server of its own, or (`cluster`) on the shared
    /// Redis Cluster.
    async fn start_on(cluster: bool, partitions: u32, extra: &[(&str, &str)]) -> Self {
        let (redis, url) = if cluster {
            (None, RedisCluster::shared().seeds())
        } else {
            let redis = RedisServer::start();
            let url = redis.url();
            (Some(redis), url)
        };
        let keys = KeySpace::new(
            streams_core::testing::unique_namespace("attach"),
            partitions,
        );
        let handle = handle(&url, cluster);
        transform::refdata::store(&handle, &keys, &instruments())
            .await
            .unwrap();
        let env: Vec<(String, String)> = pipeline_env(&url, cluster, &keys, partitions)
            .into_iter()
            .chain([("RUST_LOG", "warn".to_owned())])
            .chain(extra.iter().map(|(k, v)| (*k, (*v).to_owned())))
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let logs = tempfile::tempdir().unwrap();
        let pipeline =
            LocalPipeline::start(env!("CARGO_BIN_EXE_tickflow").as_ref(), &env, logs.path())
                .await
                .unwrap();
        Self {
            pipeline,
            _redis: redis,
            url,
            cluster,
            keys,
            _logs: logs,
        }
    }

    /// The variables that point `tickflow` at this pipeline, read as having `partitions`.
    fn env(&self, partitions: u32) -> Vec<(&'static str, String)> {
        pipeline_env(&self.url, self.cluster, &self.keys, partitions)
    }

    /// The external stream ingest reads: one of the pipeline's own.
    fn external_stream(&self) -> String {
        external_stream(&self.keys)
    }

    /// A handle on the pipeline's Redis, as the services open one.
    fn redis(&self) -> streams_core::Redis {
        handle(&self.url, self.cluster)
    }

    /// A connection to the pipeline's Redis (on a cluster, routed by key).
    async fn conn(&self) -> Connection {
        self.redis().pooled().await.unwrap().clone()
    }

    /// Each market stream's consumer groups.
    async fn market_groups(&self) -> Vec<Vec<String>> {
        let mut conn = self.conn().await;
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
        let redis = self.redis();
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
    let mut conn = running.conn().await;
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

/// The JSON objects a `--json` command printed, one per line.
fn json_lines(output: &Output) -> Vec<Json> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tickflow failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// What a command printed on stdout, after checking that it succeeded.
fn text(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tickflow failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

impl Running {
    /// `tickflow ARGS` against this pipeline.
    fn tickflow(&self, args: &[&str]) -> Output {
        tickflow(args, &self.env(self.keys.partitions()))
    }

    /// `tickflow status --json`'s stage `stage`.
    fn stage_status(&self, stage: &str) -> Json {
        let status = report(&self.tickflow(&["status", "--json", "--stage", stage]));
        assert_eq!(status["schema"], 1, "{status}");
        status["stages"][0].clone()
    }

    /// Polls `stage`'s status until `done` holds (or fails after 60 s).
    async fn wait_for_stage(&self, stage: &str, what: &str, done: impl Fn(&Json) -> bool) -> Json {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.stage_status(stage);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{stage}: {what}; last status {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes `count` limit orders `op-0`… through ingest's gRPC API.
    async fn publish_orders(&self, count: usize) {
        use tickflow_proto::v1;
        let events = (0..count)
            .map(|i| v1::Event {
                kind: Some(v1::event::Kind::NewOrder(v1::NewOrder {
                    symbol: ["AAA", "BBB", "CCC", "DDD"][i % 4].into(),
                    side: v1::Side::Buy as i32,
                    r#type: v1::OrderType::Limit as i32,
                    price: [100.0, 100.0, 100.0, 10.0][i % 4],
                    qty: [1.0, 10.0, 100.0, 1.0][i % 4],
                    client_order_id: format!("op-{i}"),
                })),
            })
            .collect();
        let mut client =
            v1::ingest_service_client::IngestServiceClient::connect(self.pipeline.grpc_url())
                .await
                .unwrap();
        let reply = client
            .publish(v1::PublishRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.accepted as usize, count);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_a_backlog_read_orders_and_dead_letters_and_replay_them() {
    operators_see_a_backlog_read_orders_and_dead_letters_and_replay_them_on(false).await;
}

/// The same commands against a pipeline on a Redis Cluster: every partition a slot of its
/// own, the external stream and its dead letters in two more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_a_backlog_read_orders_and_dead_letters_and_replay_them_on_a_redis_cluster() {
    operators_see_a_backlog_read_orders_and_dead_letters_and_replay_them_on(true).await;
}

async fn operators_see_a_backlog_read_orders_and_dead_letters_and_replay_them_on(cluster: bool) {
    // No trimming: the entries the test reads stay in their streams.
    let mut running = Running::start_on(cluster, 4, &[("TICKFLOW_TRIM_INTERVAL_MS", "0")]).await;

    // The engine is stopped: what transform validates piles up in front of it.
    running.pipeline.stop_service("engine").await.unwrap();
    running.publish_orders(40).await;
    let engine = running
        .wait_for_stage("engine", "40 orders waiting", |s| s["totals"]["lag"] == 40)
        .await;
    assert_eq!(engine["mode"], "owned");
    assert_eq!(engine["input"], "validated");
    assert_eq!(engine["totals"]["backlog"], 40, "{engine}");
    assert_eq!(engine["totals"]["pending"], 0, "{engine}");
    let slowest = engine["slowest_partition"]
        .as_u64()
        .expect("a slowest partition");
    let partitions = engine["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 4);
    let most = partitions.iter().map(|p| p["lag"].as_u64().unwrap()).max();
    assert_eq!(
        partitions[slowest as usize]["lag"].as_u64(),
        most,
        "{engine}"
    );
    // Stopped gracefully: it released its leases.
    assert!(partitions.iter().all(|p| p["owner"].is_null()), "{engine}");
    let transform = running.stage_status("transform");
    assert_eq!(transform["totals"]["backlog"], 0, "{transform}");
    assert_eq!(
        transform["partitions"][0]["owner"], "transform-1",
        "{transform}"
    );
    // The table marks the slowest partition.
    let table = text(&running.tickflow(&["status", "--stage", "engine"]));
    assert!(table.contains(&format!(">    {slowest}")), "{table}");

    // tail decodes the validated orders, across partitions, in id order.
    let orders = json_lines(&running.tickflow(&[
        "tail",
        "validated",
        "--from",
        "start",
        "--count",
        "100",
        "--json",
    ]));
    assert_eq!(orders.len(), 40);
    let mut ids: Vec<String> = orders
        .iter()
        .map(|o| {
            assert_eq!(o["type"], "order.validated", "{o}");
            assert_eq!(o["payload"]["side"], "buy", "{o}");
            assert_eq!(o["payload"]["symbol"], o["key"], "{o}");
            assert!(o["origin"].as_str().unwrap().ends_with('Z'), "{o}");
            o["payload"]["client_order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("op-{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let last_two = json_lines(&running.tickflow(&["tail", "validated", "--from", "-2", "--json"]));
    assert_eq!(last_two.len(), 2);
    assert_eq!(
        last_two[1]["id"], orders[39]["id"],
        "-N ends with the newest entry"
    );
    let one_partition = text(&running.tickflow(&[
        "tail",
        "validated",
        "--partition",
        "1",
        "--from",
        "start",
        "--count",
        "3",
    ]));
    assert!(
        one_partition
            .lines()
            .all(|l| l.contains(" p1 order.validated ")),
        "{one_partition}"
    );

    // A garbage entry and a flat one in front of the engine are dead-lettered, with why.
    let mut conn = running.conn().await;
    let validated0 = running.keys.stream(topology::VALIDATED, 0);
    for fields in [
        &[("h", "2 order.validated AAA 1"), ("p", "garbage")][..],
        &[("junk", "yes")],
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&validated0)
            .arg("*")
            .arg(fields)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    running.pipeline.start_service("engine").await.unwrap();
    running
        .wait_for_stage("engine", "everything handled", |s| {
            s["totals"]["backlog"] == 0 && s["totals"]["dead_letters"] == 2
        })
        .await;
    let dead = json_lines(&running.tickflow(&["dlq", "list", "--stage", "engine", "--json"]));
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0]["dlq"]["reason"]
            .as_str()
            .unwrap()
            .contains("payload of order.validated is not valid"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["dlq"]["deliveries"], 1);
    assert_eq!(dead[0]["type"], "order.validated");
    assert_eq!(dead[1]["fields"]["junk"], "yes", "{}", dead[1]);
    let listed = text(&running.tickflow(&["dlq", "list", "--stage", "engine"]));
    assert!(
        listed.contains("2 dead letters of stage engine"),
        "{listed}"
    );
    assert!(listed.contains("missing field `h`"), "{listed}");
    let first = dead[0]["id"].as_str().unwrap();
    let shown = text(&running.tickflow(&["dlq", "show", "--stage", "engine", "--id", first]));
    assert!(
        shown.contains("reason      payload of order.validated is not valid"),
        "{shown}"
    );

    // Replayed while the engine is stopped: back in their stream, without dlq.* fields.
    running.pipeline.stop_service("engine").await.unwrap();
    text(&running.tickflow(&["dlq", "replay", "--stage", "engine", "--id", first]));
    let left = json_lines(&running.tickflow(&["dlq", "list", "--stage", "engine", "--json"]));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], dead[1]["id"]);
    let replayed =
        text(&running.tickflow(&["dlq", "replay", "--stage", "engine", "--partition", "0"]));
    assert!(
        replayed.contains("replayed 1 dead letters of stage engine"),
        "{replayed}"
    );
    assert!(
        json_lines(&running.tickflow(&["dlq", "list", "--stage", "engine", "--json"])).is_empty()
    );
    let back = json_lines(&running.tickflow(&[
        "tail",
        "validated",
        "--partition",
        "0",
        "--from",
        "-2",
        "--json",
    ]));
    assert_eq!(back[0]["type"], "order.validated", "{}", back[0]);
    assert_eq!(back[1]["fields"]["junk"], "yes", "{}", back[1]);
    assert!(back.iter().all(|e| e.get("dlq").is_none()), "{back:?}");
    let engine = running.stage_status("engine");
    assert_eq!(engine["partitions"][0]["lag"], 2, "{engine}");

    // Dead-lettered again once the engine is back; a purge needs --yes.
    running.pipeline.start_service("engine").await.unwrap();
    running
        .wait_for_stage("engine", "dead-lettered again", |s| {
            s["totals"]["dead_letters"] == 2
        })
        .await;
    let dry = text(&running.tickflow(&["dlq", "purge", "--stage", "engine"]));
    assert!(dry.contains("nothing deleted"), "{dry}");
    assert_eq!(running.stage_status("engine")["totals"]["dead_letters"], 2);
    text(&running.tickflow(&["dlq", "purge", "--stage", "engine", "--yes"]));
    assert_eq!(running.stage_status("engine")["totals"]["dead_letters"], 0);

    // An external entry without a symbol is dead-lettered by ingest; replayed (one, then
    // all), it goes back into the external stream once each time and is dead-lettered
    // again (on a cluster, across the two slots, through the dedupe gate).
    let external = running.external_stream();
    let _: String = redis::cmd("XADD")
        .arg(&external)
        .arg("*")
        .arg(&[("side", "buy"), ("qty", "1")])
        .query_async(&mut conn)
        .await
        .unwrap();
    let ingest_dead = |count: usize| {
        let running = &running;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let dead =
                    json_lines(&running.tickflow(&["dlq", "list", "--stage", "ingest", "--json"]));
                if dead.len() == count {
                    return dead;
                }
                assert!(Instant::now() < deadline, "ingest's dead letters: {dead:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let dead = ingest_dead(1).await;
    assert_eq!(dead[0]["fields"]["side"], "buy", "{}", dead[0]);
    assert!(
        dead[0]["dlq"]["reason"]
            .as_str()
            .unwrap()
            .contains("symbol"),
        "{}",
        dead[0]
    );
    let id = dead[0]["id"].as_str().unwrap();
    text(&running.tickflow(&["dlq", "replay", "--stage", "ingest", "--id", id]));
    let again = ingest_dead(1).await;
    assert_ne!(
        again[0]["id"], dead[0]["id"],
        "dead-lettered again, as a new entry"
    );
    let replayed = text(&running.tickflow(&["dlq", "replay", "--stage", "ingest"]));
    assert!(replayed.contains("replayed 1 dead letters"), "{replayed}");
    ingest_dead(1).await;
    let external_entries =
        json_lines(&running.tickflow(&["tail", &external, "--from", "start", "--json"]));
    assert_eq!(
        external_entries.len(),
        3,
        "the entry and its two replays: {external_entries:?}"
    );
    assert!(
        external_entries
            .iter()
            .all(|e| e["fields"]["side"] == "buy" && e.get("dlq").is_none()),
        "{external_entries:?}"
    );

    // A group reset is refused while the stage runs, a dry run without --yes, and then
    // the stage reads its whole input again.
    let analytics = running
        .wait_for_stage("analytics", "caught up", |s| {
            s["totals"]["backlog"] == 0 && s["totals"]["length"].as_u64() > Some(0)
        })
        .await;
    let length = analytics["totals"]["length"].as_u64().unwrap();
    let refused = running.tickflow(&["groups", "reset", "analytics", "--to", "start", "--yes"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("live consumers (analytics-1)"),
        "{refused:?}"
    );
    running.pipeline.stop_service("analytics").await.unwrap();
    let dry = text(&running.tickflow(&["groups", "reset", "analytics", "--to", "start"]));
    assert!(dry.contains("dry run"), "{dry}");
    assert_eq!(running.stage_status("analytics")["totals"]["lag"], 0);
    text(&running.tickflow(&["groups", "reset", "analytics", "--to", "start", "--yes"]));
    let reset = running.stage_status("analytics");
    assert_eq!(reset["totals"]["lag"].as_u64(), Some(length), "{reset}");
    running.pipeline.start_service("analytics").await.unwrap();
    running
        .wait_for_stage("analytics", "read everything again", |s| {
            s["totals"]["backlog"] == 0 && s["totals"]["entries_read"].as_u64() >= Some(length)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_stages_in_a_real_terminal_and_q_quits() {
    top_shows_the_stages_in_a_real_terminal_and_q_quits_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_stages_in_a_real_terminal_and_q_quits_on_a_redis_cluster() {
    top_shows_the_stages_in_a_real_terminal_and_q_quits_on(true).await;
}

async fn top_shows_the_stages_in_a_real_terminal_and_q_quits_on(cluster: bool) {
    let mut running = Running::start_on(cluster, 4, &[("TICKFLOW_TRIM_INTERVAL_MS", "0")]).await;
    running.publish_orders(20).await;
    running
        .wait_for_stage("analytics", "the orders analysed", |s| {
            s["totals"]["entries_read"].as_u64() >= Some(20) && s["totals"]["backlog"] == 0
        })
        .await;
    running.pipeline.stop_service("engine").await.unwrap();
    running.publish_orders(12).await;
    running
        .wait_for_stage("engine", "12 waiting", |s| s["totals"]["lag"] == 12)
        .await;

    // tmux: an 80×24 terminal, without colour; the exit status lands in a file.
    let dir = tempfile::tempdir().unwrap();
    let exit_file = dir.path().join("exit");
    let session = format!("tickflow-top-{}-{cluster}", std::process::id());
    let env: String = running
        .env(4)
        .iter()
        .map(|(k, v)| format!("{k}='{v}' "))
        .collect();
    let command = format!(
        "env NO_COLOR=1 {env}{} top; echo $? > {}",
        env!("CARGO_BIN_EXE_tickflow"),
        exit_file.display()
    );
    let tmux = |args: &[&str]| {
        let output = Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .expect("tmux is installed (apt-get install tmux; .ci/run does)");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let screen = loop {
        let screen = tmux(&["capture-pane", "-p", "-t", &session]);
        // After two refreshes every row has its numbers and the latency is shown.
        if screen.contains(">engine") && screen.contains("all time") && screen.contains("p99") {
            break screen;
        }
        assert!(Instant::now() < deadline, "top showed:\n{screen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{screen}");
    for stage in ["transform", "analytics", "ingest"] {
        assert!(screen.contains(stage), "{screen}");
    }
    let engine_row = screen.lines().find(|l| l.contains(">engine")).unwrap();
    let numbers: Vec<&str> = engine_row.split_whitespace().collect();
    assert_eq!(numbers[2], "12", "engine's lag: {engine_row}");
    assert!(
        screen.contains("(32 events)") || screen.contains("(20 events)"),
        "{screen}"
    );
    assert!(screen.lines().count() <= 24 && screen.lines().all(|l| l.chars().count() <= 80));
    assert!(!screen.contains('\u{1b}'), "no colour with NO_COLOR");

    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exit_file.exists() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "0");
    tmux(&["kill-server"]);
}
