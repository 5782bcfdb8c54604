//! The tickflow command line's library: what `tickflow load` and `tickflow bench` do, so
//! that the binary (`main.rs`) stays a dispatcher and the integration tests can start a
//! local pipeline the way the benchmark does.
//!
//! - [`load`]: a steady demo load through ingest's gRPC API.
//! - [`bench`]: the end-to-end benchmark, on a pipeline of its own or attached to a
//!   running one ([`attach`]).
//! - [`local`]: a local pipeline, the four services as `tickflow serve` processes.

pub mod attach;
pub mod bench;
pub mod load;
pub mod local;
