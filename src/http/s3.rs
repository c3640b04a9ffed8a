//! `/s3/*`: the bucket over HTTP, as the seed service served it.
//!
//! Guarantees: uploads and downloads stream (memory stays around one multipart
//! part whatever the file size); keys are checked first (empty, over 1,024 bytes
//! or not UTF-8 → 400); a missing object is 404, a store that cannot be reached is
//! 503, a patch that lost a race is 409; every error is JSON.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::s3::{xml_char, ExpirationRule, ObjectInfo, S3Error, MANAGED_RULE_PREFIX, MAX_KEY_BYTES, S3};

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

pub fn router() -> OpenApiRouter<AppState> {
    // Uploads stream to the store: no body limit. Patches are held in memory and
    // keep the API's limit.
    OpenApiRouter::new()
        .routes(routes!(list).layer(tower_http::compression::CompressionLayer::new().gzip(true)))
        .routes(routes!(info))
        .routes(routes!(download))
        .routes(routes!(upload).layer(DefaultBodyLimit::disable()))
        .routes(routes!(update).layer(DefaultBodyLimit::disable()))
        .routes(routes!(patch_object))
        .routes(routes!(delete_object))
        .routes(routes!(lifecycle, set_lifecycle, delete_lifecycle))
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

/// `GET /s3/objects?prefix=&limit=&cursor=&order=`: the objects directly under
/// the prefix, a page at a time: newest first (from a bounded scan), or by key.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListParams {
    /// Only keys under this prefix (a "folder" ends with `/`); default: the
    /// whole bucket, or `S3_API_PREFIX` when set
    prefix: Option<String>,
    /// `newest` (default): newest first, among the first `S3_LIST_SCAN_LIMIT`
    /// entries of the prefix in key order. `key`: by key, one LIST request a
    /// page, every object reachable
    order: Option<Order>,
    /// Objects per page
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page
    #[param(pattern = "^-?[0-9]{1,18}:")]
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/s3/objects", tag = "s3", params(ListParams),
    responses(
        (status = 200, description = "A page of the objects under the prefix", body = ObjectPage),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The prefix is outside S3_API_PREFIX", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Json<ObjectPage>, ApiError> {
    let params = Params::parse(query);
    let prefix = match params.get("prefix")? {
        Some(prefix) => confined(&state, prefix, "listing")?.to_owned(),
        None => state.config.s3.api_prefix.clone().unwrap_or_default(),
    };
    let order = match params.get("order")? {
        None | Some("newest") => Order::Newest,
        Some("key") => Order::Key,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be \"newest\" or \"key\", got \"{other}\""
            )))
        }
    };
    let limit = params.number("limit")?.map_or(DEFAULT_LIMIT, |l| l as usize);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let cursor = params.get("cursor")?.map(Cursor::parse).transpose()?;
    let s3 = store(&state)?;
    if order == Order::Key {
        let page = s3
            .list_page(&prefix, cursor.as_ref().map(|c| c.key.as_str()), limit)
            .await?;
        // The cursor names the page's last entry; a folder has no time of its own.
        let next_cursor = page
            .next_after
            .map(|last| match page.objects.iter().find(|o| o.key == last) {
                Some(object) => Cursor::of(object).to_string(),
                None => Cursor { millis: 0, key: last }.to_string(),
            });
        return Ok(Json(ObjectPage {
            prefix,
            order,
            count: page.objects.len(),
            objects: page.objects,
            folders: page.folders,
            total: None,
            truncated: false,
            next_cursor,
        }));
    }
    let listing = s3.list_objects(&prefix, state.config.s3.list_scan_limit).await?;
    let start = match &cursor {
        None => 0,
        Some(cursor) => listing
            .objects
            .iter()
            .position(|o| cursor.precedes(o))
            .unwrap_or(listing.objects.len()),
    };
    let page: Vec<_> = listing.objects.iter().skip(start).take(limit).collect();
    let next_cursor = (start + page.len() < listing.objects.len())
        .then(|| page.last().map(|o| Cursor::of(o).to_string()))
        .flatten();
    Ok(Json(ObjectPage {
        prefix,
        order,
        count: page.len(),
        objects: page.into_iter().cloned().collect(),
        folders: listing.folders,
        total: Some(listing.objects.len()),
        truncated: listing.truncated,
        next_cursor,
    }))
}

/// The time of an object the store gave none, as a cursor can carry it (18 digits).
const NO_TIME: i64 = -999_999_999_999_999_999;

/// Where a page ended: the last entry's modification time and key. Newest
/// order resumes after both; key order after the key (a folder's time is 0).
struct Cursor {
    millis: i64,
    key: String,
}

impl Cursor {
    fn of(o: &crate::s3::ObjectSummary) -> Cursor {
        Cursor {
            millis: o.last_modified.map_or(NO_TIME, |t| t.timestamp_millis()),
            key: o.key.clone(),
        }
    }

    fn parse(text: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::bad_request(format!("cursor \"{text}\" is not one this API returned"));
        let (millis, key) = text.split_once(':').ok_or_else(bad)?;
        if millis.trim_start_matches('-').len() > 18 {
            return Err(bad());
        }
        Ok(Cursor {
            millis: millis.parse().map_err(|_| bad())?,
            key: key.to_owned(),
        })
    }

    /// Whether `o` comes after the cursor in the listing's order.
    fn precedes(&self, o: &crate::s3::ObjectSummary) -> bool {
        let millis = o.last_modified.map_or(NO_TIME, |t| t.timestamp_millis());
        millis < self.millis || (millis == self.millis && o.key > self.key)
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.millis, self.key)
    }
}

#[utoipa::path(get, path = "/s3/object-info", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "The object's size, type, time, ETag and metadata", body = ObjectInfo),
        (status = 400, description = "The key is missing or invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn info(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Json<ObjectInfo>, ApiError> {
    let key = readable_key(&state, &Params::parse(query))?;
    Ok(Json(store(&state)?.object_info(&key).await?))
}

#[utoipa::path(get, path = "/s3/download", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "The object's bytes, streamed, with the content type it was stored with", content_type = "*/*", body = String),
        (status = 400, description = "The key is missing or invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn download(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let key = readable_key(&state, &Params::parse(query))?;
    let download = store(&state)?.get_object(&key).await?;
    let info = download.info;
    let mut response = Body::from_stream(download.body).into_response();
    let headers = response.headers_mut();
    let content_type = info.content_type.as_deref().unwrap_or("application/octet-stream");
    if let Ok(value) = content_type.parse() {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, info.size.into());
    if let Some(etag) = info.etag.as_deref().and_then(|e| e.parse().ok()) {
        headers.insert(header::ETAG, etag);
    }
    // Always a download, never a page a browser renders in the API's origin.
    headers.insert(header::CONTENT_DISPOSITION, attachment(&key));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("sandbox"),
    );
    Ok(response)
}

/// `attachment` with the key's last segment as the file name (RFC 6266): an ASCII
/// `filename` for old clients and the exact UTF-8 name in `filename*`, valid
/// header text whatever the key holds.
fn attachment(key: &str) -> header::HeaderValue {
    /// RFC 5987 `attr-char`s stay; everything else is percent-encoded.
    const NOT_ATTR_CHAR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'!')
        .remove(b'#')
        .remove(b'$')
        .remove(b'&')
        .remove(b'+')
        .remove(b'-')
        .remove(b'.')
        .remove(b'^')
        .remove(b'_')
        .remove(b'`')
        .remove(b'|')
        .remove(b'~');
    let name = key.rsplit('/').find(|s| !s.is_empty()).unwrap_or("download");
    let ascii: String = name
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' && c != '%' => c,
            _ => '_',
        })
        .collect();
    let exact = percent_encoding::utf8_percent_encode(name, NOT_ATTR_CHAR);
    header::HeaderValue::from_str(&format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{exact}"))
        .unwrap_or_else(|_| header::HeaderValue::from_static("attachment"))
}

/// The upload form: one field, `file`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct UploadForm {
    /// The file's bytes
    #[schema(format = Binary)]
    file: String,
}

/// `POST /s3/upload?key=` with a multipart/form-data field `file`.
#[utoipa::path(post, path = "/s3/upload", tag = "s3", params(KeyParam),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored (a file of any size streams to the store)", body = Written),
        (status = 413, description = "The file is over S3_MAX_UPLOAD_BYTES, or the form holds over 64 KiB before it; nothing is stored", body = ErrorBody),
        (status = 400, description = "The key is invalid, or the form is not one field \"file\"; nothing is stored", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn upload(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let key = writable_key(&state, &Params::parse(query))?;
    let s3 = store(&state)?;
    // The form may add up to FORM_PREAMBLE_BYTES of its own to the file.
    let meter = Meter::new(
        state.config.s3.max_upload_bytes + FORM_PREAMBLE_BYTES,
        Some(FORM_PREAMBLE_BYTES),
    );
    meter.refuse_announced(&headers)?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok())
        .ok_or_else(|| ApiError::bad_request("expected multipart/form-data with a boundary"))?;
    let mut form = multer::Multipart::new(meter.body(body), boundary);
    let field = match form.next_field().await.map_err(|e| meter.verdict(malformed(e)))? {
        Some(field) if field.name() == Some("file") => field,
        Some(other) => return Err(unexpected_field(other.name())),
        None => return Err(ApiError::bad_request("the form has no field \"file\"")),
    };
    meter.file_started.store(true, Ordering::Relaxed);
    let content_type = field.content_type().map(|m| m.to_string());
    let written = store_body(s3, key, file_then_end(field, form), content_type, &headers, &meter).await?;
    Ok((StatusCode::CREATED, Json(written)))
}

/// Streams `body` to `key`, then checks that the store holds what was written.
async fn store_body<S, E>(
    s3: &S3,
    key: String,
    body: S,
    content_type: Option<String>,
    headers: &HeaderMap,
    meter: &Meter,
) -> Result<Written, ApiError>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    // The request's length bounds the body's: a large one goes multipart at once.
    let stored = s3
        .put_object(&key, body, content_type.as_deref(), &[], content_length(headers))
        .await
        .map_err(|e| meter.verdict(e.into()))?;
    let info = stored_as_sent(s3, &key, &stored).await?;
    Ok(Written {
        key,
        size: stored.size,
        etag: info.etag,
        content_type: info.content_type,
    })
}

/// The object as the store now holds it, checked against what the write stored:
/// the same size and ETag, or 502 (another writer got in between, or the store
/// lost the write), so that a 2xx always means these bytes are there.
async fn stored_as_sent(s3: &S3, key: &str, stored: &crate::s3::Stored) -> Result<ObjectInfo, ApiError> {
    let info = s3.object_info(key).await?;
    let bare = |etag: &str| etag.trim_start_matches("W/").trim_matches('"').to_owned();
    let etag_differs = matches!((&stored.etag, &info.etag), (Some(sent), Some(now)) if bare(sent) != bare(now));
    if info.size != stored.size || etag_differs {
        tracing::warn!(
            key,
            sent = stored.size,
            stored = info.size,
            sent_etag = ?stored.etag,
            stored_etag = ?info.etag,
            "the object store holds other bytes than were just written"
        );
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "the object store holds {} bytes at \"{key}\" after {} were written (or another ETag): \
                 another writer, or a lost write; check the object",
                info.size, stored.size
            ),
        ));
    }
    Ok(info)
}

/// What may come before the form's `file` field: its own headers and nothing more.
const FORM_PREAMBLE_BYTES: u64 = 64 * 1024;

/// Counts an upload's bytes as they arrive. The body fails past `limit`, and, for
/// a form, past `preamble` bytes before its file starts; memory then holds at
/// most that plus one chunk, whatever the client sends or announces.
#[derive(Debug)]
struct Meter {
    limit: u64,
    preamble: Option<u64>,
    total: AtomicU64,
    file_started: AtomicBool,
    over: OnceLock<String>,
}

impl Meter {
    fn new(limit: u64, preamble: Option<u64>) -> Arc<Meter> {
        Arc::new(Meter {
            limit,
            preamble,
            total: AtomicU64::new(0),
            file_started: AtomicBool::new(preamble.is_none()),
            over: OnceLock::new(),
        })
    }

    /// 413 at once for a body announced over the limit: never read, never sized from.
    fn refuse_announced(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match content_length(headers) {
            Some(announced) if announced > self.limit => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is {announced} bytes, over the upload limit of {} (S3_MAX_UPLOAD_BYTES); nothing was stored",
                    self.limit
                ),
            )),
            _ => Ok(()),
        }
    }

    fn body(
        self: &Arc<Self>,
        body: Body,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let meter = Arc::clone(self);
        body.into_data_stream().map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            let before = meter.total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let Some(preamble) = meter.preamble {
                if before >= preamble && !meter.file_started.load(Ordering::Relaxed) {
                    return Err(meter.refuse(format!(
                        "the form holds over {preamble} bytes before its file field; nothing was stored"
                    )));
                }
            }
            if before + chunk.len() as u64 > meter.limit {
                return Err(meter.refuse(format!(
                    "the body is over the upload limit of {} bytes (S3_MAX_UPLOAD_BYTES); nothing was stored",
                    meter.limit
                )));
            }
            Ok(chunk)
        })
    }

    fn refuse(&self, why: String) -> std::io::Error {
        let _ = self.over.set(why.clone());
        std::io::Error::other(why)
    }

    /// 413 with the reason when the body went over a limit; otherwise `error`.
    fn verdict(&self, error: ApiError) -> ApiError {
        match self.over.get() {
            Some(why) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why.clone()),
            None => error,
        }
    }
}

fn malformed(e: multer::Error) -> ApiError {
    ApiError::bad_request(format!("malformed multipart body: {e}"))
}

fn unexpected_field(name: Option<&str>) -> ApiError {
    ApiError::bad_request(format!(
        "unexpected form field \"{}\": the form takes one field, \"file\"",
        name.unwrap_or_default()
    ))
}

/// The file's bytes, then the end of the form: a field after the file, or a form
/// that does not end cleanly, fails the stream, so that nothing is stored.
fn file_then_end(
    field: multer::Field<'static>,
    form: multer::Multipart<'static>,
) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    futures_util::stream::unfold(Some((field, form)), |state| async move {
        let (mut field, mut form) = state?;
        match field.chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some((field, form)))),
            Ok(None) => {
                drop(field);
                match form.next_field().await {
                    Ok(None) => None,
                    Ok(Some(other)) => Some((Err(unexpected_field(other.name()).message), None)),
                    Err(e) => Some((Err(malformed(e).message), None)),
                }
            }
            Err(e) => Some((Err(malformed(e).message), None)),
        }
    })
}

/// `PUT /s3/update?key=`: the raw body replaces an existing object.
#[utoipa::path(put, path = "/s3/update", tag = "s3", params(KeyParam),
    request_body(content = Option<String>, content_type = "application/octet-stream", description = "The new content (none: an empty object)"),
    responses(
        (status = 200, description = "Replaced", body = Written),
        (status = 413, description = "The body is over S3_MAX_UPLOAD_BYTES; nothing is stored", body = ErrorBody),
        (status = 400, description = "The key is missing or invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object: upload creates one", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn update(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Written>, ApiError> {
    let key = writable_key(&state, &Params::parse(query))?;
    let s3 = store(&state)?;
    let meter = Meter::new(state.config.s3.max_upload_bytes, None);
    meter.refuse_announced(&headers)?;
    let existing = s3.object_info(&key).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        // curl's --data-binary says form-urlencoded for any file: the bytes are not a form.
        .map(|v| match v.starts_with("application/x-www-form-urlencoded") {
            true => "application/octet-stream".to_owned(),
            false => v.to_owned(),
        })
        .or(existing.content_type);
    let body = meter.body(body);
    Ok(Json(store_body(s3, key, body, content_type, &headers, &meter).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct PatchParams {
    /// The object's key
    #[param(
        min_length = 1,
        max_length = 1024,
        pattern = "[^\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
    )]
    key: String,
    /// Where the body's bytes go (at most the object's size: a patch may extend it)
    #[param(minimum = 0)]
    offset: u64,
}

/// `PATCH /s3/patch?key=&offset=`: the raw body replaces bytes from `offset`.
/// An `If-Match` header makes it conditional on that ETag.
#[utoipa::path(patch, path = "/s3/patch", tag = "s3", params(PatchParams,
        ("If-Match" = Option<String>, Header, description = "Apply only if the object's ETag is this one")),
    request_body(content = Option<String>, content_type = "application/octet-stream", description = "The bytes written at offset (none: the object is unchanged)"),
    responses(
        (status = 200, description = "Patched; the object as it is now", body = ObjectInfo),
        (status = 400, description = "The key or offset is missing or invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The object changed during the patch, or offset is past its end", body = ErrorBody),
        (status = 412, description = "The ETag is not the If-Match one", body = ErrorBody),
        (status = 413, description = "The body is over HTTP_MAX_BODY_BYTES", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn patch_object(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<ObjectInfo>, ApiError> {
    let params = Params::parse(query);
    let key = writable_key(&state, &params)?;
    let offset = params
        .number("offset")?
        .ok_or_else(|| ApiError::bad_request("offset is required"))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    Ok(Json(store(&state)?.patch_object(&key, body, offset, if_match).await?))
}

#[utoipa::path(delete, path = "/s3/delete", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "The key is missing or invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_object(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Json<Deleted>, ApiError> {
    let key = writable_key(&state, &Params::parse(query))?;
    store(&state)?.delete_object(&key).await?;
    Ok(Json(Deleted { deleted: key }))
}

#[utoipa::path(get, path = "/s3/lifecycle", tag = "s3",
    responses(
        (status = 200, description = "The bucket's expiration rules", body = Rules),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn lifecycle(State(state): State<AppState>) -> Result<Json<Rules>, ApiError> {
    Ok(Json(Rules {
        rules: store(&state)?.lifecycle().await?,
    }))
}

/// An expiration rule to add or replace.
#[derive(Debug, serde::Deserialize, ToSchema)]
struct RuleRequest {
    /// Objects under this prefix expire (at most 1,024 bytes; no character that
    /// XML 1.0 cannot carry, as the rule travels in XML)
    #[schema(max_length = 1024, pattern = "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\uFFFE\\uFFFF]*$")]
    prefix: String,
    /// After this many days
    #[schema(value_type = i32, minimum = 1)]
    #[serde(deserialize_with = "whole_days")]
    days: i32,
    id: Option<String>,
    enabled: Option<bool>,
}

/// `PUT /s3/lifecycle` with `{"prefix": "tmp/", "days": 7}`: objects under the
/// prefix expire after that many days.
#[utoipa::path(put, path = "/s3/lifecycle", tag = "s3",
    request_body = RuleRequest,
    responses(
        (status = 200, description = "The rules after the change", body = Rules),
        (status = 400, description = "The rule is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The prefix is empty, touches the archive (S3_ARCHIVE_PREFIX) or is outside S3_API_PREFIX", body = ErrorBody),
        (status = 413, description = "The body is over HTTP_MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 422, description = "The body is not such a rule", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_lifecycle(
    State(state): State<AppState>,
    body: Result<Json<RuleRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Rules>, ApiError> {
    let Json(request) = body?;
    if request.days < 1 {
        return Err(ApiError::bad_request("days must be at least 1"));
    }
    if request.prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request("prefix is over 1024 bytes"));
    }
    if let Some(c) = request.prefix.chars().find(|&c| !xml_char(c)) {
        return Err(ApiError::bad_request(format!(
            "prefix holds {c:?}, which the lifecycle configuration (XML 1.0) cannot carry"
        )));
    }
    let archive = format!("{}/", state.config.s3.archive_prefix);
    confined(&state, &request.prefix, "a lifecycle rule for")?;
    if request.prefix.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("an empty prefix would expire the whole bucket, the archive ({archive}) included"),
        ));
    }
    if archive.starts_with(&request.prefix) || request.prefix.starts_with(&archive) {
        return Err(archive_refusal(&archive, "a lifecycle rule over"));
    }
    // The API's rules carry its id prefix: the only rules it replaces or removes.
    let id = request.id.unwrap_or_else(|| format!("expire-{}", request.prefix));
    let id = match id.starts_with(MANAGED_RULE_PREFIX) {
        true => id,
        false => format!("{MANAGED_RULE_PREFIX}{id}"),
    };
    // S3 takes ids of up to 255 characters.
    let id = match id.chars().count() > 255 {
        true => format!(
            "{MANAGED_RULE_PREFIX}expire-{:016x}",
            xxhash_rust::xxh3::xxh3_64(request.prefix.as_bytes())
        ),
        false => id,
    };
    let rule = ExpirationRule {
        id,
        prefix: request.prefix,
        days: request.days,
        enabled: request.enabled.unwrap_or(true),
        managed: true,
    };
    Ok(Json(Rules {
        rules: store(&state)?.set_expiration(rule).await?,
    }))
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

/// An integer of days, also written as an integral float (`7.0`), as JSON
/// Schema's "integer" allows.
fn whole_days<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        })
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("days must be a whole number of days, got {n}")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct PrefixParam {
    /// The prefix whose rules go
    prefix: String,
}

/// `DELETE /s3/lifecycle?prefix=`: removes the expiration rules of the prefix.
#[utoipa::path(delete, path = "/s3/lifecycle", tag = "s3", params(PrefixParam),
    responses(
        (status = 200, description = "Removed", body = RulesRemoved),
        (status = 400, description = "The prefix is missing", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "The prefix is outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No rule for that prefix", body = ErrorBody),
        (status = 502, description = "The object store refused", body = ErrorBody),
        (status = 503, description = "No object store configured, or it cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_lifecycle(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<RulesRemoved>, ApiError> {
    let params = Params::parse(query);
    let prefix = params
        .get("prefix")?
        .ok_or_else(|| ApiError::bad_request("prefix is required"))?
        .to_owned();
    confined(&state, &prefix, "removing the lifecycle rules of")?;
    let removed = store(&state)?.delete_expiration(&prefix).await?;
    if removed == 0 {
        return Err(ApiError::not_found(format!(
            "no expiration rule for prefix \"{prefix}\""
        )));
    }
    Ok(Json(RulesRemoved { removed, prefix }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_are_attachments_with_a_valid_name_for_any_key() {
        let disposition = |key: &str| attachment(key).to_str().expect("visible ASCII").to_owned();
        assert_eq!(
            disposition("data/file.csv"),
            "attachment; filename=\"file.csv\"; filename*=UTF-8''file.csv"
        );
        assert_eq!(
            disposition("x\u{1}.html"),
            "attachment; filename=\"x_.html\"; filename*=UTF-8''x%01.html"
        );
        assert_eq!(
            disposition("a/\"q\"%;.txt"),
            "attachment; filename=\"_q__;.txt\"; filename*=UTF-8''%22q%22%25%3B.txt"
        );
        assert_eq!(
            disposition("exports/отчёт 1.csv"),
            "attachment; filename=\"_____ 1.csv\"; filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82%201.csv"
        );
        assert_eq!(
            disposition("folder/"),
            "attachment; filename=\"folder\"; filename*=UTF-8''folder"
        );
    }

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

    #[test]
    fn cursors_round_trip_and_order_like_the_listing() {
        let at = |ms: i64, key: &str| crate::s3::ObjectSummary {
            key: key.into(),
            size: 0,
            last_modified: chrono::DateTime::from_timestamp_millis(ms),
            etag: None,
        };
        let cursor = Cursor::parse(&Cursor::of(&at(2000, "b:c")).to_string()).expect("parses");
        assert_eq!((cursor.millis, cursor.key.as_str()), (2000, "b:c"));
        assert!(cursor.precedes(&at(1000, "a")), "older comes later");
        assert!(cursor.precedes(&at(2000, "c")), "same time, later key");
        assert!(!cursor.precedes(&at(2000, "a")));
        assert!(!cursor.precedes(&at(3000, "z")));
        assert!(Cursor::parse("nonsense").is_err());
    }
}
