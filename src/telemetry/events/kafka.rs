//! Kafka events: what the clients of every role (ingest, archive) meet. Every
//! error counts in `dwh_helper_kafka_errors_total{table,role,kind}`: the failures
//! a person must act on (`authentication`, `tls`, `authorization`,
//! `unreadable records`, `topic deleted`), which fail an ingest table, and the
//! ones the client goes through on its own (`unknown topic` for a topic not
//! created yet, `client`, `consume`, `commit`, `rebalance`, `pause`, `close`,
//! `poll`, `out_of_range`, `watermarks`, `committed`, and `log` for a line
//! librdkafka logs at error level).

use crate::catalogue::Table;
use crate::telemetry::event::{Event, Shown, ARCHIVE, INGEST, KAFKA};
use crate::telemetry::metrics::{metrics, Metrics};

/// Which consumer an event is about: a role's consumer of a table's topic.
#[derive(Debug, Clone, Copy)]
pub struct Consumer<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// `ingest` or `archive`.
    pub role: &'static str,
}

impl Consumer<'_> {
    fn count(&self, kind: &str) {
        count(self.table, self.role, kind);
    }
}

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
    pub consumer: Consumer<'a>,
    pub kind: &'static str,
    pub reason: &'a str,
    /// The table was not failing for this before (ingest: it is failing now).
    pub first: bool,
}

impl Event for KafkaFailing<'_> {
    fn emit(&self) {
        let Consumer { table, topic, role } = self.consumer;
        count(table, role, self.kind);
        if role != "ingest" {
            tracing::error!(target: ARCHIVE, topic, kind = self.kind, reason = %self.reason, "kafka: the archive consumer cannot work");
            return;
        }
        if self.first {
            tracing::error!(target: INGEST, topic, kind = self.kind, reason = %self.reason, "kafka: the table's consumer cannot work; the table is failing");
        } else {
            tracing::debug!(target: INGEST, topic, kind = self.kind, reason = %self.reason, "kafka: still failing");
        }
        metrics().failing.get_or_create(&Metrics::table(table)).set(1);
    }
}

/// A table's consumer works again after [`KafkaFailing`].
#[derive(Debug)]
pub struct KafkaRecovered<'a> {
    pub consumer: Consumer<'a>,
    /// Ingest: the table's Kafka failure was cleared (false when none was kept).
    pub cleared: bool,
    /// Ingest: the table still fails for another reason (its writes).
    pub still_failing: bool,
}

impl Event for KafkaRecovered<'_> {
    fn emit(&self) {
        let Consumer { table, topic, role } = self.consumer;
        if role != "ingest" {
            tracing::info!(target: ARCHIVE, topic, "kafka: the archive consumer works again");
            return;
        }
        if self.cleared {
            tracing::info!(target: INGEST, topic, "kafka: the table's consumer works again");
            let still = i64::from(self.still_failing);
            metrics().failing.get_or_create(&Metrics::table(table)).set(still);
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
    pub consumer: Consumer<'a>,
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
        let Consumer { topic, role, .. } = self.consumer;
        self.consumer.count(self.kind);
        if self.warn {
            tracing::warn!(target: KAFKA, topic, role, kind = self.kind, error = %self.error, "kafka: {}", self.what);
        } else {
            tracing::debug!(target: KAFKA, topic, role, kind = self.kind, error = %self.error, "kafka: {}", self.what);
        }
    }
}

/// A consumer's poll thread failed: the consumer is rebuilt. Counted as kind
/// `poll`.
#[derive(Debug)]
pub struct PollFailed<'a> {
    pub consumer: Consumer<'a>,
    pub reason: &'a str,
}

impl Event for PollFailed<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        self.consumer.count("poll");
        tracing::error!(target: KAFKA, topic, role, reason = %self.reason, "the poll thread failed; rebuilding the consumer");
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

/// A table's consumer ended other than by shutdown: rebuilt after `retry_in`
/// (1 s, doubling to 30 s while it keeps ending within a minute), or (for
/// [`Restart::Stopped`]) left down. Counted in
/// `dwh_helper_consumer_restarts_total{table,role}` (a stop is not a restart:
/// readiness, `status` and the stopped gauge tell of it).
#[derive(Debug)]
pub struct ConsumerRestart<'a> {
    pub table: Table,
    /// `ingest` or `archive`.
    pub role: &'static str,
    pub reason: &'a dyn Shown,
    pub after: Restart,
    pub retry_in: std::time::Duration,
}

impl Event for ConsumerRestart<'_> {
    fn emit(&self) {
        let (table, role, reason) = (self.table.name(), self.role, self.reason);
        let retry_in_ms = self.retry_in.as_millis() as u64;
        match self.after {
            Restart::Asked => {
                tracing::warn!(target: KAFKA, table, role, reason = %reason, retry_in_ms, "restarting the consumer")
            }
            Restart::Failed => {
                tracing::error!(target: KAFKA, table, role, error = %reason, retry_in_ms, "consumer failed; restarting it")
            }
            Restart::Unbuildable => {
                tracing::error!(target: KAFKA, table, role, error = %reason, retry_in_ms, "cannot build the consumer")
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

/// A line of librdkafka's log, at its level (target `librdkafka`, event
/// `librdkafka_log`). Lines at error level and above count as kind `log`; a
/// failed Kafka commit (facility `COMMITFAIL`) is shown at debug and not
/// counted: it loses nothing (the DWH holds the offsets and the commit only
/// mirrors them for lag tools), and one fails whenever a rebalance is in
/// progress.
#[derive(Debug)]
pub struct ClientLog<'a> {
    pub consumer: Consumer<'a>,
    pub level: tracing::Level,
    pub facility: &'a str,
    pub message: &'a str,
}

impl Event for ClientLog<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        let (facility, message) = (self.facility, self.message);
        let event = "librdkafka_log";
        if facility == "COMMITFAIL" {
            tracing::debug!(target: "librdkafka", event, topic, role, facility, "librdkafka: {message}");
            return;
        }
        match self.level {
            tracing::Level::ERROR => {
                self.consumer.count("log");
                tracing::error!(target: "librdkafka", event, topic, role, facility, "librdkafka: {message}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "librdkafka", event, topic, role, facility, "librdkafka: {message}")
            }
            tracing::Level::INFO => {
                tracing::info!(target: "librdkafka", event, topic, role, facility, "librdkafka: {message}")
            }
            _ => tracing::debug!(target: "librdkafka", event, topic, role, facility, "librdkafka: {message}"),
        }
    }
}

/// The group moved partitions of a consumer's topic: `assigned` (taken on) or
/// revoked. A revoke that could not wait for the buffered records to be
/// written (`late`) is a warning: a write of them that lands later is fenced if
/// the next owner wrote first.
#[derive(Debug)]
pub struct PartitionsMoved<'a> {
    pub consumer: Consumer<'a>,
    pub partitions: &'a [i32],
    pub assigned: bool,
    pub late: Option<std::time::Duration>,
}

impl Event for PartitionsMoved<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        let partitions = self.partitions;
        if self.assigned {
            tracing::info!(target: KAFKA, event = "partitions_assigned", topic, role, ?partitions, "partitions assigned");
            return;
        }
        if let Some(waited) = self.late {
            let wait_ms = waited.as_millis() as u64;
            tracing::warn!(target: KAFKA, topic, role, ?partitions, wait_ms, "revoking before the buffered records were written");
        }
        tracing::info!(target: KAFKA, event = "partitions_revoked", topic, role, ?partitions, "partitions revoked");
    }
}

/// The task did not say within `waited` where newly assigned partitions start
/// (it awaits a stalled write or the DWH): they are assigned paused, so that the
/// member stays in its group, and start once it answers ([`AssignmentStarted`]).
/// Counted in `dwh_helper_assignments_deferred_total{table}`.
#[derive(Debug)]
pub struct AssignmentDeferred<'a> {
    pub consumer: Consumer<'a>,
    pub partitions: &'a [i32],
    pub waited: std::time::Duration,
}

impl Event for AssignmentDeferred<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        let (partitions, wait_ms) = (self.partitions, self.waited.as_millis() as u64);
        metrics()
            .assignments_deferred
            .get_or_create(&Metrics::table(self.consumer.table))
            .inc();
        tracing::warn!(
            target: KAFKA,
            event = "assignment_deferred",
            topic,
            role,
            ?partitions,
            wait_ms,
            "partitions assigned paused: the table's task has not said where they start"
        );
    }
}

/// Deferred partitions were sought to the start the task chose, and fetch.
#[derive(Debug)]
pub struct AssignmentStarted<'a> {
    pub consumer: Consumer<'a>,
    pub partitions: &'a [i32],
}

impl Event for AssignmentStarted<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        let partitions = self.partitions;
        tracing::info!(target: KAFKA, event = "assignment_started", topic, role, ?partitions, "deferred partitions start");
    }
}

/// A poll found the consumer's topic unknown to the broker (not created yet,
/// or deleted); the start warned of a missing topic once ([`TopicMissing`]).
#[derive(Debug)]
pub struct TopicUnavailable<'a> {
    pub consumer: Consumer<'a>,
}

impl Event for TopicUnavailable<'_> {
    fn emit(&self) {
        self.consumer.count("unknown topic");
        let Consumer { topic, role, .. } = self.consumer;
        tracing::debug!(target: KAFKA, event = "topic_unavailable", topic, role, "topic not available yet");
    }
}

/// A consumer paused fetching (memory budget spent or the writer behind) or
/// resumed it. The pauses count in `dwh_helper_fetch_pauses_total` (the role's
/// event).
#[derive(Debug)]
pub struct FetchSwitched<'a> {
    pub consumer: Consumer<'a>,
    pub paused: bool,
}

impl Event for FetchSwitched<'_> {
    fn emit(&self) {
        let Consumer { topic, role, .. } = self.consumer;
        if self.paused {
            tracing::debug!(target: KAFKA, topic, role, "memory budget spent or the writer behind: fetching paused");
        } else {
            tracing::debug!(target: KAFKA, topic, role, "fetching resumed");
        }
    }
}

/// At the ingest's start, one of its topics does not exist: it is consumed
/// once it appears (event `topic_missing`, once per topic and start).
#[derive(Debug)]
pub struct TopicMissing<'a> {
    pub topic: &'a str,
}

impl Event for TopicMissing<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: KAFKA,
            event = "topic_missing",
            topic = self.topic,
            "topic does not exist; it is consumed once it appears (KAFKA_CREATE_TOPICS=true creates it)"
        );
    }
}

/// What became of the topics missing at the start when KAFKA_CREATE_TOPICS
/// asks to create them: created, or not (then consumed once they appear).
#[derive(Debug)]
pub struct TopicsCreated<'a> {
    pub topics: &'a [String],
    pub partitions: i32,
    pub error: Option<&'a dyn Shown>,
}

impl Event for TopicsCreated<'_> {
    fn emit(&self) {
        let topics = self.topics;
        match self.error {
            None => tracing::info!(target: KAFKA, ?topics, partitions = self.partitions, "topics created"),
            Some(error) => {
                tracing::warn!(target: KAFKA, ?topics, error = %error, "cannot create topics; they are consumed once they appear")
            }
        }
    }
}

/// The start could not learn which topics exist (the consumers retry on their
/// own; this check only serves [`TopicMissing`]).
#[derive(Debug)]
pub struct TopicsUnlisted<'a> {
    pub error: &'a dyn Shown,
}

impl Event for TopicsUnlisted<'_> {
    fn emit(&self) {
        tracing::warn!(target: KAFKA, error = %self.error, "cannot list the topics; is Kafka reachable?");
    }
}

/// A role's table task ended by a panic or cancellation (not by its own
/// return): its table is not consumed until the process restarts.
#[derive(Debug)]
pub struct TableTaskFailed<'a> {
    pub role: &'static str,
    pub error: &'a dyn Shown,
}

impl Event for TableTaskFailed<'_> {
    fn emit(&self) {
        tracing::error!(target: KAFKA, role = self.role, error = %self.error, "a table task failed");
    }
}

/// Every table task of a role ended.
#[derive(Debug)]
pub struct RoleStopped {
    pub role: &'static str,
}

impl Event for RoleStopped {
    fn emit(&self) {
        tracing::info!(target: KAFKA, role = self.role, "stopped");
    }
}
