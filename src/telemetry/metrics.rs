//! The process's metrics: one registry, served as Prometheus text on `/metrics`.
//!
//! `prometheus-client` (the Prometheus project's own Rust client) holds them: its
//! families are lock-free atomics behind a read lock, and its text encoder is the
//! reference format. The instruments are updated in one place, the events of
//! [`super::events`]; the lag loop (`status::lag`) and the scrape itself set the
//! gauges that are measured rather than counted.
//!
//! Labels are bounded: `table` (seven), `partition` (unless
//! `METRICS_PARTITION_LABELS=false`, when partition series fold into their table),
//! a reason or state class, an HTTP route template and method. Never a raw path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::catalogue::Table;

/// A label set: a few `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Every instrument of the process.
#[allow(missing_debug_implementations)]
pub struct Metrics {
    registry: Registry,
    partition_labels: bool,
    started: Instant,

    // Ingest, per table.
    pub records_consumed: Counters,
    pub rows_inserted: Counters,
    pub rows_updated: Counters,
    pub rows_skipped: Counters,
    pub rejects: Counters,
    pub ingested_bytes: Counters,
    pub batches: Counters,
    pub flush_duration: Histograms,
    pub buffered_records: Gauges,
    pub memory_held: Gauges,
    pub memory_budget: Gauges,
    pub write_retries: Counters,
    pub batches_fenced: Counters,
    pub batches_aborted: Counters,
    pub offset_read_retries: Counters,
    pub assignments_deferred: Counters,
    pub consumer_restarts: Counters,
    pub rebalances: Counters,
    pub partitions_assigned: Gauges,
    pub offsets_moved: Counters,
    pub records_lost: Counters,
    pub fetch_pauses: Counters,
    pub failing: Gauges,
    pub table_stopped: Gauges,
    pub table_state: Gauges,
    pub kafka_errors: Counters,

    // Lag, per partition (or per table with partition labels off).
    pub consumer_lag: Gauges,
    pub consumer_lag_seconds: FloatGauges,
    pub buffer_lag: Gauges,
    pub archive_lag: Gauges,
    pub lag_probe_failures: Counters,
    pub dwh_up: Gauges,
    pub kafka_up: Gauges,

    // Archive, per table.
    pub archive_objects: Counters,
    pub archive_bytes: Counters,
    pub archive_upload_duration: Histograms,
    pub archive_failures: Counters,
    pub archive_kept: Counters,
    pub otlp_failures: Counters,

    // AppMetrica.
    pub appmetrica_windows: Gauges,
    pub appmetrica_rows_fetched: Counters,
    pub appmetrica_rows_published: Counters,
    pub appmetrica_responses: Counters,
    pub appmetrica_polls: Counters,
    pub appmetrica_window_duration: Histograms,

    // HTTP.
    pub http_requests: Counters,
    pub http_duration: Histograms,
    pub http_in_flight: Gauge,

    // Process, set at each scrape.
    resident_memory: Gauge,
    open_fds: Gauge,
    uptime: Gauge<f64, AtomicU64>,
}

/// The duration histograms: exposition name and bucket bounds (start, factor,
/// count), shared by `/metrics` and the OTLP export.
pub const FLUSH_DURATION: (&str, f64, f64, u16) = ("dwh_helper_batch_flush_duration_seconds", 0.001, 2.0, 17);
pub const HTTP_DURATION: (&str, f64, f64, u16) = ("dwh_helper_http_request_duration_seconds", 0.0005, 2.0, 16);
pub const UPLOAD_DURATION: (&str, f64, f64, u16) = ("dwh_helper_archive_upload_duration_seconds", 0.01, 2.0, 15);
pub const WINDOW_DURATION: (&str, f64, f64, u16) = ("dwh_helper_appmetrica_window_duration_seconds", 1.0, 2.0, 14);

/// The bucket bounds of a histogram.
pub fn bounds((_, start, factor, count): (&str, f64, f64, u16)) -> Vec<f64> {
    exponential_buckets(start, factor, count).collect()
}

fn flush_buckets() -> Histogram {
    Histogram::new(bounds(FLUSH_DURATION))
}

fn http_buckets() -> Histogram {
    Histogram::new(bounds(HTTP_DURATION))
}

fn upload_buckets() -> Histogram {
    Histogram::new(bounds(UPLOAD_DURATION))
}

fn window_buckets() -> Histogram {
    Histogram::new(bounds(WINDOW_DURATION))
}

const FAILING_HELP: &str =
    "1 while the table fails: its DWH writes, or its consumer's Kafka access (the cause is logged and in status)";
const KAFKA_ERRORS_HELP: &str = "Kafka errors by table, role and kind: failures a person must act on (authentication, tls, authorization, unreadable records, topic deleted) fail an ingest table; the transient kinds are named by where they happened (client, consume, commit, rebalance, pause, close, poll, out_of_range, watermarks, committed, describe, log, unknown topic)";

/// The registry, each instrument registered as it is made: its name, help
/// and unit stand beside it. Counters get `_total` from the registry; units
/// are spelled in the name.
struct Builder(Registry);

impl Builder {
    fn add<M: Metric + Clone + Default>(&mut self, name: &str, unit: Option<Unit>, help: &str) -> M {
        self.register(name, unit, help, M::default())
    }

    /// A histogram of seconds, with its buckets.
    fn histogram(&mut self, name: &str, help: &str, buckets: fn() -> Histogram) -> Histograms {
        self.register(
            name,
            Some(Unit::Seconds),
            help,
            Histograms::new_with_constructor(buckets),
        )
    }

    fn register<M: Metric + Clone>(&mut self, name: &str, unit: Option<Unit>, help: &str, metric: M) -> M {
        match unit {
            Some(unit) => self.0.register_with_unit(name, help, unit, metric.clone()),
            None => self.0.register(name, help, metric.clone()),
        }
        metric
    }
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();
static PARTITION_LABELS: AtomicU64 = AtomicU64::new(1);

/// Chooses whether per-partition series carry a `partition` label; call before
/// the first metric is touched (the configuration does, at start).
pub fn configure(partition_labels: bool) {
    PARTITION_LABELS.store(u64::from(partition_labels), Ordering::Relaxed);
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    GLOBAL.get_or_init(|| Metrics::new(PARTITION_LABELS.load(Ordering::Relaxed) == 1))
}

impl Metrics {
    fn new(partition_labels: bool) -> Self {
        let r = &mut Builder(Registry::with_prefix("dwh_helper"));
        let mut m = Metrics {
            registry: Registry::default(),
            partition_labels,
            started: Instant::now(),
            records_consumed: r.add(
                "records_consumed",
                None,
                "Records read from the table's topic into batches",
            ),
            rows_inserted: r.add("rows_inserted", None, "Rows whose key was new"),
            rows_updated: r.add("rows_updated", None, "Rows that replaced an older stored version"),
            rows_skipped: r.add(
                "rows_skipped",
                None,
                "Rows stored already (a replay or a redelivery): nothing changed",
            ),
            rejects: r.add(
                "rejects",
                None,
                "Records stored in dwh_rejected_records, by reason class",
            ),
            ingested_bytes: r.add("ingested", Some(Unit::Bytes), "Record bytes of landed batches"),
            batches: r.add("batches", None, "Batches committed to the DWH with their offsets"),
            flush_duration: r.histogram(
                "batch_flush_duration",
                "Time to write one batch, retries included",
                flush_buckets,
            ),
            buffered_records: r.add(
                "buffered_records",
                None,
                "Records fetched and not yet committed to the DWH",
            ),
            memory_held: r.add(
                "memory_held",
                Some(Unit::Bytes),
                "Record bytes held in memory (charged twice their size)",
            ),
            memory_budget: r.add(
                "memory_budget",
                Some(Unit::Bytes),
                "The table's share of KAFKA_MAX_IN_FLIGHT_BYTES",
            ),
            write_retries: r.add(
                "write_retries",
                None,
                "Failed DWH writes, each retried as the same batch",
            ),
            batches_fenced: r.add(
                "batches_fenced",
                None,
                "Batches dropped because another member moved the offset",
            ),
            batches_aborted: r.add(
                "batches_aborted",
                None,
                "Batches whose write the shutdown grace period cancelled (read again by the next owner)",
            ),
            offset_read_retries: r.add(
                "offset_read_retries",
                None,
                "Failed reads of the DWH's stored offsets for an assignment, each retried",
            ),
            assignments_deferred: r.add(
                "assignments_deferred",
                None,
                "Assignments assigned paused because the table's task could not give their start offsets in time",
            ),
            records_lost: r.add(
                "records_lost",
                None,
                "Records a stored offset was moved past without writing them, by table, partition and cause \
                 (retention: expired before they were written; skipped: at the operator's ask); each is a row \
                 of dwh_offset_gaps",
            ),
            consumer_restarts: r.add(
                "consumer_restarts",
                None,
                "Consumers rebuilt after a fence, a failure or a fetch out of range, by table and role",
            ),
            rebalances: r.add("rebalances", None, "Partition assignments and revocations"),
            partitions_assigned: r.add("partitions_assigned", None, "Partitions this process consumes"),
            offsets_moved: r.add(
                "offsets_moved",
                None,
                "Stored offsets outside the log moved as KAFKA_ON_OFFSET_OUT_OF_RANGE asks",
            ),
            fetch_pauses: r.add(
                "fetch_pauses",
                None,
                "Times fetching paused: memory budget spent or the writer behind",
            ),
            failing: r.add("failing", None, FAILING_HELP),
            kafka_errors: r.add("kafka_errors", None, KAFKA_ERRORS_HELP),
            table_state: r.add(
                "table_state",
                None,
                "1 for the state each ingested table is in (ok, stalled, failing, stopped), 0 for the others",
            ),
            table_stopped: r.add(
                "table_stopped",
                None,
                "1 when a stored offset does not fit the log and the table waits for an operator",
            ),
            consumer_lag: r.add(
                "consumer_lag",
                Some(Unit::Other("records".into())),
                "High watermark minus the offset stored in the DWH",
            ),
            consumer_lag_seconds: r.add(
                "consumer_lag",
                Some(Unit::Seconds),
                "Now minus the Kafka timestamp of the last written record, 0 when caught up",
            ),
            buffer_lag: r.add(
                "buffer_lag",
                Some(Unit::Other("records".into())),
                "Records fetched into memory but not yet committed in the DWH",
            ),
            archive_lag: r.add(
                "archive_lag",
                Some(Unit::Other("records".into())),
                "High watermark minus the archive group's committed offset",
            ),
            lag_probe_failures: r.add(
                "lag_probe_failures",
                None,
                "Lag measurements that could not reach the DWH or the broker",
            ),
            dwh_up: r.add("dwh_up", None, "1 when the DWH answered the last probe"),
            kafka_up: r.add("kafka_up", None, "1 when the broker answered the last probe"),
            archive_objects: r.add("archive_objects", None, "Archive objects stored in S3"),
            archive_bytes: r.add(
                "archive",
                Some(Unit::Bytes),
                "Compressed bytes of archive objects stored",
            ),
            archive_upload_duration: r.histogram(
                "archive_upload_duration",
                "Time to store one archive object",
                upload_buckets,
            ),
            archive_failures: r.add("archive_failures", None, "Failed archive uploads (each retried)"),
            archive_kept: r.add(
                "archive_objects_kept",
                None,
                "Objects found stored under their key already (kept; the archive goes on after them)",
            ),
            otlp_failures: r.add(
                "otlp_export_failures",
                None,
                "OTLP exports that failed (the data is dropped)",
            ),
            appmetrica_windows: r.add(
                "appmetrica_windows",
                None,
                "AppMetrica export windows recorded, by state",
            ),
            appmetrica_rows_fetched: r.add("appmetrica_rows_fetched", None, "Rows read from AppMetrica exports"),
            appmetrica_rows_published: r.add(
                "appmetrica_rows_published",
                None,
                "Rows published onto the topics from AppMetrica exports",
            ),
            appmetrica_responses: r.add("appmetrica_responses", None, "Logs API responses by status class"),
            appmetrica_polls: r.add("appmetrica_polls", None, "Logs API requests made (202 polls included)"),
            appmetrica_window_duration: r.histogram(
                "appmetrica_window_duration",
                "Time to fetch and publish one window",
                window_buckets,
            ),
            http_requests: r.add(
                "http_requests",
                None,
                "HTTP requests by route template, method and status",
            ),
            http_duration: r.histogram(
                "http_request_duration",
                "HTTP request duration by route template and method",
                http_buckets,
            ),
            http_in_flight: r.add("http_requests_in_flight", None, "HTTP requests being served"),
            resident_memory: r.add("process_resident_memory", Some(Unit::Bytes), "Resident set size"),
            open_fds: r.add("process_open_fds", None, "Open file descriptors"),
            uptime: r.add("uptime", Some(Unit::Seconds), "Time since the process started"),
        };
        r.0.register(
            "build",
            "The running build",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("commit", env!("DWH_HELPER_GIT_COMMIT").to_owned()),
            ]),
        );
        m.registry = std::mem::take(&mut r.0);
        m
    }

    /// Labels of one table.
    pub fn table(table: Table) -> Labels {
        vec![("table", table.name().to_owned())]
    }

    /// Labels of one table and one more label.
    pub fn table_and(table: Table, name: &'static str, value: impl Into<String>) -> Labels {
        vec![("table", table.name().to_owned()), (name, value.into())]
    }

    /// Labels of a partition: the table alone when partition labels are off.
    pub fn partition(&self, table: Table, partition: i32) -> Labels {
        let mut labels = Self::table(table);
        if self.partition_labels {
            labels.push(("partition", partition.to_string()));
        }
        labels
    }

    /// The Prometheus text exposition of every metric, process gauges refreshed.
    pub fn encode(&self) -> String {
        let (rss, fds) = process_usage();
        self.resident_memory.set(rss as i64);
        self.open_fds.set(fds as i64);
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Resident bytes and open descriptors, from /proc (zero where there is none).
fn process_usage() -> (u64, u64) {
    let Ok(me) = procfs::process::Process::myself() else {
        return (0, 0);
    };
    let rss = me.status().ok().and_then(|s| s.vmrss).map_or(0, |kib| kib * 1024);
    let fds = me.fd_count().map_or(0, |n| n as u64);
    (rss, fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new(false);
        m.rows_inserted
            .get_or_create(&Metrics::table(Table::UserLocations))
            .inc_by(3);
        m.consumer_lag
            .get_or_create(&m.partition(Table::UserLocations, 7))
            .set(5);
        m.flush_duration
            .get_or_create(&Metrics::table(Table::UserLocations))
            .observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("dwh_helper_rows_inserted_total{table=\"user_locations\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("dwh_helper_consumer_lag_records{table=\"user_locations\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("dwh_helper_batch_flush_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("dwh_helper_build_info{version=\""), "{text}");
        assert!(!text.contains("partition="), "partition labels are off: {text}");
        let on = Metrics::new(true);
        on.consumer_lag
            .get_or_create(&on.partition(Table::UserLocations, 7))
            .set(5);
        assert!(on
            .encode()
            .contains("dwh_helper_consumer_lag_records{table=\"user_locations\",partition=\"7\"} 5\n"));
    }
}
