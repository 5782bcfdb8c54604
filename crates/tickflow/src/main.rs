//! The tickflow command line.
//!
//! - `tickflow load …`: a steady demo load through ingest's gRPC API ([`load`]).
//! - `tickflow bench …`: starts a full pipeline (four service processes on a local
//!   redis-server), or attaches to a running one (`--attach`), pushes N events through it
//!   and reports throughput, latency, CPU, memory and whether every event arrived exactly
//!   once ([`bench`]).
//! - `tickflow serve ingest|transform|engine|analytics`: runs one service, exactly as its
//!   own binary does (the benchmark starts its processes this way).
//! - `tickflow healthcheck ingest|transform|engine|analytics`: exit 0 when that service's
//!   `/readyz` (on `HTTP_ADDR`, else the service's default address) answers 200.

use tickflow::{bench, load};

const SERVICE_USAGE: &str = "\
  tickflow serve ingest|transform|engine|analytics
  tickflow healthcheck ingest|transform|engine|analytics";

fn help() -> String {
    format!("usage:\n{}\n{}\n{SERVICE_USAGE}", load::USAGE, bench::USAGE)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("help");
    let rest = args.get(1..).unwrap_or_default();
    // `tickflow`, `tickflow help`, `-h`/`--help` anywhere: the usage, exit 0.
    if matches!(command, "help" | "-h" | "--help")
        || rest.iter().any(|a| a == "-h" || a == "--help")
    {
        println!("{}", help());
        return Ok(());
    }
    match command {
        "load" => load::load(load::parse_load(rest)?).await,
        "bench" => bench::run(bench::parse(rest)?).await,
        "serve" => serve(rest.first().map(String::as_str)).await,
        "healthcheck" => healthcheck(rest.first().map(String::as_str)),
        other => anyhow::bail!("tickflow: unknown command {other:?}\n{}", help()),
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
        other => anyhow::bail!("tickflow serve: unknown service {other:?}\n{}", help()),
    }
}

/// Each service's default `HTTP_ADDR`, as its binary has it.
fn default_http_addr(service: Option<&str>) -> anyhow::Result<&'static str> {
    Ok(match service {
        Some("ingest") => ingest::DEFAULT_HTTP_ADDR,
        Some("transform") => transform::DEFAULT_HTTP_ADDR,
        Some("engine") => engine::DEFAULT_HTTP_ADDR,
        Some("analytics") => analytics::DEFAULT_HTTP_ADDR,
        other => anyhow::bail!(
            "tickflow healthcheck: unknown service {other:?}\n{}",
            help()
        ),
    })
}

/// `tickflow healthcheck SERVICE`: the same check as `SERVICE healthcheck`.
fn healthcheck(service: Option<&str>) -> anyhow::Result<()> {
    let default = default_http_addr(service)?;
    let (code, line) = streams_core::healthcheck::run(&streams_core::Env::process(), default);
    println!("{line}");
    std::process::exit(code)
}
