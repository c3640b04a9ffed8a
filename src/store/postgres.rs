//! PostgreSQL: the bulk path.
//!
//! Each chunk first tries a plain `COPY` into the table under a savepoint, with ids
//! taken from the table's sequence up front when the caller wants them back (the
//! API), else left to the column's default (the ingest).
//! When a key already exists (a replay or retry) or the chunk holds two versions of
//! a key, the savepoint is rolled back and the chunk goes through a staging table:
//! `COPY` into it, then one `INSERT … SELECT DISTINCT ON (key) … ON CONFLICT`.
//! Both `COPY`s send binary rows ([`super::pgbinary`]) when the rows are small
//! enough to suit it ([`super::pgbinary::suits`]), else text; text also when a
//! value does not fit its column's binary form.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt::Write as _;
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value as Json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{ConnectOptions as _, Connection, PgConnection, PgPool, Postgres, Row as _};

use super::backend::{self, Bookkeeping as _, RowWriter};
use super::error::is_unique_violation;
use super::{pgbinary, sql, Batch, OffsetAdvance, ReadPage, ReadQuery, StoreError, TopicIdentity, WriteOutcome};
use crate::catalogue::{ColumnType, Row, Table, TableSpec, Value};
use crate::config::DwhConfig;

/// The TLS mode of a URL that names none: `verify-full` for a host reached
/// over the network (libpq's default, `prefer`, would fall back to clear
/// text, credentials included, and check no certificate), libpq's `prefer`
/// for the loopback and a Unix socket. `None`: the URL says (`sslmode`).
fn default_ssl_mode(url: &str) -> Option<PgSslMode> {
    let parsed = url::Url::parse(url).ok()?;
    if parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("sslmode") || k.eq_ignore_ascii_case("ssl-mode"))
    {
        return None;
    }
    let socket = parsed
        .query_pairs()
        .any(|(k, v)| k.eq_ignore_ascii_case("host") && v.starts_with('/'));
    let local = match parsed.host() {
        None => true,
        // A `postgres:` URL's host is opaque to the url crate: an address comes
        // as text.
        Some(url::Host::Domain(name)) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name.is_empty()
                || name.eq_ignore_ascii_case("localhost")
                || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
    };
    Some(if local || socket {
        PgSslMode::Prefer
    } else {
        PgSslMode::VerifyFull
    })
}

pub fn pool(config: &DwhConfig) -> Result<PgPool, StoreError> {
    let url = config.database_url.expose();
    let mut options = PgConnectOptions::from_str(url).map_err(StoreError::Database)?;
    if let Some(mode) = default_ssl_mode(url) {
        options = options.ssl_mode(mode);
    }
    let options = options
        .application_name("dwh-helper")
        // Timestamps travel as UTC whatever the server's default zone. No statement
        // runs for ever: a lock held by someone else or a stuck query fails, and the
        // batch is retried. The server drops a connection whose client went away.
        .options([
            ("timezone", "UTC".to_owned()),
            ("statement_timeout", config.statement_timeout.as_millis().to_string()),
            (
                "idle_in_transaction_session_timeout",
                (config.statement_timeout * 2).as_millis().to_string(),
            ),
            ("tcp_keepalives_idle", "30".to_owned()),
            ("tcp_keepalives_interval", "10".to_owned()),
            ("tcp_keepalives_count", "3".to_owned()),
        ])
        // Slow statements are logged at debug (LOG_LEVEL=info,sqlx=debug shows them).
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
    Ok(PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

pub async fn write(
    pool: &PgPool,
    batch: Batch<'_>,
    chunks: &[Range<usize>],
    budget: &super::Budget,
) -> Result<WriteOutcome, StoreError> {
    let target = Target {
        spec: batch.table.spec(),
        ids: match batch.wants_ids() {
            true => Ids::Taken,
            false => Ids::Unwanted,
        },
    };
    backend::write_batch(pool, &target, batch, chunks, budget).await
}

/// Writes rows of the API (ids wanted) into the open transaction, a statement
/// per chunk; see [`super::RowsWriter`]. `reserved` holds ids taken for these
/// rows ([`take_ids`]), one per row in order; rows past its end take theirs
/// chunk by chunk.
pub(super) async fn write_parts(
    tx: &mut PgConnection,
    spec: &TableSpec,
    rows: &[Row],
    chunks: &[Range<usize>],
    reserved: &[i64],
    outcome: &mut WriteOutcome,
) -> Result<(), StoreError> {
    for range in chunks {
        let ids = reserved.get(range.clone()).map_or(Ids::Taken, Ids::Reserved);
        write_chunk(tx, Target { spec, ids }, &rows[range.clone()], outcome).await?;
    }
    Ok(())
}

/// `n` ids from `spec`'s sequence, ascending: the sequence as a constant,
/// resolved once per statement, not once per row; the ids come back as one
/// array, not a row each, and are put in order here (an `ORDER BY` in the
/// aggregate would sort them on the server, which the writes wait for).
pub(super) async fn take_ids(conn: &mut PgConnection, spec: &TableSpec, n: usize) -> Result<Vec<i64>, sqlx::Error> {
    let mut ids: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT coalesce(array_agg(nextval('{}_id_seq'::regclass)), '{{}}') FROM generate_series(1, $1)",
        spec.name
    ))
    .bind(n as i64)
    .fetch_one(conn)
    .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// Every partition's advance in one statement: rows inserted when absent, moved
/// when they stand at the batch's start; the partitions it moved come back, and
/// any other is fenced, as is a row kept for another log (topic id). Partitions
/// are locked in order, as every writer does. Binds: group, topic, partitions,
/// new offsets, batch starts, topic id, cluster id.
const ADVANCE_OFFSETS: &str = "WITH advance AS (\
       SELECT * FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS a(partition, next_offset, batch_start) \
       ORDER BY partition) \
     INSERT INTO dwh_consumer_offsets (group_id, topic, partition, next_offset, topic_id, cluster_id) \
     SELECT $1, $2, partition, next_offset, $6::text, $7::text FROM advance \
     ON CONFLICT (group_id, topic, partition) DO UPDATE \
     SET next_offset = excluded.next_offset, updated_at = excluded.updated_at, \
     topic_id = COALESCE(excluded.topic_id, dwh_consumer_offsets.topic_id), \
     cluster_id = COALESCE(excluded.cluster_id, dwh_consumer_offsets.cluster_id) \
     WHERE dwh_consumer_offsets.next_offset = \
       (SELECT batch_start FROM advance WHERE advance.partition = excluded.partition) \
     AND (excluded.topic_id IS NULL OR dwh_consumer_offsets.topic_id IS NULL \
       OR dwh_consumer_offsets.topic_id = excluded.topic_id) \
     RETURNING partition";

async fn advance_offsets(
    conn: &mut PgConnection,
    advances: &[OffsetAdvance],
    identity: Option<&TopicIdentity>,
) -> Result<(), StoreError> {
    let Some(first) = advances.first() else {
        return Ok(());
    };
    debug_assert!(advances
        .iter()
        .all(|a| a.group_id == first.group_id && a.topic == first.topic));
    let column = |f: fn(&OffsetAdvance) -> i64| advances.iter().map(f).collect::<Vec<i64>>();
    let partitions: Vec<i32> = advances.iter().map(|a| a.partition).collect();
    let moved: Vec<i32> = sqlx::query_scalar(ADVANCE_OFFSETS)
        .bind(&first.group_id)
        .bind(&first.topic)
        .bind(&partitions)
        .bind(column(|a| a.to))
        .bind(column(|a| a.from))
        .bind(identity.map(|i| i.topic_id.as_str()))
        .bind(identity.and_then(|i| i.cluster_id.as_deref()))
        .fetch_all(&mut *conn)
        .await?;
    if moved.len() == advances.len() {
        return Ok(());
    }
    let Some(fenced) = advances.iter().find(|a| !moved.contains(&a.partition)) else {
        return Ok(());
    };
    Err(Postgres::fenced(conn, fenced).await)
}

/// Takes `table`'s write lock until the transaction ends: the lock every
/// INSERT takes, which holds up no other writer, only DDL.
async fn hold_table(conn: &mut PgConnection, table: &str) -> Result<(), StoreError> {
    let statement = format!("LOCK TABLE {table} IN ROW EXCLUSIVE MODE");
    sqlx::query(&statement).execute(&mut *conn).await?;
    Ok(())
}

#[async_trait::async_trait]
impl RowWriter<Postgres> for Target<'_> {
    async fn advance_offsets(
        &self,
        conn: &mut PgConnection,
        advances: &[OffsetAdvance],
        identity: Option<&TopicIdentity>,
    ) -> Result<(), StoreError> {
        advance_offsets(conn, advances, identity).await
    }

    async fn hold_table(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        hold_table(conn, self.spec.name).await
    }

    async fn write_rows(
        &self,
        conn: &mut PgConnection,
        rows: &[Row],
        outcome: &mut WriteOutcome,
    ) -> Result<(), StoreError> {
        write_chunk(conn, *self, rows, outcome).await
    }
}

/// COPY text of the rows, each line prefixed by its `prefixes` value (the id or
/// ordinal) when given.
fn copy_text<R: Borrow<Row>>(rows: &[R], mut prefixes: Option<impl Iterator<Item = i64>>) -> String {
    let mut out = String::with_capacity(rows.iter().map(|r| r.borrow().approx_bytes() + 24).sum());
    for row in rows {
        let row = row.borrow();
        let mut separator = "";
        if let Some(prefix) = prefixes.as_mut().and_then(Iterator::next) {
            let _ = write!(out, "{prefix}"); // writing to a String cannot fail
            separator = "\t";
        }
        for value in &row.values {
            out.push_str(separator);
            separator = "\t";
            sql::push_copy_value(&mut out, value);
        }
        out.push('\n');
    }
    out
}

/// A `COPY ... FROM STDIN` statement and its data: binary when the rows suit it
/// ([`pgbinary::suits`]), so the database parses no text, else text; text also
/// when a value does not fit its column's binary form (the database then names
/// the value, as for any bad row).
fn copy_data<R: Borrow<Row>>(
    spec: &TableSpec,
    statement: String,
    rows: &[R],
    prefixes: Option<impl Iterator<Item = i64> + Clone>,
) -> (String, Vec<u8>) {
    let binary = match pgbinary::suits(rows) {
        true => pgbinary::encode(spec, rows, prefixes.clone()),
        false => None,
    };
    match binary {
        Some(data) => (format!("{statement} (FORMAT binary)"), data),
        None => (statement, copy_text(rows, prefixes).into_bytes()),
    }
}

async fn copy_in(conn: &mut PgConnection, (statement, data): (String, Vec<u8>)) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(&statement).await?;
    copy.send(data).await?;
    copy.finish().await
}

/// `rows` sorted by `spec`'s natural key. Two rows of one key make the `COPY`
/// fail whatever their order (the staging path then takes `rows` as they came),
/// so the sort need not keep them in order.
fn in_key_order<'r>(spec: &TableSpec, rows: &'r [Row]) -> Vec<&'r Row> {
    let key: Vec<(usize, bool)> = spec
        .key
        .iter()
        .filter_map(|name| spec.index_of(name))
        .map(|i| (i, !spec.columns[i].required))
        .collect();
    let full = |a: &Row, b: &Row| {
        key.iter()
            .map(|&(i, _)| key_order(&a.values[i], &b.values[i]))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    };
    // Sorted by a prefix held beside each row, so that most comparisons touch
    // neither row; rows whose prefixes are equal are compared in full.
    let mut ordered: Vec<(u128, &Row)> = rows.iter().map(|row| (key_prefix(&key, row), row)).collect();
    ordered.sort_unstable_by(|(pa, a), (pb, b)| pa.cmp(pb).then_with(|| full(a, b)));
    ordered.into_iter().map(|(_, row)| row).collect()
}

/// The first 16 bytes of an order-preserving encoding of `row`'s key columns
/// (`key`: each column's position, and whether it may be NULL): two rows whose
/// prefixes differ are ordered by [`key_order`] as their prefixes are. A
/// column that may be NULL starts with a tag (NULL first); integers and dates
/// are their big-endian bytes with the sign flipped, text its bytes. The
/// encoding stops after a text (its length varies), at a kind it does not
/// cover, and at a NULL in a column without a tag (all zeros from there: no
/// more than any value).
fn key_prefix(key: &[(usize, bool)], row: &Row) -> u128 {
    let mut bytes = [0u8; 16];
    let mut at = 0;
    let mut put = |part: &[u8]| {
        let n = part.len().min(bytes.len() - at);
        bytes[at..at + n].copy_from_slice(&part[..n]);
        at += n;
        at < bytes.len()
    };
    for &(i, nullable) in key {
        let value = &row.values[i];
        if nullable && !put(&[u8::from(!value.is_null())]) {
            break;
        }
        let more = match value {
            Value::Int(v) => put(&(v ^ i64::MIN).to_be_bytes()),
            Value::Date(d) => put(&(chrono::Datelike::num_days_from_ce(d) ^ i32::MIN).to_be_bytes()),
            Value::Text(t) => {
                put(t.as_bytes());
                false
            }
            Value::Null => nullable,
            _ => false,
        };
        if !more {
            break;
        }
    }
    u128::from_be_bytes(bytes)
}

/// The order of two values of one key column (NULLs first); values of two
/// different kinds, which one column never holds, are equal here.
fn key_order(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        (Value::Int(a), Value::Int(b)) => a.cmp(b),
        (Value::Text(a), Value::Text(b)) => a.cmp(b),
        (Value::Date(a), Value::Date(b)) => a.cmp(b),
        (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
        (Value::TimestampTz(a), Value::TimestampTz(b)) => a.cmp(b),
        (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
        (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
        _ => Ordering::Equal,
    }
}

/// What a chunk is written for: the table, and whether the caller wants the
/// inserted rows' ids (the API answers with them; the ingest only counts).
#[derive(Clone, Copy)]
struct Target<'a> {
    spec: &'a TableSpec,
    ids: Ids<'a>,
}

/// Where a chunk's ids come from.
#[derive(Clone, Copy)]
enum Ids<'a> {
    /// Not wanted: the column's default assigns them.
    Unwanted,
    /// Taken from the sequence for the chunk, before its `COPY`.
    Taken,
    /// Taken before, one per row of the chunk.
    Reserved(&'a [i64]),
}

async fn write_chunk(
    tx: &mut PgConnection,
    Target { spec, ids }: Target<'_>,
    rows: &[Row],
    outcome: &mut WriteOutcome,
) -> Result<(), StoreError> {
    let want_ids = !matches!(ids, Ids::Unwanted);
    let ids: Vec<i64> = match ids {
        Ids::Unwanted => Vec::new(),
        Ids::Taken => take_ids(tx, spec, rows.len()).await?,
        Ids::Reserved(ids) => ids.to_vec(),
    };
    let copy = match want_ids {
        true => copy_data(spec, sql::copy_into_table(spec, true), rows, Some(ids.iter().copied())),
        // In key order: the inserts walk the key's index in order instead of
        // jumping about it (the ids the column default gives follow).
        false => copy_data(
            spec,
            sql::copy_into_table(spec, false),
            &in_key_order(spec, rows),
            None::<std::iter::Empty<i64>>,
        ),
    };
    let mut savepoint = tx.begin().await?;
    match copy_in(&mut savepoint, copy).await {
        Ok(_) => {
            savepoint.commit().await?;
            outcome.inserted += rows.len() as u64;
            outcome.inserted_ids.extend(ids);
            return Ok(());
        }
        Err(e) if is_unique_violation(&e) => savepoint.rollback().await?,
        Err(e) => return Err(e.into()),
    }
    // Some key exists already, or appears twice in the chunk: merge through staging.
    sqlx::query(&sql::create_stage(spec)).execute(&mut *tx).await?;
    sqlx::query(&format!("TRUNCATE {}", sql::stage_name(spec)))
        .execute(&mut *tx)
        .await?;
    copy_in(tx, copy_data(spec, sql::copy_into_stage(spec), rows, Some(0..))).await?;
    let merged = sqlx::query(&sql::merge_stage(spec)).fetch_all(&mut *tx).await?;
    for row in merged {
        if row.try_get::<bool, _>("inserted")? {
            outcome.inserted += 1;
            if want_ids {
                outcome.inserted_ids.push(row.try_get("id")?);
            }
        } else {
            outcome.updated += 1;
        }
    }
    Ok(())
}

/// The select expression of a column, cast where the Rust side reads text.
fn select_expr(name: &str, ty: ColumnType) -> String {
    match ty {
        ColumnType::Int => format!("{name}::bigint AS {name}"),
        ColumnType::Numeric20 | ColumnType::Uuid | ColumnType::Json => format!("{name}::text AS {name}"),
        _ => name.to_owned(),
    }
}

pub async fn read(pool: &PgPool, table: Table, query: &ReadQuery) -> Result<ReadPage, StoreError> {
    let spec = table.spec();
    let columns: Vec<String> = spec.columns.iter().map(|c| select_expr(c.name, c.ty)).collect();
    let mut conditions = Vec::new();
    for (i, (column, _)) in query.filters.iter().enumerate() {
        conditions.push(format!("{} = ${}::{}", column.name, i + 1, column.ty.pg_type()));
    }
    let n = query.filters.len();
    conditions.push(format!("id > ${}", n + 1));
    let statement = format!(
        "SELECT id, {}, ingested_at FROM {} WHERE {} ORDER BY id LIMIT ${}",
        columns.join(", "),
        spec.name,
        conditions.join(" AND "),
        n + 2
    );
    let mut q = sqlx::query(&statement);
    for (_, value) in &query.filters {
        q = q.bind(value.canonical_text());
    }
    let rows = q
        .bind(query.after_id.unwrap_or(i64::MIN))
        .bind(i64::from(query.limit))
        .fetch(pool);
    ReadPage::collect(query, rows, |row| to_json(spec, row)).await
}

fn to_json(spec: &TableSpec, row: &PgRow) -> Result<Map<String, Json>, StoreError> {
    backend::row_json(spec, row, other_value, |row| {
        Ok(Value::TimestampTz(row.try_get("ingested_at")?))
    })
}

/// A column of a type other than a number or a boolean, as PostgreSQL keeps it.
fn other_value(row: &PgRow, ty: ColumnType, name: &str) -> Result<Option<Value>, StoreError> {
    Ok(match ty {
        ColumnType::Date => row.try_get::<Option<NaiveDate>, _>(name)?.map(Value::Date),
        ColumnType::Timestamp => row.try_get::<Option<NaiveDateTime>, _>(name)?.map(Value::Timestamp),
        ColumnType::TimestampTz => row.try_get::<Option<DateTime<Utc>>, _>(name)?.map(Value::TimestampTz),
        ColumnType::Json => row
            .try_get::<Option<String>, _>(name)?
            .map(|text| serde_json::from_str(&text).map(Value::Json))
            .transpose()
            .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?,
        // Text, numeric(20) and UUIDs are read as text (the numbers and booleans
        // are read before).
        _ => row.try_get::<Option<&str>, _>(name)?.map(|t| Value::Text(t.into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_host_is_verified_by_default_and_the_loopback_is_not_forced() {
        let mode = |url: &str| default_ssl_mode(url).map(|m| format!("{m:?}"));
        assert_eq!(
            mode("postgres://u:p@db.example.com:5432/dwh").as_deref(),
            Some("VerifyFull")
        );
        assert_eq!(mode("postgres://u@10.0.0.5/dwh").as_deref(), Some("VerifyFull"));
        assert_eq!(mode("postgres://u@127.0.0.1:5432/dwh").as_deref(), Some("Prefer"));
        assert_eq!(mode("postgres://u@localhost/dwh").as_deref(), Some("Prefer"));
        assert_eq!(mode("postgres://u@[::1]/dwh").as_deref(), Some("Prefer"));
        assert_eq!(
            mode("postgres:///dwh?host=/var/run/postgresql").as_deref(),
            Some("Prefer")
        );
        // What the URL says wins, whatever the host.
        assert_eq!(mode("postgres://u@db.example.com/dwh?sslmode=require"), None);
        assert_eq!(mode("postgres://u@db.example.com/dwh?sslmode=disable"), None);
    }
    use crate::catalogue::{decode_json, Table};

    #[test]
    fn the_key_prefix_orders_as_the_full_key_does() {
        // Keys of an integer (NULLs, negatives, extremes), a date (before the
        // epoch and the era), a text (empty, control characters, sharing
        // prefixes longer than the 16 bytes) and an int, in three orders:
        // many ties, so both the prefix and the full comparison decide some pairs.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
        enum Part {
            Null,
            Int(i64),
            Date(NaiveDate),
            Text(String),
        }
        let spec = Table::EventsPart.spec();
        let sessions = [
            None,
            Some(i64::MIN),
            Some(-5),
            Some(-1),
            Some(0),
            Some(3),
            Some(i64::MAX),
        ];
        let dates =
            ["0001-01-01", "1969-12-31", "1970-01-01", "2024-03-01"].map(|d| NaiveDate::from_str(d).expect("a date"));
        let profiles = [
            None,
            Some(""),
            Some("a"),
            Some("a\u{1}\u{5}"),
            Some("ab"),
            Some("b"),
            Some("abcdefghijkl"),
            Some("abcdefghijklmnopq"),
            Some("abcdefghijklmnopz"),
        ];
        let base = decode_json(Table::EventsPart, crate::sample::record(Table::EventsPart, 1))
            .expect("a sample decodes")
            .row;
        let mut state = 7u64;
        let mut pick = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        let rows: Vec<Row> = (0..3000)
            .map(|_| {
                let mut row = base.clone();
                let mut set = |name: &str, value: Value| row.values[spec.index_of(name).unwrap()] = value;
                set(
                    "session_id",
                    sessions[pick(sessions.len())].map_or(Value::Null, Value::Int),
                );
                set("event_date", Value::Date(dates[pick(dates.len())]));
                set(
                    "profile_id",
                    profiles[pick(profiles.len())].map_or(Value::Null, |t| Value::Text(t.into())),
                );
                // dup_seq may not be NULL, so it has no tag: a NULL there (which
                // decoding never lets through) must still sort first.
                set(
                    "dup_seq",
                    [Value::Null, Value::Int(-1), Value::Int(0), Value::Int(1)][pick(4)].clone(),
                );
                row
            })
            .collect();
        let orders: [&'static [&'static str]; 3] = [
            &["session_id", "event_date", "profile_id", "dup_seq"],
            &["profile_id", "dup_seq", "session_id", "event_date"],
            &["dup_seq", "event_date", "session_id", "profile_id"],
        ];
        for key in orders {
            let keyed = TableSpec { key, ..*spec };
            let parts = |row: &Row| -> Vec<Part> {
                key.iter()
                    .map(|name| match &row.values[spec.index_of(name).unwrap()] {
                        Value::Null => Part::Null,
                        Value::Int(n) => Part::Int(*n),
                        Value::Date(d) => Part::Date(*d),
                        Value::Text(t) => Part::Text(t.to_string()),
                        other => panic!("{other:?} in a key"),
                    })
                    .collect()
            };
            let ordered: Vec<Vec<Part>> = in_key_order(&keyed, &rows).into_iter().map(parts).collect();
            let mut expected: Vec<Vec<Part>> = rows.iter().map(parts).collect();
            expected.sort();
            assert_eq!(ordered, expected, "{key:?}");
        }
    }

    #[test]
    fn rows_go_in_key_order() {
        let spec = Table::EventsPart.spec();
        let mut rows: Vec<Row> = crate::sample::records(Table::EventsPart, 200, 3)
            .into_iter()
            .map(|record| decode_json(Table::EventsPart, record).expect("a sample decodes").row)
            .collect();
        // Two applications, and a key column left NULL, which sorts first.
        for (i, row) in rows.iter_mut().enumerate() {
            row.values[spec.index_of("application_id").unwrap()] = Value::Int(i as i64 % 2);
        }
        rows[150].values[spec.index_of("dup_seq").unwrap()] = Value::Null;
        let key = |row: &Row| -> Vec<String> {
            spec.key
                .iter()
                .map(|name| match &row.values[spec.index_of(name).unwrap()] {
                    Value::Null => String::new(),
                    Value::Int(n) => format!("{n:020}"),
                    Value::Date(d) => d.to_string(),
                    Value::Text(t) => t.to_string(),
                    other => panic!("{other:?} in a key"),
                })
                .collect()
        };
        let ordered: Vec<Vec<String>> = in_key_order(spec, &rows).into_iter().map(key).collect();
        let mut expected: Vec<Vec<String>> = rows.iter().map(key).collect();
        expected.sort();
        assert_eq!(ordered, expected);
        assert_ne!(
            rows.iter().map(key).collect::<Vec<_>>(),
            expected,
            "the sample was not in order"
        );
    }
}
