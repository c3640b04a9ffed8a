//! The rejects table for operators: list, mark requeued, purge.
//!
//! Rejects are never deleted by the pipeline. A requeue marks the rows it sent
//! (`requeued_at`), so that a second requeue does not send them again.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Dwh, Pool, StoreError};
use crate::catalogue::Table;

/// Which rejects of a table an operator means.
#[derive(Debug, Clone, Default)]
pub struct RejectFilter {
    /// Case-insensitive text the reason contains.
    pub reason: Option<String>,
    /// Rejected at or after.
    pub since: Option<DateTime<Utc>>,
    /// Only those not requeued yet.
    pub pending_only: bool,
    /// Only ids above this one (a cursor: results come in id order).
    pub after_id: i64,
    /// Only ids up to this one (what existed when a requeue began).
    pub max_id: Option<i64>,
    pub limit: Option<i64>,
}

/// A row of `dwh_rejected_records`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredReject {
    pub id: i64,
    pub table: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub reason: String,
    pub rejected_at: DateTime<Utc>,
    pub requeued_at: Option<DateTime<Utc>>,
}

type Row = (
    i64,
    String,
    String,
    i32,
    i64,
    Option<Vec<u8>>,
    Vec<u8>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// The filter's query; binds: table, reason text, since, limit, after id, max id.
fn select(backend_contains: &str, filter: &RejectFilter) -> String {
    let mut sql = String::from(
        "SELECT id, table_name, topic, partition, \"offset\", record_key, payload, reason, rejected_at, requeued_at \
         FROM dwh_rejected_records WHERE table_name = $1",
    );
    sql.push_str(&format!(
        " AND ($2 IS NULL OR {backend_contains}(lower(reason), lower($2)) > 0)"
    ));
    sql.push_str(" AND ($3 IS NULL OR rejected_at >= $3) AND id > $5 AND ($6 IS NULL OR id <= $6)");
    if filter.pending_only {
        sql.push_str(" AND requeued_at IS NULL");
    }
    sql.push_str(" ORDER BY id LIMIT $4");
    sql
}

/// SQLite keeps times as text in the migrations' format, which sorts as time.
fn sqlite_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

impl Dwh {
    /// The rejects of `table` that match `filter`, oldest first.
    pub async fn rejects(&self, table: Table, filter: &RejectFilter) -> Result<Vec<StoredReject>, StoreError> {
        let limit = filter.limit.unwrap_or(i64::MAX);
        let rows: Vec<Row> = match &self.pool {
            Pool::Postgres(pool) => {
                sqlx::query_as(&select("strpos", filter))
                    .bind(table.name())
                    .bind(filter.reason.as_deref())
                    .bind(filter.since)
                    .bind(limit)
                    .bind(filter.after_id)
                    .bind(filter.max_id)
                    .fetch_all(pool)
                    .await?
            }
            Pool::Sqlite(pools) => {
                sqlx::query_as(&select("instr", filter))
                    .bind(table.name())
                    .bind(filter.reason.as_deref())
                    .bind(filter.since.map(sqlite_time))
                    .bind(limit)
                    .bind(filter.after_id)
                    .bind(filter.max_id)
                    .fetch_all(&pools.read)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(
                |(id, table, topic, partition, offset, key, payload, reason, rejected_at, requeued_at)| StoredReject {
                    id,
                    table,
                    topic,
                    partition,
                    offset,
                    key,
                    payload,
                    reason,
                    rejected_at,
                    requeued_at,
                },
            )
            .collect())
    }

    /// The highest reject id so far (0 with none).
    pub async fn last_reject_id(&self) -> Result<i64, StoreError> {
        const MAX: &str = "SELECT COALESCE(MAX(id), 0) FROM dwh_rejected_records";
        let (id,): (i64,) = on_pool!(self, read, |pool| sqlx::query_as(MAX).fetch_one(pool).await?);
        Ok(id)
    }

    /// Marks the rejects `ids` requeued now; returns how many were not marked yet.
    pub async fn mark_requeued(&self, ids: &[i64]) -> Result<u64, StoreError> {
        let mut marked = 0;
        for chunk in ids.chunks(500) {
            let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let now = match self.pool {
                Pool::Postgres(_) => "now()",
                Pool::Sqlite(_) => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            };
            let sql = format!(
                "UPDATE dwh_rejected_records SET requeued_at = {now} WHERE id IN ({list}) AND requeued_at IS NULL"
            );
            marked += on_pool!(self, write, |pool| sqlx::query(&sql)
                .execute(pool)
                .await?
                .rows_affected());
        }
        Ok(marked)
    }

    /// Deletes the rejects of `table` rejected before `before`; returns how many.
    pub async fn purge_rejects(&self, table: Table, before: DateTime<Utc>) -> Result<u64, StoreError> {
        const DELETE: &str = "DELETE FROM dwh_rejected_records WHERE table_name = $1 AND rejected_at < $2";
        Ok(match &self.pool {
            Pool::Postgres(pool) => sqlx::query(DELETE)
                .bind(table.name())
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected(),
            Pool::Sqlite(pools) => sqlx::query(DELETE)
                .bind(table.name())
                .bind(sqlite_time(before))
                .execute(&pools.write)
                .await?
                .rows_affected(),
        })
    }
}
