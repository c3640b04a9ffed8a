//! A local OTLP/HTTP protobuf receiver: decodes what a collector would get, with
//! `opentelemetry-proto`'s message types.

/// A metric data point: name, attributes, value.
pub type Point = (String, Vec<(String, String)>, f64);

/// What an OTLP/HTTP receiver got, decoded as a collector would.
#[derive(Default)]
pub struct Received {
    pub spans: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
    pub service_names: Vec<String>,
    pub environments: Vec<String>,
    /// `(metric name, attributes, value)` of every number data point.
    pub points: Vec<Point>,
    pub headers: Vec<(String, String)>,
    /// `(metric name, attributes, count)` of every histogram data point.
    pub histograms: Vec<Point>,
}

pub fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

pub fn attributes(kv: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<(String, String)> {
    kv.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

/// A local OTLP/HTTP protobuf receiver on a free port.
pub async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Received>>) {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
    use prost::Message as _;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Received::default()));
    let headers_of = |headers: &HeaderMap| -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect()
    };
    let traces = {
        let received = received.clone();
        move |headers: HeaderMap, body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf traces");
            let mut r = received.lock().expect("lock");
            r.headers.extend(headers_of(&headers));
            for resource in request.resource_spans {
                if let Some(res) = &resource.resource {
                    for (k, v) in attributes(&res.attributes) {
                        match k.as_str() {
                            "service.name" => r.service_names.push(v),
                            "deployment.environment" => r.environments.push(v),
                            _ => {}
                        }
                    }
                }
                for scope in resource.scope_spans {
                    r.spans.extend(scope.spans);
                }
            }
            ""
        }
    };
    let metrics = {
        let received = received.clone();
        move |body: Bytes| async move {
            let request = ExportMetricsServiceRequest::decode(body).expect("OTLP protobuf metrics");
            let mut r = received.lock().expect("lock");
            for resource in request.resource_metrics {
                for scope in resource.scope_metrics {
                    for metric in scope.metrics {
                        let points = match metric.data {
                            Some(Data::Sum(sum)) => sum.data_points,
                            Some(Data::Gauge(gauge)) => gauge.data_points,
                            Some(Data::Histogram(histogram)) => {
                                for p in histogram.data_points {
                                    r.histograms
                                        .push((metric.name.clone(), attributes(&p.attributes), p.count as f64));
                                }
                                Vec::new()
                            }
                            _ => Vec::new(),
                        };
                        for p in points {
                            let value = match p.value {
                                Some(number_data_point::Value::AsDouble(v)) => v,
                                Some(number_data_point::Value::AsInt(v)) => v as f64,
                                None => continue,
                            };
                            r.points.push((metric.name.clone(), attributes(&p.attributes), value));
                        }
                    }
                }
            }
            ""
        }
    };
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .route("/v1/metrics", axum::routing::post(metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, received)
}

pub fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}
