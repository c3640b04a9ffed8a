//! `S3_*`: the object store, its bucket and prefixes, and the upload limit.

use std::time::Duration;

use serde::Deserialize;

use super::parse::{count, http_url, seconds, size, MIB};
use super::{ConfigError, Secret};

/// `S3_`: the object store.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub region: String,
    pub endpoint_url: Option<url::Url>,
    pub bucket_name: String,
    /// Bodies larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// The largest object `POST /s3/upload` and `PUT /s3/update` take (413 above).
    pub max_upload_bytes: u64,
    /// One S3 call, retries included, and one attempt of it.
    pub operation_timeout: Duration,
    pub attempt_timeout: Duration,
    /// Archive objects live under `{archive_prefix}/{table}/dt=…/`.
    pub archive_prefix: String,
    /// The `/s3/*` routes reach only keys under this prefix (ends with `/`);
    /// `None`: the whole bucket, the archive read-only.
    pub api_prefix: Option<String>,
    /// `GET /s3/objects` newest first reads at most this many entries of a
    /// prefix (beyond: `truncated`).
    pub list_scan_limit: usize,
    /// An archive object closes at this many bytes of records (before gzip)…
    pub archive_max_bytes: usize,
    /// …or this long after its first record.
    pub archive_interval: Duration,
}

impl S3Config {
    /// Whether an object store is configured (credentials or an endpoint).
    pub fn is_configured(&self) -> bool {
        self.access_key_id.is_some() || self.endpoint_url.is_some()
    }
}

#[derive(Default, Deserialize)]
pub(super) struct RawS3 {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    bucket_name: Option<String>,
    multipart_threshold: Option<String>,
    max_upload_bytes: Option<String>,
    operation_timeout_seconds: Option<String>,
    attempt_timeout_seconds: Option<String>,
    archive_prefix: Option<String>,
    api_prefix: Option<String>,
    list_scan_limit: Option<String>,
    archive_max_bytes: Option<String>,
    archive_interval_seconds: Option<String>,
}

pub(super) fn s3(raw: RawS3) -> Result<S3Config, ConfigError> {
    let endpoint_url = raw.endpoint_url.map(|u| http_url("S3_ENDPOINT_URL", &u)).transpose()?;
    let bucket_name = raw.bucket_name.unwrap_or_else(|| "default-bucket".into());
    let bucket_ok = (3..=63).contains(&bucket_name.len())
        && bucket_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !bucket_ok {
        return Err(ConfigError::new(
            "S3_BUCKET_NAME",
            format!("\"{bucket_name}\" is not a valid bucket name (3-63 lowercase letters, digits, '-' or '.')"),
        ));
    }
    let archive_prefix = archive_prefix(raw.archive_prefix)?;
    Ok(S3Config {
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key.map(Secret::new),
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        endpoint_url,
        bucket_name,
        multipart_threshold: size("S3_MULTIPART_THRESHOLD", raw.multipart_threshold, 16 * MIB, 5 * MIB)?,
        max_upload_bytes: max_upload(raw.max_upload_bytes)?,
        operation_timeout: seconds("S3_OPERATION_TIMEOUT_SECONDS", raw.operation_timeout_seconds, 300)?,
        attempt_timeout: seconds("S3_ATTEMPT_TIMEOUT_SECONDS", raw.attempt_timeout_seconds, 120)?,
        api_prefix: api_prefix(raw.api_prefix, &archive_prefix)?,
        list_scan_limit: count("S3_LIST_SCAN_LIMIT", raw.list_scan_limit, 10_000)?,
        archive_prefix,
        archive_max_bytes: size("S3_ARCHIVE_MAX_BYTES", raw.archive_max_bytes, 64 * MIB, 1024)?,
        archive_interval: seconds("S3_ARCHIVE_INTERVAL_SECONDS", raw.archive_interval_seconds, 60)?,
    })
}

/// S3's own largest object.
pub const S3_MAX_OBJECT_BYTES: u64 = 5 << 40;

pub(super) fn max_upload(raw: Option<String>) -> Result<u64, ConfigError> {
    let bytes = size("S3_MAX_UPLOAD_BYTES", raw, 5 << 30, 1)? as u64;
    if bytes > S3_MAX_OBJECT_BYTES {
        return Err(ConfigError::new(
            "S3_MAX_UPLOAD_BYTES",
            format!("{bytes} is over S3's largest object, 5 TiB"),
        ));
    }
    Ok(bytes)
}

pub(super) fn archive_prefix(raw: Option<String>) -> Result<String, ConfigError> {
    let prefix = raw
        .unwrap_or_else(|| "archive".into())
        .trim()
        .trim_matches('/')
        .to_owned();
    if prefix.is_empty() || prefix.len() > 200 || prefix.contains("//") {
        return Err(ConfigError::new(
            "S3_ARCHIVE_PREFIX",
            format!("\"{prefix}\" is not a usable key prefix (1-200 characters, no empty path segment)"),
        ));
    }
    Ok(prefix)
}

/// `S3_API_PREFIX`, kept with its trailing `/`; blank is unset. Under the
/// archive it would leave the API nothing it may write.
pub(super) fn api_prefix(raw: Option<String>, archive: &str) -> Result<Option<String>, ConfigError> {
    let Some(prefix) = raw
        .map(|p| p.trim().trim_matches('/').to_owned())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    if prefix.len() > 200 || prefix.contains("//") {
        return Err(ConfigError::new(
            "S3_API_PREFIX",
            format!("\"{prefix}\" is not a usable key prefix (1-200 characters, no empty path segment)"),
        ));
    }
    let prefix = format!("{prefix}/");
    if prefix.starts_with(&format!("{archive}/")) {
        return Err(ConfigError::new(
            "S3_API_PREFIX",
            format!(
                "\"{prefix}\" is inside the archive (S3_ARCHIVE_PREFIX \"{archive}\"), which the API may not write"
            ),
        ));
    }
    Ok(Some(prefix))
}
