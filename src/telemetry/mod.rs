//! Telemetry: logging, metrics and OpenTelemetry, on the ground floor (it uses
//! nothing of the application but the configuration and the catalogue's table
//! names).
//!
//! Logging: `tracing` to stderr, human-readable (`LOG_FORMAT=pretty`) or one JSON
//! object per line for log shippers (`LOG_FORMAT=json`), filtered by `LOG_LEVEL`.
//! Metrics: [`metrics`] (the registry behind `/metrics`), updated by the named
//! [`events`] (each an [`event::Event`]) and by the lag loop of
//! `status::lag`.

pub mod event;
pub mod events;
pub mod metrics;
pub mod otel;

pub use event::Event;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{Config, LogConfig, LogFormat};

/// Sets up logging, the metrics' label choice and, when an OTLP endpoint is
/// configured, the OpenTelemetry export (call inside the Tokio runtime). The
/// returned handle flushes the export when dropped.
pub fn init_all(config: &Config) -> Result<Option<otel::Otel>, otel::OtelError> {
    metrics::configure(config.metrics.partition_labels);
    let otel = otel::start()?;
    // KAFKA_LIBRDKAFKA_DEBUG asks for librdkafka's debug lines: shown whatever
    // LOG_LEVEL says of the rest.
    install(&config.log, otel.as_ref(), config.kafka.librdkafka_debug());
    Ok(otel)
}

/// Installs the global subscriber: the log lines, and the spans to OTLP when
/// `otel` is running. The level was validated with the configuration. Log lines
/// inside a span show its fields, its `trace_id` among them (see [`traced`]).
pub fn init(config: &LogConfig, otel: Option<&otel::Otel>) {
    install(config, otel, false);
}

fn install(config: &LogConfig, otel: Option<&otel::Otel>, librdkafka_debug: bool) {
    let mut filter = EnvFilter::builder()
        .parse(&config.level)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if librdkafka_debug {
        if let Ok(directive) = "librdkafka=debug".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = match config.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let spans = otel.map(|o| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(o.tracer_provider.tracer("dwh-helper"))
    });
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(spans)
        .with(lines)
        .try_init();
}

/// Records the OpenTelemetry trace id in `span`'s `trace_id` field (declared
/// `trace_id = tracing::field::Empty`), so that log lines inside it carry it.
/// Without an export there is no trace id and the field stays empty.
/// This machine's name, for naming an instance to people.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub fn traced(span: tracing::Span) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    let trace = context.span().span_context().trace_id();
    if trace != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace));
    }
    span
}
