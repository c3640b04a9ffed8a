//! The archive role: every table topic copied to S3 as gzip JSON-lines objects,
//! by a consumer group of its own (`{KAFKA_GROUP_ID}-archive`).
//!
//! Guarantees: each object holds consecutive records of one partition and is
//! named by its first offset ([`format::object_key`]); the Kafka offset moves past
//! an object's records only after the object is stored (a synchronous commit, so
//! at most one stored object per partition is ever uncommitted), so after a crash the
//! same first offset is archived again under the same key, and nothing is
//! skipped. An object is written only where none is stored ([`place`]): the first
//! object under a key stays and a later writer (a restart, or a member evicted
//! while its upload failed) goes on after it, so objects never overlap and never
//! leave a gap. While S3 cannot be reached the same
//! object is retried with capped backoff and the group stops fetching (bounded
//! memory); the ingest role, a separate group, is not affected.

pub mod format;

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry::events::{
    ArchiveObjectKept, ArchiveStored, ArchiveUploadFailed, Consumer, KafkaError, KafkaFailing, KafkaRecovered,
    PollFailed, Shown,
};
use crate::telemetry::Event as _;

use bytes::Bytes;
use flate2::write::GzEncoder;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::catalogue::Table;
use crate::config::Config;
use crate::kafka::consumer::{self, ConsumerError, Event, Exit, Role, Subscription};
use crate::kafka::memory::{Held, MemoryShare, TableMemory};
use crate::s3::{Condition, Put, S3};

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The archive's consumer group.
pub fn group_id(config: &Config) -> String {
    format!("{}-archive", config.kafka.group_id)
}

/// Tells of an archive consumer's Kafka failures (logged and counted: the
/// archive has no readiness of its own).
fn on_kafka(config: &Config, table: Table) -> consumer::OnKafka {
    let topic = crate::kafka::topic_name(&config.kafka.topic_prefix, table);
    Arc::new(move |condition| match condition {
        consumer::KafkaCondition::Failing { kind, reason } => KafkaFailing {
            consumer: Consumer {
                table,
                topic: &topic,
                role: "archive",
            },
            kind,
            reason,
            first: true,
        }
        .emit(),
        consumer::KafkaCondition::Recovered => KafkaRecovered {
            consumer: Consumer {
                table,
                topic: &topic,
                role: "archive",
            },
            cleared: true,
            still_failing: false,
        }
        .emit(),
    })
}

/// Runs the archive until `shutdown`; open objects are stored before it returns
/// (within `KAFKA_SHUTDOWN_GRACE_SECONDS`).
pub async fn run(config: &Config, s3: S3, shutdown: CancellationToken) -> Result<(), ConsumerError> {
    let tables = Role::Archive.tables(&config.kafka);
    let share = MemoryShare::of(config.kafka.max_in_flight_bytes, tables.len());
    let pool = share.pool(tables.len());
    let abort = consumer::grace_deadline(&shutdown, config.kafka.shutdown_grace);
    let group = group_id(config);
    let mut tasks = JoinSet::new();
    for &table in tables {
        let first = consumer::subscribe(&config.kafka, &group, table, Role::Archive, on_kafka(config, table))?;
        let archiver = Archiver {
            config: config.clone(),
            group: group.clone(),
            table,
            s3: s3.clone(),
            memory: TableMemory::new(&share, pool.clone()),
            shutdown: shutdown.clone(),
            abort: abort.clone(),
        };
        tasks.spawn(archiver.supervise(first));
    }
    tracing::info!(group = %group, bucket = s3.bucket(), prefix = %config.s3.archive_prefix, "archive started");
    consumer::join_tables("archive", tasks).await;
    Ok(())
}

struct Archiver {
    config: Config,
    group: String,
    table: Table,
    s3: S3,
    memory: TableMemory,
    shutdown: CancellationToken,
    abort: CancellationToken,
}

/// An object being filled with one partition's records.
struct Open {
    first_offset: i64,
    last_offset: i64,
    first_timestamp: Option<i64>,
    records: u64,
    raw_bytes: usize,
    gzip: GzEncoder<Vec<u8>>,
    opened_at: Instant,
    _memory: Option<Held>,
}

/// How storing an object ended.
enum Stored {
    /// Stored, and the group's offset moved past it.
    Committed,
    /// The shutdown grace period ran out while S3 failed: not stored.
    Aborted,
    /// Stored, but the offset did not move: rebuild the consumer so that the next
    /// object starts at this one's first offset again (same key).
    CommitFailed,
    /// An object stored earlier under the key was kept and the offset moved
    /// to its end: rebuild the consumer so that it resumes there.
    Skipped,
}

impl Stored {
    fn into_stop(self) -> Option<Exit> {
        match self {
            Stored::Committed => None,
            Stored::Aborted => Some(Exit::Shutdown),
            Stored::CommitFailed => Some(Exit::Restart("an archive commit failed".into())),
            Stored::Skipped => Some(Exit::Restart("resuming after an archive object stored earlier".into())),
        }
    }
}

impl Archiver {
    async fn supervise(self, first: Subscription) {
        let build = || {
            consumer::subscribe(
                &self.config.kafka,
                &self.group,
                self.table,
                Role::Archive,
                on_kafka(&self.config, self.table),
            )
        };
        let run = |subscription: Subscription| async {
            let consumer = subscription.consumer.clone();
            let (poller, events) = subscription.poll(self.memory.clone(), Arc::new(|| ()))?;
            let exit = self.serve(&consumer, events).await;
            drop(consumer);
            poller.close().await;
            Ok(exit)
        };
        consumer::supervise(Role::Archive, self.table, first, &self.shutdown, build, run).await;
    }

    async fn serve(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<consumer::Context>,
        mut events: mpsc::Receiver<Event>,
    ) -> Exit {
        let mut open: HashMap<i32, Open> = HashMap::new();
        loop {
            let deadline = open
                .values()
                .map(|o| o.opened_at)
                .min()
                .map(|t| t + self.config.s3.archive_interval);
            let interval = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into());
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    let partitions: Vec<i32> = open.keys().copied().collect();
                    for partition in partitions {
                        if let Some(object) = open.remove(&partition) {
                            if self.store(consumer, partition, object).await.into_stop().is_some() {
                                break;
                            }
                        }
                    }
                    return Exit::Shutdown;
                }
                () = interval, if deadline.is_some() => {
                    let due: Vec<i32> = open
                        .iter()
                        .filter(|(_, o)| o.opened_at.elapsed() >= self.config.s3.archive_interval)
                        .map(|(p, _)| *p)
                        .collect();
                    for partition in due {
                        if let Some(object) = open.remove(&partition) {
                            if let Some(stop) = self.store(consumer, partition, object).await.into_stop() {
                                return stop;
                            }
                        }
                    }
                }
                event = events.recv() => match event {
                    None => return Exit::Restart("the poll thread stopped".into()),
                    Some(Event::Records(records)) => {
                        for (message, permit) in records {
                            let partition = message.partition();
                            if let Err(e) = append(&mut open, &message, permit) {
                                return Exit::Restart(format!("cannot compress a record: {e}"));
                            }
                            let full = open
                                .get(&partition)
                                .is_some_and(|o| o.raw_bytes >= self.config.s3.archive_max_bytes);
                            if full {
                                if let Some(object) = open.remove(&partition) {
                                    if let Some(stop) = self.store(consumer, partition, object).await.into_stop() {
                                        return stop;
                                    }
                                }
                            }
                        }
                    }
                    Some(Event::Assigned { partitions, reply }) => {
                        // Start where the archive's own group committed (its offsets
                        // move only after an object is stored).
                        let _ = reply.send(partitions.iter().map(|p| (*p, Offset::Stored)).collect());
                    }
                    // The archive's consumer resets to the earliest record by itself.
                    Some(Event::OutOfRange(_)) => {}
                    Some(Event::PollFailed(why)) => {
                        let topic = &consumer.context().topic;
                        let consumer = Consumer {
                            table: self.table,
                            topic,
                            role: "archive",
                        };
                        PollFailed { consumer, reason: &why }.emit();
                        return Exit::Restart(format!("the poll thread failed: {why}"));
                    }
                    Some(Event::Revoked { partitions, reply }) => {
                        // Not stored, not committed: the next owner archives these
                        // records again, under the same keys.
                        for partition in &partitions {
                            open.remove(partition);
                        }
                        let _ = reply.send(());
                    }
                },
            }
        }
    }

    /// Stores `object` and then commits past it; retries while S3 fails.
    async fn store(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<consumer::Context>,
        partition: i32,
        object: Open,
    ) -> Stored {
        let topic = consumer.context().topic.clone();
        let date = object
            .first_timestamp
            .and_then(chrono::DateTime::from_timestamp_millis)
            .unwrap_or_default()
            .date_naive();
        let key = format::object_key(
            &self.config.s3.archive_prefix,
            self.table.name(),
            date,
            &topic,
            partition,
            object.first_offset,
        );
        let body = match object.gzip.finish() {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(key, error = %e, "cannot finish the gzip stream");
                return Stored::CommitFailed;
            }
        };
        let metadata = [
            ("first-offset", object.first_offset.to_string()),
            ("last-offset", object.last_offset.to_string()),
            ("records", object.records.to_string()),
        ];
        let bytes = body.len() as u64;
        let started = std::time::Instant::now();
        let upload = crate::telemetry::traced(tracing::info_span!(
            target: "dwh_helper::archive",
            "archive_upload",
            table = %self.table,
            key = %key,
            bytes,
            records = object.records,
            trace_id = tracing::field::Empty,
        ));
        let placing = place(self.table, &self.s3, &key, body, &metadata, &self.abort);
        let placed = match tracing::Instrument::instrument(placing, upload).await {
            Some(placed) => placed,
            None => return Stored::Aborted,
        };
        let commit_to = match placed {
            Placed::Stored => {
                ArchiveStored {
                    table: self.table,
                    key: &key,
                    records: object.records,
                    bytes,
                    took: started.elapsed(),
                }
                .emit();
                object.last_offset + 1
            }
            Placed::Covered { last_offset } => {
                // Stored already under this first offset (by the partition's
                // other owner, or before a crash): keep it and go on after it.
                ArchiveObjectKept {
                    table: self.table,
                    key: &key,
                    ours: object.last_offset,
                    stored: last_offset,
                }
                .emit();
                last_offset + 1
            }
        };
        // A synchronous commit: at most one stored object per partition is ever
        // uncommitted, and it is the one a restart begins with (same key), so a
        // re-archive can only overwrite, never overlap.
        let mut list = TopicPartitionList::new();
        let failed = |what: &str, error: &dyn Shown| {
            KafkaError {
                consumer: Consumer {
                    table: self.table,
                    topic: &topic,
                    role: "archive",
                },
                kind: "commit",
                what,
                error,
                warn: true,
            }
            .emit()
        };
        if let Err(e) = list.add_partition_offset(&topic, partition, Offset::Offset(commit_to)) {
            failed(&format!("cannot list the commit of partition {partition}"), &e);
            return Stored::CommitFailed;
        }
        for attempt in 1..=3u32 {
            match tokio::task::block_in_place(|| consumer.commit(&list, CommitMode::Sync)) {
                // After a kept object of another length the consumer must resume
                // where it ends.
                Ok(()) if commit_to != object.last_offset + 1 => return Stored::Skipped,
                Ok(()) => return Stored::Committed,
                Err(e) => {
                    failed(
                        &format!("offset commit of partition {partition} failed (attempt {attempt})"),
                        &e,
                    );
                    tokio::time::sleep(FIRST_RETRY * attempt).await;
                }
            }
        }
        Stored::CommitFailed
    }
}

/// How storing an archive object ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The object is stored at its key.
    Stored,
    /// An object was stored at the key already (by this partition's earlier
    /// owner, or before a crash), reaching `last_offset`: it was kept, and the
    /// archive goes on after it.
    Covered { last_offset: i64 },
}

/// Stores an archive object at `key` only if nothing is stored there: the first
/// object written under a first offset stays, and whoever comes later moves on
/// after it. A member evicted while its upload failed can then never replace the
/// new owner's object (nor the other way round): no gap, no overlap. Retries with
/// backoff while S3 fails; `None` once `abort` fires.
pub async fn place(
    table: Table,
    s3: &S3,
    key: &str,
    body: Bytes,
    metadata: &[(&str, String)],
    abort: &CancellationToken,
) -> Option<Placed> {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    loop {
        let stored = match s3.object_info(key).await {
            Ok(info) => Ok(Some(info)),
            Err(crate::s3::S3Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        let result = match stored {
            Ok(Some(info)) => match info.metadata.get("last-offset").and_then(|v| v.parse::<i64>().ok()) {
                Some(last_offset) => return Some(Placed::Covered { last_offset }),
                // Not an archive object (no range): replace that very object.
                None => match info.etag.as_deref() {
                    Some(etag) => put(s3, key, &body, metadata, Condition::Matches(etag)).await,
                    None => put(s3, key, &body, metadata, Condition::Any).await,
                },
            },
            Ok(None) => put(s3, key, &body, metadata, Condition::Absent).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Some(Placed::Stored),
            // Somebody wrote the key between the read and the write: read again.
            Err(crate::s3::S3Error::PreconditionFailed { .. } | crate::s3::S3Error::Conflict { .. }) => continue,
            Err(e) => {
                ArchiveUploadFailed {
                    table,
                    key,
                    error: &e,
                    retry_in: backoff.peek(),
                }
                .emit();
                if !backoff.wait(abort).await {
                    return None;
                }
            }
        }
    }
}

async fn put(
    s3: &S3,
    key: &str,
    body: &Bytes,
    metadata: &[(&str, String)],
    condition: Condition<'_>,
) -> Result<(), crate::s3::S3Error> {
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(body.clone())]);
    let put = Put {
        content_type: Some("application/gzip"),
        metadata,
        size_hint: Some(body.len() as u64),
        condition,
    };
    s3.put_object(key, stream, put).await.map(|_| ())
}

/// Adds a record to its partition's open object.
fn append(open: &mut HashMap<i32, Open>, message: &OwnedMessage, permit: Held) -> std::io::Result<()> {
    let partition = message.partition();
    let timestamp = message.timestamp().to_millis();
    let object = open.entry(partition).or_insert_with(|| Open {
        first_offset: message.offset(),
        last_offset: message.offset(),
        first_timestamp: timestamp,
        records: 0,
        raw_bytes: 0,
        gzip: GzEncoder::new(Vec::new(), flate2::Compression::fast()),
        opened_at: Instant::now(),
        _memory: None,
    });
    let line = format::Line::new(partition, message.offset(), timestamp, message.key(), message.payload());
    let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
    text.push(b'\n');
    object.gzip.write_all(&text)?;
    object.raw_bytes += text.len();
    object.records += 1;
    object.last_offset = message.offset();
    match &mut object._memory {
        Some(held) => held.merge(permit),
        None => object._memory = Some(permit),
    }
    Ok(())
}
