//! What ops ask of the DWH's bookkeeping: every stored offset of a group, and
//! rows and rejects per table (for `status` and the lag loop).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{Dwh, StoreError};
use crate::catalogue::Table;

/// One partition's stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    /// When the last batch moved it.
    pub updated_at: DateTime<Utc>,
    /// The topic id of the log it counts in, when known.
    pub topic_id: Option<String>,
}

/// Rejected records of a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RejectCounts {
    pub total: i64,
    pub last_24h: i64,
}

impl Dwh {
    /// Every stored offset of `group_id`, by topic and partition.
    pub async fn stored_offsets(&self, group_id: &str) -> Result<Vec<StoredOffset>, StoreError> {
        self.bookkeeping().stored_offsets(group_id).await
    }

    /// The last `limit` gaps in `group_id`'s offsets (records moved past
    /// without being written, or offsets moved back), newest first.
    pub async fn offset_gaps(&self, group_id: &str, limit: i64) -> Result<Vec<super::StoredGap>, StoreError> {
        self.bookkeeping().offset_gaps(group_id, limit).await
    }

    /// The identities of the logs `topic`'s stored offsets were written for
    /// (one, unless an operator mixed them; none where unknown).
    pub async fn topic_identities(&self, group_id: &str, topic: &str) -> Result<Vec<super::TopicIdentity>, StoreError> {
        self.bookkeeping().topic_identities(group_id, topic).await
    }

    /// The stored next offset of every partition of `topic` that has one, in one query.
    pub async fn topic_offsets(&self, group_id: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        self.bookkeeping().topic_offsets(group_id, topic).await
    }

    /// Rejects per table: all of them, and those of the last 24 hours.
    pub async fn reject_counts(&self) -> Result<HashMap<Table, RejectCounts>, StoreError> {
        let since = Utc::now() - chrono::Duration::hours(24);
        let rows = self.bookkeeping().reject_counts(since).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(table, total, last_24h)| Some((table.parse().ok()?, RejectCounts { total, last_24h })))
            .collect())
    }
}
