//! The object store (AWS S3 or an S3-compatible store), one client for the API,
//! the archive and restore.
//!
//! Guarantees: every operation fails with a typed [`S3Error`] (not found, bucket
//! missing, access denied, unreachable, conflict, bad request) whose message names
//! the key and never a credential. Bodies stream both ways: uploads over the
//! multipart threshold go up in parts (aborted on failure, so no orphan parts stay
//! behind) and downloads are passed on chunk by chunk. Listings follow continuation
//! tokens, so they are complete however many objects there are. Patches are
//! conditional on the ETag read at their start.

mod error;
mod lifecycle;
mod list;
mod multipart;
mod object;
pub mod patch;

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::Serialize;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use error::classify;
pub use error::S3Error;
pub use lifecycle::{ExpirationRule, MANAGED_RULE_PREFIX};

use crate::config::S3Config;

/// S3's smallest part (all parts of a multipart upload but the last).
pub const MIN_PART: u64 = 5 * 1024 * 1024;

/// S3's longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ObjectSummary {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<DateTime<Utc>>,
    pub etag: Option<String>,
}

/// What a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub content_type: Option<String>,
    pub last_modified: Option<DateTime<Utc>>,
    pub etag: Option<String>,
    /// User metadata (`x-amz-meta-*`).
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// How [`S3::put_object`] stores an object.
#[derive(Debug, Clone, Copy, Default)]
pub struct Put<'a> {
    pub content_type: Option<&'a str>,
    /// User metadata (`x-amz-meta-*`).
    pub metadata: &'a [(&'a str, String)],
    /// The size announced (a Content-Length), to choose multipart at once.
    pub size_hint: Option<u64>,
    pub condition: Condition<'a>,
}

/// When a write may replace what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition<'a> {
    /// Always.
    #[default]
    Any,
    /// Only when nothing is stored at the key (`If-None-Match: *`).
    Absent,
    /// Only while the stored object has this ETag (`If-Match`).
    Matches(&'a str),
}

impl Condition<'_> {
    fn if_match(self) -> Option<String> {
        match self {
            Condition::Matches(etag) => Some(etag.to_owned()),
            _ => None,
        }
    }

    fn if_none_match(self) -> Option<String> {
        (self == Condition::Absent).then(|| "*".to_owned())
    }
}

/// A listing: the objects directly under a prefix, newest first, and the
/// "folders" (common prefixes) one level down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub objects: Vec<ObjectSummary>,
    pub folders: Vec<String>,
    /// The scan stopped at its limit: only the first entries in key order are
    /// listed, and more are under the prefix.
    pub truncated: bool,
}

/// One page of a listing in key order: the objects and folders directly under
/// a prefix that follow a point, from one LIST request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyPage {
    pub objects: Vec<ObjectSummary>,
    pub folders: Vec<String>,
    /// The page's last entry (a key, or a folder ending with `/`) when more
    /// follow: pass it as `after` for the next page.
    pub next_after: Option<String>,
}

/// An object being downloaded: its info and its body as a stream of chunks.
#[allow(missing_debug_implementations)]
pub struct Download {
    pub info: ObjectInfo,
    pub body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
}

/// What a write stored: its size and the ETag the store answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub etag: Option<String>,
}

/// The S3 client for one bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct S3 {
    client: aws_sdk_s3::Client,
    bucket: String,
    multipart_threshold: u64,
}

impl S3 {
    /// Builds the client (no I/O). `S3_ENDPOINT_URL` switches to path-style
    /// addressing, which S3-compatible stores expect.
    pub fn new(config: &S3Config) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http)
            // Checksums only where S3 requires them: several S3-compatible stores
            // refuse the newer default trailers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // A call that hangs fails (as unreachable) instead of holding its
                    // request forever; a streamed download's body is not part of it.
                    .operation_attempt_timeout(config.attempt_timeout)
                    .operation_timeout(config.operation_timeout)
                    .build(),
            );
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder.credentials_provider(Credentials::new(id, secret.expose(), None, None, "dwh-helper"));
        }
        if let Some(endpoint) = &config.endpoint_url {
            builder = builder
                .endpoint_url(endpoint.as_str().trim_end_matches('/'))
                .force_path_style(true);
        }
        let threshold = config.multipart_threshold as u64;
        S3 {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket_name.clone(),
            multipart_threshold: threshold,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn multipart_threshold(&self) -> u64 {
        self.multipart_threshold
    }

    /// Awaits a request of the bucket about `key` (a key, a prefix, or "" for
    /// the bucket itself), its failure classified.
    async fn sent<T, E>(
        &self,
        key: &str,
        request: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, S3Error>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        request.await.map_err(|e| classify(e, &self.bucket, key))
    }

    /// Checks that the bucket exists and is reachable.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.sent("", self.client.head_bucket().bucket(&self.bucket).send())
            .await?;
        Ok(())
    }

    /// Creates the bucket (for tests and first set-up); an existing one is fine.
    pub async fn create_bucket(&self) -> Result<(), S3Error> {
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match classify(e, &self.bucket, "") {
                S3Error::Other { code, .. } if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" => {
                    Ok(())
                }
                other => Err(other),
            },
        }
    }

    /// The SDK client, for a call this wrapper does not make (tests, tools).
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Whether XML 1.0 can carry `c` (its `Char` production).
pub fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}
