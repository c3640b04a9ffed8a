//! `/health/live` (the process answers) and `/health/ready` (the DWH answers too).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The process answers (no token needed).
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub(super) async fn live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The DWH answers, and no table of this instance is failing (its DWH writes, or
/// its consumer's Kafka access: credentials, TLS, a permission) or stalled (the
/// watchdog: records wait and nothing lands). No token needed.
/// The reason names the tables and the kind of failure only, as anyone may read
/// it: the cause is logged, and in `/status` behind the token.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: \"database unavailable\" or \"tables failing: …\" (each with its kind: DWH writes, stopped, stalled, kafka authentication, kafka tls, kafka authorization, kafka unreadable records)", body = ErrorBody),
    ))]
pub(super) async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if let Some(ingest) = state.ingest.as_ref() {
        if let (Some(brief), Some(cause)) = (ingest.failing_brief(), ingest.failing()) {
            tracing::debug!(cause = %cause, "not ready: tables failing");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("tables failing: {brief} (the cause is in the log and in /status)"),
            ));
        }
    }
    let ping = state.dwh.ping(state.ready_timeout).await;
    crate::telemetry::metrics::metrics()
        .dwh_up
        .get_or_create(&Vec::new())
        .set(i64::from(ping.is_ok()));
    match ping {
        Ok(()) => Ok(Json(Health { status: "ok" })),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: database unavailable");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable"))
        }
    }
}
