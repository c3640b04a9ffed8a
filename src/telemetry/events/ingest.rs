//! Ingest events: records consumed and rejected, batches committed, write
//! failures and recoveries, fences, rebalances, buffers, stops and moved offsets.
//! The ingest role keeps its own state ([`crate::ingest::IngestStatus`]) before
//! it emits; these only tell the logs and the metrics.

use std::time::Duration;

use crate::catalogue::{RejectedRecord, Table};
use crate::telemetry::event::{Event, Shown, INGEST};
use crate::telemetry::metrics::{metrics, Metrics, FLUSH_DURATION};
use crate::telemetry::otel;

/// The ingest role started: every table's failing and stopped gauges read 0, so
/// that alerts on them see a series from the start.
#[derive(Debug)]
pub struct IngestStarted<'a> {
    pub group: &'a str,
    pub prefix: &'a str,
}

impl Event for IngestStarted<'_> {
    fn emit(&self) {
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

impl Event for RecordsConsumed {
    fn emit(&self) {
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

impl Event for RecordRejected<'_> {
    fn emit(&self) {
        tracing::warn!(target: INGEST, topic = %self.topic, partition = self.partition, offset = self.offset, reason = %self.reason, "record rejected");
    }
}

/// A batch landed in the DWH with its offsets, in one transaction.
#[derive(Debug)]
pub struct BatchCommitted<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub inserted: u64,
    pub updated: u64,
    pub skipped: u64,
    /// Rejected by the catalogue, before the write.
    pub rejects: &'a [RejectedRecord],
    /// Refused by the database, rejected in the same transaction.
    pub refused: &'a [RejectedRecord],
    pub bytes: usize,
    pub took: Duration,
}

impl Event for BatchCommitted<'_> {
    fn emit(&self) {
        for reject in self.refused {
            tracing::warn!(target: INGEST, topic = %self.topic, partition = reject.partition, offset = reject.offset, reason = %reject.reason, "record rejected by the database");
        }
        let rejects = self.rejects.len() + self.refused.len();
        let m = metrics();
        let labels = Metrics::table(self.table);
        let inserted = self.inserted;
        m.rows_inserted.get_or_create(&labels).inc_by(inserted);
        m.rows_updated.get_or_create(&labels).inc_by(self.updated);
        m.rows_skipped.get_or_create(&labels).inc_by(self.skipped);
        for reject in self.rejects.iter().chain(self.refused) {
            m.rejects
                .get_or_create(&Metrics::table_and(self.table, "reason", reject.class))
                .inc();
        }
        m.ingested_bytes.get_or_create(&labels).inc_by(self.bytes as u64);
        m.batches.get_or_create(&labels).inc();
        m.flush_duration.get_or_create(&labels).observe(self.took.as_secs_f64());
        otel::record(FLUSH_DURATION.0, &labels, self.took.as_secs_f64());
        tracing::debug!(
            target: INGEST,
            event = "batch_committed",
            topic = %self.topic,
            inserted,
            updated = self.updated,
            skipped = self.skipped,
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

impl Event for WriteFailed<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: INGEST,
            topic = %self.topic,
            error = %self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "DWH write failed; retrying the same batch"
        );
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
    /// The table's write failure was cleared (false when none was kept).
    pub cleared: bool,
    /// The table still fails for another reason (its consumer).
    pub still_failing: bool,
}

impl Event for WritesRecovered<'_> {
    fn emit(&self) {
        if self.landed_earlier {
            tracing::info!(target: INGEST, topic = %self.topic, "an earlier attempt of this batch had committed");
        }
        if self.cleared {
            tracing::info!(target: INGEST, topic = %self.topic, "DWH writes succeed again");
            let still = i64::from(self.still_failing);
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

impl Event for OffsetFenced<'_> {
    fn emit(&self) {
        tracing::warn!(target: INGEST, topic = %self.topic, error = %self.error, "offset fenced: batch dropped, rejoining the group");
        let labels = Metrics::table(self.table);
        metrics().batches_fenced.get_or_create(&labels).inc();
    }
}

/// Write failures of lanes that hold no partition now ended with them (a
/// rebalance moved their partitions away, or the consumer ended): the next
/// owner's writes report their own. `still_failing`: the table fails for
/// another reason (another lane, its Kafka access).
#[derive(Debug)]
pub struct LaneFailuresEnded<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub still_failing: bool,
}

impl Event for LaneFailuresEnded<'_> {
    fn emit(&self) {
        tracing::info!(target: INGEST, topic = %self.topic, still_failing = self.still_failing, "write failures of lanes that hold no partition now ended");
        let still = i64::from(self.still_failing);
        metrics().failing.get_or_create(&Metrics::table(self.table)).set(still);
    }
}

/// Partitions came or went; `now` is how many the table's consumer holds after.
#[derive(Debug)]
pub struct Rebalanced {
    pub table: Table,
    pub now: usize,
}

impl Event for Rebalanced {
    fn emit(&self) {
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

impl Event for ConsumerEnded {
    fn emit(&self) {
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

impl Event for BufferLevel {
    fn emit(&self) {
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

impl Event for FetchPaused {
    fn emit(&self) {
        metrics().fetch_pauses.get_or_create(&Metrics::table(self.table)).inc();
    }
}

/// A stored offset does not fit the log: the table stops until an operator acts.
#[derive(Debug)]
pub struct TableStopped<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub reason: &'a str,
}

impl Event for TableStopped<'_> {
    fn emit(&self) {
        tracing::error!(target: INGEST, event = "table_stopped", topic = %self.topic, reason = %self.reason, "table stopped: its stored offsets do not fit the log");
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

impl Event for OffsetMoved<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: INGEST,
            topic = %self.topic,
            partition = self.partition,
            stored = self.stored,
            to = self.to,
            skipped_records = (self.to - self.stored).max(0),
            "stored offset outside the log moved as KAFKA_ON_OFFSET_OUT_OF_RANGE asks"
        );
        metrics().offsets_moved.get_or_create(&Metrics::table(self.table)).inc();
    }
}

/// Other consumer groups ingest tables this instance ingests, into the same
/// DWH: another deployment (or a changed `KAFKA_GROUP_ID`) whose offsets and
/// fence are its own, so both write every record. A warning with
/// `event = "other_groups"` at the start and whenever the set changes; an
/// info line when none is left. `status` shows them too.
#[derive(Debug)]
pub struct OtherGroupsIngest<'a> {
    pub group: &'a str,
    /// Each other group, with the tables of ours it reads: `group (t1, t2)`.
    pub others: &'a [String],
}

impl Event for OtherGroupsIngest<'_> {
    fn emit(&self) {
        if self.others.is_empty() {
            tracing::info!(target: INGEST, event = "other_groups", group = %self.group, "no other group ingests these tables now");
            return;
        }
        tracing::warn!(
            target: INGEST,
            event = "other_groups",
            group = %self.group,
            others = %self.others.join("; "),
            "other consumer groups ingest the same tables into this DWH: each writes every record (a second \
             deployment, or KAFKA_GROUP_ID changed without moving the offsets with replay)"
        );
    }
}

/// A move of a stored offset left a gap in what the DWH holds of a partition:
/// records never written (lost to retention, or skipped at the operator's ask)
/// or an offset moved back (the log behind it). Logged at error with
/// `event = "offset_gap"`; the records lost count in
/// `dwh_helper_records_lost_total{table,partition,cause}`; the gap is a row of
/// `dwh_offset_gaps`, written with the move.
#[derive(Debug)]
pub struct OffsetGapNoted<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub partition: i32,
    /// The stored next offset before the move, and where reading goes on.
    pub from: i64,
    pub to: i64,
    /// Records never written (0 for a move back).
    pub records: i64,
    /// `retention`, `skipped` or `log behind`.
    pub cause: &'a str,
}

impl Event for OffsetGapNoted<'_> {
    fn emit(&self) {
        let g = self;
        tracing::error!(
            target: INGEST,
            event = "offset_gap",
            topic = %g.topic,
            partition = g.partition,
            from = g.from,
            to = g.to,
            records = g.records,
            cause = g.cause,
            "records of a partition will never be in the DWH, or an offset moved back; kept in dwh_offset_gaps"
        );
        if g.records > 0 {
            let m = metrics();
            let mut labels = m.partition(self.table, g.partition);
            labels.push(("cause", g.cause.to_owned()));
            m.records_lost.get_or_create(&labels).inc_by(g.records as u64);
        }
    }
}

/// The shutdown grace period ended before a batch was written: its write was
/// cancelled (the transaction rolls back, its offsets stay) and the partition's
/// next owner reads its records again. Logged with `event = "batch_aborted"`.
#[derive(Debug)]
pub struct BatchAborted<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub records: usize,
}

impl Event for BatchAborted<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: INGEST,
            event = "batch_aborted",
            topic = %self.topic,
            records = self.records,
            "shutdown grace period over before the batch was written; the next owner reads it again"
        );
        metrics()
            .batches_aborted
            .get_or_create(&Metrics::table(self.table))
            .inc();
    }
}

/// A second signal during the shutdown: the process exits at once, and what was
/// not yet written was not committed (it is read again). Logged with
/// `event = "shutdown_forced"`.
#[derive(Debug)]
pub struct ShutdownForced;

impl Event for ShutdownForced {
    fn emit(&self) {
        tracing::error!(
            event = "shutdown_forced",
            "second signal: exiting now; batches not yet written were not committed and will be read again"
        );
    }
}

/// Where an assigned partition starts reading, and why (logged once per
/// partition and assignment).
#[derive(Debug)]
pub struct PartitionStarted<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub start: &'a dyn std::fmt::Debug,
    pub from: &'a dyn std::fmt::Debug,
}

impl Event for PartitionStarted<'_> {
    fn emit(&self) {
        tracing::info!(target: INGEST, topic = %self.topic, partition = self.partition, start = ?self.start, from = ?self.from, "partition start");
    }
}

/// A record not taken into a batch: its partition is not assigned here (fetched
/// before a revoke), or it is below where the partition stands (written
/// already). Nothing is lost: the partition's owner reads it, or wrote it.
#[derive(Debug)]
pub struct RecordSkipped<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub why: &'static str,
}

impl Event for RecordSkipped<'_> {
    fn emit(&self) {
        tracing::debug!(target: INGEST, topic = %self.topic, partition = self.partition, offset = self.offset, why = self.why, "record skipped");
    }
}

/// The DWH's stored offsets could not be read for an assignment: read again
/// after `retry_in`, nothing is consumed meanwhile.
#[derive(Debug)]
pub struct StoredOffsetsUnreadable<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub error: &'a dyn Shown,
    pub retry_in: Duration,
}

impl Event for StoredOffsetsUnreadable<'_> {
    fn emit(&self) {
        tracing::warn!(target: INGEST, topic = %self.topic, error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64, "cannot read stored offsets; retrying");
        metrics()
            .offset_read_retries
            .get_or_create(&Metrics::table(self.table))
            .inc();
    }
}

/// This instance could not record in `dwh_ingest_members` that it reads its
/// tables (announcing, every few seconds; `replay --execute` may then not see
/// it) or that it stopped (`leaving`; the announcement ages out).
#[derive(Debug)]
pub struct MemberUnrecorded<'a> {
    pub error: &'a dyn Shown,
    pub leaving: bool,
}

impl Event for MemberUnrecorded<'_> {
    fn emit(&self) {
        if self.leaving {
            tracing::debug!(target: INGEST, error = %self.error, "cannot remove this instance from dwh_ingest_members");
        } else {
            tracing::debug!(target: INGEST, error = %self.error, "cannot announce this instance in dwh_ingest_members");
        }
    }
}

/// The watchdog found records waiting for `table` that nothing moves (see
/// `status::stall`): the table is `stalled` (readiness 503, the state gauge)
/// until its records land again. Logged at error with `event = "table_stalled"`
/// inside a span of its own, so that traces show it as a span event.
#[derive(Debug)]
pub struct TableStalled<'a> {
    pub table: Table,
    pub topic: &'a str,
    /// Which partitions, and how long.
    pub reason: &'a str,
    /// The last error the table met, its likely cause.
    pub last_error: Option<&'a str>,
}

impl Event for TableStalled<'_> {
    fn emit(&self) {
        let span = tracing::error_span!(target: INGEST, "table_stalled", table = self.table.name());
        let _inside = span.enter();
        tracing::error!(
            target: INGEST,
            event = "table_stalled",
            topic = %self.topic,
            reason = %self.reason,
            last_error = self.last_error.unwrap_or("none seen"),
            "table stalled: records wait and nothing lands"
        );
    }
}

/// A stalled table's records land again.
#[derive(Debug)]
pub struct StallCleared<'a> {
    pub table: Table,
    pub topic: &'a str,
}

impl Event for StallCleared<'_> {
    fn emit(&self) {
        tracing::info!(target: INGEST, event = "stall_cleared", table = self.table.name(), topic = %self.topic, "table no longer stalled");
    }
}

/// The states of `dwh_helper_table_state{table,state}`, the least serious first.
pub const TABLE_STATES: [&str; 4] = ["ok", "stalled", "failing", "stopped"];

/// Where a table stands now, as the watchdog saw it (one of [`TABLE_STATES`]):
/// `dwh_helper_table_state{table,state}` is 1 for its state, 0 for the others.
#[derive(Debug)]
pub struct TableStateSeen {
    pub table: Table,
    pub state: &'static str,
}

impl Event for TableStateSeen {
    fn emit(&self) {
        for state in TABLE_STATES {
            metrics()
                .table_state
                .get_or_create(&Metrics::table_and(self.table, "state", state))
                .set(i64::from(state == self.state));
        }
    }
}

/// `rejects requeue` could not send a reject again: the producer refused it
/// for what it is (too large for the topic, say). It is marked with why
/// (`requeue_error`) and passed (`event = "requeue_refused"`).
#[derive(Debug)]
pub struct RequeueRefused<'a> {
    pub table: Table,
    /// The reject's id in `dwh_rejected_records`.
    pub id: i64,
    pub reason: &'a dyn Shown,
}

impl Event for RequeueRefused<'_> {
    fn emit(&self) {
        tracing::warn!(target: INGEST, event = "requeue_refused", table = self.table.name(), id = self.id, reason = %self.reason, "the producer refused a reject; marked and passed");
    }
}

/// `rejects requeue` finished a table.
#[derive(Debug)]
pub struct RejectsRequeued<'a> {
    pub table: Table,
    pub topic: &'a str,
    pub sent: u64,
    pub marked: u64,
    pub refused: u64,
}

impl Event for RejectsRequeued<'_> {
    fn emit(&self) {
        let (table, topic) = (self.table.name(), self.topic);
        tracing::info!(target: INGEST, event = "rejects_requeued", table, topic, sent = self.sent, marked = self.marked, refused = self.refused, "rejects requeued");
    }
}
