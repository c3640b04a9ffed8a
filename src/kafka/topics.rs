//! Topic metadata: which of our topics exist, creating missing ones, and the
//! watermarks that say how far a partition goes.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use std::collections::HashMap;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, KafkaSetupError};
use crate::config::KafkaConfig;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a watermark or offset query that a broker answers with a
/// passing state (a partition's leadership moving, as after a topic's creation
/// or a broker's restart), and the pause between them.
const TRANSIENT_ATTEMPTS: u32 = 8;
const TRANSIENT_PAUSE: Duration = Duration::from_millis(250);

/// Whether `error` is a state a broker passes through (a leader being elected
/// or moved, an offset not resolved yet), which a query asked again soon gets
/// past.
pub fn transient(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::OffsetNotAvailable
                | RDKafkaErrorCode::NotCoordinator
        )
    )
}

/// Runs `query`, again after a pause while it fails with a [`transient`] error
/// (at most [`TRANSIENT_ATTEMPTS`] times). Blocking.
pub fn past_transients<T>(mut query: impl FnMut() -> Result<T, KafkaError>) -> Result<T, KafkaError> {
    let mut attempt = 1;
    loop {
        match query() {
            Err(e) if transient(&e) && attempt < TRANSIENT_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "kafka query in a passing state; asking again");
                attempt += 1;
                std::thread::sleep(TRANSIENT_PAUSE);
            }
            result => return result,
        }
    }
}

/// One partition's range of offsets on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub partition: i32,
    /// The first offset still held (above 0 once the broker dropped data).
    pub low: i64,
    /// One past the last offset written: where a caught-up consumer stands.
    pub high: i64,
}

/// A short-lived client for metadata queries.
#[allow(missing_debug_implementations)]
pub struct Metadata {
    client: BaseConsumer,
}

impl Metadata {
    pub fn connect(kafka: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        let client = client_config(
            kafka,
            &[("enable.auto.commit", "false"), ("group.id", "dwh-helper-metadata")],
        )?
        .create()
        .map_err(|source| KafkaSetupError::Client {
            role: "metadata client",
            cause: source,
        })?;
        Ok(Metadata { client })
    }

    /// The names of the topics that exist (with at least one partition). Blocking;
    /// one metadata request.
    pub fn existing(&self) -> Result<std::collections::HashSet<String>, KafkaError> {
        let metadata = self.client.fetch_metadata(None, METADATA_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.name().to_owned())
            .collect())
    }

    /// Partition count of `topic`, or `None` when it does not exist. Blocking.
    pub fn partitions(&self, topic: &str) -> Result<Option<usize>, KafkaError> {
        let metadata = self.client.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    }

    /// Watermarks of every partition of `topic`, by partition. Blocking.
    pub fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, KafkaError> {
        let count = self.partitions(topic)?.unwrap_or(0);
        (0..count as i32)
            .map(|partition| {
                let (low, high) = past_transients(|| self.client.fetch_watermarks(topic, partition, METADATA_TIMEOUT))?;
                Ok(Watermarks { partition, low, high })
            })
            .collect()
    }
    /// Watermarks of every partition of those of `topics` that exist, by topic.
    /// Blocking; three requests however many partitions there are (metadata, then
    /// the earliest and the latest offsets of all partitions at once).
    pub fn watermarks_of(&self, topics: &[String]) -> Result<HashMap<String, Vec<Watermarks>>, KafkaError> {
        let metadata = self.client.fetch_metadata(None, METADATA_TIMEOUT)?;
        let mut list = TopicPartitionList::new();
        for topic in metadata.topics() {
            if topic.error().is_some() || !topics.iter().any(|t| t == topic.name()) {
                continue;
            }
            for partition in topic.partitions() {
                list.add_partition(topic.name(), partition.id());
            }
        }
        let mut marks: HashMap<String, Vec<Watermarks>> = HashMap::new();
        if list.count() == 0 {
            return Ok(marks);
        }
        let ends = |at: Offset| -> Result<HashMap<(String, i32), i64>, KafkaError> {
            let mut query = list.clone();
            query.set_all_offsets(at)?;
            let answer = self.client.offsets_for_times(query, METADATA_TIMEOUT)?;
            answer
                .elements()
                .iter()
                .map(|e| {
                    e.error()?;
                    match e.offset() {
                        Offset::Offset(o) => Ok(((e.topic().to_owned(), e.partition()), o)),
                        // The broker did not resolve the offset.
                        _ => Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OffsetNotAvailable)),
                    }
                })
                .collect()
        };
        let low = past_transients(|| ends(Offset::Beginning))?;
        let high = past_transients(|| ends(Offset::End))?;
        for ((topic, partition), high) in high {
            let low = low.get(&(topic.clone(), partition)).copied().unwrap_or(0);
            marks
                .entry(topic)
                .or_default()
                .push(Watermarks { partition, low, high });
        }
        for list in marks.values_mut() {
            list.sort_by_key(|w| w.partition);
        }
        Ok(marks)
    }
}

impl Metadata {
    /// The topic id (KIP-516) of each of `topics` that exists and has one, and
    /// the cluster's id (when the broker gives one). Blocking; two requests.
    pub fn identities(&self, topics: &[String]) -> Result<(HashMap<String, String>, Option<String>), String> {
        super::ffi::identities(self.client.client(), topics, METADATA_TIMEOUT)
    }

    /// For each of `partitions` of `topic`, the broker's answer to "the first
    /// offset whose timestamp is at or after `millis`" (ListOffsets by time):
    /// `Offset::Offset(o)`, or `Offset::End` when no record is that recent.
    /// Blocking; one request.
    pub fn offsets_at(&self, topic: &str, partitions: &[i32], millis: i64) -> Result<HashMap<i32, Offset>, KafkaError> {
        let mut query = TopicPartitionList::new();
        for &p in partitions {
            query.add_partition_offset(topic, p, Offset::Offset(millis))?;
        }
        past_transients(|| {
            let answer = self.client.offsets_for_times(query.clone(), METADATA_TIMEOUT)?;
            answer
                .elements()
                .iter()
                .map(|e| {
                    e.error()?;
                    Ok((e.partition(), e.offset()))
                })
                .collect()
        })
    }
}

/// The offsets `group_id` committed in Kafka for the given partitions of each
/// topic (those that have one), by topic and partition. Blocking; one request.
/// The client does not join the group.
pub fn committed(
    kafka: &KafkaConfig,
    group_id: &str,
    partitions: &[(String, Vec<i32>)],
) -> Result<std::collections::HashMap<(String, i32), i64>, KafkaError> {
    let client: BaseConsumer = client_config(kafka, &[("enable.auto.commit", "false"), ("group.id", group_id)])
        .map_err(|_| KafkaError::ClientCreation("KAFKA_BOOTSTRAP_SERVERS is not set".into()))?
        .create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, ps) in partitions {
        for &p in ps {
            list.add_partition(topic, p);
        }
    }
    if list.count() == 0 {
        return Ok(Default::default());
    }
    // A group's coordinator may be moving or loading (NotCoordinator): ask again.
    Ok(
        past_transients(|| client.committed_offsets(list.clone(), METADATA_TIMEOUT))?
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect(),
    )
}

/// Creates `topics` with `partitions` partitions each (replication 1 on a single
/// broker, else the cluster default); a topic that already exists is fine.
pub async fn create(kafka: &KafkaConfig, topics: &[String], partitions: i32) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[])
        .map_err(|_| KafkaError::ClientCreation("KAFKA_BOOTSTRAP_SERVERS is not set".into()))?
        .create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let results = admin
        .create_topics(
            &new_topics,
            &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, error = %code, "cannot create topic");
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn a_passing_broker_state_is_asked_again_and_anything_else_is_not() {
        let mut answers = vec![
            Ok(7),
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition)),
            Err(KafkaError::OffsetFetch(RDKafkaErrorCode::LeaderNotAvailable)),
        ];
        assert_eq!(
            super::past_transients(|| answers.pop().expect("an answer")).ok(),
            Some(7)
        );
        let mut asked = 0;
        let refused = super::past_transients(|| -> Result<(), KafkaError> {
            asked += 1;
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::TopicAuthorizationFailed))
        });
        assert!(refused.is_err());
        assert_eq!(asked, 1, "a refusal is not a passing state");
        let mut asked = 0;
        let never = super::past_transients(|| -> Result<(), KafkaError> {
            asked += 1;
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition))
        });
        assert!(never.is_err());
        assert_eq!(asked, super::TRANSIENT_ATTEMPTS, "bounded");
    }
}
