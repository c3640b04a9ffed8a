//! The ingest's DWH side: a closed batch written in one transaction with its
//! fenced offsets, retried as the same batch until it lands, is fenced or the
//! shutdown grace period ends; then counted, and mirrored in Kafka.
//!
//! Guarantees: every failure but a fence is retried as the same batch (capped
//! exponential backoff, readiness 503 with the cause); a fence drops the batch
//! and the consumer rejoins, except when a retry is fenced at exactly the
//! batch's end: then its earlier, ambiguous attempt committed, and it counts as
//! landed. At the end of the grace period the write in progress is cancelled
//! (its transaction rolls back, its offsets stay).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::batcher::Closed;
use super::source::Source;
use super::status::IngestStatus;
use crate::backoff::Backoff;
use crate::catalogue::Table;
use crate::kafka::memory::Held;
use crate::store::{Batch, Dwh, OffsetAdvance, OffsetGap, Origins, StoreError, TopicIdentity, WriteOutcome};
use crate::telemetry::events::{
    BatchAborted, BatchCommitted, OffsetFenced, OffsetGapNoted, OffsetMoved, WriteFailed, WritesRecovered,
};
use crate::telemetry::Event as _;

pub(super) const FIRST_RETRY: Duration = Duration::from_millis(200);
pub(super) const MAX_RETRY: Duration = Duration::from_secs(30);

/// How a batch's write ended, when it did not land.
#[derive(Debug)]
pub enum FlushError {
    Fenced(StoreError),
    /// The shutdown grace period ran out while writing or retrying.
    Aborted,
}

/// Writes closed batches of one table to the DWH; each write runs on its own task.
#[allow(missing_debug_implementations)]
pub struct Writer {
    pub table: Table,
    pub topic: String,
    pub group_id: String,
    pub dwh: Dwh,
    pub source: Source,
    pub status: Arc<IngestStatus>,
    /// The grace period is over: cancel the write in progress, stop retrying.
    pub abort: CancellationToken,
    /// The log the partitions were started in (checked against the DWH's
    /// offsets then), kept with every offset written; `None`: not known.
    pub log: std::sync::Mutex<Option<TopicIdentity>>,
}

/// What the DWH stores of a topic, for a start.
#[derive(Debug)]
pub struct Stored {
    /// The stored next offset of each partition asked for.
    pub offsets: Vec<(i32, Option<i64>)>,
    /// Whether the DWH stores offsets of any partition of the topic (assigned here or not).
    pub known: bool,
    /// The logs the topic's offsets were written for.
    pub logs: Vec<TopicIdentity>,
}

impl Writer {
    /// Moves a stored offset that did not fit the log (`low..high`), as the
    /// operator asked: logged and counted, fenced like any batch, with the gap
    /// it leaves kept in the same transaction.
    pub async fn move_offset(&self, partition: i32, stored: i64, to: i64, range: (i64, i64)) -> Result<(), String> {
        let writer = self;
        let gaps = OffsetGap::of_move(&writer.group_id, &writer.topic, partition, stored, to, range);
        let log = writer.log();
        let advance = OffsetAdvance {
            group_id: writer.group_id.clone(),
            topic: writer.topic.clone(),
            partition,
            from: stored,
            to,
        };
        let batch = Batch {
            table: writer.table,
            rows: &[],
            rejects: &[],
            offsets: std::slice::from_ref(&advance),
            origins: None,
            gaps: &gaps,
            identity: log.as_ref(),
        };
        writer
            .dwh
            .write(batch)
            .await
            .map_err(|e| format!("cannot move the offset out of range: {e}"))?;
        writer.status.offset_moved();
        for gap in &gaps {
            OffsetGapNoted {
                table: writer.table,
                topic: &gap.topic,
                partition: gap.partition,
                from: gap.from,
                to: gap.to,
                records: gap.records,
                cause: gap.cause.name(),
            }
            .emit();
        }
        OffsetMoved {
            table: writer.table,
            topic: &writer.topic,
            partition,
            stored,
            to,
        }
        .emit();
        Ok(())
    }

    /// What the DWH stores of `partitions` and of the topic.
    pub async fn stored_offsets(&self, partitions: &[i32]) -> Result<Stored, StoreError> {
        let stored = self.dwh.topic_offsets(&self.group_id, &self.topic).await?;
        let offsets = partitions.iter().map(|&p| (p, stored.get(&p).copied())).collect();
        let logs = self.dwh.topic_identities(&self.group_id, &self.topic).await?;
        Ok(Stored {
            offsets,
            known: !stored.is_empty(),
            logs,
        })
    }

    /// The log the partitions started in, for the offsets written.
    fn log(&self) -> Option<TopicIdentity> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Writes a closed batch until it lands, is fenced or the grace period ends;
    /// then counts it and tells Kafka. `_memory` is released when this returns.
    pub async fn land(
        self: Arc<Self>,
        lane: usize,
        closed: Closed,
        offsets: Vec<OffsetAdvance>,
        memory: Option<Held>,
    ) -> Result<(), FlushError> {
        let partitions: Vec<i32> = offsets.iter().map(|a| a.partition).collect();
        let span = crate::telemetry::traced(tracing::info_span!(
            target: "dwh_helper::ingest",
            "batch_flush",
            table = %self.table,
            topic = %self.topic,
            partitions = ?partitions,
            rows = closed.rows.len(),
            rejects = tracing::field::Empty,
            bytes = closed.bytes,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        ));
        let landed = self
            .land_within(lane, closed, offsets, memory)
            .instrument(span.clone())
            .await;
        let outcome = match &landed {
            Ok(()) => "committed",
            Err(FlushError::Fenced(_)) => "fenced",
            Err(FlushError::Aborted) => "aborted",
        };
        span.record("outcome", outcome);
        landed
    }

    async fn land_within(
        &self,
        lane: usize,
        closed: Closed,
        offsets: Vec<OffsetAdvance>,
        _memory: Option<Held>,
    ) -> Result<(), FlushError> {
        let started = Instant::now();
        let outcome = match self.write(lane, &closed, &offsets).await {
            Ok(outcome) => outcome,
            Err(e) => {
                if matches!(e, FlushError::Aborted) {
                    BatchAborted {
                        table: self.table,
                        topic: &self.topic,
                        records: closed.records(),
                    }
                    .emit();
                }
                return Err(e);
            }
        };
        tracing::Span::current().record("rejects", closed.rejects.len() + outcome.refused.len());
        let took = started.elapsed();
        let rejects = closed.rejects.len() + outcome.refused.len();
        self.status.batch_written(&outcome, rejects, closed.bytes, took);
        BatchCommitted {
            table: self.table,
            topic: &self.topic,
            inserted: outcome.inserted,
            updated: outcome.updated,
            skipped: outcome.skipped,
            rejects: &closed.rejects,
            refused: &outcome.refused,
            bytes: closed.bytes,
            took,
        }
        .emit();
        for advance in &offsets {
            self.status.written(
                self.table,
                advance.partition,
                closed.timestamps.get(&advance.partition).copied(),
            );
        }
        tracing::info_span!(target: "dwh_helper::ingest", "kafka_commit").in_scope(|| self.source.commit(&offsets));
        Ok(())
    }

    /// Writes the batch, retrying every error but a fence as the same batch until
    /// it lands or the grace period ends (which also cancels a write in progress).
    async fn write(&self, lane: usize, closed: &Closed, offsets: &[OffsetAdvance]) -> Result<WriteOutcome, FlushError> {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        // An attempt failed: its commit may have landed even so.
        let mut ambiguous = false;
        let log = self.log();
        loop {
            let batch = Batch {
                table: self.table,
                rows: &closed.rows,
                rejects: &closed.rejects,
                offsets,
                origins: Some(Origins {
                    topic: &self.topic,
                    rows: &closed.origins,
                }),
                gaps: &[],
                identity: log.as_ref(),
            };
            let attempt = tracing::info_span!(target: "dwh_helper::ingest", "dwh_write", retry = ambiguous);
            let result = tokio::select! {
                result = self.dwh.write(batch).instrument(attempt) => result,
                () = self.abort.cancelled() => return Err(FlushError::Aborted),
            };
            let error = match result {
                Ok(outcome) => {
                    self.recovered(lane, false);
                    return Ok(outcome);
                }
                Err(e) => e,
            };
            if matches!(error, StoreError::Fenced { .. }) {
                if ambiguous && self.landed_already(offsets).await {
                    self.recovered(lane, true);
                    return Ok(WriteOutcome::default());
                }
                // Whoever owns the partition now writes it; this consumer rejoins.
                // A failure of the lane stays until one of its writes lands, or the
                // lane holds no partition any more.
                OffsetFenced {
                    table: self.table,
                    topic: &self.topic,
                    error: &error,
                }
                .emit();
                return Err(FlushError::Fenced(error));
            }
            self.status.set_failing(&self.topic, lane, Some(error.to_string()));
            self.status.retried();
            WriteFailed {
                table: self.table,
                topic: &self.topic,
                error: &error,
                retry_in: backoff.peek(),
            }
            .emit();
            ambiguous = true;
            if !backoff.wait(&self.abort).await {
                return Err(FlushError::Aborted);
            }
        }
    }

    /// Clears the lane's failing state after one of its writes succeeded.
    fn recovered(&self, lane: usize, landed_earlier: bool) {
        let cleared = self.status.set_failing(&self.topic, lane, None);
        self.status.publish_failing(&self.topic, |still_failing| {
            WritesRecovered {
                table: self.table,
                topic: &self.topic,
                landed_earlier,
                cleared,
                still_failing,
            }
            .emit();
        });
    }

    /// Whether every partition of the batch already stands at the batch's end:
    /// then an earlier attempt committed it, though its answer was lost.
    async fn landed_already(&self, offsets: &[OffsetAdvance]) -> bool {
        let partitions: Vec<i32> = offsets.iter().map(|a| a.partition).collect();
        match self.stored_offsets(&partitions).await {
            Ok(stored) => offsets
                .iter()
                .zip(stored.offsets)
                .all(|(advance, (_, stored))| stored == Some(advance.to)),
            Err(_) => false,
        }
    }
}
