//! Connections to Redis, used the one way that measured well (see ARCHITECTURE.md):
//! every blocking read loop owns a dedicated connection whose response timeout exceeds its
//! BLOCK time; every other command goes through one shared deadpool-redis pool, whose
//! multiplexed connections pipeline concurrent requests.

use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Client, aio::MultiplexedConnection};

use crate::{
    config::{Config, redact},
    error::{Result, StreamsError},
};

/// How long a pooled (non-blocking) command may take before it is treated as failed.
pub const POOL_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on one Redis deployment: a client for dedicated connections and the shared pool.
#[derive(Clone)]
pub struct Redis {
    client: Client,
    pool: Pool,
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
pub type PooledConnection = deadpool_redis::Connection;

impl Redis {
    /// Prepares the client and the pool. Connects lazily: Redis need not be up yet.
    pub fn new(url: &str, pool_size: usize) -> Result<Self> {
        install_tls_provider();
        let client = Client::open(url)?;
        let manager = Manager::new_with_config(
            url,
            AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(POOL_RESPONSE_TIMEOUT)),
        )?;
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
        Self::new(&config.redis_url, config.pool_size)
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

/// rustls needs a process-wide crypto provider before the first `rediss://` connection.
fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
