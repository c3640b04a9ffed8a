//! When a partition is stalled: records wait for it and nothing moves them,
//! whatever stopped it, including a cause nobody has met yet, and whichever
//! instance of the group holds it. Two readings of one rule:
//!
//! - [`Watch`], the running instance's watchdog: records have waited past the
//!   DWH's stored offset, and the offset has not moved, for the whole window
//!   by the instance's own clock (a record's Kafka timestamp is the producer's
//!   to set, and a backfill sets old ones; and a start has to see its first
//!   batch land before it can say anything);
//! - [`stalled`], for `dwh-helper status`, which runs once and remembers
//!   nothing: from the sources of truth alone. A partition is stalled when all
//!   of these hold:
//! - the broker has records past the DWH's stored offset (from the first
//!   record held, when nothing is stored);
//! - the oldest of them is older than the window (`KAFKA_STALL_AFTER_SECONDS`):
//!   a partition that was idle and just received a record is not stalled;
//! - nothing landed within the window: the stored offset last moved before it,
//!   or never. A backlog being worked through is not a stall: its batches land.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// The running instance's watchdog: since when each partition has had records
/// waiting while its stored offset stayed where it is.
#[derive(Debug, Default)]
pub struct Watch {
    waiting: HashMap<(String, i32), (Option<i64>, Instant)>,
}

impl Watch {
    /// One reading of a partition at `now`: why it is stalled, if records have
    /// waited past its stored offset for `window` while the offset stood still.
    pub fn observe(
        &mut self,
        (topic, partition): (&str, i32),
        stored: Option<i64>,
        (low, high): (i64, i64),
        now: Instant,
        window: Duration,
    ) -> Option<String> {
        let begin = stored.unwrap_or(low).max(low);
        let waiting = high - begin;
        let key = (topic.to_owned(), partition);
        if waiting <= 0 {
            self.waiting.remove(&key);
            return None;
        }
        let since = self.waiting.entry(key).or_insert((stored, now));
        if since.0 != stored {
            *since = (stored, now);
        }
        let waited = now.saturating_duration_since(since.1);
        (waited >= window).then(|| {
            format!(
                "{waiting} records wait from offset {begin}; nothing landed for {} s",
                waited.as_secs()
            )
        })
    }
}

/// What the sources of truth say of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// The DWH's stored next offset and when it last moved, if any.
    pub stored: Option<(i64, DateTime<Utc>)>,
    /// The broker's `(low, high)` watermarks.
    pub range: (i64, i64),
    /// The first offset whose record is at most the window old (the broker's
    /// answer by time); `None` when every record is older.
    pub fresh_from: Option<i64>,
}

/// Why `p` is stalled at `now` for a window of `window_secs`, or `None`.
pub fn stalled(p: &Partition, now: DateTime<Utc>, window_secs: u64) -> Option<String> {
    let (low, high) = p.range;
    let begin = p.stored.map_or(low, |(next, _)| next).max(low);
    let waiting = high - begin;
    if waiting <= 0 {
        return None;
    }
    let oldest_is_old = p.fresh_from.is_none_or(|fresh| begin < fresh);
    let since = now - chrono::Duration::seconds(window_secs as i64);
    let landed_recently = p.stored.is_some_and(|(_, moved)| moved >= since);
    if !oldest_is_old || landed_recently {
        return None;
    }
    let landed = match p.stored {
        Some((_, moved)) => format!("nothing landed since {}", moved.format("%Y-%m-%dT%H:%M:%SZ")),
        None => "nothing ever landed".to_owned(),
    };
    Some(format!(
        "{waiting} records wait from offset {begin}, the oldest for over {window_secs} s; {landed}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_stalls_a_partition_whose_offset_stands_while_records_wait() {
        let mut watch = Watch::default();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let window = Duration::from_secs(60);
        let p = ("dwh.t", 0);
        // A start (or a backfill of old records): not stalled until a window passed.
        assert_eq!(watch.observe(p, None, (0, 100), at(0), window), None);
        assert_eq!(watch.observe(p, None, (0, 150), at(59), window), None);
        let why = watch.observe(p, None, (0, 150), at(60), window).expect("stalled");
        assert_eq!(why, "150 records wait from offset 0; nothing landed for 60 s");
        // A batch lands: the offset moved, the wait starts again.
        assert_eq!(watch.observe(p, Some(100), (0, 150), at(61), window), None);
        assert_eq!(watch.observe(p, Some(100), (0, 150), at(120), window), None);
        assert!(watch.observe(p, Some(100), (0, 150), at(121), window).is_some());
        // Caught up: forgotten; records that come later wait from then.
        assert_eq!(watch.observe(p, Some(150), (0, 150), at(200), window), None);
        assert_eq!(watch.observe(p, Some(150), (0, 160), at(300), window), None);
        assert!(watch.observe(p, Some(150), (0, 160), at(360), window).is_some());
        // Partitions are watched apart.
        assert_eq!(watch.observe(("dwh.t", 1), Some(150), (0, 160), at(360), window), None);
    }

    fn at(secs_ago: i64, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::seconds(secs_ago)
    }

    #[test]
    fn a_stall_needs_old_waiting_records_and_nothing_landed() {
        let now = Utc::now();
        // Stored at 100 ten minutes ago, the log at 150, every record older than
        // the window: stalled.
        let stuck = Partition {
            stored: Some((100, at(600, now))),
            range: (0, 150),
            fresh_from: None,
        };
        let why = stalled(&stuck, now, 300).expect("stalled");
        assert!(why.starts_with("50 records wait from offset 100"), "{why}");
        assert!(why.contains("nothing landed since"), "{why}");

        // The same, with a batch landed a minute ago: a backlog worked through.
        let moving = Partition {
            stored: Some((100, at(60, now))),
            ..stuck
        };
        assert_eq!(stalled(&moving, now, 300), None);

        // Idle for long, and the waiting records are new: not yet.
        let woken = Partition {
            fresh_from: Some(100),
            ..stuck
        };
        assert_eq!(stalled(&woken, now, 300), None);
        // Only the records from 120 are new: 100..120 wait too long.
        let part_new = Partition {
            fresh_from: Some(120),
            ..stuck
        };
        assert!(stalled(&part_new, now, 300).is_some());

        // Caught up, however long ago.
        let caught_up = Partition {
            range: (0, 100),
            ..stuck
        };
        assert_eq!(stalled(&caught_up, now, 300), None);
    }

    #[test]
    fn a_partition_never_written_waits_from_its_first_record() {
        let now = Utc::now();
        let never = Partition {
            stored: None,
            range: (40, 100),
            fresh_from: None,
        };
        let why = stalled(&never, now, 60).expect("stalled");
        assert!(why.starts_with("60 records wait from offset 40"), "{why}");
        assert!(why.ends_with("nothing ever landed"), "{why}");
        // An empty log (or one whose records expired) has nothing waiting.
        let empty = Partition {
            range: (100, 100),
            ..never
        };
        assert_eq!(stalled(&empty, now, 60), None);
        // A stored offset below the log's start counts from the start.
        let behind = Partition {
            stored: Some((10, at(3600, now))),
            ..never
        };
        let why = stalled(&behind, now, 60).expect("stalled");
        assert!(why.starts_with("60 records wait from offset 40"), "{why}");
    }
}
