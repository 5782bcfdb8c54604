//! Generates the Rust types and gRPC service from `proto/` with a vendored protoc, so that
//! no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs the protoc named by PROTOC.
    unsafe_env_set("PROTOC", protoc);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("tickflow/v1/events.proto"),
        root.join("tickflow/v1/ingest.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    // Serialize on every message, so that `display` shows a payload's fields as JSON:
    // enums by name (`buy`, not 1), and a oneof's case by its field name (`execution`).
    let mut config = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".tickflow.v1", "#[derive(serde::Serialize)]")
        .type_attribute(
            ".tickflow.v1.Event.kind",
            "#[serde(rename_all = \"snake_case\")]",
        )
        .type_attribute(
            ".tickflow.v1.MarketEvent.kind",
            "#[serde(rename_all = \"snake_case\")]",
        );
    for (field, name) in [
        (".tickflow.v1.NewOrder.side", "side"),
        (".tickflow.v1.NewOrder.type", "order_type"),
        (".tickflow.v1.ValidatedOrder.side", "side"),
        (".tickflow.v1.ValidatedOrder.type", "order_type"),
        (".tickflow.v1.ExecutionReport.status", "exec_status"),
        (".tickflow.v1.Trade.aggressor", "side"),
    ] {
        config = config.field_attribute(
            field,
            format!("#[serde(serialize_with = \"crate::display::{name}\")]"),
        );
    }
    config.compile_protos(&files, &[root])?;
    Ok(())
}

fn unsafe_env_set(name: &str, value: std::path::PathBuf) {
    // std::env::set_var is unsafe in edition 2024 because other threads may read the
    // environment; a build script has no other threads at this point.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(name, value);
    }
}
