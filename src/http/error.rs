//! One error type for every handler: a status and a message a user can act on,
//! rendered as `{"error": "..."}`. Internal details are logged, never returned.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;

/// Every error's body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What is wrong, for a person.
    pub error: String,
}

/// The answer of every route behind the bearer token to a request without it
/// (for the OpenAPI document; [`super::auth`] answers it).
#[derive(utoipa::IntoResponses)]
#[response(status = 401, description = "No or wrong bearer token")]
#[allow(dead_code)] // a description of a response, never built
pub struct Unauthorized(ErrorBody);

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (a busy 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.message })).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "request failed: database unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable, try again later")
            }
            StoreError::Oversized(o) => ApiError::unprocessable(o.to_string()),
            // A row the database refuses (a constraint, a value out of range) is the
            // request's fault, and its message names what is wrong.
            StoreError::Refused(_) => ApiError::unprocessable(e.to_string()),
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // The rejection's status is right (400 syntax, 413 too large, 415 content
        // type, 422 shape); its text is turned into our JSON body.
        ApiError::new(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

/// 404 for paths no route matches.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}
