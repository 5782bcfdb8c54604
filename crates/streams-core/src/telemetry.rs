//! Logs, traces and metrics, built once per process by [`init`].
//!
//! - **Logs**: `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` prints one JSON object
//!   per line, with `trace_id` and `span_id` inside traced spans; readable text otherwise.
//! - **Traces**: OpenTelemetry through `tracing` and `tracing-opentelemetry`, exported with
//!   OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set, and off, at no cost, when it is not. `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`
//!   (`always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
//!   `parentbased_always_off`, `parentbased_traceidratio`; default
//!   `parentbased_always_on`), `OTEL_TRACES_SAMPLER_ARG` and `OTEL_RESOURCE_ATTRIBUTES`
//!   are honoured. W3C trace context travels in every stream entry
//!   ([`crate::trace_context`]).
//! - **Metrics**: a process-global Prometheus recorder whose text `/metrics` serves.

use std::{fmt, sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::{ConfigError, Env};

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans still buffered.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How traces are exported and sampled, read from the `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The OTLP/gRPC endpoint (`http://host:4317`); `None`: tracing off.
    pub endpoint: Option<String>,
    /// `service.name`.
    pub service_name: String,
    /// The sampler.
    pub sampler: SamplerConfig,
    /// Extra resource attributes.
    pub resource_attributes: Vec<(String, String)>,
}

/// The sampler named by `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerConfig {
    /// Sample everything.
    AlwaysOn,
    /// Sample nothing.
    AlwaysOff,
    /// Sample this fraction of new traces.
    Ratio(f64),
    /// Follow the parent's decision; for roots, the inner sampler.
    ParentBased(Box<SamplerConfig>),
}

impl TracingConfig {
    /// Reads the `OTEL_*` variables.
    pub fn from_env(env: &Env, default_service_name: &str) -> Result<Self, ConfigError> {
        let endpoint = env
            .get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .map(|e| {
                // The OTLP spec defaults to https without a scheme; local collectors (Jaeger)
                // are plain gRPC, so an address without a scheme means http.
                if e.contains("://") {
                    e
                } else {
                    format!("http://{e}")
                }
            });
        let ratio = || -> Result<f64, ConfigError> {
            let ratio: f64 = env.parse_or("OTEL_TRACES_SAMPLER_ARG", 1.0)?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(ConfigError {
                    variable: "OTEL_TRACES_SAMPLER_ARG".into(),
                    value: ratio.to_string(),
                    reason: "must be between 0 and 1".into(),
                });
            }
            Ok(ratio)
        };
        let name = env
            .get("OTEL_TRACES_SAMPLER")
            .unwrap_or_else(|| "parentbased_always_on".into());
        let parent = |inner| SamplerConfig::ParentBased(Box::new(inner));
        let sampler = match name.as_str() {
            "always_on" => SamplerConfig::AlwaysOn,
            "always_off" => SamplerConfig::AlwaysOff,
            "traceidratio" => SamplerConfig::Ratio(ratio()?),
            "parentbased_always_on" => parent(SamplerConfig::AlwaysOn),
            "parentbased_always_off" => parent(SamplerConfig::AlwaysOff),
            "parentbased_traceidratio" => parent(SamplerConfig::Ratio(ratio()?)),
            other => {
                return Err(ConfigError {
                    variable: "OTEL_TRACES_SAMPLER".into(),
                    value: other.into(),
                    reason: "expected always_on, always_off, traceidratio or parentbased_*".into(),
                });
            }
        };
        let resource_attributes = env
            .get("OTEL_RESOURCE_ATTRIBUTES")
            .map(|attrs| {
                attrs
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            endpoint,
            service_name: env
                .get("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| default_service_name.to_owned()),
            sampler,
            resource_attributes,
        })
    }
}

fn sampler(config: &SamplerConfig) -> Sampler {
    match config {
        SamplerConfig::AlwaysOn => Sampler::AlwaysOn,
        SamplerConfig::AlwaysOff => Sampler::AlwaysOff,
        SamplerConfig::Ratio(r) => Sampler::TraceIdRatioBased(*r),
        SamplerConfig::ParentBased(inner) => Sampler::ParentBased(Box::new(sampler(inner))),
    }
}

/// Builds the tracer provider for `config` (None when tracing is off).
pub fn tracer_provider(config: &TracingConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = &config.endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .with_compression(opentelemetry_otlp::Compression::Gzip)
        .build()?;
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler(&config.sampler))
            .with_resource(resource)
            .build(),
    ))
}

/// Installs logging (and tracing when configured) for the process, once; later calls
/// return a handle that flushes nothing. `service_name` is the default `service.name`.
pub fn init(env: &Env, service_name: &str) -> anyhow::Result<Telemetry> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(Telemetry { provider: None });
    }
    let tracing_config = TracingConfig::from_env(env, service_name)?;
    let provider = tracer_provider(&tracing_config)?;
    let filter = EnvFilter::try_new(env.get("RUST_LOG").unwrap_or_else(|| "info".into()))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = env
        .get("LOG_FORMAT")
        .is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .event_format(JsonWithTrace)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    // Pipeline spans are at debug level: the log filter hides them, this layer takes them,
    // so they cost nothing unless tracing is on. Dependencies' spans stay out below info.
    let otel_filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_targets(
            ["streams_core", "ingest", "transform", "engine", "analytics"]
                .map(|target| (target, tracing::Level::DEBUG)),
        );
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tickflow"))
            .with_filter(otel_filter)
    });
    // A test harness may have installed a subscriber already: keep it.
    let installed = tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt_layer.with_filter(filter))
        .try_init()
        .is_ok();
    INSTALLED.get_or_init(|| ());
    if installed {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        if let Some(endpoint) = &tracing_config.endpoint {
            tracing::info!(%endpoint, service = %tracing_config.service_name, sampler = ?tracing_config.sampler, "exporting traces");
        }
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

impl Telemetry {
    /// Flushes and stops the exporter. Blocking: call from a blocking-capable thread.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing spans failed: {e}");
        }
    }
}

/// One JSON object per line, with the trace and span ids of the current span if traced.
///
/// Written here rather than with tracing-subscriber's `json()` formatter: that one prints
/// only a span's recorded fields (nested under `span`), and the OpenTelemetry ids are no
/// field. A formatter cannot ask the OpenTelemetry layer for them either (tracing does not
/// dispatch from inside a subscriber), so [`crate::trace_context::stamp`] keeps them in the
/// span's extensions, which only a formatter of our own reads, at the top level of each
/// line where log tools look for them. The timestamp is tracing-subscriber's.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        object.insert("timestamp".into(), Value::String(timestamp()));
        object.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        object.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);
        if let Some(span) = ctx.lookup_current() {
            object.insert("span".into(), Value::String(span.name().to_owned()));
            let ids = span.scope().find_map(|s| {
                s.extensions()
                    .get::<crate::trace_context::TraceIds>()
                    .cloned()
            });
            if let Some(ids) = ids {
                object.insert("trace_id".into(), Value::String(ids.trace_id));
                object.insert("span_id".into(), Value::String(ids.span_id));
            }
        }
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
}

/// Now, in RFC 3339 (UTC, µs), as tracing-subscriber's own formatters write it.
fn timestamp() -> String {
    use tracing_subscriber::fmt::time::FormatTime;
    let mut text = String::new();
    if tracing_subscriber::fmt::time::SystemTime
        .format_time(&mut Writer::new(&mut text))
        .is_err()
    {
        text.clear();
    }
    text
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
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_is_off_without_an_endpoint() {
        let config = TracingConfig::from_env(&Env::from_pairs::<&str, &str>([]), "svc").unwrap();
        assert_eq!(config.endpoint, None);
        assert_eq!(
            config.sampler,
            SamplerConfig::ParentBased(Box::new(SamplerConfig::AlwaysOn))
        );
        assert!(tracer_provider(&config).unwrap().is_none());
    }

    #[test]
    fn reads_the_standard_variables() {
        let env = Env::from_pairs([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4317"),
            ("OTEL_SERVICE_NAME", "ingest-eu"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, team=markets",
            ),
        ]);
        let config = TracingConfig::from_env(&env, "ingest").unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://jaeger:4317"));
        assert_eq!(config.service_name, "ingest-eu");
        assert_eq!(
            config.sampler,
            SamplerConfig::ParentBased(Box::new(SamplerConfig::Ratio(0.01)))
        );
        assert_eq!(config.resource_attributes.len(), 2);
        let bad = Env::from_pairs([("OTEL_TRACES_SAMPLER", "sometimes")]);
        assert_eq!(
            TracingConfig::from_env(&bad, "x").unwrap_err().variable,
            "OTEL_TRACES_SAMPLER"
        );
        let bad = Env::from_pairs([
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]);
        assert_eq!(
            TracingConfig::from_env(&bad, "x").unwrap_err().variable,
            "OTEL_TRACES_SAMPLER_ARG"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let ts = timestamp();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(
            ts.starts_with("20") && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }

    #[test]
    fn json_logs_carry_the_trace_and_span_ids_inside_traced_spans() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonWithTrace)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(outside = 1, "before any span");
            let span = tracing::info_span!("process");
            crate::trace_context::stamp(&span);
            let _entered = span.enter();
            tracing::info!(count = 3, "inside");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "before any span");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["message"], "inside");
        assert_eq!(lines[1]["count"], 3);
        assert_eq!(lines[1]["span"], "process");
        let trace_id = lines[1]["trace_id"]
            .as_str()
            .expect("trace_id inside a span");
        assert_eq!(trace_id.len(), 32);
        assert_eq!(lines[1]["span_id"].as_str().unwrap().len(), 16);
    }
}
