//! The poll thread's backpressure. Pure: no consumer, no channel, no clock;
//! the poll loop tells it what happened (a record polled, memory found or not,
//! the task took an offer or not) and carries out what it answers (pause or
//! resume fetching, how long to wait).
//!
//! Guarantees: records keep poll order (nothing overtakes a record waiting for
//! memory); fetching is paused while a record waits for memory or the task is
//! behind, and resumed as soon as neither holds; while paused the loop only
//! looks (no wait on the task or on memory), so the member keeps serving its
//! group.

use std::collections::VecDeque;
use std::time::Duration;

/// How long the poll loop waits for a record.
pub const POLL_WAIT: Duration = Duration::from_millis(100);
/// How long the poll loop waits while paused: it looks again this soon for the
/// memory or the task it waits on, so that fetching resumes within a few
/// milliseconds of a batch landing, not up to [`POLL_WAIT`] later.
pub const PAUSED_POLL_WAIT: Duration = Duration::from_millis(5);
/// How long the poll thread waits for memory or for the task before it pauses
/// fetching: short against `max.poll.interval.ms`, long against a batch write.
pub const SHORT_WAIT: Duration = Duration::from_secs(1);
/// Records handed over at once: one wake-up of the task per batch, not per record.
pub const HANDOVER_RECORDS: usize = 256;

/// What the poll loop must do to fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetching {
    /// Pause every assigned partition: a new pause (counted).
    Pause,
    /// Pause every assigned partition again (one assigned since the pause), not
    /// a new pause.
    PauseAgain,
    /// Resume every assigned partition.
    Resume,
}

/// What to do with a record just polled.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled<M> {
    /// Find memory for it (then [`Backpressure::no_memory`] if there is none).
    Take(M),
    /// It waits behind the records held for memory; fetching pauses again.
    Held(Fetching),
}

/// Records held for memory, and whether fetching is paused or the task behind.
#[derive(Debug)]
pub struct Backpressure<M> {
    /// Records polled while no memory was left (fetched before the pause took
    /// effect), in poll order, each with the permits it needs.
    held: VecDeque<(M, u32)>,
    paused: bool,
    /// The task did not take the last offer: offer again each round.
    behind: bool,
}

impl<M> Default for Backpressure<M> {
    fn default() -> Self {
        Backpressure {
            held: VecDeque::new(),
            paused: false,
            behind: false,
        }
    }
}

impl<M> Backpressure<M> {
    #[cfg(test)]
    fn paused(&self) -> bool {
        self.paused
    }

    fn blocked(&self) -> bool {
        !self.held.is_empty() || self.behind
    }

    /// The held records that `take` finds memory for now, in poll order; the
    /// first it finds none for, and all after it, stay held.
    pub fn release<P>(&mut self, mut take: impl FnMut(u32) -> Option<P>) -> Vec<(M, P)> {
        let mut released = Vec::new();
        while let Some((message, permits)) = self.held.pop_front() {
            match take(permits) {
                Some(permit) => released.push((message, permit)),
                None => {
                    self.held.push_front((message, permits));
                    break;
                }
            }
        }
        released
    }

    /// How long to wait for the task while offering it what is pending: no
    /// wait while paused (only look), else [`SHORT_WAIT`].
    pub fn offer_wait(&self) -> Duration {
        if self.paused {
            Duration::ZERO
        } else {
            SHORT_WAIT
        }
    }

    /// Whether the `pending` records are offered now (with [`Self::offer_wait`]):
    /// enough of them, or the task behind, or records held behind them.
    pub fn offer_now(&self, pending: usize) -> bool {
        pending > 0 && (pending >= HANDOVER_RECORDS || self.blocked())
    }

    /// How an offer went: the task took everything (`behind` false) or not.
    pub fn offered(&mut self, behind: bool) {
        self.behind = behind;
    }

    /// After a round of offers: pause when records wait for memory or the task is
    /// behind, resume when neither holds any more.
    pub fn settle(&mut self) -> Option<Fetching> {
        let blocked = self.blocked();
        if blocked == self.paused {
            return None;
        }
        self.paused = blocked;
        Some(if blocked { Fetching::Pause } else { Fetching::Resume })
    }

    /// How long the next poll waits: not at all while records are pending and
    /// nothing blocks, briefly while paused, else [`POLL_WAIT`].
    pub fn poll_timeout(&self, pending: usize) -> Duration {
        if pending > 0 && !self.blocked() {
            Duration::ZERO
        } else if self.paused {
            PAUSED_POLL_WAIT
        } else {
            POLL_WAIT
        }
    }

    /// A record was polled that needs `permits`.
    pub fn polled(&mut self, message: M, permits: u32) -> Polled<M> {
        if self.held.is_empty() {
            return Polled::Take(message);
        }
        // Keep poll order: nothing overtakes a record waiting for memory. A
        // record here comes from a partition assigned since the pause (or
        // fetched before it): pause again, so that fetching stops there too.
        self.held.push_back((message, permits));
        self.paused = true;
        Polled::Held(Fetching::PauseAgain)
    }

    /// Whether a record that found no memory at once may wait for it a moment
    /// (after handing over what is pending): not while paused.
    /// Whether fetching is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn may_wait_for_memory(&self) -> bool {
        !self.paused
    }

    /// A record found no memory: it is held, and fetching pauses if it was not.
    pub fn no_memory(&mut self, message: M, permits: u32) -> Option<Fetching> {
        self.held.push_back((message, permits));
        if self.paused {
            return None;
        }
        self.paused = true;
        Some(Fetching::Pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_memory_pauses_once_and_the_rest_wait_behind_it_in_order() {
        let mut bp = Backpressure::<&str>::default();
        assert_eq!(bp.poll_timeout(0), POLL_WAIT);
        assert_eq!(bp.poll_timeout(3), Duration::ZERO, "records pending: poll on at once");
        assert_eq!(bp.polled("a", 2), Polled::Take("a"));
        assert!(bp.may_wait_for_memory());
        assert_eq!(bp.no_memory("a", 2), Some(Fetching::Pause));
        assert!(bp.paused() && !bp.may_wait_for_memory());
        assert_eq!(bp.offer_wait(), Duration::ZERO, "paused: only look");
        assert_eq!(bp.poll_timeout(0), PAUSED_POLL_WAIT);
        // Later records queue behind, each pausing again (new partitions).
        assert_eq!(bp.polled("b", 1), Polled::Held(Fetching::PauseAgain));
        assert_eq!(bp.polled("c", 5), Polled::Held(Fetching::PauseAgain));
        assert_eq!(bp.settle(), None, "still blocked");
        // Memory for two records: a and b come out, c still waits (in order).
        let mut budget = 3;
        let released = bp.release(|n| {
            (n <= budget).then(|| {
                budget -= n;
                n
            })
        });
        assert_eq!(released, vec![("a", 2), ("b", 1)]);
        assert_eq!(bp.settle(), None, "c is held");
        assert!(bp.release(|_| None::<u32>).is_empty());
        let released = bp.release(Some);
        assert_eq!(released, vec![("c", 5)]);
        assert_eq!(bp.settle(), Some(Fetching::Resume));
        assert_eq!(bp.settle(), None);
        assert_eq!(bp.offer_wait(), SHORT_WAIT);
    }

    #[test]
    fn a_task_behind_pauses_fetching_until_it_takes_the_offer() {
        let mut bp = Backpressure::<u32>::default();
        assert!(!bp.offer_now(0));
        assert!(!bp.offer_now(HANDOVER_RECORDS - 1), "gathering");
        assert!(bp.offer_now(HANDOVER_RECORDS));
        bp.offered(true);
        assert_eq!(bp.settle(), Some(Fetching::Pause));
        assert!(bp.offer_now(1), "behind: offer again each round");
        assert_eq!(bp.poll_timeout(1), PAUSED_POLL_WAIT, "blocked: do not spin");
        bp.offered(false);
        assert_eq!(bp.settle(), Some(Fetching::Resume));
        assert!(!bp.paused());
        // A record without memory while the task is behind pauses once.
        bp.offered(true);
        assert_eq!(bp.settle(), Some(Fetching::Pause));
        assert_eq!(bp.no_memory(7, 1), None, "paused already");
    }
}
