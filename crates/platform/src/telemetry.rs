//! Logs and traces of a service process.
//!
//! Logs are structured (`text` or `json`); inside an RPC or a consumed
//! event they carry the span's `trace_id`, `span_id` and `request_id`.
//! Traces are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set (the standard `OTEL_*` variables tune the exporter and batching),
//! with the service's name and version as resource attributes.

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer as _, fmt, prelude::*};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps the trace exporter; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter (call before exit).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// The standard variable that turns trace export on (the manifests set
/// it; their test checks it is one the services read).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Installs the global subscriber (`RUST_LOG` filters, default `info`) and,
/// with `OTEL_EXPORTER_OTLP_ENDPOINT`, the OTLP trace exporter for
/// `service`. Call inside the tokio runtime. Does nothing when a subscriber
/// is installed already (tests start several services in one process).
pub fn init(format: LogFormat, service: &'static str) -> Telemetry {
    let endpoint = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.trim().is_empty());
    let provider = endpoint.and_then(|endpoint| match exporter(service) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("traces are not exported to {endpoint}: {e}");
            None
        }
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(EnvFilter::new(
                "info,h2=off,tower=off,hyper=off,tonic=off,async_nats=off",
            ))
    });
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,async_nats=warn"));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok();
    Telemetry {
        provider: if installed { provider } else { None },
    }
}

fn exporter(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(KeyValue::new("service.namespace", "gpualloc"));
    // OTEL_SERVICE_NAME, when set, wins (the SDK reads it).
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
