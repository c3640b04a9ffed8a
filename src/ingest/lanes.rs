//! The lane scheduler of one table's worker. Pure: no I/O, no clock of its own,
//! no task; the worker feeds it records, closes and write endings, and carries
//! out what it answers (start writing this batch, wait for a write to end).
//!
//! A table's partitions are split into lanes (`KAFKA_WRITE_LANES`, partition
//! modulo lanes). Each lane has its own open batch, at most one batch being
//! written and at most one closed batch queued behind it, so decoding goes on
//! while a write takes its time. Lanes never share a partition, and a lane
//! writes one batch at a time, in order, so a partition's batches land in
//! order. A partition's position moves on when its batch is closed, so the next
//! batch chains on; if that write fails, the consumer is rebuilt from the DWH.

use std::collections::HashMap;
use std::time::Instant;

use super::batcher::{BatchLimits, Batcher, Closed, Entry};
use crate::store::OffsetAdvance;

/// What a lane holds of the memory budget: merged as records join a batch.
pub trait Permit {
    fn merge(&mut self, other: Self);
}

impl Permit for crate::kafka::memory::Held {
    fn merge(&mut self, other: Self) {
        crate::kafka::memory::Held::merge(self, other);
    }
}

/// A closed batch, its offset advances and its memory, ready to be written.
#[derive(Debug)]
pub struct Queued<M> {
    pub closed: Closed,
    pub offsets: Vec<OffsetAdvance>,
    pub memory: Option<M>,
}

/// The partitions `p` with `p % lanes == index`.
#[derive(Debug)]
struct Lane<M> {
    batcher: Batcher,
    /// Memory of the open batch's records, handed on with it.
    memory: Option<M>,
    /// Records of the batch being written, if one is.
    writing: Option<usize>,
    /// A closed batch waiting for the one being written: at most one.
    queued: Option<Queued<M>>,
}

impl<M> Lane<M> {
    /// When the open batch is due (see [`Lanes::deadline`]); never while the
    /// lane's queue is taken, since it cannot close then.
    fn due(&self, drain: bool) -> Option<Instant> {
        if self.queued.is_some() {
            return None;
        }
        let drained = self.batcher.drained_at().filter(|_| drain);
        self.batcher.deadline().into_iter().chain(drained).min()
    }
}

/// What became of a record offered to [`Lanes::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Its partition is not assigned here (a record fetched before a revoke).
    NotAssigned,
    /// Its offset is below where the partition stands: written already.
    Written,
    /// Added to this lane's open batch, which may now be full.
    Lane { lane: usize, full: bool },
}

/// What closing a lane's open batch asks of the worker.
#[derive(Debug)]
pub enum Closing<M> {
    /// Nothing to close.
    Empty,
    /// The lane's queue is taken: wait for a write to end, then close again.
    Wait,
    /// Queued behind the lane's write; started when that one ends.
    Queued,
    /// Start writing this batch now (the lane counts as writing it).
    Write(Queued<M>),
}

/// Every lane of a table, and where each assigned partition stands.
#[derive(Debug)]
pub struct Lanes<M> {
    lanes: Vec<Lane<M>>,
    /// Assigned partitions and where each stands (`None`: nothing stored yet).
    positions: HashMap<i32, Option<i64>>,
}

impl<M: Permit> Lanes<M> {
    /// `lanes` lanes (at least one) with batches bounded by `limits`.
    pub fn new(limits: BatchLimits, lanes: usize) -> Lanes<M> {
        Lanes {
            lanes: (0..lanes.max(1))
                .map(|_| Lane {
                    batcher: Batcher::new(limits),
                    memory: None,
                    writing: None,
                    queued: None,
                })
                .collect(),
            positions: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    pub fn lane_of(&self, partition: i32) -> usize {
        partition.rem_euclid(self.lanes.len() as i32) as usize
    }

    /// Partitions assigned, each with its stored next offset.
    pub fn assign(&mut self, starts: impl IntoIterator<Item = (i32, Option<i64>)>) {
        self.positions.extend(starts);
    }

    /// Partitions revoked (after their buffered records were written).
    pub fn revoke(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.positions.remove(partition);
        }
    }

    /// The lanes that hold an assigned partition, ascending.
    pub fn held(&self) -> Vec<usize> {
        let mut held: Vec<usize> = self.positions.keys().map(|&p| self.lane_of(p)).collect();
        held.sort_unstable();
        held.dedup();
        held
    }

    /// How many partitions are assigned.
    pub fn assigned(&self) -> usize {
        self.positions.len()
    }

    /// The offset after `partition`'s last buffered record.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.lanes[self.lane_of(partition)].batcher.next_offset(partition)
    }

    /// How far each assigned partition was fetched: past its last buffered
    /// record, else where it stands (partitions with neither are left out).
    pub fn fetched(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.positions
            .iter()
            .filter_map(|(&p, &position)| Some((p, self.next_offset(p).or(position)?)))
    }

    /// The earliest time an open batch is due: its linger deadline, or, when
    /// `drain` (no delivery is waiting), the time it counts as drained.
    pub fn deadline(&self, drain: bool) -> Option<Instant> {
        self.lanes.iter().filter_map(|lane| lane.due(drain)).min()
    }

    /// Whether `lane`'s open batch is due at `now`.
    pub fn due(&self, lane: usize, drain: bool, now: Instant) -> bool {
        self.lanes[lane].due(drain).is_some_and(|due| due <= now)
    }

    /// Whether a batch of `lane` is being written.
    pub fn writing(&self, lane: usize) -> bool {
        self.lanes[lane].writing.is_some()
    }

    /// Whether `lane` has a batch being written or queued.
    pub fn busy(&self, lane: usize) -> bool {
        self.lanes[lane].writing.is_some() || self.lanes[lane].queued.is_some()
    }

    /// Records buffered, queued or being written.
    pub fn records(&self) -> usize {
        self.lanes
            .iter()
            .map(|lane| {
                lane.batcher.records()
                    + lane.writing.unwrap_or(0)
                    + lane.queued.as_ref().map_or(0, |q| q.closed.records())
            })
            .sum()
    }

    /// Offers a record (`size` bytes of payload, stamped `timestamp_ms`) to its
    /// partition's lane; `permit` is its memory, kept with the batch.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        size: usize,
        entry: Entry,
        timestamp_ms: Option<i64>,
        permit: M,
        now: Instant,
    ) -> Pushed {
        let Some(&position) = self.positions.get(&partition) else {
            return Pushed::NotAssigned;
        };
        let expected = self.next_offset(partition).or(position);
        if expected.is_some_and(|next| offset < next) {
            return Pushed::Written;
        }
        let index = self.lane_of(partition);
        let lane = &mut self.lanes[index];
        lane.batcher.push(partition, position, offset, size, entry, now);
        if let Some(timestamp) = timestamp_ms {
            lane.batcher.stamp(partition, timestamp);
        }
        match &mut lane.memory {
            Some(held) => held.merge(permit),
            None => lane.memory = Some(permit),
        }
        Pushed::Lane {
            lane: index,
            full: lane.batcher.is_full(),
        }
    }

    /// Closes `lane`'s open batch: to be written now when the lane writes
    /// nothing, else queued behind its write (when the queue is free).
    pub fn close(&mut self, lane: usize, group_id: &str, topic: &str) -> Closing<M> {
        if self.lanes[lane].queued.is_some() {
            return Closing::Wait;
        }
        if self.lanes[lane].batcher.is_empty() {
            return Closing::Empty;
        }
        let closed = self.lanes[lane].batcher.take();
        let offsets = closed.offsets(group_id, topic);
        for advance in &offsets {
            self.positions.insert(advance.partition, Some(advance.to));
        }
        let lane = &mut self.lanes[lane];
        let queued = Queued {
            closed,
            offsets,
            memory: lane.memory.take(),
        };
        if lane.writing.is_some() {
            lane.queued = Some(queued);
            Closing::Queued
        } else {
            lane.writing = Some(queued.closed.records());
            Closing::Write(queued)
        }
    }

    /// `lane`'s write ended (landed or not): it writes nothing now.
    pub fn ended(&mut self, lane: usize) {
        self.lanes[lane].writing = None;
    }

    /// The batch queued on `lane`, to be written now; the lane counts as
    /// writing it. `None` when nothing is queued or a write is still going.
    pub fn start_queued(&mut self, lane: usize) -> Option<Queued<M>> {
        let lane = &mut self.lanes[lane];
        if lane.writing.is_some() {
            return None;
        }
        let queued = lane.queued.take()?;
        lane.writing = Some(queued.closed.records());
        Some(queued)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::catalogue::{Row, Value};

    /// Memory as a count of records.
    #[derive(Debug, PartialEq, Eq)]
    struct Count(u32);

    impl Permit for Count {
        fn merge(&mut self, other: Count) {
            self.0 += other.0;
        }
    }

    type State = Lanes<Count>;

    fn limits(max_rows: usize) -> BatchLimits {
        BatchLimits {
            max_rows,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(500),
        }
    }

    fn row() -> Entry {
        Entry::Row(Row {
            values: vec![Value::Int(1)],
        })
    }

    fn push(state: &mut State, partition: i32, offset: i64) -> Pushed {
        state.push(partition, offset, 10, row(), Some(1_000), Count(1), Instant::now())
    }

    #[test]
    fn each_partition_has_one_lane_and_the_lanes_split_the_partitions() {
        let limits = BatchLimits {
            max_rows: 10,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(500),
        };
        for lanes in [1, 2, 3, 4] {
            let state = State::new(limits, lanes);
            assert_eq!(state.lanes.len(), lanes);
            let mut used = vec![0; lanes];
            for partition in 0..12 {
                let lane = state.lane_of(partition);
                assert_eq!(lane, state.lane_of(partition), "stable");
                used[lane] += 1;
            }
            assert!(used.iter().all(|&n| n == 12 / lanes || n == 12 / lanes + 1), "{used:?}");
        }
        // No lane at all is still one lane.
        assert_eq!(State::new(limits, 0).lanes.len(), 1);
    }

    #[test]
    fn records_of_other_partitions_and_records_written_already_are_skipped() {
        let mut state = State::new(limits(10), 2);
        assert_eq!(push(&mut state, 0, 5), Pushed::NotAssigned);
        state.assign([(0, Some(5)), (1, None)]);
        assert_eq!(push(&mut state, 0, 4), Pushed::Written, "below the stored offset");
        assert_eq!(push(&mut state, 0, 5), Pushed::Lane { lane: 0, full: false });
        assert_eq!(
            push(&mut state, 0, 5),
            Pushed::Written,
            "a redelivery of a buffered one"
        );
        assert_eq!(push(&mut state, 1, 0), Pushed::Lane { lane: 1, full: false });
        let mut fetched: Vec<_> = state.fetched().collect();
        fetched.sort();
        assert_eq!(fetched, vec![(0, 6), (1, 1)]);
        state.revoke(&[1]);
        assert_eq!(state.assigned(), 1);
        assert_eq!(push(&mut state, 1, 1), Pushed::NotAssigned);
    }

    #[test]
    fn a_lane_writes_one_batch_queues_one_and_waits_for_the_third() {
        let mut state = State::new(limits(2), 1);
        state.assign([(0, Some(0))]);
        assert!(matches!(state.close(0, "g", "t"), Closing::Empty));
        assert_eq!(push(&mut state, 0, 0), Pushed::Lane { lane: 0, full: false });
        assert_eq!(push(&mut state, 0, 1), Pushed::Lane { lane: 0, full: true });
        // The first batch is written at once, with its memory and its offsets.
        let Closing::Write(first) = state.close(0, "g", "t") else {
            panic!("the first batch is written at once");
        };
        assert_eq!(first.memory, Some(Count(2)));
        assert_eq!((first.offsets[0].from, first.offsets[0].to), (0, 2));
        assert!(state.writing(0) && state.busy(0));
        assert_eq!(state.records(), 2, "being written");
        // The next chains on from where the first ends, and queues behind it.
        push(&mut state, 0, 2);
        assert!(matches!(state.close(0, "g", "t"), Closing::Queued));
        push(&mut state, 0, 3);
        assert_eq!(state.records(), 4, "written, queued and open");
        assert!(matches!(state.close(0, "g", "t"), Closing::Wait), "the queue holds one");
        assert!(state.start_queued(0).is_none(), "not while the first is written");
        // The first write ends: the queued one starts, then the open one can close.
        state.ended(0);
        let second = state.start_queued(0).expect("the queued batch");
        assert_eq!((second.offsets[0].from, second.offsets[0].to), (2, 3));
        let Closing::Queued = state.close(0, "g", "t") else {
            panic!("queued behind the second");
        };
        state.ended(0);
        let third = state.start_queued(0).expect("the third");
        assert_eq!((third.offsets[0].from, third.offsets[0].to), (3, 4));
        state.ended(0);
        assert!(!state.busy(0));
        assert_eq!(state.records(), 0);
    }

    #[test]
    fn lanes_write_side_by_side_and_a_batch_is_due_by_linger_or_drain() {
        let mut state = State::new(limits(100), 2);
        state.assign([(0, None), (1, None)]);
        let now = Instant::now();
        state.push(0, 7, 10, row(), None, Count(1), now);
        state.push(1, 3, 10, row(), None, Count(1), now);
        assert!(!state.due(0, false, now), "not before the linger");
        assert!(state.due(0, false, now + Duration::from_millis(500)));
        let deadline = state.deadline(false).expect("a deadline");
        assert_eq!(deadline, now + Duration::from_millis(500));
        let Closing::Write(a) = state.close(0, "g", "t") else {
            panic!()
        };
        let Closing::Write(b) = state.close(1, "g", "t") else {
            panic!()
        };
        // A partition with no stored offset starts where its first record is.
        assert_eq!((a.offsets[0].partition, a.offsets[0].from, a.offsets[0].to), (0, 7, 8));
        assert_eq!((b.offsets[0].partition, b.offsets[0].from, b.offsets[0].to), (1, 3, 4));
        assert!(state.writing(0) && state.writing(1));
        assert_eq!(state.deadline(true), None, "nothing open");
    }
}
