//! What both backends share, written once: the bookkeeping statements that read
//! the same on PostgreSQL and SQLite (a reject inserted, a fenced offset read
//! back) as one [`Bookkeeping`] implementation for every sqlx database that can
//! run them, and the writing of a batch's rows that isolates the rows the
//! database refuses ([`write_isolating`]) over a [`RowWriter`] each backend
//! gives.

use std::ops::Range;

use serde_json::{Map, Value as Json};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::error::Refusal;
use super::{Batch, Budget, OffsetAdvance, OffsetGap, RejectedRecord, StoreError, TopicIdentity, WriteOutcome};
use crate::catalogue::{ColumnType, Row, TableSpec, Value};

/// Binds: table, topic, partition, offset, key, payload, reason, topic id
/// ('' where unknown: a reject is one per log, not one per offset).
const INSERT_REJECT: &str = "INSERT INTO dwh_rejected_records \
     (table_name, topic, partition, \"offset\", record_key, payload, reason, topic_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (topic, topic_id, partition, \"offset\") DO NOTHING";

/// Binds: group, topic, partition, from, to, records, cause.
const INSERT_GAP: &str = "INSERT INTO dwh_offset_gaps \
     (group_id, topic, partition, from_offset, to_offset, records, cause) VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Binds: group, topic, partition.
pub(super) const SELECT_OFFSET: &str =
    "SELECT next_offset FROM dwh_consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = $3";

/// The bookkeeping statements, on a connection of the database (inside the
/// batch's transaction).
#[async_trait::async_trait]
pub(super) trait Bookkeeping: Database {
    /// Keeps a rejected record of the log `log` (once: a record of that log
    /// rejected again is left as it is).
    async fn insert_reject(
        conn: &mut Self::Connection,
        reject: &RejectedRecord,
        log: Option<&TopicIdentity>,
    ) -> Result<(), StoreError>;

    /// Keeps a gap of the offsets moved in this transaction.
    async fn insert_gap(conn: &mut Self::Connection, gap: &OffsetGap) -> Result<(), StoreError>;

    /// The error for an advance that did not move: the offset stored now, read
    /// in the same transaction, names how it was fenced.
    async fn fenced(conn: &mut Self::Connection, advance: &OffsetAdvance) -> StoreError;
}

#[async_trait::async_trait]
impl<DB> Bookkeeping for DB
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q [u8]>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> i32: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB> + sqlx::Decode<'q, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    async fn insert_reject(
        conn: &mut DB::Connection,
        r: &RejectedRecord,
        log: Option<&TopicIdentity>,
    ) -> Result<(), StoreError> {
        let reason = super::storable_text(&r.reason);
        sqlx::query::<DB>(INSERT_REJECT)
            .bind(r.table.name())
            .bind(r.topic.as_str())
            .bind(r.partition)
            .bind(r.offset)
            .bind(r.key.as_deref())
            .bind(r.payload.as_slice())
            .bind(reason.as_ref())
            .bind(log.map_or("", |l| l.topic_id.as_str()))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn insert_gap(conn: &mut DB::Connection, g: &OffsetGap) -> Result<(), StoreError> {
        sqlx::query::<DB>(INSERT_GAP)
            .bind(g.group_id.as_str())
            .bind(g.topic.as_str())
            .bind(g.partition)
            .bind(g.from)
            .bind(g.to)
            .bind(g.records)
            .bind(g.cause.name())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn fenced(conn: &mut DB::Connection, a: &OffsetAdvance) -> StoreError {
        let stored = sqlx::query_scalar::<DB, i64>(SELECT_OFFSET)
            .bind(a.group_id.as_str())
            .bind(a.topic.as_str())
            .bind(a.partition)
            .fetch_optional(&mut *conn)
            .await;
        match stored {
            Ok(stored) => a.fenced(stored),
            Err(e) => e.into(),
        }
    }
}

/// How a backend writes a batch: its fenced offset advances, and one chunk of
/// rows at a time, adding what happened to `outcome`; on a connection of its
/// database, inside the batch's transaction.
#[async_trait::async_trait]
pub(super) trait RowWriter<DB: Bookkeeping>: Sync {
    /// Moves every offset of the batch from its start, or fails with
    /// [`StoreError::Fenced`].
    async fn advance_offsets(
        &self,
        conn: &mut DB::Connection,
        advances: &[OffsetAdvance],
        identity: Option<&TopicIdentity>,
    ) -> Result<(), StoreError>;

    async fn write_rows(
        &self,
        conn: &mut DB::Connection,
        rows: &[Row],
        outcome: &mut WriteOutcome,
    ) -> Result<(), StoreError>;

    /// Takes the table's write lock for the whole transaction, before the
    /// savepoints: a lock first taken inside a savepoint that rolls back is
    /// released with it, and a schema change could then land between two parts
    /// of one batch (parts refused by a constraint that the next parts no longer
    /// meet). A backend whose write lock is the whole database needs none.
    async fn hold_table(&self, _conn: &mut DB::Connection) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Writes a batch in one transaction: the offsets first (a fenced batch fails
/// before any row work, and the offset row lock serialises two writers of the
/// same partition), then the catalogue's rejects, then the rows
/// ([`write_isolating`]).
pub(super) async fn write_batch<DB: Bookkeeping, W: RowWriter<DB>>(
    pool: &sqlx::Pool<DB>,
    writer: &W,
    batch: Batch<'_>,
    chunks: &[Range<usize>],
    budget: &Budget,
) -> Result<WriteOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    writer.advance_offsets(&mut tx, batch.offsets, batch.identity).await?;
    for gap in batch.gaps {
        DB::insert_gap(&mut tx, gap).await?;
    }
    for reject in batch.rejects {
        DB::insert_reject(&mut tx, reject, batch.identity).await?;
    }
    if batch.origins.is_some() && !batch.rows.is_empty() {
        writer.hold_table(&mut tx).await?;
    }
    let mut outcome = WriteOutcome {
        statements: chunks.len(),
        ..WriteOutcome::default()
    };
    write_isolating::<DB, W>(&mut tx, writer, &batch, chunks, &mut outcome, budget).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Writes a batch's rows, chunk by chunk, inside the open transaction on
/// `conn`, the same way on both backends. With origins, each chunk runs under a
/// savepoint; when the database refuses the data of a row in it, the part is
/// rolled back and tried again as two halves, each under a savepoint of its
/// own, down to single rows: the refused rows become rejects (in the same
/// transaction), the rest lands, in order. One refused row among n costs about
/// 2·log2(n) more statements. Any other error fails the batch.
pub(super) async fn write_isolating<DB: Bookkeeping, W: RowWriter<DB>>(
    conn: &mut DB::Connection,
    writer: &W,
    batch: &Batch<'_>,
    chunks: &[Range<usize>],
    outcome: &mut WriteOutcome,
    budget: &Budget,
) -> Result<(), StoreError> {
    let spec = batch.table.spec();
    let columns: Vec<&str> = spec.columns.iter().map(|c| c.name).collect();
    // The reason of the first row refused, and whether every refusal so far shares it.
    let mut reasons: Option<(Refusal, String, bool)> = None;
    for range in chunks {
        let Some(origins) = batch.origins else {
            writer.write_rows(conn, &batch.rows[range.clone()], outcome).await?;
            continue;
        };
        // Parts still to write, the next on top.
        let mut parts = vec![range.clone()];
        while let Some(part) = parts.pop() {
            let rows = &batch.rows[part.clone()];
            let mut savepoint = sqlx::Connection::begin(&mut *conn).await?;
            let mut written = WriteOutcome::default();
            match writer.write_rows(&mut savepoint, rows, &mut written).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    outcome.absorb(written);
                }
                Err(e) if e.is_refused() => {
                    savepoint.rollback().await?;
                    let refusal = Refusal::of(&e);
                    if let Some(column) = refusal.as_ref().and_then(|r| r.foreign_not_null(&columns)) {
                        return Err(StoreError::TableRefuses {
                            why: format!("column {column}, which this release does not write, is NOT NULL"),
                            message: e.to_string(),
                        });
                    }
                    if let [row] = rows {
                        match (&mut reasons, refusal) {
                            (None, Some(refusal)) => reasons = Some((refusal, e.to_string(), true)),
                            (Some((first, _, same)), refusal) => *same &= refusal.as_ref() == Some(&*first),
                            (None, None) => {}
                        }
                        let origin = origins.rows[part.start];
                        let reject = RejectedRecord::refused_row(batch.table, origins.topic, origin, row, &e);
                        budget.add(1);
                        DB::insert_reject(conn, &reject, batch.identity).await?;
                        outcome.refused.push(reject);
                    } else {
                        let middle = part.start + part.len() / 2;
                        parts.push(middle..part.end);
                        parts.push(part.start..middle);
                        outcome.statements += 2;
                        // Each half: its savepoint, its rows, its release or rollback.
                        budget.add(2 * 3);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    // Every row refused for the one same reason: the table's, not the rows'. A
    // row alone refused for its value (not a constraint) stays the row's.
    if !batch.rows.is_empty() && outcome.refused.len() == batch.rows.len() {
        if let Some((refusal, message, true)) = reasons.filter(|(r, _, _)| batch.rows.len() >= 2 || r.is_constraint()) {
            return Err(StoreError::TableRefuses {
                why: format!(
                    "every row of the batch ({}) refused with {}",
                    batch.rows.len(),
                    refusal.describe()
                ),
                message,
            });
        }
    }
    outcome.skipped = (batch.rows.len() - outcome.refused.len()) as u64 - outcome.inserted - outcome.updated;
    Ok(())
}

/// A row read back as a JSON object, `id` first and `ingested_at` last.
/// Numbers and booleans read the same on both backends; `other` reads a
/// column of any other type, and `ingested` the load time, as the backend
/// keeps them.
pub(super) fn row_json<R>(
    spec: &TableSpec,
    row: &R,
    other: impl Fn(&R, ColumnType, &'static str) -> Result<Option<Value>, StoreError>,
    ingested: impl Fn(&R) -> Result<Value, StoreError>,
) -> Result<Map<String, Json>, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut out = Map::new();
    out.insert("id".into(), Json::from(row.try_get::<i64, _>("id")?));
    for column in spec.columns {
        let name = column.name;
        let value = match column.ty {
            ColumnType::BigInt | ColumnType::Int => row.try_get::<Option<i64>, _>(name)?.map(Value::Int),
            ColumnType::Double => row.try_get::<Option<f64>, _>(name)?.map(Value::Float),
            ColumnType::Bool => row.try_get::<Option<bool>, _>(name)?.map(Value::Bool),
            ty => other(row, ty, name)?,
        };
        out.insert(name.into(), value.unwrap_or(Value::Null).to_json());
    }
    out.insert("ingested_at".into(), ingested(row)?.to_json());
    Ok(out)
}
