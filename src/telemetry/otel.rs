//! OpenTelemetry over OTLP/HTTP (protobuf): traces from the `tracing` spans, and
//! the metrics of `/metrics` bridged into OTel instruments. Configured by the
//! standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `_TRACES_ENDPOINT` /
//! `_METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_HEADERS` (a secret), `_TIMEOUT`,
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` / `_ARG`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_BSP_*`.
//!
//! With no endpoint set nothing is built: no exporter, no layer, no thread.
//! Exports run on the SDK's background threads and go through the process's own
//! `reqwest` client on the Tokio runtime; a collector that is down or slow never
//! blocks a caller (full queues drop spans), and its failures are logged at most
//! once a minute and counted in `dwh_helper_otlp_export_failures_total`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use super::metrics::{bounds, metrics, FLUSH_DURATION, HTTP_DURATION, UPLOAD_DURATION, WINDOW_DURATION};

/// The duration histograms as OTel histograms (buckets and all), recorded by the
/// events beside the Prometheus ones: an observable bridge can carry only their
/// sums and counts. Set once the export runs.
static HISTOGRAMS: std::sync::OnceLock<
    std::collections::HashMap<&'static str, opentelemetry::metrics::Histogram<f64>>,
> = std::sync::OnceLock::new();

/// Records `seconds` in histogram `name` (a `*_DURATION` name) when exporting.
pub fn record(name: &str, labels: &[(&'static str, String)], seconds: f64) {
    if let Some(histogram) = HISTOGRAMS.get().and_then(|h| h.get(name)) {
        let attributes: Vec<KeyValue> = labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
        histogram.record(seconds, &attributes);
    }
}

/// The variables that turn the export on.
const ENDPOINTS: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
];

/// Why the OpenTelemetry export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL: \"{0}\" is not supported; use http/protobuf")]
    Protocol(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Whether an OTLP endpoint is configured.
pub fn configured() -> bool {
    ENDPOINTS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
}

/// The running export; flushes and stops on drop.
#[allow(missing_debug_implementations)]
pub struct Otel {
    pub tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
}

impl Drop for Otel {
    fn drop(&mut self) {
        let _ = self.tracer_provider.shutdown();
        let _ = self.meter_provider.shutdown();
    }
}

/// Builds the exporters when an endpoint is configured; `None` otherwise.
/// Call from inside the Tokio runtime the exports will use.
pub fn start() -> Result<Option<Otel>, OtelError> {
    if !configured() {
        return Ok(None);
    }
    for variable in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ] {
        if let Ok(protocol) = std::env::var(variable) {
            if !protocol.trim().is_empty() && protocol.trim() != "http/protobuf" {
                return Err(OtelError::Protocol(protocol));
            }
        }
    }
    let client = TokioHttp {
        client: reqwest::Client::new(),
        runtime: tokio::runtime::Handle::current(),
    };
    let resource = resource();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client.clone())
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let points = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client)
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let meter_provider = SdkMeterProvider::builder()
        .with_periodic_exporter(points)
        .with_resource(resource)
        .build();
    let meter = meter_provider.meter("dwh-helper");
    let histograms = [FLUSH_DURATION, HTTP_DURATION, UPLOAD_DURATION, WINDOW_DURATION]
        .into_iter()
        .map(|h| {
            let instrument = meter
                .f64_histogram(h.0)
                .with_unit("s")
                .with_boundaries(bounds(h))
                .build();
            (h.0, instrument)
        })
        .collect();
    let _ = HISTOGRAMS.set(histograms);
    bridge(meter);
    Ok(Some(Otel {
        tracer_provider,
        meter_provider,
    }))
}

/// The service's resource: `OTEL_SERVICE_NAME` (default `dwh-helper`),
/// `OTEL_RESOURCE_ATTRIBUTES`, and the version.
fn resource() -> Resource {
    let mut builder = Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        builder = builder.with_service_name("dwh-helper");
    }
    builder.build()
}

/// OTLP requests through the process's `reqwest` client, run on the Tokio
/// runtime (the SDK's export threads have none of their own).
#[derive(Debug, Clone)]
struct TokioHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

/// Milliseconds since the epoch of the last warning about a failed export.
static LAST_WARNING: AtomicI64 = AtomicI64::new(0);
const WARN_EVERY: Duration = Duration::from_secs(60);

fn export_failed(endpoint: &str, why: &str) {
    metrics().otlp_failures.get_or_create(&Vec::new()).inc();
    let now = chrono::Utc::now().timestamp_millis();
    let last = LAST_WARNING.load(Ordering::Relaxed);
    if now - last >= WARN_EVERY.as_millis() as i64
        && LAST_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            event = "otlp_export_failed",
            endpoint,
            error = why,
            "OTLP export failed; the data is dropped (warned at most once a minute, counted in dwh_helper_otlp_export_failures_total)"
        );
    }
}

#[async_trait::async_trait]
impl HttpClient for TokioHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let endpoint = format!(
            "{}{}",
            request.uri().authority().map(|a| a.as_str()).unwrap_or_default(),
            request.uri().path()
        );
        let (parts, body) = request.into_parts();
        let task = self.runtime.spawn(async move {
            let mut builder = client.request(parts.method, parts.uri.to_string()).body(body);
            for (name, value) in &parts.headers {
                builder = builder.header(name, value);
            }
            let response = builder.timeout(Duration::from_secs(10)).send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut answer = Response::builder().status(status);
            for (name, value) in &headers {
                answer = answer.header(name, value);
            }
            Ok::<_, reqwest::Error>(answer.body(body))
        });
        let outcome = match task.await {
            Ok(Ok(Ok(response))) => {
                if !response.status().is_success() {
                    export_failed(&endpoint, &format!("HTTP {}", response.status()));
                }
                return Ok(response);
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.without_url().to_string(),
            Err(e) => e.to_string(),
        };
        export_failed(&endpoint, &outcome);
        Err(outcome.into())
    }
}

/// The metrics of `/metrics` as OTel observable instruments: counters and gauges
/// by name and labels (the histograms are recorded directly). One registry
/// serves both exports; each collection reads one exposition. A family appears
/// in the exposition once it has a series, so a task looks for new ones every
/// second and bridges them.
fn bridge(meter: opentelemetry::metrics::Meter) {
    let cache: Arc<Mutex<(Instant, Vec<Sample>)>> = Arc::new(Mutex::new((Instant::now(), Vec::new())));
    let read = Arc::new(move |name: &str| -> Vec<Sample> {
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.1.is_empty() || cache.0.elapsed() > Duration::from_millis(500) {
            *cache = (Instant::now(), parse(&metrics().encode()));
        }
        cache.1.iter().filter(|s| s.name == name).cloned().collect()
    });
    tokio::spawn(async move {
        let mut known = std::collections::HashSet::new();
        loop {
            for (name, kind) in families(&metrics().encode()) {
                if known.insert(name.clone()) {
                    instrument(&meter, &name, kind, read.clone());
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

type Reader = Arc<dyn Fn(&str) -> Vec<Sample> + Send + Sync>;

/// The observable instrument(s) of one family.
fn instrument(meter: &opentelemetry::metrics::Meter, name: &str, kind: Kind, read: Reader) {
    let attributes = |s: &Sample| -> Vec<KeyValue> {
        s.labels
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect()
    };
    let counter = |sample: String, read: Reader| {
        meter
            .f64_observable_counter(sample.clone())
            .with_callback(move |o| {
                for s in read(&sample) {
                    o.observe(s.value, &attributes(&s));
                }
            })
            .build();
    };
    match kind {
        Kind::Counter => counter(format!("{name}_total"), read),
        // Recorded as OTel histograms by the events (see `record`).
        Kind::Histogram => {}
        Kind::Gauge => {
            let sample = name.to_owned();
            meter
                .f64_observable_gauge(sample.clone())
                .with_callback(move |o| {
                    for s in read(&sample) {
                        o.observe(s.value, &attributes(&s));
                    }
                })
                .build();
        }
    }
}

/// The families of an exposition, from its `# TYPE` lines (info metrics left out).
fn families(text: &str) -> Vec<(String, Kind)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            let kind = match kind.trim() {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                _ => return None,
            };
            Some((name.to_owned(), kind))
        })
        .collect()
}

/// What a metric family is, for the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One sample line of the exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Samples of a Prometheus text exposition (as this process writes it: escaped
/// quotes and backslashes in label values, braces allowed inside them).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)?),
            };
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// `a="x",b="y\"z"` → pairs, honouring escapes inside the quotes.
fn labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return Some(pairs);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        pairs.push((key.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_read_back_with_its_labels() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    dwh_helper_rows_inserted_total{table=\"user_locations\"} 300\n\
                    dwh_helper_http_requests_total{route=\"/dwh/{table}\",method=\"GET\",status=\"200\"} 2\n\
                    dwh_helper_uptime_seconds 1.5\n\
                    odd{v=\"a\\\"b,c\"} 1\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 4);
        assert_eq!(
            samples[0].labels,
            vec![("table".to_owned(), "user_locations".to_owned())]
        );
        assert_eq!(samples[0].value, 300.0);
        assert_eq!(samples[1].labels[0], ("route".to_owned(), "/dwh/{table}".to_owned()));
        assert_eq!(samples[1].labels[2], ("status".to_owned(), "200".to_owned()));
        assert_eq!(samples[2].labels, Vec::new());
        assert_eq!(samples[3].labels, vec![("v".to_owned(), "a\"b,c".to_owned())]);
    }
}
