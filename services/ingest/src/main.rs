//! The ingest service binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `ingest healthcheck`: exit 0 when our /readyz answers 200 (images have no curl).
    streams_core::healthcheck::exit_if_requested(ingest::DEFAULT_HTTP_ADDR);
    ingest::main_with(
        streams_core::Env::process(),
        streams_core::shutdown::on_signals(),
    )
    .await
}
