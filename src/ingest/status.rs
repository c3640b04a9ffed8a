//! What the ingest role reports while it runs: counters for the demo, the bench
//! and ops, whether DWH writes are failing (readiness goes 503 while they are),
//! and how far each partition it consumes was fetched and written (for the lag
//! loop's buffer and seconds gauges). One per process, shared by reference: no
//! global state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::catalogue::Table;
use crate::store::WriteOutcome;

/// Shared between the ingest tasks and whoever watches them.
#[derive(Debug, Default)]
pub struct IngestStatus {
    rows: AtomicU64,
    inserted: AtomicU64,
    updated: AtomicU64,
    skipped: AtomicU64,
    rejects: AtomicU64,
    retries: AtomicU64,
    offsets_moved: AtomicU64,
    tables_stopped: AtomicU64,
    rebalances: AtomicU64,
    pauses: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    /// Flush latencies in microseconds, the most recent [`LATENCY_SAMPLES`].
    latencies: Mutex<Vec<u64>>,
    /// Why writes are failing right now, per topic and lane (`None`: the whole
    /// table, stopped).
    failing: Mutex<Vec<WriteFailure>>,
    /// Why a topic's consumer cannot work right now (credentials, TLS, a
    /// permission, a codec), per topic: kept apart from the write failures, so
    /// that a write landing does not hide it.
    kafka_failing: Mutex<Vec<(String, String)>>,
    /// Orders the publications of whether a table fails ([`Self::publish_failing`]).
    publishing: Mutex<()>,
    /// Why a topic is stalled right now (the watchdog's verdict, see
    /// `status::stall`), per topic.
    stalled: Mutex<Vec<(String, String)>>,
    /// The last error each topic met (a write, its consumer, a fetch), kept
    /// after it clears: what a stall names as its likely cause.
    last_error: Mutex<HashMap<String, String>>,
    /// What this process knows of each partition it consumes.
    progress: Mutex<BTreeMap<(Table, i32), Progress>>,
}

/// Why one lane of a topic (or the whole table, `lane: None`) cannot write.
#[derive(Debug, Clone)]
struct WriteFailure {
    topic: String,
    lane: Option<usize>,
    cause: String,
}

/// Where a table stands, for `dwh_helper_table_state{table,state}`: one state
/// at a time, the most serious first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    Ok,
    /// Records wait that nothing moves (the watchdog).
    Stalled,
    /// Its DWH writes or its consumer fail.
    Failing,
    /// A stored offset does not fit the log: it waits for an operator.
    Stopped,
}

impl TableState {
    /// As `dwh_helper_table_state` names it (one of `TABLE_STATES`).
    pub fn name(self) -> &'static str {
        match self {
            TableState::Ok => "ok",
            TableState::Stalled => "stalled",
            TableState::Failing => "failing",
            TableState::Stopped => "stopped",
        }
    }
}

/// What this process knows of a partition it consumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The next offset to fetch.
    pub fetched: Option<i64>,
    /// Kafka timestamp (ms) of the last record written to the DWH.
    pub written_at: Option<i64>,
}

const LATENCY_SAMPLES: usize = 100_000;

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Rows of landed batches: inserted, updated or skipped.
    pub rows: u64,
    /// Rows whose key was new.
    pub inserted: u64,
    /// Rows that replaced an older stored version.
    pub updated: u64,
    /// Rows that changed nothing: stored already (a replay or a redelivery). Zero
    /// in a run without replays: exactly once means no record is written twice.
    pub skipped: u64,
    /// Records rejected, by the catalogue or by the database.
    pub rejects: u64,
    pub bytes: u64,
    pub batches: u64,
    /// Failed write attempts, each retried as the same batch.
    pub retries: u64,
    /// Stored offsets outside the log moved on the operator's request.
    pub offsets_moved: u64,
    /// Tables stopped because a stored offset did not fit the log.
    pub tables_stopped: u64,
    /// Assignments and revocations the consumers went through.
    pub rebalances: u64,
    /// Times fetching paused: the memory budget spent or a writer behind.
    pub pauses: u64,
}

impl IngestStatus {
    pub(crate) fn batch_written(&self, outcome: &WriteOutcome, rejects: usize, bytes: usize, took: Duration) {
        let inserted = outcome.inserted;
        self.rows
            .fetch_add(inserted + outcome.updated + outcome.skipped, Ordering::Relaxed);
        self.inserted.fetch_add(inserted, Ordering::Relaxed);
        self.updated.fetch_add(outcome.updated, Ordering::Relaxed);
        self.skipped.fetch_add(outcome.skipped, Ordering::Relaxed);
        self.rejects.fetch_add(rejects as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let mut latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if latencies.len() >= LATENCY_SAMPLES {
            latencies.remove(0);
        }
        latencies.push(took.as_micros() as u64);
    }

    /// Sets or clears why `lane` of `topic` cannot write; true when a failure of
    /// that lane was cleared. Only the lane's own writes clear its failure.
    pub(crate) fn set_failing(&self, topic: &str, lane: usize, cause: Option<String>) -> bool {
        self.set_write_failure(topic, Some(lane), cause)
    }

    fn set_write_failure(&self, topic: &str, lane: Option<usize>, cause: Option<String>) -> bool {
        if let Some(cause) = &cause {
            self.saw_error(topic, cause);
        }
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let before = failing.len();
        failing.retain(|f| !(f.topic == topic && f.lane == lane));
        let cleared = failing.len() < before;
        if let Some(cause) = cause {
            failing.push(WriteFailure {
                topic: topic.to_owned(),
                lane,
                cause,
            });
        }
        cleared
    }

    /// Runs `publish` with whether `topic` fails now, one publication at a
    /// time: lanes and the consumer change the state on their own tasks, and a
    /// value read before another task's change must not be published after
    /// that task's own, or the gauge would show a failure that is over.
    pub(crate) fn publish_failing(&self, topic: &str, publish: impl FnOnce(bool)) {
        let _order = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        publish(self.is_failing(topic));
    }

    /// The lanes of `topic` that hold partitions now are `held`: a failure of
    /// any other lane is over (its partitions went to another member, which
    /// reports its own). Called after each assignment and revocation.
    /// True when a failure ended so.
    pub(crate) fn lanes_held(&self, topic: &str, held: &[usize]) -> bool {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let before = failing.len();
        failing.retain(|f| f.topic != topic || f.lane.is_none_or(|lane| held.contains(&lane)));
        failing.len() < before
    }

    /// Why `topic`'s writes fail, each cause once (lanes that fail alike
    /// read as one).
    fn write_causes(&self) -> Vec<(String, String)> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let mut causes: Vec<(String, String)> = Vec::new();
        for f in failing.iter() {
            if !causes.iter().any(|(t, c)| *t == f.topic && *c == f.cause) {
                causes.push((f.topic.clone(), f.cause.clone()));
            }
        }
        causes
    }

    /// Sets or clears why `topic`'s consumer cannot work; true when that changed
    /// whether it fails.
    pub(crate) fn set_kafka_failing(&self, topic: &str, cause: Option<String>) -> bool {
        if let Some(cause) = &cause {
            self.saw_error(topic, cause);
        }
        let mut failing = self.kafka_failing.lock().unwrap_or_else(|e| e.into_inner());
        let was = failing.iter().any(|(t, _)| t == topic);
        failing.retain(|(t, _)| t != topic);
        let now = cause.is_some();
        if let Some(cause) = cause {
            failing.push((topic.to_owned(), cause));
        }
        was != now
    }

    /// Keeps `error` as the last one `topic` met.
    pub(crate) fn saw_error(&self, topic: &str, error: &str) {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), error.to_owned());
    }

    /// The last error `topic` met, if any.
    pub fn last_error(&self, topic: &str) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .cloned()
    }

    /// Sets or clears why `topic` is stalled; true when whether it is changed.
    pub fn set_stalled(&self, topic: &str, cause: Option<String>) -> bool {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        let was = stalled.iter().any(|(t, _)| t == topic);
        stalled.retain(|(t, _)| t != topic);
        let now = cause.is_some();
        if let Some(cause) = cause {
            stalled.push((topic.to_owned(), cause));
        }
        was != now
    }

    /// Where `topic`'s table stands: the most serious of its states.
    pub fn state(&self, topic: &str) -> TableState {
        let stopped = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|f| f.topic == topic && f.lane.is_none());
        if stopped {
            return TableState::Stopped;
        }
        if self.is_failing(topic) {
            return TableState::Failing;
        }
        let stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if stalled.iter().any(|(t, _)| t == topic) {
            return TableState::Stalled;
        }
        TableState::Ok
    }

    /// Whether `topic` fails for any reason, its writes or its consumer.
    pub fn is_failing(&self, topic: &str) -> bool {
        self.failing_topics().contains_key(topic)
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rebalanced(&self) {
        self.rebalances.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn paused(&self) {
        self.pauses.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn offset_moved(&self) {
        self.offsets_moved.fetch_add(1, Ordering::Relaxed);
    }

    /// `topic` stopped until an operator acts: readiness reports `reason`.
    pub(crate) fn table_stopped(&self, topic: &str, reason: &str) {
        self.tables_stopped.fetch_add(1, Ordering::Relaxed);
        self.set_write_failure(topic, None, Some(format!("stopped: {reason}")));
    }

    fn progress_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Table, i32), Progress>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The consumer of `table` has fetched up to (not including) these offsets.
    pub(crate) fn fetched(&self, table: Table, next: impl Iterator<Item = (i32, i64)>) {
        let mut progress = self.progress_map();
        for (partition, offset) in next {
            progress.entry((table, partition)).or_default().fetched = Some(offset);
        }
    }

    /// A batch of `table` landed; its last record of `partition` bore `timestamp_ms`.
    pub(crate) fn written(&self, table: Table, partition: i32, timestamp_ms: Option<i64>) {
        if let Some(ts) = timestamp_ms {
            self.progress_map().entry((table, partition)).or_default().written_at = Some(ts);
        }
    }

    /// The consumer of `table` ended: what it fetched is gone.
    pub(crate) fn forget(&self, table: Table) {
        self.progress_map().retain(|(t, _), _| *t != table);
    }

    /// `partition` of `table` was revoked.
    pub(crate) fn forget_partition(&self, table: Table, partition: i32) {
        self.progress_map().remove(&(table, partition));
    }

    /// Every consumed partition's progress, now.
    pub fn progress(&self) -> BTreeMap<(Table, i32), Progress> {
        self.progress_map().clone()
    }

    pub fn counters(&self) -> Counters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            rows: load(&self.rows),
            inserted: load(&self.inserted),
            updated: load(&self.updated),
            skipped: load(&self.skipped),
            rejects: load(&self.rejects),
            bytes: load(&self.bytes),
            batches: load(&self.batches),
            retries: load(&self.retries),
            offsets_moved: load(&self.offsets_moved),
            tables_stopped: load(&self.tables_stopped),
            rebalances: load(&self.rebalances),
            pauses: load(&self.pauses),
        }
    }

    /// The `q` quantile (0..=1) of flush latency, if any batch was written.
    pub fn flush_latency(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        quantile(&mut sorted, q).map(Duration::from_micros)
    }

    /// Why each failing topic fails, by topic: its consumer's failure first, then
    /// its writes'.
    pub fn failing_topics(&self) -> HashMap<String, String> {
        let mut causes: HashMap<String, String> = HashMap::new();
        let kafka = self.kafka_failing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (topic, cause) in kafka.into_iter().chain(self.write_causes()) {
            causes
                .entry(topic)
                .and_modify(|c| *c = format!("{c}; {cause}"))
                .or_insert(cause);
        }
        causes
    }

    /// Which tables fail and in what way (`dwh.a (kafka authorization), dwh.b (DWH
    /// writes), dwh.c (stopped)`), with no detail: for readiness, which anyone may read.
    pub fn failing_brief(&self) -> Option<String> {
        let kafka = self.kafka_failing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let writes = self.write_causes();
        let stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut brief: Vec<String> = kafka
            .iter()
            .map(|(topic, cause)| {
                // The cause reads "kafka <kind>: <librdkafka's reason>".
                let kind = cause.split(':').next().unwrap_or("kafka");
                format!("{topic} ({kind})")
            })
            .chain(writes.iter().map(|(topic, cause)| {
                let kind = if cause.starts_with("stopped:") {
                    "stopped"
                } else {
                    "DWH writes"
                };
                format!("{topic} ({kind})")
            }))
            .chain(stalled.iter().map(|(topic, _)| format!("{topic} (stalled)")))
            .collect();
        brief.sort();
        // One entry a table and kind, however many of its lanes fail.
        brief.dedup();
        (!brief.is_empty()).then(|| brief.join(", "))
    }

    /// Why tables fail or stall right now (`topic: cause`, by topic), or `None`
    /// when none does.
    pub fn failing(&self) -> Option<String> {
        let mut failing: Vec<(String, String)> = self.failing_topics().into_iter().collect();
        let stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner()).clone();
        failing.extend(
            stalled
                .into_iter()
                .map(|(topic, cause)| (topic, format!("stalled: {cause}"))),
        );
        failing.sort();
        (!failing.is_empty()).then(|| {
            failing
                .iter()
                .map(|(topic, cause)| format!("{topic}: {cause}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// The nearest-rank quantile.
fn quantile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q.clamp(0.0, 1.0) * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), Some(50));
        assert_eq!(quantile(&mut v, 0.99), Some(99));
        assert_eq!(quantile(&mut v, 1.0), Some(100));
        assert_eq!(quantile(&mut v, 0.0), Some(1));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn counters_and_failures_are_reported() {
        let s = IngestStatus::default();
        let outcome = |inserted, updated, skipped| WriteOutcome {
            inserted,
            updated,
            skipped,
            ..WriteOutcome::default()
        };
        s.batch_written(&outcome(8, 1, 1), 2, 1000, Duration::from_millis(5));
        s.batch_written(&outcome(5, 0, 0), 0, 500, Duration::from_millis(7));
        s.retried();
        assert_eq!(
            s.counters(),
            Counters {
                rows: 15,
                inserted: 13,
                updated: 1,
                skipped: 1,
                rejects: 2,
                bytes: 1500,
                batches: 2,
                retries: 1,
                ..Counters::default()
            }
        );
        assert_eq!(s.flush_latency(0.99), Some(Duration::from_millis(7)));
        assert_eq!(s.failing(), None);
        s.set_failing("dwh.a", 0, Some("database unreachable: refused".into()));
        s.set_failing("dwh.b", 0, Some("x".into()));
        assert!(s.set_failing("dwh.b", 0, None), "a failure was cleared");
        assert!(!s.set_failing("dwh.b", 0, None), "nothing left to clear");
        assert_eq!(s.failing().as_deref(), Some("dwh.a: database unreachable: refused"));
        // A consumer's failure stays whatever the writes do.
        assert!(s.set_kafka_failing("dwh.b", Some("kafka authorization: denied".into())));
        assert!(!s.set_kafka_failing("dwh.b", Some("kafka authorization: denied again".into())));
        s.set_failing("dwh.b", 0, None);
        assert!(s.is_failing("dwh.b"));
        s.set_failing("dwh.a", 0, Some("x".into()));
        s.set_kafka_failing("dwh.a", Some("kafka tls: untrusted".into()));
        assert_eq!(
            s.failing().as_deref(),
            Some("dwh.a: kafka tls: untrusted; x; dwh.b: kafka authorization: denied again")
        );
        assert_eq!(
            s.failing_brief().as_deref(),
            Some("dwh.a (DWH writes), dwh.a (kafka tls), dwh.b (kafka authorization)")
        );
        assert!(s.set_kafka_failing("dwh.b", None));
        assert!(!s.is_failing("dwh.b"));
        s.table_stopped("dwh.c", "offset above the high watermark");
        assert!(s.failing_brief().expect("failing").ends_with("dwh.c (stopped)"));
        assert_eq!(s.state("dwh.c"), TableState::Stopped);
        assert_eq!(s.state("dwh.a"), TableState::Failing);
    }

    #[test]
    fn only_a_lanes_own_write_clears_its_failure() {
        let s = IngestStatus::default();
        s.set_failing("dwh.a", 0, Some("canceling statement due to statement timeout".into()));
        assert!(!s.set_failing("dwh.a", 1, None), "lane 1 had nothing to clear");
        assert_eq!(
            s.failing().as_deref(),
            Some("dwh.a: canceling statement due to statement timeout"),
            "lane 1's write does not clear lane 0"
        );
        s.set_failing("dwh.a", 1, Some("canceling statement due to statement timeout".into()));
        assert_eq!(
            s.failing().as_deref(),
            Some("dwh.a: canceling statement due to statement timeout"),
            "two lanes failing alike read once"
        );
        assert_eq!(s.failing_brief().as_deref(), Some("dwh.a (DWH writes)"));
        assert!(s.set_failing("dwh.a", 0, None));
        assert!(s.is_failing("dwh.a"), "lane 1 still fails");
        // Lane 1 lost its partitions: its failure is its new owner's to report.
        assert!(s.lanes_held("dwh.a", &[0]), "a failure ended");
        assert!(!s.is_failing("dwh.a"));
        assert!(!s.lanes_held("dwh.a", &[0]), "none left to end");
        // A stopped table is not a lane's: no lane's write or rebalance clears it.
        s.table_stopped("dwh.a", "offset above the high watermark");
        assert!(!s.set_failing("dwh.a", 0, None));
        assert!(!s.lanes_held("dwh.a", &[]), "a stop is no lane's failure");
        assert_eq!(s.state("dwh.a"), TableState::Stopped);
    }

    #[test]
    fn a_stall_is_reported_beside_failures_and_names_the_last_error() {
        let s = IngestStatus::default();
        assert_eq!(s.state("dwh.a"), TableState::Ok);
        s.set_failing("dwh.a", 0, Some("database unreachable".into()));
        s.set_failing("dwh.a", 0, None);
        assert_eq!(
            s.last_error("dwh.a").as_deref(),
            Some("database unreachable"),
            "kept after it cleared"
        );
        assert!(s.set_stalled("dwh.a", Some("10 records wait".into())));
        assert!(!s.set_stalled("dwh.a", Some("11 records wait".into())), "still stalled");
        assert_eq!(s.state("dwh.a"), TableState::Stalled);
        assert!(!s.is_failing("dwh.a"), "a stall is not a failure of writes or Kafka");
        assert_eq!(s.failing_brief().as_deref(), Some("dwh.a (stalled)"));
        assert_eq!(s.failing().as_deref(), Some("dwh.a: stalled: 11 records wait"));
        // A failure outranks the stall in the state gauge.
        s.set_kafka_failing("dwh.a", Some("kafka authorization: denied".into()));
        assert_eq!(s.state("dwh.a"), TableState::Failing);
        assert!(s.set_stalled("dwh.a", None));
        assert!(!s.set_stalled("dwh.a", None));
    }
}
