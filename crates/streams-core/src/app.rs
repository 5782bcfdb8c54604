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

    /// Serves `routes` (merged with the admin router) on `listener` while `work` runs, within
    /// the configured bounds ([`crate::http_server`]); on shutdown, stops accepting, waits
    /// for `work` to finish its batch, and returns.
    ///
    /// If `work` fails or panics first, the process must not go on answering `/livez`
    /// without it: serving stops and the failure is returned, so the process exits non-zero
    /// and its supervisor (Kubernetes, compose) restarts it.
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
        let stop = self.shutdown.clone();
        let name = self.name.clone();
        let work = tokio::spawn(async move {
            let result = match work.await {
                Ok(result) => result,
                Err(e) if e.is_panic() => Err(anyhow::anyhow!("stage task panicked: {e}")),
                Err(e) => Err(anyhow::anyhow!("stage task failed: {e}")),
            };
            if let Err(e) = &result
                && !stop.is_cancelled()
            {
                tracing::error!(service = %name, error = %e, "the stages stopped; shutting down");
                stop.cancel();
            }
            result
        });
        crate::http_server::serve(listener, router, &self.config.http, shutdown).await;
        // The server returns once shutdown began; the stages finish their batches.
        self.shutdown.cancel();
        let worked = work
            .await
            .map_err(|e| anyhow::anyhow!("stage task failed: {e}"))?;
        // Flushing spans blocks; do it off the async threads.
        let telemetry = self.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        worked?;
        tracing::info!(service = %self.name, "stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        let env = Env::from_pairs([
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("HTTP_ADDR", "127.0.0.1:0"),
        ]);
        App::init("test", env, "127.0.0.1:0", CancellationToken::new()).unwrap()
    }

    #[tokio::test]
    async fn a_panicking_stage_stops_the_service_with_an_error() {
        let app = app();
        let listener = app.bind().await.unwrap();
        let served = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            app.serve(listener, Router::new(), async {
                panic!("a handler bug");
            }),
        )
        .await
        .expect("serve returns instead of serving on without its stage");
        let error = served.expect_err("a panic is an error").to_string();
        assert!(error.contains("panicked"), "{error}");
    }

    #[tokio::test]
    async fn a_failing_stage_stops_the_service_and_its_error_is_returned() {
        let app = app();
        let listener = app.bind().await.unwrap();
        let served = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            app.serve(listener, Router::new(), async {
                Err(anyhow::anyhow!("the stage gave up"))
            }),
        )
        .await
        .expect("serve returns");
        assert_eq!(served.unwrap_err().to_string(), "the stage gave up");
    }

    #[tokio::test]
    async fn work_that_ends_at_shutdown_returns_ok() {
        let app = app();
        let token = app.shutdown.clone();
        let listener = app.bind().await.unwrap();
        let stop = token.clone();
        let serving = tokio::spawn(app.serve(listener, Router::new(), async move {
            stop.cancelled().await;
            Ok(())
        }));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!serving.is_finished(), "serves until shutdown");
        token.cancel();
        serving.await.unwrap().unwrap();
    }
}
