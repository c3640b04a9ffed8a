//! Which ingest instances read which tables now: each announces its tables every
//! few seconds, so that `replay --execute` can refuse while one is active, on any
//! broker (librdkafka's mock cluster does not describe groups).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Dwh, StoreError};
use crate::catalogue::Table;

/// An instance reading a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    pub table: String,
    pub member: String,
    pub seen_at: DateTime<Utc>,
}

impl Dwh {
    /// Records that `member` reads `tables` for `group`, now.
    pub async fn announce_member(&self, group: &str, tables: &[Table], member: &str) -> Result<(), StoreError> {
        self.bookkeeping().announce_member(group, tables, member).await
    }

    /// Forgets `member` (it stopped reading).
    pub async fn leave_member(&self, group: &str, member: &str) -> Result<(), StoreError> {
        self.bookkeeping().leave_member(group, member).await
    }

    /// The instances of `group` that announced a table within `fresh`.
    pub async fn readers(&self, group: &str, fresh: Duration) -> Result<Vec<Reader>, StoreError> {
        let since = Utc::now() - chrono::Duration::from_std(fresh).unwrap_or(chrono::Duration::MAX);
        self.bookkeeping().readers(group, since).await
    }
}
