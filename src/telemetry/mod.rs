//! Telemetry: logging, metrics and the lag loop.
//!
//! Logging: `tracing` to stderr, human-readable (`LOG_FORMAT=pretty`) or one JSON
//! object per line for log shippers (`LOG_FORMAT=json`), filtered by `LOG_LEVEL`.
//! Metrics: [`metrics`] (the registry behind `/metrics`), updated by the named
//! [`events`] and by the [`lag`] loop.

pub mod events;
pub mod lag;
pub mod metrics;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogConfig, LogFormat};

/// Sets up logging and the metrics' label choice from the configuration.
pub fn init_all(config: &Config) {
    metrics::configure(config.metrics.partition_labels);
    init(&config.log);
}

/// Installs the global subscriber. The level was validated with the configuration.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::builder()
        .parse(&config.level)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
