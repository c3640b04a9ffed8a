//! Writing objects: `POST /s3/upload` (a multipart form, streamed and checked
//! whole before the object is stored), `PUT /s3/update` (the body as the
//! object) and `PATCH /s3/patch` (bytes at an offset).

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use utoipa::{IntoParams, ToSchema};

use super::super::error::ErrorBody;
use super::super::{ApiError, AppState};
use super::{content_length, store, writable_key, KeyParam, Params, StoreFailures, Unauthorized, Written};
use crate::s3::{ObjectInfo, Put, S3};

/// The upload form: one field, `file`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct UploadForm {
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
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn upload(
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
        .put_object(
            &key,
            body,
            Put {
                content_type: content_type.as_deref(),
                size_hint: content_length(headers),
                ..Put::default()
            },
        )
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
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object: upload creates one", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn update(
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
pub(super) struct PatchParams {
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
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The object changed during the patch, or offset is past its end", body = ErrorBody),
        (status = 412, description = "The ETag is not the If-Match one", body = ErrorBody),
        (status = 413, description = "The body is over HTTP_MAX_BODY_BYTES", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn patch_object(
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
