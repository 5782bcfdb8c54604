//! Logs and metrics, built once per process.
//!
//! Logs: `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` prints one JSON object per
//! line, anything else readable text. Metrics: a process-global Prometheus recorder whose
//! text `/metrics` serves.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::Env;

/// Installs the log subscriber (once; later calls do nothing).
pub fn init_logging(env: &Env) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let filter = EnvFilter::try_new(env.get("RUST_LOG").unwrap_or_else(|| "info".into()))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let json = env
            .get("LOG_FORMAT")
            .is_some_and(|f| f.eq_ignore_ascii_case("json"));
        let registry = tracing_subscriber::registry().with(filter);
        let result = if json {
            registry
                .with(fmt::layer().json().flatten_event(true))
                .try_init()
        } else {
            registry.with(fmt::layer()).try_init()
        };
        // Another subscriber (a test harness's) may already be installed: keep it.
        let _ = result;
    });
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("tickflow_batch_size".into()), &sizes)
                })
                .expect("static buckets are valid")
                .install_recorder()
                .expect("the Prometheus recorder is installed once");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}
