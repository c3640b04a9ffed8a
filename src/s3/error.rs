//! The S3 errors, and the one place where store answers are mapped to them.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What can go wrong talking to the object store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Error {
    #[error("object \"{key}\" does not exist")]
    NotFound { key: String },
    #[error("bucket \"{bucket}\" does not exist")]
    BucketMissing { bucket: String },
    #[error("the object store denied access: {detail}")]
    AccessDenied { detail: String },
    /// Unreachable, timing out or answering 5xx: try again later.
    #[error("object store unreachable: {detail}")]
    Unreachable { detail: String },
    /// The object changed under a conditional write; nothing was written.
    #[error("\"{key}\" changed while it was being written; nothing was written")]
    Conflict { key: String },
    #[error("precondition failed for \"{key}\"")]
    PreconditionFailed { key: String },
    #[error("{detail}")]
    BadRequest { detail: String },
    /// A patch offset past the object's current end.
    #[error("offset {offset} is past the end of \"{key}\" ({size} bytes)")]
    PastTheEnd { key: String, offset: u64, size: u64 },
    #[error("object store error {code}: {detail}")]
    Other { code: String, detail: String },
}

impl S3Error {
    /// Whether the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, S3Error::Unreachable { .. })
    }
}

/// Maps an SDK error for `key` in `bucket` (`key` empty for bucket operations).
pub fn classify<E>(error: SdkError<E, HttpResponse>, bucket: &str, key: &str) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let full = DisplayErrorContext(&error).to_string();
    let detail = full.clone();
    let service = match &error {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => return S3Error::Unreachable { detail },
        SdkError::ServiceError(service) => service,
        _ => {
            return S3Error::Other {
                code: "unexpected response".into(),
                detail,
            }
        }
    };
    let code = service.err().code().unwrap_or_default().to_owned();
    let status = service.raw().status().as_u16();
    let message = service.err().message().unwrap_or_default().to_owned();
    let detail = if message.is_empty() {
        format!("{code} (HTTP {status})")
    } else {
        format!("{code}: {message}")
    };
    match (code.as_str(), status) {
        ("NoSuchBucket", _) => S3Error::BucketMissing {
            bucket: bucket.to_owned(),
        },
        ("NoSuchKey", _) | ("NotFound", _) | (_, 404) if !key.is_empty() => S3Error::NotFound { key: key.to_owned() },
        ("NotFound", _) | (_, 404) if key.is_empty() && code != "NoSuchLifecycleConfiguration" => {
            S3Error::BucketMissing {
                bucket: bucket.to_owned(),
            }
        }
        ("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "Forbidden", _) | (_, 403) => {
            S3Error::AccessDenied { detail }
        }
        ("PreconditionFailed", _) | (_, 412) => S3Error::PreconditionFailed { key: key.to_owned() },
        ("InvalidRange", _) | (_, 416) => S3Error::BadRequest { detail },
        (_, 500..=599) => S3Error::Unreachable { detail },
        _ if code.is_empty() => S3Error::Other {
            code: format!("HTTP {status}"),
            detail: full,
        },
        _ => S3Error::Other { code, detail },
    }
}
