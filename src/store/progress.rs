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
