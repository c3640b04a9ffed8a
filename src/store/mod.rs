//! The DWH store: PostgreSQL (production) or SQLite (embedded default), one API.
//!
//! Guarantees: [`Dwh::write`] applies a [`Batch`] in one transaction: the fenced
//! offset advances, the rejected records and the rows (under the table's conflict
//! policy) commit together or not at all. No statement carries more than
//! `DWH_MAX_WRITE_BATCH_BYTES` bytes of row data, nor, in a write of the API (a
//! batch without origins), more than `DWH_MAX_ROWS_PER_INSERT` rows: a batch of
//! the ingest is already bounded by `KAFKA_BATCH_MAX_ROWS`, and each statement
//! costs the database more than its rows do.
//! A fenced offset aborts the whole transaction with [`StoreError::Fenced`].

mod backend;
mod bookkeeping;
mod chunk;
mod error;
mod gaps;
mod identity;
mod members;
pub mod pgbinary;
mod postgres;
mod progress;
mod rejects;
mod replays;
pub mod sql;
mod sqlite;
mod windows;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{Datelike as _, NaiveDate};
use serde_json::{Map, Value as Json};

/// Rejects are the catalogue's to define; the store keeps them.
pub use crate::catalogue::RejectedRecord;
pub use chunk::{plan as plan_chunks, Oversized};
pub use error::StoreError;
pub use gaps::{GapCause, OffsetGap, StoredGap};
pub use identity::TopicIdentity;
pub use members::{OtherGroup, Reader};
pub use progress::{RejectCounts, StoredOffset};
pub use rejects::{RejectFilter, StoredReject};
pub use replays::{PlannedOffset, ReplayRecord};
pub use windows::WindowRecord;

use bookkeeping::{Pools, Queries};

use crate::catalogue::{Column, Row, Table};
use crate::config::{Backend, DwhConfig};
use crate::telemetry::Event as _;

/// Where a row of a batch came from, so that a row the database refuses can be
/// rejected with its place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
}

/// The origins of a batch's rows (one per row, in order), and their topic.
#[derive(Debug, Clone, Copy)]
pub struct Origins<'a> {
    pub topic: &'a str,
    pub rows: &'a [Origin],
}

impl RejectedRecord {
    /// The reject for a row the database refused: the row as JSON, the database's
    /// message as the reason.
    pub fn refused_row(table: Table, topic: &str, origin: Origin, row: &Row, error: &StoreError) -> Self {
        let record: Map<String, Json> = table
            .spec()
            .columns
            .iter()
            .zip(&row.values)
            .map(|(c, v)| (c.name.to_owned(), v.to_json()))
            .collect();
        RejectedRecord {
            table,
            topic: topic.to_owned(),
            partition: origin.partition,
            offset: origin.offset,
            // The raw bytes are not kept once decoded: the record is stored as the
            // decoded row, keyed by its natural key (what `produce` would send).
            key: Some(crate::catalogue::natural_key(table.spec(), row).into_bytes()),
            payload: Json::Object(record).to_string().into_bytes(),
            reason: error.to_string(),
            class: "refused",
        }
    }
}

/// Text as a database can store it: PostgreSQL refuses NUL in any text, even in an
/// error message a reject keeps, so NUL is written as the escape `\u0000`.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\u0000"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Moves a consumer's stored position for one partition from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetAdvance {
    pub group_id: String,
    pub topic: String,
    pub partition: i32,
    /// The offset the batch started at: must equal the stored `next_offset`
    /// (or no row may be stored yet).
    pub from: i64,
    /// The new `next_offset`: one past the last record of the batch.
    pub to: i64,
}

impl OffsetAdvance {
    /// The error for an advance whose start did not match the stored offset.
    fn fenced(&self, stored: Option<i64>) -> StoreError {
        StoreError::Fenced {
            group_id: self.group_id.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            batch_start: self.from,
            stored,
        }
    }
}

/// The fenced offset advance, one statement on both backends: inserts the row when
/// absent, moves it when it stands at the batch's start, and otherwise returns
/// nothing, which the caller turns into [`StoreError::Fenced`]; a row kept for
/// another log (topic id) is fenced too. Binds: group, topic, partition, new
/// offset, batch start, topic id, cluster id.
const ADVANCE_OFFSET: &str = "INSERT INTO dwh_consumer_offsets \
     (group_id, topic, partition, next_offset, topic_id, cluster_id) \
     VALUES ($1, $2, $3, $4, $6, $7) ON CONFLICT (group_id, topic, partition) DO UPDATE \
     SET next_offset = excluded.next_offset, updated_at = excluded.updated_at, \
     topic_id = COALESCE(excluded.topic_id, dwh_consumer_offsets.topic_id), \
     cluster_id = COALESCE(excluded.cluster_id, dwh_consumer_offsets.cluster_id) \
     WHERE dwh_consumer_offsets.next_offset = $5 AND (excluded.topic_id IS NULL \
     OR dwh_consumer_offsets.topic_id IS NULL OR dwh_consumer_offsets.topic_id = excluded.topic_id) \
     RETURNING next_offset";

/// The statements a write may take, each given the statement timeout: planned
/// from its chunks, and grown by the halving of parts the database refuses.
#[derive(Debug)]
pub(super) struct Budget(std::sync::atomic::AtomicU32);

impl Budget {
    fn new(planned: u32) -> Self {
        Budget(std::sync::atomic::AtomicU32::new(planned))
    }

    /// Allows `more` statements.
    pub(super) fn add(&self, more: u32) {
        self.0.fetch_add(more, std::sync::atomic::Ordering::Relaxed);
    }

    fn allowed(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The error of a write whose connection gave no answer within `limit`.
fn no_answer(limit: Duration) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the database within {} s", limit.as_secs()),
    )))
}

/// Everything one flush writes, in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub table: Table,
    pub rows: &'a [Row],
    pub rejects: &'a [RejectedRecord],
    pub offsets: &'a [OffsetAdvance],
    /// When given, a row the database refuses for its data (a constraint, a value
    /// out of range) is rejected inside this transaction, under a savepoint of its
    /// own, and the rest lands; without it the whole batch fails with
    /// [`StoreError::Refused`]. Any other error fails the whole batch either way.
    pub origins: Option<Origins<'a>>,
    /// Records the offsets move past without writing them, kept with the move.
    pub gaps: &'a [OffsetGap],
    /// The log the offsets count, kept with them; an offset row kept for
    /// another log fences the batch. `None`: not known (no check).
    pub identity: Option<&'a TopicIdentity>,
}

impl<'a> Batch<'a> {
    /// Whether the write returns the inserted rows' ids: for the API's writes
    /// (no origins), which answer with them; the ingest only counts its rows.
    pub fn wants_ids(&self) -> bool {
        self.origins.is_none()
    }

    /// Rows only, as the HTTP API writes them.
    pub fn rows(table: Table, rows: &'a [Row]) -> Self {
        Batch {
            table,
            rows,
            rejects: &[],
            offsets: &[],
            origins: None,
            gaps: &[],
            identity: None,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows inserted (not rows that existed already).
    pub inserted: u64,
    /// Their ids, in the batch's order, when [`Batch::wants_ids`]; may be empty
    /// otherwise (PostgreSQL leaves the ingest's ids to the column default).
    pub inserted_ids: Vec<i64>,
    /// Rows that replaced a stored, older version (newest-wins tables).
    pub updated: u64,
    /// Rows that changed nothing: their key was stored already (a replay or a
    /// redelivery) with a version at least as new, or came again later in the batch.
    pub skipped: u64,
    /// Rows the database refused, rejected in the same transaction (only for a
    /// batch with [`Batch::origins`]).
    pub refused: Vec<RejectedRecord>,
    /// How many row statements the batch took: its chunks by the limits, plus the
    /// halves of parts the database refused, tried again.
    pub statements: usize,
}

impl WriteOutcome {
    /// Adds the counts of a part of the batch that committed.
    fn absorb(&mut self, part: WriteOutcome) {
        self.inserted += part.inserted;
        self.inserted_ids.extend(part.inserted_ids);
        self.updated += part.updated;
        self.skipped += part.skipped;
        self.refused.extend(part.refused);
        self.statements += part.statements;
    }
}

/// Rows written in parts inside one transaction, which commits them together
/// (the API's writes: rows only, their ids back in order). On PostgreSQL each
/// part is written as it comes, in statements bounded as in [`Dwh::write`]; on
/// SQLite the parts are written at the commit. Dropped without
/// [`RowsWriter::commit`], it writes nothing.
#[allow(missing_debug_implementations)] // holds an open transaction
pub struct RowsWriter {
    dwh: Dwh,
    table: Table,
    tx: Tx,
    outcome: WriteOutcome,
}

enum Tx {
    Postgres {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        /// The ids taken for the rows at the start.
        ids: Vec<i64>,
        /// How many of them the parts written so far used.
        used: usize,
    },
    /// SQLite has one writer: a transaction open while the later parts decode
    /// would hold up every other write, so the parts wait here and go in at
    /// the commit.
    Sqlite(Vec<Vec<Row>>),
}

/// The open transaction a part of a [`RowsWriter`] goes into (on PostgreSQL,
/// with the ids taken for the part's rows, as many as are left).
enum Conn<'c> {
    Postgres(&'c mut sqlx::PgConnection, &'c [i64]),
    Sqlite(&'c mut sqlx::SqliteConnection),
}

impl RowsWriter {
    /// Writes the next part of the rows (on SQLite, at the commit).
    pub async fn write(&mut self, rows: Vec<Row>) -> Result<(), StoreError> {
        match &mut self.tx {
            Tx::Postgres { tx, ids, used } => {
                let reserved = ids.get(*used..).unwrap_or_default();
                *used += rows.len();
                let conn = Conn::Postgres(tx, reserved);
                write_part(&self.dwh, self.table, conn, &rows, &mut self.outcome).await
            }
            Tx::Sqlite(parts) => {
                parts.push(rows);
                Ok(())
            }
        }
    }

    /// Commits every part written; what they did, in total.
    pub async fn commit(mut self) -> Result<WriteOutcome, StoreError> {
        match self.tx {
            Tx::Postgres { tx, .. } => self.dwh.within(1, tx.commit()).await?,
            Tx::Sqlite(parts) => {
                let Pool::Sqlite(pools) = &self.dwh.pool else {
                    unreachable!("parts kept for the pool's backend")
                };
                let mut tx = self.dwh.within(1, pools.write.begin()).await?;
                for rows in &parts {
                    write_part(&self.dwh, self.table, Conn::Sqlite(&mut tx), rows, &mut self.outcome).await?;
                }
                self.dwh.within(1, tx.commit()).await?;
            }
        }
        Ok(self.outcome)
    }
}

/// Writes one part of a [`RowsWriter`] in statements bounded as [`Dwh::write`]'s,
/// and counts what it did into `outcome`.
async fn write_part(
    dwh: &Dwh,
    table: Table,
    conn: Conn<'_>,
    rows: &[Row],
    outcome: &mut WriteOutcome,
) -> Result<(), StoreError> {
    let chunks = chunk::plan(rows.iter().map(Row::approx_bytes), dwh.max_rows, dwh.max_bytes)?;
    let mut part = WriteOutcome {
        statements: chunks.len(),
        ..WriteOutcome::default()
    };
    let work = async {
        match conn {
            Conn::Postgres(tx, reserved) => {
                if let (Table::EventsPart, Pool::Postgres(pools)) = (table, &dwh.pool) {
                    dwh.ensure_partitions(&pools.write, rows).await?;
                }
                postgres::write_parts(tx, table.spec(), rows, &chunks, reserved, &mut part).await
            }
            Conn::Sqlite(tx) => sqlite::write_parts(tx, table.spec(), rows, &chunks, &mut part).await,
        }
    };
    // Ids and merges: a few statements per chunk at most.
    dwh.within(4 * chunks.len() as u32 + 2, work).await?;
    part.skipped = rows.len() as u64 - part.inserted - part.updated;
    outcome.absorb(part);
    Ok(())
}

/// A read of one table: equality filters, keyset pagination by `id`.
#[derive(Debug, Clone)]
pub struct ReadQuery {
    pub filters: Vec<(&'static Column, crate::catalogue::Value)>,
    pub after_id: Option<i64>,
    pub limit: u32,
    /// The page stops after the row that takes it over this many bytes of JSON.
    pub max_bytes: usize,
}

/// Rows in id order; `truncated` when the byte bound ended the page before `limit`.
#[derive(Debug, Clone, Default)]
pub struct ReadPage {
    pub rows: Vec<Map<String, Json>>,
    pub truncated: bool,
}

impl ReadPage {
    /// Collects rows from `rows` until `query`'s byte bound is passed: at most one
    /// row over it is held, whatever the rows weigh.
    async fn collect<R, S>(
        query: &ReadQuery,
        rows: S,
        to_json: impl Fn(&R) -> Result<Map<String, Json>, StoreError>,
    ) -> Result<ReadPage, StoreError>
    where
        S: futures_util::Stream<Item = Result<R, sqlx::Error>>,
    {
        use futures_util::StreamExt as _;
        let mut rows = std::pin::pin!(rows);
        let mut page = ReadPage::default();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().await {
            let row = to_json(&row?)?;
            bytes += row
                .iter()
                .map(|(k, v)| k.len() + 4 + crate::catalogue::value::json_len(v))
                .sum::<usize>();
            page.rows.push(row);
            if bytes > query.max_bytes {
                page.truncated = page.rows.len() < query.limit as usize;
                break;
            }
        }
        Ok(page)
    }
}

#[derive(Debug, Clone)]
enum Pool {
    Postgres(Pools<sqlx::Postgres>),
    Sqlite(Pools<sqlx::Sqlite>),
}

/// A handle to the DWH; cheap to clone.
#[derive(Debug, Clone)]
pub struct Dwh {
    pool: Pool,
    max_rows: usize,
    max_bytes: usize,
    /// The server-side limit of one statement; a write may take this long per
    /// statement, plus one, before the client gives up on its connection.
    statement_timeout: Duration,
    /// Months of `events_part` known to have their partition (PostgreSQL).
    partitions: Arc<Mutex<HashSet<NaiveDate>>>,
}

impl Dwh {
    /// Connects a pool. Connections are opened lazily, so this succeeds while the
    /// database is down; [`Dwh::ping`] tells whether it is reachable.
    pub fn connect(config: &DwhConfig) -> Result<Self, StoreError> {
        let pool = match config.database_url.backend() {
            Backend::Postgres => {
                let pool = postgres::pool(config)?;
                Pool::Postgres(Pools {
                    read: pool.clone(),
                    write: pool,
                })
            }
            Backend::Sqlite => Pool::Sqlite(sqlite::pools(config)?),
        };
        Ok(Dwh {
            pool,
            max_rows: config.max_rows_per_insert,
            max_bytes: config.max_write_batch_bytes,
            statement_timeout: config.statement_timeout,
            partitions: Arc::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The statement limits: rows and bytes.
    pub fn limits(&self) -> (usize, usize) {
        (self.max_rows, self.max_bytes)
    }

    /// The bookkeeping statements of this backend.
    fn bookkeeping(&self) -> &dyn Queries {
        match &self.pool {
            Pool::Postgres(pools) => pools,
            Pool::Sqlite(pools) => pools,
        }
    }

    /// Applies the migrations of this backend that are not applied yet, and
    /// returns those a newer release applied that this one does not know
    /// (`version`, `description`). Migrations are additive (see "Schema" in
    /// docs/operations.md), so this release works on their schema, as a
    /// rollback or an old replica during a rollout needs; one whose
    /// description says `breaking` fails the start instead
    /// ([`StoreError::BreakingMigrationAhead`]), before anything is applied.
    pub async fn migrate(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let mut migrator = match &self.pool {
            Pool::Postgres(_) => sqlx::migrate!("./migrations/postgres"),
            Pool::Sqlite(_) => sqlx::migrate!("./migrations/sqlite"),
        };
        let known: HashSet<i64> = migrator.iter().map(|m| m.version).collect();
        // A database never migrated has no table of migrations yet: none ahead.
        let applied = self.bookkeeping().applied_migrations().await.unwrap_or_default();
        let ahead: Vec<(i64, String)> = applied.into_iter().filter(|(v, _)| !known.contains(v)).collect();
        if let Some((version, description)) = ahead.iter().find(|(_, d)| d.to_lowercase().contains("breaking")) {
            return Err(StoreError::BreakingMigrationAhead {
                version: *version,
                description: description.clone(),
            });
        }
        migrator.set_ignore_missing(true);
        match &self.pool {
            Pool::Postgres(pools) => migrator.run(&pools.write).await?,
            Pool::Sqlite(pools) => migrator.run(&pools.write).await?,
        }
        if !ahead.is_empty() {
            let named: Vec<String> = ahead.iter().map(|(v, d)| format!("{v} {d}")).collect();
            crate::telemetry::events::MigrationsAhead { migrations: &named }.emit();
        }
        Ok(ahead)
    }

    /// Checks that the database answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(timeout, self.bookkeeping().ping()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Writes one batch in one transaction; see the module guarantees. A write
    /// whose connection hangs (no answer, not even the server's statement timeout)
    /// is given up after the statement timeout per statement, plus one, and fails
    /// as [`StoreError::Unavailable`]: dropping it rolls the transaction back. The
    /// statements the halving of refused parts adds extend the deadline as they come.
    pub async fn write(&self, batch: Batch<'_>) -> Result<WriteOutcome, StoreError> {
        let max_rows = match batch.origins {
            Some(_) => usize::MAX,
            None => self.max_rows,
        };
        let chunks = chunk::plan(batch.rows.iter().map(Row::approx_bytes), max_rows, self.max_bytes)?;
        // Offsets, rejects, ids and merges: a few statements per chunk at most.
        let budget = Budget::new(4 * chunks.len() as u32 + batch.offsets.len() as u32 + batch.rejects.len() as u32 + 4);
        let work = self.write_within(batch, &chunks, &budget);
        let mut work = std::pin::pin!(work);
        // The deadline grows with the statements the halving of refused parts adds.
        let mut allowed = budget.allowed();
        let mut deadline = tokio::time::Instant::now() + self.statement_timeout.saturating_mul(allowed);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep_until(deadline) => {
                    let now = budget.allowed();
                    if now == allowed {
                        return Err(no_answer(self.statement_timeout.saturating_mul(allowed)));
                    }
                    deadline += self.statement_timeout.saturating_mul(now - allowed);
                    allowed = now;
                }
            }
        }
    }

    /// Runs `work`, giving it up after the statement timeout per statement:
    /// [`StoreError::Unavailable`] when the connection does not answer at all.
    async fn within<T, E: Into<StoreError>>(
        &self,
        statements: u32,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        let limit = self.statement_timeout.saturating_mul(statements);
        match tokio::time::timeout(limit, work).await {
            Ok(done) => done.map_err(Into::into),
            Err(_) => Err(no_answer(limit)),
        }
    }

    /// Opens a write of `table`'s rows in parts, in one transaction: the API's,
    /// whose records are decoded while the parts before them are written. On
    /// PostgreSQL the ids of the `rows` expected are taken from the table's
    /// sequence at once (in one statement, while the first part decodes); a
    /// row beyond them takes its id with its chunk, and ids left unused are
    /// gaps in the sequence, as a rolled-back write leaves.
    pub async fn begin_rows(&self, table: Table, rows: usize) -> Result<RowsWriter, StoreError> {
        let tx = match &self.pool {
            Pool::Postgres(pools) => {
                let mut tx = self.within(1, pools.write.begin()).await?;
                let ids = self.within(1, postgres::take_ids(&mut tx, table.spec(), rows)).await?;
                Tx::Postgres { tx, ids, used: 0 }
            }
            Pool::Sqlite(_) => Tx::Sqlite(Vec::new()),
        };
        Ok(RowsWriter {
            dwh: self.clone(),
            table,
            tx,
            outcome: WriteOutcome::default(),
        })
    }

    async fn write_within(
        &self,
        batch: Batch<'_>,
        chunks: &[std::ops::Range<usize>],
        budget: &Budget,
    ) -> Result<WriteOutcome, StoreError> {
        match &self.pool {
            Pool::Postgres(pools) => {
                if batch.table == Table::EventsPart {
                    self.ensure_partitions(&pools.write, batch.rows).await?;
                }
                postgres::write(&pools.write, batch, chunks, budget).await
            }
            Pool::Sqlite(pools) => sqlite::write(&pools.write, batch, chunks, budget).await,
        }
    }

    /// Reads rows as JSON objects, `id` first, in `id` order.
    pub async fn read(&self, table: Table, query: &ReadQuery) -> Result<ReadPage, StoreError> {
        match &self.pool {
            Pool::Postgres(pools) => postgres::read(&pools.read, table, query).await,
            Pool::Sqlite(pools) => sqlite::read(&pools.read, table, query).await,
        }
    }

    /// The stored `next_offset` of a consumer group's partition, if any.
    pub async fn stored_offset(&self, group_id: &str, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.bookkeeping().stored_offset(group_id, topic, partition).await
    }

    /// Number of rows in one of the seven tables or a `dwh_` bookkeeping table.
    pub async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        const BOOKKEEPING: [&str; 3] = ["dwh_consumer_offsets", "dwh_rejected_records", "dwh_appmetrica_windows"];
        // Only known names reach the SQL text.
        let name = match table.parse::<Table>() {
            Ok(t) => t.name(),
            Err(_) => BOOKKEEPING.into_iter().find(|b| *b == table).ok_or_else(|| {
                StoreError::Database(sqlx::Error::Protocol(format!("count_rows: unknown table {table:?}")))
            })?,
        };
        self.bookkeeping().count(name).await
    }

    /// Creates the month partitions of `events_part` these rows need, before the
    /// batch transaction, so that no row of a month lands in the default partition.
    async fn ensure_partitions(&self, pool: &sqlx::PgPool, rows: &[Row]) -> Result<(), StoreError> {
        let Some(index) = Table::EventsPart.spec().index_of("event_date") else {
            return Ok(());
        };
        let months: HashSet<NaiveDate> = rows
            .iter()
            .filter_map(|r| match &r.values[index] {
                crate::catalogue::Value::Date(d) => d.with_day(1),
                _ => None,
            })
            .collect();
        let missing: Vec<NaiveDate> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            months.into_iter().filter(|m| !known.contains(m)).collect()
        };
        for month in missing {
            let created: bool = sqlx::query_scalar("SELECT dwh_ensure_events_partition($1)")
                .bind(month)
                .fetch_one(pool)
                .await?;
            if created {
                tracing::info!(month = %month.format("%Y-%m"), "created events_part partition");
            }
            self.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(month);
        }
        Ok(())
    }
}
