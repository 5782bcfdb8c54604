//! The transform service binary. `transform load-refdata FILE` loads reference data into
//! Redis and exits; without arguments it runs the stage.

use streams_core::{Env, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `transform healthcheck`: exit 0 when our /readyz answers 200 (images have no curl).
    streams_core::healthcheck::exit_if_requested(transform::DEFAULT_HTTP_ADDR);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [command, path] = args.as_slice()
        && command == "load-refdata"
    {
        let count = transform::load_refdata_command(Env::process(), path).await?;
        println!("loaded {count} instruments from {path}");
        return Ok(());
    }
    transform::main_with(Env::process(), shutdown::on_signals()).await
}
