//! Gaps in what the ingest wrote of a partition: a stored offset moved past
//! records it never wrote (lost to retention, or skipped at the operator's
//! ask), or moved back because the log is behind it. Each is kept in
//! `dwh_offset_gaps`, in the transaction that moves the offset.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why a stored offset moved other than by writing the records between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The records expired from the log before they were written.
    Retention,
    /// The operator asked to go on from the end (`KAFKA_ON_OFFSET_OUT_OF_RANGE=latest`).
    Skipped,
    /// The log ends before the stored offset (the topic recreated or truncated):
    /// reading goes on lower, in what is now there.
    LogBehind,
}

impl GapCause {
    /// As stored, and as the `cause` label of `dwh_helper_records_lost_total`.
    pub fn name(self) -> &'static str {
        match self {
            GapCause::Retention => "retention",
            GapCause::Skipped => "skipped",
            GapCause::LogBehind => "log behind",
        }
    }
}

/// A stored offset moved from `from` to `to` past `records` records never
/// written (none for a move back): kept in `dwh_offset_gaps`, in the
/// transaction that moves the offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetGap {
    pub group_id: String,
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub records: i64,
    pub cause: GapCause,
}

impl OffsetGap {
    /// The gaps of moving `partition`'s stored offset from `stored` to `to`
    /// when the log holds `low..high`: records below `low` expired, those
    /// from `low` to `to` were skipped; a stored offset past `high` is a log
    /// behind it.
    pub fn of_move(
        group_id: &str,
        topic: &str,
        partition: i32,
        stored: i64,
        to: i64,
        (low, high): (i64, i64),
    ) -> Vec<OffsetGap> {
        let gap = |from: i64, to: i64, records: i64, cause: GapCause| OffsetGap {
            group_id: group_id.to_owned(),
            topic: topic.to_owned(),
            partition,
            from,
            to,
            records,
            cause,
        };
        let mut gaps = Vec::new();
        if stored > high {
            gaps.push(gap(stored, to, 0, GapCause::LogBehind));
            return gaps;
        }
        if stored < low {
            gaps.push(gap(stored, low, low - stored, GapCause::Retention));
        }
        let from = stored.max(low);
        if to > from {
            gaps.push(gap(from, to, to - from, GapCause::Skipped));
        }
        gaps
    }
}

/// A gap as stored, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StoredGap {
    pub topic: String,
    pub partition: i32,
    pub from_offset: i64,
    pub to_offset: i64,
    pub records: i64,
    pub cause: String,
    pub noted_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(stored: i64, to: i64, range: (i64, i64)) -> Vec<(i64, i64, i64, GapCause)> {
        OffsetGap::of_move("g", "t", 0, stored, to, range)
            .into_iter()
            .map(|g| (g.from, g.to, g.records, g.cause))
            .collect()
    }

    #[test]
    fn a_move_names_what_expired_what_was_skipped_and_a_move_back() {
        // Below the log, on to its first record: what expired is lost.
        assert_eq!(gaps(5, 40, (40, 100)), vec![(5, 40, 35, GapCause::Retention)]);
        // Below the log, on to its end: expired, then skipped.
        assert_eq!(
            gaps(5, 100, (40, 100)),
            vec![(5, 40, 35, GapCause::Retention), (40, 100, 60, GapCause::Skipped)]
        );
        // Past the log's end, back into it: nothing lost by count, a move back.
        assert_eq!(gaps(500, 0, (0, 100)), vec![(500, 0, 0, GapCause::LogBehind)]);
        assert_eq!(gaps(500, 100, (0, 100)), vec![(500, 100, 0, GapCause::LogBehind)]);
        // Within the log nothing moves, so nothing is a gap.
        assert_eq!(gaps(50, 50, (0, 100)), vec![]);
    }
}
