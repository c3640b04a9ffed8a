//! `DWH_*`: the database, the statement limits, the events' date window.

use std::time::Duration;

use serde::Deserialize;

use super::parse::{count, seconds, size, MIB};
use super::{ConfigError, DatabaseUrl, DEFAULT_DATABASE_URL};

/// `DWH_`: the warehouse database.
#[derive(Debug, Clone)]
pub struct DwhConfig {
    pub database_url: DatabaseUrl,
    /// No statement carries more bytes of row data than this.
    pub max_write_batch_bytes: usize,
    /// No statement of an API write carries more rows than this (an ingest
    /// batch is bounded by `KAFKA_BATCH_MAX_ROWS` and goes in one statement).
    pub max_rows_per_insert: usize,
    pub pool_size: u32,
    /// PostgreSQL's `statement_timeout` on every connection, and the base of the
    /// client-side limit of a write (a hung connection never holds a batch).
    pub statement_timeout: Duration,
    /// The `event_date`s `events_part` takes (DWH_EVENTS_MIN_DATE, DWH_EVENTS_MAX_DAYS_AHEAD).
    pub events_window: crate::catalogue::DateWindow,
}

/// Every variable as the string the environment holds; empty counts as unset.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawDwh {
    database_url: Option<String>,
    max_write_batch_bytes: Option<String>,
    max_rows_per_insert: Option<String>,
    pool_size: Option<String>,
    statement_timeout_seconds: Option<String>,
    events_min_date: Option<String>,
    events_max_days_ahead: Option<String>,
}

pub(super) fn dwh(raw: RawDwh) -> Result<DwhConfig, ConfigError> {
    let database_url = DatabaseUrl::parse(raw.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL))
        .map_err(|p| ConfigError::new("DWH_DATABASE_URL", p))?;
    Ok(DwhConfig {
        database_url,
        max_write_batch_bytes: size("DWH_MAX_WRITE_BATCH_BYTES", raw.max_write_batch_bytes, 10 * MIB, 1024)?,
        max_rows_per_insert: count("DWH_MAX_ROWS_PER_INSERT", raw.max_rows_per_insert, 1000)?,
        pool_size: count("DWH_POOL_SIZE", raw.pool_size, 16)?
            .try_into()
            .map_err(|_| ConfigError::new("DWH_POOL_SIZE", "is too large"))?,
        statement_timeout: match seconds("DWH_STATEMENT_TIMEOUT_SECONDS", raw.statement_timeout_seconds, 60)? {
            zero if zero.is_zero() => {
                return Err(ConfigError::new("DWH_STATEMENT_TIMEOUT_SECONDS", "must be at least 1"))
            }
            timeout => timeout,
        },
        events_window: crate::catalogue::DateWindow {
            min: match raw.events_min_date.as_deref().map(str::trim) {
                None => crate::catalogue::DateWindow::default().min,
                Some(text) => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .ok()
                    .filter(|d| chrono::Datelike::year(d) >= 1)
                    .ok_or_else(|| {
                        ConfigError::new(
                            "DWH_EVENTS_MIN_DATE",
                            format!("expected a date YYYY-MM-DD, got \"{text}\""),
                        )
                    })?,
            },
            max_days_ahead: count("DWH_EVENTS_MAX_DAYS_AHEAD", raw.events_max_days_ahead, 366)?
                .try_into()
                .ok()
                .filter(|d| *d <= 36_500)
                .ok_or_else(|| ConfigError::new("DWH_EVENTS_MAX_DAYS_AHEAD", "is over 36500 (a century)"))?,
        },
    })
}
