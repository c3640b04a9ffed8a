//! Who is in a consumer group, and which topics each member reads: what a
//! command that moves a group's offsets must know before it does.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::client_config;
use crate::config::KafkaConfig;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer group as the coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub group: String,
    /// `Empty`, `Stable`, `PreparingRebalance`, `CompletingRebalance`, `Dead`.
    pub state: String,
    pub members: Vec<Member>,
}

impl GroupState {
    /// Members are joining or leaving: who reads what is not settled yet.
    pub fn rebalancing(&self) -> bool {
        matches!(self.state.as_str(), "PreparingRebalance" | "CompletingRebalance")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub client_id: String,
    pub host: String,
    /// The topics it subscribed to; `None` when its metadata is not the consumer
    /// protocol's (it may read anything).
    pub topics: Option<Vec<String>>,
}

impl Member {
    pub fn reads(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|topics| topics.iter().any(|t| t == topic))
    }
}

/// Describes `group` (one ListGroups/DescribeGroups exchange; the client does
/// not join). A group nobody ever joined is `Dead` with no members. `Ok(None)`
/// when the broker does not describe groups (librdkafka's mock cluster).
pub fn describe(kafka: &KafkaConfig, group: &str) -> Result<Option<GroupState>, KafkaError> {
    let client: BaseConsumer = client_config(kafka, &[("enable.auto.commit", "false"), ("group.id", group)])
        .map_err(|_| KafkaError::ClientCreation("KAFKA_BOOTSTRAP_SERVERS is not set".into()))?
        .create()?;
    let list = match client.fetch_group_list(Some(group), TIMEOUT) {
        Ok(list) => list,
        Err(KafkaError::GroupListFetch(RDKafkaErrorCode::UnsupportedFeature)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(Some(GroupState {
            group: group.to_owned(),
            state: "Dead".into(),
            members: Vec::new(),
        }));
    };
    let members = info
        .members()
        .iter()
        .map(|m| Member {
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
            topics: m.metadata().and_then(subscribed_topics),
        })
        .collect();
    Ok(Some(GroupState {
        group: group.to_owned(),
        state: info.state().to_owned(),
        members,
    }))
}

/// Sets `group`'s committed offsets in Kafka to `offsets` (topic, partition,
/// next offset) without joining the group, so that Kafka's own tools agree with
/// the DWH. The coordinator accepts it only while the group has no members.
pub fn commit(kafka: &KafkaConfig, group: &str, offsets: &[(String, i32, i64)]) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let client: BaseConsumer = client_config(kafka, &[("enable.auto.commit", "false"), ("group.id", group)])
        .map_err(|_| KafkaError::ClientCreation("KAFKA_BOOTSTRAP_SERVERS is not set".into()))?
        .create()?;
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    client.commit(&list, CommitMode::Sync)
}

/// The topics of a consumer-protocol subscription (version, then an array of
/// strings; what follows them does not matter here).
fn subscribed_topics(metadata: &[u8]) -> Option<Vec<String>> {
    let mut rest = metadata.get(2..)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let count = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut topics = Vec::with_capacity(count.clamp(0, 1024) as usize);
    for _ in 0..count {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        topics.push(String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?);
    }
    Some(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(topics: &[&str]) -> Vec<u8> {
        let mut out = vec![0, 1];
        out.extend((topics.len() as i32).to_be_bytes());
        for t in topics {
            out.extend((t.len() as i16).to_be_bytes());
            out.extend(t.as_bytes());
        }
        out.extend((-1i32).to_be_bytes()); // no user data
        out
    }

    #[test]
    fn a_subscription_names_its_topics() {
        assert_eq!(
            subscribed_topics(&subscription(&["dwh.events_part", "dwh.mobile_devices"])),
            Some(vec!["dwh.events_part".to_owned(), "dwh.mobile_devices".to_owned()])
        );
        let member = Member {
            client_id: "c".into(),
            host: "h".into(),
            topics: subscribed_topics(&subscription(&["dwh.events_part"])),
        };
        assert!(member.reads("dwh.events_part"));
        assert!(!member.reads("dwh.mobile_devices"));
    }

    #[test]
    fn metadata_that_is_not_a_subscription_reads_everything() {
        assert_eq!(subscribed_topics(&[0, 1, 0, 0, 0, 2, 0, 9, b'x']), None);
        let member = Member {
            client_id: "c".into(),
            host: "h".into(),
            topics: None,
        };
        assert!(member.reads("anything"));
    }
}
