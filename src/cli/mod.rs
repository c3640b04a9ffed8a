//! The command line: `dwh-helper <command>`.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 invalid usage or configuration
//! (one line on stderr naming the variable or flag).

mod appmetrica;
mod archive;
mod bench;
mod config;
mod demo;
mod dev_broker;
mod produce;
mod rejects;
mod replay;
mod run;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::store::Dwh;

#[derive(Debug, Parser)]
#[command(
    name = "dwh-helper",
    version,
    about = "Loads product-analytics data from Kafka into the company DWH, exactly once",
    long_about = "Loads product-analytics data from Kafka into the company DWH, exactly once.\n\n\
                  Configuration comes from environment variables (DWH_*, KAFKA_*, S3_*, APPMETRICA_*, \
                  LOG_*, HTTP_*), after reading .env if present. See README.md and .env.example."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: apply migrations, then serve the configured roles until SIGINT/SIGTERM
    Run(run::RunArgs),
    /// Apply the database migrations and exit
    Migrate,
    /// Publish JSON lines onto a table's topic (validated first; keyed by natural key)
    Produce(produce::ProduceArgs),
    /// Move where tables' ingest reads (rewind for backfill, or skip ahead); prints the plan, --execute applies it
    Replay(replay::ReplayArgs),
    /// The rejected records: list them, requeue them once the producer is fixed, purge old ones
    #[command(subcommand)]
    Rejects(rejects::RejectsCommand),
    /// Where every table and partition stands: DWH offsets, watermarks, lag, rejects, archive, AppMetrica (exit 1 when failing)
    Status(status::StatusArgs),
    /// AppMetrica Logs API: backfill a range of days, or list the recorded windows
    Appmetrica(appmetrica::AppMetricaArgs),
    /// Read the S3 archive back: restore a table's records onto its topic, or verify the archive
    Archive(archive::ArchiveArgs),
    /// Everything embedded: dev broker + SQLite, sample data through the real pipeline, API served
    Demo(demo::DemoArgs),
    /// Run an in-memory Kafka-protocol broker with the seven topics (librdkafka's mock cluster)
    DevBroker(dev_broker::DevBrokerArgs),
    /// Measure throughput in a scratch database (release build: cargo run --release -- bench)
    Bench(bench::BenchArgs),
    /// The configuration: check prints the effective one, each value's source, secrets redacted
    #[command(subcommand)]
    Config(config::ConfigCommand),
}

/// Parses arguments and configuration, then runs the command.
pub fn main() -> ExitCode {
    crate::alloc::tune();
    let cli = Cli::parse();
    if let Command::Config(config::ConfigCommand::Check) = cli.command {
        return config::check();
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP export sends through this runtime: start it inside.
    let otel = {
        let _inside = runtime.enter();
        match crate::telemetry::init_all(&config) {
            Ok(otel) => otel,
            Err(e) => {
                eprintln!("configuration error: {e}");
                return ExitCode::from(2);
            }
        }
    };
    for unknown in &config.unknown_variables {
        tracing::warn!(
            event = "unknown_variable",
            variable = %unknown.variable,
            "{}; let through by DWH_ALLOW_UNKNOWN_VARIABLES",
            unknown.problem
        );
    }
    let config_json = config.log.format == crate::config::LogFormat::Json;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Config(_) => unreachable!("config check runs before the configuration is read"),
            Command::Status(args) => return status::status(config, args).await,
            Command::Run(args) => run::run(config, args).await,
            Command::Migrate => migrate(&config).await,
            Command::Produce(args) => produce::produce(config, args).await,
            Command::Replay(args) => replay::replay(config, args).await,
            Command::Rejects(command) => rejects::rejects(config, command).await,
            Command::DevBroker(args) => dev_broker::dev_broker(args).await,
            Command::Demo(args) => demo::demo(config, args).await,
            Command::Archive(args) => archive::archive(config, args).await,
            Command::Appmetrica(args) => appmetrica::appmetrica(config, args).await,
            Command::Bench(args) => bench::bench(config, args).await,
        }
        .map(|()| ExitCode::SUCCESS)
    });
    // Flush what is queued for the collector (bounded by the exporter timeout).
    {
        let _inside = runtime.enter();
        drop(otel);
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: a JSON log's error event for the log pipeline, the
            // plain line for a person.
            let told = told_once(&e);
            if config_json {
                tracing::error!("{told}");
            } else {
                eprintln!("error: {told}");
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each told once: many errors (sqlx's,
/// thiserror's `{0}` with `#[source]`) put their cause in their own message
/// and give it as their source too, so the plain chain repeats it.
fn told_once(error: &anyhow::Error) -> String {
    let mut told = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if told.contains(&text) {
            continue;
        }
        if !told.is_empty() {
            told.push_str(": ");
        }
        told.push_str(&text);
    }
    told
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let dwh = Dwh::connect(&config.dwh)?;
    dwh.migrate().await?;
    tracing::info!(database = %config.dwh.database_url, "migrations applied");
    println!("migrations applied to {}", config.dwh.database_url);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("migration failed: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("error communicating with database: {0}")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn a_cause_in_its_parents_message_is_told_once() {
        let e = anyhow::Error::new(Outer(Inner(std::io::Error::other("invalid peer certificate"))));
        assert_eq!(
            super::told_once(&e),
            "migration failed: error communicating with database: invalid peer certificate"
        );
        let e = anyhow::Error::new(std::io::Error::other("refused")).context("cannot connect");
        assert_eq!(super::told_once(&e), "cannot connect: refused");
    }
}
