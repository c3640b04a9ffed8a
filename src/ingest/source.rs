//! The ingest's Kafka port: what the worker and the sink ask of the broker
//! besides the records the poll thread hands over. The watermarks and the
//! committed offsets of assigned partitions (for [`super::start`]), and the
//! commit that mirrors the DWH's offsets in Kafka for lag tools. The broker
//! queries block: they run off the runtime's workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use super::start::Range;
use crate::catalogue::Table;
use crate::kafka::consumer::Context;
use crate::store::{OffsetAdvance, TopicIdentity};
use crate::telemetry::events::{Consumer, KafkaError, Shown};
use crate::telemetry::Event as _;

/// How long a watermark or committed-offset query may take on assignment.
const BROKER_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One table's consumer, as the ingest uses it outside the poll thread.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Source {
    pub table: Table,
    pub topic: String,
    consumer: Arc<BaseConsumer<Context>>,
}

/// What the broker says of assigned partitions.
#[derive(Debug, Default)]
pub struct Offsets {
    /// Each partition's watermarks (a partition whose query failed is missing).
    pub ranges: HashMap<i32, Range>,
    /// The group's Kafka committed offsets, when asked for (those that have one).
    pub committed: HashMap<i32, i64>,
    /// The topic's id and its cluster's: `None` when the broker gives no topic
    /// id (before Kafka 2.8) or the query failed (counted, kind `describe`).
    pub identity: Option<TopicIdentity>,
}

impl Source {
    pub fn new(table: Table, consumer: Arc<BaseConsumer<Context>>) -> Source {
        let topic = consumer.context().topic.clone();
        Source { table, topic, consumer }
    }

    /// The watermarks of `partitions`, and their committed offsets when
    /// `committed`: a failed query is counted and logged, and leaves the
    /// partition out (its stored offset is trusted).
    pub async fn offsets(&self, partitions: &[i32], committed: bool) -> Result<Offsets, String> {
        let source = self.clone();
        let partitions = partitions.to_vec();
        tokio::task::spawn_blocking(move || {
            let ranges = partitions
                .iter()
                .filter_map(|&p| {
                    match crate::kafka::topics::past_transients(|| {
                        source.consumer.fetch_watermarks(&source.topic, p, BROKER_QUERY_TIMEOUT)
                    }) {
                        Ok((low, high)) => Some((p, Range { low, high })),
                        Err(e) => {
                            let what =
                                format!("cannot read the watermarks of partition {p}; trusting the stored offset");
                            source.error("watermarks", &what, &e, true);
                            None
                        }
                    }
                })
                .collect();
            let committed = if committed {
                source.committed(&partitions)
            } else {
                HashMap::new()
            };
            let identity = source.identity();
            Offsets {
                ranges,
                committed,
                identity,
            }
        })
        .await
        .map_err(|e| format!("the broker query task failed: {e}"))
    }

    /// The topic's identity (its id and its cluster's), when the broker gives
    /// one. A failed query is counted and logged, and gives `None`. Blocking.
    fn identity(&self) -> Option<TopicIdentity> {
        let topics = std::slice::from_ref(&self.topic);
        match crate::kafka::identities(self.consumer.client(), topics, BROKER_QUERY_TIMEOUT) {
            Ok((mut ids, cluster_id)) => ids
                .remove(&self.topic)
                .map(|topic_id| TopicIdentity { topic_id, cluster_id }),
            Err(e) => {
                let what = "cannot read the topic's id; its offsets are checked against the watermarks alone";
                self.error("describe", what, &e, true);
                None
            }
        }
    }

    /// The Kafka committed offsets of `partitions` (those that have one). Blocking.
    fn committed(&self, partitions: &[i32]) -> HashMap<i32, i64> {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&self.topic, p);
        }
        match self.consumer.committed_offsets(list, BROKER_QUERY_TIMEOUT) {
            Ok(list) => list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                self.error(
                    "committed",
                    "cannot read the Kafka committed offsets to adopt",
                    &e,
                    true,
                );
                HashMap::new()
            }
        }
    }

    /// Tells Kafka how far the DWH got, for lag tools. A failure loses nothing
    /// (the DWH holds the offsets): it is counted and logged at debug (one fails
    /// whenever a rebalance is in progress).
    pub fn commit(&self, offsets: &[OffsetAdvance]) {
        let mut list = TopicPartitionList::new();
        for advance in offsets {
            if let Err(e) = list.add_partition_offset(&self.topic, advance.partition, Offset::Offset(advance.to)) {
                self.error("commit", "cannot list an offset commit", &e, false);
            }
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            self.error("commit", "offset commit failed", &e, false);
        }
    }

    fn error(&self, kind: &'static str, what: &str, error: &dyn Shown, warn: bool) {
        KafkaError {
            consumer: Consumer {
                table: self.table,
                topic: &self.topic,
                role: "ingest",
            },
            kind,
            what,
            error,
            warn,
        }
        .emit();
    }
}
