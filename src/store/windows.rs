//! The AppMetrica windows table: which export windows were fetched and published.

use chrono::{DateTime, Utc};

use super::{Dwh, Pool, StoreError};

/// A window's row in `dwh_appmetrica_windows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRecord {
    pub application_id: i64,
    pub endpoint: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// `running`, `done` or `failed`.
    pub status: String,
    pub rows_fetched: i64,
    pub rows_published: i64,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub fetched_at: Option<DateTime<Utc>>,
}

type Row = (
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

const SELECT: &str = "SELECT application_id, endpoint, window_start, window_end, status, rows_fetched, \
     rows_published, duration_ms, error, fetched_at FROM dwh_appmetrica_windows \
     WHERE application_id = $1 ORDER BY endpoint, window_start";

/// Binds: application, endpoint, start, end, status, fetched, published, duration, error, fetched_at.
const UPSERT: &str = "INSERT INTO dwh_appmetrica_windows (application_id, endpoint, window_start, window_end, \
     status, rows_fetched, rows_published, duration_ms, error, fetched_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (application_id, endpoint, window_start) DO UPDATE SET window_end = excluded.window_end, \
     status = excluded.status, rows_fetched = excluded.rows_fetched, rows_published = excluded.rows_published, \
     duration_ms = excluded.duration_ms, error = excluded.error, fetched_at = excluded.fetched_at";

impl Dwh {
    /// Every window of `application_id`, by endpoint and start.
    pub async fn windows(&self, application_id: i64) -> Result<Vec<WindowRecord>, StoreError> {
        let rows: Vec<Row> = match &self.pool {
            Pool::Postgres(pool) => sqlx::query_as(SELECT).bind(application_id).fetch_all(pool).await?,
            Pool::Sqlite(pools) => {
                sqlx::query_as(SELECT)
                    .bind(application_id)
                    .fetch_all(&pools.read)
                    .await?
            }
        };
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

    /// Records the state of a window (insert or replace).
    pub async fn record_window(&self, w: &WindowRecord) -> Result<(), StoreError> {
        macro_rules! bind_all {
            ($query:expr) => {
                $query
                    .bind(w.application_id)
                    .bind(&w.endpoint)
                    .bind(w.window_start)
                    .bind(w.window_end)
                    .bind(&w.status)
                    .bind(w.rows_fetched)
                    .bind(w.rows_published)
                    .bind(w.duration_ms)
                    .bind(&w.error)
                    .bind(w.fetched_at)
            };
        }
        match &self.pool {
            Pool::Postgres(pool) => bind_all!(sqlx::query(UPSERT)).execute(pool).await?,
            Pool::Sqlite(pools) => {
                bind_all!(sqlx::query(UPSERT)).execute(&pools.write).await?;
                return Ok(());
            }
        };
        Ok(())
    }
}
