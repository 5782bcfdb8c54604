//! tickflow ingest: accepts events from outside and appends them to the pipeline's inbound
//! stream, routed to partitions by symbol.
//!
//! - [`http`]: `POST /v1/orders`, `/v1/ticks`, `/v1/cancels`, `DELETE /v1/orders/{symbol}/{id}`.
//! - [`grpc`]: `tickflow.v1.IngestService` (`Publish`, `PublishStream`).
//! - [`external`]: a stage reading flat-field entries that other programs XADD to
//!   `ingest_stream` (and any other configured external streams).
//! - [`validate`]: the checks every source shares; [`publish`]: the append.

pub mod external;
pub mod grpc;
pub mod http;
pub mod publish;
pub mod validate;

use std::{net::SocketAddr, time::Duration};

use streams_core::{App, ConsumeMode, InputFormat, Inputs, StageSpec, config::ConfigError};
use tickflow_proto::topology;
use tokio::net::TcpListener;

/// Ingest's own settings (besides the shared [`streams_core::Config`]).
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// `GRPC_ADDR` (default `0.0.0.0:50051`).
    pub grpc_addr: SocketAddr,
    /// `INGEST_STREAMS`: comma-separated external streams (default `ingest_stream`; empty
    /// value `-` disables).
    pub external_streams: Vec<String>,
    /// `INGEST_MAX_BACKLOG`: refuse work (429) while transform is more entries behind.
    pub max_backlog: u64,
    /// `INGEST_MAX_BODY_BYTES`: largest HTTP body (413 above).
    pub max_body_bytes: usize,
    /// `INGEST_MAX_EVENTS`: most events per HTTP request or gRPC `Publish`.
    pub max_events: usize,
    /// `INGEST_IDEMPOTENCY_TTL_MS`: how long an `Idempotency-Key` is remembered.
    pub idempotency_ttl_ms: u64,
    /// The gRPC server's limits (`INGEST_GRPC_*`, `INGEST_MAX_STREAM_EVENTS`).
    pub grpc: grpc::GrpcLimits,
}

impl IngestConfig {
    /// Reads the variables.
    pub fn from_env(env: &streams_core::Env) -> Result<Self, ConfigError> {
        let external_streams = match env.get("INGEST_STREAMS") {
            None => vec!["ingest_stream".to_owned()],
            Some(v) if v.trim() == "-" => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        Ok(Self {
            grpc_addr: env.addr_or("GRPC_ADDR", "0.0.0.0:50051")?,
            external_streams,
            max_backlog: env.ranged_or("INGEST_MAX_BACKLOG", 100_000, 1, u64::MAX / 2)?,
            max_body_bytes: env.ranged_or("INGEST_MAX_BODY_BYTES", 1 << 20, 1024, 64 << 20)?
                as usize,
            max_events: env.ranged_or("INGEST_MAX_EVENTS", 10_000, 1, 1_000_000)? as usize,
            idempotency_ttl_ms: env.ranged_or(
                "INGEST_IDEMPOTENCY_TTL_MS",
                publish::DEFAULT_IDEMPOTENCY_TTL_MS,
                1_000,
                7 * 24 * 3_600_000,
            )?,
            grpc: grpc::GrpcLimits::from_env(env)?,
        })
    }
}

/// Runs ingest: HTTP on `http`, gRPC on `grpc`, the external-stream stage, until shutdown.
pub async fn run(
    app: App,
    settings: IngestConfig,
    http: TcpListener,
    grpc: TcpListener,
) -> anyhow::Result<()> {
    let publisher = publish::Publisher::new(
        app.redis.clone(),
        app.config.keys.clone(),
        settings.max_backlog,
    )
    .with_idempotency_ttl_ms(settings.idempotency_ttl_ms);
    let monitor = publisher
        .backlog()
        .spawn_monitor(Duration::from_millis(100), app.shutdown.clone());
    let routes = http::router(
        publisher.clone(),
        http::HttpLimits {
            max_body_bytes: settings.max_body_bytes,
            max_events: settings.max_events,
        },
    );
    let external = (!settings.external_streams.is_empty()).then(|| {
        app.stage(
            StageSpec {
                group: topology::INGEST_GROUP.into(),
                inputs: Inputs::External(settings.external_streams.clone()),
                mode: ConsumeMode::Shared,
                format: InputFormat::Raw,
            },
            external::ExternalEvents::new(app.config.keys.clone()),
        )
    });
    let grpc_shutdown = app.shutdown.clone();
    let grpc_service = grpc::service(publisher, settings.max_events, &settings.grpc);
    let mut grpc_server = settings.grpc.server();
    tracing::info!(addr = %grpc.local_addr()?, "grpc listening");
    let work = async move {
        let grpc_server = grpc_server
            .add_service(grpc_service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc),
                async move { grpc_shutdown.cancelled().await },
            );
        let stage = async move {
            match external {
                Some(stage) => stage.run().await.map_err(anyhow::Error::from),
                None => Ok(()),
            }
        };
        let (served, staged) = tokio::join!(grpc_server, stage);
        monitor.abort();
        served?;
        staged
    };
    app.serve(http, routes, work).await
}

/// Where the service listens for HTTP unless `HTTP_ADDR` says otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";

/// The whole service as its binary runs it: configuration from `env`, listeners, then
/// [`run`] until `shutdown`.
pub async fn main_with(
    env: streams_core::Env,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = App::init("ingest", env.clone(), DEFAULT_HTTP_ADDR, shutdown)?;
    let settings = IngestConfig::from_env(&env)?;
    let http = app.bind().await?;
    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on GRPC_ADDR={}: {e}", settings.grpc_addr))?;
    run(app, settings, http, grpc).await
}
