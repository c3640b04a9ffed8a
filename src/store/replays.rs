//! Replays: moving a group's stored offsets, the positions ingest starts from,
//! and the record of every move in `dwh_replays`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Dwh, Pool, StoreError};

/// One partition of a replay plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlannedOffset {
    pub table: String,
    pub topic: String,
    pub partition: i32,
    /// The stored next offset; `None` when the group never wrote this partition.
    pub current: Option<i64>,
    /// Where ingest reads next once the plan is executed.
    pub new: i64,
}

/// An executed replay, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReplayRecord {
    pub id: i64,
    pub group_id: String,
    pub executed_by: String,
    pub executed_at: DateTime<Utc>,
    pub scenario: String,
    pub plan: Vec<PlannedOffset>,
}

const UPSERT_OFFSET_PG: &str =
    "INSERT INTO dwh_consumer_offsets (group_id, topic, partition, next_offset, updated_at) \
     VALUES ($1, $2, $3, $4, now()) ON CONFLICT (group_id, topic, partition) \
     DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at";

const UPSERT_OFFSET_SQLITE: &str =
    "INSERT INTO dwh_consumer_offsets (group_id, topic, partition, next_offset, updated_at) \
     VALUES ($1, $2, $3, $4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) ON CONFLICT (group_id, topic, partition) \
     DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at";

const INSERT_REPLAY: &str =
    "INSERT INTO dwh_replays (group_id, executed_by, scenario, plan) VALUES ($1, $2, $3, $4) RETURNING id";

const SELECT_REPLAYS: &str = "SELECT id, group_id, executed_by, executed_at, scenario, plan FROM dwh_replays \
     WHERE group_id = $1 ORDER BY id DESC LIMIT $2";

impl Dwh {
    /// Sets the stored offsets of `plan` and records the replay, in one
    /// transaction; returns the record's id.
    pub async fn execute_replay(
        &self,
        group_id: &str,
        executed_by: &str,
        scenario: &str,
        plan: &[PlannedOffset],
    ) -> Result<i64, StoreError> {
        let text = serde_json::to_string(plan).expect("a plan serializes");
        let upsert = match self.pool {
            Pool::Postgres(_) => UPSERT_OFFSET_PG,
            Pool::Sqlite(_) => UPSERT_OFFSET_SQLITE,
        };
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for p in plan {
                sqlx::query(upsert)
                    .bind(group_id)
                    .bind(&p.topic)
                    .bind(p.partition)
                    .bind(p.new)
                    .execute(&mut *tx)
                    .await?;
            }
            let (id,): (i64,) = sqlx::query_as(INSERT_REPLAY)
                .bind(group_id)
                .bind(executed_by)
                .bind(scenario)
                .bind(&text)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The last `limit` replays of `group_id`, newest first.
    pub async fn replays(&self, group_id: &str, limit: i64) -> Result<Vec<ReplayRecord>, StoreError> {
        type Row = (i64, String, String, DateTime<Utc>, String, String);
        let rows: Vec<Row> = on_pool!(self, read, |pool| {
            sqlx::query_as(SELECT_REPLAYS)
                .bind(group_id)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, group_id, executed_by, executed_at, scenario, plan)| ReplayRecord {
                    id,
                    group_id,
                    executed_by,
                    executed_at,
                    scenario,
                    // Written by `execute_replay` only; an unreadable plan shows empty.
                    plan: serde_json::from_str(&plan).unwrap_or_default(),
                },
            )
            .collect())
    }
}
