//! What ops see: `/metrics` (parsed by a Prometheus text parser), the lag loop,
//! `status` and `GET /status`, and the label cardinality switch. Every scrape is
//! of a real `dwh-helper run` child against a real PostgreSQL and broker.

mod common;

use std::process::Command;
use std::time::Duration;

use common::otlp::attribute;
use common::*;
use dwh_helper::catalogue::Table;
use dwh_helper::sample;
use serde_json::Value;

const TOKEN: &str = "observability-token";

fn with_api(mut env: Vec<(String, String)>, port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    env.push(("HTTP_BIND".into(), format!("127.0.0.1:{port}")));
    env.push(("HTTP_API_TOKEN".into(), TOKEN.into()));
    env.push(("METRICS_LAG_INTERVAL_SECONDS".into(), "1".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn bad(payload: &str) -> (String, Vec<u8>) {
    ("bad".to_owned(), payload.as_bytes().to_vec())
}

async fn get_status(base: &str) -> Option<(u16, Value)> {
    let response = reqwest::Client::new()
        .get(format!("{base}/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    let code = response.status().as_u16();
    Some((code, response.json().await.ok()?))
}

/// `dwh-helper status [--json]` with `env`: exit code and stdout.
fn status_cli(env: &[(String, String)], json: bool) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dwh-helper"));
    command.arg("status");
    if json {
        command.arg("--json");
    }
    let out = command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .expect("status runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn table_lag(report: &Value, table: Table) -> i64 {
    report["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["table"] == table.name())
        .expect("table in report")["lag"]
        .as_i64()
        .expect("lag")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_landed_and_lag_grows_while_the_database_is_stopped() {
    let (broker, prefix) = broker(2).await;
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.expect("cluster");
    let url = cluster.url();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let env = with_api(ingest_env(&broker, &prefix, &url), port, &[]);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let locations = topic(&prefix, Table::UserLocations);
    publish(
        &config,
        &locations,
        &keyed(Table::UserLocations, sample::records(Table::UserLocations, 300, 1)),
    )
    .await;
    // Five rejects of three classes, between valid records.
    publish(
        &config,
        &locations,
        &[
            bad("{"),
            bad("{\"uuid\":"),
            bad("{}"),
            bad("{\"latitude\": 1}"),
            bad("[1]"),
        ],
    )
    .await;
    publish(
        &config,
        &topic(&prefix, Table::MobileDevices),
        &keyed(Table::MobileDevices, sample::records(Table::MobileDevices, 120, 2)),
    )
    .await;

    let child = Child::run(&env, "ingest,api");
    let landed = |n: f64| {
        let base = base.clone();
        move || {
            let base = base.clone();
            async move {
                let m = Scrape::get(&base, TOKEN).await?;
                let rows = m.value("dwh_helper_rows_inserted_total", &[("table", "user_locations")])?;
                let lag = m.sum("dwh_helper_consumer_lag_records", &[("table", "user_locations")]);
                let lag_series = m.series("dwh_helper_consumer_lag_records", &[("table", "user_locations")]);
                (rows == n && lag == 0.0 && lag_series == 2).then_some(m)
            }
        }
    };
    let m = wait_for(
        Duration::from_secs(60),
        "the records to land and the lag to read 0",
        landed(300.0),
    )
    .await;
    let ul = [("table", "user_locations")];
    let md = [("table", "mobile_devices")];
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(300));
    assert_eq!(m.value("dwh_helper_records_consumed_total", &ul), Some(305.0));
    assert_eq!(m.value("dwh_helper_rows_updated_total", &ul), Some(0.0));
    assert_eq!(m.value("dwh_helper_rows_skipped_total", &ul), Some(0.0));
    let reject = |reason| {
        m.value(
            "dwh_helper_rejects_total",
            &[("table", "user_locations"), ("reason", reason)],
        )
    };
    assert_eq!(reject("invalid_json"), Some(2.0));
    assert_eq!(reject("missing_field"), Some(2.0));
    assert_eq!(reject("not_an_object"), Some(1.0));
    assert_eq!(m.sum("dwh_helper_rejects_total", &ul), 5.0);
    assert_eq!(
        pg_count(&url, "SELECT count(*) FROM dwh_rejected_records").await,
        Some(5)
    );
    let md_rows = wait_for(Duration::from_secs(30), "mobile_devices to land", || async {
        Scrape::get(&base, TOKEN)
            .await?
            .value("dwh_helper_rows_inserted_total", &md)
            .filter(|v| *v == 120.0)
    })
    .await;
    assert_eq!(md_rows, 120.0);
    assert_eq!(
        m.series("dwh_helper_rejects_total", &md),
        0,
        "no rejects for mobile_devices"
    );
    let batches = m.value("dwh_helper_batches_total", &ul).expect("batches");
    assert!(batches >= 1.0);
    assert_eq!(
        m.value("dwh_helper_batch_flush_duration_seconds", &ul),
        Some(batches),
        "one flush observed per batch"
    );
    assert!(m.value("dwh_helper_ingested_bytes_total", &ul).expect("bytes") > 300.0 * 50.0);
    assert_eq!(m.value("dwh_helper_failing", &ul), Some(0.0));
    assert_eq!(m.value("dwh_helper_table_stopped", &ul), Some(0.0));
    assert_eq!(m.value("dwh_helper_partitions_assigned", &ul), Some(2.0));
    assert_eq!(m.value("dwh_helper_buffered_records", &ul), Some(0.0));
    assert!(m.value("dwh_helper_memory_budget_bytes", &ul).expect("budget") > 0.0);
    assert!(m.value("dwh_helper_process_resident_memory_bytes", &[]).expect("rss") > 1e6);
    assert!(m.value("dwh_helper_process_open_fds", &[]).expect("fds") > 3.0);
    assert_eq!(
        m.series("dwh_helper_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1
    );
    assert!(
        m.value(
            "dwh_helper_http_requests_total",
            &[("route", "/metrics"), ("method", "GET"), ("status", "200")]
        )
        .expect("scrapes are counted")
            >= 1.0
    );
    let (code, report) = get_status(&base).await.expect("status answers");
    assert_eq!((code, report["verdict"]["state"].as_str()), (200, Some("caught_up")));
    every_metric_of_the_alerts_and_the_dashboard_is_exposed(&base).await;

    // The database stops: the consumer is stuck retrying, the lag loop goes on.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.down();
        cluster
    })
    .await
    .expect("outage");
    let more = sample::records(Table::UserLocations, 380, 1).split_off(300);
    let (first, second) = more.split_at(50);
    publish(&config, &locations, &keyed(Table::UserLocations, first.to_vec())).await;
    let m = wait_for(Duration::from_secs(60), "lag 50 and the table failing", || async {
        let m = Scrape::get(&base, TOKEN).await?;
        let stuck = m.value("dwh_helper_failing", &ul) == Some(1.0)
            && m.sum("dwh_helper_consumer_lag_records", &ul) == 50.0
            && m.value("dwh_helper_dwh_up", &[]) == Some(0.0);
        stuck.then_some(m)
    })
    .await;
    assert!(m.value("dwh_helper_write_retries_total", &ul).expect("retries") >= 1.0);
    let buffered = m.sum("dwh_helper_buffer_lag_records", &ul);
    assert!(buffered <= 50.0, "buffer lag is part of the lag: {buffered}");
    let late = m.sum("dwh_helper_consumer_lag_seconds", &ul);
    assert!(late > 0.0, "lag in time counts while records wait: {late}");
    let (code, report) = get_status(&base).await.expect("status answers");
    assert_eq!(code, 503, "{report}");
    assert_eq!(report["verdict"]["state"], "failing");
    let summary = report["verdict"]["summary"].as_str().expect("summary");
    assert!(summary.contains("DWH"), "{summary}");
    // More records while stuck: the lag grows.
    publish(&config, &locations, &keyed(Table::UserLocations, second.to_vec())).await;
    wait_for(Duration::from_secs(30), "lag to grow to 80", || async {
        let m = Scrape::get(&base, TOKEN).await?;
        (m.sum("dwh_helper_consumer_lag_records", &ul) == 80.0).then_some(())
    })
    .await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.up();
        cluster
    })
    .await
    .expect("back");
    let m = wait_for(Duration::from_secs(180), "recovery", landed(380.0)).await;
    assert_eq!(m.value("dwh_helper_failing", &ul), Some(0.0));
    assert_eq!(m.sum("dwh_helper_consumer_lag_seconds", &ul), 0.0);
    assert_eq!(m.sum("dwh_helper_buffer_lag_records", &ul), 0.0);
    assert_eq!(
        m.value("dwh_helper_rows_skipped_total", &ul),
        Some(0.0),
        "nothing written twice"
    );
    assert_eq!(pg_count(&url, "SELECT count(*) FROM user_locations").await, Some(380));
    drop(child);
    drop(cluster);
}

/// The metric names `deploy/` uses (alert rules, Grafana dashboard) each appear
/// as a sample in a real scrape.
async fn every_metric_of_the_alerts_and_the_dashboard_is_exposed(base: &str) {
    let text = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let exposed: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/dwh-helper.json"] {
        let source = std::fs::read_to_string(format!("{root}/{file}")).expect("deploy file");
        let named: std::collections::BTreeSet<&str> = source
            .match_indices("dwh_helper_")
            .map(|(at, _)| {
                let rest = &source[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(named.len() >= 3, "{file} names metrics");
        for name in named {
            assert!(exposed.contains(name), "{file} uses {name}, which no scrape exposes");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_lagging_caught_up_and_failing_from_the_cli_and_the_api() {
    let (broker, prefix) = broker(2).await;
    let url = fresh_pg_url().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let env = with_api(ingest_env(&broker, &prefix, &url), port, &[]);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let locations = topic(&prefix, Table::UserLocations);
    publish(
        &config,
        &locations,
        &keyed(Table::UserLocations, sample::records(Table::UserLocations, 40, 3)),
    )
    .await;

    // Lagging: nobody ingests yet.
    let (code, json) = status_cli(&env, true);
    assert_eq!(code, 0, "lagging is not failing: {json}");
    let report: Value = serde_json::from_str(&json).expect("status --json prints JSON");
    assert_eq!(report["verdict"]["state"], "lagging");
    assert_eq!(table_lag(&report, Table::UserLocations), 40);
    assert_eq!(table_lag(&report, Table::EventsPart), 0);
    let (code, text) = status_cli(&env, false);
    assert_eq!(code, 0);
    assert!(
        text.contains("lagging: 40 records not yet in the DWH (user_locations 40)"),
        "{text}"
    );
    let api = Child::run(&env, "api");
    let (code, report) = wait_for(Duration::from_secs(30), "the API", || get_status(&base)).await;
    assert_eq!((code, report["verdict"]["state"].as_str()), (200, Some("lagging")));
    let anonymous = reqwest::get(format!("{base}/status")).await.expect("answers");
    assert_eq!(anonymous.status().as_u16(), 401, "/status is behind the token");
    let anonymous = reqwest::get(format!("{base}/metrics")).await.expect("answers");
    assert_eq!(anonymous.status().as_u16(), 401, "/metrics is behind the token");

    // Caught up once an ingest instance wrote everything.
    let ingest = Child::ingest(&env);
    wait_for(Duration::from_secs(60), "status to say caught up", || async {
        let (code, json) = status_cli(&env, true);
        let report: Value = serde_json::from_str(&json).ok()?;
        (code == 0 && report["verdict"]["state"] == "caught_up").then_some(())
    })
    .await;
    let (_, text) = status_cli(&env, false);
    assert!(text.trim_end().ends_with("all caught up"), "{text}");
    assert!(text.contains("user_locations"), "{text}");
    let (code, report) = get_status(&base).await.expect("status answers");
    assert_eq!((code, report["verdict"]["state"].as_str()), (200, Some("caught_up")));
    let rows = report["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["table"] == "user_locations")
        .expect("user_locations")["rows"]
        .clone();
    assert_eq!(rows, 40);
    assert_eq!(
        ingest.terminate(Duration::from_secs(30)).map(|s| s.success()),
        Some(true)
    );

    // Failing: a stored offset past the end of the log (an operator's mistake,
    // or a topic recreated under the DWH).
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::query("UPDATE dwh_consumer_offsets SET next_offset = next_offset + 1000 WHERE topic = $1 AND partition = 0")
        .bind(&locations)
        .execute(&mut conn)
        .await
        .expect("offset moved");
    let (code, text) = status_cli(&env, false);
    assert_eq!(code, 1, "failing exits 1: {text}");
    assert!(
        text.contains("failing: user_locations partition 0: stored offset"),
        "{text}"
    );
    assert!(text.contains("is past the end of the log"), "{text}");
    let (code, json) = status_cli(&env, true);
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(report["verdict"]["state"], "failing");
    let (code, report) = get_status(&base).await.expect("status answers");
    assert_eq!((code, report["verdict"]["state"].as_str()), (503, Some("failing")));
    drop(api);

    // A usage error exits 2.
    let out = Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .args(["status", "--nonsense"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_partition_labels_off_a_thousand_partitions_make_no_per_partition_series() {
    // One wide topic: the six others of one partition each.
    let mut topics = Table::ALL.map(|t| (t, 1));
    topics[Table::ALL
        .iter()
        .position(|t| *t == Table::UserLocations)
        .expect("a table")]
    .1 = 1000;
    let (broker, prefix) = broker_with(&topics).await;
    let url = fresh_pg_url().await;
    let env = ingest_env(&broker, &prefix, &url);
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let wide = topic(&prefix, Table::UserLocations);
    publish(
        &config,
        &wide,
        &keyed(Table::UserLocations, sample::records(Table::UserLocations, 30, 4)),
    )
    .await;

    for labels in [false, true] {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let flag = if labels { "true" } else { "false" };
        let env = with_api(env.clone(), port, &[("METRICS_PARTITION_LABELS", flag)]);
        let api = Child::run(&env, "api");
        let m = wait_for(Duration::from_secs(60), "the lag of 30 records", || async {
            let m = Scrape::get(&base, TOKEN).await?;
            (m.sum("dwh_helper_consumer_lag_records", &[("table", "user_locations")]) == 30.0).then_some(m)
        })
        .await;
        let per_partition = m.0.iter().filter(|s| s.labels.get("partition").is_some()).count();
        let lag_series = m.series("dwh_helper_consumer_lag_records", &[("table", "user_locations")]);
        if labels {
            assert_eq!(lag_series, 1000, "one series per partition");
            assert!(
                per_partition >= 1006,
                "1,000 partitions and six topics of one: {per_partition}"
            );
        } else {
            assert_eq!(per_partition, 0, "no series has a partition label");
            assert_eq!(lag_series, 1, "the table's partitions fold into one series");
        }
        drop(api);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_receives_flush_spans_and_the_rows_metric_and_log_lines_carry_the_trace_id() {
    let (endpoint, received) = otlp::receiver().await;
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    env.retain(|(k, _)| k != "LOG_LEVEL");
    env.extend(
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=otlp-secret-value"),
            ("OTEL_SERVICE_NAME", "dwh-helper-under-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=observability-test"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info,dwh_helper::ingest=debug"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let locations = topic(&prefix, Table::UserLocations);
    publish(
        &config,
        &locations,
        &keyed(Table::UserLocations, sample::records(Table::UserLocations, 25, 5)),
    )
    .await;
    let child = Child::observed(&env, "ingest");

    // Flush spans of user_locations covering the 25 rows, each committed.
    let flushes = wait_for(Duration::from_secs(60), "flush spans of 25 rows", || async {
        let r = received.lock().expect("lock");
        let flushes: Vec<_> = r
            .spans
            .iter()
            .filter(|s| s.name == "batch_flush" && attribute(s, "table").as_deref() == Some("user_locations"))
            .cloned()
            .collect();
        let rows: i64 = flushes
            .iter()
            .filter_map(|s| attribute(s, "rows")?.parse::<i64>().ok())
            .sum();
        (rows == 25).then_some(flushes)
    })
    .await;
    for flush in &flushes {
        assert_eq!(attribute(flush, "outcome").as_deref(), Some("committed"));
        assert_eq!(attribute(flush, "rejects").as_deref(), Some("0"));
        assert!(attribute(flush, "bytes").is_some_and(|b| b != "0"));
        let r = received.lock().expect("lock");
        let children: Vec<&str> = r
            .spans
            .iter()
            .filter(|s| s.parent_span_id == flush.span_id && s.trace_id == flush.trace_id)
            .map(|s| s.name.as_str())
            .collect();
        assert!(children.contains(&"dwh_write"), "{children:?}");
        assert!(children.contains(&"kafka_commit"), "{children:?}");
    }
    // The rows-inserted metric, bridged from /metrics.
    wait_for(
        Duration::from_secs(30),
        "dwh_helper_rows_inserted_total 25 over OTLP",
        || async {
            let r = received.lock().expect("lock");
            r.points
                .iter()
                .any(|(name, attrs, value)| {
                    name == "dwh_helper_rows_inserted_total"
                        && attrs.contains(&("table".to_owned(), "user_locations".to_owned()))
                        && *value == 25.0
                })
                .then_some(())
        },
    )
    .await;
    // The flush histogram is an OTel histogram, one observation per flush.
    let flushed = flushes.len() as f64;
    wait_for(Duration::from_secs(30), "the flush histogram over OTLP", || async {
        let r = received.lock().expect("lock");
        r.histograms
            .iter()
            .any(|(name, attrs, count)| {
                name == "dwh_helper_batch_flush_duration_seconds"
                    && attrs.contains(&("table".to_owned(), "user_locations".to_owned()))
                    && *count == flushed
            })
            .then_some(())
    })
    .await;
    // HTTP requests have spans too, by route template.
    child.scrape().await.expect("scrape");
    wait_for(Duration::from_secs(30), "an http_request span", || async {
        let r = received.lock().expect("lock");
        r.spans
            .iter()
            .any(|s| s.name == "http_request" && attribute(s, "route").as_deref() == Some("/metrics"))
            .then_some(())
    })
    .await;
    {
        let r = received.lock().expect("lock");
        assert!(
            !r.service_names.is_empty() && r.service_names.iter().all(|n| n == "dwh-helper-under-test"),
            "{:?}",
            r.service_names
        );
        assert!(
            !r.environments.is_empty() && r.environments.iter().all(|e| e == "observability-test"),
            "OTEL_RESOURCE_ATTRIBUTES reach the resource: {:?}",
            r.environments
        );
        assert!(
            r.headers
                .contains(&("x-collector-key".to_owned(), "otlp-secret-value".to_owned())),
            "OTEL_EXPORTER_OTLP_HEADERS are sent"
        );
    }
    // A log line inside a flush span carries that span's trace id.
    let traces: Vec<String> = flushes
        .iter()
        .map(|s| s.trace_id.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let log = child.log_text();
    let committed = child.events("batch_committed");
    assert!(!committed.is_empty(), "batch committed is logged at debug");
    for event in &committed {
        let trace = event["span"]["trace_id"].as_str().unwrap_or_default();
        assert!(
            traces.iter().any(|t| t == trace),
            "{event} carries a trace id of a flush span"
        );
    }
    assert!(!log.contains("otlp-secret-value"), "the OTLP headers are a secret");
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_the_ingest_nothing_and_is_warned_about_once() {
    let (broker, prefix) = broker(1).await;
    let url = fresh_pg_url().await;
    let mut env = ingest_env(&broker, &prefix, &url);
    set_env(&mut env, "LOG_FORMAT", "json");
    // Nothing listens there: every export fails at once.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    env.extend(
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let config = config_from(&env, &[]);
    migrated(&config).await;
    let locations = topic(&prefix, Table::UserLocations);
    publish(
        &config,
        &locations,
        &keyed(Table::UserLocations, sample::records(Table::UserLocations, 40, 6)),
    )
    .await;
    let child = Child::observed(&env, "ingest");
    wait_for(Duration::from_secs(60), "rows to land and exports to fail", || async {
        let m = child.scrape().await?;
        let rows = m.value("dwh_helper_rows_inserted_total", &[("table", "user_locations")])?;
        let failures = m.value("dwh_helper_otlp_export_failures_total", &[])?;
        (rows == 40.0 && failures >= 3.0).then_some(())
    })
    .await;
    let warnings = child.events("otlp_export_failed").len();
    assert_eq!(warnings, 1, "one warning a minute, however many exports fail");

    // Only OTLP/HTTP protobuf is spoken: another protocol is a configuration error.
    let out = Command::new(env!("CARGO_BIN_EXE_dwh-helper"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("OTEL_EXPORTER_OTLP_PROTOCOL: \"grpc\" is not supported; use http/protobuf"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
