//! The transform service binary. `transform load-refdata FILE` loads reference data into
//! Redis and exits; without arguments it runs the stage.

use streams_core::{App, Env, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    let app = App::init(
        "transform",
        env.clone(),
        "0.0.0.0:8081",
        shutdown::on_signals(),
    )?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [command, path] = args.as_slice()
        && command == "load-refdata"
    {
        let count = transform::refdata::load_file(&app.redis, &app.config.keys, path).await?;
        println!("loaded {count} instruments from {path}");
        return Ok(());
    }
    let settings = transform::TransformConfig::from_env(&env)?;
    let http = app.bind().await?;
    transform::run(app, settings, http).await
}
