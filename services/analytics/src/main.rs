//! The analytics service binary.

use streams_core::{App, Env, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    let app = App::init(
        "analytics",
        env.clone(),
        "0.0.0.0:8083",
        shutdown::on_signals(),
    )?;
    let settings = analytics::AnalyticsConfig::from_env(&env)?;
    let http = app.bind().await?;
    analytics::run(app, settings, http).await
}
