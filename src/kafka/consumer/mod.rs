//! The Kafka side of one table's ingest: a consumer polled on its own thread.
//!
//! Guarantees: the poll thread only passes things on. Records go to the owning
//! task over a bounded channel, each holding its share of the in-flight memory
//! budget; rebalance callbacks send "assigned"/"revoked" to the same task (after
//! the records polled before them) and wait for its answer, so partitions are
//! assigned at the offsets the task chose and revoked after it has written what it
//! buffered for them (or after half of `max.poll.interval.ms`: the fence keeps a
//! late write from landing twice). An assignment the task does not answer within
//! a few seconds (it awaits a stalled write or the DWH) is assigned paused, and
//! its partitions are sought to their start once the answer comes; a close that
//! takes over 30 s is left to finish on its own thread. The poll thread never blocks on the task or on
//! memory: when the budget is spent or the task is behind, it pauses its
//! partitions and keeps polling, so the member stays in its group however long the
//! database stalls. Partitions are assigned `cooperative-sticky` by default: a
//! rebalance moves only the partitions that change hands.

mod backpressure;
mod context;
mod poll;
mod profile;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::OwnedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Offset;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use context::Context;
pub use profile::Role;

use crate::backoff::Backoff;
use crate::catalogue::Table;
use crate::config::KafkaConfig;
use crate::kafka::memory::{Held, MemoryShare, TableMemory};
use crate::kafka::{self, KafkaSetupError};
use crate::telemetry::events::{
    Consumer, ConsumerRestart, KafkaError as KafkaErrorEvent, Restart, RoleStopped, Shown, TableTaskFailed,
};
use crate::telemetry::Event as _;

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
pub async fn join_tables(role: &'static str, mut tasks: tokio::task::JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            TableTaskFailed { role, error: &e }.emit();
        }
    }
    RoleStopped { role }.emit();
}

/// Batches of records buffered between a poll thread and its task (memory is
/// bounded by the in-flight byte budget; this only bounds the count).
const CHANNEL_BATCHES: usize = 64;
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

/// The first wait before a consumer is rebuilt; it doubles, up to
/// [`MAX_RESTART_DELAY`], while the consumer keeps ending within [`STEADY_RUN`].
const RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A consumer that ran this long before it ended starts the backoff over.
const STEADY_RUN: Duration = Duration::from_secs(60);

/// Keeps `role`'s consumer of `table` running until shutdown: runs it with
/// `run`, and after a failure or a restart request waits (1 s, doubling to
/// 30 s while it keeps ending within a minute) and rebuilds it with `build`.
/// Each restart is an event, counted. Ingest and archive share it.
pub async fn supervise<B, R, F>(
    role: Role,
    table: Table,
    first: Subscription,
    shutdown: &CancellationToken,
    build: B,
    mut run: R,
) where
    B: Fn() -> Result<Subscription, ConsumerError>,
    R: FnMut(Subscription) -> F,
    F: std::future::Future<Output = Result<Exit, ConsumerError>>,
{
    let mut backoff = Backoff::new(RESTART_DELAY, MAX_RESTART_DELAY);
    let restart = |reason: &dyn Shown, after: Restart, retry_in: Duration| {
        ConsumerRestart {
            table,
            role: role.name(),
            reason,
            after,
            retry_in,
        }
        .emit()
    };
    let mut next = Some(first);
    loop {
        let subscription = match next.take().map_or_else(&build, Ok) {
            Ok(subscription) => subscription,
            Err(e) => {
                restart(&e, Restart::Unbuildable, backoff.peek());
                if !backoff.wait(shutdown).await {
                    return;
                }
                continue;
            }
        };
        let started = std::time::Instant::now();
        let ended = run(subscription).await;
        if started.elapsed() >= STEADY_RUN {
            backoff.reset();
        }
        match ended {
            Ok(Exit::Shutdown) => return,
            Ok(Exit::Stopped(why)) => {
                restart(&why, Restart::Stopped, Duration::ZERO);
                return;
            }
            Ok(Exit::Restart(why)) => restart(&why, Restart::Asked, backoff.peek()),
            Err(e) => restart(&e, Restart::Failed, backoff.peek()),
        }
        if !backoff.wait(shutdown).await || shutdown.is_cancelled() {
            return;
        }
    }
}

/// A consumer subscribed to one table's topic, not yet polled.
#[allow(missing_debug_implementations)]
pub struct Subscription {
    pub consumer: Arc<BaseConsumer<Context>>,
    receiver: mpsc::Receiver<Event>,
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
    let context = Context::new(
        table,
        topic.clone(),
        events,
        Duration::from_millis(max_poll_interval / 2),
        role,
        on_kafka,
    );
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
                    let stopped = stop.clone();
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        poll::poll_loop(consumer, memory, on_pause, stop)
                    }));
                    // Never leave the task waiting for records that cannot come:
                    // the context keeps a sender, so the channel never closes.
                    // The task takes it once its current work ends (it never
                    // waits for a write to take events, only to hand over).
                    if let Some(why) = poll_ended(polled, stopped.is_cancelled() || events.is_closed()) {
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

/// What the task must be told when its poll loop ended (`polled`): why, or
/// nothing when nobody waits for it (`unwaited`: stopped, or the task gone).
fn poll_ended(polled: std::thread::Result<()>, unwaited: bool) -> Option<String> {
    match polled {
        Err(panic) => Some(
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        ),
        Ok(()) if unwaited => None,
        Ok(()) => Some("the poll loop ended: the task did not take an event within its wait".to_owned()),
    }
}

/// A running poll thread and its consumer.
#[allow(missing_debug_implementations)]
pub struct Poller {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
    consumer: Arc<BaseConsumer<Context>>,
}

/// How long closing a consumer (leaving its group) may take before it is left
/// to finish on its own thread.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

impl Poller {
    /// Stops polling and closes the consumer (leaving the group), within
    /// [`CLOSE_WAIT`]: a close that takes longer (a coordinator that does not
    /// answer) is counted, logged and left to finish on its own thread, so that
    /// the table's next consumer is not held up. Call after the task dropped its
    /// receiver, so rebalance callbacks during the close find nobody to wait for.
    pub async fn close(self) {
        self.stop.cancel();
        let Poller { thread, consumer, .. } = self;
        let (table, topic, role) = {
            let context = consumer.context();
            (context.table, context.topic.clone(), context.role())
        };
        let (closed, done) = oneshot::channel();
        // A thread of its own, not the runtime's blocking pool: a shutdown does
        // not wait for a close that hangs.
        let closing = std::thread::Builder::new()
            .name(format!("close-{topic}"))
            .spawn(move || {
                let joined = thread.join();
                drop(consumer);
                let _ = closed.send(joined.is_ok());
            });
        let failure: Option<(&str, String)> = match closing {
            Err(e) => Some(("cannot start the thread that closes a consumer", e.to_string())),
            Ok(_) => match tokio::time::timeout(CLOSE_WAIT, done).await {
                Ok(Ok(true)) => None,
                Ok(Ok(false)) => Some(("closing a consumer failed", "its poll thread panicked".into())),
                Ok(Err(_)) => Some((
                    "closing a consumer failed",
                    "the thread that closes it ended before the close did (a panic in librdkafka's close)".into(),
                )),
                Err(_) => Some((
                    "a consumer did not close in time; it is left to finish on its own",
                    format!("no close within {} s", CLOSE_WAIT.as_secs()),
                )),
            },
        };
        if let Some((what, error)) = failure {
            KafkaErrorEvent {
                consumer: Consumer {
                    table,
                    topic: &topic,
                    role: role.name(),
                },
                kind: "close",
                what,
                error: &error,
                warn: true,
            }
            .emit();
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

#[cfg(test)]
mod tests {
    use super::poll_ended;

    #[test]
    fn a_poll_loop_that_ends_unstopped_or_panics_is_told_to_the_task_and_a_stopped_one_is_not() {
        let ended = poll_ended(Ok(()), false).expect("an unstopped end is told");
        assert!(ended.contains("did not take an event"), "{ended}");
        assert_eq!(poll_ended(Ok(()), true), None, "stopped, or nobody waits");
        let panicked: std::thread::Result<()> = std::panic::catch_unwind(|| panic!("fetch went wrong"));
        assert_eq!(poll_ended(panicked, false).as_deref(), Some("fetch went wrong"));
        let panicked: std::thread::Result<()> = std::panic::catch_unwind(|| panic!("{}", String::from("owned")));
        assert_eq!(
            poll_ended(panicked, true).as_deref(),
            Some("owned"),
            "a panic is told even when stopped"
        );
    }
}
