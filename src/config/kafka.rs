//! `KAFKA_*`: the brokers, the group, the tables and the batches, and
//! librdkafka's own properties passed through as `KAFKA_LIBRDKAFKA_*`.

use std::time::Duration;

use serde::Deserialize;

use super::parse::{boolean, count, seconds, size, MIB};
use super::{ConfigError, Secret};
use crate::catalogue::Table;

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
    /// The watchdog's window (`KAFKA_STALL_AFTER_SECONDS`): a table is stalled
    /// when records have waited for it this long and nothing of it landed
    /// meanwhile.
    pub stall_after: Duration,
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

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawKafka {
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
    stall_after_seconds: Option<String>,
}

pub(super) fn kafka(
    raw: RawKafka,
    passthrough: impl Iterator<Item = (String, String)>,
) -> Result<KafkaConfig, ConfigError> {
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
        stall_after: match seconds("KAFKA_STALL_AFTER_SECONDS", raw.stall_after_seconds, 300)? {
            zero if zero.is_zero() => {
                return Err(ConfigError::new(
                    "KAFKA_STALL_AFTER_SECONDS",
                    "expected at least 1 second, got 0",
                ))
            }
            window => window,
        },
        librdkafka: librdkafka_properties(passthrough)?,
    })
}

/// `KAFKA_INGEST_TABLES`: comma-separated table names; unset or empty means all.
/// A comma-separated list of tables in `var`; empty or unset means all seven.
pub(super) fn tables(var: &'static str, raw: Option<String>) -> Result<Vec<Table>, ConfigError> {
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
pub(super) const OWNED_PROPERTIES: [(&str, &str); 6] = [
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
pub(super) fn librdkafka_properties(
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<(String, Secret)>, ConfigError> {
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

/// Lanes per table: measured with `bench` on 2 cores (README, "Benchmarks").
pub const DEFAULT_WRITE_LANES: usize = 2;

/// Variables under this prefix pass through to librdkafka.
pub const LIBRDKAFKA_PREFIX: &str = "KAFKA_LIBRDKAFKA_";
