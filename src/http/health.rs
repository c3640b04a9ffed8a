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
async fn live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The DWH answers, and this instance's writes are not failing (no token needed).
/// The reason is short, as anyone may read it: the cause is logged, and in
/// `/status` behind the token.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: \"database unavailable\" or \"DWH writes failing\"", body = ErrorBody),
    ))]
async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if let Some(failing) = state.ingest.as_ref().and_then(|s| s.failing()) {
        tracing::debug!(cause = %failing, "not ready: DWH writes failing");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "DWH writes failing (the cause is in the log and in /status)",
        ));
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
