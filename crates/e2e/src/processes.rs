//! The four services as separate processes, as they run in production: one binary each
//! (this package's `e2e-ingest`, `e2e-transform`, `e2e-engine`, `e2e-analytics` targets,
//! built from the services' own `main.rs`).
//!
//! What needs its own process per service: tracing (the subscriber, and so `service.name`,
//! is process-global) and metrics (the Prometheus recorder is process-global, so in one
//! process every test's services add to the same counters).
//!
//! [`ProcessPipeline::start`] starts a private `redis-server`, loads the demo reference data
//! into a namespace of its own, spawns one process per service on free `127.0.0.1` ports
//! with the same short timings as the in-process [`crate::Pipeline`] (plus whatever
//! [`ProcessOptions::env`] adds, e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`), and waits until each
//! answers `/readyz`. [`ProcessPipeline::stop`] sends SIGTERM to every process and waits
//! for each to exit (a graceful exit flushes the spans it still holds); a process still
//! running when the pipeline is dropped is killed. Each process's output goes to a log
//! file ([`ProcessPipeline::log`]), shown when it fails.
//!
//! The binaries' paths are only known to the integration tests (`CARGO_BIN_EXE_*`):
//! they pass [`service_binaries!`](crate::service_binaries).

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use streams_core::connection::Connection;
use streams_core::{KeySpace, testing::RedisOptions};
use tempfile::TempDir;
use tickflow_proto::v1::ingest_service_client::IngestServiceClient;

use crate::{Backend, POLL, RedisKind, Role, StreamEntry, read_response};

/// How long every process gets to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The paths of the four service binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `e2e-ingest`.
    pub ingest: PathBuf,
    /// `e2e-transform`.
    pub transform: PathBuf,
    /// `e2e-engine`.
    pub engine: PathBuf,
    /// `e2e-analytics`.
    pub analytics: PathBuf,
}

impl Binaries {
    /// The binary of `role`.
    pub fn path(&self, role: Role) -> &Path {
        match role {
            Role::Ingest => &self.ingest,
            Role::Transform => &self.transform,
            Role::Engine => &self.engine,
            Role::Analytics => &self.analytics,
        }
    }
}

/// The [`Binaries`] cargo built for this package; usable only in its integration tests
/// (where `CARGO_BIN_EXE_*` is set).
#[macro_export]
macro_rules! service_binaries {
    () => {
        $crate::processes::Binaries {
            ingest: env!("CARGO_BIN_EXE_e2e-ingest").into(),
            transform: env!("CARGO_BIN_EXE_e2e-transform").into(),
            engine: env!("CARGO_BIN_EXE_e2e-engine").into(),
            analytics: env!("CARGO_BIN_EXE_e2e-analytics").into(),
        }
    };
}

/// How to build a [`ProcessPipeline`].
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// `TICKFLOW_PARTITIONS` (default 4).
    pub partitions: u32,
    /// Extra variables for every process (override the harness's).
    pub env: Vec<(String, String)>,
    /// Prefix of the namespace (`t-<prefix>-…`).
    pub name: String,
    /// Processes per role (default 1 each; ingest, transform, engine, analytics).
    pub replicas: [usize; 4],
    /// How the redis-server runs (e.g. with AOF, to survive being killed).
    pub redis: RedisOptions,
    /// Where Redis runs (default: a redis-server of the pipeline's own, with `redis`).
    pub backend: RedisKind,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            partitions: 4,
            env: Vec::new(),
            name: "proc".into(),
            replicas: [1; 4],
            redis: RedisOptions::default(),
            backend: RedisKind::Server,
        }
    }
}

/// One service process.
#[derive(Debug)]
pub struct ServiceProcess {
    role: Role,
    index: usize,
    consumer: String,
    /// Killed on purpose ([`ProcessPipeline::kill`]): not a failure.
    killed: bool,
    pid: u32,
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    log: PathBuf,
    /// Behind a mutex so that liveness checks can take `&self`.
    child: Mutex<Child>,
    /// Set once it exited and was reaped.
    exited: Mutex<Option<ExitStatus>>,
}

impl ServiceProcess {
    /// Which service.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Its replica index within its role.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its `CONSUMER_NAME`.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Whether it is running (not exited, not killed).
    pub fn is_running(&self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where its HTTP server listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Where its gRPC server listens (ingest only).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// Its exit status, if it has exited.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().expect("exit status");
        if exited.is_none() {
            *exited = self
                .child
                .lock()
                .expect("child")
                .try_wait()
                .expect("try_wait");
        }
        *exited
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    fn signal(&self, signal: &str) {
        if self.try_exit_status().is_some() {
            return;
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{signal} {}: {e}", self.pid));
        // It may have exited in between: only a live process must take the signal.
        assert!(
            status.success() || self.try_exit_status().is_some(),
            "kill -{signal} {} failed: {status}",
            self.pid
        );
    }
}

/// The four services as processes against a private redis-server. See the
/// [module documentation](self).
pub struct ProcessPipeline {
    services: Vec<ServiceProcess>,
    binaries: Binaries,
    env: BTreeMap<String, String>,
    /// Processes spawned so far (numbers their log files).
    spawned: usize,
    namespace: String,
    keys: KeySpace,
    external_stream: String,
    http: reqwest::Client,
    conn: Connection,
    logs: TempDir,
    // Last, so that it is killed after the processes.
    server: Backend,
}

impl fmt::Debug for ProcessPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessPipeline")
            .field("redis", &self.server.url())
            .field("namespace", &self.namespace)
            .field("services", &self.services)
            .field("logs", &self.logs.path())
            .finish_non_exhaustive()
    }
}

impl ProcessPipeline {
    /// Starts the four services (one process each) and waits until each is ready.
    pub async fn start(binaries: Binaries, options: ProcessOptions) -> Self {
        let crate::Ground {
            server,
            namespace,
            keys,
            external_stream,
            base_env,
            redis: _,
            conn,
            http,
        } = crate::Ground::prepare(
            &options.name,
            options.partitions,
            &options.env,
            options.redis,
            options.backend,
        )
        .await;
        let env: BTreeMap<String, String> = base_env.into_iter().collect();
        let logs = tempfile::Builder::new()
            .prefix("tickflow-e2e-logs-")
            .tempdir()
            .expect("a directory for the services' logs");

        let mut pipeline = Self {
            services: Vec::new(),
            binaries,
            env,
            spawned: 0,
            namespace,
            keys,
            external_stream,
            http,
            conn,
            logs,
            server,
        };
        for (role, count) in Role::ALL.into_iter().zip(options.replicas) {
            for index in 0..count {
                let process = pipeline.spawn(role, index, format!("{role}-{index}"));
                pipeline.services.push(process);
            }
        }
        pipeline.wait_ready().await;
        pipeline
    }

    /// Waits until every process answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        self.wait_for(READY_TIMEOUT, async || {
            for service in &self.services {
                let url = format!("http://{}/readyz", service.http);
                let ready = match self.http.get(&url).send().await {
                    Ok(r) => r.status().as_u16() == 200,
                    Err(_) => false,
                };
                if !ready {
                    return Err(format!("{} to be ready", service.role));
                }
            }
            Ok(())
        })
        .await
    }

    /// Sends SIGTERM to every process and waits for each to exit; panics (with its log)
    /// if one did not exit with status 0 within the time allowed. Redis stays up.
    pub async fn stop(&mut self) {
        for service in self.services.iter().filter(|s| !s.killed) {
            service.signal("TERM");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut problems = Vec::new();
        for service in self.services.iter().filter(|s| !s.killed) {
            let status = loop {
                if let Some(status) = service.try_exit_status() {
                    break Some(status);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match status {
                Some(status) if status.success() => {}
                Some(status) => problems.push(format!(
                    "{} exited with {status}; its log:\n{}",
                    service.role,
                    service.log()
                )),
                None => {
                    service.signal("KILL");
                    problems.push(format!(
                        "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                        service.role,
                        service.log()
                    ));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "services failed to stop:\n{}",
            problems.join("\n")
        );
    }

    // ----- where things are ------------------------------------------------------------

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The key layout.
    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// The external stream ingest reads (`<ns>:ingest_stream`).
    pub fn external_stream(&self) -> &str {
        &self.external_stream
    }

    /// The URL of the pipeline's redis-server.
    pub fn redis_url(&self) -> String {
        self.server.url()
    }

    /// Where the pipeline's Redis runs.
    pub fn backend(&self) -> &Backend {
        &self.server
    }

    /// A connection to the pipeline's Redis.
    pub fn conn(&self) -> Connection {
        self.conn.clone()
    }

    /// A process of `role`: the first one running, else the first one.
    pub fn service(&self, role: Role) -> &ServiceProcess {
        self.services
            .iter()
            .filter(|s| s.role == role)
            .min_by_key(|s| (!s.is_running(), s.index))
            .unwrap_or_else(|| panic!("no {role} process"))
    }

    /// Every process of `role`, by index.
    pub fn replicas(&self, role: Role) -> impl Iterator<Item = &ServiceProcess> {
        self.services.iter().filter(move |s| s.role == role)
    }

    // ----- crashing and restarting -----------------------------------------------------

    /// Kills replica `index` of `role` with SIGKILL (no shutdown: a crash) and reaps it.
    pub fn kill(&mut self, role: Role, index: usize) {
        let service = self.slot(role, index);
        service.signal("KILL");
        service.child.lock().expect("child").wait().expect("reap");
        service.killed = true;
    }

    /// Starts replica `index` of `role` again (a new process on new ports) under
    /// `CONSUMER_NAME` `consumer`; one still running is killed first. Does not wait for it
    /// to be ready.
    pub fn restart(&mut self, role: Role, index: usize, consumer: String) {
        if self.slot(role, index).is_running() {
            self.kill(role, index);
        }
        let process = self.spawn(role, index, consumer);
        *self.slot(role, index) = process;
    }

    /// Kills the redis-server with SIGKILL.
    pub fn kill_redis(&mut self) {
        self.server.server_mut().kill();
    }

    /// Starts the redis-server again on its port and data (with AOF, what it had), and
    /// reconnects [`Self::conn`].
    pub async fn restart_redis(&mut self) {
        self.server.server_mut().restart();
        self.conn = streams_core::Redis::new(&self.server.url(), 1)
            .expect("redis handle")
            .pooled()
            .await
            .expect("a connection to the restarted redis-server")
            .clone();
    }

    fn slot(&mut self, role: Role, index: usize) -> &mut ServiceProcess {
        self.services
            .iter_mut()
            .find(|s| s.role == role && s.index == index)
            .unwrap_or_else(|| panic!("no {role} replica {index}"))
    }

    fn spawn(&mut self, role: Role, index: usize, consumer: String) -> ServiceProcess {
        self.spawned += 1;
        let log = self
            .logs
            .path()
            .join(format!("{role}-{index}.{}.log", self.spawned));
        spawn(
            self.binaries.path(role),
            role,
            index,
            consumer,
            &self.env,
            log,
        )
    }

    /// What the process of `role` printed so far.
    pub fn log(&self, role: Role) -> String {
        self.service(role).log()
    }

    /// `http://<addr><path>` of the process of `role`.
    pub fn url(&self, role: Role, path: &str) -> String {
        format!("http://{}{path}", self.service(role).http)
    }

    // ----- sending ---------------------------------------------------------------------

    /// POSTs `body` as JSON to ingest with extra `headers` (e.g. `traceparent`); returns
    /// the status and the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &Json,
        headers: &[(&str, &str)],
    ) -> (u16, Json) {
        let mut request = self
            .http
            .post(self.url(Role::Ingest, path))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("serialize body"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        read_response(response).await
    }

    /// DELETEs `path` on ingest.
    pub async fn delete(&self, path: &str) -> (u16, Json) {
        let response = self
            .http
            .delete(self.url(Role::Ingest, path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
        read_response(response).await
    }

    /// GETs a full URL; returns the status and the JSON answer.
    pub async fn get_json(&self, url: &str) -> (u16, Json) {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        read_response(response).await
    }

    /// The Prometheus text of the process of `role` (`GET /metrics`).
    pub async fn metrics(&self, role: Role) -> String {
        crate::scrape_metrics(&self.http, &self.url(role, "/metrics")).await
    }

    /// `GET /v1/symbols/{symbol}/stats` of analytics.
    pub async fn stats(&self, symbol: &str) -> Json {
        let url = self.url(Role::Analytics, &format!("/v1/symbols/{symbol}/stats"));
        let (status, body) = self.get_json(&url).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// A gRPC client of ingest's `IngestService`.
    pub async fn grpc_client(&self) -> IngestServiceClient<tonic::transport::Channel> {
        let addr = self
            .service(Role::Ingest)
            .grpc
            .expect("ingest has a gRPC address");
        crate::ingest_client(addr).await
    }

    /// `XADD <external stream> * field value ...`; returns the entry id.
    pub async fn xadd_external(&self, fields: &[(&str, &str)]) -> String {
        crate::xadd(&mut self.conn(), &self.external_stream, fields).await
    }

    // ----- reading ---------------------------------------------------------------------

    /// Every entry of every partition of the logical stream `stream`, decoded as
    /// envelopes, ordered by stream id.
    pub async fn stream_entries(&self, stream: &str) -> Vec<StreamEntry> {
        crate::stream_entries(&mut self.conn(), &self.keys, stream).await
    }

    /// The number of entries in every partition of the logical stream `stream` (`XLEN`).
    pub async fn stream_len(&self, stream: &str) -> u64 {
        self.xlen_all(
            self.keys
                .all_partitions()
                .map(|p| self.keys.stream(stream, p)),
        )
        .await
    }

    /// The number of dead letters of every partition of the logical stream `stream`.
    pub async fn dead_letter_len(&self, stream: &str) -> u64 {
        self.xlen_all(
            self.keys
                .all_partitions()
                .map(|p| self.keys.dead_letter(stream, p)),
        )
        .await
    }

    /// `XLEN` of one stream by key.
    pub async fn xlen(&self, key: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .unwrap_or_else(|e| panic!("XLEN {key}: {e}"))
    }

    async fn xlen_all(&self, keys: impl Iterator<Item = String>) -> u64 {
        let mut total = 0;
        for key in keys {
            total += self.xlen(&key).await;
        }
        total
    }

    // ----- waiting ---------------------------------------------------------------------

    /// Polls `check` until it returns `Ok`; panics after `timeout` with the last `Err`, or
    /// at once (with its log) if a process exited on its own.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check().await {
                Ok(value) => return value,
                Err(last) => last,
            };
            self.assert_running();
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {last}\n{}",
                    self.log_tails(40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last `lines` lines of every process's log, headed by its role, index and state.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for service in &self.services {
            let log = service.log();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!(
                "--- {} {} ({}, running: {}):\n",
                service.role,
                service.index,
                service.consumer,
                service.is_running()
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Panics, with its log, if a process has exited.
    pub fn assert_running(&self) {
        for service in self.services.iter().filter(|s| !s.killed) {
            if let Some(status) = service.try_exit_status() {
                panic!(
                    "{} exited on its own with {status}; its log:\n{}",
                    service.role,
                    service.log()
                );
            }
        }
    }

    /// Waits until every stage has consumed and acknowledged all of its input.
    pub async fn wait_settled(&self, timeout: Duration) {
        self.wait_for(timeout, async || self.check_settled().await)
            .await
    }

    /// `Ok` when every stage has consumed and acknowledged all of its input.
    pub async fn check_settled(&self) -> Result<(), String> {
        crate::check_settled(&mut self.conn(), &self.keys, &self.external_stream).await
    }

    /// `(lag, pending)` of `group` on `stream` (`lag` is `None` when the group does not
    /// exist; counted, not Redis's figure).
    pub async fn group_backlog(&self, stream: &str, group: &str) -> (Option<i64>, i64) {
        crate::group_backlog(&mut self.conn(), stream, group).await
    }
}

impl Drop for ProcessPipeline {
    fn drop(&mut self) {
        // A test that failed before `stop`: no process outlives it.
        for service in &self.services {
            if service.try_exit_status().is_none() {
                let mut child = service.child.lock().expect("child");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Spawns replica `index` of `role` on free ports, its output to `log`.
fn spawn(
    binary: &Path,
    role: Role,
    index: usize,
    consumer: String,
    env: &BTreeMap<String, String>,
    log: PathBuf,
) -> ServiceProcess {
    let http = free_addr();
    let grpc = (role == Role::Ingest).then(free_addr);
    let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let err = out.try_clone().expect("clone the log file");
    let mut command = Command::new(binary);
    // Only what the harness sets: no OTEL_*, TICKFLOW_* or REDIS_URL of the test runner.
    command.env_clear();
    for keep in ["PATH", "HOME", "TMPDIR", "LLVM_PROFILE_FILE"] {
        if let Some(value) = std::env::var_os(keep) {
            command.env(keep, value);
        }
    }
    command
        .envs(env)
        .env("CONSUMER_NAME", &consumer)
        .env("HTTP_ADDR", http.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(grpc) = grpc {
        command.env("GRPC_ADDR", grpc.to_string());
    }
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
    ServiceProcess {
        role,
        index,
        consumer,
        killed: false,
        pid: child.id(),
        http,
        grpc,
        log,
        child: Mutex::new(child),
        exited: Mutex::new(None),
    }
}

/// A free `127.0.0.1` address for a child to listen on ([`streams_core::testing::free_port`]).
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], streams_core::testing::free_port()))
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`,
/// in Prometheus text (0 when there are none: counters appear at their first increment).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(metric, sample_labels, _)| {
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| sample_labels.get(*k).is_some_and(|s| s == v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// `name{k="v",…} value` → (name, labels, value).
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    let (_, quote) = chars.next()?;
                    if quote != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => {
                                let (_, escaped) = chars.next()?;
                                value.push(if escaped == 'n' { '\n' } else { escaped });
                            }
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        };
        &body[end + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name.to_owned(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_by_name_and_labels() {
        let text = "# HELP x\n# TYPE tickflow_events_processed_total counter\n\
            tickflow_events_processed_total{stage=\"transform\",partition=\"0\"} 3\n\
            tickflow_events_processed_total{stage=\"transform\",partition=\"1\"} 4\n\
            tickflow_events_processed_total{stage=\"engine\",partition=\"1\"} 5\n\
            tickflow_events_processed_total_other{stage=\"transform\"} 100\n\
            tickflow_ingest_events_total 11\n\
            odd{l=\"a \\\"q\\\", b\"} 2\n";
        let sum = |name, labels: &[(&str, &str)]| metric_sum(text, name, labels);
        assert_eq!(
            sum("tickflow_events_processed_total", &[("stage", "transform")]),
            7.0
        );
        assert_eq!(sum("tickflow_events_processed_total", &[]), 12.0);
        assert_eq!(
            sum(
                "tickflow_events_processed_total",
                &[("stage", "engine"), ("partition", "1")]
            ),
            5.0
        );
        assert_eq!(sum("tickflow_ingest_events_total", &[]), 11.0);
        assert_eq!(sum("odd", &[("l", "a \"q\", b")]), 2.0);
        assert_eq!(sum("absent", &[]), 0.0);
    }
}
