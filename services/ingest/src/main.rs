//! The ingest service binary: configuration from the environment, then [`ingest::run`].

use streams_core::{App, Env, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    let app = App::init(
        "ingest",
        env.clone(),
        "0.0.0.0:8080",
        shutdown::on_signals(),
    )?;
    let settings = ingest::IngestConfig::from_env(&env)?;
    let http = app.bind().await?;
    let grpc = tokio::net::TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on GRPC_ADDR={}: {e}", settings.grpc_addr))?;
    ingest::run(app, settings, http, grpc).await
}
