//! Connections to Redis, used the one way that measured well (see ARCHITECTURE.md):
//! every blocking read loop owns a dedicated connection whose response timeout exceeds its
//! BLOCK time; every other command goes through one shared pool, whose multiplexed
//! connections pipeline concurrent requests.
//!
//! The pool checks a connection only when there is reason to: one that failed (I/O error,
//! dropped, timed out) is discarded when it comes back, and one idle for [`IDLE_CHECK`] is
//! PINGed before reuse. A connection in steady use is handed out without a round trip:
//! a PING per checkout (deadpool-redis's check) cost one extra round trip per commit and
//! append; dropping it cut Redis's CPU at 200 events/s by 5-20 % (see BENCHMARKS.md).
//!
//! # Redis Cluster
//!
//! [`Redis`] runs on a single server ([`RedisMode::Standalone`]) or on a Redis Cluster
//! ([`RedisMode::Cluster`], `REDIS_URL` a list of seed nodes) with the same call sites:
//! [`Redis::pooled`] gives a [`Connection`] in both modes. On a cluster there is no pool:
//! every checkout is a clone of one shared `redis::cluster_async::ClusterConnection`, which
//! keeps one multiplexed connection per node (so it pipelines per node, as the pool does),
//! sends each command to the master of its key's slot, follows `MOVED` and `ASK`, refreshes
//! its slot map after a `MOVED` and reconnects to a node that dropped. Its response and
//! connect timeouts are the pool's ([`POOL_RESPONSE_TIMEOUT`], [`CONNECT_TIMEOUT`]); the
//! response timeout also bounds a request with all its retries. What redis-rs 1.8's
//! cluster client does with what tickflow sends (read in its source, `cluster_handling/`,
//! and checked by the tests below where marked):
//!
//! - **Scripts.** `EVALSHA` and `EVAL` go to the master of the slot of their first key (a
//!   script with no key goes to a random node). Each node has its own script cache, so the
//!   first call of a script on a node, and every call after that node restarted or after
//!   its replica was promoted (Redis 7 replicates a script's effects, not the script), gets
//!   `NOSCRIPT`; redis-rs passes `NOSCRIPT` on without retrying, and `LuaScript` then sends
//!   `EVAL` to the same slot (tested). Every key of one call must share a slot
//!   (`CROSSSLOT` otherwise, from the server).
//! - **Pipelines** go whole to one node: the master of the slot of the first command that
//!   has a key. A pipeline whose keys map to two slots is refused by the client before
//!   anything is sent (`CROSSSLOT`), even if both slots live on the same node (tested); so a
//!   batch over several partitions is one pipeline per slot. Keyless commands (`WAIT`,
//!   `PING`) ride along with the keyed ones. If any reply in a pipeline is a redirection
//!   or `TRYAGAIN`/`CLUSTERDOWN`, or the connection fails, redis-rs sends the *whole*
//!   pipeline again: the commands before it run twice, so a pipeline must be safe to
//!   repeat (tickflow's scripts are: a commit's effects depend on its `XACK`, an
//!   idempotent append on its key).
//! - **Retries.** A single command is also sent again after a connection error, up to 16
//!   times within the response timeout, so a write whose reply was lost can be applied
//!   twice; the standalone pool never retries by itself. `CLUSTERDOWN` (a master died, its
//!   replica not yet promoted) and `TRYAGAIN` are retried after 1.3 s or more, `MOVED` at
//!   once. What outlasts the response timeout reaches the caller, and
//!   [`StreamsError::is_transient`] says to retry it.
//! - **MULTI/EXEC** is a pipeline (`redis::pipe().atomic()`): it works when every key is in
//!   one slot (tested), and a redirection inside it aborts it whole (`EXECABORT`) before it
//!   is sent again to the right node. tickflow's writes are scripts instead; prefer them.
//! - **Blocking commands** (`XREADGROUP … BLOCK`, `WAIT` when replicas lag) hold every
//!   other command to that node behind them on the shared connection, as on a multiplexed
//!   one: a blocking read never goes there. [`Redis::dedicated_for`] opens a connection of
//!   its own to the master of a key's slot. It does not follow redirections: after a
//!   `MOVED`, `ASK` or connection error, drop it and call `dedicated_for` again, which asks
//!   the cluster (`CLUSTER KEYSLOT`, `CLUSTER SLOTS`) where the slot lives now. A multi-key
//!   `XREADGROUP` on it must name streams of that one slot.
//!
//! # Waiting for replicas
//!
//! [`Connection::wait_replicas`] sends `WAIT n timeout`. Redis counts, for the connection
//! that sends `WAIT`, the replicas that acknowledged that connection's own latest write;
//! a `WAIT` on another connection says nothing about it. (More exactly, measured on Redis
//! 7.0.15: after every command but `WAIT` itself, Redis notes the master's replication
//! offset for the connection, so a `WAIT` behind a script that wrote nothing, such as a
//! commit's retry whose first try went through, still waits for every write the master
//! made before it, the first try's and the lease's included. A `WAIT` that is a fresh
//! socket's first command waits for nothing.) So it is a method of the
//! connection the writes went through, not of [`Redis`]: in standalone mode it goes on
//! that very multiplexed connection (which never reconnects: one that failed stays
//! failed, so a `WAIT` cannot land on a fresh socket that wrote nothing); in cluster mode
//! it is routed to the master of `key`'s slot through the shared cluster connection, whose
//! one connection to that node carried the writes to that key (redis-rs would otherwise
//! send a bare `WAIT` to every master and report the smallest count). If the cluster
//! connection reconnected to that node between the write and the `WAIT` (the write's
//! reply arrived, then the socket dropped), the `WAIT` would count for a socket that wrote
//! nothing and return at once; sending the writes and the `WAIT` in one pipeline closes
//! that gap, since a pipeline goes whole over one socket (and is repeated whole). The same
//! holds for writes on a dedicated connection: the `WAIT` goes in the same pipeline, ahead
//! of any blocking read. While fewer than `n` replicas have acknowledged, `WAIT` blocks
//! its connection (everything behind it to that node waits) up to its timeout, which is
//! why `TICKFLOW_WAIT_TIMEOUT_MS` is bounded well below [`POOL_RESPONSE_TIMEOUT`].
//!
//! tickflow's own writes do the pipelined form: a commit (`stage/commit.rs`) and an append
//! (`append.rs`) send their script and `WAIT` together when [`Redis::replica_wait`] asks
//! for replicas (`TICKFLOW_WAIT_REPLICAS`, carried by the handle from [`Redis::from_config`]),
//! on whatever connection carries the write: the pool's, the cluster connection (routed by
//! the script's key) or a read loop's own, where the `WAIT` goes ahead of the blocking read
//! queued behind the commit. With zero replicas nothing changes on the wire.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool::{
    Runtime,
    managed::{self, Metrics, Pool, RecycleError, RecycleResult},
};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};

use crate::{
    config::{Config, RedisMode, cluster_seeds, redact, redact_seeds},
    error::{Result, StreamsError},
};

/// How long a pooled (non-blocking) command may take before it is treated as failed.
pub const POOL_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A pooled connection unused this long is PINGed before it is handed out again.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);
/// The longest `WAIT` [`Connection::wait_replicas`] sends: a blocked `WAIT` must answer
/// well within [`POOL_RESPONSE_TIMEOUT`], or the client would give up on its connection.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(3);

/// How many replicas must acknowledge a commit or an append before tickflow counts it as
/// done (`TICKFLOW_WAIT_REPLICAS`), and how long one `WAIT` may block for them
/// (`TICKFLOW_WAIT_TIMEOUT_MS`). The default, zero replicas, sends no `WAIT` at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaWait {
    /// Replicas that must acknowledge the write; 0: none, no `WAIT` is sent.
    pub replicas: u32,
    /// How long one `WAIT` may block, 1 ms to [`MAX_WAIT_TIMEOUT`].
    pub timeout: Duration,
}

impl ReplicaWait {
    /// Whether a write must be followed by a `WAIT`.
    pub fn is_on(&self) -> bool {
        self.replicas > 0
    }
}

/// A connection for commands that do not block: one of the pool's multiplexed connections
/// (standalone) or a clone of the shared cluster connection (cluster). It remembers whether
/// a request on it failed in a way that means the connection is gone (I/O error, dropped,
/// timed out). Clones share that mark.
#[derive(Clone)]
pub struct Connection {
    link: Link,
    broken: Arc<AtomicBool>,
}

/// What a [`Connection`] sends its requests over.
#[derive(Clone)]
enum Link {
    /// One server's multiplexed connection.
    Server(MultiplexedConnection),
    /// The cluster connection, which routes each request to its node.
    Cluster(ClusterConnection),
}

impl Connection {
    fn note<T>(&self, result: &Result<T, RedisError>) {
        if let Err(e) = result
            && crate::error::is_connection_lost(e)
        {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a request on this connection (or a clone) failed as if it were gone.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// `WAIT replicas timeout` after writes to `key` made through this connection: how many
    /// replicas acknowledged them (fewer than `replicas` when `timeout` ran out first). In
    /// cluster mode it goes to the master of `key`'s slot; in standalone mode `key` only
    /// documents the call. See the module docs for why `WAIT` must follow the writes on the
    /// same connection, and when to pipeline it with them instead.
    ///
    /// `timeout` must be between 1 ms and [`MAX_WAIT_TIMEOUT`] (a `WAIT` with timeout 0
    /// blocks for good); anything else is refused as [`StreamsError::Unsupported`].
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32> {
        let timeout_ms = timeout.as_millis();
        if timeout_ms == 0 || timeout > MAX_WAIT_TIMEOUT {
            return Err(StreamsError::Unsupported(format!(
                "a WAIT timeout of {timeout:?} (must be 1 ms to {MAX_WAIT_TIMEOUT:?})"
            )));
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms as u64);
        let reply = match &mut self.link {
            Link::Server(_) => wait.query_async::<Value>(self).await?,
            Link::Cluster(cluster) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let result = cluster.route_command(wait, routing).await;
                self.note(&result);
                result?
            }
        };
        Ok(redis::from_redis_value(reply)?)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.link {
            Link::Server(_) => RedisMode::Standalone,
            Link::Cluster(_) => RedisMode::Cluster,
        };
        f.debug_struct("Connection")
            .field("mode", &mode)
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = match &mut self.link {
                Link::Server(conn) => conn.req_packed_command(cmd).await,
                Link::Cluster(conn) => conn.req_packed_command(cmd).await,
            };
            self.note(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = match &mut self.link {
                Link::Server(conn) => conn.req_packed_commands(cmd, offset, count).await,
                Link::Cluster(conn) => conn.req_packed_commands(cmd, offset, count).await,
            };
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Server(conn) => conn.get_db(),
            Link::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Creates pooled connections and decides whether one may be reused (see the module docs).
#[derive(Debug)]
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    pings: AtomicUsize,
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = RedisError;

    async fn create(&self) -> Result<Connection, RedisError> {
        let inner = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(Connection {
            link: Link::Server(inner),
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn recycle(&self, conn: &mut Connection, metrics: &Metrics) -> RecycleResult<RedisError> {
        if conn.is_broken() {
            return Err(RecycleError::message("a request on it failed"));
        }
        if metrics.last_used() < IDLE_CHECK {
            return Ok(());
        }
        let ping = self.pings.fetch_add(1, Ordering::Relaxed).to_string();
        let pong: String = redis::cmd("PING").arg(&ping).query_async(conn).await?;
        if pong == ping {
            Ok(())
        } else {
            Err(RecycleError::message("unexpected PING reply"))
        }
    }
}

/// A handle on one Redis deployment, a server or a cluster: the shared connections for
/// commands that do not block, and a way to open dedicated ones for those that do.
#[derive(Clone)]
pub struct Redis {
    backend: Backend,
    display_url: String,
    replica_wait: ReplicaWait,
}

// The standalone variant stays inline, as the client and pool were before cluster mode:
// boxing it would add a pointer chase to every checkout of the common case, for the sake of
// an enum that is cloned a handful of times per process.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Backend {
    Standalone { client: Client, pool: Pool<Manager> },
    Cluster(Arc<Cluster>),
}

/// A cluster's client and its one shared connection, opened on first use.
struct Cluster {
    client: ClusterClient,
    /// The first seed: the scheme, credentials and TLS settings of a dedicated connection.
    seed: ConnectionInfo,
    shared: OnceLock<ClusterConnection>,
}

impl Cluster {
    /// The shared connection. It connects in the background (the first requests wait for
    /// it), and if no seed answers yet it goes back to the seeds on every later request.
    fn connection(&self) -> ClusterConnection {
        self.shared
            .get_or_init(|| {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(POOL_RESPONSE_TIMEOUT);
                self.client.get_pending_async_connection_with_config(config)
            })
            .clone()
    }

    /// `host:port` of the master that serves `key`'s slot now, as the cluster says.
    async fn master_for(&self, key: &str) -> Result<(String, u16)> {
        // Redis computes the slot (hash tags included) exactly as it routes: redis-rs 1.8's
        // `Slot` has no public accessor for its number. Both questions go in one pipeline
        // to the node that redis-rs believes serves the slot (or, if that one is down, to
        // another node of its shard, where a promoted replica answers).
        let mut pipe = redis::pipe();
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
        pipe.cmd("CLUSTER").arg("SLOTS");
        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
        let replies = self.connection().route_pipeline(pipe, 0, 2, route).await?;
        let [slot, ranges] = <[Value; 2]>::try_from(replies)
            .map_err(|r| StreamsError::Protocol(format!("{} replies to 2 commands", r.len())))?;
        let slot: i64 = redis::from_redis_value(slot)?;
        master_of_slot(slot, ranges)
    }
}

/// The master of `slot` in a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …],
/// replica…], …]`.
fn master_of_slot(slot: i64, ranges: Value) -> Result<(String, u16)> {
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(ranges)?;
    for range in ranges {
        let mut fields = range.into_iter();
        let (Some(start), Some(end), Some(master)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(StreamsError::Protocol(
                "a CLUSTER SLOTS range without a master".into(),
            ));
        };
        let (start, end): (i64, i64) = (
            redis::from_redis_value(start)?,
            redis::from_redis_value(end)?,
        );
        if !(start..=end).contains(&slot) {
            continue;
        }
        let master: Vec<Value> = redis::from_redis_value(master)?;
        let mut master = master.into_iter();
        let (Some(host), Some(port)) = (master.next(), master.next()) else {
            return Err(StreamsError::Protocol(
                "a CLUSTER SLOTS master without an address".into(),
            ));
        };
        let host: String = redis::from_redis_value(host)?;
        let port: u16 = redis::from_redis_value(port)?;
        // An empty host or `?` means the node does not know its endpoint (announced as
        // unknown); a client cannot connect there.
        if host.is_empty() || host == "?" {
            return Err(StreamsError::Protocol(format!(
                "the master of slot {slot} has no known endpoint"
            )));
        }
        return Ok((host, port));
    }
    Err(StreamsError::Protocol(format!(
        "no master serves slot {slot}"
    )))
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("mode", &self.mode())
            .field("url", &self.display_url)
            .field("replica_wait", &self.replica_wait)
            .finish()
    }
}

/// What [`Redis::pooled`] hands out: a [`Connection`] (`&mut *conn` is what commands take).
/// A pool's connection goes back to the pool when this is dropped.
#[derive(Debug)]
pub struct PooledConnection(Checkout);

#[derive(Debug)]
enum Checkout {
    Pool(managed::Object<Manager>),
    Shared(Connection),
}

impl std::ops::Deref for PooledConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match &self.0 {
            Checkout::Pool(object) => object,
            Checkout::Shared(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        match &mut self.0 {
            Checkout::Pool(object) => object,
            Checkout::Shared(conn) => conn,
        }
    }
}

impl Redis {
    /// Prepares the client and the pool for one server. Connects lazily: Redis need not be
    /// up yet.
    pub fn new(url: &str, pool_size: usize) -> Result<Self> {
        install_tls_provider();
        let client = client(url)?;
        let manager = Manager {
            client: client.clone(),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(POOL_RESPONSE_TIMEOUT)),
            pings: AtomicUsize::new(0),
        };
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StreamsError::Pool(e.to_string()))?;
        Ok(Self {
            backend: Backend::Standalone { client, pool },
            display_url: redact(url),
            replica_wait: ReplicaWait::default(),
        })
    }

    /// Prepares the client for a Redis Cluster whose seed nodes `seeds` lists (a
    /// cluster-mode `REDIS_URL`: see [`crate::config::cluster_seeds`]). Connects lazily, on
    /// the first [`Self::pooled`]: the cluster need not be up yet.
    pub fn new_cluster(seeds: &str) -> Result<Self> {
        install_tls_provider();
        let display_url = redact_seeds(seeds);
        let seeds = cluster_seeds(seeds)?;
        let seed = seeds[0].as_str().into_connection_info()?;
        let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(POOL_RESPONSE_TIMEOUT)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
            .build()?;
        Ok(Self {
            backend: Backend::Cluster(Arc::new(Cluster {
                client,
                seed,
                shared: OnceLock::new(),
            })),
            display_url,
            replica_wait: ReplicaWait::default(),
        })
    }

    /// The handle for a configuration (`TICKFLOW_REDIS_MODE` picks the kind), with its
    /// [`ReplicaWait`] (`TICKFLOW_WAIT_REPLICAS`, `TICKFLOW_WAIT_TIMEOUT_MS`).
    pub fn from_config(config: &Config) -> Result<Self> {
        let url = config.redis_url.expose_secret();
        let redis = match config.redis_mode {
            RedisMode::Standalone => Self::new(url, config.pool_size)?,
            RedisMode::Cluster => Self::new_cluster(url)?,
        };
        Ok(redis.with_replica_wait(ReplicaWait {
            replicas: config.wait_replicas,
            timeout: config.wait_timeout,
        }))
    }

    /// This handle, with commits and appends through it waiting for `wait`.
    pub fn with_replica_wait(mut self, wait: ReplicaWait) -> Self {
        self.replica_wait = wait;
        self
    }

    /// How many replicas a commit or an append through this handle waits for. It travels
    /// with the handle so that every writer (each stage's commit, ingest's appends) applies
    /// the same setting without being handed it separately.
    pub fn replica_wait(&self) -> ReplicaWait {
        self.replica_wait
    }

    /// The URL (in cluster mode the seeds) with passwords hidden.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// Standalone or cluster.
    pub fn mode(&self) -> RedisMode {
        match self.backend {
            Backend::Standalone { .. } => RedisMode::Standalone,
            Backend::Cluster(_) => RedisMode::Cluster,
        }
    }

    /// A connection for any command that does not block: from the shared pool, or on a
    /// cluster a clone of the shared cluster connection.
    pub async fn pooled(&self) -> Result<PooledConnection> {
        match &self.backend {
            Backend::Standalone { pool, .. } => {
                Ok(PooledConnection(Checkout::Pool(pool.get().await?)))
            }
            Backend::Cluster(cluster) => Ok(PooledConnection(Checkout::Shared(Connection {
                link: Link::Cluster(cluster.connection()),
                broken: Arc::new(AtomicBool::new(false)),
            }))),
        }
    }

    /// A new connection for one blocking read loop on a single server, which must not share
    /// it: its response timeout is `block` plus a margin, so a blocked read is never
    /// abandoned half-way. On a cluster a blocking read needs the node of its keys' slot:
    /// this returns [`StreamsError::Unsupported`] there; use [`Self::dedicated_for`].
    pub async fn dedicated(&self, block: Duration) -> Result<MultiplexedConnection> {
        match &self.backend {
            Backend::Standalone { client, .. } => Ok(client
                .get_multiplexed_async_connection_with_config(&dedicated_config(block))
                .await?),
            Backend::Cluster(_) => Err(StreamsError::Unsupported(
                "a dedicated connection on a Redis Cluster without a key: use dedicated_for".into(),
            )),
        }
    }

    /// A new connection for one blocking read loop over keys in `key`'s slot (a partition's
    /// streams share one), to the master that serves that slot now; standalone, the same as
    /// [`Self::dedicated`]. The connection does not follow redirections: after a `MOVED`,
    /// `ASK` or connection error on it, drop it and call this again, which asks the cluster
    /// where the slot lives now (a failover, a resharding).
    pub async fn dedicated_for(&self, key: &str, block: Duration) -> Result<MultiplexedConnection> {
        let cluster = match &self.backend {
            Backend::Standalone { .. } => return self.dedicated(block).await,
            Backend::Cluster(cluster) => cluster,
        };
        let (host, port) = cluster.master_for(key).await?;
        let info = node_info(&cluster.seed, host, port)
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        Ok(Client::open(info)?
            .get_multiplexed_async_connection_with_config(&dedicated_config(block))
            .await?)
    }

    /// `PING` through the pool (on a cluster: every master), bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        let attempt = async {
            let mut conn = self.pooled().await?;
            let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
            Ok::<_, StreamsError>(())
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(StreamsError::Pool(format!("no PONG within {timeout:?}"))),
        }
    }
}

/// The settings of a blocking read's connection: its response timeout outlasts `block`.
fn dedicated_config(block: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(block + Duration::from_secs(3)))
}

/// A client for `url` whose connections send each request at once (`TCP_NODELAY`). redis-rs
/// leaves Nagle's algorithm on, which holds a small write back while an earlier one on the
/// connection is unacknowledged: a commit queued ahead of a read, or concurrent requests on
/// one multiplexed connection, then waited for a round trip.
pub fn client(url: &str) -> redis::RedisResult<Client> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Client::open(info)
}

/// Sends `cmds` at once and returns each one's reply or error, in order. A pipeline may not
/// cross slots on a Redis Cluster, so the commands go as single requests, concurrently: a
/// multiplexed connection (a server's, or the cluster connection's per node) still writes
/// them together, so they cost one round trip per node, as a pipeline would.
pub async fn query_each<C>(conn: &C, cmds: Vec<redis::Cmd>) -> Vec<redis::RedisResult<redis::Value>>
where
    C: ConnectionLike + Clone + Send,
{
    futures::future::join_all(cmds.into_iter().map(|cmd| {
        let mut conn = conn.clone();
        async move { cmd.query_async::<redis::Value>(&mut conn).await }
    }))
    .await
}

/// rustls needs a process-wide crypto provider before the first `rediss://` connection.
fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `seed` pointed at the node `host:port`: its scheme, TLS settings and credentials kept
/// (a connection to one node of a cluster, as the seed list names them).
pub fn node_info(seed: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    seed.clone().set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    async fn client_list_len(redis: &Redis) -> usize {
        let mut conn = redis.pooled().await.unwrap();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut *conn)
            .await
            .unwrap();
        list.lines().count()
    }

    async fn pings(redis: &Redis) -> u64 {
        let mut conn = redis.pooled().await.unwrap();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut *conn)
            .await
            .unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    #[tokio::test]
    async fn neither_debug_nor_errors_print_the_redis_password() {
        // Nothing listens on port 1: connecting fails.
        let redis = Redis::new("redis://app:hunter2@127.0.0.1:1/0", 1).unwrap();
        let refused = redis.ping(Duration::from_secs(5)).await.unwrap_err();
        let cluster =
            Redis::new_cluster("redis://app:hunter2@127.0.0.1:1, redis://app:hunter2@127.0.0.1:2")
                .unwrap();
        let cluster_conn = cluster.pooled().await.unwrap();
        let unreachable_cluster = cluster.ping(Duration::from_millis(500)).await.unwrap_err();
        let bad_seeds =
            Redis::new_cluster("redis://app:hunter2@127.0.0.1:1,redis://app:other@127.0.0.1:2")
                .unwrap_err();
        // A live server without that user: AUTH fails.
        let server = RedisServer::start();
        let url = format!("redis://app:hunter2@127.0.0.1:{}", server.port());
        let wrong_user = Redis::new(&url, 1).unwrap();
        let rejected = wrong_user.ping(Duration::from_secs(5)).await.unwrap_err();
        let Backend::Standalone { pool, .. } = &redis.backend else {
            panic!("Redis::new is standalone");
        };
        let mut printed = vec![
            format!("{redis:?}"),
            format!("{pool:?}"),
            format!("{:?}", pool.manager()),
            redis.display_url().to_owned(),
            format!("{cluster:?}"),
            format!("{cluster_conn:?}"),
        ];
        for error in [refused, rejected, unreachable_cluster, bad_seeds] {
            printed.push(error.to_string());
            printed.push(format!("{error:?}"));
        }
        for text in printed {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert_eq!(redis.display_url(), "redis://app:***@127.0.0.1:1/0");
        assert_eq!(
            cluster.display_url(),
            "redis://app:***@127.0.0.1:1,redis://app:***@127.0.0.1:2"
        );
    }

    #[test]
    fn clients_send_each_request_at_once() {
        for url in ["redis://127.0.0.1:6379", "redis://:pw@db.example:7000/2"] {
            let client = client(url).unwrap();
            assert!(
                client.get_connection_info().tcp_settings().nodelay(),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_in_steady_use_is_handed_out_without_a_ping() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 4).unwrap();
        let before = pings(&redis).await;
        for _ in 0..50 {
            let mut conn = redis.pooled().await.unwrap();
            let _: i64 = redis::cmd("INCR")
                .arg("n")
                .query_async(&mut *conn)
                .await
                .unwrap();
        }
        assert_eq!(pings(&redis).await, before, "checkouts sent PINGs");
        assert_eq!(
            client_list_len(&redis).await,
            1,
            "one connection serves it all"
        );
    }

    #[tokio::test]
    async fn a_connection_that_failed_is_replaced_after_redis_restarts() {
        let mut server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        let mut conn = redis.pooled().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        server.restart();
        // The old connection's socket is gone: the first request on it fails and marks it.
        let mut conn = redis.pooled().await.unwrap();
        let first: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut *conn).await;
        assert!(first.is_err(), "a request on a dead socket succeeded");
        assert!(conn.is_broken());
        drop(conn);
        // It is discarded on return: the next checkout is a new, working connection.
        let mut conn = redis.pooled().await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut *conn).await.unwrap();
        assert_eq!(pong, "PONG");
        assert!(!conn.is_broken());
    }

    #[tokio::test]
    async fn wait_counts_acknowledging_replicas_and_a_lone_server_has_none() {
        let server = RedisServer::start();
        let redis = Redis::new(&server.url(), 2).unwrap();
        assert!(!redis.is_cluster());
        let mut conn = redis.pooled().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut *conn)
            .await
            .unwrap();
        assert_eq!(
            conn.wait_replicas("k", 0, Duration::from_millis(100))
                .await
                .unwrap(),
            0
        );
        // Asking for a replica that is not there: the timeout runs out, nothing confirmed.
        assert_eq!(
            conn.wait_replicas("k", 1, Duration::from_millis(20))
                .await
                .unwrap(),
            0
        );
        for refused in [Duration::ZERO, MAX_WAIT_TIMEOUT + Duration::from_millis(1)] {
            let error = conn.wait_replicas("k", 1, refused).await.unwrap_err();
            assert!(matches!(error, StreamsError::Unsupported(_)), "{error}");
        }
        assert!(!conn.is_broken());
    }

    mod cluster {
        use std::collections::BTreeMap;

        use super::*;
        use crate::scripts::LuaScript;
        use crate::testing::{CLUSTER_MASTERS, RedisCluster, connect};

        const INCRBY: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

        /// A key per master, each in another slot.
        fn key_per_master(cluster: &RedisCluster) -> Vec<String> {
            let mut by_master = BTreeMap::new();
            for n in 0.. {
                let key = format!("key-{n}");
                by_master.entry(cluster.node_for_key(&key)).or_insert(key);
                if by_master.len() == CLUSTER_MASTERS {
                    break;
                }
            }
            by_master.into_values().collect()
        }

        /// A test connection straight to the node on `port`.
        async fn node(port: u16) -> MultiplexedConnection {
            connect(&format!("redis://127.0.0.1:{port}")).await.unwrap()
        }

        async fn info(conn: &mut MultiplexedConnection, section: &str) -> String {
            redis::cmd("INFO")
                .arg(section)
                .query_async(conn)
                .await
                .unwrap()
        }

        /// The port of the server at the other end of `conn`.
        async fn port_of(conn: &mut MultiplexedConnection) -> u16 {
            let reply: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("port")
                .query_async(conn)
                .await
                .unwrap();
            reply[1].parse().unwrap()
        }

        #[tokio::test]
        async fn pooled_commands_and_scripts_reach_every_master_and_a_blocking_read_has_its_own_connection()
         {
            let cluster = RedisCluster::start();
            let redis = Redis::new_cluster(&cluster.seeds()).unwrap();
            assert!(redis.is_cluster());
            let keys = key_per_master(&cluster);
            let mut conn = redis.pooled().await.unwrap();

            // Plain commands land on the master of their key's slot.
            for key in &keys {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(key)
                    .query_async(&mut *conn)
                    .await
                    .unwrap();
            }
            for key in &keys {
                let mut on_master = node(cluster.node_for_key(key)).await;
                let stored: String = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut on_master)
                    .await
                    .unwrap();
                assert_eq!(&stored, key);
            }

            // A pipeline across slots is refused before it is sent; one slot (a shared hash
            // tag) is fine, MULTI/EXEC included.
            let crossing = redis::pipe()
                .get(&keys[0])
                .get(&keys[1])
                .query_async::<Value>(&mut *conn)
                .await
                .unwrap_err();
            assert_eq!(crossing.code(), Some("CROSSSLOT"), "{crossing}");
            let same_master = (0..)
                .map(|n| format!("neighbour-{n}"))
                .find(|other| cluster.node_for_key(other) == cluster.node_for_key(&keys[0]))
                .unwrap();
            let crossing = redis::pipe()
                .get(&keys[0])
                .get(&same_master)
                .query_async::<Value>(&mut *conn)
                .await
                .unwrap_err();
            assert_eq!(crossing.code(), Some("CROSSSLOT"), "{crossing}");
            let (a, b): (i64, i64) = redis::pipe()
                .atomic()
                .incr("{tag}a", 1)
                .incr("{tag}b", 2)
                .query_async(&mut *conn)
                .await
                .unwrap();
            assert_eq!((a, b), (1, 2));

            // A script runs on each master: the first call there finds no script (NOSCRIPT)
            // and loads it with EVAL; the second goes by SHA.
            let script = LuaScript::new(INCRBY);
            for (n, key) in keys.iter().enumerate() {
                let counter = format!("{{{key}}}:counter");
                for expected in [n as i64 + 1, 2 * (n as i64 + 1)] {
                    let value = script.run(&mut *conn, &[&counter], &[n + 1]).await.unwrap();
                    assert_eq!(value, Value::Int(expected));
                }
                let mut on_master = node(cluster.node_for_key(&counter)).await;
                let errors = info(&mut on_master, "errorstats").await;
                assert!(errors.contains("errorstat_NOSCRIPT:count=1"), "{errors}");
            }

            // A blocking read goes on a connection of its own to the stream's master; the
            // pool's XADD to that same master is not held behind it.
            let stream = "{partition-7}:s:inbound";
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg("g")
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut *conn)
                .await
                .unwrap();
            let error = redis.dedicated(Duration::from_secs(1)).await.unwrap_err();
            assert!(matches!(error, StreamsError::Unsupported(_)), "{error}");
            let mut reader = redis
                .dedicated_for(stream, Duration::from_secs(5))
                .await
                .unwrap();
            let master = cluster.node_for_key(stream);
            assert_eq!(port_of(&mut reader).await, master);
            let read = tokio::spawn(async move {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(10)
                    .arg("BLOCK")
                    .arg(5_000)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">")
                    .query_async::<Value>(&mut reader)
                    .await
            });
            // The XADD goes out once the read is blocked on the master, not before.
            let mut on_master = node(master).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !info(&mut on_master, "clients")
                .await
                .contains("blocked_clients:1")
            {
                assert!(
                    tokio::time::Instant::now() < deadline && !read.is_finished(),
                    "the read did not block on the stream's master"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let id: String = redis::cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("f")
                .arg("v")
                .query_async(&mut *conn)
                .await
                .unwrap();
            let entries = crate::parse_read_reply(read.await.unwrap().unwrap()).unwrap();
            let ids: Vec<&str> = entries
                .iter()
                .flat_map(|(_, read)| read.iter().map(|entry| entry.id.as_str()))
                .collect();
            assert_eq!(ids, [id.as_str()]);

            // The XADD reached the stream's replica.
            assert_eq!(
                conn.wait_replicas(stream, 1, Duration::from_secs(2))
                    .await
                    .unwrap(),
                1
            );
        }

        #[tokio::test]
        async fn after_a_master_dies_its_promoted_replica_serves_the_slot_to_every_kind_of_connection()
         {
            let mut cluster = RedisCluster::start();
            let redis = Redis::new_cluster(&cluster.seeds()).unwrap();
            let key = "{failover}:counter";
            let script = LuaScript::new(INCRBY);
            let mut conn = redis.pooled().await.unwrap();
            assert_eq!(
                script.run(&mut *conn, &[key], &[1]).await.unwrap(),
                Value::Int(1)
            );
            assert_eq!(
                conn.wait_replicas(key, 1, Duration::from_secs(2))
                    .await
                    .unwrap(),
                1
            );

            let old_master = cluster.kill_master_serving(key);
            cluster.wait_until_stable();
            let new_master = cluster.node_for_key(key);
            assert_ne!(new_master, old_master);

            // The pool's commands and scripts reach the promoted replica, which has the
            // acknowledged write but not the script (NOSCRIPT, then EVAL).
            let mut conn = redis.pooled().await.unwrap();
            assert_eq!(
                script.run(&mut *conn, &[key], &[1]).await.unwrap(),
                Value::Int(2)
            );
            let mut on_new_master = node(new_master).await;
            let errors = info(&mut on_new_master, "errorstats").await;
            assert!(errors.contains("errorstat_NOSCRIPT:count=1"), "{errors}");

            // A fresh dedicated connection goes to the promoted replica.
            let mut reader = redis
                .dedicated_for(key, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(port_of(&mut reader).await, new_master);

            // WAIT goes to the master of its key's slot only: the promoted replica has no
            // replica of its own, the other masters have theirs (a WAIT sent to every master
            // would report the smallest count, 0, for both).
            assert_eq!(
                conn.wait_replicas(key, 1, Duration::from_millis(50))
                    .await
                    .unwrap(),
                0
            );
            let elsewhere = (0..)
                .map(|n| format!("elsewhere-{n}"))
                .find(|other| cluster.node_for_key(other) != new_master)
                .unwrap();
            let _: () = redis::cmd("SET")
                .arg(&elsewhere)
                .arg(1)
                .query_async(&mut *conn)
                .await
                .unwrap();
            assert_eq!(
                conn.wait_replicas(&elsewhere, 1, Duration::from_secs(2))
                    .await
                    .unwrap(),
                1
            );

            // The old master, started again, comes back as the new one's replica.
            cluster.restart_node(old_master);
            cluster.wait_until_stable();
            assert_eq!(cluster.node_for_key(key), new_master);
            assert_eq!(
                conn.wait_replicas(key, 1, Duration::from_secs(2))
                    .await
                    .unwrap(),
                1
            );
        }
    }
}
