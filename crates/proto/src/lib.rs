//! tickflow's protobuf messages (`proto/tickflow/v1/events.proto`) and the ingest gRPC
//! service (`proto/tickflow/v1/ingest.proto`), generated at build time.
//!
//! Every event payload in a stream entry envelope is one of these messages; the envelope's
//! `type` field says which ([`event_type`] lists the names).

#![allow(missing_debug_implementations, unreachable_pub, clippy::all)]

/// Generated code of package `tickflow.v1`.
pub mod v1 {
    tonic::include_proto!("tickflow.v1");
}

/// The envelope `type` of each payload message.
pub mod event_type {
    /// [`crate::v1::NewOrder`] from a client.
    pub const NEW_ORDER: &str = "order.new";
    /// [`crate::v1::CancelOrder`] from a client.
    pub const CANCEL_ORDER: &str = "order.cancel";
    /// [`crate::v1::MarketTick`] from outside.
    pub const TICK: &str = "tick";
    /// [`crate::v1::ValidatedOrder`] from transform.
    pub const VALIDATED_ORDER: &str = "order.validated";
    /// [`crate::v1::ValidatedCancel`] from transform.
    pub const VALIDATED_CANCEL: &str = "order.cancel.validated";
    /// [`crate::v1::ValidatedTick`] from transform.
    pub const VALIDATED_TICK: &str = "tick.validated";
    /// [`crate::v1::ExecutionReport`] from transform or the engine.
    pub const EXECUTION: &str = "execution";
    /// [`crate::v1::Trade`] from the engine.
    pub const TRADE: &str = "trade";
}

/// The pipeline's logical streams and consumer groups: who writes and who reads each.
///
/// ```text
/// ingest ──inbound──▶ transform ──validated──▶ engine ──market──▶ analytics
///                         └──────────── market (rejections) ──────────▲
/// ```
pub mod topology {
    /// Raw client events (`order.new`, `order.cancel`, `tick`); written by ingest.
    pub const INBOUND: &str = "inbound";
    /// Normalized events (`order.validated`, `order.cancel.validated`, `tick.validated`);
    /// written by transform.
    pub const VALIDATED: &str = "validated";
    /// Outcomes (`execution`, `trade`, `tick.validated`); written by the engine, and by
    /// transform for business rejections.
    pub const MARKET: &str = "market";
    /// Consumer group of transform on [`INBOUND`].
    pub const TRANSFORM_GROUP: &str = "transform";
    /// Consumer group of the engine on [`VALIDATED`].
    pub const ENGINE_GROUP: &str = "engine";
    /// Consumer group of analytics on [`MARKET`].
    pub const ANALYTICS_GROUP: &str = "analytics";
    /// Consumer group of ingest on its external streams.
    pub const INGEST_GROUP: &str = "ingest";
}
