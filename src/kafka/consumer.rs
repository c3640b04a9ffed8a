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
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::catalogue::Table;
use crate::config::KafkaConfig;
use crate::kafka::memory::{Held, MemoryShare, TableMemory};
use crate::kafka::{self, KafkaSetupError};

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
/// How long the poll loop waits for a record.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// How long the poll loop waits while paused: it looks again this soon for the
/// memory or the task it waits on, so that fetching resumes within a few
/// milliseconds of a batch landing, not up to [`POLL_WAIT`] later.
const PAUSED_POLL_WAIT: Duration = Duration::from_millis(5);
/// How long the poll thread waits for memory or for the task before it pauses
/// fetching: short against `max.poll.interval.ms`, long against a batch write.
const SHORT_WAIT: Duration = Duration::from_secs(1);
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
    /// What a record of `size` bytes (payload and key) costs in memory while it
    /// is held: ingest holds the decoded row, about twice the JSON it came from
    /// (a value per column, each with its own allocation); the archive holds the
    /// record's line, gzipped, at most its size.
    pub fn charge(self, size: usize) -> usize {
        match self {
            Role::Ingest => size.saturating_mul(2),
            Role::Archive => size,
        }
    }

    /// How long librdkafka waits to fetch again for a partition whose queue was
    /// full. The ingest looks again soon: with a prefetch smaller than a batch,
    /// librdkafka's default second was most of what it waited on (bench: 22.6k
    /// rows/s at 1 s, 34.6k at 20 ms). The archive, whose objects close by size
    /// or interval, keeps the default and the broker's fewer fetches.
    fn fetch_queue_backoff_ms(self) -> &'static str {
        match self {
            Role::Ingest => "20",
            Role::Archive => "1000",
        }
    }

    /// How long a broker may hold a fetch that finds no data. librdkafka has
    /// one fetch in flight per broker, and leaves out of it the partitions whose
    /// local queue is full: near the end of a backlog, a fetch of only drained
    /// partitions was held for librdkafka's default 500 ms while the full ones
    /// drained and waited (bench: stalls of 0.4 s in half the runs, none in
    /// six at 50 ms). The ingest asks again after 50 ms, about 20 small fetches
    /// a second per table while idle; the archive keeps the default.
    fn fetch_wait_max_ms(self) -> &'static str {
        match self {
            Role::Ingest => "50",
            Role::Archive => "500",
        }
    }

    fn offset_reset(self) -> &'static str {
        match self {
            Role::Ingest => "error",
            Role::Archive => "earliest",
        }
    }

    /// The tables the role consumes, which share its budget: those of
    /// `KAFKA_INGEST_TABLES` or `KAFKA_ARCHIVE_TABLES`.
    pub fn tables(self, kafka: &KafkaConfig) -> &[Table] {
        match self {
            Role::Ingest => &kafka.ingest_tables,
            Role::Archive => &kafka.archive_tables,
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
pub fn subscribe(
    kafka: &KafkaConfig,
    group_id: &str,
    table: Table,
    role: Role,
    on_kafka: OnKafka,
) -> Result<Subscription, ConsumerError> {
    let instance_suffix = role.suffix();
    let share = MemoryShare::of(kafka.max_in_flight_bytes, role.tables(kafka).len());
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
            // librdkafka's prefetch is part of the table's memory share.
            (
                "queued.max.messages.kbytes",
                &(share.prefetch_half / 1024).max(1).to_string(),
            ),
            ("fetch.max.bytes", &share.prefetch_half.to_string()),
            ("fetch.queue.backoff.ms", role.fetch_queue_backoff_ms()),
            ("fetch.wait.max.ms", role.fetch_wait_max_ms()),
            // Pick up topics created after the start within seconds.
            ("topic.metadata.refresh.interval.ms", "10000"),
        ],
    )?;
    if !kafka.consumer_protocol() && settings.get("partition.assignment.strategy").is_none() {
        // Classic groups: a rebalance moves only the partitions that change hands;
        // the others keep their buffers and go on (every member of a group must use
        // the same protocol). KIP-848 groups are incremental by design, assigned by
        // the broker, and librdkafka refuses the setting there.
        settings.set("partition.assignment.strategy", "cooperative-sticky");
    }
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
        role,
        runtime: tokio::runtime::Handle::current(),
        on_kafka,
        failing: std::sync::atomic::AtomicBool::new(false),
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

/// Called from the poll thread each time fetching pauses.
pub type OnPause = Arc<dyn Fn() + Send + Sync>;

/// What the consumer's client says of its broker connection and permissions:
/// told to the owning role each time it changes, from librdkafka's threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaCondition {
    /// The client cannot do its work until someone acts: credentials refused,
    /// a certificate not trusted, a permission missing, a codec unreadable.
    /// librdkafka keeps retrying; the table is failing while this lasts.
    Failing { kind: &'static str, reason: String },
    /// A record or an assignment arrived after a failure: the client works again.
    Recovered,
}

/// Told of each change of [`KafkaCondition`].
pub type OnKafka = Arc<dyn Fn(&KafkaCondition) + Send + Sync>;

/// The kind of failure an error code means for a consumer, when it is one that
/// retrying alone does not mend (a person must act), else `None`: a broker away
/// or a rebalance in progress mends itself.
pub fn failure_kind(code: RDKafkaErrorCode) -> Option<&'static str> {
    match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => Some("authentication"),
        RDKafkaErrorCode::SSL => Some("tls"),
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::GroupAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => Some("authorization"),
        // A record batch this build cannot decompress is refetched for ever.
        RDKafkaErrorCode::NotImplemented | RDKafkaErrorCode::InvalidRecord => Some("unreadable records"),
        _ => None,
    }
}

impl Subscription {
    /// Starts the poll thread; returns it and the events for the owning task.
    /// `on_pause` is called each time fetching pauses (memory spent or the task behind).
    pub fn poll(
        self,
        memory: TableMemory,
        on_pause: OnPause,
    ) -> Result<(Poller, mpsc::Receiver<Event>), ConsumerError> {
        let stop = CancellationToken::new();
        let thread = {
            // The context holds the sender the poll loop hands records over on.
            let (consumer, stop) = (self.consumer.clone(), stop.clone());
            let name = format!("poll-{}", consumer.context().topic);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let events = consumer.context().events.clone();
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        poll_loop(consumer, memory, on_pause, stop)
                    }));
                    if let Err(panic) = polled {
                        // Never leave the task waiting for records that cannot come.
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        let _ = events.blocking_send(Event::PollFailed(why));
                    }
                })
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
    Records(Vec<(OwnedMessage, Held)>),
    /// Partitions were assigned; the answer gives where each one starts. No answer
    /// (the task stopped) assigns nothing.
    Assigned {
        partitions: Vec<i32>,
        reply: oneshot::Sender<Vec<(i32, Offset)>>,
    },
    /// A fetch position fell outside a partition's log (consumers of
    /// [`Role::Ingest`] never jump by themselves).
    OutOfRange(String),
    /// The poll thread failed (a bug): the consumer must be rebuilt.
    PollFailed(String),
    /// Partitions are being revoked; answer once nothing of them stays buffered.
    Revoked {
        partitions: Vec<i32>,
        reply: oneshot::Sender<()>,
    },
}

/// The rdkafka context: forwards logs to `tracing` and rebalances to the task.
pub struct Context {
    pub topic: String,
    pub events: mpsc::Sender<Event>,
    /// Records polled but not handed over yet (only the poll thread touches it:
    /// the poll loop and the rebalance callback, which runs inside `poll`).
    pending: std::sync::Mutex<Vec<(OwnedMessage, Held)>>,
    /// How long a revoke waits for the task to write what it buffered.
    revoke_wait: Duration,
    /// What a held record costs ([`Role::charge`]).
    role: Role,
    /// The runtime the poll thread blocks on for short, bounded waits.
    runtime: tokio::runtime::Handle,
    /// Told when the client fails in a way retrying does not mend, and when it
    /// works again.
    on_kafka: OnKafka,
    failing: std::sync::atomic::AtomicBool,
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
enum Sent {
    Yes,
    /// The task is gone (closing): nobody to wait for.
    Gone,
    TimedOut,
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
    /// Hands everything over, waiting at most `wait` for room in the channel.
    /// Call from the poll thread only (it blocks on `runtime`).
    fn hand_over_within(&self, runtime: &tokio::runtime::Handle, wait: Duration) -> Handed {
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
    fn send_by(&self, mut event: Event, deadline: Option<Instant>) -> Sent {
        loop {
            match self.events.try_send(event) {
                Ok(()) => return Sent::Yes,
                Err(mpsc::error::TrySendError::Closed(_)) => return Sent::Gone,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Sent::TimedOut;
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

    /// The client failed with `error`: told to the role when the code is one a
    /// person must act on (see [`failure_kind`]); true when it was.
    fn failed(&self, error: &KafkaError, reason: &str) -> bool {
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

    /// The client did its work (a record, an assignment): a failure is over.
    fn working(&self) {
        if self.failing.swap(false, std::sync::atomic::Ordering::SeqCst) {
            (self.on_kafka)(&KafkaCondition::Recovered);
        }
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
        // A failed Kafka commit loses nothing: the DWH holds the offsets and the
        // commit only mirrors them for lag tools; one fails whenever a rebalance
        // is in progress. Not a warning for ops.
        if facility == "COMMITFAIL" {
            tracing::debug!(target: "librdkafka", topic = %self.topic, facility, "librdkafka: {message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", topic = %self.topic, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", topic = %self.topic, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", topic = %self.topic, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", topic = %self.topic, facility, "librdkafka: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.failed(&error, reason) {
            return;
        }
        match error.rdkafka_error_code() {
            // A subscribed topic that does not exist (yet): the start warned once,
            // and librdkafka repeats this at every metadata refresh.
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                tracing::debug!(topic = %self.topic, error = %error, "kafka client error: {reason}")
            }
            _ => tracing::warn!(topic = %self.topic, error = %error, "kafka client error: {reason}"),
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
                tracing::error!(topic = %self.topic, error = %e, "cannot apply the rebalance");
            }
            return;
        }
        if !revoking {
            // Partitions of this topic assigned: the group and the topic answer.
            self.working();
        }
        let deadline = revoking.then(|| Instant::now() + self.revoke_wait);
        let wait = if revoking {
            self.revoke_wait
        } else {
            Duration::from_secs(3600)
        };
        self.hand_over_within(&self.runtime, wait);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (reply, answer) = oneshot::channel();
                let event = Event::Assigned {
                    partitions: partitions.clone(),
                    reply,
                };
                let offsets = (self.send_by(event, None) == Sent::Yes)
                    .then(|| answer_by(answer, None))
                    .flatten();
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
                let sent = self.send_by(event, deadline);
                let answered = sent == Sent::Yes && answer_by(answer, deadline).is_some();
                if !answered && sent != Sent::Gone {
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
/// more is ready, and before a rebalance. Waits are short and bounded: when a
/// record finds no memory, or the task does not take what is gathered, within
/// [`SHORT_WAIT`], the assigned partitions are paused and polling goes on
/// (serving rebalances and the group's liveness) until memory comes back and the
/// task catches up; then they resume.
fn poll_loop(consumer: Arc<BaseConsumer<Context>>, memory: TableMemory, on_pause: OnPause, stop: CancellationToken) {
    let context = consumer.context();
    let runtime = &context.runtime;
    let topic = context.topic.clone();
    // Records polled while no memory was left (fetched before the pause took
    // effect), in poll order, each with the permits it needs.
    let mut held: VecDeque<(OwnedMessage, u32)> = VecDeque::new();
    let mut paused = false;
    // The task did not take the last offer: try again each round.
    let mut behind = false;
    while !stop.is_cancelled() {
        while let Some((message, permits)) = held.pop_front() {
            match memory.try_take(permits) {
                Some(permit) => context
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((message, permit)),
                None => {
                    held.push_front((message, permits));
                    break;
                }
            }
        }
        let pending = context.pending();
        if pending > 0 && (pending >= HANDOVER_RECORDS || behind || !held.is_empty()) {
            // While paused, only look; otherwise wait a moment for the task.
            let wait = if paused { Duration::ZERO } else { SHORT_WAIT };
            match context.hand_over_within(runtime, wait) {
                Handed::Gone => break,
                handed => behind = handed == Handed::Later,
            }
        }
        let blocked = !held.is_empty() || behind;
        if blocked != paused {
            if blocked {
                on_pause();
            }
            set_paused(&consumer, &topic, blocked);
            paused = blocked;
        }
        let timeout = if context.pending() > 0 && !blocked {
            Duration::ZERO
        } else if paused {
            PAUSED_POLL_WAIT
        } else {
            POLL_WAIT
        };
        let message = match consumer.poll(timeout) {
            None => {
                if context.pending() > 0 {
                    let wait = if paused { Duration::ZERO } else { SHORT_WAIT };
                    match context.hand_over_within(runtime, wait) {
                        Handed::Gone => break,
                        handed => behind = handed == Handed::Later,
                    }
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
                if context.hand_over_within(runtime, context.revoke_wait) != Handed::All
                    || context.send_by(Event::OutOfRange(code.to_string()), Some(deadline)) != Sent::Yes
                {
                    break;
                }
                continue;
            }
            Some(Err(e)) => {
                if !context.failed(&e, "") {
                    tracing::warn!(topic = %topic, error = %e, "kafka consume error");
                }
                continue;
            }
        };
        context.working();
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let permits = u32::try_from(context.role.charge(size))
            .unwrap_or(u32::MAX)
            .clamp(1, memory.max_record());
        if !held.is_empty() {
            // Keep poll order: nothing overtakes a record waiting for memory. A
            // record here comes from a partition assigned since the pause (or
            // fetched before it): pause again, so that fetching stops there too.
            held.push_back((message, permits));
            set_paused(&consumer, &topic, true);
            paused = true;
            continue;
        }
        let permit = match memory.try_take(permits) {
            Some(permit) => Some(permit),
            None if paused => None,
            None => {
                // Hand over what is gathered first (its memory must be able to
                // come back), then wait a moment for memory.
                if context.hand_over_within(runtime, SHORT_WAIT) == Handed::Gone {
                    break;
                }
                runtime.block_on(memory.take_within(permits, SHORT_WAIT))
            }
        };
        match permit {
            Some(permit) => context
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((message, permit)),
            None => {
                held.push_back((message, permits));
                if !paused {
                    on_pause();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_charges_the_decoded_row_and_the_archive_the_record() {
        assert_eq!(Role::Ingest.charge(1000), 2000);
        assert_eq!(Role::Archive.charge(1000), 1000);
    }
}
