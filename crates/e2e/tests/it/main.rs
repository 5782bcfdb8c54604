//! End-to-end tests of tickflow: the four services in one process (or, where something
//! process-global is tested, as four processes), against a real redis-server per pipeline
//! (see the `e2e` harness). One test binary; one module per area.

mod backpressure;
mod bad_input_sweep;
mod bad_inputs;
mod bars;
mod chaos;
mod chaos_cluster;
mod idempotency;
mod large_inputs;
mod limits;
mod process_metrics;
mod replicas;
mod scripted;
mod support;
mod symbols;
mod traces;
