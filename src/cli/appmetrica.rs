//! `dwh-helper appmetrica export|status`: one-off backfills and the windows table.

use std::time::Instant;

use anyhow::bail;
use chrono::NaiveDate;
use clap::{Args, Subcommand};

use crate::appmetrica::window::Window;
use crate::appmetrica::{ExportError, Exporter};
use crate::config::{Config, APPMETRICA_ENDPOINTS};
use crate::store::Dwh;

#[derive(Debug, Args)]
pub struct AppMetricaArgs {
    #[command(subcommand)]
    command: AppMetricaCommand,
}

#[derive(Debug, Subcommand)]
enum AppMetricaCommand {
    /// Fetch a range of days now (whether done or not), publish, and record the windows
    Export {
        /// First day, inclusive (YYYY-MM-DD)
        #[arg(long)]
        from: NaiveDate,
        /// Last day, inclusive (YYYY-MM-DD)
        #[arg(long)]
        to: NaiveDate,
        /// One export only [default: APPMETRICA_ENDPOINTS]
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(APPMETRICA_ENDPOINTS))]
        endpoint: Option<String>,
    },
    /// List the recorded windows and their state
    Status,
}

pub async fn appmetrica(config: Config, args: AppMetricaArgs) -> anyhow::Result<()> {
    let dwh = Dwh::connect(&config.dwh)?;
    dwh.migrate().await?;
    match args.command {
        AppMetricaCommand::Export { from, to, endpoint } => export(&config, dwh, from, to, endpoint).await,
        AppMetricaCommand::Status => status(&config, &dwh).await,
    }
}

async fn export(
    config: &Config,
    dwh: Dwh,
    from: NaiveDate,
    to: NaiveDate,
    endpoint: Option<String>,
) -> anyhow::Result<()> {
    if to < from {
        bail!("--to {to} is before --from {from}");
    }
    let exporter = Exporter::new(config, dwh)?;
    let endpoints = endpoint.map_or_else(|| config.appmetrica.endpoints.clone(), |e| vec![e]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(super::run::signal(shutdown.clone()));
    let mut failures = 0;
    let mut day = from;
    while day <= to {
        for endpoint in &endpoints {
            let window = Window {
                endpoint: endpoint.clone(),
                day,
            };
            let started = Instant::now();
            eprint!("{window}: fetching… ");
            match exporter.run_window(&window, &shutdown).await {
                Ok(o) => eprintln!(
                    "{} rows, {} records published{}{} in {:.1} s",
                    o.fetched,
                    o.published,
                    if o.unmapped > 0 {
                        format!(", {} rows not mapped", o.unmapped)
                    } else {
                        String::new()
                    },
                    if o.parts > 1 {
                        format!(", in {} parts", o.parts)
                    } else {
                        String::new()
                    },
                    started.elapsed().as_secs_f64()
                ),
                Err(ExportError::Cancelled) => {
                    eprintln!("interrupted");
                    bail!("interrupted; {window} is not marked done and is fetched again next time");
                }
                Err(e @ ExportError::Unauthorized { .. }) => {
                    eprintln!("refused");
                    return Err(e.into());
                }
                Err(e) => {
                    eprintln!("failed: {e}");
                    failures += 1;
                }
            }
        }
        day += chrono::Duration::days(1);
    }
    if failures > 0 {
        bail!("{failures} window(s) failed; see above");
    }
    println!(
        "exported {} day(s) of {}",
        (to - from).num_days() + 1,
        endpoints.join(", ")
    );
    Ok(())
}

async fn status(config: &Config, dwh: &Dwh) -> anyhow::Result<()> {
    let Some(application_id) = config.appmetrica.application_id else {
        bail!("APPMETRICA_APPLICATION_ID is not set");
    };
    let windows = dwh.windows(application_id).await?;
    if windows.is_empty() {
        println!("no windows recorded for application {application_id}");
        return Ok(());
    }
    println!(
        "{:<16} {:<10} {:<8} {:>10} {:>10} {:>9}  fetched at",
        "endpoint", "day", "status", "rows", "published", "seconds"
    );
    for w in windows {
        println!(
            "{:<16} {:<10} {:<8} {:>10} {:>10} {:>9}  {}{}",
            w.endpoint,
            w.window_start.date_naive(),
            w.status,
            w.rows_fetched,
            w.rows_published,
            w.duration_ms
                .map_or("-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0)),
            w.fetched_at
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            w.error.map_or(String::new(), |e| format!("  {e}")),
        );
    }
    Ok(())
}
