//! Typed configuration, read once from the environment.
//!
//! [`Env`] is the one way to read a variable: it parses, applies the default and names the
//! variable in the error. Tests inject variables with [`Env::from_pairs`] instead of touching
//! the process environment. [`Config`] holds what every stage shares; services read their own
//! extra variables through the same [`Env`].

use std::{collections::HashMap, fmt, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use crate::keys::KeySpace;

/// A bad configuration value. Its message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: String,
    /// The value it had.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Looks a variable up by name.
type Lookup = dyn Fn(&str) -> Option<String> + Send + Sync;

/// A source of configuration variables: the process environment or an injected map.
#[derive(Clone)]
pub struct Env {
    lookup: Arc<Lookup>,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Env")
    }
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self {
            lookup: Arc::new(|name| std::env::var(name).ok()),
        }
    }

    /// A fixed set of variables (for tests and embedding); nothing else is visible.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let map: HashMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self {
            lookup: Arc::new(move |name| map.get(name).cloned()),
        }
    }

    /// The raw value of `name`; empty values count as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// `name` parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|e: T::Err| ConfigError {
                variable: name.to_owned(),
                value,
                reason: e.to_string(),
            }),
        }
    }

    /// A duration given in milliseconds, within `min..=max`.
    pub fn millis_or(
        &self,
        name: &str,
        default_ms: u64,
        min_ms: u64,
        max_ms: u64,
    ) -> Result<Duration, ConfigError> {
        let ms = self.ranged_or(name, default_ms, min_ms, max_ms)?;
        Ok(Duration::from_millis(ms))
    }

    /// An integer within `min..=max`.
    pub fn ranged_or(
        &self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let value: u64 = self.parse_or(name, default)?;
        if !(min..=max).contains(&value) {
            return Err(ConfigError {
                variable: name.to_owned(),
                value: value.to_string(),
                reason: format!("must be between {min} and {max}"),
            });
        }
        Ok(value)
    }

    /// A socket address such as `0.0.0.0:8080`.
    pub fn addr_or(&self, name: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let value = self.get(name).unwrap_or_else(|| default.to_owned());
        value
            .parse()
            .map_err(|e: std::net::AddrParseError| ConfigError {
                variable: name.to_owned(),
                value,
                reason: format!("{e} (expected host:port, e.g. 0.0.0.0:8080)"),
            })
    }
}

/// A value that must not reach a log line: its `Debug` prints `***`, and it has no
/// `Display`, so only an explicit [`Secret::expose_secret`] call can read it. A derived
/// `Debug` on a struct holding one is then safe to log. It has no `PartialEq` either:
/// comparing a secret with what a client sent must be done in constant time.
#[derive(Clone)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself; the one way to read it, so that every use is easy to find.
    pub fn expose_secret(&self) -> &T {
        &self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How tickflow talks to Redis: `TICKFLOW_REDIS_MODE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis server (`standalone`, the default): `REDIS_URL` is its URL.
    #[default]
    Standalone,
    /// A Redis Cluster (`cluster`): `REDIS_URL` is a comma-separated list of seed nodes, from
    /// which the client learns the rest of the cluster (one reachable seed is enough).
    Cluster,
}

impl FromStr for RedisMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "standalone" => Ok(Self::Standalone),
            "cluster" => Ok(Self::Cluster),
            _ => Err("must be standalone or cluster".into()),
        }
    }
}

/// What every tickflow process shares. Each field names its variable; README lists them all.
#[derive(Clone, Debug)]
pub struct Config {
    /// `REDIS_URL`: `redis://[user:pass@]host:port[/db]` or `rediss://` for TLS; in cluster
    /// mode a comma-separated list of such URLs, the cluster's seed nodes (see
    /// [`cluster_seeds`]). It may hold a password, so it is kept as a [`Secret`]; [`redact`]
    /// gives a form to log.
    pub redis_url: Secret<String>,
    /// `TICKFLOW_REDIS_MODE`: `standalone` (default) or `cluster`.
    pub redis_mode: RedisMode,
    /// `TICKFLOW_WAIT_REPLICAS`: how many replicas must acknowledge a write (Redis `WAIT`)
    /// before tickflow counts it as done: each commit (retried until confirmed) and each
    /// append (refused with [`crate::append::AppendError::NotConfirmed`] until confirmed);
    /// 0 (default) does not wait. [`crate::Redis::from_config`] carries it to both.
    pub wait_replicas: u32,
    /// `TICKFLOW_WAIT_TIMEOUT_MS`: how long one `WAIT` may block for those acknowledgements,
    /// at most [`crate::connection::MAX_WAIT_TIMEOUT`] (a blocked `WAIT` holds its
    /// connection, and must answer within the pool's response timeout).
    pub wait_timeout: Duration,
    /// `TICKFLOW_NAMESPACE` and `TICKFLOW_PARTITIONS`: key prefix and partition count.
    pub keys: KeySpace,
    /// `CONSUMER_NAME`: this process's consumer name in every group (default hostname-pid).
    pub consumer_name: String,
    /// `HTTP_ADDR`: where the health/admin (and service) HTTP server listens.
    pub http_addr: SocketAddr,
    /// `ADMIN_TOKEN`: bearer token for mutating admin actions; unset disables them. Leading
    /// and trailing whitespace is removed (a token read from a file often ends in a newline).
    pub admin_token: Option<Secret<String>>,
    /// `TICKFLOW_POOL_SIZE`: connections in the shared (non-blocking) pool.
    pub pool_size: usize,
    /// Stage loop tuning.
    pub stage: StageTuning,
    /// What a client can hold of the HTTP server (every service's).
    pub http: HttpServerLimits,
}

/// The bounds of every service's HTTP server, so that no client holds a connection, a
/// slot or a task forever (see [`crate::http_server`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpServerLimits {
    /// `TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS`: a request's headers must have arrived this
    /// long after the server began waiting for them (the connection opened, or the
    /// previous response on it was sent); else the connection is closed.
    pub header_read_timeout: Duration,
    /// `TICKFLOW_HTTP_REQUEST_TIMEOUT_MS`: reading a request's body and answering it must
    /// take no longer, else the answer is 408; also how long a closing connection gets to
    /// finish before it is dropped.
    pub request_timeout: Duration,
    /// `TICKFLOW_HTTP_IDLE_TIMEOUT_MS`: a connection with no request in progress for this
    /// long is closed (whatever its protocol, before it even named one).
    pub idle_timeout: Duration,
    /// `TICKFLOW_HTTP_MAX_CONNECTIONS`: connections served at once; more wait to be
    /// accepted until one closes.
    pub max_connections: usize,
}

impl Default for HttpServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_millis(10_000),
            request_timeout: Duration::from_millis(30_000),
            idle_timeout: Duration::from_millis(10_000),
            max_connections: 1024,
        }
    }
}

impl HttpServerLimits {
    /// Reads the `TICKFLOW_HTTP_*` variables.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let ms = |duration: Duration| duration.as_millis() as u64;
        Ok(Self {
            header_read_timeout: env.millis_or(
                "TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS",
                ms(defaults.header_read_timeout),
                10,
                3_600_000,
            )?,
            request_timeout: env.millis_or(
                "TICKFLOW_HTTP_REQUEST_TIMEOUT_MS",
                ms(defaults.request_timeout),
                10,
                3_600_000,
            )?,
            idle_timeout: env.millis_or(
                "TICKFLOW_HTTP_IDLE_TIMEOUT_MS",
                ms(defaults.idle_timeout),
                10,
                3_600_000,
            )?,
            max_connections: env.ranged_or(
                "TICKFLOW_HTTP_MAX_CONNECTIONS",
                defaults.max_connections as u64,
                1,
                1_000_000,
            )? as usize,
        })
    }
}

/// How a stage loop reads, recovers, dead-letters and trims.
#[derive(Clone, Debug)]
pub struct StageTuning {
    /// `TICKFLOW_BATCH_SIZE`: the most entries read from one partition per call (its
    /// XREADGROUP COUNT); see [`StageTuning::read_count`].
    pub batch_size: usize,
    /// `TICKFLOW_READ_BUDGET`: the most entries one read takes from all the partitions it
    /// reads together (each still gets at least [`MIN_READ_SHARE`], and at most the batch
    /// size): what bounds a stage's memory when a backlog meets many partitions.
    pub read_budget: usize,
    /// `TICKFLOW_BLOCK_MS`: how long a read waits for new entries.
    pub block: Duration,
    /// `TICKFLOW_CLAIM_IDLE_MS`: an entry pending this long is reclaimed from its consumer.
    pub claim_idle: Duration,
    /// `TICKFLOW_MAX_DELIVERIES`: an entry delivered more often than this is dead-lettered.
    pub max_deliveries: u32,
    /// `TICKFLOW_TRIM_INTERVAL_MS`: how often input streams are trimmed (0: never).
    pub trim_interval: Duration,
    /// `TICKFLOW_MAX_LEN`: hard cap on a partition's length (0: none). Can delete entries
    /// that a group has not acknowledged; that is logged and counted.
    pub max_len: u64,
    /// `TICKFLOW_DEDUPE_WINDOW_MS` (default 3600000): on Redis Cluster, how long the ids
    /// of entries whose effects went to another slot than their stream are remembered
    /// there, so that a retry does not apply them twice (see `stage/commit.rs`).
    pub dedupe_window: Duration,
    /// `TICKFLOW_DLQ_MAX_LEN`: cap on each dead-letter stream's length, applied by the same
    /// periodic trim as the inputs (every `TICKFLOW_TRIM_INTERVAL_MS`); the oldest dead
    /// letters beyond it are dropped, logged and counted.
    pub dead_letter_max_len: u64,
    /// `TICKFLOW_LEASE_TTL_MS`: lifetime of a partition lease (owned mode) and of a
    /// consumer's membership; renewed every third of it.
    pub lease_ttl: Duration,
    /// `TICKFLOW_CONSUMER_IDLE_DELETE_MS`: a consumer idle this long with nothing pending
    /// is deleted from its group.
    pub consumer_idle_delete: Duration,
    /// `TICKFLOW_SHUTDOWN_GRACE_MS`: how long shutdown waits for the batch in hand.
    pub shutdown_grace: Duration,
}

/// The fewest entries a read takes from each partition it reads, whatever
/// `TICKFLOW_READ_BUDGET` and the number of partitions: below this a commit's fixed cost per
/// partition weighs on every entry (measured: 32 per partition cost Redis ~1 µs more per
/// event than 64, BENCHMARKS.md).
pub const MIN_READ_SHARE: usize = 64;

impl StageTuning {
    /// The XREADGROUP COUNT of a read over `partitions` streams: the read budget shared
    /// among them, at least [`MIN_READ_SHARE`] (or the batch size, if smaller) and at most
    /// the batch size. With the defaults: 256 for up to 4 partitions, 64 for 16.
    pub fn read_count(&self, partitions: usize) -> usize {
        let share = self.read_budget.div_ceil(partitions.max(1));
        share.max(MIN_READ_SHARE).min(self.batch_size).max(1)
    }
}

impl Default for StageTuning {
    fn default() -> Self {
        Self {
            batch_size: 256,
            read_budget: 1024,
            block: Duration::from_millis(2000),
            claim_idle: Duration::from_millis(30_000),
            max_deliveries: 5,
            trim_interval: Duration::from_millis(10_000),
            max_len: 0,
            dedupe_window: Duration::from_secs(3600),
            dead_letter_max_len: 100_000,
            lease_ttl: Duration::from_millis(5_000),
            consumer_idle_delete: Duration::from_millis(3_600_000),
            shutdown_grace: Duration::from_millis(10_000),
        }
    }
}

impl Config {
    /// Reads the shared configuration; `default_http_addr` is the service's own default.
    pub fn from_env(env: &Env, default_http_addr: &str) -> Result<Self, ConfigError> {
        let redis_mode: RedisMode = env.parse_or("TICKFLOW_REDIS_MODE", RedisMode::Standalone)?;
        let redis_url = env
            .get("REDIS_URL")
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        match redis_mode {
            RedisMode::Standalone => validate_redis_url(&redis_url)?,
            RedisMode::Cluster => {
                cluster_seeds(&redis_url)?;
            }
        }
        let namespace = env
            .get("TICKFLOW_NAMESPACE")
            .unwrap_or_else(|| "tickflow".into());
        if namespace.contains(['{', '}', ' ']) {
            return Err(ConfigError {
                variable: "TICKFLOW_NAMESPACE".into(),
                value: namespace,
                reason: "must not contain braces or spaces".into(),
            });
        }
        let partitions = env.ranged_or("TICKFLOW_PARTITIONS", 16, 1, 1024)? as u32;
        let consumer_name = env
            .get("CONSUMER_NAME")
            .unwrap_or_else(default_consumer_name);
        let defaults = StageTuning::default();
        let stage = StageTuning {
            batch_size: env.ranged_or(
                "TICKFLOW_BATCH_SIZE",
                defaults.batch_size as u64,
                1,
                10_000,
            )? as usize,
            read_budget: env.ranged_or(
                "TICKFLOW_READ_BUDGET",
                defaults.read_budget as u64,
                1,
                1_000_000,
            )? as usize,
            block: env.millis_or("TICKFLOW_BLOCK_MS", 2000, 1, 60_000)?,
            claim_idle: env.millis_or("TICKFLOW_CLAIM_IDLE_MS", 30_000, 10, 86_400_000)?,
            max_deliveries: env.ranged_or("TICKFLOW_MAX_DELIVERIES", 5, 1, 1000)? as u32,
            trim_interval: env.millis_or("TICKFLOW_TRIM_INTERVAL_MS", 10_000, 0, 86_400_000)?,
            max_len: env.parse_or("TICKFLOW_MAX_LEN", 0)?,
            dedupe_window: env.millis_or(
                "TICKFLOW_DEDUPE_WINDOW_MS",
                3_600_000,
                1_000,
                7 * 86_400_000,
            )?,
            dead_letter_max_len: env.ranged_or(
                "TICKFLOW_DLQ_MAX_LEN",
                defaults.dead_letter_max_len,
                1,
                1_000_000_000,
            )?,
            lease_ttl: env.millis_or("TICKFLOW_LEASE_TTL_MS", 5_000, 100, 600_000)?,
            consumer_idle_delete: env.millis_or(
                "TICKFLOW_CONSUMER_IDLE_DELETE_MS",
                3_600_000,
                1_000,
                u64::MAX / 2,
            )?,
            shutdown_grace: env.millis_or("TICKFLOW_SHUTDOWN_GRACE_MS", 10_000, 0, 600_000)?,
        };
        Ok(Self {
            redis_url: Secret::new(redis_url),
            redis_mode,
            wait_replicas: env.ranged_or("TICKFLOW_WAIT_REPLICAS", 0, 0, MAX_WAIT_REPLICAS)? as u32,
            wait_timeout: env.millis_or(
                "TICKFLOW_WAIT_TIMEOUT_MS",
                1_000,
                1,
                crate::connection::MAX_WAIT_TIMEOUT.as_millis() as u64,
            )?,
            keys: KeySpace::new(namespace, partitions),
            consumer_name,
            http_addr: env.addr_or("HTTP_ADDR", default_http_addr)?,
            admin_token: env
                .get("ADMIN_TOKEN")
                .map(|token| Secret::new(token.trim().to_owned())),
            pool_size: env.ranged_or("TICKFLOW_POOL_SIZE", 16, 1, 1024)? as usize,
            stage,
            http: HttpServerLimits::from_env(env)?,
        })
    }

    /// The configuration for a test: the given Redis, namespace and partition count, with
    /// short timings so that recovery and rebalancing happen within a test's patience.
    pub fn for_tests(redis_url: &str, namespace: &str, partitions: u32) -> Self {
        Self {
            redis_url: Secret::new(redis_url.to_owned()),
            redis_mode: RedisMode::Standalone,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            keys: KeySpace::new(namespace, partitions),
            consumer_name: default_consumer_name(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: None,
            pool_size: 8,
            stage: StageTuning {
                batch_size: 64,
                read_budget: 1024,
                block: Duration::from_millis(100),
                claim_idle: Duration::from_millis(500),
                max_deliveries: 3,
                trim_interval: Duration::ZERO,
                max_len: 0,
                dedupe_window: Duration::from_secs(3600),
                dead_letter_max_len: 100_000,
                lease_ttl: Duration::from_millis(600),
                consumer_idle_delete: Duration::from_secs(3600),
                shutdown_grace: Duration::from_secs(5),
            },
            http: HttpServerLimits::default(),
        }
    }
}

/// The most replicas `TICKFLOW_WAIT_REPLICAS` may ask for (a shard with more is unusual, and
/// a larger number is more likely a typo than a deployment).
pub const MAX_WAIT_REPLICAS: u64 = 16;

/// The most seed nodes `REDIS_URL` may list in cluster mode.
pub const MAX_CLUSTER_SEEDS: usize = 64;

/// The seed nodes of a cluster-mode `REDIS_URL`: a comma-separated list of `redis://` or
/// `rediss://` URLs (spaces around commas are ignored), at most [`MAX_CLUSTER_SEEDS`]. All
/// seeds must use the same scheme, user and password (the client uses one set of
/// credentials for every node), and no database other than 0 (Redis Cluster has only
/// database 0). One reachable seed is enough; the client learns the other nodes from it.
/// Errors name `REDIS_URL` and show the seeds with their passwords hidden.
pub fn cluster_seeds(urls: &str) -> Result<Vec<String>, ConfigError> {
    let error = |reason: String| ConfigError {
        variable: "REDIS_URL".into(),
        value: redact_seeds(urls),
        reason,
    };
    let seeds: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(str::to_owned)
        .collect();
    if seeds.is_empty() {
        return Err(error(
            "lists no seed node (expected redis://host:port[,redis://host:port…])".into(),
        ));
    }
    if seeds.len() > MAX_CLUSTER_SEEDS {
        return Err(error(format!(
            "lists {} seed nodes, at most {MAX_CLUSTER_SEEDS} are read",
            seeds.len()
        )));
    }
    for seed in &seeds {
        validate_redis_url(seed).map_err(|e| error(format!("seed {}: {}", e.value, e.reason)))?;
        let info = redis::IntoConnectionInfo::into_connection_info(seed.as_str())
            .map_err(|e| error(format!("seed {}: {e}", redact(seed))))?;
        if info.redis_settings().db() != 0 {
            return Err(error(format!(
                "seed {}: Redis Cluster has only database 0",
                redact(seed)
            )));
        }
    }
    // The cluster client checks that the seeds agree on scheme and credentials.
    redis::cluster::ClusterClient::new(seeds.iter().map(String::as_str))
        .map_err(|e| error(e.to_string()))?;
    Ok(seeds)
}

/// A list of Redis URLs (cluster seeds) with every password hidden.
pub fn redact_seeds(urls: &str) -> String {
    urls.split(',')
        .map(|seed| redact(seed.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn validate_redis_url(url: &str) -> Result<(), ConfigError> {
    let error = |reason: String| ConfigError {
        variable: "REDIS_URL".into(),
        value: redact(url),
        reason,
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(error("must start with redis:// or rediss://".into()));
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| error(e.to_string()))
}

/// A Redis URL with its password hidden, for logs and error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => format!("{}***{}", &url[..scheme_end + 3], &url[at..]),
            }
        }
        _ => url.to_owned(),
    }
}

fn default_consumer_name() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_unset() {
        let config = Config::from_env(&Env::from_pairs::<&str, &str>([]), "0.0.0.0:8080").unwrap();
        assert_eq!(config.redis_url.expose_secret(), "redis://127.0.0.1:6379");
        assert_eq!(config.stage.dead_letter_max_len, 100_000);
        assert_eq!(config.keys, KeySpace::new("tickflow", 16));
        assert_eq!(config.http_addr.port(), 8080);
        assert!(config.admin_token.is_none());
        assert!(
            config
                .consumer_name
                .ends_with(&format!("-{}", std::process::id()))
        );
    }

    #[test]
    fn accepts_acl_credentials_databases_and_tls() {
        for url in [
            "redis://user:secret@redis.internal:6380/2",
            "rediss://default:pw@cache.example:6379",
            "redis://:onlypass@localhost",
        ] {
            let env = Env::from_pairs([("REDIS_URL", url)]);
            let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
            assert_eq!(config.redis_url.expose_secret(), url);
        }
    }

    #[test]
    fn a_read_shares_its_budget_among_its_partitions_within_bounds() {
        let tuning = |batch_size, read_budget| StageTuning {
            batch_size,
            read_budget,
            ..StageTuning::default()
        };
        let defaults = StageTuning::default();
        assert_eq!(defaults.read_count(1), 256);
        assert_eq!(defaults.read_count(4), 256);
        assert_eq!(defaults.read_count(8), 128);
        assert_eq!(defaults.read_count(16), 64);
        // Never below the floor, however many partitions...
        assert_eq!(defaults.read_count(1024), MIN_READ_SHARE);
        // ...unless the batch size is smaller; never above the batch size.
        assert_eq!(tuning(10, 1024).read_count(16), 10);
        assert_eq!(tuning(10_000, 1_000_000).read_count(3), 10_000);
        assert_eq!(tuning(1, 1).read_count(0), 1);
        let env = Env::from_pairs([("TICKFLOW_READ_BUDGET", "4096")]);
        let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
        assert_eq!(config.stage.read_budget, 4096);
        assert_eq!(config.stage.read_count(16), 256);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("TICKFLOW_PARTITIONS", "zero"),
            ("TICKFLOW_PARTITIONS", "0"),
            ("TICKFLOW_BATCH_SIZE", "-1"),
            ("TICKFLOW_READ_BUDGET", "0"),
            ("HTTP_ADDR", "localhost"),
            ("REDIS_URL", "http://x"),
            ("TICKFLOW_NAMESPACE", "a{b}"),
            ("TICKFLOW_DLQ_MAX_LEN", "0"),
            ("TICKFLOW_DLQ_MAX_LEN", "many"),
            ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "0"),
            ("TICKFLOW_HTTP_MAX_CONNECTIONS", "0"),
        ];
        for (variable, value) in cases {
            let err = Config::from_env(&Env::from_pairs([(variable, value)]), "0.0.0.0:1")
                .expect_err(variable);
            assert_eq!(err.variable, variable);
            assert!(
                err.to_string().starts_with(&format!("invalid {variable}=")),
                "{err}"
            );
        }
    }

    #[test]
    fn http_server_limits_have_bounded_defaults_and_can_be_set() {
        let config = Config::from_env(&Env::from_pairs::<&str, &str>([]), "0.0.0.0:1").unwrap();
        assert_eq!(config.http, HttpServerLimits::default());
        assert!(config.http.header_read_timeout <= Duration::from_secs(10));
        let env = Env::from_pairs([
            ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "250"),
            ("TICKFLOW_HTTP_REQUEST_TIMEOUT_MS", "1000"),
            ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS", "2000"),
            ("TICKFLOW_HTTP_MAX_CONNECTIONS", "8"),
        ]);
        let limits = Config::from_env(&env, "0.0.0.0:1").unwrap().http;
        assert_eq!(
            limits,
            HttpServerLimits {
                header_read_timeout: Duration::from_millis(250),
                request_timeout: Duration::from_millis(1000),
                idle_timeout: Duration::from_millis(2000),
                max_connections: 8,
            }
        );
    }

    #[test]
    fn the_redis_mode_is_standalone_unless_cluster_is_asked_for() {
        let config = Config::from_env(&Env::from_pairs::<&str, &str>([]), "0.0.0.0:1").unwrap();
        assert_eq!(config.redis_mode, RedisMode::Standalone);
        assert_eq!(config.wait_replicas, 0);
        assert_eq!(config.wait_timeout, Duration::from_millis(1_000));
        for (value, mode) in [
            ("standalone", RedisMode::Standalone),
            ("cluster", RedisMode::Cluster),
            ("CLUSTER", RedisMode::Cluster),
        ] {
            let env = Env::from_pairs([("TICKFLOW_REDIS_MODE", value)]);
            assert_eq!(
                Config::from_env(&env, "0.0.0.0:1").unwrap().redis_mode,
                mode
            );
        }
        let err = Config::from_env(
            &Env::from_pairs([("TICKFLOW_REDIS_MODE", "sentinel")]),
            "0.0.0.0:1",
        )
        .unwrap_err();
        assert_eq!(err.variable, "TICKFLOW_REDIS_MODE");
        assert!(err.to_string().contains("standalone or cluster"), "{err}");
    }

    #[test]
    fn in_cluster_mode_the_redis_url_is_a_list_of_seeds() {
        for (urls, expected) in [
            ("redis://10.0.0.1:7000", vec!["redis://10.0.0.1:7000"]),
            (
                "redis://10.0.0.1:7000, redis://10.0.0.2:7000,",
                vec!["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"],
            ),
            (
                "rediss://app:pw@a.example:6379,rediss://app:pw@b.example:6379",
                vec![
                    "rediss://app:pw@a.example:6379",
                    "rediss://app:pw@b.example:6379",
                ],
            ),
        ] {
            let env = Env::from_pairs([("TICKFLOW_REDIS_MODE", "cluster"), ("REDIS_URL", urls)]);
            let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
            assert_eq!(config.redis_url.expose_secret(), urls);
            assert_eq!(cluster_seeds(urls).unwrap(), expected, "{urls}");
        }
    }

    #[test]
    fn bad_cluster_seeds_are_refused_naming_the_variable_without_the_password() {
        let too_many = vec!["redis://h:1"; MAX_CLUSTER_SEEDS + 1].join(",");
        for (urls, reason) in [
            (" , ", "no seed"),
            (
                "redis://app:hunter2@a:7000,http://app:hunter2@b:7000",
                "redis:// or rediss://",
            ),
            ("redis://app:hunter2@a:7000/3", "only database 0"),
            ("redis://app:hunter2@a:notaport", "seed"),
            (
                "redis://app:hunter2@a:7000,redis://app:other@b:7000",
                "password",
            ),
            (
                "redis://app:hunter2@a:7000,rediss://app:hunter2@b:7000",
                "TLS",
            ),
            (too_many.as_str(), "at most"),
        ] {
            let env = Env::from_pairs([("TICKFLOW_REDIS_MODE", "cluster"), ("REDIS_URL", urls)]);
            let err = Config::from_env(&env, "0.0.0.0:1").expect_err(urls);
            assert_eq!(err.variable, "REDIS_URL");
            for printed in [err.to_string(), format!("{err:?}")] {
                assert!(printed.contains(reason), "{urls}: {printed}");
                assert!(!printed.contains("hunter2"), "{printed}");
            }
        }
        // A list is not a standalone URL.
        let env = Env::from_pairs([("REDIS_URL", "redis://a:7000,redis://b:7000")]);
        assert_eq!(
            Config::from_env(&env, "0.0.0.0:1").unwrap_err().variable,
            "REDIS_URL"
        );
    }

    #[test]
    fn wait_settings_are_read_and_bounded() {
        let env = Env::from_pairs([
            ("TICKFLOW_WAIT_REPLICAS", "1"),
            ("TICKFLOW_WAIT_TIMEOUT_MS", "250"),
        ]);
        let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
        assert_eq!(config.wait_replicas, 1);
        assert_eq!(config.wait_timeout, Duration::from_millis(250));
        let past_limit = (MAX_WAIT_REPLICAS + 1).to_string();
        for (variable, value) in [
            ("TICKFLOW_WAIT_REPLICAS", past_limit.as_str()),
            ("TICKFLOW_WAIT_REPLICAS", "-1"),
            // WAIT with timeout 0 blocks forever.
            ("TICKFLOW_WAIT_TIMEOUT_MS", "0"),
            ("TICKFLOW_WAIT_TIMEOUT_MS", "3001"),
        ] {
            let err = Config::from_env(&Env::from_pairs([(variable, value)]), "0.0.0.0:1")
                .expect_err(value);
            assert_eq!(err.variable, variable);
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("rediss://p@h"), "rediss://***@h");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn the_dead_letter_cap_is_read_from_its_variable() {
        let env = Env::from_pairs([("TICKFLOW_DLQ_MAX_LEN", "250")]);
        let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
        assert_eq!(config.stage.dead_letter_max_len, 250);
    }

    #[test]
    fn the_admin_token_is_trimmed() {
        let env = Env::from_pairs([("ADMIN_TOKEN", "  s3cret-token\n")]);
        let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
        assert_eq!(
            config.admin_token.as_ref().map(Secret::expose_secret),
            Some(&"s3cret-token".to_owned())
        );
        let blank = Env::from_pairs([("ADMIN_TOKEN", " \t\n")]);
        assert!(
            Config::from_env(&blank, "0.0.0.0:1")
                .unwrap()
                .admin_token
                .is_none(),
            "a blank token disables admin actions"
        );
    }

    #[test]
    fn a_secret_prints_stars_in_debug() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret:#?}"), "***");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(***)");
        assert_eq!(secret.expose_secret(), "hunter2");
    }

    #[test]
    fn debug_of_the_config_prints_neither_the_redis_password_nor_the_admin_token() {
        let env = Env::from_pairs([
            ("REDIS_URL", "redis://app:hunter2@redis.internal:6380/2"),
            ("ADMIN_TOKEN", "tok-8c1f"),
        ]);
        let config = Config::from_env(&env, "0.0.0.0:1").unwrap();
        for printed in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(!printed.contains("tok-8c1f"), "{printed}");
            assert!(printed.contains("redis_url: ***"), "{printed}");
        }
    }

    #[test]
    fn a_bad_redis_url_is_reported_without_its_password() {
        for url in [
            "http://app:hunter2@redis.internal:6380",
            "redis://app:hunter2@redis.internal:notaport",
            "redis://app:hunter2@",
        ] {
            let err = Config::from_env(&Env::from_pairs([("REDIS_URL", url)]), "0.0.0.0:1")
                .expect_err(url);
            assert_eq!(err.variable, "REDIS_URL");
            for printed in [err.to_string(), format!("{err:?}")] {
                assert!(!printed.contains("hunter2"), "{printed}");
            }
        }
    }
}
