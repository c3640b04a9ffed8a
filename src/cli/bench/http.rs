//! `dwh-helper bench --scenario http`: synthetic `events_part` records are
//! posted through the real HTTP API in requests of `--per-request` records; the
//! same rows are loaded with one plain `COPY` into an empty copy of the table
//! (same columns and indexes) on the same database right before and right
//! after: the ceiling the API is compared against ([`Baseline`]).

use std::time::Instant;

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::baseline::{settle, Baseline, CopyText, Scratch};
use super::probe::{own_cpu_seconds, postgres_backends_cpu};
use crate::catalogue::Table;
use crate::config::{Backend, Config};
use crate::http::{self, AppState};
use crate::store::Dwh;

#[derive(Debug, Serialize)]
pub(super) struct Report {
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

/// Runs the scenario on a scratch database, dropped afterwards.
pub(super) async fn run(
    config: &Config,
    rows: usize,
    per_request: usize,
    copy_file: Option<&std::path::Path>,
) -> anyhow::Result<Report> {
    let scratch = Scratch::create(&config.dwh.database_url).await?;
    let result = run_on(config, rows, per_request, copy_file, &scratch).await;
    scratch.drop_database().await;
    result
}

async fn run_on(
    config: &Config,
    rows: usize,
    per_request: usize,
    copy_file: Option<&std::path::Path>,
    scratch: &Scratch,
) -> anyhow::Result<Report> {
    let mut dwh_config = config.dwh.clone();
    dwh_config.database_url = scratch.url.clone();
    let dwh = Dwh::connect(&dwh_config)?;
    dwh.migrate().await?;

    let records = crate::sample::records(Table::EventsPart, rows, 0);
    // Shared, so that sending one is not a copy of it in the timed loop.
    let bodies: Vec<bytes::Bytes> = records
        .chunks(per_request)
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
        Backend::Postgres => Some(CopyText::write(records.iter().cloned(), copy_file)?),
        Backend::Sqlite => None,
    };
    let copy_before = match &copy_text {
        Some(text) => Some(text.load(&scratch.url).await?),
        None => None,
    };
    settle(&scratch.url, &[]).await?;
    let process_before = own_cpu_seconds();
    let backends_before = postgres_backends_cpu(&scratch.url).await;
    let started = Instant::now();
    let mut inserted = 0;
    for body in &bodies {
        inserted += post_events(&client, &base, body.clone()).await?;
    }
    let elapsed = started.elapsed();
    let cpu = HttpCpu {
        process_seconds: own_cpu_seconds()
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

pub(super) fn print(r: &Report) {
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
