//! Kafka events: what the clients of every role (ingest, archive) meet. Every
//! error counts in `dwh_helper_kafka_errors_total{table,role,kind}`: the failures
//! a person must act on (`authentication`, `tls`, `authorization`,
//! `unreadable records`), which fail an ingest table, and the ones the client
//! goes through on its own (`client`, `consume`, `commit`, `rebalance`,
//! `pause`, `close`, `poll`, `out_of_range`, `watermarks`, `committed`).

use crate::catalogue::Table;
use crate::telemetry::event::{Event, Shown, ARCHIVE, INGEST, KAFKA};
use crate::telemetry::metrics::{metrics, Metrics};

fn count(table: Table, role: &str, kind: &str) {
    metrics()
        .kafka_errors
        .get_or_create(&vec![
            ("table", table.name().to_owned()),
            ("role", role.to_owned()),
            ("kind", kind.to_owned()),
        ])
        .inc();
}

/// A consumer of a table cannot work until someone acts (credentials refused, a
/// certificate not trusted, a permission missing, records it cannot read);
/// librdkafka goes on retrying. For the ingest role the table is failing (ready
/// 503, `status`, the failing gauge) until [`KafkaRecovered`]: the role records
/// that in its status, then emits this.
#[derive(Debug)]
pub struct KafkaFailing<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub kind: &'static str,
    pub reason: &'a str,
    /// The table was not failing for this before (ingest: it is failing now).
    pub first: bool,
}

impl Event for KafkaFailing<'_> {
    fn emit(&self) {
        count(self.table, self.role, self.kind);
        if self.role != "ingest" {
            tracing::error!(target: ARCHIVE, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: the archive consumer cannot work");
            return;
        }
        if self.first {
            tracing::error!(target: INGEST, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: the table's consumer cannot work; the table is failing");
        } else {
            tracing::debug!(target: INGEST, topic = %self.topic, kind = self.kind, reason = %self.reason, "kafka: still failing");
        }
        metrics().failing.get_or_create(&Metrics::table(self.table)).set(1);
    }
}

/// A table's consumer works again after [`KafkaFailing`].
#[derive(Debug)]
pub struct KafkaRecovered<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
    /// Ingest: the table's Kafka failure was cleared (false when none was kept).
    pub cleared: bool,
    /// Ingest: the table still fails for another reason (its writes).
    pub still_failing: bool,
}

impl Event for KafkaRecovered<'_> {
    fn emit(&self) {
        if self.role != "ingest" {
            tracing::info!(target: ARCHIVE, topic = %self.topic, "kafka: the archive consumer works again");
            return;
        }
        if self.cleared {
            tracing::info!(target: INGEST, topic = %self.topic, "kafka: the table's consumer works again");
            let still = i64::from(self.still_failing);
            metrics().failing.get_or_create(&Metrics::table(self.table)).set(still);
        }
    }
}

/// A Kafka client error that the client goes through on its own (a transport
/// error, a failed commit, a rebalance it could not apply): counted and logged.
/// `kind` is bounded: `client`, `consume`, `commit`, `rebalance`, `pause`,
/// `close`. A commit failure loses nothing: the DWH holds the offsets, Kafka's
/// committed offsets only mirror them.
#[derive(Debug)]
pub struct KafkaError<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub kind: &'static str,
    /// What the client was doing, for the log line.
    pub what: &'a str,
    pub error: &'a dyn Shown,
    /// Whether ops should see it as a warning (else debug: an expected error,
    /// such as a commit refused while a rebalance is in progress).
    pub warn: bool,
}

impl Event for KafkaError<'_> {
    fn emit(&self) {
        count(self.table, self.role, self.kind);
        if self.warn {
            tracing::warn!(target: KAFKA, topic = %self.topic, role = self.role, kind = self.kind, error = %self.error, "kafka: {}", self.what);
        } else {
            tracing::debug!(target: KAFKA, topic = %self.topic, role = self.role, kind = self.kind, error = %self.error, "kafka: {}", self.what);
        }
    }
}

/// A consumer's poll thread failed: the consumer is rebuilt. Counted as kind
/// `poll`.
#[derive(Debug)]
pub struct PollFailed<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub reason: &'a str,
}

impl Event for PollFailed<'_> {
    fn emit(&self) {
        count(self.table, self.role, "poll");
        tracing::error!(target: KAFKA, topic = %self.topic, role = self.role, reason = %self.reason, "the poll thread failed; rebuilding the consumer");
    }
}

/// A fetch fell outside the log (records expired, or the topic was recreated):
/// the ingest writes what it buffered, then decides again from the DWH's
/// offsets and the watermarks. Counted as kind `out_of_range`.
#[derive(Debug)]
pub struct FetchOutOfRange<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub cause: &'a str,
}

impl Event for FetchOutOfRange<'_> {
    fn emit(&self) {
        count(self.table, "ingest", "out_of_range");
        tracing::warn!(target: INGEST, topic = %self.topic, cause = %self.cause, "a fetch fell outside the log; checking the stored offsets");
    }
}

/// Why a consumer is being rebuilt, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The task asked for it (a fence, a fetch out of range, the poll thread gone).
    Asked,
    /// The consumer failed.
    Failed,
    /// The consumer could not be built (retried).
    Unbuildable,
    /// The table stopped until an operator acts: not rebuilt.
    Stopped,
}

/// A table's consumer ended other than by shutdown: rebuilt a second later, or
/// (for [`Restart::Stopped`]) left down. Counted in
/// `dwh_helper_consumer_restarts_total{table,role}` (a stop is not a restart:
/// readiness, `status` and the stopped gauge tell of it).
#[derive(Debug)]
pub struct ConsumerRestart<'a> {
    pub table: Table,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub reason: &'a dyn Shown,
    pub after: Restart,
}

impl Event for ConsumerRestart<'_> {
    fn emit(&self) {
        let (table, role, reason) = (self.table.name(), self.role, self.reason);
        match self.after {
            Restart::Asked => tracing::warn!(target: KAFKA, table, role, reason = %reason, "restarting the consumer"),
            Restart::Failed => {
                tracing::error!(target: KAFKA, table, role, error = %reason, "consumer failed; restarting it")
            }
            Restart::Unbuildable => {
                tracing::error!(target: KAFKA, table, role, error = %reason, "cannot build the consumer")
            }
            Restart::Stopped => {
                tracing::error!(target: KAFKA, table, role, reason = %reason, "consumer stopped until an operator acts");
                return;
            }
        }
        metrics()
            .consumer_restarts
            .get_or_create(&vec![("table", table.to_owned()), ("role", role.to_owned())])
            .inc();
    }
}
