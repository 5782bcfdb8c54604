//! The tickflow command line's library: everything `tickflow` does, so that the binary
//! (`main.rs`) only parses and dispatches, and the integration tests can start a local
//! pipeline the way the benchmark does.
//!
//! - [`cli`]: the clap definition of every command, and the dispatch.
//! - [`pipeline`]: the running pipeline the operator commands look at (its Redis, keys
//!   and stages, from the services' variables).
//! - [`status`], [`tail`], [`dlq`], [`groups`], [`top`]: the operator commands, on
//!   [`snapshot`] (every stage's position) and [`entries`] (decoded entries);
//!   [`format`]: ages, times and colour.
//! - [`load`]: a steady demo load through ingest's gRPC API.
//! - [`bench`]: the end-to-end benchmark, on a pipeline of its own (feature
//!   `local-bench`) or attached to a running one.
//! - [`local`] (feature `local-bench`): a local pipeline, the four services as
//!   `tickflow serve` processes.

pub mod bench;
pub mod cli;
pub mod dlq;
pub mod entries;
pub mod format;
pub mod groups;
pub mod load;
#[cfg(feature = "local-bench")]
pub mod local;
pub mod pipeline;
pub mod snapshot;
pub mod status;
pub mod tail;
pub mod top;
