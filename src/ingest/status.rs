//! What the ingest role reports while it runs: counters for the demo, the bench
//! and ops, and whether DWH writes are failing (readiness goes 503 while they are).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Shared between the ingest tasks and whoever watches them.
#[derive(Debug, Default)]
pub struct IngestStatus {
    rows: AtomicU64,
    rejects: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    /// Flush latencies in microseconds, the most recent [`LATENCY_SAMPLES`].
    latencies: Mutex<Vec<u64>>,
    /// Why writes are failing right now, per topic.
    failing: Mutex<Vec<(String, String)>>,
}

const LATENCY_SAMPLES: usize = 100_000;

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rows: u64,
    pub rejects: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl IngestStatus {
    pub(crate) fn batch_written(&self, rows: usize, rejects: usize, bytes: usize, took: Duration) {
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.rejects.fetch_add(rejects as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let mut latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if latencies.len() >= LATENCY_SAMPLES {
            latencies.remove(0);
        }
        latencies.push(took.as_micros() as u64);
    }

    pub(crate) fn set_failing(&self, topic: &str, cause: Option<String>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.retain(|(t, _)| t != topic);
        if let Some(cause) = cause {
            failing.push((topic.to_owned(), cause));
        }
    }

    pub fn counters(&self) -> Counters {
        Counters {
            rows: self.rows.load(Ordering::Relaxed),
            rejects: self.rejects.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }

    /// The `q` quantile (0..=1) of flush latency, if any batch was written.
    pub fn flush_latency(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        quantile(&mut sorted, q).map(Duration::from_micros)
    }

    /// Why DWH writes fail right now (`topic: cause`), or `None` when they do not.
    pub fn failing(&self) -> Option<String> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
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
        s.batch_written(10, 2, 1000, Duration::from_millis(5));
        s.batch_written(5, 0, 500, Duration::from_millis(7));
        assert_eq!(
            s.counters(),
            Counters {
                rows: 15,
                rejects: 2,
                bytes: 1500,
                batches: 2
            }
        );
        assert_eq!(s.flush_latency(0.99), Some(Duration::from_millis(7)));
        assert_eq!(s.failing(), None);
        s.set_failing("dwh.a", Some("database unreachable: refused".into()));
        s.set_failing("dwh.b", Some("x".into()));
        s.set_failing("dwh.b", None);
        assert_eq!(s.failing().as_deref(), Some("dwh.a: database unreachable: refused"));
    }
}
