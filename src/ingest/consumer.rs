//! The Kafka side of one table's ingest: a consumer polled on its own thread.
//!
//! Guarantees: the poll thread only passes things on. Records go to the owning
//! task over a bounded channel, each holding its share of the global in-flight
//! memory budget; rebalance callbacks send "assigned"/"revoked" to the same task
//! (after the records polled before them) and wait for its answer, so partitions
//! are assigned at the offsets the DWH stores and revoked only after the task has
//! written or dropped what it buffered for them.

use std::sync::Arc;
use std::time::Duration;

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

/// Batches of records buffered between a poll thread and its task (memory is
/// bounded by the in-flight byte budget; this only bounds the count).
const CHANNEL_BATCHES: usize = 64;
/// Records handed over at once: one wake-up of the task per batch, not per record.
const HANDOVER_RECORDS: usize = 256;

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
        ],
    )?;
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
    pub fn poll(self, memory: Arc<Semaphore>, budget: u32) -> Result<(Poller, mpsc::Receiver<Event>), ConsumerError> {
        let stop = CancellationToken::new();
        let thread = {
            // The context holds the sender the poll loop hands records over on.
            let (consumer, stop) = (self.consumer.clone(), stop.clone());
            let runtime = tokio::runtime::Handle::current();
            let name = format!("poll-{}", consumer.context().topic);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || poll_loop(consumer, memory, budget, stop, runtime))
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
}

impl Context {
    /// Hands the polled records over; false when the task is gone.
    fn hand_over(&self) -> bool {
        let records = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        records.is_empty() || self.events.blocking_send(Event::Records(records)).is_ok()
    }

    fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
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
        self.hand_over();
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
                let offsets = self
                    .events
                    .blocking_send(Event::Assigned {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .ok()
                    .and_then(|()| answer.blocking_recv().ok());
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
                if self
                    .events
                    .blocking_send(Event::Revoked {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .is_ok()
                {
                    let _ = answer.blocking_recv();
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
/// more is ready, and before a rebalance or a wait for memory.
fn poll_loop(
    consumer: Arc<BaseConsumer<Context>>,
    memory: Arc<Semaphore>,
    memory_budget: u32,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
) {
    let context = consumer.context();
    let topic = context.topic.clone();
    while !stop.is_cancelled() {
        let gathering = context.pending() > 0;
        let timeout = if gathering {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let message = match consumer.poll(timeout) {
            None => {
                if !context.hand_over() {
                    break;
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
                if !context.hand_over()
                    || context
                        .events
                        .blocking_send(Event::OutOfRange(code.to_string()))
                        .is_err()
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
        let permit = match memory.clone().try_acquire_many_owned(permits) {
            Ok(permit) => permit,
            Err(_) => {
                // Hand over what is gathered first: its permits must be able to
                // come back. Then waiting is the backpressure: nothing more is
                // fetched into our memory until batches are written.
                if !context.hand_over() {
                    break;
                }
                let permit = runtime.block_on(async {
                    tokio::select! {
                        permit = memory.clone().acquire_many_owned(permits) => permit.ok(),
                        () = stop.cancelled() => None,
                    }
                });
                let Some(permit) = permit else { break };
                permit
            }
        };
        let full = {
            let mut pending = context.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.push((message, permit));
            pending.len() >= HANDOVER_RECORDS
        };
        if full && !context.hand_over() {
            break;
        }
    }
}
