//! The Kafka side of one table's ingest: a consumer polled on its own thread.
//!
//! Guarantees: the poll thread only passes things on. Records go to the owning
//! task over a bounded channel, each holding its share of the in-flight memory
//! budget; rebalance callbacks send "assigned"/"revoked" to the same task (after
//! the records polled before them) and wait for its answer, so partitions are
//! assigned at the offsets the task chose and revoked after it has written what it
//! buffered for them (or after half of `max.poll.interval.ms`: the fence keeps a
//! late write from landing twice). The poll thread never blocks on the task or on
//! memory: when the budget is spent or the task is behind, it pauses its
//! partitions and keeps polling, so the member stays in its group however long the
//! database stalls. Partitions are assigned `cooperative-sticky` by default: a
//! rebalance moves only the partitions that change hands.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::catalogue::Table;
use crate::config::KafkaConfig;
use crate::kafka::{self, KafkaSetupError};

/// The memory share of one table's consumer: the role's budget split evenly, so
/// that one table whose writes stall cannot starve the others.
pub fn table_budget(role_budget: usize) -> u32 {
    (role_budget / Table::ALL.len()).clamp(1, u32::MAX as usize) as u32
}

/// A token cancelled `grace` after `shutdown`: when retries stop and a write in
/// progress is given up.
pub fn grace_deadline(shutdown: &CancellationToken, grace: Duration) -> CancellationToken {
    let abort = CancellationToken::new();
    let (shutdown, deadline) = (shutdown.clone(), abort.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
        deadline.cancel();
    });
    abort
}

/// Waits for every table's task of a role; a task that failed is logged.
pub async fn join_tables(role: &str, mut tasks: tokio::task::JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(role, error = %e, "a table task failed");
        }
    }
    tracing::info!(role, "stopped");
}

/// Batches of records buffered between a poll thread and its task (memory is
/// bounded by the in-flight byte budget; this only bounds the count).
const CHANNEL_BATCHES: usize = 64;
/// Records handed over at once: one wake-up of the task per batch, not per record.
const HANDOVER_RECORDS: usize = 256;
/// How long the poll loop waits for a record, or for memory while paused.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("cannot subscribe to {topic}: {cause}")]
    Subscribe {
        topic: String,
        cause: rdkafka::error::KafkaError,
    },
    #[error("cannot start a poll thread: {0}")]
    Thread(std::io::Error),
}

/// Why the task that owns a consumer stopped.
#[derive(Debug)]
pub enum Exit {
    /// Shutdown: what was buffered is handled (or the grace period ran out).
    Shutdown,
    /// The consumer must be rebuilt (fenced, a failed commit, the poll thread gone).
    Restart(String),
    /// The table cannot go on without an operator (an offset outside the log): the
    /// consumer stays down until the process restarts. The reason was logged and
    /// is reported by readiness.
    Stopped(String),
}

const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Keeps one consumer running until shutdown: runs it with `run`, and after a
/// failure or a restart request waits a second and rebuilds it with `build`.
/// Ingest and archive share it.
pub async fn supervise<B, R, F>(label: &str, first: Subscription, shutdown: &CancellationToken, build: B, mut run: R)
where
    B: Fn() -> Result<Subscription, ConsumerError>,
    R: FnMut(Subscription) -> F,
    F: std::future::Future<Output = Result<Exit, ConsumerError>>,
{
    let mut next = Some(first);
    loop {
        let subscription = match next.take().map_or_else(&build, Ok) {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::error!(consumer = label, error = %e, "cannot build the consumer");
                if pause(shutdown).await {
                    return;
                }
                continue;
            }
        };
        match run(subscription).await {
            Ok(Exit::Shutdown) => return,
            Ok(Exit::Stopped(why)) => {
                tracing::error!(consumer = label, reason = %why, "consumer stopped until an operator acts");
                return;
            }
            Ok(Exit::Restart(why)) => tracing::warn!(consumer = label, reason = %why, "restarting the consumer"),
            Err(e) => tracing::error!(consumer = label, error = %e, "consumer failed; restarting it"),
        }
        if pause(shutdown).await {
            return;
        }
    }
}

/// Waits before a restart; true when shutting down instead.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(RESTART_DELAY) => shutdown.is_cancelled(),
        () = shutdown.cancelled() => true,
    }
}

/// A consumer subscribed to one table's topic, not yet polled.
#[allow(missing_debug_implementations)]
pub struct Subscription {
    pub consumer: Arc<BaseConsumer<Context>>,
    receiver: mpsc::Receiver<Event>,
}

/// Which role a consumer serves: it decides where partitions start and how the
/// consumer's client and static-membership ids are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Starts every partition at an explicit offset chosen by the owning task
    /// (the DWH's); a fetch out of range is an error the task decides on, never a
    /// silent jump.
    Ingest,
    /// Starts at its own group's committed offset, else at the earliest record.
    Archive,
}

impl Role {
    fn offset_reset(self) -> &'static str {
        match self {
            Role::Ingest => "error",
            Role::Archive => "earliest",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Role::Ingest => "",
            Role::Archive => "-archive",
        }
    }
}

/// Builds a consumer of `table`'s topic in `group_id` (auto-commit off; the
/// owning task decides what is committed where).
pub fn subscribe(kafka: &KafkaConfig, group_id: &str, table: Table, role: Role) -> Result<Subscription, ConsumerError> {
    let instance_suffix = role.suffix();
    let topic = kafka::topic_name(&kafka.topic_prefix, table);
    let (events, receiver) = mpsc::channel(CHANNEL_BATCHES);
    let mut settings = kafka::client_config(
        kafka,
        &[
            ("group.id", group_id),
            ("client.id", &format!("dwh-helper-{}{instance_suffix}", table.name())),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("auto.offset.reset", role.offset_reset()),
            // librdkafka's own prefetch counts against memory too: keep it modest.
            ("queued.max.messages.kbytes", "16384"),
            // Pick up topics created after the start within seconds.
            ("topic.metadata.refresh.interval.ms", "10000"),
            // A rebalance moves only the partitions that change hands; the others
            // keep their buffers and go on (KAFKA_LIBRDKAFKA_PARTITION_ASSIGNMENT_STRATEGY
            // overrides it; every member of a group must use the same protocol).
            ("partition.assignment.strategy", "cooperative-sticky"),
        ],
    )?;
    let max_poll_interval = settings
        .get("max.poll.interval.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
    if let Some(instance) = &kafka.group_instance_id {
        settings.set(
            "group.instance.id",
            format!("{instance}-{}{instance_suffix}", table.name()),
        );
    }
    let context = Context {
        topic: topic.clone(),
        events,
        pending: std::sync::Mutex::new(Vec::new()),
        revoke_wait: Duration::from_millis(max_poll_interval / 2),
    };
    let consumer: BaseConsumer<Context> =
        settings
            .create_with_context(context)
            .map_err(|cause| KafkaSetupError::Client {
                role: "consumer",
                cause,
            })?;
    consumer
        .subscribe(&[&topic])
        .map_err(|cause| ConsumerError::Subscribe { topic, cause })?;
    Ok(Subscription {
        consumer: Arc::new(consumer),
        receiver,
    })
}

impl Subscription {
    /// Starts the poll thread; returns it and the events for the owning task.
    /// `pauses` counts how often fetching paused (memory spent or the task behind).
    pub fn poll(
        self,
        memory: Arc<Semaphore>,
        budget: u32,
        pauses: Arc<AtomicU64>,
    ) -> Result<(Poller, mpsc::Receiver<Event>), ConsumerError> {
        let stop = CancellationToken::new();
        let thread = {
            // The context holds the sender the poll loop hands records over on.
            let (consumer, stop) = (self.consumer.clone(), stop.clone());
            let name = format!("poll-{}", consumer.context().topic);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || poll_loop(consumer, memory, budget, pauses, stop))
                .map_err(ConsumerError::Thread)?
        };
        Ok((
            Poller {
                stop,
                thread,
                consumer: self.consumer,
            },
            self.receiver,
        ))
    }
}

/// A running poll thread and its consumer.
#[allow(missing_debug_implementations)]
pub struct Poller {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
    consumer: Arc<BaseConsumer<Context>>,
}

impl Poller {
    /// Stops polling and closes the consumer (leaving the group). Call after the
    /// task dropped its receiver, so rebalance callbacks during the close find
    /// nobody to wait for.
    pub async fn close(self) {
        self.stop.cancel();
        let Poller { thread, consumer, .. } = self;
        let closed = tokio::task::spawn_blocking(move || {
            let _ = thread.join();
            drop(consumer);
        })
        .await;
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing a consumer failed");
        }
    }
}

/// What the poll thread tells the owning task.
#[derive(Debug)]
pub enum Event {
    /// Records in poll order, each with its share of the memory budget.
    Records(Vec<(OwnedMessage, OwnedSemaphorePermit)>),
    /// Partitions were assigned; the answer gives where each one starts. No answer
    /// (the task stopped) assigns nothing.
    Assigned {
        partitions: Vec<i32>,
        reply: oneshot::Sender<Vec<(i32, Offset)>>,
    },
    /// A fetch position fell outside a partition's log (consumers of
    /// [`Role::Ingest`] never jump by themselves).
    OutOfRange(String),
    /// Partitions are being revoked; answer once nothing of them stays buffered.
    Revoked {
        partitions: Vec<i32>,
        reply: oneshot::Sender<()>,
    },
}

/// The rdkafka context: forwards logs to `tracing` and rebalances to the task.
#[derive(Debug)]
pub struct Context {
    pub topic: String,
    pub events: mpsc::Sender<Event>,
    /// Records polled but not handed over yet (only the poll thread touches it:
    /// the poll loop and the rebalance callback, which runs inside `poll`).
    pending: std::sync::Mutex<Vec<(OwnedMessage, OwnedSemaphorePermit)>>,
    /// How long a revoke waits for the task to write what it buffered.
    revoke_wait: Duration,
}

/// Whether the task took what was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handed {
    /// Everything pending is with the task (or nothing was pending).
    All,
    /// The channel is full: the records stay pending (under their permits).
    Later,
    /// The task is gone.
    Gone,
}

impl Context {
    /// Offers the polled records to the task without waiting.
    fn hand_over(&self) -> Handed {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            return Handed::All;
        }
        match self.events.try_send(Event::Records(std::mem::take(&mut *pending))) {
            Ok(()) => Handed::All,
            Err(mpsc::error::TrySendError::Full(Event::Records(records))) => {
                *pending = records;
                Handed::Later
            }
            Err(_) => Handed::Gone,
        }
    }

    /// Hands everything over, waiting at most until `deadline`; false when the
    /// task is gone or the deadline passed.
    fn hand_over_by(&self, deadline: Instant) -> bool {
        loop {
            match self.hand_over() {
                Handed::All => return true,
                Handed::Gone => return false,
                Handed::Later if Instant::now() >= deadline => return false,
                Handed::Later => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Sends `event`, waiting at most until `deadline` (`None`: for as long as
    /// the task lives); false when it was not sent.
    fn send_by(&self, mut event: Event, deadline: Option<Instant>) -> bool {
        loop {
            match self.events.try_send(event) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                    event = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Waits for a oneshot answer, at most until `deadline` when one is given.
fn answer_by<T>(mut answer: oneshot::Receiver<T>, deadline: Option<Instant>) -> Option<T> {
    let Some(deadline) = deadline else {
        return answer.blocking_recv().ok();
    };
    loop {
        match answer.try_recv() {
            Ok(value) => return Some(value),
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) if Instant::now() >= deadline => return None,
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(topic = %self.topic, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(topic = %self.topic, facility, "librdkafka: {message}"),
            _ => tracing::debug!(topic = %self.topic, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(topic = %self.topic, error = %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        // Records polled before the rebalance reach the task before it hears of it.
        // An assignment waits for the task as long as it takes (it chooses the
        // offsets); a revoke at most `revoke_wait`.
        let revoking = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;
        let deadline = revoking.then(|| Instant::now() + self.revoke_wait);
        self.hand_over_by(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)));
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let event = Event::Assigned {
                    partitions: partitions.clone(),
                    reply,
                };
                let offsets = self.send_by(event, None).then(|| answer_by(answer, None)).flatten();
                let Some(offsets) = offsets else {
                    // The task is gone (stopping): take nothing on.
                    let none = TopicPartitionList::new();
                    let result = if cooperative {
                        consumer.incremental_assign(&none)
                    } else {
                        consumer.assign(&none)
                    };
                    if let Err(e) = result {
                        tracing::warn!(topic = %self.topic, error = %e, "cannot decline the assignment");
                    }
                    return;
                };
                for (partition, offset) in offsets {
                    if let Err(e) = tpl.set_partition_offset(&self.topic, partition, offset) {
                        tracing::error!(topic = %self.topic, partition, error = %e, "cannot set the start offset");
                    }
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let event = Event::Revoked {
                    partitions: partitions.clone(),
                    reply,
                };
                let answered = self.send_by(event, deadline) && answer_by(answer, deadline).is_some();
                if !answered {
                    // The task is stuck writing (or gone). Leaving now keeps this
                    // member in the group; a write of these partitions that lands
                    // later is fenced if the next owner wrote first.
                    tracing::warn!(topic = %self.topic, ?partitions, wait_ms = self.revoke_wait.as_millis() as u64, "revoking before the buffered records were written");
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(topic = %self.topic, error = %code, "rebalance failed; dropping the assignment");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(topic = %self.topic, error = %e, "cannot apply the rebalance");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Kafka commits only feed lag tools; the DWH holds the real offsets.
        if let Err(e) = result {
            tracing::debug!(topic = %self.topic, error = %e, "kafka offset commit failed");
        }
    }
}

/// Polls `consumer` until `stop` is cancelled or the task goes away. Records are
/// handed over in batches: when [`HANDOVER_RECORDS`] are gathered, when nothing
/// more is ready, and before a rebalance. Nothing here blocks: when a record finds
/// no memory, or the task does not take what is gathered, the assigned partitions
/// are paused and polling goes on (serving rebalances and the group's liveness)
/// until memory comes back and the task catches up; then they resume.
fn poll_loop(
    consumer: Arc<BaseConsumer<Context>>,
    memory: Arc<Semaphore>,
    memory_budget: u32,
    pauses: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let context = consumer.context();
    let topic = context.topic.clone();
    // Records polled while no memory was left (fetched before the pause took
    // effect), in poll order, each with the permits it needs.
    let mut held: VecDeque<(OwnedMessage, u32)> = VecDeque::new();
    let mut paused = false;
    // The task did not take the last offer: try again each round.
    let mut behind = false;
    while !stop.is_cancelled() {
        while let Some((message, permits)) = held.pop_front() {
            match memory.clone().try_acquire_many_owned(permits) {
                Ok(permit) => context
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((message, permit)),
                Err(_) => {
                    held.push_front((message, permits));
                    break;
                }
            }
        }
        let pending = context.pending();
        if pending > 0 && (pending >= HANDOVER_RECORDS || behind || !held.is_empty()) {
            match context.hand_over() {
                Handed::Gone => break,
                handed => behind = handed == Handed::Later,
            }
        }
        let blocked = !held.is_empty() || behind;
        if blocked != paused {
            if blocked {
                pauses.fetch_add(1, Ordering::Relaxed);
            }
            set_paused(&consumer, &topic, blocked);
            paused = blocked;
        }
        let timeout = if context.pending() > 0 && !blocked {
            Duration::ZERO
        } else {
            POLL_WAIT
        };
        let message = match consumer.poll(timeout) {
            None => {
                match context.hand_over() {
                    Handed::Gone => break,
                    handed => behind = handed == Handed::Later,
                }
                continue;
            }
            Some(Ok(message)) => message.detach(),
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)))
            | Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopic))) => {
                // The start already warned about a missing topic, once.
                tracing::debug!(topic = %topic, "topic not available yet");
                continue;
            }
            Some(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange),
            ))) => {
                // The owning task decides, against the watermarks, what this means.
                let deadline = Instant::now() + context.revoke_wait;
                if !context.hand_over_by(deadline)
                    || !context.send_by(Event::OutOfRange(code.to_string()), Some(deadline))
                {
                    break;
                }
                continue;
            }
            Some(Err(e)) => {
                tracing::warn!(topic = %topic, error = %e, "kafka consume error");
                continue;
            }
        };
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let permits = u32::try_from(size).unwrap_or(u32::MAX).clamp(1, memory_budget);
        if !held.is_empty() {
            // Keep poll order: nothing overtakes a record waiting for memory. A
            // record here comes from a partition assigned since the pause (or
            // fetched before it): pause again, so that fetching stops there too.
            held.push_back((message, permits));
            set_paused(&consumer, &topic, true);
            paused = true;
            continue;
        }
        match memory.clone().try_acquire_many_owned(permits) {
            Ok(permit) => context
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((message, permit)),
            Err(_) => {
                held.push_back((message, permits));
                if !paused {
                    pauses.fetch_add(1, Ordering::Relaxed);
                    set_paused(&consumer, &topic, true);
                    paused = true;
                }
            }
        }
    }
}

/// Pauses or resumes fetching of every assigned partition.
fn set_paused(consumer: &BaseConsumer<Context>, topic: &str, pause: bool) {
    let assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot read the assignment to pause or resume it");
            return;
        }
    };
    let result = if pause {
        tracing::debug!(topic, "memory budget spent or the writer behind: fetching paused");
        consumer.pause(&assignment)
    } else {
        tracing::debug!(topic, "fetching resumed");
        consumer.resume(&assignment)
    };
    if let Err(e) = result {
        tracing::warn!(topic, pause, error = %e, "cannot pause or resume fetching");
    }
}
