//! `/health/live` (the process answers) and `/health/ready` (the DWH answers too).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if let Some(failing) = state.ingest.as_ref().and_then(|s| s.failing()) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("DWH writes failing: {failing}"),
        ));
    }
    let ping = state.dwh.ping(state.ready_timeout).await;
    crate::telemetry::metrics::metrics()
        .dwh_up
        .get_or_create(&Vec::new())
        .set(i64::from(ping.is_ok()));
    match ping {
        Ok(()) => Ok(Json(json!({ "status": "ok" }))),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}
