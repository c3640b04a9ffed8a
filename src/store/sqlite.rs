//! SQLite: the embedded default. A correct, simple path with PostgreSQL's
//! semantics: one prepared statement per row inside the batch transaction.
//! Values are stored with the types' canonical text (dates, timestamps, JSON,
//! device ids, UUIDs), so text order is time order for version comparisons.

use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value as Json};
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{ConnectOptions as _, Row as _, Sqlite, SqliteConnection, SqlitePool};

use super::backend::{self, Bookkeeping as _, RowWriter};
use super::bookkeeping::Pools;
use super::{sql, Batch, OffsetAdvance, ReadPage, ReadQuery, StoreError, TopicIdentity, WriteOutcome};
use crate::catalogue::{ColumnType, ConflictPolicy, Table, TableSpec, Value};
use crate::config::DwhConfig;

/// SQLite's pools: all writes share one connection (SQLite takes one writer
/// at a time), reads run beside them (WAL).
pub(super) fn pools(config: &DwhConfig) -> Result<Pools<Sqlite>, StoreError> {
    let url = config.database_url.expose();
    let options = SqliteConnectOptions::from_str(url)
        .map_err(StoreError::Database)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30))
        // A statement waiting for the writer is no fault: slow ones at debug.
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
    let pool = |max: u32| {
        SqlitePoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(60))
            .connect_lazy_with(options.clone())
    };
    // An in-memory database exists once per connection: keep exactly one.
    if url.contains(":memory:") {
        let only = pool(1);
        return Ok(Pools {
            read: only.clone(),
            write: only,
        });
    }
    Ok(Pools {
        read: pool(config.pool_size),
        write: pool(1),
    })
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

fn bind<'q>(q: Query<'q>, value: &Value) -> Query<'q> {
    match value {
        Value::Null => q.bind(None::<String>),
        Value::Int(v) => q.bind(*v),
        Value::Float(v) => q.bind(*v),
        Value::Bool(v) => q.bind(*v),
        other => q.bind(other.canonical_text()),
    }
}

pub async fn write(
    pool: &SqlitePool,
    batch: Batch<'_>,
    chunks: &[Range<usize>],
    budget: &super::Budget,
) -> Result<WriteOutcome, StoreError> {
    let statements = Statements::of(batch.table.spec());
    backend::write_batch(pool, &statements, batch, chunks, budget).await
}

/// Writes rows of the API into the open transaction, chunk by chunk; see
/// [`super::RowsWriter`].
pub(super) async fn write_parts(
    tx: &mut SqliteConnection,
    spec: &TableSpec,
    rows: &[crate::catalogue::Row],
    chunks: &[Range<usize>],
    outcome: &mut WriteOutcome,
) -> Result<(), StoreError> {
    let statements = Statements::of(spec);
    for range in chunks {
        write_rows(tx, &statements, &rows[range.clone()], outcome).await?;
    }
    Ok(())
}

struct Statements {
    insert: String,
    upsert: Option<String>,
}

impl Statements {
    fn of(spec: &TableSpec) -> Self {
        Statements {
            insert: sql::sqlite_insert(spec, false),
            upsert: match spec.policy {
                ConflictPolicy::InsertOnly => None,
                ConflictPolicy::NewestWins { .. } => Some(sql::sqlite_insert(spec, true)),
            },
        }
    }
}

/// One statement per row: insert when the key is new, else the table's update.
async fn write_rows(
    conn: &mut SqliteConnection,
    statements: &Statements,
    rows: &[crate::catalogue::Row],
    outcome: &mut WriteOutcome,
) -> Result<(), StoreError> {
    for row in rows {
        let q = row.values.iter().fold(sqlx::query(&statements.insert), bind);
        if let Some(inserted) = q.fetch_optional(&mut *conn).await? {
            outcome.inserted += 1;
            outcome.inserted_ids.push(inserted.try_get(0)?);
            continue;
        }
        // The key exists: apply the newest-wins update, if the table has one.
        if let Some(upsert) = &statements.upsert {
            let q = row.values.iter().fold(sqlx::query(upsert), bind);
            if q.fetch_optional(&mut *conn).await?.is_some() {
                outcome.updated += 1;
            }
        }
    }
    Ok(())
}

async fn advance_offset(
    conn: &mut SqliteConnection,
    a: &OffsetAdvance,
    identity: Option<&TopicIdentity>,
) -> Result<(), StoreError> {
    let moved: Option<i64> = sqlx::query_scalar(super::ADVANCE_OFFSET)
        .bind(&a.group_id)
        .bind(&a.topic)
        .bind(a.partition)
        .bind(a.to)
        .bind(a.from)
        .bind(identity.map(|i| i.topic_id.as_str()))
        .bind(identity.and_then(|i| i.cluster_id.as_deref()))
        .fetch_optional(&mut *conn)
        .await?;
    if moved.is_some() {
        return Ok(());
    }
    Err(Sqlite::fenced(conn, a).await)
}

#[async_trait::async_trait]
impl RowWriter<Sqlite> for Statements {
    async fn advance_offsets(
        &self,
        conn: &mut SqliteConnection,
        advances: &[OffsetAdvance],
        identity: Option<&TopicIdentity>,
    ) -> Result<(), StoreError> {
        for advance in advances {
            advance_offset(conn, advance, identity).await?;
        }
        Ok(())
    }

    async fn write_rows(
        &self,
        conn: &mut SqliteConnection,
        rows: &[crate::catalogue::Row],
        outcome: &mut WriteOutcome,
    ) -> Result<(), StoreError> {
        write_rows(conn, self, rows, outcome).await
    }
}

pub async fn read(pool: &SqlitePool, table: Table, query: &ReadQuery) -> Result<ReadPage, StoreError> {
    let spec = table.spec();
    let mut conditions: Vec<String> = query.filters.iter().map(|(c, _)| format!("{} = ?", c.name)).collect();
    conditions.push("id > ?".into());
    let statement = format!(
        "SELECT id, {}, ingested_at FROM {} WHERE {} ORDER BY id LIMIT ?",
        sql::column_list(spec),
        spec.name,
        conditions.join(" AND ")
    );
    let q = query
        .filters
        .iter()
        .fold(sqlx::query(&statement), |q, (_, v)| bind(q, v));
    let rows = q
        .bind(query.after_id.unwrap_or(i64::MIN))
        .bind(i64::from(query.limit))
        .fetch(pool);
    ReadPage::collect(query, rows, |row| to_json(spec, row)).await
}

fn decode_error(column: &str, text: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(
        format!("column {column}: stored value {text:?} is not in the expected form").into(),
    ))
}

fn to_json(spec: &TableSpec, row: &SqliteRow) -> Result<Map<String, Json>, StoreError> {
    let text = |row: &SqliteRow, ty: ColumnType, name: &str| match row.try_get::<Option<String>, _>(name)? {
        None => Ok(None),
        Some(text) => Ok(Some(parse_text(ty, &text).ok_or_else(|| decode_error(name, &text))?)),
    };
    backend::row_json(spec, row, text, |row| {
        Ok(text(row, ColumnType::TimestampTz, "ingested_at")?.unwrap_or(Value::Null))
    })
}

/// The inverse of the canonical text written by [`bind`].
fn parse_text(ty: ColumnType, text: &str) -> Option<Value> {
    Some(match ty {
        ColumnType::Date => Value::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?),
        ColumnType::Timestamp => Value::Timestamp(NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok()?),
        ColumnType::TimestampTz => Value::TimestampTz(DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc)),
        ColumnType::Json => Value::Json(serde_json::from_str(text).ok()?),
        _ => Value::Text(text.into()),
    })
}
