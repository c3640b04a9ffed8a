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
pub mod patch;

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, CompletedMultipartUpload, CompletedPart, ExpirationStatus, LifecycleExpiration,
    LifecycleRule, LifecycleRuleFilter,
};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt as _};
use serde::Serialize;

use error::classify;
pub use error::S3Error;

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

/// When a write may replace what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition<'a> {
    /// Always.
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

/// An expiration rule of the bucket's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ExpirationRule {
    pub id: String,
    pub prefix: String,
    pub days: i32,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Whether the API manages the rule (its id starts with `dwh-helper-`); any
    /// other rule is the bucket owner's, listed here and never changed.
    #[serde(default)]
    pub managed: bool,
}

fn enabled() -> bool {
    true
}

/// The id prefix of the lifecycle rules the API manages.
pub const MANAGED_RULE_PREFIX: &str = "dwh-helper-";

fn is_managed(rule: &LifecycleRule) -> bool {
    rule.id().is_some_and(|id| id.starts_with(MANAGED_RULE_PREFIX))
}

/// The prefix a rule filters on: `Filter.Prefix`, or the legacy top-level
/// `Prefix`; `None` for a rule that filters otherwise (tags, sizes, `And`).
fn rule_prefix(rule: &LifecycleRule) -> Option<&str> {
    match rule.filter() {
        Some(filter) => filter
            .prefix()
            .filter(|_| filter.and().is_none() && filter.tag().is_none()),
        #[allow(deprecated)]
        None => rule.prefix(),
    }
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

    /// Checks that the bucket exists and is reachable.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, ""))?;
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

    /// The objects directly under `prefix` (not in deeper folders), newest first
    /// (ties by key), and the folders one level down. Follows continuations
    /// until `scan_limit` entries (objects and folders) are read, so memory and
    /// LIST requests stay bounded; beyond it the listing is `truncated`.
    pub async fn list_objects(&self, prefix: &str, scan_limit: usize) -> Result<Listing, S3Error> {
        let mut listing = self.list(prefix, Some("/"), scan_limit).await?;
        listing
            .objects
            .sort_by(|a, b| b.last_modified.cmp(&a.last_modified).then_with(|| a.key.cmp(&b.key)));
        Ok(listing)
    }

    /// Every object under `prefix`, at any depth, by key.
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectSummary>, S3Error> {
        let mut objects = self.list(prefix, None, usize::MAX).await?.objects;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn list(&self, prefix: &str, delimiter: Option<&str>, scan_limit: usize) -> Result<Listing, S3Error> {
        let mut listing = Listing::default();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_owned))
            // Keys may hold characters XML 1.0 cannot carry (control characters):
            // the store sends them percent-encoded.
            .encoding_type(aws_sdk_s3::types::EncodingType::Url)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(e, &self.bucket, prefix))?;
            listing.objects.extend(page.contents().iter().filter_map(summary));
            listing.folders.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(url_decoded)),
            );
            if listing.objects.len() + listing.folders.len() >= scan_limit && page.is_truncated() == Some(true) {
                listing.truncated = true;
                break;
            }
        }
        Ok(listing)
    }

    /// Up to `limit` objects and folders directly under `prefix`, in key order,
    /// after `after` (a key, or a folder as a previous page's `next_after`
    /// gave it): one LIST request, whatever the prefix holds.
    ///
    /// A store may echo `StartAfter` into its XML answer unencoded (moto does),
    /// and XML cannot carry control characters: a start holding one goes as its
    /// part before that character, and the few keys between are skipped here,
    /// following the store's continuation tokens.
    pub async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage, S3Error> {
        let start = after.map(|after| past_folder(prefix, after));
        let (start_after, skip_to) = match start {
            Some(start) => match start.find(|c| !xml_char(c)) {
                Some(unsafe_at) => (Some(start[..unsafe_at].to_owned()), Some(start)),
                None => (Some(start), None),
            },
            None => (None, None),
        };
        let mut page = KeyPage::default();
        let mut entries = 0;
        let mut token: Option<String> = None;
        loop {
            let response = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .delimiter("/")
                .max_keys(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
                .set_start_after(start_after.clone().filter(|_| token.is_none()))
                .set_continuation_token(token.take())
                .encoding_type(aws_sdk_s3::types::EncodingType::Url)
                .send()
                .await
                .map_err(|e| classify(e, &self.bucket, prefix))?;
            let mut objects = response.contents().iter().filter_map(summary).peekable();
            let mut folders = response
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(url_decoded))
                .peekable();
            // The answer's objects and folders, merged in key order, past the start.
            let past = |name: &str| skip_to.as_deref().is_none_or(|skip| name > skip);
            let mut full = false;
            loop {
                let object_first = match (objects.peek(), folders.peek()) {
                    (Some(o), Some(f)) => o.key < *f,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                if entries == limit {
                    full = true;
                    break;
                }
                let name = if object_first {
                    let object = objects.next().expect("peeked");
                    let name = object.key.clone();
                    if past(&name) {
                        page.objects.push(object);
                    }
                    name
                } else {
                    let folder = folders.next().expect("peeked");
                    let name = folder.clone();
                    if past(&name) {
                        page.folders.push(folder);
                    }
                    name
                };
                if past(&name) {
                    entries += 1;
                    page.next_after = Some(name);
                }
            }
            let more = response.is_truncated() == Some(true);
            token = response.next_continuation_token().map(str::to_owned);
            if full || !more || token.is_none() {
                if !(full || more) {
                    page.next_after = None;
                }
                return Ok(page);
            }
            if entries == limit {
                return Ok(page);
            }
        }
    }

    /// Keys with multipart uploads started and neither completed nor aborted
    /// (their parts are stored, and billed, until then).
    pub async fn unfinished_uploads(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let response = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, prefix))?;
        Ok(response
            .uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect())
    }

    /// Size, content type, last modification, ETag and metadata of `key`.
    pub async fn object_info(&self, key: &str) -> Result<ObjectInfo, S3Error> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, key))?;
        Ok(ObjectInfo {
            key: key.to_owned(),
            size: head.content_length().unwrap_or(0).max(0) as u64,
            content_type: head.content_type().map(str::to_owned),
            last_modified: head.last_modified().and_then(to_chrono),
            etag: head.e_tag().map(str::to_owned),
            metadata: head.metadata().cloned().unwrap_or_default().into_iter().collect(),
        })
    }

    pub async fn object_exists(&self, key: &str) -> Result<bool, S3Error> {
        match self.object_info(key).await {
            Ok(_) => Ok(true),
            Err(S3Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get_object_size(&self, key: &str) -> Result<u64, S3Error> {
        Ok(self.object_info(key).await?.size)
    }

    /// Streams `key`.
    pub async fn get_object(&self, key: &str) -> Result<Download, S3Error> {
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, key))?;
        let info = ObjectInfo {
            key: key.to_owned(),
            size: response.content_length().unwrap_or(0).max(0) as u64,
            content_type: response.content_type().map(str::to_owned),
            last_modified: response.last_modified().and_then(to_chrono),
            etag: response.e_tag().map(str::to_owned),
            metadata: response.metadata().cloned().unwrap_or_default().into_iter().collect(),
        };
        Ok(Download {
            info,
            body: Box::pin(byte_stream(response.body)),
        })
    }

    /// The whole of a (small) object in memory.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, S3Error> {
        let mut download = self.get_object(key).await?;
        let mut buffer = BytesMut::with_capacity(download.info.size as usize);
        while let Some(chunk) = download.body.next().await {
            let chunk = chunk.map_err(|e| S3Error::Unreachable { detail: e.to_string() })?;
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer.freeze())
    }

    /// Bytes `start..end` of `key`, only if its ETag is still `etag`.
    async fn get_range(&self, key: &str, start: u64, end: u64, etag: &str) -> Result<Bytes, S3Error> {
        debug_assert!(start < end);
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={start}-{}", end - 1))
            .if_match(etag)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, key))?;
        let data = response
            .body
            .collect()
            .await
            .map_err(|e| S3Error::Unreachable { detail: e.to_string() })?;
        Ok(data.into_bytes())
    }

    /// Stores `body` at `key`. Bodies up to the multipart threshold go up in one
    /// request; larger ones as a multipart upload of 5 MiB parts (the smallest S3
    /// allows, to keep memory low), aborted if
    /// anything fails. `size_hint` (a Content-Length) over the threshold goes
    /// straight to multipart, so memory stays around one part whatever the size.
    pub async fn put_object<S, E>(
        &self,
        key: &str,
        body: S,
        content_type: Option<&str>,
        metadata: &[(&str, String)],
        size_hint: Option<u64>,
    ) -> Result<Stored, S3Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        self.put_object_if(key, body, content_type, metadata, size_hint, Condition::Any)
            .await
    }

    /// [`S3::put_object`], stored only while `condition` holds when the upload
    /// completes; otherwise [`S3Error::PreconditionFailed`] (or
    /// [`S3Error::Conflict`] for a concurrent conditional write), and nothing
    /// changed.
    pub async fn put_object_if<S, E>(
        &self,
        key: &str,
        body: S,
        content_type: Option<&str>,
        metadata: &[(&str, String)],
        size_hint: Option<u64>,
        condition: Condition<'_>,
    ) -> Result<Stored, S3Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let read_error = |e: E| S3Error::BadRequest {
            detail: format!("reading the upload failed: {e}"),
        };
        // Chunks are kept as they come (no copying, no doubling buffer) until the
        // body is known to be small or known to be large.
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0u64;
        let large = size_hint.is_some_and(|size| size > self.multipart_threshold);
        while !large && pending_len <= self.multipart_threshold {
            match body.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(read_error)?;
                    pending_len += chunk.len() as u64;
                    pending.push(chunk);
                }
                None => {
                    let data = match pending.len() {
                        1 => pending.pop().unwrap_or_default(),
                        _ => pending.concat().into(),
                    };
                    let etag = self.put_whole(key, data, content_type, metadata, condition).await?;
                    return Ok(Stored {
                        size: pending_len,
                        etag,
                    });
                }
            }
        }
        let mut upload = Multipart::start(self, key, content_type, metadata).await?;
        // S3 allows 10,000 parts: grow them only for bodies that need it. The hint
        // comes from a client: it sizes parts (up to S3's largest object) and never
        // an allocation, which grows with the bytes that really arrive.
        let hint = size_hint.unwrap_or(0).min(crate::config::S3_MAX_OBJECT_BYTES);
        let part_size = MIN_PART.max(hint.div_ceil(9_000)) as usize;
        let result = async {
            let mut total = 0u64;
            let mut part: Vec<u8> = Vec::with_capacity(MIN_PART as usize);
            let mut chunks = pending.into_iter();
            loop {
                let chunk = match chunks.next() {
                    Some(chunk) => chunk,
                    None => match body.next().await {
                        Some(chunk) => chunk.map_err(read_error)?,
                        None => break,
                    },
                };
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let take = rest.len().min(part_size - part.len());
                    part.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if part.len() == part_size {
                        total += part.len() as u64;
                        let full = std::mem::replace(&mut part, Vec::with_capacity(MIN_PART as usize));
                        upload.upload(full.into()).await?;
                    }
                }
            }
            if !part.is_empty() || total == 0 {
                total += part.len() as u64;
                upload.upload(part.into()).await?;
            }
            Ok(total)
        }
        .await;
        match result {
            Ok(total) => {
                let etag = upload.complete(condition).await?;
                Ok(Stored { size: total, etag })
            }
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    /// One PutObject, under `condition`.
    async fn put_whole(
        &self,
        key: &str,
        data: Bytes,
        content_type: Option<&str>,
        metadata: &[(&str, String)],
        condition: Condition<'_>,
    ) -> Result<Option<String>, S3Error> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data))
            .set_content_type(content_type.map(str::to_owned))
            .set_if_match(condition.if_match())
            .set_if_none_match(condition.if_none_match());
        for (name, value) in metadata {
            request = request.metadata(*name, value);
        }
        let stored = request.send().await.map_err(|e| classify(e, &self.bucket, key))?;
        Ok(stored.e_tag().map(str::to_owned))
    }

    pub async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        // S3 answers 204 for keys that do not exist: say so instead.
        if !self.object_exists(key).await? {
            return Err(S3Error::NotFound { key: key.to_owned() });
        }
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, key))?;
        Ok(())
    }

    /// Replaces the bytes of `key` from `offset` with `data`, extending the object
    /// when `offset + data.len()` passes its end. `offset` past the end is refused.
    /// The write is conditional on the ETag read at the start (or `expected_etag`):
    /// a concurrent change is reported as [`S3Error::Conflict`], not overwritten.
    /// Objects over the multipart threshold are never downloaded whole: unchanged
    /// ranges are copied server-side.
    pub async fn patch_object(
        &self,
        key: &str,
        data: Bytes,
        offset: u64,
        expected_etag: Option<&str>,
    ) -> Result<ObjectInfo, S3Error> {
        let info = self.object_info(key).await?;
        let etag = info.etag.clone().unwrap_or_default();
        if let Some(expected) = expected_etag {
            if expected != etag {
                return Err(S3Error::Conflict { key: key.to_owned() });
            }
        }
        if offset > info.size {
            return Err(S3Error::PastTheEnd {
                key: key.to_owned(),
                offset,
                size: info.size,
            });
        }
        let metadata: Vec<(&str, String)> = info.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let content_type = info.content_type.as_deref();
        if info.size <= self.multipart_threshold {
            let current = self.get_range_or_empty(key, info.size, &etag).await?;
            let patched = patch::splice(&current, &data, offset as usize);
            self.put_whole(key, patched.into(), content_type, &metadata, Condition::Matches(&etag))
                .await
                .map_err(|e| conflict_on_precondition(e, key))?;
        } else {
            let plan = patch::plan(info.size, offset, data.len() as u64, MIN_PART, 5 * 1024 * 1024 * 1024);
            let mut upload = Multipart::start(self, key, content_type, &metadata).await?;
            let result = self.run_plan(&mut upload, key, &etag, &plan, &data).await;
            match result {
                Ok(()) => {
                    // The last guard on stores that ignore If-Match on completion.
                    let now = self.object_info(key).await?;
                    if now.etag.as_deref() != Some(etag.as_str()) {
                        upload.abort().await;
                        return Err(S3Error::Conflict { key: key.to_owned() });
                    }
                    upload
                        .complete(Condition::Matches(&etag))
                        .await
                        .map_err(|e| conflict_on_precondition(e, key))?;
                }
                Err(e) => {
                    upload.abort().await;
                    return Err(conflict_on_precondition(e, key));
                }
            }
        }
        self.object_info(key).await
    }

    async fn get_range_or_empty(&self, key: &str, size: u64, etag: &str) -> Result<Bytes, S3Error> {
        if size == 0 {
            return Ok(Bytes::new());
        }
        self.get_range(key, 0, size, etag)
            .await
            .map_err(|e| conflict_on_precondition(e, key))
    }

    async fn run_plan(
        &self,
        upload: &mut Multipart<'_>,
        key: &str,
        etag: &str,
        plan: &[patch::Part],
        data: &Bytes,
    ) -> Result<(), S3Error> {
        for part in plan {
            match part {
                patch::Part::Copy { start, end } => upload.copy(key, etag, *start, *end).await?,
                patch::Part::Build(pieces) => {
                    let mut buffer = BytesMut::new();
                    for piece in pieces {
                        match piece {
                            patch::Piece::Old { start, end } => {
                                buffer.extend_from_slice(&self.get_range(key, *start, *end, etag).await?)
                            }
                            patch::Piece::New { start, end } => {
                                buffer.extend_from_slice(&data[*start as usize..*end as usize])
                            }
                        }
                    }
                    upload.upload(buffer.freeze()).await?;
                }
            }
        }
        Ok(())
    }

    /// The SDK client, for a call this wrapper does not make (tests, tools).
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The bucket's expiration rules by prefix, the API's own and the owner's.
    pub async fn lifecycle(&self) -> Result<Vec<ExpirationRule>, S3Error> {
        Ok(summaries(&self.lifecycle_rules().await?))
    }

    /// The bucket's lifecycle rules as the store holds them, every kind.
    async fn lifecycle_rules(&self) -> Result<Vec<LifecycleRule>, S3Error> {
        match self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(response) => Ok(response.rules().to_vec()),
            Err(e) => match classify(e, &self.bucket, "") {
                S3Error::Other { code, .. } if code == "NoSuchLifecycleConfiguration" => Ok(Vec::new()),
                other => Err(other),
            },
        }
    }

    /// Sets the API's expiration rule for `rule.prefix`, replacing its own rule
    /// with that prefix or id. Every other rule is written back as it was read.
    pub async fn set_expiration(&self, rule: ExpirationRule) -> Result<Vec<ExpirationRule>, S3Error> {
        let mut rules = self.lifecycle_rules().await?;
        rules
            .retain(|r| !(is_managed(r) && (rule_prefix(r) == Some(rule.prefix.as_str()) || r.id() == Some(&rule.id))));
        let status = match rule.enabled {
            true => ExpirationStatus::Enabled,
            false => ExpirationStatus::Disabled,
        };
        rules.push(
            LifecycleRule::builder()
                .id(&rule.id)
                .filter(LifecycleRuleFilter::builder().prefix(&rule.prefix).build())
                .status(status)
                .expiration(LifecycleExpiration::builder().days(rule.days).build())
                .build()
                .map_err(|e| S3Error::BadRequest { detail: e.to_string() })?,
        );
        self.write_lifecycle(rules.clone()).await?;
        Ok(summaries(&rules))
    }

    /// Removes the API's expiration rules for `prefix`; returns how many there
    /// were. The owner's rules stay.
    pub async fn delete_expiration(&self, prefix: &str) -> Result<usize, S3Error> {
        let mut rules = self.lifecycle_rules().await?;
        let before = rules.len();
        rules.retain(|r| !(is_managed(r) && rule_prefix(r) == Some(prefix)));
        let removed = before - rules.len();
        if removed > 0 {
            self.write_lifecycle(rules).await?;
        }
        Ok(removed)
    }

    async fn write_lifecycle(&self, rules: Vec<LifecycleRule>) -> Result<(), S3Error> {
        if rules.is_empty() {
            self.client
                .delete_bucket_lifecycle()
                .bucket(&self.bucket)
                .send()
                .await
                .map_err(|e| classify(e, &self.bucket, ""))?;
            return Ok(());
        }
        let configuration = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| S3Error::BadRequest { detail: e.to_string() })?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(configuration)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket, ""))?;
        Ok(())
    }
}

/// The expiration rules among `rules` that filter by prefix alone.
fn summaries(rules: &[LifecycleRule]) -> Vec<ExpirationRule> {
    rules
        .iter()
        .filter_map(|rule| {
            Some(ExpirationRule {
                id: rule.id().unwrap_or_default().to_owned(),
                prefix: rule_prefix(rule)?.to_owned(),
                days: rule.expiration()?.days()?,
                enabled: rule.status() == &ExpirationStatus::Enabled,
                managed: is_managed(rule),
            })
        })
        .collect()
}

fn conflict_on_precondition(e: S3Error, key: &str) -> S3Error {
    match e {
        S3Error::PreconditionFailed { .. } => S3Error::Conflict { key: key.to_owned() },
        other => other,
    }
}

/// A multipart upload in progress.
struct Multipart<'a> {
    s3: &'a S3,
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
}

impl<'a> Multipart<'a> {
    async fn start(
        s3: &'a S3,
        key: &str,
        content_type: Option<&str>,
        metadata: &[(&str, String)],
    ) -> Result<Multipart<'a>, S3Error> {
        let mut request = s3
            .client
            .create_multipart_upload()
            .bucket(&s3.bucket)
            .key(key)
            .set_content_type(content_type.map(str::to_owned));
        for (name, value) in metadata {
            request = request.metadata(*name, value);
        }
        let created = request.send().await.map_err(|e| classify(e, &s3.bucket, key))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        Ok(Multipart {
            s3,
            key: key.to_owned(),
            upload_id,
            parts: Vec::new(),
        })
    }

    async fn upload(&mut self, data: Bytes) -> Result<(), S3Error> {
        let number = self.parts.len() as i32 + 1;
        let response = self
            .s3
            .client
            .upload_part()
            .bucket(&self.s3.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify(e, &self.s3.bucket, &self.key))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(response.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }

    /// Copies bytes `start..end` of `source` (only while its ETag is `etag`).
    async fn copy(&mut self, source: &str, etag: &str, start: u64, end: u64) -> Result<(), S3Error> {
        let number = self.parts.len() as i32 + 1;
        let source_path = format!("{}/{}", self.s3.bucket, percent_encode_key(source));
        let response = self
            .s3
            .client
            .upload_part_copy()
            .bucket(&self.s3.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .copy_source(source_path)
            .copy_source_range(format!("bytes={start}-{}", end - 1))
            .copy_source_if_match(etag)
            .send()
            .await
            .map_err(|e| classify(e, &self.s3.bucket, source))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(response.copy_part_result().and_then(|r| r.e_tag()).map(str::to_owned))
                .build(),
        );
        Ok(())
    }

    async fn complete(self, condition: Condition<'_>) -> Result<Option<String>, S3Error> {
        let parts = self.parts;
        let result = self
            .s3
            .client
            .complete_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .set_if_match(condition.if_match())
            .set_if_none_match(condition.if_none_match())
            .send()
            .await;
        match result {
            Ok(done) => Ok(done.e_tag().map(str::to_owned)),
            Err(e) => {
                let error = classify(e, &self.s3.bucket, &self.key);
                abort(self.s3, &self.key, &self.upload_id).await;
                Err(error)
            }
        }
    }

    async fn abort(self) {
        abort(self.s3, &self.key, &self.upload_id).await;
    }
}

/// Aborts an upload so that no parts stay behind (and are billed).
async fn abort(s3: &S3, key: &str, upload_id: &str) {
    if let Err(e) = s3
        .client
        .abort_multipart_upload()
        .bucket(&s3.bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        tracing::warn!(key, error = %classify(e, &s3.bucket, key), "cannot abort a multipart upload");
    }
}

/// `x-amz-copy-source` takes the key URL-encoded (slashes kept).
fn percent_encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| {
            url::form_urlencoded::byte_serialize(segment.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// A `ByteStream` as a stream of chunks.
fn byte_stream(body: ByteStream) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold(Some(body), |state| async move {
        let mut body = state?;
        match body.try_next().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    })
}

/// A key as `encoding-type=url` lists it: percent-encoded, a space as `+` (AWS) or
/// `%20` (others); a literal `+` always comes as `%2B`.
/// Whether XML 1.0 can carry `c` (its `Char` production).
pub fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn summary(object: &aws_sdk_s3::types::Object) -> Option<ObjectSummary> {
    Some(ObjectSummary {
        key: url_decoded(object.key()?),
        size: object.size().unwrap_or(0).max(0) as u64,
        last_modified: object.last_modified().and_then(to_chrono),
        etag: object.e_tag().map(str::to_owned),
    })
}

/// The `StartAfter` that resumes a delimited listing after `after`. A key is
/// its own; a folder (a common prefix, longer than the listing's prefix and
/// ending with `/`) is followed by the greatest key S3 allows under it, since
/// every key under it would roll up into that folder again.
fn past_folder(prefix: &str, after: &str) -> String {
    if after.len() <= prefix.len() || !after.ends_with('/') {
        return after.to_owned();
    }
    // U+10FFFF is the greatest UTF-8 sequence (F4 8F BF BF); U+07FF (DF BF) the
    // greatest of two bytes, U+007F of one. Of three, U+FFFD: XML cannot carry
    // U+FFFE and U+FFFF, and a store may echo StartAfter. (A key of exactly
    // 1,024 bytes ending in either is the one a page could skip.) Keys are at
    // most 1,024 bytes.
    let mut last = after.to_owned();
    while last.len() + 4 <= MAX_KEY_BYTES {
        last.push('\u{10FFFF}');
    }
    let tail = match MAX_KEY_BYTES - last.len() {
        3 => Some('\u{FFFD}'),
        2 => Some('\u{07FF}'),
        1 => Some('\u{7F}'),
        _ => None,
    };
    last.extend(tail);
    last
}

fn url_decoded(encoded: &str) -> String {
    percent_encoding::percent_decode_str(&encoded.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_keep_slashes_and_encode_the_rest() {
        assert_eq!(percent_encode_key("a/b c/d+e.csv"), "a/b%20c/d%2Be.csv");
        assert_eq!(percent_encode_key("plain"), "plain");
    }

    #[test]
    fn a_listing_resumes_past_every_key_of_a_folder_and_at_a_key() {
        // A key, and the prefix itself (an object named like its folder), are their own.
        assert_eq!(past_folder("logs/", "logs/a.csv"), "logs/a.csv");
        assert_eq!(past_folder("logs/", "logs/"), "logs/");
        for (prefix, folder) in [("", "a/"), ("logs/", "logs/2024/"), ("", &"x/".repeat(300)[..599])] {
            let folder = if folder.ends_with('/') {
                folder.to_owned()
            } else {
                format!("{folder}/")
            };
            let after = past_folder(prefix, &folder);
            assert!(after.len() <= MAX_KEY_BYTES, "{} bytes", after.len());
            assert!(after.starts_with(&folder));
            // Greater than the longest and greatest keys under the folder…
            let room = MAX_KEY_BYTES - folder.len();
            let greatest = |unit: char| {
                let mut key = folder.clone();
                while key.len() + unit.len_utf8() <= folder.len() + room {
                    key.push(unit);
                }
                key
            };
            for unit in ['\u{7F}', '\u{07FF}', '\u{FFFD}', '\u{10FFFF}', 'z'] {
                let key = greatest(unit);
                assert!(key.as_bytes() <= after.as_bytes(), "{unit:?} under {folder}");
            }
            // …and below the first key past it.
            let mut next = folder[..folder.len() - 1].to_owned();
            next.push('0');
            assert!(after.as_bytes() < next.as_bytes());
        }
    }
}
