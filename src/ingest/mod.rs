//! The ingest role: one consumer per table topic, all in `KAFKA_GROUP_ID`, each
//! writing its batches to the DWH exactly once.
//!
//! Guarantees: see [`worker`] (the select loop, rejects), [`sink`] (fenced
//! batches, retries), [`lanes`] (batches in order per partition), [`start`] (where
//! partitions start) and [`crate::kafka::consumer`] (rebalances pass through the
//! owning task; fetching pauses, never blocks). Each table holds its own share of
//! `KAFKA_MAX_IN_FLIGHT_BYTES`. On shutdown every worker writes what it buffered,
//! then the consumers leave the group; after `KAFKA_SHUTDOWN_GRACE_SECONDS` the
//! write in progress is cancelled and the rest is left for the next owner (nothing
//! is lost: its offsets were not advanced).

pub mod batcher;
pub mod lanes;
pub mod sink;
pub mod source;
pub mod start;
pub mod status;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::catalogue::Table;
use crate::config::Config;
use crate::kafka::consumer::{self, Exit, Subscription};
use crate::kafka::memory::{MemoryShare, TableMemory};
use crate::kafka::{self, topics, KafkaSetupError};
use crate::store::Dwh;
use crate::telemetry::events::{
    Consumer, FetchPaused, IngestStarted, KafkaFailing, KafkaRecovered, MemberUnrecorded, OtherGroupsIngest, Shown,
    TopicMissing, TopicsCreated, TopicsUnlisted,
};
use crate::telemetry::Event as _;
use batcher::BatchLimits;
use sink::Writer;
use source::Source;
pub use status::{Counters, IngestStatus, TableState};
use worker::Worker;

pub use crate::kafka::consumer::ConsumerError as IngestError;

/// Runs the ingest role until `shutdown` is cancelled and everything buffered is
/// written (or the grace period is over).
pub async fn run(
    config: &Config,
    dwh: Dwh,
    status: Arc<IngestStatus>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    prepare_topics(config).await?;
    let tables = consumer::Role::Ingest.tables(&config.kafka).len();
    let share = MemoryShare::of(config.kafka.max_in_flight_bytes, tables);
    let pool = share.pool(tables);
    let abort = consumer::grace_deadline(&shutdown, config.kafka.shutdown_grace);
    let mut tasks = JoinSet::new();
    for &table in &config.kafka.ingest_tables {
        let shared = Shared {
            config: config.clone(),
            dwh: dwh.clone(),
            status: status.clone(),
            memory: TableMemory::new(&share, pool.clone()),
            shutdown: shutdown.clone(),
            abort: abort.clone(),
        };
        // The first consumer of each table is built here so that a setting
        // librdkafka refuses stops the start with its message.
        let first = shared.build(table)?;
        tasks.spawn(shared.supervise(table, first));
    }
    IngestStarted {
        group: &config.kafka.group_id,
        prefix: &config.kafka.topic_prefix,
    }
    .emit();
    // Announced until every table's task is done: writes go on in the grace period.
    let member = member_name(config);
    let done = CancellationToken::new();
    let announcer = tokio::spawn(announce(
        dwh.clone(),
        config.kafka.group_id.clone(),
        config.kafka.ingest_tables.clone(),
        member.clone(),
        done.clone(),
    ));
    consumer::join_tables("ingest", tasks).await;
    done.cancel();
    let _ = announcer.await;
    if let Err(e) = dwh.leave_member(&config.kafka.group_id, &member).await {
        MemberUnrecorded {
            error: &e,
            leaving: true,
        }
        .emit();
    }
    Ok(())
}

/// How often an instance announces its tables in `dwh_ingest_members`.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);
/// How long an announcement counts: a crashed instance stops counting after it.
pub const ANNOUNCE_FRESH: Duration = Duration::from_secs(15);

/// This instance, as `replay` names it: host, process id and static member id.
fn member_name(config: &Config) -> String {
    let mut name = format!("{}:{}", crate::telemetry::host_name(), std::process::id());
    if let Some(id) = &config.kafka.group_instance_id {
        name.push_str(&format!(" ({id})"));
    }
    name
}

/// Announces `tables` every [`ANNOUNCE_INTERVAL`] until `done`, and warns
/// (at the start, and whenever it changes) when other groups ingest any of
/// them into the same DWH: another deployment, whose offsets and fence are its
/// own, writes the same tables.
async fn announce(dwh: Dwh, group: String, tables: Vec<Table>, member: String, done: CancellationToken) {
    let mut seen: Vec<crate::store::OtherGroup> = Vec::new();
    loop {
        if let Err(e) = dwh.announce_member(&group, &tables, &member).await {
            MemberUnrecorded {
                error: &e,
                leaving: false,
            }
            .emit();
        }
        if let Ok(mut others) = dwh.other_groups(&group, ANNOUNCE_FRESH).await {
            for other in &mut others {
                other.tables.retain(|t| tables.iter().any(|ours| ours.name() == t));
            }
            others.retain(|o| !o.tables.is_empty());
            if others != seen {
                let named: Vec<String> = others
                    .iter()
                    .map(|o| format!("{} ({})", o.group, o.tables.join(", ")))
                    .collect();
                OtherGroupsIngest {
                    group: &group,
                    others: &named,
                }
                .emit();
                seen = others;
            }
        }
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(ANNOUNCE_INTERVAL) => {}
        }
    }
}

/// Creates missing topics when asked to; otherwise warns once per missing topic.
async fn prepare_topics(config: &Config) -> Result<(), IngestError> {
    let kafka = config.kafka.clone();
    // Only the tables this instance ingests (KAFKA_INGEST_TABLES).
    let names: Vec<String> = kafka
        .ingest_tables
        .iter()
        .map(|t| kafka::topic_name(&kafka.topic_prefix, *t))
        .collect();
    let probe = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = topics::Metadata::connect(&kafka)?;
            Ok::<_, KafkaSetupError>(metadata.existing())
        })
    };
    let missing: Vec<String> = match probe.await {
        Ok(Ok(Ok(existing))) => names.into_iter().filter(|name| !existing.contains(name)).collect(),
        Ok(Err(setup)) => return Err(setup.into()),
        Ok(Ok(Err(e))) => {
            TopicsUnlisted { error: &e }.emit();
            Vec::new()
        }
        Err(e) => {
            TopicsUnlisted { error: &e }.emit();
            Vec::new()
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    if kafka.create_topics {
        let created = topics::create(&kafka, &missing, kafka.topic_partitions).await;
        TopicsCreated {
            topics: &missing,
            partitions: kafka.topic_partitions,
            error: created.as_ref().err().map(|e| e as &dyn Shown),
        }
        .emit();
    } else {
        for topic in &missing {
            TopicMissing { topic }.emit();
        }
    }
    Ok(())
}

/// What every table's supervisor shares.
struct Shared {
    config: Config,
    dwh: Dwh,
    status: Arc<IngestStatus>,
    memory: TableMemory,
    shutdown: CancellationToken,
    abort: CancellationToken,
}

impl Shared {
    fn build(&self, table: Table) -> Result<Subscription, IngestError> {
        let kafka = &self.config.kafka;
        let status = self.status.clone();
        let topic = crate::kafka::topic_name(&kafka.topic_prefix, table);
        let on_kafka: consumer::OnKafka = Arc::new(move |condition| match condition {
            consumer::KafkaCondition::Failing { kind, reason } => {
                let first = status.set_kafka_failing(&topic, Some(format!("kafka {kind}: {reason}")));
                KafkaFailing {
                    consumer: Consumer {
                        table,
                        topic: &topic,
                        role: "ingest",
                    },
                    kind,
                    reason,
                    first,
                }
                .emit()
            }
            consumer::KafkaCondition::Recovered => {
                let cleared = status.set_kafka_failing(&topic, None);
                status.publish_failing(&topic, |still_failing| {
                    KafkaRecovered {
                        consumer: Consumer {
                            table,
                            topic: &topic,
                            role: "ingest",
                        },
                        cleared,
                        still_failing,
                    }
                    .emit()
                });
            }
        });
        consumer::subscribe(kafka, &kafka.group_id, table, consumer::Role::Ingest, on_kafka)
    }

    /// Runs `table`'s consumer, rebuilding it after a fence or a failure, until shutdown.
    async fn supervise(self, table: Table, first: Subscription) {
        consumer::supervise(
            consumer::Role::Ingest,
            table,
            first,
            &self.shutdown,
            || self.build(table),
            |s| self.consume(table, s),
        )
        .await;
    }

    async fn consume(&self, table: Table, subscription: Subscription) -> Result<Exit, IngestError> {
        let consumer = subscription.consumer.clone();
        let on_pause = {
            let status = self.status.clone();
            Arc::new(move || {
                status.paused();
                FetchPaused { table }.emit()
            })
        };
        let (poller, receiver) = subscription.poll(self.memory.clone(), on_pause)?;
        let source = Source::new(table, consumer.clone());
        let writer = Arc::new(Writer {
            table,
            topic: source.topic.clone(),
            group_id: self.config.kafka.group_id.clone(),
            dwh: self.dwh.clone(),
            source: source.clone(),
            status: self.status.clone(),
            abort: self.abort.clone(),
            log: std::sync::Mutex::new(None),
        });
        let worker = Worker {
            writer,
            source,
            limits: BatchLimits {
                max_rows: self.config.kafka.batch_max_rows,
                max_bytes: self.config.kafka.batch_max_bytes,
                linger: self.config.kafka.batch_linger,
            },
            max_record_bytes: self.config.dwh.max_write_batch_bytes,
            events_window: self.config.dwh.events_window,
            policy: start::Policy {
                reset: self.config.kafka.auto_offset_reset,
                adopt_committed: self.config.kafka.adopt_committed_offsets,
                on_out_of_range: self.config.kafka.on_offset_out_of_range,
            },
            shutdown: self.shutdown.clone(),
            memory: self.memory.clone(),
            lanes: self.config.kafka.write_lanes,
        };
        // The receiver goes with the worker, so callbacks during the close below
        // find nobody to wait for and simply unassign.
        let exit = worker.run(receiver).await;
        drop(consumer);
        poller.close().await;
        Ok(exit)
    }
}
