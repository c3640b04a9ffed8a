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
pub mod s3;
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
        .merge(openapi::router(openapi::finish(api)))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
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

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes the
/// requests in flight.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
