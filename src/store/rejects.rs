//! The rejects table for operators: list, mark requeued, purge.
//!
//! Rejects are never deleted by the pipeline. A requeue marks the rows it sent
//! (`requeued_at`), so that a second requeue does not send them again.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Dwh, StoreError};
use crate::catalogue::Table;

/// Which rejects of a table an operator means.
#[derive(Debug, Clone, Default)]
pub struct RejectFilter {
    /// Case-insensitive text the reason contains.
    pub reason: Option<String>,
    /// Rejected at or after.
    pub since: Option<DateTime<Utc>>,
    /// Only those not requeued yet, nor refused by the producer when they were
    /// (unless `retry_refused`).
    pub pending_only: bool,
    /// With `pending_only`: those the producer refused too.
    pub retry_refused: bool,
    /// Only ids above this one (a cursor: results come in id order).
    pub after_id: i64,
    /// Only ids up to this one (what existed when a requeue began).
    pub max_id: Option<i64>,
    pub limit: Option<i64>,
}

/// A row of `dwh_rejected_records`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredReject {
    pub id: i64,
    pub table: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub reason: String,
    pub rejected_at: DateTime<Utc>,
    pub requeued_at: Option<DateTime<Utc>>,
    /// Why the producer refused to send it again, if it did.
    pub requeue_error: Option<String>,
    /// The topic id of the log it came from, when known: a topic created again
    /// under the same name counts its offsets anew, and its rejects are its own.
    pub topic_id: Option<String>,
}

impl Dwh {
    /// The rejects of `table` that match `filter`, oldest first.
    pub async fn rejects(&self, table: Table, filter: &RejectFilter) -> Result<Vec<StoredReject>, StoreError> {
        self.bookkeeping().rejects(table, filter).await
    }

    /// The highest reject id so far (0 with none).
    pub async fn last_reject_id(&self) -> Result<i64, StoreError> {
        self.bookkeeping().last_reject_id().await
    }

    /// Marks the rejects `ids` requeued now; returns how many were not marked yet.
    pub async fn mark_requeued(&self, ids: &[i64]) -> Result<u64, StoreError> {
        self.bookkeeping().mark_requeued(ids).await
    }

    /// Keeps why the producer refused to send reject `id` again.
    pub async fn mark_requeue_refused(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        self.bookkeeping().mark_requeue_refused(id, reason).await
    }

    /// Deletes the rejects of `table` rejected before `before`; returns how many.
    pub async fn purge_rejects(&self, table: Table, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.bookkeeping().purge_rejects(table, before).await
    }
}
