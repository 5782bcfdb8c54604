//! `streams-core`: the stage runtime every tickflow service stands on.
//!
//! A tickflow stage reads a batch of entries through a Redis Streams consumer group, hands
//! each to its [`Handler`], and acknowledges the batch and appends the results to the next
//! stream in one server-side script call, so that every entry's effect happens exactly once.
//! This crate does that loop once, for every service, with what running it for real needs:
//! recovery of entries left by dead consumers, owned partitions with fenced leases,
//! dead-lettering, safe trimming, backpressure, graceful shutdown, reconnects, metrics and
//! the health/admin HTTP router.
//!
//! Layout:
//! - [`config`]: typed configuration from the environment.
//! - [`keys`]: the key layout (namespace, partitions, hash tags).
//! - [`envelope`]: the one wire format of stream entries.
//! - [`connection`]: the pool and the dedicated blocking-read connections.
//! - [`stage`]: the stage loop and the [`Handler`] trait.
//! - `ownership`: partition leases for [`ConsumeMode::Owned`] stages.
//! - `scripts`: the Lua scripts that make each step atomic.
//! - [`backpressure`]: downstream backlog checks for producers.
//! - [`admin`]: `/livez`, `/readyz`, `/metrics`, `/admin/*`.
//! - [`http_server`]: the HTTP server of every service, with its bounds.
//! - [`inspect`]: typed `XINFO` replies, stage inputs, dead-letter replay and the entry
//!   decoder for display (the operator CLI's view of a pipeline).
//! - [`telemetry`], [`shutdown`]: logs, metrics and signals.
//! - [`healthcheck`]: the `healthcheck` subcommand of every service binary.
//! - [`app`]: the bootstrap every service's `main.rs` uses.

/// The global allocator of every binary linking streams-core (feature `mimalloc`, on by
/// default; BENCHMARKS.md has what it changed).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
mod admin_ops;
pub mod app;
pub mod append;
pub mod backpressure;
pub mod config;
pub mod connection;
pub mod envelope;
pub mod error;
pub mod healthcheck;
pub mod http_server;
pub mod inspect;
pub mod keys;
mod maintenance;
mod ownership;
mod scripts;
pub mod shutdown;
pub mod stage;
pub mod stats;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod trace_context;

pub use admin_ops::{ConsumerStatus, PartitionStatus, TrimOutcome, trim_stream, xinfo_records};
pub use app::App;
pub use config::{Config, Env};
pub use connection::Redis;
pub use envelope::Envelope;
pub use error::StreamsError;
pub use keys::{KeySpace, Partition};
pub use scripts::{RawEntry, parse_entries, parse_read_reply};
pub use stage::{
    ConsumeMode, Delivery, Handler, HandlerError, InputFormat, Inputs, Outputs, Stage, StageSpec,
};
pub use stats::Stats;
