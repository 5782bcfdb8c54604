//! The engine service binary.

use streams_core::{App, Env, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let app = App::init(
        "engine",
        Env::process(),
        "0.0.0.0:8082",
        shutdown::on_signals(),
    )?;
    let http = app.bind().await?;
    engine::run(app, http).await
}
