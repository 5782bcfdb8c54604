//! Integration tests of streams-core against a real redis-server per test.
//! One test binary (see ARCHITECTURE.md): each module is one area.

mod admin;
mod failover;
mod forwarding;
mod http_server;
mod outages;
mod owned;
mod support;
mod trimming;
