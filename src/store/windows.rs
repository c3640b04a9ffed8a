//! The AppMetrica windows table: which export windows were fetched and published.

use chrono::{DateTime, Utc};

use super::{Dwh, StoreError};

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

impl Dwh {
    /// Every window of `application_id`, by endpoint and start.
    pub async fn windows(&self, application_id: i64) -> Result<Vec<WindowRecord>, StoreError> {
        self.bookkeeping().windows(application_id).await
    }

    /// Records the state of a window (insert or replace).
    pub async fn record_window(&self, w: &WindowRecord) -> Result<(), StoreError> {
        self.bookkeeping().record_window(w).await
    }
}
