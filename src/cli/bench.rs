//! `dwh-helper bench`: measured throughput, never assumed.
//!
//! The benchmark never touches existing tables: on PostgreSQL it creates a scratch
//! database beside `DWH_DATABASE_URL` (dropped afterwards), on SQLite a temporary
//! file. Scenario `ingest` (the default) is in `bench_ingest.rs`. Scenario `http`: synthetic `events_part` records are posted through the
//! real HTTP API in requests of `--per-request` records; the same rows are loaded
//! with one plain `COPY` into an empty copy of the table (same columns and
//! indexes) on the same database right before and right after: the ceiling the
//! API is compared against ([`Baseline`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio_util::sync::CancellationToken;

use crate::catalogue::{decode_json, Table};
use crate::config::{Backend, Config, DatabaseUrl};
use crate::http::{self, AppState};
use crate::store::{sql, Dwh};

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

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    backend: &'static str,
    rows: usize,
    requests: usize,
    request_bytes: usize,
    seconds: f64,
    rows_per_second: f64,
    mb_per_second: f64,
    /// The plain COPY before and after (PostgreSQL only).
    copy: Option<Baseline>,
    /// Rows per second of the mean COPY time.
    copy_rows_per_second: Option<f64>,
    ratio_to_copy: Option<f64>,
    /// Where the CPU went while the requests ran.
    cpu: HttpCpu,
}

/// CPU seconds (user + system) while the requests ran, from `/proc`.
#[derive(Debug, Serialize)]
struct HttpCpu {
    /// This process: the API serving the requests, and the client sending them
    /// (its bodies are serialized before the clock starts).
    process_seconds: Option<f64>,
    /// The API's PostgreSQL backends (`pg_stat_activity`), when the server runs
    /// on this machine.
    postgres_seconds: Option<f64>,
}

pub async fn bench(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    // With no DWH configured, the test PostgreSQL (scripts/test.sh) is the next best.
    if config.dwh.database_url.expose() == crate::config::DEFAULT_DATABASE_URL {
        if let Ok(url) = std::env::var("DWH_TEST_DATABASE_URL") {
            config.dwh.database_url = DatabaseUrl::parse(&url).map_err(anyhow::Error::msg)?;
        }
    }
    if args.scenario == Scenario::Appmetrica {
        let report = super::bench_appmetrica::run(args.mb).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            super::bench_appmetrica::print(&report);
        }
        return Ok(());
    }
    if args.scenario == Scenario::ApiMemory {
        if args.clients == 0 || args.post_mb == 0 || args.upload_mb == 0 {
            bail!("--clients, --post-mb and --upload-mb must be positive");
        }
        let load = super::bench_api_memory::Load {
            clients: args.clients,
            post_mib: args.post_mb,
            upload_mib: args.upload_mb,
        };
        let report = super::bench_api_memory::run(&config, load).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            super::bench_api_memory::print(&report);
        }
        return Ok(());
    }
    if args.scenario == Scenario::Ingest {
        let rows = args.rows.unwrap_or(1_000_000);
        if rows == 0 {
            bail!("--rows must be positive");
        }
        let Some(bootstrap) = &args.bootstrap else {
            let broker_pid = config
                .kafka
                .bootstrap_servers
                .as_deref()
                .and_then(super::bench_ingest::listener_pid);
            let report =
                super::bench_ingest::run(&config, rows, args.partitions, args.record_bytes, broker_pid).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                super::bench_ingest::print(&report);
            }
            return Ok(());
        };
        // The same backlog through the dev broker in this process, then through the
        // running broker, over as many partitions.
        let mut in_process = config.clone();
        in_process.kafka.bootstrap_servers = None;
        let dev = super::bench_ingest::run(&in_process, rows, args.partitions, args.record_bytes, None).await?;
        let mut running = config.clone();
        running.kafka.bootstrap_servers = Some(bootstrap.clone());
        let broker_pid = args.broker_pid.or_else(|| super::bench_ingest::listener_pid(bootstrap));
        if broker_pid.is_none() {
            eprintln!("bench: no process on this machine listens on {bootstrap}: the broker's CPU is not measured");
        }
        let real =
            super::bench_ingest::run(&running, rows, Some(dev.partitions), args.record_bytes, broker_pid).await?;
        if args.json {
            println!("{}", serde_json::json!({ "dev_broker": dev, "broker": real }));
        } else {
            super::bench_ingest::print(&dev);
            println!();
            super::bench_ingest::print(&real);
            println!();
            let ratio =
                |r: &super::bench_ingest::IngestReport| r.ratio_to_copy.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
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
    let scratch = Scratch::create(&config.dwh.database_url).await?;
    let result = run_http(&config, &args, rows, &scratch).await;
    scratch.drop_database().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn run_http(config: &Config, args: &BenchArgs, rows: usize, scratch: &Scratch) -> anyhow::Result<Report> {
    let mut dwh_config = config.dwh.clone();
    dwh_config.database_url = scratch.url.clone();
    let dwh = Dwh::connect(&dwh_config)?;
    dwh.migrate().await?;

    let records = crate::sample::records(Table::EventsPart, rows, 0);
    // Shared, so that sending one is not a copy of it in the timed loop.
    let bodies: Vec<bytes::Bytes> = records
        .chunks(args.per_request)
        .map(|chunk| serde_json::to_vec(&json!({ "data": chunk })).map(bytes::Bytes::from))
        .collect::<Result<_, _>>()?;
    let request_bytes = bodies.iter().map(bytes::Bytes::len).sum();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let mut open_config = config.clone();
    open_config.http.api_token = None;
    let max_body = open_config
        .http
        .max_body_bytes
        .max(bodies.iter().map(bytes::Bytes::len).max().unwrap_or(0) + 1);
    let app = http::router(AppState::new(dwh.clone(), &open_config), max_body);
    let stop = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, app, stop.clone(), open_config.http.clone()));

    let client = reqwest::Client::new();
    let copy_text = match scratch.url.backend() {
        Backend::Postgres => Some(CopyText::write(records.iter().cloned(), args.copy_file.as_deref())?),
        Backend::Sqlite => None,
    };
    let copy_before = match &copy_text {
        Some(text) => Some(text.load(&scratch.url).await?),
        None => None,
    };
    settle(&scratch.url, &[]).await?;
    let process_before = cpu_seconds("self");
    let backends_before = postgres_backends_cpu(&scratch.url).await;
    let started = Instant::now();
    let mut inserted = 0;
    for body in &bodies {
        inserted += post_events(&client, &base, body.clone()).await?;
    }
    let elapsed = started.elapsed();
    let cpu = HttpCpu {
        process_seconds: cpu_seconds("self")
            .zip(process_before)
            .map(|((user, system), (user0, system0))| user + system - user0 - system0),
        // A backend that started during the requests counts from zero.
        postgres_seconds: postgres_backends_cpu(&scratch.url).await.map(|after| {
            let before = backends_before.unwrap_or_default();
            after
                .iter()
                .map(|(pid, seconds)| seconds - before.get(pid).unwrap_or(&0.0))
                .sum()
        }),
    };
    stop.cancel();
    let _ = server.await;
    if inserted != rows {
        bail!("the API inserted {inserted} of {} rows", rows);
    }

    let copy = match (copy_text, copy_before) {
        (Some(text), Some(before)) => Some(Baseline {
            before,
            after: text.load(&scratch.url).await?,
        }),
        _ => None,
    };
    let seconds = elapsed.as_secs_f64();
    let rows_per_second = rows as f64 / seconds;
    Ok(Report {
        scenario: "http",
        backend: match scratch.url.backend() {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        },
        rows,
        requests: bodies.len(),
        request_bytes,
        seconds,
        rows_per_second,
        mb_per_second: request_bytes as f64 / 1e6 / seconds,
        copy_rows_per_second: copy.as_ref().map(|c| rows as f64 / c.seconds()),
        ratio_to_copy: copy.as_ref().map(|c| rows_per_second / (rows as f64 / c.seconds())),
        copy,
        cpu,
    })
}

/// POSTs one body and returns the `count` of inserted rows.
async fn post_events(client: &reqwest::Client, base: &str, body: bytes::Bytes) -> anyhow::Result<usize> {
    let response = client
        .post(format!("{base}/dwh/events_part"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let parsed: Value = response.json().await.context("response is not JSON")?;
    if !status.is_success() {
        bail!("POST failed with {status}: {parsed}");
    }
    parsed["count"]
        .as_u64()
        .map(|c| c as usize)
        .context("response without count")
}

/// `(user, system)` CPU seconds of a process so far (`/proc/PID/stat`; Linux
/// reports them in USER_HZ, which is 100 on x86 and arm64).
pub(super) fn cpu_seconds(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|t| t / 100.0);
    Some((ticks(11)?, ticks(12)?))
}

/// The CPU seconds (user + system) so far of each of the scratch database's
/// `dwh-helper` backends, by process id; `None` off PostgreSQL or when the
/// server's processes are not on this machine.
pub(super) async fn postgres_backends_cpu(url: &DatabaseUrl) -> Option<std::collections::BTreeMap<i32, f64>> {
    if url.backend() != Backend::Postgres {
        return None;
    }
    let mut conn = sqlx::PgConnection::connect(url.expose()).await.ok()?;
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'dwh-helper'",
    )
    .fetch_all(&mut conn)
    .await
    .ok()?;
    let seconds: std::collections::BTreeMap<i32, f64> = pids
        .into_iter()
        .filter_map(|pid| cpu_seconds(&pid.to_string()).map(|(user, system)| (pid, user + system)))
        .collect();
    (!seconds.is_empty()).then_some(seconds)
}

/// A size field of `/proc/PID/status` (`VmHWM:`, `VmRSS:`, …), in MiB.
pub(super) fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Brings the scratch database to the same quiet state before each measured
/// phase, so that neither pays for the other's leftovers: `VACUUM (ANALYZE)` of
/// the tables written so far (else autovacuum may start on them in the middle of
/// the next phase) and a `CHECKPOINT` (else one may fall due in it). A role not
/// allowed to run `CHECKPOINT` skips it.
pub(super) async fn settle(url: &DatabaseUrl, tables: &[&str]) -> anyhow::Result<()> {
    if url.backend() != Backend::Postgres {
        return Ok(());
    }
    // A vacuum takes seconds: not a slow statement worth a warning here.
    let mut conn = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url.expose())?
        .log_slow_statements(log::LevelFilter::Off, Duration::ZERO)
        .connect()
        .await?;
    for table in tables {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot vacuum {table} before the next phase"))?;
    }
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut conn).await {
        tracing::debug!(error = %e, "no checkpoint before the next phase");
    }
    Ok(())
}

/// One plain COPY's time, and the CPU its backend spent (when the server runs
/// on this machine).
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct CopyRun {
    pub(super) seconds: f64,
    pub(super) postgres_seconds: Option<f64>,
}

/// The ceiling a scenario is compared against: one plain `COPY` of the same rows
/// into an empty copy of events_part (same columns, defaults and indexes), run
/// right before the scenario and again right after it. This machine's speed
/// drifts by a third within minutes, so the ratio uses the mean of the two
/// times, and both are reported.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Baseline {
    pub(super) before: CopyRun,
    pub(super) after: CopyRun,
}

impl Baseline {
    pub(super) fn seconds(&self) -> f64 {
        (self.before.seconds + self.after.seconds) / 2.0
    }

    /// The table row: the mean rate, then each run.
    pub(super) fn print(&self, rows: usize, label: &str, ratio_label: &str, contender_rows_per_second: f64) {
        let rate = rows as f64 / self.seconds();
        let run = |r: &CopyRun| match r.postgres_seconds {
            Some(cpu) => format!("{:.2} s ({cpu:.1} s CPU)", r.seconds),
            None => format!("{:.2} s", r.seconds),
        };
        println!(
            "{label:<w$}{rate:>10.0} rows/s  before {}, after {}",
            run(&self.before),
            run(&self.after),
            w = ratio_label.len().max(label.len()) + 1
        );
        println!(
            "{ratio_label:<w$}{:>10.2}",
            contender_rows_per_second / rate,
            w = ratio_label.len().max(label.len()) + 1
        );
    }
}

/// The rows of the plain `COPY` baseline as COPY text in a file (kept at
/// `copy_file` when given, else removed when dropped), written once, loaded by
/// each [`CopyText::load`].
pub(super) struct CopyText {
    path: std::path::PathBuf,
    _temp: Option<tempfile::TempPath>,
}

impl CopyText {
    pub(super) fn write(
        records: impl Iterator<Item = Value>,
        copy_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        use std::io::Write as _;
        let (path, temp) = match copy_file {
            Some(path) => (path.to_owned(), None),
            None => {
                let temp = tempfile::NamedTempFile::new()?.into_temp_path();
                (temp.to_path_buf(), Some(temp))
            }
        };
        let file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let mut line = String::new();
        for record in records {
            let row = decode_json(Table::EventsPart, record)?.row;
            line.clear();
            for (i, value) in row.values.iter().enumerate() {
                if i > 0 {
                    line.push('\t');
                }
                sql::push_copy_value(&mut line, value);
            }
            line.push('\n');
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
        Ok(CopyText { path, _temp: temp })
    }

    /// One timed load: a fresh `bench_copy` table, the database settled
    /// ([`settle`]), the file streamed to the server in 8 MiB chunks; the table
    /// is dropped afterwards. Only the load is timed.
    pub(super) async fn load(&self, url: &DatabaseUrl) -> anyhow::Result<CopyRun> {
        use std::io::Read as _;
        let spec = Table::EventsPart.spec();
        let mut conn = sqlx::PgConnection::connect(url.expose()).await?;
        sqlx::query("DROP TABLE IF EXISTS bench_copy")
            .execute(&mut conn)
            .await?;
        sqlx::query("CREATE TABLE bench_copy (LIKE events_part INCLUDING DEFAULTS INCLUDING INDEXES)")
            .execute(&mut conn)
            .await?;
        let mut file = std::fs::File::open(&self.path)?;
        settle(url, &["events_part"]).await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let cpu = || cpu_seconds(&backend.to_string()).map(|(user, system)| user + system);
        let cpu_before = cpu();
        let started = Instant::now();
        let mut copy = conn
            .copy_in_raw(&format!("COPY bench_copy ({}) FROM STDIN", sql::column_list(spec)))
            .await?;
        let mut chunk = vec![0u8; 8 << 20];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            copy.send(&chunk[..n]).await?;
        }
        copy.finish().await?;
        let run = CopyRun {
            seconds: started.elapsed().as_secs_f64(),
            postgres_seconds: cpu().zip(cpu_before).map(|(after, before)| after - before),
        };
        sqlx::query("DROP TABLE bench_copy").execute(&mut conn).await?;
        Ok(run)
    }
}

/// A scratch database beside the configured one.
pub(super) struct Scratch {
    pub(super) url: DatabaseUrl,
    admin: Option<DatabaseUrl>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub(super) async fn create(configured: &DatabaseUrl) -> anyhow::Result<Scratch> {
        let name = format!("dwh_bench_{}", std::process::id());
        match configured.backend() {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(configured.expose())
                    .await
                    .with_context(|| format!("cannot connect to {configured}"))?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .context("the benchmark needs the CREATEDB privilege for its scratch database")?;
                let mut url = url::Url::parse(configured.expose())?;
                url.set_path(&format!("/{name}"));
                Ok(Scratch {
                    url: DatabaseUrl::parse(url.as_str()).map_err(anyhow::Error::msg)?,
                    admin: Some(configured.clone()),
                    name,
                    _dir: None,
                })
            }
            Backend::Sqlite => {
                let dir = tempfile::Builder::new().prefix(&name).tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Ok(Scratch {
                    url: DatabaseUrl::parse(&url).map_err(anyhow::Error::msg)?,
                    admin: None,
                    name,
                    _dir: Some(dir),
                })
            }
        }
    }

    pub(super) async fn drop_database(&self) {
        let Some(admin) = &self.admin else { return };
        let dropped = async {
            let mut conn = sqlx::PgConnection::connect(admin.expose()).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&mut conn)
                .await
        };
        if let Err(e) = dropped.await {
            tracing::warn!(database = %self.name, error = %e, "could not drop the scratch database");
        }
    }
}

fn print_table(r: &Report) {
    println!("scenario            {} ({})", r.scenario, r.backend);
    println!("rows                {}", r.rows);
    println!(
        "requests            {} ({:.1} MB of JSON)",
        r.requests,
        r.request_bytes as f64 / 1e6
    );
    println!(
        "POST /dwh/events_part   {:>10.0} rows/s  {:>6.1} MB/s  {:>7.2} s",
        r.rows_per_second, r.mb_per_second, r.seconds
    );
    if let Some(copy) = &r.copy {
        copy.print(r.rows, "plain COPY", "API / COPY             ", r.rows_per_second);
    }
    let seconds = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"));
    println!(
        "CPU                 dwh-helper {} (server and client), PostgreSQL backends {}",
        seconds(r.cpu.process_seconds),
        seconds(r.cpu.postgres_seconds)
    );
}
