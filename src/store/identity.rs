//! What a topic's stored offsets count: the topic's id (KIP-516) and the id of
//! the cluster it lives on. Offsets are positions in one log; a topic deleted
//! and created again, or a cluster replaced, under the same name is another
//! log, and its offsets say nothing of the old one's. Each offset row keeps the
//! identity it was written for, so that ingest can tell.

use std::fmt;

use serde::Serialize;

/// The identity of the log a topic's offsets count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TopicIdentity {
    /// The topic's id, base64 as Kafka's tools print it.
    pub topic_id: String,
    /// The cluster's id, when the broker gave one.
    pub cluster_id: Option<String>,
}

impl fmt::Display for TopicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "topic id {}", self.topic_id)?;
        if let Some(cluster) = &self.cluster_id {
            write!(f, " (cluster {cluster})")?;
        }
        Ok(())
    }
}
