//! The ingest service binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ingest::main_with(
        streams_core::Env::process(),
        streams_core::shutdown::on_signals(),
    )
    .await
}
