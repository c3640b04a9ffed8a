//! Memory for consumed records: each table's own share of its role's budget, and
//! a pool its role's tables borrow from once their own share is spent.
//!
//! Guarantees: a table can always hold its own share, whatever the other tables
//! hold (one table whose writes stall cannot starve the others); a busy table
//! also uses what the idle ones leave in the pool. A record's memory is released
//! when its [`Held`] is dropped, to where it came from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How one table's consumer may use memory. The role's budget is split evenly
/// between the tables it consumes; of a table's part, a quarter is librdkafka's
/// prefetch (half as its queue, half as one fetch response in flight). Of the
/// rest, the records held, half is the table's own and half goes to the role's
/// pool, shared by its tables. Records are counted by [`super::consumer::Role::charge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryShare {
    /// `queued.max.messages.kbytes` and `fetch.max.bytes`, each.
    pub prefetch_half: usize,
    /// Bytes of held records (as charged) the table always has.
    pub own: u32,
    /// What the table adds to its role's pool.
    pub pooled: u32,
}

/// The smallest prefetch half: librdkafka raises `fetch.max.bytes` to
/// `message.max.bytes` (1 MB) anyway; also the smallest own share.
const MIN_PREFETCH_HALF: usize = 1 << 20;

impl MemoryShare {
    pub fn of(role_budget: usize, tables: usize) -> Self {
        let table = role_budget / tables.max(1);
        let prefetch_half = (table / 8).max(MIN_PREFETCH_HALF);
        let held = table.saturating_sub(2 * prefetch_half).max(MIN_PREFETCH_HALF);
        let own = (held / 2).max(MIN_PREFETCH_HALF).min(held);
        let clamp = |n: usize| n.min(u32::MAX as usize) as u32;
        MemoryShare {
            prefetch_half,
            own: clamp(own),
            pooled: clamp(held - own),
        }
    }

    /// The pool of a role of `tables` tables with this share each.
    pub fn pool(&self, tables: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.pooled as usize * tables.max(1)))
    }
}

/// One table's memory: its own share and its role's pool.
#[derive(Debug, Clone)]
pub struct TableMemory {
    own: Arc<Semaphore>,
    own_size: u32,
    pool: Arc<Semaphore>,
    /// What this table holds of the pool now.
    borrowed: Arc<AtomicU64>,
}

impl TableMemory {
    pub fn new(share: &MemoryShare, pool: Arc<Semaphore>) -> Self {
        TableMemory {
            own: Arc::new(Semaphore::new(share.own as usize)),
            own_size: share.own,
            pool,
            borrowed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The most one record may take: its own share, which it can always get
    /// back once what the table holds is written.
    pub fn max_record(&self) -> u32 {
        self.own_size
    }

    /// `n` bytes now, from the table's own share first, then from the pool, or
    /// from both; `None` when neither has them.
    pub fn try_take(&self, n: u32) -> Option<Held> {
        if let Ok(own) = self.own.clone().try_acquire_many_owned(n) {
            return Some(self.held(Some(own), None));
        }
        if let Ok(pool) = self.pool.clone().try_acquire_many_owned(n) {
            return Some(self.held(None, Some(pool)));
        }
        // Only this table's poll thread takes from its own share: what it has
        // now stays there.
        let have = (self.own.available_permits() as u32).min(n);
        let pool = self.pool.clone().try_acquire_many_owned(n - have).ok()?;
        let own = match have {
            0 => None,
            _ => Some(self.own.clone().try_acquire_many_owned(have).ok()?),
        };
        Some(self.held(own, Some(pool)))
    }

    /// `n` bytes within `wait`: from the pool or the own share at once, else
    /// waiting on the own share. `None` when the wait ran out.
    pub async fn take_within(&self, n: u32, wait: Duration) -> Option<Held> {
        if let Some(held) = self.try_take(n) {
            return Some(held);
        }
        let own = tokio::time::timeout(wait, self.own.clone().acquire_many_owned(n))
            .await
            .ok()?
            .ok()?;
        Some(self.held(Some(own), None))
    }

    fn held(&self, own: Option<OwnedSemaphorePermit>, pool: Option<OwnedSemaphorePermit>) -> Held {
        if let Some(pool) = &pool {
            self.borrowed.fetch_add(pool.num_permits() as u64, Ordering::Relaxed);
        }
        Held {
            own,
            pool,
            borrowed: self.borrowed.clone(),
        }
    }

    /// Bytes the table holds now, its own and borrowed.
    pub fn held_bytes(&self) -> u64 {
        let own = u64::from(self.own_size).saturating_sub(self.own.available_permits() as u64);
        own + self.borrowed.load(Ordering::Relaxed)
    }

    /// The most the table may hold: its own share and the whole pool.
    pub fn budget_bytes(&self) -> u64 {
        u64::from(self.own_size) + self.borrowed.load(Ordering::Relaxed) + self.pool.available_permits() as u64
    }
}

/// Memory held for records, released to its table and the pool when dropped.
#[derive(Debug)]
pub struct Held {
    own: Option<OwnedSemaphorePermit>,
    pool: Option<OwnedSemaphorePermit>,
    borrowed: Arc<AtomicU64>,
}

impl Held {
    /// Takes `other` (of the same table) into this one.
    pub fn merge(&mut self, mut other: Held) {
        debug_assert!(Arc::ptr_eq(&self.borrowed, &other.borrowed), "memory of another table");
        for (mine, theirs) in [(&mut self.own, other.own.take()), (&mut self.pool, other.pool.take())] {
            match (mine.as_mut(), theirs) {
                (Some(mine), Some(theirs)) => mine.merge(theirs),
                (None, Some(theirs)) => *mine = Some(theirs),
                (_, None) => {}
            }
        }
        // `other` now holds nothing of the pool; what it had counts here.
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let count = |p: &Option<OwnedSemaphorePermit>| p.as_ref().map_or(0, |p| p.num_permits() as u64);
        count(&self.own) + count(&self.pool)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            self.borrowed.fetch_sub(pool.num_permits() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Table;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_role_budget_is_split_between_tables_prefetch_own_and_pool() {
        for budget in [64 * MIB, 256 * MIB, 1024 * MIB] {
            for tables in [1, 2, Table::ALL.len()] {
                let share = MemoryShare::of(budget, tables);
                let held = share.own as usize + share.pooled as usize;
                let per_table = 2 * share.prefetch_half + held;
                assert!(per_table <= budget / tables, "{budget}/{tables}: {share:?}");
                assert!(held >= per_table * 3 / 4 - 1, "{budget}/{tables}: {share:?}");
                assert!(share.own as usize >= held / 2, "{budget}/{tables}: {share:?}");
            }
            // One table ingested gets the whole budget, not a seventh of it.
            let one = MemoryShare::of(budget, 1);
            let seven = MemoryShare::of(budget, 7);
            assert!(one.own + one.pooled >= 7 * (seven.own + seven.pooled) - 7);
        }
        // A tiny budget still leaves librdkafka its minimum and the table a record.
        let small = MemoryShare::of(MIB, Table::ALL.len());
        assert_eq!((small.prefetch_half, small.own as usize, small.pooled), (MIB, MIB, 0));
    }

    fn role(own: u32, pooled: u32, tables: usize) -> Vec<TableMemory> {
        let share = MemoryShare {
            prefetch_half: MIB,
            own,
            pooled,
        };
        let pool = share.pool(tables);
        (0..tables).map(|_| TableMemory::new(&share, pool.clone())).collect()
    }

    #[test]
    fn a_busy_table_borrows_what_the_idle_ones_leave_and_gives_it_back() {
        let tables = role(100, 100, 3);
        let (busy, idle) = (&tables[0], &tables[1]);
        // Its own share, then the pool (the whole role's: 300), then nothing.
        let mut held = busy.try_take(100).expect("own share");
        assert_eq!((busy.held_bytes(), busy.budget_bytes()), (100, 400));
        held.merge(busy.try_take(250).expect("from the pool"));
        held.merge(busy.try_take(50).expect("the rest of the pool"));
        assert_eq!(busy.held_bytes(), 400);
        assert!(busy.try_take(1).is_none(), "nothing left to borrow");
        // The idle table still has its own share, and only that.
        let guaranteed = idle.try_take(100).expect("an idle table keeps its own share");
        assert!(idle.try_take(1).is_none());
        assert_eq!(held.bytes(), 400);
        drop((held, guaranteed));
        assert_eq!((busy.held_bytes(), idle.held_bytes()), (0, 0));
        assert!(busy.try_take(400).is_some(), "everything came back");
    }

    #[test]
    fn a_record_takes_what_is_left_of_the_own_share_and_the_rest_from_the_pool() {
        let tables = role(100, 50, 2);
        let table = &tables[0];
        let first = table.try_take(60).expect("own");
        let split = table.try_take(80).expect("40 own and 40 borrowed");
        assert_eq!((split.bytes(), table.held_bytes()), (80, 140));
        assert!(table.try_take(61).is_none(), "60 left in the pool");
        drop(split);
        assert_eq!(table.held_bytes(), 60);
        drop(first);
        assert_eq!(table.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_wait_for_memory_ends_when_the_own_share_comes_back_or_the_time_runs_out() {
        let tables = role(100, 0, 1);
        let table = tables[0].clone();
        let held = table.try_take(100).expect("own");
        assert!(table.take_within(10, Duration::from_millis(20)).await.is_none());
        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.take_within(10, Duration::from_secs(30)).await.map(|h| h.bytes()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert_eq!(waiting.await.expect("joined"), Some(10));
    }
}
