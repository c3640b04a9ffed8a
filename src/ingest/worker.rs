//! The task that owns one table's consumer: decodes records, batches them and
//! writes each batch to the DWH in one transaction with its fenced offsets.
//!
//! Guarantees: a batch's offsets advance in the same transaction as its rows and
//! rejects, and only from the position the partition stood at; a failed write is
//! retried as the same batch (capped exponential backoff) and never skipped; a
//! fenced write drops the batch and restarts the consumer, which then resumes from
//! the stored offsets; the Kafka commit follows the DWH commit and only feeds lag
//! tools. A record the catalogue refuses becomes a reject in its own batch, so a
//! partition never stalls on it. One batch is written while the next one fills
//! (decoding and the database overlap); there is never more than one in flight per
//! table, so a partition's batches commit in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::batcher::{BatchLimits, Batcher, Closed, Entry};
use super::consumer::{Context, Event, Exit};
use super::status::IngestStatus;
use crate::catalogue::{self, RecordError, Row, Table};
use crate::store::{Batch, Dwh, OffsetAdvance, RejectedRecord, StoreError};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Decodes a record value into a row of `table`, refusing values over `limit`.
pub fn decode(table: Table, payload: &[u8], limit: usize) -> Result<Row, RecordError> {
    if payload.len() > limit {
        return Err(RecordError::TooLarge {
            size: payload.len(),
            limit,
        });
    }
    let row = catalogue::decode_bytes(table, payload)?.row;
    let size = row.approx_bytes();
    if size > limit {
        return Err(RecordError::TooLarge { size, limit });
    }
    Ok(row)
}

enum FlushError {
    Fenced(StoreError),
    /// The shutdown grace period ran out while retrying.
    Aborted,
}

/// Writes closed batches to the DWH; the flush in flight runs on its own task.
#[allow(missing_debug_implementations)]
pub struct Writer {
    pub table: Table,
    pub topic: String,
    pub group_id: String,
    pub dwh: Dwh,
    pub consumer: Arc<BaseConsumer<Context>>,
    pub status: Arc<IngestStatus>,
    /// The grace period is over: stop retrying.
    pub abort: CancellationToken,
}

#[allow(missing_debug_implementations)]
pub struct Worker {
    pub writer: Arc<Writer>,
    pub limits: BatchLimits,
    pub max_record_bytes: usize,
    /// Stop consuming; write what is buffered.
    pub shutdown: CancellationToken,
}

struct State {
    batcher: Batcher,
    /// Memory permits of the buffered records, returned when their batch is done.
    memory: Option<OwnedSemaphorePermit>,
    /// Assigned partitions and where each stands (`None`: nothing stored yet). A
    /// partition moves on when its batch is handed to the writer, so the next batch
    /// chains on; if that write fails the consumer is rebuilt from the DWH anyway.
    positions: HashMap<i32, Option<i64>>,
    /// The batch being written while the next one fills: at most one.
    in_flight: Option<tokio::task::JoinHandle<Result<(), FlushError>>>,
}

impl Worker {
    pub async fn run(self, mut events: mpsc::Receiver<Event>) -> Exit {
        let mut state = State {
            batcher: Batcher::new(self.limits),
            memory: None,
            positions: HashMap::new(),
            in_flight: None,
        };
        let exit = self.serve(&mut state, &mut events).await;
        // Never leave a write running behind a consumer that is gone.
        if let Some(task) = state.in_flight.take() {
            let _ = task.await;
        }
        exit
    }

    async fn serve(&self, state: &mut State, events: &mut mpsc::Receiver<Event>) -> Exit {
        loop {
            let deadline = state.batcher.deadline();
            let linger = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into());
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    return match self.drain(state).await {
                        Ok(()) | Err(Exit::Shutdown) => Exit::Shutdown,
                        Err(restart) => restart,
                    };
                }
                // A write that ends (landed or fenced) is noticed at once, not
                // only at the next flush.
                joined = async { state.in_flight.as_mut().expect("checked by the guard").await },
                    if state.in_flight.is_some() => {
                    state.in_flight = None;
                    if let Err(exit) = self.settled(joined) {
                        return exit;
                    }
                }
                () = linger, if deadline.is_some() => {
                    if let Err(exit) = self.flush(state).await {
                        return exit;
                    }
                }
                event = events.recv() => match event {
                    None => return Exit::Restart("the poll thread stopped".into()),
                    Some(Event::Records(records)) => {
                        for (message, permit) in records {
                            self.accept(state, &message, permit);
                            if state.batcher.is_full() {
                                if let Err(exit) = self.flush(state).await {
                                    return exit;
                                }
                            }
                        }
                    }
                    Some(Event::Assigned { partitions, reply }) => {
                        let Some(offsets) = self.stored_offsets(&partitions).await else {
                            return Exit::Shutdown;
                        };
                        state.positions.extend(offsets.iter().copied());
                        let _ = reply.send(offsets);
                    }
                    Some(Event::Revoked { partitions, reply }) => {
                        // Write what is buffered while the partitions are still ours.
                        let drained = self.drain(state).await;
                        for partition in &partitions {
                            state.positions.remove(partition);
                        }
                        let _ = reply.send(());
                        if let Err(exit) = drained {
                            return exit;
                        }
                    }
                },
            }
        }
    }

    fn accept(&self, state: &mut State, message: &OwnedMessage, permit: OwnedSemaphorePermit) {
        let partition = message.partition();
        let offset = message.offset();
        let Some(&position) = state.positions.get(&partition) else {
            tracing::debug!(topic = %self.writer.topic, partition, offset, "record of a partition not assigned here; skipped");
            return;
        };
        let expected = state.batcher.next_offset(partition).or(position);
        if expected.is_some_and(|next| offset < next) {
            tracing::debug!(topic = %self.writer.topic, partition, offset, "record already written; skipped");
            return;
        }
        let payload = message.payload().unwrap_or_default();
        let entry = match decode(self.writer.table, payload, self.max_record_bytes) {
            Ok(row) => Entry::Row(row),
            Err(reason) => {
                tracing::warn!(topic = %self.writer.topic, partition, offset, %reason, "record rejected");
                Entry::Reject(RejectedRecord {
                    table: self.writer.table,
                    topic: self.writer.topic.clone(),
                    partition,
                    offset,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: payload.to_vec(),
                    reason: reason.to_string(),
                })
            }
        };
        state
            .batcher
            .push(partition, position, offset, payload.len(), entry, Instant::now());
        match &mut state.memory {
            Some(held) => held.merge(permit),
            None => state.memory = Some(permit),
        }
    }

    /// Hands the open batch to the writer (after the one in flight has landed).
    async fn flush(&self, state: &mut State) -> Result<(), Exit> {
        self.settle(state).await?;
        if state.batcher.is_empty() {
            return Ok(());
        }
        let closed = state.batcher.take();
        let offsets = closed.offsets(&self.writer.group_id, &self.writer.topic);
        for advance in &offsets {
            state.positions.insert(advance.partition, Some(advance.to));
        }
        let memory = state.memory.take();
        state.in_flight = Some(tokio::spawn(self.writer.clone().land(closed, offsets, memory)));
        Ok(())
    }

    /// Writes everything buffered and waits until it landed.
    async fn drain(&self, state: &mut State) -> Result<(), Exit> {
        self.flush(state).await?;
        self.settle(state).await
    }

    /// Waits for the batch in flight, if any.
    async fn settle(&self, state: &mut State) -> Result<(), Exit> {
        let Some(task) = state.in_flight.take() else {
            return Ok(());
        };
        self.settled(task.await)
    }

    /// What the end of a write means for the consumer.
    fn settled(&self, joined: Result<Result<(), FlushError>, tokio::task::JoinError>) -> Result<(), Exit> {
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(FlushError::Fenced(e))) => {
                tracing::warn!(topic = %self.writer.topic, error = %e, "offset fenced: batch dropped, rejoining the group");
                Err(Exit::Restart(e.to_string()))
            }
            Ok(Err(FlushError::Aborted)) => Err(Exit::Shutdown),
            Err(e) => Err(Exit::Restart(format!("the flush task failed: {e}"))),
        }
    }

    /// The stored next offset of each partition, retried while the DWH is away.
    async fn stored_offsets(&self, partitions: &[i32]) -> Option<Vec<(i32, Option<i64>)>> {
        let mut delay = FIRST_RETRY;
        loop {
            let mut offsets = Vec::with_capacity(partitions.len());
            let mut failure = None;
            for &partition in partitions {
                match self
                    .writer
                    .dwh
                    .stored_offset(&self.writer.group_id, &self.writer.topic, partition)
                    .await
                {
                    Ok(stored) => offsets.push((partition, stored)),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(error) = failure else { return Some(offsets) };
            tracing::warn!(topic = %self.writer.topic, error = %error, retry_in_ms = delay.as_millis() as u64, "cannot read stored offsets; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return None,
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }
}

impl Writer {
    /// Writes a closed batch until it lands, is fenced or the grace period ends;
    /// then counts it and tells Kafka. `_memory` is released when this returns.
    async fn land(
        self: Arc<Self>,
        mut closed: Closed,
        offsets: Vec<OffsetAdvance>,
        _memory: Option<OwnedSemaphorePermit>,
    ) -> Result<(), FlushError> {
        let started = Instant::now();
        if let Err(e) = self.write(&mut closed, &offsets).await {
            if matches!(e, FlushError::Aborted) {
                tracing::warn!(
                    topic = %self.topic,
                    records = closed.records(),
                    "shutdown grace period over before the batch was written; the next owner reads it again"
                );
            }
            return Err(e);
        }
        let took = started.elapsed();
        self.status
            .batch_written(closed.rows.len(), closed.rejects.len(), closed.bytes, took);
        tracing::debug!(
            topic = %self.topic,
            rows = closed.rows.len(),
            rejects = closed.rejects.len(),
            bytes = closed.bytes,
            took_ms = took.as_secs_f64() * 1000.0,
            "batch committed"
        );
        self.commit_to_kafka(&offsets);
        Ok(())
    }

    /// Writes the batch, retrying until it lands, is fenced or the grace period ends.
    async fn write(&self, closed: &mut Closed, offsets: &[OffsetAdvance]) -> Result<(), FlushError> {
        let mut delay = FIRST_RETRY;
        let mut failing = false;
        loop {
            let batch = Batch {
                table: self.table,
                rows: &closed.rows,
                rejects: &closed.rejects,
                offsets,
            };
            let error = match self.dwh.write(batch).await {
                Ok(_) => {
                    if failing {
                        tracing::info!(topic = %self.topic, "DWH writes succeed again");
                        self.status.set_failing(&self.topic, None);
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            if matches!(error, StoreError::Fenced { .. }) {
                return Err(FlushError::Fenced(error));
            }
            // The database refused something in the batch rather than being away:
            // find the rows it refuses and reject them, so the rest lands.
            if !error.is_transient() && self.isolate(closed, &error).await? > 0 {
                continue;
            }
            tracing::warn!(
                topic = %self.topic,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "DWH write failed; retrying the same batch"
            );
            self.status.set_failing(&self.topic, Some(error.to_string()));
            failing = true;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.abort.cancelled() => return Err(FlushError::Aborted),
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// Writes each row of the batch alone (idempotent: natural keys) to find those
    /// the database refuses; moves them to the rejects. Returns how many it moved.
    async fn isolate(&self, closed: &mut Closed, cause: &StoreError) -> Result<usize, FlushError> {
        tracing::error!(topic = %self.topic, error = %cause, "DWH refused the batch; finding the rows it refuses");
        let spec = self.table.spec();
        let mut kept_rows = Vec::with_capacity(closed.rows.len());
        let mut kept_origins = Vec::with_capacity(closed.rows.len());
        let mut moved = 0;
        for (row, origin) in std::mem::take(&mut closed.rows)
            .into_iter()
            .zip(std::mem::take(&mut closed.origins))
        {
            match self
                .dwh
                .write(Batch::rows(self.table, std::slice::from_ref(&row)))
                .await
            {
                Ok(_) => {
                    kept_rows.push(row);
                    kept_origins.push(origin);
                }
                Err(e) if e.is_transient() => {
                    // The database went away meanwhile: keep everything, retry later.
                    kept_rows.push(row);
                    kept_origins.push(origin);
                }
                Err(e) => {
                    let record: serde_json::Map<String, serde_json::Value> = spec
                        .columns
                        .iter()
                        .zip(&row.values)
                        .map(|(c, v)| (c.name.to_owned(), v.to_json()))
                        .collect();
                    tracing::warn!(topic = %self.topic, partition = origin.partition, offset = origin.offset, error = %e, "record rejected by the database");
                    closed.rejects.push(RejectedRecord {
                        table: self.table,
                        topic: self.topic.clone(),
                        partition: origin.partition,
                        offset: origin.offset,
                        key: None,
                        payload: serde_json::Value::Object(record).to_string().into_bytes(),
                        reason: format!("the database refused the row: {e}"),
                    });
                    moved += 1;
                }
            }
            if self.abort.is_cancelled() {
                return Err(FlushError::Aborted);
            }
        }
        closed.rows = kept_rows;
        closed.origins = kept_origins;
        Ok(moved)
    }

    /// Tells Kafka how far the DWH got, for lag tools. Failures only log.
    fn commit_to_kafka(&self, offsets: &[OffsetAdvance]) {
        let mut list = TopicPartitionList::new();
        for advance in offsets {
            if let Err(e) = list.add_partition_offset(&self.topic, advance.partition, Offset::Offset(advance.to)) {
                tracing::debug!(topic = %self.topic, error = %e, "cannot list a kafka commit");
            }
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(topic = %self.topic, error = %e, "kafka offset commit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_oversized_records_by_raw_and_decoded_size() {
        let record = br#"{"uuid":"5d8e2f86-2a1f-4a4e-9a0b-4c1f1c2b7a10","application_id":1}"#;
        let limit = record.len() - 1;
        assert_eq!(
            decode(Table::UserLocations, record, limit).unwrap_err().to_string(),
            format!("record is {} bytes, over the limit of {limit} bytes", record.len())
        );
        assert_eq!(
            decode(Table::UserLocations, b"", 1024).unwrap_err(),
            RecordError::Empty,
            "a tombstone is rejected, not dropped"
        );
        assert!(matches!(
            decode(Table::UserLocations, b"\xff{}", 1024),
            Err(RecordError::NotUtf8(0))
        ));
    }
}
