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

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool::{
    Runtime,
    managed::{self, Metrics, Pool, RecycleError, RecycleResult},
};
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
};

use crate::{
    config::{Config, redact},
    error::{Result, StreamsError},
};

/// How long a pooled (non-blocking) command may take before it is treated as failed.
pub const POOL_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A pooled connection unused this long is PINGed before it is handed out again.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A multiplexed connection that remembers whether a request on it failed in a way that
/// means the connection is gone (I/O error, dropped, timed out). Clones share that mark.
#[derive(Clone)]
pub struct Connection {
    inner: MultiplexedConnection,
    broken: Arc<AtomicBool>,
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
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
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
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
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
            inner,
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

/// A handle on one Redis deployment: a client for dedicated connections and the shared pool.
#[derive(Clone)]
pub struct Redis {
    client: Client,
    pool: Pool<Manager>,
    display_url: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.display_url)
            .finish()
    }
}

/// A connection taken from the pool; returned to it when dropped.
pub type PooledConnection = managed::Object<Manager>;

impl Redis {
    /// Prepares the client and the pool. Connects lazily: Redis need not be up yet.
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
            client,
            pool,
            display_url: redact(url),
        })
    }

    /// The handle for a configuration.
    pub fn from_config(config: &Config) -> Result<Self> {
        Self::new(config.redis_url.expose_secret(), config.pool_size)
    }

    /// The URL with its password hidden.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// A connection from the shared pool, for any command that does not block.
    pub async fn pooled(&self) -> Result<PooledConnection> {
        Ok(self.pool.get().await?)
    }

    /// A new connection for one blocking read loop, which must not share it: its response
    /// timeout is `block` plus a margin, so a blocked read is never abandoned half-way.
    pub async fn dedicated(&self, block: Duration) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(block + Duration::from_secs(3)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// `PING` through the pool, bounded by `timeout`.
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

/// rustls needs a process-wide crypto provider before the first `rediss://` connection.
fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

// Placeholder until the cluster connection layer lands: standalone only.
impl Redis {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        false
    }

    /// A dedicated connection to the node serving `key`.
    pub async fn dedicated_for(
        &self,
        _key: &str,
        block: Duration,
    ) -> Result<MultiplexedConnection> {
        self.dedicated(block).await
    }
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
        // A live server without that user: AUTH fails.
        let server = RedisServer::start();
        let url = format!("redis://app:hunter2@127.0.0.1:{}", server.port());
        let wrong_user = Redis::new(&url, 1).unwrap();
        let rejected = wrong_user.ping(Duration::from_secs(5)).await.unwrap_err();
        let mut printed = vec![
            format!("{redis:?}"),
            format!("{:?}", redis.pool),
            format!("{:?}", redis.pool.manager()),
            redis.display_url().to_owned(),
        ];
        for error in [refused, rejected] {
            printed.push(error.to_string());
            printed.push(format!("{error:?}"));
        }
        for text in printed {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert_eq!(redis.display_url(), "redis://app:***@127.0.0.1:1/0");
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
}
