//! A multipart upload in progress: parts uploaded or copied server-side,
//! completed under a condition, or aborted so that no orphan parts stay.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use super::error::classify;
use super::{Condition, S3Error, S3};

/// A multipart upload in progress.
pub(super) struct Multipart<'a> {
    s3: &'a S3,
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
}

impl<'a> Multipart<'a> {
    pub(super) async fn start(
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

    pub(super) async fn upload(&mut self, data: Bytes) -> Result<(), S3Error> {
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
    pub(super) async fn copy(&mut self, source: &str, etag: &str, start: u64, end: u64) -> Result<(), S3Error> {
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

    pub(super) async fn complete(self, condition: Condition<'_>) -> Result<Option<String>, S3Error> {
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

    pub(super) async fn abort(self) {
        abort(self.s3, &self.key, &self.upload_id).await;
    }
}

/// Aborts an upload so that no parts stay behind (and are billed).
pub(super) async fn abort(s3: &S3, key: &str, upload_id: &str) {
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
pub(super) fn percent_encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| {
            url::form_urlencoded::byte_serialize(segment.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_keep_slashes_and_encode_the_rest() {
        assert_eq!(percent_encode_key("a/b c/d+e.csv"), "a/b%20c/d%2Be.csv");
        assert_eq!(percent_encode_key("plain"), "plain");
    }
}
