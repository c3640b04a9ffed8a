//! The HTTP API (axum): tables, S3, health, metrics and status.
//!
//! Guarantees: every error is a JSON body `{"error": "..."}` with a fitting status;
//! when an API token is configured every route but `/health/*`, `/openapi.json` and
//! `/docs` requires it; request bodies over `HTTP_MAX_BODY_BYTES` get 413. The
//! OpenAPI document is built from the handlers' annotations (`openapi.rs`).

mod auth;
mod error;
mod health;
mod observe;
pub mod openapi;
mod paths;
pub mod s3;
mod schema;
pub mod tables;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

use crate::config::{Config, Secret};
use crate::ingest::IngestStatus;
use crate::store::Dwh;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub dwh: Dwh,
    pub api_token: Option<Arc<Secret>>,
    pub ready_timeout: Duration,
    /// Set when this process ingests: readiness reports failing DWH writes.
    pub ingest: Option<Arc<IngestStatus>>,
    /// The object store, when one is configured.
    pub s3: Option<crate::s3::S3>,
    /// What `GET /status` reads the broker and the DWH with.
    pub config: Arc<Config>,
    /// Permits for `POST /dwh/{table}` (HTTP_TABLES_MAX_CONCURRENT_WRITES).
    pub table_writes: Arc<tokio::sync::Semaphore>,
    /// The published schemas, compiled: what `POST /dwh` and the filters take.
    pub validators: Arc<validate::Validators>,
}

impl AppState {
    pub fn new(dwh: Dwh, config: &Config) -> Self {
        AppState {
            dwh,
            api_token: config.http.api_token.clone().map(Arc::new),
            ready_timeout: Duration::from_secs(2),
            ingest: None,
            s3: None,
            config: Arc::new(config.clone()),
            table_writes: Arc::new(tokio::sync::Semaphore::new(config.http.tables_max_concurrent_writes)),
            validators: Arc::new(validate::Validators::new(&config.dwh.events_window)),
        }
    }
}

/// The whole API, and its OpenAPI document.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    if let Some(token) = &state.api_token {
        let length = token.expose().chars().count();
        if length < 32 {
            tracing::warn!(
                length,
                "HTTP_API_TOKEN is short: use 32 characters or more (for example `openssl rand -hex 32`)"
            );
        }
    }
    let protected = OpenApiRouter::new()
        .merge(tables::router())
        .merge(s3::router())
        .merge(observe::router())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    let (routes, api) = OpenApiRouter::with_openapi(openapi::base())
        .merge(health::router())
        .merge(protected)
        .split_for_parts();
    let open = state.api_token.is_none();
    let router = Router::new()
        .merge(routes)
        .merge(openapi::router(openapi::finish(api, &state.config.dwh.events_window)))
        .fallback(error::not_found)
        .method_not_allowed_fallback(auth::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), deadline))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(observe::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(observe::request_span)
                .on_response(observe::record_status)
                // A 5xx is the handler's to log (with its cause), not an error
                // line of its own: a documented 503 is not a fault.
                .on_failure(()),
        );
    let router = match open {
        true => router.layer(axum::middleware::from_fn(auth::loopback_only)),
        false => router,
    };
    router.with_state(state)
}

/// The operations listener's routes (`HTTP_OPS_BIND`): `/health/live`,
/// `/health/ready` and `/metrics`, with no token (kubelet probes and
/// Prometheus scrapes carry none), and nothing else: the data stays behind
/// the API's token on its own listener.
pub fn ops_router(state: AppState) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route(
            "/metrics",
            get(observe::scrape).layer(tower_http::compression::CompressionLayer::new().gzip(true)),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(auth::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), deadline))
        .layer(axum::middleware::from_fn(observe::track))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes the
/// requests in flight. At most `max_connections` are served at once (more wait in
/// the listen backlog), and one that has not sent a whole request head within
/// `header_read_timeout` is closed: idle or stalled clients can neither exhaust
/// the file descriptors nor hold up a shutdown.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: crate::config::HttpConfig,
) -> std::io::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore stays open"),
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: wait, rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// 503 for a request (transfers excepted) not answered within
/// `HTTP_REQUEST_TIMEOUT_SECONDS`; its work is dropped (a write rolls back).
async fn deadline(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    const TRANSFERS: [&str; 4] = ["/s3/upload", "/s3/update", "/s3/download", "/s3/patch"];
    if TRANSFERS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let limit = state.config.http.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took over {} s (HTTP_REQUEST_TIMEOUT_SECONDS) and was given up",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}
