//! What ops ask of the DWH's bookkeeping: every stored offset of a group, and
//! rows and rejects per table (for `status` and the lag loop).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{Dwh, Pool, StoreError};
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

const SELECT_GROUP: &str =
    "SELECT topic, partition, next_offset, updated_at FROM dwh_consumer_offsets WHERE group_id = $1 ORDER BY topic, partition";

const SELECT_TOPIC: &str = "SELECT partition, next_offset FROM dwh_consumer_offsets WHERE group_id = $1 AND topic = $2";

/// Binds: the cut-off of "recent".
const COUNT_REJECTS: &str = "SELECT table_name, count(*), \
     COALESCE(SUM(CASE WHEN rejected_at >= $1 THEN 1 ELSE 0 END), 0) FROM dwh_rejected_records GROUP BY table_name";

impl Dwh {
    /// Every stored offset of `group_id`, by topic and partition.
    pub async fn stored_offsets(&self, group_id: &str) -> Result<Vec<StoredOffset>, StoreError> {
        type Row = (String, i32, i64, DateTime<Utc>);
        let rows: Vec<Row> = match &self.pool {
            Pool::Postgres(pool) => sqlx::query_as(SELECT_GROUP).bind(group_id).fetch_all(pool).await?,
            Pool::Sqlite(pools) => {
                sqlx::query_as(SELECT_GROUP)
                    .bind(group_id)
                    .fetch_all(&pools.read)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next_offset, updated_at)| StoredOffset {
                topic,
                partition,
                next_offset,
                updated_at,
            })
            .collect())
    }

    /// The stored next offset of every partition of `topic` that has one, in one query.
    pub async fn topic_offsets(&self, group_id: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let rows: Vec<(i32, i64)> = match &self.pool {
            Pool::Postgres(pool) => {
                sqlx::query_as(SELECT_TOPIC)
                    .bind(group_id)
                    .bind(topic)
                    .fetch_all(pool)
                    .await?
            }
            Pool::Sqlite(pools) => {
                sqlx::query_as(SELECT_TOPIC)
                    .bind(group_id)
                    .bind(topic)
                    .fetch_all(&pools.read)
                    .await?
            }
        };
        Ok(rows.into_iter().collect())
    }

    /// Rejects per table: all of them, and those of the last 24 hours.
    pub async fn reject_counts(&self) -> Result<HashMap<Table, RejectCounts>, StoreError> {
        let since = Utc::now() - chrono::Duration::hours(24);
        let rows: Vec<(String, i64, i64)> = match &self.pool {
            Pool::Postgres(pool) => sqlx::query_as(COUNT_REJECTS).bind(since).fetch_all(pool).await?,
            Pool::Sqlite(pools) => {
                // Stored as text in the migration's format, which sorts as time.
                let since = since.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
                sqlx::query_as(COUNT_REJECTS).bind(since).fetch_all(&pools.read).await?
            }
        };
        Ok(rows
            .into_iter()
            .filter_map(|(table, total, last_24h)| Some((table.parse().ok()?, RejectCounts { total, last_24h })))
            .collect())
    }
}
