//! tickflow transform: reads the inbound stream (owned partitions, so each symbol's events
//! stay in order), validates and normalizes each event against reference data, and writes
//! validated events for the engine, or rejection reports for the market stream.
//!
//! - [`refdata`]: instruments in Redis, loaded from a file, refreshed without restarts.
//! - [`normalize`]: the handler.

pub mod normalize;
pub mod refdata;

use std::time::Duration;

use streams_core::{App, ConsumeMode, InputFormat, Inputs, StageSpec, config::ConfigError};
use tickflow_proto::topology;

/// Transform's own settings.
#[derive(Debug, Clone)]
pub struct TransformConfig {
    /// `REFDATA_FILE`: a reference data file loaded into Redis at start (optional).
    pub refdata_file: Option<String>,
    /// `REFDATA_REFRESH_MS`: how often the reference data version is checked (default 1000).
    pub refresh: Duration,
    /// `TRANSFORM_TICK_TOLERANCE`: fraction of a tick a price may be off and still be
    /// rounded (default 0.1); beyond it the order is rejected.
    pub tick_tolerance: f64,
}

impl TransformConfig {
    /// Reads the variables.
    pub fn from_env(env: &streams_core::Env) -> Result<Self, ConfigError> {
        let tick_tolerance: f64 = env.parse_or("TRANSFORM_TICK_TOLERANCE", 0.1)?;
        if !(0.0..=0.5).contains(&tick_tolerance) {
            return Err(ConfigError {
                variable: "TRANSFORM_TICK_TOLERANCE".into(),
                value: tick_tolerance.to_string(),
                reason: "must be between 0 and 0.5".into(),
            });
        }
        Ok(Self {
            refdata_file: env.get("REFDATA_FILE"),
            refresh: env.millis_or("REFDATA_REFRESH_MS", 1000, 10, 3_600_000)?,
            tick_tolerance,
        })
    }
}

/// The transform stage's spec.
pub fn spec() -> StageSpec {
    StageSpec {
        group: topology::TRANSFORM_GROUP.into(),
        inputs: Inputs::Partitioned(topology::INBOUND.into()),
        mode: ConsumeMode::Owned,
        format: InputFormat::Envelope,
    }
}

/// Runs transform until shutdown, serving HTTP on `http`.
pub async fn run(
    app: App,
    settings: TransformConfig,
    http: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    if let Some(path) = &settings.refdata_file {
        let count = refdata::load_file(&app.redis, &app.config.keys, path).await?;
        tracing::info!(path, count, "reference data file loaded into Redis");
    }
    let refdata = refdata::RefData::default();
    if let Err(e) = refdata.refresh(&app.redis, &app.config.keys).await {
        tracing::warn!(error = %e, "reference data not loaded yet; will retry");
    }
    let refresher = refdata.spawn_refresh(
        app.redis.clone(),
        app.config.keys.clone(),
        settings.refresh,
        app.shutdown.clone(),
    );
    let handler =
        normalize::Transform::new(app.config.keys.clone(), refdata, settings.tick_tolerance);
    let stage = app.stage(spec(), handler);
    app.serve(http, axum::Router::new(), async move {
        let result = stage.run().await;
        refresher.abort();
        Ok(result?)
    })
    .await
}

/// Where the service listens for HTTP unless `HTTP_ADDR` says otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8081";

/// The whole service as its binary runs it: configuration from `env`, then [`run`] until
/// `shutdown`.
pub async fn main_with(
    env: streams_core::Env,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = App::init("transform", env.clone(), DEFAULT_HTTP_ADDR, shutdown)?;
    let settings = TransformConfig::from_env(&env)?;
    let http = app.bind().await?;
    run(app, settings, http).await
}

/// `transform load-refdata FILE`: loads reference data into Redis and returns.
pub async fn load_refdata_command(env: streams_core::Env, path: &str) -> anyhow::Result<usize> {
    let app = App::init(
        "transform",
        env,
        DEFAULT_HTTP_ADDR,
        tokio_util::sync::CancellationToken::new(),
    )?;
    Ok(refdata::load_file(&app.redis, &app.config.keys, path).await?)
}
