//! Configuration: environment variables (after `.env`), one block per prefix.
//!
//! Guarantees: the environment is read once; each block is read as strings with
//! `envy`, then validated by pure functions into typed values, so an invalid value
//! is reported as one line naming the variable (`DWH_MAX_ROWS_PER_INSERT: expected
//! a positive integer, got "abc"`) before any client is built. Unknown variables are
//! ignored. Secrets are held in [`Secret`] and never printed.

mod secret;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::catalogue::Table;

pub use secret::{Backend, DatabaseUrl, Secret};

/// A configuration error: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub problem: String,
}

impl ConfigError {
    fn new(variable: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            variable: variable.into(),
            problem: problem.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub dwh: DwhConfig,
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub appmetrica: AppMetricaConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
}

/// `METRICS_`: what `/metrics` exposes.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Per-partition series carry a `partition` label; off, they fold into their
    /// table (for clusters with thousands of partitions).
    pub partition_labels: bool,
    /// How often the lag loop reads the DWH's offsets and the watermarks.
    pub lag_interval: Duration,
}

/// `DWH_`: the warehouse database.
#[derive(Debug, Clone)]
pub struct DwhConfig {
    pub database_url: DatabaseUrl,
    /// No statement carries more bytes of row data than this.
    pub max_write_batch_bytes: usize,
    /// No statement of an API write carries more rows than this (an ingest
    /// batch is bounded by `KAFKA_BATCH_MAX_ROWS` and goes in one statement).
    pub max_rows_per_insert: usize,
    pub pool_size: u32,
    /// PostgreSQL's `statement_timeout` on every connection, and the base of the
    /// client-side limit of a write (a hung connection never holds a batch).
    pub statement_timeout: Duration,
    /// The `event_date`s `events_part` takes (DWH_EVENTS_MIN_DATE, DWH_EVENTS_MAX_DAYS_AHEAD).
    pub events_window: crate::catalogue::DateWindow,
}

/// `KAFKA_`: the broker and the ingest batches.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub bootstrap_servers: Option<String>,
    pub group_id: String,
    pub topic_prefix: String,
    pub batch_max_rows: usize,
    /// Lanes of a table's partitions (partition modulo lanes), each writing a
    /// batch of its own at once.
    pub write_lanes: usize,
    pub batch_max_bytes: usize,
    pub batch_linger: Duration,
    /// Bytes of consumed records held in memory at once, across all topics; the
    /// consumers stop fetching while it is reached.
    pub max_in_flight_bytes: usize,
    /// Create missing topics with `topic_partitions` partitions.
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub auto_offset_reset: OffsetReset,
    /// A partition with no DWH offset starts from the Kafka committed offset
    /// instead of `auto_offset_reset` (an old group adopted by a fresh DWH).
    pub adopt_committed_offsets: bool,
    /// What a stored offset outside the log does: stop the table, or move it.
    pub on_offset_out_of_range: OutOfRange,
    /// Static membership: each consumer joins as `{id}-{table}`.
    pub group_instance_id: Option<String>,
    /// The tables this instance ingests (`KAFKA_INGEST_TABLES`; all by default).
    /// Leaving one out pauses its ingest, e.g. while it is replayed.
    pub ingest_tables: Vec<Table>,
    /// The tables this instance archives (`KAFKA_ARCHIVE_TABLES`; all by default).
    pub archive_tables: Vec<Table>,
    pub shutdown_grace: Duration,
    /// `KAFKA_LIBRDKAFKA_SECURITY_PROTOCOL=SASL_SSL` → `security.protocol`.
    pub librdkafka: Vec<(String, Secret)>,
}

impl KafkaConfig {
    /// The value of the pass-through librdkafka property `name`, if set.
    fn librdkafka_property(&self, name: &str) -> Option<&str> {
        self.librdkafka
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.expose().trim())
    }

    /// Whether `KAFKA_LIBRDKAFKA_DEBUG` names librdkafka debug contexts.
    pub fn librdkafka_debug(&self) -> bool {
        self.librdkafka_property("debug").is_some_and(|v| !v.is_empty())
    }

    /// Whether the consumers use KIP-848's group protocol (`group.protocol=consumer`),
    /// under which the broker assigns partitions and times sessions.
    pub fn consumer_protocol(&self) -> bool {
        self.librdkafka_property("group.protocol")
            .is_some_and(|v| v.eq_ignore_ascii_case("consumer"))
    }
}

/// Where a partition without a stored offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// What a DWH offset outside the partition's log (above its high watermark or
/// below its low one) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfRange {
    /// Stop the table with an error naming the partition and both offsets.
    Stop,
    /// Move the offset to the low watermark, logged and counted.
    Earliest,
    /// Move the offset to the high watermark, logged and counted.
    Latest,
}

/// `S3_`: the object store.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub region: String,
    pub endpoint_url: Option<url::Url>,
    pub bucket_name: String,
    /// Bodies larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// The largest object `POST /s3/upload` and `PUT /s3/update` take (413 above).
    pub max_upload_bytes: u64,
    /// One S3 call, retries included, and one attempt of it.
    pub operation_timeout: Duration,
    pub attempt_timeout: Duration,
    /// Archive objects live under `{archive_prefix}/{table}/dt=…/`.
    pub archive_prefix: String,
    /// The `/s3/*` routes reach only keys under this prefix (ends with `/`);
    /// `None`: the whole bucket, the archive read-only.
    pub api_prefix: Option<String>,
    /// `GET /s3/objects` newest first reads at most this many entries of a
    /// prefix (beyond: `truncated`).
    pub list_scan_limit: usize,
    /// An archive object closes at this many bytes of records (before gzip)…
    pub archive_max_bytes: usize,
    /// …or this long after its first record.
    pub archive_interval: Duration,
}

impl S3Config {
    /// Whether an object store is configured (credentials or an endpoint).
    pub fn is_configured(&self) -> bool {
        self.access_key_id.is_some() || self.endpoint_url.is_some()
    }
}

/// `APPMETRICA_`: the Logs API.
#[derive(Debug, Clone)]
pub struct AppMetricaConfig {
    pub base_url: url::Url,
    pub api_key: Option<Secret>,
    pub application_id: Option<i64>,
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
    /// Exports fetched by the poller, in order.
    pub endpoints: Vec<String>,
    /// The first day the poller fetches (default: 7 days before the start).
    pub start_date: Option<chrono::NaiveDate>,
    /// How many recent days are fetched again once a day, for late data.
    pub refetch_days: u32,
    /// Exports in flight at once (the Logs API queues 3 per application).
    pub max_parallel: usize,
}

impl AppMetricaConfig {
    /// Whether the poller can run (a token and an application).
    pub fn is_configured(&self) -> bool {
        self.api_key.is_some() && self.application_id.is_some()
    }
}

/// The Logs API exports the poller knows how to map.
pub const APPMETRICA_ENDPOINTS: [&str; 4] = ["events", "installations", "sessions_starts", "profiles_v2"];

/// `LOG_`: logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter: a level (`info`) or directives (`info,dwh_helper=debug`).
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `HTTP_`: the API server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    pub api_token: Option<Secret>,
    pub max_body_bytes: usize,
    /// `POST /dwh/{table}`: the body (decompressed), the records, and how many such
    /// writes run at once (503 with Retry-After beyond).
    pub tables_max_body_bytes: usize,
    pub tables_max_records: usize,
    pub tables_max_concurrent_writes: usize,
    /// `GET /dwh/{table}`: a page stops after the row that takes it over this.
    pub tables_max_response_bytes: usize,
    /// A connection that has not sent a whole request head in this time is closed.
    pub header_read_timeout: Duration,
    /// A request (transfers excepted) not answered in this time gets 503.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// Every variable as the string the environment holds; empty counts as unset.
#[derive(Debug, Default, Deserialize)]
struct RawDwh {
    database_url: Option<String>,
    max_write_batch_bytes: Option<String>,
    max_rows_per_insert: Option<String>,
    pool_size: Option<String>,
    statement_timeout_seconds: Option<String>,
    events_min_date: Option<String>,
    events_max_days_ahead: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawKafka {
    bootstrap_servers: Option<String>,
    group_id: Option<String>,
    topic_prefix: Option<String>,
    batch_max_rows: Option<String>,
    write_lanes: Option<String>,
    batch_max_bytes: Option<String>,
    batch_linger_ms: Option<String>,
    max_in_flight_bytes: Option<String>,
    create_topics: Option<String>,
    topic_partitions: Option<String>,
    auto_offset_reset: Option<String>,
    adopt_committed_offsets: Option<String>,
    on_offset_out_of_range: Option<String>,
    group_instance_id: Option<String>,
    ingest_tables: Option<String>,
    archive_tables: Option<String>,
    shutdown_grace_seconds: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawS3 {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    bucket_name: Option<String>,
    multipart_threshold: Option<String>,
    max_upload_bytes: Option<String>,
    operation_timeout_seconds: Option<String>,
    attempt_timeout_seconds: Option<String>,
    archive_prefix: Option<String>,
    api_prefix: Option<String>,
    list_scan_limit: Option<String>,
    archive_max_bytes: Option<String>,
    archive_interval_seconds: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawAppMetrica {
    base_url: Option<String>,
    api_key: Option<String>,
    application_id: Option<String>,
    poll_interval_seconds: Option<String>,
    poll_timeout_seconds: Option<String>,
    endpoints: Option<String>,
    start_date: Option<String>,
    refetch_days: Option<String>,
    max_parallel: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawMetrics {
    partition_labels: Option<String>,
    lag_interval_seconds: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawHttp {
    bind: Option<String>,
    api_token: Option<String>,
    max_body_bytes: Option<String>,
    tables_max_body_bytes: Option<String>,
    tables_max_records: Option<String>,
    tables_max_concurrent_writes: Option<String>,
    tables_max_response_bytes: Option<String>,
    header_read_timeout_seconds: Option<String>,
    request_timeout_seconds: Option<String>,
    max_connections: Option<String>,
}

/// Variables under this prefix pass through to librdkafka.
pub const LIBRDKAFKA_PREFIX: &str = "KAFKA_LIBRDKAFKA_";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://dwh-helper.db";
const MIB: usize = 1024 * 1024;

impl Config {
    /// Loads `.env` if present (variables already set win), then reads the process
    /// environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::new(".env", format!("cannot be read: {e}"))),
        }
        Self::from_vars(std::env::vars())
    }

    /// Reads the configuration from `(name, value)` pairs.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        // Empty values mean "unset", as most deployment tools write them.
        let vars: Vec<(String, String)> = vars.into_iter().filter(|(_, v)| !v.trim().is_empty()).collect();
        let read = |prefix: &'static str| vars.clone().into_iter().filter(move |(k, _)| k.starts_with(prefix));
        Ok(Config {
            dwh: dwh(block("DWH_", read("DWH_"))?)?,
            kafka: kafka(block("KAFKA_", read("KAFKA_"))?, read(LIBRDKAFKA_PREFIX))?,
            s3: s3(block("S3_", read("S3_"))?)?,
            appmetrica: appmetrica(block("APPMETRICA_", read("APPMETRICA_"))?)?,
            log: log(block("LOG_", read("LOG_"))?)?,
            http: http(block("HTTP_", read("HTTP_"))?)?,
            metrics: metrics(block("METRICS_", read("METRICS_"))?)?,
        })
    }
}

fn block<T: serde::de::DeserializeOwned>(
    prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    // Every field is an optional string, so envy only fails on things like a
    // variable name it cannot map; report the block rather than guess.
    envy::prefixed(prefix)
        .from_iter(vars)
        .map_err(|e| ConfigError::new(format!("{prefix}*"), e.to_string()))
}

fn dwh(raw: RawDwh) -> Result<DwhConfig, ConfigError> {
    let database_url = DatabaseUrl::parse(raw.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL))
        .map_err(|p| ConfigError::new("DWH_DATABASE_URL", p))?;
    Ok(DwhConfig {
        database_url,
        max_write_batch_bytes: size("DWH_MAX_WRITE_BATCH_BYTES", raw.max_write_batch_bytes, 10 * MIB, 1024)?,
        max_rows_per_insert: count("DWH_MAX_ROWS_PER_INSERT", raw.max_rows_per_insert, 1000)?,
        pool_size: count("DWH_POOL_SIZE", raw.pool_size, 16)?
            .try_into()
            .map_err(|_| ConfigError::new("DWH_POOL_SIZE", "is too large"))?,
        statement_timeout: match seconds("DWH_STATEMENT_TIMEOUT_SECONDS", raw.statement_timeout_seconds, 60)? {
            zero if zero.is_zero() => {
                return Err(ConfigError::new("DWH_STATEMENT_TIMEOUT_SECONDS", "must be at least 1"))
            }
            timeout => timeout,
        },
        events_window: crate::catalogue::DateWindow {
            min: match raw.events_min_date.as_deref().map(str::trim) {
                None => crate::catalogue::DateWindow::default().min,
                Some(text) => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .ok()
                    .filter(|d| chrono::Datelike::year(d) >= 1)
                    .ok_or_else(|| {
                        ConfigError::new(
                            "DWH_EVENTS_MIN_DATE",
                            format!("expected a date YYYY-MM-DD, got \"{text}\""),
                        )
                    })?,
            },
            max_days_ahead: count("DWH_EVENTS_MAX_DAYS_AHEAD", raw.events_max_days_ahead, 366)?
                .try_into()
                .ok()
                .filter(|d| *d <= 36_500)
                .ok_or_else(|| ConfigError::new("DWH_EVENTS_MAX_DAYS_AHEAD", "is over 36500 (a century)"))?,
        },
    })
}

fn kafka(raw: RawKafka, passthrough: impl Iterator<Item = (String, String)>) -> Result<KafkaConfig, ConfigError> {
    let group_id = raw.group_id.unwrap_or_else(|| "dwh-helper".into());
    let topic_prefix = raw.topic_prefix.unwrap_or_else(|| "dwh.".into());
    let legal = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !legal(&topic_prefix) {
        return Err(ConfigError::new(
            "KAFKA_TOPIC_PREFIX",
            format!("\"{topic_prefix}\" may only hold ASCII letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(KafkaConfig {
        bootstrap_servers: raw.bootstrap_servers.map(|s| s.trim().to_owned()),
        group_id,
        topic_prefix,
        batch_max_rows: count("KAFKA_BATCH_MAX_ROWS", raw.batch_max_rows, 10_000)?,
        write_lanes: count("KAFKA_WRITE_LANES", raw.write_lanes, DEFAULT_WRITE_LANES)?,
        batch_max_bytes: size("KAFKA_BATCH_MAX_BYTES", raw.batch_max_bytes, 16 * MIB, 1024)?,
        batch_linger: Duration::from_millis(count("KAFKA_BATCH_LINGER_MS", raw.batch_linger_ms, 500)? as u64),
        max_in_flight_bytes: size("KAFKA_MAX_IN_FLIGHT_BYTES", raw.max_in_flight_bytes, 256 * MIB, MIB)?,
        create_topics: boolean("KAFKA_CREATE_TOPICS", raw.create_topics, false)?,
        topic_partitions: count("KAFKA_TOPIC_PARTITIONS", raw.topic_partitions, 4)?
            .try_into()
            .map_err(|_| ConfigError::new("KAFKA_TOPIC_PARTITIONS", "is too large"))?,
        auto_offset_reset: match raw
            .auto_offset_reset
            .as_deref()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("earliest") => OffsetReset::Earliest,
            Some("latest") => OffsetReset::Latest,
            Some(other) => {
                return Err(ConfigError::new(
                    "KAFKA_AUTO_OFFSET_RESET",
                    format!("expected \"earliest\" or \"latest\", got \"{other}\""),
                ))
            }
        },
        adopt_committed_offsets: boolean("KAFKA_ADOPT_COMMITTED_OFFSETS", raw.adopt_committed_offsets, false)?,
        on_offset_out_of_range: match raw
            .on_offset_out_of_range
            .as_deref()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("stop") => OutOfRange::Stop,
            Some("earliest") => OutOfRange::Earliest,
            Some("latest") => OutOfRange::Latest,
            Some(other) => {
                return Err(ConfigError::new(
                    "KAFKA_ON_OFFSET_OUT_OF_RANGE",
                    format!("expected \"stop\", \"earliest\" or \"latest\", got \"{other}\""),
                ))
            }
        },
        group_instance_id: raw.group_instance_id.map(|s| s.trim().to_owned()),
        ingest_tables: tables("KAFKA_INGEST_TABLES", raw.ingest_tables)?,
        archive_tables: tables("KAFKA_ARCHIVE_TABLES", raw.archive_tables)?,
        shutdown_grace: seconds("KAFKA_SHUTDOWN_GRACE_SECONDS", raw.shutdown_grace_seconds, 30)?,
        librdkafka: librdkafka_properties(passthrough)?,
    })
}

/// `KAFKA_INGEST_TABLES`: comma-separated table names; unset or empty means all.
/// A comma-separated list of tables in `var`; empty or unset means all seven.
fn tables(var: &'static str, raw: Option<String>) -> Result<Vec<Table>, ConfigError> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Ok(Table::ALL.to_vec());
    };
    let mut tables = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let table: Table = name.parse().map_err(|e| ConfigError::new(var, format!("{e}")))?;
        if !tables.contains(&table) {
            tables.push(table);
        }
    }
    tables.sort();
    Ok(tables)
}

/// librdkafka properties the service sets itself, with what to use instead.
const OWNED_PROPERTIES: [(&str, &str); 6] = [
    ("bootstrap.servers", "use KAFKA_BOOTSTRAP_SERVERS"),
    ("group.id", "use KAFKA_GROUP_ID"),
    ("group.instance.id", "use KAFKA_GROUP_INSTANCE_ID"),
    (
        "auto.offset.reset",
        "use KAFKA_AUTO_OFFSET_RESET (a partition with no DWH offset) or KAFKA_ON_OFFSET_OUT_OF_RANGE",
    ),
    ("enable.auto.commit", "offsets are stored in the DWH with each batch"),
    (
        "enable.auto.offset.store",
        "offsets are stored in the DWH with each batch",
    ),
];

/// `KAFKA_LIBRDKAFKA_SASL_PASSWORD=x` → (`sasl.password`, x). librdkafka property
/// names are lowercase words joined by dots, so the mapping is unambiguous.
fn librdkafka_properties(vars: impl Iterator<Item = (String, String)>) -> Result<Vec<(String, Secret)>, ConfigError> {
    let mut properties: Vec<(String, Secret)> = vars
        .map(|(name, value)| {
            let property = name[LIBRDKAFKA_PREFIX.len()..].to_ascii_lowercase().replace('_', ".");
            if property.is_empty() || property.split('.').any(str::is_empty) {
                return Err(ConfigError::new(name, "does not name a librdkafka property"));
            }
            if let Some((_, instead)) = OWNED_PROPERTIES.iter().find(|(owned, _)| *owned == property) {
                return Err(ConfigError::new(
                    name,
                    format!("{property} is set by dwh-helper (exactly once depends on it); {instead}"),
                ));
            }
            Ok((property, Secret::new(value)))
        })
        .collect::<Result<_, _>>()?;
    properties.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(properties)
}

fn boolean(variable: &str, raw: Option<String>, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            variable,
            format!("expected true or false, got \"{raw}\""),
        )),
    }
}

fn s3(raw: RawS3) -> Result<S3Config, ConfigError> {
    let endpoint_url = raw.endpoint_url.map(|u| http_url("S3_ENDPOINT_URL", &u)).transpose()?;
    let bucket_name = raw.bucket_name.unwrap_or_else(|| "default-bucket".into());
    let bucket_ok = (3..=63).contains(&bucket_name.len())
        && bucket_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !bucket_ok {
        return Err(ConfigError::new(
            "S3_BUCKET_NAME",
            format!("\"{bucket_name}\" is not a valid bucket name (3-63 lowercase letters, digits, '-' or '.')"),
        ));
    }
    let archive_prefix = archive_prefix(raw.archive_prefix)?;
    Ok(S3Config {
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key.map(Secret::new),
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        endpoint_url,
        bucket_name,
        multipart_threshold: size("S3_MULTIPART_THRESHOLD", raw.multipart_threshold, 16 * MIB, 5 * MIB)?,
        max_upload_bytes: max_upload(raw.max_upload_bytes)?,
        operation_timeout: seconds("S3_OPERATION_TIMEOUT_SECONDS", raw.operation_timeout_seconds, 300)?,
        attempt_timeout: seconds("S3_ATTEMPT_TIMEOUT_SECONDS", raw.attempt_timeout_seconds, 120)?,
        api_prefix: api_prefix(raw.api_prefix, &archive_prefix)?,
        list_scan_limit: count("S3_LIST_SCAN_LIMIT", raw.list_scan_limit, 10_000)?,
        archive_prefix,
        archive_max_bytes: size("S3_ARCHIVE_MAX_BYTES", raw.archive_max_bytes, 64 * MIB, 1024)?,
        archive_interval: seconds("S3_ARCHIVE_INTERVAL_SECONDS", raw.archive_interval_seconds, 60)?,
    })
}

/// Lanes per table: measured with `bench` on 2 cores (README, "Benchmarks").
pub const DEFAULT_WRITE_LANES: usize = 2;

/// S3's own largest object.
pub const S3_MAX_OBJECT_BYTES: u64 = 5 << 40;

fn max_upload(raw: Option<String>) -> Result<u64, ConfigError> {
    let bytes = size("S3_MAX_UPLOAD_BYTES", raw, 5 << 30, 1)? as u64;
    if bytes > S3_MAX_OBJECT_BYTES {
        return Err(ConfigError::new(
            "S3_MAX_UPLOAD_BYTES",
            format!("{bytes} is over S3's largest object, 5 TiB"),
        ));
    }
    Ok(bytes)
}

fn archive_prefix(raw: Option<String>) -> Result<String, ConfigError> {
    let prefix = raw
        .unwrap_or_else(|| "archive".into())
        .trim()
        .trim_matches('/')
        .to_owned();
    if prefix.is_empty() || prefix.len() > 200 || prefix.contains("//") {
        return Err(ConfigError::new(
            "S3_ARCHIVE_PREFIX",
            format!("\"{prefix}\" is not a usable key prefix (1-200 characters, no empty path segment)"),
        ));
    }
    Ok(prefix)
}

/// `S3_API_PREFIX`, kept with its trailing `/`; blank is unset. Under the
/// archive it would leave the API nothing it may write.
fn api_prefix(raw: Option<String>, archive: &str) -> Result<Option<String>, ConfigError> {
    let Some(prefix) = raw
        .map(|p| p.trim().trim_matches('/').to_owned())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    if prefix.len() > 200 || prefix.contains("//") {
        return Err(ConfigError::new(
            "S3_API_PREFIX",
            format!("\"{prefix}\" is not a usable key prefix (1-200 characters, no empty path segment)"),
        ));
    }
    let prefix = format!("{prefix}/");
    if prefix.starts_with(&format!("{archive}/")) {
        return Err(ConfigError::new(
            "S3_API_PREFIX",
            format!(
                "\"{prefix}\" is inside the archive (S3_ARCHIVE_PREFIX \"{archive}\"), which the API may not write"
            ),
        ));
    }
    Ok(Some(prefix))
}

fn appmetrica(raw: RawAppMetrica) -> Result<AppMetricaConfig, ConfigError> {
    let base_url = http_url(
        "APPMETRICA_BASE_URL",
        raw.base_url.as_deref().unwrap_or("https://api.appmetrica.yandex.ru"),
    )?;
    let application_id = raw
        .application_id
        .map(|v| {
            v.trim().parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
                ConfigError::new(
                    "APPMETRICA_APPLICATION_ID",
                    format!("expected a positive integer, got \"{v}\""),
                )
            })
        })
        .transpose()?;
    let poll_interval = seconds("APPMETRICA_POLL_INTERVAL_SECONDS", raw.poll_interval_seconds, 5)?;
    let poll_timeout = seconds("APPMETRICA_POLL_TIMEOUT_SECONDS", raw.poll_timeout_seconds, 300)?;
    if poll_timeout < poll_interval {
        return Err(ConfigError::new(
            "APPMETRICA_POLL_TIMEOUT_SECONDS",
            "must not be shorter than APPMETRICA_POLL_INTERVAL_SECONDS",
        ));
    }
    let endpoints: Vec<String> = raw
        .endpoints
        .as_deref()
        .unwrap_or("events,installations,sessions_starts,profiles_v2")
        .split(',')
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(unknown) = endpoints.iter().find(|e| !APPMETRICA_ENDPOINTS.contains(&e.as_str())) {
        return Err(ConfigError::new(
            "APPMETRICA_ENDPOINTS",
            format!(
                "unknown export \"{unknown}\"; known: {}",
                APPMETRICA_ENDPOINTS.join(", ")
            ),
        ));
    }
    let start_date = raw
        .start_date
        .map(|d| {
            chrono::NaiveDate::parse_from_str(d.trim(), "%Y-%m-%d").map_err(|_| {
                ConfigError::new(
                    "APPMETRICA_START_DATE",
                    format!("expected a date like 2024-03-01, got \"{d}\""),
                )
            })
        })
        .transpose()?;
    let refetch_days = match raw.refetch_days {
        None => 7,
        Some(v) => v.trim().parse::<u32>().ok().filter(|d| *d <= 60).ok_or_else(|| {
            ConfigError::new("APPMETRICA_REFETCH_DAYS", format!("expected 0 to 60 days, got \"{v}\""))
        })?,
    };
    Ok(AppMetricaConfig {
        base_url,
        api_key: raw.api_key.map(Secret::new),
        application_id,
        poll_interval,
        poll_timeout,
        endpoints,
        start_date,
        refetch_days,
        max_parallel: count("APPMETRICA_MAX_PARALLEL", raw.max_parallel, 3)?,
    })
}

fn log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let level = raw.level.unwrap_or_else(|| "info".into()).trim().to_ascii_lowercase();
    tracing_subscriber::EnvFilter::builder()
        .parse(&level)
        .map_err(|e| ConfigError::new("LOG_LEVEL", format!("\"{level}\" is not a level or filter ({e})")))?;
    let format = match raw
        .format
        .as_deref()
        .map(str::trim)
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("pretty") | Some("text") => LogFormat::Pretty,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::new(
                "LOG_FORMAT",
                format!("expected \"pretty\" or \"json\", got \"{other}\""),
            ))
        }
    };
    Ok(LogConfig { level, format })
}

fn http(raw: RawHttp) -> Result<HttpConfig, ConfigError> {
    let bind_text = raw.bind.unwrap_or_else(|| "127.0.0.1:8000".into());
    let bind: SocketAddr = bind_text.trim().parse().map_err(|_| {
        ConfigError::new(
            "HTTP_BIND",
            format!("expected an address like 127.0.0.1:8000, got \"{bind_text}\""),
        )
    })?;
    // A secret file's trailing newline is not part of the token; empty is unset
    // (never a token that "Bearer " would match).
    let api_token = raw
        .api_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Secret::new(t.to_owned()));
    check_exposure(bind, api_token.as_ref())?;
    Ok(HttpConfig {
        bind,
        api_token,
        max_body_bytes: size("HTTP_MAX_BODY_BYTES", raw.max_body_bytes, 64 * MIB, 1024)?,
        tables_max_body_bytes: size("HTTP_TABLES_MAX_BODY_BYTES", raw.tables_max_body_bytes, 16 * MIB, 1024)?,
        tables_max_records: count("HTTP_TABLES_MAX_RECORDS", raw.tables_max_records, 10_000)?,
        tables_max_concurrent_writes: count("HTTP_TABLES_MAX_CONCURRENT_WRITES", raw.tables_max_concurrent_writes, 4)?,
        tables_max_response_bytes: size(
            "HTTP_TABLES_MAX_RESPONSE_BYTES",
            raw.tables_max_response_bytes,
            16 * MIB,
            1024,
        )?,
        header_read_timeout: seconds("HTTP_HEADER_READ_TIMEOUT_SECONDS", raw.header_read_timeout_seconds, 10)?,
        request_timeout: seconds("HTTP_REQUEST_TIMEOUT_SECONDS", raw.request_timeout_seconds, 60)?,
        max_connections: count("HTTP_MAX_CONNECTIONS", raw.max_connections, 1024)?,
    })
}

/// An address other hosts can reach needs a token.
pub fn check_exposure(bind: SocketAddr, token: Option<&Secret>) -> Result<(), ConfigError> {
    if !bind.ip().is_loopback() && token.is_none() {
        return Err(ConfigError::new(
            "HTTP_BIND",
            format!("{bind} is reachable from other hosts; set HTTP_API_TOKEN to serve it, or bind 127.0.0.1"),
        ));
    }
    Ok(())
}

fn metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    Ok(MetricsConfig {
        partition_labels: boolean("METRICS_PARTITION_LABELS", raw.partition_labels, true)?,
        lag_interval: seconds("METRICS_LAG_INTERVAL_SECONDS", raw.lag_interval_seconds, 15)?,
    })
}

fn count(variable: &str, raw: Option<String>, default: usize) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    raw.trim()
        .parse::<usize>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ConfigError::new(variable, format!("expected a positive integer, got \"{raw}\"")))
}

fn seconds(variable: &str, raw: Option<String>, default: u64) -> Result<Duration, ConfigError> {
    count(variable, raw, default as usize).map(|s| Duration::from_secs(s as u64))
}

/// A byte size: `1048576`, `512KiB`, `10MiB`, `1GiB` (also `KB`, `MB`, `GB` as
/// powers of 1000, and `K`, `M`, `G` as powers of 1024).
fn size(variable: &str, raw: Option<String>, default: usize, min: usize) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let bad = || {
        ConfigError::new(
            variable,
            format!("expected a size in bytes such as 10485760 or 10MiB, got \"{raw}\""),
        )
    };
    let text = raw.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits.parse().map_err(|_| bad())?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = number.checked_mul(multiplier).ok_or_else(bad)?;
    if bytes < min {
        return Err(ConfigError::new(
            variable,
            format!("must be at least {min} bytes, got \"{raw}\""),
        ));
    }
    Ok(bytes)
}

fn http_url(variable: &str, raw: &str) -> Result<url::Url, ConfigError> {
    let parsed = url::Url::parse(raw.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    parsed.ok_or_else(|| ConfigError::new(variable, format!("expected an http(s) URL, got \"{raw}\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_need_no_configuration() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.dwh.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(c.dwh.database_url.backend(), Backend::Sqlite);
        assert_eq!(c.dwh.max_write_batch_bytes, 10 * MIB);
        assert_eq!(c.dwh.max_rows_per_insert, 1000);
        assert_eq!(c.kafka.topic_prefix, "dwh.");
        assert_eq!(c.s3.region, "us-east-1");
        assert_eq!(c.s3.bucket_name, "default-bucket");
        assert_eq!(c.appmetrica.poll_interval, Duration::from_secs(5));
        assert_eq!(c.appmetrica.poll_timeout, Duration::from_secs(300));
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.http.bind.to_string(), "127.0.0.1:8000");
    }

    #[test]
    fn values_are_read_and_typed() {
        let c = config(&[
            ("DWH_DATABASE_URL", "postgres://u:p@h/db"),
            ("DWH_MAX_WRITE_BATCH_BYTES", "2MiB"),
            ("DWH_MAX_ROWS_PER_INSERT", "500"),
            ("LOG_LEVEL", "INFO"),
            ("LOG_FORMAT", "json"),
            ("HTTP_BIND", "0.0.0.0:9000"),
            ("HTTP_API_TOKEN", "t0ken"),
            ("S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("APPMETRICA_APPLICATION_ID", "123"),
            ("SOMETHING_ELSE", "ignored"),
            ("S3_REGION", ""),
        ])
        .expect("valid");
        assert_eq!(c.dwh.database_url.backend(), Backend::Postgres);
        assert_eq!(c.dwh.max_write_batch_bytes, 2 * MIB);
        assert_eq!(c.dwh.max_rows_per_insert, 500);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.http.api_token.as_ref().map(Secret::expose), Some("t0ken"));
        assert_eq!(c.appmetrica.application_id, Some(123));
        assert_eq!(c.s3.region, "us-east-1", "an empty value means the default");
    }

    #[test]
    fn kafka_settings_and_librdkafka_pass_through() {
        let c = config(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092"),
            ("KAFKA_CREATE_TOPICS", "yes"),
            ("KAFKA_TOPIC_PARTITIONS", "16"),
            ("KAFKA_AUTO_OFFSET_RESET", "Latest"),
            ("KAFKA_SHUTDOWN_GRACE_SECONDS", "7"),
            ("KAFKA_LIBRDKAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_LIBRDKAFKA_SASL_PASSWORD", "hunter2"),
        ])
        .expect("valid");
        let k = &c.kafka;
        assert!(k.create_topics);
        assert_eq!(k.topic_partitions, 16);
        assert_eq!(k.auto_offset_reset, OffsetReset::Latest);
        assert_eq!(k.shutdown_grace, Duration::from_secs(7));
        let props: Vec<(&str, &str)> = k.librdkafka.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
        assert_eq!(props, [("sasl.password", "hunter2"), ("security.protocol", "SASL_SSL")]);
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "pass-through values may be secrets"
        );
        let d = config(&[]).expect("defaults");
        assert!(!d.kafka.create_topics);
        assert_eq!(d.kafka.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(d.kafka.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn ingest_and_archive_tables_default_to_all_and_name_the_unknown_one() {
        let d = config(&[]).unwrap();
        assert_eq!(d.kafka.ingest_tables, Table::ALL.to_vec());
        assert_eq!(d.kafka.archive_tables, Table::ALL.to_vec());
        let c = config(&[
            ("KAFKA_INGEST_TABLES", "user-locations, events_part"),
            ("KAFKA_ARCHIVE_TABLES", "technical_data"),
        ])
        .unwrap();
        assert_eq!(c.kafka.ingest_tables, [Table::EventsPart, Table::UserLocations]);
        assert_eq!(c.kafka.archive_tables, [Table::TechnicalData]);
        for var in ["KAFKA_INGEST_TABLES", "KAFKA_ARCHIVE_TABLES"] {
            let err = config(&[(var, "events_part,evnts")]).unwrap_err();
            assert!(err.contains(var) && err.contains("evnts"), "{err}");
        }
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("DWH_MAX_ROWS_PER_INSERT", "abc")],
                "DWH_MAX_ROWS_PER_INSERT: expected a positive integer, got \"abc\"",
            ),
            (
                &[("DWH_MAX_ROWS_PER_INSERT", "0")],
                "DWH_MAX_ROWS_PER_INSERT: expected a positive integer, got \"0\"",
            ),
            (
                &[("DWH_DATABASE_URL", "mysql://x")],
                "DWH_DATABASE_URL: unsupported scheme \"mysql\"; expected postgres://, postgresql:// or sqlite:",
            ),
            (
                &[("DWH_MAX_WRITE_BATCH_BYTES", "10 parsecs")],
                "DWH_MAX_WRITE_BATCH_BYTES: expected a size in bytes such as 10485760 or 10MiB, got \"10 parsecs\"",
            ),
            (&[("LOG_FORMAT", "xml")], "LOG_FORMAT: expected \"pretty\" or \"json\", got \"xml\""),
            (
                &[("HTTP_BIND", "localhost")],
                "HTTP_BIND: expected an address like 127.0.0.1:8000, got \"localhost\"",
            ),
            (
                &[("HTTP_BIND", "0.0.0.0:8000")],
                "HTTP_BIND: 0.0.0.0:8000 is reachable from other hosts; set HTTP_API_TOKEN to serve it, or bind 127.0.0.1",
            ),
            (
                &[("S3_ENDPOINT_URL", "minio:9000")],
                "S3_ENDPOINT_URL: expected an http(s) URL, got \"minio:9000\"",
            ),
            (
                &[("APPMETRICA_APPLICATION_ID", "-4")],
                "APPMETRICA_APPLICATION_ID: expected a positive integer, got \"-4\"",
            ),
            (
                &[("APPMETRICA_ENDPOINTS", "events,clicks")],
                "APPMETRICA_ENDPOINTS: unknown export \"clicks\"; known: events, installations, sessions_starts, profiles_v2",
            ),
            (
                &[("APPMETRICA_START_DATE", "01.03.2024")],
                "APPMETRICA_START_DATE: expected a date like 2024-03-01, got \"01.03.2024\"",
            ),
            (
                &[("APPMETRICA_REFETCH_DAYS", "90")],
                "APPMETRICA_REFETCH_DAYS: expected 0 to 60 days, got \"90\"",
            ),
            (
                &[("S3_ARCHIVE_PREFIX", "/")],
                "S3_ARCHIVE_PREFIX: \"\" is not a usable key prefix (1-200 characters, no empty path segment)",
            ),
            (
                &[("KAFKA_CREATE_TOPICS", "maybe")],
                "KAFKA_CREATE_TOPICS: expected true or false, got \"maybe\"",
            ),
            (
                &[("KAFKA_AUTO_OFFSET_RESET", "middle")],
                "KAFKA_AUTO_OFFSET_RESET: expected \"earliest\" or \"latest\", got \"middle\"",
            ),
            (
                &[("KAFKA_LIBRDKAFKA_", "x")],
                "KAFKA_LIBRDKAFKA_: does not name a librdkafka property",
            ),
            (
                &[("KAFKA_LIBRDKAFKA_AUTO_OFFSET_RESET", "latest")],
                "KAFKA_LIBRDKAFKA_AUTO_OFFSET_RESET: auto.offset.reset is set by dwh-helper (exactly once depends on it); \
                 use KAFKA_AUTO_OFFSET_RESET (a partition with no DWH offset) or KAFKA_ON_OFFSET_OUT_OF_RANGE",
            ),
            (
                &[("KAFKA_LIBRDKAFKA_ENABLE_AUTO_COMMIT", "true")],
                "KAFKA_LIBRDKAFKA_ENABLE_AUTO_COMMIT: enable.auto.commit is set by dwh-helper (exactly once depends on it); \
                 offsets are stored in the DWH with each batch",
            ),
            (
                &[("KAFKA_TOPIC_PREFIX", "dwh/")],
                "KAFKA_TOPIC_PREFIX: \"dwh/\" may only hold ASCII letters, digits, '.', '_' and '-'",
            ),
        ];
        for (vars, expected) in cases {
            assert_eq!(config(vars).map(|_| ()), Err(expected.to_string()), "{vars:?}");
        }
        let err = config(&[("LOG_LEVEL", "loud=[")]).map(|_| ()).expect_err("bad level");
        assert!(
            err.starts_with("LOG_LEVEL: \"loud=[\" is not a level or filter"),
            "{err}"
        );
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let c = config(&[
            ("DWH_DATABASE_URL", "postgres://u:pg-secret@h/db"),
            ("S3_SECRET_ACCESS_KEY", "s3-secret"),
            ("APPMETRICA_API_KEY", "am-secret"),
            ("HTTP_API_TOKEN", "http-secret"),
        ])
        .expect("valid");
        let shown = format!("{c:?}");
        for secret in ["pg-secret", "s3-secret", "am-secret", "http-secret"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(size("X", Some("2048".into()), 0, 1), Ok(2048));
        assert_eq!(size("X", Some("16 MiB".into()), 0, 1), Ok(16 * MIB));
        assert_eq!(size("X", Some("1MB".into()), 0, 1), Ok(1_000_000));
        assert_eq!(size("X", Some("64k".into()), 0, 1), Ok(65_536));
        assert!(size("X", Some("12".into()), 0, 1024).is_err());
    }
}
