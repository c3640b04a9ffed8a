//! `dwh-helper bench --scenario appmetrica`: a large Logs API export through
//! `dwh-helper appmetrica export` in bounded memory.
//!
//! The bench serves a generated `events` export of `--mb` megabytes from a local
//! HTTP server (generated while it is sent, never held whole), runs
//! `appmetrica export` for that day as a child process against an in-process dev
//! broker and a scratch SQLite DWH, and reports the child's peak RSS (`VmHWM`),
//! rows and throughput.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _};
use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use serde::Serialize;

use super::probe::peak_rss_mib;
use crate::kafka::devbroker::DevBrokerOptions;
use crate::kafka::DevBroker;

#[derive(Debug, Serialize)]
pub(super) struct AppMetricaReport {
    scenario: &'static str,
    export_mb: f64,
    rows: u64,
    seconds: f64,
    rows_per_second: f64,
    mb_per_second: f64,
    peak_rss_mib: Option<f64>,
}

/// One generated row (numbers as strings, like the API), about 560 bytes.
fn row(i: u64) -> String {
    let ts = 1_709_251_200 + (i * 7) % 86_000;
    let name = ["app_open", "purchase", "screen_view", "search"][(i % 4) as usize];
    serde_json::json!({
        "event_name": name,
        "event_timestamp": ts.to_string(),
        "event_receive_timestamp": (ts + 3).to_string(),
        "event_json": format!("{{\"screen\":\"s{}\",\"value\":\"{}\",\"items\":[1,2,3]}}", i % 11, i),
        "session_id": (10_000_000 + i / 20).to_string(),
        "appmetrica_device_id": (17_000_000_000_000_000_000u64 + i % 100_000).to_string(),
        "profile_id": format!("user-{}", i % 100_000),
        "device_manufacturer": "Samsung", "device_model": "SM-G991B", "os_name": "android",
        "os_version": "14", "device_locale": "ru_RU", "connection_type": "wifi",
        "operator_name": "MTS", "mcc": "250", "mnc": "1", "city": "Moscow",
        "country_iso_code": "RU", "app_version_name": "5.12.0", "app_build_number": "51200",
        "app_package_name": "com.example.app",
    })
    .to_string()
}

pub(super) async fn run(megabytes: u64) -> anyhow::Result<AppMetricaReport> {
    let target = megabytes * 1_000_000;
    let sample = row(0).len() as u64 + 1;
    let rows = target / sample;
    let app = Router::new().route(
        "/logs/v1/export/events.json",
        get(move || async move {
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i > rows {
                    return None;
                }
                // Chunks of 256 rows: the body is generated as it is sent.
                let mut chunk = String::with_capacity(256 * 600);
                if i == 0 {
                    chunk.push_str("{\"data\":[");
                }
                let end = (i + 256).min(rows);
                for n in i..end {
                    if n > 0 {
                        chunk.push(',');
                    }
                    chunk.push_str(&row(n));
                }
                if end == rows {
                    chunk.push_str("]}");
                }
                Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(chunk)),
                    if end == rows { rows + 1 } else { end },
                ))
            });
            Body::from_stream(stream)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let broker = DevBroker::start(&DevBrokerOptions {
        partitions: 16,
        topic_prefix: "bench-am.".into(),
        ..DevBrokerOptions::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    eprintln!("bench: a {megabytes} MB export ({rows} rows) through `appmetrica export`");
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "appmetrica",
            "export",
            "--from",
            "2024-03-01",
            "--to",
            "2024-03-01",
            "--endpoint",
            "events",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DWH_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("bench.db").display()),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers())
        .env("KAFKA_TOPIC_PREFIX", "bench-am.")
        .env("APPMETRICA_BASE_URL", &base)
        .env("APPMETRICA_API_KEY", "bench")
        .env("APPMETRICA_APPLICATION_ID", "4242")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the export")?;
    let pid = child.id();
    let mut peak = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        peak = peak_rss_mib(pid).or(peak);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read as _;
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !status.success() {
        bail!("the export failed: {stderr}");
    }
    let fetched: u64 = stderr
        .split_whitespace()
        .skip_while(|w| *w != "fetching…")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if fetched != rows {
        bail!("the export read {fetched} of {rows} rows: {stderr}");
    }
    broker.stop();
    Ok(AppMetricaReport {
        scenario: "appmetrica",
        export_mb: (rows * sample) as f64 / 1e6,
        rows,
        seconds,
        rows_per_second: rows as f64 / seconds,
        mb_per_second: (rows * sample) as f64 / 1e6 / seconds,
        peak_rss_mib: peak,
    })
}

pub(super) fn print(r: &AppMetricaReport) {
    println!("scenario         appmetrica export (events, one window)");
    println!("export           {:.0} MB of JSON, {} rows", r.export_mb, r.rows);
    println!(
        "processed        {:.0} rows/s  {:.1} MB/s  {:.1} s",
        r.rows_per_second, r.mb_per_second, r.seconds
    );
    println!(
        "peak RSS         {}",
        r.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.1} MiB"))
    );
}
