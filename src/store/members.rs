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

/// Another consumer group whose instances ingest into this DWH.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct OtherGroup {
    pub group: String,
    /// The tables it reads, by name.
    pub tables: Vec<String>,
    /// Its instances, as they name themselves.
    pub members: Vec<String>,
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

    /// The other groups whose instances announced tables within `fresh`: another
    /// deployment writing the same DWH (its offsets and fence are its own), by
    /// group, with the tables it reads and how many instances.
    pub async fn other_groups(&self, group: &str, fresh: Duration) -> Result<Vec<OtherGroup>, StoreError> {
        let since = Utc::now() - chrono::Duration::from_std(fresh).unwrap_or(chrono::Duration::MAX);
        let mut groups: Vec<OtherGroup> = Vec::new();
        for (name, reader) in self.bookkeeping().other_readers(group, since).await? {
            let at = match groups.iter().position(|g| g.group == name) {
                Some(at) => at,
                None => {
                    groups.push(OtherGroup {
                        group: name,
                        tables: Vec::new(),
                        members: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let other = &mut groups[at];
            if !other.tables.contains(&reader.table) {
                other.tables.push(reader.table);
            }
            if !other.members.contains(&reader.member) {
                other.members.push(reader.member);
            }
        }
        Ok(groups)
    }

    /// The instances of `group` that announced a table within `fresh`.
    pub async fn readers(&self, group: &str, fresh: Duration) -> Result<Vec<Reader>, StoreError> {
        let since = Utc::now() - chrono::Duration::from_std(fresh).unwrap_or(chrono::Duration::MAX);
        self.bookkeeping().readers(group, since).await
    }
}
