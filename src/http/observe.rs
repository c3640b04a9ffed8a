//! `GET /metrics` (OpenMetrics text), `GET /status` (the report of
//! [`crate::status::report`] as JSON), and the middleware that measures every request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use super::error::Unauthorized;
use super::AppState;
use crate::status::report::{self, State as Verdict};
use crate::telemetry::events::HttpRequestServed;
use crate::telemetry::metrics::metrics;
use crate::telemetry::Event as _;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(scrape).layer(tower_http::compression::CompressionLayer::new().gzip(true)))
        .routes(routes!(status).layer(tower_http::compression::CompressionLayer::new().gzip(true)))
}

/// What the body of `/metrics` is: OpenMetrics 1.0 text (`# EOF`, counters
/// named without `_total`, their samples with it), which Prometheus reads by
/// this content type.
pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics, in the OpenMetrics text format (README "Monitoring" lists them).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics 1.0 text", content_type = "application/openmetrics-text", body = String),
        Unauthorized,
    ),
    security(("bearer" = [])))]
pub(super) async fn scrape() -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics().encode()).into_response()
}

/// The report; 503 when the verdict is `failing`, so a probe can act on the code.
#[utoipa::path(get, path = "/status", tag = "operations",
    responses(
        (status = 200, description = "Caught up or lagging: where every table and partition stands", body = report::Report),
        Unauthorized,
        (status = 503, description = "Failing: the same report, its verdict says why", body = report::Report),
    ),
    security(("bearer" = [])))]
async fn status(State(state): State<AppState>) -> Response {
    let report = report::gather(&state.config, &state.dwh, state.ingest.as_deref()).await;
    let code = if report.verdict.state == Verdict::Failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(report)).into_response()
}

/// Counts and times each request by route template (never the raw path), method
/// and status.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let response = {
        let _serving = InFlight::enter();
        next.run(request).await
    };
    HttpRequestServed {
        route: &route,
        method: &method,
        status: response.status().as_u16(),
        took: started.elapsed(),
    }
    .emit();
    response
}

/// The span of one request: method and route template (never the raw path),
/// the status once answered, and the trace id for its log lines.
pub fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    crate::telemetry::traced(tracing::info_span!(
        target: "dwh_helper::http",
        "http_request",
        method = %request.method(),
        route,
        status = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    ))
}

pub fn record_status<B>(response: &axum::http::Response<B>, _latency: std::time::Duration, span: &tracing::Span) {
    span.record("status", response.status().as_u16());
}

/// Counts a request in flight until dropped (also when the client goes away).
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics().http_in_flight.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().http_in_flight.dec();
    }
}
