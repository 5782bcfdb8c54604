//! The tickflow command line.
//!
//! - `tickflow load …`: a steady demo load through ingest's gRPC API ([`load`]).
//! - `tickflow bench …`: starts a full pipeline (four service processes on a local
//!   redis-server), pushes N events through it and reports throughput, latency, CPU,
//!   memory and whether every event arrived exactly once ([`bench`]).
//! - `tickflow serve ingest|transform|engine|analytics`: runs one service, exactly as its
//!   own binary does (the benchmark starts its processes this way).
//! - `tickflow healthcheck ingest|transform|engine|analytics`: exit 0 when that service's
//!   `/readyz` (on `HTTP_ADDR`, else the service's default address) answers 200.

mod bench;
mod load;

const HELP: &str = "\
usage:
  tickflow load  [--grpc http://127.0.0.1:50051] [--rate 200] [--seconds S] [--symbols AAPL,MSFT] [--seed 7]
  tickflow bench [--events 200000] [--rate 0] [--via grpc|http|stream] [--symbols 16]
                 [--partitions 16] [--batch 256] [--trace-ratio R] [--json]
  tickflow serve ingest|transform|engine|analytics
  tickflow healthcheck ingest|transform|engine|analytics";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("load") => load::load(load::parse_load(rest)?).await,
        Some("bench") => bench::run(bench::parse(rest)?).await,
        Some("serve") => serve(rest.first().map(String::as_str)).await,
        Some("healthcheck") => healthcheck(rest.first().map(String::as_str)),
        _ => {
            println!("{HELP}");
            Ok(())
        }
    }
}

async fn serve(service: Option<&str>) -> anyhow::Result<()> {
    let env = streams_core::Env::process();
    let shutdown = streams_core::shutdown::on_signals();
    match service {
        Some("ingest") => ingest::main_with(env, shutdown).await,
        Some("transform") => transform::main_with(env, shutdown).await,
        Some("engine") => engine::main_with(env, shutdown).await,
        Some("analytics") => analytics::main_with(env, shutdown).await,
        other => anyhow::bail!("tickflow serve: unknown service {other:?}\n{HELP}"),
    }
}

/// Each service's default `HTTP_ADDR`, as its binary has it.
fn default_http_addr(service: Option<&str>) -> anyhow::Result<&'static str> {
    Ok(match service {
        Some("ingest") => ingest::DEFAULT_HTTP_ADDR,
        Some("transform") => transform::DEFAULT_HTTP_ADDR,
        Some("engine") => engine::DEFAULT_HTTP_ADDR,
        Some("analytics") => analytics::DEFAULT_HTTP_ADDR,
        other => anyhow::bail!("tickflow healthcheck: unknown service {other:?}\n{HELP}"),
    })
}

/// `tickflow healthcheck SERVICE`: the same check as `SERVICE healthcheck`.
fn healthcheck(service: Option<&str>) -> anyhow::Result<()> {
    let default = default_http_addr(service)?;
    let (code, line) = streams_core::healthcheck::run(&streams_core::Env::process(), default);
    println!("{line}");
    std::process::exit(code)
}
