//! Replays: moving a group's stored offsets, the positions ingest starts from,
//! and the record of every move in `dwh_replays`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Dwh, StoreError, TopicIdentity};

/// One partition of a replay plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlannedOffset {
    pub table: String,
    pub topic: String,
    pub partition: i32,
    /// The stored next offset; `None` when the group never wrote this partition.
    pub current: Option<i64>,
    /// Where ingest reads next once the plan is executed.
    pub new: i64,
    /// The topic id (KIP-516) of the log `new` counts in, when the broker gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    /// The cluster's id, when the broker gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

/// An executed replay, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReplayRecord {
    pub id: i64,
    pub group_id: String,
    pub executed_by: String,
    pub executed_at: DateTime<Utc>,
    pub scenario: String,
    pub plan: Vec<PlannedOffset>,
}

/// A replay to execute: the group whose offsets move, who asks, the scenario
/// and the plan.
#[derive(Debug, Clone, Copy)]
pub(super) struct Replay<'a> {
    pub group: &'a str,
    pub by: &'a str,
    pub scenario: &'a str,
    pub plan: &'a [PlannedOffset],
    /// Topics whose offsets move to a new log (`--adopt-topic`): their rows of
    /// any other log are deleted.
    pub adopt: &'a [(String, TopicIdentity)],
}

impl Dwh {
    /// Sets the stored offsets of `plan` and records the replay, in one
    /// transaction; returns the record's id. The offsets of the topics in
    /// `adopt` move to the log named there: their rows of any other go.
    pub async fn execute_replay(
        &self,
        group_id: &str,
        executed_by: &str,
        scenario: &str,
        plan: &[PlannedOffset],
        adopt: &[(String, TopicIdentity)],
    ) -> Result<i64, StoreError> {
        let replay = Replay {
            group: group_id,
            by: executed_by,
            scenario,
            plan,
            adopt,
        };
        self.bookkeeping().execute_replay(replay).await
    }

    /// The last `limit` replays of `group_id`, newest first.
    pub async fn replays(&self, group_id: &str, limit: i64) -> Result<Vec<ReplayRecord>, StoreError> {
        self.bookkeeping().replays(group_id, limit).await
    }
}
