//! One object: its metadata, its bytes as a streamed download, its deletion.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::super::error::ErrorBody;
use super::super::{ApiError, AppState};
use super::{readable_key, store, writable_key, Deleted, KeyParam, Params, ReadFailures, StoreFailures, Unauthorized};
use crate::s3::ObjectInfo;

#[utoipa::path(get, path = "/s3/object-info", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "The object's size, type, time, ETag and metadata", body = ObjectInfo),
        ReadFailures,
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn info(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<ObjectInfo>, ApiError> {
    let key = readable_key(&state, &Params::parse(query))?;
    Ok(Json(store(&state)?.object_info(&key).await?))
}

#[utoipa::path(get, path = "/s3/download", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "The object's bytes, streamed, with the content type it was stored with", content_type = "*/*", body = String),
        ReadFailures,
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn download(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
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

#[utoipa::path(delete, path = "/s3/delete", tag = "s3", params(KeyParam),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "The key is missing or invalid", body = ErrorBody),
        (status = 403, description = "The key is under the archive prefix (S3_ARCHIVE_PREFIX) or outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_object(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Deleted>, ApiError> {
    let key = writable_key(&state, &Params::parse(query))?;
    store(&state)?.delete_object(&key).await?;
    Ok(Json(Deleted { deleted: key }))
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
}
