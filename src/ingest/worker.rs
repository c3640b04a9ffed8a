//! The task that owns one table's consumer: decodes records, batches them and
//! writes each batch to the DWH in one transaction with its fenced offsets.
//!
//! Guarantees: a batch's offsets advance in the same transaction as its rows and
//! rejects, and only from the position the partition stood at. Every failure ends
//! in one of three ways:
//! - retried as the same batch (capped exponential backoff, readiness 503 with the
//!   cause) when the database is away or refuses the work for a reason of its own
//!   (a permission, a read-only or full database, a timeout);
//! - rejected with a reason when the record itself is wrong: the catalogue refuses
//!   it, or the database refuses its row for its data (SQLSTATE classes 22/23),
//!   found row by row under savepoints inside the batch's own fenced transaction;
//! - stopped loudly when a stored offset does not fit the log ([`super::start`]).
//!
//! A fenced write drops the batch and restarts the consumer, which then resumes
//! from the stored offsets; a retry fenced at exactly the batch's end found its
//! earlier, ambiguous attempt committed, and counts as landed. The Kafka commit
//! follows the DWH commit and only feeds lag tools.
//!
//! A table's partitions are split into lanes (`KAFKA_WRITE_LANES`, partition
//! modulo lanes): each lane has its own batch, its own fenced offset chain, one
//! batch in flight and one full batch queued behind it while its next one fills,
//! so the database takes several batches of a hot table at once and decoding
//! goes on while a write takes its time. Lanes never share a partition, and a
//! lane writes one batch at a time, in order, so a partition's batches commit
//! in order. At the end of the shutdown grace period
//! the writes in progress are cancelled (their transactions roll back, their
//! offsets stay).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::batcher::{BatchLimits, Batcher, Closed, Entry};
use super::start::{self, Misfit, Policy, Source, StartAt};
use super::status::IngestStatus;
use crate::backoff::Backoff;
use crate::catalogue::{self, DateWindow, RecordError, Row, Table};
use crate::kafka::consumer::{Context, Event, Exit};
use crate::kafka::memory::{Held, TableMemory};
use crate::store::{Batch, Dwh, OffsetAdvance, Origins, RejectedRecord, StoreError, WriteOutcome};
use crate::telemetry::events::{
    BatchCommitted, BufferLevel, ConsumerEnded, OffsetFenced, OffsetMoved, Rebalanced, RecordRejected, RecordsConsumed,
    TableStopped, WriteFailed, WritesRecovered,
};
use crate::telemetry::lag;

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A record with its decoded row, or why it was refused.
type Delivered = (OwnedMessage, Held, Result<Row, RecordError>);

/// Fewer records than this per thread are decoded on the task alone.
const MIN_RECORDS_PER_DECODER: usize = 64;

/// How long a watermark or committed-offset query may take on assignment.
const BROKER_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Decodes a record value into a row of `table`, refusing values over `limit`
/// and event dates outside `window` as it stands on `today`.
pub fn decode(
    table: Table,
    payload: &[u8],
    limit: usize,
    window: &DateWindow,
    today: chrono::NaiveDate,
) -> Result<Row, RecordError> {
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
    window.check(table, &row, today)?;
    Ok(row)
}

enum FlushError {
    Fenced(StoreError),
    /// The shutdown grace period ran out while writing or retrying.
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
    /// The grace period is over: cancel the write in progress, stop retrying.
    pub abort: CancellationToken,
}

#[allow(missing_debug_implementations)]
pub struct Worker {
    pub writer: Arc<Writer>,
    pub limits: BatchLimits,
    pub max_record_bytes: usize,
    pub events_window: DateWindow,
    /// Where partitions without a usable DWH offset start.
    pub policy: Policy,
    /// Stop consuming; write what is buffered.
    pub shutdown: CancellationToken,
    /// The table's memory and its size, reported as metrics.
    pub memory: TableMemory,
    /// Lanes of the table's partitions, each with a batch of its own in flight.
    pub lanes: usize,
}

type Joined = Result<Result<(), FlushError>, tokio::task::JoinError>;

/// The partitions `p` with `p % lanes == index`: their open batch and the one
/// being written.
struct Lane {
    batcher: Batcher,
    /// Memory permits of the buffered records, returned when their batch is done.
    memory: Option<Held>,
    /// The batch being written while the next one fills: at most one.
    in_flight: Option<tokio::task::JoinHandle<Result<(), FlushError>>>,
    /// Records of the batch in flight.
    in_flight_records: usize,
    /// A full batch waiting for the one in flight: it is written as soon as that
    /// one lands, so decoding goes on meanwhile. At most one.
    queued: Option<Queued>,
}

impl Lane {
    /// When the open batch is due (see [`State::deadline`]).
    fn due(&self, drain: bool) -> Option<Instant> {
        let drained = self.batcher.drained_at().filter(|_| drain);
        self.batcher.deadline().into_iter().chain(drained).min()
    }
}

/// A closed batch, its offset advances and its memory, ready to be written.
struct Queued {
    closed: Closed,
    offsets: Vec<OffsetAdvance>,
    memory: Option<Held>,
}

struct State {
    lanes: Vec<Lane>,
    /// Assigned partitions and where each stands (`None`: nothing stored yet). A
    /// partition moves on when its batch is handed to the writer, so the next batch
    /// chains on; if that write fails the consumer is rebuilt from the DWH anyway.
    positions: HashMap<i32, Option<i64>>,
}

impl State {
    fn new(limits: BatchLimits, lanes: usize) -> State {
        State {
            lanes: (0..lanes.max(1))
                .map(|_| Lane {
                    batcher: Batcher::new(limits),
                    memory: None,
                    in_flight: None,
                    in_flight_records: 0,
                    queued: None,
                })
                .collect(),
            positions: HashMap::new(),
        }
    }

    fn lane_of(&self, partition: i32) -> usize {
        partition.rem_euclid(self.lanes.len() as i32) as usize
    }

    /// The offset after `partition`'s last buffered record.
    fn next_offset(&self, partition: i32) -> Option<i64> {
        self.lanes[self.lane_of(partition)].batcher.next_offset(partition)
    }

    /// The earliest time an open batch is due: its linger deadline, or, when
    /// `drain` (no delivery is waiting), the time it counts as drained.
    fn deadline(&self, drain: bool) -> Option<Instant> {
        self.lanes.iter().filter_map(|lane| lane.due(drain)).min()
    }

    fn writing(&self) -> bool {
        self.lanes.iter().any(|lane| lane.in_flight.is_some())
    }

    /// Records buffered or being written.
    fn records(&self) -> usize {
        self.lanes
            .iter()
            .map(|lane| {
                lane.batcher.records() + lane.in_flight_records + lane.queued.as_ref().map_or(0, |q| q.closed.records())
            })
            .sum()
    }
}

/// The next write of any lane to end: the lane and how it ended.
fn landed(lanes: &mut [Lane]) -> impl std::future::Future<Output = (usize, Joined)> + '_ {
    use std::future::Future as _;
    std::future::poll_fn(move |cx| {
        for (index, lane) in lanes.iter_mut().enumerate() {
            if let Some(task) = lane.in_flight.as_mut() {
                if let std::task::Poll::Ready(joined) = std::pin::Pin::new(task).poll(cx) {
                    return std::task::Poll::Ready((index, joined));
                }
            }
        }
        std::task::Poll::Pending
    })
}

/// Why assigned partitions cannot start.
enum NoStart {
    Shutdown,
    Misfit(Misfit),
    /// Moving an operator-reset offset in the DWH failed; start over.
    Restart(String),
}

impl Worker {
    pub async fn run(self, mut events: mpsc::Receiver<Event>) -> Exit {
        let mut state = State::new(self.limits, self.lanes);
        let exit = self.serve(&mut state, &mut events).await;
        // Never leave a write running behind a consumer that is gone.
        for lane in &mut state.lanes {
            if let Some(task) = lane.in_flight.take() {
                let _ = task.await;
            }
        }
        lag::forget(self.writer.table);
        ConsumerEnded {
            table: self.writer.table,
        }
        .emit();
        exit
    }

    async fn serve(&self, state: &mut State, events: &mut mpsc::Receiver<Event>) -> Exit {
        loop {
            // A batch that follows a full one is written once its records stop
            // coming (the end of a backlog), but never while a delivery waits.
            let drain = events.is_empty();
            let deadline = state.deadline(drain);
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
                (lane, joined) = landed(&mut state.lanes), if state.writing() => {
                    if let Err(exit) = self.next_write(&mut state.lanes[lane], Some(joined)) {
                        return exit;
                    }
                    self.report_buffer(state);
                }
                () = linger, if deadline.is_some() => {
                    let now = Instant::now();
                    for lane in 0..state.lanes.len() {
                        if state.lanes[lane].due(drain).is_some_and(|due| due <= now) {
                            if let Err(exit) = self.flush(state, lane).await {
                                return exit;
                            }
                        }
                    }
                }
                event = events.recv() => match event {
                    None => return Exit::Restart("the poll thread stopped".into()),
                    Some(Event::Records(records)) => {
                        let count = records.len() as u64;
                        // The event-date window's today, read once per delivery.
                        let today = chrono::Utc::now().date_naive();
                        let delivered = match self.decode_delivery(records, today).await {
                            Ok(delivered) => delivered,
                            Err(exit) => return exit,
                        };
                        for (message, permit, row) in delivered {
                            let Some(lane) = self.accept(state, &message, permit, row) else {
                                continue;
                            };
                            if state.lanes[lane].batcher.is_full() {
                                if let Err(exit) = self.flush(state, lane).await {
                                    return exit;
                                }
                            }
                        }
                        RecordsConsumed { table: self.writer.table, records: count }.emit();
                        let fetched = state
                            .positions
                            .iter()
                            .filter_map(|(&p, &position)| Some((p, state.next_offset(p).or(position)?)));
                        lag::fetched(self.writer.table, fetched);
                        self.report_buffer(state);
                    }
                    Some(Event::Assigned { partitions, reply }) => {
                        match self.starts(&partitions).await {
                            Ok(starts) => {
                                let offsets = starts.iter().map(|(p, _, at)| (*p, *at)).collect();
                                state.positions.extend(starts.into_iter().map(|(p, stored, _)| (p, stored)));
                                let _ = reply.send(offsets);
                                Rebalanced { table: self.writer.table, now: state.positions.len() }.emit(&self.writer.status);
                            }
                            Err(NoStart::Shutdown) => return Exit::Shutdown,
                            Err(NoStart::Restart(why)) => return Exit::Restart(why),
                            Err(NoStart::Misfit(misfit)) => return self.stop(state, misfit).await,
                        }
                    }
                    Some(Event::PollFailed(why)) => {
                        tracing::error!(topic = %self.writer.topic, %why, "the poll thread failed; rebuilding the consumer");
                        return Exit::Restart(format!("the poll thread failed: {why}"));
                    }
                    Some(Event::OutOfRange(cause)) => {
                        // Write what is buffered, then decide again from the DWH's
                        // offsets and the watermarks, as on an assignment.
                        tracing::warn!(topic = %self.writer.topic, %cause, "a fetch fell outside the log; checking the stored offsets");
                        return match self.drain(state).await {
                            Ok(()) => Exit::Restart(format!("fetch out of range: {cause}")),
                            Err(exit) => exit,
                        };
                    }
                    Some(Event::Revoked { partitions, reply }) => {
                        // Write what is buffered while the partitions are still ours.
                        let drained = self.drain(state).await;
                        for partition in &partitions {
                            state.positions.remove(partition);
                            lag::forget_partition(self.writer.table, *partition);
                        }
                        let _ = reply.send(());
                        Rebalanced { table: self.writer.table, now: state.positions.len() }.emit(&self.writer.status);
                        if let Err(exit) = drained {
                            return exit;
                        }
                    }
                },
            }
        }
    }

    /// Reports what the table holds in memory.
    fn report_buffer(&self, state: &State) {
        BufferLevel {
            table: self.writer.table,
            records: state.records(),
            held_bytes: self.memory.held_bytes(),
            budget_bytes: self.memory.budget_bytes(),
        }
        .emit();
    }

    /// Stops the table: nothing is read until an operator acts and restarts.
    async fn stop(&self, state: &mut State, misfit: Misfit) -> Exit {
        let reason = misfit.to_string();
        TableStopped {
            table: self.writer.table,
            topic: &self.writer.topic,
            reason: &reason,
        }
        .emit(&self.writer.status);
        // What other partitions buffered is theirs to keep.
        if let Err(exit) = self.drain(state).await {
            return exit;
        }
        Exit::Stopped(reason)
    }

    /// Decodes a delivery's records, sharing them between this task and up to
    /// [`catalogue::decoder_threads`]` - 1` blocking threads when there are enough to share.
    async fn decode_delivery(
        &self,
        records: Vec<(OwnedMessage, Held)>,
        today: chrono::NaiveDate,
    ) -> Result<Vec<Delivered>, Exit> {
        let (table, limit, window) = (self.writer.table, self.max_record_bytes, self.events_window);
        let decode_part = move |part: Vec<(OwnedMessage, Held)>| -> Vec<Delivered> {
            part.into_iter()
                .map(|(message, permit)| {
                    let row = decode(table, message.payload().unwrap_or_default(), limit, &window, today);
                    (message, permit, row)
                })
                .collect()
        };
        let count = catalogue::decoder_threads()
            .min(records.len() / MIN_RECORDS_PER_DECODER)
            .max(1);
        let per_part = records.len().div_ceil(count);
        let mut parts = Vec::with_capacity(count);
        let mut rest = records;
        while rest.len() > per_part {
            let tail = rest.split_off(per_part);
            parts.push(std::mem::replace(&mut rest, tail));
        }
        parts.push(rest);
        // The first part is decoded here, the others on threads; joined in order.
        let mut parts = parts.into_iter();
        let first = parts.next().unwrap_or_default();
        let threads: Vec<_> = parts
            .map(|part| tokio::task::spawn_blocking(move || decode_part(part)))
            .collect();
        let mut delivered = decode_part(first);
        for thread in threads {
            delivered.extend(
                thread
                    .await
                    .map_err(|e| Exit::Restart(format!("a decoding thread failed: {e}")))?,
            );
        }
        Ok(delivered)
    }

    /// Adds the record to its lane's batch and returns the lane (`None`: skipped).
    fn accept(
        &self,
        state: &mut State,
        message: &OwnedMessage,
        permit: Held,
        row: Result<Row, RecordError>,
    ) -> Option<usize> {
        let partition = message.partition();
        let offset = message.offset();
        let Some(&position) = state.positions.get(&partition) else {
            tracing::debug!(topic = %self.writer.topic, partition, offset, "record of a partition not assigned here; skipped");
            return None;
        };
        let expected = state.next_offset(partition).or(position);
        if expected.is_some_and(|next| offset < next) {
            tracing::debug!(topic = %self.writer.topic, partition, offset, "record already written; skipped");
            return None;
        }
        let payload = message.payload().unwrap_or_default();
        let entry = match row {
            Ok(row) => Entry::Row(row),
            Err(reason) => {
                RecordRejected {
                    topic: &self.writer.topic,
                    partition,
                    offset,
                    reason: &reason,
                }
                .emit();
                Entry::Reject(RejectedRecord {
                    table: self.writer.table,
                    topic: self.writer.topic.clone(),
                    partition,
                    offset,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: payload.to_vec(),
                    reason: reason.to_string(),
                    class: reason.class(),
                })
            }
        };
        let index = state.lane_of(partition);
        let lane = &mut state.lanes[index];
        lane.batcher
            .push(partition, position, offset, payload.len(), entry, Instant::now());
        if let Some(timestamp) = message.timestamp().to_millis() {
            lane.batcher.stamp(partition, timestamp);
        }
        match &mut lane.memory {
            Some(held) => held.merge(permit),
            None => lane.memory = Some(permit),
        }
        Some(index)
    }

    /// Closes a lane's open batch: written at once when the lane has no write in
    /// flight, else queued behind it (after the batch queued before it, if any,
    /// has started).
    async fn flush(&self, state: &mut State, lane: usize) -> Result<(), Exit> {
        // The lane's queue holds one batch: wait for room. Any lane's write that
        // lands meanwhile starts that lane's queued batch at once, so that a lane
        // waiting here does not hold up the others.
        while state.lanes[lane].queued.is_some() {
            // A lane queues a batch only behind its own write in flight.
            debug_assert!(state.lanes[lane].in_flight.is_some());
            let (ended, joined) = landed(&mut state.lanes).await;
            self.next_write(&mut state.lanes[ended], Some(joined))?;
        }
        if state.lanes[lane].batcher.is_empty() {
            return Ok(());
        }
        let closed = state.lanes[lane].batcher.take();
        let offsets = closed.offsets(&self.writer.group_id, &self.writer.topic);
        for advance in &offsets {
            state.positions.insert(advance.partition, Some(advance.to));
        }
        let lane = &mut state.lanes[lane];
        let queued = Queued {
            closed,
            offsets,
            memory: lane.memory.take(),
        };
        if lane.in_flight.is_some() {
            lane.queued = Some(queued);
        } else {
            self.dispatch(lane, queued);
        }
        Ok(())
    }

    /// Starts writing a batch; the lane has none in flight.
    fn dispatch(&self, lane: &mut Lane, queued: Queued) {
        debug_assert!(lane.in_flight.is_none());
        let Queued {
            closed,
            offsets,
            memory,
        } = queued;
        lane.in_flight_records = closed.records();
        lane.in_flight = Some(tokio::spawn(self.writer.clone().land(closed, offsets, memory)));
    }

    /// Waits for the lane's write in flight, then starts its queued batch, if any.
    async fn advance(&self, state: &mut State, lane: usize) -> Result<(), Exit> {
        let joined = match state.lanes[lane].in_flight.as_mut() {
            Some(task) => Some(task.await),
            None => None,
        };
        self.next_write(&mut state.lanes[lane], joined)
    }

    /// After the lane's write in flight ended (`joined`; `None`: there was none):
    /// what its end means, and the queued batch, if any, started.
    fn next_write(&self, lane: &mut Lane, joined: Option<Joined>) -> Result<(), Exit> {
        lane.in_flight = None;
        lane.in_flight_records = 0;
        if let Some(joined) = joined {
            self.settled(joined)?;
        }
        if let Some(queued) = lane.queued.take() {
            self.dispatch(lane, queued);
        }
        Ok(())
    }

    /// Writes everything buffered and waits until every lane's write landed;
    /// the first failure is the answer.
    async fn drain(&self, state: &mut State) -> Result<(), Exit> {
        let mut outcome = Ok(());
        for lane in 0..state.lanes.len() {
            let flushed = self.flush(state, lane).await;
            outcome = outcome.and(flushed);
        }
        for lane in 0..state.lanes.len() {
            let settled = self.settle(state, lane).await;
            outcome = outcome.and(settled);
        }
        outcome
    }

    /// Waits until the lane's batches in flight and queued have landed.
    async fn settle(&self, state: &mut State, lane: usize) -> Result<(), Exit> {
        while state.lanes[lane].in_flight.is_some() || state.lanes[lane].queued.is_some() {
            self.advance(state, lane).await?;
        }
        Ok(())
    }

    /// What the end of a write means for the consumer.
    fn settled(&self, joined: Joined) -> Result<(), Exit> {
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(FlushError::Fenced(e))) => Err(Exit::Restart(e.to_string())),
            Ok(Err(FlushError::Aborted)) => Err(Exit::Shutdown),
            Err(e) => Err(Exit::Restart(format!("the flush task failed: {e}"))),
        }
    }

    /// Where each assigned partition starts, with its stored offset: the DWH's
    /// offsets (read again while the DWH is away), checked against the watermarks.
    async fn starts(&self, partitions: &[i32]) -> Result<Vec<(i32, Option<i64>, Offset)>, NoStart> {
        let writer = &self.writer;
        let stored = self.stored_offsets(partitions).await.ok_or(NoStart::Shutdown)?;
        let consumer = writer.consumer.clone();
        let topic = writer.topic.clone();
        let adopt = self.policy.adopt_committed && stored.iter().any(|(_, s)| s.is_none());
        let owned = partitions.to_vec();
        // Broker queries block: keep them off the runtime's workers.
        let (ranges, committed) = tokio::task::spawn_blocking(move || {
            let ranges: HashMap<i32, start::Range> = owned
                .iter()
                .filter_map(|&p| match crate::kafka::topics::past_transients(|| {
                    consumer.fetch_watermarks(&topic, p, BROKER_QUERY_TIMEOUT)
                }) {
                    Ok((low, high)) => Some((p, start::Range { low, high })),
                    Err(e) => {
                        tracing::warn!(topic, partition = p, error = %e, "cannot read the watermarks; trusting the stored offset");
                        None
                    }
                })
                .collect();
            let committed = if adopt { committed_offsets(&consumer, &topic, &owned) } else { HashMap::new() };
            (ranges, committed)
        })
        .await
        .map_err(|e| NoStart::Restart(format!("the broker query task failed: {e}")))?;
        let mut starts = Vec::with_capacity(partitions.len());
        for (partition, stored) in stored {
            let decided = start::decide(
                &writer.topic,
                partition,
                stored,
                committed.get(&partition).copied(),
                ranges.get(&partition).copied(),
                self.policy,
            )
            .map_err(NoStart::Misfit)?;
            let stored = match decided.source {
                Source::Moved { stored, to } => {
                    self.move_offset(partition, stored, to).await?;
                    Some(to)
                }
                _ => stored,
            };
            tracing::info!(
                topic = %writer.topic,
                partition,
                start = ?decided.at,
                from = ?decided.source,
                "partition start"
            );
            let at = match decided.at {
                StartAt::Offset(offset) => Offset::Offset(offset),
                StartAt::Beginning => Offset::Beginning,
                StartAt::End => Offset::End,
            };
            starts.push((partition, stored, at));
        }
        Ok(starts)
    }

    /// Moves a stored offset that did not fit the log, as the operator asked:
    /// logged and counted, fenced like any batch.
    async fn move_offset(&self, partition: i32, stored: i64, to: i64) -> Result<(), NoStart> {
        let writer = &self.writer;
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
        };
        writer
            .dwh
            .write(batch)
            .await
            .map_err(|e| NoStart::Restart(format!("cannot move the offset out of range: {e}")))?;
        OffsetMoved {
            table: writer.table,
            topic: &writer.topic,
            partition,
            stored,
            to,
        }
        .emit(&writer.status);
        Ok(())
    }

    /// The stored next offset of each partition, retried while the DWH is away.
    async fn stored_offsets(&self, partitions: &[i32]) -> Option<Vec<(i32, Option<i64>)>> {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        loop {
            match self.writer.stored_offsets(partitions).await {
                Ok(offsets) => return Some(offsets),
                Err(error) => {
                    tracing::warn!(topic = %self.writer.topic, error = %error, retry_in_ms = backoff.peek().as_millis() as u64, "cannot read stored offsets; retrying");
                }
            }
            if !backoff.wait(&self.shutdown).await {
                return None;
            }
        }
    }
}

/// The Kafka committed offsets of `partitions` (those that have one). Blocking.
fn committed_offsets(consumer: &BaseConsumer<Context>, topic: &str, partitions: &[i32]) -> HashMap<i32, i64> {
    let mut list = TopicPartitionList::new();
    for &p in partitions {
        list.add_partition(topic, p);
    }
    match consumer.committed_offsets(list, BROKER_QUERY_TIMEOUT) {
        Ok(list) => list
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot read the Kafka committed offsets to adopt");
            HashMap::new()
        }
    }
}

impl Writer {
    async fn stored_offsets(&self, partitions: &[i32]) -> Result<Vec<(i32, Option<i64>)>, StoreError> {
        let stored = self.dwh.topic_offsets(&self.group_id, &self.topic).await?;
        Ok(partitions.iter().map(|&p| (p, stored.get(&p).copied())).collect())
    }

    /// Writes a closed batch until it lands, is fenced or the grace period ends;
    /// then counts it and tells Kafka. `_memory` is released when this returns.
    async fn land(
        self: Arc<Self>,
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
        let landed = self.land_within(closed, offsets, memory).instrument(span.clone()).await;
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
        closed: Closed,
        offsets: Vec<OffsetAdvance>,
        _memory: Option<Held>,
    ) -> Result<(), FlushError> {
        let started = Instant::now();
        let outcome = match self.write(&closed, &offsets).await {
            Ok(outcome) => outcome,
            Err(e) => {
                if matches!(e, FlushError::Aborted) {
                    tracing::warn!(
                        topic = %self.topic,
                        records = closed.records(),
                        "shutdown grace period over before the batch was written; the next owner reads it again"
                    );
                }
                return Err(e);
            }
        };
        tracing::Span::current().record("rejects", closed.rejects.len() + outcome.refused.len());
        BatchCommitted {
            table: self.table,
            topic: &self.topic,
            outcome: &outcome,
            rejects: &closed.rejects,
            bytes: closed.bytes,
            took: started.elapsed(),
        }
        .emit(&self.status);
        for advance in &offsets {
            lag::written(
                self.table,
                advance.partition,
                closed.timestamps.get(&advance.partition).copied(),
            );
        }
        tracing::info_span!(target: "dwh_helper::ingest", "kafka_commit").in_scope(|| self.commit_to_kafka(&offsets));
        Ok(())
    }

    /// Writes the batch, retrying every error but a fence as the same batch until
    /// it lands or the grace period ends (which also cancels a write in progress).
    async fn write(&self, closed: &Closed, offsets: &[OffsetAdvance]) -> Result<WriteOutcome, FlushError> {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        // An attempt failed: its commit may have landed even so.
        let mut ambiguous = false;
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
            };
            let attempt = tracing::info_span!(target: "dwh_helper::ingest", "dwh_write", retry = ambiguous);
            let result = tokio::select! {
                result = self.dwh.write(batch).instrument(attempt) => result,
                () = self.abort.cancelled() => return Err(FlushError::Aborted),
            };
            let error = match result {
                Ok(outcome) => {
                    self.recovered(false);
                    return Ok(outcome);
                }
                Err(e) => e,
            };
            if matches!(error, StoreError::Fenced { .. }) {
                if ambiguous && self.landed_already(offsets).await {
                    self.recovered(true);
                    return Ok(WriteOutcome::default());
                }
                // Whoever owns the partition now writes it; this consumer rejoins.
                OffsetFenced {
                    table: self.table,
                    topic: &self.topic,
                    error: &error,
                }
                .emit(&self.status);
                return Err(FlushError::Fenced(error));
            }
            WriteFailed {
                table: self.table,
                topic: &self.topic,
                error: &error,
                retry_in: backoff.peek(),
            }
            .emit(&self.status);
            ambiguous = true;
            if !backoff.wait(&self.abort).await {
                return Err(FlushError::Aborted);
            }
        }
    }

    /// Clears the failing state after a write succeeded.
    fn recovered(&self, landed_earlier: bool) {
        WritesRecovered {
            table: self.table,
            topic: &self.topic,
            landed_earlier,
        }
        .emit(&self.status);
    }

    /// Whether every partition of the batch already stands at the batch's end:
    /// then an earlier attempt committed it, though its answer was lost.
    async fn landed_already(&self, offsets: &[OffsetAdvance]) -> bool {
        let partitions: Vec<i32> = offsets.iter().map(|a| a.partition).collect();
        match self.stored_offsets(&partitions).await {
            Ok(stored) => offsets
                .iter()
                .zip(stored)
                .all(|(advance, (_, stored))| stored == Some(advance.to)),
            Err(_) => false,
        }
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
    fn decode_refuses_event_dates_outside_the_window() {
        let window = DateWindow::default();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 26).expect("a date");
        let dated = |table: Table, date: &str| {
            let mut record = crate::sample::records(table, 1, 1).remove(0);
            record["event_date"] = serde_json::json!(date);
            record.to_string()
        };
        let ok = decode(
            Table::EventsPart,
            dated(Table::EventsPart, "2024-03-01").as_bytes(),
            8192,
            &window,
            today,
        );
        assert!(ok.is_ok(), "{ok:?}");
        for date in ["9999-01-01", "1999-12-31"] {
            let error = decode(
                Table::EventsPart,
                dated(Table::EventsPart, date).as_bytes(),
                8192,
                &window,
                today,
            )
            .unwrap_err()
            .to_string();
            assert!(
                error.starts_with(&format!(
                    "field \"event_date\": {date} is outside the accepted window 2000-01-01.."
                )),
                "{error}"
            );
            assert!(error.contains("DWH_EVENTS_MIN_DATE"), "{error}");
        }
        // Another table's dates are not windowed.
        let table = Table::TmpEventProperties;
        let ok = decode(table, dated(table, "9999-01-01").as_bytes(), 8192, &window, today);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn each_partition_has_one_lane_and_the_lanes_split_the_partitions() {
        let limits = BatchLimits {
            max_rows: 10,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(500),
        };
        for lanes in [1, 2, 3, 4] {
            let state = State::new(limits, lanes);
            assert_eq!(state.lanes.len(), lanes);
            let mut used = vec![0; lanes];
            for partition in 0..12 {
                let lane = state.lane_of(partition);
                assert_eq!(lane, state.lane_of(partition), "stable");
                used[lane] += 1;
            }
            assert!(used.iter().all(|&n| n == 12 / lanes || n == 12 / lanes + 1), "{used:?}");
        }
        // No lane at all is still one lane.
        assert_eq!(State::new(limits, 0).lanes.len(), 1);
    }

    #[test]
    fn decode_refuses_oversized_records_by_raw_and_decoded_size() {
        let record = br#"{"uuid":"5d8e2f86-2a1f-4a4e-9a0b-4c1f1c2b7a10","application_id":1}"#;
        let limit = record.len() - 1;
        assert_eq!(
            decode(
                Table::UserLocations,
                record,
                limit,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            )
            .unwrap_err()
            .to_string(),
            format!("record is {} bytes, over the limit of {limit} bytes", record.len())
        );
        assert_eq!(
            decode(
                Table::UserLocations,
                b"",
                1024,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            )
            .unwrap_err(),
            RecordError::Empty,
            "a tombstone is rejected, not dropped"
        );
        assert!(matches!(
            decode(
                Table::UserLocations,
                b"\xff{}",
                1024,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            ),
            Err(RecordError::NotUtf8(0))
        ));
    }
}
