//! The analytics service binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `analytics healthcheck`: exit 0 when our /readyz answers 200 (images have no curl).
    streams_core::healthcheck::exit_if_requested(analytics::DEFAULT_HTTP_ADDR);
    analytics::main_with(
        streams_core::Env::process(),
        streams_core::shutdown::on_signals(),
    )
    .await
}
