//! The one bootstrap every service uses: logging, config, Redis, metrics, the shutdown
//! signal, the admin router, and serving HTTP until shutdown.
//!
//! A service's `main.rs` is: `App::init` → build its handlers and stages with
//! [`App::stage`] → [`App::serve`] with its own routes merged into the admin router.

use std::{future::Future, net::SocketAddr};

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    Config, Env, Handler, Redis, Stage, StageSpec, Stats,
    admin::{self, AdminState},
    telemetry,
};

/// What a running service shares: its config, Redis, stage registry and shutdown signal.
#[derive(Clone, Debug)]
pub struct App {
    /// The service's name (logs, status).
    pub name: String,
    /// Where its variables come from.
    pub env: Env,
    /// The shared configuration.
    pub config: Config,
    /// Redis handle.
    pub redis: Redis,
    /// Stages registered in this process.
    pub stats: Stats,
    /// Cancelled on SIGTERM/SIGINT (or by a test).
    pub shutdown: CancellationToken,
    metrics: PrometheusHandle,
    telemetry: telemetry::Telemetry,
}

impl App {
    /// Reads the configuration from `env`, installs logging and metrics, prepares Redis.
    /// `default_http_addr` is the service's own default for `HTTP_ADDR`.
    pub fn init(
        name: &str,
        env: Env,
        default_http_addr: &str,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let telemetry = telemetry::init(&env, name)?;
        let config = Config::from_env(&env, default_http_addr)?;
        let redis = Redis::from_config(&config)?;
        tracing::info!(
            service = name,
            redis = redis.display_url(),
            keys = %config.keys,
            consumer = %config.consumer_name,
            "starting"
        );
        Ok(Self {
            name: name.to_owned(),
            env,
            config,
            redis,
            stats: Stats::default(),
            shutdown,
            metrics: telemetry::install_metrics(),
            telemetry,
        })
    }

    /// A stage of this service, registered for status and readiness.
    pub fn stage<H: Handler>(&self, spec: StageSpec, handler: H) -> Stage<H> {
        Stage::new(
            spec,
            handler,
            self.redis.clone(),
            &self.config,
            &self.stats,
            self.shutdown.clone(),
        )
    }

    /// The health/admin router for this service.
    pub fn admin_router(&self) -> Router {
        admin::router(AdminState {
            redis: self.redis.clone(),
            stats: self.stats.clone(),
            admin_token: self.config.admin_token.clone(),
            metrics: Some(self.metrics.clone()),
            service: self.name.clone(),
        })
    }

    /// Binds `HTTP_ADDR`.
    pub async fn bind(&self) -> anyhow::Result<TcpListener> {
        let addr: SocketAddr = self.config.http_addr;
        TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on HTTP_ADDR={addr}: {e}"))
    }

    /// Serves `routes` (merged with the admin router) on `listener` while `work` runs; on
    /// shutdown, stops accepting, waits for `work` to finish its batch, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        routes: Router,
        work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = routes.merge(self.admin_router());
        tracing::info!(service = %self.name, addr = %listener.local_addr()?, "http listening");
        let shutdown = self.shutdown.clone();
        let work = tokio::spawn(work);
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        let served = server.await;
        // The server returns once shutdown began; the stages finish their batches.
        self.shutdown.cancel();
        let worked = work
            .await
            .map_err(|e| anyhow::anyhow!("stage task failed: {e}"))?;
        // Flushing spans blocks; do it off the async threads.
        let telemetry = self.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        served?;
        worked?;
        tracing::info!(service = %self.name, "stopped");
        Ok(())
    }
}
