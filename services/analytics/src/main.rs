//! The analytics service binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    analytics::main_with(
        streams_core::Env::process(),
        streams_core::shutdown::on_signals(),
    )
    .await
}
