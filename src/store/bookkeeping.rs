//! The bookkeeping statements of ops and the side tasks (stored offsets, reject
//! counts and lists, windows, members, replays), written once for both
//! backends: one generic implementation of [`Queries`] over the pools of any
//! sqlx database that has a [`Dialect`], and one place ([`super::Dwh`]'s
//! `bookkeeping`) that picks the backend.
//!
//! What the backends do differently is named in [`Dialect`]: how a time is
//! compared, the SQL of "now" and of a substring's position, and how many rows
//! a statement touched.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Postgres, Sqlite, Type};

use super::replays::Replay;
use super::{
    Reader, RejectFilter, ReplayRecord, StoreError, StoredGap, StoredOffset, StoredReject, TopicIdentity, WindowRecord,
};
use crate::catalogue::Table;

/// Where a backend's statements go: reads beside writes. SQLite takes one
/// writer at a time, so its writes share one connection (they queue in the
/// pool, not on SQLite's lock) and reads run beside them (WAL); on PostgreSQL
/// both are the one pool.
#[derive(Debug)]
pub(super) struct Pools<DB: Database> {
    pub read: sqlx::Pool<DB>,
    pub write: sqlx::Pool<DB>,
}

impl<DB: Database> Clone for Pools<DB> {
    fn clone(&self) -> Self {
        Pools {
            read: self.read.clone(),
            write: self.write.clone(),
        }
    }
}

/// What one backend writes differently from the other.
pub(super) trait Dialect: Database {
    /// A time as the bookkeeping tables compare it.
    type Time: for<'q> Encode<'q, Self> + Type<Self> + Send + Sync + 'static;

    fn time(t: DateTime<Utc>) -> Self::Time;

    /// The SQL of the current time, as a stored time.
    const NOW: &'static str;

    /// The SQL function of a substring's position (0 when absent).
    const POSITION: &'static str;

    fn rows_affected(result: &Self::QueryResult) -> u64;
}

impl Dialect for Postgres {
    type Time = DateTime<Utc>;

    fn time(t: DateTime<Utc>) -> Self::Time {
        t
    }

    const NOW: &'static str = "now()";
    const POSITION: &'static str = "strpos";

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }
}

impl Dialect for Sqlite {
    /// Text in the migrations' format, which sorts as time.
    type Time = String;

    fn time(t: DateTime<Utc>) -> Self::Time {
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }

    const NOW: &'static str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
    const POSITION: &'static str = "instr";

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }
}

/// The bookkeeping of either backend, behind one type.
#[async_trait::async_trait]
pub(super) trait Queries: Send + Sync {
    async fn ping(&self) -> Result<(), StoreError>;
    /// The migrations applied to the database (`version`, `description`).
    async fn applied_migrations(&self) -> Result<Vec<(i64, String)>, StoreError>;
    async fn stored_offset(&self, group: &str, topic: &str, partition: i32) -> Result<Option<i64>, StoreError>;
    async fn stored_offsets(&self, group: &str) -> Result<Vec<StoredOffset>, StoreError>;
    async fn topic_offsets(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError>;
    /// The identities `topic`'s offset rows were written for (none where unknown).
    async fn topic_identities(&self, group: &str, topic: &str) -> Result<Vec<TopicIdentity>, StoreError>;
    /// The group's last `limit` offset gaps, newest first.
    async fn offset_gaps(&self, group: &str, limit: i64) -> Result<Vec<StoredGap>, StoreError>;
    /// Per table name: rejects in all, and since `since`.
    async fn reject_counts(&self, since: DateTime<Utc>) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// `SELECT count(*)` of a table whose name the caller checked.
    async fn count(&self, table: &str) -> Result<i64, StoreError>;
    async fn windows(&self, application_id: i64) -> Result<Vec<WindowRecord>, StoreError>;
    async fn record_window(&self, w: &WindowRecord) -> Result<(), StoreError>;
    async fn announce_member(&self, group: &str, tables: &[Table], member: &str) -> Result<(), StoreError>;
    async fn leave_member(&self, group: &str, member: &str) -> Result<(), StoreError>;
    async fn readers(&self, group: &str, since: DateTime<Utc>) -> Result<Vec<Reader>, StoreError>;
    /// Instances of groups other than `group` seen since `since`, with their group.
    async fn other_readers(&self, group: &str, since: DateTime<Utc>) -> Result<Vec<(String, Reader)>, StoreError>;
    async fn rejects(&self, table: Table, filter: &RejectFilter) -> Result<Vec<StoredReject>, StoreError>;
    async fn last_reject_id(&self) -> Result<i64, StoreError>;
    async fn mark_requeued(&self, ids: &[i64]) -> Result<u64, StoreError>;
    async fn mark_requeue_refused(&self, id: i64, reason: &str) -> Result<(), StoreError>;
    async fn purge_rejects(&self, table: Table, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Sets the stored offsets of the plan and records the replay, in one transaction.
    async fn execute_replay(&self, replay: Replay<'_>) -> Result<i64, StoreError>;
    async fn replays(&self, group: &str, limit: i64) -> Result<Vec<ReplayRecord>, StoreError>;
}

const SELECT_GROUP_OFFSETS: &str =
    "SELECT topic, partition, next_offset, updated_at, topic_id FROM dwh_consumer_offsets WHERE group_id = $1 \
     ORDER BY topic, partition";

const SELECT_GAPS: &str = "SELECT topic, partition, from_offset, to_offset, records, cause, noted_at \
     FROM dwh_offset_gaps WHERE group_id = $1 ORDER BY id DESC LIMIT $2";

const SELECT_TOPIC_IDENTITIES: &str = "SELECT DISTINCT topic_id, cluster_id FROM dwh_consumer_offsets \
     WHERE group_id = $1 AND topic = $2 AND topic_id IS NOT NULL ORDER BY topic_id";

/// Binds: group, topic, the topic id adopted: the rows of the topic's other logs.
const DELETE_OTHER_LOGS: &str = "DELETE FROM dwh_consumer_offsets \
     WHERE group_id = $1 AND topic = $2 AND (topic_id IS NULL OR topic_id <> $3)";

const SELECT_TOPIC_OFFSETS: &str =
    "SELECT partition, next_offset FROM dwh_consumer_offsets WHERE group_id = $1 AND topic = $2";

/// Binds: the cut-off of "recent".
const COUNT_REJECTS: &str = "SELECT table_name, count(*), \
     COALESCE(SUM(CASE WHEN rejected_at >= $1 THEN 1 ELSE 0 END), 0) FROM dwh_rejected_records GROUP BY table_name";

const SELECT_WINDOWS: &str = "SELECT application_id, endpoint, window_start, window_end, status, rows_fetched, \
     rows_published, duration_ms, error, fetched_at FROM dwh_appmetrica_windows \
     WHERE application_id = $1 ORDER BY endpoint, window_start";

/// Binds: application, endpoint, start, end, status, fetched, published, duration, error, fetched_at.
const UPSERT_WINDOW: &str = "INSERT INTO dwh_appmetrica_windows (application_id, endpoint, window_start, window_end, \
     status, rows_fetched, rows_published, duration_ms, error, fetched_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (application_id, endpoint, window_start) DO UPDATE SET window_end = excluded.window_end, \
     status = excluded.status, rows_fetched = excluded.rows_fetched, rows_published = excluded.rows_published, \
     duration_ms = excluded.duration_ms, error = excluded.error, fetched_at = excluded.fetched_at";

const DELETE_MEMBER: &str = "DELETE FROM dwh_ingest_members WHERE group_id = $1 AND member = $2";

const SELECT_MEMBERS: &str = "SELECT table_name, member, seen_at FROM dwh_ingest_members \
     WHERE group_id = $1 AND seen_at >= $2 ORDER BY table_name, member";

const SELECT_OTHER_MEMBERS: &str = "SELECT group_id, table_name, member, seen_at FROM dwh_ingest_members \
     WHERE group_id <> $1 AND seen_at >= $2 ORDER BY group_id, table_name, member";

const SELECT_REPLAYS: &str = "SELECT id, group_id, executed_by, executed_at, scenario, plan FROM dwh_replays \
     WHERE group_id = $1 ORDER BY id DESC LIMIT $2";

const INSERT_REPLAY: &str =
    "INSERT INTO dwh_replays (group_id, executed_by, scenario, plan) VALUES ($1, $2, $3, $4) RETURNING id";

/// Binds: group, table, member.
fn upsert_member<DB: Dialect>() -> String {
    format!(
        "INSERT INTO dwh_ingest_members (group_id, table_name, member, seen_at) VALUES ($1, $2, $3, {}) \
         ON CONFLICT (group_id, table_name, member) DO UPDATE SET seen_at = excluded.seen_at",
        DB::NOW
    )
}

/// Binds: group, topic, partition, next offset, topic id, cluster id (each
/// kept as it was when `NULL`).
fn upsert_offset<DB: Dialect>() -> String {
    format!(
        "INSERT INTO dwh_consumer_offsets (group_id, topic, partition, next_offset, topic_id, cluster_id, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, {}) ON CONFLICT (group_id, topic, partition) \
         DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at, \
         topic_id = COALESCE(excluded.topic_id, dwh_consumer_offsets.topic_id), \
         cluster_id = COALESCE(excluded.cluster_id, dwh_consumer_offsets.cluster_id)",
        DB::NOW
    )
}

/// The filter's query; binds: table, reason text, since, limit, after id, max id.
fn select_rejects<DB: Dialect>(filter: &RejectFilter) -> String {
    let mut sql = String::from(
        "SELECT id, table_name, topic, partition, \"offset\", record_key, payload, reason, rejected_at, requeued_at, \
         requeue_error, topic_id FROM dwh_rejected_records WHERE table_name = $1",
    );
    sql.push_str(&format!(
        " AND ($2 IS NULL OR {}(lower(reason), lower($2)) > 0)",
        DB::POSITION
    ));
    sql.push_str(" AND ($3 IS NULL OR rejected_at >= $3) AND id > $5 AND ($6 IS NULL OR id <= $6)");
    if filter.pending_only {
        sql.push_str(" AND requeued_at IS NULL");
        if !filter.retry_refused {
            sql.push_str(" AND requeue_error IS NULL");
        }
    }
    sql.push_str(" ORDER BY id LIMIT $4");
    sql
}

type RejectRow = (
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
    Option<String>,
    String,
);

type WindowRow = (
    i64,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<DateTime<Utc>>,
);

#[async_trait::async_trait]
impl<DB> Queries for Pools<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<DateTime<Utc>>: Encode<'q, DB>,
    for<'q> Option<DB::Time>: Encode<'q, DB>,
    for<'q> i32: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query::<DB>("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn applied_migrations(&self) -> Result<Vec<(i64, String)>, StoreError> {
        const APPLIED: &str = "SELECT version, description FROM _sqlx_migrations ORDER BY version";
        Ok(sqlx::query_as(APPLIED).fetch_all(&self.read).await?)
    }

    async fn stored_offset(&self, group: &str, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar::<DB, i64>(super::backend::SELECT_OFFSET)
            .bind(group)
            .bind(topic)
            .bind(partition)
            .fetch_optional(&self.read)
            .await?)
    }

    async fn stored_offsets(&self, group: &str) -> Result<Vec<StoredOffset>, StoreError> {
        let rows: Vec<(String, i32, i64, DateTime<Utc>, Option<String>)> = sqlx::query_as(SELECT_GROUP_OFFSETS)
            .bind(group)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next_offset, updated_at, topic_id)| StoredOffset {
                topic,
                partition,
                next_offset,
                updated_at,
                topic_id,
            })
            .collect())
    }

    async fn topic_offsets(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(SELECT_TOPIC_OFFSETS)
            .bind(group)
            .bind(topic)
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn topic_identities(&self, group: &str, topic: &str) -> Result<Vec<TopicIdentity>, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(SELECT_TOPIC_IDENTITIES)
            .bind(group)
            .bind(topic)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(topic_id, cluster_id)| TopicIdentity { topic_id, cluster_id })
            .collect())
    }

    async fn offset_gaps(&self, group: &str, limit: i64) -> Result<Vec<StoredGap>, StoreError> {
        let rows: Vec<(String, i32, i64, i64, i64, String, DateTime<Utc>)> = sqlx::query_as(SELECT_GAPS)
            .bind(group)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(topic, partition, from_offset, to_offset, records, cause, noted_at)| StoredGap {
                    topic,
                    partition,
                    from_offset,
                    to_offset,
                    records,
                    cause,
                    noted_at,
                },
            )
            .collect())
    }

    async fn reject_counts(&self, since: DateTime<Utc>) -> Result<Vec<(String, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(COUNT_REJECTS)
            .bind(DB::time(since))
            .fetch_all(&self.read)
            .await?)
    }

    async fn count(&self, table: &str) -> Result<i64, StoreError> {
        let sql = format!("SELECT count(*) FROM {table}");
        Ok(sqlx::query_scalar::<DB, i64>(&sql).fetch_one(&self.read).await?)
    }

    async fn windows(&self, application_id: i64) -> Result<Vec<WindowRecord>, StoreError> {
        let rows: Vec<WindowRow> = sqlx::query_as(SELECT_WINDOWS)
            .bind(application_id)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| WindowRecord {
                application_id: r.0,
                endpoint: r.1,
                window_start: r.2,
                window_end: r.3,
                status: r.4,
                rows_fetched: r.5,
                rows_published: r.6,
                duration_ms: r.7,
                error: r.8,
                fetched_at: r.9,
            })
            .collect())
    }

    async fn record_window(&self, w: &WindowRecord) -> Result<(), StoreError> {
        // The window's times are bound as times (they are its key as stored).
        sqlx::query::<DB>(UPSERT_WINDOW)
            .bind(w.application_id)
            .bind(w.endpoint.as_str())
            .bind(w.window_start)
            .bind(w.window_end)
            .bind(w.status.as_str())
            .bind(w.rows_fetched)
            .bind(w.rows_published)
            .bind(w.duration_ms)
            .bind(w.error.as_deref())
            .bind(w.fetched_at)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn announce_member(&self, group: &str, tables: &[Table], member: &str) -> Result<(), StoreError> {
        let upsert = upsert_member::<DB>();
        let mut tx = self.write.begin().await?;
        for table in tables {
            sqlx::query::<DB>(&upsert)
                .bind(group)
                .bind(table.name())
                .bind(member)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn leave_member(&self, group: &str, member: &str) -> Result<(), StoreError> {
        sqlx::query::<DB>(DELETE_MEMBER)
            .bind(group)
            .bind(member)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn readers(&self, group: &str, since: DateTime<Utc>) -> Result<Vec<Reader>, StoreError> {
        let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(SELECT_MEMBERS)
            .bind(group)
            .bind(DB::time(since))
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(table, member, seen_at)| Reader { table, member, seen_at })
            .collect())
    }

    async fn other_readers(&self, group: &str, since: DateTime<Utc>) -> Result<Vec<(String, Reader)>, StoreError> {
        let rows: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(SELECT_OTHER_MEMBERS)
            .bind(group)
            .bind(DB::time(since))
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(group, table, member, seen_at)| (group, Reader { table, member, seen_at }))
            .collect())
    }

    async fn rejects(&self, table: Table, filter: &RejectFilter) -> Result<Vec<StoredReject>, StoreError> {
        let sql = select_rejects::<DB>(filter);
        let rows: Vec<RejectRow> = sqlx::query_as(&sql)
            .bind(table.name())
            .bind(filter.reason.as_deref())
            .bind(filter.since.map(DB::time))
            .bind(filter.limit.unwrap_or(i64::MAX))
            .bind(filter.after_id)
            .bind(filter.max_id)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| StoredReject {
                id: r.0,
                table: r.1,
                topic: r.2,
                partition: r.3,
                offset: r.4,
                key: r.5,
                payload: r.6,
                reason: r.7,
                rejected_at: r.8,
                requeued_at: r.9,
                requeue_error: r.10,
                topic_id: Some(r.11).filter(|id| !id.is_empty()),
            })
            .collect())
    }

    async fn last_reject_id(&self) -> Result<i64, StoreError> {
        const MAX: &str = "SELECT COALESCE(MAX(id), 0) FROM dwh_rejected_records";
        Ok(sqlx::query_scalar::<DB, i64>(MAX).fetch_one(&self.read).await?)
    }

    async fn mark_requeued(&self, ids: &[i64]) -> Result<u64, StoreError> {
        let mut marked = 0;
        for chunk in ids.chunks(500) {
            let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let sql = format!(
                "UPDATE dwh_rejected_records SET requeued_at = {}, requeue_error = NULL \
                 WHERE id IN ({list}) AND requeued_at IS NULL",
                DB::NOW
            );
            let done = sqlx::query::<DB>(&sql).execute(&self.write).await?;
            marked += DB::rows_affected(&done);
        }
        Ok(marked)
    }

    async fn mark_requeue_refused(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        const MARK: &str = "UPDATE dwh_rejected_records SET requeue_error = $1 WHERE id = $2";
        let reason = super::storable_text(reason);
        sqlx::query::<DB>(MARK)
            .bind(reason.as_ref())
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn purge_rejects(&self, table: Table, before: DateTime<Utc>) -> Result<u64, StoreError> {
        const DELETE: &str = "DELETE FROM dwh_rejected_records WHERE table_name = $1 AND rejected_at < $2";
        let done = sqlx::query::<DB>(DELETE)
            .bind(table.name())
            .bind(DB::time(before))
            .execute(&self.write)
            .await?;
        Ok(DB::rows_affected(&done))
    }

    async fn execute_replay(&self, replay: Replay<'_>) -> Result<i64, StoreError> {
        let Replay {
            group,
            by,
            scenario,
            plan,
            adopt,
        } = replay;
        let text = serde_json::to_string(plan).expect("a plan serializes");
        let upsert = upsert_offset::<DB>();
        let mut tx = self.write.begin().await?;
        // An adopted topic's offsets of other logs go: they count nothing there.
        for (topic, identity) in adopt {
            sqlx::query::<DB>(DELETE_OTHER_LOGS)
                .bind(group)
                .bind(topic.as_str())
                .bind(identity.topic_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for p in plan {
            sqlx::query::<DB>(&upsert)
                .bind(group)
                .bind(p.topic.as_str())
                .bind(p.partition)
                .bind(p.new)
                .bind(p.topic_id.as_deref())
                .bind(p.cluster_id.as_deref())
                .execute(&mut *tx)
                .await?;
        }
        let id = sqlx::query_scalar::<DB, i64>(INSERT_REPLAY)
            .bind(group)
            .bind(by)
            .bind(scenario)
            .bind(text.as_str())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn replays(&self, group: &str, limit: i64) -> Result<Vec<ReplayRecord>, StoreError> {
        let rows: Vec<(i64, String, String, DateTime<Utc>, String, String)> = sqlx::query_as(SELECT_REPLAYS)
            .bind(group)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
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
