//! The batcher: collects decoded rows and rejected records of one topic until a
//! batch closes, and says which offset range of each partition the batch covers.
//!
//! Guarantees (pure, no I/O): a batch closes at `max_rows` records, `max_bytes`
//! bytes or `linger` after its first record, whichever comes first; a batch that
//! follows a full one may also close [`DRAIN_IDLE`] after its last record (the
//! end of a backlog: see [`Batcher::drained_at`]); for every
//! partition it covers, the batch starts at the position the consumer stood at
//! (the stored `next_offset`) and ends one past its last record, so consecutive
//! batches of a partition chain without gap or overlap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::catalogue::Row;
pub use crate::store::Origin;
use crate::store::{OffsetAdvance, RejectedRecord};

/// How long a batch that follows a full one waits after its last record before
/// it counts as drained: a backlog or burst has ended, and what is left of it
/// need not wait out the linger for records that are not coming. Below the
/// rows and bytes bounds (light traffic) a batch never follows a full one, so
/// the linger alone decides there.
pub const DRAIN_IDLE: Duration = Duration::from_millis(50);

/// When a batch closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

/// One partition's part of a batch: `from` is where the batch starts (the stored
/// position), `to` one past its last record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: i64,
    pub to: i64,
}

/// A decoded record or a rejected one.
#[derive(Debug)]
pub enum Entry {
    Row(Row),
    Reject(RejectedRecord),
}

/// The open batch.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    batch: Closed,
    bytes: usize,
    opened_at: Option<Instant>,
    last_push: Option<Instant>,
    /// The batch taken before this one was full.
    after_full: bool,
}

/// A closed batch, ready to write.
#[derive(Debug, Default)]
pub struct Closed {
    pub rows: Vec<Row>,
    pub origins: Vec<Origin>,
    pub rejects: Vec<RejectedRecord>,
    pub spans: BTreeMap<i32, Span>,
    pub bytes: usize,
    /// The Kafka timestamp (ms) of each partition's last record, where it has one.
    pub timestamps: BTreeMap<i32, i64>,
}

impl Closed {
    pub fn records(&self) -> usize {
        self.rows.len() + self.rejects.len()
    }

    /// The fenced offset advances that commit this batch.
    pub fn offsets(&self, group_id: &str, topic: &str) -> Vec<OffsetAdvance> {
        self.spans
            .iter()
            .map(|(&partition, span)| OffsetAdvance {
                group_id: group_id.to_owned(),
                topic: topic.to_owned(),
                partition,
                from: span.from,
                to: span.to,
            })
            .collect()
    }
}

impl Batcher {
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            batch: Closed::default(),
            bytes: 0,
            opened_at: None,
            last_push: None,
            after_full: false,
        }
    }

    /// Adds the record at `offset` of `partition`. `position` is where the consumer
    /// stands in that partition before this record (`None` when no offset is
    /// stored yet: the partition then starts at this record).
    pub fn push(
        &mut self,
        partition: i32,
        position: Option<i64>,
        offset: i64,
        bytes: usize,
        entry: Entry,
        now: Instant,
    ) {
        let span = self.batch.spans.entry(partition).or_insert_with(|| Span {
            from: position.unwrap_or(offset),
            to: offset,
        });
        debug_assert!(offset >= span.to, "records of a partition arrive in offset order");
        span.to = offset + 1;
        match entry {
            Entry::Row(row) => {
                self.batch.rows.push(row);
                self.batch.origins.push(Origin { partition, offset });
            }
            Entry::Reject(reject) => self.batch.rejects.push(reject),
        }
        self.bytes += bytes;
        self.opened_at.get_or_insert(now);
        self.last_push = Some(now);
    }

    pub fn is_empty(&self) -> bool {
        self.batch.spans.is_empty()
    }

    /// Whether the batch is full by rows or bytes.
    pub fn is_full(&self) -> bool {
        self.batch.records() >= self.limits.max_rows || self.bytes >= self.limits.max_bytes
    }

    /// When the linger time of the open batch runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.limits.linger)
    }

    /// When the open batch counts as drained, if it follows a full batch:
    /// [`DRAIN_IDLE`] (at most the linger) after its last record. The caller
    /// closes it then only if no records are waiting to be added.
    pub fn drained_at(&self) -> Option<Instant> {
        let idle = DRAIN_IDLE.min(self.limits.linger);
        self.last_push.filter(|_| self.after_full).map(|last| last + idle)
    }

    /// Whether the batch should be written now.
    pub fn should_close(&self, now: Instant) -> bool {
        self.is_full() || self.deadline().is_some_and(|deadline| now >= deadline)
    }

    /// Notes the Kafka timestamp of `partition`'s latest record (for lag in time).
    pub fn stamp(&mut self, partition: i32, timestamp_ms: i64) {
        self.batch.timestamps.insert(partition, timestamp_ms);
    }

    /// Records in the open batch.
    pub fn records(&self) -> usize {
        self.batch.records()
    }

    /// The offset after the last record of `partition` in the open batch.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.batch.spans.get(&partition).map(|span| span.to)
    }

    /// The partitions the open batch covers.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.batch.spans.keys().copied()
    }

    /// Closes the open batch and starts an empty one.
    pub fn take(&mut self) -> Closed {
        self.after_full = self.is_full();
        let mut closed = std::mem::take(&mut self.batch);
        closed.bytes = std::mem::take(&mut self.bytes);
        self.opened_at = None;
        self.last_push = None;
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{Table, Value};

    fn limits() -> BatchLimits {
        BatchLimits {
            max_rows: 3,
            max_bytes: 1000,
            linger: Duration::from_millis(500),
        }
    }

    fn row() -> Entry {
        Entry::Row(Row {
            values: vec![Value::Int(1)],
        })
    }

    fn reject(partition: i32, offset: i64) -> Entry {
        Entry::Reject(RejectedRecord {
            table: Table::EventsPart,
            topic: "t".into(),
            partition,
            offset,
            key: None,
            payload: b"{".to_vec(),
            reason: "bad".into(),
            class: "invalid_json",
        })
    }

    #[test]
    fn closes_at_rows_counting_rejects() {
        let now = Instant::now();
        let mut b = Batcher::new(limits());
        assert!(b.is_empty() && !b.should_close(now) && b.deadline().is_none());
        b.push(0, Some(0), 0, 10, row(), now);
        b.push(0, Some(0), 1, 10, reject(0, 1), now);
        assert!(!b.should_close(now));
        b.push(1, Some(7), 7, 10, row(), now);
        assert!(b.should_close(now), "three records");
        let closed = b.take();
        assert_eq!((closed.rows.len(), closed.rejects.len(), closed.bytes), (2, 1, 30));
        assert_eq!(
            closed.origins,
            [
                Origin {
                    partition: 0,
                    offset: 0
                },
                Origin {
                    partition: 1,
                    offset: 7
                }
            ]
        );
        assert!(b.is_empty() && b.deadline().is_none(), "a new batch starts empty");
    }

    #[test]
    fn closes_at_bytes_and_at_linger() {
        let start = Instant::now();
        let mut b = Batcher::new(limits());
        b.push(0, Some(0), 0, 999, row(), start);
        assert!(!b.should_close(start));
        b.push(0, Some(0), 1, 1, row(), start + Duration::from_millis(10));
        assert!(b.is_full(), "1000 bytes");
        b.take();
        let later = start + Duration::from_secs(1);
        b.push(0, Some(2), 2, 1, row(), later);
        assert_eq!(
            b.deadline(),
            Some(later + Duration::from_millis(500)),
            "linger counts from the first record"
        );
        assert!(!b.should_close(later + Duration::from_millis(499)));
        assert!(b.should_close(later + Duration::from_millis(500)));
    }

    #[test]
    fn only_a_batch_after_a_full_one_counts_as_drained() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut b = Batcher::new(limits());
        b.push(0, Some(0), 0, 1, row(), start);
        assert_eq!(b.drained_at(), None, "the first batch follows none");
        b.push(0, Some(0), 1, 1, row(), start);
        b.push(0, Some(0), 2, 1, row(), start);
        assert!(b.is_full());
        b.take();
        // After a full batch: drained DRAIN_IDLE after the last record, which
        // each record moves on; the linger deadline stays where it was.
        b.push(0, Some(3), 3, 1, row(), start + ms(10));
        assert_eq!(b.drained_at(), Some(start + ms(10) + DRAIN_IDLE));
        b.push(0, Some(3), 4, 1, row(), start + ms(30));
        assert_eq!(b.drained_at(), Some(start + ms(30) + DRAIN_IDLE));
        assert_eq!(b.deadline(), Some(start + ms(10) + ms(500)));
        // That batch closes partial: the next one follows a batch that was not
        // full, and waits for the linger alone.
        b.take();
        assert_eq!(b.drained_at(), None, "empty");
        b.push(0, Some(5), 5, 1, row(), start + ms(40));
        assert_eq!(b.drained_at(), None);
        // A linger shorter than DRAIN_IDLE bounds the wait too.
        let mut short = Batcher::new(BatchLimits {
            linger: ms(20),
            ..limits()
        });
        for offset in 0..3 {
            short.push(0, Some(0), offset, 1, row(), start);
        }
        short.take();
        short.push(0, Some(3), 3, 1, row(), start + ms(5));
        assert_eq!(short.drained_at(), Some(start + ms(25)));
    }

    #[test]
    fn spans_start_at_the_position_and_chain() {
        let now = Instant::now();
        let mut b = Batcher::new(BatchLimits {
            max_rows: 100,
            ..limits()
        });
        // The stored position is 5, but offsets 5..7 were compacted away.
        b.push(3, Some(5), 8, 1, row(), now);
        b.push(3, Some(5), 9, 1, row(), now);
        // No stored position: the partition starts at its first record.
        b.push(4, None, 42, 1, row(), now);
        let closed = b.take();
        assert_eq!(closed.spans[&3], Span { from: 5, to: 10 });
        assert_eq!(closed.spans[&4], Span { from: 42, to: 43 });
        let offsets = closed.offsets("g", "dwh.events_part");
        assert_eq!(offsets.len(), 2);
        assert_eq!((offsets[0].partition, offsets[0].from, offsets[0].to), (3, 5, 10));
        assert_eq!(offsets[1].group_id, "g");
        // The next batch of partition 3 starts where this one ended.
        b.push(3, Some(10), 10, 1, row(), now);
        assert_eq!(b.take().spans[&3], Span { from: 10, to: 11 });
    }
}
