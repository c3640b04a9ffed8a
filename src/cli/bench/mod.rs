//! `dwh-helper bench`: measured throughput, never assumed.
//!
//! The benchmark never touches existing tables: on PostgreSQL it creates a scratch
//! database beside `DWH_DATABASE_URL` (dropped afterwards), on SQLite a temporary
//! file ([`baseline::Scratch`]). One module per scenario: [`ingest`] (the
//! default), [`http`], [`api_memory`] and [`appmetrica`]; [`baseline`] holds the
//! plain `COPY` they are compared against, [`probe`] what they read of processes.

mod api_memory;
mod appmetrica;
mod baseline;
mod http;
mod ingest;
mod probe;

use anyhow::bail;
use clap::{Args, ValueEnum};

use crate::config::{Config, DatabaseUrl};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure
    #[arg(long, value_enum, default_value_t = Scenario::Ingest)]
    scenario: Scenario,
    /// Records to load [default: 1000000 for ingest, 100000 for http]
    #[arg(long)]
    rows: Option<usize>,
    /// Size of the generated export in MB (scenario appmetrica)
    #[arg(long, default_value_t = 500)]
    mb: u64,
    /// Partitions of the benchmark topic (scenario ingest) [default: enough for the
    /// dev broker to hold the backlog, or KAFKA_TOPIC_PARTITIONS]
    #[arg(long)]
    partitions: Option<i32>,
    /// Pad each record's JSON to about this many bytes (scenario ingest), to measure
    /// memory with large records: `--record-bytes 1024`, `--record-bytes 1048576`
    #[arg(long)]
    record_bytes: Option<usize>,
    /// Records per POST request (scenario http)
    #[arg(long, default_value_t = 10_000)]
    per_request: usize,
    /// Concurrent requests per phase (scenario api-memory)
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// MiB per POST /dwh request (scenario api-memory)
    #[arg(long, default_value_t = 64)]
    post_mb: u64,
    /// MiB per /s3/upload (scenario api-memory)
    #[arg(long, default_value_t = 256)]
    upload_mb: u64,
    /// Also measure the ingest against this running Kafka broker (host:port, a
    /// PLAINTEXT listener), beside the in-process dev broker (scenario ingest)
    #[arg(long, env = "BENCH_KAFKA_BOOTSTRAP", value_name = "HOST:PORT")]
    bootstrap: Option<String>,
    /// The --bootstrap broker's process id, for its CPU in the split [default: the
    /// process on this machine listening on its port]
    #[arg(long, requires = "bootstrap")]
    broker_pid: Option<u32>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Also write the rows in COPY text format to this file, to time `psql \copy` by hand
    #[arg(long)]
    copy_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Kafka → the ingest role (a child process) → DWH, against a plain COPY
    Ingest,
    /// A generated Logs API export through `appmetrica export` (a child process): peak RSS
    Appmetrica,
    /// POST /dwh/events_part through the HTTP API, against a plain COPY
    Http,
    /// The API (a child process) under concurrent large POSTs and uploads: peak RSS
    ApiMemory,
}

pub async fn bench(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    // With no DWH configured, the test PostgreSQL (scripts/test.sh) is the next best.
    if config.dwh.database_url.expose() == crate::config::DEFAULT_DATABASE_URL {
        if let Ok(url) = std::env::var("DWH_TEST_DATABASE_URL") {
            config.dwh.database_url = DatabaseUrl::parse(&url).map_err(anyhow::Error::msg)?;
        }
    }
    if args.scenario == Scenario::Appmetrica {
        let report = appmetrica::run(args.mb).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            appmetrica::print(&report);
        }
        return Ok(());
    }
    if args.scenario == Scenario::ApiMemory {
        if args.clients == 0 || args.post_mb == 0 || args.upload_mb == 0 {
            bail!("--clients, --post-mb and --upload-mb must be positive");
        }
        let load = api_memory::Load {
            clients: args.clients,
            post_mib: args.post_mb,
            upload_mib: args.upload_mb,
        };
        let report = api_memory::run(&config, load).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            api_memory::print(&report);
        }
        return Ok(());
    }
    if args.scenario == Scenario::Ingest {
        let rows = args.rows.unwrap_or(1_000_000);
        if rows == 0 {
            bail!("--rows must be positive");
        }
        let Some(bootstrap) = &args.bootstrap else {
            let broker_pid = config.kafka.bootstrap_servers.as_deref().and_then(probe::listener_pid);
            let report = ingest::run(&config, rows, args.partitions, args.record_bytes, broker_pid).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                ingest::print(&report);
            }
            return Ok(());
        };
        // The same backlog through the dev broker in this process, then through the
        // running broker, over as many partitions.
        let mut in_process = config.clone();
        in_process.kafka.bootstrap_servers = None;
        let dev = ingest::run(&in_process, rows, args.partitions, args.record_bytes, None).await?;
        let mut running = config.clone();
        running.kafka.bootstrap_servers = Some(bootstrap.clone());
        let broker_pid = args.broker_pid.or_else(|| probe::listener_pid(bootstrap));
        if broker_pid.is_none() {
            eprintln!("bench: no process on this machine listens on {bootstrap}: the broker's CPU is not measured");
        }
        let real = ingest::run(&running, rows, Some(dev.partitions), args.record_bytes, broker_pid).await?;
        if args.json {
            println!("{}", serde_json::json!({ "dev_broker": dev, "broker": real }));
        } else {
            ingest::print(&dev);
            println!();
            ingest::print(&real);
            println!();
            let ratio = |r: &ingest::IngestReport| r.ratio_to_copy.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
            println!(
                "ingest / COPY    {} with the dev broker, {} with the broker at {bootstrap}",
                ratio(&dev),
                ratio(&real)
            );
        }
        return Ok(());
    }
    let rows = args.rows.unwrap_or(100_000);
    if rows == 0 || args.per_request == 0 {
        bail!("--rows and --per-request must be positive");
    }
    let report = http::run(&config, rows, args.per_request, args.copy_file.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        http::print(&report);
    }
    Ok(())
}
