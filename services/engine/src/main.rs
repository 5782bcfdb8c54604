//! The engine service binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    engine::main_with(
        streams_core::Env::process(),
        streams_core::shutdown::on_signals(),
    )
    .await
}
