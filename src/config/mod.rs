//! Configuration: environment variables (after `.env`), one block per prefix.
//!
//! Guarantees: the environment is read once; each block is read as strings with
//! `envy`, then validated by pure functions into typed values, so an invalid value
//! is reported as one line naming the variable (`DWH_MAX_ROWS_PER_INSERT: expected
//! a positive integer, got "abc"`) before any client is built. A variable under
//! one of the service's prefixes that no setting reads is refused, with the
//! setting it most likely meant (`DWH_ALLOW_UNKNOWN_VARIABLES=true` turns that
//! into a warning, for environments shared with other programs). Secrets are
//! held in [`Secret`] and never printed.

mod appmetrica;
mod dwh;
mod http;
mod kafka;
mod known;
mod parse;
mod s3;
mod secret;

use std::time::Duration;

use serde::Deserialize;

use appmetrica::appmetrica;
pub use appmetrica::{AppMetricaConfig, APPMETRICA_ENDPOINTS};
use dwh::dwh;
pub use dwh::DwhConfig;
use http::http;
pub use http::{check_exposure, HttpConfig};
use kafka::kafka;
pub use kafka::{KafkaConfig, OffsetReset, OutOfRange, DEFAULT_WRITE_LANES, LIBRDKAFKA_PREFIX};
use parse::{boolean, seconds};
use s3::s3;
pub use s3::{S3Config, S3_MAX_OBJECT_BYTES};
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

/// The prefixes of the service's variables.
pub const PREFIXES: [&str; 7] = ["DWH_", "KAFKA_", "S3_", "APPMETRICA_", "LOG_", "HTTP_", "METRICS_"];

/// `true`: an unknown variable under [`PREFIXES`] is a warning, not an error.
pub const ALLOW_UNKNOWN_VARIABLES: &str = "DWH_ALLOW_UNKNOWN_VARIABLES";

/// Every variable a setting reads (librdkafka's pass-through aside).
pub fn known_variables() -> std::collections::BTreeSet<String> {
    let blocks: [(&str, &[&str]); 7] = [
        ("DWH_", known::fields::<dwh::RawDwh>()),
        ("KAFKA_", known::fields::<kafka::RawKafka>()),
        ("S3_", known::fields::<s3::RawS3>()),
        ("APPMETRICA_", known::fields::<appmetrica::RawAppMetrica>()),
        ("LOG_", known::fields::<RawLog>()),
        ("HTTP_", known::fields::<http::RawHttp>()),
        ("METRICS_", known::fields::<RawMetrics>()),
    ];
    let mut all: std::collections::BTreeSet<String> = blocks
        .iter()
        .flat_map(|(prefix, fields)| known::names(prefix, fields))
        .collect();
    all.insert(ALLOW_UNKNOWN_VARIABLES.to_owned());
    all
}

/// The variables among `names` that no setting reads, each as the error that
/// names it and the setting it most likely meant.
pub fn unknown_variables<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<ConfigError> {
    known::unknown(names, &PREFIXES, &known_variables())
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
    /// Unknown variables let through by `DWH_ALLOW_UNKNOWN_VARIABLES`: warned
    /// about once logging is up.
    pub unknown_variables: Vec<ConfigError>,
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

pub const DEFAULT_DATABASE_URL: &str = "sqlite://dwh-helper.db";

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
        let unknown = unknown_variables(vars.iter().map(|(k, _)| k.as_str()));
        let allow = vars
            .iter()
            .find(|(k, _)| k == ALLOW_UNKNOWN_VARIABLES)
            .map(|(_, v)| v.clone());
        if !boolean(ALLOW_UNKNOWN_VARIABLES, allow, false)? {
            if let Some(first) = unknown.first() {
                let mut refused = first.clone();
                if unknown.len() > 1 {
                    let others: Vec<&str> = unknown[1..].iter().map(|e| e.variable.as_str()).collect();
                    refused.problem = format!("{} (and {} more: {})", first.problem, others.len(), others.join(", "));
                }
                return Err(refused);
            }
        }
        let read = |prefix: &'static str| vars.clone().into_iter().filter(move |(k, _)| k.starts_with(prefix));
        Ok(Config {
            unknown_variables: unknown,
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

fn metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    Ok(MetricsConfig {
        partition_labels: boolean("METRICS_PARTITION_LABELS", raw.partition_labels, true)?,
        lag_interval: seconds("METRICS_LAG_INTERVAL_SECONDS", raw.lag_interval_seconds, 15)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::catalogue::Table;

    use super::kafka::*;
    use super::parse::*;

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
