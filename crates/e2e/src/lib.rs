//! End-to-end test harness: a whole tickflow pipeline in one process.
//!
//! [`Pipeline::start`] starts a private `redis-server` ([`RedisServer`]; or, as
//! [`Options::backend`] says, uses the test binary's shared Redis Cluster or starts one of
//! its own: [`RedisKind`]), loads the demo
//! reference data (`demo/instruments.json`) into it, and runs the four services, each with
//! its own [`App`], cancellation token, consumer name and listeners on `127.0.0.1:0`, as
//! tasks of the calling tokio runtime:
//!
//! ```text
//! ingest (HTTP, gRPC, <ns>:ingest_stream) ─▶ transform ─▶ engine (×N) ─▶ analytics
//! ```
//!
//! Every pipeline has a namespace and an external stream of its own and short timings
//! (`TICKFLOW_BLOCK_MS=100`, `TICKFLOW_LEASE_TTL_MS=600`, `TICKFLOW_CLAIM_IDLE_MS=500`, no
//! trimming). Services read their variables only through the [`Env`] given to them here;
//! the process environment is never changed.
//!
//! The helpers send events through each ingest path ([`Pipeline::post_json`],
//! [`Pipeline::grpc_client`], [`Pipeline::xadd_external`]), read what came out of each
//! stage ([`Pipeline::validated_entries`], [`Pipeline::market_events`],
//! [`Pipeline::trades`], [`Pipeline::execution_reports`], [`Pipeline::stats`], any stream
//! as it is with [`Pipeline::xrange`]), call a replica's admin router
//! ([`Pipeline::admin_status`], [`Pipeline::admin_post`]) and wait for asynchronous
//! effects ([`Pipeline::wait_until`], [`Pipeline::wait_for`], [`Pipeline::wait_settled`]).
//! [`Pipeline::shutdown`] stops every service gracefully and fails if one of them failed.
//!
//! [`processes::ProcessPipeline`] runs the four services as separate processes instead
//! (the package's `e2e-*` binaries), for what is process-global: `service.name` of traces,
//! and the Prometheus recorder. [`otlp::OtlpReceiver`] collects the spans they export.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message;
use redis::Value;
use serde_json::Value as Json;
use streams_core::connection::Connection;
use streams_core::{
    App, Env, Envelope, KeySpace, Partition, Redis,
    testing::{RedisCluster, RedisOptions, RedisServer, unique_namespace},
};
use tickflow_proto::{
    event_type, topology,
    v1::{self, ingest_service_client::IngestServiceClient},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub mod otlp;
pub mod processes;

/// The demo reference data every pipeline starts with.
pub const DEMO_INSTRUMENTS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/instruments.json");

/// How long a service gets to stop gracefully before the harness calls it hung.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Pipeline::start`] waits for every service to be ready and every owned
/// partition to be held by the replica it is assigned to.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval of the wait helpers.
const POLL: Duration = Duration::from_millis(50);

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `services/ingest`.
    Ingest,
    /// `services/transform`.
    Transform,
    /// `services/engine`.
    Engine,
    /// `services/analytics`.
    Analytics,
}

impl Role {
    /// Every role, upstream first.
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Transform, Role::Engine, Role::Analytics];

    /// The service's name (also the prefix of its consumer names).
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Transform => "transform",
            Role::Engine => "engine",
            Role::Analytics => "analytics",
        }
    }

    /// The owned consumer group and the logical stream it reads, for owned stages.
    pub fn owned_input(self) -> Option<(&'static str, &'static str)> {
        match self {
            Role::Ingest => None,
            Role::Transform => Some((topology::TRANSFORM_GROUP, topology::INBOUND)),
            Role::Engine => Some((topology::ENGINE_GROUP, topology::VALIDATED)),
            Role::Analytics => Some((topology::ANALYTICS_GROUP, topology::MARKET)),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to build a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct Options {
    /// `TICKFLOW_PARTITIONS` (default 4).
    pub partitions: u32,
    /// Transform replicas (default 1).
    pub transforms: usize,
    /// Engine replicas (default 1).
    pub engines: usize,
    /// Analytics replicas (default 1).
    pub analytics: usize,
    /// Extra variables for every service (override the harness's).
    pub env: Vec<(String, String)>,
    /// Extra variables for ingest only (e.g. `INGEST_MAX_BODY_BYTES`).
    pub ingest_env: Vec<(String, String)>,
    /// Prefix of the namespace (`t-<prefix>-…`).
    pub name: String,
    /// Where Redis runs (default: a redis-server of the pipeline's own).
    pub backend: RedisKind,
}

/// Where a harness's Redis runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RedisKind {
    /// A redis-server of its own.
    #[default]
    Server,
    /// The test binary's shared Redis Cluster (3 masters, 3 replicas:
    /// [`RedisCluster::shared`](streams_core::testing::RedisCluster::shared)), in a
    /// namespace of its own, with `TICKFLOW_REDIS_MODE=cluster`. Never failed over.
    SharedCluster,
    /// A Redis Cluster of its own, for a test that kills or restarts its nodes
    /// ([`Backend::cluster_mut`]).
    OwnCluster,
}

impl RedisKind {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(self) -> bool {
        self != RedisKind::Server
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            partitions: 4,
            transforms: 1,
            engines: 1,
            analytics: 1,
            env: Vec::new(),
            ingest_env: Vec::new(),
            name: "e2e".into(),
            backend: RedisKind::Server,
        }
    }
}

/// Where a harness's Redis runs: one redis-server, or a Redis Cluster of six (its own, or
/// the test binary's shared one).
#[derive(Debug)]
pub enum Backend {
    /// One redis-server.
    Server(RedisServer),
    /// Three masters with a replica each, the harness's own.
    Cluster(RedisCluster),
    /// The test binary's shared cluster ([`RedisKind::SharedCluster`]).
    SharedCluster(&'static RedisCluster),
}

impl Backend {
    /// Starts what `kind` names (for a server, with `options`).
    pub fn start(kind: RedisKind, options: RedisOptions) -> Self {
        match kind {
            RedisKind::Server => Backend::Server(RedisServer::start_with(options)),
            RedisKind::SharedCluster => Backend::SharedCluster(RedisCluster::shared()),
            RedisKind::OwnCluster => Backend::Cluster(RedisCluster::start()),
        }
    }

    /// `REDIS_URL` for the services: the server's URL, or the cluster's seeds.
    pub fn url(&self) -> String {
        match self {
            Backend::Server(server) => server.url(),
            Backend::Cluster(cluster) => cluster.seeds(),
            Backend::SharedCluster(cluster) => cluster.seeds(),
        }
    }

    /// Whether it is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !matches!(self, Backend::Server(_))
    }

    /// The variables that point a service at it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("REDIS_URL", self.url())];
        if self.is_cluster() {
            env.push(("TICKFLOW_REDIS_MODE", "cluster".into()));
        }
        env
    }

    /// A handle on it as the services open one (a pool of `pool_size` on a server).
    pub fn redis(&self, pool_size: usize) -> Redis {
        match self {
            Backend::Server(server) => Redis::new(&server.url(), pool_size),
            Backend::Cluster(_) | Backend::SharedCluster(_) => Redis::new_cluster(&self.url()),
        }
        .expect("redis handle")
    }

    /// The cluster, if it is one.
    fn cluster(&self) -> Option<&RedisCluster> {
        match self {
            Backend::Server(_) => None,
            Backend::Cluster(cluster) => Some(cluster),
            Backend::SharedCluster(cluster) => Some(cluster),
        }
    }

    /// A connection to each master (the server itself, or each master of the cluster): for
    /// what Redis answers per node (`SCAN`, `INFO`).
    async fn masters(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let Some(cluster) = self.cluster() else {
            return vec![connect(&self.url()).await];
        };
        let mut masters = Vec::new();
        for port in cluster.ports() {
            if !cluster.is_running(port) {
                continue;
            }
            let mut conn = connect(&format!("redis://127.0.0.1:{port}")).await;
            let role: Vec<Value> = redis::cmd("ROLE")
                .query_async(&mut conn)
                .await
                .expect("ROLE");
            if role.first() == Some(&Value::BulkString(b"master".to_vec())) {
                masters.push(conn);
            }
        }
        masters
    }

    /// Every key matching `pattern` (`SCAN`, on every master of a cluster).
    pub async fn scan(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for mut conn in self.masters().await {
            keys.extend(scan_node(&mut conn, pattern).await);
        }
        keys
    }

    /// Bytes of memory Redis uses for a pipeline whose keys all match `pattern`: on a
    /// redis-server of its own, its whole `used_memory` (`INFO memory`); on a cluster,
    /// which other tests share, the `MEMORY USAGE` of every key matching `pattern` on
    /// every master.
    pub async fn memory_used(&self, pattern: &str) -> u64 {
        if self.cluster().is_none() {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut connect(&self.url()).await)
                .await
                .expect("INFO memory");
            return info
                .lines()
                .find_map(|line| line.strip_prefix("used_memory:"))
                .and_then(|value| value.trim().parse().ok())
                .expect("used_memory in INFO");
        }
        let mut bytes = 0;
        for mut conn in self.masters().await {
            for key in scan_node(&mut conn, pattern).await {
                let used: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&key)
                    .arg("SAMPLES")
                    .arg(0)
                    .query_async(&mut conn)
                    .await
                    .expect("MEMORY USAGE");
                bytes += used.unwrap_or(0);
            }
        }
        bytes
    }

    /// The redis-server (the process harness and the chaos test kill and restart it).
    pub fn server_mut(&mut self) -> &mut RedisServer {
        match self {
            Backend::Server(server) => server,
            _ => panic!("this harness runs on a Redis Cluster, not one redis-server"),
        }
    }

    /// The Redis Cluster of its own (the cluster chaos test kills and restarts its nodes).
    pub fn cluster_mut(&mut self) -> &mut RedisCluster {
        match self {
            Backend::Cluster(cluster) => cluster,
            Backend::SharedCluster(_) => {
                panic!("the shared cluster is never failed over: use RedisKind::OwnCluster")
            }
            Backend::Server(_) => panic!("this harness runs on one redis-server, not a cluster"),
        }
    }
}

/// What every harness sets up first: a redis-server, a namespace of its own, the demo
/// reference data, the services' shared variables, and clients.
pub(crate) struct Ground {
    pub(crate) server: Backend,
    pub(crate) namespace: String,
    pub(crate) keys: KeySpace,
    pub(crate) external_stream: String,
    pub(crate) base_env: Vec<(String, String)>,
    pub(crate) redis: Redis,
    pub(crate) conn: Connection,
    pub(crate) http: reqwest::Client,
}

impl Ground {
    /// Starts Redis and loads `demo/instruments.json`; `extra_env` overrides the defaults.
    pub(crate) async fn prepare(
        name: &str,
        partitions: u32,
        extra_env: &[(String, String)],
        redis_options: RedisOptions,
        kind: RedisKind,
    ) -> Self {
        let server = Backend::start(kind, redis_options);
        let namespace = unique_namespace(name);
        let keys = KeySpace::new(namespace.clone(), partitions);
        let external_stream = format!("{namespace}:ingest_stream");
        let log_filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let mut base_env: Vec<(String, String)> = server
            .env()
            .into_iter()
            .chain([
                ("TICKFLOW_NAMESPACE", namespace.clone()),
                ("TICKFLOW_PARTITIONS", partitions.to_string()),
                ("TICKFLOW_BLOCK_MS", "100".into()),
                ("TICKFLOW_LEASE_TTL_MS", "600".into()),
                ("TICKFLOW_CLAIM_IDLE_MS", "500".into()),
                ("TICKFLOW_TRIM_INTERVAL_MS", "0".into()),
                ("TICKFLOW_SHUTDOWN_GRACE_MS", "5000".into()),
                ("TICKFLOW_POOL_SIZE", "8".into()),
                ("INGEST_STREAMS", external_stream.clone()),
                ("REFDATA_REFRESH_MS", "200".into()),
                ("RUST_LOG", log_filter),
            ])
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        base_env.extend(extra_env.iter().cloned());
        let redis = server.redis(4);
        let loaded = transform::refdata::load_file(&redis, &keys, DEMO_INSTRUMENTS)
            .await
            .expect("load demo/instruments.json into Redis");
        assert!(loaded > 0, "demo/instruments.json has instruments");
        let conn: Connection = redis.pooled().await.expect("a connection").clone();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client");
        Self {
            server,
            namespace,
            keys,
            external_stream,
            base_env,
            redis,
            conn,
            http,
        }
    }
}

/// One running service replica.
#[derive(Debug)]
pub struct Service {
    role: Role,
    index: usize,
    consumer: String,
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    token: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Set when the service's `run` returned an error (shown by the wait helpers).
    failure: Arc<Mutex<Option<String>>>,
}

impl Service {
    /// Which service.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Replica number within its role.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its `CONSUMER_NAME`.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Where its HTTP server (service routes and the admin router) listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Where its gRPC server listens (ingest only).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// Whether it has not been stopped.
    pub fn is_live(&self) -> bool {
        self.task.is_some()
    }
}

/// One decoded event of the market stream (an `order.events` entry holds several).
#[derive(Debug, Clone, PartialEq)]
pub enum MarketEvent {
    /// `execution`, alone (a transform rejection) or in `order.events`.
    Execution(v1::ExecutionReport),
    /// `trade`, in `order.events`.
    Trade(v1::Trade),
    /// `tick.validated`, passed through by the engine.
    Tick(v1::ValidatedTick),
}

/// One decoded entry of the validated stream (the engine's input).
#[derive(Debug, Clone, PartialEq)]
pub enum ValidatedEvent {
    /// `order.validated`.
    Order(v1::ValidatedOrder),
    /// `order.cancel.validated`.
    Cancel(v1::ValidatedCancel),
    /// `tick.validated`.
    Tick(v1::ValidatedTick),
}

/// An entry of a partitioned stream, decoded as an envelope.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    /// The partition it is in.
    pub partition: Partition,
    /// Its stream id.
    pub id: String,
    /// Its envelope.
    pub envelope: Envelope,
}

/// A whole pipeline against a private redis-server. See the [crate documentation](crate).
pub struct Pipeline {
    services: Vec<Service>,
    namespace: String,
    keys: KeySpace,
    external_stream: String,
    base_env: Vec<(String, String)>,
    ingest_env: Vec<(String, String)>,
    http: reqwest::Client,
    conn: Connection,
    redis: Redis,
    // Last, so that it is dropped (killed) after the services' tokens are cancelled.
    server: Backend,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("redis", &self.server.url())
            .field("namespace", &self.namespace)
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// One replica of each service, 4 partitions.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// A pipeline shaped by `options`; returns once every service answers `/readyz` and
    /// every owned partition is held by the replica it is assigned to.
    pub async fn start_with(options: Options) -> Self {
        let Ground {
            server,
            namespace,
            keys,
            external_stream,
            base_env,
            redis,
            conn,
            http,
        } = Ground::prepare(
            &options.name,
            options.partitions,
            &options.env,
            RedisOptions::default(),
            options.backend,
        )
        .await;

        let mut pipeline = Self {
            services: Vec::new(),
            namespace,
            keys,
            external_stream,
            base_env,
            ingest_env: options.ingest_env.clone(),
            http,
            conn,
            redis,
            server,
        };
        let counts = [
            (Role::Ingest, 1),
            (Role::Transform, options.transforms),
            (Role::Engine, options.engines),
            (Role::Analytics, options.analytics),
        ];
        for (role, count) in counts {
            for _ in 0..count {
                pipeline.add_replica(role).await;
            }
        }
        pipeline.wait_ready().await;
        pipeline
    }

    /// Starts one more replica of `role` (consumer `<role>-<n>`); returns its index. Does
    /// not wait for it to be ready (see [`Self::wait_ready`]).
    pub async fn add_replica(&mut self, role: Role) -> usize {
        let index = self.services.iter().filter(|s| s.role == role).count();
        let consumer = format!("{}-{index}", role.name());
        let mut pairs = self.base_env.clone();
        pairs.push(("CONSUMER_NAME".into(), consumer.clone()));
        if role == Role::Ingest {
            pairs.extend(self.ingest_env.iter().cloned());
        }
        let env = Env::from_pairs(pairs);
        let token = CancellationToken::new();
        let app = App::init(role.name(), env.clone(), "127.0.0.1:0", token.clone())
            .unwrap_or_else(|e| panic!("App::init({consumer}): {e:#}"));
        let http = bind().await;
        let http_addr = http.local_addr().expect("local addr");
        let mut grpc_addr = None;
        let run: futures::future::BoxFuture<'static, anyhow::Result<()>> = match role {
            Role::Ingest => {
                let settings = ingest::IngestConfig::from_env(&env).expect("ingest settings");
                let grpc = bind().await;
                grpc_addr = Some(grpc.local_addr().expect("local addr"));
                Box::pin(ingest::run(app, settings, http, grpc))
            }
            Role::Transform => {
                let settings =
                    transform::TransformConfig::from_env(&env).expect("transform settings");
                Box::pin(transform::run(app, settings, http))
            }
            Role::Engine => Box::pin(engine::run(app, http)),
            Role::Analytics => {
                let settings =
                    analytics::AnalyticsConfig::from_env(&env).expect("analytics settings");
                Box::pin(analytics::run(app, settings, http))
            }
        };
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        let name = consumer.clone();
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                tracing::error!(service = %name, error = %format!("{e:#}"), "service failed");
                *slot.lock().expect("failure slot") = Some(format!("{e:#}"));
            }
            result
        });
        self.services.push(Service {
            role,
            index,
            consumer,
            http: http_addr,
            grpc: grpc_addr,
            token,
            task: Some(task),
            failure,
        });
        index
    }

    /// Stops replica `index` of `role` gracefully (cancels its token, waits for it to
    /// finish its batch and release its partitions) and returns what its `run` returned.
    pub async fn stop_replica(&mut self, role: Role, index: usize) -> anyhow::Result<()> {
        let service = self
            .services
            .iter_mut()
            .find(|s| s.role == role && s.index == index)
            .unwrap_or_else(|| panic!("no replica {index} of {role}"));
        let task = service
            .task
            .take()
            .unwrap_or_else(|| panic!("{} was already stopped", service.consumer));
        service.token.cancel();
        match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(anyhow::anyhow!("task panicked: {e}"))),
            Err(_) => Err(anyhow::anyhow!(
                "{} did not stop within {STOP_TIMEOUT:?}",
                service.consumer
            )),
        }
    }

    /// Cancels every service and waits for each; panics naming every one that failed or
    /// did not stop.
    pub async fn shutdown(mut self) {
        for service in &self.services {
            service.token.cancel();
        }
        let mut problems = Vec::new();
        for service in &mut self.services {
            let Some(task) = service.task.take() else {
                continue;
            };
            match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problems.push(format!("{}: {e:#}", service.consumer)),
                Ok(Err(e)) => problems.push(format!("{}: panicked: {e}", service.consumer)),
                Err(_) => problems.push(format!(
                    "{}: did not stop within {STOP_TIMEOUT:?}",
                    service.consumer
                )),
            }
        }
        assert!(
            problems.is_empty(),
            "services failed at shutdown:\n{}",
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

    /// Its dead-letter stream (`<ns>:ingest_stream:dlq`).
    pub fn external_dead_letter_stream(&self) -> String {
        format!("{}:dlq", self.external_stream)
    }

    /// The redis-server's URL.
    pub fn redis_url(&self) -> String {
        self.server.url()
    }

    /// Where the pipeline's Redis runs.
    pub fn backend(&self) -> &Backend {
        &self.server
    }

    /// Where the pipeline's Redis runs; [`Backend::cluster_mut`] to fail a cluster over.
    pub fn backend_mut(&mut self) -> &mut Backend {
        &mut self.server
    }

    /// A connection to the pipeline's Redis.
    pub fn conn(&self) -> Connection {
        self.conn.clone()
    }

    /// The pipeline's Redis as the services see it (pool).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Every replica started, stopped ones included.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Replica `index` of `role`.
    pub fn service(&self, role: Role, index: usize) -> &Service {
        self.services
            .iter()
            .find(|s| s.role == role && s.index == index)
            .unwrap_or_else(|| panic!("no replica {index} of {role}"))
    }

    /// The live replicas of `role`.
    pub fn live(&self, role: Role) -> impl Iterator<Item = &Service> {
        self.services
            .iter()
            .filter(move |s| s.role == role && s.is_live())
    }

    /// `http://<addr><path>` of ingest.
    pub fn ingest_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.service(Role::Ingest, 0).http)
    }

    /// `http://<addr><path>` of the first live analytics replica.
    pub fn analytics_url(&self, path: &str) -> String {
        let service = self
            .live(Role::Analytics)
            .next()
            .expect("a live analytics replica");
        format!("http://{}{path}", service.http)
    }

    // ----- sending ---------------------------------------------------------------------

    /// POSTs `body` as JSON to ingest; returns the status and the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Json) -> (u16, Json) {
        self.post_raw(path, serde_json::to_vec(body).expect("serialize body"))
            .await
    }

    /// POSTs raw bytes (declared as JSON) to ingest.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Json) {
        let response = self
            .http
            .post(self.ingest_url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        read_response(response).await
    }

    /// DELETEs `path` on ingest.
    pub async fn delete(&self, path: &str) -> (u16, Json) {
        let response = self
            .http
            .delete(self.ingest_url(path))
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

    /// A gRPC client of ingest's `IngestService`.
    pub async fn grpc_client(&self) -> IngestServiceClient<tonic::transport::Channel> {
        let addr = self
            .service(Role::Ingest, 0)
            .grpc
            .expect("ingest has a gRPC address");
        ingest_client(addr).await
    }

    /// `XADD <external stream> * field value ...`, as an outside producer would; returns
    /// the entry id.
    pub async fn xadd_external(&self, fields: &[(&str, &str)]) -> String {
        xadd(&mut self.conn(), &self.external_stream, fields).await
    }

    // ----- reading ---------------------------------------------------------------------

    /// Every entry of every partition of the logical stream `stream`, decoded as
    /// envelopes, ordered by stream id (partitions interleaved by time).
    pub async fn stream_entries(&self, stream: &str) -> Vec<StreamEntry> {
        stream_entries(&mut self.conn(), &self.keys, stream).await
    }

    /// Every event of the market stream, decoded, in stream order, an `order.events` entry
    /// read as its events in their order: `(event type, message)`, the type being
    /// `execution`, `trade` or `tick.validated` ([`market_events`]).
    pub async fn market_events(&self) -> Vec<(String, MarketEvent)> {
        market_events(self.stream_entries(topology::MARKET).await)
    }

    /// Every trade, ordered by symbol, then book sequence.
    pub async fn trades(&self) -> Vec<v1::Trade> {
        let mut trades: Vec<v1::Trade> = self
            .market_events()
            .await
            .into_iter()
            .filter_map(|(_, e)| match e {
                MarketEvent::Trade(t) => Some(t),
                _ => None,
            })
            .collect();
        trades.sort_by(|a, b| (&a.symbol, a.sequence).cmp(&(&b.symbol, b.sequence)));
        trades
    }

    /// Every execution report, in stream order (per symbol: the order they were written).
    pub async fn execution_reports(&self) -> Vec<v1::ExecutionReport> {
        self.market_events()
            .await
            .into_iter()
            .filter_map(|(_, e)| match e {
                MarketEvent::Execution(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Every entry of the validated stream (the engine's input), decoded.
    pub async fn validated_entries(&self) -> Vec<(String, ValidatedEvent)> {
        self.stream_entries(topology::VALIDATED)
            .await
            .into_iter()
            .map(|entry| {
                let payload = entry.envelope.payload.as_ref();
                let event = match entry.envelope.event_type.as_str() {
                    event_type::VALIDATED_ORDER => ValidatedEvent::Order(decode(payload, &entry)),
                    event_type::VALIDATED_CANCEL => ValidatedEvent::Cancel(decode(payload, &entry)),
                    event_type::VALIDATED_TICK => ValidatedEvent::Tick(decode(payload, &entry)),
                    other => panic!("unexpected type {other:?} on the validated stream"),
                };
                (entry.envelope.event_type, event)
            })
            .collect()
    }

    /// The entries of a dead-letter (or any) stream by key, fields as text.
    pub async fn dead_letters(&self, key: &str) -> Vec<HashMap<String, String>> {
        self.xrange(key)
            .await
            .into_iter()
            .map(|(_, fields)| {
                fields
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(&k).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Dead letters of every partition of the logical stream `stream`.
    pub async fn partition_dead_letters(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let mut all = Vec::new();
        for partition in self.keys.all_partitions() {
            all.extend(
                self.dead_letters(&self.keys.dead_letter(stream, partition))
                    .await,
            );
        }
        all
    }

    /// `GET /v1/symbols/{symbol}/stats` of analytics.
    pub async fn stats(&self, symbol: &str) -> Json {
        let url = self.analytics_url(&format!("/v1/symbols/{symbol}/stats"));
        let (status, body) = self.get_json(&url).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// `GET /admin/status` of a replica.
    pub async fn admin_status(&self, role: Role, index: usize) -> Json {
        let url = format!("http://{}/admin/status", self.service(role, index).http);
        let (status, body) = self.get_json(&url).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// The Prometheus text of a replica's `GET /metrics` (in one process every pipeline's
    /// services record into the same recorder: a counter sums over all of them).
    pub async fn metrics(&self, role: Role, index: usize) -> String {
        let url = format!("http://{}/metrics", self.service(role, index).http);
        scrape_metrics(&self.http, &url).await
    }

    /// `POST <path>` on a replica's admin router with `Authorization: Bearer <token>`;
    /// returns the status and the JSON answer.
    pub async fn admin_post(
        &self,
        role: Role,
        index: usize,
        path: &str,
        token: &str,
    ) -> (u16, Json) {
        let url = format!("http://{}{path}", self.service(role, index).http);
        let response = self
            .http
            .post(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        read_response(response).await
    }

    /// The partitions a replica's `/admin/status` shows it owning (owned stages).
    pub async fn owned_partitions(&self, role: Role, index: usize) -> Vec<Partition> {
        let consumer = self.service(role, index).consumer.clone();
        let status = self.admin_status(role, index).await;
        let (group, _) = role.owned_input().expect("an owned stage");
        stage_status(&status, group)["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|p| p["owner"].as_str() == Some(consumer.as_str()))
            .map(|p| p["partition"].as_u64().expect("partition number") as Partition)
            .collect()
    }

    /// The consumer holding the lease of `partition` for `group` (from Redis).
    pub async fn lease_owner(&self, group: &str, partition: Partition) -> Option<String> {
        let value: Option<String> = redis::cmd("GET")
            .arg(self.keys.lease(group, partition))
            .query_async(&mut self.conn())
            .await
            .expect("GET lease");
        value.map(|v| v.split('#').next().unwrap_or_default().to_owned())
    }

    // ----- waiting ---------------------------------------------------------------------

    /// Polls `check` until it returns true; panics after `timeout` naming `what`. Also
    /// panics at once if a service stopped on its own.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl AsyncFnMut() -> bool,
    ) {
        self.wait_for(timeout, async || {
            if check().await {
                Ok(())
            } else {
                Err(what.to_owned())
            }
        })
        .await
    }

    /// Polls `check` until it returns `Ok`; panics after `timeout` with the last `Err`
    /// (which should say what was awaited and what was seen).
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
                panic!("timed out after {timeout:?} waiting for: {last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Panics if a live service's task has ended (with its error, if any).
    pub fn assert_running(&self) {
        for service in &self.services {
            if service.task.as_ref().is_some_and(|t| t.is_finished()) {
                let failure = service.failure.lock().expect("failure slot").clone();
                panic!(
                    "{} stopped on its own: {}",
                    service.consumer,
                    failure.unwrap_or_else(|| "returned Ok or panicked".into())
                );
            }
        }
    }

    /// Waits until every live service answers `/readyz` with 200 and, for every owned
    /// stage, every partition's lease is held by the live replica it is assigned to
    /// (live replicas sorted by name take partitions round-robin).
    pub async fn wait_ready(&self) {
        self.wait_for(READY_TIMEOUT, async || {
            for service in self.services.iter().filter(|s| s.is_live()) {
                let url = format!("http://{}/readyz", service.http);
                let ready = match self.http.get(&url).send().await {
                    Ok(r) => r.status().as_u16() == 200,
                    Err(_) => false,
                };
                if !ready {
                    return Err(format!("{} to be ready", service.consumer));
                }
            }
            self.check_assignment().await
        })
        .await
    }

    /// `Ok` when every owned partition of every role is leased to its assigned replica.
    pub async fn check_assignment(&self) -> Result<(), String> {
        for role in Role::ALL {
            let Some((group, _)) = role.owned_input() else {
                continue;
            };
            let mut members: Vec<&str> = self.live(role).map(|s| s.consumer()).collect();
            if members.is_empty() {
                continue;
            }
            members.sort_unstable();
            for partition in self.keys.all_partitions() {
                let expected = members[partition as usize % members.len()];
                let owner = self.lease_owner(group, partition).await;
                if owner.as_deref() != Some(expected) {
                    return Err(format!(
                        "{group} partition {partition} to be owned by {expected} (owner: {owner:?})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until nothing is in flight: for the external stream and every partition of
    /// the inbound, validated and market streams (upstream first), the consuming group has
    /// read every entry and has nothing pending.
    pub async fn wait_settled(&self, timeout: Duration) {
        self.wait_for(timeout, async || self.check_settled().await)
            .await
    }

    /// `Ok` when every stage has consumed and acknowledged all of its input.
    pub async fn check_settled(&self) -> Result<(), String> {
        check_settled(&mut self.conn(), &self.keys, &self.external_stream).await
    }

    /// `(lag, pending)` of `group` on `stream` (`lag` is `None` when the group does not
    /// exist; counted, not Redis's figure).
    pub async fn group_backlog(&self, stream: &str, group: &str) -> (Option<i64>, i64) {
        group_backlog(&mut self.conn(), stream, group).await
    }

    /// Every entry of the stream `key` with its id, fields as raw bytes in their order.
    pub async fn xrange(&self, key: &str) -> Vec<(String, Fields)> {
        xrange(&mut self.conn(), key).await
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // A test that panicked before `shutdown`: stop the services before Redis goes.
        for service in &self.services {
            service.token.cancel();
        }
        if std::thread::panicking() && self.services.iter().any(Service::is_live) {
            // Let them finish their batches (they run on the runtime's worker threads)
            // rather than log a storm of connection errors when the server is killed.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The events of market stream `entries` (of either harness), decoded, in their order, an
/// `order.events` entry read as its events in their order: `(event type, message)`, the
/// type being `execution`, `trade` or `tick.validated`.
pub fn market_events(entries: Vec<StreamEntry>) -> Vec<(String, MarketEvent)> {
    let mut events = Vec::new();
    for entry in entries {
        let payload = entry.envelope.payload.as_ref();
        match entry.envelope.event_type.as_str() {
            event_type::ORDER_EVENTS => {
                let order_events: v1::OrderEvents = decode(payload, &entry);
                for event in order_events.events {
                    events.push(match event.kind {
                        Some(v1::market_event::Kind::Execution(report)) => (
                            event_type::EXECUTION.to_owned(),
                            MarketEvent::Execution(report),
                        ),
                        Some(v1::market_event::Kind::Trade(trade)) => {
                            (event_type::TRADE.to_owned(), MarketEvent::Trade(trade))
                        }
                        None => panic!("an order event without a kind in {entry:?}"),
                    });
                }
            }
            event_type::EXECUTION => events.push((
                event_type::EXECUTION.to_owned(),
                MarketEvent::Execution(decode(payload, &entry)),
            )),
            event_type::VALIDATED_TICK => events.push((
                event_type::VALIDATED_TICK.to_owned(),
                MarketEvent::Tick(decode(payload, &entry)),
            )),
            other => panic!("unexpected type {other:?} on the market stream: {entry:?}"),
        }
    }
    events
}

/// `(ms, seq)` of a stream id, for ordering.
pub fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The status of stage `group` in an `/admin/status` answer.
pub fn stage_status<'a>(status: &'a Json, group: &str) -> &'a Json {
    status["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["group"] == group)
        .unwrap_or_else(|| panic!("no stage {group} in {status}"))
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// Every key matching `pattern` on the one node `conn` talks to (`SCAN`).
async fn scan_node(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(page);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// The Prometheus text at `url` (a service's `GET /metrics`), which must answer 200.
pub(crate) async fn scrape_metrics(http: &reqwest::Client, url: &str) -> String {
    let response = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status().as_u16(), 200, "GET {url}");
    response.text().await.expect("metrics text")
}

async fn read_response(response: reqwest::Response) -> (u16, Json) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("read response body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn decode<M: Message + Default>(payload: &[u8], entry: &StreamEntry) -> M {
    M::decode(payload).unwrap_or_else(|e| panic!("undecodable payload in {entry:?}: {e}"))
}

/// A test connection to one node, `url` ([`streams_core::testing::connect`]).
async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    streams_core::testing::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// A gRPC client of ingest at `addr`.
pub(crate) async fn ingest_client(
    addr: SocketAddr,
) -> IngestServiceClient<tonic::transport::Channel> {
    IngestServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("connect to ingest gRPC at {addr}: {e}"))
}

/// `XADD <stream> * field value ...`; returns the entry id.
pub(crate) async fn xadd(conn: &mut Connection, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(*value);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("XADD to {stream}: {e}"))
}

/// Every entry of every partition of the logical stream `stream`, decoded as envelopes,
/// ordered by stream id (partitions interleaved by time).
pub(crate) async fn stream_entries(
    conn: &mut Connection,
    keys: &KeySpace,
    stream: &str,
) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    for partition in keys.all_partitions() {
        let key = keys.stream(stream, partition);
        for (id, fields) in xrange(conn, &key).await {
            let envelope =
                Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
                    .unwrap_or_else(|e| panic!("{key} entry {id} is not an envelope: {e}"));
            all.push(StreamEntry {
                partition,
                id,
                envelope,
            });
        }
    }
    all.sort_by_key(|e| stream_id(&e.id));
    all
}

/// A stream entry's fields as `XRANGE` returns them.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Every entry of `key`, read in pages (one reply with a long stream would take longer
/// than a response may).
pub(crate) async fn xrange(conn: &mut Connection, key: &str) -> Vec<(String, Fields)> {
    const PAGE: usize = 1_000;
    let mut all = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Fields)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let full = page.len() == PAGE;
        if let Some((last, _)) = page.last() {
            start = format!("({last}");
        }
        all.extend(page);
        if !full {
            return all;
        }
    }
}

/// `Ok` when, for the external stream and every partition of the inbound, validated and
/// market streams, the consuming group has read every entry and has nothing pending.
pub(crate) async fn check_settled(
    conn: &mut Connection,
    keys: &KeySpace,
    external_stream: &str,
) -> Result<(), String> {
    let mut inputs = vec![(external_stream.to_owned(), topology::INGEST_GROUP)];
    for role in Role::ALL {
        if let Some((group, stream)) = role.owned_input() {
            for partition in keys.all_partitions() {
                inputs.push((keys.stream(stream, partition), group));
            }
        }
    }
    for (stream, group) in inputs {
        let (lag, pending) = group_backlog(conn, &stream, group).await;
        if lag != Some(0) || pending != 0 {
            return Err(format!(
                "group {group} to consume all of {stream} (lag {lag:?}, pending {pending})"
            ));
        }
    }
    Ok(())
}

/// `(lag, pending)` of `group` on `stream`: `lag` counts the entries after the group's
/// last delivered one (`None` when the group does not exist).
pub(crate) async fn group_backlog(
    conn: &mut Connection,
    stream: &str,
    group: &str,
) -> (Option<i64>, i64) {
    let groups: redis::RedisResult<Vec<HashMap<String, Value>>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    let Ok(groups) = groups else {
        return (None, 0);
    };
    for info in groups {
        let name = match info.get("name") {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        if name != group {
            continue;
        }
        let int = |key: &str| match info.get(key) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        let pending = int("pending").unwrap_or(0);
        // Counted, not Redis's `lag`: Redis derives that from counters that can be wrong
        // after it reloads its data (seen: a lag of 764 on a stream holding 1 entry) or
        // missing once entries were trimmed.
        let last = match info.get("last-delivered-id") {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return (None, pending),
        };
        let after: redis::RedisResult<Vec<Value>> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(100_000)
            .query_async(conn)
            .await;
        return (after.ok().map(|a| a.len() as i64), pending);
    }
    (None, 0)
}
