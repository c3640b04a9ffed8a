//! `dwh-helper bench --scenario api-memory`: the API's peak memory under large
//! concurrent requests.
//!
//! The bench starts `run --roles api` as a child process (a scratch SQLite DWH,
//! the configured S3 bucket), then sends, all at once:
//! 1. `--clients` POSTs of `--post-mb` MiB each to `/dwh/events_part` (generated
//!    while sent, never held whole by the bench);
//! 2. `--clients` multipart uploads of `--upload-mb` MiB each to `/s3/upload`.
//!
//! Before each phase the child's peak RSS (`VmHWM`) is reset (`clear_refs`), so
//! each phase reports its own peak. The answers are counted by status: under the
//! default limits most POSTs are refused (413 past `HTTP_TABLES_MAX_BODY_BYTES`,
//! 503 past `HTTP_TABLES_MAX_CONCURRENT_WRITES`), and that is the point: the
//! memory they may take is bounded whatever a client sends.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::Serialize;

use crate::catalogue::Table;
use crate::config::Config;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Serialize)]
pub(super) struct MemoryReport {
    scenario: &'static str,
    idle_rss_mib: f64,
    phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
struct Phase {
    what: String,
    clients: usize,
    mib_each: u64,
    seconds: f64,
    /// Answers by HTTP status (`closed`: the connection closed before the
    /// client read an answer, as after an early 413 while the body was still being sent).
    answers: BTreeMap<String, usize>,
    peak_rss_mib: f64,
}

pub(super) struct Load {
    pub clients: usize,
    pub post_mib: u64,
    pub upload_mib: u64,
}

pub(super) async fn run(config: &Config, load: Load) -> anyhow::Result<MemoryReport> {
    if !config.s3.is_configured() {
        bail!("the upload phase needs an S3 bucket: set S3_ENDPOINT_URL (moto or MinIO will do) and S3_BUCKET_NAME");
    }
    let s3 = crate::s3::S3::new(&config.s3);
    if s3.check().await.is_err() {
        s3.create_bucket()
            .await
            .context("cannot reach or create the S3 bucket")?;
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let base = format!("http://127.0.0.1:{port}");
    // The child reads S3_* and HTTP_* from the environment it inherits; its DWH,
    // address and roles are the bench's.
    let mut child = Command::new(std::env::current_exe()?)
        .args(["run", "--roles", "api"])
        .env(
            "DWH_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("bench.db").display()),
        )
        .env("HTTP_BIND", format!("127.0.0.1:{port}"))
        .env_remove("HTTP_API_TOKEN")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the API")?;
    let result = measure(&base, child.id(), &load).await;
    let _ = child.kill();
    let _ = child.wait();
    let (idle_rss_mib, phases) = result?;
    Ok(MemoryReport {
        scenario: "api-memory",
        idle_rss_mib,
        phases,
    })
}

async fn measure(base: &str, pid: u32, load: &Load) -> anyhow::Result<(f64, Vec<Phase>)> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("{base}/health/live"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("the API did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = super::probe::rss_mib(pid).unwrap_or(0.0);

    let post = |i: usize| {
        client
            .post(format!("{base}/dwh/events_part"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(records_body(load.post_mib * MIB, i as u64)))
    };
    let posts = phase(pid, load.clients, "POST /dwh/events_part", load.post_mib, post).await;

    let upload = |i: usize| {
        let (length, body) = form_body(load.upload_mib * MIB);
        client
            .post(format!("{base}/s3/upload?key=bench/api-memory-{i}.bin"))
            .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
            .header("content-length", length)
            .body(reqwest::Body::wrap_stream(body))
    };
    let uploads = phase(pid, load.clients, "POST /s3/upload", load.upload_mib, upload).await;
    for i in 0..load.clients {
        let _ = client
            .delete(format!("{base}/s3/delete?key=bench/api-memory-{i}.bin"))
            .send()
            .await;
    }
    Ok((idle, vec![posts?, uploads?]))
}

/// Sends `clients` requests at once, `mib_each` MiB each, and records the
/// answers and the peak RSS.
async fn phase(
    pid: u32,
    clients: usize,
    request_line: &str,
    mib_each: u64,
    request: impl Fn(usize) -> reqwest::RequestBuilder,
) -> anyhow::Result<Phase> {
    // Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("cannot reset the API's peak RSS")?;
    let what = format!("{request_line}, {mib_each} MiB");
    eprintln!("bench: {clients} × {what}");
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..clients).map(|i| {
        let request = request(i);
        async move {
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16().to_string();
                    let _ = response.bytes().await;
                    status
                }
                // The server answered early (413) and closed while the body was still being sent.
                Err(_) => "closed".to_owned(),
            }
        }
    }))
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let mut counted = BTreeMap::new();
    for answer in answers {
        *counted.entry(answer).or_insert(0) += 1;
    }
    Ok(Phase {
        what,
        clients,
        mib_each,
        seconds,
        answers: counted,
        peak_rss_mib: super::probe::peak_rss_mib(pid).context("cannot read the API's peak RSS")?,
    })
}

/// `{"data": [...]}` of sample `events_part` records, about `bytes` long,
/// generated as it is sent.
fn records_body(bytes: u64, seed: u64) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let records: Vec<String> = crate::sample::records(Table::EventsPart, 1_000, seed)
        .iter()
        .map(|r| r.to_string())
        .collect();
    let chunk: Bytes = records.join(",").into_bytes().into();
    let rounds = (bytes / chunk.len() as u64).max(1);
    let open = futures_util::stream::once(async { Ok(Bytes::from_static(b"{\"data\":[")) });
    let middle = futures_util::stream::iter((0..rounds).map(move |i| {
        let mut part = Vec::with_capacity(chunk.len() + 1);
        if i > 0 {
            part.push(b',');
        }
        part.extend_from_slice(&chunk);
        Ok(Bytes::from(part))
    }));
    let close = futures_util::stream::once(async { Ok(Bytes::from_static(b"]}")) });
    open.chain(middle).chain(close)
}

const BOUNDARY: &str = "dwh-helper-bench-boundary";

/// A multipart form with one `file` field of `bytes` bytes, and its length.
fn form_body(bytes: u64) -> (u64, impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>) {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let length = head.len() as u64 + bytes + tail.len() as u64;
    let block: Bytes = (0..MIB).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let whole = bytes / MIB;
    let rest = (bytes % MIB) as usize;
    let file = futures_util::stream::iter(
        (0..whole)
            .map(move |_| block.clone())
            .chain((rest > 0).then(|| Bytes::from(vec![0u8; rest])))
            .map(Ok),
    );
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(file)
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    (length, body)
}

pub(super) fn print(r: &MemoryReport) {
    println!("scenario         api-memory (run --roles api, a child process)");
    println!("idle RSS         {:.1} MiB", r.idle_rss_mib);
    for p in &r.phases {
        let answers: Vec<String> = p.answers.iter().map(|(s, n)| format!("{n}× {s}")).collect();
        println!(
            "{:<40} peak RSS {:>7.1} MiB  {:>6.1} s  answers: {}",
            format!("{} × {}", p.clients, p.what),
            p.peak_rss_mib,
            p.seconds,
            answers.join(", ")
        );
    }
}
