//! The errors streams-core returns, so that callers can tell a Redis outage from a lost lease.

/// An error from the stage runtime.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// A handler produced an effect the commit cannot apply whole (a command outside the
    /// allowed ones, arguments of the wrong shape, an entry with too many fields). A bug
    /// in the handler: the commit is refused before anything is written.
    #[error("invalid effect: {0}")]
    InvalidEffect(String),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No pooled connection could be had in time (Redis unreachable or pool exhausted).
    #[error("redis pool: {0}")]
    Pool(String),
    /// This consumer no longer holds the lease on the partition: it may not ack or forward.
    #[error("lease lost on partition {partition}")]
    Fenced {
        /// The partition whose lease was lost.
        partition: u32,
    },
    /// Redis answered something this build does not understand.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// A configuration value is invalid (e.g. the seeds handed to `Redis::new_cluster`).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A call this deployment cannot serve as asked (e.g. a blocking read on a Redis Cluster
    /// without the key that says which node to read from).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A write was applied on its master, but fewer replicas than `TICKFLOW_WAIT_REPLICAS`
    /// acknowledged it within `TICKFLOW_WAIT_TIMEOUT_MS` (Redis `WAIT`): a failover now
    /// could lose it. The writer counts it as not done; repeating it is safe (a commit
    /// acknowledges nothing twice, an append under its idempotency key appends once).
    #[error("not confirmed by {wanted} replicas ({confirmed} acknowledged in time)")]
    NotConfirmed {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged within the timeout.
        confirmed: u32,
    },
}

impl StreamsError {
    /// Whether retrying later may succeed (connection trouble, timeouts, a restarting or
    /// loading server), as opposed to a logic error. On a Redis Cluster that includes a
    /// cluster without a master for some slot (`CLUSTERDOWN`, until a replica is promoted) and
    /// a redirection (`MOVED`, `ASK`) that reached the caller: a dedicated connection does not
    /// follow one, and the shared cluster connection passes one on only after its own retries
    /// ran out; either way the caller re-resolves the node (`Redis::dedicated_for`) and retries.
    /// A write not confirmed by enough replicas ([`StreamsError::NotConfirmed`]) is transient
    /// too: the replica may be back, or promoted, by the next try.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamsError::Pool(_) | StreamsError::NotConfirmed { .. } => true,
            StreamsError::Redis(e) => {
                is_connection_lost(e)
                    || matches!(
                        e.code(),
                        Some(
                            "LOADING"
                                | "BUSY"
                                | "TRYAGAIN"
                                | "MASTERDOWN"
                                | "READONLY"
                                | "CLUSTERDOWN"
                                | "MOVED"
                                | "ASK"
                        )
                    )
            }
            StreamsError::Fenced { .. }
            | StreamsError::InvalidEffect(_)
            | StreamsError::Protocol(_)
            | StreamsError::Config(_)
            | StreamsError::Unsupported(_) => false,
        }
    }

    /// Whether Redis said it does not have the script called by its SHA.
    pub(crate) fn is_no_script(&self) -> bool {
        matches!(self, StreamsError::Redis(e) if e.code() == Some("NOSCRIPT"))
    }

    /// Whether Redis said the consumer group (or its stream) does not exist.
    pub fn is_no_group(&self) -> bool {
        // A pipelined read (the blocking read and its top-up) fails as a whole, with each
        // command's error in its text rather than its code.
        matches!(self, StreamsError::Redis(e)
            if e.code() == Some("NOGROUP") || e.to_string().contains("\"NOGROUP\""))
    }
}

/// Whether `error` says the connection it came from is gone or unusable (I/O error,
/// dropped, refused, or no reply in time), as opposed to an error reply from a live
/// server. The pool discards such connections; the stage loop retries after them.
pub(crate) fn is_connection_lost(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
}

impl From<redis::ParsingError> for StreamsError {
    fn from(error: redis::ParsingError) -> Self {
        StreamsError::Protocol(error.to_string())
    }
}

impl From<deadpool::managed::PoolError<redis::RedisError>> for StreamsError {
    fn from(error: deadpool::managed::PoolError<redis::RedisError>) -> Self {
        match error {
            deadpool::managed::PoolError::Backend(e) => StreamsError::Redis(e),
            other => StreamsError::Pool(other.to_string()),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = StreamsError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &str) -> StreamsError {
        let value = redis::parse_redis_value(reply.as_bytes()).unwrap();
        StreamsError::Redis(value.extract_error().unwrap_err())
    }

    #[test]
    fn cluster_redirections_and_a_cluster_without_a_master_are_transient() {
        for reply in [
            "-MOVED 3999 127.0.0.1:7001\r\n",
            "-ASK 3999 127.0.0.1:7001\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        ] {
            assert!(server_error(reply).is_transient(), "{reply}");
        }
        assert!(
            !server_error("-CROSSSLOT Keys in request don't hash to the same slot\r\n")
                .is_transient()
        );
        assert!(!StreamsError::Unsupported("x".into()).is_transient());
    }
}
