//! tickflow's protobuf messages (`proto/tickflow/v1/events.proto`) and the ingest gRPC
//! service (`proto/tickflow/v1/ingest.proto`), generated at build time.
//!
//! Every event payload in a stream entry envelope is one of these messages; the envelope's
//! `type` field says which ([`event_type`] lists the names).

#![allow(missing_debug_implementations, unreachable_pub, clippy::all)]

pub mod display;

/// Generated code of package `tickflow.v1`.
pub mod v1 {
    tonic::include_proto!("tickflow.v1");

    impl OrderEvents {
        /// The execution reports, in order.
        pub fn reports(&self) -> impl Iterator<Item = &ExecutionReport> {
            self.events.iter().filter_map(|e| match &e.kind {
                Some(market_event::Kind::Execution(report)) => Some(report),
                _ => None,
            })
        }

        /// The trades, in order.
        pub fn trades(&self) -> impl Iterator<Item = &Trade> {
            self.events.iter().filter_map(|e| match &e.kind {
                Some(market_event::Kind::Trade(trade)) => Some(trade),
                _ => None,
            })
        }
    }

    impl RejectCode {
        /// Whether the code says the reference data does not know the symbol (it has no
        /// instrument of it, or only an invalid one): nothing may be kept per symbol for such
        /// a report, or any client could create state by inventing symbols.
        pub fn symbol_unknown(self) -> bool {
            matches!(self, Self::UnknownSymbol | Self::InstrumentUnavailable)
        }

        /// Its name in metric labels and counters: `unknown_symbol`, `instrument_rule`, ….
        pub fn label(self) -> &'static str {
            match self {
                Self::Unspecified => "unspecified",
                Self::UnknownSymbol => "unknown_symbol",
                Self::InstrumentUnavailable => "instrument_unavailable",
                Self::InstrumentRule => "instrument_rule",
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::RejectCode;

        #[test]
        fn reject_code_labels_are_their_proto_names_in_lower_case() {
            for code in [
                RejectCode::Unspecified,
                RejectCode::UnknownSymbol,
                RejectCode::InstrumentUnavailable,
                RejectCode::InstrumentRule,
            ] {
                let name = code.as_str_name().trim_start_matches("REJECT_CODE_");
                assert_eq!(code.label(), name.to_ascii_lowercase());
            }
        }
    }
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
    /// [`crate::v1::ExecutionReport`] from transform (rejections); the engine writes its
    /// reports inside [`ORDER_EVENTS`].
    pub const EXECUTION: &str = "execution";
    /// [`crate::v1::Trade`]; the engine writes trades inside [`ORDER_EVENTS`], analytics
    /// also reads a lone one.
    pub const TRADE: &str = "trade";
    /// [`crate::v1::OrderEvents`] from the engine: every execution report and trade one
    /// order or cancel produced, in the book's order.
    pub const ORDER_EVENTS: &str = "order.events";
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
    /// Outcomes (`order.events`, `tick.validated`) written by the engine, and `execution`
    /// written by transform for business rejections.
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

/// What a symbol and a client order id must look like, wherever they are read. Ingest
/// refuses a request that breaks these; a stage reading an entry that breaks them
/// dead-letters it (no tickflow stage wrote it).
pub mod rules {
    /// The longest symbol.
    pub const MAX_SYMBOL_LEN: usize = 32;
    /// The longest client order id.
    pub const MAX_ORDER_ID_LEN: usize = 64;

    /// What is wrong with `symbol` (as written: not trimmed), if anything: empty, longer
    /// than [`MAX_SYMBOL_LEN`], or holding anything but letters, digits and `. - _ /`.
    pub fn symbol_problem(symbol: &str) -> Option<String> {
        if symbol.is_empty() {
            Some("is empty".into())
        } else if symbol.len() > MAX_SYMBOL_LEN {
            Some(format!("is longer than {MAX_SYMBOL_LEN} characters"))
        } else if !symbol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        {
            Some("may hold only letters, digits and . - _ /".into())
        } else {
            None
        }
    }

    /// What is wrong with a client order id, if anything: empty, longer than
    /// [`MAX_ORDER_ID_LEN`], or holding a control character.
    pub fn order_id_problem(id: &str) -> Option<String> {
        if id.is_empty() {
            Some("is empty".into())
        } else if id.len() > MAX_ORDER_ID_LEN {
            Some(format!("is longer than {MAX_ORDER_ID_LEN} characters"))
        } else if id.chars().any(char::is_control) {
            Some("must not contain control characters".into())
        } else {
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn symbols_and_order_ids_are_checked() {
            assert_eq!(symbol_problem("BTC-USD"), None);
            assert_eq!(symbol_problem("").as_deref(), Some("is empty"));
            assert!(
                symbol_problem(&"A".repeat(33))
                    .unwrap()
                    .contains("longer than 32")
            );
            assert!(symbol_problem(" AAPL").unwrap().contains("may hold only"));
            assert!(symbol_problem("AA{1}").unwrap().contains("may hold only"));
            assert_eq!(order_id_problem("o-1"), None);
            assert_eq!(order_id_problem("").as_deref(), Some("is empty"));
            assert!(
                order_id_problem(&"o".repeat(65))
                    .unwrap()
                    .contains("longer than 64")
            );
            assert!(order_id_problem("a\u{0}b").unwrap().contains("control"));
        }
    }
}
