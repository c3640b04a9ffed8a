//! The rebalance bridge: the rdkafka context of a consumer. It forwards
//! librdkafka's logs and errors (a failure a person must act on goes to the
//! role as a [`KafkaCondition`]), and passes rebalances to the owning task:
//! records polled before a rebalance reach the task before it hears of it; an
//! assignment waits a few seconds for the task's start offsets (then it is
//! assigned paused and started when they come), a revoke at most `revoke_wait`
//! for it to write what it buffered.

use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::OwnedMessage;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::profile::Role;
use super::{failure_kind, Event, KafkaCondition, OnKafka};
use crate::catalogue::Table;
use crate::kafka::memory::Held;
use crate::telemetry::events::{
    AssignmentDeferred, AssignmentStarted, ClientLog, Consumer, KafkaError as KafkaErrorEvent, PartitionsMoved, Shown,
};
use crate::telemetry::Event as _;

/// The rdkafka context: forwards logs to `tracing` and rebalances to the task.
pub struct Context {
    pub table: Table,
    pub topic: String,
    pub events: mpsc::Sender<Event>,
    /// Records polled but not handed over yet (only the poll thread touches it:
    /// the poll loop and the rebalance callback, which runs inside `poll`).
    pub(super) pending: std::sync::Mutex<Vec<(OwnedMessage, Held)>>,
    /// How long a revoke waits for the task to write what it buffered.
    pub(super) revoke_wait: Duration,
    /// What a held record costs ([`Role::charge`]).
    pub(super) role: Role,
    /// The runtime the poll thread blocks on for short, bounded waits.
    pub(super) runtime: tokio::runtime::Handle,
    /// Told when the client fails in a way retrying does not mend, and when it
    /// works again.
    on_kafka: OnKafka,
    failing: std::sync::atomic::AtomicBool,
    /// The topic existed for this consumer: it was assigned partitions of it.
    read: std::sync::atomic::AtomicBool,
    /// Assignments the task did not answer within the assignment's wait: their
    /// partitions are assigned paused, and start once the answer comes
    /// ([`Context::start_deferred`]).
    deferred: std::sync::Mutex<Vec<Deferred>>,
    /// Whether `deferred` holds anything: read at every poll.
    deferring: std::sync::atomic::AtomicBool,
}

/// Partitions assigned paused until the task says where they start.
struct Deferred {
    partitions: Vec<i32>,
    /// The assignment, when the channel had no room for it yet.
    event: Option<Event>,
    answer: oneshot::Receiver<Vec<(i32, Offset)>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("topic", &self.topic)
            .field("role", &self.role)
            .field("revoke_wait", &self.revoke_wait)
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

/// Whether an event reached the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    Yes,
    /// The task is gone (closing): nobody to wait for.
    Gone,
    TimedOut,
}

/// Whether the task took what was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handed {
    /// Everything pending is with the task (or nothing was pending).
    All,
    /// The channel is full: the records stay pending (under their permits).
    Later,
    /// The task is gone.
    Gone,
}

impl Context {
    pub(super) fn new(
        table: Table,
        topic: String,
        events: mpsc::Sender<Event>,
        revoke_wait: Duration,
        role: Role,
        on_kafka: OnKafka,
    ) -> Context {
        Context {
            table,
            topic,
            events,
            pending: std::sync::Mutex::new(Vec::new()),
            revoke_wait,
            role,
            runtime: tokio::runtime::Handle::current(),
            on_kafka,
            failing: std::sync::atomic::AtomicBool::new(false),
            read: std::sync::atomic::AtomicBool::new(false),
            deferred: std::sync::Mutex::new(Vec::new()),
            deferring: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The role this consumer serves.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Hands everything over, waiting at most `wait` for room in the channel.
    /// Call from the poll thread only (it blocks on `runtime`).
    pub(super) fn hand_over_within(&self, runtime: &tokio::runtime::Handle, wait: Duration) -> Handed {
        let records = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if records.is_empty() {
            return Handed::All;
        }
        // An async fn: its timer is made when `block_on` first polls it.
        match runtime.block_on(self.events.send_timeout(Event::Records(records), wait)) {
            Ok(()) => Handed::All,
            Err(mpsc::error::SendTimeoutError::Timeout(Event::Records(records))) => {
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = records;
                Handed::Later
            }
            Err(_) => Handed::Gone,
        }
    }

    /// Sends `event`, waiting at most until `deadline` (`None`: for as long as
    /// the task lives).
    pub(super) fn send_by(&self, mut event: Event, deadline: Option<Instant>) -> Sent {
        if let Some(deadline) = deadline {
            return self.send_until(event, deadline).0;
        }
        loop {
            match self.send_until(event, Instant::now() + Duration::from_secs(60)) {
                (Sent::TimedOut, Some(back)) => event = back,
                (sent, _) => return sent,
            }
        }
    }

    /// Like [`Context::send_by`], but gives the event back when the deadline
    /// passes first.
    fn send_until(&self, mut event: Event, deadline: Instant) -> (Sent, Option<Event>) {
        loop {
            match self.events.try_send(event) {
                Ok(()) => return (Sent::Yes, None),
                Err(mpsc::error::TrySendError::Closed(_)) => return (Sent::Gone, None),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return (Sent::TimedOut, Some(back));
                    }
                    event = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// How long an assignment waits for the task's start offsets before its
    /// partitions are assigned paused (a small part of `max.poll.interval.ms`).
    fn assign_wait(&self) -> Duration {
        (self.revoke_wait / 2).min(ASSIGN_WAIT)
    }

    /// Assigns `tpl` (the partitions of `deferred`) paused, to start once the
    /// task answers.
    fn defer(
        &self,
        consumer: &BaseConsumer<Context>,
        tpl: &TopicPartitionList,
        cooperative: bool,
        deferred: Deferred,
        waited: Duration,
    ) {
        let partitions = deferred.partitions.clone();
        {
            self.deferred().push(deferred);
            self.deferring.store(true, std::sync::atomic::Ordering::Release);
        }
        // At the log's end, not at the group's committed offset: a partition
        // with none would fail (auto.offset.reset is `error`) before the task
        // says where it starts, and the fetch out of range would rebuild the
        // consumer. The start seeks each partition to its offset.
        let mut at_end = tpl.clone();
        if let Err(e) = at_end.set_all_offsets(Offset::End) {
            self.error("rebalance", "cannot place partitions waiting for their start", &e, true);
        }
        let assigned = if cooperative {
            consumer.incremental_assign(&at_end)
        } else {
            consumer.assign(&at_end)
        };
        if let Err(e) = assigned {
            self.error("rebalance", "cannot apply the rebalance", &e, true);
            return;
        }
        if let Err(e) = consumer.pause(&at_end) {
            self.error("rebalance", "cannot pause partitions waiting for their start", &e, true);
        }
        AssignmentDeferred {
            consumer: self.consumer(),
            partitions: &partitions,
            waited,
        }
        .emit();
    }

    pub(super) fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The client failed with `error`: told to the role when the code is one a
    /// person must act on (see [`failure_kind`]); true when it was.
    pub(super) fn failed(&self, error: &KafkaError, reason: &str) -> bool {
        let Some(kind) = error.rdkafka_error_code().and_then(failure_kind) else {
            return false;
        };
        let reason = if reason.is_empty() || error.to_string().contains(reason) {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        self.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        (self.on_kafka)(&KafkaCondition::Failing { kind, reason });
        true
    }

    /// The broker does not know the topic: a failure once this consumer was
    /// assigned partitions of it (the topic was deleted: kind `topic deleted`,
    /// told to the role, true), else a topic not created yet (false: the start
    /// warned of it once).
    pub(super) fn topic_unknown(&self, error: &KafkaError) -> bool {
        if !self.read.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let reason = format!(
            "the topic was deleted: the broker no longer knows it ({error}); nothing can be read until it is \
             created again"
        );
        self.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        (self.on_kafka)(&KafkaCondition::Failing {
            kind: "topic deleted",
            reason,
        });
        true
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Vec<Deferred>> {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether some partitions wait for the task to say where they start.
    pub(super) fn deferring(&self) -> bool {
        self.deferring.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `partition` waits for its start (its records are not handed on:
    /// it is read again from its start).
    pub(super) fn awaits(&self, partition: i32) -> bool {
        self.deferred().iter().any(|d| d.partitions.contains(&partition))
    }

    /// The partitions waiting for their start.
    pub(super) fn awaiting(&self) -> Vec<i32> {
        self.deferred().iter().flat_map(|d| d.partitions.clone()).collect()
    }

    /// Drops `partitions` (revoked; all of them when `None`) from the deferred
    /// assignments, and from an assignment not handed to the task yet.
    fn forget_deferred(&self, partitions: Option<&[i32]>) {
        let mut deferred = self.deferred();
        for d in deferred.iter_mut() {
            let gone = |p: &i32| partitions.is_none_or(|revoked| revoked.contains(p));
            d.partitions.retain(|p| !gone(p));
            if let Some(Event::Assigned { partitions, .. }) = d.event.as_mut() {
                partitions.retain(|p| !gone(p));
            }
        }
        deferred.retain(|d| !d.partitions.is_empty());
        self.deferring
            .store(!deferred.is_empty(), std::sync::atomic::Ordering::Release);
    }

    /// Hands the deferred assignments to the task as the channel has room, and
    /// starts the partitions it answered for: seeks them to their start and,
    /// unless fetching is paused (`paused`), resumes them. Called by the poll
    /// loop while [`Context::deferring`].
    pub(super) fn start_deferred(&self, consumer: &BaseConsumer<Context>, paused: bool) {
        let mut ready: Vec<(i32, Offset)> = Vec::new();
        {
            let mut deferred = self.deferred();
            deferred.retain_mut(|d| {
                if let Some(event) = d.event.take() {
                    match self.events.try_send(event) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(event)) => {
                            d.event = Some(event);
                            return true;
                        }
                        // The task is gone: the consumer closes.
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    }
                }
                match d.answer.try_recv() {
                    Ok(offsets) => {
                        ready.extend(offsets.into_iter().filter(|(p, _)| d.partitions.contains(p)));
                        false
                    }
                    Err(oneshot::error::TryRecvError::Empty) => true,
                    Err(oneshot::error::TryRecvError::Closed) => false,
                }
            });
            self.deferring
                .store(!deferred.is_empty(), std::sync::atomic::Ordering::Release);
        }
        if ready.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in &ready {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *partition, *offset) {
                self.error("rebalance", "cannot set a deferred start offset", &e, true);
            }
        }
        let partitions: Vec<i32> = ready.iter().map(|(p, _)| *p).collect();
        let sought = consumer.seek_partitions(tpl.clone(), Duration::from_secs(10));
        let failed = match &sought {
            Ok(list) => list
                .elements()
                .iter()
                .find_map(|e| e.error().err())
                .map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            // Where they would read from is unknown: rebuild the consumer.
            let _ = self.events.try_send(Event::PollFailed(format!(
                "cannot seek partitions {partitions:?} to their start: {why}"
            )));
            return;
        }
        if !paused {
            if let Err(e) = consumer.resume(&tpl) {
                self.error("rebalance", "cannot resume partitions after their start", &e, true);
            }
        }
        AssignmentStarted {
            consumer: self.consumer(),
            partitions: &partitions,
        }
        .emit();
    }

    /// An error the client goes through on its own: counted and logged.
    pub(super) fn error(&self, kind: &'static str, what: &str, error: &dyn Shown, warn: bool) {
        KafkaErrorEvent {
            consumer: self.consumer(),
            kind,
            what,
            error,
            warn,
        }
        .emit();
    }

    /// This consumer, as its events name it.
    pub(super) fn consumer(&self) -> Consumer<'_> {
        Consumer {
            table: self.table,
            topic: &self.topic,
            role: self.role.name(),
        }
    }

    /// The client did its work (a record, an assignment): a failure is over.
    pub(super) fn working(&self) {
        if self.failing.swap(false, std::sync::atomic::Ordering::SeqCst) {
            (self.on_kafka)(&KafkaCondition::Recovered);
        }
    }
}

/// The longest an assignment waits for the task's start offsets.
const ASSIGN_WAIT: Duration = Duration::from_secs(5);

/// Waits for the answer until `deadline`; takes it out of `answer` when it
/// came or the task is gone, leaves it there when the deadline passed first.
fn answer_within<T>(answer: &mut Option<oneshot::Receiver<T>>, deadline: Instant) -> Option<T> {
    let receiver = answer.as_mut()?;
    loop {
        match receiver.try_recv() {
            Ok(value) => {
                *answer = None;
                return Some(value);
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                *answer = None;
                return None;
            }
            Err(oneshot::error::TryRecvError::Empty) if Instant::now() >= deadline => return None,
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let level = match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::Level::ERROR
            }
            RDKafkaLogLevel::Warning => tracing::Level::WARN,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::Level::INFO,
            RDKafkaLogLevel::Debug => tracing::Level::DEBUG,
        };
        ClientLog {
            consumer: self.consumer(),
            level,
            facility,
            message,
        }
        .emit();
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.failed(&error, reason) {
            return;
        }
        match error.rdkafka_error_code() {
            // A subscribed topic that does not exist (yet): the start warned once,
            // and librdkafka repeats this at every metadata refresh.
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                self.error("client", &format!("client error: {reason}"), &error, false)
            }
            _ => self.error("client", &format!("client error: {reason}"), &error, true),
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        // Records polled before the rebalance reach the task before it hears of it.
        // An assignment waits for the task as long as it takes (it chooses the
        // offsets); a revoke at most `revoke_wait`.
        let revoking = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty()
            && matches!(
                err,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                    | RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
            )
        {
            // A round of the group that moves nothing of this topic (another
            // member joined or left; librdkafka calls back with an empty list
            // after every cooperative round): nothing for the task to decide or
            // write, so it is not asked. A task waiting on a stalled write would
            // otherwise hold this poll thread past max.poll.interval.ms, and the
            // member would leave the group for a round that did not concern it.
            let result = match (revoking, cooperative) {
                (true, true) => consumer.incremental_unassign(tpl),
                (false, true) => consumer.incremental_assign(tpl),
                (true, false) => consumer.unassign(),
                (false, false) => consumer.assign(tpl),
            };
            if let Err(e) = result {
                self.error("rebalance", "cannot apply the rebalance", &e, true);
            }
            return;
        }
        if !revoking {
            // Partitions of this topic assigned: the group and the topic answer.
            self.read.store(true, std::sync::atomic::Ordering::SeqCst);
            self.working();
        }
        // A revoke waits at most `revoke_wait` for the task; an assignment at
        // most `assign_wait`, then its partitions are assigned paused and start
        // once the task answers: the poll thread never waits on a task that
        // awaits a stalled write or the DWH, and the member stays in its group.
        let wait = if revoking { self.revoke_wait } else { self.assign_wait() };
        let deadline = Instant::now() + wait;
        self.hand_over_within(&self.runtime, wait);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let event = Event::Assigned {
                    partitions: partitions.clone(),
                    reply,
                };
                let (sent, unsent) = self.send_until(event, deadline);
                let mut answer = Some(answer);
                let offsets = match sent {
                    Sent::Yes => answer_within(&mut answer, deadline),
                    Sent::Gone => None,
                    Sent::TimedOut => None,
                };
                if offsets.is_none() && sent != Sent::Gone {
                    if let Some(answer) = answer {
                        let deferred = Deferred {
                            partitions,
                            event: unsent,
                            answer,
                        };
                        self.defer(consumer, tpl, cooperative, deferred, wait);
                        return;
                    }
                }
                let Some(offsets) = offsets else {
                    // The task is gone (stopping): take nothing on.
                    let none = TopicPartitionList::new();
                    let result = if cooperative {
                        consumer.incremental_assign(&none)
                    } else {
                        consumer.assign(&none)
                    };
                    if let Err(e) = result {
                        self.error("rebalance", "cannot decline the assignment", &e, true);
                    }
                    return;
                };
                for (partition, offset) in offsets {
                    if let Err(e) = tpl.set_partition_offset(&self.topic, partition, offset) {
                        let what = format!("cannot set the start offset of partition {partition}");
                        self.error("rebalance", &what, &e, true);
                    }
                }
                PartitionsMoved {
                    consumer: self.consumer(),
                    partitions: &partitions,
                    assigned: true,
                    late: None,
                }
                .emit();
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // A deferred start of these partitions is void; an assignment the
                // task has not heard of yet loses them.
                self.forget_deferred((cooperative).then_some(partitions.as_slice()));
                let (reply, answer) = oneshot::channel();
                let event = Event::Revoked {
                    partitions: partitions.clone(),
                    reply,
                };
                let sent = self.send_by(event, Some(deadline));
                let answered = sent == Sent::Yes && answer_within(&mut Some(answer), deadline).is_some();
                // When the task is stuck writing, leaving now keeps this member
                // in the group; a write of these partitions that lands later is
                // fenced if the next owner wrote first.
                PartitionsMoved {
                    consumer: self.consumer(),
                    partitions: &partitions,
                    assigned: false,
                    late: (!answered && sent != Sent::Gone).then_some(self.revoke_wait),
                }
                .emit();
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                self.error("rebalance", "rebalance failed; dropping the assignment", &code, true);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            self.error("rebalance", "cannot apply the rebalance", &e, true);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Kafka commits only feed lag tools; the DWH holds the real offsets.
        if let Err(e) = result {
            self.error("commit", "offset commit failed", &e, false);
        }
    }
}
