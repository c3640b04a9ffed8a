//! Archive events: objects stored in S3, uploads failed and retried, objects
//! found stored already.

use std::time::Duration;

use crate::catalogue::Table;
use crate::telemetry::event::{Event, Shown, ARCHIVE};
use crate::telemetry::metrics::{metrics, Metrics, UPLOAD_DURATION};
use crate::telemetry::otel;

/// An archive object was stored in S3.
#[derive(Debug)]
pub struct ArchiveStored<'a> {
    pub table: Table,
    pub key: &'a str,
    pub records: u64,
    pub bytes: u64,
    pub took: Duration,
}

impl Event for ArchiveStored<'_> {
    fn emit(&self) {
        tracing::debug!(
            target: ARCHIVE,
            key = self.key,
            records = self.records,
            bytes = self.bytes,
            "archive object stored"
        );
        let m = metrics();
        let labels = Metrics::table(self.table);
        m.archive_objects.get_or_create(&labels).inc();
        m.archive_bytes.get_or_create(&labels).inc_by(self.bytes);
        m.archive_upload_duration
            .get_or_create(&labels)
            .observe(self.took.as_secs_f64());
        otel::record(UPLOAD_DURATION.0, &labels, self.took.as_secs_f64());
    }
}

/// An archive upload failed; it is retried.
#[derive(Debug)]
pub struct ArchiveUploadFailed<'a> {
    pub table: Table,
    pub key: &'a str,
    pub error: &'a dyn Shown,
    pub retry_in: Duration,
}

impl Event for ArchiveUploadFailed<'_> {
    fn emit(&self) {
        tracing::warn!(target: ARCHIVE, key = self.key, error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64, "archive upload failed; retrying");
        metrics()
            .archive_failures
            .get_or_create(&Metrics::table(self.table))
            .inc();
    }
}

/// An archive object was found stored under its key already (by the partition's
/// other owner, or before a crash): it is kept and the archive goes on after it.
#[derive(Debug)]
pub struct ArchiveObjectKept<'a> {
    pub table: Table,
    pub key: &'a str,
    pub ours: i64,
    pub stored: i64,
}

impl Event for ArchiveObjectKept<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: ARCHIVE,
            key = self.key,
            ours = self.ours,
            stored = self.stored,
            "an archive object is stored under this key already; kept, going on after it"
        );
        metrics().archive_kept.get_or_create(&Metrics::table(self.table)).inc();
    }
}
