//! Telemetry as named events: each type is one thing that happens, and its
//! `emit()` writes the log line (with structured fields) *and* updates the
//! metrics, in one place. Code that does the work builds an event and emits it;
//! it never calls `tracing` and a counter side by side.
//!
//! Ingest events that ops read per instance (readiness, the demo summary) also
//! update the role's [`IngestStatus`].

use std::fmt::{Debug, Display};
use std::time::Duration;

use super::metrics::{metrics, Metrics, FLUSH_DURATION, HTTP_DURATION, UPLOAD_DURATION, WINDOW_DURATION};
use crate::catalogue::Table;
use crate::ingest::IngestStatus;
use crate::store::{RejectedRecord, WriteOutcome};

/// Log targets: the part of the service an event belongs to, so that `LOG_LEVEL`
/// directives such as `dwh_helper::ingest=debug` reach its events.
const INGEST: &str = "dwh_helper::ingest";
const ARCHIVE: &str = "dwh_helper::archive";
const APPMETRICA: &str = "dwh_helper::appmetrica";

/// What an event can carry as a cause or a name: shown in logs, debuggable.
pub trait Shown: Display + Debug + Sync {}

impl<T: Display + Debug + Sync + ?Sized> Shown for T {}

/// The ingest role started: every table's failing and stopped gauges read 0, so
/// that alerts on them see a series from the start.
#[derive(Debug)]
pub struct IngestStarted<'a> {
    pub group: &'a str,
    pub prefix: &'a str,
}

impl IngestStarted<'_> {
    pub fn emit(&self) {
        tracing::info!(target: INGEST, group = %self.group, prefix = %self.prefix, "ingest started");
        for table in Table::ALL {
            let labels = Metrics::table(table);
            metrics().failing.get_or_create(&labels).set(0);
            metrics().table_stopped.get_or_create(&labels).set(0);
        }
    }
}

/// Records of a table read from Kafka into its batcher.
#[derive(Debug)]
pub struct RecordsConsumed {
    pub table: Table,
    pub records: u64,
}

impl RecordsConsumed {
    pub fn emit(&self) {
        metrics()
            .records_consumed
            .get_or_create(&Metrics::table(self.table))
            .inc_by(self.records);
    }
}

/// The catalogue refused a record; it lands in the rejects table with its batch
/// (and is counted then, by [`BatchCommitted`]).
#[derive(Debug)]
pub struct RecordRejected<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a dyn Shown,
}

impl RecordRejected<'_> {
    pub fn emit(&self) {
        tracing::warn!(target: INGEST, topic = %self.topic, partition = self.partition, offset = self.offset, reason = %self.reason, "record rejected");
    }
}

/// A batch landed in the DWH with its offsets, in one transaction.
#[derive(Debug)]
pub struct BatchCommitted<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub outcome: &'a WriteOutcome,
    /// Rejected by the catalogue, before the write.
    pub rejects: &'a [RejectedRecord],
    pub bytes: usize,
    pub took: Duration,
}

impl BatchCommitted<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        for reject in &self.outcome.refused {
            tracing::warn!(target: INGEST, topic = %self.topic, partition = reject.partition, offset = reject.offset, reason = %reject.reason, "record rejected by the database");
        }
        let rejects = self.rejects.len() + self.outcome.refused.len();
        status.batch_written(self.outcome, rejects, self.bytes, self.took);
        let m = metrics();
        let labels = Metrics::table(self.table);
        let inserted = self.outcome.inserted;
        m.rows_inserted.get_or_create(&labels).inc_by(inserted);
        m.rows_updated.get_or_create(&labels).inc_by(self.outcome.updated);
        m.rows_skipped.get_or_create(&labels).inc_by(self.outcome.skipped);
        for reject in self.rejects.iter().chain(&self.outcome.refused) {
            m.rejects
                .get_or_create(&Metrics::table_and(self.table, "reason", reject.class))
                .inc();
        }
        m.ingested_bytes.get_or_create(&labels).inc_by(self.bytes as u64);
        m.batches.get_or_create(&labels).inc();
        m.flush_duration.get_or_create(&labels).observe(self.took.as_secs_f64());
        super::otel::record(FLUSH_DURATION.0, &labels, self.took.as_secs_f64());
        tracing::debug!(
            target: INGEST,
            topic = %self.topic,
            inserted,
            updated = self.outcome.updated,
            skipped = self.outcome.skipped,
            rejects,
            bytes = self.bytes,
            took_ms = self.took.as_secs_f64() * 1000.0,
            "batch committed"
        );
    }
}

/// A DWH write failed for a reason other than a fence; the same batch is retried.
#[derive(Debug)]
pub struct WriteFailed<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub error: &'a dyn Shown,
    pub retry_in: Duration,
}

impl WriteFailed<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        tracing::warn!(
            target: INGEST,
            topic = %self.topic,
            error = %self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "DWH write failed; retrying the same batch"
        );
        status.set_failing(self.topic, Some(self.error.to_string()));
        status.retried();
        let labels = Metrics::table(self.table);
        metrics().write_retries.get_or_create(&labels).inc();
        metrics().failing.get_or_create(&labels).set(1);
    }
}

/// A write landed: the table's failing state, if any, is over.
#[derive(Debug)]
pub struct WritesRecovered<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// The batch had landed on an earlier attempt whose answer was lost.
    pub landed_earlier: bool,
}

impl WritesRecovered<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        if self.landed_earlier {
            tracing::info!(target: INGEST, topic = %self.topic, "an earlier attempt of this batch had committed");
        }
        if status.set_failing(self.topic, None) {
            tracing::info!(target: INGEST, topic = %self.topic, "DWH writes succeed again");
            let still = i64::from(status.is_failing(self.topic));
            metrics().failing.get_or_create(&Metrics::table(self.table)).set(still);
        }
    }
}

/// Another member moved a partition's offset: the batch is dropped and the
/// consumer rejoins (whoever owns the partition now writes it).
#[derive(Debug)]
pub struct OffsetFenced<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub error: &'a dyn Shown,
}

impl OffsetFenced<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        tracing::warn!(target: INGEST, topic = %self.topic, error = %self.error, "offset fenced: batch dropped, rejoining the group");
        status.set_failing(self.topic, None);
        let labels = Metrics::table(self.table);
        metrics().batches_fenced.get_or_create(&labels).inc();
        metrics().failing.get_or_create(&labels).set(0);
    }
}

/// Partitions came or went; `now` is how many the table's consumer holds after.
#[derive(Debug)]
pub struct Rebalanced {
    pub table: Table,
    pub now: usize,
}

impl Rebalanced {
    pub fn emit(&self, status: &IngestStatus) {
        status.rebalanced();
        let labels = Metrics::table(self.table);
        metrics().rebalances.get_or_create(&labels).inc();
        metrics()
            .partitions_assigned
            .get_or_create(&labels)
            .set(self.now as i64);
    }
}

/// A table's consumer ended (restart or shutdown): it holds no partitions.
#[derive(Debug)]
pub struct ConsumerEnded {
    pub table: Table,
}

impl ConsumerEnded {
    pub fn emit(&self) {
        let labels = Metrics::table(self.table);
        metrics().partitions_assigned.get_or_create(&labels).set(0);
        metrics().buffered_records.get_or_create(&labels).set(0);
    }
}

/// How much a table holds in memory now.
#[derive(Debug)]
pub struct BufferLevel {
    pub table: Table,
    pub records: usize,
    pub held_bytes: u64,
    pub budget_bytes: u64,
}

impl BufferLevel {
    pub fn emit(&self) {
        let m = metrics();
        let labels = Metrics::table(self.table);
        m.buffered_records.get_or_create(&labels).set(self.records as i64);
        m.memory_held.get_or_create(&labels).set(self.held_bytes as i64);
        m.memory_budget.get_or_create(&labels).set(self.budget_bytes as i64);
    }
}

/// Fetching paused: the memory budget is spent or the writer is behind.
#[derive(Debug)]
pub struct FetchPaused {
    pub table: Table,
}

impl FetchPaused {
    pub fn emit(&self, status: &IngestStatus) {
        status.paused();
        metrics().fetch_pauses.get_or_create(&Metrics::table(self.table)).inc();
    }
}

/// A consumer of a table cannot work until someone acts (credentials refused, a
/// certificate not trusted, a permission missing, records it cannot read);
/// librdkafka goes on retrying. For the ingest role the table is failing (ready
/// 503, `status`, the failing gauge) until [`KafkaRecovered`].
#[derive(Debug)]
pub struct KafkaFailing<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub kind: &'static str,
    pub reason: &'a str,
}

impl KafkaFailing<'_> {
    pub fn emit(&self, status: Option<&IngestStatus>) {
        let target = if status.is_some() { INGEST } else { ARCHIVE };
        metrics()
            .kafka_errors
            .get_or_create(&vec![
                ("table", self.table.name().to_owned()),
                ("role", self.role.to_owned()),
                ("kind", self.kind.to_owned()),
            ])
            .inc();
        let Some(status) = status else {
            tracing::error!(target: ARCHIVE, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: the archive consumer cannot work");
            return;
        };
        if status.set_kafka_failing(self.topic, Some(format!("kafka {}: {}", self.kind, self.reason))) {
            tracing::error!(target, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: the table's consumer cannot work; the table is failing");
        } else {
            tracing::debug!(target, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: still failing");
        }
        metrics().failing.get_or_create(&Metrics::table(self.table)).set(1);
    }
}

/// A table's consumer works again after [`KafkaFailing`].
#[derive(Debug)]
pub struct KafkaRecovered<'a> {
    pub table: Table,
    pub topic: &'a str,
}

impl KafkaRecovered<'_> {
    pub fn emit(&self, status: Option<&IngestStatus>) {
        let Some(status) = status else {
            tracing::info!(target: ARCHIVE, topic = %self.topic, "kafka: the archive consumer works again");
            return;
        };
        if status.set_kafka_failing(self.topic, None) {
            tracing::info!(target: INGEST, topic = %self.topic, "kafka: the table's consumer works again");
            let still = i64::from(status.is_failing(self.topic));
            metrics().failing.get_or_create(&Metrics::table(self.table)).set(still);
        }
    }
}

/// A stored offset does not fit the log: the table stops until an operator acts.
#[derive(Debug)]
pub struct TableStopped<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub reason: &'a str,
}

impl TableStopped<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        tracing::error!(target: INGEST, topic = %self.topic, reason = %self.reason, "table stopped: a stored offset does not fit the log");
        status.table_stopped(self.topic, self.reason);
        metrics()
            .table_stopped
            .get_or_create(&Metrics::table(self.table))
            .set(1);
    }
}

/// A stored offset outside the log was moved, as KAFKA_ON_OFFSET_OUT_OF_RANGE asks.
#[derive(Debug)]
pub struct OffsetMoved<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub partition: i32,
    pub stored: i64,
    pub to: i64,
}

impl OffsetMoved<'_> {
    pub fn emit(&self, status: &IngestStatus) {
        tracing::warn!(
            target: INGEST,
            topic = %self.topic,
            partition = self.partition,
            stored = self.stored,
            to = self.to,
            skipped_records = (self.to - self.stored).max(0),
            "stored offset outside the log moved as KAFKA_ON_OFFSET_OUT_OF_RANGE asks"
        );
        status.offset_moved();
        metrics().offsets_moved.get_or_create(&Metrics::table(self.table)).inc();
    }
}

/// An archive object was stored in S3.
#[derive(Debug)]
pub struct ArchiveStored<'a> {
    pub table: Table,
    pub key: &'a str,
    pub records: u64,
    pub bytes: u64,
    pub took: Duration,
}

impl ArchiveStored<'_> {
    pub fn emit(&self) {
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
        super::otel::record(UPLOAD_DURATION.0, &labels, self.took.as_secs_f64());
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

impl ArchiveUploadFailed<'_> {
    pub fn emit(&self) {
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

impl ArchiveObjectKept<'_> {
    pub fn emit(&self) {
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

/// One Logs API request answered (or failed to connect: `status` 0).
#[derive(Debug)]
pub struct AppMetricaResponse {
    pub status: u16,
}

impl AppMetricaResponse {
    /// The bounded class of a status: `200`, `202`, `429`, `4xx`, `5xx`, `error`.
    pub fn class(status: u16) -> &'static str {
        match status {
            0 => "error",
            200 => "200",
            202 => "202",
            429 => "429",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        }
    }

    pub fn emit(&self) {
        let m = metrics();
        m.appmetrica_polls.get_or_create(&Vec::new()).inc();
        m.appmetrica_responses
            .get_or_create(&vec![("status", Self::class(self.status).to_owned())])
            .inc();
    }
}

/// An AppMetrica window was fetched and published.
#[derive(Debug)]
pub struct AppMetricaWindowDone<'a> {
    pub window: &'a dyn Shown,
    /// The Logs API endpoint (`events`, `installations`, ...): a bounded label.
    pub endpoint: &'a str,
    pub rows_fetched: u64,
    pub rows_published: u64,
    pub unmapped: u64,
    pub parts: u32,
    pub took: Duration,
}

impl AppMetricaWindowDone<'_> {
    pub fn emit(&self) {
        tracing::info!(
            target: APPMETRICA,
            window = %self.window,
            fetched = self.rows_fetched,
            published = self.rows_published,
            unmapped = self.unmapped,
            parts = self.parts,
            took_ms = self.took.as_millis() as u64,
            "window published"
        );
        let m = metrics();
        let labels = vec![("endpoint", self.endpoint.to_owned())];
        m.appmetrica_rows_fetched
            .get_or_create(&labels)
            .inc_by(self.rows_fetched);
        m.appmetrica_rows_published
            .get_or_create(&labels)
            .inc_by(self.rows_published);
        m.appmetrica_window_duration
            .get_or_create(&labels)
            .observe(self.took.as_secs_f64());
        super::otel::record(WINDOW_DURATION.0, &labels, self.took.as_secs_f64());
    }
}

/// An HTTP request was answered.
#[derive(Debug)]
pub struct HttpRequestServed<'a> {
    /// The route template (`/api/v1/tables/{table}`), or `unmatched`.
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub took: Duration,
}

impl HttpRequestServed<'_> {
    pub fn emit(&self) {
        let m = metrics();
        let route = vec![("route", self.route.to_owned()), ("method", self.method.to_owned())];
        m.http_duration.get_or_create(&route).observe(self.took.as_secs_f64());
        super::otel::record(HTTP_DURATION.0, &route, self.took.as_secs_f64());
        let mut labels = route;
        labels.push(("status", self.status.to_string()));
        m.http_requests.get_or_create(&labels).inc();
    }
}
