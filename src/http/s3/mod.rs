//! `/s3/*`: the bucket over HTTP, as the seed service served it.
//!
//! Guarantees: uploads and downloads stream (memory stays around one multipart
//! part whatever the file size); keys are checked first (empty, over 1,024 bytes
//! or not UTF-8 → 400); a missing object is 404, a store that cannot be reached is
//! 503, a patch that lost a race is 409; every error is JSON.

mod lifecycle;
mod list;
mod objects;
mod upload;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use super::error::{ErrorBody, Unauthorized};
use super::{ApiError, AppState};
use crate::s3::{ExpirationRule, S3Error, MAX_KEY_BYTES, S3};

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// The answers every bucket route may give besides its own and
/// [`Unauthorized`] (for the OpenAPI document; the handlers answer with
/// [`ApiError`]).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
enum StoreFailures {
    #[response(status = 502, description = "The object store refused")]
    Refused(ErrorBody),
    #[response(status = 503, description = "No object store configured, or it cannot be reached")]
    Unavailable(ErrorBody),
}

/// The answers of a route that reads one object, besides [`StoreFailures`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
enum ReadFailures {
    #[response(status = 400, description = "The key is missing or invalid")]
    BadKey(ErrorBody),
    #[response(status = 403, description = "The key is outside S3_API_PREFIX")]
    Outside(ErrorBody),
    #[response(status = 404, description = "No such object")]
    Missing(ErrorBody),
}

pub fn router() -> OpenApiRouter<AppState> {
    // Uploads stream to the store: no body limit. Patches are held in memory and
    // keep the API's limit.
    OpenApiRouter::new()
        .routes(routes!(list::list).layer(tower_http::compression::CompressionLayer::new().gzip(true)))
        .routes(routes!(objects::info))
        .routes(routes!(objects::download))
        .routes(routes!(upload::upload).layer(DefaultBodyLimit::disable()))
        .routes(routes!(upload::update).layer(DefaultBodyLimit::disable()))
        .routes(routes!(upload::patch_object))
        .routes(routes!(objects::delete_object))
        .routes(routes!(
            lifecycle::lifecycle,
            lifecycle::set_lifecycle,
            lifecycle::delete_lifecycle
        ))
}

/// `GET /s3/objects`: a page of the listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct ObjectPage {
    pub prefix: String,
    /// `newest`: newest first, then by key. `key`: by key.
    pub order: Order,
    /// In `newest` order, every folder directly under the prefix; in `key`
    /// order, those of this page.
    pub objects: Vec<crate::s3::ObjectSummary>,
    /// The "folders" directly under the prefix.
    pub folders: Vec<String>,
    /// Objects on this page.
    pub count: usize,
    /// `newest` order: the objects listed under the prefix (all of them unless
    /// `truncated`). `key` order: null (one LIST request cannot count them).
    pub total: Option<usize>,
    /// `newest` order only: the prefix holds more than the scan limit
    /// (`S3_LIST_SCAN_LIMIT` objects and folders), so the listing covers the
    /// first that many in key order, sorted newest first. Use `order=key` to
    /// reach every object.
    pub truncated: bool,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Newest first, then by key, from a scan of up to `S3_LIST_SCAN_LIMIT`
    /// entries.
    Newest,
    /// By key; each page is one LIST request, whatever the prefix holds.
    Key,
}

/// An object written.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rules {
    pub rules: Vec<ExpirationRule>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RulesRemoved {
    pub removed: usize,
    pub prefix: String,
}

/// The `key` query parameter: 1 to 1,024 bytes of UTF-8.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct KeyParam {
    /// The object's key
    #[param(
        min_length = 1,
        max_length = 1024,
        pattern = "[^\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
    )]
    key: String,
}

impl From<S3Error> for ApiError {
    fn from(e: S3Error) -> Self {
        let status = match &e {
            S3Error::NotFound { .. } => StatusCode::NOT_FOUND,
            S3Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            S3Error::Conflict { .. } | S3Error::PastTheEnd { .. } => StatusCode::CONFLICT,
            S3Error::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            S3Error::Unreachable { .. } | S3Error::BucketMissing { .. } => StatusCode::SERVICE_UNAVAILABLE,
            S3Error::AccessDenied { .. } | S3Error::Other { .. } => StatusCode::BAD_GATEWAY,
        };
        // The store's own error (the SDK's chain, hosts, request ids) is logged;
        // the client gets what it can act on.
        let message = match &e {
            S3Error::Unreachable { .. } => "object store unreachable, try again later".to_owned(),
            S3Error::AccessDenied { .. } => "the object store denied access".to_owned(),
            S3Error::Other { code, .. } => format!("the object store refused the request ({code})"),
            _ => e.to_string(),
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "object store request failed");
        }
        ApiError::new(status, message)
    }
}

/// The query parameters, percent-decoded; a value that is not UTF-8 is kept as
/// an error to report when that parameter is used.
struct Params(Vec<(String, Result<String, ()>)>);

impl Params {
    fn parse(raw: Option<String>) -> Params {
        let raw = raw.unwrap_or_default();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ())
        };
        Params(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(name).unwrap_or_default(), decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Ok(value))) => Ok(Some(value)),
            Some((_, Err(()))) => Err(ApiError::bad_request(format!("{name} is not valid UTF-8"))),
        }
    }

    /// The `key` parameter, checked as S3 would.
    fn key(&self) -> Result<String, ApiError> {
        let key = self
            .get("key")?
            .ok_or_else(|| ApiError::bad_request("key is required"))?;
        if key.is_empty() {
            return Err(ApiError::bad_request("key must not be empty"));
        }
        // The S3 client takes a key of white space alone for no key at all.
        if key.trim().is_empty() {
            return Err(ApiError::bad_request("key must not be white space alone"));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(format!(
                "key is {} bytes, over the limit of {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        Ok(key.to_owned())
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)?
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("{name} must be a non-negative integer, got \"{v}\"")))
            })
            .transpose()
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn store(state: &AppState) -> Result<&S3, ApiError> {
    state.s3.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no object store configured (set S3_ENDPOINT_URL or S3_ACCESS_KEY_ID)",
        )
    })
}

/// 403 for a change to the archive: its objects are the archive role's, and
/// `archive restore` republishes what it finds there.
fn archive_refusal(archive: &str, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "{what} {archive} is refused: the archive (S3_ARCHIVE_PREFIX) belongs to the archive role, and \
             `archive restore` republishes what it holds"
        ),
    )
}

/// `what` (a key or prefix), refused outside `S3_API_PREFIX` when that is set.
fn confined<'a>(state: &AppState, what: &'a str, doing: &str) -> Result<&'a str, ApiError> {
    match &state.config.s3.api_prefix {
        Some(api) if !what.starts_with(api.as_str()) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{doing} \"{what}\" is refused: the API reaches only keys under \"{api}\" (S3_API_PREFIX)"),
        )),
        _ => Ok(what),
    }
}

/// The key of a read, refused outside `S3_API_PREFIX`.
fn readable_key(state: &AppState, params: &Params) -> Result<String, ApiError> {
    let key = params.key()?;
    confined(state, &key, "reading")?;
    Ok(key)
}

/// The key of a write or delete, refused outside `S3_API_PREFIX` and under the
/// archive prefix.
fn writable_key(state: &AppState, params: &Params) -> Result<String, ApiError> {
    let key = params.key()?;
    confined(state, &key, "writing or deleting")?;
    let archive = format!("{}/", state.config.s3.archive_prefix);
    if key.starts_with(&archive) {
        return Err(archive_refusal(
            &archive,
            &format!("writing or deleting \"{key}\" under"),
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_before_any_request() {
        let key = |q: &str| Params::parse(Some(q.to_owned())).key().map_err(|e| e.message);
        assert_eq!(key("key=data%2Ffile.csv"), Ok("data/file.csv".to_owned()));
        assert_eq!(key("key=a+b"), Ok("a b".to_owned()));
        assert_eq!(key("key="), Err("key must not be empty".to_owned()));
        assert_eq!(key("prefix=x"), Err("key is required".to_owned()));
        for blank in ["+", "%0A", "%C2%85", "%E3%80%80%09"] {
            assert_eq!(
                key(&format!("key={blank}")),
                Err("key must not be white space alone".to_owned()),
                "{blank}"
            );
        }
        assert_eq!(key("key=+a"), Ok(" a".to_owned()));
        assert_eq!(key("key=%FF%FE"), Err("key is not valid UTF-8".to_owned()));
        let long = format!("key={}", "k".repeat(1025));
        assert_eq!(key(&long), Err("key is 1025 bytes, over the limit of 1024".to_owned()));
        assert!(key(&format!("key={}", "k".repeat(1024))).is_ok());
    }
}
