//! Objects: metadata, streamed downloads (whole or by range), conditional
//! uploads (multipart past the threshold, aborted on failure) and deletes.

use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};

use super::error::classify;
use super::multipart::Multipart;
use super::{to_chrono, Condition, Download, ObjectInfo, Put, S3Error, Stored, MIN_PART, S3};

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

pub(super) fn conflict_on_precondition(e: S3Error, key: &str) -> S3Error {
    match e {
        S3Error::PreconditionFailed { .. } => S3Error::Conflict { key: key.to_owned() },
        other => other,
    }
}

impl ObjectInfo {
    /// What a HEAD or a GET answered of `key` (the SDK's two outputs have the
    /// same fields, in two types).
    fn of(
        key: &str,
        size: Option<i64>,
        content_type: Option<&str>,
        last_modified: Option<&aws_sdk_s3::primitives::DateTime>,
        etag: Option<&str>,
        metadata: Option<&std::collections::HashMap<String, String>>,
    ) -> Self {
        ObjectInfo {
            key: key.to_owned(),
            size: size.unwrap_or(0).max(0) as u64,
            content_type: content_type.map(str::to_owned),
            last_modified: last_modified.and_then(to_chrono),
            etag: etag.map(str::to_owned),
            metadata: metadata.cloned().unwrap_or_default().into_iter().collect(),
        }
    }
}

impl S3 {
    /// Size, content type, last modification, ETag and metadata of `key`.
    pub async fn object_info(&self, key: &str) -> Result<ObjectInfo, S3Error> {
        let h = self
            .sent(key, self.client.head_object().bucket(&self.bucket).key(key).send())
            .await?;
        Ok(ObjectInfo::of(
            key,
            h.content_length(),
            h.content_type(),
            h.last_modified(),
            h.e_tag(),
            h.metadata(),
        ))
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
            .sent(key, self.client.get_object().bucket(&self.bucket).key(key).send())
            .await?;
        let r = &response;
        let info = ObjectInfo::of(
            key,
            r.content_length(),
            r.content_type(),
            r.last_modified(),
            r.e_tag(),
            r.metadata(),
        );
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
    pub(super) async fn get_range(&self, key: &str, start: u64, end: u64, etag: &str) -> Result<Bytes, S3Error> {
        debug_assert!(start < end);
        let request = self.client.get_object().bucket(&self.bucket).key(key);
        let request = request.range(format!("bytes={start}-{}", end - 1)).if_match(etag);
        let response = self.sent(key, request.send()).await?;
        let data = response
            .body
            .collect()
            .await
            .map_err(|e| S3Error::Unreachable { detail: e.to_string() })?;
        Ok(data.into_bytes())
    }

    /// Stores `body` at `key`, as `put` says. Bodies up to the multipart
    /// threshold go up in one request; larger ones as a multipart upload of
    /// 5 MiB parts (the smallest S3 allows, to keep memory low), aborted if
    /// anything fails. A size hint over the threshold goes straight to
    /// multipart, so memory stays around one part whatever the size. Under a
    /// condition, the object is stored only while it holds when the upload
    /// completes; otherwise [`S3Error::PreconditionFailed`] (or
    /// [`S3Error::Conflict`] for a concurrent conditional write), and nothing
    /// changed.
    pub async fn put_object<S, E>(&self, key: &str, body: S, put: Put<'_>) -> Result<Stored, S3Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let Put {
            content_type,
            metadata,
            size_hint,
            condition,
        } = put;
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
    pub(super) async fn put_whole(
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
        self.sent(key, self.client.delete_object().bucket(&self.bucket).key(key).send())
            .await?;
        Ok(())
    }
}
