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
use prometheus_client::registry::{Registry, Unit};

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
    pub consumer_restarts: Counters,
    pub rebalances: Counters,
    pub partitions_assigned: Gauges,
    pub offsets_moved: Counters,
    pub fetch_pauses: Counters,
    pub failing: Gauges,
    pub table_stopped: Gauges,
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
        let mut registry = Registry::with_prefix("dwh_helper");
        let m = Metrics {
            registry: Registry::default(),
            partition_labels,
            started: Instant::now(),
            records_consumed: Counters::default(),
            rows_inserted: Counters::default(),
            rows_updated: Counters::default(),
            rows_skipped: Counters::default(),
            rejects: Counters::default(),
            ingested_bytes: Counters::default(),
            batches: Counters::default(),
            flush_duration: Histograms::new_with_constructor(flush_buckets),
            buffered_records: Gauges::default(),
            memory_held: Gauges::default(),
            memory_budget: Gauges::default(),
            write_retries: Counters::default(),
            batches_fenced: Counters::default(),
            batches_aborted: Counters::default(),
            offset_read_retries: Counters::default(),
            consumer_restarts: Counters::default(),
            rebalances: Counters::default(),
            partitions_assigned: Gauges::default(),
            offsets_moved: Counters::default(),
            fetch_pauses: Counters::default(),
            failing: Gauges::default(),
            kafka_errors: Counters::default(),
            table_stopped: Gauges::default(),
            consumer_lag: Gauges::default(),
            consumer_lag_seconds: FloatGauges::default(),
            buffer_lag: Gauges::default(),
            archive_lag: Gauges::default(),
            lag_probe_failures: Counters::default(),
            dwh_up: Gauges::default(),
            kafka_up: Gauges::default(),
            archive_objects: Counters::default(),
            archive_bytes: Counters::default(),
            archive_upload_duration: Histograms::new_with_constructor(upload_buckets),
            archive_failures: Counters::default(),
            archive_kept: Counters::default(),
            otlp_failures: Counters::default(),
            appmetrica_windows: Gauges::default(),
            appmetrica_rows_fetched: Counters::default(),
            appmetrica_rows_published: Counters::default(),
            appmetrica_responses: Counters::default(),
            appmetrica_polls: Counters::default(),
            appmetrica_window_duration: Histograms::new_with_constructor(window_buckets),
            http_requests: Counters::default(),
            http_duration: Histograms::new_with_constructor(http_buckets),
            http_in_flight: Gauge::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            uptime: Gauge::default(),
        };
        let r = &mut registry;
        // Counters get `_total` from the registry; units are spelled in the name.
        r.register(
            "records_consumed",
            "Records read from the table's topic into batches",
            m.records_consumed.clone(),
        );
        r.register("rows_inserted", "Rows whose key was new", m.rows_inserted.clone());
        r.register(
            "rows_updated",
            "Rows that replaced an older stored version",
            m.rows_updated.clone(),
        );
        r.register(
            "rows_skipped",
            "Rows stored already (a replay or a redelivery): nothing changed",
            m.rows_skipped.clone(),
        );
        r.register(
            "rejects",
            "Records stored in dwh_rejected_records, by reason class",
            m.rejects.clone(),
        );
        r.register_with_unit(
            "ingested",
            "Record bytes of landed batches",
            Unit::Bytes,
            m.ingested_bytes.clone(),
        );
        r.register(
            "batches",
            "Batches committed to the DWH with their offsets",
            m.batches.clone(),
        );
        r.register_with_unit(
            "batch_flush_duration",
            "Time to write one batch, retries included",
            Unit::Seconds,
            m.flush_duration.clone(),
        );
        r.register(
            "buffered_records",
            "Records fetched and not yet committed to the DWH",
            m.buffered_records.clone(),
        );
        r.register_with_unit(
            "memory_held",
            "Record bytes held in memory (charged twice their size)",
            Unit::Bytes,
            m.memory_held.clone(),
        );
        r.register_with_unit(
            "memory_budget",
            "The table's share of KAFKA_MAX_IN_FLIGHT_BYTES",
            Unit::Bytes,
            m.memory_budget.clone(),
        );
        r.register(
            "write_retries",
            "Failed DWH writes, each retried as the same batch",
            m.write_retries.clone(),
        );
        r.register(
            "batches_fenced",
            "Batches dropped because another member moved the offset",
            m.batches_fenced.clone(),
        );
        r.register(
            "batches_aborted",
            "Batches whose write the shutdown grace period cancelled (read again by the next owner)",
            m.batches_aborted.clone(),
        );
        r.register(
            "offset_read_retries",
            "Failed reads of the DWH's stored offsets for an assignment, each retried",
            m.offset_read_retries.clone(),
        );
        r.register(
            "consumer_restarts",
            "Consumers rebuilt after a fence, a failure or a fetch out of range, by table and role",
            m.consumer_restarts.clone(),
        );
        r.register(
            "rebalances",
            "Partition assignments and revocations",
            m.rebalances.clone(),
        );
        r.register(
            "partitions_assigned",
            "Partitions this process consumes",
            m.partitions_assigned.clone(),
        );
        r.register(
            "offsets_moved",
            "Stored offsets outside the log moved as KAFKA_ON_OFFSET_OUT_OF_RANGE asks",
            m.offsets_moved.clone(),
        );
        r.register(
            "fetch_pauses",
            "Times fetching paused: memory budget spent or the writer behind",
            m.fetch_pauses.clone(),
        );
        r.register(
            "failing",
            "1 while the table fails: its DWH writes, or its consumer's Kafka access (the cause is logged and in status)",
            m.failing.clone(),
        );
        r.register(
            "kafka_errors",
            "Kafka failures a person must act on, by table, role and kind (authentication, tls, authorization, unreadable records)",
            m.kafka_errors.clone(),
        );
        r.register(
            "table_stopped",
            "1 when a stored offset does not fit the log and the table waits for an operator",
            m.table_stopped.clone(),
        );
        r.register_with_unit(
            "consumer_lag",
            "High watermark minus the offset stored in the DWH",
            Unit::Other("records".into()),
            m.consumer_lag.clone(),
        );
        r.register_with_unit(
            "consumer_lag",
            "Now minus the Kafka timestamp of the last written record, 0 when caught up",
            Unit::Seconds,
            m.consumer_lag_seconds.clone(),
        );
        r.register_with_unit(
            "buffer_lag",
            "Records fetched into memory but not yet committed in the DWH",
            Unit::Other("records".into()),
            m.buffer_lag.clone(),
        );
        r.register_with_unit(
            "archive_lag",
            "High watermark minus the archive group's committed offset",
            Unit::Other("records".into()),
            m.archive_lag.clone(),
        );
        r.register(
            "lag_probe_failures",
            "Lag measurements that could not reach the DWH or the broker",
            m.lag_probe_failures.clone(),
        );
        r.register("dwh_up", "1 when the DWH answered the last probe", m.dwh_up.clone());
        r.register(
            "kafka_up",
            "1 when the broker answered the last probe",
            m.kafka_up.clone(),
        );
        r.register(
            "archive_objects",
            "Archive objects stored in S3",
            m.archive_objects.clone(),
        );
        r.register_with_unit(
            "archive",
            "Compressed bytes of archive objects stored",
            Unit::Bytes,
            m.archive_bytes.clone(),
        );
        r.register_with_unit(
            "archive_upload_duration",
            "Time to store one archive object",
            Unit::Seconds,
            m.archive_upload_duration.clone(),
        );
        r.register(
            "archive_failures",
            "Failed archive uploads (each retried)",
            m.archive_failures.clone(),
        );
        r.register(
            "otlp_export_failures",
            "OTLP exports that failed (the data is dropped)",
            m.otlp_failures.clone(),
        );
        r.register(
            "archive_objects_kept",
            "Objects found stored under their key already (kept; the archive goes on after them)",
            m.archive_kept.clone(),
        );
        r.register(
            "appmetrica_windows",
            "AppMetrica export windows recorded, by state",
            m.appmetrica_windows.clone(),
        );
        r.register(
            "appmetrica_rows_fetched",
            "Rows read from AppMetrica exports",
            m.appmetrica_rows_fetched.clone(),
        );
        r.register(
            "appmetrica_rows_published",
            "Rows published onto the topics from AppMetrica exports",
            m.appmetrica_rows_published.clone(),
        );
        r.register(
            "appmetrica_responses",
            "Logs API responses by status class",
            m.appmetrica_responses.clone(),
        );
        r.register(
            "appmetrica_polls",
            "Logs API requests made (202 polls included)",
            m.appmetrica_polls.clone(),
        );
        r.register_with_unit(
            "appmetrica_window_duration",
            "Time to fetch and publish one window",
            Unit::Seconds,
            m.appmetrica_window_duration.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "HTTP request duration by route template and method",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        r.register(
            "http_requests_in_flight",
            "HTTP requests being served",
            m.http_in_flight.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident set size",
            Unit::Bytes,
            m.resident_memory.clone(),
        );
        r.register("process_open_fds", "Open file descriptors", m.open_fds.clone());
        r.register_with_unit(
            "uptime",
            "Time since the process started",
            Unit::Seconds,
            m.uptime.clone(),
        );
        r.register(
            "build",
            "The running build",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("commit", env!("DWH_HELPER_GIT_COMMIT").to_owned()),
            ]),
        );
        Metrics { registry, ..m }
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
