//! Which ingest instances read which tables now: each announces its tables every
//! few seconds, so that `replay --execute` can refuse while one is active, on any
//! broker (librdkafka's mock cluster does not describe groups).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Dwh, Pool, StoreError};
use crate::catalogue::Table;

/// An instance reading a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    pub table: String,
    pub member: String,
    pub seen_at: DateTime<Utc>,
}

const UPSERT_PG: &str = "INSERT INTO dwh_ingest_members (group_id, table_name, member, seen_at) \
     VALUES ($1, $2, $3, now()) ON CONFLICT (group_id, table_name, member) DO UPDATE SET seen_at = excluded.seen_at";

const UPSERT_SQLITE: &str = "INSERT INTO dwh_ingest_members (group_id, table_name, member, seen_at) \
     VALUES ($1, $2, $3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
     ON CONFLICT (group_id, table_name, member) DO UPDATE SET seen_at = excluded.seen_at";

const DELETE: &str = "DELETE FROM dwh_ingest_members WHERE group_id = $1 AND member = $2";

const SELECT: &str = "SELECT table_name, member, seen_at FROM dwh_ingest_members \
     WHERE group_id = $1 AND seen_at >= $2 ORDER BY table_name, member";

impl Dwh {
    /// Records that `member` reads `tables` for `group`, now.
    pub async fn announce_member(&self, group: &str, tables: &[Table], member: &str) -> Result<(), StoreError> {
        let upsert = match self.pool {
            Pool::Postgres(_) => UPSERT_PG,
            Pool::Sqlite(_) => UPSERT_SQLITE,
        };
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for table in tables {
                sqlx::query(upsert)
                    .bind(group)
                    .bind(table.name())
                    .bind(member)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Forgets `member` (it stopped reading).
    pub async fn leave_member(&self, group: &str, member: &str) -> Result<(), StoreError> {
        on_pool!(self, write, |pool| {
            sqlx::query(DELETE).bind(group).bind(member).execute(pool).await?;
        });
        Ok(())
    }

    /// The instances of `group` that announced a table within `fresh`.
    pub async fn readers(&self, group: &str, fresh: Duration) -> Result<Vec<Reader>, StoreError> {
        let since = Utc::now() - chrono::Duration::from_std(fresh).unwrap_or(chrono::Duration::MAX);
        let rows: Vec<(String, String, DateTime<Utc>)> = match &self.pool {
            Pool::Postgres(pool) => sqlx::query_as(SELECT).bind(group).bind(since).fetch_all(pool).await?,
            Pool::Sqlite(pools) => {
                sqlx::query_as(SELECT)
                    .bind(group)
                    .bind(since.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                    .fetch_all(&pools.read)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(table, member, seen_at)| Reader { table, member, seen_at })
            .collect())
    }
}
