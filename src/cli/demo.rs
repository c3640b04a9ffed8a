//! `dwh-helper demo`: the whole pipeline on one machine with no configuration.
//!
//! Starts the dev broker in-process, uses a SQLite DWH in a temporary directory,
//! publishes sample records for all seven tables (and a few invalid ones), runs the
//! real ingest role until every partition is caught up, serves the HTTP API and
//! prints a summary with `curl` lines to try.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalogue::{self, Table};
use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingest::{self, IngestStatus};
use crate::kafka::devbroker::DevBrokerOptions;
use crate::kafka::{self, DevBroker, Publisher};
use crate::sample;
use crate::store::Dwh;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample records per table
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rows: u64,
    /// Address of the HTTP API [default: HTTP_BIND, 127.0.0.1:8000]
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// SQLite file for the DWH [default: a temporary file, removed at exit]
    #[arg(long)]
    db: Option<std::path::PathBuf>,
    /// Exit after the summary instead of serving the API until Ctrl-C
    #[arg(long)]
    exit_after_summary: bool,
}

pub async fn demo(base: Config, args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let broker = DevBroker::start(&DevBrokerOptions::default()).await?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let db_path = args.db.clone().unwrap_or_else(|| dir.path().join("dwh-demo.db"));
    let config = demo_config(&base, broker.bootstrap_servers(), &db_path)?;
    let bind = args.bind.unwrap_or(base.http.bind);
    crate::config::check_exposure(bind, base.http.api_token.as_ref()).context("--bind")?;
    let listener = TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind} (choose another address with --bind)"))?;
    let address = listener.local_addr()?;

    let dwh = Dwh::connect(&config.dwh)?;
    dwh.migrate().await?;
    eprintln!(
        "demo: dev broker at {}, DWH {}",
        broker.bootstrap_servers(),
        db_path.display()
    );

    let (published, invalid) = publish_samples(&config, args.rows).await?;
    eprintln!("demo: published {published} records ({invalid} of them invalid) to the seven topics");

    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::signal(shutdown.clone()));
    let status = Arc::new(IngestStatus::default());
    let ingest_started = Instant::now();
    let ingest = {
        let (config, dwh, status, shutdown) = (config.clone(), dwh.clone(), status.clone(), shutdown.clone());
        tokio::spawn(async move { ingest::run(&config, dwh, status, shutdown).await })
    };
    let lag = {
        let (config, dwh, status, shutdown) = (config.clone(), dwh.clone(), status.clone(), shutdown.clone());
        let interval = config.metrics.lag_interval;
        tokio::spawn(crate::status::lag::run(
            config, dwh, status, true, false, interval, shutdown,
        ))
    };
    wait_caught_up(&config, &dwh, &shutdown).await?;
    let ingest_seconds = ingest_started.elapsed().as_secs_f64();

    let mut state = AppState::new(dwh.clone(), &config);
    state.ingest = Some(status.clone());
    let app = http::router(state, config.http.max_body_bytes);
    let server = tokio::spawn(http::serve(listener, app, shutdown.clone(), config.http.clone()));

    let counters = status.counters();
    println!(
        "dwh-helper demo: the pipeline ran end to end in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("  {:<28} {:>8}", "table", "rows");
    for table in Table::ALL {
        println!("  {:<28} {:>8}", table.name(), dwh.count_rows(table.name()).await?);
    }
    println!(
        "  {:<28} {:>8}",
        "rejected records",
        dwh.count_rows("dwh_rejected_records").await?
    );
    println!();
    println!(
        "  ingested {} records in {:.1} s: {:.0} records/s (SQLite, {} batches)",
        counters.rows + counters.rejects,
        ingest_seconds,
        (counters.rows + counters.rejects) as f64 / ingest_seconds,
        counters.batches
    );
    println!();
    println!("`dwh-helper status` of this DWH and broker:");
    println!();
    let report = crate::status::report::gather(&config, &dwh, Some(&status)).await;
    for line in report.render().lines() {
        println!("  {line}");
    }
    println!();
    println!("Try:");
    println!("  curl 'http://{address}/dwh/events_part?limit=3'");
    println!("  curl 'http://{address}/dwh/user_locations?limit=2'");
    println!("  curl -X POST 'http://{address}/dwh/user_locations' -H 'content-type: application/json' \\");
    println!("       -d '{{\"data\": [{{\"uuid\": \"3f1c0c8e-0000-4000-8000-000000000001\", \"event_time\": \"2024-03-01T10:00:00Z\", \"latitude\": 55.75, \"longitude\": 37.62}}]}}'");
    println!("  curl 'http://{address}/health/ready'");
    println!("  curl 'http://{address}/status'");
    println!("  curl -s 'http://{address}/metrics' | grep dwh_helper_rows_inserted");
    use std::io::Write as _;
    std::io::stdout().flush()?;

    if args.exit_after_summary {
        shutdown.cancel();
    } else {
        eprintln!("demo: serving the API on http://{address}; Ctrl-C stops");
    }
    ingest.await.context("ingest task")??;
    server.await.context("API task")??;
    lag.await.context("lag task")?;
    broker.stop();
    Ok(())
}

/// The demo's own configuration: the dev broker, a SQLite file, and the logging
/// and HTTP settings of the environment.
fn demo_config(base: &Config, bootstrap: &str, db: &std::path::Path) -> anyhow::Result<Config> {
    let vars = [
        ("DWH_DATABASE_URL", format!("sqlite://{}", db.display())),
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.to_owned()),
        ("KAFKA_GROUP_ID", "dwh-helper-demo".to_owned()),
        ("KAFKA_BATCH_LINGER_MS", "200".to_owned()),
        // Small enough that the oversized sample record still fits in a Kafka message.
        ("DWH_MAX_WRITE_BATCH_BYTES", "256KiB".to_owned()),
    ];
    let mut config = Config::from_vars(vars.into_iter().map(|(k, v)| (k.to_owned(), v)))?;
    config.log = base.log.clone();
    config.http = base.http.clone();
    Ok(config)
}

/// Publishes `rows` sample records per table plus one invalid record of every
/// kind to events_part; returns (published, invalid).
async fn publish_samples(config: &Config, rows: u64) -> anyhow::Result<(u64, u64)> {
    let publisher = Publisher::new(&config.kafka)?;
    let mut batch = publisher.batch();
    let mut invalid = 0;
    for table in Table::ALL {
        let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
        for record in sample::records(table, rows as usize, 0) {
            let row = catalogue::decode_json(table, record.clone())?.row;
            let key = catalogue::natural_key(table.spec(), &row);
            batch
                .send(&topic, key.as_bytes(), record.to_string().as_bytes())
                .await?;
        }
        if table == Table::EventsPart {
            for (i, (payload, _)) in sample::poison(table, 0, config.dwh.max_write_batch_bytes)
                .into_iter()
                .enumerate()
            {
                batch.send(&topic, format!("invalid-{i}").as_bytes(), &payload).await?;
                invalid += 1;
            }
        }
    }
    Ok((batch.finish().await?, invalid))
}

/// Waits until the DWH's stored offsets reach the end of every partition.
async fn wait_caught_up(config: &Config, dwh: &Dwh, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let broker = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            crate::status::report::read_broker(&config, None, crate::status::report::Stalls::Skip)
        })
        .await?
        .map_err(anyhow::Error::msg)?
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stored: std::collections::HashMap<(String, i32), i64> = dwh
            .stored_offsets(&config.kafka.group_id)
            .await?
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.next_offset))
            .collect();
        let behind = broker
            .watermarks
            .iter()
            .flat_map(|(topic, marks)| marks.iter().map(move |(p, range)| (topic, *p, *range)))
            .filter(|(topic, p, range)| {
                crate::status::report::lag(stored.get(&((*topic).clone(), *p)).copied(), *range) > 0
            })
            .count();
        if behind == 0 {
            return Ok(());
        }
        if shutdown.is_cancelled() {
            bail!("interrupted before the ingest caught up");
        }
        if Instant::now() > deadline {
            bail!("the ingest did not catch up within 10 minutes ({behind} partitions behind)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
