//! The task that owns one table's consumer: the select loop that takes what
//! the poll thread hands over (records, assignments, revocations, faults),
//! admits records, feeds the lane scheduler ([`super::lanes`]) and starts the
//! writes it asks for ([`super::sink`]).
//!
//! Guarantees: a batch's offsets advance in the same transaction as its rows and
//! rejects, and only from the position the partition stood at. Every failure ends
//! in one of three ways:
//! - retried as the same batch ([`super::sink`]) when the database is away or
//!   refuses the work for a reason of its own;
//! - rejected with a reason when the record itself is wrong: the catalogue refuses
//!   it ([`crate::catalogue::admit`]), or the database refuses its row for its
//!   data (SQLSTATE classes 22/23), found row by row under savepoints inside the
//!   batch's own fenced transaction; but when the database refuses every row
//!   of a batch for the one same reason, or a NOT NULL column this release does
//!   not write, the table is at fault, and the batch is retried instead;
//! - stopped loudly when a stored offset does not fit the log ([`super::start`]).
//!
//! A fenced write drops the batch and restarts the consumer, which then resumes
//! from the stored offsets. Revoked partitions are written before they go; on
//! shutdown everything buffered is written, and at the end of the grace period
//! the writes in progress are cancelled (their offsets stay).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::Offset;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::batcher::{BatchLimits, Entry};
use super::lanes::{Closing, Lanes, Pushed, Queued};
use super::sink::{FlushError, Writer, FIRST_RETRY, MAX_RETRY};
use super::source::Source;
use super::start::{self, Misfit, Policy, StartAt};
use crate::backoff::Backoff;
use crate::catalogue::{admit, DateWindow, RecordError, Row};
use crate::kafka::consumer::{Event, Exit};
use crate::kafka::memory::{Held, TableMemory};
use crate::store::RejectedRecord;
use crate::telemetry::events::{
    BufferLevel, Consumer, ConsumerEnded, LaneFailuresEnded, PartitionStarted, PollFailed, Rebalanced, RecordRejected,
    RecordSkipped, RecordsConsumed, StoredOffsetsUnreadable, TableStopped,
};
use crate::telemetry::Event as _;

/// A record with its decoded row, or why it was refused.
type Delivered = (OwnedMessage, Held, Result<Row, RecordError>);

/// Fewer records than this per thread are decoded on the task alone.
const MIN_RECORDS_PER_DECODER: usize = 64;

#[allow(missing_debug_implementations)]
pub struct Worker {
    pub writer: Arc<Writer>,
    pub source: Source,
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

/// The lane scheduler, the write task of each lane that has one, and the
/// records each lane could not take yet.
struct State {
    lanes: Lanes<Held>,
    writes: Vec<Option<JoinHandle<Result<(), FlushError>>>>,
    /// Per lane: records delivered while the lane had no room (its batch full,
    /// one written and one queued), in order, taken when a write of it lands.
    /// Their memory stays held, so the table's budget bounds them.
    held: Vec<VecDeque<Delivered>>,
    /// Per lane: its open batch is full and waits for room in its queue.
    full: Vec<bool>,
}

impl State {
    fn writing(&self) -> bool {
        self.writes.iter().any(Option::is_some)
    }

    /// Whether `lane` takes no record now: they wait, in order, behind its full batch.
    fn blocked(&self, lane: usize) -> bool {
        self.full[lane] || !self.held[lane].is_empty()
    }

    /// Records buffered, queued, being written or waiting for their lane.
    fn records(&self) -> usize {
        self.lanes.records() + self.held.iter().map(VecDeque::len).sum::<usize>()
    }
}

/// The next write of any lane to end: the lane and how it ended.
fn landed(
    writes: &mut [Option<JoinHandle<Result<(), FlushError>>>],
) -> impl std::future::Future<Output = (usize, Joined)> + '_ {
    use std::future::Future as _;
    std::future::poll_fn(move |cx| {
        for (index, write) in writes.iter_mut().enumerate() {
            if let Some(task) = write.as_mut() {
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
        let lanes = Lanes::new(self.limits, self.lanes);
        let mut state = State {
            writes: (0..lanes.len()).map(|_| None).collect(),
            held: (0..lanes.len()).map(|_| VecDeque::new()).collect(),
            full: vec![false; lanes.len()],
            lanes,
        };
        let exit = self.serve(&mut state, &mut events).await;
        // Never leave a write running behind a consumer that is gone.
        for write in &mut state.writes {
            if let Some(task) = write.take() {
                let _ = task.await;
            }
        }
        self.writer.status.forget(self.writer.table);
        // Its lanes hold no partition now: their write failures end with them
        // (the next consumer's writes report their own), as after a revoke.
        self.lanes_held(&[]);
        ConsumerEnded {
            table: self.writer.table,
        }
        .emit();
        exit
    }

    async fn serve(&self, state: &mut State, events: &mut mpsc::Receiver<Event>) -> Exit {
        let (table, topic) = (self.writer.table, self.writer.topic.as_str());
        loop {
            // A batch that follows a full one is written once its records stop
            // coming (the end of a backlog), but never while a delivery waits.
            let drain = events.is_empty();
            let deadline = state.lanes.deadline(drain);
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
                (lane, joined) = landed(&mut state.writes), if state.writing() => {
                    if let Err(exit) = self.next_write(state, lane, Some(joined)) {
                        return exit;
                    }
                    // Room, perhaps, for the records that waited for it.
                    if let Err(exit) = self.take_held(state, false).await {
                        return exit;
                    }
                    self.report_buffer(state);
                }
                () = linger, if deadline.is_some() => {
                    let now = Instant::now();
                    for lane in 0..state.lanes.len() {
                        if state.lanes.due(lane, drain, now) {
                            if let Err(exit) = self.close(state, lane, false).await {
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
                        let delivered = match self.decode_delivery(records, today) {
                            Ok(delivered) => delivered,
                            Err(exit) => return exit,
                        };
                        // Never waits for a write: a lane without room keeps its
                        // records until one of its writes lands; the others go on.
                        for delivered in delivered {
                            let lane = state.lanes.lane_of(delivered.0.partition());
                            if state.blocked(lane) {
                                state.held[lane].push_back(delivered);
                                continue;
                            }
                            let (message, permit, row) = delivered;
                            if let Some(lane) = self.accept(state, &message, permit, row) {
                                match self.close(state, lane, false).await {
                                    Ok(closed) => state.full[lane] = !closed,
                                    Err(exit) => return exit,
                                }
                            }
                        }
                        RecordsConsumed { table, records: count }.emit();
                        self.writer.status.fetched(table, state.lanes.fetched());
                        self.report_buffer(state);
                    }
                    Some(Event::Assigned { partitions, reply }) => {
                        match self.starts(&partitions).await {
                            Ok(starts) => {
                                let offsets = starts.iter().map(|(p, _, at)| (*p, *at)).collect();
                                state.lanes.assign(starts.into_iter().map(|(p, stored, _)| (p, stored)));
                                self.lanes_held(&state.lanes.held());
                                let _ = reply.send(offsets);
                                self.writer.status.rebalanced();
                                Rebalanced { table, now: state.lanes.assigned() }.emit();
                            }
                            Err(NoStart::Shutdown) => return Exit::Shutdown,
                            Err(NoStart::Restart(why)) => return Exit::Restart(why),
                            Err(NoStart::Misfit(misfit)) => return self.stop(state, misfit).await,
                        }
                    }
                    Some(Event::PollFailed(why)) => {
                        let consumer = Consumer {
                            table,
                            topic,
                            role: "ingest",
                        };
                        self.writer.status.saw_error(topic, &format!("the poll thread failed: {why}"));
                        PollFailed { consumer, reason: &why }.emit();
                        return Exit::Restart(format!("the poll thread failed: {why}"));
                    }
                    Some(Event::OutOfRange(cause)) => {
                        // Write what is buffered, then decide again from the DWH's
                        // offsets and the watermarks, as on an assignment.
                        self.writer.status.saw_error(topic, &format!("fetch out of range: {cause}"));
                        crate::telemetry::events::FetchOutOfRange { table, topic, cause: &cause }.emit();
                        return match self.drain(state).await {
                            Ok(()) => Exit::Restart(format!("fetch out of range: {cause}")),
                            Err(exit) => exit,
                        };
                    }
                    Some(Event::Revoked { partitions, reply }) => {
                        // Write what is buffered while the partitions are still ours.
                        let drained = self.drain(state).await;
                        state.lanes.revoke(&partitions);
                        self.lanes_held(&state.lanes.held());
                        for partition in &partitions {
                            self.writer.status.forget_partition(table, *partition);
                        }
                        let _ = reply.send(());
                        self.writer.status.rebalanced();
                        Rebalanced { table, now: state.lanes.assigned() }.emit();
                        if let Err(exit) = drained {
                            return exit;
                        }
                    }
                },
            }
        }
    }

    /// The lanes that hold partitions now are `held`: the write failures of the
    /// others end (their partitions went to another member, which reports its own).
    fn lanes_held(&self, held: &[usize]) {
        let (table, topic) = (self.writer.table, self.writer.topic.as_str());
        if self.writer.status.lanes_held(topic, held) {
            self.writer.status.publish_failing(topic, |still_failing| {
                LaneFailuresEnded {
                    table,
                    topic,
                    still_failing,
                }
                .emit();
            });
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
        self.writer.status.table_stopped(&self.writer.topic, &reason);
        TableStopped {
            table: self.writer.table,
            topic: &self.writer.topic,
            reason: &reason,
        }
        .emit();
        // What other partitions buffered is theirs to keep.
        if let Err(exit) = self.drain(state).await {
            return exit;
        }
        Exit::Stopped(reason)
    }

    /// Admits a delivery's records ([`admit`]), sharing them between this task
    /// and other threads when there are enough to share.
    fn decode_delivery(
        &self,
        records: Vec<(OwnedMessage, Held)>,
        today: chrono::NaiveDate,
    ) -> Result<Vec<Delivered>, Exit> {
        let (table, limit, window) = (self.writer.table, self.max_record_bytes, &self.events_window);
        let decode = || {
            admit::in_parallel(&records, MIN_RECORDS_PER_DECODER, |_, (message, _)| {
                admit::admit(table, message.payload().unwrap_or_default(), limit, window, today)
            })
        };
        // The decoding blocks this runtime thread: on a multi-threaded runtime,
        // its other tasks (the writes in flight) move to another thread meanwhile.
        let multi = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        let rows = if multi {
            tokio::task::block_in_place(decode)
        } else {
            decode()
        }
        .map_err(|e| Exit::Restart(format!("a decoding thread failed: {e}")))?;
        Ok(records
            .into_iter()
            .zip(rows)
            .map(|((message, permit), row)| (message, permit, row))
            .collect())
    }

    /// Adds the record to its lane's batch; the lane when that batch is full.
    fn accept(
        &self,
        state: &mut State,
        message: &OwnedMessage,
        permit: Held,
        row: Result<Row, RecordError>,
    ) -> Option<usize> {
        let (partition, offset) = (message.partition(), message.offset());
        let payload = message.payload().unwrap_or_default();
        let topic = &self.writer.topic;
        let entry = match row {
            Ok(row) => Entry::Row(row),
            Err(reason) => Entry::Reject(RejectedRecord {
                table: self.writer.table,
                topic: topic.clone(),
                partition,
                offset,
                key: message.key().map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                reason: reason.to_string(),
                class: reason.class(),
            }),
        };
        let rejected = matches!(entry, Entry::Reject(_));
        let reason = match &entry {
            Entry::Reject(reject) => Some(reject.reason.clone()),
            Entry::Row(_) => None,
        };
        let timestamp = message.timestamp().to_millis();
        match state.lanes.push(
            partition,
            offset,
            payload.len(),
            entry,
            timestamp,
            permit,
            Instant::now(),
        ) {
            Pushed::NotAssigned => {
                RecordSkipped {
                    topic,
                    partition,
                    offset,
                    why: "its partition is not assigned here",
                }
                .emit();
                None
            }
            Pushed::Written => {
                RecordSkipped {
                    topic,
                    partition,
                    offset,
                    why: "written already",
                }
                .emit();
                None
            }
            Pushed::Lane { lane, full } => {
                if let (true, Some(reason)) = (rejected, reason) {
                    RecordRejected {
                        topic,
                        partition,
                        offset,
                        reason: &reason,
                    }
                    .emit();
                }
                full.then_some(lane)
            }
        }
    }

    /// Closes a lane's open batch: written at once when the lane has no write in
    /// flight, else queued behind it (after the batch queued before it, if any,
    /// has started). When the lane's queue holds a batch already, `wait` waits
    /// for room (a drain, for a revoke or a shutdown), else the batch stays open
    /// and this answers false.
    async fn close(&self, state: &mut State, lane: usize, wait: bool) -> Result<bool, Exit> {
        loop {
            match state.lanes.close(lane, &self.writer.group_id, &self.writer.topic) {
                Closing::Empty | Closing::Queued => return Ok(true),
                Closing::Write(queued) => {
                    self.dispatch(state, lane, queued);
                    return Ok(true);
                }
                Closing::Wait if state.writes[lane].is_none() => {
                    // A failed write left its queued batch behind: start it.
                    self.next_write(state, lane, None)?;
                }
                Closing::Wait if !wait => return Ok(false),
                // Any lane's write that lands meanwhile starts that lane's
                // queued batch at once, so that a lane waiting here does not
                // hold up the others.
                Closing::Wait => {
                    let (ended, joined) = landed(&mut state.writes).await;
                    self.next_write(state, ended, Some(joined))?;
                }
            }
        }
    }

    /// Gives each blocked lane the records it holds, in order, as far as it has
    /// room (`wait`: waiting for room, so that nothing stays held).
    async fn take_held(&self, state: &mut State, wait: bool) -> Result<(), Exit> {
        for lane in 0..state.lanes.len() {
            if state.full[lane] {
                if !self.close(state, lane, wait).await? {
                    continue;
                }
                state.full[lane] = false;
            }
            while let Some((message, permit, row)) = state.held[lane].pop_front() {
                if let Some(full) = self.accept(state, &message, permit, row) {
                    if !self.close(state, full, wait).await? {
                        state.full[full] = true;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts writing a batch the scheduler handed out for `lane`.
    fn dispatch(&self, state: &mut State, lane: usize, queued: Queued<Held>) {
        debug_assert!(state.writes[lane].is_none());
        let Queued {
            closed,
            offsets,
            memory,
        } = queued;
        state.writes[lane] = Some(tokio::spawn(self.writer.clone().land(lane, closed, offsets, memory)));
    }

    /// After the lane's write ended (`joined`; `None`: there was none): what its
    /// end means, and the queued batch, if any, started.
    fn next_write(&self, state: &mut State, lane: usize, joined: Option<Joined>) -> Result<(), Exit> {
        state.writes[lane] = None;
        state.lanes.ended(lane);
        if let Some(joined) = joined {
            settled(joined)?;
        }
        if let Some(queued) = state.lanes.start_queued(lane) {
            self.dispatch(state, lane, queued);
        }
        Ok(())
    }

    /// Writes everything buffered and waits until every lane's write landed;
    /// the first failure is the answer.
    async fn drain(&self, state: &mut State) -> Result<(), Exit> {
        let mut outcome = self.take_held(state, true).await;
        for lane in 0..state.lanes.len() {
            let flushed = self.close(state, lane, true).await.map(|_| ());
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
        while state.lanes.busy(lane) {
            let joined = match state.writes[lane].as_mut() {
                Some(task) => Some(task.await),
                None => None,
            };
            self.next_write(state, lane, joined)?;
        }
        Ok(())
    }

    /// Where each assigned partition starts, with its stored offset: the DWH's
    /// offsets (read again while the DWH is away), checked against the watermarks.
    async fn starts(&self, partitions: &[i32]) -> Result<Vec<(i32, Option<i64>, Offset)>, NoStart> {
        let writer = &self.writer;
        let stored = self.stored_offsets(partitions).await.ok_or(NoStart::Shutdown)?;
        let adopt = self.policy.adopt_committed && stored.offsets.iter().any(|(_, s)| s.is_none());
        let broker = self.source.offsets(partitions, adopt).await.map_err(NoStart::Restart)?;
        start::check_log(
            writer.table.name(),
            &writer.topic,
            &stored.logs,
            broker.identity.as_ref(),
        )
        .map_err(NoStart::Misfit)?;
        *writer.log.lock().unwrap_or_else(|e| e.into_inner()) = broker.identity.clone();
        let plan = start::plan(
            &writer.topic,
            &stored.offsets,
            stored.known,
            &broker.committed,
            &broker.ranges,
            self.policy,
        )
        .map_err(NoStart::Misfit)?;
        let mut starts = Vec::with_capacity(plan.len());
        for planned in plan {
            if let Some((stored, to)) = planned.moved {
                // A move is decided only against the partition's watermarks.
                let range = broker
                    .ranges
                    .get(&planned.partition)
                    .map_or((to, to), |r| (r.low, r.high));
                writer
                    .move_offset(planned.partition, stored, to, range)
                    .await
                    .map_err(NoStart::Restart)?;
            }
            PartitionStarted {
                topic: &writer.topic,
                partition: planned.partition,
                start: &planned.start.at,
                from: &planned.start.source,
            }
            .emit();
            let at = match planned.start.at {
                StartAt::Offset(offset) => Offset::Offset(offset),
                StartAt::Beginning => Offset::Beginning,
                StartAt::End => Offset::End,
            };
            starts.push((planned.partition, planned.stored, at));
        }
        Ok(starts)
    }

    /// What the DWH stores of the partitions and the topic, read again while
    /// the DWH is away.
    async fn stored_offsets(&self, partitions: &[i32]) -> Option<super::sink::Stored> {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        loop {
            match self.writer.stored_offsets(partitions).await {
                Ok(offsets) => return Some(offsets),
                Err(error) => StoredOffsetsUnreadable {
                    table: self.writer.table,
                    topic: &self.writer.topic,
                    error: &error,
                    retry_in: backoff.peek(),
                }
                .emit(),
            }
            if !backoff.wait(&self.shutdown).await {
                return None;
            }
        }
    }
}

/// What the end of a write means for the consumer.
fn settled(joined: Joined) -> Result<(), Exit> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(FlushError::Fenced(e))) => Err(Exit::Restart(e.to_string())),
        Ok(Err(FlushError::Aborted)) => Err(Exit::Shutdown),
        Err(e) => Err(Exit::Restart(format!("the flush task failed: {e}"))),
    }
}
