//! tickflow analytics: consumes the market stream (trades, ticks, execution reports) on
//! owned partitions, keeps per-symbol statistics, OHLCV bars at 1 s and 1 min and an
//! end-to-end latency histogram in Redis, and answers queries about them.
//!
//! - [`aggregate`]: the handler.
//! - [`store`]: the Redis layout, reading a partition back, and the query API's readers.
//! - [`latency`]: the mergeable latency histogram.
//! - [`api`]: the query API.

pub mod aggregate;
pub mod api;
pub mod latency;
pub mod store;

use streams_core::{App, ConsumeMode, InputFormat, Inputs, StageSpec, config::ConfigError};
use tickflow_proto::topology;

/// Analytics' own settings.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// Bar retention.
    pub retention: aggregate::Retention,
}

impl AnalyticsConfig {
    /// Reads `ANALYTICS_RETENTION_1S_MS` (default 1 h) and `ANALYTICS_RETENTION_1M_MS`
    /// (default 7 days).
    pub fn from_env(env: &streams_core::Env) -> Result<Self, ConfigError> {
        Ok(Self {
            retention: aggregate::Retention {
                second_bars_ms: env.ranged_or(
                    "ANALYTICS_RETENTION_1S_MS",
                    3_600_000,
                    1_000,
                    u64::MAX / 4,
                )?,
                minute_bars_ms: env.ranged_or(
                    "ANALYTICS_RETENTION_1M_MS",
                    7 * 86_400_000,
                    60_000,
                    u64::MAX / 4,
                )?,
            },
        })
    }
}

/// The analytics stage's spec.
pub fn spec() -> StageSpec {
    StageSpec {
        group: topology::ANALYTICS_GROUP.into(),
        inputs: Inputs::Partitioned(topology::MARKET.into()),
        mode: ConsumeMode::Owned,
        format: InputFormat::Envelope,
    }
}

/// Runs analytics until shutdown, serving the query API and the admin router on `http`.
pub async fn run(
    app: App,
    settings: AnalyticsConfig,
    http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let handler = aggregate::Aggregator::new(
        app.config.keys.clone(),
        app.redis.clone(),
        settings.retention,
    );
    let routes = api::router(
        app.redis.clone(),
        aggregate::AnalyticsKeys::new(app.config.keys.clone()),
        settings.retention,
    );
    let stage = app.stage(spec(), handler);
    app.serve(http, routes, async move { Ok(stage.run().await?) })
        .await
}

/// Where the service listens for HTTP unless `HTTP_ADDR` says otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8083";

/// The whole service as its binary runs it: configuration from `env`, then [`run`] until
/// `shutdown`.
pub async fn main_with(
    env: streams_core::Env,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = App::init("analytics", env.clone(), DEFAULT_HTTP_ADDR, shutdown)?;
    let settings = AnalyticsConfig::from_env(&env)?;
    let http = app.bind().await?;
    run(app, settings, http).await
}
