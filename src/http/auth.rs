//! Bearer-token check for the protected routes.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    let Some(expected) = &state.api_token else {
        return Ok(next.run(request).await);
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        // Constant-time comparison: response timing does not reveal the token.
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API token")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API token: send \"Authorization: Bearer <HTTP_API_TOKEN>\"",
        )),
    }
}
