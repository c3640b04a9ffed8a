//! `dwh-helper bench --scenario ingest`: the ingest role, measured as ops run it.
//!
//! Publishes `--rows` synthetic events_part records (to the configured Kafka, or to
//! an in-process dev broker with enough partitions to hold them all), then starts
//! `dwh-helper run --roles ingest` as a child process against a scratch database and
//! measures it from start until every partition is caught up: rows/s, MB/s, the
//! child's peak RSS and its batch flush latency (from its own `/metrics`). The
//! same rows go through one plain `COPY` on the same database right before and
//! right after: the ceiling ([`super::baseline::Baseline`]).

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::baseline::{settle, Baseline, CopyText, Scratch};
use super::probe::{cpu_seconds, own_cpu_seconds, peak_rss_mib, postgres_backends_cpu};
use crate::catalogue::{self, Table};
use crate::config::{Backend, Config};
use crate::kafka::devbroker::{DevBrokerOptions, PARTITION_LIMIT_BYTES};
use crate::kafka::{self, topics, DevBroker, Publisher};
use crate::sample;
use crate::store::Dwh;

#[derive(Debug, Serialize)]
pub(super) struct IngestReport {
    scenario: &'static str,
    backend: &'static str,
    pub(super) broker: String,
    rows: usize,
    pub(super) partitions: i32,
    payload_bytes: u64,
    produce_seconds: f64,
    seconds: f64,
    rows_per_second: f64,
    mb_per_second: f64,
    peak_rss_mib: Option<f64>,
    batches: usize,
    flush_p50_ms: Option<f64>,
    flush_p99_ms: Option<f64>,
    /// The plain COPY before and after (PostgreSQL only).
    copy: Option<Baseline>,
    /// Rows per second of the mean COPY time.
    copy_rows_per_second: Option<f64>,
    pub(super) ratio_to_copy: Option<f64>,
    /// `KAFKA_MAX_IN_FLIGHT_BYTES` of the ingest process, in MiB.
    budget_mib: f64,
    /// The documented bound of peak RSS for that budget (README, "Memory").
    rss_bound_mib: f64,
    /// Where the CPU went from the child's start until caught up.
    cpu: CpuSplit,
}

/// CPU seconds (user + system) over the measured window, from `/proc`.
#[derive(Debug, Default, Serialize)]
struct CpuSplit {
    ingest_user_seconds: Option<f64>,
    ingest_system_seconds: Option<f64>,
    /// The ingest's PostgreSQL backends (`pg_stat_activity`), when the server
    /// runs on this machine.
    postgres_seconds: Option<f64>,
    /// This process: the dev broker serving the fetches (when it is the broker),
    /// and the bench's polling.
    bench_seconds: Option<f64>,
    /// A running broker's process, when it is on this machine.
    broker_seconds: Option<f64>,
}

/// Record `k` of the benchmark: a sample event, padded to about `bytes` of JSON.
fn bench_record(k: u64, bytes: Option<usize>) -> serde_json::Value {
    let mut record = sample::record(Table::EventsPart, k);
    if let Some(bytes) = bytes {
        let size = record.to_string().len();
        record["original_device_model"] = serde_json::Value::String("x".repeat(bytes.saturating_sub(size + 28)));
    }
    record
}

/// Measures the ingest of `rows` records: through the configured broker when
/// `KAFKA_BOOTSTRAP_SERVERS` is set (whose process, `broker_pid`, has its CPU
/// counted), else through a dev broker in this process.
pub(super) async fn run(
    config: &Config,
    rows: usize,
    partitions: Option<i32>,
    record_bytes: Option<usize>,
    broker_pid: Option<u32>,
) -> anyhow::Result<IngestReport> {
    let scratch = Scratch::create(&config.dwh.database_url).await?;
    let result = measure(config, rows, partitions, record_bytes, broker_pid, &scratch).await;
    scratch.drop_database().await;
    result
}

async fn measure(
    config: &Config,
    rows: usize,
    partitions: Option<i32>,
    record_bytes: Option<usize>,
    broker_pid: Option<u32>,
    scratch: &Scratch,
) -> anyhow::Result<IngestReport> {
    let mut dwh_config = config.dwh.clone();
    dwh_config.database_url = scratch.url.clone();
    let dwh = Dwh::connect(&dwh_config)?;
    dwh.migrate().await?;

    let prefix = format!("bench{}.", std::process::id());
    let group = format!("dwh-bench-{}", std::process::id());
    let sample_size = bench_record(0, record_bytes).to_string().len();
    // The dev broker forgets data past 5 MiB a partition: spread the backlog so
    // that no partition holds more than 3 MiB of it. A running broker gets as many
    // partitions, so that the two compare.
    let needed = (rows * (sample_size + 64)).div_ceil(PARTITION_LIMIT_BYTES * 3 / 5);
    let partitions = partitions.unwrap_or((needed as i32).max(16));
    let (broker, bootstrap) = match &config.kafka.bootstrap_servers {
        Some(servers) => (None, servers.clone()),
        None => {
            let broker = DevBroker::start(&DevBrokerOptions {
                partitions,
                topic_prefix: prefix.clone(),
                ..DevBrokerOptions::default()
            })
            .await?;
            let bootstrap = broker.bootstrap_servers().to_owned();
            (Some(broker), bootstrap)
        }
    };
    let mut kafka_config = config.kafka.clone();
    if sample_size > 512 * 1024 {
        // Records of a MiB and more: above librdkafka's default message size.
        let max = (sample_size * 2).max(1 << 20).to_string();
        kafka_config
            .librdkafka
            .push(("message.max.bytes".into(), crate::config::Secret::new(max)));
    }
    // The dev broker finds where a fetch starts by walking the partition's record
    // batches one by one: records published a few at a time per partition make
    // every fetch slow (1M records: 37 of 51 s of its CPU in that walk). Publish
    // batches as large as a broker takes; KAFKA_LIBRDKAFKA_* still overrides.
    kafka_config.librdkafka.splice(
        0..0,
        [
            ("linger.ms", "500"),
            ("batch.num.messages", "100000"),
            ("batch.size", "1000000"),
        ]
        .map(|(name, value)| (name.to_owned(), crate::config::Secret::new(value.to_owned()))),
    );
    kafka_config.bootstrap_servers = Some(bootstrap.clone());
    kafka_config.topic_prefix = prefix.clone();
    let topic = kafka::topic_name(&prefix, Table::EventsPart);
    if broker.is_none() {
        topics::create(&kafka_config, std::slice::from_ref(&topic), partitions).await?;
    }

    eprintln!("bench: publishing {rows} records to {topic} ({partitions} partitions)");
    let produce_started = Instant::now();
    let publisher = Publisher::new(&kafka_config)?;
    let mut batch = publisher.batch();
    let mut payload_bytes = 0u64;
    for k in 0..rows as u64 {
        let record = bench_record(k, record_bytes);
        let key = catalogue::natural_key(
            Table::EventsPart.spec(),
            &catalogue::decode_json(Table::EventsPart, record.clone())?.row,
        );
        let payload = record.to_string();
        payload_bytes += payload.len() as u64;
        batch.send(&topic, key.as_bytes(), payload.as_bytes()).await?;
    }
    let published = batch.finish().await?;
    let produce_seconds = produce_started.elapsed().as_secs_f64();
    if published != rows as u64 {
        bail!("published {published} of {rows} records");
    }
    let ends = {
        let (kafka_config, topic) = (kafka_config.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            topics::Metadata::connect(&kafka_config)?
                .watermarks(&topic)
                .map_err(anyhow::Error::from)
        })
        .await??
    };
    if let Some(w) = ends.iter().find(|w| w.low > 0) {
        bail!(
            "the broker dropped data of partition {} (low watermark {}); use more --partitions",
            w.partition,
            w.low
        );
    }

    let copy_text = match scratch.url.backend() {
        Backend::Postgres => {
            eprintln!("bench: loading the same rows with a plain COPY");
            Some(CopyText::write(
                (0..rows as u64).map(|k| bench_record(k, record_bytes)),
                None,
            )?)
        }
        Backend::Sqlite => None,
    };
    let copy_before = match &copy_text {
        Some(text) => Some(text.load(&scratch.url).await?),
        None => None,
    };
    settle(&scratch.url, &[]).await?;
    eprintln!("bench: starting the ingest role");
    let metrics_url = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}/metrics", listener.local_addr()?)
    };
    let started = Instant::now();
    let bench_cpu_before = own_cpu_seconds();
    let broker_cpu_before = broker_pid.and_then(|pid| cpu_seconds(pid as i32));
    let mut child = Command::new(std::env::current_exe()?)
        .args(["run", "--roles", "ingest,api", "--no-migrate"])
        .env("DWH_DATABASE_URL", scratch.url.expose())
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("KAFKA_TOPIC_PREFIX", &prefix)
        .env("KAFKA_GROUP_ID", &group)
        .env("KAFKA_AUTO_OFFSET_RESET", "earliest")
        .env(
            "HTTP_BIND",
            metrics_url.trim_start_matches("http://").trim_end_matches("/metrics"),
        )
        .env_remove("HTTP_API_TOKEN")
        .env("LOG_FORMAT", "json")
        .env(
            "LOG_LEVEL",
            std::env::var("BENCH_CHILD_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the ingest child process")?;
    let reader = {
        // Warnings and errors (and anything not a log event: a panic) are shown.
        let stderr = child.stderr.take().context("child stderr")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("ingest: {line}");
            }
        })
    };
    let deadline = started + Duration::from_secs(3600);
    let pid = child.id();
    let mut peak_rss = None;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the ingest process exited early: {status}");
        }
        peak_rss = peak_rss_mib(pid).or(peak_rss);
        let stored = dwh.topic_offsets(&group, &topic).await?;
        let behind = ends
            .iter()
            .any(|w| stored.get(&w.partition).copied().unwrap_or(0) < w.high);
        if !behind {
            break;
        }
        if Instant::now() > deadline {
            bail!("the ingest did not catch up within an hour");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    peak_rss = peak_rss_mib(pid).or(peak_rss);
    let ingest_cpu = cpu_seconds(pid as i32);
    let cpu = CpuSplit {
        ingest_user_seconds: ingest_cpu.map(|(user, _)| user),
        ingest_system_seconds: ingest_cpu.map(|(_, system)| system),
        postgres_seconds: postgres_backends_cpu(&scratch.url)
            .await
            .map(|backends| backends.values().sum()),
        bench_seconds: own_cpu_seconds()
            .zip(bench_cpu_before)
            .map(|((user, system), (user0, system0))| user + system - user0 - system0),
        broker_seconds: broker_pid
            .and_then(|pid| cpu_seconds(pid as i32))
            .zip(broker_cpu_before)
            .map(|((user, system), (user0, system0))| user + system - user0 - system0),
    };
    // Batches and flush latency from the child's own /metrics.
    let exposition = reqwest::get(&metrics_url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("cannot scrape the ingest process's /metrics")?
        .text()
        .await?;
    let flushes = Histogram::read(&exposition, "dwh_helper_batch_flush_duration_seconds", "events_part")
        .context("the scrape has no flush histogram for events_part")?;
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let _ = reader.join();
    if !status.success() {
        bail!("the ingest process did not stop cleanly: {status}");
    }
    let stored_rows = dwh.count_rows("events_part").await?;
    if stored_rows != rows as i64 {
        bail!("events_part holds {stored_rows} rows, expected {rows}");
    }
    drop(broker);

    let copy = match (copy_text, copy_before) {
        (Some(text), Some(before)) => {
            eprintln!("bench: loading the same rows with a plain COPY again");
            Some(Baseline {
                before,
                after: text.load(&scratch.url).await?,
            })
        }
        _ => None,
    };
    let rows_per_second = rows as f64 / seconds;
    let copy_rps = copy.as_ref().map(|c| rows as f64 / c.seconds());
    Ok(IngestReport {
        scenario: "ingest",
        backend: match scratch.url.backend() {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        },
        broker: match &config.kafka.bootstrap_servers {
            Some(servers) => format!("broker at {servers}"),
            None => "dev broker".to_owned(),
        },
        rows,
        partitions,
        payload_bytes,
        produce_seconds,
        seconds,
        rows_per_second,
        mb_per_second: payload_bytes as f64 / 1e6 / seconds,
        peak_rss_mib: peak_rss,
        batches: flushes.count as usize,
        flush_p50_ms: flushes.quantile(0.5).map(|s| s * 1000.0),
        flush_p99_ms: flushes.quantile(0.99).map(|s| s * 1000.0),
        copy,
        copy_rows_per_second: copy_rps,
        ratio_to_copy: copy_rps.map(|c| rows_per_second / c),
        budget_mib: config.kafka.max_in_flight_bytes as f64 / MIB,
        rss_bound_mib: rss_bound(config) as f64 / MIB,
        cpu,
    })
}

const MIB: f64 = (1 << 20) as f64;

/// One table's histogram read back from a Prometheus text exposition.
#[derive(Debug, PartialEq)]
struct Histogram {
    /// `(upper bound, cumulative count)`, in bound order.
    buckets: Vec<(f64, f64)>,
    count: f64,
}

impl Histogram {
    /// The `{table="..."}` series of histogram `name` in `text`.
    fn read(text: &str, name: &str, table: &str) -> Option<Histogram> {
        let bucket_prefix = format!("{name}_bucket{{");
        let label = format!("table=\"{table}\"");
        let mut buckets = Vec::new();
        let mut count = None;
        for line in text.lines().filter(|l| l.contains(&label)) {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            if series.starts_with(&bucket_prefix) {
                // The `le` label itself (not the end of `table=`).
                let le = series.split(['{', ',']).find_map(|p| p.strip_prefix("le=\""))?;
                let le = le.split('"').next()?;
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                buckets.push((bound, value));
            } else if series.starts_with(&format!("{name}_count{{")) {
                count = Some(value);
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram { buckets, count: count? })
    }

    /// The `q` quantile as Prometheus's `histogram_quantile` estimates it: linear
    /// within the bucket it falls in.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                if bound.is_infinite() {
                    return Some(lower.0);
                }
                let within = (rank - lower.1) / (cumulative - lower.1).max(f64::MIN_POSITIVE);
                return Some(lower.0 + (bound - lower.0) * within);
            }
            lower = (bound, cumulative);
        }
        None
    }
}

/// The documented bound of an ingest process's peak RSS (README, "Memory"): the
/// process itself, the in-flight budget (librdkafka's prefetch included), and
/// the statement text of a write in progress per table, twice (built, then sent).
pub(super) fn rss_bound(config: &Config) -> usize {
    const BASE: usize = 96 << 20;
    BASE + config.kafka.max_in_flight_bytes
        + 2 * config.dwh.max_write_batch_bytes * Table::ALL.len() * config.kafka.write_lanes
}

pub(super) fn print(r: &IngestReport) {
    let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1} {unit}"));
    println!("scenario         ingest ({}, {})", r.backend, r.broker);
    println!(
        "records          {} events_part over {} partitions, {:.1} MB of JSON ({} bytes each)",
        r.rows,
        r.partitions,
        r.payload_bytes as f64 / 1e6,
        r.payload_bytes / r.rows.max(1) as u64
    );
    println!(
        "publish          {:.2} s (not part of the measurement)",
        r.produce_seconds
    );
    println!(
        "ingest           {:>10.0} rows/s  {:>6.1} MB/s  {:>7.2} s (start to caught up)",
        r.rows_per_second, r.mb_per_second, r.seconds
    );
    println!(
        "peak RSS         {}  (bound {:.0} MiB for KAFKA_MAX_IN_FLIGHT_BYTES {:.0} MiB)",
        opt(r.peak_rss_mib, "MiB"),
        r.rss_bound_mib,
        r.budget_mib
    );
    println!(
        "batch flush      p50 {}  p99 {}  ({} batches)",
        opt(r.flush_p50_ms, "ms"),
        opt(r.flush_p99_ms, "ms"),
        r.batches
    );
    let seconds = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} s"));
    let broker = if r.broker == "dev broker" {
        format!("dev broker and bench {}", seconds(r.cpu.bench_seconds))
    } else {
        format!(
            "broker process {}; bench {}",
            seconds(r.cpu.broker_seconds),
            seconds(r.cpu.bench_seconds)
        )
    };
    println!(
        "CPU              dwh-helper {} user + {} system; PostgreSQL backends {}; {broker}; of {:.1} s on {} cores",
        seconds(r.cpu.ingest_user_seconds),
        seconds(r.cpu.ingest_system_seconds),
        seconds(r.cpu.postgres_seconds),
        r.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(copy) = &r.copy {
        copy.print(r.rows, "plain COPY", "ingest / COPY   ", r.rows_per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_read_back_from_the_exposition() {
        let text = "\
# TYPE x histogram
x_sum{table=\"events_part\"} 1.5
x_count{table=\"events_part\"} 10
x_bucket{le=\"0.1\",table=\"events_part\"} 0
x_bucket{table=\"events_part\",le=\"0.2\"} 5
x_bucket{table=\"events_part\",le=\"0.4\"} 9
x_bucket{table=\"events_part\",le=\"+Inf\"} 10
x_count{table=\"user_locations\"} 3
";
        let h = Histogram::read(text, "x", "events_part").expect("found");
        assert_eq!(h.count, 10.0);
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.quantile(0.5), Some(0.2), "the fifth of ten ends the 0.1..0.2 bucket");
        let p80 = h.quantile(0.8).expect("p80");
        assert!((p80 - 0.35).abs() < 1e-9, "three of four into 0.2..0.4: {p80}");
        assert_eq!(h.quantile(0.99), Some(0.4), "the +Inf bucket reports its lower bound");
        assert_eq!(Histogram::read(text, "x", "mobile_devices"), None);
    }
}
